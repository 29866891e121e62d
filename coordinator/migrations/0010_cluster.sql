-- Several coordinators on one store (issue #13).
-- Each coordinator process heartbeats its row; a peer whose heartbeat is older than the lease
-- is dead: its agents are offline and its jobs are taken over.
CREATE TABLE coordinators (
    name            TEXT PRIMARY KEY NOT NULL,
    instance        TEXT NOT NULL,
    address         TEXT NOT NULL,
    version         TEXT NOT NULL,
    started_at_ms   INTEGER NOT NULL,
    heartbeat_ms    INTEGER NOT NULL
);

-- Which coordinator holds the agent's session (its name); '' before this migration.
ALTER TABLE agents ADD COLUMN coordinator TEXT NOT NULL DEFAULT '';

-- The job's owner drives it: the owner's name, its process instance, and until when its lease
-- holds. Another coordinator takes a running job over once the lease has lapsed.
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN owner_instance TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN owner_until_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_running_by_lease ON jobs (owner_until_ms) WHERE state = 'running';
