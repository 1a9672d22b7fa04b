//! `tetherd.toml` and the credential file, through the library.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tether_proto::EndpointKind;
use tetherd::{Config, Credential, CredentialError};

const CONTRACT_EXAMPLE: &str = r#"
edge = "edge.example.com:7443"              # host:port, DNS re-resolved on every dial
server_name = "edge.example.com"            # optional, default: host part of `edge`
ca_file = "/etc/tether/edge-ca.pem"         # optional pinned CA; absent = public web PKI (webpki-roots)
credential = "/etc/tether/credential"       # the token file, mode 0600

[reconnect]                                 # optional, defaults shown
initial_backoff_ms = 500
max_backoff_ms = 60000
healthy_after_ms = 30000

[session]                                   # optional, defaults shown
max_streams = 64
window = 131072
ping_interval_ms = 15000
dead_after_ms = 45000

[[endpoint]]
name = "web"
kind = "tls"                                # tcp | tls | tls-passthrough
upstream = "127.0.0.1:8080"
connect_timeout_ms = 5000
"#;

#[test]
fn the_contract_example_parses() {
    let c = Config::parse(Path::new("tetherd.toml"), CONTRACT_EXAMPLE).expect("parses");
    assert_eq!(c.edge.host, "edge.example.com");
    assert_eq!(c.edge.port, 7443);
    assert_eq!(c.tls_name().expect("name").to_str(), "edge.example.com");
    assert_eq!(c.endpoints.len(), 1);
    assert_eq!(c.endpoints[0].name(), "web");
    assert_eq!(c.endpoints[0].kind, EndpointKind::Tls);
    assert_eq!(c.endpoints[0].upstream.to_string(), "127.0.0.1:8080");
    let m = c.session.mux_config();
    assert_eq!(
        (m.max_streams, m.window, m.ping_interval_ms, m.dead_after_ms),
        (64, 131072, 15000, 45000)
    );
    assert!(m.validate().is_ok());
}

#[test]
fn optional_tables_take_the_documented_defaults() {
    let text = "edge = \"[::1]:7443\"\ncredential = \"/c\"\n[[endpoint]]\nname = \"ssh\"\nkind = \"tcp\"\nupstream = \"localhost:22\"\n";
    let c = Config::parse(Path::new("t.toml"), text).expect("parses");
    assert_eq!(c.edge.host, "::1");
    assert_eq!(c.edge.to_string(), "[::1]:7443");
    assert_eq!(c.tls_name().expect("an IP is a valid name").to_str(), "::1");
    assert_eq!(c.ca_file, None);
    assert_eq!(
        (
            c.reconnect.initial_backoff_ms,
            c.reconnect.max_backoff_ms,
            c.reconnect.healthy_after_ms
        ),
        (500, 60000, 30000)
    );
    assert_eq!(c.endpoints[0].connect_timeout_ms, 5000);
    assert_eq!(c.endpoints[0].idle_timeout_ms, 600_000, "10 min");
    let m = c.session.mux_config();
    assert_eq!(
        (m.max_streams, m.window, m.ping_interval_ms, m.dead_after_ms),
        (64, 131072, 15000, 45000)
    );
}

#[test]
fn errors_carry_line_field_and_reason() {
    let base = "edge = \"e:1\"\ncredential = \"/c\"\n";
    let ep = "[[endpoint]]\nname = \"web\"\nkind = \"tcp\"\nupstream = \"127.0.0.1:80\"\n";
    let check = |text: String, line: usize, field: &str, reason: &str| {
        let e = Config::parse(Path::new("/etc/tether/tetherd.toml"), &text).expect_err("refused");
        assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
        assert!(e.reason.contains(reason), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("/etc/tether/tetherd.toml:{line}: {field}: ")),
            "{e}"
        );
    };
    check(
        format!("{base}[reconnect]\nmax_backoff_ms = \"soon\"\n{ep}"),
        4,
        "reconnect.max_backoff_ms",
        "expected u64",
    );
    check(
        format!("{base}[reconnect]\nmax_backoff_ms = 10\n{ep}"),
        4,
        "reconnect.max_backoff_ms",
        "initial_backoff_ms",
    );
    check(
        format!("{base}[session]\nmax_streams = 0\n{ep}"),
        4,
        "session.max_streams",
        "1..=65535",
    );
    check(
        format!("{base}[session]\nspeed = 3\n{ep}"),
        4,
        "session.speed",
        "unknown field",
    );
    check(
        format!("{base}{ep}name2 = 1\n"),
        7,
        "endpoint[0].name2",
        "unknown field",
    );
    check(
        format!("{base}{}", ep.replace("\"web\"", "\"-web\"")),
        4,
        "endpoint[0].name",
        "not a valid endpoint name",
    );
    check(
        format!("{base}{}", ep.replace("127.0.0.1:80", "::1:80")),
        6,
        "endpoint[0].upstream",
        "brackets",
    );
    check(
        format!("{base}server_name = \"bad name!\"\n{ep}"),
        3,
        "server_name",
        "not a valid DNS name",
    );
    check(
        format!("edge = \"e:0\"\ncredential = \"/c\"\n{ep}"),
        1,
        "edge",
        "port",
    );
    check(base.to_owned(), 1, "endpoint", "at least one");
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

