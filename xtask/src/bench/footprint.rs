//! Part (c), footprint: idle agents' RSS and CPU over 60 s (three real agent processes, each with
//! a host profile, connected to a coordinator and doing nothing but heartbeats), and the idle
//! coordinator's RSS with 0 agents (here and in part (b)) and with K (part (b)).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rollback_tests::support::{Agent, Pki};
use serde_json::json;

use super::harness::{self, Coordinator};
use super::hosts;
use super::sys;

/// Agents measured at the same time (the median is reported).
const AGENTS: usize = 3;

pub fn measure(root: &Path, pki: &Pki, window: Duration) -> Result<serde_json::Value> {
    let dir = root.join("footprint");
    let hosts = hosts::setup(&dir.join("hosts"), AGENTS)?;
    let runbook = dir.join("runbook.toml");
    std::fs::write(&runbook, super::fleet::RUNBOOK).context("writing footprint runbook")?;
    // Labels that target hosts come from the coordinator's inventory (since #12).
    let inventory: String = (1..=AGENTS)
        .map(|i| format!("[inventory.\"idle{i}\"]\nbench = \"idle\"\n"))
        .collect();
    let mut coord = Coordinator::start(&dir.join("coordinator"), pki, &runbook, &inventory)?;
    let cpid = coord.daemon.pid()?;
    std::thread::sleep(Duration::from_secs(3));
    let coord_idle0_kib = sys::rss_kib(cpid)?;
    let mut agents = Vec::new();
    for (i, d) in hosts.dirs.iter().enumerate() {
        let id = format!("idle{}", i + 1);
        let certs = harness::cert(pki, "agent", &id)?;
        let profile = harness::app_profile(d, &hosts.git, "http://127.0.0.1:9");
        agents.push(Agent::start_with_profile(
            &dir,
            &id,
            &[("bench", "idle")],
            &coord.url,
            &pki.ca(),
            &certs,
            &profile,
        )?);
    }
    coord.wait_online("bench=idle", AGENTS, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let pids: Vec<u32> = agents
        .iter()
        .map(|a| a.proc.pid().context("agent not running"))
        .collect::<Result<_>>()?;
    let before: Vec<u64> = pids
        .iter()
        .map(|&p| sys::cpu_ticks(p))
        .collect::<Result<_>>()?;
    eprintln!("bench: footprint: {AGENTS} idle agents for {window:?}");
    std::thread::sleep(window);
    let after: Vec<u64> = pids
        .iter()
        .map(|&p| sys::cpu_ticks(p))
        .collect::<Result<_>>()?;
    let rss: Vec<f64> = pids
        .iter()
        .map(|&p| sys::rss_kib(p).map(|k| k as f64 / 1024.0))
        .collect::<Result<_>>()?;
    let peak: Vec<f64> = pids
        .iter()
        .map(|&p| sys::peak_rss_kib(p).map(|k| k as f64 / 1024.0))
        .collect::<Result<_>>()?;
    let clk = sys::clk_tck() as f64;
    let cpu_pct: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / clk / window.as_secs_f64() * 100.0)
        .collect();
    let coord_idle3_kib = sys::rss_kib(cpid)?;
    drop(agents);
    coord.daemon.stop(Duration::from_secs(15));
    Ok(json!({
        "agents": AGENTS,
        "window_s": window.as_secs_f64(),
        "clk_tck": clk,
        "agent_rss_mib": rss,
        "agent_peak_rss_mib": peak,
        "agent_cpu_pct": cpu_pct,
        "agent_rss_median_mib": sys::median(&rss),
        "agent_cpu_median_pct": sys::median(&cpu_pct),
        "coord_idle0_mib": coord_idle0_kib as f64 / 1024.0,
        "coord_idle_agents_mib": coord_idle3_kib as f64 / 1024.0,
    }))
}
