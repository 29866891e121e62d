//! Runs a `RunProcedure` on this host: every step validated before anything is spawned, the
//! run journaled before it starts and at each step boundary, events streamed on the uplink,
//! stop at the first step that does not succeed, cancel on request. One run at a time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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

/// Cancels for not-yet-arrived runs that are remembered.
const EARLY_CANCELS_KEPT: usize = 64;
/// Output chunks larger than this are split (keeps gRPC messages small).
const MAX_CHUNK: usize = 16 * 1024;

/// How a run's steps are executed. `Noop` is the one hook for `rollback-agent --simulate`
/// (`crate::simulate`): validation, journal, events and results stay the real ones; only the
/// step's action is replaced by an immediate success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepExecution {
    Real,
    Noop,
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
        }
    }

    fn host(&self) -> &str {
        &self.config.host_id
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
        warn!(host = %self.host(), run = %run.run_id, error = %error, "refusing run");
        let finished = RunFinished {
            run_id: run.run_id.clone(),
            status: StepStatus::Refused as i32,
            steps: vec![StepFinished {
                status: StepStatus::Refused as i32,
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
        let cancel = CancellationToken::new();
        if self.take_early_cancel(&run.run_id) {
            info!(host = %host, run = %run.run_id, "run was cancelled before it arrived; nothing will run");
            cancel.cancel();
        }
        let busy = {
            let mut active = self.lock_active();
            match active.as_ref() {
                Some(a) => Some(format!(
                    "agent {host}: busy with run {}; one run at a time per host",
                    a.run_id
                )),
                None => {
                    *active = Some(Active {
                        run_id: run.run_id.clone(),
                        cancel: cancel.clone(),
                    });
                    None
                }
            }
        };
        if let Some(busy) = busy {
            return self.refuse(&run, busy).await;
        }

        let mut record = RunRecord {
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
        };
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
        let this = self.clone();
        let span = info_span!("run", host = %host, run = %run.run_id, job = %run.job_id);
        tokio::spawn(
            async move {
                this.execute(record, actions, run, cancel).await;
                *this.lock_active() = None;
                this.finished.notify_waiters();
            }
            .instrument(span),
        );
    }

    fn save(&self, record: &RunRecord) {
        if let Err(e) = self.journal.save(record) {
            error!(error = %e, "journal write failed");
        }
    }

    async fn execute(
        &self,
        mut record: RunRecord,
        actions: Vec<Action>,
        run: RunProcedure,
        cancel: CancellationToken,
    ) {
        let refused = actions.len() < record.steps.len();
        self.save(&record);
        let log_offset = self
            .config
            .app
            .as_ref()
            .and_then(|a| a.log_file.as_ref())
            .map(|p| actions::log_size(p));
        if !refused {
            for (i, action) in actions.iter().enumerate() {
                if cancel.is_cancelled() {
                    break;
                }
                record.steps[i].phase = Phase::Running;
                self.save(&record);
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
                let timeout = actions::timeout_for(&run.steps[i], &self.config);
                let mut ctx = StepCtx::new(&self.config, &mut sink, &cancel, timeout);
                ctx.log_offset = log_offset;
                let started = std::time::Instant::now();
                let result = match self.execution {
                    StepExecution::Real => actions::execute(action, ctx).await,
                    StepExecution::Noop => crate::simulate::noop_result(),
                };

                let step = &mut record.steps[i];
                step.exit_code = result.exit_code;
                step.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                step.truncated = result.output.truncated();
                step.output_tail = String::from_utf8_lossy(&result.output.render()).into_owned();
                step.facts = result.facts;
                let error = if result.error.is_empty() {
                    String::new()
                } else {
                    format!("agent {}: {}: {}", self.host(), step.action, result.error)
                };
                step.finish(result.status, error);
                info!(step = i, action = %step.action, status = ?result.status, exit_code = step.exit_code, duration_ms = step.duration_ms, "step finished");
                let finished = step.to_proto();
                self.save(&record);
                self.uplink
                    .send(step_event(
                        &run.run_id,
                        i,
                        step_event::Kind::Finished(finished),
                    ))
                    .await;
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
        info!(status = ?record.overall_status(), "run finished");
        self.uplink
            .send(msg(agent_message::Kind::RunFinished(
                record.to_proto(false),
            )))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollback_common::proto::{Step, agent_message};

    fn runner(dir: &std::path::Path) -> (Arc<Runner>, tokio::sync::mpsc::Receiver<AgentMessage>) {
        let config: Config = toml::from_str(&format!(
            "host_id = \"h1\"\ncoordinator = \"https://127.0.0.1:1\"\nstate_dir = \"{}\"\n[tls]\nca = \"x\"\ncert = \"x\"\nkey = \"x\"\n",
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
}
