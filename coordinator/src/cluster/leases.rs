//! The cluster's clock: every fifth of the lease this coordinator heartbeats its row, renews
//! the lease of every job it drives (a job whose lease it lost — it was too slow, another took
//! it — stops here at once, without writing anything), marks the agents of dead peers
//! offline, and takes over the running jobs whose owner stopped renewing. A takeover is the
//! resume a restarted coordinator does: completed phases are not run again, runs in flight
//! are re-attached through the agents' journals. On a shared store it also sweeps for results
//! a peer stored without its message arriving (`Cluster::sweep_overdue`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rollback_common::now_unix_ms;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Cluster;
use crate::jobs::Jobs;
use crate::store::cluster::Claim;

/// One round. Returns false when this process's name now belongs to another process.
pub async fn tick(cluster: &Cluster, jobs: &Arc<Jobs>) -> bool {
    let store = &cluster.store;
    let now = now_unix_ms();
    let lease = cluster.lease_ms();
    let mut ours = true;
    match store.coordinator_heartbeat(&cluster.me, now).await {
        Ok(true) => {}
        Ok(false) => {
            error!(name = %cluster.me.name, "another coordinator process now runs under this name; give each coordinator its own `name` in coordinator.toml");
            ours = false;
        }
        Err(e) => warn!(error = %e, "store failed recording this coordinator's heartbeat"),
    }
    let driving = jobs.live_ids();
    if !driving.is_empty() {
        match store.renew_jobs(&cluster.me, &driving, now + lease).await {
            Ok(renewed) => {
                for job in &renewed {
                    jobs.lease_renewed(job, now + lease);
                }
                let renewed: HashSet<String> = renewed.into_iter().collect();
                for job in driving.iter().filter(|j| !renewed.contains(*j)) {
                    jobs.lease_lost(job);
                }
            }
            // Not renewed is not lost: the lease holds until it lapses, and the next round
            // tries again; a store that stays down lets the lease lapse, and then a peer
            // (which must reach the store to take over) decides.
            Err(e) => warn!(error = %e, "store failed renewing job leases"),
        }
    }
    if !cluster.shared() {
        return ours;
    }
    match store.release_agents_of_dead(now, lease).await {
        Ok(0) => {}
        Ok(n) => info!(
            agents = n,
            "agents of a coordinator that stopped heartbeating are offline until they reconnect"
        ),
        Err(e) => warn!(error = %e, "store failed releasing the agents of dead coordinators"),
    }
    let orphans = match store.orphaned_jobs(now, lease).await {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %e, "store failed listing jobs whose owner's lease lapsed");
            return ours;
        }
    };
    for orphan in orphans
        .into_iter()
        .filter(|o| !jobs.is_live_here(&o.job_id) && !jobs.is_unsettled(&o.job_id))
    {
        match store
            .claim_job(&orphan.job_id, &cluster.me, now_unix_ms(), lease)
            .await
        {
            Ok(Claim::Claimed { previous }) => {
                jobs.take_over(&orphan.job_id, &previous).await;
            }
            // Another peer was faster, or the owner came back: theirs.
            Ok(Claim::HeldBy { .. } | Claim::Missing) => {}
            Err(e) => {
                warn!(job = %orphan.job_id, error = %e, "store failed claiming an orphaned job")
            }
        }
    }
    ours
}

/// How often, on a shared store, the results of runs waited for since the previous sweep are
/// looked for in the store (`Cluster::sweep_overdue`), in case their message never came.
pub const OVERDUE_SWEEP: Duration = Duration::from_secs(10);

/// Runs `tick` every fifth of the lease until `stop`, and on a shared store sweeps for
/// overdue results every `OVERDUE_SWEEP`.
pub async fn run(cluster: Arc<Cluster>, jobs: Arc<Jobs>, stop: CancellationToken) {
    let every = (cluster.lease / 5).max(Duration::from_millis(200));
    let sweep_every = u32::try_from(OVERDUE_SWEEP.as_millis() / every.as_millis())
        .unwrap_or(u32::MAX)
        .max(1);
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stop.cancelled() => return,
        }
        tick(&cluster, &jobs).await;
        ticks = ticks.wrapping_add(1);
        if cluster.shared() && ticks.is_multiple_of(sweep_every) {
            cluster.sweep_overdue().await;
        }
    }
}
