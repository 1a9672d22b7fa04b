//! The real `tetherd` binary against a fake edge written here (a rustls
//! server with `tether_driver::Session`) on 127.0.0.1:0, with a test PKI made
//! at test time. Each test is named after what it proves.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    daemon_config, daemon_config_with_endpoint, echo_upstream, half_close_upstream, output_within,
    tetherd, tetherd_as_userns_root, Answer, Daemon, EdgeSession, FakeEdge, Pki, TempDir,
    EXIT_WITHIN, TOKEN,
};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use tether_driver::{ClientIdentity, Meta};
use tether_proto::{Control, ErrorCode};

const SECOND: Duration = Duration::from_secs(1);

/// What most tests here start from: a fake edge that welcomes every session,
/// and a daemon (config in a new temp dir named after `tag`) whose endpoint
/// `web` goes to `upstream`, with `extra` before the endpoint and
/// `endpoint_extra` inside it; started, `BOUND web` printed, and the session
/// it dialled. Keep the edge and the directory alive as long as the daemon.
fn bound_daemon(
    tag: &str,
    upstream: SocketAddr,
    extra: &str,
    endpoint_extra: &str,
) -> (FakeEdge, TempDir, Daemon, EdgeSession) {
    let pki = Pki::new("tether test CA");
    let edge = FakeEdge::start(&pki, Answer::Welcome);
    let dir = TempDir::new(tag);
    let config = daemon_config_with_endpoint(
        &dir,
        edge.addr,
        &pki.ca_pem,
        upstream,
        extra,
        endpoint_extra,
    );
    let daemon = Daemon::start(&config);
    daemon.line("BOUND web ", 10 * SECOND);
    let es = edge.next_session(SECOND);
    (edge, dir, daemon, es)
}

