//! What a peer can hold, bounded (DESIGN.md invariant 11), with the edge
//! in-process on 127.0.0.1 port 0: the first frame must be `Hello`, the
//! per-source admission cap, sessions per token, endpoints per session,
//! endpoint ownership, public connections waiting for a stream, and the idle
//! timeout of an established public connection. Each test is named after
//! what it proves.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{until, url_addr, within, Agent, Env, Msg};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::TlsConnector;
use rustls::pki_types::ServerName;
use smol::net::TcpStream;
use tether_edge::store::Store as _;
use tether_proto::frame::write_frame;
use tether_proto::{EndpointKind, ErrorCode, FrameHeader, FrameKind};

const T: Duration = Duration::from_secs(5);

/// An edge whose `[limits]` table is `limits` (and `[session]` gets `session`).
async fn edge_with(tag: &str, session: &str, limits: &str) -> Env {
    let (session, limits) = (session.to_owned(), limits.to_owned());
    Env::start_with(tag, move |toml| {
        format!(
            "{}\n[limits]\n{limits}\n",
            toml.replace("[session]\n", &format!("[session]\n{session}\n"))
        )
    })
    .await
}

/// A raw TLS connection to the agent port (ALPN tether/1), no session.
async fn raw_agent(env: &Env) -> futures_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(env.agent).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap().to_owned();
    TlsConnector::from(env.pki.client(Some(tether_proto::ALPN)))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads frames until a `GOAWAY` and returns its code, or `None` at EOF.
async fn goaway_code<R: futures_lite::AsyncRead + Unpin>(r: &mut R) -> Option<ErrorCode> {
    loop {
        let mut h = [0u8; tether_proto::HEADER_LEN];
        r.read_exact(&mut h).await.ok()?;
        let h = FrameHeader::decode(&h).ok()?;
        let mut body = vec![0u8; usize::from(h.len)];
        r.read_exact(&mut body).await.ok()?;
        if h.kind == FrameKind::GoAway {
            return Some(ErrorCode(u32::from_be_bytes(
                body[4..8].try_into().unwrap(),
            )));
        }
    }
}

