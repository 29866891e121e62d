//! Several coordinators on one store. Each holds the sessions of some agents and owns (drives)
//! some jobs; everything else goes through the store and the `bus`:
//! - a run for a host held elsewhere is stored, then its holder is told (`Deliver`) and sends
//!   it; the holder stores the result and tells the others (`Finished`), and the dispatching
//!   owner reads it from the store; step events travel the same way (`Step`);
//! - an agent coming online or going away is announced, so runs waiting for it are sent again;
//! - a job's events are stored by its owner, then announced (`JobEvents`), so a watch on any
//!   coordinator follows the store;
//! - job ownership is a lease in the store (`leases`): renewed by the owner, taken over by
//!   another coordinator when it lapses, exactly as a restarted coordinator resumes.
//!
//! With a SQLite store the bus is `Alone` and every host is held here: the cluster is this
//! process and nothing is sent anywhere.

pub mod bus;
pub mod leases;
pub mod peers;
pub mod pg_bus;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use prost::Message as _;
use rollback_common::now_unix_ms;
use rollback_common::proto::{
    Cancel, CoordinatorMessage, ExecEvent, RunFinished, RunProcedure, StepEvent,
    coordinator_message, exec_event,
};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::dispatch::{DispatchError, stored_procedure};
use crate::jobs::Jobs;
use crate::registry::{LiveSession, Registry};
use crate::runs::RunHub;
use crate::store::cluster::Owner;
use crate::store::{RunRow, Store};
use bus::{Bus, Envelope, Message, b64, unb64};

/// Where a host's session is.
#[derive(Debug, Clone)]
pub enum Holder {
    Here(LiveSession),
    /// Another live coordinator, by name.
    Peer(String),
}

pub struct Cluster {
    pub me: Owner,
    /// Where peers and operators reach this coordinator.
    pub address: String,
    pub lease: Duration,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    hub: Arc<RunHub>,
    bus: Arc<dyn Bus>,
    /// Job ids whose new events are stored (by this process or a peer).
    stored: broadcast::Sender<String>,
    jobs: OnceLock<Weak<Jobs>>,
    /// The runs this process waited for at the last `sweep_overdue`.
    waited: std::sync::Mutex<HashSet<String>>,
}

impl Cluster {
    pub fn new(
        me: Owner,
        address: String,
        lease: Duration,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        hub: Arc<RunHub>,
        bus: Arc<dyn Bus>,
    ) -> Arc<Self> {
        let (stored, _) = broadcast::channel(4096);
        Arc::new(Self {
            me,
            address,
            lease,
            store,
            registry,
            hub,
            bus,
            stored,
            jobs: OnceLock::new(),
            waited: std::sync::Mutex::default(),
        })
    }

    /// Other coordinators may share the store.
    pub fn shared(&self) -> bool {
        self.bus.shared()
    }

    pub fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    pub fn attach_jobs(&self, jobs: &Arc<Jobs>) {
        let _ = self.jobs.set(Arc::downgrade(jobs));
    }

    async fn publish(&self, msg: Message) {
        if self.shared() {
            self.bus
                .publish(Envelope {
                    from: self.me.instance.clone(),
                    msg,
                })
                .await;
        }
    }

    /// Returns once the messages published so far have been sent: at shutdown, before the
    /// store's connections close (a session ended by the shutdown is announced to the peers).
    pub async fn flush(&self) {
        self.bus.flush().await;
    }

    /// Wakes watches following `job_id` from the store, here and on every peer.
    pub async fn events_stored(&self, job_id: &str) {
        let _ = self.stored.send(job_id.to_string());
        self.publish(Message::JobEvents {
            job_id: job_id.to_string(),
        })
        .await;
    }

    pub fn subscribe_stored(&self) -> broadcast::Receiver<String> {
        self.stored.subscribe()
    }

    /// Where `host`'s session is, if anywhere.
    pub async fn holder(&self, host: &str) -> Option<Holder> {
        if let Some(s) = self.registry.get(host) {
            return Some(Holder::Here(s));
        }
        if !self.shared() {
            return None;
        }
        match self
            .store
            .agent_holder(host, &self.me.name, now_unix_ms(), self.lease_ms())
            .await
        {
            Ok(peer) => peer.map(Holder::Peer),
            Err(e) => {
                warn!(host = %host, error = %e, "store failed looking up the agent's coordinator");
                None
            }
        }
    }

    pub async fn online(&self, host: &str) -> bool {
        self.holder(host).await.is_some()
    }

