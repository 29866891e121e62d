//! Exponential reconnect backoff with jitter, so a fleet does not reconnect in lockstep after
//! the coordinator restarts.

use std::time::Duration;

use rand::Rng;

#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The next delay: `initial * 2^failures` capped at `max`, then a random point in its
    /// upper half (never zero, never above the cap).
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.failures.min(20));
        let ceiling = exp.min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        let late = b.next_delay();
        assert!(
            late >= Duration::from_secs(1),
            "capped delays stay in the upper half: {late:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
