//! Prometheus metrics on a listener of their own (`metrics_listen`, loopback in the packaged
//! config; off unless set). `GET /metrics` answers the text exposition format:
//!
//! - gauges read at scrape time: agents online here, live TLS sessions, jobs by state
//!   (`running`, `awaiting_approval`), and for each running job its hosts by outcome and its
//!   runs by status (bounded by the jobs running, so the job id is a safe label);
//! - counters and histograms kept since start: jobs started and finished (by end state), runs
//!   finished (by status), plans made (a preview, or for a start: at 10,000 hosts a plan is a
//!   cost worth seeing), step durations by action, store commit latency, dispatch latency.
//!
//! Counters are per process. Label values come from fixed sets (the runbook's actions, step
//! statuses, job states), never from what an agent sends, so a hostile agent cannot grow the
//! series without bound. The listener serves only this page; it holds no secret and changes
//! nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use rollback_common::proto::{RunFinished, StepStatus};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::live_conns::LiveConns;
use crate::registry::Registry;
use crate::store::Store;

const PREFIX: &str = "fleet_rollback";

/// Bucket bounds (seconds) for steps: a second to the runbook's longest database phase.
const STEP_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];
/// Bucket bounds (seconds) for store commits and dispatches.
const FAST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A cumulative histogram with fixed bounds.
struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not yet cumulative), then above the last.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// `name_bucket{labels,le=..}`, `name_sum`, `name_count`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self
            .counts
            .get(self.bounds.len())
            .map_or(0, |c| c.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// What the process has counted since it started.
struct Counters {
    jobs_started: AtomicU64,
    /// Plans made: [previews, for a start].
    plans: [AtomicU64; 2],
    jobs_finished: Mutex<BTreeMap<&'static str, u64>>,
    runs: Mutex<BTreeMap<&'static str, u64>>,
    steps: BTreeMap<&'static str, Histogram>,
    store_commit: Histogram,
    dispatch: Histogram,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    jobs_started: AtomicU64::new(0),
    plans: [AtomicU64::new(0), AtomicU64::new(0)],
    jobs_finished: Mutex::new(BTreeMap::new()),
    runs: Mutex::new(BTreeMap::new()),
    steps: rollback_common::runbook::ACTIONS
        .iter()
        .chain(std::iter::once(&"other"))
        .map(|a| (*a, Histogram::new(STEP_BUCKETS)))
        .collect(),
    store_commit: Histogram::new(FAST_BUCKETS),
    dispatch: Histogram::new(FAST_BUCKETS),
});

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    *map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(key)
        .or_insert(0) += 1;
}

/// The job states a job can end in; anything else is counted as `other`.
fn end_state(state: &str) -> &'static str {
    const ENDS: &[&str] = &[
        "succeeded",
        "failed",
        "halted",
        "cancelled",
        "denied",
        "expired",
        "interrupted",
    ];
    ENDS.iter()
        .find(|s| **s == state)
        .copied()
        .unwrap_or("other")
}

/// A job began running (approved or not needing approval).
pub fn job_started() {
    COUNTERS.jobs_started.fetch_add(1, Ordering::Relaxed);
}

/// A plan was made: a preview (`rollbackctl plan`, the confirmation before a start) or for a
/// start.
pub fn plan_made(preview: bool) {
    COUNTERS.plans[usize::from(!preview)].fetch_add(1, Ordering::Relaxed);
}

/// A job ended in `state`.
pub fn job_finished(state: &str) {
    bump(&COUNTERS.jobs_finished, end_state(state));
}

/// A run's result was recorded (first time only): its status and each step's duration.
pub fn run_finished(finished: &RunFinished) {
    let status = StepStatus::try_from(finished.status)
        .map(|s| s.as_str_name())
        .unwrap_or("STEP_STATUS_UNKNOWN");
    bump(&COUNTERS.runs, status);
    for step in &finished.steps {
        let action = rollback_common::runbook::ACTIONS
            .iter()
            .find(|a| **a == step.action)
            .copied()
            .unwrap_or("other");
        if let Some(h) = COUNTERS.steps.get(action) {
            h.observe(Duration::from_millis(step.duration_ms));
        }
    }
}

/// One group commit to the store took `d`.
pub fn store_commit(d: Duration) {
    COUNTERS.store_commit.observe(d);
}

/// Recording and sending one run took `d`.
pub fn dispatch(d: Duration) {
    COUNTERS.dispatch.observe(d);
}

/// Where the scrape-time gauges are read.
#[derive(Clone)]
pub struct Sources {
    pub registry: Arc<Registry>,
    pub live: Arc<LiveConns>,
    pub store: Arc<dyn Store>,
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {PREFIX}_{name} {text}");
    let _ = writeln!(out, "# TYPE {PREFIX}_{name} {kind}");
}

