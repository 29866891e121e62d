//! Part (a), the fleet procedure side by side at N hosts: the bash bound (sequential and
//! `xargs -P 16`), fleet-rollback (N agent processes, one `rollbackctl rollback`), Ansible and
//! Salt. Hosts are reset (untimed) before every run and checked after every size.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rollback_tests::support::{Agent, Pki};
use serde_json::json;

use super::harness::{self, Coordinator};
use super::hosts::{self, Hosts};
use super::peers::{self, Ansible, Salt};
use super::sys;

pub const RUNBOOK: &str = r#"# cargo xtask bench, part (a): the benchmark rollback as a runbook procedure.
[procedures.bench]
description = "benchmark: git checkout the previous commit, restore .env, check /healthz"
needs = ["revision"]

[[procedures.bench.phases]]
name = "rollback"
scope = "each"
steps = [
  { action = "git.checkout", params = { revision = "{revision}" } },
  { action = "file.restore", params = { file = "env" } },
  { action = "http.check", params = { endpoint = "/healthz" } },
]
"#;

/// The peers that could be installed, and why the others could not.
pub struct Peers {
    pub ansible: Result<Ansible, String>,
    pub salt: Result<Salt, String>,
}

impl Peers {
    pub fn install(root: &Path) -> Self {
        let ansible = Ansible::install(root).map_err(|e| format!("{e:#}"));
        let salt = Salt::install(root).map_err(|e| format!("{e:#}"));
        Self { ansible, salt }
    }

    /// Neither peer, for the reason given.
    pub fn skipped(why: &str) -> Self {
        Self {
            ansible: Err(why.to_string()),
            salt: Err(why.to_string()),
        }
    }

    pub fn versions(&self) -> serde_json::Value {
        let v = |r: &Result<String, String>| match r {
            Ok(v) => json!(v),
            Err(e) => json!(format!("not installed: {e}")),
        };
        json!({
            "ansible": v(&self.ansible.as_ref().map(Ansible::version).map_err(Clone::clone)),
            "salt": v(&self.salt.as_ref().map(Salt::version).map_err(Clone::clone)),
            "bash": peers::version_of(Path::new("/bin/bash")),
            "xargs": peers::version_of(&sys::which("xargs").unwrap_or_default()),
            "git": peers::version_of(&sys::which("git").unwrap_or_default()),
            "curl": peers::version_of(&sys::which("curl").unwrap_or_default()),
            "python3": peers::version_of(&sys::which("python3").unwrap_or_default()),
        })
    }
}

fn runs_of(
    what: &str,
    runs: usize,
    hosts: &Hosts,
    n: usize,
    mut run: impl FnMut() -> Result<Duration>,
) -> Result<Vec<f64>> {
    let mut walls = Vec::with_capacity(runs);
    for r in 1..=runs {
        hosts.reset(n)?;
        let wall = run().with_context(|| format!("{what} N={n} run {r}"))?;
        eprintln!(
            "bench: fleet N={n}: {what} run {r}: {:.3} s",
            wall.as_secs_f64()
        );
        walls.push(wall.as_secs_f64());
    }
    hosts
        .verify(n, what)
        .with_context(|| format!("{what} N={n}: end state"))?;
    Ok(walls)
}

fn figure(walls: Result<Vec<f64>>) -> serde_json::Value {
    match walls {
        Ok(w) => json!({"runs": w, "median_s": sys::median(&w)}),
        Err(e) => {
            eprintln!("bench: {e:#}");
            json!({"error": format!("{e:#}")})
        }
    }
}

