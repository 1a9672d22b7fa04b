//! Remote rotation end to end (DESIGN.md invariant 5): the real edge and
//! the real tetherd, a token rotated from the edge while the device is
//! connected, the fallback to the factory credential, and the crash
//! matrix: each side killed with SIGKILL at each step of the exchange,
//! after which the device always connects and exactly one token is active.
//!
//! The steps are reached through the debug builds' pause points
//! (`TETHER_TEST_PAUSE=<step>:<gate file>`: the process prints `PAUSED
//! <step>` and blocks while the gate file exists).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tether_tests::*;

const T: Duration = Duration::from_secs(20);

/// One row of `token list`: the id, whether it is active, its rotation column.
#[derive(Debug, Clone)]
struct Row {
    id: String,
    active: bool,
    rotation: String,
}

/// An edge on a fixed agent port (so that it can be restarted), one token,
/// one tetherd with a state directory, and an echo upstream.
struct Rig {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cfg: PathBuf,
    dcfg: PathBuf,
    edge: Option<Edge>,
    daemon: Option<Proc>,
    factory: String,
    factory_id: String,
}

impl Rig {
    fn start() -> Rig {
        let tmp = tempdir();
        let dir = tmp.path().to_path_buf();
        let pki = Pki::generate(&dir);
        let agent = {
            let l = TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr")
        };
        let opts = EdgeOpts {
            agent_listen: Some(agent),
            ..EdgeOpts::default()
        };
        let cfg = write_edge_config(&dir, &pki, &opts);
        let (factory, factory_id) = Edge::create_token(&cfg, &["cam"]);
        let up = echo_upstream();
        let dcfg = write_daemon_config(
            &dir,
            agent,
            &pki.ca,
            &factory,
            &[("cam", "tcp", up)],
            (15_000, 45_000),
        );
        let state = dir.join("tetherd-state");
        std::fs::create_dir(&state).expect("state dir");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let body = std::fs::read_to_string(&dcfg).expect("read tetherd.toml");
        std::fs::write(
            &dcfg,
            format!("state_directory = \"{}\"\n{body}", state.display()),
        )
        .expect("write tetherd.toml");
        // The factory credential is read-only, as on a read-only root.
        std::fs::set_permissions(
            dir.join("credential"),
            std::fs::Permissions::from_mode(0o400),
        )
        .expect("chmod credential");
        let mut rig = Rig {
            _tmp: tmp,
            dir,
            cfg,
            dcfg,
            edge: None,
            daemon: None,
            factory,
            factory_id,
        };
        rig.start_edge(None);
        rig.start_daemon(None);
        rig.wait_bound();
        rig
    }

    /// A rig whose tetherd is paused at `step` of a rotation just asked for.
    fn paused_in_tetherd(step: &str) -> Rig {
        let mut rig = Rig::start();
        rig.kill_daemon();
        rig.start_daemon(Some(step));
        rig.wait_bound();
        rig.rotate();
        Rig::wait_paused(rig.daemon(), step);
        rig
    }

    fn gate(&self) -> PathBuf {
        self.dir.join("gate")
    }

    fn env(&self, pause: Option<&str>) -> Vec<(&'static str, String)> {
        match pause {
            Some(step) => {
                std::fs::write(self.gate(), b"").expect("gate");
                vec![(
                    "TETHER_TEST_PAUSE",
                    format!("{step}:{}", self.gate().display()),
                )]
            }
            None => Vec::new(),
        }
    }

    fn start_edge(&mut self, pause: Option<&str>) {
        let cfg = self.cfg.to_str().expect("utf-8").to_owned();
        let proc = Proc::spawn_as_service(
            "tether-edge",
            &["--config", &cfg, "serve"],
            &self.env(pause),
            false,
        );
        self.edge = Some(Edge::from_proc(proc, &self.cfg));
    }

    fn start_daemon(&mut self, pause: Option<&str>) {
        let cfg = self.dcfg.to_str().expect("utf-8").to_owned();
        let mut args = vec!["--config", cfg.as_str()];
        if is_root() {
            args.push("--allow-root");
        }
        self.daemon = Some(Proc::spawn_as_service(
            "tetherd",
            &args,
            &self.env(pause),
            false,
        ));
    }

    fn daemon(&self) -> &Proc {
        self.daemon.as_ref().expect("tetherd running")
    }

    fn edge(&self) -> &Edge {
        self.edge.as_ref().expect("edge running")
    }

    /// SIGKILL, as `kill -9`.
    fn kill_daemon(&mut self) {
        let mut d = self.daemon.take().expect("tetherd running");
        d.child.kill().expect("kill -9 tetherd");
        let _ = d.child.wait();
    }

    fn kill_edge(&mut self) {
        let mut e = self.edge.take().expect("edge running");
        e.proc.child.kill().expect("kill -9 the edge");
        let _ = e.proc.child.wait();
    }

