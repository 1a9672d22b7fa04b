//! The edge's configuration file (`edge.toml`, see the README's configuration reference): typed
//! structs with `deny_unknown_fields`, and [`Config::load`], which parses,
//! checks every value and the TLS files it names, and reports the first
//! problem as a [`ConfigError`] with file, line, field and reason.
//!
//! This module reads files but opens no socket and touches no store.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use serde::Deserialize;

use crate::policy::{self, Cidr, EdgePolicies, Policy, PolicyDoc, RestrictIps};
use crate::tls;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where `tokens.db` lives.
    pub state_dir: PathBuf,
    /// The port devices dial.
    pub agent: AgentConfig,
    /// Public TCP endpoints, one port each; absent = no tcp endpoints.
    #[serde(default)]
    pub tcp: Option<TcpConfig>,
    /// The shared SNI-routed TLS port; absent = no tls endpoints.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Multiplexer settings for every agent session.
    #[serde(default)]
    pub session: SessionConfig,
    /// What a peer may hold, and for how long.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The mandatory traffic policy, applied to every endpoint.
    #[serde(default)]
    pub traffic_policy: PolicyDoc,
    /// The admin API; absent = no API listener.
    #[serde(default)]
    pub api: Option<ApiConfig>,
    /// What the store keeps of the events, and where else they go.
    #[serde(default)]
    pub events: EventsConfig,
    /// Automatic rotation.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// Per-endpoint traffic policies, keyed by an exact endpoint name or
    /// `*<suffix>`; every matching key applies, on top of the mandatory one.
    #[serde(default)]
    pub endpoint_policy: BTreeMap<String, PolicyDoc>,
    /// The checked policies (filled by [`Config::parse`]).
    #[serde(skip)]
    pub policies: Arc<EdgePolicies>,
}

/// `[agent]`: where devices dial in.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Listen address (port 0 = the OS picks; printed as `LISTEN agent`).
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or RSA).
    pub key: PathBuf,
    /// Sources that may start agent sessions (CIDRs or addresses); empty = any.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Sources that may not; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<Cidr>,
}

impl AgentConfig {
    /// `allow` / `deny` as one enforced rule, checked at accept on the agent port.
    pub fn sources(&self) -> RestrictIps {
        RestrictIps::new(&self.allow, &self.deny, true)
    }
}

/// Where the admin API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiListen {
    /// A TCP address (port 0 = the OS picks; printed as `LISTEN api`).
    Tcp(SocketAddr),
    /// A unix socket (`unix:/run/tether-edge/api.sock`), created mode 0660.
    Unix(PathBuf),
}

impl ApiListen {
    /// `unix:<path>` or `<ip>:<port>`.
    pub fn parse(s: &str) -> Result<ApiListen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(format!("{s:?}: a unix socket path must be absolute"));
            }
            return Ok(ApiListen::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>().map(ApiListen::Tcp).map_err(|_| {
            format!("{s:?} is neither ip:port (127.0.0.1:7070, [::1]:7070) nor unix:/path")
        })
    }
}

impl<'de> Deserialize<'de> for ApiListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ApiListen, D::Error> {
        let s = String::deserialize(d)?;
        ApiListen::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn default_api_listen() -> ApiListen {
    ApiListen::Tcp(SocketAddr::from(([127, 0, 0, 1], 7070)))
}

/// `[api]`: the admin API (README "Admin API").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `ip:port` or `unix:/path`; default `127.0.0.1:7070`.
    #[serde(default = "default_api_listen")]
    pub listen: ApiListen,
    /// PEM certificate chain for HTTPS; required off loopback.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its PEM private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Sources that may reach the API at all (CIDRs or addresses); empty = any.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Sources that may not; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<Cidr>,
    /// Connections served at once; past it a new one waits in the backlog.
    #[serde(default = "api_max_connections")]
    pub max_connections: usize,
    /// The largest request body accepted (bytes); a larger one is refused
    /// with 413 before it is read.
    #[serde(default = "api_max_body")]
    pub max_body_bytes: u64,
    /// Time for a request's headers (and between requests on a kept-alive
    /// connection).
    #[serde(default = "api_header_timeout")]
    pub header_timeout_ms: u64,
    /// Time for a whole request, body and answer included.
    #[serde(default = "api_request_timeout")]
    pub request_timeout_ms: u64,
}

fn api_max_connections() -> usize {
    32
}
fn api_max_body() -> u64 {
    64 * 1024
}
fn api_header_timeout() -> u64 {
    5_000
}
fn api_request_timeout() -> u64 {
    10_000
}

