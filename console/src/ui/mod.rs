//! `rollbackctl ui`: the web console. A local HTTP server on 127.0.0.1 that talks to the
//! coordinator with the operator's own certificate and context (no second identity system, no
//! new coordinator port). Every request must come from loopback, name this machine in its
//! `Host` header (no DNS rebinding), and carry the random token of the printed URL in its path
//! (`/s/TOKEN/...`); state-changing requests must also come from the console's own origin.
//! Every asset is embedded in the binary and served with a strict Content Security Policy.
//! Nothing here logs a request path, so the token is written nowhere but the printed URL.

mod api;
mod assets;
pub mod markdown;
mod open;

use std::future::IntoFuture as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::Args;
use rollback_common::proto::console_client::ConsoleClient;
use tonic::transport::Channel;

use crate::connect::{self, ConnectFlags};

/// `rollbackctl ui`: where to listen and whether to open a browser.
#[derive(Debug, Args)]
#[command(after_help = "\
The console listens on 127.0.0.1 only and answers only requests that carry the random token
of the URL it prints (a new one every start); share the incident channel's view by sharing your
screen, not the URL. It acts with your certificate and context: what you may not do on the
command line (e.g. approve your own job) the page refuses the same way, saying why.

Examples:
    rollbackctl ui
    rollbackctl ui --port 8080 --open")]
pub struct UiArgs {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Open the console in the desktop's browser (xdg-open); the token is handed over in a
    /// private file, never on a command line.
    #[arg(long)]
    pub open: bool,
}

/// What every request handler shares.
pub(crate) struct UiState {
    pub(crate) client: ConsoleClient<Channel>,
    /// "context prod (https://...)" or "coordinator https://...": what the console acts on.
    pub(crate) target: String,
    pub(crate) coordinator: String,
    token: String,
    port: u16,
}

impl std::fmt::Debug for UiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("UiState")
            .field("target", &self.target)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

pub async fn run(args: UiArgs, flags: &ConnectFlags) -> Result<()> {
    let settings = connect::settings(flags)?;
    let mut client = connect::console(flags).await?;
    // Fail here, naming the coordinator, rather than on the first page.
    client
        .get_runbook(rollback_common::proto::GetRunbookRequest {})
        .await
        .map_err(|s| crate::error::status_error("reaching the coordinator", s))?;
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, args.port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{}", args.port))?;
    let port = listener
        .local_addr()
        .context("the console's address")?
        .port();
    let state = Arc::new(UiState {
        client,
        target: settings.target(),
        coordinator: settings.coordinator.clone(),
        token: new_token(),
        port,
    });
    let url = format!("http://127.0.0.1:{port}/s/{}/", state.token);
    println!("web console for {}:\n    {url}", state.target);
    println!(
        "(this machine only; the URL's token is the key: do not paste it anywhere. Ctrl-C stops the console)"
    );
    let app = service(state);
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let serve = axum::serve(
        listener,
        axum::ServiceExt::<Request>::into_make_service_with_connect_info::<SocketAddr>(app),
    )
    .with_graceful_shutdown(async move { stopped.notified().await })
    .into_future();
    tokio::pin!(serve);
    // The listener is bound: a browser opened now is answered as soon as serving starts.
    let opened = if args.open {
        match open::browser(&url) {
            Ok(file) => Some(file),
            Err(e) => {
                eprintln!(
                    "rollbackctl: could not open a browser ({e:#}); open the URL above yourself"
                );
                None
            }
        }
    } else {
        None
    };
    tokio::select! {
        served = &mut serve => return served.context("serving the web console"),
        _ = tokio::signal::ctrl_c() => {}
    }
    // Pages that follow a job keep their event stream open: give requests a moment to
    // finish, then stop regardless.
    stop.notify_one();
    drop(opened);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), serve).await;
    eprintln!("rollbackctl ui: stopped");
    Ok(())
}

/// The whole console: the gate in front of the router (it must see the path before routing,
/// to check and strip the token).
pub(crate) fn service(
    state: Arc<UiState>,
) -> impl tower::Service<
    Request,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let router = api::router(state.clone());
    tower::Layer::layer(&axum::middleware::from_fn_with_state(state, gate), router)
}

