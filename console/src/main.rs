//! `rollbackctl`: parse arguments, run the command, map failures to documented exit codes.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = rollback_console::Cli::parse();
    if let Err(err) = rollback_console::run(cli).await {
        eprintln!("rollbackctl: error: {err:#}");
        std::process::exit(rollback_console::error::exit_code(&err));
    }
}
