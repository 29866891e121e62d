//! Rollback jobs: a procedure from the runbook run across the fleet. The job is persisted
//! before it is acknowledged; phases run in order with a barrier between them; `each` phases
//! go canary first then in batches; a `once` phase runs on exactly one host; when failures
//! reach the threshold the job halts and hosts never reached are `skipped`. Every event is
//! stored before it is broadcast, so any number of watchers can replay and follow a job, and
//! a slow watcher never slows the rollback.

mod approval;
mod batch;
mod diagnosis;
mod engine;
pub mod guard;
mod output;
mod takeover;
pub use engine::leased_status;
mod pins;
mod planning;
pub mod report;
#[cfg(test)]
mod resume_model;
mod settle;
mod snapshots;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollback_common::proto::JobEvent;
use rollback_common::runbook::Runbook;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::runs::RunHub;
use crate::store::Store;

/// Host outcomes as stored and shown (names from `rollback_common::jobs::Outcome`).
pub mod outcome {
    use rollback_common::jobs::Outcome;
    pub const PENDING: &str = Outcome::Pending.as_str();
    pub const SUCCEEDED: &str = Outcome::Succeeded.as_str();
    pub const FAILED: &str = Outcome::Failed.as_str();
    pub const TIMED_OUT: &str = Outcome::TimedOut.as_str();
    pub const UNREACHABLE: &str = Outcome::Unreachable.as_str();
    pub const CANCELLED: &str = Outcome::Cancelled.as_str();
    pub const SKIPPED: &str = Outcome::Skipped.as_str();
    pub const INTERRUPTED: &str = Outcome::Interrupted.as_str();
}

/// A job this process is running.
#[derive(Debug)]
struct LiveJob {
    cancel: CancellationToken,
    /// Watchers subscribe here; events arrive only after they are stored.
    events: broadcast::Sender<JobEvent>,
    /// The next seq and the queue to the job's event pipeline, under one lock so events
    /// enter the pipeline in seq order.
    pipeline: Mutex<(u64, tokio::sync::mpsc::UnboundedSender<JobEvent>)>,
    state: Mutex<String>,
    /// Stops driving it here without deciding anything (shutdown, or the lease went to a peer).
    stop: CancellationToken,
    /// Its lease went to another coordinator: the job is theirs now.
    lease_lost: CancellationToken,
    /// Until when this process's lease holds, as last renewed.
    lease_until_ms: std::sync::atomic::AtomicI64,
    /// Bytes of step output stored for it by this process (bounded by `output::JOB_BYTES`).
    output_bytes: std::sync::atomic::AtomicUsize,
}

pub struct Jobs {
    store: Arc<dyn Store>,
    cluster: Arc<Cluster>,
    hub: Arc<RunHub>,
    /// Runbook and approval policy, swapped whole on reload: a job is planned and judged
    /// against one set, old or new.
    settings: std::sync::RwLock<Arc<Settings>>,
    /// Webhooks for job started, awaiting approval, halted and finished; never blocks.
    notifier: Arc<crate::notify::Notifier>,
    live: Mutex<HashMap<String, Arc<LiveJob>>>,
    /// A host that drops mid-run and is not back with a result by then is `unreachable`.
    unreachable_after: Duration,
    tasks: TaskTracker,
    /// The coordinator is stopping: jobs stop driving and stay `running` in the store, to be
    /// resumed by the next process.
    shutdown: CancellationToken,
    /// Jobs whose end this process could not store: left for the next start or a peer.
    /// Shared with store-following watches, which end when their job lands here.
    unsettled: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// What a reload may change in how jobs are planned and approved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runbook: Arc<Runbook>,
    /// Where the runbook came from (a path, or `built-in`).
    pub runbook_source: String,
    /// Which jobs need a second person's approval.
    pub approval: crate::config::ApprovalPolicy,
}

impl Jobs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        cluster: Arc<Cluster>,
        hub: Arc<RunHub>,
        settings: Settings,
        notifier: Arc<crate::notify::Notifier>,
        unreachable_after: Duration,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            cluster,
            hub,
            settings: std::sync::RwLock::new(Arc::new(settings)),
            notifier,
            live: Mutex::new(HashMap::new()),
            unreachable_after,
            tasks,
            shutdown,
            unsettled: Arc::new(Mutex::new(std::collections::HashSet::new())),
        }
    }

    fn live_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveJob>>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn live_job(&self, job_id: &str) -> Option<Arc<LiveJob>> {
        self.live_jobs().get(job_id).cloned()
    }

    /// The runbook and approval policy in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `settings` in force for every job planned from now on; running jobs keep the plan
    /// they were started with (it is stored with them).
    pub fn replace_settings(&self, settings: Settings) {
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(settings);
    }

    /// Where notifications go (replaced on reload).
    pub fn notifier(&self) -> &crate::notify::Notifier {
        &self.notifier
    }
}
