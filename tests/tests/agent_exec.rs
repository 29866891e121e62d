//! Acceptance for the agent's typed actions on loopback, with real git repositories, the real
//! agent, coordinator and `rollbackctl exec`: refusal of hostile parameters before anything
//! runs, timeouts that kill a whole process group, crash recovery through the journal,
//! bounded memory under huge output, and failures explained in operator terms.
//! (Actions that need systemd, PostgreSQL and alembic are covered in the fleet lab suite.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rollback_tests::support::{
    Agent, CertFiles, Coordinator, Pki, agents_json, eventually, exec_json, is_root, peak_rss_kib,
    pids_in_group, rollbackctl,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

struct Host {
    tmp: tempfile::TempDir,
    pki: Pki,
    coordinator: Coordinator,
    op: CertFiles,
    agent: Option<Agent>,
    repo: PathBuf,
    backups: PathBuf,
    /// What the profile's `app.git` points at.
    git: PathBuf,
    /// What the profile's `postgres.pg_restore` points at (the real one until a test swaps
    /// in a stand-in).
    pg_restore: PathBuf,
}

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@rollback.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A repository with three releases, an env file and its backup, and a backup dir.
fn host() -> Host {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let repo = dir.join("app");
    std::fs::create_dir(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    for v in 1..=3 {
        std::fs::write(repo.join("VERSION"), format!("v{v}\n")).expect("write");
        git(&repo, &["add", "VERSION"]);
        git(&repo, &["commit", "-q", "-m", &format!("release v{v}")]);
    }
    std::fs::write(repo.join(".env.backup"), "GOOD=1\n").expect("write");
    std::fs::write(repo.join(".env"), "GOOD=0\n").expect("write");
    let backups = dir.join("backups");
    std::fs::create_dir(&backups).expect("mkdir");
    // The host's git: /usr/bin/git until a test wraps it (`slow_checkout`).
    let git_bin = dir.join("git");
    std::os::unix::fs::symlink("/usr/bin/git", &git_bin).expect("symlink git");
    // A stand-in for alembic (test double: there is no database on loopback); it says which
    // user ran it.
    let alembic = dir.join("alembic");
    std::fs::write(
        &alembic,
        "#!/bin/sh\necho \"stand-in alembic run by uid $(id -u)\"\necho '0002 (head)'\n",
    )
    .expect("alembic stand-in");
    set_mode(&alembic, 0o755);
    let pg_restore = dir.join("pg_restore");
    std::os::unix::fs::symlink("/usr/lib/postgresql/15/bin/pg_restore", &pg_restore)
        .expect("symlink pg_restore");
    std::fs::write(
        backups.join("backup_20260101_000000.dump"),
        b"not really a dump",
    )
    .expect("write");
    std::os::unix::fs::symlink("/etc/passwd", backups.join("escape.dump")).expect("symlink");

    let pki = Pki::init(&dir.join("pki"), "fleet.test").expect("pki");
    let op = pki.operator("olga").expect("operator");
    // Approver: the tests run mutating actions by hand.
    let coordinator = Coordinator::start(dir, &pki, &[("olga", "approver")]).expect("coordinator");
    let mut h = Host {
        tmp,
        pki,
        coordinator,
        op,
        agent: None,
        repo,
        backups,
        git: git_bin,
        pg_restore,
    };
    h.start_agent();
    h
}

impl Host {
    fn start_agent(&mut self) {
        let certs = self.pki.agent("web-1").unwrap_or_else(|_| CertFiles {
            cert: self.pki.dir.join("agent/web-1.pem"),
            key: self.pki.dir.join("agent/web-1.key"),
        });
        let profile = format!(
            "[app]\ndir = \"{repo}\"\ngit = \"{git}\"\nenv_file = \"{repo}/.env\"\nenv_backup = \"{repo}/.env.backup\"\n\
             [postgres]\npg_restore = \"{pg_restore}\"\nhost = \"127.0.0.1\"\nuser = \"postgres\"\ndatabase = \"app\"\nbackup_dir = \"{backups}\"\n\
             [alembic]\nbinary = \"{alembic}\"\nworkdir = \"{repo}\"\n\
             [timeouts]\nkill_grace_secs = 1\n",
            repo = self.repo.display(),
            git = self.git.display(),
            pg_restore = self.pg_restore.display(),
            alembic = self.tmp.path().join("alembic").display(),
            backups = self.backups.display()
        );
        let agent = Agent::start_with_profile(
            self.tmp.path(),
            "web-1",
            &[("role", "web")],
            &self.coordinator.url(),
            &self.pki.ca(),
            &certs,
            &profile,
        )
        .expect("agent starts");
        self.agent = Some(agent);
        eventually("web-1 online", DEADLINE, || {
            let agents = agents_json(&self.coordinator.url(), &self.pki.ca(), &self.op, None)?;
            agents
                .iter()
                .any(|a| a["host_id"] == "web-1" && a["status"] == "online")
                .then_some(())
                .ok_or_else(|| anyhow::anyhow!("not online"))
        });
    }

    fn exec(&self, action: &str, params: &[&str], extra: &[&str]) -> (bool, Value, String) {
        exec_json(
            &self.coordinator.url(),
            &self.pki.ca(),
            &self.op,
            "web-1",
            action,
            params,
            extra,
        )
        .expect("rollbackctl exec")
    }

    fn head(&self) -> String {
        git(&self.repo, &["rev-parse", "HEAD"])
    }

    fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| a.proc.log_text())
            .unwrap_or_default()
    }

    fn journal(&self, run_id: &str) -> Value {
        let path = self
            .tmp
            .path()
            .join("agent-web-1/state/runs")
            .join(format!("{run_id}.json"));
        serde_json::from_slice(&std::fs::read(&path).expect("journal file")).expect("journal json")
    }

    /// Whether the coordinator's acknowledgement of the run is journaled: the `RUN.acked`
    /// marker beside the record (the record is not rewritten for it).
    fn acked(&self, run_id: &str) -> bool {
        self.tmp
            .path()
            .join("agent-web-1/state/runs")
            .join(format!("{run_id}.acked"))
            .is_file()
    }
}

