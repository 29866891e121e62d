//! One session with the coordinator: dial out over mTLS, send Hello, heartbeat, and read what
//! the coordinator sends until the stream ends or the agent shuts down. When `certwatch`
//! accepts a renewed certificate, the session ends itself once no run is running or being
//! accepted and every finished result is acknowledged (or `ACK_WAIT` passed): its side of
//! the stream is closed first and what the coordinator still sends is handled, so a run is
//! never cut off or dropped to reconnect with the new certificate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rollback_common::proto::agent_gateway_client::AgentGatewayClient;
use rollback_common::proto::{
    AgentMessage, Heartbeat, Hello, HostState, agent_message, coordinator_message,
};
use rollback_common::{MAX_MESSAGE_BYTES, now_unix_ms};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{debug, info};

/// Unacknowledged run ids listed in Hello (64 bytes each at most).
const MAX_RUNS_IN_HELLO: usize = 1024;
/// With a renewed certificate waiting, how long finished results may wait for their
/// acknowledgement before the session reconnects anyway (the journal re-sends them).
const ACK_WAIT: Duration = Duration::from_secs(30);
/// How long the coordinator has to close its side after the agent closed its own.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

use crate::certwatch::{CertWatch, Look};
use crate::config::Config;
use crate::coordinators::Target;
use crate::runner::Runner;
use crate::uplink::Uplink;

/// Why a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent is shutting down.
    Shutdown,
    /// The coordinator closed the stream (e.g. it is restarting).
    ClosedByCoordinator,
    /// A renewed certificate was accepted and the session was quiet: reconnect with it.
    Renewed,
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

/// One session with the coordinator at `target`: its address is dialled and its certificate
/// verified against `target.tls_name` (the URL's host name, not the address).
/// `on_established` is called once the coordinator acknowledged the session.
#[allow(clippy::too_many_arguments)]
pub async fn run_session(
    config: &Config,
    target: &Target,
    certs: &CertWatch,
    shutdown: &CancellationToken,
    runner: &Arc<Runner>,
    uplink: &Uplink,
    on_established: impl FnOnce(),
) -> Result<SessionEnd, SessionError> {
    let url = target.to_string();
    let endpoint = Endpoint::from_shared(format!("https://{}", target.addr))
        .and_then(|e| e.tls_config(certs.tls().domain_name(target.tls_name.clone())))
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
        state: Some(crate::state::gather(config, None).await),
        // Bounded so Hello always fits a message; the rest follow as results are acknowledged.
        journaled_runs: runner
            .unacked_runs()
            .into_iter()
            .take(MAX_RUNS_IN_HELLO)
            .map(|r| r.run_id)
            .collect(),
    };
    // The host's state as this session last reported it: a run that changed nothing sends
    // nothing (the coordinator would store the same state again).
    let reported = hello.state.clone();
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
        target,
        certs,
        shutdown,
        runner,
        uplink,
        &tx,
        &mut inbound,
        reported,
        on_established,
    )
    .await;
    uplink.detach();
    if matches!(result, Ok(SessionEnd::Renewed)) {
        drop(tx);
        finish_closing(shutdown, runner, &mut inbound).await;
    }
    result
}

