//! Traffic policies end to end (issue 7): the real `tether-edge` and
//! `tetherd`, a PKI made at test time, and real clients (curl, `openssl
//! s_client`, a rustls client that shows what the server sent, sockets bound
//! to 127.0.0.2 or `::1`).
//!
//! Each test starts its own edge and daemon and runs a group of checks
//! against them, so that the file stays fast on two cores. Each denied
//! connection is checked on both sides: the client got nothing (a TLS client
//! no ServerHello), and the device's upstream, which counts its connections,
//! saw none. The edge's own account, its denial summary, is read at
//! shutdown (SIGTERM) and must match what the clients met.
//!
//! PROXY protocol v2 is `proxy_protocol.rs`'s; benchmarks are `bench`'s.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tether_tests::certs::{Authority, ClientPki, Leaf, Usage};
use tether_tests::*;

const T: Duration = Duration::from_secs(20);
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const THIRD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// Denied by every edge's mandatory policy in the restrict-ips test.
const BANNED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

// ---------------------------------------------------------------------------
// The world: an edge, a daemon, one counting upstream per endpoint.

/// One `[[endpoint]]` of the daemon.
struct Ep {
    name: &'static str,
    kind: &'static str,
    /// The agent's `traffic_policy` (a one-line inline table), or "".
    policy: String,
    /// An upstream of the test's own (else a counting HTTP one).
    upstream: Option<SocketAddr>,
}

fn ep(name: &'static str, kind: &'static str) -> Ep {
    Ep {
        name,
        kind,
        policy: String::new(),
        upstream: None,
    }
}

impl Ep {
    /// Declares `on_tcp_connect = [ { actions = [ ACTIONS ] } ]`.
    fn actions(mut self, actions: &str) -> Ep {
        self.policy = format!("{{ on_tcp_connect = [ {{ actions = [ {actions} ] }} ] }}");
        self
    }

    fn upstream(mut self, a: SocketAddr) -> Ep {
        self.upstream = Some(a);
        self
    }
}

/// The files every world needs before its configs are written.
struct Base {
    tmp: tempfile::TempDir,
    pki: Pki,
    clients: ClientPki,
}

impl Base {
    fn new() -> Base {
        let tmp = tempdir();
        let pki = Pki::generate(tmp.path());
        let clients = ClientPki::generate(tmp.path());
        Base { tmp, pki, clients }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `path` as a TOML string.
    fn path(&self, p: &Path) -> String {
        toml_string(p.to_str().expect("utf-8 path"))
    }
}

struct World {
    base: Base,
    edge: Edge,
    daemon: Proc,
    ups: HashMap<&'static str, CountingUpstream>,
}

impl World {
    /// Starts the edge with `opts` and a daemon with `eps`.
    fn start(base: Base, opts: EdgeOpts, eps: Vec<Ep>) -> World {
        let cfg = write_edge_config(base.dir(), &base.pki, &opts);
        let (token, _) = Edge::create_token(&cfg, &[]);
        let edge = Edge::start(&cfg);
        // A dual-stack agent port ([::]) is dialled on 127.0.0.1.
        let agent = match edge.agent.ip().is_unspecified() {
            true => SocketAddr::new(LOCAL, edge.agent.port()),
            false => edge.agent,
        };
        let mut ups = HashMap::new();
        let daemon_eps: Vec<DaemonEndpoint> = eps
            .iter()
            .map(|e| {
                let up = e.upstream.unwrap_or_else(|| {
                    let u = CountingUpstream::http("device says hi");
                    let a = u.addr;
                    ups.insert(e.name, u);
                    a
                });
                let d = DaemonEndpoint::new(e.name, e.kind, up);
                if e.policy.is_empty() {
                    d
                } else {
                    d.with_policy(&e.policy)
                }
            })
            .collect();
        let dcfg = write_daemon_config_with(
            base.dir(),
            agent,
            &base.pki.ca,
            &token,
            &daemon_eps,
            (15_000, 45_000),
        );
        let daemon = start_daemon(&dcfg);
        World {
            base,
            edge,
            daemon,
            ups,
        }
    }

    /// Waits until the daemon printed `BOUND <name>`; the line.
    fn bound(&self, name: &str) -> String {
        let prefix = format!("BOUND {name} ");
        self.daemon.out.wait(&prefix, T).unwrap_or_else(|| {
            panic!(
                "{name} was not bound.\ndaemon: {:#?}\nedge: {:#?}",
                self.daemon.err.all(),
                self.edge.proc.err.all()
            )
        })
    }

    /// The public port of tcp endpoint `name`.
    fn tcp_port(&self, name: &str) -> SocketAddr {
        SocketAddr::new(LOCAL, bound_port(&self.bound(name)))
    }

    /// Waits for the daemon's log of the edge's `BindErr` for `name`.
    fn refused(&self, name: &str) -> String {
        let needle = format!("edge refused endpoint {name}:");
        self.daemon
            .err
            .wait_contains(&needle, T)
            .unwrap_or_else(|| {
                panic!(
                    "no BindErr for {name}.\ndaemon: {:#?}\nedge: {:#?}",
                    self.daemon.err.all(),
                    self.edge.proc.err.all()
                )
            })
    }

    /// Connections the upstream of `name` accepted.
    fn hits(&self, name: &str) -> usize {
        self.ups[name].hits()
    }

    /// The daemon's `connected to` log lines for endpoint `name`.
    fn connected(&self, name: &str) -> Vec<String> {
        let me = format!("] {name} ");
        self.daemon
            .err
            .all()
            .into_iter()
            .filter(|l| l.contains(&me) && l.contains(": connected to "))
            .collect()
    }

