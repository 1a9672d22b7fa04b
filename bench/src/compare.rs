//! The comparison table of `tether-bench tunnel`: direct against the tunnel
//! through two tetherd builds (the device profile, `min` unless said
//! otherwise, and `release`) on the same edge, each case interleaving the
//! three paths within every repetition. Throughput is iperf3's (module
//! [`crate::iperf`]), through the edge's tcp endpoint to an `iperf3 -s`
//! upstream behind each tetherd, direct to the same server; the latency and
//! connection figures come from the tunnel bench's own echo cases.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::iperf::{self, Mode, MODES};
use crate::{cpu_secs, jlist, jnum, med, push, Res, Route, Samples};

/// One path of the iperf3 cases: its route, its column's name, where the
/// client connects, and the tetherd it crosses (none for direct).
pub(crate) struct Path {
    pub(crate) route: Route,
    pub(crate) name: String,
    pub(crate) to: SocketAddr,
    pub(crate) tetherd: Option<u32>,
}

/// Per iperf3 mode and route: one sample per repetition.
#[derive(Default)]
pub(crate) struct Iperf {
    gbps: BTreeMap<Mode, Samples>,
    /// tetherd's utime+stime over the run per 10^9 bytes received.
    device_cpu: BTreeMap<Mode, Samples>,
    /// The edge's, likewise.
    server_cpu: BTreeMap<Mode, Samples>,
    gb: BTreeMap<Mode, Samples>,
}

/// Runs the iperf3 cases: after a 1-second warm-up on each path, `reps`
/// repetitions of every mode, each on every path in turn, `secs` seconds
/// per run; CPU of the path's tetherd and of the edge (`edge`) around each.
pub(crate) fn iperf_cases(
    paths: &[Path],
    edge: u32,
    reps: usize,
    secs: u64,
    tck: f64,
) -> Res<Iperf> {
    for p in paths {
        iperf::client(p.to, Mode::One, 1, &format!("warm-up {}", p.name))?;
    }
    let es = edge.to_string();
    let mut out = Iperf::default();
    for rep in 0..reps {
        for mode in MODES {
            for p in paths {
                let ds = p.tetherd.map(|pid| pid.to_string());
                let cpu = |ds: &Option<String>| {
                    (
                        ds.as_deref().map_or(0.0, |d| cpu_secs(d, tck)),
                        cpu_secs(&es, tck),
                    )
                };
                let (d0, e0) = cpu(&ds);
                let run = iperf::client(p.to, mode, secs, &p.name)?;
                let (d1, e1) = cpu(&ds);
                let gb = run.bytes as f64 / 1e9;
                let gbps = run.bps / 1e9;
                push(out.gbps.entry(mode).or_default(), p.route, gbps);
                push(out.gb.entry(mode).or_default(), p.route, gb);
                let mut note = String::new();
                if ds.is_some() {
                    push(
                        out.device_cpu.entry(mode).or_default(),
                        p.route,
                        (d1 - d0) / gb,
                    );
                    push(
                        out.server_cpu.entry(mode).or_default(),
                        p.route,
                        (e1 - e0) / gb,
                    );
                    note = format!(" (tetherd {:.2} s, edge {:.2} s CPU)", d1 - d0, e1 - e0);
                }
                eprintln!(
                    "rep {}/{reps} iperf3 {:<9} {:>7}: {gbps:6.2} Gbit/s, {gb:.2} GB{note}",
                    rep + 1,
                    mode.key(),
                    p.name,
                );
            }
        }
    }
    Ok(out)
}

/// Everything the table shows besides iperf3's figures.
pub(crate) struct Inputs<'a> {
    pub(crate) iperf: &'a Iperf,
    /// The two tunnel columns: route and name (`min`, `release`).
    pub(crate) cols: [(Route, &'a str); 2],
    pub(crate) rtt_p50: &'a Samples,
    pub(crate) rtt_p99: &'a Samples,
    pub(crate) conn_p50: &'a Samples,
    pub(crate) conn_p99: &'a Samples,
    pub(crate) conns_per_s: &'a Samples,
    /// Per tunnel column: tetherd's VmRSS connected and bound, before any
    /// traffic, and the edge's at the same moment (bytes).
    pub(crate) idle_rss: [(u64, u64); 2],
    /// The edge's VmRSS before any tetherd connected.
    pub(crate) edge_rss_no_session: u64,
    pub(crate) reps: usize,
    pub(crate) iperf_secs: u64,
    pub(crate) network: &'a str,
}

/// How a row's figures compare with direct.
#[derive(Clone, Copy)]
enum Kind {
    /// Higher is better: `tunnel / direct`.
    Rate,
    /// Lower is better: `tunnel / direct (+difference µs)`.
    Latency,
    /// No direct counterpart.
    Own,
}

struct Row<'a> {
    name: String,
    key: &'static str,
    unit: &'static str,
    kind: Kind,
    /// Decimals shown.
    prec: usize,
    /// direct, then the two tunnel columns.
    vals: [f64; 3],
    runs: [Option<&'a [f64]>; 3],
}

impl<'a> Row<'a> {
    /// A row of the medians of `s` on `routes` (direct first; none for
    /// [`Kind::Own`]).
    fn measured(
        routes: [Route; 3],
        key: &'static str,
        name: String,
        unit: &'static str,
        kind: Kind,
        prec: usize,
        s: &'a Samples,
    ) -> Row<'a> {
        Row {
            name,
            key,
            unit,
            kind,
            prec,
            vals: routes.map(|r| match (r, kind) {
                (Route::Direct, Kind::Own) => f64::NAN,
                _ => med(s, r),
            }),
            runs: routes.map(|r| runs(s, r)),
        }
    }
}

