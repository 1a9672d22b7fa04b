//! Throughput of the sans-IO multiplexer, next to a zero-overhead baseline.
//!
//! Run with `cargo bench -p tether-proto --bench mux` (or `scripts/bench mux`).
//!
//! For 1 and for 16 concurrent streams, a client-role [`Mux`] opens the streams
//! and the application writes 16 KiB chunks into them; a server-role [`Mux`]
//! accepts them and the application reads into a 16 KiB buffer. The two are
//! pumped in memory, in this order, until every byte and every FIN is read:
//!
//! 1. the client application sends on every stream that may write (at start,
//!    and after [`Event::Writable`]) until [`StreamError::Blocked`];
//! 2. `client.transmit_with` writes the client's queue into a 64 KiB
//!    transport buffer (as the driver writes it to the pipe: straight from
//!    the queue, frames may be cut at the buffer's end and continue in the
//!    next round), then `server.handle_input` with those bytes;
//! 3. `server.poll_event`: `Opened`/`Readable` streams are read with
//!    `server.recv` into the 16 KiB read buffer;
//! 4. `server.transmit_with` (the `WINDOW` updates) into a `MAX_FRAME`
//!    buffer, then `client.handle_input`;
//! 5. `client.poll_event`: `Writable` re-arms a stream's writer.
//!
//! The BASELINE moves the same bytes through the copies a plain pipe does:
//! the application's 16 KiB chunk into a 64 KiB transport buffer, and from
//! there into the reader's 16 KiB buffer, i.e. what a framing layer with no
//! cost of its own would add. Its "framing" (which stream, how long) is kept
//! out of band for free.
//!
//! Per byte, the mux column copies four times (chunk → transmit queue →
//! transport buffer → receive buffer → read buffer) and the baseline twice
//! (chunk → transport buffer → read buffer): the two transport copies are
//! the pipe's and are in both; the queue and the receive buffer are the
//! mux's own. With copies at the same speed, 0.5 is where the mux adds
//! nothing but those two copies.
//!
//! Both sides check every byte they read against the expected content of its
//! stream at its offset (a `memcmp` against a pseudo-random pattern that
//! differs per stream and does not repeat at 16 KiB), so lost, duplicated,
//! reordered or cross-stream bytes fail the run; the check costs the same in
//! both columns.
//!
//! Environment:
//! - `TETHER_BENCH_MB`: MiB moved per case (default 256);
//! - `TETHER_BENCH_REPS`: timed repetitions per case (default 11; the median
//!   is reported), after one untimed warm-up run;
//! - `TETHER_BENCH_CHECK=0`: skip the content comparison (counts and FINs
//!   are still checked), only to measure what the check itself costs;
//! - `TETHER_BENCH_OUT`: where to write the JSON results (default
//!   `<target dir>/bench/mux.json`).

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use tether_proto::mux::{Recv, StreamError};
use tether_proto::{
    Config, Event, Millis, Mux, PeerAddr, Role, Slot, StreamId, StreamMeta, MAX_FRAME,
};

/// The application's write chunk and the reader's buffer.
const CHUNK: usize = 16 * 1024;
/// The transport buffer (client → server).
const WIRE: usize = 64 * 1024;
/// Period of the content pattern: prime, so it never lines up with a chunk.
const PERIOD: usize = 65_521;

/// Stream `s`'s byte at offset `o` is `pattern[(o + seed(s)) % PERIOD]`; the
/// pattern is stored with a `CHUNK` tail so any chunk is one slice.
struct Pattern {
    bytes: Vec<u8>,
    /// Compare content (off only with `TETHER_BENCH_CHECK=0`, to measure
    /// what the check costs; byte counts and FINs are still checked).
    check: bool,
}

impl Pattern {
    fn new(check: bool) -> Pattern {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut bytes: Vec<u8> = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let head = bytes[..CHUNK].to_vec();
        bytes.extend_from_slice(&head);
        Pattern { bytes, check }
    }

    fn seed(stream: usize) -> usize {
        (stream * 4099 + 17) % PERIOD
    }

    /// The `len` (≤ CHUNK) bytes of stream `stream` from offset `off`.
    fn slice(&self, stream: usize, off: u64, len: usize) -> &[u8] {
        let start = ((off % PERIOD as u64) as usize + Self::seed(stream)) % PERIOD;
        &self.bytes[start..start + len]
    }

    fn check(&self, stream: usize, off: u64, got: &[u8]) {
        if self.check && got != self.slice(stream, off, got.len()) {
            panic!(
                "stream {stream}: wrong bytes at offset {off}..{}",
                off + got.len() as u64
            );
        }
    }
}

