//! The peers of part (a): the bash bound (sequential and `xargs -P 16`), Ansible (ansible-core,
//! `connection=local`) and Salt (one master, N minions on loopback), each installed by the
//! bench into a venv under `target/bench/`. Every peer does the same three things per host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::hosts::{self, Hosts};
use super::sys::{self, Daemon};

/// One host of the bash bound: the rollback's three commands.
const HOST_SH: &str = r#"#!/bin/bash
# cargo xtask bench: one host of the bash bound. Usage: host.sh HOST_DIR SHA BASE_URL
set -euo pipefail
git -C "$1/app" checkout --quiet "$2"
cp "$1/.env.backup" "$1/.env"
curl -fsS -o /dev/null "$3/healthz"
"#;

/// The bash bound, sequential. Usage: seq.sh SHA BASE_URL HOST_DIR...
const SEQ_SH: &str = r#"#!/bin/bash
# cargo xtask bench: the bash bound, one host after the other. Usage: seq.sh SHA BASE_URL DIR...
set -euo pipefail
here=$(dirname "$0")
sha=$1; url=$2; shift 2
for d in "$@"; do "$here/host.sh" "$d" "$sha" "$url"; done
"#;

/// The bash bound, 16 hosts at a time. Usage: par.sh SHA BASE_URL HOST_DIR...
const PAR_SH: &str = r#"#!/bin/bash
# cargo xtask bench: the bash bound, 16 hosts at a time. Usage: par.sh SHA BASE_URL DIR...
set -euo pipefail
here=$(dirname "$0")
sha=$1; url=$2; shift 2
printf '%s\n' "$@" | xargs -d '\n' -P 16 -I{} "$here/host.sh" {} "$sha" "$url"
"#;

const PLAYBOOK: &str = r#"# cargo xtask bench: the rollback as an Ansible play (connection=local, one host per dir).
- hosts: all
  gather_facts: false
  tasks:
    - name: git checkout the previous commit
      ansible.builtin.command:
        argv: [git, -C, "{{ dir }}/app", checkout, --quiet, "{{ sha }}"]
    - name: restore the env file
      ansible.builtin.copy:
        src: "{{ dir }}/.env.backup"
        dest: "{{ dir }}/.env"
        remote_src: true
    - name: check /healthz
      ansible.builtin.uri:
        url: "{{ health }}/healthz"
"#;

pub const ANSIBLE_PIN: &str = "ansible-core==2.19.14";
pub const SALT_PIN: &str = "salt==3008.4";

/// Writes the bash bound's scripts; returns their directory.
pub fn bash_scripts(root: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("bash");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in [("host.sh", HOST_SH), ("seq.sh", SEQ_SH), ("par.sh", PAR_SH)] {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", p.display()))?;
    }
    Ok(dir)
}

/// One timed run of the bash bound (`seq.sh` or `par.sh`) over the first `n` hosts.
pub fn bash_run(
    scripts: &Path,
    script: &str,
    hosts: &Hosts,
    n: usize,
    url: &str,
    scratch: &Path,
) -> Result<Duration> {
    let mut cmd = Command::new("bash");
    cmd.arg(scripts.join(script))
        .arg(&hosts.prev_sha)
        .arg(url)
        .args(&hosts.dirs[..n]);
    let done = sys::run_timed(cmd, scratch, Duration::from_secs(300))?;
    if !done.status.success() {
        bail!(
            "bash {script} failed ({}): {}",
            done.status,
            done.stderr.trim()
        );
    }
    Ok(done.wall)
}

/// Creates a venv under `dir` with `pin` installed (once; a marker records the pin).
pub fn venv(dir: &Path, pin: &str) -> Result<PathBuf> {
    let marker = dir.join(".installed");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == pin) {
        return Ok(dir.to_path_buf());
    }
    eprintln!("bench: installing {pin} into {}", dir.display());
    sys::run_ok(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(dir),
    )?;
    sys::run_ok(
        Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(pin),
    )
    .with_context(|| format!("pip install {pin}"))?;
    std::fs::write(&marker, pin).with_context(|| format!("writing {}", marker.display()))?;
    Ok(dir.to_path_buf())
}

