//! The real binary: `token create/list/revoke` round trip against the store
//! (which never holds a secret), `serve` with its stdout lines, a fake
//! agent, and SIGTERM ending it with exit 0; and the binary explaining
//! itself: `--version` prints the build line that `serve` prints first,
//! `--help` names every command, global flag, stdout line, signal and exit
//! code, each command's `--help` its own flags,
//! and a config file that cannot be read is reported as
//! `error: <path>: <what>: <why>`, without a line or field it does not have.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{edge_toml, within, Agent, Msg, Pki, TempDir};
use tether_proto::{EndpointKind, ErrorCode};

/// `tether-edge --offline --config CONFIG ARGS...`: on the store.
fn edge(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-edge"))
        .arg("--offline")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn setup(tag: &str) -> (TempDir, Pki, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let pki = Pki::generate(dir.path());
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, edge_toml(dir.path(), &pki, "")).unwrap();
    (dir, pki, config)
}

/// Every byte under `dir`, concatenated (the database and any journal).
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn token_create_list_revoke_round_trip_and_the_db_holds_no_secret() {
    let (dir, _pki, config) = setup("cli-tokens");
    let (code, out, err) = edge(
        &config,
        &[
            "token",
            "create",
            "--description",
            "gateway 7",
            "--allow",
            "web",
            "--allow",
            "ssh",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let token = out.trim().to_owned();
    assert_eq!(out.lines().count(), 1, "the token alone on stdout: {out:?}");
    assert!(token.starts_with("tk_") && token.len() == 59, "{token}");
    let id = &token[..15]; // tk_<12 hex>, as the CLI and logs show it
    assert!(err.contains(id), "the id on stderr: {err}");
    let secret = &token[16..];

    let (code, list, _) = edge(&config, &["token", "list"]);
    assert_eq!(code, 0);
    let row = list
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} listed: {list}"));
    assert!(
        row.contains("gateway 7") && row.contains("web,ssh"),
        "{row}"
    );
    assert!(list.lines().next().unwrap().starts_with("ID"), "{list}");
    assert!(!list.contains(secret), "list never shows secrets");

    let (code, _, err) = edge(&config, &["token", "revoke", id]);
    assert_eq!(code, 0, "{err}");
    let (_, list, _) = edge(&config, &["token", "list"]);
    let row = list.lines().find(|l| l.starts_with(id)).unwrap();
    let header = list.lines().next().unwrap();
    let (at, end) = (
        header.find("REVOKED").unwrap(),
        header.find("ROTATION").unwrap(),
    );
    assert_ne!(row[at..end].trim(), "-", "revoked column is set: {row}");

    let (code, _, err) = edge(&config, &["token", "revoke", "0123456789ab"]);
    assert_eq!(code, 1, "unknown id: {err}");
    assert!(err.contains("0123456789ab"), "{err}");

    // Neither the secret's text nor its bytes are anywhere in the state dir.
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(secret)
        .unwrap();
    let bytes = all_bytes(&dir.path().join("state"));
    assert!(!bytes.is_empty());
    assert!(
        !contains(&bytes, secret.as_bytes()),
        "the secret's text is not stored"
    );
    assert!(!contains(&bytes, &raw), "the secret's bytes are not stored");
    assert!(contains(&bytes, &token.as_bytes()[3..15]), "the id is");
}

#[test]
fn serve_prints_listen_bound_unbound_and_exits_0_on_sigterm() {
    let (_dir, pki, config) = setup("cli-serve");
    let (_, token, _) = edge(&config, &["token", "create", "--allow", "web"]);
    let token = token.trim().to_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-edge"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let (etx, erx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = etx.send(l);
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a stdout line")
    };
    let agent_line = next();
    let tls_line = next();
    let addr = |l: &str, p: &str| -> std::net::SocketAddr {
        l.strip_prefix(p)
            .unwrap_or_else(|| panic!("{l:?}"))
            .parse()
            .unwrap()
    };
    let agent_addr = addr(&agent_line, "LISTEN agent ");
    let tls_addr = addr(&tls_line, "LISTEN tls ");
    assert_ne!(tls_addr.port(), 0);

    smol::block_on(async {
        let dial = || {
            Agent::dial(
                agent_addr,
                &pki,
                tether_proto::Config::new(tether_proto::Role::Client),
            )
        };
        let a = dial().await;
        assert!(matches!(a.hello(&token).await, Some(Msg::Welcome { .. })));
        let url = a.bind_ok("web", EndpointKind::Tls).await;
        assert_eq!(next(), format!("BOUND web {url}"));
        let bad = dial().await;
        assert!(matches!(
            bad.hello("tk_000000000000.nope").await,
            Some(Msg::Error { .. })
        ));
        a.session.goaway(ErrorCode::NO_ERROR);
        let _ = within(Duration::from_secs(5), a.driver).await;
        assert_eq!(next(), "UNBOUND web");

        // Revocation from another process reaches the running server.
        let a = dial().await;
        assert!(matches!(a.hello(&token).await, Some(Msg::Welcome { .. })));
        let url = a.bind_ok("web", EndpointKind::Tls).await;
        assert_eq!(next(), format!("BOUND web {url}"));
        let t0 = std::time::Instant::now();
        let (code, _, err) = edge(&config, &["token", "revoke", &token[3..15]]);
        assert_eq!(code, 0, "{err}");
        match a.recv().await {
            Some(Msg::Error { code, .. }) => assert_eq!(code, ErrorCode::TOKEN_REVOKED),
            other => panic!("expected TOKEN_REVOKED, got {other:?}"),
        }
        let _ = within(Duration::from_secs(5), a.driver).await;
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "closed {:?} after the revoke",
            t0.elapsed()
        );
        assert_eq!(next(), "UNBOUND web");
    });

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "graceful stop");
    let logs: Vec<String> = erx.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.starts_with("tether-edge 0.1.0 (")),
        "build line: {logs:#?}"
    );
    // Refusals are counted and summarised, not logged one by one.
    let refused: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("refused in the last") && l.contains(" malformed_token=1 "))
        .collect();
    assert_eq!(refused.len(), 1, "one summary names the refusal: {logs:#?}");
    assert!(
        !logs.iter().any(|l| l.contains(&token[16..])),
        "no secret in the logs"
    );
    let line = format!("token {} revoked: closed 1 session(s)", &token[..15]);
    assert!(logs.iter().any(|l| l.contains(&line)), "{line}: {logs:#?}");
}

