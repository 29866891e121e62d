//! The web console in a real browser against the fleet lab. Headless Chromium (driven over
//! WebDriver) opens `rollbackctl ui`'s URL in the coordinator's namespace; the fleet is broken
//! by a migration whose downgrade prints a line every 100 ms; the operator plans a `database`
//! rollback on the New rollback page and confirms it; trying to approve their own job shows
//! the coordinator's role error; a second person approves it in their own console; the first
//! window shows the job live to success, every output line within a second of its printing
//! and exactly once. Then the report, jobs, fleet and diagnose pages. Screenshots of every
//! page go to `target/ui-screenshots/`. Requests without the token, from another address,
//! naming another host or from another origin are refused, and the token is in no log.
//! Without root (or without chromium) this prints one skip line and passes (unless
//! `ROLLBACK_LAB_REQUIRED=1`).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rollback_tests::browser::{self, Console, Driver, request, screenshot_dir};
use rollback_tests::lab::{self, LabSpec};
use rollback_tests::lab_fleet::{LabFleet, MIGRATIONS_DIR, SLOW_DOWNGRADE_0003, assert_healthy};
use serde_json::json;

const LINES: usize = 50;

/// An output line that is markup: shown as text, it changes nothing; parsed, it would run.
const HOSTILE: &str = "<img src=x onerror=\"document.title='owned'\"><b id=injected>bold</b>";
const PAGE: Duration = Duration::from_secs(30);

/// `rewinding risk scores: batch 7/50 at 1796...`: (7, printed at, in seconds).
fn batch_of(line: &str) -> Option<(usize, f64)> {
    let rest = line.split("batch ").nth(1)?;
    let (n, rest) = rest.split_once('/')?;
    let at = rest.split(" at ").nth(1)?.trim().parse().ok()?;
    Some((n.parse().ok()?, at))
}

/// Writes the slow `0003` (whose first output line is [`HOSTILE`]) on `migrator` and runs
/// the bad migration: every app host's /readyz fails until the schema is rolled back.
fn break_with_a_slow_migration(lab: &lab::Lab, migrator: &str) -> Result<()> {
    // The host is hostile too: its first output line is markup that would run script.
    let migration = SLOW_DOWNGRADE_0003.replace(
        "def downgrade():\n",
        // A Rust debug string is a valid Python string literal for this text.
        &format!("def downgrade():\n    print({HOSTILE:?}, flush=True)\n"),
    );
    ensure!(
        migration != SLOW_DOWNGRADE_0003,
        "the hostile line is in the migration"
    );
    lab.write_file(
        migrator,
        &format!("{MIGRATIONS_DIR}/migrations/versions/0003_risk_scores.py"),
        migration.as_bytes(),
        0o644,
    )?;
    lab.bad_migration()?;
    Ok(())
}

/// The batch numbers of the output lines on the page (and, for each, how late it was shown
/// after it was printed, in seconds).
fn lines_on_the_page(op: &browser::Session<'_>, migrator: &str) -> Result<Vec<(usize, f64)>> {
    let lines = op.exec(
        "return Array.from(document.querySelectorAll('#outputs .line')).map(l => [l.parentElement.dataset.host, l.textContent, Number(l.dataset.at)]);",
        json!([]),
    )?;
    let mut batches = Vec::new();
    for l in lines.as_array().context("lines")? {
        let (host, text, shown_ms) = (
            l[0].as_str().unwrap_or_default(),
            l[1].as_str().unwrap_or_default(),
            l[2].as_f64().unwrap_or_default(),
        );
        if let Some((n, printed)) = batch_of(text) {
            ensure!(host == migrator, "batch {n} under {host}");
            batches.push((n, shown_ms / 1000.0 - printed));
        }
    }
    Ok(batches)
}

