//! Two multiplexers talking through the in-memory harness: streams, half-close,
//! heartbeat, draining and control messages (PROTOCOL.md sections 3, 4, 5, 7).
#![allow(clippy::unwrap_used)]

mod sim;

use sim::*;
use tether_proto::control::{Control, Secret};
use tether_proto::mux::{CloseReason, ControlError, OpenError, Recv, StreamError};
use tether_proto::{
    Config, EndpointKind, ErrorCode, Event, FrameKind, Role, INITIAL_WINDOW, MAX_FRAME,
};

const MB: usize = 1 << 20;

#[test]
fn stream_bytes_arrive_intact_both_ways() {
    let mut sim = Sim::small();
    let id = sim.open(C).unwrap();
    let up = pattern(1, 200_000);
    let down = pattern(2, 300_000);
    sim.write(C, id, &up);
    sim.finish(C, id);
    sim.drive();
    assert_eq!(sim.sides[S].events.first(), Some(&Event::Opened(id)));
    assert_eq!(
        sim.mux(S).meta(id),
        Some(meta()),
        "the acceptor sees the opener's metadata"
    );
    sim.write(S, id, &down);
    sim.finish(S, id);
    sim.drive();
    assert!(
        sim.app(S, id).received == up,
        "client -> server bytes differ"
    );
    assert!(
        sim.app(C, id).received == down,
        "server -> client bytes differ"
    );
    assert!(sim.app(C, id).fin_received && sim.app(S, id).fin_received);
    assert_eq!(sim.mux(C).live_streams(), 0);
    assert_eq!(sim.mux(S).live_streams(), 0);
    assert!(sim.quiet());
    sim.assert_credit_respected(C);
    sim.assert_credit_respected(S);
}

#[test]
fn stalled_stream_does_not_block_another() {
    let mut sim = Sim::small();
    sim.latency_ms = 5;
    sim.sides[S].read_new_streams = false; // the server's app does not read yet
    let stalled = sim.open(C).unwrap();
    let busy = sim.open(C).unwrap();
    let stalled_bytes = pattern(10, MB);
    let busy_bytes = pattern(11, 4 * MB);
    sim.write(C, stalled, &stalled_bytes);
    sim.write(C, busy, &busy_bytes);
    sim.finish(C, busy);
    sim.drive(); // both OPENs arrive; nobody reads
    sim.app_mut(S, busy).reading = true;
    sim.drive();

    let window = sim.sides[S].mux.config().window as usize;
    assert!(
        sim.app(S, busy).received == busy_bytes,
        "the busy stream did not get all its bytes"
    );
    assert!(sim.app(S, busy).fin_received);
    assert!(sim.app(S, stalled).received.is_empty());
    assert_eq!(
        sim.mux(S).readable_len(stalled),
        window,
        "the stalled stream holds exactly its window"
    );
    assert_eq!(
        sim.app(C, stalled).sent,
        window,
        "the stalled sender stops at its credit"
    );
    assert!(sim.app(C, stalled).waiting_writable);
    assert_eq!(sim.app(S, stalled).max_buffered, window);

    // The reader wakes up: the stalled stream catches up.
    sim.app_mut(S, stalled).reading = true;
    sim.finish(C, stalled);
    sim.drive();
    assert!(sim.app(S, stalled).received == stalled_bytes);
    sim.assert_credit_respected(C);
}

#[test]
fn half_close_both_ways() {
    let mut sim = Sim::small();
    // The client sends a request and half-closes; the server answers after
    // reading the whole request, on a stream that is still open its way.
    let id = sim.open(C).unwrap();
    sim.write(C, id, b"GET / HTTP/1.0\r\n\r\n");
    sim.finish(C, id);
    sim.drive();
    assert!(sim.app(S, id).fin_received);
    assert_eq!(sim.app(S, id).received, b"GET / HTTP/1.0\r\n\r\n");
    assert!(
        !sim.app(C, id).released && !sim.app(S, id).released,
        "half-closed streams stay held"
    );
    assert_eq!(sim.mux(C).send(id, b"more"), Err(StreamError::Finished));
    let answer = pattern(3, 100_000);
    sim.write(S, id, &answer);
    sim.finish(S, id);
    sim.drive();
    assert!(sim.app(C, id).received == answer);
    assert!(sim.app(C, id).fin_received);
    assert_eq!(sim.app(C, id).reset, None);
    assert_eq!(sim.app(S, id).reset, None);

    // The other way round: the acceptor half-closes first, the opener keeps sending.
    let id2 = sim.open(C).unwrap();
    sim.write(C, id2, b"hello");
    sim.drive();
    sim.finish(S, id2);
    sim.drive();
    assert!(sim.app(C, id2).fin_received);
    let late = pattern(4, 70_000);
    sim.write(C, id2, &late);
    sim.finish(C, id2);
    sim.drive();
    let mut all = b"hello".to_vec();
    all.extend_from_slice(&late);
    assert!(sim.app(S, id2).received == all);
    assert_eq!(sim.app(S, id2).reset, None);

    assert_eq!(sim.mux(C).live_streams(), 0);
    assert_eq!(sim.mux(S).live_streams(), 0);
    // Neither side ever reset anything.
    assert!(sim.resets_sent(C).is_empty() && sim.resets_sent(S).is_empty());
}

