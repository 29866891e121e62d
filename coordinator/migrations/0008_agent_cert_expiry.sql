-- Not-after (Unix ms) of the certificate each agent's latest session presented, so
-- `rollbackctl agents` can warn about certificates close to expiry. NULL: not known yet.
ALTER TABLE agents ADD COLUMN cert_not_after_ms INTEGER;
