//! `file.restore {file=env [, snapshot=ID]}`: puts the last known good env file back — from
//! `app.env_backup`, or from the copy a snapshot kept — byte for byte, atomically, keeping the
//! env file's owner, group and mode (the backup's when the env file is missing). An env file
//! that is already a regular file identical to its source is left alone (`changed=false`).
//!
//! Everything here treats the app directory as hostile (its owner may be the attacker):
//! files are opened relative to an opened directory with `O_NOFOLLOW`, a symlinked env file or
//! backup is refused unless `app.env_symlink_target` pins where the env file may point, sources must be regular
//! files with one link, and the temporary file gets a random name and `O_CREAT | O_EXCL`, so a
//! planted symlink or file at any name is never written through.

use rollback_common::jobs::fact;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};
use sha2::{Digest, Sha256};

use super::{Failure, StepCtx};

/// The largest env file or snapshot record read into memory.
pub const MAX_SMALL_FILE: u64 = 1024 * 1024;

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a file the agent was asked to read or replace is refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "{0} is a symlink; the agent does not follow symlinks in the app dir: replace it with the file (for the env file only, app.env_symlink_target in agent.toml names the one path it may point to)"
    )]
    Symlink(PathBuf),
    #[error(
        "{path} is a symlink to {dest}, not to {pinned} (app.env_symlink_target); point it there or replace it with the file"
    )]
    SymlinkElsewhere {
        path: PathBuf,
        dest: PathBuf,
        pinned: PathBuf,
    },
    #[error(
        "app.env_symlink_target {pinned} must be in a directory only the agent's user can change: {reason}"
    )]
    UntrustedTarget { pinned: PathBuf, reason: String },
    #[error("{0} is not a regular file (a FIFO, device or directory); replace it with the file")]
    NotRegular(PathBuf),
    #[error(
        "{path} has {links} hard links; a file the agent reads as root must have exactly one (another name for it could be a file outside the app dir): replace it with a copy"
    )]
    HardLinked { path: PathBuf, links: u64 },
    #[error("{path} is larger than {max} bytes; an env file or snapshot record is never that big")]
    TooLarge { path: PathBuf, max: u64 },
    #[error(
        "{path}: {dir} is a symlink or not a directory; the agent follows no link on the way to a file it reads or writes as root: configure the real path"
    )]
    DirSymlink { path: PathBuf, dir: PathBuf },
    #[error("{path} is not an absolute path with a parent directory and file name")]
    NoParent { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    fn io(path: &Path, source: impl Into<std::io::Error>) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source: source.into(),
        }
    }

    /// True when the file does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// How to treat a symlink at the final component of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symlinks<'a> {
    Refuse,
    /// A symlink is accepted only if it points at exactly this absolute path (in a directory
    /// only the agent's user can write); that path is then used, never the link.
    Pinned(&'a Path),
}

/// Owner, group and permission bits to give a written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Ownership {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            uid: meta.uid(),
            gid: meta.gid(),
            // Permission bits only: a setuid or sticky bit is never carried over.
            mode: meta.mode() & 0o777,
        }
    }

    /// Root-owned, `mode`: for the agent's own files.
    pub fn agent(mode: u32) -> Self {
        Self {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mode,
        }
    }
}

