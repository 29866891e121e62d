//! `cargo xtask lab`: boot, inspect and tear down a fleet lab by hand (filled in by the
//! fleet-lab work).

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct LabArgs {}

pub fn run(_args: LabArgs) -> Result<()> {
    anyhow::bail!("the lab arrives with the fleet-lab issue (#3)")
}
