//! The runbook's typed actions: an allowlist compiled into the agent. `validate` turns a step
//! from the coordinator into an `Action` (or refuses it) before anything is spawned;
//! `execute` runs it against this host's profile. Every action is idempotent and says what it
//! found: a step whose end state already holds runs nothing and reports `changed=false`;
//! `alembic.resolve` and `git.resolve` are read-only (they pin targets at plan time).

mod alembic;
mod file;
mod git;
mod guard;
mod http;
mod logscan;
mod postgres;
mod service;
pub mod smoke;
pub mod snapshot;
pub mod trust;
pub mod validate;

pub use file::{FileError, Ownership, Symlinks, read_regular, sha256_hex};
pub use logscan::log_size;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use rollback_common::output_cap::OutputCap;
use rollback_common::proto::{Step, StepStatus};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::exec::{self, Ending, OutputSink, ProcessOutcome, ProcessSpec};

/// Every action this agent can run, as sent in Hello.
pub use rollback_common::runbook::ACTIONS;

/// A validated action with typed parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Service(service::Verb),
    AlembicDowngrade(alembic::Target),
    AlembicCurrent,
    AlembicResolve {
        steps: u32,
    },
    PostgresRestore {
        backup: PathBuf,
    },
    PostgresBackup,
    GitCheckout {
        revision: String,
    },
    GitResolve {
        revision: String,
    },
    GitLog {
        count: u32,
    },
    FileRestore {
        snapshot: Option<String>,
    },
    HttpCheck(http::Check),
    StateRead,
    SnapshotTake {
        id: String,
        label: String,
    },
    PostgresVerify {
        backup: PathBuf,
    },
    LogScan {
        patterns: Vec<String>,
    },
    SmokeRun {
        rounds: u32,
    },
    GuardSample {
        rounds: u32,
        log_offset: Option<u64>,
    },
}

/// Why a step was refused before anything ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub action: String,
    pub param: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.param {
            Some(p) => write!(f, "{}: parameter `{p}`: {}", self.action, self.reason),
            None => write!(f, "{}: {}", self.action, self.reason),
        }
    }
}

struct Params<'a> {
    action: &'a str,
    map: &'a HashMap<String, String>,
    used: Vec<&'static str>,
}

impl<'a> Params<'a> {
    fn refuse(&self, param: Option<&str>, reason: impl Into<String>) -> Refusal {
        Refusal {
            action: self.action.to_string(),
            param: param.map(String::from),
            reason: reason.into(),
        }
    }

    fn get(&mut self, name: &'static str) -> Option<&'a str> {
        self.used.push(name);
        self.map.get(name).map(String::as_str)
    }

    fn check<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, Refusal> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => f(v).map(Some).map_err(|reason| {
                let shown: String = v.chars().take(80).collect();
                self.refuse(
                    Some(name),
                    format!(
                        "`{}`{} {reason}",
                        shown.escape_default(),
                        if v.len() > 80 { "…" } else { "" }
                    ),
                )
            }),
        }
    }

    fn finish(self) -> Result<(), Refusal> {
        let mut unknown: Vec<&String> = self
            .map
            .keys()
            .filter(|k| !self.used.contains(&k.as_str()))
            .collect();
        unknown.sort();
        match unknown.first() {
            Some(k) => Err(self.refuse(Some(k), format!("is not a parameter of {}", self.action))),
            None => Ok(()),
        }
    }
}

fn missing_section(action: &str, section: &str) -> Refusal {
    Refusal {
        action: action.to_string(),
        param: None,
        reason: format!("this host's agent.toml has no {section}, so the action cannot run here"),
    }
}

/// The required `backup` parameter: a plain file name inside `[postgres] backup_dir`.
fn backup_param(p: &mut Params<'_>, config: &Config) -> Result<PathBuf, Refusal> {
    let pg = config
        .postgres
        .as_ref()
        .ok_or_else(|| missing_section(p.action, "[postgres]"))?;
    p.check("backup", |v| validate::backup_file(v, &pg.backup_dir))?
        .ok_or_else(|| {
            p.refuse(
                Some("backup"),
                "is required: the file name of a backup in the backup dir",
            )
        })
}

