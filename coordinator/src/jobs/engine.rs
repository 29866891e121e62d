//! Driving a job: a state machine whose state is the store. `launch` persists a job (and leases
//! its hosts) before anything runs; `resume_after_restart` and `resume` rebuild the same state
//! from the store; `drive` walks the plan's phases and batches from there: a host's completed
//! phases (and the once-phase) are never run again, a run in flight is re-attached by its run
//! id (the agent's journal makes it exactly-once), and progress is stored as each host finishes
//! each phase. `settle` decides the end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use rollback_common::jobs::{EventKind, JobState, Outcome, fact};
use rollback_common::now_unix_ms;
use rollback_common::proto::{
    ExecEvent, JobEvent, PlanResponse, ResumeJobResponse, RollbackRequest, RunFinished,
    RunProcedure, StartRollbackResponse, StepStatus, exec_event, step_event, step_status_name,
};
use rollback_common::runbook::{Plan, PlannedPhase, PlannedStep, Scope};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{Instrument, error, info, info_span, warn};

use super::batch::{PhaseWork, phase_work};
use super::output::StepOutput;
use super::settle::{HostSoFar, Stop, own_phases, settle};
use super::{Jobs, LiveJob, outcome};
use crate::authz::Principal;
use crate::dispatch::{self, Dispatch, DispatchError};
use crate::exec::new_id;
use crate::store::cluster::Claim;
use crate::store::{AuditEvent, EventRow, JobHostRow, JobRow, LeaseHolder, RunRow, StoreError};

/// How long a busy host is waited for before the run counts as failed.
const BUSY_WAIT: Duration = Duration::from_secs(600);

/// How a host's run in one phase ended, when it did not succeed.
#[derive(Debug, Clone)]
struct HostFailure {
    outcome: Outcome,
    step: String,
    exit_code: i32,
    detail: String,
}

/// How one phase on one host ended.
#[derive(Debug)]
enum RunEnd {
    Done {
        duration_ms: u64,
        note: String,
    },
    Failed(HostFailure),
    /// The coordinator is shutting down: the job stays `running` in the store and is resumed
    /// by the next process.
    Stopping,
}

/// Everything `drive` needs, rebuilt from the store on resume.
pub(super) struct Drive {
    pub(super) job_id: String,
    pub(super) plan: Plan,
    /// Set for a deployment guard (its phases are sampling rounds; see `guard`).
    pub(super) guard: Option<rollback_common::proto::GuardSpec>,
    reason: String,
    tracks: BTreeMap<String, JobHostRow>,
    /// Runs dispatched but without a result: (phase, host) → run.
    inflight: HashMap<(String, String), RunRow>,
}

/// The stored rows of a new job: the job in `state` and its hosts (the once-host too, when
/// it is not a target).
pub(super) fn job_rows(
    job_id: &str,
    actor: &str,
    now: i64,
    req: &RollbackRequest,
    plan: &Plan,
    plan_proto: &PlanResponse,
    state: JobState,
) -> (JobRow, Vec<JobHostRow>) {
    let mut hosts: Vec<JobHostRow> = plan
        .targets
        .iter()
        .enumerate()
        .map(|(i, h)| host_row(job_id, h, i, false))
        .collect();
    if let Some(once) = plan
        .once_host
        .as_ref()
        .filter(|h| !plan.targets.contains(h))
    {
        hosts.push(host_row(job_id, once, hosts.len(), true));
    }
    let job = JobRow {
        job_id: job_id.to_string(),
        procedure: plan.procedure.clone(),
        request: req.encode_to_vec(),
        plan: plan_proto.encode_to_vec(),
        state: state.as_str().into(),
        reason: req.reason.clone(),
        requested_by: actor.to_string(),
        created_at_ms: now,
        finished_at_ms: None,
        halt_reason: String::new(),
        request_id: req.request_id.clone(),
    };
    (job, hosts)
}

/// `param=to` for each pinned target.
pub(super) fn pins_text(plan_proto: &PlanResponse) -> Vec<String> {
    plan_proto
        .pins
        .iter()
        .map(|p| format!("{}={}", p.param, p.to))
        .collect()
}

/// What a rollback request asked for, for its audit record.
pub(super) fn request_detail(
    req: &RollbackRequest,
    plan: &Plan,
    plan_proto: &PlanResponse,
) -> String {
    format!(
        "procedure={} select={} hosts={} pinned=[{}] reason={}",
        plan.procedure,
        req.selector,
        plan.targets.join(","),
        pins_text(plan_proto).join(" "),
        req.reason
    )
}

/// Why a launch did not happen.
pub(super) enum LaunchError {
    Leased(Vec<LeaseHolder>),
    Status(Status),
}

impl From<Status> for LaunchError {
    fn from(s: Status) -> Self {
        LaunchError::Status(s)
    }
}

impl From<StoreError> for LaunchError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Leased { holders } => LaunchError::Leased(holders),
            other => LaunchError::Status(other.into()),
        }
    }
}

/// The refusal for hosts another job holds, naming the job(s) and what to do.
pub fn leased_status(holders: &[LeaseHolder]) -> Status {
    let mut jobs: Vec<&str> = holders.iter().map(|h| h.job_id.as_str()).collect();
    jobs.sort_unstable();
    jobs.dedup();
    let hosts: Vec<&str> = holders.iter().map(|h| h.host_id.as_str()).collect();
    Status::failed_precondition(format!(
        "refused, nothing was started: {} {} being rolled back by job {} (one job per host). Follow it with `rollbackctl watch {}`, or pass --wait to start when it ends",
        hosts.join(", "),
        if hosts.len() == 1 { "is" } else { "are" },
        jobs.join(", "),
        jobs.first().copied().unwrap_or_default(),
    ))
}

/// A run whose result shows that nothing ran on the host (refused before starting, arrived
/// after its deadline): it is safe to dispatch the phase again.
fn nothing_ran(result: &RunFinished) -> bool {
    result.steps.iter().all(|s| {
        matches!(
            StepStatus::try_from(s.status),
            Ok(StepStatus::Skipped | StepStatus::Refused | StepStatus::Busy)
        ) || (s.error.contains("nothing was run") && s.duration_ms == 0)
    })
}

/// What a successful run found already in place ("already at 0002"), for the host's detail.
fn already_note(result: &RunFinished) -> String {
    let notes: Vec<String> = result
        .steps
        .iter()
        .filter(|s| s.facts.get(fact::CHANGED).is_some_and(|c| c == "false"))
        .map(|s| {
            let at = s
                .facts
                .get(fact::REVISION)
                .or_else(|| s.facts.get(fact::SHA))
                .cloned()
                .unwrap_or_default();
            if at.is_empty() {
                format!("{}: already in place", s.action)
            } else {
                format!("{}: already at {at}", s.action)
            }
        })
        .collect();
    notes.join("; ")
}

pub(super) fn host_row(job_id: &str, host: &str, ord: usize, once_only: bool) -> JobHostRow {
    JobHostRow {
        job_id: job_id.to_string(),
        host_id: host.to_string(),
        ord: i64::try_from(ord).unwrap_or(i64::MAX),
        outcome: outcome::PENDING.into(),
        phase: String::new(),
        failed_step: String::new(),
        exit_code: 0,
        detail: String::new(),
        duration_ms: 0,
        once_only,
        done_phases: Vec::new(),
    }
}

