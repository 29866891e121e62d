//! Reading jobs: `GetJob`, `ListJobs`, `WatchJob` (replay from the store, then follow live;
//! a watcher that falls behind re-reads from the store), and start-up recovery.

use prost::Message;
use rollback_common::jobs::{EventKind, JobState};
use rollback_common::proto::{
    HostRun, Job, JobEvent, JobHost, ListJobsRequest, PlanResponse, RollbackRequest, RunFinished,
};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use super::Jobs;
use crate::store::{Events, JobFilter, JobHostRow, JobRow};

fn job_proto(row: JobRow, hosts: Vec<JobHostRow>) -> Job {
    Job {
        job_id: row.job_id,
        procedure: row.procedure,
        state: row.state,
        reason: row.reason,
        requested_by: row.requested_by,
        created_at_unix_ms: row.created_at_ms,
        finished_at_unix_ms: row.finished_at_ms.unwrap_or(0),
        request: RollbackRequest::decode(row.request.as_slice()).ok(),
        plan: PlanResponse::decode(row.plan.as_slice()).ok(),
        hosts: hosts
            .into_iter()
            .map(|h| JobHost {
                host_id: h.host_id,
                outcome: h.outcome,
                phase: h.phase,
                failed_step: h.failed_step,
                exit_code: h.exit_code,
                detail: h.detail,
                duration_ms: u64::try_from(h.duration_ms).unwrap_or(0),
                runs: Vec::new(),
                once_only: h.once_only,
            })
            .collect(),
        halt_reason: row.halt_reason,
        history: Vec::new(),
        approval: None,
    }
}

fn is_final(ev: &JobEvent) -> bool {
    ev.kind == EventKind::JobFinished.as_str()
}

/// The job's own events (its start, phases, batches, guard rounds, end), not one host's:
/// what a `job_only` watch sends.
fn is_jobs_own(ev: &JobEvent) -> bool {
    ev.host_id.is_empty()
}

/// Job-level events worth a line in the job's history (and the report's timeline).
fn history_line(ev: &JobEvent) -> Option<String> {
    let kind: EventKind = ev.kind.parse().ok()?;
    matches!(
        kind,
        EventKind::JobAwaitingApproval
            | EventKind::JobApproved
            | EventKind::JobStarted
            | EventKind::JobResumed
            | EventKind::JobHalted
            | EventKind::JobCancelling
            | EventKind::JobFinished
    )
    .then(|| format!("{} {} — {}", ev.at_unix_ms, ev.kind, ev.message))
}

/// The one job `given` matched among `rows`; none or several is refused, naming them.
fn pick(given: &str, rows: &[JobRow]) -> Result<String, Status> {
    match rows {
        [] if given == "latest" => Err(Status::not_found(
            "no rollback job yet (`rollbackctl jobs --kind all` lists snapshots and diagnoses too)",
        )),
        [] => Err(Status::not_found(format!("no job starts with {given}"))),
        [one] => Ok(one.job_id.clone()),
        many => {
            let shown: Vec<String> = many
                .iter()
                .take(5)
                .map(|r| {
                    format!(
                        "{} ({} {}, {})",
                        r.job_id,
                        r.procedure,
                        r.state,
                        super::report::time(r.created_at_ms)
                    )
                })
                .collect();
            Err(Status::invalid_argument(format!(
                "job prefix {given} is ambiguous: it matches {}{}; give more of the id",
                shown.join(", "),
                if many.len() > 5 { " and more" } else { "" }
            )))
        }
    }
}

