//! Agents configured with several coordinators (`coordinators = [...]`): an agent holds one
//! session with one coordinator at a time and moves to the next when its coordinator goes
//! away. Two real coordinators (each with its own SQLite store) on loopback, one real agent
//! and a few simulated ones: the first address dead at start, kill -9 of the coordinator
//! holding them (online on the other within 10 s, and an exec and a one-step rollback started
//! there right after reach them), the killed one restarted (nothing moves back, no second
//! session), the coordinator's certificate verified against the URL's host name rather than
//! the address it resolved to, and the configuration errors.
//! (One name resolving to several addresses is tested in `rollback_agent::coordinators`,
//! with a resolver the test controls: loopback names here resolve to one address.)

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rollback_tests::support::{
    Agent, CertFiles, Coordinator, NOOP_RUNBOOK, Pki, Simulator, agents_json, bin,
    coordinators_line, eventually, exec_json, rollbackctl, write_private,
};
use serde_json::Value;

/// Generous deadline for everything the acceptance does not bound.
const DEADLINE: Duration = Duration::from_secs(60);
/// The acceptance: a killed coordinator's agents are online on another within 10 s.
const FAILOVER: Duration = Duration::from_secs(10);
/// Simulated agents spread over the two coordinators.
const SIMULATED: usize = 4;

struct Pair {
    tmp: tempfile::TempDir,
    pki: Pki,
    op: CertFiles,
    a: Coordinator,
    b: Coordinator,
}

/// Two coordinators of one fleet CA, each in its own directory with its own store and
/// certificate, both valid for 127.0.0.1 and localhost.
fn pair() -> Pair {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "fleet.test").expect("pki");
    let op = pki.operator("olga").expect("operator");
    let start = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        Coordinator::start_named(
            &dir,
            &pki,
            &[("olga", "admin")],
            name,
            &["127.0.0.1", "localhost"],
        )
        .expect("coordinator starts")
    };
    let (a, b) = (start("coord-a"), start("coord-b"));
    Pair { tmp, pki, op, a, b }
}

impl Pair {
    fn agents(&self, c: &Coordinator) -> Result<Vec<Value>> {
        agents_json(&c.url(), &self.pki.ca(), &self.op, None)
    }

    /// Hosts `c` lists online.
    fn online(&self, c: &Coordinator) -> Result<Vec<String>> {
        Ok(self
            .agents(c)?
            .iter()
            .filter(|a| a["status"] == "online")
            .filter_map(|a| a["host_id"].as_str().map(String::from))
            .collect())
    }

    fn wait_online(&self, c: &Coordinator, host: &str, within: Duration) {
        eventually(&format!("{host} online on {}", c.url()), within, || {
            let online = self.online(c)?;
            ensure!(online.iter().any(|h| h == host), "online there: {online:?}");
            Ok(())
        });
    }
}

/// An HTTP endpoint on loopback that answers 200 to everything (the real agent's
/// `http.check` target); it lives as long as the test process.
fn ok_endpoint() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    port
}

/// A loopback address nothing listens on (bound, then released).
fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("https://{addr}")
}

fn app_profile(dir: &Path, port: u16) -> String {
    let app = dir.join("app");
    std::fs::create_dir_all(&app).expect("mkdir app");
    format!(
        "[app]\ndir = \"{}\"\nhealth_base_url = \"http://127.0.0.1:{port}\"\n",
        app.display()
    )
}

fn sessions_established(agent: &Agent) -> usize {
    agent
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("session established"))
        .count()
}

/// `http.check` on `host` through coordinator `c`; panics unless it succeeded.
fn check_through(p: &Pair, c: &Coordinator, host: &str) {
    let (ok, doc, stderr) = exec_json(
        &c.url(),
        &p.pki.ca(),
        &p.op,
        host,
        "http.check",
        &["endpoint=/readyz"],
        &[],
    )
    .expect("rollbackctl exec runs");
    assert!(ok, "exec on {host} through {}: {doc} {stderr}", c.url());
    assert_eq!(doc["status"], "succeeded", "{doc}");
}

#[test]
fn the_first_coordinator_dead_at_start_the_agent_comes_online_on_the_second() {
    let p = pair();
    let dead = dead_url();
    let certs = p.pki.agent("web-1").expect("issue");
    let port = ok_endpoint();
    let agent = Agent::start_with_coordinators(
        p.tmp.path(),
        "web-1",
        &[("role", "web")],
        &[dead.clone(), p.b.url()],
        &p.pki.ca(),
        &certs,
        &app_profile(p.tmp.path(), port),
    )
    .expect("agent starts");
    p.wait_online(&p.b, "web-1", DEADLINE);
    check_through(&p, &p.b, "web-1");
    let log = agent.proc.log_text();
    assert!(
        log.lines().any(
            |l| l.contains("session failed before the coordinator acknowledged it")
                && l.contains(&dead)
        ),
        "the dead address was tried and the move logged:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("session established") && l.contains(&p.b.url())),
        "the log names the coordinator it is connected to:\n{log}"
    );
    assert!(
        !p.online(&p.a)
            .expect("list a")
            .contains(&"web-1".to_string()),
        "one session at a time"
    );
}

