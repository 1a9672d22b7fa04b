//! tetherd under a stand-in for systemd: the test binds the `NOTIFY_SOCKET`
//! and reads every datagram, sets `WATCHDOG_USEC`, `CREDENTIALS_DIRECTORY`,
//! `STATE_DIRECTORY` and `JOURNAL_STREAM` as a unit with `Type=notify`,
//! `WatchdogSec=`, `LoadCredential=` and `StateDirectory=` would, runs the
//! real binary, and checks each message and its timing. Then SIGHUP reloads.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_tests::*;

const T: Duration = Duration::from_secs(20);

/// systemd's side of the notify protocol: every message, with when it came.
struct Systemd {
    socket: PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    started: Instant,
}

impl Systemd {
    fn listen(dir: &Path) -> Systemd {
        let socket = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&socket).expect("bind NOTIFY_SOCKET");
        let messages: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let m = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = rx.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                m.lock().expect("lock").push((Instant::now(), text));
            }
        });
        Systemd {
            socket,
            messages,
            started: Instant::now(),
        }
    }

    /// The environment of a unit: notify socket, watchdog, credentials, state.
    fn env(&self, creds: &Path, state: &Path, watchdog: Duration) -> Vec<(&'static str, String)> {
        vec![
            ("NOTIFY_SOCKET", self.socket.display().to_string()),
            ("WATCHDOG_USEC", watchdog.as_micros().to_string()),
            ("CREDENTIALS_DIRECTORY", creds.display().to_string()),
            ("STATE_DIRECTORY", state.display().to_string()),
        ]
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.messages.lock().expect("lock").clone()
    }

    /// Waits for a message with a line starting with `prefix` after the
    /// first `skip` messages; returns its index, time and line.
    fn wait(&self, prefix: &str, skip: usize) -> (usize, Instant, String) {
        let deadline = Instant::now() + T;
        loop {
            for (i, (at, m)) in self.all().into_iter().enumerate().skip(skip) {
                if let Some(line) = m.lines().find(|l| l.starts_with(prefix)) {
                    return (i, at, line.to_owned());
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} after message {skip}: {:#?}",
                self.all().iter().map(|(_, m)| m).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn watchdog_pings(&self) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|(_, m)| m == "WATCHDOG=1")
            .map(|(at, _)| at)
            .collect()
    }
}

fn args(cfg: &Path) -> Vec<String> {
    let mut a = vec!["--config".to_owned(), cfg.display().to_string()];
    if is_root() {
        a.push("--allow-root".into());
    }
    a
}

fn spawn_unit(cfg: &Path, env: &[(&str, String)]) -> Proc {
    let a = args(cfg);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    Proc::spawn_as_service("tetherd", &a, env, true)
}

/// A daemon config whose credential comes from `$CREDENTIALS_DIRECTORY`:
/// the harness's config without its `credential` line, and the credential
/// moved to `creds/credential` (mode 0600, as LoadCredential= leaves it 0400).
fn unit_config(
    dir: &Path,
    edge: SocketAddr,
    ca: &Path,
    token: &str,
    endpoints: &[(&str, &str, SocketAddr)],
) -> (PathBuf, PathBuf) {
    let cfg = write_daemon_config(dir, edge, ca, token, endpoints, (500, 3000));
    remove_config_key(&cfg, "credential");
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).expect("creds dir");
    std::fs::rename(dir.join("credential"), creds.join("credential")).expect("move credential");
    (cfg, creds)
}

