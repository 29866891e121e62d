//! The product on the fleet lab: a PKI in the lab's shared directory, the coordinator in the
//! lab's coordinator namespace, an agent as `rollback-agent.service` in every host with a host
//! profile for the sample app, and `rollbackctl` run from the coordinator namespace (lab
//! traffic never leaves the lab's namespaces).
//!
//! [`LabFleet::start_cluster`] runs two or three coordinators instead (`a`, `b`, `c`, on
//! consecutive ports from [`COORDINATOR_PORT`]) sharing one PostgreSQL store, a throwaway
//! cluster started inside the coordinator namespace on its 127.0.0.1 (so the store's traffic
//! stays in the lab too); every agent is given all their URLs.

use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::lab::{
    APP_DB, APP_DIR, APP_LOG, APP_PORT, APP_UNIT, BACKUP_DIR, Lab, PG_BIN, PG_PORT, PG_UNIT,
    SHARED_MOUNT,
};
use crate::pg;
use crate::support::{CertFiles, Pki, bin, eventually};

/// Port the coordinator listens on inside the lab.
pub const COORDINATOR_PORT: u16 = 7443;
/// The agents' unit in each host.
pub const AGENT_UNIT: &str = "rollback-agent.service";
/// Where each app host keeps a checkout of the newest release for running migrations (it has
/// every migration script, as a deploy tooling checkout would).
pub const MIGRATIONS_DIR: &str = "/srv/app-migrations";
/// Agent config path inside hosts.
pub const AGENT_CONFIG: &str = "/etc/rollback/agent.toml";
/// The app hosts' `[[smoke]]` checks of the sample app's critical functionality.
pub const SMOKE_CHECKS: &str = "[[smoke]]\nname = \"incidents\"\npath = \"/api/incidents\"\njson_field = \"status\"\njson_equals = \"ok\"\n\
     [[smoke]]\nname = \"reports\"\npath = \"/api/reports\"\njson_field = \"status\"\njson_equals = \"ok\"\n";
/// The lab's `0003` migration (for `{MIGRATIONS_DIR}/migrations/versions/0003_risk_scores.py`)
/// with a downgrade that reports its progress as a long backfill does: one line every 100 ms,
/// each with the time it was printed.
pub const SLOW_DOWNGRADE_0003: &str = r#""""risk scores; the downgrade reports its progress."""

import time

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("incidents", sa.Column("risk_score", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "risk_register",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("risk", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
    )


def downgrade():
    for i in range(1, 51):
        print(f"rewinding risk scores: batch {i}/50 at {time.time():.3f}", flush=True)
        time.sleep(0.1)
    op.drop_table("risk_register")
    op.drop_column("incidents", "risk_score")
"#;

/// Agent log inside hosts.
pub const AGENT_LOG: &str = "/var/log/rollback-agent.log";
/// The operator the fleet's `rollbackctl` acts as (role admin).
pub const OPERATOR: &str = "oncall";
/// The second person (role approver) who approves what the coordinator's default approval
/// policy holds (database rollbacks): `rollbackctl rollback` run through the fleet is approved
/// by this identity, through the real `ApproveJob` call, once the job waits for it.
pub const APPROVER: &str = "lead";
/// The names of the coordinators of a cluster fleet, in order.
pub const CLUSTER_NAMES: [&str; 3] = ["a", "b", "c"];
/// The database the cluster fleet's coordinators share.
pub const CLUSTER_DB: &str = "fleet";

/// One coordinator process of the fleet.
struct CoordinatorSlot {
    /// Its `name` in coordinator.toml (`None` in the single-coordinator fleet).
    name: Option<String>,
    /// Holds its coordinator.toml and coordinator.log.
    dir: PathBuf,
    url: String,
    child: Option<Child>,
}

/// A running fleet-rollback installation on a lab.
pub struct LabFleet<'a> {
    pub lab: &'a Lab,
    /// Host path of the fleet's files (PKI, coordinator config, store, logs).
    pub dir: PathBuf,
    pub pki: Pki,
    pub operator: CertFiles,
    /// `lead`, role approver: the second person for two-person approval.
    pub approver: CertFiles,
    coordinators: Vec<CoordinatorSlot>,
    /// The coordinator `rollbackctl` and every helper talk to (the first one unless
    /// [`LabFleet::use_coordinator`] said otherwise).
    pub url: String,
    /// The shared store of a cluster fleet (dropped after the coordinators are stopped).
    store: Option<pg::Cluster>,
}

impl std::fmt::Debug for LabFleet<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabFleet")
            .field("dir", &self.dir)
            .field("url", &self.url)
            .finish()
    }
}

