//! `tether-driver`: the one async driver of tether's multiplexer, used by both
//! `tetherd` and `tether-edge`.
//!
//! It turns a [`tether_proto::Mux`] plus any futures-io byte pipe (a TLS
//! stream in practice, a TCP stream in tests) into:
//!
//! - a [`Session`] handle (cheap to clone) to [`open`](Session::open) and
//!   [`accept`](Session::accept) streams, exchange control messages and start
//!   draining with [`goaway`](Session::goaway);
//! - [`Stream`]s that implement futures-io `AsyncRead` + `AsyncWrite`, where
//!   `poll_close` is a half-close (FIN) and dropping the stream releases it
//!   (a stream not finished both ways is reset with `CANCEL`);
//! - one [`Driver`] future per session that moves bytes between the pipe and
//!   the mux, runs the heartbeat timer (async-io `Timer`) and wakes the tasks
//!   that wait on streams. Spawn it (or poll it) beside the application.
//!
//! # The end of a session
//! Once the mux is closed (a `GOAWAY` with an error, a protocol error, the
//! heartbeat deadline, or the end of draining), the driver stops reading,
//! writes what the mux still has to say (the `GOAWAY`, an `Error` queued
//! before it) and closes the pipe (TLS `close_notify`). All of that must
//! happen within the session's *linger* deadline ([`Options::linger`],
//! [`DEFAULT_LINGER`] unless set with [`Session::new_with`]), counted on the
//! driver's own timer from the moment it sees the mux closed. A peer that
//! stops reading cannot hold the driver past it: when the linger expires,
//! the driver drops the pipe unflushed (its fd is closed at once, even if
//! the [`Driver`] value itself is kept) and resolves
//! [`Closed::Lingered`] with the mux's close reason. The same deadline
//! covers a pipe whose `poll_close` is what blocks.
//!
//! The mux's memory is allocated once in [`Session::new`], from the
//! [`Config`]: nothing here grows with traffic except per-stream wakers, which
//! are bounded by `max_streams`. Both ends run on any executor; the daemon
//! uses one single-threaded smol executor.
//!
//! [`tune_tunnel_socket`] (module [`socket`], Linux and Android) sets the
//! tunnel's TCP socket up so the kernel, too, drops a dead peer after about
//! the heartbeat's `dead_after`: keepalive probes on an idle connection, and
//! `TCP_USER_TIMEOUT` on sent data the peer never acknowledges. Both
//! programs call it on the TCP socket before the TLS handshake.
//!
//! [`ReadAhead`] (module [`read_ahead`]) goes between the tunnel's TCP
//! socket and its TLS layer in both programs: one `recv` per 64 KiB instead
//! of several per TLS record.
//!
//! This crate does not know about TLS, tokens or endpoints.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

pub mod on_wake;
pub use on_wake::{on_wake, WakeGate};
pub mod read_ahead;
pub use read_ahead::{ReadAhead, READ_AHEAD};
#[cfg(any(target_os = "linux", target_os = "android"))]
pub mod socket;
#[cfg(any(target_os = "linux", target_os = "android"))]
pub use socket::{tune_tunnel_socket, TunnelSocketTimes};

/// `f`'s output, or `None` if `d` passes first (on async-io's timer). The
/// one deadline helper of both programs.
pub async fn timeout<T>(d: Duration, f: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        Timer::after(d).await;
        None
    })
    .await
}

use async_io::Timer;
use futures_io::{AsyncRead, AsyncWrite};
use tether_proto::mux::{CloseReason, ControlError, OpenError, Recv, StreamError};
use tether_proto::{
    ClientCert, Config, Control, ErrorCode, Event, Millis, Mux, PeerAddr, Slot, StreamId,
    StreamMeta,
};

/// Size of the driver's read buffer towards the pipe. Output is written to
/// the pipe straight from the mux's transmit queue ([`Mux::transmit_with`]).
pub const IO_BUFFER: usize = 64 * 1024;

/// Pieces of output up to this size (the small frames: `WINDOW`, `RESET`,
/// `PING`, `GOAWAY`, and the tails of frames a pipe took in part) are
/// gathered and written with the next large piece in one vectored write
/// (so a `WINDOW` rides in the same TLS record as the data after it), or on
/// their own at the end of a pass.
const COALESCE_MAX: usize = 64;
/// The buffer that gathers them.
const COALESCE_BUFFER: usize = 1024;

type SessionMux = Mux<Vec<Slot>, SessionBuffer>;

/// The one buffer of a session's mux ([`Config::buffer_len`] bytes), and the
/// driver's read buffer: each an anonymous mapping of its own, so that dropping the session returns its
/// pages to the OS at once (an allocator keeps freed blocks of this size in
/// its arenas). Its pages become resident only as the mux touches them. If
/// the system refuses the mapping, a heap allocation of the same size.
enum SessionBuffer {
    Mapped(memmap2::MmapMut),
    Heap(Vec<u8>),
}

