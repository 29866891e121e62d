//! Group commit for both stores. Every write on the hot path (runs, results, job events,
//! host outcomes, audit entries, heartbeats; `shared::Write`) goes to one writer task, which
//! takes everything queued, applies it in one transaction (`Commit`: one fsync on SQLite, one
//! WAL flush and a handful of round trips fewer per write on PostgreSQL), then answers each
//! caller. A caller still returns only once its write is durable; concurrent callers share the
//! commit. A batch that fails is retried write by write, so one bad write (a refused job
//! write, `StoreError::NotOwner`, among them) fails alone. Audit records (on their own or
//! with a run's result) are appended to the chain inside the batch's transaction, which is
//! one that appends (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: the chain's advisory lock).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::StoreError;
pub(super) use super::shared::Write;

/// Applies writes in one transaction of a store's database and commits them.
#[async_trait::async_trait]
pub(super) trait Commit: Send + Sync + 'static {
    /// Applies `writes` in order in one transaction, commits, and returns the rows each
    /// changed; on error nothing of them is committed.
    async fn commit(&self, writes: &[Write]) -> Result<Vec<u64>, StoreError>;
}

/// Writes committed together at most.
const MAX_BATCH: usize = 1024;

type Reply = oneshot::Sender<Result<u64, StoreError>>;

#[derive(Debug, Clone)]
pub(super) struct Writer {
    tx: mpsc::Sender<(Write, Reply)>,
}

impl Writer {
    pub(super) fn start(db: Arc<dyn Commit>) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(db, rx));
        Self { tx }
    }

    /// Queues `write` and waits until it is committed; returns the rows it changed.
    pub(super) async fn write(&self, write: Write) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((write, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run(db: Arc<dyn Commit>, mut rx: mpsc::Receiver<(Write, Reply)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (writes, replies): (Vec<Write>, Vec<Reply>) = batch.into_iter().unzip();
        let started = std::time::Instant::now();
        let committed = db.commit(&writes).await;
        crate::metrics::store_commit(started.elapsed());
        match committed {
            Ok(counts) => {
                for (reply, n) in replies.into_iter().zip(counts) {
                    let _ = reply.send(Ok(n));
                }
            }
            Err(e) if writes.len() > 1 => {
                warn!(error = %e, writes = writes.len(), "group commit failed; retrying each write alone");
                for (write, reply) in writes.into_iter().zip(replies) {
                    let one = db
                        .commit(std::slice::from_ref(&write))
                        .await
                        .map(|c| c.first().copied().unwrap_or(0));
                    let _ = reply.send(one);
                }
            }
            // One write: its own error, as it is (an audit failure stays one).
            Err(e) => {
                let mut e = Some(e);
                for reply in replies {
                    let _ = reply.send(Err(e.take().unwrap_or_else(|| StoreError::Batch {
                        reason: "the write's batch failed".into(),
                    })));
                }
            }
        }
    }
}