/// Makes the host's git (`app.git` in the profile) run `body` before every `git checkout`: a
/// slow, stubborn or counted step for the process-group and journal tests. (Repository hooks
/// cannot serve: the agent runs git with hooks off.) Written to a temporary file and renamed,
/// so a git invocation never sees it half-written.
fn slow_checkout(h: &Host, body: &str) {
    wrap_git(
        h,
        &format!("case \" $* \" in *\" checkout \"*)\n{body}\n;;\nesac"),
    );
}

/// Makes the host's git run `body` (bash) before every invocation, then the real git.
fn wrap_git(h: &Host, body: &str) {
    let tmp = h.git.with_extension("new");
    std::fs::write(
        &tmp,
        format!("#!/bin/bash\n{body}\nexec /usr/bin/git \"$@\"\n"),
    )
    .expect("write git wrapper");
    let mut perm = std::fs::metadata(&tmp).expect("wrapper").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&tmp, perm).expect("chmod");
    std::fs::rename(&tmp, &h.git).expect("install git wrapper");
}

#[test]
fn git_checkout_moves_head_and_file_restore_is_byte_identical() {
    let h = host();
    let previous = git(&h.repo, &["rev-parse", "HEAD~1"]);
    let (ok, doc, stderr) = h.exec("git.checkout", &["revision=HEAD~1"], &[]);
    assert!(ok, "{doc} {stderr}");
    assert_eq!(h.head(), previous, "HEAD moved to the previous commit");
    assert_eq!(doc["facts"]["sha"], previous);
    assert_eq!(doc["status"], "succeeded");

    let (ok, doc, _) = h.exec("file.restore", &["file=env"], &[]);
    assert!(ok, "{doc}");
    assert_eq!(
        std::fs::read(h.repo.join(".env")).expect("env"),
        std::fs::read(h.repo.join(".env.backup")).expect("backup")
    );
}

#[test]
fn hostile_parameters_are_refused_before_anything_runs() {
    let h = host();
    let canary = h.tmp.path().join("pwned");
    let head = h.head();
    let upload_pack = format!("revision=--upload-pack=touch {}", canary.display());
    let hex300 = format!("revision={}", "a".repeat(300));
    for param in [
        upload_pack.as_str(),
        "revision=-h",
        "revision=HEAD;id",
        "revision=$(id)",
        hex300.as_str(),
    ] {
        let (ok, doc, _) = h.exec("git.checkout", &[param], &[]);
        assert!(!ok, "{param} must fail");
        assert_eq!(doc["status"], "refused", "{param}: {doc}");
        let error = doc["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("web-1") && error.contains("git.checkout") && error.contains("revision"),
            "{param}: {error}"
        );
        assert!(
            doc["output"].as_str().unwrap_or_default().is_empty(),
            "nothing ran for {param}: {doc}"
        );
    }
    for backup in [
        "backup=../../etc/passwd",
        "backup=/etc/passwd",
        "backup=escape.dump",
    ] {
        let (ok, doc, _) = h.exec("postgres.restore", &[backup], &[]);
        assert!(!ok);
        assert_eq!(doc["status"], "refused", "{backup}: {doc}");
        let error = doc["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("postgres.restore") && error.contains("backup"),
            "{backup}: {error}"
        );
    }
    // Unknown actions and parameters are refused too.
    let (_, doc, _) = h.exec("shell.run", &["cmd=id"], &[]);
    assert_eq!(doc["status"], "refused");
    let (_, doc, _) = h.exec("git.log", &["count=5", "format=%H"], &[]);
    assert_eq!(doc["status"], "refused");
    assert!(
        doc["error"].as_str().unwrap_or_default().contains("format"),
        "{doc}"
    );

    assert!(!canary.exists(), "the canary file must never be created");
    assert_eq!(h.head(), head, "HEAD never moved");
    // Every refusal is in the agent log, and none of them spawned git.
    assert!(
        !h.agent_log().contains("upload-pack=touch"),
        "the hostile value never reached a command line"
    );
}

#[test]
fn timed_out_step_has_its_whole_process_group_killed() {
    let h = host();
    let pgid_file = h.tmp.path().join("hook.pgid");
    // A hook that ignores SIGTERM and leaves a grandchild that ignores it too.
    slow_checkout(
        &h,
        &format!(
            "trap '' TERM\nps -o pgid= -p $$ | tr -d ' ' > {pgid}\n( trap '' TERM; sleep 300 ) &\nsleep 300",
            pgid = pgid_file.display()
        ),
    );
    let started = Instant::now();
    let (ok, doc, _) = h.exec("git.checkout", &["revision=HEAD~1"], &["--timeout", "2"]);
    assert!(!ok);
    assert_eq!(doc["status"], "timed_out", "{doc}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stopped at its timeout, not after the hook's 300 s"
    );
    let pgid: i32 = std::fs::read_to_string(&pgid_file)
        .expect("hook ran")
        .trim()
        .parse()
        .expect("pgid");
    eventually(
        "no process of the step's group remains",
        Duration::from_secs(5),
        || {
            let left = pids_in_group(pgid);
            left.is_empty()
                .then_some(())
                .ok_or_else(|| anyhow::anyhow!("still alive: {left:?}"))
        },
    );
}