/// The plan stored in a job, back in the engine's terms.
pub(super) fn plan_from_proto(p: &PlanResponse) -> Plan {
    let step = |s: &rollback_common::proto::Step| PlannedStep {
        action: s.action.clone(),
        params: s.params.clone().into_iter().collect(),
        timeout_secs: s.timeout_secs,
    };
    Plan {
        procedure: p.procedure.clone(),
        targets: p.targets.clone(),
        once_host: (!p.once_host.is_empty()).then(|| p.once_host.clone()),
        phases: p
            .phases
            .iter()
            .map(|ph| PlannedPhase {
                name: ph.name.clone(),
                scope: if ph.scope == "once" {
                    Scope::Once
                } else {
                    Scope::Each
                },
                steps: ph.steps.iter().map(step).collect(),
                batches: ph.batches.iter().map(|b| b.hosts.clone()).collect(),
                host_steps: ph
                    .host_steps
                    .iter()
                    .map(|h| (h.host_id.clone(), h.steps.iter().map(step).collect()))
                    .collect(),
            })
            .collect(),
        max_failures: p.max_failures as usize,
    }
}

fn parse_outcome(row: &JobHostRow) -> Outcome {
    row.outcome.parse().unwrap_or(Outcome::Failed)
}

impl Jobs {
    /// Plans, checks leases, offline targets and the backup gate, then persists and starts a
    /// job; returns once it is durable. With `wait`, a job whose hosts are leased waits for
    /// them instead of being refused.
    pub async fn start(
        self: &Arc<Self>,
        principal: &Principal,
        req: RollbackRequest,
    ) -> Result<StartRollbackResponse, Status> {
        if req.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "--reason is required: say why you are rolling back (it goes in the audit trail and the report)",
            ));
        }
        if !req.request_id.is_empty() && !rollback_common::valid_id(&req.request_id) {
            return Err(Status::invalid_argument(
                "request id must be 1-64 of [A-Za-z0-9_-]",
            ));
        }
        // A retried start (the connection broke) gets the job the first one made, before and
        // after trying: a retry racing the first is refused by the first's leases.
        if let Some(started) = self.started_for(&req).await? {
            return Ok(started);
        }
        match self.start_new(principal, &req).await {
            Err(e) => match self.started_for(&req).await? {
                Some(started) => Ok(started),
                None => Err(e),
            },
            ok => ok,
        }
    }

    /// The job a start with `req`'s idempotency key made, if any.
    pub(super) async fn started_for(
        &self,
        req: &RollbackRequest,
    ) -> Result<Option<StartRollbackResponse>, Status> {
        let Some(job) = self.store.job_for_request(&req.request_id).await? else {
            return Ok(None);
        };
        let approval = self.store.job_approval(&job.job_id).await?;
        Ok(Some(StartRollbackResponse {
            plan: PlanResponse::decode(job.plan.as_slice()).ok(),
            job_id: job.job_id,
            approval: approval.map(super::approval::approval_proto),
            approval_reported: true,
        }))
    }

    async fn start_new(
        self: &Arc<Self>,
        principal: &Principal,
        req: &RollbackRequest,
    ) -> Result<StartRollbackResponse, Status> {
        loop {
            // Leases first: never resolve targets on hosts another job is changing.
            let agents = self.store.list_agents().await?;
            let selected = super::planning::selected_among(&req.selector, &agents)?;
            let holders = self.store.lease_holders(&selected).await?;
            if !holders.is_empty() {
                if req.wait {
                    self.pause(Duration::from_secs(1)).await?;
                    continue;
                }
                return Err(leased_status(&holders));
            }
            let (plan, plan_proto) = self.plan(principal, req, agents).await?;
            if !plan_proto.offline.is_empty() && !req.skip_offline {
                return Err(Status::failed_precondition(format!(
                    "refused, nothing was started: {} {} offline. Bring the agent back, pass --skip-offline to roll back the others, or remove a decommissioned host with `rollbackctl agents forget HOST`",
                    plan_proto.offline.join(", "),
                    if plan_proto.offline.len() == 1 {
                        "is"
                    } else {
                        "are"
                    },
                )));
            }
            self.backup_gate(&plan).await?;
            let launched = match self.approval_rule(&plan) {
                Some(rule) => {
                    self.request_approval(principal, req, &plan, plan_proto, rule)
                        .await
                }
                None => {
                    self.launch(principal, req.clone(), plan, plan_proto, true, None)
                        .await
                }
            };
            match launched {
                Ok(started) => return Ok(started),
                Err(LaunchError::Leased(_)) if req.wait => {
                    self.pause(Duration::from_secs(1)).await?;
                }
                Err(LaunchError::Leased(holders)) => return Err(leased_status(&holders)),
                Err(LaunchError::Status(s)) => return Err(s),
            }
        }
    }

    /// Sleeps, unless the coordinator is shutting down.
    async fn pause(&self, d: Duration) -> Result<(), Status> {
        tokio::select! {
            () = tokio::time::sleep(d) => Ok(()),
            () = self.shutdown.cancelled() => Err(Status::unavailable("the coordinator is shutting down")),
        }
    }

    /// Persists a planned job (leasing its hosts when `lease`) and starts it; `done` is told
    /// when it ends.
    pub(super) async fn launch(
        self: &Arc<Self>,
        principal: &Principal,
        req: RollbackRequest,
        plan: Plan,
        plan_proto: PlanResponse,
        lease: bool,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<StartRollbackResponse, LaunchError> {
        let job_id = new_id();
        let now = now_unix_ms();
        let actor = principal.identity.to_string();
        let (job, hosts) = job_rows(
            &job_id,
            &actor,
            now,
            &req,
            &plan,
            &plan_proto,
            JobState::Running,
        );
        let leased: Vec<String> = if lease {
            hosts.iter().map(|h| h.host_id.clone()).collect()
        } else {
            Vec::new()
        };
        let pins = pins_text(&plan_proto);
        // The job, its leases and its audit record: one transaction.
        let audit = AuditEvent {
            at_ms: now,
            actor: actor.clone(),
            action: "rollback.started".into(),
            target: format!("job/{job_id}"),
            detail: request_detail(&req, &plan, &plan_proto),
        };
        self.store.create_job(&job, &hosts, &leased, &audit).await?;
        // Ours from the start: a peer takes a job nobody claimed only once it is a lease old.
        self.claim(&job_id).await?;
        let live = self.new_live(&job_id, 1);
        let targets = plan.targets.len();
        self.emit(
            &live,
            &job_id,
            EventKind::JobStarted,
            "",
            "",
            &format!(
                "{} on {targets} host(s): {}; reason: {}{}",
                plan.procedure,
                named_hosts(&plan.targets),
                req.reason,
                if pins.is_empty() {
                    String::new()
                } else {
                    format!("; pinned {}", pins.join(", "))
                }
            ),
            0,
            u32::try_from(targets).unwrap_or(u32::MAX),
        );
        let drive = Drive {
            job_id: job_id.clone(),
            guard: plan_proto.guard.clone(),
            plan,
            reason: req.reason.clone(),
            tracks: hosts.into_iter().map(|h| (h.host_id.clone(), h)).collect(),
            inflight: HashMap::new(),
        };
        self.spawn_drive(drive, live, done);
        info!(job = %job_id, actor = %actor, "job started");
        Ok(StartRollbackResponse {
            job_id,
            plan: Some(plan_proto),
            approval: None,
            approval_reported: true,
        })
    }

    /// Registers a live job whose next event has `next_seq`, with its event pipeline.
    pub(super) fn new_live(&self, job_id: &str, next_seq: u64) -> Arc<LiveJob> {
        self.new_live_in(job_id, next_seq, JobState::Running)
    }

    /// Registers a live job in `state`, with its event pipeline.
    pub(super) fn new_live_in(&self, job_id: &str, next_seq: u64, state: JobState) -> Arc<LiveJob> {
        let (events, _) = broadcast::channel(4096);
        let (queue, queued) = mpsc::unbounded_channel();
        self.tasks.spawn(event_pipeline(
            self.store.clone(),
            self.cluster.clone(),
            job_id.to_string(),
            queued,
            events.clone(),
        ));
        let live = Arc::new(LiveJob {
            cancel: CancellationToken::new(),
            events,
            pipeline: std::sync::Mutex::new((next_seq, queue)),
            state: std::sync::Mutex::new(state.as_str().into()),
            stop: self.shutdown.child_token(),
            lease_lost: CancellationToken::new(),
            lease_until_ms: std::sync::atomic::AtomicI64::new(
                now_unix_ms().saturating_add(self.cluster.lease_ms()),
            ),
            output_bytes: std::sync::atomic::AtomicUsize::new(0),
        });
        self.live_jobs().insert(job_id.to_string(), live.clone());
        live
    }

    pub(super) fn spawn_drive(
        self: &Arc<Self>,
        drive: Drive,
        live: Arc<LiveJob>,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let this = self.clone();
        let span = info_span!("job", job = %drive.job_id, procedure = %drive.plan.procedure);
        self.tasks.spawn(
            async move {
                let id = drive.job_id.clone();
                this.drive(drive, &live).await;
                this.hub.forget_job(&id);
                this.live_jobs().remove(&id);
                // Ended (or stopping): the lease goes at once, so a peer or a resume need not
                // wait for it to lapse. A lease lost to a peer is not ours to give up, and a
                // job whose end could not be stored keeps it until it lapses (it is settled
                // at the next start, or by a peer; this process does not retry it in a loop).
                if !live.lease_lost.is_cancelled()
                    && !this.is_unsettled(&id)
                    && let Err(e) = this.store.release_job(&id, &this.cluster.me).await
                {
                    warn!(job = %id, error = %e, "store failed releasing the job's lease; it lapses by itself");
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            .instrument(span),
        );
    }

    /// Rebuilds a job's progress from the store: hosts with their completed phases, the runs
    /// still in flight, and (with `keep_failures`) failures whose host row was not yet saved.
    pub(super) async fn load_drive(
        &self,
        job_id: &str,
        keep_failures: bool,
    ) -> Result<(JobRow, Drive), Status> {
        let (row, hosts) = self
            .store
            .get_job(job_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no job {job_id}")))?;
        let plan_proto = PlanResponse::decode(row.plan.as_slice()).map_err(|e| {
            Status::internal(format!("job {job_id}: stored plan is unreadable: {e}"))
        })?;
        let plan = plan_from_proto(&plan_proto);
        let mut tracks: BTreeMap<String, JobHostRow> =
            hosts.into_iter().map(|h| (h.host_id.clone(), h)).collect();
        let runs = self.store.job_runs(job_id).await?;
        let inflight = rebuild_progress(&plan, &mut tracks, runs, keep_failures);
        let reason = row.reason.clone();
        Ok((
            row,
            Drive {
                job_id: job_id.to_string(),
                guard: plan_proto.guard.clone(),
                plan,
                reason,
                tracks,
                inflight,
            },
        ))
    }

    pub(super) async fn next_seq(&self, job_id: &str) -> Result<u64, Status> {
        // The last seq alone: a 10,000-host job has about 50,000 events to not read.
        Ok(self.store.last_job_seq(job_id).await?.map_or(1, |s| s + 1))
    }

    /// At start-up: every job a previous process left running is resumed from the store —
    /// those this coordinator's predecessor owned, or whose owner's lease has lapsed; a job a
    /// live peer drives stays with it.
    pub async fn resume_after_restart(self: &Arc<Self>) -> Result<(), Status> {
        for job_id in self.store.running_jobs().await? {
            match self
                .store
                .claim_job(
                    &job_id,
                    &self.cluster.me,
                    now_unix_ms(),
                    self.cluster.lease_ms(),
                )
                .await?
            {
                Claim::Claimed { previous }
                    if previous.is_empty() || previous == self.cluster.me.name =>
                {
                    self.resume_stored(&job_id, "coordinator restart", "the coordinator restarted")
                        .await?;
                }
                Claim::Claimed { previous } => self.take_over(&job_id, &previous).await,
                Claim::HeldBy { owner, .. } => {
                    info!(job = %job_id, owner = %owner, "job is driven by another coordinator");
                }
                Claim::Missing => {}
            }
        }
        Ok(())
    }

    /// Drives a running job again from what the store says (this process holds its lease):
    /// completed phases are not run again, runs in flight are re-attached. `why` goes in the
    /// audit record, `told` opens the job's event.
    pub(super) async fn resume_stored(
        self: &Arc<Self>,
        job_id: &str,
        why: &str,
        told: &str,
    ) -> Result<(), Status> {
        let job_id = job_id.to_string();
        let drive = match self.load_drive(&job_id, true).await {
            Ok((_, drive)) => drive,
            Err(e) => {
                // One unreadable job must not keep the coordinator (and every other
                // job) down: it ends `interrupted`, saying why, and can be looked at.
                warn!(job = %job_id, error = %e.message(), "cannot resume job; marking it interrupted");
                let why = format!("could not be resumed ({why}): {}", e.message());
                let audit = AuditEvent {
                    at_ms: now_unix_ms(),
                    actor: "coordinator".into(),
                    action: "rollback.interrupted".into(),
                    target: format!("job/{job_id}"),
                    detail: why.clone(),
                };
                if let Err(e) = self
                    .store
                    .update_job_state(
                        &job_id,
                        &self.cluster.me.instance,
                        JobState::Interrupted.as_str(),
                        Some(now_unix_ms()),
                        &why,
                        &audit,
                    )
                    .await
                {
                    error!(job = %job_id, error = %e, "store failed recording the interruption; the job stays running in the store until the next start");
                }
                return Ok(());
            }
        };
        // Audited before it drives again: a resume the trail does not show never happens.
        // Without its record the job is left as it is stored (running, not driven) for the
        // next start, once the store is fixed.
        if let Err(e) = self
            .store
            .append_audit(&AuditEvent {
                at_ms: now_unix_ms(),
                actor: format!("coordinator/{}", self.cluster.me.name),
                action: "rollback.resumed".into(),
                target: format!("job/{job_id}"),
                detail: format!("reason={why}"),
            })
            .await
        {
            error!(job = %job_id, error = %e, "not resuming the job: its audit record could not be written; it stays running in the store and is resumed at the next start");
            return Ok(());
        }
        let live = self.new_live(&job_id, self.next_seq(&job_id).await?);
        let done: Vec<String> = drive
            .plan
            .phases
            .iter()
            .filter(|p| {
                p.batches.iter().flatten().all(|h| {
                    drive
                        .tracks
                        .get(h)
                        .is_some_and(|t| t.done_phases.contains(&p.name))
                })
            })
            .map(|p| p.name.clone())
            .collect();
        let msg = format!(
            "{told}; resuming from the store: completed phases [{}] are not run again, {} run(s) in flight re-attached through the agents' journals",
            done.join(", "),
            drive.inflight.len()
        );
        self.emit(&live, &job_id, EventKind::JobResumed, "", "", &msg, 0, 0);
        info!(job = %job_id, inflight = drive.inflight.len(), why, "resuming a job from the store");
        self.spawn_drive(drive, live, None);
        Ok(())
    }

    /// `rollbackctl job resume`: continues a halted, cancelled, failed or interrupted job.
    /// Hosts that did not succeed are retried from the phase where each stopped, with the
    /// job's pinned targets; completed phases and a completed once-phase never run again.
    pub async fn resume(
        self: &Arc<Self>,
        principal: &Principal,
        job_id: &str,
        reason: &str,
    ) -> Result<ResumeJobResponse, Status> {
        if reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "--reason is required: say why the job is resumed (it goes in the audit trail)",
            ));
        }
        if self.driving_here(job_id) {
            return Err(Status::failed_precondition(format!(
                "job {job_id} is running; nothing to resume (`rollbackctl watch {job_id}` follows it)"
            )));
        }
        let (row, mut drive) = self.load_drive(job_id, false).await?;
        let state: JobState = row.state.parse().map_err(|e: String| Status::internal(e))?;
        if !state.resumable() {
            return Err(Status::failed_precondition(format!(
                "job {job_id} is {state}; only a halted, cancelled, failed or interrupted job can be resumed"
            )));
        }
        // A job withdrawn before its approval was never approved: resuming it would run it
        // without the second person.
        if let Some(a) = self
            .store
            .job_approval(job_id)
            .await?
            .filter(|a| a.decision != "approved")
        {
            return Err(Status::failed_precondition(format!(
                "job {job_id} needed approval ({}) and was {} before it ran; start the rollback again, which asks for approval",
                a.rule,
                if a.decision.is_empty() {
                    "not approved"
                } else {
                    &a.decision
                }
            )));
        }
        let retry: Vec<String> = drive
            .tracks
            .values()
            .filter(|t| parse_outcome(t) != Outcome::Succeeded)
            .map(|t| t.host_id.clone())
            .collect();
        if retry.is_empty() {
            return Err(Status::failed_precondition(format!(
                "every host of job {job_id} succeeded; nothing to resume"
            )));
        }
        let all: Vec<String> = drive.tracks.keys().cloned().collect();
        let mut reset = Vec::with_capacity(retry.len());
        for h in &retry {
            if let Some(t) = drive.tracks.get_mut(h) {
                t.outcome = outcome::PENDING.into();
                t.failed_step.clear();
                t.exit_code = 0;
                t.detail = format!("retried by job resume: {reason}");
                reset.push(t.clone());
            }
        }
        // Leases, host resets, the state and the audit record in one transaction: all or
        // nothing (a resume the trail does not show never happens).
        let audit = AuditEvent {
            at_ms: now_unix_ms(),
            actor: principal.identity.to_string(),
            action: "rollback.resume".into(),
            target: format!("job/{job_id}"),
            detail: format!("was={state} hosts={} reason={reason}", retry.join(",")),
        };
        self.claim(job_id).await?;
        self.store
            .reopen_job(job_id, &all, &reset, &audit)
            .await
            .map_err(|e| match e {
                StoreError::Leased { holders } => leased_status(&holders),
                other => other.into(),
            })?;
        let seq = self.next_seq(job_id).await?;
        let live = self.new_live(job_id, seq);
        self.emit(
            &live,
            job_id,
            EventKind::JobResumed,
            "",
            "",
            &format!(
                "resumed by {} (was {state}): retrying {} from where each stopped; reason: {reason}",
                principal.identity,
                named_hosts(&retry)
            ),
            0,
            u32::try_from(retry.len()).unwrap_or(u32::MAX),
        );
        drive.reason = reason.to_string();
        self.spawn_drive(drive, live, None);
        Ok(ResumeJobResponse {
            job_id: job_id.to_string(),
            resumed_at_seq: seq,
            hosts: retry,
        })
    }

    /// Stops dispatch and cancels running steps of a live job.
    pub async fn cancel(
        &self,
        principal: &Principal,
        job_id: &str,
        reason: &str,
    ) -> Result<String, Status> {
        // A request still waiting for approval is withdrawn: nothing of it ever ran.
        if self
            .end_unapproved(job_id, "cancelled", &principal.identity.to_string(), reason)
            .await?
        {
            return Ok(JobState::Cancelled.as_str().into());
        }
        let Some(live) = self.live_job(job_id).filter(|_| self.driving_here(job_id)) else {
            let job = self
                .store
                .job_row(job_id)
                .await?
                .ok_or_else(|| Status::not_found(format!("no job {job_id}")))?;
            if job.state == JobState::Running.as_str() && self.cluster.shared() {
                // Another coordinator drives it: recorded here, carried out by its owner.
                let who = principal.identity.to_string();
                self.store
                    .append_audit(&AuditEvent {
                        at_ms: now_unix_ms(),
                        actor: who.clone(),
                        action: "rollback.cancel".into(),
                        target: format!("job/{job_id}"),
                        detail: format!("reason={reason}"),
                    })
                    .await?;
                self.cluster
                    .cancel_job_elsewhere(job_id, &who, reason)
                    .await;
                return Ok("cancelling".into());
            }
            return Err(Status::failed_precondition(format!(
                "job {job_id} is already {}; nothing to cancel",
                job.state
            )));
        };
        self.store
            .append_audit(&AuditEvent {
                at_ms: now_unix_ms(),
                actor: principal.identity.to_string(),
                action: "rollback.cancel".into(),
                target: format!("job/{job_id}"),
                detail: format!("reason={reason}"),
            })
            .await?;
        let who = principal.identity.to_string();
        self.emit(
            &live,
            job_id,
            EventKind::JobCancelling,
            "",
            "",
            &format!("cancelled by {who}: {reason}"),
            0,
            0,
        );
        live.cancel.cancel();
        Ok("cancelling".into())
    }

    /// Queues a job event; the pipeline stores it, then broadcasts it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn emit(
        &self,
        live: &LiveJob,
        job_id: &str,
        kind: EventKind,
        host: &str,
        phase: &str,
        message: &str,
        done: u32,
        total: u32,
    ) {
        let job_state = live
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut pipeline = live
            .pipeline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let event = JobEvent {
            seq: pipeline.0,
            at_unix_ms: now_unix_ms(),
            kind: kind.as_str().to_string(),
            host_id: host.to_string(),
            phase: phase.to_string(),
            message: message.to_string(),
            job_state,
            done,
            total,
        };
        pipeline.0 += 1;
        match kind {
            EventKind::JobStarted => crate::metrics::job_started(),
            EventKind::JobFinished => crate::metrics::job_finished(&event.job_state),
            _ => {}
        }
        self.notifier.notify(job_id, kind, &event);
        if pipeline.1.send(event).is_err() {
            warn!(job = %job_id, kind = kind.as_str(), "job event pipeline is gone; event dropped");
        }
    }

    /// Stores host rows of one job in one write (a batch of 10,000 hosts is one commit, not
    /// 10,000).
    async fn save_hosts(&self, job_id: &str, rows: &[JobHostRow]) {
        if rows.is_empty() {
            return;
        }
        if let Err(e) = self
            .store
            .update_job_hosts(rows, &self.cluster.me.instance)
            .await
        {
            if matches!(e, StoreError::NotOwner { .. }) {
                return self.lease_lost(job_id);
            }
            warn!(job = %job_id, hosts = rows.len(), error = %e, "store failed recording host progress");
        }
    }

    async fn drive(self: &Arc<Self>, mut d: Drive, live: &LiveJob) {
        let job_id = d.job_id.clone();
        let mut failures = d
            .tracks
            .values()
            .filter(|t| parse_outcome(t).is_failure())
            .count();
        let mut halt: Option<String> = None;
        let plan = d.plan.clone();
        let canary_batches = plan.phases.first().is_some_and(|p| p.batches.len() > 1);

        let guard = d.guard.clone();
        'phases: for (index, phase) in plan.phases.iter().enumerate() {
            let (batches, mut done, total) = match phase_work(phase, canary_batches, &d.tracks) {
                PhaseWork::Nothing => continue,
                PhaseWork::Blocked(reason) => {
                    halt = Some(reason);
                    break 'phases;
                }
                PhaseWork::Run {
                    batches,
                    done,
                    total,
                } => (batches, done, total),
            };
            // A guard judges what is stored, then waits for the round's time; its round
            // carries each host's log offset.
            let round;
            let phase = match &guard {
                None => phase,
                Some(spec) => match self.guard_round(&d, spec, index, phase, live).await {
                    super::guard::Round::Go(p) => {
                        round = p;
                        &round
                    }
                    super::guard::Round::Breach(reason) => {
                        halt = Some(reason);
                        break 'phases;
                    }
                    super::guard::Round::Stop => break 'phases,
                },
            };
            self.emit(
                live,
                &job_id,
                EventKind::PhaseStarted,
                "",
                &phase.name,
                &phase_summary(phase),
                done,
                total,
            );
            for (label, runnable) in batches {
                if live.cancel.is_cancelled() {
                    break 'phases;
                }
                self.emit(
                    live,
                    &job_id,
                    EventKind::BatchStarted,
                    "",
                    &phase.name,
                    &format!("{label}: {}", named_hosts(&runnable)),
                    done,
                    total,
                );
                let runs = runnable.iter().map(|h| {
                    let existing = d.inflight.remove(&(phase.name.clone(), h.clone()));
                    self.run_on(&job_id, phase, h, live, &d.reason, existing)
                });
                let results = futures::future::join_all(runs).await;
                let mut stopping = false;
                // The batch's host rows are stored in one write, then their events go out.
                let mut saved: Vec<JobHostRow> = Vec::new();
                let mut told: Vec<(EventKind, &str, String, u32)> = Vec::new();
                for (host, end) in runnable.iter().zip(results) {
                    let Some(track) = d.tracks.get_mut(host) else {
                        continue;
                    };
                    match end {
                        RunEnd::Stopping => stopping = true,
                        RunEnd::Done { duration_ms, note } => {
                            done += 1;
                            track.phase = phase.name.clone();
                            track.duration_ms += i64::try_from(duration_ms).unwrap_or(i64::MAX);
                            track.done_phases.push(phase.name.clone());
                            if !note.is_empty() {
                                track.detail = note.clone();
                            }
                            saved.push(track.clone());
                            told.push((
                                EventKind::HostPhaseDone,
                                host,
                                if note.is_empty() {
                                    format!("{host} finished phase {}", phase.name)
                                } else {
                                    format!("{host} finished phase {} ({note})", phase.name)
                                },
                                done,
                            ));
                        }
                        RunEnd::Failed(f) => {
                            done += 1;
                            if f.outcome.is_failure() {
                                failures += 1;
                            }
                            apply_failure(track, &phase.name, &f);
                            saved.push(track.clone());
                            told.push((
                                EventKind::HostFinished,
                                host,
                                format!(
                                    "{host} {}: {} at {} (exit {}): {}",
                                    f.outcome, phase.name, f.step, f.exit_code, f.detail
                                ),
                                done,
                            ));
                            if phase.scope == Scope::Once && f.outcome != Outcome::Cancelled {
                                halt = Some(format!(
                                    "phase `{}` (once, on {host}) failed: {}",
                                    phase.name, f.detail
                                ));
                            }
                        }
                    }
                }
                self.save_hosts(&job_id, &saved).await;
                for (kind, host, message, done) in told {
                    self.emit(
                        live,
                        &job_id,
                        kind,
                        host,
                        &phase.name,
                        &message,
                        done,
                        total,
                    );
                }
                if stopping {
                    info!(job = %job_id, "coordinator shutting down; the job stays running and is resumed at the next start");
                    return;
                }
                if halt.is_some() {
                    break 'phases;
                }
                if failures >= plan.max_failures {
                    halt = Some(format!(
                        "{failures} host(s) failed, reaching the threshold of {} (--max-failures)",
                        plan.max_failures
                    ));
                    break 'phases;
                }
            }
            self.emit(
                live,
                &job_id,
                EventKind::PhaseFinished,
                "",
                &phase.name,
                &format!("phase {} done", phase.name),
                done,
                total,
            );
        }
        if live.stop.is_cancelled() {
            return;
        }
        // After a guard's last round: judged once more (healthy, or a breach at the end).
        if let Some(spec) = &guard
            && let Some(last) = plan.phases.last()
            && halt.is_none()
            && !live.cancel.is_cancelled()
            && let super::guard::Round::Breach(reason) = self
                .guard_round(&d, spec, plan.phases.len(), last, live)
                .await
        {
            halt = Some(reason);
        }
        if live.stop.is_cancelled() {
            return;
        }
        self.finish(&mut d, live, halt).await;
    }

    /// Settles the job, stores its end (releasing its leases) and tells watchers.
    async fn finish(&self, d: &mut Drive, live: &LiveJob, halt: Option<String>) {
        let job_id = d.job_id.clone();
        let all_phases: Vec<String> = d.plan.phases.iter().map(|p| p.name.clone()).collect();
        let mut own = own_phases(&d.plan);
        let so_far: Vec<HostSoFar> = d
            .tracks
            .values()
            .map(|t| HostSoFar {
                host_id: t.host_id.clone(),
                outcome: parse_outcome(t),
                own_phases: own.remove(t.host_id.as_str()).unwrap_or_default(),
                done_phases: t.done_phases.clone(),
            })
            .collect();
        let stop = Stop {
            cancelled: live.cancel.is_cancelled(),
            halt: halt.clone(),
        };
        let (settled, final_state) = settle(&so_far, &all_phases, &stop);
        for s in &settled {
            if let Some(t) = d.tracks.get_mut(&s.host_id) {
                t.outcome = s.outcome.as_str().into();
                if s.outcome != Outcome::Succeeded || t.detail.is_empty() {
                    t.detail = s.detail.clone();
                }
                let msg = format!("{} {}: {}", t.host_id, s.outcome, t.detail);
                self.emit(
                    live,
                    &job_id,
                    EventKind::HostFinished,
                    &s.host_id,
                    "",
                    &msg,
                    0,
                    0,
                );
            }
        }
        let rows: Vec<JobHostRow> = settled
            .iter()
            .filter_map(|s| d.tracks.get(&s.host_id).cloned())
            .collect();
        self.save_hosts(&job_id, &rows).await;
        *live
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = final_state.as_str().into();
        let halt_text = halt.clone().unwrap_or_default();
        let succeeded = d
            .tracks
            .values()
            .filter(|t| t.outcome == outcome::SUCCEEDED)
            .count();
        let summary = format!(
            "{final_state}: {succeeded} of {} host(s) succeeded",
            d.tracks.len()
        );
        // The end and its audit record are one transaction. Without it the job has not ended:
        // it stays running in the store (leases held) and is settled again at the next start.
        let audit = AuditEvent {
            at_ms: now_unix_ms(),
            actor: "coordinator".into(),
            action: "rollback.finished".into(),
            target: format!("job/{job_id}"),
            detail: if halt_text.is_empty() {
                summary.clone()
            } else {
                format!("{summary}; halted: {halt_text}")
            },
        };
        if let Err(e) = self
            .store
            .update_job_state(
                &job_id,
                &self.cluster.me.instance,
                final_state.as_str(),
                Some(now_unix_ms()),
                &halt_text,
                &audit,
            )
            .await
        {
            // Another coordinator drives the job now: its end is that one's to store.
            if matches!(e, StoreError::NotOwner { .. }) {
                return self.lease_lost(&job_id);
            }
            error!(job = %job_id, state = %final_state, error = %e, "store failed recording the job's end with its audit record; the job stays running in the store and is settled again at the next start (or by another coordinator once this one's lease lapses)");
            self.unsettled_jobs().insert(job_id.clone());
            return;
        }
        if let Some(h) = &halt {
            self.emit(live, &job_id, EventKind::JobHalted, "", "", h, 0, 0);
        }
        self.emit(
            live,
            &job_id,
            EventKind::JobFinished,
            "",
            "",
            &summary,
            0,
            0,
        );
        info!(job = %job_id, state = %final_state, "rollback job finished");
    }

    /// Waits until `host` has a session, for at most `unreachable_after`.
    async fn session_for(&self, host: &str, live: &LiveJob) -> Result<(), RunEnd> {
        let started = Instant::now();
        loop {
            if self.cluster.online(host).await {
                return Ok(());
            }
            if started.elapsed() >= self.unreachable_after {
                return Err(RunEnd::Failed(HostFailure {
                    outcome: Outcome::Unreachable,
                    step: String::new(),
                    exit_code: -1,
                    detail: format!(
                        "agent {host} was not connected within {:?}",
                        self.unreachable_after
                    ),
                }));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = live.cancel.cancelled() => return Err(RunEnd::Failed(HostFailure {
                    outcome: Outcome::Cancelled,
                    step: String::new(),
                    exit_code: -1,
                    detail: "cancelled before it was dispatched".into(),
                })),
                () = live.stop.cancelled() => return Err(RunEnd::Stopping),
            }
        }
    }

    /// Runs one phase's steps on one host, or re-attaches `existing` (a run dispatched before
    /// a restart): its stored result, or the agent's journal, decides; it is never run twice.
    async fn run_on(
        &self,
        job_id: &str,
        phase: &PlannedPhase,
        host: &str,
        live: &LiveJob,
        reason: &str,
        existing: Option<RunRow>,
    ) -> RunEnd {
        let first_step = phase
            .steps_for(host)
            .first()
            .map(|s| s.action.clone())
            .unwrap_or_default();
        let with_step = |mut end: RunEnd| {
            if let RunEnd::Failed(f) = &mut end
                && f.step.is_empty()
            {
                f.step.clone_from(&first_step);
            }
            end
        };
        // A re-attached run that certainly did not run is dispatched afresh.
        if let Some(row) = existing
            && let Some(end) = self.reattach(job_id, phase, host, live, row).await
        {
            return with_step(end);
        }
        if let Err(end) = self.session_for(host, live).await {
            return with_step(end);
        }
        // Nothing new is dispatched on a lease about to lapse: a peer may be taking it over.
        if !self.lease_holds(job_id, live) {
            return RunEnd::Stopping;
        }
        let steps: Vec<rollback_common::proto::Step> = phase
            .steps_for(host)
            .iter()
            .map(super::planning::step_proto)
            .collect();
        let now = now_unix_ms();
        let procedure = RunProcedure {
            run_id: new_id(),
            job_id: job_id.to_string(),
            deadline_unix_ms: dispatch::deadline_ms(now, &steps, self.unreachable_after),
            steps,
        };
        let row = RunRow {
            run_id: procedure.run_id.clone(),
            job_id: job_id.to_string(),
            host_id: host.to_string(),
            requested_by: String::new(),
            reason: reason.to_string(),
            procedure: procedure.encode_to_vec(),
            status: 0,
            created_at_ms: now,
            finished_at_ms: None,
            result: None,
            phase: phase.name.clone(),
        };
        let (tx, rx) = mpsc::channel(256);
        let sent = dispatch::dispatch(
            &*self.store,
            &self.cluster,
            &self.hub,
            Dispatch {
                host,
                job_id,
                procedure: procedure.clone(),
                record: Some(row),
                watcher: tx,
                seen_online: true,
            },
        )
        .await;
        if let Err(e) = sent {
            if matches!(e, DispatchError::Store(StoreError::NotOwner { .. })) {
                // Another coordinator drives the job now; the run was not stored or sent.
                self.lease_lost(job_id);
                return with_step(RunEnd::Stopping);
            }
            let outcome = match e {
                DispatchError::Store(_) => Outcome::Failed,
                _ => Outcome::Unreachable,
            };
            return with_step(RunEnd::Failed(HostFailure {
                outcome,
                step: first_step.clone(),
                exit_code: -1,
                detail: e.to_string(),
            }));
        }
        self.emit_dispatched(live, job_id, phase, host, &host_steps_text(phase, host));
        with_step(
            match self.follow(job_id, phase, host, live, &procedure, rx).await {
                Ok(result) => self.end_of(result),
                Err(end) => end,
            },
        )
    }

    /// Re-attaches a run stored without a result. `None` when it is certain nothing ran (the
    /// phase may be dispatched afresh).
    async fn reattach(
        &self,
        job_id: &str,
        phase: &PlannedPhase,
        host: &str,
        live: &LiveJob,
        row: RunRow,
    ) -> Option<RunEnd> {
        let procedure = match dispatch::stored_procedure(&row) {
            Ok(p) => p,
            Err(e) => {
                return Some(RunEnd::Failed(HostFailure {
                    outcome: Outcome::Failed,
                    step: String::new(),
                    exit_code: -1,
                    detail: format!("cannot re-attach run {}: {e}", row.run_id),
                }));
            }
        };
        let (tx, rx) = mpsc::channel(256);
        // Registered first, so a result arriving from here on reaches us or the store.
        self.hub.watch(&row.run_id, host, tx);
        self.hub.dispatched(&row.run_id, job_id);
        if let Ok(Some(stored)) = self.store.get_run(&row.run_id).await
            && let Some(bytes) = stored.result
            && let Ok(result) = RunFinished::decode(bytes.as_slice())
        {
            self.hub.close(host, &row.run_id);
            self.hub.resolved(&row.run_id);
            if nothing_ran(&result) {
                return None;
            }
            return Some(self.end_of(result));
        }
        self.emit_dispatched(
            live,
            job_id,
            phase,
            host,
            &format!(
                "re-attached run {} ({}) dispatched before the restart; the agent's journal returns its result or runs it once",
                row.run_id,
                host_steps_text(phase, host)
            ),
        );
        // If the host is connected, ask again now; otherwise its reconnect re-sends it.
        let _ = self.cluster.send_run(host, &procedure).await;
        match self.follow(job_id, phase, host, live, &procedure, rx).await {
            // Never received before its deadline: it did not run, and never will.
            Ok(result) if nothing_ran(&result) => None,
            Ok(result) => Some(self.end_of(result)),
            Err(end) => Some(end),
        }
    }

    /// Follows a dispatched run to its end: step events become job events, a cancel is passed
    /// on, a busy host is waited for (and the same run sent again: nothing was journaled), a
    /// dropped session waits for the journaled result.
    async fn follow(
        &self,
        job_id: &str,
        phase: &PlannedPhase,
        host: &str,
        live: &LiveJob,
        procedure: &RunProcedure,
        mut rx: mpsc::Receiver<crate::runs::Watched>,
    ) -> Result<RunFinished, RunEnd> {
        let run_id = procedure.run_id.clone();
        let mut cancel_sent = false;
        let mut busy_since: Option<Instant> = None;
        // The output of the step running now, on its way into `step.output` events.
        let mut out: Option<StepOutput> = None;
        // Waited on once per run, not once per event: every host's run waits on the same two
        // tokens, and a wait registered anew for each event contends on them.
        let cancelled = live.cancel.cancelled();
        let stopped = live.stop.cancelled();
        tokio::pin!(cancelled, stopped);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev.map(|w| w.map(|ev| *ev)) {
                    Some(Ok(ExecEvent { kind: Some(exec_event::Kind::Finished(result)) })) => {
                        if result.status == StepStatus::Busy as i32 && !live.cancel.is_cancelled() {
                            let since = *busy_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > BUSY_WAIT {
                                self.hub.resolved(&run_id);
                                return Err(RunEnd::Failed(HostFailure {
                                    outcome: Outcome::Failed,
                                    step: String::new(),
                                    exit_code: -1,
                                    detail: format!("agent {host} stayed busy with another run for {BUSY_WAIT:?}"),
                                }));
                            }
                            if since.elapsed() < Duration::from_millis(1500) {
                                let why = result.steps.first().map(|s| s.error.clone()).unwrap_or_default();
                                self.emit(live, job_id, EventKind::HostWaiting, host, &phase.name, &format!("{host} is busy ({why}); waiting — busy is not a failure"), 0, 0);
                            }
                            // The watcher is dropped with the result: register again, then resend.
                            let (tx, new_rx) = mpsc::channel(256);
                            rx = new_rx;
                            self.hub.watch(&run_id, host, tx);
                            self.hub.dispatched(&run_id, job_id);
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                                () = live.stop.cancelled() => return Err(RunEnd::Stopping),
                            }
                            let _ = self.cluster.send_run(host, procedure).await;
                            continue;
                        }
                        return Ok(result);
                    }
                    Some(Ok(ExecEvent { kind: Some(exec_event::Kind::StepEvent(se)) })) => {
                        let action = |i: u32| {
                            procedure
                                .steps
                                .get(usize::try_from(i).unwrap_or(usize::MAX))
                                .map_or("step", |s| s.action.as_str())
                        };
                        match se.kind {
                            Some(step_event::Kind::Started(_)) => {
                                out = Some(StepOutput::new(se.step_index, action(se.step_index)));
                                let msg = format!("{host} {} started", action(se.step_index));
                                self.emit(live, job_id, EventKind::StepStarted, host, &phase.name, &msg, 0, 0);
                            }
                            Some(step_event::Kind::Output(chunk)) => {
                                let step = match &mut out {
                                    Some(o) if o.index == se.step_index => o,
                                    _ => out.insert(StepOutput::new(se.step_index, action(se.step_index))),
                                };
                                for msg in step.chunk(chunk.seq, &chunk.data, &live.output_bytes) {
                                    self.emit(live, job_id, EventKind::StepOutput, host, &phase.name, &msg, 0, 0);
                                }
                            }
                            Some(step_event::Kind::Finished(f)) => {
                                if let Some(mut step) = out.take().filter(|o| o.index == se.step_index) {
                                    for msg in step.finish(&f.output_tail, &live.output_bytes) {
                                        self.emit(live, job_id, EventKind::StepOutput, host, &phase.name, &msg, 0, 0);
                                    }
                                }
                                let msg = format!(
                                    "{host} {} {} (exit {}) in {:.1}s",
                                    f.action,
                                    step_status_name(f.status),
                                    f.exit_code,
                                    f.duration_ms as f64 / 1000.0
                                );
                                self.emit(live, job_id, EventKind::StepFinished, host, &phase.name, &msg, 0, 0);
                            }
                            None => {}
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return self.await_result_after_drop(host, &run_id, live).await,
                },
                () = &mut cancelled, if !cancel_sent => {
                    cancel_sent = true;
                    self.send_cancel(host, &run_id, "job cancelled").await;
                }
                () = &mut stopped => return Err(RunEnd::Stopping),
            }
        }
    }

    fn emit_dispatched(
        &self,
        live: &LiveJob,
        job_id: &str,
        phase: &PlannedPhase,
        host: &str,
        what: &str,
    ) {
        self.emit(
            live,
            job_id,
            EventKind::HostDispatched,
            host,
            &phase.name,
            &format!("{host}: {what}"),
            0,
            0,
        );
    }

    async fn send_cancel(&self, host: &str, run_id: &str, reason: &str) {
        self.cluster.cancel_run(host, run_id, reason).await;
    }

    /// The host's session dropped mid-run: its result arrives (from its journal) when it
    /// reconnects; wait for it in the store until the unreachable deadline. Given up, the run
    /// is cancelled on the agent (and its deadline keeps it from ever starting late).
    async fn await_result_after_drop(
        &self,
        host: &str,
        run_id: &str,
        live: &LiveJob,
    ) -> Result<RunFinished, RunEnd> {
        let started = Instant::now();
        while started.elapsed() < self.unreachable_after {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = live.stop.cancelled() => return Err(RunEnd::Stopping),
                () = live.cancel.cancelled() => {
                    self.send_cancel(host, run_id, "job cancelled").await;
                }
            }
            if let Ok(Some(row)) = self.store.get_run(run_id).await
                && let Some(bytes) = row.result
                && let Ok(result) = RunFinished::decode(bytes.as_slice())
            {
                return Ok(result);
            }
        }
        self.hub.resolved(run_id);
        self.send_cancel(host, run_id, "given up as unreachable")
            .await;
        Err(RunEnd::Failed(HostFailure {
            outcome: Outcome::Unreachable,
            step: String::new(),
            exit_code: -1,
            detail: format!(
                "agent {host} was lost during the run and did not report back within {:?}",
                self.unreachable_after
            ),
        }))
    }

    fn end_of(&self, result: RunFinished) -> RunEnd {
        let note = already_note(&result);
        match failure_of(result) {
            Ok(duration_ms) => RunEnd::Done { duration_ms, note },
            Err(f) => RunEnd::Failed(f),
        }
    }
}

