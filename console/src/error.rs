//! Exit codes and how `rollbackctl` explains failures to the person at the terminal.

use std::fmt;

/// Exit codes, documented in `rollbackctl --help`.
pub mod exit {
    /// Everything succeeded.
    pub const OK: i32 = 0;
    /// The command failed (bad input, a failed operation).
    pub const FAILED: i32 = 1;
    /// The coordinator could not be reached.
    pub const UNREACHABLE: i32 = 3;
    /// The coordinator refused: the certificate lacks permission or is not trusted.
    pub const DENIED: i32 = 4;
}

/// The coordinator could not be reached at all.
#[derive(Debug)]
pub struct ConnectFailed {
    pub url: String,
    pub reason: String,
}

impl fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot reach the coordinator at {}: {} (is it running, and do --ca/--cert/--key belong to its fleet?)",
            self.url, self.reason
        )
    }
}

impl std::error::Error for ConnectFailed {}

/// Turns a gRPC status into an error message an operator can act on.
pub fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(StatusError {
        what: what.to_string(),
        status,
    })
}

#[derive(Debug)]
pub struct StatusError {
    pub what: String,
    pub status: tonic::Status,
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = match self.status.code() {
            tonic::Code::PermissionDenied => {
                " (check which certificate you used and your role in the coordinator's [operators] table)"
            }
            tonic::Code::Unauthenticated => " (use an operator certificate issued by the fleet CA)",
            tonic::Code::Unavailable => " (is the coordinator running?)",
            _ => "",
        };
        write!(f, "{}: {}{hint}", self.what, self.status.message())
    }
}

impl std::error::Error for StatusError {}

/// The exit code for an error: denied, unreachable, or failed.
/// The call failed because the connection went away mid-call (not a refusal): `Some(true)`
/// when it got as far as the coordinator, `Some(false)` when it could not connect at all.
pub fn connection_broke(err: &anyhow::Error) -> Option<bool> {
    for cause in err.chain() {
        if let Some(s) = cause.downcast_ref::<StatusError>() {
            return matches!(
                s.status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            )
            .then_some(true);
        }
        if cause.downcast_ref::<ConnectFailed>().is_some() {
            return Some(false);
        }
    }
    None
}

pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(s) = cause.downcast_ref::<StatusError>() {
            return match s.status.code() {
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => exit::DENIED,
                tonic::Code::Unavailable => exit::UNREACHABLE,
                _ => exit::FAILED,
            };
        }
        if cause.downcast_ref::<ConnectFailed>().is_some() {
            return exit::UNREACHABLE;
        }
    }
    exit::FAILED
}