/// A unit config (credential `tk_a.bbbb` in `creds/`) whose edge is an
/// address nothing listens on, so that every dial is refused: the address,
/// the config and the credentials directory.
fn unreachable_edge_unit(dir: &Path) -> (SocketAddr, PathBuf, PathBuf) {
    let pki = Pki::generate(dir);
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let (cfg, creds) = unit_config(
        dir,
        closed,
        &pki.ca,
        "tk_a.bbbb",
        &[("ssh", "tcp", echo_upstream())],
    );
    (closed, cfg, creds)
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.pid().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

/// A device without network must still finish booting: READY=1 comes once
/// the config and credential are validated and the first dial starts, with
/// the edge unreachable; STATUS says why it is reconnecting; the watchdog
/// pings at half of WATCHDOG_USEC; log lines carry journal priorities;
/// SIGTERM says STOPPING=1.
#[test]
fn ready_comes_without_network_and_status_watchdog_and_priorities_follow() {
    let tmp = tempdir();
    let dir = tmp.path();
    let (closed, cfg, creds) = unreachable_edge_unit(dir);
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let sd = Systemd::listen(dir);
    let mut d = spawn_unit(&cfg, &sd.env(&creds, &state, Duration::from_millis(400)));

    let (i, ready_at, line) = sd.wait("READY=1", 0);
    assert_eq!(line, "READY=1");
    assert!(
        ready_at - sd.started < Duration::from_secs(5),
        "READY=1 took {:?}",
        ready_at - sd.started
    );
    let (_, _, status) = sd.wait("STATUS=", i);
    assert_eq!(status, format!("STATUS=connecting to {closed}"));
    let (_, _, status) = sd.wait("STATUS=reconnecting in ", i + 1);
    assert!(
        status.contains("refused"),
        "the reason is in the status: {status}"
    );
    assert!(
        !sd.all().iter().any(|(_, m)| m.contains("STATUS=connected")),
        "never connected"
    );

    // WATCHDOG_USEC = 400 ms: a ping every 200 ms from the daemon's loop.
    std::thread::sleep(Duration::from_millis(1500));
    let pings = sd.watchdog_pings();
    assert!(pings.len() >= 5, "{} pings in ~1.5 s", pings.len());
    for w in pings.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(150) && gap < Duration::from_millis(400),
            "pings every half of WATCHDOG_USEC, got a gap of {gap:?}"
        );
    }

    // stderr is the journal: every line starts with <N>; the dial failures
    // are warnings (<4>), the start-up lines info (<6>).
    let logs = d.err.all();
    let logged: Vec<&String> = logs.iter().skip(1).collect(); // the build line is printed plainly
    assert!(!logged.is_empty());
    for l in &logged {
        assert!(
            l.starts_with("<3>")
                || l.starts_with("<4>")
                || l.starts_with("<6>")
                || l.starts_with("<7>"),
            "a line without priority: {l:?}"
        );
    }
    assert!(logged
        .iter()
        .any(|l| l.starts_with("<4>") && l.contains("dialing")));
    assert!(logged
        .iter()
        .any(|l| l.starts_with("<6>") && l.contains("state directory")));
    assert!(logged
        .iter()
        .any(|l| l.starts_with("<6>") && l.contains("credential tk_a")));

    let n = sd.all().len();
    signal(&d, "-TERM");
    assert_eq!(d.wait_exit(T), Some(0));
    sd.wait("STOPPING=1", n);
}

/// Without JOURNAL_STREAM (or with one naming another file) the log lines
/// stay as they are: no priority prefixes.
#[test]
fn without_the_journal_lines_have_no_priority_prefix() {
    let tmp = tempdir();
    let dir = tmp.path();
    let (_closed, cfg, creds) = unreachable_edge_unit(dir);
    let a = args(&cfg);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let env = [
        ("CREDENTIALS_DIRECTORY", creds.display().to_string()),
        ("JOURNAL_STREAM", "1:1".to_owned()),
    ];
    let mut d = Proc::spawn_as_service("tetherd", &a, &env, false);
    d.err.wait_contains("dialing", T).expect("a dial failure");
    assert!(
        d.err.all().iter().all(|l| !l.starts_with('<')),
        "{:#?}",
        d.err.all()
    );
    d.terminate(T);
}

/// Neither `credential` in the config nor `$CREDENTIALS_DIRECTORY`: exit 64
/// before any dial, saying what to set.
#[test]
fn no_credential_anywhere_is_a_configuration_error() {
    let tmp = tempdir();
    let dir = tmp.path();
    let pki = Pki::generate(dir);
    let (cfg, _creds) = unit_config(
        dir,
        "127.0.0.1:9".parse().expect("addr"),
        &pki.ca,
        "tk_a.b",
        &[("ssh", "tcp", "127.0.0.1:22".parse().expect("addr"))],
    );
    let a = args(&cfg);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut d = Proc::spawn_as_service("tetherd", &a, &[], false);
    assert_eq!(d.wait_exit(T), Some(64));
    let err = d.err.all().join("\n");
    assert!(
        err.contains("credential: not set") && err.contains("LoadCredential=credential:"),
        "{err}"
    );
}

