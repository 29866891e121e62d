//! Finding the Python venv (alembic, psycopg2, SQLAlchemy) that `cargo xtask` installs under
//! target/; hosts see it at the same path through the overlay's lower layer.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Env var naming the venv (set by `cargo xtask test`).
pub const VENV_ENV: &str = "ROLLBACK_LAB_VENV";

/// The workspace root (parent of the `tests` crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `$ROLLBACK_LAB_VENV`, else `<workspace>/target/lab-venv`, unchecked.
pub fn default_dir() -> PathBuf {
    std::env::var_os(VENV_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target").join("lab-venv"))
}

/// [`default_dir`]: `<workspace>/target/lab-venv`; an error saying how to install
/// it when it lacks python or alembic.
pub fn locate() -> Result<PathBuf> {
    let dir = default_dir();
    for tool in ["bin/python", "bin/alembic"] {
        if !dir.join(tool).exists() {
            bail!(
                "the lab's Python venv is missing {} (run `cargo xtask test` or `cargo xtask lab up`, which install it, or set {VENV_ENV})",
                dir.join(tool).display()
            );
        }
    }
    if !dir.is_absolute() {
        bail!("{VENV_ENV} must be an absolute path, not {}", dir.display());
    }
    Ok(dir)
}
