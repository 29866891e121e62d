-- Progress per host and phase, so a job can be resumed exactly where it stopped.
ALTER TABLE job_hosts ADD COLUMN done_phases TEXT NOT NULL DEFAULT '';

-- One job per host: a host is leased to the job that is changing it. Released in the same
-- transaction that ends the job.
CREATE TABLE host_leases (
    host_id         TEXT PRIMARY KEY NOT NULL,
    job_id          TEXT NOT NULL,
    acquired_at_ms  INTEGER NOT NULL
);
CREATE INDEX host_leases_by_job ON host_leases (job_id);

-- The client's idempotency key for StartRollback: a retried start returns the job it made.
ALTER TABLE jobs ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX jobs_by_request_id ON jobs (request_id) WHERE request_id <> '';
