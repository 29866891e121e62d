//! What the deployment guard measures on a host, and the baseline `snapshot.take` records:
//! the `[[smoke]]` checks (pass/fail and latency), `/readyz`, the unit's state and restart
//! count (`NRestarts`), and the error lines the app log gained since a given offset.
//! `guard.sample {log_offset, rounds}` is one sample; it only reads, never fails on what it
//! finds (the coordinator judges it against the baseline) and fails only when it cannot
//! measure at all. Its cost is bounded: `rounds` requests per smoke check, one `/readyz`, one
//! `systemctl show`, and at most [`MAX_LOG_BYTES`] of log read.

use std::io::Seek;
use std::time::{Duration, Instant};

use rollback_common::jobs::fact;

use super::logscan::{MAX_LINE, default_patterns, read_line_capped};
use super::smoke::{self, CheckResult};
use super::{Failure, StepCtx, Symlinks};

/// Log bytes one sample reads at most; the rest is skipped (and the offset moves past it).
pub const MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// Most smoke rounds one sample may ask for.
pub const MAX_ROUNDS: u32 = 20;

/// Error lines (the default log patterns) from `offset` to the end of the log, and the offset
/// the next sample starts from. A log that shrank (rotated) is read from its start.
pub fn count_errors(path: &std::path::Path, offset: u64) -> std::io::Result<(u64, u64)> {
    let file = match super::file::open_regular(path, Symlinks::Refuse) {
        Ok(f) => f,
        Err(e) if e.is_missing() => return Ok((0, 0)),
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    let len = file.metadata()?.len();
    let start = if len < offset { 0 } else { offset };
    // Only the newest MAX_LOG_BYTES are read when more was written since.
    let start = start.max(len.saturating_sub(MAX_LOG_BYTES));
    let mut reader = std::io::BufReader::new(file);
    reader.seek(std::io::SeekFrom::Start(start))?;
    let patterns = default_patterns();
    let (mut errors, mut read) = (0u64, 0u64);
    let mut buf = Vec::new();
    while read < len - start {
        buf.clear();
        let (n, _) = read_line_capped(&mut reader, &mut buf, MAX_LINE)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        let line = String::from_utf8_lossy(&buf);
        if patterns.iter().any(|p| line.contains(p.as_str())) {
            errors += 1;
        }
    }
    Ok((errors, start + read))
}

/// `systemctl show -p NRestarts --value UNIT`: how often systemd restarted the unit.
async fn restarts(ctx: &mut StepCtx<'_>) -> Option<u64> {
    let svc = ctx.config.service.clone()?;
    let probe = ctx.spec(&svc.systemctl, std::path::Path::new("/")).args([
        "show",
        "--property=NRestarts",
        "--value",
        "--",
        &svc.unit,
    ]);
    let out = ctx.run(&probe).await.ok()?;
    out.output_text().lines().last()?.trim().parse().ok()
}

/// One measurement; its facts are what the coordinator reads.
pub(super) async fn measure(
    ctx: &mut StepCtx<'_>,
    rounds: u32,
    log_offset: Option<u64>,
    min_window: Duration,
) -> Result<Vec<CheckResult>, Failure> {
    let began = Instant::now();
    ctx.fact(
        fact::SAMPLED_AT_MS,
        rollback_common::now_unix_ms().to_string(),
    );
    let log = ctx.config.app.as_ref().and_then(|a| a.log_file.clone());
    let from = match (&log, log_offset) {
        (Some(path), None) => super::logscan::log_size(path),
        (_, Some(o)) => o,
        (None, None) => 0,
    };
    let checks = ctx.config.smoke.clone();
    let base = ctx
        .config
        .app
        .as_ref()
        .and_then(|a| a.health_base_url.clone());
    let mut results = Vec::new();
    if let Some(base) = &base {
        let stop = ctx.cancel.child_token();
        if !checks.is_empty() {
            results = smoke::sample(&checks, base, rounds, &stop)
                .await
                .map_err(|e| Failure::new(-1, e))?;
        }
        let readyz = match crate::profile::valid_health_base(base) {
            Ok((host, port)) => {
                match super::http::get(&host, port, "/readyz", Duration::from_secs(3)).await {
                    Ok((code, _)) => code.to_string(),
                    Err(e) => format!("none ({e})"),
                }
            }
            Err(e) => format!("none ({e})"),
        };
        ctx.fact(fact::READYZ_STATUS, readyz);
    }
    if let Some(svc) = ctx.config.service.clone()
        && let Ok(state) = super::service::active_state(&svc, ctx).await
    {
        ctx.fact(fact::UNIT_STATE, state);
    }
    if let Some(n) = restarts(ctx).await {
        ctx.fact(fact::RESTARTS, n.to_string());
    }
    if let Some(rest) = min_window.checked_sub(began.elapsed()) {
        tokio::select! {
            () = tokio::time::sleep(rest) => {}
            () = ctx.cancel.cancelled() => {}
        }
    }
    if let Some(path) = log {
        let counted = tokio::task::spawn_blocking(move || count_errors(&path, from)).await;
        match counted {
            Ok(Ok((errors, end))) => {
                ctx.fact(fact::ERROR_LINES, errors.to_string());
                ctx.fact(fact::LOG_OFFSET, end.to_string());
            }
            Ok(Err(e)) => ctx.fact("log_error", e.to_string()),
            Err(e) => ctx.fact("log_error", e.to_string()),
        }
    }
    ctx.fact(fact::WINDOW_MS, began.elapsed().as_millis().to_string());
    for (k, v) in smoke::facts(&results) {
        ctx.fact(&k, v);
    }
    Ok(results)
}

pub(super) async fn sample(
    rounds: u32,
    log_offset: Option<u64>,
    ctx: &mut StepCtx<'_>,
) -> Result<(), Failure> {
    let results = measure(ctx, rounds, log_offset, Duration::ZERO).await?;
    let mut line = String::from("sample:");
    for r in &results {
        line.push_str(&format!(
            " {} {} p95 {:.0} ms;",
            r.name,
            if r.ok() { "ok" } else { "FAILED" },
            r.p95()
        ));
    }
    ctx.say(line.trim_end_matches(';'));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_are_counted_from_the_offset_and_from_the_start_after_a_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("app.log");
        std::fs::write(&log, "ok\nERROR one\n").expect("write");
        let (n, end) = count_errors(&log, 0).expect("count");
        assert_eq!((n, end), (1, 13));
        let mut more = std::fs::read(&log).expect("read");
        more.extend_from_slice(b"Traceback x\nfine\nCRITICAL y\n");
        std::fs::write(&log, &more).expect("write");
        let (n, end) = count_errors(&log, end).expect("count");
        assert_eq!((n, end), (2, 41));
        // Rotated: shorter than the offset, counted from the start.
        std::fs::write(&log, "ERROR rotated\n").expect("write");
        assert_eq!(count_errors(&log, end).expect("count"), (1, 14));
        assert_eq!(
            count_errors(&dir.path().join("absent.log"), 5).expect("count"),
            (0, 0)
        );
    }
}
