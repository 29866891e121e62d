//! Group commit for the SQLite store. Every write on the hot path (runs, results, job events,
//! host outcomes, audit entries, heartbeats) goes to one writer task, which takes everything
//! queued, commits it in one transaction (one fsync), then answers each caller. A caller still
//! returns only once its write is durable; concurrent callers share the fsync. A batch that
//! fails is retried write by write, so one bad write fails alone. Audit records (on their own
//! or with a run's result) are appended to the chain inside the batch's transaction, which
//! begins `IMMEDIATE` like every transaction that appends.

use std::sync::Arc;

use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::chain::{self, Link, Seen};
use super::{AuditEvent, JobHostRow, RunRow, StoreError};

/// Writes committed together at most.
const MAX_BATCH: usize = 1024;

#[derive(Debug)]
pub(super) enum Write {
    CreateRun(RunRow),
    /// Answers one of the `TAKEN_*` codes.
    FinishRun {
        run_id: String,
        host_id: String,
        status: i32,
        finished_at_ms: i64,
        result: Vec<u8>,
        audit: AuditEvent,
    },
    Audit(AuditEvent),
    JobEvents {
        job_id: String,
        events: Vec<(u64, i64, Vec<u8>)>,
    },
    JobHost(JobHostRow),
    AgentSeen {
        host_id: String,
        last_seen_ms: i64,
        state: Option<Vec<u8>>,
    },
    /// Operator inventory labels of one host, with their audit record.
    Labels {
        host_id: String,
        set: Vec<(String, String)>,
        remove: Vec<String>,
        at_ms: i64,
        audit: AuditEvent,
    },
    /// The inventory from coordinator.toml replaces the previous one; audited when it changed.
    ConfigInventory {
        labels: Vec<(String, String, String)>,
        audit: AuditEvent,
    },
}

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

/// `FinishRun` answers: the result was stored, the run is unknown, it belongs to another
/// host, or it already had its result.
pub(super) const TAKEN_UNKNOWN: u64 = 0;
pub(super) const TAKEN_RECORDED: u64 = 1;
pub(super) const TAKEN_OTHER_HOST: u64 = 2;
pub(super) const TAKEN_ALREADY: u64 = 3;