/// fleet-rollback at N: a coordinator, N agent processes, then `runs` timed rollbacks.
fn fleet_rollback(
    root: &Path,
    pki: &Pki,
    hosts: &Hosts,
    n: usize,
    url: &str,
    runs: usize,
) -> Result<serde_json::Value> {
    let dir = root.join(format!("fleet-rollback-{n}"));
    let runbook = root.join("fleet-runbook.toml");
    std::fs::write(&runbook, RUNBOOK).context("writing fleet runbook")?;
    // Labels that target hosts come from the coordinator's inventory.
    let inventory: String = (1..=n)
        .map(|i| format!("[inventory.\"{}\"]\nbench = \"fleet\"\n", hosts::name(i)))
        .collect();
    let mut coord = Coordinator::start(&dir.join("coordinator"), pki, &runbook, &inventory)?;
    let mut agents = Vec::with_capacity(n);
    for (i, d) in hosts.dirs[..n].iter().enumerate() {
        let id = hosts::name(i + 1);
        let certs = harness::cert(pki, "agent", &id)?;
        let profile = harness::app_profile(d, &hosts.git, url);
        agents.push(Agent::start_with_profile(
            &dir,
            &id,
            &[("bench", "fleet")],
            &coord.url,
            &pki.ca(),
            &certs,
            &profile,
        )?);
    }
    coord.wait_online("bench=fleet", n, Duration::from_secs(120))?;
    let mut job_secs = Vec::new();
    let mut timeline = None;
    let walls = runs_of("fleet-rollback", runs, hosts, n, || {
        let (wall, job) = harness::rollback(
            &coord,
            &[
                "--procedure",
                "bench",
                "--select",
                "bench=fleet",
                "--revision",
                &hosts.prev_sha,
                "--reason",
                "cargo xtask bench: fleet",
                "--yes",
                "--canary",
                "0",
                "--batch-size",
                "100%",
            ],
            &dir.join("rollback"),
            Duration::from_secs(300),
        )?;
        if let Some(s) = harness::job_seconds(&job) {
            job_secs.push(s);
        }
        let job_id = job["job_id"].as_str().unwrap_or_default();
        let events = harness::job_events(&coord, job_id, &dir.join("watch"))?;
        let t = host_timeline(&events, wall)?;
        eprintln!("bench: fleet N={n}: fleet-rollback timeline {t}");
        timeline = Some(t);
        Ok(wall)
    })?;
    drop(agents);
    coord.daemon.stop(Duration::from_secs(15));
    Ok(json!({
        "runs": walls,
        "median_s": sys::median(&walls),
        "job_runs": job_secs,
        "job_median_s": sys::median(&job_secs),
        "timeline": timeline,
    }))
}

/// Where one run's time went, from its events: for the host whose last step ended at the
/// median and for the one whose last step ended last (the job waits for it), each milestone in
/// milliseconds after `job.started` (dispatch, each step's start and end, the host's end, which
/// comes at its batch's end); the job's length; and the command's time before the job started
/// and after it ended (planning, the start request, the final record).
fn host_timeline(events: &[harness::Event], wall: Duration) -> Result<serde_json::Value> {
    let at = |kind: &str| events.iter().find(|e| e.kind == kind).map(|e| e.at_ms);
    let start = at("job.started").context("no job.started event")?;
    let end = at("job.finished").context("no job.finished event")?;
    // A host's own end: its last step's, since every host of a batch is done at the same time.
    let ended_at = |host: &str| {
        events
            .iter()
            .filter(|e| e.host == host && e.kind == "step.finished")
            .map(|e| e.at_ms)
            .max()
    };
    let mut hosts: Vec<(i64, &str)> = events
        .iter()
        .filter(|e| e.kind == "host.dispatched")
        .filter_map(|e| ended_at(&e.host).map(|d| (d, e.host.as_str())))
        .collect();
    hosts.sort_unstable();
    let (_, median) = *hosts
        .get(hosts.len() / 2)
        .context("no host finished a step")?;
    let (_, last) = *hosts.last().context("no host finished a step")?;
    let milestones = |host: &str| -> Vec<serde_json::Value> {
        events
            .iter()
            .filter(|e| e.host == host)
            .filter_map(|e| {
                // "HOST ACTION started" / "HOST ACTION succeeded (exit 0) in 0.0s".
                let action = e.message.split_whitespace().nth(1).unwrap_or_default();
                let what = match e.kind.as_str() {
                    "host.dispatched" => "dispatched".to_string(),
                    "step.started" => format!("{action} started"),
                    "step.finished" => format!("{action} finished"),
                    "host.phase_done" | "host.finished" => "host done".to_string(),
                    _ => return None,
                };
                Some(json!([what, e.at_ms - start]))
            })
            .collect()
    };
    let wall_ms = wall.as_secs_f64() * 1000.0;
    Ok(json!({
        "host": median,
        "milestones": milestones(median),
        "last": { "host": last, "milestones": milestones(last) },
        "job_ms": end - start,
        "wall_ms": wall_ms,
        "outside_job_ms": wall_ms - (end - start) as f64,
    }))
}