#[test]
fn byte_at_a_time_delivery_is_equivalent() {
    let run = |delivery: Delivery, latency: u64| {
        let mut sim = Sim::small();
        sim.delivery = delivery;
        sim.latency_ms = latency;
        let a = sim.open(C).unwrap();
        let b = sim.open(C).unwrap();
        sim.write(C, a, &pattern(20, 90_000));
        sim.write(C, b, &pattern(21, 40_000));
        sim.finish(C, a);
        sim.finish(C, b);
        sim.drive();
        sim.mux(S)
            .send_control(&Control::BindOk {
                endpoint: "web",
                url: "tcp://edge:4000",
            })
            .unwrap();
        sim.write(S, a, &pattern(22, 50_000));
        sim.write(S, b, &pattern(23, 10));
        sim.finish(S, a);
        sim.finish(S, b);
        sim.drive();
        let got = |side: usize, id| {
            (
                sim.app(side, id).received.clone(),
                sim.app(side, id).fin_received,
            )
        };
        let result = (
            got(S, a),
            got(S, b),
            got(C, a),
            got(C, b),
            sim.sides[C].controls.clone(),
        );
        assert_eq!(sim.mux(C).live_streams(), 0);
        assert_eq!(sim.mux(S).live_streams(), 0);
        assert!(sim.quiet());
        (
            result,
            sim.sides[C].wire_out.len(),
            sim.sides[S].wire_out.len(),
        )
    };
    let (whole, _, _) = run(Delivery::Whole, 0);
    assert!(whole.0 .0 == pattern(20, 90_000) && whole.2 .0 == pattern(22, 50_000));
    assert_eq!(whole.4.len(), 1);
    for (mode, latency) in [
        (Delivery::Bytewise, 0),
        (Delivery::Bytewise, 3),
        (Delivery::Chunks(7), 1),
        (Delivery::Random(100), 2),
    ] {
        let (got, _, _) = run(mode, latency);
        assert!(
            got == whole,
            "{mode:?} with latency {latency} delivered something else"
        );
    }
}

#[test]
fn silent_peer_detected_by_heartbeat_deadline() {
    let mut sim = Sim::small();
    let id = sim.open(C).unwrap();
    sim.drive();
    let dead_after = sim.sides[C].mux.config().dead_after_ms;
    let start = sim.now;
    // The server goes silent: nothing it sends reaches the client any more.
    sim.sides[S].mute = true;
    sim.run_for(dead_after + 1);
    assert_eq!(sim.sides[C].closed, Some(ErrorCode::TIMEOUT));
    // Closed within dead_after of the last input (which was at `start`).
    let closed_at = sim
        .timeline
        .iter()
        .filter(|w| {
            w.side == C
                && w.parsed
                    .frame()
                    .is_some_and(|f| f.kind == FrameKind::GoAway)
        })
        .map(|w| w.at)
        .next()
        .expect("the client sent GOAWAY(TIMEOUT)");
    assert!(
        closed_at.since(start) <= dead_after,
        "closed {} ms after the last input",
        closed_at.since(start)
    );
    assert_eq!(sim.goaways_sent(C), vec![(0, ErrorCode::TIMEOUT)]);
    // It pinged first, at ping_interval.
    let pings: Vec<_> = sim
        .sent_frames(C)
        .into_iter()
        .filter(|f| f.kind == FrameKind::Ping && f.flags == 0)
        .collect();
    assert!(!pings.is_empty(), "no PING before declaring the peer dead");
    assert_eq!(
        sim.app(C, id).reset,
        Some(ErrorCode::TIMEOUT),
        "streams end with the session"
    );
    assert_eq!(sim.mux(C).poll_timeout(), None);
    assert!(sim.mux(C).is_finished());
}

#[test]
fn ping_keeps_idle_session_alive() {
    let mut sim = Sim::small();
    sim.latency_ms = 40;
    let id = sim.open(C).unwrap();
    sim.drive();
    let cfg = *sim.sides[C].mux.config();
    // Ten dead-peer periods of silence from both applications.
    sim.run_for(10 * cfg.dead_after_ms);
    assert_eq!(sim.sides[C].closed, None);
    assert_eq!(sim.sides[S].closed, None);
    let pings = |side| {
        sim.sent_frames(side)
            .iter()
            .filter(|f| f.kind == FrameKind::Ping && f.flags == 0)
            .count()
    };
    let acks = |side| {
        sim.sent_frames(side)
            .iter()
            .filter(|f| f.kind == FrameKind::Ping && f.flags != 0)
            .count()
    };
    let total = pings(C) + pings(S);
    assert!(
        total >= (10 * cfg.dead_after_ms / cfg.ping_interval_ms) as usize - 1,
        "only {total} pings"
    );
    assert_eq!(acks(S), pings(C), "every client PING was answered");
    assert_eq!(acks(C), pings(S), "every server PING was answered");
    // Each ACK echoes its PING's bytes.
    let sent: Vec<_> = sim
        .sent_frames(C)
        .into_iter()
        .filter(|f| f.kind == FrameKind::Ping && f.flags == 0)
        .collect();
    let echoed: Vec<_> = sim
        .sent_frames(S)
        .into_iter()
        .filter(|f| f.kind == FrameKind::Ping && f.flags != 0)
        .collect();
    assert_eq!(
        sent.iter().map(|f| &f.payload).collect::<Vec<_>>(),
        echoed.iter().map(|f| &f.payload).collect::<Vec<_>>()
    );
    // The stream still works.
    sim.write(C, id, b"still there");
    sim.finish(C, id);
    sim.finish(S, id);
    sim.drive();
    assert_eq!(sim.app(S, id).received, b"still there");
}

