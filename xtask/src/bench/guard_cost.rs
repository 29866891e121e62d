//! Part (d), what the deployment guard costs: three real agents with an `[app]` profile and two
//! `[[smoke]]` checks against an HTTP server in the bench that counts every request, a snapshot
//! for the baseline, then `rollbackctl guard` over a window. Figures: requests each host's app
//! received per minute, and each agent's CPU (user + system) over the window and per sample.
//! Outside the lab there is no systemd, so the hosts have no `[service]`: a sample here makes
//! no `systemctl` calls (two per sample on a real host).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rollback_tests::support::{Agent, Pki};
use serde_json::json;

use super::harness::{self, Coordinator};
use super::hosts;
use super::sys;

const AGENTS: usize = 3;
const SMOKE: &str = "[[smoke]]\nname = \"incidents\"\npath = \"/api/incidents\"\njson_field = \"status\"\njson_equals = \"ok\"\n\
                     [[smoke]]\nname = \"reports\"\npath = \"/api/reports\"\n";

/// An app that answers every request `{"status":"ok"}` and counts them.
fn counting_app() -> Result<(String, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the bench app")?;
    let url = format!("http://{}", listener.local_addr()?);
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            seen.fetch_add(1, Ordering::Relaxed);
            let body = b"{\"status\":\"ok\"}";
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = conn.write_all(body);
        }
    });
    Ok((url, count))
}

pub fn measure(
    root: &Path,
    pki: &Pki,
    window: Duration,
    interval: Duration,
) -> Result<serde_json::Value> {
    let dir = root.join("guard");
    let hosts = hosts::setup(&dir.join("hosts"), AGENTS)?;
    let runbook = dir.join("runbook.toml");
    std::fs::write(&runbook, super::fleet::RUNBOOK).context("writing the guard bench runbook")?;
    // Labels that target hosts come from the coordinator's inventory.
    let inventory: String = (1..=AGENTS)
        .map(|i| format!("[inventory.\"guarded{i}\"]\nbench = \"guard\"\n"))
        .collect();
    let mut coord = Coordinator::start(&dir.join("coordinator"), pki, &runbook, &inventory)?;
    let (url, requests) = counting_app()?;
    let mut agents = Vec::new();
    for (i, d) in hosts.dirs.iter().enumerate() {
        // The snapshot keeps the env file (and makes it the backup).
        let env = d.join(".env");
        if !env.exists() {
            std::fs::write(&env, "APP_PORT=8000\n")
                .with_context(|| format!("writing {}", env.display()))?;
        }
        let id = format!("guarded{}", i + 1);
        let certs = harness::cert(pki, "agent", &id)?;
        let profile = format!("{}{SMOKE}", harness::app_profile(d, &hosts.git, &url));
        agents.push(Agent::start_with_profile(
            &dir,
            &id,
            &[("bench", "guard")],
            &coord.url,
            &pki.ca(),
            &certs,
            &profile,
        )?);
    }
    coord.wait_online("bench=guard", AGENTS, Duration::from_secs(60))?;
    sys::run_ok(&mut coord.ctl(&[
        "snapshot",
        "--select",
        "bench=guard",
        "--label",
        "guard bench baseline",
    ]))
    .context("the baseline snapshot")?;
    let pids: Vec<u32> = agents
        .iter()
        .map(|a| a.proc.pid().context("agent not running"))
        .collect::<Result<_>>()?;
    let ticks =
        |pids: &[u32]| -> Result<Vec<u64>> { pids.iter().map(|&p| sys::cpu_ticks(p)).collect() };
    let (window_s, interval_s) = (window.as_secs(), interval.as_secs());
    eprintln!("bench: guard: {AGENTS} agents, a {window_s}s guard sampling every {interval_s}s");
    let before = ticks(&pids)?;
    let requests_before = requests.load(Ordering::Relaxed);
    let started = Instant::now();
    let out = coord
        .ctl(&[
            "guard",
            "--select",
            "bench=guard",
            "--window",
            &format!("{window_s}s"),
            "--interval",
            &format!("{interval_s}s"),
            "--quiet-output",
            "--reason",
            "guard cost bench",
        ])
        .output()
        .context("running rollbackctl guard")?;
    let elapsed = started.elapsed().as_secs_f64();
    let after = ticks(&pids)?;
    let served = requests.load(Ordering::Relaxed) - requests_before;
    if !out.status.success() {
        bail!(
            "the guard did not end healthy: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(agents);
    coord.daemon.stop(Duration::from_secs(15));
    let clk = sys::clk_tck() as f64;
    // One at the start, then one every interval to the end of the window.
    let samples = (window_s / interval_s.max(1) + 1) as f64;
    let cpu_s: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / clk)
        .collect();
    let cpu_pct: Vec<f64> = cpu_s.iter().map(|s| s / elapsed * 100.0).collect();
    let cpu_ms_per_sample: Vec<f64> = cpu_s.iter().map(|s| s * 1000.0 / samples).collect();
    Ok(json!({
        "agents": AGENTS,
        "smoke_checks": 2,
        "window_s": window_s,
        "interval_s": interval_s,
        "samples": samples,
        "elapsed_s": elapsed,
        "requests": served,
        "requests_per_host_per_min": served as f64 / AGENTS as f64 / (elapsed / 60.0),
        "agent_cpu_s": cpu_s,
        "agent_cpu_pct": cpu_pct,
        "agent_cpu_ms_per_sample": cpu_ms_per_sample,
        "clk_tck": clk,
    }))
}
