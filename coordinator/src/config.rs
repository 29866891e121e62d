//! `coordinator.toml`: listen address, TLS files and the CRL, connection limits, the store
//! (a SQLite file, or a PostgreSQL URL with its password from a file or the environment) and
//! operator roles.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollback_common::tls::TlsFiles;
use serde::Deserialize;

use crate::authz::OperatorRole;
use crate::store::{Password, PgTarget};

/// The environment variable that may hold the PostgreSQL password.
pub const PASSWORD_ENV: &str = "ROLLBACK_DATABASE_PASSWORD";

/// Where the coordinator keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file (relative paths are taken relative to coordinator.toml's directory).
    Sqlite(PathBuf),
    /// A PostgreSQL database; the password, if any, from `database_password_file` or
    /// `ROLLBACK_DATABASE_PASSWORD` (never from the URL).
    Postgres {
        target: PgTarget,
        password: Option<Password>,
    },
}

impl Default for Database {
    fn default() -> Self {
        Self::Sqlite(PathBuf::new())
    }
}

impl std::fmt::Display for Database {
    /// The path, or `postgres://USER@HOST:PORT/DB`: never a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres { target, .. } => write!(f, "{target}"),
        }
    }
}

/// The coordinator's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on for agents and operators (one port, told apart by certificate).
    pub listen: SocketAddr,
    /// `database` as written: a SQLite file (created with its schema on first start) or
    /// `postgres://USER@HOST:PORT/DB`. Read through `database` once loaded.
    #[serde(rename = "database")]
    database_setting: String,
    /// The store, from `database` and `database_password_file` (set by `load`).
    #[serde(skip)]
    pub database: Database,
    /// A file holding the PostgreSQL password (a regular file, no access for others, owned by
    /// the coordinator's user or root); otherwise ROLLBACK_DATABASE_PASSWORD, if set.
    #[serde(default)]
    pub database_password_file: Option<PathBuf>,
    pub tls: TlsFiles,
    /// Operator name (from the certificate) → role: viewer, operator, approver or admin.
    #[serde(default)]
    pub operators: BTreeMap<String, OperatorRole>,
    /// Seconds between agent heartbeats (told to agents in Ack).
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_interval_secs: u32,
    /// A disconnected agent is reported `lost` after this many seconds.
    #[serde(default = "default_lost_after_secs")]
    pub lost_after_secs: u64,
    /// A custom runbook (TOML) instead of the built-in seed runbook.
    #[serde(default)]
    pub runbook: Option<PathBuf>,
    /// A host that drops during a run and has not reported its result by then is `unreachable`.
    #[serde(default = "default_unreachable_secs")]
    pub unreachable_after_secs: u64,
    /// The labels that target hosts: host id → label → value. Agents' own labels (Hello) are
    /// shown beside these as reported facts and never target; `rollbackctl agents label`
    /// adds or overrides labels in the store.
    #[serde(default)]
    pub inventory: BTreeMap<String, BTreeMap<String, String>>,
    /// Which rollbacks need a second person's approval before anything runs.
    #[serde(default)]
    pub approval: ApprovalPolicy,
    /// Longest wait for in-flight work when shutting down.
    #[serde(default = "default_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// The fleet CRL (`crl.pem` from `rollbackctl pki revoke` / `pki crl`). Reloaded when the
    /// file changes and on SIGHUP; live connections of a certificate it revokes are closed.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Seconds between checks of the CRL file for a change; 0 reloads it only on SIGHUP.
    #[serde(default = "default_crl_poll_secs")]
    pub crl_poll_secs: u64,
    /// A client that has not finished its TLS handshake after this many seconds is dropped.
    #[serde(default = "default_handshake_timeout_secs")]
    pub tls_handshake_timeout_secs: u64,
    /// TLS handshakes in progress at once; a connection beyond it is closed at once.
    #[serde(default = "default_handshakes_in_flight")]
    pub max_handshakes_in_flight: usize,
    /// Live connections one certificate identity may hold; more are closed after the handshake.
    #[serde(default = "default_connections_per_identity")]
    pub max_connections_per_identity: usize,
    /// Job watches (`rollbackctl watch`, and following a rollback) one operator may hold at
    /// once; more are refused with ResourceExhausted until one ends.
    #[serde(default = "default_watchers_per_operator")]
    pub max_watchers_per_operator: usize,
    /// HTTP/2 streams (concurrent calls) one connection may open.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// This coordinator's name among the coordinators sharing the store (shown in `rollbackctl
    /// coordinators` and `agents`, and as a job's owner). Unique per process: a second
    /// process starting under a live name is refused. Default: the certificate's name and the
    /// listen port (`coordinator-7443`).
    #[serde(default)]
    pub name: Option<String>,
    /// The address peers and operators are told to reach this coordinator at (default: the
    /// listen address).
    #[serde(default)]
    pub advertise: Option<String>,
    /// A job's owner renews its lease every fifth of this; a coordinator silent for this long
    /// is dead: another takes its jobs over and its agents count as offline.
    #[serde(default = "default_job_lease_secs")]
    pub job_lease_secs: u64,
    /// Log lines as text (default) or one JSON object per line (`"json"`).
    #[serde(default)]
    pub log_format: rollback_common::daemon::LogFormat,
    /// Where Prometheus scrapes `GET /metrics` (plain HTTP; keep it on loopback). Unset: no
    /// metrics listener.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// `[[webhooks]]`: who hears when a job starts, awaits approval, halts and finishes.
    #[serde(default)]
    pub webhooks: Vec<crate::notify::WebhookConfig>,
    /// The file this was loaded from (set by `load`; SIGHUP reads it again).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[approval]`: two-person approval. A rollback that matches is stored `awaiting_approval`
