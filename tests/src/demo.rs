//! The fleet-rollback demo (`cargo xtask demo`, and the `lab_demo` suite that proves it):
//! boot a fleet lab of three app hosts and a database host, start the coordinator and an
//! agent on every host, take a last-known-good snapshot, deploy badly (a broken `.env`
//! everywhere and a bad release on one host), let `rollbackctl diagnose` find what changed,
//! roll it all back with one `rollbackctl rollback --to-snapshot latest` — canary first, live —
//! show every host healthy again and the incident report, tear down; narrated as it goes.
//!
//! Every command the story shows is really run, and its output is passed on as it comes.
//! A failure stops the story with an error naming the host and the command; the lab is torn
//! down in every case (also on Ctrl-C, see [`tear_down_on_interrupt`]).

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::lab::{APP_DIR, APP_UNIT, Lab, LabSpec};
use crate::lab_fleet::{AGENT_UNIT, LabFleet};

/// Name of the interactive demo's lab (the `lab_demo` suite uses its own).
pub const LAB_NAME: &str = "demo";
/// App hosts the demo boots (plus the database host).
pub const APP_HOSTS: usize = 3;
/// Units active on every app host at the end of the demo.
pub const APP_HOST_UNITS: &[&str] = &[APP_UNIT, AGENT_UNIT];
/// The host that also gets a bad release (the others only a bad `.env`).
pub const BAD_RELEASE_HOST: &str = "app3";
/// The rollback command the story runs.
pub const ROLLBACK_COMMAND: &[&str] = &[
    "rollback",
    "--to-snapshot",
    "latest",
    "--select",
    "role=web",
    "--reason",
    "bad deploy: broken .env everywhere, bad release on app3",
    "--yes",
];
/// Deadline for one `rollbackctl` command of the story.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agents may take to report the rolled-back state.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the interrupt watcher keeps removing the lab.
const INTERRUPT_TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// Held while a demo lab is being torn down, so an interrupt does not race the teardown.
static TEARDOWN: Mutex<()> = Mutex::new(());
/// Set when a signal arrived: the interrupt watcher removes the lab and exits, so the story
/// stays quiet about the failures that follow.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the demo runs the web console alongside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebUi {
    Off,
    /// `rollbackctl ui` on this machine's 127.0.0.1 (relayed into the lab), its URL printed.
    On,
    /// As `On`, for a person: the rollback waits [`UI_GRACE`] for them to open the URL, and
    /// the console and the lab stay up after the story until Ctrl-C.
    Interactive,
}

/// How long `cargo xtask demo --ui` waits for the browser before rolling back.
pub const UI_GRACE: Duration = Duration::from_secs(15);

/// Runs the interactive demo on lab [`LAB_NAME`], narrating to `out`.
pub fn run(out: &mut dyn Write, ui: WebUi) -> Result<()> {
    run_with(LAB_NAME, out, ui, |_, _| Ok(()))
}

/// Runs the demo on a lab named `lab_name`, narrating to `out`; `inspect` is called with the
/// lab and the web console's URL (with `ui`) once the story is told, before the teardown
/// (tests check the end state there).
pub fn run_with(
    lab_name: &str,
    out: &mut dyn Write,
    ui: WebUi,
    inspect: impl FnOnce(&Lab, Option<&str>) -> Result<()>,
) -> Result<()> {
    let result = boot_and_tell(lab_name, out, ui, inspect);
    if result.is_err() && INTERRUPTED.load(Ordering::SeqCst) {
        // The failure is the interrupt's doing: the interrupt watcher is removing the lab and
        // ends the process.
        loop {
            std::thread::park();
        }
    }
    result
}

