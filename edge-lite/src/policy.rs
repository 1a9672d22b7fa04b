//! Traffic policies: the rules a public connection must satisfy before a
//! byte of it reaches a device. Pure: no I/O, no clock, no sockets; every
//! rule is unit-tested here.
//!
//! The shape follows ngrok's Traffic Policy, so that an existing config reads
//! familiar: a policy has `on_tcp_connect` rules, each with an optional
//! `name` and a list of `actions`, each a `type` and a `config`:
//!
//! - `restrict-ips`: `allow` / `deny` lists of CIDRs or single addresses
//!   (IPv4 and IPv6; an IPv4-mapped IPv6 source is matched as IPv4; deny wins
//!   over allow; a non-empty `allow` denies everything else) and `enforce`
//!   (default `true`; `false` is a dry run: a would-be denial is counted,
//!   the connection passes).
//! - `terminate-tls`: `min_version` / `max_version` (`"1.2"`, `"1.3"`; the
//!   edge's floor is 1.3 unless an operator policy lowers it),
//!   `server_certificate` / `server_private_key` (PEM, inline or, in
//!   `edge.toml` only, a file), `mutual_tls_certificate_authorities` (PEM),
//!   `mutual_tls_verification_strategy` (`require-and-verify`, the default
//!   once CAs are given, or `request`), `mutual_tls_allowed_names` (globs
//!   matched against the verified leaf's subject CN and DNS/URI SANs).
//!
//! Policies come in three layers ([`Layer`]): the edge's mandatory policy,
//! the operator's per-endpoint policies (keyed by an exact name or a
//! `*<suffix>` pattern; every matching key applies), and the agent's
//! declared one. [`combine`] makes an endpoint's [`Effective`] policy, the
//! conjunction of all of them: policies only narrow (DESIGN.md, invariant 6).
//!
//! Reading files is the caller's: [`Policy::from_doc`] takes a loader for
//! PEM sources. Building rustls verifiers from a [`TlsPlan`] is `tls`'s.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Deserializer};

// ---------------------------------------------------------------------------
// The TOML shape (serde), as written in edge.toml and sent in `Bind`.

/// A policy as written: `on_tcp_connect` rules.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// Rules run when a public TCP connection arrives, in order.
    #[serde(default)]
    pub on_tcp_connect: Vec<RuleDoc>,
}

/// One rule: a name for logs and its actions.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    /// Free text, for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// What the rule does.
    pub actions: Vec<ActionDoc>,
}

/// One action: its `type` selects the shape of its `config`, which is
/// checked by [`Policy::from_doc`] (so that an error inside it names the
/// field, through `serde_path_to_error`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionDoc {
    /// `restrict-ips` or `terminate-tls`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The action's settings.
    #[serde(default)]
    pub config: toml::Table,
}

/// A checked action's settings.
enum Action {
    RestrictIps(RestrictIpsDoc),
    TerminateTls(TerminateTlsDoc),
}

fn action(doc: &ActionDoc, at: &str) -> Result<Action, PolicyError> {
    fn typed<T: serde::de::DeserializeOwned>(
        config: &toml::Table,
        at: &str,
    ) -> Result<T, PolicyError> {
        let v = toml::Value::Table(config.clone());
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            PolicyError {
                field: if path == "." {
                    format!("{at}.config")
                } else {
                    format!("{at}.config.{path}")
                },
                reason: e.into_inner().message().trim().to_owned(),
            }
        })
    }
    match doc.kind.as_str() {
        "restrict-ips" => typed(&doc.config, at).map(Action::RestrictIps),
        "terminate-tls" => typed(&doc.config, at).map(Action::TerminateTls),
        other => Err(PolicyError {
            field: format!("{at}.type"),
            reason: format!(
                "{other:?} is not an action this edge has on_tcp_connect (\"restrict-ips\" or \"terminate-tls\")"
            ),
        }),
    }
}

/// `restrict-ips`'s config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestrictIpsDoc {
    /// Sources let through; empty = all (those not denied).
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Sources refused; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<Cidr>,
    /// `false`: count would-be denials, let traffic pass.
    #[serde(default = "yes")]
    pub enforce: bool,
}

fn yes() -> bool {
    true
}

/// `terminate-tls`'s config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateTlsDoc {
    /// Lowest TLS version accepted.
    #[serde(default)]
    pub min_version: Option<TlsVersion>,
    /// Highest TLS version accepted.
    #[serde(default)]
    pub max_version: Option<TlsVersion>,
    /// The endpoint's own certificate chain (PEM, or a file in edge.toml).
    #[serde(default)]
    pub server_certificate: Option<String>,
    /// Its private key (PEM, or a file in edge.toml).
    #[serde(default)]
    pub server_private_key: Option<String>,
    /// CA certificates a client certificate must chain to (PEM each).
    #[serde(default)]
    pub mutual_tls_certificate_authorities: Vec<String>,
    /// `require-and-verify` or `request`.
    #[serde(default)]
    pub mutual_tls_verification_strategy: Option<Strategy>,
    /// Globs over the verified leaf's CN and DNS/URI SANs.
    #[serde(default)]
    pub mutual_tls_allowed_names: Vec<String>,
}

