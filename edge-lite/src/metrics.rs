//! The edge's counters, in one place: refusals by reason, and gauges of what
//! peers hold right now (unfinished handshakes, live sessions, public
//! connections). Every part of the edge counts here instead of logging each
//! event; [`summarise`] writes one log line per interval with what was
//! refused, so a flood of refusals cannot flood the log. A metrics endpoint
//! can publish [`Counters::snapshot`] as it is.
//!
//! Policy denials ([`Denial`]) are counted per endpoint and reason in
//! [`Denials`], summarised the same way.
//!
//! Plain atomics (and one small map for the denials): no I/O except the
//! summary's log line. [`render`] turns a [`Exposition`] (what the admin
//! API gathers from them and from the registry) into the Prometheus /
//! OpenMetrics text of `GET /metrics`, through prometheus-client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why the edge refused or dropped something a peer asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Agent port: the source already holds `pending_per_source` handshakes.
    SourceBusy,
    /// Agent port: `[agent]` allow / deny refuse the source.
    AgentIpDenied,
    /// Agent port: `pending_total` handshakes are unfinished.
    PendingFull,
    /// Agent port: the TLS handshake failed.
    AgentTlsFailed,
    /// Agent port: the TLS handshake or `Hello` missed its deadline.
    AgentTimeout,
    /// Agent port: ALPN `tether/1` was not negotiated.
    NoAlpn,
    /// Agent port: the first frame was not a `CONTROL` carrying `Hello`.
    NotHello,
    /// Agent port: no common protocol version.
    Version,
    /// Agent port: the token does not have a token's form (no store call).
    MalformedToken,
    /// Agent port: unknown token, or a wrong secret.
    UnknownToken,
    /// Agent port: the token is revoked.
    RevokedToken,
    /// Agent port: the store could not answer.
    StoreBusy,
    /// Agent port: the token may not connect from the source address.
    TokenSource,
    /// A session evicted because its token opened one past `sessions_per_token`.
    SessionEvicted,
    /// A bind refused (ACL, ownership, limits, ports).
    Bind,
    /// Public side: `public_connections` are open.
    PublicFull,
    /// Public side: `public_waiting_per_endpoint` wait for a stream.
    PublicWaitingFull,
    /// Public side: no session serves the endpoint (or the SNI names none).
    NoRoute,
    /// Public side: a TLS handshake failed or timed out.
    PublicTlsFailed,
    /// Public side: no stream could be opened in time.
    NoStream,
    /// Public side: an established connection idled past `idle_timeout_ms`.
    Idle,
    /// A session dropped at its linger deadline without a clean close.
    Lingered,
    /// Admin API: `[api]` allow / deny refuse the source.
    ApiSource,
    /// Agent port: a refused credential over a rate limit (its refusal was
    /// delayed).
    RateLimited,
}

impl Refusal {
    /// Every reason, in the order of the summary line.
    pub const ALL: [Refusal; 24] = [
        Refusal::SourceBusy,
        Refusal::AgentIpDenied,
        Refusal::PendingFull,
        Refusal::AgentTlsFailed,
        Refusal::AgentTimeout,
        Refusal::NoAlpn,
        Refusal::NotHello,
        Refusal::Version,
        Refusal::MalformedToken,
        Refusal::UnknownToken,
        Refusal::RevokedToken,
        Refusal::StoreBusy,
        Refusal::TokenSource,
        Refusal::SessionEvicted,
        Refusal::Bind,
        Refusal::PublicFull,
        Refusal::PublicWaitingFull,
        Refusal::NoRoute,
        Refusal::PublicTlsFailed,
        Refusal::NoStream,
        Refusal::Idle,
        Refusal::Lingered,
        Refusal::ApiSource,
        Refusal::RateLimited,
    ];

