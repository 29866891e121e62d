//! `rollback-agent --config agent.toml`: parse arguments, set up logging, run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

/// The fleet-rollback agent. Runs on every host, dials out to the coordinator over mTLS (no
/// inbound port), and executes the runbook's typed steps on this host only.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Agent config (TOML): host_id, coordinator URL, [labels], state_dir, [tls] ca/cert/key.
    #[arg(long, env = "ROLLBACK_AGENT_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    rollback_common::daemon::init_logging();
    let config = rollback_agent::Config::load(&args.config)?;
    rollback_agent::run(config, rollback_common::daemon::shutdown_signal())
        .await
        .context("agent failed")
}
