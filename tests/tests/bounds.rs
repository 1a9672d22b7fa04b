//! DESIGN.md invariant 11, end to end: every resource a peer can hold on the
//! edge is bounded in size and in time. The real `tether-edge` on loopback,
//! with a raw agent (`tether_tests::raw`) as the peer that misbehaves and the
//! real `tetherd` as the device that must still get in.
//!
//! What a peer holds is read from the edge's `/proc/PID/fd` and `VmRSS`,
//! against the edge's own idle level measured in the same test after one
//! warm-up session (so that lazy start-up costs are in the baseline).
//! Every wait has a deadline derived from the configured limit; nothing
//! sleeps blindly. Tests that can run on the edge's default limits do so:
//! they also run, and fail for their own reason, against an edge that does
//! not know the `[limits]` table yet.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tether_proto::{EndpointKind, ErrorCode, FrameKind, StreamId};
use tether_tests::flood::{Flood, FloodConfig, MALFORMED_TOKEN, UNKNOWN_TOKEN};
use tether_tests::raw::{client_config, Dial, RawAgent};
use tether_tests::sys::{self, fd_count, Usage};
use tether_tests::*;

/// Deadline for an answer the edge gives at once (Welcome, BindOk).
const T: Duration = Duration::from_secs(10);
/// How far above its idle RSS the edge may stay once a peer's resources are
/// released (allocator slack). What the tests' peers pin is far more.
const RSS_SLACK: u64 = 8 << 20;
/// How many fds above idle the edge may hold once a peer is gone.
const FD_SLACK: usize = 2;
/// Added to every deadline derived from a limit: scheduling on a shared
/// 2-core machine, and the revocation watcher's 200 ms poll.
const MARGIN: Duration = Duration::from_secs(2);
/// What the contract calls the edge's revocation latency (invariant 4).
const REVOCATION: Duration = Duration::from_secs(1);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// An edge with its PKI and a TLS client configuration for raw agents.
struct Bed {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    pki: Pki,
    edge: Edge,
    tls: Arc<ClientConfig>,
}

impl Bed {
    fn start(opts: EdgeOpts) -> Bed {
        let tmp = tempdir();
        let dir = tmp.path().to_path_buf();
        let pki = Pki::generate(&dir);
        let cfg = write_edge_config(&dir, &pki, &opts);
        let edge = Edge::start(&cfg);
        let tls = client_config(&pki.ca);
        Bed {
            _tmp: tmp,
            dir,
            pki,
            edge,
            tls,
        }
    }

    /// A new token allowed `allow` (empty = `*`): (token, id).
    fn token(&self, allow: &[&str]) -> (String, String) {
        Edge::create_token(&self.edge.config, allow)
    }

    /// A raw agent from 127.0.0.1.
    fn agent(&self) -> RawAgent {
        self.dial(Dial::to(self.edge.agent))
    }

    fn dial(&self, d: Dial) -> RawAgent {
        RawAgent::connect(d, &self.tls).unwrap_or_else(|e| {
            panic!(
                "raw agent could not connect: {e}; edge log: {:#?}",
                self.edge.proc.err.all()
            )
        })
    }

    /// A raw agent that has been welcomed with `token`.
    fn welcomed(&self, token: &str) -> RawAgent {
        let mut a = self.agent();
        match a.authenticate(token, T) {
            Ok(Ok(_)) => a,
            other => panic!(
                "no Welcome: {other:?}; edge log: {:#?}",
                self.edge.proc.err.all()
            ),
        }
    }

    fn usage(&self) -> Usage {
        Usage::of(self.edge.pid())
    }

    /// The edge's idle level after one whole session (Hello, Bind, close), so
    /// that lazy initialisation is not mistaken for a leak.
    fn warm_idle(&self) -> Usage {
        let (token, _) = self.token(&["warm"]);
        let from = self.edge.proc.out.len();
        let mut a = self.welcomed(&token);
        a.bind("warm", EndpointKind::Tcp, T)
            .expect("bind warm")
            .expect("warm bound");
        drop(a);
        self.edge
            .proc
            .out
            .wait_contains_after(from, "UNBOUND warm", T)
            .unwrap_or_else(|| {
                panic!(
                    "warm-up session did not end: {:#?}",
                    self.edge.proc.err.all()
                )
            });
        // Settled: the same fd count three polls in a row.
        let pid = self.edge.pid();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = (fd_count(pid), 0);
        while last.1 < 3 && Instant::now() < deadline {
            thread::sleep(ms(100));
            let n = fd_count(pid);
            last = if n == last.0 { (n, last.1 + 1) } else { (n, 0) };
        }
        self.usage()
    }

