//! One test per protocol invariant (DESIGN.md invariants 1, 2 and 10;
//! PROTOCOL.md sections 2, 3 and 3.4): what a peer that breaks the rules gets
//! back on the wire, and that nothing it sends is buffered past the bound.
//!
//! The misbehaving peer is simulated by injecting raw frames (built with
//! `tether_proto::frame::write_frame`) into the link towards the victim, the
//! server; the victim's answers are read back by parsing what it transmits.
#![allow(clippy::unwrap_used)]

mod sim;

use sim::*;
use tether_proto::control::Control;
use tether_proto::mux::{CloseReason, CONTROL_OUT_CAPACITY, ORPHAN_RESETS, TX_CAPACITY};
use tether_proto::{
    Config, ErrorCode, Event, FrameKind, Role, HEADER_LEN, INITIAL_WINDOW, MAX_CONTROL, MAX_META,
    MAX_PAYLOAD, MAX_WINDOW,
};

/// A pair with one stream (id 1) opened by the client and seen by the server.
fn established() -> (Sim, tether_proto::StreamId) {
    let mut sim = Sim::small();
    let id = sim.open(C).unwrap();
    sim.write(C, id, b"hi");
    sim.drive();
    assert_eq!(sim.app(S, id).received, b"hi");
    (sim, id)
}

/// Injects `bytes` towards the server, runs, and returns what the server
/// transmitted in answer.
fn inject_into_server(sim: &mut Sim, bytes: &[u8]) -> Vec<Frame> {
    let before = sim.sent_frames(S).len();
    sim.inject(S, bytes);
    sim.drive();
    sim.sent_frames(S)[before..].to_vec()
}

/// Asserts that the server closed the session with `GOAWAY(code)` and nothing
/// else after it, and that the client learned it.
fn assert_session_error(sim: &mut Sim, answer: &[Frame], code: ErrorCode) {
    let goaways: Vec<_> = answer.iter().filter_map(Frame::goaway).collect();
    assert_eq!(
        goaways.len(),
        1,
        "expected one GOAWAY, the server sent {answer:?}"
    );
    assert_eq!(
        goaways[0].1,
        code,
        "GOAWAY code (reason: {:?})",
        sim.sides[S].mux.close_reason()
    );
    assert_eq!(
        answer.last().and_then(Frame::goaway).map(|g| g.1),
        Some(code),
        "frames after the GOAWAY"
    );
    assert_eq!(sim.sides[S].closed, Some(code));
    assert!(
        sim.mux(S).is_finished(),
        "the server still has bytes to send"
    );
    if !sim.sides[S].mute {
        assert!(sim.sides[C].events.contains(&Event::GoAway {
            code,
            last: goaways[0].0
        }));
        assert_eq!(sim.sides[C].closed, Some(code));
    }
}

// ----------------------------------------------------------- memory bound

/// The storage a mux was given, as it was at the start: the slot `Vec`
/// and the byte buffer `Vec`, by length, capacity and address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Storage {
    slots: (usize, usize, usize),
    buf: (usize, usize, usize),
}

fn storage(m: &M) -> Storage {
    let (slots, buf) = m.storage();
    Storage {
        slots: (slots.len(), slots.capacity(), slots.as_ptr() as usize),
        buf: (buf.len(), buf.capacity(), buf.as_ptr() as usize),
    }
}

/// What the victim holds, checked after every step: the same storage as at
/// the start, and every occupancy within its bound. Returns the buffer use.
fn assert_within_storage(sim: &mut Sim, side: usize, at_start: Storage) -> usize {
    let m = &sim.sides[side].mux;
    let cfg = *m.config();
    assert_eq!(storage(m), at_start, "the mux's storage changed");
    assert_eq!(at_start.slots.0, cfg.max_streams);
    assert_eq!(at_start.buf.0, cfg.buffer_len());
    let live = m.live_streams();
    assert!(live <= cfg.max_streams, "{live} streams held");
    let in_use = m.buffered();
    // Tighter than buffer_len when fewer streams are held: only held streams
    // have bytes, each at most its window and metadata.
    let bound = live * cfg.stream_region() + TX_CAPACITY + CONTROL_OUT_CAPACITY + MAX_CONTROL;
    assert!(
        in_use <= bound && in_use <= cfg.buffer_len(),
        "{in_use} bytes buffered with {live} streams, bound {bound}"
    );
    for (&raw, app) in &sim.sides[side].apps {
        if !app.released {
            assert!(m.readable_len(sid(raw)) <= cfg.window as usize);
        }
    }
    in_use
}

/// `drive`, with [`assert_within_storage`] after every step; returns the
/// highest buffer use seen.
fn drive_checked(sim: &mut Sim, side: usize, at_start: Storage) -> usize {
    let mut peak = 0;
    for _ in 0..sim.step_limit {
        let moved = sim.step();
        peak = peak.max(assert_within_storage(sim, side, at_start));
        if moved {
            continue;
        }
        match sim.next_arrival() {
            Some(t) if t > sim.now => sim.now = t,
            _ => return peak,
        }
    }
    panic!("did not settle");
}

