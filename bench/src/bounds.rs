//! `tether-bench bounds`: what hostile peers can hold on the edge, and how
//! long a legitimate device takes to get in while they try (DESIGN.md
//! invariant 11, issue 6). Run it through `scripts/bench bounds`, which
//! builds the release edge and tetherd in its device profile (`min`).
//!
//! One edge (release, its default `[limits]`; `[session]` ping 1 s, dead
//! after 3 s, so that a silent session ends by the heartbeat), on 127.0.0.1,
//! measured through `/proc/PID/fd` and `VmRSS`:
//! 1. **idle**: after one warm-up session and one tetherd run;
//! 2. **1,000 idle sockets**: plain TCP connects to the agent port, one per
//!    source address (127.1.x.y, so the per-source cap refuses none of
//!    them: the total cap and the cost of each held one are measured),
//!    sending nothing; measured 1 s after the last connect (within the TLS
//!    deadline), with how many of them the edge had closed;
//! 3. **100 stalled peers**: TLS 1.3 and `Hello` with a valid token (25
//!    tokens, 4 sessions each: the per-token cap evicts none), then a burst
//!    of 2,048 PINGs whose answers they never read, with a 4 KiB receive
//!    buffer, then silence. Measured right after the last is set up (within
//!    the deadline) and once the deadline (dead_after + linger) has passed
//!    by 1 s, with the time the edge took to get back within 5 % of idle;
//! 4. **device admission**: 20 runs of tetherd spawn -> `CONNECTED` (then
//!    SIGTERM) without a flood, then 20 with the admission flood of the e2e
//!    test running (500 idle sockets reopened as the edge closes them, and 4
//!    threads of bad Hellos, all from 127.0.0.2): p50 / p99 of each. A run
//!    that takes over 15 s counts as a timeout; three in a row end the series.
//!
//! Prints a table and writes JSON (`--out`).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tether_tests::flood::{Flood, FloodConfig, FloodCounts};
use tether_tests::raw::{self, Dial, RawAgent};
use tether_tests::sys::{self, Usage};

use crate::{
    echo, jnum, json_start, make_pki, median, percentile, raise_nofile, start_edge, tetherd_args,
    token, upstream, work_dir, write_results, write_tetherd_toml, Args, Proc, Res,
};

/// Idle sockets of phase 2.
const IDLE_SOCKETS: usize = 1_000;
/// Stalled peers of phase 3.
const STALLED: usize = 100;
/// Sessions per token in phase 3 (the edge's default cap).
const SESSIONS_PER_TOKEN: usize = 4;
/// PINGs each stalled peer sends and never reads the answers of.
const STALL_PINGS: usize = 2_048;
/// Device runs per series in phase 4.
const RUNS: usize = 20;
/// A run slower than this is a timeout.
const RUN_TIMEOUT: Duration = Duration::from_secs(15);
/// The edge's `[session]` heartbeat in this bench.
const PING_MS: u64 = 1_000;
/// The edge's `[session]` dead-peer deadline in this bench.
const DEAD_AFTER_MS: u64 = 3_000;
/// The edge's default `linger_ms`.
const LINGER_MS: u64 = 2_000;
/// "Back to idle": within this share of the idle value.
const WITHIN: f64 = 0.05;

/// How the bench judges a [`Usage`] against idle and writes it out.
trait Judged {
    fn within(&self, idle: &Usage) -> bool;
    fn json(&self, idle: &Usage) -> String;
}

impl Judged for Usage {
    fn within(&self, idle: &Usage) -> bool {
        self.fds as f64 <= idle.fds as f64 * (1.0 + WITHIN)
            && self.rss as f64 <= idle.rss as f64 * (1.0 + WITHIN)
    }

    fn json(&self, idle: &Usage) -> String {
        format!(
            "{{\"fds\": {}, \"rss\": {}, \"fds_over_idle\": {}, \"rss_over_idle\": {}, \"rss_ratio\": {}}}",
            self.fds,
            self.rss,
            self.fds as i64 - idle.fds as i64,
            self.rss as i64 - idle.rss as i64,
            jnum(self.rss as f64 / idle.rss as f64)
        )
    }
}

fn kib(b: u64) -> f64 {
    b as f64 / 1024.0
}

