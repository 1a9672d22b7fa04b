//! The driver over real pipes: loopback TCP and rustls TLS 1.3 with a test
//! PKI generated at test time (rcgen). Each test is named after what it proves.

mod common;

use common::test_pki;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use async_io::Async;
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use futures_rustls::{TlsAcceptor, TlsConnector};
use rustls::pki_types::ServerName;
use tether_driver::{Closed, Meta, Session};
use tether_proto::mux::CloseReason;
use tether_proto::{Config, ErrorCode, Role};

fn tcp_pair() -> (Async<TcpStream>, Async<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("local addr");
    let c = TcpStream::connect(addr).expect("connect");
    let (s, _) = l.accept().expect("accept");
    c.set_nodelay(true).expect("nodelay");
    s.set_nodelay(true).expect("nodelay");
    (Async::new(c).expect("async"), Async::new(s).expect("async"))
}

fn cfg(role: Role) -> Config {
    Config::new(role)
}

/// A pseudo-random but reproducible byte for position `i` of stream `s`.
fn pattern(s: u64, i: u64) -> u8 {
    let x = (i ^ (s << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// The server side echoes every accepted stream, reading to EOF then closing.
async fn echo_server(sess: Session) {
    while let Some(mut st) = sess.accept().await {
        smol::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = st.read(&mut buf).await.expect("echo read");
                if n == 0 {
                    break;
                }
                st.write_all(&buf[..n]).await.expect("echo write");
            }
            st.close().await.expect("echo close");
        })
        .detach();
    }
}

/// Runs `streams` echo streams concurrently over a session pair on `c`/`s`
/// (stream k sends `base + k * step` pattern bytes in `chunk`-byte writes,
/// then half-closes), checks every byte came back, then drains both sides.
fn echo_many<T>(c: T, s: T, streams: u64, base: usize, step: usize, chunk: usize)
where
    T: futures_io::AsyncRead + futures_io::AsyncWrite + Unpin + Send + 'static,
{
    smol::block_on(async {
        let (client, cdrv) = Session::new(c, cfg(Role::Client)).expect("client session");
        let (server, sdrv) = Session::new(s, cfg(Role::Server)).expect("server session");
        let cdrv = smol::spawn(cdrv);
        let sdrv = smol::spawn(sdrv);
        smol::spawn(echo_server(server.clone())).detach();

        let mut tasks = Vec::new();
        for k in 0..streams {
            let client = client.clone();
            tasks.push(smol::spawn(async move {
                let st = client.open(&Meta::endpoint("echo")).await.expect("open");
                let len = base + k as usize * step;
                let data: Vec<u8> = (0..len as u64).map(|i| pattern(k, i)).collect();
                let (mut r, mut w) = futures_lite::io::split(st);
                let writer = async {
                    for piece in data.chunks(chunk) {
                        w.write_all(piece).await.expect("write");
                    }
                    w.close().await.expect("half-close");
                };
                let reader = async {
                    let mut got = Vec::with_capacity(len);
                    r.read_to_end(&mut got).await.expect("read back");
                    got
                };
                let ((), got) = future::zip(writer, reader).await;
                assert_eq!(got.len(), data.len(), "stream {k} length");
                assert!(got == data, "stream {k} bytes differ");
            }));
        }
        for t in tasks {
            t.await;
        }
        assert_eq!(client.live_streams(), 0, "every stream released");
        client.goaway(ErrorCode::NO_ERROR);
        let end = cdrv.await;
        assert!(
            matches!(end, Closed::Mux(CloseReason::Drained)),
            "client ended with {end}"
        );
        let end = sdrv.await;
        assert!(
            matches!(end, Closed::Mux(CloseReason::Drained)),
            "server ended with {end}"
        );
    });
}

#[test]
fn sixty_four_concurrent_streams_echo_over_tcp() {
    let (c, s) = tcp_pair();
    echo_many(c, s, 64, 256 * 1024, 1000, 7000);
}

