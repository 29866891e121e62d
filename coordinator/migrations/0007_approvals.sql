-- Two-person approval: a job the policy names is stored `awaiting_approval` with this row; an
-- approver other than the requester decides it (or it expires). Nothing of the job runs first.
CREATE TABLE job_approvals (
    job_id         TEXT PRIMARY KEY NOT NULL,
    -- Why approval is needed, for people (e.g. "procedure database").
    rule           TEXT NOT NULL,
    requested_by   TEXT NOT NULL,
    requested_at_ms INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    -- '' while pending, then approved, denied, expired or cancelled.
    decision       TEXT NOT NULL DEFAULT '',
    decided_by     TEXT NOT NULL DEFAULT '',
    decided_at_ms  INTEGER,
    reason         TEXT NOT NULL DEFAULT ''
);
