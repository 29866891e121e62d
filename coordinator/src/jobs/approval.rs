//! Two-person approval. A rollback the `[approval]` policy names (by procedure, by an action
//! its plan runs, or by its host count) is stored `awaiting_approval` with its plan, pins and
//! leases, and nothing of it runs; an approver other than the requester approves it (it then
//! starts exactly as planned) or denies it; one not approved in time expires. Each decision is
//! taken once, atomically in the store, with its audit record.

use std::sync::Arc;
use std::time::Duration;

use rollback_common::jobs::{EventKind, JobState};
use rollback_common::now_unix_ms;
use rollback_common::proto::{Approval, PlanResponse, RollbackRequest, StartRollbackResponse};
use rollback_common::runbook::Plan;
use tonic::Status;
use tracing::{info, warn};

use super::Jobs;
use super::engine::{LaunchError, job_rows, request_detail};
use crate::authz::Principal;
use crate::config::ApprovalPolicy;
use crate::exec::new_id;
use crate::store::{ApprovalRow, AuditEvent};

/// The actor of decisions the coordinator takes itself (expiry).
const COORDINATOR: &str = "coordinator";

/// A job's approval as the API shows it.
pub fn approval_proto(a: ApprovalRow) -> Approval {
    Approval {
        rule: a.rule,
        requested_by: a.requested_by,
        requested_at_unix_ms: a.requested_at_ms,
        expires_at_unix_ms: a.expires_at_ms,
        decision: a.decision,
        decided_by: a.decided_by,
        decided_at_unix_ms: a.decided_at_ms.unwrap_or(0),
        reason: a.reason,
    }
}

/// Why `plan` needs approval under `policy`, or `None`.
pub fn rule_for(policy: &ApprovalPolicy, plan: &Plan) -> Option<String> {
    if policy.procedures.contains(&plan.procedure) {
        return Some(format!("procedure {}", plan.procedure));
    }
    let action = plan
        .phases
        .iter()
        .flat_map(|p| {
            p.steps
                .iter()
                .chain(p.host_steps.values().flatten())
                .map(|s| s.action.as_str())
        })
        .find(|a| policy.actions.iter().any(|x| x == a));
    if let Some(action) = action {
        return Some(format!("its plan runs {action}"));
    }
    let hosts = plan.targets.len()
        + usize::from(
            plan.once_host
                .as_ref()
                .is_some_and(|h| !plan.targets.contains(h)),
        );
    let max = usize::try_from(policy.max_hosts).unwrap_or(usize::MAX);
    (max > 0 && hosts > max).then(|| format!("{hosts} hosts (over {max})"))
}

