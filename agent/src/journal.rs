//! The agent's run journal: one JSON file per run in `<state_dir>/runs`, rewritten atomically
//! and fsynced at every step boundary. A run id seen before returns its journaled result and
//! runs nothing again; a step cut off by a crash becomes `interrupted` at the next start. The
//! coordinator's acknowledgement of a result is an empty marker, `<run id>.acked`, beside the
//! record, written without a sync: the record is not rewritten for it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rollback_common::proto::{RunFinished, StepFinished, StepStatus};
use serde::{Deserialize, Serialize};

/// Runs kept in the journal; older finished and acknowledged runs are pruned.
const KEPT_RUNS: usize = 500;
/// The suffix of a run's acknowledgement marker.
const ACKED: &str = ".acked";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    Running,
    Done,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub action: String,
    pub params: BTreeMap<String, String>,
    pub phase: Phase,
    /// `StepStatus` as its protobuf number (meaningful when `phase` is Done).
    pub status: i32,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub error: String,
    pub output_tail: String,
    pub truncated: bool,
    pub facts: BTreeMap<String, String>,
}

impl StepRecord {
    pub fn pending(action: &str, params: BTreeMap<String, String>) -> Self {
        Self {
            action: action.to_string(),
            params,
            phase: Phase::Pending,
            status: StepStatus::Unspecified as i32,
            exit_code: -1,
            duration_ms: 0,
            error: String::new(),
            output_tail: String::new(),
            truncated: false,
            facts: BTreeMap::new(),
        }
    }

    pub fn finish(&mut self, status: StepStatus, error: impl Into<String>) {
        self.phase = Phase::Done;
        self.status = status as i32;
        self.error = error.into();
    }

    pub fn to_proto(&self) -> StepFinished {
        StepFinished {
            status: self.status,
            exit_code: self.exit_code,
            duration_ms: self.duration_ms,
            error: self.error.clone(),
            output_truncated: self.truncated,
            action: self.action.clone(),
            output_tail: self.output_tail.clone().into_bytes(),
            facts: self.facts.clone().into_iter().collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub job_id: String,
    pub received_at_ms: i64,
    pub steps: Vec<StepRecord>,
    pub finished: bool,
    pub status: i32,
    /// The coordinator confirmed it stored the result (the record's own flag, from journals
    /// written before the marker, or the `<run id>.acked` marker beside it).
    pub acked: bool,
}

impl RunRecord {
    /// The result as sent: cut to `MAX_RUN_RESULT_BYTES` (with markers) whatever the steps
    /// printed, so it always fits a message; the journal keeps the whole record.
    pub fn to_proto(&self, from_journal: bool) -> RunFinished {
        let mut run = RunFinished {
            run_id: self.run_id.clone(),
            status: self.status,
            steps: self.steps.iter().map(StepRecord::to_proto).collect(),
            from_journal,
            job_id: self.job_id.clone(),
        };
        rollback_common::output_cap::fit_run_finished(
            &mut run,
            rollback_common::output_cap::MAX_RUN_RESULT_BYTES,
        );
        run
    }

    /// The run's status: the first step that did not succeed decides it.
    pub fn overall_status(&self) -> StepStatus {
        self.steps
            .iter()
            .map(|s| StepStatus::try_from(s.status).unwrap_or(StepStatus::Unspecified))
            .find(|s| *s != StepStatus::Succeeded)
            .unwrap_or(StepStatus::Succeeded)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Run ids become file names: letters, digits, `-` and `_`, 1–64 characters.
pub fn valid_run_id(id: &str) -> bool {
    rollback_common::valid_id(id)
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Records written since it was opened: each one is two fsyncs.
    writes: std::sync::atomic::AtomicU64,
}

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let dir = state_dir.join("runs");
        std::fs::create_dir_all(&dir).map_err(|source| JournalError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            writes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn path(&self, run_id: &str) -> PathBuf {
        self.dir.join(format!("{run_id}.json"))
    }

    /// The marker of the coordinator's acknowledgement.
    fn ack_path(&self, run_id: &str) -> PathBuf {
        self.dir.join(format!("{run_id}{ACKED}"))
    }

    pub fn load(&self, run_id: &str) -> Result<Option<RunRecord>, JournalError> {
        let path = self.path(run_id);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut run: RunRecord =
                    serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })?;
                run.acked = run.acked || self.ack_path(run_id).exists();
                Ok(Some(run))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Io { path, source }),
        }
    }

