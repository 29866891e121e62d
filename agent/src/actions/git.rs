//! `git.checkout {revision}`, `git.resolve {revision}` and `git.log` in the app's git working
//! tree. A revision is resolved to a full commit sha (`REV^{commit}`, revisions only, never a
//! path or an option) and checked out by that sha; a checkout of the commit HEAD already is
//! runs nothing. A checkout that moves HEAD runs three `git` processes: one `rev-parse` for
//! the revision and HEAD together, the checkout, and a `log -1` that verifies HEAD after it.
//! `git.resolve` is read-only: it pins a revision to its full sha at plan time.

use rollback_common::jobs::fact;
use rollback_common::proto::StepStatus;

use super::{Failure, StepCtx};
use crate::exec::ProcessSpec;

fn explain(stderr: &str, dir: &str) -> Option<String> {
    if stderr.contains("dubious ownership") {
        return Some(format!(
            "git refuses {dir}: \"dubious ownership\" — the working tree and its .git belong to different users; give them one owner (the agent runs git as the owner of app.dir)"
        ));
    }
    if stderr.contains("would be overwritten by checkout")
        || stderr.contains("Please commit your changes or stash them")
    {
        let files: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with('\t'))
            .map(str::trim)
            .collect();
        return Some(format!(
            "uncommitted changes in {dir} block the checkout ({}); commit, stash or discard them first",
            if files.is_empty() {
                "see output".to_string()
            } else {
                files.join(", ")
            }
        ));
    }
    if stderr.contains("not a git repository") {
        return Some(format!(
            "{dir} is not a git repository (check app.dir in agent.toml)"
        ));
    }
    None
}

/// `git` in the app's working tree, made safe to run from a root agent: the repository's hooks
/// and fsmonitor are off (`-c core.hooksPath=/dev/null -c core.fsmonitor=false`), and when
/// another user controls the tree (owns it or a directory above it) git runs as that user, so
/// anything the repository configures (filters, hooks it re-enables) runs with no more rights
/// than its owner already has, and checked-out files keep their owner.
fn git(ctx: &StepCtx<'_>) -> Result<(ProcessSpec, String), Failure> {
    let app = ctx
        .config
        .app
        .as_ref()
        .ok_or_else(|| Failure::new(-1, "no [app] in agent.toml"))?;
    let dir = app.dir.display().to_string();
    let spec = ctx
        .spec(&app.git, &app.dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
        ]);
    // As another user, no HOME: the owner's global config is theirs, not the agent's to pass.
    let (mut spec, as_owner) =
        super::as_controller_of(spec, &[(&app.dir, "app.dir"), (&app.git, "app.git")])?;
    if !as_owner && let Some(home) = &ctx.home {
        spec = spec.env("HOME", home.clone());
    }
    Ok((spec, dir))
}

/// Resolves `revision` to a full commit sha.
async fn resolve(revision: &str, ctx: &mut StepCtx<'_>) -> Result<String, Failure> {
    let (spec, dir) = git(ctx)?;
    let spec = spec
        .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
        .arg(format!("{revision}^{{commit}}"));
    let outcome = ctx.run(&spec).await?;
    if !outcome.success() {
        let explained = explain(&outcome.stderr_text(), &dir)
            .unwrap_or_else(|| format!("revision `{revision}` is not a commit in {dir}"));
        return Err(Failure::new(
            outcome.exit_code(),
            format!("git rev-parse (exit {}): {explained}", outcome.exit_code()),
        ));
    }
    let sha = outcome
        .output_text()
        .lines()
        .rev()
        .find(|l| !l.starts_with("$ "))
        .unwrap_or_default()
        .trim()
        .to_string();
    if sha.len() < 40 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Failure::new(
            -1,
            format!("git rev-parse printed `{sha}`, not a commit sha"),
        ));
    }
    Ok(sha)
}

