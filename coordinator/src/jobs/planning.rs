//! Turning a `RollbackRequest` into a plan: targets from the selector (every known agent that
//! matches, online or not — offline ones are reported unreachable at dispatch), the once-host
//! from the online agents, the strategy, and the runbook's exact steps.

use std::collections::BTreeMap;
use std::sync::Arc;

use rollback_common::proto::{Batch, HostSteps, PlanPhase, PlanResponse, RollbackRequest, Step};
use rollback_common::runbook::{self, Amount, Plan, PlannedStep, Runbook, Scope, Strategy};
use rollback_common::selector::Selector;
use tonic::Status;

use super::Jobs;
use crate::authz::Principal;
use crate::store::AgentRecord;

pub(super) fn strategy(req: &RollbackRequest) -> Result<Strategy, Status> {
    let mut s = Strategy::default();
    if let Some(c) = req.canary {
        s.canary = c as usize;
    }
    if !req.batch_size.is_empty() {
        s.batch_size =
            Amount::parse(&req.batch_size, "--batch-size").map_err(Status::invalid_argument)?;
    }
    if !req.max_failures.is_empty() {
        s.max_failures =
            Amount::parse(&req.max_failures, "--max-failures").map_err(Status::invalid_argument)?;
    }
    Ok(s)
}

pub(super) fn step_proto(st: &PlannedStep) -> Step {
    Step {
        action: st.action.clone(),
        params: st.params.clone().into_iter().collect(),
        timeout_secs: st.timeout_secs,
    }
}

pub(super) fn to_proto(plan: &Plan, s: &Strategy, description: &str) -> PlanResponse {
    PlanResponse {
        procedure: plan.procedure.clone(),
        targets: plan.targets.clone(),
        once_host: plan.once_host.clone().unwrap_or_default(),
        phases: plan
            .phases
            .iter()
            .map(|p| PlanPhase {
                name: p.name.clone(),
                scope: match p.scope {
                    Scope::Each => "each".into(),
                    Scope::Once => "once".into(),
                },
                steps: p.steps.iter().map(step_proto).collect(),
                batches: p
                    .batches
                    .iter()
                    .map(|b| Batch { hosts: b.clone() })
                    .collect(),
                host_steps: p
                    .host_steps
                    .iter()
                    .map(|(h, steps)| HostSteps {
                        host_id: h.clone(),
                        steps: steps.iter().map(step_proto).collect(),
                    })
                    .collect(),
            })
            .collect(),
        max_failures: u32::try_from(plan.max_failures).unwrap_or(u32::MAX),
        strategy: format!(
            "canary {}, then batches of {}; halt at {} failure(s)",
            s.canary,
            s.batch_size.describe(),
            s.max_failures.describe()
        ),
        description: description.to_string(),
        pins: Vec::new(),
        offline: Vec::new(),
        guard: None,
    }
}

/// Parses a required, non-empty selector.
pub(super) fn parse_selector(text: &str) -> Result<Selector, Status> {
    let selector =
        Selector::parse(text).map_err(|e| Status::invalid_argument(format!("--select: {e}")))?;
    if selector.is_empty() {
        return Err(Status::invalid_argument(
            "--select is required (e.g. role=web); to target every host say so explicitly with a label all of them carry",
        ));
    }
    Ok(selector)
}

impl Jobs {
    /// The plan for `req` against the fleet as it is now: `agents` as the store listed them
    /// just before (the start read them for its lease check; one read of 10,000 rows, not two).
    pub async fn plan(
        self: &Arc<Self>,
        principal: &Principal,
        req: &RollbackRequest,
        agents: Vec<AgentRecord>,
    ) -> Result<(Plan, PlanResponse), Status> {
        crate::metrics::plan_made(false);
        if !req.to_snapshot.is_empty() {
            return self.to_snapshot_plan(principal, req, true).await;
        }
        let runbook = self.settings().runbook.clone();
        self.plan_among(req, &runbook, true, agents).await
    }

