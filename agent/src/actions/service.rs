//! `service.stop|start|restart|status`: `systemctl <verb> <unit>` for the unit in `[service]`.
//! Stop, start and restart read the unit's active state first (fact `was`); stopping an
//! inactive unit or starting an active one runs nothing and says so (fact `changed=false`).

use rollback_common::jobs::fact;
use rollback_common::proto::StepStatus;

use super::{Failure, StepCtx};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Stop,
    Start,
    Restart,
    Status,
}

impl Verb {
    pub fn from_action(action: &str) -> Self {
        match action {
            "service.stop" => Verb::Stop,
            "service.start" => Verb::Start,
            "service.restart" => Verb::Restart,
            _ => Verb::Status,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verb::Stop => "stop",
            Verb::Start => "start",
            Verb::Restart => "restart",
            Verb::Status => "status",
        }
    }
}

/// Explains systemctl failures an operator can act on.
fn explain(stderr: &str, unit: &str) -> Option<String> {
    let lower = stderr.to_lowercase();
    if lower.contains("not found")
        || lower.contains("could not be found")
        || lower.contains("not loaded")
    {
        return Some(format!(
            "unit {unit} does not exist on this host (check [service] unit in agent.toml)"
        ));
    }
    if lower.contains("failed to connect to bus")
        || lower.contains("system has not been booted with systemd")
    {
        return Some("systemd is not reachable on this host (no system bus)".into());
    }
    None
}

/// Whether `verb` has nothing to do for a unit in active state `was`.
fn already_done(verb: Verb, was: &str) -> bool {
    match verb {
        Verb::Stop => was == "inactive",
        Verb::Start => was == "active",
        Verb::Restart | Verb::Status => false,
    }
}

pub(super) async fn run(verb: Verb, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let Some(svc) = ctx.config.service.clone() else {
        return Err(Failure::new(-1, "no [service] in agent.toml"));
    };
    if verb != Verb::Status {
        let was = active_state(&svc, ctx).await?;
        ctx.fact(fact::WAS, was.clone());
        // `is-active` says `inactive` for a unit that does not exist: only skip the stop when
        // systemd knows the unit (otherwise systemctl runs and explains).
        let skip = already_done(verb, &was)
            && (verb != Verb::Stop
                || load_state(&svc, ctx)
                    .await?
                    .is_some_and(|s| s != "not-found"));
        if skip {
            ctx.say(&format!(
                "{} is already {was}; nothing to {}",
                svc.unit,
                verb.as_str()
            ));
            ctx.fact(fact::ACTIVE_STATE, was);
            ctx.fact(fact::CHANGED, "false");
            return Ok(());
        }
    }
    let mut spec = ctx
        .spec(&svc.systemctl, std::path::Path::new("/"))
        .arg(verb.as_str());
    if verb == Verb::Status {
        spec = spec.args(["--no-pager", "--lines=20"]);
    }
    let outcome = ctx.run(&spec.arg("--").arg(&svc.unit)).await?;
    // `systemctl status` exits 3 for an inactive unit: that is an answer, not a failure.
    let answered = outcome.success() || (verb == Verb::Status && outcome.exit_code() == 3);
    if !answered {
        let explained = explain(&outcome.output_text(), &svc.unit);
        return Err(Failure::exited(
            &outcome,
            &format!("systemctl {} {}", verb.as_str(), svc.unit),
            explained,
        ));
    }
    let active = active_state(&svc, ctx).await?;
    ctx.say(&format!("{} is {active}", svc.unit));
    ctx.fact(fact::ACTIVE_STATE, active);
    if verb != Verb::Status {
        ctx.fact(fact::CHANGED, "true");
    }
    Ok(())
}

/// `systemctl show --property=LoadState --value UNIT` (`loaded`, `not-found`, `masked`, ...);
/// `None` when systemctl gives no usable answer.
async fn load_state(
    svc: &crate::profile::ServiceProfile,
    ctx: &mut StepCtx<'_>,
) -> Result<Option<String>, Failure> {
    let probe = ctx.spec(&svc.systemctl, std::path::Path::new("/")).args([
        "show",
        "--property=LoadState",
        "--value",
        "--",
        &svc.unit,
    ]);
    match ctx.run(&probe).await {
        Ok(outcome) if outcome.success() => Ok(outcome
            .output_text()
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(String::from)),
        Ok(_) => Ok(None),
        Err(f) if f.status == StepStatus::Failed => Ok(None),
        Err(f) => Err(f),
    }
}

/// `systemctl is-active UNIT`: the unit's active state (`active`, `inactive`, `failed`, ...).
pub(super) async fn active_state(
    svc: &crate::profile::ServiceProfile,
    ctx: &mut StepCtx<'_>,
) -> Result<String, Failure> {
    let probe =
        ctx.spec(&svc.systemctl, std::path::Path::new("/"))
            .args(["is-active", "--", &svc.unit]);
    let state = ctx.run(&probe).await?;
    Ok(state
        .output_text()
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::{Verb, already_done};

    #[test]
    fn only_stop_of_inactive_and_start_of_active_are_no_ops() {
        assert!(already_done(Verb::Stop, "inactive"));
        assert!(!already_done(Verb::Stop, "failed"));
        assert!(!already_done(Verb::Stop, "active"));
        assert!(already_done(Verb::Start, "active"));
        assert!(!already_done(Verb::Start, "activating"));
        assert!(!already_done(Verb::Restart, "active"));
        assert!(!already_done(Verb::Restart, "inactive"));
    }
}
