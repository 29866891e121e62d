//! Test support: the built binaries, a throwaway PKI made with the real `rollbackctl pki`,
//! and the coordinator, agents and `rollbackctl` run as real processes on loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::pg::{self, StoreDb};

/// A runbook with one procedure, `noop`: one `postgres.backup` step on each host (which the
/// simulator runs as a no-op), for tests of the coordinator's machinery.
pub const NOOP_RUNBOOK: &str = r#"
[procedures.noop]
description = "one step; a no-op in the simulator"

[[procedures.noop.phases]]
name = "noop"
scope = "each"
steps = [{ action = "postgres.backup" }]
"#;

/// Path of a workspace binary in the same target dir as the running test.
/// `cargo xtask test` builds them all first (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .map(|deps| {
            if deps.ends_with("deps") {
                deps.parent().map(Path::to_path_buf).unwrap_or(deps)
            } else {
                deps
            }
        })
        .unwrap_or_else(|| PathBuf::from("target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (cargo xtask test does)",
        path.display()
    );
    path
}

/// Polls `f` until it returns Ok or `timeout` passes; panics with the last error.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= timeout => {
                panic!("{what}: not true after {timeout:?}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A fleet CA in a temporary directory, driven through the real `rollbackctl pki`.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub trust_domain: String,
}