/// HEAD's sha and subject.
pub(super) async fn head(ctx: &mut StepCtx<'_>) -> Result<(String, String), Failure> {
    let (spec, dir) = git(ctx)?;
    let outcome = ctx
        .run(&spec.args(["log", "-1", "--no-color", "--format=%H %s"]))
        .await?;
    if !outcome.success() {
        let explained = explain(&outcome.stderr_text(), &dir);
        return Err(Failure::exited(&outcome, "git log -1", explained));
    }
    let text = outcome.output_text();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.starts_with("$ ") && !l.trim().is_empty())
        .unwrap_or_default();
    let (sha, subject) = line.split_once(' ').unwrap_or((line, ""));
    Ok((sha.trim().to_string(), subject.trim().to_string()))
}

/// HEAD before a checkout; `None` when it cannot be read (e.g. a repository without commits),
/// which does not stop the checkout. A timeout or cancel still ends the step.
async fn head_before(ctx: &mut StepCtx<'_>) -> Result<Option<(String, String)>, Failure> {
    match head(ctx).await {
        Ok(h) => Ok(Some(h)),
        Err(f) if f.status == StepStatus::Failed => {
            ctx.say(&format!(
                "HEAD could not be read before the checkout: {}",
                f.error
            ));
            Ok(None)
        }
        Err(f) => Err(f),
    }
}

/// The two full shas of `rev-parse` printing HEAD and then the revision, and nothing else.
/// Anything more (a range prints two lines for its one argument, an exclusion starts with
/// `^`, git may warn) is `None`: the caller then resolves the revision strictly on its own.
fn head_and_revision(output: &str) -> Option<(String, String)> {
    let is_sha = |l: &str| matches!(l.len(), 40 | 64) && l.chars().all(|c| c.is_ascii_hexdigit());
    let mut lines = output
        .lines()
        .filter(|l| !l.starts_with("$ "))
        .map(str::trim)
        .filter(|l| !l.is_empty());
    match (lines.next(), lines.next(), lines.next()) {
        (Some(head), Some(sha), None) if is_sha(head) && is_sha(sha) => {
            Some((head.to_string(), sha.to_string()))
        }
        _ => None,
    }
}

/// The revision's sha and HEAD's before a checkout, in one `git` process when it can:
/// `rev-parse --revs-only --end-of-options HEAD REV^{commit} --` (revisions only: nothing
/// is read as a path or an option). When that fails or prints anything but two shas (an
/// unborn HEAD, an unknown revision, a range), the revision is resolved strictly with
/// `--verify` and HEAD read on its own, which also gives the exact error.
async fn resolve_with_head(
    revision: &str,
    ctx: &mut StepCtx<'_>,
) -> Result<(String, Option<String>), Failure> {
    let (spec, _) = git(ctx)?;
    let spec = spec
        .args(["rev-parse", "--revs-only", "--end-of-options", "HEAD"])
        .arg(format!("{revision}^{{commit}}"))
        .arg("--");
    let outcome = ctx.run(&spec).await?;
    if outcome.success()
        && let Some((head, sha)) = head_and_revision(&outcome.output_text())
    {
        ctx.say(&format!("{revision} is commit {sha}"));
        return Ok((sha, Some(head)));
    }
    let sha = resolve(revision, ctx).await?;
    ctx.say(&format!("{revision} is commit {sha}"));
    let before = head_before(ctx).await?;
    Ok((sha, before.map(|(head, _)| head)))
}