impl SessionBuffer {
    fn new(len: usize) -> SessionBuffer {
        match memmap2::MmapMut::map_anon(len) {
            Ok(m) => SessionBuffer::Mapped(m),
            Err(e) => {
                log::debug!("session buffer: no anonymous mapping ({e}); using the heap");
                SessionBuffer::Heap(vec![0u8; len])
            }
        }
    }
}

impl AsRef<[u8]> for SessionBuffer {
    fn as_ref(&self) -> &[u8] {
        match self {
            SessionBuffer::Mapped(m) => m,
            SessionBuffer::Heap(v) => v,
        }
    }
}

impl AsMut<[u8]> for SessionBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            SessionBuffer::Mapped(m) => m,
            SessionBuffer::Heap(v) => v,
        }
    }
}

/// How long a closed session may take to flush its last frames and close
/// the pipe unless [`Options::linger`] says otherwise.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(2);

/// Settings of one session's driver, beside the mux's [`Config`]. Build it
/// with `Options { linger, ..Options::default() }` so that new fields keep
/// your code compiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Once the mux is closed, the driver finishes within this long: what is
    /// not written (and a `poll_close` that has not completed) by then is
    /// abandoned, the pipe is dropped and the driver resolves
    /// [`Closed::Lingered`]. Zero still makes one attempt to write and close.
    pub linger: Duration,
    /// Refuse every stream the peer opens, from its first byte
    /// ([`Session::refuse_peer_streams`]). The edge sets it: in this protocol
    /// version only the edge opens streams.
    pub refuse_peer_streams: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            linger: DEFAULT_LINGER,
            refuse_peer_streams: false,
        }
    }
}

/// Stream metadata with owned strings, as the application sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The endpoint the stream belongs to.
    pub endpoint: String,
    /// The public client's address, if known.
    pub peer: Option<SocketAddr>,
    /// TLS server name the client asked for.
    pub sni: Option<String>,
    /// The verified client certificate, if the client presented one.
    pub client: Option<ClientIdentity>,
}

/// Who a verified client certificate names, with owned strings (see
/// [`tether_proto::ClientCert`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject, RFC 4514 (`CN=cam-7,O=Acme`).
    pub subject: String,
    /// The subject's common name; empty when it has none.
    pub common_name: String,
    /// DNS and URI subject alternative names, `DNS:a,URI:b`.
    pub names: String,
    /// SHA-256 of the leaf certificate's DER.
    pub sha256: [u8; 32],
}

impl ClientIdentity {
    /// The fingerprint as lowercase hex.
    pub fn fingerprint(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Meta {
    /// Metadata for a stream of `endpoint` with nothing else known.
    pub fn endpoint(endpoint: &str) -> Meta {
        Meta {
            endpoint: endpoint.to_owned(),
            peer: None,
            sni: None,
            client: None,
        }
    }

    fn from_wire(m: &StreamMeta<'_>) -> Meta {
        let peer = match m.peer {
            PeerAddr::V4(ip, port) => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
            PeerAddr::V6(ip, port) => Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
            PeerAddr::Unknown => None,
        };
        Meta {
            endpoint: m.endpoint.to_owned(),
            peer,
            sni: m.sni.map(str::to_owned),
            client: m.client.as_ref().map(|c| ClientIdentity {
                subject: c.subject.to_owned(),
                common_name: c.common_name.to_owned(),
                names: c.names.to_owned(),
                sha256: c.sha256,
            }),
        }
    }

    fn to_wire(&self) -> StreamMeta<'_> {
        let peer = match self.peer {
            Some(SocketAddr::V4(a)) => PeerAddr::V4(a.ip().octets(), a.port()),
            Some(SocketAddr::V6(a)) => PeerAddr::V6(a.ip().octets(), a.port()),
            None => PeerAddr::Unknown,
        };
        StreamMeta {
            endpoint: &self.endpoint,
            peer,
            sni: self.sni.as_deref(),
            client: self.client.as_ref().map(|c| ClientCert {
                subject: &c.subject,
                common_name: &c.common_name,
                names: &c.names,
                sha256: c.sha256,
            }),
        }
    }
}

/// How a session ended, the [`Driver`]'s output.
#[derive(Debug)]
pub enum Closed {
    /// The mux closed (drained, a GOAWAY, a protocol error, a heartbeat timeout).
    Mux(CloseReason),
    /// The pipe ended or failed before the mux closed.
    Transport(io::Error),
    /// The mux closed (for this reason), but its last frames could not be
    /// written, or the pipe not closed, within the linger deadline
    /// ([`Options::linger`]): the pipe was dropped unflushed. The peer may
    /// not have seen the `GOAWAY`.
    Lingered(CloseReason),
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::Mux(r) => write!(f, "{r}"),
            Closed::Transport(e) => write!(f, "transport: {e}"),
            Closed::Lingered(r) => write!(f, "{r} (linger expired: pipe dropped unflushed)"),
        }
    }
}

