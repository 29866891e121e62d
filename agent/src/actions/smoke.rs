//! `smoke.run {rounds}`: the host's `[[smoke]]` checks of critical functionality, each one
//! request to the app's own `app.health_base_url` judged by status, body substring and JSON
//! field, timed. The step fails when a check fails in any round; its facts name the checks
//! that passed and failed and each check's p50/p95 latency (the snapshot's baseline and the
//! guard's samples read them). A host with no checks passes and says so: nothing was tested.

use std::time::{Duration, Instant};

use rollback_common::jobs::fact;
use rollback_common::proto::StepStatus;

use super::http::{Answer, request};
use super::{Failure, StepCtx};
use crate::profile::{SmokeCheck, valid_health_base};

/// Most rounds one step may ask for.
pub const MAX_ROUNDS: u32 = 20;

/// What one check did over every round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckResult {
    pub name: String,
    pub passed: u32,
    pub failed: u32,
    /// Why the last failing round failed.
    pub last_failure: String,
    /// Milliseconds of every request that got an answer, in the order they were made.
    pub latencies_ms: Vec<f64>,
}

/// Requests a p95 is taken over: a guard sample makes 3 per check, and a baseline of more
/// rounds is judged in groups of as many (see [`robust_p95`]).
pub const P95_GROUP: usize = 3;

impl CheckResult {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }

    /// Nearest-rank percentile `p` of every latency.
    pub fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        percentile(&sorted, p)
    }

    /// The p95 as the guard compares it: see [`robust_p95`].
    pub fn p95(&self) -> f64 {
        robust_p95(&self.latencies_ms, P95_GROUP)
    }
}

