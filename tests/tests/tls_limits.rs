//! The coordinator's own TLS acceptor under attack, on loopback with the real binaries: every
//! refused handshake is logged with the peer address and the reason (unknown CA, expired, not a
//! client certificate, CA certificate as a leaf, two identities, no certificate), a client that
//! says nothing is dropped at the handshake timeout, handshakes in flight, one identity's
//! connections and one connection's streams are bounded, and a thousand idle TLS connections from one certificate (plus
//! silent ones) do not stop agents from connecting nor a job from running.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rollback_tests::raw_tls::{
    Fate, Forged, ca_as_client, client_config, fate, fate_of, forge, handshake,
    raise_open_files_limit,
};
use rollback_tests::support::{
    CertFiles, Coordinator, NOOP_RUNBOOK, Pki, Simulator, agents_json, eventually, rollbackctl,
};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(30);

/// Waits for the coordinator's log line refusing the connection from `local` for `reason`.
fn refusal_logged(coordinator: &Coordinator, local: SocketAddr, message: &str, reason: &str) {
    eventually(
        &format!("coordinator logs {local} refused ({reason})"),
        DEADLINE,
        || {
            let logs = coordinator.logs();
            logs.lines()
                .find(|l| {
                    l.contains(message)
                        && l.contains(&format!("peer={local} "))
                        && l.contains(&format!("reason={reason}"))
                })
                .map(|_| ())
                .ok_or_else(|| anyhow!("no such line yet; log:\n{logs}"))
        },
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_refused_handshake_is_logged_with_the_peer_and_the_reason() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("pki"), "fleet.test")?;
    let good = pki.operator("vera")?;
    let coordinator = Coordinator::start(dir, &pki, &[("vera", "viewer")])?;
    let other = Pki::init(&dir.join("other-pki"), "fleet.test")?;

    let cases: Vec<(Option<CertFiles>, &str)> = vec![
        (Some(other.agent("web-1")?), "unknown CA"),
        (Some(forge(&pki, Forged::Expired, "old-1")?), "expired"),
        (
            Some(forge(&pki, Forged::ServerOnly, "srv-1")?),
            "not a client certificate",
        ),
        (Some(ca_as_client(&pki)), "CA certificate used as a leaf"),
        (
            Some(forge(&pki, Forged::TwoIdentities, "twin-1")?),
            "two identities",
        ),
        (None, "no certificate"),
    ];
    for (cert, reason) in cases {
        let config = client_config(&pki.ca(), cert.as_ref())?;
        let (local, mut tls) = handshake(coordinator.addr, config).await?;
        assert_eq!(
            fate_of(&mut tls, DEADLINE).await,
            Fate::Closed,
            "{reason}: the connection must be closed"
        );
        refusal_logged(&coordinator, local, "tls handshake refused", reason);
    }

    // The same client with a proper certificate is served: the refusals were about them.
    let (_, mut tls) = handshake(coordinator.addr, client_config(&pki.ca(), Some(&good))?).await?;
    assert_eq!(fate_of(&mut tls, DEADLINE).await, Fate::Served);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_says_nothing_is_dropped_at_the_handshake_timeout() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("pki"), "fleet.test")?;
    let coordinator = Coordinator::start_with(dir, &pki, &[], "tls_handshake_timeout_secs = 2")?;
    let mut silent = TcpStream::connect(coordinator.addr).await?;
    let local = silent.local_addr()?;
    assert_eq!(fate(&mut silent, DEADLINE).await, Fate::Closed);
    refusal_logged(
        &coordinator,
        local,
        "tls handshake refused",
        "handshake timeout",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn handshakes_in_flight_are_bounded_and_the_bound_frees_up() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("pki"), "fleet.test")?;
    let vera = pki.operator("vera")?;
    let coordinator = Coordinator::start_with(
        dir,
        &pki,
        &[("vera", "viewer")],
        "max_handshakes_in_flight = 4\ntls_handshake_timeout_secs = 3",
    )?;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(coordinator.addr).await?);
    }
    // Four handshakes hang; the fifth connection is closed at once, without a handshake.
    let mut fifth = TcpStream::connect(coordinator.addr).await?;
    let fifth_addr = fifth.local_addr()?;
    assert_eq!(fate(&mut fifth, DEADLINE).await, Fate::Closed);
    eventually("the bound is logged", DEADLINE, || {
        let logs = coordinator.logs();
        logs.lines()
            .find(|l| {
                l.contains("too many TLS handshakes in flight")
                    && l.contains(&format!("peer={fifth_addr} "))
            })
            .map(|_| ())
            .ok_or_else(|| anyhow!("not yet:\n{logs}"))
    });
    // The silent ones time out, and a real client gets in.
    for s in &mut silent {
        assert_eq!(fate(s, DEADLINE).await, Fate::Closed);
    }
    let config = client_config(&pki.ca(), Some(&vera))?;
    let (_, mut tls) = handshake(coordinator.addr, config).await?;
    assert_eq!(fate_of(&mut tls, DEADLINE).await, Fate::Served);
    Ok(())
}

