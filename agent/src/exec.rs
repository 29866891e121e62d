//! The only place the agent spawns processes. Every step's process runs by absolute path, with
//! a cleared environment plus only what it needs, a fixed working directory, stdin from
//! /dev/null (or a file the agent opened itself), in its own process group. Output streams to a sink while it runs and is kept in a
//! bounded capture. At the timeout, or on cancel, the whole group gets SIGTERM, then SIGKILL
//! after the grace period.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};

use crate::contain::StepCgroup;
use nix::unistd::Pid;
use rollback_common::output_cap::OutputCap;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The first argument that makes the agent binary the cgroup shim (see `shim_main`).
pub const SHIM_FLAG: &str = "--internal-exec-in-cgroup";
/// The running agent binary, even if its file was replaced by an upgrade.
const SELF_EXE: &str = "/proc/self/exe";

/// The cgroup shim: `rollback-agent --internal-exec-in-cgroup PROCS UID GID -- PROGRAM ARGS…`
/// moves itself into the cgroup whose `cgroup.procs` is PROCS, drops to UID:GID (`-` keeps
/// the user), then execs PROGRAM in place (same pid, process group, pipes and environment).
/// Returns `None` when the agent was not started as the shim; otherwise the exit code of a
/// failure (the exec replaced the process on success). Nothing runs outside the cgroup: if
/// it cannot be joined, the program is not run.
pub fn shim_main() -> Option<i32> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os().skip(1);
    if args.next()? != SHIM_FLAG {
        return None;
    }
    let usage = || {
        eprintln!("rollback-agent: {SHIM_FLAG} PROCS UID GID -- PROGRAM [ARGS...]");
        Some(126)
    };
    let (Some(procs), Some(uid), Some(gid), Some(dashes), Some(program)) = (
        args.next(),
        args.next(),
        args.next(),
        args.next(),
        args.next(),
    ) else {
        return usage();
    };
    // Fail closed: `-` (keep the agent's user) or two numbers; anything else runs nothing.
    let id = |v: &std::ffi::OsStr| v.to_str().and_then(|s| s.parse::<u32>().ok());
    let run_as = match (uid.to_str(), gid.to_str(), id(&uid), id(&gid)) {
        (Some("-"), Some("-"), _, _) => None,
        (_, _, Some(u), Some(g)) => Some((u, g)),
        _ => return usage(),
    };
    if dashes != "--" {
        return usage();
    }
    let joined = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(b"0"));
    if let Err(e) = joined {
        eprintln!(
            "rollback-agent: cannot move the step into its cgroup ({}): {e}; nothing was run",
            std::path::Path::new(&procs).display()
        );
        return Some(126);
    }
    let mut cmd = std::process::Command::new(&program);
    cmd.args(args);
    if let Some((uid, gid)) = run_as {
        // std drops the supplementary groups when root sets a uid without explicit groups.
        cmd.uid(uid).gid(gid);
    }
    let e = cmd.exec();
    eprintln!(
        "rollback-agent: cannot start `{}`: {e}",
        std::path::Path::new(&program).display()
    );
    Some(127)
}

/// Bytes of a step's combined output the agent keeps (head and tail).
pub const KEPT_OUTPUT_BYTES: usize = 64 * 1024;
/// Bytes of stderr kept for classifying a failure.
const KEPT_STDERR_BYTES: usize = 16 * 1024;
/// After the main process exits, how long its leftover children may keep the pipes open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 16 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// The complete environment of the process (nothing is inherited).
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub kill_grace: Duration,
    /// Run as this (uid, gid) instead of the agent's own user, supplementary groups dropped
    /// (e.g. git as the repository's owner, so nothing the repository configures runs as root).
    pub run_as: Option<(u32, u32)>,
    /// A file the agent opened (and checked) itself, given as stdin, so the process reads
    /// exactly what was checked, never a path that could be swapped in between. It is
    /// shared with the agent: seek it before handing it over again.
    pub stdin: Option<std::sync::Arc<std::fs::File>>,
}

