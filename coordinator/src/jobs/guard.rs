//! The deployment guard (`rollbackctl guard`): after a deployment, the selected hosts are
//! sampled on an interval for a window (`guard.sample`: smoke checks, `/readyz`, the unit's
//! state and restarts, error-log lines) and each host is judged against the baseline its
//! snapshot measured, by the runbook's "When to Rollback" criteria (`[guard]` in the runbook
//! TOML). A guard is a job whose phases are its sampling rounds, so it is stored, listed,
//! watched, cancelled and resumed like any job; the engine waits for each round's time, gives
//! each host the log offset its previous sample reached, and judges the samples stored so far
//! before every round and after the last (`Jobs::guard_round`). A breach halts the guard with
//! its evidence, runs `diagnose` against the baseline and proposes the rollback back to that
//! snapshot; with `--auto` it starts that rollback (canary first, under the approval policy,
//! idempotent by a request id derived from the guard's, so a resumed guard never starts it
//! twice). A window without a breach ends "deployment healthy" with the figures.
//!
//! The judgement (`judge_host`) is a pure function of the baseline and the stored samples.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use rollback_common::jobs::{EventKind, fact};
use rollback_common::now_unix_ms;
use rollback_common::proto::{
    GuardCriteria, GuardRequest, GuardSpec, RollbackRequest, SmokeBaseline, StartRollbackResponse,
    StepStatus,
};
use rollback_common::runbook::{self, Phase, PlannedPhase, PlannedStep, Procedure, Runbook, Scope};
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::diagnosis::quote;
use super::engine::Drive;
use super::planning::parse_selector;
use super::{Jobs, LiveJob};
use crate::authz::Principal;

/// Phases of a guard are named `sample-1`, `sample-2`, ...
pub const ROUND_PREFIX: &str = "sample-";
/// The procedure name a guard job is stored under.
pub const PROCEDURE: &str = "guard";
/// Smoke requests per check in each sample.
const ROUNDS: u32 = 3;

/// A smoke check's latency at the baseline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SmokeLatency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub ok: bool,
}

/// What a snapshot measured on a host for the guard (stored as JSON with the snapshot).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub smoke: BTreeMap<String, SmokeLatency>,
    pub error_lines_per_min: f64,
    pub restarts: Option<u64>,
}

