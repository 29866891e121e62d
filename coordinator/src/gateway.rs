//! `AgentGateway.Session`: the one long-lived stream each agent dials out to hold. The first
//! message must be a Hello whose host id equals the certificate's; then heartbeats keep the
//! agent's last-seen time fresh until the stream ends.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rollback_common::now_unix_ms;
use rollback_common::proto::agent_gateway_server::AgentGateway;
use rollback_common::proto::{
    Ack, AgentMessage, CoordinatorMessage, ExecEvent, Hello, RunFinished, RunProcedure,
    RunResultAck, agent_message, coordinator_message, exec_event,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::authz::Principal;
use crate::registry::{AgentSender, Registry};
use crate::runs::RunHub;
use crate::store::{AgentRecord, AuditEvent, ResultTaken, Store, label_mismatch};

/// How long an agent has to send Hello after opening its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued to one agent before the sender waits.
const OUTBOUND_QUEUE: usize = 64;
/// Heartbeats are written to the store at most this often per agent.
const SEEN_WRITE_INTERVAL_MS: i64 = 30_000;

pub struct Gateway {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub hub: Arc<RunHub>,
    pub cluster: Arc<crate::cluster::Cluster>,
    pub heartbeat_interval_secs: u32,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

#[tonic::async_trait]
impl AgentGateway for Gateway {
    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no principal"))?;
        let address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let cert_host = principal.identity.name.clone();
        let mut inbound = request.into_inner();

        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => {
                warn!(host = %cert_host, "refused session: first message was not Hello");
                return Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                ));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                warn!(host = %cert_host, "refused session: no Hello within {HELLO_TIMEOUT:?}");
                return Err(Status::deadline_exceeded("no Hello received in time"));
            }
        };
        if hello.host_id != cert_host {
            warn!(
                cert_host = %cert_host,
                claimed_host = %hello.host_id,
                peer = %principal.identity,
                "refused session: hello claims host id `{}` but the certificate is for `{}`",
                hello.host_id,
                cert_host
            );
            return Err(Status::permission_denied(format!(
                "hello claims host id `{}` but the certificate is for `{cert_host}`",
                hello.host_id
            )));
        }

        // Every step from here on has an effect (the store's row, the registry, the
        // announcement to peers), so it runs in a task of its own: tonic drops this handler
        // when the agent's connection goes away mid-call, and a registration cut half-way
        // would leave the host listed online with no session behind it. The task always ends
        // by undoing what it did.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let session = Session {
            store: self.store.clone(),
            registry: self.registry.clone(),
            hub: self.hub.clone(),
            cluster: self.cluster.clone(),
            shutdown: self.shutdown.clone(),
            heartbeat_interval_secs: self.heartbeat_interval_secs,
        };
        self.tasks.spawn(session.run(
            cert_host,
            address,
            hello,
            principal.cert_not_after_unix,
            inbound,
            ready_tx,
        ));
        match ready_rx.await {
            Ok(answer) => answer.map(Response::new),
            Err(_) => Err(Status::internal(
                "the session ended before the coordinator answered its Hello",
            )),
        }
    }
}

/// What one agent session's task needs of the gateway.
struct Session {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    hub: Arc<RunHub>,
    cluster: Arc<crate::cluster::Cluster>,
    shutdown: CancellationToken,
    heartbeat_interval_secs: u32,
}

type Answer = Result<ReceiverStream<Result<CoordinatorMessage, Status>>, Status>;

