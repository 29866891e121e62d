//! The JSON form of a job record and of a plan (`--output json`, the web console's API).
//!
//! Written straight from the protobuf records, borrowing their strings: a 10,000-host job's
//! record is about 7 MB of JSON, and building it as a `serde_json::Value` tree first (a map and
//! a string copy per field) cost `rollbackctl rollback` more than the record's printing did.
//! Every object's fields are declared in name order, and every map is written sorted: the
//! output is the same, byte for byte, as that of the tree it replaces (a test holds both to it).

use std::collections::{BTreeMap, HashMap};

use rollback_common::proto::{
    HostRun, Job, JobHost, PlanResponse, Step, StepFinished, step_status_name,
};
use serde::{Serialize, Serializer};

use crate::output::format_time;

/// A job's whole record.
pub(crate) fn job_json(j: &Job) -> JobRecord<'_> {
    JobRecord {
        approval: j.approval.as_ref().map(|a| ApprovalRecord {
            decided_at: format_time(a.decided_at_unix_ms),
            decided_by: &a.decided_by,
            decision: &a.decision,
            expires_at: format_time(a.expires_at_unix_ms),
            reason: &a.reason,
            requested_by: &a.requested_by,
            rule: &a.rule,
        }),
        created_at: format_time(j.created_at_unix_ms),
        created_at_unix_ms: j.created_at_unix_ms,
        finished_at: format_time(j.finished_at_unix_ms),
        finished_at_unix_ms: j.finished_at_unix_ms,
        halt_reason: &j.halt_reason,
        history: &j.history,
        hosts: Each(&j.hosts, host_record),
        job_id: &j.job_id,
        plan: j.plan.as_ref().map(plan_json),
        procedure: &j.procedure,
        reason: &j.reason,
        requested_by: &j.requested_by,
        selector: j.request.as_ref().map_or("", |r| r.selector.as_str()),
        state: &j.state,
    }
}

/// A plan: its phases, steps, batches and pins.
pub(crate) fn plan_json(p: &PlanResponse) -> PlanRecord<'_> {
    PlanRecord {
        description: &p.description,
        max_failures: p.max_failures,
        offline: &p.offline,
        once_host: &p.once_host,
        phases: p
            .phases
            .iter()
            .map(|ph| PhaseRecord {
                batches: ph.batches.iter().map(|b| b.hosts.as_slice()).collect(),
                // Keyed by host, as the tree's map was (a host named twice: its last steps).
                host_steps: ph
                    .host_steps
                    .iter()
                    .map(|hs| (hs.host_id.as_str(), steps(&hs.steps)))
                    .collect(),
                name: &ph.name,
                scope: &ph.scope,
                steps: steps(&ph.steps),
            })
            .collect(),
        pins: p
            .pins
            .iter()
            .map(|pin| PinRecord {
                from_by_host: Sorted(&pin.from_by_host),
                note: &pin.note,
                param: &pin.param,
                requested: &pin.requested,
                resolved_on: &pin.resolved_on,
                to: &pin.to,
            })
            .collect(),
        procedure: &p.procedure,
        strategy: &p.strategy,
        targets: &p.targets,
    }
}

fn steps(steps: &[Step]) -> Vec<StepRecord<'_>> {
    steps
        .iter()
        .map(|s| StepRecord {
            action: &s.action,
            params: Sorted(&s.params),
        })
        .collect()
}

#[derive(Serialize)]
pub(crate) struct JobRecord<'a> {
    approval: Option<ApprovalRecord<'a>>,
    created_at: String,
    created_at_unix_ms: i64,
    finished_at: String,
    finished_at_unix_ms: i64,
    halt_reason: &'a str,
    history: &'a [String],
    hosts: Each<'a, JobHost, HostRecord<'a>>,
    job_id: &'a str,
    plan: Option<PlanRecord<'a>>,
    procedure: &'a str,
    reason: &'a str,
    requested_by: &'a str,
    selector: &'a str,
    state: &'a str,
}

