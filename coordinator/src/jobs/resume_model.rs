//! Property test of the job engine's resume decisions (`engine::rebuild_progress`, the real
//! function the coordinator runs at start-up) against a model of everything around them: the
//! engine's order of writes (create the run, send it, record the result, record the phase),
//! agents with exactly-once journals that keep running while their session drops, results
//! re-sent until acknowledged, agent crashes (a running run becomes `interrupted`) and
//! coordinator restarts that lose everything not in the store. The model stands in for the
//! network and the processes (a test double: proptest needs thousands of interleavings, which
//! real processes cannot give); the lab suite `lab_resume` does the same with real ones.
//!
//! Property: whatever the interleaving, no phase runs twice on a host, and every host that did
//! not crash ends with every one of its phases done exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use proptest::prelude::*;
use prost::Message;
use rollback_common::jobs::Outcome;
use rollback_common::proto::{RunFinished, StepFinished, StepStatus};
use rollback_common::runbook::{self, Plan, Runbook};

use super::engine::{host_row, rebuild_progress};
use crate::store::{JobHostRow, RunRow};

const HOSTS: usize = 3;

fn host(i: usize) -> String {
    format!("h{i}")
}

fn plan() -> Plan {
    let targets: Vec<String> = (0..HOSTS).map(host).collect();
    runbook::plan(
        &Runbook::seed(),
        "database",
        &BTreeMap::new(),
        &targets,
        &[host(0)],
        &runbook::Strategy::default(),
    )
    .expect("the seed's database procedure plans")
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// The engine takes its next step for host i.
    Engine(usize),
    /// Agent i takes its next step (start a received run, or finish the running one).
    Agent(usize),
    /// The coordinator receives agent i's next result, stores it and acknowledges it.
    Deliver(usize),
    /// Agent i's session drops (messages in flight are lost) and comes back.
    Disconnect(usize),
    /// Agent i is killed: its running run is cut (journaled `interrupted`); it comes back.
    Crash(usize),
    /// The coordinator is killed and restarted: only the store survives.
    Restart,
}

