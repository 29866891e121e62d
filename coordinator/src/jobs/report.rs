//! The incident report of a job (Markdown): who, why, when, per-host steps with exit codes,
//! durations and output tails, health evidence, and the runbook's post-rollback checklist with
//! the items the tool verified ticked.

use std::fmt::Write;

use rollback_common::jobs::fact;
use rollback_common::proto::{Job, JobHost, StepStatus, step_status_name};

use super::outcome;

pub(crate) fn time(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Health checks a host passed or failed: (endpoint, status, passed).
fn health(host: &JobHost) -> Vec<(String, String, bool)> {
    host.runs
        .iter()
        .filter_map(|r| r.result.as_ref())
        .flat_map(|r| r.steps.iter())
        .filter(|s| s.action == "http.check")
        .map(|s| {
            (
                s.facts.get(fact::ENDPOINT).cloned().unwrap_or_default(),
                s.facts.get(fact::STATUS).cloned().unwrap_or_default(),
                s.status == StepStatus::Succeeded as i32,
            )
        })
        .collect()
}

/// The last `smoke.run` a host ran: whether it passed, how many checks the host has, and the
/// names that passed and failed.
fn smoke(host: &JobHost) -> Option<(bool, usize, String, String)> {
    host.runs
        .iter()
        .filter_map(|r| r.result.as_ref())
        .flat_map(|r| r.steps.iter())
        .rfind(|s| s.action == "smoke.run")
        .map(|s| {
            let get = |k: &str| s.facts.get(k).cloned().unwrap_or_default();
            (
                s.status == StepStatus::Succeeded as i32,
                get(fact::SMOKE_CHECKS).parse().unwrap_or(0),
                get(fact::SMOKE_PASSED),
                get(fact::SMOKE_FAILED),
            )
        })
}

/// The checklist's "Test critical functionality": ticked only when every targeted host ran
/// its smoke checks, had at least one and all passed.
fn critical_functionality(targets: &[&JobHost]) -> (bool, String) {
    if targets.is_empty() {
        return (false, " — not verified by the tool".into());
    }
    let mut passed = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for h in targets {
        match smoke(h) {
            None => problems.push(format!("{}: no smoke checks ran", h.host_id)),
            Some((_, 0, _, _)) => problems.push(format!(
                "{}: no [[smoke]] checks configured in its agent.toml",
                h.host_id
            )),
            Some((true, _, ok, _)) => passed.extend(ok.split(',').map(str::to_string)),
            Some((false, _, _, failed)) => problems.push(format!(
                "{}: smoke check(s) {} failed",
                h.host_id,
                if failed.is_empty() { "?" } else { &failed }
            )),
        }
    }
    passed.remove("");
    if problems.is_empty() {
        let names: Vec<String> = passed.into_iter().map(|n| format!("`{n}`")).collect();
        (
            true,
            format!(
                " — verified: smoke checks {} passed on every targeted host",
                names.join(", ")
            ),
        )
    } else {
        (
            false,
            format!(" — not verified: {}", cell(&problems.join("; "))),
        )
    }
}

fn ran_ok(host: &JobHost, action: &str) -> Option<bool> {
    let steps: Vec<bool> = host
        .runs
        .iter()
        .filter_map(|r| r.result.as_ref())
        .flat_map(|r| r.steps.iter())
        .filter(|s| s.action == action)
        .map(|s| s.status == StepStatus::Succeeded as i32)
        .collect();
    if steps.is_empty() {
        None
    } else {
        Some(steps.iter().all(|ok| *ok))
    }
}

/// Stored `step.output` lines of a job, by host, phase and action (the last run of each).
pub type StepLines = std::collections::HashMap<(String, String, String), Vec<String>>;

/// How long the job's phases took (ms, in the order they first started) and the runbook's
/// time estimate for its procedure; and the webhook notifications sent about it (webhook and
/// event, when; from the audit trail).
#[derive(Debug, Default)]
pub struct Timing {
    pub phases: Vec<(String, i64)>,
    pub estimate: Option<String>,
    pub notified: Vec<(String, i64)>,
}

/// "4.2 s", "3 min 10 s".
fn took(ms: i64) -> String {
    let secs = ms as f64 / 1000.0;
    if secs < 120.0 {
        format!("{secs:.1} s")
    } else {
        let whole = ms / 1000;
        format!("{} min {} s", whole / 60, whole % 60)
    }
}

/// The phases with their durations, and the total next to the runbook's estimate.
fn timing_section(
    md: &mut String,
    job: &Job,
    plan: &rollback_common::proto::PlanResponse,
    timing: &Timing,
) {
    if timing.phases.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Time per phase\n\n| Phase | Scope | Took |\n|---|---|---|"
    );
    for (name, ms) in &timing.phases {
        let scope = plan
            .phases
            .iter()
            .find(|p| p.name == *name)
            .map_or("", |p| p.scope.as_str());
        let _ = writeln!(md, "| {} | {scope} | {} |", cell(name), took(*ms));
    }
    let total = if job.finished_at_unix_ms > 0 {
        took(job.finished_at_unix_ms - job.created_at_unix_ms)
    } else {
        "(running)".to_string()
    };
    let estimate = timing.estimate.as_deref().map_or_else(
        || "the runbook gives no estimate for this procedure".to_string(),
        |e| {
            format!(
                "the runbook's estimate for `{}`: {}",
                job.procedure,
                cell(e)
            )
        },
    );
    let _ = writeln!(md, "| **whole job** | | {total} ({estimate}) |");
}

