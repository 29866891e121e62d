//! Last known good: `rollbackctl snapshot`, `snapshots` and `diagnose`.

use anyhow::{Result, bail};
use clap::Args;
use rollback_common::proto::{
    DiagnoseRequest, HostSnapshotInfo, ListSnapshotsRequest, SnapshotRequest,
};
use serde_json::json;

use crate::connect::{self, ConnectFlags};
use crate::error::status_error;
use crate::output::{Output, format_time, human_time, print_columns};

#[derive(Debug, Args)]
#[command(after_help = "\
Take one before every deployment:
    rollbackctl snapshot --select role=web --label 'before 2026-11-25 deploy'
    rollbackctl snapshot --select role=web --label 'before deploy' --db-backup --once-on role=db")]
pub struct SnapshotArgs {
    /// Hosts that record their state, e.g. role=web.
    #[arg(long)]
    pub select: String,
    /// What this snapshot is (shown in listings and diagnoses).
    #[arg(long)]
    pub label: String,
    /// Also take a pg_dump -Fc on one host and verify it with pg_restore --list.
    #[arg(long)]
    pub db_backup: bool,
    /// The host for --db-backup (default role=db).
    #[arg(long, requires = "db_backup")]
    pub once_on: Option<String>,
}

pub(crate) fn snap_json(s: &HostSnapshotInfo) -> serde_json::Value {
    json!({
        "snapshot_id": s.snapshot_id, "host_id": s.host_id, "label": s.label,
        "taken_at": format_time(s.taken_at_unix_ms), "git_sha": s.git_sha, "git_subject": s.git_subject,
        "alembic_revision": s.alembic_revision, "env_sha256": s.env_sha256, "unit_state": s.unit_state,
        "db_backup": s.db_backup, "job_id": s.job_id,
        "baseline": {
            "smoke": s.smoke.iter().map(|b| json!({"check": b.check, "p50_ms": b.p50_ms, "p95_ms": b.p95_ms, "ok": b.ok})).collect::<Vec<_>>(),
            "error_lines_per_min": s.error_lines_per_min,
            "restarts": (s.restarts >= 0).then_some(s.restarts),
        },
    })
}

/// The guard's baseline in one cell: each smoke check's p95, the error rate, restarts.
fn baseline_cell(s: &HostSnapshotInfo) -> String {
    let mut parts: Vec<String> = s
        .smoke
        .iter()
        .map(|b| {
            format!(
                "{} p95 {:.0}ms{}",
                b.check,
                b.p95_ms,
                if b.ok { "" } else { " FAILING" }
            )
        })
        .collect();
    parts.push(format!("{:.1} err/min", s.error_lines_per_min));
    if s.restarts >= 0 {
        parts.push(format!("{} restarts", s.restarts));
    }
    parts.join(", ")
}

fn print_snapshots(list: &[HostSnapshotInfo]) {
    let rows: Vec<[String; 8]> = list
        .iter()
        .map(|s| {
            [
                s.snapshot_id.clone(),
                s.host_id.clone(),
                human_time(s.taken_at_unix_ms),
                format!(
                    "{} {}",
                    s.git_sha.chars().take(10).collect::<String>(),
                    s.git_subject.chars().take(30).collect::<String>()
                ),
                if s.alembic_revision.is_empty() {
                    "-".into()
                } else {
                    s.alembic_revision.clone()
                },
                s.env_sha256.chars().take(10).collect(),
                if s.db_backup.is_empty() {
                    s.label.clone()
                } else {
                    format!("{} (backup {})", s.label, s.db_backup)
                },
                baseline_cell(s),
            ]
        })
        .collect();
    print_columns(
        &[
            "SNAPSHOT",
            "HOST",
            "TAKEN",
            "GIT",
            "ALEMBIC",
            "ENV SHA256",
            "LABEL",
            "BASELINE",
        ],
        &rows,
    );
}