    /// Every host with a session here or at a live peer.
    pub async fn online_hosts(&self) -> HashSet<String> {
        let mut out: HashSet<String> = HashSet::new();
        if self.shared() {
            let now = now_unix_ms();
            let live: HashSet<String> = match self.store.list_coordinators().await {
                Ok(rows) => rows
                    .into_iter()
                    .filter(|c| c.alive(now, self.lease_ms()))
                    .map(|c| c.name)
                    .collect(),
                Err(e) => {
                    warn!(error = %e, "store failed listing coordinators");
                    HashSet::new()
                }
            };
            if let Ok(agents) = self.store.list_agents().await {
                // A row naming this process counts only through the registry below, as in
                // `holder`: the row is written before the session is registered, and a host
                // listed online must be one an exec or a run can reach.
                out.extend(
                    agents
                        .into_iter()
                        .filter(|a| {
                            a.online
                                && a.coordinator != self.me.name
                                && live.contains(&a.coordinator)
                        })
                        .map(|a| a.host_id),
                );
            }
        }
        out.extend(self.registry.hosts());
        out
    }

    /// Sends a stored run to `host`, wherever its session is.
    pub async fn send_run(
        &self,
        host: &str,
        procedure: &RunProcedure,
    ) -> Result<(), DispatchError> {
        match self.holder(host).await {
            Some(Holder::Here(session)) => send_procedure(&session, host, procedure).await,
            Some(Holder::Peer(peer)) => {
                debug!(host = %host, peer = %peer, run = %procedure.run_id, "run delivered by the coordinator holding the host");
                self.publish(Message::Deliver {
                    host: host.to_string(),
                    run_id: procedure.run_id.clone(),
                })
                .await;
                Ok(())
            }
            None => Err(DispatchError::Offline {
                host: host.to_string(),
            }),
        }
    }

    /// Passes a cancel for `run_id` to `host`, wherever its session is.
    pub async fn cancel_run(&self, host: &str, run_id: &str, reason: &str) {
        match self.holder(host).await {
            Some(Holder::Here(s)) => {
                let _ = s.sender.send(Ok(cancel_message(run_id, reason))).await;
            }
            Some(Holder::Peer(_)) => {
                self.publish(Message::Cancel {
                    host: host.to_string(),
                    run_id: run_id.to_string(),
                    reason: reason.to_string(),
                })
                .await;
            }
            None => {}
        }
    }

    /// A write for `job_id` was refused because another coordinator claimed the job: it
    /// stops here (its new owner drives it).
    pub fn job_lost(&self, job_id: &str) {
        if let Some(jobs) = self.jobs.get().and_then(Weak::upgrade) {
            jobs.lease_lost(job_id);
        }
    }

    /// An operator cancelled a job this process does not drive: its owner is told.
    pub async fn cancel_job_elsewhere(&self, job_id: &str, by: &str, reason: &str) {
        self.publish(Message::CancelJob {
            job_id: job_id.to_string(),
            by: by.to_string(),
            reason: reason.to_string(),
        })
        .await;
    }

    /// Gateway: `host` came online here.
    pub async fn agent_online(&self, host: &str) {
        self.publish(Message::Online {
            host: host.to_string(),
        })
        .await;
    }

    /// Gateway: `host`'s session here ended.
    pub async fn agent_gone(&self, host: &str) {
        self.publish(Message::Gone {
            host: host.to_string(),
        })
        .await;
    }

    /// Gateway: a step event of a run nobody here waits for goes to the peers (cut to fit).
    pub async fn step_event(&self, host: &str, event: &StepEvent) {
        if !self.shared() || self.hub.has_watch(&event.run_id) {
            return;
        }
        let mut msg = Message::Step {
            host: host.to_string(),
            run_id: event.run_id.clone(),
            event: b64(&event.encode_to_vec()),
        };
        let fits = Envelope {
            from: self.me.instance.clone(),
            msg: msg.clone(),
        }
        .encode()
        .is_some();
        if !fits {
            // Output lines are what grows: the event goes without them, the result keeps them.
            let mut cut = event.clone();
            if let Some(rollback_common::proto::step_event::Kind::Output(o)) = &mut cut.kind {
                o.data.truncate(1024);
                o.data
                    .extend_from_slice(b"\n[output cut: see the run's result]\n");
            }
            msg = Message::Step {
                host: host.to_string(),
                run_id: event.run_id.clone(),
                event: b64(&cut.encode_to_vec()),
            };
        }
        self.publish(msg).await;
    }

    /// Gateway: a run's result is stored (or the agent answered busy); peers waiting for it
    /// read it from the store.
    pub async fn run_finished(&self, host: &str, run_id: &str, busy: Option<&RunFinished>) {
        self.publish(Message::Finished {
            host: host.to_string(),
            run_id: run_id.to_string(),
            busy: busy.map(|b| b64(&b.encode_to_vec())),
        })
        .await;
    }

