//! `cargo xtask package`: the Debian packages `fleet-rollback-agent`,
//! `fleet-rollback-coordinator` and `fleet-rollback-cli` (cargo-deb, installed here when
//! missing; metadata in each crate's `[package.metadata.deb]`, units, example configs and
//! maintainer scripts in `agent/debian/` and `coordinator/debian/`) into `target/debian/`, and
//! the statically linked (musl) binaries when the toolchain has the musl target, else one line
//! saying it was skipped and how to enable it. `--dev` packages the debug binaries `cargo
//! build` made, without a release build, into `target/debian/dev/` (what `cargo xtask test`
//! does for the `lab_package` suite).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;
use rollback_tests::packages::{self, PACKAGES};

/// The cargo-deb release installed when none is (its `--profile dev` is a warning there).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// The static target.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

#[derive(Args)]
pub struct PackageArgs {
    /// Cargo profile to build and package.
    #[arg(long, default_value = "release")]
    profile: String,
    /// Package the debug binaries already built by `cargo build` (target/debug) without a
    /// release build, into target/debian/dev/.
    #[arg(long)]
    dev: bool,
    /// Package what `--profile` already built; build nothing.
    #[arg(long)]
    no_build: bool,
}

pub fn run(args: PackageArgs) -> Result<()> {
    ensure_tools()?;
    if args.dev {
        build_debs("dev", false, &packages::dev_dir())?;
        return Ok(());
    }
    build_debs(&args.profile, !args.no_build, &packages::release_dir())?;
    if !args.no_build {
        static_build(&args.profile)?;
    }
    Ok(())
}

/// cargo-deb (installed with `cargo install --locked` when `cargo deb` does not run) and
/// dpkg-shlibdeps (dpkg-dev, for the packages' `$auto` dependencies). Idempotent.
pub fn ensure_tools() -> Result<()> {
    crate::test_cmd::ensure_program(
        "dpkg-shlibdeps",
        "dpkg-dev",
        "cargo-deb computes the packages' dependencies with it",
    )?;
    if succeeds(Command::new("cargo").args(["deb", "--version"])) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (cargo xtask package needs it)");
    let status = Command::new("cargo")
        .args(["install", "cargo-deb", "--locked", "--version"])
        .arg(CARGO_DEB_VERSION)
        .status()
        .context("running cargo install cargo-deb")?;
    if !status.success() || !succeeds(Command::new("cargo").args(["deb", "--version"])) {
        bail!(
            "cargo install cargo-deb --locked --version {CARGO_DEB_VERSION} failed ({status}); the packages need it: install it and run again"
        );
    }
    Ok(())
}

/// Builds the three packages of `profile`'s binaries into `out` (after one `cargo build` of
/// the three binaries when `build`).
pub fn build_debs(profile: &str, build: bool, out: &Path) -> Result<()> {
    let root = crate::workspace_root();
    if build {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root).args(["build", "--profile", profile]);
        for (crate_name, _, _) in PACKAGES {
            cmd.args(["-p", crate_name]);
        }
        checked(cmd.arg("--bins"))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (crate_name, deb, _) in PACKAGES {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .args([
                "deb",
                "--no-build",
                "--quiet",
                "-p",
                crate_name,
                "--profile",
                profile,
            ])
            .arg("--output")
            .arg(out);
        if profile == "dev" {
            // Packages for the lab, not for shipping: the quick compression.
            cmd.arg("--fast");
        }
        checked(&mut cmd).with_context(|| format!("packaging {deb}"))?;
        // cargo-deb prints the file's path; check that it is where the suite looks.
        packages::find_deb(out, deb)?;
    }
    Ok(())
}

/// The statically linked binaries (musl) when the toolchain can make them; otherwise one line
/// saying it was skipped and the command that enables it.
fn static_build(profile: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == MUSL_TARGET)
        });
    if !installed {
        eprintln!(
            "xtask: SKIPPED the static (musl) build: the rustup target {MUSL_TARGET} is not installed; enable it with `rustup target add {MUSL_TARGET} && apt-get install musl-tools`, then run `cargo xtask package` again"
        );
        return Ok(());
    }
    if !on_path("musl-gcc") {
        eprintln!(
            "xtask: SKIPPED the static (musl) build: no musl-gcc for the C parts (ring, SQLite); enable it with `apt-get install musl-tools`, then run `cargo xtask package` again"
        );
        return Ok(());
    }
    let mut cmd = Command::new("cargo");
    cmd.current_dir(crate::workspace_root()).args([
        "build",
        "--profile",
        profile,
        "--target",
        MUSL_TARGET,
    ]);
    for (crate_name, _, _) in PACKAGES {
        cmd.args(["-p", crate_name]);
    }
    checked(cmd.arg("--bins")).context("the static (musl) build")?;
    let dir_name = if profile == "dev" { "debug" } else { profile };
    let dir = crate::workspace_root()
        .join("target")
        .join(MUSL_TARGET)
        .join(dir_name);
    for (_, _, binary) in PACKAGES {
        eprintln!("xtask: static {binary}: {}", dir.join(binary).display());
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
