//! The admin API end to end, with curl as the client against an edge in
//! this process: keys and roles, tokens through the API reaching live
//! sessions (a revoke closes them within 1 s, a narrowing unbinds), the
//! events every mutation records (exact counts), the lists and their
//! cursors, the source allow / deny at accept (a denied address never
//! reaches a handler), size limits, timeouts, the connection cap, HTTPS and
//! a unix socket.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};

use std::net::TcpStream as StdTcp;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{url_addr, Agent, Env, Msg};
use tether_edge::store::{Role, SqliteStore, Store as _};
use tether_proto::{EndpointKind, ErrorCode};

/// Appends `[api]` (port 0) plus `extra` lines to the test config.
async fn start(tag: &str, extra: &str) -> Env {
    let extra = extra.to_owned();
    Env::start_with(tag, move |t| {
        format!("{t}\n[api]\nlisten = \"127.0.0.1:0\"\n{extra}\n")
    })
    .await
}

/// An edge whose API listens on the unix socket `sock`.
async fn start_unix(tag: &str, sock: &std::path::Path) -> Env {
    let sock = sock.to_owned();
    Env::start_with(tag, move |t| {
        format!("{t}\n[api]\nlisten = \"unix:{}\"\n", sock.display())
    })
    .await
}

/// An edge whose API speaks HTTPS on 127.0.0.1, with the agent port's
/// certificate (for localhost, signed by the test CA).
async fn start_https(tag: &str) -> Env {
    Env::start_with(tag, |t| {
        let cert = t
            .lines()
            .find(|l| l.starts_with("cert = ") && l.contains("agent.crt"))
            .unwrap()
            .to_owned();
        let key = cert
            .replace("cert = ", "key = ")
            .replace("agent.crt", "agent.key");
        format!("{t}\n[api]\nlisten = \"127.0.0.1:0\"\n{cert}\n{key}\n")
    })
    .await
}

fn key(store: &SqliteStore, role: Role) -> String {
    store
        .create_api_key(role, "test", None)
        .unwrap()
        .key
        .expose()
        .to_owned()
}

/// What curl got: the status (0: no HTTP answer), the body, curl's exit code.
#[derive(Debug)]
struct Got {
    status: u16,
    body: String,
    headers: String,
    exit: i32,
}

