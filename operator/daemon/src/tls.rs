//! TLS with client certificates, for the console's hops (API server → operator →
//! agent): configurations built from PEM text (Secrets and ConfigMaps hold PEM), with
//! one crypto provider (ring) chosen here rather than process-wide.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls;
pub use tokio_rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no PEM certificate in it")]
    NoCertificate { what: String },
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("{what}: {source}")]
    Rustls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{what}: {message}")]
    Verifier { what: String, message: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in `pem`; `what` names the source in errors.
pub fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what: what.into(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// A certificate chain and its private key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn from_pem(cert: &str, key: &str, what: &str) -> Result<Identity, TlsError> {
        let chain = certificates(cert, what)?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| TlsError::Pem { what: format!("{what} key"), message: e.to_string() })?;
        Ok(Identity { chain, key })
    }
}

fn roots(ca: &str, what: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca, what)? {
        roots.add(cert).map_err(|source| TlsError::Rustls { what: what.into(), source })?;
    }
    Ok(Arc::new(roots))
}

/// A server presenting `identity` that accepts only clients whose certificate chains
/// to `client_ca` (and is meant for client authentication).
pub fn server(identity: Identity, client_ca: &str, what: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(client_ca, what)?, provider())
        .build()
        .map_err(|e| TlsError::Verifier { what: what.into(), message: e.to_string() })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { what: what.into(), source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(|source| TlsError::Rustls { what: what.into(), source })?;
    Ok(Arc::new(config))
}

/// A client presenting `identity` that trusts only servers whose certificate chains to
/// `server_ca`.
pub fn client(identity: Identity, server_ca: &str, what: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(server_ca, what)?, provider())
        .build()
        .map_err(|e| TlsError::Verifier { what: what.into(), message: e.to_string() })?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { what: what.into(), source })?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|source| TlsError::Rustls { what: what.into(), source })?;
    Ok(Arc::new(config))
}

/// The subject's common name of a DER certificate, if it has one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// When a DER certificate stops being valid, in seconds since the Unix epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}
