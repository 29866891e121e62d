//! Repository hygiene checked as an ordinary test: every Rust source file opens with a `//!`
//! line saying what lives there.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_opens_with_a_module_doc_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut files = Vec::new();
    rust_files(root, &mut files);
    assert!(
        files.len() > 10,
        "found the workspace's sources ({})",
        files.len()
    );
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).is_ok_and(|t| t.starts_with("//!")))
        .map(|f| f.strip_prefix(root).unwrap_or(f).display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading `//!` doc line: {missing:?}"
    );
}

/// Product sources (not tests, xtask or the lab harness) outside `allowed` containing `needle`.
fn product_files_containing(needles: &[&str], allowed: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut files = Vec::new();
    for krate in ["agent", "common", "coordinator", "console"] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    assert!(files.len() > 10, "found the product's sources");
    files
        .iter()
        .filter_map(|f| {
            let rel = f.strip_prefix(root).unwrap_or(f).display().to_string();
            if allowed.contains(&rel.as_str()) {
                return None;
            }
            let text = std::fs::read_to_string(f).ok()?;
            needles
                .iter()
                .find(|n| text.contains(*n))
                .map(|n| format!("{rel} ({n})"))
        })
        .collect()
}

/// ARCHITECTURE.md: only `agent/src/exec.rs` spawns processes (and `rollbackctl ui --open` its
/// browser opener, in `console/src/ui/open.rs`).
#[test]
fn only_the_agents_exec_module_spawns_processes() {
    let found = product_files_containing(
        &[
            "Command::new",
            "tokio::process",
            "process::Command",
            "posix_spawn",
            "execve",
        ],
        &["agent/src/exec.rs", "console/src/ui/open.rs"],
    );
    assert!(
        found.is_empty(),
        "processes are spawned only by agent/src/exec.rs (absolute path, cleared env, own process group): {found:?}"
    );
}

/// ARCHITECTURE.md: only `common::identity` parses certificates.
#[test]
fn only_common_identity_parses_certificates() {
    let found = product_files_containing(
        &[
            "X509Certificate",
            "parse_x509_certificate",
            "parse_x509_der",
            "x509_parser::parse",
        ],
        &["common/src/identity.rs"],
    );
    assert!(
        found.is_empty(),
        "certificates are parsed only in common/src/identity.rs: {found:?}"
    );
}

/// ARCHITECTURE.md names every source module of the product, xtask and the test harness.
#[test]
fn architecture_names_every_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let arch = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut files = Vec::new();
    for dir in [
        "agent/src",
        "common/src",
        "coordinator/src",
        "console/src",
        "tests/src",
        "tests/tests",
        "xtask/src",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    let missing: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let stem = f.file_stem()?.to_string_lossy().into_owned();
            if ["lib", "main", "mod"].contains(&stem.as_str()) {
                // A crate root or a module directory: the directory's name must appear.
                let dir = f.parent()?.file_name()?.to_string_lossy().into_owned();
                return (!arch.contains(&dir)).then(|| f.display().to_string());
            }
            (!arch.contains(&format!("`{stem}`")) && !arch.contains(&format!("{stem}.rs")))
                .then(|| f.strip_prefix(root).unwrap_or(f).display().to_string())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name these modules (as `name` or name.rs): {missing:?}"
    );
}
