//! `tether-bench policy`: what traffic policies cost on the edge (issue 7,
//! "Benchmark"). Run it through `scripts/bench policy`, which builds the
//! release edge and tetherd in its device profile (`min`).
//!
//! One edge (release, default `[limits]`) whose mandatory policy denies
//! 127.0.0.2 (`restrict-ips`), with a tcp endpoint `echo` and two tls
//! endpoints on the shared TLS port: `p` (plain) and `m`, whose per-endpoint
//! policy requires a client certificate from a client CA generated here
//! (`terminate-tls` with `mutual_tls_certificate_authorities`). One tetherd
//! serves all three on an echo upstream in this process. Every figure and
//! its baseline come from this one edge in this one run:
//!
//! 1. **edge CPU per denied connection**: `TETHER_BENCH_FLOOD_N` (20,000)
//!    TCP connects from 127.0.0.2, two client threads, each connection
//!    waiting for the edge to close it (and counted as denied only if the
//!    edge closed it before sending anything), to the tcp endpoint's port
//!    and to the TLS port; the edge's utime+stime (`/proc/PID/stat`)
//!    around the flood, divided by the connections. Baseline: the same
//!    flood from the allowed 127.0.0.1, each client half-closing at once and
//!    waiting for the edge's close: on the tcp port the edge carries the
//!    connection to the device and back (a stream opened and closed), on the
//!    TLS port it reads the EOF where a ClientHello should be and closes.
//! 2. **allowed client latency under a denied flood**: one client from
//!    127.0.0.1, a new connection each time to the tcp endpoint: connect +
//!    one 64-byte echo, timed (then half-close and read to EOF, untimed).
//!    `TETHER_BENCH_POLICY_LAT_SECS` (10) seconds in 1 s blocks taking
//!    turns: without a flood, and with a flood of denied connects from
//!    127.0.0.2 to the same port paced at `TETHER_BENCH_FLOOD_RATE`
//!    (5,000) per second by one thread (non-blocking connects on a fixed
//!    schedule, catching up when late; the achieved rate is measured). The
//!    first 100 ms of each block are not counted.
//! 3. **new mTLS connections per second** against plain TLS: two client
//!    threads, each connection a full TLS 1.3 handshake (rustls client,
//!    resumption off; with the client certificate on `m`, none on `p`), one
//!    64-byte echo, close_notify, read to EOF. The two endpoints take turns
//!    every 0.5 s for `TETHER_BENCH_CONN_SECS` (5) seconds each; also the
//!    edge CPU per connection of each.
//!
//! Prints a table (figure, baseline, ratio, aim) and writes JSON (`--out`).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, StreamOwned};
use tether_tests::sys;

use crate::{
    clk_tck, cpu_secs, echo, env_num, jnum, json_start, last_addr, make_ca, make_pki, pattern,
    percentile, raise_nofile, start_edge, start_tetherd, tls13_client, token, upstream, work_dir,
    write_edge_toml, write_results, write_tetherd_toml, Args, Res, DOMAIN, MSG,
};

/// The source the mandatory policy denies.
const DENIED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Client threads of the CPU floods and of the connection-rate case.
const THREADS: usize = 2;
/// A denied connection the edge has not closed by then is not denied.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Length of one block of the latency case (flood on or off).
const LAT_BLOCK: Duration = Duration::from_secs(1);
/// The start of each latency block that is not counted (the flood's tail).
const LAT_SKIP: Duration = Duration::from_millis(100);
/// Seconds per turn of an endpoint in the connection-rate case.
const CONN_SLICE: Duration = Duration::from_millis(500);

/// CPU time of a process: utime+stime from `/proc/PID/stat` (10 ms ticks)
/// and the sum of its threads' `schedstat` run time (nanoseconds; threads
/// that exited meanwhile are missing from it, so it is only a cross-check).
#[derive(Clone, Copy, Debug)]
struct Cpu {
    stat: f64,
    sched: f64,
}

