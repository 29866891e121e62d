//! Loading TLS material from disk into mTLS configurations: tonic's for the clients (agent,
//! console), a rustls `ServerConfig` with CRL checking for the coordinator's own acceptor.
//! There is no plaintext mode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity};

use crate::identity::{Identity, IdentityError};

/// The three files every component needs: the fleet CA, its own certificate and its key.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("{what} {path}: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA certificate {path} is not usable as a trust anchor: {source}")]
    TrustAnchor {
        path: PathBuf,
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("building the client certificate verifier (CA {path}, CRL): {source}")]
    Verifier {
        path: PathBuf,
        #[source]
        source: Box<rustls::server::VerifierBuilderError>,
    },
    #[error("certificate {cert} and key {key} do not make a TLS server identity: {source}")]
    ServerIdentity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: Box<rustls::Error>,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl TlsFiles {
    /// Relative paths are taken relative to `base` (the config file's directory).
    pub fn resolve_relative_to(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    fn identity(&self) -> Result<TlsIdentity, TlsError> {
        Ok(TlsIdentity::from_pem(
            read("certificate", &self.cert)?,
            read("private key", &self.key)?,
        ))
    }

    fn ca(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(read("CA certificate", &self.ca)?))
    }

    /// Server side: present our certificate (ALPN `h2`, which gRPC clients require) and require
    /// a client certificate from the fleet CA that none of `crls` revokes. With CRLs, one past
    /// its next update refuses every client (fail closed).
    pub fn rustls_server_config(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pem_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Pem { what, path, source }
        };
        let mut roots = RootCertStore::empty();
        let ca_pem = read("CA certificate", &self.ca)?;
        for ca in CertificateDer::pem_slice_iter(&ca_pem) {
            roots
                .add(ca.map_err(pem_err("CA certificate", &self.ca))?)
                .map_err(|source| TlsError::TrustAnchor {
                    path: self.ca.clone(),
                    source: Box::new(source),
                })?;
        }
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if !crls.is_empty() {
            verifier = verifier.with_crls(crls).enforce_revocation_expiration();
        }
        let verifier = verifier.build().map_err(|source| TlsError::Verifier {
            path: self.ca.clone(),
            source: Box::new(source),
        })?;
        let chain = CertificateDer::pem_slice_iter(&read("certificate", &self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("certificate", &self.cert))?;
        let key = PrivateKeyDer::from_pem_slice(&read("private key", &self.key)?)
            .map_err(pem_err("private key", &self.key))?;
        let server_identity = |source| TlsError::ServerIdentity {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source: Box::new(source),
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(server_identity)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(server_identity)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// The DER of the fleet CA certificate (the first in the `ca` file).
    pub fn ca_der(&self) -> Result<Vec<u8>, TlsError> {
        first_pem_cert(&read("CA certificate", &self.ca)?).ok_or_else(|| TlsError::NoCertificate {
            path: self.ca.clone(),
        })
    }

    /// Client side: trust only the fleet CA and present our certificate.
    pub fn client_config(&self, server_name: Option<&str>) -> Result<ClientTlsConfig, TlsError> {
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(self.ca()?)
            .identity(self.identity()?);
        if let Some(name) = server_name {
            cfg = cfg.domain_name(name);
        }
        Ok(cfg)
    }

    /// The identity in our own certificate, so a daemon can check its config against it.
    pub fn own_identity(&self) -> Result<Identity, TlsError> {
        let pem = read("certificate", &self.cert)?;
        let der = first_pem_cert(&pem).ok_or_else(|| TlsError::NoCertificate {
            path: self.cert.clone(),
        })?;
        Identity::from_cert_der(&der).map_err(|source| TlsError::Identity {
            path: self.cert.clone(),
            source,
        })
    }
}

fn first_pem_cert(pem: &[u8]) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
}

/// Client side from PEM bytes already read (and checked) by the caller: trust only the fleet
/// CA `ca` and present `cert` with `key`. The agent builds each connection's configuration
/// this way from the pair it last accepted, so a renewed pair is used without a restart.
pub fn client_config_from_pem(
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    server_name: Option<&str>,
) -> ClientTlsConfig {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(TlsIdentity::from_pem(cert, key));
    if let Some(name) = server_name {
        cfg = cfg.domain_name(name);
    }
    cfg
}
