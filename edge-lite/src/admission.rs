//! Admission on the agent port: how many connections may be between TCP
//! accept and the answer to their `Hello`, per source and in all.
//!
//! A source is an IPv4 address or an IPv6 /64 (one subscriber's prefix); an
//! IPv4-mapped IPv6 address counts as its IPv4 address. A connection over
//! either cap is closed at accept, before any TLS work; one under them holds
//! a [`Pending`] slot until it is answered (or times out), which frees it.
//! Nothing here is allocated per connection beyond one map entry per source
//! with pending handshakes.
//!
//! Pure bookkeeping behind a mutex: no I/O, no clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// The unit a per-source cap counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address.
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl Source {
    /// The source `ip` counts as.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// Its source holds `per_source` pending handshakes.
    Source,
    /// `total` handshakes are pending.
    Total,
}

#[derive(Debug, Default)]
struct Inner {
    by_source: HashMap<Source, usize>,
    total: usize,
}

/// The caps and the counts; see the module docs.
#[derive(Debug)]
pub struct Admission {
    per_source: usize,
    total: usize,
    inner: Mutex<Inner>,
}

/// One admitted, unanswered handshake; dropping it frees its slot.
#[derive(Debug)]
pub struct Pending {
    admission: Arc<Admission>,
    source: Source,
}

impl Admission {
    /// Caps of `per_source` per source and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Arc<Admission> {
        Arc::new(Admission {
            per_source,
            total,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Counts updated in single steps: a panic elsewhere leaves them consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection from `ip`, or why there is none.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, Busy> {
        let source = Source::of(ip);
        let mut inner = self.lock();
        if inner.total >= self.total {
            return Err(Busy::Total);
        }
        let n = inner.by_source.entry(source).or_insert(0);
        if *n >= self.per_source {
            return Err(Busy::Source);
        }
        *n += 1;
        inner.total += 1;
        Ok(Pending {
            admission: self.clone(),
            source,
        })
    }

    /// Pending handshakes in all, and sources with some.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.total, inner.by_source.len())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut inner = self.admission.lock();
        inner.total = inner.total.saturating_sub(1);
        if let Some(n) = inner.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                inner.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_cap_and_others_still_get_in() {
        let a = Admission::new(2, 10);
        let p1 = a.try_admit(ip("127.0.0.2")).unwrap();
        let _p2 = a.try_admit(ip("127.0.0.2")).unwrap();
        assert_eq!(a.try_admit(ip("127.0.0.2")).unwrap_err(), Busy::Source);
        let _q = a.try_admit(ip("127.0.0.1")).unwrap();
        drop(p1);
        let _p3 = a.try_admit(ip("127.0.0.2")).unwrap();
        assert_eq!(a.counts(), (3, 2));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a = Admission::new(1, 10);
        let _p = a.try_admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            a.try_admit(ip("2001:db8:1:2:ffff::9")).unwrap_err(),
            Busy::Source
        );
        let _q = a.try_admit(ip("2001:db8:1:3::1")).unwrap();
        let _r = a.try_admit(ip("192.0.2.7")).unwrap();
        assert_eq!(
            a.try_admit(ip("::ffff:192.0.2.7")).unwrap_err(),
            Busy::Source
        );
    }

    #[test]
    fn the_total_cap_holds_and_slots_come_back() {
        let a = Admission::new(5, 2);
        let p = a.try_admit(ip("10.0.0.1")).unwrap();
        let _q = a.try_admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.try_admit(ip("10.0.0.3")).unwrap_err(), Busy::Total);
        drop(p);
        assert!(a.try_admit(ip("10.0.0.3")).is_ok());
        drop(_q);
        assert_eq!(a.counts(), (0, 0));
    }
}