    /// The name in the summary line and in a snapshot.
    pub const fn name(self) -> &'static str {
        match self {
            Refusal::SourceBusy => "source_busy",
            Refusal::AgentIpDenied => "agent_ip_denied",
            Refusal::PendingFull => "pending_full",
            Refusal::AgentTlsFailed => "agent_tls_failed",
            Refusal::AgentTimeout => "agent_timeout",
            Refusal::NoAlpn => "no_alpn",
            Refusal::NotHello => "not_hello",
            Refusal::Version => "version",
            Refusal::MalformedToken => "malformed_token",
            Refusal::UnknownToken => "unknown_token",
            Refusal::RevokedToken => "revoked_token",
            Refusal::StoreBusy => "store_busy",
            Refusal::TokenSource => "token_source_denied",
            Refusal::SessionEvicted => "session_evicted",
            Refusal::Bind => "bind_refused",
            Refusal::PublicFull => "public_full",
            Refusal::PublicWaitingFull => "public_waiting_full",
            Refusal::NoRoute => "no_route",
            Refusal::PublicTlsFailed => "public_tls_failed",
            Refusal::NoStream => "no_stream",
            Refusal::Idle => "idle_timeout",
            Refusal::Lingered => "lingered",
            Refusal::ApiSource => "api_source_denied",
            Refusal::RateLimited => "rate_limited",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Why a policy stopped a public connection (or would have, in a dry run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Denial {
    /// `restrict-ips` denied the source.
    IpDenied,
    /// A dry-run (`enforce = false`) `restrict-ips` would have denied it.
    IpWouldDeny,
    /// No TLS version in common.
    TlsVersion,
    /// A client certificate is required and none was presented.
    ClientCertMissing,
    /// The client certificate did not verify.
    ClientCertInvalid,
    /// The client certificate verified, but its names are not allowed.
    ClientNameDenied,
    /// The SNI names no bound endpoint of the shared TLS port.
    SniUnknown,
    /// The client did not finish its TLS handshake in time.
    HandshakeTimeout,
    /// The source holds `public_pending_per_source` unfinished handshakes
    /// (or `public_pending_total` are unfinished).
    HandshakeBusy,
}

impl Denial {
    /// The name in the summary line and in a snapshot.
    pub const fn name(self) -> &'static str {
        match self {
            Denial::IpDenied => "ip-denied",
            Denial::IpWouldDeny => "ip-would-deny",
            Denial::TlsVersion => "tls-version",
            Denial::ClientCertMissing => "client-cert-missing",
            Denial::ClientCertInvalid => "client-cert-invalid",
            Denial::ClientNameDenied => "client-name-denied",
            Denial::SniUnknown => "sni-unknown",
            Denial::HandshakeTimeout => "handshake-timeout",
            Denial::HandshakeBusy => "handshake-busy",
        }
    }
}

/// The endpoint a denial is counted under before one is known (at accept
/// on the shared TLS port, or for an SNI that names none).
pub const NO_ENDPOINT: &str = "-";

/// Denials by endpoint and reason, since start. One entry per pair seen;
/// an unknown SNI counts under [`NO_ENDPOINT`], so a flood of made-up
/// names adds no entries.
#[derive(Debug, Default)]
pub struct Denials {
    counts: Mutex<DenialCounts>,
    /// What the last summary covered, and when it was made.
    summarised: Mutex<(DenialCounts, Option<Instant>)>,
}

/// Counts by endpoint and reason.
type DenialCounts = std::collections::BTreeMap<(String, Denial), u64>;

impl Denials {
    /// Counts one denial of `why` for `endpoint`.
    pub fn count(&self, endpoint: &str, why: Denial) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(&(endpoint.to_owned(), why)) {
            Some(n) => *n += 1,
            None => {
                m.insert((endpoint.to_owned(), why), 1);
            }
        }
    }

    /// Denials of `why` for `endpoint` since start.
    pub fn get(&self, endpoint: &str, why: Denial) -> u64 {
        let m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&(endpoint.to_owned(), why)).copied().unwrap_or(0)
    }

    /// Every count since start: `(endpoint, reason, count)`, sorted.
    pub fn snapshot(&self) -> Vec<(String, &'static str, u64)> {
        let m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|((e, d), n)| (e.clone(), d.name(), *n))
            .collect()
    }

    /// `denied by policy in the last 10.0s: web:ip-denied=5000
    /// -:sni-unknown=3`, or `None` when nothing was denied since the last
    /// call. The interval is the time since the last call (since start for
    /// the first).
    pub fn summary_since_last(&self) -> Option<String> {
        self.summary_at(Instant::now())
    }

    fn summary_at(&self, at: Instant) -> Option<String> {
        let now = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut last = self.summarised.lock().unwrap_or_else(|e| e.into_inner());
        let since = last.1.unwrap_or_else(process_start);
        let parts: Vec<String> = now
            .iter()
            .filter_map(|(k, n)| {
                let was = last.0.get(k).copied().unwrap_or(0);
                (*n > was).then(|| format!("{}:{}={}", k.0, k.1.name(), n - was))
            })
            .collect();
        *last = (now, Some(at));
        (!parts.is_empty()).then(|| {
            format!(
                "denied by policy in the last {:.1}s: {}",
                at.saturating_duration_since(since).as_secs_f64(),
                parts.join(" ")
            )
        })
    }
}

