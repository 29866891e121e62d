//! Runs a `RunProcedure` on this host: every step validated before anything is spawned, the
//! run journaled before it starts and at each step boundary, events streamed on the uplink,
//! stop at the first step that does not succeed, cancel on request. A run is journaled before
//! anything of it runs, and each step before it starts: when the journal cannot be written,
//! nothing more runs (refused). One run at a time: a run arriving while another runs is
//! answered `Busy` and not journaled, so it may be sent again; a duplicate of the run being
//! accepted is ignored.
//! A run's deadline (`deadline_unix_ms`, 0 = none) caps every step's timeout; a run arriving
//! after it runs nothing and is journaled `TimedOut`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollback_common::jobs::fact;
use rollback_common::proto::{
    AgentMessage, OutputChunk, RunFinished, RunProcedure, StepEvent, StepFinished, StepStarted,
    StepStatus, agent_message, step_event,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::actions::{self, Action, StepCtx};
use crate::config::Config;
use crate::exec::OutputSink;
use crate::journal::{Journal, Phase, RunRecord, StepRecord, valid_run_id};
use crate::uplink::Uplink;

/// Steps in one run: bounds the journal record and keeps every result within the message
/// limit once cut (`output_cap::fit_run_finished`).
pub const MAX_STEPS_PER_RUN: usize = 256;
/// Cancels for not-yet-arrived runs that are remembered.
const EARLY_CANCELS_KEPT: usize = 64;
/// Output chunks larger than this are split (keeps gRPC messages small).
const MAX_CHUNK: usize = 16 * 1024;

/// How a run's steps are executed. `Noop` is the one hook for `rollback-agent --simulate`
/// (`crate::simulate`): validation, journal, events and results stay the real ones; only the
/// step's action is replaced by a success after `step_ms` (0: at once), or a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepExecution {
    Real,
    Noop { step_ms: u64 },
}

/// Time left before a run's deadline at `now_ms`: `None` when the run has no deadline
/// (`deadline_ms == 0`), `Ok(left)` before it, `Err(ms)` once reached, `ms` after it.
/// A negative deadline is one that passed long ago.
pub fn time_left(deadline_ms: i64, now_ms: i64) -> Option<Result<Duration, u64>> {
    if deadline_ms == 0 {
        return None;
    }
    Some(if now_ms < deadline_ms {
        Ok(Duration::from_millis(
            u64::try_from(deadline_ms.saturating_sub(now_ms)).unwrap_or(u64::MAX),
        ))
    } else {
        Err(u64::try_from(now_ms.saturating_sub(deadline_ms)).unwrap_or(u64::MAX))
    })
}

/// A step's effective timeout: its own, or the time left to the deadline if that is shorter
/// (then `true`: the deadline is what stops it).
pub fn effective_timeout(own: Duration, left: Option<Duration>) -> (Duration, bool) {
    match left {
        Some(left) if left < own => (left, true),
        _ => (own, false),
    }
}

#[derive(Debug)]
struct Active {
    run_id: String,
    cancel: CancellationToken,
}

pub struct Runner {
    config: Arc<Config>,
    journal: Journal,
    uplink: Arc<Uplink>,
    active: Mutex<Option<Active>>,
    /// Cancels that arrived before their run started (bounded; oldest dropped first).
    early_cancels: Mutex<std::collections::VecDeque<String>>,
    execution: StepExecution,
    /// Told when a run ends, so the session can report fresh host state.
    pub finished: tokio::sync::Notify,
    /// HEAD as the last run's checkout left it (`head_after_run`), set before `finished` is
    /// told and taken by the session's state report.
    head_after: Mutex<Option<(String, String)>>,
    /// Deliveries handed to `spawn_submit` and not yet accepted or answered.
    accepting: std::sync::atomic::AtomicUsize,
}