/// What the store says about a job's progress, from its host rows and its runs (oldest
/// first): the latest run of each (phase, host) decides. A succeeded run marks the phase done
/// even if the crash came before the host row said so; a run without a result is in flight
/// and is returned to be re-attached (never dispatched again); with `keep_failures`, a failed
/// run fails a host whose row was not saved yet. Pure, so it is tested without a fleet.
pub(super) fn rebuild_progress(
    plan: &Plan,
    tracks: &mut BTreeMap<String, JobHostRow>,
    runs: Vec<RunRow>,
    keep_failures: bool,
) -> HashMap<(String, String), RunRow> {
    let mut inflight = HashMap::new();
    let mut latest: HashMap<(String, String), RunRow> = HashMap::new();
    for run in runs {
        latest.insert((run.phase.clone(), run.host_id.clone()), run);
    }
    for ((phase, host), run) in latest {
        let Some(track) = tracks.get_mut(&host) else {
            continue;
        };
        match run.result.as_deref().map(RunFinished::decode) {
            None => {
                inflight.insert((phase, host), run);
            }
            Some(Ok(result)) if result.status == StepStatus::Succeeded as i32 => {
                if !track.done_phases.contains(&phase) {
                    track.done_phases.push(phase);
                }
            }
            Some(Ok(result)) => {
                if keep_failures
                    && parse_outcome(track) == Outcome::Pending
                    && !nothing_ran(&result)
                    && let Err(f) = failure_of(result)
                {
                    apply_failure(track, &phase, &f);
                }
            }
            Some(Err(e)) => {
                warn!(run = %run.run_id, error = %e, "stored run result is unreadable");
            }
        }
    }
    // Keep the plan's phase order in done_phases.
    for t in tracks.values_mut() {
        t.done_phases
            .sort_by_key(|p| plan.phases.iter().position(|ph| &ph.name == p));
    }
    inflight
}