impl Cpu {
    fn of(pid: u32, tck: f64) -> Cpu {
        let mut sched = 0u64;
        if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in d.flatten() {
                let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
                sched += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Cpu {
            stat: cpu_secs(&pid.to_string(), tck),
            sched: sched as f64 / 1e9,
        }
    }

    /// Seconds since `before`: (stat, schedstat).
    fn since(&self, before: &Cpu) -> (f64, f64) {
        (self.stat - before.stat, self.sched - before.sched)
    }
}

// ---------------------------------------------------------------- setup

/// The client side of mutual TLS: a client CA (its PEM file for the edge)
/// and one client certificate signed by it.
struct ClientPki {
    ca: PathBuf,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn make_client_pki(dir: &Path) -> Res<ClientPki> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let (ca, ca_key) = make_ca("tether bench client CA")?;
    let mut p = CertificateParams::new(vec!["device-1.clients.bench".to_owned()]).map_err(e)?;
    p.distinguished_name.push(DnType::CommonName, "device-1");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let k = KeyPair::generate().map_err(e)?;
    let c = p.signed_by(&k, &ca, &ca_key).map_err(e)?;
    let path = dir.join("client-ca.pem");
    std::fs::write(&path, ca.pem()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(ClientPki {
        ca: path,
        cert: c.der().clone(),
        key: k.serialize_der(),
    })
}

/// A TLS 1.3 client trusting the edge's CA, without session resumption
/// (every connection a full handshake), presenting `cert` if given.
fn tls_client(ca: &Path, cert: Option<&ClientPki>) -> Res<Arc<ClientConfig>> {
    let b = tls13_client(ca)?;
    let mut cfg = match cert {
        None => b.with_no_client_auth(),
        Some(c) => b
            .with_client_auth_cert(
                vec![c.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.clone())),
            )
            .map_err(|e| format!("client certificate: {e}"))?,
    };
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

// ---------------------------------------------------------------- case 1

/// What one connection of a CPU flood found.
#[derive(Clone, Copy, Debug, Default)]
struct FloodTally {
    /// Connections made.
    connected: u64,
    /// Closed by the edge (EOF or reset) before it sent a byte.
    closed: u64,
    /// Still open after [`CLOSE_WAIT`], or the edge sent bytes.
    not_closed: u64,
    /// connect failed.
    failed: u64,
}

impl FloodTally {
    fn add(&mut self, o: &FloodTally) {
        self.connected += o.connected;
        self.closed += o.closed;
        self.not_closed += o.not_closed;
        self.failed += o.failed;
    }
}

/// Whether the edge closes `s` without sending anything, within [`CLOSE_WAIT`].
fn closed_by_edge(s: &mut TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(CLOSE_WAIT));
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
    }
}

/// `n` connects to `addr` from `source` (None: 127.0.0.1, the OS's
/// choice), [`THREADS`] threads, one connection at a time each; each one
/// half-closed at once when `half_close`, then left to the edge to close.
/// Returns the tally and the wall time.
fn cpu_flood(
    addr: SocketAddr,
    source: Option<IpAddr>,
    n: u64,
    half_close: bool,
) -> Res<(FloodTally, f64)> {
    let start = Instant::now();
    let mut all = FloodTally::default();
    thread::scope(|s| -> Res<()> {
        let hs: Vec<_> = (0..THREADS as u64)
            .map(|t| {
                let per = n / THREADS as u64 + u64::from(t < n % THREADS as u64);
                s.spawn(move || -> Res<FloodTally> {
                    let mut tally = FloodTally::default();
                    for _ in 0..per {
                        let mut c = match sys::connect(addr, source, None, Duration::from_secs(5)) {
                            Ok(c) => c,
                            Err(_) => {
                                tally.failed += 1;
                                if tally.failed > 100 {
                                    return Err(format!("connects to {addr} keep failing"));
                                }
                                continue;
                            }
                        };
                        tally.connected += 1;
                        if half_close {
                            let _ = c.shutdown(Shutdown::Write);
                        }
                        if closed_by_edge(&mut c) {
                            tally.closed += 1;
                        } else {
                            tally.not_closed += 1;
                            if tally.not_closed > 10 {
                                return Err(format!(
                                    "the edge leaves connections to {addr} from {source:?} open"
                                ));
                            }
                        }
                    }
                    Ok(tally)
                })
            })
            .collect();
        for h in hs {
            all.add(&h.join().map_err(|_| "flood thread panicked")??);
        }
        Ok(())
    })?;
    Ok((all, start.elapsed().as_secs_f64()))
}

