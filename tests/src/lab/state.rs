//! The state file of a lab (/run/rollback-lab/NAME/state.json): written before anything is
//! created and updated as parts come up, so a lab left by a killed run can be found and
//! removed, and so `cargo xtask lab` can attach to a running lab.

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::procfs::ProcRecord;
use super::spec::{Names, STATE_ROOT};

/// What a host is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    App,
    Database,
}

/// One booted host: a network namespace with its own systemd as PID 1.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub(crate) id: String,
    pub(crate) role: Role,
    pub(crate) addr: Ipv4Addr,
    pub(crate) netns: String,
    /// The host's systemd (PID 1 inside), once started.
    pub(crate) systemd: Option<ProcRecord>,
    /// The `unshare` parent of that systemd (outside the host's pid namespace).
    pub(crate) launcher: Option<ProcRecord>,
    /// The host's private cgroups, one per hierarchy.
    pub(crate) cgroups: Vec<PathBuf>,
}

impl Host {
    /// Host id, also its hostname: `app1`, …, `db`.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The host's address on the lab bridge.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Name of its network namespace (under /run/netns).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Pid (in the root pid namespace) of the host's systemd.
    pub fn systemd_pid(&self) -> Option<i32> {
        self.systemd.map(|p| p.pid)
    }

    /// The host's systemd as a process record (pid + start time), to check later that this
    /// very process is gone.
    pub fn systemd_process(&self) -> Option<ProcRecord> {
        self.systemd
    }
}

/// Everything recorded about one lab instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    /// Third octet of the lab's subnet 10.77.X.0/24.
    pub subnet: u8,
    pub hosts: Vec<Host>,
    /// Network namespaces created so far (fabric, coordinator, hosts).
    pub netns: Vec<String>,
    pub coordinator_addr: Ipv4Addr,
    pub venv: PathBuf,
    pub app_deployed: bool,
}

impl LabState {
    pub fn save(&self) -> Result<()> {
        let names = Names::new(&self.name);
        let path = names.state_file();
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).context("serializing lab state")?;
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    pub fn load(name: &str) -> Result<LabState> {
        let path = Names::new(name).state_file();
        let text = fs::read_to_string(&path)
            .with_context(|| format!("lab {name}: reading {} (is the lab up?)", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("lab {name}: parsing {}", path.display()))
    }

    pub fn host(&self, id: &str) -> Result<&Host> {
        match self.hosts.iter().find(|h| h.id == id) {
            Some(h) => Ok(h),
            None => {
                let known: Vec<&str> = self.hosts.iter().map(|h| h.id.as_str()).collect();
                bail!(
                    "lab {}: no host {id:?} (hosts: {})",
                    self.name,
                    known.join(", ")
                )
            }
        }
    }

    pub fn host_mut(&mut self, id: &str) -> Option<&mut Host> {
        self.hosts.iter_mut().find(|h| h.id == id)
    }
}

/// Holds the machine-wide allocation lock (released on drop).
pub struct AllocationLock(#[allow(dead_code)] fs::File);

impl AllocationLock {
    pub fn acquire() -> Result<AllocationLock> {
        fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
        let path = Path::new(STATE_ROOT).join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(AllocationLock(file))
    }
}

/// Names of labs that have a state directory on this machine.
pub fn known_labs() -> Vec<String> {
    let Ok(entries) = fs::read_dir(STATE_ROOT) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The lowest subnet octet not used by another lab's state file. Call with the lock held.
pub fn free_subnet(except: &str) -> Result<u8> {
    let used: BTreeSet<u8> = known_labs()
        .iter()
        .filter(|n| n.as_str() != except)
        .filter_map(|n| LabState::load(n).ok())
        .map(|s| s.subnet)
        .collect();
    match (1..=254u8).find(|o| !used.contains(o)) {
        Some(octet) => Ok(octet),
        None => {
            bail!("no free lab subnet in 10.77.1-254.0/24: remove stale labs under {STATE_ROOT}")
        }
    }
}
