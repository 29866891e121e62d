-- The host a job event is about ('' for the job's own events), so the job's history and a
-- watch for its end read its own events without the tens of thousands about its hosts.
-- NULL on rows stored before: unknown, read as possibly the job's own and checked decoded.
ALTER TABLE job_events ADD COLUMN host_id TEXT;