/// After the agent closed its side: whatever the coordinator still sends is handled (a run
/// is accepted, never dropped; its result goes out on the next session) until it closes its
/// side, for at most `CLOSE_GRACE`.
async fn finish_closing(
    shutdown: &CancellationToken,
    runner: &Arc<Runner>,
    inbound: &mut tonic::Streaming<rollback_common::proto::CoordinatorMessage>,
) {
    let drain = async {
        while let Ok(Some(m)) = inbound.message().await {
            match m.kind {
                Some(coordinator_message::Kind::RunProcedure(run)) => {
                    info!(run = %run.run_id, job = %run.job_id, "run received while the session closes; accepted, its result goes out on the next session");
                    runner.spawn_submit(run);
                }
                Some(coordinator_message::Kind::Cancel(c)) => runner.cancel(&c.run_id),
                Some(coordinator_message::Kind::RunResultAck(a)) => runner.ack(&a.run_id),
                _ => {}
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = drain => {}
        () = tokio::time::sleep(CLOSE_GRACE) => debug!("coordinator did not close its side of the session in time"),
    }
}

/// A renewed certificate waiting for the session to be quiet.
#[derive(Debug, Default)]
struct PendingRenewal {
    /// Since when no run has been running or accepted.
    idle_since: Option<Instant>,
    /// The run the log last said the renewal waits for.
    told: Option<String>,
}

impl PendingRenewal {
    /// Whether the session may end now: no run running or being accepted, and every finished
    /// result acknowledged (or `ACK_WAIT` spent waiting for that).
    fn ready(&mut self, runner: &Runner) -> bool {
        if !runner.is_idle() {
            self.idle_since = None;
            let run = runner.active_run();
            if run.is_some() && run != self.told {
                info!(run = ?run, "renewed certificate waits for the run in progress to end");
                self.told = run;
            }
            return false;
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        !runner.has_unacked_results() || since.elapsed() >= ACK_WAIT
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &Config,
    target: &Target,
    certs: &CertWatch,
    shutdown: &CancellationToken,
    runner: &Arc<Runner>,
    uplink: &Uplink,
    tx: &mpsc::Sender<AgentMessage>,
    inbound: &mut tonic::Streaming<rollback_common::proto::CoordinatorMessage>,
    mut reported: Option<HostState>,
    on_established: impl FnOnce(),
) -> Result<SessionEnd, SessionError> {
    let mut heartbeat_every = Duration::from_secs(10);
    let mut established = Some(on_established);
    let mut ticker = tokio::time::interval(heartbeat_every);
    ticker.reset();
    let mut cert_ticker = tokio::time::interval(certs.every());
    cert_ticker.reset();
    let mut renewal: Option<PendingRenewal> = None;
    loop {
        if let Some(pending) = renewal.as_mut()
            && pending.ready(runner)
        {
            info!("reconnecting with the renewed certificate: no run in progress");
            return Ok(SessionEnd::Renewed);
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                info!("closing session: agent shutting down");
                return Ok(SessionEnd::Shutdown);
            }
            _ = cert_ticker.tick() => {
                if renewal.is_none() && certs.look() == Look::Renewed {
                    renewal = Some(PendingRenewal::default());
                }
            }
            _ = ticker.tick() => {
                let hb = Heartbeat { sent_at_unix_ms: now_unix_ms(), state: None };
                if tx.send(AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) }).await.is_err() {
                    return Ok(SessionEnd::ClosedByCoordinator);
                }
            }
            () = runner.finished.notified() => {
                // A run may have changed the host: report its state now rather than at the next
                // Hello (HEAD as its checkout read it, when it had one that succeeded), unless
                // it is what this session reported last.
                let state = crate::state::gather(config, runner.take_head_after()).await;
                let changed = reported.as_ref() != Some(&state);
                info!(changed, git_head = %state.git_head_sha, "host state after the run (sent to the coordinator if changed)");
                if !changed {
                    continue;
                }
                reported = Some(state.clone());
                let hb = Heartbeat { sent_at_unix_ms: now_unix_ms(), state: Some(state) };
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
                        info!(host = %config.host_id, coordinator = %target.url, addr = %target.addr, coordinator_version = %ack.coordinator_version, "session established");
                        if ack.heartbeat_interval_secs > 0 {
                            heartbeat_every = Duration::from_secs(u64::from(ack.heartbeat_interval_secs));
                            ticker = tokio::time::interval(heartbeat_every);
                            ticker.reset();
                        }
                    }
                    Some(coordinator_message::Kind::RunProcedure(run)) => {
                        info!(run = %run.run_id, job = %run.job_id, steps = run.steps.len(), "run received");
                        runner.spawn_submit(run);
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