impl Closed {
    /// The wire code that best describes the end.
    pub fn code(&self) -> ErrorCode {
        match self {
            Closed::Mux(r) | Closed::Lingered(r) => r.code(),
            Closed::Transport(_) => ErrorCode::INTERNAL,
        }
    }

    /// Why the mux closed, if it did (not for [`Closed::Transport`]).
    pub fn reason(&self) -> Option<CloseReason> {
        match self {
            Closed::Mux(r) | Closed::Lingered(r) => Some(*r),
            Closed::Transport(_) => None,
        }
    }

    /// Whether the linger deadline expired ([`Closed::Lingered`]).
    pub fn lingered(&self) -> bool {
        matches!(self, Closed::Lingered(_))
    }
}

#[derive(Default)]
struct Wakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

struct Inner {
    mux: SessionMux,
    origin: Instant,
    streams: HashMap<u32, Wakers>,
    accept_queue: VecDeque<StreamId>,
    accept_waker: Option<Waker>,
    control_waker: Option<Waker>,
    /// Tasks in `open`, `send_control` and `closed` wait on this; their
    /// listeners deregister when dropped, so abandoned waits leave nothing.
    unblocked: event_listener::Event,
    driver: Option<Waker>,
    goaway: Option<(ErrorCode, u32)>,
    /// Set when the driver has returned: nothing will move any more.
    ended: bool,
    transport_error: Option<io::ErrorKind>,
}

impl Inner {
    fn now(&self) -> Millis {
        Millis(self.origin.elapsed().as_millis() as u64)
    }

    fn wake_driver(&mut self) {
        if let Some(w) = &self.driver {
            w.wake_by_ref();
        }
    }

    /// Moves every pending mux event to the tasks waiting on it.
    fn dispatch_events(&mut self) {
        while let Some(ev) = self.mux.poll_event() {
            match ev {
                Event::Opened(id) => {
                    self.streams.entry(id.get()).or_default();
                    self.accept_queue.push_back(id);
                    if let Some(w) = self.accept_waker.take() {
                        w.wake();
                    }
                }
                Event::Readable(id) => self.wake_stream(id, true, false),
                Event::Writable(id) => self.wake_stream(id, false, true),
                Event::Reset(id, _) => self.wake_stream(id, true, true),
                Event::Control => {
                    if let Some(w) = self.control_waker.take() {
                        w.wake();
                    }
                }
                Event::Unblocked => self.wake_blocked(),
                Event::GoAway { code, last } => {
                    self.goaway = Some((code, last));
                    self.wake_blocked();
                }
                Event::Closed(_) => self.wake_all(),
            }
        }
    }

    fn wake_stream(&mut self, id: StreamId, read: bool, write: bool) {
        if let Some(w) = self.streams.get_mut(&id.get()) {
            if read {
                if let Some(w) = w.read.take() {
                    w.wake();
                }
            }
            if write {
                if let Some(w) = w.write.take() {
                    w.wake();
                }
            }
        }
    }

    fn wake_blocked(&mut self) {
        self.unblocked.notify(usize::MAX);
    }

    fn wake_all(&mut self) {
        self.wake_blocked();
        for w in self.streams.values_mut() {
            if let Some(w) = w.read.take() {
                w.wake();
            }
            if let Some(w) = w.write.take() {
                w.wake();
            }
        }
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        if let Some(w) = self.control_waker.take() {
            w.wake();
        }
    }

    /// Whether no more progress can happen on this session.
    fn dead(&self) -> bool {
        self.ended || self.mux.is_closed()
    }
}

struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the mux half-updated in a
        // way that matters more than the panic itself; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle on one session. Clone it freely; the session lives while the
/// [`Driver`] runs.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.shared.lock();
        f.debug_struct("Session").field("mux", &inner.mux).finish()
    }
}

fn closed_error(inner: &Inner) -> io::Error {
    let what = match inner.mux.close_reason() {
        Some(r) => format!("session closed: {r}"),
        None => match inner.transport_error {
            Some(k) => format!("session transport failed: {k}"),
            None => "session closed".to_owned(),
        },
    };
    io::Error::new(io::ErrorKind::NotConnected, what)
}

