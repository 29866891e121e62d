//! Bounded capture of a step's output: keeps the first and the last bytes up to a cap and
//! replaces the middle with an explicit marker, so memory stays bounded whatever a step prints.

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
}
