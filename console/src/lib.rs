//! rollback-console: the `rollbackctl` command line — the fleet view, and the PKI commands.

pub mod agents_cmd;
pub mod audit_cmd;
pub mod cert_cmd;
pub mod connect;
pub mod coordinators_cmd;
pub mod error;
pub mod exec_cmd;
pub mod jobs_cmd;
pub mod output;
pub mod pki_cmd;
pub mod snapshot_cmd;

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
    rollbackctl agents --select role=web

Certificates: `rollbackctl pki list` shows every certificate's expiry; `rollbackctl pki renew
agent web-1` replaces a pair (agents pick it up without a restart); `rollbackctl agents` warns
about agent certificates expiring within 30 days.";

/// rollbackctl — drive fleet-rollback: see the fleet, plan and run rollbacks, read reports.
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
    /// Roll hosts back with a runbook procedure: canary first, in batches, halting at the
    /// failure threshold, followed live. Exit code 0 only when every targeted host succeeded.
    Rollback(jobs_cmd::RollbackArgs),
    /// Dry run: show the exact per-host steps and batches a rollback would run.
    Plan(jobs_cmd::RollbackArgs),
    /// The runbook the coordinator has loaded.
    #[command(subcommand)]
    Runbook(jobs_cmd::RunbookCmd),
    /// Recent rollback jobs.
    Jobs {
        /// How many (newest first).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One job's record.
    #[command(subcommand)]
    Job(jobs_cmd::JobCmd),
    /// Follow a job live (replays what already happened first).
    Watch { job: String },
    /// Stop a job: nothing further is dispatched, running steps are cancelled.
    Cancel {
        job: String,
        /// Why (recorded in the audit trail).
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Approve a rollback that waits for a second person (approver role; not the requester).
    ///
    /// Jobs the coordinator's [approval] policy names (by default the `database` and
    /// `database-restore` procedures, any plan that downgrades or restores the database, and
    /// any job over 50 hosts) are stored `awaiting_approval` with their plan and pinned
    /// targets, and nothing runs until another approver approves — then it runs exactly as
    /// planned. Check the plan first: `rollbackctl job show JOB`.
    Approve {
        job: String,
        /// Why it may run (recorded in the audit trail and the report).
        #[arg(long)]
        reason: String,
    },
    /// Refuse a rollback that waits for approval (approver role): it ends `denied`, nothing
    /// of it ran, and its hosts are free for other jobs.
    Deny {
        job: String,
        /// Why it must not run (recorded in the audit trail and the report).
        #[arg(long)]
        reason: String,
    },
    /// The job's incident report (Markdown), with the post-rollback checklist.
    Report { job: String },
    /// Record each host's last-known-good state (before a deployment).
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Recorded snapshots, newest first.
    Snapshots {
        /// Only hosts matching this selector.
        #[arg(long, default_value = "")]
        select: String,
    },
    /// What changed since each host's snapshot, which runbook procedure fixes it, and the
    /// exact command to run.
    Diagnose {
        #[arg(long)]
        select: String,
    },
    /// Create the fleet CA, issue, renew and list certificates (no coordinator needed).
    Pki(pki_cmd::PkiArgs),
    /// The audit trail, newest first: who did what, when (approver). `audit verify` checks
    /// its hash chain and names the first record that was changed or removed.
    Audit(audit_cmd::AuditArgs),
    /// The coordinators sharing this one's store (PostgreSQL): alive or dead, address, agents
    /// held, jobs driven. Any of them answers for the whole fleet.
    Coordinators,
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Agents(args) => agents_cmd::run(args, &cli.connect, cli.output).await,
        Command::Coordinators => coordinators_cmd::run(&cli.connect, cli.output).await,
        Command::Exec(args) => exec_cmd::run(args, &cli.connect, cli.output).await,
        Command::Rollback(args) => jobs_cmd::rollback(args, &cli.connect, cli.output).await,
        Command::Plan(args) => jobs_cmd::plan(args, &cli.connect, cli.output).await,
        Command::Runbook(cmd) => jobs_cmd::runbook(cmd, &cli.connect, cli.output).await,
        Command::Jobs { limit } => jobs_cmd::jobs(&cli.connect, cli.output, limit).await,
        Command::Job(cmd) => jobs_cmd::job(cmd, &cli.connect, cli.output).await,
        Command::Watch { job } => jobs_cmd::watch(job, &cli.connect, cli.output).await,
        Command::Cancel { job, reason } => {
            jobs_cmd::cancel(job, reason, &cli.connect, cli.output).await
        }
        Command::Approve { job, reason } => {
            jobs_cmd::decide(job, reason, true, &cli.connect, cli.output).await
        }
        Command::Deny { job, reason } => {
            jobs_cmd::decide(job, reason, false, &cli.connect, cli.output).await
        }
        Command::Report { job } => jobs_cmd::report(job, &cli.connect, cli.output).await,
        Command::Snapshot(args) => snapshot_cmd::snapshot(args, &cli.connect, cli.output).await,
        Command::Snapshots { select } => {
            snapshot_cmd::snapshots(select, &cli.connect, cli.output).await
        }
        Command::Diagnose { select } => {
            snapshot_cmd::diagnose(select, &cli.connect, cli.output).await
        }
        Command::Pki(args) => pki_cmd::run(args, cli.output),
        Command::Audit(args) => audit_cmd::run(args, &cli.connect, cli.output).await,
    }
}
