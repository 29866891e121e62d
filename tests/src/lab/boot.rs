//! Booting one host: a persistent mount namespace prepared with a tmpfs overlay of `/` (the
//! real root as lower layer), fresh /run /tmp /dev, the lab's shared directory, pivot_root;
//! then the host's own systemd as PID 1 of new pid/uts/ipc/cgroup namespaces, in the host's
//! network namespace and private cgroups.

use std::ffi::OsString;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::poll::{self, Check};
use super::procfs::{self, ProcRecord};
use super::spec::Names;
use super::{SHARED_MOUNT, cgroup, cmd, enter, net, sys};

/// The unit each host's systemd boots to: basic.target, nothing from multi-user.target.
const LAB_TARGET: &str = "rollback-lab.target";

/// Units that make no sense in a lab host (or would touch the real machine), masked.
const MASKED: &[&str] = &[
    "getty.target",
    "console-getty.service",
    "timers.target",
    "systemd-timesyncd.service",
    "systemd-firstboot.service",
    "systemd-pstore.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "e2scrub_reap.service",
    "postgresql.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
];

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
/// overlay's lower layer (the root filesystem) would not show them (see [`needs_bind`]).
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
    let mut c = Command::new("nsenter");
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
    sys::join_cgroups_and_setsid(&mut c, &procs)
        .with_context(|| format!("host {id}: cgroup paths"))?;
    let mut launcher = c
        .spawn()
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

fn arg(flag: &str, path: &Path) -> OsString {
    let mut s = OsString::from(flag);
    s.push(path);
    s
}

/// Files laid into the overlay's upper layer before it is mounted.
fn write_seed(seed: &Path, id: &str) -> Result<()> {
    let units = seed.join("etc/systemd/system");
    fs::create_dir_all(&units)?;
    for dir in [".oldroot", SHARED_MOUNT.trim_start_matches('/')] {
        fs::create_dir_all(seed.join(dir))?;
    }
    fs::write(seed.join("etc/hostname"), format!("{id}\n"))?;
    fs::write(seed.join("etc/machine-id"), format!("{}\n", machine_id()))?;
    fs::write(
        units.join(LAB_TARGET),
        "[Unit]\nDescription=Fleet lab host\nRequires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n",
    )?;
    for unit in MASKED {
        symlink("/dev/null", units.join(unit))?;
    }
    Ok(())
}

