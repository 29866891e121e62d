//! The SQL both stores run, written once. Every statement here is portable between SQLite and
//! PostgreSQL (`$N` parameters, which sqlx's SQLite driver takes too; no `INSERT OR REPLACE`,
//! no two-argument `MAX`); `backend!` instantiates the functions that run them for one sqlx
//! database (`sqlite_sql`, `pg_sql`), so the SQLite store, its group-commit `writer` and the
//! PostgreSQL store share every query. What differs stays in each store: how a transaction
//! that appends to the audit chain begins (SQLite's `BEGIN IMMEDIATE`, PostgreSQL's advisory
//! lock), connection set-up and migrations.

use std::collections::{BTreeMap, HashMap};

use sqlx::Row;

use super::chain::Link;
use super::{
    AgentRecord, ApprovalRow, AuditEvent, AuditRecord, EventRow, Events, Inventory, JobHostRow,
    JobRow, ResultTaken, RunResultRow, RunRow, SnapshotRow, StoreError,
};

/// A column read by name from a row of either database. A row the store wrote has the types
/// the schema gives it; a column of another type is a corrupt store (sqlx panics, as `get`
/// does everywhere in the store).
pub(super) trait Cols {
    fn text(&self, c: &str) -> String;
    fn int(&self, c: &str) -> i64;
    fn int32(&self, c: &str) -> i32;
    fn opt_int(&self, c: &str) -> Option<i64>;
    fn bytes(&self, c: &str) -> Vec<u8>;
    fn opt_bytes(&self, c: &str) -> Option<Vec<u8>>;
}

macro_rules! cols_for {
    ($row:ty) => {
        impl Cols for $row {
            fn text(&self, c: &str) -> String {
                self.get(c)
            }
            fn int(&self, c: &str) -> i64 {
                self.get(c)
            }
            fn int32(&self, c: &str) -> i32 {
                self.get(c)
            }
            fn opt_int(&self, c: &str) -> Option<i64> {
                self.get(c)
            }
            fn bytes(&self, c: &str) -> Vec<u8> {
                self.get(c)
            }
            fn opt_bytes(&self, c: &str) -> Option<Vec<u8>> {
                self.get(c)
            }
        }
    };
}
cols_for!(sqlx::sqlite::SqliteRow);
cols_for!(sqlx::postgres::PgRow);

pub(super) fn query_err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

pub(super) fn db_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

pub(super) const RUN_COLUMNS: &str = "run_id, job_id, host_id, requested_by, reason, procedure, status, created_at_ms, finished_at_ms, result, phase";
pub(super) const JOB_COLUMNS: &str = "job_id, procedure, request, plan, state, reason, requested_by, created_at_ms, finished_at_ms, halt_reason, request_id";
const APPROVAL_COLUMNS: &str = "job_id, rule, requested_by, requested_at_ms, expires_at_ms, decision, decided_by, decided_at_ms, reason";
/// Columns of a stored audit record, in the order `audit_record` reads them.
pub(super) const AUDIT_COLUMNS: &str =
    "id, seq, at_ms, actor, action, target, detail, job_id, prev_hash, hash";

/// What one transaction of the group commit knows so far: the jobs it fenced (`fence`) and,
/// once it appended to the audit chain, the chain's head (its own record, not read back).
#[derive(Default)]
pub(super) struct TxState {
    fenced: std::collections::HashSet<String>,
    head: Option<Link>,
}

/// Host rows stored by one statement (`upsert_job_hosts`), events by one statement: 11 and 4
/// parameters a row, well under SQLite's and PostgreSQL's limits on one statement's.
const ROWS_PER_INSERT: usize = 500;

/// `rows` cut into statements of a few fixed sizes: `ROWS_PER_INSERT` while that many are
/// left, then powers of two, largest first (37 rows: 32, 4, 1). A multi-row statement's text
/// depends on its row count, and a connection reuses a prepared statement only for the same
/// text; batches of every size from 1 to 500 would each be prepared (parsed and compiled)
/// again, at a cost that grows with the rows. With these sizes a statement kind has at most ten
/// texts, which stay in the connection's statement cache.
pub(super) fn fixed_chunks<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        let n = match rest.len() {
            0 => return None,
            n if n >= ROWS_PER_INSERT => ROWS_PER_INSERT,
            n => 1 << n.ilog2(),
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

pub(super) fn run_row(row: &impl Cols) -> RunRow {
    RunRow {
        run_id: row.text("run_id"),
        job_id: row.text("job_id"),
        host_id: row.text("host_id"),
        requested_by: row.text("requested_by"),
        reason: row.text("reason"),
        procedure: row.bytes("procedure"),
        status: row.int32("status"),
        created_at_ms: row.int("created_at_ms"),
        finished_at_ms: row.opt_int("finished_at_ms"),
        result: row.opt_bytes("result"),
        phase: row.text("phase"),
    }
}

pub(super) fn job_row(row: &impl Cols) -> JobRow {
    JobRow {
        job_id: row.text("job_id"),
        procedure: row.text("procedure"),
        request: row.bytes("request"),
        plan: row.bytes("plan"),
        state: row.text("state"),
        reason: row.text("reason"),
        requested_by: row.text("requested_by"),
        created_at_ms: row.int("created_at_ms"),
        finished_at_ms: row.opt_int("finished_at_ms"),
        halt_reason: row.text("halt_reason"),
        request_id: row.text("request_id"),
    }
}

fn approval_row(row: &impl Cols) -> ApprovalRow {
    ApprovalRow {
        job_id: row.text("job_id"),
        rule: row.text("rule"),
        requested_by: row.text("requested_by"),
        requested_at_ms: row.int("requested_at_ms"),
        expires_at_ms: row.int("expires_at_ms"),
        decision: row.text("decision"),
        decided_by: row.text("decided_by"),
        decided_at_ms: row.opt_int("decided_at_ms"),
        reason: row.text("reason"),
    }
}

fn job_host_row(row: &impl Cols) -> JobHostRow {
    JobHostRow {
        job_id: row.text("job_id"),
        host_id: row.text("host_id"),
        ord: row.int("ord"),
        outcome: row.text("outcome"),
        phase: row.text("phase"),
        failed_step: row.text("failed_step"),
        exit_code: row.int32("exit_code"),
        detail: row.text("detail"),
        duration_ms: row.int("duration_ms"),
        once_only: row.int("once_only") != 0,
        done_phases: split_phases(&row.text("done_phases")),
    }
}

fn snapshot_row(r: &impl Cols) -> SnapshotRow {
    SnapshotRow {
        snapshot_id: r.text("snapshot_id"),
        host_id: r.text("host_id"),
        job_id: r.text("job_id"),
        label: r.text("label"),
        taken_at_ms: r.int("taken_at_ms"),
        git_sha: r.text("git_sha"),
        git_subject: r.text("git_subject"),
        alembic_revision: r.text("alembic_revision"),
        env_sha256: r.text("env_sha256"),
        unit_state: r.text("unit_state"),
        db_backup: r.text("db_backup"),
        baseline: r.text("baseline"),
    }
}

pub(super) fn audit_record(row: &impl Cols) -> AuditRecord {
    AuditRecord {
        id: row.int("id"),
        // A negative seq can only be a hand edit: 0 is out of order wherever it appears.
        seq: u64::try_from(row.int("seq")).unwrap_or(0),
        event: AuditEvent {
            at_ms: row.int("at_ms"),
            actor: row.text("actor"),
            action: row.text("action"),
            target: row.text("target"),
            detail: row.text("detail"),
        },
        job_id: row.text("job_id"),
        prev_hash: row.text("prev_hash"),
        hash: row.text("hash"),
    }
}

fn agent_record(
    row: &impl Cols,
    inventory: &mut HashMap<String, Inventory>,
) -> Result<AgentRecord, StoreError> {
    let host_id = row.text("host_id");
    let reported_labels =
        serde_json::from_str(&row.text("labels_json")).map_err(|e| StoreError::Corrupt {
            key: host_id.clone(),
            reason: format!("labels: {e}"),
        })?;
    Ok(AgentRecord {
        labels: inventory.remove(&host_id).unwrap_or_default().effective(),
        reported_labels,
        agent_version: row.text("agent_version"),
        address: row.text("address"),
        online: row.int("online") != 0,
        connected_at_ms: row.int("connected_at_ms"),
        last_seen_ms: row.int("last_seen_ms"),
        state: row.opt_bytes("state").unwrap_or_default(),
        cert_not_after_ms: row.opt_int("cert_not_after_ms"),
        coordinator: row.text("coordinator"),
        host_id,
    })
}

/// Phase names are stored one per line (a runbook phase name has no newline).
fn split_phases(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Inventory rows (host, key, value, source) by host.
fn inventories(rows: Vec<(String, String, String, String)>) -> HashMap<String, Inventory> {
    let mut out: HashMap<String, Inventory> = HashMap::new();
    for (host, key, value, source) in rows {
        let inv = out.entry(host).or_default();
        match source.as_str() {
            "config" => inv.config.insert(key, value),
            _ => inv.operator.insert(key, value),
        };
    }
    out
}

/// The job state an approval decision leads to, and the job's halt reason; an unknown
/// decision is refused.
pub(super) fn decided_state(
    job_id: &str,
    decision: &str,
    by: &str,
    reason: &str,
) -> Result<(&'static str, String), StoreError> {
    Ok(match decision {
        "approved" => ("running", String::new()),
        "denied" => ("denied", format!("{decision} by {by}: {reason}")),
        "expired" => ("expired", format!("{decision} by {by}: {reason}")),
        "cancelled" => ("cancelled", format!("{decision} by {by}: {reason}")),
        other => {
            return Err(StoreError::Corrupt {
                key: job_id.to_string(),
                reason: format!("`{other}` is not an approval decision"),
            });
        }
    })
}

/// `FinishRun` answers: the result was stored, the run is unknown, it belongs to another
/// host, or it already had its result.
pub(super) const TAKEN_UNKNOWN: u64 = 0;
pub(super) const TAKEN_RECORDED: u64 = 1;
pub(super) const TAKEN_OTHER_HOST: u64 = 2;
pub(super) const TAKEN_ALREADY: u64 = 3;

/// A write applied in a caller's transaction: the SQLite store's group-commit writer batches
/// them, the PostgreSQL store commits each in a transaction of its own.
#[derive(Debug)]
pub(super) enum Write {
    /// Writes for a job name the coordinator process making them (`by`, its instance): see
    /// `fence`.
    CreateRun {
        run: RunRow,
        by: String,
    },
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
        by: String,
        events: Vec<EventRow>,
    },
    JobHosts {
        rows: Vec<JobHostRow>,
        by: String,
    },
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

impl Write {
    /// Whether applying it may append to the audit chain (its transaction must be one that
    /// appends: serialized with every other).
    pub(super) fn appends(&self) -> bool {
        matches!(
            self,
            Write::FinishRun { .. }
                | Write::Audit(_)
                | Write::Labels { .. }
                | Write::ConfigInventory { .. }
        )
    }
}

/// The write that replaces the inventory from coordinator.toml (host → key → value).
pub(super) fn config_inventory(
    labels: &BTreeMap<String, BTreeMap<String, String>>,
    audit: &AuditEvent,
) -> Write {
    let labels = labels
        .iter()
        .flat_map(|(host, kv)| {
            kv.iter()
                .map(move |(k, v)| (host.clone(), k.clone(), v.clone()))
        })
        .collect();
    Write::ConfigInventory {
        labels,
        audit: audit.clone(),
    }
}

/// The write that sets and removes operator labels of one host.
pub(super) fn labels(
    host_id: &str,
    set: &[(String, String)],
    remove: &[String],
    audit: &AuditEvent,
) -> Write {
    Write::Labels {
        host_id: host_id.to_string(),
        set: set.to_vec(),
        remove: remove.to_vec(),
        at_ms: audit.at_ms,
        audit: audit.clone(),
    }
}

/// What a `FinishRun` write's answer means; for another host's run, whose it is.
pub(super) async fn result_taken<F>(
    code: u64,
    run: impl FnOnce() -> F,
) -> Result<ResultTaken, StoreError>
where
    F: std::future::Future<Output = Result<Option<RunRow>, StoreError>>,
{
    Ok(match code {
        TAKEN_RECORDED => ResultTaken::Recorded,
        TAKEN_ALREADY => ResultTaken::AlreadyRecorded,
        TAKEN_OTHER_HOST => {
            ResultTaken::OtherHost(run().await?.map(|r| r.host_id).unwrap_or_default())
        }
        _ => ResultTaken::UnknownRun,
    })
}

/// Refuses a record that names no actor or no action, before anything is written.
pub(super) fn check_attributed(event: &AuditEvent) -> Result<(), StoreError> {
    if event.actor.trim().is_empty() {
        return Err(audit_refused(
            event,
            "it names no actor; every record says who acted (an operator's identity, `agent/HOST` or `coordinator`)".into(),
        ));
    }
    if event.action.trim().is_empty() {
        return Err(audit_refused(event, "it names no action".into()));
    }
    Ok(())
}

/// `StoreError::Audit` for `event`.
pub(super) fn audit_refused(event: &AuditEvent, reason: String) -> StoreError {
    StoreError::Audit {
        action: event.action.clone(),
        target: event.target.clone(),
        reason,
    }
}

/// A run's result as `Write::FinishRun` carries it, borrowed (the group commit records many
/// in one statement).
pub(super) struct Finish<'a> {
    run_id: &'a str,
    host_id: &'a str,
    status: i32,
    finished_at_ms: i64,
    result: &'a [u8],
    audit: &'a AuditEvent,
}

/// A heartbeat as `Write::AgentSeen` carries it, borrowed (the group commit refreshes many
/// hosts in one statement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Heard<'a> {
    host_id: &'a str,
    last_seen_ms: i64,
    state: Option<&'a [u8]>,
}

