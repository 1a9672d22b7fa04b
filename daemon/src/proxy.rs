//! One tunnel stream joined to one upstream TCP connection.
//!
//! For each stream the edge opens, the daemon connects to the endpoint's
//! upstream (with the endpoint's `connect_timeout_ms`; on failure the stream
//! is reset with `CONNECT_FAILED`), then copies bytes both ways with
//! half-close: EOF from the upstream closes the stream's write half (a `FIN`
//! to the edge), EOF from the stream shuts down the write half of the TCP
//! connection. When both directions are done, or either side fails, both are
//! dropped. A connection that moves no byte in either direction (no read,
//! no write on either side) for the endpoint's `idle_timeout_ms` is closed
//! on both sides: the stream is reset with `CANCEL` and the upstream
//! connection shut down. The idle timer is one async-io `Timer` per stream,
//! moved only when it fires (activity just records the time).
//!
//! The two directions copy differently:
//! - upstream → stream reads the upstream into a copy buffer of
//!   [`COPY_BUFFER`] bytes and writes that into the stream (the mux copies
//!   it into its transmit queue);
//! - stream → upstream has no buffer: the stream's received bytes go from
//!   the mux's receive window straight into the upstream socket
//!   ([`Stream::poll_write_received`], one `writev` of whatever has
//!   arrived), which saves a copy per byte and makes the writes as large as
//!   the data allows.
//!
//! With `proxy_protocol = "v2"` the PROXY v2 header ([`crate::proxy_header`]:
//! the public client from the stream's metadata, the upstream's address, the
//! SNI and a verified client certificate's CN) is written to the upstream
//! before any of the stream's bytes, from a small buffer of its own that
//! lives only until it is written.
//!
//! Memory: each stream owns one copy buffer of [`COPY_BUFFER`] bytes,
//! allocated when the stream starts and freed when it ends. The
//! multiplexer refuses streams past `max_streams`, so the copy buffers add at
//! most `max_streams × COPY_BUFFER` to the session's fixed buffers; no
//! buffer grows with traffic. A slow reader on one side stops only that
//! direction of that stream (the mux's per-stream credit does the rest).

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_io::Timer;
use async_net::TcpStream;
use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::FutureExt;
use log::{debug, info, warn};
use tether_driver::{Meta, Stream, WakeGate};
use tether_proto::ErrorCode;

use crate::config::{HostPort, ProxyProtocol};
use crate::proxy_header::Header;

/// Bytes of the copy buffer of a stream (upstream → stream): two frames'
/// payload, so one `recv` from the upstream fills two `DATA` frames.
pub const COPY_BUFFER: usize = 32 * 1024;

/// Room for the PROXY v2 header: its fixed part and addresses (52 bytes)
/// and three record heads, plus the SNI and CN, which come from the
/// stream's metadata and so fit in [`tether_proto::MAX_META`] together.
const PROXY_HEADER_BUFFER: usize = 64 + tether_proto::MAX_META;

/// How long a stream may wait for its upstream, and stay silent once joined.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Connecting to the upstream; on expiry the stream is reset with
    /// `CONNECT_FAILED`.
    pub connect: Duration,
    /// No byte in either direction; on expiry both sides are closed.
    pub idle: Duration,
}

