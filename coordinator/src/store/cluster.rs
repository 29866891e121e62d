//! What several coordinators sharing one store keep there: their own rows (a heartbeat each),
//! which coordinator holds each agent's session, and which one owns (drives) each job, by a
//! lease the owner renews. SQLite implements it for its one coordinator; PostgreSQL for many.

use super::StoreError;

/// A coordinator process as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorRow {
    /// Its configured name (`name` in coordinator.toml): stable across restarts.
    pub name: String,
    /// This process: random per start, so a restarted coordinator is told from its predecessor.
    pub instance: String,
    /// Where agents and operators reach it.
    pub address: String,
    pub version: String,
    pub started_at_ms: i64,
    pub heartbeat_ms: i64,
}

impl CoordinatorRow {
    /// Alive: heartbeat within the lease.
    pub fn alive(&self, now_ms: i64, lease_ms: i64) -> bool {
        self.heartbeat_ms >= now_ms - lease_ms
    }
}

/// Who asks to own a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub instance: String,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours now; `previous` is the owner's name before (empty: nobody; ours: a restart).
    Claimed { previous: String },
    /// Another live owner holds it until `until_ms`.
    HeldBy { owner: String, until_ms: i64 },
    /// No such job.
    Missing,
}

/// A running job whose owner's lease has lapsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub job_id: String,
    pub owner: String,
}

#[async_trait::async_trait]
pub trait ClusterStore: Send + Sync {
    /// Registers this process under its name. Refused with the live holder's row when another
    /// instance of the same name heartbeat within `lease_ms` (two processes, one name).
    async fn register_coordinator(
        &self,
        me: &CoordinatorRow,
        lease_ms: i64,
    ) -> Result<Result<(), CoordinatorRow>, StoreError>;
    /// Renews this process's heartbeat; false when its name now belongs to another instance.
    async fn coordinator_heartbeat(&self, me: &Owner, now_ms: i64) -> Result<bool, StoreError>;
    async fn list_coordinators(&self) -> Result<Vec<CoordinatorRow>, StoreError>;
    /// Agents still marked online under a coordinator whose heartbeat lapsed are marked
    /// offline; returns how many.
    async fn release_agents_of_dead(&self, now_ms: i64, lease_ms: i64) -> Result<u64, StoreError>;
    /// At start: agents the previous process of this name held are offline until they
    /// reconnect.
    async fn mark_disconnected_held_by(&self, name: &str) -> Result<u64, StoreError>;
    /// The agent's session with coordinator `name` ended: offline, unless another coordinator
    /// holds it by now. True when it was marked offline.
    async fn agent_released(
        &self,
        host_id: &str,
        last_seen_ms: i64,
        name: &str,
    ) -> Result<bool, StoreError>;
    /// The live coordinator other than `not` holding `host_id`'s session, if any.
    async fn agent_holder(
        &self,
        host_id: &str,
        not: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<String>, StoreError>;
    /// Takes the job's lease until `now_ms + lease_ms` when it is free: ours already, our
    /// predecessor's (same name), nobody's, lapsed, or the job is not running. (A new job is
    /// claimed by its creator right after it is stored; `orphaned_jobs` leaves one nobody
    /// owns alone until it is `lease_ms` old, so only its creator claims it.)
    async fn claim_job(
        &self,
        job_id: &str,
        me: &Owner,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Claim, StoreError>;
    /// Extends our lease on each of `job_ids` we still own; returns those renewed.
    async fn renew_jobs(
        &self,
        me: &Owner,
        job_ids: &[String],
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Gives up our lease at once (the job ended, or this process is stopping).
    async fn release_job(&self, job_id: &str, me: &Owner) -> Result<(), StoreError>;
    /// Running jobs whose lease lapsed (or that nobody claimed within `lease_ms`) — ours too:
    /// a job this process stopped driving because its lease was about to lapse is resumed
    /// by whoever claims it first, this process included.
    async fn orphaned_jobs(&self, now_ms: i64, lease_ms: i64) -> Result<Vec<Orphan>, StoreError>;
    /// The job's owner name and lease end.
    async fn job_owner(&self, job_id: &str) -> Result<Option<(String, i64)>, StoreError>;
}