/// The first line of `PROGRAM --version`.
pub fn version_of(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Ansible for the first `n` hosts: an inventory with one local host per directory.
pub struct Ansible {
    venv: PathBuf,
    dir: PathBuf,
}

impl Ansible {
    pub fn install(root: &Path) -> Result<Self> {
        let venv = venv(&root.join("venv-ansible"), ANSIBLE_PIN)?;
        let dir = root.join("ansible");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("play.yml"), PLAYBOOK).context("writing play.yml")?;
        Ok(Self { venv, dir })
    }

    pub fn version(&self) -> String {
        version_of(&self.venv.join("bin/ansible-playbook"))
    }

    /// One timed `ansible-playbook` over the first `n` hosts with `forks`.
    pub fn run(&self, hosts: &Hosts, n: usize, forks: usize, url: &str) -> Result<Duration> {
        let inventory = self.dir.join(format!("inventory-{n}.ini"));
        let mut inv = String::from("[fleet]\n");
        for (i, d) in hosts.dirs[..n].iter().enumerate() {
            inv.push_str(&format!("{} dir={}\n", hosts::name(i + 1), d.display()));
        }
        inv.push_str(&format!(
            "[fleet:vars]\nansible_connection=local\nansible_python_interpreter={}\n",
            self.venv.join("bin/python").display()
        ));
        std::fs::write(&inventory, inv).context("writing inventory")?;
        let home = self.dir.join("home");
        let mut cmd = Command::new(self.venv.join("bin/ansible-playbook"));
        cmd.current_dir(&self.dir)
            .arg("-i")
            .arg(&inventory)
            .arg("-f")
            .arg(forks.to_string())
            .arg(self.dir.join("play.yml"))
            .arg("-e")
            .arg(format!("sha={}", hosts.prev_sha))
            .arg("-e")
            .arg(format!("health={url}"))
            .env("ANSIBLE_HOME", &home)
            .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
            .env("ANSIBLE_REMOTE_TMP", home.join("remote-tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_DEPRECATION_WARNINGS", "0");
        let done = sys::run_timed(cmd, &self.dir.join("last"), Duration::from_secs(600))?;
        if !done.status.success() {
            let tail: Vec<&str> = done.stdout.lines().rev().take(15).collect();
            bail!(
                "ansible-playbook failed ({}): {}\n{}",
                done.status,
                done.stderr.trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(done.wall)
    }
}

/// Salt: one master and `n` minions on 127.0.0.1 with their own root dirs.
pub struct Salt {
    venv: PathBuf,
    dir: PathBuf,
    master: Option<Daemon>,
    minions: Vec<Daemon>,
}

const SALT_PUBLISH_PORT: u16 = 24505;
const SALT_RET_PORT: u16 = 24506;

impl Salt {
    pub fn install(root: &Path) -> Result<Self> {
        let venv = venv(&root.join("venv-salt"), SALT_PIN)?;
        Ok(Self {
            venv,
            dir: root.join("salt"),
            master: None,
            minions: Vec::new(),
        })
    }

    pub fn version(&self) -> String {
        version_of(&self.venv.join("bin/salt"))
    }

    /// Starts a fresh master (keys and cache wiped) and `n` minions, and waits until all answer.
    pub fn start(&mut self, hosts: &Hosts, n: usize) -> Result<Duration> {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        let conf = self.dir.join("master-conf");
        std::fs::create_dir_all(&conf).with_context(|| format!("creating {}", conf.display()))?;
        std::fs::write(
            conf.join("master"),
            format!(
                "root_dir: {}\ninterface: 127.0.0.1\npublish_port: {SALT_PUBLISH_PORT}\nret_port: {SALT_RET_PORT}\n\
                 auto_accept: True\nlog_level: warning\nlog_file: {}\n",
                self.dir.join("master-root").display(),
                self.dir.join("master.log").display()
            ),
        )
        .context("writing salt master config")?;
        let mut cmd = Command::new(self.venv.join("bin/salt-master"));
        cmd.arg("-c").arg(&conf);
        self.master = Some(Daemon::spawn_group(
            cmd,
            &self.dir.join("master.stderr"),
            "salt-master",
        )?);
        std::thread::sleep(Duration::from_secs(3));
        let started = Instant::now();
        for (i, d) in hosts.dirs[..n].iter().enumerate() {
            let id = hosts::name(i + 1);
            let mconf = self.dir.join("minions").join(&id);
            std::fs::create_dir_all(&mconf)
                .with_context(|| format!("creating {}", mconf.display()))?;
            std::fs::write(
                mconf.join("minion"),
                format!(
                    "id: {id}\nmaster: 127.0.0.1\nmaster_port: {SALT_RET_PORT}\npublish_port: {SALT_PUBLISH_PORT}\n\
                     root_dir: {}\nlog_level: warning\nlog_file: {}\nacceptance_wait_time: 1\n\
                     grains:\n  bench_dir: {}\n",
                    mconf.join("root").display(),
                    mconf.join("minion.log").display(),
                    d.display()
                ),
            )
            .context("writing salt minion config")?;
            let mut cmd = Command::new(self.venv.join("bin/salt-minion"));
            cmd.arg("-c").arg(&mconf);
            self.minions.push(Daemon::spawn_group(
                cmd,
                &mconf.join("stderr"),
                "salt-minion",
            )?);
            // Groups of 10, so 100 minions do not all handshake at once.
            if (i + 1) % 10 == 0 {
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        // Untimed, and slow: 100 minions took 109 s on one 2-vCPU VM and more than 300 s on
        // another, so the wait grows with the minions.
        sys::wait_for(
            &format!("{n} salt minions answering"),
            Duration::from_secs(60 + 6 * n as u64),
            Duration::from_secs(1),
            || {
                if let Some(m) = self.master.as_mut() {
                    m.check_alive()?;
                }
                let out = self
                    .salt(&["*", "test.ping", "--out", "json", "--static", "-t", "10"])
                    .output()
                    .context("running salt test.ping")?;
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
                let ok = v.as_object().map_or(0, |m| {
                    m.values().filter(|x| x.as_bool() == Some(true)).count()
                });
                Ok((ok >= n).then_some(()))
            },
        )?;
        Ok(started.elapsed())
    }

    fn salt(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.venv.join("bin/salt"));
        cmd.arg("-c").arg(self.dir.join("master-conf")).args(args);
        cmd
    }

    /// One timed `salt '*' cmd.run` of the three commands on every minion.
    pub fn run(&self, hosts: &Hosts, n: usize, url: &str) -> Result<Duration> {
        // Values are a hex sha and http://127.0.0.1:PORT, both made by the bench.
        let shell = format!(
            "cd {{{{ grains['bench_dir'] }}}} && git -C app checkout --quiet {} && cp .env.backup .env && curl -fsS -o /dev/null {url}/healthz && echo ok",
            hosts.prev_sha
        );
        let cmd = self.salt(&[
            "*",
            "cmd.run",
            &shell,
            "template=jinja",
            "--out",
            "json",
            "--static",
            "-t",
            "120",
        ]);
        let done = sys::run_timed(cmd, &self.dir.join("last"), Duration::from_secs(300))?;
        let v: serde_json::Value =
            serde_json::from_str(&done.stdout).unwrap_or(serde_json::Value::Null);
        let ok = v.as_object().map_or(0, |m| {
            m.values().filter(|x| x.as_str() == Some("ok")).count()
        });
        if ok != n {
            bail!(
                "salt cmd.run: {ok} of {n} minions printed ok ({}): {}",
                done.status,
                done.stderr.trim()
            );
        }
        Ok(done.wall)
    }

    /// Stops the minions and the master (their whole process groups).
    pub fn stop(&mut self) {
        for m in &self.minions {
            m.terminate();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for m in &mut self.minions {
            m.wait_until(deadline);
        }
        self.minions.clear();
        if let Some(mut m) = self.master.take() {
            m.stop(Duration::from_secs(15));
        }
    }
}

impl Drop for Salt {
    fn drop(&mut self) {
        self.stop();
    }
}
