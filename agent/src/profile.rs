//! The host profile in `agent.toml`: everything an action needs that the coordinator must
//! never choose — unit name, paths, binaries, database connection. Validated at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `[service]`: the unit the runbook stops, starts and restarts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceProfile {
    pub unit: String,
    #[serde(default = "default_systemctl")]
    pub systemctl: PathBuf,
}

/// `[app]`: the application's git checkout, env file, log and health endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProfile {
    /// The git working tree the app runs from.
    pub dir: PathBuf,
    #[serde(default = "default_git")]
    pub git: PathBuf,
    pub env_file: Option<PathBuf>,
    /// The last known good copy `file.restore` puts back (e.g. `.env.backup`).
    pub env_backup: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    /// Base URL of the health endpoints, e.g. `http://127.0.0.1:8000` (no path).
    pub health_base_url: Option<String>,
    /// When `env_file` is a symlink (e.g. to `/etc/app/env`), the one absolute path it may
    /// point to, in a directory only the agent's user can change; the agent then reads and
    /// replaces that file. Unset, a symlinked env file is refused (the app dir's owner could
    /// point it at any file on the host). The backup and the log are never followed.
    pub env_symlink_target: Option<PathBuf>,
}

impl AppProfile {
    /// How the env file treats a symlink.
    pub fn env_symlinks(&self) -> crate::actions::Symlinks<'_> {
        match &self.env_symlink_target {
            Some(t) => crate::actions::Symlinks::Pinned(t),
            None => crate::actions::Symlinks::Refuse,
        }
    }
}

/// `[alembic]`: how to run migrations for this app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlembicProfile {
    pub binary: PathBuf,
    pub workdir: PathBuf,
    #[serde(default = "default_alembic_config")]
    pub config: PathBuf,
    /// Extra environment alembic needs, e.g. DATABASE_URL. Nothing else is inherited.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `[postgres]`: the database `postgres.backup` and `postgres.restore` work on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresProfile {
    #[serde(default = "default_pg_dump")]
    pub pg_dump: PathBuf,
    #[serde(default = "default_pg_restore")]
    pub pg_restore: PathBuf,
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    pub user: String,
    pub database: String,
    /// Directory holding backups; `postgres.restore {backup}` names a plain file in it.
    pub backup_dir: PathBuf,
    /// A libpq password file (PGPASSFILE), if the server needs a password.
    pub password_file: Option<PathBuf>,
}

/// `[[smoke]]`: a named check of the app's critical functionality, one HTTP request to the
/// app's own `app.health_base_url` (`smoke.run`, the guard's samples, the snapshot baseline).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeCheck {
    /// Names the check in output, facts and the report: 1-40 of [a-z0-9_-].
    pub name: String,
    /// `GET` (default) or `HEAD`: a smoke check never changes the app.
    #[serde(default = "default_smoke_method")]
    pub method: String,
    /// Path on the health base URL, e.g. `/api/incidents`.
    pub path: String,
    /// The status that means it works (default 200).
    #[serde(default = "default_smoke_status")]
    pub expect_status: u16,
    /// A substring the body must hold.
    pub body_contains: Option<String>,
    /// A JSON field (dotted path, e.g. `status` or `data.count`) the body must have; with
    /// `json_equals`, the value it must have (a string, or a number or boolean as text).
    pub json_field: Option<String>,
    pub json_equals: Option<String>,
    /// Milliseconds the whole request may take (default 2000).
    #[serde(default = "default_smoke_timeout_ms")]
    pub timeout_ms: u32,
}

fn default_smoke_method() -> String {
    "GET".into()
}
fn default_smoke_status() -> u16 {
    200
}
fn default_smoke_timeout_ms() -> u32 {
    2000
}

/// At most this many smoke checks per host (each guard sample runs all of them).
pub const MAX_SMOKE_CHECKS: usize = 20;