#[test]
fn token_create_without_allow_is_refused_instead_of_allowing_everything() {
    let (_dir, _pki, config) = setup("cli-no-allow");
    let (code, out, err) = edge(&config, &["token", "create", "--description", "forgot"]);
    assert_eq!(code, 64, "{err}");
    assert!(out.is_empty(), "no token minted: {out}");
    assert!(err.contains("--allow"), "says what is missing: {err}");
    let (code, out, _) = edge(&config, &["token", "list"]);
    assert_eq!(code, 0);
    assert!(!out.contains("forgot"), "nothing stored: {out}");
}

/// Runs `tether-edge args` (no `--config` added): (exit code, stdout, stderr).
fn edge_args(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-edge"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_prints_the_build_line_that_serve_prints_first_and_exits_0() {
    let dir = TempDir::new("cli-version");
    // serve prints the build line first on stderr, before it reads the config.
    let (_, _, err) = edge(&dir.path().join("none.toml"), &["serve"]);
    let build_line = err.lines().next().expect("a first stderr line");
    assert!(
        build_line.starts_with(&format!("tether-edge {} (", env!("CARGO_PKG_VERSION"))),
        "the build line names program and crate version: {build_line:?}"
    );
    for flag in ["--version", "-V"] {
        let (code, out, err) = edge_args(&[flag.as_ref()]);
        assert_eq!(code, 0, "{flag}: {err}");
        assert_eq!(out, format!("{build_line}\n"), "{flag}");
    }
}

