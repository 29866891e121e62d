//! Running the coordinator in production, on loopback with real processes: the gRPC health
//! service behind the same authorization (SERVING, NOT_SERVING while shutting down), the
//! Prometheus `/metrics` page during a job, webhooks told of a halting job (signed, checked
//! here with an HMAC computed independently) while a receiver that never answers delays
//! nothing, SIGHUP reloading operators and refusing a broken file, JSON log lines, a
//! 20,000-host job read whole although it is larger than one agent message, and a watch for a
//! job's end that is sent the job's own events only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use hmac::{Hmac, Mac};
use rollback_common::proto::console_client::ConsoleClient;
use rollback_common::proto::{JobEvent, RollbackRequest, WatchJobRequest};
use rollback_tests::support::{
    Agent, CertFiles, Coordinator, Pki, Proc, Simulator, agents_json, bin, eventually, rollbackctl,
    rollbackctl_command, write_private,
};
use serde_json::Value;
use sha2::Sha256;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DEADLINE: Duration = Duration::from_secs(30);

/// `ok` reads each host's state (any agent, the simulator included); `bad` runs git.log on
/// an agent with no `[app]`, which fails and halts the job.
const RUNBOOK: &str = r#"
[procedures.ok]
description = "reads each host's state"
[[procedures.ok.phases]]
name = "read"
scope = "each"
steps = [{ action = "state.read" }]

[procedures.bad]
description = "git.log where there is no repository"
[[procedures.bad.phases]]
name = "log"
scope = "each"
steps = [{ action = "git.log" }]
"#;

async fn channel(coordinator: &Coordinator, pki: &Pki, certs: &CertFiles) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca())?))
        .identity(Identity::from_pem(
            std::fs::read(&certs.cert)?,
            std::fs::read(&certs.key)?,
        ));
    Ok(Endpoint::from_shared(coordinator.url())?
        .tls_config(tls)?
        .connect()
        .await?)
}

async fn check(ch: Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let answer = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(answer.into_inner().status())
}

/// Acceptance 2 (health): agents and operators with a role get SERVING for the server and
/// both services; an operator without a role and an unknown service are refused; a watcher
/// sees NOT_SERVING when the coordinator is told to stop, and its stream then ends, so it
/// does not hold the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_for_agents_and_operators_and_not_serving_while_shutting_down()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), "health.test")?;
    let mut coordinator = Coordinator::start(tmp.path(), &pki, &[("olga", "viewer")])?;
    let olga = pki.operator("olga")?;
    let mallory = pki.operator("mallory")?;
    let agent = pki.agent("web-1")?;

    for service in [
        "",
        "fleet.rollback.v1.Console",
        "fleet.rollback.v1.AgentGateway",
    ] {
        let ch = channel(&coordinator, &pki, &olga).await?;
        assert_eq!(
            check(ch, service).await?,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let ch = channel(&coordinator, &pki, &agent).await?;
    assert_eq!(check(ch, "").await?, ServingStatus::Serving);
    let ch = channel(&coordinator, &pki, &olga).await?;
    let unknown = check(ch, "no.such.Service")
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let ch = channel(&coordinator, &pki, &mallory).await?;
    let denied = check(ch, "").await.expect_err("no role, no health");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("mallory"), "{denied:?}");

    let ch = channel(&coordinator, &pki, &olga).await?;
    let mut watch = HealthClient::new(ch)
        .watch(HealthCheckRequest { service: "".into() })
        .await?
        .into_inner();
    let first = watch.message().await?.context("a first status")?;
    assert_eq!(first.status(), ServingStatus::Serving);

    let pid = coordinator.pid().context("coordinator runs")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let next = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .context("a status after SIGTERM")??
        .context("the watch told NOT_SERVING before ending")?;
    assert_eq!(next.status(), ServingStatus::NotServing);
    // The watch ends (cleanly or with the connection), well before the grace period holds it.
    let ended = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .context("the watch ends")?;
    assert!(
        !matches!(ended, Ok(Some(_))),
        "no status after NOT_SERVING: {ended:?}"
    );
    assert!(coordinator.stop()?, "clean exit:\n{}", coordinator.logs());
    Ok(())
}

