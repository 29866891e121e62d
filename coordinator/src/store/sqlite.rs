//! The SQLite store: one file, WAL journal, schema from embedded migrations
//! (`coordinator/migrations`). Its SQL is `shared`'s; hot-path writes go through the
//! group-commit `writer`, on a connection of its own (`WriterConn`), and every transaction
//! that appends to the audit chain begins `IMMEDIATE` (see `chain`).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio::sync::Mutex;

use super::chain::{self, Seen};
use super::shared::{query_err, sqlite_sql as sql};
use super::writer::{Commit, Write, Writer};
use super::{AuditEvent, StoreError};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// The cluster clock's pool (`cluster_sql`): the same pool here, where one file has one
    /// writer at a time anyway and nobody else can take a job over.
    pub(super) clock: SqlitePool,
    /// Hot-path writes, group-committed.
    writer: Writer,
    /// The group commit's own connection, closed with the pool.
    writer_conn: WriterConn,
    /// The newest audit record this process has seen committed.
    seen: Arc<Seen>,
}

/// Rows a query's worker thread may send ahead of the task reading them.
const ROW_BUFFER: usize = 1024;

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| StoreError::Open {
                path: shown.clone(),
                source,
            })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            // Rows come back from sqlx's worker thread one message each; with its default of
            // 50 in flight, reading a 10,000-host job parks the thread and wakes the reader
            // hundreds of times.
            .row_buffer_size(ROW_BUFFER)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .map_err(|source| StoreError::Open {
                path: shown.clone(),
                source,
            })?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                path: shown,
                source,
            })?;
        let chained = {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(query_err(
                "chaining the audit records written before the chain",
            ))?;
            let n = sql::chain_unchained_history(&mut tx).await?;
            tx.commit().await.map_err(query_err(
                "chaining the audit records written before the chain",
            ))?;
            n
        };
        let head = sql::stored_head(&pool).await?;
        // The head in the log is an anchor outside the store: `audit verify` reports it too.
        tracing::info!(
            store = %path.display(),
            head_seq = head.as_ref().map_or(0, |h| h.seq),
            head_hash = head.as_ref().map_or(chain::GENESIS, |h| h.hash.as_str()),
            chained_history = chained,
            "audit chain opened"
        );
        let seen = Arc::new(Seen::new(head));
        let writer_conn = WriterConn::default();
        let writer = Writer::start(Arc::new(Batches {
            pool: pool.clone(),
            options,
            conn: writer_conn.clone(),
            seen: seen.clone(),
        }));
        Ok(Self {
            clock: pool.clone(),
            pool,
            writer,
            writer_conn,
            seen,
        })
    }

    /// Begins a transaction that appends to the audit chain (under the write lock).
    async fn begin_audited(
        &self,
        what: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_err(what))
    }

    /// Appends `audit` in `tx`, commits, then remembers the new head.
    async fn commit_audited(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        audit: &AuditEvent,
        what: &'static str,
    ) -> Result<(), StoreError> {
        let link = sql::append(&mut tx, audit, &self.seen).await?;
        tx.commit().await.map_err(query_err(what))?;
        self.seen.advance(&link);
        Ok(())
    }

    /// One write, group-committed; returns once it is durable.
    async fn write(&self, write: Write) -> Result<u64, StoreError> {
        self.writer.write(write).await
    }

    /// Closes the pool, then the group commit's connection: a write after this fails with
    /// `StoreError::Closed`, as one through a closed pool would.
    pub async fn close(&self) {
        self.pool.close().await;
        if let Some(conn) = self.writer_conn.0.lock().await.take()
            && let Err(e) = sqlx::Connection::close(conn).await
        {
            tracing::warn!(error = %e, "closing the store writer's connection");
        }
    }
}

super::shared::store_impl!(SqliteStore, sqlite_sql);

/// The connection the group commit writes on, opened at its first commit and kept.
///
/// Not the pool's: the pool hands out its idle connections in turn, and in WAL mode a
/// connection that finds the file changed by another since its last transaction drops its
/// whole page cache. Group commits taking the pool's connections in turn each began by
/// reading the B-tree pages the previous commit had just written (preads, a sixth of the
/// coordinator's kernel time in a 10,000-host job), prepared their statements again in each
/// connection's own statement cache, and paid the pool's liveness check. One connection keeps
/// its pages and statements from commit to commit.
#[derive(Debug, Clone, Default)]
struct WriterConn(Arc<Mutex<Option<SqliteConnection>>>);

/// The group commit's transactions on the file.
struct Batches {
    /// The store's pool: once it is closed, so is the writer.
    pool: SqlitePool,
    options: SqliteConnectOptions,
    conn: WriterConn,
    seen: Arc<Seen>,
}

#[async_trait::async_trait]
impl Commit for Batches {
    async fn commit(&self, writes: &[Write]) -> Result<Vec<u64>, StoreError> {
        // One commit at a time: the writer task awaits each before the next.
        let mut slot = self.conn.0.lock().await;
        if self.pool.is_closed() {
            *slot = None;
            return Err(StoreError::Closed);
        }
        let conn = match &mut *slot {
            Some(conn) => conn,
            empty => empty.insert(
                self.options
                    .connect()
                    .await
                    .map_err(query_err("opening the store writer's connection"))?,
            ),
        };
        let committed = commit_on(conn, &self.seen, writes).await;
        if let Err(e) = &committed {
            // Rolled back already (the transaction was dropped); a connection that failed
            // a statement is not trusted with the next batch: the next commit opens another.
            tracing::debug!(error = %e, "group commit failed; reopening the writer's connection");
            *slot = None;
        }
        committed
    }
}