    /// Polls until the edge is back within the slack of `idle`, at most
    /// until `deadline`; returns how it looked at the end and whether it made it.
    fn wait_back_to(&self, idle: Usage, deadline: Instant) -> (Usage, bool) {
        loop {
            let now = self.usage();
            if now.fds <= idle.fds + FD_SLACK && now.rss <= idle.rss + RSS_SLACK {
                return (now, true);
            }
            if Instant::now() >= deadline {
                return (now, false);
            }
            thread::sleep(ms(100));
        }
    }
}

fn port_of(url: &str) -> u16 {
    bound_port(url)
}

/// Reads a public client with a deadline: true if the edge closed it
/// (EOF or reset) within `t`, false if it is still open.
fn closed_within(c: &mut TcpStream, t: Duration) -> bool {
    c.set_read_timeout(Some(t)).expect("read timeout");
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Sends a PING and reads until its ACK: true if the session answered
/// within `t` without a GOAWAY.
fn alive(a: &mut RawAgent, data: u64, t: Duration) -> bool {
    if a.send_ping(data).is_err() {
        return false;
    }
    let deadline = Instant::now() + t;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match a.next_frame(left) {
            Ok(Some(f))
                if f.header.kind == FrameKind::Ping
                    && f.header.flags != 0
                    && f.payload == data.to_be_bytes() =>
            {
                return a.goaway.is_none()
            }
            Ok(Some(f)) => a.frames.push(f),
            Ok(None) | Err(_) => return false,
        }
    }
}

// ------------------------------------------------------------ (a) admission

/// The edge's defaults, but with the rate limits on failed authentication
/// out of the way (they have tests of their own in edge-lite/tests/api.rs),
/// for tests about what floods of refused Hellos do to something else.
fn without_auth_limits() -> EdgeOpts {
    EdgeOpts {
        limits: Limits {
            auth_failures_per_source: Some(1_000_000),
            auth_failures_per_token: Some(1_000_000),
            ..Limits::default()
        },
        ..EdgeOpts::default()
    }
}

#[test]
fn admission_flood_from_one_source_does_not_keep_a_device_out_past_two_seconds() {
    // 500 idle sockets, the Hello workers' sockets, the daemon and its
    // upstream, with room to spare; the edge inherits this as its start.
    let nofile = sys::raise_nofile(4096);
    assert!(
        nofile >= 1024,
        "RLIMIT_NOFILE is {nofile}: too low for the flood"
    );
    // Admission alone: the flood's Hellos are not slowed.
    let bed = Bed::start(without_auth_limits());
    let (token, _) = bed.token(&["echo"]);
    let up = echo_upstream();
    let dcfg = write_daemon_config(
        &bed.dir,
        bed.edge.agent,
        &bed.pki.ca,
        &token,
        &[("echo", "tcp", up)],
        (15_000, 45_000),
    );

    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let flood = Flood::start(
        FloodConfig::admission(bed.edge.agent, source),
        bed.tls.clone(),
    );
    assert!(
        flood.is_ready(),
        "the flood could not open its idle sockets"
    );
    // The flood is at full strength once every idle socket was tried and
    // each Hello worker has come round at least once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while flood.counts().hello_attempts < 8 && Instant::now() < deadline {
        thread::sleep(ms(20));
    }
    let before = flood.counts();

    let t0 = Instant::now();
    let daemon = start_daemon(&dcfg);
    let connected = daemon.out.wait("CONNECTED", Duration::from_secs(30));
    let took = t0.elapsed();
    let after = flood.stop();
    assert!(
        connected.is_some(),
        "tetherd never connected during the flood ({after:?}); daemon: {:#?}",
        daemon.err.all()
    );
    assert!(
        after.idle_connects >= 500 && after.hello_attempts > before.hello_attempts,
        "the flood was not running while the device connected: before {before:?}, after {after:?}"
    );
    assert!(
        took <= Duration::from_secs(2),
        "tetherd took {took:?} (spawn to CONNECTED) while 500 idle sockets and bad Hellos came from {source}; flood {after:?}"
    );
}

