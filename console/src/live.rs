//! Following a job on screen: one line per event, each step's output lines prefixed by their
//! host, and on a terminal a pinned summary (phase, batch, hosts done/failed/running, elapsed)
//! that stays at the bottom while the lines scroll above it. Piped, the same lines are printed
//! plain and nothing is redrawn.

use std::collections::HashSet;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rollback_common::jobs::{EventKind, Outcome};
use rollback_common::proto::JobEvent;

use crate::output::{Paint, clock, paint};

/// Where a job is, as its events tell it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub phases: usize,
    pub phase_no: usize,
    pub phase: String,
    pub batch: String,
    pub hosts: usize,
    /// Hosts done in the current phase, out of the phase's hosts.
    pub done: u32,
    pub of: u32,
    pub failed: HashSet<String>,
    pub running: HashSet<String>,
    pub state: String,
}

fn outcome_of(ev: &JobEvent) -> Option<Outcome> {
    let rest = ev.message.strip_prefix(ev.host_id.as_str())?.trim_start();
    rest.split([':', ' '])
        .next()
        .and_then(|o| o.parse::<Outcome>().ok())
}

impl Summary {
    pub fn new(phases: usize, hosts: usize) -> Self {
        Self {
            phases,
            hosts,
            ..Self::default()
        }
    }

    pub fn apply(&mut self, ev: &JobEvent) {
        if !ev.job_state.is_empty() {
            self.state.clone_from(&ev.job_state);
        }
        let Ok(kind) = ev.kind.parse::<EventKind>() else {
            return;
        };
        if ev.total > 0 {
            self.done = ev.done;
            self.of = ev.total;
        }
        match kind {
            EventKind::PhaseStarted => {
                self.phase_no += 1;
                self.phase.clone_from(&ev.phase);
                self.batch.clear();
                self.running.clear();
            }
            EventKind::BatchStarted => {
                self.batch = ev.message.split(':').next().unwrap_or_default().to_string();
            }
            EventKind::HostDispatched => {
                self.running.insert(ev.host_id.clone());
            }
            EventKind::HostPhaseDone => {
                self.running.remove(&ev.host_id);
            }
            EventKind::HostFinished => {
                self.running.remove(&ev.host_id);
                match outcome_of(ev) {
                    Some(o) if o.is_failure() => {
                        self.failed.insert(ev.host_id.clone());
                    }
                    _ => {
                        self.failed.remove(&ev.host_id);
                    }
                }
            }
            EventKind::PhaseFinished => self.running.clear(),
            _ => {}
        }
    }

    /// One line: `phase 2/3 restore · canary · 4/12 done · 1 failed · 3 running · running`.
    pub fn line(&self) -> String {
        let mut parts = Vec::new();
        if self.phase_no == 0 {
            parts.push(format!(
                "{} host(s), waiting for the first phase",
                self.hosts
            ));
        } else {
            parts.push(format!(
                "phase {}/{} {}",
                self.phase_no,
                self.phases.max(self.phase_no),
                self.phase
            ));
            if !self.batch.is_empty() {
                parts.push(self.batch.clone());
            }
            parts.push(format!("{}/{} done", self.done, self.of));
        }
        let failed = format!("{} failed", self.failed.len());
        parts.push(if self.failed.is_empty() {
            failed
        } else {
            paint(Paint::Bad, &failed)
        });
        parts.push(format!("{} running", self.running.len()));
        if !self.state.is_empty() {
            parts.push(self.state.clone());
        }
        parts.join(" · ")
    }
}

