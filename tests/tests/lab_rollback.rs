//! Acceptance for fleet rollback jobs, end to end in the fleet lab and driven through
//! `rollbackctl`: each runbook option repairs a real broken deployment (asserted on every host:
//! `alembic current`, git HEAD, env bytes, `systemctl is-active`, `/readyz`), the database
//! step runs once between barriers, a failing health check halts the job, cancel stops it,
//! and the record survives a coordinator restart.
//! Without root this prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`).

use anyhow::{Result, ensure};
use rollback_tests::lab::{self, APP_DIR, Lab, LabSpec};
use rollback_tests::lab_fleet::{LabFleet, outcomes};
use serde_json::Value;

fn rollback(fleet: &LabFleet, args: &[&str]) -> Result<(bool, String)> {
    fleet.rollback_web(args)
}

fn latest_job(fleet: &LabFleet) -> Result<Value> {
    fleet.latest_job()
}

fn job(fleet: &LabFleet, id: &str) -> Result<Value> {
    fleet.job(id)
}

fn report(fleet: &LabFleet, id: &str) -> Result<String> {
    fleet.report(id)
}

fn assert_healthy(lab: &Lab, schema: &str) -> Result<()> {
    rollback_tests::lab_fleet::assert_healthy(lab, schema)
}

/// The report lists every host of the job and every step it ran.
fn assert_report_complete(md: &str, job: &Value) {
    for h in job["hosts"].as_array().into_iter().flatten() {
        let host = h["host_id"].as_str().unwrap_or_default();
        assert!(md.contains(&format!("### {host} ")), "report lists {host}");
        for run in h["runs"].as_array().into_iter().flatten() {
            for step in run["steps"].as_array().into_iter().flatten() {
                let action = step["action"].as_str().unwrap_or_default();
                assert!(
                    md.contains(&format!("`{action}`")),
                    "report lists {host} {action}"
                );
            }
        }
    }
    assert!(md.contains("## Post-rollback checklist"));
}

#[test]
fn configuration_rollback_repairs_every_host_and_survives_a_coordinator_restart() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-cfg"))? else {
        return Ok(());
    };
    let mut fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    lab.bad_config(&refs)?;

    let (ok, out) = rollback(
        &fleet,
        &[
            "--procedure",
            "configuration",
            "--reason",
            "bad FEATURE_REPORTS flag in .env",
        ],
    )?;
    assert!(ok, "{out}");
    assert!(
        out.contains("canary") && out.contains("job started"),
        "live progress shown: {out}"
    );
    for host in &hosts {
        let env = lab.read_file(host, &format!("{APP_DIR}/.env"))?;
        assert_eq!(
            env,
            lab.read_file(host, &format!("{APP_DIR}/.env.backup"))?,
            "{host} .env restored byte for byte"
        );
    }
    assert_healthy(&lab, "0002")?;
    let record = latest_job(&fleet)?;
    assert_eq!(record["state"], "succeeded");
    assert!(
        outcomes(&record).iter().all(|(_, o)| o == "succeeded"),
        "{record}"
    );
    let md = report(&fleet, record["job_id"].as_str().unwrap_or_default())?;
    assert_report_complete(&md, &record);
    assert!(
        md.contains("- [x] Verify application health checks passing"),
        "{md}"
    );
    // Every host ran its smoke checks after /readyz, and they all passed.
    assert!(
        md.contains(
            "- [x] Test critical functionality — verified: smoke checks `incidents`, `reports` passed on every targeted host"
        ),
        "{md}"
    );
    assert!(
        md.contains("bad FEATURE_REPORTS flag"),
        "the reason is in the report"
    );
    assert!(
        md.contains("spiffe://lab.fleet/operator/oncall"),
        "who is in the report"
    );

    // The coordinator restarts: the whole record is still there.
    fleet.start_coordinator()?;
    fleet.wait_online(&hosts)?;
    let id = record["job_id"].as_str().unwrap_or_default().to_string();
    let again = job(&fleet, &id)?;
    assert_eq!(
        again, record,
        "job show gives the same record after a restart"
    );
    assert_eq!(
        report(&fleet, &id)?,
        md,
        "report is the same after a restart"
    );
    Ok(())
}

