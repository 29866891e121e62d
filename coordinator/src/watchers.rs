//! A bound on the job watches one operator holds at once (`max_watchers_per_operator`): a
//! script or a leaked loop that opens watches without end gets ResourceExhausted, not the
//! coordinator's memory and tasks, and other operators and the agents are not starved. A slot
//! is freed when its stream ends: the job ended, or the client went away (noticed at once,
//! not at the job's next event).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;
use tracing::warn;

#[derive(Debug)]
pub struct Watchers {
    limit: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// One held watch; dropping it frees the slot.
#[derive(Debug)]
pub struct WatcherSlot {
    watchers: Arc<Watchers>,
    who: String,
}

impl Watchers {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for `who`, or ResourceExhausted naming the limit when they hold them all.
    pub fn acquire(self: &Arc<Self>, who: &str) -> Result<WatcherSlot, Status> {
        let mut held = self.held();
        let n = held.entry(who.to_string()).or_insert(0);
        if *n >= self.limit {
            let limit = self.limit;
            drop(held);
            warn!(operator = %who, limit, "refused a watch: the operator holds the most allowed");
            return Err(Status::resource_exhausted(format!(
                "{who} already follows {limit} jobs at once (max_watchers_per_operator); stop one of those watches first"
            )));
        }
        *n += 1;
        Ok(WatcherSlot {
            watchers: self.clone(),
            who: who.to_string(),
        })
    }

    /// Watches `who` holds now.
    #[cfg(test)]
    pub fn holding(&self, who: &str) -> usize {
        self.held().get(who).copied().unwrap_or(0)
    }
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        let mut held = self.watchers.held();
        if let Some(n) = held.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.who);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_per_operator_and_freed_on_drop() {
        let w = Watchers::new(2);
        let a1 = w.acquire("alice").expect("first");
        let _a2 = w.acquire("alice").expect("second");
        let refused = w.acquire("alice").expect_err("third refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let _b = w.acquire("bob").expect("another operator is not affected");
        drop(a1);
        assert_eq!(w.holding("alice"), 1);
        let _a3 = w.acquire("alice").expect("a freed slot is reused");
    }
}
