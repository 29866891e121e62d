//! `rollbackctl pki init|issue`: a private CA and certificates for agents, operators and
//! coordinators, so a small fleet or a demo needs no other tool.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rollback_common::identity::Role;
use rollback_common::pki::PkiDir;

#[derive(Debug, Args)]
pub struct PkiArgs {
    /// PKI directory holding ca.pem, ca.key and the issued certificates.
    #[arg(long, env = "ROLLBACK_PKI_DIR", default_value = "pki")]
    pub dir: PathBuf,
    #[command(subcommand)]
    pub cmd: PkiCmd,
}

#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Create the fleet CA (ca.pem, ca.key 0600). Refuses to replace an existing CA.
    Init {
        /// Trust domain written into every identity: spiffe://TRUST_DOMAIN/<role>/<name>.
        #[arg(long)]
        trust_domain: String,
        /// CA validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate and key (0600) signed by the fleet CA.
    #[command(subcommand)]
    Issue(IssueCmd),
}

#[derive(Debug, Subcommand)]
pub enum IssueCmd {
    /// For the agent on host HOST_ID (the id must match host_id in its agent.toml).
    Agent {
        host_id: String,
        #[command(flatten)]
        opts: IssueOpts,
    },
    /// For an operator; give them a role in the coordinator's [operators] table.
    Operator {
        name: String,
        #[command(flatten)]
        opts: IssueOpts,
    },
    /// For a coordinator; --san lists every DNS name or IP agents and operators dial.
    Coordinator {
        name: String,
        /// A DNS name or IP address the coordinator is reached at (repeatable).
        #[arg(long = "san", required = true, num_args = 1..)]
        sans: Vec<String>,
        #[command(flatten)]
        opts: IssueOpts,
    },
}

#[derive(Debug, Args)]
pub struct IssueOpts {
    /// Certificate validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Replace an existing certificate and key of the same name.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: PkiArgs, output: crate::output::Output) -> Result<()> {
    let json = output == crate::output::Output::Json;
    let pki = PkiDir::new(&args.dir);
    match args.cmd {
        PkiCmd::Init { trust_domain, days } => {
            pki.init(&trust_domain, days)
                .with_context(|| format!("creating the fleet CA in {}", args.dir.display()))?;
            if json {
                let doc = serde_json::json!({"trust_domain": trust_domain, "certificate": pki.ca_cert(), "private_key": pki.ca_key()});
                println!("{doc}");
            } else {
                println!("created CA for trust domain {trust_domain}");
                println!("  certificate: {}", pki.ca_cert().display());
                println!(
                    "  private key: {} (mode 0600; keep it offline if you can)",
                    pki.ca_key().display()
                );
            }
        }
        PkiCmd::Issue(cmd) => {
            let (role, name, sans, opts) = match cmd {
                IssueCmd::Agent { host_id, opts } => (Role::Agent, host_id, Vec::new(), opts),
                IssueCmd::Operator { name, opts } => (Role::Operator, name, Vec::new(), opts),
                IssueCmd::Coordinator { name, sans, opts } => (Role::Coordinator, name, sans, opts),
            };
            let files = pki
                .issue(role, &name, &sans, opts.days, opts.force)
                .with_context(|| format!("issuing {role} certificate for `{name}`"))?;
            if json {
                let doc = serde_json::json!({"identity": files.identity.uri(), "certificate": files.cert, "private_key": files.key});
                println!("{doc}");
            } else {
                println!("issued {}", files.identity);
                println!("  certificate: {}", files.cert.display());
                println!("  private key: {} (mode 0600)", files.key.display());
            }
        }
    }
    Ok(())
}
