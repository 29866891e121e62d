//! Certificate lifecycle on loopback with the real binaries: `rollbackctl pki renew` and
//! `pki list`, a running agent taking a renewed certificate without a restart (and never in
//! the middle of a run), a pair for another host or a corrupt file refused while the agent
//! keeps working, and `rollbackctl agents` warning about certificates expiring within 30 days.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use rollback_tests::support::{
    Agent, CertFiles, Coordinator, Pki, agents_json, eventually, exec_json, rollbackctl,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);
/// Agents here look at their certificate files every second.
const FAST_CHECKS: &str = "cert_check_secs = 1\n";

struct Fleet {
    tmp: tempfile::TempDir,
    pki: Pki,
    coordinator: Coordinator,
    op: CertFiles,
}

fn fleet() -> Fleet {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "fleet.test").expect("pki");
    let op = pki.operator("olga").expect("operator");
    let coordinator =
        Coordinator::start(tmp.path(), &pki, &[("olga", "operator")]).expect("coordinator");
    Fleet {
        tmp,
        pki,
        coordinator,
        op,
    }
}

impl Fleet {
    fn agent(&self, host: &str, certs: &CertFiles, profile: &str) -> Agent {
        Agent::start_with_settings(
            self.tmp.path(),
            host,
            &[("role", "web")],
            &self.coordinator.url(),
            &self.pki.ca(),
            certs,
            FAST_CHECKS,
            profile,
        )
        .expect("agent starts")
    }

    fn agents(&self) -> Result<Vec<Value>> {
        agents_json(&self.coordinator.url(), &self.pki.ca(), &self.op, None)
    }

    /// The agent's row once it is online with a certificate valid for `days` more days.
    fn online_with_days_left(&self, host: &str, days: i64) -> Value {
        eventually(
            &format!("{host} online with a certificate valid {days} more days"),
            DEADLINE,
            || {
                let row = self
                    .agents()?
                    .into_iter()
                    .find(|a| a["host_id"] == host)
                    .ok_or_else(|| anyhow!("{host} not listed"))?;
                ensure!(row["status"] == "online", "not online: {row}");
                ensure!(row["cert_days_left"] == days, "days left: {row}");
                Ok(row)
            },
        )
    }

