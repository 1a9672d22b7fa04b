//! The draining session is bounded: `tetherd::run` in this process (so its
//! [`tetherd::Stats`] can be read) against the fake edge of `common`, which
//! drains session after session and stops reading each one first.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{daemon_config, firehose_upstream, Answer, FakeEdge, Pki, TempDir};
use tether_driver::Meta;
use tether_proto::{ErrorCode, Role};

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn repeated_drains_by_an_edge_that_stops_reading_keep_at_most_two_sessions() {
    let pki = Pki::new("tether test CA");
    // The edge grants 128 MiB per stream, more than every buffer between the
    // daemon and the edge holds: the daemon's sends back up in TCP, not in
    // credit, so a cut session cannot even write its GOAWAY.
    let mut mux = tether_proto::Config::new(Role::Server);
    mux.max_streams = 1;
    mux.window = 128 << 20;
    let edge = FakeEdge::start_with(&pki, Answer::Welcome, mux);
    let (upstream, stalled) = firehose_upstream();
    let dir = TempDir::new("drain-stall");
    let extra = "[reconnect]\ninitial_backoff_ms = 20\nmax_backoff_ms = 50\n";
    let path = daemon_config(&dir, edge.addr, &pki.ca_pem, upstream, extra);
    let config = tetherd::Config::load(&path).expect("config");

    let stats = Arc::new(tetherd::Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let daemon = {
        let (stats, stop) = (stats.clone(), stop.clone());
        std::thread::spawn(move || {
            let shutdown = async move {
                while !stop.load(Ordering::SeqCst) {
                    async_io::Timer::after(Duration::from_millis(10)).await;
                }
            };
            tetherd::run_with_stats(config, shutdown, stats)
        })
    };

    const DRAINS: usize = 4;
    let mut held = Vec::new();
    let t0 = Instant::now();
    for round in 0..DRAINS {
        let es = edge.next_session(10 * SECOND);
        // A stream from the firehose, then the edge stops reading: the
        // daemon writes until the TCP buffers on both sides are full.
        let st = async_io::block_on(es.session.open(&Meta::endpoint("web"))).expect("open");
        es.stop_reading.store(true, Ordering::SeqCst);
        stalled
            .recv_timeout(10 * SECOND)
            .unwrap_or_else(|_| panic!("round {round}: the daemon's writes never backed up"));
        assert!(
            stats.sessions_open() <= 2,
            "round {round}: {} sessions open",
            stats.sessions_open()
        );
        // Drain it: the daemon dials a new session and cuts the older
        // draining one, which cannot write its GOAWAY(CANCEL).
        es.session.goaway(ErrorCode::NO_ERROR);
        held.push((es, st));
    }
    let _live = edge.next_session(10 * SECOND);
    let took = t0.elapsed();
    assert_eq!(stats.sessions_started(), DRAINS as u64 + 1);
    assert!(
        stats.peak_sessions_open() <= 2,
        "at most the live and one draining session: peak {}",
        stats.peak_sessions_open()
    );
    // Each cut session ended within its linger (plus the margin), not later.
    assert!(
        took < (DRAINS as u32) * (tetherd::CUT_DEADLINE + 2 * SECOND),
        "{took:?}"
    );

    stop.store(true, Ordering::SeqCst);
    let result = daemon.join().expect("run did not panic");
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(stats.sessions_open(), 0, "every driver is gone after run");
}
