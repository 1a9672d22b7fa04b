//! The public side: one TCP port per tcp endpoint ([`accept_tcp`]), the
//! shared TLS port routed by SNI `<endpoint>.<domain>` ([`accept_tls`],
//! [`serve_tls_client`]), and [`carry`], which carries one public connection
//! over a stream of the endpoint's agent session.
//!
//! Every public connection is bounded: at most `limits.public_connections`
//! are served at once (past it a new one is closed at accept), at most
//! `limits.public_waiting_per_endpoint` wait for a stream of one endpoint
//! (past it one is closed at once instead of waiting), the TLS handshake and
//! the wait for a stream have deadlines, and an established connection with
//! no byte either way for `limits.idle_timeout_ms` is closed.
//!
//! A public connection becomes a stream with `Meta{endpoint, peer, sni}`;
//! bytes are copied both ways, and EOF on one side half-closes the other.
//! When either side fails, for example the device resets the stream with
//! `CONNECT_FAILED`, both are dropped at once, which closes the public client.
//!
//! It does not own bindings: `bind` decides them and the registry holds them.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_lite::io::{split, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::LazyConfigAcceptor;
use smol::net::{TcpListener, TcpStream};
use smol::Timer;
use tether_driver::{Meta, Session};
use tether_proto::EndpointKind;

use crate::config::ms;
use crate::metrics::{Gauge, Held, Refusal};
use crate::registry::{NoRoute, Waiting};
use crate::state::{timeout, State};

/// How long a public connection waits for a free stream on its session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The copy buffer of one direction of one connection.
const COPY_BUFFER: usize = 16 * 1024;

/// One public connection counted against `limits.public_connections`.
struct Slot {
    open: Arc<AtomicUsize>,
    _gauge: Held,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A slot for one more public connection, or `None` (counted) at the cap.
fn take_slot(state: &State) -> Option<Slot> {
    let limit = state.cfg.limits.public_connections;
    let taken = state
        .public_open
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        });
    if taken.is_err() {
        state.counters.refuse(Refusal::PublicFull);
        return None;
    }
    Some(Slot {
        open: state.public_open.clone(),
        _gauge: state.counters.hold(Gauge::PublicConnections),
    })
}

/// The session of `endpoint`, counting a refusal when there is none.
fn route(state: &State, endpoint: &str, kind: EndpointKind) -> Option<(Session, Waiting)> {
    let limit = state.cfg.limits.public_waiting_per_endpoint;
    match state.registry().route(endpoint, kind, limit) {
        Ok(r) => Some(r),
        Err(NoRoute::Unbound) => {
            state.counters.refuse(Refusal::NoRoute);
            None
        }
        Err(NoRoute::Full) => {
            state.counters.refuse(Refusal::PublicWaitingFull);
            None
        }
    }
}

/// Accepts public connections for tcp endpoint `endpoint` until cancelled
/// (the binding's drop cancels it, closing the port).
pub(crate) async fn accept_tcp(state: Weak<State>, endpoint: String, listener: TcpListener) {
    loop {
        let accepted = listener.accept().await;
        let Some(state) = state.upgrade() else { return };
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                accept_failed(&format!("endpoint {endpoint}"), &e).await;
                continue;
            }
        };
        let Some(slot) = take_slot(&state) else {
            continue;
        };
        let Some((session, waiting)) = route(&state, &endpoint, EndpointKind::Tcp) else {
            continue;
        };
        let _ = conn.set_nodelay(true);
        let meta = Meta {
            endpoint: endpoint.clone(),
            peer: Some(peer),
            sni: None,
            client_subject: None,
        };
        let idle = ms(state.cfg.limits.idle_timeout_ms);
        let counters = state.counters.clone();
        drop(state);
        smol::spawn(async move {
            let _slot = slot;
            if let Err(why) = carry(conn, session, waiting, meta, idle).await {
                counters.refuse(why);
            }
        })
        .detach();
    }
}

/// A failed `accept`: out of file descriptors (or another error that will
/// repeat at once) must not spin or flood the log; wait a little.
pub(crate) async fn accept_failed(listener: &str, e: &io::Error) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    // One warning per second at most, across every listener.
    let now = crate::metrics::uptime_secs();
    if LAST.swap(now, Ordering::Relaxed) != now {
        log::warn!("{listener}: accept failed: {e}");
    }
    Timer::after(Duration::from_millis(100)).await;
}

