//! The harness of the end-to-end tests: it runs the real `tether-edge` and
//! `tetherd` binaries on 127.0.0.1 with ports chosen by the OS, a test PKI
//! generated at test time (rcgen), a sample upstream, and real clients.
//!
//! It owns process lifecycles (killed on drop), the machine-readable stdout
//! lines both programs print (`LISTEN`, `BOUND`, `CONNECTED`), log capture for
//! assertions, and small network tools (an echo upstream, a pausable proxy).
//! Beside it: [`raw`], an agent that speaks the wire format frame by frame
//! (the hostile or stalled peer), [`flood`], the admission flood of issue 6,
//! and [`sys`], what a process holds (fds, RSS, limits) and connects from a
//! chosen source address. It does not own any tunnel logic: that is what it
//! tests.
//!
//! `TETHER_TEST_BIN_DIR` points the tests at binaries built elsewhere (for
//! example an older commit's, to see a test fail before a fix).

pub mod certs;
pub mod flood;
pub mod raw;
pub mod sys;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The directory that holds the workspace's built binaries (`target/debug`,
/// or `$TETHER_TEST_BIN_DIR`).
pub fn bin_dir() -> PathBuf {
    let dir = match std::env::var_os("TETHER_TEST_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            // target/debug/deps/<test>-<hash> -> target/debug
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf()
        }
    };
    for b in ["tetherd", "tether-edge"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the workspace first (cargo build --workspace or scripts/test)",
            dir.join(b).display()
        );
    }
    dir
}

/// A test PKI written as PEM files: a CA, the edge's agent-port certificate
/// (localhost, 127.0.0.1) and a wildcard certificate for `*.tether.test`.
pub struct Pki {
    /// Where the files are.
    pub dir: PathBuf,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Agent-port certificate and key.
    pub agent_cert: PathBuf,
    /// Agent-port key.
    pub agent_key: PathBuf,
    /// Wildcard certificate for the TLS endpoints.
    pub wild_cert: PathBuf,
    /// Wildcard key.
    pub wild_key: PathBuf,
}

/// The domain of the TLS endpoints in tests.
pub const DOMAIN: &str = "tether.test";

impl Pki {
    /// Generates a PKI under `dir`, signed by a fresh CA.
    pub fn generate(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tether test CA");
        let ca_key = KeyPair::generate().expect("ca key");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf = |names: Vec<String>| {
            let mut p = CertificateParams::new(names).expect("leaf params");
            p.distinguished_name.push(DnType::CommonName, "tether test");
            let k = KeyPair::generate().expect("leaf key");
            let c = p.signed_by(&k, &ca, &ca_key).expect("sign leaf");
            (c.pem(), k.serialize_pem())
        };
        let (agent_c, agent_k) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
        let (wild_c, wild_k) = leaf(vec![format!("*.{DOMAIN}")]);
        let w = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, body).expect("write pem");
            p
        };
        Pki {
            dir: dir.to_path_buf(),
            ca: w("ca.pem", &ca.pem()),
            agent_cert: w("agent.crt", &agent_c),
            agent_key: w("agent.key", &agent_k),
            wild_cert: w("wild.crt", &wild_c),
            wild_key: w("wild.key", &wild_k),
        }
    }
}

/// Lines a child printed, shared with the thread that reads them, each with
/// the moment it was read.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<(Mutex<Vec<String>>, Condvar)>,
    times: Arc<Mutex<Vec<Instant>>>,
}

