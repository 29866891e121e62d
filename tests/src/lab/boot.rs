//! Booting one host: its root file system (see `rootfs`), then its own systemd as PID 1 of
//! new pid/uts/ipc/cgroup namespaces, in the host's network namespace and private cgroups,
//! and waiting until that systemd has finished booting.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::poll::{self, Check};
use super::procfs::{self, ProcRecord};
use super::rootfs::{LAB_TARGET, Prep, arg, write_seed};
use super::spec::Names;
use super::{cgroup, cmd, enter, net, sys};

/// A host whose systemd is starting.
pub struct Launched {
    pub launcher: Child,
    pub launcher_record: ProcRecord,
    pub systemd: ProcRecord,
    pub cgroups: Vec<PathBuf>,
}

/// Prepares the host's root and starts its systemd; returns once systemd's process exists
/// (see [`wait_running`]).
/// `same_path_binds` are directories made visible inside the host at the same path when the
/// overlay's lower layer (the root filesystem) would not show them (see [`needs_bind`](super::rootfs::needs_bind)).
pub fn launch(
    names: &Names,
    id: &str,
    netns: &str,
    same_path_binds: &[PathBuf],
    timeout: Duration,
) -> Result<Launched> {
    let host_dir = names.host_dir(id);
    let seed = host_dir.join("seed");
    write_seed(&seed, id).with_context(|| format!("host {id}: writing {}", seed.display()))?;
    let ns_file = names.ns_dir().join(format!("{id}.mnt"));
    let prep = Prep {
        host: id,
        ns_file: ns_file.clone(),
    };
    prep.create_namespace()?;
    prep.build_root(
        &host_dir,
        &seed,
        &names.shared_dir(),
        netns,
        same_path_binds,
    )?;

    let cgroups = cgroup::create(&names.node(id)).with_context(|| format!("host {id}: cgroups"))?;
    let log_path = host_dir.join("boot.log");
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("cloning {}", log_path.display()))?;
    let gate = host_dir.join("launch.lock");
    let mut c = sys::gated_command(&gate, "nsenter");
    c.arg(arg("--mount=", &ns_file))
        .arg(arg("--net=", &net::netns_path(netns)))
        .arg("--")
        .args([
            "unshare",
            "--pid",
            "--fork",
            "--uts",
            "--ipc",
            "--cgroup",
            "--mount-proc",
            "--",
        ])
        .args(["/usr/bin/env", "-i", "container=rollback-lab"])
        .arg(format!("PATH={}", enter::HOST_PATH))
        .args([
            "/lib/systemd/systemd",
            "--system",
            &format!("--unit={LAB_TARGET}"),
        ])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let procs: Vec<PathBuf> = cgroups.iter().map(|d| d.join("cgroup.procs")).collect();
    let mut launcher = sys::spawn_in_cgroups(&mut c, &gate, &procs)
        .with_context(|| format!("host {id}: starting `{}`", cmd::describe(&c)))?;
    let launcher_pid = i32::try_from(launcher.id()).context("pid out of range")?;
    let launcher_record = ProcRecord::of(launcher_pid)
        .with_context(|| format!("host {id}: launcher {launcher_pid} vanished at once"))?;
    let found = poll::until(format!("host {id}: systemd to start"), timeout, || {
        if let Some(status) = launcher.try_wait()? {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            bail!("host {id}: launcher exited with {status}: {}", log.trim());
        }
        let systemd = procfs::children(launcher_pid)
            .into_iter()
            .find(|p| procfs::Stat::read(*p).is_some_and(|s| s.comm == "systemd"));
        Ok(match systemd.and_then(ProcRecord::of) {
            Some(rec) => Check::Done(rec),
            None => Check::Pending("no systemd child yet".into()),
        })
    });
    let systemd = match found {
        Ok(s) => s,
        Err(e) => {
            let _ = launcher.kill();
            let _ = launcher.wait();
            return Err(e);
        }
    };
    Ok(Launched {
        launcher,
        launcher_record,
        systemd,
        cgroups,
    })
}

/// Waits until the host's systemd reports `running` (or `degraded`, listing failed units).
pub fn wait_running(id: &str, systemd_pid: i32, timeout: Duration) -> Result<()> {
    let state = poll::until(
        format!("host {id}: systemd to finish booting"),
        timeout,
        || {
            let mut c = enter::host_command(systemd_pid, None, "systemctl");
            c.arg("is-system-running");
            let out = cmd::output(&mut c, None, Duration::from_secs(10))?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok(match state.as_str() {
                "running" | "degraded" => Check::Done(state),
                _ => Check::Pending(format!(
                    "state {state:?} {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            })
        },
    )?;
    if state == "degraded" {
        let mut c = enter::host_command(systemd_pid, None, "systemctl");
        c.args(["--failed", "--no-legend", "--plain", "--no-pager"]);
        let failed = cmd::run(&mut c, None, cmd::DEFAULT_TIMEOUT).unwrap_or_default();
        eprintln!(
            "lab host {id}: systemd is degraded; failed units: {}",
            failed.trim()
        );
    }
    Ok(())
}
