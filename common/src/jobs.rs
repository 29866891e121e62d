//! The job vocabulary shared by the coordinator and the console: host outcomes, job states and
//! job event kinds. Stored and sent as their lowercase names; these enums are the one list.

use std::fmt;
use std::str::FromStr;

macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name as stored, sent and shown.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "`{other}` is not a {}; expected one of: {}",
                        stringify!($name),
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

named_enum!(
    /// How one host fared in a job.
    Outcome {
        Pending => "pending",
        Succeeded => "succeeded",
        Failed => "failed",
        TimedOut => "timed_out",
        Unreachable => "unreachable",
        Cancelled => "cancelled",
        Skipped => "skipped",
        Interrupted => "interrupted",
    }
);

impl Outcome {
    /// Counts towards the job's failure threshold (cancelled and skipped do not).
    pub const fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::Failed | Outcome::TimedOut | Outcome::Unreachable | Outcome::Interrupted
        )
    }
}

named_enum!(
    /// Where a job is.
    JobState {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Halted => "halted",
        Cancelled => "cancelled",
        Interrupted => "interrupted",
        // awaiting_approval: stored with its plan and leases, nothing runs until a second
        // person approves; denied: an approver refused it; expired: nobody approved it in
        // time. Neither of the last two ran anything.
        AwaitingApproval => "awaiting_approval",
        Denied => "denied",
        Expired => "expired",
    }
);

impl JobState {
    /// `rollbackctl job resume` may continue a job in this state.
    pub const fn resumable(self) -> bool {
        matches!(
            self,
            JobState::Halted | JobState::Cancelled | JobState::Interrupted | JobState::Failed
        )
    }
}

named_enum!(
    /// What a job event reports.
    EventKind {
        JobAwaitingApproval => "job.awaiting_approval",
        JobApproved => "job.approved",
        JobStarted => "job.started",
        JobResumed => "job.resumed",
        PhaseStarted => "phase.started",
        BatchStarted => "batch.started",
        HostDispatched => "host.dispatched",
        HostWaiting => "host.waiting",
        // A step began on a host; its output lines follow as `step.output` (a head and a
        // tail of each step's lines are stored; the cut between them is marked).
        StepStarted => "step.started",
        StepOutput => "step.output",
        StepFinished => "step.finished",
        HostPhaseDone => "host.phase_done",
        HostFinished => "host.finished",
        PhaseFinished => "phase.finished",
        JobHalted => "job.halted",
        JobCancelling => "job.cancelling",
        JobFinished => "job.finished",
        // The deployment guard: a sampling round judged, a criterion that holds on a host
        // (with its evidence), the rollback it proposes (or started, with --auto), and the
        // end of a window without a breach (with the figures).
        GuardSample => "guard.sample",
        GuardBreach => "guard.breach",
        GuardProposal => "guard.proposal",
        GuardHealthy => "guard.healthy",
    }
);

/// Keys of the facts a step reports (`StepFinished.facts`) that the coordinator reads: one
/// list for the agent that writes them and the coordinator that reads them.
pub mod fact {
    /// "true" when the step changed the host, "false" when it found the end state in place.
    pub const CHANGED: &str = "changed";
    /// An alembic revision: where the database is after the step.
    pub const REVISION: &str = "revision";
    pub const FROM_REVISION: &str = "from_revision";
    /// A full commit sha: what HEAD is after the step (or what a revision resolves to).
    pub const SHA: &str = "sha";
    pub const FROM_SHA: &str = "from_sha";
    pub const SUBJECT: &str = "subject";
    /// `alembic.resolve`: the revision now and the one N steps down.
    pub const CURRENT: &str = "current";
    pub const TARGET: &str = "target";
    /// `git.resolve`: HEAD's full sha.
    pub const HEAD: &str = "head";
    /// The unit's active state before the step.
    pub const WAS: &str = "was";
    pub const ACTIVE_STATE: &str = "active_state";
    /// `http.check`: the endpoint and the last status seen.
    pub const ENDPOINT: &str = "endpoint";
    pub const STATUS: &str = "status";
    /// `postgres.backup` / `postgres.restore`: the backup's file name.
    pub const BACKUP: &str = "backup";
    /// `snapshot.take` / `state.read`: the recorded state.
    pub const GIT_SHA: &str = "git_sha";
    pub const GIT_SUBJECT: &str = "git_subject";
    pub const ALEMBIC_REVISION: &str = "alembic_revision";
    pub const ENV_SHA256: &str = "env_sha256";
    pub const UNIT_STATE: &str = "unit_state";
    /// `smoke.run`: how many `[[smoke]]` checks the host has, and which passed or failed
    /// (comma-separated names).
    pub const SMOKE_CHECKS: &str = "smoke_checks";
    pub const SMOKE_PASSED: &str = "smoke_passed";
    pub const SMOKE_FAILED: &str = "smoke_failed";

    /// `guard.sample` / `snapshot.take`: what the guard measures (see the agent's `guard`).
    pub const READYZ_STATUS: &str = "readyz_status";
    pub const RESTARTS: &str = "restarts";
    pub const ERROR_LINES: &str = "error_lines";
    pub const LOG_OFFSET: &str = "log_offset";
    pub const WINDOW_MS: &str = "window_ms";
    /// When the agent took the sample (its clock, Unix ms).
    pub const SAMPLED_AT_MS: &str = "sampled_at_ms";

    /// `smoke.run`: a check's latency percentile (`p50`, `p95`) in milliseconds.
    pub fn smoke_latency(check: &str, percentile: &str) -> String {
        format!("smoke.{check}.{percentile}_ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>(), Ok(*o));
        }
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(*s));
        }
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(*k));
        }
        assert!("exploded".parse::<Outcome>().is_err());
    }
}
