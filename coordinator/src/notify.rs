//! Webhook notifications: `[[webhooks]]` in coordinator.toml, told when a job starts, awaits
//! approval, halts and finishes. Each webhook gets a Slack-compatible body (`{"text": ...}`)
//! or a generic JSON body, signed with HMAC-SHA256 over `"{timestamp}.{body}"` with its
//! secret: `X-Fleet-Rollback-Timestamp: <unix seconds>` and
//! `X-Fleet-Rollback-Signature: sha256=<hex>`. A receiver checks the signature and refuses a
//! timestamp too old, which stops a replay.
//!
//! Invariant: notifying never blocks or fails a job. The job engine hands an event over with
//! `try_send` into each webhook's bounded queue and goes on; each webhook has one worker that
//! delivers its queue in order, retrying with backoff (a receiver that is down costs its own
//! worker time, nobody else's). A full queue drops the event with a warning. A delivery that
//! succeeded is recorded in the audit trail (`notify.sent`, on the job), which is how the
//! incident report ticks "Notify stakeholders".

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::body::Bytes;
use rollback_common::jobs::EventKind;
use rollback_common::proto::JobEvent;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{AuditEvent, Store};

/// Events one webhook's queue holds before new ones are dropped.
const QUEUE: usize = 256;
/// Tries per event, the first included.
const ATTEMPTS: u32 = 5;
/// One try's limit: connect, TLS, request and answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before the second try; doubled after each failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-fleet-rollback-signature";
/// The header carrying the signed timestamp (unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-fleet-rollback-timestamp";

/// The job events a webhook may ask for, as written in `events`.
pub const EVENTS: &[&str] = &["started", "awaiting_approval", "halted", "finished"];

/// The body a webhook gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"text": "..."}`: Slack incoming webhooks, Mattermost, and most chat tools.
    Slack,
    /// `{"event", "job_id", "job_state", "message", "at_unix_ms", "coordinator"}`.
    #[default]
    Json,
}

/// `[[webhooks]]` in coordinator.toml.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the webhook in logs, the audit trail and the report.
    pub name: String,
    /// `http://` or `https://` endpoint that receives a POST per event.
    pub url: String,
    #[serde(default)]
    pub format: Format,
    /// A file holding the HMAC secret (same rules as `database_password_file`: a regular
    /// file no one else may read). Without it the requests are unsigned.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// For `https://`: the CA bundle (PEM) to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Which of `started`, `awaiting_approval`, `halted`, `finished` (default: all).
    #[serde(default = "default_events")]
    pub events: Vec<String>,
}

fn default_events() -> Vec<String> {
    EVENTS.iter().map(|e| (*e).to_string()).collect()
}

/// Why a `[[webhooks]]` entry is refused.
#[derive(Debug, thiserror::Error)]
#[error("[[webhooks]] `{name}`: {reason}")]
pub struct WebhookError {
    pub name: String,
    pub reason: String,
}

/// The name of an event a webhook can ask for, for the job events that have one.
fn event_name(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::JobStarted => Some("started"),
        EventKind::JobAwaitingApproval => Some("awaiting_approval"),
        EventKind::JobHalted => Some("halted"),
        EventKind::JobFinished => Some("finished"),
        _ => None,
    }
}

/// A webhook's secret; never printed.
#[derive(Clone, PartialEq, Eq)]
struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One webhook, checked and ready to deliver to.
#[derive(Debug)]
struct Target {
    name: String,
    url: url::Url,
    format: Format,
    secret: Option<Secret>,
    tls: Option<Arc<rustls::ClientConfig>>,
    events: BTreeSet<String>,
}

/// An event to deliver.
#[derive(Debug, Clone)]
struct Notice {
    event: &'static str,
    job_id: String,
    job_state: String,
    message: String,
    at_unix_ms: i64,
}

/// A webhook with its worker's queue.
#[derive(Debug)]
struct Handle {
    name: String,
    events: BTreeSet<String>,
    tx: mpsc::Sender<Notice>,
}

/// Checked webhooks, ready to be put in force (`Notifier::replace`).
#[derive(Debug, Default)]
pub struct Targets(Vec<Target>);

