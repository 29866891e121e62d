//! `cargo xtask`: the developer entry points — `test` (install what the suites need, run them
//! all), `demo` (a real fleet rollback on a local lab), `lab up|status|down|exec`, `bench`
//! (speed and footprint against the bash bound, Ansible and Salt), `man` (rollbackctl's man
//! pages), `package` (the Debian packages, and static binaries where the toolchain allows).

mod bench;
mod demo;
mod lab;
mod man;
mod package;
mod test_cmd;
mod venv;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "fleet-rollback developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the tests need (alembic venv under target/), build, run the whole suite.
    Test(test_cmd::TestArgs),
    /// Boot a local fleet lab, break a deployment, roll it back live, tear down.
    Demo {
        /// Also open the web console (`rollbackctl ui`) on this machine's 127.0.0.1 and print
        /// its URL: the rollback waits 15 s for you to open it, and the console (and the lab)
        /// stay up after the story until Ctrl-C.
        #[arg(long)]
        ui: bool,
    },
    /// Boot, inspect, use and tear down a fleet lab by hand.
    Lab(lab::LabArgs),
    /// Benchmarks against the bash bound, Ansible and Salt; rewrites BENCHMARKS.md's results.
    Bench(bench::BenchArgs),
    /// Man pages for rollbackctl and its subcommands (clap_mangen), into target/man.
    Man(man::ManArgs),
    /// Debian packages of the agent, coordinator and rollbackctl (cargo-deb) into
    /// target/debian/, and static (musl) binaries when that target is installed.
    Package(package::PackageArgs),
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test(args) => test_cmd::run(args),
        Cmd::Demo { ui } => demo::run(ui),
        Cmd::Lab(args) => lab::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Man(args) => man::run(args),
        Cmd::Package(args) => package::run(args),
    }
}
