//! Why a client was refused at the door, in the words operators read in the log: a failed TLS
//! handshake (rustls' certificate errors mapped to unknown CA, expired, revoked, ...), a
//! certificate whose identity is unusable, a handshake that timed out, or a limit reached.

use std::fmt;

use rollback_common::identity::IdentityError;
use rustls::{CertificateError, Error as TlsError};

/// The reason logged with `tls handshake refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not issued by the fleet CA (or its signature does not verify).
    UnknownCa,
    Expired,
    NotYetValid,
    Revoked,
    /// No clientAuth extended key usage (a server-only certificate, say).
    NotClientCertificate,
    /// A CA certificate presented as the client's own.
    CaAsLeaf,
    /// Two `spiffe://` identities (or none, or a malformed one): who is this?
    UnusableIdentity,
    NoCertificate,
    /// The CRL in force is past its next update: every client is refused until a fresh one.
    CrlExpired,
    RevocationUnknown,
    MalformedCertificate,
    OtherCertificateError,
    /// The client gave up (it sent an alert, e.g. because it does not trust our certificate).
    ClientAborted,
    /// Not TLS, or no protocol in common (ALPN, versions, cipher suites).
    Protocol,
    /// The connection closed or failed before the handshake finished.
    Io,
    HandshakeTimeout,
    /// The identity already holds `max_connections_per_identity` live connections.
    TooManyConnections,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown CA",
            Self::Expired => "expired",
            Self::NotYetValid => "not yet valid",
            Self::Revoked => "revoked",
            Self::NotClientCertificate => "not a client certificate (no clientAuth EKU)",
            Self::CaAsLeaf => "CA certificate used as a leaf",
            Self::UnusableIdentity => "two identities or an unusable identity",
            Self::NoCertificate => "no certificate",
            Self::CrlExpired => "CRL expired (fail closed: every client is refused)",
            Self::RevocationUnknown => "revocation status unknown",
            Self::MalformedCertificate => "malformed certificate",
            Self::OtherCertificateError => "invalid certificate",
            Self::ClientAborted => "client aborted the handshake",
            Self::Protocol => "not a TLS client or no protocol in common",
            Self::Io => "connection lost during the handshake",
            Self::HandshakeTimeout => "handshake timeout",
            Self::TooManyConnections => "too many connections for this identity",
        }
    }

    /// The reason for a failed `TlsAcceptor::accept`.
    pub fn of_handshake(err: &std::io::Error) -> Self {
        match err.get_ref().and_then(|e| e.downcast_ref::<TlsError>()) {
            Some(tls) => Self::of_tls(tls),
            None => Self::Io,
        }
    }

    fn of_tls(err: &TlsError) -> Self {
        match err {
            TlsError::InvalidCertificate(cert) => Self::of_certificate(cert),
            TlsError::NoCertificatesPresented => Self::NoCertificate,
            TlsError::AlertReceived(_) => Self::ClientAborted,
            TlsError::InvalidMessage(_)
            | TlsError::PeerIncompatible(_)
            | TlsError::PeerMisbehaved(_)
            | TlsError::NoApplicationProtocol
            | TlsError::InappropriateMessage { .. }
            | TlsError::InappropriateHandshakeMessage { .. } => Self::Protocol,
            _ => Self::OtherCertificateError,
        }
    }

    fn of_certificate(err: &CertificateError) -> Self {
        match err {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Self::NotYetValid
            }
            CertificateError::Revoked => Self::Revoked,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                Self::NotClientCertificate
            }
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => Self::CrlExpired,
            CertificateError::UnknownRevocationStatus => Self::RevocationUnknown,
            CertificateError::BadEncoding => Self::MalformedCertificate,
            CertificateError::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
                Some(webpki::Error::CaUsedAsEndEntity) => Self::CaAsLeaf,
                _ => Self::OtherCertificateError,
            },
            _ => Self::OtherCertificateError,
        }
    }

    /// The reason for a verified certificate whose identity cannot be used.
    pub fn of_identity(_err: &IdentityError) -> Self {
        Self::UnusableIdentity
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn io(err: TlsError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err)
    }

    #[test]
    fn rustls_errors_map_to_the_words_operators_read() {
        let cases = [
            (
                TlsError::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown CA",
            ),
            (
                TlsError::InvalidCertificate(CertificateError::Revoked),
                "revoked",
            ),
            (
                TlsError::InvalidCertificate(CertificateError::Expired),
                "expired",
            ),
            (
                TlsError::InvalidCertificate(CertificateError::InvalidPurpose),
                "not a client certificate (no clientAuth EKU)",
            ),
            (
                TlsError::InvalidCertificate(CertificateError::ExpiredRevocationList),
                "CRL expired (fail closed: every client is refused)",
            ),
            (
                TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                    Arc::new(webpki::Error::CaUsedAsEndEntity),
                ))),
                "CA certificate used as a leaf",
            ),
            (TlsError::NoCertificatesPresented, "no certificate"),
        ];
        for (err, words) in cases {
            assert_eq!(Refusal::of_handshake(&io(err)).as_str(), words);
        }
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(Refusal::of_handshake(&eof), Refusal::Io);
    }
}
