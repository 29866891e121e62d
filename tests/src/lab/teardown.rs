//! Removing a lab instance completely — used by `Lab::teardown`, by `Drop`, and at the next
//! start for a lab left by a killed run: kill its processes, remove cgroups, mounts,
//! namespaces and the state directory, then verify that nothing remains.

use std::fs;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::footprint::Footprint;
use super::poll::{self, Check};
use super::state::LabState;
use super::{cgroup, cmd, net, sys};

const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const LAUNCHER_GRACE: Duration = Duration::from_secs(5);

/// Removes everything of lab `name` (known from `state`, if any, and by name prefix).
/// `launchers` are the children this process started; they are reaped.
pub fn remove(name: &str, state: Option<&LabState>, launchers: &mut Vec<Child>) -> Result<()> {
    let footprint = Footprint::collect(name, state);
    // Each host's systemd first: its pid namespace dies with it, and its launcher (`unshare`,
    // which waits for it) reaps it and exits, so no zombie is left behind.
    for host in state.map(|s| s.hosts.as_slice()).unwrap_or_default() {
        if let Some(systemd) = host.systemd.filter(|p| p.is_running()) {
            sys::kill_hard(systemd.pid)
                .with_context(|| format!("lab {name}: killing host {}", host.id()))?;
        }
    }
    let recorded: Vec<_> = state
        .map(|s| s.hosts.iter().filter_map(|h| h.launcher).collect())
        .unwrap_or_default();
    // A launcher that does not exit in time is killed below.
    let _ = poll::until("host launchers to exit", LAUNCHER_GRACE, || {
        let running = recorded.iter().filter(|p| p.is_running()).count();
        Ok(if running == 0 {
            Check::Done(())
        } else {
            Check::Pending(format!("{running} running"))
        })
    });
    for mut child in launchers.drain(..) {
        let exited = poll::until("a host launcher to exit", LAUNCHER_GRACE, || {
            Ok(match child.try_wait()? {
                Some(_) => Check::Done(()),
                None => Check::Pending("running".into()),
            })
        });
        if exited.is_err() {
            let _ = child.kill();
        }
        child
            .wait()
            .with_context(|| format!("lab {name}: reaping a host launcher"))?;
    }
    kill_all(&footprint)?;
    for dir in footprint.cgroups() {
        poll::until(
            format!("lab {name}: removing cgroup {}", dir.display()),
            STEP_TIMEOUT,
            || {
                for pid in cgroup::pids_within(dir) {
                    sys::kill_hard(pid).with_context(|| format!("killing {pid}"))?;
                }
                cgroup::remove(dir)?;
                Ok(Check::Done(()))
            },
        )?;
    }
    for mount in footprint.mounts() {
        let plain = cmd::output(
            Command::new("umount").arg(&mount),
            None,
            cmd::DEFAULT_TIMEOUT,
        )?;
        if !plain.status.success() {
            cmd::run(
                Command::new("umount").arg("--lazy").arg(&mount),
                None,
                cmd::DEFAULT_TIMEOUT,
            )
            .with_context(|| format!("lab {name}: unmounting {}", mount.display()))?;
        }
    }
    for ns in footprint.netns() {
        net::delete_netns(ns).with_context(|| format!("lab {name}"))?;
    }
    let dir = super::spec::Names::new(name).state_dir();
    if dir.exists() {
        fs::remove_dir_all(&dir)
            .with_context(|| format!("lab {name}: removing {}", dir.display()))?;
    }
    let left = footprint.leftovers();
    if !left.is_empty() {
        bail!("lab {name}: teardown left {}", left.join(", "));
    }
    Ok(())
}

/// Kills every live process of the lab until none is left (killing a host's systemd ends
/// its whole pid namespace; processes only sharing a network namespace are killed one by one).
fn kill_all(footprint: &Footprint) -> Result<()> {
    poll::until(
        format!("lab {}: its processes to exit", footprint.name()),
        STEP_TIMEOUT,
        || {
            let live = footprint.live_processes();
            if live.is_empty() {
                return Ok(Check::Done(()));
            }
            for pid in &live {
                sys::kill_hard(*pid).with_context(|| format!("killing {pid}"))?;
            }
            Ok(Check::Pending(format!(
                "{} processes still alive",
                live.len()
            )))
        },
    )
}