fn boot_and_tell(
    lab_name: &str,
    out: &mut dyn Write,
    ui: WebUi,
    inspect: impl FnOnce(&Lab, Option<&str>) -> Result<()>,
) -> Result<()> {
    let mut story = Story::new(out);
    story.say(format!(
        "fleet-rollback demo: a bad deployment on a {APP_HOSTS}-host fleet, rolled back live"
    ))?;
    crate::lab::check_prerequisites()
        .map_err(|reason| anyhow::anyhow!("the demo cannot run: {reason}"))?;

    story.chapter(format!(
        "booting a {APP_HOSTS}-host fleet lab ({}, db) — each host a network namespace with its own systemd...",
        app_host_names().join(", ")
    ))?;
    let started = Instant::now();
    let lab = Lab::boot(LabSpec::new(lab_name).app_hosts(APP_HOSTS))
        .with_context(|| format!("booting the demo's lab {lab_name}"))?;
    let mut lab = Guarded(Some(lab));
    let lab_ref = lab.get()?;
    story.say(format!(
        "  lab {lab_name} up in {:.1}s on {}: the sample app deployed, /readyz 200 on every app host",
        started.elapsed().as_secs_f64(),
        lab_ref.subnet()
    ))?;
    for host in lab_ref.hosts() {
        story.say(format!(
            "    {:<5} {:<12} {:?}",
            host.id(),
            host.addr().to_string(),
            host.role()
        ))?;
    }

    let told = tell(lab_ref, &mut story, ui, inspect);
    if told.is_err() && INTERRUPTED.load(Ordering::SeqCst) {
        return told;
    }
    if let Err(e) = &told {
        story.say(format!(
            "\n✗ the demo failed: {e:#}\n  tearing down the lab..."
        ))?;
    }
    let down = lab.teardown();
    if let (Err(_), Err(d)) = (&told, &down) {
        story.say(format!("  ✗ the teardown failed too: {d:#}"))?;
    }
    told?;
    down?;
    story.say(format!(
        "  done in {:.1}s: agents and coordinator stopped; hosts, namespaces, cgroups and mounts removed",
        story.chapter_at.elapsed().as_secs_f64()
    ))?;
    story.say(format!(
        "\ndemo finished in {:.1}s: snapshot → bad deploy on {APP_HOSTS} hosts → diagnose → one rollback to the snapshot, canary first; every /readyz 200 again",
        story.started.elapsed().as_secs_f64()
    ))?;
    Ok(())
}

