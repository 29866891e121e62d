//! The `Console` service operators call through `rollbackctl`.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rollback_common::now_unix_ms;
use rollback_common::proto::console_server::Console;
use rollback_common::proto::{
    AgentInfo, AgentStatus, ApproveJobRequest, ApproveJobResponse, CancelJobRequest,
    CancelJobResponse, DenyJobRequest, DenyJobResponse, DiagnoseRequest, DiagnoseResponse,
    ExecEvent, ExecRequest, ForgetAgentRequest, ForgetAgentResponse, GetJobRequest,
    GetReportRequest, GetReportResponse, GetRunbookRequest, GetRunbookResponse, GuardRequest,
    HostState, Job, JobEvent, LabelAgentRequest, LabelAgentResponse, ListAgentsRequest,
    ListAgentsResponse, ListAuditRequest, ListAuditResponse, ListCoordinatorsRequest,
    ListCoordinatorsResponse, ListJobsRequest, ListJobsResponse, ListSnapshotsRequest,
    ListSnapshotsResponse, PlanResponse, ResumeJobRequest, ResumeJobResponse, RollbackRequest,
    SnapshotRequest, SnapshotResponse, StartRollbackResponse, VerifyAuditRequest,
    VerifyAuditResponse, WatchJobRequest,
};
use rollback_common::selector::Selector;
use tonic::{Request, Response, Status};

use crate::authz::Principal;
use crate::registry::Registry;
use crate::runs::RunHub;
use crate::store::{AgentRecord, Store, StoreError};

pub struct ConsoleService {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub cluster: Arc<crate::cluster::Cluster>,
    pub hub: Arc<RunHub>,
    pub jobs: Arc<crate::jobs::Jobs>,
    pub lost_after: Duration,
    pub watchers: Arc<crate::watchers::Watchers>,
}

/// The one mapping from store errors to gRPC statuses.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Leased { holders } => crate::jobs::leased_status(&holders),
            e @ StoreError::Changed { .. } => Status::failed_precondition(e.to_string()),
            // Final, not worth retrying as if the coordinator were away: nothing was done.
            e @ StoreError::Audit { .. } => Status::internal(format!("coordinator store: {e}")),
            other => Status::unavailable(format!("coordinator store: {other}")),
        }
    }
}

fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no principal"))
}

#[tonic::async_trait]
impl Console for ConsoleService {
    type ExecStream = tokio_stream::adapters::Map<
        tokio_stream::wrappers::ReceiverStream<crate::runs::Watched>,
        fn(crate::runs::Watched) -> Result<ExecEvent, Status>,
    >;
    type WatchJobStream = tokio_stream::wrappers::ReceiverStream<Result<JobEvent, Status>>;

    async fn get_runbook(
        &self,
        _request: Request<GetRunbookRequest>,
    ) -> Result<Response<GetRunbookResponse>, Status> {
        let settings = self.jobs.settings();
        Ok(Response::new(GetRunbookResponse {
            toml: settings.runbook.to_toml(),
            source: settings.runbook_source.clone(),
        }))
    }

    async fn plan(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<PlanResponse>, Status> {
        let principal = principal(&request)?;
        Ok(Response::new(
            self.jobs.preview(&principal, request.get_ref()).await?,
        ))
    }

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        let principal = principal(&request)?;
        Ok(Response::new(
            self.jobs.snapshot(&principal, request.into_inner()).await?,
        ))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Ok(Response::new(
            self.jobs
                .list_snapshots(&request.get_ref().selector)
                .await?,
        ))
    }

    async fn diagnose(
        &self,
        request: Request<DiagnoseRequest>,
    ) -> Result<Response<DiagnoseResponse>, Status> {
        let principal = principal(&request)?;
        Ok(Response::new(
            self.jobs.diagnose(&principal, request.into_inner()).await?,
        ))
    }

    async fn start_rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<StartRollbackResponse>, Status> {
        let principal = principal(&request)?;
        Ok(Response::new(
            self.jobs.start(&principal, request.into_inner()).await?,
        ))
    }