impl ApiConfig {
    /// `allow` / `deny` as one enforced rule, checked at accept.
    pub fn sources(&self) -> RestrictIps {
        RestrictIps::new(&self.allow, &self.deny, true)
    }

    /// Whether the listener is reachable only from this machine.
    pub fn is_local(&self) -> bool {
        match &self.listen {
            ApiListen::Tcp(a) => a.ip().is_loopback(),
            ApiListen::Unix(_) => true,
        }
    }
}

/// `[events]`: retention in the store, and an optional JSON-lines copy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// At most this many events are kept.
    pub max_events: u64,
    /// None older than this many days.
    pub max_age_days: u64,
    /// Also write every event as one JSON line: `"stdout"` (among the
    /// machine-readable lines) or an absolute file path (appended to,
    /// created with mode 0640). Absent: the store only.
    pub json_lines: Option<String>,
}

impl Default for EventsConfig {
    fn default() -> EventsConfig {
        let r = crate::events::Retention::default();
        EventsConfig {
            max_events: r.max_events,
            max_age_days: r.max_age_secs / 86_400,
            json_lines: None,
        }
    }
}

/// `[rotation]`: rotating tokens without an operator asking.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// A token older than this many seconds (since it was created, or
    /// minted as a successor) is rotated while its device is connected, as
    /// if an operator had asked (`POST /tokens/{id}/rotate`). Absent: only
    /// on request.
    #[serde(default)]
    pub max_token_age_secs: Option<u64>,
}

/// The accepted range of `rotation.max_token_age_secs`: a second (for
/// tests) to ten years.
pub const MAX_TOKEN_AGE_RANGE: std::ops::RangeInclusive<u64> = 1..=10 * 365 * 86_400;

/// Where `[events] json_lines` sends events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JsonLines {
    /// The edge's stdout, among its other lines.
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

impl EventsConfig {
    /// The JSON-lines sink, checked: `stdout` or an absolute path.
    pub fn sink(&self) -> Result<Option<JsonLines>, String> {
        match self.json_lines.as_deref() {
            None => Ok(None),
            Some("stdout") => Ok(Some(JsonLines::Stdout)),
            Some(p) if Path::new(p).is_absolute() => Ok(Some(JsonLines::File(PathBuf::from(p)))),
            Some(p) => Err(format!(
                "{p:?} is neither \"stdout\" nor an absolute file path"
            )),
        }
    }

    /// As the store's retention.
    pub fn retention(&self) -> crate::events::Retention {
        crate::events::Retention {
            max_events: self.max_events,
            max_age_secs: self.max_age_days.saturating_mul(86_400),
        }
    }
}

/// `[tcp]`: one public port per tcp endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Address the endpoint ports listen on.
    pub listen_ip: IpAddr,
    /// Host named in the public URL (default: `listen_ip`).
    #[serde(default)]
    pub public_host: Option<String>,
    /// Inclusive port range for endpoints without a fixed port; `[0, 0]`
    /// lets the OS pick.
    #[serde(default)]
    pub port_range: PortRange,
    /// Endpoint name -> fixed port.
    #[serde(default)]
    pub fixed: BTreeMap<String, u16>,
}

/// An inclusive port range; `[0, 0]` means "the OS picks".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "[u16; 2]")]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl From<[u16; 2]> for PortRange {
    fn from([first, last]: [u16; 2]) -> PortRange {
        PortRange { first, last }
    }
}

impl PortRange {
    /// Whether the OS picks the ports.
    pub fn is_os_chosen(&self) -> bool {
        self.first == 0 && self.last == 0
    }
}

/// `[tls]`: one shared port, routed by SNI `<endpoint>.<domain>`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Listen address (printed as `LISTEN tls`).
    pub listen: SocketAddr,
    /// Endpoint `web` is served as `web.<domain>`.
    pub domain: String,
    /// PEM certificate chain for `*.<domain>`.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
}

/// `[session]`: the multiplexer settings of every agent session.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Most streams per session.
    pub max_streams: usize,
    /// Receive window per stream, bytes.
    pub window: u32,
    /// Ping after this long without input.
    pub ping_interval_ms: u64,
    /// Close a session after this long without input.
    pub dead_after_ms: u64,
    /// How long a graceful shutdown waits for open streams.
    pub shutdown_grace_ms: u64,
    /// How long a closed session may take to flush its last frames before
    /// its transport is dropped (a peer that stops reading holds nothing
    /// past it).
    pub linger_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        let d = tether_proto::Config::new(tether_proto::Role::Server);
        SessionConfig {
            max_streams: d.max_streams,
            window: d.window,
            ping_interval_ms: d.ping_interval_ms,
            dead_after_ms: d.dead_after_ms,
            shutdown_grace_ms: 10_000,
            linger_ms: 2_000,
        }
    }
}

