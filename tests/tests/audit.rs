//! The tamper-evident audit trail end to end, against a real coordinator and simulated agents:
//! `rollbackctl audit verify` passes on a real history (a job and an exec) and fails, naming
//! the record, once one row is edited or removed in the store (SQLite or PostgreSQL) behind the
//! coordinator's back (running or stopped); the `audit` filters; every record names its actor; and a failed
//! audit write fails the operation it records, leaving no effect — including a run's result.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rollback_tests::support::{
    Agent, CertFiles, Coordinator, NOOP_RUNBOOK, Pki, Simulator, agents_json, eventually,
    output_within, rollbackctl, rollbackctl_command,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// A coordinator with the no-op runbook, simulated hosts `sim-00001`.. online, and an operator
/// of each role that matters here.
struct Fleet {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    coord: Coordinator,
    sim: Simulator,
    /// alice: admin (starts jobs, execs mutating actions, forgets agents).
    admin: CertFiles,
    /// abe: approver (reads the trail).
    approver: CertFiles,
    /// otto: operator (may verify the trail, not read it).
    operator: CertFiles,
}

fn fleet(hosts: usize) -> Result<Fleet> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let pki = Pki::init(&dir.join("pki"), "audit.test")?;
    let admin = pki.operator("alice")?;
    let approver = pki.operator("abe")?;
    let operator = pki.operator("otto")?;
    let coord_dir = dir.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let mut coord = Coordinator::start(
        &coord_dir,
        &pki,
        &[
            ("alice", "admin"),
            ("abe", "approver"),
            ("otto", "operator"),
        ],
    )?;
    coord.use_runbook(NOOP_RUNBOOK)?;
    coord.label_simulated(hosts)?;
    let sim = Simulator::start(&dir, &coord.url(), &pki, hosts)?;
    let f = Fleet {
        _tmp: tmp,
        dir,
        pki,
        coord,
        sim,
        admin,
        approver,
        operator,
    };
    f.wait_online(hosts);
    Ok(f)
}

impl Fleet {
    fn ctl(&self, who: &CertFiles, args: &[&str]) -> Result<Output> {
        rollbackctl(&self.coord.url(), &self.pki.ca(), who, args)
    }

    fn wait_online(&self, hosts: usize) {
        eventually("the simulated hosts are online", DEADLINE, || {
            let agents = agents_json(
                &self.coord.url(),
                &self.pki.ca(),
                &self.admin,
                Some("sim=yes"),
            )?;
            let online = agents
                .iter()
                .filter(|a| a["status"].as_str() == Some("online"))
                .count();
            ensure!(online == hosts, "{online} of {hosts} online");
            Ok(())
        });
    }

    const ROLLBACK: [&'static str; 14] = [
        "--output",
        "json",
        "rollback",
        "--procedure",
        "noop",
        "--select",
        "sim=yes",
        "--reason",
        "audit test",
        "--yes",
        "--canary",
        "0",
        "--batch-size",
        "100%",
    ];

    /// `rollbackctl audit --json ARGS` as the approver; the records, newest first.
    fn audit(&self, args: &[&str]) -> Result<(Vec<Value>, bool)> {
        let mut all = vec!["audit", "--json"];
        all.extend(args);
        let out = self.ctl(&self.approver, &all)?;
        ensure!(out.status.success(), "rollbackctl {all:?}: {}", text(&out));
        let doc: Value = serde_json::from_slice(&out.stdout).context("audit --json")?;
        let records = doc["records"].as_array().context("records")?.clone();
        Ok((records, doc["more"].as_bool().context("more")?))
    }

    /// `rollbackctl audit verify` as an operator.
    fn verify(&self) -> Result<Output> {
        self.ctl(&self.operator, &["audit", "verify"])
    }

    /// Verify must pass; returns how many records it checked.
    fn verify_ok(&self) -> Result<u64> {
        let out = self.ctl(&self.operator, &["audit", "verify", "--json"])?;
        ensure!(out.status.success(), "audit verify failed: {}", text(&out));
        let doc: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(doc["ok"] == true, "{doc}");
        doc["count"].as_u64().context("count")
    }