#[test]
fn agent_killed_mid_step_reports_interrupted_and_never_runs_it_again() {
    let mut h = host();
    let counter = h.tmp.path().join("hook.count");
    // The step leaves a daemon of its own (in a new session) before it is cut off.
    slow_checkout(
        &h,
        &format!(
            "echo run >> {}\nsetsid -f sleep 3109 >/dev/null 2>&1\nsleep 3110",
            counter.display()
        ),
    );

    let mut exec = Command::new(rollback_tests::support::bin("rollbackctl"));
    exec.args(["--coordinator", &h.coordinator.url()])
        .arg("--ca")
        .arg(h.pki.ca())
        .arg("--cert")
        .arg(&h.op.cert)
        .arg("--key")
        .arg(&h.op.key)
        .args([
            "exec",
            "web-1",
            "git.checkout",
            "revision=HEAD~1",
            "--reason",
            "test",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let exec = exec.spawn().expect("rollbackctl exec starts");
    eventually("the step is running", DEADLINE, || {
        std::fs::read_to_string(&counter)
            .ok()
            .filter(|c| c.lines().count() == 1)
            .ok_or_else(|| anyhow::anyhow!("hook not started"))
    });
    eventually("the step's daemon started", DEADLINE, || {
        (!pids_running("sleep 3109").is_empty())
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("not yet"))
    });
    // SIGKILL the agent mid-step: its step's processes are orphaned, as in a real crash.
    h.agent.take().expect("agent").crash();
    let out = exec.wait_with_output().expect("rollbackctl ends");
    assert!(
        !out.status.success(),
        "the watcher learns the agent went away"
    );

    let runs_dir = h.tmp.path().join("agent-web-1/state/runs");
    let run_id = std::fs::read_dir(&runs_dir)
        .expect("journal dir")
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(String::from)
        })
        .next()
        .expect("the run is in the journal");

    assert!(
        !pids_running("sleep 3110").is_empty(),
        "the crash left the step running (the agent is gone, not the step)"
    );
    h.start_agent();
    // The restarted agent kills what the crashed run left, daemon included.
    eventually("the crashed step's processes are gone", DEADLINE, || {
        let left = [pids_running("sleep 3109"), pids_running("sleep 3110")].concat();
        left.is_empty()
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("still running: {left:?}"))
    });
    assert!(
        h.agent_log()
            .contains("a step of a crashed agent left processes"),
        "the agent says what it killed:\n{}",
        h.agent_log()
    );
    let record = eventually(
        "the coordinator acknowledged the interrupted result",
        DEADLINE,
        || {
            h.acked(&run_id)
                .then(|| h.journal(&run_id))
                .ok_or_else(|| anyhow::anyhow!("not acked yet"))
        },
    );
    assert_eq!(
        record["steps"][0]["status"], 5,
        "step status is interrupted: {record}"
    );
    assert!(
        record["steps"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not run again"),
        "{record}"
    );
    // The coordinator re-sent the run on reconnect (at-least-once); the journal answered it.
    eventually(
        "redelivered run answered from the journal",
        DEADLINE,
        || {
            h.agent_log()
                .contains("returning its journaled result")
                .then_some(())
                .ok_or_else(|| anyhow::anyhow!("no redelivery yet"))
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let runs = std::fs::read_to_string(&counter).expect("counter");
    assert_eq!(runs.lines().count(), 1, "the step ran exactly once");
}

#[test]
fn fifty_megabytes_of_output_stay_bounded() {
    let h = host();
    // A commit whose subject line is 50 MB: `git log --oneline` prints all of it.
    let message = h.tmp.path().join("huge-message");
    std::fs::write(&message, "x".repeat(50 * 1024 * 1024)).expect("write");
    git(
        &h.repo,
        &[
            "commit",
            "-q",
            "--allow-empty",
            "-F",
            &message.display().to_string(),
        ],
    );
    std::fs::remove_file(&message).expect("rm");

    let (ok, doc, stderr) = h.exec("git.log", &["count=1"], &[]);
    assert!(ok, "{stderr}");
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(doc["output_truncated"], true);
    let output = doc["output"].as_str().unwrap_or_default();
    assert!(
        output.contains(rollback_common::output_cap::TRUNCATION_MARKER),
        "the stored output carries the marker"
    );
    assert!(
        output.len() < 256 * 1024,
        "stored output is capped ({} bytes)",
        output.len()
    );
    let pid = h
        .agent
        .as_ref()
        .and_then(|a| a.proc.pid())
        .expect("agent pid");
    let peak = peak_rss_kib(pid).expect("rss");
    assert!(
        peak < 64 * 1024,
        "agent peak RSS {peak} KiB stays under 64 MiB"
    );
}

#[test]
fn git_failures_are_explained() {
    let h = host();
    std::fs::write(h.repo.join("VERSION"), "hotfix made by hand\n").expect("write");
    let (ok, doc, _) = h.exec("git.checkout", &["revision=HEAD~1"], &[]);
    assert!(!ok);
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("uncommitted changes") && error.contains("VERSION"),
        "{error}"
    );
    git(&h.repo, &["checkout", "--", "VERSION"]);

    let (ok, doc, _) = h.exec("git.checkout", &["revision=no-such-branch"], &[]);
    assert!(!ok);
    assert!(
        doc["error"]
            .as_str()
            .unwrap_or_default()
            .contains("is not a commit"),
        "{doc}"
    );
}

/// A repository its (unprivileged) owner has armed: a post-checkout hook and an fsmonitor
/// command that would write a file as root. The agent runs git as the repository's owner
/// with hooks and fsmonitor off: neither runs, and checked-out files stay the owner's.
#[test]
fn a_hostile_repository_runs_nothing_as_root() {
    if !is_root() {
        eprintln!("skipping: it needs root to give the repository to another user");
        return;
    }
    let h = host();
    let armed = h.tmp.path().join("armed");
    std::fs::create_dir(&armed).expect("mkdir");
    let hook = h.repo.join(".git/hooks/post-checkout");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\nid -u > {}/hook\n", armed.display()),
    )
    .expect("hook");
    let monitor = h.tmp.path().join("fsmonitor.sh");
    std::fs::write(
        &monitor,
        format!("#!/bin/sh\nid -u > {}/fsmonitor\n", armed.display()),
    )
    .expect("fsmonitor");
    for f in [&hook, &monitor] {
        set_mode(f, 0o755);
    }
    git(
        &h.repo,
        &["config", "core.fsmonitor", &monitor.display().to_string()],
    );
    let previous = git(&h.repo, &["rev-parse", "HEAD~1"]);
    // The owner can reach its repository and the alembic stand-in (the test's temporary dir
    // is root's 0700).
    set_mode(h.tmp.path(), 0o755);
    for (path, recursive) in [(&h.repo, true), (&armed, false)] {
        let mut chown = Command::new("chown");
        if recursive {
            chown.arg("-R");
        }
        assert!(
            chown
                .arg("nobody")
                .arg(path)
                .status()
                .expect("chown")
                .success()
        );
    }
    let nobody = uid_of("nobody");

    let (ok, doc, stderr) = h.exec("git.checkout", &["revision=HEAD~1"], &[]);
    assert!(ok, "checked out as the repository's owner: {doc} {stderr}");
    // The test reads as root, which git refuses in another user's repository unless told.
    assert_eq!(
        git(&h.repo, &["-c", "safe.directory=*", "rev-parse", "HEAD"]),
        previous
    );
    assert!(
        doc["output"]
            .as_str()
            .is_some_and(|o| o.contains(&format!("(as uid {nobody}"))),
        "the step says whom git ran as: {doc}"
    );
    assert!(
        !armed.join("hook").exists() && !armed.join("fsmonitor").exists(),
        "neither the hook nor the fsmonitor command ran: {:?}",
        std::fs::read_dir(&armed).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    use std::os::unix::fs::MetadataExt;
    let version = std::fs::metadata(h.repo.join("VERSION")).expect("VERSION");
    assert_eq!(
        version.uid(),
        nobody,
        "the checked-out file is the owner's, not root's"
    );
    // alembic runs the workdir's Python (env.py, migrations): as the workdir's owner too.
    let (ok, doc, stderr) = h.exec("alembic.current", &[], &[]);
    assert!(ok, "{doc} {stderr}");
    assert!(
        doc["output"]
            .as_str()
            .is_some_and(|o| o.contains(&format!("stand-in alembic run by uid {nobody}"))),
        "alembic ran as the workdir's owner: {doc}"
    );
}

#[test]
fn a_run_left_by_an_earlier_coordinator_is_never_started_late() {
    let mut h = host();
    let counter = h.tmp.path().join("hook.count");
    slow_checkout(&h, &format!("echo run >> {}", counter.display()));
    // A run an earlier coordinator process stored but never delivered (it crashed between
    // persisting and sending): written into the store while the coordinator is down.
    assert!(h.coordinator.stop().expect("stops"));
    use prost::Message;
    let stale = rollback_common::proto::RunProcedure {
        run_id: "stale0001".into(),
        steps: vec![rollback_common::proto::Step {
            action: "git.checkout".into(),
            params: [("revision".to_string(), "HEAD~1".to_string())]
                .into_iter()
                .collect(),
            timeout_secs: 0,
        }],
        ..Default::default()
    };
    let hex: String = stale
        .encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let db = h.coordinator.database();
    db.exec(&format!(
        "INSERT INTO runs (run_id, job_id, host_id, requested_by, reason, procedure, status, created_at_ms, phase)
         VALUES ('stale0001', '', 'web-1', 'test', 'stale', {}, 0, 0, '')",
        db.blob(&hex)
    ))
    .expect("stale run inserted");
    let head = h.head();
    h.coordinator.restart().expect("restarts");
    eventually("web-1 back online", DEADLINE, || {
        let agents = agents_json(&h.coordinator.url(), &h.pki.ca(), &h.op, None)?;
        agents
            .iter()
            .any(|a| a["host_id"] == "web-1" && a["status"] == "online")
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("offline"))
    });
    // A fresh exec proves the session carries runs; the stale one must not have been sent.
    let (ok, _, stderr) = h.exec("git.log", &["count=1"], &[]);
    assert!(ok, "{stderr}");
    assert!(!counter.exists(), "the stale git.checkout never ran");
    assert_eq!(h.head(), head, "HEAD never moved");
    assert!(
        !h.agent_log().contains("stale0001"),
        "the stale run never reached the agent"
    );
}

