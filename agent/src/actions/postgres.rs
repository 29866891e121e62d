//! `postgres.restore {backup}` (`pg_restore -c --if-exists`, after `pg_restore --list` proves
//! the archive readable) and `postgres.backup` (`pg_dump -Fc` into the backup dir, verified).
//! A backup is opened once — never through a symlink, only a regular file with one link — and
//! that open file is what is hashed, listed and restored (as `pg_restore`'s stdin): swapping
//! the file after it was checked changes nothing.

use rollback_common::jobs::fact;
use std::path::Path;
use std::sync::Arc;

use super::{Failure, StepCtx, Symlinks, file};
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

/// Opens a backup for reading once (see the module doc).
fn open_backup(backup: &Path) -> Result<Arc<std::fs::File>, Failure> {
    file::open_regular(backup, Symlinks::Refuse)
        .map(Arc::new)
        .map_err(|e| Failure::new(-1, format!("refusing the backup: {e}")))
}

/// Rewinds the opened backup before a process reads it.
fn rewind(archive: &Arc<std::fs::File>, backup: &Path) -> Result<Arc<std::fs::File>, Failure> {
    use std::io::Seek;
    (&**archive)
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|e| Failure::new(-1, format!("reading {}: {e}", backup.display())))?;
    Ok(archive.clone())
}

/// `pg_restore --list` of the backup: proves the archive is readable without touching the
/// database.
pub(super) async fn verify(backup: &Path, ctx: &mut StepCtx<'_>) -> Result<(), Failure> {
    let archive = open_backup(backup)?;
    verify_open(&archive, backup, ctx).await
}

async fn verify_open(
    archive: &Arc<std::fs::File>,
    backup: &Path,
    ctx: &mut StepCtx<'_>,
) -> Result<(), Failure> {
    let (spec, _) = pg(ctx, |p| &p.pg_restore)?;
    let outcome = ctx
        .run(&spec.arg("--list").stdin(rewind(archive, backup)?))
        .await?;
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

/// The sha256 of an open file from its start, read in chunks (a dump can be large).
fn file_sha256(mut file: &std::fs::File) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek};
    file.seek(std::io::SeekFrom::Start(0))?;
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
    let archive = open_backup(backup)?;
    verify_open(&archive, backup, ctx).await?;
    let sha = file_sha256(&archive)
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
        .stdin(rewind(&archive, backup)?);
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
    // pg_dump writes its file as root, following symlinks: only a dir nobody else can write
    // is safe to write into.
    {
        use std::os::unix::fs::MetadataExt;
        let dir = &p.backup_dir;
        let meta = std::fs::symlink_metadata(dir)
            .map_err(|e| Failure::new(-1, format!("backup dir {}: {e}", dir.display())))?;
        let me = nix::unistd::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(Failure::new(
                -1,
                format!(
                    "backup dir {} must be a directory owned by the agent's user (uid {me}) that no one else can write (it is uid {}, mode {:04o}); run `chown {me} {0}; chmod go-w {0}`",
                    dir.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
            ));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The backup is checked on the file that is then read: a symlink or a second link is
    /// refused, and a swap after opening does not change what the open file reads.
    #[test]
    fn a_backup_is_read_through_the_file_that_was_checked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"SECRET").expect("write");
        let backup = dir.join("b.dump");
        std::fs::write(&backup, b"ARCHIVE").expect("write");

        let archive = open_backup(&backup).expect("opens");
        std::fs::remove_file(&backup).expect("rm");
        std::os::unix::fs::symlink(&secret, &backup).expect("swap for a symlink");
        let sha = file_sha256(&archive).expect("sha");
        assert_eq!(
            sha,
            crate::actions::sha256_hex(b"ARCHIVE"),
            "the checked file is read"
        );
        let again = open_backup(&backup).expect_err("a symlink is refused");
        assert!(again.error.contains("is a symlink"), "{}", again.error);

        std::fs::remove_file(&backup).expect("rm");
        std::fs::hard_link(&secret, &backup).expect("hard link");
        let linked = open_backup(&backup).expect_err("a hard link is refused");
        assert!(linked.error.contains("hard links"), "{}", linked.error);
    }
}
