//! The SQLite store: one file, WAL journal, schema from embedded migrations. Every
//! transaction that appends to the audit chain begins `IMMEDIATE` (see `chain`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::chain::{self, Seen};
use super::writer::{self, Write, Writer};
use super::{
    AgentRecord, ApprovalRow, AuditEvent, AuditFilter, AuditRecord, Inventory, JobHostRow, JobRow,
    LeaseHolder, ResultTaken, RunRow, SnapshotRow, Store, StoreError, Verdict,
};

const RUN_COLUMNS: &str = "run_id, job_id, host_id, requested_by, reason, procedure, status, created_at_ms, finished_at_ms, result, phase";
const JOB_COLUMNS: &str = "job_id, procedure, request, plan, state, reason, requested_by, created_at_ms, finished_at_ms, halt_reason, request_id";

fn run_row(row: &sqlx::sqlite::SqliteRow) -> RunRow {
    RunRow {
        run_id: row.get("run_id"),
        job_id: row.get("job_id"),
        host_id: row.get("host_id"),
        requested_by: row.get("requested_by"),
        reason: row.get("reason"),
        procedure: row.get("procedure"),
        status: row.get("status"),
        created_at_ms: row.get("created_at_ms"),
        finished_at_ms: row.get("finished_at_ms"),
        result: row.get("result"),
        phase: row.get("phase"),
    }
}

fn job_row(row: &sqlx::sqlite::SqliteRow) -> JobRow {
    JobRow {
        job_id: row.get("job_id"),
        procedure: row.get("procedure"),
        request: row.get("request"),
        plan: row.get("plan"),
        state: row.get("state"),
        reason: row.get("reason"),
        requested_by: row.get("requested_by"),
        created_at_ms: row.get("created_at_ms"),
        finished_at_ms: row.get("finished_at_ms"),
        halt_reason: row.get("halt_reason"),
        request_id: row.get("request_id"),
    }
}

const APPROVAL_COLUMNS: &str = "job_id, rule, requested_by, requested_at_ms, expires_at_ms, decision, decided_by, decided_at_ms, reason";

fn approval_row(row: &sqlx::sqlite::SqliteRow) -> ApprovalRow {
    ApprovalRow {
        job_id: row.get("job_id"),
        rule: row.get("rule"),
        requested_by: row.get("requested_by"),
        requested_at_ms: row.get("requested_at_ms"),
        expires_at_ms: row.get("expires_at_ms"),
        decision: row.get("decision"),
        decided_by: row.get("decided_by"),
        decided_at_ms: row.get("decided_at_ms"),
        reason: row.get("reason"),
    }
}