#[test]
fn kill_9_of_the_coordinator_moves_its_agents_to_the_other_within_10s_and_nothing_moves_back() {
    let mut p = pair();
    // B runs the one-step no-op runbook and targets the simulated hosts.
    p.b.use_runbook(NOOP_RUNBOOK).expect("runbook");
    p.b.label_simulated(SIMULATED).expect("inventory");
    let urls = [p.a.url(), p.b.url()];
    let certs = p.pki.agent("web-1").expect("issue");
    let port = ok_endpoint();
    let agent = Agent::start_with_coordinators(
        p.tmp.path(),
        "web-1",
        &[("role", "web")],
        &urls,
        &p.pki.ca(),
        &certs,
        &app_profile(p.tmp.path(), port),
    )
    .expect("agent starts");
    let _sim =
        Simulator::start_with_coordinators(p.tmp.path(), &urls, &p.pki, SIMULATED).expect("sim");

    // The agent starts at the first coordinator; the simulated ones are spread: sim-00001
    // and sim-00003 on A, sim-00002 and sim-00004 on B.
    p.wait_online(&p.a, "web-1", DEADLINE);
    eventually("simulated agents spread over A and B", DEADLINE, || {
        let (on_a, on_b) = (p.online(&p.a)?, p.online(&p.b)?);
        let sims = |v: &[String]| {
            let mut s: Vec<String> = v
                .iter()
                .filter(|h| h.starts_with("sim-"))
                .cloned()
                .collect();
            s.sort();
            s
        };
        ensure!(
            sims(&on_a) == ["sim-00001", "sim-00003"] && sims(&on_b) == ["sim-00002", "sim-00004"],
            "on A {on_a:?}, on B {on_b:?}"
        );
        Ok(())
    });
    assert!(
        !p.online(&p.b)
            .expect("list b")
            .contains(&"web-1".to_string())
    );
    assert_eq!(sessions_established(&agent), 1);

    // kill -9 of A: every agent it held is online on B within 10 s.
    p.a.proc.kill();
    eventually("A's agents online on B", FAILOVER, || {
        let on_b = p.online(&p.b)?;
        let want = ["web-1", "sim-00001", "sim-00002", "sim-00003", "sim-00004"];
        let missing: Vec<&str> = want
            .iter()
            .copied()
            .filter(|h| !on_b.iter().any(|o| o == h))
            .collect();
        ensure!(missing.is_empty(), "not yet on B: {missing:?}");
        Ok(())
    });

    // Started on B right after: an exec reaches the real agent, a one-step rollback every
    // simulated one.
    check_through(&p, &p.b, "web-1");
    let out = rollbackctl(
        &p.b.url(),
        &p.pki.ca(),
        &p.op,
        &[
            "--output",
            "json",
            "rollback",
            "--procedure",
            "noop",
            "--select",
            "sim=yes",
            "--reason",
            "failover test",
            "--yes",
            "--canary",
            "0",
            "--batch-size",
            "100%",
        ],
    )
    .expect("rollbackctl runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rollback on B failed: {stderr}");
    let job: Value = serde_json::from_slice(&out.stdout).expect("job json");
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let hosts = job["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), SIMULATED, "{job:#}");
    for h in hosts {
        assert_eq!(h["outcome"], "succeeded", "{h:#}");
    }
    let log = agent.proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("moving to the next coordinator")
                && l.contains(&p.a.url())
                && l.contains("reason=")),
        "the move is logged with its reason:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("session established") && l.contains(&p.b.url())),
        "the log names the new coordinator:\n{log}"
    );

    // A comes back: nothing breaks, nothing moves back, no second session.
    p.a.restart().expect("A restarts on its port and store");
    check_through(&p, &p.b, "web-1");
    let on_a = p.online(&p.a).expect("list a");
    assert!(on_a.is_empty(), "nobody moved back to A: {on_a:?}");
    let on_b = p.online(&p.b).expect("list b");
    assert_eq!(on_b.len(), SIMULATED + 1, "all still on B: {on_b:?}");
    assert_eq!(
        sessions_established(&agent),
        2,
        "one session with A, then one with B:\n{}",
        agent.proc.log_text()
    );
    let a_row = p
        .agents(&p.a)
        .expect("list a")
        .into_iter()
        .find(|r| r["host_id"] == "web-1")
        .expect("A remembers web-1");
    assert_eq!(a_row["status"], "disconnected", "{a_row}");
}

