//! The sans-IO stream multiplexer (PROTOCOL.md sections 3, 4 and 7).
//!
//! A [`Mux`] is one side of one session. It owns no socket, no clock and no
//! allocation: the caller hands it a slice of [`Slot`]s (one per stream it may
//! hold) and one byte buffer of [`Config::buffer_len`] bytes, and from then on
//! its memory never changes, whatever the peer sends.
//!
//! # Call order
//! The caller loops:
//! 1. [`Mux::handle_input`] with bytes read from the transport. It returns how
//!    many it consumed; keep the rest and pass them again (it stops early only
//!    while a received control message waits to be taken, see
//!    [`Mux::take_control`]).
//! 2. [`Mux::handle_timeout`] when the deadline of [`Mux::poll_timeout`] passes.
//! 3. [`Mux::poll_event`] until `None`, acting on each [`Event`].
//! 4. [`Mux::poll_transmit`] into a buffer of at least [`MAX_FRAME`] bytes
//!    until it returns 0, writing the bytes to the transport in order; or
//!    [`Mux::transmit_with`], which hands the queued bytes to a write
//!    function without copying them first and lets it take any prefix (a
//!    frame taken in part is continued before any other frame).
//!
//! The application side calls [`Mux::open`], [`Mux::send`], [`Mux::finish`],
//! [`Mux::recv`], [`Mux::reset`], [`Mux::release`], [`Mux::send_control`] and
//! [`Mux::goaway`] at any time between those steps. A call that cannot make
//! progress returns a `Blocked` error; the matching [`Event`] says when to retry.
//!
//! # What the peer cannot do
//! Every frame is checked against PROTOCOL.md before it touches state. A
//! violation is answered with `RESET` (stream errors) or `GOAWAY` (session
//! errors) and never buffers a byte beyond a stream's window: data past the
//! credit is discarded as it is read.

use core::fmt;

use crate::control::{CodecError, Control, StreamMeta};
use crate::frame::{ErrorCode, FrameHeader, FrameKind, HeaderError, StreamId, FLAG_ACK, FLAG_FIN};
use crate::ring::Ring;
use crate::{
    Millis, HEADER_LEN, INITIAL_WINDOW, MAX_CONTROL, MAX_FRAME, MAX_META, MAX_PAYLOAD, MAX_WINDOW,
};

/// Capacity of the shared transmit queue for stream frames (`OPEN`, `DATA`).
pub const TX_CAPACITY: usize = 4 * MAX_FRAME;
/// Capacity of the queue of outgoing control frames.
pub const CONTROL_OUT_CAPACITY: usize = MAX_FRAME;
/// How many `RESET`s for streams without a slot (refused or closed) may wait
/// to be sent. When it is full, input is not consumed until they are sent.
pub const ORPHAN_RESETS: usize = 16;

/// Which side of the session this is (PROTOCOL.md section 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The agent: dials, opens odd stream ids.
    Client,
    /// The edge: accepts, opens even stream ids.
    Server,
}

/// The multiplexer's settings. Capacities are fixed for the session's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// This side's role.
    pub role: Role,
    /// Most streams held at once (also the number of [`Slot`]s to pass).
    pub max_streams: usize,
    /// Receive window per stream, in bytes (≥ [`INITIAL_WINDOW`]).
    pub window: u32,
    /// Send a `PING` after this long without input.
    pub ping_interval_ms: u64,
    /// Close the session after this long without input.
    pub dead_after_ms: u64,
}

/// Why a [`Config`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `max_streams` is 0 or above 65535.
    MaxStreams(usize),
    /// `window` is below [`INITIAL_WINDOW`] or above [`MAX_WINDOW`].
    Window(u32),
    /// `dead_after_ms` is not larger than `ping_interval_ms`, or the interval is 0.
    Heartbeat {
        /// The configured ping interval.
        ping_interval_ms: u64,
        /// The configured dead-peer deadline.
        dead_after_ms: u64,
    },
    /// The slot slice's length is not `max_streams`.
    Slots {
        /// Slots needed.
        expected: usize,
        /// Slots given.
        got: usize,
    },
    /// The buffer's length is not [`Config::buffer_len`].
    Buffer {
        /// Bytes needed.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ConfigError::MaxStreams(n) => write!(f, "max_streams must be 1..=65535, not {n}"),
            ConfigError::Window(w) => {
                write!(f, "window must be {INITIAL_WINDOW}..={MAX_WINDOW} bytes, not {w}")
            }
            ConfigError::Heartbeat { ping_interval_ms, dead_after_ms } => write!(
                f,
                "dead_after ({dead_after_ms} ms) must exceed ping_interval ({ping_interval_ms} ms), which must be > 0"
            ),
            ConfigError::Slots { expected, got } => {
                write!(f, "{got} stream slots given, {expected} needed")
            }
            ConfigError::Buffer { expected, got } => {
                write!(f, "buffer of {got} bytes given, {expected} needed")
            }
        }
    }
}

impl Config {
    /// The defaults of PROTOCOL.md section 3.5 and 4 for `role`.
    pub const fn new(role: Role) -> Config {
        Config {
            role,
            max_streams: 64,
            window: 128 * 1024,
            ping_interval_ms: 15_000,
            dead_after_ms: 45_000,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_streams == 0 || self.max_streams > u16::MAX as usize {
            return Err(ConfigError::MaxStreams(self.max_streams));
        }
        if self.window < INITIAL_WINDOW || self.window > MAX_WINDOW {
            return Err(ConfigError::Window(self.window));
        }
        if self.ping_interval_ms == 0 || self.dead_after_ms <= self.ping_interval_ms {
            return Err(ConfigError::Heartbeat {
                ping_interval_ms: self.ping_interval_ms,
                dead_after_ms: self.dead_after_ms,
            });
        }
        Ok(())
    }

    /// Bytes of one stream's region: its metadata and its receive buffer.
    pub const fn stream_region(&self) -> usize {
        MAX_META + self.window as usize
    }

    /// The size of the byte buffer to pass to [`Mux::new`]: every byte the
    /// session will ever buffer. `max_streams × (window + MAX_META)` of receive
    /// buffers, the transmit queue, the control queue and one inbound control
    /// message.
    pub const fn buffer_len(&self) -> usize {
        self.max_streams * self.stream_region() + TX_CAPACITY + CONTROL_OUT_CAPACITY + MAX_CONTROL
    }
}

/// What the caller should act on, from [`Mux::poll_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream; its metadata is [`Mux::meta`].
    Opened(StreamId),
    /// Data, the end of the stream, or a reset can be read with [`Mux::recv`].
    Readable(StreamId),
    /// A [`Mux::send`] or [`Mux::finish`] that was blocked may succeed now.
    Writable(StreamId),
    /// The stream was reset (by the peer, a protocol error or the session
    /// closing); both directions are over.
    Reset(StreamId, ErrorCode),
    /// A control message waits: read it with [`Mux::control`], then
    /// [`Mux::take_control`].
    Control,
    /// An [`Mux::open`] or [`Mux::send_control`] that was blocked may succeed now.
    Unblocked,
    /// The peer is draining: no new streams; streams above `last` that this
    /// side opened were refused.
    GoAway {
        /// The peer's code.
        code: ErrorCode,
        /// The last stream id the peer accepted.
        last: u32,
    },
    /// The session is over. Keep calling [`Mux::poll_transmit`] until it returns
    /// 0, then close the transport.
    Closed(ErrorCode),
}

/// Why the session closed, for logs ([`Mux::close_reason`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Drained after a `GOAWAY(NO_ERROR)` from either side.
    Drained,
    /// The local side called [`Mux::goaway`] with an error code.
    Local(ErrorCode),
    /// The peer sent `GOAWAY` with an error code.
    PeerGoAway(ErrorCode),
    /// No input for `dead_after_ms`.
    Timeout,
    /// A header broke PROTOCOL.md section 2.
    BadHeader(HeaderError),
    /// A control message did not decode.
    BadControl(CodecError),
    /// A frame for a stream the peer never opened.
    NotOpened(StreamId),
    /// An `OPEN` with a reused, backwards or wrong-parity id.
    BadOpen(StreamId),
    /// A `WINDOW` of 0.
    ZeroWindow(StreamId),
    /// The transport ended (EOF) before the session closed.
    TransportEnded,
}