/// Inserts a job, its hosts and its leases in `tx`; fails with `StoreError::Leased` when
/// another job holds any of `leased`.
async fn insert_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    job: &JobRow,
    hosts: &[JobHostRow],
    leased: &[String],
) -> Result<(), StoreError> {
    let holders = holders_in(tx, leased, &job.job_id).await?;
    if !holders.is_empty() {
        return Err(StoreError::Leased { holders });
    }
    insert_leases(tx, leased, &job.job_id).await?;
    sqlx::query(&format!(
        "INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
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
    .execute(&mut **tx)
    .await
    .map_err(query_err("create_job"))?;
    for h in hosts {
        bind_job_host(sqlx::query(UPSERT_JOB_HOST), h)
            .execute(&mut **tx)
            .await
            .map_err(query_err("create_job hosts"))?;
    }
    Ok(())
}

fn job_host_row(row: &sqlx::sqlite::SqliteRow) -> JobHostRow {
    JobHostRow {
        job_id: row.get("job_id"),
        host_id: row.get("host_id"),
        ord: row.get("ord"),
        outcome: row.get("outcome"),
        phase: row.get("phase"),
        failed_step: row.get("failed_step"),
        exit_code: row.get("exit_code"),
        detail: row.get("detail"),
        duration_ms: row.get("duration_ms"),
        once_only: row.get::<i64, _>("once_only") != 0,
        done_phases: split_phases(row.get::<String, _>("done_phases").as_str()),
    }
}

pub(super) const UPSERT_JOB_HOST: &str = "INSERT INTO job_hosts (job_id, host_id, ord, outcome, phase, failed_step, exit_code, detail, duration_ms, once_only, done_phases)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
     ON CONFLICT(job_id, host_id) DO UPDATE SET outcome = ?4, phase = ?5, failed_step = ?6, exit_code = ?7, detail = ?8, duration_ms = ?9, done_phases = ?11";

/// Phase names are stored one per line (a runbook phase name has no newline).
fn split_phases(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Hosts among `hosts` leased to a job other than `job_id`.
async fn holders_in(
    conn: &mut sqlx::SqliteConnection,
    hosts: &[String],
    job_id: &str,
) -> Result<Vec<LeaseHolder>, StoreError> {
    let mut out = Vec::new();
    for h in hosts {
        if let Some(row) = sqlx::query("SELECT job_id FROM host_leases WHERE host_id = ?1")
            .bind(h)
            .fetch_optional(&mut *conn)
            .await
            .map_err(query_err("lease holders"))?
        {
            let holder: String = row.get("job_id");
            if holder != job_id {
                out.push(LeaseHolder {
                    host_id: h.clone(),
                    job_id: holder,
                });
            }
        }
    }
    Ok(out)
}

async fn insert_leases(
    conn: &mut sqlx::SqliteConnection,
    hosts: &[String],
    job_id: &str,
) -> Result<(), StoreError> {
    let now = rollback_common::now_unix_ms();
    for h in hosts {
        sqlx::query(
            "INSERT INTO host_leases (host_id, job_id, acquired_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(host_id) DO NOTHING",
        )
        .bind(h)
        .bind(job_id)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(query_err("insert lease"))?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// Hot-path writes, group-committed.
    writer: Writer,
    /// The newest audit record this process has seen committed.
    seen: Arc<Seen>,
}

pub(super) fn query_err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
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
        let chained = chain::chain_unchained_history(&pool).await?;
        let head = chain::stored_head(&pool).await?;
        // The head in the log is an anchor outside the store: `audit verify` reports it too.
        tracing::info!(
            store = %path.display(),
            head_seq = head.as_ref().map_or(0, |h| h.seq),
            head_hash = head.as_ref().map_or(chain::GENESIS, |h| h.hash.as_str()),
            chained_history = chained,
            "audit chain opened"
        );
        let seen = Arc::new(Seen::new(head));
        let writer = Writer::start(pool.clone(), seen.clone());
        Ok(Self { pool, writer, seen })
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
        let link = chain::append(&mut tx, audit, &self.seen).await?;
        tx.commit().await.map_err(query_err(what))?;
        self.seen.advance(&link);
        Ok(())
    }

    /// Every host's inventory labels.
    async fn inventories(&self) -> Result<HashMap<String, Inventory>, StoreError> {
        self.inventory_rows(None).await
    }

    async fn inventory_rows(
        &self,
        host_id: Option<&str>,
    ) -> Result<HashMap<String, Inventory>, StoreError> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT host_id, key, value, source FROM inventory_labels WHERE ?1 IS NULL OR host_id = ?1",
        )
        .bind(host_id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("inventory"))?;
        let mut out: HashMap<String, Inventory> = HashMap::new();
        for (host, key, value, source) in rows {
            let inv = out.entry(host).or_default();
            match source.as_str() {
                "config" => inv.config.insert(key, value),
                _ => inv.operator.insert(key, value),
            };
        }
        Ok(out)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn agent_connected(&self, a: &AgentRecord) -> Result<(), StoreError> {
        let labels =
            serde_json::to_string(&a.reported_labels).map_err(|e| StoreError::Corrupt {
                key: a.host_id.clone(),
                reason: e.to_string(),
            })?;
        sqlx::query(
            "INSERT INTO agents (host_id, labels_json, agent_version, address, online, connected_at_ms, last_seen_ms, state, cert_not_after_ms, coordinator)
             VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(host_id) DO UPDATE SET labels_json = ?2, agent_version = ?3, address = ?4,
                 online = 1, connected_at_ms = ?5, last_seen_ms = ?6, state = ?7, cert_not_after_ms = ?8,
                 coordinator = ?9",
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
        self.writer
            .write(Write::AgentSeen {
                host_id: host_id.to_string(),
                last_seen_ms,
                state: state.map(<[u8]>::to_vec),
            })
            .await
            .map(|_| ())
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
            "SELECT host_id, labels_json, agent_version, address, online, connected_at_ms, last_seen_ms, state,
                    cert_not_after_ms, coordinator
             FROM agents ORDER BY host_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list_agents"))?;
        let mut inventory = self.inventories().await?;
        rows.into_iter()
            .map(|row| {
                let host_id: String = row.get("host_id");
                let labels_json: String = row.get("labels_json");
                let reported_labels =
                    serde_json::from_str(&labels_json).map_err(|e| StoreError::Corrupt {
                        key: host_id.clone(),
                        reason: format!("labels: {e}"),
                    })?;
                Ok(AgentRecord {
                    labels: inventory.remove(&host_id).unwrap_or_default().effective(),
                    reported_labels,
                    agent_version: row.get("agent_version"),
                    address: row.get("address"),
                    online: row.get::<i64, _>("online") != 0,
                    connected_at_ms: row.get("connected_at_ms"),
                    last_seen_ms: row.get("last_seen_ms"),
                    state: row.get::<Option<Vec<u8>>, _>("state").unwrap_or_default(),
                    cert_not_after_ms: row.get("cert_not_after_ms"),
                    coordinator: row.get("coordinator"),
                    host_id,
                })
            })
            .collect()
    }

    async fn create_run(&self, r: &RunRow) -> Result<(), StoreError> {
        self.writer
            .write(Write::CreateRun(r.clone()))
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
            .writer
            .write(Write::FinishRun {
                run_id: run_id.to_string(),
                host_id: host_id.to_string(),
                status,
                finished_at_ms,
                result: result.to_vec(),
                audit: audit.clone(),
            })
            .await?;
        Ok(match code {
            writer::TAKEN_RECORDED => ResultTaken::Recorded,
            writer::TAKEN_ALREADY => ResultTaken::AlreadyRecorded,
            writer::TAKEN_OTHER_HOST => ResultTaken::OtherHost(
                self.get_run(run_id)
                    .await?
                    .map(|r| r.host_id)
                    .unwrap_or_default(),
            ),
            _ => ResultTaken::UnknownRun,
        })
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<RunRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?1"))
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("get_run"))?;
        Ok(row.as_ref().map(run_row))
    }

    async fn unfinished_runs(&self, host_id: &str) -> Result<Vec<RunRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE host_id = ?1 AND result IS NULL ORDER BY created_at_ms"
        ))
        .bind(host_id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("unfinished_runs"))?;
        Ok(rows.iter().map(run_row).collect())
    }

    async fn append_audit(&self, e: &AuditEvent) -> Result<(), StoreError> {
        self.writer.write(Write::Audit(e.clone())).await.map(|_| ())
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        chain::list(&self.pool, filter).await
    }

    async fn verify_audit(&self) -> Result<Verdict, StoreError> {
        chain::verify(&self.pool, &self.seen).await
    }

    async fn create_job(
        &self,
        job: &JobRow,
        hosts: &[JobHostRow],
        leased: &[String],
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        // BEGIN IMMEDIATE: the lease check and the insert are one atomic step even against
        // another coordinator process on the same file.
        let mut tx = self.begin_audited("create_job").await?;
        insert_job(&mut tx, job, hosts, leased).await?;
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
        insert_job(&mut tx, job, hosts, leased).await?;
        sqlx::query(
            "INSERT INTO job_approvals (job_id, rule, requested_by, requested_at_ms, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&approval.job_id)
        .bind(&approval.rule)
        .bind(&approval.requested_by)
        .bind(approval.requested_at_ms)
        .bind(approval.expires_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(query_err("create_job_awaiting"))?;
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
        let state = match decision {
            "approved" => "running",
            "denied" | "expired" | "cancelled" => decision,
            other => {
                return Err(StoreError::Corrupt {
                    key: job_id.to_string(),
                    reason: format!("`{other}` is not an approval decision"),
                });
            }
        };
        let mut tx = self.begin_audited("decide_approval").await?;
        let changed = sqlx::query(
            "UPDATE jobs SET state = ?2, finished_at_ms = ?3, halt_reason = ?4
             WHERE job_id = ?1 AND state = 'awaiting_approval'",
        )
        .bind(job_id)
        .bind(state)
        .bind((state != "running").then_some(at_ms))
        .bind(if state == "running" {
            String::new()
        } else {
            format!("{decision} by {by}: {reason}")
        })
        .execute(&mut *tx)
        .await
        .map_err(query_err("decide_approval"))?
        .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE job_approvals SET decision = ?2, decided_by = ?3, decided_at_ms = ?4, reason = ?5
             WHERE job_id = ?1 AND decision = ''",
        )
        .bind(job_id)
        .bind(decision)
        .bind(by)
        .bind(at_ms)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(query_err("decide_approval"))?;
        if state != "running" {
            sqlx::query("DELETE FROM host_leases WHERE job_id = ?1")
                .bind(job_id)
                .execute(&mut *tx)
                .await
                .map_err(query_err("decide_approval"))?;
        }
        self.commit_audited(tx, audit, "decide_approval commit")
            .await
            .map(|()| true)
    }

    async fn job_approval(&self, job_id: &str) -> Result<Option<ApprovalRow>, StoreError> {
        Ok(sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM job_approvals WHERE job_id = ?1"
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("job_approval"))?
        .map(|row| approval_row(&row)))
    }

    async fn pending_approvals(&self) -> Result<Vec<ApprovalRow>, StoreError> {
        Ok(sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM job_approvals WHERE decision = '' ORDER BY requested_at_ms"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("pending_approvals"))?
        .iter()
        .map(approval_row)
        .collect())
    }

    async fn reopen_job(
        &self,
        job_id: &str,
        leased: &[String],
        reset: &[JobHostRow],
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_audited("reopen_job").await?;
        let holders = holders_in(&mut tx, leased, job_id).await?;
        if !holders.is_empty() {
            return Err(StoreError::Leased { holders });
        }
        insert_leases(&mut tx, leased, job_id).await?;
        for h in reset {
            bind_job_host(sqlx::query(UPSERT_JOB_HOST), h)
                .execute(&mut *tx)
                .await
                .map_err(query_err("reopen_job hosts"))?;
        }
        let reopened = sqlx::query(
            "UPDATE jobs SET state = 'running', finished_at_ms = NULL, halt_reason = '' WHERE job_id = ?1 AND state <> 'running'",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await
        .map_err(query_err("reopen_job state"))?;
        // Two resumes at once (on two coordinators): the first one wins.
        if reopened.rows_affected() == 0 {
            return Err(StoreError::Changed {
                what: format!("job {job_id}"),
            });
        }
        self.commit_audited(tx, audit, "reopen_job commit").await
    }

    async fn lease_holders(&self, hosts: &[String]) -> Result<Vec<LeaseHolder>, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(query_err("lease_holders"))?;
        holders_in(&mut conn, hosts, "").await
    }

    async fn running_jobs(&self) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT job_id FROM jobs WHERE state = 'running' ORDER BY created_at_ms")
                .fetch_all(&self.pool)
                .await
                .map_err(query_err("running_jobs"))?;
        Ok(rows.iter().map(|r| r.get("job_id")).collect())
    }

    async fn forget_agent(&self, host_id: &str, audit: &AuditEvent) -> Result<bool, StoreError> {
        let mut tx = self.begin_audited("forget_agent").await?;
        let n = sqlx::query("DELETE FROM agents WHERE host_id = ?1")
            .bind(host_id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("forget_agent"))?
            .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        // A decommissioned host's labels go with it (the config's stay: they are the file's).
        sqlx::query("DELETE FROM inventory_labels WHERE host_id = ?1 AND source = 'operator'")
            .bind(host_id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("forget_agent"))?;
        self.commit_audited(tx, audit, "forget_agent commit")
            .await
            .map(|()| true)
    }

    async fn sync_config_inventory(
        &self,
        labels: &BTreeMap<String, BTreeMap<String, String>>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let labels = labels
            .iter()
            .flat_map(|(host, kv)| {
                kv.iter()
                    .map(move |(k, v)| (host.clone(), k.clone(), v.clone()))
            })
            .collect();
        let changed = self
            .writer
            .write(Write::ConfigInventory {
                labels,
                audit: audit.clone(),
            })
            .await?;
        Ok(changed > 0)
    }

    async fn inventory(&self, host_id: &str) -> Result<Inventory, StoreError> {
        Ok(self
            .inventory_rows(Some(host_id))
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
        self.writer
            .write(Write::Labels {
                host_id: host_id.to_string(),
                set: set.to_vec(),
                remove: remove.to_vec(),
                at_ms: audit.at_ms,
                audit: audit.clone(),
            })
            .await
            .map(|_| ())
    }

    async fn update_job_state(
        &self,
        job_id: &str,
        state: &str,
        finished_at_ms: Option<i64>,
        halt_reason: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_audited("update_job_state").await?;
        sqlx::query(
            "UPDATE jobs SET state = ?2, finished_at_ms = ?3, halt_reason = ?4 WHERE job_id = ?1",
        )
        .bind(job_id)
        .bind(state)
        .bind(finished_at_ms)
        .bind(halt_reason)
        .execute(&mut *tx)
        .await
        .map_err(query_err("update_job_state"))?;
        if state != "running" {
            sqlx::query("DELETE FROM host_leases WHERE job_id = ?1")
                .bind(job_id)
                .execute(&mut *tx)
                .await
                .map_err(query_err("release leases"))?;
        }
        self.commit_audited(tx, audit, "update_job_state commit")
            .await
    }

    async fn update_job_host(&self, host: &JobHostRow) -> Result<(), StoreError> {
        self.writer
            .write(Write::JobHost(host.clone()))
            .await
            .map(|_| ())
    }

    async fn append_job_event(
        &self,
        job_id: &str,
        seq: u64,
        at_ms: i64,
        event: &[u8],
    ) -> Result<(), StoreError> {
        self.append_job_events(job_id, vec![(seq, at_ms, event.to_vec())])
            .await
    }

    async fn append_job_events(
        &self,
        job_id: &str,
        events: Vec<(u64, i64, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        self.writer
            .write(Write::JobEvents {
                job_id: job_id.to_string(),
                events,
            })
            .await
            .map(|_| ())
    }

    async fn job_events(
        &self,
        job_id: &str,
        after_seq: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, event FROM job_events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
        )
        .bind(job_id)
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("job_events"))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    u64::try_from(r.get::<i64, _>("seq")).unwrap_or(0),
                    r.get("event"),
                )
            })
            .collect())
    }

    async fn job_for_request(&self, request_id: &str) -> Result<Option<JobRow>, StoreError> {
        if request_id.is_empty() {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = ?1"
        ))
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("job_for_request"))?;
        Ok(row.as_ref().map(job_row))
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<(JobRow, Vec<JobHostRow>)>, StoreError> {
        let Some(row) = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1"))
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("get_job"))?
        else {
            return Ok(None);
        };
        let hosts = sqlx::query("SELECT * FROM job_hosts WHERE job_id = ?1 ORDER BY ord")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("get_job hosts"))?;
        Ok(Some((
            job_row(&row),
            hosts.iter().map(job_host_row).collect(),
        )))
    }

    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at_ms DESC LIMIT ?1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list_jobs"))?;
        Ok(rows.iter().map(job_row).collect())
    }

    async fn job_runs(&self, job_id: &str) -> Result<Vec<RunRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE job_id = ?1 ORDER BY created_at_ms, rowid"
        ))
        .bind(job_id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("job_runs"))?;
        Ok(rows.iter().map(run_row).collect())
    }

    async fn insert_snapshot(&self, r: &SnapshotRow, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.begin_audited("insert_snapshot").await?;
        sqlx::query(
            "INSERT OR REPLACE INTO snapshots (snapshot_id, host_id, job_id, label, taken_at_ms, git_sha, git_subject,
             alembic_revision, env_sha256, unit_state, db_backup) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
        .execute(&mut *tx)
        .await
        .map_err(query_err("insert_snapshot"))?;
        self.commit_audited(tx, audit, "insert_snapshot commit")
            .await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM snapshots ORDER BY taken_at_ms DESC, host_id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list_snapshots"))?;
        Ok(rows
            .iter()
            .map(|r| SnapshotRow {
                snapshot_id: r.get("snapshot_id"),
                host_id: r.get("host_id"),
                job_id: r.get("job_id"),
                label: r.get("label"),
                taken_at_ms: r.get("taken_at_ms"),
                git_sha: r.get("git_sha"),
                git_subject: r.get("git_subject"),
                alembic_revision: r.get("alembic_revision"),
                env_sha256: r.get("env_sha256"),
                unit_state: r.get("unit_state"),
                db_backup: r.get("db_backup"),
            })
            .collect())
    }
}

