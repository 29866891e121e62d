//! Fleet rollback commands: `runbook show`, `plan`, `rollback`, `jobs`, `job show`, `watch`,
//! `cancel`, `report`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use rollback_common::jobs::{EventKind, JobState, Outcome};
use rollback_common::proto::{
    CancelJobRequest, GetJobRequest, GetReportRequest, GetRunbookRequest, Job, ListJobsRequest,
    PlanResponse, RollbackRequest, WatchJobRequest,
};
use serde_json::json;

use crate::connect::{self, ConnectFlags};
use crate::error::status_error;
use crate::live;
use crate::output::{Output, format_time, human_time, print_columns};
pub(crate) use crate::record::{job_json, plan_json};

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
    rollbackctl rollback --procedure configuration --select role=web --reason 'bad .env in 2026-11-25 deploy'
    rollbackctl rollback --procedure application --revision v2 --select role=web --batch-size 25% --reason '...'
    rollbackctl rollback --procedure database --select role=web --once-on migrator=true --reason '...'
    rollbackctl rollback --to-snapshot latest --select role=web --reason 'back to the pre-deploy snapshot'
Run `rollbackctl plan` with the same flags first to see the exact steps and batches.")]
pub struct RollbackArgs {
    /// Procedure from the runbook: database, database-restore, application, configuration.
    #[arg(
        long,
        required_unless_present = "to_snapshot",
        conflicts_with = "to_snapshot"
    )]
    pub procedure: Option<String>,
    /// Instead of a procedure: bring each host back to its snapshot (`latest` or an id),
    /// composing what `rollbackctl diagnose` finds changed, in a safe order.
    #[arg(long, value_name = "ID|latest")]
    pub to_snapshot: Option<String>,
    /// The last good commit (for `application`).
    #[arg(long)]
    pub revision: Option<String>,
    /// Backup file name in the database host's backup dir (for `database-restore`).
    #[arg(long)]
    pub backup: Option<String>,
    /// Hosts to roll back, e.g. role=web,env=prod.
    #[arg(long)]
    pub select: String,
    /// Why: recorded in the audit trail and the report. Required.
    #[arg(long)]
    pub reason: String,
    /// Hosts in the canary batch (default 1).
    #[arg(long)]
    pub canary: Option<u32>,
    /// Hosts per batch after the canary: a count or a percentage (default 25%).
    #[arg(long)]
    pub batch_size: Option<String>,
    /// Failures at which the job halts: a count or a percentage (default 1).
    #[arg(long)]
    pub max_failures: Option<String>,
    /// Host for `once` phases (database steps), e.g. role=migrator; default: the procedure's.
    #[arg(long)]
    pub once_on: Option<String>,
    /// When a selected host is being rolled back by another job, wait for that job to end
    /// instead of refusing (one job per host).
    #[arg(long)]
    pub wait: bool,
    /// Leave offline hosts out instead of refusing to start (`plan` lists them).
    #[arg(long)]
    pub skip_offline: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// When the job needs a second person's approval, print how to approve it and return
    /// instead of waiting for the decision (the job stays `awaiting_approval`).
    #[arg(long)]
    pub no_wait_approval: bool,
    /// Hide the steps' output lines while following the job (events and the summary stay).
    #[arg(long)]
    pub quiet_output: bool,
}

