//! Acceptance for the skeleton: real mTLS on ephemeral loopback ports, the real coordinator,
//! agents and `rollbackctl` as processes — fleet listing, selectors, certificate checks,
//! authorization of every method, restart and shutdown.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rollback_common::proto::agent_gateway_client::AgentGatewayClient;
use rollback_common::proto::console_client::ConsoleClient;
use rollback_common::proto::{
    AgentMessage, Hello, ListAgentsRequest, agent_message, service_methods,
};
use rollback_tests::support::{
    Agent, CertFiles, Coordinator, Pki, agents_json, eventually, journal_records, rollbackctl,
};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const DEADLINE: Duration = Duration::from_secs(20);

struct Fleet {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    pki: Pki,
    coordinator: Coordinator,
    /// An operator with the viewer role.
    viewer: CertFiles,
    /// `ada`, an operator with the admin role.
    admin: CertFiles,
}

fn fleet() -> Fleet {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let pki = Pki::init(&dir.join("pki"), "fleet.test").expect("pki init");
    let viewer = pki.operator("vera").expect("operator cert");
    for name in ["otto", "abe"] {
        pki.operator(name).expect("operator cert");
    }
    let admin = pki.operator("ada").expect("operator cert");
    let coordinator = Coordinator::start(
        &dir,
        &pki,
        &[
            ("vera", "viewer"),
            ("otto", "operator"),
            ("abe", "approver"),
            ("ada", "admin"),
        ],
    )
    .expect("coordinator starts");
    Fleet {
        _tmp: tmp,
        dir,
        pki,
        coordinator,
        viewer,
        admin,
    }
}

impl Fleet {
    /// Starts an agent that reports `labels`, and puts the same labels in the coordinator's
    /// inventory (as admin `ada`): only the inventory targets hosts.
    fn agent(&self, host: &str, labels: &[(&str, &str)]) -> Agent {
        if !labels.is_empty() {
            self.label(host, labels);
        }
        self.agent_claiming(host, labels)
    }

    fn label(&self, host: &str, labels: &[(&str, &str)]) {
        let mut args = vec!["agents".to_string(), "label".to_string(), host.to_string()];
        args.extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = rollbackctl(&self.coordinator.url(), &self.pki.ca(), &self.admin, &args)
            .expect("rollbackctl agents label");
        assert!(
            out.status.success(),
            "agents label {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts an agent that reports `labels` in its Hello, without touching the inventory.
    fn agent_claiming(&self, host: &str, labels: &[(&str, &str)]) -> Agent {
        let certs = self.pki.agent(host).expect("agent cert");
        Agent::start(
            &self.dir,
            host,
            labels,
            &self.coordinator.url(),
            &self.pki.ca(),
            &certs,
        )
        .expect("agent starts")
    }

    fn agents(&self, select: Option<&str>) -> Vec<Value> {
        agents_json(
            &self.coordinator.url(),
            &self.pki.ca(),
            &self.viewer,
            select,
        )
        .expect("rollbackctl agents")
    }

    fn wait_status(&self, host: &str, status: &str) -> Value {
        eventually(&format!("{host} is {status}"), DEADLINE, || {
            let agents = agents_json(&self.coordinator.url(), &self.pki.ca(), &self.viewer, None)?;
            agents
                .into_iter()
                .find(|a| a["host_id"] == host && a["status"] == status)
                .ok_or_else(|| anyhow::anyhow!("{host} not {status} yet"))
        })
    }

    async fn channel(
        &self,
        certs: Option<&CertFiles>,
        ca: &Path,
    ) -> Result<Channel, tonic::transport::Error> {
        self.endpoint(certs, ca)?.connect().await
    }

    /// The coordinator's endpoint with `certs` (if any) and `ca`, not connected yet.
    fn endpoint(
        &self,
        certs: Option<&CertFiles>,
        ca: &Path,
    ) -> Result<Endpoint, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")));
        if let Some(c) = certs {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&c.cert).expect("cert"),
                std::fs::read(&c.key).expect("key"),
            ));
        }
        Endpoint::from_shared(self.coordinator.url())?.tls_config(tls)
    }
}

fn hosts(agents: &[Value]) -> Vec<&str> {
    agents
        .iter()
        .filter_map(|a| a["host_id"].as_str())
        .collect()
}

