//! One session with the coordinator: dial out over mTLS, send Hello, heartbeat, and read what
//! the coordinator sends until the stream ends or the agent shuts down.

use std::sync::Arc;
use std::time::Duration;

use rollback_common::proto::agent_gateway_client::AgentGatewayClient;
use rollback_common::proto::{AgentMessage, Heartbeat, Hello, agent_message, coordinator_message};
use rollback_common::{MAX_MESSAGE_BYTES, now_unix_ms};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::{debug, info};

/// Unacknowledged run ids listed in Hello (64 bytes each at most).
const MAX_RUNS_IN_HELLO: usize = 1024;

use crate::config::Config;
use crate::runner::Runner;
use crate::uplink::Uplink;

/// Why a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent is shutting down.
    Shutdown,
    /// The coordinator closed the stream (e.g. it is restarting).
    ClosedByCoordinator,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("coordinator URL {url}: {source}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("coordinator refused the session: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("session with coordinator broke: {0}")]
    Stream(#[source] tonic::Status),
}

/// Called once the coordinator acknowledged the session (used to reset backoff).
pub async fn run_session(
    config: &Config,
    tls: &ClientTlsConfig,
    shutdown: &CancellationToken,
    runner: &Arc<Runner>,
    uplink: &Uplink,
    on_established: impl FnOnce(),
) -> Result<SessionEnd, SessionError> {
    let url = config.coordinator.clone();
    let endpoint = Endpoint::from_shared(url.clone())
        .and_then(|e| e.tls_config(tls.clone()))
        .map_err(|source| SessionError::Endpoint {
            url: url.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        c = endpoint.connect() => c.map_err(|source| SessionError::Connect { url: url.clone(), source })?,
    };
    let mut client = AgentGatewayClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let (tx, rx) = mpsc::channel::<AgentMessage>(256);
    let hello = Hello {
        host_id: config.host_id.clone(),
        labels: config.labels.clone().into_iter().collect(),
        agent_version: rollback_common::VERSION.to_string(),
        supported_actions: crate::actions::ACTIONS
            .iter()
            .map(|a| a.to_string())
            .collect(),
        state: Some(crate::state::gather(config).await),
        // Bounded so Hello always fits a message; the rest follow as results are acknowledged.
        journaled_runs: runner
            .unacked_runs()
            .into_iter()
            .take(MAX_RUNS_IN_HELLO)
            .map(|r| r.run_id)
            .collect(),
    };
    // Queued before the call so it is the first message on the stream; the channel is fresh.
    let _ = tx.try_send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    });

    let response = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        r = client.session(ReceiverStream::new(rx)) => r,
    };
    let mut inbound = response
        .map_err(|s| SessionError::Refused {
            code: s.code(),
            message: s.message().to_string(),
        })?
        .into_inner();

    let result = serve(
        config,
        shutdown,
        runner,
        uplink,
        &tx,
        &mut inbound,
        on_established,
    )
    .await;
    uplink.detach();
    result
}

async fn serve(
    config: &Config,
    shutdown: &CancellationToken,
    runner: &Arc<Runner>,
    uplink: &Uplink,
    tx: &mpsc::Sender<AgentMessage>,
    inbound: &mut tonic::Streaming<rollback_common::proto::CoordinatorMessage>,
    on_established: impl FnOnce(),
) -> Result<SessionEnd, SessionError> {
    let mut heartbeat_every = Duration::from_secs(10);
    let mut established = Some(on_established);
    let mut ticker = tokio::time::interval(heartbeat_every);
    ticker.reset();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                info!("closing session: agent shutting down");
                return Ok(SessionEnd::Shutdown);
            }
            _ = ticker.tick() => {
                let hb = Heartbeat { sent_at_unix_ms: now_unix_ms(), state: None };
                if tx.send(AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) }).await.is_err() {
                    return Ok(SessionEnd::ClosedByCoordinator);
                }
            }
            () = runner.finished.notified() => {
                // A run changed the host: report its state now rather than at the next Hello.
                let hb = Heartbeat { sent_at_unix_ms: now_unix_ms(), state: Some(crate::state::gather(config).await) };
                if tx.send(AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) }).await.is_err() {
                    return Ok(SessionEnd::ClosedByCoordinator);
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.kind {
                    Some(coordinator_message::Kind::Ack(ack)) => {
                        if let Some(f) = established.take() {
                            f();
                            uplink.attach(tx.clone());
                            runner.resend_unacked().await;
                        }
                        info!(coordinator_version = %ack.coordinator_version, "session established");
                        if ack.heartbeat_interval_secs > 0 {
                            heartbeat_every = Duration::from_secs(u64::from(ack.heartbeat_interval_secs));
                            ticker = tokio::time::interval(heartbeat_every);
                            ticker.reset();
                        }
                    }
                    Some(coordinator_message::Kind::RunProcedure(run)) => {
                        info!(run = %run.run_id, job = %run.job_id, steps = run.steps.len(), "run received");
                        let runner = runner.clone();
                        tokio::spawn(async move { runner.submit(run).await });
                    }
                    Some(coordinator_message::Kind::Cancel(c)) => runner.cancel(&c.run_id),
                    Some(coordinator_message::Kind::RunResultAck(a)) => runner.ack(&a.run_id),
                    None => debug!("empty message from coordinator"),
                },
                Ok(None) => return Ok(SessionEnd::ClosedByCoordinator),
                Err(status) => return Err(SessionError::Stream(status)),
            },
        }
    }
}