impl Session {
    /// A new session over `io`, with all its buffers allocated now and the
    /// default [`Options`]. Spawn the returned [`Driver`]; the session ends
    /// when it returns.
    pub fn new<T>(
        io: T,
        cfg: Config,
    ) -> Result<(Session, Driver<T>), tether_proto::mux::ConfigError>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        Session::new_with(io, cfg, Options::default())
    }

    /// [`Session::new`] with driver settings: the linger deadline
    /// ([`Options::linger`]) and whether peer streams are refused
    /// ([`Options::refuse_peer_streams`]).
    pub fn new_with<T>(
        io: T,
        cfg: Config,
        opts: Options,
    ) -> Result<(Session, Driver<T>), tether_proto::mux::ConfigError>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let origin = Instant::now();
        let mut mux = Mux::new(
            cfg,
            vec![Slot::EMPTY; cfg.max_streams],
            SessionBuffer::new(cfg.buffer_len()),
            Millis(0),
        )?;
        if opts.refuse_peer_streams {
            mux.refuse_peer_streams();
        }
        let inner = Inner {
            mux,
            origin,
            streams: HashMap::with_capacity(cfg.max_streams),
            accept_queue: VecDeque::with_capacity(cfg.max_streams),
            accept_waker: None,
            control_waker: None,
            unblocked: event_listener::Event::new(),
            driver: None,
            goaway: None,
            ended: false,
            transport_error: None,
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
        });
        let driver = Driver {
            shared: shared.clone(),
            io: Some(io),
            rbuf: SessionBuffer::new(IO_BUFFER),
            rpos: 0,
            rend: 0,
            read_done: false,
            small: [0u8; COALESCE_BUFFER],
            spos: 0,
            send: 0,
            need_flush: false,
            timer: Timer::never(),
            timer_at: None,
            closing_io: false,
            linger: opts.linger,
            linger_at: None,
        };
        Ok((Session { shared }, driver))
    }

    /// Opens a stream, waiting while every stream slot is in use.
    pub async fn open(&self, meta: &Meta) -> io::Result<Stream> {
        self.until_unblocked(|inner| {
            if inner.ended {
                return Some(Err(closed_error(inner)));
            }
            Some(match inner.mux.open(&meta.to_wire()) {
                Ok(id) => {
                    inner.streams.insert(id.get(), Wakers::default());
                    inner.wake_driver();
                    Ok(Stream {
                        shared: self.shared.clone(),
                        id,
                    })
                }
                Err(OpenError::TooManyStreams | OpenError::Blocked) => return None,
                Err(OpenError::Closing) => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "session is draining or closed",
                )),
                Err(OpenError::IdsExhausted) => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "stream ids exhausted; reconnect",
                )),
                Err(OpenError::Meta(e)) => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("stream metadata: {e}"),
                )),
            })
        })
        .await
    }

    /// Runs `attempt` under the lock until it has an answer; in between it
    /// waits for `Unblocked`, a GOAWAY or the end of the session.
    async fn until_unblocked<T>(&self, mut attempt: impl FnMut(&mut Inner) -> Option<T>) -> T {
        loop {
            let listener = {
                let mut inner = self.shared.lock();
                if let Some(v) = attempt(&mut inner) {
                    return v;
                }
                // Listening under the lock: a notification cannot slip in
                // between the attempt and the wait.
                inner.unblocked.listen()
            };
            listener.await;
        }
    }

    /// The next stream the peer opened; `None` once the session is over.
    pub async fn accept(&self) -> Option<Stream> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(id) = inner.accept_queue.pop_front() {
                return Poll::Ready(Some(Stream {
                    shared: self.shared.clone(),
                    id,
                }));
            }
            if inner.dead() {
                return Poll::Ready(None);
            }
            inner.accept_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Queues a control message, waiting while the control queue is full.
    pub async fn send_control(&self, msg: &Control<'_>) -> io::Result<()> {
        self.until_unblocked(|inner| {
            if inner.ended {
                return Some(Err(closed_error(inner)));
            }
            Some(match inner.mux.send_control(msg) {
                Ok(()) => {
                    inner.wake_driver();
                    Ok(())
                }
                Err(ControlError::Blocked) => return None,
                Err(ControlError::Closed) => Err(closed_error(inner)),
                Err(ControlError::Codec(e)) => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("control message: {e}"),
                )),
            })
        })
        .await
    }

    /// The next control message, as its raw bytes (already checked to decode:
    /// use [`Control::decode`]); `None` once the session is over.
    pub async fn recv_control(&self) -> Option<Vec<u8>> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(bytes) = inner.mux.control_bytes() {
                let bytes = bytes.to_vec();
                inner.mux.take_control();
                inner.wake_driver(); // input may have stalled on it
                return Poll::Ready(Some(bytes));
            }
            if inner.dead() {
                return Poll::Ready(None);
            }
            inner.control_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Starts draining (`NO_ERROR`: open streams finish, no new ones) or closes
    /// at once with an error code. The peer is told with `GOAWAY`.
    pub fn goaway(&self, code: ErrorCode) {
        let mut inner = self.shared.lock();
        inner.mux.goaway(code);
        inner.dispatch_events();
        inner.wake_driver();
    }

    /// Refuses every stream the peer opens from now on: each `OPEN` is
    /// answered with `RESET(REFUSED_STREAM)` at once, takes no stream slot,
    /// gets no credit and buffers nothing; [`Session::accept`] never returns
    /// such a stream ([`Mux::refuse_peer_streams`], PROTOCOL.md 3.2).
    ///
    /// Call order: right after [`Session::new`] and before the [`Driver`]
    /// is first polled (spawned), so that not even the peer's first frame
    /// gets a slot; or pass [`Options::refuse_peer_streams`] to
    /// [`Session::new_with`], which is the same. Called later, it applies to
    /// the `OPEN`s the driver reads from then on.
    pub fn refuse_peer_streams(&self) {
        self.shared.lock().mux.refuse_peer_streams();
    }

    /// The peer's `GOAWAY`, if it sent one: its code and the last stream it accepted.
    pub fn peer_goaway(&self) -> Option<(ErrorCode, u32)> {
        self.shared.lock().goaway
    }

    /// Tasks waiting in [`Session::open`], [`Session::send_control`] or
    /// [`Session::closed`] right now (diagnostics: a wait that is dropped
    /// leaves nothing behind).
    pub fn waiting_tasks(&self) -> usize {
        self.shared.lock().unblocked.total_listeners()
    }

    /// Streams held right now.
    pub fn live_streams(&self) -> usize {
        self.shared.lock().mux.live_streams()
    }

    /// Whether the session is draining or over.
    pub fn is_closing(&self) -> bool {
        let inner = self.shared.lock();
        inner.ended || inner.mux.is_closing()
    }

    /// Waits until the session is over (the mux closed or the pipe ended).
    pub async fn closed(&self) {
        self.until_unblocked(|inner| inner.dead().then_some(()))
            .await
    }
}

