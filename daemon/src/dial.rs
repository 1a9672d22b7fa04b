//! The dialer: DNS, TCP and TLS 1.3 to the edge's agent port.
//!
//! Every dial resolves the edge's name again (through async-net, whose
//! lookups run on the `blocking` thread pool that `main` bounds with
//! `BLOCKING_MAX_THREADS=2`), tries the addresses in order with a timeout
//! each, tunes the connected TCP socket so the kernel too drops a dead edge
//! after about the session's `dead_after` (keepalive probes and
//! `TCP_USER_TIMEOUT`, [`tether_driver::tune_tunnel_socket`]; a failure is
//! logged, not fatal), and runs a rustls client handshake that offers TLS
//! 1.3 only and the ALPN id `tether/1`. The edge's certificate is always
//! verified, against the CA pinned by `ca_file` or, without one, against the
//! system's CA bundle ([`system_bundle`]: `$SSL_CERT_FILE`, else
//! `/etc/ssl/certs/ca-certificates.crt`). A build with the `webpki-roots`
//! feature trusts Mozilla's roots compiled in instead, for images without a
//! CA bundle; it is off by default because those roots are 61,440 bytes of
//! the armv7 binary (1,367,540 -> 1,306,100) and a provisioned device pins
//! its edge's CA anyway. There is no way to turn verification off, in the
//! config or in this API.
//!
//! This module knows nothing of the tether protocol; the `tunnel` module runs
//! the session over the stream it returns.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_net::TcpStream;
use futures_rustls::client::TlsStream;
use futures_rustls::rustls::pki_types::pem::PemObject;
use futures_rustls::rustls::pki_types::{CertificateDer, ServerName};
use futures_rustls::rustls::{self, ClientConfig, RootCertStore};
use futures_rustls::TlsConnector;
use tether_driver::{ReadAhead, READ_AHEAD};

use crate::config::HostPort;

/// Time allowed for each of: the DNS lookup, one TCP connect, the TLS handshake.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS stream to the edge.
pub type EdgeStream = TlsStream<ReadAhead<TcpStream>>;

/// Why the trust anchors could not be set up (at start: exit 64).
#[derive(Debug)]
pub enum TrustError {
    /// The CA file could not be read or is not PEM.
    Read(PathBuf, String),
    /// The CA file holds no certificate.
    Empty(PathBuf),
    /// A certificate in the CA file is not a usable trust anchor.
    BadAnchor(PathBuf, rustls::Error),
    /// No `ca_file` is set and the system CA bundle cannot be read or holds
    /// no usable certificate.
    System(PathBuf, String),
    /// rustls refused the TLS 1.3-only configuration.
    Tls(rustls::Error),
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::Read(p, e) => write!(f, "{}: cannot read the ca_file: {e}", p.display()),
            TrustError::Empty(p) => {
                write!(f, "{}: the ca_file holds no PEM CERTIFICATE", p.display())
            }
            TrustError::BadAnchor(p, e) => write!(
                f,
                "{}: the ca_file is not a usable CA certificate: {e}",
                p.display()
            ),
            TrustError::System(p, e) => write!(
                f,
                "no ca_file is set, and the system CA bundle {} {e}: set ca_file to the edge's CA \
                 (or SSL_CERT_FILE, or install ca-certificates)",
                p.display()
            ),
            TrustError::Tls(e) => write!(f, "TLS configuration: {e}"),
        }
    }
}

impl std::error::Error for TrustError {}

/// The system CA bundle tetherd trusts when `ca_file` is not set (and the
/// `webpki-roots` feature is off): `$SSL_CERT_FILE` when set, as OpenSSL
/// reads it, else the path Debian, Yocto's and Buildroot's ca-certificates
/// and Alpine all install.
pub fn system_bundle() -> PathBuf {
    match std::env::var_os("SSL_CERT_FILE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
    }
}

/// Where the trust anchors come from: `ca_file`, the system bundle, or the
/// compiled-in roots. For the log line at start.
pub fn trust_source(ca_file: Option<&Path>) -> String {
    match ca_file {
        Some(p) => p.display().to_string(),
        None if cfg!(feature = "webpki-roots") => "webpki-roots (compiled in)".to_owned(),
        None => format!("{} (system CA bundle)", system_bundle().display()),
    }
}

/// Reads the PEM certificates of `path` as trust anchors. A `ca_file`
/// (`system` false) must hold only usable CA certificates; the system
/// bundle (`system` true) may hold some that webpki cannot use as anchors,
/// which are skipped, as OpenSSL-based clients do, but at least one must be
/// usable.
fn read_anchors(path: &Path, system: bool) -> Result<RootCertStore, TrustError> {
    let read_err = |e: String| {
        if system {
            TrustError::System(path.to_owned(), format!("cannot be read: {e}"))
        } else {
            TrustError::Read(path.to_owned(), e)
        }
    };
    let mut roots = RootCertStore::empty();
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| read_err(e.to_string()))?;
    for cert in iter {
        let cert = cert.map_err(|e| read_err(e.to_string()))?;
        match roots.add(cert) {
            Ok(()) => {}
            Err(_) if system => {}
            Err(e) => return Err(TrustError::BadAnchor(path.to_owned(), e)),
        }
    }
    if roots.is_empty() {
        return Err(if system {
            TrustError::System(path.to_owned(), "holds no usable CA certificate".to_owned())
        } else {
            TrustError::Empty(path.to_owned())
        });
    }
    Ok(roots)
}

