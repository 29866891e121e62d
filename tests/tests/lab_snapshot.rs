//! Acceptance for last known good, end to end in the fleet lab: a snapshot before a bad
//! deployment, `diagnose` naming every change with old and new values and the runbook
//! procedure for it, `rollback --to-snapshot latest` bringing every host back exactly (git
//! HEAD, `alembic current`, env bytes, unit active, /readyz), a host where only `.env` changed
//! diagnosed `configuration` alone, and the backup gate refusing a corrupt backup before any
//! service is stopped.
//! Without root this prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`).

use anyhow::{Result, ensure};
use rollback_tests::lab::{self, APP_DIR, BACKUP_DIR, LabSpec};
use rollback_tests::lab_fleet::LabFleet;
use serde_json::Value;

fn json(fleet: &LabFleet, args: &[&str]) -> Result<(bool, Value, String)> {
    let mut all = vec!["--output", "json"];
    all.extend(args);
    let out = fleet.rollbackctl(&all)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok((out.status.success(), doc, stderr))
}

fn host<'a>(diag: &'a Value, id: &str) -> &'a Value {
    diag["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["host_id"] == id))
        .unwrap_or(&Value::Null)
}

#[test]
fn snapshot_diagnose_and_roll_back_to_the_last_known_good() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-snap"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let good_sha = lab.release_commit("v2")?;
    let good_env: Vec<Vec<u8>> = hosts
        .iter()
        .map(|h| lab.read_file(h, &format!("{APP_DIR}/.env")))
        .collect::<Result<_>>()?;

    let (ok, snap, err) = json(
        &fleet,
        &[
            "snapshot",
            "--select",
            "role=web",
            "--label",
            "before v3",
            "--db-backup",
        ],
    )?;
    assert!(ok, "{err}");
    let snapshot_id = snap["snapshot_id"].as_str().unwrap_or_default().to_string();
    let parts = snap["hosts"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        parts.len(),
        4,
        "three app hosts and the db host's backup: {snap}"
    );
    let db = parts
        .iter()
        .find(|p| p["host_id"] == "db")
        .expect("db part");
    assert!(
        db["db_backup"]
            .as_str()
            .is_some_and(|b| b.ends_with(".dump")),
        "verified pg_dump recorded: {db}"
    );
    let (_, listed, _) = json(&fleet, &["snapshots", "--select", "role=web"])?;
    assert_eq!(listed.as_array().map(Vec::len), Some(3));

    // A bad deployment of every kind on every app host.
    lab.bad_config(&refs)?;
    lab.bad_migration()?;
    lab.bad_release(&refs)?;
    let bad_sha = lab.release_commit("v3")?;

    let (ok, diag, err) = json(&fleet, &["diagnose", "--select", "role=web"])?;
    assert!(ok, "{err}");
    for h in &hosts {
        let d = host(&diag, h);
        assert_eq!(
            d["snapshot_id"],
            snapshot_id.as_str(),
            "{h} compared with the snapshot just taken"
        );
        assert_eq!(
            d["procedures"],
            serde_json::json!(["database", "application", "configuration"]),
            "{h}: {d}"
        );
        let changes = d["changes"].as_array().cloned().unwrap_or_default();
        let change = |what: &str| {
            changes
                .iter()
                .find(|c| c["what"] == what)
                .cloned()
                .unwrap_or(Value::Null)
        };
        assert_eq!(
            (
                change("schema")["old"].clone(),
                change("schema")["new"].clone()
            ),
            ("0002".into(), "0003".into()),
            "{h}"
        );
        assert_eq!(
            (change("code")["old"].clone(), change("code")["new"].clone()),
            (good_sha.clone().into(), bad_sha.clone().into()),
            "{h}"
        );
        assert!(change("config")["old"] != change("config")["new"], "{h}");
        assert!(
            d["command"]
                .as_str()
                .is_some_and(|c| c.contains("--to-snapshot")),
            "{d}"
        );
    }
    assert!(
        diag["command"].as_str().is_some_and(
            |c| c.starts_with("rollbackctl rollback --to-snapshot latest --select role=web")
        ),
        "{diag}"
    );

    let out = fleet.rollbackctl(&[
        "rollback",
        "--yes",
        "--to-snapshot",
        "latest",
        "--select",
        "role=web",
        "--reason",
        "bad v3 deploy",
    ])?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (h, env) in hosts.iter().zip(&good_env) {
        assert_eq!(lab.app_head(h)?, good_sha, "{h} git HEAD");
        assert_eq!(
            &lab.read_file(h, &format!("{APP_DIR}/.env"))?,
            env,
            "{h} env bytes equal the snapshot's"
        );
        assert_eq!(lab.unit_state(h, "app")?, "active", "{h} unit");
        assert_eq!(lab.readyz(h)?.status, 200, "{h} /readyz");
    }
    assert_eq!(
        lab.schema_revision()?.as_deref(),
        Some("0002"),
        "alembic current equals the snapshot's"
    );

    // Only .env changed on one host: configuration alone.
    lab.bad_config(&["app2"])?;
    let (_, diag, _) = json(&fleet, &["diagnose", "--select", "role=web"])?;
    assert_eq!(
        host(&diag, "app2")["procedures"],
        serde_json::json!(["configuration"]),
        "{diag}"
    );
    assert_eq!(
        host(&diag, "app1")["procedures"],
        serde_json::json!([]),
        "{diag}"
    );
    assert!(
        host(&diag, "app2")["command"]
            .as_str()
            .is_some_and(|c| c.contains("--procedure configuration --select host=app2"))
    );
    let out = fleet.rollbackctl(&["diagnose", "--select", "role=web"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("app2 — configuration") && text.contains("run: rollbackctl rollback"),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_corrupt_backup_is_refused_before_anything_is_stopped() -> Result<()> {
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-gate"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    lab.backup_database()?;
    let corrupt = "backup_20260101_000000.dump";
    lab.write_file(
        "db",
        &format!("{BACKUP_DIR}/{corrupt}"),
        b"PGDMP this is not really an archive",
        0o600,
    )?;
    let jobs_before = fleet.rollbackctl(&["jobs", "--output", "json"])?.stdout;

    for backup in [corrupt, "backup_missing.dump"] {
        let out = fleet.rollbackctl(&[
            "rollback",
            "--yes",
            "--procedure",
            "database-restore",
            "--backup",
            backup,
            "--select",
            "role=web",
            "--reason",
            "gate test",
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "refused: {stderr}");
        assert!(
            stderr.contains("backup gate") && stderr.contains("nothing was stopped"),
            "{stderr}"
        );
        assert!(
            stderr.contains("db") && stderr.contains(backup),
            "names the host and the file: {stderr}"
        );
    }
    for h in lab.app_host_ids() {
        assert_eq!(
            lab.unit_state(&h, "app")?,
            "active",
            "{h} was never stopped"
        );
        assert_eq!(lab.readyz(&h)?.status, 200);
    }
    ensure!(
        fleet.rollbackctl(&["jobs", "--output", "json"])?.stdout == jobs_before,
        "no job was started"
    );
    Ok(())
}
