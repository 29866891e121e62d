//! The on-call seat on loopback, with real coordinators and agents driven through
//! `rollbackctl`: a job is found by `latest`, by a prefix of its id and by `jobs` filters
//! (state, procedure, host, kind); a host's history lists its jobs; two named contexts reach two
//! separate fleets, `--context`/`ROLLBACK_CONTEXT`/`context use` pick the one acted on, and
//! the confirmation names it (context, coordinator, number of hosts) on stderr, leaving stdout
//! to `--output json`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rollback_tests::support::{
    Agent, CertFiles, Coordinator, Pki, agents_json, eventually, rollbackctl,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

/// `ok` succeeds on any agent (it reads the host's state); `bad` fails on an agent with no
/// `[app]` in its profile (git.log has no repository), which halts the job.
const RUNBOOK: &str = r#"
[procedures.ok]
description = "reads each host's state"
[[procedures.ok.phases]]
name = "read"
scope = "each"
steps = [{ action = "state.read" }]

[procedures.bad]
description = "git.log where there is no repository"
[[procedures.bad.phases]]
name = "log"
scope = "each"
steps = [{ action = "git.log" }]
"#;

/// One fleet: its own CA, a coordinator with `hosts` real agents labelled role=web in its
/// inventory, and an operator (approver) of its own.
struct Fleet {
    coordinator: Coordinator,
    _agents: Vec<Agent>,
    hosts: Vec<String>,
    pki: Pki,
    op: CertFiles,
}

fn fleet(dir: &Path, name: &str, hosts: usize) -> Result<Fleet> {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::init(&dir.join("pki"), &format!("{name}.test"))?;
    let op = pki.operator("olga")?;
    let mut coordinator = Coordinator::start(&dir, &pki, &[("olga", "approver")])?;
    coordinator.use_runbook(RUNBOOK)?;
    let ids: Vec<String> = (1..=hosts).map(|i| format!("{name}-web-{i}")).collect();
    let inventory: String = ids
        .iter()
        .map(|id| format!("[inventory.\"{id}\"]\nrole = \"web\"\n"))
        .collect();
    coordinator.append_config(&inventory)?;
    let mut agents = Vec::new();
    for id in &ids {
        let certs = pki.agent(id)?;
        agents.push(Agent::start(
            &dir,
            id,
            &[("role", "web")],
            &coordinator.url(),
            &pki.ca(),
            &certs,
        )?);
    }
    eventually("every agent online", DEADLINE, || {
        let online = agents_json(&coordinator.url(), &pki.ca(), &op, None)?
            .iter()
            .filter(|a| a["status"] == "online")
            .count();
        (online == hosts)
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("{online} of {hosts} online"))
    });
    Ok(Fleet {
        coordinator,
        _agents: agents,
        hosts: ids,
        pki,
        op,
    })
}