/// (its hosts leased, its targets pinned) and nothing runs until an approver other than the
/// requester runs `rollbackctl approve JOB --reason`; `deny` ends it, and it expires.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApprovalPolicy {
    /// Procedures that always need approval.
    #[serde(default = "default_approval_procedures")]
    pub procedures: Vec<String>,
    /// Any job whose plan runs one of these actions needs approval (covers `--to-snapshot`
    /// and custom runbooks that change the database).
    #[serde(default = "default_approval_actions")]
    pub actions: Vec<String>,
    /// Any job on more than this many hosts needs approval; 0 turns the host rule off.
    #[serde(default = "default_approval_max_hosts")]
    pub max_hosts: u32,
    /// An approval not given within this many seconds expires; the job never runs.
    #[serde(default = "default_approval_expire_secs")]
    pub expire_after_secs: u64,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self {
            procedures: default_approval_procedures(),
            actions: default_approval_actions(),
            max_hosts: default_approval_max_hosts(),
            expire_after_secs: default_approval_expire_secs(),
        }
    }
}

fn default_approval_procedures() -> Vec<String> {
    vec!["database".into(), "database-restore".into()]
}
fn default_approval_actions() -> Vec<String> {
    vec!["alembic.downgrade".into(), "postgres.restore".into()]
}
fn default_approval_max_hosts() -> u32 {
    50
}
fn default_approval_expire_secs() -> u64 {
    3600
}

fn default_heartbeat_secs() -> u32 {
    10
}
fn default_lost_after_secs() -> u64 {
    300
}
fn default_unreachable_secs() -> u64 {
    60
}
fn default_job_lease_secs() -> u64 {
    5
}
fn default_grace_secs() -> u64 {
    10
}
fn default_watchers_per_operator() -> usize {
    32
}
fn default_crl_poll_secs() -> u64 {
    1
}
fn default_handshake_timeout_secs() -> u64 {
    10
}
fn default_handshakes_in_flight() -> usize {
    1024
}
fn default_connections_per_identity() -> usize {
    64
}
fn default_max_concurrent_streams() -> u32 {
    64
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading coordinator config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("coordinator config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("coordinator config {path}: `heartbeat_interval_secs` must be between 1 and 300")]
    Heartbeat { path: PathBuf },
    #[error("coordinator config {path}: [approval]: {reason}")]
    Approval { path: PathBuf, reason: String },
    #[error("coordinator config {path}: [inventory.{host}]: {reason}")]
    Inventory {
        path: PathBuf,
        host: String,
        reason: String,
    },
    #[error("coordinator config {path}: `database`: {source}")]
    DatabaseUrl {
        path: PathBuf,
        #[source]
        source: crate::store::PgUrlError,
    },
    #[error("coordinator config {path}: `database_password_file` {file}: {reason}")]
    PasswordFile {
        path: PathBuf,
        file: PathBuf,
        reason: String,
    },
    #[error(
        "coordinator config {path}: `database_password_file` is set but `database` is a SQLite file, which has no password; remove it or give a postgres:// URL"
    )]
    PasswordWithoutPostgres { path: PathBuf },
    #[error("coordinator config {path}: {source}")]
    Webhook {
        path: PathBuf,
        #[source]
        source: crate::notify::WebhookError,
    },
    #[error("coordinator config {path}: `{key}` must be {bound}")]
    Limit {
        path: PathBuf,
        key: &'static str,
        bound: &'static str,
    },
}

