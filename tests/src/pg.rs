//! The suites' PostgreSQL: a throwaway PostgreSQL 15 cluster from the installed server
//! binaries (`Cluster`: initdb and postgres run as the `postgres` system user through setpriv,
//! since initdb refuses root; listening on 127.0.0.1 on a free port and a socket dir of its own; fsync off;
//! scram-sha-256 password auth for every connection, so the coordinator's password path is
//! the real one), which store a suite runs against (`backend`, from `ROLLBACK_TEST_STORE`),
//! and `StoreDb`, SQL run on a coordinator's store whichever it is, for tests that read or
//! tamper with it behind the coordinator's back.
//!
//! `cargo xtask test` starts one cluster for the whole PostgreSQL run and exports
//! `ROLLBACK_TEST_POSTGRES` (`postgres://fleet@127.0.0.1:PORT`) and
//! `ROLLBACK_TEST_POSTGRES_PASSWORD_FILE`; each coordinator a test starts gets a fresh
//! database of its own in it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::support::{Proc, eventually, write_private};

/// The server binaries (Debian's postgresql-15).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// `postgres` or `sqlite` (the default): the store every coordinator a test starts uses.
pub const STORE_ENV: &str = "ROLLBACK_TEST_STORE";
/// The shared cluster: `postgres://fleet@127.0.0.1:PORT` (no database, no password).
pub const URL_ENV: &str = "ROLLBACK_TEST_POSTGRES";
/// The file holding the cluster's password (mode 0600).
pub const PASSWORD_FILE_ENV: &str = "ROLLBACK_TEST_POSTGRES_PASSWORD_FILE";
/// The cluster's login role (a superuser: tests create and drop databases).
pub const USER: &str = "fleet";
/// The port a cluster started in a network namespace of its own listens on.
pub const LAB_PORT: u16 = 5432;

/// Which store the suites run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The store chosen by `ROLLBACK_TEST_STORE` (SQLite unless it says `postgres`).
pub fn backend() -> Backend {
    match std::env::var(STORE_ENV).as_deref() {
        Ok("postgres") => Backend::Postgres,
        _ => Backend::Sqlite,
    }
}

/// Whether the server binaries are installed.
pub fn available() -> bool {
    Path::new(PG_BIN).join("postgres").exists()
}

/// A running cluster the tests reach over TCP with a password.
#[derive(Debug, Clone)]
pub struct Server {
    pub port: u16,
    pub password_file: PathBuf,
    /// The network namespace the cluster listens in (`None`: this process's): psql is run
    /// there, so a cluster inside the lab is reached from inside the lab only.
    pub netns: Option<String>,
}

/// `program` (a path), run in `netns` when given (`nsenter --net`, which execs in place, so
/// the child is the program itself), else here.
fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => crate::lab::netns_command(ns, program),
        None => Command::new(program),
    }
}

impl Server {
    /// The cluster `cargo xtask test` started, from the environment; panics (naming what to
    /// do) when the suite was asked to run on PostgreSQL without one.
    pub fn from_env() -> Self {
        let (url, file) = (std::env::var(URL_ENV), std::env::var(PASSWORD_FILE_ENV));
        let (Ok(url), Ok(file)) = (url, file) else {
            panic!(
                "{STORE_ENV}=postgres needs a running cluster in {URL_ENV} and {PASSWORD_FILE_ENV}: run the suite with `cargo xtask test` (it starts one), or unset {STORE_ENV}"
            );
        };
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str(p.trim_end_matches('/')).ok())
            .unwrap_or_else(|| {
                panic!("{URL_ENV}={url}: expected postgres://{USER}@127.0.0.1:PORT")
            });
        Self {
            port,
            netns: None,
            password_file: PathBuf::from(file),
        }
    }

    /// The suites' cluster when one is running (`ROLLBACK_TEST_POSTGRES`), else a private one
    /// started in `dir` (kept alive by the returned `Cluster`); None when neither can be had
    /// (no server binaries, or not root) — an error under CI (`CI` / `ROLLBACK_LAB_REQUIRED`).
    pub fn shared_or_start(dir: &Path) -> Result<Option<(Self, Option<Cluster>)>> {
        if std::env::var(URL_ENV).is_ok() {
            return Ok(Some((Self::from_env(), None)));
        }
        let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
            || std::env::var("ROLLBACK_LAB_REQUIRED").is_ok_and(|v| v == "1");
        if !available() || !crate::support::is_root() {
            ensure!(
                !required,
                "PostgreSQL is required here (CI): install postgresql-15 and run as root"
            );
            return Ok(None);
        }
        let cluster = Cluster::start(&dir.join("postgres"))?;
        Ok(Some((cluster.server.clone(), Some(cluster))))
    }

    /// `postgres://fleet@127.0.0.1:PORT/DB`: what coordinator.toml's `database` says.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The cluster's password (what the tests look for wherever it must not be).
    pub fn password(&self) -> Result<String> {
        let text = std::fs::read_to_string(&self.password_file)
            .with_context(|| format!("reading {}", self.password_file.display()))?;
        Ok(text.trim_end().to_string())
    }

    /// Runs SQL with psql in `database` (the password in psql's environment, never its
    /// arguments); returns the unaligned, tuples-only output, or the server's error.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = command_in(self.netns.as_deref(), Path::new(PG_BIN).join("psql"))
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                "127.0.0.1",
            ])
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .env("PGPASSWORD", self.password()?)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    use std::io::Write;
                    stdin.write_all(sql.as_bytes())?;
                }
                child.wait_with_output()
            })
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql in {database}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates a fresh, uniquely named database.
    pub fn create_database(&self) -> Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "t_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(name)
    }

    /// Drops a database, closing whatever is still connected to it.
    pub fn drop_database(&self, name: &str) -> Result<()> {
        self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .map(|_| ())
    }
}

