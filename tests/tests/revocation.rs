//! Revocation without a restart (issue #12, acceptance 3), with the real binaries on loopback:
//! `rollbackctl pki revoke` writes the CRL, the coordinator reloads it (file change or SIGHUP)
//! and closes at once the live connections of the revoked certificate — an agent's session, an
//! operator's running watch — which can then not reconnect; a CRL that does not load keeps the
//! previous one; an expired CRL refuses every client until a fresh one is deployed.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rollback_common::proto::console_client::ConsoleClient;
use rollback_common::proto::{
    AgentMessage, GetJobRequest, Hello, RollbackRequest, WatchJobRequest, agent_message,
};
use rollback_tests::raw_tls::expired_crl;
use rollback_tests::support::{Agent, CertFiles, Coordinator, Pki, agents_json, bin, eventually};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Generous bound for what the coordinator does at once: it closes the connections of a
/// revoked certificate as it reloads the CRL, which it checks every second (`crl_poll_secs`);
/// without the closing they would last as long as the client likes.
const DEADLINE: Duration = Duration::from_secs(10);

struct Fleet {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    pki: Pki,
    coordinator: Coordinator,
    /// Viewer, never revoked: lists agents.
    vera: CertFiles,
    /// Admin: starts jobs.
    ada: CertFiles,
}

/// A PKI with an (empty) CRL and a coordinator that loads it; `extra` is more top-level config.
fn fleet(extra: &str) -> Fleet {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let pki = Pki::init(&dir.join("pki"), "fleet.test").expect("pki init");
    let vera = pki.operator("vera").expect("cert");
    let ada = pki.operator("ada").expect("cert");
    pki.operator("otto").expect("cert");
    pki.refresh_crl().expect("pki crl");
    let coordinator = Coordinator::start_with(
        &dir,
        &pki,
        &[("vera", "viewer"), ("otto", "viewer"), ("ada", "admin")],
        &format!("crl = \"{}\"\n{extra}", pki.crl().display()),
    )
    .expect("coordinator starts");
    Fleet {
        _tmp: tmp,
        dir,
        pki,
        coordinator,
        vera,
        ada,
    }
}

impl Fleet {
    fn agent(&self, host: &str) -> Agent {
        let certs = self.pki.agent(host).expect("agent cert");
        Agent::start(
            &self.dir,
            host,
            &[("role", "web")],
            &self.coordinator.url(),
            &self.pki.ca(),
            &certs,
        )
        .expect("agent starts")
    }

    fn status(&self, host: &str) -> Result<String> {
        let agents = agents_json(&self.coordinator.url(), &self.pki.ca(), &self.vera, None)?;
        agents
            .iter()
            .find(|a| a["host_id"] == host)
            .and_then(|a| a["status"].as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{host} not listed"))
    }

    fn wait_status(&self, host: &str, status: &str, within: Duration) {
        eventually(&format!("{host} is {status}"), within, || {
            let now = self.status(host)?;
            if now == status {
                Ok(())
            } else {
                bail!("{host} is {now}")
            }
        });
    }

    fn log_lines(&self, needles: &[&str]) -> usize {
        self.coordinator
            .logs()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    fn wait_log(&self, what: &str, needles: &[&str], more_than: usize) {
        eventually(what, DEADLINE, || {
            let n = self.log_lines(needles);
            if n > more_than {
                Ok(())
            } else {
                bail!(
                    "{n} lines with {needles:?}; log:\n{}",
                    self.coordinator.logs()
                )
            }
        });
    }

    /// The coordinator is the process the fleet started (no restart) and still runs.
    fn assert_not_restarted(&mut self, pid: Option<u32>) {
        assert_eq!(self.coordinator.pid(), pid, "same coordinator process");
        assert!(
            self.coordinator.proc.exited().expect("status").is_none(),
            "the coordinator still runs:\n{}",
            self.coordinator.logs()
        );
    }

    async fn channel(&self, certs: &CertFiles) -> Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.pki.ca())?))
            .identity(Identity::from_pem(
                std::fs::read(&certs.cert)?,
                std::fs::read(&certs.key)?,
            ));
        Ok(Endpoint::from_shared(self.coordinator.url())?
            .tls_config(tls)?
            .connect()
            .await?)
    }
}