#[test]
fn the_fleet_is_rolled_back_from_the_browser_and_the_job_page_follows_it_live() -> Result<()> {
    if let Some(why) = browser::missing() {
        ensure!(!lab::required(), "{why}");
        eprintln!("SKIPPED lab_ui: {why}");
        return Ok(());
    }
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-ui"))? else {
        return Ok(());
    };
    let fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let migrator = hosts.first().context("an app host")?;
    let snap =
        fleet.rollbackctl(&["snapshot", "--select", "role=web", "--label", "before 0003"])?;
    ensure!(
        snap.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&snap.stderr)
    );
    break_with_a_slow_migration(&lab, migrator)?;

    let netns = lab.coordinator_netns();
    let ui = Console::start(fleet.rollbackctl_command(&["ui"]))?;
    let lead_ui = Console::start(fleet.rollbackctl_command_as(&fleet.approver, &["ui"]))?;
    ensure!(
        ui.url.starts_with("http://127.0.0.1:") && ui.token().len() >= 32,
        "{}",
        ui.url
    );
    let driver = Driver::start(lab.coordinator_command(browser::CHROMEDRIVER), &netns)?;
    let op = driver.session()?;
    let shots = screenshot_dir();

    // Fleet: every app host online with its labels, release and .env against its snapshot.
    op.goto(&format!("{}#/fleet", ui.url))?;
    let good = lab.release_commit("v2")?;
    for host in &hosts {
        let row = op.wait_text(&format!("#fleet tr[data-host={host}]"), "online", PAGE)?;
        ensure!(
            // (The revision shown is the one last reported: 0002 or, if the agent reported
            // after the bad migration, 0003; after the rollback it is checked to be 0002.)
            row.contains("role=web")
                && row.contains(&good[..12])
                && row.contains("same as snapshot"),
            "{host}: {row}"
        );
    }
    op.screenshot(&shots.join("fleet.png"))?;

    // Diagnose: each host's verdict with the evidence (its schema moved on since the
    // snapshot, and /readyz fails).
    op.goto(&format!("{}#/diagnose", ui.url))?;
    op.type_into("#diag-select", "role=web")?;
    op.click("#diag-btn")?;
    for host in &hosts {
        let verdict = op.wait_text(
            &format!("#diagnosis section[data-host={host}]"),
            "database",
            Duration::from_secs(60),
        )?;
        ensure!(
            verdict.contains("schema") && verdict.contains("0003") && verdict.contains("503"),
            "{host}: {verdict}"
        );
    }
    op.wait_text("#snapshots", "before 0003", PAGE)?;
    op.screenshot(&shots.join("diagnose.png"))?;

    // New rollback: plan, see the exact steps and the pinned target, confirm.
    op.goto(&format!("{}#/new", ui.url))?;
    op.click("#procedure option[value=database]")?;
    op.type_into("#select", "role=web")?;
    op.type_into("#reason", "migration 0003 broke readyz")?;
    op.click("#plan-btn")?;
    let confirm = op.wait_text(
        "#confirm-btn",
        &format!(
            "roll back {} host(s) with `database` on coordinator {}",
            hosts.len(),
            fleet.url
        ),
        PAGE,
    )?;
    let plan = op.wait_text("#plan", "alembic.downgrade", PAGE)?;
    ensure!(
        plan.contains("alembic.downgrade to_revision=0002")
            && plan.contains("to_revision = 0002 (asked steps=1")
            && plan.contains("canary:"),
        "the plan shows the exact steps, the pinned target and the canary: {plan}"
    );
    op.screenshot(&shots.join("new-rollback.png"))?;
    op.click("#confirm-btn")?;
    let job_id = browser_job_id(&op)?;
    op.wait_text("#job-state", "awaiting_approval", PAGE)
        .with_context(|| format!("{confirm}: the job waits for approval"))?;
    op.wait_text("#pins", "to_revision = 0002", PAGE)?;

    // The requester cannot approve their own job: the role error is shown as such.
    op.type_into("#approve-reason", "I checked it myself")?;
    op.click("#approve-btn")?;
    let refused = op.wait_text("#action-error", "Not allowed for your role", PAGE)?;
    ensure!(
        refused.contains("cannot approve it"),
        "the coordinator's reason: {refused}"
    );
    op.screenshot(&shots.join("job-awaiting-approval.png"))?;

    // The second person approves in their own console; the first window follows live.
    let lead = driver.session()?;
    lead.goto(&format!("{}#/job/{job_id}", lead_ui.url))?;
    lead.type_into("#approve-reason", "schema rollback checked by lead")?;
    lead.click("#approve-btn")?;
    lead.wait_text("#approval", "approved by", PAGE)?;
    drop(lead);
    op.wait_text(
        &format!("#outputs pre[data-host={migrator}]"),
        "batch 10/50",
        Duration::from_secs(120),
    )?;
    op.screenshot(&shots.join("job-running.png"))?;
    op.wait_text("#job-state", "succeeded", Duration::from_secs(180))?;
    op.wait_text("#live-status", "the job ended", PAGE)?;
    op.wait_text("#approval", "approved by spiffe://", PAGE)?;
    let errors = op.wait_for("#action-error", PAGE)?;
    ensure!(
        op.text(&errors)?.is_empty(),
        "the refused approval is cleared once the job moved on"
    );
    let hosts_text = op.wait_text("#hosts", "succeeded", PAGE)?;
    for host in &hosts {
        ensure!(hosts_text.contains(host.as_str()), "{host}: {hosts_text}");
    }
    op.screenshot(&shots.join("job.png"))?;

    // Every line once, each on the page within a second of its printing.
    let shown = lines_on_the_page(&op, migrator)?;
    for (n, late) in &shown {
        ensure!(
            *late < 1.0,
            "batch {n} shown {late:.3} s after it was printed"
        );
    }
    let batches: Vec<usize> = shown.iter().map(|(n, _)| *n).collect();
    let want: Vec<usize> = (1..=LINES).collect();
    ensure!(
        batches == want,
        "every line exactly once, in order: {batches:?}"
    );
    let injected = op.exec(
        "return [document.querySelectorAll('#main img, #injected').length, document.title, Array.from(document.querySelectorAll('#outputs .line')).some(l => l.textContent === arguments[0])];",
        json!([HOSTILE]),
    )?;
    ensure!(
        injected == json!([0, format!("Job {} · fleet-rollback", &job_id[..12]), true]),
        "the host's markup is shown as text, not run: {injected}"
    );

    // The report, rendered, with a download.
    op.goto(&format!("{}#/report/{job_id}", ui.url))?;
    let report = op.wait_text("#report", "checklist", PAGE)?;
    ensure!(report.contains(&job_id[..8]), "{report}");
    ensure!(
        report.contains("Time per phase")
            && report.contains("the runbook's estimate for database: 5-15 minutes"),
        "the report times the phases against the runbook: {report}"
    );
    op.wait_for("#report h1", PAGE)?;
    let injected = op.exec(
        "return document.querySelectorAll('#report img, #report script, #injected').length;",
        json!([]),
    )?;
    ensure!(
        injected == json!(0),
        "markup from a host in the report: {injected}"
    );
    op.screenshot(&shots.join("report.png"))?;
    let addr = ui.addr()?;
    let md = request(
        Some(&netns),
        addr,
        "GET",
        &format!("{}api/jobs/{job_id}/report.md", ui.path()),
        &[],
        None,
    )?;
    ensure!(md.status == 200, "download: {}", md.status);
    ensure!(
        md.header("content-disposition")
            .is_some_and(|v| v.contains("attachment") && v.contains(&job_id)),
        "{:?}",
        md.headers
    );
    ensure!(
        md.text() == fleet.report(&job_id)?,
        "the download is the report"
    );

    // Jobs, and the fleet back on 0002.
    op.goto(&format!("{}#/jobs", ui.url))?;
    op.wait_text(&format!("#jobs tr[data-job='{job_id}']"), "succeeded", PAGE)?;
    op.screenshot(&shots.join("jobs.png"))?;
    // Keyboard only: the skip link moves the focus to the content without leaving the page;
    // Tab reaches the job's link and Enter opens it.
    op.exec("document.querySelector('.skip').focus();", json!([]))?;
    op.press(browser::ENTER)?;
    let focused = op.exec(
        "return [document.activeElement.id, location.hash];",
        json!([]),
    )?;
    ensure!(focused == json!(["main", "#/jobs"]), "skip link: {focused}");
    let mut on_link = false;
    for _ in 0..40 {
        op.press(browser::TAB)?;
        let href = op.exec(
            "return document.activeElement.getAttribute('href') || '';",
            json!([]),
        )?;
        if href == json!(format!("#/job/{job_id}")) {
            on_link = true;
            break;
        }
    }
    ensure!(on_link, "Tab never reached the job's link");
    op.press(browser::ENTER)?;
    op.wait_text("#job-state", "succeeded", PAGE)?;
    op.goto(&format!("{}#/fleet", ui.url))?;
    for host in &hosts {
        op.wait_text(
            &format!("#fleet tr[data-host={host}]"),
            "0002",
            Duration::from_secs(60),
        )?;
    }

    assert_healthy(&lab, "0002")?;

    // 200 % zoom (the same page in half the width, with the text twice the size): nothing
    // but the wide tables' own scroll areas is wider than the window.
    let zoomed =
        driver.session_with(&["--force-device-scale-factor=2", "--window-size=640,1000"])?;
    zoomed.goto(&format!("{}#/job/{job_id}", ui.url))?;
    zoomed.wait_text("#live-status", "the job ended", PAGE)?;
    let fits = zoomed.exec(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth, window.devicePixelRatio];",
        json!([]),
    )?;
    ensure!(
        fits[0].as_f64() <= fits[1].as_f64() && fits[2] == json!(2),
        "the job page at 200 % is wider than the window: {fits}"
    );
    zoomed.screenshot(&shots.join("job-200-percent.png"))?;
    drop(zoomed);
    // The dark theme follows the system's.
    let dark = driver.session_with(&[
        "--force-dark-mode",
        "--blink-settings=preferredColorScheme=0",
    ])?;
    dark.goto(&format!("{}#/jobs", ui.url))?;
    dark.wait_text(&format!("#jobs tr[data-job='{job_id}']"), "succeeded", PAGE)?;
    let background = dark.exec(
        "return getComputedStyle(document.body).backgroundColor;",
        json!([]),
    )?;
    ensure!(
        background == json!("rgb(13, 17, 23)"),
        "the dark theme: {background}"
    );
    dark.screenshot(&shots.join("jobs-dark.png"))?;
    drop(dark);

    // Refused: no token, a wrong token, another Host, another origin, another address.
    let get = |path: &str, headers: &[(&str, &str)]| {
        request(Some(&netns), addr, "GET", path, headers, None)
    };
    ensure!(get(&ui.path(), &[])?.status == 200, "with the token");
    for (what, path) in [
        ("no token", "/".to_string()),
        ("no token (api)", "/api/jobs".to_string()),
        ("a wrong token", format!("/s/{}0/", ui.token())),
        ("another console's token", lead_ui.path()),
    ] {
        let r = get(&path, &[])?;
        ensure!(r.status == 403, "{what}: {}", r.status);
        ensure!(!r.text().contains("app.js"), "{what}: the page leaked");
    }
    let rebound = get(
        &ui.path(),
        &[("Host", &format!("evil.example:{}", addr.port()))],
    )?;
    ensure!(rebound.status == 403, "another Host: {}", rebound.status);
    let forged = request(
        Some(&netns),
        addr,
        "POST",
        &format!("{}api/jobs/{job_id}/resume", ui.path()),
        &[
            ("Origin", "http://evil.example"),
            ("Content-Type", "application/json"),
        ],
        Some(b"{\"reason\":\"x\"}"),
    )?;
    ensure!(forged.status == 403, "another origin: {}", forged.status);
    let elsewhere = std::net::SocketAddr::from((lab.coordinator_addr(), addr.port()));
    ensure!(
        browser::connect(Some(&netns), elsewhere).is_err(),
        "the console answers on {elsewhere}, not only on loopback"
    );

    // The token is written nowhere but the printed URL.
    for (what, text) in [
        ("rollbackctl ui's stderr", ui.stderr_text()),
        ("the approver's console's stderr", lead_ui.stderr_text()),
        ("the coordinator's log", fleet.coordinator_log()),
    ] {
        ensure!(!text.contains(&ui.token()), "the token is in {what}");
        ensure!(!text.contains(&lead_ui.token()), "a token is in {what}");
    }
    Ok(())
}