impl RollbackArgs {
    fn request(&self) -> RollbackRequest {
        let mut values = HashMap::new();
        if let Some(r) = &self.revision {
            values.insert("revision".to_string(), r.clone());
        }
        if let Some(b) = &self.backup {
            values.insert("backup".to_string(), b.clone());
        }
        RollbackRequest {
            procedure: self.procedure.clone().unwrap_or_default(),
            to_snapshot: self.to_snapshot.clone().unwrap_or_default(),
            values,
            selector: self.select.clone(),
            once_on: self.once_on.clone().unwrap_or_default(),
            canary: self.canary,
            batch_size: self.batch_size.clone().unwrap_or_default(),
            max_failures: self.max_failures.clone().unwrap_or_default(),
            reason: self.reason.clone(),
            wait: self.wait,
            skip_offline: self.skip_offline,
            request_id: String::new(),
            pin: false,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RunbookCmd {
    /// Print the runbook the coordinator has loaded (TOML).
    Show,
}

#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// The whole record of a job: hosts, outcomes, every step.
    #[command(after_help = "\
Examples:
    rollbackctl job show latest
    rollbackctl job show latest --output json")]
    Show {
        /// The job: its id, 4 or more of its first hex digits, or `latest` (the newest
        /// rollback).
        job: String,
    },
    /// Continue a halted, cancelled, failed or interrupted job: hosts that did not succeed are
    /// retried from the phase where each stopped, with the job's pinned targets (completed
    /// phases, and a completed database step, never run again). Follows it live.
    #[command(after_help = "\
Example:
    rollbackctl job resume latest --reason 'app2 agent back after OOM kill'")]
    Resume {
        /// The job: its id, 4 or more of its first hex digits, or `latest`.
        job: String,
        /// Why (recorded in the audit trail). Required.
        #[arg(long)]
        reason: String,
        /// Hide the steps' output lines while following the job.
        #[arg(long)]
        quiet_output: bool,
    },
}

pub fn print_plan(p: &PlanResponse) {
    println!("procedure {}: {}", p.procedure, p.description);
    println!("targets ({}): {}", p.targets.len(), p.targets.join(", "));
    if !p.once_host.is_empty() {
        println!("once-host: {}", p.once_host);
    }
    println!("strategy: {}", p.strategy);
    for pin in &p.pins {
        println!("pinned: {} {}", pin.param, pin.note);
    }
    if !p.offline.is_empty() {
        println!(
            "OFFLINE: {} — `rollback` refuses to start unless --skip-offline leaves them out",
            p.offline.join(", ")
        );
    }
    for (i, ph) in p.phases.iter().enumerate() {
        println!("\nphase {} — {} ({})", i + 1, ph.name, ph.scope);
        let show = |indent: &str, s: &rollback_common::proto::Step| {
            let mut params: Vec<String> =
                s.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            params.sort();
            println!("{indent}step {} {}", s.action, params.join(" "));
        };
        for s in &ph.steps {
            show("  ", s);
        }
        for hs in &ph.host_steps {
            println!("  on {}:", hs.host_id);
            for s in &hs.steps {
                show("    ", s);
            }
        }
        for (bi, b) in ph.batches.iter().enumerate() {
            let label = if ph.scope == "once" {
                "host".to_string()
            } else if bi == 0 && ph.batches.len() > 1 {
                "canary".to_string()
            } else {
                format!("batch {}", bi + 1)
            };
            println!("  {label}: {}", b.hosts.join(", "));
        }
    }
}

/// How long `follow` keeps trying to reach a coordinator that went away mid-job.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// How a followed job is shown.
#[derive(Debug, Clone, Copy)]
pub struct Follow {
    /// `None`: quietly (for `--output json`, which prints only the final record).
    pub output: Option<Output>,
    /// Steps' output lines (`--quiet-output` hides them).
    pub show_output: bool,
}

/// Follows a job's events after `after_seq` until it finishes. A dropped stream (the
/// connection cut, the coordinator restarting) is picked up again from the last event seen, so
/// no line is missed or shown twice.
async fn follow(flags: &ConnectFlags, job_id: &str, after_seq: u64, how: Follow) -> Result<()> {
    let mut screen = match how.output {
        Some(Output::Table) => {
            let pinned = std::io::stdout().is_terminal();
            let mut summary = live::Summary::new(0, 0);
            let mut elapsed = std::time::Duration::ZERO;
            if pinned && let Ok(j) = find_job(flags, job_id).await {
                if let Some(p) = &j.plan {
                    summary = live::Summary::new(p.phases.len(), p.targets.len());
                }
                let ms = rollback_common::now_unix_ms().saturating_sub(j.created_at_unix_ms);
                elapsed = std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
            }
            Some(live::Screen::new(pinned, how.show_output, summary, elapsed))
        }
        _ => None,
    };
    let say = |screen: &Option<live::Screen>, line: &str| {
        if let Some(s) = screen {
            s.println(line);
        }
    };
    let mut last = after_seq;
    let mut lost_at: Option<std::time::Instant> = None;
    // Set when a stream ended without the job's end: a second such end with nothing new in
    // between means nobody drives the job now, and the watch stops there.
    let mut ended_early_at: Option<u64> = None;
    loop {
        let attempt = async {
            let mut client = connect::console(flags).await?;
            let stream = client
                .watch_job(WatchJobRequest {
                    job_id: job_id.to_string(),
                    after_seq: last,
                    // Quietly: only the job's own events, for its end (a 10,000-host job's
                    // 50,000 host events are not streamed to be ignored).
                    job_only: how.output.is_none(),
                })
                .await
                .map_err(|s| status_error(&format!("watching job {job_id}"), s))?
                .into_inner();
            anyhow::Ok(stream)
        };
        let mut stream = match attempt.await {
            Ok(s) => s,
            Err(e) if lost_at.is_some_and(|t| t.elapsed() < RECONNECT_FOR) => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if lost_at.take().is_some() {
            say(
                &screen,
                &format!("(reconnected to the coordinator; continuing after event {last})"),
            );
        }
        let mut final_seen = false;
        let ended = loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    last = ev.seq;
                    final_seen = ev.kind == EventKind::JobFinished.as_str();
                    match (&mut screen, how.output) {
                        (Some(screen), _) => screen.event(&ev),
                        (None, Some(Output::Json)) => println!(
                            "{}",
                            json!({"seq": ev.seq, "at": format_time(ev.at_unix_ms), "kind": ev.kind, "host_id": ev.host_id,
                                   "phase": ev.phase, "message": ev.message, "job_state": ev.job_state, "done": ev.done, "total": ev.total})
                        ),
                        _ => {}
                    }
                    let _ = std::io::stdout().flush();
                }
                Ok(None) if final_seen || ended_early_at == Some(last) => break true,
                Ok(None) => {
                    ended_early_at = Some(last);
                    break false;
                }
                // A refusal is final; anything else is the connection going away (the
                // coordinator restarting): reconnect.
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::NotFound
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                            | tonic::Code::InvalidArgument
                            | tonic::Code::FailedPrecondition
                    ) =>
                {
                    return Err(status_error(&format!("watching job {job_id}"), s));
                }
                Err(_) => break false,
            }
        };
        if ended {
            if let Some(s) = &mut screen {
                s.finish();
            }
            return Ok(());
        }
        if ended_early_at != Some(last) && how.output.is_some() {
            let lost = format!(
                "(lost the coordinator while following job {job_id}; the job is kept in its store and resumed when it restarts — reconnecting for up to {}s)",
                RECONNECT_FOR.as_secs()
            );
            // On stderr, as every notice about the connection; above the pinned summary when
            // there is one.
            match &screen {
                Some(s) if s.pinned() => s.println(&lost),
                _ => eprintln!("{lost}"),
            }
        }
        lost_at = Some(std::time::Instant::now());
    }
}

