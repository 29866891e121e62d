//! The life of an issued certificate: `rollbackctl pki renew` (a fresh certificate and key for
//! an identity that was issued before, replacing the pair atomically and keeping the old one
//! as `NAME.pem.prev` / `NAME.key.prev`) and `rollbackctl pki list` (every certificate in the
//! PKI directory with its serial and expiry, a corrupt or foreign file shown, never fatal).
//!
//! Files are replaced by writing a temporary (mode set at creation, fsynced) and renaming it
//! over the old file, so a reader sees the old file or the new one, never a part of either.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::identity::{
    CertFacts, Identity, IdentityError, Role, first_pem_certificate, verify_client_cert,
};
use crate::pki::{PkiDir, PkiError};

/// A certificate file larger than this is not read (`pki list` reports it unreadable).
const MAX_CERT_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error(
        "no {role} certificate `{name}` in {dir}: it was never issued, so there is nothing to renew; issue it with `rollbackctl pki --dir {dir} issue {role} {name}`"
    )]
    NeverIssued {
        role: Role,
        name: String,
        dir: String,
    },
    #[error(
        "{path} is not a readable certificate ({reason}); restore it from its .prev copy or replace it with `rollbackctl pki issue {role} {name} --force`"
    )]
    Unreadable {
        path: String,
        role: Role,
        name: String,
        reason: String,
    },
    #[error(
        "{path} holds a certificate for {found}, not {expected}; refusing to renew it under another identity"
    )]
    WrongIdentity {
        path: String,
        found: String,
        expected: String,
    },
    #[error(
        "{path}: cannot give the new file the owner of the old one (uid {uid}, gid {gid}): {source}; run the renewal as root or as that user (nothing was replaced)"
    )]
    Owner {
        path: String,
        uid: u32,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: {source} while installing the renewed pair; the previous pair is in {path}.prev and the key's .prev: move both back to roll back"
    )]
    Install {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// What `renew` did.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub identity: Identity,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Where the replaced certificate and key were kept (the key's only if there was one).
    pub previous_cert: PathBuf,
    pub previous_key: Option<PathBuf>,
    pub old: CertFacts,
    pub new: CertFacts,
}

/// One `.pem` file found by `list`.
#[derive(Debug, Clone)]
pub struct ListedCert {
    pub path: PathBuf,
    /// `ca`, or the role directory it was found in.
    pub kind: String,
    /// The file's name without `.pem`.
    pub name: String,
    pub read: Result<ReadCert, String>,
}

/// A certificate `list` could read.
#[derive(Debug, Clone)]
pub struct ReadCert {
    /// `None` for the CA (it names no identity).
    pub identity: Option<Identity>,
    pub facts: CertFacts,
    /// What is wrong with it besides expiry: another identity than its file name says, another
    /// trust domain, not issued by this CA.
    pub problems: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `path` + `suffix` (`web-1.pem` → `web-1.pem.prev`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A temporary next to `path`, created with `mode`. `create_new` (O_CREAT|O_EXCL) never opens
/// an existing file or follows a link planted at the name.
fn create_temp(path: &Path, mode: u32) -> Result<(PathBuf, fs::File), PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{nanos}", std::process::id()));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    Ok((tmp, file))
}

/// A staged file: written and fsynced under a temporary name, renamed into place later.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Only still there if it was never installed.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Writes `data` to a temporary for `dest` with `mode`, owned like `like` (if given).
fn stage(
    dest: &Path,
    data: &[u8],
    mode: u32,
    like: Option<&fs::Metadata>,
) -> Result<Staged, RenewError> {
    let (tmp, mut file) = create_temp(dest, mode)?;
    let staged = Staged {
        tmp,
        dest: dest.to_path_buf(),
    };
    // The mode given at creation is masked by the umask: set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(&staged.tmp))?;
    if let Some(old) = like {
        let mine = file.metadata().map_err(io(&staged.tmp))?;
        if (mine.uid(), mine.gid()) != (old.uid(), old.gid()) {
            std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid())).map_err(
                |source| RenewError::Owner {
                    path: dest.display().to_string(),
                    uid: old.uid(),
                    gid: old.gid(),
                    source,
                },
            )?;
        }
    }
    file.write_all(data).map_err(io(&staged.tmp))?;
    file.sync_all().map_err(io(&staged.tmp))?;
    Ok(staged)
}

fn install(staged: &Staged) -> Result<(), RenewError> {
    fs::rename(&staged.tmp, &staged.dest).map_err(|source| RenewError::Install {
        path: staged.dest.display().to_string(),
        source,
    })
}

/// Reads at most `MAX_CERT_FILE_BYTES` of a file.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_CERT_FILE_BYTES {
        return Err(format!("{} bytes: too large for a certificate", meta.len()));
    }
    let mut data = Vec::new();
    file.take(MAX_CERT_FILE_BYTES)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    Ok(data)
}

