//! The fleet's certificate revocation list. `rollbackctl pki revoke` adds every certificate
//! issued to an identity (the serials in `issued.log`, and the one in its certificate file) to
//! `crl.pem` in the PKI directory, keeping earlier entries, signed by the CA key with a fresh
//! `this_update`/`next_update`; `rollbackctl pki crl` re-signs it with fresh dates (or creates an
//! empty one). The coordinator reads the file with `load_crl`, which checks the CA's signature.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{Crl, CrlError, Identity, RevokedEntry, Role, Serial, cert_serial};
use crate::pki::{PkiDir, PkiError, io_err};

/// Why a certificate is revoked (the RFC 5280 reason codes an operator would use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    PrivilegeWithdrawn,
}

impl RevokeReason {
    fn rcgen(self) -> RevocationReason {
        match self {
            Self::Unspecified => RevocationReason::Unspecified,
            Self::KeyCompromise => RevocationReason::KeyCompromise,
            Self::AffiliationChanged => RevocationReason::AffiliationChanged,
            Self::Superseded => RevocationReason::Superseded,
            Self::CessationOfOperation => RevocationReason::CessationOfOperation,
            Self::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
        }
    }
}

/// An RFC 5280 reason code read back from a CRL entry, so re-signing keeps it.
fn reason_from_code(code: u8) -> Option<RevocationReason> {
    Some(match code {
        0 => RevocationReason::Unspecified,
        1 => RevocationReason::KeyCompromise,
        2 => RevocationReason::CaCompromise,
        3 => RevocationReason::AffiliationChanged,
        4 => RevocationReason::Superseded,
        5 => RevocationReason::CessationOfOperation,
        6 => RevocationReason::CertificateHold,
        8 => RevocationReason::RemoveFromCrl,
        9 => RevocationReason::PrivilegeWithdrawn,
        10 => RevocationReason::AaCompromise,
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CrlFileError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("reading CRL {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CRL {path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: CrlError,
    },
    #[error("CRL {path} holds no `X509 CRL` PEM block")]
    NoCrl { path: PathBuf },
    #[error(
        "no certificate was issued to {identity} from {dir} (nothing in {dir}/issued.log nor a certificate file); check the name"
    )]
    NotIssued { identity: Identity, dir: PathBuf },
    #[error("--crl-days must be at least 1 (a CRL past its next update refuses every client)")]
    Days,
}

/// A CRL as written.
#[derive(Debug, Clone)]
pub struct CrlWritten {
    pub path: PathBuf,
    /// Serials this call added (empty when re-signing).
    pub newly_revoked: Vec<Serial>,
    /// Serials that were already on the CRL among those this call meant to add.
    pub already_revoked: Vec<Serial>,
    /// Every entry on the CRL now.
    pub entries: usize,
    pub number: u64,
    pub next_update: OffsetDateTime,
}