#[test]
fn half_close_works_in_both_directions() {
    smol::block_on(async {
        let (c, s) = tcp_pair();
        let (client, cdrv) = Session::new(c, cfg(Role::Client)).expect("client");
        let (server, sdrv) = Session::new(s, cfg(Role::Server)).expect("server");
        smol::spawn(cdrv).detach();
        smol::spawn(sdrv).detach();

        // Client -> server finishes first; the server still answers afterwards.
        let mut st = client.open(&Meta::endpoint("a")).await.expect("open");
        st.write_all(b"request").await.expect("write");
        st.close().await.expect("client half-close");
        let mut peer = server.accept().await.expect("accept");
        let mut got = Vec::new();
        peer.read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, b"request");
        peer.write_all(b"answer after the client's FIN")
            .await
            .expect("server writes after FIN");
        peer.close().await.expect("server half-close");
        let mut back = Vec::new();
        st.read_to_end(&mut back)
            .await
            .expect("client reads to EOF");
        assert_eq!(back, b"answer after the client's FIN");

        // Server -> client finishes first; the client still sends afterwards.
        let mut st = client.open(&Meta::endpoint("b")).await.expect("open");
        st.write_all(b"x").await.expect("write");
        let mut peer = server.accept().await.expect("accept");
        let mut one = [0u8; 1];
        peer.read_exact(&mut one).await.expect("read");
        peer.write_all(b"bye").await.expect("write");
        peer.close().await.expect("server finishes first");
        let mut back = Vec::new();
        st.read_to_end(&mut back).await.expect("client sees EOF");
        assert_eq!(back, b"bye");
        st.write_all(b"still open")
            .await
            .expect("client writes after server FIN");
        st.close().await.expect("client close");
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest)
            .await
            .expect("server reads the rest");
        assert_eq!(rest, b"still open");
    });
}

#[test]
fn stream_metadata_reaches_the_acceptor() {
    smol::block_on(async {
        let (c, s) = tcp_pair();
        let (client, cdrv) = Session::new(c, cfg(Role::Server)).expect("edge side");
        let (server, sdrv) = Session::new(s, cfg(Role::Client)).expect("agent side");
        smol::spawn(cdrv).detach();
        smol::spawn(sdrv).detach();
        let meta = Meta {
            endpoint: "web".into(),
            peer: Some("203.0.113.7:51000".parse().expect("addr")),
            sni: Some("web.example.com".into()),
            client: Some(tether_driver::ClientIdentity {
                subject: "CN=client".into(),
                common_name: "client".into(),
                names: "DNS:client.example".into(),
                sha256: [9; 32],
            }),
        };
        let st = client.open(&meta).await.expect("open");
        let peer = server.accept().await.expect("accept");
        assert_eq!(peer.meta(), Some(meta));
        assert_eq!(peer.id(), st.id());
        assert_eq!(
            st.id().get() % 2,
            0,
            "the edge (server role) opens even ids"
        );
    });
}

/// The driver re-arms its timer only for an earlier deadline (the heartbeat's
/// moves later with every frame in): the early firings must neither end a
/// live session nor lose the real deadline once the peer falls silent.
#[test]
fn a_peer_that_falls_silent_after_a_lively_second_is_dropped_at_the_deadline() {
    smol::block_on(async {
        let (c, s) = tcp_pair();
        let quick = |role| Config {
            ping_interval_ms: 100,
            dead_after_ms: 300,
            ..cfg(role)
        };
        let (client, cdrv) = Session::new(c, quick(Role::Client)).expect("client session");
        let (_server, sdrv) = Session::new(s, quick(Role::Server)).expect("server session");
        let cdrv = smol::spawn(cdrv);
        // One second of pings both ways: the client's deadline moves on about
        // ten times. Then the server's driver is kept but never polled again:
        // its socket stays open and silent.
        let mut sdrv = Box::pin(sdrv);
        let lively = future::or(async { Some((&mut sdrv).await) }, async {
            async_io::Timer::after(Duration::from_secs(1)).await;
            None
        })
        .await;
        assert!(lively.is_none(), "the server's session ended: {lively:?}");
        assert!(
            !client.is_closing(),
            "the client dropped a peer that answered every ping"
        );
        let silent = Instant::now();
        let end = tether_driver::timeout(Duration::from_secs(5), cdrv)
            .await
            .expect("the client never noticed the silence");
        let took = silent.elapsed();
        assert!(
            matches!(end, Closed::Mux(CloseReason::Timeout)),
            "ended with {end}"
        );
        // The last pong came at most one ping interval before the silence.
        assert!(
            took >= Duration::from_millis(150),
            "dropped before its deadline: {took:?}"
        );
        assert!(
            took < Duration::from_millis(1500),
            "detected late: {took:?}"
        );
        drop(sdrv);
    });
}