/// Applies `writes` in one `IMMEDIATE` transaction on `conn` (the audit chain's head is read
/// and extended under the write lock), commits, then remembers the chain's new head.
async fn commit_on(
    conn: &mut SqliteConnection,
    seen: &Seen,
    writes: &[Write],
) -> Result<Vec<u64>, StoreError> {
    let mut tx = sqlx::Connection::begin_with(conn, "BEGIN IMMEDIATE")
        .await
        .map_err(query_err("begin"))?;
    let (counts, appended) = sql::apply_all(&mut tx, seen, writes).await?;
    tx.commit().await.map_err(query_err("commit"))?;
    if let Some(link) = appended {
        seen.advance(&link);
    }
    Ok(counts)
}

/// SQLite's own upgrade path (PostgreSQL's schema starts where SQLite's is now); the tests of
/// both stores are in `backend_tests` and `chain_tests`.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::store::{RunRow, Store};

    fn audit(action: &str) -> AuditEvent {
        AuditEvent {
            at_ms: 1,
            actor: "spiffe://fleet.test/operator/alice".into(),
            action: action.into(),
            target: "run/r1".into(),
            detail: "test".into(),
        }
    }

    /// The group commit writes on its own connection: with every connection of the pool held
    /// (a long read of a large job's record, say), a result's write still commits. Through the
    /// pool it waited for a free connection (30 s, then failed).
    #[tokio::test]
    async fn a_group_commit_needs_no_connection_of_the_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite"))
            .await
            .expect("store");
        let mut held = Vec::new();
        for _ in 0..store.pool.options().get_max_connections() {
            held.push(store.pool.acquire().await.expect("a pool connection"));
        }
        for i in 0..3 {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                store.append_audit(&audit(&format!("test.held_{i}"))),
            )
            .await
            .expect("a group commit waited for the pool")
            .expect("written");
        }
        drop(held);
        let actions: Vec<String> = store
            .list_audit(&crate::store::AuditFilter {
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_iter()
            .map(|r| r.event.action)
            .collect();
        for i in 0..3 {
            assert!(actions.contains(&format!("test.held_{i}")), "{actions:?}");
        }
        let verdict = store.verify_audit().await.expect("verify");
        assert!(verdict.broken.is_none(), "the chain holds: {verdict:?}");
    }

    /// A failed group commit rolls back and drops its connection; the next one opens another
    /// and commits. Once the store is closed, a write fails as the writer stopped.
    #[tokio::test]
    async fn a_failed_group_commit_leaves_nothing_and_the_writer_goes_on_until_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite"))
            .await
            .expect("store");
        let run = RunRow {
            run_id: "r1".into(),
            job_id: String::new(),
            host_id: "h1".into(),
            requested_by: "alice".into(),
            reason: "test".into(),
            procedure: b"p".to_vec(),
            status: 0,
            created_at_ms: 1,
            finished_at_ms: None,
            result: None,
            phase: String::new(),
        };
        store.create_run(&run, "i1").await.expect("run");
        let again = store.create_run(&run, "i1").await;
        assert!(
            matches!(
                again,
                Err(StoreError::Query {
                    what: "create_run",
                    ..
                })
            ),
            "a run id stored twice: {again:?}"
        );
        store
            .append_audit(&audit("test.after_failure"))
            .await
            .expect("the writer commits after a failed batch");
        assert_eq!(
            store
                .get_runs(&["r1".to_string()])
                .await
                .expect("runs")
                .len(),
            1
        );
        let verdict = store.verify_audit().await.expect("verify");
        assert!(verdict.broken.is_none(), "the chain holds: {verdict:?}");

        store.close().await;
        let closed = store.append_audit(&audit("test.after_close")).await;
        assert!(matches!(closed, Err(StoreError::Closed)), "{closed:?}");
    }

    /// Upgrading to the inventory keeps targeting as it was (the labels reported before become
    /// the inventory, once); after that a host's claim changes nothing.
    #[tokio::test]
    async fn the_inventory_migration_adopts_earlier_labels_once_and_claims_then_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        {
            let pool = SqlitePoolOptions::new()
                .connect_with(
                    SqliteConnectOptions::from_str("sqlite://")
                        .expect("options")
                        .filename(&path)
                        .create_if_missing(true),
                )
                .await
                .expect("pool");
            let mut before = sqlx::migrate!("./migrations");
            before.migrations = before
                .migrations
                .iter()
                .filter(|m| m.version < 6)
                .cloned()
                .collect::<Vec<_>>()
                .into();
            before.run(&pool).await.expect("migrations 1-5");
            sqlx::query(
                "INSERT INTO agents (host_id, labels_json, agent_version, address, online, connected_at_ms, last_seen_ms)
                 VALUES ('db-1', '{\"role\":\"db\"}', '0', '', 0, 0, 0)",
            )
            .execute(&pool)
            .await
            .expect("old agent row");
            pool.close().await;
        }
        let store = SqliteStore::open(&path).await.expect("upgraded store");
        let agents = store.list_agents().await.expect("agents");
        let (inventory, reported) = (agents[0].labels.clone(), agents[0].reported_labels.clone());
        assert_eq!(inventory.get("role").map(String::as_str), Some("db"));
        assert_eq!(reported, inventory);

        let mut claim = store.list_agents().await.expect("agents")[0].clone();
        claim.reported_labels = HashMap::from([("role".to_string(), "web".to_string())]);
        store.agent_connected(&claim).await.expect("reconnect");
        let agents = store.list_agents().await.expect("agents");
        let (inventory, reported) = (agents[0].labels.clone(), agents[0].reported_labels.clone());
        assert_eq!(inventory.get("role").map(String::as_str), Some("db"));
        assert_eq!(reported.get("role").map(String::as_str), Some("web"));
    }
}
