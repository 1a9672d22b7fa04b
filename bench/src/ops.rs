//! `tether-bench ops`: what an operator's actions cost on the release edge
//! (issue 8). Run it through `scripts/bench ops`, which builds the release
//! edge and tetherd in its device profile (`min`). Four cases, each with a
//! baseline from the same run:
//!
//! 1. **API create / revoke**: `POST /tokens` then `POST /tokens/{id}/revoke`
//!    for `TETHER_BENCH_OPS_N` tokens (default 300) through one curl process
//!    that keeps its connection alive (`curl -K`, each transfer's
//!    `time_total`), next to `GET /healthz` on the same connection (the HTTP
//!    floor): p50 / p99 in ms.
//! 2. **Hello verification at 100,000 tokens**: two edges, one whose store
//!    holds 10 tokens and one with 100,000 (made with the store's own
//!    `create_many`); the time from `Hello` sent to `Welcome` read, over a
//!    TLS connection already up, `TETHER_BENCH_OPS_HELLOS` times (default
//!    400), the edges taking turns: p50 / p99 and the ratio of the medians.
//! 3. **Revoke to the last of 1,000 sessions closed**: 1,000 sessions of one
//!    token in this process, each a `tether_driver::Session` over TLS on one
//!    executor; then `POST /tokens/{id}/revoke` (curl), timed from just
//!    before curl starts to the moment the last session's driver saw the
//!    edge close it. Median of 3 runs, with the first close for reference.
//! 4. **A rotation round trip**: the real tetherd (min profile) with a state
//!    directory; `POST /tokens/{id}/rotate`, timed from just before curl
//!    starts to the edge's log line that retires the old token (the device
//!    stored the successor, was drained, and said `Hello` with it). 5
//!    rounds, each rotating the token the last one made.
//!
//! Prints a table and writes JSON (`--out`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncRead, AsyncWrite};
use rustls::pki_types::ServerName;
use tether_edge::scope::{Rules, Scope};
use tether_edge::store::{SqliteStore, Store as _};
use tether_proto::control::Secret;
use tether_proto::{Config, Control, Role};
use tether_tests::raw::{self, Dial, RawAgent};

use crate::{
    env_num, jnum, json_start, make_pki, median, percentile, raise_nofile, start_edge,
    start_tetherd, token, upstream, work_dir, write_edge_toml, write_results, write_tetherd_toml,
    Args, Pki, Proc, Res,
};

/// Sessions of case 3.
const SESSIONS: usize = 1_000;

/// An edge with its API: the process, its agent port, the API's URL, an
/// admin key and the config path.
struct ApiEdge {
    /// Kept to stop the edge when this is dropped.
    _proc: Proc,
    agent: SocketAddr,
    api: String,
    key: String,
    cfg: String,
    dir: std::path::PathBuf,
}

fn api_edge(args: &Args, dir: &Path, pki: &Pki, tail: &str) -> Res<ApiEdge> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let toml = write_edge_toml(
        dir,
        pki,
        &format!("[api]\nlisten = \"127.0.0.1:0\"\n\n{tail}"),
    )?;
    let cfg = toml.to_str().ok_or("non-UTF-8 path")?.to_owned();
    let key = crate::edge_cli(&args.edge, &cfg, &["apikey", "create", "--role", "admin"])?;
    let (proc, agent) = start_edge(args, dir, &cfg)?;
    let line = proc.wait_line("LISTEN api")?;
    let api = line
        .split_whitespace()
        .last()
        .ok_or("no URL in LISTEN api")?
        .to_owned();
    Ok(ApiEdge {
        _proc: proc,
        agent,
        api,
        key,
        cfg,
        dir: dir.to_path_buf(),
    })
}

/// One request of a `curl -K` batch.
struct Req<'a> {
    method: &'a str,
    path: String,
    body: Option<&'a str>,
    /// Where curl writes the answer's body.
    output: String,
}