impl Jobs {
    /// The whole record of a job: request, plan, hosts with every run's result.
    pub async fn get(&self, job_id: &str) -> Result<Job, Status> {
        let (row, hosts) = self
            .store
            .get_job(job_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no job {job_id}")))?;
        let mut job = job_proto(row, hosts);
        job.approval = self
            .store
            .job_approval(job_id)
            .await?
            .map(super::approval::approval_proto);
        // The job's own events: its hosts' (50,000 at 10,000 hosts) are never history lines.
        job.history = self
            .store
            .job_events(job_id, 0, Events::JobsOwn)
            .await?
            .iter()
            .filter_map(|(_, b)| JobEvent::decode(b.as_slice()).ok())
            .filter_map(|ev| history_line(&ev))
            .collect();
        // By index, not by a search per run: 10,000 hosts' runs were 50 million comparisons.
        let at: std::collections::HashMap<String, usize> = job
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.host_id.clone(), i))
            .collect();
        for run in self.store.job_run_results(job_id).await? {
            if let Some(host) = at.get(&run.host_id).and_then(|&i| job.hosts.get_mut(i)) {
                host.runs.push(HostRun {
                    run_id: run.run_id,
                    phase: run.phase,
                    result: run
                        .result
                        .and_then(|b| RunFinished::decode(b.as_slice()).ok()),
                });
            }
        }
        Ok(job)
    }

    /// The stored output of each step of a job (head, cut marker and tail), and how long each
    /// phase took (from its `phase.started` to its `phase.finished`, summed over a resumed
    /// job's passes, in the order the phases first started), for its report.
    pub async fn step_output(
        &self,
        job_id: &str,
    ) -> Result<(super::report::StepLines, Vec<(String, i64)>), Status> {
        let mut lines = super::report::StepLines::new();
        let mut current: std::collections::HashMap<String, String> = Default::default();
        let mut phases: Vec<(String, i64)> = Vec::new();
        let mut phase_started: std::collections::HashMap<String, i64> = Default::default();
        for (_, bytes) in self.store.job_events(job_id, 0, Events::All).await? {
            let Ok(ev) = JobEvent::decode(bytes.as_slice()) else {
                continue;
            };
            match ev.kind.parse::<EventKind>() {
                Ok(EventKind::StepStarted) => {
                    let action = ev
                        .message
                        .strip_prefix(ev.host_id.as_str())
                        .unwrap_or(&ev.message)
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let key = (ev.host_id.clone(), ev.phase.clone(), action.clone());
                    // A step run again (a resumed job): its latest run is the one reported.
                    lines.insert(key, Vec::new());
                    current.insert(ev.host_id, action);
                }
                Ok(EventKind::StepOutput) => {
                    if let Some(action) = current.get(&ev.host_id) {
                        lines
                            .entry((ev.host_id.clone(), ev.phase.clone(), action.clone()))
                            .or_default()
                            .extend(ev.message.lines().map(str::to_string));
                    }
                }
                Ok(EventKind::PhaseStarted) => {
                    if !phases.iter().any(|(p, _)| *p == ev.phase) {
                        phases.push((ev.phase.clone(), 0));
                    }
                    phase_started.insert(ev.phase.clone(), ev.at_unix_ms);
                }
                Ok(EventKind::PhaseFinished) => {
                    if let Some(start) = phase_started.remove(&ev.phase)
                        && let Some((_, ms)) = phases.iter_mut().find(|(p, _)| *p == ev.phase)
                    {
                        *ms += (ev.at_unix_ms - start).max(0);
                    }
                }
                _ => {}
            }
        }
        Ok((lines, phases))
    }

    /// Jobs matching the request's filters (or the one job it names), newest first.
    pub async fn list(&self, req: &ListJobsRequest) -> Result<Vec<Job>, Status> {
        let kind = match req.kind.as_str() {
            "" => "rollback",
            "all" => "",
            k @ ("rollback" | "snapshot" | "diagnose" | "guard") => k,
            other => {
                return Err(Status::invalid_argument(format!(
                    "--kind `{other}`: expected rollback, snapshot, diagnose, guard or all"
                )));
            }
        };
        if !req.state.is_empty() {
            req.state
                .parse::<JobState>()
                .map_err(|e| Status::invalid_argument(format!("--state: {e}")))?;
        }
        let rows = if req.job.is_empty() {
            self.store
                .list_jobs(&JobFilter {
                    limit: if req.limit == 0 {
                        20
                    } else {
                        req.limit.min(500)
                    },
                    state: req.state.clone(),
                    procedure: req.procedure.clone(),
                    host_id: req.host_id.clone(),
                    since_ms: req.since_unix_ms,
                    kind: kind.to_string(),
                    id_prefix: String::new(),
                })
                .await?
        } else {
            let id = self.resolve(&req.job).await?;
            self.store.job_row(&id).await?.into_iter().collect()
        };
        let mut jobs = Vec::new();
        for row in rows {
            let hosts = self
                .store
                .get_job(&row.job_id)
                .await?
                .map(|(_, h)| h)
                .unwrap_or_default();
            jobs.push(job_proto(row, hosts));
        }
        Ok(jobs)
    }

    /// The full id of the job `given` names: a full id, `latest` (the newest rollback), or a
    /// unique prefix of 4 or more hex digits. An ambiguous prefix is refused with the jobs it
    /// matches, so nobody acts on a job they did not mean.
    pub async fn resolve(&self, given: &str) -> Result<String, Status> {
        const FULL: usize = 32;
        let is_hex = !given.is_empty() && given.bytes().all(|b| b.is_ascii_hexdigit());
        if given.len() == FULL && is_hex {
            return Ok(given.to_ascii_lowercase());
        }
        let mut filter = JobFilter {
            limit: 6,
            ..Default::default()
        };
        if given == "latest" {
            filter.kind = "rollback".into();
            filter.limit = 1;
        } else if is_hex && given.len() >= 4 && given.len() < FULL {
            filter.id_prefix = given.to_ascii_lowercase();
        } else {
            return Err(Status::invalid_argument(format!(
                "`{given}` is not a job: give its id, 4 or more of its first hex digits, or `latest` (`rollbackctl jobs` lists them)"
            )));
        }
        pick(given, &self.store.list_jobs(&filter).await?)
    }

    /// Events after `after_seq`, then live ones until the job finishes or the watcher goes
    /// away; `slot` (the watcher's place under its operator's bound) is held until then.
    /// `job_only`: only the job's own events (`is_jobs_own`), for a watcher that waits for
    /// the end.
    pub async fn watch(
        &self,
        job_id: &str,
        after_seq: u64,
        job_only: bool,
        slot: impl Send + 'static,
    ) -> Result<mpsc::Receiver<Result<JobEvent, Status>>, Status> {
        // Its row only: the hosts of a 10,000-host job are not read to learn that it exists.
        self.store
            .job_row(job_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no job {job_id}")))?;
        if self.cluster.shared() {
            return Ok(self.watch_store(job_id, after_seq, job_only, slot));
        }
        // Subscribe before replaying so nothing falls between the two.
        let live = self.live_job(job_id).map(|l| l.events.subscribe());
        let is_live = live.is_some();
        let (tx, rx) = mpsc::channel(256);
        let store = self.store.clone();
        let job_id = job_id.to_string();
        // Read from the store as well as filtered: a watch for the end of a 10,000-host job
        // reads a dozen rows, not 50,000.
        let which = if job_only {
            Events::JobsOwn
        } else {
            Events::All
        };
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = after_seq;
            let replay = |last: u64| {
                let store = store.clone();
                let job_id = job_id.clone();
                async move {
                    store.job_events(&job_id, last, which).await.map(|evs| {
                        evs.into_iter()
                            .filter_map(|(_, b)| JobEvent::decode(b.as_slice()).ok())
                            .collect::<Vec<_>>()
                    })
                }
            };
            // An event not sent (`job_only`) still moves `last`: it was seen.
            macro_rules! forward {
                ($ev:expr) => {{
                    let ev: JobEvent = $ev;
                    if ev.seq > last {
                        last = ev.seq;
                        let end = is_final(&ev);
                        if (!job_only || is_jobs_own(&ev)) && tx.send(Ok(ev)).await.is_err() || end
                        {
                            return;
                        }
                    }
                }};
            }
            match replay(last).await {
                Ok(evs) => {
                    // A job.finished followed by more events, or of a job running again (it
                    // was resumed), is not the end: only the live one or the last one is.
                    let n = evs.len();
                    for (i, ev) in evs.into_iter().enumerate() {
                        if job_only && !is_jobs_own(&ev) {
                            last = last.max(ev.seq);
                            continue;
                        }
                        if is_final(&ev) && (i + 1 < n || is_live) {
                            last = ev.seq;
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        forward!(ev);
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::unavailable(format!("coordinator store: {e}"))))
                        .await;
                    return;
                }
            }
            let Some(mut live) = live else { return };
            loop {
                // A watcher that went away frees its slot now, not at the job's next event.
                let received = tokio::select! {
                    r = live.recv() => r,
                    () = tx.closed() => return,
                };
                let closed = match received {
                    Ok(ev) => {
                        forward!(ev);
                        continue;
                    }
                    // Fell behind: the store has everything, in order.
                    Err(broadcast::error::RecvError::Lagged(_)) => false,
                    Err(broadcast::error::RecvError::Closed) => true,
                };
                let Ok(evs) = replay(last).await else { return };
                for ev in evs {
                    forward!(ev);
                }
                if closed {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// A watch on a store other coordinators share: whoever drives the job (this process, a
    /// peer, or a peer that took it over), its events are read from the store, woken by
    /// `Cluster::events_stored` and checked every `STORE_POLL` in case a wake-up was lost
    /// with a dying peer. Ends after the final event of a job whose stored state is final.
    fn watch_store(
        &self,
        job_id: &str,
        after_seq: u64,
        job_only: bool,
        slot: impl Send + 'static,
    ) -> mpsc::Receiver<Result<JobEvent, Status>> {
        const STORE_POLL: std::time::Duration = std::time::Duration::from_secs(2);
        let (tx, rx) = mpsc::channel(256);
        let store = self.store.clone();
        let job_id = job_id.to_string();
        // Read from the store as well as filtered: a watch for the end of a 10,000-host job
        // reads a dozen rows, not 50,000.
        let which = if job_only {
            Events::JobsOwn
        } else {
            Events::All
        };
        // Subscribed before the first read so nothing falls between the two.
        let mut wake = self.cluster.subscribe_stored();
        // Driven here: when this process stops driving it without an end (its end could not
        // be stored, or it is stopping), the watch ends as it does on a store of its own.
        let mut local = self.live_job(&job_id).map(|l| l.events.subscribe());
        // Given up here before this watch began (its end could not be stored): nobody drives
        // it until this process restarts or its lease lapses, so the watch ends now rather
        // than wait for an end that this process will not write.
        let unsettled = self.unsettled.clone();
        let given_up = move |job_id: &str| {
            unsettled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(job_id)
        };
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = after_seq;
            let mut last_was_final = false;
            let mut local_closed = false;
            loop {
                // The state first: when it is final, the events read after it include the end.
                let state = match store.job_row(&job_id).await {
                    Ok(Some(row)) => row.state,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!("coordinator store: {e}"))))
                            .await;
                        return;
                    }
                };
                let ended = state
                    .parse::<JobState>()
                    .is_ok_and(|s| !matches!(s, JobState::Running | JobState::AwaitingApproval));
                let evs = match store.job_events(&job_id, last, which).await {
                    Ok(evs) => evs,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!("coordinator store: {e}"))))
                            .await;
                        return;
                    }
                };
                let evs: Vec<JobEvent> = evs
                    .into_iter()
                    .filter_map(|(_, b)| JobEvent::decode(b.as_slice()).ok())
                    .collect();
                for ev in evs {
                    last = last.max(ev.seq);
                    last_was_final = is_final(&ev);
                    if job_only && !is_jobs_own(&ev) {
                        continue;
                    }
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                // Only the last final event of an ended job ends the watch (a job that
                // finished and was resumed has more than one; its state may be stored a
                // moment before its final event).
                if ended && last_was_final {
                    return;
                }
                if local_closed || (!ended && given_up(&job_id)) {
                    return;
                }
                loop {
                    tokio::select! {
                        r = wake.recv() => match r {
                            Ok(id) if id != job_id => continue,
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                        r = async {
                            match local.as_mut() {
                                Some(rx) => rx.recv().await.map(|_| ()),
                                None => std::future::pending().await,
                            }
                        } => match r {
                            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                            // One last read of the store, then the end.
                            Err(broadcast::error::RecvError::Closed) => {
                                local = None;
                                local_closed = true;
                                break;
                            }
                        },
                        () = tokio::time::sleep(STORE_POLL) => break,
                        () = tx.closed() => return,
                    }
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> JobRow {
        JobRow {
            job_id: id.into(),
            procedure: "database".into(),
            request: Vec::new(),
            plan: Vec::new(),
            state: "halted".into(),
            reason: String::new(),
            requested_by: String::new(),
            created_at_ms: 1_700_000_000_000,
            finished_at_ms: None,
            halt_reason: String::new(),
            request_id: String::new(),
        }
    }

    #[test]
    fn an_ambiguous_prefix_is_refused_naming_the_jobs_it_matches() {
        let a = "3fa90000000000000000000000000001";
        let b = "3fa91111111111111111111111111111";
        let err = pick("3fa9", &[row(a), row(b)]).expect_err("ambiguous");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains(a) && err.message().contains(b),
            "{}",
            err.message()
        );
        assert_eq!(pick("3fa91", &[row(b)]).expect("unique"), b);
        let none = pick("0000", &[]).expect_err("none");
        assert_eq!(none.code(), tonic::Code::NotFound);
    }
}
