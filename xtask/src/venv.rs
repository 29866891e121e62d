//! The Python venv under `target/` holding alembic and psycopg2 for the fleet lab. Nothing is
//! installed system-wide; a finished install is marked so later runs skip it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Packages the lab's sample application and its migrations need.
const PACKAGES: &[&str] = &[
    "alembic>=1.13,<2",
    "psycopg2-binary>=2.9,<3",
    "SQLAlchemy>=2,<3",
];

/// Path of the venv; `rollback_tests::lab` finds it at the same place.
pub fn venv_dir() -> PathBuf {
    crate::workspace_root().join("target").join("lab-venv")
}

/// Creates the venv and installs the packages unless a previous run finished doing so. A
/// finished venv named by `ROLLBACK_LAB_VENV` (another checkout's) is used as it is.
pub fn ensure() -> Result<PathBuf> {
    if let Some(given) = std::env::var_os("ROLLBACK_LAB_VENV").map(PathBuf::from)
        && given.join(".installed").exists()
    {
        return Ok(given);
    }
    let dir = venv_dir();
    let marker = dir.join(".installed");
    // The system interpreter when there is one: the lab's app runs as an unprivileged user,
    // who cannot reach an interpreter under /root (e.g. pyenv's).
    let python = ["/usr/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("python3");
    let wanted = format!("{python}\n{}", PACKAGES.join("\n"));
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        return Ok(dir);
    }
    eprintln!(
        "xtask: creating python venv with alembic at {}",
        dir.display()
    );
    run(Command::new(python)
        .args(["-m", "venv", "--clear"])
        .arg(&dir))?;
    run(Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES))?;
    std::fs::write(&marker, wanted).with_context(|| format!("writing {}", marker.display()))?;
    Ok(dir)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