/// One heartbeat per host, as applying `heard` in order would leave the host's row: the
/// latest time (a row's time never goes back) and the last state sent (a heartbeat without
/// one keeps it). Hosts keep the order of their first heartbeat.
fn merge_heard<'a>(heard: &[Heard<'a>]) -> Vec<Heard<'a>> {
    let mut merged: Vec<Heard<'a>> = Vec::with_capacity(heard.len());
    let mut at: HashMap<&str, usize> = HashMap::with_capacity(heard.len());
    for h in heard {
        match at.get(h.host_id) {
            Some(&i) => {
                let m = &mut merged[i];
                m.last_seen_ms = m.last_seen_ms.max(h.last_seen_ms);
                if h.state.is_some() {
                    m.state = h.state;
                }
            }
            None => {
                at.insert(h.host_id, merged.len());
                merged.push(*h);
            }
        }
    }
    merged
}

/// A chain link read from a head row.
fn link(seq: i64, hash: String) -> Link {
    Link {
        seq: u64::try_from(seq).unwrap_or(0),
        hash,
    }
}

/// Defines, for one sqlx database, the functions that run the shared SQL: reads on a pool,
/// and writes on a connection inside the caller's transaction.
macro_rules! backend {
    ($module:ident, $db:ty, $key_share:literal) => {
        pub(super) mod $module {
            use std::collections::HashMap;

            use futures::TryStreamExt;
            use sqlx::Row;

            use super::super::chain::{self, Link, Seen, Walk};
            use super::super::{
                AgentRecord, ApprovalRow, AuditEvent, AuditFilter, AuditRecord, Broken, Inventory,
                JobFilter, JobHostRow, JobRow, LeaseHolder, Problem, RunRow, SnapshotRow, StoreError,
                Verdict,
            };
            use super::*;

            type Conn = <$db as sqlx::Database>::Connection;
            type Pool = sqlx::Pool<$db>;

            /// Inserts or updates host rows, a few statements (`fixed_chunks`; on
            /// PostgreSQL every statement is a round trip, and a large job has thousands);
            /// a host named twice keeps its last row. Returns the rows changed.
            pub(in crate::store) async fn upsert_job_hosts(
                conn: &mut Conn,
                rows: &[JobHostRow],
                what: &'static str,
            ) -> Result<u64, StoreError> {
                let mut last: HashMap<(&str, &str), &JobHostRow> = HashMap::new();
                let mut order = Vec::new();
                for h in rows {
                    if last.insert((h.job_id.as_str(), h.host_id.as_str()), h).is_none() {
                        order.push((h.job_id.as_str(), h.host_id.as_str()));
                    }
                }
                let unique: Vec<&JobHostRow> = order.iter().filter_map(|k| last.get(k).copied()).collect();
                let mut n = 0;
                for chunk in fixed_chunks(&unique) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO job_hosts (job_id, host_id, ord, outcome, phase, failed_step, exit_code, detail, duration_ms, once_only, done_phases) ",
                    );
                    insert.push_values(chunk, |mut row, h| {
                        row.push_bind(&h.job_id)
                            .push_bind(&h.host_id)
                            .push_bind(h.ord)
                            .push_bind(&h.outcome)
                            .push_bind(&h.phase)
                            .push_bind(&h.failed_step)
                            .push_bind(h.exit_code)
                            .push_bind(&h.detail)
                            .push_bind(h.duration_ms)
                            .push_bind(i64::from(h.once_only))
                            .push_bind(h.done_phases.join("\n"));
                    });
                    insert.push(
                        " ON CONFLICT(job_id, host_id) DO UPDATE SET outcome = excluded.outcome, phase = excluded.phase,
                         failed_step = excluded.failed_step, exit_code = excluded.exit_code, detail = excluded.detail,
                         duration_ms = excluded.duration_ms, done_phases = excluded.done_phases",
                    );
                    n += insert
                        .build()
                        .execute(&mut *conn)
                        .await
                        .map_err(query_err(what))?
                        .rows_affected();
                }
                Ok(n)
            }

            // ---- the audit chain -------------------------------------------------------

            async fn head(conn: &mut Conn) -> Result<Option<Link>, sqlx::Error> {
                let row = sqlx::query(
                    "SELECT seq, hash FROM audit_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
                )
                .fetch_optional(&mut *conn)
                .await?;
                Ok(row.map(|r| link(r.get("seq"), r.get("hash"))))
            }

            /// The stored head of the chain (None when it has no record).
            pub(in crate::store) async fn stored_head(
                pool: &Pool,
            ) -> Result<Option<Link>, StoreError> {
                let mut conn = pool.acquire().await.map_err(query_err("audit chain head"))?;
                head(&mut conn).await.map_err(query_err("audit chain head"))
            }

            /// The job a record is about, from its target: `job/ID` is that job, `run/ID` the
            /// run's job ("" for an exec), anything else none.
            async fn job_of(conn: &mut Conn, target: &str) -> Result<String, sqlx::Error> {
                if let Some(job) = target.strip_prefix("job/") {
                    return Ok(job.to_string());
                }
                if let Some(run) = target.strip_prefix("run/") {
                    let job: Option<String> =
                        sqlx::query_scalar("SELECT job_id FROM runs WHERE run_id = $1")
                            .bind(run)
                            .fetch_optional(&mut *conn)
                            .await?;
                    return Ok(job.unwrap_or_default());
                }
                Ok(String::new())
            }

            /// Appends `event` as the next record of the chain, in the caller's transaction
            /// (which must be one that appends: serialized with every other); returns its
            /// link, for `Seen::advance` once the caller committed. Refuses a record without an
            /// actor. Any failure is `StoreError::Audit`: the caller's transaction, and so the
            /// change the record is about, must not commit.
            pub(in crate::store) async fn append(
                conn: &mut Conn,
                event: &AuditEvent,
                seen: &Seen,
            ) -> Result<Link, StoreError> {
                append_in(conn, event, seen, &mut TxState::default(), None).await
            }

            /// `append` in a group commit's transaction: chains from the record this
            /// transaction appended last, if any (else from the stored head), and takes the
            /// record's job as `job`, when the caller knows it, instead of reading it.
            async fn append_in(
                conn: &mut Conn,
                event: &AuditEvent,
                seen: &Seen,
                cx: &mut TxState,
                job: Option<&str>,
            ) -> Result<Link, StoreError> {
                let records = [(event.clone(), job.map(str::to_string))];
                append_all(conn, &records, seen, cx)
                    .await?
                    .ok_or_else(|| audit_refused(event, "nothing was appended".into()))
            }

            /// `append_in` for several records, chained in order and stored by a few
            /// statements (`fixed_chunks`); returns the last one's link (None for no record). Every
            /// record is checked before anything is written.
            async fn append_all(
                conn: &mut Conn,
                records: &[(AuditEvent, Option<String>)],
                seen: &Seen,
                cx: &mut TxState,
            ) -> Result<Option<Link>, StoreError> {
                let Some((first, _)) = records.first() else {
                    return Ok(None);
                };
                for (event, _) in records {
                    check_attributed(event)?;
                }
                let stored = match cx.head.take() {
                    Some(mine) => Some(mine),
                    None => head(conn).await.map_err(|e| audit_refused(first, e.to_string()))?,
                };
                let mut prev = seen.chain_from(stored);
                let mut rows = Vec::with_capacity(records.len());
                for (event, job) in records {
                    let job_id = match job {
                        Some(job) => job.clone(),
                        None => job_of(conn, &event.target)
                            .await
                            .map_err(|e| audit_refused(event, e.to_string()))?,
                    };
                    let seq = prev.seq + 1;
                    let hash = chain::hash_of(seq, event, &job_id, &prev.hash);
                    let prev_hash = std::mem::replace(&mut prev, Link { seq, hash }).hash;
                    rows.push((event, seq, prev_hash, prev.hash.clone(), job_id));
                }
                for chunk in fixed_chunks(&rows) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO audit_events (at_ms, actor, action, target, detail, seq, prev_hash, hash, job_id) ",
                    );
                    insert.push_values(chunk, |mut row, (event, seq, prev_hash, hash, job_id)| {
                        row.push_bind(event.at_ms)
                            .push_bind(&event.actor)
                            .push_bind(&event.action)
                            .push_bind(&event.target)
                            .push_bind(&event.detail)
                            .push_bind(db_seq(*seq))
                            .push_bind(prev_hash)
                            .push_bind(hash)
                            .push_bind(job_id);
                    });
                    if let Err(e) = insert.build().execute(&mut *conn).await {
                        return Err(audit_refused(chunk[0].0, e.to_string()));
                    }
                }
                cx.head = Some(prev.clone());
                Ok(Some(prev))
            }

            /// Chains the records written before the chain existed, in id order — once: only
            /// while no record has a place in the chain yet. Returns how many it chained.
            pub(in crate::store) async fn chain_unchained_history(
                conn: &mut Conn,
            ) -> Result<u64, StoreError> {
                let what = "chaining the audit records written before the chain";
                let started: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM audit_events WHERE seq IS NOT NULL)",
                )
                .fetch_one(&mut *conn)
                .await
                .map_err(query_err(what))?;
                if started {
                    return Ok(0);
                }
                let rows = sqlx::query(
                    "SELECT id, at_ms, actor, action, target, detail FROM audit_events WHERE seq IS NULL ORDER BY id",
                )
                .fetch_all(&mut *conn)
                .await
                .map_err(query_err(what))?;
                let mut prev = Link::genesis();
                for row in &rows {
                    let event = AuditEvent {
                        at_ms: row.get("at_ms"),
                        actor: row.get("actor"),
                        action: row.get("action"),
                        target: row.get("target"),
                        detail: row.get("detail"),
                    };
                    let seq = prev.seq + 1;
                    let job_id = job_of(conn, &event.target).await.map_err(query_err(what))?;
                    let hash = chain::hash_of(seq, &event, &job_id, &prev.hash);
                    sqlx::query(
                        "UPDATE audit_events SET seq = $2, prev_hash = $3, hash = $4, job_id = $5 WHERE id = $1",
                    )
                    .bind(row.get::<i64, _>("id"))
                    .bind(db_seq(seq))
                    .bind(&prev.hash)
                    .bind(&hash)
                    .bind(&job_id)
                    .execute(&mut *conn)
                    .await
                    .map_err(query_err(what))?;
                    prev = Link { seq, hash };
                }
                Ok(prev.seq)
            }

            /// Audit records matching `filter`, newest first. An actor matches exactly or by
            /// the end of its name after a `/` (a substring from `length(actor) - length(name)`
            /// is never `/name` when the actor is not longer than the name, in both databases).
            pub(in crate::store) async fn list_audit(
                pool: &Pool,
                filter: &AuditFilter,
            ) -> Result<Vec<AuditRecord>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit_events
                     WHERE seq IS NOT NULL AND at_ms >= $1
                       AND ($2 = '' OR actor = $2 OR substr(actor, length(actor) - length($2)) = '/' || $2)
                       AND ($3 = '' OR job_id = $3)
                     ORDER BY seq DESC LIMIT $4"
                ))
                .bind(filter.since_ms)
                .bind(&filter.actor)
                .bind(&filter.job_id)
                .bind(i64::from(filter.limit))
                .fetch_all(pool)
                .await
                .map_err(query_err("list_audit"))?;
                Ok(rows.iter().map(audit_record).collect())
            }

            /// Walks the whole chain from genesis; then any row outside the chain is reported.
            pub(in crate::store) async fn verify_audit(
                pool: &Pool,
                seen: &Seen,
            ) -> Result<Verdict, StoreError> {
                // Read before the walk's snapshot: everything `seen` holds is committed, so in it.
                let mut walk = Walk::new(seen.get());
                let sql = format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq IS NOT NULL ORDER BY seq"
                );
                let mut rows = sqlx::query(&sql).fetch(pool);
                while let Some(row) = rows.try_next().await.map_err(query_err("verify_audit"))? {
                    if let Err(broken) = walk.next(&audit_record(&row)) {
                        return Ok(walk.verdict(Some(broken)));
                    }
                }
                drop(rows);
                let unchained: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM audit_events WHERE seq IS NULL ORDER BY id LIMIT 1",
                )
                .fetch_optional(pool)
                .await
                .map_err(query_err("verify_audit"))?;
                let broken = unchained.map(|id| Broken {
                    seq: 0,
                    id,
                    problem: Problem::Unchained,
                    message: format!(
                        "row id {id} of the audit table is not in the chain (it has no seq): it was written outside the coordinator"
                    ),
                });
                Ok(walk.verdict(broken))
            }

            // ---- writes in the caller's transaction ------------------------------------

            /// Refuses a write for `job_id` by the coordinator process `by` once another
            /// process has claimed the job (`by` lost its lease; `StoreError::NotOwner`). The
            /// job's row stays key-share locked until the caller commits (PostgreSQL; SQLite's
            /// writer holds the database's write lock), so a claim (`SELECT … FOR UPDATE`)
            /// waits for a write that passed here, and a write after the claim fails here: the
            /// new owner, reading the job once it holds the claim, sees everything the old
            /// one wrote and nothing is written after. `cx` holds the jobs this
            /// transaction has fenced already. A job that is not stored, or is claimed by
            /// nobody yet, is no one else's.
            pub(in crate::store) async fn fence(
                conn: &mut Conn,
                job_id: &str,
                by: &str,
                cx: &mut TxState,
            ) -> Result<(), StoreError> {
                if job_id.is_empty() || cx.fenced.contains(job_id) {
                    return Ok(());
                }
                let owner: Option<String> = sqlx::query_scalar(concat!(
                    "SELECT owner_instance FROM jobs WHERE job_id = $1",
                    $key_share
                ))
                .bind(job_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(query_err("job owner"))?;
                match owner {
                    Some(o) if !o.is_empty() && o != by => Err(StoreError::NotOwner {
                        job_id: job_id.to_string(),
                    }),
                    _ => {
                        cx.fenced.insert(job_id.to_string());
                        Ok(())
                    }
                }
            }

            /// Applies a group commit's writes in the caller's transaction; returns the rows
            /// each changed (in the writes' order) and the last audit record appended, if any.
            /// The writes of one batch come from callers running concurrently (each waits for
            /// its own), so any order among them is one they could have had: the runs created
            /// go first, many rows a statement, then the results with their audit records the
            /// same way, then the agents' heartbeats (`agents_seen`), then every other write in
            /// its order. A statement is a hand-off to SQLite's worker thread or a round trip
            /// to PostgreSQL: a batch of 10,000 results is a few dozen, not 30,000.
            pub(in crate::store) async fn apply_all(
                conn: &mut Conn,
                seen: &Seen,
                writes: &[Write],
            ) -> Result<(Vec<u64>, Option<Link>), StoreError> {
                let mut counts = vec![0; writes.len()];
                let mut done = vec![false; writes.len()];
                let mut appended: Option<Link> = None;
                let mut cx = TxState::default();
                let (mut created, mut finished, mut heard) = (Vec::new(), Vec::new(), Vec::new());
                for (i, w) in writes.iter().enumerate() {
                    match w {
                        Write::CreateRun { run, by } => created.push((i, (run, by.as_str()))),
                        Write::FinishRun { run_id, host_id, status, finished_at_ms, result, audit } => {
                            finished.push((i, Finish { run_id, host_id, status: *status, finished_at_ms: *finished_at_ms, result, audit }));
                        }
                        Write::AgentSeen { host_id, last_seen_ms, state } => {
                            heard.push((i, Heard { host_id, last_seen_ms: *last_seen_ms, state: state.as_deref() }));
                        }
                        _ => {}
                    }
                }
                let runs: Vec<(&RunRow, &str)> = created.iter().map(|(_, r)| *r).collect();
                insert_runs(conn, &runs, &mut cx).await?;
                for (i, _) in &created {
                    counts[*i] = 1;
                    done[*i] = true;
                }
                let results: Vec<&Finish<'_>> = finished.iter().map(|(_, f)| f).collect();
                let (codes, link) = finish_runs(conn, seen, &results, &mut cx).await?;
                appended = link.or(appended);
                for ((i, _), code) in finished.iter().zip(codes) {
                    counts[*i] = code;
                    done[*i] = true;
                }
                // Nothing else in a group commit writes these columns of `agents`, so the
                // heartbeats are applied together, wherever they were in the batch.
                let known = agents_seen(conn, &heard.iter().map(|(_, h)| *h).collect::<Vec<_>>()).await?;
                for (i, h) in &heard {
                    counts[*i] = u64::from(known.contains(h.host_id));
                    done[*i] = true;
                }
                for (i, w) in writes.iter().enumerate() {
                    if done[i] {
                        continue;
                    }
                    let (n, link) = apply(conn, seen, w, &mut cx).await?;
                    appended = link.or(appended);
                    counts[i] = n;
                }
                Ok((counts, appended))
            }

            /// Inserts runs (each with the name of the process creating it, for `fence`), a
            /// few statements (`fixed_chunks`).
            async fn insert_runs(
                conn: &mut Conn,
                runs: &[(&RunRow, &str)],
                cx: &mut TxState,
            ) -> Result<u64, StoreError> {
                for (r, by) in runs {
                    fence(conn, &r.job_id, by, cx).await?;
                }
                let mut n = 0;
                for chunk in fixed_chunks(&runs) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO runs (run_id, job_id, host_id, requested_by, reason, procedure, status, created_at_ms, phase) ",
                    );
                    insert.push_values(chunk, |mut row, (r, _)| {
                        row.push_bind(&r.run_id)
                            .push_bind(&r.job_id)
                            .push_bind(&r.host_id)
                            .push_bind(&r.requested_by)
                            .push_bind(&r.reason)
                            .push_bind(&r.procedure)
                            .push_bind(r.status)
                            .push_bind(r.created_at_ms)
                            .push_bind(&r.phase);
                    });
                    n += insert
                        .build()
                        .execute(&mut *conn)
                        .await
                        .map_err(query_err("create_run"))?
                        .rows_affected();
                }
                Ok(n)
            }

            /// Records results, each only for the host its run was sent to and only once: a few
            /// statements (`fixed_chunks`) for those that are (the usual case), a
            /// look at why for each that is not. Then each result's audit record, in order.
            /// Returns a `TAKEN_*` code per result and the last record appended.
            async fn finish_runs(
                conn: &mut Conn,
                seen: &Seen,
                results: &[&Finish<'_>],
                cx: &mut TxState,
            ) -> Result<(Vec<u64>, Option<Link>), StoreError> {
                if results.is_empty() {
                    return Ok((Vec::new(), None));
                }
                // A result sent twice by one host is in the statement once; the second then
                // finds it recorded, as it would one statement later. Results for one run from
                // different hosts are all in it: only its own host's can match, whichever
                // came first.
                let mut named = std::collections::HashSet::new();
                let first: Vec<&Finish<'_>> = results
                    .iter()
                    .copied()
                    .filter(|f| named.insert((f.run_id, f.host_id)))
                    .collect();
                let mut recorded: HashMap<(String, String), String> = HashMap::new();
                for chunk in fixed_chunks(&first) {
                    let mut update = sqlx::QueryBuilder::<$db>::new(
                        "WITH v (v_run, v_host, v_status, v_at, v_result) AS (",
                    );
                    update.push_values(chunk, |mut row, f| {
                        row.push_bind(f.run_id)
                            .push_bind(f.host_id)
                            .push_bind(f.status)
                            .push_bind(f.finished_at_ms)
                            .push_bind(f.result);
                    });
                    update.push(
                        ") UPDATE runs SET status = v.v_status, finished_at_ms = v.v_at, result = v.v_result
                         FROM v WHERE runs.run_id = v.v_run AND runs.host_id = v.v_host AND runs.result IS NULL
                         RETURNING run_id, host_id, job_id",
                    );
                    let rows: Vec<(String, String, String)> = update
                        .build_query_as()
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(query_err("finish_run"))?;
                    recorded.extend(rows.into_iter().map(|(run, host, job)| ((run, host), job)));
                }
                let mut codes = Vec::with_capacity(results.len());
                let mut records = Vec::with_capacity(results.len());
                for f in results {
                    let job = recorded.remove(&(f.run_id.to_string(), f.host_id.to_string()));
                    let (code, action) = match &job {
                        Some(_) => (TAKEN_RECORDED, f.audit.action.as_str()),
                        None => not_recorded(conn, f.run_id, f.host_id).await?,
                    };
                    let event = AuditEvent { action: action.to_string(), ..f.audit.clone() };
                    // The record's job is the run's, known once the run was updated.
                    let job = job.filter(|_| event.target == format!("run/{}", f.run_id));
                    records.push((event, job));
                    codes.push(code);
                }
                let link = append_all(conn, &records, seen, cx).await?;
                Ok((codes, link))
            }

            /// Refreshes agents' last-seen times and reported states: a few statements
            /// (`fixed_chunks`). Each run's result brings a heartbeat with the host's
            /// state, so a 10,000-host job's results brought 10,000 statements, each a
            /// hand-off to the database's thread (SQLite) or a round trip (PostgreSQL).
            /// Several for one host are merged as applying them in order would (`merge_heard`).
            /// Returns the hosts that are known (a heartbeat for another changes nothing).
            async fn agents_seen(
                conn: &mut Conn,
                heard: &[Heard<'_>],
            ) -> Result<std::collections::HashSet<String>, StoreError> {
                let mut known = std::collections::HashSet::new();
                for chunk in fixed_chunks(&merge_heard(heard)) {
                    let mut update = sqlx::QueryBuilder::<$db>::new(
                        "WITH v (v_host, v_seen, v_state) AS (",
                    );
                    update.push_values(chunk, |mut row, h| {
                        row.push_bind(h.host_id)
                            .push_bind(h.last_seen_ms)
                            .push_bind(h.state);
                    });
                    update.push(
                        ") UPDATE agents SET last_seen_ms = CASE WHEN agents.last_seen_ms > v.v_seen THEN agents.last_seen_ms ELSE v.v_seen END,
                         state = COALESCE(v.v_state, agents.state)
                         FROM v WHERE agents.host_id = v.v_host
                         RETURNING agents.host_id",
                    );
                    let rows: Vec<(String,)> = update
                        .build_query_as()
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(query_err("agent_seen"))?;
                    known.extend(rows.into_iter().map(|(host,)| host));
                }
                Ok(known)
            }

            /// Why a result was not recorded: its run is unknown, another host's, or has one.
            async fn not_recorded(
                conn: &mut Conn,
                run_id: &str,
                host_id: &str,
            ) -> Result<(u64, &'static str), StoreError> {
                let row: Option<(String, bool)> = sqlx::query_as(
                    "SELECT host_id, result IS NOT NULL FROM runs WHERE run_id = $1",
                )
                .bind(run_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(query_err("finish_run"))?;
                Ok(match row {
                    None => (TAKEN_UNKNOWN, "run.result_unknown_run"),
                    Some((owner, _)) if owner != host_id => (TAKEN_OTHER_HOST, "run.result_refused"),
                    Some(_) => (TAKEN_ALREADY, "run.result_repeated"),
                })
            }

            /// Applies one write in the caller's transaction; returns the rows it changed
            /// (`TAKEN_*` for a result) and the audit record it appended, if any. `cx`: what
            /// this transaction knows so far (`TxState`).
            pub(in crate::store) async fn apply(
                conn: &mut Conn,
                seen: &Seen,
                w: &Write,
                cx: &mut TxState,
            ) -> Result<(u64, Option<Link>), StoreError> {
                let q = query_err;
                let mut appended = None;
                let n = match w {
                    Write::CreateRun { run, by } => insert_runs(conn, &[(run, by.as_str())], cx).await?,
                    Write::FinishRun { run_id, host_id, status, finished_at_ms, result, audit } => {
                        let f = Finish { run_id, host_id, status: *status, finished_at_ms: *finished_at_ms, result, audit };
                        let (codes, link) = finish_runs(conn, seen, &[&f], cx).await?;
                        appended = link;
                        codes.first().copied().unwrap_or(TAKEN_UNKNOWN)
                    }
                    Write::Audit(e) => {
                        appended = Some(append_in(conn, e, seen, cx, None).await?);
                        1
                    }
                    Write::JobEvents { job_id, by, events } => {
                        fence(conn, job_id, by, cx).await?;
                        // One statement per chunk, not one per event: on PostgreSQL each
                        // statement is a round trip, and a large job stores thousands.
                        let mut n = 0;
                        for chunk in fixed_chunks(&events) {
                            let mut insert = sqlx::QueryBuilder::<$db>::new(
                                "INSERT INTO job_events (job_id, seq, at_ms, host_id, event) ",
                            );
                            insert.push_values(chunk, |mut row, e| {
                                row.push_bind(job_id)
                                    .push_bind(db_seq(e.seq))
                                    .push_bind(e.at_ms)
                                    .push_bind(&e.host_id)
                                    .push_bind(&e.event);
                            });
                            n += insert
                                .build()
                                .execute(&mut *conn)
                                .await
                                .map_err(q("append_job_event"))?
                                .rows_affected();
                        }
                        n
                    }
                    Write::JobHosts { rows, by } => {
                        for h in rows {
                            fence(conn, &h.job_id, by, cx).await?;
                        }
                        upsert_job_hosts(conn, rows, "update_job_hosts").await?
                    }
                    Write::AgentSeen { host_id, last_seen_ms, state } => {
                        let heard = Heard { host_id, last_seen_ms: *last_seen_ms, state: state.as_deref() };
                        u64::from(agents_seen(conn, &[heard]).await?.contains(host_id.as_str()))
                    }
                    Write::Labels { host_id, set, remove, at_ms, audit } => {
                        let mut n = 0;
                        for key in remove {
                            n += sqlx::query(
                                "DELETE FROM inventory_labels WHERE host_id = $1 AND key = $2 AND source = 'operator'",
                            )
                            .bind(host_id)
                            .bind(key)
                            .execute(&mut *conn)
                            .await
                            .map_err(q("label_host"))?
                            .rows_affected();
                        }
                        for (key, value) in set {
                            n += sqlx::query(
                                "INSERT INTO inventory_labels (host_id, key, value, source, set_by, set_at_ms)
                                 VALUES ($1, $2, $3, 'operator', $4, $5)
                                 ON CONFLICT(host_id, key, source) DO UPDATE SET value = $3, set_by = $4, set_at_ms = $5",
                            )
                            .bind(host_id)
                            .bind(key)
                            .bind(value)
                            .bind(&audit.actor)
                            .bind(at_ms)
                            .execute(&mut *conn)
                            .await
                            .map_err(q("label_host"))?
                            .rows_affected();
                        }
                        appended = Some(append_in(conn, audit, seen, cx, None).await?);
                        n
                    }
                    Write::ConfigInventory { labels, audit } => {
                        let before: Vec<(String, String, String)> = sqlx::query_as(
                            "SELECT host_id, key, value FROM inventory_labels WHERE source = 'config' ORDER BY host_id, key",
                        )
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(q("sync_config_inventory"))?;
                        if before == *labels {
                            0
                        } else {
                            sqlx::query("DELETE FROM inventory_labels WHERE source = 'config'")
                                .execute(&mut *conn)
                                .await
                                .map_err(q("sync_config_inventory"))?;
                            for (host_id, key, value) in labels {
                                sqlx::query(
                                    "INSERT INTO inventory_labels (host_id, key, value, source, set_by, set_at_ms)
                                     VALUES ($1, $2, $3, 'config', $4, $5)",
                                )
                                .bind(host_id)
                                .bind(key)
                                .bind(value)
                                .bind(&audit.actor)
                                .bind(audit.at_ms)
                                .execute(&mut *conn)
                                .await
                                .map_err(q("sync_config_inventory"))?;
                            }
                            appended = Some(append_in(conn, audit, seen, cx, None).await?);
                            1
                        }
                    }
                };
                Ok((n, appended))
            }

            /// Hosts among `hosts` leased to a job other than `job_id`.
            pub(in crate::store) async fn holders_in(
                conn: &mut Conn,
                hosts: &[String],
                job_id: &str,
            ) -> Result<Vec<LeaseHolder>, StoreError> {
                let mut held: HashMap<String, String> = HashMap::new();
                for chunk in fixed_chunks(&hosts) {
                    let mut select = sqlx::QueryBuilder::<$db>::new(
                        "SELECT host_id, job_id FROM host_leases WHERE host_id IN (",
                    );
                    let mut list = select.separated(", ");
                    for h in chunk {
                        list.push_bind(h);
                    }
                    select.push(")");
                    let rows: Vec<(String, String)> = select
                        .build_query_as()
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(query_err("lease holders"))?;
                    held.extend(rows);
                }
                // In the order asked.
                Ok(hosts
                    .iter()
                    .filter_map(|h| {
                        held.get(h).filter(|holder| *holder != job_id).map(|holder| LeaseHolder {
                            host_id: h.clone(),
                            job_id: holder.clone(),
                        })
                    })
                    .collect())
            }

            /// Leases `hosts` to `job_id`, failing with `StoreError::Leased` (writing nothing)
            /// when another job holds any of them.
            async fn lease(conn: &mut Conn, hosts: &[String], job_id: &str) -> Result<(), StoreError> {
                let holders = holders_in(conn, hosts, job_id).await?;
                if !holders.is_empty() {
                    return Err(StoreError::Leased { holders });
                }
                let now = rollback_common::now_unix_ms();
                for chunk in fixed_chunks(&hosts) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO host_leases (host_id, job_id, acquired_at_ms) ",
                    );
                    insert.push_values(chunk, |mut row, h| {
                        row.push_bind(h).push_bind(job_id).push_bind(now);
                    });
                    insert.push(" ON CONFLICT(host_id) DO NOTHING");
                    insert
                        .build()
                        .execute(&mut *conn)
                        .await
                        .map_err(query_err("insert lease"))?;
                }
                Ok(())
            }

            /// Inserts a job, its hosts and its leases; fails with `StoreError::Leased` when
            /// another job holds any of `leased`.
            pub(in crate::store) async fn insert_job(
                conn: &mut Conn,
                job: &JobRow,
                hosts: &[JobHostRow],
                leased: &[String],
            ) -> Result<(), StoreError> {
                lease(conn, leased, &job.job_id).await?;
                sqlx::query(&format!(
                    "INSERT INTO jobs ({JOB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                ))
                .bind(&job.job_id)
                .bind(&job.procedure)
                .bind(&job.request)
                .bind(&job.plan)
                .bind(&job.state)
                .bind(&job.reason)
                .bind(&job.requested_by)
                .bind(job.created_at_ms)
                .bind(job.finished_at_ms)
                .bind(&job.halt_reason)
                .bind(&job.request_id)
                .execute(&mut *conn)
                .await
                .map_err(query_err("create_job"))?;
                upsert_job_hosts(conn, hosts, "create_job hosts").await?;
                Ok(())
            }

            /// `insert_job` and the job's approval row.
            pub(in crate::store) async fn insert_job_awaiting(
                conn: &mut Conn,
                job: &JobRow,
                hosts: &[JobHostRow],
                leased: &[String],
                approval: &ApprovalRow,
            ) -> Result<(), StoreError> {
                insert_job(conn, job, hosts, leased).await?;
                sqlx::query(
                    "INSERT INTO job_approvals (job_id, rule, requested_by, requested_at_ms, expires_at_ms)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&approval.job_id)
                .bind(&approval.rule)
                .bind(&approval.requested_by)
                .bind(approval.requested_at_ms)
                .bind(approval.expires_at_ms)
                .execute(&mut *conn)
                .await
                .map_err(query_err("create_job_awaiting"))?;
                Ok(())
            }

            /// The approval decision as one conditional update of the job (false, writing
            /// nothing, when it was not awaiting approval any more), then the approval row and
            /// the leases of a job that does not run.
            pub(in crate::store) async fn decide(
                conn: &mut Conn,
                job_id: &str,
                decision: &str,
                by: &str,
                at_ms: i64,
                reason: &str,
            ) -> Result<bool, StoreError> {
                let (state, halt) = decided_state(job_id, decision, by, reason)?;
                let changed = sqlx::query(
                    "UPDATE jobs SET state = $2, finished_at_ms = $3, halt_reason = $4
                     WHERE job_id = $1 AND state = 'awaiting_approval'",
                )
                .bind(job_id)
                .bind(state)
                .bind((state != "running").then_some(at_ms))
                .bind(halt)
                .execute(&mut *conn)
                .await
                .map_err(query_err("decide_approval"))?
                .rows_affected();
                if changed == 0 {
                    return Ok(false);
                }
                sqlx::query(
                    "UPDATE job_approvals SET decision = $2, decided_by = $3, decided_at_ms = $4, reason = $5
                     WHERE job_id = $1 AND decision = ''",
                )
                .bind(job_id)
                .bind(decision)
                .bind(by)
                .bind(at_ms)
                .bind(reason)
                .execute(&mut *conn)
                .await
                .map_err(query_err("decide_approval"))?;
                if state != "running" {
                    release_leases(conn, job_id).await?;
                }
                Ok(true)
            }

            async fn release_leases(conn: &mut Conn, job_id: &str) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM host_leases WHERE job_id = $1")
                    .bind(job_id)
                    .execute(&mut *conn)
                    .await
                    .map_err(query_err("release leases"))?;
                Ok(())
            }

            /// Leases `leased` to an ended job, stores the `reset` hosts and sets it running.
            pub(in crate::store) async fn reopen(
                conn: &mut Conn,
                job_id: &str,
                leased: &[String],
                reset: &[JobHostRow],
            ) -> Result<(), StoreError> {
                lease(conn, leased, job_id).await?;
                upsert_job_hosts(conn, reset, "reopen_job hosts").await?;
                let reopened = sqlx::query(
                    "UPDATE jobs SET state = 'running', finished_at_ms = NULL, halt_reason = '' WHERE job_id = $1 AND state <> 'running'",
                )
                .bind(job_id)
                .execute(&mut *conn)
                .await
                .map_err(query_err("reopen_job state"))?;
                // Two resumes at once (on two coordinators): the first one wins.
                if reopened.rows_affected() == 0 {
                    return Err(StoreError::Changed {
                        what: format!("job {job_id}"),
                    });
                }
                Ok(())
            }

            /// Removes an agent (false when there was none) and its operator labels.
            pub(in crate::store) async fn forget(conn: &mut Conn, host_id: &str) -> Result<bool, StoreError> {
                let n = sqlx::query("DELETE FROM agents WHERE host_id = $1")
                    .bind(host_id)
                    .execute(&mut *conn)
                    .await
                    .map_err(query_err("forget_agent"))?
                    .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                // A decommissioned host's labels go with it (the config's stay: they are the file's).
                sqlx::query("DELETE FROM inventory_labels WHERE host_id = $1 AND source = 'operator'")
                    .bind(host_id)
                    .execute(&mut *conn)
                    .await
                    .map_err(query_err("forget_agent"))?;
                Ok(true)
            }

            /// Sets a job's state, if the coordinator process `by` may write for it (`fence`);
            /// any state but `running` releases its leases.
            pub(in crate::store) async fn set_job_state(
                conn: &mut Conn,
                job_id: &str,
                by: &str,
                state: &str,
                finished_at_ms: Option<i64>,
                halt_reason: &str,
            ) -> Result<(), StoreError> {
                fence(conn, job_id, by, &mut TxState::default()).await?;
                sqlx::query(
                    "UPDATE jobs SET state = $2, finished_at_ms = $3, halt_reason = $4 WHERE job_id = $1",
                )
                .bind(job_id)
                .bind(state)
                .bind(finished_at_ms)
                .bind(halt_reason)
                .execute(&mut *conn)
                .await
                .map_err(query_err("update_job_state"))?;
                if state != "running" {
                    release_leases(conn, job_id).await?;
                }
                Ok(())
            }

            pub(in crate::store) async fn upsert_snapshot(conn: &mut Conn, r: &SnapshotRow) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO snapshots (snapshot_id, host_id, job_id, label, taken_at_ms, git_sha, git_subject,
                     alembic_revision, env_sha256, unit_state, db_backup, baseline)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (snapshot_id, host_id) DO UPDATE SET job_id = $3, label = $4, taken_at_ms = $5,
                     git_sha = $6, git_subject = $7, alembic_revision = $8, env_sha256 = $9, unit_state = $10,
                     db_backup = $11, baseline = $12",
                )
                .bind(&r.snapshot_id)
                .bind(&r.host_id)
                .bind(&r.job_id)
                .bind(&r.label)
                .bind(r.taken_at_ms)
                .bind(&r.git_sha)
                .bind(&r.git_subject)
                .bind(&r.alembic_revision)
                .bind(&r.env_sha256)
                .bind(&r.unit_state)
                .bind(&r.db_backup)
                .bind(&r.baseline)
                .execute(&mut *conn)
                .await
                .map_err(query_err("insert_snapshot"))?;
                Ok(())
            }

            // ---- writes on the pool, each on its own -----------------------------------

            pub(in crate::store) async fn agent_connected(pool: &Pool, a: &AgentRecord) -> Result<(), StoreError> {
                let labels = serde_json::to_string(&a.reported_labels).map_err(|e| StoreError::Corrupt {
                    key: a.host_id.clone(),
                    reason: e.to_string(),
                })?;
                sqlx::query(
                    "INSERT INTO agents (host_id, labels_json, agent_version, address, online, connected_at_ms, last_seen_ms, state, cert_not_after_ms, coordinator)
                     VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8, $9)
                     ON CONFLICT(host_id) DO UPDATE SET labels_json = $2, agent_version = $3, address = $4,
                         online = 1, connected_at_ms = $5, last_seen_ms = $6, state = $7, cert_not_after_ms = $8,
                         coordinator = $9",
                )
                .bind(&a.host_id)
                .bind(labels)
                .bind(&a.agent_version)
                .bind(&a.address)
                .bind(a.connected_at_ms)
                .bind(a.last_seen_ms)
                .bind(&a.state)
                .bind(a.cert_not_after_ms)
                .bind(&a.coordinator)
                .execute(pool)
                .await
                .map_err(query_err("agent_connected"))?;
                Ok(())
            }

            pub(in crate::store) async fn agent_disconnected(
                pool: &Pool,
                host_id: &str,
                last_seen_ms: i64,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE agents SET online = 0,
                         last_seen_ms = CASE WHEN last_seen_ms > $2 THEN last_seen_ms ELSE $2 END
                     WHERE host_id = $1",
                )
                .bind(host_id)
                .bind(last_seen_ms)
                .execute(pool)
                .await
                .map_err(query_err("agent_disconnected"))?;
                Ok(())
            }

            pub(in crate::store) async fn mark_all_disconnected(pool: &Pool) -> Result<u64, StoreError> {
                let done = sqlx::query("UPDATE agents SET online = 0 WHERE online = 1")
                    .execute(pool)
                    .await
                    .map_err(query_err("mark_all_disconnected"))?;
                Ok(done.rows_affected())
            }

            // ---- reads -----------------------------------------------------------------

            /// Inventory labels by host: one host's, or every host's (`None`).
            pub(in crate::store) async fn inventory_rows(
                pool: &Pool,
                host_id: Option<&str>,
            ) -> Result<HashMap<String, Inventory>, StoreError> {
                let rows: Vec<(String, String, String, String)> = sqlx::query_as(
                    "SELECT host_id, key, value, source FROM inventory_labels WHERE $1 IS NULL OR host_id = $1",
                )
                .bind(host_id)
                .fetch_all(pool)
                .await
                .map_err(query_err("inventory"))?;
                Ok(inventories(rows))
            }

            pub(in crate::store) async fn list_agents(pool: &Pool) -> Result<Vec<AgentRecord>, StoreError> {
                let rows = sqlx::query(
                    "SELECT host_id, labels_json, agent_version, address, online, connected_at_ms, last_seen_ms, state,
                            cert_not_after_ms, coordinator
                     FROM agents ORDER BY host_id",
                )
                .fetch_all(pool)
                .await
                .map_err(query_err("list_agents"))?;
                let mut inventory = inventory_rows(pool, None).await?;
                rows.iter().map(|row| agent_record(row, &mut inventory)).collect()
            }

            pub(in crate::store) async fn get_run(pool: &Pool, run_id: &str) -> Result<Option<RunRow>, StoreError> {
                let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = $1"))
                    .bind(run_id)
                    .fetch_optional(pool)
                    .await
                    .map_err(query_err("get_run"))?;
                Ok(row.as_ref().map(run_row))
            }

            pub(in crate::store) async fn get_runs(pool: &Pool, run_ids: &[String]) -> Result<Vec<RunRow>, StoreError> {
                let mut out = Vec::with_capacity(run_ids.len());
                for chunk in fixed_chunks(&run_ids) {
                    let mut select = sqlx::QueryBuilder::<$db>::new(format!(
                        "SELECT {RUN_COLUMNS} FROM runs WHERE run_id IN ("
                    ));
                    let mut list = select.separated(", ");
                    for id in chunk {
                        list.push_bind(id);
                    }
                    select.push(")");
                    let rows = select
                        .build()
                        .fetch_all(pool)
                        .await
                        .map_err(query_err("get_runs"))?;
                    out.extend(rows.iter().map(run_row));
                }
                Ok(out)
            }

            pub(in crate::store) async fn unfinished_runs(pool: &Pool, host_id: &str) -> Result<Vec<RunRow>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE host_id = $1 AND result IS NULL ORDER BY created_at_ms"
                ))
                .bind(host_id)
                .fetch_all(pool)
                .await
                .map_err(query_err("unfinished_runs"))?;
                Ok(rows.iter().map(run_row).collect())
            }

            pub(in crate::store) async fn job_runs(pool: &Pool, job_id: &str) -> Result<Vec<RunRow>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE job_id = $1 ORDER BY created_at_ms, rowid"
                ))
                .bind(job_id)
                .fetch_all(pool)
                .await
                .map_err(query_err("job_runs"))?;
                Ok(rows.iter().map(run_row).collect())
            }

            pub(in crate::store) async fn job_run_results(pool: &Pool, job_id: &str) -> Result<Vec<RunResultRow>, StoreError> {
                let rows = sqlx::query(
                    "SELECT run_id, host_id, phase, result FROM runs WHERE job_id = $1 ORDER BY created_at_ms, rowid",
                )
                .bind(job_id)
                .fetch_all(pool)
                .await
                .map_err(query_err("job_run_results"))?;
                Ok(rows
                    .iter()
                    .map(|r| RunResultRow {
                        run_id: r.text("run_id"),
                        host_id: r.text("host_id"),
                        phase: r.text("phase"),
                        result: r.opt_bytes("result"),
                    })
                    .collect())
            }

            pub(in crate::store) async fn lease_holders(pool: &Pool, hosts: &[String]) -> Result<Vec<LeaseHolder>, StoreError> {
                let mut conn = pool.acquire().await.map_err(query_err("lease_holders"))?;
                holders_in(&mut conn, hosts, "").await
            }

            pub(in crate::store) async fn running_jobs(pool: &Pool) -> Result<Vec<String>, StoreError> {
                sqlx::query_scalar("SELECT job_id FROM jobs WHERE state = 'running' ORDER BY created_at_ms")
                    .fetch_all(pool)
                    .await
                    .map_err(query_err("running_jobs"))
            }

            pub(in crate::store) async fn job_events(
                pool: &Pool,
                job_id: &str,
                after_seq: u64,
                which: Events,
            ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
                // A row stored before events had a host column has none (NULL): it is read
                // as possibly the job's own, and the caller checks the decoded event.
                let sql = match which {
                    Events::All => "SELECT seq, event FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq",
                    Events::JobsOwn => "SELECT seq, event FROM job_events WHERE job_id = $1 AND seq > $2 AND (host_id = '' OR host_id IS NULL) ORDER BY seq",
                };
                let rows = sqlx::query(sql)
                .bind(job_id)
                .bind(db_seq(after_seq))
                .fetch_all(pool)
                .await
                .map_err(query_err("job_events"))?;
                Ok(rows
                    .iter()
                    .map(|r| (u64::try_from(r.int("seq")).unwrap_or(0), r.bytes("event")))
                    .collect())
            }

            pub(in crate::store) async fn last_job_seq(pool: &Pool, job_id: &str) -> Result<Option<u64>, StoreError> {
                let last: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM job_events WHERE job_id = $1")
                    .bind(job_id)
                    .fetch_one(pool)
                    .await
                    .map_err(query_err("last_job_seq"))?;
                Ok(last.and_then(|s| u64::try_from(s).ok()))
            }

            pub(in crate::store) async fn job_for_request(pool: &Pool, request_id: &str) -> Result<Option<JobRow>, StoreError> {
                if request_id.is_empty() {
                    return Ok(None);
                }
                let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = $1"))
                    .bind(request_id)
                    .fetch_optional(pool)
                    .await
                    .map_err(query_err("job_for_request"))?;
                Ok(row.as_ref().map(job_row))
            }

            pub(in crate::store) async fn get_job_row(
                pool: &Pool,
                job_id: &str,
            ) -> Result<Option<JobRow>, StoreError> {
                Ok(sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1"))
                    .bind(job_id)
                    .fetch_optional(pool)
                    .await
                    .map_err(query_err("get_job"))?
                    .map(|row| job_row(&row)))
            }

            pub(in crate::store) async fn get_job(
                pool: &Pool,
                job_id: &str,
            ) -> Result<Option<(JobRow, Vec<JobHostRow>)>, StoreError> {
                let Some(row) = get_job_row(pool, job_id).await? else {
                    return Ok(None);
                };
                let hosts = sqlx::query("SELECT * FROM job_hosts WHERE job_id = $1 ORDER BY ord")
                    .bind(job_id)
                    .fetch_all(pool)
                    .await
                    .map_err(query_err("get_job hosts"))?;
                Ok(Some((row, hosts.iter().map(job_host_row).collect())))
            }

            pub(in crate::store) async fn list_jobs(pool: &Pool, f: &JobFilter) -> Result<Vec<JobRow>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs
                     WHERE ($1 = '' OR state = $1)
                       AND ($2 = '' OR procedure = $2)
                       AND ($3 = '' OR job_id IN (SELECT job_id FROM job_hosts WHERE host_id = $3))
                       AND created_at_ms >= $4
                       AND ($5 = '' OR procedure = $5
                            OR ($5 = 'rollback' AND procedure <> 'snapshot' AND procedure <> 'diagnose'
                                AND procedure <> 'guard'))
                       AND ($6 = '' OR job_id LIKE $7)
                     ORDER BY created_at_ms DESC LIMIT $8"
                ))
                .bind(&f.state)
                .bind(&f.procedure)
                .bind(&f.host_id)
                .bind(f.since_ms)
                .bind(&f.kind)
                .bind(&f.id_prefix)
                .bind(format!("{}%", f.id_prefix))
                .bind(i64::from(f.limit))
                .fetch_all(pool)
                .await
                .map_err(query_err("list_jobs"))?;
                Ok(rows.iter().map(job_row).collect())
            }

            pub(in crate::store) async fn list_snapshots(pool: &Pool) -> Result<Vec<SnapshotRow>, StoreError> {
                let rows = sqlx::query("SELECT * FROM snapshots ORDER BY taken_at_ms DESC, host_id")
                    .fetch_all(pool)
                    .await
                    .map_err(query_err("list_snapshots"))?;
                Ok(rows.iter().map(snapshot_row).collect())
            }

            pub(in crate::store) async fn job_approval(pool: &Pool, job_id: &str) -> Result<Option<ApprovalRow>, StoreError> {
                Ok(sqlx::query(&format!(
                    "SELECT {APPROVAL_COLUMNS} FROM job_approvals WHERE job_id = $1"
                ))
                .bind(job_id)
                .fetch_optional(pool)
                .await
                .map_err(query_err("job_approval"))?
                .map(|row| approval_row(&row)))
            }

            pub(in crate::store) async fn pending_approvals(pool: &Pool) -> Result<Vec<ApprovalRow>, StoreError> {
                Ok(sqlx::query(&format!(
                    "SELECT {APPROVAL_COLUMNS} FROM job_approvals WHERE decision = '' ORDER BY requested_at_ms"
                ))
                .fetch_all(pool)
                .await
                .map_err(query_err("pending_approvals"))?
                .iter()
                .map(approval_row)
                .collect())
            }
        }
    };
}