#[test]
fn goaway_lets_open_streams_finish() {
    goaway_lets_open_streams_finish_on(false);
}

#[test]
fn goaway_lets_open_streams_finish_with_partial_writes() {
    goaway_lets_open_streams_finish_on(true);
}

fn goaway_lets_open_streams_finish_on(partial: bool) {
    let mut sim = Sim::small();
    sim.partial_sink = partial;
    sim.latency_ms = 3;
    let a = sim.open(C).unwrap();
    let b = sim.open(C).unwrap();
    let e = sim.open(S).unwrap();
    let a_bytes = pattern(30, 200_000);
    let b_bytes = pattern(31, 50_000);
    let e_bytes = pattern(32, 120_000);
    sim.write(C, a, &a_bytes[..1000]);
    sim.write(S, e, &e_bytes[..1000]);
    sim.drive();

    // The edge drains (e.g. for an upgrade).
    sim.mux(S).goaway(ErrorCode::NO_ERROR);
    assert_eq!(sim.mux(S).open(&meta()), Err(OpenError::Closing));
    sim.drive();
    assert_eq!(sim.goaways_sent(S), vec![(b.get(), ErrorCode::NO_ERROR)]);
    assert!(sim.sides[C].events.contains(&Event::GoAway {
        code: ErrorCode::NO_ERROR,
        last: b.get()
    }));
    assert_eq!(
        sim.mux(C).open(&meta()),
        Err(OpenError::Closing),
        "no new streams after GOAWAY"
    );
    assert!(sim.mux(C).is_closing() && sim.mux(S).is_closing());

    // Every stream still finishes with all its bytes, in both directions.
    sim.write(C, a, &a_bytes[1000..]);
    sim.write(C, b, &b_bytes);
    sim.write(S, e, &e_bytes[1000..]);
    sim.write(S, a, b"answer a");
    for id in [a, b, e] {
        sim.finish(C, id);
        sim.finish(S, id);
    }
    sim.drive();
    assert!(sim.app(S, a).received == a_bytes);
    assert!(sim.app(S, b).received == b_bytes);
    assert!(sim.app(C, e).received == e_bytes);
    assert_eq!(sim.app(C, a).received, b"answer a");
    for side in [C, S] {
        for id in [a, b, e] {
            assert_eq!(sim.app(side, id).reset, None, "side {side} {id} was reset");
        }
        assert_eq!(
            sim.sides[side].closed,
            Some(ErrorCode::NO_ERROR),
            "side {side} did not close cleanly"
        );
        assert_eq!(sim.mux(side).live_streams(), 0);
    }
    assert!(sim.quiet());
}

#[test]
fn goaway_sent_right_after_open_keeps_that_stream() {
    goaway_sent_right_after_open_keeps_that_stream_on(false);
}

#[test]
fn goaway_sent_right_after_open_keeps_that_stream_with_partial_writes() {
    goaway_sent_right_after_open_keeps_that_stream_on(true);
}

fn goaway_sent_right_after_open_keeps_that_stream_on(partial: bool) {
    // The agent opens a stream and starts draining before anything was
    // transmitted: the OPEN is older than the GOAWAY, so the stream must be
    // served ("all streams the sender opened finish normally").
    let mut sim = Sim::small();
    sim.partial_sink = partial;
    let id = sim.open(C).unwrap();
    sim.write(C, id, b"last request");
    sim.finish(C, id);
    sim.mux(C).goaway(ErrorCode::NO_ERROR);
    sim.drive();
    assert_eq!(
        sim.app(S, id).received,
        b"last request",
        "the stream was not served"
    );
    assert_eq!(sim.app(C, id).reset, None);
    sim.write(S, id, b"answer");
    sim.finish(S, id);
    sim.drive();
    assert_eq!(sim.app(C, id).received, b"answer");
    assert_eq!(sim.sides[C].closed, Some(ErrorCode::NO_ERROR));
    assert_eq!(sim.sides[S].closed, Some(ErrorCode::NO_ERROR));
    // On the wire, the OPEN precedes the GOAWAY.
    let kinds: Vec<_> = sim.sent_frames(C).iter().map(|f| f.kind).collect();
    let open = kinds.iter().position(|k| *k == FrameKind::Open).unwrap();
    let goaway = kinds.iter().position(|k| *k == FrameKind::GoAway).unwrap();
    assert!(open < goaway, "GOAWAY overtook the OPEN: {kinds:?}");
}

