//! `Console.Exec`: one typed action on one host, for diagnosis. The run is recorded and
//! audited before it is dispatched; its events stream back to the caller as the agent reports
//! them. The agent validates the step; the coordinator only checks it names a host and action.

use std::sync::Arc;

use prost::Message;
use rand::Rng;
use rollback_common::identity::validate_name;
use rollback_common::now_unix_ms;
use rollback_common::proto::{ExecEvent, ExecRequest, RunProcedure, exec_event};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::info;

use crate::authz::{OperatorRole, Principal};
use crate::cluster::Cluster;
use crate::runs::RunHub;
use crate::store::{AuditEvent, RunRow, Store};

/// A new random run id (128 bits, hex).
pub fn new_id() -> String {
    let mut rng = rand::rng();
    format!("{:016x}{:016x}", rng.random::<u64>(), rng.random::<u64>())
}

pub async fn start(
    store: &Arc<dyn Store>,
    cluster: &Cluster,
    hub: &RunHub,
    principal: &Principal,
    req: ExecRequest,
) -> Result<mpsc::Receiver<crate::runs::Watched>, Status> {
    validate_name("host id", &req.host_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let step = req.step.ok_or_else(|| {
        Status::invalid_argument("exec needs a step (an action and its parameters)")
    })?;
    if step.action.is_empty() {
        return Err(Status::invalid_argument(
            "exec needs an action, e.g. git.log",
        ));
    }
    let host = req.host_id;
    if !cluster.online(&host).await {
        return Err(Status::failed_precondition(format!(
            "agent {host} is not connected; `rollbackctl agents` shows when it was last seen"
        )));
    }
    if !rollback_common::runbook::READ_ONLY_ACTIONS.contains(&step.action.as_str()) {
        // Changing a host by hand is an approver's act, and always says why.
        let role = principal.operator_role.unwrap_or(OperatorRole::Viewer);
        if role < OperatorRole::Approver {
            return Err(Status::permission_denied(format!(
                "`{}` changes {host}: exec of a mutating action needs the approver role (you are {}); read-only actions ({}) are open to operators",
                step.action,
                format!("{role:?}").to_lowercase(),
                rollback_common::runbook::READ_ONLY_ACTIONS.join(", ")
            )));
        }
        if req.reason.trim().is_empty() {
            return Err(Status::invalid_argument(format!(
                "`{}` changes {host}: say why with --reason (it goes into the audit trail)",
                step.action
            )));
        }
        let holders = store.lease_holders(std::slice::from_ref(&host)).await?;
        if let Some(h) = holders.first() {
            return Err(Status::failed_precondition(format!(
                "refused: {host} is leased to job {} (one job per host), and `{}` changes the host; nothing was run. Wait for the job (`rollbackctl watch {}`) or run a read-only action",
                h.job_id, step.action, h.job_id
            )));
        }
    }
    let run_id = new_id();
    let now = now_unix_ms();
    let steps = vec![step.clone()];
    let procedure = RunProcedure {
        run_id: run_id.clone(),
        job_id: String::new(),
        deadline_unix_ms: crate::dispatch::deadline_ms(
            now,
            &steps,
            std::time::Duration::from_secs(10),
        ),
        steps,
    };
    let actor = principal.identity.to_string();
    let reason = if req.reason.trim().is_empty() {
        "diagnosis (rollbackctl exec)".to_string()
    } else {
        req.reason
    };
    let mut params: Vec<String> = step
        .params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    params.sort();
    store
        .append_audit(&AuditEvent {
            at_ms: now,
            actor: actor.clone(),
            action: "exec".into(),
            target: format!("host/{host}"),
            detail: format!(
                "run={run_id} action={} params=[{}] reason={reason}",
                step.action,
                params.join(" ")
            ),
        })
        .await?;

    let (tx, rx) = mpsc::channel(1024);
    let _ = tx.try_send(Ok(Box::new(ExecEvent {
        kind: Some(exec_event::Kind::RunId(run_id.clone())),
    })));
    let record = RunRow {
        run_id: run_id.clone(),
        job_id: String::new(),
        host_id: host.clone(),
        requested_by: actor.clone(),
        reason: reason.clone(),
        procedure: procedure.encode_to_vec(),
        status: 0,
        created_at_ms: now,
        finished_at_ms: None,
        result: None,
        phase: String::new(),
    };
    crate::dispatch::dispatch(
        &**store,
        cluster,
        hub,
        crate::dispatch::Dispatch {
            host: &host,
            job_id: "",
            procedure,
            record: Some(record),
            watcher: tx,
            seen_online: false,
        },
    )
    .await
    .map_err(|e| match e {
        crate::dispatch::DispatchError::Store(e) => Status::from(e),
        crate::dispatch::DispatchError::Offline { .. } => Status::failed_precondition(format!(
            "agent {host} is not connected; `rollbackctl agents` shows when it was last seen"
        )),
        other => Status::unavailable(format!("{other}; the step was not sent")),
    })?;
    info!(host = %host, run = %run_id, action = %step.action, actor = %actor, "exec dispatched");
    Ok(rx)
}
