//! fleet-rollback itself under benchmark: the benchmark PKI (made with the real
//! `rollbackctl pki`, kept under `target/bench/pki` between runs), a release coordinator on
//! loopback with a benchmark runbook, and `rollbackctl` invocations.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rollback_tests::support::{self, CertFiles, Pki};

use super::sys::{self, Daemon};

pub const TRUST_DOMAIN: &str = "bench.test";
pub const OPERATOR: &str = "bench";

/// The bench times dispatch and execution, not the wait for a second person: its
/// coordinators ask no approval for any job (the product's default asks it of jobs over 50
/// hosts and of database actions).
const NO_APPROVAL: &str = "[approval]\nprocedures = []\nactions = []\nmax_hosts = 0\n";

/// The release binary `name` (the bench runs as target/release/xtask).
pub fn bin(name: &str) -> PathBuf {
    support::bin(name)
}

/// The benchmark CA, created once; certificates are issued only when missing.
pub fn pki(dir: &Path) -> Result<Pki> {
    if dir.join("ca.pem").exists() && dir.join("ca.key").exists() {
        return Ok(Pki {
            dir: dir.to_path_buf(),
            trust_domain: TRUST_DOMAIN.into(),
        });
    }
    let _ = std::fs::remove_dir_all(dir);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Pki::init(dir, TRUST_DOMAIN)
}

fn files(pki: &Pki, role: &str, name: &str) -> CertFiles {
    CertFiles {
        cert: pki.dir.join(role).join(format!("{name}.pem")),
        key: pki.dir.join(role).join(format!("{name}.key")),
    }
}

/// The certificate of `role`/`name`, issued with `rollbackctl pki` if missing.
pub fn cert(pki: &Pki, role: &str, name: &str) -> Result<CertFiles> {
    let f = files(pki, role, name);
    if f.cert.exists() && f.key.exists() {
        return Ok(f);
    }
    match role {
        "agent" => pki.agent(name),
        "operator" => pki.operator(name),
        _ => pki.coordinator(name, &["127.0.0.1", "localhost"]),
    }
}

/// A coordinator process on 127.0.0.1 (ephemeral port) with its config, store and log in `dir`.
#[derive(Debug)]
pub struct Coordinator {
    pub daemon: Daemon,
    pub url: String,
    pub ca: PathBuf,
    pub op: CertFiles,
}

/// The store a bench coordinator keeps its state in.
#[derive(Debug, Clone)]
pub enum Store {
    /// A fresh SQLite file in the coordinator's directory (the embedded default).
    Sqlite,
    /// A PostgreSQL database (`postgres://USER@HOST:PORT/DB`), shared by every coordinator
    /// given the same one; the password is read from `password_file`.
    Postgres { url: String, password_file: PathBuf },
}

impl Store {
    /// The coordinator.toml lines that select this store, for a coordinator named `name`.
    fn config_lines(&self, name: &str) -> String {
        match self {
            Store::Sqlite => "database = \"coordinator.sqlite\"\n".into(),
            Store::Postgres { url, password_file } => format!(
                "database = \"{url}\"\ndatabase_password_file = \"{}\"\nname = \"{name}\"\n",
                password_file.display()
            ),
        }
    }
}

impl Coordinator {
    /// Starts with a fresh SQLite store, the product's defaults (heartbeat 10 s) and
    /// `runbook`. `inventory` is appended to coordinator.toml as is (`[inventory."HOST"]`
    /// tables: the labels that target hosts).
    pub fn start(dir: &Path, pki: &Pki, runbook: &Path, inventory: &str) -> Result<Self> {
        Self::start_on(dir, pki, runbook, inventory, &Store::Sqlite, "bench")
    }