/// One case: how many streams share `total` bytes.
#[derive(Clone, Copy)]
struct Case {
    streams: usize,
    total: u64,
}

impl Case {
    fn per_stream(&self, s: usize) -> u64 {
        let base = self.total / self.streams as u64;
        base + u64::from((s as u64) < self.total % self.streams as u64)
    }
}

/// Storage for one side's mux, allocated (and faulted in) once.
struct Storage {
    slots: Vec<Slot>,
    buf: Vec<u8>,
}

impl Storage {
    fn new(cfg: &Config) -> Storage {
        Storage {
            slots: vec![Slot::EMPTY; cfg.max_streams],
            buf: vec![0u8; cfg.buffer_len()],
        }
    }
    fn mux(&mut self, cfg: Config) -> Mux<&mut [Slot], &mut [u8]> {
        Mux::new(cfg, &mut self.slots[..], &mut self.buf[..], Millis(0)).expect("valid config")
    }
}

struct Writer {
    id: StreamId,
    sent: u64,
    total: u64,
    armed: bool,
    finished: bool,
}

#[derive(Clone, Copy, Default)]
struct Reader {
    got: u64,
    fin: bool,
}

/// Moves the case's bytes through a client/server pair; returns the bytes read.
fn run_mux(case: Case, pat: &Pattern, client_st: &mut Storage, server_st: &mut Storage) -> u64 {
    let now = Millis(0);
    let mut client = client_st.mux(Config::new(Role::Client));
    let mut server = server_st.mux(Config::new(Role::Server));
    let mut wire = vec![0u8; WIRE];
    let mut back = vec![0u8; MAX_FRAME];
    let mut rbuf = vec![0u8; CHUNK];

    let meta = StreamMeta {
        endpoint: "bench",
        peer: PeerAddr::Unknown,
        sni: None,
        client: None,
    };
    let mut writers: Vec<Writer> = (0..case.streams)
        .map(|s| Writer {
            id: client.open(&meta).expect("open"),
            sent: 0,
            total: case.per_stream(s),
            armed: true,
            finished: false,
        })
        .collect();
    // Client ids are 1, 3, 5, ...: stream index = (id - 1) / 2.
    let index = |id: StreamId| (id.get() as usize - 1) / 2;
    let mut readers = vec![Reader::default(); case.streams];
    let mut done = 0;
    let mut received = 0u64;
    let mut rr = 0; // round-robin start, for fairness between writers
    let mut idle = 0u32;

    while done < case.streams {
        let mut progress = false;

        // 1. The client application writes 16 KiB chunks while it may.
        for k in 0..case.streams {
            let s = (rr + k) % case.streams;
            let w = &mut writers[s];
            while w.armed && w.sent < w.total {
                let chunk_end = ((w.sent / CHUNK as u64 + 1) * CHUNK as u64).min(w.total);
                let data = pat.slice(s, w.sent, (chunk_end - w.sent) as usize);
                match client.send(w.id, data) {
                    Ok(n) => {
                        w.sent += n as u64;
                        progress = true;
                        if n < data.len() {
                            w.armed = false; // partial: the mux marked it blocked
                        }
                    }
                    Err(StreamError::Blocked) => w.armed = false,
                    Err(e) => panic!("send on {}: {e}", w.id),
                }
            }
            if w.armed && !w.finished && w.sent == w.total {
                match client.finish(w.id) {
                    Ok(()) => {
                        w.finished = true;
                        progress = true;
                    }
                    Err(StreamError::Blocked) => w.armed = false,
                    Err(e) => panic!("finish on {}: {e}", w.id),
                }
            }
        }
        rr = (rr + 1) % case.streams;

        // 2. Client → server through the 64 KiB transport buffer, written
        //    straight from the client's queue (a pipe write).
        let n = fill_from(&mut client, &mut wire);
        if n > 0 {
            progress = true;
            let mut fed = 0;
            while fed < n {
                let c = server.handle_input(now, &wire[fed..n]);
                assert!(c > 0, "server stalled on input");
                fed += c;
            }
        }

        // 3. The server application accepts and reads.
        while let Some(ev) = server.poll_event() {
            progress = true;
            let id = match ev {
                Event::Opened(id) | Event::Readable(id) => id,
                Event::Writable(_) | Event::Unblocked => continue,
                other => panic!("server: unexpected {other:?}"),
            };
            let s = index(id);
            loop {
                match server.recv(id, &mut rbuf) {
                    Ok(Recv::Data(n)) => {
                        let r = &mut readers[s];
                        pat.check(s, r.got, &rbuf[..n]);
                        r.got += n as u64;
                        received += n as u64;
                    }
                    Ok(Recv::Fin) => {
                        let r = &mut readers[s];
                        if !r.fin {
                            assert_eq!(r.got, case.per_stream(s), "stream {s}: FIN early");
                            r.fin = true;
                            done += 1;
                            // Close our side too, so the release frees the slot.
                            let _ = server.finish(id);
                            server.release(id);
                        }
                        break;
                    }
                    Ok(Recv::Blocked) => break,
                    Err(e) => panic!("server recv on {id}: {e}"),
                }
            }
        }

        // 4. Server → client: WINDOW updates (and the final FINs).
        loop {
            let n = fill_from(&mut server, &mut back);
            if n == 0 {
                break;
            }
            progress = true;
            let mut fed = 0;
            while fed < n {
                let c = client.handle_input(now, &back[fed..n]);
                assert!(c > 0, "client stalled on input");
                fed += c;
            }
        }

        // 5. The client application re-arms writers.
        while let Some(ev) = client.poll_event() {
            progress = true;
            match ev {
                Event::Writable(id) => writers[index(id)].armed = true,
                Event::Readable(id) => {
                    if let Ok(Recv::Fin) = client.recv(id, &mut rbuf) {
                        client.release(id);
                    }
                }
                Event::Unblocked => {}
                other => panic!("client: unexpected {other:?}"),
            }
        }

        if progress {
            idle = 0;
        } else {
            idle += 1;
            assert!(idle < 3, "no progress: {client:?} / {server:?}");
        }
    }
    black_box(&rbuf);
    received
}