/// DESIGN.md invariant 1, measured: a peer that opens more streams than
/// allowed, sends past its window, floods control messages and pings, sends
/// on streams that are gone and finally an oversized frame, to a victim
/// whose application never reads, never makes the victim use more than the
/// storage it was given; and every violation gets the code PROTOCOL.md
/// prescribes.
#[test]
fn hostile_peer_never_makes_the_mux_exceed_its_storage() {
    for delivery in [
        Delivery::Whole,
        Delivery::Chunks(1000),
        Delivery::Random(3000),
    ] {
        let mut sim = Sim::small();
        sim.delivery = delivery;
        // The victim's application reads nothing and takes no control message
        // until told; its answers go nowhere (the attacker is the raw bytes).
        sim.sides[S].read_new_streams = false;
        sim.sides[S].auto_take_control = false;
        sim.sides[S].mute = true;
        let at_start = storage(&sim.sides[S].mux);
        let cfg = *sim.sides[S].mux.config();
        let (max, window) = (cfg.max_streams as u32, cfg.window as usize);
        let mut peak = 0;

        // 1. Every stream slot, each filled to its whole window: the initial
        // window behind the OPEN, the rest once the victim's grant is out.
        let ids: Vec<u32> = (0..max).map(|k| 1 + 2 * k).collect();
        let mut wire = Vec::new();
        for &id in &ids {
            wire.extend_from_slice(&open_frame(id));
            wire.extend_from_slice(&data_frame(
                id,
                false,
                &pattern(id, INITIAL_WINDOW as usize),
            ));
        }
        sim.inject(S, &wire);
        peak = peak.max(drive_checked(&mut sim, S, at_start));
        let mut wire = Vec::new();
        for &id in &ids {
            let rest = window - INITIAL_WINDOW as usize;
            for chunk in pattern(id, rest).chunks(MAX_PAYLOAD) {
                wire.extend_from_slice(&data_frame(id, false, chunk));
            }
        }
        // 2. More streams than allowed, each with data behind its OPEN.
        let extra: Vec<u32> = (max..max + 3 * ORPHAN_RESETS as u32)
            .map(|k| 1 + 2 * k)
            .collect();
        for &id in &extra {
            wire.extend_from_slice(&open_frame(id));
            wire.extend_from_slice(&data_frame(id, false, &pattern(id, MAX_PAYLOAD)));
        }
        // 3. Data past the window of a full stream.
        wire.extend_from_slice(&data_frame(1, false, &pattern(0, MAX_PAYLOAD)));
        sim.inject(S, &wire);
        peak = peak.max(drive_checked(&mut sim, S, at_start));
        assert_eq!(sim.mux(S).live_streams(), max as usize - 1, "{delivery:?}");
        let resets = sim.resets_sent(S);
        for id in &extra {
            assert_eq!(
                resets.iter().find(|r| r.0 == *id).map(|r| r.1),
                Some(ErrorCode::REFUSED_STREAM),
                "{delivery:?}: stream {id} beyond the limit: {resets:?}"
            );
        }
        assert!(
            resets.contains(&(1, ErrorCode::FLOW_CONTROL)),
            "{delivery:?}: data past the window: {resets:?}"
        );
        assert!(
            peak >= (max as usize - 1) * window,
            "{delivery:?}: the flood never filled the windows (peak {peak})"
        );

        // 4. A flood of control messages the application does not take:
        // one is held, the rest wait in the transport.
        let policy = "x".repeat(8000);
        let bind = Control::Bind {
            endpoint: "web",
            kind: tether_proto::EndpointKind::Tcp,
            url: "",
            upstream: "127.0.0.1:1",
            policy: &policy,
        };
        let mut wire = Vec::new();
        for _ in 0..50 {
            wire.extend_from_slice(&control_frame(&bind));
        }
        // 5. A ping flood, and data on the streams that were refused.
        for k in 0..1000u64 {
            wire.extend_from_slice(&ping_frame(false, k.to_be_bytes()));
        }
        for &id in &extra {
            wire.extend_from_slice(&data_frame(id, true, b"late"));
        }
        sim.inject(S, &wire);
        peak = peak.max(drive_checked(&mut sim, S, at_start));
        assert_eq!(sim.sides[S].controls.len(), 1, "{delivery:?}");
        assert!(
            sim.sides[S].has_input(),
            "{delivery:?}: input did not wait for the control message"
        );
        sim.sides[S].auto_take_control = true;
        sim.mux(S).take_control();
        peak = peak.max(drive_checked(&mut sim, S, at_start));
        assert_eq!(sim.sides[S].controls.len(), 50, "{delivery:?}");
        let acks = sim
            .sent_frames(S)
            .iter()
            .filter(|f| f.kind == FrameKind::Ping)
            .count();
        assert!((1..=1000).contains(&acks), "{delivery:?}: {acks} PING ACKs");
        let resets = sim.resets_sent(S);
        for id in &extra {
            assert!(
                resets
                    .iter()
                    .filter(|r| r.0 == *id)
                    .all(|r| r.1 == ErrorCode::REFUSED_STREAM || r.1 == ErrorCode::STREAM_CLOSED),
                "{delivery:?}: stream {id}: {resets:?}"
            );
        }
        assert_eq!(sim.sides[S].closed, None, "{delivery:?}");

        // 6. An oversized frame ends the session with GOAWAY(FRAME_SIZE).
        let mut wire = raw_header(FrameKind::Data as u8, 0, MAX_PAYLOAD as u16 + 1, 3);
        wire.extend_from_slice(&pattern(3, MAX_PAYLOAD + 1));
        sim.inject(S, &wire);
        peak = peak.max(drive_checked(&mut sim, S, at_start));
        assert_eq!(
            sim.goaways_sent(S),
            vec![(extra[extra.len() - 1], ErrorCode::FRAME_SIZE)],
            "{delivery:?}"
        );
        assert_eq!(sim.sides[S].closed, Some(ErrorCode::FRAME_SIZE));
        assert!(peak <= cfg.buffer_len());
        assert_eq!(
            sim.mux(S).buffered(),
            0,
            "{delivery:?}: a closed mux holds bytes"
        );
    }
}

