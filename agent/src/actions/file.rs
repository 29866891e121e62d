//! `file.restore {file=env [, snapshot=ID]}`: puts the last known good env file back — from
//! `app.env_backup`, or from the copy a snapshot kept — byte for byte, atomically (temporary
//! file beside it, fsync, rename over, fsync the directory). An env file that is already a
//! regular file identical to its source is left alone (fact `changed=false`).

use rollback_common::jobs::fact;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Failure, StepCtx};

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `bytes` to `target` atomically, keeping `target`'s mode (or `fallback_mode`).
pub(super) fn write_atomically(
    target: &Path,
    bytes: &[u8],
    fallback_mode: u32,
) -> std::io::Result<()> {
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("{} has no parent dir", target.display())))?;
    let mode = std::fs::metadata(target)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(fallback_mode);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.restore-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Restores the env file from `source` (default: `app.env_backup`).
pub(super) async fn restore_env(
    source: Option<PathBuf>,
    ctx: &mut StepCtx<'_>,
) -> Result<(), Failure> {
    let app = ctx
        .config
        .app
        .clone()
        .ok_or_else(|| Failure::new(-1, "no [app] in agent.toml"))?;
    let (Some(target), Some(backup)) = (app.env_file, app.env_backup) else {
        return Err(Failure::new(
            -1,
            "app.env_file and app.env_backup are not set in agent.toml",
        ));
    };
    let source = source.unwrap_or(backup);
    let bytes = std::fs::read(&source)
        .map_err(|e| Failure::new(-1, format!("reading {}: {e}", source.display())))?;
    let sha = sha256_hex(&bytes);
    let before = std::fs::read(&target).ok();
    // Only a regular file counts as already restored: a symlink is replaced as before.
    let regular = std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_file());
    if regular && before.as_deref() == Some(bytes.as_slice()) {
        ctx.say(&format!(
            "{} is already identical to {}; nothing to restore (sha256 {sha})",
            target.display(),
            source.display()
        ));
        ctx.fact(fact::ENV_SHA256, sha);
        ctx.fact(fact::CHANGED, "false");
        return Ok(());
    }
    let mode = std::fs::metadata(&source)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    write_atomically(&target, &bytes, mode).map_err(|e| {
        Failure::new(
            -1,
            format!(
                "restoring {} from {}: {e}",
                target.display(),
                source.display()
            ),
        )
    })?;
    match before {
        Some(b) if b == bytes => ctx.say(&format!(
            "{} was not a regular file; replaced by a copy of {} (sha256 {sha})",
            target.display(),
            source.display()
        )),
        Some(b) => ctx.say(&format!(
            "{}: sha256 {} -> {sha} (from {})",
            target.display(),
            sha256_hex(&b),
            source.display()
        )),
        None => ctx.say(&format!(
            "{} was missing; restored from {} (sha256 {sha})",
            target.display(),
            source.display()
        )),
    }
    ctx.fact(fact::ENV_SHA256, sha);
    ctx.fact(fact::CHANGED, "true");
    Ok(())
}