/// A TLS protocol version a policy may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2.
    V12,
    /// TLS 1.3.
    V13,
}

impl TlsVersion {
    /// `"1.2"` or `"1.3"`.
    pub const fn name(self) -> &'static str {
        match self {
            TlsVersion::V12 => "1.2",
            TlsVersion::V13 => "1.3",
        }
    }
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TlsVersion, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "1.2" => Ok(TlsVersion::V12),
            "1.3" => Ok(TlsVersion::V13),
            _ => Err(serde::de::Error::custom(format!(
                "{s:?} is not a TLS version this edge speaks (\"1.2\" or \"1.3\")"
            ))),
        }
    }
}

/// How client certificates are asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// A certificate is required and must verify.
    RequireAndVerify,
    /// A certificate is asked for; one presented must verify; none is allowed.
    Request,
}

impl<'de> Deserialize<'de> for Strategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strategy, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "require-and-verify" => Ok(Strategy::RequireAndVerify),
            "request" => Ok(Strategy::Request),
            "require-any" => Err(serde::de::Error::custom(
                "\"require-any\" accepts any certificate without verifying it, which \
                 proves nothing about the client; this edge refuses it (use \
                 \"require-and-verify\" with the client CA, or \"request\")",
            )),
            _ => Err(serde::de::Error::custom(format!(
                "{s:?} is not a verification strategy (\"require-and-verify\" or \"request\")"
            ))),
        }
    }
}

/// A CIDR or a single address (as a /32 or /128), parsed by `ipnet`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        if let Ok(ip) = IpAddr::from_str(s) {
            return Ok(Cidr(IpNet::from(ip)));
        }
        let net = IpNet::from_str(s).map_err(|_| {
            format!("{s:?} is not an address or a CIDR (like 192.0.2.0/24 or 2001:db8::/32)")
        })?;
        if net.trunc() != net {
            return Err(format!(
                "{s:?} has bits set past its prefix length; the network is {}",
                net.trunc()
            ));
        }
        Ok(Cidr(net))
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::from_str(&s).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// The checked model.

/// A checked `restrict-ips`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestrictIps {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    enforce: bool,
}

/// The answer of one or more `restrict-ips` for one source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpVerdict {
    /// An enforcing rule denies the source: close the connection.
    pub denied: bool,
    /// Dry-run rules that would have denied it (counted, not enforced).
    pub would_deny: u32,
}

impl RestrictIps {
    /// A rule from lists (for `[agent]` allow / deny, always enforced).
    pub fn new(allow: &[Cidr], deny: &[Cidr], enforce: bool) -> RestrictIps {
        RestrictIps {
            allow: allow.iter().map(|c| c.0).collect(),
            deny: deny.iter().map(|c| c.0).collect(),
            enforce,
        }
    }