#[test]
fn storage_of_the_wrong_size_is_refused() {
    let cfg = small_cfg(Role::Server);
    let bad = tether_proto::Mux::new(
        cfg,
        vec![tether_proto::Slot::EMPTY; 8],
        vec![0u8; cfg.buffer_len() - 1],
        Default::default(),
    );
    assert!(bad.is_err(), "a buffer of the wrong size is refused");
    let bad = tether_proto::Mux::new(
        cfg,
        vec![tether_proto::Slot::EMPTY; 7],
        vec![0u8; cfg.buffer_len()],
        Default::default(),
    );
    assert!(bad.is_err(), "a slot slice of the wrong size is refused");
}

#[test]
fn memory_stays_at_bound_when_peer_ignores_window() {
    let (mut sim, id) = established();
    sim.sides[S].app_mut(id).reading = false; // nobody reads: the buffer only fills
    let window = sim.sides[S].mux.config().window as usize;
    sim.delivery = Delivery::Chunks(1000);
    // The peer already used 2 bytes; it now sends two whole windows' worth,
    // ignoring its credit.
    let mut flood = Vec::new();
    let junk = pattern(9, MAX_PAYLOAD);
    for _ in 0..(2 * window / MAX_PAYLOAD) {
        flood.extend_from_slice(&data_frame(id.get(), false, &junk));
    }
    let answer = inject_into_server(&mut sim, &flood);
    assert!(
        answer
            .iter()
            .any(|f| f.reset() == Some((id.get(), ErrorCode::FLOW_CONTROL))),
        "no RESET(FLOW_CONTROL): {answer:?}"
    );
    assert_eq!(sim.app(S, id).reset, Some(ErrorCode::FLOW_CONTROL));
    assert!(
        sim.app(S, id).max_buffered <= window,
        "buffered {} > window {window}",
        sim.app(S, id).max_buffered
    );
    // The frame that crossed the credit was not buffered at all.
    assert!(sim.app(S, id).max_buffered <= 2 + window - MAX_PAYLOAD);
    assert_eq!(
        sim.app(C, id).reset,
        Some(ErrorCode::FLOW_CONTROL),
        "the peer is told"
    );
    // More data on the reset stream is dropped, not buffered, and the session lives.
    let before = sim.sides[S].consumed;
    let more = data_frame(id.get(), false, &junk);
    inject_into_server(&mut sim, &more);
    assert_eq!(sim.sides[S].consumed - before, more.len());
    assert_eq!(sim.mux(S).readable_len(id), 0);
    assert_eq!(sim.sides[S].closed, None);
    assert!(sim.goaways_sent(S).is_empty());
    let next = sim.open(C).unwrap();
    sim.write(C, next, b"ok");
    sim.drive();
    assert_eq!(sim.app(S, next).received, b"ok");
}

#[test]
fn a_frame_crossing_the_credit_is_refused_whole() {
    // Exactly at the credit is fine; one byte over resets.
    let (mut sim, id) = established();
    sim.sides[S].app_mut(id).reading = false;
    let window = sim.sides[S].mux.config().window as usize;
    let room = window - 2;
    let first = pattern(1, MAX_PAYLOAD);
    let second = pattern(2, room - MAX_PAYLOAD);
    let mut bytes = data_frame(id.get(), false, &first);
    bytes.extend_from_slice(&data_frame(id.get(), false, &second));
    let answer = inject_into_server(&mut sim, &bytes);
    assert!(
        answer.iter().all(|f| f.kind != FrameKind::Reset),
        "reset at exactly the credit: {answer:?}"
    );
    assert_eq!(
        sim.mux(S).readable_len(id),
        room,
        "the whole credit is buffered"
    );
    let answer = inject_into_server(&mut sim, &data_frame(id.get(), false, b"!"));
    assert!(answer
        .iter()
        .any(|f| f.reset() == Some((id.get(), ErrorCode::FLOW_CONTROL))));
    assert_eq!(sim.app(S, id).max_buffered, room);
}

#[test]
fn too_many_streams_are_refused_with_reset() {
    let server = Config {
        max_streams: 2,
        ..small_cfg(Role::Server)
    };
    let mut sim = Sim::new(small_cfg(Role::Client), server);
    let ids: Vec<_> = (0..3).map(|_| sim.open(C).unwrap()).collect();
    for id in &ids {
        sim.write(C, *id, &pattern(id.get(), 20_000));
    }
    sim.drive();
    assert_eq!(sim.mux(S).live_streams(), 2);
    assert_eq!(sim.app(C, ids[2]).reset, Some(ErrorCode::REFUSED_STREAM));
    assert!(sim
        .resets_sent(S)
        .contains(&(ids[2].get(), ErrorCode::REFUSED_STREAM)));
    assert!(
        !sim.sides[S].apps.contains_key(&ids[2].get()),
        "a refused stream is never offered"
    );
    assert!(sim.app(S, ids[0]).received == pattern(ids[0].get(), 20_000));

    // A flood of OPENs far beyond the limit: each refused, none held, the
    // answers queue in bounded memory (input waits while they are sent).
    // (The client mux did not open these: it does not get the answers.)
    sim.sides[S].mute = true;
    let mut flood = Vec::new();
    let first = ids[2].get() + 2;
    let n = 10 * ORPHAN_RESETS as u32;
    for k in 0..n {
        flood.extend_from_slice(&open_frame(first + 2 * k));
    }
    let answer = inject_into_server(&mut sim, &flood);
    let refused: Vec<_> = answer.iter().filter_map(Frame::reset).collect();
    assert_eq!(refused.len(), n as usize);
    assert!(refused
        .iter()
        .enumerate()
        .all(|(k, r)| *r == (first + 2 * k as u32, ErrorCode::REFUSED_STREAM)));
    assert_eq!(sim.mux(S).live_streams(), 2);
    assert_eq!(sim.sides[S].closed, None);
}