impl Session {
    /// Registers the agent, answers the handler through `ready` (the outbound stream, or why
    /// not), then serves the session until it ends and records its end. Runs to the end even
    /// when the handler is gone (its client went away): the inbound stream then ends at once.
    async fn run(
        self,
        cert_host: String,
        address: String,
        hello: Hello,
        cert_not_after_unix: Option<i64>,
        mut inbound: Streaming<AgentMessage>,
        ready: tokio::sync::oneshot::Sender<Answer>,
    ) {
        let Session {
            store,
            registry,
            hub,
            cluster,
            shutdown,
            heartbeat_interval_secs,
        } = self;
        let now = now_unix_ms();
        let mut record = agent_record(&hello, address.clone(), now);
        record.coordinator.clone_from(&cluster.me.name);
        record.cert_not_after_ms = cert_not_after_unix.map(|s| s.saturating_mul(1000));
        warn_if_certificate_expires_soon(&cert_host, cert_not_after_unix);
        if let Err(e) = store.agent_connected(&record).await {
            warn!(host = %cert_host, error = %e, "store failed recording agent");
            let _ = ready.send(Err(Status::unavailable(format!(
                "coordinator store unavailable: {e}"
            ))));
            return;
        }
        let inventory = match store.inventory(&cert_host).await {
            Ok(inventory) => inventory,
            Err(e) => {
                warn!(host = %cert_host, error = %e, "store failed reading the inventory");
                // Recorded online a moment ago, with no session: not any more.
                if let Err(e) = store
                    .agent_released(&cert_host, now, &cluster.me.name)
                    .await
                {
                    warn!(host = %cert_host, error = %e, "store failed recording disconnect");
                }
                let _ = ready.send(Err(Status::unavailable(format!(
                    "coordinator store unavailable: {e}"
                ))));
                return;
            }
        };
        let mismatch = label_mismatch(&inventory.effective(), &record.reported_labels);
        if !mismatch.is_empty() {
            warn!(
                host = %cert_host,
                mismatch = %mismatch.join("; "),
                "agent reports labels that differ from the inventory; targeting uses the inventory (`rollbackctl agents label` changes it)"
            );
        }

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let ack = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Ack(Ack {
                heartbeat_interval_secs,
                coordinator_version: rollback_common::VERSION.to_string(),
            })),
        };
        // The channel is fresh, so this cannot be full.
        let _ = tx.try_send(Ok(ack));
        let session_tx = tx.clone();
        let (session_id, replaced) = registry.insert(&cert_host, tx, now);
        if replaced.is_some() {
            info!(host = %cert_host, "agent reconnected; replacing its previous session");
        }
        info!(host = %cert_host, address = %address, version = %hello.agent_version, "agent online");
        cluster.agent_online(&cert_host).await;
        // A handler that is gone drops the outbound stream with this answer: the session
        // below then ends at its first read, and is recorded ended.
        let _ = ready.send(Ok(ReceiverStream::new(rx)));

        let span = info_span!("agent_session", host = %cert_host, session = session_id);
        async move {
            // Here, not before the answer: the outbound stream is only drained once the
            // handler has returned it.
            redeliver_unfinished_runs(&*store, &hub, &session_tx, &cert_host).await;
            let mut last_written = now;
            let mut last_seen = now;
            loop {
                let msg = tokio::select! {
                    () = shutdown.cancelled() => break,
                    msg = inbound.message() => msg,
                };
                match msg {
                    Ok(Some(AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) })) => {
                        last_seen = now_unix_ms();
                        registry.touch(&cert_host, session_id, last_seen);
                        let state = hb.state.map(|s| s.encode_to_vec());
                        if state.is_some() || last_seen - last_written >= SEEN_WRITE_INTERVAL_MS {
                            if let Err(e) = store.agent_seen(&cert_host, last_seen, state.as_deref()).await {
                                warn!(error = %e, "store failed recording heartbeat");
                            }
                            last_written = last_seen;
                        }
                    }
                    Ok(Some(AgentMessage { kind: Some(agent_message::Kind::StepEvent(event)) })) => {
                        last_seen = now_unix_ms();
                        registry.touch(&cert_host, session_id, last_seen);
                        let run_id = event.run_id.clone();
                        cluster.step_event(&cert_host, &event).await;
                        hub.publish(&cert_host, &run_id, ExecEvent { kind: Some(exec_event::Kind::StepEvent(event)) });
                    }
                    Ok(Some(AgentMessage { kind: Some(agent_message::Kind::RunFinished(finished)) })) => {
                        last_seen = now_unix_ms();
                        registry.touch(&cert_host, session_id, last_seen);
                        if let Err(refused) = record_run_result(&*store, &hub, &cluster, &session_tx, &cert_host, finished).await {
                            let _ = session_tx.send(Err(refused)).await;
                            break;
                        }
                    }
                    Ok(Some(other)) => {
                        last_seen = now_unix_ms();
                        registry.touch(&cert_host, session_id, last_seen);
                        warn!(message = ?other.kind.map(|k| kind_name(&k)), "ignoring unexpected message");
                    }
                    Ok(None) => {
                        info!("agent closed its session");
                        break;
                    }
                    Err(status) => {
                        info!(error = %status.message(), "agent session ended");
                        break;
                    }
                }
            }
            drop(session_tx);
            if registry.remove_if_current(&cert_host, session_id) {
                hub.host_gone(&cert_host);
                // Offline only if no other coordinator holds it by now.
                if let Err(e) = store.agent_released(&cert_host, last_seen, &cluster.me.name).await {
                    warn!(error = %e, "store failed recording disconnect");
                }
                cluster.agent_gone(&cert_host).await;
                info!("agent disconnected");
            }
        }
        .instrument(span)
        .await;
    }
}