/// One HTTP request as a receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A webhook receiver on loopback: records each request and answers 200, or, while `stall`
/// is set, reads the request and holds the connection without answering (a receiver that is
/// down in the worst way: the coordinator's try only ends at its own timeout).
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    stall: Arc<AtomicBool>,
    connections: Arc<Mutex<u32>>,
}

impl Receiver {
    fn start(stall: bool) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let got = Arc::new(Mutex::new(Vec::new()));
        let stall = Arc::new(AtomicBool::new(stall));
        let connections = Arc::new(Mutex::new(0));
        let (g, s, c) = (got.clone(), stall.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                *c.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
                let (g, s) = (g.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &g, &s);
                });
            }
        });
        Ok(Self {
            url,
            got,
            stall,
            connections,
        })
    }

    fn received(&self) -> Vec<Received> {
        self.got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn serve_one(stream: TcpStream, got: &Mutex<Vec<Received>>, stall: &AtomicBool) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    while stall.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    got.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Received {
            path,
            headers,
            body,
        });
    let mut stream = stream;
    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
    Ok(())
}

/// The signature computed here, independently of the coordinator's code.
fn expected_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn ctl(
    coordinator: &Coordinator,
    pki: &Pki,
    op: &CertFiles,
    args: &[&str],
) -> Result<(bool, String)> {
    let out = rollbackctl(&coordinator.url(), &pki.ca(), op, args)?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn wait_online(coordinator: &Coordinator, pki: &Pki, op: &CertFiles, hosts: usize) {
    eventually("every agent online", DEADLINE, || {
        let online = agents_json(&coordinator.url(), &pki.ca(), op, None)?
            .iter()
            .filter(|a| a["status"] == "online")
            .count();
        (online == hosts)
            .then_some(())
            .ok_or_else(|| anyhow!("{online} of {hosts} online"))
    });
}

/// Acceptance 3: a halting job's started, halted and finished reach the receiver in order,
/// signed (checked with an HMAC computed here); a Slack-format webhook gets `text`; a
/// receiver that holds every request unanswered does not delay the job, which ends while
/// that receiver is still stalled; the report ticks "Notify stakeholders".
#[test]
fn webhooks_hear_a_halting_job_signed_and_a_stalled_receiver_delays_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), "hooks.test")?;
    let op = pki.operator("olga")?;
    let good = Receiver::start(false)?;
    let stalled = Receiver::start(true)?;
    let secret = tmp.path().join("hook.secret");
    write_private(&secret, "s3cret-for-the-test\n")?;
    let mut coordinator = Coordinator::start(tmp.path(), &pki, &[("olga", "approver")])?;
    coordinator.use_runbook(RUNBOOK)?;
    coordinator.append_config(&format!(
        "[inventory.\"web-1\"]\nrole = \"web\"\n\
         [[webhooks]]\nname = \"incident\"\nurl = \"{good}/hook?team=sre\"\nsecret_file = \"{secret}\"\n\
         [[webhooks]]\nname = \"chat\"\nurl = \"{good}/slack\"\nformat = \"slack\"\nevents = [\"halted\"]\n\
         [[webhooks]]\nname = \"down\"\nurl = \"{stalled}/hook\"\n",
        good = good.url,
        stalled = stalled.url,
        secret = secret.display(),
    ))?;
    let certs = pki.agent("web-1")?;
    let _agent = Agent::start(
        tmp.path(),
        "web-1",
        &[("role", "web")],
        &coordinator.url(),
        &pki.ca(),
        &certs,
    )?;
    wait_online(&coordinator, &pki, &op, 1);

    let run = rollbackctl(
        &coordinator.url(),
        &pki.ca(),
        &op,
        &[
            "--output",
            "json",
            "rollback",
            "--procedure",
            "bad",
            "--select",
            "role=web",
            "--reason",
            "webhook test",
            "--yes",
        ],
    )?;
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "the bad procedure halts: {out}");
    let job: Value =
        serde_json::from_str(&out).with_context(|| format!("rollbackctl printed {out}"))?;
    let job_id = job["job_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(job["state"], "halted", "{job}");
    // The job ended while the stalled receiver still holds its first request unanswered.
    assert!(stalled.stall.load(Ordering::SeqCst));
    assert!(stalled.received().is_empty());

    let hooks = eventually("started, halted and finished delivered", DEADLINE, || {
        let got: Vec<Received> = good
            .received()
            .into_iter()
            .filter(|r| r.path.starts_with("/hook"))
            .collect();
        ensure!(got.len() >= 3, "{} delivered so far", got.len());
        Ok(got)
    });
    let events: Vec<String> = hooks
        .iter()
        .map(|r| r.json()["event"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(events, ["started", "halted", "finished"], "{hooks:?}");
    for r in &hooks {
        assert_eq!(r.path, "/hook?team=sre");
        let body = r.json();
        assert_eq!(body["job_id"], job_id.as_str(), "{body}");
        let ts = r
            .header("x-fleet-rollback-timestamp")
            .context("timestamp header")?;
        let sig = r
            .header("x-fleet-rollback-signature")
            .context("signature header")?;
        assert_eq!(sig, expected_signature(b"s3cret-for-the-test", ts, &r.body));
        assert_ne!(sig, expected_signature(b"another secret", ts, &r.body));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert_eq!(hooks[2].json()["job_state"], "halted");

    let chat = eventually("the chat webhook hears the halt", DEADLINE, || {
        good.received()
            .into_iter()
            .find(|r| r.path == "/slack")
            .ok_or_else(|| anyhow!("nothing on /slack yet"))
    });
    let text = chat.json()["text"].as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("HALTED") && text.contains(&job_id[..12]),
        "{text}"
    );
    assert!(
        chat.header("x-fleet-rollback-signature").is_none(),
        "no secret, no signature"
    );

    let report = eventually("the report ticks Notify stakeholders", DEADLINE, || {
        let (ok, md) = ctl(&coordinator, &pki, &op, &["report", &job_id])?;
        ensure!(ok, "{md}");
        ensure!(md.contains("- [x] Notify stakeholders of rollback"), "{md}");
        Ok(md)
    });
    assert!(
        report.contains("webhook=incident event=started"),
        "{report}"
    );

    // Released, the stalled receiver gets the events it was sent, and the coordinator said
    // nothing about the job waiting for it.
    assert!(
        *stalled
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            >= 1
    );
    stalled.stall.store(false, Ordering::SeqCst);
    eventually(
        "the stalled receiver catches up",
        Duration::from_secs(90),
        || {
            let n = stalled.received().len();
            ensure!(n >= 3, "{n} received");
            Ok(())
        },
    );
    coordinator.stop()?;
    Ok(())
}

/// The metrics listener's address from the coordinator's log (its latest start).
fn metrics_addr(coordinator: &Coordinator) -> Result<String> {
    coordinator
        .logs()
        .lines()
        .rfind(|l| l.contains("metrics listening"))
        .and_then(|l| l.split("addr=Some(").nth(1))
        .and_then(|s| s.split(')').next())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no `metrics listening` line:\n{}", coordinator.logs()))
}

/// One HTTP/1.1 request to the metrics listener: (status line, body).
fn http(addr: &str, method: &str, path: &str) -> Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

/// The value of the sample `name` exactly (labels included), if present.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Acceptance 2 (metrics, on loopback; the lab's packaged coordinator is scraped in
/// lab_package): during a job the page shows it running with its hosts and in-flight runs;
/// after it, the counters and step durations include it. Other paths and methods are refused.
#[test]
fn metrics_show_a_running_job_and_its_runs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), "metrics.test")?;
    let op = pki.operator("olga")?;
    let mut coordinator = Coordinator::start_with(
        tmp.path(),
        &pki,
        &[("olga", "operator")],
        "metrics_listen = \"127.0.0.1:0\"",
    )?;
    coordinator.use_runbook(RUNBOOK)?;
    coordinator.label_simulated(2)?;
    let addr = metrics_addr(&coordinator)?;
    let sim_dir = tmp.path().join("sim");
    std::fs::create_dir_all(&sim_dir)?;
    let _sim = Simulator::start_slow(&sim_dir, &[coordinator.url()], &pki, 2, 4000)?;
    wait_online(&coordinator, &pki, &op, 2);
    let idle = http(&addr, "GET", "/metrics")?;
    assert!(idle.0.contains("200"), "{idle:?}");
    assert_eq!(
        sample(&idle.1, "fleet_rollback_agents_online"),
        Some(2.0),
        "{}",
        idle.1
    );
    assert_eq!(
        sample(&idle.1, "fleet_rollback_jobs{state=\"running\"}"),
        Some(0.0)
    );
    assert!(sample(&idle.1, "fleet_rollback_sessions").is_some_and(|n| n >= 2.0));

    let mut follow = rollbackctl_command(
        &coordinator.url(),
        &pki.ca(),
        &op,
        &[
            "--output",
            "json",
            "rollback",
            "--procedure",
            "ok",
            "--select",
            "sim=yes",
            "--batch-size",
            "100%",
            "--reason",
            "metrics test",
            "--yes",
        ],
    );
    let mut follow = follow
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let during = eventually("the running job on the page", DEADLINE, || {
        let (_, page) = http(&addr, "GET", "/metrics")?;
        ensure!(
            page.contains("fleet_rollback_job_runs{job=\""),
            "no job_runs yet"
        );
        Ok(page)
    });
    assert_eq!(
        sample(&during, "fleet_rollback_jobs{state=\"running\"}"),
        Some(1.0),
        "{during}"
    );
    let job_line = during
        .lines()
        .find(|l| l.starts_with("fleet_rollback_job_hosts{job=\""))
        .context("job_hosts line")?;
    assert!(job_line.contains("procedure=\"ok\""), "{job_line}");
    let job_id = job_line
        .split("job=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_default()
        .to_string();
    assert!(
        during.contains(&format!(
            "fleet_rollback_job_runs{{job=\"{job_id}\",status=\"in_flight\"}}"
        )),
        "{during}"
    );

    let status = follow.wait()?;
    let mut out = String::new();
    if let Some(mut o) = follow.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&job_id),
        "the job the page showed is the one that ran: {out}"
    );
    let (_, after) = http(&addr, "GET", "/metrics")?;
    assert_eq!(
        sample(&after, "fleet_rollback_jobs{state=\"running\"}"),
        Some(0.0)
    );
    assert!(
        !after.contains(&job_id),
        "an ended job leaves the gauges: {after}"
    );
    assert_eq!(
        sample(&after, "fleet_rollback_jobs_started_total"),
        Some(1.0),
        "{after}"
    );
    // `rollback --yes` asks nothing, so it previews nothing: the coordinator plans the job
    // once, for the start, and rollbackctl shows that plan.
    assert_eq!(
        sample(&after, "fleet_rollback_plans_total{purpose=\"preview\"}"),
        Some(0.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "fleet_rollback_plans_total{purpose=\"start\"}"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "fleet_rollback_jobs_finished_total{state=\"succeeded\"}"
        ),
        Some(1.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            "fleet_rollback_runs_total{status=\"STEP_STATUS_SUCCEEDED\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "fleet_rollback_step_duration_seconds_count{action=\"state.read\"}"
        ),
        Some(2.0),
        "{after}"
    );
    assert!(
        sample(&after, "fleet_rollback_store_commit_seconds_count").is_some_and(|n| n > 0.0),
        "{after}"
    );
    assert!(
        sample(&after, "fleet_rollback_dispatch_seconds_count").is_some_and(|n| n >= 2.0),
        "{after}"
    );
    let (status, _) = http(&addr, "GET", "/")?;
    assert!(status.contains("404"), "{status}");
    let (status, _) = http(&addr, "POST", "/metrics")?;
    assert!(status.contains("405"), "{status}");
    // Idle connections cannot starve the listener of descriptors: beyond 16 open at once a
    // connection is closed unanswered; once they go, scrapes are answered again.
    let idle: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(&addr))
        .collect::<std::io::Result<_>>()?;
    eventually("a 17th connection is refused", DEADLINE, || {
        let (status, _) = http(&addr, "GET", "/metrics").unwrap_or_default();
        ensure!(status.is_empty(), "answered: {status}");
        Ok(())
    });
    drop(idle);
    eventually("scrapes answered again", DEADLINE, || {
        let (status, _) = http(&addr, "GET", "/metrics")?;
        ensure!(status.contains("200"), "{status:?}");
        Ok(())
    });
    coordinator.stop()?;
    Ok(())
}