/// One stream of a session: `AsyncRead` + `AsyncWrite`. `poll_close` ends
/// this side's direction (half-close); dropping it releases the stream.
pub struct Stream {
    shared: Arc<Shared>,
    id: StreamId,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}

fn stream_error(e: StreamError) -> io::Error {
    match e {
        StreamError::Reset(code) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset: {code}"),
        ),
        StreamError::Finished => {
            io::Error::new(io::ErrorKind::BrokenPipe, "stream already finished")
        }
        StreamError::Unknown(id) => {
            io::Error::new(io::ErrorKind::NotConnected, format!("{id} is gone"))
        }
        StreamError::Blocked => io::Error::new(io::ErrorKind::WouldBlock, "blocked"),
    }
}

impl Stream {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The metadata its opener sent.
    pub fn meta(&self) -> Option<Meta> {
        self.shared
            .lock()
            .mux
            .meta(self.id)
            .map(|m| Meta::from_wire(&m))
    }

    /// Writes what the stream has received into `w` straight from the
    /// stream's receive window (one vectored write of up to two slices), so
    /// that a copy loop needs no buffer of its own in this direction and
    /// hands the socket as much as has arrived, not one buffer's worth.
    ///
    /// `Ready(Ok(n))`: `n > 0` bytes were written and are gone from the
    /// stream (its credit is granted as for a read). `Ready(Ok(0))`: the
    /// peer finished and every byte was written, as a read's EOF.
    /// `Pending`: nothing has arrived (this task is woken when something
    /// does) or `w` takes nothing now (`w` wakes it).
    ///
    /// The session's lock is held during `w`'s `poll_write_vectored`: `w`
    /// must not be, or wait on, this session (a socket or another TLS
    /// connection is what it is for).
    pub fn poll_write_received<W>(&self, cx: &mut Context<'_>, w: &mut W) -> Poll<io::Result<usize>>
    where
        W: AsyncWrite + Unpin,
    {
        let mut inner = self.shared.lock();
        let mut wrote = None;
        let r = inner.mux.recv_with(self.id, |a, b| {
            let both = [IoSlice::new(a), IoSlice::new(b)];
            let bufs = if b.is_empty() { &both[..1] } else { &both[..] };
            match Pin::new(&mut *w).poll_write_vectored(cx, bufs) {
                Poll::Ready(Ok(n)) => {
                    wrote = Some(Ok(n));
                    n
                }
                Poll::Ready(Err(e)) => {
                    wrote = Some(Err(e));
                    0
                }
                Poll::Pending => 0,
            }
        });
        match r {
            Ok(Recv::Data(_)) => match wrote {
                Some(Ok(0)) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the writer accepts no more bytes",
                ))),
                Some(Ok(n)) => {
                    inner.wake_driver(); // a WINDOW grant may be due
                    Poll::Ready(Ok(n))
                }
                Some(Err(e)) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            Ok(Recv::Fin) => Poll::Ready(Ok(0)),
            Ok(Recv::Blocked) => {
                if inner.ended {
                    return Poll::Ready(Err(closed_error(&inner)));
                }
                if let Some(wk) = inner.streams.get_mut(&self.id.get()) {
                    wk.read = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(stream_error(e))),
        }
    }