#[test]
fn steps_are_idempotent_and_git_resolve_only_reads() {
    let h = host();
    let head = h.head();
    let subject = git(&h.repo, &["log", "-1", "--format=%s"]);
    let previous = git(&h.repo, &["rev-parse", "HEAD~1"]);
    let counter = h.tmp.path().join("hook.count");
    slow_checkout(&h, &format!("echo run >> {}", counter.display()));

    // git.resolve: read-only, full shas of the revision and of HEAD.
    let (ok, doc, stderr) = h.exec("git.resolve", &["revision=HEAD~1"], &[]);
    assert!(ok, "{doc} {stderr}");
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(doc["facts"]["sha"], previous.as_str(), "{doc}");
    assert_eq!(doc["facts"]["head"], head.as_str(), "{doc}");
    assert_eq!(doc["facts"]["head_subject"], subject.as_str(), "{doc}");
    assert_eq!(h.head(), head, "git.resolve moved nothing");
    let (ok, doc, _) = h.exec("git.resolve", &["revision=--upload-pack=x"], &[]);
    assert!(!ok);
    assert_eq!(doc["status"], "refused", "{doc}");

    // git.checkout of the commit HEAD already is: succeeds, runs no checkout.
    let (ok, doc, stderr) = h.exec("git.checkout", &[&format!("revision={head}")], &[]);
    assert!(ok, "{doc} {stderr}");
    assert_eq!(doc["facts"]["changed"], "false", "{doc}");
    assert_eq!(doc["facts"]["sha"], head.as_str());
    assert_eq!(doc["facts"]["from_sha"], head.as_str());
    assert_eq!(doc["facts"]["subject"], subject.as_str());
    assert!(
        doc["output"]
            .as_str()
            .unwrap_or_default()
            .contains("nothing to check out"),
        "{doc}"
    );
    assert!(!counter.exists(), "no checkout ran (the hook never fired)");

    // A real move reports where it came from.
    let (ok, doc, _) = h.exec("git.checkout", &["revision=HEAD~1"], &[]);
    assert!(ok, "{doc}");
    assert_eq!(doc["facts"]["changed"], "true", "{doc}");
    assert_eq!(doc["facts"]["from_sha"], head.as_str());
    assert_eq!(doc["facts"]["sha"], previous.as_str());
    assert!(counter.exists(), "the checkout ran");

    // file.restore: the first restores, the second finds nothing to do and rewrites nothing.
    let (ok, doc, _) = h.exec("file.restore", &["file=env"], &[]);
    assert!(ok, "{doc}");
    assert_eq!(doc["facts"]["changed"], "true", "{doc}");
    let env = h.repo.join(".env");
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&env).expect("env"));
    let (ok, doc, _) = h.exec("file.restore", &["file=env"], &[]);
    assert!(ok, "{doc}");
    assert_eq!(doc["facts"]["changed"], "false", "{doc}");
    assert!(
        doc["output"]
            .as_str()
            .unwrap_or_default()
            .contains("nothing to restore"),
        "{doc}"
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&env).expect("env")),
        inode,
        "the identical env file was not rewritten"
    );
}