/// Acceptance: revoking a connected agent closes its session at once (the reload happens
/// within the 1 s poll; the deadline here is generous for a loaded machine) and it cannot
/// reconnect; the other agent stays; the coordinator was not restarted.
#[test]
fn revoking_a_connected_agent_closes_its_session_and_it_cannot_reconnect() {
    let mut f = fleet("");
    let pid = f.coordinator.pid();
    let web1 = f.agent("web-1");
    let _web2 = f.agent("web-2");
    f.wait_status("web-1", "online", DEADLINE);
    f.wait_status("web-2", "online", DEADLINE);

    let out = f.pki.revoke("agent", "web-1").expect("pki revoke");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("revoked agent web-1") && printed.contains("crl.pem"),
        "{printed}"
    );
    f.wait_status("web-1", "disconnected", DEADLINE);
    f.wait_log(
        "the coordinator logs the closed connection",
        &[
            "closed connection: client certificate revoked",
            "spiffe://fleet.test/agent/web-1",
        ],
        0,
    );
    // It keeps trying and is refused at the handshake, logged on both sides.
    f.wait_log(
        "the coordinator refuses the reconnecting agent as revoked",
        &["tls handshake refused", "reason=revoked"],
        0,
    );
    eventually("the agent logs its refused reconnection", DEADLINE, || {
        let log = web1.proc.log_text();
        let after = log
            .split("session with coordinator broke")
            .nth(1)
            .ok_or_else(|| anyhow!("no broken session yet:\n{log}"))?;
        if after.contains("coordinator refused the session") {
            Ok(())
        } else {
            bail!("no refused reconnection yet:\n{log}")
        }
    });
    assert_eq!(f.status("web-1").expect("listed"), "disconnected");
    assert_eq!(f.status("web-2").expect("listed"), "online");
    f.assert_not_restarted(pid);
}

/// A protocol-speaking stand-in for an agent that takes runs and never finishes them, so a
/// job stays running for as long as the test needs.
struct SilentAgent {
    _tx: tokio::sync::mpsc::Sender<AgentMessage>,
    _inbound: tonic::Streaming<rollback_common::proto::CoordinatorMessage>,
}

impl SilentAgent {
    async fn connect(f: &Fleet, host: &str) -> Result<Self> {
        let certs = f.pki.agent(host)?;
        let ch = f.channel(&certs).await?;
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
        .context("hello")?;
        let inbound = rollback_common::proto::agent_gateway_client::AgentGatewayClient::new(ch)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            _tx: tx,
            _inbound: inbound,
        })
    }
}

