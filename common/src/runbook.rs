//! The runbook as data: procedures of phases (`each` or `once`) of typed steps, loaded from
//! TOML and validated with errors naming procedure and step. The seed runbook is built in.
//! Planning (which hosts, which batches, which once-host, which exact steps) is a pure
//! function here so the coordinator and tests agree on it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::selector::Selector;

/// Every action agents know. A runbook naming anything else is refused at load.
pub const ACTIONS: &[&str] = &[
    "service.stop",
    "service.start",
    "service.restart",
    "service.status",
    "alembic.downgrade",
    "alembic.current",
    "postgres.restore",
    "postgres.backup",
    "git.checkout",
    "git.log",
    "file.restore",
    "http.check",
    "log.scan",
    "state.read",
    "snapshot.take",
    "postgres.verify",
    "alembic.resolve",
    "git.resolve",
    "smoke.run",
    "guard.sample",
];

/// Actions that only read the host; every other action changes it (and needs the host's
/// lease: a mutating `exec` on a host a job holds is refused).
pub const READ_ONLY_ACTIONS: &[&str] = &[
    "service.status",
    "alembic.current",
    "alembic.resolve",
    "git.log",
    "git.resolve",
    "http.check",
    "log.scan",
    "state.read",
    "postgres.verify",
    "smoke.run",
    "guard.sample",
];

/// Values a rollback request may fill into `{...}` placeholders.
pub const PLACEHOLDERS: &[&str] = &["revision", "backup"];