/// Rewrites the config's `[operators]` table (the last table the harness writes) to `ops`.
fn set_operators(coordinator: &Coordinator, ops: &str) -> Result<()> {
    let text = std::fs::read_to_string(&coordinator.config)?;
    let head = text
        .split("[operators]\n")
        .next()
        .context("config has [operators]")?;
    std::fs::write(&coordinator.config, format!("{head}[operators]\n{ops}"))?;
    Ok(())
}

fn wait_log(coordinator: &Coordinator, needle: &str, count: usize) {
    eventually(needle, DEADLINE, || {
        let n = coordinator.logs().matches(needle).count();
        ensure!(n >= count, "{n} of {count} `{needle}` lines");
        Ok(())
    });
}

/// Acceptance 4: SIGHUP with an operator added lets that operator call at once, without a
/// restart and without dropping a running job or an agent's session; a broken file (bad
/// TOML, an unknown role, a runbook that does not load) is refused with a line saying why,
/// and the old operators stay in force. Both are in the audit trail.
#[test]
fn sighup_adds_an_operator_at_once_and_a_broken_config_keeps_the_old_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), "reload.test")?;
    let olga = pki.operator("olga")?;
    let bob = pki.operator("bob")?;
    let mut coordinator = Coordinator::start(tmp.path(), &pki, &[("olga", "approver")])?;
    coordinator.use_runbook(RUNBOOK)?;
    coordinator.label_simulated(1)?;
    let pid = coordinator.pid();
    let sim_dir = tmp.path().join("sim");
    std::fs::create_dir_all(&sim_dir)?;
    let _sim = Simulator::start_slow(&sim_dir, &[coordinator.url()], &pki, 1, 3000)?;
    wait_online(&coordinator, &pki, &olga, 1);
    let sessions_before = coordinator.logs().matches("agent online").count();

    let (ok, out) = ctl(&coordinator, &pki, &bob, &["agents"])?;
    assert!(!ok && out.contains("bob"), "bob has no role yet: {out}");

    // A job runs across the reload.
    let mut follow = rollbackctl_command(
        &coordinator.url(),
        &pki.ca(),
        &olga,
        &[
            "rollback",
            "--procedure",
            "ok",
            "--select",
            "sim=yes",
            "--reason",
            "across a reload",
            "--yes",
        ],
    );
    let mut follow = follow.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    wait_log(&coordinator, "job started", 1);

    set_operators(&coordinator, "olga = \"approver\"\nbob = \"viewer\"\n")?;
    coordinator.sighup()?;
    wait_log(&coordinator, "configuration reloaded", 1);
    let (ok, out) = ctl(&coordinator, &pki, &bob, &["agents"])?;
    assert!(ok, "bob calls at once after the reload: {out}");
    assert!(
        follow.wait()?.success(),
        "the job across the reload succeeded"
    );

    for (broken, why) in [
        (
            "olga = \"approver\"\nbob = \"viewer\"\n[oops\n",
            "coordinator config",
        ),
        ("olga = \"approver\"\nbob = \"emperor\"\n", "emperor"),
    ] {
        set_operators(&coordinator, broken)?;
        let refused = coordinator.logs().matches("reload refused").count();
        coordinator.sighup()?;
        wait_log(&coordinator, "reload refused", refused + 1);
        let line = coordinator
            .logs()
            .lines()
            .rfind(|l| l.contains("reload refused"))
            .unwrap_or_default()
            .to_string();
        assert!(line.contains(why), "the line says why: {line}");
        let (ok, out) = ctl(&coordinator, &pki, &bob, &["agents"])?;
        assert!(ok, "bob keeps his role from the config in force: {out}");
    }
    // A runbook that does not load is refused too, and removing bob then works.
    let text = std::fs::read_to_string(&coordinator.config)?;
    let good_ops = "olga = \"approver\"\n";
    std::fs::write(
        &coordinator.config,
        format!("runbook = \"/nonexistent/runbook.toml\"\n{text}"),
    )?;
    set_operators(&coordinator, good_ops)?;
    coordinator.sighup()?;
    wait_log(&coordinator, "reload refused", 3);
    assert!(
        ctl(&coordinator, &pki, &bob, &["agents"])?.0,
        "still in force"
    );
    std::fs::write(&coordinator.config, text)?;
    set_operators(&coordinator, good_ops)?;
    coordinator.sighup()?;
    wait_log(&coordinator, "configuration reloaded", 2);
    let (ok, out) = ctl(&coordinator, &pki, &bob, &["agents"])?;
    assert!(!ok && out.contains("no role"), "bob removed at once: {out}");

    assert_eq!(coordinator.pid(), pid, "never restarted");
    assert!(coordinator.proc.exited()?.is_none());
    assert_eq!(
        coordinator.logs().matches("agent online").count(),
        sessions_before,
        "the agent's session was never dropped"
    );
    let (ok, audit) = ctl(&coordinator, &pki, &olga, &["audit", "--limit", "100"])?;
    assert!(ok, "{audit}");
    assert_eq!(audit.matches("config.reloaded").count(), 2, "{audit}");
    assert_eq!(audit.matches("config.reload_refused").count(), 3, "{audit}");
    coordinator.stop()?;
    Ok(())
}