    /// Whether the lists let `ip` through (ignoring `enforce`).
    pub fn permits(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 source is matched as the IPv4 address it maps.
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Whether the rule lets everything through (empty lists).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// Runs every rule of `rules` for `ip`.
pub fn check_ips<'a>(rules: impl IntoIterator<Item = &'a RestrictIps>, ip: IpAddr) -> IpVerdict {
    let mut v = IpVerdict::default();
    for r in rules {
        if !r.permits(ip) {
            if r.enforce {
                v.denied = true;
            } else {
                v.would_deny += 1;
            }
        }
    }
    v
}

/// A certificate chain and its key from a policy.
pub struct ServerCert {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The key.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("certs", &self.certs.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A checked `terminate-tls`.
#[derive(Debug, Default)]
pub struct TerminateTls {
    min: Option<TlsVersion>,
    max: Option<TlsVersion>,
    server: Option<Arc<ServerCert>>,
    cas: Vec<CertificateDer<'static>>,
    strategy: Option<Strategy>,
    names: Vec<NamePattern>,
}

/// A glob over certificate names (`*` any run, `?` one character).
#[derive(Clone, Debug)]
pub struct NamePattern {
    text: String,
    glob: wildmatch::WildMatch,
}

impl NamePattern {
    fn new(text: &str) -> NamePattern {
        NamePattern {
            text: text.to_owned(),
            glob: wildmatch::WildMatch::new(text),
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        self.glob.matches(name)
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One checked policy (one layer).
#[derive(Debug, Default)]
pub struct Policy {
    restrict: Vec<RestrictIps>,
    tls: Option<TerminateTls>,
    /// Where its `terminate-tls` is (`on_tcp_connect[0].actions[1]`).
    tls_at: String,
}

/// A problem in a policy: the field path inside the policy and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Dotted path inside the policy (`on_tcp_connect[0].actions[1].config.max_version`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Where PEM sources may come from.
pub trait PemSource {
    /// The PEM text of `value` (inline PEM, or a file the loader may read),
    /// or why not.
    fn pem(&self, value: &str) -> Result<Vec<u8>, String>;
}

/// Only inline PEM (what an agent may send: it must not make the edge read
/// the edge's files).
pub struct InlineOnly;

impl PemSource for InlineOnly {
    fn pem(&self, value: &str) -> Result<Vec<u8>, String> {
        if is_inline_pem(value) {
            Ok(value.as_bytes().to_vec())
        } else {
            Err(
                "an agent's policy gives PEM inline (-----BEGIN ...), never a path on the edge"
                    .into(),
            )
        }
    }
}

/// Whether `value` is PEM text rather than a file name.
pub fn is_inline_pem(value: &str) -> bool {
    value.trim_start().starts_with("-----BEGIN")
}

impl Policy {
    /// A policy that lets everything through (an absent layer).
    pub fn none() -> Policy {
        Policy::default()
    }

    /// Checks `doc`, reading its PEM sources through `pem`.
    pub fn from_doc(doc: &PolicyDoc, pem: &dyn PemSource) -> Result<Policy, PolicyError> {
        let mut p = Policy::default();
        for (i, rule) in doc.on_tcp_connect.iter().enumerate() {
            if rule.actions.is_empty() {
                return Err(PolicyError {
                    field: format!("on_tcp_connect[{i}].actions"),
                    reason: "a rule needs at least one action".into(),
                });
            }
            for (j, action) in rule.actions.iter().enumerate() {
                let at = format!("on_tcp_connect[{i}].actions[{j}]");
                match self::action(action, &at)? {
                    Action::RestrictIps(r) => {
                        if r.allow.is_empty() && r.deny.is_empty() {
                            return Err(PolicyError {
                                field: format!("{at}.config"),
                                reason: "restrict-ips needs an allow or a deny list".into(),
                            });
                        }
                        p.restrict
                            .push(RestrictIps::new(&r.allow, &r.deny, r.enforce));
                    }
                    Action::TerminateTls(t) => {
                        if p.tls.is_some() {
                            return Err(PolicyError {
                                field: at,
                                reason: format!(
                                    "a policy has one terminate-tls action; it has one at {}",
                                    p.tls_at
                                ),
                            });
                        }
                        p.tls = Some(terminate_tls(&t, &format!("{at}.config"), pem)?);
                        p.tls_at = at;
                    }
                }
            }
        }
        Ok(p)
    }

    /// Its `restrict-ips` rules.
    pub fn restrict_ips(&self) -> &[RestrictIps] {
        &self.restrict
    }

    /// Whether it has a `terminate-tls` action.
    pub fn terminates_tls(&self) -> bool {
        self.tls.is_some()
    }
}

fn terminate_tls(
    t: &TerminateTlsDoc,
    at: &str,
    pem: &dyn PemSource,
) -> Result<TerminateTls, PolicyError> {
    let err = |field: &str, reason: String| PolicyError {
        field: format!("{at}.{field}"),
        reason,
    };
    if let (Some(lo), Some(hi)) = (t.min_version, t.max_version) {
        if hi < lo {
            return Err(err(
                "max_version",
                format!("{} is below min_version {}", hi.name(), lo.name()),
            ));
        }
    }
    let server = match (&t.server_certificate, &t.server_private_key) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(err(
                "server_private_key",
                "server_certificate is given without its key".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                "server_certificate",
                "server_private_key is given without its certificate".into(),
            ))
        }
        (Some(c), Some(k)) => {
            let cert_pem = pem.pem(c).map_err(|r| err("server_certificate", r))?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err("server_certificate", format!("not PEM: {e}")))?;
            if certs.is_empty() {
                return Err(err("server_certificate", "holds no PEM certificate".into()));
            }
            let key_pem = pem.pem(k).map_err(|r| err("server_private_key", r))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| err("server_private_key", format!("not a PEM private key: {e}")))?;
            Some(Arc::new(ServerCert { certs, key }))
        }
    };
    let mut cas = Vec::new();
    for (i, source) in t.mutual_tls_certificate_authorities.iter().enumerate() {
        let field = format!("mutual_tls_certificate_authorities[{i}]");
        let bytes = pem.pem(source).map_err(|r| err(&field, r))?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(&field, format!("not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(err(&field, "holds no PEM certificate".into()));
        }
        for (k, c) in certs.iter().enumerate() {
            rustls::RootCertStore::empty().add(c.clone()).map_err(|e| {
                err(
                    &field,
                    format!("certificate {} is not usable as a CA: {e}", k + 1),
                )
            })?;
        }
        cas.extend(certs);
    }
    let asks_for_client =
        t.mutual_tls_verification_strategy.is_some() || !t.mutual_tls_allowed_names.is_empty();
    if asks_for_client && cas.is_empty() {
        return Err(err(
            "mutual_tls_certificate_authorities",
            "client certificates are asked for, but no CA to verify them against is given".into(),
        ));
    }
    let mut names = Vec::new();
    for (i, n) in t.mutual_tls_allowed_names.iter().enumerate() {
        if n.is_empty() || n.chars().any(char::is_control) {
            return Err(err(
                &format!("mutual_tls_allowed_names[{i}]"),
                format!("{n:?} is not a name pattern"),
            ));
        }
        names.push(NamePattern::new(n));
    }
    Ok(TerminateTls {
        min: t.min_version,
        max: t.max_version,
        server,
        cas,
        strategy: t
            .mutual_tls_verification_strategy
            .or((!t.mutual_tls_certificate_authorities.is_empty())
                .then_some(Strategy::RequireAndVerify)),
        names,
    })
}

// ---------------------------------------------------------------------------
// Layers and their conjunction.

/// Where a policy layer comes from (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layer {
    /// `edge.toml` `[traffic_policy]`.
    Edge,
    /// `edge.toml` `[endpoint_policy."<key>"]`.
    Endpoint(String),
    /// The agent's `traffic_policy`, from `Bind`.
    Agent,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Edge => f.write_str("the edge's traffic_policy"),
            Layer::Endpoint(k) => write!(f, "the edge's endpoint_policy.{k:?}"),
            Layer::Agent => f.write_str("the agent's traffic_policy"),
        }
    }
}