/// Writes `mux`'s output into `buf` as a pipe write would take it (as much
/// as fits, frames cut at the end); returns the bytes written.
fn fill_from(mux: &mut Mux<&mut [Slot], &mut [u8]>, buf: &mut [u8]) -> usize {
    let mut w = 0;
    mux.transmit_with(|bytes| {
        let n = bytes.len().min(buf.len() - w);
        buf[w..w + n].copy_from_slice(&bytes[..n]);
        w += n;
        n
    });
    w
}

/// The same bytes through the copies of a plain pipe: chunk → 64 KiB
/// transport buffer → 16 KiB read buffer, with the same check.
fn run_baseline(case: Case, pat: &Pattern) -> u64 {
    let mut wire = vec![0u8; WIRE];
    let mut rbuf = vec![0u8; CHUNK];
    let totals: Vec<u64> = (0..case.streams).map(|s| case.per_stream(s)).collect();
    let mut sent = vec![0u64; case.streams];
    let mut got = vec![0u64; case.streams];
    // Out-of-band "framing": (stream, len) of each piece in the wire buffer.
    let mut pieces: Vec<(usize, usize)> = Vec::with_capacity(WIRE / CHUNK + 1);
    let mut received = 0u64;
    let mut rr = 0;
    loop {
        // Writer: fill the transport buffer with chunks, round robin.
        pieces.clear();
        let mut w = 0;
        let mut idle = 0;
        while w < WIRE && idle < case.streams {
            let s = rr;
            rr = (rr + 1) % case.streams;
            if sent[s] == totals[s] {
                idle += 1;
                continue;
            }
            idle = 0;
            let chunk_end = ((sent[s] / CHUNK as u64 + 1) * CHUNK as u64).min(totals[s]);
            let len = ((chunk_end - sent[s]) as usize).min(WIRE - w);
            wire[w..w + len].copy_from_slice(pat.slice(s, sent[s], len));
            pieces.push((s, len));
            sent[s] += len as u64;
            w += len;
        }
        if w == 0 {
            break;
        }
        black_box(&mut wire);
        // Reader: copy out into the read buffer and check.
        let mut pos = 0;
        for &(s, len) in &pieces {
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK);
                rbuf[..n].copy_from_slice(&wire[pos..pos + n]);
                black_box(&mut rbuf);
                pat.check(s, got[s], &rbuf[..n]);
                got[s] += n as u64;
                received += n as u64;
                pos += n;
                left -= n;
            }
        }
    }
    for s in 0..case.streams {
        assert_eq!(got[s], totals[s], "baseline stream {s}");
    }
    received
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// `<target dir>/bench/mux.json`: the bench binary is `<target>/<profile>/deps/mux-*`.
fn out_path() -> PathBuf {
    if let Ok(p) = std::env::var("TETHER_BENCH_OUT") {
        return PathBuf::from(p);
    }
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(PathBuf::from))
        .filter(|t| t.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    target.join("bench").join("mux.json")
}

struct CaseResult {
    name: String,
    case: Case,
    mux: Vec<f64>,
    base: Vec<f64>,
}