#[test]
fn goaway_refuses_streams_opened_above_last() {
    let mut sim = Sim::small();
    sim.latency_ms = 10;
    let early = sim.open(C).unwrap();
    sim.drive();
    // The client opens another stream while the server's GOAWAY is in flight.
    sim.mux(S).goaway(ErrorCode::NO_ERROR);
    let late = sim.open(C).unwrap();
    sim.write(C, late, b"too late");
    sim.drive();
    assert!(sim.sides[C].events.contains(&Event::GoAway {
        code: ErrorCode::NO_ERROR,
        last: early.get()
    }));
    assert_eq!(sim.app(C, late).reset, Some(ErrorCode::REFUSED_STREAM));
    assert!(sim
        .resets_sent(S)
        .contains(&(late.get(), ErrorCode::REFUSED_STREAM)));
    assert!(
        !sim.sides[S].apps.contains_key(&late.get()),
        "the server never saw the late stream"
    );
    assert_eq!(sim.app(C, early).reset, None);
    sim.finish(C, early);
    sim.finish(S, early);
    sim.drive();
    assert_eq!(sim.sides[C].closed, Some(ErrorCode::NO_ERROR));
    assert_eq!(sim.sides[S].closed, Some(ErrorCode::NO_ERROR));
}

#[test]
fn goaway_with_error_resets_every_stream_at_once() {
    let mut sim = Sim::small();
    let a = sim.open(C).unwrap();
    let e = sim.open(S).unwrap();
    sim.write(C, a, &pattern(5, 100_000));
    sim.drive();
    sim.mux(S).goaway(ErrorCode::TOKEN_REVOKED);
    sim.drive();
    assert_eq!(
        sim.goaways_sent(S),
        vec![(a.get(), ErrorCode::TOKEN_REVOKED)]
    );
    for side in [C, S] {
        assert_eq!(sim.sides[side].closed, Some(ErrorCode::TOKEN_REVOKED));
        for id in [a, e] {
            assert_eq!(sim.app(side, id).reset, Some(ErrorCode::TOKEN_REVOKED));
        }
        assert!(sim.mux(side).is_finished());
        assert_eq!(
            sim.mux(side).live_streams(),
            0,
            "released streams are freed on a closed session"
        );
    }
}

fn decode(bytes: &[u8]) -> Control<'_> {
    Control::decode(bytes).unwrap()
}

#[test]
fn control_messages_round_trip_and_backpressure() {
    control_messages_round_trip_and_backpressure_on(false);
}

#[test]
fn control_messages_round_trip_and_backpressure_with_partial_writes() {
    control_messages_round_trip_and_backpressure_on(true);
}

fn control_messages_round_trip_and_backpressure_on(partial: bool) {
    let mut sim = Sim::small();
    sim.partial_sink = partial;
    let hello = Control::Hello {
        version: 1,
        min_version: 1,
        token: Secret("tok_1.s3cr3t"),
        agent: "tetherd/0.1.0",
        arch: "armv7",
    };
    sim.mux(C).send_control(&hello).unwrap();
    sim.drive();
    assert_eq!(sim.sides[S].controls.len(), 1);
    assert_eq!(decode(&sim.sides[S].controls[0]), hello);
    let welcome = Control::Welcome {
        version: 1,
        session: 77,
        edge: "tether-edge/0.1.0",
    };
    sim.mux(S).send_control(&welcome).unwrap();
    sim.drive();
    assert_eq!(decode(&sim.sides[C].controls[0]), welcome);

    // Sender backpressure: the control queue holds one MAX_FRAME.
    let policy = "x".repeat(10_000);
    let bind = Control::Bind {
        endpoint: "web",
        kind: EndpointKind::Tls,
        url: "",
        upstream: "127.0.0.1:8080",
        policy: &policy,
    };
    sim.mux(C).send_control(&bind).unwrap();
    assert_eq!(sim.mux(C).send_control(&bind), Err(ControlError::Blocked));
    sim.drive();
    assert!(
        sim.sides[C].events.contains(&Event::Unblocked),
        "no Unblocked after the queue drained"
    );
    sim.mux(C).send_control(&bind).unwrap();
    let too_big = "y".repeat(tether_proto::MAX_CONTROL);
    let huge = Control::Bind {
        endpoint: "web",
        kind: EndpointKind::Tcp,
        url: "",
        upstream: "",
        policy: &too_big,
    };
    assert!(matches!(
        sim.mux(S).send_control(&huge),
        Err(ControlError::Codec(_))
    ));
    sim.drive();
    assert_eq!(sim.sides[S].controls.len(), 3);
    assert_eq!(decode(&sim.sides[S].controls[1]), bind);
    assert_eq!(decode(&sim.sides[S].controls[2]), bind);

    // Receiver backpressure: while a message is not taken, input waits
    // (stream data behind it too), and nothing is lost.
    sim.sides[C].auto_take_control = false;
    let id = sim.open(S).unwrap();
    let msgs = [
        Control::BindOk {
            endpoint: "web",
            url: "tls://web.example.com:443",
        },
        Control::BindErr {
            endpoint: "db",
            code: 103,
            rule: "acl[2]",
            message: "not allowed",
        },
        Control::RotateOffer {
            token_id: "tok_2",
            token: Secret("n3w"),
        },
    ];
    for m in &msgs {
        sim.mux(S).send_control(m).unwrap();
    }
    sim.drive();
    sim.write(S, id, b"behind the controls");
    sim.drive();
    let start = 1; // Welcome was the first
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            sim.sides[C].controls.len(),
            start + i + 1,
            "exactly one message is offered at a time"
        );
        assert_eq!(decode(&sim.sides[C].controls[start + i]), *m);
        if i + 1 < msgs.len() {
            assert!(
                sim.sides[C].has_input(),
                "the next message must wait while one is held"
            );
        }
        sim.mux(C).take_control();
        sim.drive();
    }
    assert!(!sim.sides[C].has_input());
    assert_eq!(sim.app(C, id).received, b"behind the controls");

    sim.sides[C].auto_take_control = true;
    sim.mux(C)
        .send_control(&Control::RotateStored { token_id: "tok_2" })
        .unwrap();
    sim.drive();
    sim.mux(S)
        .send_control(&Control::RotateConfirmed { token_id: "tok_2" })
        .unwrap();
    sim.drive();
    assert_eq!(
        decode(sim.sides[S].controls.last().unwrap()),
        Control::RotateStored { token_id: "tok_2" }
    );
    assert_eq!(
        decode(sim.sides[C].controls.last().unwrap()),
        Control::RotateConfirmed { token_id: "tok_2" }
    );
}

