//! The host's observed state for Hello and heartbeats: git HEAD, alembic revision, env file
//! hash, unit state, last health check. Gathered with the same actions the runbook uses.

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
    let ctx = StepCtx::new(config, &mut sink, &cancel, Duration::from_secs(15));
    actions::execute(&validated, ctx).await.facts
}

pub async fn gather(config: &Config) -> HostState {
    let mut state = HostState::default();
    if config.app.is_some() {
        let git = facts(config, "git.log").await;
        state.git_head_sha = git.get("sha").cloned().unwrap_or_default();
        state.git_head_subject = git.get("subject").cloned().unwrap_or_default();
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