/// Dispatch is at-least-once: every run of this host that this process dispatched, whose job is
/// still running and whose result is not recorded, is sent again.
/// The agent's journal makes execution exactly-once (a finished run returns its journaled
/// result; a run it never received runs now).
async fn redeliver_unfinished_runs(
    store: &dyn Store,
    hub: &RunHub,
    session: &AgentSender,
    host: &str,
) {
    let runs = match store.unfinished_runs(host).await {
        Ok(runs) => runs,
        Err(e) => return warn!(host = %host, error = %e, "store failed listing unfinished runs"),
    };
    for run in runs {
        if !hub.is_pending(&run.run_id) {
            // Dispatched by an earlier coordinator process, or its job has ended: starting it
            // now could act on a host nobody is rolling back any more. If the agent ran it, its
            // journal re-sends the result by itself.
            continue;
        }
        match RunProcedure::decode(run.procedure.as_slice()) {
            Ok(procedure) => {
                info!(host = %host, run = %run.run_id, "re-sending run without a recorded result");
                let msg = CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::RunProcedure(procedure)),
                };
                if session.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(host = %host, run = %run.run_id, error = %e, "stored run is unreadable; not re-sent")
            }
        }
    }
}

/// Persists a run's result, then acknowledges it to the agent (which stops re-sending it),
/// then tells watchers. Without a durable write (the result with its audit record) there is no
/// ack and no watcher is told: the session ends and the agent re-sends it when it reconnects.
/// A result for a run that was sent to another host ends the session (`PermissionDenied`):
/// nothing is recorded or released.
async fn record_run_result(
    store: &dyn Store,
    hub: &RunHub,
    cluster: &crate::cluster::Cluster,
    session: &AgentSender,
    host: &str,
    finished: RunFinished,
) -> Result<(), Status> {
    let run_id = finished.run_id.clone();
    if finished.status == rollback_common::proto::StepStatus::Busy as i32 {
        // Not a result: the agent journaled nothing and the same run will be sent again.
        // (Watchers are per host: a busy answer from another host reaches and ends nobody's.)
        info!(run = %run_id, "agent busy with another run; the run is not recorded as finished");
        if !hub.has_watch(&run_id) {
            cluster.run_finished(host, &run_id, Some(&finished)).await;
        }
        hub.hand_over(host, &run_id, finished);
        return Ok(());
    }
    let now = now_unix_ms();
    let audit = AuditEvent {
        at_ms: now,
        actor: format!("agent/{host}"),
        action: "run.finished".into(),
        target: format!("run/{run_id}"),
        detail: format!(
            "status={} from_journal={}",
            finished.status, finished.from_journal
        ),
    };
    let encoded = finished.encode_to_vec();
    // The result and its audit record are one transaction.
    let stored = store
        .finish_run(&run_id, host, finished.status, now, &encoded, &audit)
        .await;
    match stored {
        Ok(ResultTaken::OtherHost(owner)) => {
            warn!(run = %run_id, owner = %owner, "refused a result for a run that was sent to another host; session closed");
            return Err(Status::permission_denied(format!(
                "run {run_id} was sent to {owner}, not to {host}: a result speaks only for its own host"
            )));
        }
        Ok(taken) => {
            hub.resolved(&run_id);
            if matches!(taken, ResultTaken::Recorded) {
                crate::metrics::run_finished(&finished);
            }
            match taken {
                ResultTaken::UnknownRun => {
                    warn!(run = %run_id, "result for a run this coordinator has no record of; acknowledging so the agent stops re-sending")
                }
                ResultTaken::AlreadyRecorded => {
                    info!(run = %run_id, "result already recorded; the first one stands")
                }
                _ => {}
            }
            let ack = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::RunResultAck(RunResultAck {
                    run_id: run_id.clone(),
                })),
            };
            if session.send(Ok(ack)).await.is_err() {
                warn!(run = %run_id, "could not acknowledge the result; the agent will re-send it");
            }
            // One line per host at debug: a 10,000-host job's results were 10,000 lines at
            // info, past journald's default burst (10,000 in 30 s), so lines that matter were
            // suppressed with them. The job's events record every result; a result sent again
            // from the journal (after a session dropped) is still worth an operator's eye.
            if finished.from_journal {
                info!(run = %run_id, status = finished.status, "run result recorded (sent again from the agent's journal)");
            } else {
                debug!(run = %run_id, status = finished.status, "run result recorded");
            }
        }
        // Not stored, so not taken: no ack, and nobody waiting is told (a job must not go on
        // from a result the store and the audit trail do not have). The session ends, so the
        // agent reconnects and sends the result again from its journal.
        Err(e) => {
            error!(host = %host, run = %run_id, error = %e, "could not store the run's result with its audit record; not acknowledged, ending the session so the agent sends it again");
            return Err(Status::unavailable(format!(
                "the coordinator could not store the result of run {run_id} from {host} ({e}); reconnect and send it again"
            )));
        }
    }
    // Dispatched by another coordinator: it reads the stored result.
    if !hub.has_watch(&run_id) {
        cluster.run_finished(host, &run_id, None).await;
    }
    hub.hand_over(host, &run_id, finished);
    Ok(())
}

