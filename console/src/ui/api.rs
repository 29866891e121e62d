//! The web console's routes: the embedded page, and a JSON API over the coordinator's Console
//! service (each call made with the operator's certificate, so the coordinator's roles apply
//! unchanged). A job's events reach the page as Server-Sent Events fed by `WatchJob`; a page
//! that reconnects sends the last event id it saw and continues from there.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use rollback_common::proto::{
    ApproveJobRequest, CancelJobRequest, DenyJobRequest, DiagnoseRequest, GetJobRequest,
    GetReportRequest, GetRunbookRequest, Job, JobEvent, ListAgentsRequest, ListJobsRequest,
    ListSnapshotsRequest, ResumeJobRequest, RollbackRequest, WatchJobRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{UiState, assets, markdown};
use crate::error::StatusError;

type St = State<Arc<UiState>>;

pub(super) fn router(state: Arc<UiState>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/app.css", get(assets::style))
        .route("/api/whoami", get(whoami))
        .route("/api/agents", get(agents))
        .route("/api/snapshots", get(snapshots))
        .route("/api/runbook", get(runbook))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{job}", get(job))
        .route("/api/jobs/{job}/events", get(events))
        .route("/api/jobs/{job}/report", get(report))
        .route("/api/jobs/{job}/report.md", get(report_download))
        .route("/api/jobs/{job}/{action}", post(act))
        .route("/api/plan", post(plan))
        .route("/api/rollback", post(start))
        .route("/api/diagnose", post(diagnose))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such page".into()) })
        .with_state(state)
}