/// A run's duration when it succeeded, else how the host failed.
fn failure_of(result: RunFinished) -> Result<u64, HostFailure> {
    let duration: u64 = result.steps.iter().map(|s| s.duration_ms).sum();
    if result.status == StepStatus::Succeeded as i32 {
        return Ok(duration);
    }
    let failed = result
        .steps
        .iter()
        .find(|s| s.status != StepStatus::Succeeded as i32)
        .cloned()
        .unwrap_or_default();
    let o = match StepStatus::try_from(failed.status) {
        Ok(StepStatus::TimedOut) => Outcome::TimedOut,
        Ok(StepStatus::Cancelled) => Outcome::Cancelled,
        Ok(StepStatus::Interrupted) => Outcome::Interrupted,
        _ => Outcome::Failed,
    };
    Err(HostFailure {
        outcome: o,
        step: failed.action.clone(),
        exit_code: failed.exit_code,
        detail: if failed.error.is_empty() {
            step_status_name(failed.status).to_string()
        } else {
            failed.error
        },
    })
}

fn apply_failure(track: &mut JobHostRow, phase: &str, f: &HostFailure) {
    track.phase = phase.to_string();
    track.outcome = f.outcome.as_str().into();
    track.failed_step.clone_from(&f.step);
    track.exit_code = f.exit_code;
    track.detail.clone_from(&f.detail);
}

