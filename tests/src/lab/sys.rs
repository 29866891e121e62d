//! Signalling a process, and starting a host's launcher in a new session inside the host's
//! private cgroups — without `unsafe`: the child is started behind a lock this process holds
//! (`setsid flock --no-fork GATE PROGRAM...`), moved into the cgroups by pid while it waits,
//! and only then released to exec PROGRAM (same pid), so everything it forks starts there.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Starts a program in a new session (so a terminal's Ctrl-C does not reach it).
const SETSID: &str = "/usr/bin/setsid";
/// Takes a lock, then execs its command in the same process (`--no-fork`).
const FLOCK: &str = "/usr/bin/flock";

/// Sends SIGKILL to `pid`. A process that is already gone is not an error.
pub fn kill_hard(pid: i32) -> io::Result<()> {
    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// A `Command` that runs `program` in a new session once the lock on `gate` is free; pass it
/// to [`spawn_in_cgroups`] with the same `gate`.
pub fn gated_command(gate: &Path, program: &str) -> Command {
    let mut cmd = Command::new(SETSID);
    cmd.arg(FLOCK)
        .arg("--no-fork")
        .arg("--exclusive")
        .arg(gate)
        .arg(program);
    cmd
}

/// Spawns `cmd` (made by [`gated_command`] with `gate`) so that its process joins each cgroup
/// whose `cgroup.procs` file is listed before the program runs: the lock on `gate` is held
/// while the child's pid is written to every file, then released. On failure the child is
/// killed and reaped.
pub fn spawn_in_cgroups(cmd: &mut Command, gate: &Path, procs_files: &[PathBuf]) -> Result<Child> {
    let lock = File::create(gate).with_context(|| format!("creating {}", gate.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", gate.display()))?;
    let mut child = cmd.spawn().context("starting the launcher")?;
    let pid = child.id().to_string();
    let joined = procs_files.iter().try_for_each(|file| {
        fs::write(file, &pid).with_context(|| format!("moving pid {pid} into {}", file.display()))
    });
    if let Err(e) = joined {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    lock.unlock()
        .with_context(|| format!("unlocking {}", gate.display()))?;
    Ok(child)
}