#[test]
fn two_agents_are_listed_online_with_labels_and_select_filters() {
    let f = fleet();
    let _web = f.agent("web-1", &[("role", "web"), ("env", "prod")]);
    let _db = f.agent("db-1", &[("role", "db"), ("env", "prod")]);
    f.wait_status("web-1", "online");
    f.wait_status("db-1", "online");

    let all = f.agents(None);
    assert_eq!(hosts(&all), ["db-1", "web-1"]);
    let web = all
        .iter()
        .find(|a| a["host_id"] == "web-1")
        .expect("web-1 listed");
    assert_eq!(web["labels"]["role"], "web");
    assert_eq!(web["labels"]["env"], "prod");
    assert_eq!(web["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        web["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{web}"
    );

    assert_eq!(hosts(&f.agents(Some("role=web"))), ["web-1"]);
    assert_eq!(hosts(&f.agents(Some("role=db,env=prod"))), ["db-1"]);
    assert_eq!(hosts(&f.agents(Some("host=db-1"))), ["db-1"]);
    assert!(f.agents(Some("env=staging")).is_empty());

    // A malformed selector is an error naming the problem, not an empty list.
    let out = rollback_tests::support::rollbackctl(
        &f.coordinator.url(),
        &f.pki.ca(),
        &f.viewer,
        &["agents", "--select", "role"],
    )
    .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn certificates_from_another_ca_or_none_are_refused() {
    let f = fleet();
    let other = Pki::init(&f.dir.join("other-pki"), "fleet.test").expect("other pki");
    let rogue = other.agent("rogue-1").expect("rogue cert");
    // The rogue agent trusts our CA (so it can verify the coordinator) but its own certificate
    // comes from another CA: the handshake must fail and it must never be listed.
    let rogue_agent = Agent::start(
        &f.dir,
        "rogue-1",
        &[],
        &f.coordinator.url(),
        &f.pki.ca(),
        &rogue,
    )
    .expect("starts");
    let _good = f.agent("web-1", &[]);
    f.wait_status("web-1", "online");
    eventually("rogue agent reports a refused connection", DEADLINE, || {
        let log = rogue_agent.proc.log_text();
        if log.contains("session failed") {
            Ok(())
        } else {
            Err(anyhow::anyhow!("log so far: {log}"))
        }
    });
    assert_eq!(hosts(&f.agents(None)), ["web-1"]);

    // A console client from another CA.
    let rogue_op = other.operator("vera").expect("cert");
    let denied = match f.channel(Some(&rogue_op), &f.pki.ca()).await {
        Err(_) => true,
        Ok(ch) => ConsoleClient::new(ch)
            .list_agents(ListAgentsRequest::default())
            .await
            .is_err(),
    };
    assert!(
        denied,
        "a certificate from another CA must not reach the console"
    );

    // A client with no certificate at all.
    let denied = match f.channel(None, &f.pki.ca()).await {
        Err(_) => true,
        Ok(ch) => ConsoleClient::new(ch)
            .list_agents(ListAgentsRequest::default())
            .await
            .is_err(),
    };
    assert!(
        denied,
        "a client without a certificate must not reach the console"
    );

    // And our own operator still works, so the refusals above are about the certificates.
    let ch = f
        .channel(Some(&f.viewer), &f.pki.ca())
        .await
        .expect("operator connects");
    ConsoleClient::new(ch)
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("operator allowed");
}

#[tokio::test]
async fn hello_with_another_host_id_is_refused_and_logged_with_both_ids() {
    let f = fleet();
    // A misbehaving client speaking the agent protocol (the real agent refuses to start with a
    // host_id that differs from its certificate, so the test plays the impostor itself).
    let certs = f.pki.agent("web-1").expect("cert");
    let ch = f
        .channel(Some(&certs), &f.pki.ca())
        .await
        .expect("connects");
    let hello = AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            host_id: "db-9".into(),
            ..Default::default()
        })),
    };
    let result = AgentGatewayClient::new(ch)
        .session(tokio_stream::iter(vec![hello]))
        .await;
    let status = result.expect_err("impostor hello refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("db-9") && status.message().contains("web-1"),
        "{status:?}"
    );

    let log = f.coordinator.proc.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("refused session"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(
        line.contains("web-1") && line.contains("db-9"),
        "log line names both ids: {line}"
    );
    assert!(
        f.agents(None).is_empty(),
        "the impostor must not be recorded"
    );

    // The real agent refuses to start with a host id its certificate does not carry.
    let agent = Agent::start(
        &f.dir,
        "db-9",
        &[],
        &f.coordinator.url(),
        &f.pki.ca(),
        &certs,
    )
    .expect("spawns");
    let mut agent = agent;
    let status = eventually("mismatched agent exits", DEADLINE, || {
        agent
            .proc
            .exited()?
            .ok_or_else(|| anyhow::anyhow!("running"))
    });
    assert!(!status.success());
    assert!(
        agent
            .proc
            .log_text()
            .contains("rollbackctl pki issue agent db-9"),
        "{}",
        agent.proc.log_text()
    );
}

