//! The database host's PostgreSQL 15 cluster: initdb as `postgres` (initdb refuses root),
//! run by the db host's systemd as `lab-postgres.service`, listening on the host's lab
//! address; trust auth, fsync off. It lives in the host's overlay and dies with the host.

use anyhow::{Context, Result};

use super::fleet::Lab;
use super::poll::{self, Check};

/// Server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The cluster's unit on the db host.
pub const PG_UNIT: &str = "lab-postgres.service";
/// Data directory on the db host.
pub const PG_DATA: &str = "/var/lib/rollback-lab/postgres";
pub const PG_PORT: u16 = 5432;
/// The app's database.
pub const APP_DB: &str = "app";
const HBA_FILE: &str = "/etc/rollback-lab/pg_hba.conf";

/// Initializes, starts and waits for the cluster, then creates the app's database.
pub fn setup(lab: &Lab) -> Result<()> {
    let db = lab.db_host()?;
    let (id, addr) = (db.id().to_string(), db.addr());
    lab.run(
        &id,
        &[
            "install", "-d", "-o", "postgres", "-g", "postgres", "-m", "700", PG_DATA,
        ],
    )?;
    let initdb = format!("{PG_BIN}/initdb");
    lab.run(
        &id,
        &[
            "runuser",
            "-u",
            "postgres",
            "--",
            &initdb,
            "-D",
            PG_DATA,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ],
    )
    .context("initializing the lab's PostgreSQL cluster")?;
    let hba = format!(
        "# fleet lab: trust everything local and on the lab subnet\nlocal all all trust\nhost all all 127.0.0.1/32 trust\nhost all all {} trust\n",
        lab.subnet()
    );
    lab.write_file(&id, HBA_FILE, hba.as_bytes(), 0o644)?;
    let unit = format!(
        "[Unit]\nDescription=PostgreSQL 15 cluster of the fleet lab\n\n[Service]\nType=notify\nUser=postgres\n\
         RuntimeDirectory=lab-postgres\nExecStart={PG_BIN}/postgres -D {PG_DATA} -c listen_addresses={addr},127.0.0.1 \
         -c port={PG_PORT} -c unix_socket_directories=/run/lab-postgres -c hba_file={HBA_FILE} -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off\nKillMode=mixed\nKillSignal=SIGINT\nTimeoutSec=30\n\n\
         [Install]\nWantedBy=multi-user.target\n"
    );
    lab.install_unit(&id, PG_UNIT, &unit)?;
    lab.start_unit(&id, PG_UNIT)?;
    let isready = format!("{PG_BIN}/pg_isready");
    let host = addr.to_string();
    let port = PG_PORT.to_string();
    poll::until(
        format!("host {id}: PostgreSQL to accept connections"),
        lab.timeout,
        || {
            let out = lab.exec(&id, &[&isready, "-h", &host, "-p", &port, "-U", "postgres"])?;
            Ok(if out.status.success() {
                Check::Done(())
            } else {
                Check::Pending(String::from_utf8_lossy(&out.stdout).trim().to_string())
            })
        },
    )?;
    let createdb = format!("{PG_BIN}/createdb");
    lab.run(
        &id,
        &[
            &createdb,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            APP_DB,
        ],
    )?;
    Ok(())
}

impl Lab {
    /// libpq URL of the app's database, reachable from every lab host.
    pub fn database_url(&self) -> Result<String> {
        Ok(format!(
            "postgresql://postgres@{}:{PG_PORT}/{APP_DB}",
            self.db_host()?.addr()
        ))
    }

    /// Runs one SQL statement in the app's database (psql on the db host); returns the
    /// unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let psql = format!("{PG_BIN}/psql");
        let port = PG_PORT.to_string();
        let db = self.db_host()?.id().to_string();
        self.run(
            &db,
            &[
                &psql,
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                APP_DB,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
        )
    }

    /// The app database's schema revision (`alembic_version`), or None before any migration.
    pub fn schema_revision(&self) -> Result<Option<String>> {
        let exists = self.psql("SELECT to_regclass('public.alembic_version') IS NOT NULL")?;
        if exists.trim() != "t" {
            return Ok(None);
        }
        let rev = self.psql("SELECT version_num FROM alembic_version")?;
        Ok(Some(rev.trim().to_string()).filter(|r| !r.is_empty()))
    }
}