/// A gauge: a count of things held right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gauge {
    /// Agent connections between accept and the answer to `Hello`.
    PendingHandshakes,
    /// Sessions after `Welcome`.
    Sessions,
    /// Public connections being served.
    PublicConnections,
}

/// The counters; see the module docs.
#[derive(Debug, Default)]
pub struct Counters {
    refused: [AtomicU64; Refusal::ALL.len()],
    gauges: [AtomicU64; 3],
    /// Streams opened to devices since start.
    streams: AtomicU64,
    /// What the last summary line covered, and when.
    summarised: Mutex<Option<(Snapshot, Instant)>>,
}

/// A copy of every counter at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Refusals since start, by reason (every reason, in [`Refusal::ALL`] order).
    pub refused: Vec<(&'static str, u64)>,
    /// Unfinished agent handshakes.
    pub pending_handshakes: u64,
    /// Live sessions.
    pub sessions: u64,
    /// Public connections.
    pub public_connections: u64,
}

impl Counters {
    /// Counts one refusal.
    pub fn refuse(&self, why: Refusal) {
        self.refused[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one stream opened to a device.
    pub fn stream_opened(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
    }

    /// Streams opened since start.
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed)
    }

    /// Refusals of `why` since start.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why.index()].load(Ordering::Relaxed)
    }

    /// Raises a gauge; the returned guard lowers it again when dropped.
    pub fn hold(self: &Arc<Self>, g: Gauge) -> Held {
        self.gauges[g as usize].fetch_add(1, Ordering::Relaxed);
        Held {
            counters: self.clone(),
            gauge: g,
        }
    }

    /// A gauge's value.
    pub fn gauge(&self, g: Gauge) -> u64 {
        self.gauges[g as usize].load(Ordering::Relaxed)
    }

    /// The summary line of what was refused since the last call (or since
    /// the first call, which returns `None`), with the interval it covers.
    pub fn summary_since_last(&self) -> Option<String> {
        let now = (self.snapshot(), Instant::now());
        let mut last = self.summarised.lock().unwrap_or_else(|e| e.into_inner());
        let line = last
            .as_ref()
            .and_then(|(before, at)| summary(before, &now.0, now.1.duration_since(*at)));
        *last = Some(now);
        line
    }

    /// Every counter now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            refused: Refusal::ALL
                .iter()
                .map(|r| (r.name(), self.refused(*r)))
                .collect(),
            pending_handshakes: self.gauge(Gauge::PendingHandshakes),
            sessions: self.gauge(Gauge::Sessions),
            public_connections: self.gauge(Gauge::PublicConnections),
        }
    }
}