    /// Writes the record durably: temp file, fsync, rename, fsync the directory.
    pub fn save(&self, record: &RunRecord) -> Result<(), JournalError> {
        let path = self.path(&record.run_id);
        let tmp = self.dir.join(format!(".{}.tmp", record.run_id));
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| JournalError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Records written durably since the journal was opened.
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every run in the journal, oldest first.
    pub fn all(&self) -> Result<Vec<RunRecord>, JournalError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| JournalError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut runs = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json").filter(|id| valid_run_id(id))
                && let Some(r) = self.load(id)?
            {
                runs.push(r);
            }
        }
        runs.sort_by_key(|r| r.received_at_ms);
        Ok(runs)
    }

    /// At start-up: a run that was in progress when the agent died is finished as
    /// `interrupted` — its running step interrupted, later steps skipped. Nothing is re-run.
    pub fn recover(&self) -> Result<Vec<RunRecord>, JournalError> {
        let mut recovered = Vec::new();
        for mut run in self.all()?.into_iter().filter(|r| !r.finished) {
            for step in &mut run.steps {
                match step.phase {
                    Phase::Running => step.finish(
                        StepStatus::Interrupted,
                        "the agent stopped while this step ran; it was not run again — check the host before retrying",
                    ),
                    Phase::Pending => step.finish(StepStatus::Skipped, "not started: the agent stopped during an earlier step"),
                    Phase::Done => {}
                }
            }
            run.finished = true;
            run.status = StepStatus::Interrupted as i32;
            run.acked = false;
            // An unfinished run was never acknowledged; a marker left by anything else must
            // not hide its interrupted result from the coordinator.
            self.remove_marker(&run.run_id)?;
            self.save(&run)?;
            recovered.push(run);
        }
        self.sweep_markers()?;
        self.prune()?;
        Ok(recovered)
    }

    /// Marks a run acknowledged (the coordinator stored its result), then prunes the journal.
    /// The marker is created, not synced: a crash may lose it, and then the result is sent
    /// again at the next session, which the coordinator answers from its store with another
    /// acknowledgement (a result is recorded once). The record is not rewritten, so an
    /// acknowledgement costs no fsync and can never damage the record. A run id with no
    /// record gets no marker.
    pub fn ack(&self, run_id: &str) -> Result<(), JournalError> {
        if self.path(run_id).is_file() {
            let marker = self.ack_path(run_id);
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&marker)
                .map_err(|source| JournalError::Io {
                    path: marker,
                    source,
                })?;
        }
        self.prune()
    }

    fn remove_marker(&self, run_id: &str) -> Result<(), JournalError> {
        let marker = self.ack_path(run_id);
        match std::fs::remove_file(&marker) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Io {
                path: marker,
                source,
            }),
        }
    }

    /// Removes markers whose record is gone (a prune cut off between the two removals).
    fn sweep_markers(&self) -> Result<(), JournalError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| JournalError::Io {
            path: self.dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(ACKED).filter(|id| valid_run_id(id))
                && !self.path(id).exists()
            {
                self.remove_marker(id)?;
            }
        }
        Ok(())
    }

    /// Removes the oldest finished and acknowledged runs beyond `KEPT_RUNS`. Cheap when there
    /// is nothing to prune (counts names only).
    fn prune(&self) -> Result<(), JournalError> {
        let count = std::fs::read_dir(&self.dir)
            .map_err(|source| JournalError::Io {
                path: self.dir.clone(),
                source,
            })?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count();
        if count <= KEPT_RUNS {
            return Ok(());
        }
        let runs = self.all()?;
        let excess = runs.len().saturating_sub(KEPT_RUNS);
        for run in runs.iter().filter(|r| r.finished && r.acked).take(excess) {
            // The record first: a marker without its record is swept at the next start.
            let _ = std::fs::remove_file(self.path(&run.run_id));
            let _ = std::fs::remove_file(self.ack_path(&run.run_id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_marks_running_interrupted_and_pending_skipped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        let mut run = RunRecord {
            run_id: "r1".into(),
            job_id: "j1".into(),
            received_at_ms: 1,
            steps: vec![
                StepRecord::pending("git.log", BTreeMap::new()),
                StepRecord::pending("service.restart", BTreeMap::new()),
                StepRecord::pending("http.check", BTreeMap::new()),
            ],
            finished: false,
            status: 0,
            acked: false,
        };
        run.steps[0].finish(StepStatus::Succeeded, "");
        run.steps[1].phase = Phase::Running;
        j.save(&run).expect("save");
        let recovered = j.recover().expect("recover");
        assert_eq!(recovered.len(), 1);
        let r = j.load("r1").expect("load").expect("present");
        assert!(r.finished);
        let statuses: Vec<i32> = r.steps.iter().map(|s| s.status).collect();
        assert_eq!(
            statuses,
            [
                StepStatus::Succeeded as i32,
                StepStatus::Interrupted as i32,
                StepStatus::Skipped as i32
            ]
        );
        assert_eq!(r.overall_status(), StepStatus::Interrupted);
        assert!(
            j.recover().expect("again").is_empty(),
            "recovery happens once"
        );
    }

    #[test]
    fn acknowledged_runs_are_pruned_as_they_are_acknowledged() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        let unacked = RunRecord {
            run_id: "keep-me".into(),
            job_id: "j".into(),
            received_at_ms: 0,
            steps: vec![],
            finished: true,
            status: StepStatus::Succeeded as i32,
            acked: false,
        };
        j.save(&unacked).expect("save");
        for i in 0..KEPT_RUNS + 20 {
            let run = RunRecord {
                run_id: format!("r{i}"),
                received_at_ms: 1 + i as i64,
                ..unacked.clone()
            };
            j.save(&run).expect("save");
            j.ack(&run.run_id).expect("ack");
        }
        let left = j.all().expect("all");
        assert!(left.len() <= KEPT_RUNS, "{} runs kept", left.len());
        assert!(
            left.iter().any(|r| r.run_id == "keep-me"),
            "an unacknowledged result is never pruned"
        );
        assert!(
            left.iter()
                .any(|r| r.run_id == format!("r{}", KEPT_RUNS + 19)),
            "the newest are kept"
        );
        assert!(
            !left.iter().any(|r| r.run_id == "r0"),
            "the oldest go first"
        );
        assert!(
            !tmp.path().join("runs").join("r0.acked").exists(),
            "a pruned run's marker goes with it"
        );
        let markers = std::fs::read_dir(tmp.path().join("runs"))
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(ACKED))
            .count();
        assert_eq!(markers, left.iter().filter(|r| r.acked).count());
    }

    fn finished_run(id: &str) -> RunRecord {
        RunRecord {
            run_id: id.into(),
            job_id: "j".into(),
            received_at_ms: 1,
            steps: vec![],
            finished: true,
            status: StepStatus::Succeeded as i32,
            acked: false,
        }
    }

    #[test]
    fn an_acknowledgement_is_a_marker_and_never_rewrites_the_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        j.save(&finished_run("r1")).expect("save");
        let record = tmp.path().join("runs").join("r1.json");
        let before = std::fs::read(&record).expect("record");
        let writes = j.writes();
        j.ack("r1").expect("ack");
        assert_eq!(
            std::fs::read(&record).expect("record"),
            before,
            "record untouched"
        );
        assert_eq!(
            j.writes(),
            writes,
            "no durable write for an acknowledgement"
        );
        assert!(j.load("r1").expect("load").expect("present").acked);
        j.ack("r1").expect("a second ack changes nothing");
        assert!(j.load("r1").expect("load").expect("present").acked);

        // A crash that lost the (unsynced) marker: the run is unacknowledged again, so its
        // result is sent again and acknowledged again; nothing else changed.
        std::fs::remove_file(tmp.path().join("runs").join("r1.acked")).expect("lose marker");
        assert!(!j.load("r1").expect("load").expect("present").acked);

        // No record, no marker.
        j.ack("never-ran").expect("ack of an unknown run");
        assert!(!tmp.path().join("runs").join("never-ran.acked").exists());
    }

    #[test]
    fn a_record_acknowledged_by_an_older_agent_stays_acknowledged() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        j.save(&RunRecord {
            acked: true,
            ..finished_run("old")
        })
        .expect("save");
        assert!(j.load("old").expect("load").expect("present").acked);
    }

    #[test]
    fn recovery_drops_a_stray_marker_of_a_cut_off_run_and_markers_without_a_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        let runs = tmp.path().join("runs");
        let mut cut = finished_run("cut");
        cut.finished = false;
        cut.steps = vec![StepRecord::pending("git.log", BTreeMap::new())];
        cut.steps[0].phase = Phase::Running;
        j.save(&cut).expect("save");
        std::fs::write(runs.join("cut.acked"), b"").expect("stray marker");
        std::fs::write(runs.join("gone.acked"), b"").expect("orphan marker");
        let recovered = j.recover().expect("recover");
        assert_eq!(recovered.len(), 1);
        let r = j.load("cut").expect("load").expect("present");
        assert!(
            r.finished && !r.acked,
            "its interrupted result goes to the coordinator"
        );
        assert!(!runs.join("cut.acked").exists());
        assert!(!runs.join("gone.acked").exists());
    }

    #[test]
    fn run_ids_are_file_safe() {
        assert!(valid_run_id("0c6f-41_a"));
        assert!(
            !valid_run_id("../x")
                && !valid_run_id("")
                && !valid_run_id("a/b")
                && !valid_run_id(&"a".repeat(65))
        );
    }
}
