//! `alembic.downgrade {steps | to_revision}`, `alembic.current` and `alembic.resolve {steps}`,
//! run with the host's alembic binary and config in its working directory, with only the
//! environment `[alembic.env]` gives. A downgrade to the revision the database is already at
//! runs nothing; `alembic.resolve` is read-only (it walks `alembic history` down from the
//! current revision, so a coordinator can pin an exact target at plan time).

use rollback_common::jobs::fact;
use std::collections::{HashMap, HashSet};

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
    if output.contains("Destination") && output.contains("not a valid downgrade target") {
        return Some(
            "alembic refuses the target: the database is already at base, has fewer revisions than asked, or the target is not below the current revision (that would be an upgrade); nothing was changed"
                .into(),
        );
    }
    if output.contains("didn't produce") && output.contains("migrations") {
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

/// `alembic -c CONFIG` in the workdir with the profile's environment.
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
    // alembic runs the workdir's Python (env.py, the migrations) with its own binary: as the
    // user who controls them when that is not the agent's, so editing them gains nothing.
    let config = a.workdir.join(&a.config);
    let mut paths = vec![
        (a.workdir.as_path(), "alembic.workdir"),
        (a.binary.as_path(), "alembic.binary"),
    ];
    // A missing config is alembic's to report.
    if config.exists() {
        paths.push((config.as_path(), "alembic.config"));
    }
    let (spec, _) = super::as_controller_of(spec, &paths)?;
    Ok(spec
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1"))
}

fn shown(revision: &str) -> &str {
    if revision.is_empty() {
        "base"
    } else {
        revision
    }
}

/// Runs `alembic current` and returns the revision ("" at base), recording no fact.
async fn read_current(ctx: &mut StepCtx<'_>) -> Result<String, Failure> {
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
    ctx.say(&format!(
        "alembic current: {}",
        if revision.is_empty() {
            "base (no revision)"
        } else {
            revision.as_str()
        }
    ));
    Ok(revision)
}

/// Runs `alembic current`, records it as fact `revision` and returns it ("" at base).
pub(super) async fn current(ctx: &mut StepCtx<'_>) -> Result<String, Failure> {
    let revision = read_current(ctx).await?;
    ctx.fact(fact::REVISION, revision.clone());
    Ok(revision)
}

/// Runs `alembic history` and parses it.
async fn read_history(ctx: &mut StepCtx<'_>) -> Result<History, Failure> {
    let spec = alembic(ctx)?.arg("history");
    let outcome = ctx.run(&spec).await?;
    if !outcome.success() {
        return Err(Failure::exited(
            &outcome,
            "alembic history",
            explain(&outcome.output_text()),
        ));
    }
    Ok(History::parse(&outcome.output_text()))
}

/// One revision of `alembic history`: its id and its down revisions (none at base, two or
/// more at a merge point).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub id: String,
    pub down: Vec<String>,
}

/// The revision graph as `alembic history` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    revisions: HashMap<String, Vec<String>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses one line of `alembic history` (not verbose):
/// `DOWN -> REV[ (labels)][ (head)][ (branchpoint)][ (mergepoint)], message` where DOWN is
/// `<base>`, one revision, or `a, b` at a merge point, optionally followed by ` (dependencies)`.
/// Anything else (log lines, a message's continuation lines) gives `None`.
pub fn parse_history_line(line: &str) -> Option<Revision> {
    let (left, right) = line.trim().split_once(" -> ")?;
    // `DOWN (dep1, dep2)`: dependencies are not down revisions.
    let left = match left.split_once(" (") {
        Some((down, deps)) if deps.ends_with(')') => down,
        Some(_) => return None,
        None => left,
    };
    let down = if left == "<base>" {
        Vec::new()
    } else {
        let down: Vec<String> = left.split(", ").map(str::to_string).collect();
        if !down.iter().all(|d| valid_id(d)) {
            return None;
        }
        down
    };
    let end = right.find([' ', ',']).unwrap_or(right.len());
    let (id, rest) = right.split_at(end);
    if !valid_id(id) || !(rest.is_empty() || rest.starts_with(" (") || rest.starts_with(',')) {
        return None;
    }
    Some(Revision {
        id: id.to_string(),
        down,
    })
}