fn closed_port() -> SocketAddr {
    // Bind then drop: nothing listens there afterwards.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

#[test]
fn config_errors_exit_64_naming_file_line_and_field() {
    let dir = TempDir::new("config");
    let cred = dir.write("credential", &format!("{TOKEN}\n"), 0o600);
    let head = format!(
        "edge = \"127.0.0.1:7443\"\ncredential = \"{}\"\n",
        cred.display()
    );
    let ep = "[[endpoint]]\nname = \"web\"\nkind = \"tcp\"\nupstream = \"127.0.0.1:8080\"\n";
    let cases = [
        // (file text, expected "<line>: <field>: " and a word of the reason)
        (
            format!("{head}colour = \"red\"\n{ep}"),
            "3: colour: ",
            "unknown field",
        ),
        (
            format!("{head}[session]\nwindow = 100\n{ep}"),
            "4: session.window: ",
            "16384",
        ),
        (
            format!("{head}{ep}connect_timeout_ms = 0\n"),
            "7: endpoint[0].connect_timeout_ms: ",
            "must be 100..=600000 ms (100 ms to 10 min), not 0",
        ),
        (
            format!("{head}{ep}{}", ep.replace("tcp", "udp")),
            "9: endpoint[1].kind: ",
            "udp",
        ),
        (
            format!("{head}{ep}{ep}"),
            "8: endpoint[1].name: ",
            "already used by endpoint[0] (line 4)",
        ),
        (
            format!("{head}[session]\nping_interval_ms = 100\ndead_after_ms = 50\n{ep}"),
            "5: session.dead_after_ms: ",
            "exceed",
        ),
        (
            format!(
                "{head}{}",
                ep.replace("upstream = \"127.0.0.1:8080\"\n", "")
            ),
            "3: endpoint[0].upstream: ",
            "missing field",
        ),
        (
            format!("credential = \"x\"\n{ep}"),
            "1: edge: ",
            "missing field",
        ),
        (format!("{head}[[endpoint]\n"), "3: ", "expected"),
        (
            format!("{head}{ep}proxy_protocol = \"v1\"\n"),
            "7: endpoint[0].proxy_protocol: ",
            "only \"v2\" is accepted",
        ),
        (
            format!("{head}{ep}traffic_policy = \"allow all\"\n"),
            "7: endpoint[0].traffic_policy: ",
            "must be a table",
        ),
        (
            format!(
                "{head}{ep}[endpoint.traffic_policy]\nnote = \"{}\"\n",
                "x".repeat(20_000)
            ),
            "7: endpoint[0].traffic_policy: ",
            "at most",
        ),
        (
            format!("{head}{}", ep.replace("tcp", "tls-passthru")),
            "5: endpoint[0].kind: ",
            "tcp, tls or tls-passthrough",
        ),
    ];
    for (i, (text, want, reason)) in cases.iter().enumerate() {
        let path = dir.write(&format!("bad{i}.toml"), text, 0o644);
        let out = output_within(
            &mut tetherd(&["--config", path.to_str().expect("utf-8"), "--allow-root"]),
            EXIT_WITHIN,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(64),
            "case {i}: exit code; stderr:\n{stderr}"
        );
        let prefix = format!("error: {}:{want}", path.display());
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_default();
        assert!(
            line.starts_with(&prefix),
            "case {i}: want `{prefix}...{reason}`, got:\n{stderr}"
        );
        assert!(
            line.contains(reason),
            "case {i}: want reason `{reason}`, got:\n{stderr}"
        );
    }
}

#[test]
fn missing_config_file_and_bad_arguments_exit_64() {
    let out = output_within(
        &mut tetherd(&["--config", "/nonexistent/tetherd.toml"]),
        EXIT_WITHIN,
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("error: /nonexistent/tetherd.toml: cannot read the config file: "));
    let out = output_within(&mut tetherd(&["--frobnicate"]), EXIT_WITHIN);
    assert_eq!(out.status.code(), Some(64));
    let out = output_within(&mut tetherd(&[]), EXIT_WITHIN);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[test]
fn credential_readable_by_group_or_others_is_refused() {
    let pki = Pki::new("tether test CA");
    for mode in [0o644, 0o640, 0o604, 0o660] {
        let dir = TempDir::new("mode");
        let config = daemon_config(&dir, closed_port(), &pki.ca_pem, closed_port(), "");
        let cred = dir.path("credential");
        std::fs::set_permissions(&cred, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
        // Without the check the daemon would run (and retry its dials)
        // forever: fail at the deadline instead of hanging.
        let out = output_within(
            &mut tetherd(&["--config", config.to_str().expect("utf-8"), "--allow-root"]),
            EXIT_WITHIN,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "mode {mode:o}: {stderr}");
        assert!(
            stderr.contains(&cred.display().to_string()),
            "names the file: {stderr}"
        );
        assert!(
            stderr.contains(&format!("mode {mode:04o}")),
            "names the mode: {stderr}"
        );
    }
}

/// A `tetherd` command that runs as uid 0 for real: in a user namespace
/// where the test's user is root, or directly when the test runs as root.
fn tetherd_as_root(args: &[&str]) -> std::process::Command {
    match tetherd_as_userns_root(args) {
        Some(cmd) => cmd,
        None if rustix::process::geteuid().is_root() => tetherd(args),
        None => panic!(
            "cannot run tetherd as uid 0 here: this test needs user namespaces \
             (`unshare --user --map-root-user`, util-linux) or to run as root"
        ),
    }
}

#[test]
fn running_as_root_without_allow_root_is_refused() {
    let pki = Pki::new("tether test CA");
    let dir = TempDir::new("root");
    let config = daemon_config(&dir, closed_port(), &pki.ca_pem, closed_port(), "");
    let config = config.to_str().expect("utf-8");
    let out = output_within(&mut tetherd_as_root(&["--config", config]), EXIT_WITHIN);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("refusing to run as root (euid 0)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--allow-root"),
        "says how to override: {stderr}"
    );
    // The same uid 0 with --allow-root gets past the check and runs: it is
    // the root check that refused, not the environment.
    let daemon = Daemon::spawn(tetherd_as_root(&["--config", config, "--allow-root"]));
    assert!(
        daemon.wait_stderr("credential tk_0123456789ab, 1 endpoint(s)", 5 * SECOND),
        "{}",
        daemon.stderr()
    );
}

#[test]
fn a_stream_reaches_the_upstream_and_comes_back_with_half_close() {
    let pki = Pki::new("tether test CA");
    let edge = FakeEdge::start(&pki, Answer::Welcome);
    let (upstream, seen) = half_close_upstream();
    let dir = TempDir::new("tunnel");
    let config = daemon_config(&dir, edge.addr, &pki.ca_pem, upstream, "");
    let mut daemon = Daemon::start(&config);

    let connected = daemon.line("CONNECTED ", 10 * SECOND);
    let es = edge.next_session(SECOND);
    assert_eq!(
        connected,
        format!("CONNECTED {} session={}", edge.addr, es.number)
    );
    assert_eq!(es.hello_token, TOKEN, "Hello carries the credential");
    assert_eq!(
        es.hello_agent,
        concat!("tetherd/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(es.hello_version, tether_proto::PROTOCOL_VERSION);
    let bound = daemon.line("BOUND ", 5 * SECOND);
    assert_eq!(
        bound,
        format!("BOUND web tcp://127.0.0.1:{}", 20000 + es.number)
    );

    // Edge -> upstream, then FIN: the upstream only answers after it saw EOF,
    // and the edge only finishes reading after the daemon passed the
    // upstream's EOF back as a FIN.
    let request: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let reply = async_io::block_on(async {
        let meta = Meta {
            peer: Some("203.0.113.9:40000".parse().expect("addr")),
            ..Meta::endpoint("web")
        };
        let mut st = es.session.open(&meta).await.expect("open stream");
        st.write_all(&request).await.expect("write request");
        st.close().await.expect("half-close towards the upstream");
        let mut reply = Vec::new();
        st.read_to_end(&mut reply)
            .await
            .expect("read until the upstream's EOF");
        reply
    });
    let got = seen
        .recv_timeout(5 * SECOND)
        .expect("upstream saw the request");
    assert_eq!(got, request, "the upstream got every byte, then EOF");
    let mut want = b"reply:".to_vec();
    want.extend_from_slice(&request);
    assert_eq!(reply.len(), want.len());
    assert!(reply == want, "the reply came back intact");

    // SIGTERM: GOAWAY(NO_ERROR) to the edge, exit 0.
    let status = daemon.terminate(7 * SECOND);
    assert!(
        status.success(),
        "graceful exit: {status:?}; stderr:\n{}",
        daemon.stderr()
    );
    let t0 = Instant::now();
    while es.session.peer_goaway().is_none() && t0.elapsed() < SECOND {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        es.session.peer_goaway().map(|g| g.0),
        Some(ErrorCode::NO_ERROR),
        "the daemon said GOAWAY(NO_ERROR)"
    );
}

#[test]
fn sigterm_lets_open_streams_finish_then_exits_0() {
    let (upstream, seen) = echo_upstream();
    let (_edge, _dir, mut daemon, es) = bound_daemon("sigterm", upstream, "", "");
    let signalled = async_io::block_on(async {
        let mut st = es.session.open(&Meta::endpoint("web")).await.expect("open");
        st.write_all(b"one").await.expect("write");
        let mut echo = [0u8; 3];
        st.read_exact(&mut echo).await.expect("echo");
        daemon.sigterm();
        let signalled = Instant::now();
        while es.session.peer_goaway().is_none() {
            assert!(signalled.elapsed() < 2 * SECOND, "no GOAWAY after SIGTERM");
            async_io::Timer::after(Duration::from_millis(10)).await;
        }
        assert_eq!(
            es.session.peer_goaway().map(|g| g.0),
            Some(ErrorCode::NO_ERROR)
        );
        // Draining: the open stream still works both ways.
        async_io::Timer::after(Duration::from_millis(300)).await;
        st.write_all(b" two").await.expect("write while draining");
        let mut echo = [0u8; 4];
        st.read_exact(&mut echo).await.expect("echo while draining");
        assert_eq!(&echo, b" two");
        st.close().await.expect("close");
        let mut rest = Vec::new();
        // EOF, even when the daemon closes the transport right after its FIN.
        st.read_to_end(&mut rest)
            .await
            .expect("EOF after the drain");
        assert!(rest.is_empty());
        signalled
    });
    let status = daemon.wait_exit(7 * SECOND);
    assert!(status.success(), "{status:?}\n{}", daemon.stderr());
    assert!(
        signalled.elapsed() < Duration::from_millis(4500),
        "exited once the stream ended, not at the grace deadline"
    );
    assert_eq!(seen.recv_timeout(SECOND).expect("upstream"), b"one two");
}

#[test]
fn a_stream_that_does_not_finish_is_cut_at_the_grace_deadline_and_the_exit_is_still_0() {
    let (upstream, _seen) = echo_upstream();
    let (_edge, _dir, mut daemon, es) = bound_daemon("grace", upstream, "", "");
    let _st = async_io::block_on(async {
        let mut st = es.session.open(&Meta::endpoint("web")).await.expect("open");
        st.write_all(b"x").await.expect("write");
        let mut echo = [0u8; 1];
        st.read_exact(&mut echo).await.expect("echo");
        st // held open, never finished
    });
    let t0 = Instant::now();
    daemon.sigterm();
    let status = daemon.wait_exit(9 * SECOND);
    assert!(status.success(), "{status:?}\n{}", daemon.stderr());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(4500),
        "waited for the stream: {took:?}"
    );
    assert!(
        daemon.stderr().contains("closing anyway"),
        "{}",
        daemon.stderr()
    );
}

#[test]
fn a_refused_bind_is_logged_with_its_rule_and_the_other_endpoints_still_bind() {
    let pki = Pki::new("tether test CA");
    let edge = FakeEdge::start(&pki, Answer::Welcome);
    let dir = TempDir::new("binderr");
    let extra = "[[endpoint]]\nname = \"denied\"\nkind = \"tls\"\nupstream = \"127.0.0.1:1\"\n";
    let config = daemon_config(&dir, edge.addr, &pki.ca_pem, closed_port(), extra);
    let mut daemon = Daemon::start(&config);
    daemon.line("BOUND web ", 10 * SECOND);
    assert!(
        daemon.wait_stderr(
            "edge refused endpoint denied: BIND_REFUSED by rule `token tk_0123456789ab allow=web`: \
             not in the token's allow list",
            5 * SECOND
        ),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn session_settings_bound_the_streams_the_daemon_holds() {
    let (upstream, _seen) = echo_upstream();
    let extra = "[session]\nmax_streams = 2\nwindow = 16384\n";
    let (_edge, _dir, mut daemon, es) = bound_daemon("maxstreams", upstream, extra, "");
    async_io::block_on(async {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut st = es.session.open(&Meta::endpoint("web")).await.expect("open");
            st.write_all(b"hi").await.expect("write");
            let mut echo = [0u8; 2];
            st.read_exact(&mut echo).await.expect("echo");
            held.push(st);
        }
        // A third stream is past the configured bound: refused, not buffered.
        let mut st = es.session.open(&Meta::endpoint("web")).await.expect("open");
        let _ = st.write_all(b"hi").await;
        let mut buf = [0u8; 2];
        let err = st.read(&mut buf).await.expect_err("refused");
        assert!(err.to_string().contains("REFUSED_STREAM"), "{err}");
        // Releasing one makes room again, as soon as the daemon has seen
        // the RESET: retry until then (a refusal costs nothing), not after
        // a guessed pause.
        drop(held.pop());
        let released = Instant::now();
        let mut echo = [0u8; 2];
        // The stream that got the slot is kept open: dropping it would free
        // the slot again and let the third stream below in.
        let reused = loop {
            let mut st = es.session.open(&Meta::endpoint("web")).await.expect("open");
            // A refusal can arrive before the write as well as after it.
            let tried = match st.write_all(b"ok").await {
                Ok(()) => st.read_exact(&mut echo).await,
                Err(e) => Err(e),
            };
            match tried {
                Ok(()) => break st,
                Err(e) if e.to_string().contains("REFUSED_STREAM") => {
                    assert!(
                        released.elapsed() < 5 * SECOND,
                        "the released slot was never reused: {e}"
                    );
                    async_io::Timer::after(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("echo once a slot is free: {e}"),
            }
        };
        held.push(reused);
        assert_eq!(&echo, b"ok");
        // Still two at most: a third beside these two is refused again.
        let mut st = es.session.open(&Meta::endpoint("web")).await.expect("open");
        let _ = st.write_all(b"hi").await;
        let err = st.read(&mut buf).await.expect_err("refused");
        assert!(err.to_string().contains("REFUSED_STREAM"), "{err}");
    });
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn an_unreachable_upstream_resets_the_stream_with_connect_failed() {
    let (_edge, _dir, mut daemon, es) = bound_daemon("connfail", closed_port(), "", "");
    let err = async_io::block_on(async {
        let mut st = es.session.open(&Meta::endpoint("web")).await.expect("open");
        let mut buf = [0u8; 16];
        st.read(&mut buf).await.expect_err("the stream is reset")
    });
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("CONNECT_FAILED"), "{err}");
    assert!(
        daemon.wait_stderr("cannot connect to upstream", SECOND),
        "logged:\n{}",
        daemon.stderr()
    );
    // A stream for an endpoint the daemon never bound is refused the same way.
    let err = async_io::block_on(async {
        let mut st = es
            .session
            .open(&Meta::endpoint("nope"))
            .await
            .expect("open");
        let mut buf = [0u8; 16];
        st.read(&mut buf).await.expect_err("reset")
    });
    assert!(err.to_string().contains("CONNECT_FAILED"), "{err}");
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn an_edge_error_with_retry_after_holds_off_the_next_dial() {
    refusal_is_logged_and_holds_off_the_next_dial(
        ErrorCode::AUTH_FAILED,
        "edge refused the credential: AUTH_FAILED (fake edge says no)",
    );
}

#[test]
fn version_unsupported_is_logged_as_such_and_its_retry_hint_is_honoured() {
    refusal_is_logged_and_holds_off_the_next_dial(
        ErrorCode::VERSION_UNSUPPORTED,
        "edge refused the protocol version: VERSION_UNSUPPORTED (fake edge says no)",
    );
}

/// The edge answers every `Hello` with `Error{code, retry_after_ms: 1500}`:
/// the daemon logs `logged` (subject, code name, message) with the
/// credential's id and the hint, and dials again only after the hint.
fn refusal_is_logged_and_holds_off_the_next_dial(code: ErrorCode, logged: &str) {
    const RETRY_MS: u64 = 1500;
    let pki = Pki::new("tether test CA");
    let edge = FakeEdge::start(&pki, Answer::Refuse(code, RETRY_MS as u32));
    let dir = TempDir::new("refused");
    // A tiny own backoff: any wait of the order of RETRY_MS comes from the hint.
    let extra = "[reconnect]\ninitial_backoff_ms = 10\nmax_backoff_ms = 20\n";
    // By name: every dial resolves `localhost` again (through the bounded
    // blocking pool) and tries its addresses in turn.
    let edge_name = format!("localhost:{}", edge.addr.port());
    let config = daemon_config(&dir, edge_name, &pki.ca_pem, closed_port(), extra);
    let mut daemon = Daemon::start(&config);

    let line = format!("{logged}; credential tk_0123456789ab, retry after {RETRY_MS} ms");
    assert!(
        daemon.wait_stderr(&line, 10 * SECOND),
        "the refusal is logged with its code, message and hint (`{line}`):\n{}",
        daemon.stderr()
    );
    // Count handshakes over a window: one, then nothing for RETRY_MS, then one more.
    let t0 = Instant::now();
    while edge.handshake_count() < 2 && t0.elapsed() < Duration::from_millis(RETRY_MS * 3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let times = edge.handshakes.lock().expect("lock").clone();
    assert!(
        times.len() >= 2,
        "the daemon dials again after the hint: {} handshake(s)",
        times.len()
    );
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(RETRY_MS),
        "second dial after {gap:?}, before retry_after_ms"
    );
    assert!(
        gap < Duration::from_millis(RETRY_MS * 2),
        "second dial too late: {gap:?}"
    );
    // No storm: within the whole window, at most one dial per RETRY_MS.
    let span = times.last().copied().unwrap_or(times[0]) - times[0];
    assert!(
        times.len() as u64 <= 1 + span.as_millis() as u64 / RETRY_MS,
        "{} dials in {span:?}",
        times.len()
    );
    assert_eq!(
        edge.accept_count(),
        times.len(),
        "no dial stopped before its handshake"
    );
    assert!(
        !daemon.stderr().contains("CONNECTED"),
        "no session after a refusal"
    );
    assert!(
        daemon.terminate(7 * SECOND).success(),
        "stops while waiting"
    );
}

#[test]
fn a_welcome_with_a_version_the_daemon_does_not_speak_is_a_protocol_error() {
    let pki = Pki::new("tether test CA");
    let edge = FakeEdge::start(
        &pki,
        Answer::WelcomeVersion(tether_proto::PROTOCOL_VERSION + 1),
    );
    let dir = TempDir::new("welcome-version");
    let config = daemon_config(&dir, edge.addr, &pki.ca_pem, closed_port(), "");
    let mut daemon = Daemon::start(&config);
    let es = edge.next_session(10 * SECOND);
    let t0 = Instant::now();
    while es.session.peer_goaway().is_none() && t0.elapsed() < 5 * SECOND {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        es.session.peer_goaway().map(|g| g.0),
        Some(ErrorCode::PROTOCOL),
        "GOAWAY(PROTOCOL) to an edge that welcomed with another version"
    );
    assert!(
        daemon.wait_stderr("broke the protocol: expected Welcome or Error", SECOND),
        "{}",
        daemon.stderr()
    );
    assert!(!daemon.stderr().contains("connected to"), "no session");
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn a_revocation_after_welcome_also_holds_off_the_next_dial() {
    const RETRY_MS: u64 = 1500;
    let extra = "[reconnect]\ninitial_backoff_ms = 10\nmax_backoff_ms = 20\n";
    let (edge, _dir, mut daemon, es) = bound_daemon("revoked", closed_port(), extra, "");
    let revoke = Control::Error {
        code: ErrorCode::TOKEN_REVOKED.0,
        retry_after_ms: RETRY_MS as u32,
        message: "revoked by the test",
    };
    async_io::block_on(es.session.send_control(&revoke)).expect("send Error");
    es.session.goaway(ErrorCode::TOKEN_REVOKED);
    let revoked_at = Instant::now();
    assert!(
        daemon.wait_stderr(
            "edge refused the credential: TOKEN_REVOKED (revoked by the test)",
            5 * SECOND
        ),
        "{}",
        daemon.stderr()
    );
    while edge.handshake_count() < 2 && revoked_at.elapsed() < Duration::from_millis(RETRY_MS * 3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let times = edge.handshakes.lock().expect("lock").clone();
    assert_eq!(times.len(), 2, "one more dial after the hint");
    let gap = times[1] - revoked_at;
    assert!(
        gap >= Duration::from_millis(RETRY_MS),
        "redialed after {gap:?}, before retry_after_ms"
    );
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn a_silent_edge_is_dropped_at_the_heartbeat_deadline_and_redialed() {
    let pki = Pki::new("tether test CA");
    let edge = FakeEdge::start(&pki, Answer::Silent);
    let dir = TempDir::new("silent");
    // The [session] heartbeat reaches the mux: 100 ms pings, dead after 300 ms.
    let extra = "[reconnect]\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n\
                 [session]\nping_interval_ms = 100\ndead_after_ms = 300\n";
    let config = daemon_config(&dir, edge.addr, &pki.ca_pem, closed_port(), extra);
    let mut daemon = Daemon::start(&config);
    let t0 = Instant::now();
    while edge.handshake_count() < 3 && t0.elapsed() < 5 * SECOND {
        std::thread::sleep(Duration::from_millis(10));
    }
    let times = edge.handshakes.lock().expect("lock").clone();
    assert!(
        times.len() >= 3,
        "redials after each dead session: {} handshake(s)",
        times.len()
    );
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(300),
        "not before the deadline: {gap:?}"
    );
    assert!(gap < Duration::from_millis(1500), "detected late: {gap:?}");
    assert!(
        daemon.wait_stderr("no input within the dead-peer deadline", SECOND),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn a_wrong_ca_is_refused_with_a_clear_message_and_the_daemon_retries() {
    let pki = Pki::new("tether test CA");
    let other = Pki::new("another CA");
    let edge = FakeEdge::start(&pki, Answer::Welcome);
    let dir = TempDir::new("wrongca");
    let extra = "[reconnect]\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\n";
    let config = daemon_config(&dir, edge.addr, &other.ca_pem, closed_port(), extra);
    let mut daemon = Daemon::start(&config);
    assert!(
        daemon.wait_stderr(
            "the edge's certificate was rejected: invalid peer certificate: UnknownIssuer",
            10 * SECOND
        ),
        "names the certificate error:\n{}",
        daemon.stderr()
    );
    let t0 = Instant::now();
    while edge.accept_count() < 3 && t0.elapsed() < 5 * SECOND {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        edge.accept_count() >= 3,
        "reconnects with backoff: {} dial(s)",
        edge.accept_count()
    );
    assert_eq!(edge.handshake_count(), 0, "no handshake ever completed");
    assert!(
        edge.sessions.try_recv().is_err(),
        "no session with an unverified edge"
    );
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn goaway_from_the_edge_dials_a_new_session_at_once_while_the_old_one_drains() {
    let (upstream, seen) = echo_upstream();
    // A long own backoff: only the "at once" rule can explain a fast redial.
    let extra = "[reconnect]\ninitial_backoff_ms = 20000\nmax_backoff_ms = 60000\n";
    let (edge, _dir, mut daemon, first) = bound_daemon("drain", upstream, extra, "");

    async_io::block_on(async {
        let mut st = first
            .session
            .open(&Meta::endpoint("web"))
            .await
            .expect("open");
        st.write_all(b"before").await.expect("write");
        let mut echo = [0u8; 6];
        st.read_exact(&mut echo).await.expect("echo before GOAWAY");
        first.session.goaway(ErrorCode::NO_ERROR);
        let t0 = Instant::now();
        let line = daemon.line("CONNECTED ", 3 * SECOND);
        assert!(
            t0.elapsed() < 2 * SECOND,
            "redialed at once: {:?}",
            t0.elapsed()
        );
        let second = edge.next_session(SECOND);
        assert!(
            line.ends_with(&format!("session={}", second.number)),
            "{line}"
        );
        daemon.line("BOUND web ", 3 * SECOND);
        // The old session's stream still carries bytes both ways.
        st.write_all(b" and after")
            .await
            .expect("write after GOAWAY");
        let mut echo = [0u8; 10];
        st.read_exact(&mut echo).await.expect("echo after GOAWAY");
        assert_eq!(&echo, b" and after");
        st.close().await.expect("close");
        // The end of the stream is EOF, even when the drained session's
        // transport closes before this read.
        let mut rest = Vec::new();
        st.read_to_end(&mut rest)
            .await
            .expect("EOF after the drain");
        assert!(rest.is_empty());
    });
    assert_eq!(
        seen.recv_timeout(SECOND).expect("upstream"),
        b"before and after"
    );
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn at_most_one_session_drains_beside_the_live_one() {
    let (upstream, _seen) = echo_upstream();
    let extra = "[reconnect]\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n";
    let (edge, _dir, mut daemon, first) = bound_daemon("drain-cap", upstream, extra, "");

    async_io::block_on(async {
        let mut st1 = first
            .session
            .open(&Meta::endpoint("web"))
            .await
            .expect("open 1");
        echo(&mut st1, b"one").await;
        first.session.goaway(ErrorCode::NO_ERROR);
        let second = edge.next_session(5 * SECOND);
        let mut st2 = second
            .session
            .open(&Meta::endpoint("web"))
            .await
            .expect("open 2");
        echo(&mut st2, b"two").await;
        // A second drain while the first still has an open stream.
        second.session.goaway(ErrorCode::NO_ERROR);
        let _third = edge.next_session(5 * SECOND);
        // The older drain is cut: its stream ends (reset or EOF) promptly.
        let mut buf = [0u8; 8];
        let ended = futures_lite::future::or(async { Some(st1.read(&mut buf).await) }, async {
            async_io::Timer::after(5 * SECOND).await;
            None
        })
        .await;
        assert!(
            matches!(ended, Some(Err(_)) | Some(Ok(0))),
            "the oldest draining session was not cut: {ended:?}"
        );
        // The newer drain still carries bytes both ways.
        echo(&mut st2, b"still").await;
    });
    assert!(
        daemon.wait_stderr("cutting the older draining session", SECOND),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn an_idle_proxied_connection_is_closed_on_both_sides_after_idle_timeout_ms() {
    const IDLE: Duration = Duration::from_millis(1000);
    let (upstream, seen) = echo_upstream();
    let (_edge, _dir, mut daemon, es) = bound_daemon(
        "idle",
        upstream,
        "",
        &format!("idle_timeout_ms = {}", IDLE.as_millis()),
    );
    let (quiet_for, read) = async_io::block_on(async {
        let mut st = es.session.open(&Meta::endpoint("web")).await.expect("open");
        // Traffic every 300 ms keeps it open well past the timeout.
        let t0 = Instant::now();
        echo(&mut st, b"k").await;
        while t0.elapsed() < 2 * IDLE {
            async_io::Timer::after(Duration::from_millis(300)).await;
            echo(&mut st, b"k").await;
        }
        // Then silence: both sides are closed after IDLE.
        let quiet = Instant::now();
        let mut buf = [0u8; 8];
        let read = futures_lite::future::or(async { Some(st.read(&mut buf).await) }, async {
            async_io::Timer::after(5 * IDLE).await;
            None
        })
        .await;
        (quiet.elapsed(), read)
    });
    let err = match read {
        Some(Err(e)) => e,
        other => panic!(
            "the idle stream was not reset within {:?}: {other:?}\n{}",
            5 * IDLE,
            daemon.stderr()
        ),
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("CANCEL"), "{err}");
    assert!(
        quiet_for >= IDLE - Duration::from_millis(100) && quiet_for < IDLE + SECOND,
        "closed after {quiet_for:?} of silence, want about {IDLE:?}"
    );
    // The upstream's connection ended too (it reports what it read at EOF).
    let got = seen
        .recv_timeout(2 * SECOND)
        .expect("the upstream connection was closed");
    assert!(got.len() >= 7 && got.iter().all(|b| *b == b'k'), "{got:?}");
    assert!(
        daemon.wait_stderr(
            "idle for 1000 ms (idle_timeout_ms); closing both sides",
            SECOND
        ),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.terminate(7 * SECOND).success());
}

/// Writes `msg` on `st` and checks the upstream echoes it back.
async fn echo(st: &mut tether_driver::Stream, msg: &[u8]) {
    st.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    st.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, msg);
}

/// A stream on `web` from the public client 203.0.113.9:40000 that asked
/// for `web.tether.test`.
fn public_client_meta() -> Meta {
    Meta {
        peer: Some("203.0.113.9:40000".parse().expect("addr")),
        sni: Some("web.tether.test".into()),
        ..Meta::endpoint("web")
    }
}

/// Opens a stream with `meta`, sends `hello` and half-closes, reads the
/// reply to EOF; returns the stream's id and what the upstream behind
/// `seen` got.
fn hello_to_upstream(
    es: &EdgeSession,
    meta: &Meta,
    seen: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> (tether_proto::StreamId, Vec<u8>) {
    let id = async_io::block_on(async {
        let mut st = es.session.open(meta).await.expect("open stream");
        let id = st.id();
        st.write_all(b"hello").await.expect("write");
        st.close().await.expect("half-close");
        let mut reply = Vec::new();
        st.read_to_end(&mut reply).await.expect("reply");
        id
    });
    let got = seen
        .recv_timeout(5 * SECOND)
        .expect("upstream saw the stream");
    (id, got)
}

#[test]
fn a_proxy_v2_endpoint_writes_the_header_with_sni_and_client_cn_before_the_streams_bytes() {
    let (upstream, seen) = half_close_upstream();
    let (_edge, _dir, mut daemon, es) =
        bound_daemon("proxyv2", upstream, "", "proxy_protocol = \"v2\"");
    let meta = Meta {
        client: Some(ClientIdentity {
            subject: "CN=cam-7,O=Acme".into(),
            common_name: "cam-7".into(),
            names: "DNS:cam-7.example.com,URI:spiffe://acme/cam-7".into(),
            sha256: [0xab; 32],
        }),
        ..public_client_meta()
    };
    let (stream_id, got) = hello_to_upstream(&es, &meta, &seen);

    // Written out from haproxy's proxy-protocol.txt, not from our encoder.
    let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let tlvs_len = (3 + 15) + (3 + 5 + 3 + 5);
    want.extend_from_slice(&[0x21, 0x11, 0, 12 + tlvs_len]);
    want.extend_from_slice(&[203, 0, 113, 9, 127, 0, 0, 1]);
    want.extend_from_slice(&40000u16.to_be_bytes());
    want.extend_from_slice(&upstream.port().to_be_bytes());
    want.extend_from_slice(&[0x02, 0, 15]);
    want.extend_from_slice(b"web.tether.test");
    want.extend_from_slice(&[0x20, 0, 13, 0x01 | 0x02, 0, 0, 0, 0, 0x22, 0, 5]);
    want.extend_from_slice(b"cam-7");
    want.extend_from_slice(b"hello");
    assert_eq!(got, want, "the header, then the stream's bytes");

    // The verified identity is logged: subject, SANs, fingerprint.
    let fp = "ab".repeat(32);
    let logged = format!(
        "web {} from 203.0.113.9:40000: connected to {upstream} (PROXY v2); client certificate subject CN=cam-7,O=Acme, names DNS:cam-7.example.com,URI:spiffe://acme/cam-7, sha256 {fp}",
        stream_id
    );
    assert!(
        daemon.wait_stderr(&logged, SECOND),
        "want {logged:?} in:\n{}",
        daemon.stderr()
    );
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn without_proxy_protocol_the_upstream_gets_only_the_streams_bytes() {
    let (upstream, seen) = half_close_upstream();
    let (_edge, _dir, mut daemon, es) = bound_daemon("noproxy", upstream, "", "");
    let (_, got) = hello_to_upstream(&es, &public_client_meta(), &seen);
    assert_eq!(got, b"hello");
    assert!(daemon.terminate(7 * SECOND).success());
}

#[test]
fn a_declared_traffic_policy_reaches_the_edge_in_bind_and_its_refusal_is_logged() {
    let pki = Pki::new("tether test CA");
    let edge = FakeEdge::start(&pki, Answer::Welcome);
    let dir = TempDir::new("policy");
    // `web` declares a policy (the fake edge refuses any); `other` declares
    // none and still binds.
    let extra = "[[endpoint]]\nname = \"other\"\nkind = \"tcp\"\nupstream = \"127.0.0.1:1\"\n";
    let policy = "[[endpoint.traffic_policy.on_tcp_connect]]\n\
                  [[endpoint.traffic_policy.on_tcp_connect.actions]]\n\
                  type = \"no-such-action\"\n\
                  config = { allow = [\"192.168.1.0/24\"] }\n";
    let config =
        daemon_config_with_endpoint(&dir, edge.addr, &pki.ca_pem, closed_port(), extra, policy);
    let mut daemon = Daemon::start(&config);
    daemon.line("BOUND other ", 10 * SECOND);
    let refused = "edge refused endpoint web: BIND_REFUSED by rule `traffic_policy.on_tcp_connect[0].actions[0].type`: unknown action type; the policy was:\\n";
    assert!(
        daemon.wait_stderr(refused, 5 * SECOND),
        "want {refused:?} in:\n{}",
        daemon.stderr()
    );
    // What the edge got is the policy as a TOML document.
    let stderr = daemon.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains(refused))
        .expect("the line");
    let doc = line
        .split_once("the policy was:")
        .expect("policy")
        .1
        .replace("\\n", "\n");
    let got: toml::Table = toml::from_str(&doc).unwrap_or_else(|e| panic!("{doc:?}: {e}"));
    let want: toml::Table = toml::from_str(
        "[[on_tcp_connect]]\n[[on_tcp_connect.actions]]\ntype = \"no-such-action\"\nconfig = { allow = [\"192.168.1.0/24\"] }\n",
    )
    .expect("want");
    assert_eq!(got, want);
    assert!(daemon.terminate(7 * SECOND).success());
}