    /// Messages from peers, handled in the order they were sent. The runs that the
    /// deliveries and results among them name are read from the store together first: read
    /// one at a time, each waited for by every message behind it, they held a 10,000-host job
    /// on two coordinators to one run delivered (and one result taken) per round trip.
    pub async fn receive_all(&self, envelopes: Vec<Envelope>) {
        let mine = &self.me.instance;
        let wanted: Vec<String> = envelopes
            .iter()
            .filter(|e| &e.from != mine)
            .filter_map(|e| match &e.msg {
                Message::Deliver { host, run_id } if self.registry.get(host).is_some() => {
                    Some(run_id.clone())
                }
                Message::Finished {
                    run_id, busy: None, ..
                } if self.hub.has_watch(run_id) => Some(run_id.clone()),
                _ => None,
            })
            .collect();
        // A run missing here (not stored, or the read failed) is read again on its own.
        let mut read: HashMap<String, RunRow> = HashMap::new();
        if !wanted.is_empty() {
            match self.store.get_runs(&wanted).await {
                Ok(rows) => read.extend(rows.into_iter().map(|r| (r.run_id.clone(), r))),
                Err(e) => {
                    warn!(runs = wanted.len(), error = %e, "store failed reading the runs peers named; reading them one by one")
                }
            }
        }
        for envelope in envelopes {
            if &envelope.from != mine {
                self.receive(envelope.msg, &mut read).await;
            }
        }
    }

    /// One message from a peer; `read` holds runs already read for it.
    async fn receive(&self, msg: Message, read: &mut HashMap<String, RunRow>) {
        match msg {
            Message::Deliver { host, run_id } => {
                let row = read.remove(&run_id);
                self.deliver(&host, &run_id, row).await;
            }
            Message::Cancel {
                host,
                run_id,
                reason,
            } => {
                if let Some(s) = self.registry.get(&host) {
                    let _ = s.sender.send(Ok(cancel_message(&run_id, &reason))).await;
                }
            }
            Message::Step {
                host,
                run_id,
                event,
            } => {
                if self.hub.has_watch(&run_id)
                    && let Some(bytes) = unb64(&event)
                    && let Ok(ev) = StepEvent::decode(bytes.as_slice())
                {
                    self.hub.publish(
                        &host,
                        &run_id,
                        ExecEvent {
                            kind: Some(exec_event::Kind::StepEvent(ev)),
                        },
                    );
                }
            }
            Message::Finished { host, run_id, busy } => {
                let row = read.remove(&run_id);
                self.finished_elsewhere(&host, &run_id, busy, row).await;
            }
            Message::Online { host } => self.resend_pending(&host).await,
            Message::Gone { host } => {
                if self.registry.get(&host).is_none() {
                    self.hub.host_gone(&host);
                }
            }
            Message::JobEvents { job_id } => {
                let _ = self.stored.send(job_id);
            }
            Message::CancelJob { job_id, by, reason } => {
                if let Some(jobs) = self.jobs.get().and_then(Weak::upgrade) {
                    jobs.cancel_here(&job_id, &by, &reason);
                }
            }
        }
    }

    /// After messages may have been lost (the bus reconnected): results stored meanwhile for
    /// runs this process waits for are handed over, and every host held here is announced
    /// again, so peers send again what they dispatched to it.
    pub async fn resync(&self) {
        self.hand_over_stored(&self.hub.pending_runs(), "resynchronising")
            .await;
        for host in self.registry.hosts() {
            self.agent_online(&host).await;
        }
    }

    /// Results stored for runs this process has waited for since the previous sweep are
    /// handed over. A peer that stored a result and died before its `Finished` went out, or
    /// whose notification failed on its way, leaves no message; without this the job would
    /// wait for that host until this process restarted. The cluster's clock calls it every
    /// `leases::OVERDUE_SWEEP`; a run dispatched since the previous sweep is not read yet.
    pub async fn sweep_overdue(&self) {
        let pending: HashSet<String> = self.hub.pending_runs().into_iter().collect();
        let overdue: Vec<String> = {
            let mut waited = self
                .waited
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let overdue = pending.intersection(&waited).cloned().collect();
            *waited = pending;
            overdue
        };
        self.hand_over_stored(&overdue, "sweeping").await;
    }

