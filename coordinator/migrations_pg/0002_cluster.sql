-- Several coordinators on one store (issue #13): see the SQLite migration 0010_cluster.
CREATE TABLE coordinators (
    name            TEXT PRIMARY KEY NOT NULL,
    instance        TEXT NOT NULL,
    address         TEXT NOT NULL,
    version         TEXT NOT NULL,
    started_at_ms   BIGINT NOT NULL,
    heartbeat_ms    BIGINT NOT NULL
);
ALTER TABLE agents ADD COLUMN coordinator TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN owner_instance TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN owner_until_ms BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_running_by_lease ON jobs (owner_until_ms) WHERE state = 'running';