fn names(facts: &HashMap<String, String>, key: &str) -> Vec<String> {
    facts
        .get(key)
        .map(|v| {
            v.split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn number<T: std::str::FromStr>(facts: &HashMap<String, String>, key: &str) -> Option<T> {
    facts.get(key).and_then(|v| v.parse().ok())
}

impl Baseline {
    /// From the facts of a `snapshot.take` step.
    pub fn from_facts(facts: &HashMap<String, String>) -> Self {
        let mut smoke = BTreeMap::new();
        for (name, ok) in names(facts, fact::SMOKE_PASSED)
            .into_iter()
            .map(|n| (n, true))
            .chain(
                names(facts, fact::SMOKE_FAILED)
                    .into_iter()
                    .map(|n| (n, false)),
            )
        {
            let p = |which: &str| number::<f64>(facts, &fact::smoke_latency(&name, which));
            smoke.insert(
                name.clone(),
                SmokeLatency {
                    p50_ms: p("p50").unwrap_or(0.0),
                    p95_ms: p("p95").unwrap_or(0.0),
                    ok,
                },
            );
        }
        let errors = number::<f64>(facts, fact::ERROR_LINES).unwrap_or(0.0);
        let window_min = number::<f64>(facts, fact::WINDOW_MS).unwrap_or(0.0) / 60_000.0;
        Self {
            smoke,
            error_lines_per_min: if window_min > 0.0 {
                errors / window_min
            } else {
                0.0
            },
            restarts: number(facts, fact::RESTARTS),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The stored JSON; `None` for a snapshot taken before baselines existed.
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// The figures `snapshots` shows.
    pub fn smoke_info(&self) -> Vec<SmokeBaseline> {
        self.smoke
            .iter()
            .map(|(name, l)| SmokeBaseline {
                check: name.clone(),
                p50_ms: l.p50_ms,
                p95_ms: l.p95_ms,
                ok: l.ok,
            })
            .collect()
    }
}

/// One `guard.sample` of one host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub at_ms: i64,
    /// `/readyz`'s status, or `none (why)`; empty when the host has no health URL.
    pub readyz: String,
    /// The unit's active state; empty when the host has no unit.
    pub unit_state: String,
    pub restarts: Option<u64>,
    pub error_lines: u64,
    pub log_offset: Option<u64>,
    pub smoke_failed: Vec<String>,
    pub smoke_p95: BTreeMap<String, f64>,
}

impl Sample {
    pub fn from_facts(facts: &HashMap<String, String>) -> Self {
        let mut smoke_p95 = BTreeMap::new();
        for name in names(facts, fact::SMOKE_PASSED)
            .into_iter()
            .chain(names(facts, fact::SMOKE_FAILED))
        {
            if let Some(v) = number::<f64>(facts, &fact::smoke_latency(&name, "p95")) {
                smoke_p95.insert(name, v);
            }
        }
        Self {
            at_ms: number(facts, fact::SAMPLED_AT_MS).unwrap_or(0),
            readyz: facts.get(fact::READYZ_STATUS).cloned().unwrap_or_default(),
            unit_state: facts.get(fact::UNIT_STATE).cloned().unwrap_or_default(),
            restarts: number(facts, fact::RESTARTS),
            error_lines: number(facts, fact::ERROR_LINES).unwrap_or(0),
            log_offset: number(facts, fact::LOG_OFFSET),
            smoke_failed: names(facts, fact::SMOKE_FAILED),
            smoke_p95,
        }
    }

    fn running(&self) -> bool {
        self.unit_state.is_empty() || self.unit_state == "active"
    }

    fn broken(&self) -> Option<String> {
        let mut why = Vec::new();
        if !self.readyz.is_empty() && self.readyz != "200" {
            why.push(format!("/readyz {}", self.readyz));
        }
        if !self.smoke_failed.is_empty() {
            why.push(format!(
                "smoke check(s) {} failing",
                self.smoke_failed.join(", ")
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// The runbook's "When to Rollback" criteria the guard judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Criterion {
    Critical,
    Stability,
    Performance,
    Errors,
}

impl Criterion {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical functionality",
            Self::Stability => "stability",
            Self::Performance => "performance",
            Self::Errors => "error rate",
        }
    }

    /// The runbook's words.
    pub const fn runbook(self) -> &'static str {
        match self {
            Self::Critical => "critical functionality is broken",
            Self::Stability => "system stability compromised",
            Self::Performance => "performance degradation over the threshold",
            Self::Errors => "error rate well above normal",
        }
    }
}

/// A criterion that holds on a host, with the evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    pub host: String,
    pub criterion: Criterion,
    pub evidence: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Restarts of the unit since the baseline: the increases of systemd's counter from the
/// baseline's value through every sample (a counter that went down was reset: counted from 0).
fn restarts_since(baseline: Option<u64>, samples: &[Sample]) -> u64 {
    let mut total = 0;
    let mut prev = baseline;
    for r in samples.iter().filter_map(|s| s.restarts) {
        match prev {
            Some(p) if r >= p => total += r - p,
            Some(_) => total += r,
            None => {}
        }
        prev = Some(r);
    }
    total
}

/// The latency a check had over the newest `n` samples (median of their p95), when there are
/// `n`.
fn recent_p95(samples: &[Sample], check: &str, n: usize) -> Option<f64> {
    let recent: Vec<f64> = samples
        .iter()
        .rev()
        .filter_map(|s| s.smoke_p95.get(check).copied())
        .filter(|v| *v > 0.0)
        .take(n)
        .collect();
    (recent.len() == n && n > 0).then(|| median(recent))
}

/// Error-log lines per minute over the samples after the first (the first counts only its
/// own moment), once they span a minute: a rate per minute is not judged on seconds.
fn error_rate(samples: &[Sample]) -> Option<f64> {
    let (first, last) = (samples.first()?, samples.last()?);
    let minutes = (last.at_ms - first.at_ms) as f64 / 60_000.0;
    if samples.len() < 2 || minutes < 1.0 {
        return None;
    }
    let lines: u64 = samples[1..].iter().map(|s| s.error_lines).sum();
    Some(lines as f64 / minutes)
}

/// Every criterion that holds on `host`, judged on its samples (oldest first) against its
/// baseline.
pub fn judge_host(
    host: &str,
    baseline: &Baseline,
    samples: &[Sample],
    c: &GuardCriteria,
) -> Vec<Breach> {
    let mut out = Vec::new();
    let breach = |criterion: Criterion, evidence: String| Breach {
        host: host.to_string(),
        criterion,
        evidence,
    };
    let n = c.failing_samples.max(1) as usize;
    let newest = &samples[samples.len().saturating_sub(n)..];
    // Critical functionality: broken while the unit runs, without a restart in between (a
    // failure a restart explains is stability's evidence, not this one's).
    if newest.len() == n {
        let from = samples.len() - n;
        let steady = newest.iter().enumerate().all(|(i, s)| {
            let before = (from + i).checked_sub(1).and_then(|j| samples[j].restarts);
            s.running() && (before.is_none() || s.restarts == before)
        });
        let broken: Vec<String> = newest.iter().filter_map(Sample::broken).collect();
        if steady && broken.len() == n {
            out.push(breach(
                Criterion::Critical,
                format!(
                    "{} in the last {n} sample(s), the unit running",
                    broken.last().cloned().unwrap_or_default()
                ),
            ));
        }
    }
    // Stability: restarting, or not running.
    let restarts = restarts_since(baseline.restarts, samples);
    if restarts >= u64::from(c.max_restarts) {
        out.push(breach(
            Criterion::Stability,
            format!(
                "the unit restarted {restarts} time(s) since the baseline (systemd NRestarts {} → {}; threshold {})",
                baseline
                    .restarts
                    .map_or_else(|| "unknown".into(), |r| r.to_string()),
                samples
                    .iter()
                    .rev()
                    .find_map(|s| s.restarts)
                    .map_or_else(|| "unknown".into(), |r| r.to_string()),
                c.max_restarts
            ),
        ));
    } else if newest.len() == n && newest.iter().all(|s| !s.running()) {
        out.push(breach(
            Criterion::Stability,
            format!(
                "the unit is {} in the last {n} sample(s)",
                newest.last().map(|s| s.unit_state.as_str()).unwrap_or("?")
            ),
        ));
    }
    // Performance: a smoke check's p95 up more than the threshold.
    for (check, base) in baseline
        .smoke
        .iter()
        .filter(|(_, b)| b.ok && b.p95_ms > 0.0)
    {
        let Some(now) = recent_p95(samples, check, c.latency_samples as usize) else {
            continue;
        };
        let limit = (base.p95_ms * (1.0 + f64::from(c.latency_increase_pct) / 100.0))
            .max(base.p95_ms + f64::from(c.latency_min_increase_ms));
        if now > limit {
            out.push(breach(
                Criterion::Performance,
                format!(
                    "smoke `{check}` p95 {now:.0} ms against {:.0} ms at the baseline (+{:.0}%; threshold +{}% and +{} ms)",
                    base.p95_ms,
                    (now / base.p95_ms - 1.0) * 100.0,
                    c.latency_increase_pct,
                    c.latency_min_increase_ms
                ),
            ));
        }
    }
    // Errors: error-log lines per minute well above the baseline's.
    if let Some(rate) = error_rate(samples) {
        let base = baseline.error_lines_per_min;
        let limit =
            (base * f64::from(c.error_rate_factor)).max(base + f64::from(c.error_rate_min_per_min));
        if rate > limit {
            out.push(breach(
                Criterion::Errors,
                format!(
                    "{rate:.1} error log line(s) per minute against {base:.1} at the baseline (threshold {limit:.1})"
                ),
            ));
        }
    }
    out
}

/// A host's figures for the "healthy" summary.
fn figures(host: &str, baseline: &Baseline, samples: &[Sample]) -> String {
    let mut out = format!("{host}:");
    for (check, base) in &baseline.smoke {
        let all: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.smoke_p95.get(check).copied())
            .collect();
        let _ = write!(
            out,
            " {check} p95 {:.0} ms (baseline {:.0});",
            median(all),
            base.p95_ms
        );
    }
    let _ = write!(
        out,
        " {} restart(s); {} error line(s)/min (baseline {:.1})",
        restarts_since(baseline.restarts, samples),
        error_rate(samples).map_or_else(|| "-".into(), |r| format!("{r:.1}")),
        baseline.error_lines_per_min
    );
    out
}

/// Fleet-wide: how many hosts each criterion holds on.
fn fleet_summary(breaches: &[Breach], hosts: usize) -> String {
    // Each host once per criterion, in the order first seen; a set, not a search of the
    // list per breach (10,000 breaching hosts were 50 million comparisons).
    let mut by: BTreeMap<Criterion, Vec<&str>> = BTreeMap::new();
    let mut seen: std::collections::HashSet<(Criterion, &str)> = Default::default();
    for b in breaches {
        if seen.insert((b.criterion, b.host.as_str())) {
            by.entry(b.criterion).or_default().push(&b.host);
        }
    }
    by.iter()
        .map(|(c, h)| {
            format!(
                "{} on {} of {hosts} host(s) ({})",
                c.as_str(),
                h.len(),
                h.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn criteria_proto(c: &runbook::GuardCriteria) -> GuardCriteria {
    GuardCriteria {
        latency_increase_pct: c.latency_increase_pct,
        latency_min_increase_ms: c.latency_min_increase_ms,
        latency_samples: c.latency_samples,
        max_restarts: c.max_restarts,
        failing_samples: c.failing_samples,
        error_rate_factor: c.error_rate_factor,
        error_rate_min_per_min: c.error_rate_min_per_min,
    }
}

/// What the engine does with a guard's next round.
pub(super) enum Round {
    /// Run this phase (the round's, with each host's log offset) now.
    Go(PlannedPhase),
    /// A criterion holds: the guard halts with this reason.
    Breach(String),
    /// The coordinator is stopping, or the guard was cancelled, while it waited.
    Stop,
}

impl Jobs {
    /// Starts a deployment guard; returns once it is stored.
    pub async fn start_guard(
        self: &Arc<Self>,
        principal: &Principal,
        req: GuardRequest,
    ) -> Result<StartRollbackResponse, Status> {
        parse_selector(&req.selector)?;
        if req.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "--reason is required: say which deployment the guard watches (it goes in the audit trail and the report)",
            ));
        }
        let window = if req.window_secs == 0 {
            1800
        } else {
            req.window_secs
        };
        let interval = if req.interval_secs == 0 {
            30
        } else {
            req.interval_secs
        };
        if !(1..=3600).contains(&interval) {
            return Err(Status::invalid_argument("--interval must be 1s to 1h"));
        }
        if !(1..=86_400).contains(&window) || window < interval {
            return Err(Status::invalid_argument(
                "--window must be 1s to 24h and at least one --interval",
            ));
        }
        // A sample at the start and one every interval until the window's end.
        let rounds = (window / interval) as usize + 1;
        if rounds > 2000 {
            return Err(Status::invalid_argument(format!(
                "--window {window}s / --interval {interval}s is {rounds} samples; at most 2000: use a longer interval"
            )));
        }
        let baseline = if req.baseline.trim().is_empty() {
            "latest".to_string()
        } else {
            req.baseline.trim().to_string()
        };
        // Every guarded host needs a baseline to be judged against.
        let targets = self.selected_hosts(&req.selector).await?;
        let snapshots = self.snapshots_for(&baseline).await?;
        let missing: Vec<&str> = targets
            .iter()
            .filter(|h| {
                snapshots
                    .get(*h)
                    .and_then(|s| Baseline::parse(&s.baseline))
                    .is_none()
            })
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no baseline for {} in snapshot {baseline}: take one before the deployment (`rollbackctl snapshot --select {}`)",
                missing.join(", "),
                quote(&req.selector)
            )));
        }
        let phases: Vec<Phase> = (1..=rounds)
            .map(|i| Phase {
                name: format!("{ROUND_PREFIX}{i}"),
                scope: Scope::Each,
                steps: vec![runbook::StepTemplate {
                    action: "guard.sample".into(),
                    params: BTreeMap::from([("rounds".to_string(), ROUNDS.to_string())]),
                    timeout_secs: Some(interval.clamp(10, 120)),
                }],
            })
            .collect();
        let rb = Runbook {
            procedures: BTreeMap::from([(
                PROCEDURE.to_string(),
                Procedure {
                    description: format!(
                        "deployment guard: sample every {interval}s for {window}s against baseline {baseline}"
                    ),
                    once_on: None,
                    needs: vec![],
                    estimate: None,
                    phases,
                },
            )]),
            guard: Default::default(),
        };
        let rollback_req = RollbackRequest {
            procedure: PROCEDURE.into(),
            selector: req.selector.clone(),
            canary: Some(0),
            batch_size: "100%".into(),
            max_failures: "100%".into(),
            reason: req.reason.clone(),
            request_id: req.request_id.clone(),
            ..Default::default()
        };
        if let Some(started) = self.started_for(&rollback_req).await? {
            return Ok(started);
        }
        let (mut plan, mut proto) = self.plan_in(&rollback_req, &rb, false).await?;
        // A sample that cannot be taken is a failed host run, never a reason to halt: the
        // guard judges what it can measure.
        plan.max_failures = plan.targets.len() + 1;
        proto.max_failures = u32::try_from(plan.max_failures).unwrap_or(u32::MAX);
        proto.guard = Some(GuardSpec {
            started_at_unix_ms: now_unix_ms(),
            interval_secs: interval,
            window_secs: window,
            baseline,
            auto: req.auto,
            criteria: Some(criteria_proto(&self.settings().runbook.guard)),
            selector: req.selector.clone(),
            rounds: ROUNDS,
        });
        match self
            .launch(principal, rollback_req, plan, proto, false, None)
            .await
        {
            Ok(s) => Ok(s),
            Err(super::engine::LaunchError::Leased(h)) => Err(super::engine::leased_status(&h)),
            Err(super::engine::LaunchError::Status(s)) => Err(s),
        }
    }

    /// Before round `index` (0-based) of a guard, and with `index` = the number of rounds
    /// after the last: judges the samples stored so far; then waits for the round's time.
    pub(super) async fn guard_round(
        self: &Arc<Self>,
        d: &Drive,
        spec: &GuardSpec,
        index: usize,
        phase: &PlannedPhase,
        live: &LiveJob,
    ) -> Round {
        let job_id = d.job_id.clone();
        let judged = match self.guard_judge(&job_id, spec).await {
            Ok(j) => j,
            Err(e) => {
                // The store is the guard's memory: without it nothing can be judged; the
                // round runs, and the next one judges again.
                tracing::warn!(job = %job_id, error = %e, "guard: could not read the samples; judging at the next round");
                Judged::default()
            }
        };
        if index > 0 && judged.sampled > 0 {
            let msg = if judged.breaches.is_empty() {
                format!(
                    "round {index}: {} host(s) sampled, no criterion holds",
                    judged.sampled
                )
            } else {
                format!(
                    "round {index}: {}",
                    fleet_summary(&judged.breaches, judged.sampled)
                )
            };
            self.emit(
                live,
                &job_id,
                EventKind::GuardSample,
                "",
                &phase.name,
                &msg,
                0,
                0,
            );
        }
        if !judged.breaches.is_empty() {
            return Round::Breach(self.guard_breach(d, spec, live, &judged).await);
        }
        if index >= d.plan.phases.len() {
            // A host never sampled (its agent could not run guard.sample) was not judged: the
            // guard cannot call the deployment healthy.
            let unsampled: Vec<&str> = d
                .plan
                .targets
                .iter()
                .filter(|h| !judged.hosts.contains(*h))
                .map(String::as_str)
                .collect();
            if !unsampled.is_empty() {
                return Round::Breach(format!(
                    "deployment guard: no sample from {}: they could not be judged (their runs say why)",
                    unsampled.join(", ")
                ));
            }
            let mut msg = format!(
                "deployment healthy: no criterion held on {} host(s) over {} sample(s) in {}s",
                judged.sampled,
                d.plan.phases.len(),
                spec.window_secs
            );
            for f in &judged.figures {
                let _ = write!(msg, "\n  {f}");
            }
            self.emit(live, &job_id, EventKind::GuardHealthy, "", "", &msg, 0, 0);
            return Round::Stop;
        }
        // Round i runs at start + i × interval (a resumed guard keeps its schedule).
        let at = spec.started_at_unix_ms.saturating_add(
            i64::from(spec.interval_secs) * i64::try_from(index).unwrap_or(0) * 1000,
        );
        let wait = u64::try_from(at.saturating_sub(now_unix_ms())).unwrap_or(0);
        if wait > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                () = live.cancel.cancelled() => return Round::Stop,
                () = live.stop.cancelled() => return Round::Stop,
            }
        }
        let mut round = phase.clone();
        for host in phase.batches.iter().flatten() {
            if let Some(offset) = judged.offsets.get(host) {
                round.host_steps.insert(
                    host.clone(),
                    vec![PlannedStep {
                        action: "guard.sample".into(),
                        params: BTreeMap::from([
                            ("rounds".to_string(), spec.rounds.max(1).to_string()),
                            ("log_offset".to_string(), offset.to_string()),
                        ]),
                        timeout_secs: phase.steps.first().map_or(0, |s| s.timeout_secs),
                    }],
                );
            }
        }
        Round::Go(round)
    }

    /// The samples of guard `job_id` stored so far, judged.
    async fn guard_judge(&self, job_id: &str, spec: &GuardSpec) -> Result<Judged, Status> {
        let job = self.get(job_id).await?;
        let snapshots = self.snapshots_for(&spec.baseline).await?;
        let criteria = spec
            .criteria
            .unwrap_or_else(|| criteria_proto(&runbook::GuardCriteria::default()));
        let mut judged = Judged::default();
        for h in &job.hosts {
            let mut samples: Vec<Sample> = h
                .runs
                .iter()
                .filter(|r| r.phase.starts_with(ROUND_PREFIX))
                .filter_map(|r| {
                    let round: usize = r.phase[ROUND_PREFIX.len()..].parse().ok()?;
                    let step = r.result.as_ref()?.steps.iter().find(|s| {
                        s.action == "guard.sample" && s.status == StepStatus::Succeeded as i32
                    })?;
                    let facts: HashMap<String, String> = step.facts.clone().into_iter().collect();
                    Some((round, Sample::from_facts(&facts)))
                })
                .collect::<BTreeMap<usize, Sample>>()
                .into_values()
                .collect();
            samples.retain(|s| s.at_ms > 0);
            let Some(last) = samples.last() else {
                continue;
            };
            judged.sampled += 1;
            judged.hosts.push(h.host_id.clone());
            if let Some(o) = last.log_offset {
                judged.offsets.insert(h.host_id.clone(), o);
            }
            let baseline = snapshots
                .get(&h.host_id)
                .and_then(|s| Baseline::parse(&s.baseline))
                .unwrap_or_default();
            judged
                .breaches
                .extend(judge_host(&h.host_id, &baseline, &samples, &criteria));
            judged
                .figures
                .push(figures(&h.host_id, &baseline, &samples));
        }
        Ok(judged)
    }

    /// A criterion holds: the evidence per host, `diagnose` against the baseline, the
    /// proposed rollback (started with `--auto`). Returns the halt reason.
    async fn guard_breach(
        self: &Arc<Self>,
        d: &Drive,
        spec: &GuardSpec,
        live: &LiveJob,
        judged: &Judged,
    ) -> String {
        let job_id = &d.job_id;
        for b in &judged.breaches {
            let msg = format!(
                "{} on {}: {} — {}",
                b.criterion.as_str(),
                b.host,
                b.criterion.runbook(),
                b.evidence
            );
            self.emit(
                live,
                job_id,
                EventKind::GuardBreach,
                &b.host,
                "",
                &msg,
                0,
                0,
            );
        }
        let summary = fleet_summary(&judged.breaches, judged.sampled);
        let requester = match self.store.job_row(job_id).await {
            Ok(Some(row)) => row.requested_by,
            _ => String::new(),
        };
        let principal = crate::authz::Principal::acting_for(&requester);
        // The proposal: back to the baseline snapshot, composed per host by the diagnosis.
        let proposal = match &principal {
            Some(p) => match self
                .diagnose_against(p, &spec.selector, &spec.baseline)
                .await
            {
                Ok(diag) => {
                    for h in &diag.hosts {
                        let changes: Vec<String> = h
                            .changes
                            .iter()
                            .map(|c| format!("{} {} → {}", c.what, c.old, c.new))
                            .collect();
                        let verdict = format!(
                            "diagnose {}: {}{}{}",
                            h.host_id,
                            if h.procedures.is_empty() {
                                "nothing to roll back".to_string()
                            } else {
                                h.procedures.join(" + ")
                            },
                            if changes.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", changes.join("; "))
                            },
                            if h.note.is_empty() {
                                String::new()
                            } else {
                                format!("; {}", h.note)
                            }
                        );
                        self.emit(
                            live,
                            job_id,
                            EventKind::GuardProposal,
                            &h.host_id,
                            "",
                            &verdict,
                            0,
                            0,
                        );
                    }
                    diag.command
                }
                Err(e) => format!("(diagnose failed: {})", e.message()),
            },
            None => String::new(),
        };
        let command = format!(
            "rollbackctl rollback --to-snapshot {} --select {} --reason {}",
            quote(&spec.baseline),
            quote(&spec.selector),
            quote(&format!("deployment guard {job_id}: {summary}"))
        );
        let mut reason = format!("deployment guard: {summary}");
        if spec.auto {
            let req = RollbackRequest {
                to_snapshot: spec.baseline.clone(),
                selector: spec.selector.clone(),
                reason: format!("deployment guard {job_id} (--auto): {summary}"),
                // One rollback per guard, whatever restarts or takeovers come between.
                request_id: format!("guard-{}", &job_id[..job_id.len().min(50)]),
                ..Default::default()
            };
            let started = match &principal {
                Some(p) => self
                    .start(p, req)
                    .await
                    .map_err(|e| e.message().to_string()),
                None => Err(format!(
                    "the guard's requester `{requester}` is not an operator identity"
                )),
            };
            match started {
                Ok(s) => {
                    let msg = format!(
                        "--auto: started rollback job {} back to snapshot {} on {} (canary first): {command}",
                        s.job_id, spec.baseline, spec.selector
                    );
                    self.emit(live, job_id, EventKind::GuardProposal, "", "", &msg, 0, 0);
                    let _ = write!(reason, "; rollback job {} started (--auto)", s.job_id);
                }
                Err(e) => {
                    let msg = format!(
                        "--auto: the rollback could not start: {e}; run it by hand: {command}"
                    );
                    self.emit(live, job_id, EventKind::GuardProposal, "", "", &msg, 0, 0);
                    let _ = write!(reason, "; --auto could not start the rollback: {e}");
                }
            }
        } else {
            let msg = format!(
                "proposed rollback: {command}{}",
                if proposal.is_empty() {
                    String::new()
                } else {
                    format!(" (diagnose: {proposal})")
                }
            );
            self.emit(live, job_id, EventKind::GuardProposal, "", "", &msg, 0, 0);
            let _ = write!(reason, "; proposed: {command}");
        }
        reason
    }
}