/// How the copy ended.
enum End {
    /// Both directions reached EOF and were closed.
    Done,
    /// One side failed.
    Failed(&'static str, io::Error),
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Serves one stream: connect to `upstream`, write the PROXY header if
/// `proxy_protocol` asks for one, then copy until both ways end or nothing
/// moves for `timeouts.idle`.
pub async fn serve(
    mut stream: Stream,
    upstream: &HostPort,
    timeouts: Timeouts,
    proxy_protocol: Option<ProxyProtocol>,
) {
    let connect_timeout = timeouts.connect;
    let meta = stream.meta();
    let id = stream.id();
    let peer = meta
        .as_ref()
        .and_then(|m| m.peer)
        .map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    let endpoint = meta
        .as_ref()
        .map_or("?", |m| m.endpoint.as_str())
        .to_owned();

    let connect = async {
        TcpStream::connect((upstream.host.as_str(), upstream.port))
            .await
            .map_err(|e| e.to_string())
    };
    let timed_out = async {
        Timer::after(connect_timeout).await;
        Err(format!(
            "timed out after {} ms",
            connect_timeout.as_millis()
        ))
    };
    let mut tcp = match connect.or(timed_out).await {
        Ok(t) => t,
        Err(e) => {
            warn!("{endpoint} {id} from {peer}: cannot connect to upstream {upstream}: {e}; resetting with CONNECT_FAILED");
            stream.reset(ErrorCode::CONNECT_FAILED);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);

    let mut down = Pump::new(); // upstream -> stream (towards the public client)
    let mut up = Forward::default(); // stream -> upstream
                                     // The header goes first: `up` writes it before the stream's first byte.
    let header = match proxy_protocol {
        None => Ok(0),
        Some(ProxyProtocol::V2) => {
            up.header = vec![0u8; PROXY_HEADER_BUFFER];
            proxy_v2_header(meta.as_ref(), &tcp, &mut up.header)
        }
    };
    let header_len = match header {
        Ok(n) => n,
        Err(e) => {
            warn!("{endpoint} {id} from {peer}: cannot write the PROXY v2 header to {upstream}: {e}; resetting with CONNECT_FAILED");
            stream.reset(ErrorCode::CONNECT_FAILED);
            let _ = tcp.shutdown(Shutdown::Both);
            return;
        }
    };
    up.header.truncate(header_len);
    let with_header = if header_len > 0 { " (PROXY v2)" } else { "" };
    match meta.as_ref().and_then(|m| m.client.as_ref()) {
        // The edge verified the certificate; its names are still escaped,
        // so that none can forge a log line.
        Some(c) => info!(
            "{endpoint} {id} from {peer}: connected to {upstream}{with_header}; client certificate subject {}, names {}, sha256 {}",
            crate::printable(&c.subject),
            if c.names.is_empty() { "-".into() } else { crate::printable(&c.names) },
            c.fingerprint()
        ),
        None => info!("{endpoint} {id} from {peer}: connected to {upstream}{with_header}"),
    }
    let idle = timeouts.idle;
    let mut idle_timer = Timer::after(idle);
    let mut last_moved = Instant::now();
    // Each direction runs only when its own waker fired: polling both on
    // every wake-up would make the idle one try its socket (a recv that
    // fails with EAGAIN, and an epoll_ctl) each time the busy one moves.
    let (down_gate, up_gate) = (WakeGate::new(), WakeGate::new());
    let result = std::future::poll_fn(|cx| {
        let before = down.moves + up.moves;
        let d = match down.done {
            true => Poll::Ready(Ok(())),
            false => down_gate.poll(cx, |cx| down.poll(cx, &mut tcp, &mut stream)),
        };
        let u = match up.done {
            true => Poll::Ready(Ok(())),
            false => up_gate.poll(cx, |cx| up.poll(cx, &stream, &mut tcp)),
        };
        match (d, u) {
            (Poll::Ready(Err(e)), _) => return Poll::Ready(End::Failed("upstream", e)),
            (_, Poll::Ready(Err(e))) => return Poll::Ready(End::Failed("stream", e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(End::Done),
            _ => {}
        }
        if down.moves + up.moves != before {
            last_moved = Instant::now();
        }
        // The timer is re-armed only when it fires, at the last move + idle.
        while Pin::new(&mut idle_timer).poll(cx).is_ready() {
            let deadline = last_moved + idle;
            if Instant::now() >= deadline {
                return Poll::Ready(End::Idle);
            }
            idle_timer.set_at(deadline);
        }
        Poll::Pending
    })
    .await;
    match result {
        End::Done => debug!(
            "{endpoint} {id} from {peer}: done, {} bytes to the client, {} to the upstream",
            down.total,
            up.total.saturating_sub(header_len as u64)
        ),
        End::Failed(side, e) => {
            info!("{endpoint} {id} from {peer}: ended on {side} error: {e}");
            // Dropping an unfinished stream resets it with CANCEL; say so at once.
            stream.reset(ErrorCode::CANCEL);
            let _ = tcp.shutdown(Shutdown::Both);
        }
        End::Idle => {
            info!(
                "{endpoint} {id} from {peer}: idle for {} ms (idle_timeout_ms); closing both sides",
                idle.as_millis()
            );
            stream.reset(ErrorCode::CANCEL);
            let _ = tcp.shutdown(Shutdown::Both);
        }
    }
}

/// Writes the PROXY v2 header of a stream into `buf`: the public client
/// (`meta.peer`) as source, the upstream `tcp` is connected to as
/// destination, the SNI and a verified client certificate's CN as records.
fn proxy_v2_header(meta: Option<&Meta>, tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let source = meta.and_then(|m| m.peer);
    let addresses = match source {
        Some(src) => Some((src, tcp.peer_addr()?)),
        None => None,
    };
    let header = Header {
        addresses,
        authority: meta.and_then(|m| m.sni.as_deref()),
        verified_client_cn: meta
            .and_then(|m| m.client.as_ref())
            .map(|c| c.common_name.as_str()),
    };
    header.encode(buf).map_err(io::Error::other)
}

/// The end of either direction: `w`'s write half is closed (a FIN), after
/// which the direction is `done`.
fn close_writer<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    w: &mut W,
    done: &mut bool,
    moves: &mut u64,
) -> Poll<io::Result<()>> {
    match Pin::new(w).poll_close(cx) {
        Poll::Ready(Ok(())) => {
            *done = true;
            *moves += 1;
            Poll::Ready(Ok(()))
        }
        other => other,
    }
}

/// The stream → upstream direction: the PROXY header if there is one, then
/// the stream's bytes straight from its receive window, then the upstream's
/// write half is shut down (half-close).
#[derive(Default)]
struct Forward {
    /// The PROXY v2 header, written from `header[hpos..]` first.
    header: Vec<u8>,
    hpos: usize,
    eof: bool,
    done: bool,
    total: u64,
    /// Writes and closes that completed: activity, for the idle timer.
    moves: u64,
}

impl Forward {
    /// Moves what it can from `stream` to `w`; `Ready(Ok)` once the stream
    /// ended and `w` was closed.
    fn poll<W>(&mut self, cx: &mut Context<'_>, stream: &Stream, w: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.hpos < self.header.len() {
                match Pin::new(&mut *w).poll_write(cx, &self.header[self.hpos..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.hpos += n;
                        self.total += n as u64;
                        self.moves += 1;
                        if self.hpos == self.header.len() {
                            self.header = Vec::new(); // its memory goes now
                            self.hpos = 0;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                return close_writer(cx, w, &mut self.done, &mut self.moves);
            }
            match stream.poll_write_received(cx, w) {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    self.moves += 1;
                }
                Poll::Ready(Ok(n)) => {
                    self.total += n as u64;
                    self.moves += 1;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The upstream → stream direction of a copy: a fixed buffer, read until
/// EOF, then close the writer (half-close).
struct Pump {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    eof: bool,
    done: bool,
    total: u64,
    /// Reads, writes and closes that completed: activity, for the idle timer.
    moves: u64,
}

impl Pump {
    fn new() -> Pump {
        Pump {
            buf: vec![0u8; COPY_BUFFER].into_boxed_slice(),
            pos: 0,
            end: 0,
            eof: false,
            done: false,
            total: 0,
            moves: 0,
        }
    }

    /// Moves what it can from `r` to `w`; `Ready(Ok)` once `r` ended and `w`
    /// was closed.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pos < self.end {
                match Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.end]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.total += n as u64;
                        self.moves += 1;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                return close_writer(cx, w, &mut self.done, &mut self.moves);
            }
            match Pin::new(&mut *r).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    self.moves += 1;
                }
                Poll::Ready(Ok(n)) => {
                    self.pos = 0;
                    self.end = n;
                    self.moves += 1;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Flush what was written so far (a no-op for both kinds here).
                    let _ = Pin::new(&mut *w).poll_flush(cx);
                    return Poll::Pending;
                }
            }
        }
    }
}