/// A label value, escaped for the exposition format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole page. A store that does not answer leaves the job gauges out and sets
/// `store_up 0`, so a scrape still shows the rest.
pub async fn render(src: &Sources) -> String {
    let mut out = String::new();
    help(
        &mut out,
        "agents_online",
        "gauge",
        "Agents holding a session with this coordinator.",
    );
    let _ = writeln!(out, "{PREFIX}_agents_online {}", src.registry.len());
    help(
        &mut out,
        "sessions",
        "gauge",
        "Live TLS connections (agents and operators).",
    );
    let _ = writeln!(out, "{PREFIX}_sessions {}", src.live.count());

    let jobs = job_gauges(src.store.as_ref()).await;
    help(
        &mut out,
        "store_up",
        "gauge",
        "Whether the store answered this scrape.",
    );
    let _ = writeln!(out, "{PREFIX}_store_up {}", u8::from(jobs.is_ok()));
    if let Ok(jobs) = jobs {
        out.push_str(&jobs);
    }

    let c = &*COUNTERS;
    help(
        &mut out,
        "jobs_started_total",
        "counter",
        "Jobs that began running.",
    );
    let _ = writeln!(
        out,
        "{PREFIX}_jobs_started_total {}",
        c.jobs_started.load(Ordering::Relaxed)
    );
    help(
        &mut out,
        "plans_total",
        "counter",
        "Plans made, by purpose: a preview, or for a start.",
    );
    for (purpose, n) in ["preview", "start"].iter().zip(&c.plans) {
        let _ = writeln!(
            out,
            "{PREFIX}_plans_total{{purpose=\"{purpose}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    help(
        &mut out,
        "jobs_finished_total",
        "counter",
        "Jobs that ended, by end state.",
    );
    for (state, n) in c
        .jobs_finished
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        let _ = writeln!(out, "{PREFIX}_jobs_finished_total{{state=\"{state}\"}} {n}");
    }
    help(
        &mut out,
        "runs_total",
        "counter",
        "Run results recorded, by status.",
    );
    for (status, n) in c
        .runs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        let _ = writeln!(out, "{PREFIX}_runs_total{{status=\"{status}\"}} {n}");
    }
    help(
        &mut out,
        "step_duration_seconds",
        "histogram",
        "Step durations as the agents reported them, by action.",
    );
    for (action, h) in &c.steps {
        h.render(
            &mut out,
            &format!("{PREFIX}_step_duration_seconds"),
            &format!("action=\"{action}\""),
        );
    }
    help(
        &mut out,
        "store_commit_seconds",
        "histogram",
        "Store group-commit latency.",
    );
    c.store_commit
        .render(&mut out, &format!("{PREFIX}_store_commit_seconds"), "");
    help(
        &mut out,
        "dispatch_seconds",
        "histogram",
        "Time to record and send one run.",
    );
    c.dispatch
        .render(&mut out, &format!("{PREFIX}_dispatch_seconds"), "");
    out
}

/// Jobs by state, and each running job's hosts and runs.
async fn job_gauges(store: &dyn Store) -> Result<String, crate::store::StoreError> {
    let running = store.running_jobs().await?;
    let awaiting = store.pending_approvals().await?.len();
    let mut out = String::new();
    help(&mut out, "jobs", "gauge", "Jobs not yet ended, by state.");
    let _ = writeln!(out, "{PREFIX}_jobs{{state=\"running\"}} {}", running.len());
    let _ = writeln!(
        out,
        "{PREFIX}_jobs{{state=\"awaiting_approval\"}} {awaiting}"
    );
    help(
        &mut out,
        "job_hosts",
        "gauge",
        "Hosts of each running job, by outcome so far.",
    );
    let mut runs_out = String::new();
    for job_id in &running {
        let Some((job, hosts)) = store.get_job(job_id).await? else {
            continue;
        };
        let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
        for h in &hosts {
            let outcome = if h.outcome.is_empty() {
                "pending"
            } else {
                h.outcome.as_str()
            };
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        for (outcome, n) in outcomes {
            let _ = writeln!(
                out,
                "{PREFIX}_job_hosts{{job=\"{}\",procedure=\"{}\",outcome=\"{}\"}} {n}",
                label(job_id),
                label(&job.procedure),
                label(outcome)
            );
        }
        let mut statuses: BTreeMap<&str, u64> = BTreeMap::new();
        for run in store.job_runs(job_id).await? {
            let status = if run.finished_at_ms.is_none() {
                "in_flight"
            } else {
                StepStatus::try_from(run.status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("STEP_STATUS_UNKNOWN")
            };
            *statuses.entry(status).or_insert(0) += 1;
        }
        for (status, n) in statuses {
            let _ = writeln!(
                runs_out,
                "{PREFIX}_job_runs{{job=\"{}\",status=\"{status}\"}} {n}",
                label(job_id)
            );
        }
    }
    help(
        &mut out,
        "job_runs",
        "gauge",
        "Runs of each running job, by status.",
    );
    out.push_str(&runs_out);
    Ok(out)
}

/// Scrapes served at once; a connection beyond them is closed at once (a scraper needs one).
const MAX_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    src: Sources,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(peer = %peer, "metrics: {MAX_CONNECTIONS} connections already open; closed this one");
            continue;
        };
        let src = src.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let src = src.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&src, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A scrape is one short request: a connection open longer is cut.
            tokio::select! {
                () = cancel.cancelled() => {}
                r = tokio::time::timeout(Duration::from_secs(30), conn) => {
                    if let Ok(Err(e)) = r {
                        debug!(peer = %peer, error = %e, "metrics connection ended");
                    }
                }
            }
        });
    }
}

async fn answer<B>(src: &Sources, req: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            hyper::StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(src).await,
        ),
        (&hyper::Method::GET, _) => (
            hyper::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the coordinator serves only /metrics here\n".to_string(),
        ),
        _ => (
            hyper::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Binds the metrics listener; one not on loopback is allowed but said.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        warn!(addr = %addr, "metrics_listen is not a loopback address: anyone who can reach it sees job ids and host counts");
    }
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.render(&mut out, "x", "action=\"a\"");
        assert!(
            out.contains("x_bucket{action=\"a\",le=\"0.1\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{action=\"a\",le=\"1\"} 2\n"), "{out}");
        assert!(
            out.contains("x_bucket{action=\"a\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_sum{action=\"a\"} 5.55\n"), "{out}");
        assert!(out.contains("x_count{action=\"a\"} 3\n"), "{out}");
    }

    #[test]
    fn unknown_labels_fold_into_fixed_sets() {
        assert_eq!(end_state("halted"), "halted");
        assert_eq!(end_state("whatever an attacker sends"), "other");
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
