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
    /// For the agent on host HOST_ID (the id must match host_id in its agent.toml), or for
    /// every host of --from-file at once.
    #[command(after_help = "\
Enrolling many hosts: --from-file takes one host id per line (blank lines and # comments are
skipped). Every id is checked before anything is written. Hosts already issued are kept (so a
run cut off half-way is finished by running it again); --force replaces them. With --out-dir,
each host also gets DIR/HOST/ with ca.pem, agent.pem and agent.key (0600), ready for your
configuration management to copy to /etc/fleet-rollback/ on that host.

Examples:
    rollbackctl pki --dir pki issue agent web-1
    rollbackctl pki --dir pki issue agent --from-file hosts.txt --out-dir enrol")]
    Agent {
        /// The host's id, as `host_id` in its agent.toml (e.g. web-1).
        #[arg(required_unless_present = "from_file", conflicts_with = "from_file")]
        host_id: Option<String>,
        /// Issue for every host id in this file (one per line).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// With --from-file: also write DIR/HOST/{ca.pem,agent.pem,agent.key} per host.
        #[arg(long, value_name = "DIR", requires = "from_file")]
        out_dir: Option<PathBuf>,
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
        PkiCmd::Issue(IssueCmd::Agent {
            host_id: None,
            from_file: Some(file),
            out_dir,
            opts,
        }) => issue_agents(&pki, &file, out_dir.as_deref(), &opts, json)?,
        PkiCmd::Issue(cmd) => {
            let (role, name, sans, opts) = match cmd {
                IssueCmd::Agent { host_id, opts, .. } => (
                    Role::Agent,
                    host_id.context("a host id, or --from-file")?,
                    Vec::new(),
                    opts,
                ),
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

/// The host ids of an enrolment file: one per line, blank lines and `#` comments skipped.
/// Every problem (an invalid id, a repeat) is reported at once, naming its line.
fn host_ids(text: &str, file: &std::path::Path) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut problems = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let id = line.split('#').next().unwrap_or_default().trim();
        if id.is_empty() {
            continue;
        }
        let n = i + 1;
        if let Err(e) = rollback_common::identity::validate_name("host id", id) {
            problems.push(format!("line {n}: {e}"));
        } else if let Some(first) = seen.insert(id.to_string(), n) {
            problems.push(format!("line {n}: `{id}` again (first on line {first})"));
        } else {
            ids.push(id.to_string());
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "{}: nothing was issued:\n  {}",
            file.display(),
            problems.join("\n  ")
        );
    }
    if ids.is_empty() {
        anyhow::bail!("{}: no host ids in it", file.display());
    }
    Ok(ids)
}

/// Writes `data` to `path` with `mode` through a temporary file renamed over it, so a crash
/// leaves the old file or the new one, never half of one (and a planted symlink is replaced,
/// not followed).
fn write_replacing(path: &std::path::Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// `pki issue agent --from-file`: every host of the file, all checked first; hosts already
/// issued (certificate and key both present) are kept unless `--force`.
fn issue_agents(
    pki: &PkiDir,
    file: &std::path::Path,
    out_dir: Option<&std::path::Path>,
    opts: &IssueOpts,
    json: bool,
) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the host list {}", file.display()))?;
    let ids = host_ids(&text, file)?;
    let ca = std::fs::read(pki.ca_cert())
        .with_context(|| format!("reading the fleet CA {}", pki.ca_cert().display()))?;
    let mut rows = Vec::new();
    let (mut issued, mut kept) = (0usize, 0usize);
    for (i, id) in ids.iter().enumerate() {
        let (cert, key) = (pki.cert(Role::Agent, id), pki.key(Role::Agent, id));
        // Both present: issued before (kept). One of the two: a run cut off between them,
        // never complete, so never deployed: issued again.
        let complete = cert.exists() && key.exists();
        let what = if complete && !opts.force {
            kept += 1;
            "kept"
        } else {
            let force = opts.force || cert.exists() || key.exists();
            pki.issue(Role::Agent, id, &[], opts.days, force)
                .with_context(|| format!("issuing the agent certificate for `{id}` (host {} of {}); the hosts before it are issued, run the command again to finish", i + 1, ids.len()))?;
            issued += 1;
            "issued"
        };
        let bundle = match out_dir {
            Some(dir) => {
                let d = dir.join(id);
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .with_context(|| format!("making {} private", d.display()))?;
                write_replacing(&d.join("ca.pem"), &ca, 0o644)?;
                let c =
                    std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
                write_replacing(&d.join("agent.pem"), &c, 0o644)?;
                let k =
                    std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
                write_replacing(&d.join("agent.key"), &k, 0o600)?;
                Some(d)
            }
            None => None,
        };
        if !json {
            println!(
                "[{}/{}] {id}: {what}{}",
                i + 1,
                ids.len(),
                bundle
                    .as_ref()
                    .map(|d| format!(" → {}/", d.display()))
                    .unwrap_or_default()
            );
        }
        rows.push(serde_json::json!({
            "host_id": id, "result": what, "certificate": cert, "private_key": key, "bundle": bundle,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{} host(s): {issued} issued, {kept} kept (already issued; --force replaces them)",
            ids.len()
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_list_is_checked_whole_before_anything_is_issued() {
        let file = std::path::Path::new("hosts.txt");
        let ok = host_ids("# web tier\nweb-1\n\n  web-2  # rack 4\nweb-3\n", file);
        assert_eq!(
            ok.ok(),
            Some(vec!["web-1".into(), "web-2".into(), "web-3".into()])
        );
        let bad = host_ids("web-1\n-x\nweb-1\nweb 2\n", file).map_err(|e| format!("{e:#}"));
        let err = bad.expect_err("refused");
        for want in [
            "line 2",
            "line 3: `web-1` again (first on line 1)",
            "line 4",
            "nothing was issued",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        assert!(host_ids("# nothing\n\n", file).is_err());
    }

    #[test]
    fn many_agents_are_enrolled_at_once_and_a_second_run_finishes_a_cut_off_one() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("a temp dir");
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("fleet.example", 30).expect("a CA");
        let hosts = dir.path().join("hosts.txt");
        std::fs::write(&hosts, "web-1\nweb-2\nweb-3\n").expect("the host list");
        let out = dir.path().join("enrol");
        let opts = IssueOpts {
            days: 30,
            force: false,
        };
        issue_agents(&pki, &hosts, Some(&out), &opts, true).expect("issued");
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0)
        };
        for h in ["web-1", "web-2", "web-3"] {
            let b = out.join(h);
            assert_eq!(mode(&b), 0o700, "{h}");
            assert_eq!(mode(&b.join("agent.key")), 0o600, "{h}");
            assert_eq!(
                std::fs::read(b.join("agent.pem")).ok(),
                std::fs::read(pki.cert(Role::Agent, h)).ok(),
                "{h}"
            );
            assert_eq!(
                std::fs::read(b.join("ca.pem")).ok(),
                std::fs::read(pki.ca_cert()).ok()
            );
        }
        // A run cut off after web-2's key: web-2 is issued again, the others kept.
        let web1 = std::fs::read(pki.cert(Role::Agent, "web-1")).expect("web-1");
        let web2 = std::fs::read(pki.cert(Role::Agent, "web-2")).expect("web-2");
        std::fs::remove_file(pki.cert(Role::Agent, "web-2")).expect("cut off");
        issue_agents(&pki, &hosts, Some(&out), &opts, true).expect("finished");
        assert_eq!(
            std::fs::read(pki.cert(Role::Agent, "web-1")).ok(),
            Some(web1)
        );
        let again = std::fs::read(pki.cert(Role::Agent, "web-2")).expect("web-2 again");
        assert_ne!(again, web2, "web-2 issued anew");
        assert_eq!(
            std::fs::read(out.join("web-2").join("agent.pem")).ok(),
            Some(again)
        );
    }
}
