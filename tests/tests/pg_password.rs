//! The PostgreSQL password never leaves its file or variable (issue #13, acceptance 5): not in
//! the argv of the coordinator or of anything it runs, not in any line it logs (at debug
//! level), not in any error — when the store is reached, when the password is wrong, when the
//! server is unreachable, and when coordinator.toml's URL carries a password (refused, naming
//! the file and the variable to use instead). Runs on the suites' cluster, or on a private one
//! when the suite runs on SQLite.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rollback_tests::pg::{self, Server};
use rollback_tests::support::{CertFiles, Pki, agents_json, bin, eventually, write_private};

const DEADLINE: Duration = Duration::from_secs(60);

struct Setup {
    tmp: tempfile::TempDir,
    pki: Pki,
    certs: CertFiles,
    server: Server,
    _cluster: Option<pg::Cluster>,
}

fn setup() -> Result<Option<Setup>> {
    let tmp = tempfile::tempdir()?;
    let Some((server, cluster)) = Server::shared_or_start(tmp.path())? else {
        eprintln!("SKIPPED: no PostgreSQL server binaries (or not root) to test against");
        return Ok(None);
    };
    let pki = Pki::init(&tmp.path().join("pki"), "pgpw.test")?;
    let certs = pki.coordinator("coordinator", &["127.0.0.1"])?;
    Ok(Some(Setup {
        tmp,
        pki,
        certs,
        server,
        _cluster: cluster,
    }))
}

impl Setup {
    /// Writes coordinator.toml with `store` (the database lines) in a directory of its own.
    fn config(&self, name: &str, store: &str) -> Result<PathBuf> {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n{store}\nshutdown_grace_secs = 5\n\
                 [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[operators]\nadmin = \"admin\"\n",
                self.pki.ca().display(),
                self.certs.cert.display(),
                self.certs.key.display()
            ),
        )?;
        Ok(config)
    }

    fn coordinator(&self, config: &Path, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(bin("rollback-coordinator"));
        cmd.arg("--config")
            .arg(config)
            .env("ROLLBACK_LOG", "debug")
            .env_remove("ROLLBACK_DATABASE_PASSWORD")
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a coordinator that must fail to start; its whole output.
    fn failed_start(&self, config: &Path, env: &[(&str, &str)]) -> Result<String> {
        let out: Output = self
            .coordinator(config, env)
            .output()
            .context("running the coordinator")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(!out.status.success(), "the coordinator started: {text}");
        Ok(text)
    }
}