// SQLite takes no row locks: the writer's transaction holds the database's write lock.
backend!(sqlite_sql, sqlx::Sqlite, "");
backend!(pg_sql, sqlx::Postgres, " FOR KEY SHARE");

/// The `Store` trait for a store type `$store` whose SQL is the `backend!` module `$sql`. The
/// type provides `pool` and `seen`, `begin_audited`/`commit_audited` (a transaction that
/// appends to the audit chain, serialized as its database allows) and `write` (one `Write`,
/// durable when it returns).
macro_rules! store_impl {
    ($store:ty, $sql:ident) => {
        const _: () = {
            use std::collections::BTreeMap;

            use $crate::store::shared::{self, $sql};
            use $crate::store::{
                AgentRecord, ApprovalRow, AuditEvent, AuditFilter, AuditRecord, EventRow, Events,
                Inventory, JobFilter, JobHostRow, JobRow, LeaseHolder, ResultTaken, RunRow,
                SnapshotRow, Store, StoreError, Verdict,
            };

            #[async_trait::async_trait]
            impl Store for $store {
                async fn agent_connected(&self, a: &AgentRecord) -> Result<(), StoreError> {
                    $sql::agent_connected(&self.pool, a).await
                }

                async fn agent_disconnected(
                    &self,
                    host_id: &str,
                    last_seen_ms: i64,
                ) -> Result<(), StoreError> {
                    $sql::agent_disconnected(&self.pool, host_id, last_seen_ms).await
                }

                async fn agent_seen(
                    &self,
                    host_id: &str,
                    last_seen_ms: i64,
                    state: Option<&[u8]>,
                ) -> Result<(), StoreError> {
                    self.write(shared::Write::AgentSeen {
                        host_id: host_id.to_string(),
                        last_seen_ms,
                        state: state.map(<[u8]>::to_vec),
                    })
                    .await
                    .map(|_| ())
                }

                async fn mark_all_disconnected(&self) -> Result<u64, StoreError> {
                    $sql::mark_all_disconnected(&self.pool).await
                }

                async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
                    $sql::list_agents(&self.pool).await
                }

                async fn create_run(&self, r: &RunRow, by: &str) -> Result<(), StoreError> {
                    self.write(shared::Write::CreateRun {
                        run: r.clone(),
                        by: by.to_string(),
                    })
                    .await
                    .map(|_| ())
                }

                async fn finish_run(
                    &self,
                    run_id: &str,
                    host_id: &str,
                    status: i32,
                    finished_at_ms: i64,
                    result: &[u8],
                    audit: &AuditEvent,
                ) -> Result<ResultTaken, StoreError> {
                    let code = self
                        .write(shared::Write::FinishRun {
                            run_id: run_id.to_string(),
                            host_id: host_id.to_string(),
                            status,
                            finished_at_ms,
                            result: result.to_vec(),
                            audit: audit.clone(),
                        })
                        .await?;
                    shared::result_taken(code, || self.get_run(run_id)).await
                }

                async fn get_run(&self, run_id: &str) -> Result<Option<RunRow>, StoreError> {
                    $sql::get_run(&self.pool, run_id).await
                }

                async fn get_runs(&self, run_ids: &[String]) -> Result<Vec<RunRow>, StoreError> {
                    $sql::get_runs(&self.pool, run_ids).await
                }

                async fn unfinished_runs(&self, host_id: &str) -> Result<Vec<RunRow>, StoreError> {
                    $sql::unfinished_runs(&self.pool, host_id).await
                }

                async fn append_audit(&self, e: &AuditEvent) -> Result<(), StoreError> {
                    self.write(shared::Write::Audit(e.clone()))
                        .await
                        .map(|_| ())
                }

                async fn list_audit(
                    &self,
                    filter: &AuditFilter,
                ) -> Result<Vec<AuditRecord>, StoreError> {
                    $sql::list_audit(&self.pool, filter).await
                }

                async fn verify_audit(&self) -> Result<Verdict, StoreError> {
                    $sql::verify_audit(&self.pool, &self.seen).await
                }

                async fn create_job(
                    &self,
                    job: &JobRow,
                    hosts: &[JobHostRow],
                    leased: &[String],
                    audit: &AuditEvent,
                ) -> Result<(), StoreError> {
                    // A transaction that appends: the lease check and the insert are one atomic step even
                    // against another coordinator process on the same store.
                    let mut tx = self.begin_audited("create_job").await?;
                    $sql::insert_job(&mut tx, job, hosts, leased).await?;
                    self.commit_audited(tx, audit, "create_job commit").await
                }

                async fn create_job_awaiting(
                    &self,
                    job: &JobRow,
                    hosts: &[JobHostRow],
                    leased: &[String],
                    approval: &ApprovalRow,
                    audit: &AuditEvent,
                ) -> Result<(), StoreError> {
                    let mut tx = self.begin_audited("create_job_awaiting").await?;
                    $sql::insert_job_awaiting(&mut tx, job, hosts, leased, approval).await?;
                    self.commit_audited(tx, audit, "create_job_awaiting commit")
                        .await
                }

                async fn decide_approval(
                    &self,
                    job_id: &str,
                    decision: &str,
                    by: &str,
                    at_ms: i64,
                    reason: &str,
                    audit: &AuditEvent,
                ) -> Result<bool, StoreError> {
                    shared::decided_state(job_id, decision, by, reason)?;
                    let mut tx = self.begin_audited("decide_approval").await?;
                    if !$sql::decide(&mut tx, job_id, decision, by, at_ms, reason).await? {
                        return Ok(false);
                    }
                    self.commit_audited(tx, audit, "decide_approval commit")
                        .await
                        .map(|()| true)
                }

                async fn job_approval(
                    &self,
                    job_id: &str,
                ) -> Result<Option<ApprovalRow>, StoreError> {
                    $sql::job_approval(&self.pool, job_id).await
                }

                async fn pending_approvals(&self) -> Result<Vec<ApprovalRow>, StoreError> {
                    $sql::pending_approvals(&self.pool).await
                }

                async fn reopen_job(
                    &self,
                    job_id: &str,
                    leased: &[String],
                    reset: &[JobHostRow],
                    audit: &AuditEvent,
                ) -> Result<(), StoreError> {
                    let mut tx = self.begin_audited("reopen_job").await?;
                    $sql::reopen(&mut tx, job_id, leased, reset).await?;
                    self.commit_audited(tx, audit, "reopen_job commit").await
                }

                async fn lease_holders(
                    &self,
                    hosts: &[String],
                ) -> Result<Vec<LeaseHolder>, StoreError> {
                    $sql::lease_holders(&self.pool, hosts).await
                }

                async fn running_jobs(&self) -> Result<Vec<String>, StoreError> {
                    $sql::running_jobs(&self.pool).await
                }

                async fn forget_agent(
                    &self,
                    host_id: &str,
                    audit: &AuditEvent,
                ) -> Result<bool, StoreError> {
                    let mut tx = self.begin_audited("forget_agent").await?;
                    if !$sql::forget(&mut tx, host_id).await? {
                        return Ok(false);
                    }
                    self.commit_audited(tx, audit, "forget_agent commit")
                        .await
                        .map(|()| true)
                }

                async fn sync_config_inventory(
                    &self,
                    labels: &BTreeMap<String, BTreeMap<String, String>>,
                    audit: &AuditEvent,
                ) -> Result<bool, StoreError> {
                    let changed = self.write(shared::config_inventory(labels, audit)).await?;
                    Ok(changed > 0)
                }

                async fn inventory(&self, host_id: &str) -> Result<Inventory, StoreError> {
                    Ok($sql::inventory_rows(&self.pool, Some(host_id))
                        .await?
                        .remove(host_id)
                        .unwrap_or_default())
                }

                async fn label_host(
                    &self,
                    host_id: &str,
                    set: &[(String, String)],
                    remove: &[String],
                    audit: &AuditEvent,
                ) -> Result<(), StoreError> {
                    self.write(shared::labels(host_id, set, remove, audit))
                        .await
                        .map(|_| ())
                }

                async fn update_job_state(
                    &self,
                    job_id: &str,
                    by: &str,
                    state: &str,
                    finished_at_ms: Option<i64>,
                    halt_reason: &str,
                    audit: &AuditEvent,
                ) -> Result<(), StoreError> {
                    let mut tx = self.begin_audited("update_job_state").await?;
                    $sql::set_job_state(&mut tx, job_id, by, state, finished_at_ms, halt_reason)
                        .await?;
                    self.commit_audited(tx, audit, "update_job_state commit")
                        .await
                }

                async fn update_job_hosts(
                    &self,
                    hosts: &[JobHostRow],
                    by: &str,
                ) -> Result<(), StoreError> {
                    self.write(shared::Write::JobHosts {
                        rows: hosts.to_vec(),
                        by: by.to_string(),
                    })
                    .await
                    .map(|_| ())
                }

                async fn append_job_events(
                    &self,
                    job_id: &str,
                    by: &str,
                    events: Vec<EventRow>,
                ) -> Result<(), StoreError> {
                    self.write(shared::Write::JobEvents {
                        job_id: job_id.to_string(),
                        by: by.to_string(),
                        events,
                    })
                    .await
                    .map(|_| ())
                }

                async fn job_events(
                    &self,
                    job_id: &str,
                    after_seq: u64,
                    which: Events,
                ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
                    $sql::job_events(&self.pool, job_id, after_seq, which).await
                }

                async fn last_job_seq(&self, job_id: &str) -> Result<Option<u64>, StoreError> {
                    $sql::last_job_seq(&self.pool, job_id).await
                }

                async fn job_for_request(
                    &self,
                    request_id: &str,
                ) -> Result<Option<JobRow>, StoreError> {
                    $sql::job_for_request(&self.pool, request_id).await
                }

                async fn get_job(
                    &self,
                    job_id: &str,
                ) -> Result<Option<(JobRow, Vec<JobHostRow>)>, StoreError> {
                    $sql::get_job(&self.pool, job_id).await
                }

                async fn job_row(&self, job_id: &str) -> Result<Option<JobRow>, StoreError> {
                    $sql::get_job_row(&self.pool, job_id).await
                }

                async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRow>, StoreError> {
                    $sql::list_jobs(&self.pool, filter).await
                }

                async fn job_runs(&self, job_id: &str) -> Result<Vec<RunRow>, StoreError> {
                    $sql::job_runs(&self.pool, job_id).await
                }

                async fn job_run_results(
                    &self,
                    job_id: &str,
                ) -> Result<Vec<$crate::store::RunResultRow>, StoreError> {
                    $sql::job_run_results(&self.pool, job_id).await
                }

                async fn insert_snapshot(
                    &self,
                    r: &SnapshotRow,
                    audit: &AuditEvent,
                ) -> Result<(), StoreError> {
                    let mut tx = self.begin_audited("insert_snapshot").await?;
                    $sql::upsert_snapshot(&mut tx, r).await?;
                    self.commit_audited(tx, audit, "insert_snapshot commit")
                        .await
                }

                async fn list_snapshots(&self) -> Result<Vec<SnapshotRow>, StoreError> {
                    $sql::list_snapshots(&self.pool).await
                }
            }
        };
    };
}
pub(super) use store_impl;

