//! The SQLite store: one file, WAL journal, schema from embedded migrations
//! (`coordinator/migrations`). Its SQL is `shared`'s; hot-path writes go through the
//! group-commit `writer`, and every transaction that appends to the audit chain begins
//! `IMMEDIATE` (see `chain`).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

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
            .connect_with(options)
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
        let writer = Writer::start(Arc::new(Batches {
            pool: pool.clone(),
            seen: seen.clone(),
        }));
        Ok(Self {
            clock: pool.clone(),
            pool,
            writer,
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

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

super::shared::store_impl!(SqliteStore, sqlite_sql);

/// The group commit's transactions on the file.
struct Batches {
    pool: SqlitePool,
    seen: Arc<Seen>,
}

#[async_trait::async_trait]
impl Commit for Batches {
    async fn commit(&self, writes: &[Write]) -> Result<Vec<u64>, StoreError> {
        // IMMEDIATE: the audit chain's head is read and extended under the write lock.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_err("begin"))?;
        let (counts, appended) = sql::apply_all(&mut tx, &self.seen, writes).await?;
        tx.commit().await.map_err(query_err("commit"))?;
        if let Some(link) = appended {
            self.seen.advance(&link);
        }
        Ok(counts)
    }
}

/// SQLite's own upgrade path (PostgreSQL's schema starts where SQLite's is now); the tests of
/// both stores are in `backend_tests` and `chain_tests`.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::store::Store;

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
