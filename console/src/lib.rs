//! rollback-console: the `rollbackctl` command line — the fleet view, and the PKI commands.

pub mod agents_cmd;
pub mod audit_cmd;
pub mod cert_cmd;
pub mod connect;
pub mod context_cmd;
pub mod coordinators_cmd;
pub mod error;
pub mod exec_cmd;
pub mod guard_cmd;
pub mod jobs_cmd;
pub mod live;
pub mod output;
pub mod pki_cmd;
mod record;
pub mod snapshot_cmd;
pub mod ui;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use crate::connect::ConnectFlags;
use crate::output::Output;

const AFTER_HELP: &str = "\
Connection: --coordinator/--ca/--cert/--key, or ROLLBACK_COORDINATOR/ROLLBACK_CA/ROLLBACK_CERT/
ROLLBACK_KEY, or a config file (--config, default ~/.config/rollbackctl/config.toml) with
named contexts, one per fleet (`rollbackctl context --help`):
    current_context = \"prod\"
    [contexts.prod]
    coordinator = \"https://coordinator.example:7443\"
    ca = \"ca.pem\"
    cert = \"operator/alice.pem\"
    key = \"operator/alice.key\"
Every command that changes the fleet names the context and coordinator it acts on.

Job ids: wherever a job is asked for, give its id, 4 or more of its first hex digits, or
`latest` (the newest rollback).

Exit codes: 0 success, 1 failure, 2 usage error, 3 coordinator unreachable,
4 permission denied.

First steps:
    rollbackctl pki --dir pki init --trust-domain fleet.example
    rollbackctl pki --dir pki issue coordinator coord-1 --san coordinator.example
    rollbackctl pki --dir pki issue agent web-1
    rollbackctl pki --dir pki issue operator alice
    rollbackctl agents --select role=web

On call:
    rollbackctl jobs --state running
    rollbackctl watch latest
    rollbackctl report latest

