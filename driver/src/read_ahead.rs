//! [`ReadAhead`]: a pipe whose reads are served from one fixed buffer that
//! each read of the inner pipe fills as far as it can.
//!
//! rustls reads TLS records from the socket into its own buffer in pieces
//! of about 4 KiB (its deframer asks for `used + 4096` bytes at a time, and
//! shrinks back to 4 KiB whenever it is drained), so a 16 KiB record costs
//! several `recv` calls and the last of them usually fails with `EAGAIN`.
//! Put between the TCP socket and the TLS layer, `ReadAhead` turns that into
//! one `recv` per [`ReadAhead::capacity`] bytes at the price of one memory
//! copy, which is much cheaper than the system calls it saves (measured:
//! `scripts/bench tunnel`, README "Performance").
//!
//! Writes go straight through, vectored writes included (rustls writes every
//! queued record with one `writev`); `futures_lite::io::BufReader` would
//! turn those into one `write` per record, which is why this type exists.
//!
//! Memory: the buffer is allocated once, in [`ReadAhead::new`] or by
//! [`ReadAhead::set_capacity`], and never grows. With capacity 0 (a
//! [`ReadAhead::passthrough`]) nothing is allocated and every read goes
//! straight to the inner pipe: the edge starts an agent's connection so and
//! gives it the buffer once the agent has authenticated, so that a
//! connection still in its handshake costs no 64 KiB.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};

/// The read-ahead both programs put under the tunnel's TLS: 64 KiB, so that
/// one `recv` takes about four full TLS records.
pub const READ_AHEAD: usize = 64 * 1024;

/// `T` with its reads buffered through a fixed buffer (module docs).
pub struct ReadAhead<T> {
    inner: T,
    buf: Box<[u8]>,
    /// `buf[pos..end]` has been read from `inner` and not yet handed out.
    pos: usize,
    end: usize,
}

impl<T> ReadAhead<T> {
    /// Wraps `inner` with a read buffer of `capacity` bytes (0: none, as
    /// [`ReadAhead::passthrough`]).
    pub fn new(inner: T, capacity: usize) -> ReadAhead<T> {
        ReadAhead {
            inner,
            buf: vec![0u8; capacity].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    /// Wraps `inner` with no buffer yet: reads go straight through until
    /// [`ReadAhead::set_capacity`] gives it one.
    pub fn passthrough(inner: T) -> ReadAhead<T> {
        ReadAhead::new(inner, 0)
    }

    /// Gives the pipe a read buffer of `capacity` bytes, allocated now. The
    /// bytes still buffered are kept: the new buffer is at least as large.
    pub fn set_capacity(&mut self, capacity: usize) {
        let keep = self.end - self.pos;
        let mut buf = vec![0u8; capacity.max(keep)].into_boxed_slice();
        buf[..keep].copy_from_slice(&self.buf[self.pos..self.end]);
        self.buf = buf;
        self.pos = 0;
        self.end = keep;
    }

    /// The inner pipe.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The inner pipe, mutably. Reading from it directly skips what is
    /// buffered here.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The buffer's size.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Bytes read from the inner pipe and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.end - self.pos
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.pos == this.end {
            // Nothing buffered: a read at least as large as the buffer goes
            // straight to the caller (every read, with no buffer), anything
            // smaller fills the buffer.
            if out.len() >= this.buf.len() {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let n = match Pin::new(&mut this.inner).poll_read(cx, &mut this.buf) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            this.pos = 0;
            this.end = n;
            if n == 0 {
                return Poll::Ready(Ok(0)); // end of stream
            }
        }
        let n = out.len().min(this.end - this.pos);
        out[..n].copy_from_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(n))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::io::{AsyncReadExt, AsyncWriteExt, Cursor};

    /// A pipe that counts the reads and vectored writes it was asked for.
    struct Counting {
        data: Cursor<Vec<u8>>,
        reads: usize,
        writev: usize,
        written: Vec<u8>,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            self.reads += 1;
            Pin::new(&mut self.data).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.writev += 1;
            let mut n = 0;
            for b in bufs {
                self.written.extend_from_slice(b);
                n += b.len();
            }
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn counting(len: usize) -> Counting {
        Counting {
            data: Cursor::new((0..len).map(|i| (i % 251) as u8).collect()),
            reads: 0,
            writev: 0,
            written: Vec::new(),
        }
    }

    #[test]
    fn small_reads_are_served_from_one_inner_read_in_order() {
        futures_lite::future::block_on(async {
            let mut p = ReadAhead::new(counting(10_000), 8192);
            let mut got = Vec::new();
            let mut piece = [0u8; 100];
            loop {
                let n = p.read(&mut piece).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&piece[..n]);
            }
            let want: Vec<u8> = (0..10_000).map(|i| (i % 251) as u8).collect();
            assert_eq!(got, want);
            // 8192 + 1808 + the read that saw the end: not 101 reads.
            assert_eq!(p.get_ref().reads, 3);
        });
    }

    #[test]
    fn a_read_as_large_as_the_buffer_bypasses_it() {
        futures_lite::future::block_on(async {
            let mut p = ReadAhead::new(counting(5000), 1024);
            let mut big = vec![0u8; 4096];
            assert_eq!(p.read(&mut big).await.expect("read"), 4096);
            assert_eq!(p.buffered(), 0);
            let mut small = [0u8; 10];
            assert_eq!(p.read(&mut small).await.expect("read"), 10);
            // The other 904 bytes came in one read; 10 of them are out.
            assert_eq!(p.buffered(), 894);
            assert_eq!(small[0], (4096 % 251) as u8);
        });
    }

    #[test]
    fn a_passthrough_buffers_nothing_until_it_is_given_a_capacity() {
        futures_lite::future::block_on(async {
            let mut p = ReadAhead::passthrough(counting(3000));
            assert_eq!(p.capacity(), 0);
            let mut piece = [0u8; 10];
            for _ in 0..3 {
                assert_eq!(p.read(&mut piece).await.expect("read"), 10);
            }
            assert_eq!(p.get_ref().reads, 3, "one inner read per read");
            assert_eq!(p.buffered(), 0);
            p.set_capacity(1024);
            assert_eq!(p.read(&mut piece).await.expect("read"), 10);
            assert_eq!(p.buffered(), 1014);
            assert_eq!(piece[0], 30u8, "the bytes go on in order");
            p.set_capacity(4096); // keeps what is buffered
            let mut rest = Vec::new();
            p.read_to_end(&mut rest).await.expect("read");
            let want: Vec<u8> = (40..3000).map(|i| (i % 251) as u8).collect();
            assert_eq!(rest, want);
        });
    }

    #[test]
    fn vectored_writes_reach_the_inner_pipe_as_one_call() {
        futures_lite::future::block_on(async {
            let mut p = ReadAhead::new(counting(0), 64);
            let bufs = [
                IoSlice::new(b"ab"),
                IoSlice::new(b"cd"),
                IoSlice::new(b"ef"),
            ];
            let n = std::future::poll_fn(|cx| Pin::new(&mut p).poll_write_vectored(cx, &bufs))
                .await
                .expect("writev");
            assert_eq!(n, 6);
            assert_eq!(p.get_ref().writev, 1);
            p.write_all(b"gh").await.expect("write");
            p.flush().await.expect("flush");
            assert_eq!(p.get_ref().written, b"abcdefgh");
        });
    }
}
