//! Acceptance for the root agent on a hostile host, in the fleet lab: the app dir belongs to
//! the unprivileged `app` user and the app runs as that user, as in real deployments. As that
//! user, each attack on the agent is attempted — symlinks planted at every temporary name the
//! agent ever used, the env file swapped for a symlink to a root secret, a post-checkout hook,
//! an fsmonitor command and a smudge filter that leaves a `setsid` daemon — and the host is
//! checked afterwards: nothing outside the app dir changed, no attacker code ran as root,
//! nothing of a step survived it, and each refusal names its cause. (A backup swapped during
//! its check is covered on loopback: `agent_exec`, which watches the bytes pg_restore gets.)
//! Without root this prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`).

use anyhow::{Context, Result, ensure};
use rollback_tests::lab::{self, APP_DIR, APP_UNIT, APP_USER, APP_VENV, LabSpec};
use rollback_tests::lab_fleet::LabFleet;

const HOST: &str = "app1";
/// A root file outside the app dir the attacker would like the agent to write.
const VICTIM: &str = "/etc/rollback-victim";
/// A root file that does not exist: the agent writing through a link would create it.
const ABSENT: &str = "/etc/cron.d/rollback-pwned";
/// Highest pid planted for (the agent's pid in a lab host is small: its own pid namespace).
const PIDS: u32 = 70_000;

fn python(lab: &lab::Lab, script: &str) -> Result<String> {
    lab.run_as_app(HOST, &[&format!("{APP_VENV}/bin/python"), "-c", script])
}

fn error_of(doc: &serde_json::Value) -> String {
    doc["error"].as_str().unwrap_or_default().to_string()
}

fn stat(lab: &lab::Lab, path: &str) -> Result<String> {
    Ok(lab
        .run(HOST, &["stat", "-c", "%U:%G:%a", path])?
        .trim()
        .to_string())
}

/// `user args` of every process on the host.
fn processes(lab: &lab::Lab) -> Result<Vec<String>> {
    Ok(lab
        .run(HOST, &["ps", "-eo", "user=,args="])?
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect())
}