fn new_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!(
        "{:016x}{:016x}{:016x}",
        rng.random::<u64>(),
        rng.random::<u64>(),
        rng.random::<u64>()
    )
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `Host` header names this machine and port, so a page of another site resolved to
/// 127.0.0.1 (DNS rebinding) is not answered.
fn host_ok(headers: &HeaderMap, port: u16) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    ["127.0.0.1", "localhost"]
        .iter()
        .any(|name| host == format!("{name}:{port}") || (port == 80 && host == *name))
}

/// A state-changing request from a browser says where it comes from: only the console itself.
fn origin_ok(headers: &HeaderMap, port: u16) -> bool {
    match headers.get(header::ORIGIN).and_then(|h| h.to_str().ok()) {
        None => true,
        Some(origin) => ["127.0.0.1", "localhost"].iter().any(|name| {
            origin == format!("http://{name}:{port}")
                || (port == 80 && origin == format!("http://{name}"))
        }),
    }
}

/// The path after `/s/TOKEN` when the token is right.
fn strip_token<'a>(path: &'a str, token: &str) -> Option<&'a str> {
    let rest = path.strip_prefix("/s/")?;
    let (given, rest) = rest.split_once('/').unwrap_or((rest, ""));
    same(given.as_bytes(), token.as_bytes()).then_some(rest)
}

fn refuse(status: StatusCode, why: &str) -> Response {
    with_headers((status, format!("rollbackctl ui: {why}\n")).into_response())
}

