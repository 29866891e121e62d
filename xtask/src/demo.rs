//! `cargo xtask demo`: the README's first command. Builds the binaries, makes sure the venv
//! with alembic exists, then tells the demo story of `rollback_tests::demo` on a fresh fleet
//! lab, streaming to stdout. Needs root (the lab uses namespaces, mounts and cgroups).
//! Any failure ends with one `cargo xtask demo: failed: ...` line and exit status 1.

use std::process::Command;

use anyhow::{Context, Result, bail};
use rollback_tests::{demo, lab};

pub fn run(ui: bool) -> Result<()> {
    if let Err(reason) = lab::check_prerequisites() {
        eprintln!("cargo xtask demo: cannot run: {reason}; run it as root on Linux");
        std::process::exit(1);
    }
    if let Err(e) = build_and_tell(ui) {
        eprintln!("\ncargo xtask demo: failed: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn build_and_tell(ui: bool) -> Result<()> {
    eprintln!(
        "cargo xtask demo: builds fleet-rollback (the first build takes a few minutes on 2 cores; later ones seconds), \
         boots a lab of {} app hosts and a database host, takes a snapshot, deploys badly, and rolls the fleet back live",
        demo::APP_HOSTS
    );
    build_binaries("cargo xtask demo")?;
    crate::venv::ensure()?;
    // From here on Ctrl-C removes the lab instead of leaving it behind.
    demo::tear_down_on_interrupt(demo::LAB_NAME)?;
    let web = if ui {
        demo::WebUi::Interactive
    } else {
        demo::WebUi::Off
    };
    demo::run(&mut std::io::stdout().lock(), web)
}

/// `cargo build --workspace --bins`: the demo and `lab up --coordinators N` run the coordinator, the agents and
/// `rollbackctl` from target/debug.
pub(crate) fn build_binaries(who: &str) -> Result<()> {
    eprintln!("{who}: building the binaries (cargo build --workspace --bins)...");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Not --quiet: cargo's own progress (crates compiled, the bar) shows the build moving.
    let status = Command::new(cargo)
        .args(["build", "--workspace", "--bins"])
        .current_dir(crate::workspace_root())
        .status()
        .context("starting cargo build --workspace --bins")?;
    if !status.success() {
        bail!("cargo build --workspace --bins failed with {status}");
    }
    Ok(())
}