/// Gives a run's end to whoever waits for it, then drops its watchers.
/// Logs a warning at session start for an agent whose certificate expires within
/// `WARN_WITHIN_DAYS` (the same rule as `rollbackctl agents` and `pki list`).
fn warn_if_certificate_expires_soon(host: &str, not_after_unix: Option<i64>) {
    use rollback_common::expiry::{self, Expiry};
    let Some(not_after) = not_after_unix else {
        return;
    };
    let state = Expiry::at(not_after, expiry::now_unix());
    if let Some(mark) = state.mark() {
        warn!(
            host = %host,
            not_after = %expiry::format_unix(not_after),
            days_left = state.days_left(),
            "agent certificate {mark}: renew it with `rollbackctl pki renew agent {host}`; the agent picks the new pair up without a restart"
        );
    }
}

fn agent_record(hello: &Hello, address: String, now: i64) -> AgentRecord {
    AgentRecord {
        host_id: hello.host_id.clone(),
        // What the agent claims is kept as a reported fact; targeting uses the inventory.
        labels: Default::default(),
        reported_labels: hello.labels.clone().into_iter().collect(),
        agent_version: hello.agent_version.clone(),
        address,
        online: true,
        connected_at_ms: now,
        last_seen_ms: now,
        state: hello
            .state
            .as_ref()
            .map(Message::encode_to_vec)
            .unwrap_or_default(),
        cert_not_after_ms: None,
        coordinator: String::new(),
    }
}

fn kind_name(kind: &agent_message::Kind) -> &'static str {
    match kind {
        agent_message::Kind::Hello(_) => "hello",
        agent_message::Kind::Heartbeat(_) => "heartbeat",
        agent_message::Kind::StepEvent(_) => "step_event",
        agent_message::Kind::RunFinished(_) => "run_finished",
    }
}