/// The SETTINGS the coordinator sends first on a served connection, as (id, value) pairs.
async fn server_settings<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Vec<(u16, u32)>> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 9];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut header))
        .await
        .context("no HTTP/2 frame in time")??;
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    anyhow::ensure!(
        header[3] == 0x4,
        "the first frame is a SETTINGS frame: {header:?}"
    );
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload
        .chunks_exact(6)
        .map(|e| {
            (
                u16::from_be_bytes([e[0], e[1]]),
                u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
            )
        })
        .collect())
}

/// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS.
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

#[tokio::test(flavor = "multi_thread")]
async fn each_connection_is_limited_to_max_concurrent_streams() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (extra, limit) in [("", 64), ("max_concurrent_streams = 7", 7)] {
        let sub = tmp.path().join(format!("c{limit}"));
        std::fs::create_dir_all(&sub)?;
        let pki = Pki::init(&sub.join("pki"), "fleet.test")?;
        let vera = pki.operator("vera")?;
        let coordinator = Coordinator::start_with(&sub, &pki, &[("vera", "viewer")], extra)?;
        let config = client_config(&pki.ca(), Some(&vera))?;
        let (_, tls) = handshake(coordinator.addr, config).await?;
        let settings = server_settings(&mut tls?).await?;
        assert!(
            settings.contains(&(MAX_CONCURRENT_STREAMS, limit)),
            "SETTINGS_MAX_CONCURRENT_STREAMS = {limit} in {settings:?}"
        );
    }
    Ok(())
}

/// Acceptance (issue #12, 6): a thousand idle TLS connections from one client certificate, and
/// connections that never send a ClientHello, do not stop agents from connecting or a job from
/// running. The identity gets `max_connections_per_identity` (64) connections; the rest are
/// closed right after the handshake and logged.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_idle_tls_connections_do_not_stop_agents_or_a_job() -> Result<()> {
    const IDLE: usize = 1000;
    const SILENT: usize = 200;
    const AGENTS: usize = 3;
    raise_open_files_limit()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("pki"), "fleet.test")?;
    let alice = pki.operator("alice")?;
    let idler = pki.operator("idler")?;
    let runbook = dir.join("runbook.toml");
    std::fs::write(&runbook, NOOP_RUNBOOK)?;
    let mut coordinator = Coordinator::start_with(
        dir,
        &pki,
        &[("alice", "admin"), ("idler", "viewer")],
        &format!("runbook = \"{}\"", runbook.display()),
    )?;
    // The labels that target the simulated hosts come from the coordinator's inventory.
    coordinator.label_simulated(AGENTS)?;
    let addr = coordinator.addr;
    let url = coordinator.url();

    // Silent connections first: they hold handshake slots until the timeout.
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(addr).await?);
    }
    // A thousand TLS connections from one certificate, opened a hundred at a time and held.
    let config = client_config(&pki.ca(), Some(&idler))?;
    let mut held = Vec::new();
    let (mut served, mut closed) = (0, 0);
    for _ in 0..IDLE / 100 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let config = config.clone();
            batch.spawn(async move {
                let (_, mut tls) = handshake(addr, config).await?;
                let fate = fate_of(&mut tls, DEADLINE).await;
                anyhow::Ok((fate, tls))
            });
        }
        while let Some(done) = batch.join_next().await {
            let (fate, tls) = done??;
            match fate {
                Fate::Served => served += 1,
                Fate::Closed => closed += 1,
            }
            held.push(tls);
        }
    }
    assert_eq!(
        (served, closed),
        (64, IDLE - 64),
        "one identity holds at most max_connections_per_identity connections"
    );
    assert!(
        coordinator
            .logs()
            .contains("reason=too many connections for this identity"),
        "the bound is logged"
    );

    // With all of that held, agents connect and a job runs to the end.
    let _sim = Simulator::start(dir, &url, &pki, AGENTS)?;
    eventually(
        "the simulated agents are online",
        Duration::from_secs(60),
        || {
            let agents = agents_json(&url, &pki.ca(), &alice, Some("sim=yes"))?;
            let online = agents.iter().filter(|a| a["status"] == "online").count();
            anyhow::ensure!(online == AGENTS, "{online} of {AGENTS} online");
            Ok(())
        },
    );
    let out = rollbackctl(
        &url,
        &pki.ca(),
        &alice,
        &[
            "--output",
            "json",
            "rollback",
            "--procedure",
            "noop",
            "--select",
            "sim=yes",
            "--reason",
            "under a connection flood",
            "--yes",
            "--canary",
            "0",
            "--batch-size",
            "100%",
        ],
    )?;
    assert!(
        out.status.success(),
        "rollback failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["hosts"].as_array().map(Vec::len), Some(AGENTS));
    drop((held, silent));
    Ok(())
}
