//! Raw TLS clients for the suites that attack the coordinator's acceptor: a handshake with any
//! certificate (or none) and nothing after it, silent TCP connections, and certificates made
//! with the fleet CA's key that `rollbackctl pki` never issues (expired, server-only, two
//! identities) or that another CA issued.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::{CertFiles, Pki};

/// A client configuration trusting `ca`, presenting `client` (or no certificate), offering h2.
pub fn client_config(ca: &Path, client: Option<&CertFiles>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).context("reading the CA")? {
        roots.add(cert.context("CA PEM")?).context("CA as a root")?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("protocol versions")?
        .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => {
            let chain = CertificateDer::pem_file_iter(&c.cert)
                .with_context(|| format!("reading {}", c.cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .context("certificate PEM")?;
            let key = PrivateKeyDer::from_pem_file(&c.key)
                .with_context(|| format!("reading {}", c.key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("client certificate")?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS handshake with the coordinator at `addr`: the client's local address (what the
/// coordinator logs as `peer`) and the stream, or the handshake error. With TLS 1.3 the
/// client's side may finish before the coordinator checked the certificate; `fate` tells.
pub async fn handshake(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(SocketAddr, std::io::Result<TlsStream<TcpStream>>)> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let local = tcp.local_addr()?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await;
    Ok((local, tls))
}

/// What the coordinator did with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It spoke (HTTP/2 SETTINGS): the connection is being served.
    Served,
    /// It closed the connection (or sent an alert).
    Closed,
}

/// The fate of a handshake's connection (a failed handshake is `Closed`).
pub async fn fate_of(tls: &mut std::io::Result<TlsStream<TcpStream>>, deadline: Duration) -> Fate {
    match tls {
        Ok(stream) => fate(stream, deadline).await,
        Err(_) => Fate::Closed,
    }
}

/// Waits (up to `deadline`, a generous bound) for the coordinator to either speak or close.
pub async fn fate<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, deadline: Duration) -> Fate {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(deadline, stream.read(&mut byte)).await {
        Ok(Ok(n)) if n > 0 => Fate::Served,
        Ok(_) => Fate::Closed,
        Err(_) => {
            panic!("the coordinator neither served nor closed the connection in {deadline:?}")
        }
    }
}

/// A certificate the fleet CA's key signs that `rollbackctl pki` would never issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forged {
    /// A client certificate that expired yesterday.
    Expired,
    /// Only the serverAuth extended key usage.
    ServerOnly,
    /// Two `spiffe://` identities.
    TwoIdentities,
}

/// Makes a `Forged` certificate (and key) for `name` under `PKI/forged/`.
pub fn forge(pki: &Pki, kind: Forged, name: &str) -> Result<CertFiles> {
    let ca_pem = std::fs::read_to_string(pki.ca()).context("reading the CA")?;
    let ca_key = std::fs::read_to_string(pki.dir.join("ca.key")).context("reading the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key)?)?;
    let uri = |n: &str| -> Result<SanType> {
        Ok(SanType::URI(
            format!("spiffe://{}/agent/{n}", pki.trust_domain).try_into()?,
        ))
    };
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("forged {name}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![uri(name)?];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    (params.not_before, params.not_after) =
        (now - time::Duration::days(1), now + time::Duration::days(1));
    match kind {
        Forged::Expired => {
            (params.not_before, params.not_after) =
                (now - time::Duration::days(3), now - time::Duration::days(1));
        }
        Forged::ServerOnly => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Forged::TwoIdentities => {
            params.subject_alt_names = vec![uri(name)?, uri(&format!("{name}-twin"))?];
        }
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let dir = pki.dir.join("forged");
    std::fs::create_dir_all(&dir)?;
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    Ok(files)
}

/// The fleet CA's own certificate and key, used as if it were a client's.
pub fn ca_as_client(pki: &Pki) -> CertFiles {
    CertFiles {
        cert: pki.ca(),
        key: pki.dir.join("ca.key"),
    }
}

/// A CRL for the fleet CA that expired yesterday (signed by its key, nothing revoked), as PEM.
pub fn expired_crl(pki: &Pki) -> Result<String> {
    let ca_pem = std::fs::read_to_string(pki.ca()).context("reading the CA")?;
    let ca_key = std::fs::read_to_string(pki.dir.join("ca.key")).context("reading the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key)?)?;
    let now = time::OffsetDateTime::now_utc();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::days(2),
        next_update: now - time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(1_000_000u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.pem()?)
}

/// Raises this process's open-files soft limit to its hard limit (a test holding a thousand
/// connections needs more than the common default of 1024).
pub fn raise_open_files_limit() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}
