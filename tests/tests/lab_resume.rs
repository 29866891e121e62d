//! Acceptance for rollbacks that finish whatever happens, end to end in the fleet lab through
//! `rollbackctl`: the coordinator killed with SIGKILL at each boundary of the `database`
//! procedure resumes the job by itself and downgrades exactly once; repeating a finished
//! rollback changes nothing; a relative `--revision` that means different commits on different
//! hosts is refused at plan time; two rollbacks on the same hosts never run at once; an agent
//! killed mid-step leaves its host `interrupted`, and `job resume` finishes the job.
//! Without root this prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rollback_tests::lab::{self, APP_DIR, LabSpec};
use rollback_tests::lab_fleet::{LabFleet, assert_healthy, outcomes};
use rollback_tests::support::eventually;
use serde_json::Value;

/// Starts `rollbackctl ARGS` in the background, its output captured.
fn spawn(fleet: &LabFleet, args: &[&str]) -> Result<Child> {
    fleet
        .rollbackctl_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting rollbackctl")
}

/// Starts `rollbackctl rollback --yes --procedure configuration --select SELECT --reason
/// REASON [EXTRA...]` in the background.
fn spawn_configuration(
    fleet: &LabFleet,
    select: &str,
    reason: &str,
    extra: &[&str],
) -> Result<Child> {
    let mut args = vec![
        "rollback",
        "--yes",
        "--select",
        select,
        "--procedure",
        "configuration",
        "--reason",
        reason,
    ];
    args.extend(extra);
    spawn(fleet, &args)
}

