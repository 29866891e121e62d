//! What to boot ([`LabSpec`]) and the names every part of one lab instance derives from its
//! name, so that parallel labs never collide and a stale lab can be found by prefix.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};

/// Where lab state lives on the machine (one directory per lab, plus the allocation lock).
pub const STATE_ROOT: &str = "/run/rollback-lab";
/// Every lab's names (namespaces, cgroups) start with this, then the lab's name and a '.'.
pub const NAME_PREFIX: &str = "rbl-";

/// Host id of the database host.
pub const DB_HOST: &str = "db";
/// Id of the coordinator's namespace (a netns on the bridge, without systemd).
pub const COORDINATOR: &str = "coordinator";
/// Id of the namespace holding the bridge.
const FABRIC: &str = "fabric";

/// What to boot.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Lab instance name: 1–20 of `a-z 0-9 -`, starting with a letter; unique per
    /// concurrently running lab (tests use their own name).
    pub name: String,
    /// Number of app hosts (`app1`, `app2`, …).
    pub app_hosts: usize,
    /// Boot the database host `db` with a PostgreSQL 15 cluster.
    pub database: bool,
    /// Deploy the sample app on every app host (needs `database`): clone, migrate, start
    /// `app.service`, and wait until every `/readyz` answers 200.
    pub deploy_app: bool,
    /// Deadline for each waiting step of the boot.
    pub step_timeout: Duration,
    /// Directories to show inside every host at the same path. The checkout and the venv
    /// always are; everything on the root filesystem (outside /tmp, /run, /dev) is anyway.
    /// Add e.g. a `CARGO_TARGET_DIR` on another filesystem.
    pub shared_paths: Vec<PathBuf>,
}

impl LabSpec {
    /// Three app hosts, the database host, the app deployed.
    pub fn new(name: &str) -> LabSpec {
        LabSpec {
            name: name.to_string(),
            app_hosts: 3,
            database: true,
            deploy_app: true,
            step_timeout: Duration::from_secs(60),
            shared_paths: Vec::new(),
        }
    }

    pub fn app_hosts(mut self, n: usize) -> LabSpec {
        self.app_hosts = n;
        self
    }

    /// Shows `dir` inside every host at the same path (see [`LabSpec::shared_paths`]).
    pub fn share_path(mut self, dir: impl Into<PathBuf>) -> LabSpec {
        self.shared_paths.push(dir.into());
        self
    }

    /// Hosts only: no database, no app.
    pub fn bare(mut self) -> LabSpec {
        self.database = false;
        self.deploy_app = false;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if !(1..=50).contains(&self.app_hosts) {
            bail!(
                "lab {}: app_hosts must be 1..=50, not {}",
                self.name,
                self.app_hosts
            );
        }
        if self.deploy_app && !self.database {
            bail!(
                "lab {}: deploying the app needs the database host",
                self.name
            );
        }
        Ok(())
    }
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let starts = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if !(ok_chars && starts && (1..=20).contains(&name.len())) {
        bail!("lab name {name:?} must be 1-20 of a-z 0-9 -, starting with a letter");
    }
    Ok(())
}

/// Names and paths of one lab instance. Lab names contain no '.', so "rbl-NAME." is a prefix
/// no other lab shares.
#[derive(Debug, Clone)]
pub struct Names {
    lab: String,
}

impl Names {
    pub fn new(lab: &str) -> Names {
        Names {
            lab: lab.to_string(),
        }
    }

    /// Prefix of this lab's network namespaces and cgroups.
    pub fn prefix(&self) -> String {
        format!("{NAME_PREFIX}{}.", self.lab)
    }

    /// Network namespace (and cgroup leaf) name of a host or of the coordinator.
    pub fn node(&self, id: &str) -> String {
        format!("{}{id}", self.prefix())
    }

    pub fn fabric(&self) -> String {
        self.node(FABRIC)
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(STATE_ROOT).join(&self.lab)
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir().join("state.json")
    }

    /// Directory of namespace files (a private bind mount, as `ip netns` does for /run/netns).
    pub fn ns_dir(&self) -> PathBuf {
        self.state_dir().join("ns")
    }

    pub fn host_dir(&self, id: &str) -> PathBuf {
        self.state_dir().join("hosts").join(id)
    }

    /// Directory shared by every host, mounted at [`SHARED_MOUNT`](super::SHARED_MOUNT).
    pub fn shared_dir(&self) -> PathBuf {
        self.state_dir().join("shared")
    }
}

/// Address of a node in the lab's /24: coordinator .1, db .2, appN .(10+N).
pub fn node_addr(subnet: u8, id: &str) -> Ipv4Addr {
    let last = match id {
        COORDINATOR => 1,
        DB_HOST => 2,
        app => 10 + app.trim_start_matches("app").parse::<u8>().unwrap_or(0),
    };
    Ipv4Addr::new(10, 77, subnet, last)
}

/// Id of the n-th app host (1-based).
pub fn app_host_id(n: usize) -> String {
    format!("app{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_are_checked() {
        for good in ["dev", "t-fleet", "a1", "abcdefghij0123456789"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1lab",
            "Dev",
            "a.b",
            "a/b",
            "abcdefghij0123456789x",
            "-x",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_of_one_lab_share_a_prefix_no_other_lab_has() {
        let a = Names::new("a");
        let a_app1 = Names::new("a-app1");
        assert_eq!(a.node("app1"), "rbl-a.app1");
        assert!(!a_app1.node("fabric").starts_with(&a.prefix()));
        assert_eq!(a.state_dir(), PathBuf::from("/run/rollback-lab/a"));
    }

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(node_addr(7, COORDINATOR), Ipv4Addr::new(10, 77, 7, 1));
        assert_eq!(node_addr(7, DB_HOST), Ipv4Addr::new(10, 77, 7, 2));
        assert_eq!(node_addr(7, &app_host_id(3)), Ipv4Addr::new(10, 77, 7, 13));
    }

    #[test]
    fn spec_rejects_an_app_without_database() {
        let mut spec = LabSpec::new("x");
        spec.database = false;
        assert!(spec.validate().is_err());
        assert!(LabSpec::new("x").bare().validate().is_ok());
        assert!(LabSpec::new("x").app_hosts(0).validate().is_err());
    }
}