/// The required `revision` parameter of a git action (needs `[app]`).
fn revision_param(p: &mut Params<'_>, config: &Config, what: &str) -> Result<String, Refusal> {
    config
        .app
        .as_ref()
        .ok_or_else(|| missing_section(p.action, "[app]"))?;
    p.check("revision", |v| {
        validate::revision(v).map(|()| v.to_string())
    })?
    .ok_or_else(|| p.refuse(Some("revision"), format!("is required: {what}")))
}

/// Makes `spec` run as the one user who controls `paths` (see `trust::controller`): the
/// program's code and directory. Its working directory becomes the real path that was checked
/// (a link on the way could be changed after the check). Returns whether it runs as another
/// user than the agent's.
fn as_controller_of(
    mut spec: ProcessSpec,
    paths: &[(&std::path::Path, &str)],
) -> Result<(ProcessSpec, bool), Failure> {
    let (who, reals) = trust::controller_of_all(paths).map_err(|e| Failure::new(-1, e))?;
    if let Some(real) = paths
        .iter()
        .zip(&reals)
        .find_map(|((p, _), real)| (*p == spec.cwd).then_some(real))
    {
        spec.cwd = real.clone();
    }
    match who {
        Some((uid, gid)) => Ok((spec.run_as(uid, gid), true)),
        None => Ok((spec, false)),
    }
}

