//! Live agent sessions, in memory: who is connected now, and the channel to reach them.
//! Never held across an `.await`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rollback_common::proto::CoordinatorMessage;
use tokio::sync::mpsc;

/// Messages to one agent; the session task forwards them on the agent's stream.
pub type AgentSender = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

#[derive(Debug, Clone)]
pub struct LiveSession {
    pub session_id: u64,
    pub sender: AgentSender,
    pub last_seen_ms: i64,
}

#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    sessions: Mutex<HashMap<String, LiveSession>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LiveSession>> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a session for `host_id`, replacing (and returning) any older one.
    pub fn insert(
        &self,
        host_id: &str,
        sender: AgentSender,
        now_ms: i64,
    ) -> (u64, Option<LiveSession>) {
        let session_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let old = self.lock().insert(
            host_id.to_string(),
            LiveSession {
                session_id,
                sender,
                last_seen_ms: now_ms,
            },
        );
        (session_id, old)
    }

    /// Removes the session only if it is still the current one for that host.
    pub fn remove_if_current(&self, host_id: &str, session_id: u64) -> bool {
        let mut sessions = self.lock();
        if sessions
            .get(host_id)
            .is_some_and(|s| s.session_id == session_id)
        {
            sessions.remove(host_id);
            true
        } else {
            false
        }
    }

    pub fn touch(&self, host_id: &str, session_id: u64, now_ms: i64) {
        if let Some(s) = self
            .lock()
            .get_mut(host_id)
            .filter(|s| s.session_id == session_id)
        {
            s.last_seen_ms = now_ms;
        }
    }

    pub fn get(&self, host_id: &str) -> Option<LiveSession> {
        self.lock().get(host_id).cloned()
    }

    /// The hosts with a session here.
    pub fn hosts(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
