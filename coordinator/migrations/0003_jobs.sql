-- Rollback jobs: what was asked, the plan, and how it went.
CREATE TABLE jobs (
    job_id          TEXT PRIMARY KEY NOT NULL,
    procedure       TEXT NOT NULL,
    request         BLOB NOT NULL,   -- encoded RollbackRequest
    plan            BLOB NOT NULL,   -- encoded PlanResponse
    state           TEXT NOT NULL,
    reason          TEXT NOT NULL,
    requested_by    TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    finished_at_ms  INTEGER,
    halt_reason     TEXT NOT NULL DEFAULT ''
);

-- Each host's outcome in a job.
CREATE TABLE job_hosts (
    job_id       TEXT NOT NULL,
    host_id      TEXT NOT NULL,
    ord          INTEGER NOT NULL,
    outcome      TEXT NOT NULL,
    phase        TEXT NOT NULL DEFAULT '',
    failed_step  TEXT NOT NULL DEFAULT '',
    exit_code    INTEGER NOT NULL DEFAULT 0,
    detail       TEXT NOT NULL DEFAULT '',
    duration_ms  INTEGER NOT NULL DEFAULT 0,
    once_only    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, host_id)
);

-- Everything that happened in a job, in order (what `watch` replays).
CREATE TABLE job_events (
    job_id      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    event       BLOB NOT NULL,    -- encoded JobEvent
    PRIMARY KEY (job_id, seq)
);

ALTER TABLE runs ADD COLUMN phase TEXT NOT NULL DEFAULT '';