fn ctl(f: &Fleet, args: &[&str]) -> Result<(bool, String, String)> {
    let out = rollbackctl(&f.coordinator.url(), &f.pki.ca(), &f.op, args)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn json(f: &Fleet, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let (ok, out, err) = ctl(f, &all)?;
    anyhow::ensure!(ok, "rollbackctl {args:?} failed: {err}");
    serde_json::from_str(&out).with_context(|| format!("rollbackctl {args:?} printed {out}"))
}

#[test]
fn a_job_is_found_by_latest_by_prefix_and_by_filters() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let f = fleet(tmp.path(), "a", 2)?;
    let rollback = |procedure: &str| {
        ctl(
            &f,
            &[
                "--output",
                "json",
                "rollback",
                "--procedure",
                procedure,
                "--select",
                "role=web",
                "--reason",
                "test",
                "--yes",
            ],
        )
    };
    let (ok, out, err) = rollback("ok")?;
    assert!(ok, "{err}");
    let good: Value = serde_json::from_str(&out)?;
    let good_id = good["job_id"].as_str().unwrap_or_default().to_string();
    let (ok, out, _) = rollback("bad")?;
    assert!(!ok, "the bad procedure fails");
    let halted: Value = serde_json::from_str(&out)?;
    let halted_id = halted["job_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(halted["state"], "halted", "{halted}");

    // latest: the newest rollback.
    let latest = json(&f, &["job", "show", "latest"])?;
    assert_eq!(latest["job_id"], halted_id.as_str());
    // A prefix of the older one; watch resolves it and follows that job to its end.
    let (ok, out, err) = ctl(&f, &["watch", &good_id[..6]])?;
    assert!(ok, "watch by prefix: {err}");
    assert!(out.contains(&good_id), "watch names the full id: {out}");
    assert!(
        out.contains("job succeeded") || out.contains("succeeded"),
        "{out}"
    );
    let report = ctl(&f, &["report", &halted_id[..8]])?;
    assert!(report.0 && report.1.contains(&halted_id), "{}", report.2);

    // Filters.
    let listed = |args: &[&str]| -> Result<Vec<String>> {
        let mut all = vec!["jobs"];
        all.extend_from_slice(args);
        Ok(json(&f, &all)?
            .as_array()
            .into_iter()
            .flatten()
            .map(|j| j["job_id"].as_str().unwrap_or_default().to_string())
            .collect())
    };
    assert_eq!(listed(&["--state", "halted"])?, vec![halted_id.clone()]);
    assert_eq!(listed(&["--state", "succeeded"])?, vec![good_id.clone()]);
    assert_eq!(listed(&["--procedure", "ok"])?, vec![good_id.clone()]);
    assert_eq!(
        listed(&["--host", &f.hosts[0]])?,
        vec![halted_id.clone(), good_id.clone()]
    );
    assert!(listed(&["--host", "nobody"])?.is_empty());
    assert_eq!(listed(&["--since", "1h"])?.len(), 2);
    assert!(listed(&["--since", "2000-01-01T00:00:00Z"])?.len() == 2);
    assert!(listed(&["--kind", "snapshot"])?.is_empty());

    // Snapshot jobs stay out of the default list and out of `latest`.
    let (ok, _, err) = ctl(
        &f,
        &[
            "snapshot",
            "--select",
            "role=web",
            "--label",
            "before deploy",
        ],
    )?;
    assert!(ok, "snapshot: {err}");
    assert_eq!(listed(&[])?.len(), 2, "rollbacks only by default");
    assert_eq!(listed(&["--kind", "snapshot"])?.len(), 1);
    assert_eq!(listed(&["--kind", "all"])?.len(), 3);
    let latest = json(&f, &["job", "show", "latest"])?;
    assert_eq!(latest["job_id"], halted_id.as_str(), "latest is a rollback");

    // History of one host: both rollbacks, with its outcome in each.
    let history = json(&f, &["history", &f.hosts[1]])?;
    let rows = history.as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 2, "{history}");
    assert_eq!(rows[0]["job_id"], halted_id.as_str());
    assert_eq!(rows[1]["outcome"], "succeeded");

    // Refusals name what to do.
    for (given, want) in [
        ("zz", "is not a job"),
        ("3f", "is not a job"),
        ("0000000", "no job starts with"),
    ] {
        let (ok, _, err) = ctl(&f, &["job", "show", given])?;
        assert!(!ok && err.contains(want), "{given}: {err}");
    }
    let (ok, _, err) = ctl(&f, &["jobs", "--state", "exploded"])?;
    assert!(
        !ok && err.contains("halted"),
        "the states are listed: {err}"
    );
    Ok(())
}

/// Each context with its fleet's own CA and operator certificate.
fn write_contexts(path: &Path, a: &Fleet, b: &Fleet) -> Result<()> {
    let ctx = |name: &str, f: &Fleet| {
        format!(
            "[contexts.{name}]\ncoordinator = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            f.coordinator.url(),
            f.pki.ca().display(),
            f.op.cert.display(),
            f.op.key.display()
        )
    };
    std::fs::write(
        path,
        format!(
            "current_context = \"staging\"\n{}{}",
            ctx("staging", a),
            ctx("prod", b)
        ),
    )?;
    Ok(())
}

