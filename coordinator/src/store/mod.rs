//! Coordinator state behind one `Store` trait. SQLite (embedded, WAL) is the default;
//! PostgreSQL (`postgres`) implements the same trait with the same SQL (`shared`).

#[cfg(test)]
pub(crate) mod backend_tests;
pub mod chain;
#[cfg(test)]
pub(crate) mod chain_tests;
pub mod cluster;
mod cluster_sql;
#[cfg(test)]
mod cluster_tests;
mod postgres;
mod postgres_cluster;
mod shared;
mod sqlite;
mod sqlite_cluster;
mod writer;

use std::collections::{BTreeMap, HashMap};

pub use chain::{AuditFilter, AuditRecord, Broken, Problem, Verdict};
pub use postgres::{Password, PgStore, PgTarget, PgUrlError};
pub use sqlite::SqliteStore;

/// The store coordinator.toml names, opened.
#[derive(Debug, Clone)]
pub enum Opened {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Opened {
    /// Opens (and migrates) the SQLite file or connects to the PostgreSQL database.
    pub async fn open(database: &crate::config::Database) -> Result<Self, StoreError> {
        Ok(match database {
            crate::config::Database::Sqlite(path) => Self::Sqlite(SqliteStore::open(path).await?),
            crate::config::Database::Postgres { target, password } => {
                Self::Postgres(PgStore::open(target, password.as_ref()).await?)
            }
        })
    }

    pub fn shared(&self) -> std::sync::Arc<dyn Store> {
        match self {
            Self::Sqlite(s) => std::sync::Arc::new(s.clone()),
            Self::Postgres(s) => std::sync::Arc::new(s.clone()),
        }
    }

    /// The PostgreSQL pool, for the coordinators' bus (`cluster::pg_bus`).
    pub fn pg_pool(&self) -> Option<sqlx::PgPool> {
        match self {
            Self::Sqlite(_) => None,
            Self::Postgres(s) => Some(s.pool.clone()),
        }
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite(s) => s.close().await,
            Self::Postgres(s) => s.close().await,
        }
    }
}

/// A job event as stored: its seq, when, the host it is about (empty: the job's own event)
/// and the encoded `JobEvent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub seq: u64,
    pub at_ms: i64,
    pub host_id: String,
    pub event: Vec<u8>,
}

/// Which of a job's events a read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Events {
    All,
    /// The job's own events (no host): its history, and a watch for its end. A 10,000-host
    /// job stores about 50,000 events, all but a dozen of them about a host.
    JobsOwn,
}

/// What the store keeps about an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub host_id: String,
    /// The labels that target this host: the coordinator's inventory (config, then what
    /// operators set with `agents label`). Never what the agent claims.
    pub labels: HashMap<String, String>,
    /// The labels the agent reported in its Hello: facts for people, never used to target.
    pub reported_labels: HashMap<String, String>,
    pub agent_version: String,
    pub address: String,
    pub online: bool,
    pub connected_at_ms: i64,
    pub last_seen_ms: i64,
    /// Encoded `HostState` protobuf as last reported.
    pub state: Vec<u8>,
    /// Not-after (Unix ms) of the certificate its latest session presented; None if unknown.
    pub cert_not_after_ms: Option<i64>,
    /// The name of the coordinator that holds (or last held) its session.
    pub coordinator: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    /// The PostgreSQL store could not be reached or refused the login; `reason` never holds
    /// the password.
    #[error(
        "connecting to the store {database}: {reason} (check that the server is up and reachable from this host, the user and database exist, and the password in `database_password_file` or ROLLBACK_DATABASE_PASSWORD is the user's)"
    )]
    Connect { database: String, reason: String },
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
    #[error("store writer stopped (the coordinator is shutting down)")]
    Closed,
    #[error("store write failed: {reason}")]
    Batch { reason: String },
    #[error("store row for `{key}` is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// A conditional change found the row changed by someone else (another coordinator).
    #[error("{what} changed meanwhile (another coordinator acted on it first)")]
    Changed { what: String },
    /// A write for a job that another coordinator process has claimed since: the writer
    /// lost the job's lease, and nothing was written.
    #[error(
        "job {job_id} is now driven by another coordinator (this one lost its lease); nothing was written for it here"
    )]
    NotOwner { job_id: String },
    #[error("hosts are leased to another job: {}", holders.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    Leased { holders: Vec<LeaseHolder> },
    /// The audit record of a change could not be written: the change was not made either.
    #[error(
        "the audit record `{action}` for {target} could not be written, so the change it records was not made: {reason} (check the coordinator's store: disk, permissions, `rollbackctl audit verify`)"
    )]
    Audit {
        action: String,
        target: String,
        reason: String,
    },
}