fn echo_through(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    if c.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// With the edge up: the credential from `$CREDENTIALS_DIRECTORY` is
/// accepted, STATUS says "connected to ..., 2 endpoints"; SIGHUP with one
/// endpoint removed and one added unbinds and binds on the same session
/// (RELOADING=1, then READY=1), the removed endpoint's public port stops
/// answering; a config that does not parse is logged with file:line:field
/// and the running endpoints keep serving.
#[test]
fn sighup_reloads_endpoints_on_the_live_session() {
    let tmp = tempdir();
    let dir = tmp.path();
    let pki = Pki::generate(dir);
    let ecfg = write_edge_config(dir, &pki, &EdgeOpts::default());
    let (token, token_id) = Edge::create_token(&ecfg, &[]);
    let edge = Edge::start(&ecfg);
    let up = echo_upstream();
    let (cfg, creds) = unit_config(
        dir,
        edge.agent,
        &pki.ca,
        &token,
        &[("one", "tcp", up), ("two", "tcp", up)],
    );
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let sd = Systemd::listen(dir);
    let d = spawn_unit(&cfg, &sd.env(&creds, &state, Duration::from_secs(10)));
    wait_bound(&d, &edge, 2, T);
    let (i, _, _) = sd.wait("READY=1", 0);
    let (_, _, status) = sd.wait(
        &format!("STATUS=connected to {}, 2 endpoints", edge.agent),
        i,
    );
    assert!(status.ends_with("2 endpoints"), "{status}");
    assert!(d
        .err
        .all()
        .iter()
        .any(|l| l.contains(&format!("credential {token_id}"))));
    let one = last_bound_port(&d, "one");
    let two = last_bound_port(&d, "two");
    assert!(echo_through(one) && echo_through(two));

    // Reload: "two" removed, "three" added, "one" unchanged.
    let text = std::fs::read_to_string(&cfg).expect("read");
    let two_table = format!(
        "\n[[endpoint]]\nname = \"two\"\nkind = \"tcp\"\nupstream = \"{up}\"\nconnect_timeout_ms = 2000\n"
    );
    assert!(text.contains(&two_table), "{text}");
    let new = text.replace(
        &two_table,
        &format!("\n[[endpoint]]\nname = \"three\"\nkind = \"tcp\"\nupstream = \"{up}\"\n"),
    );
    std::fs::write(&cfg, &new).expect("write");
    let n = sd.all().len();
    signal(&d, "-HUP");
    let (r, _, _) = sd.wait("RELOADING=1", n);
    sd.wait("READY=1", r + 1);
    d.out.wait("UNBOUND two", T).expect("two unbound");
    d.out.wait("BOUND three", T).expect("three bound");
    edge.proc
        .out
        .wait("UNBOUND two", T)
        .expect("the edge unbound two");
    let three = last_bound_port(&d, "three");
    assert!(echo_through(three), "three serves");
    assert!(echo_through(one), "one still serves");
    assert!(!echo_through(two), "two's port no longer answers");
    assert_eq!(d.out.count("CONNECTED"), 1, "the session was not dropped");
    sd.wait(
        &format!("STATUS=connected to {}, 2 endpoints", edge.agent),
        r,
    );

    // A broken file: logged with file:line:field, nothing changes.
    std::fs::write(&cfg, new.replace("name = \"three\"", "name = 3")).expect("write");
    let n = sd.all().len();
    signal(&d, "-HUP");
    sd.wait("READY=1", n);
    let line = d
        .err
        .wait_contains("reload failed", T)
        .expect("reload failure logged");
    let cfgname = cfg.display().to_string();
    assert!(
        line.contains(&format!("{cfgname}:")) && line.contains("endpoint[1].name"),
        "file, line and field: {line}"
    );
    assert!(line.contains("running configuration is kept"), "{line}");
    assert!(echo_through(three) && echo_through(one), "both still serve");
    assert_eq!(d.out.count("CONNECTED"), 1);
    assert_eq!(d.out.count("UNBOUND"), 1);
}