/// The job `given` names (its id, a unique prefix of 4+ hex digits, or `latest`), without
/// its runs: the coordinator resolves it and refuses an ambiguous prefix, naming the jobs.
pub async fn find_job(flags: &ConnectFlags, given: &str) -> Result<Job> {
    let mut client = connect::console(flags).await?;
    let jobs = client
        .list_jobs(ListJobsRequest {
            job: given.to_string(),
            limit: 1,
            ..Default::default()
        })
        .await
        .map_err(|s| status_error(&format!("finding job {given}"), s))?
        .into_inner()
        .jobs;
    jobs.into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no job {given}"))
}

/// The full id of the job `given` names.
pub async fn resolve_id(flags: &ConnectFlags, given: &str) -> Result<String> {
    Ok(find_job(flags, given).await?.job_id)
}

fn print_job(j: &Job) {
    println!(
        "job {} — {} — {}",
        j.job_id,
        j.procedure,
        state_cell(&j.state)
    );
    println!(
        "requested by {} at {}: {}",
        j.requested_by,
        human_time(j.created_at_unix_ms),
        j.reason
    );
    if !j.halt_reason.is_empty() {
        println!("halted: {}", j.halt_reason);
    }
    if let Some(a) = &j.approval {
        match a.decision.as_str() {
            "" => println!(
                "awaiting approval ({}) by an approver other than {}: `rollbackctl approve {} --reason ...`; expires {}",
                a.rule,
                a.requested_by,
                j.job_id,
                human_time(a.expires_at_unix_ms)
            ),
            d => println!(
                "approval ({}): {d} by {} at {}: {}",
                a.rule,
                a.decided_by,
                human_time(a.decided_at_unix_ms),
                a.reason
            ),
        }
    }
    if let Some(plan) = &j.plan {
        for pin in &plan.pins {
            println!("pinned: {} {}", pin.param, pin.note);
        }
    }
    if j.history
        .iter()
        .filter(|h| h.contains(" job.resumed "))
        .count()
        > 0
    {
        for h in j.history.iter().filter(|h| h.contains(" job.resumed ")) {
            let (at, rest) = h.split_once(' ').unwrap_or((h, ""));
            println!("{} {rest}", human_time(at.parse().unwrap_or(0)));
        }
    }
    let rows: Vec<[String; 5]> = j
        .hosts
        .iter()
        .map(|h| {
            [
                format!(
                    "{}{}",
                    h.host_id,
                    if h.once_only { " (once-host)" } else { "" }
                ),
                outcome_cell(&h.outcome),
                h.phase.clone(),
                if h.failed_step.is_empty() {
                    String::new()
                } else {
                    format!("{} (exit {})", h.failed_step, h.exit_code)
                },
                h.detail.chars().take(100).collect(),
            ]
        })
        .collect();
    println!();
    print_columns(
        &["HOST", "OUTCOME", "PHASE", "FAILED STEP", "DETAIL"],
        &rows,
    );
    for h in j.hosts.iter().filter(|h| !h.failed_step.is_empty()) {
        let failing = h
            .runs
            .iter()
            .filter_map(|r| r.result.as_ref())
            .flat_map(|r| r.steps.iter())
            .find(|s| s.action == h.failed_step && !s.error.is_empty());
        if let Some(s) = failing {
            let text = String::from_utf8_lossy(&s.output_tail);
            let lines: Vec<&str> = text.lines().collect();
            println!("\n{} {} output (last lines):", h.host_id, s.action);
            for l in &lines[lines.len().saturating_sub(10)..] {
                println!("  | {l}");
            }
        }
    }
}