pub fn render(job: &Job, output: &StepLines, timing: &Timing) -> String {
    let mut md = String::new();
    let plan = job.plan.clone().unwrap_or_default();
    let req = job.request.clone().unwrap_or_default();
    let _ = writeln!(md, "# Rollback report — job `{}`\n", job.job_id);
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| Procedure | `{}` — {} |",
        job.procedure,
        cell(&plan.description)
    );
    let _ = writeln!(md, "| Outcome | **{}** |", job.state);
    let _ = writeln!(md, "| Requested by | `{}` |", job.requested_by);
    let _ = writeln!(md, "| Reason | {} |", cell(&job.reason));
    if let Some(a) = &job.approval {
        let decided = match a.decision.as_str() {
            "" => format!(
                "**pending** — needs an approver other than the requester; expires {}",
                time(a.expires_at_unix_ms)
            ),
            d => format!(
                "**{d}** by `{}` at {} — {}",
                a.decided_by,
                time(a.decided_at_unix_ms),
                cell(&a.reason)
            ),
        };
        let _ = writeln!(md, "| Approval | required ({}); {decided} |", cell(&a.rule));
    }
    let _ = writeln!(md, "| Started | {} |", time(job.created_at_unix_ms));
    let _ = writeln!(md, "| Finished | {} |", time(job.finished_at_unix_ms));
    if job.finished_at_unix_ms > 0 {
        let secs = (job.finished_at_unix_ms - job.created_at_unix_ms) as f64 / 1000.0;
        let _ = writeln!(md, "| Duration | {secs:.1} s |");
    }
    let _ = writeln!(
        md,
        "| Targets | `--select {}`: {} |",
        cell(&req.selector),
        plan.targets.join(", ")
    );
    if !plan.once_host.is_empty() {
        let _ = writeln!(md, "| Once-host | {} |", plan.once_host);
    }
    let mut values: Vec<String> = req.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
    values.sort();
    if !values.is_empty() {
        let _ = writeln!(md, "| Parameters | {} |", cell(&values.join(", ")));
    }
    let _ = writeln!(md, "| Strategy | {} |", cell(&plan.strategy));
    for pin in &plan.pins {
        let _ = writeln!(md, "| Pinned `{}` | {} |", pin.param, cell(&pin.note));
    }
    if !job.halt_reason.is_empty() {
        let _ = writeln!(md, "\n> **Halted:** {}", job.halt_reason);
    }
    timing_section(&mut md, job, &plan, timing);
    if !job.history.is_empty() {
        let _ = writeln!(md, "\n## Timeline\n");
        for line in &job.history {
            let (at, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let _ = writeln!(md, "- {} {}", time(at.parse().unwrap_or(0)), cell(rest));
        }
    }

    let _ = writeln!(
        md,
        "\n## Hosts\n\n| Host | Outcome | Phase | Failed step | Exit | Duration | Detail |\n|---|---|---|---|---|---|---|"
    );
    for h in &job.hosts {
        let _ = writeln!(
            md,
            "| {}{} | {} | {} | {} | {} | {:.1} s | {} |",
            h.host_id,
            if h.once_only { " (once-host)" } else { "" },
            h.outcome,
            h.phase,
            h.failed_step,
            if h.failed_step.is_empty() {
                String::new()
            } else {
                h.exit_code.to_string()
            },
            h.duration_ms as f64 / 1000.0,
            cell(&h.detail)
        );
    }

    let _ = writeln!(md, "\n## Steps per host");
    for h in &job.hosts {
        let _ = writeln!(md, "\n### {} — {}\n", h.host_id, h.outcome);
        if h.runs.is_empty() {
            let _ = writeln!(md, "No step was dispatched to this host.");
            continue;
        }
        let _ = writeln!(
            md,
            "| Phase | Step | Status | Exit | Duration | Facts |\n|---|---|---|---|---|---|"
        );
        let mut failing = Vec::new();
        for run in &h.runs {
            let Some(result) = &run.result else {
                let _ = writeln!(
                    md,
                    "| {} | (run {}) | no result recorded | | | |",
                    run.phase, run.run_id
                );
                continue;
            };
            for s in &result.steps {
                let mut facts: Vec<String> =
                    s.facts.iter().map(|(k, v)| format!("{k}={v}")).collect();
                facts.sort();
                let _ = writeln!(
                    md,
                    "| {} | `{}` | {} | {} | {:.2} s | {} |",
                    run.phase,
                    s.action,
                    step_status_name(s.status),
                    s.exit_code,
                    s.duration_ms as f64 / 1000.0,
                    cell(&facts.join(" "))
                );
                if s.status != StepStatus::Succeeded as i32
                    && s.status != StepStatus::Skipped as i32
                {
                    failing.push((run.phase.clone(), s.clone()));
                }
            }
        }
        for (phase, s) in failing {
            let _ = writeln!(
                md,
                "\n**`{}` {}:** {}\n",
                s.action,
                step_status_name(s.status),
                s.error
            );
            let stored = output.get(&(h.host_id.clone(), phase.clone(), s.action.clone()));
            let out = match stored {
                Some(lines) if !lines.is_empty() => lines.join("\n"),
                _ => tail(&s.output_tail, 20),
            };
            if !out.is_empty() {
                let _ = writeln!(md, "```text\n{out}\n```");
            }
        }
    }

    let _ = writeln!(md, "\n## Health evidence\n");
    let targets: Vec<&JobHost> = job.hosts.iter().filter(|h| !h.once_only).collect();
    for h in &targets {
        let checks = health(h);
        if checks.is_empty() {
            let _ = writeln!(md, "- {}: no health check ran", h.host_id);
        }
        for (endpoint, status, ok) in checks {
            let _ = writeln!(
                md,
                "- {}: `GET {endpoint}` → {status} ({})",
                h.host_id,
                if ok { "passed" } else { "failed" }
            );
        }
    }

    let all_healthy = !targets.is_empty()
        && targets.iter().all(|h| {
            let checks = health(h);
            h.outcome == outcome::SUCCEEDED && !checks.is_empty() && checks.iter().all(|c| c.2)
        });
    let logs_clean =
        !targets.is_empty() && targets.iter().all(|h| ran_ok(h, "log.scan") == Some(true));
    let tick = |b: bool| if b { "x" } else { " " };
    let _ = writeln!(md, "\n## Post-rollback checklist\n");
    let _ = writeln!(
        md,
        "- [{}] Verify application health checks passing{}",
        tick(all_healthy),
        if all_healthy {
            " — verified: every targeted host passed its health checks"
        } else {
            " — not verified by the tool"
        }
    );
    let _ = writeln!(
        md,
        "- [{}] Check application logs for errors{}",
        tick(logs_clean),
        if logs_clean {
            " — verified: log.scan found no new errors on any targeted host"
        } else {
            " — not verified by the tool"
        }
    );
    let (critical_ok, critical_note) = critical_functionality(&targets);
    let _ = writeln!(
        md,
        "- [{}] Test critical functionality{critical_note}",
        tick(critical_ok)
    );
    match timing.notified.first() {
        Some((first, at)) => {
            let _ = writeln!(
                md,
                "- [x] Notify stakeholders of rollback — {} webhook notification(s), first {} at {}",
                timing.notified.len(),
                cell(first),
                time(*at)
            );
        }
        None => {
            let _ = writeln!(md, "- [ ] Notify stakeholders of rollback");
        }
    }
    let _ = writeln!(
        md,
        "- [{}] Document rollback reason — \"{}\"",
        tick(!job.reason.is_empty()),
        cell(&job.reason)
    );
    let _ = writeln!(md, "- [x] Create incident report — this report");
    let _ = writeln!(md, "- [ ] Schedule post-mortem");
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollback_common::proto::{HostRun, RunFinished, StepFinished};

    fn host(id: &str, smoke: Option<(StepStatus, &str, &str, &str)>) -> JobHost {
        let steps = smoke
            .map(|(status, checks, passed, failed)| StepFinished {
                action: "smoke.run".into(),
                status: status as i32,
                facts: [
                    (fact::SMOKE_CHECKS, checks),
                    (fact::SMOKE_PASSED, passed),
                    (fact::SMOKE_FAILED, failed),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                ..Default::default()
            })
            .into_iter()
            .collect();
        JobHost {
            host_id: id.into(),
            runs: vec![HostRun {
                result: Some(RunFinished {
                    steps,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn critical_functionality_is_ticked_only_when_every_host_passed_a_smoke_check() {
        let ok = StepStatus::Succeeded;
        let a = host("app-1", Some((ok, "2", "incidents,reports", "")));
        let b = host("app-2", Some((ok, "1", "incidents", "")));
        let (ticked, note) = critical_functionality(&[&a, &b]);
        assert!(ticked, "{note}");
        assert!(note.contains("`incidents`, `reports`"), "{note}");

        let failing = host(
            "app-2",
            Some((StepStatus::Failed, "2", "incidents", "reports")),
        );
        let (ticked, note) = critical_functionality(&[&a, &failing]);
        assert!(!ticked);
        assert!(
            note.contains("app-2: smoke check(s) reports failed"),
            "{note}"
        );

        let none_configured = host("app-2", Some((ok, "0", "", "")));
        let (ticked, note) = critical_functionality(&[&a, &none_configured]);
        assert!(!ticked);
        assert!(note.contains("no [[smoke]] checks configured"), "{note}");

        let never_ran = host("app-2", None);
        assert!(!critical_functionality(&[&a, &never_ran]).0);
        assert!(!critical_functionality(&[]).0);
    }

    #[test]
    fn the_report_puts_each_phase_time_and_the_whole_job_next_to_the_runbook_estimate() {
        use rollback_common::proto::{PlanPhase, PlanResponse};
        let phase = |name: &str, scope: &str| PlanPhase {
            name: name.into(),
            scope: scope.into(),
            ..Default::default()
        };
        let job = Job {
            job_id: "j1".into(),
            procedure: "database".into(),
            state: "succeeded".into(),
            created_at_unix_ms: 1_000,
            finished_at_unix_ms: 1_000 + 190_000,
            plan: Some(PlanResponse {
                phases: vec![phase("stop", "each"), phase("downgrade", "once")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let timing = Timing {
            phases: vec![("stop".into(), 1_500), ("downgrade".into(), 185_000)],
            estimate: Some("5-15 minutes".into()),
            notified: Vec::new(),
        };
        let md = render(&job, &StepLines::new(), &timing);
        assert!(md.contains("## Time per phase"), "{md}");
        assert!(md.contains("| stop | each | 1.5 s |"), "{md}");
        assert!(md.contains("| downgrade | once | 3 min 5 s |"), "{md}");
        assert!(
            md.contains("| **whole job** | | 3 min 10 s (the runbook's estimate for `database`: 5-15 minutes) |"),
            "{md}"
        );
        let none = render(&job, &StepLines::new(), &Timing::default());
        assert!(!none.contains("## Time per phase"), "{none}");
        assert!(
            none.contains("- [ ] Notify stakeholders of rollback\n"),
            "{none}"
        );
    }

    #[test]
    fn a_sent_notification_ticks_notify_stakeholders_naming_it() {
        let job = Job {
            job_id: "j1".into(),
            ..Default::default()
        };
        let timing = Timing {
            notified: vec![
                ("webhook=incident event=started".into(), 1_700_000_000_000),
                ("webhook=incident event=finished".into(), 1_700_000_060_000),
            ],
            ..Default::default()
        };
        let md = render(&job, &StepLines::new(), &timing);
        assert!(
            md.contains("- [x] Notify stakeholders of rollback — 2 webhook notification(s), first webhook=incident event=started at 2023-11-14T22:13:20Z"),
            "{md}"
        );
    }
}
