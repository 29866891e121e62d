//! `rollback-agent --config agent.toml`: parse arguments, set up logging, run.
//! `rollback-agent --config template.toml --simulate K --simulate-pki DIR`: K simulated agents
//! in one process for the scale benchmark (see `rollback_agent::simulate`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

/// The fleet-rollback agent. Runs on every host, dials out to the coordinator over mTLS (no
/// inbound port), and executes the runbook's typed steps on this host only.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Agent config (TOML): host_id, coordinator URL(s), [labels], state_dir, [tls] ca/cert/key.
    #[arg(long, env = "ROLLBACK_AGENT_CONFIG")]
    config: PathBuf,
    /// Benchmarking only: run K simulated agents in this process instead of this host's agent.
    /// Each is a full agent (own certificate, mTLS session, journal, results) whose steps are
    /// no-ops. Host ids are `<host_id>-00001`...; state dirs are under `state_dir`.
    #[arg(long, value_name = "K", requires = "simulate_pki")]
    simulate: Option<usize>,
    /// With --simulate: a `rollbackctl pki` directory (with its CA key) where the simulated
    /// agents' certificates are found, or issued if missing. Use a throwaway benchmark CA.
    #[arg(long, value_name = "DIR")]
    simulate_pki: Option<PathBuf>,
    /// With --simulate: milliseconds between starting two simulated agents.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    simulate_interval_ms: u64,
    /// With --simulate: milliseconds each simulated step takes before it succeeds (a step
    /// that takes time, to watch a job while it runs).
    #[arg(long, value_name = "MS", default_value_t = 0, requires = "simulate")]
    simulate_step_ms: u64,
}

fn main() -> Result<()> {
    // A step's process starting in its cgroup: exec before any runtime or logging exists.
    if let Some(code) = rollback_agent::exec::shim_main() {
        std::process::exit(code);
    }
    agent_main()
}

#[tokio::main]
async fn agent_main() -> Result<()> {
    let args = Args::parse();
    let config = rollback_agent::Config::load(&args.config)?;
    rollback_common::daemon::init_logging(config.log_format);
    if let (Some(count), Some(pki)) = (args.simulate, args.simulate_pki) {
        let sim = rollback_agent::simulate::Simulation {
            count,
            pki,
            template: config,
            start_interval: std::time::Duration::from_millis(args.simulate_interval_ms),
            step_ms: args.simulate_step_ms,
        };
        return rollback_agent::simulate::run(sim, rollback_common::daemon::shutdown_signal())
            .await
            .context("simulated agents failed");
    }
    rollback_agent::run(config, rollback_common::daemon::shutdown_signal())
        .await
        .context("agent failed")
}
