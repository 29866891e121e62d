//! The runbook's decision tree, as a pure function: compare a host's state now with its
//! snapshot — schema changed → `database`; code changed → `application`; config changed →
//! `configuration`; several → all of them in a safe order (database first) — and say exactly
//! what to run.

use std::collections::HashMap;

use rollback_common::jobs::fact;
use rollback_common::proto::{Change, HostDiagnosis};

use crate::store::SnapshotRow;

/// Short form of a sha for messages.
fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

/// Shell-quotes a value for a printed command (the command is shown, never executed).
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '=' | ',' | ':')
        })
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Diagnoses one host from its state facts (from `state.read`) and latest snapshot.
pub fn diagnose_host(
    host: &str,
    snapshot: Option<&SnapshotRow>,
    facts: &HashMap<String, String>,
) -> HostDiagnosis {
    let get = |k: &str| facts.get(k).cloned().unwrap_or_default();
    let mut d = HostDiagnosis {
        host_id: host.to_string(),
        readyz_status: get("readyz_status"),
        readyz_body: get("readyz_body"),
        ..Default::default()
    };
    let Some(snap) = snapshot else {
        d.note = format!(
            "{host} has no snapshot: take one with `rollbackctl snapshot` before deploying"
        );
        return d;
    };
    d.snapshot_id = snap.snapshot_id.clone();
    let mut change = |what: &str, old: &str, new: &str| {
        d.changes.push(Change {
            what: what.into(),
            old: old.into(),
            new: new.into(),
        });
    };
    let (rev_now, sha_now, env_now, unit_now) = (
        get(fact::ALEMBIC_REVISION),
        get(fact::GIT_SHA),
        get(fact::ENV_SHA256),
        get(fact::UNIT_STATE),
    );
    if !snap.alembic_revision.is_empty()
        && facts.contains_key("alembic_revision")
        && rev_now != snap.alembic_revision
    {
        change("schema", &snap.alembic_revision, &rev_now);
    }
    if !snap.git_sha.is_empty() && !sha_now.is_empty() && sha_now != snap.git_sha {
        change("code", &snap.git_sha, &sha_now);
    }
    if !snap.env_sha256.is_empty() && !env_now.is_empty() && env_now != snap.env_sha256 {
        change("config", &snap.env_sha256, &env_now);
    }
    if snap.unit_state == "active" && !unit_now.is_empty() && unit_now != "active" {
        change("unit", &snap.unit_state, &unit_now);
    }
    let has = |w: &str| d.changes.iter().any(|c| c.what == w);
    for (what, procedure) in [
        ("schema", "database"),
        ("code", "application"),
        ("config", "configuration"),
    ] {
        if has(what) {
            d.procedures.push(procedure.into());
        }
    }
    d.command = command_for(
        &d.procedures,
        has("unit"),
        &format!("host={host}"),
        &snap.git_sha,
        &snap.snapshot_id,
    );
    if d.procedures.is_empty() && !has("unit") {
        let ready = d.readyz_status == "200";
        d.note = if ready {
            "matches its snapshot and is ready".into()
        } else {
            format!(
                "matches its snapshot but /readyz is {}: the cause is outside what snapshots record",
                d.readyz_status
            )
        };
    } else {
        let parts: Vec<String> = d
            .changes
            .iter()
            .map(|c| match c.what.as_str() {
                "schema" => format!("schema {} → {}", show(&c.old), show(&c.new)),
                "code" => format!("code {} → {}", short(&c.old), short(&c.new)),
                "config" => format!("config env sha256 {} → {}", short(&c.old), short(&c.new)),
                _ => format!("{} {} → {}", c.what, c.old, c.new),
            })
            .collect();
        d.note = parts.join("; ");
    }
    d
}

fn show(rev: &str) -> &str {
    if rev.is_empty() { "base" } else { rev }
}

