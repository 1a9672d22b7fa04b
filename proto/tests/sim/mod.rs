//! A deterministic in-memory harness for two multiplexers talking to each other.
//!
//! [`Sim`] owns a client-role and a server-role [`Mux`], a simulated clock, a
//! one-way latency, a delivery mode (whole batches, fixed chunks, one byte at a
//! time, random chunks) and a tamper hook over the bytes in flight. Every byte
//! each side transmits and every byte each side consumes is parsed back into
//! frames and kept in a timeline, so tests can check what went over the wire.
//!
//! The application side of each stream is modelled by [`App`]: it writes from a
//! pending buffer and retries only after `Writable`, reads into a `Vec<u8>` only
//! after `Readable` (so a lost wake-up shows up as a stream that never ends),
//! finishes once its pending bytes are out, and releases the stream when both
//! directions are over.
//!
//! [`Sim::drive`] steps both sides until nothing moves and panics if that takes
//! more than [`Sim::step_limit`] steps, so a livelock fails instead of hanging.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, VecDeque};

use tether_proto::control::Control;
use tether_proto::frame::{write_frame, HeaderError, FLAG_FIN};
use tether_proto::mux::{OpenError, Recv, StreamError};
use tether_proto::{
    Config, ErrorCode, Event, FrameHeader, FrameKind, Millis, Mux, PeerAddr, Role, Slot, StreamId,
    StreamMeta, HEADER_LEN, INITIAL_WINDOW, MAX_FRAME,
};

/// The multiplexer type the harness runs.
pub type M = Mux<Vec<Slot>, Vec<u8>>;

/// Index of the client-role side.
pub const C: usize = 0;
/// Index of the server-role side.
pub const S: usize = 1;

/// The other side.
pub const fn peer(side: usize) -> usize {
    1 - side
}

/// A small configuration for tests: 8 streams, 32 KiB windows, default heartbeat.
pub fn small_cfg(role: Role) -> Config {
    Config {
        max_streams: 8,
        window: 2 * INITIAL_WINDOW,
        ..Config::new(role)
    }
}

/// A multiplexer over `Vec` storage.
pub fn new_mux(cfg: Config, now: Millis) -> M {
    Mux::new(
        cfg,
        vec![Slot::EMPTY; cfg.max_streams],
        vec![0u8; cfg.buffer_len()],
        now,
    )
    .expect("valid test config")
}

/// Stream metadata used by tests.
pub fn meta() -> StreamMeta<'static> {
    StreamMeta {
        endpoint: "web",
        peer: PeerAddr::V4([203, 0, 113, 7], 40_000),
        sni: Some("web.example.com"),
        client: None,
    }
}

/// `n` bytes of a pattern that depends on `seed` and the offset, so a byte out
/// of place or from another stream is noticed.
pub fn pattern(seed: u32, n: usize) -> Vec<u8> {
    pattern_at(seed, 0, n)
}

/// `n` bytes of the pattern for `seed`, starting at offset `from`.
pub fn pattern_at(seed: u32, from: usize, n: usize) -> Vec<u8> {
    (from..from + n)
        .map(|i| {
            let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (seed as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
            (x >> 29) as u8 ^ (i >> 8) as u8
        })
        .collect()
}

// ------------------------------------------------------------------- frames

/// A frame read back from the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Frame kind.
    pub kind: FrameKind,
    /// Flag bits.
    pub flags: u8,
    /// Stream id (0 for session frames).
    pub stream: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Frame {
    fn word(&self, i: usize) -> u32 {
        let p = &self.payload;
        u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]])
    }
    /// `(last, code)` of a `GOAWAY`.
    pub fn goaway(&self) -> Option<(u32, ErrorCode)> {
        (self.kind == FrameKind::GoAway).then(|| (self.word(0), ErrorCode(self.word(4))))
    }
    /// `(stream, code)` of a `RESET`.
    pub fn reset(&self) -> Option<(u32, ErrorCode)> {
        (self.kind == FrameKind::Reset).then(|| (self.stream, ErrorCode(self.word(0))))
    }
    /// `(stream, increment)` of a `WINDOW`.
    pub fn window(&self) -> Option<(u32, u32)> {
        (self.kind == FrameKind::Window).then(|| (self.stream, self.word(0)))
    }
    /// `(stream, len, fin)` of a `DATA`.
    pub fn data(&self) -> Option<(u32, usize, bool)> {
        (self.kind == FrameKind::Data).then_some((
            self.stream,
            self.payload.len(),
            self.flags & FLAG_FIN != 0,
        ))
    }
}

