//! rollback-agent: the only component that touches a host. It dials out to the coordinator,
//! holds one session, heartbeats, and reconnects with exponential backoff and jitter whenever
//! the coordinator goes away.

pub mod actions;
mod backoff;
mod certwatch;
pub mod config;
pub mod contain;
pub mod exec;
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
use tracing::{error, info, warn};

pub use config::Config;
pub use runner::StepExecution;

use crate::backoff::Backoff;
use crate::session::{SessionEnd, SessionError};

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
    run_with(config, shutdown, StepExecution::Real).await
}

/// `run`, with the way steps are executed chosen by the caller (`Noop` for `--simulate`).
pub async fn run_with(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    execution: StepExecution,
) -> Result<(), AgentError> {
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

    let (initial, max) = config.backoff();
    let mut backoff = Backoff::new(initial, max);
    info!(host = %config.host_id, coordinator = %config.coordinator, "agent starting");
    loop {
        // Each connection presents the pair on disk if it checks out (else the last good one).
        certs.look();
        let result = session::run_session(&config, &certs, &cancel, &runner, &uplink, || {
            backoff.reset()
        })
        .await;
        match result {
            Ok(SessionEnd::Shutdown) => break,
            // Straight back with the renewed certificate: nothing failed.
            Ok(SessionEnd::Renewed) => continue,
            Ok(SessionEnd::ClosedByCoordinator) => {
                info!("coordinator closed the session; reconnecting")
            }
            Err(
                e @ SessionError::Refused {
                    code: tonic::Code::PermissionDenied | tonic::Code::Unauthenticated,
                    ..
                },
            ) => {
                error!(error = %e, "coordinator refused this agent; check its certificate and host_id")
            }
            Err(e) => warn!(error = %e, "session failed"),
        }
        let delay = backoff.next_delay();
        info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after backoff"
        );
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
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
