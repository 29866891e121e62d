//! `cargo xtask test`: installs what the suites need, builds every binary the suites run as
//! real processes, then runs the whole workspace suite (nextest when installed) once per store:
//! SQLite first, then PostgreSQL against a throwaway cluster it starts (`rollback_tests::pg`)
//! and stops afterwards. Without the PostgreSQL server binaries the second run is skipped with
//! a message — except under CI (`CI=true` or `ROLLBACK_LAB_REQUIRED=1`), where that is an error.
//! The Debian packages of the debug binaries (`cargo xtask package --dev`, cargo-deb installed
//! when missing) are built before the suite, for `lab_package`.

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use rollback_tests::pg;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stores {
    Both,
    Sqlite,
    Postgres,
}

#[derive(Args)]
pub struct TestArgs {
    /// Which store(s) to run the suite against.
    #[arg(long, value_enum, default_value = "both")]
    pub store: Stores,
    /// Extra arguments passed to the test runner (e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Whether a missing prerequisite must fail the run rather than skip part of it.
fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("ROLLBACK_LAB_REQUIRED").is_ok_and(|v| v == "1")
}

/// Installs a Debian package that provides `program` when it is missing (idempotent).
pub(crate) fn ensure_program(program: &str, package: &str, why: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()));
    if found {
        return Ok(());
    }
    eprintln!("xtask: installing {package} ({why})");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("running apt-get install {package}"))
    };
    let mut status = install()?;
    if !status.success() {
        // Stale package lists on a fresh machine: refresh them once and try again.
        eprintln!("xtask: apt-get install {package} failed; refreshing the package lists");
        let updated = Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .context("running apt-get update")?;
        if updated.success() {
            status = install()?;
        }
    }
    if !status.success() {
        bail!(
            "apt-get install {package} failed ({status}); {why} needs it: install it and run again"
        );
    }
    Ok(())
}

pub fn run(args: TestArgs) -> Result<()> {
    let root = crate::workspace_root();
    let venv = crate::venv::ensure()?;
    ensure_program("tmux", "tmux", "the terminal tests of `rollbackctl` run it")?;
    ensure_program(
        "chromium",
        "chromium",
        "the web console's browser tests (lab_ui) drive it",
    )?;
    ensure_program(
        "chromedriver",
        "chromium-driver",
        "the web console's browser tests (lab_ui) drive chromium through it",
    )?;
    // Every binary the suites start, then the suites' own build: `cargo test` unifies the
    // dev-dependencies' features and relinks the binaries of packages with integration tests
    // (rollback-agent), so packaging after `cargo build --bins` alone would leave the packages
    // older than the binaries they claim; `cargo test --no-run` alone does not build the
    // binaries of packages without integration tests (rollback-coordinator).
    cargo(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--workspace", "--bins"]),
    )?;
    cargo(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--workspace", "--no-run"]),
    )?;
    // lab_package installs these in the lab: the debug binaries just built, packaged.
    crate::package::ensure_tools()?;
    crate::package::build_debs("dev", false, &rollback_tests::packages::dev_dir())?;
    let mut failed = Vec::new();
    if args.store != Stores::Postgres {
        eprintln!("xtask: the suite on the SQLite store");
        if let Err(e) = suite(&args.rest, &venv, &[(pg::STORE_ENV, "sqlite".into())]) {
            failed.push(format!("SQLite: {e:#}"));
        }
    }
    if args.store != Stores::Sqlite {
        if !pg::available() && !required() {
            eprintln!(
                "xtask: SKIPPED the suite on the PostgreSQL store: no server binaries in {} (apt-get install postgresql-15; under CI this is an error)",
                pg::PG_BIN
            );
        } else {
            let dir = root.join("target").join("test-postgres");
            let _ = std::fs::remove_dir_all(&dir);
            let mut cluster = pg::Cluster::start(&dir)
                .context("starting the PostgreSQL cluster for the suite")?;
            eprintln!(
                "xtask: the suite on the PostgreSQL store (cluster on 127.0.0.1:{}, {})",
                cluster.server.port,
                dir.display()
            );
            if let Err(e) = suite(&args.rest, &venv, &cluster.env()) {
                failed.push(format!("PostgreSQL: {e:#}"));
            }
            cluster
                .stop()
                .context("stopping the suite's PostgreSQL cluster")?;
        }
    }
    if !failed.is_empty() {
        bail!("the suite failed on {}", failed.join("; "));
    }
    Ok(())
}

fn suite(rest: &[String], venv: &std::path::Path, env: &[(&str, String)]) -> Result<()> {
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = Command::new("cargo");
    cmd.current_dir(crate::workspace_root())
        .env("ROLLBACK_LAB_VENV", venv);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    cmd.args(rest);
    cargo(&mut cmd)
}

fn cargo(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
