//! The one dispatch path: every run (a job's phase on a host, an operator's `exec`, a
//! preflight check) is recorded in the store, registered with the `RunHub` (so its events reach
//! the caller and a reconnecting agent gets it again), then sent on the host's session.
//! A send that fails leaves nothing registered.

use std::time::Duration;

use prost::Message;
use rollback_common::proto::{RunProcedure, Step};

use crate::cluster::Cluster;
use crate::runs::{RunHub, WatchSender};
use crate::store::{RunRow, Store, StoreError};

/// Step timeout assumed for the run deadline when a step names none (the agent's own default
/// is lower, so the deadline never cuts a step the agent would still allow).
pub const DEFAULT_STEP_SECS: u64 = 600;
/// Added to every run deadline: delivery, validation and journal writes.
const DEADLINE_SLACK_SECS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("agent {host} is not connected")]
    Offline { host: String },
    #[error("agent {host} disconnected before the run could be sent")]
    Disconnected { host: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The deadline the agent enforces for a run of `steps` dispatched at `now_ms`: the steps'
/// timeouts plus `start_window` (how late it may still start) plus slack. A run that reaches
/// the agent after it is never started.
pub fn deadline_ms(now_ms: i64, steps: &[Step], start_window: Duration) -> i64 {
    let secs: u64 = steps
        .iter()
        .map(|s| {
            if s.timeout_secs > 0 {
                u64::from(s.timeout_secs)
            } else {
                DEFAULT_STEP_SECS
            }
        })
        .sum::<u64>()
        + start_window.as_secs()
        + DEADLINE_SLACK_SECS;
    now_ms.saturating_add(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
}

/// What a caller wants dispatched.
pub struct Dispatch<'a> {
    pub host: &'a str,
    pub job_id: &'a str,
    pub procedure: RunProcedure,
    /// The row to record first; `None` when the run is already stored (a re-attached run).
    pub record: Option<RunRow>,
    /// Where the run's events and result go.
    pub watcher: WatchSender,
    /// The caller found the host's session a moment ago (a job's wait for it): it is not
    /// looked up again before the run is stored. Where it is sent is still looked up after
    /// the run is stored (on a shared store each lookup of a peer's host is a query).
    pub seen_online: bool,
}

/// Records, registers and sends a run — to the host's session here, or through the
/// coordinator holding it. On error nothing stays registered for it.
pub async fn dispatch(
    store: &dyn Store,
    cluster: &Cluster,
    hub: &RunHub,
    d: Dispatch<'_>,
) -> Result<(), DispatchError> {
    let run_id = d.procedure.run_id.clone();
    let started = std::time::Instant::now();
    if !d.seen_online && !cluster.online(d.host).await {
        return Err(DispatchError::Offline {
            host: d.host.to_string(),
        });
    }
    // Stored before it is sent: the holder of a host elsewhere reads it from the store.
    if let Some(row) = &d.record {
        store.create_run(row, &cluster.me.instance).await?;
    }
    hub.watch(&run_id, d.host, d.watcher);
    hub.dispatched(&run_id, d.job_id);
    if let Err(e) = cluster.send_run(d.host, &d.procedure).await {
        hub.close(d.host, &run_id);
        hub.resolved(&run_id);
        return Err(e);
    }
    crate::metrics::dispatch(started.elapsed());
    Ok(())
}

/// A stored run's procedure, decoded.
pub fn stored_procedure(row: &RunRow) -> Result<RunProcedure, StoreError> {
    RunProcedure::decode(row.procedure.as_slice()).map_err(|e| StoreError::Corrupt {
        key: format!("run {}", row.run_id),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_covers_every_step_and_the_start_window() {
        let steps = vec![
            Step {
                action: "service.stop".into(),
                timeout_secs: 10,
                ..Default::default()
            },
            Step {
                action: "alembic.downgrade".into(),
                timeout_secs: 0,
                ..Default::default()
            },
        ];
        let d = deadline_ms(1_000, &steps, Duration::from_secs(60));
        assert_eq!(
            d,
            1_000 + (10 + DEFAULT_STEP_SECS + 60 + DEADLINE_SLACK_SECS) as i64 * 1000
        );
    }
}