/// Waits for a background `rollbackctl`: (succeeded, stdout + stderr).
fn finish(child: Child) -> Result<(bool, String)> {
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The id of the newest job with `reason`, once it is running (a job that waits for the
/// second person's approval is approved by the fleet's approver meanwhile).
fn running_job(fleet: &LabFleet, reason: &str) -> String {
    fleet.eventually(&format!("a running job `{reason}`"), || {
        fleet.approve_waiting();
        let j = fleet.latest_job()?;
        ensure!(j["reason"] == reason && j["state"] == "running", "not yet");
        Ok(j["job_id"].as_str().unwrap_or_default().to_string())
    })
}

/// Follows job `id` (`watch --output json`) until an event of `kind` in `phase` is stored.
fn wait_for_event(fleet: &LabFleet, id: &str, kind: &str, phase: &str) -> Result<Value> {
    let mut watch = fleet
        .rollbackctl_command(&["--output", "json", "watch", id])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rollbackctl watch")?;
    let stdout = watch.stdout.take().context("watch stdout")?;
    let mut found = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(ev) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        if ev["kind"] == kind && ev["phase"] == phase {
            found = Some(ev);
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    found.with_context(|| format!("job {id} ended without a `{kind}` event in phase `{phase}`"))
}

/// The job's record once it is no longer running.
fn ended(fleet: &LabFleet, id: &str) -> Value {
    eventually(&format!("job {id} ends"), Duration::from_secs(180), || {
        let j = fleet.job(id)?;
        ensure!(j["state"] != "running", "still running");
        Ok(j)
    })
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

#[test]
fn database_rollback_survives_a_coordinator_kill_at_each_boundary_and_a_repeat_changes_nothing()
-> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-resume"))? else {
        return Ok(());
    };
    let mut fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let boundaries = [
        ("phase.finished", "stop", "after the stop phase"),
        ("host.dispatched", "downgrade", "during the downgrade"),
        ("host.phase_done", "downgrade", "after the downgrade"),
        ("host.dispatched", "start", "during the start phase"),
    ];
    let mut last_job = String::new();
    for (kind, phase, boundary) in boundaries {
        lab.bad_migration()?;
        assert_eq!(lab.schema_revision()?.as_deref(), Some("0003"));
        let reason = format!("migration 0003 broke the app; coordinator killed {boundary}");
        let rollback = spawn(
            &fleet,
            &[
                "rollback",
                "--yes",
                "--select",
                "role=web",
                "--procedure",
                "database",
                "--reason",
                &reason,
            ],
        )?;
        let id = running_job(&fleet, &reason);
        wait_for_event(&fleet, &id, kind, phase)?;
        fleet.kill_coordinator()?;
        fleet.start_coordinator()?;

        let record = ended(&fleet, &id);
        let (ok, out) = finish(rollback)?;
        assert!(
            ok,
            "{boundary}: rollbackctl followed the job across the restart to its end:\n{out}"
        );
        assert_eq!(record["state"], "succeeded", "{boundary}: {record:#}");
        assert!(
            outcomes(&record).iter().all(|(_, o)| o == "succeeded"),
            "{boundary}: {record:#}"
        );
        fleet.wait_online(&hosts)?;
        assert_healthy(&lab, "0002").with_context(|| format!("{boundary}: {record:#}"))?;

        // Downgraded once: one run of the once-phase, which went 0003 → 0002.
        let downgrades = runs_of(&record, "downgrade");
        assert_eq!(
            downgrades.len(),
            1,
            "{boundary}: the downgrade run was re-attached, never dispatched again: {downgrades:#?}"
        );
        let facts =
            &step(downgrades[0], "alembic.downgrade").context("the downgrade step")?["facts"];
        assert_eq!(facts["from_revision"], "0003", "{boundary}: {facts}");
        assert_eq!(facts["revision"], "0002", "{boundary}: {facts}");
        assert_eq!(facts["changed"], "true", "{boundary}: {facts}");
        // Every phase ran once on each of its hosts.
        for h in record["hosts"].as_array().into_iter().flatten() {
            for p in ["stop", "start", "verify"] {
                let n = h["runs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["phase"] == p)
                    .count();
                let expected = usize::from(h["once_only"] != true);
                assert_eq!(
                    n, expected,
                    "{boundary}: phase {p} on {}: {h:#}",
                    h["host_id"]
                );
            }
        }
        assert_eq!(
            record["plan"]["pins"][0]["to"], "0002",
            "the target was pinned at plan time: {}",
            record["plan"]["pins"]
        );
        // The report tells the whole story, the restart included.
        let md = fleet.report(&id)?;
        assert!(
            md.contains("## Timeline")
                && md.contains("job.resumed")
                && md.contains("coordinator restarted"),
            "{boundary}: the report shows the restart:\n{md}"
        );
        assert!(
            md.contains("0003 → 0002"),
            "{boundary}: the pin is in the report:\n{md}"
        );
        last_job = id;
    }

    // Acceptance 2: the same rollback again changes nothing, and says so.
    let (ok, out) = fleet.rollback_web(&[
        "--procedure",
        "database",
        "--reason",
        "migration 0003 broke the app; coordinator killed during the start phase",
    ])?;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("repeats job {last_job}")),
        "the plan says its pin comes from the job it repeats:\n{out}"
    );
    assert_healthy(&lab, "0002")?;
    let record = fleet.latest_job()?;
    let downgrades = runs_of(&record, "downgrade");
    let facts = &step(downgrades[0], "alembic.downgrade").context("downgrade step")?["facts"];
    assert_eq!(facts["changed"], "false", "nothing was downgraded: {facts}");
    assert_eq!(facts["revision"], "0002");
    let once = record["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["host_id"] == record["plan"]["once_host"])
        .context("the once-host")?;
    assert!(
        once["detail"]
            .as_str()
            .is_some_and(|d| d.contains("already at 0002")),
        "the once-host says it was already at the target: {once}"
    );

    // The application rollback, twice: the same HEAD both times.
    let good = lab.release_commit("v2")?;
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    lab.bad_release(&refs)?;
    let args = [
        "--procedure",
        "application",
        "--revision",
        "HEAD~1",
        "--reason",
        "v3 is bad",
    ];
    let (ok, out) = fleet.rollback_web(&args)?;
    assert!(ok, "{out}");
    assert_healthy(&lab, "0002")?;
    let first = fleet.latest_job()?;
    assert_eq!(
        first["plan"]["pins"][0]["to"],
        good.as_str(),
        "HEAD~1 of v3 pinned to v2"
    );
    let (ok, out) = fleet.rollback_web(&args)?;
    assert!(ok, "{out}");
    assert_healthy(&lab, "0002").context("the repeat did not go further back than v2")?;
    let again = fleet.latest_job()?;
    for h in again["hosts"].as_array().into_iter().flatten() {
        let checkout = h["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|r| step(r, "git.checkout"))
            .context("a checkout step")?;
        assert_eq!(checkout["facts"]["changed"], "false", "{h}");
        assert!(
            h["detail"]
                .as_str()
                .is_some_and(|d| d.contains("already at")),
            "each host says it was already there: {h}"
        );
    }
    Ok(())
}

#[test]
fn one_commit_everywhere_one_job_per_host_and_an_agent_killed_mid_step_resumes() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-lease"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let good = lab.release_commit("v2")?;

    // Acceptance 3: a mixed fleet (only app3 on the bad release) and a relative revision.
    lab.bad_release(&["app3"])?;
    let jobs_before = fleet.latest_job().ok().map(|j| j["job_id"].clone());
    let (ok, out) = fleet.rollback_web(&[
        "--procedure",
        "application",
        "--revision",
        "HEAD~1",
        "--reason",
        "mixed fleet",
    ])?;
    assert!(!ok, "refused: {out}");
    assert!(
        out.contains("different commits")
            && out.contains("app3: HEAD")
            && out.contains("app1: HEAD"),
        "the refusal names the hosts and their HEADs:\n{out}"
    );
    assert_eq!(
        fleet.latest_job().ok().map(|j| j["job_id"].clone()),
        jobs_before,
        "nothing was started"
    );
    assert_ne!(lab.app_head("app3")?, good, "app3 untouched");
    // One sha: every host ends on it.
    let (ok, out) = fleet.rollback_web(&[
        "--procedure",
        "application",
        "--revision",
        &good,
        "--reason",
        "mixed fleet, one sha",
    ])?;
    assert!(ok, "{out}");
    assert_healthy(&lab, "0002")?;

    // Acceptance 4: two rollbacks on the same hosts at the same moment: exactly one runs.
    lab.bad_config(&refs)?;
    let both = [
        spawn_configuration(&fleet, "role=web", "operator A", &[])?,
        spawn_configuration(&fleet, "role=web", "operator B", &[])?,
    ];
    let results: Vec<(bool, String)> = both.into_iter().map(finish).collect::<Result<_>>()?;
    let winners = results.iter().filter(|(ok, _)| *ok).count();
    assert_eq!(winners, 1, "exactly one ran: {results:#?}");
    let ran = fleet.latest_job()?;
    let (_, refused) = results
        .iter()
        .find(|(ok, _)| !ok)
        .context("the refused one")?;
    assert!(
        refused.contains(&format!(
            "by job {}",
            ran["job_id"].as_str().unwrap_or_default()
        )),
        "the refusal names the holder's job: {refused}"
    );
    assert!(
        outcomes(&ran).iter().all(|(_, o)| o == "succeeded"),
        "busy is never a host failure: {ran:#}"
    );
    assert_healthy(&lab, "0002")?;

    // With --wait the second one queues, then runs; a mutating exec meanwhile is refused.
    lab.bad_config(&refs)?;
    // app2's good copy is broken: the first job keeps retrying /readyz there for a while.
    let broken = lab.read_file("app2", &format!("{APP_DIR}/.env"))?;
    let good_env = lab.read_file("app2", &format!("{APP_DIR}/.env.backup"))?;
    lab.write_file("app2", &format!("{APP_DIR}/.env.backup"), &broken, 0o600)?;
    let first = spawn_configuration(&fleet, "host=app2", "holder", &[])?;
    let holder = running_job(&fleet, "holder");
    let out = fleet.rollbackctl(&["exec", "app2", "service.restart", "--reason", "test"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("leased to job {holder}")),
        "a mutating exec on a leased host is refused, naming the holder: {err}"
    );
    let waiter = spawn_configuration(&fleet, "role=web", "waiter", &["--wait"])?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fleet.latest_job()?["job_id"].as_str(),
        Some(holder.as_str()),
        "the waiter has not started while the holder runs"
    );
    // The holder already restored the broken copy; the waiter will restore the good one.
    lab.write_file("app2", &format!("{APP_DIR}/.env.backup"), &good_env, 0o600)?;
    let (ok, out) = finish(first)?;
    assert!(!ok, "the holder fails on app2's broken backup: {out}");
    let (ok, out) = finish(waiter)?;
    assert!(ok, "the waiter ran once the holder ended: {out}");
    let waited = fleet.latest_job()?;
    assert_eq!(waited["reason"], "waiter");
    let holder_record = fleet.job(&holder)?;
    assert!(
        waited["created_at_unix_ms"].as_i64() >= holder_record["finished_at_unix_ms"].as_i64(),
        "started after the holder ended: {} vs {}",
        waited["created_at"],
        holder_record["finished_at"]
    );
    assert_healthy(&lab, "0002")?;

    // A host busy with another run (an operator's read-only check, which takes no lease): the
    // job waits for it and goes on; busy is never a host failure.
    lab.bad_config(&["app1"])?;
    let checks_started = || {
        fleet
            .agent_log("app1")
            .lines()
            .filter(|l| l.contains("step started") && l.contains("http.check"))
            .count()
    };
    let before = checks_started();
    let check = spawn(
        &fleet,
        &[
            "exec",
            "app1",
            "http.check",
            "endpoint=/no-such-page",
            "retries=8",
            "interval_ms=500",
        ],
    )?;
    fleet.eventually("the check runs on app1", || {
        ensure!(checks_started() > before, "not yet");
        Ok(())
    });
    let (ok, out) = fleet.rollback_web(&[
        "--procedure",
        "configuration",
        "--reason",
        "while app1 is busy",
    ])?;
    assert!(ok, "the job waited for the busy host: {out}");
    assert!(
        out.contains("app1 is busy") && out.contains("busy is not a failure"),
        "the wait is shown: {out}"
    );
    let (check_ok, check_out) = finish(check)?;
    assert!(
        !check_ok && check_out.contains("no-such-page") && !check_out.contains("busy"),
        "the operator's check ran to its end (a 404), undisturbed: {check_out}"
    );
    assert_healthy(&lab, "0002")?;

    // Acceptance 5: an agent killed mid-step.
    lab.bad_config(&["app2"])?;
    lab.write_file("app2", &format!("{APP_DIR}/.env.backup"), &broken, 0o600)?;
    let crash = spawn_configuration(&fleet, "host=app2", "agent crash", &[])?;
    let id = running_job(&fleet, "agent crash");
    // file.restore has run; http.check is retrying when the agent dies.
    let ev = wait_for_event(&fleet, &id, "step.finished", "rollback")?;
    ensure!(
        ev["message"]
            .as_str()
            .is_some_and(|m| m.contains("file.restore")),
        "first step first: {ev}"
    );
    // Into the retrying health check (or the restart before it): mid-step either way.
    std::thread::sleep(Duration::from_secs(1));
    fleet.kill_agent("app2")?;
    let record = ended(&fleet, &id);
    let (ok, _) = finish(crash)?;
    assert!(!ok);
    assert_eq!(
        outcomes(&record),
        [("app2".to_string(), "interrupted".to_string())],
        "{record:#}"
    );
    let cut = &record["hosts"][0]["runs"][0];
    let statuses: Vec<&str> = cut["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["status"].as_str())
        .collect();
    assert!(statuses.contains(&"interrupted"), "{statuses:?}");
    fleet.wait_online(&["app2".to_string()])?;
    // Repair the cause, then resume: the host is brought to the target.
    lab.write_file("app2", &format!("{APP_DIR}/.env.backup"), &good_env, 0o600)?;
    let out = fleet.rollbackctl(&["job", "resume", &id, "--reason", "agent back, backup fixed"])?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let record = fleet.job(&id)?;
    assert_eq!(record["state"], "succeeded", "{record:#}");
    let runs = record["hosts"][0]["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(runs.len(), 2, "the cut run plus one retry: {runs:#?}");
    assert_eq!(
        runs[0]["run_id"], cut["run_id"],
        "the interrupted run keeps its result and is never run again"
    );
    assert_eq!(runs[0]["status"], "interrupted");
    assert!(
        fleet
            .agent_log("app2")
            .matches(cut["run_id"].as_str().unwrap_or("-"))
            .count()
            >= 1,
        "the agent reported the cut run"
    );
    assert_healthy(&lab, "0002")?;
    let md = fleet.report(&id)?;
    assert!(
        md.contains("agent back, backup fixed"),
        "the resume is in the report:\n{md}"
    );
    Ok(())
}
