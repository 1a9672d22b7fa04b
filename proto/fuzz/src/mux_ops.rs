//! The `mux_ops` target: sequences of multiplexer operations (PROTOCOL.md sections 3, 4, 7).
//!
//! Two modes, chosen by the input:
//! - **solo**: one server-role [`Mux`] is fed arbitrary bytes and hand-built
//!   frames (so the fuzzer gets past the header checks quickly) with advancing
//!   time, interleaved with every application call and `poll_*`.
//! - **paired**: a client and a server mux talk through two in-memory wires on
//!   a shared simulated clock; what one side transmits is what the other reads,
//!   unless the input mutates it on the way.
//!
//! Invariants checked after every step, in both modes:
//! - nothing panics (debug assertions and overflow checks are on);
//! - `readable_len(id) <= config.window` for every stream that may be held,
//!   `live_streams() <= max_streams`, and `buffered() <= buffer_len()` over
//!   storage whose size never changes;
//! - `poll_transmit` returns at most the buffer's length and writes only whole
//!   frames that `FrameHeader::decode` accepts, whose payloads are legal
//!   (`OPEN` metadata and `CONTROL` messages decode, `WINDOW` > 0), with
//!   increasing `OPEN` ids of the right parity, no `DATA` after `FIN` and
//!   nothing after a `GOAWAY` with an error code;
//! - events are coherent (`Opened` once per id with readable metadata, one
//!   `Closed`, `Control` only with a message that decodes).
//!
//! While no byte on the wire has been mutated (a *clean* paired run), the two
//! sides also must not accuse each other: no session closes for a protocol
//! violation, no stream is reset with `PROTOCOL`, `FLOW_CONTROL`,
//! `STREAM_CLOSED` or `FRAME_SIZE` (the application here never uses those
//! codes), every byte read is the byte sent (a per-stream pattern), a bounded
//! drive settles (no livelock), and afterwards every live stream holds exactly
//! the bytes its peer sent and it has not read yet.

use arbitrary::Arbitrary;
use tether_proto::control::Secret;
use tether_proto::frame::{FrameHeader, FrameKind, FLAG_FIN};
use tether_proto::mux::{CloseReason, Recv};
use tether_proto::{
    ClientCert, Config, Control, EndpointKind, ErrorCode, Event, Millis, Mux, PeerAddr, Role, Slot,
    StreamId, StreamMeta, HEADER_LEN, MAX_FRAME, MAX_PAYLOAD, MAX_WINDOW,
};

// ------------------------------------------------------------------ input

/// One fuzz input: a mode, its configs and a sequence of operations.
#[derive(Arbitrary, Debug)]
pub enum Input {
    /// One server-role mux fed bytes from an imaginary peer.
    Solo {
        /// The server's config.
        cfg: CfgSpec,
        /// What happens, in order.
        ops: Vec<SoloOp>,
    },
    /// A client and a server mux over two in-memory wires.
    Paired {
        /// The client's config.
        client: CfgSpec,
        /// The server's config.
        server: CfgSpec,
        /// What happens, in order.
        ops: Vec<PairOp>,
    },
}

/// Small configs: 1..=4 streams, a window of 16384..=65536 bytes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct CfgSpec {
    pub streams: u8,
    pub window: u16,
    pub ping: u16,
    pub dead: u16,
}

impl CfgSpec {
    fn config(self, role: Role) -> Config {
        let ping = 1000 + u64::from(self.ping % 30_000);
        Config {
            role,
            max_streams: 1 + usize::from(self.streams % 4),
            window: 16_384 + u32::from(self.window) % (65_536 - 16_384 + 1),
            ping_interval_ms: ping,
            dead_after_ms: ping + 1 + u64::from(self.dead % 60_000),
        }
    }
}

