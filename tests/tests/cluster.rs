//! Three coordinators on one PostgreSQL store, simulated agents spread over them (each step
//! takes a while, so a job is still running when its coordinator dies):
//! - a job started on A, A killed with `kill -9` mid-job: B or C takes it over and finishes it,
//!   every host ran each phase exactly once (the agents' journals), a `watch` on B saw it
//!   through to the end, and the report and audit trail name the takeover;
//! - A's agents are online on B or C within 10 s, and a rollback started right after on C
//!   reaches every host, wherever its session is;
//! - `rollbackctl coordinators` shows A dead and the others alive; `agents` names each
//!   agent's coordinator;
//! - results whose messages never reach the job's owner are taken from the store by its sweep.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rollback_tests::pg;
use rollback_tests::support::{
    CertFiles, Coordinator, Pki, Simulator, agents_json, eventually, output_within, rollbackctl,
    rollbackctl_command,
};

const K: usize = 6;
const STEP_MS: u64 = 1500;

/// Two phases of one simulated step each, on every host, one host at a time after the canary:
/// long enough to kill the owner in the middle.
const SLOW_RUNBOOK: &str = r#"
[procedures.slow]
description = "two phases; each simulated step takes a while"

[[procedures.slow.phases]]
name = "first"
scope = "each"
steps = [{ action = "postgres.backup" }]

[[procedures.slow.phases]]
name = "second"
scope = "each"
steps = [{ action = "postgres.backup" }]
"#;

/// The shared database, dropped after the coordinators (fields drop in order).
struct Db(pg::Server, String);

impl Drop for Db {
    fn drop(&mut self) {
        let _ = self.0.drop_database(&self.1);
    }
}

struct Fleet {
    sim: Simulator,
    coords: Vec<Coordinator>,
    _db: Db,
    pki: Pki,
    op: CertFiles,
    _tmp: tempfile::TempDir,
}

impl Fleet {
    fn url(&self, i: usize) -> String {
        self.coords[i].url()
    }

    fn ctl(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        rollbackctl(&self.url(i), &self.pki.ca(), &self.op, args)
    }

