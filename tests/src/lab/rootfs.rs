//! A host's root file system: a persistent mount namespace holding a tmpfs overlay of `/`
//! (the real root as lower layer, seeded with the host's identity and unit masks), fresh
//! /run /tmp /dev and sysfs, the lab's shared directory, then pivot_root into it.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::{SHARED_MOUNT, cmd, enter, net};

/// Arguments of mixed types (str, String, Path, PathBuf) as one `[&OsStr]`.
macro_rules! os {
    ($($x:expr),* $(,)?) => { [$(AsRef::<OsStr>::as_ref(&$x)),*] };
}

/// The unit each host's systemd boots to: basic.target, nothing from multi-user.target.
pub const LAB_TARGET: &str = "rollback-lab.target";

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

pub fn arg(flag: &str, path: &Path) -> OsString {
    let mut s = OsString::from(flag);
    s.push(path);
    s
}

/// Files laid into the overlay's upper layer before it is mounted.
pub fn write_seed(seed: &Path, id: &str) -> Result<()> {
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
pub struct Prep<'a> {
    pub host: &'a str,
    pub ns_file: PathBuf,
}

impl Prep<'_> {
    pub fn create_namespace(&self) -> Result<()> {
        fs::File::create(&self.ns_file)
            .with_context(|| format!("creating {}", self.ns_file.display()))?;
        let mut c = Command::new("unshare");
        c.arg(arg("--mount=", &self.ns_file))
            .args(["--propagation", "private", "--", "true"]);
        cmd::run(&mut c, None, cmd::DEFAULT_TIMEOUT)
            .with_context(|| format!("host {}: mount namespace", self.host))?;
        Ok(())
    }

    fn run(&self, extra_ns: Option<OsString>, argv: &[&OsStr]) -> Result<()> {
        let mut c = Command::new("nsenter");
        c.arg(arg("--mount=", &self.ns_file));
        if let Some(ns) = extra_ns {
            c.arg(ns);
        }
        c.arg("--");
        c.args(argv);
        c.env_clear().env("PATH", enter::HOST_PATH);
        cmd::run(&mut c, None, cmd::DEFAULT_TIMEOUT)
            .with_context(|| format!("host {}: preparing its root", self.host))?;
        Ok(())
    }

    pub fn build_root(
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
            &os!["mount", "-t", "tmpfs", "-o", "mode=755", "lab-ovl", ovl,],
        )?;
        self.run(None, &os!["mkdir", work, root])?;
        self.run(None, &os!["cp", "-a", seed, upper])?;
        let opts = format!(
            "lowerdir=/,upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        self.run(
            None,
            &os!["mount", "-t", "overlay", "-o", opts, "lab-root", root,],
        )?;
        let net_ns = Some(arg("--net=", &net::netns_path(netns)));
        self.run(
            net_ns,
            &os!["mount", "-t", "sysfs", "-o", "ro", "sysfs", r("sys")],
        )?;
        self.run(
            None,
            &os!["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", r("run"),],
        )?;
        self.run(
            None,
            &os!["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", r("tmp"),],
        )?;
        self.run(
            None,
            &os!["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", r("dev"),],
        )?;
        let devices = [
            "null", "zero", "full", "random", "urandom", "tty", "console",
        ];
        let nodes: Vec<PathBuf> = devices.iter().map(|d| r("dev").join(d)).collect();
        let mut touch: Vec<&OsStr> = vec![OsStr::new("touch")];
        touch.extend(nodes.iter().map(|n| n.as_os_str()));
        self.run(None, &touch)?;
        for (name, node) in devices.iter().zip(&nodes) {
            let source = if *name == "console" {
                PathBuf::from("/dev/null")
            } else {
                Path::new("/dev").join(name)
            };
            self.run(None, &os!["mount", "--bind", source, node])?;
        }
        self.run(None, &os!["mkdir", r("dev/pts"), r("dev/shm")])?;
        self.run(
            None,
            &os![
                "mount",
                "-t",
                "devpts",
                "-o",
                "newinstance,ptmxmode=0666",
                "devpts",
                r("dev/pts"),
            ],
        )?;
        self.run(None, &os!["ln", "-s", "pts/ptmx", r("dev/ptmx")])?;
        self.run(None, &os!["mount", "-t", "tmpfs", "tmpfs", r("dev/shm")])?;
        self.run(
            None,
            &os![
                "mount",
                "--bind",
                shared,
                r(SHARED_MOUNT.trim_start_matches('/')),
            ],
        )?;
        for dir in same_path_binds {
            let target = root.join(dir.strip_prefix("/").unwrap_or(dir));
            self.run(None, &os!["mkdir", "-p", target])?;
            self.run(None, &os!["mount", "--rbind", dir, target])?;
        }
        // umount(8) needs /proc: mount one for the switch, then drop it (systemd's own pid
        // namespace gets a fresh /proc from `unshare --mount-proc`).
        self.run(None, &os!["mount", "-t", "proc", "proc", r("proc")])?;
        let wd = arg("--wdns=", &root);
        self.run(Some(wd), &os!["pivot_root", ".", ".oldroot"])?;
        self.run(None, &os!["umount", "--lazy", "/.oldroot"])?;
        self.run(None, &os!["umount", "/proc"])
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