    /// Waits for the `n`th `connected to` line of `name` (they follow the
    /// answer by a moment).
    fn wait_connected(&self, name: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + T;
        loop {
            let c = self.connected(name);
            if c.len() >= n || Instant::now() >= deadline {
                return c;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The tls port on 127.0.0.1 (the listener may be `[::]`).
    fn tls(&self) -> SocketAddr {
        SocketAddr::new(LOCAL, self.edge.tls.port())
    }

    /// Stops the edge (SIGTERM) and sums every denial summary it logged:
    /// `"<endpoint>:<reason>" -> count`.
    fn stop_and_count_denials(&mut self) -> BTreeMap<String, u64> {
        let code = self.edge.proc.terminate(T);
        assert_eq!(code, Some(0), "edge exit: {:#?}", self.edge.proc.err.all());
        denial_counts(&self.edge.proc.err.all())
    }

    /// A rustls client trusting the edge's CA, both TLS versions, with
    /// `cert` as its client certificate.
    fn client(&self, cert: Option<&Leaf>) -> Arc<ClientConfig> {
        rustls_client(&self.base.pki.ca, cert)
    }
}

/// Sums `denied by policy in the last 10.0s: a:b=1 c:d=2` lines.
fn denial_counts(lines: &[String]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for l in lines {
        let Some(at) = l.find("denied by policy in the last ") else {
            continue;
        };
        let rest = &l[at..];
        let Some((_, parts)) = rest.split_once("s: ") else {
            continue;
        };
        for p in parts.split_whitespace() {
            let (k, n) = p.rsplit_once('=').expect("key=count");
            *m.entry(k.to_owned()).or_insert(0) += n.parse::<u64>().expect("count");
        }
    }
    m
}

fn count(m: &BTreeMap<String, u64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Clients.

/// What a client got from the edge.
#[derive(Debug)]
enum Got {
    /// The connection was closed (EOF or reset) before the server sent a
    /// byte: for TLS, before any ServerHello.
    Silent,
    /// The server spoke (a ServerHello), then the handshake or the request
    /// failed; why (read through `Debug`, in failure messages).
    Failed(#[allow(dead_code)] String),
    /// The HTTP answer from the device's upstream.
    Answer(String),
}

impl Got {
    fn is_silent(&self) -> bool {
        matches!(self, Got::Silent)
    }

    fn is_ok(&self) -> bool {
        matches!(self, Got::Answer(a) if a.starts_with("HTTP/1.1 200") && a.ends_with("device says hi"))
    }
}

fn request(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A plain HTTP GET through a tcp endpoint from `from`.
fn tcp_get(to: SocketAddr, from: IpAddr) -> Got {
    let mut s = sys::connect(to, Some(from), None, T)
        .unwrap_or_else(|e| panic!("connect {to} from {from}: {e}"));
    s.set_read_timeout(Some(T)).expect("timeout");
    // A closed peer may refuse the write already (EPIPE): nothing came back.
    let _ = s.write_all(&request("device"));
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) | Err(_) if !out.is_empty() => {
            Got::Answer(String::from_utf8_lossy(&out).into_owned())
        }
        Ok(_) => Got::Silent,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            panic!("{to} from {from}: neither answered nor closed within {T:?}")
        }
        Err(_) => Got::Silent,
    }
}

fn rustls_client(ca: &Path, cert: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(c.expect("CA cert")).expect("add CA");
    }
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots);
    let cfg = match cert {
        None => b.with_no_client_auth(),
        Some(l) => {
            let chain = CertificateDer::pem_file_iter(&l.cert)
                .expect("read cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert pem");
            let key = PrivateKeyDer::from_pem_file(&l.key).expect("key pem");
            b.with_client_auth_cert(chain, key).expect("client cert")
        }
    };
    Arc::new(cfg)
}

/// An HTTPS GET with SNI `sni` to `to` from `from` (None: the OS picks),
/// telling apart a connection closed before the server's first byte (no
/// ServerHello) from a handshake that failed after it.
fn tls_get(to: SocketAddr, from: Option<IpAddr>, sni: &str, cfg: &Arc<ClientConfig>) -> Got {
    let mut sock = sys::connect(to, from, None, T)
        .unwrap_or_else(|e| panic!("connect {to} from {from:?}: {e}"));
    sock.set_read_timeout(Some(T)).expect("timeout");
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    let mut conn = ClientConnection::new(cfg.clone(), name).expect("client connection");
    while conn.wants_write() {
        if conn.write_tls(&mut sock).is_err() {
            return Got::Silent;
        }
    }
    let mut first = vec![0u8; 32 * 1024];
    let n = match sock.read(&mut first) {
        Ok(0) => return Got::Silent,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            panic!("{to} ({sni}) from {from:?}: no answer to the ClientHello within {T:?}")
        }
        Err(_) => return Got::Silent,
    };
    let mut rd = &first[..n];
    while !rd.is_empty() {
        if let Err(e) = conn.read_tls(&mut rd) {
            return Got::Failed(e.to_string());
        }
        if let Err(e) = conn.process_new_packets() {
            return Got::Failed(e.to_string());
        }
    }
    let mut s = StreamOwned::new(conn, sock);
    if let Err(e) = s.write_all(&request(sni)) {
        return Got::Failed(e.to_string());
    }
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Got::Answer(String::from_utf8_lossy(&out).into_owned()),
        Err(_) if !out.is_empty() => Got::Answer(String::from_utf8_lossy(&out).into_owned()),
        Err(e) => Got::Failed(e.to_string()),
    }
}

/// Runs `cmd` to completion within `T`; (success, stdout, stderr).
fn run_tool(mut cmd: Command, stdin: &[u8]) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e} (curl and openssl are needed)"));
    let mut input = child.stdin.take().expect("stdin");
    let bytes = stdin.to_vec();
    // Written from a thread of its own, which ends with the child (a write
    // to a child that exited fails), so that a child that never reads its
    // input cannot block the test.
    thread::spawn(move || {
        let _ = input.write_all(&bytes);
        let _ = input.flush();
    });
    let deadline = Instant::now() + T;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// curl `https://<name>.tether.test:<port>/` resolved to 127.0.0.1, trusting
