//! `http.check {endpoint, expect, retries, interval_ms}`: GET a path on the host's own health
//! base URL until it answers the expected status, or fail with the last status seen.
//! A small HTTP/1.1 client: the agent talks to exactly one configured base URL. Retrying stops
//! at the step's timeout (`TimedOut`) and at once on cancel (`Cancelled`), also mid-request.

use rollback_common::jobs::fact;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use rollback_common::proto::StepStatus;

use super::{Failure, StepCtx};
use crate::profile::valid_health_base;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub endpoint: String,
    pub expect: u16,
    /// Extra attempts after the first.
    pub retries: u32,
    pub interval: Duration,
}

/// An HTTP answer: its status and the first [`MAX_BODY`] bytes of its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Bytes of an answer that are read (headers included); the rest is not waited for.
pub const MAX_BODY: usize = 64 * 1024;

impl Answer {
    /// The body's first line, at most 200 characters (what output lines show).
    pub fn first_line(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect()
    }
}

/// One request (`GET` or `HEAD`, nothing else) to the app, bounded by `timeout` as a whole:
/// the answer, or why there was none.
pub async fn request(
    method: &str,
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<Answer, String> {
    if method != "GET" && method != "HEAD" {
        return Err(format!("method {method} is not allowed"));
    }
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rollback-agent\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        while buf.len() < MAX_BODY {
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if buf.is_empty() => return Err(format!("read: {e}")),
                Err(_) => break,
            }
        }
        let head_end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(buf.len(), |i| i + 4);
        let status = String::from_utf8_lossy(&buf[..head_end])
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "answer is not HTTP".to_string())?;
        Ok(Answer {
            status,
            body: buf[head_end..].to_vec(),
        })
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// One GET: the status code and the body's first line, or why there was none.
pub async fn get(
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    request("GET", host, port, path, timeout)
        .await
        .map(|a| (a.status, a.first_line()))
}

/// How one wait of the check ended.
enum Wait<T> {
    Done(T),
    Cancelled,
    TimedOut,
}

/// Waits for `fut`, unless the step is cancelled (checked first) or its time is up.
async fn wait<T>(
    fut: impl std::future::Future<Output = T>,
    cancel: &tokio_util::sync::CancellationToken,
    deadline: tokio::time::Instant,
) -> Wait<T> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Wait::Cancelled,
        () = tokio::time::sleep_until(deadline) => Wait::TimedOut,
        v = fut => Wait::Done(v),
    }
}

pub(super) async fn run(check: &Check, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let base = ctx
        .config
        .app
        .as_ref()
        .and_then(|a| a.health_base_url.clone())
        .unwrap_or_default();
    let (host, port) = valid_health_base(&base)
        .map_err(|e| Failure::new(-1, format!("app.health_base_url: {e}")))?;
    let url = format!("{}{}", base.trim_end_matches('/'), check.endpoint);
    ctx.fact(fact::ENDPOINT, check.endpoint.clone());
    let deadline = tokio::time::Instant::now() + ctx.timeout;
    let cancel = ctx.cancel.clone();
    let timeout = ctx.timeout;
    let mut last = String::from("no attempt made");
    let mut attempts = 0u32;
    let stopped = |ending: &Wait<()>, attempts: u32, last: &str| match ending {
        Wait::Cancelled => Failure {
            status: StepStatus::Cancelled,
            exit_code: -1,
            error: format!(
                "cancelled while checking {url} after {attempts} attempt(s); last: {last}"
            ),
        },
        _ => Failure {
            status: StepStatus::TimedOut,
            exit_code: -1,
            error: format!(
                "{url} did not answer {} within the step timeout {:?} ({attempts} attempt(s)); last: {last}",
                check.expect, timeout
            ),
        },
    };
    for attempt in 0..=check.retries {
        if attempt > 0 {
            match wait(tokio::time::sleep(check.interval), &cancel, deadline).await {
                Wait::Done(()) => {}
                ending => return Err(stopped(&ending, attempts, &last)),
            }
        }
        let per_try = check
            .interval
            .max(Duration::from_secs(2))
            .min(Duration::from_secs(10));
        let answer = match wait(
            get(&host, port, &check.endpoint, per_try),
            &cancel,
            deadline,
        )
        .await
        {
            Wait::Done(answer) => answer,
            Wait::Cancelled => return Err(stopped(&Wait::Cancelled, attempts, &last)),
            Wait::TimedOut => return Err(stopped(&Wait::TimedOut, attempts + 1, &last)),
        };
        attempts += 1;
        match answer {
            Ok((status, body)) if status == check.expect => {
                ctx.say(&format!(
                    "GET {url} -> {status} {body} (attempt {})",
                    attempt + 1
                ));
                ctx.fact(fact::STATUS, status.to_string());
                return Ok(());
            }
            Ok((status, body)) => {
                last = format!("status {status} {body}").trim().to_string();
                ctx.fact(fact::STATUS, status.to_string());
            }
            Err(e) => {
                last = e;
                ctx.fact(fact::STATUS, "none");
            }
        }
        ctx.say(&format!(
            "GET {url} -> {last} (attempt {} of {})",
            attempt + 1,
            check.retries + 1
        ));
    }
    if cancel.is_cancelled() {
        return Err(stopped(&Wait::Cancelled, attempts, &last));
    }
    Err(Failure::new(
        -1,
        format!(
            "{url} did not answer {} after {} attempts; last: {last}",
            check.expect,
            check.retries + 1
        ),
    ))
}