/// `log_format = "json"`: every line the coordinator writes is one JSON object with a level,
/// a timestamp and the message in its fields.
#[test]
fn json_logs_are_one_object_per_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), "logs.test")?;
    let mut coordinator = Coordinator::start(tmp.path(), &pki, &[("olga", "viewer")])?;
    coordinator.stop()?;
    let text = std::fs::read_to_string(&coordinator.config)?;
    let config = tmp.path().join("json.toml");
    std::fs::write(&config, format!("log_format = \"json\"\n{text}"))?;
    let mut cmd = Command::new(bin("rollback-coordinator"));
    cmd.arg("--config").arg(&config).env("ROLLBACK_LOG", "info");
    let mut proc = Proc::spawn(cmd, tmp.path().join("json.log"))?;
    let log = eventually("listening", DEADLINE, || {
        let log = proc.log_text();
        ensure!(log.contains("coordinator listening"), "not yet:\n{log}");
        Ok(log)
    });
    ensure_json_lines(&log)?;
    assert!(proc.terminate(Duration::from_secs(15))?, "clean exit");
    let log = proc.log_text();
    ensure_json_lines(&log)?;
    assert!(log.contains("coordinator stopped"), "{log}");
    Ok(())
}

fn ensure_json_lines(log: &str) -> Result<()> {
    let mut n = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON line: {line}"))?;
        if v["level"].as_str().is_none()
            || v["timestamp"].as_str().is_none()
            || v["fields"]["message"].as_str().is_none()
        {
            bail!("a JSON line lacks level, timestamp or fields.message: {line}");
        }
        n += 1;
    }
    ensure!(n >= 2, "some lines: {log}");
    Ok(())
}