/// An error the page shows as it is: the coordinator's refusal (a role error says which
/// role), or what was wrong with the request.
#[derive(Debug)]
pub(super) struct ApiError(StatusCode, String);

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        let code = err
            .chain()
            .find_map(|c| c.downcast_ref::<StatusError>())
            .map_or(StatusCode::BAD_GATEWAY, |s| match s.status.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::FailedPrecondition
                | tonic::Code::AlreadyExists
                | tonic::Code::Aborted => StatusCode::CONFLICT,
                tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            });
        Self(code, format!("{err:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn status(what: &str) -> impl FnOnce(tonic::Status) -> ApiError {
    move |s| crate::error::status_error(what, s).into()
}

async fn whoami(State(st): St) -> ApiResult {
    Ok(Json(
        json!({ "target": st.target, "coordinator": st.coordinator }),
    ))
}

#[derive(Debug, Deserialize)]
struct SelectQuery {
    #[serde(default)]
    select: String,
}

/// Every agent with its reported state, and how its `.env` compares with its newest snapshot.
async fn agents(State(st): St, Query(q): Query<SelectQuery>) -> ApiResult {
    let mut client = st.client.clone();
    let agents = client
        .list_agents(ListAgentsRequest {
            selector: q.select.clone(),
        })
        .await
        .map_err(status("listing agents"))?
        .into_inner()
        .agents;
    let snaps = client
        .list_snapshots(ListSnapshotsRequest { selector: q.select })
        .await
        .map_err(status("listing snapshots"))?
        .into_inner()
        .snapshots;
    // Newest first: the first one seen per host is its latest.
    let mut latest = HashMap::new();
    for s in &snaps {
        latest.entry(s.host_id.clone()).or_insert(s);
    }
    let now = rollback_common::now_unix_ms();
    let rows: Vec<Value> = agents
        .iter()
        .map(|a| {
            let mut row = crate::agents_cmd::agent_json(a, now);
            let env_now = a
                .state
                .as_ref()
                .map(|s| s.env_sha256.as_str())
                .unwrap_or("");
            let snap = latest.get(&a.host_id);
            row["env_vs_snapshot"] = json!(match snap {
                None => "no snapshot",
                Some(_) if env_now.is_empty() => "unknown",
                Some(s) if s.env_sha256 == env_now => "same as snapshot",
                Some(_) => "differs from snapshot",
            });
            row["last_snapshot"] = snap.map_or(Value::Null, |s| crate::snapshot_cmd::snap_json(s));
            row
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

async fn snapshots(State(st): St, Query(q): Query<SelectQuery>) -> ApiResult {
    let snaps = st
        .client
        .clone()
        .list_snapshots(ListSnapshotsRequest { selector: q.select })
        .await
        .map_err(status("listing snapshots"))?
        .into_inner()
        .snapshots;
    Ok(Json(Value::Array(
        snaps.iter().map(crate::snapshot_cmd::snap_json).collect(),
    )))
}

/// The loaded runbook's procedures: what the New rollback page offers.
async fn runbook(State(st): St) -> ApiResult {
    let rb = st
        .client
        .clone()
        .get_runbook(GetRunbookRequest {})
        .await
        .map_err(status("reading the runbook"))?
        .into_inner();
    let parsed = match rollback_common::runbook::Runbook::parse(&rb.toml) {
        Ok(p) => p,
        // A coordinator newer than this rollbackctl: the page asks for the procedure by name.
        Err(e) => {
            return Ok(Json(json!({
                "source": rb.source,
                "procedures": [],
                "note": format!("this rollbackctl cannot read the coordinator's runbook ({e}); type the procedure's name"),
            })));
        }
    };
    let procedures: Vec<Value> = parsed
        .procedures
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "snapshot" | "diagnose" | "guard"))
        .map(|(name, p)| {
            json!({
                "name": name,
                "description": p.description,
                "needs": p.needs,
                "once_on": p.once_on,
                "phases": p.phases.iter().map(|ph| ph.name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(
        json!({ "source": rb.source, "procedures": procedures }),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct JobsQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    procedure: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    kind: String,
    /// As the CLI's `--since`: 30m, 24h, 7d, or a time.
    #[serde(default)]
    since: String,
    limit: Option<u32>,
}

async fn jobs(State(st): St, Query(q): Query<JobsQuery>) -> ApiResult {
    let since_unix_ms = match q.since.trim() {
        "" => 0,
        s => crate::audit_cmd::parse_since(s, rollback_common::now_unix_ms())
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("since: {e:#}")))?,
    };
    let jobs = st
        .client
        .clone()
        .list_jobs(ListJobsRequest {
            limit: q.limit.unwrap_or(50).clamp(1, 500),
            since_unix_ms,
            state: q.state,
            procedure: q.procedure,
            host_id: q.host,
            kind: q.kind,
            ..Default::default()
        })
        .await
        .map_err(status("listing jobs"))?
        .into_inner()
        .jobs;
    Ok(Json(json!(
        jobs.iter()
            .map(crate::jobs_cmd::job_json)
            .collect::<Vec<_>>()
    )))
}

/// The job `given` names (id, prefix or `latest`).
async fn find(st: &UiState, given: &str) -> Result<Job, ApiError> {
    st.client
        .clone()
        .list_jobs(ListJobsRequest {
            job: given.to_string(),
            limit: 1,
            kind: "all".into(),
            ..Default::default()
        })
        .await
        .map_err(status(&format!("finding job {given}")))?
        .into_inner()
        .jobs
        .into_iter()
        .next()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {given}")))
}

/// The whole record (the listing leaves out parts of it, e.g. the approval).
async fn job(State(st): St, Path(given): Path<String>) -> ApiResult {
    let job_id = find(&st, &given).await?.job_id;
    let job = st
        .client
        .clone()
        .get_job(GetJobRequest { job_id })
        .await
        .map_err(status("reading the job"))?
        .into_inner();
    Ok(Json(json!(crate::jobs_cmd::job_json(&job))))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<u64>,
}

fn event_json(ev: &JobEvent) -> Value {
    json!({
        "seq": ev.seq, "at_unix_ms": ev.at_unix_ms, "kind": ev.kind, "host_id": ev.host_id,
        "phase": ev.phase, "message": ev.message, "job_state": ev.job_state,
        "done": ev.done, "total": ev.total,
    })
}

/// The job's events as Server-Sent Events: each `job` event carries its seq as the SSE id, so
/// a browser that reconnects (it does so by itself) continues after the last one it saw. An
/// `end` event says the job ended; a stream cut without it is picked up again.
async fn events(
    State(st): St,
    Path(given): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job_id = find(&st, &given).await?.job_id;
    let after_seq = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or(q.after)
        .unwrap_or(0);
    let stream = st
        .client
        .clone()
        .watch_job(WatchJobRequest {
            job_id: job_id.clone(),
            after_seq,
            job_only: false,
        })
        .await
        .map_err(status("watching the job"))?
        .into_inner();
    let state = Follow {
        stream,
        st: st.clone(),
        job_id,
    };
    let events = futures::stream::unfold(Some(state), |state| async move {
        let mut f = state?;
        match f.stream.message().await {
            Ok(Some(ev)) => {
                let event = Event::default()
                    .id(ev.seq.to_string())
                    .event("job")
                    .retry(std::time::Duration::from_secs(1))
                    .json_data(event_json(&ev))
                    .unwrap_or_else(|_| Event::default().comment("unencodable event"));
                Some((Ok(event), Some(f)))
            }
            // The coordinator ends a watch at the job's end, but also when it stops driving the
            // job (shutting down, the job given up or held by a peer): `end` only when the job's
            // record says it ended; otherwise the response ends and the browser reconnects
            // after the last id it saw.
            Ok(None) => {
                let state = ended(&f.st, &f.job_id).await?;
                let end = Event::default()
                    .event("end")
                    .data(format!("the job ended: {state}"));
                Some((Ok(end), None))
            }
            // Refusals a reconnect would only repeat end the page's stream for good.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                        | tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                ) =>
            {
                let msg = format!("watching the job: {}", s.message());
                Some((Ok(Event::default().event("fatal").data(msg)), None))
            }
            // The coordinator went away: end the response; the browser reconnects.
            Err(_) => None,
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// A job's event stream being relayed to a page.
struct Follow {
    stream: tonic::Streaming<JobEvent>,
    st: Arc<UiState>,
    job_id: String,
}

/// The job's final state, when its record says it ended.
async fn ended(st: &UiState, job_id: &str) -> Option<String> {
    use rollback_common::jobs::JobState;
    let job = st
        .client
        .clone()
        .get_job(GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .ok()?
        .into_inner();
    match job.state.parse::<JobState>() {
        Ok(JobState::Running | JobState::AwaitingApproval) => None,
        _ => Some(job.state),
    }
}

#[derive(Debug, Deserialize)]
struct Reason {
    #[serde(default)]
    reason: String,
}

/// cancel, resume, approve, deny: the coordinator decides who may (a role error is shown as
/// it says).
async fn act(
    State(st): St,
    Path((given, action)): Path<(String, String)>,
    Json(body): Json<Reason>,
) -> ApiResult {
    let job_id = find(&st, &given).await?.job_id;
    let reason = body.reason.trim().to_string();
    let mut client = st.client.clone();
    let needs_reason = matches!(action.as_str(), "approve" | "deny");
    if needs_reason && reason.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{action} needs a reason (it is recorded in the audit trail and the report)"),
        ));
    }
    let state = match action.as_str() {
        "cancel" => {
            client
                .cancel_job(CancelJobRequest {
                    job_id: job_id.clone(),
                    reason: if reason.is_empty() {
                        "cancelled by operator (web console)".into()
                    } else {
                        reason
                    },
                })
                .await
                .map_err(status("cancelling the job"))?
                .into_inner()
                .state
        }
        "resume" => {
            let r = client
                .resume_job(ResumeJobRequest {
                    job_id: job_id.clone(),
                    reason,
                })
                .await
                .map_err(status("resuming the job"))?
                .into_inner();
            format!("resumed: {} host(s) retried", r.hosts.len())
        }
        "approve" => {
            client
                .approve_job(ApproveJobRequest {
                    job_id: job_id.clone(),
                    reason,
                })
                .await
                .map_err(status("approving the job"))?
                .into_inner()
                .state
        }
        "deny" => {
            client
                .deny_job(DenyJobRequest {
                    job_id: job_id.clone(),
                    reason,
                })
                .await
                .map_err(status("denying the job"))?
                .into_inner()
                .state
        }
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no action {other}: cancel, resume, approve or deny"),
            ));
        }
    };
    Ok(Json(json!({ "job_id": job_id, "state": state })))
}

async fn report_markdown(st: &UiState, given: &str) -> Result<(String, String), ApiError> {
    let job_id = find(st, given).await?.job_id;
    let md = st
        .client
        .clone()
        .get_report(GetReportRequest {
            job_id: job_id.clone(),
        })
        .await
        .map_err(status("reading the report"))?
        .into_inner()
        .markdown;
    Ok((job_id, md))
}

async fn report(State(st): St, Path(given): Path<String>) -> ApiResult {
    let (job_id, md) = report_markdown(&st, &given).await?;
    Ok(Json(json!({
        "job_id": job_id,
        "html": markdown::to_safe_html(&md),
        "markdown": md,
    })))
}

async fn report_download(State(st): St, Path(given): Path<String>) -> Result<Response, ApiError> {
    let (job_id, md) = report_markdown(&st, &given).await?;
    let name = format!("attachment; filename=\"rollback-report-{job_id}.md\"");
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/markdown; charset=utf-8".to_string(),
            ),
            (header::CONTENT_DISPOSITION, name),
        ],
        md,
    )
        .into_response())
}

/// The New rollback form.
#[derive(Debug, Default, Deserialize)]
struct RollbackForm {
    #[serde(default)]
    procedure: String,
    #[serde(default)]
    to_snapshot: String,
    #[serde(default)]
    values: BTreeMap<String, String>,
    #[serde(default)]
    select: String,
    #[serde(default)]
    once_on: String,
    canary: Option<u32>,
    #[serde(default)]
    batch_size: String,
    #[serde(default)]
    max_failures: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    skip_offline: bool,
    /// The page's idempotency key: one per plan shown, so a double click or a retried request
    /// starts one job.
    #[serde(default)]
    request_id: String,
}

impl RollbackForm {
    fn request(&self) -> RollbackRequest {
        RollbackRequest {
            procedure: self.procedure.trim().to_string(),
            to_snapshot: self.to_snapshot.trim().to_string(),
            values: self
                .values
                .iter()
                .filter(|(_, v)| !v.trim().is_empty())
                .map(|(k, v)| (k.clone(), v.trim().to_string()))
                .collect(),
            selector: self.select.trim().to_string(),
            once_on: self.once_on.trim().to_string(),
            canary: self.canary,
            batch_size: self.batch_size.trim().to_string(),
            max_failures: self.max_failures.trim().to_string(),
            reason: self.reason.trim().to_string(),
            wait: false,
            skip_offline: self.skip_offline,
            request_id: self.request_id.clone(),
            pin: false,
        }
    }
}

/// The plan with its relative targets pinned now (read-only runs on the hosts), so the
/// operator confirms what the job will use; the start pins again and the page compares.
async fn plan(State(st): St, Json(form): Json<RollbackForm>) -> ApiResult {
    let mut req = form.request();
    req.pin = true;
    let plan = st
        .client
        .clone()
        .plan(req)
        .await
        .map_err(status("planning the rollback"))?
        .into_inner();
    Ok(Json(json!({
        "plan": crate::jobs_cmd::plan_json(&plan),
        "hosts": plan.targets.len(),
        "target": st.target,
        "confirm": format!(
            "roll back {} host(s) with `{}` on {}",
            plan.targets.len(),
            plan.procedure,
            st.target
        ),
    })))
}

async fn start(State(st): St, Json(form): Json<RollbackForm>) -> ApiResult {
    if form.reason.trim().is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a rollback needs a reason (it is recorded in the audit trail and the report)".into(),
        ));
    }
    if form.request_id.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "plan the rollback first: the confirm button starts the plan shown".into(),
        ));
    }
    let started = st
        .client
        .clone()
        .start_rollback(form.request())
        .await
        .map_err(status("starting the rollback"))?
        .into_inner();
    // What the job pinned and targets, for the page to compare with the plan it confirmed.
    Ok(Json(json!({
        "job_id": started.job_id,
        "plan": started.plan.as_ref().map(crate::jobs_cmd::plan_json),
    })))
}

async fn diagnose(State(st): St, Json(q): Json<SelectQuery>) -> ApiResult {
    if q.select.trim().is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "diagnose needs a selector, e.g. role=web".into(),
        ));
    }
    let resp = st
        .client
        .clone()
        .diagnose(DiagnoseRequest {
            selector: q.select.trim().to_string(),
        })
        .await
        .map_err(status("diagnosing"))?
        .into_inner();
    Ok(Json(crate::snapshot_cmd::diagnose_json(&resp)))
}