/// Which stream an application call names.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Sel {
    /// One this side knows of (opened it, or saw `Opened`), by index.
    Known(u8),
    /// Any small id, held or not.
    Raw(u8),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum AppOp {
    Open(MetaSpec),
    Send { s: Sel, len: u16 },
    Recv { s: Sel, len: u16 },
    Finish(Sel),
    Reset { s: Sel, code: u32 },
    Release(Sel),
    GoAway { error: bool, code: u32 },
    SendControl(CtlSpec),
    TakeControl,
    HandleTimeout,
    PollEvent,
    DrainEvents,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct MetaSpec {
    pub endpoint: String,
    pub peer: PeerSpec,
    pub sni: Option<String>,
    pub subject: Option<String>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum PeerSpec {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
    Unknown,
}

impl MetaSpec {
    fn meta(&self) -> StreamMeta<'_> {
        StreamMeta {
            endpoint: &self.endpoint,
            peer: match self.peer {
                PeerSpec::V4(a, p) => PeerAddr::V4(a, p),
                PeerSpec::V6(a, p) => PeerAddr::V6(a, p),
                PeerSpec::Unknown => PeerAddr::Unknown,
            },
            sni: self.sni.as_deref(),
            client: self.subject.as_deref().map(|subject| ClientCert {
                subject,
                common_name: subject,
                names: "",
                sha256: [0; 32],
            }),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum CtlSpec {
    Hello {
        version: u16,
        min_version: u16,
        token: String,
        agent: String,
        arch: String,
    },
    Welcome {
        version: u16,
        session: u64,
        edge: String,
    },
    Error {
        code: u32,
        retry_after_ms: u32,
        message: String,
    },
    Bind {
        endpoint: String,
        tls: bool,
        url: String,
        upstream: String,
        policy: String,
    },
    BindOk {
        endpoint: String,
        url: String,
    },
    BindErr {
        endpoint: String,
        code: u32,
        rule: String,
        message: String,
    },
    RotateOffer {
        token_id: String,
        token: String,
    },
    RotateStored {
        token_id: String,
    },
    RotateConfirmed {
        token_id: String,
    },
    Unbind {
        endpoint: String,
    },
}

impl CtlSpec {
    fn control(&self) -> Control<'_> {
        match self {
            CtlSpec::Hello {
                version,
                min_version,
                token,
                agent,
                arch,
            } => Control::Hello {
                version: *version,
                min_version: *min_version,
                token: Secret(token),
                agent,
                arch,
            },
            CtlSpec::Welcome {
                version,
                session,
                edge,
            } => Control::Welcome {
                version: *version,
                session: *session,
                edge,
            },
            CtlSpec::Error {
                code,
                retry_after_ms,
                message,
            } => Control::Error {
                code: *code,
                retry_after_ms: *retry_after_ms,
                message,
            },
            CtlSpec::Bind {
                endpoint,
                tls,
                url,
                upstream,
                policy,
            } => Control::Bind {
                endpoint,
                kind: if *tls {
                    EndpointKind::Tls
                } else {
                    EndpointKind::Tcp
                },
                url,
                upstream,
                policy,
            },
            CtlSpec::BindOk { endpoint, url } => Control::BindOk { endpoint, url },
            CtlSpec::BindErr {
                endpoint,
                code,
                rule,
                message,
            } => Control::BindErr {
                endpoint,
                code: *code,
                rule,
                message,
            },
            CtlSpec::RotateOffer { token_id, token } => Control::RotateOffer {
                token_id,
                token: Secret(token),
            },
            CtlSpec::RotateStored { token_id } => Control::RotateStored { token_id },
            CtlSpec::RotateConfirmed { token_id } => Control::RotateConfirmed { token_id },
            CtlSpec::Unbind { endpoint } => Control::Unbind { endpoint },
        }
    }
}

/// A frame built from parts: well-formed enough to reach the mux's state
/// machine, or deliberately not (any kind byte, flags, stream or length).
#[derive(Arbitrary, Debug, Clone)]
pub enum FrameSpec {
    Data {
        s: u8,
        fin: bool,
        len: u16,
    },
    Open {
        s: u8,
        meta: MetaSpec,
    },
    Window {
        s: u8,
        inc: u32,
    },
    Reset {
        s: u8,
        code: u32,
    },
    Ping {
        ack: bool,
        data: u64,
    },
    Control(CtlSpec),
    GoAway {
        last: u32,
        code: u32,
    },
    Any {
        kind: u8,
        flags: u8,
        stream: u32,
        len: u16,
        payload: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
pub enum SoloOp {
    App(AppOp),
    /// Arbitrary bytes from the peer.
    Raw {
        dt: u16,
        bytes: Vec<u8>,
    },
    /// One frame from the peer, possibly cut in two deliveries.
    Frame {
        dt: u16,
        f: FrameSpec,
        split: u16,
    },
    /// Time passes; `handle_timeout` runs if its deadline passed.
    Advance {
        dt: u16,
    },
    Transmit {
        cap: Option<u16>,
    },
}

#[derive(Arbitrary, Debug)]
pub enum PairOp {
    App {
        client: bool,
        op: AppOp,
    },
    /// `poll_transmit` on one side; the bytes go on the wire to the other,
    /// mutated if asked.
    Transmit {
        client: bool,
        cap: Option<u16>,
        mutate: Option<Mutation>,
    },
    /// Delivers up to `max` bytes (0 = all) from a wire to its reader.
    Deliver {
        to_server: bool,
        max: u16,
    },
    Advance {
        dt: u16,
    },
    /// Transmits, delivers and drains events on both sides until quiet.
    Settle,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Mutation {
    Flip { pos: u16, mask: u8 },
    Drop { pos: u16, len: u16 },
    Insert { pos: u16, bytes: Vec<u8> },
    Truncate { len: u16 },
    Duplicate { pos: u16, len: u16 },
}

impl Mutation {
    /// Applies the mutation; true if the bytes changed.
    fn apply(&self, b: &mut Vec<u8>) -> bool {
        let before = b.clone();
        let at = |pos: u16, len: usize| {
            if len == 0 {
                0
            } else {
                usize::from(pos) % (len + 1)
            }
        };
        match self {
            Mutation::Flip { pos, mask } => {
                if !b.is_empty() {
                    let i = usize::from(*pos) % b.len();
                    b[i] ^= mask;
                }
            }
            Mutation::Drop { pos, len } => {
                let i = at(*pos, b.len());
                let end = (i + usize::from(*len)).min(b.len());
                b.drain(i..end);
            }
            Mutation::Insert { pos, bytes } => {
                let i = at(*pos, b.len());
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Truncate { len } => b.truncate(usize::from(*len)),
            Mutation::Duplicate { pos, len } => {
                let i = at(*pos, b.len());
                let end = (i + usize::from(*len)).min(b.len());
                let dup: Vec<u8> = b[i..end].to_vec();
                b.splice(end..end, dup);
            }
        }
        *b != before
    }
}

// ------------------------------------------------------------------ model

/// Codes the application here may use. The ones a correct peer only sends
/// when the other side broke the protocol are mapped to `CANCEL`, so that in
/// a clean run they can only come from a bug.
fn app_code(raw: u32) -> ErrorCode {
    match ErrorCode(raw) {
        ErrorCode::PROTOCOL
        | ErrorCode::FLOW_CONTROL
        | ErrorCode::STREAM_CLOSED
        | ErrorCode::FRAME_SIZE => ErrorCode::CANCEL,
        c => c,
    }
}

fn violation_code(c: ErrorCode) -> bool {
    matches!(
        c,
        ErrorCode::PROTOCOL
            | ErrorCode::FLOW_CONTROL
            | ErrorCode::STREAM_CLOSED
            | ErrorCode::FRAME_SIZE
    )
}

/// The byte at `off` of stream `id` (period 251, so it is not aligned with
/// any power-of-two buffer size).
fn pattern(id: u32, off: u64) -> u8 {
    ((off % 251) as u8).wrapping_add((id as u8).wrapping_mul(17))
}

/// Follows the frames a side has consumed and remembers the ids of `OPEN`s,
/// so the window invariant can be checked for streams whose `Opened` event
/// has not been polled yet.
#[derive(Default)]
struct Shadow {
    hdr: [u8; HEADER_LEN],
    hlen: usize,
    skip: usize,
    ids: Vec<u32>,
}

impl Shadow {
    fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(b.len());
                self.skip -= n;
                b = &b[n..];
                continue;
            }
            let n = (HEADER_LEN - self.hlen).min(b.len());
            self.hdr[self.hlen..self.hlen + n].copy_from_slice(&b[..n]);
            self.hlen += n;
            b = &b[n..];
            if self.hlen == HEADER_LEN {
                self.hlen = 0;
                self.skip = usize::from(u16::from_be_bytes([self.hdr[2], self.hdr[3]]));
                let id = u32::from_be_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]]);
                if self.hdr[0] == FrameKind::Open as u8
                    && self.ids.len() < 256
                    && !self.ids.contains(&id)
                {
                    self.ids.push(id);
                }
            }
        }
    }
}

/// Checks everything one side puts on the wire.
struct OutCheck {
    role: Role,
    last_open: u32,
    fins: Vec<u32>,
    goaway_sent: bool,
    dead: bool,
}

impl OutCheck {
    fn new(role: Role) -> OutCheck {
        OutCheck {
            role,
            last_open: 0,
            fins: Vec::new(),
            goaway_sent: false,
            dead: false,
        }
    }

    /// `bytes` is what one `poll_transmit` wrote into a buffer of `cap` bytes.
    fn check(&mut self, bytes: &[u8], cap: usize) {
        assert!(
            bytes.len() <= cap,
            "poll_transmit wrote {} bytes into {cap}",
            bytes.len()
        );
        let mut pos = 0;
        while pos < bytes.len() {
            assert!(
                bytes.len() - pos >= HEADER_LEN,
                "partial header at {pos} of {}",
                bytes.len()
            );
            let raw: &[u8; HEADER_LEN] = bytes[pos..pos + HEADER_LEN].try_into().expect("8 bytes");
            let h = FrameHeader::decode(raw)
                .unwrap_or_else(|e| panic!("poll_transmit wrote a bad header {raw:?}: {e}"));
            let start = pos + HEADER_LEN;
            let end = start + usize::from(h.len);
            assert!(
                end <= bytes.len(),
                "partial payload: {h:?} at {pos} of {}",
                bytes.len()
            );
            self.frame(&h, &bytes[start..end]);
            pos = end;
        }
    }

    fn frame(&mut self, h: &FrameHeader, p: &[u8]) {
        assert!(
            !self.dead,
            "{:?} sent {h:?} after GOAWAY with an error code",
            self.role
        );
        let word = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        match h.kind {
            FrameKind::Open => {
                let id = h.stream.expect("decode: stream frame").get();
                assert_eq!(
                    id % 2 == 1,
                    self.role == Role::Client,
                    "{:?} opened {id}",
                    self.role
                );
                assert!(
                    id > self.last_open,
                    "{:?} opened {id} after {}",
                    self.role,
                    self.last_open
                );
                assert!(
                    !self.goaway_sent,
                    "{:?} sent OPEN {id} after its GOAWAY",
                    self.role
                );
                self.last_open = id;
                StreamMeta::decode(p).expect("OPEN metadata the mux wrote decodes");
            }
            FrameKind::Data => {
                let id = h.stream.expect("decode: stream frame").get();
                assert!(
                    !self.fins.contains(&id),
                    "{:?} sent DATA on {id} after FIN",
                    self.role
                );
                if h.flags & FLAG_FIN != 0 {
                    self.fins.push(id);
                }
            }
            FrameKind::Window => {
                let inc = word(0);
                assert!(
                    inc > 0 && inc <= MAX_WINDOW,
                    "{:?} sent WINDOW {inc}",
                    self.role
                );
            }
            FrameKind::Control => {
                Control::decode(p).expect("CONTROL the mux wrote decodes");
            }
            FrameKind::GoAway => {
                self.goaway_sent = true;
                if word(4) != 0 {
                    self.dead = true;
                }
            }
            FrameKind::Reset | FrameKind::Ping => {}
        }
    }
}

type TestMux = Mux<Vec<Slot>, Vec<u8>>;

struct Side {
    name: &'static str,
    mux: TestMux,
    cfg: Config,
    known: Vec<StreamId>,
    opened: Vec<u32>,
    shadow: Shadow,
    out: OutCheck,
    /// Bytes sent per stream (pattern offset).
    sent: Vec<(u32, u64)>,
    /// Bytes read per stream.
    read: Vec<(u32, u64)>,
    /// Streams reset (either way) or released on this side.
    gone: Vec<u32>,
    closed_events: u32,
    scratch: Vec<u8>,
}

fn offset(v: &mut Vec<(u32, u64)>, id: u32) -> &mut u64 {
    let i = match v.iter().position(|(i, _)| *i == id) {
        Some(i) => i,
        None => {
            v.push((id, 0));
            v.len() - 1
        }
    };
    &mut v[i].1
}

impl Side {
    fn new(name: &'static str, cfg: Config) -> Side {
        let mux = Mux::new(
            cfg,
            vec![Slot::EMPTY; cfg.max_streams],
            vec![0u8; cfg.buffer_len()],
            Millis(0),
        )
        .expect("the fuzz config is valid");
        Side {
            name,
            mux,
            cfg,
            known: Vec::new(),
            opened: Vec::new(),
            shadow: Shadow::default(),
            out: OutCheck::new(cfg.role),
            sent: Vec::new(),
            read: Vec::new(),
            gone: Vec::new(),
            closed_events: 0,
            scratch: vec![0u8; 2 * MAX_FRAME],
        }
    }

    fn pick(&self, s: Sel) -> Option<StreamId> {
        match s {
            Sel::Known(i) if !self.known.is_empty() => {
                Some(self.known[usize::from(i) % self.known.len()])
            }
            Sel::Known(_) => None,
            Sel::Raw(r) => StreamId::new(u32::from(r)),
        }
    }

    fn gone(&mut self, id: StreamId) {
        if !self.gone.contains(&id.get()) {
            self.gone.push(id.get());
        }
    }

    /// The invariants that hold between any two calls.
    fn check(&self) {
        let m = &self.mux;
        assert!(
            m.live_streams() <= self.cfg.max_streams,
            "{}: {} live streams",
            self.name,
            m.live_streams()
        );
        // DESIGN.md invariant 1: the storage is what was given, and its use
        // stays within it.
        let (slots, buf) = m.storage();
        assert_eq!(slots.len(), self.cfg.max_streams, "{}: slots", self.name);
        assert_eq!(buf.len(), self.cfg.buffer_len(), "{}: buffer", self.name);
        assert!(
            m.buffered() <= self.cfg.buffer_len(),
            "{}: {} bytes buffered, bound {}",
            self.name,
            m.buffered(),
            self.cfg.buffer_len()
        );
        let window = self.cfg.window as usize;
        let ids = self
            .known
            .iter()
            .map(|s| s.get())
            .chain(self.shadow.ids.iter().copied())
            .chain(1..=16);
        for raw in ids {
            if let Some(id) = StreamId::new(raw) {
                let n = m.readable_len(id);
                assert!(
                    n <= window,
                    "{}: readable_len({raw}) = {n} > window {window}",
                    self.name
                );
            }
        }
        // PROTOCOL.md section 4: an open session always has a dead-peer deadline.
        if !m.is_closed() {
            assert!(
                m.poll_timeout().is_some(),
                "{}: an open session has no timer",
                self.name
            );
        }
    }

    /// Feeds `input` at `now`; returns how many bytes were consumed.
    fn input(&mut self, now: Millis, input: &[u8]) -> usize {
        let n = self.mux.handle_input(now, input);
        assert!(
            n <= input.len(),
            "{}: consumed {n} of {}",
            self.name,
            input.len()
        );
        self.shadow.feed(&input[..n]);
        n
    }

    /// `poll_transmit` into a buffer of the given size; returns the bytes.
    fn transmit(&mut self, cap: Option<u16>) -> Vec<u8> {
        let cap = match cap {
            None => MAX_FRAME,
            Some(c) => usize::from(c) % (2 * MAX_FRAME + 1),
        };
        self.scratch.fill(0xEE);
        let n = self.mux.poll_transmit(&mut self.scratch[..cap]);
        self.out.check(&self.scratch[..n.min(cap)], cap);
        if self.mux.is_finished() {
            let mut again = [0u8; MAX_FRAME];
            assert_eq!(
                self.mux.poll_transmit(&mut again),
                0,
                "{}: finished but transmits",
                self.name
            );
        }
        self.scratch[..n].to_vec()
    }

    fn event(&mut self, clean: bool) -> Option<Event> {
        let ev = self.mux.poll_event()?;
        match ev {
            Event::Opened(id) => {
                assert_ne!(
                    id.is_client(),
                    self.cfg.role == Role::Client,
                    "{}: peer opened own-parity {id}",
                    self.name
                );
                assert!(
                    !self.opened.contains(&id.get()),
                    "{}: Opened({id}) twice",
                    self.name
                );
                assert!(
                    self.mux.meta(id).is_some(),
                    "{}: Opened({id}) without metadata",
                    self.name
                );
                self.opened.push(id.get());
                if self.known.len() < 256 {
                    self.known.push(id);
                }
            }
            Event::Reset(id, code) => {
                assert!(
                    !(clean && violation_code(code)),
                    "{}: clean run, {id} reset with {code}; close reason {:?}",
                    self.name,
                    self.mux.close_reason()
                );
                self.gone(id);
            }
            Event::Control => {
                let m = self
                    .mux
                    .control()
                    .expect("Event::Control with a message that decodes");
                let raw = self.mux.control_bytes().expect("raw bytes of the message");
                assert_eq!(Control::decode(raw).as_ref(), Ok(&m));
            }
            Event::GoAway { code, .. } => {
                assert!(
                    !(clean && violation_code(code)),
                    "{}: clean run, GOAWAY {code}",
                    self.name
                );
            }
            Event::Closed(code) => {
                self.closed_events += 1;
                assert_eq!(self.closed_events, 1, "{}: Closed twice", self.name);
                assert!(
                    self.mux.is_closed(),
                    "{}: Closed({code}) but not closed",
                    self.name
                );
                let reason = self
                    .mux
                    .close_reason()
                    .expect("a closed session has a reason");
                assert_eq!(
                    reason.code(),
                    code,
                    "{}: Closed({code}) for {reason:?}",
                    self.name
                );
                if clean {
                    assert!(
                        matches!(
                            reason,
                            CloseReason::Drained
                                | CloseReason::Local(_)
                                | CloseReason::PeerGoAway(_)
                                | CloseReason::Timeout
                        ),
                        "{}: clean run closed with {reason:?} ({reason})",
                        self.name
                    );
                }
            }
            Event::Readable(_) | Event::Writable(_) | Event::Unblocked => {}
        }
        Some(ev)
    }

    fn drain_events(&mut self, clean: bool, take_control: bool) -> usize {
        let mut n = 0;
        while let Some(ev) = self.event(clean) {
            n += 1;
            assert!(n < 10_000, "{}: poll_event never returns None", self.name);
            if take_control && ev == Event::Control {
                self.mux.take_control();
            }
        }
        // A message whose event the application polled earlier but never
        // took still holds up input.
        if take_control && self.mux.control_bytes().is_some() {
            self.mux.take_control();
            n += 1;
        }
        n
    }

    fn app(&mut self, op: &AppOp, now: Millis, clean: bool) {
        match op {
            AppOp::Open(spec) => {
                if let Ok(id) = self.mux.open(&spec.meta()) {
                    assert_eq!(
                        id.is_client(),
                        self.cfg.role == Role::Client,
                        "{}: open gave {id}",
                        self.name
                    );
                    assert!(
                        self.mux.meta(id).is_some(),
                        "{}: no metadata for own {id}",
                        self.name
                    );
                    assert!(!self.known.contains(&id), "{}: open reused {id}", self.name);
                    if self.known.len() < 256 {
                        self.known.push(id);
                    }
                }
            }
            AppOp::Send { s, len } => {
                let Some(id) = self.pick(*s) else { return };
                let off = *offset(&mut self.sent, id.get());
                let data: Vec<u8> = (0..u64::from(*len))
                    .map(|i| pattern(id.get(), off + i))
                    .collect();
                if let Ok(n) = self.mux.send(id, &data) {
                    assert!(
                        n <= data.len(),
                        "{}: send took {n} of {}",
                        self.name,
                        data.len()
                    );
                    assert!(
                        n > 0 || data.is_empty(),
                        "{}: send took 0 bytes without Blocked",
                        self.name
                    );
                    *offset(&mut self.sent, id.get()) += n as u64;
                }
            }
            AppOp::Recv { s, len } => {
                let Some(id) = self.pick(*s) else { return };
                let before = self.mux.readable_len(id);
                let mut buf = vec![0u8; usize::from(*len)];
                match self.mux.recv(id, &mut buf) {
                    Ok(Recv::Data(n)) => {
                        assert!(
                            n <= buf.len() && n <= before,
                            "{}: recv {n} of {before} into {}",
                            self.name,
                            buf.len()
                        );
                        assert!(
                            n > 0 || buf.is_empty(),
                            "{}: Data(0) with room and {before} waiting",
                            self.name
                        );
                        assert_eq!(
                            self.mux.readable_len(id),
                            before - n,
                            "{}: readable_len after recv",
                            self.name
                        );
                        let off = offset(&mut self.read, id.get());
                        if clean {
                            for (i, b) in buf[..n].iter().enumerate() {
                                let want = pattern(id.get(), *off + i as u64);
                                assert_eq!(
                                    *b,
                                    want,
                                    "{}: {id} byte {} is {b}, sent {want}",
                                    self.name,
                                    *off + i as u64
                                );
                            }
                        }
                        *off += n as u64;
                    }
                    Ok(Recv::Fin) | Ok(Recv::Blocked) => {
                        assert_eq!(
                            before, 0,
                            "{}: {before} bytes waiting but recv read none",
                            self.name
                        );
                    }
                    Err(_) => {}
                }
            }
            AppOp::Finish(s) => {
                if let Some(id) = self.pick(*s) {
                    let _ = self.mux.finish(id);
                }
            }
            AppOp::Reset { s, code } => {
                if let Some(id) = self.pick(*s) {
                    if self.mux.reset(id, app_code(*code)).is_ok() {
                        self.gone(id);
                    }
                }
            }
            AppOp::Release(s) => {
                if let Some(id) = self.pick(*s) {
                    self.mux.release(id);
                    self.gone(id);
                }
            }
            AppOp::GoAway { error, code } => {
                let code = if *error {
                    match app_code(*code) {
                        ErrorCode::NO_ERROR => ErrorCode::INTERNAL,
                        c => c,
                    }
                } else {
                    ErrorCode::NO_ERROR
                };
                self.mux.goaway(code);
                assert!(
                    self.mux.is_closing(),
                    "{}: goaway({code}) but not closing",
                    self.name
                );
            }
            AppOp::SendControl(spec) => {
                let _ = self.mux.send_control(&spec.control());
            }
            AppOp::TakeControl => self.mux.take_control(),
            AppOp::HandleTimeout => self.mux.handle_timeout(now),
            AppOp::PollEvent => {
                let _ = self.event(clean);
            }
            AppOp::DrainEvents => {
                self.drain_events(clean, false);
            }
        }
        if self.mux.is_closed() {
            let meta = StreamMeta {
                endpoint: "x",
                peer: PeerAddr::Unknown,
                sni: None,
                client: None,
            };
            assert!(
                self.mux.open(&meta).is_err(),
                "{}: open on a closed session",
                self.name
            );
        }
    }

    /// Runs the heartbeat if its deadline has passed.
    fn tick(&mut self, now: Millis) {
        if self.mux.poll_timeout().is_some_and(|t| t <= now) {
            self.mux.handle_timeout(now);
        }
    }
}

// ------------------------------------------------------------------ solo

fn encode_frame(f: &FrameSpec, out: &mut Vec<u8>) {
    let mut frame = |kind: u8, flags: u8, stream: u32, payload: &[u8], len: Option<u16>| {
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&len.unwrap_or(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    };
    match f {
        FrameSpec::Data { s, fin, len } => {
            let id = u32::from(*s);
            let len = usize::from(*len) % (MAX_PAYLOAD + 1);
            let p: Vec<u8> = (0..len as u64).map(|i| pattern(id, i)).collect();
            frame(0, if *fin { FLAG_FIN } else { 0 }, id, &p, None);
        }
        FrameSpec::Open { s, meta } => {
            let mut buf = [0u8; 1024];
            let n = meta.meta().encode(&mut buf).map_or(0, |b| b.len());
            frame(1, 0, u32::from(*s), &buf[..n], None);
        }
        FrameSpec::Window { s, inc } => frame(2, 0, u32::from(*s), &inc.to_be_bytes(), None),
        FrameSpec::Reset { s, code } => frame(3, 0, u32::from(*s), &code.to_be_bytes(), None),
        FrameSpec::Ping { ack, data } => frame(4, u8::from(*ack), 0, &data.to_be_bytes(), None),
        FrameSpec::Control(c) => {
            let mut buf = vec![0u8; tether_proto::MAX_CONTROL];
            let n = c.control().encode(&mut buf).map_or(0, |b| b.len());
            frame(5, 0, 0, &buf[..n], None);
        }
        FrameSpec::GoAway { last, code } => {
            let mut p = [0u8; 8];
            p[..4].copy_from_slice(&last.to_be_bytes());
            p[4..].copy_from_slice(&code.to_be_bytes());
            frame(6, 0, 0, &p, None);
        }
        FrameSpec::Any {
            kind,
            flags,
            stream,
            len,
            payload,
        } => {
            frame(*kind, *flags, *stream, payload, Some(*len));
        }
    }
}

fn solo(cfg: CfgSpec, ops: &[SoloOp]) {
    let mut side = Side::new("server", cfg.config(Role::Server));
    let mut now = Millis(0);
    let mut inbox: Vec<u8> = Vec::new();
    for op in ops {
        match op {
            SoloOp::App(op) => side.app(op, now, false),
            SoloOp::Raw { dt, bytes } => {
                now = now.add(u64::from(*dt));
                inbox.extend_from_slice(bytes);
                let n = side.input(now, &inbox);
                inbox.drain(..n);
            }
            SoloOp::Frame { dt, f, split } => {
                now = now.add(u64::from(*dt));
                let start = inbox.len();
                encode_frame(f, &mut inbox);
                // Deliver up to the split point first, then the rest.
                let cut = start + usize::from(*split) % (inbox.len() - start + 1);
                let n = side.input(now, &inbox[..cut]);
                inbox.drain(..n);
                side.check();
                let n = side.input(now, &inbox);
                inbox.drain(..n);
            }
            SoloOp::Advance { dt } => {
                now = now.add(u64::from(*dt));
                side.tick(now);
            }
            SoloOp::Transmit { cap } => {
                side.transmit(*cap);
            }
        }
        side.check();
        // Bound the work per input: a stalled inbox cannot grow forever.
        if inbox.len() > 1 << 20 {
            return;
        }
    }
}

// ------------------------------------------------------------------ paired

struct Pair {
    c: Side,
    s: Side,
    /// Bytes on the way to the server / to the client.
    to_s: Vec<u8>,
    to_c: Vec<u8>,
    now: Millis,
    clean: bool,
}

impl Pair {
    fn side(&mut self, client: bool) -> &mut Side {
        if client {
            &mut self.c
        } else {
            &mut self.s
        }
    }

    fn transmit(&mut self, client: bool, cap: Option<u16>, mutate: Option<&Mutation>) -> usize {
        let mut bytes = self.side(client).transmit(cap);
        let n = bytes.len();
        if let Some(m) = mutate {
            if m.apply(&mut bytes) {
                self.clean = false;
            }
        }
        if client {
            self.to_s.extend_from_slice(&bytes);
        } else {
            self.to_c.extend_from_slice(&bytes);
        }
        n
    }

    fn deliver(&mut self, to_server: bool, max: u16) -> usize {
        let (wire, side) = if to_server {
            (&mut self.to_s, &mut self.s)
        } else {
            (&mut self.to_c, &mut self.c)
        };
        let max = if max == 0 {
            wire.len()
        } else {
            usize::from(max).min(wire.len())
        };
        let n = side.input(self.now, &wire[..max]);
        wire.drain(..n);
        n
    }

    /// A bounded drive: transmit, deliver and drain events (taking control
    /// messages) on both sides until nothing moves. Time stands still, so it
    /// must settle.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = 0;
            for client in [true, false] {
                loop {
                    let n = self.transmit(client, Some(2 * MAX_FRAME as u16), None);
                    moved += n;
                    if n == 0 {
                        break;
                    }
                }
            }
            moved += self.deliver(true, 0) + self.deliver(false, 0);
            moved += self.c.drain_events(self.clean, true) + self.s.drain_events(self.clean, true);
            self.c.check();
            self.s.check();
            if moved == 0 {
                return;
            }
        }
        panic!(
            "the pair did not settle in 1000 rounds (livelock); clean = {}",
            self.clean
        );
    }

    /// After a clean settle, every live stream holds exactly what its peer
    /// sent and it has not read.
    fn check_conservation(&self) {
        if !self.clean || self.c.mux.is_closed() || self.s.mux.is_closed() {
            return;
        }
        for (tx, rx) in [(&self.c, &self.s), (&self.s, &self.c)] {
            assert!(
                self.to_s.is_empty() && self.to_c.is_empty(),
                "settled with bytes on the wire"
            );
            for &(id, sent) in &tx.sent {
                if sent == 0 || tx.gone.contains(&id) || rx.gone.contains(&id) {
                    continue;
                }
                let sid = StreamId::new(id).expect("sent on a real id");
                let read = rx
                    .read
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map_or(0, |(_, n)| *n);
                let waiting = rx.mux.readable_len(sid) as u64;
                assert_eq!(
                    read + waiting,
                    sent,
                    "{id}: {} sent {sent}, {} read {read} and holds {waiting}",
                    tx.name,
                    rx.name
                );
            }
        }
    }
}