impl Config {
    /// Reads and validates the file; relative paths are taken relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if !(1..=300).contains(&config.heartbeat_interval_secs) {
            return Err(ConfigError::Heartbeat {
                path: path.to_path_buf(),
            });
        }
        if !(1..=7 * 24 * 3600).contains(&config.approval.expire_after_secs) {
            return Err(ConfigError::Approval {
                path: path.to_path_buf(),
                reason: "`expire_after_secs` must be between 1 and 604800 (a week)".into(),
            });
        }
        if let Some(a) = config
            .approval
            .actions
            .iter()
            .find(|a| !rollback_common::runbook::ACTIONS.contains(&a.as_str()))
        {
            return Err(ConfigError::Approval {
                path: path.to_path_buf(),
                reason: format!("`actions`: `{a}` is not an action agents know"),
            });
        }
        for (host, labels) in &config.inventory {
            let bad = |reason: String| ConfigError::Inventory {
                path: path.to_path_buf(),
                host: host.clone(),
                reason,
            };
            rollback_common::identity::validate_name("host id", host)
                .map_err(|e| bad(e.to_string()))?;
            for (k, v) in labels {
                rollback_common::selector::validate_label(k, v).map_err(|e| bad(e.to_string()))?;
            }
        }
        let limit = |key, bound| ConfigError::Limit {
            path: path.to_path_buf(),
            key,
            bound,
        };
        if !(1..=300).contains(&config.tls_handshake_timeout_secs) {
            return Err(limit("tls_handshake_timeout_secs", "between 1 and 300"));
        }
        if config.crl_poll_secs > 3600 {
            return Err(limit(
                "crl_poll_secs",
                "at most 3600 (0 reloads on SIGHUP only)",
            ));
        }
        if config.max_handshakes_in_flight == 0 {
            return Err(limit("max_handshakes_in_flight", "at least 1"));
        }
        if config.max_connections_per_identity == 0 {
            return Err(limit("max_connections_per_identity", "at least 1"));
        }
        if config.max_watchers_per_operator == 0 {
            return Err(limit("max_watchers_per_operator", "at least 1"));
        }
        if config.max_concurrent_streams == 0 {
            return Err(limit("max_concurrent_streams", "at least 1"));
        }
        if !(2..=300).contains(&config.job_lease_secs) {
            return Err(limit("job_lease_secs", "between 2 and 300"));
        }
        if let Some(name) = &config.name
            && (name.is_empty()
                || name.len() > 63
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        {
            return Err(limit(
                "name",
                "1 to 63 characters of letters, digits, `-`, `_` and `.`",
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(crl) = config.crl.as_mut().filter(|p| p.is_relative()) {
            *crl = base.join(&*crl);
        }
        config.tls.resolve_relative_to(base);
        if let Some(file) = config
            .database_password_file
            .as_mut()
            .filter(|p| p.is_relative())
        {
            *file = base.join(&*file);
        }
        config.database = config.resolve_database(path, base)?;
        if let Some(rb) = config.runbook.as_mut().filter(|p| p.is_relative()) {
            *rb = base.join(&*rb);
        }
        for hook in &mut config.webhooks {
            for file in [&mut hook.secret_file, &mut hook.ca_file] {
                if let Some(f) = file.as_mut().filter(|p| p.is_relative()) {
                    *f = base.join(&*f);
                }
            }
        }
        // Checked here so a bad webhook stops the start, or the reload, with the file named.
        crate::notify::Targets::from_config(&config.webhooks, read_secret_file).map_err(
            |source| ConfigError::Webhook {
                path: path.to_path_buf(),
                source,
            },
        )?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// `database` and its password: a URL is parsed (one with a password refused, without
    /// echoing it), the password read from its file (checked) or the environment; a path is
    /// taken relative to `base`.
    fn resolve_database(&self, path: &Path, base: &Path) -> Result<Database, ConfigError> {
        if !PgTarget::is_url(&self.database_setting) {
            if self.database_password_file.is_some() {
                return Err(ConfigError::PasswordWithoutPostgres {
                    path: path.to_path_buf(),
                });
            }
            let db = PathBuf::from(&self.database_setting);
            return Ok(Database::Sqlite(if db.is_relative() {
                base.join(db)
            } else {
                db
            }));
        }
        let target =
            PgTarget::parse(&self.database_setting).map_err(|source| ConfigError::DatabaseUrl {
                path: path.to_path_buf(),
                source,
            })?;
        let password = match &self.database_password_file {
            Some(file) => Some(Password::new(&read_secret_file(file).map_err(
                |reason| ConfigError::PasswordFile {
                    path: path.to_path_buf(),
                    file: file.clone(),
                    reason,
                },
            )?)),
            None => std::env::var(PASSWORD_ENV).ok().map(|p| Password::new(&p)),
        };
        Ok(Database::Postgres { target, password })
    }

    pub fn lost_after(&self) -> Duration {
        Duration::from_secs(self.lost_after_secs)
    }
}

/// Reads a secret (a password, a webhook key) from a file that only its owner (the
/// coordinator's user, or root) can read, one trailing newline dropped. The reason for a
/// refusal never quotes the file's contents.
pub fn read_secret_file(file: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(file).map_err(|e| format!("{e}"))?;
    if !meta.file_type().is_file() {
        return Err("is not a regular file (a symlink, directory or device is refused); point it at the file itself".into());
    }
    if meta.mode() & 0o007 != 0 {
        return Err(format!(
            "others may access it (mode {:o}); run `chmod o-rwx {}`",
            meta.mode() & 0o777,
            file.display()
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "is owned by uid {}, not by the coordinator's user (uid {me}) or root; run `chown {me} {}`",
            meta.uid(),
            file.display()
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{e}"))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err("is empty; write the secret in it".into());
    }
    Ok(text.to_string())
}