// ------------------------------------- 1, 3.2: the edge refuses every agent stream

/// A server that refuses peer streams, with a client that opens anyway.
fn refusing_pair() -> Sim {
    let mut sim = Sim::small();
    sim.mux(S).refuse_peer_streams();
    assert!(sim.mux(S).refuses_peer_streams());
    sim
}

#[test]
fn refused_peer_streams_take_no_slot_no_credit_and_no_buffer() {
    let mut sim = refusing_pair();
    let max = sim.sides[S].mux.config().max_streams;
    // More streams than the server could hold, each sending its whole
    // initial window right behind its OPEN (what a hostile agent would do).
    let ids: Vec<_> = (0..max).map(|_| sim.open(C).unwrap()).collect();
    for id in &ids {
        sim.write(C, *id, &pattern(id.get(), INITIAL_WINDOW as usize));
        sim.finish(C, *id);
    }
    for _ in 0..sim.step_limit {
        let moved = sim.step();
        assert_eq!(sim.mux(S).live_streams(), 0, "a refused stream took a slot");
        assert_eq!(sim.mux(S).buffered(), 0, "a refused stream buffered bytes");
        if !moved && sim.next_arrival().is_none() {
            break;
        }
    }
    // Every OPEN was answered with RESET(REFUSED_STREAM), first, and nothing else.
    let resets = sim.resets_sent(S);
    for id in &ids {
        let mine: Vec<_> = resets.iter().filter(|r| r.0 == id.get()).collect();
        assert_eq!(
            mine.first().map(|r| r.1),
            Some(ErrorCode::REFUSED_STREAM),
            "{id}: {resets:?}"
        );
        assert_eq!(sim.app(C, *id).reset, Some(ErrorCode::REFUSED_STREAM));
    }
    let sent = sim.sent_frames(S);
    assert!(
        sent.iter().all(|f| f.window().is_none()),
        "the server granted credit to a refused stream: {sent:?}"
    );
    assert!(
        !sim.sides[S]
            .events
            .iter()
            .any(|e| matches!(e, Event::Opened(_))),
        "a refused stream was offered to the application"
    );
    assert_eq!(sim.mux(C).live_streams(), 0, "the opener released them");
    // The session is fine: the server opens its own streams and they work.
    assert_eq!(sim.sides[S].closed, None);
    assert!(sim.goaways_sent(S).is_empty());
    let own = sim.open(S).unwrap();
    sim.write(S, own, b"from the edge");
    sim.finish(S, own);
    sim.drive();
    assert_eq!(sim.app(C, own).received, b"from the edge");
}

#[test]
fn a_flood_of_refused_opens_and_data_buffers_nothing_and_queues_bounded_answers() {
    let mut s = new_mux(small_cfg(Role::Server), tether_proto::Millis(0));
    s.refuse_peer_streams();
    let n = 10 * ORPHAN_RESETS as u32;
    let junk = pattern(5, MAX_PAYLOAD);
    let mut flood = Vec::new();
    for k in 0..n {
        let id = 1 + 2 * k;
        flood.extend_from_slice(&open_frame(id));
        // Data within what the initial window would have allowed.
        flood.extend_from_slice(&data_frame(id, false, &junk));
    }
    let now = tether_proto::Millis(1);
    // Nobody transmits: the answers may not pile up, so input stops.
    let mut pos = 0;
    loop {
        let end = (pos + 1000).min(flood.len());
        let c = s.handle_input(now, &flood[pos..end]);
        assert_eq!(s.live_streams(), 0);
        assert_eq!(s.buffered(), 0);
        pos += c;
        if c == 0 || pos == flood.len() {
            break;
        }
    }
    assert!(
        pos < flood.len(),
        "all input consumed without sending one answer"
    );
    let mut out = vec![0u8; 64 * 1024];
    let first = s.poll_transmit(&mut out);
    let answers = parse_all(&out[..first]);
    assert!(
        answers.len() <= ORPHAN_RESETS,
        "{} answers queued, bound {ORPHAN_RESETS}",
        answers.len()
    );
    // Now with a transport that takes everything: the whole flood goes through.
    let mut wire = out[..first].to_vec();
    while pos < flood.len() {
        let end = (pos + 777).min(flood.len());
        pos += s.handle_input(now, &flood[pos..end]);
        assert_eq!(s.live_streams(), 0);
        assert_eq!(s.buffered(), 0);
        let k = s.poll_transmit(&mut out);
        wire.extend_from_slice(&out[..k]);
    }
    loop {
        let k = s.poll_transmit(&mut out);
        if k == 0 {
            break;
        }
        wire.extend_from_slice(&out[..k]);
    }
    let resets: Vec<_> = parse_all(&wire)
        .iter()
        .map(|p| p.frame().and_then(Frame::reset).expect("only RESETs"))
        .collect();
    for k in 0..n {
        let id = 1 + 2 * k;
        let mine: Vec<_> = resets.iter().filter(|r| r.0 == id).collect();
        assert_eq!(
            mine.first().map(|r| r.1),
            Some(ErrorCode::REFUSED_STREAM),
            "stream {id}"
        );
        assert!(
            mine.iter().skip(1).all(|r| r.1 == ErrorCode::STREAM_CLOSED) && mine.len() <= 2,
            "stream {id}: {mine:?}"
        );
    }
    // The refused ids count as used: reopening one is a session error.
    assert!(!s.is_closed());
    s.handle_input(now, &open_frame(1));
    assert_eq!(s.close_reason(), Some(CloseReason::BadOpen(sid(1))));
}

