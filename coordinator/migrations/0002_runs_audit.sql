-- A run: the steps one host was asked to execute, and what it reported.
CREATE TABLE runs (
    run_id          TEXT PRIMARY KEY NOT NULL,
    job_id          TEXT NOT NULL,
    host_id         TEXT NOT NULL,
    requested_by    TEXT NOT NULL,
    reason          TEXT NOT NULL,
    procedure       BLOB NOT NULL,      -- encoded RunProcedure as dispatched
    status          INTEGER NOT NULL,   -- StepStatus of the run; 0 while running
    created_at_ms   INTEGER NOT NULL,
    finished_at_ms  INTEGER,
    result          BLOB                -- encoded RunFinished as the agent reported it
);
CREATE INDEX runs_by_job ON runs (job_id);
CREATE INDEX runs_by_host ON runs (host_id, created_at_ms);

-- Who did what, when, and why. Append-only.
CREATE TABLE audit_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms     INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    detail    TEXT NOT NULL
);
