//! How `rollbackctl` reaches the coordinator: address and operator certificate from flags,
//! `ROLLBACK_*` environment variables (both via clap), or a config file — in that order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use rollback_common::proto::console_client::ConsoleClient;
use rollback_common::tls::TlsFiles;
use rollback_common::{MAX_CONSOLE_ANSWER_BYTES, MAX_MESSAGE_BYTES};
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

/// Connection flags shared by every command that talks to the coordinator.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectFlags {
    /// Coordinator URL, e.g. https://coordinator.example:7443.
    #[arg(long, env = "ROLLBACK_COORDINATOR", global = true)]
    pub coordinator: Option<String>,
    /// Fleet CA certificate (PEM).
    #[arg(long, env = "ROLLBACK_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Operator certificate (PEM), from `rollbackctl pki issue operator NAME`.
    #[arg(long, env = "ROLLBACK_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Operator private key (PEM).
    #[arg(long, env = "ROLLBACK_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// TLS name to verify the coordinator certificate against, when the URL's host differs.
    #[arg(long, env = "ROLLBACK_SERVER_NAME", global = true)]
    pub server_name: Option<String>,
    /// Console config file (TOML: coordinator, server_name, [tls] ca/cert/key, and named
    /// [contexts.NAME] tables).
    /// Default: $XDG_CONFIG_HOME/rollbackctl/config.toml or ~/.config/rollbackctl/config.toml.
    #[arg(long, env = "ROLLBACK_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Named context of the config file to use (a fleet: its coordinator and certificates);
    /// default: the file's `current_context` (`rollbackctl context use NAME` sets it).
    #[arg(long, env = "ROLLBACK_CONTEXT", global = true)]
    pub context: Option<String>,
}

/// The console config file: one unnamed fleet at the top level, and/or named contexts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub coordinator: Option<String>,
    pub server_name: Option<String>,
    pub tls: Option<FileTls>,
    /// The context used when neither --context nor ROLLBACK_CONTEXT names one.
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: std::collections::BTreeMap<String, FileContext>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// One named fleet: `[contexts.prod]` with coordinator, server_name, ca, cert, key.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileContext {
    pub coordinator: Option<String>,
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Fully resolved connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub coordinator: String,
    pub server_name: Option<String>,
    pub tls: TlsFiles,
    /// The named context these came from, if any.
    pub context: Option<String>,
}

impl Settings {
    /// What a command is about to act on, for confirmations: `context prod
    /// (https://coord:7443)`, or the bare address when no context is in use.
    pub fn target(&self) -> String {
        match &self.context {
            Some(name) => format!("context {name} ({})", self.coordinator),
            None => format!("coordinator {}", self.coordinator),
        }
    }
}

fn default_config_path(xdg: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    xdg.or_else(|| home.map(|h| h.join(".config")))
        .map(|d| d.join("rollbackctl").join("config.toml"))
}

/// Reads the config file named by `--config`, else the default path if it exists.
pub fn load_file(flags: &ConnectFlags) -> Result<(Option<PathBuf>, FileConfig)> {
    let (path, explicit) = match &flags.config {
        Some(p) => (Some(p.clone()), true),
        None => (
            default_config_path(
                std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from),
                std::env::var_os("HOME").map(PathBuf::from),
            ),
            false,
        ),
    };
    let Some(path) = path else {
        return Ok((None, FileConfig::default()));
    };
    if !explicit && !path.exists() {
        return Ok((None, FileConfig::default()));
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading console config {}", path.display()))?;
    let file =
        toml::from_str(&text).with_context(|| format!("console config {}", path.display()))?;
    Ok((Some(path), file))
}

/// The context to use: --context / ROLLBACK_CONTEXT, else the file's `current_context`.
/// `None` means the file's top-level settings.
fn pick_context(flags: &ConnectFlags, file: &FileConfig) -> Result<Option<(String, FileContext)>> {
    let Some(name) = flags.context.clone().or(file.current_context.clone()) else {
        return Ok(None);
    };
    match file.contexts.get(&name) {
        Some(c) => Ok(Some((name, c.clone()))),
        None => {
            let known: Vec<&str> = file.contexts.keys().map(String::as_str).collect();
            bail!(
                "no context `{name}` in the console config file; {} (`rollbackctl context list`)",
                if known.is_empty() {
                    "it has no [contexts.NAME] table".to_string()
                } else {
                    format!("it has {}", known.join(", "))
                }
            )
        }
    }
}

