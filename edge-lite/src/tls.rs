//! The one place that touches rustls' configuration API: loading PEM
//! certificates and keys, and building the server configurations (the
//! agent port: TLS 1.3 only with ALPN `tether/1`; the shared public port:
//! TLS 1.3 with the wildcard certificate; and one per endpoint whose policy
//! asks for other versions, its own certificate or client certificates,
//! built once when the endpoint is bound, never per connection), and the
//! one client configuration, the CLI's for an HTTPS admin API
//! ([`api_client`]).
//!
//! Client certificates are verified by rustls' webpki verifier, once per
//! layer's CA set ([`AllOf`]: a certificate must verify against every
//! layer), then matched against the layers' allowed names. What a verified
//! leaf names ([`identity`]) is read with x509-parser. [`Denied`] sorts a
//! failed handshake into the reasons the counters know.
//!
//! It does not accept connections; `agent` and `public` do.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tether_driver::ClientIdentity;

use crate::policy::{ClientAuth, TlsPlan, TlsVersion};

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

/// The PEM certificates of a file, at least one; the error names the file.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a PEM certificate chain and private key, and checks that they belong together.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, IdentityError> {
    let certs = load_certs(cert).map_err(IdentityError::Cert)?;
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

/// The admin API's HTTPS server: TLS 1.2 and 1.3 (rustls' safe defaults),
/// ALPN `http/1.1`, no client certificates (API keys authenticate).
pub fn api_server(id: &Identity) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(id.certs.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The CLI's client of an HTTPS admin API: TLS 1.2 and 1.3, ALPN
/// `http/1.1`, the server verified against the certificates of `ca`.
pub fn api_client(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The server of one endpoint with a non-default [`TlsPlan`]: its versions,
/// its certificate (the plan's, else `id`, the `[tls]` one) and its client
/// certificate verifier.
pub fn endpoint_server(id: &Identity, plan: &TlsPlan) -> Result<Arc<ServerConfig>, String> {
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::V12, &rustls::version::TLS12),
        (TlsVersion::V13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (plan.min..=plan.max).contains(v))
    .map(|(_, p)| p)
    .collect();
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;
    let builder = match &plan.client {
        None => builder.with_no_client_auth(),
        Some(auth) => builder.with_client_cert_verifier(Arc::new(AllOf::new(auth)?)),
    };
    let (certs, key) = match &plan.server {
        Some(s) => (s.certs.clone(), s.key.clone_key()),
        None => (id.certs.clone(), id.key.clone_key()),
    };
    let cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    Ok(Arc::new(cfg))
}

/// A client certificate verifier that requires every layer's verifier to
/// pass, then every layer's allowed names (see `policy::ClientAuth`).
#[derive(Debug)]
struct AllOf {
    layers: Vec<Arc<dyn ClientCertVerifier>>,
    auth: ClientAuth,
    hints: Vec<DistinguishedName>,
}

impl AllOf {
    fn new(auth: &ClientAuth) -> Result<AllOf, String> {
        let mut layers = Vec::new();
        let mut hints = Vec::new();
        for (i, set) in auth.ca_sets.iter().enumerate() {
            let mut roots = RootCertStore::empty();
            for ca in set {
                roots
                    .add(ca.clone())
                    .map_err(|e| format!("client CA {} of layer {i}: {e}", roots.len() + 1))?;
            }
            let b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let b = if auth.required {
                b
            } else {
                b.allow_unauthenticated()
            };
            let v = b.build().map_err(|e| format!("client CAs: {e}"))?;
            hints.extend(v.root_hint_subjects().iter().cloned());
            layers.push(v);
        }
        if layers.is_empty() {
            return Err("client certificates are asked for without a CA".into());
        }
        Ok(AllOf {
            layers,
            auth: auth.clone(),
            hints,
        })
    }
}

/// A verified certificate whose names match no allowed pattern.
#[derive(Debug)]
pub struct NameDenied;

impl std::fmt::Display for NameDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client certificate's names are not allowed")
    }
}

impl std::error::Error for NameDenied {}

impl ClientCertVerifier for AllOf {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.auth.required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        for v in &self.layers {
            v.verify_client_cert(end_entity, intermediates, now)?;
        }
        if !self.auth.name_sets.is_empty() {
            let id = identity(end_entity).ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ))?;
            if !self.auth.names_allowed(&id_names(&id)) {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(NameDenied))),
                ));
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.layers[0].verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.layers[0].verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.layers[0].supported_verify_schemes()
    }
}

/// The names allowed-name patterns are matched against: the CN, then each
/// DNS and URI SAN.
fn id_names(id: &ClientIdentity) -> Vec<&str> {
    let mut v = Vec::new();
    if !id.common_name.is_empty() {
        v.push(id.common_name.as_str());
    }
    for n in id.names.split(',') {
        if let Some(x) = n.strip_prefix("DNS:").or_else(|| n.strip_prefix("URI:")) {
            v.push(x);
        }
    }
    v
}

/// What a (verified) leaf certificate names: subject, CN, DNS and URI SANs,
/// SHA-256 of its DER. `None` when it does not parse.
pub fn identity(leaf: &CertificateDer<'_>) -> Option<ClientIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject = cert.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(format!("DNS:{d}")),
                x509_parser::extensions::GeneralName::URI(u) => names.push(format!("URI:{u}")),
                _ => {}
            }
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest.as_ref());
    Some(ClientIdentity {
        subject: subject.to_string(),
        common_name,
        names: names.join(","),
        sha256,
    })
}

/// Why a public TLS handshake failed, as the counters sort it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No common TLS version.
    Version,
    /// A certificate was required and none was presented.
    CertMissing,
    /// The presented certificate did not verify (other CA, expired, ...).
    CertInvalid,
    /// It verified, but its names are not allowed.
    NamesNotAllowed,
    /// Anything else (a broken client, a reset).
    Other,
}

/// Sorts the error of a failed handshake.
pub fn denied(e: &std::io::Error) -> Denied {
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Denied::Other;
    };
    match r {
        rustls::Error::NoCertificatesPresented => Denied::CertMissing,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))
            if o.0.downcast_ref::<NameDenied>().is_some() =>
        {
            Denied::NamesNotAllowed
        }
        rustls::Error::InvalidCertificate(_) => Denied::CertInvalid,
        rustls::Error::PeerIncompatible(_) => Denied::Version,
        _ => Denied::Other,
    }
}