    /// Hands over the results stored for `runs` (those still waited for here).
    async fn hand_over_stored(&self, runs: &[String], doing: &str) {
        if runs.is_empty() {
            return;
        }
        match self.store.get_runs(runs).await {
            Ok(rows) => {
                for row in rows.into_iter().filter(|r| r.result.is_some()) {
                    let (host, run_id) = (row.host_id.clone(), row.run_id.clone());
                    if self.hub.is_pending(&run_id) {
                        info!(host = %host, run = %run_id, "a run's result is in the store but no message about it came; taking it from the store ({doing})");
                    }
                    self.finished_elsewhere(&host, &run_id, None, Some(row))
                        .await;
                }
            }
            Err(e) => {
                warn!(runs = runs.len(), error = %e, "store failed reading the runs waited for while {doing}")
            }
        }
    }

    /// A peer asks this process to send a stored run to a host it holds (`read`: the run,
    /// when it was read with others).
    async fn deliver(&self, host: &str, run_id: &str, read: Option<RunRow>) {
        let Some(session) = self.registry.get(host) else {
            return;
        };
        let stored = match read {
            Some(row) => Ok(Some(row)),
            None => self.store.get_run(run_id).await,
        };
        let row = match stored {
            Ok(Some(row)) => row,
            Ok(None) => {
                return warn!(host = %host, run = %run_id, "asked to deliver a run the store does not have");
            }
            Err(e) => {
                return warn!(host = %host, run = %run_id, error = %e, "store failed reading a run to deliver");
            }
        };
        // Only to the host it was made for, and only while it has no result.
        if row.host_id != host || row.result.is_some() {
            return;
        }
        match stored_procedure(&row) {
            Ok(p) => {
                let _ = send_procedure(&session, host, &p).await;
            }
            Err(e) => {
                warn!(host = %host, run = %run_id, error = %e, "stored run is unreadable; not delivered")
            }
        }
    }

    async fn finished_elsewhere(
        &self,
        host: &str,
        run_id: &str,
        busy: Option<String>,
        read: Option<RunRow>,
    ) {
        if !self.hub.has_watch(run_id) {
            return;
        }
        if let Some(busy) = busy {
            if let Some(bytes) = unb64(&busy)
                && let Ok(result) = RunFinished::decode(bytes.as_slice())
            {
                self.hub.hand_over(host, run_id, result);
            }
            return;
        }
        let stored = match read {
            Some(row) => Ok(Some(row)),
            None => self.store.get_run(run_id).await,
        };
        match stored {
            Ok(Some(row)) => {
                if let Some(bytes) = row.result
                    && let Ok(result) = RunFinished::decode(bytes.as_slice())
                {
                    self.hub.resolved(run_id);
                    self.hub.hand_over(host, run_id, result);
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(run = %run_id, error = %e, "store failed reading a result a peer announced")
            }
        }
    }

    /// `host` is back (at a peer): every run this process dispatched to it and still waits
    /// for is sent again (the agent's journal makes that exactly-once).
    async fn resend_pending(&self, host: &str) {
        let runs = match self.store.unfinished_runs(host).await {
            Ok(runs) => runs,
            Err(e) => {
                return warn!(host = %host, error = %e, "store failed listing unfinished runs");
            }
        };
        for run in runs.into_iter().filter(|r| self.hub.is_pending(&r.run_id)) {
            info!(host = %host, run = %run.run_id, "host is back at another coordinator; sending its run again");
            self.publish(Message::Deliver {
                host: host.to_string(),
                run_id: run.run_id,
            })
            .await;
        }
    }
}

fn cancel_message(run_id: &str, reason: &str) -> CoordinatorMessage {
    CoordinatorMessage {
        kind: Some(coordinator_message::Kind::Cancel(Cancel {
            run_id: run_id.to_string(),
            reason: reason.to_string(),
        })),
    }
}

async fn send_procedure(
    session: &LiveSession,
    host: &str,
    procedure: &RunProcedure,
) -> Result<(), DispatchError> {
    let msg = CoordinatorMessage {
        kind: Some(coordinator_message::Kind::RunProcedure(procedure.clone())),
    };
    session
        .sender
        .send(Ok(msg))
        .await
        .map_err(|_| DispatchError::Disconnected {
            host: host.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AgentRecord;
    use crate::store::SqliteStore;
    use crate::store::cluster::CoordinatorRow;

    /// Test double for the PostgreSQL NOTIFY bus (no server in a unit test): it only says the
    /// store is shared, which is all `holder` and `online_hosts` ask of it.
    struct SharedBusDouble;

    #[async_trait::async_trait]
    impl Bus for SharedBusDouble {
        fn shared(&self) -> bool {
            true
        }
        async fn publish(&self, _envelope: Envelope) {}
    }

    /// The gateway stores a host as online here before it registers the session. In that
    /// window (or after a crash left the row) the host must not be listed online, since an
    /// exec or run sent to it would find no session: `agents` and `exec` agree.
    #[tokio::test]
    async fn a_host_stored_online_here_without_a_session_is_not_listed_online() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("store.db"))
                .await
                .expect("store"),
        );
        let now = now_unix_ms();
        let me = Owner {
            name: "a".into(),
            instance: "a1".into(),
        };
        let row = CoordinatorRow {
            name: "a".into(),
            instance: "a1".into(),
            address: "a:7443".into(),
            version: "test".into(),
            started_at_ms: now,
            heartbeat_ms: now,
        };
        assert_eq!(
            store
                .register_coordinator(&row, 60_000)
                .await
                .expect("store"),
            Ok(())
        );
        let registry = Arc::new(Registry::default());
        let cluster = Cluster::new(
            me,
            "a:7443".into(),
            Duration::from_secs(60),
            store.clone(),
            registry.clone(),
            Arc::new(RunHub::default()),
            Arc::new(SharedBusDouble),
        );
        let record = AgentRecord {
            host_id: "web-1".into(),
            labels: Default::default(),
            reported_labels: Default::default(),
            agent_version: "1".into(),
            address: "127.0.0.1:1".into(),
            online: true,
            connected_at_ms: now,
            last_seen_ms: now,
            state: Vec::new(),
            cert_not_after_ms: None,
            coordinator: "a".into(),
        };
        store.agent_connected(&record).await.expect("store");
        assert!(!cluster.online_hosts().await.contains("web-1"));
        assert!(!cluster.online("web-1").await);

        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        registry.insert("web-1", tx, now);
        assert!(cluster.online_hosts().await.contains("web-1"));
        assert!(cluster.online("web-1").await);
    }