/// The command that applies `procedures` to the hosts `selector` picks. Every interpolated
/// value is shell-quoted: snapshot ids, shas and host ids come from stored state and agents'
/// reports, so a hostile value must print as one inert word, never as shell syntax.
fn command_for(
    procedures: &[String],
    unit_stopped: bool,
    selector: &str,
    git_sha: &str,
    snapshot_id: &str,
) -> String {
    let select = quote(selector);
    match procedures {
        [] if unit_stopped => match selector.strip_prefix("host=") {
            Some(host) => format!("rollbackctl exec {} service.start", quote(host)),
            None => String::new(),
        },
        [] => String::new(),
        [p] if p == "configuration" => format!(
            "rollbackctl rollback --procedure configuration --select {select} --reason 'config changed since snapshot'"
        ),
        [p] if p == "application" => format!(
            "rollbackctl rollback --procedure application --revision {} --select {select} --reason 'code changed since snapshot'",
            quote(git_sha)
        ),
        _ => format!(
            "rollbackctl rollback --to-snapshot {} --select {select} --reason 'changed since snapshot'",
            quote(snapshot_id)
        ),
    }
}

/// One command for all diagnosed hosts.
pub fn fleet_command(
    selector: &str,
    hosts: &[HostDiagnosis],
    snapshots: &HashMap<String, SnapshotRow>,
) -> String {
    let changed: Vec<&HostDiagnosis> = hosts.iter().filter(|h| !h.procedures.is_empty()).collect();
    let Some(first) = changed.first() else {
        return String::new();
    };
    let same =
        changed.iter().all(|h| h.procedures == first.procedures) && changed.len() == hosts.len();
    if same && first.procedures.len() == 1 && first.procedures[0] != "database" {
        // One revision for every host only when their snapshots agree on it.
        let sha_of = |h: &HostDiagnosis| snapshots.get(&h.host_id).map(|s| s.git_sha.as_str());
        let sha = sha_of(first);
        let shas_agree = changed.iter().all(|h| sha_of(h) == sha);
        if let Some(sha) = sha.filter(|_| shas_agree) {
            return command_for(&first.procedures, false, selector, sha, "");
        }
    }
    command_for(&["several".into()], false, selector, "", "latest")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> SnapshotRow {
        SnapshotRow {
            snapshot_id: "s1".into(),
            host_id: "app1".into(),
            git_sha: "a".repeat(40),
            alembic_revision: "0002".into(),
            env_sha256: "e1".into(),
            unit_state: "active".into(),
            ..Default::default()
        }
    }

    fn facts(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_env_changed_is_configuration_alone() {
        let f = facts(&[
            ("alembic_revision", "0002"),
            ("git_sha", &"a".repeat(40)),
            ("env_sha256", "e2"),
            ("unit_state", "active"),
            ("readyz_status", "503"),
        ]);
        let d = diagnose_host("app1", Some(&snap()), &f);
        assert_eq!(d.procedures, ["configuration"]);
        assert_eq!(d.changes.len(), 1);
        assert!(
            d.command
                .contains("--procedure configuration --select host=app1"),
            "{}",
            d.command
        );
    }

    #[test]
    fn several_changes_compose_in_safe_order() {
        let f = facts(&[
            ("alembic_revision", "0003"),
            ("git_sha", &"b".repeat(40)),
            ("env_sha256", "e2"),
            ("unit_state", "active"),
        ]);
        let d = diagnose_host("app1", Some(&snap()), &f);
        assert_eq!(d.procedures, ["database", "application", "configuration"]);
        let whats: Vec<&str> = d.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(whats, ["schema", "code", "config"]);
        assert_eq!(
            (d.changes[0].old.as_str(), d.changes[0].new.as_str()),
            ("0002", "0003")
        );
        assert!(d.command.contains("--to-snapshot s1"), "{}", d.command);
    }

    #[test]
    fn unchanged_and_missing_snapshot() {
        let f = facts(&[
            ("alembic_revision", "0002"),
            ("git_sha", &"a".repeat(40)),
            ("env_sha256", "e1"),
            ("unit_state", "active"),
            ("readyz_status", "200"),
        ]);
        let d = diagnose_host("app1", Some(&snap()), &f);
        assert!(d.procedures.is_empty() && d.command.is_empty());
        assert_eq!(d.note, "matches its snapshot and is ready");
        let d = diagnose_host("app1", None, &f);
        assert!(d.note.contains("no snapshot"));
    }

    #[test]
    fn fleet_command_uses_the_selector() {
        let f = facts(&[
            ("alembic_revision", "0002"),
            ("git_sha", &"a".repeat(40)),
            ("env_sha256", "e2"),
            ("unit_state", "active"),
        ]);
        let hosts = vec![
            diagnose_host("app1", Some(&snap()), &f),
            diagnose_host("app2", Some(&snap()), &f),
        ];
        let snaps = HashMap::from([("app1".to_string(), snap()), ("app2".to_string(), snap())]);
        let cmd = fleet_command("role=web", &hosts, &snaps);
        assert!(
            cmd.contains("--procedure configuration --select role=web"),
            "{cmd}"
        );
    }

    #[test]
    fn every_interpolated_value_is_shell_quoted() {
        // A hostile host reports a sha, and ids reach the command from stored state: each must
        // print as one inert word.
        let evil = "x; rm -rf / #";
        let mut s = snap();
        s.git_sha = format!("$(reboot){evil}");
        s.snapshot_id = format!("s1 {evil}");
        let code_changed = facts(&[
            ("alembic_revision", "0002"),
            ("git_sha", &"b".repeat(40)),
            ("env_sha256", "e1"),
            ("unit_state", "active"),
        ]);
        let d = diagnose_host("app'1", Some(&s), &code_changed);
        assert_eq!(
            d.command,
            "rollbackctl rollback --procedure application --revision '$(reboot)x; rm -rf / #' \
             --select 'host=app'\\''1' --reason 'code changed since snapshot'"
        );
        let snaps = HashMap::from([("app'1".to_string(), s.clone())]);
        let cmd = fleet_command("role=web app", &[d], &snaps);
        assert!(
            cmd.contains("--revision '$(reboot)x; rm -rf / #' --select 'role=web app' "),
            "{cmd}"
        );
        let all = facts(&[
            ("alembic_revision", "0003"),
            ("git_sha", &"b".repeat(40)),
            ("env_sha256", "e2"),
            ("unit_state", "inactive"),
        ]);
        let d = diagnose_host("app1", Some(&s), &all);
        assert!(
            d.command
                .contains("--to-snapshot 's1 x; rm -rf / #' --select host=app1 "),
            "{}",
            d.command
        );
        let stopped = facts(&[
            ("alembic_revision", "0002"),
            ("git_sha", &s.git_sha),
            ("env_sha256", "e1"),
            ("unit_state", "inactive"),
        ]);
        let d = diagnose_host("a$(b)", Some(&s), &stopped);
        assert_eq!(d.command, "rollbackctl exec 'a$(b)' service.start");
    }

    #[test]
    fn hosts_with_different_snapshot_revisions_get_no_shared_revision() {
        let code_changed = facts(&[
            ("alembic_revision", "0002"),
            ("git_sha", &"c".repeat(40)),
            ("env_sha256", "e1"),
            ("unit_state", "active"),
        ]);
        let mut other = snap();
        other.git_sha = "b".repeat(40);
        let hosts = vec![
            diagnose_host("app1", Some(&snap()), &code_changed),
            diagnose_host("app2", Some(&other), &code_changed),
        ];
        let snaps = HashMap::from([("app1".to_string(), snap()), ("app2".to_string(), other)]);
        let cmd = fleet_command("role=web", &hosts, &snaps);
        assert!(
            cmd.contains("--to-snapshot latest --select role=web"),
            "{cmd}"
        );
    }
}
