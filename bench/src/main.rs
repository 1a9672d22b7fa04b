//! `tether-bench tunnel`: the whole tunnel on loopback, next to a direct TCP
//! baseline. Run it through `scripts/bench tunnel`, which builds the release
//! binaries and passes their paths. `tether-bench bounds` (module [`bounds`],
//! `scripts/bench bounds`) measures what hostile peers can hold on the edge;
//! `tether-bench policy` (module [`policy`], `scripts/bench policy`) what
//! traffic policies cost it; `tether-bench ops` (module [`ops`],
//! `scripts/bench ops`) what an operator's actions cost: the API, Hello at
//! 100,000 tokens, a revoke with 1,000 sessions, a rotation round trip.
//!
//! What it starts (127.0.0.1 only, every port chosen by the OS and read back
//! from the programs' stdout lines, as `scripts/demo` does; `scripts/bench`
//! runs it in a private network namespace when it can):
//! - two upstreams in this process: a *sink* (reads until EOF, counting, then
//!   replies with the count as 8 bytes little-endian and closes) and an *echo*;
//! - a third upstream, `iperf3 -s` on its own port (a child; module [`iperf`];
//!   iperf3 must be installed);
//! - `tether-edge serve` with a tcp and a tls (SNI-routed) public listener, a
//!   PKI generated here with rcgen (CA, agent-port and wildcard certificates);
//! - `tetherd` (`--tetherd`, the device build) with five endpoints: `sink`,
//!   `echo` and `iperf` (kind tcp), `sink-tls` and `echo-tls` (kind tls), on
//!   the upstreams above;
//! - a second tetherd (`--tetherd-release`, the plain release build) on the
//!   same edge with its own token and the same five endpoints, named
//!   `rel-sink` ... `rel-iperf`.
//!
//! Every case runs on three paths, interleaved within each repetition:
//! `direct` (a TCP connection straight to the upstream: the baseline),
//! `tcp` (the edge's tcp endpoint port) and `tls` (the edge's shared TLS port,
//! client-side TLS 1.3 with rustls verifying the dev CA; the edge terminates
//! TLS and carries the plaintext as a stream). The latency and connection
//! cases add a fourth, `release`: the release tetherd's tcp endpoint.
//!
//! Cases (medians over `TETHER_BENCH_REPS` repetitions):
//! - iperf3 (module [`compare`]): `iperf3 -c -J -t TETHER_BENCH_IPERF_SECS`
//!   forward with 1 and 8 streams (`-P 8`) and reverse (`-R`), each direct
//!   and through both tetherds' `iperf` endpoints in turn, with tetherd's and
//!   the edge's CPU seconds per GB received;
//! - upload throughput, 1 and 8 concurrent streams: each stream writes
//!   `TETHER_BENCH_MB / streams` MiB in 64 KiB writes to the sink, half-closes
//!   and waits for the sink's count (which must match). Timed from when every
//!   stream is connected to when the last count arrives. Direction: public
//!   client -> device upstream. CPU seconds per GB (10^9 bytes) of tetherd and
//!   the edge from `/proc/PID/stat` utime+stime around each tunnel case;
//! - round-trip latency: 64-byte messages to the echo, one in flight,
//!   `TETHER_BENCH_RTT` round trips on one connection per route (after 200
//!   untimed), the routes taking turns every 50 round trips;
//! - new connections per second, and the p50/p99 time of each: connect (plus
//!   the TLS handshake on `tls`), 64-byte echo, half-close, read to EOF,
//!   close; repeated for `TETHER_BENCH_CONN_SECS` seconds per route and
//!   repetition, one at a time, the routes taking turns every half second;
//! - tetherd memory: VmRSS after connect + bind (idle, before any traffic) and
//!   VmHWM after 64 concurrent busy echo streams through the tcp endpoint
//!   (each writes and reads `TETHER_BENCH_PEAK_MB` MiB at once), checked
//!   against idle + `tetherd::session_memory_bound` of the default settings.
//!   Both tetherds' idle VmRSS, and the edge's at the same moments.
//!
//! It prints two tables: the cases above by route (direct, tcp, tls), then
//! the comparison of direct against the two tetherd builds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use rustls::client::WantsClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ConfigBuilder, RootCertStore, StreamOwned};
use tether_proto::{Config, Role};
use tether_tests::sys::{big_mappings, vm};
use tether_tests::Lines;

mod bounds;
mod compare;
mod iperf;
mod ops;
mod policy;

/// The domain of the TLS endpoints.
const DOMAIN: &str = "tether.bench";
/// The client's write size in the throughput cases.
const WRITE: usize = 64 * 1024;
/// The message of the latency and connection cases.
const MSG: usize = 64;
/// Concurrent streams of the peak-memory case (the default `max_streams`).
const PEAK_STREAMS: usize = 64;
/// Round trips per turn of a route in the latency case.
const LAT_BLOCK: usize = 50;
/// Seconds per turn of a route in the connection case.
const CONN_SLICE: f64 = 0.5;

type Res<T> = Result<T, String>;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("tether-bench: error: {e}");
        std::process::exit(1);
    }
}

struct Args {
    edge: PathBuf,
    tetherd: PathBuf,
    /// tunnel: the release build of tetherd, next to `tetherd`'s.
    tetherd_release: Option<PathBuf>,
    out: PathBuf,
    pidfile: Option<PathBuf>,
    /// tunnel: which network it runs in, as the caller says (`--net`).
    net: Option<String>,
}

/// Which benchmark the arguments name.
enum Bench {
    Tunnel,
    Bounds,
    Policy,
    Ops,
}

fn parse_args() -> Res<(Bench, Args)> {
    let mut it = std::env::args().skip(1);
    let usage = "usage: tether-bench tunnel|bounds|policy|ops --edge PATH --tetherd PATH --out FILE [--pidfile FILE]\n                    [--tetherd-release PATH (tunnel: required)] [--net LABEL (tunnel)]\n       tether-bench buffer-len";
    let bench = match it.next().as_deref() {
        Some("tunnel") => Bench::Tunnel,
        Some("bounds") => Bench::Bounds,
        Some("policy") => Bench::Policy,
        Some("ops") => Bench::Ops,
        Some("buffer-len") => {
            println!(
                "{}",
                tetherd::session_memory_bound(&Config::new(Role::Client))
            );
            std::process::exit(0);
        }
        _ => return Err(usage.into()),
    };
    let (mut edge, mut tetherd, mut out, mut pidfile) = (None, None, None, None);
    let (mut tetherd_release, mut net) = (None, None);
    while let Some(a) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{usage}"))?;
        match a.as_str() {
            "--edge" => edge = Some(PathBuf::from(v)),
            "--tetherd" => tetherd = Some(PathBuf::from(v)),
            "--tetherd-release" => tetherd_release = Some(PathBuf::from(v)),
            "--net" => net = Some(v),
            "--out" => out = Some(PathBuf::from(v)),
            "--pidfile" => pidfile = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown argument {a}\n{usage}")),
        }
    }
    Ok((
        bench,
        Args {
            edge: edge.ok_or(usage)?,
            tetherd: tetherd.ok_or(usage)?,
            tetherd_release,
            out: out.ok_or(usage)?,
            pidfile,
            net,
        },
    ))
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

