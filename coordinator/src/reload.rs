//! SIGHUP: read coordinator.toml again and put in force what can change without a restart —
//! the operator table, the runbook, the approval policy, the webhooks and the config
//! inventory — then reload the CRL. Sessions and jobs are not touched: a running job keeps
//! the plan it was started with (stored with it), and a connection's next call is decided
//! against the new operator table.
//!
//! Invariant: a reload is whole or refused. Everything is read and checked first (the file,
//! the runbook, the webhooks); if any of it fails, nothing changes, the old configuration
//! stays in force, and an error line and an audit record (`config.reload_refused`) say why.
//! Keys that need a restart (listen, database, tls, crl, name, limits, ...) are compared and
//! named in a warning when they differ; their old values stay in force.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::authz::Policy;
use crate::config::Config;
use crate::jobs::{Jobs, Settings};
use crate::notify::Targets;
use crate::store::{AuditEvent, Store};

/// What a reload swaps, and where.
pub struct Reloader {
    pub source: PathBuf,
    pub policy: Arc<Policy>,
    pub jobs: Arc<Jobs>,
    pub store: Arc<dyn Store>,
    /// Told after each SIGHUP, so the CRL watcher reloads the CRL.
    pub crl: Arc<Notify>,
    /// The configuration in force.
    pub current: Config,
}

/// The new configuration, read and checked, ready to put in force.
struct Checked {
    config: Config,
    settings: Settings,
    targets: Targets,
}

impl Reloader {
    /// Reloads at each SIGHUP until `cancel`.
    pub async fn run(mut self, mut hangup: tokio::signal::unix::Signal, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                got = hangup.recv() => if got.is_none() { return },
            }
            info!(config = %self.source.display(), "received SIGHUP: reloading the configuration");
            self.reload().await;
            self.crl.notify_one();
        }
    }

    async fn reload(&mut self) {
        let checked = match self.check() {
            Ok(c) => c,
            Err(why) => {
                // One log line: a TOML error's snippet spans several.
                let why = one_line(&why);
                error!(config = %self.source.display(), error = %why, "reload refused; keeping the configuration in force. Fix the file and send SIGHUP again");
                self.audit("config.reload_refused", why).await;
                return;
            }
        };
        // The inventory is written to the store: done first, so a store that fails leaves
        // everything as it was.
        if let Err(e) = crate::sync_inventory(self.store.as_ref(), &checked.config.inventory).await
        {
            error!(config = %self.source.display(), error = %e, "reload refused: could not record the inventory labels; keeping the configuration in force");
            self.audit("config.reload_refused", format!("inventory: {e}"))
                .await;
            return;
        }
        let restart = needs_restart(&self.current, &checked.config);
        if !restart.is_empty() {
            warn!(keys = %restart.join(", "), "these settings changed but take effect only at the next restart; their old values stay in force");
        }
        let new = checked.config;
        let summary = format!(
            "operators={} runbook={} webhooks={} inventory_hosts={}{}",
            new.operators.len(),
            checked.settings.runbook_source,
            checked.targets.len(),
            new.inventory.len(),
            if restart.is_empty() {
                String::new()
            } else {
                format!("; needs a restart: {}", restart.join(", "))
            }
        );
        self.policy.replace_operators(new.operators.clone());
        self.jobs.replace_settings(checked.settings);
        self.jobs.notifier().replace(checked.targets);
        info!(
            operators = new.operators.len(),
            webhooks = new.webhooks.len(),
            "configuration reloaded: operators, runbook, approval policy, webhooks and inventory in force"
        );
        self.audit("config.reloaded", summary).await;
        // Keys that need a restart keep their old values, as the process does.
        self.current.operators = new.operators;
        self.current.runbook = new.runbook;
        self.current.approval = new.approval;
        self.current.webhooks = new.webhooks;
        self.current.inventory = new.inventory;
    }

    fn check(&self) -> Result<Checked, String> {
        let config = Config::load(&self.source).map_err(|e| e.to_string())?;
        let (runbook, runbook_source) = crate::load_runbook(&config).map_err(|e| e.to_string())?;
        let targets = Targets::from_config(&config.webhooks, crate::config::read_secret_file)
            .map_err(|e| e.to_string())?;
        let settings = Settings {
            runbook: Arc::new(runbook),
            runbook_source,
            approval: config.approval.clone(),
        };
        Ok(Checked {
            config,
            settings,
            targets,
        })
    }

    async fn audit(&self, action: &str, detail: String) {
        let event = AuditEvent {
            at_ms: rollback_common::now_unix_ms(),
            actor: "coordinator".into(),
            action: action.into(),
            target: self.source.display().to_string(),
            detail,
        };
        if let Err(e) = self.store.append_audit(&event).await {
            warn!(error = %e, action, "could not record the reload in the audit trail");
        }
    }
}

/// `text` on one line: its lines trimmed and joined.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The keys that differ between `old` and `new` but are read only at start.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let d = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    [
        ("listen", d(&old.listen, &new.listen)),
        ("database", d(&old.database, &new.database)),
        ("tls", d(&old.tls, &new.tls)),
        ("crl", d(&old.crl, &new.crl)),
        ("crl_poll_secs", d(&old.crl_poll_secs, &new.crl_poll_secs)),
        ("name", d(&old.name, &new.name)),
        ("advertise", d(&old.advertise, &new.advertise)),
        (
            "metrics_listen",
            d(&old.metrics_listen, &new.metrics_listen),
        ),
        ("log_format", d(&old.log_format, &new.log_format)),
        (
            "heartbeat_interval_secs",
            d(&old.heartbeat_interval_secs, &new.heartbeat_interval_secs),
        ),
        (
            "lost_after_secs",
            d(&old.lost_after_secs, &new.lost_after_secs),
        ),
        (
            "unreachable_after_secs",
            d(&old.unreachable_after_secs, &new.unreachable_after_secs),
        ),
        (
            "job_lease_secs",
            d(&old.job_lease_secs, &new.job_lease_secs),
        ),
        (
            "shutdown_grace_secs",
            d(&old.shutdown_grace_secs, &new.shutdown_grace_secs),
        ),
        (
            "tls_handshake_timeout_secs",
            d(
                &old.tls_handshake_timeout_secs,
                &new.tls_handshake_timeout_secs,
            ),
        ),
        (
            "max_handshakes_in_flight",
            d(&old.max_handshakes_in_flight, &new.max_handshakes_in_flight),
        ),
        (
            "max_connections_per_identity",
            d(
                &old.max_connections_per_identity,
                &new.max_connections_per_identity,
            ),
        ),
        (
            "max_watchers_per_operator",
            d(
                &old.max_watchers_per_operator,
                &new.max_watchers_per_operator,
            ),
        ),
        (
            "max_concurrent_streams",
            d(&old.max_concurrent_streams, &new.max_concurrent_streams),
        ),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect()
}
