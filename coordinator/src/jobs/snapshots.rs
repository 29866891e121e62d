//! Last known good: `Snapshot` (each host records its state; optionally one host takes a
//! verified pg_dump), `Diagnose` (fresh state vs the latest snapshot, through the decision
//! tree), rollback `--to-snapshot` (a plan composed per host from what changed, in a safe
//! order), and the backup gate (a restore refuses to start, before anything is stopped, when
//! its backup is missing or unreadable).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rollback_common::jobs::fact;
use rollback_common::now_unix_ms;
use rollback_common::proto::{
    DiagnoseRequest, DiagnoseResponse, ExecEvent, HostSnapshotInfo, ListSnapshotsResponse,
    PlanResponse, RollbackRequest, RunFinished, RunProcedure, SnapshotRequest, SnapshotResponse,
    Step, StepStatus, exec_event, step_status_name,
};
use rollback_common::runbook::{
    self, Phase, Plan, PlannedPhase, PlannedStep, Procedure, Runbook, Scope, StepTemplate,
};
use rollback_common::selector::Selector;
use tonic::Status;

use super::diagnosis::{diagnose_host, fleet_command};
use super::planning::{parse_selector, strategy, to_proto};
use super::{Jobs, outcome};
use crate::authz::Principal;
use crate::exec::new_id;
use crate::store::{AuditEvent, RunRow, SnapshotRow};