// ----------------------------------------------------------- session errors

#[test]
fn oversized_frame_gets_goaway_frame_size() {
    for header in [
        raw_header(FrameKind::Data as u8, 0, MAX_PAYLOAD as u16 + 1, 1),
        raw_header(FrameKind::Control as u8, 0, u16::MAX, 0),
        raw_header(FrameKind::Open as u8, 0, MAX_META as u16 + 1, 3),
        raw_header(FrameKind::Window as u8, 0, 5, 1),
        raw_header(FrameKind::Reset as u8, 0, 3, 1),
        raw_header(FrameKind::Ping as u8, 0, 7, 0),
        raw_header(FrameKind::GoAway as u8, 0, 0, 0),
    ] {
        let (mut sim, _) = established();
        let mut bytes = header.clone();
        // Whatever follows is not read: a PING that would be answered.
        bytes.extend_from_slice(&[0u8; 100]);
        bytes.extend_from_slice(&ping_frame(false, [1; 8]));
        let answer = inject_into_server(&mut sim, &bytes);
        assert_session_error(&mut sim, &answer, ErrorCode::FRAME_SIZE);
        assert!(
            answer.iter().all(|f| f.kind != FrameKind::Ping),
            "read on after {header:?}"
        );
        assert!(matches!(
            sim.sides[S].mux.close_reason(),
            Some(CloseReason::BadHeader(_))
        ));
    }
}

#[test]
fn unknown_frame_kind_gets_goaway_protocol() {
    for kind in [0x07u8, 0x7f, 0xff] {
        let (mut sim, _) = established();
        let mut bytes = raw_header(kind, 0, 4, 1);
        bytes.extend_from_slice(&[0; 4]);
        let answer = inject_into_server(&mut sim, &bytes);
        assert_session_error(&mut sim, &answer, ErrorCode::PROTOCOL);
    }
}

#[test]
fn header_rule_violations_get_goaway_protocol() {
    for (what, bytes) in [
        (
            "undefined flag on DATA",
            raw_header(FrameKind::Data as u8, 0x02, 0, 1),
        ),
        (
            "flag on WINDOW",
            [
                raw_header(FrameKind::Window as u8, 0x01, 4, 1),
                vec![0, 0, 0, 1],
            ]
            .concat(),
        ),
        (
            "PING on a stream",
            [raw_header(FrameKind::Ping as u8, 0, 8, 1), vec![0; 8]].concat(),
        ),
        (
            "CONTROL on a stream",
            raw_header(FrameKind::Control as u8, 0, 0, 2),
        ),
        (
            "DATA on stream 0",
            raw_header(FrameKind::Data as u8, 0, 0, 0),
        ),
        (
            "stream id above 2^31-1",
            raw_header(FrameKind::Data as u8, 0, 0, 0x8000_0001),
        ),
    ] {
        let (mut sim, _) = established();
        let answer = inject_into_server(&mut sim, &bytes);
        assert!(
            answer.iter().any(|f| f.goaway().is_some()),
            "{what}: no GOAWAY"
        );
        assert_session_error(&mut sim, &answer, ErrorCode::PROTOCOL);
    }
}

#[test]
fn data_on_unknown_stream_gets_goaway() {
    // Stream 3 is the client's next id (not opened yet); 2 is the server's own
    // and the server never opened it.
    for bytes in [
        data_frame(3, false, b"early"),
        data_frame(2, false, b"never opened"),
        data_frame(1001, true, b""),
        window_frame(3, 100),
        reset_frame(4, ErrorCode::CANCEL),
    ] {
        let (mut sim, _) = established();
        let answer = inject_into_server(&mut sim, &bytes);
        assert_session_error(&mut sim, &answer, ErrorCode::PROTOCOL);
        assert!(matches!(
            sim.sides[S].mux.close_reason(),
            Some(CloseReason::NotOpened(_))
        ));
    }
}

#[test]
fn data_on_closed_stream_gets_reset_stream_closed() {
    // After FIN: a stream error on a stream still held.
    let (mut sim, id) = established();
    sim.finish(C, id);
    sim.drive();
    assert!(sim.app(S, id).fin_received);
    let answer = inject_into_server(&mut sim, &data_frame(id.get(), false, b"after fin"));
    assert_eq!(
        answer.iter().filter_map(Frame::reset).collect::<Vec<_>>(),
        vec![(id.get(), ErrorCode::STREAM_CLOSED)]
    );
    assert_eq!(sim.app(S, id).reset, Some(ErrorCode::STREAM_CLOSED));
    assert_eq!(sim.app(C, id).reset, Some(ErrorCode::STREAM_CLOSED));
    assert_eq!(sim.sides[S].closed, None);

    // On a stream that is gone (both ways closed, released): discarded
    // unbuffered, answered with one RESET while one is queued.
    let (mut sim, id) = established();
    sim.finish(C, id);
    sim.drive();
    sim.finish(S, id);
    sim.drive();
    assert_eq!(sim.mux(S).live_streams(), 0);
    let mut burst = Vec::new();
    for _ in 0..50 {
        burst.extend_from_slice(&data_frame(id.get(), false, &pattern(3, 1000)));
    }
    let answer = inject_into_server(&mut sim, &burst);
    assert_eq!(
        answer.iter().filter_map(Frame::reset).collect::<Vec<_>>(),
        vec![(id.get(), ErrorCode::STREAM_CLOSED)]
    );
    assert_eq!(sim.mux(S).live_streams(), 0);
    assert_eq!(sim.sides[S].closed, None);
    // Many gone streams at once: every one is answered, the answers wait in
    // bounded memory (input pauses while the queue of answers is full).
    let mut gone = Vec::new();
    for _ in 0..(3 * ORPHAN_RESETS) {
        let g = sim.open(C).unwrap();
        sim.finish(C, g);
        sim.drive();
        sim.finish(S, g);
        sim.drive();
        gone.push(g.get());
    }
    assert_eq!(sim.mux(S).live_streams(), 0);
    let burst: Vec<u8> = gone
        .iter()
        .flat_map(|g| data_frame(*g, false, b"zombie"))
        .collect();
    let answer = inject_into_server(&mut sim, &burst);
    let expected: Vec<_> = gone
        .iter()
        .map(|g| (*g, ErrorCode::STREAM_CLOSED))
        .collect();
    assert_eq!(
        answer.iter().filter_map(Frame::reset).collect::<Vec<_>>(),
        expected
    );
    // WINDOW and RESET for a gone stream are ignored.
    let mut late = window_frame(id.get(), 10);
    late.extend_from_slice(&reset_frame(id.get(), ErrorCode::CANCEL));
    let answer = inject_into_server(&mut sim, &late);
    assert!(answer.is_empty(), "answered {answer:?}");
    assert_eq!(sim.sides[S].closed, None);
}

