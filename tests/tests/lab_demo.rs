//! The README's first command proven: runs the same demo code as `cargo xtask demo` on a lab
//! of its own and checks the end state on the hosts before the teardown — every app host's
//! `/readyz` 200 again, `.env` byte-identical to `.env.backup`, the app and agent units
//! active — and that the story showed every host. It runs as `cargo xtask demo --ui` does: the
//! web console's URL is printed and answers from this machine's loopback. Without root this
//! prints one skip line and passes (unless `ROLLBACK_LAB_REQUIRED=1`).

use anyhow::{Context, Result, ensure};
use rollback_tests::lab::{self, APP_DIR, Lab};
use rollback_tests::{browser, demo};

/// The test's lab name (the interactive demo uses `demo`).
const LAB: &str = "t-demo";

fn end_state(lab: &Lab) -> Result<()> {
    let hosts = lab.app_host_ids();
    ensure!(hosts.len() == demo::APP_HOSTS, "app hosts: {hosts:?}");
    let good = lab.release_commit("v2")?;
    for host in &hosts {
        ensure!(
            lab.app_head(host)? == good,
            "{host}: git HEAD is not the snapshot's (release v2)"
        );
        let ready = lab.readyz(host)?;
        ensure!(ready.status == 200, "{host}: /readyz {ready:?}");
        let env = lab.read_file(host, &format!("{APP_DIR}/.env"))?;
        let backup = lab.read_file(host, &format!("{APP_DIR}/.env.backup"))?;
        ensure!(env == backup, "{host}: .env differs from .env.backup");
        for unit in demo::APP_HOST_UNITS {
            let state = lab.unit_state(host, unit)?;
            ensure!(state == "active", "{host}: {unit} is {state}");
        }
    }
    Ok(())
}

/// `cargo xtask demo --ui`: the printed URL answers on this machine's own loopback (not only
/// inside the lab), and its jobs list has the demo's rollback, succeeded.
fn console_answers(url: &str) -> Result<()> {
    let rest = url.trim_start_matches("http://");
    let (addr, path) = rest.split_once('/').context("a URL with a path")?;
    let addr: std::net::SocketAddr = addr.parse()?;
    ensure!(addr.ip().is_loopback(), "{url}");
    let page = browser::request(None, addr, "GET", &format!("/{path}"), &[], None)?;
    ensure!(
        page.status == 200 && page.text().contains("app.js"),
        "{url}: {} {}",
        page.status,
        page.text()
    );
    let jobs = browser::request(None, addr, "GET", &format!("/{path}api/jobs"), &[], None)?;
    let jobs = jobs.json()?;
    ensure!(
        jobs[0]["state"] == "succeeded" && jobs[0]["procedure"].as_str().is_some(),
        "the console lists the demo's rollback: {jobs}"
    );
    Ok(())
}

#[test]
fn demo_breaks_the_fleet_and_rolls_it_back() -> Result<()> {
    // The demo boots its own lab; this only decides whether this machine can run one.
    if let Err(reason) = lab::check_prerequisites() {
        ensure!(
            !lab::required(),
            "the demo cannot run and {}=1: {reason}",
            lab::REQUIRED_ENV
        );
        eprintln!("SKIPPED lab_demo: {reason}");
        return Ok(());
    }
    let mut out = Vec::new();
    let mut checked = false;
    let mut console_url = None;
    let result = demo::run_with(LAB, &mut out, demo::WebUi::On, |lab, url| {
        end_state(lab)?;
        let url = url.context("the demo with --ui runs the web console")?;
        console_answers(url)?;
        console_url = Some(url.to_string());
        checked = true;
        Ok(())
    });
    let text = String::from_utf8_lossy(&out);
    eprintln!("{text}");
    result?;
    assert!(checked, "the end state was inspected");
    let url = console_url.unwrap_or_default();
    assert!(
        text.contains(&format!("open {url}")),
        "the story prints the console's URL"
    );
    for host in ["app1", "app2", "app3", "db"] {
        assert!(text.contains(host), "the story mentions {host}");
    }
    for host in ["app1", "app2", "app3"] {
        assert!(
            text.contains(&format!("{host}  GET /readyz → 503")),
            "the story shows {host} failing"
        );
        assert!(
            text.contains(&format!("{host}  GET /readyz → 200")),
            "the story shows {host} healthy again"
        );
        assert!(
            text.contains(&format!("{host} — configuration"))
                || text.contains(&format!("{host} — application + configuration")),
            "diagnosis of {host}"
        );
    }
    assert!(
        text.contains("app3 — application + configuration"),
        "app3's bad release is diagnosed too"
    );
    assert!(text.contains("$ rollbackctl snapshot --select role=web"));
    assert!(text.contains("$ rollbackctl diagnose --select role=web"));
    assert!(text.contains("$ rollbackctl rollback --to-snapshot latest"));
    assert!(
        text.contains("job started") && text.contains("job succeeded"),
        "the job is followed live"
    );
    assert!(
        text.contains("- [x] Verify application health checks passing"),
        "the report's checklist is shown"
    );
    assert!(text.contains("$ rollbackctl agents"));
    assert!(text.contains("(canary): app1"), "canary first");
    assert!(
        !lab::known_labs().iter().any(|l| l == LAB),
        "the demo's lab is torn down"
    );
    Ok(())
}