fn step(action: &str, params: &[(&str, &str)]) -> StepTemplate {
    StepTemplate {
        action: action.into(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout_secs: None,
    }
}

fn planned(action: &str, params: &[(&str, &str)]) -> PlannedStep {
    PlannedStep {
        action: action.into(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout_secs: 0,
    }
}

/// Every host at once, never halting (for recording state, not changing it).
fn all_at_once(procedure: &str, selector: &str, once_on: &str, reason: String) -> RollbackRequest {
    RollbackRequest {
        procedure: procedure.into(),
        selector: selector.into(),
        once_on: once_on.into(),
        canary: Some(0),
        batch_size: "100%".into(),
        max_failures: "100%".into(),
        reason,
        ..Default::default()
    }
}

fn info(row: &SnapshotRow) -> HostSnapshotInfo {
    let baseline = super::guard::Baseline::parse(&row.baseline);
    HostSnapshotInfo {
        snapshot_id: row.snapshot_id.clone(),
        host_id: row.host_id.clone(),
        label: row.label.clone(),
        taken_at_unix_ms: row.taken_at_ms,
        git_sha: row.git_sha.clone(),
        git_subject: row.git_subject.clone(),
        alembic_revision: row.alembic_revision.clone(),
        env_sha256: row.env_sha256.clone(),
        unit_state: row.unit_state.clone(),
        db_backup: row.db_backup.clone(),
        job_id: row.job_id.clone(),
        smoke: baseline
            .as_ref()
            .map(|b| b.smoke_info())
            .unwrap_or_default(),
        error_lines_per_min: baseline.as_ref().map_or(0.0, |b| b.error_lines_per_min),
        restarts: baseline
            .and_then(|b| b.restarts)
            .and_then(|r| i64::try_from(r).ok())
            .unwrap_or(-1),
    }
}

impl Jobs {
    /// Runs a job built from `runbook` to its end; returns its id.
    async fn run_internal(
        self: &Arc<Self>,
        principal: &Principal,
        req: RollbackRequest,
        runbook: &Runbook,
    ) -> Result<String, Status> {
        let (plan, proto) = self.plan_in(&req, runbook, true).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Read-only: takes no lease (a busy host is waited for, never failed).
        let started = match self
            .launch(principal, req, plan, proto, false, Some(tx))
            .await
        {
            Ok(s) => s,
            Err(super::engine::LaunchError::Leased(h)) => {
                return Err(super::engine::leased_status(&h));
            }
            Err(super::engine::LaunchError::Status(s)) => return Err(s),
        };
        let _ = rx.await;
        Ok(started.job_id)
    }

    /// Facts of the first successful `action` step each host ran in job `job_id`.
    async fn facts_by_host(
        &self,
        job_id: &str,
        action: &str,
    ) -> Result<HashMap<String, HashMap<String, String>>, Status> {
        let job = self.get(job_id).await?;
        let mut out = HashMap::new();
        for h in job.hosts {
            let facts = h
                .runs
                .iter()
                .filter_map(|r| r.result.as_ref())
                .flat_map(|r| r.steps.iter())
                .find(|s| s.action == action && s.status == StepStatus::Succeeded as i32)
                .map(|s| s.facts.clone().into_iter().collect());
            if let Some(f) = facts {
                out.insert(h.host_id, f);
            }
        }
        Ok(out)
    }

    pub async fn snapshot(
        self: &Arc<Self>,
        principal: &Principal,
        req: SnapshotRequest,
    ) -> Result<SnapshotResponse, Status> {
        parse_selector(&req.selector)?;
        let snapshot_id = new_id();
        let label = if req.label.trim().is_empty() {
            "snapshot".to_string()
        } else {
            req.label.clone()
        };
        let mut phases = vec![Phase {
            name: "snapshot".into(),
            scope: Scope::Each,
            steps: vec![step(
                "snapshot.take",
                &[("id", &snapshot_id), ("label", &label)],
            )],
        }];
        if req.db_backup {
            phases.push(Phase {
                name: "db-backup".into(),
                scope: Scope::Once,
                steps: vec![step("postgres.backup", &[])],
            });
        }
        let once_on = if req.once_on.is_empty() {
            "role=db".to_string()
        } else {
            req.once_on.clone()
        };
        let rb = Runbook {
            procedures: BTreeMap::from([(
                "snapshot".to_string(),
                Procedure {
                    description: format!("record last-known-good state: {label}"),
                    once_on: Some(once_on.clone()),
                    needs: vec![],
                    estimate: None,
                    phases,
                },
            )]),
            guard: Default::default(),
        };
        let job_id = self
            .run_internal(
                principal,
                all_at_once(
                    "snapshot",
                    &req.selector,
                    &once_on,
                    format!("snapshot: {label}"),
                ),
                &rb,
            )
            .await?;
        let taken = self.facts_by_host(&job_id, "snapshot.take").await?;
        let backups = self.facts_by_host(&job_id, "postgres.backup").await?;
        let mut hosts = Vec::new();
        let mut ids: Vec<&String> = taken.keys().chain(backups.keys()).collect();
        ids.sort();
        ids.dedup();
        for host in ids {
            let f = taken.get(host).cloned().unwrap_or_default();
            let get = |k: &str| f.get(k).cloned().unwrap_or_default();
            let row = SnapshotRow {
                snapshot_id: snapshot_id.clone(),
                host_id: host.clone(),
                job_id: job_id.clone(),
                label: label.clone(),
                taken_at_ms: now_unix_ms(),
                git_sha: get(fact::GIT_SHA),
                git_subject: get(fact::GIT_SUBJECT),
                alembic_revision: get(fact::ALEMBIC_REVISION),
                env_sha256: get(fact::ENV_SHA256),
                unit_state: get(fact::UNIT_STATE),
                db_backup: backups
                    .get(host)
                    .and_then(|b| b.get(fact::BACKUP).cloned())
                    .unwrap_or_default(),
                baseline: if f.is_empty() {
                    String::new()
                } else {
                    super::guard::Baseline::from_facts(&f).to_json()
                },
            };
            let audit = AuditEvent {
                at_ms: row.taken_at_ms,
                actor: principal.identity.to_string(),
                action: "snapshot.recorded".into(),
                target: format!("job/{job_id}"),
                detail: format!(
                    "snapshot={} host={} label={} git_sha={} alembic_revision={} env_sha256={} unit_state={} db_backup={}",
                    row.snapshot_id,
                    row.host_id,
                    row.label,
                    row.git_sha,
                    row.alembic_revision,
                    row.env_sha256,
                    row.unit_state,
                    row.db_backup
                ),
            };
            // The last-known-good state `--to-snapshot` rolls back to: stored with its record.
            self.store.insert_snapshot(&row, &audit).await?;
            hosts.push(info(&row));
        }
        let job = self.get(&job_id).await?;
        Ok(SnapshotResponse {
            snapshot_id,
            job_id,
            state: job.state.clone(),
            hosts,
            failures: job
                .hosts
                .into_iter()
                .filter(|h| h.outcome != outcome::SUCCEEDED)
                .collect(),
        })
    }

    pub async fn list_snapshots(&self, selector: &str) -> Result<ListSnapshotsResponse, Status> {
        let sel = Selector::parse(selector)
            .map_err(|e| Status::invalid_argument(format!("--select: {e}")))?;
        let labels: HashMap<String, HashMap<String, String>> = self
            .store
            .list_agents()
            .await?
            .into_iter()
            .map(|a| (a.host_id, a.labels))
            .collect();
        let empty = HashMap::new();
        let snapshots = self
            .store
            .list_snapshots()
            .await?
            .iter()
            .filter(|r| sel.matches(&r.host_id, labels.get(&r.host_id).unwrap_or(&empty)))
            .map(info)
            .collect();
        Ok(ListSnapshotsResponse { snapshots })
    }

    /// Each selected host's snapshot: the latest, or the one named `id`.
    pub(super) async fn snapshots_for(
        &self,
        id: &str,
    ) -> Result<HashMap<String, SnapshotRow>, Status> {
        let mut out: HashMap<String, SnapshotRow> = HashMap::new();
        for row in self.store.list_snapshots().await? {
            let wanted = id == "latest" || id.is_empty() || row.snapshot_id == id;
            if wanted && row.git_sha.len() + row.env_sha256.len() + row.alembic_revision.len() > 0 {
                out.entry(row.host_id.clone()).or_insert(row);
            }
        }
        Ok(out)
    }

    pub async fn diagnose(
        self: &Arc<Self>,
        principal: &Principal,
        req: DiagnoseRequest,
    ) -> Result<DiagnoseResponse, Status> {
        self.diagnose_against(principal, &req.selector, "latest")
            .await
    }

    pub(super) async fn diagnose_against(
        self: &Arc<Self>,
        principal: &Principal,
        selector: &str,
        snapshot: &str,
    ) -> Result<DiagnoseResponse, Status> {
        parse_selector(selector)?;
        let rb = Runbook {
            procedures: BTreeMap::from([(
                "diagnose".to_string(),
                Procedure {
                    description: "read each host's state for diagnosis".into(),
                    once_on: None,
                    needs: vec![],
                    estimate: None,
                    phases: vec![Phase {
                        name: "read".into(),
                        scope: Scope::Each,
                        steps: vec![step("state.read", &[])],
                    }],
                },
            )]),
            guard: Default::default(),
        };
        let job_id = self
            .run_internal(
                principal,
                all_at_once("diagnose", selector, "", "diagnose".into()),
                &rb,
            )
            .await?;
        let facts = self.facts_by_host(&job_id, "state.read").await?;
        let snapshots = self.snapshots_for(snapshot).await?;
        let job = self.get(&job_id).await?;
        let mut hosts = Vec::new();
        for h in job.hosts.iter().filter(|h| !h.once_only) {
            let mut d = match facts.get(&h.host_id) {
                Some(f) => diagnose_host(&h.host_id, snapshots.get(&h.host_id), f),
                None => rollback_common::proto::HostDiagnosis {
                    host_id: h.host_id.clone(),
                    note: format!("could not read its state: {} {}", h.outcome, h.detail),
                    ..Default::default()
                },
            };
            if snapshot != "latest" && !snapshots.contains_key(&h.host_id) {
                d.note = format!("{} has no part in snapshot {snapshot}", h.host_id);
            }
            hosts.push(d);
        }
        let command = fleet_command(selector, &hosts, &snapshots);
        Ok(DiagnoseResponse {
            hosts,
            command,
            job_id,
        })
    }

    /// The diagnosis against snapshot `snapshot` from the state each agent last reported
    /// (Hello and heartbeats), without running anything: what `rollbackctl plan` shows.
    async fn diagnose_reported(
        &self,
        selector: &str,
        snapshot: &str,
    ) -> Result<DiagnoseResponse, Status> {
        let selector_parsed = parse_selector(selector)?;
        let snapshots = self.snapshots_for(snapshot).await?;
        let mut hosts = Vec::new();
        for agent in self.store.list_agents().await? {
            if !selector_parsed.matches(&agent.host_id, &agent.labels) {
                continue;
            }
            let state = rollback_common::proto::HostState::decode(agent.state.as_slice())
                .unwrap_or_default();
            let health = state.last_health.unwrap_or_default();
            let facts: HashMap<String, String> = [
                (fact::GIT_SHA, state.git_head_sha),
                (fact::ALEMBIC_REVISION, state.alembic_revision),
                (fact::ENV_SHA256, state.env_sha256),
                (fact::UNIT_STATE, state.unit_active_state),
                (
                    "readyz_status",
                    if health.status == 0 {
                        String::new()
                    } else {
                        health.status.to_string()
                    },
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let mut d = diagnose_host(&agent.host_id, snapshots.get(&agent.host_id), &facts);
            if d.note.is_empty() {
                d.note =
                    "from the state the agent last reported; the rollback reads it afresh".into();
            }
            hosts.push(d);
        }
        let command = fleet_command(selector, &hosts, &snapshots);
        Ok(DiagnoseResponse {
            hosts,
            command,
            job_id: String::new(),
        })
    }

    /// Plans a rollback that brings each host back to its snapshot, composing the procedures
    /// the diagnosis found in a safe order: stop everywhere and downgrade once when the schema
    /// changed, then per host check out the recorded commit and restore the recorded env, start
    /// (or restart) and verify /readyz. `live`: read fresh state first (a read-only diagnose
    /// job, for a rollback about to start); otherwise from the agents' reported state (a plan
    /// preview never starts anything).
    pub(super) async fn to_snapshot_plan(
        self: &Arc<Self>,
        principal: &Principal,
        req: &RollbackRequest,
        live: bool,
    ) -> Result<(Plan, PlanResponse), Status> {
        let diag = if live {
            self.diagnose_against(principal, &req.selector, &req.to_snapshot)
                .await?
        } else {
            self.diagnose_reported(&req.selector, &req.to_snapshot)
                .await?
        };
        let snapshots = self.snapshots_for(&req.to_snapshot).await?;
        let missing: Vec<&str> = diag
            .hosts
            .iter()
            .filter(|h| !snapshots.contains_key(&h.host_id))
            .map(|h| h.host_id.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no snapshot `{}` for {}: take one with `rollbackctl snapshot --select ...`",
                req.to_snapshot,
                missing.join(", ")
            )));
        }
        let changed: Vec<&rollback_common::proto::HostDiagnosis> = diag
            .hosts
            .iter()
            .filter(|h| !h.changes.is_empty())
            .collect();
        if changed.is_empty() {
            return Err(Status::failed_precondition(
                "every selected host already matches its snapshot; nothing to roll back (see `rollbackctl diagnose`)",
            ));
        }
        let schema = changed
            .iter()
            .any(|h| h.changes.iter().any(|c| c.what == "schema"));
        let targets: Vec<String> = if schema {
            diag.hosts.iter().map(|h| h.host_id.clone()).collect()
        } else {
            changed.iter().map(|h| h.host_id.clone()).collect()
        };
        let strategy = strategy(req)?;
        let mut phases = Vec::new();
        let mut once_host = None;
        let mut host_steps = BTreeMap::new();
        // By index, not by a search per target (quadratic over a fleet).
        let mut diagnosed: std::collections::HashMap<&str, &rollback_common::proto::HostDiagnosis> =
            std::collections::HashMap::new();
        for d in &diag.hosts {
            diagnosed.entry(d.host_id.as_str()).or_insert(d);
        }
        for host in &targets {
            let d = diagnosed.get(host.as_str()).copied();
            let has = |w: &str| d.is_some_and(|d| d.changes.iter().any(|c| c.what == w));
            let snap = &snapshots[host];
            let mut steps = Vec::new();
            if has("code") {
                steps.push(planned("git.checkout", &[("revision", &snap.git_sha)]));
            }
            if has("config") {
                steps.push(planned(
                    "file.restore",
                    &[("file", "env"), ("snapshot", &snap.snapshot_id)],
                ));
            }
            steps.push(planned(
                if schema {
                    "service.start"
                } else {
                    "service.restart"
                },
                &[],
            ));
            steps.push(planned(
                "http.check",
                &[
                    ("endpoint", "/readyz"),
                    ("retries", "60"),
                    ("interval_ms", "250"),
                ],
            ));
            steps.push(planned("smoke.run", &[]));
            steps.push(planned("log.scan", &[]));
            host_steps.insert(host.clone(), steps);
        }
        let each = |name: &str, steps: Vec<PlannedStep>, batches: &Vec<Vec<String>>| PlannedPhase {
            name: name.into(),
            scope: Scope::Each,
            steps,
            batches: batches.clone(),
            host_steps: BTreeMap::new(),
        };
        let batches = runbook::batches(&targets, &strategy);
        if schema {
            let revisions: Vec<&str> = targets
                .iter()
                .map(|h| snapshots[h].alembic_revision.as_str())
                .filter(|r| !r.is_empty())
                .collect();
            let Some(rev) = revisions.first().copied() else {
                return Err(Status::failed_precondition(
                    "the schema changed but no snapshot recorded an alembic revision",
                ));
            };
            if revisions.iter().any(|r| *r != rev) {
                return Err(Status::failed_precondition(format!(
                    "the snapshots disagree on the schema revision ({}); roll back by hand",
                    revisions.join(", ")
                )));
            }
            let once_text = if req.once_on.is_empty() {
                "migrator=true".to_string()
            } else {
                req.once_on.clone()
            };
            let once_sel = Selector::parse(&once_text)
                .map_err(|e| Status::invalid_argument(format!("--once-on: {e}")))?;
            let agents = self.store.list_agents().await?;
            let online = self.cluster.online_hosts().await;
            let host = agents
                .iter()
                .find(|a| online.contains(&a.host_id) && once_sel.matches(&a.host_id, &a.labels))
                .map(|a| a.host_id.clone())
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "no online agent matches --once-on {once_text} to run the schema downgrade"
                    ))
                })?;
            phases.push(each("stop", vec![planned("service.stop", &[])], &batches));
            phases.push(PlannedPhase {
                name: "downgrade".into(),
                scope: Scope::Once,
                steps: vec![
                    planned("alembic.downgrade", &[("to_revision", rev)]),
                    planned("alembic.current", &[]),
                ],
                batches: vec![vec![host.clone()]],
                host_steps: BTreeMap::new(),
            });
            once_host = Some(host);
        }
        let mut restore = each("restore", vec![], &batches);
        restore.host_steps = host_steps;
        phases.push(restore);
        let plan = Plan {
            procedure: "to-snapshot".into(),
            targets,
            once_host,
            phases,
            max_failures: strategy.max_failures.of(diag.hosts.len()),
        };
        let summary: Vec<String> = changed
            .iter()
            .map(|h| format!("{}: {}", h.host_id, h.note))
            .collect();
        let proto = to_proto(
            &plan,
            &strategy,
            &format!(
                "back to snapshot {}: {}",
                req.to_snapshot,
                summary.join("; ")
            ),
        );
        Ok((plan, proto))
    }

    /// A plan that restores from a backup refuses to start unless the backup is readable on
    /// the host that would restore it (`pg_restore --list`), before anything is stopped.
    pub(super) async fn backup_gate(&self, plan: &Plan) -> Result<(), Status> {
        for phase in &plan.phases {
            for host in phase.batches.iter().flatten() {
                for s in phase
                    .steps_for(host)
                    .iter()
                    .filter(|s| s.action == "postgres.restore")
                {
                    let backup = s.params.get("backup").cloned().unwrap_or_default();
                    let result = self
                        .preflight(host, Step::new("postgres.verify", &[("backup", &backup)]))
                        .await?;
                    if result.status != StepStatus::Succeeded as i32 {
                        let why = result
                            .steps
                            .first()
                            .map(|s| s.error.clone())
                            .unwrap_or_else(|| step_status_name(result.status).into());
                        return Err(Status::failed_precondition(format!(
                            "backup gate: nothing was stopped — backup `{backup}` cannot be restored on {host}: {why}"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs one read-only step on one host outside any job and waits for its result.
    pub(super) async fn preflight(&self, host: &str, step: Step) -> Result<RunFinished, Status> {
        let run_id = new_id();
        let steps = vec![step.clone()];
        let now = now_unix_ms();
        let procedure = RunProcedure {
            run_id: run_id.clone(),
            job_id: String::new(),
            deadline_unix_ms: crate::dispatch::deadline_ms(now, &steps, Duration::from_secs(10)),
            steps,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        crate::dispatch::dispatch(
            &*self.store,
            &self.cluster,
            &self.hub,
            crate::dispatch::Dispatch {
                host,
                job_id: "preflight",
                record: Some(RunRow {
                    run_id: run_id.clone(),
                    job_id: String::new(),
                    host_id: host.to_string(),
                    requested_by: "coordinator".into(),
                    reason: format!("preflight {}", step.action),
                    procedure: procedure.encode_to_vec(),
                    status: 0,
                    created_at_ms: now,
                    finished_at_ms: None,
                    result: None,
                    phase: "preflight".into(),
                }),
                procedure,
                watcher: tx,
                seen_online: false,
            },
        )
        .await
        .map_err(|e| match e {
            crate::dispatch::DispatchError::Store(e) => Status::from(e),
            other => Status::failed_precondition(format!(
                "{other}; cannot check `{}` there",
                step.action
            )),
        })?;
        let wait = async {
            while let Some(ev) = rx.recv().await {
                if let Ok(ExecEvent {
                    kind: Some(exec_event::Kind::Finished(r)),
                }) = ev.map(|ev| *ev)
                {
                    return Some(r);
                }
            }
            None
        };
        let answer = tokio::time::timeout(Duration::from_secs(120), wait).await;
        self.hub.resolved(&run_id);
        match answer {
            Ok(Some(r)) => Ok(r),
            _ => Err(Status::unavailable(format!(
                "agent {host} did not answer the `{}` check",
                step.action
            ))),
        }
    }
}
