-- Labels that choose hosts come from the coordinator's inventory, never from the agent's own
-- claim (Hello). `source` is `config` (coordinator.toml [inventory], replaced at every start)
-- or `operator` (`rollbackctl agents label`); an operator's value wins over the config's.
CREATE TABLE inventory_labels (
    host_id    TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    source     TEXT NOT NULL CHECK (source IN ('config', 'operator')),
    set_by     TEXT NOT NULL,
    set_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (host_id, key, source)
);

-- Upgrading: the labels hosts reported before the inventory existed were what targeted them;
-- they become the starting inventory once (recorded as set by this migration), so targeting is
-- unchanged by the upgrade. From here on a host's claim changes nothing.
INSERT INTO inventory_labels (host_id, key, value, source, set_by, set_at_ms)
SELECT agents.host_id, j.key, j.value, 'operator', 'migration 0006 (labels reported before the inventory)', 0
FROM agents, json_each(agents.labels_json) AS j
WHERE json_valid(agents.labels_json) AND j.type = 'text';