/// Stores a job's events in batches (one commit for everything queued), then broadcasts them
/// in order: a watcher never sees an event the store does not have. Ends when the job's
/// `LiveJob` is gone and every queued event is stored.
async fn event_pipeline(
    store: Arc<dyn crate::store::Store>,
    cluster: Arc<crate::cluster::Cluster>,
    job_id: String,
    mut queued: mpsc::UnboundedReceiver<JobEvent>,
    events: broadcast::Sender<JobEvent>,
) {
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match queued.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let rows = batch
            .iter()
            .map(|e| EventRow {
                seq: e.seq,
                at_ms: e.at_unix_ms,
                host_id: e.host_id.clone(),
                event: e.encode_to_vec(),
            })
            .collect();
        match store
            .append_job_events(&job_id, &cluster.me.instance, rows)
            .await
        {
            Ok(()) => {}
            // Another coordinator drives the job now: these events are not the job's (they
            // are not stored, so no watcher sees them), and the job stops here.
            Err(StoreError::NotOwner { .. }) => {
                cluster.job_lost(&job_id);
                continue;
            }
            Err(e) => warn!(job = %job_id, error = %e, "store failed recording job events"),
        }
        for ev in batch {
            let _ = events.send(ev);
        }
        // Watches following the store (on any coordinator) read them now.
        cluster.events_stored(&job_id).await;
    }
}

