//! `rollback-agent --simulate K`: K simulated agents in one process connect to a real
//! coordinator over mTLS with certificates the simulator issues itself, and a one-step job
//! reaches every one of them and completes, with each host's run journaled like a real agent's.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use rollback_tests::support::{Coordinator, Pki, agents_json, bin, eventually, rollbackctl};

const K: usize = 50;

const RUNBOOK: &str = r#"
[procedures.noop]
description = "one step; a no-op in the simulator"

[[procedures.noop.phases]]
name = "noop"
scope = "each"
steps = [{ action = "postgres.backup" }]
"#;

/// The simulator process, killed when dropped.
struct Simulator(Child);

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_simulator(dir: &Path, url: &str, pki: &Pki) -> Result<Simulator> {
    let state = dir.join("sim-state");
    let config = dir.join("sim.toml");
    rollback_tests::support::write_private(
        &config,
        format!(
            "host_id = \"sim\"\ncoordinator = \"{url}\"\nstate_dir = \"{}\"\n\
             [labels]\nsim = \"yes\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{ca}\"\nkey = \"{ca}\"\n\
             [postgres]\npg_dump = \"/bin/true\"\npg_restore = \"/bin/true\"\nhost = \"127.0.0.1\"\n\
             user = \"sim\"\ndatabase = \"sim\"\nbackup_dir = \"{}\"\n",
            state.display(),
            state.display(),
            ca = pki.ca().display(),
        ),
    )?;
    let log = std::fs::File::create(dir.join("simulator.log"))?;
    let child = Command::new(bin("rollback-agent"))
        .arg("--config")
        .arg(&config)
        .arg("--simulate")
        .arg(K.to_string())
        .arg("--simulate-pki")
        .arg(&pki.dir)
        .env("ROLLBACK_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting rollback-agent --simulate")?;
    Ok(Simulator(child))
}

#[test]
fn simulated_agents_connect_over_mtls_and_complete_a_job() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("pki"), "sim.test")?;
    let op = pki.operator("alice")?;
    let coord_dir = dir.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let mut coord = Coordinator::start(&coord_dir, &pki, &[("alice", "admin")])?;
    // The custom runbook: a top-level key, so it goes before the config's tables.
    let runbook = dir.join("runbook.toml");
    std::fs::write(&runbook, RUNBOOK)?;
    let config = std::fs::read_to_string(&coord.config)?;
    std::fs::write(
        &coord.config,
        format!("runbook = \"{}\"\n{config}", runbook.display()),
    )?;
    coord.restart()?;
    let url = coord.url();

    let _sim = start_simulator(dir, &url, &pki)?;
    eventually(
        "all simulated agents online",
        Duration::from_secs(60),
        || {
            let agents = agents_json(&url, &pki.ca(), &op, Some("sim=yes"))?;
            let online = agents
                .iter()
                .filter(|a| a["status"].as_str() == Some("online"))
                .count();
            anyhow::ensure!(online == K, "{online} of {K} online");
            Ok(())
        },
    );
    // The simulator issued one certificate per simulated host with the fleet CA.
    assert!(pki.dir.join("agent/sim-00001.pem").exists());
    assert!(pki.dir.join(format!("agent/sim-{K:05}.pem")).exists());

    let out = rollbackctl(
        &url,
        &pki.ca(),
        &op,
        &[
            "--output",
            "json",
            "rollback",
            "--procedure",
            "noop",
            "--select",
            "sim=yes",
            "--reason",
            "simulator test",
            "--yes",
            "--canary",
            "0",
            "--batch-size",
            "100%",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rollback failed: {stderr}");
    let job: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let hosts = job["hosts"].as_array().context("hosts")?;
    assert_eq!(hosts.len(), K);
    for h in hosts {
        assert_eq!(h["outcome"], "succeeded", "{h:#}");
        let run = &h["runs"][0];
        assert_eq!(run["status"], "succeeded", "{h:#}");
        assert_eq!(run["steps"][0]["action"], "postgres.backup");
        assert_eq!(run["steps"][0]["status"], "succeeded");
    }
    // Each simulated host journaled its run like a real agent.
    let runs = std::fs::read_dir(dir.join("sim-state/sim-00001/runs"))?.count();
    assert!(runs >= 1, "no journaled run for sim-00001");
    Ok(())
}
