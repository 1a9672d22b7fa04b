//! The daemon's configuration (`tetherd.toml`) and its credential file.
//!
//! The TOML is parsed straight into typed structs with
//! `deny_unknown_fields`; every value is checked while it is deserialized, so
//! a bad value is reported at its own position. A [`ConfigError`] names the
//! file, the line, the field (a dotted path such as `endpoint[1].upstream`)
//! and the reason, which `main` prints as `error: <file>:<line>: <field>: <reason>`;
//! a file that cannot be read has no line or field, and [`LoadError::Read`]
//! says so as `error: <file>: cannot read the config file: <reason>`.
//!
//! This module does not open sockets or read the CA file: that is the
//! dialer's job, at start-up of [`crate::run`].

use std::fmt;
use std::fs;
use std::ops::RangeInclusive;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use futures_rustls::rustls::pki_types::ServerName;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use tether_conf::{line_of, line_of_key, locate_error};
use tether_proto::{Control, EndpointKind, Role, MAX_CONTROL};
use toml::Spanned;

/// The whole configuration, as typed values.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The edge's agent port, `host:port`; resolved again on every dial.
    pub edge: HostPort,
    /// TLS server name to verify; default: the host part of `edge`.
    #[serde(default)]
    pub server_name: Option<TlsName>,
    /// A pinned CA (PEM); absent = the system CA bundle ([`crate::dial::system_bundle`]).
    /// A relative path is relative to the config file's directory.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The credential file: the token on its first line, mode 0600. A
    /// relative path is relative to the config file's directory. Absent:
    /// `$CREDENTIALS_DIRECTORY/credential`, the file systemd passes with
    /// `LoadCredential=credential:PATH` ([`Config::credential_path`]).
    #[serde(default)]
    pub credential: Option<PathBuf>,
    /// Where a rotated credential is kept (a writable directory, mode 0700
    /// at most). Absent: `$STATE_DIRECTORY` (systemd's `StateDirectory=`);
    /// with neither, rotation offers are refused. A relative path is
    /// relative to the config file's directory.
    #[serde(default)]
    pub state_directory: Option<PathBuf>,
    /// Reconnect timing.
    #[serde(default)]
    pub reconnect: Reconnect,
    /// Multiplexer limits and heartbeat.
    #[serde(default)]
    pub session: SessionSettings,
    /// The endpoints to publish, at least one.
    #[serde(rename = "endpoint", default)]
    pub endpoints: Vec<Endpoint>,
    /// The file this was read from (what SIGHUP reads again).
    #[serde(skip)]
    pub path: PathBuf,
}

/// The values each numeric field accepts, and why.
///
/// Every duration ends up in `Instant + Duration` (timers, the driver's
/// heartbeat deadline) or in the backoff's doubling; every size in the
/// session's buffers, allocated once at start. Each range keeps that
/// arithmetic sound on every target (a value near `u64::MAX` would panic in
/// `Instant + Duration`) and the behaviour sane. A value outside its range
/// is refused at load time with file, line, field and the range (exit 64).
pub mod limits {
    use std::ops::RangeInclusive;

    use tether_proto::{INITIAL_WINDOW, MAX_WINDOW};

    /// `reconnect.initial_backoff_ms`: 1 ms to 1 h.
    pub const INITIAL_BACKOFF_MS: RangeInclusive<u64> = 1..=3_600_000;
    /// `reconnect.max_backoff_ms`: 1 ms to 1 h, and at least
    /// `initial_backoff_ms`.
    pub const MAX_BACKOFF_MS: RangeInclusive<u64> = 1..=3_600_000;
    /// `reconnect.healthy_after_ms`: 0 (every welcomed session resets the
    /// backoff) to 24 h.
    pub const HEALTHY_AFTER_MS: RangeInclusive<u64> = 0..=86_400_000;
    /// `session.max_streams`: what the multiplexer allows.
    pub const MAX_STREAMS: RangeInclusive<u64> = 1..=65_535;
    /// `session.window`, bytes: what the multiplexer allows. Together with
    /// `max_streams` it must also leave two sessions' buffers addressable
    /// (only a limit on 32-bit targets).
    pub const WINDOW: RangeInclusive<u64> = INITIAL_WINDOW as u64..=MAX_WINDOW as u64;
    /// `session.ping_interval_ms`: 100 ms to 1 h.
    pub const PING_INTERVAL_MS: RangeInclusive<u64> = 100..=3_600_000;
    /// `session.dead_after_ms`: more than `ping_interval_ms` (so at least
    /// 101 ms), at most this: 24 h.
    pub const DEAD_AFTER_MAX_MS: u64 = 86_400_000;
    /// `endpoint[].connect_timeout_ms`: 100 ms to 10 min.
    pub const CONNECT_TIMEOUT_MS: RangeInclusive<u64> = 100..=600_000;
    /// `endpoint[].idle_timeout_ms`: 1 s to 24 h.
    pub const IDLE_TIMEOUT_MS: RangeInclusive<u64> = 1000..=86_400_000;
}

