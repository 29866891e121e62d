//! Acceptance for two-person approval (#12), with the default policy, a real coordinator and
//! simulated agents (`rollback-agent --simulate`: whole agents whose validated steps succeed
//! without running — the one stand-in, since this suite has no PostgreSQL): a
//! `database-restore` waits for a second person; the requester cannot approve it, an operator
//! cannot, another approver can; a denied or expired one never runs a step (counted in the
//! agents' journals); a waiting job survives a coordinator restart; `job show`, `watch` and
//! the report say who approved and when.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rollback_tests::support::{
    CertFiles, Coordinator, Pki, Simulator, agents_json, eventually, journal_records, rollbackctl,
};
use serde_json::Value;

const K: usize = 3;
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs journaled by every simulated host so far.
fn journaled_runs(dir: &Path) -> usize {
    (1..=K)
        .map(|i| journal_records(&dir.join(format!("sim-state/sim-{i:05}/runs"))))
        .sum()
}

struct Ctl<'a> {
    url: String,
    ca: std::path::PathBuf,
    _dir: &'a Path,
}

impl Ctl<'_> {
    fn run(&self, who: &CertFiles, args: &[&str]) -> (bool, String, String) {
        let out = rollbackctl(&self.url, &self.ca, who, args).expect("rollbackctl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn job(&self, who: &CertFiles, id: &str) -> Value {
        let (ok, out, err) = self.run(who, &["--output", "json", "job", "show", id]);
        assert!(ok, "job show {id}: {err}");
        serde_json::from_str(&out).expect("job json")
    }

    /// `rollback --procedure database-restore` as `who`, returning at once when it waits for
    /// approval; the job id.
    fn request(&self, who: &CertFiles) -> String {
        let (ok, out, err) = self.run(
            who,
            &[
                "--output",
                "json",
                "rollback",
                "--procedure",
                "database-restore",
                "--backup",
                "app.dump",
                "--select",
                "role=web",
                "--reason",
                "bad migration",
                "--yes",
                "--no-wait-approval",
            ],
        );
        assert!(ok, "the request is accepted: {err}");
        let job: Value = serde_json::from_str(&out).expect("job json");
        assert_eq!(job["state"], "awaiting_approval", "{job:#}");
        assert_eq!(job["approval"]["decision"], "", "{job:#}");
        job["job_id"].as_str().expect("job id").to_string()
    }
}

fn no_runs(job: &Value) -> bool {
    job["hosts"].as_array().is_some_and(|hs| {
        hs.iter()
            .all(|h| h["runs"].as_array().is_none_or(Vec::is_empty))
    })
}

