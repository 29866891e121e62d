//! rollback-coordinator: agents dial in over mTLS and hold a session; operators use the
//! Console service on the same port. `run` serves until `shutdown` resolves, then drains
//! sessions within the configured grace period. TLS is our own acceptor (`acceptor`), so the
//! CRL can be reloaded and revoked connections closed without a restart. Beside the two
//! services: the gRPC health service (same port, same authz), Prometheus metrics on a
//! listener of their own (`metrics`), webhooks (`notify`) and SIGHUP reload (`reload`).

mod acceptor;
mod audit;
pub mod authz;
mod cluster;
pub mod config;
mod console;
mod dispatch;
mod exec;
mod gateway;
mod inventory;
pub mod jobs;
mod live_conns;
mod metrics;
pub mod notify;
mod peer_conn;
mod refusal;
pub mod registry;
mod reload;
mod revocation;
mod runs;
pub mod store;
mod watchers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rollback_common::identity::Role;
use rollback_common::proto::agent_gateway_server::AgentGatewayServer;
use rollback_common::proto::console_server::ConsoleServer;
use rollback_common::tls::TlsError;
use rollback_common::{MAX_CONSOLE_ANSWER_BYTES, MAX_MESSAGE_BYTES};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;

use crate::authz::{AuthzLayer, Policy};
use crate::registry::Registry;
use crate::store::{Opened, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{path}: the coordinator needs a coordinator certificate, this one is for {found}")]
    WrongCertificateRole { path: String, found: String },
    #[error(transparent)]
    Revocation(#[from] revocation::RevocationError),
    #[error("installing the SIGHUP handler (configuration and CRL reload): {0}")]
    Signal(#[source] std::io::Error),
    #[error("binding metrics_listen {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Webhook(#[from] notify::WebhookError),
    #[error("runbook {path}: {reason}")]
    Runbook { path: String, reason: String },
    #[error(transparent)]
    Register(#[from] cluster::peers::RegisterError),
    #[error("recovering jobs: {0}")]
    Recover(String),
    #[error("serving gRPC: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Serves agents and operators on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let own = config.tls.own_identity()?;
    if own.role != Role::Coordinator {
        return Err(CoordinatorError::WrongCertificateRole {
            path: config.tls.cert.display().to_string(),
            found: own.to_string(),
        });
    }
    let tls = Arc::new(revocation::TlsState::load(
        &config.tls,
        config.crl.as_deref(),
    )?);
    raise_open_files_limit();
    info!(database = %config.database, "opening the store");
    let opened = Opened::open(&config.database).await?;
    let store = opened.shared();
    let pg_pool = opened.pg_pool();
    let bus: Arc<dyn cluster::bus::Bus> = match &pg_pool {
        Some(pool) => Arc::new(cluster::pg_bus::PgBus::start(pool.clone())),
        None => Arc::new(cluster::bus::Alone),
    };
    let bound = listener.local_addr().unwrap_or(config.listen);
    // By default the certificate's name and the port actually bound (`listen` may say 0).
    let name = config
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", own.name, bound.port()));
    let listen_addr = bound.to_string();
    let me = store::cluster::Owner {
        name: name.clone(),
        instance: cluster::peers::instance_id(&exec::new_id()),
    };
    let lease = Duration::from_secs(config.job_lease_secs);
    let registry = Arc::new(Registry::default());
    let hub = Arc::new(runs::RunHub::default());
    let cluster = cluster::Cluster::new(
        me,
        config.advertise.clone().unwrap_or(listen_addr),
        lease,
        store.clone(),
        registry.clone(),
        hub.clone(),
        bus,
    );
    cluster::peers::register(&cluster, rollback_common::VERSION).await?;
    info!(name = %name, shared = cluster.shared(), "coordinator registered in the store");
    let reset = store.mark_disconnected_held_by(&name).await?;
    if reset > 0 {
        info!(
            agents = reset,
            "marked agents from the previous run disconnected until they reconnect"
        );
    }
    let synced = sync_inventory(store.as_ref(), &config.inventory).await?;
    if synced {
        info!(
            hosts = config.inventory.len(),
            "inventory labels from coordinator.toml changed; recorded in the audit trail"
        );
    }
    let policy = Arc::new(Policy::new(
        own.trust_domain.clone(),
        config.operators.clone(),
    ));

    let (runbook, runbook_source) = load_runbook(&config)?;
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let notifier = Arc::new(notify::Notifier::new(
        store.clone(),
        name.clone(),
        cancel.clone(),
    ));
    notifier.replace(notify::Targets::from_config(
        &config.webhooks,
        config::read_secret_file,
    )?);
    let jobs = Arc::new(jobs::Jobs::new(
        store.clone(),
        cluster.clone(),
        hub.clone(),
        jobs::Settings {
            runbook: Arc::new(runbook),
            runbook_source,
            approval: config.approval.clone(),
        },
        notifier,
        Duration::from_secs(config.unreachable_after_secs),
        tasks.clone(),
        cancel.clone(),
    ));
    cluster.attach_jobs(&jobs);
    jobs.resume_after_restart()
        .await
        .map_err(|s| CoordinatorError::Recover(s.message().to_string()))?;
    jobs.watch_approvals()
        .await
        .map_err(|s| CoordinatorError::Recover(s.message().to_string()))?;
    tasks.spawn(cluster::leases::run(
        cluster.clone(),
        jobs.clone(),
        cancel.clone(),
    ));
    if let Some(pool) = pg_pool {
        tasks.spawn(cluster::pg_bus::listen(
            pool,
            cluster.clone(),
            cancel.clone(),
        ));
    }
    let gateway = gateway::Gateway {
        store: store.clone(),
        registry: registry.clone(),
        hub: hub.clone(),
        cluster: cluster.clone(),
        heartbeat_interval_secs: config.heartbeat_interval_secs,
        shutdown: cancel.clone(),
        tasks: tasks.clone(),
    };
    let console = console::ConsoleService {
        store: store.clone(),
        registry: registry.clone(),
        cluster: cluster.clone(),
        hub,
        jobs: jobs.clone(),
        lost_after: config.lost_after(),
        watchers: watchers::Watchers::new(config.max_watchers_per_operator),
    };

    let live = Arc::new(live_conns::LiveConns::new(
        config.max_connections_per_identity,
    ));
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(CoordinatorError::Signal)?;
    let crl_reload = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(revocation::watch(
        tls.clone(),
        live.clone(),
        (config.crl_poll_secs > 0).then(|| Duration::from_secs(config.crl_poll_secs)),
        crl_reload.clone(),
        cancel.clone(),
    ));
    if let Some(source) = config.source.clone() {
        let reloader = reload::Reloader {
            source,
            policy: policy.clone(),
            jobs: jobs.clone(),
            store: store.clone(),
            crl: crl_reload,
            current: config.clone(),
        };
        tokio::spawn(reloader.run(hangup, cancel.clone()));
    } else {
        // Built in code, not read from a file: SIGHUP reloads only the CRL.
        tokio::spawn(async move {
            let mut hangup = hangup;
            while hangup.recv().await.is_some() {
                crl_reload.notify_one();
            }
        });
    }
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr)
            .await
            .map_err(|source| CoordinatorError::Metrics { addr, source })?;
        info!(addr = ?listener.local_addr().ok(), "metrics listening (GET /metrics)");
        tasks.spawn(metrics::serve(
            listener,
            metrics::Sources {
                registry: registry.clone(),
                live: live.clone(),
                store: store.clone(),
            },
            tasks.clone(),
            cancel.clone(),
        ));
    }
    let incoming = acceptor::Acceptor {
        tls,
        live,
        handshake_timeout: Duration::from_secs(config.tls_handshake_timeout_secs),
        max_in_flight: config.max_handshakes_in_flight,
    };

    let addr = listener.local_addr().ok();
    let incoming = incoming.incoming(listener, cancel.clone());
    info!(addr = ?addr, identity = %own, "coordinator listening");
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let cancel_on_signal = cancel.clone();
    let (mut health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AgentGatewayServer<gateway::Gateway>>()
        .await;
    health
        .set_serving::<ConsoleServer<console::ConsoleService>>()
        .await;
    let signal = async move {
        shutdown.await;
        // Load balancers and probes hear it first; then their watches end so they do not
        // hold the graceful shutdown for its whole grace period.
        for service in health_names() {
            health
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
        info!("shutting down: health set to NOT_SERVING; closing agent sessions");
        tokio::task::yield_now().await;
        for service in health_names() {
            health.clear_service_status(service).await;
        }
        cancel_on_signal.cancel();
    };

    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .layer(AuthzLayer::new(policy))
        .add_service(health_service)
        .add_service(
            AgentGatewayServer::new(gateway)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ConsoleServer::new(console)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_CONSOLE_ANSWER_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, signal);

    let serve_cancel = cancel.clone();
    let served = tokio::select! {
        r = server => r.map_err(CoordinatorError::Serve),
        // The server's graceful shutdown waits for every connection; bound it.
        () = async { serve_cancel.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!(grace = ?grace, "grace period over; closing remaining connections");
            Ok(())
        }
    };
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(
            remaining = tasks.len(),
            "grace period over before every session was recorded closed"
        );
    }
    if tokio::time::timeout(grace, cluster.flush()).await.is_err() {
        warn!("grace period over before every message to the other coordinators was sent");
    }
    cluster::peers::leave(&cluster).await;
    opened.close().await;
    info!("coordinator stopped");
    served
}

/// The names the health service answers for: the whole server ("") and both services.
fn health_names() -> [&'static str; 3] {
    use tonic::server::NamedService;
    [
        "",
        <AgentGatewayServer<gateway::Gateway> as NamedService>::NAME,
        <ConsoleServer<console::ConsoleService> as NamedService>::NAME,
    ]
}

/// Puts coordinator.toml's `[inventory]` in the store; true when it changed (recorded in the
/// audit trail).
pub(crate) async fn sync_inventory(
    store: &dyn store::Store,
    inventory: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
) -> Result<bool, StoreError> {
    store
        .sync_config_inventory(
            inventory,
            &store::AuditEvent {
                at_ms: rollback_common::now_unix_ms(),
                actor: "coordinator.toml".into(),
                action: "inventory.config_loaded".into(),
                target: format!("{} hosts", inventory.len()),
                detail: inventory_summary(inventory),
            },
        )
        .await
}

/// `app1: migrator=true,role=web; db1: role=db` for the audit record of a config inventory.
fn inventory_summary(
    inventory: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
) -> String {
    inventory
        .iter()
        .map(|(host, labels)| {
            let kv: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{host}: {}", kv.join(","))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every client connection holds a descriptor: take the whole hard limit the system allows.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => warn!(soft, hard, error = %e, "could not raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not read the open files limit"),
    }
}

/// The runbook from `runbook = "..."` in the config, or the built-in seed runbook.
pub(crate) fn load_runbook(
    config: &Config,
) -> Result<(rollback_common::runbook::Runbook, String), CoordinatorError> {
    use rollback_common::runbook::Runbook;
    let Some(path) = &config.runbook else {
        return Ok((Runbook::seed(), "built-in".into()));
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| CoordinatorError::Runbook {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let runbook = Runbook::parse(&text).map_err(|e| CoordinatorError::Runbook {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    info!(runbook = %shown, procedures = runbook.procedures.len(), "loaded custom runbook");
    Ok((runbook, shown))
}
