//! Config errors name file, line, field and reason; the binary prints them
//! as `error: <file>:<line>: <field>: <reason>` and exits 64.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{edge_toml, Pki, TempDir};
use tether_edge::{Config, ConfigError};

fn load(dir: &Path, body: &str) -> Result<Config, ConfigError> {
    let p = dir.join("edge.toml");
    std::fs::write(&p, body).unwrap();
    Config::load(&p)
}

fn setup(tag: &str) -> (TempDir, Pki, String) {
    let dir = TempDir::new(tag);
    let pki = Pki::generate(dir.path());
    let good = edge_toml(dir.path(), &pki, "");
    (dir, pki, good)
}

/// The 1-based line of the first line of `body` that starts with `prefix`.
fn line_of(body: &str, prefix: &str) -> usize {
    body.lines().position(|l| l.starts_with(prefix)).unwrap() + 1
}

#[test]
fn the_test_config_loads() {
    let (dir, _pki, good) = setup("cfg-ok");
    let c = load(dir.path(), &good).expect("loads");
    assert_eq!(c.session.max_streams, 64);
    assert_eq!(c.session.shutdown_grace_ms, 10_000);
    assert!(c.tcp.unwrap().port_range.is_os_chosen());
}

#[test]
fn an_unknown_field_is_named_with_its_line() {
    let (dir, _pki, good) = setup("cfg-unknown");
    let body = good.replace("[tls]\n", "[tls]\nsni_strict = true\n");
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(e.field, "tls.sni_strict");
    assert_eq!(e.line, Some(line_of(&body, "sni_strict")));
    assert!(e.reason.contains("unknown field"), "{e}");
    assert!(e.to_string().starts_with(&format!(
        "{}:{}: tls.sni_strict: ",
        e.file.display(),
        line_of(&body, "sni_strict")
    )));
}

#[test]
fn a_missing_field_names_its_table() {
    let (dir, _pki, good) = setup("cfg-missing");
    let body: String = good
        .lines()
        .filter(|l| !l.starts_with("domain"))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(e.field, "tls.domain");
    assert_eq!(e.line, Some(line_of(&body, "[tls]")));
    assert!(e.reason.contains("missing field"), "{e}");
    let body: String = good
        .lines()
        .filter(|l| !l.starts_with("state_dir"))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(e.field, "state_dir");
    assert_eq!(e.line, Some(1));
}

#[test]
fn a_value_of_the_wrong_type_or_form_is_named_with_its_line() {
    let (dir, _pki, good) = setup("cfg-type");
    let body = good.replace("dead_after_ms = 45000", "dead_after_ms = \"45s\"");
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.line),
        (
            "session.dead_after_ms",
            Some(line_of(&body, "dead_after_ms"))
        )
    );
    let body = good.replace(
        "listen = \"127.0.0.1:0\"\ncert",
        "listen = \"127.0.0.1\"\ncert",
    );
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.line),
        ("agent.listen", Some(line_of(&body, "listen")))
    );
    assert!(e.reason.contains("socket address"), "{e}");
}

#[test]
fn values_that_parse_but_are_wrong_are_named_with_their_line() {
    let (dir, _pki, good) = setup("cfg-check");
    let body = good.replace("[session]\n", "[session]\nwindow = 1024\n");
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.line),
        ("session.window", Some(line_of(&body, "window")))
    );
    assert!(e.reason.contains("16384"), "{e}");

    let body = good.replace("dead_after_ms = 45000", "dead_after_ms = 1000");
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.line),
        (
            "session.dead_after_ms",
            Some(line_of(&body, "dead_after_ms"))
        )
    );

    let body = good.replace("port_range = [0, 0]", "port_range = [21000, 20000]");
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.line),
        ("tcp.port_range", Some(line_of(&body, "port_range")))
    );

    let body = good.replace(
        "port_range = [0, 0]",
        "port_range = [0, 0]\nfixed = { ssh = 2222, git = 2222 }",
    );
    let e = load(dir.path(), &body).unwrap_err();
    assert!(
        e.field == "tcp.fixed.ssh" || e.field == "tcp.fixed.git",
        "{e}"
    );
    assert_eq!(e.line, Some(line_of(&body, "fixed")));

    let body = good.replace("domain = \"tether.test\"", "domain = \"Tether Test\"");
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.line),
        ("tls.domain", Some(line_of(&body, "domain")))
    );
}

#[test]
fn unreadable_or_mismatched_tls_files_are_named_with_their_line() {
    let (dir, pki, good) = setup("cfg-files");
    let body = good.replace(
        &pki.agent_cert.display().to_string(),
        "/nonexistent/agent.crt",
    );
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(e.field, "agent.cert");
    assert_eq!(e.line, Some(line_of(&body, "cert")));
    assert!(e.reason.contains("/nonexistent/agent.crt"), "{e}");
    // The wildcard certificate with the agent's key.
    let body = good.replace(
        &pki.wild_key.display().to_string(),
        &pki.agent_key.display().to_string(),
    );
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(e.field, "tls.cert");
    assert!(e.reason.contains("does not match"), "{e}");
}

