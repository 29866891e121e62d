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
/// Bytes of a line that are searched and held in memory; the rest of a longer line is
/// skipped (counted as `long_lines`).
pub const MAX_LINE: usize = 64 * 1024;

/// Reads one line into `buf`, keeping at most `cap` bytes of it and skipping the rest without
/// holding it. Returns the bytes consumed (0 at the end) and whether the line was cut.
pub fn read_line_capped(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<(usize, bool)> {
    let (mut consumed, mut cut) = (0, false);
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok((consumed, cut));
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut |= chunk.len() > room;
        let n = chunk.len();
        reader.consume(n);
        consumed += n;
        if done {
            return Ok((consumed, cut));
        }
    }
}

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
    // The log is never read through a symlink: configure its real path.
    let links = super::Symlinks::Refuse;
    let scan_path = path.clone();
    let patterns_owned = patterns.to_vec();
    // Tells the blocking scan to give up once the step is cancelled or timed out.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_scan = stop.clone();
    type Scan = (u64, u64, u64, Vec<String>);
    let task = tokio::task::spawn_blocking(move || -> std::io::Result<Scan> {
        // Never through a refused symlink, never a FIFO or device (which could block or
        // stream forever).
        let file = match super::file::open_regular(&scan_path, links) {
            Ok(f) => f,
            Err(e) if e.is_missing() => return Ok((0, 0, 0, Vec::new())),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
        let len = file.metadata()?.len();
        let start = if len < offset { 0 } else { offset };
        let mut reader = std::io::BufReader::new(file);
        reader.seek(std::io::SeekFrom::Start(start))?;
        let (mut lines, mut matched) = (0u64, Vec::new());
        let mut buf = Vec::new();
        let (mut total, mut long_lines) = (0u64, 0u64);
        loop {
            buf.clear();
            let (n, cut) = read_line_capped(&mut reader, &mut buf, MAX_LINE)?;
            if n == 0 {
                break;
            }
            lines += 1;
            long_lines += u64::from(cut);
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
        Ok((lines, total, long_lines, matched))
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
    let (lines, total, long_lines, matched) = scanned;
    ctx.fact("lines_scanned", lines.to_string());
    if long_lines > 0 {
        ctx.fact("long_lines", long_lines.to_string());
        ctx.say(&format!(
            "{long_lines} lines were longer than {MAX_LINE} bytes; only their first {MAX_LINE} bytes were searched"
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_longer_than_the_cap_is_cut_and_skipped_without_being_held() {
        let mut text = b"short ERROR\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
        text.extend_from_slice(b"ERROR at the far end\nlast");
        let mut reader = std::io::BufReader::with_capacity(1024, text.as_slice());
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        loop {
            buf.clear();
            let (n, cut) = read_line_capped(&mut reader, &mut buf, MAX_LINE).expect("read");
            if n == 0 {
                break;
            }
            assert!(buf.len() <= MAX_LINE);
            lines.push((n, cut, buf.len()));
        }
        assert_eq!(
            lines,
            [
                (12, false, 12),
                (3 * MAX_LINE + 21, true, MAX_LINE),
                (4, false, 4)
            ]
        );
    }
}
