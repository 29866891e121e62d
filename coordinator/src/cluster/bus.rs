//! The messages coordinators sharing one store send each other, and the `Bus` that carries
//! them: PostgreSQL's LISTEN/NOTIFY (`pg_bus`) between processes, nothing at all for the one
//! coordinator of a SQLite store. A message only says where to look: what it is about (a run,
//! its result, a job's events) is in the store first, so a message lost with a dying process
//! loses nothing but a wake-up.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// NOTIFY payloads must stay under 8000 bytes; a step event that would not fit is cut.
pub const MAX_PAYLOAD: usize = 7900;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Message {
    /// The coordinator holding `host` sends it the stored run `run_id`.
    Deliver { host: String, run_id: String },
    /// The coordinator holding `host` passes a cancel to it.
    Cancel {
        host: String,
        run_id: String,
        reason: String,
    },
    /// A step event of a run dispatched elsewhere (encoded `StepEvent`, base64).
    Step {
        host: String,
        run_id: String,
        event: String,
    },
    /// A run dispatched elsewhere finished: its result is stored (or, `busy`, the agent's busy
    /// answer, encoded `RunFinished`, which is never stored).
    Finished {
        host: String,
        run_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        busy: Option<String>,
    },
    /// `host` came online at the sender: runs dispatched to it elsewhere are sent again.
    Online { host: String },
    /// `host`'s session at the sender ended.
    Gone { host: String },
    /// New events of `job_id` are stored.
    JobEvents { job_id: String },
    /// An operator cancelled `job_id` at the sender; its owner stops it.
    CancelJob {
        job_id: String,
        by: String,
        reason: String,
    },
}

/// One message with the process that sent it (a process ignores its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub from: String,
    #[serde(flatten)]
    pub msg: Message,
}

impl Envelope {
    /// The wire form, or None when it cannot fit a notification.
    pub fn encode(&self) -> Option<String> {
        serde_json::to_string(self)
            .ok()
            .filter(|s| s.len() <= MAX_PAYLOAD)
    }

    pub fn decode(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Carries messages to the other coordinators of the store.
#[async_trait::async_trait]
pub trait Bus: Send + Sync {
    /// Other coordinators may share the store (and so hold agents and own jobs).
    fn shared(&self) -> bool;
    /// Sends to every other coordinator; a failure is logged, never fatal (the store has
    /// what the message points at, and the receivers' safety polls find it).
    async fn publish(&self, envelope: Envelope);
    /// Returns once every message published before it has been sent (or given up): before
    /// the store's connections close at shutdown. Nothing to wait for by default.
    async fn flush(&self) {}
}

/// The bus of a store nobody else shares: nothing to send.
pub struct Alone;

#[async_trait::async_trait]
impl Bus for Alone {
    fn shared(&self) -> bool {
        false
    }

    async fn publish(&self, _envelope: Envelope) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_and_an_oversized_one_is_refused() {
        let e = Envelope {
            from: "i1".into(),
            msg: Message::Finished {
                host: "web-1".into(),
                run_id: "r".into(),
                busy: Some(b64(b"x")),
            },
        };
        let wire = e.encode().expect("fits");
        assert_eq!(Envelope::decode(&wire), Some(e));
        let big = Envelope {
            from: "i1".into(),
            msg: Message::Step {
                host: "h".into(),
                run_id: "r".into(),
                event: "a".repeat(MAX_PAYLOAD),
            },
        };
        assert_eq!(big.encode(), None);
        assert_eq!(Envelope::decode("{\"from\":\"x\",\"t\":\"nope\"}"), None);
    }
}
