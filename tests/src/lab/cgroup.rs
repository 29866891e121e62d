//! Private cgroups per host, so each host's systemd gets its own subtree in every hierarchy it
//! manages instead of colliding with other hosts in the shared root cgroup.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Hierarchies a host's systemd is given a private subtree in (directory names under
/// /sys/fs/cgroup; "unified" is the cgroup2 mount of a hybrid setup).
const HIERARCHIES: &[&str] = &["systemd", "unified", "pids", "devices", "memory"];

/// The directory of hierarchy `name` the calling process is in, e.g.
/// /sys/fs/cgroup/memory/some/path, from /proc/self/cgroup.
fn own_cgroup_dir(name: &str) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match name {
            "unified" => id == "0" && controllers.is_empty(),
            "systemd" => controllers == "name=systemd",
            other => controllers.split(',').any(|c| c == other),
        };
        if matches {
            let base = Path::new(CGROUP_ROOT).join(name);
            return Some(base.join(path.trim_start_matches('/')));
        }
    }
    None
}

/// Creates `leaf` under the caller's cgroup in every hierarchy present; returns the created
/// directories (teardown removes them).
pub fn create(leaf: &str) -> Result<Vec<PathBuf>> {
    let mut made = Vec::new();
    for name in HIERARCHIES {
        if !Path::new(CGROUP_ROOT)
            .join(name)
            .join("cgroup.procs")
            .exists()
        {
            continue;
        }
        let Some(parent) = own_cgroup_dir(name) else {
            continue;
        };
        let dir = parent.join(leaf);
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        made.push(dir);
    }
    Ok(made)
}

/// Pids in a cgroup and all its descendants.
pub fn pids_within(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for d in dirs_deepest_first(dir) {
        if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids
}

/// Removes a cgroup and its descendants (they must be empty of processes). Missing is fine.
pub fn remove(dir: &Path) -> Result<()> {
    for d in dirs_deepest_first(dir) {
        match fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", d.display())),
        }
    }
    Ok(())
}

fn dirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(dirs_deepest_first(&e.path()));
            }
        }
    }
    if dir.is_dir() {
        out.push(dir.to_path_buf());
    }
    out
}

/// Cgroup directories named `prefix*` anywhere in the hierarchies, up to a few levels deep
/// (where a stale lab's cgroups would be).
pub fn find_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for name in HIERARCHIES {
        search(&Path::new(CGROUP_ROOT).join(name), prefix, 4, &mut found);
    }
    found
}

fn search(dir: &Path, prefix: &str, depth: usize, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix))
        {
            found.push(e.path());
        } else if depth > 0 {
            search(&e.path(), prefix, depth - 1, found);
        }
    }
}
