//! The admission flood of issue 6: from one source address, a number of
//! idle TCP sockets on the edge's agent port (each reopened as soon as the
//! edge closes it) and a continuous stream of TLS connections that send a
//! `Hello` with a bad token, alternately malformed and well-formed but
//! unknown. Used by the admission test and by `scripts/bench bounds`.
//!
//! It runs on its own threads until dropped, and counts what it did.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use crate::raw::{Dial, RawAgent};
use crate::sys;

/// What to flood and how hard.
#[derive(Clone, Debug)]
pub struct FloodConfig {
    /// The edge's agent port.
    pub target: SocketAddr,
    /// Where every connection comes from (e.g. 127.0.0.2).
    pub source: IpAddr,
    /// Idle TCP sockets to hold.
    pub idle: usize,
    /// Threads that each send bad Hellos back to back.
    pub hello_workers: usize,
    /// Most idle sockets reopened per sweep (a sweep every 100 ms), so that
    /// the flood's own connect rate stays bounded on a small machine.
    pub reopen_per_sweep: usize,
}

impl FloodConfig {
    /// The flood of the admission test: 500 idle sockets and 4 Hello workers.
    pub fn admission(target: SocketAddr, source: IpAddr) -> FloodConfig {
        FloodConfig {
            target,
            source,
            idle: 500,
            hello_workers: 4,
            reopen_per_sweep: 200,
        }
    }
}

/// Counters of a running flood.
#[derive(Debug, Default)]
pub struct FloodStats {
    /// Idle-socket connects started (the first `idle` and every reopen).
    pub idle_connects: AtomicU64,
    /// Idle sockets that were open (not closed by the edge) at the last sweep.
    pub idle_open: AtomicU64,
    /// Idle sockets the edge closed (found at a sweep).
    pub idle_closed: AtomicU64,
    /// Bad-Hello connections started.
    pub hello_attempts: AtomicU64,
    /// Bad Hellos sent (TLS completed).
    pub hellos_sent: AtomicU64,
    /// Bad Hellos answered with `Error`.
    pub hellos_refused: AtomicU64,
}

/// A snapshot of [`FloodStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodCounts {
    /// See [`FloodStats::idle_connects`].
    pub idle_connects: u64,
    /// See [`FloodStats::idle_open`].
    pub idle_open: u64,
    /// See [`FloodStats::idle_closed`].
    pub idle_closed: u64,
    /// See [`FloodStats::hello_attempts`].
    pub hello_attempts: u64,
    /// See [`FloodStats::hellos_sent`].
    pub hellos_sent: u64,
    /// See [`FloodStats::hellos_refused`].
    pub hellos_refused: u64,
}

/// A running flood; stopped (every socket closed) when dropped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    stats: Arc<FloodStats>,
    ready: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// A token of the right form (`tk_<12 hex>.<43 base64url>`) that no store knows.
pub const UNKNOWN_TOKEN: &str = "tk_0123456789ab.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
/// A token of the wrong form.
pub const MALFORMED_TOKEN: &str = "not-a-token";

impl Flood {
    /// Starts the flood; `tls` trusts the edge's CA. Returns once the first
    /// `idle` connects have been started.
    pub fn start(cfg: FloodConfig, tls: Arc<ClientConfig>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(FloodStats::default());
        let ready = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (stop, stats, ready, cfg) =
                (stop.clone(), stats.clone(), ready.clone(), cfg.clone());
            threads.push(thread::spawn(move || {
                idle_sockets(&cfg, &stop, &stats, &ready)
            }));
        }
        for w in 0..cfg.hello_workers {
            let (stop, stats, cfg, tls) = (stop.clone(), stats.clone(), cfg.clone(), tls.clone());
            threads.push(thread::spawn(move || {
                bad_hellos(w, &cfg, &tls, &stop, &stats)
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.load(Ordering::SeqCst) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        Flood {
            stop,
            stats,
            ready,
            threads,
        }
    }

    /// Whether the first `idle` connects were all started.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The counters now.
    pub fn counts(&self) -> FloodCounts {
        let s = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FloodCounts {
            idle_connects: g(&s.idle_connects),
            idle_open: g(&s.idle_open),
            idle_closed: g(&s.idle_closed),
            hello_attempts: g(&s.hello_attempts),
            hellos_sent: g(&s.hellos_sent),
            hellos_refused: g(&s.hellos_refused),
        }
    }

    /// Stops every thread and closes every socket; returns the final counts.
    pub fn stop(mut self) -> FloodCounts {
        self.halt();
        self.counts()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}

fn idle_sockets(cfg: &FloodConfig, stop: &AtomicBool, stats: &FloodStats, ready: &AtomicBool) {
    let open = || {
        stats.idle_connects.fetch_add(1, Ordering::Relaxed);
        sys::start_connect(cfg.target, Some(cfg.source)).ok()
    };
    let mut socks: Vec<Option<TcpStream>> = (0..cfg.idle).map(|_| open()).collect();
    ready.store(true, Ordering::SeqCst);
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(100));
        let mut reopened = 0;
        let mut alive = 0;
        for s in socks.iter_mut() {
            let closed = s.as_ref().is_none_or(sys::is_closed);
            if closed {
                if s.is_some() {
                    stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                    *s = None;
                }
                if reopened < cfg.reopen_per_sweep {
                    reopened += 1;
                    *s = open();
                }
            } else {
                alive += 1;
            }
        }
        stats.idle_open.store(alive, Ordering::Relaxed);
    }
}

fn bad_hellos(
    worker: usize,
    cfg: &FloodConfig,
    tls: &Arc<ClientConfig>,
    stop: &AtomicBool,
    stats: &FloodStats,
) {
    let dial = Dial {
        addr: cfg.target,
        source: Some(cfg.source),
        rcvbuf: None,
        timeout: Duration::from_secs(2),
    };
    let mut n = worker;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        stats.hello_attempts.fetch_add(1, Ordering::Relaxed);
        let Ok(mut a) = RawAgent::connect(dial, tls) else {
            // Closed at accept or during TLS: the edge's admission at work.
            // Pace the retry a little so a refusing edge is not spun on.
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        let token = if n.is_multiple_of(2) {
            MALFORMED_TOKEN
        } else {
            UNKNOWN_TOKEN
        };
        if a.send_hello(token).is_err() {
            continue;
        }
        stats.hellos_sent.fetch_add(1, Ordering::Relaxed);
        if let Ok(Some(bytes)) = a.next_control(Duration::from_secs(2)) {
            if matches!(
                tether_proto::Control::decode(&bytes),
                Ok(tether_proto::Control::Error { .. })
            ) {
                stats.hellos_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
