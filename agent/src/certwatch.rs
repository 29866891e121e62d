//! The agent's certificate and key, picked up again without a restart. Every new connection
//! uses the pair last accepted, and the files are looked at again before each dial and every
//! `cert_check_secs` during a session. A pair that changed on disk is accepted only whole:
//! the certificate and key parse, the key belongs to the certificate, it is valid now, it
//! verifies as a client certificate against the fleet CA, and it names this host (the
//! identity of the certificate the agent started with). Anything else is refused with one log
//! line and the agent keeps presenting the pair it has. The session decides when to reconnect
//! with an accepted pair (`session`: never in the middle of a run).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rollback_common::expiry;
use rollback_common::identity::{Identity, check_client_pair};
use rollback_common::tls::client_config_from_pem;
use tonic::transport::ClientTlsConfig;
use tracing::{info, warn};

use crate::config::Config;

/// Certificate and key files larger than this are not read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// What `look` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// The files hold the pair in use (or a refused one, already reported).
    Unchanged,
    /// A new valid pair was accepted: the next connection presents it.
    Renewed,
    /// The files changed and do not hold a usable pair; the current one stays.
    Refused,
}

#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// The files as read, or why they could not be.
type Seen = Result<Files, String>;

struct State {
    /// The pair in use (as read from disk) and the configuration built from it.
    current: Files,
    tls: ClientTlsConfig,
    /// Changed files that failed the check and were reported, so they are reported once.
    refused: Option<Seen>,
    /// Changed files that failed the check once and are not reported yet: files copied by
    /// hand may be caught between the certificate and the key.
    unsettled: Option<Seen>,
}

pub struct CertWatch {
    expected: Identity,
    ca: Vec<u8>,
    cert_path: PathBuf,
    key_path: PathBuf,
    server_name: Option<String>,
    every: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for CertWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertWatch")
            .field("expected", &self.expected)
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// Reads a file of at most `MAX_FILE_BYTES`; with `private`, only one the agent's user owns
/// and nobody else can read (checked on the open file, then read from it).
fn read_file(path: &Path, private: bool) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if private {
        crate::config::check_private(&meta, path, "agent private key")
            .map_err(|e| e.to_string())?;
    } else if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} is {} bytes, too large for a certificate or key",
            path.display(),
            meta.len()
        ));
    }
    let mut data = Vec::new();
    file.take(MAX_FILE_BYTES)
        .read_to_end(&mut data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(data)
}