impl CaseResult {
    /// mux/baseline of each back-to-back pair of runs.
    fn paired(&self) -> Vec<f64> {
        self.mux
            .iter()
            .zip(&self.base)
            .map(|(m, b)| m / b)
            .collect()
    }
}

fn list(xs: &[f64]) -> String {
    let parts: Vec<String> = xs.iter().map(|x| format!("{x:.1}")).collect();
    format!("[{}]", parts.join(", "))
}

fn main() {
    let mib = env_u64("TETHER_BENCH_MB", 256).max(1);
    let reps = env_u64("TETHER_BENCH_REPS", 11).max(1) as usize;
    let check = env_u64("TETHER_BENCH_CHECK", 1) != 0;
    let pat = Pattern::new(check);
    let cfg = Config::new(Role::Client);
    let mut client_st = Storage::new(&cfg);
    let mut server_st = Storage::new(&Config::new(Role::Server));

    println!(
        "mux bench: {mib} MiB per case, {reps} runs (median), chunk {CHUNK} B, transport buffer {WIRE} B, \
         window {} B, {} slots, content check {}",
        cfg.window,
        cfg.max_streams,
        if check { "on" } else { "OFF" }
    );
    let mut results = Vec::new();
    for (name, streams) in [("1 stream", 1), ("16 streams", 16)] {
        let case = Case {
            streams,
            total: mib << 20,
        };
        // Warm-up: fault the buffers in, settle the clocks.
        let warm = Case {
            streams,
            total: case.total.min(16 << 20),
        };
        assert_eq!(
            run_mux(warm, &pat, &mut client_st, &mut server_st),
            warm.total
        );
        assert_eq!(run_baseline(warm, &pat), warm.total);
        let (mut mux, mut base) = (Vec::new(), Vec::new());
        // Interleave the two so load from elsewhere hits both alike.
        for _ in 0..reps {
            let t = Instant::now();
            let n = run_mux(case, &pat, &mut client_st, &mut server_st);
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(n, case.total, "mux lost bytes");
            mux.push(n as f64 / dt / 1e6);

            let t = Instant::now();
            let n = run_baseline(case, &pat);
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(n, case.total, "baseline lost bytes");
            base.push(n as f64 / dt / 1e6);
        }
        results.push(CaseResult {
            name: name.to_string(),
            case,
            mux,
            base,
        });
    }

    println!();
    println!(
        "{:<12} {:>10} {:>14} {:>6}   {:<16} (MB/s = 10^6 B/s, medians of {reps} runs)",
        "case", "mux MB/s", "baseline MB/s", "ratio", "paired ratios"
    );
    for r in &results {
        let (m, b) = (median(&r.mux), median(&r.base));
        let p = r.paired();
        let (lo, hi) = p
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        println!(
            "{:<12} {:>10.1} {:>14.1} {:>6.2}   {:.2} ({lo:.2}..{hi:.2})",
            r.name,
            m,
            b,
            m / b,
            median(&p)
        );
    }
    println!();
    println!("ratio: median mux / median baseline; paired: median (min..max) of mux/baseline of back-to-back runs");
    for r in &results {
        println!("{:<12} mux runs {}", r.name, list(&r.mux));
        println!("{:<12} baseline   {}", "", list(&r.base));
    }

    let mut json = String::new();
    let _ = write!(
        json,
        "{{\n  \"bench\": \"mux\",\n  \"unit\": \"MB/s (10^6 bytes per second)\",\n  \"mib_per_case\": {mib},\n  \
         \"runs\": {reps},\n  \"chunk\": {CHUNK},\n  \"transport_buffer\": {WIRE},\n  \"read_buffer\": {CHUNK},\n  \
         \"window\": {},\n  \"content_checked\": {check},\n  \"cases\": [",
        cfg.window
    );
    for (i, r) in results.iter().enumerate() {
        let (m, b) = (median(&r.mux), median(&r.base));
        let _ = write!(
            json,
            "{}\n    {{\"case\": \"{}\", \"streams\": {}, \"bytes\": {}, \"mux_mbps\": {m:.1}, \
             \"baseline_mbps\": {b:.1}, \"ratio\": {:.3}, \"paired_ratio_median\": {:.3}, \
             \"mux_runs_mbps\": {}, \"baseline_runs_mbps\": {}}}",
            if i == 0 { "" } else { "," },
            r.name,
            r.case.streams,
            r.case.total,
            m / b,
            median(&r.paired()),
            list(&r.mux),
            list(&r.base)
        );
    }
    json.push_str("\n  ]\n}\n");
    let path = out_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the JSON's directory");
    }
    std::fs::write(&path, json).expect("write the JSON results");
    println!("\nwrote {}", path.display());
}
