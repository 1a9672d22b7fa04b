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

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::{split, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use smol::net::{TcpListener, TcpStream};
use smol::Timer;
use tether_driver::{ClientIdentity, Meta, Session, Stream};
use tether_proto::EndpointKind;

use crate::admission::Pending;
use crate::config::ms;
use crate::metrics::{Counters, Denial, Gauge, Held, Meter, Refusal, NO_ENDPOINT};
use crate::policy::{check_ips, IpVerdict};
use crate::registry::{NoRoute, Port, Route, Waiting};
use crate::state::{timeout, State};
use crate::tls::{self, Denied};

/// How long a public connection waits for a free stream on its session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The copy buffer of a public connection (client → stream; the other
/// direction needs none: [`forward`]): two frames' payload per `recv`.
const COPY_BUFFER: usize = 32 * 1024;

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

/// The route to `endpoint` from `port`, counting a refusal when there is none.
fn route(state: &State, endpoint: &str, port: Port) -> Option<Route> {
    let limit = state.cfg.limits.public_waiting_per_endpoint;
    match state.registry().route(endpoint, port, limit) {
        Ok(r) => Some(r),
        Err(NoRoute::Unbound) => {
            match port {
                Port::Tcp => state.counters.refuse(Refusal::NoRoute),
                Port::Tls => state.denials.count(NO_ENDPOINT, Denial::SniUnknown),
            }
            None
        }
        Err(NoRoute::Full) => {
            state.counters.refuse(Refusal::PublicWaitingFull);
            None
        }
    }
}

/// Counts what `restrict-ips` said of a connection to `endpoint`; whether
/// it may go on.
fn ips_pass(state: &State, endpoint: &str, v: IpVerdict) -> bool {
    for _ in 0..v.would_deny {
        state.denials.count(endpoint, Denial::IpWouldDeny);
    }
    if v.denied {
        state.denials.count(endpoint, Denial::IpDenied);
    }
    !v.denied
}

/// The edge-wide `restrict-ips` (the mandatory policy's) for `ip`.
fn edge_wide(state: &State, ip: IpAddr) -> IpVerdict {
    check_ips(state.cfg.policies.mandatory.restrict_ips(), ip)
}

/// Accepts public connections for tcp endpoint `endpoint` until cancelled
/// (the binding's drop cancels it, closing the port). A connection is
/// checked against every layer's `restrict-ips` right after accept and
/// closed at once when denied.
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
        // restrict-ips first, so that a denied source is counted as one
        // whatever else is full, and holds no waiting place.
        let mut v = edge_wide(&state, peer.ip());
        let own = state.registry().get(&endpoint).map(|b| b.policy.clone());
        if let Some(own) = &own {
            let o = check_ips(&own.restrict, peer.ip());
            v.denied |= o.denied;
            v.would_deny += o.would_deny;
        }
        if !ips_pass(&state, &endpoint, v) {
            continue;
        }
        let Some(r) = route(&state, &endpoint, Port::Tcp) else {
            continue;
        };
        let Some(slot) = take_slot(&state) else {
            continue;
        };
        let _ = conn.set_nodelay(true);
        let meta = Meta {
            endpoint: endpoint.clone(),
            peer: Some(peer),
            sni: None,
            client: None,
        };
        let idle = ms(state.cfg.limits.idle_timeout_ms);
        let counters = state.counters.clone();
        drop(state);
        crate::state::spawn(async move {
            let _slot = slot;
            if let Err(why) =
                carry(conn, r.session, r.waiting, r.meter, &counters, meta, idle).await
            {
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

/// Accepts connections on the shared TLS port until cancelled. At accept,
/// before any byte is read: the edge-wide `restrict-ips`, then the cap on
/// unfinished handshakes per source and in all, then the cap on public
/// connections.
pub(crate) async fn accept_tls(state: Arc<State>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                if !ips_pass(&state, NO_ENDPOINT, edge_wide(&state, peer.ip())) {
                    continue;
                }
                let Ok(pending) = state.public_admission.try_admit(peer.ip()) else {
                    state.denials.count(NO_ENDPOINT, Denial::HandshakeBusy);
                    continue;
                };
                let Some(slot) = take_slot(&state) else {
                    continue;
                };
                let state = state.clone();
                crate::state::spawn(async move {
                    let _slot = slot;
                    serve_tls_client(&state, conn, peer, pending).await;
                })
                .detach();
            }
            Err(e) => accept_failed("tls port", &e).await,
        }
    }
}

/// The largest ClientHello the edge reads before giving up (rustls' own
/// limit on a handshake message is 64 KiB; real ones are under 2 KiB).
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Reads a ClientHello off `conn`, keeping every byte read: the SNI it
/// names (lowercased) and the bytes, to be replayed into the handshake or
/// forwarded as they are to a passthrough endpoint.
async fn read_client_hello(conn: &mut TcpStream) -> io::Result<(Option<String>, Vec<u8>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = Vec::with_capacity(2048);
    loop {
        let have = buf.len();
        if have >= MAX_CLIENT_HELLO {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "ClientHello larger than 16 KiB",
            ));
        }
        buf.resize(have + 2048, 0);
        let n = conn.read(&mut buf[have..]).await?;
        buf.truncate(have + n);
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut rd = &buf[have..];
        while !rd.is_empty() {
            acceptor.read_tls(&mut rd)?;
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let sni = accepted
                        .client_hello()
                        .server_name()
                        .map(str::to_ascii_lowercase);
                    return Ok((sni, buf));
                }
                Ok(None) => {}
                Err((e, _)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }
}