/// Headers on every answer: a strict CSP (only the console's own scripts, styles and
/// connections; no frames, no inline script), no sniffing, no referrer (the token is in the
/// path), nothing cached.
fn with_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The gate: loopback peer, this machine's Host, the token, the console's own origin for
/// anything but reads. The token is stripped before routing, so no handler ever sees it.
async fn gate(
    State(state): State<Arc<UiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    if !peer.ip().is_loopback() {
        return refuse(
            StatusCode::FORBIDDEN,
            "the web console answers this machine only (loopback)",
        );
    }
    if !host_ok(req.headers(), state.port) {
        return refuse(
            StatusCode::FORBIDDEN,
            "this request does not name this machine (Host must be 127.0.0.1 or localhost)",
        );
    }
    let Some(rest) = strip_token(req.uri().path(), &state.token) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "this page needs the URL `rollbackctl ui` printed, with its token",
        );
    };
    if rest.is_empty() && !req.uri().path().ends_with('/') {
        // The page's relative links need the directory form.
        let to = format!("/s/{}/", state.token);
        return with_headers(axum::response::Redirect::to(&to).into_response());
    }
    if req.method() != Method::GET && !origin_ok(req.headers(), state.port) {
        return refuse(
            StatusCode::FORBIDDEN,
            "a change must come from the console's own page",
        );
    }
    let path_and_query = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    let Ok(uri) = path_and_query.parse::<Uri>() else {
        return refuse(StatusCode::BAD_REQUEST, "malformed path");
    };
    *req.uri_mut() = uri;
    with_headers(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_must_match_exactly() {
        let t = "abc123";
        assert_eq!(strip_token("/s/abc123/api/jobs", t), Some("api/jobs"));
        assert_eq!(strip_token("/s/abc123/", t), Some(""));
        assert_eq!(strip_token("/s/abc123", t), Some(""));
        assert_eq!(strip_token("/s/abc12/api/jobs", t), None);
        assert_eq!(strip_token("/s/abc1234/api/jobs", t), None);
        assert_eq!(strip_token("/s//api/jobs", t), None);
        assert_eq!(strip_token("/api/jobs", t), None);
        assert_eq!(strip_token("/x/abc123/api", t), None);
    }

    #[test]
    fn only_this_machine_is_a_host_and_an_origin() {
        let mut h = HeaderMap::new();
        assert!(!host_ok(&h, 8080), "no Host");
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(host_ok(&h, 8080));
        assert!(!host_ok(&h, 8081));
        h.insert(header::HOST, HeaderValue::from_static("evil.example:8080"));
        assert!(!host_ok(&h, 8080));
        h.insert(header::HOST, HeaderValue::from_static("localhost:8080"));
        assert!(host_ok(&h, 8080));
        assert!(
            origin_ok(&h, 8080),
            "no Origin: not a cross-site browser request"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!origin_ok(&h, 8080));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(origin_ok(&h, 8080));
    }

    fn state() -> Arc<UiState> {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        Arc::new(UiState {
            client: ConsoleClient::new(channel),
            target: "coordinator https://test".into(),
            coordinator: "https://test".into(),
            token: "0123abcd".into(),
            port: 8080,
        })
    }

    async fn get(path: &str, peer: &str, host: &str) -> Response {
        use tower::ServiceExt as _;
        let peer: SocketAddr = peer.parse().expect("a socket address");
        let mut req = Request::builder()
            .uri(path)
            .header(header::HOST, host)
            .body(axum::body::Body::empty())
            .expect("a request");
        req.extensions_mut().insert(ConnectInfo(peer));
        match service(state()).oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    #[tokio::test]
    async fn the_gate_refuses_other_machines_hosts_and_tokens() {
        let ok = get("/s/0123abcd/app.css", "127.0.0.1:5000", "127.0.0.1:8080").await;
        assert_eq!(ok.status(), StatusCode::OK);
        let csp = ok.headers().get(header::CONTENT_SECURITY_POLICY);
        assert!(
            csp.and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("script-src 'self'") && !v.contains("unsafe")),
            "{csp:?}"
        );
        let cases = [
            (
                "/s/0123abcd/app.css",
                "10.1.2.3:5000",
                "127.0.0.1:8080",
                "another machine",
            ),
            (
                "/s/0123abcd/app.css",
                "127.0.0.1:5000",
                "evil.example:8080",
                "a rebound name",
            ),
            (
                "/s/0123abce/app.css",
                "127.0.0.1:5000",
                "127.0.0.1:8080",
                "a wrong token",
            ),
            ("/app.css", "127.0.0.1:5000", "127.0.0.1:8080", "no token"),
        ];
        for (path, peer, host, what) in cases {
            let resp = get(path, peer, host).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{what}");
            assert!(
                resp.headers().contains_key(header::CONTENT_SECURITY_POLICY),
                "{what}"
            );
        }
        let dir = get("/s/0123abcd", "127.0.0.1:5000", "localhost:8080").await;
        assert_eq!(dir.status(), StatusCode::SEE_OTHER);
        for path in [
            "/s/0123abcd/../app.css",
            "/s/0123abcd//app.css",
            "/s/0123abcd/%2e%2e/app.css",
        ] {
            let odd = get(path, "127.0.0.1:5000", "127.0.0.1:8080").await;
            assert_eq!(odd.status(), StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[tokio::test]
    async fn a_change_from_another_origin_is_refused() {
        use tower::ServiceExt as _;
        let post = |origin: Option<&'static str>| {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri("/s/0123abcd/api/jobs/abcd/cancel")
                .header(header::HOST, "127.0.0.1:8080")
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(o) = origin {
                req = req.header(header::ORIGIN, o);
            }
            let mut req = req.body(axum::body::Body::from("{}")).expect("a request");
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 5000))));
            req
        };
        for origin in ["http://evil.example", "null", "http://127.0.0.1:8081"] {
            let resp = match service(state()).oneshot(post(Some(origin))).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin}");
        }
        // Its own origin passes the gate (and then fails on the unreachable coordinator).
        let resp = match service(state())
            .oneshot(post(Some("http://127.0.0.1:8080")))
            .await
        {
            Ok(r) => r,
            Err(never) => match never {},
        };
        assert_ne!(resp.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn port_80_may_be_left_out() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1"));
        assert!(host_ok(&h, 80));
        assert!(!host_ok(&h, 8080));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://localhost"));
        assert!(origin_ok(&h, 80));
        assert!(!origin_ok(&h, 8080));
    }

    #[test]
    fn tokens_are_long_and_fresh() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 48);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