/// What the parser read: a frame, or a header that broke the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A well-formed frame.
    Frame(Frame),
    /// A header that `FrameHeader::decode` refused; nothing after it is parsed.
    Bad([u8; HEADER_LEN], HeaderError),
}

impl Parsed {
    /// The frame, if well-formed.
    pub fn frame(&self) -> Option<&Frame> {
        match self {
            Parsed::Frame(f) => Some(f),
            Parsed::Bad(..) => None,
        }
    }
}

/// An incremental frame parser built on [`FrameHeader::decode`].
#[derive(Clone, Debug, Default)]
pub struct FrameParser {
    buf: Vec<u8>,
    poisoned: bool,
}

impl FrameParser {
    /// Feeds bytes; returns the frames they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        if self.poisoned {
            return out;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            if self.buf.len() < HEADER_LEN {
                break;
            }
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&self.buf[..HEADER_LEN]);
            let hdr = match FrameHeader::decode(&h) {
                Ok(hdr) => hdr,
                Err(e) => {
                    out.push(Parsed::Bad(h, e));
                    self.poisoned = true;
                    self.buf.clear();
                    break;
                }
            };
            let total = HEADER_LEN + hdr.len as usize;
            if self.buf.len() < total {
                break;
            }
            let payload = self.buf[HEADER_LEN..total].to_vec();
            self.buf.drain(..total);
            out.push(Parsed::Frame(Frame {
                kind: hdr.kind,
                flags: hdr.flags,
                stream: hdr.stream.map_or(0, StreamId::get),
                payload,
            }));
        }
        out
    }

    /// Bytes of an incomplete frame held back.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Serializes frames back into bytes (for tamper hooks that rewrite a batch).
pub fn rebuild(frames: &[Frame]) -> Vec<u8> {
    frames
        .iter()
        .flat_map(|f| raw_frame(f.kind, f.flags, f.stream, &f.payload))
        .collect()
}

/// Parses a whole byte string into frames.
pub fn parse_all(bytes: &[u8]) -> Vec<Parsed> {
    FrameParser::default().push(bytes)
}

/// A stream id from a number (test helper).
pub fn sid(n: u32) -> StreamId {
    StreamId::new(n).unwrap()
}

/// Builds one legal-header frame with `write_frame`.
pub fn raw_frame(kind: FrameKind, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u16;
    let h = if stream == 0 {
        FrameHeader::session(kind, flags, len)
    } else {
        FrameHeader::stream(kind, flags, len, sid(stream))
    };
    let mut out = vec![0u8; HEADER_LEN + payload.len()];
    assert_eq!(write_frame(&mut out, h, payload), Some(out.len()));
    out
}

/// A header with arbitrary fields, legal or not.
pub fn raw_header(kind: u8, flags: u8, len: u16, stream: u32) -> Vec<u8> {
    let mut h = vec![kind, flags];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&stream.to_be_bytes());
    h
}

/// `DATA` on `stream`.
pub fn data_frame(stream: u32, fin: bool, payload: &[u8]) -> Vec<u8> {
    raw_frame(
        FrameKind::Data,
        if fin { FLAG_FIN } else { 0 },
        stream,
        payload,
    )
}

/// `OPEN` of `stream` with the test metadata.
pub fn open_frame(stream: u32) -> Vec<u8> {
    let mut buf = [0u8; tether_proto::MAX_META];
    let m = meta().encode(&mut buf).unwrap().to_vec();
    raw_frame(FrameKind::Open, 0, stream, &m)
}

/// `WINDOW` on `stream`.
pub fn window_frame(stream: u32, inc: u32) -> Vec<u8> {
    raw_frame(FrameKind::Window, 0, stream, &inc.to_be_bytes())
}

/// `RESET` on `stream`.
pub fn reset_frame(stream: u32, code: ErrorCode) -> Vec<u8> {
    raw_frame(FrameKind::Reset, 0, stream, &code.0.to_be_bytes())
}