/// The stored samples of a guard, judged.
#[derive(Debug, Default)]
struct Judged {
    /// Hosts with at least one sample.
    sampled: usize,
    hosts: Vec<String>,
    breaches: Vec<Breach>,
    /// Where each host's next sample starts reading the app log.
    offsets: HashMap<String, u64>,
    figures: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_summary_names_each_host_once_per_criterion_in_the_order_seen() {
        let b = |host: &str, criterion| Breach {
            host: host.into(),
            criterion,
            evidence: String::new(),
        };
        let breaches = [
            b("app2", Criterion::Errors),
            b("app1", Criterion::Errors),
            b("app2", Criterion::Errors),
            b("app2", Criterion::Stability),
            b("app1", Criterion::Errors),
        ];
        let text = fleet_summary(&breaches, 3);
        let errors = format!(
            "{} on 2 of 3 host(s) (app2, app1)",
            Criterion::Errors.as_str()
        );
        let stability = format!("{} on 1 of 3 host(s) (app2)", Criterion::Stability.as_str());
        assert!(text.contains(&errors), "{text}");
        assert!(text.contains(&stability), "{text}");
        assert_eq!(text.matches("; ").count(), 1, "{text}");
    }

    fn criteria() -> GuardCriteria {
        criteria_proto(&runbook::GuardCriteria::default())
    }