async fn get_job(flags: &ConnectFlags, job_id: &str) -> Result<Job> {
    let mut client = connect::console(flags).await?;
    Ok(client
        .get_job(GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(|s| status_error(&format!("reading job {job_id}"), s))?
        .into_inner())
}

/// Exit status for a finished job: success only when every targeted host succeeded.
fn job_result(j: &Job) -> Result<()> {
    if j.state == JobState::Succeeded.as_str() {
        return Ok(());
    }
    let failed: Vec<String> = j
        .hosts
        .iter()
        .filter(|h| h.outcome != Outcome::Succeeded.as_str())
        .map(|h| format!("{} {}", h.host_id, h.outcome))
        .collect();
    bail!(
        "job {} {}{}: {}",
        j.job_id,
        j.state,
        if j.halt_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", j.halt_reason)
        },
        failed.join(", ")
    )
}

pub async fn rollback(args: RollbackArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    let req = args.request();
    let target = connect::settings(flags)?.target();
    let what = |plan: &PlanResponse| {
        format!(
            "roll back {} host(s) with `{}` on {target}",
            plan.targets.len(),
            plan.procedure
        )
    };
    // Asked first: the plan is previewed, then confirmed. With --yes nothing is asked, and the
    // plan shown is the one the start made (the coordinator plans once, not twice).
    if !args.yes {
        let mut client = connect::console(flags).await?;
        let plan = client
            .plan(req.clone())
            .await
            .map_err(|s| status_error("planning the rollback", s))?
            .into_inner();
        if output == Output::Table {
            print_plan(&plan);
            println!();
        }
        let what = what(&plan);
        if !std::io::stdin().is_terminal() {
            bail!("refusing to {what} without confirmation: pass --yes (stdin is not a terminal)");
        }
        // On stderr: stdout stays the command's output (e.g. `--output json`).
        eprint!("{what}? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("not started");
        }
    }
    let started = start_once(flags, req, output).await?;
    if args.yes
        && output == Output::Table
        && let Some(plan) = &started.plan
    {
        print_plan(plan);
        println!();
        eprintln!("{} (--yes: not asking)", what(plan));
    }
    // Whether it waits for approval comes with the start; a coordinator that predates that
    // is asked for the job.
    let (approval, first) = if started.approval_reported {
        (started.approval.clone(), None)
    } else {
        let job = get_job(flags, &started.job_id).await?;
        (job.approval.clone(), Some(job))
    };
    if let Some(a) = approval.as_ref().filter(|a| a.decision.is_empty()) {
        let msg = format!(
            "job {} needs approval ({}): nothing runs until an approver other than you runs\n  rollbackctl approve {} --reason '...'\n(it expires {}; `rollbackctl deny {}` or `rollbackctl cancel {}` ends it)",
            started.job_id,
            a.rule,
            started.job_id,
            human_time(a.expires_at_unix_ms),
            started.job_id,
            started.job_id
        );
        if args.no_wait_approval {
            match output {
                Output::Table => println!("{msg}"),
                Output::Json => {
                    let job = match first {
                        Some(job) => job,
                        None => get_job(flags, &started.job_id).await?,
                    };
                    println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
                }
            }
            return Ok(());
        }
        eprintln!("{msg}\nwaiting for the decision (Ctrl-C stops waiting, not the job)");
    }
    let intro = format!(
        "job {} persisted; following it (Ctrl-C stops watching, not the job; `rollbackctl cancel {}` stops it)",
        started.job_id, started.job_id
    );
    let footer = format!("report: rollbackctl report {}", started.job_id);
    follow_to_end(
        flags,
        &started.job_id,
        output,
        !args.quiet_output,
        &intro,
        Some(&footer),
    )
    .await
}

