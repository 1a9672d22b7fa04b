//! Test harness: a throw-away directory, a test PKI made with rcgen, a fake
//! edge (rustls server + `tether_driver::Session`) on 127.0.0.1:0, and the
//! real `tetherd` binary run as a child with its stdout and stderr captured.

#![allow(dead_code, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_io::Async;
use futures_rustls::rustls;
use futures_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use futures_rustls::TlsAcceptor;
use tether_driver::Session;
use tether_proto::{Config, Control, ErrorCode, Role};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tetherd-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and an edge certificate for `edge.test` that it signed.
pub struct Pki {
    pub ca_pem: String,
    pub cert: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Pki {
    /// A PKI whose CA is called `ca_name`.
    pub fn new(ca_name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca = params.self_signed(&ca_key).expect("ca cert");
        let key = rcgen::KeyPair::generate().expect("edge key");
        let params =
            rcgen::CertificateParams::new(vec!["edge.test".to_owned()]).expect("edge params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("edge cert");
        Pki {
            ca_pem: ca.pem(),
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .expect("server cert");
        cfg.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
        Arc::new(cfg)
    }
}

/// How the fake edge answers `Hello`.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// `Welcome`, then `BindOk` for every `Bind`, except `BindErr` for
    /// endpoints whose name starts with `denied` and for a `Bind` that
    /// declares a policy.
    Welcome,
    /// `Error{code, retry_after_ms}` then `GOAWAY(code)`.
    Refuse(ErrorCode, u32),
    /// Like `Welcome`, but the `Welcome` names this protocol version.
    WelcomeVersion(u16),
    /// Completes the TLS handshake, then never reads or writes again.
    Silent,
}

/// What the fake edge saw of one session.
pub struct EdgeSession {
    pub session: Session,
    pub hello_token: String,
    pub hello_agent: String,
    pub hello_version: u16,
    pub number: u64,
    /// Set it and the edge stops reading this session's connection (it
    /// still writes): the daemon's writes back up once the TCP buffers fill.
    pub stop_reading: Arc<AtomicBool>,
}

/// A pipe whose reads stop for good once `stop` is set (`Pending` with no
/// wake-up, as a peer that stopped reading); writes pass through.
struct StallableReads<T> {
    inner: T,
    stop: Arc<AtomicBool>,
}

impl<T: futures_lite::AsyncRead + Unpin> futures_lite::AsyncRead for StallableReads<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.stop.load(Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: futures_lite::AsyncWrite + Unpin> futures_lite::AsyncWrite for StallableReads<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A fake edge on 127.0.0.1:0 running in its own thread.
pub struct FakeEdge {
    pub addr: SocketAddr,
    /// Every TCP connection accepted.
    pub accepts: Arc<Mutex<Vec<Instant>>>,
    /// Every TLS handshake completed.
    pub handshakes: Arc<Mutex<Vec<Instant>>>,
    /// Welcomed sessions, in order.
    pub sessions: mpsc::Receiver<EdgeSession>,
}

impl FakeEdge {
    pub fn start(pki: &Pki, answer: Answer) -> FakeEdge {
        FakeEdge::start_with(pki, answer, Config::new(Role::Server))
    }

    /// A fake edge whose sessions use `mux` (a larger window, say).
    pub fn start_with(pki: &Pki, answer: Answer, mux: Config) -> FakeEdge {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(pki.server_config());
        let accepts = Arc::new(Mutex::new(Vec::new()));
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let (a, h) = (accepts.clone(), handshakes.clone());
        std::thread::spawn(move || {
            let ex = async_executor::LocalExecutor::new();
            let listener = Async::new(listener).expect("async listener");
            let counter = std::cell::Cell::new(0u64);
            async_io::block_on(ex.run(async {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    a.lock().expect("lock").push(Instant::now());
                    let acceptor = acceptor.clone();
                    let (h, tx) = (h.clone(), tx.clone());
                    counter.set(counter.get() + 1);
                    let number = 100 + counter.get();
                    ex.spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        h.lock().expect("lock").push(Instant::now());
                        if let Answer::Silent = answer {
                            // Hold the connection open, say nothing.
                            async_io::Timer::after(Duration::from_secs(30)).await;
                            drop(tls);
                            return;
                        }
                        edge_session(tls, answer, mux, number, tx).await;
                    })
                    .detach();
                }
            }));
        });
        FakeEdge {
            addr,
            accepts,
            handshakes,
            sessions: rx,
        }
    }

