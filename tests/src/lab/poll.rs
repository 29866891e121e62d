//! Waiting for a condition with a deadline instead of sleeping: the last observation is
//! reported when time runs out.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// One look at a condition: done with a value, or not yet (with what was seen).
#[derive(Debug)]
pub enum Check<T> {
    Done(T),
    Pending(String),
}

/// Calls `look` until it returns [`Check::Done`] or `timeout` passes. Errors from `look`
/// count as "not yet" (a service that is still starting refuses connections) and are
/// reported if the deadline passes.
pub fn until<T>(
    what: impl Display,
    timeout: Duration,
    mut look: impl FnMut() -> Result<Check<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(5);
    loop {
        let seen = match look() {
            Ok(Check::Done(value)) => return Ok(value),
            Ok(Check::Pending(seen)) => seen,
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {seen}");
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(100));
    }
}