#[test]
fn the_credential_is_the_trimmed_first_line_of_a_private_file() {
    let dir = std::env::temp_dir().join(format!("tetherd-cred-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let p = write(&dir, "ok", "tk_00112233aabb.c2VjcmV0  \nignored\n", 0o600);
    let c = Credential::load(&p).expect("loads");
    assert_eq!(c.secret(), "tk_00112233aabb.c2VjcmV0");
    assert_eq!(c.id(), "tk_00112233aabb");
    assert!(
        !format!("{c:?}").contains("c2VjcmV0"),
        "Debug is redacted: {c:?}"
    );

    let p = write(&dir, "open", "tk_00112233aabb.c2VjcmV0\n", 0o644);
    match Credential::load(&p) {
        Err(e @ CredentialError::Mode(_, 0o644)) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&p.display().to_string()) && msg.contains("0644"),
                "{msg}"
            );
        }
        other => panic!("expected a mode error, got {other:?}"),
    }
    let p = write(&dir, "empty", "\n", 0o400);
    assert!(matches!(
        Credential::load(&p),
        Err(CredentialError::Malformed(..))
    ));
    assert!(matches!(
        Credential::load(&dir.join("missing")),
        Err(CredentialError::Read(..))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn endpoint_names_follow_the_one_rule_in_tether_proto() {
    let parse = |name: &str| {
        let text = format!(
            "edge = \"e:1\"\ncredential = \"/c\"\n[[endpoint]]\nname = \"{name}\"\nkind = \"tcp\"\nupstream = \"127.0.0.1:80\"\n"
        );
        Config::parse(Path::new("t.toml"), &text)
    };
    let long = "a".repeat(63);
    let too_long = "a".repeat(64);
    // Dotted names (`*.site-42` rules match them), 127 bytes at most.
    let longest = format!("{long}.{long}");
    let too_long_dotted = format!("{long}.{long}.a");
    for name in [
        "a",
        "0",
        "web",
        "a-b",
        "9-lives",
        "cam.site-42",
        "a.b.c",
        long.as_str(),
        longest.as_str(),
    ] {
        assert!(tether_proto::valid_endpoint_name(name), "{name}");
        assert!(parse(name).is_ok(), "`{name}` is accepted");
    }
    for name in [
        "",
        "-web",
        "web-",
        "Web",
        "a_b",
        "a..b",
        ".a",
        "a.",
        "a.-b",
        "wéb",
        too_long.as_str(),
        too_long_dotted.as_str(),
    ] {
        assert!(!tether_proto::valid_endpoint_name(name), "{name}");
        let e = parse(name).expect_err("refused");
        assert_eq!((e.line, e.field.as_str()), (4, "endpoint[0].name"), "{e}");
        assert!(e.reason.contains("not a valid endpoint name"), "{e}");
    }
}

/// A config with `table` (`[session]` ... ) and an endpoint with `ep_extra`.
fn with(table: &str, ep_extra: &str) -> String {
    format!(
        "edge = \"e:1\"\ncredential = \"/c\"\n{table}\n[[endpoint]]\nname = \"web\"\nkind = \"tcp\"\nupstream = \"127.0.0.1:80\"\n{ep_extra}\n"
    )
}

/// One numeric field: the values just inside its range and just outside it.
struct Range {
    table: &'static str,
    key: &'static str,
    lowest: u64,
    highest: u64,
    too_low: Option<u64>,
    too_high: u64,
    /// How the message names the range.
    text: &'static str,
}

const MS_1H: &str = "1..=3600000 ms (1 ms to 1 h)";

#[rustfmt::skip]
const RANGES: &[Range] = &[
    Range { table: "reconnect", key: "initial_backoff_ms", lowest: 1, highest: 3_600_000,
            too_low: Some(0), too_high: 3_600_001, text: MS_1H },
    // Its lowest is the default initial_backoff_ms.
    Range { table: "reconnect", key: "max_backoff_ms", lowest: 500, highest: 3_600_000,
            too_low: Some(0), too_high: 3_600_001, text: MS_1H },
    Range { table: "reconnect", key: "healthy_after_ms", lowest: 0, highest: 86_400_000,
            too_low: None, too_high: 86_400_001, text: "0..=86400000 ms (0 ms to 24 h)" },
    Range { table: "session", key: "max_streams", lowest: 1, highest: 65_535,
            too_low: Some(0), too_high: 65_536, text: "1..=65535" },
    Range { table: "session", key: "window", lowest: 16_384, highest: 2_147_483_647,
            too_low: Some(16_383), too_high: 2_147_483_648, text: "16384..=2147483647 bytes" },
    Range { table: "session", key: "ping_interval_ms", lowest: 100, highest: 3_600_000,
            too_low: Some(99), too_high: 3_600_001, text: "100..=3600000 ms (100 ms to 1 h)" },
    // Its lower bound is the interval's (default 15 s): see the test below.
    Range { table: "session", key: "dead_after_ms", lowest: 15_001, highest: 86_400_000,
            too_low: None, too_high: 86_400_001,
            text: "more than session.ping_interval_ms and at most 86400000 ms (24 h)" },
    Range { table: "endpoint", key: "connect_timeout_ms", lowest: 100, highest: 600_000,
            too_low: Some(99), too_high: 600_001, text: "100..=600000 ms (100 ms to 10 min)" },
    Range { table: "endpoint", key: "idle_timeout_ms", lowest: 1000, highest: 86_400_000,
            too_low: Some(999), too_high: 86_400_001, text: "1000..=86400000 ms (1 s to 24 h)" },
];

/// A config that sets `r`'s field to `v`, the line of that key and its field path.
fn config_with(r: &Range, v: u64) -> (String, usize, String) {
    let (table, key) = (r.table, r.key);
    match (table, key) {
        // The endpoint's own lines come first.
        ("endpoint", _) => (
            with("", &format!("{key} = {v}")),
            8,
            format!("endpoint[0].{key}"),
        ),
        // The cap must not be below the base.
        (_, "initial_backoff_ms") => (
            with(
                &format!("[{table}]\n{key} = {v}\nmax_backoff_ms = 3600000"),
                "",
            ),
            4,
            format!("{table}.{key}"),
        ),
        // The deadline must exceed the interval.
        (_, "ping_interval_ms") => (
            with(
                &format!("[{table}]\n{key} = {v}\ndead_after_ms = 86400000"),
                "",
            ),
            4,
            format!("{table}.{key}"),
        ),
        _ => (
            with(&format!("[{table}]\n{key} = {v}"), ""),
            4,
            format!("{table}.{key}"),
        ),
    }
}

#[test]
fn each_numeric_field_accepts_both_ends_of_its_range() {
    for r in RANGES {
        for v in [r.lowest, r.highest] {
            let (text, _, field) = config_with(r, v);
            let c = Config::parse(Path::new("t.toml"), &text)
                .unwrap_or_else(|e| panic!("{field} = {v} is in range: {e}"));
            assert!(c.session.mux_config().validate().is_ok(), "{field} = {v}");
        }
    }
}

#[test]
fn a_value_just_outside_its_range_is_refused_with_line_field_and_range() {
    let path = Path::new("/etc/tether/tetherd.toml");
    // And a value near u64::MAX (TOML's largest integer), which would
    // overflow `Instant + Duration`.
    let huge = i64::MAX as u64;
    for r in RANGES {
        for v in r.too_low.into_iter().chain([r.too_high, huge]) {
            let (text, line, field) = config_with(r, v);
            let e = Config::parse(path, &text).expect_err("out of range");
            assert_eq!((e.line, e.field.as_str()), (line, field.as_str()), "{e}");
            assert!(
                e.reason.contains(&format!("must be {}, not {v}", r.text)),
                "{field} = {v}: {e}"
            );
            assert!(
                e.to_string()
                    .starts_with(&format!("/etc/tether/tetherd.toml:{line}: {field}: ")),
                "{e}"
            );
        }
    }
}

#[test]
fn dead_after_must_exceed_the_ping_interval_even_when_left_at_its_default() {
    let e = Config::parse(
        Path::new("t.toml"),
        &with(
            "[session]\nping_interval_ms = 1000\ndead_after_ms = 1000",
            "",
        ),
    )
    .expect_err("equal");
    assert_eq!(
        (e.line, e.field.as_str()),
        (5, "session.dead_after_ms"),
        "{e}"
    );
    assert!(
        e.reason
            .contains("must exceed session.ping_interval_ms (1000 ms)"),
        "{e}"
    );
    // dead_after_ms at its default (45 s) below a longer interval: the line
    // is the interval's, the only one in the file.
    let e = Config::parse(
        Path::new("t.toml"),
        &with("[session]\nping_interval_ms = 60000", ""),
    )
    .expect_err("default dead_after below the interval");
    assert_eq!(
        (e.line, e.field.as_str()),
        (4, "session.dead_after_ms"),
        "{e}"
    );
    assert!(e.reason.contains("not 45000 ms"), "{e}");
    // The same for a cap left at its default below a larger base.
    let e = Config::parse(
        Path::new("t.toml"),
        &with("[reconnect]\ninitial_backoff_ms = 70000", ""),
    )
    .expect_err("default cap below the base");
    assert_eq!(
        (e.line, e.field.as_str()),
        (4, "reconnect.max_backoff_ms"),
        "{e}"
    );
}