/// One measured flood: the tally and the edge's CPU.
struct CpuCase {
    name: &'static str,
    tally: FloodTally,
    secs: f64,
    /// Edge CPU seconds, from stat and from schedstat.
    cpu: (f64, f64),
}

impl CpuCase {
    fn us_per_conn(&self) -> f64 {
        self.cpu.0 * 1e6 / self.tally.connected as f64
    }

    fn json(&self) -> String {
        format!(
            "{{\"connections\": {}, \"closed_by_edge\": {}, \"not_closed\": {}, \"connect_failed\": {}, \"secs\": {}, \"edge_cpu_s\": {}, \"edge_cpu_s_schedstat\": {}, \"us_per_conn\": {}, \"us_per_conn_schedstat\": {}}}",
            self.tally.connected,
            self.tally.closed,
            self.tally.not_closed,
            self.tally.failed,
            jnum(self.secs),
            jnum(self.cpu.0),
            jnum(self.cpu.1),
            jnum(self.us_per_conn()),
            jnum(self.cpu.1 * 1e6 / self.tally.connected as f64)
        )
    }
}

fn cpu_case(
    name: &'static str,
    epid: u32,
    tck: f64,
    addr: SocketAddr,
    source: Option<IpAddr>,
    n: u64,
    half_close: bool,
) -> Res<CpuCase> {
    let c0 = Cpu::of(epid, tck);
    let (tally, secs) =
        cpu_flood(addr, source, n, half_close).map_err(|e| format!("{name}: {e}"))?;
    // Whatever the edge still does for the last ones (a stream's close).
    thread::sleep(Duration::from_millis(200));
    let cpu = Cpu::of(epid, tck).since(&c0);
    let c = CpuCase {
        name,
        tally,
        secs,
        cpu,
    };
    eprintln!(
        "{name}: {} connections in {secs:.2} s ({} closed by the edge, {} not, {} failed): edge {:.3} s CPU (schedstat {:.3} s) = {:.2} us each",
        tally.connected,
        tally.closed,
        tally.not_closed,
        tally.failed,
        cpu.0,
        cpu.1,
        c.us_per_conn()
    );
    Ok(c)
}

// ---------------------------------------------------------------- case 2

/// What the paced flood did.
#[derive(Clone, Copy, Debug, Default)]
struct PacedCounts {
    /// Connects started while on.
    issued: u64,
    /// Seconds it was on.
    on_secs: f64,
    /// Closed by the edge within [`CLOSE_WAIT`].
    closed: u64,
    /// Given up on after [`CLOSE_WAIT`].
    stuck: u64,
    /// Connects that failed to start.
    failed: u64,
    /// Most connections open at once.
    max_open: usize,
}

/// A flood of denied connects at a fixed rate from one thread, switched on
/// and off by a flag: non-blocking connects on a schedule (all those due
/// are started, so a late wake-up catches up), each dropped once the edge
/// closes it.
struct PacedFlood {
    on: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<PacedCounts>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PacedFlood {
    fn start(target: SocketAddr, source: IpAddr, rate: f64) -> PacedFlood {
        let on = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(PacedCounts::default()));
        let thread = {
            let (on, stop, counts) = (on.clone(), stop.clone(), counts.clone());
            thread::spawn(move || {
                let mut open: Vec<(TcpStream, Instant)> = Vec::new();
                let mut c = PacedCounts::default();
                // (since, connects started since)
                let mut window: Option<(Instant, u64)> = None;
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    let mut next = now + Duration::from_millis(1);
                    if on.load(Ordering::Relaxed) {
                        let (since, done) = window.get_or_insert((now, 0));
                        let due = ((now - *since).as_secs_f64() * rate) as u64 + 1;
                        while *done < due {
                            match sys::start_connect(target, Some(source)) {
                                Ok(s) => open.push((s, Instant::now())),
                                Err(_) => c.failed += 1,
                            }
                            *done += 1;
                            c.issued += 1;
                        }
                        next = *since + Duration::from_secs_f64(*done as f64 / rate);
                    } else if let Some((since, _)) = window.take() {
                        c.on_secs += (now - since).as_secs_f64();
                    }
                    c.max_open = c.max_open.max(open.len());
                    open.retain(|(s, at)| {
                        if sys::is_closed(s) {
                            c.closed += 1;
                            false
                        } else if at.elapsed() > CLOSE_WAIT {
                            c.stuck += 1;
                            false
                        } else {
                            true
                        }
                    });
                    if let Ok(mut g) = counts.lock() {
                        *g = c;
                    }
                    let wait = next.saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        thread::sleep(wait);
                    }
                }
                if let Some((since, _)) = window.take() {
                    c.on_secs += since.elapsed().as_secs_f64();
                }
                if let Ok(mut g) = counts.lock() {
                    *g = c;
                }
            })
        };
        PacedFlood {
            on,
            stop,
            counts,
            thread: Some(thread),
        }
    }

    fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    fn stop(mut self) -> PacedCounts {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.counts.lock().map(|g| *g).unwrap_or_default()
    }
}