    /// Like [`Coordinator::start`], on `store`, named `name` (unique among the coordinators
    /// sharing a PostgreSQL store).
    pub fn start_on(
        dir: &Path,
        pki: &Pki,
        runbook: &Path,
        inventory: &str,
        store: &Store,
        name: &str,
    ) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let certs = cert(pki, "coordinator", "coordinator")?;
        let op = cert(pki, "operator", OPERATOR)?;
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n{}runbook = \"{}\"\n\
                 [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[operators]\n{OPERATOR} = \"admin\"\n{NO_APPROVAL}{inventory}",
                store.config_lines(name),
                runbook.display(),
                pki.ca().display(),
                certs.cert.display(),
                certs.key.display()
            ),
        )
        .context("writing coordinator config")?;
        let mut cmd = Command::new(bin("rollback-coordinator"));
        // `BENCH_COORDINATOR_LOG` replaces the coordinators' log filter for a look inside a
        // run, e.g. `info,sqlx::query=debug` logs every statement with its time (BENCHMARKS.md,
        // round eight); the figures are measured at `info`.
        let filter = std::env::var("BENCH_COORDINATOR_LOG").unwrap_or_else(|_| "info".into());
        cmd.arg("--config").arg(&config).env("ROLLBACK_LOG", filter);
        let mut daemon = Daemon::spawn(cmd, &dir.join("coordinator.log"), "rollback-coordinator")?;
        let log = daemon.log.clone();
        let addr = sys::wait_for(
            "coordinator listening",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                daemon.check_alive()?;
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Ok(text
                    .lines()
                    .find(|l| l.contains("coordinator listening"))
                    .and_then(|l| l.split("addr=Some(").nth(1))
                    .and_then(|s| s.split(')').next())
                    .map(String::from))
            },
        )?;
        Ok(Self {
            daemon,
            url: format!("https://{addr}"),
            ca: pki.ca(),
            op,
        })
    }

    /// A `rollbackctl` command with the operator's certificate against this coordinator.
    pub fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("rollbackctl"));
        cmd.arg("--coordinator")
            .arg(&self.url)
            .arg("--ca")
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.op.cert)
            .arg("--key")
            .arg(&self.op.key)
            .args(args)
            .env_remove("ROLLBACK_CONFIG")
            .env("HOME", "/nonexistent");
        cmd
    }

    /// How many agents matching `select` are online.
    pub fn online(&self, select: &str) -> Result<usize> {
        let out = sys::run_ok(&mut self.ctl(&["agents", "--output", "json", "--select", select]))?;
        let agents: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("parsing rollbackctl agents --output json")?;
        Ok(agents
            .iter()
            .filter(|a| a["status"].as_str() == Some("online"))
            .count())
    }

    /// Waits until `n` agents matching `select` are online.
    pub fn wait_online(&mut self, select: &str, n: usize, limit: Duration) -> Result<()> {
        sys::wait_for(
            &format!("{n} agents online"),
            limit,
            Duration::from_millis(200),
            || {
                self.daemon.check_alive()?;
                Ok((self.online(select)? >= n).then_some(()))
            },
        )
    }
}

/// Runs one `rollbackctl --output json rollback ...` to the job's end; returns the wall time and
/// the job document. Fails unless every host succeeded.
pub fn rollback(
    coord: &Coordinator,
    args: &[&str],
    scratch: &Path,
    limit: Duration,
) -> Result<(Duration, serde_json::Value)> {
    let mut all = vec!["--output", "json", "rollback"];
    all.extend(args);
    let done = sys::run_timed(coord.ctl(&all), scratch, limit)?;
    let job: serde_json::Value = serde_json::from_str(&done.stdout).with_context(|| {
        format!(
            "rollbackctl rollback printed no job JSON ({}); stderr: {}",
            done.status, done.stderr
        )
    })?;
    if !done.status.success() || job["state"].as_str() != Some("succeeded") {
        let failed: Vec<String> = job["hosts"]
            .as_array()
            .map(|hs| {
                hs.iter()
                    .filter(|h| h["outcome"].as_str() != Some("succeeded"))
                    .take(3)
                    .map(|h| format!("{}: {} {}", h["host_id"], h["outcome"], h["detail"]))
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "rollback job {} ended {} ({}): {}; stderr: {}",
            job["job_id"],
            job["state"],
            done.status,
            failed.join("; "),
            done.stderr.trim()
        );
    }
    Ok((done.wall, job))
}

/// A job's events as `rollbackctl --output json watch JOB` prints them, each with its time
/// (milliseconds since the epoch) and kind.
pub struct Event {
    pub at_ms: i64,
    pub kind: String,
    pub host: String,
    pub message: String,
}

/// Every event of a finished job, in order.
pub fn job_events(coord: &Coordinator, job_id: &str, scratch: &Path) -> Result<Vec<Event>> {
    let done = sys::run_timed(
        coord.ctl(&["--output", "json", "watch", job_id]),
        scratch,
        Duration::from_secs(300),
    )?;
    Ok(done
        .stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|ev| {
            Some(Event {
                at_ms: ev["at"].as_str().and_then(sys::parse_rfc3339_ms)?,
                kind: ev["kind"].as_str()?.to_string(),
                host: ev["host_id"].as_str().unwrap_or_default().to_string(),
                message: ev["message"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect())
}

/// The coordinator's own start-to-end time of a job document, in seconds.
pub fn job_seconds(job: &serde_json::Value) -> Option<f64> {
    let start = sys::parse_rfc3339_ms(job["created_at"].as_str()?)?;
    let end = sys::parse_rfc3339_ms(job["finished_at"].as_str()?)?;
    Some((end - start) as f64 / 1000.0)
}

/// The `[app]` host profile of a bench host directory `dir` (its `app` clone, `.env` and
/// `.env.backup`), with the health endpoint at `health_url`.
pub fn app_profile(dir: &Path, git: &Path, health_url: &str) -> String {
    format!(
        "[app]\ndir = \"{}\"\ngit = \"{}\"\nenv_file = \"{}\"\nenv_backup = \"{}\"\nhealth_base_url = \"{health_url}\"\n",
        dir.join("app").display(),
        git.display(),
        dir.join(".env").display(),
        dir.join(".env.backup").display(),
    )
}