/// Routes one connection of the shared TLS port by its SNI and carries it:
/// the endpoint's own `restrict-ips` right after the ClientHello, then
/// either the raw bytes (passthrough) or the handshake with the endpoint's
/// TLS server, which verifies client certificates, before a stream opens.
async fn serve_tls_client(state: &State, mut conn: TcpStream, peer: SocketAddr, pending: Pending) {
    let (Some(cfg), Some(shared)) = (&state.cfg.tls, &state.public_tls) else {
        return;
    };
    let handshake = ms(state.cfg.limits.public_tls_handshake_timeout_ms);
    let deadline = Instant::now() + handshake;
    let _ = conn.set_nodelay(true);
    let (sni, hello) = match timeout(handshake, read_client_hello(&mut conn)).await {
        Some(Ok(h)) => h,
        Some(Err(e)) => {
            log::debug!("tls port: {peer}: bad ClientHello: {e}");
            state.counters.refuse(Refusal::PublicTlsFailed);
            return;
        }
        None => {
            state.denials.count(NO_ENDPOINT, Denial::HandshakeTimeout);
            return;
        }
    };
    let endpoint = sni
        .as_deref()
        .and_then(|s| s.strip_suffix(cfg.domain.as_str()))
        .and_then(|s| s.strip_suffix('.'))
        .filter(|name| !name.contains('.'))
        .map(str::to_owned);
    let Some(endpoint) = endpoint else {
        state.denials.count(NO_ENDPOINT, Denial::SniUnknown);
        return;
    };
    let Some(r) = route(state, &endpoint, Port::Tls) else {
        return;
    };
    if !ips_pass(state, &endpoint, check_ips(&r.policy.restrict, peer.ip())) {
        return;
    }
    let idle = ms(state.cfg.limits.idle_timeout_ms);
    let conn = Rewind::new(hello, conn);
    let mut meta = Meta {
        endpoint,
        peer: Some(peer),
        sni,
        client: None,
    };
    let ended = if r.kind == EndpointKind::TlsPassthrough {
        drop(pending);
        carry(
            conn,
            r.session,
            r.waiting,
            r.meter,
            &state.counters,
            meta,
            idle,
        )
        .await
    } else {
        let server = r.server.clone().unwrap_or_else(|| shared.clone());
        let left = deadline.saturating_duration_since(Instant::now());
        let tls = match timeout(left, TlsAcceptor::from(server).accept(conn)).await {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                log::debug!(
                    "tls port: {peer} ({}): handshake failed: {e}",
                    meta.endpoint
                );
                match tls::denied(&e) {
                    Denied::Version => state.denials.count(&meta.endpoint, Denial::TlsVersion),
                    Denied::CertMissing => state
                        .denials
                        .count(&meta.endpoint, Denial::ClientCertMissing),
                    Denied::CertInvalid => state
                        .denials
                        .count(&meta.endpoint, Denial::ClientCertInvalid),
                    Denied::NamesNotAllowed => state
                        .denials
                        .count(&meta.endpoint, Denial::ClientNameDenied),
                    Denied::Other => state.counters.refuse(Refusal::PublicTlsFailed),
                }
                return;
            }
            None => {
                state
                    .denials
                    .count(&meta.endpoint, Denial::HandshakeTimeout);
                return;
            }
        };
        drop(pending);
        meta.client = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tls::identity)
            .map(|id| fit(id, &meta));
        carry(
            tls,
            r.session,
            r.waiting,
            r.meter,
            &state.counters,
            meta,
            idle,
        )
        .await
    };
    if let Err(why) = ended {
        state.counters.refuse(why);
    }
}

