//! Group commit for the SQLite store. Every write on the hot path (runs, results, job events,
//! host outcomes, audit entries, heartbeats; `shared::Write`) goes to one writer task, which takes everything
//! queued, commits it in one transaction (one fsync), then answers each caller. A caller still
//! returns only once its write is durable; concurrent callers share the fsync. A batch that
//! fails is retried write by write, so one bad write fails alone. Audit records (on their own
//! or with a run's result) are appended to the chain inside the batch's transaction, which
//! begins `IMMEDIATE` like every transaction that appends.

use std::sync::Arc;

use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::StoreError;
use super::chain::{Link, Seen};
pub(super) use super::shared::Write;
use super::shared::{query_err, sqlite_sql};

/// Writes committed together at most.
const MAX_BATCH: usize = 1024;

type Reply = oneshot::Sender<Result<u64, StoreError>>;

#[derive(Debug, Clone)]
pub(super) struct Writer {
    tx: mpsc::Sender<(Write, Reply)>,
}

impl Writer {
    pub(super) fn start(pool: SqlitePool, seen: Arc<Seen>) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(pool, seen, rx));
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

async fn run(pool: SqlitePool, seen: Arc<Seen>, mut rx: mpsc::Receiver<(Write, Reply)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (writes, replies): (Vec<Write>, Vec<Reply>) = batch.into_iter().unzip();
        match commit(&pool, &seen, &writes).await {
            Ok(counts) => {
                for (reply, n) in replies.into_iter().zip(counts) {
                    let _ = reply.send(Ok(n));
                }
            }
            Err(e) if writes.len() > 1 => {
                warn!(error = %e, writes = writes.len(), "group commit failed; retrying each write alone");
                for (write, reply) in writes.into_iter().zip(replies) {
                    let one = commit(&pool, &seen, std::slice::from_ref(&write))
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

async fn commit(pool: &SqlitePool, seen: &Seen, writes: &[Write]) -> Result<Vec<u64>, StoreError> {
    // IMMEDIATE: the audit chain's head is read and extended under the write lock.
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(query_err("begin"))?;
    let mut counts = Vec::with_capacity(writes.len());
    let mut appended: Option<Link> = None;
    for w in writes {
        let (n, link) = sqlite_sql::apply(&mut tx, seen, w).await?;
        appended = link.or(appended);
        counts.push(n);
    }
    tx.commit().await.map_err(query_err("commit"))?;
    if let Some(link) = appended {
        seen.advance(&link);
    }
    Ok(counts)
}