/// The job the page went to after the confirm button (`#/job/ID`).
fn browser_job_id(op: &browser::Session<'_>) -> Result<String> {
    let start = std::time::Instant::now();
    loop {
        let hash = op.exec("return location.hash;", json!([]))?;
        if let Some(id) = hash.as_str().and_then(|h| h.strip_prefix("#/job/")) {
            return Ok(id.to_string());
        }
        ensure!(
            start.elapsed() < PAGE,
            "the confirm button did not lead to a job page: {}",
            op.page_text().unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The job page keeps following across a coordinator killed with `kill -9` and started again
/// (its stream is refused while the coordinator is down, then picked up after the last event
/// shown: every output line exactly once), and a halted job resumed from the page is
/// followed again to its end.
#[test]
fn the_job_page_survives_a_coordinator_restart_and_follows_a_resume() -> Result<()> {
    if let Some(why) = browser::missing() {
        ensure!(!lab::required(), "{why}");
        eprintln!("SKIPPED lab_ui: {why}");
        return Ok(());
    }
    let Some(lab) = lab::boot_or_skip(LabSpec::new("t-ui-restart"))? else {
        return Ok(());
    };
    let mut fleet = LabFleet::start(&lab)?;
    let hosts = lab.app_host_ids();
    let migrator = hosts.first().context("an app host")?.clone();
    break_with_a_slow_migration(&lab, &migrator)?;
    // (Not `fleet.rollbackctl`, which approves a waiting rollback meanwhile.)
    let out = fleet
        .rollbackctl_command(&[
            "rollback",
            "--yes",
            "--no-wait-approval",
            "--procedure",
            "database",
            "--select",
            "role=web",
            "--reason",
            "0003 broke readyz",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "rollback: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job_id = fleet.latest_job()?["job_id"]
        .as_str()
        .context("the job")?
        .to_string();

    let netns = lab.coordinator_netns();
    let ui = Console::start(fleet.rollbackctl_command(&["ui"]))?;
    let driver = Driver::start(lab.coordinator_command(browser::CHROMEDRIVER), &netns)?;
    let op = driver.session()?;
    op.goto(&format!("{}#/job/{job_id}", ui.url))?;
    op.wait_text("#job-state", "awaiting_approval", PAGE)?;
    op.wait_text("#live-status", "live", PAGE)?;

    // The coordinator dies under the page and comes back.
    fleet.kill_coordinator()?;
    op.wait_text("#live-status", "reconnecting", PAGE)?;
    fleet.start_coordinator()?;
    let all: Vec<String> = lab.hosts().iter().map(|h| h.id().to_string()).collect();
    fleet.wait_online(&all)?;
    fleet.approve_waiting();
    op.wait_text("#job-state", "succeeded", Duration::from_secs(180))?;
    op.wait_text("#live-status", "the job ended", PAGE)?;
    let batches: Vec<usize> = lines_on_the_page(&op, &migrator)?
        .iter()
        .map(|(n, _)| *n)
        .collect();
    let want: Vec<usize> = (1..=LINES).collect();
    ensure!(
        batches == want,
        "every line exactly once across the restart: {batches:?}"
    );
    assert_healthy(&lab, "0002")?;

    // A job halted by a host, fixed by hand, resumed from the page, followed to its end.
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    // (A bad .env everywhere, with its backup, and a bad release on app2 that the
    // configuration procedure cannot fix.)
    lab.bad_config(&refs)?;
    lab.bad_release(&refs[1..2])?;
    let (ok, text) =
        fleet.rollback_web(&["--procedure", "configuration", "--reason", "halts on app2"])?;
    ensure!(!ok, "the rollback halts on app2: {text}");
    let halted = fleet.latest_job()?["job_id"]
        .as_str()
        .context("the halted job")?
        .to_string();
    op.goto(&format!("{}#/job/{halted}", ui.url))?;
    op.wait_text("#job-state", "halted", PAGE)?;
    op.wait_text("#live-status", "the job ended", PAGE)?;
    lab.run_as_app(
        &hosts[1],
        &["git", "-C", lab::APP_DIR, "checkout", "-q", "v2"],
    )?;
    lab.restart_unit(&hosts[1], lab::APP_UNIT)?;
    lab.wait_ready(&hosts[1])?;
    op.type_into("#resume-reason", "app2 fixed by hand")?;
    op.click("#resume-btn")?;
    op.wait_text("#job-state", "succeeded", Duration::from_secs(120))?;
    op.wait_text("#events", "job.resumed", PAGE)?;
    op.wait_text("#hosts", "succeeded", PAGE)?;
    op.screenshot(&screenshot_dir().join("job-resumed.png"))?;
    Ok(())
}