impl Got {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Runs curl against `url` + `path` with `args` (on the blocking pool: the
/// edge runs on this thread's executor).
async fn curl(url: &str, path: &str, key: Option<&str>, args: &[&str]) -> Got {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10", "-D", "/dev/stderr", "-o", "-"]);
    c.args(["-w", "\n%{http_code}"]);
    if let Some(k) = key {
        c.arg("-H").arg(format!("Authorization: Bearer {k}"));
    }
    c.args(args);
    match url.strip_prefix("unix:") {
        Some(sock) => {
            c.arg("--unix-socket").arg(sock);
            c.arg(format!("http://localhost{path}"));
        }
        None => {
            c.arg(format!("{url}{path}"));
        }
    }
    let out = smol::unblock(move || c.output().expect("curl runs")).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Got {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        headers: String::from_utf8_lossy(&out.stderr).into_owned(),
        exit: out.status.code().unwrap_or(-1),
    }
}

async fn post(url: &str, path: &str, key: &str, json: &str) -> Got {
    curl(
        url,
        path,
        Some(key),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            json,
        ],
    )
    .await
}

fn events(store: &SqliteStore, kind: &str) -> usize {
    store
        .events(&tether_edge::events::EventQuery {
            kind: tether_edge::events::EventKind::parse(kind),
            limit: 10_000,
            ..Default::default()
        })
        .unwrap()
        .len()
}

/// A public client sends 5 bytes through the tcp endpoint at `url`; the
/// device (`a`) answers 10.
async fn hello_through(a: &Agent, url: &str) {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let mut c = smol::net::TcpStream::connect(url_addr(url)).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    c.close().await.unwrap();
    let mut st = common::within(Duration::from_secs(5), a.session.accept())
        .await
        .unwrap();
    let mut got = Vec::new();
    st.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello");
    st.write_all(b"hello back").await.unwrap();
    st.close().await.unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hello back");
}

#[test]
fn tokens_through_the_api_reach_live_sessions_and_a_read_key_cannot_revoke() {
    smol::block_on(async {
        let mut env = start("api-tokens", "").await;
        let api = env.api.clone().expect("api listener");
        assert!(api.starts_with("http://127.0.0.1:"), "{api}");
        let store = env.store();
        let admin = key(&store, Role::Admin);
        let read = key(&store, Role::Read);

        // An admin key creates a token scoped to *.site-42; its secret is
        // in this answer only.
        let g = post(
            &api,
            "/tokens",
            &admin,
            r#"{"description":"cam 42","allow":["*.site-42"]}"#,
        )
        .await;
        assert_eq!(g.status, 201, "{g:?}");
        let v = g.json();
        let secret = v["secret"].as_str().unwrap().to_owned();
        let id = v["token"]["id"].as_str().unwrap().to_owned();
        assert_eq!(v["token"]["allow"], serde_json::json!(["*.site-42"]));
        assert!(secret.starts_with(&format!("{id}.")), "{secret} is {id}'s");

        // The device authenticates with it and binds what the rule allows.
        let a = Agent::welcome(&env, &secret).await;
        a.bind_ok("cam.site-42", EndpointKind::Tcp).await;
        let ssh = a.bind_ok("ssh.site-42", EndpointKind::Tcp).await;

        // The token is listed and shown, never with its secret.
        let g = curl(&api, &format!("/tokens/{id}"), Some(&read), &[]).await;
        assert_eq!(g.status, 200, "{g:?}");
        assert!(!g.body.contains(&secret[16..]), "no secret in {}", g.body);
        assert_eq!(g.json()["description"], "cam 42");

        // Narrowing it through the API unbinds ssh within 1 s.
        let t0 = Instant::now();
        let g = curl(
            &api,
            &format!("/tokens/{id}"),
            Some(&admin),
            &[
                "-X",
                "PATCH",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                r#"{"allow":["cam.site-42"]}"#,
            ],
        )
        .await;
        assert_eq!(g.status, 200, "{g:?}");
        match a.recv().await {
            Some(Msg::BindErr { endpoint, .. }) => assert_eq!(endpoint, "ssh.site-42"),
            other => panic!("expected BindErr for ssh.site-42, got {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        common::until(Duration::from_secs(1), "ssh's port closed", || {
            common::port_closed(url_addr(&ssh))
        })
        .await;

        // A read key may not revoke: 403, and the token stays active.
        let g = post(&api, &format!("/tokens/{id}/revoke"), &read, "").await;
        assert_eq!(g.status, 403, "{g:?}");
        assert_eq!(g.json()["error"], "forbidden");
        assert!(store.get(&id).unwrap().unwrap().revoked_at.is_none());
        assert!(!a.session.is_closing());

        // An admin key revokes; the live session closes within 1 s.
        let t0 = Instant::now();
        let g = post(&api, &format!("/tokens/{id}/revoke"), &admin, "").await;
        assert_eq!(g.status, 200, "{g:?}");
        assert!(g.json()["revoked_at"].is_i64());
        match a.recv().await {
            Some(Msg::Error { code, .. }) => assert_eq!(code, ErrorCode::TOKEN_REVOKED),
            other => panic!("expected Error(TOKEN_REVOKED), got {other:?}"),
        }
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(1), "closed after {took:?}");

        // Every mutation is an event naming the key that made it; the
        // refused revoke made none.
        let admin_id = format!("ak_{}", &admin[3..15]);
        let g = curl(&api, "/events?limit=50", Some(&read), &[]).await;
        assert_eq!(g.status, 200, "{g:?}");
        let items = g.json()["items"].as_array().unwrap().clone();
        let by_key: Vec<&str> = items
            .iter()
            .filter(|e| !e["api_key_id"].is_null())
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            by_key,
            ["token_revoked", "token_updated", "token_created"],
            "{items:?}"
        );
        for e in &items {
            assert_eq!(e["token_id"], id.as_str(), "{e}");
            if !e["api_key_id"].is_null() {
                assert_eq!(e["api_key_id"], admin_id.as_str(), "{e}");
            }
        }
        let g = curl(&api, "/events?kind=token_updated", Some(&read), &[]).await;
        assert_eq!(g.json()["items"].as_array().unwrap().len(), 1, "{g:?}");
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn sessions_endpoints_and_pages_show_the_live_state() {
    smol::block_on(async {
        let mut env = start("api-lists", "").await;
        let api = env.api.clone().unwrap();
        let read = key(&env.store(), Role::Read);
        let (token, id) = env.token(&["web"]);
        let a = Agent::welcome(&env, &token).await;
        let url = a.bind_ok("web", EndpointKind::Tcp).await;

        // Bytes through the endpoint are counted on its session and endpoint.
        hello_through(&a, &url).await;
        // The counters are added as the copy loops move each chunk.
        common::until(Duration::from_secs(2), "bytes counted", || async {
            let v = curl(&api, "/sessions", Some(&read), &[]).await.json();
            v["items"][0]["bytes_down"] == 10
        })
        .await;
        let g = curl(&api, "/sessions", Some(&read), &[]).await;
        assert_eq!(g.status, 200, "{g:?}");
        let v = g.json();
        let s = &v["items"][0];
        assert_eq!(s["token_id"], id.as_str(), "{v}");
        assert_eq!(s["endpoints"], serde_json::json!(["web"]));
        assert_eq!(s["bytes_up"], 5, "{s}");
        assert_eq!(s["bytes_down"], 10, "{s}");
        assert!(s["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert_eq!(v["next_cursor"], serde_json::Value::Null);

        let g = curl(&api, "/endpoints", Some(&read), &[]).await;
        let e = &g.json()["items"][0];
        assert_eq!(e["name"], "web", "{g:?}");
        assert_eq!(e["bound"], true);
        assert_eq!(e["url"], url.as_str());
        assert_eq!(e["owner_token_id"], id.as_str());
        assert_eq!(e["bytes_up"], 5);
        assert_eq!(e["policy"], "none");

        // Five tokens in all: pages of two, three pages, each token once.
        for _ in 0..4 {
            env.token(&["x"]);
        }
        let mut seen = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let q = if cursor.is_empty() {
                "/tokens?limit=2".to_owned()
            } else {
                format!("/tokens?limit=2&cursor={cursor}")
            };
            let v = curl(&api, &q, Some(&read), &[]).await.json();
            pages += 1;
            for t in v["items"].as_array().unwrap() {
                seen.push(t["id"].as_str().unwrap().to_owned());
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen.len(), 5);
        assert_eq!(sorted, seen, "by id, each once");
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn requests_that_are_wrong_get_json_errors_that_say_why() {
    smol::block_on(async {
        let mut env = start("api-errors", "max_body_bytes = 2048").await;
        let api = env.api.clone().unwrap();
        let store = env.store();
        let admin = key(&store, Role::Admin);

        let g = curl(&api, "/tokens", None, &[]).await;
        assert_eq!(g.status, 401, "{g:?}");
        assert!(g
            .headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"));
        let g = curl(&api, "/tokens", Some("ak_nothex.x"), &[]).await;
        assert_eq!(g.status, 401);
        let forged = format!("{}{}", &admin[..16], "A".repeat(43));
        assert_eq!(curl(&api, "/tokens", Some(&forged), &[]).await.status, 401);

        let revoked = key(&store, Role::Admin);
        let rid = tether_edge::store::ApiKeyId::parse(&revoked[..15]).unwrap();
        store.revoke_api_key(&rid).unwrap();
        let g = curl(&api, "/tokens", Some(&revoked), &[]).await;
        assert_eq!(g.status, 401);
        assert!(g.body.contains("revoked"), "{g:?}");

        let g = post(&api, "/tokens", &admin, r#"{"allow":["Bad_Name"]}"#).await;
        assert_eq!(g.status, 400, "{g:?}");
        assert!(
            g.json()["message"].as_str().unwrap().contains("allow"),
            "{g:?}"
        );
        let g = post(
            &api,
            "/tokens",
            &admin,
            r#"{"allow":["web"],"sources":["10.0.0.1/8"]}"#,
        )
        .await;
        assert_eq!(g.status, 400, "{g:?}");
        assert!(g.body.contains("sources"), "{g:?}");
        let g = post(&api, "/tokens", &admin, r#"{"allow":[]}"#).await;
        assert_eq!(g.status, 400, "{g:?}");
        let g = post(
            &api,
            "/tokens",
            &admin,
            r#"{"allow":["web"],"colour":"red"}"#,
        )
        .await;
        assert_eq!(g.status, 400, "{g:?}");
        assert!(g.body.contains("colour"), "{g:?}");
        let g = post(&api, "/tokens", &admin, "{not json").await;
        assert_eq!(g.status, 400, "{g:?}");
        let g = curl(
            &api,
            "/tokens",
            Some(&admin),
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: text/plain",
                "--data-binary",
                "x",
            ],
        )
        .await;
        assert_eq!(g.status, 415, "{g:?}");

        // A body over max_body_bytes: refused by its length, and when sent
        // chunked (no length), refused once the limit is passed.
        let big = format!(
            r#"{{"allow":["web"],"description":"{}"}}"#,
            "d".repeat(4096)
        );
        let g = post(&api, "/tokens", &admin, &big).await;
        assert_eq!(g.status, 413, "{g:?}");
        let g = curl(
            &api,
            "/tokens",
            Some(&admin),
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &big,
            ],
        )
        .await;
        assert_eq!(g.status, 413, "{g:?}");

        let g = curl(&api, "/nothing", Some(&admin), &[]).await;
        assert_eq!(g.status, 404, "{g:?}");
        let g = curl(&api, "/tokens", Some(&admin), &["-X", "DELETE"]).await;
        assert_eq!(g.status, 405, "{g:?}");
        assert!(
            g.headers.to_ascii_lowercase().contains("allow: get, post"),
            "{g:?}"
        );
        let g = curl(&api, "/tokens?limti=3", Some(&admin), &[]).await;
        assert_eq!(g.status, 400, "{g:?}");
        assert!(g.body.contains("limti"), "{g:?}");
        let g = curl(&api, "/tokens?limit=0", Some(&admin), &[]).await;
        assert_eq!(g.status, 400, "{g:?}");
        let g = curl(&api, "/tokens/tk_000000000000", Some(&admin), &[]).await;
        assert_eq!(g.status, 404, "{g:?}");
        let g = curl(&api, "/events?kind=nope", Some(&admin), &[]).await;
        assert_eq!(g.status, 400, "{g:?}");

        // A revoked token does not change: 409.
        let (_, id) = env.token(&["web"]);
        store.revoke(&id).unwrap();
        let g = curl(
            &api,
            &format!("/tokens/{id}"),
            Some(&admin),
            &[
                "-X",
                "PATCH",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                r#"{"description":"x"}"#,
            ],
        )
        .await;
        assert_eq!(g.status, 409, "{g:?}");

        // No failed request created anything.
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(events(&store, "token_created"), 0);
        let g = curl(&api, "/healthz", None, &[]).await;
        assert_eq!(g.status, 200, "{g:?}");
        assert_eq!(g.json()["status"], "ok");
        let g = curl(&api, "/openapi.json", None, &[]).await;
        assert_eq!(g.json()["openapi"], "3.0.3");
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn a_denied_source_never_reaches_a_handler() {
    smol::block_on(async {
        let mut env = start("api-deny", "allow = [\"192.0.2.0/24\"]").await;
        let api = env.api.clone().unwrap();
        let store = env.store();
        let admin = key(&store, Role::Admin);
        let g = post(&api, "/tokens", &admin, r#"{"allow":["web"]}"#).await;
        assert_eq!(g.status, 0, "no HTTP answer at all: {g:?}");
        assert_ne!(g.exit, 0, "{g:?}");
        // Not even the key check ran: the key was never used.
        let k = store.list_api_keys().unwrap();
        assert_eq!(k[0].last_used_at, None, "{k:?}");
        assert!(store.list().unwrap().is_empty());
        let g = curl(&api, "/healthz", None, &[]).await;
        assert_eq!(g.status, 0, "{g:?}");
        env.finish().await.expect("clean stop");
    });

    // deny wins over allow, the same way.
    smol::block_on(async {
        let mut env = start("api-deny2", "deny = [\"127.0.0.0/8\"]").await;
        let api = env.api.clone().unwrap();
        assert_eq!(curl(&api, "/healthz", None, &[]).await.status, 0);
        env.finish().await.expect("clean stop");
    });
}

/// Opens a connection that sends half a request line and holds it.
fn half_request(addr: std::net::SocketAddr) -> StdTcp {
    let mut c = StdTcp::connect(addr).unwrap();
    c.write_all(b"GET /healthz HT").unwrap();
    c
}

#[test]
fn slow_clients_time_out_and_connections_are_capped() {
    smol::block_on(async {
        let mut env = start("api-slow", "max_connections = 2\nheader_timeout_ms = 600").await;
        let api = env.api.clone().unwrap();
        let addr: std::net::SocketAddr = api.strip_prefix("http://").unwrap().parse().unwrap();

        // A client that never finishes its headers is closed after the
        // header timeout.
        let t0 = Instant::now();
        let took = smol::unblock(move || {
            let mut c = half_request(addr);
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = Vec::new();
            let _ = c.read_to_end(&mut b);
            t0.elapsed()
        })
        .await;
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "closed after {took:?}"
        );

        // Two held connections fill the cap: a third is not served until
        // one of them ends (here: by its header timeout).
        let (h1, h2) = smol::unblock(move || (half_request(addr), half_request(addr))).await;
        smol::Timer::after(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        let g = curl(&api, "/healthz", None, &[]).await;
        let waited = t0.elapsed();
        assert_eq!(g.status, 200, "{g:?}");
        assert!(
            waited >= Duration::from_millis(300),
            "served after {waited:?}, beside two held connections"
        );
        drop((h1, h2));
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn https_and_a_unix_socket() {
    smol::block_on(async {
        let sock_dir = common::TempDir::new("api-sock");
        let sock = sock_dir.path().join("api.sock");
        let mut env = start_unix("api-unix", &sock).await;
        let api = env.api.clone().unwrap();
        assert_eq!(api, format!("unix:{}", sock.display()));
        let admin = key(&env.store(), Role::Admin);
        let g = curl(&api, "/tokens", Some(&admin), &[]).await;
        assert_eq!(g.status, 200, "{g:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "{mode:o}");
        env.finish().await.expect("clean stop");
        assert!(!sock.exists(), "the socket is removed at shutdown");
    });

    smol::block_on(async {
        let mut env = start_https("api-https").await;
        let api = env.api.clone().unwrap();
        let port = api.rsplit(':').next().unwrap().to_owned();
        assert!(api.starts_with("https://"), "{api}");
        let admin = key(&env.store(), Role::Admin);
        let ca = env.pki.ca_file.display().to_string();
        let local = format!("https://localhost:{port}");
        let g = curl(&local, "/tokens", Some(&admin), &["--cacert", &ca]).await;
        assert_eq!(g.status, 200, "{g:?}");
        // Plain HTTP on the HTTPS port gets no API answer.
        let plain = format!("http://127.0.0.1:{port}");
        assert_ne!(curl(&plain, "/healthz", None, &[]).await.status, 200);
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn the_api_off_loopback_needs_https() {
    let dir = common::TempDir::new("api-config");
    let pki = common::Pki::generate(dir.path());
    let base = common::edge_toml(dir.path(), &pki, "");
    let path = dir.path().join("edge.toml");
    let e = tether_edge::Config::parse(
        &path,
        &format!("{base}\n[api]\nlisten = \"0.0.0.0:7070\"\n"),
    )
    .unwrap_err();
    assert_eq!(e.field, "api.listen", "{e}");
    assert!(e.reason.contains("HTTPS"), "{e}");
    let e = tether_edge::Config::parse(
        &path,
        &format!(
            "{base}\n[api]\nlisten = \"0.0.0.0:7070\"\ncert = \"{}\"\n",
            pki.agent_cert.display()
        ),
    )
    .unwrap_err();
    assert_eq!(e.field, "api.key", "{e}");
    let e = tether_edge::Config::parse(
        &path,
        &format!("{base}\n[api]\nlisten = \"unix:api.sock\"\n"),
    )
    .unwrap_err();
    assert!(e.reason.contains("absolute"), "{e}");
    let ok = tether_edge::Config::parse(
        &path,
        &format!(
            "{base}\n[api]\nlisten = \"0.0.0.0:7070\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.agent_cert.display(),
            pki.agent_key.display()
        ),
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn the_first_key_is_made_offline_and_shown_once() {
    let dir = common::TempDir::new("api-cli");
    let pki = common::Pki::generate(dir.path());
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, common::edge_toml(dir.path(), &pki, "")).unwrap();
    let bin = env!("CARGO_BIN_EXE_tether-edge");
    let run = |args: &[&str]| {
        Command::new(bin)
            .arg("--offline")
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "apikey",
        "create",
        "--role",
        "admin",
        "--description",
        "ops",
    ]);
    assert!(out.status.success(), "{out:?}");
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        secret.starts_with("ak_") && secret.len() == 3 + 12 + 1 + 43,
        "{secret}"
    );
    let out = run(&["apikey", "list"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains(&secret[..15]) && table.contains("admin"),
        "{table}"
    );
    assert!(!table.contains(&secret[16..]), "no secret in the list");
    let out = run(&["apikey", "create"]);
    assert_eq!(out.status.code(), Some(64), "--role is required: {out:?}");
    let out = run(&["apikey", "create", "--role", "root"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = run(&["apikey", "revoke", &secret[..15]]);
    assert!(out.status.success(), "{out:?}");
    let store = SqliteStore::open(&dir.path().join("state")).unwrap();
    assert!(matches!(
        store.verify_api_key(&secret),
        Err(tether_edge::store::AuthError::Revoked(_))
    ));
    assert_eq!(events(&store, "apikey_created"), 1);
    assert_eq!(events(&store, "apikey_revoked"), 1);
}

/// Counts of each kind in `items`, sorted by kind.
fn kinds(items: &serde_json::Value) -> Vec<(String, usize)> {
    let mut m = std::collections::BTreeMap::new();
    for e in items.as_array().unwrap() {
        *m.entry(e["kind"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    m.into_iter().collect()
}

#[test]
fn events_reflect_a_scripted_sequence_exactly() {
    smol::block_on(async {
        let mut env = start("api-events", "").await;
        let api = env.api.clone().unwrap();
        let store = env.store();
        let admin = key(&store, Role::Admin);

        let g = post(&api, "/tokens", &admin, r#"{"allow":["web"]}"#).await;
        assert_eq!(g.status, 201, "{g:?}");
        let secret = g.json()["secret"].as_str().unwrap().to_owned();
        let id = g.json()["token"]["id"].as_str().unwrap().to_owned();

        // One session: a bind accepted, a bind refused.
        let a = Agent::welcome(&env, &secret).await;
        a.bind_ok("web", EndpointKind::Tcp).await;
        match a.bind("cam", EndpointKind::Tcp).await {
            Some(Msg::BindErr { .. }) => {}
            other => panic!("expected BindErr, got {other:?}"),
        }
        // Two refused Hellos: the right id with a wrong secret, and garbage.
        let forged = format!("{}{}", &secret[..16], "A".repeat(43));
        let b = Agent::connect(&env).await;
        assert!(matches!(b.hello(&forged).await, Some(Msg::Error { .. })));
        let c = Agent::connect(&env).await;
        assert!(matches!(
            c.hello("not-a-token").await,
            Some(Msg::Error { .. })
        ));
        // The revoke closes the session.
        let g = post(&api, &format!("/tokens/{id}/revoke"), &admin, "").await;
        assert_eq!(g.status, 200, "{g:?}");
        common::within(Duration::from_secs(2), async {
            while a.recv().await.is_some() {}
        })
        .await;

        let want = |pairs: &[(&str, usize)]| -> Vec<(String, usize)> {
            pairs.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
        };
        let expected = want(&[
            ("agent_connected", 1),
            ("agent_disconnected", 1),
            ("auth_failed", 1),
            ("bind_accepted", 1),
            ("bind_refused", 1),
            ("token_created", 1),
            ("token_revoked", 1),
        ]);
        let q = format!("/events?token={id}");
        common::until(Duration::from_secs(3), "every event recorded", || async {
            kinds(&curl(&api, &q, Some(&admin), &[]).await.json()["items"]) == expected
        })
        .await;
        let v = curl(&api, &q, Some(&admin), &[]).await.json();
        let items = v["items"].as_array().unwrap();
        // Newest first; each names what it concerns; no secret anywhere.
        assert_eq!(items[0]["kind"], "agent_disconnected", "{v}");
        assert!(!v.to_string().contains(&secret[16..]), "no secret in {v}");
        let bind = items.iter().find(|e| e["kind"] == "bind_refused").unwrap();
        assert_eq!(bind["endpoint"], "cam");
        assert!(
            bind["detail"].as_str().unwrap().contains("bind=web"),
            "{bind}"
        );
        assert!(bind["session_id"].is_u64());
        let seqs: Vec<i64> = items.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
        // The malformed Hello has no token: all auth failures are two.
        let all = curl(&api, "/events?kind=auth_failed", Some(&admin), &[])
            .await
            .json();
        let failed = all["items"].as_array().unwrap();
        assert_eq!(failed.len(), 2, "{all}");
        assert!(failed
            .iter()
            .any(|e| e["token_id"].is_null() && e["detail"] == "malformed"));
        assert!(failed
            .iter()
            .all(|e| e["remote"].as_str().unwrap().starts_with("127.0.0.1:")));
        // since: none after now.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + 60_000;
        let later = curl(&api, &format!("/events?since={now}"), Some(&admin), &[]).await;
        assert_eq!(later.json()["items"], serde_json::json!([]));
        drop((b, c));
        env.finish().await.expect("clean stop");
    });
}

/// The value of the sample named exactly `name` (with its labels) in an
/// OpenMetrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_reflect_a_scripted_sequence_exactly() {
    smol::block_on(async {
        let mut env = start("api-metrics", "").await;
        let api = env.api.clone().unwrap();
        let read = key(&env.store(), Role::Read);
        assert_eq!(curl(&api, "/metrics", None, &[]).await.status, 401);

        let (token, id) = env.token(&["web"]);
        let a = Agent::welcome(&env, &token).await;
        let url = a.bind_ok("web", EndpointKind::Tcp).await;
        hello_through(&a, &url).await;
        let forged = format!("{}{}", &token[..16], "A".repeat(43));
        let b = Agent::connect(&env).await;
        b.hello(&forged).await;
        let m = Agent::connect(&env).await;
        m.hello("garbage").await;

        let g = curl(&api, "/metrics", Some(&read), &[]).await;
        assert_eq!(g.status, 200, "{g:?}");
        assert!(
            g.headers.contains("application/openmetrics-text"),
            "{}",
            g.headers
        );
        let t = &g.body;
        let want = [
            ("tether_sessions", 1.0),
            ("tether_endpoints", 1.0),
            ("tether_streams_total", 1.0),
            (
                "tether_endpoint_bytes_total{endpoint=\"web\",direction=\"up\"}",
                5.0,
            ),
            (
                "tether_endpoint_bytes_total{endpoint=\"web\",direction=\"down\"}",
                10.0,
            ),
            ("tether_auth_failures_total{reason=\"unknown\"}", 1.0),
            ("tether_auth_failures_total{reason=\"malformed\"}", 1.0),
            ("tether_auth_failures_total{reason=\"revoked\"}", 0.0),
            ("tether_handshake_seconds_count", 1.0),
            ("tether_revocation_seconds_count", 0.0),
        ];
        for (name, v) in want {
            assert_eq!(sample(t, name), Some(v), "{name} in:\n{t}");
        }
        assert!(t.trim_end().ends_with("# EOF"), "{t}");

        // A revocation: the session goes, and its latency is observed once.
        env.store().revoke(&id).unwrap();
        common::within(Duration::from_secs(2), async {
            while a.recv().await.is_some() {}
        })
        .await;
        common::until(Duration::from_secs(2), "the revocation counted", || async {
            let t = curl(&api, "/metrics", Some(&read), &[]).await.body;
            sample(&t, "tether_revocation_seconds_count") == Some(1.0)
                && sample(&t, "tether_sessions") == Some(0.0)
        })
        .await;
        drop((b, m));
        env.finish().await.expect("clean stop");
    });
}

/// An edge with the API and these `[limits]`.
async fn start_limited(tag: &str, limits: &str) -> Env {
    let limits = limits.to_owned();
    Env::start_with(tag, move |t| {
        format!("{t}\n[limits]\n{limits}\n\n[api]\nlisten = \"127.0.0.1:0\"\n")
    })
    .await
}

/// One Hello with `token` on a fresh connection: how long its answer took.
async fn timed_hello(env: &Env, token: &str) -> (Duration, Option<Msg>) {
    let a = Agent::connect(env).await;
    let t0 = Instant::now();
    let m = a.hello(token).await;
    (t0.elapsed(), m)
}

#[test]
fn a_burst_of_bad_hellos_from_one_address_is_slowed_and_recorded() {
    smol::block_on(async {
        let mut env = start_limited(
            "api-ratelimit",
            "auth_failures_per_source = 3\nauth_failure_delay_ms = 600",
        )
        .await;
        let api = env.api.clone().unwrap();
        let read = key(&env.store(), Role::Read);
        let (token, _) = env.token(&["web"]);
        for i in 0..6 {
            let (took, m) = timed_hello(&env, "not-a-token").await;
            assert!(
                matches!(m, Some(Msg::Error { code, .. }) if code == ErrorCode::AUTH_FAILED),
                "{m:?}"
            );
            if i < 3 {
                assert!(took < Duration::from_millis(400), "#{i} took {took:?}");
            } else {
                assert!(took >= Duration::from_millis(550), "#{i} took {took:?}");
            }
        }
        // A credential that verifies is never delayed, from the same source.
        let (took, m) = timed_hello(&env, &token).await;
        assert!(matches!(m, Some(Msg::Welcome { .. })), "{m:?}");
        assert!(took < Duration::from_millis(400), "took {took:?}");

        common::until(Duration::from_secs(3), "events recorded", || async {
            let v = curl(&api, "/events?limit=100", Some(&read), &[])
                .await
                .json();
            kinds(&v["items"])
                .iter()
                .any(|(k, n)| k == "auth_failed" && *n == 6)
        })
        .await;
        let v = curl(&api, "/events?kind=rate_limited", Some(&read), &[])
            .await
            .json();
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "one event per run, not per refusal: {v}");
        assert!(
            items[0]["detail"].as_str().unwrap().contains("source"),
            "{v}"
        );
        let t = curl(&api, "/metrics", Some(&read), &[]).await.body;
        assert_eq!(
            sample(&t, "tether_refusals_total{reason=\"rate_limited\"}"),
            Some(3.0),
            "{t}"
        );
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn a_sprayed_token_id_is_slowed_but_its_device_still_connects() {
    smol::block_on(async {
        let mut env = start_limited(
            "api-ratelimit-token",
            "auth_failures_per_token = 2\nauth_failure_delay_ms = 600",
        )
        .await;
        let api = env.api.clone().unwrap();
        let read = key(&env.store(), Role::Read);
        let (token, id) = env.token(&["web"]);
        let forged = format!("{}{}", &token[..16], "A".repeat(43));
        let mut took = Vec::new();
        for _ in 0..3 {
            took.push(timed_hello(&env, &forged).await.0);
        }
        assert!(took[1] < Duration::from_millis(400), "{took:?}");
        assert!(took[2] >= Duration::from_millis(550), "{took:?}");
        let (t, m) = timed_hello(&env, &token).await;
        assert!(matches!(m, Some(Msg::Welcome { .. })), "{m:?}");
        assert!(t < Duration::from_millis(400), "the device: {t:?}");
        common::until(Duration::from_secs(3), "the event", || async {
            let v = curl(&api, "/events?kind=rate_limited", Some(&read), &[])
                .await
                .json();
            v["items"].as_array().unwrap().len() == 1 && v["items"][0]["token_id"] == id.as_str()
        })
        .await;
        env.finish().await.expect("clean stop");
    });
}

/// The next control message, decoded, within 2 s.
async fn next_control(a: &Agent) -> Vec<u8> {
    common::within(Duration::from_secs(2), a.session.recv_control())
        .await
        .expect("a control message")
}

/// The successor an offer carries: (id, secret).
fn offered(bytes: &[u8]) -> (String, String) {
    match tether_proto::Control::decode(bytes).unwrap() {
        tether_proto::Control::RotateOffer { token_id, token } => {
            (token_id.to_owned(), token.0.to_owned())
        }
        other => panic!("expected RotateOffer, got {other:?}"),
    }
}

#[test]
fn a_rotation_through_the_api_is_offered_live_and_retires_the_old_token_at_the_successors_hello() {
    smol::block_on(async {
        let mut env = start("api-rotate", "").await;
        let api = env.api.clone().unwrap();
        let store = env.store();
        let admin = key(&store, Role::Admin);
        let admin_id = admin.split('.').next().unwrap().to_owned();
        let read = key(&store, Role::Read);
        let (old, old_id) = env.token(&["cam"]);
        let a = Agent::welcome(&env, &old).await;
        a.bind_ok("cam", EndpointKind::Tcp).await;

        // A read key cannot rotate; an unknown token is 404.
        let g = post(&api, &format!("/tokens/{old_id}/rotate"), &read, "").await;
        assert_eq!(g.status, 403, "{g:?}");
        let g = post(&api, "/tokens/tk_000000000000/rotate", &admin, "").await;
        assert_eq!(g.status, 404, "{g:?}");
        let g = post(&api, &format!("/tokens/{old_id}/rotate"), &admin, "").await;
        assert_eq!(g.status, 202, "{g:?}");
        assert!(g.json()["rotation_requested_at"].is_i64(), "{g:?}");

        // The live session is offered a successor within 1 s; both are valid.
        let t0 = Instant::now();
        let (new_id, new) = offered(&next_control(&a).await);
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert!(new.starts_with(&format!("{new_id}.")));
        let g = curl(&api, &format!("/tokens/{new_id}"), Some(&read), &[]).await;
        assert_eq!(g.json()["pending"], true, "{g:?}");
        assert_eq!(g.json()["rotated_from"], old_id.as_str(), "{g:?}");
        assert_eq!(g.json()["allow"], serde_json::json!(["cam"]));
        // Rotating the pending successor is a conflict.
        let g = post(&api, &format!("/tokens/{new_id}/rotate"), &admin, "").await;
        assert_eq!(g.status, 409, "{g:?}");

        // RotateStored: the edge drains the session (not TOKEN_REVOKED),
        // so the device dials again with the stored successor.
        a.send(&tether_proto::Control::RotateStored { token_id: &new_id })
            .await;
        common::until(Duration::from_secs(1), "the session drained", || async {
            a.session.peer_goaway().is_some()
        })
        .await;
        assert_eq!(
            a.session.peer_goaway().map(|(c, _)| c),
            Some(ErrorCode::NO_ERROR)
        );

        // Until the successor's Hello the old token still works, and a
        // new session of it is offered a successor of its own.
        let b = Agent::welcome(&env, &old).await;
        let (second_id, second) = offered(&next_control(&b).await);
        assert_ne!(second_id, new_id);

        // The successor's Hello: Welcome, then RotateConfirmed.
        let c = Agent::welcome(&env, &new).await;
        match common::owned(&next_control(&c).await) {
            Msg::Other(m) => assert!(m.contains("RotateConfirmed"), "{m}"),
            other => panic!("expected RotateConfirmed, got {other:?}"),
        }
        // The device keeps its endpoint under the new token.
        let url = c.bind_ok("cam", EndpointKind::Tcp).await;
        hello_through(&c, &url).await;
        // The old token's other session is drained too, within 1 s.
        common::until(
            Duration::from_secs(1),
            "the old session drained",
            || async { b.session.peer_goaway().is_some() },
        )
        .await;
        assert_eq!(
            b.session.peer_goaway().map(|(c, _)| c),
            Some(ErrorCode::NO_ERROR)
        );

        // Exactly one of the three is valid now.
        for (t, what) in [(&old, "the old token"), (&second, "the unused successor")] {
            let d = Agent::connect(&env).await;
            match d.hello(t).await {
                Some(Msg::Error { code, .. }) => {
                    assert_eq!(code, ErrorCode::TOKEN_REVOKED, "{what}")
                }
                other => panic!("{what}: expected TOKEN_REVOKED, got {other:?}"),
            }
        }
        let g = curl(&api, &format!("/tokens/{old_id}"), Some(&read), &[]).await;
        assert_eq!(g.json()["replaced_by"], new_id.as_str(), "{g:?}");
        assert!(g.json()["revoked_at"].is_i64());

        // Two events, both naming the admin key: the request, the retirement.
        let g = curl(&api, "/events?kind=token_rotated", Some(&read), &[]).await;
        let items = g.json()["items"].as_array().unwrap().clone();
        assert_eq!(items.len(), 2, "{g:?}");
        assert_eq!(items[0]["detail"], format!("retired; replaced by {new_id}"));
        assert_eq!(items[1]["detail"], "requested");
        for e in &items {
            assert_eq!(e["api_key_id"], admin_id.as_str(), "{e}");
            assert_eq!(e["token_id"], old_id.as_str(), "{e}");
        }
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn events_are_also_written_as_json_lines_whoever_recorded_them_and_a_relative_path_is_refused() {
    // A relative path (or anything but "stdout") is a config error naming the field.
    {
        let dir = common::TempDir::new("api-jsonl-config");
        let pki = common::Pki::generate(dir.path());
        let base = common::edge_toml(dir.path(), &pki, "");
        let e = tether_edge::Config::parse(
            &dir.path().join("edge.toml"),
            &format!("{base}\n[events]\njson_lines = \"events.jsonl\"\n"),
        )
        .unwrap_err();
        assert_eq!(e.field, "events.json_lines", "{e}");
    }
    smol::block_on(async {
        let file = std::env::temp_dir().join(format!(
            "tether-events-{}-{}.jsonl",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut env = start(
            "api-jsonl",
            &format!("\n[events]\njson_lines = \"{}\"\n", file.display()),
        )
        .await;
        let api = env.api.clone().unwrap();
        let store = env.store();
        let admin = key(&store, Role::Admin);
        // Through the API (recorded in the request), by the edge (through
        // its writer) and by another connection, as the offline CLI does.
        let g = post(&api, "/tokens", &admin, r#"{"allow":["cam"]}"#).await;
        assert_eq!(g.status, 201, "{g:?}");
        let secret = g.json()["secret"].as_str().unwrap().to_owned();
        let a = Agent::welcome(&env, &secret).await;
        store
            .record(
                &tether_edge::events::NewEvent::new(tether_edge::events::EventKind::TokenUpdated)
                    .detail("offline"),
            )
            .unwrap();
        let read = || {
            std::fs::read_to_string(&file)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        };
        common::until(Duration::from_secs(2), "three lines", || async {
            read().len() >= 3
        })
        .await;
        let kinds: Vec<String> = read()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            kinds,
            ["token_created", "agent_connected", "token_updated"],
            "in the order they were recorded"
        );
        let seqs: Vec<i64> = read().iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        // At shutdown, the last events (the session's end) are written too.
        drop(a);
        env.finish().await.expect("clean stop");
        let all = read();
        assert_eq!(
            all.last().unwrap()["kind"],
            "agent_disconnected",
            "{all:#?}"
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(&secret[16..]), "no secret in the lines");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "others may not read the events: {mode:o}");
        let _ = std::fs::remove_file(&file);
    });
}

/// Runs the real `tether-edge` CLI (on the blocking pool: the edge runs on
/// this thread's executor) with only the `TETHER_API_*` variables of `vars`
/// set: (exit code, stdout, stderr).
async fn cli(args: &[&str], vars: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether-edge"));
    for v in [
        "TETHER_API_URL",
        "TETHER_API_KEY",
        "TETHER_API_KEY_FILE",
        "TETHER_API_CA",
    ] {
        c.env_remove(v);
    }
    c.args(args).envs(vars.iter().copied());
    let out = smol::unblock(move || c.output().unwrap()).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

#[test]
fn the_cli_is_a_client_of_the_api_and_every_change_names_its_key() {
    smol::block_on(async {
        let mut env = start("api-cli-client", "").await;
        let api = env.api.clone().unwrap();
        let store = env.store();
        let admin = key(&store, Role::Admin);
        let read = key(&store, Role::Read);
        let admin_id = admin[..15].to_owned();
        // The key from a file (0600), the address from the environment.
        let key_file = env.dir.path().join("admin.key");
        std::fs::write(&key_file, format!("{admin}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let kf = key_file.to_str().unwrap();
        let by_file = [
            ("TETHER_API_URL", api.as_str()),
            ("TETHER_API_KEY_FILE", kf),
        ];
        let (code, secret, err) = cli(
            &[
                "token",
                "create",
                "--allow",
                "*.site-42",
                "--description",
                "gw",
            ],
            &by_file,
        )
        .await;
        assert_eq!(code, 0, "{err}");
        let secret = secret.trim().to_owned();
        assert!(
            secret.starts_with("tk_"),
            "the token, once, on stdout: {secret}"
        );
        assert!(
            err.contains("bind=*.site-42") && !err.contains(&secret[16..]),
            "{err}"
        );
        let id = secret[..15].to_owned();
        // It went through the API: the event names the key.
        let ev = store
            .events(&tether_edge::events::EventQuery {
                kind: tether_edge::events::EventKind::parse("token_created"),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].event.api_key.as_ref().unwrap().to_string(), admin_id);

        // The key itself from TETHER_API_KEY, the address from --api;
        // --output json prints the API's documents (a list as an array).
        let by_env = [("TETHER_API_KEY", admin.as_str())];
        let (code, out, err) = cli(&["--api", &api, "-o", "json", "token", "list"], &by_env).await;
        assert_eq!(code, 0, "{err}");
        let list = json(&out);
        let t = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id.as_str())
            .unwrap();
        assert_eq!(t["allow"], serde_json::json!(["*.site-42"]));
        assert_eq!(t["description"], "gw");
        let (code, out, err) = cli(
            &[
                "--api",
                &api,
                "token",
                "update",
                &id,
                "--allow",
                "cam.site-42",
                "--source",
                "127.0.0.0/8",
                "-o",
                "json",
            ],
            &by_env,
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(json(&out)["sources"], serde_json::json!(["127.0.0.0/8"]));
        let got = store.get(&id[3..]).unwrap().unwrap();
        assert_eq!(got.scope.summary(), "bind=cam.site-42 sources=127.0.0.0/8");
        // The table shows what the API holds.
        let (code, table, _) = cli(&["--api", &api, "token", "get", &id], &by_env).await;
        assert_eq!(code, 0);
        assert!(
            table.starts_with("ID ") && table.contains(&id) && table.contains("cam.site-42"),
            "{table}"
        );

        // A read key lists but cannot revoke: exit 1 with the API's reason.
        let by_read = [
            ("TETHER_API_URL", api.as_str()),
            ("TETHER_API_KEY", read.as_str()),
        ];
        let (code, _, err) = cli(&["token", "revoke", &id], &by_read).await;
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("HTTP 403, forbidden") && err.contains("role read"),
            "{err}"
        );
        assert!(store.get(&id[3..]).unwrap().unwrap().revoked_at.is_none());
        let (code, _, err) = cli(&["apikey", "list"], &by_read).await;
        assert_eq!(code, 0, "{err}");

        // An unknown token is the API's 404, a bad id a usage error before
        // anything is sent.
        let (code, _, err) = cli(&["token", "rotate", "tk_0123456789ab"], &by_file).await;
        assert_eq!(code, 1);
        assert!(
            err.contains("no token tk_0123456789ab (HTTP 404, not_found)"),
            "{err}"
        );
        let (code, _, err) = cli(&["token", "get", "tk_nothex/../x"], &by_file).await;
        assert_eq!(code, 64, "{err}");

        // A device connects: session list and endpoint list show it live.
        let a = Agent::welcome(&env, &secret).await;
        a.bind_ok("cam.site-42", EndpointKind::Tcp).await;
        let (code, out, err) = cli(&["-o", "json", "session", "list"], &by_file).await;
        assert_eq!(code, 0, "{err}");
        let sessions = json(&out);
        assert_eq!(sessions.as_array().unwrap().len(), 1, "{out}");
        assert_eq!(sessions[0]["token_id"], id.as_str());
        assert_eq!(sessions[0]["endpoints"], serde_json::json!(["cam.site-42"]));
        let (code, table, _) = cli(&["endpoint", "list"], &by_file).await;
        assert_eq!(code, 0);
        let row = table
            .lines()
            .find(|l| l.starts_with("cam.site-42 "))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(
            row.contains(&id) && row.contains("tcp://127.0.0.1:"),
            "{row}"
        );

        // Revoking through the CLI closes the live session within 1 s.
        let t0 = Instant::now();
        let (code, out, err) = cli(&["-o", "json", "token", "revoke", &id], &by_file).await;
        assert_eq!(code, 0, "{err}");
        assert!(json(&out)["revoked_at"].is_i64(), "{out}");
        match a.recv().await {
            Some(Msg::Error { code, .. }) => assert_eq!(code, ErrorCode::TOKEN_REVOKED),
            other => panic!("expected Error(TOKEN_REVOKED), got {other:?}"),
        }
        // One CLI process (start, connect, request) and the watcher's poll.
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

        // The event log through the CLI: exact counts, each naming the key.
        let (code, out, err) =
            cli(&["-o", "json", "event", "list", "--token", &id], &by_file).await;
        assert_eq!(code, 0, "{err}");
        let mut got: Vec<(String, String)> = json(&out)
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| !e["api_key_id"].is_null())
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_owned(),
                    e["api_key_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        got.sort();
        let want: Vec<(String, String)> = ["token_created", "token_revoked", "token_updated"]
            .iter()
            .map(|k| ((*k).to_owned(), admin_id.clone()))
            .collect();
        assert_eq!(got, want, "{out}");

        // status needs no key.
        let (code, out, err) = cli(&["--api", &api, "status"], &[]).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("ok: tether-edge "), "{out}");
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn the_cli_refuses_to_guess_where_the_api_is_or_which_key_to_use() {
    smol::block_on(async {
        let mut env = start("api-cli-refuse", "").await;
        let api = env.api.clone().unwrap();
        let cfg = env.config.to_str().unwrap().to_owned();
        let admin = key(&env.store(), Role::Admin);
        // No address at all: a usage error that names both ways out.
        let (code, _, err) = cli(&["token", "list"], &[("TETHER_API_KEY", &admin)]).await;
        assert_eq!(code, 64);
        assert!(
            err.contains("--api URL") && err.contains("--offline"),
            "{err}"
        );
        // No key: named, with where the first one comes from.
        let (code, _, err) = cli(&["--api", &api, "token", "list"], &[]).await;
        assert_eq!(code, 64);
        assert!(
            err.contains("no API key") && err.contains("TETHER_API_KEY"),
            "{err}"
        );
        // The key is never a flag (ps would show it).
        let (code, _, err) = cli(&["--api", &api, "--api-key", &admin, "token", "list"], &[]).await;
        assert_eq!(code, 64, "{err}");
        assert!(
            !err.contains(&admin[16..]),
            "the refusal does not echo a secret: {err}"
        );
        // A file that holds no key: named, its content not echoed.
        let bad = env.dir.path().join("bad.key");
        std::fs::write(&bad, "tk_0123456789ab.c2VjcmV0\n").unwrap();
        let (code, _, err) = cli(
            &[
                "--api",
                &api,
                "--api-key-file",
                bad.to_str().unwrap(),
                "token",
                "list",
            ],
            &[],
        )
        .await;
        assert_eq!(code, 64);
        assert!(
            err.contains("bad.key: not an API key") && !err.contains("c2VjcmV0"),
            "{err}"
        );
        // A config whose [api] is port 0 here, so: the address from the
        // config, which nothing listens on; and an API that is not there.
        let (code, _, err) = cli(
            &["--config", &cfg, "token", "list"],
            &[("TETHER_API_KEY", &admin)],
        )
        .await;
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("cannot reach the API at http://127.0.0.1:0"),
            "{err}"
        );
        // A revoked key: the API's 401.
        let store = env.store();
        let k = tether_edge::store::ApiKeyId::parse(&admin[..15]).unwrap();
        store.revoke_api_key(&k).unwrap();
        let (code, _, err) = cli(
            &["--api", &api, "token", "list"],
            &[("TETHER_API_KEY", &admin)],
        )
        .await;
        assert_eq!(code, 1);
        assert!(err.contains("HTTP 401, unauthorized"), "{err}");
        // session list and status need the running edge.
        for args in [&["session", "list"][..], &["status"]] {
            let mut a = vec!["--offline", "--config", &cfg];
            a.extend_from_slice(args);
            let (code, _, err) = cli(&a, &[]).await;
            assert_eq!(code, 1, "{args:?}");
            assert!(err.contains("without --offline"), "{err}");
        }
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn the_cli_speaks_https_and_a_unix_socket() {
    smol::block_on(async {
        let sock_dir = common::TempDir::new("api-cli-sock");
        let sock = sock_dir.path().join("api.sock");
        let mut env = start_unix("api-cli-unix", &sock).await;
        let admin = key(&env.store(), Role::Admin);
        let api = env.api.clone().unwrap();
        let (code, out, err) = cli(
            &["-o", "json", "apikey", "list"],
            &[("TETHER_API_URL", &api), ("TETHER_API_KEY", &admin)],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(json(&out).as_array().unwrap().len(), 1, "{out}");
        env.finish().await.expect("clean stop");
    });
    smol::block_on(async {
        let mut env = start_https("api-cli-https").await;
        let admin = key(&env.store(), Role::Admin);
        let port = env
            .api
            .clone()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_owned();
        let url = format!("https://localhost:{port}");
        let ca = env.pki.ca_file.display().to_string();
        let vars = [
            ("TETHER_API_URL", url.as_str()),
            ("TETHER_API_KEY", admin.as_str()),
        ];
        // Without a CA to verify with, nothing is sent.
        let (code, _, err) = cli(&["token", "list"], &vars).await;
        assert_eq!(code, 1);
        assert!(err.contains("--api-ca"), "{err}");
        let (code, out, err) = cli(
            &["--api-ca", &ca, "token", "create", "--allow", "web"],
            &vars,
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("tk_"), "{out}");
        // A CA that did not sign the API's certificate: refused, not ignored.
        let other = common::TempDir::new("api-cli-other-ca");
        let other_pki = common::Pki::generate(other.path());
        let (code, _, err) = cli(
            &[
                "--api-ca",
                other_pki.ca_file.to_str().unwrap(),
                "token",
                "list",
            ],
            &vars,
        )
        .await;
        assert_eq!(code, 1);
        assert!(err.contains("TLS with https://localhost:"), "{err}");
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn an_endpoint_released_through_the_api_can_be_bound_by_another_token_at_once() {
    smol::block_on(async {
        let mut env = start("api-release", "").await;
        let api = env.api.clone().unwrap();
        let store = env.store();
        let admin = key(&store, Role::Admin);
        let read = key(&store, Role::Read);
        let scope = tether_edge::scope::Scope {
            rules: tether_edge::scope::Rules::parse(&["web".to_owned()]).unwrap(),
            sources: Vec::new(),
        };
        let a = store.create("a", &scope).unwrap();
        let b = store.create("b", &scope).unwrap();
        // A binds web and so owns it; its session ends.
        let agent_a = Agent::welcome(&env, a.token.expose()).await;
        agent_a.bind_ok("web", EndpointKind::Tcp).await;
        drop(agent_a);
        common::until(Duration::from_secs(2), "A's session gone", || async {
            curl(&api, "/sessions", Some(&read), &[]).await.json()["items"]
                .as_array()
                .unwrap()
                .is_empty()
        })
        .await;
        // B may bind web by its rules, but A owns it.
        let agent_b = Agent::welcome(&env, b.token.expose()).await;
        match agent_b.bind("web", EndpointKind::Tcp).await {
            Some(Msg::BindErr { code, .. }) => assert_eq!(code, ErrorCode::ENDPOINT_TAKEN),
            other => panic!("expected ENDPOINT_TAKEN, got {other:?}"),
        }
        let vars = [
            ("TETHER_API_URL", api.as_str()),
            ("TETHER_API_KEY", read.as_str()),
        ];
        // A read key cannot release; nothing changes.
        let (code, _, err) = cli(&["endpoint", "release", "web"], &vars).await;
        assert_eq!(code, 1);
        assert!(err.contains("HTTP 403, forbidden"), "{err}");
        let vars = [
            ("TETHER_API_URL", api.as_str()),
            ("TETHER_API_KEY", admin.as_str()),
        ];
        let (code, out, err) = cli(&["-o", "json", "endpoint", "release", "web"], &vars).await;
        assert_eq!(code, 0, "{err}");
        let v = json(&out);
        assert_eq!(
            (v["name"].as_str(), v["released_from"].as_str()),
            (Some("web"), Some(a.id.to_string().as_str()))
        );
        // The API's own process made the change: B's next bind succeeds,
        // without waiting for the store poll.
        match agent_b.bind("web", EndpointKind::Tcp).await {
            Some(Msg::BindOk { .. }) => {}
            other => panic!("expected BindOk right after the release, got {other:?}"),
        }
        // Once: an endpoint without an owner is the API's 404; a name that
        // cannot be one is refused before it is sent.
        let g = post(&api, "/endpoints/nothing-here/release", &admin, "").await;
        assert_eq!(g.status, 404, "{g:?}");
        let (code, _, err) = cli(&["endpoint", "release", "Web/../x"], &vars).await;
        assert_eq!(code, 64, "{err}");
        // One event, naming the endpoint, its former owner and the key.
        let ev = store
            .events(&tether_edge::events::EventQuery {
                kind: tether_edge::events::EventKind::parse("endpoint_released"),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].event.endpoint.as_deref(), Some("web"));
        assert_eq!(ev[0].event.token.as_ref(), Some(&a.id));
        assert_eq!(
            ev[0].event.api_key.as_ref().unwrap().to_string(),
            admin[..15]
        );
        env.finish().await.expect("clean stop");
    });
}

#[test]
fn tokens_older_than_the_maximum_age_are_rotated_while_their_device_is_connected() {
    smol::block_on(async {
        let mut env = start("api-max-age", "\n[rotation]\nmax_token_age_secs = 2").await;
        let store = env.store();
        let (old, old_id) = env.token(&["cam"]);
        let (_, idle_id) = env.token(&["ssh"]);
        let created = Instant::now();
        let a = Agent::welcome(&env, &old).await;
        a.bind_ok("cam", EndpointKind::Tcp).await;
        // Younger than 2 s (ages count whole seconds: at least 1 s after
        // creation): no offer yet.
        let early =
            futures_lite::future::or(async { Some(a.session.recv_control().await) }, async {
                smol::Timer::after(Duration::from_millis(900).saturating_sub(created.elapsed()))
                    .await;
                None
            })
            .await;
        assert!(
            early.is_none(),
            "offered before the token was 2 s old: {early:?}"
        );
        // Then the live session is offered a successor, as if an operator
        // had asked: within a check (0.5 s) and a store poll of the age.
        let got = common::within(Duration::from_secs(3), a.session.recv_control())
            .await
            .expect("a control message");
        let (new_id, _) = offered(&got);
        let waited = created.elapsed();
        assert!(
            waited < Duration::from_millis(3500),
            "offered after {waited:?}"
        );
        let new = store.get(&new_id).unwrap().unwrap();
        assert!(new.pending && new.rotated_from.unwrap().to_string() == old_id);
        // The event says why, with no key.
        let ev = store
            .events(&tether_edge::events::EventQuery {
                kind: tether_edge::events::EventKind::parse("token_rotated"),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        let asked: Vec<_> = ev
            .iter()
            .filter(|e| e.event.token.as_ref().map(ToString::to_string) == Some(old_id.clone()))
            .collect();
        assert_eq!(asked.len(), 1, "{ev:?}");
        assert!(asked[0].event.api_key.is_none());
        assert_eq!(
            asked[0].event.detail,
            "requested: older than rotation.max_token_age_secs (2 s)"
        );
        // A token whose device is not connected is left alone.
        let idle = store.get(&idle_id).unwrap().unwrap();
        assert!(idle.rotation_requested_at.is_none(), "{idle:?}");
        env.finish().await.expect("clean stop");
    });
}
