//! `rollbackctl audit`: the coordinator's audit trail, newest first, filtered by time, actor
//! and job; `rollbackctl audit verify` checks its hash chain from the first record and fails
//! naming the first record that was changed or removed. `--since` is parsed here.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use rollback_common::proto::{AuditRecord, ListAuditRequest, VerifyAuditRequest};
use serde_json::json;

use crate::connect::{self, ConnectFlags};
use crate::error::status_error;
use crate::output::{Output, format_time, human_time};

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "\
Every record names who acted (an operator's identity, agent/HOST for what an agent reported,
coordinator for the engine's own decisions) and carries the hash of the record before it.
Listing needs the approver role; `audit verify` needs operator.

Examples:
    rollbackctl audit --since 1h
    rollbackctl audit --job latest --json
    rollbackctl audit --actor alice --limit 20
    rollbackctl audit verify"
)]
pub struct AuditArgs {
    /// Only records since then: a duration back from now (90s, 15m, 1h, 2d, 1w, 1h30m) or a
    /// unix time in milliseconds.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Only records by this actor: its full name, or the end of it after a `/` (alice,
    /// operator/alice, web-1, coordinator).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Only records about this job: the job's own and its runs' results. Its id, 4 or more
    /// of its first hex digits, or `latest`.
    #[arg(long, value_name = "ID")]
    pub job: Option<String>,
    /// At most this many records, newest first (the coordinator returns at most 1000).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: u32,
    /// Print JSON (the same as --output json).
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<AuditCmd>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Walk the hash chain from the first record: exit 0 when it is intact, 1 naming the first
    /// record that was changed or removed.
    Verify {
        /// Print JSON (the same as --output json).
        #[arg(long)]
        json: bool,
    },
}

/// Milliseconds in one of `--since`'s units.
fn unit_ms(unit: &str) -> Option<i64> {
    Some(match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => return None,
    })
}

/// `--since`: a unix time in milliseconds (digits only), or a duration back from `now_ms`
/// made of NUMBER UNIT parts (`1h30m`); the unix ms it means.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64> {
    let text = text.trim();
    let bad = || {
        anyhow::anyhow!(
            "--since `{text}`: expected a duration back from now such as 90s, 15m, 1h, 2d or 1h30m, a time such as 2026-11-30T22:00:00+01:00, or a unix time in milliseconds"
        )
    };
    if text.is_empty() {
        return Err(bad());
    }
    if text.contains('T') && text.contains('-') {
        return chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| t.timestamp_millis())
            .map_err(|_| bad());
    }
    if text.chars().all(|c| c.is_ascii_digit()) {
        return text.parse().map_err(|_| bad());
    }
    let total = duration_ms(text).ok_or_else(bad)?;
    Ok(now_ms.saturating_sub(total).max(0))
}

/// A duration such as `90s`, `15m`, `1h30m` or `2d`, in milliseconds.
pub fn duration_ms(text: &str) -> Option<i64> {
    let mut total: i64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        if digits == 0 || unit_len == 0 {
            return None;
        }
        let n: i64 = rest[..digits].parse().ok()?;
        let ms = unit_ms(&rest[digits..digits + unit_len])?;
        total = n.checked_mul(ms).and_then(|part| total.checked_add(part))?;
        rest = &rest[digits + unit_len..];
    }
    Some(total)
}

pub async fn run(args: AuditArgs, flags: &ConnectFlags, output: Output) -> Result<()> {
    if let Some(AuditCmd::Verify { json }) = args.command {
        return verify(flags, if json { Output::Json } else { output }).await;
    }
    let output = if args.json { Output::Json } else { output };
    let since_unix_ms = match &args.since {
        Some(text) => parse_since(text, rollback_common::now_unix_ms())?,
        None => 0,
    };
    if args.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let mut client = connect::console(flags).await?;
    let answer = client
        .list_audit(ListAuditRequest {
            since_unix_ms,
            actor: args.actor.clone().unwrap_or_default(),
            job_id: match &args.job {
                Some(given) => crate::jobs_cmd::resolve_id(flags, given).await?,
                None => String::new(),
            },
            limit: args.limit,
        })
        .await
        .map_err(|s| status_error("reading the audit trail", s))?
        .into_inner();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "records": answer.records.iter().map(record_json).collect::<Vec<_>>(),
                "more": answer.more,
            }))?
        ),
        Output::Table => print_table(&answer.records, answer.more),
    }
    Ok(())
}