impl Lines {
    /// Appends a line and wakes the waiters.
    pub fn push(&self, line: String) {
        let (m, c) = &*self.inner;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lines' lock, so that times[i] is always line i's.
        self.times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        g.push(line);
        drop(g);
        c.notify_all();
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no line came yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits up to `timeout` for a line at index `from` or later that
    /// contains `needle`; returns it with the moment it was read.
    pub fn wait_contains_after(
        &self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> Option<(String, Instant)> {
        let (i, text) = self.wait_map(timeout, |ls| {
            ls.iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(needle))
                .map(|(i, l)| (i, l.clone()))
        })?;
        let at = *self
            .times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(i)?;
        Some((text, at))
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.all().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits up to `timeout` until `find` picks a line out of all lines so far.
    pub fn wait_for(
        &self,
        timeout: Duration,
        find: impl Fn(&[String]) -> Option<String>,
    ) -> Option<String> {
        self.wait_map(timeout, find)
    }

    /// Waits up to `timeout` until `f` gets something out of all lines so far.
    pub fn wait_map<T>(&self, timeout: Duration, f: impl Fn(&[String]) -> Option<T>) -> Option<T> {
        let (m, c) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = f(&g) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = c
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the `nth` (0-based) line that starts with `prefix`, returning it.
    pub fn wait_nth(&self, prefix: &str, nth: usize, timeout: Duration) -> Option<String> {
        self.wait_for(timeout, |ls| {
            ls.iter()
                .filter(|l| l.starts_with(prefix))
                .nth(nth)
                .cloned()
        })
    }

    /// Waits for the first line that starts with `prefix`.
    pub fn wait(&self, prefix: &str, timeout: Duration) -> Option<String> {
        self.wait_nth(prefix, 0, timeout)
    }

    /// Waits for a line containing `needle` anywhere.
    pub fn wait_contains(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for(timeout, |ls| {
            ls.iter().find(|l| l.contains(needle)).cloned()
        })
    }
}

/// A running binary: killed when dropped. Its stdout and stderr lines are captured.
pub struct Proc {
    /// The child process.
    pub child: Child,
    /// Lines printed on stdout.
    pub out: Lines,
    /// Lines printed on stderr (logs).
    pub err: Lines,
    name: &'static str,
}

fn pump(r: impl Read + Send + 'static, lines: Lines, echo: Option<&'static str>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Some(tag) = echo {
                if std::env::var_os("TETHER_TEST_LOG").is_some() {
                    eprintln!("[{tag}] {line}");
                }
            }
            lines.push(line);
        }
    });
}

impl Proc {
    /// Starts `bin` (a workspace binary) with `args`.
    pub fn spawn(name: &'static str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(bin_dir().join(name));
        cmd.args(args);
        Proc::spawn_command(name, cmd)
    }

    /// Starts `bin` with `args` and its open-file soft limit lowered to
    /// `soft` (through `sh -c 'ulimit -S -n ...; exec ...'`: the binary
    /// itself is the process, with that limit inherited).
    pub fn spawn_with_nofile(name: &'static str, args: &[&str], soft: u64) -> Proc {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -S -n {soft} && exec \"$0\" \"$@\""))
            .arg(bin_dir().join(name))
            .args(args);
        Proc::spawn_command(name, cmd)
    }

    /// Starts `bin` with `args` the way systemd starts a unit: `env` added
    /// to the environment and, with `journal`, stderr a pipe whose
    /// device:inode `$JOURNAL_STREAM` names (as systemd does for the journal's
    /// stream socket).
    pub fn spawn_as_service(
        name: &'static str,
        args: &[&str],
        env: &[(&str, String)],
        journal: bool,
    ) -> Proc {
        let mut cmd = Command::new(bin_dir().join(name));
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if !journal {
            return Proc::spawn_command(name, cmd);
        }
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let (reader, writer) = std::io::pipe().expect("pipe");
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", writer.as_raw_fd()))
            .expect("stat the pipe");
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        cmd.stderr(Stdio::from(writer));
        let proc = Proc::spawn_command_with(name, cmd, false);
        // The child holds the write end now; ours is gone with `cmd`.
        pump(reader, proc.err.clone(), Some(name));
        proc
    }

    fn spawn_command(name: &'static str, cmd: Command) -> Proc {
        Proc::spawn_command_with(name, cmd, true)
    }

