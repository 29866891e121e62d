//! The sample application (the runbook's quality-governance-platform in miniature): an origin
//! git repository with one commit per release, a clone per app host at [`APP_DIR`] run as
//! `app.service`, its `.env`, and its alembic migrations. As in a real deployment, the app dir
//! belongs to an unprivileged user ([`APP_USER`]) and the app runs as that user.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;

use anyhow::{Context, Result, anyhow};

use super::fleet::Lab;
use super::probe::HttpResponse;
use super::{COORDINATOR, SHARED_MOUNT, cmd, enter};

/// Where each app host has its clone.
pub const APP_DIR: &str = "/srv/app";
/// The unprivileged user that owns [`APP_DIR`] and runs the app.
pub const APP_USER: &str = "app";
/// Where each app host sees the lab venv (bind-mounted in the host's own mount namespace), so
/// the app user reaches it whatever the permissions of the workspace's parent directories.
pub const APP_VENV: &str = "/opt/lab-venv";
/// The app's systemd unit on each app host.
pub const APP_UNIT: &str = "app.service";
pub const APP_PORT: u16 = 8000;
/// The app's log file on each app host.
pub const APP_LOG: &str = "/var/log/app/app.log";
/// The release every app host runs after boot.
pub const DEPLOYED_RELEASE: &str = "v2";
/// The newer release (expects a newer schema than the deployed one).
pub const NEXT_RELEASE: &str = "v3";

/// One release of the app: a commit tagged `tag` in the origin repository.
#[derive(Debug, Clone, Copy)]
pub struct Release {
    pub tag: &'static str,
    /// The alembic revision this release's code expects (its /readyz compares).
    pub schema_revision: &'static str,
    /// Migration scripts the release ships (cumulative).
    pub migrations: &'static [&'static str],
    pub summary: &'static str,
}

pub const RELEASES: &[Release] = &[
    Release {
        tag: "v1",
        schema_revision: "0001",
        migrations: &["0001_incidents.py"],
        summary: "incidents",
    },
    Release {
        tag: "v2",
        schema_revision: "0002",
        migrations: &["0001_incidents.py", "0002_audits.py"],
        summary: "audits",
    },
    Release {
        tag: "v3",
        schema_revision: "0003",
        migrations: &["0001_incidents.py", "0002_audits.py", "0003_risk_scores.py"],
        summary: "risk scores",
    },
];

/// Settings every release requires in `.env`.
const REQUIRED_SETTINGS: &[&str] = &["DATABASE_URL", "APP_PORT"];

pub fn release(tag: &str) -> Result<&'static Release> {
    RELEASES
        .iter()
        .find(|r| r.tag == tag)
        .ok_or_else(|| anyhow!("no app release {tag:?}"))
}

/// The sample app's sources in the checkout.
pub fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("lab-assets")
        .join("app")
}

/// Path of the origin repository inside hosts.
pub fn origin_in_hosts() -> String {
    format!("{SHARED_MOUNT}/origin")
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let mut c = Command::new("git");
    c.arg("-C").arg(dir).args([
        "-c",
        "user.name=fleet lab",
        "-c",
        "user.email=lab@rollback.invalid",
    ]);
    c.args(["-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false"])
        .args(args);
    c.env_clear()
        .env("PATH", enter::HOST_PATH)
        .env("HOME", "/root");
    cmd::run(&mut c, None, cmd::DEFAULT_TIMEOUT)
}