/// The story on a booted lab: the fleet, the breakage, the rollback, the check; then
/// `inspect`, and the fleet stopped (the caller removes the lab).
fn tell(
    lab: &Lab,
    story: &mut Story<'_>,
    ui: WebUi,
    inspect: impl FnOnce(&Lab, Option<&str>) -> Result<()>,
) -> Result<()> {
    let hosts = lab.app_host_ids();

    story.chapter(
        "starting the coordinator and an agent on every host (mTLS; certificates from `rollbackctl pki`)...",
    )?;
    let started = Instant::now();
    let fleet = Running(LabFleet::start(lab).context("starting the coordinator and the agents")?);
    story.say(format!(
        "  {} agents online in {:.1}s; agents dial out, hosts need no inbound port",
        lab.hosts().len(),
        started.elapsed().as_secs_f64()
    ))?;
    story.rollbackctl(&fleet, &["agents"])?;
    let console = match ui {
        WebUi::Off => None,
        WebUi::On | WebUi::Interactive => {
            story.chapter("the web console: `rollbackctl ui`, with the operator's certificate")?;
            let console = web_console(lab, &fleet)?;
            story.say(format!(
                "  open {}\n  (this machine only; the token in the URL is the key)",
                console.url
            ))?;
            Some(console)
        }
    };

    story.chapter("before deploying: every web host records its last-known-good state")?;
    story.rollbackctl(
        &fleet,
        &[
            "snapshot",
            "--select",
            "role=web",
            "--label",
            "before the v3 deploy",
        ],
    )?;

    story.chapter(format!(
        "a bad deployment: a broken .env (empty DATABASE_URL, FEATURE_REPORTS=maybe) on {}, and release v3 on {BAD_RELEASE_HOST}",
        hosts.join(", ")
    ))?;
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let broken = lab
        .bad_config(&host_refs)
        .context("breaking the deployment")?;
    story.say(format!("  {}", broken.detail))?;
    let released = lab
        .bad_release(&[BAD_RELEASE_HOST])
        .context("deploying a bad release")?;
    story.say(format!("  {BAD_RELEASE_HOST}: {}", released.detail))?;
    for host in &hosts {
        let r = lab
            .readyz(host)
            .with_context(|| format!("{host}: GET /readyz"))?;
        story.say(format!(
            "  {host}  GET /readyz → {}  {}",
            r.status,
            short(&r.body)
        ))?;
    }

    story
        .chapter("what broke? the runbook's decision tree, on each host's state vs its snapshot")?;
    story.rollbackctl(&fleet, &["diagnose", "--select", "role=web"])?;

    story.chapter(
        "rolling back to the snapshot with one command: canary first, then batches, live",
    )?;
    if ui == WebUi::Interactive
        && let Some(console) = &console
    {
        story.say(format!(
            "  (starting in {}s: open {}#/jobs to watch it in the browser)",
            UI_GRACE.as_secs(),
            console.url
        ))?;
        std::thread::sleep(UI_GRACE);
    }
    let started = Instant::now();
    story
        .rollbackctl(&fleet, ROLLBACK_COMMAND)
        .context("the rollback job failed")?;
    story.say(format!(
        "  ✓ rolled back {} hosts in {:.1}s",
        hosts.len(),
        started.elapsed().as_secs_f64()
    ))?;

    story.chapter("checking the fleet")?;
    for host in &hosts {
        let r = lab
            .readyz(host)
            .with_context(|| format!("{host}: GET /readyz"))?;
        if r.status != 200 {
            bail!(
                "{host}: GET /readyz answered {} after the rollback: {}",
                r.status,
                short(&r.body)
            );
        }
        story.say(format!(
            "  {host}  GET /readyz → {}  {}",
            r.status,
            short(&r.body)
        ))?;
    }
    let env_shas = wait_for_reported_env(lab, &fleet, &hosts)?;
    story.rollbackctl(&fleet, &["agents"])?;
    story.say("  what each agent reports about its host:")?;
    for agent in fleet.agents().context("rollbackctl agents")? {
        let state = &agent["state"];
        let host = agent["host_id"].as_str().unwrap_or_default();
        let env = state["env_sha256"].as_str().unwrap_or_default();
        story.say(format!(
            "    {host:<5} unit {:<8} git HEAD {:<8} alembic {:<5} .env sha256 {}{}",
            text_or_dash(&state["unit_active_state"]),
            abbrev(text_or_dash(&state["git_head_sha"]), 8),
            text_or_dash(&state["alembic_revision"]),
            if env.is_empty() { "-" } else { abbrev(env, 12) },
            if env_shas.iter().any(|(h, sha)| h == host && sha == env) {
                " (= .env.backup)"
            } else {
                ""
            }
        ))?;
    }
    let jobs = fleet
        .rollbackctl(&["jobs", "--output", "json", "--limit", "1"])
        .context("rollbackctl jobs")?;
    let jobs: serde_json::Value =
        serde_json::from_slice(&jobs.stdout).context("rollbackctl jobs output")?;
    if let Some(job) = jobs[0]["job_id"].as_str() {
        story.chapter(format!(
            "the incident report (`rollbackctl report {job}`), checklist part"
        ))?;
        let report = fleet
            .rollbackctl(&["report", job])
            .context("rollbackctl report")?;
        let text = String::from_utf8_lossy(&report.stdout);
        for line in text
            .lines()
            .skip_while(|l| !l.starts_with("## Post-rollback checklist"))
        {
            story.say(format!("  {line}"))?;
        }
    }
    inspect(lab, console.as_ref().map(|c| c.url.as_str()))?;
    if ui == WebUi::Interactive
        && let Some(console) = &console
    {
        story.say(format!(
            "\nthe web console stays up with the lab: {}\nCtrl-C ends the demo and removes the lab",
            console.url
        ))?;
        loop {
            // The interrupt watcher tears the lab down and ends the process.
            std::thread::park();
        }
    }

    story.chapter("tearing down: stopping the agents and the coordinator, removing the lab...")?;
    drop(fleet);
    Ok(())
}