    /// `rollbackctl agents` as a table.
    fn agents_table(&self) -> String {
        let out = rollbackctl(
            &self.coordinator.url(),
            &self.pki.ca(),
            &self.op,
            &["agents"],
        )
        .expect("rollbackctl agents");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many sessions of `host` the coordinator has accepted (every start).
    fn sessions_of(&self, host: &str) -> usize {
        self.coordinator
            .logs()
            .lines()
            .filter(|l| l.contains("agent online") && l.contains(&format!("host={host}")))
            .count()
    }

    /// Waits until the coordinator has logged at least `n` sessions of `host` (it logs one
    /// just after storing it) and returns how many.
    fn at_least_sessions(&self, host: &str, n: usize) -> usize {
        eventually(&format!("{n} sessions of {host}"), DEADLINE, || {
            let seen = self.sessions_of(host);
            ensure!(seen >= n, "{seen} sessions");
            Ok(seen)
        })
    }
}

fn wait_for_log(agent: &Agent, what: &str) {
    eventually(&format!("agent log says `{what}`"), DEADLINE, || {
        let log = agent.proc.log_text();
        ensure!(log.contains(what), "not yet; log:\n{log}");
        Ok(())
    });
}

fn find<'a>(rows: &'a [Value], role: &str, name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["role"] == role && r["name"] == name)
        .unwrap_or_else(|| panic!("{role}/{name} not listed: {rows:?}"))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn renew_then_list_shows_the_new_expiry_and_keeps_the_old_pair() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "fleet.test").expect("pki");
    let web1 = pki.agent_for_days("web-1", 10).expect("issue");
    pki.coordinator("coord", &["127.0.0.1", "coord.fleet.test"])
        .expect("issue");
    let old_cert = std::fs::read(&web1.cert).expect("read");
    let old_key = std::fs::read(&web1.key).expect("read");

    let before = pki.list_json().expect("list");
    let row = find(&before, "agent", "web-1");
    assert_eq!(row["days_left"], 10, "{row}");
    assert_eq!(row["mark"], "expires in 10 days", "{row}");
    let old_serial = row["serial"].clone();

    let out = pki
        .renew("agent", "web-1", &["--days", "365"])
        .expect("renew");
    let text = stdout(&out);
    assert!(
        text.contains("renewed spiffe://fleet.test/agent/web-1"),
        "{text}"
    );
    assert!(text.contains("(365 days)"), "{text}");
    assert!(
        text.contains("picks the new pair up on its own within 5 seconds"),
        "{text}"
    );

    let after = pki.list_json().expect("list");
    let row = find(&after, "agent", "web-1");
    assert_eq!(row["days_left"], 365, "{row}");
    assert_eq!(row["status"], "ok", "{row}");
    assert!(row["mark"].is_null(), "{row}");
    assert_ne!(row["serial"], old_serial, "a new certificate: {row}");
    // The old pair is kept for a roll back; the new key is the owner's alone.
    let prev = |p: &Path| {
        let mut s = p.as_os_str().to_owned();
        s.push(".prev");
        std::fs::read(std::path::PathBuf::from(s)).expect("previous file kept")
    };
    assert_eq!(prev(&web1.cert), old_cert);
    assert_eq!(prev(&web1.key), old_key);
    assert_ne!(std::fs::read(&web1.key).expect("read"), old_key);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&web1.key).expect("stat").permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);

    // A coordinator keeps the names it is dialled at.
    let out = pki
        .renew("coordinator", "coord", &["--output", "json"])
        .expect("renew coordinator");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        doc["sans"],
        serde_json::json!(["127.0.0.1", "coord.fleet.test"]),
        "{doc}"
    );
    // Sorted by expiry, soonest first (the CA's ten years come last).
    let listed: Vec<i64> = pki
        .list_json()
        .expect("list")
        .iter()
        .map(|r| r["not_after_unix"].as_i64().expect("readable"))
        .collect();
    assert!(listed.is_sorted(), "{listed:?}");
}

#[test]
fn renew_of_an_identity_never_issued_fails_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "fleet.test").expect("pki");
    pki.agent("web-1").expect("issue");
    let out = pki.run(&["renew", "agent", "web-9"]).expect("runs");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no agent certificate `web-9`")
            && err.contains("never issued")
            && err.contains("issue agent web-9"),
        "{err}"
    );
    assert!(!pki.dir.join("agent/web-9.pem").exists());
    // A file under the name that holds another identity is not renewed either.
    std::fs::copy(
        pki.dir.join("agent/web-1.pem"),
        pki.dir.join("agent/web-2.pem"),
    )
    .expect("copy");
    let out = pki.run(&["renew", "agent", "web-2"]).expect("runs");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds a certificate for spiffe://fleet.test/agent/web-1"),
        "{err}"
    );
}

#[test]
fn pki_list_survives_garbage_and_flags_foreign_certificates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "fleet.test").expect("pki");
    pki.agent("web-1").expect("issue");
    pki.operator("olga").expect("issue");
    std::fs::write(
        pki.dir.join("agent/garbage.pem"),
        b"\x00\xffnot a certificate",
    )
    .expect("write");
    std::fs::write(
        pki.dir.join("agent/half.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n",
    )
    .expect("write");
    // A certificate of another CA (same trust domain) under this PKI's name.
    let other = Pki::init(&tmp.path().join("other"), "fleet.test").expect("other pki");
    let mallory = other.operator("mallory").expect("issue");
    std::fs::copy(&mallory.cert, pki.dir.join("operator/mallory.pem")).expect("copy");

    let rows = pki.list_json().expect("list exits 0");
    for name in ["garbage", "half"] {
        let row = find(&rows, "agent", name);
        assert_eq!(row["status"], "unreadable", "{row}");
        assert!(
            row["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{row}"
        );
    }
    let foreign = find(&rows, "operator", "mallory");
    assert!(
        foreign["problems"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p
                .as_str()
                .is_some_and(|p| p.contains("not issued by this PKI's CA")))),
        "{foreign}"
    );
    for (role, name) in [("agent", "web-1"), ("operator", "olga"), ("ca", "ca")] {
        let row = find(&rows, role, name);
        assert_eq!(row["problems"], serde_json::json!([]), "{row}");
    }
    // Unreadable files come after every readable one.
    let first_unreadable = rows
        .iter()
        .position(|r| r["status"] == "unreadable")
        .expect("some unreadable");
    assert!(
        rows[first_unreadable..]
            .iter()
            .all(|r| r["status"] == "unreadable"),
        "{rows:?}"
    );
    // The table says the same.
    let out = pki.run(&["list"]).expect("runs");
    assert!(out.status.success(), "{out:?}");
    let table = stdout(&out);
    assert!(table.contains("unreadable:"), "{table}");
    assert!(table.contains("need attention"), "{table}");
}