fn ev() -> impl Strategy<Value = Ev> {
    let h = 0..HOSTS;
    prop_oneof![
        6 => h.clone().prop_map(Ev::Engine),
        6 => h.clone().prop_map(Ev::Agent),
        6 => h.clone().prop_map(Ev::Deliver),
        1 => h.clone().prop_map(Ev::Disconnect),
        1 => h.prop_map(Ev::Crash),
        1 => Just(Ev::Restart),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum Journal {
    Running,
    Done(StepStatus),
}

#[derive(Debug, Default)]
struct Agent {
    inbox: VecDeque<String>,
    running: Option<String>,
    journal: HashMap<String, Journal>,
    unacked: BTreeSet<String>,
    outbox: VecDeque<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    Idle,
    Created(String),
    Sent(String),
    Over,
}

#[derive(Debug)]
struct World {
    plan: Plan,
    // The store: survives restarts.
    runs: Vec<RunRow>,
    rows: BTreeMap<String, JobHostRow>,
    // The coordinator process: lost at a restart.
    tracks: BTreeMap<String, JobHostRow>,
    phase: usize,
    stages: HashMap<usize, Stage>,
    reattach: HashMap<(String, String), String>,
    halted: bool,
    // The hosts.
    agents: Vec<Agent>,
    /// (host, phase, run id) of every run an agent actually started.
    executions: Vec<(usize, String, String)>,
    crashed: BTreeSet<usize>,
    next_id: u64,
}

fn result(status: StepStatus) -> Vec<u8> {
    RunFinished {
        status: status as i32,
        steps: vec![StepFinished {
            status: status as i32,
            duration_ms: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

impl World {
    fn new() -> Self {
        let plan = plan();
        let rows: BTreeMap<String, JobHostRow> = (0..HOSTS)
            .map(|i| (host(i), host_row("job", &host(i), i, false)))
            .collect();
        Self {
            plan,
            runs: Vec::new(),
            tracks: rows.clone(),
            rows,
            phase: 0,
            stages: HashMap::new(),
            reattach: HashMap::new(),
            halted: false,
            agents: (0..HOSTS).map(|_| Agent::default()).collect(),
            executions: Vec::new(),
            crashed: BTreeSet::new(),
            next_id: 0,
        }
    }

    fn finished(&self) -> bool {
        self.halted || self.phase >= self.plan.phases.len()
    }

    fn in_phase(&self, h: usize) -> bool {
        self.plan.phases[self.phase]
            .batches
            .iter()
            .flatten()
            .any(|x| *x == host(h))
    }

    fn phase_of(&self, run_id: &str) -> String {
        self.runs
            .iter()
            .find(|r| r.run_id == run_id)
            .map(|r| r.phase.clone())
            .unwrap_or_default()
    }

    fn save(&mut self, h: usize) {
        if let Some(t) = self.tracks.get(&host(h)) {
            self.rows.insert(host(h), t.clone());
        }
    }

    /// The engine's next step for host h, in the real engine's order of writes.
    fn engine(&mut self, h: usize) {
        if self.finished() || !self.in_phase(h) {
            return self.advance();
        }
        let phase = self.plan.phases[self.phase].name.clone();
        let pending_here = self.tracks.get(&host(h)).is_some_and(|t| {
            t.outcome == Outcome::Pending.as_str() && !t.done_phases.contains(&phase)
        });
        let stage = self.stages.get(&h).cloned().unwrap_or(Stage::Idle);
        match stage {
            _ if !pending_here => {
                self.stages.insert(h, Stage::Over);
                self.advance();
            }
            Stage::Idle => {
                if let Some(id) = self.reattach.remove(&(phase.clone(), host(h))) {
                    // Re-attach: ask again (the agent's journal decides).
                    self.agents[h].inbox.push_back(id.clone());
                    self.stages.insert(h, Stage::Sent(id));
                } else {
                    self.next_id += 1;
                    let id = format!("r{}", self.next_id);
                    self.runs.push(RunRow {
                        run_id: id.clone(),
                        job_id: "job".into(),
                        host_id: host(h),
                        requested_by: String::new(),
                        reason: String::new(),
                        procedure: Vec::new(),
                        status: 0,
                        created_at_ms: 0,
                        finished_at_ms: None,
                        result: None,
                        phase,
                    });
                    self.stages.insert(h, Stage::Created(id));
                }
            }
            Stage::Created(id) => {
                self.agents[h].inbox.push_back(id.clone());
                self.stages.insert(h, Stage::Sent(id));
            }
            Stage::Sent(id) => {
                let stored = self
                    .runs
                    .iter()
                    .find(|r| r.run_id == id)
                    .and_then(|r| r.result.clone());
                let Some(bytes) = stored else { return };
                let r = RunFinished::decode(bytes.as_slice()).expect("model result");
                let once = self.plan.phases[self.phase].scope == runbook::Scope::Once;
                if let Some(t) = self.tracks.get_mut(&host(h)) {
                    if r.status == StepStatus::Succeeded as i32 {
                        t.done_phases.push(phase);
                    } else {
                        t.outcome = Outcome::Interrupted.as_str().into();
                        if once {
                            self.halted = true;
                        }
                    }
                }
                self.save(h);
                self.stages.insert(h, Stage::Over);
                self.advance();
            }
            Stage::Over => self.advance(),
        }
    }

    /// The barrier: the next phase starts once every host of this one is over.
    fn advance(&mut self) {
        while !self.finished() {
            let all_over = (0..HOSTS)
                .filter(|h| self.in_phase(*h))
                .all(|h| self.stages.get(&h) == Some(&Stage::Over));
            if !all_over {
                return;
            }
            self.phase += 1;
            self.stages.clear();
        }
    }

    fn agent(&mut self, h: usize) {
        if let Some(id) = self.agents[h].running.take() {
            let a = &mut self.agents[h];
            a.journal
                .insert(id.clone(), Journal::Done(StepStatus::Succeeded));
            a.unacked.insert(id.clone());
            a.outbox.push_back(id);
            return;
        }
        let Some(id) = self.agents[h].inbox.pop_front() else {
            return;
        };
        match self.agents[h].journal.get(&id) {
            Some(Journal::Done(_)) => self.agents[h].outbox.push_back(id),
            Some(Journal::Running) => {}
            None => {
                let phase = self.phase_of(&id);
                let a = &mut self.agents[h];
                a.journal.insert(id.clone(), Journal::Running);
                a.running = Some(id.clone());
                self.executions.push((h, phase, id));
            }
        }
    }

    fn deliver(&mut self, h: usize) {
        let Some(id) = self.agents[h].outbox.pop_front() else {
            return;
        };
        let Some(Journal::Done(status)) = self.agents[h].journal.get(&id).cloned() else {
            return;
        };
        if let Some(r) = self.runs.iter_mut().find(|r| r.run_id == id) {
            r.result = Some(result(status));
        }
        self.agents[h].unacked.remove(&id);
    }

    /// The session comes back: the agent re-sends unacknowledged results; the coordinator
    /// re-sends the runs it dispatched whose result it has not stored.
    fn reconnect(&mut self, h: usize) {
        let a = &mut self.agents[h];
        a.inbox.clear();
        a.outbox = a.unacked.iter().cloned().collect();
        let pending: Vec<String> = self
            .stages
            .iter()
            .filter(|(x, _)| **x == h)
            .filter_map(|(_, s)| match s {
                Stage::Sent(id) => Some(id.clone()),
                _ => None,
            })
            .filter(|id| {
                self.runs
                    .iter()
                    .any(|r| r.run_id == *id && r.result.is_none())
            })
            .collect();
        self.agents[h].inbox.extend(pending);
    }

    fn crash(&mut self, h: usize) {
        if let Some(id) = self.agents[h].running.take() {
            self.crashed.insert(h);
            let a = &mut self.agents[h];
            a.journal
                .insert(id.clone(), Journal::Done(StepStatus::Interrupted));
            a.unacked.insert(id);
        }
        self.reconnect(h);
    }

    fn restart(&mut self) {
        self.stages.clear();
        self.phase = 0;
        self.halted = false;
        let mut tracks = self.rows.clone();
        let inflight = rebuild_progress(&self.plan, &mut tracks, self.runs.clone(), true);
        self.tracks = tracks;
        self.reattach = inflight
            .into_iter()
            .map(|(k, row)| (k, row.run_id))
            .collect();
        // A once-phase host that failed halts the job again.
        for ph in &self.plan.phases {
            if ph.scope == runbook::Scope::Once
                && let Some(h) = ph.batches.iter().flatten().next()
                && self.tracks.get(h).is_some_and(|t| {
                    t.outcome != Outcome::Pending.as_str() && !t.done_phases.contains(&ph.name)
                })
            {
                self.halted = true;
            }
        }
        for h in 0..HOSTS {
            let a = &mut self.agents[h];
            a.inbox.clear();
            a.outbox = a.unacked.iter().cloned().collect();
        }
        self.advance();
    }

    fn apply(&mut self, e: Ev) {
        match e {
            Ev::Engine(h) => self.engine(h),
            Ev::Agent(h) => self.agent(h),
            Ev::Deliver(h) => self.deliver(h),
            Ev::Disconnect(h) => self.reconnect(h),
            Ev::Crash(h) => self.crash(h),
            Ev::Restart => self.restart(),
        }
    }

    /// No more faults: everything runs until the job is over.
    fn quiesce(&mut self) {
        for _ in 0..10_000 {
            if self.finished() {
                return;
            }
            for h in 0..HOSTS {
                self.engine(h);
                self.agent(h);
                self.deliver(h);
            }
        }
        let tracks: Vec<(String, String, Vec<String>)> = self
            .tracks
            .values()
            .map(|t| (t.host_id.clone(), t.outcome.clone(), t.done_phases.clone()))
            .collect();
        panic!(
            "the job never finished: phase {} halted {} stages {:?} tracks {tracks:?} executions {:?}",
            self.phase, self.halted, self.stages, self.executions
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn no_phase_is_lost_or_run_twice(events in prop::collection::vec(ev(), 0..80)) {
        let mut w = World::new();
        for e in &events {
            w.apply(*e);
        }
        w.quiesce();
        let mut count: HashMap<(usize, String), usize> = HashMap::new();
        for (h, phase, _) in &w.executions {
            *count.entry((*h, phase.clone())).or_default() += 1;
        }
        for ((h, phase), n) in &count {
            prop_assert!(*n <= 1, "phase {phase} ran {n} times on h{h}: {:?}", w.executions);
        }
        if !w.halted {
            for h in (0..HOSTS).filter(|h| !w.crashed.contains(h)) {
                for ph in w.plan.phases.iter().filter(|p| p.batches.iter().flatten().any(|x| *x == host(h))) {
                    prop_assert_eq!(
                        count.get(&(h, ph.name.clone())).copied().unwrap_or(0),
                        1,
                        "phase {} on h{} (events {:?})", ph.name, h, events
                    );
                }
            }
        }
        if w.crashed.is_empty() {
            prop_assert!(!w.halted, "nothing crashed, yet the job halted: {:?}", events);
        }
    }
}

#[test]
fn a_restart_after_the_result_but_before_the_phase_was_saved_does_not_run_it_again() {
    let mut w = World::new();
    // h0..h2 each: create, send, start, finish, deliver — then the coordinator dies before
    // the engine records the stop phase for anyone.
    for h in 0..HOSTS {
        w.apply(Ev::Engine(h));
        w.apply(Ev::Engine(h));
        w.apply(Ev::Agent(h));
        w.apply(Ev::Agent(h));
        w.apply(Ev::Deliver(h));
    }
    w.apply(Ev::Restart);
    w.quiesce();
    let stops = w.executions.iter().filter(|(_, p, _)| p == "stop").count();
    assert_eq!(stops, HOSTS, "{:?}", w.executions);
    assert!(!w.halted);
}