#[test]
fn refusals_are_counted_in_the_log_not_written_one_line_each() {
    // 200 refusals at once, not delayed.
    let bed = Bed::start(without_auth_limits());
    let from = bed.edge.proc.err.len();
    const N: usize = 200;
    let mut refused = 0;
    for i in 0..N {
        let token = if i % 2 == 0 {
            MALFORMED_TOKEN
        } else {
            UNKNOWN_TOKEN
        };
        let mut a = bed.agent();
        if let Ok(Err(r)) = a.authenticate(token, T) {
            assert_eq!(r.code, ErrorCode::AUTH_FAILED, "{r:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, N, "every bad Hello is answered with AUTH_FAILED");
    let lines = bed.edge.proc.err.all();
    let added = &lines[from..];
    assert!(
        added.len() < 20,
        "{N} refusals wrote {} log lines; the first ones: {:#?}",
        added.len(),
        &added[..added.len().min(6)]
    );
}

#[test]
fn a_first_frame_other_than_hello_is_answered_with_goaway_protocol() {
    let bed = Bed::start(EdgeOpts::default());
    // A PING first.
    let mut a = bed.agent();
    a.send_ping(7).expect("ping");
    let code = a.wait_goaway(Duration::from_secs(2));
    assert!(
        matches!(code, Ok(Some(ErrorCode::PROTOCOL))),
        "a PING before Hello: {code:?}, frames {:?}",
        a.frames
    );
    assert!(
        !a.frames.iter().any(|f| f.header.kind == FrameKind::Ping),
        "the edge answered a PING before Hello: {:?}",
        a.frames
    );
    assert!(
        a.wait_closed(Duration::from_secs(3)),
        "closed after the GOAWAY"
    );
    // An OPEN first.
    let mut b = bed.agent();
    b.send_open("x").expect("open");
    let code = b.wait_goaway(Duration::from_secs(2));
    assert!(
        matches!(code, Ok(Some(ErrorCode::PROTOCOL))),
        "an OPEN before Hello: {code:?}, frames {:?}",
        b.frames
    );
    assert!(
        b.wait_closed(Duration::from_secs(3)),
        "closed after the GOAWAY"
    );
}

#[test]
fn edge_raises_its_open_file_soft_limit_to_the_hard_limit() {
    let tmp = tempdir();
    let pki = Pki::generate(tmp.path());
    let cfg = write_edge_config(tmp.path(), &pki, &EdgeOpts::default());
    let edge = Edge::start_with_nofile(&cfg, 256);
    let (soft, hard) = sys::nofile_of(edge.pid()).expect("/proc/PID/limits");
    assert!(
        hard.is_none_or(|h| h > 256),
        "the hard limit here is {hard:?}: this test cannot tell a raised soft limit from 256"
    );
    assert_eq!(
        soft, hard,
        "the edge started with soft limit 256 and runs with {soft:?} (hard {hard:?})"
    );
}

// ------------------------------------------------- (b) peers that stop reading

/// What a pre-authentication peer sends before it stops reading: a few
/// PINGs, OPENs each with a full initial window of DATA (what would make a
/// session buffer resident), then PINGs until the edge stops taking them.
fn stall_before_hello(a: &mut RawAgent) {
    let _ = a.set_write_timeout(ms(300));
    for i in 0..4 {
        if a.send_ping(i).is_err() {
            return;
        }
    }
    let chunk = vec![0x5a_u8; tether_proto::INITIAL_WINDOW as usize];
    for _ in 0..64 {
        let Ok(id) = a.send_open("x") else { return };
        if a.send_data(id, &chunk, false).is_err() {
            return;
        }
    }
    let pings = RawAgent::pings(4096);
    for _ in 0..64 {
        if a.write_raw(&pings).is_err() {
            return;
        }
    }
}

#[test]
fn peers_that_stop_reading_before_hello_hold_nothing_past_the_hello_timeout_and_linger() {
    let bed = Bed::start(EdgeOpts::default());
    let idle = bed.warm_idle();
    // One peer per source address, so that the per-source cap does not
    // refuse them at accept: each is admitted and must still be let go.
    const PEERS: u8 = 24;
    let start = Instant::now();
    let peers: Vec<RawAgent> = thread::scope(|s| {
        let hs: Vec<_> = (0..PEERS)
            .map(|i| {
                let bed = &bed;
                s.spawn(move || {
                    let mut a = bed.dial(Dial {
                        source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1 + i))),
                        rcvbuf: Some(4096),
                        ..Dial::to(bed.edge.agent)
                    });
                    // Half flood the edge with frames, half say nothing at all.
                    if i % 2 == 0 {
                        stall_before_hello(&mut a);
                    }
                    a
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("peer thread"))
            .collect()
    });
    let held = bed.usage();
    let limit = ms(Limits::DEFAULT_HELLO_TIMEOUT_MS) + ms(Limits::DEFAULT_LINGER_MS) + MARGIN;
    let (now, ok) = bed.wait_back_to(idle, start + limit);
    assert!(
        ok,
        "{PEERS} peers that never sent Hello and never read: idle {idle}, held {held}, still {now} after {:?} (hello_timeout + linger + margin = {limit:?}); resident: {}",
        start.elapsed(),
        sys::big_mappings_line(bed.edge.pid())
    );
    drop(peers);
}

/// An authenticated agent bound to `endpoint` that took `streams` public
/// connections, filled its share of the edge's buffers and stopped reading,
/// while its public clients push bytes the edge cannot deliver.
struct Stalled {
    _agent: RawAgent,
    clients: Vec<TcpStream>,
    port: u16,
}

fn stall_after_bind(bed: &Bed, token: &str, endpoint: &str, streams: usize) -> Stalled {
    let mut a = bed.dial(Dial {
        rcvbuf: Some(4096),
        ..Dial::to(bed.edge.agent)
    });
    match a.authenticate(token, T) {
        Ok(Ok(_)) => {}
        other => panic!("no Welcome: {other:?}"),
    }
    let url = a
        .bind(endpoint, EndpointKind::Tcp, T)
        .expect("bind")
        .unwrap_or_else(|r| panic!("bind {endpoint} refused: {r:?}"));
    let port = port_of(&url);
    let public = SocketAddr::from(([127, 0, 0, 1], port));
    let mut clients = Vec::new();
    for _ in 0..streams {
        let mut c = sys::connect(public, None, Some(4096), T).expect("public client");
        c.write_all(b"x").expect("first byte");
        clients.push(c);
    }
    let ids = a
        .wait_opens(streams, T)
        .expect("the edge opens a stream per client");
    let opened = ids.clone();
    // The edge's grant per stream: the initial window plus its WINDOWs.
    let credit = |id: StreamId, a: &RawAgent| -> usize {
        tether_proto::INITIAL_WINDOW as usize
            + a.frames
                .iter()
                .filter(|f| f.header.kind == FrameKind::Window && f.header.stream == Some(id))
                .map(|f| {
                    u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]])
                        as usize
                })
                .sum::<usize>()
    };
    let _ = a.set_write_timeout(Duration::from_secs(1));
    let chunk = vec![0xa5_u8; tether_proto::MAX_PAYLOAD];
    'fill: for id in ids {
        let mut left = credit(id, &a);
        while left > 0 {
            let n = left.min(chunk.len());
            if a.send_data(id, &chunk[..n], false).is_err() {
                break 'fill;
            }
            left -= n;
        }
    }
    // Credit for far more than the kernel buffers between the edge and the
    // agent hold (up to 4 MiB of send buffer here): the edge will have data
    // for the agent that it cannot write.
    for &id in &opened {
        if a.send_window(id, 1 << 20).is_err() {
            break;
        }
    }
    // From here the agent reads nothing; the public clients push bytes for it
    // until the edge stops taking them.
    let block = vec![0x3c_u8; 64 * 1024];
    for c in &clients {
        c.set_nonblocking(true).expect("nonblocking");
    }
    let until = Instant::now() + Duration::from_secs(1);
    let mut pushed = 0usize;
    while Instant::now() < until && pushed < 32 << 20 {
        let mut progress = false;
        for mut c in &clients {
            if let Ok(n) = c.write(&block) {
                pushed += n;
                progress = true;
            }
        }
        if !progress {
            thread::sleep(ms(20));
        }
    }
    // Precondition: the edge holds bytes for the agent that it cannot send
    // (more than the agent's receive buffer, and not moving).
    let edge_side = a.socket().local_addr().expect("agent address");
    let queued = || sys::tcp_queues(bed.edge.agent, edge_side).map_or(0, |q| q.0);
    // It grows while the kernel's send buffer autotunes; wait until it stops.
    let deadline = Instant::now() + T;
    let mut q = (queued(), 0);
    while Instant::now() < deadline {
        thread::sleep(ms(250));
        let now = queued();
        if now == q.0 && now > 0 {
            break;
        }
        q = (now, q.1 + 1);
    }
    let q1 = queued();
    assert!(
        q1 >= 64 << 10 && q1 == q.0,
        "precondition: the edge should hold a stalled send queue to the agent, has {} then {q1} bytes ({pushed} pushed by the public clients)",
        q.0
    );
    Stalled {
        _agent: a,
        clients,
        port,
    }
}