/// `[limits]`: every resource a peer can hold, bounded in size and in time
/// (DESIGN.md invariant 11). The README lists each with its default.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Agent port: time for the TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Agent port: time for `Hello` after the TLS handshake.
    pub hello_timeout_ms: u64,
    /// Unfinished agent handshakes per source (an IPv4 address, an IPv6 /64).
    pub pending_per_source: usize,
    /// Unfinished agent handshakes in all.
    pub pending_total: usize,
    /// Live sessions per token; a new one past it evicts the oldest.
    pub sessions_per_token: usize,
    /// Endpoints one session may bind.
    pub endpoints_per_session: usize,
    /// Public connections of one endpoint waiting for a stream; past it a
    /// new one is closed at once.
    pub public_waiting_per_endpoint: usize,
    /// Public connections in all (every tcp port and the tls port).
    pub public_connections: usize,
    /// Shared TLS port: time for a public client's TLS handshake.
    pub public_tls_handshake_timeout_ms: u64,
    /// Shared TLS port: unfinished handshakes per source (an IPv4 address,
    /// an IPv6 /64); past it a new connection is closed at accept.
    pub public_pending_per_source: usize,
    /// Shared TLS port: unfinished handshakes in all.
    pub public_pending_total: usize,
    /// An established public connection with no byte either way for this
    /// long is closed.
    pub idle_timeout_ms: u64,
    /// Agent port: failed authentications per minute from one source (an
    /// IPv4 address, an IPv6 /64) before refusals are delayed.
    pub auth_failures_per_source: u32,
    /// ... and for one token id.
    pub auth_failures_per_token: u32,
    /// How long a refusal over either limit is delayed.
    pub auth_failure_delay_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        LimitsConfig {
            tls_handshake_timeout_ms: 5_000,
            hello_timeout_ms: 5_000,
            pending_per_source: 8,
            pending_total: 512,
            sessions_per_token: 4,
            endpoints_per_session: 32,
            public_waiting_per_endpoint: 64,
            public_connections: 8_192,
            public_tls_handshake_timeout_ms: 5_000,
            public_pending_per_source: 16,
            public_pending_total: 1_024,
            idle_timeout_ms: 600_000,
            auth_failures_per_source: 30,
            auth_failures_per_token: 10,
            auth_failure_delay_ms: 2_000,
        }
    }
}

/// The accepted range of every numeric setting: the arithmetic on them
/// (`Instant + Duration`, window sums) stays sound inside these.
const RANGES: &[(&str, &str, u64, u64)] = &[
    ("session", "ping_interval_ms", 100, 3_600_000),
    ("session", "dead_after_ms", 200, 86_400_000),
    ("session", "shutdown_grace_ms", 0, 3_600_000),
    ("session", "linger_ms", 10, 60_000),
    ("limits", "tls_handshake_timeout_ms", 100, 120_000),
    ("limits", "hello_timeout_ms", 100, 120_000),
    ("limits", "pending_per_source", 1, 65_536),
    ("limits", "pending_total", 1, 1_048_576),
    ("limits", "sessions_per_token", 1, 65_536),
    ("limits", "endpoints_per_session", 1, 65_536),
    ("limits", "public_waiting_per_endpoint", 1, 1_048_576),
    ("limits", "public_connections", 1, 16_777_216),
    ("limits", "public_tls_handshake_timeout_ms", 100, 120_000),
    ("limits", "public_pending_per_source", 1, 65_536),
    ("limits", "public_pending_total", 1, 1_048_576),
    ("limits", "idle_timeout_ms", 1_000, 604_800_000),
    ("limits", "auth_failures_per_source", 1, 1_000_000),
    ("limits", "auth_failures_per_token", 1, 1_000_000),
    ("limits", "auth_failure_delay_ms", 0, 60_000),
    ("api", "max_connections", 1, 65_536),
    ("api", "max_body_bytes", 1_024, 16_777_216),
    ("api", "header_timeout_ms", 100, 120_000),
    ("api", "request_timeout_ms", 100, 600_000),
    ("events", "max_events", 1, 100_000_000),
    ("events", "max_age_days", 1, 3_650),
];

