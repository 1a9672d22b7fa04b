//! Property tests over the in-memory pair: random interleavings of opens,
//! writes, reads, finishes, resets, drains, clock steps and partial deliveries
//! on both sides deliver every stream's bytes intact and in order, respect the
//! credit, and end with every stream released and nothing left to send. And a
//! multiplexer fed arbitrary bytes never panics, never buffers past its window
//! and only ever answers with well-formed frames.
//!
//! Case counts are modest so the file runs in seconds, also under qemu; set
//! `PROPTEST_CASES` to run more.
#![allow(clippy::unwrap_used)]

mod sim;

use proptest::prelude::*;
use sim::*;
use tether_proto::mux::{OpenError, Recv, StreamError};
use tether_proto::{
    Config, ErrorCode, FrameKind, Millis, Role, StreamId, INITIAL_WINDOW, MAX_FRAME,
};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[derive(Clone, Debug)]
enum Op {
    /// Open a stream on a side.
    Open(usize),
    /// Queue bytes on one of a side's streams.
    Write(usize, usize, usize),
    /// Let a side's app read up to n more bytes of a stream, in chunks of c.
    Read(usize, usize, usize, usize),
    /// Ask a side to finish a stream.
    Finish(usize, usize),
    /// A side's app resets a stream.
    Reset(usize, usize),
    /// A side starts draining.
    GoAway(usize),
    /// Whole steps of both sides.
    Step(usize),
    /// Advance the clock, then one step.
    Clock(u64),
    /// Hand at most n of the arrived bytes to a side.
    Deliver(usize, usize),
    /// Only the apps of one side act.
    Pump(usize),
    /// Only one side transmits.
    Transmit(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let side = 0usize..2;
    prop_oneof![
        6 => side.clone().prop_map(Op::Open),
        12 => (side.clone(), any::<usize>(), 1usize..40_000).prop_map(|(s, k, n)| Op::Write(s, k, n)),
        10 => (side.clone(), any::<usize>(), 1usize..60_000, 1usize..20_000).prop_map(|(s, k, n, c)| Op::Read(s, k, n, c)),
        4 => (side.clone(), any::<usize>()).prop_map(|(s, k)| Op::Finish(s, k)),
        1 => (side.clone(), any::<usize>()).prop_map(|(s, k)| Op::Reset(s, k)),
        1 => side.clone().prop_map(Op::GoAway),
        8 => (1usize..4).prop_map(Op::Step),
        3 => (0u64..5_000).prop_map(Op::Clock),
        8 => (side.clone(), 1usize..5_000).prop_map(|(s, n)| Op::Deliver(s, n)),
        4 => side.clone().prop_map(Op::Pump),
        4 => side.prop_map(Op::Transmit),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    client_streams: usize,
    server_streams: usize,
    client_window: u32,
    server_window: u32,
    latency_ms: u64,
    delivery: Delivery,
    tx_buf: usize,
    seed: u64,
    drain_at_end: Option<usize>,
    single_poll: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..7,
        1usize..7,
        prop_oneof![
            Just(INITIAL_WINDOW),
            Just(INITIAL_WINDOW + 1),
            Just(3 * INITIAL_WINDOW)
        ],
        prop_oneof![Just(INITIAL_WINDOW), Just(2 * INITIAL_WINDOW + 5)],
        0u64..30,
        prop_oneof![
            Just(Delivery::Whole),
            Just(Delivery::Bytewise),
            (1usize..64).prop_map(Delivery::Chunks),
            (1usize..20_000).prop_map(Delivery::Random),
        ],
        prop_oneof![Just(MAX_FRAME), Just(3 * MAX_FRAME + 17), Just(64 * 1024)],
        any::<u64>(),
        prop_oneof![2 => Just(None), 1 => (0usize..2).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(
            |(cs, ss, cw, sw, latency_ms, delivery, tx_buf, seed, drain_at_end, single_poll)| {
                Setup {
                    client_streams: cs,
                    server_streams: ss,
                    client_window: cw,
                    server_window: sw,
                    latency_ms,
                    delivery,
                    tx_buf,
                    seed,
                    drain_at_end,
                    single_poll,
                }
            },
        )
}

/// The `k`-th stream (mod the count) that `side`'s app knows and still holds.
fn pick(sim: &Sim, side: usize, k: usize) -> Option<StreamId> {
    let live: Vec<u32> = sim.sides[side]
        .apps
        .iter()
        .filter(|(_, a)| !a.released)
        .map(|(id, _)| *id)
        .collect();
    (!live.is_empty()).then(|| sid(live[k % live.len()]))
}

fn run(setup: &Setup, ops: &[Op]) {
    run_with(setup, ops, false);
}

/// [`run`], transmitting through `transmit_with` with a sink that takes
/// random prefixes (`partial_sink`) when `partial` is set.
fn run_with(setup: &Setup, ops: &[Op], partial: bool) {
    let client = Config {
        max_streams: setup.client_streams,
        window: setup.client_window,
        ..Config::new(Role::Client)
    };
    let server = Config {
        max_streams: setup.server_streams,
        window: setup.server_window,
        ..Config::new(Role::Server)
    };
    let mut sim = Sim::new(client, server);
    sim.latency_ms = setup.latency_ms;
    sim.delivery = setup.delivery;
    sim.tx_buf = setup.tx_buf;
    sim.single_poll = setup.single_poll;
    sim.partial_sink = partial;
    sim.rng = sim::Rng::new(setup.seed);
    for side in [C, S] {
        // Readers read only what the ops allow, until the end.
        sim.sides[side].new_read_budget = Some(0);
    }
    let mut drained = false;

    for op in ops {
        match *op {
            Op::Open(side) => match sim.open(side) {
                Ok(id) => {
                    sim.app_mut(side, id).read_budget = Some(0);
                }
                Err(OpenError::TooManyStreams | OpenError::Blocked | OpenError::Closing) => {}
                Err(e) => panic!("open: {e:?}"),
            },
            Op::Write(side, k, n) => {
                if let Some(id) = pick(&sim, side, k) {
                    let app = sim.app_mut(side, id);
                    if !app.finish_requested && app.reset.is_none() {
                        let from = app.written.len();
                        app.written.extend_from_slice(&pattern_at(
                            id.get() * 7 + side as u32,
                            from,
                            n,
                        ));
                    }
                }
            }
            Op::Read(side, k, n, chunk) => {
                if let Some(id) = pick(&sim, side, k) {
                    let app = sim.app_mut(side, id);
                    app.read_chunk = chunk;
                    *app.read_budget.get_or_insert(0) += n;
                }
            }
            Op::Finish(side, k) => {
                if let Some(id) = pick(&sim, side, k) {
                    sim.app_mut(side, id).finish_requested = true;
                }
            }
            Op::Reset(side, k) => {
                if let Some(id) = pick(&sim, side, k) {
                    if sim.app(side, id).reset.is_none() {
                        match sim.mux(side).reset(id, ErrorCode::CANCEL) {
                            Ok(()) => sim.app_mut(side, id).reset = Some(ErrorCode::CANCEL),
                            Err(e) => panic!("reset of a held stream: {e}"),
                        }
                    }
                }
            }
            Op::GoAway(side) => {
                sim.mux(side).goaway(ErrorCode::NO_ERROR);
                drained = true;
            }
            Op::Step(n) => {
                for _ in 0..n {
                    sim.step();
                }
            }
            Op::Clock(ms) => {
                sim.now = sim.now.add(ms);
                sim.step();
            }
            Op::Deliver(side, n) => {
                sim.deliver(side, n);
                sim.poll_events(side);
            }
            Op::Pump(side) => {
                sim.pump(side);
            }
            Op::Transmit(side) => {
                sim.transmit(side);
            }
        }
        sim.check_invariants();
    }

    // The end: every reader reads everything, every stream is finished, and
    // maybe one side drains.
    if let Some(side) = setup.drain_at_end {
        sim.mux(side).goaway(ErrorCode::NO_ERROR);
        drained = true;
    }
    for side in [C, S] {
        sim.sides[side].new_read_budget = None;
        for app in sim.sides[side].apps.values_mut() {
            app.read_budget = None;
            app.finish_requested = true;
        }
    }
    sim.drive();
    // Apps that saw Opened only during the last drive finish now.
    for side in [C, S] {
        for app in sim.sides[side].apps.values_mut() {
            app.finish_requested = true;
        }
    }
    sim.drive();

    // Every stream's bytes arrived intact and in order; reset streams got a prefix.
    for side in [C, S] {
        let other = peer(side);
        for (&raw, app) in &sim.sides[side].apps {
            assert!(
                app.released,
                "side {side} stream {raw} not released: {app:?}"
            );
            let theirs = sim.sides[other].apps.get(&raw);
            let got = theirs.map_or(&[][..], |a| &a.received[..]);
            let reset = app.reset.is_some() || theirs.is_some_and(|a| a.reset.is_some());
            if reset {
                assert!(
                    app.written.starts_with(got),
                    "side {side} stream {raw}: received bytes are not a prefix"
                );
            } else {
                let theirs = theirs
                    .unwrap_or_else(|| panic!("stream {raw} of side {side} unknown to the peer"));
                assert_eq!(app.sent, app.written.len());
                assert!(
                    got == &app.written[..],
                    "side {side} stream {raw}: {} bytes written, {} received",
                    app.written.len(),
                    got.len()
                );
                assert!(theirs.fin_received && app.finished);
            }
            let window = sim.sides[side].mux.config().window as usize;
            assert!(app.max_buffered <= window);
            // Only the application's own resets and refusals (stream limit,
            // draining) may end a stream early: anything else is a protocol
            // error between two correct peers.
            if let Some(code) = app.reset {
                assert!(
                    code == ErrorCode::CANCEL || code == ErrorCode::REFUSED_STREAM,
                    "side {side} stream {raw} reset with {code}"
                );
            }
        }
    }
    for side in [C, S] {
        assert_eq!(
            sim.mux(side).live_streams(),
            0,
            "side {side} still holds streams"
        );
        let expected = if drained {
            Some(ErrorCode::NO_ERROR)
        } else {
            None
        };
        assert_eq!(
            sim.sides[side].closed,
            expected,
            "side {side}: {:?}",
            sim.sides[side].mux.close_reason()
        );
        assert!(
            !sim.sides[side].has_input(),
            "side {side} left input unconsumed"
        );
    }
    assert!(sim.quiet(), "something left to transmit");
    if std::env::var("SIM_STATS").is_ok() {
        let total: usize = [C, S]
            .iter()
            .flat_map(|&s| sim.sides[s].apps.values().map(|a| a.written.len()))
            .sum();
        let streams: usize = [C, S].iter().map(|&s| sim.sides[s].apps.len()).sum();
        let resets: Vec<String> = [C, S]
            .iter()
            .flat_map(|&s| {
                sim.sides[s]
                    .apps
                    .values()
                    .filter_map(|a| a.reset.map(|c| format!("{c}")))
            })
            .collect();
        let resets = resets.join(",");
        eprintln!("STATS ops={} streams={streams} resets={resets} bytes={total} steps={} drained={drained}", ops.len(), sim.steps);
    }
    sim.assert_credit_respected(C);
    sim.assert_credit_respected(S);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_deliver_every_byte_in_order(setup in setup(), ops in prop::collection::vec(op(), 1..60)) {
        run(&setup, &ops);
    }

    #[test]
    fn partial_transmit_writes_deliver_every_byte_in_order(setup in setup(), ops in prop::collection::vec(op(), 1..60)) {
        run_with(&setup, &ops, true);
    }
}

// ------------------------------------------------------------ hostile input

/// A chunk of hostile input: either random bytes, or a frame with a header
/// that is mostly plausible (so the parser goes deep) and random contents.
fn hostile_chunk() -> impl Strategy<Value = Vec<u8>> {
    let frame = (
        prop_oneof![8 => 0u8..7, 1 => any::<u8>()],
        prop_oneof![8 => 0u8..2, 1 => any::<u8>()],
        prop_oneof![6 => 0u32..12, 1 => any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..600),
        prop_oneof![8 => Just(None), 1 => any::<u16>().prop_map(Some)],
    )
        .prop_map(|(kind, flags, stream, payload, len)| {
            let len = len.unwrap_or(payload.len() as u16);
            let stream = if (4..=6).contains(&kind) && stream < 12 {
                0
            } else {
                stream
            };
            let mut b = raw_header(kind, flags, len, stream);
            b.extend_from_slice(&payload);
            b
        });
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        4 => frame,
        2 => (1u32..12).prop_map(|id| open_frame(2 * id + 1)),
        1 => (1u32..12, 1u32..100_000).prop_map(|(id, n)| window_frame(id, n)),
    ]
}

fn feed_hostile(input: &[u8], chunking: &[usize], window: u32) {
    let cfg = Config {
        max_streams: 3,
        window,
        ..Config::new(Role::Server)
    };
    let mut mux = new_mux(cfg, Millis(0));
    let mut out = vec![0u8; MAX_FRAME];
    let mut parser = FrameParser::default();
    let mut held: Vec<StreamId> = Vec::new();
    let mut pos = 0;
    let mut chunk_i = 0;
    let mut stalls = 0;
    let mut now = Millis(0);
    let mut sent_goaway = false;
    while pos < input.len() {
        let want = chunking[chunk_i % chunking.len()].min(input.len() - pos);
        chunk_i += 1;
        let n = mux.handle_input(now, &input[pos..pos + want]);
        assert!(n <= want);
        pos += n;
        stalls = if n == 0 { stalls + 1 } else { 0 };
        assert!(stalls < 4, "input stalled with nothing to unblock it");
        while let Some(ev) = mux.poll_event() {
            match ev {
                tether_proto::Event::Opened(id) => {
                    assert!(mux.meta(id).is_some());
                    held.push(id);
                }
                tether_proto::Event::Control => {
                    assert!(mux.control().is_some());
                    mux.take_control();
                }
                tether_proto::Event::Reset(id, _) => {
                    mux.release(id);
                    held.retain(|h| *h != id);
                }
                _ => {}
            }
        }
        for id in &held {
            assert!(
                mux.readable_len(*id) <= window as usize,
                "buffered past the window"
            );
            let mut buf = [0u8; 3000];
            match mux.recv(*id, &mut buf) {
                Ok(Recv::Data(_) | Recv::Blocked | Recv::Fin) | Err(StreamError::Reset(_)) => {}
                Err(e) => panic!("recv on a held stream: {e}"),
            }
        }
        assert!(mux.live_streams() <= 3);
        loop {
            let w = mux.poll_transmit(&mut out);
            if w == 0 {
                break;
            }
            assert!(!sent_goaway, "frames after GOAWAY");
            for p in parser.push(&out[..w]) {
                let Parsed::Frame(f) = p else {
                    panic!("the mux transmitted a bad header: {p:?}")
                };
                if f.kind == FrameKind::GoAway {
                    sent_goaway = true;
                }
            }
            assert_eq!(parser.pending(), 0, "partial frame transmitted");
        }
        now = now.add(100);
    }
    if sent_goaway {
        assert!(mux.is_closed());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn hostile_input_never_panics_or_overflows(
        chunks in prop::collection::vec(hostile_chunk(), 1..40),
        chunking in prop::collection::vec(1usize..2_000, 1..8),
        big_window in any::<bool>(),
    ) {
        let mut input = open_frame(1);
        for c in &chunks {
            input.extend_from_slice(c);
        }
        let window = if big_window { 2 * INITIAL_WINDOW } else { INITIAL_WINDOW };
        feed_hostile(&input, &chunking, window);
    }
}
