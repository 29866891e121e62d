//! The Debian packages `cargo xtask package` builds (cargo-deb, metadata in each crate's
//! Cargo.toml, units and example configs in `agent/debian/` and `coordinator/debian/`): their
//! names, where the builds land, and finding a build of all three that is not older than the
//! binaries it was made from (for the `lab_package` suite).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The agent's package (unit `fleet-rollback-agent.service`).
pub const AGENT_PACKAGE: &str = "fleet-rollback-agent";
/// The coordinator's package (unit `fleet-rollback-coordinator.service`, user
/// `fleet-rollback`).
pub const COORDINATOR_PACKAGE: &str = "fleet-rollback-coordinator";
/// `rollbackctl`'s package (no unit).
pub const CLI_PACKAGE: &str = "fleet-rollback-cli";
/// The coordinator's system user and group.
pub const COORDINATOR_USER: &str = "fleet-rollback";
/// Where the packages put their configuration, and operators their certificates.
pub const CONFIG_DIR: &str = "/etc/fleet-rollback";

/// (cargo package, Debian package, binary) for each package built.
pub const PACKAGES: [(&str, &str, &str); 3] = [
    (
        "rollback-coordinator",
        COORDINATOR_PACKAGE,
        "rollback-coordinator",
    ),
    ("rollback-agent", AGENT_PACKAGE, "rollback-agent"),
    ("rollback-console", CLI_PACKAGE, "rollbackctl"),
];

/// `target/debian`: the release packages.
pub fn release_dir() -> PathBuf {
    target_dir().join("debian")
}

/// `target/debian/dev`: packages of the debug binaries (`cargo xtask package --dev`, built by
/// `cargo xtask test` for the `lab_package` suite).
pub fn dev_dir() -> PathBuf {
    release_dir().join("dev")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::lab::workspace_root().join("target"))
}

/// The newest `.deb` of Debian package `name` in `dir`.
pub fn find_deb(dir: &Path, name: &str) -> Result<PathBuf> {
    let prefix = format!("{name}_");
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    let mut found: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if !(file.starts_with(&prefix) && file.ends_with(".deb")) {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .with_context(|| format!("reading the time of {}", entry.path().display()))?;
        if found.as_ref().is_none_or(|(t, _)| modified > *t) {
            found = Some((modified, entry.path()));
        }
    }
    found
        .map(|(_, p)| p)
        .with_context(|| format!("no {name}_*.deb in {}", dir.display()))
}

/// The packages of the debug binaries in [`dev_dir`], each checked to be at least as new as the
/// binary in `target/debug` it packages: (Debian package, path). The error says how to build
/// them.
pub fn dev_debs() -> Result<Vec<(&'static str, PathBuf)>> {
    let dir = dev_dir();
    let fix = "build them with `cargo xtask package --dev` (`cargo xtask test` does)";
    let mut debs = Vec::new();
    for (_, package, binary) in PACKAGES {
        let deb = find_deb(&dir, package).with_context(|| fix.to_string())?;
        let built = crate::support::bin(binary);
        let time = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .with_context(|| format!("reading the time of {}", p.display()))
        };
        if time(&deb)? < time(&built)? {
            bail!("{} is older than {}: {fix}", deb.display(), built.display());
        }
        debs.push((package, deb));
    }
    Ok(debs)
}