impl Config {
    fn numeric(&self, table: &str, field: &str) -> u64 {
        let (s, l) = (&self.session, &self.limits);
        let u = |v: usize| v as u64;
        match (table, field) {
            ("session", "ping_interval_ms") => s.ping_interval_ms,
            ("session", "dead_after_ms") => s.dead_after_ms,
            ("session", "shutdown_grace_ms") => s.shutdown_grace_ms,
            ("session", "linger_ms") => s.linger_ms,
            ("limits", "tls_handshake_timeout_ms") => l.tls_handshake_timeout_ms,
            ("limits", "hello_timeout_ms") => l.hello_timeout_ms,
            ("limits", "pending_per_source") => u(l.pending_per_source),
            ("limits", "pending_total") => u(l.pending_total),
            ("limits", "sessions_per_token") => u(l.sessions_per_token),
            ("limits", "endpoints_per_session") => u(l.endpoints_per_session),
            ("limits", "public_waiting_per_endpoint") => u(l.public_waiting_per_endpoint),
            ("limits", "public_connections") => u(l.public_connections),
            ("limits", "public_tls_handshake_timeout_ms") => l.public_tls_handshake_timeout_ms,
            ("limits", "public_pending_per_source") => u(l.public_pending_per_source),
            ("limits", "public_pending_total") => u(l.public_pending_total),
            ("limits", "idle_timeout_ms") => l.idle_timeout_ms,
            ("limits", "auth_failures_per_source") => u64::from(l.auth_failures_per_source),
            ("limits", "auth_failures_per_token") => u64::from(l.auth_failures_per_token),
            ("limits", "auth_failure_delay_ms") => l.auth_failure_delay_ms,
            ("events", "max_events") => self.events.max_events,
            ("events", "max_age_days") => self.events.max_age_days,
            ("api", f) => match &self.api {
                // `check` skips the [api] fields when there is no [api].
                None => 0,
                Some(a) => match f {
                    "max_connections" => u(a.max_connections),
                    "max_body_bytes" => a.max_body_bytes,
                    "header_timeout_ms" => a.header_timeout_ms,
                    "request_timeout_ms" => a.request_timeout_ms,
                    _ => 0,
                },
            },
            // RANGES names only the fields above (a unit test walks it).
            _ => 0,
        }
    }
}

/// Milliseconds as a `Duration`.
pub fn ms(v: u64) -> std::time::Duration {
    std::time::Duration::from_millis(v)
}

impl SessionConfig {
    /// The multiplexer configuration of an edge (server role) session.
    pub fn mux(&self) -> tether_proto::Config {
        tether_proto::Config {
            role: tether_proto::Role::Server,
            max_streams: self.max_streams,
            window: self.window,
            ping_interval_ms: self.ping_interval_ms,
            dead_after_ms: self.dead_after_ms,
        }
    }
}

/// A configuration problem: `<file>:<line>: <field>: <reason>`, without
/// `<line>` when the field has no line of its own, and `<file>: <reason>`
/// for a file that cannot be read (no line, no field to point at).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Dotted field path (`session.window`), `toml` for a syntax error, or
    /// empty when the file as a whole could not be read.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(
                f,
                "{}:{}: {}: {}",
                self.file.display(),
                l,
                self.field,
                self.reason
            ),
            None if self.field.is_empty() => write!(f, "{}: {}", self.file.display(), self.reason),
            None => write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.reason
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

pub use tether_proto::valid_endpoint_name;

fn valid_domain(domain: &str) -> bool {
    domain.len() <= 253 && domain.split('.').all(tether_proto::valid_label)
}