    async fn start_guard(
        &self,
        request: Request<GuardRequest>,
    ) -> Result<Response<StartRollbackResponse>, Status> {
        let principal = principal(&request)?;
        Ok(Response::new(
            self.jobs
                .start_guard(&principal, request.into_inner())
                .await?,
        ))
    }

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let principal = principal(&request)?;
        let slot = self.watchers.acquire(&principal.identity.to_string())?;
        let req = request.into_inner();
        let job_id = self.jobs.resolve(&req.job_id).await?;
        let rx = self
            .jobs
            .watch(&job_id, req.after_seq, req.job_only, slot)
            .await?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(
            self.jobs
                .get(&self.jobs.resolve(&request.get_ref().job_id).await?)
                .await?,
        ))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(ListJobsResponse {
            jobs: self.jobs.list(request.get_ref()).await?,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.into_inner();
        let state = self
            .jobs
            .cancel(
                &principal,
                &self.jobs.resolve(&req.job_id).await?,
                &req.reason,
            )
            .await?;
        Ok(Response::new(CancelJobResponse { state }))
    }

    async fn resume_job(
        &self,
        request: Request<ResumeJobRequest>,
    ) -> Result<Response<ResumeJobResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.into_inner();
        Ok(Response::new(
            self.jobs
                .resume(
                    &principal,
                    &self.jobs.resolve(&req.job_id).await?,
                    &req.reason,
                )
                .await?,
        ))
    }

    async fn forget_agent(
        &self,
        request: Request<ForgetAgentRequest>,
    ) -> Result<Response<ForgetAgentResponse>, Status> {
        let principal = principal(&request)?;
        let host = request.into_inner().host_id;
        rollback_common::identity::validate_name("host id", &host)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.cluster.online(&host).await {
            return Err(Status::failed_precondition(format!(
                "agent {host} is connected; stop its agent (decommission the host) before forgetting it"
            )));
        }
        let holders = self
            .store
            .lease_holders(std::slice::from_ref(&host))
            .await?;
        if let Some(h) = holders.first() {
            return Err(Status::failed_precondition(format!(
                "agent {host} is leased to job {}; wait for it to end (or cancel it) before forgetting the host",
                h.job_id
            )));
        }
        let audit = crate::store::AuditEvent {
            at_ms: now_unix_ms(),
            actor: principal.identity.to_string(),
            action: "agent.forgotten".into(),
            target: format!("host/{host}"),
            detail: "removed from the coordinator's agents; job history kept".into(),
        };
        // The removal and its audit record: one transaction.
        let forgotten = self.store.forget_agent(&host, &audit).await?;
        if !forgotten {
            return Err(Status::not_found(format!(
                "no agent {host}; `rollbackctl agents` lists the known ones"
            )));
        }
        Ok(Response::new(ForgetAgentResponse { forgotten }))
    }

    async fn approve_job(
        &self,
        request: Request<ApproveJobRequest>,
    ) -> Result<Response<ApproveJobResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.into_inner();
        let job_id = self.jobs.resolve(&req.job_id).await?;
        let state = self.jobs.approve(&principal, &job_id, &req.reason).await?;
        Ok(Response::new(ApproveJobResponse { job_id, state }))
    }

    async fn deny_job(
        &self,
        request: Request<DenyJobRequest>,
    ) -> Result<Response<DenyJobResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.into_inner();
        let job_id = self.jobs.resolve(&req.job_id).await?;
        let state = self.jobs.deny(&principal, &job_id, &req.reason).await?;
        Ok(Response::new(DenyJobResponse { job_id, state }))
    }

    async fn label_agent(
        &self,
        request: Request<LabelAgentRequest>,
    ) -> Result<Response<LabelAgentResponse>, Status> {
        let principal = principal(&request)?;
        Ok(Response::new(
            crate::inventory::label(self.store.as_ref(), &principal, request.into_inner()).await?,
        ))
    }

    async fn get_report(
        &self,
        request: Request<GetReportRequest>,
    ) -> Result<Response<GetReportResponse>, Status> {
        let job = self
            .jobs
            .get(&self.jobs.resolve(&request.get_ref().job_id).await?)
            .await?;
        let (output, phases) = self.jobs.step_output(&job.job_id).await?;
        let estimate = self
            .jobs
            .settings()
            .runbook
            .procedures
            .get(&job.procedure)
            .and_then(|p| p.estimate.clone());
        // Webhook deliveries recorded for this job, oldest first.
        let mut notified: Vec<(String, i64)> = self
            .store
            .list_audit(&crate::store::AuditFilter {
                job_id: job.job_id.clone(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .map_err(|e| Status::unavailable(format!("reading the audit trail: {e}")))?
            .into_iter()
            .filter(|r| r.event.action == "notify.sent")
            .map(|r| (r.event.detail, r.event.at_ms))
            .collect();
        notified.reverse();
        let timing = crate::jobs::report::Timing {
            phases,
            estimate,
            notified,
        };
        Ok(Response::new(GetReportResponse {
            markdown: crate::jobs::report::render(&job, &output, &timing),
        }))
    }

    async fn exec(
        &self,
        request: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let principal = principal(&request)?;
        let rx = crate::exec::start(
            &self.store,
            &self.cluster,
            &self.hub,
            &principal,
            request.into_inner(),
        )
        .await?;
        let unbox: fn(crate::runs::Watched) -> Result<ExecEvent, Status> = |w| w.map(|ev| *ev);
        Ok(Response::new(tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            unbox,
        )))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        Ok(Response::new(
            crate::audit::list(&*self.store, request.into_inner()).await?,
        ))
    }

    async fn verify_audit(
        &self,
        _request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        Ok(Response::new(crate::audit::verify(&*self.store).await?))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let selector = Selector::parse(&request.get_ref().selector)
            .map_err(|e| Status::invalid_argument(format!("--select: {e}")))?;
        let now = now_unix_ms();
        let online = self.cluster.online_hosts().await;
        let agents = self
            .store
            .list_agents()
            .await?
            .into_iter()
            .filter(|a| selector.matches(&a.host_id, &a.labels))
            .map(|a| {
                let elsewhere = online.contains(&a.host_id);
                self.agent_info(a, now, elsewhere)
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn list_coordinators(
        &self,
        _request: Request<ListCoordinatorsRequest>,
    ) -> Result<Response<ListCoordinatorsResponse>, Status> {
        Ok(Response::new(
            crate::cluster::peers::list(&self.cluster).await?,
        ))
    }
}

impl ConsoleService {
    /// `online` says whether the host has a session here or at a live peer.
    fn agent_info(&self, a: AgentRecord, now: i64, online: bool) -> AgentInfo {
        let live = self.registry.get(&a.host_id);
        let last_seen = live
            .as_ref()
            .map_or(a.last_seen_ms, |l| l.last_seen_ms.max(a.last_seen_ms));
        let lost_after_ms = i64::try_from(self.lost_after.as_millis()).unwrap_or(i64::MAX);
        let status = match (&live, a.online) {
            (Some(_), _) => AgentStatus::Online,
            (None, true) if online => AgentStatus::Online,
            (None, _) if now.saturating_sub(last_seen) > lost_after_ms => AgentStatus::Lost,
            (None, _) => AgentStatus::Disconnected,
        };
        AgentInfo {
            label_mismatch: crate::store::label_mismatch(&a.labels, &a.reported_labels),
            reported_labels: a.reported_labels.into_iter().collect(),
            host_id: a.host_id,
            labels: a.labels.into_iter().collect(),
            agent_version: a.agent_version,
            address: a.address,
            status: status as i32,
            last_seen_unix_ms: last_seen,
            connected_at_unix_ms: a.connected_at_ms,
            state: HostState::decode(a.state.as_slice()).ok(),
            cert_not_after_unix_ms: a.cert_not_after_ms.unwrap_or(0),
            coordinator: if live.is_some() {
                self.cluster.me.name.clone()
            } else {
                a.coordinator
            },
        }
    }
}