/// The client TLS configuration: TLS 1.3 only, ALPN `tether/1`, trust in
/// `ca_file` when given, else in the system bundle (or, built with the
/// `webpki-roots` feature, in Mozilla's roots).
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TrustError> {
    let roots = match ca_file {
        #[cfg(feature = "webpki-roots")]
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
        #[cfg(not(feature = "webpki-roots"))]
        None => read_anchors(&system_bundle(), true)?,
        Some(path) => read_anchors(path, false)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TrustError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Why one dial failed. Each is followed by a backoff and a new dial.
#[derive(Debug)]
pub enum DialError {
    /// The name did not resolve.
    Resolve(String, io::Error),
    /// The name resolved to no address.
    NoAddress(String),
    /// No address accepted the TCP connection; the last error.
    Connect(SocketAddr, io::Error),
    /// The TLS handshake failed for another reason than the certificate.
    Handshake(SocketAddr, io::Error),
    /// The edge's certificate was refused by the verifier.
    Certificate(SocketAddr, rustls::Error),
    /// The edge did not select ALPN `tether/1`.
    Alpn(SocketAddr),
    /// A step took longer than [`DIAL_TIMEOUT`].
    Timeout(&'static str, String),
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Resolve(h, e) => write!(f, "cannot resolve {h}: {e}"),
            DialError::NoAddress(h) => write!(f, "{h} resolved to no address"),
            DialError::Connect(a, e) => write!(f, "TCP connect to {a} failed: {e}"),
            DialError::Handshake(a, e) => write!(f, "TLS handshake with {a} failed: {e}"),
            DialError::Certificate(a, e) => write!(
                f,
                "TLS handshake with {a} failed: the edge's certificate was rejected: {e} (check ca_file and server_name)"
            ),
            DialError::Alpn(a) => write!(f, "TLS handshake with {a}: the edge did not agree on ALPN tether/1"),
            DialError::Timeout(what, to) => write!(f, "{what} {to} timed out after {} s", DIAL_TIMEOUT.as_secs()),
        }
    }
}

impl std::error::Error for DialError {}

async fn timeout<T>(
    what: &'static str,
    to: String,
    f: impl std::future::Future<Output = T>,
) -> Result<T, DialError> {
    tether_driver::timeout(DIAL_TIMEOUT, f)
        .await
        .ok_or(DialError::Timeout(what, to))
}

/// Resolves `edge`, connects over TCP, tunes the socket for `dead_after`
/// (the session's dead-peer deadline) and runs the TLS handshake.
pub async fn dial(
    edge: &HostPort,
    name: &ServerName<'static>,
    tls: &TlsConnector,
    dead_after: Duration,
) -> Result<(EdgeStream, SocketAddr), DialError> {
    let addrs = timeout(
        "resolving",
        edge.to_string(),
        async_net::resolve((edge.host.as_str(), edge.port)),
    )
    .await?
    .map_err(|e| DialError::Resolve(edge.to_string(), e))?;
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match timeout("TCP connect to", addr.to_string(), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some((s, addr));
                break;
            }
            Ok(Err(e)) => last = Some(DialError::Connect(addr, e)),
            Err(e) => last = Some(e),
        }
    }
    let Some((tcp, addr)) = tcp else {
        return Err(last.unwrap_or_else(|| DialError::NoAddress(edge.to_string())));
    };
    // Frames are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    // The heartbeat cannot free a socket whose sent bytes the edge never
    // acknowledges; the kernel can. Without it the session still works.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = tether_driver::tune_tunnel_socket(&tcp, dead_after) {
        log::warn!(
            "cannot set TCP keepalive and TCP_USER_TIMEOUT on the connection to {addr}: {e}"
        );
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = dead_after;
    let stream = timeout(
        "TLS handshake with",
        addr.to_string(),
        tls.connect(name.clone(), ReadAhead::new(tcp, READ_AHEAD)),
    )
    .await?
    .map_err(
        |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(
                te
                @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented),
            ) => DialError::Certificate(addr, te.clone()),
            _ => DialError::Handshake(addr, e),
        },
    )?;
    if stream.get_ref().1.alpn_protocol() != Some(tether_proto::ALPN) {
        return Err(DialError::Alpn(addr));
    }
    Ok((stream, addr))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    /// A PEM CERTIFICATE block whose DER is not a certificate.
    const BOGUS: &str = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgc=\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_system_bundle_skips_unusable_certificates_a_ca_file_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.crt");
        std::fs::write(&path, format!("{BOGUS}{}", ca_pem())).unwrap();
        let roots = read_anchors(&path, true).expect("one usable anchor is enough");
        assert_eq!(roots.len(), 1);
        match read_anchors(&path, false) {
            Err(TrustError::BadAnchor(p, _)) => assert_eq!(p, path),
            other => panic!(
                "a ca_file with a bad certificate: {:?}",
                other.map(|r| r.len())
            ),
        }
    }

    #[test]
    fn an_unusable_system_bundle_says_what_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.crt");
        let e = read_anchors(&missing, true).map(|r| r.len()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, TrustError::System(..)), "{msg}");
        assert!(
            msg.contains("none.crt") && msg.contains("cannot be read"),
            "{msg}"
        );
        assert!(msg.contains("set ca_file"), "{msg}");

        let bogus = dir.path().join("bogus.crt");
        std::fs::write(&bogus, BOGUS).unwrap();
        let msg = read_anchors(&bogus, true)
            .map(|r| r.len())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("holds no usable CA certificate"), "{msg}");

        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "").unwrap();
        let e = read_anchors(&empty, false).map(|r| r.len()).unwrap_err();
        assert!(matches!(e, TrustError::Empty(_)), "{e}");
    }
}