/// Pids whose command line (arguments joined by spaces) is exactly `cmdline`.
#[test]
fn a_checkout_runs_two_git_processes_and_resolves_only_a_commit() {
    let h = host();
    let head = h.head();
    let previous = git(&h.repo, &["rev-parse", "HEAD~1"]);
    let calls = h.tmp.path().join("git.calls");
    wrap_git(&h, &format!("printf '%s\\n' \"$*\" >> {}", calls.display()));
    // Every git the agent started since the last call: its subcommand and first argument.
    let taken = || {
        let text = std::fs::read_to_string(&calls).unwrap_or_default();
        let _ = std::fs::remove_file(&calls);
        text.lines()
            .map(|l| {
                l.split(' ')
                    .skip_while(|w| *w == "-c" || w.contains('='))
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
    };
    // The step's own processes, as its output announces each one.
    let started = |doc: &Value| {
        doc["output"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("$ "))
            .count()
    };
    // Files named like what the agent hands to git are never read as paths.
    std::fs::write(h.repo.join("HEAD~1^{commit}"), "not a revision\n").expect("write");
    std::fs::write(h.repo.join("HEAD"), "not a revision\n").expect("write");

    let (ok, doc, stderr) = h.exec("git.checkout", &["revision=HEAD~1"], &[]);
    assert!(ok, "{doc} {stderr}");
    assert_eq!(h.head(), previous);
    assert_eq!(doc["facts"]["from_sha"], head.as_str(), "{doc}");
    assert_eq!(doc["facts"]["changed"], "true", "{doc}");
    assert_eq!(doc["facts"]["subject"], "release v2", "{doc}");
    assert_eq!(
        started(&doc),
        2,
        "one log for both shas, the checkout: {doc}"
    );
    // Once the host's new state has reached the coordinator, every git of this run has ended,
    // and the state needed none of its own: the checkout had read where it left HEAD.
    eventually("web-1 reports its new HEAD", DEADLINE, || {
        let agents = agents_json(&h.coordinator.url(), &h.pki.ca(), &h.op, None)?;
        agents
            .iter()
            .any(|a| a["host_id"] == "web-1" && a["state"]["git_head_sha"] == previous.as_str())
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("not yet"))
    });
    assert_eq!(
        taken(),
        ["log --no-walk=unsorted", "checkout --quiet"],
        "the step's two, and none for the state"
    );
    // The host's state after each run, as the agent logged it: whether it was sent.
    let states_after = |h: &Host| -> Vec<bool> {
        h.agent_log()
            .lines()
            .filter(|l| l.contains("host state after the run"))
            .map(|l| l.contains("changed=true"))
            .collect()
    };
    assert_eq!(states_after(&h), [true], "{}", h.agent_log());

    // Already there: that one log only; no checkout.
    let (ok, doc, _) = h.exec("git.checkout", &[&format!("revision={previous}")], &[]);
    assert!(ok, "{doc}");
    // The run changed nothing: its state is not sent again (the coordinator would store the
    // same state a second time).
    eventually("the second run's state is looked at", DEADLINE, || {
        (states_after(&h).len() == 2)
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("not yet"))
    });
    assert_eq!(states_after(&h), [true, false], "{}", h.agent_log());
    assert_eq!(doc["facts"]["changed"], "false", "{doc}");
    assert_eq!(doc["facts"]["subject"], "release v2", "{doc}");
    assert_eq!(started(&doc), 1, "{doc}");

    // A name that is both a tag and a branch makes git warn: the one-process answer is not
    // taken, the strict way (`rev-parse --verify`, HEAD, checkout, HEAD read back) is.
    let first = git(&h.repo, &["rev-parse", "HEAD~1"]);
    git(&h.repo, &["tag", "dup", &first]);
    git(&h.repo, &["branch", "dup", &first]);
    let (ok, doc, _) = h.exec("git.checkout", &["revision=dup"], &[]);
    assert!(ok, "{doc}");
    assert_eq!(h.head(), first);
    assert_eq!(doc["facts"]["sha"], first.as_str(), "{doc}");
    assert_eq!(doc["facts"]["subject"], "release v1", "{doc}");
    assert_eq!(doc["facts"]["from_sha"], previous.as_str(), "{doc}");
    assert_eq!(started(&doc), 5, "{doc}");
    git(&h.repo, &["checkout", "-q", "--detach", &previous]);
    taken();

    // `HEAD^-` passes the revision grammar but names a range, not a commit: the one-process
    // resolution fails on it, the strict `--verify` refuses it, and nothing moves.
    let (ok, doc, _) = h.exec("git.checkout", &["revision=HEAD^-"], &[]);
    assert!(!ok, "{doc}");
    assert!(
        doc["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not a commit")),
        "{doc}"
    );
    assert_eq!(h.head(), previous, "HEAD never moved");
    // A run whose checkout failed says nothing about HEAD: the state report reads it.
    let mut calls = Vec::new();
    eventually(
        "the state after a failed checkout reads HEAD",
        DEADLINE,
        || {
            calls.extend(taken());
            calls
                .iter()
                .any(|c| c == "log -1")
                .then_some(())
                .ok_or_else(|| anyhow::anyhow!("no `git log -1` yet: {calls:?}"))
        },
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("checkout")),
        "no checkout ran: {calls:?}"
    );
}

