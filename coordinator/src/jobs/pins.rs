//! Pinned targets: whatever is relative in a request (`alembic.downgrade steps=N`,
//! `git.checkout revision=HEAD~1`) is resolved once, at plan time, to an absolute value stored
//! in the job (an alembic revision, a full commit sha), so a resumed, retried or repeated job
//! never goes further than planned. A relative revision that means different commits on
//! different hosts is refused. A request that repeats the latest job with the same request,
//! while the fleet is still at either end of that job's pin, reuses its pin (so running the
//! same rollback twice changes nothing).

use std::collections::HashMap;

use prost::Message;
use rollback_common::jobs::fact;
use rollback_common::proto::{Pin, PlanResponse, RollbackRequest, RunFinished, Step, StepStatus};
use rollback_common::runbook::Plan;
use tonic::Status;

use super::Jobs;

/// A full, lowercase commit sha (40 hex digits; 64 for sha256 repositories).
pub(super) fn is_full_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64)
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

/// The facts of a resolution run, or why it failed, naming the host.
fn facts(host: &str, action: &str, r: &RunFinished) -> Result<HashMap<String, String>, Status> {
    let step = r.steps.first().cloned().unwrap_or_default();
    if r.status != StepStatus::Succeeded as i32 {
        let why = if step.error.is_empty() {
            rollback_common::proto::step_status_name(r.status).to_string()
        } else {
            step.error
        };
        return Err(Status::failed_precondition(format!(
            "cannot pin the target: `{action}` on {host} failed: {why}"
        )));
    }
    Ok(step.facts.into_iter().collect())
}

/// Whether a previous job's pin may be reused: same parameter and request, and every host
/// is at the pinned target or where that job started from.
pub(super) fn reusable(
    prev: &Pin,
    requested: &str,
    param: &str,
    now: &HashMap<String, String>,
) -> bool {
    prev.param == param
        && prev.requested == requested
        && !now.is_empty()
        && now.iter().all(|(host, at)| {
            *at == prev.to || prev.from_by_host.get(host).is_some_and(|f| f == at)
        })
}

/// Same procedure, values, selector and snapshot: the request a pin can be reused for.
fn same_request(a: &RollbackRequest, b: &RollbackRequest) -> bool {
    a.procedure == b.procedure
        && a.values == b.values
        && a.selector == b.selector
        && a.to_snapshot == b.to_snapshot
}

impl Jobs {
    /// The pins of the newest job that made the same request.
    async fn previous_pins(
        &self,
        req: &RollbackRequest,
    ) -> Result<Option<(String, Vec<Pin>)>, Status> {
        for row in self
            .store
            .list_jobs(&crate::store::JobFilter {
                limit: 50,
                ..Default::default()
            })
            .await?
        {
            let Ok(prev) = RollbackRequest::decode(row.request.as_slice()) else {
                continue;
            };
            if same_request(&prev, req) {
                let pins = PlanResponse::decode(row.plan.as_slice())
                    .map(|p| p.pins)
                    .unwrap_or_default();
                return Ok(Some((row.job_id, pins)));
            }
        }
        Ok(None)
    }

    /// Resolves every relative target in `plan` in place; returns the pins for the job.
    pub(super) async fn pin_targets(
        &self,
        plan: &mut Plan,
        req: &RollbackRequest,
    ) -> Result<Vec<Pin>, Status> {
        let previous = self.previous_pins(req).await?;
        let mut pins = Vec::new();
        let online = self.cluster.online_hosts().await;
        for pi in 0..plan.phases.len() {
            let hosts: Vec<String> = plan.phases[pi]
                .batches
                .iter()
                .flatten()
                .filter(|h| online.contains(*h))
                .cloned()
                .collect();
            let phase = plan.phases[pi].name.clone();
            let steps = plan.phases[pi].steps.clone();
            for (si, st) in steps.iter().enumerate() {
                let pin = match st.action.as_str() {
                    "alembic.downgrade" => match st.params.get("steps") {
                        Some(n) => {
                            self.pin_downgrade(&phase, &hosts, n, previous.as_ref())
                                .await?
                        }
                        None => continue,
                    },
                    "git.checkout" => match st.params.get("revision") {
                        Some(rev) if !is_full_sha(rev) => {
                            self.pin_revision(&phase, &hosts, rev, previous.as_ref())
                                .await?
                        }
                        _ => continue,
                    },
                    _ => continue,
                };
                let Some(pin) = pin else { continue };
                let target = &mut plan.phases[pi].steps[si];
                target.params.clear();
                target.params.insert(pin.param.clone(), pin.to.clone());
                pins.push(pin);
            }
        }
        Ok(pins)
    }

