//! `alembic.downgrade {steps | to_revision}` and `alembic.current`, run with the host's alembic
//! binary and config in its working directory, with only the environment `[alembic.env]` gives.

use super::{Failure, StepCtx};
use crate::exec::ProcessSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `downgrade -N`
    Steps(u32),
    /// `downgrade REV` (or `base`)
    Revision(String),
}

fn explain(output: &str) -> Option<String> {
    if output.contains("didn't produce") && output.contains("migrations")
        || output.contains("Destination") && output.contains("not a valid downgrade target")
    {
        return Some(
            "the database is already at base (or fewer revisions than asked): nothing to downgrade"
                .into(),
        );
    }
    let lower = output.to_lowercase();
    if lower.contains("could not connect")
        || lower.contains("connection refused")
        || lower.contains("could not translate host name")
        || lower.contains("connection timed out")
        || lower.contains("server closed the connection")
    {
        let detail = output
            .lines()
            .find(|l| {
                l.to_lowercase().contains("connection") || l.to_lowercase().contains("could not")
            })
            .unwrap_or_default()
            .trim();
        return Some(format!("the database is unreachable: {detail}"));
    }
    if output.contains("Can't locate revision") {
        return Some("alembic does not know that revision (is the code checked out at a release that has it?)".into());
    }
    None
}

fn alembic(ctx: &StepCtx<'_>) -> Result<ProcessSpec, Failure> {
    let a = ctx
        .config
        .alembic
        .as_ref()
        .ok_or_else(|| Failure::new(-1, "no [alembic] in agent.toml"))?;
    let mut spec = ctx.spec(&a.binary, &a.workdir).arg("-c").arg(&a.config);
    for (k, v) in &a.env {
        spec = spec.env(k.clone(), v.clone());
    }
    Ok(spec.env("PYTHONUNBUFFERED", "1"))
}

/// Runs `alembic current` and returns the revision ("" at base).
pub(super) async fn current(ctx: &mut StepCtx<'_>) -> Result<String, Failure> {
    let spec = alembic(ctx)?.arg("current");
    let outcome = ctx.run(&spec).await?;
    if !outcome.success() {
        return Err(Failure::exited(
            &outcome,
            "alembic current",
            explain(&outcome.output_text()),
        ));
    }
    let stdout_like = outcome.output_text();
    let stderr = outcome.stderr_text();
    // The revision line is on stdout; logging (INFO ...) goes to stderr.
    let revision = stdout_like
        .lines()
        .filter(|l| !stderr.contains(*l))
        .filter_map(|l| l.split_whitespace().next())
        .find(|w| w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or_default()
        .to_string();
    let shown = if revision.is_empty() {
        "base (no revision)"
    } else {
        revision.as_str()
    };
    ctx.say(&format!("alembic current: {shown}"));
    ctx.fact("revision", revision.clone());
    Ok(revision)
}

pub(super) async fn downgrade(target: &Target, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let arg = match target {
        Target::Steps(n) => format!("-{n}"),
        Target::Revision(rev) => rev.clone(),
    };
    let before = current(ctx).await?;
    let spec = alembic(ctx)?.arg("downgrade").arg(&arg);
    let outcome = ctx.run(&spec).await?;
    if !outcome.success() {
        return Err(Failure::exited(
            &outcome,
            &format!("alembic downgrade {arg}"),
            explain(&outcome.output_text()),
        ));
    }
    let after = current(ctx).await?;
    ctx.fact("from_revision", before);
    ctx.say(&format!(
        "downgraded to {}",
        if after.is_empty() { "base" } else { &after }
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::explain;

    #[test]
    fn explains_base_and_unreachable() {
        let base = "FAILED: Relative revision -1 didn't produce 1 migrations";
        assert!(explain(base).is_some_and(|m| m.contains("already at base")));
        let down = "sqlalchemy.exc.OperationalError: (psycopg2.OperationalError) connection to server at \"10.0.0.9\", port 5432 failed: Connection refused";
        assert!(explain(down).is_some_and(|m| m.contains("unreachable")));
    }
}
