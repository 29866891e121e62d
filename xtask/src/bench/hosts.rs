//! The local "hosts" of part (a): each a directory with a clone of one origin repo (3 commits),
//! `.env` and `.env.backup`; one shared threaded HTTP health server with a large backlog.
//! Reset before every timed run (on `main`, `.env` changed) and checked after every size (on
//! the previous commit, `.env` equal to `.env.backup`).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::sys::{self, Daemon};

const GOOD_ENV: &str = "APP_MODE=good\n";
const BAD_ENV: &str = "APP_MODE=broken\n";

/// A threaded health server (ThreadingHTTPServer with a listen backlog of 1024; the default 5
/// of `python3 -m http.server` overflows with 16 parallel clients). Prints its port.
const HEALTH_PY: &str = r#"# cargo xtask bench: the shared health endpoint of the local hosts.
import http.server

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200 if self.path in ("/healthz", "/readyz") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

#[derive(Debug)]
pub struct Hosts {
    pub dirs: Vec<PathBuf>,
    /// The commit every host rolls back to (HEAD~1 of the origin, the same in every clone).
    pub prev_sha: String,
    pub git: PathBuf,
}

fn git(git: &Path) -> Command {
    let mut cmd = Command::new(git);
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@bench.test")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@bench.test");
    cmd
}

/// The host name of host `i` (1-based).
pub fn name(i: usize) -> String {
    format!("h{i:03}")
}

/// Creates the origin and `n` hosts under `root` (replacing earlier ones).
pub fn setup(root: &Path, n: usize) -> Result<Hosts> {
    let git_bin = sys::which("git").context("git is not on PATH")?;
    let _ = std::fs::remove_dir_all(root);
    let origin = root.join("origin");
    std::fs::create_dir_all(&origin).with_context(|| format!("creating {}", origin.display()))?;
    sys::run_ok(
        git(&git_bin)
            .args(["init", "--quiet", "-b", "main"])
            .arg(&origin),
    )?;
    for v in 1..=3 {
        std::fs::write(origin.join("app.txt"), format!("version {v}\n"))
            .context("writing origin file")?;
        sys::run_ok(
            git(&git_bin)
                .arg("-C")
                .arg(&origin)
                .args(["add", "app.txt"]),
        )?;
        let date = format!("2026-01-0{v}T00:00:00Z");
        sys::run_ok(
            git(&git_bin)
                .arg("-C")
                .arg(&origin)
                .args(["commit", "--quiet", "-m"])
                .arg(format!("version {v}"))
                .env("GIT_AUTHOR_DATE", &date)
                .env("GIT_COMMITTER_DATE", &date),
        )?;
    }
    let prev_sha = sys::run_ok(
        git(&git_bin)
            .arg("-C")
            .arg(&origin)
            .args(["rev-parse", "HEAD~1"]),
    )?
    .trim()
    .to_string();
    let mut dirs = Vec::with_capacity(n);
    for i in 1..=n {
        let dir = root.join("hosts").join(name(i));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        sys::run_ok(
            git(&git_bin)
                .args(["clone", "--quiet"])
                .arg(&origin)
                .arg(dir.join("app")),
        )?;
        std::fs::write(dir.join(".env.backup"), GOOD_ENV).context("writing .env.backup")?;
        dirs.push(dir);
    }
    Ok(Hosts {
        dirs,
        prev_sha,
        git: git_bin,
    })
}

impl Hosts {
    /// Puts the first `n` hosts back on `main` with a changed `.env` (untimed).
    pub fn reset(&self, n: usize) -> Result<()> {
        for dir in &self.dirs[..n] {
            sys::run_ok(
                git(&self.git)
                    .arg("-C")
                    .arg(dir.join("app"))
                    .args(["checkout", "--quiet", "main"]),
            )?;
            std::fs::write(dir.join(".env"), BAD_ENV).context("writing .env")?;
        }
        Ok(())
    }

    /// Checks that the first `n` hosts are on the previous commit with `.env` restored.
    pub fn verify(&self, n: usize, what: &str) -> Result<()> {
        for dir in &self.dirs[..n] {
            let head = std::fs::read_to_string(dir.join("app/.git/HEAD"))
                .with_context(|| format!("reading {}/app/.git/HEAD", dir.display()))?;
            let env = std::fs::read_to_string(dir.join(".env")).unwrap_or_default();
            if head.trim() != self.prev_sha || env != GOOD_ENV {
                bail!(
                    "{what}: host {} ended on `{}` with .env {:?}, expected {} and {:?}",
                    dir.display(),
                    head.trim(),
                    env,
                    self.prev_sha,
                    GOOD_ENV
                );
            }
        }
        Ok(())
    }
}

/// Starts the shared health server; returns it and its base URL.
pub fn health_server(root: &Path) -> Result<(Daemon, String)> {
    let script = root.join("health.py");
    std::fs::write(&script, HEALTH_PY).context("writing health.py")?;
    let log = root.join("health.log");
    let err = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .context("starting the health server (python3)")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .context("reading the health server's port")?;
    }
    let daemon = Daemon::from_child(child, &log, "health server");
    let port: u16 = line
        .trim()
        .parse()
        .with_context(|| format!("health server printed `{}`, not a port", line.trim()))?;
    Ok((daemon, format!("http://127.0.0.1:{port}")))
}