/// The operator's policies: the mandatory one and the per-endpoint ones.
#[derive(Debug, Default)]
pub struct EdgePolicies {
    /// Applies to every endpoint.
    pub mandatory: Arc<Policy>,
    /// Keyed by an exact endpoint name or `*<suffix>`.
    pub endpoints: BTreeMap<String, Arc<Policy>>,
}

/// Whether `key` (an exact name or `*<suffix>`) selects `endpoint`.
pub fn key_matches(key: &str, endpoint: &str) -> bool {
    match key.strip_prefix('*') {
        Some(suffix) => endpoint.len() > suffix.len() && endpoint.ends_with(suffix),
        None => key == endpoint,
    }
}

/// Why `key` cannot select endpoints, if it cannot.
pub fn check_key(key: &str) -> Result<(), String> {
    let body = key.strip_prefix('*').unwrap_or(key);
    if key == "*" {
        return Err(
            "\"*\" would select every endpoint: put that policy in [traffic_policy]".into(),
        );
    }
    let ok = !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !body.contains("..")
        && (key.starts_with('*') || tether_proto::valid_endpoint_name(key));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key:?} is neither an endpoint name nor '*' and the end of one (lowercase \
             letters, digits, '-', '.' between labels), like \"*-cam\" or \"*.site-42\""
        ))
    }
}

impl EdgePolicies {
    /// The operator layers that apply to `endpoint`: the mandatory one, then
    /// every matching per-endpoint key.
    pub fn layers_for(&self, endpoint: &str) -> Vec<(Layer, Arc<Policy>)> {
        let mut v = vec![(Layer::Edge, self.mandatory.clone())];
        for (k, p) in &self.endpoints {
            if key_matches(k, endpoint) {
                v.push((Layer::Endpoint(k.clone()), p.clone()));
            }
        }
        v
    }
}

/// How a bound endpoint carries its bytes, as far as policies care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carriage {
    /// The edge terminates TLS (a `tls` endpoint).
    Terminated,
    /// Raw bytes: a `tcp` endpoint or a `tls-passthrough` one.
    Raw(&'static str),
}

/// What client certificates an endpoint asks for, all layers combined.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    /// A connection without a certificate is refused.
    pub required: bool,
    /// A certificate must verify against every set (one set per layer).
    pub ca_sets: Vec<Vec<CertificateDer<'static>>>,
    /// Every non-empty list must have a pattern matching one of the leaf's names.
    pub name_sets: Vec<Vec<NamePattern>>,
}

impl ClientAuth {
    /// Whether a verified leaf with these names (CN, DNS and URI SANs) passes
    /// every layer's allowed names.
    pub fn names_allowed(&self, names: &[&str]) -> bool {
        self.name_sets
            .iter()
            .all(|set| set.iter().any(|p| names.iter().any(|n| p.matches(n))))
    }
}

/// The TLS an endpoint terminates with, all layers combined.
#[derive(Clone, Debug)]
pub struct TlsPlan {
    /// Lowest version.
    pub min: TlsVersion,
    /// Highest version.
    pub max: TlsVersion,
    /// The certificate to present; `None` = the edge's `[tls]` one.
    pub server: Option<Arc<ServerCert>>,
    /// Client certificates, when any layer asks for them.
    pub client: Option<ClientAuth>,
}

impl TlsPlan {
    /// The plan of a tls endpoint that no policy touches.
    pub fn default_plan() -> TlsPlan {
        TlsPlan {
            min: TlsVersion::V13,
            max: TlsVersion::V13,
            server: None,
            client: None,
        }
    }

    /// Whether the plan is the default one (the shared `[tls]` config serves it).
    pub fn is_default(&self) -> bool {
        self.min == TlsVersion::V13
            && self.max == TlsVersion::V13
            && self.server.is_none()
            && self.client.is_none()
    }
}

/// An endpoint's effective policy, all layers combined.
#[derive(Clone, Debug)]
pub struct Effective {
    /// The `restrict-ips` rules of the per-endpoint and agent layers (the
    /// mandatory layer's run edge-wide, at accept, before this is known).
    pub restrict: Vec<RestrictIps>,
    /// For a terminated endpoint, its TLS.
    pub tls: Option<TlsPlan>,
}