    /// Verify must fail with exit 1, saying `expected`.
    fn verify_names(&self, expected: &str) -> Result<()> {
        let out = self.verify()?;
        let said = text(&out);
        ensure!(
            out.status.code() == Some(1),
            "audit verify should exit 1 on a broken chain: {said}"
        );
        ensure!(
            said.contains(expected),
            "audit verify should say `{expected}`: {said}"
        );
        Ok(())
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A value as an SQL string literal.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

#[test]
fn audit_verify_passes_on_a_real_history_and_names_a_record_edited_or_removed_in_the_store()
-> Result<()> {
    let mut f = fleet(2)?;
    let out = f.ctl(&f.admin, &Fleet::ROLLBACK)?;
    ensure!(out.status.success(), "rollback: {}", text(&out));
    let job: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(job["state"] == "succeeded", "{job:#}");
    let job_id = str_of(&job, "job_id").to_string();
    let exec = f.ctl(
        &f.admin,
        &[
            "exec",
            "sim-00001",
            "postgres.backup",
            "--reason",
            "audit test exec",
        ],
    )?;
    ensure!(exec.status.success(), "exec: {}", text(&exec));

    // A real history: intact, and every record names who acted.
    assert_eq!(
        f.verify_ok()?,
        7,
        "the config's inventory loaded, started, 2 results, finished, exec, its result"
    );
    let out = f.verify()?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("audit chain intact: 7 record(s)"),
        "{}",
        text(&out)
    );
    let (all, more) = f.audit(&[])?;
    assert!(!more);
    assert_eq!(all.len(), 7);
    for r in &all {
        assert!(
            !str_of(r, "actor").trim().is_empty(),
            "record without an actor: {r}"
        );
        assert_eq!(str_of(r, "hash").len(), 64, "{r}");
    }
    let seqs: Vec<u64> = all.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, [7, 6, 5, 4, 3, 2, 1], "newest first, one chain");
    let find = |action: &str, actor: &str| {
        all.iter()
            .filter(|r| str_of(r, "action") == action && str_of(r, "actor") == actor)
            .count()
    };
    let alice = "spiffe://audit.test/operator/alice";
    assert_eq!(find("rollback.started", alice), 1, "{all:#?}");
    assert_eq!(find("exec", alice), 1);
    assert_eq!(
        find("run.finished", "agent/sim-00001"),
        2,
        "the job's run and the exec"
    );
    assert_eq!(find("run.finished", "agent/sim-00002"), 1);
    assert_eq!(find("rollback.finished", "coordinator"), 1);

    // Filters.
    let (of_job, _) = f.audit(&["--job", &job_id])?;
    let mut actions: Vec<&str> = of_job.iter().map(|r| str_of(r, "action")).collect();
    actions.sort_unstable();
    assert_eq!(
        actions,
        [
            "rollback.finished",
            "rollback.started",
            "run.finished",
            "run.finished"
        ],
        "the job's own records and its runs' results, not the exec"
    );
    assert!(of_job.iter().all(|r| str_of(r, "job_id") == job_id));
    let (by_alice, _) = f.audit(&["--actor", "alice"])?;
    assert_eq!(by_alice.len(), 2);
    assert!(by_alice.iter().all(|r| str_of(r, "actor") == alice));
    assert_eq!(
        f.audit(&["--actor", alice])?.0.len(),
        2,
        "the full identity"
    );
    assert_eq!(f.audit(&["--actor", "sim-00002"])?.0.len(), 1);
    assert_eq!(f.audit(&["--actor", "coordinator"])?.0.len(), 1);
    assert_eq!(f.audit(&["--since", "1h"])?.0.len(), 7);
    let later = (rollback_common::now_unix_ms() + 3_600_000).to_string();
    assert!(f.audit(&["--since", &later])?.0.is_empty());
    let (newest, more) = f.audit(&["--limit", "2"])?;
    assert!(more, "more records match than the limit");
    let seqs: Vec<u64> = newest.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, [7, 6]);
    let (combined, _) = f.audit(&["--job", &job_id, "--actor", "sim-00001"])?;
    assert_eq!(combined.len(), 1);

    // Reading the trail is for approvers; an operator may only verify it.
    let denied = f.ctl(&f.operator, &["audit"])?;
    assert_eq!(denied.status.code(), Some(4), "{}", text(&denied));

    let db = f.coord.database();
    let original = |seq: u64| -> Result<Value> {
        all.iter()
            .find(|r| r["seq"].as_u64() == Some(seq))
            .cloned()
            .context("record")
    };

    // One row edited under the running coordinator. The append-only trigger stops a plain
    // UPDATE; whoever can write the file can drop it.
    let err = db
        .exec("UPDATE audit_events SET detail = 'status=2' WHERE seq = 2")
        .expect_err("the schema refuses to change an audit record");
    assert!(format!("{err:#}").contains("append-only"), "{err:#}");
    db.drop_audit_trigger("audit_events_are_not_changed")?;
    db.exec("UPDATE audit_events SET detail = 'status=9 from_journal=false' WHERE seq = 3")?;
    f.verify_names("hash mismatch: record 3 was changed")?;
    db.exec(&format!(
        "UPDATE audit_events SET detail = {} WHERE seq = 3",
        quoted(str_of(&original(3)?, "detail"))
    ))?;
    assert_eq!(f.verify_ok()?, 7, "restored");

    // One row edited while the coordinator is stopped: a restart does not absorb it.
    f.coord.stop()?;
    db.exec("UPDATE audit_events SET actor = 'spiffe://audit.test/operator/abe' WHERE seq = 2")?;
    f.coord.restart()?;
    f.verify_names("hash mismatch: record 2 was changed")?;
    db.exec(&format!(
        "UPDATE audit_events SET actor = {} WHERE seq = 2",
        quoted(alice)
    ))?;
    assert_eq!(f.verify_ok()?, 7, "restored");

    // The newest row deleted under the running coordinator: it saw it committed.
    db.drop_audit_trigger("audit_events_are_not_removed")?;
    db.exec("DELETE FROM audit_events WHERE seq = 7")?;
    f.verify_names("record 7 is missing")?;
    // And one in the middle: the first gap is named.
    db.exec("DELETE FROM audit_events WHERE seq = 4")?;
    f.verify_names("record 4 is missing (seq gap: record 3 is followed by record 5)")?;
    Ok(())
}