/// A raised gauge (see [`Counters::hold`]).
#[derive(Debug)]
pub struct Held {
    counters: Arc<Counters>,
    gauge: Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counters.gauges[self.gauge as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// When the first of [`uptime_secs`] and the denial summaries asked.
fn process_start() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Whole seconds since the first call (a coarse clock for rate-limiting
/// log lines).
pub fn uptime_secs() -> u64 {
    process_start().elapsed().as_secs()
}

/// The summary line of what changed between two snapshots, or `None` when
/// nothing was refused: `refused in the last 10s: source_busy=420 unknown_token=3`.
pub fn summary(before: &Snapshot, now: &Snapshot, every: Duration) -> Option<String> {
    let mut parts = Vec::new();
    for (i, (name, n)) in now.refused.iter().enumerate() {
        let was = before.refused.get(i).map_or(0, |(_, v)| *v);
        if *n > was {
            parts.push(format!("{name}={}", n - was));
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!(
        "refused in the last {:.1}s: {} (now: {} pending handshakes, {} sessions, {} public connections)",
        every.as_secs_f64(),
        parts.join(" "),
        now.pending_handshakes,
        now.sessions,
        now.public_connections
    ))
}

/// Logs [`Counters::summary_since_last`] every `every`, forever (the server
/// cancels it, and logs the last one itself).
///
/// `on_denials` gets each policy-denial line too (the server records it as
/// one `policy_denied` event: a summary, not an event per connection).
pub async fn summarise(
    counters: Arc<Counters>,
    denials: Arc<Denials>,
    every: Duration,
    on_denials: impl Fn(&str),
) {
    let _ = counters.summary_since_last();
    let _ = denials.summary_since_last();
    loop {
        smol::Timer::after(every).await;
        if let Some(line) = counters.summary_since_last() {
            log::warn!("{line}");
        }
        if let Some(line) = denials.summary_since_last() {
            log::warn!("{line}");
            on_denials(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_and_name() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        let mut names: Vec<_> = Refusal::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Refusal::ALL.len());
    }

    #[test]
    fn the_summary_names_only_what_changed_and_gauges_fall_back() {
        let c = Arc::new(Counters::default());
        let before = c.snapshot();
        assert_eq!(
            summary(&before, &c.snapshot(), Duration::from_secs(10)),
            None
        );
        for _ in 0..420 {
            c.refuse(Refusal::SourceBusy);
        }
        c.refuse(Refusal::UnknownToken);
        let held = c.hold(Gauge::PendingHandshakes);
        let line = summary(&before, &c.snapshot(), Duration::from_secs(10)).expect("a line");
        assert_eq!(
            line,
            "refused in the last 10.0s: source_busy=420 unknown_token=1 \
             (now: 1 pending handshakes, 0 sessions, 0 public connections)"
        );
        drop(held);
        assert_eq!(c.gauge(Gauge::PendingHandshakes), 0);
    }

    #[test]
    fn denials_are_per_endpoint_and_reason_and_summarised_once() {
        let d = Denials::default();
        let t0 = Instant::now();
        assert_eq!(d.summary_at(t0), None);
        for _ in 0..3 {
            d.count("web", Denial::IpDenied);
        }
        d.count(NO_ENDPOINT, Denial::SniUnknown);
        assert_eq!(d.get("web", Denial::IpDenied), 3);
        assert_eq!(d.get("db", Denial::IpDenied), 0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            d.summary_at(t1).as_deref(),
            Some("denied by policy in the last 10.0s: -:sni-unknown=1 web:ip-denied=3")
        );
        assert_eq!(
            d.summary_at(t1 + Duration::from_secs(10)),
            None,
            "only what is new"
        );
        d.count("web", Denial::IpDenied);
        assert_eq!(
            d.summary_at(t1 + Duration::from_millis(20_400)).as_deref(),
            Some("denied by policy in the last 10.4s: web:ip-denied=1"),
            "the interval is the time since the last summary"
        );
        assert_eq!(d.snapshot()[1], ("web".to_owned(), "ip-denied", 4));
    }
}

/// Bytes carried, each way: one per session and one per endpoint binding,
/// added to by the public copy loops (one relaxed add per chunk).
#[derive(Debug, Default)]
pub struct Traffic {
    /// From the public client towards the device.
    pub up: AtomicU64,
    /// From the device towards the public client.
    pub down: AtomicU64,
}

impl Traffic {
    /// (up, down) now.
    pub fn get(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// The counters one public connection adds to: its session's and its
/// endpoint's.
#[derive(Clone, Debug)]
pub struct Meter {
    /// The session's.
    pub session: Arc<Traffic>,
    /// The endpoint binding's.
    pub endpoint: Arc<Traffic>,
}

impl Meter {
    /// `n` bytes went up.
    pub fn up(&self, n: u64) {
        self.session.up.fetch_add(n, Ordering::Relaxed);
        self.endpoint.up.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes came down.
    pub fn down(&self, n: u64) {
        self.session.down.fetch_add(n, Ordering::Relaxed);
        self.endpoint.down.fetch_add(n, Ordering::Relaxed);
    }
}

/// Latency histograms, recorded as things happen (prometheus-client's
/// histograms are shared handles: the scrape registers clones).
#[derive(Clone, Debug)]
pub struct Latencies {
    /// Agent port: TCP accept to `Welcome` sent, in seconds.
    pub handshake: prometheus_client::metrics::histogram::Histogram,
    /// A revocation's commit to `GOAWAY` queued on the token's last live
    /// session (the store poll included), in seconds.
    pub revocation: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Latencies {
    fn default() -> Latencies {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        Latencies {
            // 1 ms .. ~16 s.
            handshake: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 10 ms .. ~20 s.
            revocation: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
        }
    }
}

/// One bound endpoint as `GET /metrics` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointTraffic {
    /// Its name.
    pub name: String,
    /// Bytes towards the device, and back, while bound to its session.
    pub up: u64,
    /// See `up`.
    pub down: u64,
}

/// Everything `GET /metrics` shows, gathered at the scrape.
#[derive(Debug)]
pub struct Exposition<'a> {
    /// The counters.
    pub counters: &'a Counters,
    /// Policy denials by endpoint and reason.
    pub denials: &'a Denials,
    /// The histograms.
    pub latencies: &'a Latencies,
    /// Live sessions (in the registry).
    pub sessions: u64,
    /// Bound endpoints with their traffic.
    pub endpoints: Vec<EndpointTraffic>,
    /// Streams open now, over every session.
    pub open_streams: u64,
    /// Events dropped because their queue was full.
    pub events_dropped: u64,
}

/// The refusals that are failed authentications, with their reason label.
const AUTH_FAILURES: [(Refusal, &str); 4] = [
    (Refusal::MalformedToken, "malformed"),
    (Refusal::UnknownToken, "unknown"),
    (Refusal::RevokedToken, "revoked"),
    (Refusal::TokenSource, "source"),
];

/// The OpenMetrics text (which Prometheus scrapes) of `x`; every metric is
/// prefixed `tether_`.
pub fn render(x: &Exposition<'_>) -> String {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge as PGauge;
    type Labels = Vec<(&'static str, String)>;
    let mut r = prometheus_client::registry::Registry::with_prefix("tether");
    let gauge = |v: u64| {
        let g: PGauge = PGauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    let counter = |v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        c
    };
    r.register("sessions", "Live agent sessions", gauge(x.sessions));
    r.register(
        "endpoints",
        "Bound endpoints",
        gauge(x.endpoints.len() as u64),
    );
    r.register(
        "streams_open",
        "Streams open to devices now",
        gauge(x.open_streams),
    );
    r.register(
        "streams",
        "Streams opened to devices since start",
        counter(x.counters.streams()),
    );
    r.register(
        "pending_handshakes",
        "Agent connections between accept and the answer to Hello",
        gauge(x.counters.gauge(Gauge::PendingHandshakes)),
    );
    r.register(
        "public_connections",
        "Public connections being served",
        gauge(x.counters.gauge(Gauge::PublicConnections)),
    );
    let bytes = Family::<Labels, Counter>::default();
    for e in &x.endpoints {
        for (dir, v) in [("up", e.up), ("down", e.down)] {
            bytes
                .get_or_create(&vec![
                    ("endpoint", e.name.clone()),
                    ("direction", dir.into()),
                ])
                .inc_by(v);
        }
    }
    r.register(
        "endpoint_bytes",
        "Bytes carried per bound endpoint (up: towards the device) since its bind",
        bytes,
    );
    let auth = Family::<Labels, Counter>::default();
    for (why, label) in AUTH_FAILURES {
        auth.get_or_create(&vec![("reason", label.to_owned())])
            .inc_by(x.counters.refused(why));
    }
    r.register("auth_failures", "Refused agent credentials by reason", auth);
    let refused = Family::<Labels, Counter>::default();
    for why in Refusal::ALL {
        refused
            .get_or_create(&vec![("reason", why.name().to_owned())])
            .inc_by(x.counters.refused(why));
    }
    r.register(
        "refusals",
        "Everything the edge refused or dropped, by reason",
        refused,
    );
    let denied = Family::<Labels, Counter>::default();
    for (endpoint, why, n) in x.denials.snapshot() {
        denied
            .get_or_create(&vec![("endpoint", endpoint), ("reason", why.to_owned())])
            .inc_by(n);
    }
    r.register(
        "policy_denials",
        "Public connections denied by traffic policy, by endpoint and reason",
        denied,
    );
    r.register(
        "events_dropped",
        "Events dropped because their queue to the store was full",
        counter(x.events_dropped),
    );
    r.register(
        "handshake_seconds",
        "Agent port: TCP accept to Welcome",
        x.latencies.handshake.clone(),
    );
    r.register(
        "revocation_seconds",
        "A revocation's commit to GOAWAY on the token's last live session",
        x.latencies.revocation.clone(),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}
