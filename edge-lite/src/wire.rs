//! The JSON the admin API speaks: one type per schema of `openapi.json`
//! (same names), converted from the store's and the registry's types. The
//! API serializes them; the CLI reads them back (as a client of the API) or
//! makes them from the store (offline), so that both modes print the same
//! tables and the same `--output json`. Times are Unix seconds (events:
//! milliseconds); ids are shown as the CLI shows them (`tk_…`, `ak_…`).
//!
//! Each field is described once, in `openapi.json` (the schema of the same
//! name), which is the reference that clients read; it is not repeated here.
#![allow(missing_docs)]

use serde::{Deserialize, Serialize};

use crate::events::Event as StoredEvent;
use crate::store::{ApiKeyInfo, EndpointInfo, TokenInfo};

/// `Token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub description: String,
    pub allow: Vec<String>,
    pub sources: Vec<String>,
    pub created_at: i64,
    pub updated_at: Option<i64>,
    pub last_seen_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub rotation_requested_at: Option<i64>,
    pub rotated_from: Option<String>,
    pub pending: bool,
    pub replaced_by: Option<String>,
}

impl From<&TokenInfo> for Token {
    fn from(t: &TokenInfo) -> Token {
        Token {
            id: t.id.to_string(),
            description: t.description.clone(),
            allow: t.scope.rules.iter().map(|r| r.to_string()).collect(),
            sources: t.scope.sources.iter().map(|n| n.to_string()).collect(),
            created_at: t.created_at,
            updated_at: t.updated_at,
            last_seen_at: t.last_seen_at,
            revoked_at: t.revoked_at,
            rotation_requested_at: t.rotation_requested_at,
            rotated_from: t.rotated_from.as_ref().map(|i| i.to_string()),
            pending: t.pending,
            replaced_by: t.replaced_by.as_ref().map(|i| i.to_string()),
        }
    }
}

/// `NewToken`: the token and its credential, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    pub token: Token,
    pub secret: String,
}

/// `TokenCreate`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    #[serde(default)]
    pub description: String,
    pub allow: Vec<String>,
    #[serde(default)]
    pub sources: Vec<String>,
}

/// `TokenUpdate`: a field left out stays as it is.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
}

/// `Session`: a live agent session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub id: u64,
    pub token_id: String,
    pub remote: String,
    pub agent: String,
    pub arch: String,
    pub connected_at: i64,
    pub endpoints: Vec<String>,
    pub open_streams: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// `Endpoint`: an owned or bound endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub name: String,
    pub kind: Option<String>,
    pub owner_token_id: Option<String>,
    pub claimed_at: Option<i64>,
    pub bound: bool,
    pub url: Option<String>,
    pub session_id: Option<u64>,
    pub bound_at: Option<i64>,
    pub policy: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Endpoint {
    /// An endpoint as far as the store knows it: its owner, not bound (a
    /// running edge fills in its binding).
    pub fn unbound(name: String) -> Endpoint {
        Endpoint {
            name,
            kind: None,
            owner_token_id: None,
            claimed_at: None,
            bound: false,
            url: None,
            session_id: None,
            bound_at: None,
            policy: None,
            bytes_up: 0,
            bytes_down: 0,
        }
    }
}

impl From<EndpointInfo> for Endpoint {
    fn from(e: EndpointInfo) -> Endpoint {
        Endpoint {
            kind: (!e.kind.is_empty()).then_some(e.kind),
            owner_token_id: Some(e.owner.to_string()),
            claimed_at: Some(e.claimed_at),
            ..Endpoint::unbound(e.name)
        }
    }
}

/// `EndpointRelease`: the endpoint whose owner was forgotten, and that
/// owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointRelease {
    pub name: String,
    pub released_from: String,
}

/// `Event`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    pub at_ms: i64,
    pub kind: String,
    pub token_id: Option<String>,
    pub session_id: Option<u64>,
    pub remote: Option<String>,
    pub endpoint: Option<String>,
    pub api_key_id: Option<String>,
    pub detail: String,
}

impl From<&StoredEvent> for Event {
    fn from(e: &StoredEvent) -> Event {
        let v = &e.event;
        Event {
            seq: e.seq,
            at_ms: e.at_ms,
            kind: v.kind.as_str().to_owned(),
            token_id: v.token.as_ref().map(|t| t.to_string()),
            session_id: v.session,
            remote: v.remote.clone(),
            endpoint: v.endpoint.clone(),
            api_key_id: v.api_key.as_ref().map(|k| k.to_string()),
            detail: v.detail.clone(),
        }
    }
}

/// `ApiKey`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub role: String,
    pub description: String,
    pub created_at: i64,
    pub created_by: Option<String>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl From<&ApiKeyInfo> for ApiKey {
    fn from(k: &ApiKeyInfo) -> ApiKey {
        ApiKey {
            id: k.id.to_string(),
            role: k.role.as_str().to_owned(),
            description: k.description.clone(),
            created_at: k.created_at,
            created_by: k.created_by.as_ref().map(|b| b.to_string()),
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// `NewApiKey`: the key and its credential, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewApiKey {
    pub key: ApiKey,
    pub secret: String,
}

/// `ApiKeyCreate`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCreate {
    pub role: String,
    #[serde(default)]
    pub description: String,
}

/// `...Page`: one page of a list, and the cursor of the next (`null`: none).
#[derive(Debug, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// `Health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub uptime_secs: u64,
    pub sessions: u64,
    pub endpoints: u64,
}

/// `Error`: what went wrong, for people and for programs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Error {
    /// A stable code: `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `conflict`, `payload_too_large`,
    /// `unsupported_media_type`, `timeout`, `internal`.
    pub error: String,
    pub message: String,
}