    fn baseline() -> Baseline {
        Baseline {
            smoke: BTreeMap::from([(
                "incidents".to_string(),
                SmokeLatency {
                    p50_ms: 20.0,
                    p95_ms: 22.0,
                    ok: true,
                },
            )]),
            error_lines_per_min: 0.0,
            restarts: Some(0),
        }
    }

    fn sample(i: i64, p95: f64) -> Sample {
        Sample {
            at_ms: 1_000_000 + i * 1000,
            readyz: "200".into(),
            unit_state: "active".into(),
            restarts: Some(0),
            smoke_p95: BTreeMap::from([("incidents".to_string(), p95)]),
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_host_breaches_nothing_despite_noise() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| sample(i, if i % 3 == 0 { 35.0 } else { 23.0 }))
            .collect();
        assert_eq!(judge_host("a", &baseline(), &samples, &criteria()), []);
    }

    #[test]
    fn latency_three_times_the_baseline_is_a_performance_breach_after_enough_samples() {
        let mut samples = vec![sample(0, 66.0), sample(1, 66.0)];
        assert_eq!(judge_host("a", &baseline(), &samples, &criteria()), []);
        samples.push(sample(2, 66.0));
        let b = judge_host("a", &baseline(), &samples, &criteria());
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].criterion, Criterion::Performance);
        assert!(
            b[0].evidence.contains("p95 66 ms against 22 ms"),
            "{}",
            b[0].evidence
        );
        // +60% of a tiny latency is under the absolute floor: noise, not degradation.
        let mut tiny = baseline();
        tiny.smoke.get_mut("incidents").expect("check").p95_ms = 2.0;
        let small: Vec<Sample> = (0..3).map(|i| sample(i, 3.2)).collect();
        assert_eq!(judge_host("a", &tiny, &small, &criteria()), []);
    }

    #[test]
    fn restarts_are_stability_and_failures_a_restart_explains_are_not_critical() {
        let mut samples: Vec<Sample> = (0..4).map(|i| sample(i, 22.0)).collect();
        for (i, s) in samples.iter_mut().enumerate() {
            s.restarts = Some(i as u64);
            s.readyz = "none (connect refused)".into();
        }
        let b = judge_host("a", &baseline(), &samples, &criteria());
        assert_eq!(
            b.iter().map(|b| b.criterion).collect::<Vec<_>>(),
            [Criterion::Stability],
            "{b:?}"
        );
        assert!(
            b[0].evidence.contains("restarted 3 time(s)"),
            "{}",
            b[0].evidence
        );
        // Two restarts: below the threshold.
        assert_eq!(judge_host("a", &baseline(), &samples[..3], &criteria()), []);
        // A counter reset (a manual restart) counts from zero.
        assert_eq!(restarts_since(Some(5), &samples[..2]), 1);
    }

    #[test]
    fn readyz_failing_while_the_unit_runs_is_critical_after_consecutive_samples() {
        let mut samples: Vec<Sample> = (0..3).map(|i| sample(i, 22.0)).collect();
        samples[1].readyz = "503".into();
        samples[2].smoke_failed = vec!["reports".into()];
        assert_eq!(judge_host("a", &baseline(), &samples, &criteria()), []);
        samples[0].readyz = "503".into();
        let b = judge_host("a", &baseline(), &samples, &criteria());
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].criterion, Criterion::Critical);
        assert!(
            b[0].evidence.contains("smoke check(s) reports failing"),
            "{}",
            b[0].evidence
        );
        // The unit down in every one of them: stability, not critical.
        for s in &mut samples {
            s.unit_state = "failed".into();
        }
        let b = judge_host("a", &baseline(), &samples, &criteria());
        assert_eq!(
            b.iter().map(|b| b.criterion).collect::<Vec<_>>(),
            [Criterion::Stability]
        );
    }

    #[test]
    fn an_error_rate_well_above_the_baseline_breaches() {
        let mut samples: Vec<Sample> = (0..4).map(|i| sample(i * 20, 22.0)).collect();
        // 6 lines in 60 s: 6/min, under the +10/min floor.
        samples[2].error_lines = 6;
        assert_eq!(judge_host("a", &baseline(), &samples, &criteria()), []);
        samples[3].error_lines = 30;
        // Not judged on less than a minute.
        assert_eq!(judge_host("a", &baseline(), &samples[..3], &criteria()), []);
        let b = judge_host("a", &baseline(), &samples, &criteria());
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].criterion, Criterion::Errors);
    }

    #[test]
    fn the_baseline_is_read_from_snapshot_facts_and_round_trips() {
        let facts: HashMap<String, String> = [
            (fact::SMOKE_PASSED, "incidents"),
            (fact::SMOKE_FAILED, "reports"),
            ("smoke.incidents.p50_ms", "20.5"),
            ("smoke.incidents.p95_ms", "25.0"),
            (fact::ERROR_LINES, "2"),
            (fact::WINDOW_MS, "30000"),
            (fact::RESTARTS, "4"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let b = Baseline::from_facts(&facts);
        assert_eq!(b.error_lines_per_min, 4.0);
        assert_eq!(b.restarts, Some(4));
        assert_eq!(b.smoke["incidents"].p95_ms, 25.0);
        assert!(!b.smoke["reports"].ok);
        assert_eq!(Baseline::parse(&b.to_json()), Some(b));
        assert_eq!(Baseline::parse(""), None);
    }
}