impl SmokeCheck {
    pub fn validate(&self, index: usize) -> Result<(), ProfileProblem> {
        let key = |k: &str| format!("smoke[{index}].{k}");
        if self.name.is_empty()
            || self.name.len() > 40
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(problem(
                &key("name"),
                format!("`{}` is not 1-40 of [a-z0-9_-]", self.name.escape_default()),
            ));
        }
        if self.method != "GET" && self.method != "HEAD" {
            return Err(problem(
                &key("method"),
                format!(
                    "`{}`: a smoke check is GET or HEAD",
                    self.method.escape_default()
                ),
            ));
        }
        crate::actions::validate::endpoint(&self.path).map_err(|r| {
            problem(
                &key("path"),
                format!("`{}` {r}", self.path.escape_default()),
            )
        })?;
        if !(100..=599).contains(&self.expect_status) {
            return Err(problem(&key("expect_status"), "must be 100-599"));
        }
        if !(50..=60_000).contains(&self.timeout_ms) {
            return Err(problem(&key("timeout_ms"), "must be 50-60000"));
        }
        for (k, v) in [
            ("body_contains", &self.body_contains),
            ("json_field", &self.json_field),
            ("json_equals", &self.json_equals),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 200 || v.chars().any(char::is_control))
            {
                return Err(problem(&key(k), "must be 1-200 printable characters"));
            }
        }
        if self.json_equals.is_some() && self.json_field.is_none() {
            return Err(problem(&key("json_equals"), "needs json_field"));
        }
        if self.method == "HEAD" && (self.body_contains.is_some() || self.json_field.is_some()) {
            return Err(problem(
                &key("method"),
                "a HEAD answer has no body to check: use GET",
            ));
        }
        Ok(())
    }
}

/// Checks the `[[smoke]]` list: each check, unique names, at most [`MAX_SMOKE_CHECKS`], and an
/// `app.health_base_url` to send them to.
pub fn validate_smoke(
    checks: &[SmokeCheck],
    app: Option<&AppProfile>,
) -> Result<(), ProfileProblem> {
    if checks.is_empty() {
        return Ok(());
    }
    if checks.len() > MAX_SMOKE_CHECKS {
        return Err(problem(
            "smoke",
            format!("{} checks; at most {MAX_SMOKE_CHECKS}", checks.len()),
        ));
    }
    if app.and_then(|a| a.health_base_url.as_ref()).is_none() {
        return Err(problem(
            "smoke",
            "smoke checks are sent to app.health_base_url, which is not set",
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in checks.iter().enumerate() {
        c.validate(i)?;
        if !names.insert(c.name.as_str()) {
            return Err(problem(
                &format!("smoke[{i}].name"),
                format!("`{}` is used by an earlier check", c.name),
            ));
        }
    }
    Ok(())
}

/// `[timeouts]`: seconds a step may run before its process group is stopped.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "default_step_secs")]
    pub default_secs: u32,
    /// Upper bound for a timeout the coordinator asks for.
    #[serde(default = "default_max_secs")]
    pub max_secs: u32,
    /// Between SIGTERM and SIGKILL to a timed-out or cancelled step's process group.
    #[serde(default = "default_kill_grace_secs")]
    pub kill_grace_secs: u32,
    /// Per-action defaults, e.g. `"postgres.restore" = 1800`.
    #[serde(default)]
    pub actions: BTreeMap<String, u32>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            default_secs: default_step_secs(),
            max_secs: default_max_secs(),
            kill_grace_secs: default_kill_grace_secs(),
            actions: BTreeMap::new(),
        }
    }
}

fn default_systemctl() -> PathBuf {
    "/usr/bin/systemctl".into()
}
fn default_git() -> PathBuf {
    "/usr/bin/git".into()
}
fn default_alembic_config() -> PathBuf {
    "alembic.ini".into()
}
fn default_pg_dump() -> PathBuf {
    "/usr/lib/postgresql/15/bin/pg_dump".into()
}
fn default_pg_restore() -> PathBuf {
    "/usr/lib/postgresql/15/bin/pg_restore".into()
}
fn default_pg_port() -> u16 {
    5432
}
fn default_step_secs() -> u32 {
    300
}
fn default_max_secs() -> u32 {
    3600
}
fn default_kill_grace_secs() -> u32 {
    5
}

/// A problem in the profile: which key, and why.
#[derive(Debug)]
pub struct ProfileProblem {
    pub key: String,
    pub reason: String,
}

fn problem(key: &str, reason: impl Into<String>) -> ProfileProblem {
    ProfileProblem {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn absolute(key: &str, path: &Path) -> Result<(), ProfileProblem> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(problem(
            key,
            format!("`{}` must be an absolute path", path.display()),
        ))
    }
}

fn executable(key: &str, path: &Path) -> Result<(), ProfileProblem> {
    use std::os::unix::fs::PermissionsExt;
    absolute(key, path)?;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(problem(
            key,
            format!("`{}` is not an executable file", path.display()),
        )),
        Err(e) => Err(problem(key, format!("`{}`: {e}", path.display()))),
    }
}