    /// The plan `rollbackctl plan` shows: like `plan`, but it never starts anything (a
    /// `--to-snapshot` plan is made from the state the agents last reported). Relative targets
    /// are pinned only when the request asks (`pin`: the web console's plan before confirm).
    pub async fn preview(
        self: &Arc<Self>,
        principal: &Principal,
        req: &RollbackRequest,
    ) -> Result<PlanResponse, Status> {
        crate::metrics::plan_made(true);
        if !req.to_snapshot.is_empty() {
            return Ok(self.to_snapshot_plan(principal, req, false).await?.1);
        }
        let runbook = self.settings().runbook.clone();
        Ok(self.plan_in(req, &runbook, req.pin).await?.1)
    }

    /// The plan for `req` with procedures from `runbook`. `pin`: resolve relative targets on
    /// the hosts (read-only runs, for a rollback about to start); a preview leaves them as
    /// written, to be pinned when the rollback starts.
    pub(super) async fn plan_in(
        &self,
        req: &RollbackRequest,
        runbook: &Runbook,
        pin: bool,
    ) -> Result<(Plan, PlanResponse), Status> {
        let agents = self.store.list_agents().await?;
        self.plan_among(req, runbook, pin, agents).await
    }

    /// `plan_in` among `agents`, the known agents as the store just listed them.
    async fn plan_among(
        &self,
        req: &RollbackRequest,
        runbook: &Runbook,
        pin: bool,
        agents: Vec<AgentRecord>,
    ) -> Result<(Plan, PlanResponse), Status> {
        let selector = parse_selector(&req.selector)?;
        let procedure = runbook
            .procedure(&req.procedure)
            .map_err(Status::invalid_argument)?;
        let once_text = if req.once_on.is_empty() {
            procedure.once_on.clone().unwrap_or_default()
        } else {
            req.once_on.clone()
        };
        let once_selector = Selector::parse(&once_text)
            .map_err(|e| Status::invalid_argument(format!("--once-on: {e}")))?;
        let online = self.cluster.online_hosts().await;
        let selected: Vec<String> = agents
            .iter()
            .filter(|a| selector.matches(&a.host_id, &a.labels))
            .map(|a| a.host_id.clone())
            .collect();
        let offline: Vec<String> = selected
            .iter()
            .filter(|h| !online.contains(*h))
            .cloned()
            .collect();
        // Offline targets are shown in the plan; `rollback` refuses them unless told to leave
        // them out.
        let targets: Vec<String> = if req.skip_offline {
            // The online set, not a search of the offline list per host.
            selected
                .iter()
                .filter(|h| online.contains(*h))
                .cloned()
                .collect()
        } else {
            selected
        };
        let once_candidates: Vec<String> = if once_selector.is_empty() {
            Vec::new()
        } else {
            agents
                .iter()
                .filter(|a| {
                    online.contains(&a.host_id) && once_selector.matches(&a.host_id, &a.labels)
                })
                .map(|a| a.host_id.clone())
                .collect()
        };
        let strategy = strategy(req)?;
        let values: BTreeMap<String, String> = req.values.clone().into_iter().collect();
        let mut plan = runbook::plan(
            runbook,
            &req.procedure,
            &values,
            &targets,
            &once_candidates,
            &strategy,
        )
        .map_err(|e| {
            Status::failed_precondition(format!(
                "cannot plan `{}` for --select {}: {e}",
                req.procedure, req.selector
            ))
        })?;
        // Resolved on the online hosts; offline ones are refused at start.
        let pins = if pin {
            self.pin_targets(&mut plan, req).await?
        } else {
            Vec::new()
        };
        let mut proto = to_proto(&plan, &strategy, &procedure.description);
        proto.pins = pins;
        proto.offline = offline;
        Ok((plan, proto))
    }

    /// Host ids the selector matches among known agents (online or not).
    pub(super) async fn selected_hosts(&self, selector: &str) -> Result<Vec<String>, Status> {
        let agents = self.store.list_agents().await?;
        selected_among(selector, &agents)
    }
}

/// Host ids `selector` matches among `agents` (online or not).
pub(super) fn selected_among(
    selector: &str,
    agents: &[AgentRecord],
) -> Result<Vec<String>, Status> {
    let selector = parse_selector(selector)?;
    Ok(agents
        .iter()
        .filter(|a| selector.matches(&a.host_id, &a.labels))
        .map(|a| a.host_id.clone())
        .collect())
}