#[test]
fn help_names_every_command_flag_stdout_line_signal_and_exit_code() {
    let (code, help, err) = edge_args(&["--help".as_ref()]);
    assert_eq!(code, 0, "{err}");
    for want in [
        // clap's layout, which help2man reads (scripts/man).
        "Usage: tether-edge [OPTIONS] [COMMAND]",
        "\nCommands:\n",
        "  serve ",
        "  token ",
        "  apikey ",
        "  endpoint ",
        "  session ",
        "  event ",
        "  status ",
        "  provision ",
        "\nGlobal options:\n",
        "  -c, --config <FILE>",
        "      --offline",
        "      --api <URL>",
        "      --api-key-file <FILE>",
        "      --api-ca <PEM>",
        "  -o, --output <FORMAT>",
        "  -h, --help",
        "  -V, --version",
        "there is no default path",
        // Where the API and its key come from, and that argv never holds it.
        "TETHER_API_URL",
        "TETHER_API_KEY ",
        "TETHER_API_KEY_FILE",
        "visible in ps",
        // Files: the config and the token store.
        "\nFiles:\n",
        "<state_dir>/tokens.db",
        "error: FILE:LINE: FIELD: REASON",
        "error: FILE: cannot read the config file: REASON",
        // The stdout lines (README, "Machine-readable output").
        "LISTEN agent <ip:port>, LISTEN tls <ip:port>",
        "BOUND <endpoint> <url>",
        "UNBOUND <endpoint>",
        // Signals: the two it handles and the one people expect.
        "SIGTERM, SIGINT ",
        "GOAWAY(NO_ERROR)",
        "SIGHUP",
        // Every exit code the program uses.
        "\nExit status:\n",
        "  0    ",
        "  1    ",
        "  64   ",
        // The environment.
        "\nEnvironment:\n",
        "RUST_LOG",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
    // -h is the summary, and points to --help.
    let (code, short, _) = edge_args(&["-h".as_ref()]);
    assert_eq!(code, 0);
    assert!(
        short.len() < help.len() / 2 && short.contains("'--help'"),
        "{short}"
    );
    // Each command has its own help, with its flags.
    for (cmd, flags) in [
        (
            &["token", "create"][..],
            &["--allow <RULE>", "--source <CIDR>", "--description <TEXT>"][..],
        ),
        (
            &["token", "update"],
            &["<ID>", "--allow <RULE>", "--source <CIDR>", "--any-source"],
        ),
        (&["token", "rotate"], &["<ID>", "only then is ID retired"]),
        (
            &["apikey", "create"],
            &["--role <ROLE>", "read (every GET) or admin"],
        ),
        (
            &["event", "list"],
            &[
                "--kind <KIND>",
                "--token <ID>",
                "--since <MS>",
                "--limit <N>",
            ],
        ),
        (&["session", "list"], &["--token <ID>"]),
        (
            &["endpoint", "release"],
            &["<NAME>", "next token allowed to bind it owns"],
        ),
        (
            &["provision"],
            &[
                "--devices <CSV>",
                "--serial <SERIAL>",
                "--root <DIR>",
                "--reissue <SERIAL>",
            ],
        ),
    ] {
        let mut args: Vec<&std::ffi::OsStr> = cmd.iter().map(|c| c.as_ref()).collect();
        args.push("--help".as_ref());
        let (code, text, err) = edge_args(&args);
        assert_eq!(code, 0, "{cmd:?}: {err}");
        assert!(
            text.contains(&format!("Usage: tether-edge {}", cmd.join(" "))),
            "{cmd:?}: {text}"
        );
        for f in flags {
            assert!(text.contains(f), "{cmd:?} --help lacks {f:?}:\n{text}");
        }
    }
    // A usage error exits 64, says what is wrong, and points to --help.
    for bad in [
        &["frobnicate"][..],
        &["token", "create", "--alow", "x"],
        &["event", "list", "--limit", "0"],
    ] {
        let args: Vec<&std::ffi::OsStr> = bad.iter().map(|c| c.as_ref()).collect();
        let (code, out, err) = edge_args(&args);
        assert_eq!(code, 64, "{bad:?}: {err}");
        assert!(out.is_empty(), "{bad:?}: {out}");
        assert!(
            err.starts_with("error: ") && err.contains("--help"),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn an_unreadable_config_file_is_named_without_a_line_or_field_and_exits_64() {
    let dir = TempDir::new("cli-noconfig");
    // A missing file, and a directory where the file should be.
    for path in [dir.path().join("nonexistent.toml"), dir.path().join("")] {
        let why = std::fs::read_to_string(&path).unwrap_err().to_string();
        let want = format!(
            "error: {}: cannot read the config file: {why}",
            path.display()
        );
        for args in [&["serve"][..], &["token", "list"]] {
            let (code, _, err) = edge(&path, args);
            assert_eq!(code, 64, "{args:?}: {err}");
            let line = err.lines().find(|l| l.starts_with("error: ")).unwrap();
            assert_eq!(line, want, "{args:?}");
            assert!(!line.contains(":1:") && !line.contains(" -: "), "{line}");
        }
    }
}