impl History {
    pub fn parse(text: &str) -> Self {
        let mut revisions = HashMap::new();
        for r in text.lines().filter_map(parse_history_line) {
            // The first line naming a revision wins (a message's continuation line that
            // happens to look like an entry cannot override it).
            revisions.entry(r.id).or_insert(r.down);
        }
        Self { revisions }
    }

    pub fn is_empty(&self) -> bool {
        self.revisions.is_empty()
    }

    fn down(&self, id: &str) -> Option<&[String]> {
        self.revisions.get(id).map(Vec::as_slice)
    }

    /// The full id `rev` names: itself if listed, else the one listed id it is a prefix of.
    pub fn find(&self, rev: &str) -> Option<String> {
        if self.revisions.contains_key(rev) {
            return Some(rev.to_string());
        }
        let mut matches = self.revisions.keys().filter(|k| k.starts_with(rev));
        match (matches.next(), matches.next()) {
            (Some(one), None) => Some(one.clone()),
            _ => None,
        }
    }

    /// Whether `ancestor` is reachable going down from `from` (`base` always is).
    pub fn is_below(&self, from: &str, ancestor: &str) -> bool {
        if ancestor == "base" {
            return true;
        }
        let mut seen = HashSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(rev) = todo.pop() {
            for d in self.down(&rev).unwrap_or_default() {
                if d == ancestor {
                    return true;
                }
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        false
    }

    /// Walks `steps` revisions down from `current` by down revision. Returns the target
    /// (`base` when the walk ends just below the first revision) and the path walked,
    /// `current` first.
    pub fn walk_down(&self, current: &str, steps: u32) -> Result<(String, Vec<String>), String> {
        let what = format!("cannot resolve {steps} step(s) below the current revision");
        if current.is_empty() {
            return Err(format!(
                "{what}: the database is at base (no revision); there is nothing below it"
            ));
        }
        if self.down(current).is_none() {
            return Err(format!(
                "{what} {current}: `alembic history` does not list {current} (is the code checked out at a release that has it?)"
            ));
        }
        let mut path = vec![current.to_string()];
        let mut rev = current.to_string();
        for taken in 0..steps {
            let down = self.down(&rev).ok_or_else(|| {
                format!(
                    "{what} {current}: `alembic history` does not list {rev} (reached after {taken} step(s))"
                )
            })?;
            match down {
                [] if taken + 1 == steps => {
                    path.push("base".into());
                    return Ok(("base".into(), path));
                }
                [] => {
                    return Err(format!(
                        "{what} {current}: only {} revision(s) are below it, down to base",
                        taken + 1
                    ));
                }
                [one] => {
                    rev = one.clone();
                    path.push(rev.clone());
                }
                several => {
                    return Err(format!(
                        "{what} {current}: {rev} is a merge point of {}; which branch to go down is ambiguous (give to_revision instead)",
                        several.join(", ")
                    ));
                }
            }
        }
        Ok((rev, path))
    }
}

/// `alembic.resolve {steps}`: read-only; which revision `steps` downgrades would reach.
pub(super) async fn resolve(steps: u32, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let current = read_current(ctx).await?;
    ctx.fact(fact::CURRENT, current.clone());
    let history = read_history(ctx).await?;
    let (target, path) = history
        .walk_down(&current, steps)
        .map_err(|e| Failure::new(-1, e))?;
    let path = path.join(" → ");
    ctx.say(&format!(
        "{steps} step(s) below {} is {target} ({path}); nothing was changed",
        shown(&current)
    ));
    ctx.fact(fact::TARGET, target);
    ctx.fact("path", path);
    Ok(())
}

/// Checks a `to_revision` downgrade before running it: the target must be below `current`.
/// `Ok(false)` when it is, or when the history cannot tell (alembic then decides); `Ok(true)`
/// when `rev` is an abbreviation of `current` (nothing to do).
async fn check_target(current: &str, rev: &str, ctx: &mut StepCtx<'_>) -> Result<bool, Failure> {
    let refuse = |why: String| {
        Failure::new(
            -1,
            format!(
                "cannot downgrade from {} to {rev}: {why}; nothing was changed",
                shown(current)
            ),
        )
    };
    if current.is_empty() {
        return Err(refuse(
            "the database is at base, so that would be an upgrade".into(),
        ));
    }
    if rev == "base" {
        return Ok(false);
    }
    let history = match read_history(ctx).await {
        Ok(h) if !h.is_empty() && h.find(current).is_some() => h,
        Ok(_) => {
            ctx.say("alembic history does not list the current revision; alembic decides");
            return Ok(false);
        }
        Err(f) if f.status == rollback_common::proto::StepStatus::Failed => {
            ctx.say(&format!(
                "alembic history is not usable ({}); alembic decides",
                f.error
            ));
            return Ok(false);
        }
        Err(f) => return Err(f),
    };
    let Some(full) = history.find(rev) else {
        return Err(refuse(format!(
            "`alembic history` does not list {rev} (is the code checked out at a release that has it?)"
        )));
    };
    if full == current {
        return Ok(true);
    }
    if !history.is_below(current, &full) {
        return Err(refuse(format!(
            "{full} is not below {current} (a downgrade to it would be an upgrade or a move to another branch)"
        )));
    }
    Ok(false)
}

pub(super) async fn downgrade(target: &Target, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let before = read_current(ctx).await?;
    ctx.fact(fact::FROM_REVISION, before.clone());
    let arg = match target {
        Target::Steps(n) => format!("-{n}"),
        Target::Revision(rev) => {
            let already = *rev == before
                || (rev == "base" && before.is_empty())
                || check_target(&before, rev, ctx).await?;
            if already {
                ctx.say(&format!("already at {rev}; nothing to downgrade"));
                ctx.fact(fact::REVISION, before);
                ctx.fact(fact::CHANGED, "false");
                return Ok(());
            }
            rev.clone()
        }
    };
    let spec = alembic(ctx)?.arg("downgrade").arg(&arg);
    let outcome = ctx.run(&spec).await?;
    if !outcome.success() {
        return Err(Failure::exited(
            &outcome,
            &format!("alembic downgrade {arg}"),
            explain(&outcome.output_text()),
        ));
    }
    let after = read_current(ctx).await?;
    ctx.say(&format!(
        "downgraded from {} to {}",
        shown(&before),
        shown(&after)
    ));
    ctx.fact(fact::REVISION, after);
    ctx.fact(fact::CHANGED, "true");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{History, Revision, explain, parse_history_line};

    #[test]
    fn explains_base_and_unreachable() {
        let base = "FAILED: Relative revision -1 didn't produce 1 migrations";
        assert!(explain(base).is_some_and(|m| m.contains("already at base")));
        let down = "sqlalchemy.exc.OperationalError: (psycopg2.OperationalError) connection to server at \"10.0.0.9\", port 5432 failed: Connection refused";
        assert!(explain(down).is_some_and(|m| m.contains("unreachable")));
        let up = "FAILED: Destination 0003 is not a valid downgrade target from current head(s)";
        assert!(explain(up).is_some_and(|m| m.contains("nothing was changed")
            && m.contains("already at base")));
    }

    fn rev(id: &str, down: &[&str]) -> Option<Revision> {
        Some(Revision {
            id: id.into(),
            down: down.iter().map(|d| d.to_string()).collect(),
        })
    }

    #[test]
    fn parses_history_lines() {
        assert_eq!(
            parse_history_line("0002 -> 0003 (head), add audits"),
            rev("0003", &["0002"])
        );
        assert_eq!(
            parse_history_line("<base> -> 0001, initial schema"),
            rev("0001", &[])
        );
        assert_eq!(
            parse_history_line("a1b2, c3d4 -> e5f6 (head) (mergepoint), merge heads"),
            rev("e5f6", &["a1b2", "c3d4"])
        );
        assert_eq!(
            parse_history_line("0001 -> 0002 (branchpoint), split"),
            rev("0002", &["0001"])
        );
        assert_eq!(
            parse_history_line("0001 (dep9) -> 0002 (feature) (head), with a dependency"),
            rev("0002", &["0001"])
        );
        assert_eq!(
            parse_history_line("0001 -> 0002 (head) (current), doc, with -> arrows"),
            rev("0002", &["0001"])
        );
        assert_eq!(parse_history_line("0001 -> 0002"), rev("0002", &["0001"]));
        for junk in [
            "",
            "INFO  [alembic.runtime.migration] Running upgrade 0001 -> 0002, x",
            "Rev: 0002 (head)",
            "see the -> arrow",
            "0001 -> $(id), x",
        ] {
            assert_eq!(parse_history_line(junk), None, "{junk}");
        }
    }

    const LINEAR: &str = "0002 -> 0003 (head), add audits\n\
                          0001 -> 0002, add incidents\n\
                          <base> -> 0001, initial\n";

    #[test]
    fn walks_down_a_linear_history() {
        let h = History::parse(LINEAR);
        assert_eq!(
            h.walk_down("0003", 1),
            Ok(("0002".into(), vec!["0003".into(), "0002".into()]))
        );
        assert_eq!(
            h.walk_down("0003", 2).map(|(t, p)| (t, p.join(" → "))),
            Ok(("0001".into(), "0003 → 0002 → 0001".into()))
        );
        assert_eq!(h.walk_down("0003", 3).map(|(t, _)| t), Ok("base".into()));
        let e = h.walk_down("0003", 4).expect_err("must fail");
        assert!(
            e.contains("4 step(s)") && e.contains("0003") && e.contains("only 3"),
            "{e}"
        );
        let e = h.walk_down("", 1).expect_err("must fail");
        assert!(e.contains("at base") && e.contains("1 step(s)"), "{e}");
        let e = h.walk_down("0009", 1).expect_err("must fail");
        assert!(e.contains("does not list 0009"), "{e}");
    }

    #[test]
    fn a_merge_point_is_ambiguous_and_ancestry_follows_every_parent() {
        let h = History::parse(
            "b1, c1 -> m1 (head) (mergepoint), merge\n\
             a1 -> c1, branch c\n\
             a1 -> b1, branch b\n\
             <base> -> a1 (branchpoint), root\n",
        );
        let e = h.walk_down("m1", 1).expect_err("must fail");
        assert!(
            e.contains("merge point") && e.contains("m1") && e.contains("b1, c1"),
            "{e}"
        );
        assert_eq!(h.walk_down("b1", 1).map(|(t, _)| t), Ok("a1".into()));
        assert!(h.is_below("m1", "a1"));
        assert!(h.is_below("m1", "c1"));
        assert!(h.is_below("m1", "base"));
        assert!(!h.is_below("b1", "c1"), "another branch is not below");
        assert!(!h.is_below("a1", "m1"), "above is not below");
        assert_eq!(h.find("m"), Some("m1".into()));
        assert_eq!(h.find("x"), None);
        let h = History::parse("<base> -> ab12, one\nab12 -> ab34, two\n");
        assert_eq!(h.find("ab"), None, "ambiguous prefix");
        assert_eq!(h.find("ab3"), Some("ab34".into()));
    }

    /// A stand-in for alembic (test only): `current` prints the revision in `state`, `history`
    /// prints `history.txt`, `downgrade X` is logged and moves `state`.
    const FAKE_ALEMBIC: &str = r#"#!/bin/sh
shift 2
case "$1" in
current)
  echo "INFO  [alembic.runtime.migration] Context impl PostgresqlImpl." >&2
  cur=$(cat state)
  if [ -n "$cur" ]; then echo "$cur (head)"; fi ;;
history) cat history.txt ;;
downgrade)
  echo "$2" >> downgrades.log
  case "$2" in
  -1) cur=$(cat state); prev=$(grep -- "-> $cur[ ,]" history.txt | sed 's/ ->.*//')
      if [ "$prev" = "<base>" ]; then prev=""; fi; echo "$prev" > state ;;
  base) : > state ;;
  *) echo "$2" > state ;;
  esac ;;
