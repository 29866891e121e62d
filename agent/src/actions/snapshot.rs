//! `state.read`: the host's state now (git HEAD, alembic revision, env file hash, unit state,
//! /readyz). `snapshot.take {id, label}`: records that state as last known good in
//! `<state_dir>/snapshots/<id>/` with a copy of the env file, which also becomes the env backup,
//! and measures the deployment guard's baseline (smoke latency, error-log rate, restarts).

use rollback_common::jobs::fact;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Failure, Ownership, StepCtx, Symlinks, alembic, file, git, http, service};
use crate::journal::valid_run_id;

/// What a snapshot records about a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSnapshot {
    pub id: String,
    pub label: String,
    pub taken_at_ms: i64,
    pub git_sha: String,
    pub git_subject: String,
    pub alembic_revision: String,
    pub env_sha256: String,
    pub unit_state: String,
}

/// Where snapshot `id` lives.
pub fn snapshot_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("snapshots").join(id)
}

/// The newest snapshot on this host.
pub fn latest(state_dir: &Path) -> Option<HostSnapshot> {
    let entries = std::fs::read_dir(state_dir.join("snapshots")).ok()?;
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("snapshot.json")).ok())
        .filter_map(|b| serde_json::from_slice::<HostSnapshot>(&b).ok())
        .max_by_key(|s| s.taken_at_ms)
}

/// Snapshot ids become directory names: the run-id grammar.
pub fn valid_id(id: &str) -> bool {
    valid_run_id(id)
}

/// Reads the state and records each part as a fact; a part that cannot be read is recorded
/// as `<part>_error` and the rest still reported.
pub(super) async fn read_state(ctx: &mut StepCtx<'_>) -> HostSnapshot {
    let mut snap = HostSnapshot::default();
    if ctx.config.app.is_some() {
        match git::head(ctx).await {
            Ok((sha, subject)) => (snap.git_sha, snap.git_subject) = (sha, subject),
            Err(f) => ctx.fact("git_error", f.error),
        }
    }
    if ctx.config.alembic.is_some() {
        match alembic::current(ctx).await {
            Ok(rev) => snap.alembic_revision = rev,
            Err(f) => ctx.fact("alembic_error", f.error),
        }
    }
    if let Some(app) = ctx.config.app.clone()
        && let Some(env) = &app.env_file
    {
        match file::read_regular(env, app.env_symlinks()) {
            Ok((bytes, _)) => snap.env_sha256 = file::sha256_hex(&bytes),
            Err(e) => ctx.fact("env_error", e.to_string()),
        }
    }
    if let Some(svc) = ctx.config.service.clone()
        && let Ok(state) = service::active_state(&svc, ctx).await
    {
        snap.unit_state = state;
    }
    if let Some(base) = ctx
        .config
        .app
        .as_ref()
        .and_then(|a| a.health_base_url.clone())
        && let Ok((host, port)) = crate::profile::valid_health_base(&base)
    {
        let status =
            match http::get(&host, port, "/readyz", std::time::Duration::from_secs(3)).await {
                Ok((code, body)) => {
                    ctx.fact("readyz_body", body);
                    code.to_string()
                }
                Err(e) => format!("none ({e})"),
            };
        ctx.fact("readyz_status", status);
    }
    for (k, v) in [
        (fact::GIT_SHA, snap.git_sha.clone()),
        (fact::GIT_SUBJECT, snap.git_subject.clone()),
        (fact::ALEMBIC_REVISION, snap.alembic_revision.clone()),
        (fact::ENV_SHA256, snap.env_sha256.clone()),
        (fact::UNIT_STATE, snap.unit_state.clone()),
    ] {
        ctx.fact(k, v);
    }
    if let Some(last) = latest(&ctx.config.state_dir) {
        ctx.fact("last_snapshot_id", last.id);
    }
    snap
}

pub(super) async fn state(ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let s = read_state(ctx).await;
    ctx.say(&format!(
        "git {} ({}), alembic {}, env sha256 {}, unit {}",
        s.git_sha,
        s.git_subject,
        if s.alembic_revision.is_empty() {
            "-"
        } else {
            &s.alembic_revision
        },
        if s.env_sha256.is_empty() {
            "-"
        } else {
            &s.env_sha256
        },
        s.unit_state
    ));
    Ok(())
}

/// Smoke rounds (five groups of a guard sample's three) and the shortest window of the
/// baseline a snapshot records.
const BASELINE_ROUNDS: u32 = 15;
const BASELINE_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) async fn take(id: &str, label: &str, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let mut snap = read_state(ctx).await;
    // The guard's baseline: smoke latency, error-log rate, restart count (facts only).
    let baseline = super::guard::measure(ctx, BASELINE_ROUNDS, None, BASELINE_WINDOW).await?;
    if let Some(failed) = baseline.iter().find(|r| !r.ok()) {
        ctx.say(&format!(
            "baseline: smoke check {} fails now ({}); the snapshot records it as it is",
            failed.name, failed.last_failure
        ));
    }
    snap.id = id.to_string();
    snap.label = label.to_string();
    snap.taken_at_ms = rollback_common::now_unix_ms();
    let dir = snapshot_dir(&ctx.config.state_dir, id);
    let io = |what: &str, e: std::io::Error| Failure::new(-1, format!("{what}: {e}"));
    std::fs::create_dir_all(&dir).map_err(|e| io(&format!("creating {}", dir.display()), e))?;
    let refused = |e: file::FileError| Failure::new(-1, e.to_string());
    if let Some(app) = ctx.config.app.clone()
        && let (Some(env), Some(backup)) = (&app.env_file, &app.env_backup)
    {
        let (bytes, env_own) = file::read_regular(env, app.env_symlinks()).map_err(refused)?;
        file::write_atomically(
            &dir.join("env"),
            &bytes,
            Ownership::agent(0o600),
            Symlinks::Refuse,
        )
        .map_err(refused)?;
        // The snapshot's copy becomes the env backup the runbook's Option 3 restores, with
        // the env file's owner and mode (the secrets in it are the env file's).
        file::write_atomically(backup, &bytes, env_own, Symlinks::Refuse).map_err(refused)?;
        ctx.say(&format!(
            "kept {} as {} and in the snapshot",
            env.display(),
            backup.display()
        ));
    }
    let json = serde_json::to_vec_pretty(&snap).map_err(|e| Failure::new(-1, e.to_string()))?;
    file::write_atomically(
        &dir.join("snapshot.json"),
        &json,
        Ownership::agent(0o600),
        Symlinks::Refuse,
    )
    .map_err(refused)?;
    ctx.fact("snapshot_id", id);
    ctx.say(&format!(
        "snapshot {id} ({label}) recorded in {}",
        dir.display()
    ));
    Ok(())
}

/// The env copy kept by snapshot `id`, if it exists.
pub fn env_copy(state_dir: &Path, id: &str) -> Option<PathBuf> {
    let p = snapshot_dir(state_dir, id).join("env");
    p.is_file().then_some(p)
}
