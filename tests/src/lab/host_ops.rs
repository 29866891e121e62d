//! Doing things inside a host: commands ([`HostCommand`]), systemctl, unit files, files in the
//! host's overlay, and commands in the coordinator's namespace.

use std::ffi::{OsStr, OsString};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::fleet::Lab;
use super::{cmd, enter};

/// A command to run inside one host (all namespaces of its systemd, its root, a clean
/// environment). Errors name the host and the command.
#[derive(Debug)]
pub struct HostCommand {
    host: String,
    systemd_pid: i32,
    program: String,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl HostCommand {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Working directory inside the host.
    pub fn current_dir(mut self, dir: &str) -> Self {
        self.cwd = Some(dir.to_string());
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The underlying `nsenter` command, e.g. to run it with inherited stdio.
    pub fn into_command(self) -> Command {
        let mut c = enter::host_command(self.systemd_pid, self.cwd.as_deref(), &self.program);
        c.args(&self.args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn describe(&self) -> String {
        let mut words = vec![self.program.clone()];
        words.extend(self.args.iter().map(|a| a.to_string_lossy().into_owned()));
        words.join(" ")
    }

    /// Runs to completion; the exit status is in the output (Err only if it could not run).
    pub fn output(self) -> Result<Output> {
        let (host, what, timeout) = (self.host.clone(), self.describe(), self.timeout);
        let stdin = self.stdin.clone();
        let mut c = self.into_command();
        cmd::output(&mut c, stdin.as_deref(), timeout)
            .with_context(|| format!("host {host}: `{what}`"))
    }

    /// Runs to completion and requires success; returns stdout.
    pub fn run(self) -> Result<String> {
        let (host, what) = (self.host.clone(), self.describe());
        let out = self.output()?;
        cmd::check(&what, &out).with_context(|| format!("host {host}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Lab {
    /// A command to run inside host `host` (see [`HostCommand`]).
    pub fn command(&self, host: &str, program: &str) -> Result<HostCommand> {
        let h = self.host(host)?;
        let Some(systemd_pid) = h.systemd_pid() else {
            bail!("host {host}: its systemd is not running");
        };
        Ok(HostCommand {
            host: host.to_string(),
            systemd_pid,
            program: program.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdin: None,
            timeout: cmd::DEFAULT_TIMEOUT,
        })
    }

    fn split<'a>(host: &str, argv: &'a [&'a str]) -> Result<(&'a str, &'a [&'a str])> {
        match argv.split_first() {
            Some((program, args)) => Ok((program, args)),
            None => bail!("host {host}: empty command"),
        }
    }

    /// Runs `argv` inside `host`; the exit status is in the output.
    pub fn exec(&self, host: &str, argv: &[&str]) -> Result<Output> {
        let (program, args) = Self::split(host, argv)?;
        self.command(host, program)?.args(args).output()
    }

    /// Runs `argv` inside `host`, requiring success; returns stdout.
    pub fn run(&self, host: &str, argv: &[&str]) -> Result<String> {
        let (program, args) = Self::split(host, argv)?;
        self.command(host, program)?.args(args).run()
    }

    /// `systemctl ARGS` inside `host` (the host's real systemd); status in the output.
    pub fn systemctl(&self, host: &str, args: &[&str]) -> Result<Output> {
        self.command(host, "systemctl")?.args(args).output()
    }

    /// `systemctl is-active UNIT` inside `host`: "active", "inactive", "failed", …
    pub fn unit_state(&self, host: &str, unit: &str) -> Result<String> {
        let out = self.systemctl(host, &["is-active", unit])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Writes `contents` to `path` inside `host` (parents created, file replaced) with `mode`.
    /// A file in the app dir belongs to the app user, as a deploy would leave it.
    pub fn write_file(&self, host: &str, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        let mut args = vec!["-D".to_string(), "-m".to_string(), format!("{mode:o}")];
        if path.starts_with(&format!("{}/", super::APP_DIR)) {
            for flag in ["-o", "-g"] {
                args.extend([flag.to_string(), super::APP_USER.to_string()]);
            }
        }
        self.command(host, "install")?
            .args(args.iter().map(String::as_str))
            .args(["/dev/stdin", path])
            .stdin(contents)
            .run()
            .with_context(|| format!("host {host}: writing {path}"))?;
        Ok(())
    }

    /// Reads `path` inside `host`.
    pub fn read_file(&self, host: &str, path: &str) -> Result<Vec<u8>> {
        let out = self.command(host, "cat")?.arg(path).output()?;
        cmd::check(&format!("cat {path}"), &out)
            .with_context(|| format!("host {host}: reading {path}"))?;
        Ok(out.stdout)
    }

    /// Installs a unit file in /etc/systemd/system of `host` and reloads systemd (start it
    /// with [`Lab::start_unit`]).
    pub fn install_unit(&self, host: &str, name: &str, contents: &str) -> Result<()> {
        if name.contains('/') || !name.contains('.') {
            bail!("host {host}: unit name {name:?} must be like `agent.service`");
        }
        self.write_file(
            host,
            &format!("/etc/systemd/system/{name}"),
            contents.as_bytes(),
            0o644,
        )?;
        self.systemctl_ok(host, &["daemon-reload"])
    }

    pub fn start_unit(&self, host: &str, unit: &str) -> Result<()> {
        self.systemctl_ok(host, &["start", unit])
    }

    pub fn restart_unit(&self, host: &str, unit: &str) -> Result<()> {
        self.systemctl_ok(host, &["restart", unit])
    }

    pub fn stop_unit(&self, host: &str, unit: &str) -> Result<()> {
        self.systemctl_ok(host, &["stop", unit])
    }

    fn systemctl_ok(&self, host: &str, args: &[&str]) -> Result<()> {
        self.command(host, "systemctl")?.args(args).run().map(drop)
    }

    /// A command that runs `program` in the coordinator's network namespace (nothing else is
    /// entered; clean environment: add what it needs with `.env`).
    pub fn coordinator_command(&self, program: impl AsRef<OsStr>) -> Command {
        enter::netns_command(&self.coordinator_netns(), program)
    }

    /// Spawns `argv` in the coordinator's namespace with stdout/stderr inherited; teardown
    /// kills it if it is still running.
    pub fn spawn_in_coordinator_ns(&self, argv: &[&str]) -> Result<Child> {
        let Some((program, args)) = argv.split_first() else {
            bail!("coordinator: empty command");
        };
        let mut c = self.coordinator_command(program);
        c.args(args).stdin(Stdio::null());
        c.spawn()
            .with_context(|| format!("coordinator namespace: starting `{}`", argv.join(" ")))
    }

    /// Runs `argv` in the coordinator's namespace to completion.
    pub fn exec_in_coordinator_ns(&self, argv: &[&str]) -> Result<Output> {
        let Some((program, args)) = argv.split_first() else {
            bail!("coordinator: empty command");
        };
        let mut c = self.coordinator_command(program);
        c.args(args);
        cmd::output(&mut c, None, cmd::DEFAULT_TIMEOUT)
            .with_context(|| "coordinator namespace".to_string())
    }
}
