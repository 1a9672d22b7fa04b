//! `tether-edge provision`, the real binary: bundles with the right files,
//! modes and owners, a manifest of ids, tokens allowed exactly their
//! device's endpoints; a bad row refused before anything is minted; re-runs
//! that skip; `--reissue`; an interrupted run whose orphan tokens the next
//! run revokes; `--root` with numeric owners; secrets in no output; and a
//! bundle that the real tetherd accepts against the real edge.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{edge_toml, Pki, TempDir};

const EDGE: &str = env!("CARGO_BIN_EXE_tether-edge");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    let out = Command::new(EDGE)
        .arg("--offline")
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A test edge config, its PKI and the CA as a PEM file.
struct Setup {
    dir: TempDir,
    config: PathBuf,
    ca: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let dir = TempDir::new(tag);
        let pki = Pki::generate(dir.path());
        let config = dir.path().join("edge.toml");
        std::fs::write(&config, edge_toml(dir.path(), &pki, "")).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pem(pki.ca.as_ref())).unwrap();
        Setup { dir, config, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn csv(&self, body: &str) -> PathBuf {
        let p = self.path("devices.csv");
        std::fs::write(&p, body).unwrap();
        p
    }

    /// `provision` with the usual flags plus `extra`.
    fn provision(&self, extra: &[&str], env: &[(&str, &str)]) -> Out {
        let ca = self.ca.to_str().unwrap().to_owned();
        let mut args = vec![
            "provision",
            "--edge",
            "edge.example.com:7443",
            "--ca",
            &ca,
            "--endpoint",
            "ssh-{label}=127.0.0.1:22",
        ];
        args.extend_from_slice(extra);
        run(&self.config, &args, env)
    }

    fn tokens(&self) -> Vec<TokenRow> {
        let out = run(&self.config, &["token", "list"], &[]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        out.stdout
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                TokenRow {
                    id: f[0].to_owned(),
                    description: f[1].to_owned(),
                    allow: f[2].to_owned(),
                    revoked: f[6] != "-",
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
struct TokenRow {
    id: String,
    description: String,
    allow: String,
    revoked: bool,
}

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for l in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(l).unwrap());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `serial -> token id` from the manifest, checking its header.
fn manifest(p: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(p).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("serial,token_id,created_unix"), "{text}");
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 3, "{l}");
            assert!(f[2].parse::<i64>().unwrap() > 0, "{l}");
            (f[0].to_owned(), f[1].to_owned())
        })
        .collect()
}

/// `serial -> id` from `PROVISIONED <serial> <id>` lines.
fn provisioned(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("PROVISIONED "))
        .map(|l| {
            let (s, id) = l.split_once(' ').unwrap();
            (s.to_owned(), id.to_owned())
        })
        .collect()
}

fn credential(bundle: &Path) -> String {
    let c = std::fs::read_to_string(bundle.join("credential")).unwrap();
    assert!(c.ends_with('\n') && c.lines().count() == 1, "{c:?}");
    c.trim_end().to_owned()
}

const THREE: &str = "\
serial,endpoints
# a comment line
GW-0001,
GW-0002
gw.3,\"acme-ssh;web-{label}=127.0.0.1:80,tls\"
";

