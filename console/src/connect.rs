//! How `rollbackctl` reaches the coordinator: address and operator certificate from flags,
//! `ROLLBACK_*` environment variables (both via clap), or a config file — in that order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use rollback_common::MAX_MESSAGE_BYTES;
use rollback_common::proto::console_client::ConsoleClient;
use rollback_common::tls::TlsFiles;
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
    /// Console config file (TOML: coordinator, server_name, [tls] ca/cert/key).
    /// Default: $XDG_CONFIG_HOME/rollbackctl/config.toml or ~/.config/rollbackctl/config.toml.
    #[arg(long, env = "ROLLBACK_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

/// The console config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub coordinator: Option<String>,
    pub server_name: Option<String>,
    pub tls: Option<FileTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
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

/// Flag (or env, which clap folds into the flag) wins over the file.
pub fn resolve(
    flags: &ConnectFlags,
    file_path: Option<&Path>,
    file: FileConfig,
) -> Result<Settings> {
    let base = file_path.and_then(Path::parent).unwrap_or(Path::new("."));
    let from_file = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { base.join(p) } else { p });
    let tls = file.tls.unwrap_or_default();
    let hint = |what: &str, flag: &str, env: &str, key: &str| {
        anyhow!(
            "no {what}: pass {flag}, set {env}, or set `{key}` in the console config file (--config)"
        )
    };
    let coordinator = flags
        .coordinator
        .clone()
        .or(file.coordinator)
        .ok_or_else(|| {
            hint(
                "coordinator address",
                "--coordinator",
                "ROLLBACK_COORDINATOR",
                "coordinator",
            )
        })?;
    let tls = TlsFiles {
        ca: flags
            .ca
            .clone()
            .or(from_file(tls.ca))
            .ok_or_else(|| hint("CA certificate", "--ca", "ROLLBACK_CA", "tls.ca"))?,
        cert: flags.cert.clone().or(from_file(tls.cert)).ok_or_else(|| {
            hint(
                "operator certificate",
                "--cert",
                "ROLLBACK_CERT",
                "tls.cert",
            )
        })?,
        key: flags
            .key
            .clone()
            .or(from_file(tls.key))
            .ok_or_else(|| hint("operator key", "--key", "ROLLBACK_KEY", "tls.key"))?,
    };
    Ok(Settings {
        coordinator,
        server_name: flags.server_name.clone().or(file.server_name),
        tls,
    })
}

/// Connects to the coordinator's Console service.
pub async fn console(flags: &ConnectFlags) -> Result<ConsoleClient<Channel>> {
    let (path, file) = load_file(flags)?;
    let settings = resolve(flags, path.as_deref(), file)?;
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
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
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