    /// `pipe_stderr: false` when the caller set stderr itself.
    fn spawn_command_with(name: &'static str, mut cmd: Command, pipe_stderr: bool) -> Proc {
        if pipe_stderr {
            cmd.stderr(Stdio::piped());
        }
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = Lines::default();
        let err = Lines::default();
        pump(
            child.stdout.take().expect("stdout"),
            out.clone(),
            Some(name),
        );
        if let Some(stderr) = child.stderr.take() {
            pump(stderr, err.clone(), Some(name));
        }
        Proc {
            child,
            out,
            err,
            name,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the exit code (None if killed by a signal).
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                // Let the pump threads read the last lines.
                thread::sleep(Duration::from_millis(50));
                return st.code();
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}; stderr: {:#?}",
                    self.name,
                    self.err.all()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a binary to completion and returns (exit code, stdout, stderr).
pub fn run(name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin_dir().join(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Extra edge settings for a test.
#[derive(Clone, Debug)]
pub struct EdgeOpts {
    /// `[session]` ping interval.
    pub ping_interval_ms: u64,
    /// `[session]` dead-peer deadline.
    pub dead_after_ms: u64,
    /// Fixed agent listen address (for restart tests); None = port 0.
    pub agent_listen: Option<SocketAddr>,
    /// `[session] max_streams`; None = not written (the edge's default, 64).
    pub max_streams: Option<usize>,
    /// `[session] linger_ms`; None = not written (the edge's default,
    /// [`Limits::DEFAULT_LINGER_MS`]).
    pub linger_ms: Option<u64>,
    /// `[limits]`: only the values that are set are written.
    pub limits: Limits,
    /// `[tls] listen`; None = `127.0.0.1:0` (`[::]:0` makes it dual-stack).
    pub tls_listen: Option<String>,
    /// `[tcp] listen_ip`; None = `127.0.0.1`.
    pub tcp_listen_ip: Option<String>,
    /// Lines added inside `[agent]` (`allow = [...]`, `deny = [...]`).
    pub agent_extra: String,
    /// TOML appended after every table the writer emits (`[traffic_policy]`,
    /// `[[endpoint_policy."web".on_tcp_connect]]`, ...).
    pub extra_toml: String,
}

impl Default for EdgeOpts {
    fn default() -> Self {
        EdgeOpts {
            ping_interval_ms: 15_000,
            dead_after_ms: 45_000,
            agent_listen: None,
            max_streams: None,
            linger_ms: None,
            limits: Limits::default(),
            tls_listen: None,
            tcp_listen_ip: None,
            agent_extra: String::new(),
            extra_toml: String::new(),
        }
    }
}

/// The edge's `[limits]` table (DESIGN.md invariant 11). A `None` is not
/// written, so the edge applies its default (the `DEFAULT_*` constants: the
/// documented contract). A test that can run on the defaults leaves them
/// unset: it then also runs, and fails for its own reason, against an edge
/// that does not know the table yet.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// Agent port: time for the TLS handshake.
    pub tls_handshake_timeout_ms: Option<u64>,
    /// Agent port: time for `Hello` after TLS.
    pub hello_timeout_ms: Option<u64>,
    /// Unfinished agent handshakes per IPv4 address / IPv6 /64.
    pub pending_per_source: Option<usize>,
    /// Unfinished agent handshakes in all.
    pub pending_total: Option<usize>,
    /// Sessions per token; a new one past it evicts the oldest.
    pub sessions_per_token: Option<usize>,
    /// Endpoints one session may bind.
    pub endpoints_per_session: Option<usize>,
    /// Public connections of one endpoint waiting for a stream.
    pub public_waiting_per_endpoint: Option<usize>,
    /// Public connections in all.
    pub public_connections: Option<usize>,
    /// Public TLS handshake deadline.
    pub public_tls_handshake_timeout_ms: Option<u64>,
    /// Idle established public connections are closed after this.
    pub idle_timeout_ms: Option<u64>,
    /// Public TLS port: unfinished handshakes per source.
    pub public_pending_per_source: Option<usize>,
    /// Public TLS port: unfinished handshakes in all.
    pub public_pending_total: Option<usize>,
    /// Agent port: failed authentications per minute per source before
    /// refusals are delayed (the edge's default: 30).
    pub auth_failures_per_source: Option<u32>,
    /// ... and per token id (the edge's default: 10).
    pub auth_failures_per_token: Option<u32>,
}

impl Limits {
    /// `[session] linger_ms` default.
    pub const DEFAULT_LINGER_MS: u64 = 2_000;
    /// Default agent TLS handshake deadline.
    pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
    /// Default `Hello` deadline.
    pub const DEFAULT_HELLO_TIMEOUT_MS: u64 = 5_000;
    /// Default unfinished handshakes per source.
    pub const DEFAULT_PENDING_PER_SOURCE: usize = 8;
    /// Default unfinished handshakes in all.
    pub const DEFAULT_PENDING_TOTAL: usize = 512;
    /// Default sessions per token.
    pub const DEFAULT_SESSIONS_PER_TOKEN: usize = 4;
    /// Default endpoints per session.
    pub const DEFAULT_ENDPOINTS_PER_SESSION: usize = 32;
    /// Default public connections waiting per endpoint.
    pub const DEFAULT_PUBLIC_WAITING_PER_ENDPOINT: usize = 64;
    /// Default public connections in all.
    pub const DEFAULT_PUBLIC_CONNECTIONS: usize = 8_192;
    /// Default idle timeout of public connections.
    pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 600_000;

    /// The `[limits]` table with the values that are set; empty when none is.
    pub fn toml(&self) -> String {
        let mut t = String::new();
        let mut put = |k: &str, v: Option<u64>| {
            if let Some(v) = v {
                t.push_str(&format!("{k} = {v}\n"));
            }
        };
        let u = |v: Option<usize>| v.map(|v| v as u64);
        put("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms);
        put("hello_timeout_ms", self.hello_timeout_ms);
        put("pending_per_source", u(self.pending_per_source));
        put("pending_total", u(self.pending_total));
        put("sessions_per_token", u(self.sessions_per_token));
        put("endpoints_per_session", u(self.endpoints_per_session));
        put(
            "public_waiting_per_endpoint",
            u(self.public_waiting_per_endpoint),
        );
        put("public_connections", u(self.public_connections));
        put(
            "public_tls_handshake_timeout_ms",
            self.public_tls_handshake_timeout_ms,
        );
        put("idle_timeout_ms", self.idle_timeout_ms);
        put(
            "public_pending_per_source",
            u(self.public_pending_per_source),
        );
        put("public_pending_total", u(self.public_pending_total));
        put(
            "auth_failures_per_source",
            self.auth_failures_per_source.map(u64::from),
        );
        put(
            "auth_failures_per_token",
            self.auth_failures_per_token.map(u64::from),
        );
        if t.is_empty() {
            t
        } else {
            format!("\n[limits]\n{t}")
        }
    }
}

/// Writes an edge config into `dir` and returns its path.
pub fn write_edge_config(dir: &Path, pki: &Pki, opts: &EdgeOpts) -> PathBuf {
    let state = dir.join("edge-state");
    std::fs::create_dir_all(&state).expect("state dir");
    let agent = opts
        .agent_listen
        .map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
    let tls_listen = opts.tls_listen.as_deref().unwrap_or("127.0.0.1:0");
    let tcp_ip = opts.tcp_listen_ip.as_deref().unwrap_or("127.0.0.1");
    let agent_extra = &opts.agent_extra;
    let extra = &opts.extra_toml;
    let mut session_extra = String::new();
    if let Some(n) = opts.max_streams {
        session_extra.push_str(&format!("max_streams = {n}\n"));
    }
    if let Some(ms) = opts.linger_ms {
        session_extra.push_str(&format!("linger_ms = {ms}\n"));
    }
    let body = format!(
        r#"state_dir = "{state}"

[agent]
listen = "{agent}"
cert = "{ac}"
key = "{ak}"
{agent_extra}
[tcp]
listen_ip = "{tcp_ip}"
port_range = [0, 0]

[tls]
listen = "{tls_listen}"
domain = "{DOMAIN}"
cert = "{wc}"
key = "{wk}"

[session]
ping_interval_ms = {pi}
dead_after_ms = {da}
shutdown_grace_ms = 3000
{session_extra}{limits}
{extra}"#,
        state = state.display(),
        ac = pki.agent_cert.display(),
        ak = pki.agent_key.display(),
        wc = pki.wild_cert.display(),
        wk = pki.wild_key.display(),
        pi = opts.ping_interval_ms,
        da = opts.dead_after_ms,
        limits = opts.limits.toml(),
    );
    let path = dir.join("edge.toml");
    std::fs::write(&path, body).expect("write edge.toml");
    path
}

/// A running edge with the addresses it printed.
pub struct Edge {
    /// The process.
    pub proc: Proc,
    /// Its config file.
    pub config: PathBuf,
    /// The agent port.
    pub agent: SocketAddr,
    /// The shared TLS port.
    pub tls: SocketAddr,
}

fn parse_addr(line: &str) -> SocketAddr {
    line.split_whitespace()
        .last()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

impl Edge {
    /// Starts `tether-edge serve` with `config` and waits for its listeners.
    pub fn start(config: &Path) -> Edge {
        let cfg = config.to_str().expect("utf-8 path");
        Edge::wait_listening(
            Proc::spawn("tether-edge", &["--config", cfg, "serve"]),
            config,
        )
    }

    /// [`Edge::start`] with the edge's open-file soft limit lowered to `soft`
    /// when it starts.
    pub fn start_with_nofile(config: &Path, soft: u64) -> Edge {
        let cfg = config.to_str().expect("utf-8 path");
        Edge::wait_listening(
            Proc::spawn_with_nofile("tether-edge", &["--config", cfg, "serve"], soft),
            config,
        )
    }

    /// An edge started some other way (`Proc::spawn_as_service`, for an
    /// environment), once it listens.
    pub fn from_proc(proc: Proc, config: &Path) -> Edge {
        Edge::wait_listening(proc, config)
    }

    fn wait_listening(mut proc: Proc, config: &Path) -> Edge {
        let deadline = Instant::now() + Duration::from_secs(20);
        let agent = loop {
            if let Some(l) = proc.out.wait("LISTEN agent", Duration::from_millis(100)) {
                break l;
            }
            // An edge that refused its config exits at once: say why now.
            if !proc.is_running() || Instant::now() >= deadline {
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "edge did not listen (config {}): {:#?}",
                    config.display(),
                    proc.err.all()
                );
            }
        };
        let tls = proc
            .out
            .wait("LISTEN tls", Duration::from_secs(5))
            .expect("edge tls listener");
        Edge {
            agent: parse_addr(&agent),
            tls: parse_addr(&tls),
            proc,
            config: config.to_path_buf(),
        }
    }

    /// The edge's process id.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Runs `tether-edge --offline --config <this config> ARGS...` (a CLI
    /// command on the same store, not through the API) and returns (exit
    /// code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut all = vec![
            "--offline",
            "--config",
            self.config.to_str().expect("utf-8"),
        ];
        all.extend_from_slice(args);
        run("tether-edge", &all)
    }

    /// `token create --offline` against this edge's store; returns (token,
    /// id). An empty `allow` asks for every endpoint (`--allow '*'`).
    pub fn create_token(config: &Path, allow: &[&str]) -> (String, String) {
        let mut args = vec![
            "--offline",
            "--config",
            config.to_str().expect("utf-8"),
            "token",
            "create",
            "--description",
            "e2e",
        ];
        for a in if allow.is_empty() { &["*"][..] } else { allow } {
            args.push("--allow");
            args.push(a);
        }
        let (code, out, err) = run("tether-edge", &args);
        assert_eq!(code, Some(0), "token create failed: {err}");
        let token = out.trim().to_owned();
        let id = token.split('.').next().expect("token id").to_owned();
        (token, id)
    }
}

/// Writes a daemon config and its credential (mode 0600) into `dir`:
/// endpoints `(name, kind, upstream)`, session `(ping_interval_ms, dead_after_ms)`.
pub fn write_daemon_config(
    dir: &Path,
    edge: SocketAddr,
    ca: &Path,
    token: &str,
    endpoints: &[(&str, &str, SocketAddr)],
    session: (u64, u64),
) -> PathBuf {
    let eps: Vec<DaemonEndpoint> = endpoints
        .iter()
        .map(|(name, kind, up)| DaemonEndpoint::new(name, kind, *up))
        .collect();
    write_daemon_config_with(dir, edge, ca, token, &eps, session)
}

/// One `[[endpoint]]` of a daemon config, with whatever else the table
/// should hold (`traffic_policy = {...}`, `proxy_protocol = "v2"`).
#[derive(Clone, Debug)]
pub struct DaemonEndpoint {
    /// `name`.
    pub name: String,
    /// `kind`: `tcp`, `tls` or `tls-passthrough`.
    pub kind: String,
    /// `upstream`.
    pub upstream: SocketAddr,
    /// TOML lines written inside the table after the others (each ending in
    /// a newline; sub-tables such as `[endpoint.traffic_policy]` last).
    pub extra: String,
}

impl DaemonEndpoint {
    /// An endpoint with nothing extra.
    pub fn new(name: &str, kind: &str, upstream: SocketAddr) -> DaemonEndpoint {
        DaemonEndpoint {
            name: name.to_owned(),
            kind: kind.to_owned(),
            upstream,
            extra: String::new(),
        }
    }

    /// The same endpoint declaring `policy` (a TOML inline table, one line:
    /// `{ on_tcp_connect = [ ... ] }`) as its `traffic_policy`.
    pub fn with_policy(mut self, policy: &str) -> DaemonEndpoint {
        self.extra.push_str(&format!("traffic_policy = {policy}\n"));
        self
    }

    /// The same endpoint writing a PROXY protocol v2 header to its upstream
    /// (`proxy_protocol = "v2"`).
    pub fn with_proxy_v2(mut self) -> DaemonEndpoint {
        self.extra.push_str("proxy_protocol = \"v2\"\n");
        self
    }
}

/// `s` as a TOML basic string (quoted, with `\`, `"` and control characters
/// escaped): for PEM text inside a one-line inline table.
pub fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// [`write_daemon_config`] with full [`DaemonEndpoint`]s.
pub fn write_daemon_config_with(
    dir: &Path,
    edge: SocketAddr,
    ca: &Path,
    token: &str,
    endpoints: &[DaemonEndpoint],
    session: (u64, u64),
) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let cred = dir.join("credential");
    std::fs::write(&cred, format!("{token}\n")).expect("write credential");
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut body = format!(
        r#"edge = "{edge}"
server_name = "localhost"
ca_file = "{ca}"
credential = "{cred}"

[reconnect]
initial_backoff_ms = 100
max_backoff_ms = 1000
healthy_after_ms = 2000

[session]
ping_interval_ms = {pi}
dead_after_ms = {da}
"#,
        ca = ca.display(),
        cred = cred.display(),
        pi = session.0,
        da = session.1,
    );
    for ep in endpoints {
        body.push_str(&format!(
            "\n[[endpoint]]\nname = \"{}\"\nkind = \"{}\"\nupstream = \"{}\"\nconnect_timeout_ms = 2000\n{}",
            ep.name, ep.kind, ep.upstream, ep.extra
        ));
    }
    let path = dir.join("tetherd.toml");
    std::fs::write(&path, body).expect("write tetherd.toml");
    path
}

/// Removes the top-level `key = ...` line from a written config, for tests
/// of what a program does without that key.
pub fn remove_config_key(path: &Path, key: &str) {
    let text = std::fs::read_to_string(path).expect("read config");
    let prefix = format!("{key} =");
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with(&prefix))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, text).expect("write config");
}