impl Config {
    /// Reads, parses and checks `path`, including the certificates and keys
    /// it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            field: String::new(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(path, &src)
    }

    /// Parses and checks `src`, the contents of `path` (relative paths in it
    /// are taken as they are, relative to the working directory).
    pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
        let doc = Doc { file: path, src };
        let mut cfg: Config = toml::from_str(src).map_err(|e| doc.de_error(&e))?;
        cfg.check(&doc)?;
        cfg.policies = Arc::new(cfg.check_policies(&doc)?);
        Ok(cfg)
    }

    /// Checks the mandatory and per-endpoint policies (reading the PEM files
    /// they name) and builds each one's TLS once, so that a policy the edge
    /// could not serve is an error now, not at the first connection.
    fn check_policies(&self, doc: &Doc<'_>) -> Result<EdgePolicies, ConfigError> {
        let load = |prefix: &str, d: &PolicyDoc| -> Result<Arc<Policy>, ConfigError> {
            let p = Policy::from_doc(d, &Files)
                .map_err(|e| doc.at_path(&format!("{prefix}.{}", e.field), e.reason))?;
            Ok(Arc::new(p))
        };
        let mandatory = load("traffic_policy", &self.traffic_policy)?;
        let mut endpoints = BTreeMap::new();
        for (key, d) in &self.endpoint_policy {
            let prefix = format!("endpoint_policy.{key}");
            policy::check_key(key).map_err(|r| {
                let mut e = doc.at_path(&prefix, r);
                // A key with a '.' in it is no path: find its line by its text.
                e.line = e.line.or_else(|| {
                    let quoted = format!("\"{key}\"");
                    doc.src
                        .lines()
                        .position(|l| l.contains(&quoted))
                        .map(|i| i + 1)
                });
                e
            })?;
            endpoints.insert(key.clone(), load(&prefix, d)?);
        }
        let policies = EdgePolicies {
            mandatory,
            endpoints,
        };
        // Every operator combination must leave a servable TLS: check the
        // mandatory layer alone and with each per-endpoint key.
        let mut combos = vec![("traffic_policy".to_owned(), policies.layers_for("-"))];
        for key in policies.endpoints.keys() {
            let mut layers = vec![(policy::Layer::Edge, policies.mandatory.clone())];
            layers.push((
                policy::Layer::Endpoint(key.clone()),
                policies.endpoints[key].clone(),
            ));
            combos.push((format!("endpoint_policy.{key}"), layers));
        }
        // The [tls] identity, read once, for the plans that need a server of
        // their own (the default plan is served by the shared one).
        let mut identity = None;
        for (field, layers) in combos {
            let refs: Vec<_> = layers.iter().map(|(l, p)| (l.clone(), &**p)).collect();
            let eff = policy::combine(&refs, policy::Carriage::Terminated)
                .map_err(|c| doc.at_path(&field, c.message))?;
            let (Some(plan), Some(t)) = (&eff.tls, &self.tls) else {
                continue;
            };
            if plan.is_default() {
                continue;
            }
            if identity.is_none() {
                identity = Some(
                    tls::load_identity(&t.cert, &t.key)
                        .map_err(|e| doc.at(&["tls", "cert"], e.to_string()))?,
                );
            }
            if let Some(id) = &identity {
                tls::endpoint_server(id, plan)
                    .map_err(|e| doc.at_path(&field, format!("cannot serve this TLS: {e}")))?;
            }
        }
        Ok(policies)
    }

    fn check(&self, doc: &Doc<'_>) -> Result<(), ConfigError> {
        if let Some(tcp) = &self.tcp {
            let r = tcp.port_range;
            if !r.is_os_chosen() && (r.first == 0 || r.first > r.last) {
                return Err(doc.at(
                    &["tcp", "port_range"],
                    format!("[{}, {}] is not a range: need 1 <= first <= last, or [0, 0] to let the OS pick", r.first, r.last),
                ));
            }
            if let Some(h) = &tcp.public_host {
                if h.is_empty() || h.contains(char::is_whitespace) || h.contains('/') {
                    return Err(doc.at(
                        &["tcp", "public_host"],
                        format!("{h:?} is not a host name or address"),
                    ));
                }
            }
            let mut seen = BTreeMap::new();
            for (name, port) in &tcp.fixed {
                let here = ["tcp", "fixed", name.as_str()];
                if !valid_endpoint_name(name) {
                    return Err(doc.at(
                        &here,
                        "not an endpoint name (DNS labels of lowercase letters, digits, inner '-', joined by '.', at most 127 bytes)"
                            .into(),
                    ));
                }
                if *port == 0 {
                    return Err(doc.at(&here, "a fixed port cannot be 0".into()));
                }
                if let Some(other) = seen.insert(*port, name) {
                    return Err(doc.at(&here, format!("port {port} is already fixed for {other}")));
                }
            }
        }
        if let Some(t) = &self.tls {
            if !valid_domain(&t.domain) {
                return Err(doc.at(
                    &["tls", "domain"],
                    format!("{:?} is not a lowercase DNS name", t.domain),
                ));
            }
        }
        for &(table, field, lo, hi) in RANGES {
            if table == "api" && self.api.is_none() {
                continue;
            }
            let v = self.numeric(table, field);
            if !(lo..=hi).contains(&v) {
                return Err(doc.at(
                    &[table, field],
                    format!("{v} is outside the accepted range {lo}..={hi}"),
                ));
            }
        }
        let s = &self.session;
        if let Err(e) = s.mux().validate() {
            use tether_proto::mux::ConfigError as E;
            let field = match e {
                E::MaxStreams(_) => "max_streams",
                E::Window(_) => "window",
                E::Heartbeat { .. } => "dead_after_ms",
                E::Slots { .. } | E::Buffer { .. } => "max_streams",
            };
            return Err(doc.at(&["session", field], e.to_string()));
        }
        if let Some(a) = &self.api {
            if a.cert.is_some() != a.key.is_some() {
                let field = if a.cert.is_some() { "key" } else { "cert" };
                return Err(doc.at(
                    &["api", field],
                    "api.cert and api.key go together: set both for HTTPS, or neither".into(),
                ));
            }
            if !a.is_local() && a.cert.is_none() {
                return Err(doc.at(
                    &["api", "listen"],
                    "the API listens beyond loopback: set api.cert and api.key (HTTPS is \
                     required off loopback, the API carries keys and token secrets)"
                        .into(),
                ));
            }
        }
        if let Err(why) = self.events.sink() {
            return Err(doc.at(&["events", "json_lines"], why));
        }
        if let Some(v) = self.rotation.max_token_age_secs {
            if !MAX_TOKEN_AGE_RANGE.contains(&v) {
                return Err(doc.at(
                    &["rotation", "max_token_age_secs"],
                    format!(
                        "{v} is outside the accepted range {}..={} (leave it out to rotate only on request)",
                        MAX_TOKEN_AGE_RANGE.start(),
                        MAX_TOKEN_AGE_RANGE.end()
                    ),
                ));
            }
        }
        // Last, the files: every value above is checked first.
        tls::load_identity(&self.agent.cert, &self.agent.key).map_err(|e| match e {
            tls::IdentityError::Cert(r) => doc.at(&["agent", "cert"], r),
            tls::IdentityError::Key(r) => doc.at(&["agent", "key"], r),
        })?;
        if let Some(t) = &self.tls {
            tls::load_identity(&t.cert, &t.key).map_err(|e| match e {
                tls::IdentityError::Cert(r) => doc.at(&["tls", "cert"], r),
                tls::IdentityError::Key(r) => doc.at(&["tls", "key"], r),
            })?;
        }
        if let Some(ApiConfig {
            cert: Some(c),
            key: Some(k),
            ..
        }) = &self.api
        {
            tls::load_identity(c, k).map_err(|e| match e {
                tls::IdentityError::Cert(r) => doc.at(&["api", "cert"], r),
                tls::IdentityError::Key(r) => doc.at(&["api", "key"], r),
            })?;
        }
        Ok(())
    }
}

