//! Coordinator state behind one `Store` trait. SQLite (embedded, WAL) is the default; other
//! backends implement the same trait.

mod sqlite;

use std::collections::HashMap;

pub use sqlite::SqliteStore;

/// What the store keeps about an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub host_id: String,
    pub labels: HashMap<String, String>,
    pub agent_version: String,
    pub address: String,
    pub online: bool,
    pub connected_at_ms: i64,
    pub last_seen_ms: i64,
    /// Encoded `HostState` protobuf as last reported.
    pub state: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating store {path}: {source}")]
    Migrate {
        path: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("store query `{what}`: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("store row for `{key}` is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Everything the coordinator persists. Each call is durable when it returns.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a (re)connected agent as online.
    async fn agent_connected(&self, agent: &AgentRecord) -> Result<(), StoreError>;
    /// Records that an agent's session ended.
    async fn agent_disconnected(&self, host_id: &str, last_seen_ms: i64) -> Result<(), StoreError>;
    /// Refreshes last-seen time and reported state of an online agent.
    async fn agent_seen(
        &self,
        host_id: &str,
        last_seen_ms: i64,
        state: Option<&[u8]>,
    ) -> Result<(), StoreError>;
    /// Marks every agent disconnected (at start-up: no session survives a restart).
    async fn mark_all_disconnected(&self) -> Result<u64, StoreError>;
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
}
