//! The inventory: the labels that choose hosts. They come from coordinator.toml `[inventory]`
//! and from `rollbackctl agents label` (admin), never from an agent's Hello — a compromised
//! host that claims `role=db` or `migrator=true` is shown the mismatch, not picked.

use std::collections::HashMap;

use rollback_common::now_unix_ms;
use rollback_common::proto::{LabelAgentRequest, LabelAgentResponse};
use rollback_common::selector::validate_label;
use tonic::Status;
use tracing::info;

use crate::authz::Principal;
use crate::store::{AuditEvent, Store, label_mismatch};

/// Longest list of labels one request may set or remove.
const MAX_LABELS_PER_REQUEST: usize = 64;

/// Applies a `LabelAgent` request: validates everything first, then writes the change and its
/// audit record in one transaction.
pub async fn label(
    store: &dyn Store,
    principal: &Principal,
    req: LabelAgentRequest,
) -> Result<LabelAgentResponse, Status> {
    let host = req.host_id;
    rollback_common::identity::validate_name("host id", &host)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if req.set.is_empty() && req.remove.is_empty() {
        return Err(Status::invalid_argument(
            "nothing to change: give KEY=VALUE to set a label or KEY- to remove one",
        ));
    }
    if req.set.len() + req.remove.len() > MAX_LABELS_PER_REQUEST {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_LABELS_PER_REQUEST} labels per request"
        )));
    }
    let mut set: Vec<(String, String)> = req.set.into_iter().collect();
    set.sort();
    for (k, v) in &set {
        validate_label(k, v).map_err(|e| Status::invalid_argument(format!("{host}: {e}")))?;
    }
    let before = store.inventory(&host).await?;
    for key in &req.remove {
        if set.iter().any(|(k, _)| k == key) {
            return Err(Status::invalid_argument(format!(
                "{host}: label `{key}` is both set and removed in one request"
            )));
        }
        if !before.operator.contains_key(key) {
            let why = if before.config.contains_key(key) {
                "it comes from [inventory] in coordinator.toml; change it there (or override it with KEY=VALUE)"
            } else {
                "the host has no such label"
            };
            return Err(Status::failed_precondition(format!(
                "{host}: cannot remove label `{key}`: {why}"
            )));
        }
    }
    let change: Vec<String> = set
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(req.remove.iter().map(|k| format!("{k}-")))
        .collect();
    let audit = AuditEvent {
        at_ms: now_unix_ms(),
        actor: principal.identity.to_string(),
        action: "agent.labelled".into(),
        target: format!("host/{host}"),
        detail: if req.reason.trim().is_empty() {
            change.join(" ")
        } else {
            format!("{} (reason: {})", change.join(" "), req.reason.trim())
        },
    };
    store.label_host(&host, &set, &req.remove, &audit).await?;
    info!(host = %host, actor = %principal.identity, change = %change.join(" "), "inventory labels changed");

    let labels = store.inventory(&host).await?.effective();
    let agent = store
        .list_agents()
        .await?
        .into_iter()
        .find(|a| a.host_id == host);
    let reported: HashMap<String, String> = agent
        .as_ref()
        .map(|a| a.reported_labels.clone())
        .unwrap_or_default();
    Ok(LabelAgentResponse {
        label_mismatch: label_mismatch(&labels, &reported),
        note: if agent.is_none() {
            format!("no agent {host} has connected yet; these labels target it once it does")
        } else {
            String::new()
        },
        labels: labels.into_iter().collect(),
        reported_labels: reported.into_iter().collect(),
    })
}