/// `rollbackctl ui` as the demo's operator, in the coordinator's namespace, reachable from
/// this machine's 127.0.0.1 on the same port through a relay.
fn web_console(lab: &Lab, fleet: &LabFleet<'_>) -> Result<crate::browser::Console> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("a port on 127.0.0.1 for the web console")?;
    let port = listener.local_addr()?.port().to_string();
    let console =
        crate::browser::Console::start(fleet.rollbackctl_command(&["ui", "--port", &port]))?;
    crate::browser::relay_loopback(listener, &lab.coordinator_netns())?;
    Ok(console)
}

/// Waits until every agent reports a `.env` whose sha256 is that of the host's `.env.backup`
/// (the agents report their host's state with each heartbeat); returns (host, sha256).
fn wait_for_reported_env(
    lab: &Lab,
    fleet: &LabFleet<'_>,
    hosts: &[String],
) -> Result<Vec<(String, String)>> {
    let mut wanted = Vec::new();
    for host in hosts {
        let env = lab.read_file(host, &format!("{APP_DIR}/.env"))?;
        let backup = lab.read_file(host, &format!("{APP_DIR}/.env.backup"))?;
        if env != backup {
            bail!("{host}: {APP_DIR}/.env differs from .env.backup after the rollback");
        }
        let sum = lab
            .run(host, &["sha256sum", &format!("{APP_DIR}/.env.backup")])
            .with_context(|| format!("{host}: sha256sum .env.backup"))?;
        let sha = sum
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        wanted.push((host.clone(), sha));
    }
    crate::lab::poll::until(
        "every agent to report the restored .env",
        STATE_TIMEOUT,
        || {
            let agents = fleet.agents()?;
            let stale: Vec<&str> = wanted
                .iter()
                .filter(|(host, sha)| {
                    !agents.iter().any(|a| {
                        a["host_id"] == host.as_str() && a["state"]["env_sha256"] == sha.as_str()
                    })
                })
                .map(|(host, _)| host.as_str())
                .collect();
            Ok(if stale.is_empty() {
                crate::lab::poll::Check::Done(())
            } else {
                crate::lab::poll::Check::Pending(format!("not yet reported by {stale:?}"))
            })
        },
    )?;
    Ok(wanted)
}

/// Makes SIGINT, SIGTERM and SIGHUP (Ctrl-C, `kill`, a closed terminal) remove lab
/// `lab_name` and exit with status 130, instead of killing the process and leaving the lab
/// behind. The handlers are installed before this returns; a thread of its own waits for
/// them (child processes start with default signal handling, as exec resets handlers).
pub fn tear_down_on_interrupt(lab_name: &str) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the interrupt watcher's runtime")?;
    let (mut int, mut term, mut hup) = {
        let _entered = runtime.enter();
        (
            signal(SignalKind::interrupt()).context("handling SIGINT")?,
            signal(SignalKind::terminate()).context("handling SIGTERM")?,
            signal(SignalKind::hangup()).context("handling SIGHUP")?,
        )
    };
    let name = lab_name.to_string();
    std::thread::Builder::new()
        .name("demo-interrupt".into())
        .spawn(move || {
            let signal = runtime.block_on(async {
                tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                    _ = hup.recv() => "SIGHUP",
                }
            });
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("\ninterrupted ({signal}): tearing down lab {name}...");
            // Not while the demo itself is tearing down; the lab is gone after that.
            let _held = TEARDOWN.lock().unwrap_or_else(|p| p.into_inner());
            // The demo may be booting, or tearing down what it booted, at the same time:
            // remove until nothing is left.
            let removed = crate::lab::poll::until(
                format!("lab {name} to be gone"),
                INTERRUPT_TEARDOWN_TIMEOUT,
                || {
                    Ok(match Lab::remove(&name)? {
                        false => crate::lab::poll::Check::Done(()),
                        true => crate::lab::poll::Check::Pending("removed; checking again".into()),
                    })
                },
            );
            match removed {
                Ok(()) => eprintln!("lab {name} removed"),
                Err(e) => eprintln!(
                    "lab {name}: teardown failed: {e:#}\n`cargo xtask lab down --name {name}` removes what is left"
                ),
            }
            std::process::exit(130);
        })
        .context("starting the interrupt watcher")?;
    Ok(())
}