#[test]
fn error_then_goaway_delivers_the_error_first() {
    error_then_goaway_delivers_the_error_first_on(false);
}

#[test]
fn error_then_goaway_delivers_the_error_first_with_partial_writes() {
    error_then_goaway_delivers_the_error_first_on(true);
}

fn error_then_goaway_delivers_the_error_first_on(partial: bool) {
    // PROTOCOL.md 1.4: the edge refuses a session with Error followed by GOAWAY.
    let mut sim = Sim::small();
    sim.partial_sink = partial;
    sim.mux(C)
        .send_control(&Control::Hello {
            version: 1,
            min_version: 1,
            token: Secret("bad"),
            agent: "tetherd/0.1.0",
            arch: "aarch64",
        })
        .unwrap();
    sim.drive();
    let err = Control::Error {
        code: 100,
        retry_after_ms: 0,
        message: "unknown token",
    };
    sim.mux(S).send_control(&err).unwrap();
    sim.mux(S).goaway(ErrorCode::AUTH_FAILED);
    sim.drive();
    let kinds: Vec<_> = sim.sent_frames(S).iter().map(|f| f.kind).collect();
    assert_eq!(kinds, vec![FrameKind::Control, FrameKind::GoAway]);
    assert_eq!(
        sim.sides[C].controls.len(),
        1,
        "the client never saw the Error"
    );
    assert_eq!(decode(&sim.sides[C].controls[0]), err);
    assert_eq!(sim.sides[C].closed, Some(ErrorCode::AUTH_FAILED));
    assert!(sim.mux(S).is_finished());
}

#[test]
fn finish_blocked_by_a_full_queue_is_woken_without_credit() {
    // The stream has used all its credit and the transmit queue is full: a
    // finish() that returns Blocked must get its Writable once the queue drains,
    // even though no WINDOW comes (the peer is not reading).
    let cfg = |role| Config {
        max_streams: 8,
        window: INITIAL_WINDOW,
        ..Config::new(role)
    };
    let mut sim = Sim::new(cfg(Role::Client), cfg(Role::Server));
    sim.sides[S].read_new_streams = false;
    let ids: Vec<_> = (0..4).map(|_| sim.open(C).unwrap()).collect();
    sim.drive();
    for (i, id) in ids.iter().enumerate() {
        // The whole credit of each stream, straight into the queue.
        assert_eq!(
            sim.mux(C)
                .send(*id, &pattern(i as u32, INITIAL_WINDOW as usize)),
            Ok(INITIAL_WINDOW as usize)
        );
        sim.app_mut(C, *id).written = pattern(i as u32, INITIAL_WINDOW as usize);
        sim.app_mut(C, *id).sent = INITIAL_WINDOW as usize;
    }
    assert_eq!(
        sim.mux(C).finish(ids[0]),
        Err(StreamError::Blocked),
        "the queue should be full"
    );
    sim.app_mut(C, ids[0]).waiting_writable = true;
    sim.app_mut(C, ids[0]).finish_requested = true;
    sim.drive();
    assert!(
        sim.sides[C].events.contains(&Event::Writable(ids[0])),
        "finish() was never woken"
    );
    assert!(sim.app(C, ids[0]).finished);
    // The FIN went out without any new credit.
    assert!(sim
        .sent_frames(C)
        .iter()
        .any(|f| f.data() == Some((ids[0].get(), 0, true))));
    sim.app_mut(S, ids[0]).reading = true;
    sim.drive();
    assert!(sim.app(S, ids[0]).fin_received);
}

