//! The host's observed state for Hello and heartbeats: git HEAD, alembic revision, env file
//! hash, unit state, last health check. Gathered with the same actions the runbook uses (HEAD
//! with the one `git log -1` they read it with), except HEAD right after a run whose checkout
//! already read where it left HEAD.

use std::time::Duration;

use rollback_common::proto::{HostState, Step};
use tokio_util::sync::CancellationToken;

use crate::actions::{self, StepCtx};
use crate::config::Config;
use crate::exec::NoSink;

/// Runs a read-only action and returns its facts (empty if it failed).
async fn facts(config: &Config, action: &str) -> std::collections::BTreeMap<String, String> {
    let step = Step {
        action: action.to_string(),
        ..Default::default()
    };
    let Ok(validated) = actions::validate(&step, config) else {
        return Default::default();
    };
    let cancel = CancellationToken::new();
    let mut sink = NoSink;
    let ctx = StepCtx::new(config, &mut sink, &cancel, TIMEOUT);
    actions::execute(&validated, ctx).await.facts
}

/// Each probe's time limit.
const TIMEOUT: Duration = Duration::from_secs(15);

/// The host's state. `head`: HEAD's sha and subject when already known (a run's checkout
/// just read them, `Runner::take_head_after`); otherwise HEAD is read with `git log -1`.
pub async fn gather(config: &Config, head: Option<(String, String)>) -> HostState {
    let mut state = HostState::default();
    if config.app.is_some()
        && let Some((sha, subject)) = head
    {
        state.git_head_sha = sha;
        state.git_head_subject = subject;
    } else if config.app.is_some() {
        let cancel = CancellationToken::new();
        let mut sink = NoSink;
        let ctx = StepCtx::new(config, &mut sink, &cancel, TIMEOUT);
        if let Some((sha, subject)) = actions::git_head(ctx).await {
            state.git_head_sha = sha;
            state.git_head_subject = subject;
        }
    }
    if config.alembic.is_some() {
        state.alembic_revision = facts(config, "alembic.current")
            .await
            .get("revision")
            .cloned()
            .unwrap_or_default();
    }
    if let Some(app) = &config.app
        && let Some(env) = &app.env_file
        && let Ok((bytes, _)) = actions::read_regular(env, app.env_symlinks())
    {
        state.env_sha256 = actions::sha256_hex(&bytes);
    }
    if let Some(last) = crate::actions::snapshot::latest(&config.state_dir) {
        state.last_snapshot_id = last.id;
    }
    if config.service.is_some() {
        state.unit_active_state = facts(config, "service.status")
            .await
            .get("active_state")
            .cloned()
            .unwrap_or_default();
    }
    state
}