esac
"#;

    struct Fake {
        dir: tempfile::TempDir,
        config: crate::config::Config,
    }

    fn fake(current: &str) -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("alembic");
        std::fs::write(&bin, FAKE_ALEMBIC).expect("write");
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        std::fs::write(dir.path().join("history.txt"), LINEAR).expect("write");
        std::fs::write(dir.path().join("state"), format!("{current}\n")).expect("write");
        let config = toml::from_str(&format!(
            "host_id = \"h1\"\ncoordinator = \"https://127.0.0.1:1\"\nstate_dir = \"{d}\"\n\
             [tls]\nca = \"x\"\ncert = \"x\"\nkey = \"x\"\n\
             [alembic]\nbinary = \"{d}/alembic\"\nworkdir = \"{d}\"\n",
            d = dir.path().display()
        ))
        .expect("config");
        Fake { dir, config }
    }

    impl Fake {
        async fn run(&self, action: &super::super::Action) -> super::super::StepResult {
            let cancel = tokio_util::sync::CancellationToken::new();
            let mut sink = crate::exec::NoSink;
            let ctx = super::super::StepCtx::new(
                &self.config,
                &mut sink,
                &cancel,
                std::time::Duration::from_secs(20),
            );
            super::super::execute(action, ctx).await
        }

        fn downgrades(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("downgrades.log")).unwrap_or_default()
        }

        fn current(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("state"))
                .unwrap_or_default()
                .trim()
                .to_string()
        }
    }

    fn to(rev: &str) -> super::super::Action {
        super::super::Action::AlembicDowngrade(super::Target::Revision(rev.into()))
    }

    fn fact<'a>(r: &'a super::super::StepResult, k: &str) -> &'a str {
        r.facts.get(k).map(String::as_str).unwrap_or("<missing>")
    }

    fn output(r: &super::super::StepResult) -> String {
        String::from_utf8_lossy(&r.output.render()).into_owned()
    }

    use rollback_common::proto::StepStatus;

    #[tokio::test]
    async fn a_downgrade_to_the_current_revision_runs_nothing() {
        let f = fake("0002");
        let r = f.run(&to("0002")).await;
        assert_eq!(r.status, StepStatus::Succeeded, "{}", r.error);
        assert!(output(&r).contains("already at 0002; nothing to downgrade"));
        assert_eq!(fact(&r, "changed"), "false");
        assert_eq!(fact(&r, "from_revision"), "0002");
        assert_eq!(fact(&r, "revision"), "0002");
        assert_eq!(f.downgrades(), "", "alembic downgrade never ran");

        let f = fake("");
        let r = f.run(&to("base")).await;
        assert_eq!(r.status, StepStatus::Succeeded, "{}", r.error);
        assert_eq!(fact(&r, "changed"), "false");
        assert_eq!(fact(&r, "revision"), "");
        assert_eq!(f.downgrades(), "");
    }

    #[tokio::test]
    async fn a_downgrade_reports_before_and_after_and_refuses_an_upgrade() {
        let f = fake("0003");
        let r = f.run(&to("0001")).await;
        assert_eq!(r.status, StepStatus::Succeeded, "{}", r.error);
        assert_eq!(fact(&r, "from_revision"), "0003");
        assert_eq!(fact(&r, "revision"), "0001", "the revision after");
        assert_eq!(fact(&r, "changed"), "true");
        assert_eq!(f.downgrades(), "0001\n");

        let r = f.run(&to("0003")).await;
        assert_eq!(r.status, StepStatus::Failed);
        assert!(
            r.error.contains("0001")
                && r.error.contains("0003")
                && r.error.contains("nothing was changed"),
            "{}",
            r.error
        );
        let r = f.run(&to("0009")).await;
        assert_eq!(r.status, StepStatus::Failed);
        assert!(r.error.contains("does not list 0009"), "{}", r.error);
        assert_eq!(f.downgrades(), "0001\n", "no further downgrade ran");
        assert_eq!(f.current(), "0001");

        let r = f
            .run(&super::super::Action::AlembicDowngrade(
                super::Target::Steps(1),
            ))
            .await;
        assert_eq!(r.status, StepStatus::Succeeded, "{}", r.error);
        assert_eq!(fact(&r, "from_revision"), "0001");
        assert_eq!(fact(&r, "revision"), "");
        assert_eq!(fact(&r, "changed"), "true");
    }

    #[tokio::test]
    async fn resolve_walks_history_and_changes_nothing() {
        let f = fake("0003");
        let r = f
            .run(&super::super::Action::AlembicResolve { steps: 2 })
            .await;
        assert_eq!(r.status, StepStatus::Succeeded, "{}", r.error);
        assert_eq!(fact(&r, "current"), "0003");
        assert_eq!(fact(&r, "target"), "0001");
        assert_eq!(fact(&r, "path"), "0003 → 0002 → 0001");
        let r = f
            .run(&super::super::Action::AlembicResolve { steps: 5 })
            .await;
        assert_eq!(r.status, StepStatus::Failed);
        assert!(
            r.error.contains("5 step(s)") && r.error.contains("0003"),
            "{}",
            r.error
        );
        assert_eq!(f.downgrades(), "", "resolve never downgrades");
        assert_eq!(f.current(), "0003");
    }
}
