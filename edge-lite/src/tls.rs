//! The one place that touches rustls' configuration API: loading PEM
//! certificates and keys, and building the two server configurations (the
//! agent port: TLS 1.3 only with ALPN `tether/1`; the shared public port:
//! TLS 1.3 with the wildcard certificate).
//!
//! It does not accept connections; `agent` and `public` do.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// A certificate chain and its key, read from PEM files.
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.certs.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Why an identity could not be loaded; the string says why.
#[derive(Debug)]
pub enum IdentityError {
    /// The certificate file is unreadable, not PEM, empty, or does not match the key.
    Cert(String),
    /// The key file is unreadable, not a PEM private key, or unsupported.
    Key(String),
}

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityError::Cert(r) => write!(f, "certificate: {r}"),
            IdentityError::Key(r) => write!(f, "key: {r}"),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and private key, and checks that they belong together.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, IdentityError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| IdentityError::Cert(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Cert(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(IdentityError::Cert(format!(
            "{}: no PEM certificate in the file",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| IdentityError::Key(format!("{}: {e}", key.display())))?;
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| IdentityError::Key(format!("unsupported private key: {e}")))?;
    let ck = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    ck.keys_match().map_err(|e| {
        IdentityError::Cert(format!("{}: does not match the key: {e}", cert.display()))
    })?;
    Ok(Identity { certs, key })
}

fn tls13_server(id: &Identity) -> Result<ServerConfig, rustls::Error> {
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(id.certs.clone(), id.key.clone_key())
}

/// The agent port's server: TLS 1.3 only, ALPN `tether/1` only.
pub fn agent_server(id: &Identity) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut cfg = tls13_server(id)?;
    cfg.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The shared public port's server, presenting the `*.<domain>` certificate.
pub fn public_server(id: &Identity) -> Result<Arc<ServerConfig>, rustls::Error> {
    Ok(Arc::new(tls13_server(id)?))
}
