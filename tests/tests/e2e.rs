//! End to end: the real `tether-edge` and `tetherd` on loopback, with real
//! clients (std TCP sockets, curl). Each test is named after what it proves.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tether_tests::*;

const T: Duration = Duration::from_secs(20);

/// An edge, a token, a daemon with the given endpoints: everything up and bound.
struct World {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    pki: Pki,
    edge: Edge,
    daemon: Proc,
    token_id: String,
}

impl World {
    fn start(
        endpoints: &[(&str, &str, SocketAddr)],
        edge_opts: EdgeOpts,
        session: (u64, u64),
    ) -> World {
        let tmp = tempdir();
        let dir = tmp.path().to_path_buf();
        let pki = Pki::generate(&dir);
        let cfg = write_edge_config(&dir, &pki, &edge_opts);
        let (token, token_id) = Edge::create_token(&cfg, &[]);
        let edge = Edge::start(&cfg);
        let dcfg = write_daemon_config(&dir, edge.agent, &pki.ca, &token, endpoints, session);
        let daemon = start_daemon(&dcfg);
        wait_bound(&daemon, &edge, endpoints.len(), T);
        World {
            _dir: tmp,
            dir,
            pki,
            edge,
            daemon,
            token_id,
        }
    }

    fn bound(&self, name: &str) -> u16 {
        last_bound_port(&self.daemon, name)
    }
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

#[test]
fn hundred_mib_cross_the_tcp_endpoint_intact_both_ways() {
    let up = echo_upstream();
    let w = World::start(
        &[("bulk", "tcp", up)],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let port = w.bound("bulk");
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect public port");
    let mut r = c.try_clone().expect("clone");
    const TOTAL: usize = 100 * 1024 * 1024;
    let writer = std::thread::spawn(move || {
        let mut sum = 0xcbf2_9ce4_8422_2325u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0usize;
        while off < TOTAL {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((off + i) as u64)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .to_be_bytes()[0];
            }
            fnv(&mut sum, &buf);
            c.write_all(&buf).expect("write");
            off += buf.len();
        }
        c.shutdown(Shutdown::Write).expect("half-close");
        sum
    });
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = r.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        fnv(&mut sum, &buf[..n]);
        total += n;
    }
    assert_eq!(total, TOTAL, "every byte came back");
    assert_eq!(writer.join().expect("writer"), sum, "checksum");
}

#[test]
fn half_close_works_both_ways_through_the_tunnel() {
    let up = echo_upstream();
    let w = World::start(
        &[("echo", "tcp", up)],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let port = w.bound("echo");
    // Client finishes first: the echo still comes back, then EOF.
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.write_all(b"ping").expect("write");
    c.shutdown(Shutdown::Write).expect("client FIN");
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("read to EOF");
    assert_eq!(got, b"ping");

    // Upstream finishes first: an HTTP upstream answers and closes its write
    // half; the client sees EOF while its own direction is still open.
    let http = http_upstream("hello");
    let w2 = World::start(
        &[("web", "tcp", http)],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let mut c = TcpStream::connect(("127.0.0.1", w2.bound("web"))).expect("connect");
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut got = String::new();
    c.read_to_string(&mut got).expect("response to EOF");
    assert!(got.ends_with("hello"), "{got}");
    drop(w);
}

#[test]
fn sixty_four_concurrent_streams_each_echo_their_own_bytes() {
    let up = echo_upstream();
    let w = World::start(
        &[("echo", "tcp", up)],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let port = w.bound("echo");
    let handles: Vec<_> = (0..64u8)
        .map(|k| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                let data: Vec<u8> = (0..200_000u32)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(k))
                    .collect();
                let mut r = c.try_clone().expect("clone");
                let d2 = data.clone();
                let wr = std::thread::spawn(move || {
                    c.write_all(&d2).expect("write");
                    c.shutdown(Shutdown::Write).expect("fin");
                });
                let mut got = Vec::new();
                r.read_to_end(&mut got).expect("read");
                wr.join().expect("writer");
                assert!(
                    got == data,
                    "stream {k}: {} of {} bytes, or different",
                    got.len(),
                    data.len()
                );
            })
        })
        .collect();
    for h in handles {
        h.join().expect("stream thread");
    }
}