#[test]
fn the_binary_prints_file_line_field_and_exits_64() {
    let (dir, _pki, good) = setup("cfg-bin");
    let body = good.replace("[session]\n", "[session]\nmax_streams = 0\n");
    let p = dir.path().join("edge.toml");
    std::fs::write(&p, &body).unwrap();
    for args in [vec!["serve"], vec!["token", "list"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_tether-edge"))
            .arg("--config")
            .arg(&p)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let want = format!(
            "error: {}:{}: session.max_streams: ",
            p.display(),
            line_of(&body, "max_streams")
        );
        assert!(err.lines().any(|l| l.starts_with(&want)), "{args:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tether-edge"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "usage errors exit 64 too");
}

#[test]
fn values_outside_their_range_are_refused_with_the_range_instead_of_overflowing_later() {
    let (dir, _pki, good) = setup("cfg-ranges");
    // Each value one step past its bound, where `Instant + Duration` (or a
    // cap of zero) would panic or disable a limit.
    let cases: &[(&str, &str, &str)] = &[
        ("session", "ping_interval_ms", "18446744073709551615"),
        ("session", "dead_after_ms", "86400001"),
        ("session", "shutdown_grace_ms", "3600001"),
        ("session", "linger_ms", "9"),
        ("limits", "hello_timeout_ms", "99"),
        ("limits", "tls_handshake_timeout_ms", "120001"),
        ("limits", "pending_per_source", "0"),
        ("limits", "pending_total", "0"),
        ("limits", "sessions_per_token", "0"),
        ("limits", "endpoints_per_session", "0"),
        ("limits", "public_waiting_per_endpoint", "0"),
        ("limits", "public_connections", "0"),
        (
            "limits",
            "public_tls_handshake_timeout_ms",
            "18446744073709551615",
        ),
        ("limits", "idle_timeout_ms", "999"),
        ("rotation", "max_token_age_secs", "0"),
        ("rotation", "max_token_age_secs", "315360001"),
    ];
    for (table, field, value) in cases {
        let body = if *table == "rotation" {
            format!("{good}\n[rotation]\n{field} = {value}\n")
        } else if *table == "session" {
            let kept: Vec<&str> = good
                .lines()
                .filter(|l| !l.starts_with(&format!("{field} =")))
                .collect();
            kept.join("\n")
                .replace("[session]\n", &format!("[session]\n{field} = {value}\n"))
        } else {
            format!("{good}\n[limits]\n{field} = {value}\n")
        };
        let e = load(dir.path(), &body).expect_err(field);
        assert_eq!(e.field, format!("{table}.{field}"), "{e}");
        assert_eq!(e.line, Some(line_of(&body, &format!("{field} ="))), "{e}");
        assert!(
            e.reason.contains("outside the accepted range"),
            "{field}: {e}"
        );
    }
    // The bounds themselves are accepted.
    let body = format!(
        "{good}\n[limits]\nidle_timeout_ms = 1000\npending_per_source = 1\nhello_timeout_ms = 120000\n"
    );
    let c = load(dir.path(), &body).expect("bounds load");
    assert_eq!(c.limits.idle_timeout_ms, 1000);
    assert_eq!(c.limits.sessions_per_token, 4, "defaults for the rest");
    assert_eq!(
        c.rotation.max_token_age_secs, None,
        "rotation only on request"
    );
    let c = load(
        dir.path(),
        &format!("{good}\n[rotation]\nmax_token_age_secs = 1\n"),
    )
    .expect("a second loads");
    assert_eq!(c.rotation.max_token_age_secs, Some(1));
}

/// The mandatory policy, a per-endpoint one and `[agent]` allow / deny load;
/// a CA file given to `terminate-tls` is read.
#[test]
fn policies_load_from_edge_toml() {
    let (dir, pki, good) = setup("cfg-policy-ok");
    let body = format!(
        "{good}\n[traffic_policy]\n[[traffic_policy.on_tcp_connect]]\nname = \"no lab\"\n\
         [[traffic_policy.on_tcp_connect.actions]]\ntype = \"restrict-ips\"\n\
         config = {{ deny = [\"10.9.0.0/16\", \"2001:db8::1\"] }}\n\n\
         [[endpoint_policy.\"*-cam\".on_tcp_connect]]\n\
         actions = [{{ type = \"terminate-tls\", config = {{ min_version = \"1.2\", \
         mutual_tls_certificate_authorities = [\"{ca}\"], mutual_tls_allowed_names = [\"*.devices.example\"] }} }}]\n",
        ca = pki.wild_cert.display()
    )
    .replacen(
        "key = \"",
        "allow = [\"127.0.0.0/8\", \"::1\"]\ndeny = [\"127.0.0.2\"]\nkey = \"",
        1,
    );
    let c = load(dir.path(), &body).expect("loads");
    assert_eq!(c.policies.mandatory.restrict_ips().len(), 1);
    assert!(c.policies.endpoints["*-cam"].terminates_tls());
    let agent = c.agent.sources();
    assert!(agent.permits("127.0.0.1".parse().unwrap()));
    assert!(!agent.permits("127.0.0.2".parse().unwrap()));
    assert!(!agent.permits("192.0.2.1".parse().unwrap()));
}

/// Every broken policy is an error naming its line and field; none loads as
/// "allow all".
#[test]
fn broken_policies_are_named_with_file_line_and_field() {
    let (dir, pki, good) = setup("cfg-policy-bad");
    let empty_ca = dir.path().join("empty-ca.pem");
    std::fs::write(&empty_ca, "no certificate here\n").unwrap();
    let cases: Vec<(String, &str, &str, &str)> = vec![
        (
            "[[traffic_policy.on_tcp_connect]]\nactions = [\n  { type = \"restrict-ips\", config = { deny = [\"10.0.0.300/8\"] } },\n]\n".into(),
            "  { type",
            "traffic_policy.on_tcp_connect[0].actions[0]",
            "not an address or a CIDR",
        ),
        (
            "[[traffic_policy.on_tcp_connect]]\nactions = [\n  { type = \"allow-all\", config = {} },\n]\n".into(),
            "  { type",
            "traffic_policy.on_tcp_connect[0].actions[0]",
            "allow-all",
        ),
        (
            "[[endpoint_policy.web.on_tcp_connect]]\n[[endpoint_policy.web.on_tcp_connect.actions]]\ntype = \"terminate-tls\"\nconfig.min_version = \"1.3\"\nconfig.max_version = \"1.2\"\n".into(),
            "config.max_version",
            "endpoint_policy.web.on_tcp_connect[0].actions[0].config.max_version",
            "below min_version",
        ),
        (
            format!("[[endpoint_policy.web.on_tcp_connect]]\n[[endpoint_policy.web.on_tcp_connect.actions]]\ntype = \"terminate-tls\"\nconfig.mutual_tls_certificate_authorities = [\"{}\"]\n", empty_ca.display()),
            "config.mutual_tls_certificate_authorities",
            "endpoint_policy.web.on_tcp_connect[0].actions[0].config.mutual_tls_certificate_authorities[0]",
            "holds no PEM certificate",
        ),
        (
            format!("[[endpoint_policy.web.on_tcp_connect]]\n[[endpoint_policy.web.on_tcp_connect.actions]]\ntype = \"terminate-tls\"\nconfig.mutual_tls_certificate_authorities = [\"{}\"]\nconfig.mutual_tls_verification_strategy = \"require-any\"\n", pki.wild_cert.display()),
            "config.mutual_tls_verification_strategy",
            "endpoint_policy.web.on_tcp_connect[0].actions[0].config.mutual_tls_verification_strategy",
            "without verifying",
        ),
        (
            "[[endpoint_policy.\"*..cam\".on_tcp_connect]]\nactions = [{ type = \"restrict-ips\", config = { allow = [\"::1\"] } }]\n".into(),
            "[[endpoint_policy",
            "endpoint_policy.*..cam",
            "neither an endpoint name",
        ),
    ];
    for (extra, line_prefix, field, reason) in cases {
        let body = format!("{good}\n{extra}");
        let e = load(dir.path(), &body).unwrap_err();
        assert!(
            e.field.starts_with(field),
            "{extra}: field {:?}, want {field}",
            e.field
        );
        assert!(e.reason.contains(reason), "{extra}: {e}");
        assert_eq!(e.line, Some(line_of(&body, line_prefix)), "{extra}: {e}");
    }
    let body = good.replacen("key = \"", "allow = [\"127.0.0.1/8\"]\nkey = \"", 1);
    let e = load(dir.path(), &body).unwrap_err();
    assert_eq!(e.field, "agent.allow");
    assert!(e.reason.contains("127.0.0.0/8"), "{e}");
}

/// A broken edge policy stops the binary: exit 64, `file:line: field:`.
#[test]
fn the_binary_refuses_a_broken_policy_with_exit_64() {
    let (dir, _pki, good) = setup("cfg-policy-bin");
    let body = format!(
        "{good}\n[[traffic_policy.on_tcp_connect]]\n[[traffic_policy.on_tcp_connect.actions]]\ntype = \"terminate-tls\"\nconfig.min_version = \"1.1\"\n"
    );
    let p = dir.path().join("edge.toml");
    std::fs::write(&p, &body).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tether-edge"))
        .arg("--config")
        .arg(&p)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "error: {}:{}: traffic_policy.on_tcp_connect[0].actions[0].config.min_version: ",
        p.display(),
        line_of(&body, "config.min_version")
    );
    assert!(err.lines().any(|l| l.starts_with(&want)), "{err}");
}