/// A row of the memory table.
fn usage_row(t: &mut String, case: &str, u: &Usage, idle: &Usage) {
    let _ = writeln!(
        t,
        "{case:<58} {:>8} {:>12.0} {:>+9} {:>+12.0} {:>7.2}",
        u.fds,
        kib(u.rss),
        u.fds as i64 - idle.fds as i64,
        kib(u.rss) - kib(idle.rss),
        u.rss as f64 / idle.rss as f64
    );
}

/// When `pid` came back within [`WITHIN`] of `idle`: its fds, and fds and
/// RSS both, polled from `since` until both are back or `limit` passes.
#[derive(Clone, Copy, Debug, Default)]
struct Back {
    fds: Option<Duration>,
    both: Option<Duration>,
}

fn back_to_idle(pid: u32, idle: &Usage, since: Instant, limit: Duration) -> Back {
    let mut back = Back::default();
    loop {
        let u = Usage::of(pid);
        if back.fds.is_none() && u.fds as f64 <= idle.fds as f64 * (1.0 + WITHIN) {
            back.fds = Some(since.elapsed());
        }
        if u.within(idle) {
            back.both = Some(since.elapsed());
            return back;
        }
        if since.elapsed() >= limit {
            return back;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn secs(d: Option<Duration>, limit: &str) -> String {
    d.map_or(format!("never ({limit})"), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

/// Waits until the fd count of `pid` is the same three polls in a row.
fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = (sys::fd_count(pid), 0);
    while last.1 < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        let n = sys::fd_count(pid);
        last = if n == last.0 { (n, last.1 + 1) } else { (n, 0) };
    }
}

/// One device run: spawn tetherd, time it to `CONNECTED`, stop it.
fn device_run(bin: &Path, args: &[&str], log: &Path, pidfile: Option<&Path>) -> Res<Option<f64>> {
    let t0 = Instant::now();
    let mut d = Proc::spawn(bin, args, log.to_path_buf(), pidfile)?;
    let got = d.out.wait("CONNECTED", RUN_TIMEOUT);
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    d.stop();
    Ok(got.map(|_| ms))
}

/// `RUNS` device runs; None for a run that timed out. Three timeouts in a
/// row end the series early.
fn device_series(
    bin: &Path,
    args: &[&str],
    log: &Path,
    pidfile: Option<&Path>,
    what: &str,
) -> Res<Vec<Option<f64>>> {
    let mut out = Vec::new();
    for i in 0..RUNS {
        let r = device_run(bin, args, log, pidfile)?;
        match r {
            Some(ms) => eprintln!("{what} run {}/{RUNS}: CONNECTED after {ms:.1} ms", i + 1),
            None => eprintln!(
                "{what} run {}/{RUNS}: no CONNECTED within {RUN_TIMEOUT:?}",
                i + 1
            ),
        }
        out.push(r);
        if out.len() >= 3 && out.iter().rev().take(3).all(Option::is_none) {
            eprintln!("{what}: three timeouts in a row, series ended");
            break;
        }
    }
    Ok(out)
}

fn connected(v: &[Option<f64>]) -> Vec<f64> {
    v.iter().flatten().copied().collect()
}

/// Sets up one stalled peer from `source`: TLS, Hello, a burst of PINGs
/// whose answers it never reads.
fn stalled_peer(
    addr: SocketAddr,
    source: IpAddr,
    tls: &Arc<ClientConfig>,
    token: &str,
) -> Res<RawAgent> {
    let mut a = RawAgent::connect(
        Dial {
            addr,
            source: Some(source),
            rcvbuf: Some(4096),
            timeout: Duration::from_secs(5),
        },
        tls,
    )
    .map_err(|e| format!("stalled peer from {source}: connect: {e}"))?;
    match a.authenticate(token, Duration::from_secs(5)) {
        Ok(Ok(_)) => {}
        other => return Err(format!("stalled peer from {source}: no Welcome: {other:?}")),
    }
    let _ = a.set_write_timeout(Duration::from_millis(200));
    // The edge stops taking them once its answers fill the socket: fine.
    let _ = a.write_raw(&RawAgent::pings(STALL_PINGS));
    Ok(a)
}

/// Runs the benchmark (see the module doc).
pub(crate) fn run(args: Args) -> Res<()> {
    let started = Instant::now();
    raise_nofile("the bench needs about 2,000 sockets")?;
    let tmp = work_dir("tether-bench-bounds-")?;
    let dir = tmp.path();
    let pki = make_pki(dir)?;
    let edge_toml = crate::write_edge_toml(
        dir,
        &pki,
        &format!("[session]\nping_interval_ms = {PING_MS}\ndead_after_ms = {DEAD_AFTER_MS}\n"),
    )?;
    let cfg = edge_toml.to_str().ok_or("non-UTF-8 path")?;
    let device_token = token(&args.edge, cfg, &["echo"])?;
    let peer_tokens: Vec<String> = (0..STALLED.div_ceil(SESSIONS_PER_TOKEN))
        .map(|_| token(&args.edge, cfg, &["*"]))
        .collect::<Res<_>>()?;
    let pidfile = args.pidfile.as_deref();
    let (mut edge, agent) = start_edge(&args, dir, cfg)?;
    let epid = edge.pid();
    let tls = raw::client_config(&pki.ca);

    // The device: tetherd with one endpoint.
    let echo_addr = upstream(echo)?;
    let d_toml = write_tetherd_toml(
        dir,
        agent,
        &pki,
        &device_token,
        "",
        &[("echo", "tcp", echo_addr)],
    )?;
    let dargs = tetherd_args(&d_toml)?;
    let dlog = dir.join("tetherd.log");

    // 1. Idle, warm: one raw session and one device run first.
    {
        let mut a =
            RawAgent::connect(Dial::to(agent), &tls).map_err(|e| format!("warm-up: {e}"))?;
        match a.authenticate(&peer_tokens[0], Duration::from_secs(5)) {
            Ok(Ok(_)) => {}
            other => return Err(format!("warm-up session: {other:?}")),
        }
    }
    device_run(&args.tetherd, &dargs, &dlog, pidfile)?.ok_or("warm-up: tetherd did not connect")?;
    settle(epid);
    thread::sleep(Duration::from_millis(500));
    let idle = Usage::of(epid);
    eprintln!(
        "edge pid {epid}: idle {} fds, {:.0} KiB",
        idle.fds,
        kib(idle.rss)
    );

    // 2. 1,000 idle sockets, one per source.
    let sources: Vec<IpAddr> = (0..IDLE_SOCKETS)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)))
        .collect();
    let mut held: Vec<TcpStream> = Vec::new();
    for src in &sources {
        match sys::start_connect(agent, Some(*src)) {
            Ok(s) => held.push(s),
            Err(e) => eprintln!("idle socket from {src}: {e}"),
        }
    }
    thread::sleep(Duration::from_secs(1));
    let idle_socks = Usage::of(epid);
    let closed_by_edge = held.iter().filter(|s| sys::is_closed(s)).count();
    let idle_maps = sys::big_mappings_line(epid);
    eprintln!(
        "{} idle sockets: edge {} fds, {:.0} KiB; {closed_by_edge} closed by the edge",
        held.len(),
        idle_socks.fds,
        kib(idle_socks.rss)
    );
    let opened = held.len();
    drop(held);
    let released_at = Instant::now();
    let idle_socks_back = back_to_idle(epid, &idle, released_at, Duration::from_secs(10));
    let idle_socks_after = Usage::of(epid);

    // 3. 100 stalled peers.
    settle(epid);
    let setup = Instant::now();
    let peers: Vec<RawAgent> = thread::scope(|s| -> Res<Vec<RawAgent>> {
        // Four threads, each from its own source: at most one unfinished
        // handshake per source at a time.
        let hs: Vec<_> = (0..4u8)
            .map(|t| {
                let (tls, tokens) = (&tls, &peer_tokens);
                s.spawn(move || -> Res<Vec<RawAgent>> {
                    let src = IpAddr::V4(Ipv4Addr::new(127, 2, 0, t + 1));
                    (0..STALLED / 4)
                        .map(|i| {
                            let n = t as usize * (STALLED / 4) + i;
                            stalled_peer(agent, src, tls, &tokens[n / SESSIONS_PER_TOKEN])
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in hs {
            all.extend(h.join().map_err(|_| "stalled peer thread panicked")??);
        }
        Ok(all)
    })?;
    let silent = Instant::now();
    let setup_secs = (silent - setup).as_secs_f64();
    thread::sleep(Duration::from_millis(200));
    let within = Usage::of(epid);
    let within_maps = sys::big_mappings_line(epid);
    let deadline = Duration::from_millis(DEAD_AFTER_MS + LINGER_MS);
    eprintln!(
        "{} stalled peers (set up in {setup_secs:.2} s): edge {} fds, {:.0} KiB",
        peers.len(),
        within.fds,
        kib(within.rss)
    );
    thread::sleep(
        (silent + deadline + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    );
    let after = Usage::of(epid);
    let after_maps = sys::big_mappings_line(epid);
    let stalled_back = back_to_idle(epid, &idle, silent, deadline + Duration::from_secs(10));
    eprintln!(
        "after the deadline + 1 s: edge {} fds, {:.0} KiB; back within 5 % of idle: {stalled_back:?}",
        after.fds,
        kib(after.rss)
    );
    let stalled_n = peers.len();
    drop(peers);

    // 4. Device admission, without and with the flood.
    settle(epid);
    let baseline = device_series(&args.tetherd, &dargs, &dlog, pidfile, "baseline")?;
    let flood_src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let flood = Flood::start(FloodConfig::admission(agent, flood_src), tls.clone());
    let warm = Instant::now();
    // Full strength: every Hello worker came round, the edge has begun
    // closing idle sockets and the flood has reopened them for a second.
    while warm.elapsed() < Duration::from_secs(10) {
        let c = flood.counts();
        if c.hello_attempts >= 8 && c.idle_closed > 0 && warm.elapsed() >= Duration::from_secs(1) {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let before_runs = flood.counts();
    let runs_started = Instant::now();
    let flooded = device_series(&args.tetherd, &dargs, &dlog, pidfile, "flood")?;
    let runs_secs = runs_started.elapsed().as_secs_f64();
    let counts = flood.stop();
    let flood_secs = warm.elapsed().as_secs_f64();
    edge.stop();

    // ------------------------------------------------------------ report
    let (b, f) = (connected(&baseline), connected(&flooded));
    let stat = |v: &[f64], p: f64| percentile(v, p);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<58} {:>8} {:>12} {:>9} {:>12} {:>7}",
        "edge (release), default [limits]", "fds", "RSS KiB", "fds+", "RSS+ KiB", "xRSS"
    );
    usage_row(
        &mut t,
        "idle (after a warm-up session and device run)",
        &idle,
        &idle,
    );
    usage_row(
        &mut t,
        &format!("{opened} idle TCP sockets, 1 per source, at 1 s"),
        &idle_socks,
        &idle,
    );
    let _ = writeln!(
        t,
        "  {closed_by_edge} of them closed by the edge at 1 s; after we closed them, fds within 5 % of idle in {}, fds and RSS in {}",
        secs(idle_socks_back.fds, "10 s"),
        secs(idle_socks_back.both, "10 s")
    );
    usage_row(
        &mut t,
        "  ... 10 s after we closed them (or once back)",
        &idle_socks_after,
        &idle,
    );
    usage_row(
        &mut t,
        &format!("{stalled_n} stalled TLS peers (Hello ok), within the deadline"),
        &within,
        &idle,
    );
    usage_row(
        &mut t,
        &format!(
            "{stalled_n} stalled TLS peers, deadline {} ms + 1 s",
            deadline.as_millis()
        ),
        &after,
        &idle,
    );
    let pass = stalled_back
        .both
        .is_some_and(|d| d <= deadline + Duration::from_secs(1));
    let _ = writeln!(
        t,
        "  set up in {setup_secs:.2} s; after they went silent, fds within 5 % of idle in {}, fds and RSS in {}: {}",
        secs(stalled_back.fds, "15 s"),
        secs(stalled_back.both, "15 s"),
        if pass { "PASS" } else { "FAIL (aim: both within 5 % of idle by the deadline + 1 s)" }
    );
    let _ = writeln!(t, "  resident after: {after_maps}");
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "{:<58} {:>8} {:>12} {:>12} {:>9}",
        "device (tetherd min) spawn -> CONNECTED", "runs", "p50 ms", "p99 ms", "timeouts"
    );
    for (name, all, ok) in [
        ("baseline, no flood", &baseline, &b),
        (
            "flood: 500 idle sockets + bad Hellos from 127.0.0.2",
            &flooded,
            &f,
        ),
    ] {
        let _ = writeln!(
            t,
            "{name:<58} {:>8} {:>12.1} {:>12.1} {:>9}",
            ok.len(),
            stat(ok, 50.0),
            stat(ok, 99.0),
            all.len() - ok.len()
        );
    }
    let c: FloodCounts = counts;
    let _ = writeln!(
        t,
        "  flood over {flood_secs:.1} s ({runs_secs:.1} s of runs): {} idle connects ({} closed by the edge), {} bad-Hello connections, {} Hellos sent, {} refused; during the runs {} idle connects, {} bad-Hello connections",
        c.idle_connects,
        c.idle_closed,
        c.hello_attempts,
        c.hellos_sent,
        c.hellos_refused,
        c.idle_connects - before_runs.idle_connects,
        c.hello_attempts - before_runs.hello_attempts
    );
    let _ = writeln!(
        t,
        "{cpus} CPUs; load average at the end: {}; whole bench {:.0} s",
        loadavg.trim(),
        started.elapsed().as_secs_f64()
    );
    println!("{t}");

    let ms_list = |v: &[Option<f64>]| {
        let items: Vec<String> = v.iter().map(|x| x.map_or("null".into(), jnum)).collect();
        format!("[{}]", items.join(", "))
    };
    let series = |all: &[Option<f64>], ok: &[f64]| {
        format!(
            "{{\"runs\": {}, \"connected\": {}, \"timeouts\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"median_ms\": {}, \"ms\": {}}}",
            all.len(),
            ok.len(),
            all.len() - ok.len(),
            jnum(stat(ok, 50.0)),
            jnum(stat(ok, 99.0)),
            jnum(median(ok)),
            ms_list(all)
        )
    };
    let dur = |d: Option<Duration>| d.map_or("null".to_owned(), |d| jnum(d.as_secs_f64()));
    let back = |b: &Back| {
        format!(
            "{{\"fds_s\": {}, \"fds_and_rss_s\": {}}}",
            dur(b.fds),
            dur(b.both)
        )
    };
    let mut j = json_start(
        "bounds",
        cpus,
        &loadavg,
        "loopback; machine shared with other builds",
    );
    let _ = writeln!(
        j,
        "  \"settings\": {{\"edge_limits\": \"defaults\", \"ping_interval_ms\": {PING_MS}, \"dead_after_ms\": {DEAD_AFTER_MS}, \"linger_ms\": {LINGER_MS}, \"within\": {WITHIN}, \"idle_sockets\": {IDLE_SOCKETS}, \"stalled_peers\": {STALLED}, \"stall_pings\": {STALL_PINGS}, \"runs\": {RUNS}, \"run_timeout_s\": {}}},",
        RUN_TIMEOUT.as_secs()
    );
    let _ = writeln!(j, "  \"edge_idle\": {},", idle.json(&idle));
    let _ = writeln!(
        j,
        "  \"idle_sockets\": {{\"opened\": {opened}, \"sources\": {opened}, \"closed_by_edge_at_1s\": {closed_by_edge}, \"at_1s\": {}, \"back_within_5pct\": {}, \"after_close\": {}, \"resident_at_1s\": \"{idle_maps}\"}},",
        idle_socks.json(&idle),
        back(&idle_socks_back),
        idle_socks_after.json(&idle)
    );
    let _ = writeln!(
        j,
        "  \"stalled_peers\": {{\"peers\": {stalled_n}, \"setup_s\": {}, \"deadline_ms\": {}, \"within\": {}, \"after_deadline_plus_1s\": {}, \"back_within_5pct\": {}, \"back_within_deadline_plus_1s\": {pass}, \"resident_within\": \"{within_maps}\", \"resident_after\": \"{after_maps}\"}},",
        jnum(setup_secs),
        deadline.as_millis(),
        within.json(&idle),
        after.json(&idle),
        back(&stalled_back)
    );
    let _ = writeln!(
        j,
        "  \"admission\": {{\"what\": \"tetherd (min profile) spawn to CONNECTED, then SIGTERM\", \"baseline\": {}, \"flood\": {}, \"flood_counts\": {{\"secs\": {}, \"runs_secs\": {}, \"idle_connects_during_runs\": {}, \"hello_attempts_during_runs\": {}, \"idle_connects\": {}, \"idle_closed\": {}, \"hello_attempts\": {}, \"hellos_sent\": {}, \"hellos_refused\": {}}}}}\n}}",
        series(&baseline, &b),
        series(&flooded, &f),
        jnum(flood_secs),
        jnum(runs_secs),
        c.idle_connects - before_runs.idle_connects,
        c.hello_attempts - before_runs.hello_attempts,
        c.idle_connects,
        c.idle_closed,
        c.hello_attempts,
        c.hellos_sent,
        c.hellos_refused
    );
    write_results(&args.out, &j)
}