impl CloseReason {
    /// The wire code for this reason.
    pub const fn code(self) -> ErrorCode {
        match self {
            CloseReason::Drained => ErrorCode::NO_ERROR,
            CloseReason::Local(c) | CloseReason::PeerGoAway(c) => c,
            CloseReason::Timeout => ErrorCode::TIMEOUT,
            CloseReason::BadHeader(e) => e.code(),
            CloseReason::BadControl(e) => e.code(),
            CloseReason::NotOpened(_) | CloseReason::BadOpen(_) | CloseReason::ZeroWindow(_) => {
                ErrorCode::PROTOCOL
            }
            CloseReason::TransportEnded => ErrorCode::INTERNAL,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CloseReason::Drained => f.write_str("drained"),
            CloseReason::Local(c) => write!(f, "closed locally with {c}"),
            CloseReason::PeerGoAway(c) => write!(f, "peer sent GOAWAY {c}"),
            CloseReason::Timeout => f.write_str("no input within the dead-peer deadline"),
            CloseReason::BadHeader(e) => write!(f, "bad frame header: {e}"),
            CloseReason::BadControl(e) => write!(f, "bad control message: {e}"),
            CloseReason::NotOpened(id) => write!(f, "frame for {id}, which the peer never opened"),
            CloseReason::BadOpen(id) => write!(f, "OPEN of {id} reuses or skips back an id"),
            CloseReason::ZeroWindow(id) => write!(f, "WINDOW of 0 on {id}"),
            CloseReason::TransportEnded => {
                f.write_str("the connection ended before the session closed")
            }
        }
    }
}

/// Why a stream operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// No stream with this id is held (never opened, or released).
    Unknown(StreamId),
    /// No credit or no transmit space now; wait for [`Event::Writable`].
    Blocked,
    /// The stream was reset with this code.
    Reset(ErrorCode),
    /// This side already finished sending on the stream.
    Finished,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StreamError::Unknown(id) => write!(f, "{id} is not held"),
            StreamError::Blocked => f.write_str("blocked: no credit or transmit space"),
            StreamError::Reset(c) => write!(f, "stream reset: {c}"),
            StreamError::Finished => f.write_str("stream already finished sending"),
        }
    }
}

/// Why [`Mux::open`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Every slot is in use; wait for [`Event::Unblocked`].
    TooManyStreams,
    /// The transmit queue is full; wait for [`Event::Unblocked`].
    Blocked,
    /// The session is draining or closed; open on a new session.
    Closing,
    /// This side used its last stream id; drain and reconnect.
    IdsExhausted,
    /// The metadata does not fit [`MAX_META`].
    Meta(CodecError),
}

/// Why [`Mux::send_control`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// The control queue is full; wait for [`Event::Unblocked`].
    Blocked,
    /// The session is closed.
    Closed,
    /// The message does not encode within [`MAX_CONTROL`].
    Codec(CodecError),
}

/// What [`Mux::recv`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recv {
    /// This many bytes were copied out.
    Data(usize),
    /// The peer finished sending and every byte has been read.
    Fin,
    /// Nothing to read now; wait for [`Event::Readable`].
    Blocked,
}

const EV_OPENED: u8 = 1;
const EV_READABLE: u8 = 2;
const EV_WRITABLE: u8 = 4;
const EV_RESET: u8 = 8;

/// One stream's state. Pass `max_streams` of them ([`Slot::EMPTY`]) to
/// [`Mux::new`]; their contents are private.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// Stream id, 0 when free.
    id: u32,
    /// Receive buffer.
    recv: Ring,
    /// Bytes the peer may still send (granted and not yet received).
    recv_credit: u32,
    /// Bytes read by the application and not yet granted back.
    unacked: u32,
    /// The peer finished sending.
    recv_fin: bool,
    /// Bytes this side may still send.
    send_credit: u32,
    /// This side queued its FIN.
    send_fin: bool,
    /// The stream was reset, with this code.
    reset: Option<ErrorCode>,
    /// A RESET to transmit.
    reset_out: Option<ErrorCode>,
    /// A WINDOW to transmit.
    grant_out: u32,
    /// Length of the metadata in the region's head.
    meta_len: u16,
    /// Pending events (EV_*).
    ev: u8,
    /// A send or finish was blocked.
    blocked: bool,
    /// A finish was blocked on transmit space (it needs no credit).
    fin_blocked: bool,
    /// For a stream this side opened: the transmit-queue position just past
    /// its `OPEN`. Its `RESET` waits until the queue has sent that far.
    open_end: u64,
    /// The application released the stream.
    released: bool,
}

impl Slot {
    /// A free slot.
    pub const EMPTY: Slot = Slot {
        id: 0,
        recv: Ring::EMPTY,
        recv_credit: 0,
        unacked: 0,
        recv_fin: false,
        send_credit: 0,
        send_fin: false,
        reset: None,
        reset_out: None,
        grant_out: 0,
        meta_len: 0,
        ev: 0,
        blocked: false,
        fin_blocked: false,
        open_end: 0,
        released: false,
    };

    fn sid(&self) -> StreamId {
        // Invariant: only occupied slots (id != 0, set from a checked StreamId) are asked.
        StreamId::new(self.id).unwrap_or(StreamId::new(1).unwrap_or_else(|| unreachable!()))
    }

    fn done(&self) -> bool {
        self.reset.is_some() || (self.send_fin && self.recv_fin)
    }
}

impl Default for Slot {
    fn default() -> Slot {
        Slot::EMPTY
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionState {
    Open,
    Draining,
    Closed(ErrorCode),
}

/// What the input parser is in the middle of.
#[derive(Clone, Copy, Debug)]
enum Rx {
    /// Collecting a header into `hdr`.
    Header,
    /// Copying a DATA payload into a slot (or discarding it).
    Data {
        slot: Option<usize>,
        remaining: usize,
        fin: bool,
    },
    /// Copying an OPEN payload into a slot's metadata (or discarding it).
    Open {
        slot: Option<usize>,
        id: StreamId,
        len: usize,
        got: usize,
    },
    /// Collecting a fixed-size payload into `small`.
    Small { hdr: FrameHeader, got: usize },
    /// Collecting a CONTROL payload into the inbound control buffer.
    Control { len: usize, got: usize },
    /// The session failed: input is ignored.
    Dead,
}

/// One side of one tether session. See the module docs for the call order.
///
/// `S` holds the stream slots and `B` every byte buffer; both are sized by
/// [`Config`] and never grow. `Vec<Slot>`/`Vec<u8>` on std, arrays or
/// `&mut` slices without an allocator.
pub struct Mux<S, B> {
    cfg: Config,
    slots: S,
    buf: B,
    state: SessionState,
    reason: Option<CloseReason>,
    close_event: bool,

    rx: Rx,
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    small: [u8; 8],
    ctl_in_ready: Option<usize>,
    last_rx: Millis,

    tx: Ring,
    /// Bytes ever pushed into / sent from the transmit queue: positions that
    /// order frames written outside the queue after frames queued before them.
    tx_pushed: u64,
    tx_sent: u64,
    /// The queue position a `GOAWAY(NO_ERROR)` waits for (every `OPEN` queued
    /// before [`Mux::goaway`] goes first).
    goaway_after: u64,
    ctl_out: (usize, usize),
    /// The rest of the frame at the front of `tx` once part of it has been
    /// handed out (0 at a frame boundary): it goes before any other frame.
    tx_left: usize,
    /// The same for the front of the control queue.
    ctl_left: usize,
    /// A small frame (`PING`, `RESET`, `WINDOW`, `GOAWAY`) being handed out:
    /// `stage[stage_pos..stage_len]` is still to go, before any other frame.
    stage: [u8; HEADER_LEN + 8],
    stage_len: usize,
    stage_pos: usize,
    /// Some slot may owe a `RESET` or a `WINDOW` (false: none does, and
    /// transmitting skips the scan of the slots).
    owed: bool,
    tx_blocked: bool,
    open_blocked: bool,
    ctl_blocked: bool,
    unblocked: bool,
    ctl_event_sent: bool,

    orphans: [(u32, ErrorCode); ORPHAN_RESETS],
    orphan_len: usize,
    goaway_out: Option<(u32, ErrorCode)>,
    goaway_in: Option<(u32, ErrorCode)>,
    goaway_event: bool,
    ping_ack_out: Option<[u8; 8]>,
    ping_out: bool,
    ping_outstanding: bool,
    ping_seq: u64,

    next_local: u32,
    last_remote: u32,
    /// Every stream the peer opens is refused ([`Mux::refuse_peer_streams`]).
    refuse_peer: bool,
    /// The slot a partly received `OPEN` will take.
    opening: Option<usize>,
    live: usize,
    ev_slots: usize,
    ev_cursor: usize,
    find_hint: usize,
}

impl<S, B> fmt::Debug for Mux<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mux")
            .field("role", &self.cfg.role)
            .field("state", &self.state)
            .field("live", &self.live)
            .field("tx_queued", &self.tx.len())
            .finish_non_exhaustive()
    }
}

