//! The uplink carries run events to whichever session is current. Runs outlive sessions: when
//! no session is up, events are dropped here, and the final result is re-sent from the journal
//! once a session is back (until the coordinator acknowledges it).

use std::sync::Mutex;

use rollback_common::proto::AgentMessage;
use tokio::sync::mpsc;

#[derive(Debug, Default)]
pub struct Uplink {
    current: Mutex<Option<mpsc::Sender<AgentMessage>>>,
}

impl Uplink {
    fn sender(&self) -> Option<mpsc::Sender<AgentMessage>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn attach(&self, tx: mpsc::Sender<AgentMessage>) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
    }

    pub fn detach(&self) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// A message over the limit would end the session (and, resent, end every later one):
    /// it is dropped and logged instead. Results are cut to fit before they get here.
    fn fits(msg: &AgentMessage) -> bool {
        use prost::Message;
        let len = msg.encoded_len();
        let fits = len <= rollback_common::MAX_MESSAGE_BYTES - 1024;
        if !fits {
            tracing::error!(
                bytes = len,
                "message over the gRPC limit dropped; this is a bug"
            );
        }
        fits
    }

    /// For events that matter (step started/finished, run finished): waits for room.
    pub async fn send(&self, msg: AgentMessage) -> bool {
        if !Self::fits(&msg) {
            return false;
        }
        match self.sender() {
            Some(tx) => tx.send(msg).await.is_ok(),
            None => false,
        }
    }

    /// For output chunks: never waits, so a slow coordinator never slows a step.
    pub fn try_send(&self, msg: AgentMessage) -> bool {
        Self::fits(&msg) && self.sender().is_some_and(|tx| tx.try_send(msg).is_ok())
    }
}
