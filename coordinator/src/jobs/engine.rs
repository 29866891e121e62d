//! Running a job: dispatch, barriers, batches, threshold, cancel, outcomes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use rollback_common::now_unix_ms;
use rollback_common::proto::{
    Cancel, CoordinatorMessage, ExecEvent, JobEvent, RollbackRequest, RunFinished, RunProcedure,
    StartRollbackResponse, StepStatus, coordinator_message, exec_event, step_event,
    step_status_name,
};
use rollback_common::runbook::{Plan, PlannedPhase, Scope};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{Instrument, info, info_span, warn};

use super::{Jobs, LiveJob, outcome, state};
use crate::authz::Principal;
use crate::exec::new_id;
use crate::store::{AuditEvent, JobHostRow, JobRow, RunRow};

/// How a host's run in one phase ended, when it did not succeed.
#[derive(Debug, Clone)]
struct HostFailure {
    outcome: &'static str,
    step: String,
    exit_code: i32,
    detail: String,
}

/// What the job tracks per host while it runs.
#[derive(Debug, Clone)]
struct HostTrack {
    row: JobHostRow,
    /// Phases this host completed.
    done_phases: Vec<String>,
}

impl Jobs {
    /// Persists and starts a job; returns once it is durable.
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
        let (plan, plan_proto) = self.plan(principal, &req).await?;
        self.backup_gate(&plan).await?;
        self.launch(principal, req, plan, plan_proto, None).await
    }

    /// Persists a planned job and starts it; `done` is told when it ends.
    pub(super) async fn launch(
        self: &Arc<Self>,
        principal: &Principal,
        req: RollbackRequest,
        plan: Plan,
        plan_proto: rollback_common::proto::PlanResponse,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<StartRollbackResponse, Status> {
        let job_id = new_id();
        let now = now_unix_ms();
        let actor = principal.identity.to_string();
        let mut hosts: Vec<JobHostRow> = plan
            .targets
            .iter()
            .enumerate()
            .map(|(i, h)| host_row(&job_id, h, i, false))
            .collect();
        if let Some(once) = plan
            .once_host
            .as_ref()
            .filter(|h| !plan.targets.contains(h))
        {
            hosts.push(host_row(&job_id, once, hosts.len(), true));
        }
        let job = JobRow {
            job_id: job_id.clone(),
            procedure: plan.procedure.clone(),
            request: req.encode_to_vec(),
            plan: plan_proto.encode_to_vec(),
            state: state::RUNNING.into(),
            reason: req.reason.clone(),
            requested_by: actor.clone(),
            created_at_ms: now,
            finished_at_ms: None,
            halt_reason: String::new(),
        };
        self.store.create_job(&job, &hosts).await?;
        self.store
            .append_audit(&AuditEvent {
                at_ms: now,
                actor: actor.clone(),
                action: "rollback.started".into(),
                target: format!("job/{job_id}"),
                detail: format!(
                    "procedure={} select={} hosts={} reason={}",
                    plan.procedure,
                    req.selector,
                    plan.targets.join(","),
                    req.reason
                ),
            })
            .await?;
        let (events, _) = broadcast::channel(4096);
        let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
        self.tasks.spawn(event_pipeline(
            self.store.clone(),
            job_id.clone(),
            queued,
            events.clone(),
        ));
        let live = Arc::new(LiveJob {
            cancel: CancellationToken::new(),
            events,
            pipeline: std::sync::Mutex::new((1, queue)),
            state: std::sync::Mutex::new(state::RUNNING.into()),
        });
        self.live_jobs().insert(job_id.clone(), live.clone());
        let this = self.clone();
        let span = info_span!("job", job = %job_id, procedure = %plan.procedure);
        let id = job_id.clone();
        let procedure = plan.procedure.clone();
        self.tasks.spawn(
            async move {
                this.run_job(&id, plan, hosts, &live, &req).await;
                this.hub.forget_job(&id);
                this.live_jobs().remove(&id);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            .instrument(span),
        );
        info!(job = %job_id, procedure = %procedure, actor = %actor, "job started");
        Ok(StartRollbackResponse {
            job_id,
            plan: Some(plan_proto),
        })
    }

    /// Stops dispatch and cancels running steps of a live job.
    pub async fn cancel(
        &self,
        principal: &Principal,
        job_id: &str,
        reason: &str,
    ) -> Result<String, Status> {
        let Some(live) = self.live_job(job_id) else {
            let (job, _) = self
                .store
                .get_job(job_id)
                .await?
                .ok_or_else(|| Status::not_found(format!("no job {job_id}")))?;
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
            "job.cancelling",
            "",
            "",
            &format!("cancelled by {who}: {reason}"),
            0,
            0,
        )
        .await;
        live.cancel.cancel();
        Ok("cancelling".into())
    }

    /// Stores then broadcasts a job event.
    #[allow(clippy::too_many_arguments)]
    async fn emit(
        &self,
        live: &LiveJob,
        job_id: &str,
        kind: &str,
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
            kind: kind.to_string(),
            host_id: host.to_string(),
            phase: phase.to_string(),
            message: message.to_string(),
            job_state,
            done,
            total,
        };
        pipeline.0 += 1;
        if pipeline.1.send(event).is_err() {
            warn!(job = %job_id, kind, "job event pipeline is gone; event dropped");
        }
    }

    async fn save_host(&self, track: &HostTrack) {
        if let Err(e) = self.store.update_job_host(&track.row).await {
            warn!(job = %track.row.job_id, host = %track.row.host_id, error = %e, "store failed recording host outcome");
        }
    }

    async fn run_job(
        &self,
        job_id: &str,
        plan: Plan,
        hosts: Vec<JobHostRow>,
        live: &LiveJob,
        req: &RollbackRequest,
    ) {
        let mut tracks: BTreeMap<String, HostTrack> = hosts
            .into_iter()
            .map(|row| {
                (
                    row.host_id.clone(),
                    HostTrack {
                        row,
                        done_phases: Vec::new(),
                    },
                )
            })
            .collect();
        let targets = plan.targets.len();
        self.emit(
            live,
            job_id,
            "job.started",
            "",
            "",
            &format!(
                "{} on {targets} host(s): {}; reason: {}",
                plan.procedure,
                plan.targets.join(", "),
                req.reason
            ),
            0,
            u32::try_from(targets).unwrap_or(u32::MAX),
        )
        .await;
        let mut failures = 0usize;
        let mut halt: Option<String> = None;

        'phases: for phase in &plan.phases {
            let phase_hosts: Vec<&String> = phase.batches.iter().flatten().collect();
            let total = u32::try_from(phase_hosts.len()).unwrap_or(u32::MAX);
            if phase.scope == Scope::Once
                && let Some(h) = phase_hosts.first()
                && tracks
                    .get(*h)
                    .is_some_and(|t| t.row.outcome != outcome::PENDING)
            {
                halt = Some(format!(
                    "phase `{}` must run on {h}, which already failed",
                    phase.name
                ));
                break 'phases;
            }
            self.emit(
                live,
                job_id,
                "phase.started",
                "",
                &phase.name,
                &phase_summary(phase),
                0,
                total,
            )
            .await;
            let mut done = 0u32;
            let batches = phase.batches.len();
            for (bi, batch) in phase.batches.iter().enumerate() {
                if live.cancel.is_cancelled() {
                    break 'phases;
                }
                let runnable: Vec<String> = batch
                    .iter()
                    .filter(|h| {
                        tracks
                            .get(*h)
                            .is_some_and(|t| t.row.outcome == outcome::PENDING)
                    })
                    .cloned()
                    .collect();
                if runnable.is_empty() {
                    continue;
                }
                let label = match (phase.scope, bi) {
                    (Scope::Once, _) => "once".to_string(),
                    (Scope::Each, 0)
                        if plan.phases.first().is_some_and(|p| p.batches.len() > 1) =>
                    {
                        format!("batch 1/{batches} (canary)")
                    }
                    _ => format!("batch {}/{batches}", bi + 1),
                };
                self.emit(
                    live,
                    job_id,
                    "batch.started",
                    "",
                    &phase.name,
                    &format!("{label}: {}", runnable.join(", ")),
                    done,
                    total,
                )
                .await;
                let runs = runnable
                    .iter()
                    .map(|h| self.run_on(job_id, phase, h, live, req));
                let results = futures::future::join_all(runs).await;
                for (host, result) in runnable.iter().zip(results) {
                    done += 1;
                    let Some(track) = tracks.get_mut(host) else {
                        continue;
                    };
                    track.row.phase = phase.name.clone();
                    match result {
                        Ok(duration_ms) => {
                            track.row.duration_ms += i64::try_from(duration_ms).unwrap_or(i64::MAX);
                            track.done_phases.push(phase.name.clone());
                            self.emit(
                                live,
                                job_id,
                                "host.phase_done",
                                host,
                                &phase.name,
                                &format!("{host} finished phase {}", phase.name),
                                done,
                                total,
                            )
                            .await;
                        }
                        Err(f) => {
                            if f.outcome != outcome::CANCELLED {
                                failures += 1;
                            }
                            track.row.outcome = f.outcome.into();
                            track.row.failed_step = f.step.clone();
                            track.row.exit_code = f.exit_code;
                            track.row.detail = f.detail.clone();
                            self.save_host(track).await;
                            let msg = format!(
                                "{host} {}: {} at {} (exit {}): {}",
                                f.outcome, phase.name, f.step, f.exit_code, f.detail
                            );
                            self.emit(
                                live,
                                job_id,
                                "host.finished",
                                host,
                                &phase.name,
                                &msg,
                                done,
                                total,
                            )
                            .await;
                            if phase.scope == Scope::Once && f.outcome != outcome::CANCELLED {
                                halt = Some(format!(
                                    "phase `{}` (once, on {host}) failed: {}",
                                    phase.name, f.detail
                                ));
                            }
                        }
                    }
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
                job_id,
                "phase.finished",
                "",
                &phase.name,
                &format!("phase {} done", phase.name),
                done,
                total,
            )
            .await;
        }

        let cancelled = live.cancel.is_cancelled();
        let all_phases: Vec<&str> = plan.phases.iter().map(|p| p.name.as_str()).collect();
        let mut settled: Vec<String> = Vec::new();
        for track in tracks
            .values_mut()
            .filter(|t| t.row.outcome == outcome::PENDING)
        {
            let own_phases: Vec<&str> = plan
                .phases
                .iter()
                .filter(|p| p.batches.iter().flatten().any(|h| *h == track.row.host_id))
                .map(|p| p.name.as_str())
                .collect();
            let complete = own_phases
                .iter()
                .all(|p| track.done_phases.iter().any(|d| d == p));
            let done_text = if track.done_phases.is_empty() {
                "none".to_string()
            } else {
                track.done_phases.join(", ")
            };
            let (o, detail) = if complete && !own_phases.is_empty() {
                (outcome::SUCCEEDED, format!("completed phases: {done_text}"))
            } else if cancelled {
                (
                    outcome::CANCELLED,
                    format!("not finished: the job was cancelled (completed phases: {done_text})"),
                )
            } else {
                let reason = halt.clone().unwrap_or_else(|| "the job stopped".into());
                (
                    outcome::SKIPPED,
                    format!(
                        "not reached: {reason} (completed phases: {done_text} of {})",
                        all_phases.join(", ")
                    ),
                )
            };
            track.row.outcome = o.into();
            track.row.detail = detail;
            settled.push(track.row.host_id.clone());
            let msg = format!("{} {o}: {}", track.row.host_id, track.row.detail);
            self.emit(
                live,
                job_id,
                "host.finished",
                &track.row.host_id.clone(),
                "",
                &msg,
                0,
                0,
            )
            .await;
        }

        // Saved concurrently: the store commits them together.
        futures::future::join_all(
            settled
                .iter()
                .filter_map(|h| tracks.get(h))
                .map(|t| self.save_host(t)),
        )
        .await;

        let any_failed = tracks.values().any(|t| t.row.outcome != outcome::SUCCEEDED);
        let final_state = if cancelled {
            state::CANCELLED
        } else if halt.is_some() {
            state::HALTED
        } else if any_failed {
            state::FAILED
        } else {
            state::SUCCEEDED
        };
        *live
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = final_state.into();
        let halt_text = halt.clone().unwrap_or_default();
        if let Err(e) = self
            .store
            .update_job_state(job_id, final_state, Some(now_unix_ms()), &halt_text)
            .await
        {
            warn!(job = %job_id, error = %e, "store failed recording the job's end");
        }
        if let Some(h) = &halt {
            self.emit(live, job_id, "job.halted", "", "", h, 0, 0).await;
        }
        let succeeded = tracks
            .values()
            .filter(|t| t.row.outcome == outcome::SUCCEEDED)
            .count();
        let summary = format!(
            "{final_state}: {succeeded} of {} host(s) succeeded",
            tracks.len()
        );
        let _ = self
            .store
            .append_audit(&AuditEvent {
                at_ms: now_unix_ms(),
                actor: "coordinator".into(),
                action: "rollback.finished".into(),
                target: format!("job/{job_id}"),
                detail: summary.clone(),
            })
            .await;
        self.emit(live, job_id, "job.finished", "", "", &summary, 0, 0)
            .await;
        info!(job = %job_id, state = final_state, "rollback job finished");
    }

    /// Runs one phase's steps on one host; Ok(duration) when every step succeeded.
    async fn run_on(
        &self,
        job_id: &str,
        phase: &PlannedPhase,
        host: &str,
        live: &LiveJob,
        req: &RollbackRequest,
    ) -> Result<u64, HostFailure> {
        let first_step = phase
            .steps_for(host)
            .first()
            .map(|s| s.action.clone())
            .unwrap_or_default();
        let unreachable = |detail: String| HostFailure {
            outcome: outcome::UNREACHABLE,
            step: first_step.clone(),
            exit_code: -1,
            detail,
        };
        let Some(session) = self.registry.get(host) else {
            return Err(unreachable(format!("agent {host} was offline at dispatch")));
        };
        let run_id = new_id();
        let procedure = RunProcedure {
            run_id: run_id.clone(),
            job_id: job_id.to_string(),
            steps: phase
                .steps_for(host)
                .iter()
                .map(super::planning::step_proto)
                .collect(),
            deadline_unix_ms: 0,
        };
        let row = RunRow {
            run_id: run_id.clone(),
            job_id: job_id.to_string(),
            host_id: host.to_string(),
            requested_by: String::new(),
            reason: req.reason.clone(),
            procedure: procedure.encode_to_vec(),
            status: 0,
            created_at_ms: now_unix_ms(),
            finished_at_ms: None,
            result: None,
            phase: phase.name.clone(),
        };
        if let Err(e) = self.store.create_run(&row).await {
            return Err(HostFailure {
                outcome: outcome::FAILED,
                step: first_step.clone(),
                exit_code: -1,
                detail: format!("coordinator store: {e}"),
            });
        }
        let (tx, mut rx) = mpsc::channel(256);
        self.hub.watch(&run_id, host, tx);
        self.hub.dispatched(&run_id, job_id);
        let msg = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::RunProcedure(procedure)),
        };
        if session.sender.send(Ok(msg)).await.is_err() {
            self.hub.close(&run_id);
            self.hub.resolved(&run_id);
            return Err(unreachable(format!(
                "agent {host} disconnected before the run could be sent"
            )));
        }
        self.emit(
            live,
            job_id,
            "host.dispatched",
            host,
            &phase.name,
            &format!("{host}: {}", host_steps_text(phase, host)),
            0,
            0,
        )
        .await;
        let mut cancel_sent = false;
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Ok(ExecEvent { kind: Some(exec_event::Kind::Finished(result)) })) => return self.outcome_of(result),
                    Some(Ok(ExecEvent { kind: Some(exec_event::Kind::StepEvent(se)) })) => {
                        if let Some(step_event::Kind::Finished(f)) = se.kind {
                            let msg = format!(
                                "{host} {} {} (exit {}) in {:.1}s",
                                f.action,
                                step_status_name(f.status),
                                f.exit_code,
                                f.duration_ms as f64 / 1000.0
                            );
                            self.emit(live, job_id, "step.finished", host, &phase.name, &msg, 0, 0).await;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return self.await_result_after_drop(host, &run_id, first_step.clone()).await,
                },
                () = live.cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    if let Some(s) = self.registry.get(host) {
                        let msg = CoordinatorMessage { kind: Some(coordinator_message::Kind::Cancel(Cancel { run_id: run_id.clone(), reason: "job cancelled".into() })) };
                        let _ = s.sender.send(Ok(msg)).await;
                    }
                }
            }
        }
    }

    /// The host's session dropped mid-run: its result arrives (from its journal) when it
    /// reconnects; wait for it in the store until the unreachable deadline.
    async fn await_result_after_drop(
        &self,
        host: &str,
        run_id: &str,
        step: String,
    ) -> Result<u64, HostFailure> {
        let started = Instant::now();
        while started.elapsed() < self.unreachable_after {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(Some(row)) = self.store.get_run(run_id).await
                && let Some(bytes) = row.result
                && let Ok(result) = RunFinished::decode(bytes.as_slice())
            {
                return self.outcome_of(result);
            }
        }
        Err(HostFailure {
            outcome: outcome::UNREACHABLE,
            step,
            exit_code: -1,
            detail: format!(
                "agent {host} was lost during the run and did not report back within {:?}",
                self.unreachable_after
            ),
        })
    }

    fn outcome_of(&self, result: RunFinished) -> Result<u64, HostFailure> {
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
            Ok(StepStatus::TimedOut) => outcome::TIMED_OUT,
            Ok(StepStatus::Cancelled) => outcome::CANCELLED,
            _ => outcome::FAILED,
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
}

/// Stores a job's events in batches (one commit for everything queued), then broadcasts them
/// in order: a watcher never sees an event the store does not have. Ends when the job's
/// `LiveJob` is gone and every queued event is stored.
async fn event_pipeline(
    store: Arc<dyn crate::store::Store>,
    job_id: String,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<JobEvent>,
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
            .map(|e| (e.seq, e.at_unix_ms, e.encode_to_vec()))
            .collect();
        if let Err(e) = store.append_job_events(&job_id, rows).await {
            warn!(job = %job_id, error = %e, "store failed recording job events");
        }
        for ev in batch {
            let _ = events.send(ev);
        }
    }
}

fn host_row(job_id: &str, host: &str, ord: usize, once_only: bool) -> JobHostRow {
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
    }
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