#[test]
fn a_database_restore_waits_for_a_second_approver_and_a_denied_or_expired_one_never_runs()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("pki"), "approval.test")?;
    let abe = pki.operator("abe")?;
    let april = pki.operator("april")?;
    let otto = pki.operator("otto")?;
    let coord_dir = dir.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let mut coord = Coordinator::start(
        &coord_dir,
        &pki,
        &[
            ("abe", "approver"),
            ("april", "approver"),
            ("otto", "operator"),
        ],
    )?;
    coord.append_config(
        "[inventory.\"sim-00001\"]\nrole = \"db\"\n\
         [inventory.\"sim-00002\"]\nrole = \"web\"\n\
         [inventory.\"sim-00003\"]\nrole = \"web\"\n",
    )?;
    let ctl = Ctl {
        url: coord.url(),
        ca: pki.ca(),
        _dir: dir,
    };
    let _sim = Simulator::start(dir, &ctl.url, &pki, K)?;
    let all_online = || {
        eventually("simulated agents online", DEADLINE, || {
            let agents = agents_json(&ctl.url, &pki.ca(), &otto, None)?;
            let online = agents.iter().filter(|a| a["status"] == "online").count();
            anyhow::ensure!(online == K, "{online} of {K} online");
            Ok(())
        })
    };
    all_online();

    // The backup the restore names exists in the simulated hosts' backup dir.
    std::fs::write(dir.join("sim-state/app.dump"), b"PGDMP")?;

    // The default policy holds a database-restore: stored, leased, nothing dispatched.
    let j1 = ctl.request(&abe);
    let runs_at_request = journaled_runs(dir);
    let job = ctl.job(&otto, &j1);
    assert_eq!(
        job["approval"]["rule"], "procedure database-restore",
        "{job:#}"
    );
    assert!(
        no_runs(&job),
        "nothing of a waiting job is dispatched: {job:#}"
    );
    // Its hosts are leased: another job cannot change them meanwhile.
    let (ok, _, err) = ctl.run(
        &otto,
        &[
            "rollback",
            "--procedure",
            "configuration",
            "--select",
            "role=web",
            "--reason",
            "x",
            "--yes",
        ],
    );
    assert!(
        !ok && err.contains(&j1),
        "hosts of a waiting job are leased: {err}"
    );

    // The requester cannot approve their own job, an operator cannot approve at all.
    let (ok, _, err) = ctl.run(&abe, &["approve", &j1, "--reason", "looks fine to me"]);
    assert!(!ok && err.contains("cannot approve"), "{err}");
    let (ok, _, err) = ctl.run(&otto, &["approve", &j1, "--reason", "sure"]);
    assert!(!ok && err.contains("approver"), "{err}");
    assert_eq!(ctl.job(&otto, &j1)["state"], "awaiting_approval");

    // Denied: it ends, nothing ran, its hosts are free, and it cannot be resumed into running.
    let (ok, _, err) = ctl.run(&april, &["deny", &j1, "--reason", "restore the other dump"]);
    assert!(ok, "{err}");
    let job = ctl.job(&otto, &j1);
    assert_eq!(job["state"], "denied", "{job:#}");
    assert_eq!(
        job["approval"]["decided_by"],
        "spiffe://approval.test/operator/april"
    );
    assert!(no_runs(&job), "{job:#}");
    let (ok, _, err) = ctl.run(&april, &["approve", &j1, "--reason", "changed my mind"]);
    assert!(!ok && err.contains("already denied"), "{err}");
    let (ok, _, err) = ctl.run(&abe, &["job", "resume", &j1, "--reason", "try anyway"]);
    assert!(!ok, "a denied job cannot be resumed: {err}");
    assert_eq!(
        journaled_runs(dir),
        runs_at_request,
        "a denied job never ran a step"
    );

    // A waiting job survives a coordinator restart; `rollbackctl rollback` waits for the
    // decision; another approver's approval starts it exactly as planned.
    let j2 = ctl.request(&abe);
    coord.restart()?;
    all_online();
    assert_eq!(ctl.job(&otto, &j2)["state"], "awaiting_approval");
    let watch = Watch::start(&ctl.url, &pki, &abe, &j2)?;
    let (ok, _, err) = ctl.run(
        &april,
        &["approve", &j2, "--reason", "dump verified by DBA"],
    );
    assert!(ok, "{err}");
    let watched = watch.finish()?;
    let text = String::from_utf8_lossy(&watched.stdout);
    assert!(
        text.contains("awaiting approval")
            && text.contains(
                "approved by spiffe://approval.test/operator/april: dump verified by DBA"
            )
            && text.contains("job started"),
        "{text}"
    );
    let job = eventually("the approved job ends", DEADLINE, || {
        let job = ctl.job(&otto, &j2);
        anyhow::ensure!(job["state"] != "running", "still running");
        Ok(job)
    });
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["approval"]["decision"], "approved");
    assert!(
        journaled_runs(dir) > runs_at_request,
        "the approved job ran"
    );
    let (ok, report, _) = ctl.run(&otto, &["report", &j2]);
    assert!(ok);
    assert!(
        report.contains("| Approval | required (procedure database-restore); **approved** by `spiffe://approval.test/operator/april`"),
        "{report}"
    );

    // Expired: nobody approved in time; it never runs.
    coord.append_config("[approval]\nexpire_after_secs = 1\n")?;
    all_online();
    let runs_before = journaled_runs(dir);
    let j3 = ctl.request(&abe);
    let runs_at_request = journaled_runs(dir);
    assert!(runs_at_request >= runs_before);
    let job = eventually("the approval expires", DEADLINE, || {
        let job = ctl.job(&otto, &j3);
        anyhow::ensure!(job["state"] == "expired", "state {}", job["state"]);
        Ok(job)
    });
    assert!(no_runs(&job), "{job:#}");
    let (ok, _, err) = ctl.run(&april, &["approve", &j3, "--reason", "late"]);
    assert!(!ok && err.contains("expired"), "{err}");
    assert_eq!(
        journaled_runs(dir),
        runs_at_request,
        "an expired job never ran a step"
    );
    Ok(())
}