/// Every peer at N hosts.
pub fn measure(
    root: &Path,
    pki: &Pki,
    peers: &mut Peers,
    n: usize,
    runs: usize,
) -> Result<serde_json::Value> {
    let fleet_root = root.join("fleet");
    let hosts = hosts::setup(&fleet_root.join("hosts"), n)?;
    let (mut health, url) = hosts::health_server(&fleet_root)?;
    let scripts = peers::bash_scripts(&fleet_root)?;
    let scratch = fleet_root.join("scratch");

    let bash_seq = figure(runs_of("bash sequential", runs, &hosts, n, || {
        peers::bash_run(&scripts, "seq.sh", &hosts, n, &url, &scratch)
    }));
    let bash_par = figure(runs_of("bash xargs -P16", runs, &hosts, n, || {
        peers::bash_run(&scripts, "par.sh", &hosts, n, &url, &scratch)
    }));
    let ours = match fleet_rollback(&fleet_root, pki, &hosts, n, &url, runs) {
        Ok(v) => v,
        Err(e) => figure(Err(e)),
    };
    let (ansible5, ansible_n) = match &peers.ansible {
        Ok(a) => (
            figure(runs_of("ansible forks=5", runs, &hosts, n, || {
                a.run(&hosts, n, 5, &url)
            })),
            figure(runs_of(
                &format!("ansible forks={n}"),
                runs,
                &hosts,
                n,
                || a.run(&hosts, n, n, &url),
            )),
        ),
        Err(e) => (json!({"error": e}), json!({"error": e})),
    };
    let salt = match &mut peers.salt {
        Ok(s) => {
            let started = s.start(&hosts, n);
            let fig = match started {
                Ok(startup) => {
                    let mut f = figure(runs_of("salt cmd.run", runs, &hosts, n, || {
                        s.run(&hosts, n, &url)
                    }));
                    f["startup_s"] = json!(startup.as_secs_f64());
                    f
                }
                Err(e) => figure(Err(e)),
            };
            s.stop();
            fig
        }
        Err(e) => json!({"error": e}),
    };
    health.stop(Duration::from_secs(5));
    Ok(json!({
        "n": n,
        "runs": runs,
        "bash_seq": bash_seq,
        "bash_p16": bash_par,
        "fleet_rollback": ours,
        "ansible_f5": ansible5,
        "ansible_fn": ansible_n,
        "salt": salt,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at_ms: i64, kind: &str, host: &str, message: &str) -> harness::Event {
        harness::Event {
            at_ms,
            kind: kind.into(),
            host: host.into(),
            message: message.into(),
        }
    }

    #[test]
    fn the_timeline_follows_the_median_and_the_last_host_by_their_own_last_step() {
        // Three hosts, done together at the batch's end (900 ms), whose checkouts ended at
        // 300 (h3), 500 (h1) and 800 ms (h2).
        let mut events = vec![ev(1_000, "job.started", "", "")];
        for (host, ended) in [("h1", 1_500), ("h2", 1_800), ("h3", 1_300)] {
            events.push(ev(1_001, "host.dispatched", host, ""));
            events.push(ev(
                1_002,
                "step.started",
                host,
                &format!("{host} git.checkout started"),
            ));
            events.push(ev(
                ended,
                "step.finished",
                host,
                &format!("{host} git.checkout succeeded"),
            ));
            events.push(ev(1_900, "host.phase_done", host, ""));
        }
        events.push(ev(1_950, "job.finished", "", ""));
        let t = host_timeline(&events, Duration::from_millis(1_000)).expect("timeline");
        assert_eq!(t["host"], "h1", "{t}");
        assert_eq!(t["last"]["host"], "h2", "{t}");
        assert_eq!(
            t["last"]["milestones"][2],
            json!(["git.checkout finished", 800]),
            "{t}"
        );
        assert_eq!(t["job_ms"], 950);
    }
}