    pub fn handshake_count(&self) -> usize {
        self.handshakes.lock().expect("lock").len()
    }

    pub fn accept_count(&self) -> usize {
        self.accepts.lock().expect("lock").len()
    }

    pub fn next_session(&self, within: Duration) -> EdgeSession {
        self.sessions
            .recv_timeout(within)
            .expect("a welcomed session")
    }
}

async fn edge_session<T>(
    tls: T,
    answer: Answer,
    mux: Config,
    number: u64,
    tx: mpsc::Sender<EdgeSession>,
) where
    T: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static,
{
    let stop_reading = Arc::new(AtomicBool::new(false));
    let tls = StallableReads {
        inner: tls,
        stop: stop_reading.clone(),
    };
    let (sess, driver) = Session::new(tls, mux).expect("edge session");
    // The driver runs beside the session's logic; both end with the session.
    let logic = async {
        let Some(bytes) = sess.recv_control().await else {
            return;
        };
        let (token, agent, version) = match Control::decode(&bytes) {
            Ok(Control::Hello {
                token,
                agent,
                version,
                ..
            }) => (token.0.to_owned(), agent.to_owned(), version),
            other => panic!("expected Hello, got {other:?}"),
        };
        match answer {
            Answer::Refuse(code, retry_after_ms) => {
                let msg = Control::Error {
                    code: code.0,
                    retry_after_ms,
                    message: "fake edge says no",
                };
                sess.send_control(&msg).await.expect("send Error");
                sess.goaway(code);
            }
            Answer::Silent => unreachable!("handled before the session starts"),
            Answer::Welcome | Answer::WelcomeVersion(_) => {
                let welcome_version = match answer {
                    Answer::WelcomeVersion(v) => v,
                    _ => 1,
                };
                let welcome = Control::Welcome {
                    version: welcome_version,
                    session: number,
                    edge: "fake-edge/0",
                };
                sess.send_control(&welcome).await.expect("send Welcome");
                let _ = tx.send(EdgeSession {
                    session: sess.clone(),
                    hello_token: token,
                    hello_agent: agent,
                    hello_version: version,
                    number,
                    stop_reading: stop_reading.clone(),
                });
                while let Some(bytes) = sess.recv_control().await {
                    if let Ok(Control::Bind {
                        endpoint, policy, ..
                    }) = Control::decode(&bytes)
                    {
                        if !policy.is_empty() {
                            // As the real edge answers a policy it refuses:
                            // the rule names the field. The message quotes
                            // the policy, for the test to see what came.
                            let message = format!("unknown action type; the policy was:\n{policy}");
                            let err = Control::BindErr {
                                endpoint,
                                code: ErrorCode::BIND_REFUSED.0,
                                rule: "traffic_policy.on_tcp_connect[0].actions[0].type",
                                message: &message,
                            };
                            sess.send_control(&err).await.expect("send BindErr");
                            continue;
                        }
                        if endpoint.starts_with("denied") {
                            let err = Control::BindErr {
                                endpoint,
                                code: ErrorCode::BIND_REFUSED.0,
                                rule: "token tk_0123456789ab allow=web",
                                message: "not in the token's allow list",
                            };
                            sess.send_control(&err).await.expect("send BindErr");
                            continue;
                        }
                        let url = format!("tcp://127.0.0.1:{}", 20000 + number);
                        let ok = Control::BindOk {
                            endpoint,
                            url: &url,
                        };
                        sess.send_control(&ok).await.expect("send BindOk");
                    }
                }
            }
        }
    };
    futures_lite::future::zip(driver, logic).await;
}

/// A local upstream on 127.0.0.1:0: for each connection it reads to EOF,
/// then answers `reply:` + what it read and shuts its write side.
pub fn half_close_upstream() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                c.read_to_end(&mut got).expect("upstream reads to EOF");
                let _ = tx.send(got.clone());
                let mut reply = b"reply:".to_vec();
                reply.extend_from_slice(&got);
                c.write_all(&reply).expect("upstream writes");
                c.shutdown(std::net::Shutdown::Write)
                    .expect("upstream half-close");
                // Keep reading: the daemon closes its side once the stream ends.
                let _ = c.read_to_end(&mut got);
            });
        }
    });
    (addr, rx)
}

/// A local upstream on 127.0.0.1:0 that echoes what it reads at once and
/// half-closes after EOF; each connection's bytes are sent on the channel.
pub fn echo_upstream() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            all.extend_from_slice(&buf[..n]);
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tx.send(all);
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, rx)
}