#[derive(Serialize)]
struct ApprovalRecord<'a> {
    decided_at: String,
    decided_by: &'a str,
    decision: &'a str,
    expires_at: String,
    reason: &'a str,
    requested_by: &'a str,
    rule: &'a str,
}

/// A list written item by item as it is reached, each made by the function (no list of
/// records is built first: a 10,000-host job has 10,000 hosts and their runs).
struct Each<'a, T, R>(&'a [T], fn(&'a T) -> R);

impl<'a, T, R: Serialize> Serialize for Each<'a, T, R> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(self.0.iter().map(self.1))
    }
}

fn host_record(h: &JobHost) -> HostRecord<'_> {
    HostRecord {
        detail: &h.detail,
        duration_ms: h.duration_ms,
        exit_code: h.exit_code,
        failed_step: &h.failed_step,
        host_id: &h.host_id,
        once_only: h.once_only,
        outcome: &h.outcome,
        phase: &h.phase,
        runs: Each(&h.runs, run_record),
    }
}

#[derive(Serialize)]
struct HostRecord<'a> {
    detail: &'a str,
    duration_ms: u64,
    exit_code: i32,
    failed_step: &'a str,
    host_id: &'a str,
    once_only: bool,
    outcome: &'a str,
    phase: &'a str,
    runs: Each<'a, HostRun, RunRecord<'a>>,
}

fn run_record(r: &HostRun) -> RunRecord<'_> {
    RunRecord {
        phase: &r.phase,
        run_id: &r.run_id,
        status: r
            .result
            .as_ref()
            .map_or("pending", |x| step_status_name(x.status)),
        steps: Each(
            r.result.as_ref().map_or(&[], |x| x.steps.as_slice()),
            step_result_record,
        ),
    }
}

#[derive(Serialize)]
struct RunRecord<'a> {
    phase: &'a str,
    run_id: &'a str,
    status: &'static str,
    steps: Each<'a, StepFinished, StepResultRecord<'a>>,
}

fn step_result_record(s: &StepFinished) -> StepResultRecord<'_> {
    StepResultRecord {
        action: &s.action,
        duration_ms: s.duration_ms,
        error: &s.error,
        exit_code: s.exit_code,
        facts: Sorted(&s.facts),
        output_tail: String::from_utf8_lossy(&s.output_tail),
        status: step_status_name(s.status),
    }
}

#[derive(Serialize)]
struct StepResultRecord<'a> {
    action: &'a str,
    duration_ms: u64,
    error: &'a str,
    exit_code: i32,
    facts: Sorted<'a>,
    output_tail: std::borrow::Cow<'a, str>,
    status: &'static str,
}

#[derive(Serialize)]
pub(crate) struct PlanRecord<'a> {
    description: &'a str,
    max_failures: u32,
    offline: &'a [String],
    once_host: &'a str,
    phases: Vec<PhaseRecord<'a>>,
    pins: Vec<PinRecord<'a>>,
    procedure: &'a str,
    strategy: &'a str,
    targets: &'a [String],
}

#[derive(Serialize)]
struct PhaseRecord<'a> {
    batches: Vec<&'a [String]>,
    host_steps: BTreeMap<&'a str, Vec<StepRecord<'a>>>,
    name: &'a str,
    scope: &'a str,
    steps: Vec<StepRecord<'a>>,
}

#[derive(Serialize)]
struct PinRecord<'a> {
    from_by_host: Sorted<'a>,
    note: &'a str,
    param: &'a str,
    requested: &'a str,
    resolved_on: &'a str,
    to: &'a str,
}

#[derive(Serialize)]
struct StepRecord<'a> {
    action: &'a str,
    params: Sorted<'a>,
}

/// A protobuf map written with its keys in order, so the same record prints the same.
struct Sorted<'a>(&'a HashMap<String, String>);