    async fn pin_downgrade(
        &self,
        phase: &str,
        hosts: &[String],
        n: &str,
        previous: Option<&(String, Vec<Pin>)>,
    ) -> Result<Option<Pin>, Status> {
        let Some(host) = hosts.first() else {
            return Ok(None);
        };
        let r = self
            .preflight(host, Step::new("alembic.resolve", &[("steps", n)]))
            .await?;
        let f = facts(host, "alembic.resolve", &r)?;
        let current = f.get(fact::CURRENT).cloned().unwrap_or_default();
        let target = f.get(fact::TARGET).cloned().unwrap_or_default();
        if target.is_empty() {
            return Err(Status::failed_precondition(format!(
                "cannot pin the target: alembic.resolve on {host} named no target revision"
            )));
        }
        let requested = format!("steps={n}");
        let now: HashMap<String, String> = [(host.clone(), current.clone())].into();
        let shown = |r: &str| {
            if r.is_empty() {
                "base".to_string()
            } else {
                r.to_string()
            }
        };
        if let Some((job, prev)) = previous
            && let Some(p) = prev
                .iter()
                .find(|p| reusable(p, &requested, "to_revision", &now))
        {
            return Ok(Some(Pin {
                param: "to_revision".into(),
                requested,
                to: p.to.clone(),
                from_by_host: now.into_iter().collect(),
                resolved_on: host.clone(),
                note: format!(
                    "{} → {} (phase {phase}): repeats job {job}, whose pinned target is reused — the schema is at {}; a new `downgrade -{n}` would go further than that job planned",
                    shown(&current),
                    p.to,
                    shown(&current)
                ),
            }));
        }
        Ok(Some(Pin {
            param: "to_revision".into(),
            requested,
            note: format!(
                "{} → {target} (phase {phase}): alembic downgrade -{n} resolved on {host}",
                shown(&current)
            ),
            to: target,
            from_by_host: now.into_iter().collect(),
            resolved_on: host.clone(),
        }))
    }

    async fn pin_revision(
        &self,
        phase: &str,
        hosts: &[String],
        revision: &str,
        previous: Option<&(String, Vec<Pin>)>,
    ) -> Result<Option<Pin>, Status> {
        if hosts.is_empty() {
            return Ok(None);
        }
        let answers = futures::future::join_all(
            hosts
                .iter()
                .map(|h| self.preflight(h, Step::new("git.resolve", &[("revision", revision)]))),
        )
        .await;
        let mut heads: HashMap<String, String> = HashMap::new();
        let mut shas: Vec<(String, String)> = Vec::new();
        for (host, answer) in hosts.iter().zip(answers) {
            let f = facts(host, "git.resolve", &answer?)?;
            let sha = f.get(fact::SHA).cloned().unwrap_or_default();
            if !is_full_sha(&sha) {
                return Err(Status::failed_precondition(format!(
                    "cannot pin the target: git.resolve on {host} answered `{sha}`, not a commit sha"
                )));
            }
            heads.insert(host.clone(), f.get(fact::HEAD).cloned().unwrap_or_default());
            shas.push((host.clone(), sha));
        }
        let requested = revision.to_string();
        if let Some((job, prev)) = previous
            && let Some(p) = prev
                .iter()
                .find(|p| reusable(p, &requested, "revision", &heads))
        {
            return Ok(Some(Pin {
                param: "revision".into(),
                requested,
                to: p.to.clone(),
                from_by_host: heads.into_iter().collect(),
                resolved_on: hosts.join(","),
                note: format!(
                    "{revision} → {} (phase {phase}): repeats job {job}, whose pinned commit is reused — resolving `{revision}` again would go further back than that job planned",
                    p.to
                ),
            }));
        }
        let first = shas[0].1.clone();
        if shas.iter().any(|(_, s)| *s != first) {
            let mut lines: Vec<String> = shas
                .iter()
                .map(|(h, s)| {
                    format!(
                        "{h}: HEAD {} → {revision} = {}",
                        heads.get(h).map_or("?", |x| &x[..x.len().min(12)]),
                        &s[..s.len().min(12)]
                    )
                })
                .collect();
            lines.sort();
            return Err(Status::failed_precondition(format!(
                "refused at plan time, nothing was started: `{revision}` means different commits on different hosts (they are on different HEADs) — {}. Give one commit sha with --revision so every host checks out the same code",
                lines.join("; ")
            )));
        }
        Ok(Some(Pin {
            param: "revision".into(),
            requested,
            note: format!(
                "{revision} → {first} (phase {phase}): resolved on {}",
                hosts.join(", ")
            ),
            to: first,
            from_by_host: heads.into_iter().collect(),
            resolved_on: hosts.join(","),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(to: &str, from: &[(&str, &str)]) -> Pin {
        Pin {
            param: "to_revision".into(),
            requested: "steps=1".into(),
            to: to.into(),
            from_by_host: from
                .iter()
                .map(|(h, r)| (h.to_string(), r.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn now(at: &[(&str, &str)]) -> HashMap<String, String> {
        at.iter()
            .map(|(h, r)| (h.to_string(), r.to_string()))
            .collect()
    }

    #[test]
    fn a_repeat_at_the_target_or_the_start_reuses_the_pin() {
        let p = pin("0002", &[("app1", "0003")]);
        assert!(
            reusable(&p, "steps=1", "to_revision", &now(&[("app1", "0002")])),
            "already at the target"
        );
        assert!(
            reusable(&p, "steps=1", "to_revision", &now(&[("app1", "0003")])),
            "never got there"
        );
    }

    #[test]
    fn a_fleet_that_moved_on_gets_a_fresh_resolution() {
        let p = pin("0002", &[("app1", "0003")]);
        assert!(
            !reusable(&p, "steps=1", "to_revision", &now(&[("app1", "0004")])),
            "a newer deployment"
        );
        assert!(
            !reusable(&p, "steps=2", "to_revision", &now(&[("app1", "0002")])),
            "another request"
        );
        assert!(
            !reusable(&p, "steps=1", "revision", &now(&[("app1", "0002")])),
            "another parameter"
        );
        assert!(
            !reusable(&p, "steps=1", "to_revision", &now(&[])),
            "no evidence"
        );
    }

    #[test]
    fn full_shas_only() {
        assert!(is_full_sha(&"a".repeat(40)));
        assert!(!is_full_sha("HEAD~1"));
        assert!(!is_full_sha(&"A".repeat(40)));
        assert!(!is_full_sha(&"a".repeat(39)));
    }
}