impl Pki {
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Self> {
        run_checked(
            Command::new(bin("rollbackctl"))
                .arg("pki")
                .arg("--dir")
                .arg(dir)
                .args(["init", "--trust-domain", trust_domain]),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn issue(&self, role: &str, name: &str, extra: &[&str]) -> Result<CertFiles> {
        run_checked(
            Command::new(bin("rollbackctl"))
                .arg("pki")
                .arg("--dir")
                .arg(&self.dir)
                .args(["issue", role, name])
                .args(extra),
        )?;
        Ok(CertFiles {
            cert: self.dir.join(role).join(format!("{name}.pem")),
            key: self.dir.join(role).join(format!("{name}.key")),
        })
    }

    /// The fleet CRL `rollbackctl pki revoke` and `pki crl` write.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// `rollbackctl pki revoke ROLE NAME`: adds the identity's certificates to the CRL.
    pub fn revoke(&self, role: &str, name: &str) -> Result<Output> {
        run_checked(
            Command::new(bin("rollbackctl"))
                .arg("pki")
                .arg("--dir")
                .arg(&self.dir)
                .args(["revoke", role, name]),
        )
    }

    /// `rollbackctl pki crl`: (re)signs the CRL with fresh dates.
    pub fn refresh_crl(&self) -> Result<Output> {
        run_checked(
            Command::new(bin("rollbackctl"))
                .arg("pki")
                .arg("--dir")
                .arg(&self.dir)
                .arg("crl"),
        )
    }

    pub fn agent(&self, host_id: &str) -> Result<CertFiles> {
        self.issue("agent", host_id, &[])
    }
    /// An agent certificate valid for `days` days.
    pub fn agent_for_days(&self, host_id: &str, days: u32) -> Result<CertFiles> {
        self.issue("agent", host_id, &["--days", &days.to_string()])
    }

    /// `rollbackctl pki --dir DIR ARGS...`, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        Command::new(bin("rollbackctl"))
            .arg("pki")
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .context("running rollbackctl pki")
    }

    /// `rollbackctl pki renew ROLE NAME EXTRA...`; fails unless it exits 0.
    pub fn renew(&self, role: &str, name: &str, extra: &[&str]) -> Result<Output> {
        let mut args = vec!["renew", role, name];
        args.extend(extra);
        let out = self.run(&args)?;
        if !out.status.success() {
            bail!(
                "rollbackctl pki renew {role} {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// `rollbackctl pki list --json`, parsed; fails unless it exits 0.
    pub fn list_json(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.run(&["list", "--json"])?;
        if !out.status.success() {
            bail!(
                "rollbackctl pki list failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing rollbackctl pki list --json")
    }
    pub fn operator(&self, name: &str) -> Result<CertFiles> {
        self.issue("operator", name, &[])
    }
    pub fn coordinator(&self, name: &str, sans: &[&str]) -> Result<CertFiles> {
        let mut extra = Vec::new();
        for s in sans {
            extra.extend(["--san", s]);
        }
        self.issue("coordinator", name, &extra)
    }
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits up to `grace` for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, grace: Duration) -> Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        let pid = child.id();
        run_checked(Command::new("kill").args(["-TERM", &pid.to_string()]))?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if start.elapsed() > grace {
                let _ = child.kill();
                let _ = child.wait();
                bail!("pid {pid} did not exit within {grace:?} of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Proc {
    /// SIGINT, then waits up to `grace` for it to exit (then SIGKILL).
    pub fn interrupt(&mut self, grace: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        );
        let start = Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > grace {
                let _ = child.kill();
                let _ = child.wait();
                bail!("pid {pid} did not exit within {grace:?} of SIGINT; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Forgets the process without stopping it (it outlives this value).
    pub fn detach(&mut self) {
        drop(self.child.take());
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator process on loopback with its config, store and log in `dir`. Its store is
/// the one `pg::backend()` chooses: `coordinator.sqlite` in `dir`, or a fresh database of its
/// own in the suites' PostgreSQL cluster (dropped with it).
#[derive(Debug)]
pub struct Coordinator {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub addr: std::net::SocketAddr,
    pub proc: Proc,
    starts: u32,
    store: StoreDb,
    /// Its store is shared with other coordinators (`start_sharing`): not dropped with it.
    shared_store: bool,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.proc.kill();
        if let StoreDb::Postgres { server, database } = &self.store
            && !self.shared_store
        {
            let _ = server.drop_database(database);
        }
    }
}

/// coordinator.toml's store lines for a new coordinator in `dir`, and the store they name.
fn new_store(dir: &Path) -> Result<(String, StoreDb)> {
    Ok(match pg::backend() {
        pg::Backend::Sqlite => (
            "database = \"coordinator.sqlite\"\n".to_string(),
            StoreDb::Sqlite(dir.join("coordinator.sqlite")),
        ),
        pg::Backend::Postgres => {
            let server = pg::Server::from_env();
            let database = server.create_database()?;
            (
                format!(
                    "database = \"{}\"\ndatabase_password_file = \"{}\"\n",
                    server.url(&database),
                    server.password_file.display()
                ),
                StoreDb::Postgres { server, database },
            )
        }
    })
}

impl Coordinator {
    /// Starts on an ephemeral port; `operators` are `name = role` pairs for its config.
    pub fn start(dir: &Path, pki: &Pki, operators: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(dir, pki, operators, "")
    }

    /// Like `start`, with `top_level` (lines of top-level keys such as `crl = "..."` or
    /// limits) added to coordinator.toml before its tables.
    pub fn start_with(
        dir: &Path,
        pki: &Pki,
        operators: &[(&str, &str)],
        top_level: &str,
    ) -> Result<Self> {
        Self::start_full(
            dir,
            pki,
            operators,
            top_level,
            "coordinator",
            &["127.0.0.1", "localhost"],
        )
    }

    /// Like `start`, with a certificate of its own: `coordinator/NAME` with `sans` (DNS names
    /// or IP addresses). Several coordinators of one PKI need distinct names (and dirs).
    pub fn start_named(
        dir: &Path,
        pki: &Pki,
        operators: &[(&str, &str)],
        name: &str,
        sans: &[&str],
    ) -> Result<Self> {
        Self::start_full(dir, pki, operators, "", name, sans)
    }

    /// A coordinator (certificate `coordinator/CERT_NAME`) on the PostgreSQL `database` of
    /// `server`, which other coordinators share (the caller creates and drops it).
    pub fn start_sharing(
        dir: &Path,
        pki: &Pki,
        operators: &[(&str, &str)],
        cert_name: &str,
        top_level: &str,
        server: &pg::Server,
        database: &str,
    ) -> Result<Self> {
        let shared = StoreDb::Postgres {
            server: server.clone(),
            database: database.to_string(),
        };
        let mut coord = Self::start_inner(
            dir,
            pki,
            operators,
            top_level,
            cert_name,
            &["127.0.0.1", "localhost"],
            Some(shared),
        )?;
        coord.shared_store = true;
        Ok(coord)
    }

    fn start_full(
        dir: &Path,
        pki: &Pki,
        operators: &[(&str, &str)],
        top_level: &str,
        name: &str,
        sans: &[&str],
    ) -> Result<Self> {
        Self::start_inner(dir, pki, operators, top_level, name, sans, None)
    }

    fn start_inner(
        dir: &Path,
        pki: &Pki,
        operators: &[(&str, &str)],
        top_level: &str,
        name: &str,
        sans: &[&str],
        shared: Option<StoreDb>,
    ) -> Result<Self> {
        let top_level = if top_level.is_empty() || top_level.ends_with('\n') {
            top_level.to_string()
        } else {
            format!("{top_level}\n")
        };
        let certs = pki.coordinator(name, sans)?;
        let mut ops = String::new();
        for (name, role) in operators {
            ops.push_str(&format!("{name} = \"{role}\"\n"));
        }
        let config = dir.join("coordinator.toml");
        let (database, store) = match shared {
            Some(StoreDb::Postgres { server, database }) => (
                format!(
                    "database = \"{}\"\ndatabase_password_file = \"{}\"\n",
                    server.url(&database),
                    server.password_file.display()
                ),
                StoreDb::Postgres { server, database },
            ),
            _ => new_store(dir)?,
        };
        let write = |listen: &str| {
            std::fs::write(
                &config,
                format!(
                    "listen = \"{listen}\"\n{database}heartbeat_interval_secs = 1\nshutdown_grace_secs = 5\n{top_level}\
                     [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[operators]\n{ops}",
                    pki.ca().display(),
                    certs.cert.display(),
                    certs.key.display()
                ),
            )
        };
        write("127.0.0.1:0").context("writing coordinator config")?;
        let (proc, addr) = Self::spawn(dir, &config, 1)?;
        // Pin the port so a restart comes back where agents expect it.
        write(&addr.to_string()).context("writing coordinator config")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            addr,
            proc,
            starts: 1,
            store,
            shared_store: false,
        })
    }

    fn spawn(dir: &Path, config: &Path, n: u32) -> Result<(Proc, std::net::SocketAddr)> {
        let mut cmd = Command::new(bin("rollback-coordinator"));
        cmd.arg("--config").arg(config).env("ROLLBACK_LOG", "info");
        let mut proc = Proc::spawn(cmd, dir.join(format!("coordinator-{n}.log")))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let log = proc.log_text();
            let addr = log
                .lines()
                .find(|l| l.contains("coordinator listening"))
                .and_then(|l| l.split("addr=Some(").nth(1))
                .and_then(|s| s.split(')').next())
                .and_then(|a| a.parse().ok());
            if let Some(addr) = addr {
                break addr;
            }
            if let Some(status) = proc.exited()? {
                bail!("coordinator exited ({status}) before listening:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("coordinator not listening after 20s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        Ok((proc, addr))
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The running process's pid (the same one as long as it was not restarted).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Sends SIGHUP (the coordinator reloads its CRL).
    pub fn sighup(&self) -> Result<()> {
        let pid = self.pid().context("coordinator not running")?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .context("sending SIGHUP to the coordinator")
    }

    /// SIGTERM and wait; returns whether it exited cleanly (status 0).
    pub fn stop(&mut self) -> Result<bool> {
        self.proc.terminate(Duration::from_secs(15))
    }

    /// Starts again on the same port, config and store.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.starts += 1;
        let (proc, addr) = Self::spawn(&self.dir, &self.config, self.starts)?;
        if addr != self.addr {
            bail!("coordinator came back on {addr}, expected {}", self.addr);
        }
        self.proc = proc;
        Ok(())
    }

    /// The coordinator's store, for SQL run behind its back.
    pub fn database(&self) -> StoreDb {
        self.store.clone()
    }

    /// Loads `runbook` (TOML) instead of the seed runbook: writes it beside the config, names
    /// it there and restarts on the same port and store.
    pub fn use_runbook(&mut self, runbook: &str) -> Result<()> {
        let path = self.dir.join("runbook.toml");
        std::fs::write(&path, runbook).with_context(|| format!("writing {}", path.display()))?;
        let config = std::fs::read_to_string(&self.config)
            .with_context(|| format!("reading {}", self.config.display()))?;
        // A top-level key, so it goes before the config's tables.
        std::fs::write(
            &self.config,
            format!("runbook = \"{}\"\n{config}", path.display()),
        )
        .with_context(|| format!("writing {}", self.config.display()))?;
        self.restart()
    }

    /// Appends `tables` (e.g. `[inventory."HOST"]`, the labels that target hosts, or
    /// `[approval]`) to the config and restarts on the same port and store.
    pub fn append_config(&mut self, tables: &str) -> Result<()> {
        let config = std::fs::read_to_string(&self.config)
            .with_context(|| format!("reading {}", self.config.display()))?;
        std::fs::write(&self.config, format!("{config}{tables}"))
            .with_context(|| format!("writing {}", self.config.display()))?;
        self.restart()
    }

    /// Puts simulated hosts `sim-00001`..`sim-{count}` in the inventory with `sim=yes` (what
    /// the simulator's agents report, which by itself targets nothing).
    pub fn label_simulated(&mut self, count: usize) -> Result<()> {
        let tables: String = (1..=count)
            .map(|i| format!("[inventory.\"sim-{i:05}\"]\nsim = \"yes\"\n"))
            .collect();
        self.append_config(&tables)
    }

    /// All logs of every start of this coordinator.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.join(format!("coordinator-{n}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// An agent process with its config and state dir in `dir`.
#[derive(Debug)]
pub struct Agent {
    pub host_id: String,
    pub proc: Proc,
    /// The agent's state dir (its cgroup subtree is named after it).
    pub state_dir: PathBuf,
    /// Whether dropping removes the cgroup subtree (not after `crash`).
    clean_up: bool,
}

impl Agent {
    /// SIGKILLs the agent and leaves everything as a crash would: its steps' processes and
    /// cgroups stay for the next agent start to find.
    pub fn crash(mut self) {
        self.proc.kill();
        self.clean_up = false;
    }
}

impl Drop for Agent {
    /// SIGKILLs the agent (as before) and removes the cgroup subtree it ran steps in, which
    /// only a clean stop removes itself.
    fn drop(&mut self) {
        self.proc.kill();
        if self.clean_up
            && let Some(subtree) = rollback_agent::contain::subtree_of(&self.state_dir)
        {
            rollback_agent::contain::remove_subtree(&subtree);
        }
    }
}

impl Agent {
    /// Starts an agent for `host_id` with `labels`, using `certs` (normally issued for it).
    pub fn start(
        dir: &Path,
        host_id: &str,
        labels: &[(&str, &str)],
        coordinator_url: &str,
        ca: &Path,
        certs: &CertFiles,
    ) -> Result<Self> {
        Self::start_with_profile(dir, host_id, labels, coordinator_url, ca, certs, "")
    }

    /// Like `start`, with host-profile sections (`[app]`, `[service]`, ...) appended to its
    /// agent.toml. The agent's files live in `DIR/agent-HOST` (state in `state/`).
    pub fn start_with_profile(
        dir: &Path,
        host_id: &str,
        labels: &[(&str, &str)],
        coordinator_url: &str,
        ca: &Path,
        certs: &CertFiles,
        profile: &str,
    ) -> Result<Self> {
        Self::start_with_settings(
            dir,
            host_id,
            labels,
            coordinator_url,
            ca,
            certs,
            "",
            profile,
        )
    }

    /// Like `start_with_profile`, with top-level agent.toml `settings` (lines such as
    /// `cert_check_secs = 1`) before the tables.
    #[allow(clippy::too_many_arguments)]
    pub fn start_with_settings(
        dir: &Path,
        host_id: &str,
        labels: &[(&str, &str)],
        coordinator_url: &str,
        ca: &Path,
        certs: &CertFiles,
        settings: &str,
        profile: &str,
    ) -> Result<Self> {
        let line = format!("coordinator = \"{coordinator_url}\"\n");
        Self::spawn(dir, host_id, labels, &line, ca, certs, settings, profile)
    }

    /// Like `start_with_profile`, configured with several coordinators
    /// (`coordinators = [...]` in agent.toml, tried in this order).
    pub fn start_with_coordinators(
        dir: &Path,
        host_id: &str,
        labels: &[(&str, &str)],
        coordinators: &[String],
        ca: &Path,
        certs: &CertFiles,
        profile: &str,
    ) -> Result<Self> {
        let line = coordinators_line(coordinators);
        Self::spawn(dir, host_id, labels, &line, ca, certs, "", profile)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        dir: &Path,
        host_id: &str,
        labels: &[(&str, &str)],
        coordinator_line: &str,
        ca: &Path,
        certs: &CertFiles,
        settings: &str,
        profile: &str,
    ) -> Result<Self> {
        let dir = dir.join(format!("agent-{host_id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut label_lines = String::new();
        for (k, v) in labels {
            label_lines.push_str(&format!("{k} = \"{v}\"\n"));
        }
        let config = dir.join("agent.toml");
        write_private(
            &config,
            format!(
                "host_id = \"{host_id}\"\n{coordinator_line}state_dir = \"state\"\n\
                 reconnect_initial_ms = 100\nreconnect_max_ms = 500\n{settings}[labels]\n{label_lines}\
                 [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{profile}",
                ca.display(),
                certs.cert.display(),
                certs.key.display()
            ),
        )
        .context("writing agent config")?;
        let mut cmd = Command::new(bin("rollback-agent"));
        cmd.arg("--config").arg(&config).env("ROLLBACK_LOG", "info");
        let proc = Proc::spawn(cmd, dir.join("agent.log"))?;
        Ok(Self {
            host_id: host_id.to_string(),
            proc,
            state_dir: dir.join("state"),
            clean_up: true,
        })
    }
}

/// The agent.toml line `coordinators = ["URL", ...]`.
pub fn coordinators_line(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("coordinators = [{}]\n", quoted.join(", "))
}

/// `rollback-agent --simulate COUNT`: COUNT whole agents in one process (hosts `sim-00001`
/// onwards, reporting label `sim=yes`, which targets nothing until the inventory says so) whose validated steps succeed without running; it issues their
/// certificates with the fleet CA in `pki`. Its state is in `DIR/sim-state`; killed when
/// dropped.
#[derive(Debug)]
pub struct Simulator {
    pub proc: Proc,
    pub state_dir: PathBuf,
}

impl Simulator {
    pub fn start(dir: &Path, coordinator_url: &str, pki: &Pki, count: usize) -> Result<Self> {
        let line = format!("coordinator = \"{coordinator_url}\"\n");
        Self::spawn(dir, &line, pki, count, 0)
    }

    /// Like `start`, with several coordinators (`coordinators = [...]`): simulated host `i`
    /// starts at the `(i - 1) mod n`-th.
    pub fn start_with_coordinators(
        dir: &Path,
        coordinators: &[String],
        pki: &Pki,
        count: usize,
    ) -> Result<Self> {
        Self::spawn(dir, &coordinators_line(coordinators), pki, count, 0)
    }

    /// Like `start_with_coordinators`, each simulated step taking `step_ms` (a job that runs
    /// long enough to kill its coordinator during it).
    pub fn start_slow(
        dir: &Path,
        coordinators: &[String],
        pki: &Pki,
        count: usize,
        step_ms: u64,
    ) -> Result<Self> {
        Self::spawn(dir, &coordinators_line(coordinators), pki, count, step_ms)
    }

    fn spawn(
        dir: &Path,
        coordinator_line: &str,
        pki: &Pki,
        count: usize,
        step_ms: u64,
    ) -> Result<Self> {
        let state_dir = dir.join("sim-state");
        let config = dir.join("sim.toml");
        write_private(
            &config,
            format!(
                "host_id = \"sim\"\n{coordinator_line}state_dir = \"{state}\"\n\
                 reconnect_initial_ms = 100\nreconnect_max_ms = 500\n\
                 [labels]\nsim = \"yes\"\n\
                 [tls]\nca = \"{ca}\"\ncert = \"{ca}\"\nkey = \"{ca}\"\n\
                 [service]\nunit = \"app.service\"\n\
                 [app]\ndir = \"{state}\"\nhealth_base_url = \"http://127.0.0.1:9\"\n\
                 [postgres]\npg_dump = \"/bin/true\"\npg_restore = \"/bin/true\"\nhost = \"127.0.0.1\"\n\
                 user = \"sim\"\ndatabase = \"sim\"\nbackup_dir = \"{state}\"\n",
                state = state_dir.display(),
                ca = pki.ca().display(),
            ),
        )
        .context("writing the simulator's config")?;
        let mut cmd = Command::new(bin("rollback-agent"));
        cmd.arg("--config")
            .arg(&config)
            .arg("--simulate")
            .arg(count.to_string())
            .arg("--simulate-pki")
            .arg(&pki.dir)
            .arg("--simulate-step-ms")
            .arg(step_ms.to_string())
            .env("ROLLBACK_LOG", "info");
        let proc = Proc::spawn(cmd, dir.join("simulator.log"))?;
        Ok(Self { proc, state_dir })
    }

    /// How many runs simulated host `host` has in its journal.
    /// (A record being rewritten — `.RUN.tmp`, e.g. while its acknowledgement is saved — is
    /// the same run: only the records themselves are counted.)
    pub fn journaled_runs(&self, host: &str) -> usize {
        journal_records(&self.state_dir.join(host).join("runs"))
    }
}

/// How many run records an agent's journal directory (`STATE_DIR/runs`) holds: `RUN.json`
/// files. A record being rewritten (`.RUN.tmp`) is the same run and is not counted, nor is an
/// acknowledgement marker (`RUN.acked`).
pub fn journal_records(runs_dir: &Path) -> usize {
    std::fs::read_dir(runs_dir).map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.') && name.ends_with(".json")
            })
            .count()
    })
}

/// Runs `rollbackctl` with an operator's certificate against `coordinator_url`.
pub fn rollbackctl(
    coordinator_url: &str,
    ca: &Path,
    op: &CertFiles,
    args: &[&str],
) -> Result<Output> {
    rollbackctl_command(coordinator_url, ca, op, args)
        .output()
        .context("running rollbackctl")
}

/// Runs `cmd` (output captured) and fails, killing it, if it has not exited within
/// `timeout`: for a command that a bug would leave waiting forever.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.with_context(|| format!("waiting for {cmd:?}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            bail!("{cmd:?} had not exited after {timeout:?} (killed)")
        }
    }
}

/// The `rollbackctl` command `rollbackctl` runs, for a test that starts it and goes on.
pub fn rollbackctl_command(
    coordinator_url: &str,
    ca: &Path,
    op: &CertFiles,
    args: &[&str],
) -> Command {
    let mut cmd = Command::new(bin("rollbackctl"));
    cmd.arg("--coordinator")
        .arg(coordinator_url)
        .arg("--ca")
        .arg(ca)
        .arg("--cert")
        .arg(&op.cert)
        .arg("--key")
        .arg(&op.key)
        .args(args)
        .env_remove("ROLLBACK_CONFIG")
        .env("HOME", "/nonexistent");
    cmd
}

/// `rollbackctl agents --output json [--select SEL]`, parsed; fails unless it exits 0.
pub fn agents_json(
    coordinator_url: &str,
    ca: &Path,
    op: &CertFiles,
    select: Option<&str>,
) -> Result<Vec<serde_json::Value>> {
    let mut args = vec!["agents", "--output", "json"];
    if let Some(sel) = select {
        args.extend(["--select", sel]);
    }
    let out = rollbackctl(coordinator_url, ca, op, &args)?;
    if !out.status.success() {
        bail!(
            "rollbackctl agents failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing rollbackctl agents --output json")
}

/// `rollbackctl --output json exec HOST ACTION PARAMS...` (plus `extra` flags), parsed. The
/// JSON document is printed for succeeded and failed steps alike; the exit status is returned.
pub fn exec_json(
    coordinator_url: &str,
    ca: &Path,
    op: &CertFiles,
    host: &str,
    action: &str,
    params: &[&str],
    extra: &[&str],
) -> Result<(bool, serde_json::Value, String)> {
    let mut args = vec!["--output", "json", "exec", host, action];
    args.extend(params);
    args.extend(extra);
    // A mutating action needs a reason; tests give one unless they test its absence.
    if !extra.contains(&"--reason") {
        args.extend(["--reason", "test"]);
    }
    let out = rollbackctl(coordinator_url, ca, op, &args)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("rollbackctl exec printed no JSON; stderr: {stderr}"))?;
    Ok((out.status.success(), doc, stderr))
}

/// Peak resident memory (VmHWM) of a process in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))
}

/// Pids of every process whose process group is `pgid`.
pub fn pids_in_group(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .is_some_and(|stat| {
                    // Fields after the command name (which may hold spaces) start after the last ')'.
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(2).map(String::from))
                        .and_then(|g| g.parse::<i32>().ok())
                        == Some(pgid)
                })
        })
        .collect()
}

/// Whether the current process runs as root.
/// Writes a file only its owner may read (mode 0600 from creation), as the agent requires of
/// its agent.toml.
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(contents.as_ref())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}