/// What became of a reported run result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultTaken {
    Recorded,
    /// No such run (e.g. an exec of an earlier store): nothing recorded.
    UnknownRun,
    /// The run was sent to another host: nothing recorded.
    OtherHost(String),
    /// The run already has its result (a resend from the agent's journal): kept as it was.
    AlreadyRecorded,
}

/// A run as the coordinator dispatched it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRow {
    pub run_id: String,
    pub job_id: String,
    pub host_id: String,
    pub requested_by: String,
    pub reason: String,
    /// Encoded `RunProcedure`.
    pub procedure: Vec<u8>,
    pub status: i32,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    /// Encoded `RunFinished`, once reported.
    pub result: Option<Vec<u8>>,
    /// The job phase this run belongs to ("" for exec).
    pub phase: String,
}

/// What a job's record shows of one run: its host, phase and result. Read for every run of a
/// job by `GetJob`, where the other columns of a run (its procedure, requester, reason) were
/// 7 of 11 values per row copied out of the store and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunResultRow {
    pub run_id: String,
    pub host_id: String,
    /// The job phase this run belongs to ("" for exec).
    pub phase: String,
    /// Encoded `RunFinished`, once reported.
    pub result: Option<Vec<u8>>,
}

/// Which jobs `Store::list_jobs` returns; an empty field matches every job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub limit: u32,
    pub state: String,
    pub procedure: String,
    /// Jobs that targeted this host.
    pub host_id: String,
    /// Created at or after (unix ms; 0: any time).
    pub since_ms: i64,
    /// `rollback` (every procedure but `snapshot` and `diagnose`), `snapshot` or `diagnose`.
    pub kind: String,
    /// Job ids starting with this (hex digits only: checked by the caller).
    pub id_prefix: String,
}

/// A rollback job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub job_id: String,
    pub procedure: String,
    /// Encoded `RollbackRequest`.
    pub request: Vec<u8>,
    /// Encoded `PlanResponse`.
    pub plan: Vec<u8>,
    pub state: String,
    pub reason: String,
    pub requested_by: String,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub halt_reason: String,
    /// The client's idempotency key ("" when none was given).
    pub request_id: String,
}

/// One host's outcome in a job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobHostRow {
    pub job_id: String,
    pub host_id: String,
    pub ord: i64,
    pub outcome: String,
    pub phase: String,
    pub failed_step: String,
    pub exit_code: i32,
    pub detail: String,
    pub duration_ms: i64,
    pub once_only: bool,
    /// Phases this host completed, in order (persisted as each one completes).
    pub done_phases: Vec<String>,
}

/// A job's two-person approval.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApprovalRow {
    pub job_id: String,
    /// Why approval is needed, e.g. "procedure database".
    pub rule: String,
    pub requested_by: String,
    pub requested_at_ms: i64,
    pub expires_at_ms: i64,
    /// "" while pending; then approved, denied, expired or cancelled.
    pub decision: String,
    pub decided_by: String,
    pub decided_at_ms: Option<i64>,
    pub reason: String,
}

/// A host held by another job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub host_id: String,
    pub job_id: String,
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (held by job {})", self.host_id, self.job_id)
    }
}

/// A host's inventory labels by where they come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// From coordinator.toml `[inventory]`.
    pub config: HashMap<String, String>,
    /// Set with `rollbackctl agents label`; wins over `config`.
    pub operator: HashMap<String, String>,
}

impl Inventory {
    /// The labels that target the host.
    pub fn effective(&self) -> HashMap<String, String> {
        let mut out = self.config.clone();
        out.extend(self.operator.clone());
        out
    }
}