/// `PING`, or its `ACK`.
pub fn ping_frame(ack: bool, opaque: [u8; 8]) -> Vec<u8> {
    raw_frame(FrameKind::Ping, ack as u8, 0, &opaque)
}

/// `CONTROL` carrying `msg`.
pub fn control_frame(msg: &Control<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; tether_proto::MAX_CONTROL];
    let body = msg.encode(&mut buf).unwrap().to_vec();
    raw_frame(FrameKind::Control, 0, 0, &body)
}

/// `GOAWAY(last, code)`.
pub fn goaway_frame(last: u32, code: ErrorCode) -> Vec<u8> {
    let mut p = last.to_be_bytes().to_vec();
    p.extend_from_slice(&code.0.to_be_bytes());
    raw_frame(FrameKind::GoAway, 0, 0, &p)
}

// ------------------------------------------------------------------- the app

/// The application's view of one stream.
#[derive(Clone, Debug, Default)]
pub struct App {
    /// Bytes read so far.
    pub received: Vec<u8>,
    /// `recv` returned `Fin`.
    pub fin_received: bool,
    /// The stream was reset, with this code (from an event or an error).
    pub reset: Option<ErrorCode>,
    /// Every byte the test asked to write, in order.
    pub written: Vec<u8>,
    /// How much of `written` the mux has taken.
    pub sent: usize,
    /// Call `finish` once every written byte is taken.
    pub finish_requested: bool,
    /// `finish` succeeded.
    pub finished: bool,
    /// Whether the reader reads at all (false: a stalled reader).
    pub reading: bool,
    /// Bytes the reader may still read (`None`: no limit).
    pub read_budget: Option<usize>,
    /// Size of the buffer passed to `recv`.
    pub read_chunk: usize,
    /// A `Readable` event arrived and `recv` has not returned `Blocked` since.
    pub readable: bool,
    /// A send or finish returned `Blocked` and no `Writable` came since.
    pub waiting_writable: bool,
    /// Release the stream once both directions are over or it was reset.
    pub auto_release: bool,
    /// `release` was called.
    pub released: bool,
    /// The peer opened this stream.
    pub remote: bool,
    /// The most bytes ever waiting in the mux for this stream (`readable_len`).
    pub max_buffered: usize,
}

impl App {
    fn new(remote: bool, reading: bool) -> App {
        App {
            reading,
            read_chunk: 4096,
            auto_release: true,
            remote,
            ..App::default()
        }
    }
    /// Bytes written by the test and not yet taken by the mux.
    pub fn unsent(&self) -> usize {
        self.written.len() - self.sent
    }
    /// Both directions ended or the stream was reset.
    pub fn over(&self) -> bool {
        self.reset.is_some() || (self.fin_received && self.finished)
    }
}

/// How arrived bytes are handed to `handle_input`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Everything that arrived, in one call.
    Whole,
    /// Calls of at most this many bytes.
    Chunks(usize),
    /// One byte per call.
    Bytewise,
    /// Calls of 1 ..= max bytes, from the sim's random generator.
    Random(usize),
}

/// A tiny deterministic random generator (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number in `lo ..= hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// Direction of a timeline entry, seen from the side that did it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The side transmitted the frame (before any tampering).
    Tx,
    /// The side consumed the frame with `handle_input`.
    Rx,
}

/// One frame in the timeline.
#[derive(Clone, Debug)]
pub struct Wire {
    /// The side that sent or consumed it.
    pub side: usize,
    /// Whether it was sent or consumed.
    pub dir: Dir,
    /// What it was.
    pub parsed: Parsed,
    /// Clock at that moment.
    pub at: Millis,
}