/// Creates `<shared>/origin` with one commit (tagged) per release; main ends at the newest.
pub fn build_origin(shared: &Path) -> Result<()> {
    let origin = shared.join("origin");
    let assets = assets_dir();
    fs::create_dir_all(origin.join("migrations/versions"))
        .with_context(|| format!("creating {}", origin.display()))?;
    git(&origin, &["init", "-q", "-b", "main"])?;
    let copy = |rel: &str| -> Result<()> {
        fs::copy(assets.join(rel), origin.join(rel))
            .with_context(|| format!("copying {rel} from {}", assets.display()))?;
        Ok(())
    };
    for file in ["app.py", "alembic.ini", "migrations/env.py"] {
        copy(file)?;
    }
    fs::write(
        origin.join(".gitignore"),
        ".env\n.env.backup\n__pycache__/\n",
    )?;
    for r in RELEASES {
        for m in r.migrations {
            copy(&format!("migrations/versions/{m}"))?;
        }
        let meta = serde_json::json!({
            "release": r.tag,
            "schema_revision": r.schema_revision,
            "required_settings": REQUIRED_SETTINGS,
        });
        fs::write(origin.join("release.json"), format!("{meta:#}\n"))?;
        git(&origin, &["add", "--all"])?;
        git(
            &origin,
            &[
                "commit",
                "-q",
                "-m",
                &format!("release {}: {}", r.tag, r.summary),
            ],
        )?;
        git(&origin, &["tag", r.tag])?;
    }
    // Variants of the deployed release for the deployment guard: same code and schema, one
    // setting changed (see [`VARIANTS`]), each a commit of its own on top of it.
    let deployed = release(DEPLOYED_RELEASE)?;
    for (tag, key, value) in VARIANTS {
        git(&origin, &["checkout", "-q", "--detach", deployed.tag])?;
        let mut meta = serde_json::json!({
            "release": tag,
            "schema_revision": deployed.schema_revision,
            "required_settings": REQUIRED_SETTINGS,
        });
        meta[*key] = serde_json::json!(value);
        fs::write(origin.join("release.json"), format!("{meta:#}\n"))?;
        git(
            &origin,
            &[
                "commit",
                "-q",
                "-am",
                &format!("release {tag}: {key} = {value}"),
            ],
        )?;
        git(&origin, &["tag", tag])?;
    }
    git(&origin, &["checkout", "-q", "main"])?;
    Ok(())
}

/// Releases of the deployed code with one setting changed, for the deployment guard:
/// `v2-slow` answers `/api/incidents` three times slower than v2's 20 ms, `v2-crash` dies
/// 1.5 s after it starts (a crash loop under systemd's `Restart=on-failure`).
pub const VARIANTS: &[(&str, &str, f64)] = &[
    ("v2-slow", "api_delay_ms", 60.0),
    ("v2-crash", "crash_after_s", 1.5),
];

/// The app's good `.env` in this lab.
pub fn good_env(lab: &Lab) -> Result<String> {
    Ok(format!(
        "# quality-governance-platform settings (fleet lab)\nDATABASE_URL={}\nAPP_PORT={APP_PORT}\nAPP_LOG={APP_LOG}\nFEATURE_REPORTS=on\n",
        lab.database_url()?
    ))
}

fn unit() -> String {
    format!(
        "[Unit]\nDescription=quality-governance-platform (fleet lab sample app)\nAfter=network.target\n\n\
         [Service]\nType=simple\nUser={APP_USER}\nGroup={APP_USER}\nWorkingDirectory={APP_DIR}\nEnvironment=PYTHONUNBUFFERED=1\n\
         ExecStart={APP_VENV}/bin/python {APP_DIR}/app.py\nRestart=on-failure\nRestartSec=1\n\n\
         [Install]\nWantedBy=multi-user.target\n"
    )
}

/// Clones the deployed release on every app host, migrates the database from the first one,
/// starts `app.service` everywhere and waits until every `/readyz` answers 200.
pub fn deploy(lab: &Lab) -> Result<()> {
    let hosts = lab.app_host_ids();
    let env = good_env(lab)?;
    let unit = unit();
    let venv = lab.venv().display().to_string();
    let origin = origin_in_hosts();
    let install = |host: &str| -> Result<()> {
        if lab.run(host, &["id", "-u", APP_USER]).is_err() {
            lab.run(
                host,
                &[
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    APP_DIR,
                    "--shell",
                    "/usr/sbin/nologin",
                    APP_USER,
                ],
            )?;
        }
        lab.run(host, &["mkdir", "-p", APP_VENV])?;
        lab.run(host, &["mount", "--bind", "-o", "ro", &venv, APP_VENV])?;
        lab.run(host, &["git", "clone", "-q", &origin, APP_DIR])?;
        lab.run(
            host,
            &["git", "-C", APP_DIR, "checkout", "-q", DEPLOYED_RELEASE],
        )?;
        let owner = format!("{APP_USER}:{APP_USER}");
        lab.run(host, &["chown", "-R", &owner, APP_DIR])?;
        let log_dir = Path::new(APP_LOG)
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        lab.run(
            host,
            &[
                "install", "-d", "-o", APP_USER, "-g", APP_USER, "-m", "755", &log_dir,
            ],
        )?;
        lab.write_file(host, &format!("{APP_DIR}/.env"), env.as_bytes(), 0o600)?;
        lab.install_unit(host, APP_UNIT, &unit)
    };
    thread::scope(|s| {
        let handles: Vec<_> = hosts.iter().map(|h| s.spawn(move || install(h))).collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow!("app install thread panicked")))
        })
    })?;
    let first = hosts.first().ok_or_else(|| anyhow!("no app host"))?;
    lab.alembic_ok(first, &["upgrade", "head"])
        .context("migrating the app database")?;
    for host in &hosts {
        lab.start_unit(host, APP_UNIT)?;
    }
    for host in &hosts {
        lab.wait_ready(host)?;
    }
    Ok(())
}