/// Where the agent's claim differs from the inventory: `key: reported X, inventory Y` for each
/// key the agent reports with another value or that the inventory does not have. A key only
/// the inventory has is no mismatch (agents need not report every label).
pub fn label_mismatch(
    inventory: &HashMap<String, String>,
    reported: &HashMap<String, String>,
) -> Vec<String> {
    let mut out: Vec<String> = reported
        .iter()
        .filter(|(k, v)| inventory.get(*k) != Some(*v))
        .map(|(k, v)| match inventory.get(k) {
            Some(inv) => format!("{k}: reported {v}, inventory {inv}"),
            None => format!("{k}: reported {v}, not in the inventory"),
        })
        .collect();
    out.sort();
    out
}

/// One audit trail entry, as the code that makes a change describes it; the store gives it its
/// place in the hash chain (`chain`). `actor` is who acted and is never empty: the operator's
/// identity for console actions, `agent/HOST` for what an agent reported, `coordinator` for
/// the engine's own decisions. `target` names what was acted on — `job/ID`, `run/ID`,
/// `host/ID` — and the record's job id is derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// One host's part of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotRow {
    pub snapshot_id: String,
    pub host_id: String,
    pub job_id: String,
    pub label: String,
    pub taken_at_ms: i64,
    pub git_sha: String,
    pub git_subject: String,
    pub alembic_revision: String,
    pub env_sha256: String,
    pub unit_state: String,
    pub db_backup: String,
    /// The guard's baseline measured with the snapshot (JSON of `jobs::guard::Baseline`).
    pub baseline: String,
}