#[test]
fn the_app_user_cannot_turn_the_root_agent_against_the_host() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-hostile").app_hosts(1))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    let env = format!("{APP_DIR}/.env");
    let backup = format!("{APP_DIR}/.env.backup");

    // As deployed: the app dir and the env file are the app user's, and the app runs as it.
    ensure!(stat(&lab, APP_DIR)? == format!("{APP_USER}:{APP_USER}:755"));
    ensure!(stat(&lab, &env)? == format!("{APP_USER}:{APP_USER}:600"));
    let procs = processes(&lab)?;
    ensure!(
        procs
            .iter()
            .any(|p| p.starts_with(&format!("{APP_USER} ")) && p.ends_with("/app.py")),
        "the app runs as {APP_USER}: {procs:#?}"
    );
    lab.write_file(HOST, VICTIM, b"ROOT ONLY\n", 0o600)?;

    // 1. Symlinks at every temporary name the agent ever used for the env file and its backup
    //    (`.{name}.restore-{pid}`), pointing at a root file and at one that does not exist.
    python(
        &lab,
        &format!(
            "import os\nfor pid in range(1, {PIDS} + 1):\n    \
             os.symlink('{VICTIM}', '{APP_DIR}/..env.restore-%d' % pid)\n    \
             os.symlink('{ABSENT}', '{APP_DIR}/..env.backup.restore-%d' % pid)\n"
        ),
    )?;
    // The app user breaks its config (keeping the good copy as the backup) and restarts.
    python(
        &lab,
        &format!(
            "import shutil\nshutil.copyfile('{env}', '{backup}')\n\
             open('{env}', 'w').write('DATABASE_URL=\\nFEATURE_REPORTS=maybe\\n')\n"
        ),
    )?;
    lab.restart_unit(HOST, APP_UNIT)?;
    lab.wait_not_ready(HOST)?;

    let doc = fleet.exec_ok(HOST, "file.restore", &["file=env"])?;
    ensure!(doc["facts"]["changed"] == "true", "{doc}");
    ensure!(
        stat(&lab, &env)? == format!("{APP_USER}:{APP_USER}:600"),
        "the restored env file keeps its owner, group and mode: {}",
        stat(&lab, &env)?
    );
    fleet.exec_ok(HOST, "service.restart", &[])?;
    fleet.exec_ok(
        HOST,
        "http.check",
        &["endpoint=/readyz", "retries=60", "interval_ms=250"],
    )?;
    lab.wait_ready(HOST)
        .context("the app, running as the app user, reads the restored env file")?;
    // snapshot.take rewrites the backup the same way, with the env file's owner and mode
    // (the attacker left it world-readable: 0644).
    ensure!(stat(&lab, &backup)? == format!("{APP_USER}:{APP_USER}:644"));
    fleet.exec_ok(HOST, "snapshot.take", &["id=hostile-1", "label=hostile"])?;
    ensure!(stat(&lab, &backup)? == stat(&lab, &env)?);
    ensure!(
        lab.read_file(HOST, VICTIM)? == b"ROOT ONLY\n",
        "{VICTIM} untouched"
    );
    ensure!(stat(&lab, VICTIM)? == "root:root:600");
    ensure!(
        lab.run(HOST, &["test", "!", "-e", ABSENT]).is_ok(),
        "{ABSENT} was not created"
    );
    python(
        &lab,
        &format!(
            "import glob, os\nfor p in glob.glob('{APP_DIR}/..env*.restore-*'):\n    os.unlink(p)\n\
             assert not glob.glob('{APP_DIR}/..env*.rollback-*'), 'temporary files left'\n"
        ),
    )?;

    // 2. The env file swapped for a symlink to a root secret: refused by name, not followed.
    let shadow_before = lab.run(HOST, &["sha256sum", "/etc/shadow"])?;
    python(
        &lab,
        &format!("import os\nos.unlink('{env}')\nos.symlink('/etc/shadow', '{env}')\n"),
    )?;
    let (ok, doc) = fleet.exec(HOST, "file.restore", &["file=env"])?;
    ensure!(!ok, "a symlinked env file is refused: {doc}");
    ensure!(
        error_of(&doc).contains("is a symlink") && error_of(&doc).contains("env_symlink_target"),
        "the refusal names the cause and the setting: {doc}"
    );
    ensure!(lab.run(HOST, &["sha256sum", "/etc/shadow"])? == shadow_before);
    let (ok, doc) = fleet.exec(HOST, "snapshot.take", &["id=hostile-2"])?;
    ensure!(!ok && error_of(&doc).contains("is a symlink"), "{doc}");
    python(
        &lab,
        &format!("import os, shutil\nos.unlink('{env}')\nshutil.copyfile('{backup}', '{env}')\n"),
    )?;

    // 3. A repository armed by its owner: a post-checkout hook and an fsmonitor command that
    //    record who ran them, and a smudge filter that also leaves a daemon in a new session.
    python(
        &lab,
        &format!(
            "import os, subprocess\n\
             hook = '{APP_DIR}/.git/hooks/post-checkout'\n\
             open(hook, 'w').write('#!/bin/sh\\nid -u > /tmp/hook-ran\\n')\n\
             os.chmod(hook, 0o755)\n\
             mon = '{APP_DIR}/.git/fsmonitor.sh'\n\
             open(mon, 'w').write('#!/bin/sh\\nid -u > /tmp/fsmonitor-ran\\n')\n\
             os.chmod(mon, 0o755)\n\
             open('{APP_DIR}/.git/info/attributes', 'w').write('* filter=evil\\n')\n\
             git = lambda *a: subprocess.run(['git', '-C', '{APP_DIR}', 'config', *a], check=True)\n\
             git('core.fsmonitor', mon)\n\
             git('filter.evil.smudge', \"sh -c 'setsid -f sleep 3301 >/dev/null 2>&1 </dev/null; id -u >> /tmp/filter-ran; cat'\")\n"
        ),
    )?;
    let v1 = lab.release_commit("v1")?;
    let doc = fleet.exec_ok(HOST, "git.checkout", &[&format!("revision={v1}")])?;
    ensure!(lab.app_head(HOST)? == v1, "checked out: {doc}");
    for marker in ["/tmp/hook-ran", "/tmp/fsmonitor-ran"] {
        ensure!(
            lab.run(HOST, &["test", "!", "-e", marker]).is_ok(),
            "{marker}: the hook and the fsmonitor command never ran: {doc}"
        );
    }
    let app_uid = lab.run(HOST, &["id", "-u", APP_USER])?.trim().to_string();
    // The filter is part of a real checkout: it runs, as the repository's owner.
    let filter_uids = lab
        .read_file(HOST, "/tmp/filter-ran")
        .context("git ran the owner's smudge filter")?;
    for uid in String::from_utf8_lossy(&filter_uids).lines() {
        ensure!(
            uid == app_uid,
            "the smudge filter ran as uid {uid}, never as root: {doc}"
        );
    }
    let daemons: Vec<String> = processes(&lab)?
        .into_iter()
        .filter(|p| p.ends_with("sleep 3301"))
        .collect();
    ensure!(
        daemons.is_empty(),
        "nothing of the step survives it: {daemons:?}"
    );
    ensure!(
        doc["output"]
            .as_str()
            .is_some_and(|o| o.contains("left processes behind")),
        "the step says it killed what git's filter left: {doc}"
    );
    Ok(())
}
