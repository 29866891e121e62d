//! A real browser for the web console's tests: headless Chromium (Debian's `chromium`,
//! installed by `cargo xtask test`) driven over WebDriver by `chromedriver`, both run in the
//! lab's coordinator network namespace where `rollbackctl ui` listens on 127.0.0.1. Also the
//! plain HTTP/1.1 client the tests use for raw requests, and a loopback relay that makes a
//! console inside a namespace reachable from this machine's own loopback (the demo's `--ui`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Why this machine cannot run the browser tests, if it cannot.
pub fn missing() -> Option<String> {
    [CHROMIUM, CHROMEDRIVER]
        .iter()
        .find(|p| !Path::new(p).exists())
        .map(|p| format!("{p} is missing (cargo xtask test installs chromium and chromium-driver)"))
}

/// A TCP connection to `addr` made inside network namespace `netns` (a name under
/// /run/netns), or in this process's own namespace for `None`. The namespace is entered by a
/// short-lived thread; the socket stays in it.
pub fn connect(netns: Option<&str>, addr: SocketAddr) -> Result<TcpStream> {
    let Some(netns) = netns else {
        return TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to {addr}"));
    };
    let path = crate::lab::net::netns_path(netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {netns}"))?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .with_context(|| format!("connecting to {addr} in {netns}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
    })
}

/// An HTTP response: status, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON ({}): {}", self.status, self.text()))
    }
}

/// One HTTP/1.1 request (`Connection: close`) to `addr`, from inside `netns`. `headers`
/// may override Host.
pub fn request(
    netns: Option<&str>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response> {
    let mut stream = connect(netns, addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(b) = body {
        stream.write_all(b)?;
    }
    // Read until the response is complete by its own framing (Content-Length, the last chunk,
    // or the end of the connection): some servers keep it open despite `Connection: close`.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if complete(&raw) {
            break;
        }
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_response(&raw).with_context(|| format!("{method} {path}"))
}

/// Whether `raw` holds a whole response.
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    let length = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(length) = length {
        return body.len() >= length;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    false
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(rest.len() >= size + 2, "a truncated chunk");
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// `chromedriver` running in a network namespace; sessions are headless Chromium windows.
pub struct Driver {
    child: Child,
    netns: String,
    addr: SocketAddr,
    profiles: tempfile::TempDir,
}

const DRIVER_PORT: u16 = 9515;

impl Driver {
    /// Starts chromedriver with `cmd` (a command that runs [`CHROMEDRIVER`] in `netns`).
    pub fn start(mut cmd: Command, netns: &str) -> Result<Self> {
        if let Some(why) = missing() {
            bail!("{why}");
        }
        cmd.arg(format!("--port={DRIVER_PORT}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().context("starting chromedriver")?;
        let addr: SocketAddr = ([127, 0, 0, 1], DRIVER_PORT).into();
        let driver = Self {
            child,
            netns: netns.to_string(),
            addr,
            profiles: tempfile::tempdir().context("a directory for browser profiles")?,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match driver.call("GET", "/status", None) {
                Ok(v) if v["ready"] == json!(true) => return Ok(driver),
                _ if Instant::now() > deadline => bail!("chromedriver not ready after 30s"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let headers = [("Content-Type", "application/json")];
        let resp = request(
            Some(&self.netns),
            self.addr,
            method,
            path,
            &headers,
            bytes.as_deref(),
        )?;
        let v = resp.json()?;
        if resp.status != 200 {
            bail!(
                "webdriver {method} {path}: {} {}",
                resp.status,
                v["value"]["message"].as_str().unwrap_or_default()
            );
        }
        Ok(v["value"].clone())
    }

    /// A new headless browser window with its own profile.
    pub fn session(&self) -> Result<Session<'_>> {
        self.session_with(&[])
    }

    /// A new window started with extra Chromium flags (e.g. `--force-dark-mode`).
    pub fn session_with(&self, extra: &[&str]) -> Result<Session<'_>> {
        let profile = self.profiles.path().join(format!("p{}", rand_suffix()));
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args }
        }}});
        let v = self.call("POST", "/session", Some(&caps))?;
        let id = v["sessionId"]
            .as_str()
            .context("no session id from chromedriver")?
            .to_string();
        Ok(Session { driver: self, id })
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// WebDriver's Tab key.
pub const TAB: &str = "\u{E004}";
/// WebDriver's Enter key.
pub const ENTER: &str = "\u{E007}";

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser window.
pub struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl Session<'_> {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        self.driver
            .call(method, &format!("/session/{}{path}", self.id), body)
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", Some(&json!({ "url": url })))
            .with_context(|| format!("opening {url}"))?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub fn exec(&self, script: &str, args: Value) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The first element matching `css`, if there is one now.
    pub fn find(&self, css: &str) -> Result<Option<String>> {
        let found = self.call(
            "POST",
            "/elements",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        Ok(found
            .as_array()
            .and_then(|a| a.first())
            .and_then(|e| e[ELEMENT].as_str())
            .map(str::to_string))
    }

    /// Polls `found` every 100 ms for up to `timeout`; the failure names `what` and shows
    /// what the page says.
    fn poll<T>(
        &self,
        what: impl FnOnce() -> String,
        timeout: Duration,
        mut found: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        loop {
            if let Some(t) = found()? {
                return Ok(t);
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} within {timeout:?}; the page says:\n{}",
                    what(),
                    self.page_text().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to `timeout` for an element matching `css`.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Result<String> {
        self.poll(
            || format!("no {css} on the page"),
            timeout,
            || self.find(css),
        )
    }

    /// Waits up to `timeout` until the text of the element matching `css` contains `want`.
    pub fn wait_text(&self, css: &str, want: &str, timeout: Duration) -> Result<String> {
        self.poll(
            || format!("{css} did not show {want:?}"),
            timeout,
            || {
                Ok(self
                    .find(css)?
                    .and_then(|e| self.text(&e).ok())
                    .filter(|text| text.contains(want)))
            },
        )
    }

    pub fn text(&self, element: &str) -> Result<String> {
        Ok(self
            .call("GET", &format!("/element/{element}/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Everything the page shows, for failure messages.
    pub fn page_text(&self) -> Result<String> {
        Ok(self
            .exec("return document.body.innerText;", json!([]))?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    pub fn click(&self, css: &str) -> Result<()> {
        let e = self.wait_for(css, Duration::from_secs(30))?;
        self.call("POST", &format!("/element/{e}/click"), Some(&json!({})))
            .with_context(|| format!("clicking {css}"))?;
        Ok(())
    }

    /// Types `text` into the element matching `css` (as keystrokes).
    pub fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let e = self.wait_for(css, Duration::from_secs(30))?;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(&json!({ "text": text })),
        )
        .with_context(|| format!("typing into {css}"))?;
        Ok(())
    }

    /// Presses and releases one key (WebDriver key codes: [`TAB`], [`ENTER`]) on whatever
    /// has the focus, as a keyboard does.
    pub fn press(&self, key: &str) -> Result<()> {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}
        ]}]});
        self.call("POST", "/actions", Some(&actions))?;
        Ok(())
    }

    /// Saves a PNG of the window to `path`.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        use base64::Engine as _;
        let b64 = self.call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .context("decoding the screenshot")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self.call("DELETE", "", None);
    }
}

/// Where the tests save their screenshots: `target/ui-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("ui-screenshots")
}