fn record_json(r: &AuditRecord) -> serde_json::Value {
    json!({
        "seq": r.seq,
        "at": format_time(r.at_unix_ms),
        "at_unix_ms": r.at_unix_ms,
        "actor": r.actor,
        "action": r.action,
        "target": r.target,
        "detail": r.detail,
        "job_id": r.job_id,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

/// At most `max` characters of `text`, with an ellipsis when cut.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn print_table(records: &[AuditRecord], more: bool) {
    if records.is_empty() {
        println!("no audit records match");
        return;
    }
    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|r| {
            [
                r.seq.to_string(),
                human_time(r.at_unix_ms),
                r.actor.clone(),
                r.action.clone(),
                r.target.clone(),
                clip(&r.detail.replace('\n', " "), 100),
            ]
        })
        .collect();
    crate::output::print_columns(
        &["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"],
        &rows,
    );
    if more {
        println!(
            "\nmore records match: narrow with --since, --actor or --job, or raise --limit (at most 1000)"
        );
    }
}

async fn verify(flags: &ConnectFlags, output: Output) -> Result<()> {
    let mut client = connect::console(flags).await?;
    let v = client
        .verify_audit(VerifyAuditRequest {})
        .await
        .map_err(|s| status_error("verifying the audit trail", s))?
        .into_inner();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "ok": v.ok,
                "count": v.count,
                "head_seq": v.head_seq,
                "head_hash": v.head_hash,
                "broken_seq": v.broken_seq,
                "broken_id": v.broken_id,
                "problem": v.problem,
                "message": v.message,
            }))?
        ),
        Output::Table if v.ok => println!(
            "audit chain intact: {} record(s) from genesis; head is record {} ({})",
            v.count, v.head_seq, v.head_hash
        ),
        Output::Table => {}
    }
    if !v.ok {
        bail!(
            "audit chain broken: {} ({} record(s) before it are intact)",
            v.message,
            v.count
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn since_takes_durations_back_from_now_or_unix_ms() {
        assert_eq!(parse_since("90s", NOW).expect("90s"), NOW - 90_000);
        assert_eq!(parse_since("15m", NOW).expect("15m"), NOW - 900_000);
        assert_eq!(parse_since("1h", NOW).expect("1h"), NOW - 3_600_000);
        assert_eq!(parse_since("1h30m", NOW).expect("1h30m"), NOW - 5_400_000);
        assert_eq!(parse_since("2d", NOW).expect("2d"), NOW - 172_800_000);
        assert_eq!(parse_since("1w", NOW).expect("1w"), NOW - 604_800_000);
        assert_eq!(parse_since("250ms", NOW).expect("250ms"), NOW - 250);
        assert_eq!(parse_since(" 1h ", NOW).expect("trimmed"), NOW - 3_600_000);
        assert_eq!(
            parse_since("1699990000000", NOW).expect("unix ms"),
            1_699_990_000_000
        );
        assert_eq!(parse_since("100000w", NOW).expect("before 1970"), 0);
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", NOW).expect("a time"),
            1_700_000_000_000
        );
        assert!(parse_since("2023-11-14T99:00:00Z", NOW).is_err());
    }

    #[test]
    fn since_refuses_what_it_cannot_read() {
        for bad in [
            "",
            "h",
            "1x",
            "-1h",
            "1.5h",
            "1h m",
            "h1",
            "1hh",
            "99999999999999999999s",
            "9223372036854775807w",
        ] {
            let err = parse_since(bad, NOW).expect_err(bad).to_string();
            assert!(err.contains("--since"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_long_detail_is_clipped_in_the_table() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("abcdef", 5), "abcd…");
    }
}