/// One side: the mux, the bytes on their way to it, and what it saw.
pub struct Side {
    /// The multiplexer.
    pub mux: M,
    /// Bytes on their way to this side, with their arrival time, in order.
    pub inbox: VecDeque<(Millis, Vec<u8>)>,
    /// Bytes that arrived and were not consumed yet.
    pub pending_in: Vec<u8>,
    /// Every event, in order.
    pub events: Vec<Event>,
    /// Streams the application knows.
    pub apps: BTreeMap<u32, App>,
    /// Raw payloads of control messages received, in order.
    pub controls: Vec<Vec<u8>>,
    /// Take each control message as soon as it is seen.
    pub auto_take_control: bool,
    /// Whether new streams opened by the peer start with a reading app.
    pub read_new_streams: bool,
    /// The read budget of new streams opened by the peer (`None`: no limit).
    pub new_read_budget: Option<usize>,
    /// `Closed` was seen, with this code.
    pub closed: Option<ErrorCode>,
    /// Every byte transmitted, before tampering.
    pub wire_out: Vec<u8>,
    /// Bytes consumed by `handle_input`.
    pub consumed: usize,
    /// Bytes this side transmits are dropped (the link is cut one way).
    pub mute: bool,
    tx_parser: FrameParser,
    rx_parser: FrameParser,
}

impl Side {
    fn new(cfg: Config, now: Millis) -> Side {
        Side {
            mux: new_mux(cfg, now),
            inbox: VecDeque::new(),
            pending_in: Vec::new(),
            events: Vec::new(),
            apps: BTreeMap::new(),
            controls: Vec::new(),
            auto_take_control: true,
            read_new_streams: true,
            new_read_budget: None,
            closed: None,
            wire_out: Vec::new(),
            consumed: 0,
            mute: false,
            tx_parser: FrameParser::default(),
            rx_parser: FrameParser::default(),
        }
    }

    /// The app of stream `id`.
    pub fn app(&self, id: StreamId) -> &App {
        self.apps
            .get(&id.get())
            .unwrap_or_else(|| panic!("no app for {id}"))
    }

    /// The app of stream `id`, mutably.
    pub fn app_mut(&mut self, id: StreamId) -> &mut App {
        self.apps
            .get_mut(&id.get())
            .unwrap_or_else(|| panic!("no app for {id}"))
    }

    /// Whether any bytes are still on their way to this side or unconsumed.
    pub fn has_input(&self) -> bool {
        !self.inbox.is_empty() || !self.pending_in.is_empty()
    }
}

type Tamper = Box<dyn FnMut(usize, &mut Vec<u8>)>;

/// Two multiplexers, a clock and the link between them.
pub struct Sim {
    /// The simulated clock.
    pub now: Millis,
    /// One-way latency of the link, in ms.
    pub latency_ms: u64,
    /// How arrived bytes are handed over.
    pub delivery: Delivery,
    /// Client (`C`) and server (`S`).
    pub sides: [Side; 2],
    /// Sees and may change every batch of bytes a side transmits
    /// (`from`, bytes) before it is put on the link.
    pub tamper: Option<Tamper>,
    /// `drive` panics after this many steps without settling.
    pub step_limit: usize,
    /// Size of the buffer passed to `poll_transmit` (at least `MAX_FRAME`).
    pub tx_buf: usize,
    /// Call `poll_transmit` once per step instead of until it returns 0, so
    /// the apps refill the queue between calls (as an async driver does).
    pub single_poll: bool,
    /// Transmit with `transmit_with` and a sink that takes random prefixes
    /// of what it is offered (at most `tx_buf` bytes per call), as a
    /// non-blocking pipe does, instead of `poll_transmit`: frames go out in
    /// pieces and must be continued before any other frame.
    pub partial_sink: bool,
    /// Every frame sent and consumed, in order.
    pub timeline: Vec<Wire>,
    /// Random generator for `Delivery::Random`.
    pub rng: Rng,
    /// Steps taken so far.
    pub steps: usize,
}

impl Sim {
    /// A pair with the given configurations (roles are taken from them).
    pub fn new(client: Config, server: Config) -> Sim {
        assert_eq!(client.role, Role::Client);
        assert_eq!(server.role, Role::Server);
        let now = Millis(1_000);
        Sim {
            now,
            latency_ms: 0,
            delivery: Delivery::Whole,
            sides: [Side::new(client, now), Side::new(server, now)],
            tamper: None,
            step_limit: 20_000,
            tx_buf: MAX_FRAME,
            single_poll: false,
            partial_sink: false,
            timeline: Vec::new(),
            rng: Rng::new(7),
            steps: 0,
        }
    }

    /// A pair with [`small_cfg`] on both sides.
    pub fn small() -> Sim {
        Sim::new(small_cfg(Role::Client), small_cfg(Role::Server))
    }

