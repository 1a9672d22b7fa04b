//! A byte ring over a region of memory that the caller passes in on each call.
//!
//! The ring stores only its head and length, so many rings can share one
//! caller-owned buffer (one region per stream) without self-references.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ring {
    head: usize,
    len: usize,
}

impl Ring {
    pub(crate) const EMPTY: Ring = Ring { head: 0, len: 0 };

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn free(&self, cap: usize) -> usize {
        cap - self.len
    }

    pub(crate) fn clear(&mut self) {
        *self = Ring::EMPTY;
    }

    /// Appends `data`; the caller has checked that it fits.
    pub(crate) fn push(&mut self, mem: &mut [u8], data: &[u8]) {
        let cap = mem.len();
        debug_assert!(data.len() <= cap - self.len, "ring overflow");
        let tail = (self.head + self.len) % cap.max(1);
        let first = data.len().min(cap - tail);
        mem[tail..tail + first].copy_from_slice(&data[..first]);
        mem[..data.len() - first].copy_from_slice(&data[first..]);
        self.len += data.len();
    }

    /// Copies up to `out.len()` bytes from the front without consuming them.
    pub(crate) fn peek(&self, mem: &[u8], out: &mut [u8]) -> usize {
        let cap = mem.len();
        let n = out.len().min(self.len);
        let first = n.min(cap - self.head);
        out[..first].copy_from_slice(&mem[self.head..self.head + first]);
        out[first..n].copy_from_slice(&mem[..n - first]);
        n
    }

    /// The queued bytes in order, as up to two slices of `mem` (the second is
    /// non-empty only when the bytes wrap around the end of `mem`).
    pub(crate) fn slices<'m>(&self, mem: &'m [u8]) -> (&'m [u8], &'m [u8]) {
        let first = self.len.min(mem.len() - self.head);
        (&mem[self.head..self.head + first], &mem[..self.len - first])
    }

    /// Keeps only the first `n` queued bytes.
    pub(crate) fn truncate(&mut self, n: usize) {
        if n < self.len {
            self.len = n;
            if n == 0 {
                self.head = 0;
            }
        }
    }

    /// Drops `n` bytes from the front.
    pub(crate) fn consume(&mut self, cap: usize, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        self.head = if self.len == 0 {
            0
        } else {
            (self.head + n) % cap
        };
    }

    /// Moves up to `out.len()` bytes from the front into `out` (the mux
    /// reads through [`Ring::slices`] and [`Ring::consume`]; the tests use this).
    #[cfg(test)]
    pub(crate) fn pop(&mut self, mem: &[u8], out: &mut [u8]) -> usize {
        let n = self.peek(mem, out);
        self.consume(mem.len(), n);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around_and_keeps_order() {
        let mut mem = [0u8; 5];
        let mut r = Ring::EMPTY;
        r.push(&mut mem, b"abc");
        let mut out = [0u8; 2];
        assert_eq!(r.pop(&mem, &mut out), 2);
        assert_eq!(&out, b"ab");
        r.push(&mut mem, b"defg");
        assert_eq!(r.free(5), 0);
        let mut out = [0u8; 8];
        assert_eq!(r.pop(&mem, &mut out), 5);
        assert_eq!(&out[..5], b"cdefg");
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn slices_follow_the_wrap() {
        let mut mem = [0u8; 5];
        let mut r = Ring::EMPTY;
        r.push(&mut mem, b"abcd");
        r.consume(5, 3);
        r.push(&mut mem, b"efg");
        assert_eq!(r.slices(&mem), (&b"de"[..], &b"fg"[..]));
        r.truncate(3);
        assert_eq!(r.slices(&mem), (&b"de"[..], &b"f"[..]));
        r.truncate(0);
        assert_eq!(r.slices(&mem), (&b""[..], &b""[..]));
    }
}
