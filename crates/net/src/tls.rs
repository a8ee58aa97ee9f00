//! TLS and mutual TLS from PEM files, as cert-manager writes them into a mounted Secret
//! (`tls.crt`, `tls.key`, `ca.crt`).
//!
//! The server side ([`ServerTls`]) serves the certificate chain in `cert` with `key`, and with
//! a client CA requires every client to present a certificate it signed. The client side
//! ([`ClientTls`], router → worker) trusts only its CA and presents its own certificate.
//! Both are reloaded when their files change: connections opened from then on use the new
//! files, connections already open keep theirs (no stream is dropped by a rotation). A set of
//! files that does not load is refused whole, and what is in force stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Why TLS files could not be put in force.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The files do not make a configuration (a key that does not match the certificate, say).
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error says what failed, never what the file holds.
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error(path, format!("no usable PEM private key ({e})")))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots
            .add(c)
            .map_err(|e| file_error(path, format!("not a CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN id of HTTP/2 (gRPC).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1 (the OpenAI-compatible API).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The files of a TLS server endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// With it, clients must present a certificate this CA (PEM) signed.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The files to follow for changes.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut f = vec![self.cert.clone(), self.key.clone()];
        f.extend(self.client_ca.clone());
        f
    }

    /// A rustls server configuration from the files as they are now (HTTP/2 by ALPN, as
    /// gRPC clients require).
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.load_with_alpn(ALPN_H2)
    }

    /// A rustls server configuration from the files as they are now, offering `alpn`.
    pub fn load_with_alpn(&self, alpn: &'static [u8]) -> Result<Arc<ServerConfig>, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .map_err(|e| {
                TlsError::Config(format!(
                    "{} and {}: {e}",
                    self.cert.display(),
                    self.key.display()
                ))
            })?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The configuration now (an error fails the start), reloaded when the files change;
    /// `what` names it in logs. HTTP/2 by ALPN.
    pub fn follow(self, what: &'static str) -> Result<Reloading<ServerConfig>, TlsError> {
        self.follow_with_alpn(what, ALPN_H2)
    }

    /// As [`follow`](Self::follow), offering `alpn` ([`ALPN_HTTP1`] for the HTTP API).
    pub fn follow_with_alpn(
        self,
        what: &'static str,
        alpn: &'static [u8],
    ) -> Result<Reloading<ServerConfig>, TlsError> {
        Reloading::follow(what, self.files(), move || self.load_with_alpn(alpn))
    }
}

/// The files of the router's side of router ↔ worker mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The router's certificate chain (PEM), presented to workers.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA (PEM) that signed the workers' certificates; nothing else is trusted.
    pub ca: PathBuf,
    /// The name workers' certificates must hold (default: the host of each worker's address).
    pub server_name: Option<String>,
}

/// PEM contents of a [`ClientTls`], as they were when last loaded.
#[derive(Debug, Clone)]
pub struct ClientPems {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    server_name: Option<String>,
}

impl ClientTls {
    /// The files to follow for changes.
    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone(), self.ca.clone()]
    }

    /// Reads and checks the files as they are now.
    pub fn load(&self) -> Result<Arc<ClientPems>, TlsError> {
        // Parsed once here so that a broken file is refused before any connection needs it.
        certs(&self.cert)?;
        key(&self.key)?;
        roots(&self.ca)?;
        let read = |p: &Path| std::fs::read(p).map_err(|e| file_error(p, e));
        Ok(Arc::new(ClientPems {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            ca: read(&self.ca)?,
            server_name: self.server_name.clone(),
        }))
    }

    /// The files now (an error fails the start), reloaded when they change; `what` names
    /// them in logs.
    pub fn follow(self, what: &'static str) -> Result<Reloading<ClientPems>, TlsError> {
        Reloading::follow(what, self.files(), move || self.load())
    }
}

impl ClientPems {
    /// tonic's client TLS for a connection to `host`.
    pub fn config(&self, host: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .domain_name(self.server_name.clone().unwrap_or_else(|| host.to_string()))
            .assume_http2(true)
    }
}

/// A value loaded from files and replaced when they change; cheap to clone and to read.
#[derive(Debug)]
pub struct Reloading<T> {
    current: Arc<RwLock<Arc<T>>>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Reloading {
            current: self.current.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Loads with `load` now (an error fails the start), then again whenever `files` change
    /// or on `SIGHUP`; a failed reload is logged and what is in force stays. `what` names the
    /// configuration in logs.
    pub fn follow(
        what: &'static str,
        files: Vec<PathBuf>,
        load: impl Fn() -> Result<Arc<T>, TlsError> + Send + 'static,
    ) -> Result<Self, TlsError> {
        let current = Arc::new(RwLock::new(load()?));
        let shared = current.clone();
        crate::watch::on_change(files, crate::watch::POLL, move || match load() {
            Ok(v) => {
                *shared.write().unwrap_or_else(|p| p.into_inner()) = v;
                tracing::info!("{what}: certificates reloaded; new connections use them");
            }
            Err(e) => {
                tracing::error!(error = %e, "{what}: certificates refused; the ones in force stay")
            }
        });
        Ok(Reloading { current })
    }

    /// What is in force now.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
