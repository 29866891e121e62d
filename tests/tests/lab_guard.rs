//! Acceptance for the deployment guard, end to end in the fleet lab: a snapshot records each
//! host's baseline (smoke latency, error rate, restarts); after a release that makes one
//! endpoint three times slower the guard reports the performance criterion with before and
//! after latency and proposes `application` back to the snapshot's commit, and with `--auto`
//! the fleet ends on that commit; a healthy deployment ends "deployment healthy" with no
//! alarm; a release that crash-loops on one host is a stability breach on that host alone,
//! within one sampling interval of its third restart; a host the guard could not sample is
//! never called healthy; a guard survives `kill -9` of its coordinator.
//! Without root this prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rollback_tests::lab::{self, Lab, LabSpec};
use rollback_tests::lab_fleet::{AGENT_UNIT, LabFleet};
use serde_json::Value;

/// Sampling interval of the guards here.
const INTERVAL: Duration = Duration::from_secs(2);

/// `rollbackctl snapshot --select role=web` with the baseline it measured.
fn snapshot(fleet: &LabFleet, label: &str) -> Result<Value> {
    let out = fleet.rollbackctl(&[
        "--output", "json", "snapshot", "--select", "role=web", "--label", label,
    ])?;
    ensure!(
        out.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = fleet.rollbackctl(&["--output", "json", "snapshots", "--select", "role=web"])?;
    let all: Vec<Value> = serde_json::from_slice(&listed.stdout).context("snapshots json")?;
    Ok(Value::Array(all))
}

/// Runs `rollbackctl guard ARGS`, returning (success, every output line with the moment it
/// arrived).
fn guard(fleet: &LabFleet, args: &[&str]) -> Result<(bool, Vec<(Instant, String)>)> {
    let mut all = vec!["guard", "--select", "role=web"];
    all.extend(args);
    let mut child = fleet
        .rollbackctl_command(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting rollbackctl guard")?;
    let stdout = child.stdout.take().context("guard stdout")?;
    let stderr = child.stderr.take().context("guard stderr")?;
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    let readers = [
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        }),
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send((Instant::now(), line));
            }
        }),
    ];
    let status = child.wait().context("waiting for rollbackctl guard")?;
    for r in readers {
        let _ = r.join();
    }
    Ok((status.success(), rx.try_iter().collect()))
}

fn text(lines: &[(Instant, String)]) -> String {
    lines
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn breaches(lines: &[(Instant, String)]) -> Vec<&str> {
    lines
        .iter()
        .filter(|(_, l)| l.contains("!! breach:"))
        .map(|(_, l)| l.as_str())
        .collect()
}

/// The newest job of `kind`.
fn latest(fleet: &LabFleet, kind: &str) -> Result<Value> {
    let out = fleet.rollbackctl(&["jobs", "--output", "json", "--kind", kind, "--limit", "1"])?;
    let jobs: Vec<Value> = serde_json::from_slice(&out.stdout).context("jobs json")?;
    jobs.into_iter().next().context("no job of that kind")
}

fn restarts(lab: &Lab, host: &str) -> Result<u64> {
    let out = lab.run(
        host,
        &[
            "systemctl",
            "show",
            "--property=NRestarts",
            "--value",
            "app.service",
        ],
    )?;
    Ok(out.trim().parse().unwrap_or(0))
}

#[test]
fn a_release_three_times_slower_is_a_performance_breach_and_auto_rolls_back_to_the_good_commit()
-> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-gslow"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let good = lab.release_commit("v2")?;

    let listed = snapshot(&fleet, "before v2-slow")?;
    for s in listed.as_array().into_iter().flatten() {
        let incidents = s["baseline"]["smoke"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["check"] == "incidents"))
            .with_context(|| format!("the baseline has the incidents check: {s}"))?;
        let p95 = incidents["p95_ms"].as_f64().unwrap_or(0.0);
        assert!(p95 >= 20.0, "v2 answers /api/incidents after 20 ms: {s}");
        assert_eq!(incidents["ok"], true, "{s}");
        assert!(s["baseline"]["restarts"].is_u64(), "restarts recorded: {s}");
    }

    lab.deploy_release(&refs, "v2-slow")?;
    for h in &hosts {
        lab.wait_ready(h)?;
    }
    let reason = "deploy v2-slow";
    let (ok, lines) = guard(
        &fleet,
        &["--window", "60s", "--interval", "2s", "--reason", reason],
    )?;
    let out = text(&lines);
    assert!(!ok, "a breach exits non-zero:\n{out}");
    let found = breaches(&lines);
    assert!(
        hosts.iter().all(|h| found
            .iter()
            .any(|b| b.contains(&format!("performance on {h}:")))),
        "performance on every host:\n{out}"
    );
    assert!(
        found
            .iter()
            .all(|b| b.contains("smoke `incidents` p95") && b.contains("at the baseline")),
        "before and after latency:\n{out}"
    );
    assert!(
        out.contains("performance on 3 of 3 host(s)"),
        "fleet-wide:\n{out}"
    );
    // diagnose: the code changed back from the snapshot's commit; application proposed.
    assert!(
        out.contains("application (code ") && out.contains(&good),
        "the proposal names application and the snapshot's commit {good}:\n{out}"
    );
    assert!(
        out.contains(
            "proposed rollback: rollbackctl rollback --to-snapshot latest --select role=web"
        ),
        "{out}"
    );
    let g = latest(&fleet, "guard")?;
    assert_eq!(g["state"], "halted", "{g:#}");
    for h in &hosts {
        assert_ne!(
            lab.app_head(h)?,
            good,
            "without --auto nothing was rolled back"
        );
    }

    // --auto: the guard starts that rollback itself, and the fleet ends on the good commit.
    let (ok, lines) = guard(
        &fleet,
        &[
            "--window",
            "60s",
            "--interval",
            "2s",
            "--auto",
            "--reason",
            reason,
        ],
    )?;
    let out = text(&lines);
    assert!(!ok, "{out}");
    assert!(out.contains("--auto: started rollback job"), "{out}");
    let rollback = fleet.eventually("the guard's rollback ends", || {
        let j = latest(&fleet, "rollback")?;
        ensure!(j["state"] != "running", "still running");
        Ok(j)
    });
    assert_eq!(rollback["state"], "succeeded", "{rollback:#}");
    assert!(
        rollback["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deployment guard") && r.contains("--auto")),
        "{rollback:#}"
    );
    for h in &hosts {
        assert_eq!(
            lab.app_head(h)?,
            good,
            "{h} is back on the snapshot's commit"
        );
        assert_eq!(lab.readyz(h)?.status, 200);
    }
    let report = fleet.report(rollback["job_id"].as_str().unwrap_or_default())?;
    assert!(report.contains("deployment guard"), "{report}");
    Ok(())
}

