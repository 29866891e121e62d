//! The agent's run journal: one JSON file per run in `<state_dir>/runs`, rewritten atomically
//! and fsynced at every step boundary. A run id seen before returns its journaled result and
//! runs nothing again; a step cut off by a crash becomes `interrupted` at the next start. The
//! coordinator's acknowledgement of a result is an empty marker, `<run id>.acked`, beside the
//! record, written without a sync: the record is not rewritten for it. Nothing in the journal
//! is followed if it is a symlink: files are created, renamed and removed relative to the
//! directory, itself opened without following a link.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use rollback_common::proto::{RunFinished, StepFinished, StepStatus};
use serde::{Deserialize, Serialize};

/// Runs kept in the journal; older finished and acknowledged runs are pruned.
const KEPT_RUNS: usize = 500;
/// The suffix of a run's acknowledgement marker.
const ACKED: &str = ".acked";
/// Acknowledgements between two prunes: the journal may hold up to this many acknowledged
/// runs beyond `KEPT_RUNS`, and an acknowledgement rarely reads the directory.
const PRUNE_EVERY: u64 = 16;

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

/// Every write opens the directory once, without following a symlink, and creates, renames
/// and removes its files relative to that handle: nothing is written through a link, and a
/// write walks the directory's path once, not once per file operation. The handle is not kept:
/// the simulator runs thousands of agents in one process, each with its own journal, under one
/// open-files limit.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Records written since it was opened: each one is two fsyncs.
    writes: AtomicU64,
    /// Acknowledgements since it was opened: the journal is pruned every `PRUNE_EVERY`.
    acks: AtomicU64,
}

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let dir = state_dir.join("runs");
        std::fs::create_dir_all(&dir).map_err(|source| JournalError::Io {
            path: dir.clone(),
            source,
        })?;
        let journal = Self {
            dir,
            writes: AtomicU64::new(0),
            acks: AtomicU64::new(0),
        };
        journal.open_dir()?;
        Ok(journal)
    }

    /// The journal directory, opened for operations relative to it.
    fn open_dir(&self) -> Result<OwnedFd, JournalError> {
        nix::fcntl::open(
            &self.dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| JournalError::Io {
            path: self.dir.clone(),
            source: match e {
                Errno::ELOOP | Errno::ENOTDIR => std::io::Error::other(
                    "not a directory (a symlink is not followed): make it a directory owned by root",
                ),
                Errno::ENOENT => std::io::Error::other(
                    "the journal directory was removed while the agent ran; restart the agent to recreate it",
                ),
                e => e.into(),
            },
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// An I/O error on `name` in the journal (from std or from a system call).
    fn io(&self, name: &str, e: impl Into<std::io::Error>) -> JournalError {
        JournalError::Io {
            path: self.path(name),
            source: e.into(),
        }
    }

    /// Removes `name` from the journal `dir`; one that is not there is not an error.
    fn remove(&self, dir: &OwnedFd, name: &str) -> Result<(), JournalError> {
        match unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.io(name, e)),
        }
    }

    /// A run's record; a record that is a symlink is an error, never followed.
    pub fn load(&self, run_id: &str) -> Result<Option<RunRecord>, JournalError> {
        let name = record_name(run_id);
        // One path walk where the run is new (the common case): no directory handle first.
        let fd = match nix::fcntl::open(
            &self.path(&name),
            // Non-blocking: a FIFO planted under the name cannot hold the agent in `open`.
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(self.io(&name, e)),
        };
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io(&name, e))?;
        let mut run: RunRecord =
            serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt {
                path: self.path(&name),
                reason: e.to_string(),
            })?;
        run.acked =
            run.acked || nix::sys::stat::lstat(&self.path(&ack_name(run_id))).is_ok_and(is_regular);
        Ok(Some(run))
    }

    /// Writes the record durably: temp file, fsync, rename, fsync the directory. A journal
    /// directory removed while the agent runs is an error, not a write nobody will read.
    pub fn save(&self, record: &RunRecord) -> Result<(), JournalError> {
        let name = record_name(&record.run_id);
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| JournalError::Corrupt {
            path: self.path(&name),
            reason: e.to_string(),
        })?;
        let dir = self.open_dir()?;
        let tmp = format!(".{}.tmp", record.run_id);
        // Whatever has the name (a crash's leftover, or a planted link or FIFO) is removed,
        // then the file is created afresh: nothing is ever opened through it.
        self.remove(&dir, &tmp)?;
        let fd = openat(
            dir.as_fd(),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.io(&name, e))?;
        let mut f = std::fs::File::from(fd);
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| self.io(&name, e))?;
        renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), name.as_str())
            .and_then(|()| nix::unistd::fsync(dir.as_fd()))
            .map_err(|e| self.io(&name, e))?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records written durably since the journal was opened.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Every readable run in the journal, oldest first. A record that cannot be read (corrupt,
    /// or a symlink) is logged and left out, so it does not hide the others from recovery and
    /// from the coordinator; its run id still answers `load` with the error, so it never runs.
    pub fn all(&self) -> Result<Vec<RunRecord>, JournalError> {
        let mut runs = Vec::new();
        for name in self.names()? {
            let Some(id) = name.strip_suffix(".json").filter(|id| valid_run_id(id)) else {
                continue;
            };
            match self.load(id) {
                Ok(Some(r)) => runs.push(r),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(run = %id, error = %e, "journal record unreadable; left out of recovery and of the results sent again (its run id is refused): move it away and check the host");
                }
            }
        }
        runs.sort_by_key(|r| r.received_at_ms);
        Ok(runs)
    }

    /// The names in the journal directory.
    fn names(&self) -> Result<Vec<String>, JournalError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| JournalError::Io {
            path: self.dir.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
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
            self.remove(&self.open_dir()?, &ack_name(&run.run_id))?;
            self.save(&run)?;
            recovered.push(run);
        }
        self.sweep_markers()?;
        self.prune()?;
        Ok(recovered)
    }

    /// Marks a run acknowledged (the coordinator stored its result); every `PRUNE_EVERY`
    /// acknowledgements, prunes the journal.
    /// The marker is created, not synced: a crash may lose it, and then the result is sent
    /// again at the next session, which the coordinator answers from its store with another
    /// acknowledgement (a result is recorded once). The record is not rewritten, so an
    /// acknowledgement costs no fsync and can never damage the record. A run id with no
    /// record gets no marker.
    pub fn ack(&self, run_id: &str) -> Result<(), JournalError> {
        let dir = self.open_dir()?;
        if fstatat(
            dir.as_fd(),
            record_name(run_id).as_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok_and(is_regular)
        {
            let marker = ack_name(run_id);
            openat(
                dir.as_fd(),
                marker.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_NONBLOCK
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| self.io(&marker, e))?;
        }
        if self.acks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune()?;
        }
        Ok(())
    }

    /// Removes markers whose record is gone (a prune cut off between the two removals).
    fn sweep_markers(&self) -> Result<(), JournalError> {
        let dir = self.open_dir()?;
        for name in self.names()? {
            if let Some(id) = name.strip_suffix(ACKED).filter(|id| valid_run_id(id))
                && !fstatat(
                    dir.as_fd(),
                    record_name(id).as_str(),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .is_ok_and(is_regular)
            {
                self.remove(&dir, &name)?;
            }
        }
        Ok(())
    }

    /// Removes the oldest finished and acknowledged runs beyond `KEPT_RUNS`. Cheap when there
    /// is nothing to prune (counts names only).
    fn prune(&self) -> Result<(), JournalError> {
        let count = self
            .names()?
            .iter()
            .filter(|n| n.ends_with(".json"))
            .count();
        if count <= KEPT_RUNS {
            return Ok(());
        }
        let runs = self.all()?;
        let excess = runs.len().saturating_sub(KEPT_RUNS);
        let dir = self.open_dir()?;
        for run in runs.iter().filter(|r| r.finished && r.acked).take(excess) {
            // The record first: a marker without its record is swept at the next start.
            let _ = self.remove(&dir, &record_name(&run.run_id));
            let _ = self.remove(&dir, &ack_name(&run.run_id));
        }
        Ok(())
    }
}