#[test]
fn a_failed_audit_write_fails_the_operation_and_changes_nothing() -> Result<()> {
    let f = fleet(1)?;
    let url = f.coord.url();
    // A host to forget: an agent that connected once and is gone.
    let old = Agent::start(
        &f.dir,
        "old-1",
        &[],
        &url,
        &f.pki.ca(),
        &f.pki.agent("old-1")?,
    )?;
    let status_of = |host: &str| -> Result<String> {
        let agents = agents_json(&url, &f.pki.ca(), &f.admin, Some(&format!("host={host}")))?;
        Ok(agents
            .first()
            .map(|a| str_of(a, "status").to_string())
            .unwrap_or_default())
    };
    eventually("old-1 online", DEADLINE, || {
        let s = status_of("old-1")?;
        ensure!(s == "online", "{s}");
        Ok(())
    });
    drop(old);
    eventually("old-1 disconnected", DEADLINE, || {
        let s = status_of("old-1")?;
        ensure!(
            s == "disconnected",
            "{s}; the coordinator said:\n{}",
            f.coord.logs()
        );
        Ok(())
    });

    let db = f.coord.database();
    db.refuse_audit("refuse_audit", None, "audit table refuses writes (test)")?;

    // A rollback: refused with a clear error; no job, no lease.
    let out = f.ctl(&f.admin, &Fleet::ROLLBACK)?;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for expected in [
        "audit record `rollback.started`",
        "could not be written, so the change it records was not made",
        "audit table refuses writes (test)",
    ] {
        assert!(said.contains(expected), "`{expected}` in {said}");
    }
    let jobs = f.ctl(&f.admin, &["--output", "json", "jobs"])?;
    let jobs: Value = serde_json::from_slice(&jobs.stdout)?;
    assert_eq!(jobs, serde_json::json!([]), "no job was stored");
    assert_eq!(db.count("SELECT COUNT(*) FROM host_leases")?, 0);

    // An exec: refused before anything is sent; the host ran nothing.
    let out = f.ctl(
        &f.admin,
        &["exec", "sim-00001", "postgres.backup", "--reason", "test"],
    )?;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("audit record `exec`"), "{said}");
    assert_eq!(db.count("SELECT COUNT(*) FROM runs")?, 0, "no run");
    assert_eq!(f.sim.journaled_runs("sim-00001"), 0, "the host ran nothing");

    // Forgetting an agent: refused; the agent is still known.
    let out = f.ctl(&f.admin, &["agents", "forget", "old-1"])?;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("audit record `agent.forgotten`"), "{said}");
    assert_eq!(status_of("old-1")?, "disconnected", "still known");

    // The same operations work once the audit table takes writes, and the refused ones left
    // no trace in the trail.
    db.allow_audit("refuse_audit")?;
    let out = f.ctl(&f.admin, &Fleet::ROLLBACK)?;
    ensure!(out.status.success(), "rollback: {}", text(&out));
    let (records, _) = f.audit(&[])?;
    let actions: Vec<&str> = records.iter().map(|r| str_of(r, "action")).collect();
    assert_eq!(
        actions,
        [
            "rollback.finished",
            "run.finished",
            "rollback.started",
            "inventory.config_loaded"
        ]
    );
    assert_eq!(f.verify_ok()?, 4);
    Ok(())
}