impl Effective {
    /// A one-line summary for the admin API: `restrict-ips 2; tls 1.2-1.3,
    /// own certificate, client certificate required`, or `none`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.restrict.is_empty() {
            parts.push(format!("restrict-ips {}", self.restrict.len()));
        }
        if let Some(t) = &self.tls {
            let mut tls = if t.min == t.max {
                format!("tls {}", t.min.name())
            } else {
                format!("tls {}-{}", t.min.name(), t.max.name())
            };
            if t.server.is_some() {
                tls.push_str(", own certificate");
            }
            if let Some(c) = &t.client {
                tls.push_str(if c.required {
                    ", client certificate required"
                } else {
                    ", client certificate optional"
                });
            }
            parts.push(tls);
        }
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

/// Why layers cannot be combined for an endpoint: the rule (which layer's
/// setting, so that a device operator can tell whether the fault is in
/// their own `traffic_policy` or in the edge's) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `traffic_policy` (the agent's), `edge traffic_policy`,
    /// `edge endpoint_policy."<key>"`, or `edge and agent policies` when the
    /// layers only conflict together.
    pub rule: String,
    /// What conflicts.
    pub message: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.message)
    }
}

impl Layer {
    /// The rule a conflict in this layer alone is reported under.
    fn rule(&self) -> String {
        match self {
            Layer::Edge => "edge traffic_policy".into(),
            Layer::Endpoint(k) => format!("edge endpoint_policy.{k:?}"),
            Layer::Agent => "traffic_policy".into(),
        }
    }
}