/// The median of the p95 of each consecutive group of `group` latencies: a guard sample's p95
/// is over one such group, and a baseline of several groups is not moved by one slow moment
/// of a loaded machine.
pub fn robust_p95(latencies: &[f64], group: usize) -> f64 {
    let mut p95s: Vec<f64> = latencies
        .chunks(group.max(1))
        .map(|c| {
            let mut sorted = c.to_vec();
            sorted.sort_by(f64::total_cmp);
            percentile(&sorted, 95.0)
        })
        .collect();
    p95s.sort_by(f64::total_cmp);
    match p95s.len() {
        0 => 0.0,
        n if n % 2 == 1 => p95s[n / 2],
        n => (p95s[n / 2 - 1] + p95s[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile `p` (0-100) of sorted values; 0 when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Whether `answer` is what `check` expects; why not.
pub fn judge(check: &SmokeCheck, answer: &Answer) -> Result<(), String> {
    if answer.status != check.expect_status {
        return Err(format!(
            "status {}, expected {} ({})",
            answer.status,
            check.expect_status,
            answer.first_line()
        ));
    }
    if let Some(want) = &check.body_contains
        && !String::from_utf8_lossy(&answer.body).contains(want.as_str())
    {
        return Err(format!("the body does not contain `{want}`"));
    }
    if let Some(field) = &check.json_field {
        let doc: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("the body is not JSON ({e})"))?;
        let value = field
            .split('.')
            .try_fold(&doc, |v, key| v.get(key))
            .ok_or_else(|| format!("the JSON body has no field `{field}`"))?;
        if let Some(want) = &check.json_equals {
            let got = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if &got != want {
                return Err(format!(
                    "JSON field `{field}` is `{got}`, expected `{want}`"
                ));
            }
        }
    }
    Ok(())
}

/// Runs every check `rounds` times, one request at a time; stops early (with what it has)
/// when `stop` says so.
pub async fn sample(
    checks: &[SmokeCheck],
    base: &str,
    rounds: u32,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Vec<CheckResult>, String> {
    let (host, port) = valid_health_base(base).map_err(|e| format!("app.health_base_url: {e}"))?;
    let mut results: Vec<CheckResult> = checks
        .iter()
        .map(|c| CheckResult {
            name: c.name.clone(),
            ..Default::default()
        })
        .collect();
    for _ in 0..rounds {
        for (check, result) in checks.iter().zip(results.iter_mut()) {
            if stop.is_cancelled() {
                return Ok(results);
            }
            let began = Instant::now();
            let timeout = Duration::from_millis(u64::from(check.timeout_ms));
            let answer = tokio::select! {
                () = stop.cancelled() => return Ok(results),
                a = request(&check.method, &host, port, &check.path, timeout) => a,
            };
            let ms = began.elapsed().as_secs_f64() * 1000.0;
            let verdict = match answer {
                Ok(a) => {
                    result.latencies_ms.push(ms);
                    judge(check, &a)
                }
                Err(e) => Err(e),
            };
            match verdict {
                Ok(()) => result.passed += 1,
                Err(why) => {
                    result.failed += 1;
                    result.last_failure = format!("{} {}: {why}", check.method, check.path);
                }
            }
        }
    }
    Ok(results)
}

/// The facts of a finished sample (see the module's doc).
pub fn facts(results: &[CheckResult]) -> Vec<(String, String)> {
    let names = |ok: bool| {
        results
            .iter()
            .filter(|r| r.ok() == ok)
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut out = vec![
        (fact::SMOKE_CHECKS.to_string(), results.len().to_string()),
        (fact::SMOKE_PASSED.to_string(), names(true)),
        (fact::SMOKE_FAILED.to_string(), names(false)),
    ];
    for r in results {
        out.push((
            fact::smoke_latency(&r.name, "p50"),
            format!("{:.1}", r.percentile(50.0)),
        ));
        out.push((
            fact::smoke_latency(&r.name, "p95"),
            format!("{:.1}", r.p95()),
        ));
    }
    out
}

pub(super) async fn run(rounds: u32, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let checks = ctx.config.smoke.clone();
    if checks.is_empty() {
        ctx.fact(fact::SMOKE_CHECKS, "0");
        ctx.say("no [[smoke]] checks in this host's agent.toml: critical functionality is not tested here");
        return Ok(());
    }
    let base = ctx
        .config
        .app
        .as_ref()
        .and_then(|a| a.health_base_url.clone())
        .unwrap_or_default();
    let stop = ctx.cancel.child_token();
    let results = tokio::select! {
        r = sample(&checks, &base, rounds, &stop) => r.map_err(|e| Failure::new(-1, e))?,
        () = tokio::time::sleep(ctx.timeout) => {
            stop.cancel();
            return Err(Failure {
                status: StepStatus::TimedOut,
                exit_code: -1,
                error: format!("smoke checks did not finish within the step timeout {:?}", ctx.timeout),
            });
        }
    };
    if ctx.cancel.is_cancelled() {
        return Err(Failure {
            status: StepStatus::Cancelled,
            exit_code: -1,
            error: "cancelled while running smoke checks".into(),
        });
    }
    for (check, r) in checks.iter().zip(&results) {
        let timing = format!("p50 {:.0} ms, p95 {:.0} ms", r.percentile(50.0), r.p95());
        if r.ok() {
            ctx.say(&format!(
                "smoke {}: {} {} passed {}/{} ({timing})",
                r.name, check.method, check.path, r.passed, rounds
            ));
        } else {
            ctx.say(&format!(
                "smoke {}: FAILED {}/{}: {} ({timing})",
                r.name, r.failed, rounds, r.last_failure
            ));
        }
    }
    for (k, v) in facts(&results) {
        ctx.fact(&k, v);
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| format!("{} ({})", r.name, r.last_failure))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            -1,
            format!(
                "critical functionality: {} of {} smoke check(s) failed: {}",
                failed.len(),
                results.len(),
                failed.join("; ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(extra: impl FnOnce(&mut SmokeCheck)) -> SmokeCheck {
        let mut c = SmokeCheck {
            name: "items".into(),
            method: "GET".into(),
            path: "/api/items".into(),
            expect_status: 200,
            body_contains: None,
            json_field: None,
            json_equals: None,
            timeout_ms: 2000,
        };
        extra(&mut c);
        c
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_check_is_judged_by_status_body_and_json_field() {
        assert_eq!(judge(&check(|_| {}), &answer(200, "x")), Ok(()));
        let e = judge(&check(|_| {}), &answer(503, "down\nmore")).expect_err("refused");
        assert_eq!(e, "status 503, expected 200 (down)");
        let c = check(|c| c.body_contains = Some("ok".into()));
        assert!(judge(&c, &answer(200, "all ok")).is_ok());
        assert!(judge(&c, &answer(200, "nope")).is_err());
        let c = check(|c| {
            c.json_field = Some("data.status".into());
            c.json_equals = Some("ok".into());
        });
        assert!(judge(&c, &answer(200, r#"{"data":{"status":"ok"}}"#)).is_ok());
        let e = judge(&c, &answer(200, r#"{"data":{"status":"degraded"}}"#)).expect_err("refused");
        assert!(e.contains("`degraded`, expected `ok`"), "{e}");
        assert!(judge(&c, &answer(200, r#"{"data":{}}"#)).is_err());
        assert!(
            judge(&c, &answer(200, "<html>"))
                .expect_err("refused")
                .contains("not JSON")
        );
        let c = check(|c| {
            c.json_field = Some("count".into());
            c.json_equals = Some("3".into());
        });
        assert!(judge(&c, &answer(200, r#"{"count":3}"#)).is_ok());
        let present = check(|c| c.json_field = Some("count".into()));
        assert!(judge(&present, &answer(200, r#"{"count":0}"#)).is_ok());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn one_slow_moment_does_not_move_a_baseline_of_several_groups() {
        // 15 requests at ~20 ms, one of them 45 ms (a busy machine): the median of the five
        // groups' p95 stays at the steady latency.
        let mut v = vec![20.0, 21.0, 22.0, 20.0, 45.0, 21.0];
        v.extend([22.0, 20.0, 21.0, 20.0, 22.0, 21.0, 20.0, 21.0, 22.0]);
        assert_eq!(robust_p95(&v, 3), 22.0);
        // One group (a guard sample): its p95.
        assert_eq!(robust_p95(&[60.0, 62.0, 61.0], 3), 62.0);
        assert_eq!(robust_p95(&[], 3), 0.0);
    }
}