#[cfg(test)]
mod tests {
    use super::*;

    /// Several heartbeats of one host in a group commit become one, as applying them in order
    /// would leave the row; hosts keep the order they were first heard in.
    #[test]
    fn heartbeats_of_one_host_merge_to_the_latest_time_and_the_last_state_sent() {
        let h = |host_id, last_seen_ms, state: Option<&'static [u8]>| Heard {
            host_id,
            last_seen_ms,
            state,
        };
        let merged = merge_heard(&[
            h("a", 10, Some(b"a1")),
            h("b", 5, None),
            h("a", 30, None),
            h("a", 20, Some(b"a2")),
            h("b", 4, Some(b"b1")),
            h("c", 1, None),
            h("a", 25, None),
        ]);
        assert_eq!(
            merged,
            [
                h("a", 30, Some(b"a2")),
                h("b", 5, Some(b"b1")),
                h("c", 1, None),
            ]
        );
        assert!(merge_heard(&[]).is_empty());
    }

    /// Every batch size is written by statements of at most ten sizes, every row once and in
    /// order, with as few statements as powers of two allow.
    #[test]
    fn rows_are_cut_into_statements_of_ten_sizes_in_order() {
        let mut sizes = std::collections::BTreeSet::new();
        for n in 0..=2 * ROWS_PER_INSERT + 37 {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = fixed_chunks(&rows).collect();
            assert_eq!(chunks.concat(), rows, "{n} rows");
            let full = n / ROWS_PER_INSERT;
            let rest = n % ROWS_PER_INSERT;
            assert_eq!(chunks.len(), full + rest.count_ones() as usize, "{n} rows");
            assert!(
                chunks.windows(2).all(|w| w[0].len() >= w[1].len()),
                "{n} rows"
            );
            sizes.extend(chunks.iter().map(|c| c.len()));
        }
        assert_eq!(
            sizes.into_iter().collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 64, 128, 256, ROWS_PER_INSERT]
        );
    }
}