impl<S, B> Mux<S, B>
where
    S: AsRef<[Slot]> + AsMut<[Slot]>,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// A new session at time `now`, over `slots` (`max_streams` of them) and
    /// `buf` ([`Config::buffer_len`] bytes).
    pub fn new(cfg: Config, mut slots: S, buf: B, now: Millis) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let got = slots.as_ref().len();
        if got != cfg.max_streams {
            return Err(ConfigError::Slots {
                expected: cfg.max_streams,
                got,
            });
        }
        let got = buf.as_ref().len();
        if got != cfg.buffer_len() {
            return Err(ConfigError::Buffer {
                expected: cfg.buffer_len(),
                got,
            });
        }
        slots.as_mut().fill(Slot::EMPTY);
        Ok(Mux {
            cfg,
            slots,
            buf,
            state: SessionState::Open,
            reason: None,
            close_event: false,
            rx: Rx::Header,
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            small: [0; 8],
            ctl_in_ready: None,
            last_rx: now,
            tx: Ring::EMPTY,
            tx_pushed: 0,
            tx_sent: 0,
            goaway_after: 0,
            ctl_out: (0, 0),
            tx_left: 0,
            ctl_left: 0,
            stage: [0; HEADER_LEN + 8],
            stage_len: 0,
            stage_pos: 0,
            owed: false,
            tx_blocked: false,
            open_blocked: false,
            ctl_blocked: false,
            unblocked: false,
            ctl_event_sent: false,
            orphans: [(0, ErrorCode::NO_ERROR); ORPHAN_RESETS],
            orphan_len: 0,
            goaway_out: None,
            goaway_in: None,
            goaway_event: false,
            ping_ack_out: None,
            ping_out: false,
            ping_outstanding: false,
            ping_seq: 0,
            next_local: match cfg.role {
                Role::Client => 1,
                Role::Server => 2,
            },
            last_remote: 0,
            refuse_peer: false,
            opening: None,
            live: 0,
            ev_slots: 0,
            ev_cursor: 0,
            find_hint: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Streams held (open, closing or not yet released).
    pub fn live_streams(&self) -> usize {
        self.live
    }

    /// Whether the session is closed (see [`Event::Closed`]).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, SessionState::Closed(_))
    }

    /// Whether the session is draining or closed: no new streams.
    pub fn is_closing(&self) -> bool {
        self.state != SessionState::Open
    }

    /// Why the session closed, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.reason
    }

    /// Refuses every stream the peer opens from now on (PROTOCOL.md 1 and
    /// 3.2: in this version only the edge opens streams, so the edge calls
    /// this on each session). A peer's `OPEN` is then answered with
    /// `RESET(REFUSED_STREAM)` at once: it takes no slot, is granted no
    /// credit and produces no [`Event::Opened`]; its metadata is not kept
    /// and its id counts as used. `DATA` that follows on that id is
    /// discarded unbuffered, as for any stream that is gone (section 3.3).
    /// The answers share the bounded queue of [`ORPHAN_RESETS`]: while it is
    /// full, input is not consumed, so a flood of `OPEN`s waits for the
    /// transport instead of growing a queue.
    ///
    /// Call it before the first [`Mux::handle_input`]; an `OPEN` consumed
    /// before the call was handled as usual. There is no way back.
    pub fn refuse_peer_streams(&mut self) {
        self.refuse_peer = true;
    }

    /// Whether [`Mux::refuse_peer_streams`] was called.
    pub fn refuses_peer_streams(&self) -> bool {
        self.refuse_peer
    }

    /// The storage given to [`Mux::new`], for inspection (tests, diagnostics):
    /// the slots and the byte buffer. The mux only ever indexes into them
    /// (`AsMut<[_]>`), so their size never changes.
    pub fn storage(&self) -> (&S, &B) {
        (&self.slots, &self.buf)
    }

    /// Bytes of the session buffer (the `buf` given to [`Mux::new`]) in use
    /// right now: the received bytes and metadata of held streams (and of an
    /// `OPEN` being received), the transmit queue, the outbound control
    /// queue and the inbound control message. Never more than
    /// [`Config::buffer_len`]; each stream's share of received bytes never
    /// exceeds its window. Costs one pass over the slots.
    pub fn buffered(&self) -> usize {
        let streams: usize = self
            .slots
            .as_ref()
            .iter()
            .filter(|s| s.id != 0)
            .map(|s| s.recv.len() + s.meta_len as usize)
            .sum();
        let rx = match self.rx {
            Rx::Open {
                slot: Some(_), got, ..
            } => got,
            Rx::Control { got, .. } => got,
            _ => 0,
        };
        let ctl_in = self.ctl_in_ready.unwrap_or(0);
        streams + rx + ctl_in + self.tx.len() + (self.ctl_out.1 - self.ctl_out.0)
    }

    /// Whether the session is closed and every byte has been transmitted:
    /// the transport can be closed.
    pub fn is_finished(&self) -> bool {
        self.is_closed() && !self.wants_transmit()
    }

    // ---------------------------------------------------------------- layout

    fn region(&self, idx: usize) -> core::ops::Range<usize> {
        let r = self.cfg.stream_region();
        idx * r..(idx + 1) * r
    }
    fn tx_range(&self) -> core::ops::Range<usize> {
        let start = self.cfg.max_streams * self.cfg.stream_region();
        start..start + TX_CAPACITY
    }
    fn ctl_out_range(&self) -> core::ops::Range<usize> {
        let start = self.tx_range().end;
        start..start + CONTROL_OUT_CAPACITY
    }
    fn ctl_in_range(&self) -> core::ops::Range<usize> {
        let start = self.ctl_out_range().end;
        start..start + MAX_CONTROL
    }

    fn find(&mut self, id: StreamId) -> Option<usize> {
        let slots = self.slots.as_ref();
        if slots.get(self.find_hint).is_some_and(|s| s.id == id.get()) {
            return Some(self.find_hint);
        }
        let idx = slots.iter().position(|s| s.id == id.get())?;
        self.find_hint = idx;
        Some(idx)
    }

    /// A free slot that no half-received `OPEN` has reserved.
    fn free_slot(&self) -> Option<usize> {
        let reserved = self.opening;
        self.slots
            .as_ref()
            .iter()
            .enumerate()
            .position(|(i, s)| s.id == 0 && Some(i) != reserved)
    }

    fn slot(&mut self, id: StreamId) -> Result<usize, StreamError> {
        self.find(id).ok_or(StreamError::Unknown(id))
    }

    fn is_local(&self, id: StreamId) -> bool {
        id.is_client() == (self.cfg.role == Role::Client)
    }

    /// Whether `id` is one the peer could have opened by now, or one we opened.
    fn was_opened(&self, id: StreamId) -> bool {
        if self.is_local(id) {
            id.get() < self.next_local
        } else {
            id.get() <= self.last_remote
        }
    }

    fn mark(&mut self, idx: usize, ev: u8) {
        let s = &mut self.slots.as_mut()[idx];
        if s.ev == 0 {
            self.ev_slots += 1;
        }
        s.ev |= ev;
    }

    // ---------------------------------------------------------------- input

    /// Feeds bytes read from the transport at time `now`. Returns how many were
    /// consumed: fewer than given only while a control message waits for
    /// [`Mux::take_control`] or the queue of orphan resets is full; pass the
    /// rest again later (an empty slice is fine, to resume).
    pub fn handle_input(&mut self, now: Millis, input: &[u8]) -> usize {
        let n = self.consume_input(input);
        // Only bytes taken prove the peer alive: input offered again while it
        // stalls (a control message not yet taken) must not hold off the
        // dead-peer deadline, or a peer could pin a session forever.
        if n > 0 {
            self.last_rx = now;
            self.ping_outstanding = false;
        }
        n
    }

    fn consume_input(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            match self.rx {
                Rx::Dead => return input.len(),
                Rx::Header => {
                    let want = HEADER_LEN - self.hdr_len;
                    let n = want.min(input.len() - pos);
                    self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&input[pos..pos + n]);
                    self.hdr_len += n;
                    pos += n;
                    if self.hdr_len < HEADER_LEN {
                        return pos;
                    }
                    if !self.on_header() {
                        // Backpressure: the header stays in `hdr` until there is room.
                        return pos;
                    }
                    self.hdr_len = 0;
                }
                Rx::Data {
                    slot,
                    remaining,
                    fin,
                } => {
                    let n = remaining.min(input.len() - pos);
                    if let Some(idx) = slot {
                        let r = self.region(idx);
                        let ring_mem = &mut self.buf.as_mut()[r.start + MAX_META..r.end];
                        self.slots.as_mut()[idx]
                            .recv
                            .push(ring_mem, &input[pos..pos + n]);
                    }
                    pos += n;
                    let remaining = remaining - n;
                    if remaining > 0 {
                        self.rx = Rx::Data {
                            slot,
                            remaining,
                            fin,
                        };
                        return pos;
                    }
                    self.rx = Rx::Header;
                    if let Some(idx) = slot {
                        if fin {
                            self.slots.as_mut()[idx].recv_fin = true;
                        }
                        self.mark(idx, EV_READABLE);
                    }
                }
                Rx::Open { slot, id, len, got } => {
                    let n = (len - got).min(input.len() - pos);
                    if let Some(idx) = slot {
                        let start = self.region(idx).start + got;
                        self.buf.as_mut()[start..start + n].copy_from_slice(&input[pos..pos + n]);
                    }
                    pos += n;
                    if got + n < len {
                        self.rx = Rx::Open {
                            slot,
                            id,
                            len,
                            got: got + n,
                        };
                        return pos;
                    }
                    self.rx = Rx::Header;
                    if let Some(idx) = slot {
                        self.on_open_complete(idx, id, len);
                    }
                }
                Rx::Small { hdr, got } => {
                    let len = hdr.len as usize;
                    let n = (len - got).min(input.len() - pos);
                    self.small[got..got + n].copy_from_slice(&input[pos..pos + n]);
                    pos += n;
                    if got + n < len {
                        self.rx = Rx::Small { hdr, got: got + n };
                        return pos;
                    }
                    self.rx = Rx::Header;
                    self.on_small(hdr);
                }
                Rx::Control { len, got } => {
                    let n = (len - got).min(input.len() - pos);
                    let start = self.ctl_in_range().start + got;
                    self.buf.as_mut()[start..start + n].copy_from_slice(&input[pos..pos + n]);
                    pos += n;
                    if got + n < len {
                        self.rx = Rx::Control { len, got: got + n };
                        return pos;
                    }
                    self.rx = Rx::Header;
                    self.on_control_complete(len);
                }
            }
        }
    }

    /// Acts on the complete header in `hdr`. Returns false to stall input.
    fn on_header(&mut self) -> bool {
        let hdr = match FrameHeader::decode(&self.hdr) {
            Ok(h) => h,
            Err(e) => {
                self.fail(CloseReason::BadHeader(e));
                return true;
            }
        };
        let len = hdr.len as usize;
        match (hdr.kind, hdr.stream) {
            (FrameKind::Control, _) => {
                if self.ctl_in_ready.is_some() {
                    return false;
                }
                self.rx = Rx::Control { len, got: 0 };
                if len == 0 {
                    self.rx = Rx::Header;
                    self.on_control_complete(0);
                }
            }
            (FrameKind::Data, Some(id)) => {
                if self.orphan_len == ORPHAN_RESETS {
                    return false;
                }
                self.on_data_header(id, len, hdr.flags & FLAG_FIN != 0);
            }
            (FrameKind::Open, Some(id)) => {
                if self.orphan_len == ORPHAN_RESETS {
                    return false;
                }
                self.on_open_header(id, len);
            }
            (_, _) => {
                // Fixed-size frames; decode() checked the length.
                self.rx = Rx::Small { hdr, got: 0 };
            }
        }
        true
    }

    fn on_data_header(&mut self, id: StreamId, len: usize, fin: bool) {
        let discard = Rx::Data {
            slot: None,
            remaining: len,
            fin,
        };
        let Some(idx) = self.find(id) else {
            if !self.was_opened(id) {
                self.fail(CloseReason::NotOpened(id));
            } else {
                self.queue_orphan(id, ErrorCode::STREAM_CLOSED);
                self.rx = discard;
            }
            return;
        };
        let s = &self.slots.as_ref()[idx];
        self.rx = discard;
        if s.reset.is_some() {
            return; // in flight when we reset it: drop quietly
        }
        if s.recv_fin {
            self.reset_stream(idx, ErrorCode::STREAM_CLOSED);
            return;
        }
        if len as u64 > s.recv_credit as u64 {
            self.reset_stream(idx, ErrorCode::FLOW_CONTROL);
            return;
        }
        self.slots.as_mut()[idx].recv_credit -= len as u32;
        self.rx = Rx::Data {
            slot: Some(idx),
            remaining: len,
            fin,
        };
        if len == 0 {
            // Zero-length frames complete at once.
            self.rx = Rx::Header;
            if fin {
                self.slots.as_mut()[idx].recv_fin = true;
            }
            self.mark(idx, EV_READABLE);
        }
    }

    fn on_open_header(&mut self, id: StreamId, len: usize) {
        if self.is_local(id) || id.get() <= self.last_remote {
            self.fail(CloseReason::BadOpen(id));
            return;
        }
        self.last_remote = id.get();
        let refuse = self.state != SessionState::Open || self.refuse_peer;
        let free = if refuse { None } else { self.free_slot() };
        let Some(idx) = free else {
            self.queue_orphan(id, ErrorCode::REFUSED_STREAM);
            self.rx = Rx::Open {
                slot: None,
                id,
                len,
                got: 0,
            };
            return;
        };
        // The slot is the OPEN's until its payload is complete: a local
        // open() in between must not take it.
        self.opening = Some(idx);
        self.rx = Rx::Open {
            slot: Some(idx),
            id,
            len,
            got: 0,
        };
        if len == 0 {
            self.rx = Rx::Header;
            self.on_open_complete(idx, id, 0);
        }
    }

    fn on_open_complete(&mut self, idx: usize, id: StreamId, len: usize) {
        self.opening = None;
        let r = self.region(idx);
        let meta_ok = StreamMeta::decode(&self.buf.as_ref()[r.start..r.start + len]).is_ok();
        if !meta_ok {
            self.queue_orphan(id, ErrorCode::PROTOCOL);
            self.check_drained();
            return;
        }
        let window = self.cfg.window;
        let s = &mut self.slots.as_mut()[idx];
        *s = Slot::EMPTY;
        s.id = id.get();
        s.meta_len = len as u16;
        s.recv_credit = INITIAL_WINDOW;
        s.send_credit = INITIAL_WINDOW;
        s.grant_out = window - INITIAL_WINDOW;
        self.owed |= window > INITIAL_WINDOW;
        self.live += 1;
        self.mark(idx, EV_OPENED);
    }

    fn on_small(&mut self, hdr: FrameHeader) {
        let p = self.small;
        let word = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        match (hdr.kind, hdr.stream) {
            (FrameKind::Window, Some(id)) => {
                let inc = word(0);
                if inc == 0 {
                    return self.fail(CloseReason::ZeroWindow(id));
                }
                let Some(idx) = self.find(id) else {
                    if !self.was_opened(id) {
                        self.fail(CloseReason::NotOpened(id));
                    }
                    return;
                };
                let s = &self.slots.as_ref()[idx];
                if s.reset.is_some() {
                    return;
                }
                if s.send_credit as u64 + inc as u64 > MAX_WINDOW as u64 {
                    return self.reset_stream(idx, ErrorCode::FLOW_CONTROL);
                }
                let s = &mut self.slots.as_mut()[idx];
                s.send_credit += inc;
                if s.blocked {
                    s.blocked = false;
                    s.fin_blocked = false;
                    self.mark(idx, EV_WRITABLE);
                }
            }
            (FrameKind::Reset, Some(id)) => {
                let code = ErrorCode(word(0));
                let Some(idx) = self.find(id) else {
                    if !self.was_opened(id) {
                        self.fail(CloseReason::NotOpened(id));
                    }
                    return;
                };
                if self.slots.as_ref()[idx].reset.is_none() {
                    let s = &mut self.slots.as_mut()[idx];
                    s.reset = Some(code);
                    s.recv.clear();
                    self.detach_rx(idx);
                    self.mark(idx, EV_RESET);
                    self.maybe_free(idx);
                }
            }
            // A PING is answered; a PING ACK only proves liveness, which
            // any input already did.
            (FrameKind::Ping, None) if hdr.flags & FLAG_ACK == 0 => {
                self.ping_ack_out = Some(p);
            }
            (FrameKind::GoAway, None) => {
                let (last, code) = (word(0), ErrorCode(word(4)));
                self.goaway_in = Some((last, code));
                self.goaway_event = true;
                if code != ErrorCode::NO_ERROR {
                    self.close_now(CloseReason::PeerGoAway(code), false);
                    return;
                }
                if self.state == SessionState::Open {
                    self.state = SessionState::Draining;
                }
                // Streams we opened above `last` were not processed.
                for idx in 0..self.cfg.max_streams {
                    let s = &self.slots.as_ref()[idx];
                    if s.id != 0 && s.id > last && self.is_local(s.sid()) && s.reset.is_none() {
                        let s = &mut self.slots.as_mut()[idx];
                        s.reset = Some(ErrorCode::REFUSED_STREAM);
                        s.recv.clear();
                        self.detach_rx(idx);
                        self.mark(idx, EV_RESET);
                    }
                }
                self.check_drained();
            }
            // decode() guarantees the stream/kind pairing.
            _ => {}
        }
    }

    fn on_control_complete(&mut self, len: usize) {
        let r = self.ctl_in_range();
        match Control::decode(&self.buf.as_ref()[r.start..r.start + len]) {
            Ok(_) => self.ctl_in_ready = Some(len),
            Err(e) => self.fail(CloseReason::BadControl(e)),
        }
    }

    fn queue_orphan(&mut self, id: StreamId, code: ErrorCode) {
        let q = &self.orphans[..self.orphan_len];
        if self.orphan_len < ORPHAN_RESETS && !q.iter().any(|(i, _)| *i == id.get()) {
            self.orphans[self.orphan_len] = (id.get(), code);
            self.orphan_len += 1;
        }
    }

    /// A stream error: reset locally and tell the peer.
    fn reset_stream(&mut self, idx: usize, code: ErrorCode) {
        let s = &mut self.slots.as_mut()[idx];
        if s.reset.is_some() {
            return;
        }
        s.reset = Some(code);
        s.reset_out = Some(code);
        s.recv.clear();
        s.grant_out = 0;
        self.owed = true;
        self.detach_rx(idx);
        self.mark(idx, EV_RESET);
    }

    /// A stream was reset while a `DATA` frame for it is half received: the
    /// rest of the payload is discarded, not buffered (nor delivered to a
    /// stream that reuses the slot once it is freed).
    fn detach_rx(&mut self, idx: usize) {
        if let Rx::Data {
            slot: Some(i),
            remaining,
            fin,
        } = self.rx
        {
            if i == idx {
                self.rx = Rx::Data {
                    slot: None,
                    remaining,
                    fin,
                };
            }
        }
    }

    /// A session error: GOAWAY with the reason's code, everything stops.
    fn fail(&mut self, reason: CloseReason) {
        self.close_now(reason, true);
        self.rx = Rx::Dead;
    }

    fn close_now(&mut self, reason: CloseReason, send_goaway: bool) {
        if self.is_closed() {
            return;
        }
        self.opening = None;
        let code = reason.code();
        self.reason = Some(reason);
        self.state = SessionState::Closed(code);
        self.close_event = true;
        // Nothing queued goes out any more, except the rest of a frame that
        // is partly written (the wire must stay parseable up to the GOAWAY).
        self.tx.truncate(self.tx_left);
        self.tx_sent = self.tx_pushed - self.tx_left as u64;
        if !matches!(reason, CloseReason::Local(_)) {
            // A local close keeps the control messages queued before it (an
            // `Error` that explains the `GOAWAY`, PROTOCOL.md 1.4).
            let start = self.ctl_out.0;
            self.ctl_out = match self.ctl_left {
                0 => (0, 0),
                n => (start, start + n),
            };
        }
        if self.stage_pos == 0 {
            // Staged but not started: dropped like the rest.
            self.stage_len = 0;
        }
        self.owed = false;
        self.orphan_len = 0;
        self.ping_out = false;
        self.ping_ack_out = None;
        self.goaway_out = send_goaway.then_some((self.last_remote, code));
        for idx in 0..self.cfg.max_streams {
            let s = &mut self.slots.as_mut()[idx];
            if s.id != 0 {
                s.reset_out = None;
                s.grant_out = 0;
                if reason == CloseReason::TransportEnded && s.reset.is_none() && s.recv_fin {
                    // The peer finished sending before the connection ended:
                    // every byte it sent is here, so the reader keeps them
                    // (and then sees EOF). Only the local direction is cut.
                    s.send_fin = true;
                    self.mark(idx, EV_READABLE | EV_WRITABLE);
                } else if s.reset.is_none() {
                    s.reset = Some(code);
                    s.recv.clear();
                    self.mark(idx, EV_RESET);
                }
            }
        }
        self.rx = Rx::Dead;
    }

    /// The transport ended (EOF): no more input will come. Streams whose
    /// peer had already finished sending keep their unread bytes and end
    /// with EOF; every other stream is reset. Nothing more is transmitted.
    pub fn handle_eof(&mut self) {
        self.close_now(CloseReason::TransportEnded, false);
    }

    fn check_drained(&mut self) {
        // A half-received OPEN is a stream the GOAWAY accepted (its id is
        // already `last_remote`): the session waits for it too.
        if self.state == SessionState::Draining && self.live == 0 && self.opening.is_none() {
            self.reason = Some(CloseReason::Drained);
            self.state = SessionState::Closed(ErrorCode::NO_ERROR);
            self.close_event = true;
        }
    }

    /// Frees a slot whose stream is over, released, and owes the peer nothing.
    fn maybe_free(&mut self, idx: usize) {
        let s = &self.slots.as_ref()[idx];
        if s.id != 0 && s.released && s.done() && s.reset_out.is_none() {
            if s.ev != 0 {
                self.ev_slots -= 1;
            }
            self.slots.as_mut()[idx] = Slot::EMPTY;
            self.live -= 1;
            if self.open_blocked {
                self.open_blocked = false;
                self.unblocked = true;
            }
            self.check_drained();
        }
    }

    // ---------------------------------------------------------------- time

    /// The next time [`Mux::handle_timeout`] must be called, if any.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if self.is_closed() {
            return None;
        }
        let dead = self.last_rx.add(self.cfg.dead_after_ms);
        if self.ping_outstanding {
            Some(dead)
        } else {
            Some(self.last_rx.add(self.cfg.ping_interval_ms))
        }
    }

    /// Advances time: sends a heartbeat, or closes a silent session.
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.is_closed() {
            return;
        }
        let silent = now.since(self.last_rx);
        if silent >= self.cfg.dead_after_ms {
            self.close_now(CloseReason::Timeout, true);
        } else if silent >= self.cfg.ping_interval_ms && !self.ping_outstanding {
            self.ping_out = true;
            self.ping_outstanding = true;
        }
    }

    // ---------------------------------------------------------------- output

    /// Whether a frame has been handed out in part: its rest goes first.
    fn mid_frame(&self) -> bool {
        self.stage_len > 0 || self.tx_left > 0 || self.ctl_left > 0
    }

    fn wants_transmit(&self) -> bool {
        if self.mid_frame() || self.goaway_out.is_some() {
            return true;
        }
        if self.is_closed() && self.reason != Some(CloseReason::Drained) {
            return false;
        }
        self.ping_ack_out.is_some()
            || self.ping_out
            || self.orphan_len > 0
            || self.ctl_out.1 > self.ctl_out.0
            || self.tx.len() > 0
            || (self.owed
                && self
                    .slots
                    .as_ref()
                    .iter()
                    .any(|s| s.id != 0 && (s.reset_out.is_some() || s.grant_out > 0)))
    }

    /// Writes whole frames to send into `out` (give it at least [`MAX_FRAME`]
    /// bytes to always make progress) and returns how many bytes it wrote; 0
    /// when there is nothing to send.
    ///
    /// If [`Mux::transmit_with`] left a frame half taken, its rest comes
    /// first (when it fits): that is the only time `out` does not start at a
    /// frame boundary.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> usize {
        let mut sink = BufSink { out, w: 0 };
        self.emit(&mut sink);
        sink.w
    }

    /// Hands the bytes to send, in wire order, to `sink` without copying them
    /// first: `sink` is called with consecutive non-empty pieces (a piece may
    /// span several frames and may end inside one) and returns how many bytes
    /// of the piece it took. Taking fewer than offered (0 included) stops the
    /// call; the rest is offered again, before any other frame, on the next
    /// call of this method or of [`Mux::poll_transmit`]. Returns the bytes
    /// taken in all, 0 when there is nothing to send (or `sink` took nothing).
    ///
    /// The order and the guarantees are those of [`Mux::poll_transmit`]; a
    /// caller that writes to a byte pipe can pass its write call here instead
    /// of copying frames into a buffer of its own.
    pub fn transmit_with<F: FnMut(&[u8]) -> usize>(&mut self, sink: F) -> usize {
        let mut sink = FnSink { f: sink, taken: 0 };
        self.emit(&mut sink);
        sink.taken
    }

    /// The one transmit path of [`Mux::poll_transmit`] and [`Mux::transmit_with`].
    fn emit<K: Sink>(&mut self, sink: &mut K) {
        let before = self.tx.len();
        self.emit_frames(sink);
        if self.tx.len() < before && self.tx_blocked {
            // Queue space was freed: wake what waited for it.
            self.tx_blocked = false;
            for idx in 0..self.cfg.max_streams {
                let s = &self.slots.as_ref()[idx];
                if s.id != 0
                    && s.blocked
                    && s.reset.is_none()
                    && (s.send_credit > 0 || s.fin_blocked)
                {
                    let s = &mut self.slots.as_mut()[idx];
                    s.blocked = false;
                    s.fin_blocked = false;
                    self.mark(idx, EV_WRITABLE);
                }
            }
            if self.open_blocked {
                self.open_blocked = false;
                self.unblocked = true;
            }
        }
    }

    /// Emits frames in wire order until `sink` is full or nothing is left.
    fn emit_frames<K: Sink>(&mut self, sink: &mut K) {
        // A frame handed out in part is finished before any other.
        if !self.emit_stage(sink) || !self.emit_tx(sink, true) || !self.emit_control(sink, true) {
            return;
        }
        if self.is_closed() && self.reason != Some(CloseReason::Drained) {
            // Control messages queued before a local close (an `Error`) go
            // out before the `GOAWAY`; nothing else does.
            if self.emit_control(sink, false) {
                self.emit_goaway(sink);
            }
            return;
        }
        if let Some(p) = self.ping_ack_out {
            let h = FrameHeader::session(FrameKind::Ping, FLAG_ACK, 8);
            match self.emit_small(sink, h, &p) {
                None => return,
                Some(done) => {
                    self.ping_ack_out = None;
                    if !done {
                        return;
                    }
                }
            }
        }
        if self.ping_out {
            let p = (self.ping_seq + 1).to_be_bytes();
            match self.emit_small(sink, FrameHeader::session(FrameKind::Ping, 0, 8), &p) {
                None => return,
                Some(done) => {
                    self.ping_seq += 1;
                    self.ping_out = false;
                    if !done {
                        return;
                    }
                }
            }
        }
        while self.orphan_len > 0 {
            let (id, code) = self.orphans[0];
            let Some(sid) = StreamId::new(id) else { break };
            let h = FrameHeader::stream(FrameKind::Reset, 0, 4, sid);
            let Some(done) = self.emit_small(sink, h, &code.0.to_be_bytes()) else {
                return;
            };
            self.orphans.copy_within(1..self.orphan_len, 0);
            self.orphan_len -= 1;
            if !done {
                return;
            }
        }
        if self.owed && !self.emit_owed(sink) {
            return;
        }
        if !self.emit_control(sink, false) {
            return;
        }
        self.emit_tx(sink, false);
        if !self.mid_frame() && self.tx_sent >= self.goaway_after {
            // A draining GOAWAY follows every OPEN queued before it (frames
            // queued after it may still be waiting: they need not go first).
            self.emit_goaway(sink);
        }
    }

    /// Emits the `RESET`s and `WINDOW`s that slots owe; false if `sink` filled.
    fn emit_owed<K: Sink>(&mut self, sink: &mut K) -> bool {
        let mut left = false;
        for idx in 0..self.cfg.max_streams {
            let s = &self.slots.as_ref()[idx];
            if s.id == 0 {
                continue;
            }
            if let Some(code) = s.reset_out {
                if s.open_end > self.tx_sent {
                    // Its OPEN is still queued: a RESET must not overtake it.
                    left = true;
                    continue;
                }
                let h = FrameHeader::stream(FrameKind::Reset, 0, 4, s.sid());
                let Some(done) = self.emit_small(sink, h, &code.0.to_be_bytes()) else {
                    return false;
                };
                self.slots.as_mut()[idx].reset_out = None;
                self.maybe_free(idx);
                if !done {
                    return false;
                }
            } else if s.grant_out > 0 && s.reset.is_none() {
                let grant = s.grant_out;
                let h = FrameHeader::stream(FrameKind::Window, 0, 4, s.sid());
                let Some(done) = self.emit_small(sink, h, &grant.to_be_bytes()) else {
                    return false;
                };
                let s = &mut self.slots.as_mut()[idx];
                s.recv_credit += grant;
                s.grant_out = 0;
                if !done {
                    return false;
                }
            }
        }
        self.owed = left;
        true
    }

    /// Starts a frame of at most 8 payload bytes: `None` (and nothing changes)
    /// if `sink` has no room for it; otherwise the frame is staged, offered,
    /// and the caller must record it as sent: `Some(true)` if `sink` took all
    /// of it, `Some(false)` if the rest waits in the stage.
    fn emit_small<K: Sink>(
        &mut self,
        sink: &mut K,
        h: FrameHeader,
        payload: &[u8],
    ) -> Option<bool> {
        let len = HEADER_LEN + payload.len();
        if !sink.room(len) {
            return None;
        }
        self.stage[..HEADER_LEN].copy_from_slice(&h.encode());
        self.stage[HEADER_LEN..len].copy_from_slice(payload);
        self.stage_len = len;
        self.stage_pos = 0;
        Some(self.emit_stage(sink))
    }

    /// Offers the rest of the staged frame; true when none is left.
    fn emit_stage<K: Sink>(&mut self, sink: &mut K) -> bool {
        if self.stage_len == 0 {
            return true;
        }
        let rest = &self.stage[self.stage_pos..self.stage_len];
        if !sink.room(rest.len()) {
            return false;
        }
        let n = sink.take(rest);
        self.stage_pos += n;
        if self.stage_pos < self.stage_len {
            return false;
        }
        self.stage_len = 0;
        self.stage_pos = 0;
        true
    }

    /// Emits the pending `GOAWAY`, if any and if there is room.
    fn emit_goaway<K: Sink>(&mut self, sink: &mut K) {
        if let Some((last, code)) = self.goaway_out {
            let mut p = [0u8; 8];
            p[..4].copy_from_slice(&last.to_be_bytes());
            p[4..].copy_from_slice(&code.0.to_be_bytes());
            if self
                .emit_small(sink, FrameHeader::session(FrameKind::GoAway, 0, 8), &p)
                .is_some()
            {
                self.goaway_out = None;
            }
        }
    }

    /// Emits queued control frames (only the rest of a started one with
    /// `started_only`); true when that much is done.
    fn emit_control<K: Sink>(&mut self, sink: &mut K, started_only: bool) -> bool {
        let r = self.ctl_out_range();
        loop {
            let (start, end) = self.ctl_out;
            if start == end || (started_only && self.ctl_left == 0) {
                return true;
            }
            let q = &self.buf.as_ref()[r.start + start..r.start + end];
            let left = match self.ctl_left {
                0 => HEADER_LEN + u16::from_be_bytes([q[2], q[3]]) as usize,
                n => n,
            };
            if !sink.room(left) {
                return false;
            }
            let offer = if K::SPANS && !started_only {
                q.len()
            } else {
                left
            };
            let n = sink.take(&q[..offer]);
            // Follow the frame boundaries over what was taken.
            let (mut pos, mut rest) = (start, n);
            while rest > 0 {
                if self.ctl_left == 0 {
                    let q = &self.buf.as_ref()[r.start + pos..];
                    self.ctl_left = HEADER_LEN + u16::from_be_bytes([q[2], q[3]]) as usize;
                }
                let k = rest.min(self.ctl_left);
                self.ctl_left -= k;
                pos += k;
                rest -= k;
            }
            self.ctl_out = if pos == end { (0, 0) } else { (pos, end) };
            if n > 0 && self.ctl_blocked {
                self.ctl_blocked = false;
                self.unblocked = true;
            }
            if n < offer {
                return false;
            }
        }
    }

    /// Emits the transmit queue (only the rest of a started frame with
    /// `started_only`); true when that much is done.
    fn emit_tx<K: Sink>(&mut self, sink: &mut K, started_only: bool) -> bool {
        let r = self.tx_range();
        loop {
            if self.tx.len() == 0 || (started_only && self.tx_left == 0) {
                return true;
            }
            let left = match self.tx_left {
                0 => self.tx_head_frame_len(),
                n => n,
            };
            if !sink.room(left) {
                return false;
            }
            let (a, b) = self.tx.slices(&self.buf.as_ref()[r.clone()]);
            let offer = if K::SPANS && !started_only {
                a.len() + b.len()
            } else {
                left
            };
            let first = offer.min(a.len());
            let mut n = sink.take(&a[..first]);
            if n == first && offer > first {
                n += sink.take(&b[..offer - first]);
            }
            self.tx_advance(n);
            if n < offer {
                return false;
            }
        }
    }

    /// Length of the frame at the front of the transmit queue, which starts
    /// at a frame boundary.
    fn tx_head_frame_len(&self) -> usize {
        let mut h = [0u8; HEADER_LEN];
        self.tx.peek(&self.buf.as_ref()[self.tx_range()], &mut h);
        HEADER_LEN + u16::from_be_bytes([h[2], h[3]]) as usize
    }

    /// Drops `n` sent bytes from the transmit queue, following frame
    /// boundaries so that `tx_left` says how much of a started frame is left.
    fn tx_advance(&mut self, mut n: usize) {
        self.tx_sent += n as u64;
        while n > 0 {
            if self.tx_left == 0 {
                self.tx_left = self.tx_head_frame_len();
            }
            let k = n.min(self.tx_left);
            self.tx.consume(TX_CAPACITY, k);
            self.tx_left -= k;
            n -= k;
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.ctl_in_ready.is_some() && !self.ctl_event_sent {
            self.ctl_event_sent = true;
            return Some(Event::Control);
        }
        if self.goaway_event {
            self.goaway_event = false;
            if let Some((last, code)) = self.goaway_in {
                return Some(Event::GoAway { code, last });
            }
        }
        if self.unblocked {
            self.unblocked = false;
            return Some(Event::Unblocked);
        }
        if self.ev_slots > 0 {
            // Round robin from the cursor, wrapping once.
            let n = self.cfg.max_streams;
            let start = self.ev_cursor.min(n);
            let slots = self.slots.as_ref();
            let found = slots[start..]
                .iter()
                .position(|s| s.ev != 0)
                .map(|i| start + i)
                .or_else(|| slots[..start].iter().position(|s| s.ev != 0));
            if let Some(idx) = found {
                let s = &mut self.slots.as_mut()[idx];
                let id = s.sid();
                let (bit, ev) = if s.ev & EV_OPENED != 0 {
                    (EV_OPENED, Event::Opened(id))
                } else if s.ev & EV_RESET != 0 {
                    // A reset supersedes pending readable/writable events.
                    (
                        EV_RESET | EV_READABLE | EV_WRITABLE,
                        Event::Reset(id, s.reset.unwrap_or(ErrorCode::INTERNAL)),
                    )
                } else if s.ev & EV_READABLE != 0 {
                    (EV_READABLE, Event::Readable(id))
                } else {
                    (EV_WRITABLE, Event::Writable(id))
                };
                s.ev &= !bit;
                if s.ev == 0 {
                    self.ev_slots -= 1;
                    self.ev_cursor = if idx + 1 == n { 0 } else { idx + 1 };
                }
                return Some(ev);
            }
        }
        if self.close_event {
            self.close_event = false;
            if let SessionState::Closed(code) = self.state {
                return Some(Event::Closed(code));
            }
        }
        None
    }
    // ---------------------------------------------------------------- control

    /// The control message that waits, if any (see [`Event::Control`]). It has
    /// been checked to decode; call [`Mux::take_control`] when done with it.
    pub fn control(&self) -> Option<Control<'_>> {
        let len = self.ctl_in_ready?;
        let r = self.ctl_in_range();
        Control::decode(&self.buf.as_ref()[r.start..r.start + len]).ok()
    }

    /// The raw bytes of the waiting control message.
    pub fn control_bytes(&self) -> Option<&[u8]> {
        let len = self.ctl_in_ready?;
        let r = self.ctl_in_range();
        Some(&self.buf.as_ref()[r.start..r.start + len])
    }

    /// Drops the waiting control message, letting input resume.
    pub fn take_control(&mut self) {
        self.ctl_in_ready = None;
        self.ctl_event_sent = false;
    }

    /// Queues a control message.
    pub fn send_control(&mut self, msg: &Control<'_>) -> Result<(), ControlError> {
        if self.is_closed() {
            return Err(ControlError::Closed);
        }
        // The control queue is linear: it is only appended to and empties
        // completely before it is reused, so a message encodes in place.
        let (start, end) = self.ctl_out;
        let r = self.ctl_out_range();
        let mem = &mut self.buf.as_mut()[r];
        let body = &mut mem[(end + HEADER_LEN).min(CONTROL_OUT_CAPACITY)..];
        let n = match msg.encode(body) {
            Ok(b) => b.len(),
            Err(CodecError::TooLarge) if start != end || end != 0 => {
                self.ctl_blocked = true;
                return Err(ControlError::Blocked);
            }
            Err(e) => return Err(ControlError::Codec(e)),
        };
        let h = FrameHeader::session(FrameKind::Control, 0, n as u16);
        mem[end..end + HEADER_LEN].copy_from_slice(&h.encode());
        self.ctl_out = (start, end + HEADER_LEN + n);
        Ok(())
    }

    // ---------------------------------------------------------------- streams

    /// Opens a stream with `meta`.
    pub fn open(&mut self, meta: &StreamMeta<'_>) -> Result<StreamId, OpenError> {
        if self.state != SessionState::Open {
            return Err(OpenError::Closing);
        }
        let id = StreamId::new(self.next_local).ok_or(OpenError::IdsExhausted)?;
        let Some(idx) = self.free_slot() else {
            self.open_blocked = true;
            return Err(OpenError::TooManyStreams);
        };
        let r = self.region(idx);
        let len = {
            let mem = &mut self.buf.as_mut()[r.start..r.start + MAX_META];
            meta.encode(mem).map_err(OpenError::Meta)?.len()
        };
        let grant = self.cfg.window - INITIAL_WINDOW;
        let need = HEADER_LEN + len + if grant > 0 { HEADER_LEN + 4 } else { 0 };
        if self.tx.free(TX_CAPACITY) < need {
            self.open_blocked = true;
            self.tx_blocked = true;
            return Err(OpenError::Blocked);
        }
        let mut frame = [0u8; HEADER_LEN + MAX_META];
        frame[..HEADER_LEN]
            .copy_from_slice(&FrameHeader::stream(FrameKind::Open, 0, len as u16, id).encode());
        frame[HEADER_LEN..HEADER_LEN + len]
            .copy_from_slice(&self.buf.as_ref()[r.start..r.start + len]);
        self.push_tx(&frame[..HEADER_LEN + len]);
        if grant > 0 {
            // The first grant follows the OPEN in the same queue: a WINDOW must
            // never overtake the OPEN of its stream.
            let mut f = [0u8; HEADER_LEN + 4];
            f[..HEADER_LEN]
                .copy_from_slice(&FrameHeader::stream(FrameKind::Window, 0, 4, id).encode());
            f[HEADER_LEN..].copy_from_slice(&grant.to_be_bytes());
            self.push_tx(&f);
        }
        self.next_local = self.next_local.saturating_add(2);
        let s = &mut self.slots.as_mut()[idx];
        *s = Slot::EMPTY;
        s.id = id.get();
        s.meta_len = len as u16;
        s.recv_credit = self.cfg.window;
        s.send_credit = INITIAL_WINDOW;
        s.open_end = self.tx_pushed;
        self.live += 1;
        Ok(id)
    }

    fn push_tx(&mut self, bytes: &[u8]) {
        let r = self.tx_range();
        self.tx.push(&mut self.buf.as_mut()[r], bytes);
        self.tx_pushed += bytes.len() as u64;
    }

    /// The metadata of a held stream (what the opener sent).
    pub fn meta(&self, id: StreamId) -> Option<StreamMeta<'_>> {
        let idx = self.slots.as_ref().iter().position(|s| s.id == id.get())?;
        let s = &self.slots.as_ref()[idx];
        let start = self.region(idx).start;
        StreamMeta::decode(&self.buf.as_ref()[start..start + s.meta_len as usize]).ok()
    }

    /// Queues up to `data.len()` bytes on a stream; returns how many were
    /// taken, at least 1 for non-empty data, or [`StreamError::Blocked`].
    pub fn send(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        let idx = self.slot(id)?;
        let s = &self.slots.as_ref()[idx];
        if let Some(code) = s.reset {
            return Err(StreamError::Reset(code));
        }
        if s.send_fin {
            return Err(StreamError::Finished);
        }
        let mut sent = 0;
        while sent < data.len() {
            let credit = self.slots.as_ref()[idx].send_credit as usize;
            let space = self.tx.free(TX_CAPACITY).saturating_sub(HEADER_LEN);
            let n = (data.len() - sent).min(credit).min(space).min(MAX_PAYLOAD);
            if n == 0 {
                if space == 0 {
                    self.tx_blocked = true;
                }
                break;
            }
            let h = FrameHeader::stream(FrameKind::Data, 0, n as u16, id);
            self.push_tx(&h.encode());
            self.push_tx(&data[sent..sent + n]);
            self.slots.as_mut()[idx].send_credit -= n as u32;
            sent += n;
        }
        if sent < data.len() {
            self.slots.as_mut()[idx].blocked = true;
            if sent == 0 {
                return Err(StreamError::Blocked);
            }
        }
        Ok(sent)
    }

    /// Ends this side's direction of the stream (half-close).
    pub fn finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        let idx = self.slot(id)?;
        let s = &self.slots.as_ref()[idx];
        if let Some(code) = s.reset {
            return Err(StreamError::Reset(code));
        }
        if s.send_fin {
            return Ok(());
        }
        if self.tx.free(TX_CAPACITY) < HEADER_LEN {
            self.tx_blocked = true;
            let s = &mut self.slots.as_mut()[idx];
            s.blocked = true;
            s.fin_blocked = true;
            return Err(StreamError::Blocked);
        }
        self.push_tx(&FrameHeader::stream(FrameKind::Data, FLAG_FIN, 0, id).encode());
        self.slots.as_mut()[idx].send_fin = true;
        Ok(())
    }

    /// Copies received bytes of a stream into `out`.
    pub fn recv(&mut self, id: StreamId, out: &mut [u8]) -> Result<Recv, StreamError> {
        self.recv_with(id, |a, b| {
            let first = a.len().min(out.len());
            out[..first].copy_from_slice(&a[..first]);
            let second = b.len().min(out.len() - first);
            out[first..first + second].copy_from_slice(&b[..second]);
            first + second
        })
    }

    /// [`Mux::recv`] without a copy: `take` is shown the stream's received
    /// bytes in order, as up to two slices of its receive window (the second
    /// is empty unless they wrap around the window's end), and returns how
    /// many of them it consumed (at most their total; more is treated as
    /// all). Those bytes are gone and credit is granted for them as for
    /// [`Mux::recv`]. `take` is called only when there is at least one byte;
    /// `Recv::Data(0)` means it took none. For a caller that writes the
    /// bytes straight into a socket (`writev`).
    pub fn recv_with<F>(&mut self, id: StreamId, take: F) -> Result<Recv, StreamError>
    where
        F: FnOnce(&[u8], &[u8]) -> usize,
    {
        let idx = self.slot(id)?;
        let s = &self.slots.as_ref()[idx];
        if let Some(code) = s.reset {
            return Err(StreamError::Reset(code));
        }
        let queued = s.recv.len();
        if queued == 0 {
            return Ok(if s.recv_fin { Recv::Fin } else { Recv::Blocked });
        }
        let r = self.region(idx);
        let threshold = self.cfg.window / 4;
        let mem = &self.buf.as_ref()[r.start + MAX_META..r.end];
        let (a, b) = s.recv.slices(mem);
        let n = take(a, b).min(queued);
        let s = &mut self.slots.as_mut()[idx];
        s.recv.consume(r.end - r.start - MAX_META, n);
        s.unacked += n as u32;
        if s.unacked >= threshold && !s.recv_fin {
            s.grant_out += s.unacked;
            s.unacked = 0;
            self.owed = true;
        }
        Ok(Recv::Data(n))
    }

    /// Bytes waiting to be read on a stream.
    pub fn readable_len(&self, id: StreamId) -> usize {
        self.slots
            .as_ref()
            .iter()
            .find(|s| s.id == id.get())
            .map_or(0, |s| s.recv.len())
    }

    /// Resets a stream: both directions end, the peer is told `code`.
    pub fn reset(&mut self, id: StreamId, code: ErrorCode) -> Result<(), StreamError> {
        let idx = self.slot(id)?;
        if self.is_closed() {
            return Ok(());
        }
        self.reset_stream(idx, code);
        // The application asked for it: no event back.
        let s = &mut self.slots.as_mut()[idx];
        if s.ev & EV_RESET != 0 {
            s.ev &= !EV_RESET;
            if s.ev == 0 {
                self.ev_slots -= 1;
            }
        }
        Ok(())
    }

    /// The application is done with a stream. A stream that has not ended both
    /// ways is reset with `CANCEL`. The slot is reused once nothing is owed.
    pub fn release(&mut self, id: StreamId) {
        let Some(idx) = self.find(id) else { return };
        let s = &self.slots.as_ref()[idx];
        if !s.done() && !self.is_closed() {
            self.reset_stream(idx, ErrorCode::CANCEL);
        }
        let closed = self.is_closed();
        let s = &mut self.slots.as_mut()[idx];
        s.released = true;
        if closed {
            s.reset_out = None;
        }
        // The application has forgotten the id: nothing more is reported on it.
        if s.ev != 0 {
            s.ev = 0;
            self.ev_slots -= 1;
        }
        self.maybe_free(idx);
    }

    /// Starts draining (`NO_ERROR`) or closes the session at once (any other
    /// code). Either way, the peer is told with `GOAWAY`.
    pub fn goaway(&mut self, code: ErrorCode) {
        if self.is_closed() {
            return;
        }
        if code != ErrorCode::NO_ERROR {
            self.close_now(CloseReason::Local(code), true);
            return;
        }
        if self.goaway_out.is_none() && self.state == SessionState::Open {
            self.goaway_out = Some((self.last_remote, code));
            self.goaway_after = self.tx_pushed;
        }
        self.state = SessionState::Draining;
        self.check_drained();
    }
}

