//! Bounded capture of a step's output: keeps the first and the last bytes up to a cap and
//! replaces the middle with an explicit marker, so memory stays bounded whatever a step prints.
//! `fit_run_finished` shrinks a whole run's result to a byte budget, so a run of many noisy
//! steps never exceeds the gRPC message limit (which would break the session on every resend).

/// The marker's text; tests and reports look for it.
pub const TRUNCATION_MARKER: &str = "output truncated";

#[derive(Debug, Clone)]
pub struct OutputCap {
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    dropped: u64,
}

impl OutputCap {
    /// Keeps at most `cap` bytes: half from the start, half from the end.
    pub fn new(cap: usize) -> Self {
        let head_cap = cap / 2;
        Self {
            head: Vec::new(),
            tail: std::collections::VecDeque::new(),
            head_cap,
            tail_cap: cap - head_cap,
            dropped: 0,
        }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        if self.head.len() < self.head_cap {
            let take = data.len().min(self.head_cap - self.head.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        if data.len() >= self.tail_cap {
            self.dropped += (self.tail.len() + data.len() - self.tail_cap) as u64;
            self.tail.clear();
            self.tail.extend(&data[data.len() - self.tail_cap..]);
            return;
        }
        let overflow = (self.tail.len() + data.len()).saturating_sub(self.tail_cap);
        self.tail.drain(..overflow);
        self.dropped += overflow as u64;
        self.tail.extend(data);
    }

    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

    pub fn dropped_bytes(&self) -> u64 {
        self.dropped
    }

    /// The kept bytes, with the marker where bytes were dropped.
    pub fn render(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        if self.dropped > 0 {
            out.extend_from_slice(
                format!(
                    "\n[... {} bytes of {TRUNCATION_MARKER} ...]\n",
                    self.dropped
                )
                .as_bytes(),
            );
        }
        out.extend(self.tail.iter());
        out
    }
}

/// Largest encoded `RunFinished` an agent sends: a quarter of the message limit, leaving room
/// for the envelope and for the coordinator to embed it.
pub const MAX_RUN_RESULT_BYTES: usize = crate::MAX_MESSAGE_BYTES / 4;

/// Keeps the last `keep` bytes of `text` (on a UTF-8 boundary) behind a marker naming `why`.
fn keep_tail(text: &[u8], keep: usize, why: &str) -> Vec<u8> {
    if text.len() <= keep {
        return text.to_vec();
    }
    let mut start = text.len() - keep;
    while start < text.len() && (text[start] & 0b1100_0000) == 0b1000_0000 {
        start += 1;
    }
    let mut out = format!("[... {} bytes of {TRUNCATION_MARKER}: {why} ...]\n", start).into_bytes();
    out.extend_from_slice(&text[start..]);
    out
}

fn cut(text: &mut String, keep: usize, why: &str) {
    if text.len() > keep {
        *text = String::from_utf8_lossy(&keep_tail(text.as_bytes(), keep, why)).into_owned();
    }
}

/// Shrinks `run` until it encodes to at most `budget` bytes: first the output tails (the
/// largest first, each to an equal share, keeping their ends), then long fact values and
/// errors. Every cut carries the truncation marker and sets `output_truncated`. The full
/// record stays in the agent's journal.
pub fn fit_run_finished(run: &mut crate::proto::RunFinished, budget: usize) {
    use prost::Message;
    const WHY: &str = "cut to fit the run result; the whole tail is in the agent journal";
    if run.encoded_len() <= budget {
        return;
    }
    // What the result weighs without any output: the rest must share what is left.
    let fixed: usize = {
        let mut bare = run.clone();
        for s in &mut bare.steps {
            s.output_tail.clear();
        }
        bare.encoded_len()
    };
    let noisy = run
        .steps
        .iter()
        .filter(|s| !s.output_tail.is_empty())
        .count();
    if let Some(share) = budget.saturating_sub(fixed).checked_div(noisy) {
        // Each cut adds a marker (~120 bytes) and tag/length bytes.
        let share = share.saturating_sub(160);
        for s in &mut run.steps {
            if s.output_tail.len() > share {
                s.output_tail = keep_tail(&s.output_tail, share, WHY);
                s.output_truncated = true;
            }
        }
    }
    if run.encoded_len() <= budget {
        return;
    }
    // Output alone could not make room: long errors and fact values are cut too.
    for s in &mut run.steps {
        cut(&mut s.error, 1024, WHY);
        for v in s.facts.values_mut() {
            cut(v, 256, WHY);
        }
        s.output_tail = keep_tail(&s.output_tail, 0, WHY);
        s.output_truncated = true;
    }
    // Still too large (thousands of steps): only statuses, exit codes and short errors.
    if run.encoded_len() > budget {
        for s in &mut run.steps {
            s.facts.clear();
            s.output_tail.clear();
            if s.error.len() > 64 {
                let mut end = 64;
                while !s.error.is_char_boundary(end) {
                    end -= 1;
                }
                s.error.truncate(end);
                s.error.push('…');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_under_the_cap() {
        let mut c = OutputCap::new(10);
        c.push(b"hello");
        c.push(b"wor");
        assert_eq!(c.render(), b"hellowor");
        assert!(!c.truncated());
    }

    #[test]
    fn keeps_head_and_tail_with_marker() {
        let mut c = OutputCap::new(10);
        for chunk in [b"abcdefgh".as_slice(), b"ijklmnop", b"qrstuvwxyz"] {
            c.push(chunk);
        }
        let text = String::from_utf8(c.render()).expect("utf8");
        assert!(text.starts_with("abcde"), "{text}");
        assert!(text.ends_with("vwxyz"), "{text}");
        assert!(
            text.contains("[... 16 bytes of output truncated ...]"),
            "{text}"
        );
        assert_eq!(c.dropped_bytes(), 16);
    }

    #[test]
    fn a_run_result_is_cut_to_its_budget_keeping_each_tail_end() {
        use crate::proto::{RunFinished, StepFinished};
        use prost::Message;
        let step = |i: usize| StepFinished {
            action: "git.log".into(),
            output_tail: format!("{}end of step {i}", "x".repeat(64 * 1024)).into_bytes(),
            error: "e".repeat(10),
            ..Default::default()
        };
        let mut run = RunFinished {
            run_id: "r".into(),
            steps: (0..100).map(step).collect(),
            ..Default::default()
        };
        assert!(run.encoded_len() > crate::MAX_MESSAGE_BYTES);
        fit_run_finished(&mut run, MAX_RUN_RESULT_BYTES);
        assert!(
            run.encoded_len() <= MAX_RUN_RESULT_BYTES,
            "{}",
            run.encoded_len()
        );
        for (i, s) in run.steps.iter().enumerate() {
            let text = String::from_utf8_lossy(&s.output_tail);
            assert!(text.contains(TRUNCATION_MARKER), "step {i} marked");
            assert!(
                text.ends_with(&format!("end of step {i}")),
                "step {i} keeps its end"
            );
            assert!(s.output_truncated);
            assert_eq!(s.error, "e".repeat(10), "short errors are kept");
        }

        // A small result is left exactly as it is.
        let mut small = RunFinished {
            steps: vec![step(0)],
            ..Default::default()
        };
        let before = small.clone();
        fit_run_finished(&mut small, MAX_RUN_RESULT_BYTES);
        assert_eq!(small, before);

        // Thousands of steps with long errors still fit.
        let mut many = RunFinished {
            steps: (0..5_000)
                .map(|i| StepFinished {
                    error: "é".repeat(2_000),
                    facts: [("k".to_string(), "v".repeat(5_000))].into(),
                    ..step(i)
                })
                .collect(),
            ..Default::default()
        };
        fit_run_finished(&mut many, MAX_RUN_RESULT_BYTES);
        assert!(
            many.encoded_len() <= MAX_RUN_RESULT_BYTES,
            "{}",
            many.encoded_len()
        );
    }
}