/// Splits `path` into its directory and final name, opening the directory one component at
/// a time from `/` with `O_DIRECTORY | O_NOFOLLOW`: no symlink anywhere in the path is
/// followed, so a directory the app dir's owner swaps for a link (`config -> /etc`) never
/// redirects a root read or write.
fn open_parent(path: &Path) -> Result<(OwnedFd, PathBuf), FileError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(FileError::NoParent {
            path: path.to_path_buf(),
        });
    };
    if !dir.is_absolute() {
        return Err(FileError::NoParent {
            path: path.to_path_buf(),
        });
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd = nix::fcntl::open("/", flags, Mode::empty())
        .map_err(|e| FileError::io(Path::new("/"), e))?;
    let mut at = PathBuf::from("/");
    for part in dir.components() {
        match part {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(c) => {
                at.push(c);
                fd = openat(fd.as_fd(), c, flags, Mode::empty()).map_err(|e| match e {
                    Errno::ELOOP | Errno::ENOTDIR => FileError::DirSymlink {
                        path: path.to_path_buf(),
                        dir: at.clone(),
                    },
                    e => FileError::io(&at, e),
                })?;
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(FileError::DirSymlink {
                    path: path.to_path_buf(),
                    dir: at,
                });
            }
        }
    }
    Ok((fd, PathBuf::from(name)))
}

/// The path to operate on: `path` itself, or, when it is a symlink to the pinned target,
/// that target. Whatever is then opened is opened without following a final symlink.
fn resolve(path: &Path, symlinks: Symlinks<'_>) -> Result<PathBuf, FileError> {
    let Symlinks::Pinned(pinned) = symlinks else {
        return Ok(path.to_path_buf());
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {}
        _ => return Ok(path.to_path_buf()),
    }
    let dest = std::fs::read_link(path).map_err(|e| FileError::io(path, e))?;
    let absolute = match path.parent() {
        Some(parent) if dest.is_relative() => parent.join(&dest),
        _ => dest.clone(),
    };
    let normal = absolute
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal || absolute.components().collect::<PathBuf>() != pinned {
        return Err(FileError::SymlinkElsewhere {
            path: path.to_path_buf(),
            dest,
            pinned: pinned.to_path_buf(),
        });
    }
    // The target's directory must be one nobody but the agent's user can change.
    let dir = pinned.parent().unwrap_or(Path::new("/"));
    match super::trust::controller(dir, "app.env_symlink_target") {
        Ok((None, _)) => Ok(pinned.to_path_buf()),
        Ok((Some((uid, _)), _)) => Err(FileError::UntrustedTarget {
            pinned: pinned.to_path_buf(),
            reason: format!("uid {uid} controls {}", dir.display()),
        }),
        Err(reason) => Err(FileError::UntrustedTarget {
            pinned: pinned.to_path_buf(),
            reason,
        }),
    }
}

/// Opens `path` for reading: never through a symlink (unless allowed), never a FIFO, device or
/// directory, never a file with more than one link.
pub fn open_regular(path: &Path, symlinks: Symlinks<'_>) -> Result<std::fs::File, FileError> {
    let path = resolve(path, symlinks)?;
    let (dir, name) = open_parent(&path)?;
    let fd = openat(
        dir.as_fd(),
        &name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => FileError::Symlink(path.clone()),
        e => FileError::io(&path, e),
    })?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|e| FileError::io(&path, e))?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular(path));
    }
    if meta.nlink() > 1 {
        return Err(FileError::HardLinked {
            path,
            links: meta.nlink(),
        });
    }
    Ok(file)
}

/// Reads a small regular file (see `open_regular`) with its ownership.
pub fn read_regular(
    path: &Path,
    symlinks: Symlinks<'_>,
) -> Result<(Vec<u8>, Ownership), FileError> {
    let file = open_regular(path, symlinks)?;
    let meta = file.metadata().map_err(|e| FileError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::io(path, e))?;
    if bytes.len() as u64 > MAX_SMALL_FILE {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            max: MAX_SMALL_FILE,
        });
    }
    Ok((bytes, Ownership::of(&meta)))
}