/// Checks a step against the allowlist and this host's profile. Spawns nothing.
pub fn validate(step: &Step, config: &Config) -> Result<Action, Refusal> {
    let name = step.action.as_str();
    let mut p = Params {
        action: name,
        map: &step.params,
        used: Vec::new(),
    };
    let action = match name {
        "service.stop" | "service.start" | "service.restart" | "service.status" => {
            config
                .service
                .as_ref()
                .ok_or_else(|| missing_section(name, "[service]"))?;
            Action::Service(service::Verb::from_action(name))
        }
        "alembic.downgrade" => {
            config
                .alembic
                .as_ref()
                .ok_or_else(|| missing_section(name, "[alembic]"))?;
            let steps = p.check("steps", |v| validate::count(v, 20))?;
            let to = p.check("to_revision", |v| {
                validate::alembic_revision(v).map(|()| v.to_string())
            })?;
            match (steps, to) {
                (Some(_), Some(_)) => {
                    return Err(p.refuse(None, "give `steps` or `to_revision`, not both"));
                }
                (Some(n), None) => Action::AlembicDowngrade(alembic::Target::Steps(n)),
                (None, Some(rev)) => Action::AlembicDowngrade(alembic::Target::Revision(rev)),
                (None, None) => Action::AlembicDowngrade(alembic::Target::Steps(1)),
            }
        }
        "alembic.current" => {
            config
                .alembic
                .as_ref()
                .ok_or_else(|| missing_section(name, "[alembic]"))?;
            Action::AlembicCurrent
        }
        "alembic.resolve" => {
            config
                .alembic
                .as_ref()
                .ok_or_else(|| missing_section(name, "[alembic]"))?;
            let steps = p.check("steps", |v| validate::count(v, 20))?.unwrap_or(1);
            Action::AlembicResolve { steps }
        }
        "postgres.restore" => Action::PostgresRestore {
            backup: backup_param(&mut p, config)?,
        },
        "postgres.backup" => {
            config
                .postgres
                .as_ref()
                .ok_or_else(|| missing_section(name, "[postgres]"))?;
            Action::PostgresBackup
        }
        "git.checkout" => Action::GitCheckout {
            revision: revision_param(&mut p, config, "the commit to check out")?,
        },
        "git.resolve" => Action::GitResolve {
            revision: revision_param(&mut p, config, "the commit to resolve")?,
        },
        "git.log" => {
            config
                .app
                .as_ref()
                .ok_or_else(|| missing_section(name, "[app]"))?;
            let count = p.check("count", |v| validate::count(v, 100))?.unwrap_or(10);
            Action::GitLog { count }
        }
        "file.restore" => {
            let app = config
                .app
                .as_ref()
                .ok_or_else(|| missing_section(name, "[app]"))?;
            if app.env_file.is_none() {
                return Err(missing_section(name, "app.env_file and app.env_backup"));
            }
            p.check("file", |v| {
                if v == "env" {
                    Ok(())
                } else {
                    Err("only `env` (app.env_backup → app.env_file) can be restored".into())
                }
            })?;
            let snapshot = p.check("snapshot", |v| {
                if !snapshot::valid_id(v) {
                    return Err("is not a snapshot id".into());
                }
                snapshot::env_copy(&config.state_dir, v)
                    .map(|_| v.to_string())
                    .ok_or_else(|| "names no snapshot with an env copy on this host".into())
            })?;
            Action::FileRestore { snapshot }
        }
        "http.check" => {
            let app = config
                .app
                .as_ref()
                .ok_or_else(|| missing_section(name, "[app]"))?;
            if app.health_base_url.is_none() {
                return Err(missing_section(name, "app.health_base_url"));
            }
            let endpoint = p
                .check("endpoint", |v| {
                    validate::endpoint(v).map(|()| v.to_string())
                })?
                .unwrap_or_else(|| "/healthz".into());
            let expect = p.check("expect", |v| match validate::number(v) {
                Ok(code) if (100..=599).contains(&code) => Ok(code as u16),
                _ => Err("must be an HTTP status code (100-599)".into()),
            })?;
            let retries = p.check("retries", |v| {
                if v == "0" {
                    Ok(0)
                } else {
                    validate::count(v, 600)
                }
            })?;
            let interval = p.check("interval_ms", |v| match validate::number(v) {
                Ok(ms) if (50..=60_000).contains(&ms) => Ok(ms),
                _ => Err("must be between 50 and 60000 milliseconds".into()),
            })?;
            Action::HttpCheck(http::Check {
                endpoint,
                expect: expect.unwrap_or(200),
                retries: retries.unwrap_or(30),
                interval: Duration::from_millis(interval.unwrap_or(500)),
            })
        }
        "state.read" => Action::StateRead,
        "snapshot.take" => {
            let id = p
                .check("id", |v| {
                    if snapshot::valid_id(v) {
                        Ok(v.to_string())
                    } else {
                        Err("must be 1-64 of [A-Za-z0-9_-]".into())
                    }
                })?
                .ok_or_else(|| p.refuse(Some("id"), "is required"))?;
            let label = p
                .check("label", |v| {
                    if v.len() <= 200 && !v.chars().any(char::is_control) {
                        Ok(v.to_string())
                    } else {
                        Err("must be at most 200 printable characters".into())
                    }
                })?
                .unwrap_or_default();
            Action::SnapshotTake { id, label }
        }
        "postgres.verify" => Action::PostgresVerify {
            backup: backup_param(&mut p, config)?,
        },
        "log.scan" => {
            let app = config
                .app
                .as_ref()
                .ok_or_else(|| missing_section(name, "[app]"))?;
            if app.log_file.is_none() {
                return Err(missing_section(name, "app.log_file"));
            }
            let patterns = p
                .check("patterns", validate::patterns)?
                .unwrap_or_else(logscan::default_patterns);
            Action::LogScan { patterns }
        }
        "guard.sample" => {
            let rounds = p
                .check("rounds", |v| validate::count(v, guard::MAX_ROUNDS))?
                .unwrap_or(1);
            let log_offset = p.check("log_offset", validate::number)?;
            Action::GuardSample { rounds, log_offset }
        }
        "smoke.run" => {
            let rounds = p
                .check("rounds", |v| validate::count(v, smoke::MAX_ROUNDS))?
                .unwrap_or(1);
            Action::SmokeRun { rounds }
        }
        other => {
            return Err(Refusal {
                action: other.to_string(),
                param: None,
                reason: format!(
                    "is not an action this agent knows; known actions: {}",
                    ACTIONS.join(", ")
                ),
            });
        }
    };
    p.finish()?;
    Ok(action)
}

/// What a step produced.
#[derive(Debug)]
pub struct StepResult {
    pub status: StepStatus,
    pub exit_code: i32,
    pub error: String,
    pub output: OutputCap,
    pub facts: BTreeMap<String, String>,
}

/// What an action needs while it runs.
pub struct StepCtx<'a> {
    pub config: &'a Config,
    pub sink: &'a mut dyn OutputSink,
    pub cancel: &'a CancellationToken,
    pub timeout: Duration,
    /// Size of the app log when the run began (for `log.scan`).
    pub log_offset: Option<u64>,
    /// The agent's own HOME, passed to git so admins' safe.directory settings apply.
    pub home: Option<String>,
    output: OutputCap,
    facts: BTreeMap<String, String>,
}

impl<'a> StepCtx<'a> {
    pub fn new(
        config: &'a Config,
        sink: &'a mut dyn OutputSink,
        cancel: &'a CancellationToken,
        timeout: Duration,
    ) -> Self {
        Self {
            config,
            sink,
            cancel,
            timeout,
            log_offset: None,
            home: std::env::var("HOME").ok(),
            output: OutputCap::new(exec::KEPT_OUTPUT_BYTES),
            facts: BTreeMap::new(),
        }
    }