pub(super) fn bind_job_host<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    h: &'q JobHostRow,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    q.bind(&h.job_id)
        .bind(&h.host_id)
        .bind(h.ord)
        .bind(&h.outcome)
        .bind(&h.phase)
        .bind(&h.failed_step)
        .bind(h.exit_code)
        .bind(&h.detail)
        .bind(h.duration_ms)
        .bind(i64::from(h.once_only))
        .bind(h.done_phases.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, state: &str) -> JobRow {
        JobRow {
            job_id: id.into(),
            procedure: "configuration".into(),
            request: Vec::new(),
            plan: Vec::new(),
            state: state.into(),
            reason: "test".into(),
            requested_by: "test".into(),
            created_at_ms: 1,
            finished_at_ms: None,
            halt_reason: String::new(),
            request_id: String::new(),
        }
    }

    fn audit(action: &str, target: &str) -> AuditEvent {
        AuditEvent {
            at_ms: 1,
            actor: "spiffe://fleet.test/operator/alice".into(),
            action: action.into(),
            target: target.into(),
            detail: "test".into(),
        }
    }

    fn host(job: &str, outcome: &str) -> JobHostRow {
        JobHostRow {
            job_id: job.into(),
            host_id: "h1".into(),
            ord: 0,
            outcome: outcome.into(),
            phase: "rollback".into(),
            failed_step: "http.check".into(),
            exit_code: 1,
            detail: "failed".into(),
            duration_ms: 0,
            once_only: false,
            done_phases: Vec::new(),
        }
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

    #[tokio::test]
    async fn a_reopen_refused_by_a_lease_writes_nothing_and_one_allowed_writes_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite"))
            .await
            .expect("store");
        let hosts = ["h1".to_string()];
        store
            .create_job(
                &job("old", "running"),
                &[host("old", "failed")],
                &hosts,
                &audit("rollback.started", "job/old"),
            )
            .await
            .expect("old job");
        store
            .update_job_state(
                "old",
                "halted",
                Some(2),
                "halted",
                &audit("rollback.finished", "job/old"),
            )
            .await
            .expect("old job halts");
        store
            .create_job(
                &job("holder", "running"),
                &[host("holder", "pending")],
                &hosts,
                &audit("rollback.started", "job/holder"),
            )
            .await
            .expect("holder takes h1");

        let mut reset = host("old", "pending");
        reset.detail = "retried".into();
        let resume = audit("rollback.resume", "job/old");
        let refused = store
            .reopen_job("old", &hosts, &[reset.clone()], &resume)
            .await;
        assert!(
            matches!(refused, Err(StoreError::Leased { ref holders }) if holders[0].job_id == "holder")
        );
        let (row, rows) = store.get_job("old").await.expect("read").expect("old");
        assert_eq!(row.state, "halted", "nothing written");
        assert_eq!(rows[0].outcome, "failed", "nothing written");

        store
            .update_job_state(
                "holder",
                "succeeded",
                Some(3),
                "",
                &audit("rollback.finished", "job/holder"),
            )
            .await
            .expect("holder ends, releasing h1");
        store
            .reopen_job("old", &hosts, &[reset], &resume)
            .await
            .expect("reopened");
        let (row, rows) = store.get_job("old").await.expect("read").expect("old");
        assert_eq!((row.state.as_str(), row.finished_at_ms), ("running", None));
        assert_eq!(
            (rows[0].outcome.as_str(), rows[0].detail.as_str()),
            ("pending", "retried")
        );
        assert_eq!(
            store.lease_holders(&hosts).await.expect("leases")[0].job_id,
            "old"
        );
    }
}