/// `[reconnect]`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    /// Base of the exponential backoff, ms. Default 500, range
    /// [`limits::INITIAL_BACKOFF_MS`] (1 ms to 1 h).
    #[serde(deserialize_with = "initial_backoff")]
    pub initial_backoff_ms: u64,
    /// Cap of the exponential backoff, ms. Default 60000, range
    /// [`limits::MAX_BACKOFF_MS`] (1 ms to 1 h), at least `initial_backoff_ms`.
    #[serde(deserialize_with = "max_backoff")]
    pub max_backoff_ms: u64,
    /// A session that lived this long after Welcome resets the backoff, ms.
    /// Default 30000, range [`limits::HEALTHY_AFTER_MS`] (0 to 24 h).
    #[serde(deserialize_with = "healthy_after")]
    pub healthy_after_ms: u64,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect {
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            healthy_after_ms: 30_000,
        }
    }
}

/// `[session]`: passed into [`tether_proto::Config`].
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSettings {
    /// Most streams held at once. Default 64, range [`limits::MAX_STREAMS`]
    /// (1 to 65535).
    #[serde(deserialize_with = "max_streams")]
    pub max_streams: usize,
    /// Receive window per stream, bytes. Default 131072, range
    /// [`limits::WINDOW`] (16384 to 2147483647).
    #[serde(deserialize_with = "window")]
    pub window: u32,
    /// Send a PING after this long without input, ms. Default 15000, range
    /// [`limits::PING_INTERVAL_MS`] (100 ms to 1 h).
    #[serde(deserialize_with = "ping_interval")]
    pub ping_interval_ms: u64,
    /// Declare the edge dead after this long without input, ms. Default
    /// 45000; more than `ping_interval_ms`, at most
    /// [`limits::DEAD_AFTER_MAX_MS`] (24 h).
    #[serde(deserialize_with = "dead_after")]
    pub dead_after_ms: Spanned<u64>,
}

impl Default for SessionSettings {
    fn default() -> SessionSettings {
        let d = tether_proto::Config::new(Role::Client);
        SessionSettings {
            max_streams: d.max_streams,
            window: d.window,
            ping_interval_ms: d.ping_interval_ms,
            dead_after_ms: Spanned::new(0..0, d.dead_after_ms),
        }
    }
}

impl SessionSettings {
    /// The multiplexer configuration (agent = client role).
    pub fn mux_config(&self) -> tether_proto::Config {
        tether_proto::Config {
            role: Role::Client,
            max_streams: self.max_streams,
            window: self.window,
            ping_interval_ms: self.ping_interval_ms,
            dead_after_ms: *self.dead_after_ms.get_ref(),
        }
    }
}