/// Path of `p` (under the lab's shared dir) as hosts see it.
fn in_hosts(lab: &Lab, p: &std::path::Path) -> Result<String> {
    let rel = p
        .strip_prefix(lab.shared_dir())
        .with_context(|| format!("{} is not in the lab's shared dir", p.display()))?;
    Ok(format!("{SHARED_MOUNT}/{}", rel.display()))
}

/// A host's labels: `role=db` on the database host, `role=web` on app hosts, and
/// `migrator=true` on the first app host.
pub fn host_labels(lab: &Lab, host: &str) -> Vec<(&'static str, &'static str)> {
    if lab.db_host().is_ok_and(|h| h.id() == host) {
        return vec![("role", "db")];
    }
    let first_app = lab.app_host_ids().into_iter().next();
    if first_app.as_deref() == Some(host) {
        vec![("role", "web"), ("migrator", "true")]
    } else {
        vec![("role", "web")]
    }
}

/// The `[inventory."HOST"]` tables of coordinator.toml for every host of the lab: the
/// inventory (what targets each host) says what each host's agent reports too.
pub fn inventory_toml(lab: &Lab) -> String {
    lab.hosts()
        .iter()
        .map(|h| {
            let labels: String = host_labels(lab, h.id())
                .iter()
                .map(|(k, v)| format!("{k} = \"{v}\"\n"))
                .collect();
            format!("[inventory.\"{}\"]\n{labels}", h.id())
        })
        .collect()
}