async fn commit(pool: &SqlitePool, seen: &Seen, writes: &[Write]) -> Result<Vec<u64>, StoreError> {
    let q = |what: &'static str| move |source| StoreError::Query { what, source };
    // IMMEDIATE: the audit chain's head is read and extended under the write lock.
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(q("begin"))?;
    let mut counts = Vec::with_capacity(writes.len());
    let mut appended: Option<Link> = None;
    for w in writes {
        let n = match w {
            Write::CreateRun(r) => sqlx::query(
                "INSERT INTO runs (run_id, job_id, host_id, requested_by, reason, procedure, status, created_at_ms, phase)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .bind(&r.run_id)
            .bind(&r.job_id)
            .bind(&r.host_id)
            .bind(&r.requested_by)
            .bind(&r.reason)
            .bind(&r.procedure)
            .bind(r.status)
            .bind(r.created_at_ms)
            .bind(&r.phase)
            .execute(&mut *tx)
            .await
            .map_err(q("create_run"))?
            .rows_affected(),
            Write::FinishRun { run_id, host_id, status, finished_at_ms, result, audit } => {
                let row: Option<(String, bool)> =
                    sqlx::query_as("SELECT host_id, result IS NOT NULL FROM runs WHERE run_id = ?1")
                        .bind(run_id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(q("finish_run"))?;
                let (code, action) = match row {
                    None => (TAKEN_UNKNOWN, "run.result_unknown_run"),
                    Some((owner, _)) if owner != *host_id => (TAKEN_OTHER_HOST, "run.result_refused"),
                    Some((_, true)) => (TAKEN_ALREADY, "run.result_repeated"),
                    Some(_) => {
                        sqlx::query("UPDATE runs SET status = ?2, finished_at_ms = ?3, result = ?4 WHERE run_id = ?1")
                            .bind(run_id)
                            .bind(status)
                            .bind(finished_at_ms)
                            .bind(result)
                            .execute(&mut *tx)
                            .await
                            .map_err(q("finish_run"))?;
                        (TAKEN_RECORDED, audit.action.as_str())
                    }
                };
                let event = AuditEvent { action: action.to_string(), ..audit.clone() };
                appended = Some(chain::append(&mut tx, &event, seen).await?);
                code
            }
            Write::Audit(e) => {
                appended = Some(chain::append(&mut tx, e, seen).await?);
                1
            }
            Write::JobEvents { job_id, events } => {
                let mut n = 0;
                for (seq, at_ms, event) in events {
                    n += sqlx::query("INSERT INTO job_events (job_id, seq, at_ms, event) VALUES (?1, ?2, ?3, ?4)")
                        .bind(job_id)
                        .bind(i64::try_from(*seq).unwrap_or(i64::MAX))
                        .bind(at_ms)
                        .bind(event)
                        .execute(&mut *tx)
                        .await
                        .map_err(q("append_job_event"))?
                        .rows_affected();
                }
                n
            }
            Write::JobHost(h) => super::sqlite::bind_job_host(sqlx::query(super::sqlite::UPSERT_JOB_HOST), h)
                .execute(&mut *tx)
                .await
                .map_err(q("update_job_host"))?
                .rows_affected(),
            Write::AgentSeen { host_id, last_seen_ms, state } => {
                sqlx::query("UPDATE agents SET last_seen_ms = MAX(last_seen_ms, ?2), state = COALESCE(?3, state) WHERE host_id = ?1")
                    .bind(host_id)
                    .bind(last_seen_ms)
                    .bind(state)
                    .execute(&mut *tx)
                    .await
                    .map_err(q("agent_seen"))?
                    .rows_affected()
            }
            Write::Labels { host_id, set, remove, at_ms, audit } => {
                let mut n = 0;
                for key in remove {
                    n += sqlx::query("DELETE FROM inventory_labels WHERE host_id = ?1 AND key = ?2 AND source = 'operator'")
                        .bind(host_id)
                        .bind(key)
                        .execute(&mut *tx)
                        .await
                        .map_err(q("label_host"))?
                        .rows_affected();
                }
                for (key, value) in set {
                    n += sqlx::query(
                        "INSERT INTO inventory_labels (host_id, key, value, source, set_by, set_at_ms)
                         VALUES (?1, ?2, ?3, 'operator', ?4, ?5)
                         ON CONFLICT(host_id, key, source) DO UPDATE SET value = ?3, set_by = ?4, set_at_ms = ?5",
                    )
                    .bind(host_id)
                    .bind(key)
                    .bind(value)
                    .bind(&audit.actor)
                    .bind(at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(q("label_host"))?
                    .rows_affected();
                }
                appended = Some(chain::append(&mut tx, audit, seen).await?);
                n
            }
            Write::ConfigInventory { labels, audit } => {
                let before: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT host_id, key, value FROM inventory_labels WHERE source = 'config' ORDER BY host_id, key",
                )
                .fetch_all(&mut *tx)
                .await
                .map_err(q("sync_config_inventory"))?;
                if before == *labels {
                    0
                } else {
                    sqlx::query("DELETE FROM inventory_labels WHERE source = 'config'")
                        .execute(&mut *tx)
                        .await
                        .map_err(q("sync_config_inventory"))?;
                    for (host_id, key, value) in labels {
                        sqlx::query(
                            "INSERT INTO inventory_labels (host_id, key, value, source, set_by, set_at_ms)
                             VALUES (?1, ?2, ?3, 'config', ?4, ?5)",
                        )
                        .bind(host_id)
                        .bind(key)
                        .bind(value)
                        .bind(&audit.actor)
                        .bind(audit.at_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(q("sync_config_inventory"))?;
                    }
                    appended = Some(chain::append(&mut tx, audit, seen).await?);
                    1
                }
            }
        };
        counts.push(n);
    }
    tx.commit().await.map_err(q("commit"))?;
    if let Some(link) = appended {
        seen.advance(&link);
    }
    Ok(counts)
}