impl Serialize for Sorted<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut pairs: Vec<(&String, &String)> = self.0.iter().collect();
        pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        ser.collect_map(pairs)
    }
}

#[cfg(test)]
mod tests {
    use rollback_common::proto::{
        Approval, Batch, HostSteps, Pin, PlanPhase, RollbackRequest, RunFinished,
    };
    use serde_json::{Value, json};

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn step(action: &str, params: &[(&str, &str)]) -> Step {
        Step {
            action: action.into(),
            params: map(params),
            timeout_secs: 30,
        }
    }

    /// A record with every field set, maps of several keys and output that is not UTF-8.
    fn full_job() -> Job {
        let plan = PlanResponse {
            procedure: "database".into(),
            targets: vec!["web-1".into(), "web-2".into()],
            once_host: "db-1".into(),
            phases: vec![PlanPhase {
                name: "downgrade".into(),
                scope: "each".into(),
                steps: vec![step(
                    "alembic.downgrade",
                    &[("to_revision", "abc"), ("dir", "/srv/app"), ("env", "prod")],
                )],
                batches: vec![
                    Batch {
                        hosts: vec!["web-1".into()],
                    },
                    Batch {
                        hosts: vec!["web-2".into()],
                    },
                ],
                host_steps: vec![
                    HostSteps {
                        host_id: "web-2".into(),
                        steps: vec![step("git.checkout", &[("revision", "r2")])],
                    },
                    HostSteps {
                        host_id: "web-1".into(),
                        steps: vec![step("git.checkout", &[("revision", "r1")])],
                    },
                ],
            }],
            max_failures: 1,
            strategy: "canary 1, then batches of 1".into(),
            description: "downgrade the schema".into(),
            pins: vec![Pin {
                param: "to_revision".into(),
                requested: "steps=1".into(),
                to: "abc".into(),
                from_by_host: map(&[("web-2", "def"), ("web-1", "def"), ("db-1", "def")]),
                resolved_on: "db-1".into(),
                note: "resolved on db-1".into(),
            }],
            offline: vec!["web-9".into()],
            guard: None,
        };
        let finished = |status| RunFinished {
            run_id: "r-1".into(),
            status,
            steps: vec![StepFinished {
                status,
                exit_code: 0,
                duration_ms: 812,
                error: String::new(),
                output_truncated: false,
                action: "alembic.downgrade".into(),
                output_tail: b"INFO  [alembic] downgrade \xff def -> abc\n".to_vec(),
                facts: map(&[("revision", "abc"), ("before", "def"), ("dir", "/srv/app")]),
            }],
            from_journal: false,
            job_id: "j1".into(),
        };
        Job {
            job_id: "0123456789abcdef0123456789abcdef".into(),
            procedure: "database".into(),
            state: "succeeded".into(),
            reason: "bad \"migration\" in 2026-11-25's deploy".into(),
            requested_by: "alice".into(),
            created_at_unix_ms: 1_796_410_534_433,
            finished_at_unix_ms: 1_796_410_537_563,
            request: Some(RollbackRequest {
                selector: "role=web".into(),
                ..Default::default()
            }),
            plan: Some(plan),
            hosts: vec![
                JobHost {
                    host_id: "web-1".into(),
                    outcome: "succeeded".into(),
                    phase: "downgrade".into(),
                    failed_step: String::new(),
                    exit_code: 0,
                    detail: String::new(),
                    duration_ms: 900,
                    runs: vec![HostRun {
                        run_id: "r-1".into(),
                        phase: "downgrade".into(),
                        result: Some(finished(1)),
                    }],
                    once_only: false,
                },
                JobHost {
                    host_id: "web-2".into(),
                    outcome: "failed".into(),
                    phase: "downgrade".into(),
                    failed_step: "alembic.downgrade".into(),
                    exit_code: 2,
                    detail: "web-2: alembic.downgrade exited 2".into(),
                    duration_ms: 1200,
                    runs: vec![
                        HostRun {
                            run_id: "r-2".into(),
                            phase: "downgrade".into(),
                            result: None,
                        },
                        HostRun {
                            run_id: "r-3".into(),
                            phase: "downgrade".into(),
                            result: Some(finished(2)),
                        },
                    ],
                    once_only: true,
                },
            ],
            halt_reason: "1 failure reached the threshold".into(),
            history: vec!["1796410534517 job.started".into()],
            approval: Some(Approval {
                rule: "procedure database".into(),
                requested_by: "alice".into(),
                requested_at_unix_ms: 1_796_410_534_000,
                expires_at_unix_ms: 1_796_414_134_000,
                decision: "approved".into(),
                decided_by: "bob".into(),
                decided_at_unix_ms: 1_796_410_534_400,
                reason: "checked".into(),
            }),
        }
    }

