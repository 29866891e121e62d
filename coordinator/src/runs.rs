//! Routes what agents report about runs (step events, results) to whoever is watching them,
//! without ever letting a slow watcher slow an agent: delivery is `try_send`, and a watcher
//! that falls behind loses output chunks, never the agent's session.

use std::collections::HashMap;
use std::sync::Mutex;

use rollback_common::proto::{ExecEvent, RunFinished, exec_event};
use tokio::sync::mpsc;

/// What a run's watcher receives: an event, or why the run's events stopped.
///
/// The event is boxed to keep the watcher's channel small: tokio allocates a channel's first
/// block of 32 slots when the channel is made, and an `ExecEvent` slot is about 200 bytes. A
/// 10,000-host batch makes 10,000 channels at once, so unboxed that was 60 MB of fresh memory,
/// page-faulted in while the batch is dispatched (5% of the coordinator's CPU in its job).
pub type Watched = Result<Box<ExecEvent>, tonic::Status>;
pub type WatchSender = mpsc::Sender<Watched>;

#[derive(Debug)]
struct Watch {
    host_id: String,
    tx: WatchSender,
}

#[derive(Debug, Default)]
pub struct RunHub {
    watches: Mutex<HashMap<String, Vec<Watch>>>,
    /// Runs this process dispatched whose result is not recorded yet: run id → job id ("" for
    /// exec). Only these are re-sent when an agent reconnects, so a run of a job that ended
    /// (or of a previous coordinator process) never starts late.
    pending: Mutex<HashMap<String, String>>,
}

impl RunHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Watch>>> {
        self.watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn watch(&self, run_id: &str, host_id: &str, tx: WatchSender) {
        self.lock()
            .entry(run_id.to_string())
            .or_default()
            .push(Watch {
                host_id: host_id.to_string(),
                tx,
            });
    }

    /// Delivers an event for `run_id` reported by `host_id` (events from another host are ignored).
    /// The last watcher gets the event itself; only the others get copies.
    pub fn publish(&self, host_id: &str, run_id: &str, event: ExecEvent) {
        let mut watches = self.lock();
        if let Some(list) = watches.get_mut(run_id) {
            list.retain(|w| w.host_id != host_id || !w.tx.is_closed());
            let mut to = list.iter().filter(|w| w.host_id == host_id).peekable();
            while let Some(w) = to.next() {
                if to.peek().is_none() {
                    let _ = w.tx.try_send(Ok(Box::new(event)));
                    break;
                }
                let _ = w.tx.try_send(Ok(Box::new(event.clone())));
            }
        }
    }

    /// The run reported by `host_id` is over: drop its watchers of that host (their streams
    /// end). Another host cannot end a run it was not sent.
    /// Someone in this process waits for the run's events.
    pub fn has_watch(&self, run_id: &str) -> bool {
        self.lock().contains_key(run_id)
    }

    /// The run's result to whoever waits for it, then the wait ends.
    pub fn hand_over(&self, host_id: &str, run_id: &str, finished: RunFinished) {
        self.publish(
            host_id,
            run_id,
            ExecEvent {
                kind: Some(exec_event::Kind::Finished(finished)),
            },
        );
        self.close(host_id, run_id);
    }

    pub fn close(&self, host_id: &str, run_id: &str) {
        let mut watches = self.lock();
        if let Some(list) = watches.get_mut(run_id) {
            list.retain(|w| w.host_id != host_id);
            if list.is_empty() {
                watches.remove(run_id);
            }
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `run_id` (of `job_id`, "" for exec) was dispatched by this process.
    pub fn dispatched(&self, run_id: &str, job_id: &str) {
        self.lock_pending()
            .insert(run_id.to_string(), job_id.to_string());
    }

    /// The run's result is recorded.
    pub fn resolved(&self, run_id: &str) {
        self.lock_pending().remove(run_id);
    }

    /// The job ended: none of its runs may be re-sent any more.
    pub fn forget_job(&self, job_id: &str) {
        self.lock_pending().retain(|_, j| j != job_id);
    }

    /// Whether `run_id` may be re-sent to a reconnecting agent.
    /// Every run this process dispatched and still waits for.
    pub fn pending_runs(&self) -> Vec<String> {
        self.lock_pending().keys().cloned().collect()
    }

    pub fn is_pending(&self, run_id: &str) -> bool {
        self.lock_pending().contains_key(run_id)
    }

    /// The host's session ended: tell watchers of its runs and drop them.
    pub fn host_gone(&self, host_id: &str) {
        let mut watches = self.lock();
        for list in watches.values_mut() {
            for w in list.iter().filter(|w| w.host_id == host_id) {
                let _ = w.tx.try_send(Err(tonic::Status::unavailable(format!(
                    "agent {host_id} disconnected during the run; its result is recorded when it reconnects"
                ))));
            }
            list.retain(|w| w.host_id != host_id);
        }
        watches.retain(|_, list| !list.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(run_id: &str) -> RunFinished {
        RunFinished {
            run_id: run_id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_watcher_of_the_reporting_host_gets_the_event_and_no_other() {
        let hub = RunHub::default();
        let (a, mut ra) = mpsc::channel(4);
        let (b, mut rb) = mpsc::channel(4);
        let (other, mut ro) = mpsc::channel(4);
        hub.watch("r1", "h1", a);
        hub.watch("r1", "h1", b);
        hub.watch("r1", "h2", other);
        hub.hand_over("h1", "r1", finished("r1"));
        for rx in [&mut ra, &mut rb] {
            match rx.try_recv().map(|w| w.map(|ev| *ev)) {
                Ok(Ok(ExecEvent {
                    kind: Some(exec_event::Kind::Finished(f)),
                })) => assert_eq!(f.run_id, "r1"),
                other => panic!("expected the result, got {other:?}"),
            }
        }
        assert!(ro.try_recv().is_err(), "h2 did not report this run");
        // The result ended the wait of h1's watchers only.
        assert!(hub.has_watch("r1"));
        hub.close("h2", "r1");
        assert!(!hub.has_watch("r1"));
    }

    /// A watcher's slot is two words whatever the event: tokio allocates 32 slots when a
    /// channel is made, and a batch of 10,000 hosts makes 10,000 channels at once.
    #[test]
    fn a_watchers_channel_slot_stays_two_words() {
        assert!(
            std::mem::size_of::<ExecEvent>() > 64,
            "an event is large; this test guards the box around it"
        );
        assert!(std::mem::size_of::<Watched>() <= 2 * std::mem::size_of::<usize>());
    }
}