/// A configuration rollback whose restored `.env` is valid (so `/readyz` passes) but turns a
/// feature off: the smoke check of that feature fails after the restart, the host fails at
/// `smoke.run`, the job fails, and the report leaves "Test critical functionality" unticked,
/// naming the host and the check.
#[test]
fn a_failing_smoke_check_fails_the_rollback_and_leaves_critical_functionality_unticked()
-> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-smoke"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    lab.bad_config(&["app1"])?;
    // The "last good" copy ready but with the reports feature off.
    let backup = format!("{APP_DIR}/.env.backup");
    let text = String::from_utf8(lab.read_file("app1", &backup)?)?;
    let off = text.replace("FEATURE_REPORTS=on", "FEATURE_REPORTS=off");
    ensure!(
        off != text,
        "the lab's good .env turns FEATURE_REPORTS on: {text}"
    );
    lab.write_file("app1", &backup, off.as_bytes(), 0o600)?;

    let out = fleet.rollbackctl(&[
        "rollback",
        "--yes",
        "--procedure",
        "configuration",
        "--select",
        "host=app1",
        "--reason",
        "smoke test",
    ])?;
    assert!(
        !out.status.success(),
        "the rollback fails: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let record = latest_job(&fleet)?;
    // The one host failed: the default threshold (one failure) halts the job.
    assert_eq!(record["state"], "halted", "{record:#}");
    let app1 = &record["hosts"][0];
    assert_eq!(app1["outcome"], "failed", "{record:#}");
    assert_eq!(app1["failed_step"], "smoke.run", "{record:#}");
    assert_eq!(
        lab.readyz("app1")?.status,
        200,
        "/readyz passes all the same"
    );
    let md = report(&fleet, record["job_id"].as_str().unwrap_or_default())?;
    assert!(
        md.contains(
            "- [ ] Test critical functionality — not verified: app1: smoke check(s) reports failed"
        ),
        "{md}"
    );
    Ok(())
}

#[test]
fn application_rollback_checks_out_the_last_good_commit() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-app"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    lab.bad_release(&refs)?;
    let good = lab.release_commit("v2")?;
    // Two operators watch the job while it runs; each sees every event, in order.
    let spawn = |args: &[&str]| -> Result<std::process::Child> {
        Ok(fleet
            .rollbackctl_command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    };
    let rollback_run = spawn(&[
        "rollback",
        "--yes",
        "--select",
        "role=web",
        "--procedure",
        "application",
        "--revision",
        &good,
        "--reason",
        "v3 expects schema 0003",
        "--batch-size",
        "2",
    ])?;
    let job_id = fleet.eventually("the application job is running", || {
        let j = latest_job(&fleet)?;
        ensure!(j["procedure"] == "application", "not yet");
        Ok(j["job_id"].as_str().unwrap_or_default().to_string())
    });
    let watchers = [
        spawn(&["--output", "json", "watch", &job_id])?,
        spawn(&["--output", "json", "watch", &job_id])?,
    ];
    let out = rollback_run.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    for w in watchers {
        let out = w.wait_with_output()?;
        assert!(
            out.status.success(),
            "watch: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect();
        assert_eq!(
            events.last().map(|e| e["kind"].clone()),
            Some("job.finished".into()),
            "watched to the end"
        );
        let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        assert!(seqs.len() > 10, "a whole job's events: {seqs:?}");
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "every event, in order, no gaps"
        );
        seen.push(seqs);
    }
    assert_eq!(seen[0], seen[1], "both watchers saw the same history");
    assert_healthy(&lab, "0002")?;
    let record = latest_job(&fleet)?;
    let md = report(&fleet, record["job_id"].as_str().unwrap_or_default())?;
    assert_report_complete(&md, &record);
    assert!(
        md.contains("- [x] Check application logs for errors"),
        "log.scan verified: {md}"
    );
    Ok(())
}

