//! `rollback-coordinator --config coordinator.toml`: parse arguments, set up logging, run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

/// jemalloc, not glibc's malloc: at 10,000 agents a one-step job spent about 18% of the
/// coordinator's CPU in glibc's allocator (`_int_malloc`, `malloc_consolidate`, `unlink_chunk`,
/// `free`); with jemalloc the job's CPU per host is about 17% lower at the same RSS
/// (BENCHMARKS.md, round five).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The fleet-rollback coordinator. Agents dial in to it over mTLS; operators drive it with
/// `rollbackctl`. Both use the one `listen` address; certificates tell them apart.
///
/// Signals: SIGTERM or SIGINT stop it (health turns NOT_SERVING, in-flight work gets
/// `shutdown_grace_secs`); SIGHUP reloads operators, runbook, approval policy, webhooks and
/// inventory from the config, refusing a file that does not load, then reloads the CRL.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Coordinator config (TOML): listen, database, crl, limits, metrics_listen, log_format,
    /// [tls] ca/cert/key, [operators] name = role, [approval], [inventory], [[webhooks]].
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
