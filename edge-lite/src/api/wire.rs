//! The JSON the admin API speaks: one type per schema of `openapi.json`
//! (same names), converted from the store's and the registry's types.
//! Times are Unix seconds (events: milliseconds); ids are shown as the
//! CLI shows them (`tk_…`, `ak_…`).

use serde::{Deserialize, Serialize};

use crate::events::Event as StoredEvent;
use crate::store::{ApiKeyInfo, TokenInfo};

/// `Token`.
#[derive(Serialize)]
pub(crate) struct Token {
    pub(crate) id: String,
    pub(crate) description: String,
    pub(crate) allow: Vec<String>,
    pub(crate) sources: Vec<String>,
    pub(crate) created_at: i64,
    pub(crate) updated_at: Option<i64>,
    pub(crate) last_seen_at: Option<i64>,
    pub(crate) revoked_at: Option<i64>,
    pub(crate) rotation_requested_at: Option<i64>,
    pub(crate) rotated_from: Option<String>,
    pub(crate) pending: bool,
    pub(crate) replaced_by: Option<String>,
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
#[derive(Serialize)]
pub(crate) struct NewToken {
    pub(crate) token: Token,
    pub(crate) secret: String,
}

/// `TokenCreate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenCreate {
    #[serde(default)]
    pub(crate) description: String,
    pub(crate) allow: Vec<String>,
    #[serde(default)]
    pub(crate) sources: Vec<String>,
}

/// `TokenUpdate`: a field left out stays as it is.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenPatch {
    #[serde(default)]
    pub(crate) description: Option<String>,
    #[serde(default)]
    pub(crate) allow: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) sources: Option<Vec<String>>,
}

/// `Session`: a live agent session.
#[derive(Serialize)]
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) token_id: String,
    pub(crate) remote: String,
    pub(crate) agent: String,
    pub(crate) arch: String,
    pub(crate) connected_at: i64,
    pub(crate) endpoints: Vec<String>,
    pub(crate) open_streams: u64,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
}

/// `Endpoint`: an owned or bound endpoint.
#[derive(Serialize)]
pub(crate) struct Endpoint {
    pub(crate) name: String,
    pub(crate) kind: Option<String>,
    pub(crate) owner_token_id: Option<String>,
    pub(crate) claimed_at: Option<i64>,
    pub(crate) bound: bool,
    pub(crate) url: Option<String>,
    pub(crate) session_id: Option<u64>,
    pub(crate) bound_at: Option<i64>,
    pub(crate) policy: Option<String>,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
}

/// `Event`.
#[derive(Serialize)]
pub(crate) struct Event {
    pub(crate) seq: i64,
    pub(crate) at_ms: i64,
    pub(crate) kind: &'static str,
    pub(crate) token_id: Option<String>,
    pub(crate) session_id: Option<u64>,
    pub(crate) remote: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) api_key_id: Option<String>,
    pub(crate) detail: String,
}

impl From<&StoredEvent> for Event {
    fn from(e: &StoredEvent) -> Event {
        let v = &e.event;
        Event {
            seq: e.seq,
            at_ms: e.at_ms,
            kind: v.kind.as_str(),
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
#[derive(Serialize)]
pub(crate) struct ApiKey {
    pub(crate) id: String,
    pub(crate) role: &'static str,
    pub(crate) description: String,
    pub(crate) created_at: i64,
    pub(crate) created_by: Option<String>,
    pub(crate) last_used_at: Option<i64>,
    pub(crate) revoked_at: Option<i64>,
}

impl From<&ApiKeyInfo> for ApiKey {
    fn from(k: &ApiKeyInfo) -> ApiKey {
        ApiKey {
            id: k.id.to_string(),
            role: k.role.as_str(),
            description: k.description.clone(),
            created_at: k.created_at,
            created_by: k.created_by.as_ref().map(|b| b.to_string()),
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// `NewApiKey`: the key and its credential, shown this once.
#[derive(Serialize)]
pub(crate) struct NewApiKey {
    pub(crate) key: ApiKey,
    pub(crate) secret: String,
}

/// `ApiKeyCreate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiKeyCreate {
    pub(crate) role: String,
    #[serde(default)]
    pub(crate) description: String,
}

/// `...Page`: one page of a list, and the cursor of the next (`null`: none).
#[derive(Serialize)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    pub(crate) next_cursor: Option<String>,
}

/// `Health`.
#[derive(Serialize)]
pub(crate) struct Health {
    pub(crate) status: &'static str,
    pub(crate) version: &'static str,
    pub(crate) uptime_secs: u64,
    pub(crate) sessions: u64,
    pub(crate) endpoints: u64,
}

/// `Error`: what went wrong, for people and for programs.
#[derive(Serialize)]
pub(crate) struct Error {
    /// A stable code: `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `conflict`, `payload_too_large`,
    /// `unsupported_media_type`, `timeout`, `internal`.
    pub(crate) error: &'static str,
    pub(crate) message: String,
}