#[test]
fn stream_id_reuse_gets_goaway() {
    for (what, id) in [
        ("reused id", 1u32),
        ("backwards id", 1),
        ("server parity", 4),
        ("zero-gap reuse", 3),
    ] {
        let (mut sim, first) = established();
        assert_eq!(first.get(), 1);
        if what == "backwards id" || what == "zero-gap reuse" {
            let second = sim.open(C).unwrap(); // 3
            sim.drive();
            assert_eq!(second.get(), 3);
        }
        let answer = inject_into_server(&mut sim, &open_frame(id));
        assert_session_error(&mut sim, &answer, ErrorCode::PROTOCOL);
        assert!(
            matches!(
                sim.sides[S].mux.close_reason(),
                Some(CloseReason::BadOpen(_))
            ),
            "{what}: {:?}",
            sim.sides[S].mux.close_reason()
        );
    }
}

#[test]
fn skipped_ids_are_allowed_and_count_as_used() {
    // Ids only need to increase; the ones skipped can never be opened later.
    let (mut sim, _) = established();
    sim.sides[S].mute = true; // the client mux did not open 9: keep it out of this
    let answer = inject_into_server(&mut sim, &open_frame(9));
    assert!(answer.iter().all(|f| f.goaway().is_none()));
    assert!(sim.sides[S].apps.contains_key(&9));
    let answer = inject_into_server(&mut sim, &open_frame(7));
    assert_session_error(&mut sim, &answer, ErrorCode::PROTOCOL);
}

#[test]
fn malformed_control_gets_goaway() {
    let (mut sim, _) = established();
    let welcome = control_frame(&Control::Welcome {
        version: 1,
        session: 1,
        edge: "e",
    });
    let mut trailing = welcome.clone();
    trailing[3] += 1; // one byte longer than the message
    trailing.push(0);
    for (what, bytes) in [
        (
            "unknown variant",
            raw_frame(FrameKind::Control, 0, 0, &[99]),
        ),
        ("empty", raw_frame(FrameKind::Control, 0, 0, &[])),
        (
            "truncated",
            raw_frame(
                FrameKind::Control,
                0,
                0,
                &welcome[HEADER_LEN..welcome.len() - 1],
            ),
        ),
        ("trailing bytes", trailing.clone()),
        (
            "bad utf-8",
            raw_frame(FrameKind::Control, 0, 0, &[7, 2, 0xff, 0xfe]),
        ),
    ] {
        let (mut sim, _) = established();
        let answer = inject_into_server(&mut sim, &bytes);
        assert_session_error(&mut sim, &answer, ErrorCode::PROTOCOL);
        assert!(
            sim.sides[S].controls.is_empty(),
            "{what}: a bad message was offered"
        );
        assert!(
            matches!(
                sim.sides[S].mux.close_reason(),
                Some(CloseReason::BadControl(_))
            ),
            "{what}"
        );
    }
    // The well-formed one is accepted.
    let answer = inject_into_server(&mut sim, &welcome);
    assert!(answer.is_empty());
    assert_eq!(sim.sides[S].controls.len(), 1);
}

#[test]
fn malformed_stream_meta_gets_reset_protocol() {
    let (mut sim, _) = established();
    sim.sides[S].mute = true; // the client mux did not open 3: keep it out of this
    let answer = inject_into_server(&mut sim, &raw_frame(FrameKind::Open, 0, 3, &[0xff, 0xff]));
    assert_eq!(
        answer.iter().filter_map(Frame::reset).collect::<Vec<_>>(),
        vec![(3, ErrorCode::PROTOCOL)]
    );
    assert!(
        !sim.sides[S].apps.contains_key(&3),
        "no Opened for undecodable metadata"
    );
    assert_eq!(sim.sides[S].closed, None);
    assert_eq!(sim.mux(S).live_streams(), 1);
}

// ----------------------------------------------------------- flow control