/// `rollbackctl --config FILE ARGS` with no connection flags: the context decides.
fn with_config(
    config: &Path,
    args: &[&str],
    env_context: Option<&str>,
) -> Result<std::process::Output> {
    let mut cmd = std::process::Command::new(rollback_tests::support::bin("rollbackctl"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("HOME", "/nonexistent")
        .env_remove("ROLLBACK_COORDINATOR")
        .env_remove("ROLLBACK_CONTEXT");
    if let Some(c) = env_context {
        cmd.env("ROLLBACK_CONTEXT", c);
    }
    cmd.output().context("running rollbackctl")
}

fn hosts_of(out: &std::process::Output) -> Result<Vec<String>> {
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let mut hosts: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["host_id"].as_str().unwrap_or_default().to_string())
        .collect();
    hosts.sort();
    Ok(hosts)
}

#[test]
fn two_contexts_reach_two_fleets_and_the_confirmation_names_the_one_acted_on() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let staging = fleet(tmp.path(), "stg", 1)?;
    let prod = fleet(tmp.path(), "prd", 3)?;
    let config = tmp.path().join("config.toml");
    write_contexts(&config, &staging, &prod)?;

    // The current context, then --context, then ROLLBACK_CONTEXT.
    let out = with_config(&config, &["--output", "json", "agents"], None)?;
    assert_eq!(hosts_of(&out)?, staging.hosts);
    let out = with_config(
        &config,
        &["--context", "prod", "--output", "json", "agents"],
        None,
    )?;
    assert_eq!(hosts_of(&out)?, prod.hosts);
    let out = with_config(&config, &["--output", "json", "agents"], Some("prod"))?;
    assert_eq!(hosts_of(&out)?, prod.hosts);
    let out = with_config(&config, &["--context", "qa", "agents"], None)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no context `qa`") && err.contains("prod, staging"),
        "{err}"
    );

    // The rollback's confirmation names the context, its coordinator and the host count, on
    // stderr; stdout is the JSON record alone.
    let out = with_config(
        &config,
        &[
            "--context",
            "prod",
            "--output",
            "json",
            "rollback",
            "--procedure",
            "ok",
            "--select",
            "role=web",
            "--reason",
            "context test",
            "--yes",
        ],
        None,
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let record: Value = serde_json::from_slice(&out.stdout).context("stdout is only JSON")?;
    assert_eq!(record["hosts"].as_array().map(Vec::len), Some(3));
    // Without --yes and without a terminal it refuses, naming what it would have done.
    let out = with_config(
        &config,
        &[
            "--context",
            "prod",
            "rollback",
            "--procedure",
            "ok",
            "--select",
            "role=web",
            "--reason",
            "context test",
        ],
        None,
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused without confirmation");
    assert!(
        err.contains(&format!(
            "roll back 3 host(s) with `ok` on context prod ({})",
            prod.coordinator.url()
        )),
        "{err}"
    );
    // With --yes in table mode the same line goes to stderr.
    let out = with_config(
        &config,
        &[
            "rollback",
            "--procedure",
            "ok",
            "--select",
            "role=web",
            "--reason",
            "staging",
            "--yes",
        ],
        None,
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Piped, the followed job is plain lines: no colour, no redrawn summary.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("job succeeded") && !text.contains('\x1b') && !text.contains('\r'),
        "{text:?}"
    );
    assert!(
        err.contains(&format!(
            "roll back 1 host(s) with `ok` on context staging ({})",
            staging.coordinator.url()
        )),
        "{err}"
    );
    // Each fleet has exactly the job started on it.
    let jobs = |f: &Fleet| -> Result<usize> {
        let v = json(f, &["jobs"])?;
        Ok(v.as_array().map_or(0, Vec::len))
    };
    assert_eq!((jobs(&staging)?, jobs(&prod)?), (1, 1));

    // `context use` switches the current one, keeping the file readable.
    let out = with_config(&config, &["context", "use", "prod"], None)?;
    assert!(out.status.success());
    let out = with_config(&config, &["--output", "json", "agents"], None)?;
    assert_eq!(hosts_of(&out)?, prod.hosts);
    let out = with_config(&config, &["context", "list"], None)?;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('*') && l.contains("prod")),
        "{listed}"
    );
    Ok(())
}