fn msg(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

fn step_event(run_id: &str, index: usize, kind: step_event::Kind) -> AgentMessage {
    msg(agent_message::Kind::StepEvent(StepEvent {
        run_id: run_id.to_string(),
        step_index: u32::try_from(index).unwrap_or(u32::MAX),
        kind: Some(kind),
    }))
}

/// Streams a step's output to the coordinator with sequence numbers.
struct ChunkSink {
    uplink: Arc<Uplink>,
    run_id: String,
    index: usize,
    seq: u64,
}

impl OutputSink for ChunkSink {
    fn chunk(&mut self, stderr: bool, data: &[u8]) {
        for piece in data.chunks(MAX_CHUNK) {
            self.seq += 1;
            let event = step_event(
                &self.run_id,
                self.index,
                step_event::Kind::Output(OutputChunk {
                    seq: self.seq,
                    stderr,
                    data: piece.to_vec(),
                }),
            );
            // A gap in sequence numbers tells the coordinator output was dropped.
            self.uplink.try_send(event);
        }
    }
}

impl Runner {
    pub fn new(
        config: Arc<Config>,
        journal: Journal,
        uplink: Arc<Uplink>,
        execution: StepExecution,
    ) -> Self {
        Self {
            config,
            journal,
            uplink,
            active: Mutex::new(None),
            early_cancels: Mutex::new(std::collections::VecDeque::new()),
            execution,
            finished: tokio::sync::Notify::new(),
            head_after: Mutex::new(None),
            accepting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// `submit` in a task of its own, counted from now until it is accepted (then `active`
    /// holds it until it ends) or answered: `is_idle` never misses a run on its way in.
    pub fn spawn_submit(self: &Arc<Self>, run: RunProcedure) {
        use std::sync::atomic::Ordering;
        struct Accepting(Arc<Runner>);
        impl Drop for Accepting {
            fn drop(&mut self) {
                self.0.accepting.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.accepting.fetch_add(1, Ordering::SeqCst);
        let guard = Accepting(self.clone());
        tokio::spawn(async move {
            guard.0.submit(run).await;
            drop(guard);
        });
    }

    /// No run is running or being accepted.
    pub fn is_idle(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::SeqCst) == 0
            && self.lock_active().is_none()
    }

    /// The run in progress, if any.
    pub fn active_run(&self) -> Option<String> {
        self.lock_active().as_ref().map(|a| a.run_id.clone())
    }

    /// Whether a finished run's result still waits for the coordinator's acknowledgement.
    pub fn has_unacked_results(&self) -> bool {
        self.unacked_runs().iter().any(|r| r.finished)
    }

    fn host(&self) -> &str {
        &self.config.host_id
    }

    /// HEAD's sha and subject as the run that ended last left them, when its checkout said so
    /// (taken once: the next report reads HEAD unless another run says again).
    pub fn take_head_after(&self) -> Option<(String, String)> {
        self.head_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, Option<Active>> {
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Finishes crashed runs from the journal as interrupted (at start-up).
    pub fn recover(&self) {
        match self.journal.recover() {
            Ok(runs) => {
                for r in runs {
                    warn!(host = %self.host(), run = %r.run_id, job = %r.job_id, "run was cut off by an agent stop; reported interrupted, not re-run");
                }
            }
            Err(e) => error!(host = %self.host(), error = %e, "journal recovery failed"),
        }
    }

    /// Run ids in the journal the coordinator has not acknowledged yet (for Hello).
    pub fn unacked_runs(&self) -> Vec<RunRecord> {
        self.journal
            .all()
            .map(|runs| runs.into_iter().filter(|r| !r.acked).collect())
            .unwrap_or_default()
    }

    /// Re-sends finished, unacknowledged results (after a reconnect).
    pub async fn resend_unacked(&self) {
        for run in self.unacked_runs().into_iter().filter(|r| r.finished) {
            self.uplink
                .send(msg(agent_message::Kind::RunFinished(run.to_proto(true))))
                .await;
        }
    }

    pub fn ack(&self, run_id: &str) {
        if !valid_run_id(run_id) {
            return;
        }
        if let Err(e) = self.journal.ack(run_id) {
            warn!(host = %self.host(), run = %run_id, error = %e, "journal ack failed");
        }
    }

    pub fn cancel(&self, run_id: &str) {
        match self.lock_active().as_ref() {
            Some(a) if a.run_id == run_id => {
                info!(host = %self.host(), run = %run_id, "cancelling run");
                a.cancel.cancel();
            }
            _ => {
                // The run may still be on its way (its RunProcedure and this Cancel race):
                // remember it, so the run starts cancelled instead of running.
                info!(host = %self.host(), run = %run_id, "cancel for a run not running here; remembered in case it arrives");
                let mut early = self
                    .early_cancels
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if early.len() >= EARLY_CANCELS_KEPT {
                    early.pop_front();
                }
                early.push_back(run_id.to_string());
            }
        }
    }

    /// Whether a cancel for `run_id` arrived before the run did (consumes it).
    fn take_early_cancel(&self, run_id: &str) -> bool {
        let mut early = self
            .early_cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match early.iter().position(|r| r == run_id) {
            Some(i) => {
                early.remove(i);
                true
            }
            None => false,
        }
    }

    async fn refuse(&self, run: &RunProcedure, error: String) {
        self.answer_unjournaled(run, StepStatus::Refused, error)
            .await;
    }

    /// Answers a run that was not accepted, without journaling it (so the same run id can
    /// still be delivered and run later).
    async fn answer_unjournaled(&self, run: &RunProcedure, status: StepStatus, error: String) {
        warn!(host = %self.host(), run = %run.run_id, status = ?status, error = %error, "not running run");
        let finished = RunFinished {
            run_id: run.run_id.clone(),
            status: status as i32,
            steps: vec![StepFinished {
                status: status as i32,
                exit_code: -1,
                error,
                ..Default::default()
            }],
            from_journal: false,
            job_id: run.job_id.clone(),
        };
        self.uplink
            .send(msg(agent_message::Kind::RunFinished(finished)))
            .await;
    }

    /// Accepts a run from the coordinator.
    pub async fn submit(self: &Arc<Self>, run: RunProcedure) {
        let host = self.host().to_string();
        if !valid_run_id(&run.run_id) {
            return self
                .refuse(
                    &run,
                    format!(
                        "agent {host}: run id `{}` is not 1-64 of [A-Za-z0-9_-]",
                        run.run_id.escape_default()
                    ),
                )
                .await;
        }
        match self.journal.load(&run.run_id) {
            Ok(Some(done)) if done.finished => {
                info!(host = %host, run = %run.run_id, "run delivered again; returning its journaled result");
                self.uplink
                    .send(msg(agent_message::Kind::RunFinished(done.to_proto(true))))
                    .await;
                return;
            }
            Ok(Some(_)) => {
                info!(host = %host, run = %run.run_id, "run delivered again while it runs; ignoring the duplicate");
                return;
            }
            Ok(None) => {}
            Err(e) => {
                return self
                    .refuse(&run, format!("agent {host}: journal unusable: {e}"))
                    .await;
            }
        }
        if run.steps.len() > MAX_STEPS_PER_RUN {
            return self
                .refuse(
                    &run,
                    format!(
                        "agent {host}: the run has {} steps; at most {MAX_STEPS_PER_RUN} are accepted (split the procedure into phases)",
                        run.steps.len()
                    ),
                )
                .await;
        }
        if !run.steps.is_empty()
            && let Some(Err(ago)) = time_left(run.deadline_unix_ms, rollback_common::now_unix_ms())
        {
            return self.deadline_passed(&run, ago).await;
        }
        let cancel = CancellationToken::new();
        let busy = {
            let mut active = self.lock_active();
            match active.as_ref() {
                // Accepted, not journaled yet: this is a duplicate of a running run, whose
                // result will come; a busy answer would contradict it.
                Some(a) if a.run_id == run.run_id => {
                    info!(host = %host, run = %run.run_id, "run delivered again while it is being accepted; ignoring the duplicate");
                    return;
                }
                Some(a) => Some(format!(
                    "agent {host}: busy with run {}; one run at a time per host",
                    a.run_id
                )),
                // Checked again under the lock: a concurrent delivery of the same run may
                // have been journaled, run and finished since the check above.
                None if !matches!(self.journal.load(&run.run_id), Ok(None)) => Some(String::new()),
                None => {
                    *active = Some(Active {
                        run_id: run.run_id.clone(),
                        cancel: cancel.clone(),
                    });
                    None
                }
            }
        };
        match busy {
            Some(b) if b.is_empty() => {
                info!(host = %host, run = %run.run_id, "run journaled by a concurrent delivery; answering from the journal");
                if let Ok(Some(done)) = self.journal.load(&run.run_id)
                    && done.finished
                {
                    self.uplink
                        .send(msg(agent_message::Kind::RunFinished(done.to_proto(true))))
                        .await;
                }
                return;
            }
            Some(busy) => return self.answer_unjournaled(&run, StepStatus::Busy, busy).await,
            None => {}
        }

        let mut record = new_record(&run);
        // Validate every step before anything is spawned.
        let mut actions = Vec::with_capacity(run.steps.len());
        for (i, step) in run.steps.iter().enumerate() {
            match actions::validate(step, &self.config) {
                Ok(a) => actions.push(a),
                Err(refusal) => {
                    record.steps[i].finish(
                        StepStatus::Refused,
                        format!("agent {host}: {refusal}; nothing was run"),
                    );
                    for later in record
                        .steps
                        .iter_mut()
                        .filter(|s| s.phase == Phase::Pending)
                    {
                        later.finish(
                            StepStatus::Skipped,
                            "not started: a step of this run was refused",
                        );
                    }
                    break;
                }
            }
        }
        if run.steps.is_empty() {
            *self.lock_active() = None;
            return self
                .refuse(&run, format!("agent {host}: the run has no steps"))
                .await;
        }
        // The first step starts right after, nothing running in between: its start is written
        // with the run (a crash in between reports it interrupted, never unrun when it ran).
        if actions.len() == record.steps.len() {
            record.steps[0].phase = Phase::Running;
        }
        // Exactly once rests on the journal: a run is recorded before anything of it runs,
        // or it does not run at all.
        if let Err(e) = self.journal.save(&record) {
            *self.lock_active() = None;
            error!(host = %host, run = %run.run_id, error = %e, "journal write failed; run refused");
            return self
                .refuse(
                    &run,
                    format!(
                        "agent {host}: cannot record the run in the journal ({e}); nothing was run, because a step that is not journaled could run twice after a crash. Free space or fix permissions in {}, then retry",
                        self.config.state_dir.display()
                    ),
                )
                .await;
        }
        // Taken only once the run is accepted and journaled: a busy answer or a journal
        // failure leaves it for the redelivery.
        if self.take_early_cancel(&run.run_id) {
            info!(host = %host, run = %run.run_id, "run was cancelled before it arrived; nothing will run");
            cancel.cancel();
        }
        let this = self.clone();
        let span = info_span!("run", host = %host, run = %run.run_id, job = %run.job_id);
        tokio::spawn(
            async move {
                let head = this.execute(record, actions, run, cancel).await;
                *this
                    .head_after
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = head;
                *this.lock_active() = None;
                this.finished.notify_waiters();
            }
            .instrument(span),
        );
    }

    /// A run that arrived after its deadline: nothing runs; it is journaled as finished
    /// `TimedOut`, so a redelivery returns the same answer.
    async fn deadline_passed(&self, run: &RunProcedure, ago_ms: u64) {
        let error = format!(
            "agent {}: deadline passed {ago_ms} ms ago; nothing was run",
            self.host()
        );
        warn!(host = %self.host(), run = %run.run_id, error = %error, "run arrived after its deadline");
        let mut record = new_record(run);
        for step in &mut record.steps {
            step.finish(StepStatus::TimedOut, error.clone());
        }
        record.finished = true;
        record.status = StepStatus::TimedOut as i32;
        self.save(&record);
        self.uplink
            .send(msg(agent_message::Kind::RunFinished(
                record.to_proto(false),
            )))
            .await;
    }

    fn save(&self, record: &RunRecord) {
        if let Err(e) = self.journal.save(record) {
            error!(error = %e, "journal write failed");
        }
    }

    /// Sends a step's `Finished` once the journal holds it.
    async fn announce(&self, run_id: &str, finished: Option<(usize, StepFinished)>) {
        if let Some((i, finished)) = finished {
            self.uplink
                .send(step_event(run_id, i, step_event::Kind::Finished(finished)))
                .await;
        }
    }

    async fn execute(
        &self,
        mut record: RunRecord,
        actions: Vec<Action>,
        run: RunProcedure,
        cancel: CancellationToken,
    ) -> Option<(String, String)> {
        let refused = actions.len() < record.steps.len();
        let log_offset = self
            .config
            .app
            .as_ref()
            .and_then(|a| a.log_file.as_ref())
            .map(|p| actions::log_size(p));
        // A step's end is made durable by the next write: the next step's start, or the run's
        // end. Nothing runs between the two, so merging them loses no state a crash could
        // leave, and the step's `Finished` is sent only once that write is done.
        let mut unannounced: Option<(usize, StepFinished)> = None;
        if !refused {
            for (i, action) in actions.iter().enumerate() {
                if cancel.is_cancelled() {
                    break;
                }
                let left = time_left(run.deadline_unix_ms, rollback_common::now_unix_ms());
                if let Some(Err(ago)) = left {
                    info!(step = i, "the run's deadline passed; step not started");
                    record.steps[i].finish(
                        StepStatus::TimedOut,
                        format!(
                            "agent {}: deadline passed {ago} ms ago; the step was not started",
                            self.host()
                        ),
                    );
                    break;
                }
                let saved = if record.steps[i].phase == Phase::Running {
                    Ok(()) // written with the run when it was accepted
                } else {
                    record.steps[i].phase = Phase::Running;
                    self.journal.save(&record)
                };
                self.announce(&run.run_id, unannounced.take()).await;
                if let Err(e) = saved {
                    error!(step = i, error = %e, "journal write failed; step not started");
                    let action = record.steps[i].action.clone();
                    record.steps[i].finish(
                        StepStatus::Refused,
                        format!(
                            "agent {}: {}: cannot record the step in the journal ({e}); it was not started, because a step that is not journaled could run twice after a crash. Free space or fix permissions in {}, then retry",
                            self.host(),
                            action,
                            self.config.state_dir.display()
                        ),
                    );
                    break;
                }
                info!(step = i, action = %record.steps[i].action, "step started");
                self.uplink
                    .send(step_event(
                        &run.run_id,
                        i,
                        step_event::Kind::Started(StepStarted {}),
                    ))
                    .await;

                let mut sink = ChunkSink {
                    uplink: self.uplink.clone(),
                    run_id: run.run_id.clone(),
                    index: i,
                    seq: 0,
                };
                let (timeout, by_deadline) = effective_timeout(
                    actions::timeout_for(&run.steps[i], &self.config),
                    left.and_then(Result::ok),
                );
                let mut ctx = StepCtx::new(&self.config, &mut sink, &cancel, timeout);
                ctx.log_offset = log_offset;
                let started = std::time::Instant::now();
                let result = match self.execution {
                    StepExecution::Real => actions::execute(action, ctx).await,
                    StepExecution::Noop { step_ms } => {
                        crate::simulate::noop_result(step_ms, &cancel).await
                    }
                };

                let step = &mut record.steps[i];
                step.exit_code = result.exit_code;
                step.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                step.truncated = result.output.truncated();
                step.output_tail = String::from_utf8_lossy(&result.output.render()).into_owned();
                step.facts = result.facts;
                let error = if result.error.is_empty() {
                    String::new()
                } else if by_deadline && result.status == StepStatus::TimedOut {
                    format!(
                        "agent {}: {}: {} (stopped at the run's deadline)",
                        self.host(),
                        step.action,
                        result.error
                    )
                } else {
                    format!("agent {}: {}: {}", self.host(), step.action, result.error)
                };
                step.finish(result.status, error);
                info!(step = i, action = %step.action, status = ?result.status, exit_code = step.exit_code, duration_ms = step.duration_ms, "step finished");
                unannounced = Some((i, step.to_proto()));
                if result.status != StepStatus::Succeeded {
                    break;
                }
            }
        }
        let stopped_by_cancel = cancel.is_cancelled();
        for step in record.steps.iter_mut().filter(|s| s.phase != Phase::Done) {
            if stopped_by_cancel {
                step.finish(StepStatus::Cancelled, "not started: the run was cancelled");
            } else {
                step.finish(
                    StepStatus::Skipped,
                    "not started: an earlier step did not succeed",
                );
            }
        }
        record.finished = true;
        record.status = record.overall_status() as i32;
        self.save(&record);
        self.announce(&run.run_id, unannounced).await;
        info!(status = ?record.overall_status(), "run finished");
        self.uplink
            .send(msg(agent_message::Kind::RunFinished(
                record.to_proto(false),
            )))
            .await;
        head_after_run(&record.steps)
    }
}

/// HEAD as a run's steps left it, when they say so: the last `git.checkout` that started
/// succeeded and read the sha and subject it moved to (in the same `git` process that
/// resolved it, or by reading HEAD back). `None` when the run had no checkout (HEAD is
/// read), or its last one that started did not succeed (HEAD may be anywhere).
fn head_after_run(steps: &[StepRecord]) -> Option<(String, String)> {
    let last = steps
        .iter()
        .filter(|s| s.action == "git.checkout" && s.phase == Phase::Done)
        .rfind(|s| s.status != StepStatus::Skipped as i32)?;
    if last.status != StepStatus::Succeeded as i32 {
        return None;
    }
    let sha = last.facts.get(fact::SHA).filter(|s| !s.is_empty())?;
    let subject = last.facts.get(fact::SUBJECT)?;
    Some((sha.clone(), subject.clone()))
}

fn new_record(run: &RunProcedure) -> RunRecord {
    RunRecord {
        run_id: run.run_id.clone(),
        job_id: run.job_id.clone(),
        received_at_ms: rollback_common::now_unix_ms(),
        steps: run
            .steps
            .iter()
            .map(|s| {
                StepRecord::pending(
                    &s.action,
                    s.params.clone().into_iter().collect::<BTreeMap<_, _>>(),
                )
            })
            .collect(),
        finished: false,
        status: StepStatus::Unspecified as i32,
        acked: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollback_common::proto::{Step, agent_message};

    fn runner(dir: &std::path::Path) -> (Arc<Runner>, tokio::sync::mpsc::Receiver<AgentMessage>) {
        runner_with(dir, "")
    }

    /// HEAD after a run comes from its last checkout only when that checkout succeeded and
    /// read where it left HEAD; anything else makes the state report read HEAD itself.
    #[test]
    fn head_after_a_run_is_its_last_started_checkouts_only_when_it_succeeded() {
        let step = |action: &str, status: Option<StepStatus>, sha: &str| {
            let mut s = StepRecord::pending(action, BTreeMap::new());
            if !sha.is_empty() {
                s.facts.insert(fact::SHA.into(), sha.into());
                s.facts
                    .insert(fact::SUBJECT.into(), format!("release {sha}"));
            }
            if let Some(status) = status {
                s.finish(status, "");
            }
            s
        };
        let ok = Some(StepStatus::Succeeded);
        let known = |sha: &str| Some((sha.to_string(), format!("release {sha}")));
        assert_eq!(
            head_after_run(&[
                step("service.stop", ok, ""),
                step("git.checkout", ok, "aaa"),
                step("service.start", ok, ""),
            ]),
            known("aaa")
        );
        // The last checkout that started counts; one skipped after a failure moved nothing.
        assert_eq!(
            head_after_run(&[
                step("git.checkout", ok, "aaa"),
                step("git.checkout", ok, "bbb"),
                step("http.check", Some(StepStatus::Failed), ""),
                step("git.checkout", Some(StepStatus::Skipped), ""),
            ]),
            known("bbb")
        );
        for unknown in [
            // No checkout: nothing said where HEAD is.
            vec![step("service.restart", ok, "")],
            // A checkout that failed or timed out may have left HEAD anywhere.
            vec![
                step("git.checkout", ok, "aaa"),
                step("git.checkout", Some(StepStatus::Failed), ""),
            ],
            vec![step("git.checkout", Some(StepStatus::TimedOut), "bbb")],
            vec![step("git.checkout", Some(StepStatus::Cancelled), "")],
            // Still pending (never finished) or succeeded without saying where.
            vec![step("git.checkout", None, "aaa")],
            vec![step("git.checkout", ok, "")],
        ] {
            assert_eq!(head_after_run(&unknown), None, "{unknown:?}");
        }
    }

    /// A runner whose agent.toml ends with `extra` (e.g. an `[app]` section).
    fn runner_with(
        dir: &std::path::Path,
        extra: &str,
    ) -> (Arc<Runner>, tokio::sync::mpsc::Receiver<AgentMessage>) {
        let config: Config = toml::from_str(&format!(
            "host_id = \"h1\"\ncoordinator = \"https://127.0.0.1:1\"\nstate_dir = \"{}\"\n[tls]\nca = \"x\"\ncert = \"x\"\nkey = \"x\"\n{extra}",
            dir.display()
        ))
        .expect("config");
        let uplink = Arc::new(Uplink::default());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        uplink.attach(tx);
        let journal = Journal::open(dir).expect("journal");
        (
            Arc::new(Runner::new(
                Arc::new(config),
                journal,
                uplink,
                StepExecution::Real,
            )),
            rx,
        )
    }

    async fn result(rx: &mut tokio::sync::mpsc::Receiver<AgentMessage>) -> RunFinished {
        loop {
            match rx.recv().await.map(|m| m.kind) {
                Some(Some(agent_message::Kind::RunFinished(r))) => return r,
                Some(_) => continue,
                None => panic!("uplink closed before the run finished"),
            }
        }
    }

    #[tokio::test]
    async fn a_cancel_that_arrives_before_its_run_stops_it_from_running() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, mut rx) = runner(tmp.path());
        let run = |id: &str| RunProcedure {
            run_id: id.into(),
            steps: vec![Step {
                action: "state.read".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        runner.cancel("early");
        runner.submit(run("early")).await;
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::Cancelled as i32, "{r:?}");
        assert_eq!(r.steps[0].status, StepStatus::Cancelled as i32);

        // A run without an early cancel runs normally.
        runner.submit(run("normal")).await;
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::Succeeded as i32, "{r:?}");
    }

    fn step(action: &str, params: &[(&str, &str)]) -> Step {
        Step::new(action, params)
    }

    fn run_of(id: &str, steps: Vec<Step>, deadline_unix_ms: i64) -> RunProcedure {
        RunProcedure {
            run_id: id.into(),
            steps,
            deadline_unix_ms,
            ..Default::default()
        }
    }

    /// An `[app]` whose health URL points at `port` on loopback.
    fn app_at(port: u16) -> String {
        format!("[app]\ndir = \"/\"\nhealth_base_url = \"http://127.0.0.1:{port}\"\n")
    }

    /// A loopback port nothing listens on (connections are refused at once).
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    #[test]
    fn deadline_arithmetic() {
        assert_eq!(time_left(0, 1_000), None, "0 means no deadline");
        assert_eq!(
            time_left(1_500, 1_000),
            Some(Ok(Duration::from_millis(500)))
        );
        assert_eq!(
            time_left(1_000, 1_000),
            Some(Err(0)),
            "reached at the deadline"
        );
        assert_eq!(time_left(1_000, 1_250), Some(Err(250)));
        assert!(matches!(time_left(-5, 1_000), Some(Err(1_005))));
        let own = Duration::from_secs(300);
        assert_eq!(effective_timeout(own, None), (own, false));
        assert_eq!(
            effective_timeout(own, Some(Duration::from_secs(10))),
            (Duration::from_secs(10), true)
        );
        assert_eq!(
            effective_timeout(own, Some(Duration::from_secs(900))),
            (own, false)
        );
    }

    #[tokio::test]
    async fn a_step_is_announced_only_once_journaled_and_a_run_of_n_steps_is_n_plus_two_writes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, mut rx) = runner(tmp.path());
        let steps = vec![step("state.read", &[]); 3];
        runner.submit(run_of("three", steps, 0)).await;
        let phase_of = |i: u32| {
            let journaled = runner.journal.load("three").expect("journal").expect("run");
            journaled.steps[i as usize].phase
        };
        let mut announced = Vec::new();
        loop {
            match rx.recv().await.and_then(|m| m.kind) {
                Some(agent_message::Kind::StepEvent(e)) => match e.kind {
                    Some(step_event::Kind::Started(_)) => {
                        assert_ne!(phase_of(e.step_index), Phase::Pending, "{e:?}");
                        announced.push(format!("started {}", e.step_index));
                    }
                    Some(step_event::Kind::Finished(_)) => {
                        // What the coordinator is told has ended must survive a crash.
                        assert_eq!(phase_of(e.step_index), Phase::Done, "{e:?}");
                        announced.push(format!("finished {}", e.step_index));
                    }
                    _ => {}
                },
                Some(agent_message::Kind::RunFinished(r)) => {
                    assert_eq!(r.status, StepStatus::Succeeded as i32, "{r:?}");
                    break;
                }
                Some(_) => {}
                None => panic!("uplink closed before the run finished"),
            }
        }
        assert_eq!(
            announced,
            [
                "started 0",
                "finished 0",
                "started 1",
                "finished 1",
                "started 2",
                "finished 2"
            ]
        );
        // Accepted with the first step's start, then each later step's start (the one before
        // it ends in the same write), then the run's end (with its last step's): four. The
        // acknowledgement is a marker, not a fifth durable write.
        assert_eq!(runner.journal.writes(), 4);
        assert!(runner.has_unacked_results());
        runner.ack("three");
        assert_eq!(runner.journal.writes(), 4);
        assert!(!runner.has_unacked_results());
    }

    #[tokio::test]
    async fn a_busy_answer_journals_nothing_and_the_run_runs_when_redelivered() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, mut rx) = runner(tmp.path());
        *runner.lock_active() = Some(Active {
            run_id: "other".into(),
            cancel: CancellationToken::new(),
        });
        let run = run_of("later", vec![step("state.read", &[])], 0);
        runner.submit(run.clone()).await;
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::Busy as i32, "{r:?}");
        assert_eq!(r.steps[0].status, StepStatus::Busy as i32);
        assert!(r.steps[0].error.contains("busy with run other"), "{r:?}");
        assert!(
            runner.journal.load("later").expect("journal").is_none(),
            "a busy answer is not journaled"
        );

        // The other run ends; the same run id delivered again runs normally.
        *runner.lock_active() = None;
        runner.submit(run).await;
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::Succeeded as i32, "{r:?}");
        assert!(!r.from_journal);
        let journaled = runner.journal.load("later").expect("journal").expect("run");
        assert!(journaled.finished);
    }

    #[tokio::test]
    async fn a_busy_answer_keeps_an_early_cancel_for_the_redelivery() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, mut rx) = runner(tmp.path());
        *runner.lock_active() = Some(Active {
            run_id: "other".into(),
            cancel: CancellationToken::new(),
        });
        runner.cancel("later");
        let run = run_of("later", vec![step("state.read", &[])], 0);
        runner.submit(run.clone()).await;
        assert_eq!(result(&mut rx).await.status, StepStatus::Busy as i32);
        *runner.lock_active() = None;
        runner.submit(run).await;
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::Cancelled as i32, "{r:?}");
    }

    #[tokio::test]
    async fn a_run_after_its_deadline_runs_nothing_and_is_answered_the_same_again() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, mut rx) = runner(tmp.path());
        let deadline = rollback_common::now_unix_ms() - 5_000;
        let run = run_of(
            "late",
            vec![step("state.read", &[]), step("state.read", &[])],
            deadline,
        );
        runner.submit(run.clone()).await;
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::TimedOut as i32, "{r:?}");
        for s in &r.steps {
            assert_eq!(s.status, StepStatus::TimedOut as i32, "{r:?}");
            assert!(
                s.error.contains("deadline passed") && s.error.contains("nothing was run"),
                "{}",
                s.error
            );
            assert!(s.output_tail.is_empty(), "nothing ran");
        }
        let ago: u64 = r.steps[0]
            .error
            .split("deadline passed ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("ms in the error");
        assert!((5_000..60_000).contains(&ago), "{ago}");

        runner.submit(run).await;
        let again = result(&mut rx).await;
        assert!(again.from_journal, "answered from the journal");
        assert_eq!(again.status, StepStatus::TimedOut as i32);
        assert_eq!(again.steps[0].error, r.steps[0].error);
    }

    #[tokio::test]
    async fn the_deadline_stops_a_running_step_and_skips_the_rest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, mut rx) = runner_with(tmp.path(), &app_at(closed_port()));
        let started = std::time::Instant::now();
        let run = run_of(
            "deadline",
            vec![
                step(
                    "http.check",
                    &[
                        ("endpoint", "/readyz"),
                        ("retries", "600"),
                        ("interval_ms", "100"),
                    ],
                ),
                step("state.read", &[]),
            ],
            rollback_common::now_unix_ms() + 1_500,
        );
        runner.submit(run).await;
        let r = result(&mut rx).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "stopped at the deadline, not after 600 retries"
        );
        assert_eq!(r.status, StepStatus::TimedOut as i32, "{r:?}");
        assert_eq!(r.steps[0].status, StepStatus::TimedOut as i32);
        let error = &r.steps[0].error;
        assert!(
            error.contains("/readyz") && error.contains("attempt") && error.contains("deadline"),
            "{error}"
        );
        assert_eq!(r.steps[1].status, StepStatus::Skipped as i32, "{r:?}");
    }

    #[tokio::test]
    async fn http_check_stops_at_its_step_timeout() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, mut rx) = runner_with(tmp.path(), &app_at(closed_port()));
        let mut check = step(
            "http.check",
            &[
                ("endpoint", "/healthz"),
                ("retries", "600"),
                ("interval_ms", "100"),
            ],
        );
        check.timeout_secs = 1;
        let started = std::time::Instant::now();
        runner.submit(run_of("timeout", vec![check], 0)).await;
        let r = result(&mut rx).await;
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(r.steps[0].status, StepStatus::TimedOut as i32, "{r:?}");
        let error = &r.steps[0].error;
        assert!(
            error.contains("/healthz") && error.contains("attempt") && error.contains("last:"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_cancelled_http_check_is_cancelled_between_retries_and_mid_request() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Between retries: every attempt is refused at once.
        let (runner, mut rx) = runner_with(tmp.path(), &app_at(closed_port()));
        let check = || {
            step(
                "http.check",
                &[
                    ("endpoint", "/readyz"),
                    ("retries", "600"),
                    ("interval_ms", "200"),
                ],
            )
        };
        runner.submit(run_of("between", vec![check()], 0)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        runner.cancel("between");
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::Cancelled as i32, "{r:?}");
        assert_eq!(r.steps[0].status, StepStatus::Cancelled as i32, "{r:?}");

        // Mid-request: a server that accepts and never answers.
        let tmp = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let (runner, mut rx) = runner_with(tmp.path(), &app_at(port));
        runner
            .submit(run_of("mid", vec![check(), step("state.read", &[])], 0))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        runner.cancel("mid");
        let r = result(&mut rx).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "cancel is prompt, not at the end of the request"
        );
        assert_eq!(r.status, StepStatus::Cancelled as i32, "{r:?}");
        assert_eq!(r.steps[0].status, StepStatus::Cancelled as i32, "{r:?}");
        assert_eq!(r.steps[1].status, StepStatus::Cancelled as i32, "{r:?}");
        silent.abort();
    }

    /// The journal cannot be written (here: its temporary name is taken by a directory, which
    /// even root cannot replace with a file): the run is refused and nothing of it runs.
    #[tokio::test]
    async fn a_run_whose_journal_entry_cannot_be_written_runs_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let app = tmp.path().join("app");
        std::fs::create_dir(&app).expect("mkdir");
        std::fs::write(app.join(".env"), "BROKEN=1\n").expect("env");
        std::fs::write(app.join(".env.backup"), "GOOD=1\n").expect("backup");
        let (runner, mut rx) = runner_with(
            tmp.path(),
            &format!(
                "[app]\ndir = \"{0}\"\nenv_file = \"{0}/.env\"\nenv_backup = \"{0}/.env.backup\"\n",
                app.display()
            ),
        );
        std::fs::create_dir(tmp.path().join("runs/.unjournaled.tmp")).expect("block journal");
        let run = run_of(
            "unjournaled",
            vec![step("file.restore", &[("file", "env")])],
            0,
        );
        runner.submit(run.clone()).await;
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::Refused as i32, "{r:?}");
        let error = &r.steps[0].error;
        assert!(
            error.contains("journal") && error.contains("nothing was run"),
            "{error}"
        );
        assert_eq!(
            std::fs::read_to_string(app.join(".env")).expect("env"),
            "BROKEN=1\n",
            "the step did not run"
        );
        assert!(runner.lock_active().is_none(), "the host is free again");

        // With the journal writable again, the same run id runs (it was never recorded).
        std::fs::remove_dir(tmp.path().join("runs/.unjournaled.tmp")).expect("unblock");
        runner.submit(run).await;
        let r = result(&mut rx).await;
        assert_eq!(r.status, StepStatus::Succeeded as i32, "{r:?}");
        assert_eq!(
            std::fs::read_to_string(app.join(".env")).expect("env"),
            "GOOD=1\n"
        );
    }

    /// A duplicate of the run being accepted is not answered busy: only its result comes.
    #[tokio::test]
    async fn a_duplicate_of_the_run_being_accepted_is_not_answered_busy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, mut rx) = runner(tmp.path());
        *runner.lock_active() = Some(Active {
            run_id: "same".into(),
            cancel: CancellationToken::new(),
        });
        runner
            .submit(run_of("same", vec![step("state.read", &[])], 0))
            .await;
        *runner.lock_active() = None;
        runner
            .submit(run_of("next", vec![step("state.read", &[])], 0))
            .await;
        let r = result(&mut rx).await;
        assert_eq!(
            r.run_id, "next",
            "nothing was answered for the duplicate: {r:?}"
        );
    }
}
