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
}
