//! `postgres.restore {backup}` (`pg_restore -c --if-exists`, after `pg_restore --list` proves
//! the archive readable) and `postgres.backup` (`pg_dump -Fc` into the backup dir, verified).

use rollback_common::jobs::fact;
use std::path::Path;

use super::{Failure, StepCtx};
use crate::exec::ProcessSpec;
use crate::profile::PostgresProfile;

fn explain(output: &str) -> Option<String> {
    let lower = output.to_lowercase();
    if lower.contains("could not connect")
        || lower.contains("connection refused")
        || lower.contains("could not translate host name")
    {
        let detail = output
            .lines()
            .find(|l| l.to_lowercase().contains("connect"))
            .unwrap_or_default()
            .trim();
        return Some(format!("the database is unreachable: {detail}"));
    }
    if lower.contains("does not appear to be a valid archive")
        || lower.contains("could not read input file")
        || lower.contains("unexpected end of file")
    {
        return Some("the backup file is not a readable pg_dump custom-format archive".into());
    }
    None
}

/// A spec for `pg_dump` or `pg_restore` (chosen by `binary`) with the profile's environment.
fn pg(
    ctx: &StepCtx<'_>,
    binary: fn(&PostgresProfile) -> &Path,
) -> Result<(ProcessSpec, PostgresProfile), Failure> {
    let p = ctx
        .config
        .postgres
        .clone()
        .ok_or_else(|| Failure::new(-1, "no [postgres] in agent.toml"))?;
    let mut spec = ctx
        .spec(binary(&p), &p.backup_dir)
        .env("PGCONNECT_TIMEOUT", "10");
    if let Some(pass) = &p.password_file {
        spec = spec.env("PGPASSFILE", pass.display().to_string());
    }
    Ok((spec, p))
}

/// `--host H --port P --username U --dbname D` from the profile.
fn connection_args(p: &PostgresProfile) -> Vec<String> {
    [
        "--host",
        &p.host,
        "--port",
        &p.port.to_string(),
        "--username",
        &p.user,
        "--dbname",
        &p.database,
    ]
    .map(String::from)
    .to_vec()
}

/// `pg_restore --list FILE`: proves the archive is readable without touching the database.
pub(super) async fn verify(backup: &Path, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let (spec, _) = pg(ctx, |p| &p.pg_restore)?;
    let outcome = ctx.run(&spec.arg("--list").arg(backup)).await?;
    if !outcome.success() {
        let explained = explain(&outcome.stderr_text());
        return Err(Failure::exited(
            &outcome,
            &format!("pg_restore --list {}", backup.display()),
            explained,
        ));
    }
    ctx.say(&format!("{} is a readable archive", backup.display()));
    Ok(())
}

/// The sha256 of a file, read in chunks (a dump can be large).
fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Restores `backup` over the database. Safe to run twice: `--clean --if-exists` drops what
/// the archive holds before recreating it, so a repeat ends in the same database. Says which
/// archive (by sha256) it restored.
pub(super) async fn restore(backup: &Path, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    verify(backup, ctx).await?;
    let sha = file_sha256(backup)
        .map_err(|e| Failure::new(-1, format!("reading {}: {e}", backup.display())))?;
    ctx.say(&format!(
        "archive {} has sha256 {sha}; --clean --if-exists replaces what it holds, so a repeat restore ends in the same database",
        backup.display()
    ));
    ctx.fact("backup_sha256", sha);
    let (spec, p) = pg(ctx, |p| &p.pg_restore)?;
    let spec = spec
        .args(["--clean", "--if-exists", "--no-owner", "--exit-on-error"])
        .args(connection_args(&p))
        .arg(backup);
    let outcome = ctx.run(&spec).await?;
    if !outcome.success() {
        let explained = explain(&outcome.stderr_text());
        return Err(Failure::exited(
            &outcome,
            &format!("pg_restore of {}", backup.display()),
            explained,
        ));
    }
    ctx.fact(
        "backup",
        backup
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    ctx.fact(fact::CHANGED, "true");
    ctx.say(&format!(
        "restored {} into database {} on {}:{}",
        backup.display(),
        p.database,
        p.host,
        p.port
    ));
    Ok(())
}

pub(super) async fn backup(ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    if let Some(dir) = ctx.config.postgres.as_ref().map(|p| p.backup_dir.clone())
        && !dir.is_dir()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Failure::new(-1, format!("creating backup dir {}: {e}", dir.display())))?;
        ctx.say(&format!("created backup dir {}", dir.display()));
    }
    let (spec, p) = pg(ctx, |p| &p.pg_dump)?;
    let now = time::OffsetDateTime::now_utc();
    let name = format!(
        "backup_{:04}{:02}{:02}_{:02}{:02}{:02}.dump",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let path = p.backup_dir.join(&name);
    let partial = p.backup_dir.join(format!(".{name}.partial"));
    let spec = spec
        .args(["--format=custom", "--file"])
        .arg(&partial)
        .args(connection_args(&p));
    let outcome = ctx.run(&spec).await?;
    if !outcome.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(Failure::exited(
            &outcome,
            "pg_dump",
            explain(&outcome.stderr_text()),
        ));
    }
    std::fs::rename(&partial, &path)
        .map_err(|e| Failure::new(-1, format!("moving {} into place: {e}", partial.display())))?;
    verify(&path, ctx).await?;
    ctx.fact(fact::BACKUP, name.clone());
    ctx.say(&format!("backup written: {}", path.display()));
    Ok(())
}