/// One `[[endpoint]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// The endpoint's name, unique in this file.
    pub name: Spanned<Name>,
    /// How the edge publishes it.
    #[serde(deserialize_with = "endpoint_kind")]
    pub kind: EndpointKind,
    /// The local service, `host:port`.
    pub upstream: HostPort,
    /// Timeout for connecting to the upstream, ms. Default 5000, range
    /// [`limits::CONNECT_TIMEOUT_MS`] (100 ms to 10 min).
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "connect_timeout"
    )]
    pub connect_timeout_ms: u64,
    /// `idle_timeout_ms`: a proxied connection that carries no byte in
    /// either direction (nothing read from or written to the public
    /// client's stream or the upstream) for this long is closed on both
    /// sides: the stream is reset with `CANCEL`, the upstream connection
    /// shut down. Default 600000 (10 min, like nginx's `proxy_timeout`),
    /// range [`limits::IDLE_TIMEOUT_MS`] (1 s to 24 h). A half-closed
    /// connection waiting for an answer counts as idle too: set it above the
    /// longest silence the service has (a long poll, an idle SSH session
    /// without keepalives).
    #[serde(default = "default_idle_timeout", deserialize_with = "idle_timeout")]
    pub idle_timeout_ms: u64,
    /// `traffic_policy`: the policy this agent declares for the endpoint, in
    /// the shape of ngrok's Traffic Policy (`on_tcp_connect` rules of
    /// `actions`). The daemon only requires a table; the edge is the
    /// authority on what it means, adds it to its own policies (it can only
    /// narrow them) and answers `BindErr` naming the field it refuses.
    /// Absent or empty: no policy of the agent's own.
    #[serde(default)]
    pub traffic_policy: Policy,
    /// `proxy_protocol = "v2"`: start every upstream connection with a
    /// PROXY protocol v2 header ([`crate::proxy_header`]). Absent: none.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl Endpoint {
    /// The endpoint's name.
    pub fn name(&self) -> &str {
        &self.name.get_ref().0
    }

    /// The `Bind` that publishes this endpoint; `upstream` is
    /// [`Endpoint::upstream`] as text (the caller owns the string).
    pub fn bind<'a>(&'a self, upstream: &'a str) -> Control<'a> {
        self.bind_with(upstream, self.traffic_policy.as_str())
    }

    fn bind_with<'a>(&'a self, upstream: &'a str, policy: &'a str) -> Control<'a> {
        Control::Bind {
            endpoint: self.name(),
            kind: self.kind,
            url: "",
            upstream,
            policy,
        }
    }

    /// The most bytes of policy TOML that fit in this endpoint's `Bind`
    /// beside its other fields, within [`MAX_CONTROL`]. Postcard writes a
    /// string as a varint length and the bytes: the empty policy takes one
    /// byte, one of 128 to 16383 bytes its length plus two (the other fields
    /// are a few hundred bytes at most, so the room is always in that range).
    pub fn policy_room(&self) -> usize {
        let upstream = self.upstream.to_string();
        let bare = self.bind_with(&upstream, "");
        let mut buf = vec![0u8; MAX_CONTROL];
        // A Bind that does not fit even without a policy leaves no room.
        let base = bare.encode(&mut buf).map_or(MAX_CONTROL, |b| b.len());
        MAX_CONTROL.saturating_sub(base + 1)
    }
}

/// `traffic_policy`, as the TOML document sent in `Bind.policy` (empty for
/// none). Only a table is accepted; what it says is the edge's to check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy(String);

impl Policy {
    /// The TOML document; empty when the endpoint declares no policy.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::Table(t) if t.is_empty() => Ok(Policy::default()),
            toml::Value::Table(t) => toml::to_string(&t).map(Policy).map_err(|e| {
                de::Error::custom(format!("cannot be written as a TOML document: {e}"))
            }),
            other => Err(de::Error::custom(format!(
                "must be a table (on_tcp_connect = [{{ actions = [...] }}]), not a {}",
                other.type_str()
            ))),
        }
    }
}

/// `proxy_protocol`: the PROXY protocol version written to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// Version 2, the binary header ([`crate::proxy_header`]).
    V2,
}

impl<'de> Deserialize<'de> for ProxyProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ProxyProtocol, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "v2" => Ok(ProxyProtocol::V2),
            _ => Err(de::Error::custom(format!(
                "`{s}` is not a PROXY protocol version tetherd writes: only \"v2\" is accepted (omit the field for none)"
            ))),
        }
    }
}

fn default_connect_timeout() -> u64 {
    5000
}

fn default_idle_timeout() -> u64 {
    600_000
}

/// An endpoint name: 1 to 63 characters of `a-z`, `0-9` and `-`, usable as a
/// DNS label (the edge publishes tls endpoints as `<name>.<domain>`). The
/// rule is [`tether_proto::valid_endpoint_name`], the one the edge checks too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name(String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        let s = String::deserialize(d)?;
        if tether_proto::valid_endpoint_name(&s) {
            Ok(Name(s))
        } else {
            Err(de::Error::custom(format!(
                "`{s}` is not a valid endpoint name (1-63 of a-z, 0-9 and '-', not starting or ending with '-')"
            )))
        }
    }
}

pub use tether_conf::HostPort;

/// A name the edge's certificate must carry (a DNS name or an IP address).
#[derive(Clone, Debug)]
pub struct TlsName(pub ServerName<'static>);

impl TlsName {
    fn parse(s: &str) -> Result<TlsName, String> {
        ServerName::try_from(s.to_owned())
            .map(TlsName)
            .map_err(|_| format!("`{s}` is not a valid DNS name or IP address"))
    }
}

impl<'de> Deserialize<'de> for TlsName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TlsName, D::Error> {
        let s = String::deserialize(d)?;
        TlsName::parse(&s).map_err(de::Error::custom)
    }
}

fn endpoint_kind<'de, D: Deserializer<'de>>(d: D) -> Result<EndpointKind, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "tcp" => Ok(EndpointKind::Tcp),
        "tls" => Ok(EndpointKind::Tls),
        "tls-passthrough" => Ok(EndpointKind::TlsPassthrough),
        _ => Err(de::Error::custom(format!(
            "`{s}` is not an endpoint kind (tcp, tls or tls-passthrough)"
        ))),
    }
}