fn time_text(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

impl Jobs {
    /// Why `plan` needs a second person, under this coordinator's policy.
    pub(super) fn approval_rule(&self, plan: &Plan) -> Option<String> {
        rule_for(&self.settings().approval, plan)
    }

    /// Stores a planned job `awaiting_approval` (leasing its hosts, with its approval row and
    /// audit record, atomically); nothing runs.
    pub(super) async fn request_approval(
        self: &Arc<Self>,
        principal: &Principal,
        req: &RollbackRequest,
        plan: &Plan,
        plan_proto: PlanResponse,
        rule: String,
    ) -> Result<StartRollbackResponse, LaunchError> {
        let job_id = new_id();
        let now = now_unix_ms();
        let actor = principal.identity.to_string();
        let (job, hosts) = job_rows(
            &job_id,
            &actor,
            now,
            req,
            plan,
            &plan_proto,
            JobState::AwaitingApproval,
        );
        let leased: Vec<String> = hosts.iter().map(|h| h.host_id.clone()).collect();
        let expire_ms = i64::try_from(
            self.settings()
                .approval
                .expire_after_secs
                .saturating_mul(1000),
        )
        .unwrap_or(i64::MAX);
        let approval = ApprovalRow {
            job_id: job_id.clone(),
            rule: rule.clone(),
            requested_by: actor.clone(),
            requested_at_ms: now,
            expires_at_ms: now.saturating_add(expire_ms),
            ..Default::default()
        };
        let audit = AuditEvent {
            at_ms: now,
            actor: actor.clone(),
            action: "rollback.requested".into(),
            target: format!("job/{job_id}"),
            detail: format!(
                "{} needs approval: {rule}",
                request_detail(req, plan, &plan_proto)
            ),
        };
        self.store
            .create_job_awaiting(&job, &hosts, &leased, &approval, &audit)
            .await?;
        let live = self.new_live_in(&job_id, 1, JobState::AwaitingApproval);
        self.emit(
            &live,
            &job_id,
            EventKind::JobAwaitingApproval,
            "",
            "",
            &format!(
                "{} on {} host(s) needs approval ({rule}); nothing runs until an approver other than {actor} runs `rollbackctl approve {job_id} --reason ...` (or `rollbackctl deny {job_id} --reason ...`); expires at {}",
                plan.procedure,
                plan.targets.len(),
                time_text(approval.expires_at_ms)
            ),
            0,
            0,
        );
        info!(job = %job_id, actor = %actor, rule = %rule, "job awaits approval");
        Ok(StartRollbackResponse {
            job_id,
            plan: Some(plan_proto),
            approval: Some(approval_proto(approval)),
            approval_reported: true,
        })
    }

    /// The pending approval of `job_id`, or why there is none.
    async fn pending(&self, job_id: &str) -> Result<ApprovalRow, Status> {
        let approval = self.store.job_approval(job_id).await?.ok_or_else(|| {
            Status::failed_precondition(format!(
                "job {job_id} does not wait for approval (`rollbackctl job show {job_id}`)"
            ))
        })?;
        if !approval.decision.is_empty() {
            return Err(Status::failed_precondition(format!(
                "job {job_id} was already {} by {} ({}); nothing to decide",
                approval.decision,
                approval.decided_by,
                approval.decided_at_ms.map(time_text).unwrap_or_default()
            )));
        }
        Ok(approval)
    }

    /// `rollbackctl approve JOB --reason`: an approver other than the requester starts the job
    /// exactly as it was planned.
    pub async fn approve(
        self: &Arc<Self>,
        principal: &Principal,
        job_id: &str,
        reason: &str,
    ) -> Result<String, Status> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Status::invalid_argument(
                "--reason is required: say why this rollback may run (it goes in the audit trail and the report)",
            ));
        }
        let approval = self.pending(job_id).await?;
        let who = principal.identity.to_string();
        if who == approval.requested_by {
            warn!(job = %job_id, actor = %who, "refused: the requester tried to approve their own job");
            return Err(Status::permission_denied(format!(
                "{who} requested job {job_id} and cannot approve it: two-person approval needs another approver"
            )));
        }
        let now = now_unix_ms();
        if now >= approval.expires_at_ms {
            self.end_unapproved(job_id, "expired", COORDINATOR, "nobody approved it in time")
                .await?;
            return Err(Status::failed_precondition(format!(
                "the approval of job {job_id} expired at {}; nothing ran. Start the rollback again if it is still needed",
                time_text(approval.expires_at_ms)
            )));
        }
        let audit = AuditEvent {
            at_ms: now,
            actor: who.clone(),
            action: "rollback.approved".into(),
            target: format!("job/{job_id}"),
            detail: format!(
                "requested by {} ({}); reason={reason}",
                approval.requested_by, approval.rule
            ),
        };
        // Ours before it is running, so no peer takes it for an orphan.
        self.claim(job_id).await?;
        if !self
            .store
            .decide_approval(job_id, "approved", &who, now, reason, &audit)
            .await?
        {
            return Err(Status::failed_precondition(format!(
                "job {job_id} no longer waits for approval (`rollbackctl job show {job_id}`)"
            )));
        }
        // From here the job is `running` in the store: if this process dies now, the next one
        // resumes it like any running job.
        let live = match self.live_job(job_id) {
            Some(live) => live,
            None => self.new_live_in(job_id, self.next_seq(job_id).await?, JobState::Running),
        };
        *live
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = JobState::Running.as_str().into();
        let (_, drive) = self.load_drive(job_id, false).await?;
        self.emit(
            &live,
            job_id,
            EventKind::JobApproved,
            "",
            "",
            &format!("approved by {who}: {reason}"),
            0,
            0,
        );
        let targets = drive.plan.targets.clone();
        self.emit(
            &live,
            job_id,
            EventKind::JobStarted,
            "",
            "",
            &format!(
                "{} on {} host(s): {}; requested by {}; approved by {who}",
                drive.plan.procedure,
                targets.len(),
                super::engine::named_hosts(&targets),
                approval.requested_by
            ),
            0,
            u32::try_from(targets.len()).unwrap_or(u32::MAX),
        );
        info!(job = %job_id, approver = %who, requester = %approval.requested_by, "job approved and started");
        self.spawn_drive(drive, live, None);
        Ok(JobState::Running.as_str().into())
    }

    /// `rollbackctl deny JOB --reason`: ends a job waiting for approval; nothing of it ran.
    pub async fn deny(
        &self,
        principal: &Principal,
        job_id: &str,
        reason: &str,
    ) -> Result<String, Status> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Status::invalid_argument(
                "--reason is required: say why this rollback must not run",
            ));
        }
        self.pending(job_id).await?;
        let who = principal.identity.to_string();
        if !self.end_unapproved(job_id, "denied", &who, reason).await? {
            return Err(Status::failed_precondition(format!(
                "job {job_id} no longer waits for approval (`rollbackctl job show {job_id}`)"
            )));
        }
        Ok(JobState::Denied.as_str().into())
    }

    /// Ends a job still waiting for approval as `decision` (denied, expired or cancelled),
    /// releasing its hosts; false when it was no longer waiting.
    pub(super) async fn end_unapproved(
        &self,
        job_id: &str,
        decision: &str,
        by: &str,
        reason: &str,
    ) -> Result<bool, Status> {
        let now = now_unix_ms();
        let audit = AuditEvent {
            at_ms: now,
            actor: by.to_string(),
            action: format!("rollback.{decision}"),
            target: format!("job/{job_id}"),
            detail: format!("before approval; nothing ran; reason={reason}"),
        };
        if !self
            .store
            .decide_approval(job_id, decision, by, now, reason, &audit)
            .await?
        {
            return Ok(false);
        }
        let live = match self.live_job(job_id) {
            Some(live) => live,
            None => self.new_live_in(
                job_id,
                self.next_seq(job_id).await?,
                JobState::AwaitingApproval,
            ),
        };
        *live
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = decision.to_string();
        self.emit(
            &live,
            job_id,
            EventKind::JobFinished,
            "",
            "",
            &format!("{decision} by {by} before anything ran: {reason}"),
            0,
            0,
        );
        // Dropping the live job ends its pipeline once the event is stored and sent.
        self.live_jobs().remove(job_id);
        info!(job = %job_id, decision, by, "job ended without approval; nothing ran");
        Ok(true)
    }

    /// At start-up: jobs still waiting for approval get their live record back, so watchers
    /// wait with them; then, until shutdown, approvals that ran out of time expire.
    pub async fn watch_approvals(self: &Arc<Self>) -> Result<(), Status> {
        for a in self.store.pending_approvals().await? {
            if self.live_job(&a.job_id).is_none() {
                let next = self.next_seq(&a.job_id).await?;
                self.new_live_in(&a.job_id, next, JobState::AwaitingApproval);
            }
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = this.shutdown.cancelled() => return,
                }
                if let Err(e) = this.expire_due().await {
                    warn!(error = %e.message(), "checking approvals for expiry failed; retrying");
                }
            }
        });
        Ok(())
    }

    async fn expire_due(&self) -> Result<(), Status> {
        let now = now_unix_ms();
        for a in self.store.pending_approvals().await? {
            if now >= a.expires_at_ms {
                let why = format!(
                    "nobody approved it within {}s ({})",
                    self.settings().approval.expire_after_secs,
                    a.rule
                );
                if self
                    .end_unapproved(&a.job_id, "expired", COORDINATOR, &why)
                    .await?
                {
                    warn!(job = %a.job_id, requester = %a.requested_by, "approval expired; the job never ran");
                }
            }
        }
        Ok(())
    }
}