    /// Resets the stream with `code`: both directions end now.
    pub fn reset(&self, code: ErrorCode) {
        let mut inner = self.shared.lock();
        let _ = inner.mux.reset(self.id, code);
        inner.wake_driver();
    }
}

impl Stream {
    fn read_some(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut inner = self.shared.lock();
        match inner.mux.recv(self.id, buf) {
            Ok(Recv::Data(n)) => {
                inner.wake_driver(); // a WINDOW grant may be due
                Poll::Ready(Ok(n))
            }
            Ok(Recv::Fin) => Poll::Ready(Ok(0)),
            Ok(Recv::Blocked) => {
                if inner.ended {
                    return Poll::Ready(Err(closed_error(&inner)));
                }
                if let Some(w) = inner.streams.get_mut(&self.id.get()) {
                    w.read = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(stream_error(e))),
        }
    }

    fn write_some(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut inner = self.shared.lock();
        match inner.mux.send(self.id, buf) {
            Ok(n) => {
                inner.wake_driver();
                Poll::Ready(Ok(n))
            }
            Err(StreamError::Blocked) => {
                if inner.ended {
                    return Poll::Ready(Err(closed_error(&inner)));
                }
                if let Some(w) = inner.streams.get_mut(&self.id.get()) {
                    w.write = Some(cx.waker().clone());
                }
                inner.wake_driver();
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(stream_error(e))),
        }
    }

    fn finish_some(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.shared.lock();
        match inner.mux.finish(self.id) {
            Ok(()) => {
                inner.wake_driver();
                Poll::Ready(Ok(()))
            }
            Err(StreamError::Blocked) => {
                if inner.ended {
                    return Poll::Ready(Err(closed_error(&inner)));
                }
                if let Some(w) = inner.streams.get_mut(&self.id.get()) {
                    w.write = Some(cx.waker().clone());
                }
                inner.wake_driver();
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(stream_error(e))),
        }
    }
}

/// `Stream` and `&Stream` read and write alike, so that one task can read
/// a stream while another (or the same) writes it without a lock around it.
macro_rules! stream_io {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                self.read_some(cx, buf)
            }
        }

        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.write_some(cx, buf)
            }

            fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                // Queued bytes belong to the driver, which flushes the pipe itself.
                Poll::Ready(Ok(()))
            }

            fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.finish_some(cx)
            }
        }
    };
}
stream_io!(Stream);
stream_io!(&Stream);

impl Drop for Stream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.mux.release(self.id);
        inner.streams.remove(&self.id.get());
        inner.dispatch_events();
        inner.wake_driver();
    }
}

/// The future that runs a session: spawn it. It resolves when the session is
/// over and the pipe is closed (or dropped at the linger deadline), with how
/// it ended. The pipe is dropped when it resolves; polling it again after
/// that returns `Pending`.
pub struct Driver<T> {
    shared: Arc<Shared>,
    /// The pipe; `None` once the driver has resolved.
    io: Option<T>,
    /// The read buffer, mapped like the mux's buffer (and for the same reason).
    rbuf: SessionBuffer,
    rpos: usize,
    rend: usize,
    read_done: bool,
    /// Small pieces of output gathered for one write: `small[spos..send]`
    /// is taken from the mux and not yet written.
    small: [u8; COALESCE_BUFFER],
    spos: usize,
    send: usize,
    need_flush: bool,
    timer: Timer,
    timer_at: Option<Instant>,
    closing_io: bool,
    /// [`Options::linger`].
    linger: Duration,
    /// When the linger deadline expires: set when the driver first sees the
    /// mux closed.
    linger_at: Option<Instant>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Driver<T> {
    /// The pipe of a driver that has not resolved.
    fn pipe(&mut self) -> &mut T {
        // Invariant: `io` is taken only by `finish`, after which `poll`
        // returns before it reaches any caller of this.
        self.io
            .as_mut()
            .unwrap_or_else(|| unreachable!("the pipe is used after the driver resolved"))
    }

    fn finish(&mut self, inner: &mut Inner, result: Closed) -> Poll<Closed> {
        // The pipe goes now (unflushed if the linger expired), even if the
        // owner keeps this future.
        self.io = None;
        inner.ended = true;
        inner.wake_all();
        Poll::Ready(result)
    }

    /// The pipe ended or failed: nothing more moves. Streams whose peer had
    /// finished keep their unread bytes ([`Mux::handle_eof`]); the rest are reset.
    fn transport_ended(&mut self, inner: &mut Inner, e: io::Error) -> Poll<Closed> {
        inner.transport_error = Some(e.kind());
        inner.mux.handle_eof();
        inner.dispatch_events();
        self.finish(inner, Closed::Transport(e))
    }
}

/// A deadline that never comes in practice, for a linger too large to add.
fn far_future(now: Instant) -> Instant {
    now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600))
        .unwrap_or(now)
}

