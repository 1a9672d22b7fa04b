//! A raw agent: a client of the edge's agent port that speaks the wire format
//! (proto/PROTOCOL.md) frame by frame with tether-proto's encoders
//! ([`FrameHeader`], [`write_frame`], [`Control`]), over a verified TLS 1.3
//! connection with ALPN `tether/1`.
//!
//! It is the peer the real tetherd never is: one that sends a PING before
//! `Hello`, opens streams, binds more than it may, or stops reading. Every
//! read takes a deadline; a read that times out keeps what it had (frames are
//! reassembled from an own buffer), so a test can poll without losing bytes.
//! Writes go straight to rustls and the socket, never through a helper that
//! might read behind the caller's back: a stalled agent reads nothing.
//!
//! It does not run a multiplexer: flow control, stream states and replies are
//! the test's business (PINGs are answered while reading, unless turned off).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tether_proto::control::Secret;
use tether_proto::frame::{write_frame, FLAG_ACK, FLAG_FIN};
use tether_proto::{
    Control, EndpointKind, ErrorCode, FrameHeader, FrameKind, PeerAddr, StreamId, StreamMeta,
    HEADER_LEN, MAX_FRAME, MAX_PAYLOAD,
};

/// The TLS client configuration of a raw agent: TLS 1.3 only, ALPN
/// `tether/1`, trusting only the PEM CA at `ca`.
pub fn client_config(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read CA pem") {
        roots.add(c.expect("CA certificate")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
    Arc::new(cfg)
}

/// How a raw agent dials.
#[derive(Clone, Copy, Debug)]
pub struct Dial {
    /// The edge's agent port.
    pub addr: SocketAddr,
    /// Source address to bind (None: the OS chooses, 127.0.0.1 on loopback).
    pub source: Option<IpAddr>,
    /// `SO_RCVBUF` before connecting: a small one makes a peer that stops
    /// reading stall the edge's writes after a few KiB.
    pub rcvbuf: Option<usize>,
    /// Deadline of the TCP connect and of the TLS handshake, each.
    pub timeout: Duration,
}

impl Dial {
    /// Dial `addr` from 127.0.0.1 with a normal buffer, 5 s deadlines.
    pub fn to(addr: SocketAddr) -> Dial {
        Dial {
            addr,
            source: None,
            rcvbuf: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// One frame as received.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The checked header.
    pub header: FrameHeader,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// The `GOAWAY` fields (last stream id, code) of a `GOAWAY` frame.
    pub fn goaway(&self) -> Option<(u32, ErrorCode)> {
        (self.header.kind == FrameKind::GoAway && self.payload.len() == 8).then(|| {
            let p = &self.payload;
            (
                u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                ErrorCode(u32::from_be_bytes([p[4], p[5], p[6], p[7]])),
            )
        })
    }
}

/// The edge's `Error` answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Its code.
    pub code: ErrorCode,
    /// Its retry hint.
    pub retry_after_ms: u32,
    /// Its message.
    pub message: String,
}

/// The edge's `BindErr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindRefusal {
    /// Its code.
    pub code: ErrorCode,
    /// The rule that refused.
    pub rule: String,
    /// Its message.
    pub message: String,
}

/// A raw agent connection (see the module doc).
pub struct RawAgent {
    conn: ClientConnection,
    sock: TcpStream,
    rbuf: Vec<u8>,
    eof: bool,
    /// Frames received that no helper consumed (OPEN, DATA, WINDOW, RESET,
    /// PING ACKs), in order.
    pub frames: Vec<Frame>,
    /// The `GOAWAY` received, if any.
    pub goaway: Option<(u32, ErrorCode)>,
    /// Whether reads answer the edge's PINGs (default true).
    pub answer_pings: bool,
    next_stream: u32,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("timed out waiting for {what}"),
    )
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl RawAgent {
    /// TCP connect and TLS handshake; checks that ALPN `tether/1` was agreed.
    pub fn connect(dial: Dial, tls: &Arc<ClientConfig>) -> io::Result<RawAgent> {
        let sock = crate::sys::connect(dial.addr, dial.source, dial.rcvbuf, dial.timeout)?;
        sock.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
        let conn = ClientConnection::new(tls.clone(), name).map_err(io::Error::other)?;
        let mut a = RawAgent {
            conn,
            sock,
            rbuf: Vec::new(),
            eof: false,
            frames: Vec::new(),
            goaway: None,
            answer_pings: true,
            next_stream: 1,
        };
        let deadline = Instant::now() + dial.timeout;
        a.sock.set_write_timeout(Some(dial.timeout))?;
        while a.conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out("the TLS handshake"));
            }
            a.sock.set_read_timeout(Some(left))?;
            let (rd, wr) = a.conn.complete_io(&mut a.sock)?;
            if rd == 0 && wr == 0 && a.conn.is_handshaking() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "edge closed during the TLS handshake",
                ));
            }
        }
        if a.conn.alpn_protocol() != Some(tether_proto::ALPN) {
            return Err(io::Error::other("ALPN tether/1 was not agreed"));
        }
        Ok(a)
    }

    /// The TCP socket (for its local address, or to shut it down).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// How long a write may block before it fails with `WouldBlock`.
    pub fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        self.sock.set_write_timeout(Some(t))
    }

    /// Hands `bytes` (whole frames) to TLS and writes every record out.
    /// Fails with `WouldBlock`/`TimedOut` once the socket stays full for the
    /// write timeout (the edge stopped reading); what rustls had taken stays
    /// queued in it.
    pub fn write_raw(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self.conn.writer().write(bytes)?;
            bytes = &bytes[n..];
            while self.conn.wants_write() {
                self.conn.write_tls(&mut self.sock)?;
            }
        }
        Ok(())
    }

    /// Sends one frame.
    pub fn send(&mut self, header: FrameHeader, payload: &[u8]) -> io::Result<()> {
        let mut buf = [0u8; MAX_FRAME];
        let n = write_frame(&mut buf, header, payload)
            .ok_or_else(|| io::Error::other("frame too large"))?;
        self.write_raw(&buf[..n])
    }

    /// Sends a `CONTROL` frame.
    pub fn send_control(&mut self, msg: &Control<'_>) -> io::Result<()> {
        let mut buf = [0u8; MAX_PAYLOAD];
        let len = msg
            .encode(&mut buf)
            .map_err(|e| io::Error::other(format!("encode control: {e:?}")))?
            .len();
        self.send(
            FrameHeader::session(FrameKind::Control, 0, len as u16),
            &buf[..len],
        )
    }

    /// Sends `Hello` with `token` (protocol version 1).
    pub fn send_hello(&mut self, token: &str) -> io::Result<()> {
        self.send_control(&Control::Hello {
            version: tether_proto::PROTOCOL_VERSION,
            min_version: tether_proto::MIN_PROTOCOL_VERSION,
            token: Secret(token),
            agent: "raw-agent/0",
            arch: "test",
        })
    }

    /// Sends a `PING` with `data`.
    pub fn send_ping(&mut self, data: u64) -> io::Result<()> {
        self.send(
            FrameHeader::session(FrameKind::Ping, 0, 8),
            &data.to_be_bytes(),
        )
    }

    /// The bytes of `n` PING frames, to write in one go.
    pub fn pings(n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n * (HEADER_LEN + 8));
        for i in 0..n {
            out.extend_from_slice(&FrameHeader::session(FrameKind::Ping, 0, 8).encode());
            out.extend_from_slice(&(i as u64).to_be_bytes());
        }
        out
    }

    /// Opens the next agent stream (odd ids) for `endpoint`; returns its id.
    pub fn send_open(&mut self, endpoint: &str) -> io::Result<StreamId> {
        let id = StreamId::new(self.next_stream).ok_or_else(|| io::Error::other("ids used up"))?;
        self.next_stream += 2;
        let meta = StreamMeta {
            endpoint,
            peer: PeerAddr::Unknown,
            sni: None,
            client: None,
        };
        let mut buf = [0u8; tether_proto::MAX_META];
        let len = meta
            .encode(&mut buf)
            .map_err(|e| io::Error::other(format!("encode meta: {e:?}")))?
            .len();
        self.send(
            FrameHeader::stream(FrameKind::Open, 0, len as u16, id),
            &buf[..len],
        )?;
        Ok(id)
    }

    /// Sends `DATA` on `id` (at most 16 KiB; `fin` ends the direction).
    pub fn send_data(&mut self, id: StreamId, bytes: &[u8], fin: bool) -> io::Result<()> {
        let flags = if fin { FLAG_FIN } else { 0 };
        self.send(
            FrameHeader::stream(FrameKind::Data, flags, bytes.len() as u16, id),
            bytes,
        )
    }

    /// Grants `n` bytes of credit on `id`.
    pub fn send_window(&mut self, id: StreamId, n: u32) -> io::Result<()> {
        self.send(
            FrameHeader::stream(FrameKind::Window, 0, 4, id),
            &n.to_be_bytes(),
        )
    }

    /// Sends `GOAWAY(code)`.
    pub fn send_goaway(&mut self, code: ErrorCode) -> io::Result<()> {
        let mut p = [0u8; 8];
        p[4..].copy_from_slice(&code.0.to_be_bytes());
        self.send(FrameHeader::session(FrameKind::GoAway, 0, 8), &p)
    }

    /// Reads what arrives within `left` into the frame buffer. Ok(false) on EOF.
    fn fill(&mut self, left: Duration) -> io::Result<bool> {
        // Plaintext rustls already holds comes first.
        let mut tmp = [0u8; 16 * 1024];
        match self.conn.reader().read(&mut tmp) {
            Ok(0) => {
                self.eof = true;
                return Ok(false);
            }
            Ok(n) => {
                self.rbuf.extend_from_slice(&tmp[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.eof = true;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        self.sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let n = match self.conn.read_tls(&mut self.sock) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.conn
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(true)
    }

    /// The next frame, waiting at most `t`: `Ok(None)` when the edge closed
    /// the connection. Answers PINGs (see [`RawAgent::answer_pings`]) and
    /// records a GOAWAY in [`RawAgent::goaway`] before returning either.
    pub fn next_frame(&mut self, t: Duration) -> io::Result<Option<Frame>> {
        let deadline = Instant::now() + t;
        loop {
            if self.rbuf.len() >= HEADER_LEN {
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(&self.rbuf[..HEADER_LEN]);
                let header = FrameHeader::decode(&h)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let total = HEADER_LEN + header.len as usize;
                if self.rbuf.len() >= total {
                    let payload = self.rbuf[HEADER_LEN..total].to_vec();
                    self.rbuf.drain(..total);
                    let f = Frame { header, payload };
                    if let Some(g) = f.goaway() {
                        self.goaway = Some(g);
                    }
                    if f.header.kind == FrameKind::Ping
                        && f.header.flags & FLAG_ACK == 0
                        && self.answer_pings
                    {
                        let p = f.payload.clone();
                        self.send(FrameHeader::session(FrameKind::Ping, FLAG_ACK, 8), &p)?;
                    }
                    return Ok(Some(f));
                }
            }
            if self.eof {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out("a frame"));
            }
            match self.fill(left) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(timed_out("a frame")),
                Err(e) => return Err(e),
            }
        }
    }

    /// The payload of the next `CONTROL` frame within `t`; other frames go
    /// to [`RawAgent::frames`]. `Ok(None)`: the edge closed first.
    pub fn next_control(&mut self, t: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left)? {
                None => return Ok(None),
                Some(f) if f.header.kind == FrameKind::Control => return Ok(Some(f.payload)),
                Some(f) => self.frames.push(f),
            }
        }
    }

    /// Sends `Hello` with `token` and waits `t` for the answer: the session
    /// number of `Welcome`, or the `Error`.
    pub fn authenticate(&mut self, token: &str, t: Duration) -> io::Result<Result<u64, Refusal>> {
        self.send_hello(token)?;
        let Some(bytes) = self.next_control(t)? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "edge closed without answering Hello (GOAWAY {:?})",
                    self.goaway
                ),
            ));
        };
        match Control::decode(&bytes) {
            Ok(Control::Welcome { session, .. }) => Ok(Ok(session)),
            Ok(Control::Error {
                code,
                retry_after_ms,
                message,
            }) => Ok(Err(Refusal {
                code: ErrorCode(code),
                retry_after_ms,
                message: message.to_owned(),
            })),
            other => Err(io::Error::other(format!(
                "expected Welcome or Error, got {other:?}"
            ))),
        }
    }

    /// Sends `Bind` for `endpoint` and waits `t` for `BindOk` (its URL) or
    /// `BindErr`.
    pub fn bind(
        &mut self,
        endpoint: &str,
        kind: EndpointKind,
        t: Duration,
    ) -> io::Result<Result<String, BindRefusal>> {
        self.send_control(&Control::Bind {
            endpoint,
            kind,
            url: "",
            upstream: "127.0.0.1:9",
            policy: "",
        })?;
        let deadline = Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(bytes) = self.next_control(left)? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("edge closed without answering Bind {endpoint}"),
                ));
            };
            match Control::decode(&bytes) {
                Ok(Control::BindOk { endpoint: e, url }) if e == endpoint => {
                    return Ok(Ok(url.to_owned()))
                }
                Ok(Control::BindErr {
                    endpoint: e,
                    code,
                    rule,
                    message,
                }) if e == endpoint => {
                    return Ok(Err(BindRefusal {
                        code: ErrorCode(code),
                        rule: rule.to_owned(),
                        message: message.to_owned(),
                    }))
                }
                // An answer for another endpoint, or a message we do not wait for.
                _ => {}
            }
        }
    }

    /// Reads (and keeps) frames until `count` OPENs from the edge have
    /// arrived in all, or `t` passes; returns their ids.
    pub fn wait_opens(&mut self, count: usize, t: Duration) -> io::Result<Vec<StreamId>> {
        let deadline = Instant::now() + t;
        let opened = |fs: &[Frame]| -> Vec<StreamId> {
            fs.iter()
                .filter(|f| f.header.kind == FrameKind::Open)
                .filter_map(|f| f.header.stream)
                .collect()
        };
        loop {
            let ids = opened(&self.frames);
            if ids.len() >= count {
                return Ok(ids);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                Ok(Some(f)) => self.frames.push(f),
                Ok(None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("edge closed after {} of {count} OPENs", ids.len()),
                    ))
                }
                Err(e) if is_timeout(&e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{} of {count} OPENs within {t:?}", ids.len()),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads until a `GOAWAY` arrives or the edge closes, at most `t`:
    /// the GOAWAY's code (None: closed without one). `Err(TimedOut)` if
    /// neither happened.
    pub fn wait_goaway(&mut self, t: Duration) -> io::Result<Option<ErrorCode>> {
        let deadline = Instant::now() + t;
        loop {
            if let Some((_, code)) = self.goaway {
                return Ok(Some(code));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left)? {
                None => return Ok(self.goaway.map(|g| g.1)),
                Some(f) => self.frames.push(f),
            }
        }
    }

    /// Reads and discards until the edge closes the connection, at most
    /// `t`; returns whether it did.
    pub fn wait_closed(&mut self, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                Ok(None) => return true,
                Ok(Some(_)) => {}
                Err(e) if is_timeout(&e) => return false,
                // A reset or a broken record: the edge is gone.
                Err(_) => return true,
            }
        }
    }
}