impl CertWatch {
    /// Starts from the pair on disk, which `run` has already checked names `expected`.
    pub fn new(config: &Config, expected: Identity) -> Result<Self, String> {
        let ca = read_file(&config.tls.ca, false)?;
        let current = Files {
            cert: read_file(&config.tls.cert, false)?,
            key: read_file(&config.tls.key, true)?,
        };
        let server_name = config.server_name.clone();
        let tls = client_config_from_pem(&ca, &current.cert, &current.key, server_name.as_deref());
        Ok(Self {
            expected,
            ca,
            cert_path: config.tls.cert.clone(),
            key_path: config.tls.key.clone(),
            server_name,
            every: Duration::from_secs(config.cert_check_secs),
            state: Mutex::new(State {
                current,
                tls,
                refused: None,
                unsettled: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How often a session looks at the files.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// The TLS configuration of the pair in use, for the next connection.
    pub fn tls(&self) -> ClientTlsConfig {
        self.lock().tls.clone()
    }

    /// Checks a changed pair; the error is what the log says.
    fn check(&self, files: &Files) -> Result<String, String> {
        let pair = check_client_pair(&self.ca, &files.cert, &files.key, expiry::now_unix())
            .map_err(|e| e.to_string())?;
        if pair.identity != self.expected {
            return Err(format!(
                "the certificate is for {}, not for this host ({})",
                pair.identity, self.expected
            ));
        }
        Ok(format!(
            "serial {}, valid until {}",
            pair.facts.serial,
            expiry::format_unix(pair.facts.not_after_unix)
        ))
    }

    /// Reads the files again; accepts a changed pair that checks out (the next connection
    /// presents it) and refuses one that does not (logged once; the current pair stays).
    pub fn look(&self) -> Look {
        let host = &self.expected.name;
        let seen: Seen = read_file(&self.cert_path, false)
            .and_then(|cert| read_file(&self.key_path, true).map(|key| Files { cert, key }));
        let mut state = self.lock();
        if seen.as_ref() == Ok(&state.current) {
            state.refused = None;
            state.unsettled = None;
            return Look::Unchanged;
        }
        let verdict = match &seen {
            Ok(files) => self.check(files).map(|facts| (facts, files.clone())),
            Err(unreadable) => Err(unreadable.clone()),
        };
        match verdict {
            Ok((facts, files)) => {
                state.tls = client_config_from_pem(
                    &self.ca,
                    &files.cert,
                    &files.key,
                    self.server_name.as_deref(),
                );
                state.current = files;
                state.refused = None;
                state.unsettled = None;
                info!(host = %host, cert = %self.cert_path.display(), key = %self.key_path.display(), renewed = %facts, "renewed certificate accepted; the agent reconnects with it once no run is in progress");
                Look::Renewed
            }
            Err(reason) => {
                if state.refused.as_ref() == Some(&seen) {
                    return Look::Refused;
                }
                if state.unsettled.as_ref() != Some(&seen) {
                    // Reported only if it is still the same at the next look.
                    state.unsettled = Some(seen);
                    return Look::Refused;
                }
                state.unsettled = None;
                state.refused = Some(seen);
                warn!(host = %host, cert = %self.cert_path.display(), key = %self.key_path.display(), reason = %reason, "renewed certificate refused; keeping the current one (a pair from `rollbackctl pki renew agent {host}` checks out)");
                Look::Refused
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollback_common::identity::Role;
    use rollback_common::pki::PkiDir;
    use std::os::unix::fs::PermissionsExt;

    struct Setup {
        _tmp: tempfile::TempDir,
        pki: PkiDir,
        cert: PathBuf,
        key: PathBuf,
        watch: CertWatch,
    }

    /// Puts `role`/`name`'s pair from the PKI where the agent reads its own (key 0600).
    fn install(pki: &PkiDir, name: &str, cert: &Path, key: &Path) {
        std::fs::copy(pki.cert(Role::Agent, name), cert).expect("copy cert");
        std::fs::copy(pki.key(Role::Agent, name), key).expect("copy key");
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    fn setup() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(tmp.path().join("pki"));
        pki.init("fleet.test", 30).expect("init");
        for host in ["web-1", "web-2"] {
            pki.issue(Role::Agent, host, &[], 30, false).expect("issue");
        }
        let (cert, key) = (tmp.path().join("agent.pem"), tmp.path().join("agent.key"));
        install(&pki, "web-1", &cert, &key);
        let config: Config = toml::from_str(&format!(
            "host_id = \"web-1\"\ncoordinator = \"https://127.0.0.1:1\"\nstate_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            tmp.path().join("state").display(),
            pki.ca_cert().display(),
            cert.display(),
            key.display()
        ))
        .expect("config");
        let own = config.tls.own_identity().expect("identity");
        let watch = CertWatch::new(&config, own).expect("watch");
        Setup {
            _tmp: tmp,
            pki,
            cert,
            key,
            watch,
        }
    }

    impl Setup {
        fn in_use(&self) -> Vec<u8> {
            self.watch.lock().current.cert.clone()
        }
        fn on_disk(&self) -> Vec<u8> {
            std::fs::read(&self.cert).expect("read")
        }
    }

    #[test]
    fn a_renewed_pair_is_taken_and_a_bad_one_refused_keeping_the_old() {
        let s = setup();
        let original = s.in_use();
        assert_eq!(s.watch.look(), Look::Unchanged);

        // Another host's pair: refused at every look (reported at the second), never used.
        install(&s.pki, "web-2", &s.cert, &s.key);
        assert_eq!(s.watch.look(), Look::Refused);
        assert_eq!(s.watch.look(), Look::Refused);
        assert_eq!(s.in_use(), original);

        // A corrupt certificate.
        std::fs::write(&s.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("write");
        assert_eq!(s.watch.look(), Look::Refused);
        assert_eq!(s.in_use(), original);

        // A renewed pair whose key others may read.
        s.pki.renew(Role::Agent, "web-1", 60).expect("renew");
        install(&s.pki, "web-1", &s.cert, &s.key);
        std::fs::set_permissions(&s.key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(s.watch.look(), Look::Refused);
        assert_eq!(s.in_use(), original);

        // The renewed pair as it should be: taken, once.
        std::fs::set_permissions(&s.key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(s.watch.look(), Look::Renewed);
        assert_eq!(s.in_use(), s.on_disk());
        assert_ne!(s.in_use(), original);
        assert_eq!(s.watch.look(), Look::Unchanged);
    }

    #[test]
    fn a_mismatched_or_expired_pair_is_refused() {
        let s = setup();
        let original = s.in_use();
        // The renewed certificate with the old key (caught between two copies).
        s.pki.renew(Role::Agent, "web-1", 60).expect("renew");
        std::fs::copy(s.pki.cert(Role::Agent, "web-1"), &s.cert).expect("copy");
        assert_eq!(s.watch.look(), Look::Refused);
        assert_eq!(s.in_use(), original);
        // Issued for 0 days: expired as soon as it exists.
        s.pki.renew(Role::Agent, "web-1", 0).expect("renew");
        install(&s.pki, "web-1", &s.cert, &s.key);
        assert_eq!(s.watch.look(), Look::Refused);
        assert_eq!(s.in_use(), original);
    }
}