/// Relays connections to this machine's 127.0.0.1:`port` into network namespace `netns`'s
/// 127.0.0.1:`port` (the same port, so the `Host` a browser sends is the one the console
/// expects). Ends with the process.
pub fn relay_loopback(listener: TcpListener, netns: &str) -> Result<()> {
    let port = listener.local_addr()?.port();
    let netns = netns.to_string();
    std::thread::Builder::new()
        .name("console-relay".into())
        .spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = connect(Some(&netns), ([127, 0, 0, 1], port).into()) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    if let (Ok(mut from), Ok(mut to)) = (from, to) {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
            }
        })
        .context("starting the console relay")?;
    Ok(())
}

/// A running `rollbackctl ui`: its URL (read from its first lines) and what it wrote to
/// stderr (the tests check the token is not there).
pub struct Console {
    child: Child,
    pub url: String,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Console {
    /// Starts `cmd` (a `rollbackctl ... ui` command) and waits for the URL it prints.
    pub fn start(mut cmd: Command) -> Result<Self> {
        use std::io::BufRead;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting rollbackctl ui")?;
        let out = child.stdout.take().context("rollbackctl ui stdout")?;
        let err = child.stderr.take().context("rollbackctl ui stderr")?;
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut err = err;
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut v) = sink.lock() {
                    v.extend_from_slice(&buf[..n]);
                }
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.trim().strip_prefix("http://") {
                    let _ = tx.send(format!("http://{url}"));
                }
            }
        });
        let mut console = Self {
            child,
            url: String::new(),
            stderr,
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => console.url = url,
            Err(_) => bail!(
                "rollbackctl ui printed no URL within 30s; stderr: {}",
                console.stderr_text()
            ),
        }
        Ok(console)
    }

    /// Ctrl-C: the console stops; its exit status (within 10 s).
    pub fn interrupt(mut self) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "rollbackctl ui still running 10s after Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }

    /// 127.0.0.1:PORT of the console.
    pub fn addr(&self) -> Result<SocketAddr> {
        let rest = self.url.trim_start_matches("http://");
        rest.split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in {}", self.url))
    }

    /// The URL's token.
    pub fn token(&self) -> String {
        self.url
            .split("/s/")
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string()
    }

    /// The URL's path (`/s/TOKEN/`).
    pub fn path(&self) -> String {
        format!("/s/{}/", self.token())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
