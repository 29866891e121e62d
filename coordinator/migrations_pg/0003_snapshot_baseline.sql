-- The deployment guard's baseline a snapshot measured on each host (JSON: smoke latency per
-- check, error-log lines per minute, restart count); empty for snapshots taken before.
ALTER TABLE snapshots ADD COLUMN baseline TEXT NOT NULL DEFAULT '';