/// Hosts an event's message names at most; the rest are counted.
const NAMED_HOSTS: usize = 20;

/// Hosts for an event's message: all of a small job's, the first `NAMED_HOSTS` and a count of
/// the others for a large one. An event is stored, sent to every watcher and webhook and shown
/// as one line: 10,000 names were a 110 KB line. `job show` lists every host.
pub(super) fn named_hosts(hosts: &[String]) -> String {
    if hosts.len() <= NAMED_HOSTS {
        return hosts.join(", ");
    }
    format!(
        "{} and {} more",
        hosts[..NAMED_HOSTS].join(", "),
        hosts.len() - NAMED_HOSTS
    )
}

fn host_steps_text(phase: &PlannedPhase, host: &str) -> String {
    phase
        .steps_for(host)
        .iter()
        .map(|s| s.action.as_str())
        .collect::<Vec<_>>()
        .join(" → ")
}

fn steps_text(phase: &PlannedPhase) -> String {
    if phase.steps.is_empty() && !phase.host_steps.is_empty() {
        let per_host: Vec<String> = phase
            .host_steps
            .keys()
            .map(|h| format!("{h}: {}", host_steps_text(phase, h)))
            .collect();
        return format!("per host — {}", per_host.join("; "));
    }
    phase
        .steps
        .iter()
        .map(|s| s.action.as_str())
        .collect::<Vec<_>>()
        .join(" → ")
}

