//! `cargo xtask demo`: the README's first command (filled in by the fleet-lab work).

use anyhow::Result;

pub fn run() -> Result<()> {
    anyhow::bail!("the demo arrives with the fleet-lab issue (#3)")
}