impl ProcessSpec {
    /// A spec with the minimal environment every tool here needs.
    pub fn new(
        program: impl Into<PathBuf>,
        cwd: impl Into<PathBuf>,
        timeout: Duration,
        kill_grace: Duration,
    ) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            cwd: cwd.into(),
            env: vec![
                ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
                ("LC_ALL".into(), "C.UTF-8".into()),
            ],
            timeout,
            kill_grace,
            run_as: None,
            stdin: None,
        }
    }

    /// Gives the process `file` as its stdin (see `stdin`).
    pub fn stdin(mut self, file: std::sync::Arc<std::fs::File>) -> Self {
        self.stdin = Some(file);
        self
    }

    /// Runs the process as `uid`:`gid` (no supplementary groups).
    pub fn run_as(mut self, uid: u32, gid: u32) -> Self {
        self.run_as = Some((uid, gid));
        self
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = A>, A: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// How the command reads in a message: program and arguments (and the user it runs as).
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        if let Some((uid, gid)) = self.run_as {
            s.push_str(&format!("  (as uid {uid}, gid {gid})"));
        }
        s
    }
}

/// Receives output while the process runs.
pub trait OutputSink: Send {
    fn chunk(&mut self, stderr: bool, data: &[u8]);
}

/// A sink that only keeps what the capture keeps (for internal probes).
#[derive(Debug, Default)]
pub struct NoSink;

impl OutputSink for NoSink {
    fn chunk(&mut self, _stderr: bool, _data: &[u8]) {}
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exited by itself with this code.
    Exited(i32),
    /// Killed by a signal it did not get from us.
    Signaled(i32),
    TimedOut,
    Cancelled,
}

#[derive(Debug)]
pub struct ProcessOutcome {
    pub ending: Ending,
    pub duration: Duration,
    pub output: OutputCap,
    pub stderr: OutputCap,
    /// Processes of the group outlived the main process and were killed.
    pub killed_leftovers: bool,
}

impl ProcessOutcome {
    pub fn success(&self) -> bool {
        self.ending == Ending::Exited(0)
    }

    /// The exit code for reports; -1 when there was none.
    pub fn exit_code(&self) -> i32 {
        match self.ending {
            Ending::Exited(c) => c,
            _ => -1,
        }
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.render()).into_owned()
    }

    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output.render()).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for `{program}`: {source}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => {
            warn!(pgid = pgid.as_raw(), signal = ?signal, error = %e, "signalling process group failed")
        }
    }
}

/// Whether any process is still in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    // Signal 0 checks for existence without delivering anything.
    killpg(Pid::from_raw(pgid), None).is_ok()
}

