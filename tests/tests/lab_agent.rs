//! Acceptance for the agent's actions in the fleet lab, through `rollbackctl exec`, each
//! against the real thing with the end state asserted on the host: systemd units, alembic
//! against PostgreSQL, pg_restore of a real backup, the app's /readyz, the env file's bytes.
//! Without root this prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`).

use anyhow::{Result, ensure};
use rollback_tests::lab::{self, APP_DIR, APP_UNIT, LabSpec};
use rollback_tests::lab_fleet::{AGENT_CONFIG, AGENT_UNIT, LabFleet, MIGRATIONS_DIR};

fn alembic_current(lab: &lab::Lab, host: &str) -> Result<String> {
    let out = lab
        .command(host, &lab.venv().join("bin/alembic").to_string_lossy())?
        .current_dir(MIGRATIONS_DIR)
        .env("DATABASE_URL", &lab.database_url()?)
        .arg("current")
        .output()?;
    ensure!(
        out.status.success(),
        "alembic current on {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn error_of(doc: &serde_json::Value) -> String {
    doc["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn every_action_changes_the_real_host() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-agent"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    // Under the host's systemd (Delegate=yes), every step runs in a cgroup of its own.
    for host in ["app1", "db"] {
        let log = fleet.agent_log(host);
        assert!(
            log.contains("each step runs in its own cgroup"),
            "{host}: step containment is on:\n{log}"
        );
    }

    // Hello carried the host's real state.
    let agents = fleet.agents()?;
    let app1 = agents
        .iter()
        .find(|a| a["host_id"] == "app1")
        .expect("app1 listed");
    assert_eq!(
        app1["state"]["git_head_sha"],
        lab.app_head("app1")?.as_str()
    );
    assert_eq!(app1["state"]["unit_active_state"], "active");
    assert_eq!(app1["state"]["alembic_revision"], "0002");

    // service.*: systemctl is-active follows.
    fleet.exec_ok("app1", "service.stop", &[])?;
    assert_eq!(lab.unit_state("app1", "app")?, "inactive");
    let (_, doc) = fleet.exec(
        "app1",
        "http.check",
        &["endpoint=/healthz", "retries=1", "interval_ms=100"],
    )?;
    assert_eq!(
        doc["status"], "failed",
        "a stopped app fails its health check: {doc}"
    );
    fleet.exec_ok("app1", "service.start", &[])?;
    assert_eq!(lab.unit_state("app1", "app")?, "active");
    let doc = fleet.exec_ok("app1", "service.restart", &[])?;
    assert_eq!(doc["facts"]["active_state"], "active");
    // http.check retries until /readyz answers (the restarted app takes a moment to listen).
    let doc = fleet.exec_ok(
        "app1",
        "http.check",
        &["endpoint=/readyz", "retries=40", "interval_ms=250"],
    )?;
    assert_eq!(doc["facts"]["status"], "200");

    // git.checkout moves HEAD; file.restore makes .env byte-identical to its backup.
    lab.bad_release(&["app2"])?;
    let good = lab.release_commit("v2")?;
    let doc = fleet.exec_ok("app2", "git.checkout", &["revision=v2"])?;
    assert_eq!(lab.app_head("app2")?, good);
    assert_eq!(doc["facts"]["sha"], good.as_str());
    lab.bad_config(&["app3"])?;
    let (_, doc) = fleet.exec(
        "app3",
        "http.check",
        &["endpoint=/readyz", "retries=2", "interval_ms=100"],
    )?;
    assert!(
        error_of(&doc).contains("status 503"),
        "fails with the last status it saw: {doc}"
    );
    fleet.exec_ok("app3", "file.restore", &["file=env"])?;
    assert_eq!(
        lab.read_file("app3", &format!("{APP_DIR}/.env"))?,
        lab.read_file("app3", &format!("{APP_DIR}/.env.backup"))?
    );
    for host in ["app2", "app3"] {
        fleet.exec_ok(host, "service.restart", &[])?;
        fleet.exec_ok(
            host,
            "http.check",
            &["endpoint=/readyz", "retries=40", "interval_ms=250"],
        )?;
        assert_eq!(lab.readyz(host)?.status, 200, "{host}");
    }

    // postgres.restore brings back the backed-up rows.
    let backup = lab.backup_database()?;
    let name = backup
        .path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let count = |table: &str| {
        lab.psql(&format!("SELECT count(*) FROM {table}"))
            .map(|s| s.trim().to_string())
    };
    let (incidents, audits) = (count("incidents")?, count("audits")?);
    assert_ne!(incidents, "0");
    lab.psql("TRUNCATE incidents CASCADE")?;
    assert_eq!(count("incidents")?, "0");
    let doc = fleet.exec_ok("db", "postgres.restore", &[&format!("backup={name}")])?;
    assert_eq!(doc["facts"]["backup"], name.as_str());
    assert_eq!(count("incidents")?, incidents, "incident rows are back");
    assert_eq!(count("audits")?, audits, "audit rows are back");

    // alembic.downgrade changes `alembic current`.
    lab.bad_migration()?;
    let doc = fleet.exec_ok("app1", "alembic.current", &[])?;
    assert_eq!(doc["facts"]["revision"], "0003");
    let doc = fleet.exec_ok("app1", "alembic.downgrade", &["steps=1"])?;
    assert_eq!(doc["facts"]["revision"], "0002");
    assert_eq!(alembic_current(&lab, "app1")?, "0002");
    for host in lab.app_host_ids() {
        lab.wait_ready(&host)?;
    }

    // Failures explained: alembic at base, the database unreachable, a unit that does not exist.
    fleet.exec_ok("app1", "alembic.downgrade", &["to_revision=base"])?;
    let (ok, doc) = fleet.exec("app1", "alembic.downgrade", &["steps=1"])?;
    assert!(!ok && error_of(&doc).contains("already at base"), "{doc}");
    // There is no upgrade action (rollback only): put the schema back for the next checks.
    let out = lab.alembic("app1", &["upgrade", "head"])?;
    ensure!(
        out.status.success(),
        "alembic upgrade head: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    fleet.exec_ok("db", "service.stop", &[])?;
    let (ok, doc) = fleet.exec("app1", "alembic.current", &[])?;
    assert!(!ok && error_of(&doc).contains("unreachable"), "{doc}");
    fleet.exec_ok("db", "service.start", &[])?;

    let toml = String::from_utf8(lab.read_file("app3", AGENT_CONFIG)?)?;
    lab.write_file(
        "app3",
        AGENT_CONFIG,
        toml.replace(APP_UNIT, "no-such-app.service").as_bytes(),
        0o600,
    )?;
    lab.restart_unit("app3", AGENT_UNIT)?;
    fleet.wait_online(&["app3".to_string()])?;
    let (ok, doc) = fleet.exec("app3", "service.start", &[])?;
    assert!(
        !ok && error_of(&doc).contains("no-such-app.service does not exist"),
        "{doc}"
    );
    assert_eq!(
        lab.unit_state("app3", "app")?,
        "active",
        "the real unit was not touched"
    );
    Ok(())
}
