//! rollback-console: the `rollbackctl` command line — the fleet view, and the PKI commands.

pub mod agents_cmd;
pub mod connect;
pub mod error;
pub mod exec_cmd;
pub mod output;
pub mod pki_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::connect::ConnectFlags;
use crate::output::Output;

const AFTER_HELP: &str = "\
Connection: --coordinator/--ca/--cert/--key, or ROLLBACK_COORDINATOR/ROLLBACK_CA/ROLLBACK_CERT/
ROLLBACK_KEY, or a config file (--config, default ~/.config/rollbackctl/config.toml):
    coordinator = \"https://coordinator.example:7443\"
    [tls]
    ca = \"ca.pem\"
    cert = \"operator/alice.pem\"
    key = \"operator/alice.key\"

Exit codes: 0 success, 1 failure, 2 usage error, 3 coordinator unreachable,
4 permission denied.

First steps:
    rollbackctl pki init --dir pki --trust-domain fleet.example
    rollbackctl pki issue --dir pki coordinator coord-1 --san coordinator.example
    rollbackctl pki issue --dir pki agent web-1
    rollbackctl pki issue --dir pki operator alice
    rollbackctl agents --select role=web";

/// rollbackctl — drive fleet-rollback: see the fleet, and (soon) roll it back safely.
#[derive(Debug, Parser)]
#[command(name = "rollbackctl", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectFlags,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, env = "ROLLBACK_OUTPUT", global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List agents: host, online/disconnected/lost, last seen, version, labels.
    Agents(agents_cmd::AgentsArgs),
    /// Run one typed action on one host, for diagnosis, streaming its output.
    Exec(exec_cmd::ExecArgs),
    /// Create the fleet CA and issue certificates (no coordinator needed).
    Pki(pki_cmd::PkiArgs),
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Agents(args) => agents_cmd::run(args, &cli.connect, cli.output).await,
        Command::Exec(args) => exec_cmd::run(args, &cli.connect, cli.output).await,
        Command::Pki(args) => pki_cmd::run(args),
    }
}
