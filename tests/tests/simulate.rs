//! `rollback-agent --simulate K`: K simulated agents in one process connect to a real
//! coordinator over mTLS with certificates the simulator issues itself, and a one-step job
//! reaches every one of them and completes, with each host's run journaled like a real agent's.

use std::time::Duration;

use anyhow::{Context, Result};
use rollback_tests::support::{
    Coordinator, NOOP_RUNBOOK, Pki, Simulator, agents_json, eventually, rollbackctl,
};

const K: usize = 50;

#[test]
fn simulated_agents_connect_over_mtls_and_complete_a_job() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("pki"), "sim.test")?;
    let op = pki.operator("alice")?;
    let coord_dir = dir.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let mut coord = Coordinator::start(&coord_dir, &pki, &[("alice", "admin")])?;
    coord.use_runbook(NOOP_RUNBOOK)?;
    // Labels that target hosts come from the coordinator's inventory, not the agents' claim.
    coord.label_simulated(K)?;
    let url = coord.url();

    let sim = Simulator::start(dir, &url, &pki, K)?;
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
    assert!(
        sim.journaled_runs("sim-00001") >= 1,
        "no journaled run for sim-00001"
    );
    Ok(())
}