#[test]
fn reset_before_open_is_transmitted_keeps_the_session() {
    reset_before_open_is_transmitted_keeps_the_session_on(false);
}

#[test]
fn reset_before_open_is_transmitted_keeps_the_session_with_partial_writes() {
    reset_before_open_is_transmitted_keeps_the_session_on(true);
}

fn reset_before_open_is_transmitted_keeps_the_session_on(partial: bool) {
    // An application that opens a stream and drops it at once: the RESET must
    // not reach the peer before the OPEN (that would be a frame for a stream the
    // peer never saw opened: a session error).
    let mut sim = Sim::small();
    sim.partial_sink = partial;
    let id = sim.open(C).unwrap();
    sim.mux(C).reset(id, ErrorCode::CANCEL).unwrap();
    sim.app_mut(C, id).reset = Some(ErrorCode::CANCEL);
    let dropped = sim.open(C).unwrap();
    sim.write(C, dropped, b"x");
    sim.pump(C);
    sim.mux(C).release(dropped);
    sim.app_mut(C, dropped).released = true;
    sim.drive();
    assert_eq!(
        sim.sides[S].closed,
        None,
        "server closed: {:?}",
        sim.sides[S].mux.close_reason()
    );
    assert_eq!(sim.sides[C].closed, None);
    assert!(sim.goaways_sent(S).is_empty());
    assert_eq!(sim.app(S, id).reset, Some(ErrorCode::CANCEL));
    assert_eq!(sim.app(S, dropped).reset, Some(ErrorCode::CANCEL));
    assert_eq!(sim.mux(C).live_streams(), 0);
    assert_eq!(sim.mux(S).live_streams(), 0);
    // The session still carries streams.
    let next = sim.open(C).unwrap();
    sim.write(C, next, b"fine");
    sim.finish(C, next);
    sim.drive();
    sim.finish(S, next);
    sim.drive();
    assert_eq!(sim.app(S, next).received, b"fine");
}

#[test]
fn refused_streams_free_their_slot_and_unblock_open() {
    let cfg = Config {
        max_streams: 2,
        ..small_cfg(Role::Client)
    };
    let mut sim = Sim::new(cfg, small_cfg(Role::Server));
    let a = sim.open(C).unwrap();
    let b = sim.open(C).unwrap();
    assert_eq!(sim.open(C), Err(OpenError::TooManyStreams));
    sim.drive();
    sim.finish(C, a);
    sim.finish(S, a);
    sim.drive();
    assert!(
        sim.sides[C].events.contains(&Event::Unblocked),
        "no Unblocked after a slot was freed"
    );
    let c = sim.open(C).unwrap();
    assert!(c.get() > b.get());
}

#[test]
fn released_stream_gets_no_more_events() {
    // After release() the application has forgotten the id: the mux must not
    // report it again (no Reset(CANCEL) echo of the release, no stale Readable).
    let mut sim = Sim::small();
    let id = sim.open(C).unwrap();
    sim.drive();
    sim.write(S, id, b"unread");
    sim.drive(); // Readable(id) is pending on the client... and then taken by the app
    sim.app_mut(C, id).reading = false;
    sim.write(S, id, b" more");
    sim.transmit(S);
    sim.deliver(C, usize::MAX); // a new Readable is marked, not yet polled
    sim.mux(C).release(id);
    sim.app_mut(C, id).released = true;
    let from = sim.sides[C].events.len();
    sim.poll_events(C); // before the RESET is transmitted
    sim.drive();
    let after: Vec<_> = sim.sides[C].events[from..].to_vec();
    assert!(
        after.iter().all(|e| !matches!(e, Event::Reset(i, _) | Event::Readable(i) | Event::Writable(i) if *i == id)),
        "events for a released stream: {after:?}"
    );
    assert_eq!(sim.app(S, id).reset, Some(ErrorCode::CANCEL));
    assert_eq!(sim.mux(C).live_streams(), 0);
}

#[test]
#[should_panic(expected = "did not settle")]
fn drive_fails_on_a_livelock_instead_of_hanging() {
    // A link that turns every PING ACK back into a PING makes the two sides
    // answer each other forever: the harness must panic, not hang.
    let mut sim = Sim::small();
    sim.step_limit = 500;
    sim.tamper = Some(Box::new(|_, bytes: &mut Vec<u8>| {
        let mut frames: Vec<Frame> = parse_all(bytes)
            .iter()
            .filter_map(Parsed::frame)
            .cloned()
            .collect();
        for f in &mut frames {
            if f.kind == FrameKind::Ping {
                f.flags = 0;
            }
        }
        *bytes = rebuild(&frames);
    }));
    let interval = sim.sides[C].mux.config().ping_interval_ms;
    sim.now = sim.now.add(interval);
    sim.drive();
}

