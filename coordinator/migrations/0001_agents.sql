-- Every agent the coordinator has ever seen, with its last known facts.
CREATE TABLE agents (
    host_id          TEXT PRIMARY KEY NOT NULL,
    labels_json      TEXT NOT NULL,
    agent_version    TEXT NOT NULL,
    address          TEXT NOT NULL,
    online           INTEGER NOT NULL,
    connected_at_ms  INTEGER NOT NULL,
    last_seen_ms     INTEGER NOT NULL,
    state            BLOB
);
