//! The public side: one TCP port per tcp endpoint, the shared TLS port routed
//! by SNI `<endpoint>.<domain>`, and the copy loop that carries a public
//! connection over a stream of the endpoint's agent session.
//!
//! A public connection becomes a stream with `Meta{endpoint, peer, sni}`;
//! bytes are copied both ways, and EOF on one side half-closes the other
//! (`close()` of its write half). When either side fails, for example the
//! device resets the stream with `CONNECT_FAILED`, both are dropped at once,
//! which closes the public client.
//!
//! It does not own bindings: `agent` decides them and the registry holds them.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_lite::io::{split, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::LazyConfigAcceptor;
use smol::net::{TcpListener, TcpStream};
use smol::Timer;
use tether_driver::{Meta, Session};
use tether_proto::EndpointKind;

use crate::agent::{port_refusal, BindRefusal};
use crate::registry::Registry;
use crate::server::{timeout, State};

/// How long a public TLS client has to finish its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a public connection waits for a free stream on its session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The copy buffer of one direction of one connection.
const COPY_BUFFER: usize = 16 * 1024;

/// Binds the public port of tcp endpoint `endpoint`: its fixed port, else
/// the first free one of `port_range`, else (range `[0, 0]`) one the OS
/// picks. Returns the listener, its port and the endpoint's URL.
pub(crate) fn bind_tcp(
    state: &State,
    reg: &Registry,
    endpoint: &str,
) -> Result<(TcpListener, u16, String), BindRefusal> {
    let Some(tcp) = &state.cfg.tcp else {
        return Err(port_refusal(
            "edge config".into(),
            "this edge has no [tcp] listener".into(),
        ));
    };
    let listen = |port: u16| -> io::Result<(TcpListener, u16)> {
        let l = std::net::TcpListener::bind(SocketAddr::new(tcp.listen_ip, port))?;
        let port = l.local_addr()?.port();
        Ok((TcpListener::try_from(l)?, port))
    };
    let (listener, port) = if let Some(&port) = tcp.fixed.get(endpoint) {
        listen(port).map_err(|e| {
            port_refusal(format!("tcp.fixed.{endpoint}"), format!("port {port}: {e}"))
        })?
    } else if tcp.port_range.is_os_chosen() {
        listen(0).map_err(|e| {
            port_refusal("tcp.port_range".into(), format!("no port from the OS: {e}"))
        })?
    } else {
        let r = tcp.port_range;
        let fixed: Vec<u16> = tcp.fixed.values().copied().collect();
        (r.first..=r.last)
            .filter(|p| !reg.port_in_use(*p) && !fixed.contains(p))
            .find_map(|p| listen(p).ok())
            .ok_or_else(|| {
                port_refusal(
                    "tcp.port_range".into(),
                    format!("no free port in {}-{}", r.first, r.last),
                )
            })?
    };
    let host = tcp
        .public_host
        .clone()
        .unwrap_or_else(|| tcp.listen_ip.to_string());
    let url = match host.parse::<IpAddr>() {
        Ok(ip) => format!("tcp://{}", SocketAddr::new(ip, port)),
        Err(_) => format!("tcp://{host}:{port}"),
    };
    Ok((listener, port, url))
}

/// Accepts public connections for tcp endpoint `endpoint` until cancelled.
pub(crate) async fn accept_tcp(state: Weak<State>, endpoint: String, listener: TcpListener) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("endpoint {endpoint}: accept failed: {e}");
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(state) = state.upgrade() else { return };
        let Some(session) = state.registry().route(&endpoint, EndpointKind::Tcp) else {
            log::debug!("endpoint {endpoint}: no session for {peer}; closing");
            continue;
        };
        let _ = conn.set_nodelay(true);
        let meta = Meta {
            endpoint: endpoint.clone(),
            peer: Some(peer),
            sni: None,
            client_subject: None,
        };
        smol::spawn(proxy(conn, session, meta)).detach();
    }
}

/// Accepts connections on the shared TLS port until cancelled.
pub(crate) async fn accept_tls(state: Arc<State>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                smol::spawn(serve_tls(state.clone(), conn, peer)).detach();
            }
            Err(e) => {
                log::warn!("tls port: accept failed: {e}");
                Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Routes one connection of the shared TLS port by its SNI and carries it.
async fn serve_tls(state: Arc<State>, conn: TcpStream, peer: SocketAddr) {
    let (Some(cfg), Some(server)) = (&state.cfg.tls, &state.public_tls) else {
        return;
    };
    let _ = conn.set_nodelay(true);
    let start = match timeout(
        TLS_HANDSHAKE_TIMEOUT,
        LazyConfigAcceptor::new(Default::default(), conn),
    )
    .await
    {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            log::debug!("tls port: {peer}: bad ClientHello: {e}");
            return;
        }
        None => return,
    };
    let sni = start
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    let endpoint = sni
        .as_deref()
        .and_then(|s| s.strip_suffix(cfg.domain.as_str()))
        .and_then(|s| s.strip_suffix('.'))
        .filter(|name| !name.contains('.'));
    let route = endpoint.and_then(|e| {
        state
            .registry()
            .route(e, EndpointKind::Tls)
            .map(|s| (e.to_owned(), s))
    });
    let Some((endpoint, session)) = route else {
        log::debug!("tls port: {peer} asked for {sni:?}: no such endpoint; closing");
        return;
    };
    let tls = match timeout(TLS_HANDSHAKE_TIMEOUT, start.into_stream(server.clone())).await {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            log::debug!("tls port: {peer} ({endpoint}): handshake failed: {e}");
            return;
        }
        None => return,
    };
    let meta = Meta {
        endpoint,
        peer: Some(peer),
        sni,
        client_subject: None,
    };
    proxy(tls, session, meta).await;
}

/// Carries one public connection over a new stream of `session`.
pub(crate) async fn proxy<P>(public: P, session: Session, meta: Meta)
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    let stream = match timeout(OPEN_TIMEOUT, session.open(&meta)).await {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            log::info!(
                "endpoint {}: {:?}: cannot open a stream: {e}",
                meta.endpoint,
                meta.peer
            );
            return;
        }
        None => {
            log::info!(
                "endpoint {}: {:?}: no free stream within {OPEN_TIMEOUT:?}",
                meta.endpoint,
                meta.peer
            );
            return;
        }
    };
    let id = stream.id();
    let (pr, pw) = split(public);
    let (sr, sw) = split(stream);
    // try_zip: the first error (a reset stream, a reset client) ends both
    // directions at once; a clean EOF only half-closes the other side.
    match futures_lite::future::try_zip(pump(pr, sw), pump(sr, pw)).await {
        Ok((up, down)) => {
            log::debug!(
                "endpoint {} {id}: done, {up} bytes up, {down} down",
                meta.endpoint
            );
        }
        Err(e) => {
            log::debug!("endpoint {} {id}: ended: {e}", meta.endpoint);
        }
    }
}

/// Copies `r` to `w` until EOF, then closes `w`'s write half.
async fn pump<R, W>(mut r: R, mut w: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // A TLS client that closes without close_notify: treat as EOF.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n]).await?;
        // TLS buffers inside rustls; a mux stream or TCP socket flushes at once.
        w.flush().await?;
        total += n as u64;
    }
    w.close().await?;
    Ok(total)
}