/// 32 random hex digits (std's randomly keyed hasher; no cryptographic need here).
fn machine_id() -> String {
    let word = || {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

/// Runs the preparation commands inside the host's persistent mount namespace.
struct Prep<'a> {
    host: &'a str,
    ns_file: PathBuf,
}

impl Prep<'_> {
    fn create_namespace(&self) -> Result<()> {
        fs::File::create(&self.ns_file)
            .with_context(|| format!("creating {}", self.ns_file.display()))?;
        let mut c = Command::new("unshare");
        c.arg(arg("--mount=", &self.ns_file))
            .args(["--propagation", "private", "--", "true"]);
        cmd::run(&mut c, None, cmd::DEFAULT_TIMEOUT)
            .with_context(|| format!("host {}: mount namespace", self.host))?;
        Ok(())
    }

    fn run(&self, extra_ns: Option<OsString>, argv: &[&dyn AsRefOs]) -> Result<()> {
        let mut c = Command::new("nsenter");
        c.arg(arg("--mount=", &self.ns_file));
        if let Some(ns) = extra_ns {
            c.arg(ns);
        }
        c.arg("--");
        for a in argv {
            c.arg(a.os());
        }
        c.env_clear().env("PATH", enter::HOST_PATH);
        cmd::run(&mut c, None, cmd::DEFAULT_TIMEOUT)
            .with_context(|| format!("host {}: preparing its root", self.host))?;
        Ok(())
    }

    fn build_root(
        &self,
        host_dir: &Path,
        seed: &Path,
        shared: &Path,
        netns: &str,
        same_path_binds: &[PathBuf],
    ) -> Result<()> {
        let ovl = host_dir.join("ovl");
        fs::create_dir_all(&ovl).with_context(|| format!("creating {}", ovl.display()))?;
        let (upper, work, root) = (ovl.join("upper"), ovl.join("work"), ovl.join("root"));
        let r = |p: &str| root.join(p);
        self.run(
            None,
            &[
                &"mount",
                &"-t",
                &"tmpfs",
                &"-o",
                &"mode=755",
                &"lab-ovl",
                &ovl,
            ],
        )?;
        self.run(None, &[&"mkdir", &work, &root])?;
        self.run(None, &[&"cp", &"-a", &seed, &upper])?;
        let opts = format!(
            "lowerdir=/,upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        self.run(
            None,
            &[
                &"mount",
                &"-t",
                &"overlay",
                &"-o",
                &opts,
                &"lab-root",
                &root,
            ],
        )?;
        let net_ns = Some(arg("--net=", &net::netns_path(netns)));
        self.run(
            net_ns,
            &[&"mount", &"-t", &"sysfs", &"-o", &"ro", &"sysfs", &r("sys")],
        )?;
        self.run(
            None,
            &[
                &"mount",
                &"-t",
                &"tmpfs",
                &"-o",
                &"mode=755",
                &"tmpfs",
                &r("run"),
            ],
        )?;
        self.run(
            None,
            &[
                &"mount",
                &"-t",
                &"tmpfs",
                &"-o",
                &"mode=1777",
                &"tmpfs",
                &r("tmp"),
            ],
        )?;
        self.run(
            None,
            &[
                &"mount",
                &"-t",
                &"tmpfs",
                &"-o",
                &"mode=755",
                &"tmpfs",
                &r("dev"),
            ],
        )?;
        let devices = [
            "null", "zero", "full", "random", "urandom", "tty", "console",
        ];
        let nodes: Vec<PathBuf> = devices.iter().map(|d| r("dev").join(d)).collect();
        let mut touch: Vec<&dyn AsRefOs> = vec![&"touch"];
        touch.extend(nodes.iter().map(|n| n as &dyn AsRefOs));
        self.run(None, &touch)?;
        for (name, node) in devices.iter().zip(&nodes) {
            let source = if *name == "console" {
                PathBuf::from("/dev/null")
            } else {
                Path::new("/dev").join(name)
            };
            self.run(None, &[&"mount", &"--bind", &source, node])?;
        }
        self.run(None, &[&"mkdir", &r("dev/pts"), &r("dev/shm")])?;
        self.run(
            None,
            &[
                &"mount",
                &"-t",
                &"devpts",
                &"-o",
                &"newinstance,ptmxmode=0666",
                &"devpts",
                &r("dev/pts"),
            ],
        )?;
        self.run(None, &[&"ln", &"-s", &"pts/ptmx", &r("dev/ptmx")])?;
        self.run(None, &[&"mount", &"-t", &"tmpfs", &"tmpfs", &r("dev/shm")])?;
        self.run(
            None,
            &[
                &"mount",
                &"--bind",
                &shared,
                &r(SHARED_MOUNT.trim_start_matches('/')),
            ],
        )?;
        for dir in same_path_binds {
            let target = root.join(dir.strip_prefix("/").unwrap_or(dir));
            self.run(None, &[&"mkdir", &"-p", &target])?;
            self.run(None, &[&"mount", &"--rbind", dir, &target])?;
        }
        // umount(8) needs /proc: mount one for the switch, then drop it (systemd's own pid
        // namespace gets a fresh /proc from `unshare --mount-proc`).
        self.run(None, &[&"mount", &"-t", &"proc", &"proc", &r("proc")])?;
        let wd = arg("--wdns=", &root);
        self.run(Some(wd), &[&"pivot_root", &".", &".oldroot"])?;
        self.run(None, &[&"umount", &"--lazy", &"/.oldroot"])?;
        self.run(None, &[&"umount", &"/proc"])
    }
}

/// Anything usable as one argument.
trait AsRefOs {
    fn os(&self) -> &std::ffi::OsStr;
}

impl AsRefOs for &str {
    fn os(&self) -> &std::ffi::OsStr {
        self.as_ref()
    }
}

impl AsRefOs for String {
    fn os(&self) -> &std::ffi::OsStr {
        self.as_ref()
    }
}

impl AsRefOs for PathBuf {
    fn os(&self) -> &std::ffi::OsStr {
        self.as_os_str()
    }
}

impl AsRefOs for &Path {
    fn os(&self) -> &std::ffi::OsStr {
        self.as_os_str()
    }
}

/// Whether `dir` must be bind-mounted into hosts to be seen there: it is on another
/// filesystem than `/` (the overlay's lower layer shows the root filesystem only), or under a
/// directory each host gets fresh (/tmp, /run, /dev).
pub fn needs_bind(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if ["/tmp", "/run", "/dev"]
        .iter()
        .any(|fresh| dir.starts_with(fresh))
    {
        return true;
    }
    match (fs::metadata(dir), fs::metadata("/")) {
        (Ok(d), Ok(root)) => d.dev() != root.dev(),
        _ => false,
    }
}
