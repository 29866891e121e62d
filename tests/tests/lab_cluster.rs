//! Acceptance 2 of issue #13 on the fleet lab: three coordinators (`a`, `b`, `c`) on one
//! PostgreSQL store, the lab's agents spread over them. A `database` rollback started on A (so
//! A owns it) and approved by the second person; A killed with `kill -9` while the downgrade
//! runs; B or C takes the job over and finishes it: the schema downgraded exactly once (one
//! downgrade run, one `alembic.downgrade` started in the once-host's agent log), every host
//! active and `/readyz` 200, a `watch` on B started before the kill saw it through to the end,
//! and the report shows the takeover. A's agents are online on another coordinator within
//! 10 s. Without root this prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rollback_tests::lab::{self, LabSpec};
use rollback_tests::lab_fleet::{LabFleet, assert_healthy, outcomes};
use rollback_tests::support::eventually;
use serde_json::Value;

/// Kills and reaps a child when dropped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every run of `phase` in a job record.
fn runs_of<'a>(job: &'a Value, phase: &str) -> Vec<&'a Value> {
    job["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|h| h["runs"].as_array().into_iter().flatten())
        .filter(|r| r["phase"] == phase)
        .collect()
}

/// The first step of `action` in `run`.
fn step<'a>(run: &'a Value, action: &str) -> Option<&'a Value> {
    run["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["action"] == action)
}

