//! One phase's remaining work as a pure function of the plan and each host's progress: whether
//! the phase is blocked (its once-host already failed), which hosts still have it to do, batch
//! by batch, and the labels operators see. The engine runs what this returns.

use rollback_common::jobs::Outcome;
use rollback_common::runbook::{PlannedPhase, Scope};

/// A host's progress as far as a phase is concerned.
pub trait Progress {
    /// The host is still pending (has not failed, been cancelled or skipped).
    fn pending(&self, host: &str) -> bool;
    /// The host completed `phase`.
    fn done(&self, host: &str, phase: &str) -> bool;
}

/// What is left of one phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhaseWork {
    /// Every host of the phase completed it (or stopped earlier): nothing to run.
    Nothing,
    /// A once-phase whose host already failed: the job must halt, with this reason.
    Blocked(String),
    /// Batches to run in order: (label, hosts still to do), with hosts done / hosts in phase.
    Run {
        batches: Vec<(String, Vec<String>)>,
        done: u32,
        total: u32,
    },
}

/// The remaining work of `phase`; `canary` says whether the job's first batch is a canary.
pub fn phase_work(phase: &PlannedPhase, canary: bool, progress: &impl Progress) -> PhaseWork {
    let hosts: Vec<&String> = phase.batches.iter().flatten().collect();
    let total = u32::try_from(hosts.len()).unwrap_or(u32::MAX);
    if phase.scope == Scope::Once
        && let Some(h) = hosts.first()
        && !progress.done(h, &phase.name)
        && !progress.pending(h)
    {
        return PhaseWork::Blocked(format!(
            "phase `{}` must run on {h}, which already failed",
            phase.name
        ));
    }
    let todo = |h: &String| progress.pending(h) && !progress.done(h, &phase.name);
    let remaining = hosts.iter().filter(|h| todo(h)).count();
    if remaining == 0 {
        return PhaseWork::Nothing;
    }
    let n = phase.batches.len();
    let batches = phase
        .batches
        .iter()
        .enumerate()
        .filter_map(|(bi, batch)| {
            let hosts: Vec<String> = batch.iter().filter(|h| todo(h)).cloned().collect();
            if hosts.is_empty() {
                return None;
            }
            let label = match (phase.scope, bi) {
                (Scope::Once, _) => "once".to_string(),
                (Scope::Each, 0) if canary => format!("batch 1/{n} (canary)"),
                _ => format!("batch {}/{n}", bi + 1),
            };
            Some((label, hosts))
        })
        .collect();
    PhaseWork::Run {
        batches,
        done: total - u32::try_from(remaining).unwrap_or(total),
        total,
    }
}

/// Progress as the store keeps it: outcome name and completed phases per host.
impl Progress for std::collections::BTreeMap<String, crate::store::JobHostRow> {
    fn pending(&self, host: &str) -> bool {
        self.get(host)
            .is_some_and(|t| t.outcome == Outcome::Pending.as_str())
    }

    fn done(&self, host: &str, phase: &str) -> bool {
        self.get(host)
            .is_some_and(|t| t.done_phases.iter().any(|p| p == phase))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[derive(Default)]
    struct P {
        failed: BTreeSet<&'static str>,
        done: BTreeSet<(&'static str, &'static str)>,
    }

    impl Progress for P {
        fn pending(&self, host: &str) -> bool {
            !self.failed.contains(host)
        }
        fn done(&self, host: &str, phase: &str) -> bool {
            self.done.iter().any(|(h, p)| *h == host && *p == phase)
        }
    }

    fn phase(scope: Scope, batches: &[&[&str]]) -> PlannedPhase {
        PlannedPhase {
            name: "stop".into(),
            scope,
            steps: Vec::new(),
            batches: batches
                .iter()
                .map(|b| b.iter().map(|h| h.to_string()).collect())
                .collect(),
            host_steps: BTreeMap::new(),
        }
    }

    #[test]
    fn a_fresh_phase_runs_every_batch_canary_first() {
        let ph = phase(Scope::Each, &[&["a"], &["b", "c"], &["d"]]);
        assert_eq!(
            phase_work(&ph, true, &P::default()),
            PhaseWork::Run {
                batches: vec![
                    ("batch 1/3 (canary)".into(), vec!["a".into()]),
                    ("batch 2/3".into(), vec!["b".into(), "c".into()]),
                    ("batch 3/3".into(), vec!["d".into()]),
                ],
                done: 0,
                total: 4,
            }
        );
    }

    #[test]
    fn a_resumed_phase_runs_only_what_is_left() {
        let ph = phase(Scope::Each, &[&["a"], &["b", "c"], &["d"]]);
        let p = P {
            failed: ["d"].into(),
            done: [("a", "stop"), ("b", "stop")].into(),
        };
        assert_eq!(
            phase_work(&ph, true, &p),
            PhaseWork::Run {
                batches: vec![("batch 2/3".into(), vec!["c".into()])],
                done: 3,
                total: 4,
            },
            "a and b are done, d failed earlier: only c is left"
        );
        let all = P {
            failed: BTreeSet::new(),
            done: [("a", "stop"), ("b", "stop"), ("c", "stop"), ("d", "stop")].into(),
        };
        assert_eq!(phase_work(&ph, true, &all), PhaseWork::Nothing);
    }

    #[test]
    fn a_once_phase_is_never_rerun_and_blocks_when_its_host_failed() {
        let ph = phase(Scope::Once, &[&["db"]]);
        let done = P {
            failed: ["db"].into(),
            done: [("db", "stop")].into(),
        };
        assert_eq!(phase_work(&ph, false, &done), PhaseWork::Nothing);
        let failed = P {
            failed: ["db"].into(),
            ..P::default()
        };
        assert!(
            matches!(phase_work(&ph, false, &failed), PhaseWork::Blocked(r) if r.contains("db"))
        );
        assert!(matches!(
            phase_work(&ph, false, &P::default()),
            PhaseWork::Run { batches, .. } if batches == vec![("once".to_string(), vec!["db".to_string()])]
        ));
    }
}