/// A local upstream on 127.0.0.1:0 that, on each connection, writes zeros
/// as fast as it is read and never reads. Once a write has been blocked for
/// 200 ms (everything between it and the reader is full), it sends the
/// connection's number on the channel, once, and keeps writing.
pub fn firehose_upstream() -> (SocketAddr, mpsc::Receiver<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Write;
        for (n, conn) in l.incoming().enumerate() {
            let Ok(mut c) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
                let buf = [0u8; 16 * 1024];
                let mut told = false;
                loop {
                    match c.write(&buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            if !told {
                                told = true;
                                let _ = tx.send(n);
                            }
                        }
                        Err(_) => break,
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// The credential the tests use.
pub const TOKEN: &str = "tk_0123456789ab.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// Writes a daemon config for `edge` (`host:port`) with one tcp endpoint
/// `web` -> `upstream`; `extra` goes before the endpoint.
pub fn daemon_config(
    dir: &TempDir,
    edge: impl std::fmt::Display,
    ca_pem: &str,
    upstream: SocketAddr,
    extra: &str,
) -> PathBuf {
    daemon_config_with_endpoint(dir, edge, ca_pem, upstream, extra, "")
}

/// [`daemon_config`] with `endpoint_extra` added to the `web` endpoint.
pub fn daemon_config_with_endpoint(
    dir: &TempDir,
    edge: impl std::fmt::Display,
    ca_pem: &str,
    upstream: SocketAddr,
    extra: &str,
    endpoint_extra: &str,
) -> PathBuf {
    let cred = dir.write("credential", &format!("{TOKEN}\n"), 0o600);
    let ca = dir.write("ca.pem", ca_pem, 0o644);
    let text = format!(
        "edge = \"{edge}\"\nserver_name = \"edge.test\"\nca_file = \"{}\"\ncredential = \"{}\"\n{extra}\n\
         [[endpoint]]\nname = \"web\"\nkind = \"tcp\"\nupstream = \"{upstream}\"\nconnect_timeout_ms = 2000\n{endpoint_extra}\n",
        ca.display(),
        cred.display()
    );
    dir.write("tetherd.toml", &text, 0o644)
}

/// Runs `cmd` to its exit with stdout and stderr captured, like
/// `Command::output`, but kills it and panics once `within` has passed: a
/// daemon that should have refused to start would otherwise run (and the
/// test hang) forever.
pub fn output_within(cmd: &mut Command, within: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tetherd");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} still running after {within:?} (it should have exited); stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// How long a run that must exit at once (a refusal) may take.
pub const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// The `tetherd` binary as [`tetherd`] builds it, run in a new user
/// namespace where it is uid 0 (`unshare --user --map-root-user`, from
/// util-linux): it really is root there, whoever runs the test. `None`
/// when user namespaces are not available.
pub fn tetherd_as_userns_root(args: &[&str]) -> Option<Command> {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(st) if st.success()) {
        return None;
    }
    let inner = tetherd(args);
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user"])
        .arg(inner.get_program())
        .args(inner.get_args())
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null());
    Some(cmd)
}

/// The real binary, running.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

/// The `tetherd` binary as a command. With `TETHERD_RUNNER` set (for
/// example `qemu-arm -L /usr/arm-linux-gnueabihf` when testing a cross
/// build), the binary runs under that command.
pub fn tetherd(args: &[&str]) -> Command {
    let bin = env!("CARGO_BIN_EXE_tetherd");
    let runner = std::env::var("TETHERD_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut cmd = match words.next() {
        Some(prog) => {
            let mut c = Command::new(prog);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args).env("RUST_LOG", "debug").stdin(Stdio::null());
    cmd
}

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        Daemon::spawn(tetherd(&[
            "--config",
            config.to_str().expect("utf-8 path"),
            "--allow-root",
        ]))
    }

    /// Runs `cmd` (a [`tetherd`] command) with its output captured.
    pub fn spawn(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tetherd");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr");
        let acc = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = acc.lock().expect("lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        Daemon {
            child,
            lines,
            stderr,
        }
    }

    /// The next stdout line that starts with `prefix`, skipping others.
    pub fn line(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => continue,
                Err(_) => panic!(
                    "no `{prefix}` line within {within:?}; stderr:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_stderr(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.stderr().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    }

    /// The exit status, waiting at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "tetherd did not exit within {within:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status (at most `within`).
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        self.sigterm();
        self.wait_exit(within)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