/// A connection that goes away while the coordinator is still taking its Hello (recording the
/// agent, reading its inventory, announcing it) must not leave the host listed online with no
/// session behind it: the gRPC server drops a handler whose connection has closed, so nothing
/// the handler began may depend on it running to the end. The TCP connection is shut down at
/// moments swept across the first milliseconds of the call, where the store's writes are in
/// flight (as when an agent is killed just after it said Hello).
#[tokio::test(flavor = "multi_thread")]
async fn a_session_cut_while_its_hello_is_taken_leaves_the_host_disconnected() {
    let f = fleet();
    let addr: std::net::SocketAddr = f
        .coordinator
        .url()
        .trim_start_matches("https://")
        .parse()
        .expect("coordinator address");
    let mut cut_in_hello = 0;
    // One host per cut, so that a session left behind by any of them shows.
    for step in 0..80u64 {
        let host = format!("cut-{step:02}");
        let certs = f.pki.agent(&host).expect("cert");
        // The connection's socket, kept to shut it down from here.
        let socket: std::sync::Arc<std::sync::Mutex<Option<std::net::TcpStream>>> =
            std::sync::Arc::default();
        let keep = socket.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let keep = keep.clone();
            async move {
                let tcp = std::net::TcpStream::connect(addr)?;
                *keep.lock().expect("socket slot") = Some(tcp.try_clone()?);
                tcp.set_nonblocking(true)?;
                let tcp = tokio::net::TcpStream::from_std(tcp)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
            }
        });
        let ch = f
            .endpoint(Some(&certs), &f.pki.ca())
            .expect("endpoint")
            .connect_with_connector(connector)
            .await
            .expect("connects");
        let hello = AgentMessage {
            kind: Some(agent_message::Kind::Hello(Hello {
                host_id: host.clone(),
                agent_version: "test".into(),
                ..Default::default()
            })),
        };
        // The Hello, then a request stream that stays open (a live agent's).
        let messages = tokio_stream::StreamExt::chain(
            tokio_stream::iter(vec![hello]),
            tokio_stream::pending(),
        );
        let mut client = AgentGatewayClient::new(ch);
        let call = client.session(messages);
        let cut = Duration::from_micros(step * 100);
        let answered = tokio::time::timeout(cut, call).await;
        if let Some(tcp) = socket.lock().expect("socket slot").take() {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
        match answered {
            // Established before the cut: the shutdown ends it as a crash would.
            Ok(Ok(_)) => {}
            Ok(Err(status)) => panic!(
                "session {step} refused: {status:?}; the coordinator said:\n{}",
                f.coordinator.proc.log_text()
            ),
            Err(_) => cut_in_hello += 1,
        }
    }
    assert!(
        cut_in_hello > 0,
        "no call was cut before its Hello was answered"
    );
    tokio::task::spawn_blocking(move || {
        eventually("every cut host disconnected", DEADLINE, || {
            let agents = agents_json(&f.coordinator.url(), &f.pki.ca(), &f.viewer, None)?;
            let online: Vec<&str> = agents
                .iter()
                .filter(|a| a["status"] == "online")
                .filter_map(|a| a["host_id"].as_str())
                .collect();
            anyhow::ensure!(
                online.is_empty(),
                "listed online with no session: {online:?}"
            );
            Ok(())
        });
    })
    .await
    .expect("the check ran");
}