impl Drop for PacedFlood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One allowed connection: connect + 64-byte echo (timed, µs), then
/// half-close and read to EOF.
fn allowed_rtt(addr: SocketAddr, msg: &[u8]) -> Res<f64> {
    let mut back = [0u8; MSG];
    let t0 = Instant::now();
    let mut c = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    c.write_all(msg).map_err(|e| format!("write: {e}"))?;
    c.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    let us = t0.elapsed().as_secs_f64() * 1e6;
    if back[..] != msg[..] {
        return Err("echo returned other bytes".into());
    }
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut sink = [0u8; 64];
    while c.read(&mut sink).map_err(|e| format!("drain: {e}"))? > 0 {}
    Ok(us)
}

/// Per block of the latency case: flood on, edge CPU seconds, wall seconds.
struct LatBlock {
    flood: bool,
    cpu: f64,
    secs: f64,
}

// ---------------------------------------------------------------- case 3

/// One full-handshake TLS connection to `sni` on `addr`: handshake, 64-byte
/// echo, close_notify, read to EOF.
fn tls_conn(addr: SocketAddr, sni: &str, cfg: &Arc<ClientConfig>, msg: &[u8]) -> io::Result<()> {
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_owned()).map_err(io::Error::other)?;
    let conn = ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    if s.conn.handshake_kind() != Some(HandshakeKind::Full) {
        return Err(io::Error::other("not a full handshake"));
    }
    s.write_all(msg)?;
    s.flush()?;
    let mut back = [0u8; MSG];
    s.read_exact(&mut back)?;
    if back[..] != msg[..] {
        return Err(io::Error::other("echo returned other bytes"));
    }
    s.conn.send_close_notify();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut s.sock)?;
    }
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// [`THREADS`] threads making [`tls_conn`]s for `slice`; connections and
/// wall seconds.
fn tls_slice(
    addr: SocketAddr,
    sni: &str,
    cfg: &Arc<ClientConfig>,
    slice: Duration,
) -> Res<(u64, f64)> {
    let msg = pattern(MSG);
    let start = Instant::now();
    let total = AtomicU64::new(0);
    thread::scope(|s| -> Res<()> {
        let hs: Vec<_> = (0..THREADS)
            .map(|_| {
                let (msg, total) = (&msg, &total);
                s.spawn(move || -> Res<()> {
                    while start.elapsed() < slice {
                        tls_conn(addr, sni, cfg, msg).map_err(|e| format!("{sni}: {e}"))?;
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().map_err(|_| "tls thread panicked")??;
        }
        Ok(())
    })?;
    Ok((total.load(Ordering::Relaxed), start.elapsed().as_secs_f64()))
}

// ---------------------------------------------------------------- run

/// Runs the benchmark (see the module doc).
pub(crate) fn run(args: Args) -> Res<()> {
    let started = Instant::now();
    let n = env_num("TETHER_BENCH_FLOOD_N", 20_000);
    let rate = env_num("TETHER_BENCH_FLOOD_RATE", 5_000) as f64;
    let lat_secs = env_num("TETHER_BENCH_POLICY_LAT_SECS", 10);
    let conn_secs = env_num("TETHER_BENCH_CONN_SECS", 5) as f64;
    let tck = clk_tck();
    raise_nofile("the flood needs a few thousand sockets")?;
    let tmp = work_dir("tether-bench-policy-")?;
    let dir = tmp.path();
    let pki = make_pki(dir)?;
    let client_pki = make_client_pki(dir)?;
    let edge_toml = write_edge_toml(
        dir,
        &pki,
        &format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\ndomain = \"{DOMAIN}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [traffic_policy]\n[[traffic_policy.on_tcp_connect]]\nname = \"bench: deny {DENIED}\"\n\
             actions = [{{ type = \"restrict-ips\", config = {{ deny = [\"{DENIED}\"] }} }}]\n\n\
             [[endpoint_policy.\"m\".on_tcp_connect]]\nname = \"bench: mTLS\"\n\
             actions = [{{ type = \"terminate-tls\", config = {{ mutual_tls_certificate_authorities = [\"{}\"] }} }}]\n",
            pki.wild_cert.display(),
            pki.wild_key.display(),
            client_pki.ca.display()
        ),
    )?;
    let cfg = edge_toml.to_str().ok_or("non-UTF-8 path")?;
    let device_token = token(&args.edge, cfg, &["echo", "p", "m"])?;
    let (mut edge, agent) = start_edge(&args, dir, cfg)?;
    let tls_port = last_addr(&edge.wait_line("LISTEN tls")?)?;
    let epid = edge.pid();

    let echo_addr = upstream(echo)?;
    let d_toml = write_tetherd_toml(
        dir,
        agent,
        &pki,
        &device_token,
        "",
        &[
            ("echo", "tcp", echo_addr),
            ("p", "tls", echo_addr),
            ("m", "tls", echo_addr),
        ],
    )?;
    let (mut daemon, bound) = start_tetherd(&args, dir, &d_toml, &["echo", "p", "m"])?;
    let echo_tcp = last_addr(&bound[0])?;
    eprintln!("edge pid {epid}, tetherd pid {}", daemon.pid());

    let msg = pattern(MSG);
    let plain = tls_client(&pki.ca, None)?;
    let mutual = tls_client(&pki.ca, Some(&client_pki))?;
    let (p_sni, m_sni) = (format!("p.{DOMAIN}"), format!("m.{DOMAIN}"));

    // Sanity, untimed: the allowed paths work, the denied ones are denied,
    // `m` refuses a client without a certificate.
    allowed_rtt(echo_tcp, &msg).map_err(|e| format!("allowed client: {e}"))?;
    tls_conn(tls_port, &p_sni, &plain, &msg).map_err(|e| format!("p: {e}"))?;
    tls_conn(tls_port, &m_sni, &mutual, &msg).map_err(|e| format!("m with a certificate: {e}"))?;
    if tls_conn(tls_port, &m_sni, &plain, &msg).is_ok() {
        return Err("m let a client without a certificate through".into());
    }
    for a in [echo_tcp, tls_port] {
        let mut c = sys::connect(a, Some(DENIED), None, Duration::from_secs(5))
            .map_err(|e| format!("connect from {DENIED}: {e}"))?;
        if !closed_by_edge(&mut c) {
            return Err(format!("{a}: a connection from {DENIED} was not closed"));
        }
    }
    // Warm-up: a few of each kind, so no first-use cost lands in a figure.
    cpu_flood(echo_tcp, Some(DENIED), 500, false)?;
    cpu_flood(echo_tcp, None, 500, true)?;
    cpu_flood(tls_port, Some(DENIED), 500, false)?;
    cpu_flood(tls_port, None, 500, true)?;
    tls_slice(tls_port, &p_sni, &plain, Duration::from_millis(200))?;
    tls_slice(tls_port, &m_sni, &mutual, Duration::from_millis(200))?;
    thread::sleep(Duration::from_millis(500));

    // Edge CPU at rest, for scale.
    let idle0 = Cpu::of(epid, tck);
    thread::sleep(Duration::from_secs(1));
    let idle = Cpu::of(epid, tck).since(&idle0);

    // 1. Edge CPU per connection.
    let denied_tcp = cpu_case(
        "denied, tcp endpoint port",
        epid,
        tck,
        echo_tcp,
        Some(DENIED),
        n,
        false,
    )?;
    let allowed_tcp = cpu_case(
        "allowed, tcp endpoint port",
        epid,
        tck,
        echo_tcp,
        None,
        n,
        true,
    )?;
    let denied_tls = cpu_case(
        "denied, tls port",
        epid,
        tck,
        tls_port,
        Some(DENIED),
        n,
        false,
    )?;
    let allowed_tls = cpu_case("allowed, tls port", epid, tck, tls_port, None, n, true)?;
    for c in [&denied_tcp, &denied_tls] {
        if c.tally.closed != c.tally.connected {
            return Err(format!(
                "{}: {} of {} connections not closed by the edge",
                c.name,
                c.tally.connected - c.tally.closed,
                c.tally.connected
            ));
        }
    }

    // 2. Allowed latency without and with the paced denied flood.
    let flood = PacedFlood::start(echo_tcp, DENIED, rate);
    let mut quiet: Vec<f64> = Vec::new();
    let mut flooded: Vec<f64> = Vec::new();
    let mut blocks: Vec<LatBlock> = Vec::new();
    let nblocks = (lat_secs as f64 / LAT_BLOCK.as_secs_f64()).ceil().max(2.0) as usize;
    let nblocks = nblocks + nblocks % 2;
    for b in 0..nblocks {
        let on = b % 2 == 1;
        flood.set(on);
        let t0 = Instant::now();
        let mut c0: Option<Cpu> = None;
        while t0.elapsed() < LAT_BLOCK {
            if c0.is_none() && t0.elapsed() >= LAT_SKIP {
                c0 = Some(Cpu::of(epid, tck));
            }
            let us = allowed_rtt(echo_tcp, &msg).map_err(|e| format!("allowed client: {e}"))?;
            if c0.is_some() {
                if on { &mut flooded } else { &mut quiet }.push(us);
            }
        }
        let c1 = Cpu::of(epid, tck);
        let cpu = c0.map_or(0.0, |c0| c1.since(&c0).1);
        blocks.push(LatBlock {
            flood: on,
            cpu,
            secs: (t0.elapsed() - LAT_SKIP).as_secs_f64(),
        });
    }
    flood.set(false);
    thread::sleep(Duration::from_millis(200));
    let paced = flood.stop();
    let achieved = paced.issued as f64 / paced.on_secs;
    let cores = |on: bool| {
        let (c, s) = blocks
            .iter()
            .filter(|b| b.flood == on)
            .fold((0.0, 0.0), |(c, s), b| (c + b.cpu, s + b.secs));
        c / s
    };
    let (cores_quiet, cores_flood) = (cores(false), cores(true));
    eprintln!(
        "latency: {} samples without, {} with the flood; flood {} connects in {:.2} s on = {achieved:.0}/s ({} closed by the edge, {} not, {} failed, at most {} open); edge busy {:.3} / {:.3} cores",
        quiet.len(),
        flooded.len(),
        paced.issued,
        paced.on_secs,
        paced.closed,
        paced.stuck,
        paced.failed,
        paced.max_open,
        cores_quiet,
        cores_flood
    );

    // 3. New connections per second, mTLS against plain TLS.
    let slices = (conn_secs / CONN_SLICE.as_secs_f64()).ceil().max(1.0) as usize;
    let mut acc = [(0u64, 0.0f64, 0.0f64); 2];
    for _ in 0..slices {
        for (i, (sni, cfg)) in [(&p_sni, &plain), (&m_sni, &mutual)]
            .into_iter()
            .enumerate()
        {
            let c0 = Cpu::of(epid, tck);
            let (k, secs) = tls_slice(tls_port, sni, cfg, CONN_SLICE)?;
            let cpu = Cpu::of(epid, tck).since(&c0).0;
            acc[i].0 += k;
            acc[i].1 += secs;
            acc[i].2 += cpu;
        }
    }
    let rate_of = |i: usize| acc[i].0 as f64 / acc[i].1;
    let cpu_of = |i: usize| acc[i].2 * 1e6 / acc[i].0 as f64;
    let (tls_rate, mtls_rate) = (rate_of(0), rate_of(1));
    eprintln!(
        "connections: p {} in {:.2} s = {tls_rate:.0}/s ({:.0} us edge CPU each), m {} in {:.2} s = {mtls_rate:.0}/s ({:.0} us each)",
        acc[0].0,
        acc[0].1,
        cpu_of(0),
        acc[1].0,
        acc[1].1,
        cpu_of(1)
    );

    daemon.stop();
    edge.stop();

    // ------------------------------------------------------------ report
    let (q50, q99) = (percentile(&quiet, 50.0), percentile(&quiet, 99.0));
    let (f50, f99) = (percentile(&flooded, 50.0), percentile(&flooded, 99.0));
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<52} {:>10} {:>34} {:>7} {:>14}",
        "figure (edge release, tetherd as given)", "value", "baseline", "ratio", "aim"
    );
    for (d, a) in [(&denied_tcp, &allowed_tcp), (&denied_tls, &allowed_tls)] {
        let v = d.us_per_conn();
        let base = a.us_per_conn();
        let _ = writeln!(
            t,
            "{:<52} {:>10.2} {:>34} {:>7.2} {:>14}",
            format!("edge CPU us per conn from {DENIED}, {}", &d.name[8..]),
            v,
            format!("{base:.2} (from 127.0.0.1, allowed)"),
            v / base,
            format!("<= 20 us {}", verdict(v <= 20.0))
        );
    }
    let _ = writeln!(
        t,
        "{:<52} {:>10.0} {:>34} {:>7.2} {:>14}",
        format!("allowed connect+echo p50 us, {rate:.0}/s denied flood"),
        f50,
        format!("{q50:.0} (no flood)"),
        f50 / q50,
        format!("<= x1.25 {}", verdict(f50 <= 1.25 * q50))
    );
    let _ = writeln!(
        t,
        "{:<52} {:>10.0} {:>34} {:>7.2} {:>14}",
        "allowed connect+echo p99 us, same",
        f99,
        format!("{q99:.0} (no flood)"),
        f99 / q99,
        "-"
    );
    let _ = writeln!(
        t,
        "{:<52} {:>10.0} {:>34} {:>7.2} {:>14}",
        "new connections /s, mTLS endpoint (2 threads)",
        mtls_rate,
        format!("{tls_rate:.0} (plain tls endpoint)"),
        mtls_rate / tls_rate,
        format!(">= x0.80 {}", verdict(mtls_rate >= 0.8 * tls_rate))
    );
    let _ = writeln!(
        t,
        "{:<52} {:>10.0} {:>34} {:>7.2} {:>14}",
        "edge CPU us per connection, mTLS endpoint",
        cpu_of(1),
        format!("{:.0} (plain tls endpoint)", cpu_of(0)),
        cpu_of(1) / cpu_of(0),
        "-"
    );
    // What one edge core could do if the clients were free: the ratio the
    // connection rate tends to once the edge is the bottleneck.
    let _ = writeln!(
        t,
        "{:<52} {:>10.0} {:>34} {:>7.2} {:>14}",
        "  = connections /s per edge core, mTLS endpoint",
        1e6 / cpu_of(1),
        format!("{:.0} (plain tls endpoint)", 1e6 / cpu_of(0)),
        cpu_of(0) / cpu_of(1),
        format!(">= x0.80 {}", verdict(cpu_of(0) >= 0.8 * cpu_of(1)))
    );
    let _ = writeln!(t);
    for c in [&denied_tcp, &allowed_tcp, &denied_tls, &allowed_tls] {
        let _ = writeln!(
            t,
            "  flood {:<28} {} connects in {:.2} s, {} closed by the edge; edge {:.3} s CPU (schedstat {:.3} s, {:.2} us each)",
            c.name,
            c.tally.connected,
            c.secs,
            c.tally.closed,
            c.cpu.0,
            c.cpu.1,
            c.cpu.1 * 1e6 / c.tally.connected as f64
        );
    }
    let _ = writeln!(
        t,
        "  edge at rest: {:.2} ms CPU per s; allowed baseline = same edge, source 127.0.0.1, client half-closes at once and waits for the edge's close",
        idle.1 * 1e3
    );
    let _ = writeln!(
        t,
        "  latency: new connection each, {} / {} samples without / with the flood, 1 s blocks taking turns; flood paced at {rate:.0}/s achieved {achieved:.0}/s ({} connects, {} closed by the edge, {} not, {} failed); edge busy {:.3} cores without, {:.3} with",
        quiet.len(),
        flooded.len(),
        paced.issued,
        paced.closed,
        paced.stuck,
        paced.failed,
        cores_quiet,
        cores_flood
    );
    let _ = writeln!(
        t,
        "  connections: full TLS 1.3 handshakes (no resumption), 64 B echo, close; {} on p, {} on m over {:.1} s each, turns of 0.5 s",
        acc[0].0, acc[1].0, acc[0].1
    );
    let _ = writeln!(
        t,
        "{cpus} CPUs; load average at the end: {}; whole bench {:.0} s",
        loadavg.trim(),
        started.elapsed().as_secs_f64()
    );
    println!("{t}");

    let mut j = json_start(
        "policy",
        cpus,
        &loadavg,
        "loopback; machine shared with other builds",
    );
    let _ = writeln!(
        j,
        "  \"settings\": {{\"edge_limits\": \"defaults\", \"denied_source\": \"{DENIED}\", \"flood_n\": {n}, \"flood_threads\": {THREADS}, \"flood_rate\": {rate}, \"latency_secs\": {lat_secs}, \"latency_block_s\": {}, \"latency_skip_s\": {}, \"conn_secs\": {conn_secs}, \"conn_threads\": {THREADS}, \"message\": {MSG}}},",
        jnum(LAT_BLOCK.as_secs_f64()),
        jnum(LAT_SKIP.as_secs_f64())
    );
    let _ = writeln!(
        j,
        "  \"edge_cpu_per_conn\": {{\"what\": \"edge utime+stime (/proc/PID/stat) around a flood of connects, / connections; denied: from {DENIED}, the edge closes each; baseline allowed: from 127.0.0.1, same edge, client half-closes at once, waits for the edge's close\", \"aim_us\": 20, \"idle_cpu_s_per_s\": {}, \"tcp\": {{\"denied\": {}, \"allowed\": {}, \"ratio\": {}}}, \"tls\": {{\"denied\": {}, \"allowed\": {}, \"ratio\": {}}}}},",
        jnum(idle.1),
        denied_tcp.json(),
        allowed_tcp.json(),
        jnum(denied_tcp.us_per_conn() / allowed_tcp.us_per_conn()),
        denied_tls.json(),
        allowed_tls.json(),
        jnum(denied_tls.us_per_conn() / allowed_tls.us_per_conn())
    );
    let _ = writeln!(
        j,
        "  \"latency_under_flood\": {{\"what\": \"allowed client from 127.0.0.1, new connection each: connect + 64 B echo through the tcp endpoint\", \"aim_ratio_max\": 1.25, \"quiet\": {{\"samples\": {}, \"p50_us\": {}, \"p99_us\": {}, \"edge_cores\": {}}}, \"flood\": {{\"samples\": {}, \"p50_us\": {}, \"p99_us\": {}, \"edge_cores\": {}}}, \"p50_ratio\": {}, \"p99_ratio\": {}, \"flood_pacing\": {{\"target_per_s\": {rate}, \"achieved_per_s\": {}, \"issued\": {}, \"on_secs\": {}, \"closed_by_edge\": {}, \"not_closed\": {}, \"failed\": {}, \"max_open\": {}}}}},",
        quiet.len(),
        jnum(q50),
        jnum(q99),
        jnum(cores_quiet),
        flooded.len(),
        jnum(f50),
        jnum(f99),
        jnum(cores_flood),
        jnum(f50 / q50),
        jnum(f99 / q99),
        jnum(achieved),
        paced.issued,
        jnum(paced.on_secs),
        paced.closed,
        paced.stuck,
        paced.failed,
        paced.max_open
    );
    let _ = writeln!(
        j,
        "  \"mtls_connections\": {{\"what\": \"{THREADS} client threads, full TLS 1.3 handshake (rustls, no resumption), 64 B echo, close_notify, read to EOF; endpoints take turns every 0.5 s\", \"aim_ratio_min\": 0.8, \"tls\": {{\"connections\": {}, \"secs\": {}, \"per_s\": {}, \"edge_cpu_us_per_conn\": {}}}, \"mtls\": {{\"connections\": {}, \"secs\": {}, \"per_s\": {}, \"edge_cpu_us_per_conn\": {}}}, \"ratio\": {}, \"edge_cpu_ratio\": {}, \"edge_bound_ratio\": {}}}\n}}",
        acc[0].0,
        jnum(acc[0].1),
        jnum(tls_rate),
        jnum(cpu_of(0)),
        acc[1].0,
        jnum(acc[1].1),
        jnum(mtls_rate),
        jnum(cpu_of(1)),
        jnum(mtls_rate / tls_rate),
        jnum(cpu_of(1) / cpu_of(0)),
        jnum(cpu_of(0) / cpu_of(1))
    );
    write_results(&args.out, &j)
}