    /// The multiplexer of `side`.
    pub fn mux(&mut self, side: usize) -> &mut M {
        &mut self.sides[side].mux
    }

    /// The app of stream `id` on `side`.
    pub fn app(&self, side: usize, id: StreamId) -> &App {
        self.sides[side].app(id)
    }

    /// The app of stream `id` on `side`, mutably.
    pub fn app_mut(&mut self, side: usize, id: StreamId) -> &mut App {
        self.sides[side].app_mut(id)
    }

    /// Opens a stream on `side` with the test metadata.
    pub fn open(&mut self, side: usize) -> Result<StreamId, OpenError> {
        let id = self.sides[side].mux.open(&meta())?;
        let prev = self.sides[side]
            .apps
            .insert(id.get(), App::new(false, true));
        assert!(prev.is_none(), "{id} opened twice");
        Ok(id)
    }

    /// Queues `data` on stream `id` of `side` (the app writes it as credit allows).
    pub fn write(&mut self, side: usize, id: StreamId, data: &[u8]) {
        self.app_mut(side, id).written.extend_from_slice(data);
    }

    /// Asks `side` to finish stream `id` once its written bytes are out.
    pub fn finish(&mut self, side: usize, id: StreamId) {
        self.app_mut(side, id).finish_requested = true;
    }

    /// Puts raw bytes on the link towards `to`, after what is already in flight.
    pub fn inject(&mut self, to: usize, bytes: &[u8]) {
        let at = self.sides[to]
            .inbox
            .back()
            .map_or(self.now, |(t, _)| (*t).max(self.now));
        self.sides[to].inbox.push_back((at, bytes.to_vec()));
    }

    /// Frames `side` transmitted (before tampering), in order.
    pub fn sent_frames(&self, side: usize) -> Vec<Frame> {
        self.timeline
            .iter()
            .filter(|w| w.side == side && w.dir == Dir::Tx)
            .filter_map(|w| w.parsed.frame().cloned())
            .collect()
    }

    /// Frames `side` consumed, in order (a refused header ends the list).
    pub fn consumed_frames(&self, side: usize) -> Vec<Parsed> {
        self.timeline
            .iter()
            .filter(|w| w.side == side && w.dir == Dir::Rx)
            .map(|w| w.parsed.clone())
            .collect()
    }

    /// The `GOAWAY`s `side` transmitted.
    pub fn goaways_sent(&self, side: usize) -> Vec<(u32, ErrorCode)> {
        self.sent_frames(side)
            .iter()
            .filter_map(Frame::goaway)
            .collect()
    }

    /// The `RESET`s `side` transmitted.
    pub fn resets_sent(&self, side: usize) -> Vec<(u32, ErrorCode)> {
        self.sent_frames(side)
            .iter()
            .filter_map(Frame::reset)
            .collect()
    }

    // --------------------------------------------------------------- stepping

    /// Calls `handle_timeout` on `side` if its deadline has passed.
    pub fn timers(&mut self, side: usize) -> bool {
        let now = self.now;
        let mux = &mut self.sides[side].mux;
        match mux.poll_timeout() {
            Some(t) if t <= now => {
                mux.handle_timeout(now);
                true
            }
            _ => false,
        }
    }