/// Accepts connections on the shared TLS port until cancelled.
pub(crate) async fn accept_tls(state: Arc<State>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                let Some(slot) = take_slot(&state) else {
                    continue;
                };
                let state = state.clone();
                smol::spawn(async move {
                    let _slot = slot;
                    serve_tls_client(&state, conn, peer).await;
                })
                .detach();
            }
            Err(e) => accept_failed("tls port", &e).await,
        }
    }
}

/// Routes one connection of the shared TLS port by its SNI and carries it.
async fn serve_tls_client(state: &State, conn: TcpStream, peer: SocketAddr) {
    let (Some(cfg), Some(server)) = (&state.cfg.tls, &state.public_tls) else {
        return;
    };
    let handshake = ms(state.cfg.limits.public_tls_handshake_timeout_ms);
    let deadline = Instant::now() + handshake;
    let _ = conn.set_nodelay(true);
    let start = match timeout(handshake, LazyConfigAcceptor::new(Default::default(), conn)).await {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            log::debug!("tls port: {peer}: bad ClientHello: {e}");
            state.counters.refuse(Refusal::PublicTlsFailed);
            return;
        }
        None => {
            state.counters.refuse(Refusal::PublicTlsFailed);
            return;
        }
    };
    let sni = start
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    let endpoint = sni
        .as_deref()
        .and_then(|s| s.strip_suffix(cfg.domain.as_str()))
        .and_then(|s| s.strip_suffix('.'))
        .filter(|name| !name.contains('.'))
        .map(str::to_owned);
    let Some(endpoint) = endpoint else {
        state.counters.refuse(Refusal::NoRoute);
        return;
    };
    let Some((session, waiting)) = route(state, &endpoint, EndpointKind::Tls) else {
        return;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let tls = match timeout(left, start.into_stream(server.clone())).await {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            log::debug!("tls port: {peer} ({endpoint}): handshake failed: {e}");
            state.counters.refuse(Refusal::PublicTlsFailed);
            return;
        }
        None => {
            state.counters.refuse(Refusal::PublicTlsFailed);
            return;
        }
    };
    let meta = Meta {
        endpoint,
        peer: Some(peer),
        sni,
        client_subject: None,
    };
    if let Err(why) = carry(
        tls,
        session,
        waiting,
        meta,
        ms(state.cfg.limits.idle_timeout_ms),
    )
    .await
    {
        state.counters.refuse(why);
    }
}

/// Carries one public connection over a new stream of `session`: waits for
/// a stream (counted in `waiting` until then), then copies both ways until
/// both are done, either fails, or nothing moved for `idle`. `Err` names
/// why it ended early, for the counters.
pub(crate) async fn carry<P>(
    public: P,
    session: Session,
    waiting: Waiting,
    meta: Meta,
    idle: Duration,
) -> Result<(), Refusal>
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    let stream = match timeout(OPEN_TIMEOUT, session.open(&meta)).await {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            log::debug!(
                "endpoint {}: {:?}: cannot open a stream: {e}",
                meta.endpoint,
                meta.peer
            );
            return Err(Refusal::NoStream);
        }
        None => return Err(Refusal::NoStream),
    };
    drop(waiting);
    let id = stream.id();
    let (pr, pw) = split(public);
    let (sr, sw) = split(stream);
    let activity = Activity::new();
    // try_zip: the first error (a reset stream, a reset client) ends both
    // directions at once; a clean EOF only half-closes the other side.
    let copy = futures_lite::future::try_zip(pump(pr, sw, &activity), pump(sr, pw, &activity));
    let ended = futures_lite::future::or(async { Some(copy.await) }, async {
        activity.idle_for(idle).await;
        None
    })
    .await;
    match ended {
        Some(Ok((up, down))) => {
            log::debug!(
                "endpoint {} {id}: done, {up} bytes up, {down} down",
                meta.endpoint
            );
            Ok(())
        }
        Some(Err(e)) => {
            log::debug!("endpoint {} {id}: ended: {e}", meta.endpoint);
            Ok(())
        }
        None => {
            log::debug!("endpoint {} {id}: idle for {idle:?}: closed", meta.endpoint);
            Err(Refusal::Idle)
        }
    }
}

/// When a connection last moved a byte, either way.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = last.elapsed();
            if quiet >= idle {
                return;
            }
            Timer::after(idle - quiet).await;
        }
    }
}

/// Copies `r` to `w` until EOF, then closes `w`'s write half.
async fn pump<R, W>(mut r: R, mut w: W, activity: &Activity) -> io::Result<u64>
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
        activity.touch();
        w.write_all(&buf[..n]).await?;
        // TLS buffers inside rustls; a mux stream or TCP socket flushes at once.
        w.flush().await?;
        activity.touch();
        total += n as u64;
    }
    w.close().await?;
    Ok(total)
}
