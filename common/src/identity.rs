//! Identities carried in certificates: a SPIFFE-style URI SAN
//! `spiffe://<trust-domain>/<agent|operator|coordinator>/<name>`. This is the only place that
//! parses certificates (and CRLs); authorization reads nothing else.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What kind of peer a certificate names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Operator,
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Coordinator => "coordinator",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Role::Agent),
            "operator" => Some(Role::Operator),
            "coordinator" => Some(Role::Coordinator),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verified peer identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub role: Role,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate is not valid DER x509: {reason}")]
    BadCertificate { reason: String },
    #[error("certificate carries no spiffe:// URI SAN (issue it with `rollbackctl pki issue`)")]
    NoSpiffeUri,
    #[error("certificate carries {count} spiffe:// URI SANs; exactly one is allowed")]
    SeveralSpiffeUris { count: usize },
    #[error("identity `{uri}` is not spiffe://TRUST-DOMAIN/(agent|operator|coordinator)/NAME")]
    Malformed { uri: String },
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Checks a host id, operator or coordinator name: 1–63 characters of `[A-Za-z0-9._-]`,
/// starting with a letter or digit.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let bad = |reason| {
        Err(IdentityError::InvalidName {
            what,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() || value.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return bad("may only hold letters, digits, `.`, `_` and `-`");
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("must start with a letter or digit");
    }
    Ok(())
}

/// Checks a trust domain: a lowercase DNS-like name such as `fleet.example`.
pub fn validate_trust_domain(value: &str) -> Result<(), IdentityError> {
    let bad = |reason| {
        Err(IdentityError::InvalidName {
            what: "trust domain",
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() || value.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
    {
        return bad("may only hold lowercase letters, digits, `.` and `-`");
    }
    if value.starts_with(['.', '-']) || value.ends_with(['.', '-']) {
        return bad("must start and end with a letter or digit");
    }
    Ok(())
}

impl Identity {
    pub fn new(trust_domain: &str, role: Role, name: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_name(name_kind(role), name)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            role,
            name: name.to_string(),
        })
    }

    pub fn uri(&self) -> String {
        format!("spiffe://{}/{}/{}", self.trust_domain, self.role, self.name)
    }

    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let malformed = || IdentityError::Malformed {
            uri: uri.to_string(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let mut parts = rest.split('/');
        let (Some(td), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let role = Role::parse(role).ok_or_else(malformed)?;
        Self::new(td, role, name)
    }

    /// Reads the identity from a DER certificate (the peer's leaf, already verified by TLS).
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate {
                reason: e.to_string(),
            })?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate {
                reason: e.to_string(),
            })?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|g| match g {
                GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::NoSpiffeUri),
            [one] => Self::parse_uri(one),
            many => Err(IdentityError::SeveralSpiffeUris { count: many.len() }),
        }
    }
}

/// A certificate serial number: big-endian bytes without leading zeros, shown in hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// From the DER INTEGER's content bytes (a leading zero byte of a positive number dropped).
    pub fn from_be_bytes(bytes: &[u8]) -> Self {
        let start = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        Self(bytes.get(start..).unwrap_or_default().to_vec())
    }

    /// Parses the hex form `Display` prints.
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 80 {
            return None;
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()?;
        Some(Self::from_be_bytes(&bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What revocation needs to know of a certificate: its serial and who issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSerial {
    pub serial: Serial,
    /// The issuer's distinguished name, as DER (compared with a CRL's issuer).
    pub issuer: Vec<u8>,
}

/// Reads the serial number and issuer name of a DER certificate.
pub fn cert_serial(der: &[u8]) -> Result<CertSerial, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate {
        reason: e.to_string(),
    })?;
    Ok(CertSerial {
        serial: Serial::from_be_bytes(cert.raw_serial()),
        issuer: cert.issuer().as_raw().to_vec(),
    })
}

/// A certificate revocation list whose signature was checked against the CA that issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    /// The issuer's distinguished name, as DER.
    pub issuer: Vec<u8>,
    pub this_update: time::OffsetDateTime,
    /// After this the CRL is stale and every client is refused (fail closed).
    pub next_update: Option<time::OffsetDateTime>,
    /// The CRL number (monotonic per issuer), 0 if absent.
    pub number: u64,
    pub revoked: Vec<RevokedEntry>,
}

