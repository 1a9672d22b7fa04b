//! PROXY protocol v2 end to end: the real `tether-edge` and `tetherd`, and a
//! real server that speaks the protocol (Debian's nginx-light, started by
//! the test as the current user on a port the OS chose), so that what is
//! checked is what nginx understood, not what our own decoder thinks.
//!
//! The public client connects from 127.0.0.2 (a bound source address, so
//! that it cannot be mistaken for tetherd's own 127.0.0.1), and nginx's
//! access log must show that address and the client socket's port.
//!
//! nginx is required: without it the tests fail and say to install
//! `nginx-light` (as the e2e tests do for curl), rather than skip.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_tests::*;

const T: Duration = Duration::from_secs(20);

/// The public client's source address.
const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The nginx binary: `$NGINX`, `nginx` on `PATH`, or Debian's `/usr/sbin/nginx`.
fn nginx_binary() -> PathBuf {
    let candidates = std::env::var_os("NGINX")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nginx"))
                .collect::<Vec<_>>()
        }))
        .chain([PathBuf::from("/usr/sbin/nginx")]);
    for c in candidates {
        let works = Command::new(&c)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            return c;
        }
    }
    panic!(
        "nginx is not installed: apt-get install nginx-light (this test needs a real server that speaks the PROXY protocol; .ci/run installs it)"
    );
}

/// nginx on 127.0.0.1 with `listen ... proxy_protocol`, killed on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    access_log: PathBuf,
    error_log: PathBuf,
}

impl Nginx {
    /// Starts nginx under `dir` (its prefix: config, pid, logs and temp
    /// paths all there, so it needs no root and touches nothing else).
    fn start(dir: &Path) -> Nginx {
        let bin = nginx_binary();
        let dir = dir.join("nginx");
        std::fs::create_dir_all(&dir).expect("nginx dir");
        // A free port chosen by the OS; nginx binds it a moment later.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let d = dir.display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format pp 'client=$proxy_protocol_addr:$proxy_protocol_port server=$proxy_protocol_server_addr:$proxy_protocol_server_port peer=$remote_addr "$request" $status';
    access_log {d}/access.log pp;
    server {{
        listen {addr} proxy_protocol;
        location / {{ return 200 "ok\n"; }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(&bin)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut n = Nginx {
            child,
            addr,
            access_log: dir.join("access.log"),
            error_log: dir.join("error.log"),
        };
        // Ready once it accepts (a probe without a header only reaches the error log).
        let deadline = Instant::now() + T;
        while !sys::accepts(addr) {
            if let Ok(Some(st)) = n.child.try_wait() {
                panic!("nginx exited ({st}): {}", n.errors());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {addr}: {}",
                n.errors()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// Waits for an access-log line that contains `needle`.
    fn wait_access(&self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + T;
        loop {
            let log = std::fs::read_to_string(&self.access_log).unwrap_or_default();
            if let Some(l) = log.lines().find(|l| l.contains(needle)) {
                return Some(l.to_owned());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An edge, nginx, and a daemon with two tcp endpoints to nginx: `pp` with
/// `proxy_protocol = "v2"` and `plain` without.
struct World {
    _dir: tempfile::TempDir,
    nginx: Nginx,
    edge: Edge,
    daemon: Proc,
}

impl World {
    fn start() -> World {
        let tmp = tempdir();
        let dir = tmp.path().to_path_buf();
        let nginx = Nginx::start(&dir);
        let pki = Pki::generate(&dir);
        let cfg = write_edge_config(&dir, &pki, &EdgeOpts::default());
        let (token, _) = Edge::create_token(&cfg, &[]);
        let edge = Edge::start(&cfg);
        let dcfg = write_daemon_config_with(
            &dir,
            edge.agent,
            &pki.ca,
            &token,
            &[
                DaemonEndpoint::new("pp", "tcp", nginx.addr).with_proxy_v2(),
                DaemonEndpoint::new("plain", "tcp", nginx.addr),
            ],
            (15_000, 45_000),
        );
        let daemon = start_daemon(&dcfg);
        wait_bound(&daemon, &edge, 2, T);
        World {
            _dir: tmp,
            nginx,
            edge,
            daemon,
        }
    }

    /// An HTTP GET through endpoint `name` from [`CLIENT_IP`]: the client
    /// socket's address and everything the server answered.
    fn get(&self, name: &str) -> (SocketAddr, String) {
        let public = SocketAddr::from(([127, 0, 0, 1], last_bound_port(&self.daemon, name)));
        let mut c: TcpStream = sys::connect(public, Some(CLIENT_IP), None, T)
            .unwrap_or_else(|e| panic!("connect {public} from {CLIENT_IP}: {e}"));
        c.set_read_timeout(Some(T)).expect("timeout");
        let local = c.local_addr().expect("local addr");
        c.write_all(b"GET /hello HTTP/1.1\r\nHost: device\r\nConnection: close\r\n\r\n")
            .expect("write request");
        let mut answer = Vec::new();
        // A reset (nginx refusing a connection without a header) ends the answer too.
        let _ = c.read_to_end(&mut answer);
        (local, String::from_utf8_lossy(&answer).into_owned())
    }
}

#[test]
fn nginx_logs_the_public_clients_address_and_port_from_the_proxy_v2_header() {
    let w = World::start();
    let (client, answer) = w.get("pp");
    assert_eq!(client.ip(), CLIENT_IP);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
        "nginx answered {answer:?}; its errors: {}\ndaemon: {:#?}",
        w.nginx.errors(),
        w.daemon.err.all()
    );
    let needle = format!("client={client} ");
    let line = w.nginx.wait_access(&needle).unwrap_or_else(|| {
        panic!(
            "nginx's access log has no line with {needle:?}:\n{}\nerrors: {}",
            std::fs::read_to_string(&w.nginx.access_log).unwrap_or_default(),
            w.nginx.errors()
        )
    });
    // The destination is nginx itself, and the TCP peer nginx saw is tetherd
    // (127.0.0.1): only the header can have told it 127.0.0.2.
    assert!(
        line.contains(&format!("server={} ", w.nginx.addr)),
        "destination in {line:?}"
    );
    assert!(line.contains("peer=127.0.0.1 "), "TCP peer in {line:?}");
    assert!(line.contains("\"GET /hello HTTP/1.1\" 200"), "{line:?}");
    // The daemon says it wrote the header, and from whom the stream came.
    let said = format!("from {client}: connected to {} (PROXY v2)", w.nginx.addr);
    assert!(
        w.daemon.err.wait_contains(&said, T).is_some(),
        "daemon log lacks {said:?}: {:#?}",
        w.daemon.err.all()
    );
    drop(w.edge);
}

#[test]
fn without_proxy_protocol_the_same_nginx_refuses_the_connection() {
    // The control: nginx's listener really requires the header, so the
    // test above passes only because tetherd wrote one.
    let w = World::start();
    let (client, answer) = w.get("plain");
    assert!(
        !answer.contains("200 OK"),
        "nginx served a connection without a PROXY header: {answer:?}"
    );
    let deadline = Instant::now() + T;
    while !w.nginx.errors().contains("broken header") {
        assert!(
            Instant::now() < deadline,
            "nginx logged no broken PROXY header: {}",
            w.nginx.errors()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(&w.nginx.access_log).unwrap_or_default();
    assert!(
        !log.contains(&format!("client={client} ")),
        "the client's address reached nginx without a header: {log}"
    );
}
