//! `file.restore {file=env}`: puts the last known good env file back, byte for byte, atomically
//! (copy to a temporary file beside it, fsync, rename over, fsync the directory).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use sha2::{Digest, Sha256};

use super::{Failure, StepCtx};

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(super) async fn restore_env(ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
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
    let fail = |what: &str, e: std::io::Error| Failure::new(-1, format!("{what}: {e}"));
    let bytes = std::fs::read(&backup)
        .map_err(|e| fail(&format!("reading backup {}", backup.display()), e))?;
    let before = std::fs::read(&target).ok();
    let dir = target
        .parent()
        .ok_or_else(|| Failure::new(-1, format!("{} has no parent dir", target.display())))?;
    let mode = std::fs::metadata(&target)
        .or_else(|_| std::fs::metadata(&backup))
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    let tmp = dir.join(format!(
        ".{}.restore-{}",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(
            &format!("restoring {} from {}", target.display(), backup.display()),
            e,
        ));
    }
    let sha = sha256_hex(&bytes);
    match before {
        Some(b) if b == bytes => ctx.say(&format!(
            "{} already matched {}; rewritten anyway",
            target.display(),
            backup.display()
        )),
        Some(b) => ctx.say(&format!(
            "{}: sha256 {} -> {sha}",
            target.display(),
            sha256_hex(&b)
        )),
        None => ctx.say(&format!(
            "{} was missing; restored (sha256 {sha})",
            target.display()
        )),
    }
    ctx.fact("env_sha256", sha);
    Ok(())
}
