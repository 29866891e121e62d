//! [`Lab`]: booting a fleet lab (network, hosts, database, app), attaching to a running one,
//! and tearing it down — explicitly or on drop, also when a test panics.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use super::boot::{self, Launched};
use super::footprint::Footprint;
use super::spec::{self, COORDINATOR, DB_HOST, LabSpec, Names};
use super::state::{AllocationLock, Host, LabState, Role};
use super::{app, cmd, net, postgres, prerequisites, rootfs, teardown, venv};

/// A running fleet lab. Dropping it tears it down unless [`Lab::keep_running`] was called.
pub struct Lab {
    pub(crate) state: LabState,
    pub(crate) names: Names,
    pub(crate) timeout: Duration,
    extra_paths: Vec<PathBuf>,
    launchers: Mutex<Vec<Child>>,
    /// Torn down already (or left running on purpose).
    done: bool,
    /// Booted by this value: tear down on drop. An attached lab is only torn down by an
    /// explicit [`Lab::teardown`].
    owned: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Boots a lab: removes a stale lab of the same name first, then the network, the hosts
    /// (in parallel), the database and the sample app, as `spec` says.
    ///
    /// A host's own systemd has (rarely, with several labs booting at once on two cores) been
    /// seen to exit during boot. That is the test machine, not the product under test, so the
    /// lab is then torn down and booted once more, saying so on stderr with the first error.
    pub fn boot(spec: LabSpec) -> Result<Lab> {
        match Lab::boot_once(spec.clone()) {
            Err(e) if is_host_boot_failure(&e) => {
                eprintln!(
                    "lab {}: a host did not boot ({e:#}); tearing down and booting once more",
                    spec.name
                );
                Lab::boot_once(spec)
            }
            other => other,
        }
    }