/// A `u64` within `range`, or an error that names the range.
fn in_range<'de, D: Deserializer<'de>>(
    d: D,
    range: RangeInclusive<u64>,
    unit: Unit,
) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(de::Error::custom(out_of_range(&range, unit, v)))
    }
}

/// What a range counts, for its message.
#[derive(Clone, Copy)]
enum Unit {
    Ms,
    Bytes,
    Count,
}

/// `must be 100..=3600000 ms (100 ms to 1 h), not 99`.
fn out_of_range(range: &RangeInclusive<u64>, unit: Unit, v: u64) -> String {
    let (lo, hi) = (*range.start(), *range.end());
    match unit {
        Unit::Ms => format!(
            "must be {lo}..={hi} ms ({} to {}), not {v}",
            human_ms(lo),
            human_ms(hi)
        ),
        Unit::Bytes => format!("must be {lo}..={hi} bytes, not {v}"),
        Unit::Count => format!("must be {lo}..={hi}, not {v}"),
    }
}

/// `ms` in the largest unit that divides it: `100 ms`, `1 s`, `10 min`, `24 h`.
fn human_ms(ms: u64) -> String {
    for (unit, len) in [("h", 3_600_000), ("min", 60_000), ("s", 1000)] {
        if ms >= len && ms.is_multiple_of(len) {
            return format!("{} {unit}", ms / len);
        }
    }
    format!("{ms} ms")
}

fn initial_backoff<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, limits::INITIAL_BACKOFF_MS, Unit::Ms)
}

fn max_backoff<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, limits::MAX_BACKOFF_MS, Unit::Ms)
}

fn healthy_after<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, limits::HEALTHY_AFTER_MS, Unit::Ms)
}

fn ping_interval<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, limits::PING_INTERVAL_MS, Unit::Ms)
}

fn dead_after<'de, D: Deserializer<'de>>(d: D) -> Result<Spanned<u64>, D::Error> {
    // The lower bound, more than ping_interval_ms, is checked once both are known.
    let v = Spanned::<u64>::deserialize(d)?;
    let max = limits::DEAD_AFTER_MAX_MS;
    if *v.get_ref() <= max {
        Ok(v)
    } else {
        Err(de::Error::custom(format!(
            "must be more than session.ping_interval_ms and at most {max} ms ({}), not {}",
            human_ms(max),
            v.get_ref()
        )))
    }
}

fn connect_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, limits::CONNECT_TIMEOUT_MS, Unit::Ms)
}

fn idle_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, limits::IDLE_TIMEOUT_MS, Unit::Ms)
}

fn max_streams<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    // Within 1..=65535: fits a usize on every target.
    in_range(d, limits::MAX_STREAMS, Unit::Count).map(|v| v as usize)
}

fn window<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    // Within INITIAL_WINDOW..=MAX_WINDOW: fits a u32.
    in_range(d, limits::WINDOW, Unit::Bytes).map(|v| v as u32)
}

/// Whether two sessions' buffers ([`crate::session_memory_bound`]) of
/// `session` fit in `addressable` bytes, computed without overflow.
fn two_sessions_fit(session: &tether_proto::Config, addressable: u64) -> Option<u64> {
    let fixed = tether_proto::Config {
        max_streams: 0,
        ..*session
    }
    .buffer_len() as u64
        + tether_driver::IO_BUFFER as u64
        + tether_driver::READ_AHEAD as u64;
    let per_stream =
        session.window as u64 + tether_proto::MAX_META as u64 + crate::proxy::COPY_BUFFER as u64;
    let one = (session.max_streams as u64)
        .checked_mul(per_stream)?
        .checked_add(fixed)?;
    (one.checked_mul(2)? <= addressable).then_some(one)
}

/// A configuration that is invalid: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (1 when the problem has no position, such as a missing field).
    pub line: usize,
    /// Dotted path of the field (`session.window`, `endpoint[0].name`), or `-`
    /// when the file as a whole is at fault.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.field,
            self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Why [`Config::load`] failed: the file could not be read, or what it