    /// Every object's fields in name order and every map sorted: the record prints exactly as
    /// its `Value` (whose objects are sorted maps) does, so no field moves between releases.
    #[test]
    fn a_record_prints_as_its_value_does() -> serde_json::Result<()> {
        let job = full_job();
        let direct = serde_json::to_string_pretty(&job_json(&job))?;
        let value = serde_json::to_value(job_json(&job))?;
        assert_eq!(direct, serde_json::to_string_pretty(&value)?);
        let plan = job.plan.as_ref().map(plan_json);
        let value = serde_json::to_value(&plan)?;
        assert_eq!(
            serde_json::to_string_pretty(&plan)?,
            serde_json::to_string_pretty(&value)?
        );
        assert!(direct.len() > 2000, "the whole record is written: {direct}");
        Ok(())
    }

    /// The fields scripts read, with the values they had when the record was a `json!` tree.
    #[test]
    fn a_record_keeps_its_fields_and_values() -> serde_json::Result<()> {
        let job = full_job();
        let v: Value = serde_json::to_value(job_json(&job))?;
        assert_eq!(v["created_at"], "2026-12-04T18:55:34.433Z");
        assert_eq!(v["selector"], "role=web");
        assert_eq!(v["approval"]["decided_by"], "bob");
        assert_eq!(v["approval"]["expires_at"], "2026-12-04T19:55:34Z");
        assert_eq!(v["hosts"][0]["runs"][0]["status"], "succeeded");
        assert_eq!(v["hosts"][1]["runs"][0]["status"], "pending");
        assert_eq!(v["hosts"][1]["runs"][0]["steps"], json!([]));
        assert_eq!(v["hosts"][1]["once_only"], true);
        assert_eq!(v["hosts"][1]["exit_code"], 2);
        let step = &v["hosts"][1]["runs"][1]["steps"][0];
        assert_eq!(step["status"], "failed");
        assert_eq!(step["facts"]["before"], "def");
        assert_eq!(
            step["output_tail"],
            "INFO  [alembic] downgrade \u{fffd} def -> abc\n"
        );
        let phase = &v["plan"]["phases"][0];
        assert_eq!(phase["batches"], json!([["web-1"], ["web-2"]]));
        assert_eq!(
            phase["host_steps"]["web-1"],
            json!([{"action": "git.checkout", "params": {"revision": "r1"}}])
        );
        assert_eq!(v["plan"]["pins"][0]["from_by_host"]["db-1"], "def");
        assert_eq!(v["plan"]["max_failures"], 1);
        // A job without an approval, plan or request: nulls and an empty selector.
        let bare = Job::default();
        let v: Value = serde_json::to_value(job_json(&bare))?;
        assert_eq!(v["approval"], Value::Null);
        assert_eq!(v["plan"], Value::Null);
        assert_eq!(v["selector"], "");
        assert_eq!(v["finished_at"], "");
        assert_eq!(v["hosts"], json!([]));
        Ok(())
    }
}