    fn json(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.ctl(i, &all)?;
        ensure!(
            out.status.success(),
            "rollbackctl {args:?} on coordinator {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).context("parsing rollbackctl's JSON")
    }

    /// Every simulated host online, by coordinator name.
    fn online_by_coordinator(&self, i: usize) -> Result<Vec<(String, String)>> {
        let agents = agents_json(&self.url(i), &self.pki.ca(), &self.op, Some("sim=yes"))?;
        Ok(agents
            .iter()
            .filter(|a| a["status"] == "online")
            .map(|a| {
                (
                    a["host_id"].as_str().unwrap_or_default().to_string(),
                    a["coordinator"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }
}

/// Coordinators `names` sharing `database`, each with the slow runbook and `inventory`
/// (coordinator.toml lines), in subdirectories of `dir` named after them.
fn start_coordinators(
    dir: &std::path::Path,
    names: &[&str],
    pki: &Pki,
    inventory: &str,
    server: &pg::Server,
    database: &str,
) -> Result<Vec<Coordinator>> {
    let runbook = dir.join("slow.toml");
    std::fs::write(&runbook, SLOW_RUNBOOK)?;
    let mut coords = Vec::new();
    for name in names {
        let cdir = dir.join(name);
        std::fs::create_dir_all(&cdir)?;
        let top = format!(
            "name = \"{name}\"\nrunbook = \"{}\"\n{inventory}",
            runbook.display()
        );
        coords.push(Coordinator::start_sharing(
            &cdir,
            pki,
            &[("alice", "admin")],
            &format!("coordinator-{name}"),
            &top,
            server,
            database,
        )?);
    }
    Ok(coords)
}

/// What each test here starts from: the suite's PostgreSQL server and a fresh database in
/// it, a directory, and a PKI with the operator alice.
struct Setup {
    server: pg::Server,
    database: String,
    tmp: tempfile::TempDir,
    pki: Pki,
    op: CertFiles,
}

/// None on the SQLite pass: several coordinators share one store only on PostgreSQL, so this
/// suite runs in the PostgreSQL pass of `cargo xtask test`.
fn setup() -> Result<Option<Setup>> {
    if pg::backend() != pg::Backend::Postgres {
        eprintln!("cluster: runs on the PostgreSQL store only (ROLLBACK_TEST_STORE=postgres)");
        return Ok(None);
    }
    let server = pg::Server::from_env();
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), "cluster.test")?;
    let op = pki.operator("alice")?;
    let database = server.create_database()?;
    Ok(Some(Setup {
        server,
        database,
        tmp,
        pki,
        op,
    }))
}

fn start_fleet() -> Result<Option<Fleet>> {
    let Some(Setup {
        server,
        database,
        tmp,
        pki,
        op,
    }) = setup()?
    else {
        return Ok(None);
    };
    let dir = tmp.path();
    let inventory: String = (1..=K)
        .map(|i| format!("[inventory.\"sim-{i:05}\"]\nsim = \"yes\"\n"))
        .collect();
    let coords = start_coordinators(dir, &["a", "b", "c"], &pki, &inventory, &server, &database)?;
    let urls: Vec<String> = coords.iter().map(Coordinator::url).collect();
    let sim = Simulator::start_slow(dir, &urls, &pki, K, STEP_MS)?;
    let fleet = Fleet {
        _tmp: tmp,
        _db: Db(server, database),
        pki,
        op,
        coords,
        sim,
    };
    eventually(
        "every simulated agent online, spread over the three coordinators",
        Duration::from_secs(60),
        || {
            let online = fleet.online_by_coordinator(1)?;
            ensure!(
                online.len() == K,
                "{} of {K} online: {online:?}",
                online.len()
            );
            for name in ["a", "b", "c"] {
                ensure!(
                    online.iter().any(|(_, c)| c == name),
                    "none on {name}: {online:?}"
                );
            }
            Ok(())
        },
    );
    Ok(Some(fleet))
}

/// `rollback` of the slow procedure to every simulated host at once, in JSON.
fn rollback_everywhere(reason: &str) -> [&str; 14] {
    [
        "--output",
        "json",
        "rollback",
        "--procedure",
        "slow",
        "--select",
        "sim=yes",
        "--reason",
        reason,
        "--yes",
        "--canary",
        "0",
        "--batch-size",
        "100%",
    ]
}

fn job_state(f: &Fleet, i: usize, job: &str) -> Result<String> {
    let j = f.json(i, &["job", "show", job])?;
    Ok(j["state"].as_str().unwrap_or_default().to_string())
}

#[test]
fn a_job_whose_coordinator_is_killed_is_finished_by_another_exactly_once() -> Result<()> {
    let Some(mut f) = start_fleet()? else {
        return Ok(());
    };
    // Started on A: A owns it.
    let mut start = rollbackctl_command(
        &f.url(0),
        &f.pki.ca(),
        &f.op,
        &[
            "rollback",
            "--procedure",
            "slow",
            "--select",
            "sim=yes",
            "--reason",
            "takeover test",
            "--yes",
            "--canary",
            "1",
            "--batch-size",
            "2",
        ],
    );
    let starter = start
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the rollback on A")?;
    let _starter = Reap(starter);
    let job = eventually("the job stored", Duration::from_secs(20), || {
        let jobs = f.json(1, &["jobs"])?;
        let id = jobs
            .as_array()
            .and_then(|a| a.first())
            .and_then(|j| j["job_id"].as_str())
            .context("no job yet")?
            .to_string();
        Ok(id)
    });
    // A watch on B follows the job from the store, whoever drives it.
    let watch_out = f._tmp.path().join("watch-b.out");
    let watcher = rollbackctl_command(&f.url(1), &f.pki.ca(), &f.op, &["watch", &job])
        .stdout(std::fs::File::create(&watch_out)?)
        .stderr(Stdio::null())
        .spawn()
        .context("watching on B")?;
    let mut watcher = Reap(watcher);
    // Kill A once the first phase is under way (a run dispatched, not all of it done).
    eventually(
        "the first phase running on A",
        Duration::from_secs(30),
        || {
            let j = f.json(1, &["job", "show", &job])?;
            let runs: usize = j["hosts"]
                .as_array()
                .map(|hs| {
                    hs.iter()
                        .map(|h| h["runs"].as_array().map_or(0, Vec::len))
                        .sum()
                })
                .unwrap_or(0);
            ensure!(runs >= 1, "no run dispatched yet");
            Ok(())
        },
    );
    let killed_at = Instant::now();
    f.coords[0].proc.kill();

    // A's agents move to B or C within 10 s (acceptance 3).
    eventually(
        "A's agents online elsewhere",
        Duration::from_secs(10),
        || {
            let online = f.online_by_coordinator(1)?;
            ensure!(
                online.len() == K,
                "{} of {K} online: {online:?}",
                online.len()
            );
            ensure!(
                online.iter().all(|(_, c)| c != "a"),
                "still on a: {online:?}"
            );
            Ok(())
        },
    );
    let moved_in = killed_at.elapsed();

    // Taken over and finished by B or C.
    eventually(
        "the job finished by B or C",
        Duration::from_secs(90),
        || {
            let state = job_state(&f, 2, &job)?;
            ensure!(state == "succeeded", "job is {state}");
            Ok(())
        },
    );
    let j = f.json(2, &["job", "show", &job])?;
    for h in j["hosts"].as_array().context("hosts")? {
        assert_eq!(h["outcome"], "succeeded", "{h:#}");
    }
    // Exactly once: each host journaled one run per phase.
    for i in 1..=K {
        let host = format!("sim-{i:05}");
        assert_eq!(
            f.sim.journaled_runs(&host),
            2,
            "{host} ran each of the two phases exactly once"
        );
    }
    // The watch on B saw it through to the end, takeover included.
    let status = eventually("the watch on B ended", Duration::from_secs(20), || {
        watcher.0.try_wait()?.context("still watching")
    });
    let seen = std::fs::read_to_string(&watch_out)?;
    assert!(status.success(), "watch on B failed:\n{seen}");
    assert!(
        seen.contains("took the job over from coordinator a"),
        "the watch shows the takeover:\n{seen}"
    );
    // The report and the audit trail name it.
    let report = f.ctl(1, &["report", &job])?;
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.contains("took the job over from coordinator a"),
        "report:\n{report}"
    );
    let out = f.ctl(1, &["audit", "--job", &job])?;
    let audit = String::from_utf8_lossy(&out.stdout);
    assert!(
        audit.contains("takeover from coordinator a"),
        "audit:\n{audit}"
    );
    // `coordinators`: A dead, B and C alive and holding every agent.
    let listed = f.json(1, &["coordinators"])?;
    let list = listed["coordinators"].as_array().context("coordinators")?;
    let by = |n: &str| {
        list.iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_default()
    };
    eventually("a shown dead", Duration::from_secs(15), || {
        let listed = f.json(1, &["coordinators"])?;
        let a = listed["coordinators"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "a").cloned())
            .context("a not listed")?;
        ensure!(a["alive"] == false, "{a}");
        Ok(())
    });
    assert_eq!(by("b")["alive"], true);
    assert_eq!(by("c")["alive"], true);

    // A rollback started right after, on C, reaches every host wherever it is held.
    let out = f.ctl(2, &rollback_everywhere("after the failover"))?;
    ensure!(
        out.status.success(),
        "rollback on C after the failover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 1..=K {
        assert_eq!(f.sim.journaled_runs(&format!("sim-{i:05}")), 4);
    }
    eprintln!("agents moved in {moved_in:?}");
    Ok(())
}

/// The coordinator holding the host stores each result and its notification is refused (a
/// `pg_notify` in the database's own schema, ahead of the built-in one on its search path,
/// refuses B's `finished` messages and passes everything else): the job's owner, A, never
/// hears of them, and takes each result from the store at its next sweep. Without the sweep
/// the job waits for the host until A restarts.
#[test]
fn a_result_whose_message_is_lost_is_taken_from_the_store() -> Result<()> {
    let Some(setup) = setup()? else {
        return Ok(());
    };
    let (server, database, pki, op) = (setup.server, setup.database, setup.pki, setup.op);
    let dir = setup.tmp.path();
    server.psql(
        &database,
        &format!(
            "ALTER DATABASE \"{database}\" SET search_path = public, pg_catalog;
             CREATE FUNCTION public.pg_notify(channel text, payload text) RETURNS void
             LANGUAGE plpgsql AS $$
             BEGIN
               IF payload LIKE '{{\"from\":\"' ||
                    coalesce((SELECT instance FROM coordinators WHERE name = 'b'), '-') ||
                    '\",\"t\":\"finished\"%' THEN
                 RAISE EXCEPTION 'results announced by b are refused (test)';
               END IF;
               PERFORM pg_catalog.pg_notify(channel, payload);
             END $$;"
        ),
    )?;
    let inventory = "[inventory.\"sim-00001\"]\nsim = \"yes\"\n";
    let coords = start_coordinators(dir, &["a", "b"], &pki, inventory, &server, &database)?;
    let _db = Db(server, database);
    // The one host knows only B.
    let sim = Simulator::start_slow(dir, &[coords[1].url()], &pki, 1, 100)?;
    eventually("the host online at b", Duration::from_secs(60), || {
        let agents = agents_json(&coords[0].url(), &pki.ca(), &op, Some("sim=yes"))?;
        ensure!(
            agents
                .iter()
                .any(|a| a["status"] == "online" && a["coordinator"] == "b"),
            "{agents:?}"
        );
        Ok(())
    });

    // Started on A: A drives it, B holds the host.
    let out = output_within(
        rollbackctl_command(
            &coords[0].url(),
            &pki.ca(),
            &op,
            &rollback_everywhere("lost results"),
        ),
        Duration::from_secs(120),
    )?;
    ensure!(
        out.status.success(),
        "rollback on A: {}\n--- a ---\n{}\n--- b ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        coords[0].logs(),
        coords[1].logs()
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    // Each phase's result was announced, refused, and found in the store.
    let (a, b) = (coords[0].logs(), coords[1].logs());
    assert!(
        b.contains("results announced by b are refused (test)"),
        "b's notifications were refused:\n{b}"
    );
    let from_store: std::collections::HashSet<&str> = a
        .lines()
        .filter(|l| l.contains("no message about it came"))
        .filter_map(|l| l.split(" run=").nth(1)?.split_whitespace().next())
        .collect();
    // Each result reaches A from the store: by the sweep, or (were B's session to drop) by
    // the wait for a dropped host's result, which logs nothing.
    assert!(
        !from_store.is_empty(),
        "a took the runs' results from the store:\n{a}"
    );
    // Exactly once: the host journaled one run per phase.
    assert_eq!(sim.journaled_runs("sim-00001"), 2);
    Ok(())
}

/// Kills and reaps a child when dropped.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