impl Targets {
    /// Checks every `[[webhooks]]` entry: a unique name, an http(s) URL with a host, known
    /// events, a readable secret, a loadable CA bundle.
    pub fn from_config(
        webhooks: &[WebhookConfig],
        read_secret: impl Fn(&std::path::Path) -> Result<String, String>,
    ) -> Result<Self, WebhookError> {
        let mut names = BTreeSet::new();
        let mut out = Vec::new();
        for w in webhooks {
            let bad = |reason: String| WebhookError {
                name: w.name.clone(),
                reason,
            };
            if w.name.is_empty()
                || w.name.len() > 63
                || !w
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(bad(
                    "`name` must be 1 to 63 letters, digits, `-`, `_` or `.`".into(),
                ));
            }
            if !names.insert(w.name.clone()) {
                return Err(bad("another webhook has this name".into()));
            }
            let url = url::Url::parse(&w.url).map_err(|e| bad(format!("`url`: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(bad(
                    "`url` must be http://HOST/... or https://HOST/...".into()
                ));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(bad(
                    "`url` must not carry a user or password; use `secret_file` to sign requests"
                        .into(),
                ));
            }
            if url.scheme() == "http" && w.ca_file.is_some() {
                return Err(bad("`ca_file` is only for https:// URLs".into()));
            }
            let events: BTreeSet<String> = w.events.iter().cloned().collect();
            if events.is_empty() {
                return Err(bad(format!(
                    "`events` is empty; name some of {}",
                    EVENTS.join(", ")
                )));
            }
            if let Some(e) = events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
                return Err(bad(format!(
                    "`events`: `{e}` is not one of {}",
                    EVENTS.join(", ")
                )));
            }
            let secret = match &w.secret_file {
                Some(file) => Some(Secret(
                    read_secret(file)
                        .map_err(|r| bad(format!("`secret_file` {}: {r}", file.display())))?
                        .into_bytes(),
                )),
                None => None,
            };
            let tls = if url.scheme() == "https" {
                Some(Arc::new(client_tls(w.ca_file.as_deref()).map_err(bad)?))
            } else {
                None
            };
            out.push(Target {
                name: w.name.clone(),
                url,
                format: w.format,
                secret,
                tls,
                events,
            });
        }
        Ok(Self(out))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// TLS for https webhooks: the given CA bundle, or the system's roots.
fn client_tls(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            let pem =
                std::fs::read(file).map_err(|e| format!("`ca_file` {}: {e}", file.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("`ca_file` {}: {e}", file.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("`ca_file` {}: {e}", file.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("`ca_file` {} holds no certificate", file.display()));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // One unusable system certificate does not stop the others.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system CA certificates found (install ca-certificates) and no `ca_file` given".into());
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| format!("TLS setup: {e}"))
}

/// The webhooks in force and their workers.
pub struct Notifier {
    handles: RwLock<Arc<Vec<Handle>>>,
    store: Arc<dyn Store>,
    coordinator: String,
    cancel: CancellationToken,
}

impl Notifier {
    pub fn new(store: Arc<dyn Store>, coordinator: String, cancel: CancellationToken) -> Self {
        Self {
            handles: RwLock::new(Arc::new(Vec::new())),
            store,
            coordinator,
            cancel,
        }
    }

    /// Puts `targets` in force: a worker each. The previous workers finish what they hold and
    /// stop.
    pub fn replace(&self, targets: Targets) {
        let handles: Vec<Handle> = targets
            .0
            .into_iter()
            .map(|t| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let handle = Handle {
                    name: t.name.clone(),
                    events: t.events.clone(),
                    tx,
                };
                tokio::spawn(worker(
                    t,
                    rx,
                    self.store.clone(),
                    self.coordinator.clone(),
                    self.cancel.clone(),
                ));
                handle
            })
            .collect();
        *self
            .handles
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(handles);
    }

    /// Hands a job event to every webhook that wants it; never waits.
    pub fn notify(&self, job_id: &str, kind: EventKind, event: &JobEvent) {
        let Some(name) = event_name(kind) else {
            return;
        };
        let handles = self
            .handles
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for h in handles.iter().filter(|h| h.events.contains(name)) {
            let notice = Notice {
                event: name,
                job_id: job_id.to_string(),
                job_state: event.job_state.clone(),
                message: event.message.clone(),
                at_unix_ms: event.at_unix_ms,
            };
            if let Err(e) = h.tx.try_send(notice) {
                warn!(webhook = %h.name, job = %job_id, event = name, error = %e, "webhook queue full or closed; this notification is dropped (the receiver has been failing for a while)");
            }
        }
    }
}

/// Delivers one webhook's queue in order until the queue is replaced or the coordinator stops.
async fn worker(
    target: Target,
    mut rx: mpsc::Receiver<Notice>,
    store: Arc<dyn Store>,
    coordinator: String,
    cancel: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            () = cancel.cancelled() => return,
            n = rx.recv() => match n { Some(n) => n, None => return },
        };
        let body = body(target.format, &notice, &coordinator);
        let mut backoff = FIRST_BACKOFF;
        let mut last_error = String::new();
        let mut sent = false;
        for attempt in 1..=ATTEMPTS {
            let tried = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(ATTEMPT_TIMEOUT, post(&target, &body)) => r,
            };
            match tried {
                Ok(Ok(())) => {
                    sent = true;
                    break;
                }
                Ok(Err(e)) => last_error = e,
                Err(_) => last_error = format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()),
            }
            if attempt < ATTEMPTS {
                warn!(webhook = %target.name, job = %notice.job_id, event = notice.event, attempt, error = %last_error, retry_in = ?backoff, "webhook delivery failed; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff *= 2;
            }
        }
        if !sent {
            warn!(webhook = %target.name, job = %notice.job_id, event = notice.event, attempts = ATTEMPTS, error = %last_error, "webhook delivery gave up; the job is not affected");
            continue;
        }
        info!(webhook = %target.name, job = %notice.job_id, event = notice.event, "webhook notified");
        let audit = AuditEvent {
            at_ms: rollback_common::now_unix_ms(),
            actor: "coordinator".into(),
            action: "notify.sent".into(),
            target: format!("job/{}", notice.job_id),
            detail: format!("webhook={} event={}", target.name, notice.event),
        };
        if let Err(e) = store.append_audit(&audit).await {
            warn!(webhook = %target.name, job = %notice.job_id, error = %e, "could not record the notification in the audit trail");
        }
    }
}