/// One revoked certificate in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    pub serial: Serial,
    pub revoked_at: time::OffsetDateTime,
    /// The RFC 5280 reason code, if the entry carries one.
    pub reason: Option<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CrlError {
    #[error("not a DER certificate revocation list: {reason}")]
    Malformed { reason: String },
    #[error("the CA certificate is not valid DER x509: {reason}")]
    BadCa { reason: String },
    #[error("the CRL is not issued by this CA (its issuer is not the CA's subject)")]
    WrongIssuer,
    #[error("the CRL's signature does not verify with the CA's key: {reason}")]
    BadSignature { reason: String },
}

/// Parses a DER CRL and checks that `ca_der` (the fleet CA certificate) issued and signed it.
pub fn parse_crl(crl_der: &[u8], ca_der: &[u8]) -> Result<Crl, CrlError> {
    use x509_parser::revocation_list::CertificateRevocationList;
    let (rest, crl) =
        CertificateRevocationList::from_der(crl_der).map_err(|e| CrlError::Malformed {
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(CrlError::Malformed {
            reason: format!("{} bytes after the CRL", rest.len()),
        });
    }
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| CrlError::BadCa {
        reason: e.to_string(),
    })?;
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(CrlError::WrongIssuer);
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| CrlError::BadSignature {
            reason: e.to_string(),
        })?;
    let number = crl.crl_number().map_or(0, |n| {
        n.to_bytes_be().iter().fold(0u64, |acc, b| {
            acc.saturating_mul(256).saturating_add(u64::from(*b))
        })
    });
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| RevokedEntry {
            serial: Serial::from_be_bytes(r.raw_serial()),
            revoked_at: r.revocation_date.to_datetime(),
            reason: r.reason_code().map(|(_, code)| code.0),
        })
        .collect();
    Ok(Crl {
        issuer: crl.issuer().as_raw().to_vec(),
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        number,
        revoked,
    })
}

fn name_kind(role: Role) -> &'static str {
    match role {
        Role::Agent => "host id",
        Role::Operator => "operator name",
        Role::Coordinator => "coordinator name",
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// What a certificate says besides its identity, for `pki list`, `pki renew` and expiry
/// warnings. Read from any certificate, the CA's included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// DNS names and IP addresses among the subject alternative names, in certificate order
    /// (what a coordinator certificate is dialled at).
    pub dns_and_ip_sans: Vec<String>,
    pub is_ca: bool,
}

impl CertFacts {
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let bad = |reason: String| IdentityError::BadCertificate { reason };
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| bad(e.to_string()))?;
        let dns_and_ip_sans = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|g| match g {
                GeneralName::DNSName(d) => Some((*d).to_string()),
                GeneralName::IPAddress(b) => ip_from_bytes(b).map(|ip| ip.to_string()),
                _ => None,
            })
            .collect();
        let serial = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            serial,
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
            dns_and_ip_sans,
            is_ca: cert.is_ca(),
        })
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// The DER of the first certificate in a PEM file's bytes.
pub fn first_pem_certificate(pem: &[u8]) -> Result<Vec<u8>, IdentityError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(IdentityError::BadCertificate {
            reason: format!("unreadable PEM: {e}"),
        }),
        None => Err(IdentityError::BadCertificate {
            reason: "no PEM CERTIFICATE block".into(),
        }),
    }
}

/// Why a certificate and key are not a pair this host can present.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("certificate: {0}")]
    Certificate(#[from] IdentityError),
    #[error("private key: {reason}")]
    Key { reason: String },
    #[error(
        "the private key does not belong to the certificate (copy the .pem and .key of one issue together)"
    )]
    KeyMismatch,
    #[error("the certificate is not valid before unix time {not_before} (check this host's clock)")]
    NotYetValid { not_before: i64 },
    #[error(
        "the certificate expired at unix time {not_after}; renew it with `rollbackctl pki renew`"
    )]
    Expired { not_after: i64 },
    #[error("the certificate is not a client certificate issued by the fleet CA: {reason}")]
    Untrusted { reason: String },
}

/// A certificate and key that passed `check_client_pair`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPair {
    pub identity: Identity,
    pub facts: CertFacts,
}