#[test]
fn three_devices_make_three_bundles_a_manifest_and_scoped_tokens_and_no_secret_is_printed() {
    let s = Setup::new("prov-three");
    let devices = s.csv(THREE);
    let out_dir = s.path("bundles");
    let od = out_dir.to_str().unwrap();
    let dv = devices.to_str().unwrap();
    let trace = [("RUST_LOG", "trace")];
    let r = s.provision(&["--devices", dv, "--out", od], &trace);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let ids = provisioned(&r.stdout);
    assert_eq!(ids.len(), 3, "{}", r.stdout);
    assert!(
        r.stdout
            .lines()
            .any(|l| l == "SUMMARY provisioned=3 reissued=0 skipped=0 orphans_revoked=0"),
        "{}",
        r.stdout
    );
    assert_eq!(manifest(&out_dir.join("manifest.csv")), ids);

    let expect = [
        ("GW-0001", "ssh-gw-0001"),
        ("GW-0002", "ssh-gw-0002"),
        ("gw.3", "acme-ssh,web-gw-3"),
    ];
    let tokens = s.tokens();
    assert_eq!(tokens.len(), 3, "{tokens:?}");
    let mut secrets = Vec::new();
    for (serial, allow) in expect {
        let b = out_dir.join(serial);
        assert_eq!(mode(&b.join("credential")), 0o600);
        assert_eq!(mode(&b.join("ca.crt")), 0o644);
        assert_eq!(mode(&b.join("tetherd.toml")), 0o644);
        let tok = credential(&b);
        assert!(tok.starts_with(&format!("{}.", ids[serial])), "{tok}");
        secrets.push(tok.split_once('.').unwrap().1.to_owned());
        assert_eq!(
            std::fs::read_to_string(b.join("ca.crt")).unwrap(),
            std::fs::read_to_string(&s.ca).unwrap()
        );
        let row = tokens.iter().find(|t| t.id == ids[serial]).unwrap();
        assert_eq!(row.allow, allow, "{row:?}");
        assert_eq!(row.description, format!("provision:{serial}"));
        assert!(!row.revoked);

        let cfg: toml::Table =
            toml::from_str(&std::fs::read_to_string(b.join("tetherd.toml")).unwrap()).unwrap();
        assert_eq!(cfg["edge"].as_str(), Some("edge.example.com:7443"));
        assert_eq!(cfg["ca_file"].as_str(), Some("ca.crt"));
        assert!(!cfg.contains_key("credential"), "systemd passes it");
        assert!(!cfg.contains_key("server_name"), "not given");
        let names: Vec<&str> = cfg["endpoint"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.join(","), allow);
    }
    let gw3: toml::Table =
        toml::from_str(&std::fs::read_to_string(out_dir.join("gw.3/tetherd.toml")).unwrap())
            .unwrap();
    let eps = gw3["endpoint"].as_array().unwrap();
    assert_eq!(eps[0]["upstream"].as_str(), Some("127.0.0.1:22"));
    assert_eq!(eps[0]["kind"].as_str(), Some("tcp"));
    assert_eq!(eps[1]["upstream"].as_str(), Some("127.0.0.1:80"));
    assert_eq!(eps[1]["kind"].as_str(), Some("tls"));
    // Nothing but the bundles and the manifest.
    let mut entries: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["GW-0001", "GW-0002", "gw.3", "manifest.csv"]);

    // A re-run skips all three and mints nothing.
    let r2 = s.provision(&["--devices", dv, "--out", od], &trace);
    assert_eq!(r2.code, 0, "{}", r2.stderr);
    assert!(provisioned(&r2.stdout).is_empty(), "{}", r2.stdout);
    assert!(
        r2.stdout.contains("skipped=3") && r2.stderr.contains("skipped 3"),
        "{}\n{}",
        r2.stdout,
        r2.stderr
    );
    assert_eq!(s.tokens().len(), 3);
    assert_eq!(manifest(&out_dir.join("manifest.csv")), ids);

    // Secrets appear in no output, even at trace level.
    for o in [&r, &r2] {
        for secret in &secrets {
            assert!(
                !o.stdout.contains(secret.as_str()) && !o.stderr.contains(secret.as_str()),
                "a secret was printed"
            );
        }
    }
    let list = run(&s.config, &["token", "list"], &[]).stdout;
    assert!(secrets.iter().all(|x| !list.contains(x.as_str())));
}