#[test]
fn sender_never_exceeds_granted_credit() {
    // Slow, chunky readers on both sides, latency, and several streams each
    // way: every DATA the client (and the server) transmits fits the credit it
    // had been granted by then.
    let mut sim = Sim::small();
    sim.latency_ms = 7;
    sim.delivery = Delivery::Random(3000);
    let mut ids = Vec::new();
    for k in 0..3u32 {
        let id = sim.open(C).unwrap();
        sim.app_mut(C, id).read_chunk = 777;
        sim.write(C, id, &pattern(k, 300_000));
        sim.finish(C, id);
        ids.push(id);
    }
    sim.drive();
    for (k, id) in ids.iter().enumerate() {
        assert!(sim.app(S, *id).received == pattern(k as u32, 300_000));
    }
    for (k, id) in ids.iter().enumerate() {
        sim.app_mut(S, *id).read_chunk = 100;
        sim.write(S, *id, &pattern(10 + k as u32, 150_000));
        sim.finish(S, *id);
    }
    sim.drive();
    for (k, id) in ids.iter().enumerate() {
        assert!(sim.app(C, *id).received == pattern(10 + k as u32, 150_000));
    }
    assert_eq!(sim.assert_credit_respected(C), 3 * 300_000);
    assert_eq!(sim.assert_credit_respected(S), 3 * 150_000);
    let window = sim.sides[S].mux.config().window as usize;
    for id in &ids {
        assert!(sim.app(S, *id).max_buffered <= window && sim.app(C, *id).max_buffered <= window);
    }
    // Grants came as the data was read, not in one lump: several WINDOWs per stream.
    let windows = sim
        .sent_frames(S)
        .iter()
        .filter(|f| f.window().is_some_and(|w| w.0 == ids[0].get()))
        .count();
    assert!(windows >= 300_000 / window, "only {windows} WINDOW frames");
}

#[test]
fn zero_window_gets_goaway_and_overflow_gets_reset() {
    let (mut sim, id) = established();
    let answer = inject_into_server(&mut sim, &window_frame(id.get(), 0));
    assert_session_error(&mut sim, &answer, ErrorCode::PROTOCOL);

    let (mut sim, id) = established();
    let answer = inject_into_server(&mut sim, &window_frame(id.get(), MAX_WINDOW));
    assert_eq!(
        answer.iter().filter_map(Frame::reset).collect::<Vec<_>>(),
        vec![(id.get(), ErrorCode::FLOW_CONTROL)]
    );
    assert_eq!(sim.app(S, id).reset, Some(ErrorCode::FLOW_CONTROL));
    assert_eq!(sim.sides[S].closed, None);
}

#[test]
fn peer_reset_discards_buffered_data_and_ends_both_ways() {
    let (mut sim, id) = established();
    sim.sides[S].app_mut(id).reading = false;
    sim.write(C, id, &pattern(1, 20_000));
    sim.drive();
    assert!(sim.mux(S).readable_len(id) > 0);
    sim.mux(C).reset(id, ErrorCode::CONNECT_FAILED).unwrap();
    sim.app_mut(C, id).reset = Some(ErrorCode::CONNECT_FAILED);
    sim.drive();
    assert_eq!(sim.app(S, id).reset, Some(ErrorCode::CONNECT_FAILED));
    assert_eq!(sim.mux(S).readable_len(id), 0);
    assert_eq!(sim.mux(S).live_streams(), 0);
    assert_eq!(sim.mux(C).live_streams(), 0);
    assert!(sim.quiet());
}

#[test]
fn sender_without_grants_stops_at_initial_window() {
    // Every WINDOW from the server is lost in flight: the client may send
    // INITIAL_WINDOW bytes per stream and not one more.
    let mut sim = Sim::small();
    sim.tamper = Some(Box::new(|from, bytes: &mut Vec<u8>| {
        if from == S {
            let kept: Vec<Frame> = parse_all(bytes)
                .iter()
                .filter_map(Parsed::frame)
                .filter(|f| f.kind != FrameKind::Window)
                .cloned()
                .collect();
            *bytes = rebuild(&kept);
        }
    }));
    let a = sim.open(C).unwrap();
    let b = sim.open(C).unwrap();
    sim.write(C, a, &pattern(1, 100_000));
    sim.write(C, b, &pattern(2, 100_000));
    sim.drive();
    for id in [a, b] {
        assert_eq!(sim.app(C, id).sent, INITIAL_WINDOW as usize);
        assert!(sim.app(C, id).waiting_writable);
        assert!(
            sim.app(S, id).received == pattern_at(id.get() / 2 + 1, 0, INITIAL_WINDOW as usize)
        );
    }
    assert!(
        sim.sent_frames(S)
            .iter()
            .any(|f| f.kind == FrameKind::Window),
        "the server did grant"
    );
    assert_eq!(sim.assert_credit_respected(C), 2 * INITIAL_WINDOW as u64);
    assert_eq!(sim.sides[S].closed, None);
}

/// A peer's OPEN whose payload arrives in two pieces reserves its slot: a
/// local `open()` in between takes another one (or none), never the same.
#[test]
fn half_received_open_keeps_its_slot_from_a_local_open() {
    use tether_proto::frame::write_frame;
    use tether_proto::mux::OpenError;
    use tether_proto::{
        Config, FrameHeader, FrameKind, Millis, Mux, Role, Slot, StreamId, StreamMeta,
    };

    let (meta, m) = web_meta();
    let mut f = vec![0u8; 8 + m.len()];
    let h = FrameHeader::stream(
        FrameKind::Open,
        0,
        m.len() as u16,
        StreamId::new(1).expect("id"),
    );
    write_frame(&mut f, h, &m).expect("frame");

    // One slot: the local open must wait, and the peer's stream opens intact.
    let cfg = Config {
        max_streams: 1,
        window: 16384,
        ..Config::new(Role::Server)
    };
    let mut s = Mux::new(
        cfg,
        vec![Slot::EMPTY; 1],
        vec![0u8; cfg.buffer_len()],
        Millis(0),
    )
    .expect("mux");
    assert_eq!(s.handle_input(Millis(1), &f[..9]), 9);
    assert_eq!(s.open(&meta), Err(OpenError::TooManyStreams));
    assert_eq!(s.handle_input(Millis(2), &f[9..]), f.len() - 9);
    assert_eq!(s.live_streams(), 1);
    let peer = StreamId::new(1).expect("id");
    assert_eq!(s.meta(peer), Some(meta.clone()));

    // Two slots: both streams live, each with its own metadata.
    let cfg = Config {
        max_streams: 2,
        window: 16384,
        ..Config::new(Role::Server)
    };
    let mut s = Mux::new(
        cfg,
        vec![Slot::EMPTY; 2],
        vec![0u8; cfg.buffer_len()],
        Millis(0),
    )
    .expect("mux");
    s.handle_input(Millis(1), &f[..9]);
    let other = StreamMeta {
        endpoint: "local",
        ..meta.clone()
    };
    let local = s.open(&other).expect("a free slot");
    s.handle_input(Millis(2), &f[9..]);
    assert_eq!(s.live_streams(), 2);
    assert_eq!(s.meta(local), Some(other));
    assert_eq!(s.meta(peer), Some(meta));
}