#[test]
fn agents_warns_about_a_certificate_expiring_within_30_days_only() {
    let f = fleet();
    let short = f.pki.agent_for_days("web-1", 10).expect("issue");
    let long = f.pki.agent_for_days("web-2", 365).expect("issue");
    let _a1 = f.agent("web-1", &short, "");
    let _a2 = f.agent("web-2", &long, "");
    let r1 = f.online_with_days_left("web-1", 10);
    let r2 = f.online_with_days_left("web-2", 365);
    assert_eq!(r1["cert_warning"], "expires in 10 days", "{r1}");
    assert_eq!(r1["cert_status"], "expiring", "{r1}");
    assert!(
        r1["cert_not_after"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{r1}"
    );
    assert!(r2["cert_warning"].is_null(), "{r2}");
    assert_eq!(r2["cert_status"], "ok", "{r2}");

    let table = f.agents_table();
    let warnings: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{table}");
    assert!(
        warnings[0].contains("web-1's certificate expires in 10 days")
            && warnings[0].contains("rollbackctl pki renew agent web-1"),
        "{table}"
    );
    // The coordinator said so when the session started.
    let logs = f.coordinator.logs();
    let said = |host: &str| {
        logs.lines().any(|l| {
            l.contains("agent certificate expires in") && l.contains(&format!("host={host}"))
        })
    };
    assert!(said("web-1"), "{logs}");
    assert!(!said("web-2"), "{logs}");
}

#[test]
fn a_running_agent_takes_a_renewed_certificate_without_a_restart() {
    let f = fleet();
    let certs = f.pki.agent_for_days("web-1", 10).expect("issue");
    let mut agent = f.agent("web-1", &certs, "");
    f.online_with_days_left("web-1", 10);
    assert!(f.agents_table().contains("warning: web-1's certificate"));
    let pid = agent.proc.pid();
    let sessions = f.at_least_sessions("web-1", 1);

    f.pki
        .renew("agent", "web-1", &["--days", "365"])
        .expect("renew");
    f.online_with_days_left("web-1", 365);

    assert_eq!(agent.proc.pid(), pid);
    assert!(agent.proc.exited().expect("wait").is_none(), "agent exited");
    f.at_least_sessions("web-1", sessions + 1);
    let log = agent.proc.log_text();
    assert!(log.contains("renewed certificate accepted"), "{log}");
    assert!(
        log.contains("reconnecting with the renewed certificate"),
        "{log}"
    );
    assert!(!f.agents_table().contains("warning:"));
}

#[test]
fn a_pair_for_another_host_or_a_corrupt_file_is_refused_and_the_agent_keeps_its_own() {
    let mut f = fleet();
    let certs = f.pki.agent_for_days("web-1", 20).expect("issue");
    let other = f.pki.agent("web-2").expect("issue");
    let agent = f.agent("web-1", &certs, "");
    f.online_with_days_left("web-1", 20);
    let pid = agent.proc.pid();

    // web-2's pair where web-1's agent reads its own.
    std::fs::copy(&other.cert, &certs.cert).expect("copy");
    std::fs::copy(&other.key, &certs.key).expect("copy");
    wait_for_log(&agent, "renewed certificate refused");
    let log = agent.proc.log_text();
    assert!(
        log.contains("the certificate is for spiffe://fleet.test/agent/web-2, not for this host"),
        "{log}"
    );
    // A new connection (the coordinator restarts) still presents web-1's own pair.
    f.coordinator.restart().expect("restart");
    f.online_with_days_left("web-1", 20);

    // A corrupt certificate file: refused the same way.
    std::fs::write(
        &certs.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
    )
    .expect("write");
    eventually("second refusal", DEADLINE, || {
        let n = agent
            .proc
            .log_text()
            .matches("renewed certificate refused")
            .count();
        ensure!(n >= 2, "{n} refusals");
        Ok(())
    });
    f.coordinator.restart().expect("restart");
    f.online_with_days_left("web-1", 20);

    assert_eq!(agent.proc.pid(), pid);
    let logs = f.coordinator.logs();
    assert!(!logs.contains("refused session"), "{logs}");
    assert!(
        !agent
            .proc
            .log_text()
            .contains("renewed certificate accepted")
    );
}

/// A health endpoint that answers 503 until released, then 200; counts requests.
struct HeldEndpoint {
    port: u16,
    hits: Arc<AtomicUsize>,
    release: Arc<AtomicBool>,
}

fn held_endpoint() -> Result<HeldEndpoint> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let port = listener.local_addr()?.port();
    let hits = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(AtomicBool::new(false));
    let (h, r) = (hits.clone(), release.clone());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            h.fetch_add(1, Ordering::SeqCst);
            let status = if r.load(Ordering::SeqCst) {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = conn.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    Ok(HeldEndpoint {
        port,
        hits,
        release,
    })
}

#[test]
fn a_renewal_waits_for_the_run_in_progress() {
    let f = fleet();
    let endpoint = held_endpoint().expect("endpoint");
    let app = f.tmp.path().join("app");
    std::fs::create_dir(&app).expect("mkdir");
    let profile = format!(
        "[app]\ndir = \"{}\"\nhealth_base_url = \"http://127.0.0.1:{}\"\n",
        app.display(),
        endpoint.port
    );
    let certs = f.pki.agent_for_days("web-1", 10).expect("issue");
    let agent = f.agent("web-1", &certs, &profile);
    f.online_with_days_left("web-1", 10);
    let pid = agent.proc.pid();
    let sessions = f.at_least_sessions("web-1", 1);

    // A run that lasts until the endpoint is released.
    let (url, ca, op) = (f.coordinator.url(), f.pki.ca(), f.op.clone());
    let exec = std::thread::spawn(move || {
        exec_json(
            &url,
            &ca,
            &op,
            "web-1",
            "http.check",
            &["endpoint=/readyz", "retries=600", "interval_ms=100"],
            &[],
        )
    });
    eventually("the check is polling", DEADLINE, || {
        ensure!(endpoint.hits.load(Ordering::SeqCst) > 0, "no request yet");
        Ok(())
    });

    f.pki
        .renew("agent", "web-1", &["--days", "365"])
        .expect("renew");
    wait_for_log(
        &agent,
        "renewed certificate waits for the run in progress to end",
    );
    // The agent took the pair but holds the session while the run goes on.
    assert_eq!(f.sessions_of("web-1"), sessions, "reconnected mid-run");
    assert!(endpoint.hits.load(Ordering::SeqCst) > 0);

    endpoint.release.store(true, Ordering::SeqCst);
    let (ok, doc, stderr) = exec.join().expect("exec thread").expect("exec runs");
    assert!(ok, "the run finished in its session: {doc} {stderr}");
    assert_eq!(doc["status"], "succeeded", "{doc}");

    f.online_with_days_left("web-1", 365);
    assert_eq!(agent.proc.pid(), pid);
    let log = agent.proc.log_text();
    let finished = log.find("run finished").expect("run finished logged");
    let reconnect = log
        .find("reconnecting with the renewed certificate")
        .expect("reconnect logged");
    assert!(
        finished < reconnect,
        "reconnected before the run ended:\n{log}"
    );
}