#[test]
fn database_rollback_downgrades_once_between_barriers_and_restore_brings_rows_back() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-db"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;

    // Option 1: alembic downgrade -1, once.
    lab.bad_migration()?;
    let (ok, out) = rollback(
        &fleet,
        &[
            "--procedure",
            "database",
            "--reason",
            "migration 0003 broke the app",
        ],
    )?;
    assert!(ok, "{out}");
    assert_healthy(&lab, "0002")?;
    let record = latest_job(&fleet)?;
    let runs: Vec<&Value> = record["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|h| h["runs"].as_array().into_iter().flatten())
        .collect();
    let downgrades: Vec<&&Value> = runs.iter().filter(|r| r["phase"] == "downgrade").collect();
    assert_eq!(downgrades.len(), 1, "the downgrade ran on exactly one host");
    assert_eq!(downgrades[0]["steps"][0]["facts"]["from_revision"], "0003");
    assert_eq!(
        downgrades[0]["steps"][0]["facts"]["revision"], "0002",
        "the database went down exactly one revision"
    );
    // Barriers: every host stopped before the downgrade; every start after it.
    let events = fleet.rollbackctl(&[
        "watch",
        record["job_id"].as_str().unwrap_or_default(),
        "--output",
        "json",
    ])?;
    let events: Vec<Value> = String::from_utf8_lossy(&events.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let seq_of = |kind: &str, phase: &str| -> Vec<u64> {
        events
            .iter()
            .filter(|e| e["kind"] == kind && e["phase"] == phase)
            .filter_map(|e| e["seq"].as_u64())
            .collect()
    };
    let stops = seq_of("host.phase_done", "stop");
    let downgrade = seq_of("host.dispatched", "downgrade");
    let starts = seq_of("host.dispatched", "start");
    assert_eq!(stops.len(), 3, "all app hosts stopped: {events:?}");
    assert_eq!(downgrade.len(), 1);
    assert_eq!(starts.len(), 3);
    assert!(
        stops.iter().all(|s| *s < downgrade[0]) && starts.iter().all(|s| *s > downgrade[0]),
        "barriers hold"
    );

    // The alternative: restore the backup taken before a bad deployment.
    let backup = lab.backup_database()?;
    let name = backup
        .path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let before = lab
        .psql("SELECT count(*) FROM incidents")?
        .trim()
        .to_string();
    lab.psql("TRUNCATE incidents CASCADE")?;
    let (ok, out) = rollback(
        &fleet,
        &[
            "--procedure",
            "database-restore",
            "--backup",
            &name,
            "--reason",
            "rows lost",
        ],
    )?;
    assert!(ok, "{out}");
    assert_eq!(
        lab.psql("SELECT count(*) FROM incidents")?.trim(),
        before,
        "the backup's rows are back"
    );
    assert_healthy(&lab, "0002")?;
    let record = latest_job(&fleet)?;
    let db = outcomes(&record)
        .into_iter()
        .find(|(h, _)| h == "db")
        .expect("the db host is the once-host");
    assert_eq!(db.1, "succeeded");
    Ok(())
}

#[test]
fn failing_health_check_halts_the_job_and_cancel_stops_one() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-halt"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    lab.bad_config(&refs)?;
    // app2's "good" copy is broken too: restoring it cannot make /readyz pass.
    let broken = lab.read_file("app2", &format!("{APP_DIR}/.env"))?;
    lab.write_file("app2", &format!("{APP_DIR}/.env.backup"), &broken, 0o600)?;

    let (ok, out) = rollback(
        &fleet,
        &[
            "--procedure",
            "configuration",
            "--reason",
            "halt test",
            "--batch-size",
            "1",
            "--max-failures",
            "1",
        ],
    )?;
    assert!(!ok, "exit code is non-zero: {out}");
    let record = latest_job(&fleet)?;
    assert_eq!(record["state"], "halted");
    assert_eq!(
        outcomes(&record),
        [
            ("app1".into(), "succeeded".into()),
            ("app2".into(), "failed".into()),
            ("app3".into(), "skipped".into())
        ],
        "{record}"
    );
    let app2 = &record["hosts"][1];
    assert_eq!(app2["failed_step"], "http.check");
    assert_ne!(
        lab.read_file("app3", &format!("{APP_DIR}/.env"))?,
        lab.read_file("app3", &format!("{APP_DIR}/.env.backup"))?,
        "app3 was never touched"
    );
    let md = report(&fleet, record["job_id"].as_str().unwrap_or_default())?;
    assert!(
        md.contains("Halted:") && md.contains("--max-failures"),
        "the report says why: {md}"
    );

    // Cancel mid-job: app2's health check keeps failing (its backup is broken) until cancelled.
    let mut cmd = fleet.rollbackctl_command(&[
        "rollback",
        "--yes",
        "--procedure",
        "configuration",
        "--select",
        "host=app2",
        "--reason",
        "cancel test",
    ]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn()?;
    let job_id = fleet.eventually("the cancel-test job is running", || {
        let j = latest_job(&fleet)?;
        ensure!(
            j["reason"] == "cancel test" && j["state"] == "running",
            "not yet"
        );
        Ok(j["job_id"].as_str().unwrap_or_default().to_string())
    });
    fleet.eventually("app2's health check is retrying", || {
        let j = job(&fleet, &job_id)?;
        let runs = j["hosts"][0]["runs"].as_array().map(Vec::len).unwrap_or(0);
        ensure!(runs == 1, "not dispatched yet");
        Ok(())
    });
    let out = fleet.rollbackctl(&["cancel", &job_id, "--reason", "operator stop"])?;
    ensure!(
        out.status.success(),
        "cancel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = child.wait_with_output()?;
    assert!(!out.status.success(), "a cancelled job exits non-zero");
    let record = job(&fleet, &job_id)?;
    assert_eq!(record["state"], "cancelled");
    assert_eq!(outcomes(&record), [("app2".into(), "cancelled".into())]);
    let step = &record["hosts"][0]["runs"][0]["steps"];
    let statuses: Vec<&str> = step
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["status"].as_str())
        .collect();
    assert!(
        statuses.contains(&"cancelled"),
        "the running step was stopped: {statuses:?}"
    );
    Ok(())
}