/// The source being parsed, to turn byte offsets and paths into places
/// (through `tether-conf`, the one TOML-error locator both programs use).
struct Doc<'a> {
    file: &'a Path,
    src: &'a str,
}

impl Doc<'_> {
    /// An error for the value at `path` (the line of its key, when the key
    /// is in the file; a field left at its default has no line).
    fn at(&self, path: &[&str], reason: String) -> ConfigError {
        let field = path.join(".");
        ConfigError {
            file: self.file.to_path_buf(),
            line: tether_conf::line_of_key(self.src, &field),
            field,
            reason,
        }
    }

    /// An error at a dotted `path` (`traffic_policy.on_tcp_connect[0]...`).
    fn at_path(&self, path: &str, reason: String) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: tether_conf::line_of_key(self.src, path),
            field: path.to_owned(),
            reason,
        }
    }

    /// Turns a toml/serde error into file, line, field and reason.
    fn de_error(&self, e: &toml::de::Error) -> ConfigError {
        let (line, field) = tether_conf::locate_error(self.src, e);
        let msg = e.message().trim();
        ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line),
            field: if field == tether_conf::WHOLE_FILE {
                "toml".to_owned()
            } else {
                field
            },
            reason: msg.lines().next().unwrap_or("invalid").to_owned(),
        }
    }
}

/// PEM sources of `edge.toml`'s policies: inline PEM, or a file (relative to
/// the working directory, like the other paths in the file).
struct Files;

impl policy::PemSource for Files {
    fn pem(&self, value: &str) -> Result<Vec<u8>, String> {
        if policy::is_inline_pem(value) {
            return Ok(value.as_bytes().to_vec());
        }
        std::fs::read(value).map_err(|e| format!("cannot read {value}: {e}"))
    }
}