/// holds is not a valid configuration.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read (it has no line or field to point at):
    /// `<file>: cannot read the config file: <reason>`.
    Read(PathBuf, std::io::Error),
    /// The file was read and is invalid: `<file>:<line>: <field>: <reason>`.
    Invalid(ConfigError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Read(p, e) => {
                write!(f, "{}: cannot read the config file: {e}", p.display())
            }
            LoadError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LoadError {}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = fs::read_to_string(path).map_err(|e| LoadError::Read(path.to_owned(), e))?;
        Config::parse(path, &text).map_err(LoadError::Invalid)
    }

    /// Parses and checks `text`, reporting errors against `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |line: usize, field: &str, reason: String| ConfigError {
            file: file.to_owned(),
            line,
            field: field.to_owned(),
            reason,
        };
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, field) = locate_error(text, &e);
            err(line, &field, e.message().trim().to_owned())
        })?;

        // Checks that span several fields.
        let s = &cfg.session;
        if *s.dead_after_ms.get_ref() <= s.ping_interval_ms {
            // Left at its default: point at the interval that outgrew it.
            let line = match s.dead_after_ms.span() {
                r if r.is_empty() => line_of_key(text, "session.ping_interval_ms").unwrap_or(1),
                r => line_of(text, r.start),
            };
            return Err(err(
                line,
                "session.dead_after_ms",
                format!(
                    "must exceed session.ping_interval_ms ({} ms), not {} ms",
                    s.ping_interval_ms,
                    s.dead_after_ms.get_ref()
                ),
            ));
        }
        if two_sessions_fit(&s.mux_config(), isize::MAX as u64).is_none() {
            let line = line_of_key(text, "session.window")
                .or_else(|| line_of_key(text, "session.max_streams"))
                .unwrap_or(1);
            return Err(err(
                line,
                "session.window",
                format!(
                    "session.max_streams ({}) × window ({} bytes): two sessions' buffers do not fit in this platform's address space",
                    s.max_streams, s.window
                ),
            ));
        }
        debug_assert!(
            s.mux_config().validate().is_ok(),
            "each field was checked above"
        );
        let r = &cfg.reconnect;
        if r.max_backoff_ms < r.initial_backoff_ms {
            let line = line_of_key(text, "reconnect.max_backoff_ms")
                .or_else(|| line_of_key(text, "reconnect.initial_backoff_ms"))
                .unwrap_or(1);
            return Err(err(
                line,
                "reconnect.max_backoff_ms",
                format!(
                    "must be at least reconnect.initial_backoff_ms ({} ms)",
                    r.initial_backoff_ms
                ),
            ));
        }
        if cfg.endpoints.is_empty() {
            return Err(err(
                1,
                "endpoint",
                "at least one [[endpoint]] is required".into(),
            ));
        }
        for (i, ep) in cfg.endpoints.iter().enumerate() {
            if let Some(j) = cfg.endpoints[..i]
                .iter()
                .position(|o| o.name() == ep.name())
            {
                let first = line_of(text, cfg.endpoints[j].name.span().start);
                return Err(err(
                    line_of(text, ep.name.span().start),
                    &format!("endpoint[{i}].name"),
                    format!(
                        "`{}` is already used by endpoint[{j}] (line {first})",
                        ep.name()
                    ),
                ));
            }
            let policy = ep.traffic_policy.as_str().len();
            let room = ep.policy_room();
            if policy > room {
                let field = format!("endpoint[{i}].traffic_policy");
                let line = line_of_key(text, &field)
                    .unwrap_or_else(|| line_of(text, ep.name.span().start));
                return Err(err(
                    line,
                    &field,
                    format!(
                        "is {policy} bytes as TOML; at most {room} fit in the endpoint's Bind (one {MAX_CONTROL}-byte control message)"
                    ),
                ));
            }
        }
        let mut cfg = cfg;
        // Relative paths are relative to the file that names them, so a
        // bundle's `ca_file = "ca.crt"` works wherever the bundle is laid.
        let dir = file.parent().unwrap_or(Path::new(""));
        if let Some(p) = cfg.ca_file.take() {
            cfg.ca_file = Some(dir.join(p));
        }
        if let Some(p) = cfg.credential.take() {
            cfg.credential = Some(dir.join(p));
        }
        if let Some(p) = cfg.state_directory.take() {
            cfg.state_directory = Some(dir.join(p));
        }
        cfg.path = file.to_owned();
        Ok(cfg)
    }

    /// The credential file to read: `credential` when set, else
    /// `$CREDENTIALS_DIRECTORY/credential` (systemd's `LoadCredential=`).
    pub fn credential_path(&self) -> Result<PathBuf, CredentialError> {
        if let Some(p) = &self.credential {
            return Ok(p.clone());
        }
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(d) if !d.is_empty() => Ok(Path::new(&d).join(CREDENTIAL_NAME)),
            _ => Err(CredentialError::Unset(self.path.clone())),
        }
    }

    /// The directory for rotated credentials: `state_directory`, else the
    /// first of `$STATE_DIRECTORY`; `None` with neither.
    pub fn state_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.state_directory {
            return Some(p.clone());
        }
        let dir = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty())?;
        // systemd passes several, colon-separated, when the unit names several.
        let first = dir.to_string_lossy().split(':').next()?.to_owned();
        Some(PathBuf::from(first))
    }

    /// The TLS server name to verify: `server_name`, or the host of `edge`.
    pub fn tls_name(&self) -> Result<ServerName<'static>, String> {
        match &self.server_name {
            Some(n) => Ok(n.0.clone()),
            None => TlsName::parse(&self.edge.host).map(|n| n.0),
        }
    }
}