    /// A result a peer stored without its message ever coming (the peer died between the
    /// two, or its notification failed on its way) is taken from the store by the sweep,
    /// once the run has been waited for since the previous sweep. A run with no result, and
    /// one dispatched since the previous sweep, keep waiting.
    #[tokio::test]
    async fn a_result_stored_without_its_message_is_taken_by_the_sweep() {
        use crate::store::AuditEvent;
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("store.db"))
                .await
                .expect("store"),
        );
        let hub = Arc::new(RunHub::default());
        let cluster = Cluster::new(
            Owner {
                name: "a".into(),
                instance: "a1".into(),
            },
            "a:7443".into(),
            Duration::from_secs(60),
            store.clone(),
            Arc::new(Registry::default()),
            hub.clone(),
            Arc::new(SharedBusDouble),
        );
        // Runs for a host held by a peer (it has no session here), each waited for here.
        let wait_for = |run_id: &str| {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            hub.watch(run_id, "web-1", tx);
            hub.dispatched(run_id, "job-1");
            rx
        };
        for run_id in ["done", "running", "late"] {
            let row = crate::store::chain_tests::run(run_id, "", "web-1");
            store.create_run(&row, "a1").await.expect("run");
        }
        let (mut done, mut running) = (wait_for("done"), wait_for("running"));
        cluster.sweep_overdue().await;
        let mut late = wait_for("late");
        // The peer stores two results and dies before saying so.
        for run_id in ["done", "late"] {
            let result = RunFinished {
                run_id: run_id.into(),
                status: 1,
                ..Default::default()
            };
            let audit = AuditEvent {
                at_ms: 2,
                actor: "agent/web-1".into(),
                action: "run.finished".into(),
                target: format!("run/{run_id}"),
                detail: String::new(),
            };
            store
                .finish_run(run_id, "web-1", 1, 2, &result.encode_to_vec(), &audit)
                .await
                .expect("result stored");
        }
        let finished = |got: Option<crate::runs::Watched>| match got.map(|w| w.map(|e| *e)) {
            Some(Ok(ExecEvent {
                kind: Some(exec_event::Kind::Finished(f)),
            })) => f.run_id,
            other => panic!("not a result: {other:?}"),
        };

        cluster.sweep_overdue().await;
        assert_eq!(finished(done.try_recv().ok()), "done");
        assert!(!hub.is_pending("done"), "resolved");
        assert!(
            running.try_recv().is_err(),
            "no result stored: still waiting"
        );
        assert!(hub.is_pending("running"));
        assert!(
            late.try_recv().is_err(),
            "dispatched since the last sweep: not read yet"
        );

        cluster.sweep_overdue().await;
        assert_eq!(finished(late.try_recv().ok()), "late");
        assert!(running.try_recv().is_err());
        assert!(hub.is_pending("running"));
    }
}
