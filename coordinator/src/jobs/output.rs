//! A step's output on its way into the job's events (`step.output`), so every watcher sees it
//! live and a watch that reconnects resumes it by sequence number with no gap and no duplicate.
//!
//! Output arrives as the agent's sequence-numbered chunks, cut anywhere. It leaves as whole
//! lines (a line is held until its newline, or until it is `MAX_LINE` long), made safe for a
//! terminal (control characters other than tab shown as U+FFFD). What is stored is bounded:
//! the first `HEAD_LINES` lines / `HEAD_BYTES` bytes of each step, within `JOB_BYTES` for the
//! whole job; past that one marker says the output was cut, and when the step ends its last
//! `TAIL_LINES` lines (from the agent's own capped tail) follow. A chunk the agent could not
//! send (a gap in its sequence) is marked too; a chunk seen twice is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Lines of a step stored before the cut.
pub const HEAD_LINES: usize = 1000;
/// Bytes of a step stored before the cut.
pub const HEAD_BYTES: usize = 64 * 1024;
/// Bytes of output stored for a whole job (10,000 chatty hosts must not fill the store).
pub const JOB_BYTES: usize = 32 * 1024 * 1024;
/// Lines of a cut step's tail stored when it ends.
pub const TAIL_LINES: usize = 20;
/// A line longer than this is sent in pieces.
pub const MAX_LINE: usize = 4096;

/// One step's output of one host.
#[derive(Debug)]
pub struct StepOutput {
    pub index: u32,
    action: String,
    partial: Vec<u8>,
    lines: usize,
    bytes: usize,
    cut: bool,
    last_seq: u64,
}

/// Bytes as a line a terminal can show: lossy UTF-8, control characters replaced.
pub fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

impl StepOutput {
    pub fn new(index: u32, action: &str) -> Self {
        Self {
            index,
            action: action.to_string(),
            partial: Vec::new(),
            lines: 0,
            bytes: 0,
            cut: false,
            last_seq: 0,
        }
    }

    /// A chunk from the agent: the messages of `step.output` events to store, in order.
    pub fn chunk(&mut self, seq: u64, data: &[u8], job_bytes: &AtomicUsize) -> Vec<String> {
        let mut out = Vec::new();
        if seq != 0 {
            if seq <= self.last_seq {
                return out;
            }
            let lost = seq - self.last_seq - 1;
            self.last_seq = seq;
            if lost > 0 {
                let mut ready = self.take_lines(true);
                ready.push(format!(
                    "[{lost} output chunk(s) of {} were dropped on the way from the agent]",
                    self.action
                ));
                self.keep(ready, job_bytes, &mut out);
            }
        }
        self.partial.extend_from_slice(data);
        let ready = self.take_lines(false);
        self.keep(ready, job_bytes, &mut out);
        out
    }

    /// The step ended: what is left of its last line, and the tail of a cut step.
    pub fn finish(&mut self, tail: &[u8], job_bytes: &AtomicUsize) -> Vec<String> {
        let mut out = Vec::new();
        let ready = self.take_lines(true);
        self.keep(ready, job_bytes, &mut out);
        if self.cut {
            let text = String::from_utf8_lossy(tail);
            let lines: Vec<&str> = text.lines().collect();
            let last = &lines[lines.len().saturating_sub(TAIL_LINES)..];
            if !last.is_empty() {
                let mut msg = format!("[the last {} line(s) of {}:]", last.len(), self.action);
                for l in last {
                    msg.push('\n');
                    msg.push_str(&printable(l.as_bytes()));
                }
                out.push(msg);
            }
        }
        out
    }