#[test]
fn grants_are_not_starved_by_bulk_data_in_the_other_direction() {
    grants_are_not_starved_by_bulk_data_in_the_other_direction_on(false);
}

#[test]
fn grants_are_not_starved_by_bulk_data_in_the_other_direction_with_partial_writes() {
    grants_are_not_starved_by_bulk_data_in_the_other_direction_on(true);
}

fn grants_are_not_starved_by_bulk_data_in_the_other_direction_on(partial: bool) {
    // A driver calls poll_transmit once per write and lets writers refill the
    // queue in between, so the queue may never be empty at the moment of a
    // call. WINDOW grants must still go out: a bulk upload on one stream must
    // not stall a download on another until the upload ends.
    // The server's large window lets the upload keep the client's queue full.
    let server = Config {
        window: 64 * INITIAL_WINDOW,
        ..small_cfg(Role::Server)
    };
    let mut sim = Sim::new(small_cfg(Role::Client), server);
    sim.partial_sink = partial;
    sim.single_poll = true;
    sim.tx_buf = 64 * 1024; // per call, as the driver's old write buffer: a little under the queue
    let up = sim.open(C).unwrap();
    let down = sim.open(C).unwrap();
    sim.drive();
    let upload = 16 * MB;
    let download = 2 * MB;
    sim.app_mut(C, up).written = pattern(1, upload);
    sim.write(S, down, &pattern(2, download));
    sim.finish(S, down);
    let mut steps = 0;
    while !sim.app(C, down).fin_received {
        steps += 1;
        assert!(steps < 20_000, "download stalled");
        sim.step();
    }
    assert!(sim.app(C, down).received == pattern(2, download));
    let uploaded = sim.app(S, up).received.len();
    assert!(
        uploaded < upload,
        "the download only finished after the whole upload ({uploaded} bytes)"
    );
}

#[test]
fn a_frame_cut_by_a_close_is_finished_before_the_goaway() {
    // A pipe took part of a DATA frame, then the session closes with an
    // error: the rest of the frame must go out before the GOAWAY, or the
    // peer would read the GOAWAY's bytes as payload.
    let mut sim = Sim::small();
    let id = sim.open(C).unwrap();
    sim.drive();
    assert_eq!(sim.mux(C).send(id, &[7u8; 1000]), Ok(1000));
    let mut wire = Vec::new();
    let n = sim.mux(C).transmit_with(|b| {
        let k = b.len().min(100);
        wire.extend_from_slice(&b[..k]);
        k
    });
    assert_eq!(n, 100);
    sim.mux(C).goaway(ErrorCode::TOKEN_REVOKED);
    assert!(!sim.mux(C).is_finished(), "the cut frame is still owed");
    let mut out = vec![0u8; MAX_FRAME];
    loop {
        let n = sim.mux(C).poll_transmit(&mut out);
        if n == 0 {
            break;
        }
        wire.extend_from_slice(&out[..n]);
    }
    assert!(sim.mux(C).is_finished());
    assert_eq!(
        wire.len(),
        8 + 1000 + 16,
        "the rest of the DATA, then GOAWAY"
    );
    let now = sim.now;
    assert_eq!(sim.mux(S).handle_input(now, &wire), wire.len());
    assert_eq!(
        sim.mux(S).close_reason(),
        Some(CloseReason::PeerGoAway(ErrorCode::TOKEN_REVOKED))
    );
}

#[test]
fn a_small_frame_taken_in_part_is_continued_first() {
    // The sink takes 3 bytes of a WINDOW; the next call must start with its
    // other 9 before the DATA queued meanwhile.
    let mut sim = Sim::small();
    sim.sides[S].read_new_streams = false;
    let id = sim.open(C).unwrap();
    sim.drive();
    sim.write(C, id, &pattern(1, 2 * INITIAL_WINDOW as usize));
    sim.drive(); // the server has it all buffered, unread
    let mut buf = vec![0u8; 2 * INITIAL_WINDOW as usize];
    let got = match sim.mux(S).recv(id, &mut buf) {
        Ok(Recv::Data(n)) => n,
        other => panic!("recv: {other:?}"),
    };
    assert!(got > 0);
    sim.mux(S).send(id, b"reply").unwrap();
    let mut wire = Vec::new();
    assert_eq!(
        sim.mux(S).transmit_with(|b| {
            wire.extend_from_slice(&b[..3]);
            3
        }),
        3
    );
    assert_eq!(wire[0], FrameKind::Window as u8, "the grant goes first");
    let mut out = vec![0u8; MAX_FRAME];
    let n = sim.mux(S).poll_transmit(&mut out);
    wire.extend_from_slice(&out[..n]);
    let frames: Vec<_> = parse_all(&wire)
        .iter()
        .filter_map(Parsed::frame)
        .map(|f| f.kind)
        .collect();
    assert_eq!(frames, vec![FrameKind::Window, FrameKind::Data]);
    let now = sim.now;
    assert_eq!(sim.mux(C).handle_input(now, &wire), wire.len());
    assert_eq!(sim.mux(C).close_reason(), None);
}