/// A cluster this process started; stopped (fast shutdown) when dropped.
#[derive(Debug)]
pub struct Cluster {
    pub server: Server,
    pub dir: PathBuf,
    proc: Proc,
}

/// `setpriv ... PROGRAM`: the server and initdb run as `postgres`. setpriv execs in place, so
/// the child is the program itself (signals reach the postmaster).
fn as_postgres(netns: Option<&str>, program: &str) -> Command {
    let mut cmd = command_in(netns, "setpriv");
    cmd.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ])
    .arg(Path::new(PG_BIN).join(program));
    cmd
}

fn random_password() -> Result<String> {
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl Cluster {
    /// Initializes a cluster in `dir` (which must not exist yet, on a path `postgres` can
    /// reach) and starts it; returns once it accepts connections.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_in(dir, None)
    }

    /// Like [`Cluster::start`], with the server (and every psql run on it) in network
    /// namespace `netns` when given, listening on that namespace's 127.0.0.1 at [`LAB_PORT`].
    pub fn start_in(dir: &Path, netns: Option<&str>) -> Result<Self> {
        ensure!(
            available(),
            "PostgreSQL 15 server binaries are not installed in {PG_BIN} (apt-get install postgresql-15)"
        );
        ensure!(
            crate::support::is_root(),
            "starting a PostgreSQL cluster for the tests needs root (initdb and postgres run as the `postgres` user)"
        );
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let data = dir.join("data");
        let socket = dir.join("socket");
        let password = random_password()?;
        let password_file = dir.join("password");
        write_private(&password_file, format!("{password}\n"))
            .with_context(|| format!("writing {}", password_file.display()))?;
        // initdb reads the superuser's password from a file the postgres user can read.
        let init_pw = dir.join("initdb-password");
        write_private(&init_pw, &password)?;
        for (path, mode) in [(&data, "700"), (&socket, "700")] {
            run(Command::new("install")
                .args(["-d", "-o", "postgres", "-g", "postgres", "-m", mode])
                .arg(path))?;
        }
        run(Command::new("chown").arg("postgres").arg(&init_pw))?;
        // Every directory above must let `postgres` through.
        let mut up = dir.to_path_buf();
        while let Some(parent) = up.parent() {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(parent)
                && meta.permissions().mode() & 0o001 == 0
            {
                bail!(
                    "{} is not searchable by others; the postgres user cannot reach {}",
                    parent.display(),
                    dir.display()
                );
            }
            up = parent.to_path_buf();
        }
        let init = as_postgres(netns, "initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", init_pw.display()))
            .output()
            .context("running initdb")?;
        let _ = std::fs::remove_file(&init_pw);
        ensure!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        // A namespace of the lab's own has nothing listening but what the lab starts.
        let port = match netns {
            Some(_) => LAB_PORT,
            None => free_port()?,
        };
        let mut cmd = as_postgres(netns, "postgres");
        cmd.arg("-D").arg(&data).args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            &format!("port={port}"),
            "-c",
            &format!("unix_socket_directories={}", socket.display()),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=400",
            "-c",
            "shared_buffers=32MB",
        ]);
        let proc = Proc::spawn(cmd, dir.join("postgres.log"))?;
        let server = Server {
            port,
            password_file,
            netns: netns.map(str::to_string),
        };
        let mut cluster = Self {
            server,
            dir: dir.to_path_buf(),
            proc,
        };
        let isready = Path::new(PG_BIN).join("pg_isready");
        eventually(
            "the test cluster accepts connections",
            Duration::from_secs(60),
            || {
                if let Some(status) = cluster.proc.exited()? {
                    bail!("postgres exited ({status}): {}", cluster.proc.log_text());
                }
                let out = command_in(netns, &isready)
                    .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                    .output()?;
                ensure!(out.status.success(), "not ready");
                Ok(())
            },
        );
        cluster.server.psql("postgres", "SELECT 1")?;
        Ok(cluster)
    }

    /// The environment that points the suites at this cluster.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (STORE_ENV, "postgres".into()),
            (
                URL_ENV,
                format!("postgres://{USER}@127.0.0.1:{}", self.server.port),
            ),
            (
                PASSWORD_FILE_ENV,
                self.server.password_file.display().to_string(),
            ),
        ]
    }

    /// Leaves the server running after this value is gone (`cargo xtask lab up`: the lab's
    /// teardown stops it with everything else in the lab's namespaces).
    pub fn leave_running(mut self) {
        self.proc.detach();
    }

    /// Fast shutdown (SIGINT), waited for.
    pub fn stop(&mut self) -> Result<()> {
        self.proc.interrupt(Duration::from_secs(30))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A coordinator's store, for SQL run behind its back.
#[derive(Debug, Clone)]
pub enum StoreDb {
    Sqlite(PathBuf),
    Postgres { server: Server, database: String },
}

impl StoreDb {
    /// Runs an SQL script (one or more statements); the database's error when it fails.
    pub fn exec(&self, script: &str) -> Result<()> {
        match self {
            StoreDb::Sqlite(path) => with_sqlite(path, async |pool| {
                sqlx::raw_sql(script)
                    .execute(pool)
                    .await
                    .with_context(|| format!("running {script}"))?;
                Ok(())
            }),
            StoreDb::Postgres { server, database } => server.psql(database, script).map(|_| ()),
        }
    }

    /// One number from a query.
    pub fn count(&self, query: &str) -> Result<i64> {
        match self {
            StoreDb::Sqlite(path) => with_sqlite(path, async |pool| {
                sqlx::query_scalar(query)
                    .fetch_one(pool)
                    .await
                    .with_context(|| format!("running {query}"))
            }),
            StoreDb::Postgres { server, database } => {
                let out = server.psql(database, query)?;
                out.parse()
                    .with_context(|| format!("{query} gave `{out}`, not a number"))
            }
        }
    }

    /// A BLOB/BYTEA literal of `hex` (lowercase hex digits) in the store's dialect.
    pub fn blob(&self, hex: &str) -> String {
        match self {
            StoreDb::Sqlite(_) => format!("X'{hex}'"),
            StoreDb::Postgres { .. } => format!("decode('{hex}', 'hex')"),
        }
    }

    /// Makes the store refuse to insert audit records (those of `action` only, when given)
    /// with `message`, until `allow_audit(name)`: a trigger, in each database's dialect.
    pub fn refuse_audit(&self, name: &str, action: Option<&str>, message: &str) -> Result<()> {
        let script = match self {
            StoreDb::Sqlite(_) => {
                let when = action
                    .map(|a| format!("WHEN NEW.action = '{a}'"))
                    .unwrap_or_default();
                format!(
                    "CREATE TRIGGER {name} BEFORE INSERT ON audit_events {when}
                     BEGIN SELECT RAISE(ABORT, '{message}'); END;"
                )
            }
            StoreDb::Postgres { .. } => {
                let when = action
                    .map(|a| format!("WHEN (NEW.action = '{a}')"))
                    .unwrap_or_default();
                format!(
                    "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN RAISE EXCEPTION '{message}'; END $$;
                     CREATE TRIGGER {name} BEFORE INSERT ON audit_events FOR EACH ROW {when}
                     EXECUTE FUNCTION {name}();"
                )
            }
        };
        self.exec(&script)
    }

    /// Removes a trigger made by `refuse_audit`.
    pub fn allow_audit(&self, name: &str) -> Result<()> {
        match self {
            StoreDb::Sqlite(_) => self.exec(&format!("DROP TRIGGER {name}")),
            StoreDb::Postgres { .. } => self.exec(&format!(
                "DROP TRIGGER {name} ON audit_events; DROP FUNCTION {name}();"
            )),
        }
    }

    /// Drops one of the schema's own triggers on `audit_events` (what someone with write
    /// access to the store can do).
    pub fn drop_audit_trigger(&self, name: &str) -> Result<()> {
        match self {
            StoreDb::Sqlite(_) => self.exec(&format!("DROP TRIGGER {name}")),
            StoreDb::Postgres { .. } => self.exec(&format!("DROP TRIGGER {name} ON audit_events")),
        }
    }
}

fn with_sqlite<T>(db: &Path, f: impl AsyncFnOnce(&sqlx::SqlitePool) -> Result<T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::from_str("sqlite://")?
                .filename(db)
                .busy_timeout(Duration::from_secs(10)),
        )
        .await
        .with_context(|| format!("opening {}", db.display()))?;
        let out = f(&pool).await;
        pool.close().await;
        out
    })
}
