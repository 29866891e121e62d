//! `rollbackctl guard`: after a deployment, watch the selected hosts against the baseline of
//! the snapshot taken before it, by the runbook's "When to Rollback" criteria, and propose (or
//! with `--auto` start) the rollback when one holds.

use anyhow::{Result, bail};
use clap::Args;
use rollback_common::proto::GuardRequest;

use crate::connect::{self, ConnectFlags};
use crate::error::status_error;
use crate::jobs_cmd::follow_to_end;
use crate::output::Output;

const GUARD_HELP: &str = "\
Criteria (the runbook's \"When to Rollback\", thresholds in the runbook TOML's [guard]):
  critical functionality  /readyz or a [[smoke]] check failing in 3 consecutive samples
                          while the unit runs
  stability               the unit restarted 3 times since the baseline, or not running in
                          3 consecutive samples
  performance             a smoke check's p95 latency up more than 50% (and 20 ms) over the
                          baseline, on the median of the 3 newest samples
  error rate              error-log lines per minute above 3x the baseline and +10/min,
                          judged once the samples span a minute

Each sample costs a host 3 requests per smoke check, one /readyz, one `systemctl show` and
reading what the app log gained since the previous sample.

Exit code 0 when the window ends with no breach (\"deployment healthy\"); 1 on a breach (the
evidence, the diagnosis and the proposed rollback are printed, and with --auto the rollback
was started and is followed with `rollbackctl watch latest`).

Examples (a snapshot before the deployment, then the guard after it):
    rollbackctl snapshot --select role=web --label 'before v2.4'
    rollbackctl guard --select role=web --window 10s --interval 5s --reason 'deploy v2.4'
    rollbackctl guard --select role=web --window 10s --interval 5s --auto --reason 'deploy v2.4'
(in production: --window 30m, the runbook's watch after a deployment)";

/// Watch a deployment by the runbook's criteria.
#[derive(Debug, Args)]
#[command(after_help = GUARD_HELP)]
pub struct GuardArgs {
    /// The hosts to watch (a selector such as role=web; every host has to be in the baseline
    /// snapshot).
    #[arg(long = "select", default_value = "")]
    pub select: String,
    /// How long to watch after the deployment: 30m, 90s, 1h.
    #[arg(long, default_value = "30m")]
    pub window: String,
    /// How often each host is sampled.
    #[arg(long, default_value = "30s")]
    pub interval: String,
    /// The snapshot whose baseline the hosts are judged against (`latest`: each host's newest).
    #[arg(long, default_value = "latest")]
    pub baseline: String,
    /// When a criterion holds, start the proposed rollback (back to the baseline snapshot,
    /// canary first, under the coordinator's approval policy) instead of only proposing it.
    #[arg(long)]
    pub auto: bool,
    /// Which deployment this guards (recorded in the audit trail and the report).
    #[arg(long)]
    pub reason: String,
    /// Hide the samples' output lines.
    #[arg(long)]
    pub quiet_output: bool,
}

fn seconds(flag: &str, text: &str) -> Result<u32> {
    let ms = crate::audit_cmd::duration_ms(text).unwrap_or(-1);
    if ms < 1000 || ms % 1000 != 0 {
        bail!("--{flag} `{text}`: give whole seconds or more, such as 90s, 15m, 1h or 1h30m");
    }
    u32::try_from(ms / 1000).map_err(|_| anyhow::anyhow!("--{flag} `{text}` is too long"))
}

pub async fn guard(args: GuardArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    let req = GuardRequest {
        selector: args.select.clone(),
        window_secs: seconds("window", &args.window)?,
        interval_secs: seconds("interval", &args.interval)?,
        baseline: args.baseline.clone(),
        auto: args.auto,
        reason: args.reason.clone(),
        request_id: String::new(),
    };
    let target = connect::settings(flags)?.target();
    let mut client = connect::console(flags).await?;
    let started = client
        .start_guard(req)
        .await
        .map_err(|s| status_error("starting the deployment guard", s))?
        .into_inner();
    drop(client);
    let intro = format!(
        "guard job {} on {target}: {} host(s), sampled every {} for {}{} (Ctrl-C stops watching, not the guard; `rollbackctl cancel {}` stops it)",
        started.job_id,
        started.plan.as_ref().map_or(0, |p| p.targets.len()),
        args.interval,
        args.window,
        if args.auto {
            "; --auto: a breach starts the rollback"
        } else {
            ""
        },
        started.job_id
    );
    follow_to_end(
        flags,
        &started.job_id,
        output,
        !args.quiet_output,
        &intro,
        None,
    )
    .await
}
