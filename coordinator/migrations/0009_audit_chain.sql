-- The audit trail becomes a hash chain (coordinator/src/store/chain.rs). Each record carries
-- its place in the chain (seq, from 1), the previous record's hash (the first chains from the
-- genesis value, 64 zeros) and its own: SHA-256 over a length-prefixed encoding of seq, at_ms,
-- actor, action, target, detail, job_id and prev_hash. Rows written before this migration are
-- chained at the next start, in id order, once (SQLite has no SHA-256 of its own).
ALTER TABLE audit_events ADD COLUMN seq INTEGER;
ALTER TABLE audit_events ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_events ADD COLUMN hash TEXT NOT NULL DEFAULT '';
-- The job a record is about ('' for none), derived from its target when it is written, so
-- `rollbackctl audit --job` is exact: `job/ID` names the job, `run/ID` the run's job.
ALTER TABLE audit_events ADD COLUMN job_id TEXT NOT NULL DEFAULT '';

-- One record per place in the chain (NULLs, the rows not chained yet, are distinct).
CREATE UNIQUE INDEX audit_events_by_seq ON audit_events (seq);
CREATE INDEX audit_events_by_job ON audit_events (job_id, seq);
CREATE INDEX audit_events_by_time ON audit_events (at_ms);

-- Defence in depth for the store's own checks: every record names who acted and has its place
-- in the chain, and a chained record is never changed or removed through SQL. (Whoever can
-- write the file can drop these triggers; `rollbackctl audit verify` still finds the change.)
CREATE TRIGGER audit_events_need_an_actor BEFORE INSERT ON audit_events
WHEN trim(NEW.actor) = ''
BEGIN
    SELECT RAISE(ABORT, 'audit record without an actor');
END;

CREATE TRIGGER audit_events_are_chained BEFORE INSERT ON audit_events
WHEN NEW.seq IS NULL OR NEW.hash = '' OR NEW.prev_hash = ''
BEGIN
    SELECT RAISE(ABORT, 'audit record without its place in the hash chain');
END;

CREATE TRIGGER audit_events_are_not_changed BEFORE UPDATE ON audit_events
WHEN OLD.seq IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;

CREATE TRIGGER audit_events_are_not_removed BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;