/// The request body for `notice`.
fn body(format: Format, n: &Notice, coordinator: &str) -> Vec<u8> {
    let value = match format {
        Format::Slack => {
            let short = n.job_id.get(..12).unwrap_or(&n.job_id);
            let title = match n.event {
                "started" => "started",
                "awaiting_approval" => "awaits approval",
                "halted" => "HALTED",
                _ => "finished",
            };
            serde_json::json!({
                "text": format!(
                    "fleet-rollback job {short} {title} ({}): {} [coordinator {coordinator}]",
                    n.job_state, n.message
                )
            })
        }
        Format::Json => serde_json::json!({
            "event": n.event,
            "job_id": n.job_id,
            "job_state": n.job_state,
            "message": n.message,
            "at_unix_ms": n.at_unix_ms,
            "coordinator": coordinator,
        }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// `sha256=<hex of HMAC-SHA256(secret, "{timestamp}.{body}")>`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One POST; any 2xx answer is success.
async fn post(target: &Target, body: &[u8]) -> Result<(), String> {
    let url = &target.url;
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let timestamp = (rollback_common::now_unix_ms() / 1000).to_string();
    let mut req = hyper::Request::post(match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    })
    .header(hyper::header::HOST, host_header(url))
    .header(hyper::header::CONTENT_TYPE, "application/json")
    .header(
        hyper::header::USER_AGENT,
        concat!("fleet-rollback/", env!("CARGO_PKG_VERSION")),
    )
    .header(TIMESTAMP_HEADER, &timestamp);
    if let Some(secret) = &target.secret {
        req = req.header(SIGNATURE_HEADER, signature(&secret.0, &timestamp, body));
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| format!("building the request: {e}"))?;
    let status = match &target.tls {
        Some(tls) => {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| format!("server name {host}: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            send(stream, req).await?
        }
        None => send(tcp, req).await?,
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}"))
    }
}

fn host_header(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

async fn send<S>(stream: S, req: hyper::Request<Full<Bytes>>) -> Result<hyper::StatusCode, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let answer = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    // Only the status counts: the body is never read (a receiver cannot make us hold an
    // endless answer), and the connection is dropped with it.
    let status = answer.status();
    drop(answer);
    driver.abort();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(name: &str, url: &str) -> WebhookConfig {
        WebhookConfig {
            name: name.into(),
            url: url.into(),
            format: Format::Json,
            secret_file: None,
            ca_file: None,
            events: default_events(),
        }
    }

    fn no_secret(_: &std::path::Path) -> Result<String, String> {
        Err("unexpected".into())
    }

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // The framing is `timestamp.body`: the same MAC computed over the joined bytes.
        let sig = signature(b"key", "1700000000", b"{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").expect("any key length");
        mac.update(b"1700000000.{}");
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig, want);
        assert_ne!(signature(b"other", "1700000000", b"{}"), want);
        assert_ne!(signature(b"key", "1700000001", b"{}"), want);
    }

    #[test]
    fn refuses_bad_webhooks_naming_them() {
        let e = |w: WebhookConfig| {
            Targets::from_config(&[w], no_secret)
                .expect_err("refused")
                .to_string()
        };
        assert!(e(hook("a", "ftp://x/")).contains("`a`"));
        assert!(e(hook("a", "not a url")).contains("`url`"));
        assert!(e(hook("a", "http://u:p@x/")).contains("user or password"));
        assert!(e(hook("a b", "http://x/")).contains("`name`"));
        let mut w = hook("a", "http://x/");
        w.events = vec!["exploded".into()];
        assert!(e(w).contains("`exploded`"));
        let mut w = hook("a", "http://x/");
        w.ca_file = Some("/nonexistent".into());
        assert!(e(w).contains("only for https"));
        let mut w = hook("a", "https://x/");
        w.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(e(w).contains("/nonexistent/ca.pem"));
        let two = [hook("a", "http://x/"), hook("a", "http://y/")];
        assert!(
            Targets::from_config(&two, no_secret)
                .expect_err("duplicate")
                .to_string()
                .contains("another webhook")
        );
        assert_eq!(
            Targets::from_config(&[hook("ok", "http://127.0.0.1:9/hook")], no_secret)
                .map(|t| t.len())
                .ok(),
            Some(1)
        );
    }

    #[test]
    fn only_the_four_job_events_notify() {
        assert_eq!(event_name(EventKind::JobStarted), Some("started"));
        assert_eq!(event_name(EventKind::JobHalted), Some("halted"));
        assert_eq!(event_name(EventKind::StepOutput), None);
        for e in EVENTS {
            assert!(
                EventKind::ALL
                    .iter()
                    .filter_map(|k| event_name(*k))
                    .any(|n| n == *e)
            );
        }
    }
}