fn parse_cert(pem: &[u8]) -> Result<(Vec<u8>, CertFacts), IdentityError> {
    let der = first_pem_certificate(pem)?;
    let facts = CertFacts::from_der(&der)?;
    Ok((der, facts))
}

impl PkiDir {
    /// Issues a fresh certificate and key for `role`/`name`, which must have been issued
    /// before: same identity, and for a coordinator the same DNS and IP names, read from the
    /// old certificate. The old pair is kept as `.prev`; the new one replaces it atomically
    /// (the key first, then the certificate; a reader that checks that the key belongs to the
    /// certificate never takes a half-renewed pair). New files keep the old ones' owner; the
    /// key is 0600, the certificate keeps its mode.
    pub fn renew(&self, role: Role, name: &str, days: u32) -> Result<Renewal, RenewError> {
        let (cert_path, key_path) = (self.cert(role, name), self.key(role, name));
        let expected = Identity::new(&self.trust_domain()?, role, name).map_err(PkiError::from)?;
        let old_cert_meta = match fs::symlink_metadata(&cert_path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RenewError::NeverIssued {
                    role,
                    name: name.to_string(),
                    dir: self.dir.display().to_string(),
                });
            }
            Err(e) => return Err(io(&cert_path)(e).into()),
        };
        let unreadable = |reason: String| RenewError::Unreadable {
            path: cert_path.display().to_string(),
            role,
            name: name.to_string(),
            reason,
        };
        if !old_cert_meta.is_file() {
            return Err(unreadable("not a regular file".into()));
        }
        let old_pem = read_bounded(&cert_path).map_err(unreadable)?;
        let (old_der, old) = parse_cert(&old_pem).map_err(|e| unreadable(e.to_string()))?;
        let found = Identity::from_cert_der(&old_der).map_err(|e| unreadable(e.to_string()))?;
        if found != expected {
            return Err(RenewError::WrongIdentity {
                path: cert_path.display().to_string(),
                found: found.to_string(),
                expected: expected.to_string(),
            });
        }
        let old_key = match fs::symlink_metadata(&key_path) {
            Ok(meta) if meta.is_file() => Some((fs::read(&key_path).map_err(io(&key_path))?, meta)),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&key_path)(e).into()),
        };
        let sans = match role {
            Role::Coordinator => old.dns_and_ip_sans.clone(),
            Role::Agent | Role::Operator => Vec::new(),
        };
        let leaf = self.sign_leaf(role, name, &sans, days)?;
        let new_der = first_pem_certificate(leaf.cert_pem.as_bytes()).map_err(PkiError::from)?;
        let new = CertFacts::from_der(&new_der).map_err(PkiError::from)?;

        // Everything is staged (written and fsynced) before anything is replaced.
        let cert_mode = old_cert_meta.mode() & 0o644;
        let previous_cert = with_suffix(&cert_path, ".prev");
        let previous_key = with_suffix(&key_path, ".prev");
        let prev_cert = stage(&previous_cert, &old_pem, cert_mode, Some(&old_cert_meta))?;
        let prev_key = match &old_key {
            Some((data, meta)) => Some(stage(&previous_key, data, 0o600, Some(meta))?),
            None => None,
        };
        let key_like = old_key.as_ref().map_or(&old_cert_meta, |(_, m)| m);
        let new_key = stage(&key_path, leaf.key_pem.as_bytes(), 0o600, Some(key_like))?;
        let new_cert = stage(
            &cert_path,
            leaf.cert_pem.as_bytes(),
            cert_mode,
            Some(&old_cert_meta),
        )?;
        install(&prev_cert)?;
        if let Some(p) = &prev_key {
            install(p)?;
        }
        install(&new_key)?;
        install(&new_cert)?;
        if let Some(dir) = cert_path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        Ok(Renewal {
            identity: leaf.identity,
            cert: cert_path,
            key: key_path,
            previous_cert,
            previous_key: old_key.map(|_| previous_key),
            old,
            new,
        })
    }

    /// Every certificate in the PKI directory: `ca.pem` and each `ROLE/NAME.pem`, soonest
    /// expiry first, unreadable files last. A file that is not a certificate, or not one of
    /// this PKI's, is listed as such; only an unreadable PKI directory is an error.
    pub fn list(&self) -> Result<Vec<ListedCert>, PkiError> {
        let ca_path = self.ca_cert();
        if !ca_path.exists() {
            return Err(PkiError::NoCa {
                dir: self.dir.clone(),
            });
        }
        let ca_pem = read_bounded(&ca_path);
        let trust_domain = self.trust_domain().ok();
        let mut out = vec![ListedCert {
            read: ca_pem
                .clone()
                .and_then(|pem| parse_cert(&pem).map_err(|e| e.to_string()))
                .map(|(_, facts)| ReadCert {
                    identity: None,
                    facts,
                    problems: Vec::new(),
                }),
            path: ca_path,
            kind: "ca".into(),
            name: "ca".into(),
        }];
        for role in [Role::Agent, Role::Operator, Role::Coordinator] {
            let dir = self.dir.join(role.as_str());
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&dir)(e)),
            };
            let mut paths: Vec<PathBuf> = entries
                .map(|e| e.map(|e| e.path()).map_err(io(&dir)))
                .collect::<Result<_, _>>()?;
            paths.retain(|p| p.extension().is_some_and(|x| x == "pem"));
            paths.sort();
            for path in paths {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let read = read_bounded(&path).and_then(|pem| {
                    read_leaf(
                        &pem,
                        role,
                        &name,
                        trust_domain.as_deref(),
                        ca_pem.as_deref().ok(),
                    )
                });
                out.push(ListedCert {
                    path,
                    kind: role.as_str().into(),
                    name,
                    read,
                });
            }
        }
        out.sort_by(|a, b| {
            let key = |c: &ListedCert| c.read.as_ref().map_or(i64::MAX, |r| r.facts.not_after_unix);
            key(a).cmp(&key(b)).then_with(|| a.path.cmp(&b.path))
        });
        Ok(out)
    }
}