    fn wait_bound(&self) {
        self.daemon()
            .out
            .wait("BOUND cam", T)
            .unwrap_or_else(|| panic!("tetherd never bound: {:#?}", self.daemon().err.all()));
    }

    /// Waits for a `BOUND` after the `before` seen so far (the device
    /// reconnected to a restarted edge).
    fn wait_rebound(&self, before: usize) {
        self.daemon()
            .out
            .wait_nth("BOUND cam", before, T)
            .unwrap_or_else(|| panic!("tetherd never bound again: {:#?}", self.daemon().err.all()));
    }

    fn wait_paused(proc: &Proc, step: &str) {
        proc.out
            .wait(&format!("PAUSED {step}"), T)
            .unwrap_or_else(|| panic!("never paused at {step}: {:#?}", proc.err.all()));
    }

    fn release(&self) {
        let _ = std::fs::remove_file(self.gate());
    }

    fn rotate(&self) {
        let (code, _, err) = self.edge().cli(&["token", "rotate", &self.factory_id]);
        assert_eq!(code, Some(0), "token rotate: {err}");
    }

    fn tokens(&self) -> Vec<Row> {
        let (code, out, err) = run(
            "tether-edge",
            &[
                "--offline",
                "--config",
                self.cfg.to_str().expect("utf-8"),
                "token",
                "list",
            ],
        );
        assert_eq!(code, Some(0), "token list: {err}");
        let mut lines = out.lines();
        let header = lines.next().expect("header");
        let revoked = header.find("REVOKED").expect("REVOKED column");
        let rotation = header.find("ROTATION").expect("ROTATION column");
        lines
            .map(|l| Row {
                id: l.split_whitespace().next().expect("id").to_owned(),
                active: l.get(revoked..rotation).map(str::trim) == Some("-"),
                rotation: l.get(rotation..).unwrap_or("").trim().to_owned(),
            })
            .collect()
    }