Certificates: `rollbackctl pki list` shows every certificate's expiry; `rollbackctl pki renew
agent web-1` replaces a pair (agents pick it up without a restart); `rollbackctl agents` warns
about agent certificates expiring within 30 days.

Shell completion: `rollbackctl completion bash > /etc/bash_completion.d/rollbackctl` (also zsh,
fish).";

/// rollbackctl — drive fleet-rollback: see the fleet, plan and run rollbacks, read reports.
#[derive(Debug, Parser)]
#[command(name = "rollbackctl", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectFlags,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, env = "ROLLBACK_OUTPUT", global = true)]
    pub output: Output,
    /// Show times in UTC instead of local time.
    #[arg(long, global = true)]
    pub utc: bool,
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
    /// After a deployment: sample the hosts for a window and judge them by the runbook's
    /// "When to Rollback" criteria against a snapshot's baseline; on a breach, show the
    /// evidence and propose (with --auto, start) the rollback.
    Guard(guard_cmd::GuardArgs),
    /// The runbook the coordinator has loaded.
    #[command(subcommand)]
    Runbook(jobs_cmd::RunbookCmd),
    /// Recent jobs, newest first (rollbacks only unless --kind says otherwise).
    Jobs(jobs_cmd::JobsArgs),
    /// One job's record.
    #[command(subcommand)]
    Job(jobs_cmd::JobCmd),
    /// One host's jobs, newest first, with what each changed on it.
    History(jobs_cmd::HistoryArgs),
    /// Follow a job live: its events, each step's output lines prefixed by host, and on a
    /// terminal a summary pinned at the bottom. Replays what already happened first; picks up
    /// where it was after a dropped connection.
    #[command(after_help = "\
Examples:
    rollbackctl watch latest
    rollbackctl watch latest --quiet-output")]
    Watch {
        /// The job: its id, 4 or more of its first hex digits, or `latest`.
        job: String,
        /// Hide the steps' output lines (events and the summary stay).
        #[arg(long)]
        quiet_output: bool,
    },
    /// Stop a job: nothing further is dispatched, running steps are cancelled.
    Cancel {
        /// The job: its id, 4 or more of its first hex digits, or `latest`.
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
        /// The job: its id, 4 or more of its first hex digits, or `latest`.
        job: String,
        /// Why it may run (recorded in the audit trail and the report).
        #[arg(long)]
        reason: String,
    },
    /// Refuse a rollback that waits for approval (approver role): it ends `denied`, nothing
    /// of it ran, and its hosts are free for other jobs.
    Deny {
        /// The job: its id, 4 or more of its first hex digits, or `latest`.
        job: String,
        /// Why it must not run (recorded in the audit trail and the report).
        #[arg(long)]
        reason: String,
    },
    /// The job's incident report (Markdown), with the post-rollback checklist.
    #[command(after_help = "\
Examples:
    rollbackctl report latest
    rollbackctl report latest --output json")]
    Report {
        /// The job: its id, 4 or more of its first hex digits, or `latest`.
        job: String,
    },
    /// Record each host's last-known-good state (before a deployment).
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Recorded snapshots, newest first.
    Snapshots {
        /// Only hosts matching this selector, e.g. role=web.
        #[arg(long, default_value = "")]
        select: String,
    },
    /// What changed since each host's snapshot, which runbook procedure fixes it, and the
    /// exact command to run.
    Diagnose {
        /// Hosts to compare with their snapshot, e.g. role=web.
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
    /// Named fleets of the console config file: list them, pick the current one, show what a
    /// command would connect to.
    #[command(subcommand)]
    Context(context_cmd::ContextCmd),
    /// The web console: the fleet, jobs live, reports, new rollbacks and diagnoses in a
    /// browser, served on 127.0.0.1 with your certificate and context, behind a token URL.
    Ui(ui::UiArgs),
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
    rollbackctl completion bash
    rollbackctl completion zsh")]
    Completion {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
}

pub async fn run(cli: Cli) -> Result<()> {
    output::use_utc(cli.utc);
    match cli.cmd {
        Command::Agents(args) => agents_cmd::run(args, &cli.connect, cli.output).await,
        Command::Ui(args) => ui::run(args, &cli.connect).await,
        Command::Coordinators => coordinators_cmd::run(&cli.connect, cli.output).await,
        Command::Exec(args) => exec_cmd::run(args, &cli.connect, cli.output).await,
        Command::Rollback(args) => jobs_cmd::rollback(args, &cli.connect, cli.output).await,
        Command::Plan(args) => jobs_cmd::plan(args, &cli.connect, cli.output).await,
        Command::Guard(args) => guard_cmd::guard(args, &cli.connect, cli.output).await,
        Command::Runbook(cmd) => jobs_cmd::runbook(cmd, &cli.connect, cli.output).await,
        Command::Jobs(args) => jobs_cmd::jobs(args, &cli.connect, cli.output).await,
        Command::Job(cmd) => jobs_cmd::job(cmd, &cli.connect, cli.output).await,
        Command::History(args) => jobs_cmd::history(args, &cli.connect, cli.output).await,
        Command::Watch { job, quiet_output } => {
            jobs_cmd::watch(job, quiet_output, &cli.connect, cli.output).await
        }
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
        Command::Context(cmd) => context_cmd::run(cmd, &cli.connect, cli.output),
        Command::Completion { shell } => {
            use clap::CommandFactory as _;
            let mut cmd = Cli::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "rollbackctl", &mut script);
            use std::io::Write as _;
            match std::io::stdout().write_all(&script) {
                // `rollbackctl completion bash | head` is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("writing the completion script"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn walk<'a>(cmd: &'a clap::Command, path: String, out: &mut Vec<(String, &'a clap::Command)>) {
        out.push((path.clone(), cmd));
        for sub in cmd.get_subcommands() {
            walk(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every argument of every command says what it is for.
    #[test]
    fn every_argument_has_help() {
        let root = Cli::command();
        let mut all = Vec::new();
        walk(&root, "rollbackctl".into(), &mut all);
        let mut missing = Vec::new();
        for (path, cmd) in &all {
            if cmd.get_about().is_none() && path != "rollbackctl" && !path.ends_with(" help") {
                missing.push(format!("{path} (the command)"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
        }
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