/// The argv of `pid` and of every process below it.
fn argv_tree(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if let Ok(cmdline) = std::fs::read(format!("/proc/{p}/cmdline")) {
            out.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

fn assert_secret_absent(secret: &str, text: &str, what: &str) {
    assert!(!secret.is_empty());
    assert!(
        !text.contains(secret),
        "the PostgreSQL password appears in {what}:\n{text}"
    );
}

/// A coordinator on PostgreSQL with the password in a file, then in the environment: it
/// serves, and neither its argv (nor any child's) nor its debug log holds the password; the
/// log names the store as `postgres://USER@HOST:PORT/DB`.
#[test]
fn the_password_is_in_no_argv_and_no_log_line_at_debug_level() -> Result<()> {
    let Some(s) = setup()? else { return Ok(()) };
    let password = s.server.password()?;
    let database = s.server.create_database()?;
    let url = s.server.url(&database);
    let from_file = s.config(
        "file",
        &format!(
            "database = \"{url}\"\ndatabase_password_file = \"{}\"",
            s.server.password_file.display()
        ),
    )?;
    let from_env = s.config("env", &format!("database = \"{url}\""))?;
    let admin = s.pki.operator("admin")?;
    for (config, env) in [
        (&from_file, vec![]),
        (
            &from_env,
            vec![("ROLLBACK_DATABASE_PASSWORD", password.as_str())],
        ),
    ] {
        let log = config.with_file_name("coordinator.log");
        let mut child = s
            .coordinator(config, &env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let pid = child.id();
        let result = (|| -> Result<()> {
            let addr = eventually("the coordinator listens", DEADLINE, || {
                let text = std::fs::read_to_string(&log)?;
                if let Some(status) = child.try_wait()? {
                    bail!("exited ({status}): {text}");
                }
                text.lines()
                    .find(|l| l.contains("coordinator listening"))
                    .and_then(|l| l.split("addr=Some(").nth(1))
                    .and_then(|a| a.split(')').next())
                    .map(String::from)
                    .context("not listening yet")
            });
            // Queries run (and are logged at debug level) while an operator reads the fleet.
            agents_json(&format!("https://{addr}"), &s.pki.ca(), &admin, None)?;
            for argv in argv_tree(pid) {
                assert_secret_absent(&password, &argv, "a process's argv");
            }
            let text = std::fs::read_to_string(&log)?;
            ensure!(
                text.contains(&format!("database={url}")),
                "the store is logged as its URL without a password: {text}"
            );
            ensure!(text.contains("DEBUG"), "the log is at debug level");
            assert_secret_absent(&password, &text, "the coordinator's log");
            Ok(())
        })();
        let _ = child.kill();
        let _ = child.wait();
        result?;
        assert_secret_absent(&password, &std::fs::read_to_string(&log)?, "the log");
    }
    s.server.drop_database(&database)?;
    Ok(())
}

/// The errors that could carry it: a wrong password, an unreachable server, a URL with a
/// password (refused at config load), a password file others can read. Each names what to do
/// and none holds the password (nor the wrong one tried).
#[test]
fn no_error_holds_the_password() -> Result<()> {
    let Some(s) = setup()? else { return Ok(()) };
    let password = s.server.password()?;
    let database = s.server.create_database()?;
    let url = s.server.url(&database);

    // A wrong password: the server refuses the login.
    let wrong = format!("wrong-{password}-pw");
    let wrong_file = s.tmp.path().join("wrong-password");
    write_private(&wrong_file, &wrong)?;
    let config = s.config(
        "wrong",
        &format!(
            "database = \"{url}\"\ndatabase_password_file = \"{}\"",
            wrong_file.display()
        ),
    )?;
    let said = s.failed_start(&config, &[])?;
    assert!(said.contains("password authentication failed"), "{said}");
    assert!(
        said.contains(&format!("connecting to the store {url}")),
        "{said}"
    );
    assert!(said.contains("database_password_file"), "{said}");
    assert_secret_absent(&wrong, &said, "the wrong-password error");
    assert_secret_absent(&password, &said, "the wrong-password error");
    // The same through the environment.
    let config = s.config("wrong-env", &format!("database = \"{url}\""))?;
    let said = s.failed_start(&config, &[("ROLLBACK_DATABASE_PASSWORD", &wrong)])?;
    assert!(said.contains("password authentication failed"), "{said}");
    assert_secret_absent(&wrong, &said, "the wrong-password error");

    // An unreachable server: nothing listens on the port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let unreachable = format!("postgres://{}@127.0.0.1:{closed}/{database}", pg::USER);
    let config = s.config(
        "unreachable",
        &format!(
            "database = \"{unreachable}\"\ndatabase_password_file = \"{}\"",
            s.server.password_file.display()
        ),
    )?;
    let said = s.failed_start(&config, &[])?;
    assert!(
        said.contains(&format!("connecting to the store {unreachable}")),
        "{said}"
    );
    assert_secret_absent(&password, &said, "the unreachable-server error");

    // The password in the URL: refused before anything connects, naming the file and the
    // variable to use, without echoing it.
    for (name, bad) in [
        (
            "in-url",
            format!(
                "postgres://{}:{password}@127.0.0.1:{}/{database}",
                pg::USER,
                s.server.port
            ),
        ),
        ("in-query", format!("{url}?password={password}")),
    ] {
        let config = s.config(name, &format!("database = \"{bad}\""))?;
        let said = s.failed_start(&config, &[])?;
        assert!(said.contains("contains a password"), "{said}");
        assert!(said.contains("database_password_file"), "{said}");
        assert!(said.contains("ROLLBACK_DATABASE_PASSWORD"), "{said}");
        assert_secret_absent(&password, &said, "the config error");
    }

    // A password file others can read: refused with the chmod that fixes it.
    let open_file = s.tmp.path().join("open-password");
    std::fs::write(&open_file, &password)?;
    std::fs::set_permissions(
        &open_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    let config = s.config(
        "open-file",
        &format!(
            "database = \"{url}\"\ndatabase_password_file = \"{}\"",
            open_file.display()
        ),
    )?;
    let said = s.failed_start(&config, &[])?;
    assert!(said.contains("chmod o-rwx"), "{said}");
    assert_secret_absent(&password, &said, "the password-file error");

    s.server.drop_database(&database)?;
    Ok(())
}
