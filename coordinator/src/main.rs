//! `rollback-coordinator --config coordinator.toml`: parse arguments, set up logging, run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

/// The fleet-rollback coordinator. Agents dial in to it over mTLS; operators drive it with
/// `rollbackctl`. Both use the one `listen` address; certificates tell them apart.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Coordinator config (TOML): listen, database, crl, limits, [tls] ca/cert/key,
    /// [operators] name = role.
    #[arg(long, env = "ROLLBACK_COORDINATOR_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let config = rollback_coordinator::Config::load(&args.config)?;
    rollback_common::daemon::init_logging(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding listen address {}", config.listen))?;
    rollback_coordinator::run(config, listener, rollback_common::daemon::shutdown_signal())
        .await
        .context("coordinator failed")
}
