//! `AgentGateway.Session`: the one long-lived stream each agent dials out to hold. The first
//! message must be a Hello whose host id equals the certificate's; then heartbeats keep the
//! agent's last-seen time fresh until the stream ends.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rollback_common::now_unix_ms;
use rollback_common::proto::agent_gateway_server::AgentGateway;
use rollback_common::proto::{
    Ack, AgentMessage, CoordinatorMessage, Hello, agent_message, coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use crate::authz::Principal;
use crate::registry::Registry;
use crate::store::{AgentRecord, Store};

/// How long an agent has to send Hello after opening its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued to one agent before the sender waits.
const OUTBOUND_QUEUE: usize = 64;
/// Heartbeats are written to the store at most this often per agent.
const SEEN_WRITE_INTERVAL_MS: i64 = 30_000;

pub struct Gateway {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
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

        let now = now_unix_ms();
        let record = agent_record(&hello, address.clone(), now);
        self.store.agent_connected(&record).await.map_err(|e| {
            warn!(host = %cert_host, error = %e, "store failed recording agent");
            Status::unavailable(format!("coordinator store unavailable: {e}"))
        })?;

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let ack = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Ack(Ack {
                heartbeat_interval_secs: self.heartbeat_interval_secs,
                coordinator_version: rollback_common::VERSION.to_string(),
            })),
        };
        // The channel is fresh, so this cannot be full.
        let _ = tx.try_send(Ok(ack));
        let (session_id, replaced) = self.registry.insert(&cert_host, tx, now);
        if replaced.is_some() {
            info!(host = %cert_host, "agent reconnected; replacing its previous session");
        }
        info!(host = %cert_host, address = %address, version = %hello.agent_version, "agent online");

        let store = self.store.clone();
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let span = info_span!("agent_session", host = %cert_host, session = session_id);
        self.tasks.spawn(
            async move {
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
                        Ok(Some(other)) => {
                            last_seen = now_unix_ms();
                            registry.touch(&cert_host, session_id, last_seen);
                            warn!(message = ?other.kind.map(|k| kind_name(&k)), "ignoring message this coordinator does not handle yet");
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
                if registry.remove_if_current(&cert_host, session_id) {
                    if let Err(e) = store.agent_disconnected(&cert_host, last_seen).await {
                        warn!(error = %e, "store failed recording disconnect");
                    }
                    info!("agent disconnected");
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn agent_record(hello: &Hello, address: String, now: i64) -> AgentRecord {
    AgentRecord {
        host_id: hello.host_id.clone(),
        labels: hello.labels.clone().into_iter().collect(),
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