/// The fleet on the demo's lab. Dropping it stops the agents before the coordinator, so the
/// coordinator has no agent sessions left to drain when it is stopped.
struct Running<'a>(LabFleet<'a>);

impl<'a> std::ops::Deref for Running<'a> {
    type Target = LabFleet<'a>;

    fn deref(&self) -> &LabFleet<'a> {
        &self.0
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let lab = self.0.lab;
        if INTERRUPTED.load(Ordering::SeqCst) {
            return;
        }
        for host in lab.hosts() {
            if let Err(e) = lab.stop_unit(host.id(), AGENT_UNIT) {
                eprintln!("{}: stopping {AGENT_UNIT}: {e:#}", host.id());
            }
        }
    }
}

/// The demo's lab: torn down (under [`TEARDOWN`]) explicitly or on drop.
struct Guarded(Option<Lab>);

impl Guarded {
    fn get(&self) -> Result<&Lab> {
        self.0.as_ref().context("the demo's lab is gone")
    }

    fn teardown(&mut self) -> Result<()> {
        let _held = TEARDOWN.lock().unwrap_or_else(|p| p.into_inner());
        match self.0.take() {
            Some(mut lab) => lab
                .teardown()
                .with_context(|| format!("tearing down lab {}", lab.name())),
            None => Ok(()),
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e:#}");
        }
    }
}

/// The narration: numbered chapters, lines, and commands with their live output.
struct Story<'a> {
    out: &'a mut dyn Write,
    started: Instant,
    /// When the current chapter began.
    chapter_at: Instant,
    chapter: usize,
}

impl<'a> Story<'a> {
    fn new(out: &'a mut dyn Write) -> Self {
        Story {
            out,
            started: Instant::now(),
            chapter_at: Instant::now(),
            chapter: 0,
        }
    }

    fn say(&mut self, line: impl AsRef<str>) -> Result<()> {
        writeln!(self.out, "{}", line.as_ref())
            .and_then(|()| self.out.flush())
            .context("writing the demo's output")
    }

    fn chapter(&mut self, title: impl AsRef<str>) -> Result<()> {
        self.chapter += 1;
        self.chapter_at = Instant::now();
        let at = self.started.elapsed().as_secs_f64();
        self.say(format!(
            "\n[{}] {at:>5.1}s  {}",
            self.chapter,
            title.as_ref()
        ))
    }

    /// Shows `$ rollbackctl ARGS`, runs it with its output passed on live, fails unless it
    /// exits 0.
    fn rollbackctl(&mut self, fleet: &LabFleet<'_>, args: &[&str]) -> Result<()> {
        let line = args
            .iter()
            .map(|a| shell_quoted(a))
            .collect::<Vec<_>>()
            .join(" ");
        self.say(format!("  $ rollbackctl {line}"))?;
        let mut indented = Indented {
            out: &mut *self.out,
            at_line_start: true,
        };
        let status = fleet.rollbackctl_streamed(args, &mut indented, COMMAND_TIMEOUT)?;
        if !status.success() {
            bail!("`rollbackctl {line}` exited with {status}");
        }
        Ok(())
    }
}

/// Indents a command's output under the command line.
struct Indented<'a> {
    out: &'a mut dyn Write,
    at_line_start: bool,
}

impl Write for Indented<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_line_start && line != b"\n" {
                self.out.write_all(b"    ")?;
            }
            self.out.write_all(line)?;
            self.at_line_start = line.ends_with(b"\n");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `a` as a person would type it in a shell (shown only; nothing is run through a shell).
fn shell_quoted(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,/=:%".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

fn app_host_names() -> Vec<String> {
    (1..=APP_HOSTS).map(|n| format!("app{n}")).collect()
}

/// A response body on one line, cut to a readable length.
fn short(body: &str) -> String {
    let one_line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(100) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

fn abbrev(s: &str, n: usize) -> &str {
    s.get(..n).unwrap_or(s)
}

fn text_or_dash(v: &serde_json::Value) -> &str {
    match v.as_str() {
        Some(s) if !s.is_empty() => s,
        _ => "-",
    }
}