    /// Lets the apps of `side` write, finish, read and release.
    pub fn pump(&mut self, side: usize) -> bool {
        let mut progress = false;
        let sd = &mut self.sides[side];
        let ids: Vec<u32> = sd.apps.keys().copied().collect();
        let mut buf = Vec::new();
        for raw in ids {
            let id = sid(raw);
            let app = sd.apps.get_mut(&raw).unwrap();
            if app.released {
                continue;
            }
            // write
            while app.reset.is_none() && !app.waiting_writable && app.unsent() > 0 {
                match sd.mux.send(id, &app.written[app.sent..]) {
                    Ok(n) => {
                        assert!(n > 0, "send took 0 bytes without Blocked");
                        app.sent += n;
                        progress = true;
                    }
                    Err(StreamError::Blocked) => app.waiting_writable = true,
                    Err(StreamError::Reset(c)) => {
                        app.reset.get_or_insert(c);
                    }
                    Err(e) => panic!("send on {id}: {e}"),
                }
            }
            if app.reset.is_none()
                && app.finish_requested
                && !app.finished
                && !app.waiting_writable
                && app.unsent() == 0
            {
                match sd.mux.finish(id) {
                    Ok(()) => {
                        app.finished = true;
                        progress = true;
                    }
                    Err(StreamError::Blocked) => app.waiting_writable = true,
                    Err(StreamError::Reset(c)) => {
                        app.reset.get_or_insert(c);
                    }
                    Err(e) => panic!("finish on {id}: {e}"),
                }
            }
            // read
            while app.reset.is_none() && app.reading && app.readable && app.read_budget != Some(0) {
                let want = app
                    .read_chunk
                    .min(app.read_budget.unwrap_or(usize::MAX))
                    .max(1);
                buf.resize(want, 0);
                match sd.mux.recv(id, &mut buf) {
                    Ok(Recv::Data(n)) => {
                        assert!(
                            n > 0 && n <= want,
                            "recv returned {n} for a buffer of {want}"
                        );
                        app.received.extend_from_slice(&buf[..n]);
                        if let Some(b) = app.read_budget.as_mut() {
                            *b -= n;
                        }
                        progress = true;
                    }
                    Ok(Recv::Fin) => {
                        if !app.fin_received {
                            progress = true;
                        }
                        app.fin_received = true;
                        app.readable = false;
                    }
                    Ok(Recv::Blocked) => app.readable = false,
                    Err(StreamError::Reset(c)) => {
                        app.reset.get_or_insert(c);
                    }
                    Err(e) => panic!("recv on {id}: {e}"),
                }
            }
            // release
            if app.auto_release && app.over() && !app.released {
                sd.mux.release(id);
                app.released = true;
                progress = true;
            }
        }
        progress
    }

    /// Drains `poll_transmit` of `side` onto the link.
    pub fn transmit(&mut self, side: usize) -> bool {
        let mut out = vec![0u8; self.tx_buf];
        let mut batch = Vec::new();
        loop {
            let n = if self.partial_sink {
                let (rng, cap) = (&mut self.rng, self.tx_buf);
                let mut taken = 0;
                let n = self.sides[side].mux.transmit_with(|bytes| {
                    assert!(!bytes.is_empty(), "transmit_with offered nothing");
                    let max = bytes.len().min(cap - taken);
                    // The first piece of a call is always taken in part at
                    // least (else 0 would read as "nothing to send").
                    let k = match (taken, max) {
                        (_, 0) => 0,
                        (0, _) => rng.range(1, max),
                        _ if rng.next() % 4 == 0 => 0,
                        _ if rng.next() % 2 == 0 => max,
                        _ => rng.range(0, max),
                    };
                    batch.extend_from_slice(&bytes[..k]);
                    taken += k;
                    k
                });
                assert_eq!(n, taken, "transmit_with miscounted");
                n
            } else {
                let n = self.sides[side].mux.poll_transmit(&mut out);
                assert!(n <= out.len());
                batch.extend_from_slice(&out[..n]);
                n
            };
            if n == 0 {
                break;
            }
            assert!(batch.len() < 64 << 20, "poll_transmit never returns 0");
            if self.single_poll {
                break;
            }
        }
        if batch.is_empty() {
            return false;
        }
        let sd = &mut self.sides[side];
        sd.wire_out.extend_from_slice(&batch);
        for p in sd.tx_parser.push(&batch) {
            self.timeline.push(Wire {
                side,
                dir: Dir::Tx,
                parsed: p,
                at: self.now,
            });
        }
        if !self.partial_sink {
            assert_eq!(
                sd.tx_parser.pending(),
                0,
                "poll_transmit wrote a partial frame"
            );
        }
        if let Some(t) = self.tamper.as_mut() {
            t(side, &mut batch);
        }
        if !self.sides[side].mute && !batch.is_empty() {
            let to = peer(side);
            let at = self.now.add(self.latency_ms);
            let at = self.sides[to]
                .inbox
                .back()
                .map_or(at, |(t, _)| (*t).max(at));
            self.sides[to].inbox.push_back((at, batch));
        }
        true
    }