/// Flag (or env, which clap folds into the flag) wins over the context, which wins over the
/// file's top level.
pub fn resolve(
    flags: &ConnectFlags,
    file_path: Option<&Path>,
    file: FileConfig,
) -> Result<Settings> {
    let base = file_path.and_then(Path::parent).unwrap_or(Path::new("."));
    let from_file = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { base.join(p) } else { p });
    let context = pick_context(flags, &file)?;
    let tls = file.tls.unwrap_or_default();
    let (name, ctx) = match context {
        Some((name, c)) => (Some(name), c),
        None => (
            None,
            FileContext {
                coordinator: file.coordinator,
                server_name: file.server_name,
                ca: tls.ca,
                cert: tls.cert,
                key: tls.key,
            },
        ),
    };
    let key_of = |top: &str, in_ctx: &str| match &name {
        Some(n) => format!("contexts.{n}.{in_ctx}"),
        None => top.to_string(),
    };
    let hint = |what: &str, flag: &str, env: &str, key: String| {
        anyhow!(
            "no {what}: pass {flag}, set {env}, or set `{key}` in the console config file (--config)"
        )
    };
    let coordinator = flags
        .coordinator
        .clone()
        .or(ctx.coordinator)
        .ok_or_else(|| {
            hint(
                "coordinator address",
                "--coordinator",
                "ROLLBACK_COORDINATOR",
                key_of("coordinator", "coordinator"),
            )
        })?;
    let tls = TlsFiles {
        ca: flags.ca.clone().or(from_file(ctx.ca)).ok_or_else(|| {
            hint(
                "CA certificate",
                "--ca",
                "ROLLBACK_CA",
                key_of("tls.ca", "ca"),
            )
        })?,
        cert: flags.cert.clone().or(from_file(ctx.cert)).ok_or_else(|| {
            hint(
                "operator certificate",
                "--cert",
                "ROLLBACK_CERT",
                key_of("tls.cert", "cert"),
            )
        })?,
        key: flags.key.clone().or(from_file(ctx.key)).ok_or_else(|| {
            hint(
                "operator key",
                "--key",
                "ROLLBACK_KEY",
                key_of("tls.key", "key"),
            )
        })?,
    };
    // A context whose address a flag replaced is not that context any more.
    let context = name.filter(|_| flags.coordinator.is_none());
    Ok(Settings {
        coordinator,
        server_name: flags.server_name.clone().or(ctx.server_name),
        tls,
        context,
    })
}

/// The settings a command would connect with.
pub fn settings(flags: &ConnectFlags) -> Result<Settings> {
    let (path, file) = load_file(flags)?;
    resolve(flags, path.as_deref(), file)
}

/// Connects to the coordinator's Console service.
pub async fn console(flags: &ConnectFlags) -> Result<ConsoleClient<Channel>> {
    let settings = settings(flags)?;
    let tls = settings
        .tls
        .client_config(settings.server_name.as_deref())?;
    let endpoint = Endpoint::from_shared(settings.coordinator.clone())
        .with_context(|| format!("coordinator URL `{}`", settings.coordinator))?
        .tls_config(tls)
        .with_context(|| format!("TLS settings for {}", settings.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow!(crate::error::ConnectFailed {
            url: settings.coordinator.clone(),
            reason: error_chain(&e)
        })
    })?;
    Ok(ConsoleClient::new(channel)
        .max_decoding_message_size(MAX_CONSOLE_ANSWER_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_paths_are_relative_to_it() {
        let flags = ConnectFlags {
            coordinator: Some("https://flag:1".into()),
            ..Default::default()
        };
        let file = FileConfig {
            coordinator: Some("https://file:2".into()),
            server_name: Some("coord".into()),
            tls: Some(FileTls {
                ca: Some("ca.pem".into()),
                cert: Some("/abs/op.pem".into()),
                key: Some("op.key".into()),
            }),
            ..Default::default()
        };
        let s = resolve(&flags, Some(Path::new("/etc/rb/config.toml")), file).expect("resolves");
        assert_eq!(s.coordinator, "https://flag:1");
        assert_eq!(s.server_name.as_deref(), Some("coord"));
        assert_eq!(s.tls.ca, PathBuf::from("/etc/rb/ca.pem"));
        assert_eq!(s.tls.cert, PathBuf::from("/abs/op.pem"));
        assert_eq!(s.tls.key, PathBuf::from("/etc/rb/op.key"));
    }

    #[test]
    fn missing_settings_name_every_way_to_give_them() {
        let err =
            resolve(&ConnectFlags::default(), None, FileConfig::default()).expect_err("incomplete");
        let msg = err.to_string();
        assert!(
            msg.contains("--coordinator") && msg.contains("ROLLBACK_COORDINATOR"),
            "{msg}"
        );
    }

    fn two_contexts() -> FileConfig {
        toml::from_str(
            r#"
current_context = "staging"
[contexts.prod]
coordinator = "https://prod:7443"
ca = "prod/ca.pem"
cert = "prod/op.pem"
key = "prod/op.key"
[contexts.staging]
coordinator = "https://staging:7443"
ca = "/s/ca.pem"
cert = "/s/op.pem"
key = "/s/op.key"
"#,
        )
        .expect("parses")
    }

    #[test]
    fn the_named_context_wins_over_the_current_one_and_names_itself() {
        let path = Some(Path::new("/etc/rb/config.toml"));
        let s = resolve(&ConnectFlags::default(), path, two_contexts()).expect("current");
        assert_eq!(s.coordinator, "https://staging:7443");
        assert_eq!(s.target(), "context staging (https://staging:7443)");
        let flags = ConnectFlags {
            context: Some("prod".into()),
            ..Default::default()
        };
        let s = resolve(&flags, path, two_contexts()).expect("prod");
        assert_eq!(s.coordinator, "https://prod:7443");
        assert_eq!(s.tls.ca, PathBuf::from("/etc/rb/prod/ca.pem"));
        assert_eq!(s.context.as_deref(), Some("prod"));
        let flags = ConnectFlags {
            context: Some("qa".into()),
            ..Default::default()
        };
        let err = resolve(&flags, path, two_contexts()).expect_err("unknown");
        assert!(err.to_string().contains("prod, staging"), "{err}");
    }

    #[test]
    fn default_config_path_prefers_xdg() {
        assert_eq!(
            default_config_path(Some("/x".into()), Some("/h".into())),
            Some(PathBuf::from("/x/rollbackctl/config.toml"))
        );
        assert_eq!(
            default_config_path(None, Some("/h".into())),
            Some(PathBuf::from("/h/.config/rollbackctl/config.toml"))
        );
    }
}