    fn boot_once(spec: LabSpec) -> Result<Lab> {
        spec.validate()?;
        prerequisites::check().map_err(|reason| anyhow!("lab {}: {reason}", spec.name))?;
        let venv = if spec.database || spec.deploy_app {
            venv::locate()?
        } else {
            venv::default_dir()
        };
        let names = Names::new(&spec.name);
        if Lab::remove(&spec.name)? {
            eprintln!(
                "lab {}: removed a stale lab left by an earlier run",
                spec.name
            );
        }
        let state = {
            let _lock = AllocationLock::acquire()?;
            let subnet = super::state::free_subnet(&spec.name)?;
            for dir in [
                names.ns_dir(),
                names.state_dir().join("hosts"),
                names.shared_dir(),
            ] {
                fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let state = LabState {
                name: spec.name.clone(),
                subnet,
                hosts: Vec::new(),
                netns: Vec::new(),
                coordinator_addr: spec::node_addr(subnet, COORDINATOR),
                venv,
                app_deployed: false,
            };
            state.save()?;
            state
        };
        let mut lab = Lab {
            state,
            names,
            timeout: spec.step_timeout,
            extra_paths: spec.shared_paths.clone(),
            launchers: Mutex::new(Vec::new()),
            done: false,
            owned: true,
        };
        // On error `lab` drops here and tears down what was built.
        lab.bring_up(&spec)
            .with_context(|| format!("booting lab {}", spec.name))?;
        Ok(lab)
    }

    /// Attaches to a lab that is up (booted by `cargo xtask lab up` or another process).
    /// Dropping an attached lab leaves it running; [`Lab::teardown`] removes it.
    pub fn attach(name: &str) -> Result<Lab> {
        spec::validate_name(name)?;
        let state = LabState::load(name)?;
        Ok(Lab {
            names: Names::new(name),
            state,
            timeout: Duration::from_secs(60),
            extra_paths: Vec::new(),
            launchers: Mutex::new(Vec::new()),
            done: false,
            owned: false,
        })
    }

    /// Removes every trace of lab `name` (running, half-booted or stale). Returns whether
    /// anything was there.
    pub fn remove(name: &str) -> Result<bool> {
        spec::validate_name(name)?;
        let state = LabState::load(name).ok();
        let existed = state.is_some() || !Footprint::collect(name, None).leftovers().is_empty();
        if existed {
            teardown::remove(name, state.as_ref(), &mut Vec::new())?;
        }
        Ok(existed)
    }

    /// Tears the lab down and verifies nothing is left. Idempotent.
    pub fn teardown(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut launchers =
            std::mem::take(&mut *self.launchers.lock().unwrap_or_else(|p| p.into_inner()));
        teardown::remove(&self.state.name, Some(&self.state), &mut launchers)
    }

    /// Leaves the lab running after this value is gone (its state file stays; `Lab::attach`
    /// or `Lab::remove` find it).
    pub fn keep_running(mut self) {
        self.done = true;
        // The launchers are reparented when this process exits; dropping a Child neither
        // kills nor waits.
        drop(std::mem::take(
            &mut *self.launchers.lock().unwrap_or_else(|p| p.into_inner()),
        ));
    }

    /// The lab's traces, for checking after teardown that nothing remains.
    pub fn footprint(&self) -> Footprint {
        Footprint::collect(&self.state.name, Some(&self.state))
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The lab's subnet, e.g. "10.77.3.0/24".
    pub fn subnet(&self) -> String {
        format!("10.77.{}.0/24", self.state.subnet)
    }

    /// All hosts with systemd: the database host first (if any), then `app1`…
    pub fn hosts(&self) -> &[Host] {
        &self.state.hosts
    }

    pub fn app_hosts(&self) -> Vec<&Host> {
        self.state
            .hosts
            .iter()
            .filter(|h| h.role == Role::App)
            .collect()
    }

    /// Ids of the app hosts.
    pub fn app_host_ids(&self) -> Vec<String> {
        self.app_hosts().iter().map(|h| h.id.clone()).collect()
    }

    pub fn host(&self, id: &str) -> Result<&Host> {
        self.state.host(id)
    }

    pub fn db_host(&self) -> Result<&Host> {
        self.state.host(DB_HOST)
    }

    /// Address of the coordinator's namespace on the bridge.
    pub fn coordinator_addr(&self) -> Ipv4Addr {
        self.state.coordinator_addr
    }

    /// Network namespace name of the coordinator.
    pub fn coordinator_netns(&self) -> String {
        self.names.node(COORDINATOR)
    }

    /// Directory shared by every host (root-namespace path); inside hosts it is
    /// [`SHARED_MOUNT`](super::SHARED_MOUNT).
    pub fn shared_dir(&self) -> PathBuf {
        self.names.shared_dir()
    }

    /// The Python venv with alembic and psycopg2 the hosts use.
    pub fn venv(&self) -> &Path {
        &self.state.venv
    }

    /// Whether the sample app was deployed at boot.
    pub fn app_deployed(&self) -> bool {
        self.state.app_deployed
    }

    /// Network namespace of a host id or of [`COORDINATOR`].
    pub(crate) fn netns_of(&self, node: &str) -> Result<String> {
        if node == COORDINATOR {
            return Ok(self.coordinator_netns());
        }
        Ok(self.host(node)?.netns.clone())
    }

    fn bring_up(&mut self, spec: &LabSpec) -> Result<()> {
        let ns_dir = self.names.ns_dir();
        cmd::run(
            Command::new("mount")
                .arg("--bind")
                .arg(&ns_dir)
                .arg(&ns_dir),
            None,
            cmd::DEFAULT_TIMEOUT,
        )?;
        cmd::run(
            Command::new("mount").arg("--make-private").arg(&ns_dir),
            None,
            cmd::DEFAULT_TIMEOUT,
        )?;
        self.build_network(spec)?;
        if spec.deploy_app {
            app::build_origin(&self.names.shared_dir())
                .context("building the app's origin repository")?;
        }
        self.boot_hosts()?;
        if spec.database {
            postgres::setup(self)?;
        }
        if spec.deploy_app {
            app::deploy(self)?;
            self.state.app_deployed = true;
            self.state.save()?;
        }
        Ok(())
    }

    fn build_network(&mut self, spec: &LabSpec) -> Result<()> {
        let fabric = self.names.fabric();
        self.state.netns.push(fabric.clone());
        self.state.save()?;
        net::create_fabric(&fabric)?;
        let mut nodes = vec![(COORDINATOR.to_string(), None)];
        if spec.database {
            nodes.push((DB_HOST.to_string(), Some(Role::Database)));
        }
        nodes.extend((1..=spec.app_hosts).map(|n| (spec::app_host_id(n), Some(Role::App))));
        for (id, role) in nodes {
            let netns = self.names.node(&id);
            let addr = spec::node_addr(self.state.subnet, &id);
            self.state.netns.push(netns.clone());
            if let Some(role) = role {
                let host = Host {
                    id: id.clone(),
                    role,
                    addr,
                    netns: netns.clone(),
                    systemd: None,
                    launcher: None,
                    cgroups: Vec::new(),
                };
                self.state.hosts.push(host);
            }
            self.state.save()?;
            net::create_node(&fabric, &id, &netns, addr)?;
        }
        Ok(())
    }

    fn boot_hosts(&mut self) -> Result<()> {
        let timeout = self.timeout;
        let names = &self.names;
        // The checkout (assets, built binaries) and the venv must be visible inside hosts.
        let mut binds: Vec<PathBuf> = vec![venv::workspace_root(), self.state.venv.clone()];
        binds.extend(self.extra_paths.iter().cloned());
        binds.retain(|d| d.is_absolute() && d.is_dir() && rootfs::needs_bind(d));
        binds.sort();
        binds.dedup();
        let binds = &binds;
        let jobs: Vec<(String, String)> = self
            .state
            .hosts
            .iter()
            .map(|h| (h.id.clone(), h.netns.clone()))
            .collect();
        // Each host: what was launched (kept even when booting then failed, for teardown)
        // and the error, if any.
        let results: Vec<(String, Option<Launched>, Option<anyhow::Error>)> = thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(id, netns)| {
                    s.spawn(
                        move || match boot::launch(names, id, netns, binds, timeout) {
                            Err(e) => (id.clone(), None, Some(e)),
                            Ok(l) => {
                                let waited = boot::wait_running(id, l.systemd.pid, timeout)
                                    .map_err(|e| {
                                        // What the host's systemd printed says why it stopped.
                                        let log =
                                            fs::read_to_string(names.host_dir(id).join("boot.log"))
                                                .unwrap_or_default();
                                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                                        let tail: Vec<&str> = tail.into_iter().rev().collect();
                                        e.context(format!(
                                            "host {id}: boot.log ends with:\n{}",
                                            tail.join("\n")
                                        ))
                                    })
                                    .err();
                                (id.clone(), Some(l), waited)
                            }
                        },
                    )
                })
                .collect();
            handles
                .into_iter()
                .zip(&jobs)
                .map(|(h, (id, _))| {
                    h.join().unwrap_or_else(|_| {
                        (
                            id.clone(),
                            None,
                            Some(anyhow!("host {id}: boot thread panicked")),
                        )
                    })
                })
                .collect()
        });
        let mut first_error = None;
        for (id, launched, error) in results {
            if let Some(l) = launched {
                if let Some(host) = self.state.host_mut(&id) {
                    host.systemd = Some(l.systemd);
                    host.launcher = Some(l.launcher_record);
                    host.cgroups = l.cgroups;
                }
                self.launchers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(l.launcher);
            }
            if let Some(e) = error {
                first_error.get_or_insert(e);
            }
        }
        self.state.save()?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("lab {}: teardown failed: {e:#}", self.state.name);
        }
    }
}

/// Whether `e` says a host's systemd died or never came up during boot.
fn is_host_boot_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let m = c.to_string();
        m.contains("systemd to finish booting")
            || m.contains("systemd to start")
            || m.contains("launcher exited")
    })
}