#[test]
fn the_coordinator_certificate_is_verified_against_the_url_host_name_not_the_address() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "fleet.test").expect("pki");
    let op = pki.operator("olga").expect("operator");
    let dir = tmp.path().join("coord-dns");
    std::fs::create_dir_all(&dir).expect("mkdir");
    // A certificate for the name only: an agent that verified the resolved address
    // (127.0.0.1) would refuse it.
    let c = Coordinator::start_named(
        &dir,
        &pki,
        &[("olga", "admin")],
        "coord-dns",
        &["localhost"],
    )
    .expect("coordinator");
    let port = c.addr.port();
    let by_ip = format!("https://127.0.0.1:{port}");
    let by_name = format!("https://localhost:{port}");

    let certs = pki.agent("web-1").expect("issue");
    let agent = Agent::start_with_coordinators(
        tmp.path(),
        "web-1",
        &[],
        &[by_ip.clone(), by_name.clone()],
        &pki.ca(),
        &certs,
        "",
    )
    .expect("agent starts");
    eventually("web-1 online through the name", DEADLINE, || {
        let agents = agents_json(&by_name, &pki.ca(), &op, None)?;
        ensure!(
            agents
                .iter()
                .any(|a| a["host_id"] == "web-1" && a["status"] == "online"),
            "{agents:?}"
        );
        Ok(())
    });
    // The coordinator lists the agent online on its hello, a moment before the agent logs
    // the acknowledgement.
    eventually("web-1 logs its session through the name", DEADLINE, || {
        let log = agent.proc.log_text();
        ensure!(
            log.lines()
                .any(|l| l.contains("session established") && l.contains(&by_name)),
            "{log}"
        );
        Ok(())
    });
    // The same address under the IP URL was refused: the certificate is not valid for it.
    let log = agent.proc.log_text();
    assert!(
        log.lines().any(
            |l| l.contains("session failed before the coordinator acknowledged it")
                && l.contains(&by_ip)
        ),
        "{log}"
    );
}

/// Runs the agent with `coordinator_lines` as its coordinator settings; returns its stderr
/// after it exits, which it must, with a failure.
fn refused_config(dir: &Path, name: &str, coordinator_lines: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    write_private(
        &path,
        format!(
            "host_id = \"web-1\"\n{coordinator_lines}state_dir = \"state-{name}\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"web-1.pem\"\nkey = \"web-1.key\"\n"
        ),
    )
    .expect("write config");
    let out = Command::new(bin("rollback-agent"))
        .arg("--config")
        .arg(&path)
        .env("ROLLBACK_LOG", "info")
        .output()
        .context("running rollback-agent")
        .expect("agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{name}: config accepted: {stderr}");
    assert!(
        stderr.contains(&path.display().to_string()),
        "{name}: the error names the file: {stderr}"
    );
    stderr
}

#[test]
fn coordinator_settings_that_are_wrong_are_refused_with_what_to_change() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let both = refused_config(
        dir,
        "both",
        &format!(
            "coordinator = \"https://a.test:7443\"\n{}",
            coordinators_line(&["https://b.test:7443".into()])
        ),
    );
    assert!(
        both.contains("`coordinator`")
            && both.contains("`coordinators`")
            && both.contains("keep one"),
        "{both}"
    );
    let empty = refused_config(dir, "empty", "coordinators = []\n");
    assert!(
        empty.contains("key `coordinators`") && empty.contains("empty"),
        "{empty}"
    );
    let none = refused_config(dir, "none", "");
    assert!(
        none.contains("key `coordinators`") && none.contains("no coordinator"),
        "{none}"
    );
    let plain = refused_config(
        dir,
        "plain",
        &coordinators_line(&["https://a.test:7443".into(), "http://b.test:7443".into()]),
    );
    assert!(
        plain.contains("key `coordinators`")
            && plain.contains("`http://b.test:7443` must be an https:// URL"),
        "{plain}"
    );
    let path = refused_config(
        dir,
        "path",
        &coordinators_line(&["https://a.test:7443/grpc".into()]),
    );
    assert!(
        path.contains("`https://a.test:7443/grpc` must be https://HOST[:PORT]"),
        "{path}"
    );
    let single = refused_config(dir, "single", "coordinator = \"http://a.test:7443\"\n");
    assert!(
        single.contains("key `coordinator`") && single.contains("must be an https:// URL"),
        "{single}"
    );
}