/// Follows job `id` on coordinator `i` (`watch --output json`) until an event of `kind` in
/// `phase` is stored.
fn wait_for_event(fleet: &LabFleet, i: usize, id: &str, kind: &str, phase: &str) -> Result<()> {
    let mut watch = fleet
        .rollbackctl_command_at(i, &["--output", "json", "watch", id])?
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rollbackctl watch")?;
    let stdout = watch.stdout.take().context("watch stdout")?;
    let mut found = false;
    for line in BufReader::new(stdout).lines() {
        let Ok(ev) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        if ev["kind"] == kind && ev["phase"] == phase {
            found = true;
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    ensure!(
        found,
        "job {id} ended without a `{kind}` event in phase `{phase}`"
    );
    Ok(())
}

#[test]
fn a_database_rollback_whose_coordinator_is_killed_mid_downgrade_is_finished_by_another()
-> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-cluster"))? else {
        return Ok(());
    };
    let mut fleet = LabFleet::start_cluster(&lab, 3)?;
    let all_hosts: Vec<String> = lab.hosts().iter().map(|h| h.id().to_string()).collect();

    // The three coordinators see one another, alive.
    let listed = fleet.json_at(1, &["coordinators"])?;
    for name in ["a", "b", "c"] {
        let c = listed["coordinators"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == name))
            .with_context(|| format!("coordinator {name} not listed: {listed:#}"))?;
        assert_eq!(c["alive"], true, "{c}");
    }
    // The agents are spread: at least two coordinators hold some.
    let holders = fleet.eventually("every agent held, by two coordinators or more", || {
        let holders = fleet.holders_at(1)?;
        ensure!(
            holders.len() == all_hosts.len(),
            "{} of {} online: {holders:?}",
            holders.len(),
            all_hosts.len()
        );
        let mut names: Vec<&str> = holders.iter().map(|(_, c)| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        ensure!(names.len() >= 2, "all on one coordinator: {holders:?}");
        Ok(holders)
    });
    let on_a: Vec<String> = holders
        .iter()
        .filter(|(_, c)| c == "a")
        .map(|(h, _)| h.clone())
        .collect();
    eprintln!("agents by coordinator: {holders:?}");

    lab.bad_migration()?;
    assert_eq!(lab.schema_revision()?.as_deref(), Some("0003"));
    let reason = "migration 0003 broke the app; coordinator a killed during the downgrade";
    // Started on A (the fleet's first coordinator), so A owns the job.
    let _starter = Reap(
        fleet
            .rollbackctl_command_at(
                0,
                &[
                    "rollback",
                    "--yes",
                    "--select",
                    "role=web",
                    "--procedure",
                    "database",
                    "--reason",
                    reason,
                ],
            )?
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the rollback on coordinator a")?,
    );
    // The second person approves it (on A); then it runs.
    let id = fleet.eventually("the rollback running", || {
        fleet.approve_waiting();
        let j = fleet.latest_job()?;
        ensure!(
            j["reason"] == reason && j["state"] == "running",
            "not yet: {}",
            j["state"]
        );
        Ok(j["job_id"].as_str().unwrap_or_default().to_string())
    });
    // A watch on B, started before the kill, follows the job to its end.
    let watch_out = fleet.dir.join("watch-b.out");
    let mut watcher = Reap(
        fleet
            .rollbackctl_command_at(1, &["watch", &id])?
            .stdout(std::fs::File::create(&watch_out).context("creating the watch's output")?)
            .stderr(Stdio::null())
            .spawn()
            .context("watching the job on coordinator b")?,
    );
    wait_for_event(&fleet, 1, &id, "host.dispatched", "downgrade")?;
    fleet.kill_coordinator_at(0)?;
    let killed_at = Instant::now();
    fleet.use_coordinator(1)?;

    // A's agents are online on B or C within 10 s (acceptance 3, on the lab).
    eventually(
        "a's agents online on another coordinator",
        Duration::from_secs(10),
        || {
            let holders = fleet.holders_at(1)?;
            for host in &on_a {
                ensure!(
                    holders.iter().any(|(h, c)| h == host && c != "a"),
                    "{host} not online elsewhere: {holders:?}"
                );
            }
            Ok(())
        },
    );
    eprintln!(
        "a's agents {on_a:?} online elsewhere {:?} after the kill",
        killed_at.elapsed()
    );

    // Taken over and finished by B or C.
    let record = eventually(&format!("job {id} ends"), Duration::from_secs(180), || {
        let j = fleet.job(&id)?;
        ensure!(j["state"] != "running", "still running");
        Ok(j)
    });
    assert_eq!(
        record["state"],
        "succeeded",
        "{record:#}\n{}",
        fleet.coordinator_log()
    );
    assert!(
        outcomes(&record).iter().all(|(_, o)| o == "succeeded"),
        "{record:#}"
    );
    fleet.wait_online(&all_hosts)?;
    assert_healthy(&lab, "0002").with_context(|| format!("{record:#}"))?;

    // Downgraded exactly once: one run of the once-phase, 0003 → 0002, and one
    // alembic.downgrade ever started by the once-host's agent.
    let downgrades = runs_of(&record, "downgrade");
    assert_eq!(
        downgrades.len(),
        1,
        "the downgrade run was re-attached, never dispatched again: {downgrades:#?}"
    );
    let facts = &step(downgrades[0], "alembic.downgrade").context("the downgrade step")?["facts"];
    assert_eq!(facts["from_revision"], "0003", "{facts}");
    assert_eq!(facts["revision"], "0002", "{facts}");
    assert_eq!(facts["changed"], "true", "{facts}");
    let once_host = record["plan"]["once_host"]
        .as_str()
        .context("the plan's once-host")?;
    let started = fleet
        .agent_log(once_host)
        .lines()
        .filter(|l| l.contains("step started") && l.contains("alembic.downgrade"))
        .count();
    assert_eq!(
        started,
        1,
        "{once_host} started alembic.downgrade once:\n{}",
        fleet.agent_log(once_host)
    );
    // Every other phase ran once on each of its hosts.
    for h in record["hosts"].as_array().into_iter().flatten() {
        for p in ["stop", "start", "verify"] {
            let n = h["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["phase"] == p)
                .count();
            let expected = usize::from(h["once_only"] != true);
            assert_eq!(n, expected, "phase {p} on {}: {h:#}", h["host_id"]);
        }
    }

    // The watch on B saw it through to the end, the takeover included.
    let status = eventually("the watch on b ends", Duration::from_secs(30), || {
        watcher.0.try_wait()?.context("still watching")
    });
    let seen = std::fs::read_to_string(&watch_out).context("reading the watch's output")?;
    assert!(status.success(), "the watch on b failed:\n{seen}");
    assert!(
        seen.contains("took the job over from coordinator a"),
        "the watch on b shows the takeover:\n{seen}"
    );
    // The report shows it too.
    let md = fleet.report(&id)?;
    assert!(
        md.contains("took the job over from coordinator a"),
        "the report shows the takeover:\n{md}"
    );
    // And `coordinators` shows A dead.
    eventually("a shown dead", Duration::from_secs(15), || {
        let listed = fleet.json_at(2, &["coordinators"])?;
        let a = listed["coordinators"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "a").cloned())
            .context("a not listed")?;
        ensure!(a["alive"] == false, "{a}");
        Ok(())
    });
    Ok(())
}