fn pids_running(cmdline: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let args: Vec<String> = raw
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.join(" ") == cmdline
            })
        })
        .collect()
}

/// Nothing of a step survives it: neither a background child that let go of the step's
/// output nor a grandchild that left the process group with `setsid`.
#[test]
fn nothing_of_a_step_survives_it() {
    let h = host();
    slow_checkout(
        &h,
        "sleep 3107 >/dev/null 2>&1 &\nsetsid -f sleep 3108 >/dev/null 2>&1\nsleep 0.2",
    );
    let (ok, doc, stderr) = h.exec("git.checkout", &["revision=HEAD~1"], &[]);
    assert!(ok, "{doc} {stderr}");
    assert!(
        doc["output"]
            .as_str()
            .is_some_and(|o| o.contains("left processes behind")),
        "the step says what it killed: {doc}"
    );
    let left = [pids_running("sleep 3107"), pids_running("sleep 3108")].concat();
    assert!(
        left.is_empty(),
        "the step's leftovers are killed before its result is reported: {left:?}"
    );
}

fn uid_of(user: &str) -> u32 {
    let out = Command::new("id").args(["-u", user]).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("uid")
}

fn set_mode(path: &Path, mode: u32) {
    let mut perm = std::fs::metadata(path).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, mode);
    std::fs::set_permissions(path, perm).expect("chmod");
}