#[test]
fn a_first_frame_other_than_hello_gets_goaway_protocol_and_no_session() {
    smol::block_on(async {
        let mut env = Env::start("first-frame", "").await;
        // A PING first (the mux would answer it; the edge must not run one yet).
        let mut tls = raw_agent(&env).await;
        let mut buf = [0u8; 64];
        let n = write_frame(
            &mut buf,
            FrameHeader::session(FrameKind::Ping, 0, 8),
            &[7u8; 8],
        )
        .unwrap();
        tls.write_all(&buf[..n]).await.unwrap();
        tls.flush().await.unwrap();
        assert_eq!(
            within(T, goaway_code(&mut tls)).await,
            Some(ErrorCode::PROTOCOL)
        );
        // An OPEN first: the same, and the connection ends.
        let mut tls = raw_agent(&env).await;
        let n = write_frame(
            &mut buf,
            FrameHeader::stream(
                FrameKind::Open,
                0,
                0,
                tether_proto::StreamId::new(1).unwrap(),
            ),
            &[],
        )
        .unwrap();
        tls.write_all(&buf[..n]).await.unwrap();
        tls.flush().await.unwrap();
        assert_eq!(
            within(T, goaway_code(&mut tls)).await,
            Some(ErrorCode::PROTOCOL)
        );
        let mut rest = Vec::new();
        let _ = within(T, tls.read_to_end(&mut rest)).await;
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn a_source_holds_at_most_its_pending_handshakes_and_a_freed_slot_lets_a_device_in() {
    smol::block_on(async {
        let mut env = edge_with("per-source", "", "pending_per_source = 2").await;
        let (token, _) = env.token(&["web"]);
        // Two idle sockets hold this source's two slots (no TLS, no Hello).
        let idle1 = TcpStream::connect(env.agent).await.unwrap();
        let _idle2 = TcpStream::connect(env.agent).await.unwrap();
        // The third is closed at accept, before any TLS: EOF at once.
        let t0 = Instant::now();
        let mut third = TcpStream::connect(env.agent).await.unwrap();
        let mut b = [0u8; 1];
        let n = within(T, third.read(&mut b)).await.unwrap_or(0);
        assert_eq!(n, 0, "closed without a byte");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        // A slot comes back when an idle socket goes; a device gets in.
        drop(idle1);
        until(T, "a slot is free again", || async {
            let tcp = TcpStream::connect(env.agent).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap().to_owned();
            let tls =
                TlsConnector::from(env.pki.client(Some(tether_proto::ALPN))).connect(name, tcp);
            within(T, tls).await.is_ok()
        })
        .await;
        let a = Agent::welcome(&env, &token).await;
        a.bind_ok("web", EndpointKind::Tcp).await;
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn the_hello_deadline_frees_a_slot_held_by_a_silent_peer() {
    smol::block_on(async {
        let mut env = edge_with(
            "hello-deadline",
            "",
            "pending_per_source = 1\nhello_timeout_ms = 300",
        )
        .await;
        let mut silent = raw_agent(&env).await;
        let t0 = Instant::now();
        assert_eq!(
            within(T, goaway_code(&mut silent)).await,
            Some(ErrorCode::TIMEOUT)
        );
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let (token, _) = env.token(&["web"]);
        let a = Agent::welcome(&env, &token).await;
        a.bind_ok("web", EndpointKind::Tcp).await;
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn a_token_past_its_session_limit_evicts_its_oldest_session() {
    smol::block_on(async {
        let mut env = edge_with("per-token", "", "sessions_per_token = 2").await;
        let (token, _) = env.token(&["web"]);
        let (other, _) = env.token(&["api"]);
        let s1 = Agent::welcome(&env, &token).await;
        let s2 = Agent::welcome(&env, &token).await;
        let o = Agent::welcome(&env, &other).await;
        assert!(s1.session.peer_goaway().is_none());
        let s3 = Agent::welcome(&env, &token).await;
        until(T, "the oldest session is told to go", || async {
            s1.session.peer_goaway().is_some()
        })
        .await;
        assert_eq!(
            s1.session.peer_goaway().map(|(c, _)| c),
            Some(ErrorCode::NO_ERROR)
        );
        for (name, s) in [("second", &s2), ("third", &s3), ("other token's", &o)] {
            assert!(s.session.peer_goaway().is_none(), "{name} session lives on");
        }
        // The newest session serves.
        s3.bind_ok("web", EndpointKind::Tcp).await;
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn a_session_binds_at_most_its_endpoint_limit_naming_the_rule() {
    smol::block_on(async {
        let mut env = edge_with("per-session", "", "endpoints_per_session = 2").await;
        let (token, _) = env.token(&["*"]);
        let a = Agent::welcome(&env, &token).await;
        a.bind_ok("one", EndpointKind::Tcp).await;
        a.bind_ok("two", EndpointKind::Tls).await;
        // Binding one it holds again is not a new endpoint.
        a.bind_ok("one", EndpointKind::Tcp).await;
        match a.bind("three", EndpointKind::Tcp).await {
            Some(Msg::BindErr { code, rule, .. }) => {
                assert_eq!(code, ErrorCode::BIND_REFUSED);
                assert_eq!(rule, "limits.endpoints_per_session");
            }
            other => panic!("expected BindErr, got {other:?}"),
        }
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn an_offline_devices_endpoint_is_refused_to_another_token_until_released() {
    smol::block_on(async {
        let mut env = Env::start("ownership", "").await;
        let (owner, owner_id) = env.token(&["web"]);
        let (intruder, _) = env.token(&["*"]);
        let a = Agent::welcome(&env, &owner).await;
        a.bind_ok("web", EndpointKind::Tcp).await;
        a.session.goaway(ErrorCode::NO_ERROR);
        let _ = within(T, a.driver).await;
        // The device is offline; a `*` token still cannot take its endpoint.
        let b = Agent::welcome(&env, &intruder).await;
        match b.bind("web", EndpointKind::Tcp).await {
            Some(Msg::BindErr { code, rule, .. }) => {
                assert_eq!(code, ErrorCode::ENDPOINT_TAKEN);
                assert_eq!(rule, format!("endpoint web owned by token {owner_id}"));
            }
            other => panic!("expected ENDPOINT_TAKEN, got {other:?}"),
        }
        let listed = env.store().list_endpoints().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].owner.to_string(), owner_id);
        // The operator releases it; the running edge sees it within its poll.
        let was = env.store().release_endpoint("web").unwrap();
        assert_eq!(was.map(|t| t.to_string()), Some(owner_id.clone()));
        until(T, "the released endpoint can be bound", || async {
            matches!(
                b.bind("web", EndpointKind::Tcp).await,
                Some(Msg::BindOk { .. })
            )
        })
        .await;
        // Now the first owner is the one refused.
        let a = Agent::welcome(&env, &owner).await;
        match a.bind("web", EndpointKind::Tcp).await {
            Some(Msg::BindErr { code, .. }) => assert_eq!(code, ErrorCode::ENDPOINT_TAKEN),
            other => panic!("expected ENDPOINT_TAKEN, got {other:?}"),
        }
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn public_connections_past_the_waiting_limit_are_closed_at_once() {
    smol::block_on(async {
        // One stream per session: the second public client waits for it, the
        // third is over `public_waiting_per_endpoint = 1` and closed at once.
        let mut env = edge_with(
            "waiting",
            "max_streams = 1",
            "public_waiting_per_endpoint = 1",
        )
        .await;
        let (token, _) = env.token(&["web"]);
        let a = Agent::welcome(&env, &token).await;
        let url = a.bind_ok("web", EndpointKind::Tcp).await;
        let _first = TcpStream::connect(url_addr(&url)).await.unwrap();
        let _held = within(T, a.session.accept()).await.expect("first stream");
        let mut second = TcpStream::connect(url_addr(&url)).await.unwrap();
        // Give the edge the time to count the second as waiting.
        until(T, "the second client waits", || async {
            let mut probe = TcpStream::connect(url_addr(&url)).await.unwrap();
            let mut b = [0u8; 1];
            let t0 = Instant::now();
            let closed = matches!(
                futures_lite::future::or(async { Some(probe.read(&mut b).await) }, async {
                    smol::Timer::after(Duration::from_millis(300)).await;
                    None
                })
                .await,
                Some(Ok(0)) | Some(Err(_))
            );
            closed && t0.elapsed() < Duration::from_millis(300)
        })
        .await;
        // The second is still waiting (not closed).
        let mut b = [0u8; 1];
        let still = futures_lite::future::or(async { Some(second.read(&mut b).await) }, async {
            smol::Timer::after(Duration::from_millis(200)).await;
            None
        })
        .await;
        assert!(still.is_none(), "the waiting client is kept: {still:?}");
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn an_idle_public_connection_is_closed_after_the_idle_timeout() {
    smol::block_on(async {
        let mut env = edge_with("idle", "", "idle_timeout_ms = 1000").await;
        let (token, _) = env.token(&["web"]);
        let a = Agent::welcome(&env, &token).await;
        let url = a.bind_ok("web", EndpointKind::Tcp).await;
        let mut c = TcpStream::connect(url_addr(&url)).await.unwrap();
        let mut st = within(T, a.session.accept()).await.expect("stream");
        // Traffic keeps it open past the timeout...
        for _ in 0..3 {
            smol::Timer::after(Duration::from_millis(500)).await;
            c.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            within(T, st.read_exact(&mut b)).await.unwrap();
        }
        // ...and silence closes it, within the timeout and a margin.
        let t0 = Instant::now();
        let mut rest = Vec::new();
        let _ = within(T, c.read_to_end(&mut rest)).await;
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(900), "closed early: {took:?}");
        assert!(took < Duration::from_millis(2500), "closed late: {took:?}");
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn streams_an_agent_opens_are_refused_and_the_session_serves_on() {
    smol::block_on(async {
        let mut env = Env::start("agent-streams", "").await;
        let (token, _) = env.token(&["web"]);
        let a = Agent::welcome(&env, &token).await;
        // More streams than the edge's max_streams (64), each with data.
        for _ in 0..100 {
            let mut st = within(T, a.session.open(&tether_driver::Meta::endpoint("web")))
                .await
                .unwrap();
            let _ = st.write_all(&[0u8; 1024]).await;
            let mut b = [0u8; 1];
            let r = within(T, st.read(&mut b)).await;
            assert!(r.is_err(), "refused, not accepted: {r:?}");
        }
        assert!(!a.session.is_closing(), "refusing is not a session error");
        // The edge's own streams are unaffected.
        let url = a.bind_ok("web", EndpointKind::Tcp).await;
        let mut c = TcpStream::connect(url_addr(&url)).await.unwrap();
        let mut st = within(T, a.session.accept()).await.expect("edge stream");
        c.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        within(T, st.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"ping");
        drop((c, st));
        env.finish().await.expect("clean stop");
    });
}
