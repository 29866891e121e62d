//! Fleet lab suites: a real lab (hosts with their own systemd on a private bridge, PostgreSQL,
//! the sample app) boots, serves, breaks each way the runbook describes, and leaves nothing
//! behind — after teardown, after a panicking test, and after a run killed mid-way.
//! Without root these print one skip line and pass (unless `ROLLBACK_LAB_REQUIRED=1`).

use std::process::Stdio;
use std::sync::mpsc;
use std::thread;

use anyhow::{Context, Result, ensure};
use rollback_tests::lab::{
    self, APP_DIR, APP_UNIT, BreakageKind, Footprint, Lab, LabSpec, NEXT_RELEASE_DIR,
};

fn assert_gone(footprint: &Footprint) {
    let left = footprint.leftovers();
    assert!(
        left.is_empty(),
        "lab {} left: {}",
        footprint.name(),
        left.join("; ")
    );
}

fn ready_hosts(lab: &Lab) -> Result<Vec<(String, u16)>> {
    lab.app_host_ids()
        .into_iter()
        .map(|h| Ok((h.clone(), lab.readyz(&h)?.status)))
        .collect()
}

/// One booted 3+1 lab, many checks: boot, reachability, units, alembic, backup, each breaking
/// helper (hitting only its targets, reversible by the runbook's steps), agent-style units
/// and files, the coordinator namespace, teardown.
#[test]
fn fleet_lab_boots_serves_and_breaks_each_runbook_way() -> Result<()> {
    let Some(mut lab) = lab::boot_or_skip(LabSpec::new("t-fleet"))? else {
        return Ok(());
    };

    // Hosts: 3 app hosts + db, each its own hostname and address on the lab subnet.
    let ids: Vec<&str> = lab.hosts().iter().map(|h| h.id()).collect();
    assert_eq!(ids, ["db", "app1", "app2", "app3"]);
    for host in lab.hosts() {
        assert_eq!(lab.run(host.id(), &["hostname"])?.trim(), host.id());
        let prefix = lab.subnet().trim_end_matches("0/24").to_string();
        assert!(host.addr().to_string().starts_with(&prefix), "{host:?}");
        assert_eq!(lab.unit_state(host.id(), "basic.target")?, "active");
    }

    // From one host, another host's /healthz answers over the bridge.
    let health = lab.http_get("app1", &lab.app_url("app2", "/healthz")?)?;
    assert_eq!(health.status, 200, "{health:?}");
    assert!(health.body.contains("release=v2"), "{health:?}");

    // The app runs under each host's systemd and is ready; alembic sees the head revision.
    for host in lab.app_host_ids() {
        assert_eq!(lab.unit_state(&host, "app")?, "active", "{host}");
        assert_eq!(lab.readyz(&host)?.status, 200, "{host}");
        assert_eq!(lab.app_release(&host)?, "v2");
        assert_eq!(lab.app_head(&host)?, lab.release_commit("v2")?);
    }
    let current = lab.alembic("app1", &["current"])?;
    let current_text = String::from_utf8_lossy(&current.stdout);
    assert!(current.status.success(), "{current:?}");
    assert_eq!(current_text.trim(), "0002 (head)");
    assert_eq!(lab.schema_revision()?.as_deref(), Some("0002"));
    assert_eq!(lab.psql("SELECT count(*) FROM incidents")?.trim(), "3");

    // A backup before breaking anything: a pg_dump custom-format archive on the db host.
    let backup = lab.backup_database()?;
    assert_eq!(backup.host, "db");
    let dump = lab.read_file(&backup.host, &backup.path)?;
    assert!(
        dump.starts_with(b"PGDMP"),
        "{} is not a pg_dump -Fc archive",
        backup.path
    );

    // Option 3: bad config on app1 only.
    let env_path = format!("{APP_DIR}/.env");
    let good_env = lab.read_file("app1", &env_path)?;
    let broken = lab.bad_config(&["app1"])?;
    assert_eq!(broken.kind, BreakageKind::Config);
    assert_eq!(broken.hosts, ["app1"]);
    let not_ready = lab.readyz("app1")?;
    assert_eq!(not_ready.status, 503);
    assert!(
        not_ready.body.contains("DATABASE_URL"),
        "{}",
        not_ready.body
    );
    assert_eq!(lab.healthz("app1")?.status, 200, "the app still serves");
    assert_eq!(
        lab.read_file("app1", &format!("{APP_DIR}/.env.backup"))?,
        good_env
    );
    assert_eq!(
        ready_hosts(&lab)?,
        [
            ("app1".into(), 503),
            ("app2".into(), 200),
            ("app3".into(), 200)
        ]
    );
    lab.run(
        "app1",
        &["cp", &format!("{APP_DIR}/.env.backup"), &env_path],
    )?;
    lab.restart_unit("app1", APP_UNIT)?;
    lab.wait_ready("app1")?;

    // Option 2: bad release on app2 only.
    let broken = lab.bad_release(&["app2"])?;
    assert_eq!(broken.kind, BreakageKind::Release);
    let not_ready = lab.readyz("app2")?;
    assert_eq!(not_ready.status, 503);
    assert!(
        not_ready.body.contains("expects 0003"),
        "{}",
        not_ready.body
    );
    assert_eq!(lab.app_head("app2")?, lab.release_commit("v3")?);
    assert_eq!(
        ready_hosts(&lab)?,
        [
            ("app1".into(), 200),
            ("app2".into(), 503),
            ("app3".into(), 200)
        ]
    );
    lab.run_as_app("app2", &["git", "-C", APP_DIR, "checkout", "-q", "v2"])?;
    lab.restart_unit("app2", APP_UNIT)?;
    lab.wait_ready("app2")?;

    // Option 1: bad migration, shared database: every app host.
    let broken = lab.bad_migration()?;
    assert_eq!(broken.kind, BreakageKind::Migration);
    assert_eq!(broken.hosts, lab.app_host_ids());
    assert_eq!(lab.schema_revision()?.as_deref(), Some("0003"));
    for (host, status) in ready_hosts(&lab)? {
        assert_eq!(status, 503, "{host}");
    }
    assert!(lab.readyz("app3")?.body.contains("schema revision is 0003"));
    let alembic = lab.venv().join("bin/alembic");
    lab.command("app1", &alembic.to_string_lossy())?
        .current_dir(NEXT_RELEASE_DIR)
        .env("DATABASE_URL", &lab.database_url()?)
        .args(["downgrade", "-1"])
        .run()?;
    for host in lab.app_host_ids() {
        lab.wait_ready(&host)?;
    }

    // What the agent integration will use: files and units inside a host.
    lab.write_file(
        "app3",
        "/etc/rollback/agent.toml",
        b"host = \"app3\"\n",
        0o600,
    )?;
    assert_eq!(
        lab.read_file("app3", "/etc/rollback/agent.toml")?,
        b"host = \"app3\"\n"
    );
    lab.install_unit(
        "app3",
        "lab-probe.service",
        "[Service]\nExecStart=/bin/sleep infinity\n",
    )?;
    lab.start_unit("app3", "lab-probe.service")?;
    assert_eq!(lab.unit_state("app3", "lab-probe.service")?, "active");

    // The coordinator's namespace: a server there is reachable from the hosts.
    let python = lab.venv().join("bin/python");
    let addr = lab.coordinator_addr().to_string();
    let python = python.to_string_lossy();
    let server = [
        python.as_ref(),
        "-m",
        "http.server",
        "9000",
        "--bind",
        &addr,
    ];
    let mut child = lab
        .coordinator_command(server[0])
        .args(&server[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let from_host = lab.wait_http_status("db", &format!("http://{addr}:9000/"), 200);
    let still_running = child.try_wait()?.is_none();
    from_host.context("coordinator namespace server from the db host")?;
    ensure!(still_running, "the coordinator-namespace server exited");

    // Teardown removes everything, including the server left running in the coordinator ns.
    let footprint = lab.footprint();
    lab.teardown()?;
    child.wait()?;
    assert_gone(&footprint);
    lab.teardown()?; // idempotent
    Ok(())
}

/// A test that panics with a lab up leaves nothing: Drop tears it down during unwinding.
#[test]
fn fleet_lab_left_by_a_panicking_test_is_gone() -> Result<()> {
    let spec = LabSpec::new("t-panic").app_hosts(1);
    if lab::check_prerequisites().is_err() || lab::locate_venv().is_err() {
        // Reports the skip (or fails when the lab is required).
        return lab::boot_or_skip(spec).map(drop);
    }
    let (tx, rx) = mpsc::channel();
    let scenario = thread::spawn(move || {
        let lab = Lab::boot(spec).expect("lab boots");
        assert_eq!(
            lab.unit_state("db", "lab-postgres.service")
                .expect("db unit"),
            "active"
        );
        tx.send(lab.footprint()).expect("send footprint");
        panic!("deliberate panic with lab t-panic up");
    });
    assert!(scenario.join().is_err(), "the scenario was meant to panic");
    let footprint = rx.recv().context("the scenario did not boot its lab")?;
    assert_gone(&footprint);
    Ok(())
}

/// A run killed before teardown (simulated with `keep_running`) leaves a lab that the next
/// start of the same name removes before booting afresh.
#[test]
fn fleet_lab_left_by_a_killed_run_is_removed_at_next_start() -> Result<()> {
    let spec = LabSpec::new("t-stale").app_hosts(1).bare();
    let Some(stale) = lab::boot_or_skip(spec.clone())? else {
        return Ok(());
    };
    let stale_footprint = stale.footprint();
    let stale_systemd = stale
        .host("app1")?
        .systemd_process()
        .context("stale systemd")?;
    stale.keep_running();
    assert!(stale_systemd.is_running(), "the stale lab is up");

    let mut fresh = Lab::boot(spec)?;
    assert!(
        !stale_systemd.is_running(),
        "the stale lab's systemd was stopped"
    );
    assert_ne!(fresh.host("app1")?.systemd_process(), Some(stale_systemd));
    assert_eq!(fresh.run("app1", &["hostname"])?.trim(), "app1");
    let footprint = fresh.footprint();
    fresh.teardown()?;
    assert_gone(&footprint);
    assert_gone(&stale_footprint);
    Ok(())
}