/// The app dir's (unprivileged) owner attacks `file.restore`: symlinks planted at every
/// temporary name the agent ever used, then the env file and its backup swapped for a
/// symlink, a hard link and a FIFO pointing at root's files. Nothing outside the app dir is
/// read or written, the restored env file keeps its owner, group and mode, and each refusal
/// names its cause.
#[test]
fn a_hostile_app_dir_cannot_turn_file_restore_against_the_host() {
    if !is_root() {
        eprintln!("skipping: it needs root to give the app dir to another user");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let h = host();
    let nobody = uid_of("nobody");
    let outside = h.tmp.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    let victim = outside.join("victim");
    std::fs::write(&victim, "ROOT ONLY\n").expect("victim");
    set_mode(&victim, 0o600);
    let env = h.repo.join(".env");
    let backup = h.repo.join(".env.backup");
    // The app's own env file: its owner's, group-readable for the app's group.
    std::os::unix::fs::chown(&env, Some(nobody), Some(4242)).expect("chown env");
    set_mode(&env, 0o640);
    // Every temporary name the agent used before (`.{name}.restore-<pid>`), for any pid.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768)
        .min(70_000);
    for pid in 1..=pid_max {
        std::os::unix::fs::symlink(&victim, h.repo.join(format!("..env.restore-{pid}")))
            .expect("plant symlink");
    }
    let agent_pid = h.agent.as_ref().and_then(|a| a.proc.pid()).expect("pid");
    let _ = std::fs::remove_file(h.repo.join(format!("..env.restore-{agent_pid}")));
    std::os::unix::fs::symlink(&victim, h.repo.join(format!("..env.restore-{agent_pid}")))
        .expect("plant symlink");

    let (ok, doc, stderr) = h.exec("file.restore", &["file=env"], &[]);
    assert!(ok, "{doc} {stderr}");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "ROOT ONLY\n"
    );
    assert_eq!(
        std::fs::metadata(&victim).expect("victim").mode() & 0o7777,
        0o600
    );
    assert_eq!(std::fs::read_to_string(&env).expect("env"), "GOOD=1\n");
    let meta = std::fs::symlink_metadata(&env).expect("env");
    assert!(meta.file_type().is_file(), "env is a regular file");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (nobody, 4242, 0o640),
        "the restored env file keeps its owner, group and mode"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&h.repo)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("..env.") && !n.starts_with("..env.restore-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary file is left: {leftovers:?}"
    );

    let refused = |what: &str, expect: &str| {
        let before = std::fs::read(&env).ok();
        let (ok, doc, _) = h.exec("file.restore", &["file=env"], &[]);
        assert!(!ok, "{what}: refused: {doc}");
        let error = doc["error"].as_str().unwrap_or_default().to_string();
        assert!(
            error.contains(expect),
            "{what}: the error names the cause: {doc}"
        );
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "ROOT ONLY\n",
            "{what}: the file outside the app dir is untouched"
        );
        if std::fs::symlink_metadata(&env).is_ok_and(|m| m.file_type().is_file()) {
            assert_eq!(std::fs::read(&env).ok(), before, "{what}: env untouched");
        }
    };

    // The env file becomes a symlink to a root file: not replaced, not followed.
    std::fs::write(&env, "BROKEN=1\n").expect("env");
    std::fs::remove_file(&env).expect("rm env");
    std::os::unix::fs::symlink(&victim, &env).expect("symlink env");
    refused("symlinked env file", "env_symlink_target");
    std::fs::remove_file(&env).expect("rm env");
    std::fs::write(&env, "BROKEN=1\n").expect("env");

    // The backup becomes a symlink to a root secret: its bytes never reach the env file.
    std::fs::rename(&backup, h.repo.join("kept")).expect("keep backup");
    std::os::unix::fs::symlink(&victim, &backup).expect("symlink backup");
    refused("symlinked backup", "is a symlink");
    std::fs::remove_file(&backup).expect("rm backup");

    // A hard link to a root secret (possible where protected_hardlinks is off).
    std::fs::hard_link(&victim, &backup).expect("hard link");
    refused("hard-linked backup", "hard links");
    std::fs::remove_file(&backup).expect("rm backup");

    // A FIFO would block a reader forever: refused at once.
    assert!(
        Command::new("mkfifo")
            .arg(&backup)
            .status()
            .expect("mkfifo")
            .success()
    );
    refused("FIFO backup", "not a regular file");
    std::fs::remove_file(&backup).expect("rm backup");
    std::fs::rename(h.repo.join("kept"), &backup).expect("restore backup");
    let (ok, doc, _) = h.exec("file.restore", &["file=env"], &[]);
    assert!(ok, "with the attacks gone, the restore works: {doc}");
}