#[test]
fn upstream_that_refuses_closes_the_public_client_promptly() {
    let w = World::start(
        &[("dead", "tcp", refusing_upstream())],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let mut c = TcpStream::connect(("127.0.0.1", w.bound("dead"))).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let r = c.read(&mut buf);
    assert!(
        matches!(r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        t0.elapsed()
    );
}

#[test]
fn tls_endpoint_serves_curl_with_the_ca_verified() {
    let http = http_upstream("hello over tls");
    let w = World::start(
        &[("web", "tls", http)],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let host = format!("web.{DOMAIN}");
    let port = w.edge.tls.port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&w.pki.ca)
        .args([
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("https://{host}:{port}/"),
        ])
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over tls");
    // An unknown name on the same port gets no service.
    let bad = format!("nope.{DOMAIN}");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(&w.pki.ca)
        .args([
            "--resolve",
            &format!("{bad}:{port}:127.0.0.1"),
            &format!("https://{bad}:{port}/"),
        ])
        .output()
        .expect("curl");
    assert!(!out.status.success(), "unknown SNI must not be served");
}

#[test]
fn edge_restart_makes_the_daemon_reconnect_and_serve_again() {
    let up = echo_upstream();
    let w = World::start(
        &[("echo", "tcp", up)],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let World {
        _dir,
        dir,
        pki: _pki,
        mut edge,
        daemon,
        ..
    } = w;
    let agent = edge.agent;
    assert_eq!(edge.proc.terminate(T), Some(0), "edge exits 0 on SIGTERM");
    // Same agent address, same store: the daemon's dial finds it again.
    let cfg = write_edge_config(
        &dir,
        &_pki,
        &EdgeOpts {
            agent_listen: Some(agent),
            ..EdgeOpts::default()
        },
    );
    let edge2 = Edge::start(&cfg);
    let line = daemon
        .out
        .wait_nth("BOUND echo", 1, T)
        .unwrap_or_else(|| panic!("no rebind: {:#?}", daemon.err.all()));
    let mut c = TcpStream::connect(("127.0.0.1", bound_port(&line))).expect("connect");
    c.write_all(b"again").expect("write");
    c.shutdown(Shutdown::Write).expect("fin");
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("read");
    assert_eq!(got, b"again");
    drop(edge2);
}

#[test]
fn silent_network_is_detected_within_the_heartbeat_deadline() {
    let tmp = tempdir();
    let dir = tmp.path();
    let pki = Pki::generate(dir);
    let cfg = write_edge_config(dir, &pki, &EdgeOpts::default());
    let (token, _) = Edge::create_token(&cfg, &[]);
    let edge = Edge::start(&cfg);
    let proxy = Proxy::start(edge.agent);
    let dcfg = write_daemon_config(
        dir,
        proxy.addr,
        &pki.ca,
        &token,
        &[("echo", "tcp", echo_upstream())],
        (300, 1000),
    );
    let daemon = start_daemon(&dcfg);
    daemon.out.wait("BOUND", T).expect("bound");
    proxy.pause(true);
    let t0 = Instant::now();
    // The daemon notices the silence and dials again (its first dial through
    // the paused proxy hangs too; what we check is the detection).
    let line = daemon
        .err
        .wait_contains("dead-peer deadline", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no detection: {:#?}", daemon.err.all()));
    let took = t0.elapsed();
    assert!(
        took <= Duration::from_millis(1000 + 700),
        "detected after {took:?}: {line}"
    );
    proxy.pause(false);
    daemon
        .out
        .wait_nth("BOUND", 1, T)
        .expect("reconnected after the network came back");
    drop(edge);
}

/// The number after `prefix` in `line` ("retry after 300000 ms" -> 300000).
fn number_after(line: &str, prefix: &str) -> Option<u64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
}

#[test]
fn revoked_token_closes_the_session_within_a_second_without_a_reconnect_storm() {
    let mut w = World::start(
        &[("echo", "tcp", echo_upstream())],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let daemon_from = w.daemon.err.len();
    let edge_from = w.edge.proc.out.len();
    let (code, _, err) = w.edge.cli(&["token", "revoke", &w.token_id]);
    // The CLI has committed the revocation: the invariant's second starts here.
    let revoked = Instant::now();
    assert_eq!(code, Some(0), "{err}");
    let second = Duration::from_secs(1);

    // The daemon's side of the session is over once its supervisor has
    // scheduled the next dial (it logs that only after the session ended).
    let (next, next_at) = w
        .daemon
        .err
        .wait_contains_after(daemon_from, "next dial in", Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "the daemon never scheduled a redial: {:#?}",
                w.daemon.err.all()
            )
        });
    let took = next_at.saturating_duration_since(revoked);
    assert!(
        took <= second,
        "the daemon's session ended {took:?} after the revocation: {next}"
    );
    // The edge's side too: the endpoint is gone.
    let (_, unbound_at) = w
        .edge
        .proc
        .out
        .wait_contains_after(edge_from, "UNBOUND echo", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the edge kept the endpoint: {:#?}", w.edge.proc.out.all()));
    let took = unbound_at.saturating_duration_since(revoked);
    assert!(
        took <= second,
        "the edge unbound echo {took:?} after the revocation"
    );

    // The daemon was told why and how long to wait, and waits at least that:
    // a storm would redial sooner, a dead daemon would not be running.
    let (refusal, _) = w
        .daemon
        .err
        .wait_contains_after(daemon_from, "TOKEN_REVOKED", Duration::from_secs(1))
        .unwrap_or_else(|| panic!("no TOKEN_REVOKED: {:#?}", w.daemon.err.all()));
    let hint = number_after(&refusal, "retry after ")
        .unwrap_or_else(|| panic!("no retry hint in {refusal:?}"));
    let delay =
        number_after(&next, "next dial in ").unwrap_or_else(|| panic!("no delay in {next:?}"));
    assert!(
        hint > 0,
        "the edge gives a revoked device a retry hint: {refusal}"
    );
    assert!(
        delay >= hint,
        "the daemon redials after {delay} ms, sooner than the edge's hint of {hint} ms: {next}"
    );
    assert!(
        w.daemon.is_running(),
        "the daemon died after the revocation"
    );
    // And nothing else is scheduled meanwhile: one refusal, one redial plan.
    let second_plan = w.daemon.err.wait_map(Duration::from_secs(2), |ls| {
        (ls[daemon_from..]
            .iter()
            .filter(|l| l.contains("next dial in"))
            .count()
            >= 2)
            .then_some(())
    });
    assert!(
        second_plan.is_none(),
        "the daemon scheduled another dial within 2 s: {:#?}",
        &w.daemon.err.all()[daemon_from..]
    );
    assert!(w.daemon.is_running(), "the daemon is still running");
}

/// An edge with its PKI, a token on it, and a second CA that did not sign
/// the edge's certificate.
fn edge_and_a_foreign_ca() -> (tempfile::TempDir, Pki, Pki, String, Edge) {
    let tmp = tempdir();
    let dir = tmp.path();
    let pki = Pki::generate(dir);
    let other = dir.join("other");
    std::fs::create_dir_all(&other).expect("dir");
    let other_pki = Pki::generate(&other);
    let cfg = write_edge_config(dir, &pki, &EdgeOpts::default());
    let (token, _) = Edge::create_token(&cfg, &[]);
    let edge = Edge::start(&cfg);
    (tmp, pki, other_pki, token, edge)
}

#[test]
fn wrong_ca_is_refused_with_a_clear_message() {
    let (tmp, _pki, other_pki, token, edge) = edge_and_a_foreign_ca();
    let dir = tmp.path();
    let dcfg = write_daemon_config(
        dir,
        edge.agent,
        &other_pki.ca,
        &token,
        &[("e", "tcp", echo_upstream())],
        (15_000, 45_000),
    );
    let daemon = start_daemon(&dcfg);
    let line = daemon
        .err
        .wait_contains("certificate", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no certificate error: {:#?}", daemon.err.all()));
    assert!(
        line.contains("invalid peer certificate"),
        "names the rustls verdict: {line}"
    );
    assert!(
        line.contains("ca_file"),
        "points at the setting to check: {line}"
    );
    assert_eq!(daemon.out.count("CONNECTED"), 0, "never connects");
}

/// Without `ca_file`, tetherd trusts the system CA bundle, which
/// `$SSL_CERT_FILE` names as for OpenSSL: the edge's CA there connects, a
/// bundle without it is refused, and a missing bundle stops tetherd at start
/// (exit 64) naming the path and what to set.
#[test]
fn without_ca_file_the_system_bundle_is_trusted() {
    let (tmp, pki, other_pki, token, edge) = edge_and_a_foreign_ca();
    let dir = tmp.path();
    let dcfg = write_daemon_config(
        dir,
        edge.agent,
        &pki.ca,
        &token,
        &[("e", "tcp", echo_upstream())],
        (15_000, 45_000),
    );
    remove_config_key(&dcfg, "ca_file");
    let c = dcfg.to_str().expect("utf-8");
    let mut args = vec!["--config", c];
    if is_root() {
        args.push("--allow-root");
    }
    let run = |bundle: &std::path::Path| {
        Proc::spawn_as_service(
            "tetherd",
            &args,
            &[("SSL_CERT_FILE", bundle.display().to_string())],
            false,
        )
    };

    let good = run(&pki.ca);
    assert!(
        good.out
            .wait_contains("CONNECTED", Duration::from_secs(10))
            .is_some(),
        "connects with the edge's CA as the system bundle: {:#?}",
        good.err.all()
    );
    assert!(
        good.err.count("(system CA bundle)") >= 1,
        "says where its trust comes from: {:#?}",
        good.err.all()
    );
    drop(good);

    let wrong = run(&other_pki.ca);
    let line = wrong
        .err
        .wait_contains("certificate", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no certificate error: {:#?}", wrong.err.all()));
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert_eq!(wrong.out.count("CONNECTED"), 0, "never connects");
    drop(wrong);

    let missing = dir.join("no-such-bundle.crt");
    let mut gone = run(&missing);
    assert_eq!(
        gone.wait_exit(Duration::from_secs(10)),
        Some(64),
        "{:#?}",
        gone.err.all()
    );
    let all = gone.err.all().join("\n");
    assert!(
        all.contains(&missing.display().to_string()) && all.contains("set ca_file"),
        "names the bundle and what to set: {all}"
    );
}

#[test]
fn bad_config_exits_64_naming_file_and_line() {
    let tmp = tempdir();
    let p = tmp.path().join("bad.toml");
    std::fs::write(
        &p,
        "edge = \"127.0.0.1:1\"\ncredential = \"/x\"\nbogus_field = 1\n",
    )
    .expect("write");
    let mut args = vec!["--config", p.to_str().expect("utf-8")];
    if is_root() {
        args.push("--allow-root");
    }
    let (code, _, err) = run("tetherd", &args);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("bad.toml:3"), "names file:line: {err}");
    assert!(err.contains("bogus_field"), "names the field: {err}");

    let p = tmp.path().join("edge-bad.toml");
    std::fs::write(&p, "state_dir = \"/tmp\"\n[agent]\nlisten = 7\n").expect("write");
    let (code, _, err) = run(
        "tether-edge",
        &["--config", p.to_str().expect("utf-8"), "serve"],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("edge-bad.toml:3"), "names file:line: {err}");
}

#[test]
fn the_stream_carries_the_public_clients_address_to_the_device() {
    let up = echo_upstream();
    let w = World::start(
        &[("echo", "tcp", up)],
        EdgeOpts::default(),
        (15_000, 45_000),
    );
    let mut c = TcpStream::connect(("127.0.0.1", w.bound("echo"))).expect("connect");
    let local = c.local_addr().expect("addr");
    c.write_all(b"x").expect("write");
    let mut b = [0u8; 1];
    c.read_exact(&mut b).expect("echo");
    w.daemon
        .err
        .wait_contains(&local.to_string(), Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "daemon logs the client address {local}: {:#?}",
                w.daemon.err.all()
            )
        });
    let _ = &w.dir;
}