/// When the connection ends (EOF), a stream whose peer already sent FIN
/// keeps every byte for its reader, then EOF; a stream still open is reset.
#[test]
fn eof_keeps_finished_streams_bytes_and_resets_open_ones() {
    use tether_proto::frame::{write_frame, FLAG_FIN};
    use tether_proto::mux::{Recv, StreamError};
    use tether_proto::{Config, FrameHeader, FrameKind, Millis, Mux, Role, Slot, StreamId};

    let (_, m) = web_meta();
    let mut wire = Vec::new();
    let mut push = |h: FrameHeader, p: &[u8]| {
        let mut f = vec![0u8; 8 + p.len()];
        write_frame(&mut f, h, p).expect("frame");
        wire.extend_from_slice(&f);
    };
    let (one, three) = (StreamId::new(1).expect("id"), StreamId::new(3).expect("id"));
    push(
        FrameHeader::stream(FrameKind::Open, 0, m.len() as u16, one),
        &m,
    );
    push(
        FrameHeader::stream(FrameKind::Data, FLAG_FIN, 5, one),
        b"hello",
    );
    push(
        FrameHeader::stream(FrameKind::Open, 0, m.len() as u16, three),
        &m,
    );
    push(FrameHeader::stream(FrameKind::Data, 0, 3, three), b"abc");

    let cfg = Config {
        max_streams: 2,
        window: 16384,
        ..Config::new(Role::Server)
    };
    let mut s = Mux::new(
        cfg,
        vec![Slot::EMPTY; 2],
        vec![0u8; cfg.buffer_len()],
        Millis(0),
    )
    .expect("mux");
    assert_eq!(s.handle_input(Millis(1), &wire), wire.len());
    s.handle_eof();
    assert!(s.is_closed());
    let mut out = [0u8; 16];
    assert_eq!(s.recv(one, &mut out), Ok(Recv::Data(5)));
    assert_eq!(&out[..5], b"hello");
    assert_eq!(s.recv(one, &mut out), Ok(Recv::Fin));
    assert!(
        matches!(s.send(one, b"x"), Err(StreamError::Finished)),
        "the local direction is cut"
    );
    assert!(
        matches!(s.recv(three, &mut out), Err(StreamError::Reset(_))),
        "an open stream is reset"
    );
    assert_eq!(
        s.poll_transmit(&mut [0u8; 64]),
        0,
        "nothing is sent after EOF"
    );
}

/// Input offered again while it stalls on an untaken control message does
/// not count as life: the dead-peer deadline still closes the session.
#[test]
fn stalled_input_does_not_hold_off_the_dead_peer_deadline() {
    use tether_proto::frame::write_frame;
    use tether_proto::{Config, FrameHeader, FrameKind, Millis, Mux, Role, Slot};

    let msg = Control::Welcome {
        version: 1,
        session: 7,
        edge: "e",
    };
    let mut body = [0u8; 64];
    let body = msg.encode(&mut body).expect("encode").to_vec();
    let mut wire = Vec::new();
    for _ in 0..3 {
        let mut f = vec![0u8; 8 + body.len()];
        write_frame(
            &mut f,
            FrameHeader::session(FrameKind::Control, 0, body.len() as u16),
            &body,
        )
        .expect("frame");
        wire.extend_from_slice(&f);
    }
    let cfg = Config {
        max_streams: 1,
        window: 16384,
        ping_interval_ms: 100,
        dead_after_ms: 300,
        ..Config::new(Role::Server)
    };
    let mut s = Mux::new(
        cfg,
        vec![Slot::EMPTY; 1],
        vec![0u8; cfg.buffer_len()],
        Millis(0),
    )
    .expect("mux");
    let mut pos = s.handle_input(Millis(0), &wire);
    assert!(pos < wire.len(), "the second control message stalls input");
    // The application never takes the message; the driver keeps offering the rest.
    for t in (10..=400).step_by(10) {
        pos += s.handle_input(Millis(t), &wire[pos..]);
        s.handle_timeout(Millis(t));
    }
    assert!(s.is_closed(), "closed by the deadline");
    assert_eq!(s.close_reason(), Some(CloseReason::Timeout));
}

/// Metadata of a stream of endpoint `web`, and its encoding.
fn web_meta() -> (tether_proto::StreamMeta<'static>, Vec<u8>) {
    let meta = tether_proto::StreamMeta {
        endpoint: "web",
        peer: tether_proto::PeerAddr::Unknown,
        sni: None,
        client: None,
    };
    let mut mb = [0u8; 64];
    let m = meta.encode(&mut mb).expect("encode").to_vec();
    (meta, m)
}
