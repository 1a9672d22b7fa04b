//! A pass-through pipe that counts the `CONTROL` frames written through it.
//!
//! PROTOCOL.md and the contract want a refusal to reach the agent as
//! `Error` followed by `GOAWAY(code)`. The driver's `goaway` with an error
//! code closes the mux at once and drops control frames still queued, so the
//! edge must know that its `Error` frame left before it calls `goaway`. The
//! driver does not say; this wrapper does, by following the frame headers in
//! the bytes the driver writes (frames are written whole and in order).
//!
//! It does not change or buffer any byte.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};
use tether_proto::{FrameKind, HEADER_LEN};

/// Counts whole `CONTROL` frames written to `T`.
pub struct Tap<T> {
    io: T,
    written: Arc<AtomicU64>,
    header: [u8; HEADER_LEN],
    header_len: usize,
    remaining: usize,
    in_control: bool,
}

impl<T> Tap<T> {
    /// Wraps `io`; the counter is shared with whoever waits on it.
    pub fn new(io: T, written: Arc<AtomicU64>) -> Tap<T> {
        Tap {
            io,
            written,
            header: [0; HEADER_LEN],
            header_len: 0,
            remaining: 0,
            in_control: false,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                if self.remaining == 0 && self.in_control {
                    self.written.fetch_add(1, Ordering::SeqCst);
                }
                continue;
            }
            let n = (HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == HEADER_LEN {
                self.header_len = 0;
                self.in_control = self.header[0] == FrameKind::Control as u8;
                self.remaining = u16::from_be_bytes([self.header[2], self.header[3]]) as usize;
                if self.remaining == 0 && self.in_control {
                    self.written.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.feed(&buf[..n]);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_control_frames_across_split_writes() {
        let n = Arc::new(AtomicU64::new(0));
        let mut t = Tap::new((), n.clone());
        // DATA (3 bytes), CONTROL (2 bytes), PING (8 bytes), CONTROL (0 bytes).
        let mut wire = vec![0, 1, 0, 3, 0, 0, 0, 1, 9, 9, 9];
        wire.extend_from_slice(&[5, 0, 0, 2, 0, 0, 0, 0, 1, 2]);
        wire.extend_from_slice(&[4, 0, 0, 8, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        wire.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0]);
        for chunk in wire.chunks(3) {
            t.feed(chunk);
        }
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}
