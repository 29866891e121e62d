//! `rollback-agent --simulate K`: K agents in one process, for the scale benchmark
//! (`cargo xtask bench`). Every simulated host is a whole agent started with `crate::run_with`:
//! its own certificate and mTLS connection, Hello, heartbeats, reconnect with backoff, run
//! validation, journal, step events and the result with its acknowledgement. The only
//! difference is `StepExecution::Noop`: a validated step's action is not executed but succeeds
//! at once (`noop_result`).
//!
//! Host `i` (1-based) is `<host_id>-<i:05>` of the template config; its certificate is
//! `<pki>/agent/<id>.pem` in a `rollbackctl pki` directory (issued here if missing, so the CA
//! key must be in that directory: use a throwaway benchmark CA), and its state dir is
//! `<state_dir>/<id>`. With several coordinators in the template (`coordinators = [...]`),
//! host `i`'s first connection attempt goes to address `(i - 1) mod n`, so the simulated fleet
//! starts spread evenly over them; each host then fails over like any agent.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use rollback_common::identity::Role;
use rollback_common::output_cap::OutputCap;
use rollback_common::pki::{PkiDir, PkiError};
use rollback_common::proto::StepStatus;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::actions::StepResult;
use crate::config::Config;
use crate::{AgentError, StepExecution};

/// Days the simulator's agent certificates are valid.
const CERT_DAYS: u32 = 30;

/// What `--simulate` runs.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// Number of simulated hosts.
    pub count: usize,
    /// A `rollbackctl pki` directory (with its CA key) holding or receiving the agents' certs.
    pub pki: PathBuf,
    /// The agent config every host is derived from; its `host_id` is the prefix of theirs and
    /// its `[tls] cert`/`key` are replaced by each host's own.
    pub template: Config,
    /// Pause between starting two hosts (zero: all at once).
    pub start_interval: Duration,
    /// How long each simulated step takes (zero: it succeeds at once).
    pub step_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("issuing simulated agents' certificates in {dir}: {source}")]
    Pki {
        dir: String,
        #[source]
        source: PkiError,
    },
    #[error("certificate issuing thread panicked")]
    IssuerPanicked,
    #[error("{failed} of {count} simulated agents' tasks panicked")]
    Panicked { failed: usize, count: usize },
    #[error("{failed} of {count} simulated agents failed; first: {host}: {source}")]
    Agents {
        failed: usize,
        count: usize,
        host: String,
        #[source]
        source: AgentError,
    },
}

/// The host id of simulated host `i` (1-based).
pub fn host_id(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:05}")
}

/// What a no-op step reports: succeeded, exit 0, no output.
pub async fn noop_result(step_ms: u64, cancel: &tokio_util::sync::CancellationToken) -> StepResult {
    if step_ms > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(step_ms)) => {}
            () = cancel.cancelled() => return StepResult {
                status: StepStatus::Cancelled,
                exit_code: -1,
                error: "cancelled".into(),
                output: OutputCap::new(0),
                facts: BTreeMap::new(),
            },
        }
    }
    StepResult {
        status: StepStatus::Succeeded,
        exit_code: 0,
        error: String::new(),
        output: OutputCap::new(0),
        facts: BTreeMap::new(),
    }
}

/// Issues the certificates of hosts `1..=count` that are missing (in parallel, one rcgen key
/// pair each); returns how many were issued.
pub fn ensure_certificates(
    pki: &PkiDir,
    prefix: &str,
    count: usize,
) -> Result<usize, SimulateError> {
    let missing: Vec<String> = (1..=count)
        .map(|i| host_id(prefix, i))
        .filter(|h| !(pki.cert(Role::Agent, h).exists() && pki.key(Role::Agent, h).exists()))
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let per_thread = missing.len().div_ceil(threads);
    let results: Vec<Result<(), SimulateError>> = std::thread::scope(|s| {
        let handles: Vec<_> = missing
            .chunks(per_thread)
            .map(|chunk| {
                s.spawn(move || {
                    for h in chunk {
                        pki.issue(Role::Agent, h, &[], CERT_DAYS, true)
                            .map_err(|source| SimulateError::Pki {
                                dir: pki.dir.display().to_string(),
                                source,
                            })?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(SimulateError::IssuerPanicked)))
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(missing.len())
}

/// Runs `sim.count` agents until `shutdown` completes. Fails if any agent fails to start.
pub async fn run(
    sim: Simulation,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SimulateError> {
    let pki = PkiDir::new(&sim.pki);
    let prefix = sim.template.host_id.clone();
    let started = std::time::Instant::now();
    let issued = {
        let (pki, prefix, count) = (pki.clone(), prefix.clone(), sim.count);
        tokio::task::spawn_blocking(move || ensure_certificates(&pki, &prefix, count))
            .await
            .map_err(|_| SimulateError::IssuerPanicked)??
    };
    info!(
        issued,
        count = sim.count,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "simulated agents' certificates ready"
    );

    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        shutdown.await;
        on_signal.cancel();
    });

    let mut agents = tokio::task::JoinSet::new();
    for i in 1..=sim.count {
        if cancel.is_cancelled() {
            break;
        }
        let mut config = sim.template.clone();
        config.host_id = host_id(&prefix, i);
        config.tls.cert = pki.cert(Role::Agent, &config.host_id);
        config.tls.key = pki.key(Role::Agent, &config.host_id);
        config.state_dir = sim.template.state_dir.join(&config.host_id);
        let stop = cancel.clone();
        agents.spawn(async move {
            let host = config.host_id.clone();
            crate::run_with(
                config,
                async move { stop.cancelled().await },
                StepExecution::Noop {
                    step_ms: sim.step_ms,
                },
                i - 1,
            )
            .await
            .map_err(|e| (host, e))
        });
        if !sim.start_interval.is_zero() {
            tokio::time::sleep(sim.start_interval).await;
        }
    }
    info!(count = sim.count, "simulated agents started");

    let mut failed = 0usize;
    let mut first = None;
    while let Some(joined) = agents.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err((host, e))) => {
                warn!(host = %host, error = %e, "simulated agent failed");
                failed += 1;
                first.get_or_insert((host, e));
            }
            Err(e) => {
                warn!(error = %e, "simulated agent task panicked");
                failed += 1;
            }
        }
    }
    match first {
        Some((host, source)) => Err(SimulateError::Agents {
            failed,
            count: sim.count,
            host,
            source,
        }),
        None if failed > 0 => Err(SimulateError::Panicked {
            failed,
            count: sim.count,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_are_valid_names_and_sort_in_order() {
        let a = host_id("sim", 2);
        let b = host_id("sim", 10);
        assert_eq!(a, "sim-00002");
        assert!(a < b);
        assert!(rollback_common::identity::validate_name("host id", &b).is_ok());
    }

    #[test]
    fn certificates_are_issued_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path());
        pki.init("sim.test", 1).expect("init");
        assert_eq!(ensure_certificates(&pki, "sim", 5).expect("issue"), 5);
        assert_eq!(ensure_certificates(&pki, "sim", 6).expect("issue"), 1);
        assert!(pki.cert(Role::Agent, "sim-00006").exists());
    }
}