/// The token read from the credential file. Its `Debug` is redacted; logs
/// name it by its public id (`tk_<id>`).
#[derive(Clone)]
pub struct Credential {
    token: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}.<redacted>)", self.id())
    }
}

/// The name of the credential under `$CREDENTIALS_DIRECTORY`
/// (`LoadCredential=credential:/etc/tether/credential`).
pub const CREDENTIAL_NAME: &str = "credential";

/// Why the credential file was refused.
#[derive(Debug)]
pub enum CredentialError {
    /// The config names no credential file and `$CREDENTIALS_DIRECTORY` is unset.
    Unset(PathBuf),
    /// The file could not be read.
    Read(PathBuf, std::io::Error),
    /// The file is readable or writable by group or others.
    Mode(PathBuf, u32),
    /// The first line is empty or not a plausible token.
    Malformed(PathBuf, &'static str),
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialError::Unset(config) => write!(
                f,
                "{}: credential: not set, and $CREDENTIALS_DIRECTORY is not set either (set credential = \"PATH\", or run under systemd with LoadCredential={CREDENTIAL_NAME}:PATH)",
                config.display()
            ),
            CredentialError::Read(p, e) => {
                write!(f, "{}: cannot read the credential file: {e}", p.display())
            }
            CredentialError::Mode(p, m) => write!(
                f,
                "{}: refusing the credential file: it has mode {m:04o}, but must not be readable or writable by group or others (chmod 600 {})",
                p.display(),
                p.display()
            ),
            CredentialError::Malformed(p, why) => {
                write!(f, "{}: not a credential file: {why}", p.display())
            }
        }
    }
}

impl std::error::Error for CredentialError {}