    /// Hands up to `max` arrived bytes to `side`'s `handle_input`.
    pub fn deliver(&mut self, side: usize, max: usize) -> bool {
        let now = self.now;
        let mut progress = false;
        let sd = &mut self.sides[side];
        while sd.inbox.front().is_some_and(|(t, _)| *t <= now) {
            let (_, b) = sd.inbox.pop_front().unwrap();
            sd.pending_in.extend_from_slice(&b);
        }
        let mut budget = max.min(sd.pending_in.len());
        let mut offset = 0;
        // An empty call resumes a header held back by backpressure.
        if budget == 0 {
            sd.mux.handle_input(now, &[]);
        }
        while budget > 0 {
            let chunk = match self.delivery {
                Delivery::Whole => budget,
                Delivery::Chunks(k) => k.max(1).min(budget),
                Delivery::Bytewise => 1,
                Delivery::Random(k) => self.rng.range(1, k.max(1)).min(budget),
            };
            let input = &sd.pending_in[offset..offset + chunk];
            let n = sd.mux.handle_input(now, input);
            assert!(n <= chunk, "handle_input consumed more than given");
            for p in sd.rx_parser.push(&sd.pending_in[offset..offset + n]) {
                self.timeline.push(Wire {
                    side,
                    dir: Dir::Rx,
                    parsed: p,
                    at: now,
                });
            }
            offset += n;
            budget -= n;
            sd.consumed += n;
            // Memory bound, checked after every call, not only every step.
            let in_use = sd.mux.buffered();
            let bound = sd.mux.config().buffer_len();
            assert!(
                in_use <= bound,
                "side {side} uses {in_use} bytes of its buffer, bound {bound}"
            );
            let window = sd.mux.config().window as usize;
            for (&raw, app) in sd.apps.iter_mut().filter(|(_, a)| !a.released) {
                let buffered = sd.mux.readable_len(sid(raw));
                assert!(
                    buffered <= window,
                    "side {side} buffers {buffered} bytes on stream {raw}, window {window}"
                );
                app.max_buffered = app.max_buffered.max(buffered);
            }
            if n > 0 {
                progress = true;
            }
            if n < chunk {
                break; // backpressure: keep the rest for later
            }
        }
        sd.pending_in.drain(..offset);
        progress
    }

    /// Polls every event of `side` and lets the app react.
    pub fn poll_events(&mut self, side: usize) -> bool {
        let mut progress = false;
        let read_new = self.sides[side].read_new_streams;
        let budget = self.sides[side].new_read_budget;
        let sd = &mut self.sides[side];
        while let Some(ev) = sd.mux.poll_event() {
            progress = true;
            sd.events.push(ev);
            assert!(sd.events.len() < 10_000_000, "event storm");
            match ev {
                Event::Opened(id) => {
                    assert!(sd.mux.meta(id).is_some(), "Opened({id}) without metadata");
                    let mut app = App::new(true, read_new);
                    app.read_budget = budget;
                    let prev = sd.apps.insert(id.get(), app);
                    assert!(prev.is_none(), "Opened({id}) twice");
                }
                Event::Readable(id) => sd.app_mut(id).readable = true,
                Event::Writable(id) => sd.app_mut(id).waiting_writable = false,
                Event::Reset(id, code) => {
                    sd.app_mut(id).reset.get_or_insert(code);
                }
                Event::Control => {
                    let bytes = sd
                        .mux
                        .control_bytes()
                        .expect("Control event without a message")
                        .to_vec();
                    assert!(
                        sd.mux.control().is_some(),
                        "Control event with an undecodable message"
                    );
                    sd.controls.push(bytes);
                    if sd.auto_take_control {
                        sd.mux.take_control();
                    }
                }
                Event::Unblocked | Event::GoAway { .. } => {}
                Event::Closed(code) => {
                    assert!(sd.closed.is_none(), "Closed twice");
                    sd.closed = Some(code);
                }
            }
        }
        progress
    }

    /// Checks what must hold after every step.
    pub fn check_invariants(&mut self) {
        for side in [C, S] {
            let sd = &mut self.sides[side];
            let window = sd.mux.config().window as usize;
            for (&raw, app) in sd.apps.iter_mut() {
                if app.released {
                    continue;
                }
                let buffered = sd.mux.readable_len(sid(raw));
                assert!(
                    buffered <= window,
                    "side {side} buffers {buffered} bytes on stream {raw}, window {window}"
                );
                app.max_buffered = app.max_buffered.max(buffered);
            }
            assert!(
                sd.mux.live_streams() <= sd.mux.config().max_streams,
                "side {side} holds more streams than configured"
            );
            let (in_use, bound) = (sd.mux.buffered(), sd.mux.config().buffer_len());
            assert!(
                in_use <= bound,
                "side {side} uses {in_use} bytes of its buffer, bound {bound}"
            );
        }
    }