/// Starts tetherd (as root in CI, hence `--allow-root` when euid is 0).
pub fn start_daemon(config: &Path) -> Proc {
    let cfg = config.to_str().expect("utf-8");
    let mut args = vec!["--config", cfg];
    if is_root() {
        args.push("--allow-root");
    }
    Proc::spawn("tetherd", &args)
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// The port in a `BOUND <name> <scheme>://<host>:<port>` line.
pub fn bound_port(line: &str) -> u16 {
    line.rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// Waits until `daemon` printed `n` `BOUND` lines; panics with the logs of
/// the daemon and of `edge` if it has not within `timeout` for each.
pub fn wait_bound(daemon: &Proc, edge: &Edge, n: usize, timeout: Duration) {
    for i in 0..n {
        daemon.out.wait_nth("BOUND", i, timeout).unwrap_or_else(|| {
            panic!(
                "daemon did not bind: {:#?}\nedge: {:#?}",
                daemon.err.all(),
                edge.proc.err.all()
            )
        });
    }
}

/// The port of the last `BOUND <name> ...` line `daemon` printed so far
/// (after a reconnect, the current binding).
pub fn last_bound_port(daemon: &Proc, name: &str) -> u16 {
    let prefix = format!("BOUND {name} ");
    let line = daemon
        .out
        .all()
        .into_iter()
        .rev()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no BOUND line for {name}"));
    bound_port(&line)
}

/// An upstream that echoes every connection until EOF, then closes its write half.
pub fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// A TCP proxy between the daemon and the edge that can be paused: while
/// paused it stops forwarding without closing anything (a silent network).
pub struct Proxy {
    /// Where the daemon should dial.
    pub addr: SocketAddr,
    paused: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = l.local_addr().expect("addr");
        let paused = Arc::new(AtomicBool::new(false));
        let p = paused.clone();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let Ok(t) = TcpStream::connect(target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (c.try_clone().expect("clone"), t.try_clone().expect("clone")),
                    (t, c),
                ] {
                    let p = p.clone();
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // While paused, hold the bytes: nothing moves, nothing closes.
                            while p.load(Ordering::SeqCst) {
                                thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Proxy { addr, paused }
    }

    /// Stops (true) or resumes (false) forwarding.
    pub fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::SeqCst);
    }
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tether-e2e-")
        .tempdir()
        .expect("tempdir")
}

/// A tiny HTTP/1.1 upstream that answers every request with `body`, then
/// closes: a [`CountingUpstream`] whose count nobody reads.
pub fn http_upstream(body: &'static str) -> SocketAddr {
    CountingUpstream::http(body).addr
}

/// An upstream address where nothing listens (connections are refused).
pub fn refusing_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

/// An HTTP upstream that counts the connections it accepted: the device's
/// side of "the device saw no stream".
#[derive(Clone, Debug)]
pub struct CountingUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingUpstream {
    /// Starts one on 127.0.0.1 answering every request with `body`.
    pub fn http(body: &'static str) -> CountingUpstream {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind counting upstream");
        let addr = l.local_addr().expect("addr");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = c.write_all(resp.as_bytes());
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        });
        CountingUpstream { addr, hits }
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}