#[test]
fn a_run_result_is_not_taken_without_its_audit_record() -> Result<()> {
    let f = fleet(1)?;
    let db = f.coord.database();
    db.refuse_audit(
        "refuse_results",
        Some("run.finished"),
        "run results refused (test)",
    )?;
    let mut rollback = rollbackctl_command(&f.coord.url(), &f.pki.ca(), &f.admin, &Fleet::ROLLBACK)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting rollbackctl rollback")?;

    // The result arrives and cannot be stored with its record: not acknowledged, the session
    // ends, the agent reconnects and sends it again from its journal — and again.
    let refusal = "could not store the run's result with its audit record";
    eventually("the result refused twice", DEADLINE, || {
        let n = f.coord.logs().matches(refusal).count();
        ensure!(n >= 2, "{n} refusal(s) so far");
        Ok(())
    });
    // Nobody took it: the store has no result and the job has not moved on.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM runs WHERE result IS NOT NULL")?,
        0
    );
    let jobs = f.ctl(&f.admin, &["--output", "json", "jobs"])?;
    let jobs: Value = serde_json::from_slice(&jobs.stdout)?;
    assert_eq!(jobs[0]["state"], "running", "{jobs:#}");
    assert_eq!(jobs[0]["hosts"][0]["outcome"], "pending", "{jobs:#}");

    // Once results can be recorded, the next delivery is taken, once, and the job ends.
    db.allow_audit("refuse_results")?;
    let status = eventually("the rollback finished", DEADLINE, || {
        match rollback.try_wait()? {
            Some(status) => Ok(status),
            None => bail!("still following the job"),
        }
    });
    let out = rollback.wait_with_output()?;
    ensure!(status.success(), "rollback: {}", text(&out));
    let job: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let (records, _) = f.audit(&["--job", str_of(&job, "job_id")])?;
    let results: Vec<&Value> = records
        .iter()
        .filter(|r| str_of(r, "action") == "run.finished")
        .collect();
    assert_eq!(results.len(), 1, "{records:#?}");
    assert_eq!(str_of(results[0], "actor"), "agent/sim-00001");
    f.verify_ok()?;
    Ok(())
}

#[test]
fn a_job_whose_end_cannot_be_audited_has_not_ended() -> Result<()> {
    let mut f = fleet(1)?;
    let db = f.coord.database();
    db.refuse_audit(
        "refuse_job_ends",
        Some("rollback.finished"),
        "job ends refused (test)",
    )?;
    // The host does its part; the job's end and its record cannot be stored together, so the
    // job is not ended: still running in the store, its host still leased.
    let out = f.ctl(&f.admin, &Fleet::ROLLBACK)?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        f.coord
            .logs()
            .contains("store failed recording the job's end with its audit record"),
        "{}",
        f.coord.logs()
    );
    let jobs = f.ctl(&f.admin, &["--output", "json", "jobs"])?;
    let jobs: Value = serde_json::from_slice(&jobs.stdout)?;
    assert_eq!(jobs[0]["state"], "running", "{jobs:#}");
    let job_id = str_of(&jobs[0], "job_id").to_string();
    assert_eq!(db.count("SELECT COUNT(*) FROM host_leases")?, 1);
    // A watch begun after this process gave the job up ends (the job is not ended), rather
    // than wait for an end nobody will write until the next start.
    output_within(
        rollbackctl_command(
            &f.coord.url(),
            &f.pki.ca(),
            &f.admin,
            &["--output", "json", "watch", &job_id],
        ),
        Duration::from_secs(30),
    )?;

    // Once the store takes it, the next start settles the job, on the record.
    db.allow_audit("refuse_job_ends")?;
    f.coord.restart()?;
    eventually("the job ended after the restart", DEADLINE, || {
        let jobs = f.ctl(&f.admin, &["--output", "json", "jobs"])?;
        let jobs: Value = serde_json::from_slice(&jobs.stdout)?;
        ensure!(jobs[0]["state"] == "succeeded", "{}", jobs[0]["state"]);
        Ok(())
    });
    assert_eq!(db.count("SELECT COUNT(*) FROM host_leases")?, 0);
    let (records, _) = f.audit(&["--job", &job_id])?;
    let actions: Vec<&str> = records.iter().map(|r| str_of(r, "action")).collect();
    assert_eq!(
        actions,
        [
            "rollback.finished",
            "rollback.resumed",
            "run.finished",
            "rollback.started"
        ]
    );
    f.verify_ok()?;
    Ok(())
}