/// Follows a job just started to its end — live on a table after `intro`, quietly for JSON —
/// then prints its record (and `footer` under the table); Ok only when it succeeded.
pub(crate) async fn follow_to_end(
    flags: &ConnectFlags,
    job_id: &str,
    output: Output,
    show_output: bool,
    intro: &str,
    footer: Option<&str>,
) -> Result<()> {
    if output == Output::Table {
        println!("{intro}\n");
        let how = Follow {
            output: Some(output),
            show_output,
        };
        follow(flags, job_id, 0, how).await?;
    } else {
        // Wait for the end quietly, then print the whole record.
        follow_quietly(flags, job_id, 0).await?;
    }
    let job = get_job(flags, job_id).await?;
    match output {
        Output::Table => {
            println!();
            print_job(&job);
            if let Some(footer) = footer {
                println!("\n{footer}");
            }
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&job))?),
    }
    job_result(&job)
}

/// Starts the rollback exactly once, whatever happens to the connection: the request carries
/// a fresh idempotency key, and a start whose connection broke (the coordinator restarting) is
/// sent again with the same key for up to `RECONNECT_FOR`; the coordinator answers a repeat
/// with the job the first one made.
async fn start_once(
    flags: &ConnectFlags,
    mut req: RollbackRequest,
    output: Output,
) -> Result<rollback_common::proto::StartRollbackResponse> {
    use rand::Rng;
    let mut rng = rand::rng();
    req.request_id = format!("{:016x}{:016x}", rng.random::<u64>(), rng.random::<u64>());
    let mut lost_at: Option<std::time::Instant> = None;
    loop {
        let attempt = async {
            let mut client = connect::console(flags).await?;
            client
                .start_rollback(req.clone())
                .await
                .map_err(|s| status_error("starting the rollback", s))
        };
        match attempt.await {
            Ok(r) => return Ok(r.into_inner()),
            Err(e) => {
                // Before the first break, only a broken call is retried (a coordinator that
                // was never reachable is reported at once); after it, reconnecting is too.
                let retriable = match crate::error::connection_broke(&e) {
                    Some(true) => true,
                    Some(false) => lost_at.is_some(),
                    None => false,
                };
                let within = lost_at.is_none_or(|t| t.elapsed() < RECONNECT_FOR);
                if !retriable || !within {
                    return Err(e);
                }
                if lost_at.is_none() && output == Output::Table {
                    eprintln!(
                        "(lost the coordinator while starting the rollback; sending the same request again — it cannot start twice)"
                    );
                }
                lost_at.get_or_insert_with(std::time::Instant::now);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

pub async fn plan(args: RollbackArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    let mut client = connect::console(flags).await?;
    let plan = client
        .plan(args.request())
        .await
        .map_err(|s| status_error("planning the rollback", s))?
        .into_inner();
    match output {
        Output::Table => {
            print_plan(&plan);
            println!("\n(dry run: nothing was started)");
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&plan_json(&plan))?),
    }
    Ok(())
}

pub async fn runbook(cmd: RunbookCmd, flags: &ConnectFlags, output: Output) -> Result<()> {
    let RunbookCmd::Show = cmd;
    let mut client = connect::console(flags).await?;
    let rb = client
        .get_runbook(GetRunbookRequest {})
        .await
        .map_err(|s| status_error("reading the runbook", s))?
        .into_inner();
    match output {
        Output::Table => println!("# runbook: {}\n{}", rb.source, rb.toml),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({"source": rb.source, "toml": rb.toml}))?
        ),
    }
    Ok(())
}

/// `rollbackctl jobs`: which jobs to list.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
    rollbackctl jobs
    rollbackctl jobs --state halted
    rollbackctl jobs --procedure database --since 24h
    rollbackctl jobs --kind all --limit 5")]
pub struct JobsArgs {
    /// How many (newest first).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Only jobs in this state: running, succeeded, failed, halted, cancelled, interrupted,
    /// awaiting_approval, denied, expired.
    #[arg(long)]
    pub state: Option<String>,
    /// Only jobs of this runbook procedure, e.g. database.
    #[arg(long)]
    pub procedure: Option<String>,
    /// Only jobs that targeted this host.
    #[arg(long)]
    pub host: Option<String>,
    /// Only jobs started within this long (30m, 24h, 7d) or since this time
    /// (2026-11-30T22:00:00+01:00).
    #[arg(long, value_name = "AGE|TIME")]
    pub since: Option<String>,
    /// Which jobs: rollbacks (default), the snapshot and diagnose jobs `snapshot` and
    /// `rollback --to-snapshot` run, or all of them.
    #[arg(long, value_enum, default_value_t = Kind::Rollback)]
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Rollback jobs (every runbook procedure, and `--to-snapshot`).
    Rollback,
    /// `rollbackctl snapshot` jobs.
    Snapshot,
    /// The diagnose jobs of `rollbackctl diagnose` and `rollback --to-snapshot`.
    Diagnose,
    /// `rollbackctl guard` jobs (deployment guards).
    Guard,
    /// Every job.
    All,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Rollback => "rollback",
            Kind::Snapshot => "snapshot",
            Kind::Diagnose => "diagnose",
            Kind::Guard => "guard",
            Kind::All => "all",
        }
    }
}

