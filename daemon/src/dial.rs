//! The dialer: DNS, TCP and TLS 1.3 to the edge's agent port.
//!
//! Every dial resolves the edge's name again (through async-net, whose
//! lookups run on the `blocking` thread pool that `main` bounds with
//! `BLOCKING_MAX_THREADS=2`), tries the addresses in order with a timeout
//! each, tunes the connected TCP socket so the kernel too drops a dead edge
//! after about the session's `dead_after` (keepalive probes and
//! `TCP_USER_TIMEOUT`, [`tether_driver::tune_tunnel_socket`]; a failure is
//! logged, not fatal), and runs a rustls client handshake that offers TLS
//! 1.3 only and the ALPN id `tether/1`. The edge's certificate is always verified, against
//! the public web PKI (webpki-roots) or the CA pinned by `ca_file`: there is
//! no way to turn verification off, in the config or in this API.
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
            TrustError::Tls(e) => write!(f, "TLS configuration: {e}"),
        }
    }
}

impl std::error::Error for TrustError {}

/// The client TLS configuration: TLS 1.3 only, ALPN `tether/1`, trust in
/// `ca_file` when given, else in webpki-roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TrustError> {
    let roots = match ca_file {
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let iter = CertificateDer::pem_file_iter(path)
                .map_err(|e| TrustError::Read(path.to_owned(), e.to_string()))?;
            for cert in iter {
                let cert = cert.map_err(|e| TrustError::Read(path.to_owned(), e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| TrustError::BadAnchor(path.to_owned(), e))?;
            }
            if roots.is_empty() {
                return Err(TrustError::Empty(path.to_owned()));
            }
            roots
        }
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