/// Acceptance: revoking an operator cuts their running watch — a raw WatchJob stream and a
/// `rollbackctl watch` process alike — while the job goes on; the coordinator was not restarted.
#[tokio::test(flavor = "multi_thread")]
async fn revoking_an_operator_cuts_a_running_watch() -> Result<()> {
    let mut f = fleet("");
    let pid = f.coordinator.pid();
    let _raw = SilentAgent::connect(&f, "raw-1").await?;
    f.wait_status("raw-1", "online", DEADLINE);
    let mut admin = ConsoleClient::new(f.channel(&f.ada).await?);
    let job_id = admin
        .start_rollback(RollbackRequest {
            procedure: "configuration".into(),
            selector: "host=raw-1".into(),
            reason: "revocation test".into(),
            request_id: "revocation-test-0001".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .job_id;

    let otto = CertFiles {
        cert: f.pki.dir.join("operator/otto.pem"),
        key: f.pki.dir.join("operator/otto.key"),
    };
    let mut stream = ConsoleClient::new(f.channel(&otto).await?)
        .watch_job(WatchJobRequest {
            job_id: job_id.clone(),
            after_seq: 0,
            job_only: false,
        })
        .await?
        .into_inner();
    stream
        .message()
        .await?
        .context("the first event of the job")?;
    let watch_err = f.dir.join("watch.err");
    let mut watch = Command::new(bin("rollbackctl"))
        .arg("--coordinator")
        .arg(f.coordinator.url())
        .arg("--ca")
        .arg(f.pki.ca())
        .arg("--cert")
        .arg(&otto.cert)
        .arg("--key")
        .arg(&otto.key)
        .args(["watch", &job_id])
        .env_remove("ROLLBACK_CONFIG")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(f.dir.join("watch.out"))?)
        .stderr(std::fs::File::create(&watch_err)?)
        .spawn()?;
    let out_path = f.dir.join("watch.out");
    eventually("rollbackctl watch follows the job", DEADLINE, || {
        let out = std::fs::read_to_string(&out_path)?;
        if out.is_empty() {
            bail!("nothing printed yet")
        }
        Ok(())
    });

    f.pki.revoke("operator", "otto")?;
    // The raw stream ends (the connection is gone) although the job is still running.
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        }
    })
    .await
    .context("the watch stream was not cut")?;
    assert!(
        ended.is_some(),
        "the stream broke rather than ended: {ended:?}"
    );
    let job = admin
        .get_job(GetJobRequest {
            job_id: job_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(job.state, "running", "the job itself goes on");
    eventually("rollbackctl watch lost its connection", DEADLINE, || {
        let err = std::fs::read_to_string(&watch_err)?;
        if err.contains("lost the coordinator") {
            Ok(())
        } else {
            bail!("stderr so far: {err}")
        }
    });
    f.wait_log(
        "the coordinator logs the closed connections",
        &[
            "closed connection: client certificate revoked",
            "spiffe://fleet.test/operator/otto",
        ],
        1,
    );
    // rollbackctl watch tries again and is refused at the handshake.
    f.wait_log(
        "the reconnecting watch is refused as revoked",
        &["tls handshake refused", "reason=revoked"],
        0,
    );
    let _ = watch.kill();
    let _ = watch.wait();
    f.assert_not_restarted(pid);
    Ok(())
}

/// With polling off, SIGHUP alone reloads the CRL (and does not stop the coordinator).
#[test]
fn sighup_reloads_the_crl() {
    let mut f = fleet("crl_poll_secs = 0");
    let pid = f.coordinator.pid();
    let _web1 = f.agent("web-1");
    f.wait_status("web-1", "online", DEADLINE);
    f.pki.revoke("agent", "web-1").expect("pki revoke");
    f.coordinator.sighup().expect("SIGHUP");
    f.wait_log(
        "the coordinator reloads on SIGHUP",
        &["loaded CRL", "trigger=\"sighup\"", "revoked=1"],
        0,
    );
    f.wait_status("web-1", "disconnected", DEADLINE);
    f.assert_not_restarted(pid);
}

/// A CRL file that does not parse, or that another CA signed, is refused on reload: the
/// previous CRL stays in force (the revoked agent is still refused) and the error is logged.
#[test]
fn a_crl_that_does_not_load_keeps_the_previous_one() {
    let mut f = fleet("");
    let pid = f.coordinator.pid();
    let _web1 = f.agent("web-1");
    f.wait_status("web-1", "online", DEADLINE);
    f.pki.revoke("agent", "web-1").expect("pki revoke");
    f.wait_status("web-1", "disconnected", DEADLINE);
    let refused = ["tls handshake refused", "reason=revoked"];
    let failed = [
        "CRL reload failed; keeping the previous CRL",
        "kept_revoked=1",
    ];

    std::fs::write(f.pki.crl(), "this is not a CRL\n").expect("write garbage");
    f.wait_log("the garbage CRL is refused", &failed, 0);
    let before = f.log_lines(&refused);
    f.wait_log("web-1 is still refused as revoked", &refused, before);

    let other = Pki::init(&f.dir.join("other-pki"), "fleet.test").expect("other pki");
    other.refresh_crl().expect("their crl");
    std::fs::copy(other.crl(), f.pki.crl()).expect("copy");
    f.wait_log("the foreign CRL is refused", &failed, 1);
    assert!(
        f.coordinator
            .logs()
            .contains("does not verify with the CA's key")
            || f.coordinator.logs().contains("not issued by this CA"),
        "the signature is named:\n{}",
        f.coordinator.logs()
    );
    let before = f.log_lines(&refused);
    f.wait_log("web-1 is still refused as revoked", &refused, before);
    assert_eq!(f.status("web-1").expect("listed"), "disconnected");
    f.assert_not_restarted(pid);
}

/// An expired CRL fails closed: every new client is refused, with an error naming the file and
/// its next update, until a fresh CRL is deployed (`rollbackctl pki crl`).
#[test]
fn an_expired_crl_refuses_everyone_until_a_fresh_one_is_deployed() {
    let mut f = fleet("");
    let pid = f.coordinator.pid();
    let (url, ca) = (f.coordinator.url(), f.pki.ca());
    agents_json(&url, &ca, &f.vera, None).expect("a viewer lists agents");

    std::fs::write(f.pki.crl(), expired_crl(&f.pki).expect("expired crl")).expect("write");
    let crl = f.pki.crl().display().to_string();
    f.wait_log(
        "the coordinator says the CRL is stale",
        &["is past its next update", &crl, "next_update="],
        0,
    );
    let err = eventually("a viewer is refused", DEADLINE, || {
        match agents_json(&url, &ca, &f.vera, None) {
            Ok(_) => bail!("still allowed"),
            Err(e) => Ok(e),
        }
    });
    assert!(
        format!("{err:#}").contains("rollbackctl agents failed"),
        "{err:#}"
    );
    f.wait_log(
        "the refusal names the stale CRL",
        &["tls handshake refused", "reason=CRL expired"],
        0,
    );

    f.pki.refresh_crl().expect("pki crl");
    eventually("a fresh CRL lets the viewer in again", DEADLINE, || {
        agents_json(&url, &ca, &f.vera, None)
    });
    f.assert_not_restarted(pid);
}