    /// Complete lines from the buffer (and the incomplete rest when `all`).
    fn take_lines(&mut self, all: bool) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            if let Some(nl) = self.partial.iter().position(|&b| b == b'\n')
                && nl <= MAX_LINE
            {
                let line: Vec<u8> = self.partial.drain(..=nl).collect();
                lines.push(printable(&line[..nl]));
                continue;
            }
            if self.partial.len() > MAX_LINE {
                let piece: Vec<u8> = self.partial.drain(..MAX_LINE).collect();
                lines.push(printable(&piece));
                continue;
            }
            break;
        }
        if all && !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            lines.push(printable(&rest));
        }
        lines
    }

    /// Keeps lines within the step's and the job's bounds, as one message; marks the cut.
    fn keep(&mut self, lines: Vec<String>, job_bytes: &AtomicUsize, out: &mut Vec<String>) {
        let mut kept: Vec<String> = Vec::new();
        for line in lines {
            if self.cut {
                break;
            }
            let size = line.len() + 1;
            let job_room = job_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                    (used + size <= JOB_BYTES).then_some(used + size)
                })
                .is_ok();
            if self.lines >= HEAD_LINES || self.bytes + size > HEAD_BYTES || !job_room {
                self.cut = true;
                if !kept.is_empty() {
                    out.push(kept.join("\n"));
                    kept.clear();
                }
                out.push(format!(
                    "[output of {} cut after {} line(s): the rest is not kept; its last lines follow when the step ends, and `rollbackctl exec` streams all of it]",
                    self.action, self.lines
                ));
                break;
            }
            self.lines += 1;
            self.bytes += size;
            kept.push(line);
        }
        if !kept.is_empty() {
            out.push(kept.join("\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cut_anywhere_leave_as_whole_lines_once() {
        let job = AtomicUsize::new(0);
        let mut s = StepOutput::new(0, "alembic.downgrade");
        assert!(s.chunk(1, b"one\ntw", &job) == vec!["one".to_string()]);
        assert!(s.chunk(2, b"o\r\nthree\nfo", &job) == vec!["two\nthree".to_string()]);
        // Seen before (a resent chunk): nothing.
        assert!(s.chunk(2, b"o\r\nthree\nfo", &job).is_empty());
        assert_eq!(s.finish(b"", &job), vec!["fo".to_string()]);
    }

    #[test]
    fn a_gap_and_control_characters_are_shown_as_such() {
        let job = AtomicUsize::new(0);
        let mut s = StepOutput::new(0, "git.checkout");
        let out = s.chunk(3, b"\x1b[31mred\x07\n", &job);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].contains("2 output chunk(s)"), "{out:?}");
        assert_eq!(out[1], "\u{FFFD}[31mred\u{FFFD}");
    }

    #[test]
    fn a_long_step_is_stored_as_a_head_a_marker_and_a_tail() {
        let job = AtomicUsize::new(0);
        let mut s = StepOutput::new(0, "postgres.restore");
        let mut stored = Vec::new();
        for i in 0..(HEAD_LINES + 500) {
            stored.extend(s.chunk(i as u64 + 1, format!("line {i}\n").as_bytes(), &job));
        }
        let tail: String = (HEAD_LINES + 480..HEAD_LINES + 500)
            .map(|i| format!("line {i}\n"))
            .collect();
        stored.extend(s.finish(tail.as_bytes(), &job));
        let text = stored.join("\n");
        assert!(text.contains("line 0\n") && text.contains(&format!("line {}", HEAD_LINES - 1)));
        assert!(!text.contains(&format!("line {}\n", HEAD_LINES)));
        assert_eq!(text.matches("cut after").count(), 1, "{text}");
        assert!(
            text.ends_with(&format!("line {}", HEAD_LINES + 499)),
            "{text}"
        );
    }

    #[test]
    fn the_job_budget_bounds_every_step_together() {
        let job = AtomicUsize::new(JOB_BYTES - 10);
        let mut s = StepOutput::new(0, "log.scan");
        let out = s.chunk(1, b"12345\n67890abcdef\n", &job);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], "12345");
        assert!(out[1].contains("cut after 1 line"), "{out:?}");
    }

    #[test]
    fn a_line_without_end_is_sent_in_pieces() {
        let job = AtomicUsize::new(0);
        let mut s = StepOutput::new(0, "log.scan");
        let out = s.chunk(1, &vec![b'x'; MAX_LINE * 2 + 5], &job);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_LINE * 2 + 1);
        assert_eq!(s.finish(b"", &job), vec!["xxxxx".to_string()]);
    }
}
