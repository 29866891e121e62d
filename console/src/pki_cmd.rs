//! `rollbackctl pki init|issue|renew|list|revoke|crl`: a private CA, certificates for agents,
//! operators and coordinators, and the fleet CRL, so a small fleet or a demo needs no other
//! tool. (`renew` and `list` are rendered by `cert_cmd`.)

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rollback_common::crl::{CrlWritten, RevokeReason};
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
    /// Issue a fresh certificate and key for an identity issued before (same identity, and
    /// the same --san names for a coordinator), replacing the pair atomically; the old pair
    /// is kept as NAME.pem.prev and NAME.key.prev. Agents pick a renewed pair up on their own.
    Renew {
        /// Whose certificate: agent, operator or coordinator.
        #[arg(value_enum)]
        role: crate::cert_cmd::RoleArg,
        /// The host id, operator or coordinator name it was issued for.
        name: String,
        /// Validity of the new certificate in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Every certificate in the PKI dir with its serial and expiry, soonest first; marks
    /// EXPIRED and "expires in N days" (within 30 days), and files that are not this PKI's.
    List {
        /// JSON (the same as --output json).
        #[arg(long)]
        json: bool,
    },
    /// Revoke every certificate issued to an agent or operator: adds them to the fleet CRL
    /// (crl.pem in the PKI directory, earlier entries kept) and prints how to deploy it. A
    /// coordinator with `crl = ".../crl.pem"` reloads it and closes their connections at once.
    Revoke {
        /// Whose certificates: an agent's or an operator's.
        #[arg(value_enum)]
        role: RevokeRole,
        /// The host id or operator name.
        name: String,
        /// The reason recorded in the CRL.
        #[arg(long, value_enum, default_value_t = ReasonArg::Unspecified)]
        reason: ReasonArg,
        #[command(flatten)]
        crl: CrlOpts,
    },
    /// Sign the fleet CRL again with fresh dates (or create an empty one) and print how to
    /// deploy it. Run it before the CRL's next update: a stale CRL refuses every client.
    Crl {
        #[command(flatten)]
        crl: CrlOpts,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RevokeRole {
    Agent,
    Operator,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ReasonArg {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    PrivilegeWithdrawn,
}

impl From<ReasonArg> for RevokeReason {
    fn from(r: ReasonArg) -> Self {
        match r {
            ReasonArg::Unspecified => RevokeReason::Unspecified,
            ReasonArg::KeyCompromise => RevokeReason::KeyCompromise,
            ReasonArg::AffiliationChanged => RevokeReason::AffiliationChanged,
            ReasonArg::Superseded => RevokeReason::Superseded,
            ReasonArg::CessationOfOperation => RevokeReason::CessationOfOperation,
            ReasonArg::PrivilegeWithdrawn => RevokeReason::PrivilegeWithdrawn,
        }
    }
}

#[derive(Debug, Args)]
pub struct CrlOpts {
    /// Days until the CRL's next update; past it the coordinator refuses every client.
    #[arg(long, default_value_t = 30)]
    pub crl_days: u32,
}

#[derive(Debug, Subcommand)]
pub enum IssueCmd {
    /// For the agent on host HOST_ID (the id must match host_id in its agent.toml).
    Agent {
        /// The host's id, as `host_id` in its agent.toml (e.g. web-1).
        host_id: String,
        #[command(flatten)]
        opts: IssueOpts,
    },
    /// For an operator; give them a role in the coordinator's [operators] table.
    Operator {
        /// The operator's name (e.g. alice), as the coordinator's [operators] table names them.
        name: String,
        #[command(flatten)]
        opts: IssueOpts,
    },
    /// For a coordinator; --san lists every DNS name or IP agents and operators dial.
    Coordinator {
        /// The coordinator's name (e.g. coord-1).
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
        PkiCmd::Renew { role, name, days } => {
            crate::cert_cmd::renew(&pki, role.into(), &name, days, json)?
        }
        PkiCmd::List { json: flag } => crate::cert_cmd::list(&pki, json || flag)?,
        PkiCmd::Revoke {
            role,
            name,
            reason,
            crl,
        } => {
            let role = match role {
                RevokeRole::Agent => Role::Agent,
                RevokeRole::Operator => Role::Operator,
            };
            let written = pki
                .revoke(role, &name, reason.into(), crl.crl_days)
                .with_context(|| format!("revoking {role} `{name}` in {}", args.dir.display()))?;
            print_crl(&written, Some((role, &name)), json)?;
        }
        PkiCmd::Crl { crl } => {
            let written = pki
                .refresh_crl(crl.crl_days)
                .with_context(|| format!("writing the CRL in {}", args.dir.display()))?;
            print_crl(&written, None, json)?;
        }
    }
    Ok(())
}

fn print_crl(written: &CrlWritten, revoked: Option<(Role, &str)>, json: bool) -> Result<()> {
    use time::format_description::well_known::Rfc3339;
    let next_update = written.next_update.format(&Rfc3339)?;
    let serials = |s: &[rollback_common::identity::Serial]| {
        s.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    if json {
        let doc = serde_json::json!({
            "crl": written.path,
            "revoked_now": serials(&written.newly_revoked),
            "already_revoked": serials(&written.already_revoked),
            "entries": written.entries,
            "crl_number": written.number,
            "next_update": next_update,
        });
        println!("{doc}");
        return Ok(());
    }
    if let Some((role, name)) = revoked {
        for s in &written.newly_revoked {
            println!("revoked {role} {name}: certificate serial {s}");
        }
        for s in &written.already_revoked {
            println!("{role} {name}: certificate serial {s} was already revoked");
        }
    }
    println!(
        "CRL: {} ({} revoked certificates, CRL number {}, next update {next_update})",
        written.path.display(),
        written.entries,
        written.number
    );
    println!(
        "deploy: point `crl = \"{}\"` in coordinator.toml at this file, or copy it to the path \
         `crl` names there; a running coordinator reloads it within a second of the change (or \
         on SIGHUP) and closes the revoked certificates' connections at once.",
        written.path.display()
    );
    println!(
        "refresh it with `rollbackctl pki crl` before {next_update}: a CRL past its next update \
         refuses every client."
    );
    Ok(())
}