/// The DER of the (first) CRL in a PEM file.
pub fn read_crl_file(path: &Path) -> Result<Vec<u8>, CrlFileError> {
    let data = fs::read(path).map_err(|source| CrlFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    x509_parser::pem::Pem::iter_from_buffer(&data)
        .filter_map(Result::ok)
        .find(|p| p.label == "X509 CRL")
        .map(|p| p.contents)
        .ok_or_else(|| CrlFileError::NoCrl {
            path: path.to_path_buf(),
        })
}

/// Reads a PEM CRL file and checks that the CA whose DER certificate is `ca_der` signed it.
/// Returns the CRL's DER and what it says.
pub fn load_crl(path: &Path, ca_der: &[u8]) -> Result<(Vec<u8>, Crl), CrlFileError> {
    let der = read_crl_file(path)?;
    let crl = crate::identity::parse_crl(&der, ca_der).map_err(|source| CrlFileError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((der, crl))
}

impl PkiDir {
    /// The fleet CRL, `crl.pem`.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// One line per certificate issued: `SERIAL_HEX SPIFFE_URI`.
    pub fn issued_log(&self) -> PathBuf {
        self.dir.join("issued.log")
    }

    /// Remembers the serial of a certificate just issued, so revoking its identity later
    /// revokes it even once a newer certificate replaced its file.
    pub(crate) fn record_issued(&self, identity: &Identity, der: &[u8]) -> Result<(), PkiError> {
        let serial = cert_serial(der)?.serial;
        let path = self.issued_log();
        let mut file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(format!("{serial} {}\n", identity.uri()).as_bytes())
            .map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        Ok(())
    }

    /// Every serial ever issued to `identity`: from `issued.log`, and the serial of its
    /// current certificate file (which may predate the log).
    pub fn issued_serials(&self, identity: &Identity) -> Result<Vec<Serial>, PkiError> {
        let mut serials = Vec::new();
        let log = self.issued_log();
        match fs::read_to_string(&log) {
            Ok(text) => {
                let uri = identity.uri();
                for line in text.lines() {
                    if let Some((serial, who)) = line.split_once(' ')
                        && who == uri
                        && let Some(serial) = Serial::parse_hex(serial)
                    {
                        serials.push(serial);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&log)(e)),
        }
        let cert = self.cert(identity.role, &identity.name);
        if cert.exists() {
            let pem = fs::read(&cert).map_err(io_err(&cert))?;
            if let Some(der) = x509_parser::pem::Pem::iter_from_buffer(&pem)
                .filter_map(Result::ok)
                .find(|p| p.label == "CERTIFICATE")
            {
                serials.push(cert_serial(&der.contents)?.serial);
            }
        }
        serials.sort();
        serials.dedup();
        Ok(serials)
    }

    /// Revokes every certificate issued to `role`/`name`: adds their serials to the CRL (keeping
    /// earlier entries) and signs it anew, valid for `crl_days`.
    pub fn revoke(
        &self,
        role: Role,
        name: &str,
        reason: RevokeReason,
        crl_days: u32,
    ) -> Result<CrlWritten, CrlFileError> {
        let identity = Identity::new(&self.trust_domain()?, role, name).map_err(PkiError::from)?;
        let serials = self.issued_serials(&identity)?;
        if serials.is_empty() {
            return Err(CrlFileError::NotIssued {
                identity,
                dir: self.dir.clone(),
            });
        }
        let (mut entries, number) = self.crl_entries()?;
        let now = OffsetDateTime::now_utc();
        let (mut newly, mut already) = (Vec::new(), Vec::new());
        for serial in serials {
            if entries.iter().any(|e| e.serial == serial) {
                already.push(serial);
            } else {
                entries.push(RevokedEntry {
                    serial: serial.clone(),
                    revoked_at: now,
                    reason: Some(reason.rcgen() as u8),
                });
                newly.push(serial);
            }
        }
        let mut written = self.sign_crl(&entries, number + 1, crl_days)?;
        written.newly_revoked = newly;
        written.already_revoked = already;
        Ok(written)
    }

    /// Signs the CRL again with its current entries and fresh dates, or creates an empty one.
    pub fn refresh_crl(&self, crl_days: u32) -> Result<CrlWritten, CrlFileError> {
        let (entries, number) = self.crl_entries()?;
        self.sign_crl(&entries, number + 1, crl_days)
    }

    /// The entries and number of the current CRL (none if there is no CRL yet). A CRL that is
    /// not this CA's is an error rather than silently replaced.
    fn crl_entries(&self) -> Result<(Vec<RevokedEntry>, u64), CrlFileError> {
        let path = self.crl();
        if !path.exists() {
            return Ok((Vec::new(), 0));
        }
        let ca = self.ca_cert();
        let ca_pem = fs::read(&ca).map_err(io_err(&ca))?;
        let ca_der = x509_parser::pem::Pem::iter_from_buffer(&ca_pem)
            .filter_map(Result::ok)
            .find(|p| p.label == "CERTIFICATE")
            .map(|p| p.contents)
            .ok_or_else(|| PkiError::NoCa {
                dir: self.dir.clone(),
            })?;
        let (_, crl) = load_crl(&path, &ca_der)?;
        Ok((crl.revoked, crl.number))
    }

    fn sign_crl(
        &self,
        entries: &[RevokedEntry],
        number: u64,
        crl_days: u32,
    ) -> Result<CrlWritten, CrlFileError> {
        if crl_days == 0 {
            return Err(CrlFileError::Days);
        }
        let (ca_cert, ca_key) = (self.ca_cert(), self.ca_key());
        if !ca_cert.exists() || !ca_key.exists() {
            return Err(PkiError::NoCa {
                dir: self.dir.clone(),
            }
            .into());
        }
        let ca_pem = fs::read_to_string(&ca_cert).map_err(io_err(&ca_cert))?;
        let key_pem = fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
        let issuer = Issuer::from_ca_cert_pem(
            &ca_pem,
            KeyPair::from_pem(&key_pem).map_err(PkiError::from)?,
        )
        .map_err(PkiError::from)?;
        let now = OffsetDateTime::now_utc();
        let next_update = now + Duration::days(i64::from(crl_days));
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: entries
                .iter()
                .map(|e| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(e.serial.as_bytes()),
                    revocation_time: e.revoked_at,
                    reason_code: e.reason.and_then(reason_from_code),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&issuer).map_err(PkiError::from)?;
        let pem = crl.pem().map_err(PkiError::from)?;
        let path = self.crl();
        write_atomically(&path, pem.as_bytes())?;
        Ok(CrlWritten {
            path,
            newly_revoked: Vec::new(),
            already_revoked: Vec::new(),
            entries: entries.len(),
            number,
            next_update,
        })
    }
}

/// Writes `path` through a temporary file and a rename, so a coordinator polling it never
/// reads half a CRL.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("pem.tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(data).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_der(pki: &PkiDir) -> Vec<u8> {
        let pem = fs::read(pki.ca_cert()).expect("ca");
        x509_parser::pem::Pem::iter_from_buffer(&pem)
            .filter_map(Result::ok)
            .find(|p| p.label == "CERTIFICATE")
            .expect("ca pem")
            .contents
    }

    #[test]
    fn revoking_keeps_earlier_entries_and_covers_every_issued_certificate() {
        let dir = tempfile_dir("crl-revoke");
        let pki = PkiDir::new(&dir);
        pki.init("fleet.test", 30).expect("init");
        pki.issue(Role::Agent, "web-1", &[], 30, false)
            .expect("issue");
        // A renewal replaces the file; the first certificate must still be revoked.
        pki.issue(Role::Agent, "web-1", &[], 30, true)
            .expect("reissue");
        pki.issue(Role::Operator, "vera", &[], 30, false)
            .expect("issue");
        let id = Identity::new("fleet.test", Role::Agent, "web-1").expect("id");
        assert_eq!(pki.issued_serials(&id).expect("serials").len(), 2);

        let first = pki
            .revoke(Role::Agent, "web-1", RevokeReason::KeyCompromise, 7)
            .expect("revoke");
        assert_eq!(first.newly_revoked.len(), 2);
        assert_eq!(first.entries, 2);
        let second = pki
            .revoke(Role::Operator, "vera", RevokeReason::Unspecified, 7)
            .expect("revoke");
        assert_eq!(second.entries, 3, "earlier entries are kept");
        assert!(second.number > first.number, "the CRL number grows");
        let again = pki
            .revoke(Role::Agent, "web-1", RevokeReason::KeyCompromise, 7)
            .expect("revoke again");
        assert!(again.newly_revoked.is_empty());
        assert_eq!(again.already_revoked.len(), 2);
        assert_eq!(again.entries, 3);

        let (_, crl) = load_crl(&pki.crl(), &ca_der(&pki)).expect("valid CRL");
        assert_eq!(crl.revoked.len(), 3);
        assert!(
            crl.revoked.iter().filter(|e| e.reason == Some(1)).count() == 2,
            "key compromise is kept on re-signing: {crl:?}"
        );
        let days = (crl.next_update.expect("next update") - crl.this_update).whole_days();
        assert_eq!(days, 7);

        assert!(matches!(
            pki.revoke(Role::Agent, "nobody", RevokeReason::Unspecified, 7),
            Err(CrlFileError::NotIssued { .. })
        ));
        assert!(matches!(pki.refresh_crl(0), Err(CrlFileError::Days)));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_crl_from_another_ca_or_garbage_is_refused() {
        let dir = tempfile_dir("crl-other");
        let (ours, theirs) = (
            PkiDir::new(dir.join("ours")),
            PkiDir::new(dir.join("theirs")),
        );
        ours.init("fleet.test", 30).expect("init");
        theirs.init("fleet.test", 30).expect("init");
        theirs.refresh_crl(7).expect("their crl");
        // Same subject name, another key: the signature must not verify.
        assert!(matches!(
            load_crl(&theirs.crl(), &ca_der(&ours)),
            Err(CrlFileError::Invalid {
                source: CrlError::BadSignature { .. },
                ..
            })
        ));
        fs::write(
            ours.crl(),
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .expect("write");
        assert!(matches!(
            load_crl(&ours.crl(), &ca_der(&ours)),
            Err(CrlFileError::Invalid {
                source: CrlError::Malformed { .. },
                ..
            })
        ));
        // `pki revoke` refuses to build on a CRL it cannot read rather than dropping entries.
        ours.issue(Role::Agent, "a", &[], 30, false).expect("issue");
        assert!(
            ours.revoke(Role::Agent, "a", RevokeReason::Unspecified, 7)
                .is_err()
        );
        let _ = fs::remove_dir_all(&dir);
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }
}