#[test]
fn silent_peer_ends_the_session_at_the_heartbeat_deadline() {
    smol::block_on(async {
        let (c, _silent) = tcp_pair(); // the other end never reads or writes
        let mut config = cfg(Role::Client);
        config.ping_interval_ms = 100;
        config.dead_after_ms = 300;
        // The session's clock starts in Session::new: measure from before it.
        let t0 = Instant::now();
        let (client, drv) = Session::new(c, config).expect("session");
        let end = drv.await;
        let took = t0.elapsed();
        assert!(
            matches!(end, Closed::Mux(CloseReason::Timeout)),
            "ended with {end}"
        );
        assert!(
            took >= Duration::from_millis(300),
            "not before the deadline: {took:?}"
        );
        assert!(
            took < Duration::from_millis(1500),
            "detected late: {took:?}"
        );
        assert!(client.accept().await.is_none());
    });
}

#[test]
fn goaway_lets_open_streams_finish_and_refuses_new_ones() {
    smol::block_on(async {
        let (c, s) = tcp_pair();
        let (client, cdrv) = Session::new(c, cfg(Role::Client)).expect("client");
        let (server, sdrv) = Session::new(s, cfg(Role::Server)).expect("server");
        let cdrv = smol::spawn(cdrv);
        smol::spawn(sdrv).detach();
        let mut st = client.open(&Meta::endpoint("a")).await.expect("open");
        let mut peer = server.accept().await.expect("accept");
        server.goaway(ErrorCode::NO_ERROR);
        // The open stream still carries bytes both ways after GOAWAY.
        let big = vec![7u8; 1 << 20];
        let w = async {
            st.write_all(&big).await.expect("write after goaway");
            st.close().await.expect("close");
            st
        };
        let r = async {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.expect("read after goaway");
            peer.write_all(b"done").await.expect("answer");
            peer.close().await.expect("close");
            (got, peer)
        };
        let (mut st, (got, peer)) = future::zip(w, r).await;
        assert_eq!(got.len(), big.len());
        let mut back = Vec::new();
        st.read_to_end(&mut back).await.expect("read answer");
        assert_eq!(back, b"done");
        // New streams are refused once the GOAWAY arrived.
        while client.peer_goaway().is_none() {
            smol::Timer::after(Duration::from_millis(5)).await;
        }
        assert!(
            client.open(&Meta::endpoint("late")).await.is_err(),
            "no new streams while draining"
        );
        drop(st);
        drop(peer);
        let end = cdrv.await;
        assert!(
            matches!(end, Closed::Mux(CloseReason::Drained)),
            "ended with {end}"
        );
    });
}

#[test]
fn hundred_mib_over_tls_arrive_intact_both_ways() {
    const TOTAL: u64 = 100 * 1024 * 1024;
    smol::block_on(async {
        let (c, s) = tcp_pair();
        let (server_cfg, client_cfg) = test_pki();
        let name = ServerName::try_from("edge.test").expect("name").to_owned();
        let (c, s) = future::zip(
            TlsConnector::from(client_cfg).connect(name, c),
            TlsAcceptor::from(server_cfg).accept(s),
        )
        .await;
        let (c, s) = (c.expect("client handshake"), s.expect("server handshake"));
        assert_eq!(
            c.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let (client, cdrv) = Session::new(c, cfg(Role::Client)).expect("client");
        let (server, sdrv) = Session::new(s, cfg(Role::Server)).expect("server");
        smol::spawn(cdrv).detach();
        smol::spawn(sdrv).detach();
        smol::spawn(echo_server(server)).detach();

        let st = client.open(&Meta::endpoint("bulk")).await.expect("open");
        let (mut r, mut w) = futures_lite::io::split(st);
        let writer = async {
            let mut sum = 0xcbf2_9ce4_8422_2325u64;
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            while off < TOTAL {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = pattern(1, off + i as u64);
                }
                fnv(&mut sum, &buf);
                w.write_all(&buf).await.expect("write");
                off += buf.len() as u64;
            }
            w.close().await.expect("close");
            sum
        };
        let reader = async {
            let mut sum = 0xcbf2_9ce4_8422_2325u64;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = r.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                fnv(&mut sum, &buf[..n]);
                total += n as u64;
            }
            (total, sum)
        };
        let (sent, (got, received)) = future::zip(writer, reader).await;
        assert_eq!(got, TOTAL, "every byte came back");
        assert_eq!(sent, received, "checksum of the echoed bytes");
    });
}