/// Cuts a client identity's strings so that the whole `Meta` fits
/// `MAX_META` (subject first kept whole up to 160 bytes, then the CN up to
/// 64, then as many SANs as fit).
fn fit(mut id: ClientIdentity, meta: &Meta) -> ClientIdentity {
    fn cut(s: &mut String, max: usize) {
        if s.len() > max {
            let mut at = max;
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s.truncate(at);
        }
    }
    cut(&mut id.subject, 160);
    cut(&mut id.common_name, 64);
    // Fixed costs: the peer (≤ 19), option tags, length prefixes (≤ 2 each),
    // the fingerprint (32).
    let used = meta.endpoint.len()
        + meta.sni.as_ref().map_or(0, String::len)
        + id.subject.len()
        + id.common_name.len()
        + 19
        + 3
        + 5 * 2
        + 32;
    let room = tether_proto::MAX_META.saturating_sub(used);
    if id.names.len() > room {
        // Keep whole names only.
        let mut kept = String::new();
        for n in id.names.split(',') {
            let extra = n.len() + usize::from(!kept.is_empty());
            if kept.len() + extra > room {
                break;
            }
            if !kept.is_empty() {
                kept.push(',');
            }
            kept.push_str(n);
        }
        id.names = kept;
    }
    id
}

/// A stream whose first reads replay bytes already read from it (the
/// ClientHello), then read the stream itself.
struct Rewind<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Rewind<S> {
        Rewind {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = buf.len().min(this.prefix.len() - this.at);
            buf[..n].copy_from_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
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
    meter: Meter,
    counters: &Counters,
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
    counters.stream_opened();
    let id = stream.id();
    let (pr, pw) = split(public);
    let activity = Activity::new();
    // try_zip: the first error (a reset stream, a reset client) ends both
    // directions at once; a clean EOF only half-closes the other side.
    // on_wake: each direction is polled only when its own waker fired (a
    // try_zip polls both on every wake-up, and the idle one would try its
    // socket each time: a recv that fails with EAGAIN and an epoll_ctl).
    let copy = futures_lite::future::try_zip(
        tether_driver::on_wake(pump(pr, &stream, &activity, &meter)),
        tether_driver::on_wake(forward(&stream, pw, &activity, &meter)),
    );
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

/// Writes what `stream` receives into `w` straight from the stream's
/// receive window (no copy buffer: [`Stream::poll_write_received`]) until
/// the stream's EOF, then closes `w`'s write half.
async fn forward<W>(
    stream: &Stream,
    mut w: W,
    activity: &Activity,
    meter: &Meter,
) -> io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let n = std::future::poll_fn(|cx| stream.poll_write_received(cx, &mut w)).await?;
        if n == 0 {
            break;
        }
        activity.touch();
        // A TLS client's records may wait inside rustls; push them out.
        w.flush().await?;
        meter.down(n as u64);
        total += n as u64;
    }
    w.close().await?;
    Ok(total)
}

/// Copies `r` to `w` through a buffer until EOF, then closes `w`'s write half.
async fn pump<R, W>(mut r: R, mut w: W, activity: &Activity, meter: &Meter) -> io::Result<u64>
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
        meter.up(n as u64);
        total += n as u64;
    }
    w.close().await?;
    Ok(total)
}