impl Lab {
    /// Runs `argv` inside `host` as the app user (as a deploy would: git refuses root in a
    /// repository another user owns), requiring success; returns stdout.
    pub fn run_as_app(&self, host: &str, argv: &[&str]) -> Result<String> {
        let mut full = vec!["runuser", "-u", APP_USER, "--"];
        full.extend_from_slice(argv);
        self.run(host, &full)
    }

    /// `http://ADDR:8000PATH` of an app host.
    pub fn app_url(&self, host: &str, path: &str) -> Result<String> {
        Ok(format!(
            "http://{}:{APP_PORT}{path}",
            self.host(host)?.addr()
        ))
    }

    /// GET /healthz of an app host, probed from the coordinator's namespace.
    pub fn healthz(&self, host: &str) -> Result<HttpResponse> {
        self.http_get(COORDINATOR, &self.app_url(host, "/healthz")?)
    }

    /// GET /readyz of an app host, probed from the coordinator's namespace.
    pub fn readyz(&self, host: &str) -> Result<HttpResponse> {
        self.http_get(COORDINATOR, &self.app_url(host, "/readyz")?)
    }

    /// Waits until the app host's /readyz answers 200.
    pub fn wait_ready(&self, host: &str) -> Result<HttpResponse> {
        self.wait_http_status(COORDINATOR, &self.app_url(host, "/readyz")?, 200)
            .with_context(|| {
                let journal = self
                    .command(host, "journalctl")
                    .and_then(|c| c.args(["-u", APP_UNIT, "--no-pager", "-n", "30"]).output())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                format!("host {host}: {APP_UNIT} journal:\n{journal}")
            })
    }

    /// Waits until the app host's /readyz answers 503 (the app serves but is not ready).
    pub fn wait_not_ready(&self, host: &str) -> Result<HttpResponse> {
        self.wait_http_status(COORDINATOR, &self.app_url(host, "/readyz")?, 503)
    }

    /// `alembic ARGS` in the app directory of `host` (venv alembic; URL from the app's .env).
    pub fn alembic(&self, host: &str, args: &[&str]) -> Result<Output> {
        let alembic = self.venv().join("bin/alembic");
        self.command(host, &alembic.to_string_lossy())?
            .current_dir(APP_DIR)
            // Root leaves no bytecode in the app user's directory.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .args(args)
            .output()
    }

    fn alembic_ok(&self, host: &str, args: &[&str]) -> Result<String> {
        let out = self.alembic(host, args)?;
        cmd::check(&format!("alembic {}", args.join(" ")), &out)
            .with_context(|| format!("host {host}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The release tag the app directory of `host` has checked out (from its release.json).
    pub fn app_release(&self, host: &str) -> Result<String> {
        let text = self.read_file(host, &format!("{APP_DIR}/release.json"))?;
        let meta: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("host {host}: release.json"))?;
        meta["release"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("host {host}: release.json has no release"))
    }

    /// `git rev-parse HEAD` of the app directory of `host`.
    pub fn app_head(&self, host: &str) -> Result<String> {
        Ok(self
            .run_as_app(host, &["git", "-C", APP_DIR, "rev-parse", "HEAD"])?
            .trim()
            .to_string())
    }

    /// Commit of a release tag in the origin repository.
    pub fn release_commit(&self, tag: &str) -> Result<String> {
        let rev = format!("{tag}^{{commit}}");
        Ok(
            git(&self.shared_dir().join("origin"), &["rev-parse", &rev])?
                .trim()
                .to_string(),
        )
    }
}