/// Runs the process to completion, timeout or cancellation.
pub async fn run(
    spec: &ProcessSpec,
    sink: &mut dyn OutputSink,
    cancel: &CancellationToken,
) -> Result<ProcessOutcome, ExecError> {
    let started = Instant::now();
    let program = spec.program.display().to_string();
    let spawn_error = |source| ExecError::Spawn {
        program: program.clone(),
        source,
    };
    // Checked here so a missing binary reads the same with or without the shim.
    std::fs::metadata(&spec.program).map_err(spawn_error)?;
    let cgroup = StepCgroup::create().map_err(|e| {
        spawn_error(std::io::Error::other(format!(
            "creating the step's cgroup: {e}"
        )))
    })?;
    let mut cmd = match &cgroup {
        // The shim (this binary) joins the cgroup, drops to `run_as`, then execs the program:
        // nothing of the process ever runs outside the cgroup.
        Some(cg) => {
            let mut cmd = tokio::process::Command::new(SELF_EXE);
            let (uid, gid) = spec
                .run_as
                .map_or(("-".to_string(), "-".to_string()), |(u, g)| {
                    (u.to_string(), g.to_string())
                });
            cmd.arg(SHIM_FLAG)
                .arg(cg.procs_file())
                .args([uid, gid])
                .arg("--")
                .arg(&spec.program)
                .args(&spec.args);
            cmd
        }
        None => {
            let mut cmd = tokio::process::Command::new(&spec.program);
            cmd.args(&spec.args);
            if let Some((uid, gid)) = spec.run_as {
                // std drops the supplementary groups when root sets a uid without groups.
                cmd.uid(uid).gid(gid);
            }
            cmd
        }
    };
    cmd.current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(match &spec.stdin {
            Some(file) => Stdio::from(file.try_clone().map_err(|source| ExecError::Spawn {
                program: spec.program.display().to_string(),
                source,
            })?),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        // The cgroup guard removes the (empty) cgroup on this and every other early return.
        Err(source) => return Err(spawn_error(source)),
    };
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
        .ok_or_else(|| ExecError::Spawn {
            program: program.clone(),
            source: std::io::Error::other("child has no pid"),
        })?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();

    let mut output = OutputCap::new(KEPT_OUTPUT_BYTES);
    let mut stderr_cap = OutputCap::new(KEPT_STDERR_BYTES);
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];
    let mut status = None;
    let mut stopping: Option<Ending> = None;
    let mut killed_leftovers = false;
    let far = Duration::from_secs(365 * 24 * 3600);
    let timeout = tokio::time::sleep(spec.timeout);
    tokio::pin!(timeout);
    let kill_at = tokio::time::sleep(far);
    tokio::pin!(kill_at);
    let drain = tokio::time::sleep(far);
    tokio::pin!(drain);

    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf) => match n {
                Some(n) => { sink.chunk(false, &out_buf[..n]); output.push(&out_buf[..n]); }
                None => stdout = None,
            },
            n = read_some(&mut stderr, &mut err_buf) => match n {
                Some(n) => { sink.chunk(true, &err_buf[..n]); output.push(&err_buf[..n]); stderr_cap.push(&err_buf[..n]); }
                None => stderr = None,
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s.map_err(|source| ExecError::Wait { program: program.clone(), source })?);
                // The process is gone: whatever it left in its cgroup (a background child, a
                // setsid daemon) dies with it, and the pipes close.
                if let Some(cg) = &cgroup && cg.kill() > 0 {
                    killed_leftovers = true;
                }
                drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            }
            () = &mut timeout, if stopping.is_none() => {
                stopping = Some(Ending::TimedOut);
                signal_group(pgid, Signal::SIGTERM);
                if let Some(cg) = &cgroup {
                    cg.signal(Signal::SIGTERM);
                }
                kill_at.as_mut().reset(tokio::time::Instant::now() + spec.kill_grace);
            }
            () = cancel.cancelled(), if stopping.is_none() => {
                stopping = Some(Ending::Cancelled);
                signal_group(pgid, Signal::SIGTERM);
                if let Some(cg) = &cgroup {
                    cg.signal(Signal::SIGTERM);
                }
                kill_at.as_mut().reset(tokio::time::Instant::now() + spec.kill_grace);
            }
            () = &mut kill_at => {
                signal_group(pgid, Signal::SIGKILL);
                if let Some(cg) = &cgroup {
                    cg.kill();
                }
                kill_at.as_mut().reset(tokio::time::Instant::now() + far);
            }
            () = &mut drain, if status.is_some() => {
                // The main process is gone but something in its group still holds the pipes.
                killed_leftovers = true;
                signal_group(pgid, Signal::SIGKILL);
                stdout = None;
                stderr = None;
            }
        }
    }
    // Whatever the ending, nothing of the step's group or cgroup may outlive it.
    if stopping.is_some() || killed_leftovers {
        signal_group(pgid, Signal::SIGKILL);
    }
    if let Some(cg) = &cgroup {
        cg.kill();
        if !cg.wait_empty().await {
            warn!(program = %program, "a step's cgroup did not empty after SIGKILL");
        }
        cg.remove();
    }

    let ending = match (stopping, status) {
        (Some(stop), _) => stop,
        (None, Some(s)) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(sig)) => Ending::Signaled(sig),
            (None, None) => Ending::Exited(-1),
        },
        (None, None) => Ending::Exited(-1),
    };
    Ok(ProcessOutcome {
        ending,
        duration: started.elapsed(),
        output,
        stderr: stderr_cap,
        killed_leftovers,
    })
}

/// Reads a chunk; None at end of stream or error. A closed pipe never resolves (so `select!`
/// keeps waiting on the others).
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> Option<usize> {
    match pipe {
        Some(p) => match p.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}