fn phase_summary(phase: &PlannedPhase) -> String {
    let scope = match phase.scope {
        Scope::Each => "each",
        Scope::Once => "once",
    };
    format!("phase {} ({scope}): {}", phase.name, steps_text(phase))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollback_common::proto::StepFinished;

    #[test]
    fn an_event_names_twenty_hosts_and_counts_the_rest() {
        let hosts = |n: usize| (1..=n).map(|i| format!("h{i}")).collect::<Vec<_>>();
        assert_eq!(named_hosts(&hosts(3)), "h1, h2, h3");
        assert_eq!(named_hosts(&hosts(20)), hosts(20).join(", "));
        let many = named_hosts(&hosts(10_000));
        assert_eq!(many, format!("{} and 9980 more", hosts(20).join(", ")));
        assert!(!many.contains("h21"), "{many}");
        assert_eq!(named_hosts(&[]), "");
    }

    fn step(status: StepStatus, error: &str, ms: u64) -> StepFinished {
        StepFinished {
            status: status as i32,
            error: error.into(),
            duration_ms: ms,
            ..Default::default()
        }
    }

    #[test]
    fn nothing_ran_only_when_no_step_started() {
        let refused = RunFinished {
            steps: vec![
                step(StepStatus::Refused, "x", 0),
                step(StepStatus::Skipped, "", 0),
            ],
            ..Default::default()
        };
        assert!(nothing_ran(&refused));
        let late = RunFinished {
            steps: vec![step(
                StepStatus::TimedOut,
                "deadline passed 5 ms ago; nothing was run",
                0,
            )],
            ..Default::default()
        };
        assert!(nothing_ran(&late));
        let ran = RunFinished {
            steps: vec![
                step(StepStatus::Succeeded, "", 10),
                step(StepStatus::Failed, "boom", 3),
            ],
            ..Default::default()
        };
        assert!(!nothing_ran(&ran));
        let cut = RunFinished {
            steps: vec![step(StepStatus::Interrupted, "agent restarted", 0)],
            ..Default::default()
        };
        assert!(
            !nothing_ran(&cut),
            "an interrupted step may have changed the host"
        );
    }

    #[test]
    fn the_stored_plan_comes_back_as_planned() {
        let plan = rollback_common::runbook::plan(
            &rollback_common::runbook::Runbook::seed(),
            "database",
            &BTreeMap::new(),
            &["app1".into(), "app2".into(), "app3".into()],
            &["app1".into()],
            &rollback_common::runbook::Strategy::default(),
        )
        .expect("plan");
        let proto = super::super::planning::to_proto(
            &plan,
            &rollback_common::runbook::Strategy::default(),
            "",
        );
        assert_eq!(plan_from_proto(&proto), plan);
    }
}
