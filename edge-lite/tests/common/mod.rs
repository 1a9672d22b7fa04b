//! Shared helpers of the edge's integration tests: a temporary directory, a
//! test PKI generated with rcgen, an edge config on 127.0.0.1 port 0, an edge
//! started in-process, and a fake agent that speaks the protocol with
//! `tether_driver::Session` over futures-rustls.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_rustls::TlsConnector;
use rustls::pki_types::{CertificateDer, ServerName};
use smol::net::TcpStream;
use smol::Task;
use tether_driver::{Closed, Session};
use tether_edge::scope::{Rules, Scope};
use tether_edge::store::{SqliteStore, Store};
use tether_edge::{Config, RunError, Server};
use tether_proto::{Control, EndpointKind, ErrorCode, Role};

pub const DOMAIN: &str = "tether.test";

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "tether-edge-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA, the agent-port certificate (localhost) and `*.tether.test`, as PEM files.
pub struct Pki {
    pub ca: CertificateDer<'static>,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
    pub wild_cert: PathBuf,
    pub wild_key: PathBuf,
    /// The CA certificate as a PEM file (for curl --cacert).
    pub ca_file: PathBuf,
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "edge test CA");
        let ca_key = KeyPair::generate().expect("ca key");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf = |names: Vec<String>| {
            let p = CertificateParams::new(names).expect("leaf params");
            let k = KeyPair::generate().expect("leaf key");
            let c = p.signed_by(&k, &ca, &ca_key).expect("sign leaf");
            (c.pem(), k.serialize_pem())
        };
        let (ac, ak) = leaf(vec!["localhost".into()]);
        let (wc, wk) = leaf(vec![format!("*.{DOMAIN}")]);
        let w = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, body).expect("write pem");
            p
        };
        Pki {
            ca: ca.der().clone(),
            agent_cert: w("agent.crt", &ac),
            agent_key: w("agent.key", &ak),
            wild_cert: w("wild.crt", &wc),
            wild_key: w("wild.key", &wk),
            ca_file: w("ca.crt", &ca.pem()),
        }
    }

    /// A TLS 1.3 client config trusting the test CA, with `alpn`.
    pub fn client(&self, alpn: Option<&[u8]>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("root");
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
        if let Some(a) = alpn {
            c.alpn_protocols = vec![a.to_vec()];
        }
        Arc::new(c)
    }
}

/// The TOML of an edge on 127.0.0.1 port 0 with tcp (OS-chosen ports) and tls.
pub fn edge_toml(dir: &Path, pki: &Pki, extra_session: &str) -> String {
    format!(
        r#"state_dir = "{state}"

[agent]
listen = "127.0.0.1:0"
cert = "{ac}"
key = "{ak}"

[tcp]
listen_ip = "127.0.0.1"
port_range = [0, 0]

[tls]
listen = "127.0.0.1:0"
domain = "{DOMAIN}"
cert = "{wc}"
key = "{wk}"

[session]
ping_interval_ms = 15000
dead_after_ms = 45000
{extra_session}
"#,
        state = dir.join("state").display(),
        ac = pki.agent_cert.display(),
        ak = pki.agent_key.display(),
        wc = pki.wild_cert.display(),
        wk = pki.wild_key.display(),
    )
}

/// Everything one test needs: files, an edge running in-process, its store.
pub struct Env {
    pub dir: TempDir,
    pub pki: Pki,
    pub config: PathBuf,
    pub agent: SocketAddr,
    pub tls: SocketAddr,
    /// The admin API's URL, when the config has `[api]`.
    pub api: Option<String>,
    stop: Option<smol::channel::Sender<()>>,
    pub task: Option<Task<Result<(), RunError>>>,
}

impl Env {
    /// Starts an edge; `extra_session` is appended to `[session]`.
    pub async fn start(tag: &str, extra_session: &str) -> Env {
        Env::start_with(tag, |toml| {
            toml.replace("[session]\n", &format!("[session]\n{extra_session}\n"))
        })
        .await
    }

    /// Starts an edge whose config is the test config passed through `edit`.
    pub async fn start_with(tag: &str, edit: impl FnOnce(String) -> String) -> Env {
        let dir = TempDir::new(tag);
        let pki = Pki::generate(dir.path());
        let config = dir.path().join("edge.toml");
        std::fs::write(&config, edit(edge_toml(dir.path(), &pki, ""))).expect("write config");
        let cfg = Config::load(&config).expect("config loads");
        let server = Server::bind(cfg).await.expect("edge binds");
        let agent = server.agent_addr();
        let tls = server.tls_addr().expect("tls listener");
        let api = server.api_url();
        let (stop, rx) = smol::channel::bounded::<()>(1);
        let task = smol::spawn(server.run(async move {
            let _ = rx.recv().await;
        }));
        Env {
            dir,
            pki,
            config,
            agent,
            tls,
            api,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A store connection of its own (like the CLI).
    pub fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.dir.path().join("state")).expect("open store")
    }

    /// Creates a token allowed to bind `allow` (bind rules: names,
    /// `*.suffix`, `*`).
    pub fn token(&self, allow: &[&str]) -> (String, String) {
        let scope = Scope {
            rules: Rules::parse(allow).expect("rules"),
            sources: Vec::new(),
        };
        let t = self.store().create("test", &scope).expect("create token");
        (t.token.expose().to_owned(), t.id.to_string())
    }

