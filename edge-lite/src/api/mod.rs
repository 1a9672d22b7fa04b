//! The admin API: its own listener (`[api]`: TCP, HTTPS required off
//! loopback, or a unix socket), HTTP/1.1 with JSON through hyper 1, run on
//! the edge's one executor through smol-hyper's `FuturesIo` and
//! `SmolTimer` (hyper-util would bring tokio's runtime; the edge has smol's).
//!
//! What a client meets, in order, each before the next costs anything:
//!
//! 1. the connection cap (`max_connections`): past it, accepting pauses
//!    and a new connection waits in the kernel's backlog;
//! 2. `allow` / `deny` on the source address, at accept: a denied source
//!    is closed before TLS and before a byte of HTTP is read, so it never
//!    reaches a handler or the store;
//! 3. TLS (when `cert` / `key` are set), within `header_timeout_ms`;
//! 4. hyper's header read, within `header_timeout_ms` (also between
//!    requests of a kept-alive connection), with at most 16 KiB of headers;
//! 5. the handler ([`routes`]), within `request_timeout_ms`: the bearer API
//!    key and its role, then the body (at most `max_body_bytes`, refused
//!    with 413 before it is read when `Content-Length` says more).
//!
//! The resources, their JSON and their errors are in `openapi.json` (the
//! edge's crate root, served at `GET /openapi.json`); [`crate::wire`] holds the
//! types that document describes. Mutations go through the store like the
//! CLI's; the server's store watcher applies them to live sessions (a
//! revocation closes them within 1 s), so there is no second path.

mod routes;

/// An event as the API shows it (`Event` in openapi.json), as one line of
/// JSON: what `[events] json_lines` writes.
pub(crate) fn event_json(e: &crate::events::Event) -> String {
    serde_json::to_string(&crate::wire::Event::from(e)).unwrap_or_default()
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use rustls::ServerConfig;
use smol::net::unix::UnixListener;
use smol::net::TcpListener;

use crate::config::{ApiConfig, ApiListen};
use crate::state::{timeout, State};

/// The OpenAPI 3 document of this API, as kept in the repository.
pub(crate) const OPENAPI: &str = include_str!("../../openapi.json");

/// hyper's read buffer, which bounds a request's headers.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// A bound API listener.
pub(crate) enum ApiListener {
    /// TCP, with HTTPS when the config has a certificate.
    Tcp(TcpListener, SocketAddr, Option<Arc<ServerConfig>>),
    /// A unix socket (removed when the listener is dropped).
    Unix(UnixListener, std::path::PathBuf),
}

impl ApiListener {
    /// Binds `[api]`'s listener: TCP (loading its certificate) or a unix
    /// socket (a stale socket file is replaced; mode 0660).
    pub(crate) async fn bind(cfg: &ApiConfig) -> Result<ApiListener, String> {
        match &cfg.listen {
            ApiListen::Tcp(addr) => {
                let tls = match (&cfg.cert, &cfg.key) {
                    (Some(c), Some(k)) => {
                        let id = crate::tls::load_identity(c, k).map_err(|e| e.to_string())?;
                        Some(crate::tls::api_server(&id).map_err(|e| e.to_string())?)
                    }
                    _ => None,
                };
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                let a = l
                    .local_addr()
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                Ok(ApiListener::Tcp(l, a, tls))
            }
            ApiListen::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    if !m.file_type().is_socket() {
                        return Err(format!(
                            "{} exists and is not a socket: not replacing it",
                            path.display()
                        ));
                    }
                    std::fs::remove_file(path)
                        .map_err(|e| format!("cannot remove the old {}: {e}", path.display()))?;
                }
                let l = UnixListener::bind(path)
                    .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(ApiListener::Unix(l, path.clone()))
            }
        }
    }

    /// What `LISTEN api` prints: `http://ip:port`, `https://ip:port` or
    /// `unix:/path`.
    pub(crate) fn url(&self) -> String {
        match self {
            ApiListener::Tcp(_, a, None) => format!("http://{a}"),
            ApiListener::Tcp(_, a, Some(_)) => format!("https://{a}"),
            ApiListener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        if let ApiListener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Accepts API connections until cancelled; see the module docs.
pub(crate) async fn serve(state: Arc<State>, listener: ApiListener) {
    let Some(cfg) = state.cfg.api.clone().map(Arc::new) else {
        return;
    };
    let slots = Arc::new(smol::lock::Semaphore::new(cfg.max_connections));
    let sources = cfg.sources();
    loop {
        let permit = slots.acquire_arc().await;
        match &listener {
            ApiListener::Tcp(l, _, tls) => {
                let (conn, peer) = match l.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        crate::public::accept_failed("api", &e).await;
                        continue;
                    }
                };
                if !sources.permits(peer.ip()) {
                    log::debug!("api: {peer}: source denied by api.allow / api.deny");
                    state.counters.refuse(crate::metrics::Refusal::ApiSource);
                    drop(conn);
                    continue;
                }
                let _ = conn.set_nodelay(true);
                let state = state.clone();
                let tls = tls.clone();
                let cfg = cfg.clone();
                crate::state::spawn(async move {
                    let _permit = permit;
                    let head = Duration::from_millis(cfg.header_timeout_ms);
                    match tls {
                        None => connection(state, cfg, conn, Some(peer)).await,
                        Some(tls) => {
                            let acceptor = futures_rustls::TlsAcceptor::from(tls);
                            match timeout(head, acceptor.accept(conn)).await {
                                Some(Ok(s)) => connection(state, cfg, s, Some(peer)).await,
                                Some(Err(e)) => log::debug!("api: {peer}: TLS: {e}"),
                                None => log::debug!("api: {peer}: TLS handshake timed out"),
                            }
                        }
                    }
                })
                .detach();
            }
            ApiListener::Unix(l, _) => {
                let conn = match l.accept().await {
                    Ok((c, _)) => c,
                    Err(e) => {
                        crate::public::accept_failed("api", &e).await;
                        continue;
                    }
                };
                let state = state.clone();
                let cfg = cfg.clone();
                crate::state::spawn(async move {
                    let _permit = permit;
                    connection(state, cfg, conn, None).await;
                })
                .detach();
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection until the client closes it or a
/// timeout does.
async fn connection<S>(state: Arc<State>, cfg: Arc<ApiConfig>, io: S, peer: Option<SocketAddr>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let head = Duration::from_millis(cfg.header_timeout_ms);
    let whole = Duration::from_millis(cfg.request_timeout_ms);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        let max_body = cfg.max_body_bytes;
        async move {
            let resp = match timeout(whole, routes::handle(&state, peer, max_body, req)).await {
                Some(r) => r,
                None => routes::timed_out(whole),
            };
            Ok::<Response<Full<Bytes>>, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(smol_hyper::rt::SmolTimer::new())
        .header_read_timeout(head)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(smol_hyper::rt::FuturesIo::new(io), svc);
    if let Err(e) = conn.await {
        log::debug!(
            "api: {}: {e}",
            peer.map_or("unix".to_owned(), |p| p.to_string())
        );
    }
}