/// Everything the coordinator persists. Each call is durable when it returns.
#[async_trait::async_trait]
pub trait Store: cluster::ClusterStore + Send + Sync + 'static {
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
    /// Records a run before it is dispatched. `by` is the instance of the coordinator process
    /// writing: a run of a job another process has claimed since is refused
    /// (`StoreError::NotOwner`), as every job write below is.
    async fn create_run(&self, run: &RunRow, by: &str) -> Result<(), StoreError>;
    /// Records a run's result as reported by `host_id`, with its audit record, in one
    /// transaction — only if the run was sent to that host and has no result yet (a result
    /// speaks only for its own host, and only once). The audit record says what was done.
    async fn finish_run(
        &self,
        run_id: &str,
        host_id: &str,
        status: i32,
        finished_at_ms: i64,
        result: &[u8],
        audit: &AuditEvent,
    ) -> Result<ResultTaken, StoreError>;
    async fn get_run(&self, run_id: &str) -> Result<Option<RunRow>, StoreError>;
    /// The stored runs among `run_ids` (those the store does not have are left out; one
    /// asked twice may come twice), in no particular order: a statement per 500 runs, for a
    /// batch of peers' messages.
    async fn get_runs(&self, run_ids: &[String]) -> Result<Vec<RunRow>, StoreError>;
    /// Runs dispatched to `host_id` whose result has not been recorded, oldest first.
    async fn unfinished_runs(&self, host_id: &str) -> Result<Vec<RunRow>, StoreError>;
    /// Appends one record to the audit chain, on its own: for a change that is made after its
    /// record is durable (an exec, a cancel). A change the store makes itself takes its record
    /// as a parameter and writes both in one transaction. Fails with `StoreError::Audit`.
    async fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;
    /// Records a new job with its hosts and its audit record, and leases `leased` to it,
    /// atomically; fails with `StoreError::Leased` (writing nothing) when any of them is leased
    /// to another job, or `StoreError::Audit` (writing nothing).
    async fn create_job(
        &self,
        job: &JobRow,
        hosts: &[JobHostRow],
        leased: &[String],
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Reopens an ended job (`job resume`), atomically with its audit record: leases `leased`
    /// to it (failing with `StoreError::Leased`, writing nothing, when another job holds any),
    /// stores the `reset` host rows and sets the job `running` again.
    async fn reopen_job(
        &self,
        job_id: &str,
        leased: &[String],
        reset: &[JobHostRow],
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Which of `hosts` are leased, and to which job.
    async fn lease_holders(&self, hosts: &[String]) -> Result<Vec<LeaseHolder>, StoreError>;
    /// Ids of jobs stored as `running` (at start-up: the jobs to resume).
    async fn running_jobs(&self) -> Result<Vec<String>, StoreError>;
    /// Removes a decommissioned agent, with its audit record in the same transaction; its
    /// jobs' history stays. False (and no record) when there was no such agent.
    async fn forget_agent(&self, host_id: &str, audit: &AuditEvent) -> Result<bool, StoreError>;
    /// Sets a job's state, with its audit record in the same transaction; any state but
    /// `running` releases its leases in that transaction too.
    async fn update_job_state(
        &self,
        job_id: &str,
        by: &str,
        state: &str,
        finished_at_ms: Option<i64>,
        halt_reason: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Stores host rows (inserted, or their progress updated), committed together.
    async fn update_job_hosts(&self, hosts: &[JobHostRow], by: &str) -> Result<(), StoreError>;
    /// Several events of one job, committed together.
    async fn append_job_events(
        &self,
        job_id: &str,
        by: &str,
        events: Vec<EventRow>,
    ) -> Result<(), StoreError>;
    /// Encoded events of a job with seq > `after_seq`, in order: all of them, or only the
    /// job's own (`Events::JobsOwn`; a caller still checks the decoded event's host, as rows
    /// stored before the host was (migration 0012, PostgreSQL 0004) have none).
    async fn job_events(
        &self,
        job_id: &str,
        after_seq: u64,
        which: Events,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The highest seq a job's stored events have, if any.
    async fn last_job_seq(&self, job_id: &str) -> Result<Option<u64>, StoreError>;
    async fn get_job(&self, job_id: &str) -> Result<Option<(JobRow, Vec<JobHostRow>)>, StoreError>;
    /// The job's own row, without its hosts (10,000 rows for a fleet-wide job).
    async fn job_row(&self, job_id: &str) -> Result<Option<JobRow>, StoreError>;
    /// The job a StartRollback with this idempotency key created, if any.
    async fn job_for_request(&self, request_id: &str) -> Result<Option<JobRow>, StoreError>;
    /// Jobs matching `filter`, newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRow>, StoreError>;
    async fn job_runs(&self, job_id: &str) -> Result<Vec<RunRow>, StoreError>;
    /// The results of a job's runs, in the order the runs were made (as `job_runs`).
    async fn job_run_results(&self, job_id: &str) -> Result<Vec<RunResultRow>, StoreError>;
    /// Records one host's snapshot with its audit record, in one transaction.
    async fn insert_snapshot(
        &self,
        row: &SnapshotRow,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Every snapshot row, newest first.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotRow>, StoreError>;
    /// Audit records matching `filter`, newest first.
    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;
    /// Walks the whole audit chain from genesis: intact, or the first record that was changed
    /// or removed.
    async fn verify_audit(&self) -> Result<Verdict, StoreError>;
    /// Replaces the inventory labels that come from coordinator.toml with `labels` (host →
    /// key → value), with `audit` in the same transaction when anything changed; returns
    /// whether anything did.
    async fn sync_config_inventory(
        &self,
        labels: &BTreeMap<String, BTreeMap<String, String>>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError>;
    /// One host's inventory labels.
    async fn inventory(&self, host_id: &str) -> Result<Inventory, StoreError>;
    /// Records a job that waits for approval: the job (state `awaiting_approval`), its hosts,
    /// its leases (as `create_job`), its approval row and `audit`, atomically.
    async fn create_job_awaiting(
        &self,
        job: &JobRow,
        hosts: &[JobHostRow],
        leased: &[String],
        approval: &ApprovalRow,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Decides a pending approval, atomically and only once: `approved` sets the job
    /// `running`; `denied`, `expired` and `cancelled` end it in that state (`cancelled` for
    /// a withdrawn request) and release its leases. Writes `audit` with it. Returns false
    /// (writing nothing) when the job was not awaiting approval any more.
    async fn decide_approval(
        &self,
        job_id: &str,
        decision: &str,
        by: &str,
        at_ms: i64,
        reason: &str,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError>;
    async fn job_approval(&self, job_id: &str) -> Result<Option<ApprovalRow>, StoreError>;
    /// Approvals still pending, oldest first.
    async fn pending_approvals(&self) -> Result<Vec<ApprovalRow>, StoreError>;
    /// Sets and removes operator inventory labels of `host_id`, with `audit`, in one
    /// transaction.
    async fn label_host(
        &self,
        host_id: &str,
        set: &[(String, String)],
        remove: &[String],
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
}

/// The embedded migrations up to `version`: a store as an older release left it.
#[cfg(test)]
fn migrations_up_to(version: i64) -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.migrations = m
        .migrations
        .iter()
        .filter(|x| x.version <= version)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    m
}