/// `ca`, with `args`; (answered 200 with the device's body, what it said).
fn curl(port: u16, name: &str, ca: &Path, args: &[&str]) -> (bool, String) {
    let host = format!("{name}.{DOMAIN}");
    let mut c = Command::new("curl");
    c.args(["-sS", "-m", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(args)
        .arg(format!("https://{host}:{port}/"));
    let (ok, out, err) = run_tool(c, b"");
    (
        ok && out == "device says hi",
        format!("stdout {out:?} stderr {err:?}"),
    )
}

/// `openssl s_client` to `<name>.tether.test` at 127.0.0.1:`port`, verifying
/// the edge against `ca`, sending a GET; (the device's 200 came back, what
/// it printed).
fn s_client(port: u16, name: &str, ca: &Path, args: &[&str]) -> (bool, String) {
    let host = format!("{name}.{DOMAIN}");
    let mut c = Command::new("openssl");
    c.args(["s_client", "-quiet", "-verify_return_error", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-servername")
        .arg(&host)
        .arg("-CAfile")
        .arg(ca)
        .args(args);
    let (_, out, err) = run_tool(c, &request(&host));
    (
        out.starts_with("HTTP/1.1 200") && out.ends_with("device says hi"),
        format!("stdout {out:?} stderr {err:?}"),
    )
}

/// `--cert X --key Y` for curl, `-cert X -key Y` for s_client.
fn cert_args(l: &Leaf, dashes: &str) -> Vec<String> {
    vec![
        format!("{dashes}cert"),
        l.cert.display().to_string(),
        format!("{dashes}key"),
        l.key.display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The SHA-256 fingerprint of a PEM certificate, lowercase hex (openssl's
/// own reading, not ours).
fn sha256_of(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .expect("openssl x509");
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_once('=')
        .expect("fingerprint")
        .1
        .trim()
        .replace(':', "")
        .to_ascii_lowercase()
}

/// Whether a connection from `from` to `to` that sends nothing is closed by
/// the server within `within` (a TLS server would wait for a ClientHello).
fn closed_unprompted(to: SocketAddr, from: IpAddr, within: Duration) -> bool {
    let mut s = sys::connect(to, Some(from), None, T).expect("connect");
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
    }
}

fn restrict(allow: &[&str], deny: &[&str], enforce: bool) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{{ type = \"restrict-ips\", config = {{ allow = [{}], deny = [{}], enforce = {enforce} }} }}",
        list(allow),
        list(deny)
    )
}

// ---------------------------------------------------------------------------
// restrict-ips

#[test]
fn restrict_ips_close_denied_sources_before_a_byte_reaches_the_device() {
    let base = Base::new();
    // The shared tls port listens dual-stack: IPv4 clients arrive there as
    // IPv4-mapped IPv6 sources. The tcp ports are plain IPv4.
    let opts = EdgeOpts {
        tls_listen: Some("[::]:0".into()),
        extra_toml: r#"
[[traffic_policy.on_tcp_connect]]
name = "edge-wide"
[[traffic_policy.on_tcp_connect.actions]]
type = "restrict-ips"
config = { deny = ["127.0.0.9"] }

[[endpoint_policy."allow-one".on_tcp_connect]]
actions = [{ type = "restrict-ips", config = { allow = ["127.0.0.1/32"] } }]
"#
        .into(),
        ..EdgeOpts::default()
    };
    let mut w = World::start(
        base,
        opts,
        vec![
            ep("allow-one", "tcp"),
            ep("deny-one", "tcp").actions(&restrict(&[], &["127.0.0.2"], true)),
            ep("deny-wins", "tcp").actions(&restrict(&["127.0.0.0/8"], &["127.0.0.2/32"], true)),
            ep("dry-run", "tcp").actions(&restrict(&[], &["127.0.0.2"], false)),
            ep("open", "tcp"),
            ep("v6-only", "tls").actions(&restrict(&["::1/128"], &[], true)),
            ep("v4-only", "tls").actions(&restrict(&["127.0.0.1"], &[], true)),
        ],
    );
    assert!(
        w.edge.tls.ip().is_unspecified() && w.edge.tls.is_ipv6(),
        "the tls port should listen on [::]: {}",
        w.edge.tls
    );
    for n in ["v6-only", "v4-only"] {
        w.bound(n);
    }

    // An edge-endpoint allow list of one /32: the rest is denied.
    let a = w.tcp_port("allow-one");
    assert!(tcp_get(a, LOCAL).is_ok());
    for from in [OTHER, THIRD] {
        let got = tcp_get(a, from);
        assert!(got.is_silent(), "allow-one from {from}: {got:?}");
    }
    assert_eq!(w.hits("allow-one"), 1, "the device saw a denied connection");

    // A deny list of one bare address (a /32); the rest passes.
    let d = w.tcp_port("deny-one");
    assert!(tcp_get(d, OTHER).is_silent(), "deny-one from 127.0.0.2");
    assert!(tcp_get(d, LOCAL).is_ok());
    assert!(tcp_get(d, THIRD).is_ok());
    assert_eq!(w.hits("deny-one"), 2);

    // Deny wins over an allow that covers the source.
    let dw = w.tcp_port("deny-wins");
    assert!(tcp_get(dw, OTHER).is_silent(), "deny-wins from 127.0.0.2");
    assert!(tcp_get(dw, THIRD).is_ok());
    assert_eq!(w.hits("deny-wins"), 1);

    // enforce = false: the would-be denial passes (and is counted below).
    let dr = w.tcp_port("dry-run");
    let got = tcp_get(dr, OTHER);
    assert!(got.is_ok(), "dry-run from 127.0.0.2 must pass: {got:?}");
    assert_eq!(w.hits("dry-run"), 1);

    // The mandatory (edge-wide) policy applies on an endpoint with none of
    // its own, at tcp accept.
    let o = w.tcp_port("open");
    assert!(tcp_get(o, BANNED).is_silent(), "open from 127.0.0.9");
    assert!(tcp_get(o, LOCAL).is_ok());
    assert_eq!(w.hits("open"), 1);

    // On the tls port the edge-wide rule runs at accept, before any byte
    // is read: the connection is closed without the client sending a thing,
    // while an admitted one is left waiting for its ClientHello.
    assert!(
        closed_unprompted(w.tls(), BANNED, Duration::from_secs(1)),
        "the tls port did not close 127.0.0.9 at accept"
    );
    assert!(
        !closed_unprompted(w.tls(), LOCAL, Duration::from_millis(300)),
        "the tls port closed an allowed client that had sent nothing yet"
    );

    // A name the edge does not serve: closed after the ClientHello too.
    let got = tls_get(w.tls(), Some(LOCAL), "nope.tether.test", &w.client(None));
    assert!(got.is_silent(), "unknown SNI: {got:?}");

    // An IPv6 /128 allow list on a tls endpoint: ::1 passes; 127.0.0.1,
    // which arrives as ::ffff:127.0.0.1, is an IPv4 source and is denied
    // after its ClientHello, before any ServerHello.
    let v6 = SocketAddr::new(V6, w.edge.tls.port());
    let none = w.client(None);
    let got = tls_get(v6, Some(V6), "v6-only.tether.test", &none);
    assert!(got.is_ok(), "v6-only from ::1: {got:?}");
    let got = tls_get(w.tls(), Some(LOCAL), "v6-only.tether.test", &none);
    assert!(got.is_silent(), "v6-only from 127.0.0.1: {got:?}");
    let (ok, said) = curl(
        w.edge.tls.port(),
        "v6-only",
        &w.base.pki.ca,
        &["--interface", "127.0.0.1"],
    );
    assert!(!ok, "curl from 127.0.0.1 reached v6-only: {said}");
    assert_eq!(w.hits("v6-only"), 1);
    let seen = w.wait_connected("v6-only", 1);
    assert!(seen[0].contains("from [::1]:"), "{seen:?}");

    // IPv4-mapped sources match as IPv4: an allow of 127.0.0.1 lets in a
    // v4 client of the dual-stack port and a client that dials
    // ::ffff:127.0.0.1 itself; 127.0.0.2 and ::1 are denied.
    let got = tls_get(w.tls(), Some(LOCAL), "v4-only.tether.test", &none);
    assert!(got.is_ok(), "v4-only from 127.0.0.1: {got:?}");
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", w.edge.tls.port())
        .parse()
        .expect("mapped addr");
    let got = tls_get(mapped, None, "v4-only.tether.test", &none);
    assert!(got.is_ok(), "v4-only via ::ffff:127.0.0.1: {got:?}");
    let (ok, said) = curl(
        w.edge.tls.port(),
        "v4-only",
        &w.base.pki.ca,
        &["--interface", "127.0.0.1"],
    );
    assert!(ok, "curl from 127.0.0.1 to v4-only: {said}");
    let got = tls_get(w.tls(), Some(OTHER), "v4-only.tether.test", &none);
    assert!(got.is_silent(), "v4-only from 127.0.0.2: {got:?}");
    let (ok, said) = curl(
        w.edge.tls.port(),
        "v4-only",
        &w.base.pki.ca,
        &["--interface", "127.0.0.2"],
    );
    assert!(!ok, "curl from 127.0.0.2 reached v4-only: {said}");
    let got = tls_get(v6, Some(V6), "v4-only.tether.test", &none);
    assert!(got.is_silent(), "v4-only from ::1: {got:?}");
    assert_eq!(w.hits("v4-only"), 3);
    // The edge saw (and passed on) the mapped source: the v4 rule matched it.
    let seen = w.wait_connected("v4-only", 3);
    assert!(
        seen.iter().all(|l| l.contains("from [::ffff:127.0.0.1]:")),
        "{seen:#?}"
    );

    // The edge counted every denial per endpoint and reason, and logged
    // them as a summary, not one line per connection.
    let err = w.edge.proc.err.clone();
    let d = w.stop_and_count_denials();
    let expect = [
        ("allow-one:ip-denied", 2),
        ("deny-one:ip-denied", 1),
        ("deny-wins:ip-denied", 1),
        ("dry-run:ip-would-deny", 1),
        ("dry-run:ip-denied", 0),
        ("open:ip-denied", 1),
        ("-:ip-denied", 1),
        ("-:sni-unknown", 1),
        ("v6-only:ip-denied", 2),
        ("v4-only:ip-denied", 3),
    ];
    for (k, n) in expect {
        assert_eq!(count(&d, k), n, "{k} in {d:?}");
    }
    let mentions = err.count("127.0.0.2");
    assert!(
        mentions == 0,
        "the edge logged denied connections one by one: {:#?}",
        err.all()
    );
}

// ---------------------------------------------------------------------------
// Mutual TLS

#[test]
fn mutual_tls_requires_a_verified_allowed_certificate_and_tetherd_logs_it() {
    let base = Base::new();
    let ca = base.path(&base.clients.ca.pem);
    let inline_ca = toml_string(&base.clients.ca.pem_text());
    let opts = EdgeOpts {
        extra_toml: format!(
            r#"
[[endpoint_policy."mtls".on_tcp_connect]]
actions = [{{ type = "terminate-tls", config = {{ mutual_tls_certificate_authorities = [{ca}], mutual_tls_verification_strategy = "require-and-verify", mutual_tls_allowed_names = ["{allowed}"] }} }}]
"#,
            allowed = ClientPki::ALLOWED
        ),
        ..EdgeOpts::default()
    };
    let w = World::start(
        base,
        opts,
        vec![
            ep("mtls", "tls"),
            // The agent's own mTLS, its CA inline, asking without requiring.
            ep("req", "tls").actions(&format!(
                "{{ type = \"terminate-tls\", config = {{ mutual_tls_certificate_authorities = [{inline_ca}], mutual_tls_verification_strategy = \"request\" }} }}"
            )),
        ],
    );
    w.bound("mtls");
    w.bound("req");
    let port = w.edge.tls.port();
    let edge_ca = w.base.pki.ca.clone();
    let c = &w.base.clients;
    let refused: [(&str, Option<&Leaf>); 4] = [
        ("no certificate", None),
        ("another CA's", Some(&c.foreign)),
        ("an expired one", Some(&c.expired)),
        ("a name not allowed", Some(&c.wrong_name)),
    ];
    for (what, cert) in refused {
        let args = cert.map(|l| cert_args(l, "--")).unwrap_or_default();
        let (ok, said) = curl(port, "mtls", &edge_ca, &strs(&args));
        assert!(!ok, "curl with {what} passed mtls: {said}");
        let args = cert.map(|l| cert_args(l, "-")).unwrap_or_default();
        let (ok, said) = s_client(port, "mtls", &edge_ca, &strs(&args));
        assert!(!ok, "s_client with {what} passed mtls: {said}");
    }
    assert_eq!(w.hits("mtls"), 0, "a refused client reached the device");

    let (ok, said) = curl(port, "mtls", &edge_ca, &strs(&cert_args(&c.valid, "--")));
    assert!(ok, "curl with a valid certificate: {said}");
    let (ok, said) = s_client(port, "mtls", &edge_ca, &strs(&cert_args(&c.valid, "-")));
    assert!(ok, "s_client with a valid certificate: {said}");
    assert_eq!(w.hits("mtls"), 2);
    // tetherd logs the identity the edge verified: subject, names and the
    // leaf's SHA-256 (as openssl computes it).
    let lines = w.wait_connected("mtls", 2);
    let want = format!(
        "client certificate subject CN={n}, names DNS:{n}, sha256 {fp}",
        n = ClientPki::VALID_NAME,
        fp = sha256_of(&c.valid.cert)
    );
    assert_eq!(lines.len(), 2, "{:#?}", w.daemon.err.all());
    for l in &lines {
        assert!(l.contains(&want), "{l:?} lacks {want:?}");
    }

    // `request`: no certificate passes (the device is told there was none);
    // a presented one must verify.
    let (ok, said) = curl(port, "req", &edge_ca, &[]);
    assert!(ok, "curl without a certificate to req: {said}");
    let (ok, said) = s_client(port, "req", &edge_ca, &[]);
    assert!(ok, "s_client without a certificate to req: {said}");
    let (ok, said) = curl(port, "req", &edge_ca, &strs(&cert_args(&c.valid, "--")));
    assert!(ok, "curl with a valid certificate to req: {said}");
    let (ok, said) = curl(port, "req", &edge_ca, &strs(&cert_args(&c.foreign, "--")));
    assert!(!ok, "curl with another CA's certificate passed req: {said}");
    let (ok, said) = s_client(port, "req", &edge_ca, &strs(&cert_args(&c.expired, "-")));
    assert!(
        !ok,
        "s_client with an expired certificate passed req: {said}"
    );
    assert_eq!(w.hits("req"), 3);
    let lines = w.wait_connected("req", 3);
    let with: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("client certificate"))
        .collect();
    assert_eq!(with.len(), 1, "{lines:#?}");
    assert!(with[0].contains(&want), "{:?}", with[0]);

    let mut w = w;
    let d = w.stop_and_count_denials();
    for (k, n) in [
        ("mtls:client-cert-missing", 2),
        ("mtls:client-cert-invalid", 4),
        ("mtls:client-name-denied", 2),
        ("req:client-cert-invalid", 2),
        ("req:client-cert-missing", 0),
    ] {
        assert_eq!(count(&d, k), n, "{k} in {d:?}");
    }
}

// ---------------------------------------------------------------------------
// TLS versions

#[test]
fn tls_versions_are_1_3_unless_an_operator_lowers_the_floor() {
    let base = Base::new();
    let opts = EdgeOpts {
        extra_toml: r#"
[[endpoint_policy."*-legacy".on_tcp_connect]]
actions = [{ type = "terminate-tls", config = { min_version = "1.2", max_version = "1.3" } }]
"#
        .into(),
        ..EdgeOpts::default()
    };
    let lower = r#"{ type = "terminate-tls", config = { min_version = "1.2" } }"#;
    let raise = r#"{ type = "terminate-tls", config = { min_version = "1.3" } }"#;
    let mtls = format!(
        "{{ type = \"terminate-tls\", config = {{ mutual_tls_certificate_authorities = [{}] }} }}",
        toml_string(&base.clients.ca.pem_text())
    );
    let mut w = World::start(
        base,
        opts,
        vec![
            ep("web", "tls"),
            // An agent cannot lower the edge's floor...
            ep("agent-low", "tls").actions(lower),
            // ...an operator can (a suffix key) ...
            ep("a-legacy", "tls"),
            // ...and an agent can raise it again.
            ep("b-legacy", "tls").actions(raise),
            // The operator's 1.2 and the agent's client certificates.
            ep("m-legacy", "tls").actions(&mtls),
        ],
    );
    for n in ["web", "agent-low", "a-legacy", "b-legacy", "m-legacy"] {
        w.bound(n);
    }
    let port = w.edge.tls.port();
    let ca = w.base.pki.ca.clone();
    for name in ["web", "agent-low", "b-legacy"] {
        let (ok, said) = s_client(port, name, &ca, &["-tls1_2"]);
        assert!(!ok, "s_client -tls1_2 passed {name}: {said}");
        assert!(
            said.contains("protocol version") || said.contains("handshake failure"),
            "{name}: s_client -tls1_2 failed for another reason: {said}"
        );
        let (ok, said) = s_client(port, name, &ca, &["-tls1_3"]);
        assert!(ok, "s_client -tls1_3 to {name}: {said}");
    }
    let (ok, said) = s_client(port, "a-legacy", &ca, &["-tls1_2"]);
    assert!(ok, "s_client -tls1_2 to a-legacy: {said}");
    let (ok, said) = s_client(port, "a-legacy", &ca, &["-tls1_3"]);
    assert!(ok, "s_client -tls1_3 to a-legacy: {said}");
    let (ok, said) = curl(port, "a-legacy", &ca, &["--tlsv1.2", "--tls-max", "1.2"]);
    assert!(ok, "curl TLS 1.2 to a-legacy: {said}");
    let (ok, said) = curl(port, "web", &ca, &["--tlsv1.2", "--tls-max", "1.2"]);
    assert!(!ok, "curl TLS 1.2 passed web: {said}");
    // Client certificates over TLS 1.2 (another code path in the handshake).
    let valid = w.base.clients.valid.clone();
    let mut args = cert_args(&valid, "-");
    args.push("-tls1_2".into());
    let (ok, said) = s_client(port, "m-legacy", &ca, &strs(&args));
    assert!(
        ok,
        "s_client -tls1_2 with a valid certificate to m-legacy: {said}"
    );
    let (ok, said) = s_client(port, "m-legacy", &ca, &["-tls1_2"]);
    assert!(
        !ok,
        "s_client -tls1_2 without a certificate passed m-legacy: {said}"
    );
    let lines = w.wait_connected("m-legacy", 1);
    assert!(
        lines.len() == 1 && lines[0].contains(&format!("subject CN={}", ClientPki::VALID_NAME)),
        "{lines:#?}"
    );
    for (n, hits) in [
        ("web", 1),
        ("agent-low", 1),
        ("b-legacy", 1),
        ("a-legacy", 3),
        ("m-legacy", 1),
    ] {
        assert_eq!(w.hits(n), hits, "{n}");
    }
    let d = w.stop_and_count_denials();
    for (k, n) in [
        ("web:tls-version", 2),
        ("agent-low:tls-version", 1),
        ("b-legacy:tls-version", 1),
        ("a-legacy:tls-version", 0),
        ("m-legacy:client-cert-missing", 1),
    ] {
        assert_eq!(count(&d, k), n, "{k} in {d:?}");
    }
}

// ---------------------------------------------------------------------------
// The conjunction, and policies that do not parse

#[test]
fn an_agent_policy_only_narrows_and_a_broken_one_is_a_bind_error_naming_the_field() {
    let base = Base::new();
    let ca = base.path(&base.clients.ca.pem);
    let ca_path_for_agent = base.path(&base.clients.ca.pem);
    let opts = EdgeOpts {
        extra_toml: format!(
            r#"
[[traffic_policy.on_tcp_connect]]
actions = [{{ type = "restrict-ips", config = {{ deny = ["127.0.0.2"] }} }}]

[[endpoint_policy."*-cam".on_tcp_connect]]
actions = [{{ type = "terminate-tls", config = {{ mutual_tls_certificate_authorities = [{ca}] }} }}]
"#
        ),
        ..EdgeOpts::default()
    };
    let everyone = restrict(&["0.0.0.0/0", "::/0"], &[], true);
    let w = World::start(
        base,
        opts,
        vec![
            // Allows every source, asks for no client certificate, and
            // names TLS 1.2 as its floor.
            ep("front-cam", "tls").actions(&format!(
                "{everyone}, {{ type = \"terminate-tls\", config = {{ min_version = \"1.2\" }} }}"
            )),
            ep("wide-open", "tcp").actions(&everyone),
            ep("plain", "tls"),
            ep("bad-cidr", "tcp").actions(r#"{ type = "restrict-ips", config = { allow = ["10.0.0.300/8"] } }"#),
            ep("bad-type", "tcp").actions(r#"{ type = "allow-all", config = {} }"#),
            ep("bad-field", "tcp").actions(r#"{ type = "restrict-ips", config = { alow = ["10.0.0.0/8"] } }"#),
            ep("tls-on-tcp", "tcp").actions(r#"{ type = "terminate-tls", config = {} }"#),
            ep("no-version", "tls").actions(
                r#"{ type = "terminate-tls", config = { min_version = "1.2", max_version = "1.2" } }"#,
            ),
            ep("ca-file", "tls").actions(&format!(
                "{{ type = \"terminate-tls\", config = {{ mutual_tls_certificate_authorities = [{ca_path_for_agent}] }} }}"
            )),
            ep("any-cert", "tls").actions(
                r#"{ type = "terminate-tls", config = { mutual_tls_verification_strategy = "require-any" } }"#,
            ),
        ],
    );
    // The agent's other endpoints are bound, whatever its broken ones say.
    for n in ["front-cam", "wide-open", "plain"] {
        w.bound(n);
    }
    let refusals = [
        ("bad-cidr", "traffic_policy.on_tcp_connect[0].actions[0].config.allow", "not an address or a CIDR"),
        ("bad-type", "traffic_policy.on_tcp_connect[0].actions[0]", "allow-all"),
        ("bad-field", "traffic_policy.on_tcp_connect[0].actions[0].config", "alow"),
        ("tls-on-tcp", "traffic_policy", "terminate-tls"),
        ("no-version", "edge and agent policies", "no TLS version"),
        (
            "ca-file",
            "traffic_policy.on_tcp_connect[0].actions[0].config.mutual_tls_certificate_authorities[0]",
            "inline",
        ),
        ("any-cert", "traffic_policy.on_tcp_connect[0].actions[0]", "without verifying"),
    ];
    for (name, field, why) in refusals {
        let line = w.refused(name);
        assert!(
            line.contains(&format!("by rule `{field}")),
            "{name}: the rule should start with {field}: {line}"
        );
        assert!(line.contains(why), "{name}: {line} lacks {why:?}");
    }
    let stdout = w.daemon.out.all();
    for (name, ..) in refusals {
        assert!(
            !stdout
                .iter()
                .any(|l| l.starts_with(&format!("BOUND {name} "))),
            "{name} was published: {stdout:?}"
        );
    }

    // The edge's deny of 127.0.0.2 holds against the agent's allow-all, at
    // accept on both ports.
    let port = w.edge.tls.port();
    let edge_ca = w.base.pki.ca.clone();
    let valid = w.base.clients.valid.clone();
    let with_cert = w.client(Some(&valid));
    let got = tls_get(w.tls(), Some(OTHER), "front-cam.tether.test", &with_cert);
    assert!(got.is_silent(), "front-cam from 127.0.0.2: {got:?}");
    let mut args = cert_args(&valid, "--");
    args.extend(["--interface".into(), "127.0.0.2".into()]);
    let (ok, said) = curl(port, "front-cam", &edge_ca, &strs(&args));
    assert!(!ok, "curl from 127.0.0.2 reached front-cam: {said}");
    let wide = w.tcp_port("wide-open");
    assert!(tcp_get(wide, OTHER).is_silent(), "wide-open from 127.0.0.2");
    assert!(tcp_get(wide, LOCAL).is_ok());

    // The edge's mTLS holds against the agent's policy without one.
    let (ok, said) = curl(port, "front-cam", &edge_ca, &[]);
    assert!(!ok, "curl without a certificate reached front-cam: {said}");
    let (ok, said) = s_client(port, "front-cam", &edge_ca, &[]);
    assert!(
        !ok,
        "s_client without a certificate reached front-cam: {said}"
    );
    // The agent's 1.2 does not lower the floor.
    let (ok, said) = s_client(
        port,
        "front-cam",
        &edge_ca,
        &strs(&[cert_args(&valid, "-"), vec!["-tls1_2".into()]].concat()),
    );
    assert!(!ok, "s_client -tls1_2 reached front-cam: {said}");
    // What every layer allows passes.
    let (ok, said) = curl(port, "front-cam", &edge_ca, &strs(&cert_args(&valid, "--")));
    assert!(ok, "curl with a valid certificate to front-cam: {said}");
    assert_eq!(w.hits("front-cam"), 1);
    assert_eq!(w.hits("wide-open"), 1);
    // The edge itself did not stop over the refused binds.
    let mut w = w;
    assert!(w.edge.proc.is_running());
    let (ok, said) = curl(port, "plain", &edge_ca, &[]);
    assert!(ok, "plain: {said}");
    let d = w.stop_and_count_denials();
    assert_eq!(count(&d, "-:ip-denied"), 2, "{d:?}");
    assert_eq!(count(&d, "wide-open:ip-denied"), 1, "{d:?}");
    assert_eq!(count(&d, "front-cam:client-cert-missing"), 2, "{d:?}");
    assert_eq!(count(&d, "front-cam:tls-version"), 1, "{d:?}");
}

/// Writes an edge.toml with `extra` appended and runs `tether-edge` on it:
/// (exit code, stderr, the file's path, the 1-based line holding `marker`).
fn broken_edge(name: &str, extra: &str, marker: &str) -> (Option<i32>, String, PathBuf, usize) {
    let tmp = tempdir();
    let pki = Pki::generate(tmp.path());
    let sub = tmp.path().join(name);
    std::fs::create_dir_all(&sub).expect("dir");
    let cfg = write_edge_config(
        &sub,
        &pki,
        &EdgeOpts {
            extra_toml: extra.to_owned(),
            ..EdgeOpts::default()
        },
    );
    let body = std::fs::read_to_string(&cfg).expect("read edge.toml");
    // Searched in the appended part only (the directory's name is in the
    // paths above it).
    let before = body.lines().count() - extra.lines().count();
    let line = body
        .lines()
        .skip(before)
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("{marker:?} not in {extra}"))
        + before
        + 1;
    let (code, _, err) = run(
        "tether-edge",
        &["--config", cfg.to_str().expect("utf-8"), "serve"],
    );
    // Keep the directory alive until the edge has read it.
    drop(tmp);
    (code, err, cfg, line)
}

#[test]
fn a_broken_edge_policy_exits_64_naming_file_line_and_field() {
    let empty = tempdir();
    let no_cert = empty.path().join("no-cert.pem");
    std::fs::write(&no_cert, "not a certificate\n").expect("write");
    let cases = [
        (
            "cidr",
            "\n[[traffic_policy.on_tcp_connect]]\nactions = [{ type = \"restrict-ips\", config = { allow = [\"10.0.0.300/8\"] } }]\n".to_owned(),
            "10.0.0.300/8",
            "traffic_policy.on_tcp_connect[0].actions[0].config.allow",
            "not an address or a CIDR",
        ),
        (
            "versions",
            "\n[[endpoint_policy.\"web\".on_tcp_connect]]\n[[endpoint_policy.\"web\".on_tcp_connect.actions]]\ntype = \"terminate-tls\"\nconfig = { min_version = \"1.3\", max_version = \"1.2\" }\n".to_owned(),
            "max_version",
            "endpoint_policy.web.on_tcp_connect[0].actions[0].config.max_version",
            "below min_version",
        ),
        (
            "require-any",
            "\n[[endpoint_policy.\"web\".on_tcp_connect]]\nactions = [{ type = \"terminate-tls\", config = { mutual_tls_verification_strategy = \"require-any\" } }]\n".to_owned(),
            "require-any",
            "endpoint_policy.web.on_tcp_connect[0].actions[0]",
            "without verifying",
        ),
        (
            "type",
            "\n[[traffic_policy.on_tcp_connect]]\nactions = [{ type = \"allow-all\", config = {} }]\n".to_owned(),
            "allow-all",
            "traffic_policy.on_tcp_connect[0].actions[0]",
            "allow-all",
        ),
        (
            "ca-file",
            format!(
                "\n[[traffic_policy.on_tcp_connect]]\nactions = [{{ type = \"terminate-tls\", config = {{ mutual_tls_certificate_authorities = [{}] }} }}]\n",
                toml_string(no_cert.to_str().expect("utf-8"))
            ),
            "no-cert.pem",
            "traffic_policy.on_tcp_connect[0].actions[0].config.mutual_tls_certificate_authorities[0]",
            "no PEM certificate",
        ),
        (
            "key",
            "\n[[endpoint_policy.\"*\".on_tcp_connect]]\nactions = [{ type = \"restrict-ips\", config = { deny = [\"10.0.0.0/8\"] } }]\n".to_owned(),
            "endpoint_policy.\"*\"",
            "endpoint_policy.*",
            "every endpoint",
        ),
    ];
    let mut failures = Vec::new();
    for (name, extra, marker, field, why) in &cases {
        let (code, err, file, line) = broken_edge(name, extra, marker);
        let want = format!("{}:{line}: {field}", file.display());
        let ok = code == Some(64) && err.contains(&want) && err.contains(why);
        if !ok {
            failures.push(format!(
                "{name}: exit {code:?}, want 64 and {want:?} ... {why:?}; stderr: {err}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Passthrough

/// The device's own TLS server (rustls), with a certificate from `ca` for
/// `names`; answers every request with `device tls` and records the SNI of
/// each connection.
fn device_tls_server(
    dir: &Path,
    ca: &Authority,
    names: &[&str],
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let leaf = ca.issue(dir, "device", Usage::Server, names[0], names, None);
    let chain = CertificateDer::pem_file_iter(&leaf.cert)
        .expect("read")
        .collect::<Result<Vec<_>, _>>()
        .expect("pem");
    let key = PrivateKeyDer::from_pem_file(&leaf.key).expect("key");
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert"),
    );
    let l = TcpListener::bind("127.0.0.1:0").expect("bind device");
    let addr = l.local_addr().expect("addr");
    let snis = Arc::new(Mutex::new(Vec::new()));
    let seen = snis.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(sock) = c else { continue };
            let cfg = cfg.clone();
            let seen = seen.clone();
            thread::spawn(move || {
                let _ = sock.set_read_timeout(Some(T));
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                let mut s = StreamOwned::new(conn, sock);
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if let Some(n) = s.conn.server_name() {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(n.to_owned());
                }
                let body = "device says hi";
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                s.conn.send_close_notify();
                let _ = s.flush();
            });
        }
    });
    (addr, snis)
}

#[test]
fn passthrough_carries_the_devices_own_tls_and_still_applies_restrict_ips() {
    let base = Base::new();
    let device_ca = Authority::new(base.dir(), "device-ca", "the device's own CA");
    let (device, snis) = device_tls_server(
        base.dir(),
        &device_ca,
        &["pt.tether.test", "pt-deny.tether.test"],
    );
    // For contrast, a terminated endpoint whose agent hands the edge the
    // device's own certificate (inline PEM) to present.
    let own = device_ca.issue(
        base.dir(),
        "own",
        Usage::Server,
        "own-cert.tether.test",
        &["own-cert.tether.test"],
        None,
    );
    let pem = |p: &Path| toml_string(&std::fs::read_to_string(p).expect("read pem"));
    let own_cert = format!(
        "{{ type = \"terminate-tls\", config = {{ server_certificate = {}, server_private_key = {} }} }}",
        pem(&own.cert),
        pem(&own.key)
    );
    let w = World::start(
        base,
        EdgeOpts::default(),
        vec![
            ep("own-cert", "tls").actions(&own_cert),
            ep("pt", "tls-passthrough").upstream(device),
            ep("pt-deny", "tls-passthrough")
                .upstream(device)
                .actions(&restrict(&[], &["127.0.0.2"], true)),
            ep("pt-tls", "tls-passthrough")
                .upstream(device)
                .actions(r#"{ type = "terminate-tls", config = { min_version = "1.3" } }"#),
        ],
    );
    w.bound("pt");
    w.bound("pt-deny");
    let port = w.edge.tls.port();
    // curl trusts only the device's CA, which the edge has never seen: the
    // certificate it verified can only be the device's.
    let (ok, said) = curl(port, "pt", &device_ca.pem, &[]);
    assert!(ok, "curl through pt with the device's CA: {said}");
    // And the edge's own CA does not verify it: the edge did not terminate.
    let (ok, said) = curl(port, "pt", &w.base.pki.ca, &[]);
    assert!(!ok, "the edge's CA verified pt's certificate: {said}");
    assert!(
        said.contains("certificate") || said.contains("issuer"),
        "curl failed for another reason than the certificate: {said}"
    );
    let (ok, said) = s_client(port, "pt", &device_ca.pem, &[]);
    assert!(ok, "s_client through pt with the device's CA: {said}");
    // The ClientHello reached the device as sent, SNI included.
    let seen = snis.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(
        seen,
        ["pt.tether.test", "pt.tether.test"],
        "SNIs the device saw"
    );

    // restrict-ips on a passthrough endpoint: closed after the ClientHello,
    // before the device could answer it.
    let device_client = rustls_client(&device_ca.pem, None);
    let got = tls_get(w.tls(), Some(OTHER), "pt-deny.tether.test", &device_client);
    assert!(got.is_silent(), "pt-deny from 127.0.0.2: {got:?}");
    let got = tls_get(w.tls(), Some(LOCAL), "pt-deny.tether.test", &device_client);
    assert!(got.is_ok(), "pt-deny from 127.0.0.1: {got:?}");
    let seen = snis.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(seen.len(), 3, "the device saw the denied client: {seen:?}");

    // The agent's own certificate on a terminated endpoint: the edge
    // presents it (the device's CA verifies it, the edge's does not), and
    // the device's upstream gets plaintext.
    w.bound("own-cert");
    let (ok, said) = curl(port, "own-cert", &device_ca.pem, &[]);
    assert!(ok, "own-cert with the device's CA: {said}");
    let (ok, said) = curl(port, "own-cert", &w.base.pki.ca, &[]);
    assert!(!ok, "the edge's CA verified own-cert's certificate: {said}");
    assert_eq!(w.hits("own-cert"), 1);

    // terminate-tls on a passthrough endpoint is refused, naming both.
    let line = w.refused("pt-tls");
    assert!(
        line.contains("tls-passthrough") && line.contains("terminate-tls"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------
// Slow loris

/// A ClientHello for `sni` as bytes on the wire.
fn client_hello(ca: &Path, sni: &str) -> Vec<u8> {
    let cfg = rustls_client(ca, None);
    let mut c = ClientConnection::new(cfg, ServerName::try_from(sni.to_owned()).expect("name"))
        .expect("client");
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("write hello");
    }
    out
}

#[test]
fn a_slow_loris_from_one_source_does_not_starve_another() {
    const DRIPS: usize = 300;
    const PER_SOURCE: usize = 16;
    const HANDSHAKE_MS: u64 = 3_000;
    let raised = sys::raise_nofile(4_096);
    assert!(raised >= 1_024, "open-file limit {raised}");
    let base = Base::new();
    let opts = EdgeOpts {
        limits: Limits {
            public_pending_per_source: Some(PER_SOURCE),
            public_tls_handshake_timeout_ms: Some(HANDSHAKE_MS),
            ..Limits::default()
        },
        ..EdgeOpts::default()
    };
    let mut w = World::start(base, opts, vec![ep("web", "tls")]);
    w.bound("web");
    let hello = client_hello(&w.base.pki.ca, "web.tether.test");
    let tls = w.tls();
    let started = Instant::now();
    let mut drips: Vec<TcpStream> = (0..DRIPS)
        .map(|i| {
            sys::connect(tls, Some(OTHER), None, T)
                .unwrap_or_else(|e| panic!("drip {i} from 127.0.0.2: {e}"))
        })
        .collect();
    for d in &drips {
        d.set_nonblocking(true).expect("nonblocking");
    }
    // One byte of the ClientHello per connection every 50 ms: none is ever
    // finished before the deadline.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let clones: Vec<TcpStream> = drips
        .iter()
        .map(|d| d.try_clone().expect("clone"))
        .collect();
    let dripper = thread::spawn(move || {
        let mut at = 0;
        while !s.load(std::sync::atomic::Ordering::SeqCst) && at < hello.len() {
            for mut d in &clones {
                let _ = d.write(&hello[at..=at]);
            }
            at += 1;
            thread::sleep(Duration::from_millis(50));
        }
    });
    thread::sleep(Duration::from_millis(200));
    eprintln!("drips connected and started after {:?}", started.elapsed());

    // A legitimate client through the same port, from 127.0.0.1.
    let t0 = Instant::now();
    let (ok, said) = curl(tls.port(), "web", &w.base.pki.ca, &[]);
    let took = t0.elapsed();
    assert!(ok, "curl during the slow loris: {said}");
    eprintln!("curl took {took:?}, at {:?}", started.elapsed());
    assert!(
        took < Duration::from_secs(1),
        "curl took {took:?} during the slow loris"
    );
    let t0 = Instant::now();
    let got = tls_get(tls, Some(LOCAL), "web.tether.test", &w.client(None));
    assert!(
        got.is_ok() && t0.elapsed() < Duration::from_secs(1),
        "{got:?} in {:?}",
        t0.elapsed()
    );

    // Past the per-source cap, the source's connections were closed at
    // accept; the admitted ones are held until the handshake deadline.
    let closed = drips.iter().filter(|d| sys::is_closed(d)).count();
    assert!(
        closed >= DRIPS - PER_SOURCE,
        "only {closed} of {DRIPS} slow connections were closed at the per-source cap"
    );
    assert!(
        started.elapsed() < ms(HANDSHAKE_MS),
        "too slow to tell the cap from the deadline"
    );
    let deadline = Instant::now() + ms(HANDSHAKE_MS) + Duration::from_secs(3);
    while drips.iter().any(|d| !sys::is_closed(d)) {
        assert!(
            Instant::now() < deadline,
            "{} slow connections outlived the handshake deadline",
            drips.iter().filter(|d| !sys::is_closed(d)).count()
        );
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = dripper.join();
    drips.clear();
    assert_eq!(w.hits("web"), 2);
    let d = w.stop_and_count_denials();
    assert_eq!(
        count(&d, "-:handshake-busy") as usize,
        DRIPS - PER_SOURCE,
        "{d:?}"
    );
    assert_eq!(
        count(&d, "-:handshake-timeout") as usize,
        PER_SOURCE,
        "{d:?}"
    );
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

// ---------------------------------------------------------------------------
// Who may start agent sessions

#[test]
fn agent_sessions_from_allowed_sources_bind_and_others_are_closed_before_tls() {
    let base = Base::new();
    // A dual-stack agent port: IPv4 agents arrive as IPv4-mapped sources,
    // and the IPv4 entries must still match them.
    let opts = EdgeOpts {
        agent_listen: Some("[::]:0".parse().expect("addr")),
        agent_extra: "allow = [\"127.0.0.1\", \"::1\"]\ndeny = [\"127.0.0.2\"]\n".into(),
        ..EdgeOpts::default()
    };
    let mut w = World::start(base, opts, vec![ep("web", "tls")]);
    // tetherd, from 127.0.0.1 (allowed), has a session and binds.
    w.bound("web");
    let up = w
        .edge
        .proc
        .err
        .wait_contains("session 1 up", T)
        .expect("session log");
    assert!(up.contains("peer=[::ffff:127.0.0.1]:"), "{up}");
    let agent = SocketAddr::new(LOCAL, w.edge.agent.port());
    // Denied, and not allowed: closed at accept, without a byte of TLS (an
    // allowed connection is left waiting for its ClientHello).
    assert!(
        closed_unprompted(agent, OTHER, Duration::from_secs(1)),
        "denied 127.0.0.2"
    );
    assert!(
        closed_unprompted(agent, THIRD, Duration::from_secs(1)),
        "127.0.0.3 is not allowed"
    );
    assert!(
        !closed_unprompted(agent, LOCAL, Duration::from_millis(300)),
        "allowed 127.0.0.1"
    );
    let v6 = SocketAddr::new(V6, agent.port());
    assert!(
        !closed_unprompted(v6, V6, Duration::from_millis(300)),
        "allowed ::1"
    );
    let tls = raw::client_config(&w.base.pki.ca);
    let dial = raw::Dial {
        source: Some(OTHER),
        ..raw::Dial::to(agent)
    };
    assert!(
        raw::RawAgent::connect(dial, &tls).is_err(),
        "a TLS session from 127.0.0.2"
    );
    assert!(
        raw::RawAgent::connect(raw::Dial::to(agent), &tls).is_ok(),
        "a TLS session from 127.0.0.1"
    );
    assert_eq!(w.edge.proc.terminate(T), Some(0));
    let refused = agent_ip_denied(&w.edge.proc.err.all());
    assert_eq!(refused, 3, "{:#?}", w.edge.proc.err.all());
}

/// Sums the `agent_ip_denied=N` of the edge's refusal summaries.
fn agent_ip_denied(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter_map(|l| {
            let n = l.split_once("agent_ip_denied=")?.1;
            n.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[test]
fn a_daemon_from_a_denied_address_never_gets_a_session() {
    let base = Base::new();
    let opts = EdgeOpts {
        agent_extra: "deny = [\"127.0.0.1\"]\n".into(),
        ..EdgeOpts::default()
    };
    let mut w = World::start(base, opts, vec![ep("web", "tls")]);
    // tetherd dials from 127.0.0.1: its TLS handshake meets a closed
    // connection, and it retries.
    let line = w
        .daemon
        .err
        .wait_contains("failed", T)
        .unwrap_or_else(|| panic!("tetherd logged no failed dial: {:#?}", w.daemon.err.all()));
    assert!(
        line.contains("dialing") && line.contains("TLS handshake with"),
        "tetherd should fail in its TLS handshake: {line}"
    );
    let retried = w.daemon.err.wait_for(T, |ls| {
        let n = ls
            .iter()
            .filter(|l| l.contains("dialing") && l.contains("failed"))
            .count();
        (n >= 2).then(String::new)
    });
    assert!(
        retried.is_some(),
        "tetherd did not retry: {:#?}",
        w.daemon.err.all()
    );
    assert!(
        w.daemon.out.all().iter().all(|l| !l.starts_with("BOUND")),
        "{:#?}",
        w.daemon.out.all()
    );
    assert_eq!(
        w.daemon.err.count("session 1"),
        0,
        "{:#?}",
        w.daemon.err.all()
    );
    assert_eq!(w.edge.proc.terminate(T), Some(0));
    let counted = agent_ip_denied(&w.edge.proc.err.all());
    assert!(
        counted >= 2,
        "the edge counted {counted} agent_ip_denied: {:#?}",
        w.edge.proc.err.all()
    );
}
