//! Everything a lab instance may have left on the machine — namespaces, cgroups, mounts,
//! processes (PostgreSQL included), its state directory — found by record and by name
//! prefix, so teardown can remove it and tests can assert that nothing remains.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use super::procfs::{self, ProcRecord};
use super::spec::Names;
use super::state::LabState;
use super::{cgroup, net};

/// The traces of one lab instance. Cheap to clone; keep one from before a teardown (or a
/// panic) to check afterwards that nothing remains.
#[derive(Debug, Clone)]
pub struct Footprint {
    name: String,
    names: Names,
    /// Recorded processes (systemd of each host and its launcher).
    processes: Vec<ProcRecord>,
    cgroups: Vec<PathBuf>,
    netns: Vec<String>,
    /// Inodes of the lab's network namespaces and of its hosts' pid namespaces.
    net_inodes: BTreeSet<u64>,
    pid_inodes: BTreeSet<u64>,
}

impl Footprint {
    /// The footprint known from a state (if any) plus whatever carries the lab's name prefix.
    pub fn collect(name: &str, state: Option<&LabState>) -> Footprint {
        let names = Names::new(name);
        let mut fp = Footprint {
            name: name.to_string(),
            names: names.clone(),
            processes: Vec::new(),
            cgroups: cgroup::find_with_prefix(&names.prefix()),
            netns: net::netns_with_prefix(&names.prefix()),
            net_inodes: BTreeSet::new(),
            pid_inodes: BTreeSet::new(),
        };
        if let Some(state) = state {
            for host in &state.hosts {
                fp.processes
                    .extend(host.systemd.iter().chain(host.launcher.iter()).copied());
                fp.cgroups.extend(host.cgroups.iter().cloned());
            }
            fp.netns.extend(state.netns.iter().cloned());
        }
        fp.cgroups.sort();
        fp.cgroups.dedup();
        fp.netns.sort();
        fp.netns.dedup();
        fp.refresh_inodes();
        fp
    }

    /// Learns the namespace inodes of what still exists (call again after more has booted).
    pub fn refresh_inodes(&mut self) {
        for ns in &self.netns {
            if let Some(ino) = procfs::ns_file_inode(&net::netns_path(ns)) {
                self.net_inodes.insert(ino);
            }
        }
        for p in &self.processes {
            if p.is_running()
                && procfs::Stat::read(p.pid).is_some_and(|s| s.comm == "systemd")
                && let Some(ino) = procfs::ns_inode(p.pid, "pid")
            {
                self.pid_inodes.insert(ino);
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cgroups(&self) -> &[PathBuf] {
        &self.cgroups
    }

    pub fn netns(&self) -> &[String] {
        &self.netns
    }

    /// Live (non-zombie) processes that belong to the lab: recorded ones, any in its cgroups,
    /// its network namespaces or its hosts' pid namespaces.
    pub fn live_processes(&self) -> Vec<i32> {
        let marker = format!("/{}", self.names.prefix());
        // Namespace inodes are recycled: once this lab's namespaces are gone, another lab
        // booting at the same time can get the same inode numbers. A network namespace inode
        // that another (named) namespace now has is no longer this lab's; a pid namespace is
        // this lab's only while its recorded systemd runs (when it dies, the kernel kills the
        // rest of that namespace).
        let reused = other_netns_inodes(&self.names.prefix());
        let net_inodes: BTreeSet<u64> = self.net_inodes.difference(&reused).copied().collect();
        let pid_inodes: BTreeSet<u64> = self
            .processes
            .iter()
            .filter(|p| p.is_running())
            .filter_map(|p| procfs::ns_inode(p.pid, "pid"))
            .filter(|i| self.pid_inodes.contains(i))
            .collect();
        let mut pids: BTreeSet<i32> = self
            .processes
            .iter()
            .filter(|p| p.is_running())
            .map(|p| p.pid)
            .collect();
        for pid in procfs::all_pids() {
            let Some(stat) = procfs::Stat::read(pid) else {
                continue;
            };
            if stat.state == 'Z' || pid == std::process::id() as i32 {
                continue;
            }
            let cgroups = procfs::cgroup_lines(pid);
            let in_cgroup = cgroups.iter().any(|l| l.contains(&marker));
            // A process in another lab's cgroup is that lab's, whatever namespace inode it
            // shares with a namespace this lab once had.
            let other_lab = !in_cgroup
                && cgroups
                    .iter()
                    .any(|l| l.contains(&format!("/{}", super::spec::NAME_PREFIX)));
            if other_lab {
                continue;
            }
            let in_net = procfs::ns_inode(pid, "net").is_some_and(|i| net_inodes.contains(&i));
            let in_pid = procfs::ns_inode(pid, "pid").is_some_and(|i| pid_inodes.contains(&i));
            if in_cgroup || in_net || in_pid {
                pids.insert(pid);
            }
        }
        pids.into_iter().collect()
    }

    /// Mount points (of the calling mount namespace) inside the lab's state directory,
    /// deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let dir = self.names.state_dir();
        let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
            return Vec::new();
        };
        let mut found: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mountinfo)
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&dir))
            .collect();
        found.sort();
        found.dedup();
        found.reverse();
        found
    }

    /// What is left of the lab, one line per item; empty when the lab is fully gone.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let mut netns = self.netns.clone();
        netns.extend(net::netns_with_prefix(&self.names.prefix()));
        netns.sort();
        netns.dedup();
        left.extend(
            netns
                .iter()
                .filter(|n| net::netns_path(n).exists())
                .map(|n| format!("network namespace {n}")),
        );
        let mut cgroups = self.cgroups.clone();
        cgroups.extend(cgroup::find_with_prefix(&self.names.prefix()));
        cgroups.sort();
        cgroups.dedup();
        left.extend(
            cgroups
                .iter()
                .filter(|c| c.exists())
                .map(|c| format!("cgroup {}", c.display())),
        );
        left.extend(
            self.mounts()
                .iter()
                .map(|m| format!("mount {}", m.display())),
        );
        for pid in self.live_processes() {
            let comm = procfs::Stat::read(pid).map(|s| s.comm).unwrap_or_default();
            left.push(format!("process {pid} ({comm})"));
        }
        let dir = self.names.state_dir();
        if dir.exists() {
            left.push(format!("state directory {}", dir.display()));
        }
        left
    }
}

/// Inodes of the named network namespaces that are not this lab's (`prefix`).
fn other_netns_inodes(prefix: &str) -> BTreeSet<u64> {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return BTreeSet::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with(prefix))
        .filter_map(|n| procfs::ns_file_inode(&net::netns_path(&n)))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/odd\x"), r"/odd\x");
    }

    #[test]
    fn a_lab_that_never_ran_leaves_nothing() {
        let fp = Footprint::collect("never-booted-lab", None);
        assert_eq!(fp.leftovers(), Vec::<String>::new());
    }
}
