//! `rollbackctl ui --open`: hands the console's URL to the desktop's browser without putting
//! its token on any command line (where `ps` would show it): the URL goes into a private file
//! (mode 0600) that redirects to it, and `xdg-open` is given that file's path. The opener is
//! not waited for (some start the browser in the foreground); the file is removed after
//! [`KEEP_FILE`] or when the console stops, whichever comes first.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;

use anyhow::{Context as _, Result};

/// How long the redirect file (it holds the token) is left for the browser to read.
const KEEP_FILE: std::time::Duration = std::time::Duration::from_secs(30);

/// The redirect file: removed when dropped.
#[derive(Debug)]
pub struct Opened(std::path::PathBuf);

impl Drop for Opened {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens `url` in the desktop's browser.
pub fn browser(url: &str) -> Result<Opened> {
    let opener = ["/usr/bin/xdg-open", "/usr/local/bin/xdg-open"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("xdg-open is not installed")?;
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("rollbackctl-ui-{}.html", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let opened = Opened(path.clone());
    // The URL is ours (127.0.0.1, a port, hex): nothing in it needs escaping in an attribute.
    write!(
        file,
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=\"0;url={url}\"><title>rollbackctl ui</title>"
    )
    .with_context(|| format!("writing {}", path.display()))?;
    let mut child = std::process::Command::new(opener)
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running {opener}"))?;
    // Reaped, and the file removed, in the background.
    let remove = path.clone();
    std::thread::spawn(move || {
        let _ = child.wait();
        std::thread::sleep(KEEP_FILE);
        let _ = std::fs::remove_file(remove);
    });
    Ok(opened)
}
