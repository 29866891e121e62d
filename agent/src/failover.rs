//! The agent's dial loop: one session with one coordinator at a time, moving to the next
//! address when the session ends or cannot be established.
//!
//! Each round resolves every configured URL again (`coordinators::Rotation::round`) and tries
//! the addresses in turn, starting after the one the agent last moved away from. Between two
//! addresses of a round there is only a short random pause (up to `reconnect_initial_ms`), so
//! a fleet whose coordinator died does not arrive at the next one in the same instant; the
//! exponential backoff (`backoff`) is applied once per full round in which no address accepted
//! a session, and reset once a coordinator acknowledges one. A session that was established
//! and then ended starts a fresh round at the next address after the usual short backoff
//! delay; a certificate renewal redials the same address at once.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::certwatch::CertWatch;
use crate::config::Config;
use crate::coordinators::{Rotation, SystemResolver};
use crate::runner::Runner;
use crate::session::{self, SessionEnd, SessionError};
use crate::uplink::Uplink;

/// Waits `delay` unless the agent shuts down first; false if it does.
async fn pause(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// A random pause of at most `upto`.
fn jitter(upto: Duration) -> Duration {
    rand::rng().random_range(Duration::ZERO..=upto)
}

/// An error with its causes, for one log line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Holds a session with one of `rotation`'s coordinators at a time until `cancel`.
pub async fn dial_loop(
    config: &Config,
    mut rotation: Rotation,
    certs: &CertWatch,
    cancel: &CancellationToken,
    runner: &Arc<Runner>,
    uplink: &Uplink,
) {
    let host = config.host_id.as_str();
    let (initial, max) = config.backoff();
    let mut backoff = Backoff::new(initial, max);
    'rounds: loop {
        let round = tokio::select! {
            () = cancel.cancelled() => break,
            r = rotation.round(&SystemResolver) => r,
        };
        for u in &round.unresolved {
            warn!(host = %host, coordinator = %u.url, error = %u.error, "coordinator name did not resolve; trying the other coordinators");
        }
        for (i, target) in round.targets.iter().enumerate() {
            if i > 0 && !pause(cancel, jitter(initial)).await {
                break 'rounds;
            }
            // Each connection presents the pair on disk if it checks out (else the last good one).
            certs.look();
            let mut established = false;
            let result =
                session::run_session(config, target, certs, cancel, runner, uplink, || {
                    backoff.reset();
                    established = true;
                })
                .await;
            let failed = result.is_err();
            let why = match result {
                Ok(SessionEnd::Shutdown) => break 'rounds,
                // Straight back with the renewed certificate, to the same coordinator: nothing failed.
                Ok(SessionEnd::Renewed) => {
                    rotation.stay_at(target);
                    continue 'rounds;
                }
                Ok(SessionEnd::ClosedByCoordinator) => {
                    "the coordinator closed the session".to_string()
                }
                Err(
                    ref e @ SessionError::Refused {
                        code: tonic::Code::PermissionDenied | tonic::Code::Unauthenticated,
                        ..
                    },
                ) => {
                    error!(host = %host, coordinator = %target.url, addr = %target.addr, error = %e, "coordinator refused this agent; check its certificate and host_id");
                    chain(e)
                }
                Err(SessionError::Stream(ref status)) => format!(
                    "session with coordinator broke: {:?}: {}",
                    status.code(),
                    status.message()
                ),
                Err(ref e) => chain(e),
            };
            rotation.move_from(target);
            if established {
                let delay = backoff.next_delay();
                if failed {
                    warn!(host = %host, coordinator = %target.url, addr = %target.addr, reason = %why, delay_ms = delay.as_millis() as u64, "session failed; moving to the next coordinator");
                } else {
                    info!(host = %host, coordinator = %target.url, addr = %target.addr, reason = %why, delay_ms = delay.as_millis() as u64, "session ended; moving to the next coordinator");
                }
                if !pause(cancel, delay).await {
                    break 'rounds;
                }
                continue 'rounds;
            }
            warn!(host = %host, coordinator = %target.url, addr = %target.addr, error = %why, "session failed before the coordinator acknowledged it; trying the next coordinator");
        }
        let delay = backoff.next_delay();
        info!(
            host = %host,
            addresses = round.targets.len(),
            delay_ms = delay.as_millis() as u64,
            "no coordinator accepted a session this round; trying again after backoff"
        );
        if !pause(cancel, delay).await {
            break;
        }
    }
}