/// Writes `bytes` to `target` atomically with `own`: a temporary file with a random name,
/// created `O_CREAT | O_EXCL | O_NOFOLLOW` relative to the opened directory, given its owner
/// and mode before any byte is written, fsynced, renamed over `target`; then the directory is
/// fsynced. A symlink at `target` is refused unless `symlinks` is `Follow` (then its target is
/// replaced).
pub fn write_atomically(
    target: &Path,
    bytes: &[u8],
    own: Ownership,
    symlinks: Symlinks<'_>,
) -> Result<(), FileError> {
    let target = resolve(target, symlinks)?;
    let (dir, name) = open_parent(&target)?;
    match nix::sys::stat::fstatat(dir.as_fd(), &name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits() => {
            return Err(FileError::Symlink(target));
        }
        Ok(st) if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() => {
            return Err(FileError::NotRegular(target));
        }
        Ok(_) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(FileError::io(&target, e)),
    }
    let (tmp_name, fd) = create_temporary(&dir, &name).map_err(|e| FileError::io(&target, e))?;
    let write = || -> std::io::Result<()> {
        fchown(
            &fd,
            Some(Uid::from_raw(own.uid)),
            Some(Gid::from_raw(own.gid)),
        )?;
        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(own.mode))?;
        let mut file = std::fs::File::from(fd.try_clone()?);
        file.write_all(bytes)?;
        file.sync_all()?;
        renameat(dir.as_fd(), &tmp_name, dir.as_fd(), &name)?;
        nix::unistd::fsync(&dir)?;
        Ok(())
    };
    write().map_err(|e| {
        let _ = unlinkat(dir.as_fd(), &tmp_name, UnlinkatFlags::NoRemoveDir);
        FileError::io(&target, e)
    })
}

