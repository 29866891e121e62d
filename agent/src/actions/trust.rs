//! Who controls a path: the user who could replace what it names. A program whose code or
//! working directory another user controls (a repository's filters, alembic's env.py and
//! migrations, a venv's binary) runs as that user, never as root; a path whose control is
//! ambiguous (root's but writable by a group, or held by two users) is refused.
//!
//! The path is resolved once (`canonicalize`), then every component of the real path is
//! checked without following links. A component only root can write cannot be swapped by
//! anyone else, so checking then using the real path is safe; where a user can write a
//! component, the program runs as that user, who gains nothing by swapping it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The user and group a program must run as, or `None` for the agent's own user.
pub type RunAs = Option<(u32, u32)>;

/// Who controls `path` (`key` names it in errors): `Ok(None)` when only the agent's user
/// (root) can change it or anything above it, `Ok(Some((uid, gid)))` when that user owns it
/// or a directory above it, an error when control is ambiguous.
pub fn controller(path: &Path, key: &str) -> Result<(RunAs, PathBuf), String> {
    let me = nix::unistd::geteuid().as_raw();
    let real = path
        .canonicalize()
        .map_err(|e| format!("{key} {}: {e}", path.display()))?;
    let mut found: RunAs = None;
    let mut at = PathBuf::new();
    for part in real.components() {
        at.push(part);
        let meta = std::fs::symlink_metadata(&at)
            .map_err(|e| format!("{key} {}: {}: {e}", path.display(), at.display()))?;
        if meta.file_type().is_symlink() {
            return Err(format!(
                "{key} {}: {} changed into a symlink while it was checked; retry, and find out who is changing it",
                path.display(),
                at.display()
            ));
        }
        let mode = meta.mode();
        let sticky = mode & 0o1000 != 0 && meta.is_dir();
        let shared_write = mode & 0o022 != 0 && !sticky;
        let owner = meta.uid();
        if owner == me {
            if shared_write {
                return Err(format!(
                    "{key} {}: {} belongs to the agent's user but is writable by its group or others (mode {:04o}), so anyone there could replace what the agent runs; run `chmod go-w {}` or give it to the user the app runs as",
                    path.display(),
                    at.display(),
                    mode & 0o7777,
                    at.display()
                ));
            }
            continue;
        }
        match found {
            Some((uid, _)) if uid != owner => {
                return Err(format!(
                    "{key} {}: is controlled by two users (uid {uid} above, uid {owner} at {}); the agent cannot tell whom to run as — give the path to one user",
                    path.display(),
                    at.display()
                ));
            }
            Some(_) => {}
            None => found = Some((owner, meta.gid())),
        }
    }
    Ok((found, real))
}

/// The one user controlling all of `paths` (see `controller`), or an error when two differ;
/// with the real path of each, in order (use those, not the configured ones: a link in a
/// path may be changed after the check).
pub fn controller_of_all(paths: &[(&Path, &str)]) -> Result<(RunAs, Vec<PathBuf>), String> {
    let mut run_as: RunAs = None;
    let mut from = "";
    let mut reals = Vec::with_capacity(paths.len());
    for (path, key) in paths {
        let (who, real) = controller(path, key)?;
        reals.push(real);
        match (run_as, who) {
            (_, None) => {}
            (None, Some(w)) => {
                run_as = Some(w);
                from = key;
            }
            (Some((a, _)), Some((b, _))) if a != b => {
                return Err(format!(
                    "{from} is controlled by uid {a} but {key} by uid {b}; the agent runs a program as the one user who controls its code and directory — give them to one user"
                ));
            }
            (Some(_), Some(_)) => {}
        }
    }
    Ok((run_as, reals))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn control_follows_the_real_path_and_refuses_ambiguity() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root to hand directories to other users");
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let root_dir = tmp.path().join("root");
        std::fs::create_dir(&root_dir).expect("mkdir");
        chmod(tmp.path(), 0o755);
        assert_eq!(controller(&root_dir, "k").expect("ok").0, None);

        let app = tmp.path().join("app");
        std::fs::create_dir_all(app.join("migrations")).expect("mkdir");
        std::os::unix::fs::chown(&app, Some(4242), Some(4343)).expect("chown");
        // Root's subdirectory inside the app user's dir: still the app user's to replace.
        assert_eq!(
            controller(&app.join("migrations"), "k").expect("ok").0,
            Some((4242, 4343))
        );
        // A link the app user planted to a root dir resolves to the root dir: root's, and
        // nobody else can change it.
        std::os::unix::fs::symlink(&root_dir, app.join("link")).expect("symlink");
        assert_eq!(controller(&app.join("link"), "k").expect("ok").0, None);

        // Root's, but group-writable: refused.
        chmod(&root_dir, 0o775);
        let e = controller(&root_dir, "alembic.workdir").expect_err("ambiguous");
        assert!(e.contains("chmod go-w"), "{e}");
        chmod(&root_dir, 0o755);

        // Two users along the path: refused.
        let inner = app.join("inner");
        std::fs::create_dir(&inner).expect("mkdir");
        std::os::unix::fs::chown(&inner, Some(5555), None).expect("chown");
        assert!(controller(&inner, "k").is_err());

        // All of a program's paths must agree.
        assert_eq!(
            controller_of_all(&[(&root_dir, "a"), (&app, "b")])
                .expect("one user")
                .0,
            Some((4242, 4343))
        );
        assert!(controller_of_all(&[(&inner.join("."), "a"), (&app, "b")]).is_err());
    }
}