// ---------------------------------------------------------------- processes

/// A running program, killed (and reaped) when dropped.
struct Proc {
    child: Child,
    out: Lines,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, args: &[&str], log: PathBuf, pidfile: Option<&Path>) -> Res<Proc> {
        let err = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        if let Some(p) = pidfile {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
            {
                let _ = writeln!(f, "{}", child.id());
            }
        }
        let out = Lines::default();
        let lines = out.clone();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines.push(line);
            }
        });
        Ok(Proc { child, out, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_line(&self, prefix: &str) -> Res<String> {
        self.out
            .wait(prefix, Duration::from_secs(30))
            .ok_or_else(|| {
                format!(
                    "timed out waiting for '{prefix}'; log {}:\n{}",
                    self.log.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            })
    }

    /// SIGTERM (graceful), then SIGKILL after a grace period.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn last_addr(line: &str) -> Res<SocketAddr> {
    let a = line.split_whitespace().last().unwrap_or("");
    let a = a.rsplit("://").next().unwrap_or(a);
    a.parse()
        .map_err(|e| format!("no address in {line:?}: {e}"))
}

// ---------------------------------------------------------------- /proc

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid` ("self" for this process), in seconds.
fn cpu_secs(pid: &str, tck: f64) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime is field 14, stime 15 (1-based); `rest` starts at field 3.
    (get(11) + get(12)) / tck
}

/// stime of `pid` alone (time in the kernel: syscalls, loopback TCP), in seconds.
fn sys_secs(pid: &str, tck: f64) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / tck
}

// ---------------------------------------------------------------- upstreams

fn upstream(handle: fn(TcpStream)) -> Res<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind upstream: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let _ = c.set_nodelay(true);
            thread::spawn(move || handle(c));
        }
    });
    Ok(addr)
}

/// Reads until EOF, then replies with the byte count (u64 LE) and closes.
fn sink(mut c: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(_) => return,
        }
    }
    let _ = c.write_all(&n.to_le_bytes());
    let _ = c.shutdown(Shutdown::Write);
}

/// Echoes until EOF, then closes its write half.
fn echo(mut c: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = c.shutdown(Shutdown::Write);
}

// ---------------------------------------------------------------- clients

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Direct,
    Tcp,
    Tls,
    /// The tcp endpoint of the release tetherd.
    Release,
}

const ROUTES: [Route; 3] = [Route::Direct, Route::Tcp, Route::Tls];
/// The routes of the latency and connection cases.
const LAT_ROUTES: [Route; 4] = [Route::Direct, Route::Tcp, Route::Tls, Route::Release];

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Tcp => "tcp",
            Route::Tls => "tls",
            Route::Release => "release",
        }
    }
}

#[derive(Clone, Copy)]
enum Up {
    Sink,
    Echo,
}

struct Targets {
    sink: SocketAddr,
    echo: SocketAddr,
    sink_tcp: SocketAddr,
    echo_tcp: SocketAddr,
    /// The release tetherd's tcp endpoints.
    sink_rel: SocketAddr,
    echo_rel: SocketAddr,
    tls: SocketAddr,
    client: Arc<ClientConfig>,
    resumed: AtomicU64,
    full: AtomicU64,
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn open(t: &Targets, route: Route, up: Up) -> io::Result<Conn> {
        let addr = match (route, up) {
            (Route::Direct, Up::Sink) => t.sink,
            (Route::Direct, Up::Echo) => t.echo,
            (Route::Tcp, Up::Sink) => t.sink_tcp,
            (Route::Tcp, Up::Echo) => t.echo_tcp,
            (Route::Release, Up::Sink) => t.sink_rel,
            (Route::Release, Up::Echo) => t.echo_rel,
            (Route::Tls, _) => t.tls,
        };
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        if route != Route::Tls {
            return Ok(Conn::Plain(sock));
        }
        let name = match up {
            Up::Sink => format!("sink-tls.{DOMAIN}"),
            Up::Echo => format!("echo-tls.{DOMAIN}"),
        };
        let sn = ServerName::try_from(name).map_err(io::Error::other)?;
        let conn = ClientConnection::new(t.client.clone(), sn).map_err(io::Error::other)?;
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        match s.conn.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => t.resumed.fetch_add(1, Ordering::Relaxed),
            _ => t.full.fetch_add(1, Ordering::Relaxed),
        };
        Ok(Conn::Tls(Box::new(s)))
    }

    /// Half-close: TCP shutdown(Write), or a TLS close_notify.
    fn finish(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.shutdown(Shutdown::Write),
            Conn::Tls(s) => {
                s.flush()?;
                s.conn.send_close_notify();
                while s.conn.wants_write() {
                    s.conn.write_tls(&mut s.sock)?;
                }
                Ok(())
            }
        }
    }

    /// Reads until EOF; returns the bytes read.
    fn drain(&mut self) -> io::Result<u64> {
        let mut buf = [0u8; 4096];
        let mut n = 0u64;
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(b),
            Conn::Tls(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(b),
            Conn::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Upload `total` bytes split over `streams` sink connections; returns the
/// time from "all connected" to "all counts received".
fn upload(t: &Arc<Targets>, route: Route, streams: usize, total: u64) -> Res<Duration> {
    let per = total / streams as u64;
    let barrier = Arc::new(Barrier::new(streams + 1));
    let data = Arc::new(pattern(WRITE));
    let mut hs = Vec::new();
    for _ in 0..streams {
        let (t, b, data) = (t.clone(), barrier.clone(), data.clone());
        hs.push(thread::spawn(move || -> Res<()> {
            let c = Conn::open(&t, route, Up::Sink);
            b.wait();
            let mut c = c.map_err(|e| format!("connect: {e}"))?;
            let mut left = per;
            while left > 0 {
                let k = left.min(WRITE as u64) as usize;
                c.write_all(&data[..k]).map_err(|e| format!("write: {e}"))?;
                left -= k as u64;
            }
            c.finish().map_err(|e| format!("half-close: {e}"))?;
            let mut cnt = [0u8; 8];
            c.read_exact(&mut cnt)
                .map_err(|e| format!("read count: {e}"))?;
            let got = u64::from_le_bytes(cnt);
            if got != per {
                return Err(format!("sink counted {got} bytes, {per} sent"));
            }
            Ok(())
        }));
    }
    barrier.wait();
    let start = Instant::now();
    for h in hs {
        h.join().map_err(|_| "upload thread panicked")??;
    }
    Ok(start.elapsed())
}

/// Round-trip times (µs) of `n` 64-byte echoes per route of `routes`, one
/// connection per route, the routes taking turns in blocks of [`LAT_BLOCK`]
/// round trips so that every route sees the same machine (the host is shared
/// and its wake-up latency drifts); after 200 untimed round trips on each.
fn latency(t: &Targets, routes: &[Route], n: usize) -> Res<BTreeMap<Route, Vec<f64>>> {
    let msg = pattern(MSG);
    let mut back = [0u8; MSG];
    let mut conns = Vec::new();
    for &r in routes {
        let c = Conn::open(t, r, Up::Echo).map_err(|e| format!("connect {}: {e}", r.name()))?;
        conns.push((r, c));
    }
    let mut out: BTreeMap<Route, Vec<f64>> = BTreeMap::new();
    let mut rtt = |c: &mut Conn| -> Res<Duration> {
        let t0 = Instant::now();
        c.write_all(&msg).map_err(|e| format!("write: {e}"))?;
        c.flush().map_err(|e| format!("flush: {e}"))?;
        c.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
        let dt = t0.elapsed();
        if back[..] != msg[..] {
            return Err("echo returned other bytes".into());
        }
        Ok(dt)
    };
    for (_, c) in conns.iter_mut() {
        for _ in 0..200 {
            rtt(c)?;
        }
    }
    let mut done = 0;
    while done < n {
        let k = LAT_BLOCK.min(n - done);
        for (r, c) in conns.iter_mut() {
            let v = out.entry(*r).or_default();
            for _ in 0..k {
                v.push(rtt(c)?.as_secs_f64() * 1e6);
            }
        }
        done += k;
    }
    for (_, mut c) in conns {
        c.finish().map_err(|e| format!("half-close: {e}"))?;
        let _ = c.drain();
    }
    Ok(out)
}

/// Sequential connect / 64-byte echo / close for `secs`; returns the time
/// of each connection (µs, from before connect to after close) and the
/// seconds taken in all.
fn conn_rate(t: &Targets, route: Route, secs: f64) -> Res<(Vec<f64>, f64)> {
    let msg = pattern(MSG);
    let mut back = [0u8; MSG];
    let start = Instant::now();
    let mut times = Vec::new();
    loop {
        let n = times.len();
        let t0 = Instant::now();
        let mut c = Conn::open(t, route, Up::Echo).map_err(|e| format!("connect #{n}: {e}"))?;
        c.write_all(&msg).map_err(|e| format!("write: {e}"))?;
        c.flush().map_err(|e| format!("flush: {e}"))?;
        c.read_exact(&mut back)
            .map_err(|e| format!("read #{n}: {e}"))?;
        c.finish().map_err(|e| format!("half-close: {e}"))?;
        c.drain().map_err(|e| format!("drain #{n}: {e}"))?;
        drop(c);
        times.push(t0.elapsed().as_secs_f64() * 1e6);
        let el = start.elapsed().as_secs_f64();
        if el >= secs {
            return Ok((times, el));
        }
    }
}

/// 64 concurrent echo streams through the tcp endpoint, each writing and
/// reading `per` bytes at once. Returns the highest VmRSS of `pid` sampled
/// meanwhile and the seconds it took.
fn busy(t: &Arc<Targets>, streams: usize, per: u64, pid: u32) -> Res<(u64, f64)> {
    let barrier = Arc::new(Barrier::new(streams + 1));
    let data = Arc::new(pattern(WRITE));
    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, max_rss) = (stop.clone(), max_rss.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                max_rss.fetch_max(vm(pid, "VmRSS"), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut hs = Vec::new();
    for _ in 0..streams {
        let (t, b, data) = (t.clone(), barrier.clone(), data.clone());
        hs.push(thread::spawn(move || -> Res<()> {
            let c = TcpStream::connect(t.echo_tcp);
            b.wait();
            let mut w = c.map_err(|e| format!("connect: {e}"))?;
            let mut r = w.try_clone().map_err(|e| e.to_string())?;
            let reader = thread::spawn(move || -> io::Result<u64> {
                let mut buf = vec![0u8; WRITE];
                let mut n = 0u64;
                loop {
                    match r.read(&mut buf)? {
                        0 => return Ok(n),
                        k => n += k as u64,
                    }
                }
            });
            let mut left = per;
            while left > 0 {
                let k = left.min(WRITE as u64) as usize;
                w.write_all(&data[..k]).map_err(|e| format!("write: {e}"))?;
                left -= k as u64;
            }
            w.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let got = reader
                .join()
                .map_err(|_| "reader panicked")?
                .map_err(|e| format!("read: {e}"))?;
            if got != per {
                return Err(format!("echoed {got} of {per} bytes"));
            }
            Ok(())
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut err = None;
    for h in hs {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => err = Some(e),
            Err(_) => err = Some("busy thread panicked".into()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    match err {
        Some(e) => Err(e),
        None => Ok((max_rss.load(Ordering::Relaxed), secs)),
    }
}

// ---------------------------------------------------------------- setup

struct Pki {
    ca: PathBuf,
    agent_cert: PathBuf,
    agent_key: PathBuf,
    wild_cert: PathBuf,
    wild_key: PathBuf,
}

/// Writes `<dir>/edge.toml` for an edge on 127.0.0.1 port 0 (agent port and
/// OS-chosen tcp ports, state in `<dir>/edge-state`), with `tail` appended
/// (more tables), and returns its path.
fn write_edge_toml(dir: &Path, pki: &Pki, tail: &str) -> Res<PathBuf> {
    let state = dir.join("edge-state");
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    let path = dir.join("edge.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"{}\"\n\n[agent]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [tcp]\nlisten_ip = \"127.0.0.1\"\nport_range = [0, 0]\n\n{tail}",
            state.display(),
            pki.agent_cert.display(),
            pki.agent_key.display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    Ok(path)
}

/// Raises this process's open-file limit to 8,192 (as far as the hard limit
/// allows) and fails, saying `why` it needs them, below 4,096.
fn raise_nofile(why: &str) -> Res<()> {
    let nofile = tether_tests::sys::raise_nofile(8192);
    if nofile < 4096 {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile}: {why} (raise the hard limit)"
        ));
    }
    Ok(())
}

/// A fresh work directory `<tmp>/<prefix>XXXXXX`, named on stderr; removed
/// when dropped.
fn work_dir(prefix: &str) -> Res<tempfile::TempDir> {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| format!("tempdir: {e}"))?;
    eprintln!("work dir {}", tmp.path().display());
    Ok(tmp)
}

/// `token create` against the edge's store (config `cfg`) for `endpoints`;
/// returns the token.
fn token(edge_bin: &Path, cfg: &str, endpoints: &[&str]) -> Res<String> {
    let mut args = vec!["token", "create", "--description", "bench"];
    for e in endpoints {
        args.extend(["--allow", e]);
    }
    edge_cli(edge_bin, cfg, &args)
}

/// Runs `tether-edge --offline --config CFG ARGS...` (an offline command
/// on the store) and returns what it printed on stdout (a credential:
/// shown once).
fn edge_cli(edge_bin: &Path, cfg: &str, args: &[&str]) -> Res<String> {
    let what = args.iter().take(2).copied().collect::<Vec<_>>().join(" ");
    let out = Command::new(edge_bin)
        .args(["--offline", "--config", cfg])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Starts `tether-edge serve` with config `cfg` (log `<dir>/edge.log`) and
/// waits for its agent listener; returns the edge and that address.
fn start_edge(args: &Args, dir: &Path, cfg: &str) -> Res<(Proc, SocketAddr)> {
    let edge = Proc::spawn(
        &args.edge,
        &["--config", cfg, "serve"],
        dir.join("edge.log"),
        args.pidfile.as_deref(),
    )?;
    let agent = last_addr(&edge.wait_line("LISTEN agent")?)?;
    Ok((edge, agent))
}

/// Writes `<dir>/credential` (mode 0600) holding `token` and
/// `<dir>/tetherd.toml` for the edge's agent port `agent`: the top-level
/// keys, then `extra` (more tables, such as `[session]`), then one
/// `[[endpoint]]` per `(name, kind, upstream)`. Returns the config's path.
fn write_tetherd_toml(
    dir: &Path,
    agent: SocketAddr,
    pki: &Pki,
    token: &str,
    extra: &str,
    endpoints: &[(&str, &str, SocketAddr)],
) -> Res<PathBuf> {
    let cred = dir.join("credential");
    std::fs::write(&cred, format!("{token}\n")).map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
    }
    let mut body = format!(
        "edge = \"{agent}\"\nserver_name = \"localhost\"\nca_file = \"{}\"\ncredential = \"{}\"\n",
        pki.ca.display(),
        cred.display()
    );
    body.push_str(extra);
    for (name, kind, up) in endpoints {
        let _ = write!(
            body,
            "\n[[endpoint]]\nname = \"{name}\"\nkind = \"{kind}\"\nupstream = \"{up}\"\n"
        );
    }
    let path = dir.join("tetherd.toml");
    std::fs::write(&path, body).map_err(|e| e.to_string())?;
    Ok(path)
}

/// tetherd's arguments for the config `toml`: `--config`, and
/// `--allow-root` when the bench runs as root.
fn tetherd_args(toml: &Path) -> Res<Vec<&str>> {
    let mut a = vec!["--config", toml.to_str().ok_or("non-UTF-8 path")?];
    if is_root() {
        a.push("--allow-root");
    }
    Ok(a)
}

/// Starts tetherd with the config `toml` (log `<dir>/tetherd.log`), waits
/// for `CONNECTED` and then for the `BOUND <name> ...` line of each name in
/// `bound`, in order; returns tetherd and those lines.
fn start_tetherd(args: &Args, dir: &Path, toml: &Path, bound: &[&str]) -> Res<(Proc, Vec<String>)> {
    start_tetherd_bin(&args.tetherd, args, dir, toml, bound)
}

/// [`start_tetherd`] with the tetherd binary `bin`.
fn start_tetherd_bin(
    bin: &Path,
    args: &Args,
    dir: &Path,
    toml: &Path,
    bound: &[&str],
) -> Res<(Proc, Vec<String>)> {
    let daemon = Proc::spawn(
        bin,
        &tetherd_args(toml)?,
        dir.join("tetherd.log"),
        args.pidfile.as_deref(),
    )?;
    daemon.wait_line("CONNECTED")?;
    let lines = bound
        .iter()
        .map(|name| daemon.wait_line(&format!("BOUND {name} ")))
        .collect::<Res<_>>()?;
    Ok((daemon, lines))
}

/// A self-signed CA with the common name `cn`: its certificate and key.
fn make_ca(cn: &str) -> Res<(rcgen::Certificate, rcgen::KeyPair)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().map_err(e)?;
    let ca = params.self_signed(&key).map_err(e)?;
    Ok((ca, key))
}

fn make_pki(dir: &Path) -> Res<Pki> {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let (ca, ca_key) = make_ca("tether bench CA")?;
    let leaf = |names: Vec<String>| -> Res<(String, String)> {
        let mut p = CertificateParams::new(names).map_err(e)?;
        p.distinguished_name
            .push(DnType::CommonName, "tether bench");
        let k = KeyPair::generate().map_err(e)?;
        let c = p.signed_by(&k, &ca, &ca_key).map_err(e)?;
        Ok((c.pem(), k.serialize_pem()))
    };
    let (ac, ak) = leaf(vec!["localhost".into(), "127.0.0.1".into()])?;
    let (wc, wk) = leaf(vec![format!("*.{DOMAIN}")])?;
    let w = |name: &str, body: &str| -> Res<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, body).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    };
    Ok(Pki {
        ca: w("ca.pem", &ca.pem())?,
        agent_cert: w("agent.crt", &ac)?,
        agent_key: w("agent.key", &ak)?,
        wild_cert: w("wild.crt", &wc)?,
        wild_key: w("wild.key", &wk)?,
    })
}

/// A TLS 1.3 client (ring) trusting the CA in the PEM file `ca`, waiting
/// for its client-certificate choice.
fn tls13_client(ca: &Path) -> Res<ConfigBuilder<ClientConfig, WantsClientCert>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------- stats

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

fn jnum(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

fn jlist(v: &[f64]) -> String {
    let items: Vec<String> = v.iter().map(|x| jnum(*x)).collect();
    format!("[{}]", items.join(", "))
}

/// The opening of a bench's JSON: `{`, its name and the host (`cpus`, the
/// load average at the end, `note`), each line ending in a comma.
fn json_start(bench: &str, cpus: usize, loadavg: &str, note: &str) -> String {
    format!(
        "{{\n  \"bench\": \"{bench}\",\n  \"host\": {{\"cpus\": {cpus}, \"loadavg_end\": \"{}\", \"note\": \"{note}\"}},\n",
        loadavg.trim()
    )
}

/// Writes the JSON `j` to `out` (creating its directory) and says where.
fn write_results(out: &Path, j: &str) -> Res<()> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    std::fs::write(out, j).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("results: {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------- main

/// Per-route samples of one metric, one per repetition.
type Samples = BTreeMap<Route, Vec<f64>>;

fn push(s: &mut Samples, r: Route, v: f64) {
    s.entry(r).or_default().push(v);
}

fn med(s: &Samples, r: Route) -> f64 {
    s.get(&r).map_or(f64::NAN, |v| median(v))
}

fn real_main() -> Res<()> {
    let (bench, args) = parse_args()?;
    match bench {
        Bench::Tunnel => tunnel(args),
        Bench::Bounds => bounds::run(args),
        Bench::Policy => policy::run(args),
        Bench::Ops => ops::run(args),
    }
}

fn tunnel(args: Args) -> Res<()> {
    if !iperf::available() {
        eprintln!("tether-bench: {}", iperf::REQUIRED);
        std::process::exit(1);
    }
    let release_bin = args
        .tetherd_release
        .clone()
        .ok_or("tunnel needs --tetherd-release PATH (tetherd built with --release)")?;
    // The columns are named after the builds' target directories (min, release).
    let profile = |p: &Path| {
        p.parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .unwrap_or("tetherd")
            .to_owned()
    };
    let n_min = profile(&args.tetherd);
    let mut n_rel = profile(&release_bin);
    if n_rel == n_min {
        n_rel.push_str("-2");
    }
    let net = args
        .net
        .clone()
        .unwrap_or_else(|| "127.0.0.1 (network not given by --net)".into());
    let iperf_secs = env_num("TETHER_BENCH_IPERF_SECS", 3);
    let mb = env_num("TETHER_BENCH_MB", 2048);
    let reps = env_num("TETHER_BENCH_REPS", 5) as usize;
    let rtts = env_num("TETHER_BENCH_RTT", 5000) as usize;
    let conn_secs = env_num("TETHER_BENCH_CONN_SECS", 3) as f64;
    let peak_mb = env_num("TETHER_BENCH_PEAK_MB", 8);
    let total = mb * 1024 * 1024;
    let tck = clk_tck();
    let default_bound = tetherd::session_memory_bound(&Config::new(Role::Client)) as u64;
    // Optional: another per-stream window in both programs' [session] (an
    // experiment; the default run uses the defaults).
    let window = std::env::var("TETHER_BENCH_WINDOW")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    let session_toml = window.map_or(String::new(), |w| format!("\n[session]\nwindow = {w}\n"));
    let bound = tetherd::session_memory_bound(&Config {
        window: window.unwrap_or(Config::new(Role::Client).window),
        ..Config::new(Role::Client)
    }) as u64;

    let tmp = work_dir("tether-bench-")?;
    let dir = tmp.path();
    let pki = make_pki(dir)?;

    // The edge: config, a token for the four endpoints, serve.
    let edge_toml = write_edge_toml(
        dir,
        &pki,
        &format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\ndomain = \"{DOMAIN}\"\ncert = \"{}\"\nkey = \"{}\"\n{session_toml}",
            pki.wild_cert.display(),
            pki.wild_key.display()
        ),
    )?;
    let edge_cfg = edge_toml.to_str().ok_or("non-UTF-8 path")?;
    // The same five endpoints on both tetherds, the release one's prefixed.
    let names = ["sink", "echo", "sink-tls", "echo-tls", "iperf"];
    let kinds = ["tcp", "tcp", "tls", "tls", "tcp"];
    let rel_names: Vec<String> = names.iter().map(|n| format!("rel-{n}")).collect();
    let rel_names: Vec<&str> = rel_names.iter().map(String::as_str).collect();
    let device_token = token(&args.edge, edge_cfg, &names)?;
    let rel_token = token(&args.edge, edge_cfg, &rel_names)?;
    let (mut edge, agent) = start_edge(&args, dir, edge_cfg)?;
    let tls = last_addr(&edge.wait_line("LISTEN tls")?)?;
    let epid = edge.pid();

    // The upstreams and the tetherds.
    let sink_addr = upstream(sink)?;
    let echo_addr = upstream(echo)?;
    let mut iperf_srv = iperf::Server::start(dir, args.pidfile.as_deref())?;
    let ups = [sink_addr, echo_addr, sink_addr, echo_addr, iperf_srv.addr];
    let endpoints = |names: &[&'static str]| -> Vec<(&'static str, &'static str, SocketAddr)> {
        (0..names.len())
            .map(|i| (names[i], kinds[i], ups[i]))
            .collect()
    };
    let edge_rss_no_session = vm(epid, "VmRSS");
    let d_toml = write_tetherd_toml(
        dir,
        agent,
        &pki,
        &device_token,
        &session_toml,
        &endpoints(&names),
    )?;
    let (mut daemon, bound_lines) = start_tetherd(&args, dir, &d_toml, &names)?;
    let sink_tcp = last_addr(&bound_lines[0])?;
    let echo_tcp = last_addr(&bound_lines[1])?;
    let iperf_tcp = last_addr(&bound_lines[4])?;
    let dpid = daemon.pid();

    // Idle: connected and bound, no traffic yet.
    thread::sleep(Duration::from_secs(1));
    let idle_rss = vm(dpid, "VmRSS");
    let idle_hwm = vm(dpid, "VmHWM");
    let edge_idle_rss = vm(epid, "VmRSS");
    eprintln!(
        "tetherd ({n_min}) pid {dpid}, edge pid {epid}, iperf3 -s pid {}; tetherd idle VmRSS {} KiB",
        iperf_srv.pid(),
        idle_rss / 1024
    );

    // The release tetherd, in a directory of its own; idle likewise.
    let rdir = dir.join("release");
    std::fs::create_dir_all(&rdir).map_err(|e| format!("{}: {e}", rdir.display()))?;
    let rel_eps: Vec<(&str, &str, SocketAddr)> = endpoints(&names)
        .into_iter()
        .zip(&rel_names)
        .map(|((_, kind, up), name)| (*name, kind, up))
        .collect();
    let r_toml = write_tetherd_toml(&rdir, agent, &pki, &rel_token, &session_toml, &rel_eps)?;
    let (mut rel_daemon, rel_bound) =
        start_tetherd_bin(&release_bin, &args, &rdir, &r_toml, &rel_names)?;
    let rpid = rel_daemon.pid();
    thread::sleep(Duration::from_secs(1));
    let rel_idle_rss = vm(rpid, "VmRSS");
    let edge_idle_rss2 = vm(epid, "VmRSS");
    eprintln!(
        "tetherd ({n_rel}) pid {rpid}; idle VmRSS {} KiB",
        rel_idle_rss / 1024
    );

    let t = Arc::new(Targets {
        sink: sink_addr,
        echo: echo_addr,
        sink_tcp,
        echo_tcp,
        sink_rel: last_addr(&rel_bound[0])?,
        echo_rel: last_addr(&rel_bound[1])?,
        tls,
        client: Arc::new(tls13_client(&pki.ca)?.with_no_client_auth()),
        resumed: AtomicU64::new(0),
        full: AtomicU64::new(0),
    });

    // Warm-up: every route, both upstreams.
    for r in ROUTES {
        upload(&t, r, 1, 8 << 20)?;
    }
    latency(&t, &LAT_ROUTES, 200)?;
    let mut mem_trace = vec![("idle", idle_rss, idle_hwm)];

    // iperf3: direct, then through each tetherd.
    let paths = [
        (Route::Direct, "direct", iperf_srv.addr, None),
        (Route::Tcp, n_min.as_str(), iperf_tcp, Some(dpid)),
        (
            Route::Release,
            n_rel.as_str(),
            last_addr(&rel_bound[4])?,
            Some(rpid),
        ),
    ]
    .map(|(route, name, to, tetherd)| compare::Path {
        route,
        name: name.to_owned(),
        to,
        tetherd,
    });
    let iperf_res = compare::iperf_cases(&paths, epid, reps, iperf_secs, tck)?;
    mem_trace.push(("after iperf3 cases", vm(dpid, "VmRSS"), vm(dpid, "VmHWM")));

    // Throughput (upload) and CPU per GB.
    let stream_counts = [1usize, 8];
    let mut mbps: BTreeMap<usize, Samples> = BTreeMap::new();
    let mut cpu_d: BTreeMap<usize, Samples> = BTreeMap::new();
    let mut cpu_e: BTreeMap<usize, Samples> = BTreeMap::new();
    let mut cpu_b: BTreeMap<usize, Samples> = BTreeMap::new();
    // Per tunnel case: share of kernel time, and cores busy (CPU s / wall s).
    let mut sys_d: BTreeMap<usize, Samples> = BTreeMap::new();
    let mut sys_e: BTreeMap<usize, Samples> = BTreeMap::new();
    let mut util_d: BTreeMap<usize, Samples> = BTreeMap::new();
    let mut util_e: BTreeMap<usize, Samples> = BTreeMap::new();
    let (ds, es) = (dpid.to_string(), epid.to_string());
    let gb = total as f64 / 1e9;
    for rep in 0..reps {
        for &s in &stream_counts {
            for r in ROUTES {
                let (d0, e0, b0) = (
                    cpu_secs(&dpid.to_string(), tck),
                    cpu_secs(&epid.to_string(), tck),
                    cpu_secs("self", tck),
                );
                let (ds0, es0) = (sys_secs(&ds, tck), sys_secs(&es, tck));
                let el = upload(&t, r, s, total)
                    .map_err(|e| format!("upload {} x{s}: {e}", r.name()))?;
                let (d1, e1, b1) = (
                    cpu_secs(&dpid.to_string(), tck),
                    cpu_secs(&epid.to_string(), tck),
                    cpu_secs("self", tck),
                );
                let (ds1, es1) = (sys_secs(&ds, tck), sys_secs(&es, tck));
                let v = total as f64 / 1e6 / el.as_secs_f64();
                push(mbps.entry(s).or_default(), r, v);
                push(cpu_b.entry(s).or_default(), r, (b1 - b0) / gb);
                if r != Route::Direct {
                    push(cpu_d.entry(s).or_default(), r, (d1 - d0) / gb);
                    push(cpu_e.entry(s).or_default(), r, (e1 - e0) / gb);
                    let share = |sys: f64, all: f64| if all > 0.0 { sys / all } else { f64::NAN };
                    push(sys_d.entry(s).or_default(), r, share(ds1 - ds0, d1 - d0));
                    push(sys_e.entry(s).or_default(), r, share(es1 - es0, e1 - e0));
                    let wall = el.as_secs_f64();
                    push(util_d.entry(s).or_default(), r, (d1 - d0) / wall);
                    push(util_e.entry(s).or_default(), r, (e1 - e0) / wall);
                }
                eprintln!(
                    "rep {}/{reps} upload {:>6} x{s}: {v:8.1} MB/s in {:.2} s (tetherd {:.2} s, edge {:.2} s, bench {:.2} s CPU)",
                    rep + 1,
                    r.name(),
                    el.as_secs_f64(),
                    d1 - d0,
                    e1 - e0,
                    b1 - b0
                );
            }
        }
    }

    // Latency.
    let mut p50: Samples = BTreeMap::new();
    let mut p99: Samples = BTreeMap::new();
    mem_trace.push(("after upload cases", vm(dpid, "VmRSS"), vm(dpid, "VmHWM")));
    for rep in 0..reps {
        let all = latency(&t, &LAT_ROUTES, rtts).map_err(|e| format!("latency: {e}"))?;
        for r in LAT_ROUTES {
            let v = &all[&r];
            let (a, b) = (percentile(v, 50.0), percentile(v, 99.0));
            push(&mut p50, r, a);
            push(&mut p99, r, b);
            eprintln!(
                "rep {}/{reps} latency {:>6}: p50 {a:7.1} us, p99 {b:7.1} us",
                rep + 1,
                r.name()
            );
        }
    }

    // New connections per second.
    let mut cps: Samples = BTreeMap::new();
    let mut conn_p50: Samples = BTreeMap::new();
    let mut conn_p99: Samples = BTreeMap::new();
    let (res0, full0) = (
        t.resumed.load(Ordering::Relaxed),
        t.full.load(Ordering::Relaxed),
    );
    // The routes take turns in slices of CONN_SLICE seconds, so that each
    // sees the same machine; one rate per route per repetition.
    for rep in 0..reps {
        let mut acc: BTreeMap<Route, (Vec<f64>, f64)> = BTreeMap::new();
        let slices = (conn_secs / CONN_SLICE).ceil().max(1.0) as usize;
        for _ in 0..slices {
            for r in LAT_ROUTES {
                let (times, el) =
                    conn_rate(&t, r, CONN_SLICE).map_err(|e| format!("conns {}: {e}", r.name()))?;
                let e = acc.entry(r).or_default();
                e.0.extend(times);
                e.1 += el;
            }
        }
        for r in LAT_ROUTES {
            let (times, el) = &acc[&r];
            let v = times.len() as f64 / el;
            let (a, b) = (percentile(times, 50.0), percentile(times, 99.0));
            push(&mut cps, r, v);
            push(&mut conn_p50, r, a);
            push(&mut conn_p99, r, b);
            eprintln!(
                "rep {}/{reps} conns {:>7}: {v:8.1} /s, each p50 {a:7.1} us, p99 {b:7.1} us",
                rep + 1,
                r.name()
            );
        }
    }
    mem_trace.push((
        "after latency and connection cases",
        vm(dpid, "VmRSS"),
        vm(dpid, "VmHWM"),
    ));
    let resumed = t.resumed.load(Ordering::Relaxed) - res0;
    let full = t.full.load(Ordering::Relaxed) - full0;

    // Peak memory: 64 concurrent busy streams.
    thread::sleep(Duration::from_secs(1));
    let before_peak_rss = vm(dpid, "VmRSS");
    let (peak_sampled, busy_secs) =
        busy(&t, PEAK_STREAMS, peak_mb << 20, dpid).map_err(|e| format!("64 busy streams: {e}"))?;
    let hwm1 = vm(dpid, "VmHWM");
    thread::sleep(Duration::from_secs(1));
    let after_rss = vm(dpid, "VmRSS");
    mem_trace.push(("after 64 busy streams", after_rss, hwm1));
    // Once more: does the high-water mark keep rising with traffic?
    let (peak_sampled2, busy2_secs) = busy(&t, PEAK_STREAMS, peak_mb << 20, dpid)
        .map_err(|e| format!("64 busy streams, 2nd round: {e}"))?;
    thread::sleep(Duration::from_millis(500));
    let hwm2 = vm(dpid, "VmHWM");
    let maps = big_mappings(dpid);
    // VmHWM only rises: the peak of the whole run, both busy rounds included.
    let peak_hwm = hwm2;
    let peak_sampled = peak_sampled.max(peak_sampled2);
    mem_trace.push(("after 64 busy streams, 2nd round", vm(dpid, "VmRSS"), hwm2));
    eprintln!(
        "2nd round of 64 busy streams: {busy2_secs:.2} s, tetherd VmHWM {} KiB",
        hwm2 / 1024
    );
    let edge_hwm = vm(epid, "VmHWM");
    eprintln!(
        "64 busy streams: {:.2} s, tetherd VmHWM {} KiB",
        busy_secs,
        peak_hwm / 1024
    );
    let pass = peak_hwm <= idle_rss + bound;
    let mut maps_txt = String::new();
    for (size, rss, name) in &maps {
        let _ = writeln!(
            maps_txt,
            "  mapping {name}: size {} KiB, resident {} KiB",
            size / 1024,
            rss / 1024
        );
    }

    daemon.stop();
    rel_daemon.stop();
    iperf_srv.stop();
    edge.stop();

    // ------------------------------------------------------------ report
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<34} {:>10} {:>28} {:>28}",
        "case", "direct", "tunnel tcp", "tunnel tls"
    );
    let row = |table: &mut String, name: &str, s: &Samples, lat: bool| {
        let base = med(s, Route::Direct);
        let mut line = format!("{name:<34} {base:>10.1}");
        for r in [Route::Tcp, Route::Tls] {
            let v = med(s, r);
            let cell = if lat {
                format!("{v:.1} (x{:.2}, +{:.1})", v / base, v - base)
            } else {
                format!("{v:.1} (x{:.3})", v / base)
            };
            let _ = write!(line, " {cell:>28}");
        }
        let _ = writeln!(table, "{line}");
    };
    for &s in &stream_counts {
        row(
            &mut table,
            &format!("upload MB/s, {s} stream{}", if s > 1 { "s" } else { "" }),
            &mbps[&s],
            false,
        );
    }
    row(&mut table, "latency p50 us (64 B echo)", &p50, true);
    row(&mut table, "latency p99 us (64 B echo)", &p99, true);
    row(&mut table, "new connections /s", &cps, false);
    for &s in &stream_counts {
        for (who, m, sys, util) in [
            ("tetherd", &cpu_d, &sys_d, &util_d),
            ("edge", &cpu_e, &sys_e, &util_e),
        ] {
            let cell = |r: Route| {
                format!(
                    "{:.2} ({:.0}% sys, {:.2} cores)",
                    med(&m[&s], r),
                    100.0 * med(&sys[&s], r),
                    med(&util[&s], r)
                )
            };
            let _ = writeln!(
                table,
                "{:<34} {:>10} {:>28} {:>28}",
                format!("{who} CPU s/GB, {s} stream{}", if s > 1 { "s" } else { "" }),
                "-",
                cell(Route::Tcp),
                cell(Route::Tls)
            );
        }
        let _ = writeln!(
            table,
            "{:<34} {:>10.2} {:>28.2} {:>28.2}",
            format!("bench (client+upstream) CPU s/GB, {s}"),
            med(&cpu_b[&s], Route::Direct),
            med(&cpu_b[&s], Route::Tcp),
            med(&cpu_b[&s], Route::Tls)
        );
    }
    let kib = |b: u64| b as f64 / 1024.0;
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "tetherd RSS idle (connected, 5 endpoints bound): {:.0} KiB",
        kib(idle_rss)
    );
    let _ = writeln!(
        table,
        "tetherd RSS peak (VmHWM after 2 rounds of {PEAK_STREAMS} busy streams): {:.0} KiB (max sampled VmRSS {:.0} KiB, VmRSS 1 s after {:.0} KiB)",
        kib(peak_hwm),
        kib(peak_sampled),
        kib(after_rss)
    );
    let _ = writeln!(
        table,
        "session memory bound tetherd::session_memory_bound(defaults) = {default_bound} bytes ({:.0} KiB){}",
        kib(default_bound),
        window.map_or(String::new(), |w| format!("; with window {w}: {bound} bytes"))
    );
    table.push_str(&maps_txt);
    for (phase, rss, hwm) in &mem_trace {
        let _ = writeln!(
            table,
            "  tetherd {phase}: VmRSS {:.0} KiB, VmHWM {:.0} KiB",
            kib(*rss),
            kib(*hwm)
        );
    }
    let _ = writeln!(
        table,
        "check peak <= idle + bound: {:.0} <= {:.0} KiB: {}",
        kib(peak_hwm),
        kib(idle_rss + bound),
        if pass { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(
        table,
        "tls endpoint handshakes in the connection case: {resumed} resumed, {full} full"
    );
    let _ = writeln!(
        table,
        "{cpus} CPUs; load average at the end: {}(machine shared with another agent building)",
        loadavg.trim_end().to_owned() + " "
    );
    let _ = writeln!(
        table,
        "medians of {reps} runs; {mb} MiB per upload case; {rtts} round trips per latency run; {conn_secs} s per connection run; {iperf_secs} s per iperf3 run"
    );
    println!("{table}");

    let (cmp_table, cmp_json) = compare::render(&compare::Inputs {
        iperf: &iperf_res,
        cols: [(Route::Tcp, &n_min), (Route::Release, &n_rel)],
        rtt_p50: &p50,
        rtt_p99: &p99,
        conn_p50: &conn_p50,
        conn_p99: &conn_p99,
        conns_per_s: &cps,
        idle_rss: [(idle_rss, edge_idle_rss), (rel_idle_rss, edge_idle_rss2)],
        edge_rss_no_session,
        reps,
        iperf_secs,
        network: &net,
    });
    println!("{cmp_table}");

    // JSON.
    let mut j = json_start(
        "tunnel",
        cpus,
        &loadavg,
        &format!("2-core machine shared with another agent building; network: {net}"),
    );
    let _ = writeln!(j, "  \"settings\": {{\"mib_per_upload_case\": {mb}, \"reps\": {reps}, \"round_trips\": {rtts}, \"conn_secs\": {conn_secs}, \"write_size\": {WRITE}, \"message\": {MSG}, \"peak_streams\": {PEAK_STREAMS}, \"peak_mib_per_stream\": {peak_mb}, \"iperf_secs\": {iperf_secs}, \"statistic\": \"median over reps\"}},");
    let _ = writeln!(j, "  \"throughput\": {{\"direction\": \"upload: public client -> edge -> tetherd -> sink upstream (sink replies with the count)\", \"unit\": \"MB/s (10^6 bytes/s)\", \"cases\": [");
    let mut cases = Vec::new();
    for &s in &stream_counts {
        let mut c = format!("    {{\"streams\": {s}, \"bytes\": {total}");
        for r in ROUTES {
            let v = med(&mbps[&s], r);
            let _ = write!(
                c,
                ", \"{}\": {{\"mbps\": {}, \"ratio\": {}, \"runs\": {}, \"bench_cpu_s_per_gb\": {}",
                r.name(),
                jnum(v),
                jnum(v / med(&mbps[&s], Route::Direct)),
                jlist(&mbps[&s][&r]),
                jnum(med(&cpu_b[&s], r))
            );
            if r != Route::Direct {
                let _ = write!(
                    c,
                    ", \"tetherd_cpu_s_per_gb\": {}, \"edge_cpu_s_per_gb\": {}, \"tetherd_sys_share\": {}, \"edge_sys_share\": {}, \"tetherd_cores\": {}, \"edge_cores\": {}, \"tetherd_cpu_runs\": {}, \"edge_cpu_runs\": {}",
                    jnum(med(&cpu_d[&s], r)),
                    jnum(med(&cpu_e[&s], r)),
                    jnum(med(&sys_d[&s], r)),
                    jnum(med(&sys_e[&s], r)),
                    jnum(med(&util_d[&s], r)),
                    jnum(med(&util_e[&s], r)),
                    jlist(&cpu_d[&s][&r]),
                    jlist(&cpu_e[&s][&r])
                );
            }
            c.push('}');
        }
        c.push('}');
        cases.push(c);
    }
    let _ = writeln!(j, "{}\n  ]}},", cases.join(",\n"));
    let lat_obj = |s: &Samples| {
        let base = med(s, Route::Direct);
        let parts: Vec<String> = ROUTES
            .iter()
            .map(|&r| {
                let v = med(s, r);
                format!(
                    "\"{}\": {{\"us\": {}, \"ratio\": {}, \"diff_us\": {}, \"runs\": {}}}",
                    r.name(),
                    jnum(v),
                    jnum(v / base),
                    jnum(v - base),
                    jlist(&s[&r])
                )
            })
            .collect();
        format!("{{{}}}", parts.join(", "))
    };
    let _ = writeln!(
        j,
        "  \"latency\": {{\"message_bytes\": {MSG}, \"round_trips\": {rtts}, \"p50\": {}, \"p99\": {}}},",
        lat_obj(&p50),
        lat_obj(&p99)
    );
    let parts: Vec<String> = ROUTES
        .iter()
        .map(|&r| {
            format!(
                "\"{}\": {{\"per_s\": {}, \"ratio\": {}, \"runs\": {}, \"each_p50_us\": {}, \"each_p99_us\": {}}}",
                r.name(),
                jnum(med(&cps, r)),
                jnum(med(&cps, r) / med(&cps, Route::Direct)),
                jlist(&cps[&r]),
                jnum(med(&conn_p50, r)),
                jnum(med(&conn_p99, r))
            )
        })
        .collect();
    let _ = writeln!(
        j,
        "  \"connections\": {{\"what\": \"connect, 64 B echo, half-close, read to EOF, close; sequential; routes take turns every 0.5 s\", \"tls_resumed\": {resumed}, \"tls_full\": {full}, {}}},",
        parts.join(", ")
    );
    let _ = writeln!(
        j,
        "  \"tetherd_memory\": {{\"idle_vmrss\": {idle_rss}, \"idle_vmhwm\": {idle_hwm}, \"before_busy_vmrss\": {before_peak_rss}, \"peak_vmhwm\": {peak_hwm}, \"peak_sampled_vmrss\": {peak_sampled}, \"after_busy_vmrss\": {after_rss}, \"busy_streams\": {PEAK_STREAMS}, \"busy_secs\": {}, \"buffer_bound\": {bound}, \"default_buffer_bound\": {default_bound}, \"window\": {}, \"limit\": {}, \"peak_within_idle_plus_bound\": {pass}, \"trace\": [{}]}},",
        jnum(busy_secs),
        window.map_or("null".to_owned(), |w| w.to_string()),
        idle_rss + bound,
        mem_trace
            .iter()
            .map(|(p, r, h)| format!("{{\"phase\": \"{p}\", \"vmrss\": {r}, \"vmhwm\": {h}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        j,
        "  \"tetherd_big_mappings_end\": [{}],",
        maps.iter()
            .map(|(sz, r, n)| format!("{{\"name\": \"{n}\", \"size\": {sz}, \"rss\": {r}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        j,
        "  \"edge_memory\": {{\"idle_vmrss\": {edge_idle_rss}, \"peak_vmhwm\": {edge_hwm}}},\n{cmp_json}\n}}"
    );
    write_results(&args.out, &j)
}
