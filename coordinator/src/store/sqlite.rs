//! The SQLite store: one file, WAL journal, schema from embedded migrations.

use std::path::Path;
use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{AgentRecord, Store, StoreError};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn query_err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

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
        Ok(Self { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn agent_connected(&self, a: &AgentRecord) -> Result<(), StoreError> {
        let labels = serde_json::to_string(&a.labels).map_err(|e| StoreError::Corrupt {
            key: a.host_id.clone(),
            reason: e.to_string(),
        })?;
        sqlx::query(
            "INSERT INTO agents (host_id, labels_json, agent_version, address, online, connected_at_ms, last_seen_ms, state)
             VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7)
             ON CONFLICT(host_id) DO UPDATE SET labels_json = ?2, agent_version = ?3, address = ?4,
                 online = 1, connected_at_ms = ?5, last_seen_ms = ?6, state = ?7",
        )
        .bind(&a.host_id)
        .bind(labels)
        .bind(&a.agent_version)
        .bind(&a.address)
        .bind(a.connected_at_ms)
        .bind(a.last_seen_ms)
        .bind(&a.state)
        .execute(&self.pool)
        .await
        .map_err(query_err("agent_connected"))?;
        Ok(())
    }

    async fn agent_disconnected(&self, host_id: &str, last_seen_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agents SET online = 0, last_seen_ms = MAX(last_seen_ms, ?2) WHERE host_id = ?1",
        )
        .bind(host_id)
        .bind(last_seen_ms)
        .execute(&self.pool)
        .await
        .map_err(query_err("agent_disconnected"))?;
        Ok(())
    }

    async fn agent_seen(
        &self,
        host_id: &str,
        last_seen_ms: i64,
        state: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agents SET last_seen_ms = MAX(last_seen_ms, ?2), state = COALESCE(?3, state) WHERE host_id = ?1",
        )
        .bind(host_id)
        .bind(last_seen_ms)
        .bind(state)
        .execute(&self.pool)
        .await
        .map_err(query_err("agent_seen"))?;
        Ok(())
    }

    async fn mark_all_disconnected(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE agents SET online = 0 WHERE online = 1")
            .execute(&self.pool)
            .await
            .map_err(query_err("mark_all_disconnected"))?;
        Ok(done.rows_affected())
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT host_id, labels_json, agent_version, address, online, connected_at_ms, last_seen_ms, state
             FROM agents ORDER BY host_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list_agents"))?;
        rows.into_iter()
            .map(|row| {
                let host_id: String = row.get("host_id");
                let labels_json: String = row.get("labels_json");
                let labels =
                    serde_json::from_str(&labels_json).map_err(|e| StoreError::Corrupt {
                        key: host_id.clone(),
                        reason: format!("labels: {e}"),
                    })?;
                Ok(AgentRecord {
                    labels,
                    agent_version: row.get("agent_version"),
                    address: row.get("address"),
                    online: row.get::<i64, _>("online") != 0,
                    connected_at_ms: row.get("connected_at_ms"),
                    last_seen_ms: row.get("last_seen_ms"),
                    state: row.get::<Option<Vec<u8>>, _>("state").unwrap_or_default(),
                    host_id,
                })
            })
            .collect()
    }
}
