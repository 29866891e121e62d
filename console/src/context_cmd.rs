//! `rollbackctl context list|use|show`: named fleets in the console config file, so one
//! operator can reach several coordinators without ever acting on the wrong one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::json;

use crate::connect::{self, ConnectFlags};
use crate::output::{Output, print_columns};

#[derive(Debug, Subcommand)]
#[command(after_help = "\
A context is a [contexts.NAME] table of the console config file:
    current_context = \"staging\"
    [contexts.prod]
    coordinator = \"https://coord-a.prod.example:7443\"
    ca = \"prod/ca.pem\"
    cert = \"prod/alice.pem\"
    key = \"prod/alice.key\"
Paths are relative to the file. --context NAME or ROLLBACK_CONTEXT picks one for a command;
flags and ROLLBACK_COORDINATOR/CA/CERT/KEY still win over it.

Examples:
    rollbackctl context list
    rollbackctl context show")]
pub enum ContextCmd {
    /// Every context of the config file, the current one marked with `*`.
    List,
    /// Make NAME the current context (rewrites `current_context` in the config file).
    Use {
        /// A context of the config file (`rollbackctl context list`).
        name: String,
    },
    /// The settings a command would use now: context, coordinator, CA, certificate, key.
    Show,
}

fn config_path(flags: &ConnectFlags) -> Result<PathBuf> {
    let (path, _) = connect::load_file(flags)?;
    match path.or_else(|| flags.config.clone()) {
        Some(p) => Ok(p),
        None => bail!(
            "no console config file: create ~/.config/rollbackctl/config.toml (or pass --config) with [contexts.NAME] tables"
        ),
    }
}

pub fn run(cmd: ContextCmd, flags: &ConnectFlags, output: Output) -> Result<()> {
    match cmd {
        ContextCmd::List => {
            let (path, file) = connect::load_file(flags)?;
            let current = flags.context.clone().or(file.current_context.clone());
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "config": path.map(|p| p.display().to_string()),
                        "current": current,
                        "contexts": file.contexts.iter().map(|(name, c)| json!({
                            "name": name,
                            "coordinator": c.coordinator,
                        })).collect::<Vec<_>>(),
                    }))?
                ),
                Output::Table => {
                    if file.contexts.is_empty() {
                        println!(
                            "no contexts in {}: add [contexts.NAME] tables (`rollbackctl context --help` shows one)",
                            path.map_or("the console config file".into(), |p| p
                                .display()
                                .to_string())
                        );
                        return Ok(());
                    }
                    let rows: Vec<[String; 3]> = file
                        .contexts
                        .iter()
                        .map(|(name, c)| {
                            [
                                if current.as_deref() == Some(name) {
                                    "*".into()
                                } else {
                                    String::new()
                                },
                                name.clone(),
                                c.coordinator.clone().unwrap_or_default(),
                            ]
                        })
                        .collect();
                    print_columns(&["CURRENT", "NAME", "COORDINATOR"], &rows);
                }
            }
            Ok(())
        }
        ContextCmd::Use { name } => {
            let path = config_path(flags)?;
            let (_, file) = connect::load_file(flags)?;
            if !file.contexts.contains_key(&name) {
                let known: Vec<&str> = file.contexts.keys().map(String::as_str).collect();
                bail!(
                    "no context `{name}` in {}; it has: {}",
                    path.display(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                );
            }
            set_current(&path, &name)?;
            match output {
                Output::Table => println!("current context: {name}"),
                Output::Json => println!("{}", json!({"current": name})),
            }
            Ok(())
        }
        ContextCmd::Show => {
            let s = connect::settings(flags)?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "context": s.context,
                        "coordinator": s.coordinator,
                        "server_name": s.server_name,
                        "ca": s.tls.ca,
                        "cert": s.tls.cert,
                        "key": s.tls.key,
                    }))?
                ),
                Output::Table => {
                    println!(
                        "context:     {}",
                        s.context
                            .as_deref()
                            .unwrap_or("(none: flags, environment or the file's top level)")
                    );
                    println!("coordinator: {}", s.coordinator);
                    if let Some(n) = &s.server_name {
                        println!("server name: {n}");
                    }
                    println!("ca:          {}", s.tls.ca.display());
                    println!("cert:        {}", s.tls.cert.display());
                    println!("key:         {}", s.tls.key.display());
                }
            }
            Ok(())
        }
    }
}

/// Sets `current_context` in the file, keeping every other line as it is; written to a
/// temporary file and renamed over the old one, so a crash leaves one or the other.
fn set_current(path: &Path, name: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = format!("current_context = {}", toml_string(name));
    let mut replaced = false;
    let mut in_table = false;
    let mut lines: Vec<String> = Vec::new();
    for l in text.lines() {
        let t = l.trim_start();
        if t.starts_with('[') {
            in_table = true;
        }
        if !in_table && !replaced && t.starts_with("current_context") {
            lines.push(line.clone());
            replaced = true;
        } else {
            lines.push(l.to_string());
        }
    }
    if !replaced {
        lines.insert(0, line);
    }
    let mut new = lines.join("\n");
    new.push('\n');
    // What is written must still be a config this console reads.
    toml::from_str::<connect::FileConfig>(&new)
        .with_context(|| format!("{} after setting current_context", path.display()))?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, &new).with_context(|| format!("writing {}", tmp.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_rewrites_only_the_current_context_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        let text = "# my fleets\n[contexts.a]\ncoordinator = \"https://a:1\"\n[contexts.b]\ncoordinator = \"https://b:1\"\n";
        std::fs::write(&path, text).expect("write");
        set_current(&path, "b").expect("set");
        let new = std::fs::read_to_string(&path).expect("read");
        assert_eq!(new, format!("current_context = \"b\"\n{text}"));
        set_current(&path, "a").expect("set again");
        let new = std::fs::read_to_string(&path).expect("read");
        assert_eq!(new, format!("current_context = \"a\"\n{text}"));
    }
}
