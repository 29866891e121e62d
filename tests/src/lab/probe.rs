//! HTTP probes (curl) run inside a lab namespace — never from the root namespace, whose
//! traffic to lab addresses would leave the machine.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::fleet::Lab;
use super::poll::{self, Check};
use super::{cmd, enter};

/// Status and body of an HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl Lab {
    /// GET `url` from inside the network namespace of `from` (a host id or
    /// [`COORDINATOR`](super::COORDINATOR)). Err when no HTTP answer came (refused, timeout).
    pub fn http_get(&self, from: &str, url: &str) -> Result<HttpResponse> {
        let netns = self.netns_of(from)?;
        let mut c = enter::netns_command(&netns, "curl");
        c.args([
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            "5",
        ])
        .args(["--output", "-", "--write-out", "\n%{http_code}", url]);
        let out = cmd::output(&mut c, None, Duration::from_secs(15))
            .with_context(|| format!("{from}: GET {url}"))?;
        if !out.status.success() {
            bail!(
                "{from}: GET {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let Some((body, code)) = text.rsplit_once('\n') else {
            bail!("{from}: GET {url}: unexpected curl output {text:?}");
        };
        let status = code
            .trim()
            .parse()
            .with_context(|| format!("{from}: GET {url}: status {code:?}"))?;
        Ok(HttpResponse {
            status,
            body: body.to_string(),
        })
    }

    /// Polls `url` from `from` until it answers with `status` (deadline: the lab's step
    /// timeout); returns that answer.
    pub fn wait_http_status(&self, from: &str, url: &str, status: u16) -> Result<HttpResponse> {
        poll::until(
            format!("{from}: GET {url} to answer {status}"),
            self.timeout,
            || {
                let r = self.http_get(from, url)?;
                Ok(if r.status == status {
                    Check::Done(r)
                } else {
                    Check::Pending(format!("{} {}", r.status, r.body.trim()))
                })
            },
        )
    }
}