/// Whether a status (of something not followed if a symlink) is a regular file's.
fn is_regular(st: nix::sys::stat::FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
}

/// A run's record in the journal directory.
fn record_name(run_id: &str) -> String {
    format!("{run_id}.json")
}

/// The marker of the coordinator's acknowledgement of a run.
fn ack_name(run_id: &str) -> String {
    format!("{run_id}{ACKED}")
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
        assert!(
            left.len() <= KEPT_RUNS + PRUNE_EVERY as usize,
            "{} runs kept",
            left.len()
        );
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

    /// A journal holding `cut_off_run(id)`, in a directory removed when it is dropped.
    fn with_cut_off_run(id: &str) -> (tempfile::TempDir, Journal) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        j.save(&cut_off_run(id)).expect("save");
        (tmp, j)
    }

    /// A run whose only step was running when the agent stopped.
    fn cut_off_run(id: &str) -> RunRecord {
        let mut run = finished_run(id);
        run.finished = false;
        run.steps = vec![StepRecord::pending("git.log", BTreeMap::new())];
        run.steps[0].phase = Phase::Running;
        run
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
        let (tmp, j) = with_cut_off_run("cut");
        let runs = tmp.path().join("runs");
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
    fn a_symlink_in_the_journal_is_never_followed() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        let runs = tmp.path().join("runs");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");

        // A temporary file's name planted as a link: the link goes, the victim stays.
        symlink(&victim, runs.join(".r1.tmp")).expect("link");
        j.save(&finished_run("r1")).expect("save");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        assert!(j.load("r1").expect("load").is_some());

        // A record that is a link is an error, not the victim read as a record.
        symlink(&victim, runs.join("r2.json")).expect("link");
        let err = j.load("r2").expect_err("a linked record");
        assert!(err.to_string().contains("r2.json"), "{err}");
        // Rewriting it replaces the link itself.
        j.save(&finished_run("r2")).expect("save over a link");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        assert!(j.load("r2").expect("load").is_some());

        // A linked marker acknowledges nothing and writes nothing through.
        symlink(&victim, runs.join("r1.acked")).expect("link");
        assert!(!j.load("r1").expect("load").expect("present").acked);
        assert!(j.ack("r1").is_err(), "no marker is written through a link");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    }

    #[test]
    fn an_unreadable_record_does_not_hide_the_others_from_recovery() {
        let (tmp, j) = with_cut_off_run("cut");
        let runs = tmp.path().join("runs");
        std::fs::write(runs.join("garbage.json"), b"{not json").expect("corrupt");
        std::fs::write(tmp.path().join("elsewhere.json"), b"{}").expect("target");
        std::os::unix::fs::symlink(tmp.path().join("elsewhere.json"), runs.join("linked.json"))
            .expect("link");
        let recovered = j.recover().expect("recover");
        assert_eq!(
            recovered
                .iter()
                .map(|r| r.run_id.as_str())
                .collect::<Vec<_>>(),
            ["cut"]
        );
        assert!(j.load("cut").expect("load").expect("present").finished);
        // The unreadable ones still refuse their run ids: an error, never "not run yet".
        assert!(j.load("garbage").is_err());
        assert!(j.load("linked").is_err());
    }

    #[test]
    fn a_fifo_in_the_journal_never_blocks_the_agent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        let runs = tmp.path().join("runs");
        j.save(&finished_run("r1")).expect("save");
        let fifo = |name: &str| {
            nix::unistd::mkfifo(&runs.join(name), Mode::from_bits_truncate(0o600)).expect("fifo");
        };
        fifo(".r2.tmp");
        fifo("r3.json");
        fifo("r1.acked");
        // Each call in a thread of its own: one that blocks fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let saved = j.save(&finished_run("r2")).is_ok();
            let r3 = j.load("r3").is_err();
            let acked = j.ack("r1").is_err();
            let listed = j.all().map(|all| all.len()).unwrap_or(0);
            let _ = tx.send((saved, r3, acked, listed));
        });
        let (saved, r3, acked, listed) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a FIFO in the journal blocked the agent");
        assert!(saved, "a FIFO under the temporary name is removed");
        assert!(r3, "a FIFO record is an error");
        assert!(acked, "no marker is written into a FIFO");
        assert_eq!(listed, 2, "r1 and r2; the FIFO record left out");
    }

    #[test]
    fn a_journal_directory_that_is_a_symlink_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("dir");
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).expect("state");
        std::os::unix::fs::symlink(&elsewhere, state.join("runs")).expect("link");
        let err = Journal::open(&state).expect_err("a linked journal directory");
        assert!(
            err.to_string().contains("a symlink is not followed"),
            "{err}"
        );
    }

    #[test]
    fn a_journal_directory_removed_under_the_agent_is_an_error_not_a_lost_write() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(tmp.path()).expect("open");
        j.save(&finished_run("before")).expect("save");
        std::fs::remove_dir_all(tmp.path().join("runs")).expect("remove");
        let err = j.save(&finished_run("after")).expect_err("no directory");
        assert!(err.to_string().contains("restart the agent"), "{err}");
        // Reopened, as a restart does: a fresh directory, written again.
        let j = Journal::open(tmp.path()).expect("reopen");
        j.save(&finished_run("after")).expect("save");
        assert!(j.load("after").expect("load").is_some());
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