/// An issued certificate as `list` shows it, with what does not fit where it was found.
fn read_leaf(
    pem: &[u8],
    role: Role,
    name: &str,
    trust_domain: Option<&str>,
    ca_pem: Option<&[u8]>,
) -> Result<ReadCert, String> {
    let (der, facts) = parse_cert(pem).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let identity = match Identity::from_cert_der(&der) {
        Ok(id) => {
            if id.role != role || id.name != name {
                problems.push(format!("names {id}, not the {role} `{name}` its file says"));
            }
            if trust_domain.is_some_and(|td| td != id.trust_domain) {
                problems.push(format!(
                    "trust domain `{}` is not this PKI's",
                    id.trust_domain
                ));
            }
            Some(id)
        }
        Err(e) => {
            problems.push(format!("no fleet identity: {e}"));
            None
        }
    };
    // Checked at the start of its validity, so an expired certificate is only `EXPIRED`.
    if let Some(ca) = ca_pem
        && let Err(e) = verify_client_cert(ca, &der, facts.not_before_unix.saturating_add(1))
    {
        problems.push(format!("not issued by this PKI's CA: {e}"));
    }
    Ok(ReadCert {
        identity,
        facts,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_pki(tag: &str) -> (PathBuf, PkiDir) {
        let dir = std::env::temp_dir().join(format!("pki-life-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let pki = PkiDir::new(&dir);
        pki.init("fleet.test", 30).expect("init");
        (dir, pki)
    }

    #[test]
    fn renew_keeps_identity_and_sans_and_the_previous_pair() {
        let (dir, pki) = tmp_pki("renew");
        let sans = vec!["127.0.0.1".to_string(), "coord.example".to_string()];
        let issued = pki
            .issue(Role::Coordinator, "c1", &sans, 10, false)
            .expect("issue");
        let old_pem = fs::read(&issued.cert).expect("read");
        let old_key = fs::read(&issued.key).expect("read");
        let r = pki.renew(Role::Coordinator, "c1", 400).expect("renew");
        assert_eq!(r.new.dns_and_ip_sans, sans);
        assert_ne!(r.new.serial, r.old.serial);
        assert!(r.new.not_after_unix > r.old.not_after_unix + 300 * 86_400);
        assert_eq!(fs::read(&r.previous_cert).expect("prev"), old_pem);
        assert_eq!(
            fs::read(r.previous_key.as_ref().expect("prev key")).expect("prev key"),
            old_key
        );
        let mode = fs::metadata(&r.key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.join("coordinator"))
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn renew_refuses_what_was_never_issued_or_is_another_identity() {
        let (dir, pki) = tmp_pki("refuse");
        let err = pki
            .renew(Role::Agent, "ghost", 30)
            .expect_err("never issued");
        assert!(matches!(err, RenewError::NeverIssued { .. }), "{err}");
        pki.issue(Role::Agent, "web-2", &[], 30, false)
            .expect("issue");
        fs::copy(
            pki.cert(Role::Agent, "web-2"),
            pki.cert(Role::Agent, "web-1"),
        )
        .expect("copy");
        let err = pki
            .renew(Role::Agent, "web-1", 30)
            .expect_err("other identity");
        assert!(matches!(err, RenewError::WrongIdentity { .. }), "{err}");
        fs::write(pki.cert(Role::Agent, "web-3"), "garbage").expect("write");
        let err = pki.renew(Role::Agent, "web-3", 30).expect_err("garbage");
        assert!(matches!(err, RenewError::Unreadable { .. }), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