pub(super) async fn checkout(revision: &str, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let (sha, before) = resolve_with_head(revision, ctx).await?;
    ctx.fact(fact::FROM_SHA, before.clone().unwrap_or_default());
    if before.as_deref() == Some(sha.as_str()) {
        // Read again for its subject: the rare path, a checkout has none to pay for.
        let (now, subject) = head(ctx).await?;
        if now != sha {
            let dir = git(ctx)?.1;
            return Err(Failure::new(
                -1,
                format!(
                    "HEAD of {dir} moved while the step read it (from {sha} to {now}); something else changes this working tree: stop it, then retry"
                ),
            ));
        }
        ctx.say(&format!("already at {sha}; nothing to check out"));
        ctx.fact(fact::SHA, sha);
        ctx.fact(fact::SUBJECT, subject);
        ctx.fact(fact::CHANGED, "false");
        return Ok(());
    }
    let (spec, dir) = git(ctx)?;
    let outcome = ctx
        .run(&spec.args(["checkout", "--quiet", "--detach", &sha, "--"]))
        .await?;
    if !outcome.success() {
        let explained = explain(&outcome.stderr_text(), &dir);
        return Err(Failure::exited(
            &outcome,
            &format!("git checkout {sha}"),
            explained,
        ));
    }
    let (now, subject) = head(ctx).await?;
    if now != sha {
        return Err(Failure::new(
            -1,
            format!("after checkout HEAD is {now}, expected {sha}"),
        ));
    }
    ctx.say(&format!("HEAD is now {sha} {subject}"));
    ctx.fact(fact::SHA, sha);
    ctx.fact(fact::SUBJECT, subject);
    ctx.fact(fact::CHANGED, "true");
    Ok(())
}

/// `git.resolve {revision}`: read-only; the revision's full sha and HEAD's.
pub(super) async fn resolve_only(revision: &str, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let sha = resolve(revision, ctx).await?;
    let (head_sha, head_subject) = head(ctx).await?;
    ctx.say(&format!(
        "{revision} is commit {sha}; HEAD is {head_sha} {head_subject}; nothing was changed"
    ));
    ctx.fact(fact::SHA, sha);
    ctx.fact(fact::HEAD, head_sha);
    ctx.fact("head_subject", head_subject);
    Ok(())
}

pub(super) async fn log(count: u32, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let (spec, dir) = git(ctx)?;
    let outcome = ctx
        .run(
            &spec
                .args(["log", "--oneline", "--no-color", "--decorate=short"])
                .arg(format!("-{count}")),
        )
        .await?;
    if !outcome.success() {
        let explained = explain(&outcome.stderr_text(), &dir);
        return Err(Failure::exited(&outcome, "git log", explained));
    }
    let (sha, subject) = head(ctx).await?;
    ctx.fact(fact::SHA, sha);
    ctx.fact(fact::SUBJECT, subject);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{explain, head_and_revision};

    #[test]
    fn only_two_shas_and_nothing_else_resolve_in_one_process() {
        let head = "791c0ce2ab60aa2e4467e24daa05b4b872a91442";
        let rev = "299bd28879c0ad7890de0602ec7ca4883c90abe6";
        let echo = "$ git rev-parse --revs-only --end-of-options HEAD v1^{commit} --";
        assert_eq!(
            head_and_revision(&format!("{echo}\n{head}\n{rev}\n")),
            Some((head.to_string(), rev.to_string()))
        );
        // A range prints three lines, an exclusion a `^sha`; a failed one stops after HEAD;
        // a warning is not a sha: every one of them goes the strict way instead.
        for hostile in [
            format!("{head}\n{head}\n^{rev}\n"),
            format!("{head}\n^{rev}\n"),
            format!("{head}\nfatal: bad revision 'x^{{commit}}'\n"),
            format!("warning: refname 'v1' is ambiguous.\n{head}\n{rev}\n"),
            format!("{head}\n{}\n", &rev[..39]),
            format!("{head}\n{rev}z\n"),
            String::new(),
        ] {
            assert_eq!(head_and_revision(&hostile), None, "{hostile}");
        }
    }

    #[test]
    fn explains_common_git_failures() {
        let dubious = "fatal: detected dubious ownership in repository at '/srv/app'";
        assert!(explain(dubious, "/srv/app").is_some_and(|m| m.contains("dubious ownership")));
        let dirty = "error: Your local changes to the following files would be overwritten by checkout:\n\tapp.py\nPlease commit your changes or stash them before you switch branches.";
        assert!(
            explain(dirty, "/srv/app")
                .is_some_and(|m| m.contains("uncommitted changes") && m.contains("app.py"))
        );
    }
}
