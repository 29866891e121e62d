//! `log.scan {patterns}`: looks for error patterns in the app log lines written since the run
//! began (from the size the log had then; from the start if it was rotated since). The scan
//! stops at the step's timeout (`TimedOut`) or on cancel (`Cancelled`).

use std::io::{BufRead, Seek};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rollback_common::proto::StepStatus;

use super::{Failure, StepCtx};

/// Lines shown per match list.
const SHOWN_MATCHES: usize = 20;

pub fn default_patterns() -> Vec<String> {
    ["ERROR", "CRITICAL", "Traceback"]
        .map(String::from)
        .to_vec()
}

/// Size of the log now (0 if it does not exist yet).
pub fn log_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub(super) async fn run(patterns: &[String], ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let path = ctx
        .config
        .app
        .as_ref()
        .and_then(|a| a.log_file.clone())
        .ok_or_else(|| Failure::new(-1, "app.log_file is not set"))?;
    let offset = ctx.log_offset.unwrap_or(0);
    let scan_path = path.clone();
    let patterns_owned = patterns.to_vec();
    // Tells the blocking scan to give up once the step is cancelled or timed out.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_scan = stop.clone();
    let task = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u64, Vec<String>)> {
        let file = match std::fs::File::open(&scan_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((0, 0, Vec::new()));
            }
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let start = if len < offset { 0 } else { offset };
        let mut reader = std::io::BufReader::new(file);
        reader.seek(std::io::SeekFrom::Start(start))?;
        let (mut lines, mut matched) = (0u64, Vec::new());
        let mut buf = Vec::new();
        let mut total = 0u64;
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf)?;
            if n == 0 {
                break;
            }
            lines += 1;
            if lines % 4096 == 0 && stop_scan.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("scan stopped"));
            }
            let line = String::from_utf8_lossy(&buf);
            if patterns_owned.iter().any(|p| line.contains(p.as_str())) {
                total += 1;
                if matched.len() < SHOWN_MATCHES {
                    matched.push(line.trim_end().chars().take(500).collect());
                }
            }
        }
        Ok((lines, total, matched))
    });
    let joined = tokio::select! {
        biased;
        () = ctx.cancel.cancelled() => {
            stop.store(true, Ordering::Relaxed);
            return Err(Failure {
                status: StepStatus::Cancelled,
                exit_code: -1,
                error: format!("cancelled while scanning {}", path.display()),
            });
        }
        () = tokio::time::sleep(ctx.timeout) => {
            stop.store(true, Ordering::Relaxed);
            return Err(Failure {
                status: StepStatus::TimedOut,
                exit_code: -1,
                error: format!(
                    "scanning {} did not finish within the step timeout {:?}",
                    path.display(),
                    ctx.timeout
                ),
            });
        }
        joined = task => joined,
    };
    let scanned = joined
        .map_err(|e| Failure::new(-1, format!("log scan task: {e}")))?
        .map_err(|e| Failure::new(-1, format!("reading {}: {e}", path.display())))?;
    let (lines, total, matched) = scanned;
    ctx.fact("lines_scanned", lines.to_string());
    ctx.fact("matches", total.to_string());
    ctx.say(&format!(
        "scanned {lines} new lines of {} for {}",
        path.display(),
        patterns.join(", ")
    ));
    if total == 0 {
        return Ok(());
    }
    for m in &matched {
        ctx.say(&format!("  {m}"));
    }
    Err(Failure::new(
        -1,
        format!(
            "{total} new log lines in {} match {}: first: {}",
            path.display(),
            patterns.join(", "),
            matched.first().map(String::as_str).unwrap_or_default()
        ),
    ))
}