async fn list_jobs(flags: &ConnectFlags, req: ListJobsRequest) -> Result<Vec<Job>> {
    let mut client = connect::console(flags).await?;
    Ok(client
        .list_jobs(req)
        .await
        .map_err(|s| status_error("listing jobs", s))?
        .into_inner()
        .jobs)
}

fn outcome_cell(outcome: &str) -> String {
    use crate::output::{Paint, paint};
    match outcome.parse::<Outcome>() {
        Ok(Outcome::Succeeded) => paint(Paint::Good, outcome),
        Ok(o) if o.is_failure() => paint(Paint::Bad, outcome),
        Ok(_) => paint(Paint::Warn, outcome),
        Err(_) => outcome.to_string(),
    }
}

fn state_cell(state: &str) -> String {
    use crate::output::{Paint, paint};
    match state.parse::<JobState>() {
        Ok(JobState::Succeeded) => paint(Paint::Good, state),
        Ok(JobState::Running | JobState::AwaitingApproval) => paint(Paint::Warn, state),
        Ok(_) => paint(Paint::Bad, state),
        Err(_) => state.to_string(),
    }
}

pub async fn jobs(args: JobsArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    let since_unix_ms = match &args.since {
        Some(s) => crate::audit_cmd::parse_since(s, rollback_common::now_unix_ms())?,
        None => 0,
    };
    let jobs = list_jobs(
        flags,
        ListJobsRequest {
            limit: args.limit,
            state: args.state.clone().unwrap_or_default(),
            procedure: args.procedure.clone().unwrap_or_default(),
            host_id: args.host.clone().unwrap_or_default(),
            since_unix_ms,
            kind: args.kind.as_str().to_string(),
            job: String::new(),
        },
    )
    .await?;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&jobs.iter().map(job_json).collect::<Vec<_>>())?
        ),
        Output::Table => {
            if jobs.is_empty() {
                let filtered = args.state.is_some()
                    || args.procedure.is_some()
                    || args.host.is_some()
                    || args.since.is_some();
                println!(
                    "{}",
                    if filtered {
                        "no job matches these filters"
                    } else if args.kind == Kind::Rollback {
                        "no rollback jobs yet (`--kind all` lists snapshot and diagnose jobs too)"
                    } else {
                        "no jobs yet"
                    }
                );
                return Ok(());
            }
            let rows: Vec<[String; 6]> = jobs
                .iter()
                .map(|j| {
                    let ok = j
                        .hosts
                        .iter()
                        .filter(|h| h.outcome == Outcome::Succeeded.as_str())
                        .count();
                    [
                        j.job_id.clone(),
                        j.procedure.clone(),
                        state_cell(&j.state),
                        format!("{ok}/{}", j.hosts.len()),
                        human_time(j.created_at_unix_ms),
                        j.reason.chars().take(50).collect(),
                    ]
                })
                .collect();
            print_columns(
                &["JOB", "PROCEDURE", "STATE", "OK", "STARTED", "REASON"],
                &rows,
            );
        }
    }
    Ok(())
}

