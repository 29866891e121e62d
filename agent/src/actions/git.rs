//! `git.checkout {revision}`, `git.resolve {revision}` and `git.log` in the app's git working
//! tree. A revision is resolved to a full commit sha (`REV^{commit}`, revisions only, never a
//! path or an option) and checked out by that sha; a checkout of the commit HEAD already is
//! runs nothing. A checkout that moves HEAD runs two `git` processes: one `log --no-walk` for
//! the revision and HEAD together, then the checkout; one already there runs only the first.
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

/// A line of `--format=%H %s`: a full sha, then the subject (possibly empty).
fn sha_and_subject(line: &str) -> Option<(&str, &str)> {
    let (sha, subject) = line.split_once(' ').unwrap_or((line, ""));
    let full = matches!(sha.len(), 40 | 64) && sha.chars().all(|c| c.is_ascii_hexdigit());
    full.then_some((sha, subject.trim()))
}

/// HEAD's sha, the revision's sha and the revision's subject, from `git log --no-walk=unsorted
/// --format=%H %s HEAD REV^{commit}`: two lines, or one when HEAD is that commit, and nothing
/// else. Anything more (git may warn; a repository may configure extra output) is `None`: the
/// caller then resolves the revision strictly on its own.
fn head_and_revision(output: &str) -> Option<(String, String, String)> {
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| !l.starts_with("$ "))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let (head, target) = match lines.as_slice() {
        [only] => (sha_and_subject(only)?, sha_and_subject(only)?),
        [head, target] => (sha_and_subject(head)?, sha_and_subject(target)?),
        _ => return None,
    };
    Some((
        head.0.to_string(),
        target.0.to_string(),
        target.1.to_string(),
    ))
}

/// Where a checkout starts from: the revision's full sha, HEAD's (`None` when it cannot be
/// read) and the revision's subject when it is known before the checkout.
struct Resolved {
    sha: String,
    head: Option<String>,
    subject: Option<String>,
}

/// The revision and HEAD before a checkout, in one `git` process when it can: `log
/// --no-walk=unsorted --format=%H %s --end-of-options HEAD REV^{commit} --` (revisions only:
/// nothing is read as a path or an option, nothing is walked). When that fails or prints
/// anything else (an unborn HEAD, an unknown revision, `HEAD^-` which is a range), the
/// revision is resolved strictly with `rev-parse --verify` and HEAD read on its own, which
/// also gives the exact error.
async fn resolve_with_head(revision: &str, ctx: &mut StepCtx<'_>) -> Result<Resolved, Failure> {
    let (spec, _) = git(ctx)?;
    let spec = spec
        .args([
            "log",
            "--no-walk=unsorted",
            "--no-color",
            "--format=%H %s",
            "--end-of-options",
            "HEAD",
        ])
        .arg(format!("{revision}^{{commit}}"))
        .arg("--");
    let outcome = ctx.run(&spec).await?;
    if outcome.success()
        && let Some((head, sha, subject)) = head_and_revision(&outcome.output_text())
    {
        ctx.say(&format!("{revision} is commit {sha}"));
        return Ok(Resolved {
            sha,
            head: Some(head),
            subject: Some(subject),
        });
    }
    let sha = resolve(revision, ctx).await?;
    ctx.say(&format!("{revision} is commit {sha}"));
    let before = head_before(ctx).await?;
    // HEAD's subject is the revision's only when HEAD is that commit.
    let subject = before
        .as_ref()
        .filter(|(head, _)| *head == sha)
        .map(|(_, subject)| subject.clone());
    Ok(Resolved {
        sha,
        head: before.map(|(head, _)| head),
        subject,
    })
}

pub(super) async fn checkout(revision: &str, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let Resolved {
        sha,
        head: from,
        subject,
    } = resolve_with_head(revision, ctx).await?;
    ctx.fact(fact::FROM_SHA, from.clone().unwrap_or_default());
    if from.as_deref() == Some(sha.as_str()) {
        ctx.say(&format!("already at {sha}; nothing to check out"));
        ctx.fact(fact::SHA, sha);
        ctx.fact(fact::SUBJECT, subject.unwrap_or_default());
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
    // A checkout of a full sha that exits 0 has moved HEAD there; read back only when the
    // subject is still unknown (the strict path).
    let subject = match subject {
        Some(subject) => subject,
        None => {
            let (now, subject) = head(ctx).await?;
            if now != sha {
                return Err(Failure::new(
                    -1,
                    format!("after checkout HEAD is {now}, expected {sha}"),
                ));
            }
            subject
        }
    };
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
    fn only_head_and_the_revision_and_nothing_else_resolve_in_one_process() {
        let head = "791c0ce2ab60aa2e4467e24daa05b4b872a91442";
        let rev = "299bd28879c0ad7890de0602ec7ca4883c90abe6";
        let echo = "$ git log --no-walk=unsorted --no-color --format=%H %s --end-of-options HEAD v1^{commit} --";
        let parsed =
            |h: &str, r: &str, s: &str| Some((h.to_string(), r.to_string(), s.to_string()));
        assert_eq!(
            head_and_revision(&format!("{echo}\n{head} release two\n{rev} release one\n")),
            parsed(head, rev, "release one")
        );
        // HEAD is the revision: git prints the commit once.
        assert_eq!(
            head_and_revision(&format!("{head} release two\n")),
            parsed(head, head, "release two")
        );
        // A commit without a subject.
        assert_eq!(
            head_and_revision(&format!("{head} x\n{rev} \n")),
            parsed(head, rev, "")
        );
        // A warning, extra output a repository configured (a signature check), a third
        // commit, a failed run that printed nothing: every one goes the strict way instead.
        for hostile in [
            format!("warning: refname 'v1' is ambiguous.\n{head} a\n{rev} b\n"),
            format!("{head} a\ngpg: Signature made today\n{rev} b\n"),
            format!("{head} a\n{rev} b\n{rev} c\n"),
            format!("{head} a\n{} b\n", &rev[..39]),
            format!("{head} a\n{rev}z b\n"),
            "fatal: bad revision 'HEAD^-^{commit}'\n".to_string(),
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