/// Creates `.<name>.rollback-<random>` in `dir`, exclusively and without following symlinks,
/// mode 0600; a name that exists (planted or left over) is skipped for another random one.
fn create_temporary(dir: &OwnedFd, name: &Path) -> std::io::Result<(PathBuf, OwnedFd)> {
    use rand::Rng;
    let base = name.to_string_lossy();
    for _ in 0..16 {
        let suffix: u64 = rand::rng().random();
        let tmp = PathBuf::from(format!(".{base}.rollback-{suffix:016x}"));
        match openat(
            dir.as_fd(),
            &tmp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok((tmp, fd)),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::other(
        "could not create a temporary file with a fresh random name in 16 tries",
    ))
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
    let (Some(target), Some(backup)) = (app.env_file.clone(), app.env_backup.clone()) else {
        return Err(Failure::new(
            -1,
            "app.env_file and app.env_backup are not set in agent.toml",
        ));
    };
    let symlinks = app.env_symlinks();
    let from_snapshot = source.is_some();
    let source = source.unwrap_or(backup);
    // The backup (or a snapshot's copy) is never read through a symlink.
    let what = if from_snapshot {
        "the snapshot's env copy"
    } else {
        "the env backup"
    };
    let (bytes, source_own) = read_regular(&source, Symlinks::Refuse)
        .map_err(|e| Failure::new(-1, format!("cannot use {what}: {e}")))?;
    let sha = sha256_hex(&bytes);
    let before = match read_regular(&target, symlinks) {
        Ok((b, own)) => Some((b, own)),
        Err(e) if e.is_missing() => None,
        Err(e) => {
            return Err(Failure::new(
                -1,
                format!("refusing to replace the env file: {e}"),
            ));
        }
    };
    if let Some((b, _)) = &before
        && b == &bytes
    {
        ctx.say(&format!(
            "{} is already identical to {}; nothing to restore (sha256 {sha})",
            target.display(),
            source.display()
        ));
        ctx.fact(fact::ENV_SHA256, sha);
        ctx.fact(fact::CHANGED, "false");
        return Ok(());
    }
    // Keep the env file's owner, group and mode; a missing one gets the backup's (a snapshot
    // copy is root's, so then the app dir's owner and 0600).
    let own = match &before {
        Some((_, own)) => *own,
        None if from_snapshot => app_dir_ownership(&app.dir, 0o600)?,
        None => source_own,
    };
    write_atomically(&target, &bytes, own, symlinks).map_err(|e| {
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
        Some((b, _)) => ctx.say(&format!(
            "{}: sha256 {} -> {sha} (from {}), owner {}:{} mode {:04o} kept",
            target.display(),
            sha256_hex(&b),
            source.display(),
            own.uid,
            own.gid,
            own.mode
        )),
        None => ctx.say(&format!(
            "{} was missing; restored from {} (sha256 {sha}), owner {}:{} mode {:04o}",
            target.display(),
            source.display(),
            own.uid,
            own.gid,
            own.mode
        )),
    }
    ctx.fact(fact::ENV_SHA256, sha);
    ctx.fact(fact::CHANGED, "true");
    Ok(())
}

/// The owner and group of the app dir, with `mode`.
pub(super) fn app_dir_ownership(dir: &Path, mode: u32) -> Result<Ownership, Failure> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Failure::new(-1, format!("app dir {}: {e}", dir.display())))?;
    Ok(Ownership {
        uid: meta.uid(),
        gid: meta.gid(),
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_link_to_the_pinned_target_is_used_and_the_target_is_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let etc = tmp.path().join("etc");
        std::fs::create_dir(&etc).expect("mkdir");
        let real = etc.join("app-env");
        std::fs::write(&real, "OLD=1\n").expect("write");
        let elsewhere = etc.join("shadow");
        std::fs::write(&elsewhere, "SECRET\n").expect("write");
        let link = tmp.path().join(".env");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let own = Ownership::agent(0o640);
        assert!(matches!(
            write_atomically(&link, b"NEW=1\n", own, Symlinks::Refuse),
            Err(FileError::Symlink(_))
        ));
        let pinned = Symlinks::Pinned(&real);
        write_atomically(&link, b"NEW=1\n", own, pinned).expect("pinned");
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("link")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&real).expect("real"), b"NEW=1\n");
        let (bytes, got) = read_regular(&link, pinned).expect("read");
        assert_eq!((bytes.as_slice(), got.mode), (&b"NEW=1\n"[..], 0o640));

        // Pointed anywhere else (directly or with `..`), the link is refused and not followed.
        for dest in [elsewhere.clone(), etc.join("../etc/shadow")] {
            std::fs::remove_file(&link).expect("rm");
            std::os::unix::fs::symlink(&dest, &link).expect("symlink");
            assert!(matches!(
                write_atomically(&link, b"X\n", own, pinned),
                Err(FileError::SymlinkElsewhere { .. })
            ));
            assert!(matches!(
                read_regular(&link, pinned),
                Err(FileError::SymlinkElsewhere { .. })
            ));
        }
        assert_eq!(std::fs::read(&elsewhere).expect("secret"), b"SECRET\n");
    }

    #[test]
    fn a_directory_swapped_for_a_link_is_not_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join(".env"), "VICTIM\n").expect("write");
        let app = tmp.path().join("app");
        std::fs::create_dir(&app).expect("mkdir");
        std::os::unix::fs::symlink(&outside, app.join("config")).expect("symlink");
        let env = app.join("config/.env");
        assert!(matches!(
            write_atomically(&env, b"X\n", Ownership::agent(0o600), Symlinks::Refuse),
            Err(FileError::DirSymlink { .. })
        ));
        assert!(matches!(
            read_regular(&env, Symlinks::Refuse),
            Err(FileError::DirSymlink { .. })
        ));
        assert_eq!(
            std::fs::read(outside.join(".env")).expect("victim"),
            b"VICTIM\n"
        );
    }

    #[test]
    fn oversized_and_missing_files_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let big = tmp.path().join("big");
        std::fs::write(&big, vec![b'x'; (MAX_SMALL_FILE + 1) as usize]).expect("write");
        assert!(matches!(
            read_regular(&big, Symlinks::Refuse),
            Err(FileError::TooLarge { .. })
        ));
        let missing =
            read_regular(&tmp.path().join("nope"), Symlinks::Refuse).expect_err("missing");
        assert!(missing.is_missing(), "{missing}");
    }
}