fn paired(client: CfgSpec, server: CfgSpec, ops: &[PairOp]) {
    let mut p = Pair {
        c: Side::new("client", client.config(Role::Client)),
        s: Side::new("server", server.config(Role::Server)),
        to_s: Vec::new(),
        to_c: Vec::new(),
        now: Millis(0),
        clean: true,
    };
    for op in ops {
        match op {
            PairOp::App { client, op } => {
                let (now, clean) = (p.now, p.clean);
                p.side(*client).app(op, now, clean);
            }
            PairOp::Transmit {
                client,
                cap,
                mutate,
            } => {
                p.transmit(*client, *cap, mutate.as_ref());
            }
            PairOp::Deliver { to_server, max } => {
                p.deliver(*to_server, *max);
            }
            PairOp::Advance { dt } => {
                p.now = p.now.add(u64::from(*dt));
                let now = p.now;
                p.c.tick(now);
                p.s.tick(now);
            }
            PairOp::Settle => {
                p.settle();
                p.check_conservation();
            }
        }
        p.c.check();
        p.s.check();
        if p.to_s.len() + p.to_c.len() > 1 << 22 {
            return;
        }
    }
    p.settle();
    p.check_conservation();
}

/// Runs one input: the body of the `mux_ops` fuzz target.
pub fn run(input: Input) {
    match input {
        Input::Solo { cfg, ops } => solo(cfg, &ops),
        Input::Paired {
            client,
            server,
            ops,
        } => paired(client, server, &ops),
    }
}