/// One `poll_write`: `Ok(Some(n))` written (n > 0), `Ok(None)` not now.
fn write_some<T: AsyncWrite + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    bytes: &[u8],
) -> io::Result<Option<usize>> {
    match Pin::new(io).poll_write(cx, bytes) {
        Poll::Ready(Ok(0)) => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "pipe accepts no more bytes",
        )),
        Poll::Ready(Ok(n)) => Ok(Some(n)),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(None),
    }
}

/// Writes the gathered small pieces; `Ok(true)` once none is left.
fn flush_small<T: AsyncWrite + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    small: &[u8],
    spos: &mut usize,
    send: &mut usize,
) -> io::Result<bool> {
    while *spos < *send {
        match write_some(io, cx, &small[*spos..*send])? {
            Some(n) => *spos += n,
            None => return Ok(false),
        }
    }
    *spos = 0;
    *send = 0;
    Ok(true)
}

/// Writes the gathered small pieces and `bytes` after them, in one vectored
/// write where the pipe takes both (TLS puts them in one record and one
/// `writev`). `Ok(Some(k))`: the small pieces are all out and `k > 0` bytes
/// of `bytes` too; `Ok(None)`: the pipe takes no more now.
fn write_gathered<T: AsyncWrite + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    small: &[u8],
    spos: &mut usize,
    send: &mut usize,
    bytes: &[u8],
) -> io::Result<Option<usize>> {
    loop {
        let pending = *send - *spos;
        if pending == 0 {
            *spos = 0;
            *send = 0;
            return write_some(io, cx, bytes);
        }
        let bufs = [IoSlice::new(&small[*spos..*send]), IoSlice::new(bytes)];
        match Pin::new(&mut *io).poll_write_vectored(cx, &bufs) {
            Poll::Ready(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pipe accepts no more bytes",
                ))
            }
            Poll::Ready(Ok(n)) if n <= pending => *spos += n, // the rest next turn
            Poll::Ready(Ok(n)) => {
                *spos = 0;
                *send = 0;
                return Ok(Some(n - pending));
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(None),
        }
    }
}

