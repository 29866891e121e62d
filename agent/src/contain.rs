//! Nothing of a step outlives it: every process a step spawns runs in a cgroup of its own
//! (cgroup v2), under `<agent's cgroup>/rollback-agent-<id>/`, where `<id>` is derived from
//! the state dir so a restarted agent finds what its predecessor left. When the process ends,
//! the cgroup is killed whole (`cgroup.kill`): a background child, a grandchild that called
//! `setsid`, a double-forked daemon — none survive. At start, every step cgroup found is a
//! step of a crashed agent: it is killed and removed.
//!
//! Under systemd the agent's unit should say `Delegate=yes` (the subtree is then the agent's
//! by contract). Where no writable cgroup v2 hierarchy exists (not root, no cgroup2 mount),
//! steps fall back to process groups only, and the agent says so at start.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// Prefix of a step cgroup's directory name.
const STEP_PREFIX: &str = "step-";
/// How long a killed cgroup may take to empty before it is left for the next start.
const EMPTY_WAIT: Duration = Duration::from_secs(5);

static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(1);

/// The cgroup v2 directory the calling process is in, from /proc/self/mountinfo and
/// /proc/self/cgroup.
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split(' ').collect();
        let (Some(root), Some(mount)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mount = unescape(mount);
        let rel = path
            .strip_prefix(root)
            .unwrap_or(path)
            .trim_start_matches('/');
        return Some(Path::new(&mount).join(rel));
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(digits) = s.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This agent's subtree for `state_dir`: `rollback-agent-<first 8 bytes of sha256(state dir)>`.
fn subtree_name(state_dir: &Path) -> String {
    let canonical = state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("rollback-agent-{hex}")
}

/// Sets up containment at start: creates the agent's subtree, then kills and removes every
/// step cgroup a previous agent left (its processes were orphaned by a crash). Returns what
/// was reaped as (cgroup name, processes killed).
pub fn init(state_dir: &Path) -> Vec<(String, usize)> {
    let root = match subtree_of(state_dir) {
        Some(root) => match std::fs::create_dir_all(&root) {
            Ok(()) if root.join("cgroup.procs").exists() => Some(root),
            Ok(()) => None,
            Err(e) => {
                warn!(cgroup = %root.display(), error = %e, "cannot create the agent's cgroup subtree");
                None
            }
        },
        None => None,
    };
    match &root {
        Some(r) => info!(cgroup = %r.display(), "each step runs in its own cgroup under this one"),
        None => warn!(
            "no writable cgroup v2 hierarchy: steps run in process groups only, and a step's process that calls setsid can outlive it; run the agent as root under systemd with Delegate=yes"
        ),
    }
    let reaped = root.as_deref().map(reap).unwrap_or_default();
    let _ = ROOT.set(root);
    reaped
}

/// The subtree an agent with `state_dir` started by this process (or in this cgroup) uses.
pub fn subtree_of(state_dir: &Path) -> Option<PathBuf> {
    own_cgroup_dir().map(|dir| dir.join(subtree_name(state_dir)))
}

/// Kills what is left in a subtree and removes it (at a clean agent stop, or by whoever ran
/// an agent that is gone for good, e.g. a test).
pub fn remove_subtree(root: &Path) {
    reap(root);
    let _ = std::fs::remove_dir(root);
}

/// At a clean stop: removes this agent's subtree (steps have ended by then).
pub fn shutdown() {
    if let Some(Some(root)) = ROOT.get() {
        remove_subtree(root);
    }
}

/// Kills and removes every step cgroup under `root`.
fn reap(root: &Path) -> Vec<(String, usize)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(STEP_PREFIX) || !e.path().is_dir() {
            continue;
        }
        let cg = StepCgroup::at(e.path());
        let killed = cg.kill();
        cg.wait_empty_blocking();
        cg.remove();
        reaped.push((name, killed));
    }
    reaped
}

/// A step process's cgroup. Dropped without `remove` (an error path), it is killed and
/// removed then, or left for the next start if it cannot be.
#[derive(Debug)]
pub struct StepCgroup {
    dir: PathBuf,
    removed: std::sync::atomic::AtomicBool,
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        if !self.removed.load(Ordering::Relaxed) {
            self.kill();
            self.remove();
        }
    }
}

impl StepCgroup {
    /// A fresh cgroup for one process of a step, or `None` without containment.
    pub fn create() -> Result<Option<Self>, std::io::Error> {
        let Some(Some(root)) = ROOT.get() else {
            return Ok(None);
        };
        let name = format!(
            "{STEP_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = root.join(name);
        std::fs::create_dir(&dir)?;
        Ok(Some(Self::at(dir)))
    }

    fn at(dir: PathBuf) -> Self {
        Self {
            dir,
            removed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The file a process writes `0` into to join.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Pids in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Sends `signal` to every process in the cgroup.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Kills everything in the cgroup (`cgroup.kill`, or SIGKILL to each pid where the kernel
    /// has no `cgroup.kill`); returns how many processes were there.
    pub fn kill(&self) -> usize {
        let n = self.pids().len();
        if n > 0 && std::fs::write(self.dir.join("cgroup.kill"), "1").is_err() {
            // Older kernels: freeze-free best effort, repeated in wait_empty.
            self.signal(nix::sys::signal::Signal::SIGKILL);
        }
        n
    }

    fn populated(&self) -> bool {
        match std::fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l == "populated 1"),
            Err(_) => !self.pids().is_empty(),
        }
    }

    /// Waits (async) until the killed cgroup is empty, re-killing newcomers.
    pub async fn wait_empty(&self) -> bool {
        let deadline = Instant::now() + EMPTY_WAIT;
        while self.populated() {
            if Instant::now() > deadline {
                return false;
            }
            self.kill();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    fn wait_empty_blocking(&self) -> bool {
        let deadline = Instant::now() + EMPTY_WAIT;
        while self.populated() {
            if Instant::now() > deadline {
                return false;
            }
            self.kill();
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Removes the (empty) cgroup; one that cannot be removed is left for the next start.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Relaxed);
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            warn!(cgroup = %self.dir.display(), error = %e, "step cgroup not removed; the next agent start removes it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/sys/fs/cgroup/a\040b"), "/sys/fs/cgroup/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"\04"), r"\04");
    }

    #[test]
    fn the_subtree_is_stable_per_state_dir() {
        let a = subtree_name(Path::new("/var/lib/rollback-agent"));
        assert_eq!(a, subtree_name(Path::new("/var/lib/rollback-agent")));
        assert_ne!(a, subtree_name(Path::new("/var/lib/other")));
        assert!(a.starts_with("rollback-agent-") && a.len() == "rollback-agent-".len() + 16);
    }
}
