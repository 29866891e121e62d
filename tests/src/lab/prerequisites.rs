//! What a machine needs to boot a lab, and the skip-or-fail decision for lab suites without
//! it (`ROLLBACK_LAB_REQUIRED=1`, set by CI, turns a skip into a failure).

use std::fs;
use std::path::Path;

use anyhow::{Result, bail};

use super::fleet::Lab;
use super::spec::LabSpec;
use super::venv;

/// Env var that makes a lab that cannot boot a test failure instead of a skip.
pub const REQUIRED_ENV: &str = "ROLLBACK_LAB_REQUIRED";

const NEEDED: &[&str] = &[
    "/lib/systemd/systemd",
    "/usr/bin/nsenter",
    "/usr/bin/unshare",
    "/usr/bin/curl",
    "/usr/sbin/runuser",
    "/usr/lib/postgresql/15/bin/initdb",
    "/usr/lib/postgresql/15/bin/postgres",
];

/// Ok when this process can boot a lab; otherwise the reason, for a person.
pub fn check() -> Result<(), String> {
    if effective_uid() != Some(0) {
        return Err("the fleet lab needs root (namespaces, mounts, cgroups)".into());
    }
    if let Some(missing) = NEEDED.iter().find(|p| !Path::new(p).exists()) {
        return Err(format!(
            "the fleet lab needs {missing}, which is not installed"
        ));
    }
    for tool in ["ip", "git"] {
        if !on_path(tool) {
            return Err(format!("the fleet lab needs `{tool}` on PATH"));
        }
    }
    if !Path::new("/sys/fs/cgroup").is_dir() {
        return Err("the fleet lab needs /sys/fs/cgroup".into());
    }
    Ok(())
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Whether a lab that cannot boot must fail the suite.
pub fn required() -> bool {
    std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "1")
}

/// For lab suites: boots `spec`, or — when this machine cannot run a lab and
/// `ROLLBACK_LAB_REQUIRED` is not `1` — prints one skip line and returns `None`.
pub fn boot_or_skip(spec: LabSpec) -> Result<Option<Lab>> {
    let reason = match (check(), spec.deploy_app || spec.database) {
        (Err(reason), _) => Some(reason),
        (Ok(()), true) => venv::locate().err().map(|e| format!("{e:#}")),
        (Ok(()), false) => None,
    };
    if let Some(reason) = reason {
        if required() {
            bail!(
                "lab {} cannot boot and {REQUIRED_ENV}=1: {reason}",
                spec.name
            );
        }
        report_skip(&spec.name, &reason);
        return Ok(None);
    }
    Lab::boot(spec).map(Some)
}

/// One line per process (libtest runs every test of a suite in one process; nextest one per
/// test), written to stderr directly so the test harness's output capture does not hide it.
fn report_skip(lab: &str, reason: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write;
        let line = format!(
            "SKIPPED fleet lab suites (first: lab {lab}): {reason}; set {REQUIRED_ENV}=1 to make this a failure\n"
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    });
}
