//! Breaking a deployment each way the rollback runbook describes — a migration the running
//! code does not expect, a bad release, a bad `.env` — and taking the database backup the
//! runbook asks for beforehand. Each helper returns which app hosts it broke and waits until
//! their `/readyz` fails.

use anyhow::{Context, Result, bail};

use super::app::{APP_DIR, APP_UNIT, NEXT_RELEASE, good_env, origin_in_hosts, release};
use super::fleet::Lab;
use super::postgres::{APP_DB, PG_BIN, PG_PORT};

/// Where [`Lab::bad_migration`] checks out the next release to run its migrations (it stays,
/// so `alembic downgrade -1` can be run there: the deployed release lacks that script).
pub const NEXT_RELEASE_DIR: &str = "/srv/app-next";
/// Backup directory on the database host.
pub const BACKUP_DIR: &str = "/var/backups/app-db";

/// The runbook's failure kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakageKind {
    /// Option 1: the database was migrated past what the running code expects.
    Migration,
    /// Option 2: a release whose code does not fit (expects another schema).
    Release,
    /// Option 3: a broken `.env` (the good one kept as `.env.backup`).
    Config,
}

/// What a breaking helper did.
#[derive(Debug, Clone)]
pub struct Breakage {
    pub kind: BreakageKind,
    /// App hosts whose /readyz now fails (the others are untouched).
    pub hosts: Vec<String>,
    pub detail: String,
}

/// A database dump taken with `pg_dump -Fc`.
#[derive(Debug, Clone)]
pub struct Backup {
    /// Host holding the dump (the database host).
    pub host: String,
    /// Path of the dump on that host.
    pub path: String,
}

impl Lab {
    /// Option 1: runs the next release's migrations (`alembic upgrade head` in a checkout of
    /// it at [`NEXT_RELEASE_DIR`] on the first app host). Targets every app host: they share
    /// the database and run code expecting the previous revision.
    pub fn bad_migration(&self) -> Result<Breakage> {
        let hosts = self.app_host_ids();
        let Some(from) = hosts.first() else {
            bail!("lab {}: no app host", self.name())
        };
        let next = release(NEXT_RELEASE)?;
        self.run(from, &["rm", "-rf", NEXT_RELEASE_DIR])?;
        self.run(
            from,
            &[
                "git",
                "clone",
                "-q",
                "--branch",
                next.tag,
                &origin_in_hosts(),
                NEXT_RELEASE_DIR,
            ],
        )?;
        let alembic = self.venv().join("bin/alembic");
        self.command(from, &alembic.to_string_lossy())?
            .current_dir(NEXT_RELEASE_DIR)
            .env("DATABASE_URL", &self.database_url()?)
            .args(["upgrade", "head"])
            .run()
            .context("bad migration")?;
        for host in &hosts {
            self.wait_not_ready(host)?;
        }
        Ok(Breakage {
            kind: BreakageKind::Migration,
            detail: format!(
                "database migrated to {} by {from}:{NEXT_RELEASE_DIR} (release {}'s migrations); the app hosts' code expects the previous revision",
                next.schema_revision, next.tag
            ),
            hosts,
        })
    }

    /// Option 2: checks out the next release (expecting a newer schema) on `hosts` and
    /// restarts their app. Targets exactly `hosts`.
    pub fn bad_release(&self, hosts: &[&str]) -> Result<Breakage> {
        let next = release(NEXT_RELEASE)?;
        for host in hosts {
            self.run_as_app(host, &["git", "-C", APP_DIR, "checkout", "-q", next.tag])?;
            self.restart_unit(host, APP_UNIT)?;
        }
        for host in hosts {
            self.wait_not_ready(host)?;
        }
        Ok(Breakage {
            kind: BreakageKind::Release,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            detail: format!(
                "checked out release {} (expects schema {}) and restarted {APP_UNIT}",
                next.tag, next.schema_revision
            ),
        })
    }

    /// Deploys release `tag` (one of [`super::app::VARIANTS`], or any release) on `hosts`:
    /// checks it out as the app user and restarts the app. Waits for nothing: a crash-looping
    /// release never becomes ready.
    pub fn deploy_release(&self, hosts: &[&str], tag: &str) -> Result<()> {
        for host in hosts {
            self.run_as_app(host, &["git", "-C", APP_DIR, "checkout", "-q", tag])?;
            self.restart_unit(host, APP_UNIT)?;
        }
        Ok(())
    }

    /// Option 3: keeps the good `.env` as `.env.backup` (`cp -p`), writes a broken `.env`
    /// (empty DATABASE_URL, invalid feature flag) on `hosts` and restarts their app. Targets
    /// exactly `hosts`.
    pub fn bad_config(&self, hosts: &[&str]) -> Result<Breakage> {
        let env_path = format!("{APP_DIR}/.env");
        let backup_path = format!("{APP_DIR}/.env.backup");
        let broken = good_env(self)?
            .lines()
            .map(|l| match l.split_once('=') {
                Some(("DATABASE_URL", _)) => "DATABASE_URL=".to_string(),
                Some(("FEATURE_REPORTS", _)) => "FEATURE_REPORTS=maybe".to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        for host in hosts {
            self.run(host, &["cp", "-p", &env_path, &backup_path])?;
            self.write_file(host, &env_path, broken.as_bytes(), 0o600)?;
            self.restart_unit(host, APP_UNIT)?;
        }
        for host in hosts {
            self.wait_not_ready(host)?;
        }
        Ok(Breakage {
            kind: BreakageKind::Config,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            detail: format!(
                "wrote a broken {env_path} (good copy in {backup_path}) and restarted {APP_UNIT}"
            ),
        })
    }

    /// Takes `pg_dump -Fc` of the app database into [`BACKUP_DIR`] on the database host as
    /// `backup_YYYYMMDD_HHMMSS.dump` (the runbook's naming).
    pub fn backup_database(&self) -> Result<Backup> {
        let db = self.db_host()?.id().to_string();
        self.run(&db, &["install", "-d", "-m", "700", BACKUP_DIR])?;
        let stamp = self.run(&db, &["date", "-u", "+%Y%m%d_%H%M%S"])?;
        let mut path = format!("{BACKUP_DIR}/backup_{}.dump", stamp.trim());
        let mut n = 1;
        while self.exec(&db, &["test", "-e", &path])?.status.success() {
            n += 1;
            path = format!("{BACKUP_DIR}/backup_{}_{n}.dump", stamp.trim());
        }
        let pg_dump = format!("{PG_BIN}/pg_dump");
        let port = PG_PORT.to_string();
        self.run(
            &db,
            &[
                &pg_dump,
                "-Fc",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-f",
                &path,
                APP_DB,
            ],
        )
        .context("backing up the app database")?;
        Ok(Backup { host: db, path })
    }
}
