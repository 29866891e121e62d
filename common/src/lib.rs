//! rollback-common: the wire protocol, identities and TLS, label selectors and small shared
//! helpers used by the coordinator, the agent and the console.

pub mod crl;
pub mod daemon;
pub mod expiry;
pub mod identity;
pub mod jobs;
pub mod output_cap;
pub mod pki;
pub mod pki_lifecycle;
pub mod proto;
pub mod runbook;
pub mod selector;
pub mod tls;

/// Milliseconds since the Unix epoch, as carried on the wire. 0 if the clock is before 1970.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An id a client or agent chose (run id, request id): 1-64 of `[A-Za-z0-9_-]`, so it is safe
/// as a file name and in logs.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// The version every binary reports (agent in Hello, coordinator in Ack).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest gRPC message either side accepts or sends (output travels in small chunks).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Largest answer the coordinator sends a console and a console accepts. An answer grows with
/// the fleet: a job's hosts, the agents, a plan's batches or a report at 20,000 hosts are
/// past `MAX_MESSAGE_BYTES` (a finished 20,000-host job is about 4.5 MB), so a console reads
/// up to this much; what a console sends, and everything on an agent's session, stays within
/// `MAX_MESSAGE_BYTES`.
pub const MAX_CONSOLE_ANSWER_BYTES: usize = 64 * 1024 * 1024;