fn operator_certs(f: &Fleet, name: &str) -> CertFiles {
    CertFiles {
        cert: f.pki.dir.join(format!("operator/{name}.pem")),
        key: f.pki.dir.join(format!("operator/{name}.key")),
    }
}

/// Calls `path` with an empty message (valid for every request type) and returns the status.
async fn call_raw(channel: Channel, path: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::from_str(path).expect("path");
    let request = tonic::Request::new(tokio_stream::iter(vec![()]));
    match grpc.streaming(request, path, codec).await {
        Err(status) => status,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            match stream.message().await {
                Err(status) => status,
                Ok(_) => tonic::Status::ok(""),
            }
        }
    }
}

#[tokio::test]
async fn every_method_is_authorized_by_certificate_role() {
    let f = fleet();
    let agent_cert = f.pki.agent("web-1").expect("cert");
    let admin = CertFiles {
        cert: f.pki.dir.join("operator/ada.pem"),
        key: f.pki.dir.join("operator/ada.key"),
    };
    let console = service_methods("Console");
    assert!(
        !console.is_empty(),
        "Console methods come from the service definition"
    );

    // The table: the least role each Console method needs. A method the service declares but
    // this table does not name fails the test: every new method gets a row on purpose.
    const ROLES: [&str; 4] = ["viewer", "operator", "approver", "admin"];
    let least = |method: &str| -> usize {
        match method {
            "ListAgents" | "GetRunbook" | "Plan" | "WatchJob" | "GetJob" | "ListJobs"
            | "GetReport" | "ListSnapshots" | "ListCoordinators" => 0,
            "Exec" | "StartRollback" | "CancelJob" | "ResumeJob" | "Snapshot" | "Diagnose"
            | "VerifyAudit" | "StartGuard" => 1,
            // The audit trail shows every operator's actions: reading it is for approvers.
            "ListAudit" | "ApproveJob" | "DenyJob" => 2,
            "ForgetAgent" | "LabelAgent" => 3,
            other => panic!("Console method {other} has no row in the role table"),
        }
    };
    let as_role = [
        f.viewer.clone(),
        operator_certs(&f, "otto"),
        operator_certs(&f, "abe"),
        admin.clone(),
    ];
    for method in &console {
        let ch = f
            .channel(Some(&agent_cert), &f.pki.ca())
            .await
            .expect("connects");
        let status = call_raw(ch, &method.path()).await;
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "agent calling {}: {status:?}",
            method.path()
        );
        for (rank, (role, certs)) in ROLES.iter().zip(&as_role).enumerate() {
            let ch = f.channel(Some(certs), &f.pki.ca()).await.expect("connects");
            let status = call_raw(ch, &method.path()).await;
            let denied = status.code() == tonic::Code::PermissionDenied
                && status.message().contains("may not call");
            assert_eq!(
                denied,
                rank < least(&method.name),
                "{role} calling {}: {status:?}",
                method.path()
            );
        }
    }

    for method in service_methods("AgentGateway") {
        let ch = f
            .channel(Some(&f.viewer), &f.pki.ca())
            .await
            .expect("connects");
        let status = call_raw(ch, &method.path()).await;
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "operator calling {}: {status:?}",
            method.path()
        );
    }

    // An operator with no role in the coordinator's config is denied too (default deny).
    let nobody = f.pki.operator("nobody").expect("cert");
    let ch = f
        .channel(Some(&nobody), &f.pki.ca())
        .await
        .expect("connects");
    let status = ConsoleClient::new(ch)
        .list_agents(ListAgentsRequest::default())
        .await
        .expect_err("denied");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        f.coordinator
            .proc
            .log_text()
            .contains("spiffe://fleet.test/operator/nobody"),
        "denial logged with identity"
    );
}