/// What writing the mux's output to the pipe did.
#[derive(Default)]
struct Output {
    /// Bytes taken from the mux.
    taken: usize,
    /// The pipe would not take more now.
    blocked: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Driver<T> {
    /// Writes the mux's output to the pipe straight from its transmit queue:
    /// the gathered small pieces first, then whatever the mux offers until
    /// the pipe is full or nothing is left.
    fn write_output(&mut self, mux: &mut SessionMux, cx: &mut Context<'_>) -> io::Result<Output> {
        let mut out = Output::default();
        let Driver {
            io: Some(io),
            small,
            spos,
            send,
            ..
        } = self
        else {
            return Ok(out);
        };
        if !flush_small(io, cx, small, spos, send)? {
            out.blocked = true;
            return Ok(out);
        }
        let mut failed = None;
        out.taken = mux.transmit_with(|bytes| {
            if failed.is_some() || out.blocked {
                return 0;
            }
            if bytes.len() <= COALESCE_MAX && small.len() - *send >= bytes.len() {
                small[*send..*send + bytes.len()].copy_from_slice(bytes);
                *send += bytes.len();
                return bytes.len();
            }
            // A large piece: what was gathered goes first, in the same
            // vectored write as the piece, which is written from the mux's
            // queue as it is.
            match write_gathered(io, cx, small, spos, send, bytes) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    out.blocked = true;
                    0
                }
                Err(e) => {
                    failed = Some(e);
                    0
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        if !out.blocked && !flush_small(io, cx, small, spos, send)? {
            out.blocked = true;
        }
        Ok(out)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for Driver<T> {
    type Output = Closed;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Closed> {
        let this = self.get_mut();
        let shared = this.shared.clone();
        let mut inner = shared.lock();
        if this.io.is_none() {
            return Poll::Pending; // resolved already
        }
        inner.driver = Some(cx.waker().clone());
        // Bounded so one busy session cannot starve the executor.
        for _ in 0..64 {
            let mut progress = false;
            let now = inner.now();

            // 1. Input: leftovers first, then the pipe.
            if this.rpos < this.rend {
                let n = inner
                    .mux
                    .handle_input(now, &this.rbuf.as_ref()[this.rpos..this.rend]);
                this.rpos += n;
                progress |= n > 0;
            } else if !inner.mux.is_closed() {
                // Resume input that stalled on a full control slot.
                inner.mux.handle_input(now, &[]);
            }
            if this.rpos == this.rend && !this.read_done && !inner.mux.is_closed() {
                this.rpos = 0;
                this.rend = 0;
                let io = this
                    .io
                    .as_mut()
                    .unwrap_or_else(|| unreachable!("checked above"));
                match Pin::new(io).poll_read(cx, this.rbuf.as_mut()) {
                    Poll::Ready(Ok(0)) => {
                        this.read_done = true;
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed the connection",
                        );
                        return this.transport_ended(&mut inner, e);
                    }
                    Poll::Ready(Ok(n)) => {
                        this.rend = n;
                        let c = inner.mux.handle_input(now, &this.rbuf.as_ref()[..n]);
                        this.rpos = c;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => {
                        return this.transport_ended(&mut inner, e);
                    }
                    Poll::Pending => {}
                }
            }

            // 2. Time.
            if inner.mux.poll_timeout().is_some_and(|t| t <= now) {
                inner.mux.handle_timeout(now);
                progress = true;
            }

            // 3. Events to the tasks that wait on them.
            inner.dispatch_events();

            // 4. Output, from the mux's queue straight to the pipe.
            let pending_before = this.send - this.spos;
            let output = match this.write_output(&mut inner.mux, cx) {
                Ok(o) => o,
                Err(e) => {
                    return this.transport_ended(&mut inner, e);
                }
            };
            if output.taken > 0 || this.send - this.spos < pending_before {
                this.need_flush = true;
                progress = true;
            }
            // Wake writers that the freed queue space unblocked.
            inner.dispatch_events();
            let written = !output.blocked && this.spos == this.send;
            if this.need_flush && written {
                match Pin::new(this.pipe()).poll_flush(cx) {
                    Poll::Ready(Ok(())) => this.need_flush = false,
                    Poll::Ready(Err(e)) => {
                        return this.transport_ended(&mut inner, e);
                    }
                    Poll::Pending => {}
                }
            }

            // 5. The end: everything written, then close the pipe.
            if inner.mux.is_finished() && written && !this.need_flush {
                this.closing_io = true;
            }
            let reason = || inner.mux.close_reason().unwrap_or(CloseReason::Drained);
            // A close that blocks (TLS close_notify into a full pipe) waits,
            // but not past the linger deadline.
            if this.closing_io && Pin::new(this.pipe()).poll_close(cx).is_ready() {
                let reason = reason();
                return this.finish(&mut inner, Closed::Mux(reason));
            }

            // 6. The linger deadline of a closed session: what could not be
            // written or closed by then is dropped.
            if inner.mux.is_closed() {
                let now = Instant::now();
                let linger = this.linger;
                let at = *this
                    .linger_at
                    .get_or_insert_with(|| now.checked_add(linger).unwrap_or(far_future(now)));
                if now >= at {
                    let reason = reason();
                    return this.finish(&mut inner, Closed::Lingered(reason));
                }
            }
            if !progress {
                // 7. Sleep until the pipe, a task, the heartbeat or the
                // linger deadline wakes us.
                let deadline = match this.linger_at {
                    Some(at) => Some(at),
                    None => inner
                        .mux
                        .poll_timeout()
                        .map(|t| inner.origin + Duration::from_millis(t.0)),
                };
                // Re-arm only for an earlier deadline. The heartbeat's
                // deadline moves later with every frame that comes in, and
                // each re-arm costs a round through the reactor (a timer op
                // and an eventfd write); a timer armed for an earlier moment
                // just fires early once and is then set to the deadline of
                // that moment. No deadline: the armed timer, if any, wakes
                // us once for nothing.
                if let Some(t) = deadline {
                    if this.timer_at.is_none_or(|armed| t < armed) {
                        this.timer_at = Some(t);
                        this.timer.set_at(t);
                    }
                }
                if this.timer_at.is_some() && Pin::new(&mut this.timer).poll(cx).is_ready() {
                    this.timer_at = None;
                    continue;
                }
                return Poll::Pending;
            }
        }
        // Still busy: yield to other tasks and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