#[test]
fn dropping_a_stream_resets_it_for_the_peer() {
    smol::block_on(async {
        let (c, s) = tcp_pair();
        let (client, cdrv) = Session::new(c, cfg(Role::Client)).expect("client");
        let (server, sdrv) = Session::new(s, cfg(Role::Server)).expect("server");
        smol::spawn(cdrv).detach();
        smol::spawn(sdrv).detach();
        let mut st = client.open(&Meta::endpoint("a")).await.expect("open");
        st.write_all(b"hi").await.expect("write");
        let peer = server.accept().await.expect("accept");
        drop(peer);
        let mut buf = [0u8; 8];
        let err = loop {
            match st.read(&mut buf).await {
                Ok(0) => panic!("expected a reset, got EOF"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        assert!(err.to_string().contains("CANCEL"), "{err}");
    });
}

#[test]
fn refused_peer_streams_are_reset_and_never_accepted() {
    for by_option in [false, true] {
        smol::block_on(async {
            let (c, s) = tcp_pair();
            let (client, cdrv) = Session::new(c, cfg(Role::Client)).expect("client");
            let (server, sdrv) = if by_option {
                let opts = tether_driver::Options {
                    refuse_peer_streams: true,
                    ..tether_driver::Options::default()
                };
                Session::new_with(s, cfg(Role::Server), opts).expect("server")
            } else {
                let (server, sdrv) = Session::new(s, cfg(Role::Server)).expect("server");
                // Before the driver runs: not even the first OPEN gets a slot.
                server.refuse_peer_streams();
                (server, sdrv)
            };
            smol::spawn(cdrv).detach();
            smol::spawn(sdrv).detach();
            for _ in 0..3 {
                let mut st = client.open(&Meta::endpoint("a")).await.expect("open");
                // Within the initial window; the RESET may already be back.
                if let Err(e) = st.write_all(&[1u8; 16 * 1024]).await {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                }
                let mut buf = [0u8; 8];
                let read = async { Some(st.read(&mut buf).await) };
                let err = future::or(read, async {
                    smol::Timer::after(Duration::from_secs(3)).await;
                    None
                })
                .await
                .expect("the stream was not refused")
                .expect_err("a refused stream");
                assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
                assert!(err.to_string().contains("REFUSED_STREAM"), "{err}");
            }
            assert_eq!(server.live_streams(), 0);
            let accepted = future::or(async { server.accept().await.is_some() }, async {
                smol::Timer::after(Duration::from_millis(100)).await;
                false
            })
            .await;
            assert!(!accepted, "a refused stream was accepted");
            // The edge's own streams still work.
            let mut st = server.open(&Meta::endpoint("e")).await.expect("edge open");
            st.write_all(b"hello").await.expect("write");
            st.close().await.expect("close");
            let mut peer = client.accept().await.expect("agent accepts");
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"hello");
        });
    }
}

/// A pipe that takes only a few bytes per write and often says "not now"
/// (waking itself), as a congested socket does: frames leave the driver in
/// pieces and must be continued in order.
struct StingyPipe<T> {
    inner: T,
    calls: u64,
}

impl<T: futures_io::AsyncRead + Unpin> futures_io::AsyncRead for StingyPipe<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: futures_io::AsyncWrite + Unpin> futures_io::AsyncWrite for StingyPipe<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.calls += 1;
        let c = self.calls;
        if c.is_multiple_of(5) {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        // 1..=9 bytes now and then, else up to ~3 KiB: cuts through headers,
        // small frames and payloads alike.
        let max = if c.is_multiple_of(3) {
            (c % 9 + 1) as usize
        } else {
            (c as usize * 613) % 3000 + 1
        };
        let n = buf.len().min(max);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[test]
fn streams_arrive_intact_through_a_pipe_that_takes_writes_in_pieces() {
    let (c, s) = tcp_pair();
    let c = StingyPipe { inner: c, calls: 0 };
    let s = StingyPipe { inner: s, calls: 0 };
    echo_many(c, s, 8, 200 * 1024, 777, 5000);
}

#[test]
fn polling_closed_repeatedly_does_not_grow_the_waiter_list() {
    smol::block_on(async {
        let (c, _s) = tcp_pair();
        let (client, drv) = Session::new(c, cfg(Role::Client)).expect("session");
        let _drv = smol::spawn(drv);
        // A long-lived task that re-polls `closed()` on every turn of its
        // select loop (as tetherd's session loop does) registers once.
        let mut closed = Box::pin(client.closed());
        for _ in 0..10_000 {
            assert!(future::poll_once(closed.as_mut()).await.is_none());
        }
        assert_eq!(client.waiting_tasks(), 1);
    });
}

#[test]
fn abandoned_waits_for_a_stream_slot_leave_nothing_behind() {
    smol::block_on(async {
        let (c, s) = tcp_pair();
        let mut one = cfg(Role::Server);
        one.max_streams = 1;
        let (edge, edrv) = Session::new(c, one).expect("edge side");
        let (_agent, adrv) = Session::new(s, cfg(Role::Client)).expect("agent side");
        smol::spawn(edrv).detach();
        smol::spawn(adrv).detach();
        let _held = edge.open(&Meta::endpoint("a")).await.expect("the one slot");
        // Public clients that give up while every slot is busy (the edge's
        // open timeout) must not leave their wakers behind.
        let meta = Meta::endpoint("a");
        for _ in 0..1000 {
            let mut open = Box::pin(edge.open(&meta));
            assert!(
                future::poll_once(open.as_mut()).await.is_none(),
                "no free slot"
            );
            drop(open);
        }
        assert_eq!(edge.waiting_tasks(), 0);
    });
}

/// PROTOCOL.md 1.3: the agent writes no frame before `Hello`. A fresh
/// session's driver, however long it runs, writes nothing on its own; the
/// first control message queued is the first frame on the wire.
#[test]
fn a_fresh_session_writes_nothing_before_its_first_control_message() {
    use std::io::Read;
    use tether_proto::control::Secret;
    use tether_proto::{Control, FrameHeader, FrameKind};

    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (mut peer, _) = l.accept().expect("accept");
    smol::block_on(async {
        let (client, cdrv) =
            Session::new(Async::new(c).expect("async"), cfg(Role::Client)).expect("client");
        let _drv = smol::spawn(cdrv);
        // The driver runs (and reads) for a while with nothing queued.
        smol::Timer::after(Duration::from_millis(200)).await;
        peer.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 64];
        match peer.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the session wrote before Hello: {other:?}"),
        }
        peer.set_nonblocking(false).expect("blocking");
        let hello = Control::Hello {
            version: 1,
            min_version: 1,
            token: Secret("tok_1.s3cr3t"),
            agent: "tetherd/test",
            arch: "x86_64",
        };
        client.send_control(&hello).await.expect("hello");
        let mut h = [0u8; 8];
        smol::unblock(move || {
            peer.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            peer.read_exact(&mut h).expect("first header");
            let h = FrameHeader::decode(&h).expect("valid header");
            assert_eq!(h.kind, FrameKind::Control, "the first frame is {h:?}");
            let mut body = vec![0u8; h.len as usize];
            peer.read_exact(&mut body).expect("body");
            assert!(matches!(
                Control::decode(&body).expect("decodes"),
                Control::Hello { .. }
            ));
        })
        .await;
    });
}
