//! What both daemons share at start-up: logging to stderr (filter from `ROLLBACK_LOG`,
//! default `info`; text, or one JSON object per line with `log_format = "json"`) and a future
//! that resolves at SIGTERM or SIGINT.

use serde::Deserialize;

/// `log_format` in coordinator.toml and agent.toml.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-12-01T10:00:00Z  INFO message key=value`: for people and journald.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, the span and event
    /// fields: host, job, run, step): for log shippers.
    Json,
}

/// Installs the global tracing subscriber, writing to stderr in `format`.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROLLBACK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Resolves at the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
    }
}