#[test]
fn authenticated_peers_that_stop_reading_hold_nothing_past_dead_after_and_linger() {
    // The session ends by the heartbeat: the agents go silent after binding.
    let opts = EdgeOpts {
        ping_interval_ms: 1_000,
        dead_after_ms: 3_000,
        ..EdgeOpts::default()
    };
    let dead_after = ms(opts.dead_after_ms);
    let bed = Bed::start(opts);
    let idle = bed.warm_idle();
    let from = bed.edge.proc.out.len();
    let stalled: Vec<Stalled> = (0..3)
        .map(|k| {
            let (token, _) = bed.token(&[]);
            stall_after_bind(&bed, &token, &format!("stall-{k}"), 64)
        })
        .collect();
    let silent_since = Instant::now();
    let held = bed.usage();
    let limit = dead_after + ms(Limits::DEFAULT_LINGER_MS) + MARGIN;
    let (now, ok) = bed.wait_back_to(idle, silent_since + limit);
    assert!(
        ok,
        "3 bound agents that stopped reading (64 busy streams each): idle {idle}, held {held}, still {now} after {:?} (dead_after + linger + margin = {limit:?}); resident: {}",
        silent_since.elapsed(),
        sys::big_mappings_line(bed.edge.pid())
    );
    for (k, s) in stalled.iter().enumerate() {
        assert!(
            bed.edge
                .proc
                .out
                .wait_contains_after(from, &format!("UNBOUND stall-{k}"), ms(1000))
                .is_some(),
            "stall-{k} is still bound"
        );
        assert!(
            !sys::accepts(SocketAddr::from(([127, 0, 0, 1], s.port))),
            "stall-{k}'s port {} still accepts",
            s.port
        );
    }
    drop(stalled);
}

