//! Reading /proc: process identity (pid + start time), children, namespaces, cgroups.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A process recorded so that teardown can verify it is gone: the pid alone could be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
}

impl ProcRecord {
    /// The record of a live process, or None when it is gone.
    pub fn of(pid: i32) -> Option<ProcRecord> {
        let stat = Stat::read(pid)?;
        Some(ProcRecord {
            pid,
            start_time: stat.start_time,
        })
    }

    /// True while the same process (not a reused pid) exists and is not a zombie.
    pub fn is_running(&self) -> bool {
        Stat::read(self.pid).is_some_and(|s| s.start_time == self.start_time && s.state != 'Z')
    }
}

/// The parts of /proc/PID/stat the lab uses.
#[derive(Debug, Clone)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub start_time: u64,
}

impl Stat {
    pub fn read(pid: i32) -> Option<Stat> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // comm is in parentheses and may contain spaces: split at the last ')'.
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?.to_string();
        let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
        // rest[0] is field 3 (state); field N is rest[N - 3].
        let state = rest.first()?.chars().next()?;
        let ppid = rest.get(1)?.parse().ok()?;
        let start_time = rest.get(19)?.parse().ok()?;
        Some(Stat {
            comm,
            state,
            ppid,
            start_time,
        })
    }
}

/// Every pid currently listed in /proc.
pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Direct children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        return text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    }
    all_pids()
        .into_iter()
        .filter(|p| Stat::read(*p).is_some_and(|s| s.ppid == pid))
        .collect()
}

/// Inode of a namespace of a process (`kind` is e.g. "net", "pid", "mnt").
pub fn ns_inode(pid: i32, kind: &str) -> Option<u64> {
    ns_inode_of_link(&format!("/proc/{pid}/ns/{kind}"))
}

fn ns_inode_of_link(link: &str) -> Option<u64> {
    // The link reads like "net:[4026532281]".
    let target = fs::read_link(link).ok()?;
    let text = target.to_str()?;
    let start = text.find('[')?;
    text.get(start + 1..text.len() - 1)?.parse().ok()
}

/// Inode of a namespace file such as /run/netns/NAME (the namespace it holds).
pub fn ns_file_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| m.ino())
}

/// The cgroup paths of a process, one line per hierarchy, as in /proc/PID/cgroup.
pub fn cgroup_lines(pid: i32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_recorded_and_running() {
        let me = std::process::id() as i32;
        let rec = ProcRecord::of(me).expect("own stat");
        assert!(rec.is_running());
        let reused = ProcRecord {
            start_time: rec.start_time + 1,
            ..rec
        };
        assert!(
            !reused.is_running(),
            "a different start time is another process"
        );
        assert!(ns_inode(me, "net").is_some());
    }
}