/// Limits (#12): one operator's watches are bounded (`max_watchers_per_operator`); the next is
/// refused with a clear error while another operator still watches, and a watcher that goes
/// away frees its slot at once (a job waiting for approval sends no event to notice it by).
#[test]
fn watches_per_operator_are_bounded_and_a_closed_watch_frees_its_slot() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("pki"), "approval.test")?;
    let abe = pki.operator("abe")?;
    let otto = pki.operator("otto")?;
    let coord_dir = dir.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let mut coord = Coordinator::start(
        &coord_dir,
        &pki,
        &[("abe", "approver"), ("otto", "operator")],
    )?;
    // A top-level key goes before the config's tables; the inventory after them.
    let config = std::fs::read_to_string(&coord.config)?;
    std::fs::write(
        &coord.config,
        format!("max_watchers_per_operator = 2\n{config}"),
    )?;
    coord.append_config(
        "[inventory.\"sim-00001\"]\nrole = \"db\"\n\
         [inventory.\"sim-00002\"]\nrole = \"web\"\n[inventory.\"sim-00003\"]\nrole = \"web\"\n",
    )?;
    let ctl = Ctl {
        url: coord.url(),
        ca: pki.ca(),
        _dir: dir,
    };
    let _sim = Simulator::start(dir, &ctl.url, &pki, K)?;
    eventually("simulated agents online", DEADLINE, || {
        let agents = agents_json(&ctl.url, &pki.ca(), &otto, None)?;
        let online = agents.iter().filter(|a| a["status"] == "online").count();
        anyhow::ensure!(online == K, "{online} of {K} online");
        Ok(())
    });
    std::fs::write(dir.join("sim-state/app.dump"), b"PGDMP")?;
    // A job that waits for approval: its watches stay open with nothing to send.
    let job = ctl.request(&abe);
    let watch =
        |who: &CertFiles| Watch::start(&ctl.url, &pki, who, &job).expect("rollbackctl watch");
    let mut held = vec![
        watch(&otto).served().expect("first watch"),
        watch(&otto).served().expect("second watch"),
    ];
    // The third of the same operator is refused while the two hold their slots.
    let third = watch(&otto).finish()?;
    let refused = String::from_utf8_lossy(&third.stderr);
    assert!(!third.status.success(), "a third watch was served");
    assert!(refused.contains("max_watchers_per_operator"), "{refused}");
    // Another operator is not affected.
    let other = watch(&abe).served().expect("another operator's watch");
    // One watcher goes away: its slot is free without any event of the job.
    drop(held.remove(0));
    let again = eventually("a freed slot is served", DEADLINE, || watch(&otto).served());
    // Deciding the job ends every watch.
    let (ok, _, err) = ctl.run(&abe, &["deny", &job, "--reason", "test over"]);
    assert!(ok, "{err}");
    for w in held.into_iter().chain([other, again]) {
        let out = w.finish()?;
        assert!(!out.status.success(), "a denied job's watch exits non-zero");
    }
    Ok(())
}

/// A `rollbackctl watch` process, killed and reaped when dropped.
struct Watch(Option<std::process::Child>);

impl Watch {
    /// `rollbackctl watch JOB` as `who`, its output piped.
    fn start(url: &str, pki: &Pki, who: &CertFiles, job: &str) -> Result<Self> {
        let child =
            rollback_tests::support::rollbackctl_command(url, &pki.ca(), who, &["watch", job])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("rollbackctl watch")?;
        Ok(Self(Some(child)))
    }

    /// Waits until the watch is served (it prints the job's replayed events at once), then
    /// keeps draining its output so it never blocks; an error with its stderr if refused.
    fn served(mut self) -> Result<Self> {
        use std::io::BufRead;
        let child = self.0.as_mut().context("a running watch")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            let out = self.finish()?;
            anyhow::bail!("refused: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Ok(self)
    }

    /// Waits for it to end on its own.
    fn finish(mut self) -> Result<std::process::Output> {
        let child = self.0.take().context("a running watch")?;
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
