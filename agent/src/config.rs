//! `agent.toml`: who this host is, where the coordinators are, TLS files and the state dir.
//! Validated at start with errors that name the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollback_common::identity::validate_name;
use rollback_common::tls::TlsFiles;
use serde::Deserialize;

use crate::coordinators::{CoordinatorUrl, parse_url};
use crate::profile::{AlembicProfile, AppProfile, PostgresProfile, ServiceProfile, Timeouts};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's id; must equal the name in the agent certificate.
    pub host_id: String,
    /// One coordinator URL, e.g. `https://10.0.0.1:7443`: the same as a one-element
    /// `coordinators` (set one key or the other, not both).
    #[serde(default)]
    pub coordinator: Option<String>,
    /// Coordinator URLs the agent holds its session with, one at a time (`coordinators`).
    #[serde(default)]
    pub coordinators: Option<Vec<String>>,
    /// TLS server name to verify every coordinator's certificate against, when the URLs'
    /// hosts are not among the certificates' SANs.
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
    /// Log lines as text (default) or one JSON object per line (`"json"`).
    #[serde(default)]
    pub log_format: rollback_common::daemon::LogFormat,
    pub service: Option<ServiceProfile>,
    pub app: Option<AppProfile>,
    pub alembic: Option<AlembicProfile>,
    pub postgres: Option<PostgresProfile>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// `[[smoke]]`: checks of the app's critical functionality.
    #[serde(default)]
    pub smoke: Vec<crate::profile::SmokeCheck>,
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
        self.coordinator_urls()
            .map_err(|(key, reason)| invalid(key, reason))?;
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
        profile(crate::profile::validate_smoke(
            &self.smoke,
            self.app.as_ref(),
        ))?;
        Ok(())
    }

    /// The configured coordinators, validated: `coordinator` as a one-element list, or
    /// `coordinators`. The error names the key and says what to change.
    pub fn coordinator_urls(&self) -> Result<Vec<CoordinatorUrl>, (&'static str, String)> {
        match (&self.coordinator, &self.coordinators) {
            (Some(_), Some(_)) => Err((
                "coordinators",
                "both `coordinator` and `coordinators` are set; keep one (a single URL may be written as `coordinators = [\"https://HOST:PORT\"]`)".into(),
            )),
            (None, None) => Err((
                "coordinators",
                "no coordinator: set `coordinators = [\"https://HOST:PORT\", ...]` (or `coordinator = \"https://HOST:PORT\"`)".into(),
            )),
            (Some(one), None) => Ok(vec![parse_url(one).map_err(|r| ("coordinator", r))?]),
            (None, Some(list)) if list.is_empty() => Err((
                "coordinators",
                "the list is empty; name at least one `https://HOST:PORT`".into(),
            )),
            (None, Some(list)) => list
                .iter()
                .map(|u| parse_url(u).map_err(|r| ("coordinators", r)))
                .collect(),
        }
    }

    pub fn backoff(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.reconnect_initial_ms),
            Duration::from_millis(self.reconnect_max_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(coordinator_lines: &str) -> Config {
        toml::from_str(&format!(
            "host_id = \"h1\"\n{coordinator_lines}state_dir = \"/nonexistent\"\n[tls]\nca = \"x\"\ncert = \"x\"\nkey = \"x\"\n"
        ))
        .expect("parses")
    }

    #[test]
    fn one_coordinator_is_a_one_element_list_and_several_keep_their_order() {
        let one = config("coordinator = \"https://a.test:7443\"\n")
            .coordinator_urls()
            .expect("one");
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].host.as_str(), one[0].port), ("a.test", 7443));
        let list = config("coordinators = [\"https://b.test:1\", \"https://[::1]:2\"]\n")
            .coordinator_urls()
            .expect("list");
        let hosts: Vec<_> = list.iter().map(|u| (u.host.as_str(), u.port)).collect();
        assert_eq!(hosts, [("b.test", 1), ("::1", 2)]);
    }

    #[test]
    fn both_keys_none_an_empty_list_or_a_bad_url_is_refused_naming_the_key() {
        for (lines, key, says) in [
            (
                "coordinator = \"https://a.test\"\ncoordinators = [\"https://b.test\"]\n",
                "coordinators",
                "both `coordinator` and `coordinators`",
            ),
            ("", "coordinators", "no coordinator"),
            ("coordinators = []\n", "coordinators", "empty"),
            (
                "coordinators = [\"https://a.test\", \"http://b.test\"]\n",
                "coordinators",
                "`http://b.test` must be an https:// URL",
            ),
            (
                "coordinator = \"https://a.test/x\"\n",
                "coordinator",
                "`https://a.test/x` must be https://HOST[:PORT]",
            ),
        ] {
            let (k, reason) = config(lines).coordinator_urls().expect_err(lines);
            assert_eq!(k, key, "{lines}");
            assert!(reason.contains(says), "{lines}: {reason}");
        }
    }
}