/// One line per event as an operator reads it; a `step.output` event is one line per output
/// line, prefixed by its host (`None` for output when it is hidden).
pub fn render(ev: &JobEvent, show_output: bool) -> Option<String> {
    let t = clock(ev.at_unix_ms);
    let Ok(kind) = ev.kind.parse::<EventKind>() else {
        // An event kind from a newer coordinator: shown as it is.
        return Some(format!("{t} {}: {}", ev.kind, ev.message));
    };
    let bar = |done: u32, total: u32| {
        if total == 0 {
            return String::new();
        }
        let width = 20usize;
        let filled = (done as usize * width) / total as usize;
        format!(
            " [{}{}] {done}/{total}",
            "#".repeat(filled),
            "-".repeat(width - filled)
        )
    };
    Some(match kind {
        EventKind::StepOutput if !show_output => return None,
        EventKind::StepOutput => {
            let prefix = paint(Paint::Dim, &format!("{} |", ev.host_id));
            ev.message
                .lines()
                .map(|l| format!("{prefix} {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        EventKind::JobAwaitingApproval => format!("{t} ?? awaiting approval: {}", ev.message),
        EventKind::JobApproved => format!("{t} job {}", ev.message),
        EventKind::JobStarted => format!("{t} job started: {}", ev.message),
        EventKind::JobResumed => format!("{t} job resumed: {}", ev.message),
        EventKind::PhaseStarted => format!("{t} ── {}", ev.message),
        EventKind::BatchStarted => format!("{t}    {} {}", ev.phase, ev.message),
        EventKind::HostDispatched => format!("{t}    → {}", ev.message),
        EventKind::HostWaiting => format!("{t}    … {}", paint(Paint::Warn, &ev.message)),
        EventKind::StepStarted => format!("{t}      {}", ev.message),
        EventKind::StepFinished if ev.message.contains(" succeeded ") => {
            format!("{t}      {}", ev.message)
        }
        EventKind::StepFinished => format!("{t}      {}", paint(Paint::Bad, &ev.message)),
        EventKind::HostPhaseDone => format!(
            "{t}    {} {}{}",
            paint(Paint::Good, "✓"),
            ev.message,
            bar(ev.done, ev.total)
        ),
        EventKind::HostFinished if outcome_of(ev) == Some(Outcome::Succeeded) => {
            format!("{t}    {} {}", paint(Paint::Good, "✓"), ev.message)
        }
        EventKind::HostFinished => format!(
            "{t}    {} {}{}",
            paint(Paint::Bad, "✗"),
            paint(Paint::Bad, &ev.message),
            bar(ev.done, ev.total)
        ),
        EventKind::PhaseFinished => format!("{t}    {}{}", ev.message, bar(ev.done, ev.total)),
        EventKind::JobHalted => format!(
            "{t} {}",
            paint(Paint::Bad, &format!("!! halted: {}", ev.message))
        ),
        EventKind::JobCancelling => {
            format!("{t} {}", paint(Paint::Warn, &format!("!! {}", ev.message)))
        }
        EventKind::GuardSample => format!("{t}    guard: {}", ev.message),
        EventKind::GuardBreach => format!(
            "{t} {}",
            paint(Paint::Bad, &format!("!! breach: {}", ev.message))
        ),
        EventKind::GuardProposal => {
            format!("{t} {}", paint(Paint::Warn, &format!(">> {}", ev.message)))
        }
        EventKind::GuardHealthy => format!("{t} {}", paint(Paint::Good, &ev.message)),
        EventKind::JobFinished if ev.job_state == "succeeded" => {
            format!("{t} {}", paint(Paint::Good, &format!("job {}", ev.message)))
        }
        EventKind::JobFinished => {
            format!("{t} {}", paint(Paint::Bad, &format!("job {}", ev.message)))
        }
    })
}

/// The screen of a followed job.
pub struct Screen {
    bar: Option<ProgressBar>,
    summary: Summary,
    show_output: bool,
}

impl Screen {
    /// `pinned`: draw the summary at the bottom (stdout is a terminal). `elapsed`: how long
    /// the job has been going already.
    pub fn new(pinned: bool, show_output: bool, summary: Summary, elapsed: Duration) -> Self {
        let bar = pinned.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout())
                .with_elapsed(elapsed);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} · {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(summary.line());
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self {
            bar,
            summary,
            show_output,
        }
    }

    pub fn event(&mut self, ev: &JobEvent) {
        self.summary.apply(ev);
        if let Some(line) = render(ev, self.show_output) {
            self.println(&line);
        }
        if let Some(bar) = &self.bar {
            bar.set_message(self.summary.line());
        }
    }

    /// A summary is pinned at the bottom of a terminal.
    pub fn pinned(&self) -> bool {
        self.bar.is_some()
    }

    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    /// Removes the pinned summary, leaving its last state as a line.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            println!("{}", self.summary.line());
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, host: &str, message: &str, done: u32, total: u32) -> JobEvent {
        JobEvent {
            kind: kind.as_str().into(),
            host_id: host.into(),
            phase: "restore".into(),
            message: message.into(),
            job_state: "running".into(),
            done,
            total,
            ..Default::default()
        }
    }

    #[test]
    fn the_summary_follows_phases_batches_and_hosts() {
        let mut s = Summary::new(2, 3);
        s.apply(&ev(EventKind::PhaseStarted, "", "phase restore", 0, 3));
        s.apply(&ev(EventKind::BatchStarted, "", "canary: web-1", 0, 3));
        s.apply(&ev(
            EventKind::HostDispatched,
            "web-1",
            "web-1: 3 steps",
            0,
            0,
        ));
        assert_eq!(
            s.line(),
            "phase 1/2 restore · canary · 0/3 done · 0 failed · 1 running · running"
        );
        s.apply(&ev(
            EventKind::HostFinished,
            "web-1",
            "web-1 failed: restore at http.check (exit 1): 503",
            1,
            3,
        ));
        assert_eq!(s.failed.len(), 1);
        assert!(s.running.is_empty());
        s.apply(&ev(
            EventKind::HostFinished,
            "web-1",
            "web-1 succeeded: ok",
            0,
            0,
        ));
        assert!(
            s.failed.is_empty(),
            "a host that succeeded later (resumed) is not failed"
        );
    }

    #[test]
    fn output_lines_are_prefixed_by_host_and_can_be_hidden() {
        let e = ev(
            EventKind::StepOutput,
            "web-2",
            "downgrading 3\ndowngrading 4",
            0,
            0,
        );
        assert_eq!(
            render(&e, true).as_deref(),
            Some("web-2 | downgrading 3\nweb-2 | downgrading 4")
        );
        assert_eq!(render(&e, false), None);
    }
}