/// A finished job on a 20,000-host fleet is past the 4 MiB an agent's session allows in one
/// message (about 4.6 MB here): `job show` reads it whole rather than failing with "encoded
/// message length too large". The job is written into the store behind the coordinator's
/// back, as a 20,000-host job would leave it (no agents are needed to read a finished job).
#[test]
fn a_job_larger_than_an_agent_message_is_shown_whole() -> Result<()> {
    const HOSTS: usize = 20_000;
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), "big.test")?;
    let op = pki.operator("vera")?;
    let coordinator = Coordinator::start(tmp.path(), &pki, &[("vera", "viewer")])?;
    let db = coordinator.database();
    let job = "b16b16b16b16b16b16b16b16b16b16b1";
    db.exec(&format!(
        "INSERT INTO jobs (job_id, procedure, request, plan, state, reason, requested_by,
                           created_at_ms, finished_at_ms)
         VALUES ('{job}', 'noop', {empty}, {empty}, 'succeeded', 'a big fleet', 'vera', 1, 2);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {HOSTS})
         INSERT INTO job_hosts (job_id, host_id, ord, outcome, phase, detail, duration_ms)
         SELECT '{job}', 'host-' || i, i, 'succeeded', 'noop',
                'host-' || i || ' succeeded: {filler}', 12
         FROM n;",
        empty = db.blob(""),
        filler = "x".repeat(180),
    ))?;
    let (ok, out) = ctl(
        &coordinator,
        &pki,
        &op,
        &["--output", "json", "job", "show", job],
    )?;
    ensure!(ok, "job show failed:\n{}", &out[..out.len().min(2000)]);
    let doc: Value = serde_json::from_str(&out).context("job show printed JSON")?;
    let hosts = doc["hosts"].as_array().context("hosts")?;
    assert_eq!(hosts.len(), HOSTS, "every host of the job");
    assert_eq!(hosts[0]["host_id"], "host-1");
    assert_eq!(hosts[HOSTS - 1]["host_id"], format!("host-{HOSTS}"));
    assert_eq!(doc["state"], "succeeded");
    Ok(())
}