#[test]
fn coordinator_restart_brings_agents_back_and_shows_stopped_ones_disconnected() {
    let mut f = fleet();
    let _web = f.agent("web-1", &[("role", "web")]);
    let mut db = f.agent("db-1", &[("role", "db")]);
    f.wait_status("web-1", "online");
    f.wait_status("db-1", "online");

    assert!(
        f.coordinator.stop().expect("stops"),
        "coordinator exits 0 on SIGTERM"
    );
    assert!(
        db.proc
            .terminate(Duration::from_secs(10))
            .expect("agent stops"),
        "agent exits 0 on SIGTERM"
    );
    let stopped_at = rollback_common::now_unix_ms();
    f.coordinator.restart().expect("restarts");

    let web = f.wait_status("web-1", "online");
    assert_eq!(web["labels"]["role"], "web");
    let db = f.wait_status("db-1", "disconnected");
    let last_seen = db["last_seen_unix_ms"].as_i64().expect("last seen");
    assert!(
        last_seen > 0 && last_seen <= stopped_at,
        "last seen {last_seen} is before the stop at {stopped_at}"
    );
    assert!(
        !db["last_seen"].as_str().unwrap_or_default().is_empty(),
        "{db}"
    );
}

#[test]
fn offline_targets_are_shown_refused_unless_skipped_and_a_forgotten_host_is_gone() {
    let f = fleet();
    // Issued by fleet() (role admin).
    let ada = CertFiles {
        cert: f.pki.dir.join("operator/ada.pem"),
        key: f.pki.dir.join("operator/ada.key"),
    };
    let ctl = |op: &CertFiles, args: &[&str]| {
        let out = rollbackctl(&f.coordinator.url(), &f.pki.ca(), op, args).expect("rollbackctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let _web1 = f.agent("web-1", &[("role", "web")]);
    let mut web2 = f.agent("web-2", &[("role", "web")]);
    f.wait_status("web-1", "online");
    f.wait_status("web-2", "online");
    assert!(web2.proc.terminate(Duration::from_secs(10)).expect("stops"));
    f.wait_status("web-2", "disconnected");

    let args = [
        "--procedure",
        "configuration",
        "--select",
        "role=web",
        "--reason",
        "offline test",
    ];
    let (code, out, err) = ctl(&ada, &[&["plan"][..], &args].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("OFFLINE: web-2"),
        "plan marks the offline host:\n{out}"
    );

    let (code, _, err) = ctl(&ada, &[&["rollback", "--yes"][..], &args].concat());
    assert_ne!(code, Some(0));
    assert!(
        err.contains("web-2 is offline")
            && err.contains("--skip-offline")
            && err.contains("agents forget"),
        "refused, naming the host and the ways out: {err}"
    );
    let (_, jobs, _) = ctl(&ada, &["jobs", "--output", "json"]);
    assert_eq!(jobs.trim(), "[]", "nothing was started");

    // Leaving it out: the job targets web-1 alone (whatever its steps do on this bare host).
    let (_, out, err) = ctl(
        &ada,
        &[
            &["--output", "json", "rollback", "--yes", "--skip-offline"][..],
            &args,
        ]
        .concat(),
    );
    let job: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert_eq!(
        job["plan"]["targets"],
        serde_json::json!(["web-1"]),
        "{job}"
    );
    assert_eq!(
        job["plan"]["offline"],
        serde_json::json!(["web-2"]),
        "{job}"
    );
    // On a table, `--yes` shows the plan the start made (nothing was previewed) and says on
    // stderr what it did not ask.
    let (_, out, err) = ctl(
        &ada,
        &[&["rollback", "--yes", "--skip-offline"][..], &args].concat(),
    );
    assert!(
        out.contains("procedure configuration:")
            && out.contains("targets (1): web-1")
            && out.contains("OFFLINE: web-2"),
        "{out}"
    );
    assert!(
        err.contains("roll back 1 host(s) with `configuration`")
            && err.contains("(--yes: not asking)"),
        "{err}"
    );

    // Forgetting: admin only, never a connected host; then it is gone.
    let (code, _, err) = ctl(&ada, &["agents", "forget", "web-1"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("is connected"), "{err}");
    let (code, _, err) = ctl(&f.viewer, &["agents", "forget", "web-2"]);
    assert_eq!(code, Some(4), "a viewer is denied: {err}");
    let (code, out, err) = ctl(&ada, &["agents", "forget", "web-2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("web-2 forgotten"), "{out}");
    assert!(
        f.agents(None).iter().all(|a| a["host_id"] != "web-2"),
        "web-2 is no longer listed"
    );
    let (code, _, err) = ctl(&ada, &["agents", "forget", "web-2"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no agent web-2"), "{err}");
    let (code, out, err) = ctl(&ada, &[&["plan"][..], &args].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !out.contains("web-2"),
        "a forgotten host is no target:\n{out}"
    );
}

/// A StartRollback sent again with the same idempotency key (the client's connection broke)
/// returns the job the first one made; it never starts a second.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_retried_with_the_same_request_id_never_starts_twice() {
    let f = fleet();
    let _web = f.agent("web-1", &[("role", "web")]);
    f.wait_status("web-1", "online");
    let admin = CertFiles {
        cert: f.pki.dir.join("operator/ada.pem"),
        key: f.pki.dir.join("operator/ada.key"),
    };
    let ch = f.channel(Some(&admin), &f.pki.ca()).await.expect("channel");
    let mut console = ConsoleClient::new(ch);
    let req = rollback_common::proto::RollbackRequest {
        procedure: "configuration".into(),
        selector: "role=web".into(),
        reason: "retry test".into(),
        request_id: "retry-0123456789abcdef".into(),
        ..Default::default()
    };
    // Both at once (a retry racing the first) and once more afterwards.
    let (mut c1, mut c2) = (console.clone(), console.clone());
    let (a, b) = tokio::join!(
        c1.start_rollback(req.clone()),
        c2.start_rollback(req.clone())
    );
    let a = a.expect("first start").into_inner().job_id;
    let b = b.expect("racing retry").into_inner().job_id;
    let c = console
        .start_rollback(req.clone())
        .await
        .expect("later retry")
        .into_inner()
        .job_id;
    assert_eq!(a, b, "the racing retry got the same job");
    assert_eq!(a, c, "the later retry got the same job");
    let jobs = console
        .list_jobs(rollback_common::proto::ListJobsRequest {
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("jobs")
        .into_inner()
        .jobs;
    let started: Vec<&str> = jobs
        .iter()
        .filter(|j| j.reason == "retry test")
        .map(|j| j.job_id.as_str())
        .collect();
    assert_eq!(started, [a.as_str()], "exactly one job was started");
    let bad = rollback_common::proto::RollbackRequest {
        request_id: "../../etc".into(),
        ..req
    };
    let err = console.start_rollback(bad).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
}

/// A protocol-speaking test client standing in for an agent (a test double: the real agent
/// never reports another host's run, so the test plays the compromised host itself).
struct RawAgent {
    tx: tokio::sync::mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<rollback_common::proto::CoordinatorMessage>,
}

impl RawAgent {
    async fn connect(f: &Fleet, host: &str) -> RawAgent {
        let certs = f.pki.agent(host).expect("cert");
        let ch = f
            .channel(Some(&certs), &f.pki.ca())
            .await
            .expect("connects");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(Hello {
                host_id: host.into(),
                supported_actions: rollback_common::runbook::ACTIONS
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                ..Default::default()
            })),
        })
        .await
        .expect("hello");
        let inbound = AgentGatewayClient::new(ch)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("session accepted")
            .into_inner();
        RawAgent { tx, inbound }
    }

    async fn finished(
        &self,
        run_id: &str,
        status: rollback_common::proto::StepStatus,
        error: &str,
    ) {
        use rollback_common::proto::{RunFinished, StepFinished};
        self.tx
            .send(AgentMessage {
                kind: Some(agent_message::Kind::RunFinished(RunFinished {
                    run_id: run_id.into(),
                    status: status as i32,
                    steps: vec![StepFinished {
                        status: status as i32,
                        action: "git.log".into(),
                        error: error.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            })
            .await
            .expect("send result");
    }
}

/// Acceptance: a result speaks only for its own host. A host that reports a result for a run
/// sent to another host has its session closed with PermissionDenied; nothing is recorded, and
/// the run's watcher is neither released nor fed the forged result — the genuine one counts.
#[tokio::test]
async fn a_result_for_another_hosts_run_is_refused_and_changes_nothing() {
    use rollback_common::proto::{StepStatus, coordinator_message};
    let f = fleet();
    let ada = f.pki.dir.join("operator/ada.pem");
    let ada = CertFiles {
        key: ada.with_extension("key"),
        cert: ada,
    };
    let mut web1 = RawAgent::connect(&f, "web-1").await;
    let mut web2 = RawAgent::connect(&f, "web-2").await;
    let url = f.coordinator.url();
    let ca = f.pki.ca();
    let exec = {
        let ada = ada.clone();
        tokio::task::spawn_blocking(move || {
            rollbackctl(
                &url,
                &ca,
                &ada,
                &["--output", "json", "exec", "web-1", "git.log"],
            )
        })
    };
    // web-1 receives the run.
    let run_id = loop {
        let msg = tokio::time::timeout(DEADLINE, web1.inbound.message())
            .await
            .expect("a run within the deadline")
            .expect("stream")
            .expect("message");
        if let Some(coordinator_message::Kind::RunProcedure(run)) = msg.kind {
            break run.run_id;
        }
    };
    // web-2 claims it succeeded.
    web2.finished(&run_id, StepStatus::Succeeded, "forged by web-2")
        .await;
    let refused = loop {
        match tokio::time::timeout(DEADLINE, web2.inbound.message())
            .await
            .expect("an answer within the deadline")
        {
            Err(status) => break status,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("session ended without a status"),
        }
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("web-1") && refused.message().contains(&run_id),
        "{refused:?}"
    );
    // The watcher is still waiting: the genuine result decides.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!exec.is_finished(), "the forged result released nobody");
    web1.finished(&run_id, StepStatus::Failed, "genuine failure")
        .await;
    let out = exec.await.expect("join").expect("rollbackctl");
    assert!(!out.status.success(), "the genuine (failed) result counts");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["status"], "failed", "{doc}");
    assert!(
        doc["error"].as_str().is_some_and(|e| e.contains("genuine")),
        "{doc}"
    );
    let log = f.coordinator.proc.log_text();
    assert!(
        log.contains("refused a result for a run that was sent to another host"),
        "{log}"
    );
}

/// Runs the agent `host` journaled (every run it was sent, run or refused).
fn runs_on(f: &Fleet, host: &str) -> usize {
    journal_records(&f.dir.join(format!("agent-{host}/state/runs")))
}

/// Acceptance: a viewer cannot cause any run on any host (a plan never starts anything, not
/// even a read-only diagnosis or pinning), and changing a host by hand with `exec` needs the
/// approver role and a reason; read-only exec stays open to operators.
#[test]
fn a_viewer_causes_no_run_and_a_mutating_exec_needs_an_approver_with_a_reason() {
    let f = fleet();
    let _web = f.agent("web-1", &[("role", "web")]);
    f.wait_status("web-1", "online");
    let url = f.coordinator.url();
    let ca = f.pki.ca();
    let ctl = |who: &CertFiles, args: &[&str]| {
        let out = rollbackctl(&url, &ca, who, args).expect("rollbackctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        &[
            "plan",
            "--procedure",
            "application",
            "--revision",
            "main",
            "--select",
            "role=web",
        ][..],
        &["plan", "--to-snapshot", "latest", "--select", "role=web"],
        &["exec", "web-1", "git.log"],
        &["diagnose", "--select", "role=web"],
        &["snapshot", "--select", "role=web"],
        &[
            "rollback",
            "--procedure",
            "application",
            "--revision",
            "main",
            "--select",
            "role=web",
            "--reason",
            "x",
            "--yes",
        ],
    ] {
        let _ = ctl(&f.viewer, args);
    }
    assert_eq!(runs_on(&f, "web-1"), 0, "a viewer caused no run");

    let otto = operator_certs(&f, "otto");
    let (ok, err) = ctl(&otto, &["exec", "web-1", "git.log"]);
    assert!(
        ok || !err.contains("may not"),
        "read-only exec is open to operators: {err}"
    );
    let read_only_runs = runs_on(&f, "web-1");
    assert_eq!(read_only_runs, 1, "the read-only exec ran");

    let (ok, err) = ctl(&otto, &["exec", "web-1", "service.stop", "--reason", "x"]);
    assert!(
        !ok && err.contains("approver"),
        "operators cannot change a host: {err}"
    );
    let abe = operator_certs(&f, "abe");
    let (ok, err) = ctl(&abe, &["exec", "web-1", "service.stop"]);
    assert!(
        !ok && err.contains("--reason"),
        "a reason is required: {err}"
    );
    assert_eq!(
        runs_on(&f, "web-1"),
        read_only_runs,
        "refused before any run"
    );
    // With both, the step reaches the agent (which refuses it: this host has no [service]).
    let (_, err) = ctl(&abe, &["exec", "web-1", "service.stop", "--reason", "test"]);
    assert!(err.contains("[service]"), "{err}");
    assert_eq!(runs_on(&f, "web-1"), read_only_runs + 1);
}

/// Acceptance (#12): labels that choose hosts come from the coordinator's inventory. An agent
/// whose Hello claims `role=db` and `migrator=true` is shown with the mismatch and is never
/// picked: not by `--select`, not as the once-host of a downgrade or a restore.
#[test]
fn a_host_claiming_role_db_is_not_picked_and_the_mismatch_is_shown() {
    let f = fleet();
    let _web1 = f.agent("web-1", &[("role", "web"), ("migrator", "true")]);
    let _db = f.agent("db-1", &[("role", "db")]);
    f.label("web-2", &[("role", "web")]);
    let _rogue = f.agent_claiming("web-2", &[("role", "db"), ("migrator", "true")]);
    for h in ["web-1", "db-1", "web-2"] {
        f.wait_status(h, "online");
    }

    assert_eq!(hosts(&f.agents(Some("role=db"))), ["db-1"]);
    assert_eq!(hosts(&f.agents(Some("migrator=true"))), ["web-1"]);
    assert_eq!(hosts(&f.agents(Some("role=web"))), ["web-1", "web-2"]);
    let all = f.agents(None);
    let rogue = all
        .iter()
        .find(|a| a["host_id"] == "web-2")
        .expect("web-2 listed");
    assert_eq!(rogue["labels"]["role"], "web", "{rogue}");
    assert_eq!(rogue["reported_labels"]["role"], "db", "{rogue}");
    assert_eq!(
        rogue["label_mismatch"],
        serde_json::json!([
            "migrator: reported true, not in the inventory",
            "role: reported db, inventory web"
        ]),
        "{rogue}"
    );
    let honest = all.iter().find(|a| a["host_id"] == "web-1").expect("web-1");
    assert_eq!(honest["label_mismatch"], serde_json::json!([]), "{honest}");
    let table = rollbackctl(&f.coordinator.url(), &f.pki.ca(), &f.viewer, &["agents"])
        .expect("rollbackctl agents");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(
            "web-2: migrator: reported true, not in the inventory; role: reported db, inventory web"
        ),
        "{text}"
    );

    let ctl = |who: &CertFiles, args: &[&str]| {
        rollbackctl(&f.coordinator.url(), &f.pki.ca(), who, args).expect("rollbackctl")
    };
    let plan = |args: &[&str]| -> Value {
        let mut all = vec!["--output", "json", "plan", "--reason", "test"];
        all.extend_from_slice(args);
        let out = ctl(&f.viewer, &all);
        assert!(
            out.status.success(),
            "plan {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("plan json")
    };
    let downgrade = plan(&["--procedure", "database", "--select", "role=web"]);
    assert_eq!(downgrade["once_host"], "web-1", "{downgrade:#}");
    let restore = plan(&[
        "--procedure",
        "database-restore",
        "--backup",
        "/var/backups/app.dump",
        "--select",
        "role=web",
    ]);
    assert_eq!(restore["once_host"], "db-1", "{restore:#}");

    // Only an admin changes the inventory; bad labels are refused before anything is written.
    let otto = operator_certs(&f, "otto");
    let out = ctl(&otto, &["agents", "label", "web-2", "role=db"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in [&["host=db-1"][..], &["role=d b"], &["nosuch-"], &["role"]] {
        let mut args = vec!["agents", "label", "web-2"];
        args.extend_from_slice(bad);
        let out = ctl(&f.admin, &args);
        assert!(!out.status.success(), "{bad:?} was accepted");
    }
    assert_eq!(hosts(&f.agents(Some("role=db"))), ["db-1"]);

    // The admin's change is what moves a host, and it is audited.
    let out = ctl(
        &f.admin,
        &[
            "agents",
            "label",
            "web-2",
            "role=db",
            "--reason",
            "rebuilt as a db",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hosts(&f.agents(Some("role=db"))), ["db-1", "web-2"]);
    let out = ctl(&f.admin, &["agents", "label", "web-2", "role=web"]);
    assert!(out.status.success());
    assert_eq!(hosts(&f.agents(Some("role=db"))), ["db-1"]);
}