impl Credential {
    /// Reads the token from `path`, refusing a file whose mode lets group or
    /// others in (`mode & 0o077 != 0`).
    pub fn load(path: &Path) -> Result<Credential, CredentialError> {
        let meta = fs::metadata(path).map_err(|e| CredentialError::Read(path.to_owned(), e))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CredentialError::Mode(path.to_owned(), mode));
        }
        let text =
            fs::read_to_string(path).map_err(|e| CredentialError::Read(path.to_owned(), e))?;
        Credential::parse(text.lines().next().unwrap_or(""))
            .map_err(|why| CredentialError::Malformed(path.to_owned(), why))
    }

    /// A token as the first line of a credential file holds it (surrounding
    /// white space ignored).
    pub fn parse(line: &str) -> Result<Credential, &'static str> {
        let token = line.trim();
        if token.is_empty() {
            return Err("the first line is empty");
        }
        if token.len() > 1024 || token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err("the first line is not a token (printable ASCII, at most 1024 bytes)");
        }
        Ok(Credential {
            token: token.to_owned(),
        })
    }

    /// The whole secret, for `Hello` only.
    pub fn secret(&self) -> &str {
        &self.token
    }

    /// The public part: `tk_<id>` (everything before the first `.`).
    pub fn id(&self) -> &str {
        self.token
            .split_once('.')
            .map_or("<malformed>", |(id, _)| id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn two_sessions_must_fit_the_address_space() {
        let mut m = tether_proto::Config::new(Role::Client);
        let one = two_sessions_fit(&m, isize::MAX as u64).expect("the defaults fit");
        assert_eq!(
            one,
            crate::session_memory_bound(&m) as u64,
            "the same bound"
        );
        // The largest session fits a 64-bit address space, not a 32-bit one.
        m.max_streams = 65_535;
        m.window = tether_proto::MAX_WINDOW;
        assert!(two_sessions_fit(&m, i64::MAX as u64).is_some());
        assert!(two_sessions_fit(&m, i32::MAX as u64).is_none());
        m.max_streams = 1;
        m.window = tether_proto::INITIAL_WINDOW;
        assert!(two_sessions_fit(&m, i32::MAX as u64).is_some());
    }

    const HEAD: &str =
        "edge = \"edge.example.com:7443\"\ncredential = \"/etc/tether/credential\"\n";

    /// `HEAD`, then one `[[endpoint]]` named `web` (line 4) with `extra` after
    /// its upstream (from line 7 on).
    fn with_endpoint(extra: &str) -> String {
        format!("{HEAD}\n[[endpoint]]\nname = \"web\"\nupstream = \"127.0.0.1:8080\"\n{extra}")
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("tetherd.toml"), text)
    }

    #[track_caller]
    fn parse_err(text: &str) -> ConfigError {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn kind_accepts_tcp_tls_and_tls_passthrough() {
        for (word, kind) in [
            ("tcp", EndpointKind::Tcp),
            ("tls", EndpointKind::Tls),
            ("tls-passthrough", EndpointKind::TlsPassthrough),
        ] {
            let cfg = parse(&with_endpoint(&format!("kind = \"{word}\"\n"))).unwrap();
            assert_eq!(cfg.endpoints[0].kind, kind, "{word}");
        }
    }

    #[test]
    fn an_unknown_kind_names_file_line_field_and_every_kind() {
        let e = parse_err(&with_endpoint("kind = \"udp\"\n"));
        assert_eq!((e.line, e.field.as_str()), (7, "endpoint[0].kind"), "{e}");
        assert!(
            e.reason.contains("`udp`") && e.reason.contains("tcp, tls or tls-passthrough"),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("tetherd.toml:7: endpoint[0].kind: "),
            "{e}"
        );
    }

    #[test]
    fn proxy_protocol_is_v2_or_absent() {
        let cfg = parse(&with_endpoint("kind = \"tcp\"\nproxy_protocol = \"v2\"\n")).unwrap();
        assert_eq!(cfg.endpoints[0].proxy_protocol, Some(ProxyProtocol::V2));
        let cfg = parse(&with_endpoint("kind = \"tcp\"\n")).unwrap();
        assert_eq!(cfg.endpoints[0].proxy_protocol, None);
    }

    #[test]
    fn any_other_proxy_protocol_names_the_field_and_what_is_accepted() {
        for bad in ["\"v1\"", "\"V2\"", "\"\"", "2", "true"] {
            let e = parse_err(&with_endpoint(&format!(
                "kind = \"tcp\"\nproxy_protocol = {bad}\n"
            )));
            assert_eq!(
                (e.line, e.field.as_str()),
                (8, "endpoint[0].proxy_protocol"),
                "{bad}: {e}"
            );
            if bad.starts_with('"') {
                assert!(e.reason.contains("only \"v2\" is accepted"), "{bad}: {e}");
            }
        }
    }

    /// The endpoint's policy as a TOML value, parsed back from what Bind carries.
    fn policy_value(cfg: &Config) -> toml::Table {
        toml::from_str(cfg.endpoints[0].traffic_policy.as_str()).unwrap()
    }

    #[test]
    fn traffic_policy_is_sent_as_the_same_table_whichever_way_it_is_written() {
        let inline = with_endpoint(
            "kind = \"tcp\"\ntraffic_policy = { on_tcp_connect = [ { name = \"lan\", actions = [ \
             { type = \"restrict-ips\", config = { allow = [\"192.168.1.0/24\", \"::1\"], deny = [], enforce = true } }, \
             { type = \"terminate-tls\", config = { min_version = \"1.3\" } } ] } ] }\n",
        );
        let tables = with_endpoint(
            "kind = \"tcp\"\n\
             [[endpoint.traffic_policy.on_tcp_connect]]\n\
             name = \"lan\"\n\
             [[endpoint.traffic_policy.on_tcp_connect.actions]]\n\
             type = \"restrict-ips\"\n\
             config = { allow = [\"192.168.1.0/24\", \"::1\"], deny = [], enforce = true }\n\
             [[endpoint.traffic_policy.on_tcp_connect.actions]]\n\
             type = \"terminate-tls\"\n\
             [endpoint.traffic_policy.on_tcp_connect.actions.config]\n\
             min_version = \"1.3\"\n",
        );
        let a = parse(&inline).unwrap();
        let b = parse(&tables).unwrap();
        let want: toml::Table = toml::from_str(
            "[[on_tcp_connect]]\nname = \"lan\"\n\
             [[on_tcp_connect.actions]]\ntype = \"restrict-ips\"\n\
             config = { allow = [\"192.168.1.0/24\", \"::1\"], deny = [], enforce = true }\n\
             [[on_tcp_connect.actions]]\ntype = \"terminate-tls\"\nconfig = { min_version = \"1.3\" }\n",
        )
        .unwrap();
        assert_eq!(policy_value(&a), want);
        assert_eq!(policy_value(&b), want);
        // And it is what Bind carries.
        let up = a.endpoints[0].upstream.to_string();
        match a.endpoints[0].bind(&up) {
            Control::Bind { policy, kind, .. } => {
                assert_eq!(policy, a.endpoints[0].traffic_policy.as_str());
                assert_eq!(kind, EndpointKind::Tcp);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_daemon_does_not_judge_what_a_policy_says() {
        // An unknown action is the edge's to refuse (BindErr naming the field).
        let cfg = parse(&with_endpoint(
            "kind = \"tcp\"\ntraffic_policy = { on_tcp_connect = [ { actions = [ { type = \"no-such-action\" } ] } ] }\n",
        ))
        .unwrap();
        assert!(cfg.endpoints[0]
            .traffic_policy
            .as_str()
            .contains("no-such-action"));
    }

    #[test]
    fn an_absent_or_empty_policy_is_sent_as_no_policy() {
        let cfg = parse(&with_endpoint("kind = \"tcp\"\n")).unwrap();
        assert_eq!(cfg.endpoints[0].traffic_policy.as_str(), "");
        let cfg = parse(&with_endpoint("kind = \"tcp\"\ntraffic_policy = {}\n")).unwrap();
        assert_eq!(cfg.endpoints[0].traffic_policy.as_str(), "");
    }

    #[test]
    fn a_policy_that_is_not_a_table_names_the_field() {
        for bad in ["\"allow all\"", "[1, 2]", "true"] {
            let e = parse_err(&with_endpoint(&format!(
                "kind = \"tcp\"\ntraffic_policy = {bad}\n"
            )));
            assert_eq!(
                (e.line, e.field.as_str()),
                (8, "endpoint[0].traffic_policy"),
                "{bad}: {e}"
            );
            assert!(e.reason.contains("must be a table"), "{bad}: {e}");
        }
    }

    /// A policy whose TOML is about `n` bytes: one allow list of addresses.
    fn big_policy(n: usize) -> String {
        let list: Vec<String> = (0..n / 14)
            .map(|i| format!("\"10.{}.{}.0/24\"", i / 256 % 256, i % 256))
            .collect();
        format!(
            "kind = \"tcp\"\ntraffic_policy = {{ on_tcp_connect = [ {{ actions = [ {{ type = \"restrict-ips\", config = {{ allow = [{}] }} }} ] }} ] }}\n",
            list.join(", ")
        )
    }

    #[test]
    fn a_policy_too_large_for_one_control_message_is_refused_at_load_with_its_size() {
        let e = parse_err(&with_endpoint(&big_policy(20_000)));
        assert_eq!(
            (e.line, e.field.as_str()),
            (8, "endpoint[0].traffic_policy"),
            "{e}"
        );
        assert!(
            e.reason.contains("bytes as TOML") && e.reason.contains("16384"),
            "{e}"
        );
        // One that fits is loaded, and its Bind encodes.
        let cfg = parse(&with_endpoint(&big_policy(8_000))).unwrap();
        let ep = &cfg.endpoints[0];
        assert!(ep.traffic_policy.as_str().len() > 4_000);
        let up = ep.upstream.to_string();
        let mut buf = vec![0u8; MAX_CONTROL];
        assert!(ep.bind(&up).encode(&mut buf).is_ok());
    }

    #[test]
    fn the_policy_room_is_exact() {
        let cfg = parse(&with_endpoint("kind = \"tls\"\n")).unwrap();
        let mut ep = cfg.endpoints[0].clone();
        let room = ep.policy_room();
        let up = ep.upstream.to_string();
        let mut buf = vec![0u8; MAX_CONTROL + 64];
        ep.traffic_policy = Policy("x".repeat(room));
        assert!(ep.bind(&up).encode(&mut buf).is_ok(), "room {room} fits");
        ep.traffic_policy = Policy("x".repeat(room + 1));
        assert!(ep.bind(&up).encode(&mut buf).is_err(), "room + 1 does not");
    }

    #[test]
    fn endpoint_still_refuses_unknown_fields() {
        let e = parse_err(&with_endpoint("kind = \"tcp\"\nproxy = \"v2\"\n"));
        assert_eq!(e.field, "endpoint[0].proxy", "{e}");
        assert_eq!(e.line, 8, "{e}");
    }

    #[test]
    fn durations_are_named_in_their_largest_whole_unit() {
        let got: Vec<String> = [
            0, 1, 100, 1000, 1500, 60_000, 600_000, 3_600_000, 86_400_000,
        ]
        .into_iter()
        .map(human_ms)
        .collect();
        assert_eq!(
            got,
            ["0 ms", "1 ms", "100 ms", "1 s", "1500 ms", "1 min", "10 min", "1 h", "24 h"]
        );
    }
}