/// The events of a watch of `job_id` from its start, `job_only` or all, until it ends.
async fn watched(ch: Channel, job_id: &str, job_only: bool) -> Result<Vec<JobEvent>> {
    let mut stream = ConsoleClient::new(ch)
        .watch_job(WatchJobRequest {
            job_id: job_id.to_string(),
            after_seq: 0,
            job_only,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(ev) = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .context("the watch went quiet before the job's end")??
    {
        events.push(ev);
    }
    Ok(events)
}

/// A watch that only waits for a job's end (`job_only`, as `rollbackctl --output json
/// rollback` asks) is sent the job's own events and none of its hosts', both live and
/// replayed from the store, and still ends at `job.finished`; a full watch of the same job,
/// at the same time, gets the hosts' events too, and the job's own events in the same order.
#[test]
fn a_watch_for_the_end_is_sent_the_jobs_own_events_only() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), "watch.test")?;
    let op = pki.operator("olga")?;
    let mut coordinator = Coordinator::start(tmp.path(), &pki, &[("olga", "operator")])?;
    coordinator.use_runbook(RUNBOOK)?;
    coordinator.label_simulated(3)?;
    let sim_dir = tmp.path().join("sim");
    std::fs::create_dir_all(&sim_dir)?;
    // Slow steps: the watches below begin while the job runs, so they follow it live.
    let _sim = Simulator::start_slow(&sim_dir, &[coordinator.url()], &pki, 3, 1500)?;
    wait_online(&coordinator, &pki, &op, 3);

    tokio::runtime::Runtime::new()?.block_on(async {
        let job_id = ConsoleClient::new(channel(&coordinator, &pki, &op).await?)
            .start_rollback(RollbackRequest {
                procedure: "ok".into(),
                selector: "sim=yes".into(),
                reason: "watch test".into(),
                request_id: "watch-test-0001".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .job_id;
        let (own, all) = tokio::join!(
            watched(channel(&coordinator, &pki, &op).await?, &job_id, true),
            watched(channel(&coordinator, &pki, &op).await?, &job_id, false),
        );
        let (own, all) = (own?, all?);
        let kinds = |evs: &[JobEvent]| evs.iter().map(|e| e.kind.clone()).collect::<Vec<_>>();
        ensure!(
            own.iter().all(|e| e.host_id.is_empty()),
            "a job-only watch was sent a host's event: {:?}",
            own.iter().find(|e| !e.host_id.is_empty())
        );
        ensure!(
            own.first().map(|e| e.kind.as_str()) == Some("job.started")
                && own.last().map(|e| e.kind.as_str()) == Some("job.finished"),
            "a job-only watch sees the start and ends at the end: {:?}",
            kinds(&own)
        );
        let seqs = |evs: &[JobEvent]| evs.iter().map(|e| e.seq).collect::<Vec<_>>();
        let all_own: Vec<JobEvent> = all
            .iter()
            .filter(|e| e.host_id.is_empty())
            .cloned()
            .collect();
        ensure!(
            seqs(&own) == seqs(&all_own),
            "the job's own events, job-only {:?} and in the full watch {:?}",
            kinds(&own),
            kinds(&all_own)
        );
        let host_events = all.iter().filter(|e| !e.host_id.is_empty()).count();
        ensure!(
            host_events >= 3 * 3,
            "the full watch has each host's dispatch, step and end ({host_events} host events)"
        );
        // After the end: replayed from the store, the same events.
        let replayed = watched(channel(&coordinator, &pki, &op).await?, &job_id, true).await?;
        ensure!(
            seqs(&replayed) == seqs(&own),
            "replayed {:?}, live {:?}",
            kinds(&replayed),
            kinds(&own)
        );
        Ok(())
    })
}
