//! The edge's events: one type ([`Event`]) with a closed set of kinds
//! ([`EventKind`]), what the store keeps (with bounded retention) and the
//! admin API lists. Pure: no I/O, no clock. An event never carries a
//! secret: tokens and API keys appear by id only.

use std::fmt;

use serde::Serialize;

use crate::store::{ApiKeyId, TokenId};

/// What happened. The wire names (`as_str`) are the API's and the store's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// An agent session went live.
    AgentConnected,
    /// An agent session ended (`detail`: why).
    AgentDisconnected,
    /// A `Hello` was refused (`token` when the credential had the form of
    /// one, `detail`: "malformed", "unknown", "revoked", "source").
    AuthFailed,
    /// A `Bind` was accepted.
    BindAccepted,
    /// A `Bind` was refused (`detail`: the rule or reason).
    BindRefused,
    /// Public connections denied by policy (a summary, not one per connection).
    PolicyDenied,
    /// A token was created.
    TokenCreated,
    /// A token's description, rules or sources changed.
    TokenUpdated,
    /// A token was rotated (`detail`: the successor's id).
    TokenRotated,
    /// A token was revoked.
    TokenRevoked,
    /// An API key was created.
    ApiKeyCreated,
    /// An API key was revoked.
    ApiKeyRevoked,
    /// A rate limit refused or delayed something.
    RateLimited,
    /// An endpoint's owner was forgotten (`endpoint`; `token`: the owner it
    /// had), so that the next token allowed to bind it owns it.
    EndpointReleased,
}

impl EventKind {
    /// Every kind, in the order of the documentation.
    pub const ALL: [EventKind; 14] = [
        EventKind::AgentConnected,
        EventKind::AgentDisconnected,
        EventKind::AuthFailed,
        EventKind::BindAccepted,
        EventKind::BindRefused,
        EventKind::PolicyDenied,
        EventKind::TokenCreated,
        EventKind::TokenUpdated,
        EventKind::TokenRotated,
        EventKind::TokenRevoked,
        EventKind::ApiKeyCreated,
        EventKind::ApiKeyRevoked,
        EventKind::RateLimited,
        EventKind::EndpointReleased,
    ];

    /// The kind's name in the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AgentConnected => "agent_connected",
            EventKind::AgentDisconnected => "agent_disconnected",
            EventKind::AuthFailed => "auth_failed",
            EventKind::BindAccepted => "bind_accepted",
            EventKind::BindRefused => "bind_refused",
            EventKind::PolicyDenied => "policy_denied",
            EventKind::TokenCreated => "token_created",
            EventKind::TokenUpdated => "token_updated",
            EventKind::TokenRotated => "token_rotated",
            EventKind::TokenRevoked => "token_revoked",
            EventKind::ApiKeyCreated => "apikey_created",
            EventKind::ApiKeyRevoked => "apikey_revoked",
            EventKind::RateLimited => "rate_limited",
            EventKind::EndpointReleased => "endpoint_released",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// An event to record: what, and whom it concerns. The store adds the
/// sequence number and the time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// What happened.
    pub kind: EventKind,
    /// The token concerned.
    pub token: Option<TokenId>,
    /// The agent session concerned.
    pub session: Option<u64>,
    /// The peer's address (`ip:port`).
    pub remote: Option<String>,
    /// The endpoint concerned.
    pub endpoint: Option<String>,
    /// The API key that made the change (`None`: the edge itself, or the
    /// offline CLI).
    pub api_key: Option<ApiKeyId>,
    /// Free text: the reason, the rule, the count.
    pub detail: String,
}

impl NewEvent {
    /// An event of `kind` concerning nothing yet.
    pub fn new(kind: EventKind) -> NewEvent {
        NewEvent {
            kind,
            token: None,
            session: None,
            remote: None,
            endpoint: None,
            api_key: None,
            detail: String::new(),
        }
    }

    /// ... concerning `token`.
    pub fn token(mut self, t: &TokenId) -> NewEvent {
        self.token = Some(t.clone());
        self
    }

    /// ... made by the API key `k` (if any).
    pub fn by(mut self, k: Option<&ApiKeyId>) -> NewEvent {
        self.api_key = k.cloned();
        self
    }

    /// ... with this detail.
    pub fn detail(mut self, d: impl Into<String>) -> NewEvent {
        self.detail = d.into();
        self
    }

    /// ... concerning session `no` from `remote`.
    pub fn session(mut self, no: u64, remote: std::net::SocketAddr) -> NewEvent {
        self.session = Some(no);
        self.remote = Some(remote.to_string());
        self
    }

    /// ... concerning `endpoint`.
    pub fn endpoint(mut self, e: &str) -> NewEvent {
        self.endpoint = Some(e.to_owned());
        self
    }
}

/// A recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Its sequence number: increasing, the API's cursor.
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The rest.
    pub event: NewEvent,
}

/// Which events to list: every filter that is set must match; newest first
/// from `before` (exclusive; `None`: from the newest), or, with `after`,
/// oldest first from after that sequence number (exclusive).
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Only this kind.
    pub kind: Option<EventKind>,
    /// Only events concerning this token.
    pub token: Option<TokenId>,
    /// Only events at or after this time (unix milliseconds).
    pub since_ms: Option<i64>,
    /// Only events older than this sequence number (the cursor).
    pub before: Option<i64>,
    /// Only events newer than this sequence number, oldest first (what the
    /// JSON-lines writer follows).
    pub after: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// How long and how many events the store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// At most this many events.
    pub max_events: u64,
    /// None older than this (seconds).
    pub max_age_secs: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            max_events: 100_000,
            max_age_secs: 30 * 24 * 3600,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert!(seen.insert(k.as_str()), "{k} twice");
        }
        assert_eq!(EventKind::parse("token_deleted"), None);
    }
}