pub async fn snapshot(args: SnapshotArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    let mut client = connect::console(flags).await?;
    let resp = client
        .snapshot(SnapshotRequest {
            selector: args.select.clone(),
            label: args.label.clone(),
            db_backup: args.db_backup,
            once_on: args.once_on.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| status_error("taking the snapshot", s))?
        .into_inner();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "snapshot_id": resp.snapshot_id, "job_id": resp.job_id, "state": resp.state,
                "hosts": resp.hosts.iter().map(snap_json).collect::<Vec<_>>(),
                "failures": resp.failures.iter().map(|h| json!({"host_id": h.host_id, "outcome": h.outcome, "detail": h.detail})).collect::<Vec<_>>(),
            }))?
        ),
        Output::Table => {
            println!(
                "snapshot {} ({}) — job {}: {}\n",
                resp.snapshot_id, args.label, resp.job_id, resp.state
            );
            print_snapshots(&resp.hosts);
            for f in &resp.failures {
                println!("✗ {} {}: {}", f.host_id, f.outcome, f.detail);
            }
        }
    }
    if !resp.failures.is_empty() {
        bail!(
            "snapshot {}: {} host(s) did not record their state",
            resp.snapshot_id,
            resp.failures.len()
        );
    }
    Ok(())
}

pub async fn snapshots(select: String, flags: &ConnectFlags, output: Output) -> Result<()> {
    let mut client = connect::console(flags).await?;
    let list = client
        .list_snapshots(ListSnapshotsRequest { selector: select })
        .await
        .map_err(|s| status_error("listing snapshots", s))?
        .into_inner()
        .snapshots;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&list.iter().map(snap_json).collect::<Vec<_>>())?
        ),
        Output::Table if list.is_empty() => println!(
            "no snapshots yet: take one with `rollbackctl snapshot --select ... --label ...`"
        ),
        Output::Table => print_snapshots(&list),
    }
    Ok(())
}

/// A diagnosis as `--output json` prints it (and the web console shows it).
pub(crate) fn diagnose_json(resp: &rollback_common::proto::DiagnoseResponse) -> serde_json::Value {
    json!({
        "job_id": resp.job_id,
        "command": resp.command,
        "hosts": resp.hosts.iter().map(|h| json!({
            "host_id": h.host_id, "snapshot_id": h.snapshot_id,
            "changes": h.changes.iter().map(|c| json!({"what": c.what, "old": c.old, "new": c.new})).collect::<Vec<_>>(),
            "readyz_status": h.readyz_status, "readyz_body": h.readyz_body,
            "procedures": h.procedures, "command": h.command, "note": h.note,
        })).collect::<Vec<_>>(),
    })
}

pub async fn diagnose(select: String, flags: &ConnectFlags, output: Output) -> Result<()> {
    let mut client = connect::console(flags).await?;
    let resp = client
        .diagnose(DiagnoseRequest { selector: select })
        .await
        .map_err(|s| status_error("diagnosing", s))?
        .into_inner();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&diagnose_json(&resp))?),
        Output::Table => {
            for h in &resp.hosts {
                let verdict = if h.procedures.is_empty() {
                    "no rollback needed".to_string()
                } else {
                    h.procedures.join(" + ")
                };
                println!(
                    "{} — {} (snapshot {}, /readyz {})",
                    h.host_id,
                    verdict,
                    if h.snapshot_id.is_empty() {
                        "none"
                    } else {
                        &h.snapshot_id
                    },
                    h.readyz_status
                );
                for c in &h.changes {
                    println!(
                        "    {:<7} {} → {}",
                        c.what,
                        if c.old.is_empty() { "(base)" } else { &c.old },
                        if c.new.is_empty() { "(base)" } else { &c.new }
                    );
                }
                if !h.note.is_empty() {
                    println!("    {}", h.note);
                }
                if !h.readyz_body.is_empty() && h.readyz_status != "200" {
                    println!("    /readyz says: {}", h.readyz_body);
                }
                if !h.command.is_empty() {
                    println!("    run: {}", h.command);
                }
            }
            if !resp.command.is_empty() {
                println!("\nto roll back every host above:\n    {}", resp.command);
            }
        }
    }
    Ok(())
}