#[test]
fn a_bad_row_is_named_by_file_line_and_field_and_nothing_is_minted_or_written() {
    let s = Setup::new("prov-bad");
    let devices = s.csv("serial\nGW-0001\nbad/serial\nGW-0003\n");
    let out_dir = s.path("bundles");
    let r = s.provision(
        &[
            "--devices",
            devices.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(r.code, 64, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("devices.csv:3: serial:") && r.stderr.contains("bad/serial"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(s.tokens().is_empty(), "nothing minted");
    assert!(!out_dir.exists(), "nothing written");

    // More kinds of bad input, each refused up front.
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            "serial\nGW-1\nGW-1\n".into(),
            vec![],
            "devices.csv:3: serial: `GW-1` is already on line 2",
        ),
        (
            "serial,endpoints\nGW-1,Bad_Name\n".into(),
            vec![],
            "devices.csv:2: endpoints:",
        ),
        (
            "serial,endpoints\nGW-1,x y\n".into(),
            vec![],
            "devices.csv:2: endpoints: `y` has no upstream",
        ),
        (
            "serial,endpoints\nGW-1,web,extra\n".into(),
            vec![],
            "devices.csv:2: -: 3 cells, but the header has 2 (serial,endpoints)",
        ),
        (
            "serial,mac\nGW-1,00:11\n".into(),
            vec![],
            "devices.csv:1: header: unknown column `mac`",
        ),
        (
            "serial,endpoints\nA,same\nB,same\n".into(),
            vec![],
            "devices.csv:3: endpoints: endpoint `same` is already device A's (line 2)",
        ),
        (
            "serial\nGW-1\n".into(),
            vec!["--endpoint".into(), "s-{serial}=h:1".into()],
            "devices.csv:2: serial: endpoint name `s-GW-1`",
        ),
        (
            "serial\nGW-1\n".into(),
            vec!["--endpoint".into(), "web=localhost".into()],
            "--endpoint upstream `localhost` is not host:port",
        ),
        (
            "serial\nGW-1\n".into(),
            vec!["--reissue".into(), "GW-1".into()],
            "--reissue GW-1: not in",
        ),
    ];
    for (csv, extra, want) in cases {
        let devices = s.csv(&csv);
        let mut args = vec![
            "--devices".to_owned(),
            devices.to_str().unwrap().to_owned(),
            "--out".into(),
            out_dir.to_str().unwrap().into(),
        ];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = s.provision(&args, &[]);
        assert_eq!(r.code, 64, "{csv}: {}", r.stderr);
        assert!(
            r.stderr.contains(want),
            "{csv}: want {want:?} in {}",
            r.stderr
        );
        assert!(s.tokens().is_empty() && !out_dir.exists(), "{csv}");
    }

    // A CA file with a private key in it, or with no certificate.
    let devices = s.csv("serial\nGW-1\n");
    for (body, want) in [
        (
            format!(
                "{}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                std::fs::read_to_string(&s.ca).unwrap()
            ),
            "holds a private key",
        ),
        ("not pem\n".to_owned(), "no PEM certificate"),
    ] {
        let ca = s.path("bad-ca.pem");
        std::fs::write(&ca, body).unwrap();
        let r = run(
            &s.config,
            &[
                "provision",
                "--devices",
                devices.to_str().unwrap(),
                "--edge",
                "edge.example.com:7443",
                "--ca",
                ca.to_str().unwrap(),
                "--endpoint",
                "ssh-{label}=127.0.0.1:22",
                "--out",
                out_dir.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(r.code, 64, "{}", r.stderr);
        assert!(r.stderr.contains(want), "{}", r.stderr);
    }

    // An endpoint name that another token may already bind.
    let t = run(&s.config, &["token", "create", "--allow", "ssh-gw-1"], &[]);
    assert_eq!(t.code, 0, "{}", t.stderr);
    let r = s.provision(
        &[
            "--devices",
            devices.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "devices.csv:2: endpoints: endpoint `ssh-gw-1` is already allowed to token tk_"
        ),
        "{}",
        r.stderr
    );
    assert_eq!(s.tokens().len(), 1);
    assert!(!out_dir.exists());
}

#[test]
fn reissue_revokes_the_old_token_and_writes_a_new_credential() {
    let s = Setup::new("prov-reissue");
    let devices = s.csv("serial\nGW-1\nGW-2\n");
    let out_dir = s.path("bundles");
    let base = [
        "--devices",
        devices.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ];
    let r = s.provision(&base, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = provisioned(&r.stdout);
    let old_cred = credential(&out_dir.join("GW-1"));

    let mut args = base.to_vec();
    args.extend(["--reissue", "GW-1"]);
    let r = s.provision(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("REISSUED GW-1 "))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    let f: Vec<&str> = line.split(' ').collect();
    let new_id = f[2].to_owned();
    assert_eq!(f[3], first["GW-1"], "{line}");
    assert!(r.stdout.contains("reissued=1 skipped=1"), "{}", r.stdout);

    let new_cred = credential(&out_dir.join("GW-1"));
    assert_ne!(new_cred, old_cred);
    assert!(new_cred.starts_with(&format!("{new_id}.")));
    assert_eq!(mode(&out_dir.join("GW-1/credential")), 0o600);
    let m = manifest(&out_dir.join("manifest.csv"));
    assert_eq!(m["GW-1"], new_id);
    assert_eq!(m["GW-2"], first["GW-2"]);
    let tokens = s.tokens();
    let old = tokens.iter().find(|t| t.id == first["GW-1"]).unwrap();
    assert!(old.revoked, "{old:?}");
    let new = tokens.iter().find(|t| t.id == new_id).unwrap();
    assert!(!new.revoked && new.allow == "ssh-gw-1", "{new:?}");
    assert!(
        !tokens
            .iter()
            .find(|t| t.id == first["GW-2"])
            .unwrap()
            .revoked
    );
    let mut entries: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["GW-1", "GW-2", "manifest.csv"], "no leftovers");
}

#[test]
fn an_interrupted_run_leaves_orphans_that_the_next_run_revokes_and_says_so() {
    let s = Setup::new("prov-abort");
    let devices = s.csv("serial\nGW-1\nGW-2\nGW-3\n");
    let out_dir = s.path("bundles");
    let base = [
        "--devices",
        devices.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ];
    // Stops after minting (the whole batch) and writing GW-2's bundle, with
    // only GW-1 in the manifest.
    let r = s.provision(&base, &[("TETHER_PROVISION_ABORT_AFTER", "1")]);
    assert_eq!(r.code, 99, "{}\n{}", r.stdout, r.stderr);
    let done = provisioned(&r.stdout);
    assert_eq!(done.keys().collect::<Vec<_>>(), ["GW-1"], "{}", r.stdout);
    assert_eq!(manifest(&out_dir.join("manifest.csv")), done);
    let orphans: Vec<String> = s
        .tokens()
        .into_iter()
        .filter(|t| t.description != "provision:GW-1")
        .map(|t| t.id)
        .collect();
    assert_eq!(orphans.len(), 2, "GW-2 and GW-3 minted, not recorded");

    let r = s.provision(&base, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for id in &orphans {
        assert!(
            r.stderr
                .lines()
                .any(|l| l.starts_with(&format!("revoked token {id} "))
                    && l.contains("interrupted run")),
            "{id} named: {}",
            r.stderr
        );
    }
    assert!(
        r.stdout
            .contains("SUMMARY provisioned=2 reissued=0 skipped=1 orphans_revoked=2"),
        "{}",
        r.stdout
    );
    let m = manifest(&out_dir.join("manifest.csv"));
    assert_eq!(m.len(), 3);
    let tokens = s.tokens();
    for id in &orphans {
        assert!(tokens.iter().find(|t| &t.id == id).unwrap().revoked);
        assert!(!m.values().any(|v| v == id));
    }
    for (serial, id) in &m {
        assert!(!tokens.iter().find(|t| &t.id == id).unwrap().revoked);
        assert!(credential(&out_dir.join(serial)).starts_with(&format!("{id}.")));
    }
    // Nothing more to recover.
    let r = s.provision(&base, &[]);
    assert!(
        r.stdout.contains("skipped=3 orphans_revoked=0"),
        "{}",
        r.stdout
    );
}

#[test]
fn root_lays_one_bundle_into_an_image_tree_with_numeric_owners() {
    let s = Setup::new("prov-root");
    let devices = s.csv("serial\nGW-1\nGW-2\n");
    let root = s.path("rootfs");
    let man = s.path("factory/manifest.csv");
    let dv = devices.to_str().unwrap();
    let rt = root.to_str().unwrap();
    let mf = man.to_str().unwrap();
    let ids = ["--uid", "1234", "--gid", "1234"];

    // Two devices selected: refused.
    let mut args = vec!["--devices", dv, "--root", rt, "--manifest", mf];
    args.extend(ids);
    let r = s.provision(&args, &[]);
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("--serial"), "{}", r.stderr);
    // Without --uid/--gid: refused.
    let r = s.provision(
        &[
            "--devices",
            dv,
            "--serial",
            "GW-1",
            "--root",
            rt,
            "--manifest",
            mf,
        ],
        &[],
    );
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("--uid"), "{}", r.stderr);
    assert!(s.tokens().is_empty() && !root.exists());

    args.extend(["--serial", "GW-1"]);
    let r = s.provision(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = provisioned(&r.stdout)["GW-1"].clone();
    let etc = root.join("etc/tether");
    let cred = std::fs::metadata(etc.join("credential")).unwrap();
    assert_eq!((cred.uid(), cred.gid()), (1234, 1234));
    assert_eq!(mode(&etc.join("credential")), 0o600);
    for f in ["ca.crt", "tetherd.toml"] {
        let m = std::fs::metadata(etc.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid(), mode(&etc.join(f))), (0, 0, 0o644), "{f}");
    }
    assert_eq!(mode(&etc), 0o755);
    assert!(credential(&etc).starts_with(&format!("{id}.")));
    assert_eq!(manifest(&man)["GW-1"], id);

    // The same run again: already there, nothing to do.
    let r = s.provision(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("skipped=1"), "{}", r.stdout);
    // Into a fresh root: its credential cannot be written again (it is not
    // kept), so the run says to --reissue.
    let root2 = s.path("rootfs2");
    let mut args2: Vec<&str> = args
        .iter()
        .map(|a| if *a == rt { root2.to_str().unwrap() } else { a })
        .collect();
    let r = s.provision(&args2, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("--reissue GW-1"), "{}", r.stderr);
    args2.extend(["--reissue", "GW-1"]);
    let r = s.provision(&args2, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cred2 = root2.join("etc/tether");
    assert_eq!(
        std::fs::metadata(cred2.join("credential")).unwrap().uid(),
        1234
    );
    assert!(s.tokens().iter().find(|t| t.id == id).unwrap().revoked);
}

/// The tetherd binary next to tether-edge (the workspace build makes both).
fn tetherd_bin() -> PathBuf {
    let p = Path::new(EDGE).with_file_name("tetherd");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace or scripts/test)",
        p.display()
    );
    p
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of `child`'s stdout, through a channel.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            if tx.send(l.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return l,
            Ok(_) => {}
            Err(e) => panic!("no {prefix:?} line: {e}"),
        }
    }
}