#[test]
fn data_half_received_when_its_stream_is_reset_is_not_buffered() {
    // The header of a DATA frame has arrived, the stream is then reset and
    // released locally, its RESET sent and its slot reused by a new stream:
    // the rest of the payload belongs to the old stream and must be
    // discarded, not buffered into (or reported on) the new one.
    let cfg = |role| Config {
        max_streams: 1,
        ..small_cfg(role)
    };
    let mut sim = Sim::new(cfg(Role::Client), cfg(Role::Server));
    let old = sim.open(S).unwrap();
    sim.drive();
    assert_eq!(sim.mux(C).send(old, &[9u8; 100]), Ok(100));
    let mut wire = vec![0u8; MAX_FRAME];
    let n = sim.mux(C).poll_transmit(&mut wire);
    assert_eq!(n, 8 + 100);
    let now = sim.now;
    assert_eq!(sim.mux(S).handle_input(now, &wire[..50]), 50);
    sim.mux(S).reset(old, ErrorCode::CANCEL).unwrap();
    sim.mux(S).release(old);
    let mut out = vec![0u8; MAX_FRAME];
    assert!(sim.mux(S).poll_transmit(&mut out) > 0, "the RESET goes out");
    assert_eq!(sim.mux(S).live_streams(), 0);
    let new = sim.mux(S).open(&meta()).unwrap();
    while sim.mux(S).poll_event().is_some() {}
    assert_eq!(sim.mux(S).handle_input(now, &wire[50..n]), n - 50);
    assert_eq!(
        sim.mux(S).readable_len(new),
        0,
        "old bytes in the new stream"
    );
    let mut buf = [0u8; 200];
    assert_eq!(sim.mux(S).recv(new, &mut buf), Ok(Recv::Blocked));
    let mut events = Vec::new();
    while let Some(ev) = sim.mux(S).poll_event() {
        events.push(ev);
    }
    assert!(events.is_empty(), "events: {events:?}");
    assert_eq!(sim.mux(S).close_reason(), None);
}

#[test]
fn goaway_while_an_open_is_half_received_waits_for_that_stream() {
    // The server starts draining when only part of the client's OPEN has
    // arrived: its GOAWAY names that stream as accepted, so the session must
    // not count as drained (and close) before the stream is served.
    let mut sim = Sim::small();
    let id = sim.open(C).unwrap();
    let mut wire = vec![0u8; MAX_FRAME];
    let n = sim.mux(C).poll_transmit(&mut wire);
    let now = sim.now;
    assert_eq!(sim.mux(S).handle_input(now, &wire[..12]), 12);
    sim.mux(S).goaway(ErrorCode::NO_ERROR);
    assert!(!sim.mux(S).is_closed(), "drained with a stream half opened");
    assert_eq!(sim.mux(S).handle_input(now, &wire[12..n]), n - 12);
    sim.drive();
    assert_eq!(sim.goaways_sent(S), vec![(id.get(), ErrorCode::NO_ERROR)]);
    sim.write(C, id, b"request");
    sim.finish(C, id);
    sim.drive();
    assert_eq!(sim.app(S, id).received, b"request");
    sim.write(S, id, b"answer");
    sim.finish(S, id);
    sim.drive();
    assert_eq!(sim.app(C, id).received, b"answer");
    assert_eq!(sim.sides[S].closed, Some(ErrorCode::NO_ERROR));
}

#[test]
fn recv_with_hands_out_the_window_in_order_without_a_copy_and_grants_credit() {
    let mut sim = Sim::small();
    sim.sides[S].read_new_streams = false; // this test reads S's side itself
    let id = sim.open(C).unwrap();
    let window = sim.mux(S).config().window as usize;
    let up = pattern(3, 5 * window + 123);
    sim.write(C, id, &up);
    sim.finish(C, id);
    let mut got = Vec::new();
    let mut wrapped = false;
    for turn in 1..10_000usize {
        sim.drive();
        // Take a different prefix each time: 1 byte, a few, most, everything.
        let r = sim
            .mux(S)
            .recv_with(id, |a, b| {
                assert!(!a.is_empty(), "take is called only with bytes to take");
                wrapped |= !b.is_empty();
                let all = a.len() + b.len();
                let n = match turn % 4 {
                    0 => 1,
                    1 => 7.min(all),
                    2 => all - all / 3,
                    _ => all,
                };
                got.extend_from_slice(&a[..n.min(a.len())]);
                got.extend_from_slice(&b[..n.saturating_sub(a.len())]);
                n
            })
            .unwrap();
        if r == Recv::Fin {
            break;
        }
    }
    assert!(got == up, "bytes differ: got {} of {}", got.len(), up.len());
    assert!(
        wrapped,
        "the window never wrapped, so the second slice went untested"
    );
    // Five windows went through: credit was granted for what was taken.
    sim.assert_credit_respected(C);
    assert_eq!(
        sim.mux(S).recv_with(id, |_, _| unreachable!()).unwrap(),
        Recv::Fin
    );
}