/// `rollbackctl history HOST`: the host's jobs, newest first, with what each changed on it.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
    rollbackctl history app1
    rollbackctl history app1 --kind all --limit 50")]
pub struct HistoryArgs {
    /// The host, as `rollbackctl agents` lists it.
    pub host: String,
    /// How many jobs (newest first).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Which jobs: rollbacks (default), snapshot, diagnose or all.
    #[arg(long, value_enum, default_value_t = Kind::Rollback)]
    pub kind: Kind,
}

/// What one job changed on `host`: each pinned target as `param before → after`.
fn host_change(j: &Job, host: &str) -> String {
    let Some(plan) = &j.plan else {
        return String::new();
    };
    plan.pins
        .iter()
        .map(|p| {
            let before = p.from_by_host.get(host).map(String::as_str).unwrap_or("?");
            let short = |v: &str| v.chars().take(12).collect::<String>();
            format!("{} {} → {}", p.param, short(before), short(&p.to))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub async fn history(args: HistoryArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    rollback_common::identity::validate_name("host id", &args.host)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let jobs = list_jobs(
        flags,
        ListJobsRequest {
            limit: args.limit,
            host_id: args.host.clone(),
            kind: args.kind.as_str().to_string(),
            ..Default::default()
        },
    )
    .await?;
    let mine = |j: &Job| j.hosts.iter().find(|h| h.host_id == args.host).cloned();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &jobs
                    .iter()
                    .map(|j| {
                        let h = mine(j).unwrap_or_default();
                        json!({
                            "job_id": j.job_id,
                            "procedure": j.procedure,
                            "state": j.state,
                            "created_at": format_time(j.created_at_unix_ms),
                            "created_at_unix_ms": j.created_at_unix_ms,
                            "reason": j.reason,
                            "outcome": h.outcome,
                            "phase": h.phase,
                            "detail": h.detail,
                            "pins": j.plan.as_ref().map(|p| p.pins.iter().map(|pin| json!({
                                "param": pin.param,
                                "before": pin.from_by_host.get(&args.host),
                                "after": pin.to,
                            })).collect::<Vec<_>>()).unwrap_or_default(),
                        })
                    })
                    .collect::<Vec<_>>()
            )?
        ),
        Output::Table => {
            if jobs.is_empty() {
                println!(
                    "no {} job targeted {} (`rollbackctl agents` lists hosts)",
                    if args.kind == Kind::All {
                        ""
                    } else {
                        args.kind.as_str()
                    },
                    args.host
                );
                return Ok(());
            }
            let rows: Vec<[String; 6]> = jobs
                .iter()
                .map(|j| {
                    let h = mine(j).unwrap_or_default();
                    [
                        human_time(j.created_at_unix_ms),
                        j.job_id.clone(),
                        j.procedure.clone(),
                        outcome_cell(&h.outcome),
                        host_change(j, &args.host),
                        j.reason.chars().take(40).collect(),
                    ]
                })
                .collect();
            print_columns(
                &[
                    "STARTED",
                    "JOB",
                    "PROCEDURE",
                    "OUTCOME",
                    "CHANGED (BEFORE → AFTER)",
                    "REASON",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

/// Waits for a job to end without printing its events (for `--output json`: only the final
/// record is printed).
async fn follow_quietly(flags: &ConnectFlags, job_id: &str, after_seq: u64) -> Result<()> {
    let how = Follow {
        output: None,
        show_output: false,
    };
    follow(flags, job_id, after_seq, how).await
}

pub async fn job(cmd: JobCmd, flags: &ConnectFlags, output: Output) -> Result<()> {
    match cmd {
        JobCmd::Show { job } => {
            let id = resolve_id(flags, &job).await?;
            let j = get_job(flags, &id).await?;
            match output {
                Output::Table => print_job(&j),
                Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&j))?),
            }
            Ok(())
        }
        JobCmd::Resume {
            job,
            reason,
            quiet_output,
        } => {
            let id = resolve_id(flags, &job).await?;
            resume(&id, reason, quiet_output, flags, output).await
        }
    }
}

async fn resume(
    job: &str,
    reason: String,
    quiet_output: bool,
    flags: &ConnectFlags,
    output: Output,
) -> Result<()> {
    if output == Output::Table {
        eprintln!(
            "resuming job {job} on {}",
            connect::settings(flags)?.target()
        );
    }
    let mut client = connect::console(flags).await?;
    let resumed = client
        .resume_job(rollback_common::proto::ResumeJobRequest {
            job_id: job.to_string(),
            reason,
        })
        .await
        .map_err(|s| status_error(&format!("resuming job {job}"), s))?
        .into_inner();
    let after = resumed.resumed_at_seq.saturating_sub(1);
    if output == Output::Table {
        println!(
            "job {job} resumed: retrying {}; following it\n",
            resumed.hosts.join(", ")
        );
        let how = Follow {
            output: Some(output),
            show_output: !quiet_output,
        };
        follow(flags, job, after, how).await?;
    } else {
        follow_quietly(flags, job, after).await?;
    }
    let j = get_job(flags, job).await?;
    match output {
        Output::Table => {
            println!();
            print_job(&j);
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&j))?),
    }
    job_result(&j)
}

