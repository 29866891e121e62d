//! Loading TLS material from disk into tonic's mTLS configurations. There is no plaintext mode.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity, ServerTlsConfig};

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

    /// Server side: present our certificate, require a client certificate from the fleet CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?))
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
