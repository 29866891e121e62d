//! The TLS configuration in force and the CRL behind it. At start the configured CRL must load
//! (signed by the fleet CA); afterwards it is reloaded when the file changes (checked every
//! `crl_poll_secs`) and on SIGHUP. A reload that fails (unreadable, not a CRL, bad signature)
//! keeps the previous CRL and logs an error; a CRL past its next update is kept in force and
//! refuses every client (fail closed), said once in an error line naming the file. After each
//! reload every live connection whose certificate the CRL revokes is closed.
//!
//! Invariant: a revoked certificate has no live connection once the CRL is reloaded — the new
//! configuration is swapped in before the live connections are scanned, and a connection
//! registers before it checks the revoked set, so none slips between the two.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rollback_common::crl::{CrlFileError, load_crl};
use rollback_common::identity::{Crl, Serial};
use rollback_common::tls::{TlsError, TlsFiles};
use rustls::ServerConfig;
use rustls_pki_types::CertificateRevocationListDer;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::live_conns::{LiveConns, RevokedSet};

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "the CRL named by `crl` in coordinator.toml does not load; fix the file (`rollbackctl pki crl` writes a fresh one) or remove `crl`"
    )]
    Crl(#[source] CrlFileError),
}

impl RevocationError {
    /// What went wrong, without the advice (for the reload's log line).
    fn detail(&self) -> String {
        match self {
            Self::Tls(e) => e.to_string(),
            Self::Crl(e) => e.to_string(),
        }
    }
}

/// The server configuration in force and the CRL it was built from.
struct Current {
    config: Arc<ServerConfig>,
    revoked: RevokedSet,
    next_update: Option<OffsetDateTime>,
    /// The file's bytes as last loaded.
    loaded: Option<Vec<u8>>,
}

/// The coordinator's TLS state, shared by the acceptor and the CRL watcher.
pub struct TlsState {
    files: TlsFiles,
    crl_path: Option<PathBuf>,
    ca_der: Vec<u8>,
    current: RwLock<Current>,
}

fn when(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "never".into())
}

fn expired(next_update: Option<OffsetDateTime>) -> bool {
    next_update.is_some_and(|t| t <= OffsetDateTime::now_utc())
}

/// A CRL read and checked, ready to swap in.
struct Loaded {
    bytes: Vec<u8>,
    config: Arc<ServerConfig>,
    crl: Crl,
}

impl TlsState {
    /// Builds the configuration from the TLS files and, if configured, the CRL (which must load).
    pub fn load(files: &TlsFiles, crl_path: Option<&Path>) -> Result<Self, RevocationError> {
        let ca_der = files.ca_der()?;
        let state = Self {
            files: files.clone(),
            crl_path: crl_path.map(Path::to_path_buf),
            ca_der,
            current: RwLock::new(Current {
                config: Arc::new(files.rustls_server_config(Vec::new())?),
                revoked: RevokedSet::default(),
                next_update: None,
                loaded: None,
            }),
        };
        match crl_path {
            Some(path) => {
                let loaded = state.read_crl(path)?;
                state.install(path, loaded, "start");
            }
            None => info!(
                "no `crl` in coordinator.toml: client certificates are not checked for revocation (`rollbackctl pki crl` makes one)"
            ),
        }
        Ok(state)
    }

    /// The configuration a new handshake uses.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.read().config.clone()
    }

    /// Whether the CRL in force revokes this certificate.
    pub fn is_revoked(&self, issuer: &[u8], serial: &Serial) -> bool {
        self.read().revoked.contains(issuer, serial)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    fn read_crl(&self, path: &Path) -> Result<Loaded, RevocationError> {
        let bytes = std::fs::read(path).map_err(|source| {
            RevocationError::Crl(CrlFileError::Read {
                path: path.to_path_buf(),
                source,
            })
        })?;
        let (der, crl) = load_crl(path, &self.ca_der).map_err(RevocationError::Crl)?;
        let config = self
            .files
            .rustls_server_config(vec![CertificateRevocationListDer::from(der)])?;
        Ok(Loaded {
            bytes,
            config: Arc::new(config),
            crl,
        })
    }

    fn install(&self, path: &Path, loaded: Loaded, trigger: &str) {
        let Loaded { bytes, config, crl } = loaded;
        let revoked = RevokedSet::new(crl.issuer, crl.revoked.into_iter().map(|e| e.serial));
        info!(
            file = %path.display(),
            trigger,
            revoked = revoked.len(),
            crl_number = crl.number,
            next_update = %when(crl.next_update),
            "loaded CRL"
        );
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = Current {
            config,
            revoked,
            next_update: crl.next_update,
            loaded: Some(bytes),
        };
    }

    /// Re-reads the CRL (only if its bytes changed, unless `force`), swaps it in, and closes
    /// the live connections it revokes. A CRL that does not load is logged and ignored.
    fn reload(
        &self,
        live: &LiveConns,
        trigger: &str,
        force: bool,
        last_error: &mut Option<String>,
    ) {
        let Some(path) = self.crl_path.as_deref() else {
            if force {
                info!(trigger, "no `crl` in coordinator.toml; nothing to reload");
            }
            return;
        };
        if !force
            && let Ok(bytes) = std::fs::read(path)
            && self.read().loaded.as_deref() == Some(bytes.as_slice())
        {
            *last_error = None;
            return;
        }
        let loaded = match self.read_crl(path) {
            Ok(loaded) => loaded,
            Err(e) => {
                let message = e.detail();
                // Said once per distinct failure, not every poll.
                if force || last_error.as_deref() != Some(message.as_str()) {
                    let current = self.read();
                    error!(
                        file = %path.display(),
                        trigger,
                        error = %message,
                        kept_revoked = current.revoked.len(),
                        kept_next_update = %when(current.next_update),
                        "CRL reload failed; keeping the previous CRL"
                    );
                }
                *last_error = Some(message);
                return;
            }
        };
        *last_error = None;
        self.install(path, loaded, trigger);
        let revoked = self.read().revoked.clone();
        for owner in live.close_revoked(&revoked) {
            warn!(
                identity = %owner.identity,
                peer = %owner.peer,
                serial = %owner.serial,
                "closed connection: client certificate revoked"
            );
        }
    }
}

fn log_expired(path: &Path, next_update: Option<OffsetDateTime>) {
    error!(
        file = %path.display(),
        next_update = %when(next_update),
        "CRL {} is past its next update ({}): every client certificate is refused until a fresh CRL is deployed (`rollbackctl pki crl`, then copy crl.pem here)",
        path.display(),
        when(next_update)
    );
}

/// Reloads the CRL on SIGHUP and, if `poll` is set, when the file changes; says once when the
/// CRL in force passes its next update. Runs until `cancel`.
pub async fn watch(
    state: Arc<TlsState>,
    live: Arc<LiveConns>,
    poll: Option<Duration>,
    hangup: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(poll.unwrap_or(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = None;
    // The next update whose passing was last said, so it is said once per CRL.
    let mut expiry_said: Option<OffsetDateTime> = None;
    loop {
        let next_update = state.read().next_update;
        if let (true, Some(path)) = (expired(next_update), &state.crl_path)
            && expiry_said != next_update
        {
            log_expired(path, next_update);
            expiry_said = next_update;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = hangup.notified() => {
                info!("received SIGHUP: reloading the CRL");
                state.reload(&live, "sighup", true, &mut last_error);
            }
            _ = tick.tick() => {
                if poll.is_some() {
                    state.reload(&live, "file changed", false, &mut last_error);
                }
            }
        }
    }
}
