//! The Debian packages (issue #17) in the fleet lab: the agent package installed with `dpkg -i`
//! on every app host and the coordinator package on the database host (it has a systemd; the
//! lab's coordinator namespace has none), certificates issued in bulk with `rollbackctl pki
//! issue agent --from-file` and copied to `/etc/fleet-rollback/` as the README says, the
//! packaged units started with `systemctl enable --now`, then a real `--to-snapshot` rollback
//! of a bad deployment through them. Checked as well: the installed files' modes and owners,
//! the coordinator running as its system user, its reload, the agent unit's `Delegate=yes` and
//! `KillMode=control-group` with steps in their own cgroups, and both units' `systemd-analyze
//! security` exposure at or under the values pinned here (and listed in the README). The
//! example configs the packages ship load with the real loaders (no root needed for that).
//! Without root the lab test prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`);
//! with root, packages missing or older than the binaries are an error naming the command.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use rollback_tests::lab::{self, Lab, LabSpec, SHARED_MOUNT};
use rollback_tests::lab_fleet::{
    self, APPROVER, COORDINATOR_PORT, LabFleet, OPERATOR, assert_healthy, outcomes,
};
use rollback_tests::packages::{
    self, AGENT_PACKAGE, CONFIG_DIR, COORDINATOR_PACKAGE, COORDINATOR_USER,
};
use rollback_tests::support::{Pki, bin, eventually};

const AGENT_UNIT: &str = "fleet-rollback-agent.service";
const COORDINATOR_UNIT: &str = "fleet-rollback-coordinator.service";
/// `systemd-analyze security` overall exposure of the packaged units, at most (README).
/// The packaged config's metrics listener, as seen on the coordinator's host.
const METRICS_URL: &str = "http://127.0.0.1:9464/metrics";
const AGENT_EXPOSURE_MAX: f64 = 3.2;
const COORDINATOR_EXPOSURE_MAX: f64 = 1.1;

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[test]
fn the_example_configs_load_and_the_units_keep_their_promises() -> Result<()> {
    let root = lab::workspace_root();
    let dir = tempfile::tempdir()?;
    // The agent refuses a config others can read, as the package installs it: 0600.
    let agent_toml = dir.path().join("agent.toml");
    std::fs::copy(root.join("agent/debian/agent.toml"), &agent_toml)?;
    std::fs::set_permissions(&agent_toml, std::fs::Permissions::from_mode(0o600))?;
    let agent = rollback_agent::Config::load(&agent_toml)
        .map_err(|e| anyhow::anyhow!("the example agent.toml: {e}"))?;
    assert_eq!(
        agent.state_dir,
        Path::new("/var/lib/fleet-rollback-agent"),
        "the agent unit's StateDirectory"
    );
    assert_eq!(agent.tls.key, Path::new("/etc/fleet-rollback/agent.key"));
    let coordinator =
        rollback_coordinator::Config::load(&root.join("coordinator/debian/coordinator.toml"))
            .map_err(|e| anyhow::anyhow!("the example coordinator.toml: {e}"))?;
    assert_eq!(
        coordinator.database.to_string(),
        "/var/lib/fleet-rollback/coordinator.sqlite",
        "the coordinator unit's StateDirectory"
    );
    assert_eq!(
        coordinator.tls.key,
        Path::new("/etc/fleet-rollback/coordinator.key")
    );
    assert_eq!(
        coordinator.metrics_listen,
        Some("127.0.0.1:9464".parse()?),
        "metrics on, on loopback only"
    );
    // The commented webhook example loads as written once uncommented (its secret where the
    // comment says).
    let shipped = read(&root.join("coordinator/debian/coordinator.toml"))?;
    let secret = dir.path().join("webhook.secret");
    std::fs::write(&secret, "a secret\n")?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let mut with_hook = String::new();
    let mut in_example = false;
    for line in shipped.lines() {
        in_example = in_example && !line.is_empty() || line == "# [[webhooks]]";
        let line = if in_example {
            line.trim_start_matches("# ")
        } else {
            line
        };
        with_hook.push_str(&line.replace(
            "/etc/fleet-rollback/webhook.secret",
            &secret.display().to_string(),
        ));
        with_hook.push('\n');
    }
    ensure!(with_hook.contains("\n[[webhooks]]\nname = "), "{with_hook}");
    let hooked = dir.path().join("coordinator.toml");
    std::fs::write(&hooked, &with_hook)?;
    let loaded = rollback_coordinator::Config::load(&hooked)
        .map_err(|e| anyhow::anyhow!("the example webhook, uncommented: {e}"))?;
    assert_eq!(loaded.webhooks.len(), 1);
    assert_eq!(loaded.webhooks[0].events.len(), 4);

    let agent_unit = read(&root.join("agent/debian").join(AGENT_UNIT))?;
    for line in [
        "ExecStart=/usr/bin/rollback-agent --config /etc/fleet-rollback/agent.toml",
        "Delegate=yes",
        "KillMode=control-group",
        "Restart=on-failure",
        "StateDirectory=fleet-rollback-agent",
    ] {
        assert!(
            agent_unit.lines().any(|l| l == line),
            "{AGENT_UNIT}: {line}"
        );
    }
    assert!(
        !agent_unit.contains("ProtectControlGroups"),
        "the agent makes its steps' cgroups under its own"
    );
    let coordinator_unit = read(&root.join("coordinator/debian").join(COORDINATOR_UNIT))?;
    for line in [
        "ExecStart=/usr/bin/rollback-coordinator --config /etc/fleet-rollback/coordinator.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=fleet-rollback",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "StateDirectory=fleet-rollback",
        "Restart=on-failure",
    ] {
        assert!(
            coordinator_unit.lines().any(|l| l == line),
            "{COORDINATOR_UNIT}: {line}"
        );
    }
    Ok(())
}