/// The agent.toml of `host`: `coordinators` (one is written as `coordinator`), `tls` as
/// [ca, cert, key] paths inside the host, `state_dir`, the host's labels and its profile (the
/// database host's PostgreSQL, or an app host's app, alembic and smoke checks).
pub fn agent_toml(
    lab: &Lab,
    host: &str,
    coordinators: &[String],
    tls: &[String; 3],
    state_dir: &str,
) -> Result<String> {
    let db = lab
        .db_host()
        .map(|h| h.id().to_string())
        .unwrap_or_default();
    let labels: String = host_labels(lab, host)
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    let coordinators = match coordinators {
        [one] => format!("coordinator = \"{one}\""),
        all => format!(
            "coordinators = [{}]",
            all.iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let [ca, cert, key] = tls;
    let mut toml = format!(
        "host_id = \"{host}\"\n{coordinators}\nstate_dir = \"{state_dir}\"\n\
         reconnect_initial_ms = 100\nreconnect_max_ms = 1000\n\
         [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n[timeouts]\nkill_grace_secs = 2\n",
    );
    toml += &format!("[labels]\n{labels}");
    if host == db {
        toml += &format!(
            "[service]\nunit = \"{PG_UNIT}\"\n\
             [postgres]\npg_dump = \"{PG_BIN}/pg_dump\"\npg_restore = \"{PG_BIN}/pg_restore\"\nhost = \"127.0.0.1\"\n\
             port = {PG_PORT}\nuser = \"postgres\"\ndatabase = \"{APP_DB}\"\nbackup_dir = \"{BACKUP_DIR}\"\n"
        );
    } else {
        toml += &format!(
            "[service]\nunit = \"{APP_UNIT}\"\n\
             [app]\ndir = \"{APP_DIR}\"\nenv_file = \"{APP_DIR}/.env\"\nenv_backup = \"{APP_DIR}/.env.backup\"\n\
             log_file = \"{APP_LOG}\"\nhealth_base_url = \"http://127.0.0.1:{APP_PORT}\"\n\
             [alembic]\nbinary = \"{}\"\nworkdir = \"{MIGRATIONS_DIR}\"\n[alembic.env]\nDATABASE_URL = \"{}\"\n{SMOKE_CHECKS}",
            lab.venv().join("bin/alembic").display(),
            lab.database_url()?
        );
    }
    Ok(toml)
}

/// On an app host of a lab with the app deployed, a fresh checkout of the newest release at
/// [`MIGRATIONS_DIR`] for alembic to run from; nothing elsewhere.
pub fn prepare_migrations(lab: &Lab, host: &str) -> Result<()> {
    if lab.db_host().map(|h| h.id() != host).unwrap_or(true) && lab.app_deployed() {
        lab.run(host, &["rm", "-rf", MIGRATIONS_DIR])?;
        lab.run(
            host,
            &[
                "git",
                "clone",
                "-q",
                &format!("{SHARED_MOUNT}/origin"),
                MIGRATIONS_DIR,
            ],
        )?;
    }
    Ok(())
}

impl<'a> LabFleet<'a> {
    /// Issues certificates, starts the coordinator (its store a SQLite file, or a PostgreSQL
    /// cluster in the coordinator namespace when the suite runs on PostgreSQL) and an agent on
    /// every host, and waits until every agent is online.
    pub fn start(lab: &'a Lab) -> Result<Self> {
        Self::start_with(lab, 1)
    }

    /// Like [`LabFleet::start`] with `n` (2 or 3) coordinators named `a`, `b`, `c` on ports
    /// 7443, 7444, 7445 of the coordinator namespace's address, sharing one PostgreSQL store
    /// (a cluster started in the coordinator namespace, password auth), every agent configured
    /// with all of them. Waits until every agent is online.
    pub fn start_cluster(lab: &'a Lab, n: usize) -> Result<Self> {
        if !(2..=CLUSTER_NAMES.len()).contains(&n) {
            bail!("a cluster fleet has 2 or 3 coordinators, not {n}");
        }
        Self::start_with(lab, n)
    }

    /// A fleet whose coordinator this value does not run (e.g. the packaged unit on a lab
    /// host, at `url`): `rollbackctl` and every helper talk to it with `pki`'s operator and
    /// approver certificates; it has no coordinator of its own to start, stop or kill.
    pub fn with_coordinator_at(
        lab: &'a Lab,
        dir: PathBuf,
        pki: Pki,
        operator: CertFiles,
        approver: CertFiles,
        url: String,
    ) -> Self {
        LabFleet {
            lab,
            dir,
            pki,
            operator,
            approver,
            coordinators: Vec::new(),
            url,
            store: None,
        }
    }

    fn start_with(lab: &'a Lab, n: usize) -> Result<Self> {
        let dir = lab.shared_dir().join("fleet");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki::init(&dir.join("pki"), "lab.fleet")?;
        let addr = lab.coordinator_addr().to_string();
        let operator = pki.operator(OPERATOR)?;
        let approver = pki.operator(APPROVER)?;
        let inventory = inventory_toml(lab);
        // Several coordinators share PostgreSQL; one does too when the suite runs on
        // PostgreSQL (`cargo xtask test`'s second pass), else it keeps a SQLite file.
        let store = if n > 1 || matches!(pg::backend(), pg::Backend::Postgres) {
            let cluster = pg::Cluster::start_in(&dir.join("store"), Some(&lab.coordinator_netns()))
                .context("starting the coordinators' PostgreSQL store in the lab")?;
            cluster
                .server
                .psql("postgres", &format!("CREATE DATABASE {CLUSTER_DB}"))
                .context("creating the coordinators' database")?;
            Some(cluster)
        } else {
            None
        };
        let mut coordinators = Vec::new();
        for (i, cluster_name) in CLUSTER_NAMES.iter().take(n).enumerate() {
            let port = COORDINATOR_PORT + u16::try_from(i).context("coordinator index")?;
            let (name, cdir, cert_name, database) = match &store {
                None => (
                    None,
                    dir.clone(),
                    "coordinator".to_string(),
                    "database = \"coordinator.sqlite\"\n".to_string(),
                ),
                Some(cluster) => {
                    let name = *cluster_name;
                    (
                        Some(name.to_string()),
                        dir.join(format!("coordinator-{name}")),
                        format!("coordinator-{name}"),
                        format!(
                            "name = \"{name}\"\ndatabase = \"{}\"\ndatabase_password_file = \"{}\"\n",
                            cluster.server.url(CLUSTER_DB),
                            cluster.server.password_file.display()
                        ),
                    )
                }
            };
            std::fs::create_dir_all(&cdir)
                .with_context(|| format!("creating {}", cdir.display()))?;
            let coord = pki.coordinator(&cert_name, &[&addr])?;
            std::fs::write(
                cdir.join("coordinator.toml"),
                format!(
                    "listen = \"{addr}:{port}\"\n{database}heartbeat_interval_secs = 2\n\
                     [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[operators]\n{OPERATOR} = \"admin\"\n{APPROVER} = \"approver\"\n{inventory}",
                    pki.ca().display(),
                    coord.cert.display(),
                    coord.key.display()
                ),
            )
            .with_context(|| format!("writing {}/coordinator.toml", cdir.display()))?;
            coordinators.push(CoordinatorSlot {
                name,
                dir: cdir,
                url: format!("https://{addr}:{port}"),
                child: None,
            });
        }
        let url = coordinators[0].url.clone();
        let mut fleet = LabFleet {
            lab,
            dir,
            pki,
            operator,
            approver,
            coordinators,
            url,
            store,
        };
        for i in 0..n {
            fleet.start_coordinator_at(i)?;
        }
        let hosts: Vec<String> = lab.hosts().iter().map(|h| h.id().to_string()).collect();
        for host in &hosts {
            fleet.install_agent(host)?;
        }
        fleet.wait_online(&hosts)?;
        if fleet.store.is_some() {
            // The PostgreSQL pass must not quietly run on SQLite.
            let log = fleet.coordinator_log_at(0);
            ensure!(
                log.contains("opening the store database=postgres://"),
                "the lab's coordinator did not open its PostgreSQL store:\n{log}"
            );
        }
        Ok(fleet)
    }

    /// Starts (or restarts) the coordinator process in the coordinator namespace.
    pub fn start_coordinator(&mut self) -> Result<()> {
        self.start_coordinator_at(0)
    }

    /// Starts (or restarts) coordinator `i` (0 is `a`) in the coordinator namespace.
    pub fn start_coordinator_at(&mut self, i: usize) -> Result<()> {
        self.stop_coordinator_at(i)?;
        let lab = self.lab;
        let slot = self.slot_mut(i)?;
        let log_path = slot.dir.join("coordinator.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = lab.coordinator_command(bin("rollback-coordinator"));
        cmd.arg("--config")
            .arg(slot.dir.join("coordinator.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        slot.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting coordinator {} in the lab", slot.label()))?,
        );
        Ok(())
    }

    fn slot_mut(&mut self, i: usize) -> Result<&mut CoordinatorSlot> {
        let n = self.coordinators.len();
        self.coordinators
            .get_mut(i)
            .with_context(|| format!("the fleet has {n} coordinator(s), no number {i}"))
    }

    /// How many coordinators the fleet runs.
    pub fn coordinator_count(&self) -> usize {
        self.coordinators.len()
    }

    /// Coordinator `i`'s URL (as agents and `rollbackctl` reach it inside the lab).
    pub fn coordinator_url(&self, i: usize) -> Option<&str> {
        self.coordinators.get(i).map(|c| c.url.as_str())
    }

    /// Coordinator `i`'s `name` (`a`, `b`, `c`; `None` in the single-coordinator fleet).
    pub fn coordinator_name(&self, i: usize) -> Option<&str> {
        self.coordinators.get(i).and_then(|c| c.name.as_deref())
    }

    /// Coordinator `i`'s coordinator.toml.
    pub fn coordinator_config(&self, i: usize) -> Option<PathBuf> {
        self.coordinators
            .get(i)
            .map(|c| c.dir.join("coordinator.toml"))
    }

    /// Coordinator `i`'s process id while this fleet runs it.
    pub fn coordinator_pid(&self, i: usize) -> Option<u32> {
        self.coordinators
            .get(i)
            .and_then(|c| c.child.as_ref())
            .map(Child::id)
    }

    /// Directs `rollbackctl` and every helper of this fleet to coordinator `i` from now on.
    pub fn use_coordinator(&mut self, i: usize) -> Result<()> {
        self.url = self.slot_mut(i)?.url.clone();
        Ok(())
    }

    /// The shared store of a cluster fleet.
    pub fn store(&self) -> Option<&pg::Server> {
        self.store.as_ref().map(|c| &c.server)
    }

    /// SIGTERM to the coordinator; waits for it to exit.
    pub fn stop_coordinator(&mut self) -> Result<()> {
        self.stop_coordinator_at(0)
    }

    /// SIGTERM to coordinator `i`; waits for it to exit.
    pub fn stop_coordinator_at(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.slot_mut(i)?.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while child.try_wait()?.is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
        Ok(())
    }

    /// `kill -9` the coordinator (no shutdown at all: a crash at whatever instruction it was
    /// at); returns once it is gone.
    pub fn kill_coordinator(&mut self) -> Result<()> {
        self.kill_coordinator_at(0)
    }

    /// `kill -9` coordinator `i`; returns once it is gone.
    pub fn kill_coordinator_at(&mut self, i: usize) -> Result<()> {
        let slot = self.slot_mut(i)?;
        let label = slot.label();
        if let Some(mut child) = slot.child.take() {
            child
                .kill()
                .with_context(|| format!("SIGKILL to coordinator {label}"))?;
            child
                .wait()
                .with_context(|| format!("reaping coordinator {label}"))?;
        }
        Ok(())
    }

    /// `kill -9` the agent's main process on `host` (systemd then stops what is left of its
    /// cgroup and restarts it, as it would after a crash).
    pub fn kill_agent(&self, host: &str) -> Result<()> {
        let pid = self.lab.run(
            host,
            &[
                "systemctl",
                "show",
                "--property=MainPID",
                "--value",
                AGENT_UNIT,
            ],
        )?;
        let pid = pid.trim();
        if pid.is_empty() || pid == "0" {
            bail!("{host}: {AGENT_UNIT} has no main process to kill");
        }
        self.lab.run(host, &["kill", "-KILL", pid])?;
        Ok(())
    }

    /// Every coordinator's log (each headed by its name in a cluster fleet).
    pub fn coordinator_log(&self) -> String {
        if self.coordinators.len() == 1 {
            return self.coordinator_log_at(0);
        }
        (0..self.coordinators.len())
            .map(|i| {
                format!(
                    "--- coordinator {} ---\n{}",
                    self.coordinators[i].label(),
                    self.coordinator_log_at(i)
                )
            })
            .collect()
    }

    /// Coordinator `i`'s log.
    pub fn coordinator_log_at(&self, i: usize) -> String {
        self.coordinators
            .get(i)
            .and_then(|c| std::fs::read_to_string(c.dir.join("coordinator.log")).ok())
            .unwrap_or_default()
    }

    /// The host profile each host's agent gets.
    fn agent_toml(&self, host: &str, certs: &CertFiles) -> Result<String> {
        let lab = self.lab;
        let urls: Vec<String> = self.coordinators.iter().map(|c| c.url.clone()).collect();
        let tls = [
            in_hosts(lab, &self.pki.ca())?,
            in_hosts(lab, &certs.cert)?,
            in_hosts(lab, &certs.key)?,
        ];
        agent_toml(lab, host, &urls, &tls, "/var/lib/rollback-agent")
    }

    /// Writes the host's agent.toml and unit, prepares the migrations checkout on app hosts,
    /// and starts the agent.
    pub fn install_agent(&self, host: &str) -> Result<()> {
        let certs = self.pki.agent(host)?;
        let lab = self.lab;
        prepare_migrations(lab, host)?;
        lab.write_file(
            host,
            AGENT_CONFIG,
            self.agent_toml(host, &certs)?.as_bytes(),
            0o600,
        )?;
        let unit = format!(
            "[Unit]\nDescription=fleet-rollback agent\nAfter=network.target\n\n[Service]\n\
             ExecStart={} --config {AGENT_CONFIG}\nEnvironment=ROLLBACK_LOG=info\nEnvironment=HOME=/root\n\
             Restart=on-failure\nRestartSec=1\nDelegate=yes\nStandardError=append:{AGENT_LOG}\n\n[Install]\nWantedBy=multi-user.target\n",
            bin("rollback-agent").display()
        );
        lab.install_unit(host, AGENT_UNIT, &unit)?;
        lab.start_unit(host, AGENT_UNIT)
    }

    /// Waits until every host in `hosts` is listed online.
    pub fn wait_online(&self, hosts: &[String]) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            // The coordinator may still be starting: keep polling until the deadline.
            let agents = self.agents().unwrap_or_default();
            let missing: Vec<&String> = hosts
                .iter()
                .filter(|h| {
                    !agents
                        .iter()
                        .any(|a| a["host_id"] == h.as_str() && a["status"] == "online")
                })
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "agents not online after 60s: {missing:?}\ncoordinator log:\n{}",
                    self.coordinator_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `rollbackctl ARGS` as the operator, to be run in the coordinator namespace (stdin
    /// from /dev/null; the caller decides what happens to its output).
    pub fn rollbackctl_command(&self, args: &[&str]) -> std::process::Command {
        self.rollbackctl_command_as(&self.operator, args)
    }

    /// `rollbackctl ARGS` as `who`, from the coordinator namespace.
    pub fn rollbackctl_command_as(&self, who: &CertFiles, args: &[&str]) -> std::process::Command {
        self.rollbackctl_command_to(&self.url, who, args)
    }

    /// `rollbackctl ARGS` as the operator against coordinator `i`, from the coordinator
    /// namespace (stdin from /dev/null).
    pub fn rollbackctl_command_at(&self, i: usize, args: &[&str]) -> Result<std::process::Command> {
        let url = self
            .coordinator_url(i)
            .with_context(|| format!("the fleet has no coordinator number {i}"))?;
        Ok(self.rollbackctl_command_to(url, &self.operator, args))
    }

    /// Runs `rollbackctl ARGS` as the operator against coordinator `i` (output captured).
    pub fn rollbackctl_at(&self, i: usize, args: &[&str]) -> Result<Output> {
        self.rollbackctl_command_at(i, args)?
            .output()
            .with_context(|| format!("running rollbackctl {} on coordinator {i}", args.join(" ")))
    }

    /// `rollbackctl --output json ARGS` against coordinator `i`, parsed; fails unless it
    /// exits 0.
    pub fn json_at(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.rollbackctl_at(i, &all)?;
        if !out.status.success() {
            bail!(
                "rollbackctl {} on coordinator {i} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing the JSON of rollbackctl {}", args.join(" ")))
    }

    /// (host, coordinator name) of every online agent, as coordinator `i` lists them.
    pub fn holders_at(&self, i: usize) -> Result<Vec<(String, String)>> {
        let agents = self.json_at(i, &["agents"])?;
        Ok(agents
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["status"] == "online")
            .map(|a| {
                (
                    a["host_id"].as_str().unwrap_or_default().to_string(),
                    a["coordinator"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    fn rollbackctl_command_to(
        &self,
        url: &str,
        who: &CertFiles,
        args: &[&str],
    ) -> std::process::Command {
        let mut cmd = self.lab.coordinator_command(bin("rollbackctl"));
        cmd.arg("--coordinator")
            .arg(url)
            .arg("--ca")
            .arg(self.pki.ca())
            .arg("--cert")
            .arg(&who.cert)
            .arg("--key")
            .arg(&who.key)
            .args(args)
            .env("HOME", "/nonexistent")
            .env_remove("ROLLBACK_CONFIG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `rollbackctl ARGS` as the operator, from the coordinator namespace. A
    /// `rollback` that waits for approval is approved by [`APPROVER`] meanwhile.
    pub fn rollbackctl(&self, args: &[&str]) -> Result<Output> {
        let what = format!("running rollbackctl {}", args.join(" "));
        if !args.contains(&"rollback") {
            return self.rollbackctl_command(args).output().context(what);
        }
        let mut cmd = self.rollbackctl_command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().with_context(|| what.clone())?;
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                let out = child.wait_with_output();
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                out
            });
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                self.approve_waiting();
                std::thread::sleep(Duration::from_millis(250));
            }
            waiter
                .join()
                .map_err(|_| anyhow::anyhow!("{what}: the waiting thread panicked"))?
                .context(what)
        })
    }

    /// Approves, as [`APPROVER`], every job that waits for approval.
    pub fn approve_waiting(&self) {
        let Ok(out) = self
            .rollbackctl_command_as(
                &self.approver,
                &["--output", "json", "jobs", "--limit", "5"],
            )
            .output()
        else {
            return;
        };
        let jobs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for job in jobs.iter().filter(|j| j["state"] == "awaiting_approval") {
            if let Some(id) = job["job_id"].as_str() {
                let _ = self
                    .rollbackctl_command_as(
                        &self.approver,
                        &["approve", id, "--reason", "lab: the second person agrees"],
                    )
                    .output();
            }
        }
    }

    /// Runs `rollbackctl ARGS` like [`LabFleet::rollbackctl`], but passes its output on to
    /// `out` line by line as it comes instead of capturing it: stdout and stderr share one
    /// pipe, so they interleave as on a terminal. Kills it after `timeout`. Returns its exit
    /// status.
    pub fn rollbackctl_streamed(
        &self,
        args: &[&str],
        out: &mut dyn std::io::Write,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        use std::io::BufRead;
        use std::sync::mpsc::RecvTimeoutError;
        let what = format!("rollbackctl {}", args.join(" "));
        let (reader, writer) =
            std::io::pipe().with_context(|| format!("creating a pipe for {what}"))?;
        let writer2 = writer
            .try_clone()
            .with_context(|| format!("creating a pipe for {what}"))?;
        let mut cmd = self.rollbackctl_command(args);
        cmd.stdout(writer).stderr(writer2);
        let spawned = cmd.spawn().with_context(|| format!("starting {what}"));
        // The command holds this process's ends of the pipe's write side: without them the
        // reader sees end-of-file when the child exits.
        drop(cmd);
        let mut child = spawned?;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(reader);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if tx.send(line).is_err() => break,
                    Ok(_) => {}
                }
            }
        });
        let deadline = std::time::Instant::now() + timeout;
        let mut written = Ok(());
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if written.is_ok() {
                        written = out.write_all(&line).and_then(|()| out.flush());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("{what}: no result after {timeout:?}; killed it");
                }
            }
        }
        let status = child
            .wait()
            .with_context(|| format!("waiting for {what}"))?;
        written.with_context(|| format!("passing on the output of {what}"))?;
        Ok(status)
    }

    /// `rollbackctl agents --output json`.
    pub fn agents(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.rollbackctl(&["agents", "--output", "json"])?;
        if !out.status.success() {
            bail!(
                "rollbackctl agents failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing rollbackctl agents output")
    }

    /// `rollbackctl --output json exec HOST ACTION PARAMS...`: (succeeded, document).
    pub fn exec(
        &self,
        host: &str,
        action: &str,
        params: &[&str],
    ) -> Result<(bool, serde_json::Value)> {
        let mut args = vec!["--output", "json", "exec", host, action];
        args.extend(params);
        if !params.contains(&"--reason") {
            args.extend(["--reason", "test"]);
        }
        let out = self.rollbackctl(&args)?;
        let doc = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "exec {host} {action}: no JSON; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.success(), doc))
    }

    /// Like `exec`, failing unless the step succeeded.
    pub fn exec_ok(&self, host: &str, action: &str, params: &[&str]) -> Result<serde_json::Value> {
        let (ok, doc) = self.exec(host, action, params)?;
        if !ok {
            bail!(
                "exec {host} {action} {params:?} failed: {}\n{}",
                doc["error"],
                doc["output"]
            );
        }
        Ok(doc)
    }

    /// `rollbackctl job show ID --output json`.
    pub fn job(&self, id: &str) -> Result<serde_json::Value> {
        let out = self.rollbackctl(&["job", "show", id, "--output", "json"])?;
        if !out.status.success() {
            bail!(
                "rollbackctl job show {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing rollbackctl job show output")
    }

    /// The newest job's whole record.
    pub fn latest_job(&self) -> Result<serde_json::Value> {
        let out = self.rollbackctl(&["jobs", "--output", "json", "--limit", "1"])?;
        if !out.status.success() {
            bail!("rollbackctl jobs: {}", String::from_utf8_lossy(&out.stderr));
        }
        let jobs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        let id = jobs
            .first()
            .and_then(|j| j["job_id"].as_str())
            .context("no job")?
            .to_string();
        self.job(&id)
    }

    /// `rollbackctl report ID` (Markdown).
    pub fn report(&self, id: &str) -> Result<String> {
        let out = self.rollbackctl(&["report", id])?;
        if !out.status.success() {
            bail!(
                "rollbackctl report: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `rollbackctl rollback --yes --select role=web ARGS`: (succeeded, stdout + stderr).
    pub fn rollback_web(&self, args: &[&str]) -> Result<(bool, String)> {
        let mut all = vec!["rollback", "--yes", "--select", "role=web"];
        all.extend(args);
        let out = self.rollbackctl(&all)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// The agent's log on `host`.
    pub fn agent_log(&self, host: &str) -> String {
        self.lab
            .read_file(host, AGENT_LOG)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Polls `f` with the fleet's standard deadline.
    pub fn eventually<T>(&self, what: &str, f: impl FnMut() -> Result<T>) -> T {
        eventually(what, Duration::from_secs(60), f)
    }
}

/// Every app host back on the deployed release (v2), its unit active and `/readyz` 200, and
/// the database at `schema`.
pub fn assert_healthy(lab: &Lab, schema: &str) -> Result<()> {
    let good = lab.release_commit("v2")?;
    for host in lab.app_host_ids() {
        anyhow::ensure!(
            lab.unit_state(&host, "app")? == "active",
            "{host}: app unit not active"
        );
        anyhow::ensure!(
            lab.app_head(&host)? == good,
            "{host}: git HEAD is not v2 ({good})"
        );
        let ready = lab.readyz(&host)?.status;
        anyhow::ensure!(ready == 200, "{host}: /readyz {ready}");
    }
    let at = lab.schema_revision()?;
    anyhow::ensure!(
        at.as_deref() == Some(schema),
        "alembic_version in the database is {at:?}, expected {schema}"
    );
    Ok(())
}

/// (host, outcome) of every host of a job record, in job order.
pub fn outcomes(job: &serde_json::Value) -> Vec<(String, String)> {
    job["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h["host_id"].as_str().unwrap_or_default().into(),
                        h["outcome"].as_str().unwrap_or_default().into(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl LabFleet<'_> {
    /// Leaves the coordinators (and the store) running after this value is gone, for `cargo
    /// xtask lab up`: the lab's teardown kills them with everything else in its namespaces.
    pub fn keep_running(mut self) {
        for slot in &mut self.coordinators {
            drop(slot.child.take());
        }
        if let Some(store) = self.store.take() {
            store.leave_running();
        }
    }
}

impl CoordinatorSlot {
    /// Its name, or its URL in the single-coordinator fleet (for messages).
    fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.url.clone())
    }
}

impl Drop for LabFleet<'_> {
    fn drop(&mut self) {
        for i in 0..self.coordinators.len() {
            let _ = self.stop_coordinator_at(i);
        }
    }
}