pub async fn watch(
    job: String,
    quiet_output: bool,
    flags: &ConnectFlags,
    output: Output,
) -> Result<()> {
    let id = resolve_id(flags, &job).await?;
    if output == Output::Table && id != job {
        println!("job {id}");
    }
    let how = Follow {
        output: Some(output),
        show_output: !quiet_output,
    };
    follow(flags, &id, 0, how).await?;
    let j = get_job(flags, &id).await?;
    if output == Output::Table {
        println!();
        print_job(&j);
    }
    job_result(&j)
}

pub async fn cancel(
    job: String,
    reason: String,
    flags: &ConnectFlags,
    output: Output,
) -> Result<()> {
    let job = resolve_id(flags, &job).await?;
    if output == Output::Table {
        eprintln!(
            "cancelling job {job} on {}",
            connect::settings(flags)?.target()
        );
    }
    let mut client = connect::console(flags).await?;
    let resp = client
        .cancel_job(CancelJobRequest {
            job_id: job.clone(),
            reason,
        })
        .await
        .map_err(|s| status_error(&format!("cancelling job {job}"), s))?
        .into_inner();
    match output {
        Output::Table => println!(
            "job {job}: {} (running steps are being stopped; `rollbackctl watch {job}` follows it)",
            resp.state
        ),
        Output::Json => println!("{}", json!({"job_id": job, "state": resp.state})),
    }
    Ok(())
}

/// `rollbackctl approve|deny JOB --reason`.
pub async fn decide(
    job: String,
    reason: String,
    approve: bool,
    flags: &ConnectFlags,
    output: Output,
) -> Result<()> {
    let job = resolve_id(flags, &job).await?;
    if output == Output::Table {
        eprintln!(
            "{} job {job} on {}",
            if approve { "approving" } else { "denying" },
            connect::settings(flags)?.target()
        );
    }
    let mut client = connect::console(flags).await?;
    let state = if approve {
        client
            .approve_job(rollback_common::proto::ApproveJobRequest {
                job_id: job.clone(),
                reason,
            })
            .await
            .map_err(|s| status_error(&format!("approving job {job}"), s))?
            .into_inner()
            .state
    } else {
        client
            .deny_job(rollback_common::proto::DenyJobRequest {
                job_id: job.clone(),
                reason,
            })
            .await
            .map_err(|s| status_error(&format!("denying job {job}"), s))?
            .into_inner()
            .state
    };
    match output {
        Output::Table if approve => {
            println!("job {job} approved and {state}: `rollbackctl watch {job}` follows it")
        }
        Output::Table => println!("job {job} {state}: nothing of it ran; its hosts are free"),
        Output::Json => println!("{}", json!({"job_id": job, "state": state})),
    }
    Ok(())
}

pub async fn report(job: String, flags: &ConnectFlags, output: Output) -> Result<()> {
    let job = resolve_id(flags, &job).await?;
    let mut client = connect::console(flags).await?;
    let md = client
        .get_report(GetReportRequest {
            job_id: job.clone(),
        })
        .await
        .map_err(|s| status_error(&format!("report for job {job}"), s))?
        .into_inner()
        .markdown;
    match output {
        Output::Table => print!("{md}"),
        Output::Json => println!("{}", json!({"job_id": job, "markdown": md})),
    }
    Ok(())
}