/// Where [`Mux::emit`] puts frames.
trait Sink {
    /// Whether one piece may be offered several frames at once (else exactly
    /// one frame, or the rest of a started one).
    const SPANS: bool;
    /// Whether a frame (or the rest of one) of `len` bytes may start now.
    fn room(&self, len: usize) -> bool;
    /// Takes a prefix of the non-empty `bytes`; returns its length.
    fn take(&mut self, bytes: &[u8]) -> usize;
}

/// [`Mux::poll_transmit`]: whole frames into a buffer.
struct BufSink<'a> {
    out: &'a mut [u8],
    w: usize,
}

impl Sink for BufSink<'_> {
    const SPANS: bool = false;
    fn room(&self, len: usize) -> bool {
        self.out.len() - self.w >= len
    }
    fn take(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.out.len() - self.w);
        self.out[self.w..self.w + n].copy_from_slice(&bytes[..n]);
        self.w += n;
        n
    }
}

/// [`Mux::transmit_with`]: any prefix of any piece, to a caller's function.
struct FnSink<F> {
    f: F,
    taken: usize,
}

impl<F: FnMut(&[u8]) -> usize> Sink for FnSink<F> {
    const SPANS: bool = true;
    fn room(&self, _len: usize) -> bool {
        true
    }
    fn take(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        // A sink that claims more than it was offered took all of it.
        let n = (self.f)(bytes).min(bytes.len());
        self.taken += n;
        n
    }
}