    /// Starts the graceful shutdown; `finish` waits for `run` to return.
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.try_send(());
        }
    }

    pub async fn finish(&mut self) -> Result<(), RunError> {
        self.shutdown();
        self.task.take().expect("running").await
    }
}

/// A control message with owned fields, as the fake agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Welcome {
        version: u16,
        session: u64,
    },
    Error {
        code: ErrorCode,
        retry_after_ms: u32,
        message: String,
    },
    BindOk {
        endpoint: String,
        url: String,
    },
    BindErr {
        endpoint: String,
        code: ErrorCode,
        rule: String,
    },
    Other(String),
}

pub fn owned(bytes: &[u8]) -> Msg {
    match Control::decode(bytes).expect("control decodes") {
        Control::Welcome {
            version, session, ..
        } => Msg::Welcome { version, session },
        Control::Error {
            code,
            retry_after_ms,
            message,
        } => Msg::Error {
            code: ErrorCode(code),
            retry_after_ms,
            message: message.to_owned(),
        },
        Control::BindOk { endpoint, url } => Msg::BindOk {
            endpoint: endpoint.into(),
            url: url.into(),
        },
        Control::BindErr {
            endpoint,
            code,
            rule,
            ..
        } => Msg::BindErr {
            endpoint: endpoint.into(),
            code: ErrorCode(code),
            rule: rule.into(),
        },
        other => Msg::Other(format!("{other:?}")),
    }
}

/// A fake agent: one session over TLS to the edge.
pub struct Agent {
    pub session: Session,
    pub driver: Task<Closed>,
}

impl Agent {
    /// Dials the edge (TLS 1.3, ALPN tether/1, name localhost).
    pub async fn connect(env: &Env) -> Agent {
        Agent::connect_with(env, tether_proto::Config::new(Role::Client)).await
    }

    pub async fn connect_with(env: &Env, cfg: tether_proto::Config) -> Agent {
        Agent::dial(env.agent, &env.pki, cfg).await
    }

    /// Dials an edge at `addr` whose agent certificate `pki` signed.
    pub async fn dial(addr: SocketAddr, pki: &Pki, cfg: tether_proto::Config) -> Agent {
        let tcp = TcpStream::connect(addr).await.expect("dial edge");
        let name = ServerName::try_from("localhost").expect("name").to_owned();
        let tls = TlsConnector::from(pki.client(Some(tether_proto::ALPN)))
            .connect(name, tcp)
            .await
            .expect("agent tls handshake");
        let (session, driver) = Session::new(tls, cfg).expect("agent session");
        Agent {
            session,
            driver: smol::spawn(driver),
        }
    }

    pub async fn send(&self, msg: &Control<'_>) {
        self.session.send_control(msg).await.expect("send control");
    }

    /// The next control message, within 5 s.
    pub async fn recv(&self) -> Option<Msg> {
        within(Duration::from_secs(5), self.session.recv_control())
            .await
            .map(|b| owned(&b))
    }

    pub async fn hello(&self, token: &str) -> Option<Msg> {
        self.hello_versions(token, 1, 1).await
    }

    pub async fn hello_versions(&self, token: &str, min_version: u16, version: u16) -> Option<Msg> {
        self.send(&Control::Hello {
            version,
            min_version,
            token: tether_proto::control::Secret(token),
            agent: "fake-agent/0",
            arch: "test",
        })
        .await;
        self.recv().await
    }

    pub async fn bind(&self, endpoint: &str, kind: EndpointKind) -> Option<Msg> {
        self.send(&Control::Bind {
            endpoint,
            kind,
            url: "",
            upstream: "test",
            policy: "",
        })
        .await;
        self.recv().await
    }

    /// Connects and completes `Hello` -> `Welcome`.
    pub async fn welcome(env: &Env, token: &str) -> Agent {
        let a = Agent::connect(env).await;
        match a.hello(token).await {
            Some(Msg::Welcome { .. }) => a,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Binds and returns the URL.
    pub async fn bind_ok(&self, endpoint: &str, kind: EndpointKind) -> String {
        match self.bind(endpoint, kind).await {
            Some(Msg::BindOk { endpoint: e, url }) if e == endpoint => url,
            other => panic!("expected BindOk for {endpoint}, got {other:?}"),
        }
    }
}

/// `f`'s output within `d`, panicking otherwise.
pub async fn within<T>(d: Duration, f: impl std::future::Future<Output = T>) -> T {
    futures_lite::future::or(f, async {
        smol::Timer::after(d).await;
        panic!("timed out after {d:?}")
    })
    .await
}

/// The port of a `tcp://127.0.0.1:<port>` URL.
pub fn url_addr(url: &str) -> SocketAddr {
    url.strip_prefix("tcp://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a tcp url: {url}"))
}

/// Polls `cond` every 5 ms until it holds, panicking (naming `what`) if it
/// does not within `d`: a wait on a condition, not a sleep.
pub async fn until<F, Fut>(d: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + d;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {d:?} waiting for: {what}"
        );
        smol::Timer::after(Duration::from_millis(5)).await;
    }
}

/// Whether a TCP connection to `addr` is refused (the port is closed).
pub async fn port_closed(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}