/// The agent's secrets are checked before it starts: a config or key that another user can
/// read (or that another user owns) stops it with the file and the fix named; a state dir
/// left open is closed to 0700.
#[test]
fn the_agent_refuses_to_start_with_exposed_secrets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "fleet.test").expect("pki");
    let certs = pki.agent("web-9").expect("agent cert");
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    set_mode(&state, 0o755);
    let config = tmp.path().join("agent.toml");
    rollback_tests::support::write_private(
        &config,
        format!(
            "host_id = \"web-9\"\ncoordinator = \"https://127.0.0.1:9\"\nstate_dir = \"{}\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            state.display(),
            pki.ca().display(),
            certs.cert.display(),
            certs.key.display()
        ),
    )
    .expect("config");
    let start = || {
        let mut child = Command::new(rollback_tests::support::bin("rollback-agent"))
            .arg("--config")
            .arg(&config)
            .env("ROLLBACK_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("agent spawns");
        // A healthy agent keeps retrying the (absent) coordinator: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let running = child.try_wait().expect("wait").is_none();
        if running {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("output");
        (running, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let refused = |what: &str, expect: &[&str]| {
        let (running, stderr) = start();
        assert!(!running, "{what}: the agent must not start:\n{stderr}");
        for e in expect {
            assert!(stderr.contains(e), "{what}: names `{e}`:\n{stderr}");
        }
    };

    set_mode(&config, 0o644);
    refused(
        "world-readable config",
        &[&config.display().to_string(), "mode 0644", "chmod 600"],
    );
    set_mode(&config, 0o600);
    set_mode(&certs.key, 0o640);
    refused(
        "group-readable key",
        &[&certs.key.display().to_string(), "chmod 600"],
    );
    set_mode(&certs.key, 0o600);
    if is_root() {
        let nobody = uid_of("nobody");
        std::os::unix::fs::chown(&config, Some(nobody), None).expect("chown");
        refused(
            "config owned by another user",
            &[
                &config.display().to_string(),
                &format!("uid {nobody}"),
                "chown",
            ],
        );
        std::os::unix::fs::chown(&config, Some(0), None).expect("chown");
    }
    let (running, stderr) = start();
    assert!(
        running,
        "with the secrets private, the agent runs:\n{stderr}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&state).expect("state").mode() & 0o777,
        0o700,
        "the state dir is forced to 0700"
    );
}

/// A run whose 80 steps each print 100 KB (8 MB in all, twice the message limit): the result
/// arrives cut to size with the truncation marker, each step keeping the end of its output,
/// and the agent's session stays up for the next step.
#[test]
fn a_run_printing_far_more_than_the_message_limit_arrives_cut_and_the_session_stays_up() {
    let mut h = host();
    let tmp = h.git.with_extension("new");
    std::fs::write(
        &tmp,
        "#!/bin/bash\nhead -c 100000 /dev/zero | tr '\\0' x >&2\necho ' end of noise' >&2\nexec /usr/bin/git \"$@\"\n",
    )
    .expect("write git wrapper");
    set_mode(&tmp, 0o755);
    std::fs::rename(&tmp, &h.git).expect("install git wrapper");
    const STEPS: usize = 80;
    let runbook = h.tmp.path().join("flood.toml");
    let steps = vec!["{ action = \"git.log\", params = { count = \"1\" } }"; STEPS].join(", ");
    std::fs::write(
        &runbook,
        format!(
            "[procedures.flood]\ndescription = \"every step prints 100 KB\"\n\
             [[procedures.flood.phases]]\nname = \"noise\"\nscope = \"each\"\nsteps = [{steps}]\n"
        ),
    )
    .expect("runbook");
    let config = std::fs::read_to_string(&h.coordinator.config).expect("config");
    std::fs::write(
        &h.coordinator.config,
        format!("runbook = \"{}\"\n{config}", runbook.display()),
    )
    .expect("config");
    h.coordinator.restart().expect("restart");
    eventually("web-1 back online", DEADLINE, || {
        let agents = agents_json(&h.coordinator.url(), &h.pki.ca(), &h.op, None)?;
        agents
            .iter()
            .any(|a| a["host_id"] == "web-1" && a["status"] == "online")
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("not online"))
    });
    // While the coordinator restarted, the agent may have tried to connect and failed (that is
    // logged as a failed session); only the log from here on is about the flood.
    let online_at = h.agent_log().len();

    let out = rollbackctl(
        &h.coordinator.url(),
        &h.pki.ca(),
        &h.op,
        &[
            "--output",
            "json",
            "rollback",
            "--procedure",
            "flood",
            "--select",
            "host=web-1",
            "--reason",
            "flood test",
            "--yes",
            "--canary",
            "0",
        ],
    )
    .expect("rollbackctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the job finished: {stderr}\nagent log:\n{}",
        h.agent_log()
    );
    let job: Value = serde_json::from_slice(&out.stdout).expect("job json");
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let steps = job["hosts"][0]["runs"][0]["steps"]
        .as_array()
        .expect("steps")
        .clone();
    assert_eq!(steps.len(), STEPS);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["status"], "succeeded", "step {i}");
        let tail = s["output_tail"].as_str().unwrap_or_default();
        assert!(
            tail.contains("cut to fit the run result") && tail.contains("end of noise"),
            "step {i}: cut with a marker, keeping its end: {}…",
            tail.chars().take(200).collect::<String>()
        );
    }
    let log = h.agent_log();
    let flood = log.get(online_at..).unwrap_or(&log);
    assert!(
        !flood.contains("session failed") && !flood.contains("session ended"),
        "the session never broke:\n{flood}"
    );
    let (ok, doc, _) = h.exec("git.log", &["count=1"], &[]);
    assert!(ok, "the same session runs the next step: {doc}");
}

/// A backup swapped for a symlink to a root secret after the agent checked it (here: while
/// `pg_restore --list` runs): the restore still reads the archive that was checked, through the
/// descriptor the agent opened, and the secret is never read. `pg_restore` is a stand-in (test
/// double: there is no database here, and what matters is which bytes the agent hands over):
/// it swaps the file on `--list`, then reports the sha256 of what it was given.
#[test]
fn a_backup_swapped_after_its_check_is_not_what_gets_restored() {
    let h = host();
    let backup = h.backups.join("backup_20260101_000000.dump");
    let original = std::fs::read(&backup).expect("backup");
    let secret = h.tmp.path().join("secret");
    std::fs::write(&secret, "ROOT SECRET\n").expect("secret");
    let sha = rollback_agent::actions::sha256_hex;
    let tmp = h.pg_restore.with_extension("new");
    std::fs::write(
        &tmp,
        format!(
            "#!/bin/bash\ncase \" $* \" in *\" --list \"*) rm -f {b}; ln -s {s} {b};; esac\n\
             echo \"stand-in read sha256 $(sha256sum | cut -d' ' -f1)\"\n",
            b = backup.display(),
            s = secret.display()
        ),
    )
    .expect("stand-in");
    set_mode(&tmp, 0o755);
    std::fs::rename(&tmp, &h.pg_restore).expect("install stand-in");

    let (ok, doc, stderr) = h.exec(
        "postgres.restore",
        &["backup=backup_20260101_000000.dump"],
        &[],
    );
    assert!(ok, "{doc} {stderr}");
    assert_eq!(
        doc["facts"]["backup_sha256"],
        sha(&original),
        "the checked archive is the one hashed: {doc}"
    );
    let output = doc["output"].as_str().unwrap_or_default();
    let read = format!("stand-in read sha256 {}", sha(&original));
    assert_eq!(
        output.matches(&read).count(),
        2,
        "both the listing and the restore read the checked archive: {output}"
    );
    assert!(
        !output.contains(&sha(b"ROOT SECRET\n")),
        "the secret was never read: {output}"
    );
    assert!(
        std::fs::symlink_metadata(&backup)
            .expect("swapped")
            .file_type()
            .is_symlink(),
        "the swap happened"
    );
    // Asked again, the swapped backup is refused by name.
    let (ok, doc, _) = h.exec(
        "postgres.restore",
        &["backup=backup_20260101_000000.dump"],
        &[],
    );
    assert!(!ok, "{doc}");
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("outside the backup dir") || error.contains("symlink"),
        "{doc}"
    );
}