#[test]
fn revoked_peers_that_stop_reading_are_cut_within_linger_and_free_their_endpoints() {
    // Heartbeat defaults (15 s / 45 s): only the revocation can end these.
    let bed = Bed::start(EdgeOpts::default());
    let idle = bed.warm_idle();
    let (token, id) = bed.token(&["stall-a", "stall-b"]);
    let from = bed.edge.proc.out.len();
    let stalled = [
        stall_after_bind(&bed, &token, "stall-a", 64),
        stall_after_bind(&bed, &token, "stall-b", 64),
    ];
    let held = bed.usage();
    let (code, _, err) = bed.edge.cli(&["token", "revoke", &id]);
    assert_eq!(code, Some(0), "revoke: {err}");
    let revoked_at = Instant::now();
    let limit = REVOCATION + ms(Limits::DEFAULT_LINGER_MS) + MARGIN;
    let (now, ok) = bed.wait_back_to(idle, revoked_at + limit);
    assert!(
        ok,
        "2 revoked sessions that stopped reading: idle {idle}, held {held}, still {now} {:?} after the revocation (1 s + linger + margin = {limit:?}); resident: {}",
        revoked_at.elapsed(),
        sys::big_mappings_line(bed.edge.pid())
    );
    for (name, s) in ["stall-a", "stall-b"].iter().zip(&stalled) {
        assert!(
            bed.edge
                .proc
                .out
                .wait_contains_after(from, &format!("UNBOUND {name}"), ms(1000))
                .is_some(),
            "{name} is still bound"
        );
        assert!(
            !sys::accepts(SocketAddr::from(([127, 0, 0, 1], s.port))),
            "{name}'s port {} still accepts public clients",
            s.port
        );
        assert!(!s.clients.is_empty());
    }
}

