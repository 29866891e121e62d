//! Jobs and the cluster: claiming a job's lease, the jobs this process drives (renewed by
//! `cluster::leases`), a lease lost to a peer (stop at once, decide nothing), a job taken over
//! from a coordinator that stopped renewing, and a cancel carried out for a peer.

use std::sync::Arc;

use rollback_common::jobs::{EventKind, JobState};
use rollback_common::now_unix_ms;
use tonic::Status;
use tracing::{error, warn};

use std::sync::atomic::Ordering;

use super::{Jobs, LiveJob};
use crate::store::cluster::Claim;

impl Jobs {
    /// Takes the job's lease for this process; refused while a live peer holds it.
    pub(super) async fn claim(&self, job_id: &str) -> Result<(), Status> {
        match self
            .store
            .claim_job(
                job_id,
                &self.cluster.me,
                now_unix_ms(),
                self.cluster.lease_ms(),
            )
            .await?
        {
            Claim::Claimed { .. } => Ok(()),
            Claim::HeldBy { owner, .. } => Err(Status::failed_precondition(format!(
                "job {job_id} is driven by coordinator {owner}; act on it there, or wait until its lease lapses if that coordinator is down (`rollbackctl coordinators`)"
            ))),
            Claim::Missing => Err(Status::not_found(format!("no job {job_id}"))),
        }
    }

    /// The jobs this process drives (their leases are renewed).
    pub fn live_ids(&self) -> Vec<String> {
        self.live_jobs()
            .iter()
            .filter(|(_, l)| {
                *l.state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    == JobState::Running.as_str()
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Renewed until `until_ms`.
    pub fn lease_renewed(&self, job_id: &str, until_ms: i64) {
        if let Some(live) = self.live_job(job_id) {
            live.lease_until_ms.store(until_ms, Ordering::Relaxed);
        }
    }

    /// Whether this process may still act for the job: its lease holds for at least another
    /// fifth of the lease (a peer takes over only once the lease has lapsed, so with clocks
    /// within that margin the two never act at once). A lease about to lapse stops the job
    /// here, as a lost one does.
    pub(super) fn lease_holds(&self, job_id: &str, live: &LiveJob) -> bool {
        if !self.cluster.shared() {
            // Nobody else could take it: the one coordinator of a SQLite store goes on.
            return true;
        }
        let margin = self.cluster.lease_ms() / 5;
        if now_unix_ms() + margin < live.lease_until_ms.load(Ordering::Relaxed) {
            return true;
        }
        error!(job = %job_id, "the job's lease was not renewed in time (is the store reachable?); stopping it here so that no two coordinators drive it");
        live.stop.cancel();
        false
    }

    pub(super) fn unsettled_jobs(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.unsettled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This process failed to store the job's end: it does not take the job up again itself.
    pub fn is_unsettled(&self, job_id: &str) -> bool {
        self.unsettled_jobs().contains(job_id)
    }

    /// This process has the job in hand (driving it, or stopping it).
    pub fn is_live_here(&self, job_id: &str) -> bool {
        self.live_job(job_id).is_some()
    }

    /// This process drives `job_id` now.
    pub(super) fn driving_here(&self, job_id: &str) -> bool {
        self.live_job(job_id).is_some_and(|l| {
            *l.state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                == JobState::Running.as_str()
        })
    }

    /// Our lease on `job_id` went to another coordinator: stop driving it here, at once and
    /// without writing its end (the new owner resumes it from the store).
    pub fn lease_lost(&self, job_id: &str) {
        if let Some(live) = self.live_job(job_id) {
            error!(job = %job_id, "lost the job's lease to another coordinator (this one was too slow to renew it); it stops here and its new owner drives it");
            live.lease_lost.cancel();
            live.stop.cancel();
        }
    }

    /// The owner `previous` stopped renewing the job's lease and this process claimed it:
    /// resumed exactly as after a restart, saying so in its events, its audit record and
    /// the report.
    pub async fn take_over(self: &Arc<Self>, job_id: &str, previous: &str) {
        let me = self.cluster.me.name.clone();
        let from = if previous.is_empty() {
            "no coordinator (it was never claimed)".to_string()
        } else {
            format!("coordinator {previous}")
        };
        warn!(job = %job_id, from = %previous, "taking over a job whose owner stopped renewing its lease");
        if let Err(e) = self
            .resume_stored(
                job_id,
                &format!("takeover from {from} by coordinator {me}"),
                &format!("coordinator {me} took the job over from {from}, whose lease lapsed"),
            )
            .await
        {
            warn!(job = %job_id, error = %e.message(), "could not take the job over; another coordinator will try");
            if let Err(e) = self.store.release_job(job_id, &self.cluster.me).await {
                warn!(job = %job_id, error = %e, "store failed releasing the job's lease");
            }
        }
    }

    /// A peer passed on an operator's cancel of a job this process drives.
    pub fn cancel_here(&self, job_id: &str, by: &str, reason: &str) {
        if !self.driving_here(job_id) {
            return;
        }
        if let Some(live) = self.live_job(job_id) {
            self.emit(
                &live,
                job_id,
                EventKind::JobCancelling,
                "",
                "",
                &format!("cancelled by {by}: {reason}"),
                0,
                0,
            );
            live.cancel.cancel();
        }
    }
}