    /// One step of both sides. Returns whether anything moved.
    pub fn step(&mut self) -> bool {
        self.steps += 1;
        let mut progress = false;
        for side in [C, S] {
            progress |= self.timers(side);
            progress |= self.pump(side);
        }
        for side in [C, S] {
            progress |= self.transmit(side);
        }
        for side in [C, S] {
            progress |= self.deliver(side, usize::MAX);
            progress |= self.poll_events(side);
        }
        self.check_invariants();
        progress
    }

    /// The earliest arrival of bytes in flight, if any.
    pub fn next_arrival(&self) -> Option<Millis> {
        self.sides
            .iter()
            .filter_map(|s| s.inbox.front().map(|(t, _)| *t))
            .min()
    }

    /// Steps until nothing moves (the clock only advances to let bytes in
    /// flight arrive). Panics if it does not settle within `step_limit` steps.
    pub fn drive(&mut self) {
        for _ in 0..self.step_limit {
            if self.step() {
                continue;
            }
            match self.next_arrival() {
                Some(t) if t > self.now => self.now = t,
                _ => return,
            }
        }
        panic!(
            "drive did not settle within {} steps (client {:?}, server {:?})",
            self.step_limit, self.sides[C].mux, self.sides[S].mux
        );
    }

    /// Runs for `ms` of simulated time: drives, then jumps to the next
    /// deadline or arrival, honouring the heartbeat timers on the way.
    pub fn run_for(&mut self, ms: u64) {
        let end = self.now.add(ms);
        for _ in 0..self.step_limit {
            self.drive();
            let next = [
                self.sides[C].mux.poll_timeout(),
                self.sides[S].mux.poll_timeout(),
                self.next_arrival(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= end => self.now = self.now.max(t),
                _ => {
                    self.now = end;
                    self.drive();
                    return;
                }
            }
        }
        panic!(
            "run_for did not reach its end within {} rounds",
            self.step_limit
        );
    }

    /// Whether both sides settled: nothing in flight or pending, nothing to
    /// transmit. (A final check: bytes it polls are not delivered.)
    pub fn quiet(&mut self) -> bool {
        let mut out = vec![0u8; MAX_FRAME];
        let idle = [C, S].into_iter().all(|s| !self.sides[s].has_input());
        let c = self.sides[C].mux.poll_transmit(&mut out);
        let s = self.sides[S].mux.poll_transmit(&mut out);
        idle && c == 0 && s == 0
    }

    /// Checks, from the timeline, that `sender` never had more bytes in flight
    /// on any stream than the credit its peer had granted and it had received
    /// (`INITIAL_WINDOW` plus every `WINDOW` it consumed). Returns the total
    /// of `DATA` bytes checked, so a test can tell it checked something.
    pub fn assert_credit_respected(&self, sender: usize) -> u64 {
        let mut granted: BTreeMap<u32, u64> = BTreeMap::new();
        let mut sent: BTreeMap<u32, u64> = BTreeMap::new();
        let mut total = 0;
        for w in self.timeline.iter().filter(|w| w.side == sender) {
            let Some(f) = w.parsed.frame() else { continue };
            match (w.dir, f.kind) {
                (Dir::Rx, FrameKind::Window) => {
                    *granted.entry(f.stream).or_insert(INITIAL_WINDOW as u64) +=
                        f.window().unwrap().1 as u64;
                }
                (Dir::Tx, FrameKind::Data) => {
                    let s = sent.entry(f.stream).or_insert(0);
                    *s += f.payload.len() as u64;
                    let g = *granted.entry(f.stream).or_insert(INITIAL_WINDOW as u64);
                    assert!(
                        *s <= g,
                        "side {sender} sent {} bytes on stream {} with only {g} granted (at {:?})",
                        *s,
                        f.stream,
                        w.at
                    );
                    total += f.payload.len() as u64;
                }
                _ => {}
            }
        }
        total
    }
}
