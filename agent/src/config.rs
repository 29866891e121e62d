//! `agent.toml`: who this host is, where the coordinator is, TLS files and the state dir.
//! Validated at start with errors that name the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollback_common::identity::validate_name;
use rollback_common::tls::TlsFiles;
use serde::Deserialize;

use crate::profile::{AlembicProfile, AppProfile, PostgresProfile, ServiceProfile, Timeouts};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's id; must equal the name in the agent certificate.
    pub host_id: String,
    /// Coordinator URL, e.g. `https://10.0.0.1:7443`.
    pub coordinator: String,
    /// TLS server name to verify the coordinator certificate against, when the URL's host is
    /// not one of the certificate's SANs.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Labels operators select hosts by, e.g. `role = "web"`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Directory for the agent's journal and snapshots; created 0700 if missing.
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    /// First reconnect delay in milliseconds (doubles per failure, with jitter).
    #[serde(default = "default_backoff_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest reconnect delay in milliseconds.
    #[serde(default = "default_backoff_max_ms")]
    pub reconnect_max_ms: u64,
    /// How often (seconds) the agent looks for a renewed certificate and key in the files of
    /// `[tls]`; a valid new pair is used from the next connection, without a restart.
    #[serde(default = "default_cert_check_secs")]
    pub cert_check_secs: u64,
    pub service: Option<ServiceProfile>,
    pub app: Option<AppProfile>,
    pub alembic: Option<AlembicProfile>,
    pub postgres: Option<PostgresProfile>,
    #[serde(default)]
    pub timeouts: Timeouts,
}

fn default_backoff_initial_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    10_000
}
fn default_cert_check_secs() -> u64 {
    rollback_common::expiry::DEFAULT_CERT_CHECK_SECS
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading agent config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{what} {path} {problem}; {fix}")]
    Exposed {
        what: &'static str,
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("agent config {path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// Refuses a secret file another user could read or replace: it must be a regular file owned
/// by the agent's user with no group or other permission bits.
pub fn check_private(
    meta: &std::fs::Metadata,
    path: &Path,
    what: &'static str,
) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let exposed = |problem: String, fix: String| ConfigError::Exposed {
        what,
        path: path.to_path_buf(),
        problem,
        fix,
    };
    if !meta.file_type().is_file() {
        return Err(exposed(
            "is not a regular file".into(),
            "point the agent at a regular file".into(),
        ));
    }
    if meta.uid() != me {
        return Err(exposed(
            format!(
                "is owned by uid {}, not by the agent's user (uid {me}), who could be replaced by its owner",
                meta.uid()
            ),
            format!("run `chown {me} {}`", path.display()),
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(exposed(
            format!("is readable or writable by group or others (mode {mode:04o})"),
            format!("run `chmod 600 {}`", path.display()),
        ));
    }
    Ok(())
}

/// `check_private` for a file by path (following symlinks, as the reader will).
pub fn check_private_path(path: &Path, what: &'static str) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    check_private(&meta, path, what)
}

fn valid_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        // Checked on the open file, then read from it: no swap in between.
        let mut file = std::fs::File::open(path).map_err(read)?;
        check_private(
            &file.metadata().map_err(read)?,
            path,
            "agent config (it holds database secrets)",
        )?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).map_err(read)?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.tls.resolve_relative_to(base);
        if config.state_dir.is_relative() {
            config.state_dir = base.join(&config.state_dir);
        }
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        validate_name("host id", &self.host_id).map_err(|e| invalid("host_id", e.to_string()))?;
        if !self.coordinator.starts_with("https://") {
            return Err(invalid(
                "coordinator",
                format!(
                    "`{}` must be an https:// URL (there is no plaintext mode)",
                    self.coordinator
                ),
            ));
        }
        let uri = self
            .coordinator
            .parse::<tonic::transport::Uri>()
            .map_err(|_| {
                invalid(
                    "coordinator",
                    format!("`{}` is not a valid URL", self.coordinator),
                )
            })?;
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        // The port as written (http::Uri keeps digits it cannot use as a u16).
        let port_ok = match authority.rsplit_once(':') {
            Some((_, p)) if !authority.ends_with(']') => p.parse::<u16>().is_ok_and(|p| p != 0),
            _ => true,
        };
        if uri.host().is_none_or(str::is_empty)
            || authority.contains('@')
            || !port_ok
            || authority.ends_with(':')
            || !matches!(uri.path(), "" | "/")
            || uri.query().is_some()
        {
            return Err(invalid(
                "coordinator",
                format!(
                    "`{}` must be https://HOST[:PORT] with a host, a port of 1-65535, and no credentials, path or query",
                    self.coordinator
                ),
            ));
        }
        for (k, v) in &self.labels {
            if !valid_label_part(k) || !valid_label_part(v) || k == "host" {
                return Err(invalid(
                    &format!("labels.{k}"),
                    "label keys and values are 1-128 of [A-Za-z0-9._/-]; `host` is reserved".into(),
                ));
            }
        }
        if self.reconnect_initial_ms == 0 || self.reconnect_max_ms < self.reconnect_initial_ms {
            return Err(invalid(
                "reconnect_max_ms",
                "need 0 < reconnect_initial_ms <= reconnect_max_ms".into(),
            ));
        }
        if !(1..=3600).contains(&self.cert_check_secs) {
            return Err(invalid(
                "cert_check_secs",
                format!("{} is not 1 to 3600 seconds", self.cert_check_secs),
            ));
        }
        // The host profile: every section present is checked before the agent starts.
        let profile = |r: Result<(), crate::profile::ProfileProblem>| {
            r.map_err(|p| invalid(&p.key, p.reason))
        };
        if let Some(s) = &self.service {
            profile(s.validate())?;
        }
        if let Some(a) = &self.app {
            profile(a.validate())?;
        }
        if let Some(a) = &self.alembic {
            profile(a.validate())?;
        }
        if let Some(p) = &self.postgres {
            profile(p.validate())?;
        }
        profile(self.timeouts.validate())?;
        Ok(())
    }

    pub fn backoff(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.reconnect_initial_ms),
            Duration::from_millis(self.reconnect_max_ms),
        )
    }
}