/// The conjunction of `layers` (operator layers first, the agent's last)
/// for an endpoint carried as `carriage`.
///
/// - every `restrict-ips` of every layer must pass;
/// - the TLS version range is the intersection: the floor is the highest
///   `min_version` named by any layer, or 1.3 when no operator layer names
///   one (an agent can raise the floor, never lower it); empty is a conflict;
/// - the server certificate is the most specific layer's that names one;
/// - client certificates are asked for if any layer asks, required if any
///   requires, and must verify against every layer's CAs and pass every
///   layer's allowed names;
/// - `terminate-tls` on an endpoint the edge does not terminate is a conflict.
pub fn combine(layers: &[(Layer, &Policy)], carriage: Carriage) -> Result<Effective, Conflict> {
    let mut restrict = Vec::new();
    for (layer, p) in layers {
        if *layer != Layer::Edge {
            restrict.extend(p.restrict.iter().cloned());
        }
    }
    if let Carriage::Raw(kind) = carriage {
        if let Some((layer, p)) = layers.iter().find(|(_, p)| p.terminates_tls()) {
            let fix = if *layer == Layer::Agent {
                "use kind \"tls\", or no terminate-tls in this endpoint's traffic_policy"
            } else {
                "the edge's operator requires TLS terminated at the edge for this endpoint, \
                 so publish it with kind \"tls\""
            };
            return Err(Conflict {
                rule: layer.rule(),
                message: format!(
                    "{layer} has terminate-tls (at {}), but a {kind} endpoint is not \
                     terminated by the edge: {fix}",
                    p.tls_at
                ),
            });
        }
        return Ok(Effective {
            restrict,
            tls: None,
        });
    }
    let operator_min = layers
        .iter()
        .filter(|(l, _)| *l != Layer::Agent)
        .filter_map(|(_, p)| p.tls.as_ref()?.min)
        .max();
    let agent_min = layers
        .iter()
        .filter(|(l, _)| *l == Layer::Agent)
        .filter_map(|(_, p)| p.tls.as_ref()?.min)
        .max();
    let min = match (operator_min, agent_min) {
        (Some(o), a) => a.map_or(o, |a| a.max(o)),
        (None, a) => a.map_or(TlsVersion::V13, |a| a.max(TlsVersion::V13)),
    };
    let max = layers
        .iter()
        .filter_map(|(_, p)| p.tls.as_ref()?.max)
        .min()
        .unwrap_or(TlsVersion::V13);
    if max < min {
        let named: Vec<String> = layers
            .iter()
            .filter_map(|(l, p)| {
                let t = p.tls.as_ref()?;
                Some(format!(
                    "{l}: {}-{}",
                    t.min.map_or("default", TlsVersion::name),
                    t.max.map_or("default", TlsVersion::name)
                ))
            })
            .collect();
        let rule = if layers
            .iter()
            .any(|(l, p)| *l == Layer::Agent && p.tls.is_some())
        {
            "edge and agent policies".to_owned()
        } else {
            "edge policies".to_owned()
        };
        return Err(Conflict {
            rule,
            message: format!(
                "no TLS version is left: the layers allow at least {} and at most {} ({})",
                min.name(),
                max.name(),
                named.join("; ")
            ),
        });
    }
    let server = layers
        .iter()
        .rev()
        .find_map(|(_, p)| p.tls.as_ref()?.server.clone());
    let asking: Vec<&TerminateTls> = layers
        .iter()
        .filter_map(|(_, p)| p.tls.as_ref())
        .filter(|t| t.strategy.is_some())
        .collect();
    let client = (!asking.is_empty()).then(|| ClientAuth {
        required: asking
            .iter()
            .any(|t| t.strategy == Some(Strategy::RequireAndVerify)),
        ca_sets: asking.iter().map(|t| t.cas.clone()).collect(),
        name_sets: asking
            .iter()
            .filter(|t| !t.names.is_empty())
            .map(|t| t.names.clone())
            .collect(),
    });
    Ok(Effective {
        restrict,
        tls: Some(TlsPlan {
            min,
            max,
            server,
            client,
        }),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn doc(src: &str) -> PolicyDoc {
        toml::from_str(src).unwrap()
    }

    fn policy(src: &str) -> Policy {
        Policy::from_doc(&doc(src), &InlineOnly).unwrap()
    }

    fn ips(allow: &[&str], deny: &[&str], enforce: bool) -> RestrictIps {
        let c = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse::<Cidr>().unwrap())
                .collect::<Vec<_>>()
        };
        RestrictIps::new(&c(allow), &c(deny), enforce)
    }

    #[test]
    fn allow_lists_deny_everything_else() {
        let r = ips(&["192.0.2.0/24", "2001:db8::/32"], &[], true);
        assert!(r.permits(ip("192.0.2.9")));
        assert!(r.permits(ip("2001:db8::1")));
        assert!(!r.permits(ip("198.51.100.1")));
        assert!(!r.permits(ip("2001:db9::1")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let r = ips(&["10.0.0.0/8"], &["10.1.0.0/16"], true);
        assert!(r.permits(ip("10.2.0.1")));
        assert!(!r.permits(ip("10.1.2.3")));
        let only_deny = ips(&[], &["127.0.0.2"], true);
        assert!(only_deny.permits(ip("127.0.0.1")));
        assert!(!only_deny.permits(ip("127.0.0.2")));
    }

    #[test]
    fn single_addresses_are_slash_32_and_slash_128() {
        let r = ips(&["127.0.0.1", "::1"], &[], true);
        assert!(r.permits(ip("127.0.0.1")));
        assert!(!r.permits(ip("127.0.0.2")));
        assert!(r.permits(ip("::1")));
        assert!(!r.permits(ip("::2")));
        let r = ips(&["127.0.0.1/32", "::1/128"], &[], true);
        assert!(r.permits(ip("127.0.0.1")) && r.permits(ip("::1")));
        assert!(!r.permits(ip("127.0.0.3")));
    }

    #[test]
    fn ipv4_mapped_sources_match_as_ipv4() {
        let r = ips(&["127.0.0.0/8"], &["127.0.0.2"], true);
        assert!(r.permits(ip("::ffff:127.0.0.1")));
        assert!(!r.permits(ip("::ffff:127.0.0.2")));
        // A v6 rule does not catch a mapped v4 source, and a v4 rule no v6 one.
        let v6 = ips(&["::ffff:0:0/96"], &[], true);
        assert!(!v6.permits(ip("::ffff:127.0.0.1")));
        assert!(!ips(&["0.0.0.0/0"], &[], true).permits(ip("::1")));
    }

    #[test]
    fn dry_runs_count_and_pass() {
        let rules = [
            ips(&[], &["127.0.0.2"], false),
            ips(&["127.0.0.0/8"], &[], true),
        ];
        assert_eq!(
            check_ips(&rules, ip("127.0.0.2")),
            IpVerdict {
                denied: false,
                would_deny: 1
            }
        );
        assert_eq!(check_ips(&rules, ip("127.0.0.1")), IpVerdict::default());
        assert!(check_ips(&rules, ip("10.0.0.1")).denied);
    }

    #[test]
    fn cidrs_are_checked() {
        assert!("10.0.0.300/8"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("not an address or a CIDR"));
        assert!("10.0.0.1/8"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("10.0.0.0/8"));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("".parse::<Cidr>().is_err());
        assert_eq!("::1".parse::<Cidr>().unwrap().0.prefix_len(), 128);
    }

    #[test]
    fn the_toml_shape_is_ngroks() {
        let p = policy(
            r#"
            [[on_tcp_connect]]
            name = "office"
            [[on_tcp_connect.actions]]
            type = "restrict-ips"
            config = { allow = ["192.0.2.0/24"], enforce = false }
            [[on_tcp_connect.actions]]
            type = "terminate-tls"
            config = { min_version = "1.2", max_version = "1.3" }
            "#,
        );
        assert_eq!(p.restrict_ips().len(), 1);
        assert!(!p.restrict_ips()[0].enforce);
        assert!(p.terminates_tls());
    }

    /// The message of a policy that does not load, from the TOML layer or
    /// the action layer.
    fn doc_error(src: &str) -> String {
        match toml::from_str::<PolicyDoc>(src) {
            Err(e) => e.message().to_owned(),
            Ok(d) => Policy::from_doc(&d, &InlineOnly).unwrap_err().to_string(),
        }
    }

    #[test]
    fn unknown_types_fields_and_values_are_errors() {
        let e =
            doc_error("[[on_tcp_connect]]\nactions = [{ type = \"allow-all\", config = {} }]\n");
        assert!(e.contains("allow-all"), "{e}");
        let e = doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"restrict-ips\", config = { alow = [] } }]\n",
        );
        assert!(e.contains("alow"), "{e}");
        let e = doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"restrict-ips\", config = { allow = [\"x\"] } }]\n",
        );
        assert!(e.contains("not an address or a CIDR"), "{e}");
        let e = doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"terminate-tls\", config = { min_version = \"1.1\" } }]\n",
        );
        assert!(e.contains("1.1"), "{e}");
        let e = doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"terminate-tls\", config = { mutual_tls_verification_strategy = \"require-any\" } }]\n",
        );
        assert!(e.contains("without verifying"), "{e}");
        let e = doc_error("[[on_http_request]]\nactions = []\n");
        assert!(e.contains("on_http_request"), "{e}");
        let e = doc_error("[[on_tcp_connect]]\nexpressions = [\"true\"]\nactions = []\n");
        assert!(e.contains("expressions"), "{e}");
    }

    fn from_doc_error(src: &str) -> PolicyError {
        Policy::from_doc(&doc(src), &InlineOnly).unwrap_err()
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let e = from_doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"terminate-tls\", config = { min_version = \"1.3\", max_version = \"1.2\" } }]\n",
        );
        assert_eq!(e.field, "on_tcp_connect[0].actions[0].config.max_version");
        let e = from_doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"restrict-ips\", config = {} }]\n",
        );
        assert_eq!(e.field, "on_tcp_connect[0].actions[0].config");
        let e = from_doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"terminate-tls\", config = { mutual_tls_certificate_authorities = [\"/etc/ssl/ca.pem\"] } }]\n",
        );
        assert_eq!(
            e.field,
            "on_tcp_connect[0].actions[0].config.mutual_tls_certificate_authorities[0]"
        );
        assert!(e.reason.contains("inline"), "{e}");
        let e = from_doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"terminate-tls\", config = { mutual_tls_certificate_authorities = [\"-----BEGIN CERTIFICATE-----\\n-----END CERTIFICATE-----\\n\"] } }]\n",
        );
        assert!(
            e.reason.contains("PEM") || e.reason.contains("certificate"),
            "{e}"
        );
        let e = from_doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"terminate-tls\", config = { mutual_tls_verification_strategy = \"request\" } }]\n",
        );
        assert!(e.reason.contains("no CA"), "{e}");
        let e = from_doc_error(
            "[[on_tcp_connect]]\nactions = [{ type = \"terminate-tls\", config = {} }, { type = \"terminate-tls\", config = {} }]\n",
        );
        assert_eq!(e.field, "on_tcp_connect[0].actions[1]");
        let e = from_doc_error("[[on_tcp_connect]]\nactions = []\n");
        assert_eq!(e.field, "on_tcp_connect[0].actions");
    }

    fn tls(min: Option<TlsVersion>, max: Option<TlsVersion>) -> Policy {
        Policy {
            tls: Some(TerminateTls {
                min,
                max,
                ..TerminateTls::default()
            }),
            tls_at: "on_tcp_connect[0].actions[0]".into(),
            ..Policy::default()
        }
    }

    fn mtls(strategy: Strategy, names: &[&str]) -> Policy {
        Policy {
            tls: Some(TerminateTls {
                cas: vec![CertificateDer::from(vec![1, 2, 3])],
                strategy: Some(strategy),
                names: names.iter().map(|n| NamePattern::new(n)).collect(),
                ..TerminateTls::default()
            }),
            tls_at: "on_tcp_connect[0].actions[0]".into(),
            ..Policy::default()
        }
    }

    use TlsVersion::{V12, V13};

    fn plan(layers: &[(Layer, &Policy)]) -> Result<TlsPlan, Conflict> {
        combine(layers, Carriage::Terminated).map(|e| e.tls.unwrap())
    }

    #[test]
    fn versions_intersect_and_the_floor_is_the_operators() {
        let none = Policy::none();
        let p = plan(&[(Layer::Edge, &none)]).unwrap();
        assert!(p.is_default());
        // The agent cannot lower the default floor.
        let agent12 = tls(Some(V12), None);
        let p = plan(&[(Layer::Edge, &none), (Layer::Agent, &agent12)]).unwrap();
        assert_eq!((p.min, p.max), (V13, V13));
        // An operator can; the agent then may.
        let edge12 = tls(Some(V12), None);
        let p = plan(&[(Layer::Edge, &edge12), (Layer::Agent, &agent12)]).unwrap();
        assert_eq!((p.min, p.max), (V12, V13));
        // An agent can raise it.
        let agent13 = tls(Some(V13), None);
        let p = plan(&[(Layer::Edge, &edge12), (Layer::Agent, &agent13)]).unwrap();
        assert_eq!((p.min, p.max), (V13, V13));
        // 1.3-only at the edge and 1.2-only from the agent: nothing is left.
        let edge13 = tls(Some(V13), Some(V13));
        let agent_only12 = tls(Some(V12), Some(V12));
        let e = plan(&[(Layer::Edge, &edge13), (Layer::Agent, &agent_only12)]).unwrap_err();
        assert!(e.message.contains("no TLS version"), "{e}");
        assert_eq!(e.rule, "edge and agent policies");
    }

    #[test]
    fn client_certificates_are_the_strictest_of_the_layers() {
        let none = Policy::none();
        let edge = mtls(Strategy::RequireAndVerify, &["*.devices.example"]);
        let agent = mtls(Strategy::Request, &["cam-*"]);
        let p = plan(&[(Layer::Edge, &edge), (Layer::Agent, &agent)]).unwrap();
        let c = p.client.unwrap();
        assert!(
            c.required,
            "required by the edge, requested by the agent: required"
        );
        assert_eq!(c.ca_sets.len(), 2, "it must verify against both CA sets");
        assert!(c.names_allowed(&["cam-1", "cam-1.devices.example"]));
        assert!(
            !c.names_allowed(&["cam-1"]),
            "the edge's names must match too"
        );
        assert!(!c.names_allowed(&["x.devices.example"]));
        let p = plan(&[(Layer::Edge, &none), (Layer::Agent, &agent)]).unwrap();
        assert!(!p.client.unwrap().required);
    }

    #[test]
    fn an_agent_that_allows_everything_cannot_loosen_the_edge() {
        let edge = Policy {
            restrict: vec![ips(&[], &["127.0.0.2"], true)],
            ..mtls(Strategy::RequireAndVerify, &[])
        };
        let agent = policy(
            r#"
            [[on_tcp_connect]]
            actions = [{ type = "restrict-ips", config = { allow = ["0.0.0.0/0", "::/0"] } },
                       { type = "terminate-tls", config = { min_version = "1.2" } }]
            "#,
        );
        let eff = combine(
            &[(Layer::Edge, &edge), (Layer::Agent, &agent)],
            Carriage::Terminated,
        )
        .unwrap();
        // The edge-wide rule still runs (at accept), and the agent adds its own.
        let all: Vec<&RestrictIps> = edge.restrict_ips().iter().chain(&eff.restrict).collect();
        assert!(check_ips(all.iter().copied(), ip("127.0.0.2")).denied);
        assert!(!check_ips(all.iter().copied(), ip("127.0.0.1")).denied);
        let t = eff.tls.unwrap();
        assert!(t.client.unwrap().required, "mTLS stays required");
        assert_eq!(
            t.min, V13,
            "the agent's 1.2 does not lower the edge's default floor"
        );
    }

    #[test]
    fn terminate_tls_on_a_raw_endpoint_is_a_conflict() {
        let edge = Policy::none();
        let agent = tls(Some(V13), None);
        let e = combine(
            &[(Layer::Edge, &edge), (Layer::Agent, &agent)],
            Carriage::Raw("tls-passthrough"),
        )
        .unwrap_err();
        assert!(
            e.message.contains("tls-passthrough") && e.message.contains("terminate-tls"),
            "{e}"
        );
        assert_eq!(e.rule, "traffic_policy", "the agent's own layer");
        let edge_tls = tls(None, None);
        let e = combine(&[(Layer::Edge, &edge_tls)], Carriage::Raw("tcp")).unwrap_err();
        assert_eq!(
            e.rule, "edge traffic_policy",
            "the edge's layer, not the agent's field"
        );
        let eff = combine(&[(Layer::Edge, &edge)], Carriage::Raw("tcp")).unwrap();
        assert!(eff.tls.is_none());
    }

    #[test]
    fn endpoint_keys_are_names_or_suffix_patterns() {
        assert!(key_matches("web", "web"));
        assert!(!key_matches("web", "web2"));
        assert!(key_matches("*-cam", "front-cam"));
        assert!(!key_matches("*-cam", "-cam"));
        assert!(!key_matches("*-cam", "camera"));
        assert!(check_key("web").is_ok());
        assert!(check_key("*-cam").is_ok());
        assert!(check_key("*.site-42").is_ok());
        assert!(key_matches("*.site-42", "cam.site-42"));
        assert!(!key_matches("*.site-42", "site-42"));
        assert!(check_key("cam.site-42").is_ok());
        assert!(check_key("*..cam").is_err());
        assert!(check_key("*").is_err());
        assert!(check_key("Web").is_err());
        let mut edge = EdgePolicies::default();
        edge.endpoints
            .insert("*-cam".into(), Arc::new(Policy::none()));
        edge.endpoints
            .insert("front-cam".into(), Arc::new(Policy::none()));
        edge.endpoints
            .insert("web".into(), Arc::new(Policy::none()));
        let layers = edge.layers_for("front-cam");
        assert_eq!(layers.len(), 3, "the mandatory one and both matching keys");
        assert_eq!(edge.layers_for("db").len(), 1);
    }
}