#[test]
fn a_healthy_deployment_ends_healthy_and_a_crash_loop_on_one_host_is_its_stability_breach()
-> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-gcrash"))? else {
        return Ok(());
    };
    let mut fleet = LabFleet::start(&lab)?;
    // The lab's latency is not a production host's: the app answers /api/incidents after
    // 20 ms, and on the two vCPUs this lab shares with the suite its samples read 35-54 ms
    // through a whole window (CI, with nothing wrong), over the seed runbook's +20 ms floor.
    // This test judges a healthy deployment, so its runbook puts the floor above that
    // noise (+60 ms); the performance criterion at the seed's thresholds is the next test's
    // (a release three times slower).
    let seed = include_str!("../../common/runbook/seed.toml");
    let runbook = seed.replace(
        "latency_min_increase_ms = 20",
        "latency_min_increase_ms = 60",
    );
    ensure!(
        runbook != seed,
        "the seed runbook's latency floor is no longer 20 ms"
    );
    let config = fleet
        .coordinator_config(0)
        .context("the lab's coordinator config")?;
    let path = config.with_file_name("runbook.toml");
    std::fs::write(&path, runbook).with_context(|| format!("writing {}", path.display()))?;
    let toml = std::fs::read_to_string(&config)?;
    // A top-level key: before the config's tables.
    std::fs::write(&config, format!("runbook = \"{}\"\n{toml}", path.display()))?;
    fleet.start_coordinator()?;
    fleet.wait_online(&lab.app_host_ids())?;
    snapshot(&fleet, "before the deployments")?;

    // A healthy deployment (the same release restarted): no alarm for the whole window.
    let hosts = lab.app_host_ids();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    lab.deploy_release(&refs, "v2")?;
    for h in &hosts {
        lab.wait_ready(h)?;
    }
    let (ok, lines) = guard(
        &fleet,
        &[
            "--window",
            "12s",
            "--interval",
            "2s",
            "--reason",
            "redeploy v2",
        ],
    )?;
    let out = text(&lines);
    assert!(ok, "healthy exits 0:\n{out}");
    assert!(breaches(&lines).is_empty(), "no false alarm:\n{out}");
    assert!(
        out.contains("deployment healthy: no criterion held on 3 host(s) over 7 sample(s)"),
        "{out}"
    );
    assert!(out.contains("incidents p95"), "the figures:\n{out}");
    assert_eq!(latest(&fleet, "guard")?["state"], "succeeded");

    // A host the guard cannot sample (its agent stopped) is not called healthy.
    lab.run("app3", &["systemctl", "stop", AGENT_UNIT])?;
    fleet.eventually("app3 offline", || {
        let agents = fleet.agents()?;
        ensure!(
            agents
                .iter()
                .any(|a| a["host_id"] == "app3" && a["status"] != "online"),
            "still online"
        );
        Ok(())
    });
    let (ok, lines) = guard(
        &fleet,
        &[
            "--window",
            "4s",
            "--interval",
            "2s",
            "--reason",
            "app3 unsampled",
        ],
    )?;
    let out = text(&lines);
    assert!(!ok, "{out}");
    assert!(!out.contains("deployment healthy"), "{out}");
    assert!(out.contains("no sample from app3"), "{out}");
    lab.run("app3", &["systemctl", "start", AGENT_UNIT])?;
    fleet.wait_online(&hosts)?;

    // app2 crash-loops; the guard is started first, and the third restart is timed.
    let started = Instant::now();
    let watcher = std::thread::scope(|s| -> Result<_> {
        let guarded = s.spawn(|| {
            guard(
                &fleet,
                &[
                    "--window",
                    "120s",
                    "--interval",
                    "2s",
                    "--reason",
                    "deploy v2-crash",
                ],
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        let before = restarts(&lab, "app2")?;
        lab.deploy_release(&["app2"], "v2-crash")?;
        let mut third = None;
        while third.is_none() && started.elapsed() < Duration::from_secs(100) {
            if restarts(&lab, "app2")? >= before + 3 {
                third = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let result = guarded
            .join()
            .map_err(|_| anyhow::anyhow!("the guard thread panicked"))??;
        Ok((third, result))
    })?;
    let (third, (ok, lines)) = watcher;
    let out = text(&lines);
    assert!(!ok, "{out}");
    let third = third.context("app2 never restarted 3 times")?;
    let found = breaches(&lines);
    assert!(!found.is_empty(), "{out}");
    assert!(
        found.iter().all(|b| b.contains(" on app2:")),
        "app2 alone:\n{out}"
    );
    assert!(
        found.iter().any(|b| b.contains("stability on app2:")),
        "stability:\n{out}"
    );
    let breach_at = lines
        .iter()
        .find(|(_, l)| l.contains("!! breach:"))
        .map(|(t, _)| *t)
        .context("breach line")?;
    // Within one sampling interval of the third restart, plus the time a sample takes and
    // the output takes to arrive (generous: a loaded machine must not fail this).
    let after = breach_at.saturating_duration_since(third);
    assert!(
        after <= INTERVAL + Duration::from_secs(4),
        "breach {after:?} after the third restart:\n{out}"
    );
    Ok(())
}

/// A guard is a job: the coordinator killed with `kill -9` mid-window, the restarted one
/// resumes it on its schedule, judging the samples stored before the kill, and every round
/// runs once on every host; `rollbackctl guard` follows it across the restart to "healthy".
#[test]
fn a_guard_resumes_after_its_coordinator_is_killed_and_runs_every_round_once() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-gresume"))? else {
        return Ok(());
    };
    let mut fleet = LabFleet::start(&lab)?;
    snapshot(&fleet, "before the deployment")?;
    let child = fleet
        .rollbackctl_command(&[
            "guard",
            "--select",
            "role=web",
            "--window",
            "16s",
            "--interval",
            "2s",
            "--reason",
            "guard across a restart",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting rollbackctl guard")?;
    let id = fleet.eventually("three rounds sampled", || {
        let g = latest(&fleet, "guard")?;
        let id = g["job_id"].as_str().unwrap_or_default().to_string();
        let j = fleet.job(&id)?;
        let runs = j["hosts"][0]["runs"].as_array().map_or(0, Vec::len);
        ensure!(runs >= 3, "{runs} round(s)");
        Ok(id)
    });
    fleet.kill_coordinator()?;
    fleet.start_coordinator()?;
    let out = child
        .wait_with_output()
        .context("waiting for rollbackctl guard")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the guard ends healthy:\n{text}");
    assert!(
        text.contains("deployment healthy: no criterion held on 3 host(s) over 9 sample(s)"),
        "{text}"
    );
    let record = fleet.job(&id)?;
    assert_eq!(record["state"], "succeeded", "{record:#}");
    for h in record["hosts"].as_array().into_iter().flatten() {
        let mut phases: Vec<&str> = h["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["phase"].as_str())
            .collect();
        phases.sort_unstable();
        let mut want: Vec<String> = (1..=9).map(|i| format!("sample-{i}")).collect();
        want.sort_unstable();
        assert_eq!(phases, want, "every round once on {}: {h:#}", h["host_id"]);
    }
    Ok(())
}