/// Runs `reqs` through one curl process (one kept-alive connection) and
/// returns each transfer's status and `time_total` in ms.
fn curl_batch(e: &ApiEdge, reqs: &[Req<'_>]) -> Res<Vec<(u16, f64)>> {
    let header = e.dir.join("auth.h");
    std::fs::write(&header, format!("Authorization: Bearer {}\n", e.key))
        .map_err(|x| x.to_string())?;
    let mut k = String::new();
    for (i, r) in reqs.iter().enumerate() {
        if i > 0 {
            k.push_str("next\n");
        }
        let _ = writeln!(k, "url = \"{}{}\"", e.api, r.path);
        let _ = writeln!(k, "request = \"{}\"", r.method);
        let _ = writeln!(k, "header = \"@{}\"", header.display());
        if let Some(b) = r.body {
            k.push_str("header = \"Content-Type: application/json\"\n");
            let _ = writeln!(k, "data-binary = \"{}\"", b.replace('"', "\\\""));
        }
        let _ = writeln!(k, "output = \"{}\"", r.output);
        k.push_str("silent\nwrite-out = \"%{http_code} %{time_total}\\n\"\n");
    }
    let kfile = e.dir.join("batch.curl");
    std::fs::write(&kfile, k).map_err(|x| x.to_string())?;
    let out = Command::new("curl")
        .arg("-K")
        .arg(&kfile)
        .stdin(Stdio::null())
        .output()
        .map_err(|x| format!("curl: {x} (apt-get install curl)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let got: Vec<(u16, f64)> = text
        .lines()
        .filter_map(|l| {
            let (c, t) = l.split_once(' ')?;
            Some((c.parse().ok()?, t.parse::<f64>().ok()? * 1000.0))
        })
        .collect();
    if got.len() != reqs.len() {
        return Err(format!(
            "curl answered {} of {} requests: {}",
            got.len(),
            reqs.len(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(got)
}

/// One curl call; the time from just before it starts to its exit.
fn curl_once(e: &ApiEdge, method: &str, path: &str) -> Res<(u16, Duration)> {
    let t0 = Instant::now();
    let code = curl_status(&e.api, &e.key, method, path)?;
    Ok((code, t0.elapsed()))
}

/// One request by one curl process with `key`: the HTTP status (0: none).
fn curl_status(api: &str, key: &str, method: &str, path: &str) -> Res<u16> {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
        .arg("-H")
        .arg(format!("Authorization: Bearer {key}"))
        .arg(format!("{api}{path}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|x| format!("curl: {x} (apt-get install curl)"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50 and p99 of `v`.
fn p50_p99(v: &[f64]) -> (f64, f64) {
    (median(v), percentile(v, 99.0))
}

// ---------------------------------------------------------------- case 1

struct ApiTimes {
    create: Vec<f64>,
    revoke: Vec<f64>,
    health: Vec<f64>,
}

fn api_case(e: &ApiEdge, n: usize) -> Res<ApiTimes> {
    let bodies = e.dir.join("bodies");
    std::fs::create_dir_all(&bodies).map_err(|x| x.to_string())?;
    let body = r#"{"description":"bench","allow":["bench"]}"#;
    let mut reqs = Vec::new();
    for i in 0..n {
        // A health check between creates: the same connection's floor.
        reqs.push(Req {
            method: "GET",
            path: "/healthz".into(),
            body: None,
            output: "/dev/null".into(),
        });
        reqs.push(Req {
            method: "POST",
            path: "/tokens".into(),
            body: Some(body),
            output: bodies.join(format!("{i}.json")).display().to_string(),
        });
    }
    let got = curl_batch(e, &reqs)?;
    let mut t = ApiTimes {
        create: Vec::new(),
        revoke: Vec::new(),
        health: Vec::new(),
    };
    for (r, (code, ms)) in reqs.iter().zip(&got) {
        let want = if r.method == "GET" { 200 } else { 201 };
        if *code != want {
            return Err(format!("{} {}: {code}, expected {want}", r.method, r.path));
        }
        if r.method == "GET" {
            t.health.push(*ms);
        } else {
            t.create.push(*ms);
        }
    }
    let mut ids = Vec::new();
    for i in 0..n {
        let j =
            std::fs::read_to_string(bodies.join(format!("{i}.json"))).map_err(|x| x.to_string())?;
        let at = j.find("\"id\":\"tk_").ok_or("no id in a created token")? + 6;
        ids.push(j[at..at + 15].to_owned());
    }
    let reqs: Vec<Req<'_>> = ids
        .iter()
        .map(|id| Req {
            method: "POST",
            path: format!("/tokens/{id}/revoke"),
            body: Some(""),
            output: "/dev/null".into(),
        })
        .collect();
    for (code, ms) in curl_batch(e, &reqs)? {
        if code != 200 {
            return Err(format!("revoke: {code}"));
        }
        t.revoke.push(ms);
    }
    Ok(t)
}

// ---------------------------------------------------------------- case 2

/// `Hello` to `Welcome` on `agent` with `token`, after TLS is up, in ms.
fn hello_ms(agent: SocketAddr, tls: &Arc<rustls::ClientConfig>, token: &str) -> Res<f64> {
    let mut a = RawAgent::connect(Dial::to(agent), tls).map_err(|e| format!("dial: {e}"))?;
    let t0 = Instant::now();
    match a.authenticate(token, Duration::from_secs(10)) {
        Ok(Ok(_)) => Ok(ms(t0.elapsed())),
        Ok(Err(r)) => Err(format!("Hello refused: {r:?}")),
        Err(e) => Err(format!("Hello: {e}")),
    }
}

/// A store under `dir/edge-state` holding `n` tokens; returns the last one.
fn fill_store(dir: &Path, n: usize) -> Res<String> {
    let store = SqliteStore::open(&dir.join("edge-state")).map_err(|e| e.to_string())?;
    let scope = Scope {
        rules: Rules::parse(["bench"]).map_err(|e| e.to_string())?,
        sources: Vec::new(),
    };
    let mut last = String::new();
    let batch = 10_000;
    let mut made = 0;
    while made < n {
        let k = batch.min(n - made);
        let specs: Vec<(String, Scope)> = (0..k)
            .map(|i| (format!("d{}", made + i), scope.clone()))
            .collect();
        let t = store.create_many(&specs).map_err(|e| e.to_string())?;
        last = t
            .last()
            .map(|t| t.token.expose().to_owned())
            .unwrap_or_default();
        made += k;
    }
    Ok(last)
}

// ---------------------------------------------------------------- case 3

async fn session<S>(io: S, token: &str) -> Res<tether_driver::Session>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (s, driver) =
        tether_driver::Session::new(io, Config::new(Role::Client)).map_err(|e| e.to_string())?;
    async_executor_spawn(driver);
    s.send_control(&Control::Hello {
        version: tether_proto::PROTOCOL_VERSION,
        min_version: tether_proto::MIN_PROTOCOL_VERSION,
        token: Secret(token),
        agent: "tether-bench/0",
        arch: "bench",
    })
    .await
    .map_err(|e| e.to_string())?;
    let first = s.recv_control().await.ok_or("closed before Welcome")?;
    match Control::decode(&first) {
        Ok(Control::Welcome { .. }) => Ok(s),
        other => Err(format!("expected Welcome, got {other:?}")),
    }
}

thread_local! {
    static EX: std::rc::Rc<async_executor::LocalExecutor<'static>> =
        std::rc::Rc::new(async_executor::LocalExecutor::new());
}

fn async_executor_spawn<T: 'static>(f: impl std::future::Future<Output = T> + 'static) {
    EX.with(|ex| ex.spawn(f).detach());
}

/// Opens [`SESSIONS`] sessions of `token`, revokes it through the API and
/// returns (revoke call to the last close, to the first close).
fn revoke_case(e: &ApiEdge, tls: &Arc<rustls::ClientConfig>, token: &str) -> Res<(f64, f64)> {
    let id = token.split('.').next().ok_or("token")?.to_owned();
    let connector = futures_rustls::TlsConnector::from(tls.clone());
    let agent = e.agent;
    let ex = EX.with(|ex| ex.clone());
    let token = token.to_owned();
    async_io::block_on(ex.run(async move {
        let mut sessions = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            let tcp = async_io::Async::<std::net::TcpStream>::connect(agent)
                .await
                .map_err(|x| format!("connect: {x}"))?;
            let name = ServerName::try_from("localhost").map_err(|x| x.to_string())?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|x| format!("tls: {x}"))?;
            sessions.push(session(tls, &token).await?);
        }
        let closes: Vec<_> = sessions
            .iter()
            .map(|s| {
                let s = s.clone();
                EX.with(|ex| {
                    ex.spawn(async move {
                        s.closed().await;
                        Instant::now()
                    })
                })
            })
            .collect();
        // The revoke runs on a thread: this executor keeps the sessions' drivers going.
        let (code, t0) = {
            let (api, key) = (e.api.clone(), e.key.clone());
            let path = format!("/tokens/{id}/revoke");
            let t0 = Instant::now();
            let call = blocking_curl(api, key, path);
            (call.await?, t0)
        };
        if code != 200 {
            return Err(format!("revoke answered {code}"));
        }
        let mut last = t0;
        let mut first: Option<Instant> = None;
        for c in closes {
            let at = future::or(async { Some(c.await) }, async {
                async_io::Timer::after(Duration::from_secs(10)).await;
                None
            })
            .await
            .ok_or("a session was not closed within 10 s of the revoke")?;
            last = last.max(at);
            first = Some(first.map_or(at, |f| f.min(at)));
        }
        let first = first.unwrap_or(last);
        Ok((ms(last - t0), ms(first.saturating_duration_since(t0))))
    }))
}

/// [`curl_status`] on a thread of its own, awaited without blocking the
/// executor that runs the sessions' drivers.
async fn blocking_curl(api: String, key: String, path: String) -> Res<u16> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(curl_status(&api, &key, "POST", &path));
    });
    loop {
        if let Ok(c) = rx.try_recv() {
            return c;
        }
        async_io::Timer::after(Duration::from_millis(1)).await;
    }
}

// ---------------------------------------------------------------- case 4

/// Rotates `id` and waits for the edge to log its retirement; returns the
/// round trip in ms and the successor's id.
fn rotation_round(e: &ApiEdge, id: &str) -> Res<(f64, String)> {
    let log = e.dir.join("edge.log");
    let marker = format!("token {id} retired: the device authenticated with its successor ");
    let t0 = Instant::now();
    let (code, _) = curl_once(e, "POST", &format!("/tokens/{id}/rotate"))?;
    if code != 202 {
        return Err(format!("rotate answered {code}"));
    }
    loop {
        let text = std::fs::read_to_string(&log).map_err(|x| x.to_string())?;
        if let Some(at) = text.find(&marker) {
            let took = ms(t0.elapsed());
            let rest = &text[at + marker.len()..];
            let next = rest.split_whitespace().next().ok_or("successor id")?;
            return Ok((took, next.to_owned()));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "rotation of {id} not done after 20 s; edge log {}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------- main

pub(crate) fn run(args: Args) -> Res<()> {
    raise_nofile("1,000 sessions need 1,000 sockets here and at the edge")?;
    let n = env_num("TETHER_BENCH_OPS_N", 300) as usize;
    let hellos = env_num("TETHER_BENCH_OPS_HELLOS", 400) as usize;
    let work = work_dir("tether-bench-ops-")?;
    let pki = make_pki(work.path())?;
    let tls = raw::client_config(&pki.ca);

    // 1. API create / revoke.
    eprintln!("==> 1. API: {n} creates and revokes, {n} health checks");
    let e1 = api_edge(&args, &work.path().join("api"), &pki, "")?;
    let api = api_case(&e1, n)?;
    drop(e1);

    // 2. Hello verification at 10 and at 100,000 tokens.
    eprintln!("==> 2. Hello verification: a store of 10 tokens and one of 100,000");
    let small_dir = work.path().join("small");
    let big_dir = work.path().join("big");
    let small_token = fill_store(&small_dir, 10)?;
    let t = Instant::now();
    let big_token = fill_store(&big_dir, 100_000)?;
    eprintln!(
        "    100,000 tokens made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let small = api_edge(&args, &small_dir, &pki, "")?;
    let big = api_edge(&args, &big_dir, &pki, "")?;
    let (mut h10, mut h100k) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        hello_ms(small.agent, &tls, &small_token)?;
        hello_ms(big.agent, &tls, &big_token)?;
    }
    for _ in 0..hellos {
        h10.push(hello_ms(small.agent, &tls, &small_token)?);
        h100k.push(hello_ms(big.agent, &tls, &big_token)?);
    }
    drop((small, big));

    // 3. Revoke -> the last of 1,000 sessions closed.
    eprintln!("==> 3. revoke with {SESSIONS} live sessions of the token, 3 runs");
    let e3 = api_edge(
        &args,
        &work.path().join("revoke"),
        &pki,
        "[limits]\nsessions_per_token = 2000\n",
    )?;
    let mut last = Vec::new();
    let mut first = Vec::new();
    for _ in 0..3 {
        let tok = token(&args.edge, &e3.cfg, &["bench"])?;
        let (l, f) = revoke_case(&e3, &tls, &tok)?;
        eprintln!("    last close {l:.0} ms after the call (first {f:.0} ms)");
        last.push(l);
        first.push(f);
    }
    drop(e3);

    // 4. Rotation round trips with the real tetherd.
    eprintln!(
        "==> 4. rotation round trips with tetherd ({})",
        args.tetherd.display()
    );
    let e4 = api_edge(&args, &work.path().join("rotate"), &pki, "")?;
    let up = upstream(crate::echo)?;
    let ddir = work.path().join("device");
    let state = ddir.join("state");
    std::fs::create_dir_all(&state).map_err(|x| x.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
            .map_err(|x| x.to_string())?;
    }
    let dev_token = token(&args.edge, &e4.cfg, &["echo"])?;
    let toml = write_tetherd_toml(
        &ddir,
        e4.agent,
        &pki,
        &dev_token,
        "",
        &[("echo", "tcp", up)],
    )?;
    let body = std::fs::read_to_string(&toml).map_err(|x| x.to_string())?;
    std::fs::write(
        &toml,
        format!("state_directory = \"{}\"\n{body}", state.display()),
    )
    .map_err(|x| x.to_string())?;
    let (daemon, _) = start_tetherd(&args, &ddir, &toml, &["echo"])?;
    let mut id = dev_token.split('.').next().ok_or("token")?.to_owned();
    let mut rot = Vec::new();
    for _ in 0..5 {
        let (took, next) = rotation_round(&e4, &id)?;
        eprintln!("    {id} -> {next}: {took:.0} ms");
        rot.push(took);
        id = next;
        // Let the drained session finish before the next round.
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(daemon);
    drop(e4);

    // The table.
    let (c50, c99) = p50_p99(&api.create);
    let (r50, r99) = p50_p99(&api.revoke);
    let (g50, g99) = p50_p99(&api.health);
    let (s50, s99) = p50_p99(&h10);
    let (b50, b99) = p50_p99(&h100k);
    let ratio = b50 / s50;
    println!();
    println!("ops (release tether-edge; times in ms)");
    println!("{:<52} {:>9} {:>9}", "case", "p50", "p99");
    println!(
        "{:<52} {:>9.2} {:>9.2}",
        "GET /healthz (baseline: the HTTP floor)", g50, g99
    );
    println!("{:<52} {:>9.2} {:>9.2}", "POST /tokens (create)", c50, c99);
    println!(
        "{:<52} {:>9.2} {:>9.2}",
        "POST /tokens/{id}/revoke", r50, r99
    );
    println!(
        "{:<52} {:>9.2} {:>9.2}",
        "Hello -> Welcome, 10 tokens in the store", s50, s99
    );
    println!(
        "{:<52} {:>9.2} {:>9.2}",
        "Hello -> Welcome, 100,000 tokens in the store", b50, b99
    );
    println!(
        "{:<52} {:>9.2}",
        "  ratio of the medians (aim <= 1.2)", ratio
    );
    println!(
        "{:<52} {:>9.0} {:>9}",
        "revoke call -> last of 1,000 sessions closed (aim <= 1000)",
        median(&last),
        ""
    );
    println!("{:<52} {:>9.0}", "  ... -> first closed", median(&first));
    println!(
        "{:<52} {:>9.0} {:>9.0}",
        "rotation: API call -> old token retired (aim <= 2000)",
        median(&rot),
        rot.iter().copied().fold(f64::MIN, f64::max)
    );
    println!("(rotation p99 column: the slowest of {} rounds)", rot.len());

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut j = json_start(
        "ops",
        cpus,
        &load,
        "curl -K keeps one connection; Hello timed after TLS",
    );
    let _ = writeln!(
        j,
        "  \"api_ms\": {{\"health_p50\": {}, \"health_p99\": {}, \"create_p50\": {}, \"create_p99\": {}, \"revoke_p50\": {}, \"revoke_p99\": {}, \"n\": {n}}},",
        jnum(g50), jnum(g99), jnum(c50), jnum(c99), jnum(r50), jnum(r99)
    );
    let _ = writeln!(
        j,
        "  \"hello_ms\": {{\"tokens_10_p50\": {}, \"tokens_10_p99\": {}, \"tokens_100k_p50\": {}, \"tokens_100k_p99\": {}, \"ratio\": {}, \"n\": {hellos}}},",
        jnum(s50), jnum(s99), jnum(b50), jnum(b99), jnum(ratio)
    );
    let _ = writeln!(
        j,
        "  \"revoke_1000_sessions_ms\": {{\"last_median\": {}, \"first_median\": {}, \"runs\": {}}},",
        jnum(median(&last)),
        jnum(median(&first)),
        crate::jlist(&last)
    );
    let _ = writeln!(
        j,
        "  \"rotation_ms\": {{\"median\": {}, \"rounds\": {}}}\n}}",
        jnum(median(&rot)),
        crate::jlist(&rot)
    );
    write_results(&args.out, &j)
}