/// Writes `contents` to `path` inside `host`, owned by root and `group`, with `mode` (octal).
fn put(lab: &Lab, host: &str, path: &str, contents: &[u8], mode: &str, group: &str) -> Result<()> {
    lab.command(host, "install")?
        .args([
            "-D",
            "-m",
            mode,
            "-o",
            "root",
            "-g",
            group,
            "/dev/stdin",
            path,
        ])
        .stdin(contents)
        .run()
        .with_context(|| format!("{host}: writing {path}"))?;
    Ok(())
}

/// `stat`'s "MODE USER GROUP" of `path` inside `host`.
fn owner_and_mode(lab: &Lab, host: &str, path: &str) -> Result<String> {
    Ok(lab
        .run(host, &["stat", "-c", "%a %U %G", path])?
        .trim()
        .to_string())
}

/// A unit's journal inside `host` (for failure messages and log checks).
fn journal(lab: &Lab, host: &str, unit: &str) -> String {
    lab.exec(host, &["journalctl", "--no-pager", "-o", "cat", "-u", unit])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(no journal: {e:#})"))
}

/// `systemd-analyze security UNIT` inside `host`: the overall exposure level.
fn exposure(lab: &Lab, host: &str, unit: &str) -> Result<f64> {
    let out = lab.exec(host, &["systemd-analyze", "security", "--no-pager", unit])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let marker = format!("Overall exposure level for {unit}:");
    let value = text
        .lines()
        .find_map(|l| l.split_once(&marker).map(|(_, rest)| rest.trim()))
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| {
            format!(
                "{host}: no overall exposure in `systemd-analyze security {unit}`:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    value
        .parse()
        .with_context(|| format!("{host}: exposure {value:?} of {unit}"))
}

/// The unit's main process id inside `host`.
fn main_pid(lab: &Lab, host: &str, unit: &str) -> Result<String> {
    let pid = lab.run(
        host,
        &["systemctl", "show", "--property=MainPID", "--value", unit],
    )?;
    let pid = pid.trim().to_string();
    if pid.is_empty() || pid == "0" {
        bail!(
            "{host}: {unit} has no main process\n{}",
            journal(lab, host, unit)
        );
    }
    Ok(pid)
}

fn wait_active(lab: &Lab, host: &str, unit: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let state = lab.unit_state(host, unit)?;
        if state == "active" {
            return Ok(());
        }
        if std::time::Instant::now() > deadline || state == "failed" {
            bail!("{host}: {unit} is {state}\n{}", journal(lab, host, unit));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn packaged_agents_and_coordinator_roll_a_bad_deployment_back() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-pkg").app_hosts(2))? else {
        return Ok(());
    };
    let debs = packages::dev_debs()?;
    let shared = lab.shared_dir();
    let deb_dir = shared.join("debs");
    std::fs::create_dir_all(&deb_dir)?;
    let mut in_hosts = std::collections::BTreeMap::new();
    for (package, deb) in &debs {
        let name = deb.file_name().context("a .deb without a file name")?;
        std::fs::copy(deb, deb_dir.join(name))
            .with_context(|| format!("copying {}", deb.display()))?;
        in_hosts.insert(
            *package,
            format!("{SHARED_MOUNT}/debs/{}", name.to_string_lossy()),
        );
    }
    let db = lab.db_host()?.id().to_string();
    let db_addr = lab.db_host()?.addr().to_string();
    let apps = lab.app_host_ids();
    let url = format!("https://{db_addr}:{COORDINATOR_PORT}");

    // The PKI, and every agent's bundle in one command, as the README's enrolment does.
    let dir = shared.join("fleet");
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::init(&dir.join("pki"), "lab.fleet")?;
    let operator = pki.operator(OPERATOR)?;
    let approver = pki.operator(APPROVER)?;
    let coordinator_certs = pki.coordinator("coordinator", &[&db_addr])?;
    let hosts_txt = dir.join("hosts.txt");
    std::fs::write(&hosts_txt, format!("# app hosts\n{}\n", apps.join("\n")))?;
    let enrol = dir.join("enrol");
    let out = std::process::Command::new(bin("rollbackctl"))
        .arg("pki")
        .arg("--dir")
        .arg(&pki.dir)
        .args(["issue", "agent", "--from-file"])
        .arg(&hosts_txt)
        .arg("--out-dir")
        .arg(&enrol)
        .output()
        .context("rollbackctl pki issue agent --from-file")?;
    ensure!(
        out.status.success(),
        "rollbackctl pki issue agent --from-file: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The coordinator, from its package, on the database host.
    lab.run(&db, &["dpkg", "-i", &in_hosts[COORDINATOR_PACKAGE]])?;
    let shipped = read(&lab::workspace_root().join("coordinator/debian/coordinator.toml"))?;
    let installed = String::from_utf8(lab.read_file(&db, "/etc/fleet-rollback/coordinator.toml")?)?;
    assert_eq!(
        installed, shipped,
        "the package installs the example config"
    );
    // The example's `[operators]` table is its last: the operators go under it, then the
    // inventory. Its listen address (0.0.0.0:7443) and paths are kept as shipped.
    let config = format!(
        "{installed}{OPERATOR} = \"admin\"\n{APPROVER} = \"approver\"\n{}",
        lab_fleet::inventory_toml(&lab)
    );
    put(
        &lab,
        &db,
        &format!("{CONFIG_DIR}/ca.pem"),
        &std::fs::read(pki.ca())?,
        "0644",
        "root",
    )?;
    put(
        &lab,
        &db,
        &format!("{CONFIG_DIR}/coordinator.pem"),
        &std::fs::read(&coordinator_certs.cert)?,
        "0644",
        "root",
    )?;
    // Copied root-only; the package's configure step gives its user read access.
    put(
        &lab,
        &db,
        &format!("{CONFIG_DIR}/coordinator.key"),
        &std::fs::read(&coordinator_certs.key)?,
        "0600",
        "root",
    )?;
    put(
        &lab,
        &db,
        &format!("{CONFIG_DIR}/coordinator.toml"),
        config.as_bytes(),
        "0600",
        "root",
    )?;
    lab.command(&db, "dpkg-reconfigure")?
        .args(["-f", "noninteractive", COORDINATOR_PACKAGE])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()?;
    for file in ["coordinator.toml", "coordinator.key"] {
        assert_eq!(
            owner_and_mode(&lab, &db, &format!("{CONFIG_DIR}/{file}"))?,
            format!("640 root {COORDINATOR_USER}"),
            "{file}: readable by the coordinator's user, no one else"
        );
    }
    lab.run(&db, &["systemctl", "enable", "--now", COORDINATOR_UNIT])?;
    wait_active(&lab, &db, COORDINATOR_UNIT)?;

    // An agent, from its package, on every app host.
    for host in &apps {
        lab_fleet::prepare_migrations(&lab, host)?;
        lab.run(host, &["dpkg", "-i", &in_hosts[AGENT_PACKAGE]])?;
        assert_eq!(
            owner_and_mode(&lab, host, "/etc/fleet-rollback/agent.toml")?,
            "600 root root",
            "{host}: the example agent.toml as installed"
        );
        let bundle = enrol.join(host);
        for (file, mode) in [
            ("ca.pem", "0644"),
            ("agent.pem", "0644"),
            ("agent.key", "0600"),
        ] {
            let bytes = std::fs::read(bundle.join(file))
                .with_context(|| format!("{host}: the enrolment bundle's {file}"))?;
            put(
                &lab,
                host,
                &format!("{CONFIG_DIR}/{file}"),
                &bytes,
                mode,
                "root",
            )?;
        }
        let tls = ["ca.pem", "agent.pem", "agent.key"].map(|f| format!("{CONFIG_DIR}/{f}"));
        let toml = lab_fleet::agent_toml(
            &lab,
            host,
            std::slice::from_ref(&url),
            &tls,
            "/var/lib/fleet-rollback-agent",
        )?;
        put(
            &lab,
            host,
            &format!("{CONFIG_DIR}/agent.toml"),
            toml.as_bytes(),
            "0600",
            "root",
        )?;
        // The lab's alembic is the checkout's venv (its scripts name its python by that
        // path); when the checkout is under /tmp, the unit's PrivateTmp hides it. A host
        // with alembic installed needs nothing like this: the lab makes it visible again,
        // and changes nothing else about the packaged unit.
        put(
            &lab,
            host,
            &format!("/etc/systemd/system/{AGENT_UNIT}.d/lab-venv.conf"),
            format!("[Service]\nBindReadOnlyPaths={}\n", lab.venv().display()).as_bytes(),
            "0644",
            "root",
        )?;
        lab.run(host, &["systemctl", "daemon-reload"])?;
        lab.run(host, &["systemctl", "enable", "--now", AGENT_UNIT])?;
        wait_active(&lab, host, AGENT_UNIT)?;
    }
    let fleet = LabFleet::with_coordinator_at(&lab, dir.clone(), pki, operator, approver, url);
    fleet.wait_online(&apps).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\ncoordinator journal:\n{}\n{} agent journal:\n{}",
            journal(&lab, &db, COORDINATOR_UNIT),
            apps[0],
            journal(&lab, &apps[0], AGENT_UNIT)
        )
    })?;

    // A bad deployment, rolled back to the snapshot through the packaged units.
    let out = fleet.rollbackctl(&[
        "snapshot",
        "--select",
        "role=web",
        "--label",
        "before the bad deploy",
    ])?;
    ensure!(
        out.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reported_env = |host: &str| -> Result<String> {
        fleet
            .agents()?
            .iter()
            .find(|a| a["host_id"] == host)
            .and_then(|a| a["state"]["env_sha256"].as_str())
            .map(str::to_string)
            .with_context(|| format!("{host} in `agents`"))
    };
    let before: Vec<String> = apps
        .iter()
        .map(|h| reported_env(h))
        .collect::<Result<_>>()?;
    let refs: Vec<&str> = apps.iter().map(String::as_str).collect();
    lab.bad_config(&refs)?;
    let last = refs.last().copied().context("no app host")?;
    lab.bad_release(&[last])?;
    // As the runbook has it: find what changed first. The agents report their state after
    // that run, which the rollback's plan reads (the note on issue #14): wait for it.
    let out = fleet.rollbackctl(&["diagnose", "--select", "role=web"])?;
    ensure!(
        out.status.success(),
        "diagnose: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (host, old) in apps.iter().zip(&before) {
        fleet.eventually(&format!("{host} reports its changed .env"), || {
            ensure!(reported_env(host)? != *old, "still the old .env");
            Ok(())
        });
    }
    // Prometheus's view while it runs: the packaged config's metrics listener (loopback on the
    // coordinator's host) shows the job and its runs.
    let scrape = || lab.run(&db, &["curl", "-sS", "--max-time", "10", METRICS_URL]);
    let idle = scrape()?;
    assert!(
        idle.contains("fleet_rollback_agents_online 2"),
        "both packaged agents counted:\n{idle}"
    );
    let (rolled, during) = std::thread::scope(|s| -> Result<_> {
        let rollback = s.spawn(|| {
            fleet.rollback_web(&[
                "--to-snapshot",
                "latest",
                "--reason",
                "bad deploy on the packaged fleet",
            ])
        });
        // The rollback itself, not the diagnose run its `--to-snapshot` plan starts with.
        let rollback_job = |page: &str| -> Option<String> {
            let line = page.lines().find(|l| {
                l.starts_with("fleet_rollback_job_hosts{job=\"")
                    && !l.contains("procedure=\"diagnose\"")
            })?;
            let id = line.split('"').nth(1)?.to_string();
            page.contains(&format!("fleet_rollback_job_runs{{job=\"{id}\""))
                .then_some(id)
        };
        let mut seen = None;
        while seen.is_none() && !rollback.is_finished() {
            let page = scrape()?;
            if let Some(id) = rollback_job(&page) {
                seen = Some((id, page));
            } else {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let rolled = rollback
            .join()
            .map_err(|_| anyhow::anyhow!("the rollback thread panicked"))??;
        Ok((rolled, seen))
    })?;
    let (ok, text) = rolled;
    let (shown, during) = during.with_context(|| {
        format!("no scrape during the rollback showed its runs; the rollback said:\n{text}")
    })?;
    assert!(
        during.contains("fleet_rollback_jobs{state=\"running\"} 1"),
        "{during}"
    );
    assert!(
        during.contains("fleet_rollback_job_hosts{job=\""),
        "the running job's hosts: {during}"
    );
    assert!(
        ok,
        "{text}\ncoordinator journal:\n{}",
        journal(&lab, &db, COORDINATOR_UNIT)
    );
    let record = fleet.latest_job()?;
    assert_eq!(record["state"], "succeeded", "{record}");
    let job_id = record["job_id"].as_str().unwrap_or_default();
    assert_eq!(shown, job_id, "the page showed this job: {during}");
    let after = scrape()?;
    assert!(
        after.contains("fleet_rollback_jobs_finished_total{state=\"succeeded\"} ")
            && after.contains("fleet_rollback_jobs{state=\"running\"} 0"),
        "{after}"
    );
    assert!(
        after.contains("fleet_rollback_step_duration_seconds_count{action=\"service.stop\"} "),
        "{after}"
    );
    assert_eq!(outcomes(&record).len(), apps.len(), "{record}");
    assert!(
        outcomes(&record).iter().all(|(_, o)| o == "succeeded"),
        "{record}"
    );
    assert_healthy(&lab, "0002")?;

    // Installed files: binaries root's and 0755, configs with keys not world-readable, the
    // store in the coordinator's state directory.
    assert_eq!(
        owner_and_mode(&lab, &db, "/usr/bin/rollback-coordinator")?,
        "755 root root"
    );
    assert_eq!(
        owner_and_mode(&lab, &db, "/var/lib/fleet-rollback")?,
        format!("750 {COORDINATOR_USER} {COORDINATOR_USER}")
    );
    lab.run(
        &db,
        &["test", "-s", "/var/lib/fleet-rollback/coordinator.sqlite"],
    )
    .context("the coordinator's SQLite store in its state directory")?;
    for host in &apps {
        assert_eq!(
            owner_and_mode(&lab, host, "/usr/bin/rollback-agent")?,
            "755 root root"
        );
        for file in ["agent.toml", "agent.key"] {
            assert_eq!(
                owner_and_mode(&lab, host, &format!("{CONFIG_DIR}/{file}"))?,
                "600 root root",
                "{host}: {file}"
            );
        }
    }

    // The coordinator runs as its system user, and a reload (SIGHUP) keeps the same process.
    let pid = main_pid(&lab, &db, COORDINATOR_UNIT)?;
    let uid = lab
        .run(&db, &["id", "-u", COORDINATOR_USER])?
        .trim()
        .to_string();
    let status = String::from_utf8(lab.read_file(&db, &format!("/proc/{pid}/status"))?)?;
    let uids: Vec<&str> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .context("no Uid: line")?
        .split_whitespace()
        .collect();
    assert!(
        uids.len() == 4 && uids.iter().all(|u| *u == uid),
        "the coordinator runs as {COORDINATOR_USER} (uid {uid}), not {uids:?}"
    );
    // The sandbox is really in force, not only written down: no new privileges, a seccomp
    // filter, and no capabilities at all.
    let field = |name: &str| -> Result<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("no {name} line in the coordinator's status"))
    };
    assert_eq!(field("NoNewPrivs:")?, "1");
    assert_eq!(field("Seccomp:")?, "2", "a seccomp filter");
    assert_eq!(field("CapBnd:")?, "0000000000000000", "no capabilities");
    lab.run(&db, &["systemctl", "reload", COORDINATOR_UNIT])?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    wait_active(&lab, &db, COORDINATOR_UNIT)?;
    assert_eq!(
        main_pid(&lab, &db, COORDINATOR_UNIT)?,
        pid,
        "reload is not a restart"
    );
    eventually(
        "the reload is logged",
        std::time::Duration::from_secs(30),
        || {
            let log = journal(&lab, &db, COORDINATOR_UNIT);
            ensure!(log.contains("configuration reloaded"), "not yet:\n{log}");
            Ok(())
        },
    );

    // The agent unit as installed: steps delegated to cgroups of their own, killed with it.
    for host in &apps {
        let props = lab.run(
            host,
            &[
                "systemctl",
                "show",
                "--property=Delegate",
                "--property=KillMode",
                AGENT_UNIT,
            ],
        )?;
        assert!(
            props.lines().any(|l| l == "Delegate=yes")
                && props.lines().any(|l| l == "KillMode=control-group"),
            "{host}: {props}"
        );
        let pid = main_pid(&lab, host, AGENT_UNIT)?;
        let status = String::from_utf8(lab.read_file(host, &format!("/proc/{pid}/status"))?)?;
        for (name, want) in [("NoNewPrivs:", "1"), ("Seccomp:", "2")] {
            assert!(
                status
                    .lines()
                    .any(|l| l.strip_prefix(name).is_some_and(|v| v.trim() == want)),
                "{host}: the agent's {name} is not {want}:\n{status}"
            );
        }
        let log = journal(&lab, host, AGENT_UNIT);
        assert!(
            log.contains("each step runs in its own cgroup"),
            "{host}: the packaged agent contains its steps in cgroups:\n{log}"
        );
    }

    // The hardening, scored by systemd itself; a regression fails here.
    let agent = exposure(&lab, &apps[0], AGENT_UNIT)?;
    let coordinator = exposure(&lab, &db, COORDINATOR_UNIT)?;
    eprintln!("systemd-analyze security: {AGENT_UNIT} {agent}, {COORDINATOR_UNIT} {coordinator}");
    assert!(
        agent <= AGENT_EXPOSURE_MAX,
        "{AGENT_UNIT}: exposure {agent} > {AGENT_EXPOSURE_MAX}"
    );
    assert!(
        coordinator <= COORDINATOR_EXPOSURE_MAX,
        "{COORDINATOR_UNIT}: exposure {coordinator} > {COORDINATOR_EXPOSURE_MAX}"
    );
    Ok(())
}