/// Checks a certificate and private key (PEM) as a client would present them to the
/// coordinator at `now_unix`: the certificate parses and names one identity, the key parses
/// and belongs to it, it is valid now, and it verifies as a client certificate against the
/// fleet CA `ca_pem`. The caller compares the identity with the one it expects.
pub fn check_client_pair(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    now_unix: i64,
) -> Result<CheckedPair, PairError> {
    use rustls::crypto::ring::default_provider;
    use rustls::sign::CertifiedKey;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let der = first_pem_certificate(cert_pem)?;
    let identity = Identity::from_cert_der(&der)?;
    let facts = CertFacts::from_der(&der)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PairError::Key {
        reason: format!("no usable PEM private key: {e}"),
    })?;
    let signing_key = default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| PairError::Key {
            reason: e.to_string(),
        })?;
    let cert_der = CertificateDer::from(der.as_slice()).into_owned();
    match CertifiedKey::new(vec![cert_der], signing_key).keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(PairError::KeyMismatch);
        }
        Err(e) => {
            return Err(PairError::Key {
                reason: format!("cannot check that it belongs to the certificate: {e}"),
            });
        }
    }
    if now_unix < facts.not_before_unix {
        return Err(PairError::NotYetValid {
            not_before: facts.not_before_unix,
        });
    }
    if now_unix >= facts.not_after_unix {
        return Err(PairError::Expired {
            not_after: facts.not_after_unix,
        });
    }
    verify_client_cert(ca_pem, &der, now_unix).map_err(|reason| PairError::Untrusted { reason })?;
    Ok(CheckedPair { identity, facts })
}

/// Verifies `der` as a client certificate chaining to the fleet CA `ca_pem` at `at_unix`, as
/// the coordinator's TLS would. The error says why not.
pub fn verify_client_cert(ca_pem: &[u8], der: &[u8], at_unix: i64) -> Result<(), String> {
    use rustls::crypto::ring::default_provider;
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, UnixTime};

    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        let ca = ca.map_err(|e| format!("fleet CA file: {e}"))?;
        roots.add(ca).map_err(|e| format!("fleet CA: {e}"))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.into(), default_provider().into())
            .build()
            .map_err(|e| format!("fleet CA: {e}"))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(at_unix).unwrap_or(0),
    ));
    verifier
        .verify_client_cert(&CertificateDer::from(der), &[], at)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips() {
        let id = Identity::new("fleet.test", Role::Agent, "web-1").expect("valid");
        assert_eq!(id.uri(), "spiffe://fleet.test/agent/web-1");
        assert_eq!(Identity::parse_uri(&id.uri()), Ok(id));
    }

    #[test]
    fn rejects_bad_uris_and_names() {
        for uri in [
            "spiffe://fleet.test/agent",
            "spiffe://fleet.test/agent/a/b",
            "spiffe://fleet.test/root/x",
            "https://fleet.test/agent/x",
            "spiffe://Fleet/agent/x",
            "spiffe://fleet.test/agent/-x",
            "spiffe://fleet.test/agent/a b",
            "spiffe://fleet.test/agent/",
        ] {
            assert!(
                Identity::parse_uri(uri).is_err(),
                "{uri} should be rejected"
            );
        }
        assert!(validate_name("host id", &"a".repeat(64)).is_err());
        assert!(validate_name("host id", "web_1.prod-a").is_ok());
    }

    #[test]
    fn a_pair_is_checked_whole() {
        use crate::pki::PkiDir;
        let dir = std::env::temp_dir().join(format!("pair-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = PkiDir::new(dir.join("a"));
        pki.init("fleet.test", 30).expect("init");
        let other = PkiDir::new(dir.join("b"));
        other.init("fleet.test", 30).expect("init");
        let read = |p: &std::path::Path| std::fs::read(p).expect("read");
        let ca = read(&pki.ca_cert());
        let now = crate::now_unix_ms() / 1000;
        let web1 = pki
            .issue(Role::Agent, "web-1", &[], 30, false)
            .expect("issue");
        let web2 = pki
            .issue(Role::Agent, "web-2", &[], 30, false)
            .expect("issue");
        let ok = check_client_pair(&ca, &read(&web1.cert), &read(&web1.key), now).expect("valid");
        assert_eq!(ok.identity.name, "web-1");
        assert!(ok.facts.not_after_unix > now + 29 * 86_400);
        assert!(matches!(
            check_client_pair(&ca, &read(&web1.cert), &read(&web2.key), now),
            Err(PairError::KeyMismatch)
        ));
        assert!(matches!(
            check_client_pair(&ca, &read(&web1.cert), b"garbage", now),
            Err(PairError::Key { .. })
        ));
        assert!(matches!(
            check_client_pair(&ca, b"garbage", &read(&web1.key), now),
            Err(PairError::Certificate(_))
        ));
        assert!(matches!(
            check_client_pair(&ca, &read(&web1.cert), &read(&web1.key), now + 31 * 86_400),
            Err(PairError::Expired { .. })
        ));
        let foreign = other
            .issue(Role::Agent, "web-1", &[], 30, false)
            .expect("issue");
        assert!(matches!(
            check_client_pair(&ca, &read(&foreign.cert), &read(&foreign.key), now),
            Err(PairError::Untrusted { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