    fn kill_grace(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.timeouts.kill_grace_secs))
    }

    /// A process spec with this step's timeout.
    fn spec(&self, program: &std::path::Path, cwd: &std::path::Path) -> ProcessSpec {
        ProcessSpec::new(program, cwd, self.timeout, self.kill_grace())
    }

    /// Writes a line of the agent's own narration to the step's output.
    fn say(&mut self, line: &str) {
        let text = format!("{line}\n");
        self.sink.chunk(false, text.as_bytes());
        self.output.push(text.as_bytes());
    }

    /// Records a fact the step established; values are capped at 200 characters.
    fn fact(&mut self, k: &str, v: impl Into<String>) {
        let v: String = v.into();
        let v = if v.chars().count() > 200 {
            format!("{}…", v.chars().take(200).collect::<String>())
        } else {
            v
        };
        self.facts.insert(k.to_string(), v);
    }

    /// Runs a process, its output flowing into this step's output.
    async fn run(&mut self, spec: &ProcessSpec) -> Result<ProcessOutcome, Failure> {
        // A cancel between two processes of a step starts nothing more.
        if self.cancel.is_cancelled() {
            return Err(Failure {
                status: StepStatus::Cancelled,
                exit_code: -1,
                error: format!("cancelled before `{}` started", spec.display()),
            });
        }
        self.say(&format!("$ {}", spec.display()));
        let outcome = exec::run(spec, self.sink, self.cancel)
            .await
            .map_err(|e| Failure::new(-1, e.to_string()))?;
        self.output.push(&outcome.output.render());
        if outcome.killed_leftovers {
            self.say(&format!(
                "`{}` left processes behind (a background or setsid child); they were killed: nothing of a step outlives it",
                spec.program.display()
            ));
        }
        match outcome.ending {
            Ending::TimedOut => Err(Failure {
                status: StepStatus::TimedOut,
                exit_code: -1,
                error: format!(
                    "`{}` did not finish within {:?}; its process group was stopped",
                    spec.display(),
                    spec.timeout
                ),
            }),
            Ending::Cancelled => Err(Failure {
                status: StepStatus::Cancelled,
                exit_code: -1,
                error: "cancelled; the step's process group was stopped".into(),
            }),
            _ => Ok(outcome),
        }
    }
}

/// A failed step: status, exit code and an explanation for the operator.
#[derive(Debug)]
pub struct Failure {
    pub status: StepStatus,
    pub exit_code: i32,
    pub error: String,
}

impl Failure {
    fn new(exit_code: i32, error: impl Into<String>) -> Self {
        Self {
            status: StepStatus::Failed,
            exit_code,
            error: error.into(),
        }
    }

    /// A process that exited non-zero, explained by `explain` (or its last stderr line).
    fn exited(outcome: &ProcessOutcome, what: &str, explain: Option<String>) -> Self {
        let detail = explain.unwrap_or_else(|| {
            last_line(&outcome.stderr_text()).unwrap_or_else(|| "no error output".into())
        });
        Self::new(
            outcome.exit_code(),
            format!("{what} failed (exit {}): {detail}", outcome.exit_code()),
        )
    }
}

fn last_line(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty())
        .map(String::from)
}

/// Runs a validated action.
/// HEAD's sha and subject with one `git log -1` (the host's reported state; `git.log` would
/// run a second process for the history it also prints). `None` when it cannot be read.
pub async fn git_head(mut ctx: StepCtx<'_>) -> Option<(String, String)> {
    git::head(&mut ctx).await.ok()
}

