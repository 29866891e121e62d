//! `http.check {endpoint, expect, retries, interval_ms}`: GET a path on the host's own health
//! base URL until it answers the expected status, or fail with the last status seen.
//! A small HTTP/1.1 client: the agent talks to exactly one configured base URL.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// One attempt: the status code, or why there was none. Also returns the body's first line.
pub async fn get(
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rollback-agent\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        while buf.len() < 64 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if buf.is_empty() => return Err(format!("read: {e}")),
                Err(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "answer is not HTTP".to_string())?;
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
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
    let mut last = String::from("no attempt made");
    for attempt in 0..=check.retries {
        if attempt > 0 {
            tokio::select! {
                () = ctx.cancel.cancelled() => return Err(Failure { status: rollback_common::proto::StepStatus::Cancelled, exit_code: -1, error: "cancelled".into() }),
                () = tokio::time::sleep(check.interval) => {}
            }
        }
        let per_try = check
            .interval
            .max(Duration::from_secs(2))
            .min(Duration::from_secs(10));
        match get(&host, port, &check.endpoint, per_try).await {
            Ok((status, body)) if status == check.expect => {
                ctx.say(&format!(
                    "GET {url} -> {status} {body} (attempt {})",
                    attempt + 1
                ));
                ctx.fact("status", status.to_string());
                ctx.fact("endpoint", check.endpoint.clone());
                return Ok(());
            }
            Ok((status, body)) => {
                last = format!("status {status} {body}").trim().to_string();
                ctx.fact("status", status.to_string());
            }
            Err(e) => {
                last = e;
                ctx.fact("status", "none");
            }
        }
        ctx.say(&format!(
            "GET {url} -> {last} (attempt {} of {})",
            attempt + 1,
            check.retries + 1
        ));
    }
    ctx.fact("endpoint", check.endpoint.clone());
    Err(Failure::new(
        -1,
        format!(
            "{url} did not answer {} after {} attempts; last: {last}",
            check.expect,
            check.retries + 1
        ),
    ))
}
