-- Last-known-good states recorded by `rollbackctl snapshot`, one row per host per snapshot.
CREATE TABLE snapshots (
    snapshot_id       TEXT NOT NULL,
    host_id           TEXT NOT NULL,
    job_id            TEXT NOT NULL,
    label             TEXT NOT NULL,
    taken_at_ms       INTEGER NOT NULL,
    git_sha           TEXT NOT NULL,
    git_subject       TEXT NOT NULL,
    alembic_revision  TEXT NOT NULL,
    env_sha256        TEXT NOT NULL,
    unit_state        TEXT NOT NULL,
    db_backup         TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, host_id)
);
CREATE INDEX snapshots_by_host ON snapshots (host_id, taken_at_ms);