/// The built-in runbook's text.
pub const SEED_TOML: &str = include_str!("../runbook/seed.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Each,
    Once,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTemplate {
    pub action: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    pub scope: Scope,
    pub steps: Vec<StepTemplate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Procedure {
    pub description: String,
    /// Selector choosing the host of `once` phases (overridable per request).
    #[serde(default)]
    pub once_on: Option<String>,
    /// Request values the procedure requires (`revision`, `backup`).
    #[serde(default)]
    pub needs: Vec<String>,
    /// The runbook's time estimate (e.g. "5-15 minutes"), shown in the report next to the time
    /// the job took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<String>,
    pub phases: Vec<Phase>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runbook {
    pub procedures: BTreeMap<String, Procedure>,
    /// The deployment guard's thresholds for the runbook's "When to Rollback" criteria.
    #[serde(default)]
    pub guard: GuardCriteria,
}

/// `[guard]`: when the deployment guard calls for a rollback (the runbook's "When to
/// Rollback": critical functionality broken, system stability compromised, performance
/// degradation over 50%, and error rates well above normal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardCriteria {
    /// Performance: a smoke check's p95 latency up more than this percentage over the
    /// baseline's...
    pub latency_increase_pct: u32,
    /// ...and by at least this many milliseconds (a 2 ms check doubling is noise).
    pub latency_min_increase_ms: u32,
    /// ...judged on the median p95 of this many newest samples.
    pub latency_samples: u32,
    /// Stability: the unit restarted this many times since the baseline.
    pub max_restarts: u32,
    /// Critical functionality (readyz or a smoke check failing while the unit runs) and a
    /// unit that is not running: this many consecutive samples.
    pub failing_samples: u32,
    /// Errors: error-log lines per minute above both the baseline's rate times this...
    pub error_rate_factor: u32,
    /// ...and the baseline's rate plus this.
    pub error_rate_min_per_min: u32,
}

impl Default for GuardCriteria {
    fn default() -> Self {
        Self {
            latency_increase_pct: 50,
            latency_min_increase_ms: 20,
            latency_samples: 3,
            max_restarts: 3,
            failing_samples: 3,
            error_rate_factor: 3,
            error_rate_min_per_min: 10,
        }
    }
}

impl GuardCriteria {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v, lo, hi) in [
            ("latency_increase_pct", self.latency_increase_pct, 1, 10_000),
            (
                "latency_min_increase_ms",
                self.latency_min_increase_ms,
                0,
                600_000,
            ),
            ("latency_samples", self.latency_samples, 1, 100),
            ("max_restarts", self.max_restarts, 1, 1000),
            ("failing_samples", self.failing_samples, 1, 100),
            ("error_rate_factor", self.error_rate_factor, 1, 1000),
            (
                "error_rate_min_per_min",
                self.error_rate_min_per_min,
                0,
                1_000_000,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(format!("[guard] {name} = {v}: must be {lo} to {hi}"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunbookError {
    #[error("runbook is not valid TOML: {0}")]
    Toml(String),
    #[error("runbook has no procedures")]
    Empty,
    #[error("{0}")]
    Guard(String),
    #[error("procedure `{procedure}`: {reason}")]
    Procedure { procedure: String, reason: String },
    #[error("procedure `{procedure}`, phase `{phase}`, step {step} ({action}): {reason}")]
    Step {
        procedure: String,
        phase: String,
        step: usize,
        action: String,
        reason: String,
    },
}

fn placeholders_in(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('{') {
        match rest[start..].find('}') {
            Some(end) => {
                out.push(rest[start + 1..start + end].to_string());
                rest = &rest[start + end + 1..];
            }
            None => break,
        }
    }
    out
}

impl Runbook {
    pub fn seed() -> Self {
        // The seed is compiled in and covered by a test; parsing it cannot fail at run time.
        Self::parse(SEED_TOML).unwrap_or_else(|e| panic!("built-in runbook is invalid: {e}"))
    }

    pub fn parse(text: &str) -> Result<Self, RunbookError> {
        let runbook: Runbook =
            toml::from_str(text).map_err(|e| RunbookError::Toml(e.to_string()))?;
        runbook.validate()?;
        Ok(runbook)
    }

    pub fn validate(&self) -> Result<(), RunbookError> {
        if self.procedures.is_empty() {
            return Err(RunbookError::Empty);
        }
        self.guard.validate().map_err(RunbookError::Guard)?;
        for (name, p) in &self.procedures {
            let perr = |reason: String| RunbookError::Procedure {
                procedure: name.clone(),
                reason,
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(perr("procedure names are [a-z0-9-]".into()));
            }
            if p.phases.is_empty() {
                return Err(perr("has no phases".into()));
            }
            for need in &p.needs {
                if !PLACEHOLDERS.contains(&need.as_str()) {
                    return Err(perr(format!(
                        "needs `{need}`, but only {} can be given",
                        PLACEHOLDERS.join(", ")
                    )));
                }
            }
            if let Some(sel) = &p.once_on {
                Selector::parse(sel).map_err(|e| perr(format!("once_on: {e}")))?;
            }
            let mut phase_names = BTreeSet::new();
            for phase in &p.phases {
                if !phase_names.insert(phase.name.as_str()) {
                    return Err(perr(format!("phase `{}` appears twice", phase.name)));
                }
                if phase.steps.is_empty() {
                    return Err(perr(format!("phase `{}` has no steps", phase.name)));
                }
                for (i, step) in phase.steps.iter().enumerate() {
                    let serr = |reason: String| RunbookError::Step {
                        procedure: name.clone(),
                        phase: phase.name.clone(),
                        step: i + 1,
                        action: step.action.clone(),
                        reason,
                    };
                    if !ACTIONS.contains(&step.action.as_str()) {
                        return Err(serr(format!(
                            "unknown action; known actions: {}",
                            ACTIONS.join(", ")
                        )));
                    }
                    for value in step.params.values() {
                        for ph in placeholders_in(value) {
                            if !PLACEHOLDERS.contains(&ph.as_str()) {
                                return Err(serr(format!(
                                    "unknown placeholder `{{{ph}}}`; use {{revision}} or {{backup}}"
                                )));
                            }
                            if !p.needs.contains(&ph) {
                                return Err(serr(format!(
                                    "uses `{{{ph}}}` but the procedure does not list it in `needs`"
                                )));
                            }
                        }
                    }
                    if step.timeout_secs == Some(0) {
                        return Err(serr("timeout_secs must be positive".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The procedure called `name`, or an error listing the ones there are.
    pub fn procedure(&self, name: &str) -> Result<&Procedure, String> {
        self.procedures.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.procedures.keys().map(String::as_str).collect();
            format!(
                "no procedure `{name}`; the runbook has: {}",
                known.join(", ")
            )
        })
    }

    /// The runbook as TOML (for `rollbackctl runbook show`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// How a job moves through the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strategy {
    /// Hosts in the canary batch (taken first, alone).
    pub canary: usize,
    /// Batch size after the canary: a count, or a percentage of the targets.
    pub batch_size: Amount,
    /// Failures at which the job halts: a count, or a percentage of the targets.
    pub max_failures: Amount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(usize),
    Percent(u8),
}

impl Amount {
    pub fn parse(text: &str, what: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            match p.parse::<u8>() {
                Ok(n) if (1..=100).contains(&n) => Ok(Amount::Percent(n)),
                _ => Err(format!("{what} `{text}`: a percentage must be 1% to 100%")),
            }
        } else {
            match t.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Amount::Count(n)),
                _ => Err(format!(
                    "{what} `{text}`: give a count (at least 1) or a percentage like 25%"
                )),
            }
        }
    }

    /// Resolved against `total` hosts (a percentage rounds up, at least 1).
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => (total * usize::from(p)).div_ceil(100).max(1),
        }
    }

    pub fn describe(self) -> String {
        match self {
            Amount::Count(n) => n.to_string(),
            Amount::Percent(p) => format!("{p}%"),
        }
    }
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            canary: 1,
            batch_size: Amount::Percent(25),
            max_failures: Amount::Count(1),
        }
    }
}

/// A step with its parameters resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    pub action: String,
    pub params: BTreeMap<String, String>,
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPhase {
    pub name: String,
    pub scope: Scope,
    pub steps: Vec<PlannedStep>,
    /// `each`: batches of host ids (canary first). `once`: one batch with the once-host.
    pub batches: Vec<Vec<String>>,
    /// Hosts whose steps differ from `steps` (composed plans, e.g. back to a snapshot).
    pub host_steps: BTreeMap<String, Vec<PlannedStep>>,
}

impl PlannedPhase {
    /// The steps `host` runs in this phase.
    pub fn steps_for(&self, host: &str) -> &[PlannedStep] {
        self.host_steps
            .get(host)
            .map_or(self.steps.as_slice(), Vec::as_slice)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub procedure: String,
    pub targets: Vec<String>,
    pub once_host: Option<String>,
    pub phases: Vec<PlannedPhase>,
    pub max_failures: usize,
}

/// Plans `procedure` over `targets` (host ids, in dispatch order) with `once_candidates`
/// (host ids matching the once-selector, sorted) and request `values`.
pub fn plan(
    runbook: &Runbook,
    procedure: &str,
    values: &BTreeMap<String, String>,
    targets: &[String],
    once_candidates: &[String],
    strategy: &Strategy,
) -> Result<Plan, String> {
    let p = runbook.procedure(procedure)?;
    for need in &p.needs {
        if values.get(need).is_none_or(|v| v.trim().is_empty()) {
            return Err(format!("procedure `{procedure}` needs --{need}"));
        }
    }
    for k in values.keys() {
        if !p.needs.contains(k) {
            return Err(format!("procedure `{procedure}` does not take --{k}"));
        }
    }
    if targets.is_empty() {
        return Err("the selector matches no agent".into());
    }
    let needs_once = p.phases.iter().any(|ph| ph.scope == Scope::Once);
    let once_host = if needs_once {
        Some(once_candidates.first().cloned().ok_or_else(|| {
            format!("procedure `{procedure}` has a `once` phase but no online agent matches its once-host selector")
        })?)
    } else {
        None
    };
    let batches = batches(targets, strategy);
    let phases = p
        .phases
        .iter()
        .map(|ph| PlannedPhase {
            name: ph.name.clone(),
            scope: ph.scope,
            steps: ph
                .steps
                .iter()
                .map(|s| PlannedStep {
                    action: s.action.clone(),
                    params: s
                        .params
                        .iter()
                        .map(|(k, v)| (k.clone(), substitute(v, values)))
                        .collect(),
                    timeout_secs: s.timeout_secs.unwrap_or(0),
                })
                .collect(),
            batches: match ph.scope {
                Scope::Each => batches.clone(),
                Scope::Once => vec![once_host.clone().into_iter().collect()],
            },
            host_steps: BTreeMap::new(),
        })
        .collect();
    Ok(Plan {
        procedure: procedure.to_string(),
        targets: targets.to_vec(),
        once_host,
        phases,
        max_failures: strategy.max_failures.of(targets.len()),
    })
}

/// Splits `targets` into the canary batch and batches of the strategy's size.
pub fn batches(targets: &[String], strategy: &Strategy) -> Vec<Vec<String>> {
    let canary = strategy.canary.min(targets.len());
    let batch = strategy.batch_size.of(targets.len()).max(1);
    let mut batches: Vec<Vec<String>> = Vec::new();
    if canary > 0 {
        batches.push(targets[..canary].to_vec());
    }
    for chunk in targets[canary..].chunks(batch) {
        batches.push(chunk.to_vec());
    }
    batches
}

fn substitute(value: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("app{i}")).collect()
    }

    #[test]
    fn seed_runbook_is_valid_and_has_the_four_procedures() {
        let rb = Runbook::seed();
        let names: Vec<&str> = rb.procedures.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "application",
                "configuration",
                "database",
                "database-restore"
            ]
        );
        assert_eq!(
            Runbook::parse(&rb.to_toml()),
            Ok(rb),
            "round-trips through TOML"
        );
    }

    #[test]
    fn database_plan_runs_the_downgrade_once_between_barriers() {
        let rb = Runbook::seed();
        let plan = plan(
            &rb,
            "database",
            &BTreeMap::new(),
            &hosts(5),
            &["app1".into()],
            &Strategy::default(),
        )
        .expect("plan");
        let shape: Vec<(&str, Scope, usize)> = plan
            .phases
            .iter()
            .map(|p| (p.name.as_str(), p.scope, p.batches.len()))
            .collect();
        assert_eq!(
            shape,
            [
                ("stop", Scope::Each, 3),
                ("downgrade", Scope::Once, 1),
                ("start", Scope::Each, 3),
                ("verify", Scope::Each, 3)
            ]
        );
        assert_eq!(plan.phases[1].batches, [["app1".to_string()]]);
        assert_eq!(
            plan.phases[0].batches[0],
            ["app1".to_string()],
            "canary first"
        );
        assert_eq!(plan.max_failures, 1);
    }

    #[test]
    fn placeholders_are_filled_and_required() {
        let rb = Runbook::seed();
        let err = plan(
            &rb,
            "application",
            &BTreeMap::new(),
            &hosts(2),
            &[],
            &Strategy::default(),
        )
        .expect_err("needs revision");
        assert!(err.contains("--revision"), "{err}");
        let values = BTreeMap::from([("revision".to_string(), "abc123".to_string())]);
        let plan = plan(
            &rb,
            "application",
            &values,
            &hosts(2),
            &[],
            &Strategy::default(),
        )
        .expect("plan");
        assert_eq!(plan.phases[0].steps[0].params["revision"], "abc123");
    }

    #[test]
    fn batches_follow_canary_and_size() {
        let rb = Runbook::seed();
        let s = Strategy {
            canary: 2,
            batch_size: Amount::Count(3),
            max_failures: Amount::Percent(50),
        };
        let plan = plan(&rb, "configuration", &BTreeMap::new(), &hosts(10), &[], &s).expect("plan");
        let sizes: Vec<usize> = plan.phases[0].batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 3, 3, 2]);
        assert_eq!(plan.max_failures, 5);
    }

    #[test]
    fn invalid_runbooks_name_procedure_and_step() {
        let bad = r#"
[procedures.x]
description = "d"
[[procedures.x.phases]]
name = "p"
scope = "each"
steps = [{ action = "service.stop" }, { action = "shell.run" }]
"#;
        let err = Runbook::parse(bad).expect_err("unknown action");
        assert!(
            err.to_string()
                .contains("procedure `x`, phase `p`, step 2 (shell.run)"),
            "{err}"
        );
        let bad = bad.replace(
            "shell.run",
            "git.checkout\", params = { revision = \"{rev}\" }, x = \"",
        );
        assert!(Runbook::parse(&bad).is_err());
        assert!(Amount::parse("0", "batch").is_err() && Amount::parse("150%", "batch").is_err());
        assert_eq!(Amount::parse("25%", "batch"), Ok(Amount::Percent(25)));
    }
}
