//! rollback-agent: the only component that touches a host. It dials out to one of its
//! coordinators, holds one session, heartbeats, and moves to the next coordinator (with
//! exponential backoff and jitter per round of them) whenever its coordinator goes away.

pub mod actions;
mod backoff;
mod certwatch;
pub mod config;
pub mod contain;
pub mod coordinators;
pub mod exec;
mod failover;
pub mod journal;
pub mod profile;
mod runner;
mod session;
pub mod simulate;
mod state;
mod uplink;

use std::future::Future;
use std::sync::Arc;

use rollback_common::identity::Role;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
pub use runner::StepExecution;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] rollback_common::tls::TlsError),
    #[error(
        "{path}: certificate is for {found}, but host_id is `{host_id}`; issue one with `rollbackctl pki issue agent {host_id}`"
    )]
    CertificateMismatch {
        path: String,
        found: String,
        host_id: String,
    },
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Config(Box<config::ConfigError>),
    #[error("reading the agent's TLS files: {0}")]
    TlsFiles(String),
    #[error("creating state dir {path}: {source}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let first = spread(&config.host_id);
    run_with(config, shutdown, StepExecution::Real, first).await
}

/// Where a host starts in its coordinator list: a stable hash of its id (FNV-1a), so a fleet
/// configured with the same `coordinators = [A, B, C]` spreads over all three instead of
/// landing on A, and each host comes back to the same one after a restart.
pub fn spread(host_id: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    usize::try_from(h % 1_000_003).unwrap_or(0)
}

/// `run`, with the way steps are executed chosen by the caller (`Noop` for `--simulate`) and
/// the coordinator address the first connection attempt starts at (`first` modulo the number
/// of addresses; the simulator spreads its agents with it).
pub async fn run_with(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    execution: StepExecution,
    first: usize,
) -> Result<(), AgentError> {
    let urls = config.coordinator_urls().map_err(|(key, reason)| {
        AgentError::Config(Box::new(config::ConfigError::Invalid {
            path: "agent.toml".into(),
            key: key.to_string(),
            reason,
        }))
    })?;
    let rotation = coordinators::Rotation::new(urls, config.server_name.clone(), first);
    let own = config.tls.own_identity()?;
    if own.role != Role::Agent || own.name != config.host_id {
        return Err(AgentError::CertificateMismatch {
            path: config.tls.cert.display().to_string(),
            found: own.to_string(),
            host_id: config.host_id.clone(),
        });
    }
    config::check_private_path(&config.tls.key, "agent private key")
        .map_err(|e| AgentError::Config(Box::new(e)))?;
    create_state_dir(&config)?;
    let certs = certwatch::CertWatch::new(&config, own).map_err(AgentError::TlsFiles)?;
    let config = Arc::new(config);
    let uplink = Arc::new(uplink::Uplink::default());
    let journal = journal::Journal::open(&config.state_dir)?;
    let runner = Arc::new(runner::Runner::new(
        config.clone(),
        journal,
        uplink.clone(),
        execution,
    ));
    for (cgroup, killed) in contain::init(&config.state_dir) {
        warn!(host = %config.host_id, cgroup = %cgroup, killed, "a step of a crashed agent left processes: killed and removed");
    }
    runner.recover();

    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        shutdown.await;
        on_signal.cancel();
    });

    info!(
        host = %config.host_id,
        coordinators = %rotation
            .urls()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        "agent starting"
    );
    failover::dial_loop(&config, rotation, &certs, &cancel, &runner, &uplink).await;
    contain::shutdown();
    info!("agent stopped");
    Ok(())
}

fn create_state_dir(config: &Config) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    let path = &config.state_dir;
    let err = |source| AgentError::StateDir {
        path: path.display().to_string(),
        source,
    };
    if !path.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(err)?;
    }
    // The journal and snapshots (with env copies) are the agent's alone: a state dir another
    // user owns is refused, and its mode is forced to 0700.
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        return Err(err(std::io::Error::other(format!(
            "must be a directory owned by the agent's user (uid {me}), not a symlink or another user's; fix it with `chown {me} {0}` or choose another state_dir",
            path.display()
        ))));
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        warn!(path = %path.display(), was = format!("{:04o}", meta.mode() & 0o777), "state dir mode forced to 0700");
    }
    Ok(())
}

#[cfg(test)]
mod spread_tests {
    #[test]
    fn a_fleet_spreads_over_its_coordinators_and_each_host_keeps_its_place() {
        let mut per = [0usize; 3];
        for i in 1..=300 {
            per[super::spread(&format!("web-{i}")) % 3] += 1;
        }
        assert!(
            per.iter().all(|&n| n > 60),
            "300 hosts over 3 coordinators: {per:?}"
        );
        assert_eq!(super::spread("web-7"), super::spread("web-7"));
    }
}