fn runs(s: &Samples, r: Route) -> Option<&[f64]> {
    s.get(&r).map(Vec::as_slice)
}

/// The comparison table (Markdown, columns aligned) and its JSON member
/// (`"comparison": {...}`, no trailing comma).
pub(crate) fn render(c: &Inputs) -> (String, String) {
    let [(r1, n1), (r2, n2)] = c.cols;
    let routes = [Route::Direct, r1, r2];
    let measured =
        |key, name, unit, kind, prec, s| Row::measured(routes, key, name, unit, kind, prec, s);
    let mut rows: Vec<Row> = Vec::new();
    let ip = c.iperf;
    let get = |m: &BTreeMap<Mode, Samples>, mode| m.get(&mode).cloned().unwrap_or_default();
    // The samples outlive the rows: collect them first.
    let gbps: Vec<Samples> = MODES.iter().map(|&m| get(&ip.gbps, m)).collect();
    let dcpu: Vec<Samples> = MODES.iter().map(|&m| get(&ip.device_cpu, m)).collect();
    let scpu: Vec<Samples> = MODES.iter().map(|&m| get(&ip.server_cpu, m)).collect();
    for (i, m) in MODES.iter().enumerate() {
        rows.push(measured(
            "gbps",
            format!("Gbit/s, {}", m.label()),
            "Gbit/s",
            Kind::Rate,
            2,
            &gbps[i],
        ));
    }
    for (i, m) in MODES.iter().enumerate() {
        rows.push(measured(
            "device_cpu_s_per_gb",
            format!("CPU s/GB, device (tetherd), {}", m.label()),
            "CPU s per 10^9 bytes",
            Kind::Own,
            3,
            &dcpu[i],
        ));
    }
    for (i, m) in MODES.iter().enumerate() {
        rows.push(measured(
            "server_cpu_s_per_gb",
            format!("CPU s/GB, server (edge), {}", m.label()),
            "CPU s per 10^9 bytes",
            Kind::Own,
            3,
            &scpu[i],
        ));
    }
    for (key, name, s) in [
        (
            "rtt_p50_us",
            "RTT p50, µs (64 B echo, 1 in flight)",
            c.rtt_p50,
        ),
        (
            "rtt_p99_us",
            "RTT p99, µs (64 B echo, 1 in flight)",
            c.rtt_p99,
        ),
        (
            "connect_echo_p50_us",
            "new connection + echo p50, µs",
            c.conn_p50,
        ),
        (
            "connect_echo_p99_us",
            "new connection + echo p99, µs",
            c.conn_p99,
        ),
    ] {
        rows.push(measured(key, name.into(), "µs", Kind::Latency, 1, s));
    }
    rows.push(measured(
        "connections_per_s",
        "new connections/s (one at a time)".into(),
        "1/s",
        Kind::Rate,
        0,
        c.conns_per_s,
    ));
    let kib = |b: u64| b as f64 / 1024.0;
    for (key, name, i) in [
        ("idle_rss_device_kib", "idle RSS KiB, device (tetherd)", 0),
        ("idle_rss_server_kib", "idle RSS KiB, server (edge)", 1),
    ] {
        let pick = |(d, e): (u64, u64)| kib(if i == 0 { d } else { e });
        rows.push(Row {
            name: name.into(),
            key,
            unit: "KiB",
            kind: Kind::Own,
            prec: 0,
            vals: [f64::NAN, pick(c.idle_rss[0]), pick(c.idle_rss[1])],
            runs: [None; 3],
        });
    }

    // The table.
    let header = [
        String::new(),
        "direct".into(),
        format!("tether ({n1})"),
        "÷ direct".into(),
        format!("tether ({n2})"),
        "÷ direct".into(),
    ];
    let num = |x: f64, prec: usize| {
        if x.is_finite() {
            format!("{x:.prec$}")
        } else {
            "–".into()
        }
    };
    let ratio = |row: &Row, v: f64| {
        let base = row.vals[0];
        match row.kind {
            Kind::Own => "–".into(),
            Kind::Rate => num(v / base, 3),
            Kind::Latency => format!("{} ({:+.1} µs)", num(v / base, 2), v - base),
        }
    };
    let mut cells: Vec<[String; 6]> = vec![header];
    for row in &rows {
        cells.push([
            row.name.clone(),
            num(row.vals[0], row.prec),
            num(row.vals[1], row.prec),
            ratio(row, row.vals[1]),
            num(row.vals[2], row.prec),
            ratio(row, row.vals[2]),
        ]);
    }
    let mut w = [0usize; 6];
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |r: &[String; 6]| {
        let mut s = String::from("|");
        for (i, c) in r.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i == 0 {
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            } else {
                let _ = write!(s, " {}{c} |", " ".repeat(pad));
            }
        }
        s
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "tether against direct: tetherd {n1} and {n2} builds on one edge, medians of {} runs, the three paths interleaved in each; network: {}",
        c.reps, c.network
    );
    let _ = writeln!(t, "{}", line(&cells[0]));
    let rule: Vec<String> = w
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let dashes = "-".repeat(n.max(3) - 1);
            if i == 0 {
                format!(":{dashes}")
            } else {
                format!("{dashes}:")
            }
        })
        .collect();
    let _ = writeln!(t, "| {} |", rule.join(" | "));
    for r in &cells[1..] {
        let _ = writeln!(t, "{}", line(r));
    }
    let _ = writeln!(
        t,
        "Gbit/s: iperf3 -J -t {} (end.sum_received), through the edge's tcp endpoint to iperf3 -s behind that tetherd; direct: straight to the same server.",
        c.iperf_secs
    );
    let _ = writeln!(
        t,
        "CPU s/GB: utime+stime (/proc/PID/stat) of that tetherd / of the edge over each iperf3 run, per 10^9 bytes received."
    );
    let _ = writeln!(
        t,
        "new connection + echo: connect, 64 B echo, half-close, read to EOF, close, each timed; tcp endpoint."
    );
    let _ = writeln!(
        t,
        "idle RSS: VmRSS connected with 5 endpoints bound, before any traffic; the edge's at the same moment ({n1}: its 1st session; {n2}: its 2nd; no session: {:.0} KiB).",
        kib(c.edge_rss_no_session)
    );

    // The JSON.
    let names = ["direct", n1, n2];
    let jrows: Vec<String> = rows
        .iter()
        .map(|row| {
            let mut s = format!(
                "      {{\"row\": \"{}\", \"key\": \"{}\", \"unit\": \"{}\"",
                row.name, row.key, row.unit
            );
            for (i, n) in names.iter().enumerate() {
                let v = row.vals[i];
                let _ = write!(s, ", \"{n}\": {{\"value\": {}", jnum(v));
                if i > 0 {
                    match row.kind {
                        Kind::Own => {}
                        Kind::Rate => {
                            let _ = write!(s, ", \"ratio\": {}", jnum(v / row.vals[0]));
                        }
                        Kind::Latency => {
                            let _ = write!(
                                s,
                                ", \"ratio\": {}, \"diff_us\": {}",
                                jnum(v / row.vals[0]),
                                jnum(v - row.vals[0])
                            );
                        }
                    }
                }
                if let Some(r) = row.runs[i] {
                    let _ = write!(s, ", \"runs\": {}", jlist(r));
                }
                s.push('}');
            }
            s.push('}');
            s
        })
        .collect();
    let gb_runs: Vec<String> = MODES
        .iter()
        .map(|&m| {
            let s = get(&ip.gb, m);
            let per: Vec<String> = routes
                .iter()
                .zip(names)
                .map(|(&r, n)| format!("\"{n}\": {}", jlist(runs(&s, r).unwrap_or(&[]))))
                .collect();
            format!("\"{}\": {{{}}}", m.key(), per.join(", "))
        })
        .collect();
    let j = format!(
        "  \"comparison\": {{\n    \"what\": \"direct vs tetherd {n1} and {n2} on one edge; medians over reps, paths interleaved within each\",\n    \"network\": \"{}\",\n    \"reps\": {},\n    \"iperf_secs\": {},\n    \"iperf_gb_received\": {{{}}},\n    \"edge_idle_vmrss_no_session\": {},\n    \"rows\": [\n{}\n    ]\n  }}",
        c.network,
        c.reps,
        c.iperf_secs,
        gb_runs.join(", "),
        c.edge_rss_no_session,
        jrows.join(",\n")
    );
    (t, j)
}