pub async fn execute(action: &Action, mut ctx: StepCtx<'_>) -> StepResult {
    let result = match action {
        Action::Service(verb) => service::run(*verb, &mut ctx).await,
        Action::AlembicDowngrade(target) => alembic::downgrade(target, &mut ctx).await,
        Action::AlembicCurrent => alembic::current(&mut ctx).await.map(|_| ()),
        Action::AlembicResolve { steps } => alembic::resolve(*steps, &mut ctx).await,
        Action::PostgresRestore { backup } => postgres::restore(backup, &mut ctx).await,
        Action::PostgresBackup => postgres::backup(&mut ctx).await,
        Action::GitCheckout { revision } => git::checkout(revision, &mut ctx).await,
        Action::GitResolve { revision } => git::resolve_only(revision, &mut ctx).await,
        Action::GitLog { count } => git::log(*count, &mut ctx).await,
        Action::FileRestore { snapshot } => {
            let source = snapshot
                .as_ref()
                .and_then(|id| snapshot::env_copy(&ctx.config.state_dir, id));
            file::restore_env(source, &mut ctx).await
        }
        Action::StateRead => snapshot::state(&mut ctx).await,
        Action::SnapshotTake { id, label } => snapshot::take(id, label, &mut ctx).await,
        Action::PostgresVerify { backup } => postgres::verify(backup, &mut ctx).await,
        Action::HttpCheck(check) => http::run(check, &mut ctx).await,
        Action::LogScan { patterns } => logscan::run(patterns, &mut ctx).await,
        Action::SmokeRun { rounds } => smoke::run(*rounds, &mut ctx).await,
        Action::GuardSample { rounds, log_offset } => {
            guard::sample(*rounds, *log_offset, &mut ctx).await
        }
    };
    let (status, exit_code, error) = match result {
        Ok(()) => (StepStatus::Succeeded, 0, String::new()),
        Err(f) => {
            ctx.say(&format!("error: {}", f.error));
            (f.status, f.exit_code, f.error)
        }
    };
    StepResult {
        status,
        exit_code,
        error,
        output: ctx.output,
        facts: ctx.facts,
    }
}

/// The timeout for a step: what the step asks (capped), else the host's per-action default.
pub fn timeout_for(step: &Step, config: &Config) -> Duration {
    let t = &config.timeouts;
    let secs = if step.timeout_secs > 0 {
        step.timeout_secs.min(t.max_secs)
    } else {
        t.actions
            .get(&step.action)
            .copied()
            .unwrap_or(t.default_secs)
    };
    Duration::from_secs(u64::from(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        toml::from_str(&format!(
            "host_id = \"h1\"\ncoordinator = \"https://127.0.0.1:1\"\nstate_dir = \"/nonexistent\"\n[tls]\nca = \"x\"\ncert = \"x\"\nkey = \"x\"\n{extra}"
        ))
        .expect("config")
    }

    fn step(action: &str, params: &[(&str, &str)]) -> Step {
        Step::new(action, params)
    }

    #[test]
    fn the_resolve_actions_are_validated_like_the_actions_they_pin() {
        let full = config(
            "[app]\ndir = \"/srv/app\"\n[alembic]\nbinary = \"/usr/bin/alembic\"\nworkdir = \"/srv/app\"\n",
        );
        assert_eq!(
            validate(&step("alembic.resolve", &[]), &full),
            Ok(Action::AlembicResolve { steps: 1 })
        );
        assert_eq!(
            validate(&step("alembic.resolve", &[("steps", "20")]), &full),
            Ok(Action::AlembicResolve { steps: 20 })
        );
        for bad in ["0", "21", "-1", "x"] {
            let r =
                validate(&step("alembic.resolve", &[("steps", bad)]), &full).expect_err("refused");
            assert_eq!(r.param.as_deref(), Some("steps"), "{r}");
        }
        let r = validate(&step("alembic.resolve", &[("to_revision", "0001")]), &full)
            .expect_err("refused");
        assert!(r.to_string().contains("is not a parameter"), "{r}");

        assert_eq!(
            validate(&step("git.resolve", &[("revision", "v2")]), &full),
            Ok(Action::GitResolve {
                revision: "v2".into()
            })
        );
        for bad in ["--upload-pack=x", "HEAD;id", "$(id)", ""] {
            let r =
                validate(&step("git.resolve", &[("revision", bad)]), &full).expect_err("refused");
            assert!(
                r.to_string()
                    .starts_with("git.resolve: parameter `revision`"),
                "{r}"
            );
        }
        let r = validate(&step("git.resolve", &[]), &full).expect_err("refused");
        assert!(r.to_string().contains("is required"), "{r}");

        let bare = config("");
        for action in ["alembic.resolve", "git.resolve"] {
            let r = validate(&step(action, &[("revision", "v1")]), &bare).expect_err("refused");
            assert!(r.to_string().contains("has no"), "{r}");
        }
        for action in ["alembic.resolve", "git.resolve"] {
            assert!(ACTIONS.contains(&action));
        }
    }
}
