//! Settling a job that stopped dispatching: the outcome of every host still pending and the
//! job's final state. A pure function of what is known, so it is tested without a fleet.

use std::collections::HashMap;

use rollback_common::jobs::{JobState, Outcome};
use rollback_common::runbook::Plan;

/// One host as the engine knows it when the job stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSoFar {
    pub host_id: String,
    pub outcome: Outcome,
    /// The phases this host takes part in, in plan order.
    pub own_phases: Vec<String>,
    pub done_phases: Vec<String>,
}

/// A pending host's settled outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub host_id: String,
    pub outcome: Outcome,
    pub detail: String,
}

/// How the job stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stop {
    pub cancelled: bool,
    pub halt: Option<String>,
}

/// Each planned host's phases, in plan order (a host in no batch has none), from one pass over
/// the plan. A search of every phase's batches per host was quadratic: 50 million comparisons
/// at the end of a 10,000-host job.
pub fn own_phases(plan: &Plan) -> HashMap<&str, Vec<String>> {
    let mut own: HashMap<&str, Vec<String>> = HashMap::new();
    for phase in &plan.phases {
        for host in phase.batches.iter().flatten() {
            let phases = own.entry(host.as_str()).or_default();
            // A host listed twice in one phase still takes part in it once.
            if phases.last() != Some(&phase.name) {
                phases.push(phase.name.clone());
            }
        }
    }
    own
}

/// Settles every pending host and decides the job's state. A pending host that completed all
/// of its phases succeeded; otherwise it is cancelled (the job was cancelled) or skipped.
pub fn settle(hosts: &[HostSoFar], all_phases: &[String], stop: &Stop) -> (Vec<Settled>, JobState) {
    let mut settled = Vec::new();
    let mut all_succeeded = true;
    for h in hosts {
        let outcome = if h.outcome == Outcome::Pending {
            let complete =
                !h.own_phases.is_empty() && h.own_phases.iter().all(|p| h.done_phases.contains(p));
            let done_text = if h.done_phases.is_empty() {
                "none".to_string()
            } else {
                h.done_phases.join(", ")
            };
            let (o, detail) = if complete {
                (Outcome::Succeeded, format!("completed phases: {done_text}"))
            } else if stop.cancelled {
                (
                    Outcome::Cancelled,
                    format!("not finished: the job was cancelled (completed phases: {done_text})"),
                )
            } else {
                let reason = stop
                    .halt
                    .clone()
                    .unwrap_or_else(|| "the job stopped".into());
                (
                    Outcome::Skipped,
                    format!(
                        "not reached: {reason} (completed phases: {done_text} of {})",
                        all_phases.join(", ")
                    ),
                )
            };
            settled.push(Settled {
                host_id: h.host_id.clone(),
                outcome: o,
                detail,
            });
            o
        } else {
            h.outcome
        };
        all_succeeded &= outcome == Outcome::Succeeded;
    }
    let state = if stop.cancelled {
        JobState::Cancelled
    } else if stop.halt.is_some() {
        JobState::Halted
    } else if all_succeeded {
        JobState::Succeeded
    } else {
        JobState::Failed
    };
    (settled, state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, outcome: Outcome, own: &[&str], done: &[&str]) -> HostSoFar {
        HostSoFar {
            host_id: id.into(),
            outcome,
            own_phases: own.iter().map(|s| s.to_string()).collect(),
            done_phases: done.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn planned(name: &str, batches: &[&[&str]]) -> rollback_common::runbook::PlannedPhase {
        rollback_common::runbook::PlannedPhase {
            name: name.into(),
            scope: rollback_common::runbook::Scope::Each,
            steps: Vec::new(),
            batches: batches
                .iter()
                .map(|b| b.iter().map(|h| h.to_string()).collect())
                .collect(),
            host_steps: Default::default(),
        }
    }

    #[test]
    fn own_phases_are_each_hosts_phases_in_plan_order() {
        let plan = Plan {
            procedure: "database".into(),
            targets: ["app1", "app2", "db"].map(String::from).to_vec(),
            once_host: Some("db".into()),
            phases: vec![
                planned("stop", &[&["app1"], &["app2"]]),
                planned("downgrade", &[&["db"]]),
                planned("start", &[&["app2", "app1"], &["app1"]]),
            ],
            max_failures: 1,
        };
        let own = own_phases(&plan);
        assert_eq!(own["app1"], ["stop", "start"]);
        assert_eq!(own["app2"], ["stop", "start"]);
        assert_eq!(own["db"], ["downgrade"]);
        assert!(!own.contains_key("app3"));
    }

    fn phases() -> Vec<String> {
        ["stop", "downgrade", "start"].map(String::from).to_vec()
    }

    #[test]
    fn every_phase_done_is_success() {
        let hosts = [
            host(
                "app1",
                Outcome::Pending,
                &["stop", "start"],
                &["stop", "start"],
            ),
            host(
                "app2",
                Outcome::Pending,
                &["stop", "downgrade", "start"],
                &["stop", "downgrade", "start"],
            ),
        ];
        let (settled, state) = settle(&hosts, &phases(), &Stop::default());
        assert_eq!(state, JobState::Succeeded);
        assert!(settled.iter().all(|s| s.outcome == Outcome::Succeeded));
    }

    #[test]
    fn a_halt_skips_the_unfinished_and_keeps_failures() {
        let hosts = [
            host("app1", Outcome::Failed, &["stop", "start"], &["stop"]),
            host("app2", Outcome::Pending, &["stop", "start"], &["stop"]),
        ];
        let stop = Stop {
            cancelled: false,
            halt: Some("1 host(s) failed".into()),
        };
        let (settled, state) = settle(&hosts, &phases(), &stop);
        assert_eq!(state, JobState::Halted);
        assert_eq!(settled.len(), 1);
        assert_eq!(settled[0].outcome, Outcome::Skipped);
        assert!(
            settled[0].detail.contains("1 host(s) failed") && settled[0].detail.contains("stop")
        );
    }

    #[test]
    fn cancel_wins_over_halt_and_cancels_the_unfinished() {
        let hosts = [host(
            "app1",
            Outcome::Pending,
            &["stop", "start"],
            &["stop"],
        )];
        let stop = Stop {
            cancelled: true,
            halt: Some("x".into()),
        };
        let (settled, state) = settle(&hosts, &phases(), &stop);
        assert_eq!(state, JobState::Cancelled);
        assert_eq!(settled[0].outcome, Outcome::Cancelled);
    }

    #[test]
    fn a_failure_under_the_threshold_fails_the_job_without_halting() {
        let hosts = [
            host("app1", Outcome::Unreachable, &["rollback"], &[]),
            host("app2", Outcome::Pending, &["rollback"], &["rollback"]),
        ];
        let (_, state) = settle(&hosts, &["rollback".to_string()], &Stop::default());
        assert_eq!(state, JobState::Failed);
    }

    #[test]
    fn a_host_in_no_phase_is_never_a_success() {
        let hosts = [host("app1", Outcome::Pending, &[], &[])];
        let (settled, state) = settle(&hosts, &phases(), &Stop::default());
        assert_eq!(settled[0].outcome, Outcome::Skipped);
        assert_eq!(state, JobState::Failed);
    }
}
