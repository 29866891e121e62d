//! Parameter grammar checks, done before anything is spawned. Each returns the reason a value
//! is refused; callers add host, action and parameter.

use std::path::{Component, Path, PathBuf};

/// Longest revision accepted: a SHA-256 object name is 64 hex digits; refs are shorter.
pub const MAX_REVISION_LEN: usize = 100;

/// A git revision: a hex sha or a ref name with a strict grammar, never an option.
pub fn revision(rev: &str) -> Result<(), String> {
    if rev.is_empty() {
        return Err("is empty".into());
    }
    if rev.len() > MAX_REVISION_LEN {
        return Err(format!(
            "is {} characters long; at most {MAX_REVISION_LEN} are accepted",
            rev.len()
        ));
    }
    if rev.starts_with('-') {
        return Err("starts with `-` (it would be read as an option)".into());
    }
    if let Some(c) = rev
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-' | '~' | '^')))
    {
        return Err(format!(
            "contains `{}`; a revision is a commit sha or a ref name ([A-Za-z0-9._/~^-])",
            c.escape_default()
        ));
    }
    if !rev.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit".into());
    }
    if rev.contains("..") || rev.contains("//") || rev.ends_with('/') || rev.ends_with(".lock") {
        return Err("is not a valid ref name (`..`, `//`, trailing `/` or `.lock`)".into());
    }
    Ok(())
}

/// An alembic revision id (hex or word) or `base`.
pub fn alembic_revision(rev: &str) -> Result<(), String> {
    if rev.is_empty() || rev.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !rev.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || rev.starts_with('_') {
        return Err("must be an alembic revision id ([A-Za-z0-9_]) or `base`".into());
    }
    Ok(())
}

/// A whole number written in decimal digits only (no sign, no spaces), at most 10 digits.
pub fn number(text: &str) -> Result<u64, String> {
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{}` is not a whole number (decimal digits only)",
            text.escape_default()
        ));
    }
    text.parse()
        .map_err(|_| format!("`{text}` is not a whole number"))
}

/// A count within `1..=max`.
pub fn count(text: &str, max: u32) -> Result<u32, String> {
    let n = u32::try_from(number(text)?).map_err(|_| format!("must be between 1 and {max}"))?;
    if n == 0 || n > max {
        return Err(format!("must be between 1 and {max}"));
    }
    Ok(n)
}

/// A backup: a plain file name inside `dir` — no `/`, no `..`, no NUL, no leading `-` or `.`,
/// and not a symlink that leaves the directory. Returns the canonical path.
pub fn backup_file(name: &str, dir: &Path) -> Result<PathBuf, String> {
    if name.is_empty() || name.len() > 255 {
        return Err("must be a file name of 1 to 255 characters".into());
    }
    if name.contains('/') || name.contains('\0') {
        return Err("must be a plain file name inside the backup dir (no `/` or NUL)".into());
    }
    if name.starts_with('-') || name.starts_with('.') {
        return Err("must not start with `-` or `.`".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | ':'))
    {
        return Err("may only hold [A-Za-z0-9._+:-]".into());
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("backup dir {} is not usable: {e}", dir.display()))?;
    let path = dir.join(name);
    let real = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if real.parent() != Some(dir.as_path()) {
        return Err(format!(
            "{} resolves to {}, outside the backup dir {}",
            path.display(),
            real.display(),
            dir.display()
        ));
    }
    if !real.is_file() {
        return Err(format!("{} is not a regular file", real.display()));
    }
    Ok(real)
}

/// An HTTP path on the host's own health base URL: `/healthz`, `/readyz`, never a full URL.
pub fn endpoint(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.len() > 200 {
        return Err(
            "must be a path starting with `/` (e.g. /readyz), at most 200 characters".into(),
        );
    }
    if path.contains("..") || path.starts_with("//") {
        return Err("must not contain `..` or start with `//`".into());
    }
    if !path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '?' | '=' | '&'))
    {
        return Err("may only hold [A-Za-z0-9/._?=&-]".into());
    }
    Ok(())
}

/// Literal substrings to look for in the app log.
pub fn patterns(text: &str) -> Result<Vec<String>, String> {
    let patterns: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    if patterns.is_empty() || patterns.len() > 16 {
        return Err("give 1 to 16 comma-separated patterns".into());
    }
    if let Some(p) = patterns
        .iter()
        .find(|p| p.len() > 200 || p.chars().any(char::is_control))
    {
        return Err(format!(
            "pattern `{}` is longer than 200 characters or holds control characters",
            p.escape_default()
        ));
    }
    Ok(patterns)
}

/// Whether `p` is a plain relative path with no `..` (for config-relative names).
pub fn is_plain_relative(p: &Path) -> bool {
    p.components().next().is_some() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions() {
        for ok in [
            "a1b2c3",
            "main",
            "release/v2",
            "HEAD~1",
            "v1.2.3",
            &"a".repeat(64),
        ] {
            assert!(revision(ok).is_ok(), "{ok}");
        }
        for bad in [
            "--upload-pack=touch /tmp/pwned",
            "-h",
            "HEAD;id",
            "$(id)",
            &"f".repeat(300),
            "",
            "a..b",
            "a b",
            ".x",
            "a/",
            "x.lock",
            "a\0b",
            "HEAD@{1}",
        ] {
            assert!(revision(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn backups() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("backups");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("good.dump"), b"x").expect("write");
        std::fs::write(tmp.path().join("secret"), b"x").expect("write");
        std::os::unix::fs::symlink(tmp.path().join("secret"), dir.join("escape.dump"))
            .expect("symlink");
        assert!(backup_file("good.dump", &dir).is_ok());
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "escape.dump",
            "-x",
            ".hidden",
            "missing.dump",
            "a\0b",
            "",
        ] {
            assert!(backup_file(bad, &dir).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn counts_endpoints_patterns() {
        assert_eq!(count("3", 10), Ok(3));
        assert!(count("0", 10).is_err() && count("11", 10).is_err() && count("-1", 10).is_err());
        assert!(endpoint("/readyz").is_ok());
        assert!(
            endpoint("http://evil/").is_err()
                && endpoint("//evil").is_err()
                && endpoint("/a/../b").is_err()
        );
        assert_eq!(
            patterns("ERROR, Traceback").expect("ok"),
            ["ERROR", "Traceback"]
        );
        assert!(patterns("").is_err());
    }
}
