//! Commands that run inside a host: `nsenter` into all namespaces of the host's systemd, with
//! the host's root, a clean environment and (optionally) a working directory there.

use std::process::Command;

/// PATH inside hosts.
pub const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A `Command` that runs `program` inside the host whose systemd has (root-namespace) pid
/// `systemd_pid`. The caller's environment is not passed on.
pub fn host_command(systemd_pid: i32, cwd: Option<&str>, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg("--target")
        .arg(systemd_pid.to_string())
        .arg("--all")
        .arg("--root");
    match cwd {
        Some(dir) => cmd.arg(format!("--wdns={dir}")),
        None => cmd.arg("--wd"),
    };
    cmd.arg("--").arg(program);
    cmd.env_clear()
        .env("PATH", HOST_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8");
    cmd
}

/// A `Command` that runs `program` in a named network namespace only (the coordinator's, or
/// a host's network without its other namespaces), with a clean environment.
pub fn netns_command(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program.as_ref());
    cmd.env_clear()
        .env("PATH", HOST_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8");
    cmd
}