#[test]
fn a_bundle_is_accepted_by_the_real_tetherd_and_binds_its_endpoint() {
    let tetherd = tetherd_bin();
    let s = Setup::new("prov-e2e");
    let mut edge = Kill(
        Command::new(EDGE)
            .arg("--config")
            .arg(&s.config)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let edge_lines = lines(&mut edge.0);
    let agent = wait_for(&edge_lines, "LISTEN agent ");
    let addr = agent.trim_start_matches("LISTEN agent ").to_owned();

    let devices = s.csv("serial\nE2E-1\n");
    let out_dir = s.path("bundles");
    let ca = s.ca.to_str().unwrap().to_owned();
    let r = run(
        &s.config,
        &[
            "provision",
            "--devices",
            devices.to_str().unwrap(),
            "--edge",
            &addr,
            "--server-name",
            "localhost",
            "--ca",
            &ca,
            "--endpoint",
            "ssh-{label}=127.0.0.1:9",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bundle = out_dir.join("E2E-1");
    // As the unit runs it: the credential through $CREDENTIALS_DIRECTORY,
    // the config naming ca.crt relative to itself.
    let mut daemon = Kill(
        Command::new(&tetherd)
            .arg("--config")
            .arg(bundle.join("tetherd.toml"))
            .arg("--allow-root")
            .env("CREDENTIALS_DIRECTORY", &bundle)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let bound = wait_for(&edge_lines, "BOUND ");
    assert!(bound.starts_with("BOUND ssh-e2e-1 tcp://"), "{bound}");
    let _ = daemon.0.kill();
    let mut err = String::new();
    use std::io::Read as _;
    let _ = daemon.0.stderr.take().unwrap().read_to_string(&mut err);
    let secret = credential(&bundle).split_once('.').unwrap().1.to_owned();
    assert!(!err.contains(&secret), "tetherd printed no secret");
}