    /// Waits until the rotation is over: exactly one token active and
    /// none requested or pending. Returns the active one.
    fn settled(&self) -> Row {
        let deadline = Instant::now() + T;
        loop {
            let rows = self.tokens();
            let active: Vec<&Row> = rows.iter().filter(|r| r.active).collect();
            let busy = rows
                .iter()
                .any(|r| r.rotation == "requested" || r.rotation.starts_with("pending"));
            if active.len() == 1 && !busy {
                return active[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "the rotation never settled: {rows:#?}\ntetherd: {:#?}\nedge: {:#?}",
                self.daemon.as_ref().map(|d| d.err.all()),
                self.edge.as_ref().map(|e| e.proc.err.all())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The rotated credential tetherd keeps, if any.
    fn stored(&self) -> Option<String> {
        let p = self.dir.join("tetherd-state").join("credential");
        let text = std::fs::read_to_string(&p).ok()?;
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the rotated credential is private");
        Some(text.trim().to_owned())
    }

    /// A public connection through the device's endpoint echoes.
    fn echo(&self) {
        let port = last_bound_port(self.daemon(), "cam");
        let mut c = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("connect");
        c.set_read_timeout(Some(T)).expect("timeout");
        c.write_all(b"ping").expect("write");
        let mut got = [0u8; 4];
        c.read_exact(&mut got).expect("echo");
        assert_eq!(&got, b"ping");
    }

    /// After a rotation settled on `active`: the device's stored credential
    /// is `active`, and a fresh tetherd (whatever it had in memory gone)
    /// connects with it and carries traffic.
    fn device_holds(&mut self, active: &Row) {
        let stored = self.stored().expect("a rotated credential is stored");
        assert!(
            stored.starts_with(&format!("{}.", active.id)),
            "tetherd stored {} but the active token is {}",
            stored.split('.').next().unwrap_or(""),
            active.id
        );
        if let Some(mut d) = self.daemon.take() {
            d.terminate(T);
        }
        self.start_daemon(None);
        self.wait_bound();
        self.echo();
        let rows = self.tokens();
        assert_eq!(
            rows.iter().filter(|r| r.active).count(),
            1,
            "exactly one token is active: {rows:#?}"
        );
    }
}

#[test]
fn a_rotation_replaces_the_token_on_the_device_and_retires_the_old_one_after_it_reconnects() {
    let mut rig = Rig::start();
    rig.echo();
    rig.rotate();
    rig.daemon()
        .err
        .wait_contains("complete: the edge retired", T)
        .unwrap_or_else(|| panic!("no RotateConfirmed: {:#?}", rig.daemon().err.all()));
    let active = rig.settled();
    assert_ne!(active.id, rig.factory_id, "the successor is the active one");
    let rows = rig.tokens();
    let old = rows
        .iter()
        .find(|r| r.id == rig.factory_id)
        .expect("old token listed");
    assert!(!old.active, "the factory token is retired");
    assert_eq!(old.rotation, format!("replaced by {}", active.id));
    assert_eq!(active.rotation, format!("successor of {}", rig.factory_id));
    // The factory file is untouched; the rotated one is in the state dir.
    let factory = std::fs::read_to_string(rig.dir.join("credential")).expect("factory");
    assert_eq!(factory.trim(), rig.factory);
    rig.echo();
    rig.device_holds(&active);
    // The old token is refused now.
    let events = rig
        .edge()
        .proc
        .err
        .wait_contains(&format!("token {} retired", rig.factory_id), T);
    assert!(events.is_some(), "the edge logs the retirement");
}

#[test]
fn a_rotated_credential_the_edge_no_longer_knows_falls_back_to_the_factory_one() {
    let mut rig = Rig::start();
    // The edge's database as it is before the rotation: the backup, taken
    // with the edge stopped.
    let db = rig.dir.join("edge-state").join("tokens.db");
    let backup = rig.dir.join("backup.db");
    rig.edge.take().expect("edge").proc.terminate(T);
    let _ = rig.tokens(); // the CLI's connection checkpoints the WAL as it closes
    std::fs::copy(&db, &backup).expect("backup");
    let bound = rig.daemon().out.count("BOUND cam");
    rig.start_edge(None);
    rig.wait_rebound(bound);
    rig.rotate();
    let active = rig.settled();
    assert_ne!(active.id, rig.factory_id);
    // Restore the backup: the successor is unknown, the factory token active.
    rig.kill_edge();
    rig.kill_daemon();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::fs::copy(&backup, &db).expect("restore");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    rig.start_edge(None);
    rig.start_daemon(None);
    rig.wait_bound();
    rig.echo();
    assert!(
        rig.daemon()
            .err
            .wait_contains("falling back to the factory credential", T)
            .is_some(),
        "tetherd says why: {:#?}",
        rig.daemon().err.all()
    );
    let rows = rig.tokens();
    assert!(rows.iter().any(|r| r.id == rig.factory_id && r.active));
    assert!(!rows.iter().any(|r| r.id == active.id), "{rows:#?}");
}

/// The steps of tetherd's half, in order.
const DEVICE_STEPS: [&str; 5] = [
    "offer_received",
    "temp_written",
    "renamed",
    "stored",
    "stored_sent",
];

#[test]
fn tetherd_killed_at_each_step_of_a_rotation_still_connects_and_one_token_stays_active() {
    for step in DEVICE_STEPS {
        let mut rig = Rig::paused_in_tetherd(step);
        rig.kill_daemon();
        rig.release();
        // The device restarts with whatever its disk holds: the factory
        // credential before the rename, the successor after it.
        rig.start_daemon(None);
        rig.wait_bound();
        let presents = |what: &str| {
            rig.daemon()
                .err
                .all()
                .iter()
                .any(|l| l.contains("endpoint(s)") && l.contains(what))
        };
        let renamed = DEVICE_STEPS[2..].contains(&step);
        assert_eq!(
            !presents(&format!("credential {}", rig.factory_id)),
            renamed,
            "step {step}: {:#?}",
            rig.daemon().err.all()
        );
        if step == "temp_written" {
            assert!(
                rig.daemon().err.count("an unfinished rotation") == 1,
                "the temporary is removed at start: {:#?}",
                rig.daemon().err.all()
            );
        }
        let active = rig.settled();
        assert_ne!(
            active.id, rig.factory_id,
            "step {step}: the rotation completed"
        );
        rig.device_holds(&active);
        let leftover = rig.dir.join("tetherd-state").join("credential.tmp");
        assert!(!leftover.exists(), "step {step}: no temporary left behind");
    }
}

#[test]
fn the_edge_killed_at_each_step_of_a_rotation_leaves_the_device_connected_and_one_token_active() {
    // The edge killed while tetherd is at each of its steps ...
    for step in DEVICE_STEPS {
        let mut rig = Rig::paused_in_tetherd(step);
        rig.kill_edge();
        rig.start_edge(None);
        rig.release();
        let active = rig.settled();
        assert_ne!(
            active.id, rig.factory_id,
            "step {step}: the rotation completed"
        );
        rig.device_holds(&active);
    }
    // ... and at the edge's own: after the offer went out, and after
    // RotateStored came in (before the session was drained and the old
    // token retired).
    for step in ["offered", "stored_received"] {
        let mut rig = Rig::start();
        let bound = rig.daemon().out.count("BOUND cam");
        rig.kill_edge();
        rig.start_edge(Some(step));
        rig.wait_rebound(bound);
        rig.rotate();
        Rig::wait_paused(&rig.edge().proc, step);
        rig.kill_edge();
        rig.release();
        rig.start_edge(None);
        let active = rig.settled();
        assert_ne!(
            active.id, rig.factory_id,
            "step {step}: the rotation completed"
        );
        rig.device_holds(&active);
    }
}
