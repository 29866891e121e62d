//! `rollbackctl pki renew` and `rollbackctl pki list`: what a renewal did and what to do next,
//! and every certificate of the PKI directory with its expiry (library: `pki_lifecycle`).

use anyhow::{Context, Result};
use clap::ValueEnum;
use rollback_common::expiry::{self, DEFAULT_CERT_CHECK_SECS, Expiry};
use rollback_common::identity::Role;
use rollback_common::pki::PkiDir;
use rollback_common::pki_lifecycle::ListedCert;
use serde_json::json;

/// A role as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Agent,
    Operator,
    Coordinator,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Agent => Role::Agent,
            RoleArg::Operator => Role::Operator,
            RoleArg::Coordinator => Role::Coordinator,
        }
    }
}

/// What the operator does once the files are replaced.
fn next_step(role: Role, name: &str) -> String {
    match role {
        Role::Agent => format!(
            "the agent on {name} picks the new pair up on its own within {DEFAULT_CERT_CHECK_SECS} seconds \
             (its cert_check_secs), without a restart: it reconnects with it once no run is in progress. \
             If that agent reads a copy of these files on its host, copy both there (key mode 0600, owned by \
             the agent's user); a pair that does not check out is refused and the old one kept"
        ),
        Role::Operator => format!(
            "rollbackctl uses the new pair from its next command; hand both files to operator {name}"
        ),
        Role::Coordinator => {
            "restart the coordinator to serve the new certificate (it reads it at start); \
             agents and operators trust it as it comes from the same CA"
                .to_string()
        }
    }
}

pub fn renew(pki: &PkiDir, role: Role, name: &str, days: u32, json: bool) -> Result<()> {
    let r = pki
        .renew(role, name, days)
        .with_context(|| format!("renewing the {role} certificate of `{name}`"))?;
    let now = expiry::now_unix();
    let next = next_step(role, name);
    if json {
        let doc = json!({
            "identity": r.identity.uri(),
            "serial": r.new.serial,
            "not_after": expiry::format_unix(r.new.not_after_unix),
            "not_after_unix": r.new.not_after_unix,
            "days_left": Expiry::at(r.new.not_after_unix, now).days_left(),
            "previous_serial": r.old.serial,
            "previous_not_after": expiry::format_unix(r.old.not_after_unix),
            "certificate": r.cert,
            "private_key": r.key,
            "previous_certificate": r.previous_cert,
            "previous_private_key": r.previous_key,
            "sans": r.new.dns_and_ip_sans,
            "next": next,
        });
        println!("{doc}");
        return Ok(());
    }
    let old_mark = Expiry::at(r.old.not_after_unix, now)
        .mark()
        .map(|m| format!(", {m}"))
        .unwrap_or_default();
    println!("renewed {}", r.identity);
    println!("  serial:      {}", r.new.serial);
    println!(
        "  valid until: {} ({} days)",
        expiry::format_unix(r.new.not_after_unix),
        Expiry::at(r.new.not_after_unix, now).days_left()
    );
    println!(
        "  was:         serial {}, valid until {}{old_mark}",
        r.old.serial,
        expiry::format_unix(r.old.not_after_unix)
    );
    if !r.new.dns_and_ip_sans.is_empty() {
        println!("  names:       {}", r.new.dns_and_ip_sans.join(", "));
    }
    println!("  certificate: {}", r.cert.display());
    println!("  private key: {} (mode 0600)", r.key.display());
    let prev_key = r
        .previous_key
        .as_ref()
        .map(|k| format!(" and {}", k.display()))
        .unwrap_or_default();
    println!(
        "  previous:    {}{prev_key} (move them back to roll back)",
        r.previous_cert.display()
    );
    println!("next: {next}");
    Ok(())
}

fn listed_json(c: &ListedCert, now: i64) -> serde_json::Value {
    match &c.read {
        Ok(r) => {
            let e = Expiry::at(r.facts.not_after_unix, now);
            json!({
                "role": c.kind,
                "name": c.name,
                "identity": r.identity.as_ref().map(ToString::to_string),
                "serial": r.facts.serial,
                "not_after": expiry::format_unix(r.facts.not_after_unix),
                "not_after_unix": r.facts.not_after_unix,
                "days_left": e.days_left(),
                "status": e.status(),
                "mark": e.mark(),
                "problems": r.problems,
                "file": c.path,
            })
        }
        Err(reason) => json!({
            "role": c.kind,
            "name": c.name,
            "status": "unreadable",
            "error": reason,
            "file": c.path,
        }),
    }
}

pub fn list(pki: &PkiDir, json: bool) -> Result<()> {
    let certs = pki
        .list()
        .with_context(|| format!("listing certificates in {}", pki.dir.display()))?;
    let now = expiry::now_unix();
    if json {
        let rows: Vec<_> = certs.iter().map(|c| listed_json(c, now)).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let rows: Vec<[String; 6]> = certs
        .iter()
        .map(|c| match &c.read {
            Ok(r) => {
                let e = Expiry::at(r.facts.not_after_unix, now);
                let mut notes: Vec<String> = e.mark().into_iter().collect();
                notes.extend(r.problems.iter().cloned());
                [
                    c.kind.clone(),
                    c.name.clone(),
                    r.facts.serial.clone(),
                    expiry::format_unix(r.facts.not_after_unix),
                    e.days_left().to_string(),
                    notes.join("; "),
                ]
            }
            Err(reason) => [
                c.kind.clone(),
                c.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("unreadable: {reason} ({})", c.path.display()),
            ],
        })
        .collect();
    crate::output::print_columns(
        &["ROLE", "NAME", "SERIAL", "NOT AFTER", "DAYS LEFT", "NOTE"],
        &rows,
    );
    let attention = certs
        .iter()
        .filter(|c| {
            c.read.as_ref().map_or(true, |r| {
                !r.problems.is_empty() || Expiry::at(r.facts.not_after_unix, now).mark().is_some()
            })
        })
        .count();
    if attention > 0 {
        println!(
            "\n{attention} of {} need attention: renew with `rollbackctl pki renew ROLE NAME`",
            certs.len()
        );
    }
    Ok(())
}
