//! A small private CA for a fleet: `rollbackctl pki init` and `rollbackctl pki issue`.
//!
//! Layout of a PKI directory:
//! `ca.pem`, `ca.key` (0600), `trust-domain`, and `<role>/<name>.pem` + `<role>/<name>.key`
//! (after `pki renew`, the replaced pair as `<name>.pem.prev` + `<name>.key.prev`; renewal and
//! listing live in `pki_lifecycle`); `issued.log` (the serial of every certificate issued or
//! renewed) and `crl.pem` (see `crate::crl`).
//! Private keys are created with mode 0600 and are never printed.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{Identity, IdentityError, Role, validate_trust_domain};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it (pass --force to replace it)")]
    Exists { path: PathBuf },
    #[error(
        "{dir} holds no CA: run `rollbackctl pki init --dir {dir} --trust-domain DOMAIN` first"
    )]
    NoCa { dir: PathBuf },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("subject alternative name `{value}` is neither an IP address nor a DNS name")]
    BadSan { value: String },
    #[error("a coordinator certificate needs at least one --san (the DNS name or IP agents dial)")]
    NoSan,
}

/// Paths of a certificate and its private key.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub identity: Identity,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn write_file(path: &Path, data: &str, mode: u32, force: bool) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if !force && path.exists() {
        return Err(PkiError::Exists {
            path: path.to_path_buf(),
        });
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut file = opts.open(path).map_err(io_err(path))?;
    file.write_all(data.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(())
}

fn validity(days: u32) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    // Back-date a little so hosts with slightly slow clocks accept fresh certificates.
    (
        now - Duration::hours(1),
        now + Duration::days(i64::from(days)),
    )
}

/// Paths of a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir {
    pub dir: PathBuf,
}

impl PkiDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn trust_domain_file(&self) -> PathBuf {
        self.dir.join("trust-domain")
    }
    pub fn cert(&self, role: Role, name: &str) -> PathBuf {
        self.dir.join(role.as_str()).join(format!("{name}.pem"))
    }
    pub fn key(&self, role: Role, name: &str) -> PathBuf {
        self.dir.join(role.as_str()).join(format!("{name}.key"))
    }

    /// Creates the CA. Refuses to replace an existing one.
    pub fn init(&self, trust_domain: &str, days: u32) -> Result<(), PkiError> {
        validate_trust_domain(trust_domain)?;
        for p in [self.ca_cert(), self.ca_key()] {
            if p.exists() {
                return Err(PkiError::Exists { path: p });
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("fleet-rollback CA ({trust_domain})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = validity(days);
        let cert = params.self_signed(&key)?;
        write_file(&self.ca_key(), &key.serialize_pem(), 0o600, false)?;
        write_file(&self.ca_cert(), &cert.pem(), 0o644, false)?;
        write_file(
            &self.trust_domain_file(),
            &format!("{trust_domain}\n"),
            0o644,
            true,
        )?;
        Ok(())
    }

    pub fn trust_domain(&self) -> Result<String, PkiError> {
        let path = self.trust_domain_file();
        if !path.exists() {
            return Err(PkiError::NoCa {
                dir: self.dir.clone(),
            });
        }
        let td = fs::read_to_string(&path).map_err(io_err(&path))?;
        let td = td.trim().to_string();
        validate_trust_domain(&td)?;
        Ok(td)
    }

    /// Issues a certificate for `role`/`name`. `sans` (DNS names or IPs) are required for a
    /// coordinator, whose certificate is also a TLS server certificate.
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        sans: &[String],
        days: u32,
        force: bool,
    ) -> Result<IssuedFiles, PkiError> {
        let leaf = self.sign_leaf(role, name, sans, days)?;
        let files = IssuedFiles {
            identity: leaf.identity,
            cert: self.cert(role, name),
            key: self.key(role, name),
        };
        if !force {
            for p in [&files.cert, &files.key] {
                if p.exists() {
                    return Err(PkiError::Exists { path: p.clone() });
                }
            }
        }
        write_file(&files.key, &leaf.key_pem, 0o600, force)?;
        write_file(&files.cert, &leaf.cert_pem, 0o644, force)?;
        Ok(files)
    }

    /// A new key and a certificate for `role`/`name` signed by the CA, in memory (`issue`
    /// and `renew` write them).
    pub(crate) fn sign_leaf(
        &self,
        role: Role,
        name: &str,
        sans: &[String],
        days: u32,
    ) -> Result<SignedLeaf, PkiError> {
        let trust_domain = self.trust_domain()?;
        let identity = Identity::new(&trust_domain, role, name)?;
        let (ca_cert_path, ca_key_path) = (self.ca_cert(), self.ca_key());
        if !ca_cert_path.exists() || !ca_key_path.exists() {
            return Err(PkiError::NoCa {
                dir: self.dir.clone(),
            });
        }
        let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
        let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key_pem)?)?;

        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{role} {name}"));
        let mut alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        for san in sans {
            alt_names.push(match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(san) => SanType::DnsName(san.as_str().try_into()?),
                Err(_) => return Err(PkiError::BadSan { value: san.clone() }),
            });
        }
        params.subject_alt_names = alt_names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Coordinator => {
                if sans.is_empty() {
                    return Err(PkiError::NoSan);
                }
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            }
            Role::Agent | Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        // Every serial signed is recorded, so `pki revoke` reaches renewed pairs too.
        self.record_issued(&identity, cert.der())?;
        Ok(SignedLeaf {
            identity,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A certificate and its new key, not yet on disk.
pub(crate) struct SignedLeaf {
    pub identity: Identity,
    pub cert_pem: String,
    pub key_pem: String,
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_issue_and_read_back_identity() {
        let dir = std::env::temp_dir().join(format!("pki-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let pki = PkiDir::new(&dir);
        pki.init("fleet.test", 30).expect("init");
        assert!(matches!(
            pki.init("fleet.test", 30),
            Err(PkiError::Exists { .. })
        ));
        let files = pki
            .issue(Role::Agent, "web-1", &[], 30, false)
            .expect("issue");
        let mode = fs::metadata(&files.key)
            .expect("key exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let pem = fs::read_to_string(&files.cert).expect("cert readable");
        let der = pem_to_der(&pem);
        let id = Identity::from_cert_der(&der).expect("identity");
        assert_eq!(id.uri(), "spiffe://fleet.test/agent/web-1");
        assert!(matches!(
            pki.issue(Role::Coordinator, "c", &[], 30, false),
            Err(PkiError::NoSan)
        ));
        assert!(matches!(
            pki.issue(Role::Agent, "web-1", &[], 30, false),
            Err(PkiError::Exists { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        p.contents
    }
}