// ------------------------------------------------------------ (c) ownership

#[test]
fn an_offline_owners_endpoint_cannot_be_taken_by_another_token_until_released() {
    let bed = Bed::start(EdgeOpts::default());
    let (token_a, id_a) = bed.token(&["web"]);
    let (token_b, id_b) = bed.token(&[]);
    let hex = |id: &str| id.trim_start_matches("tk_").to_owned();

    // A binds web through the real daemon, then goes offline.
    let dcfg = write_daemon_config(
        &bed.dir,
        bed.edge.agent,
        &bed.pki.ca,
        &token_a,
        &[("web", "tcp", echo_upstream())],
        (15_000, 45_000),
    );
    let mut daemon = start_daemon(&dcfg);
    daemon
        .out
        .wait("BOUND web", T)
        .unwrap_or_else(|| panic!("A did not bind: {:#?}", daemon.err.all()));
    let from = bed.edge.proc.out.len();
    daemon.terminate(T);
    bed.edge
        .proc
        .out
        .wait_contains_after(from, "UNBOUND web", T)
        .expect("the edge unbinds web once A is gone");

    // B's allow list covers web, but A owns it.
    let mut b = bed.welcomed(&token_b);
    let taken = b.bind("web", EndpointKind::Tcp, T).expect("bind answer");
    match &taken {
        Err(r) => assert_eq!(r.code, ErrorCode::ENDPOINT_TAKEN, "{r:?}"),
        Ok(url) => panic!("token B took web at {url} while its owner A was offline"),
    }

    // The operator sees who owns it, and releases it.
    let (code, out, err) = bed.edge.cli(&["endpoint", "list"]);
    assert_eq!(code, Some(0), "endpoint list: {err}");
    assert!(
        out.lines()
            .any(|l| l.contains("web") && l.contains(&hex(&id_a)) && l.contains("tcp")),
        "endpoint list names web, its owner {id_a} and its kind:\n{out}"
    );
    let (code, _, err) = bed.edge.cli(&["endpoint", "release", "web"]);
    assert_eq!(code, Some(0), "endpoint release web: {err}");

    // Running edges see the release at their next store poll (REVOCATION_POLL,
    // 200 ms): B's bind succeeds within a second.
    let released = Instant::now();
    let url = loop {
        match b.bind("web", EndpointKind::Tcp, T).expect("bind answer") {
            Ok(url) => break url,
            Err(r) if released.elapsed() < Duration::from_secs(1) => {
                assert_eq!(r.code, ErrorCode::ENDPOINT_TAKEN, "{r:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(r) => panic!("1 s after the release B's bind is still refused: {r:?}"),
        }
    };
    assert!(url.starts_with("tcp://"), "{url}");
    let (_, out, _) = bed.edge.cli(&["endpoint", "list"]);
    assert!(
        out.lines()
            .any(|l| l.contains("web") && l.contains(&hex(&id_b))),
        "B owns web now:\n{out}"
    );
}

// ------------------------------------------------------------ (d) caps

#[test]
fn a_session_past_sessions_per_token_evicts_the_oldest() {
    let bed = Bed::start(EdgeOpts::default());
    let (token, _) = bed.token(&[]);
    let limit = Limits::DEFAULT_SESSIONS_PER_TOKEN;
    let mut agents: Vec<RawAgent> = (0..limit).map(|_| bed.welcomed(&token)).collect();
    for (i, a) in agents.iter_mut().enumerate() {
        assert!(alive(a, i as u64, T), "session {i} of {limit} is up");
    }
    // One more: the oldest goes.
    agents.push(bed.welcomed(&token));
    let evicted = agents[0].wait_goaway(Duration::from_secs(2));
    assert!(
        matches!(evicted, Ok(Some(_))),
        "the oldest of {} sessions of one token got no GOAWAY: {evicted:?}",
        limit + 1
    );
    assert!(
        agents[0].wait_closed(ms(Limits::DEFAULT_LINGER_MS) + MARGIN),
        "the evicted session is closed"
    );
    for (i, a) in agents.iter_mut().enumerate().skip(1) {
        assert!(alive(a, 100 + i as u64, T), "session {i} was not evicted");
    }
    // And again: now the second oldest.
    agents.push(bed.welcomed(&token));
    let evicted = agents[1].wait_goaway(Duration::from_secs(2));
    assert!(
        matches!(evicted, Ok(Some(_))),
        "the next oldest got no GOAWAY: {evicted:?}"
    );
    for (i, a) in agents.iter_mut().enumerate().skip(2) {
        assert!(alive(a, 200 + i as u64, T), "session {i} was not evicted");
    }
}

#[test]
fn binds_past_endpoints_per_session_are_refused_by_the_limit_rule() {
    let bed = Bed::start(EdgeOpts::default());
    let (token, _) = bed.token(&[]);
    let mut a = bed.welcomed(&token);
    let limit = Limits::DEFAULT_ENDPOINTS_PER_SESSION;
    for i in 0..limit {
        a.bind(&format!("e{i}"), EndpointKind::Tcp, T)
            .expect("bind answer")
            .unwrap_or_else(|r| panic!("bind {i} of {limit} refused: {r:?}"));
    }
    let fds = fd_count(bed.edge.pid());
    let past = a
        .bind(&format!("e{limit}"), EndpointKind::Tcp, T)
        .expect("bind answer");
    match past {
        Ok(url) => panic!(
            "bind {} of a session with limit {limit} succeeded at {url}",
            limit + 1
        ),
        Err(r) => {
            assert_eq!(r.code, ErrorCode::BIND_REFUSED, "{r:?}");
            assert!(
                r.rule.contains("limits.endpoints_per_session"),
                "the refusal names the limit: {r:?}"
            );
        }
    }
    assert!(
        fd_count(bed.edge.pid()) <= fds,
        "a refused bind opened no port"
    );
}

#[test]
fn public_clients_past_the_waiting_limit_are_closed_at_once() {
    // One stream per session: every public client after the first waits.
    let bed = Bed::start(EdgeOpts {
        max_streams: Some(1),
        ..EdgeOpts::default()
    });
    let (token, _) = bed.token(&[]);
    let mut a = bed.welcomed(&token);
    let url = a
        .bind("wait", EndpointKind::Tcp, T)
        .expect("bind answer")
        .expect("bound");
    let public = SocketAddr::from(([127, 0, 0, 1], port_of(&url)));
    let pid = bed.edge.pid();
    let base = fd_count(pid);
    let mut first = TcpStream::connect(public).expect("client 0");
    first.write_all(b"x").expect("write");
    a.wait_opens(1, T)
        .expect("the first client gets the one stream");

    let limit = Limits::DEFAULT_PUBLIC_WAITING_PER_ENDPOINT;
    let waiting: Vec<TcpStream> = (0..limit)
        .map(|i| TcpStream::connect(public).unwrap_or_else(|e| panic!("client {}: {e}", i + 1)))
        .collect();
    // Synchronise on the edge having accepted every one of them.
    let deadline = Instant::now() + T;
    while fd_count(pid) < base + 1 + limit && Instant::now() < deadline {
        thread::sleep(ms(20));
    }
    assert!(
        fd_count(pid) >= base + 1 + limit,
        "the edge holds {} fds, expected {} + {} public connections",
        fd_count(pid),
        base,
        1 + limit
    );
    for k in 0..2 {
        let mut c = TcpStream::connect(public).expect("one past the limit");
        let t0 = Instant::now();
        assert!(
            closed_within(&mut c, Duration::from_secs(1)),
            "public client {} (with {limit} waiting) was not closed within 1 s",
            limit + 1 + k
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
    for (i, c) in waiting.iter().enumerate() {
        c.set_nonblocking(true).expect("nonblocking");
        assert!(
            !sys::is_closed(c),
            "waiting client {} (within the limit) was closed",
            i + 1
        );
    }
    drop(first);
}

#[test]
fn an_idle_public_connection_is_closed_after_the_idle_timeout_and_a_busy_one_is_not() {
    const IDLE_MS: u64 = 1_500;
    let bed = Bed::start(EdgeOpts {
        limits: Limits {
            idle_timeout_ms: Some(IDLE_MS),
            ..Limits::default()
        },
        ..EdgeOpts::default()
    });
    let (token, _) = bed.token(&["echo"]);
    let dcfg = write_daemon_config(
        &bed.dir,
        bed.edge.agent,
        &bed.pki.ca,
        &token,
        &[("echo", "tcp", echo_upstream())],
        (15_000, 45_000),
    );
    let daemon = start_daemon(&dcfg);
    let line = daemon
        .out
        .wait("BOUND echo", T)
        .unwrap_or_else(|| panic!("not bound: {:#?}", daemon.err.all()));
    let public = SocketAddr::from(([127, 0, 0, 1], bound_port(&line)));
    let echo = |c: &mut TcpStream, b: u8| -> bool {
        let mut got = [0u8; 1];
        c.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
            && c.write_all(&[b]).is_ok()
            && c.read_exact(&mut got).is_ok()
            && got[0] == b
    };

    // The busy one: a byte every 300 ms for three idle timeouts.
    let busy = thread::spawn(move || {
        let mut c = TcpStream::connect(public).expect("busy client");
        let until = Instant::now() + ms(3 * IDLE_MS);
        let mut n = 0u8;
        while Instant::now() < until {
            if !echo(&mut c, n) {
                return Err(format!("busy client cut after {n} echoes"));
            }
            n = n.wrapping_add(1);
            thread::sleep(ms(300));
        }
        Ok(n)
    });

    let mut idle = TcpStream::connect(public).expect("idle client");
    assert!(echo(&mut idle, b'i'), "the idle client's first echo");
    let last_byte = Instant::now();
    let closed = closed_within(&mut idle, ms(IDLE_MS) + MARGIN + Duration::from_secs(1));
    let after = last_byte.elapsed();
    assert!(
        closed,
        "an idle public connection stayed open {after:?} with idle_timeout_ms = {IDLE_MS}"
    );
    assert!(
        after >= ms(IDLE_MS * 8 / 10),
        "closed after {after:?}: before its idle timeout of {IDLE_MS} ms"
    );
    assert!(
        after <= ms(IDLE_MS) + MARGIN,
        "closed after {after:?}: idle_timeout_ms = {IDLE_MS} + margin"
    );
    match busy.join().expect("busy thread") {
        Ok(n) => assert!(n >= 5, "only {n} echoes"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_bind_that_changes_nothing_prints_bound_once() {
    let bed = Bed::start(EdgeOpts::default());
    let (token, _) = bed.token(&[]);
    let mut a = bed.welcomed(&token);
    let from = bed.edge.proc.out.len();
    let u1 = a
        .bind("same", EndpointKind::Tcp, T)
        .expect("answer")
        .expect("bound");
    let u2 = a
        .bind("same", EndpointKind::Tcp, T)
        .expect("answer")
        .expect("bound again");
    assert_eq!(u1, u2, "the same binding");
    // The edge writes stdout in order: once `BOUND other` is out, every
    // line of the two binds before it is too.
    a.bind("other", EndpointKind::Tcp, T)
        .expect("answer")
        .expect("bound");
    bed.edge
        .proc
        .out
        .wait_contains_after(from, "BOUND other ", T)
        .expect("BOUND other");
    let n = bed.edge.proc.out.all()[from..]
        .iter()
        .filter(|l| l.starts_with("BOUND same "))
        .count();
    assert_eq!(
        n,
        1,
        "BOUND printed once per actual change: {:#?}",
        bed.edge.proc.out.all()
    );
}