/// systemd unit names: `name.service` with letters, digits and `@._:-`.
pub fn valid_unit_name(unit: &str) -> bool {
    unit.len() <= 255
        && !unit.starts_with(['-', '.'])
        && unit.ends_with(".service")
        && unit
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | ':' | '-'))
}

/// Checks an `http://host:port` base URL with no path, query or credentials.
pub fn valid_health_base(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("must start with http://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) || rest.is_empty() {
        return Err("must be http://HOST:PORT with no path, query or credentials".into());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("port `{p}` is not a number"))?,
        ),
        None => (rest, 80),
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
    {
        return Err(format!("host `{host}` is not a hostname or IP"));
    }
    Ok((host.to_string(), port))
}

impl ServiceProfile {
    pub fn validate(&self) -> Result<(), ProfileProblem> {
        if !valid_unit_name(&self.unit) {
            return Err(problem(
                "service.unit",
                format!("`{}` is not a unit name like app.service", self.unit),
            ));
        }
        executable("service.systemctl", &self.systemctl)
    }
}

impl AppProfile {
    pub fn validate(&self) -> Result<(), ProfileProblem> {
        absolute("app.dir", &self.dir)?;
        executable("app.git", &self.git)?;
        for (key, p) in [
            ("app.env_file", &self.env_file),
            ("app.env_backup", &self.env_backup),
            ("app.log_file", &self.log_file),
            ("app.env_symlink_target", &self.env_symlink_target),
        ] {
            if let Some(p) = p {
                absolute(key, p)?;
            }
        }
        if self.env_file.is_some() != self.env_backup.is_some() {
            return Err(problem(
                "app.env_backup",
                "set both env_file and env_backup, or neither",
            ));
        }
        if let Some(url) = &self.health_base_url {
            valid_health_base(url)
                .map_err(|r| problem("app.health_base_url", format!("`{url}` {r}")))?;
        }
        Ok(())
    }
}

impl AlembicProfile {
    pub fn validate(&self) -> Result<(), ProfileProblem> {
        executable("alembic.binary", &self.binary)?;
        absolute("alembic.workdir", &self.workdir)?;
        for k in self.env.keys() {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(problem(
                    &format!("alembic.env.{k}"),
                    "environment names are [A-Za-z0-9_]",
                ));
            }
        }
        Ok(())
    }
}

impl PostgresProfile {
    pub fn validate(&self) -> Result<(), ProfileProblem> {
        executable("postgres.pg_dump", &self.pg_dump)?;
        executable("postgres.pg_restore", &self.pg_restore)?;
        absolute("postgres.backup_dir", &self.backup_dir)?;
        for (key, v) in [
            ("postgres.host", &self.host),
            ("postgres.user", &self.user),
            ("postgres.database", &self.database),
        ] {
            if v.is_empty() || v.starts_with('-') || v.contains(['\0', '\n', '=', ' ']) {
                return Err(problem(
                    key,
                    format!("`{v}` is empty or holds a character libpq would misread"),
                ));
            }
        }
        if let Some(p) = &self.password_file {
            absolute("postgres.password_file", p)?;
        }
        Ok(())
    }
}

impl Timeouts {
    pub fn validate(&self) -> Result<(), ProfileProblem> {
        if self.default_secs == 0 || self.default_secs > self.max_secs {
            return Err(problem(
                "timeouts.default_secs",
                "must be between 1 and timeouts.max_secs",
            ));
        }
        if self.kill_grace_secs == 0 || self.kill_grace_secs > 300 {
            return Err(problem(
                "timeouts.kill_grace_secs",
                "must be between 1 and 300",
            ));
        }
        for (action, secs) in &self.actions {
            if *secs == 0 || *secs > self.max_secs {
                return Err(problem(
                    &format!("timeouts.actions.{action}"),
                    "must be between 1 and timeouts.max_secs",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names() {
        assert!(valid_unit_name("app.service"));
        assert!(valid_unit_name("app@blue.service"));
        assert!(!valid_unit_name("-app.service"));
        assert!(!valid_unit_name("app.socket"));
        assert!(!valid_unit_name("app;reboot.service"));
    }

    #[test]
    fn health_base_urls() {
        assert_eq!(
            valid_health_base("http://127.0.0.1:8000"),
            Ok(("127.0.0.1".into(), 8000))
        );
        assert_eq!(valid_health_base("http://web-1/"), Ok(("web-1".into(), 80)));
        assert!(valid_health_base("https://x:1").is_err());
        assert!(valid_health_base("http://x:1/healthz").is_err());
        assert!(valid_health_base("http://user@x:1").is_err());
    }
}
