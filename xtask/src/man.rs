//! `cargo xtask man [--out DIR]`: man pages for `rollbackctl` and each of its subcommands,
//! generated from the same clap definitions as `--help` (clap_mangen), so they cannot drift.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory as _};

#[derive(Args)]
pub struct ManArgs {
    /// Where to write the pages (default target/man).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    out: &std::path::Path,
    n: &mut usize,
) -> Result<()> {
    let cmd = cmd.clone().name(name.to_string());
    let path = out.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .with_context(|| format!("rendering {name}(1)"))?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    *n += 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), out, n)?;
    }
    Ok(())
}

pub fn run(args: ManArgs) -> Result<()> {
    let out = args
        .out
        .unwrap_or_else(|| crate::workspace_root().join("target").join("man"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut n = 0;
    write_pages(
        &rollback_console::Cli::command(),
        "rollbackctl",
        &out,
        &mut n,
    )?;
    println!(
        "cargo xtask man: {n} pages in {} (read one: man -l {}/rollbackctl.1)",
        out.display(),
        out.display()
    );
    Ok(())
}
