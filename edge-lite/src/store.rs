//! The store: the one owner of what the edge keeps on disk. [`Store`] is the
//! interface the rest of the edge uses; [`SqliteStore`] implements it on
//! `<state_dir>/tokens.db`, the embedded default. A PostgreSQL store (several
//! edges sharing one database) implements the same trait: every decision
//! that two edges must agree on is one atomic statement
//! ([`Store::claim_endpoint`]), and [`Store::changes_since`] reads a
//! monotonic revision, not anything local to one process.
//!
//! For each token the store holds its public id, a random salt,
//! `SHA-256(salt || secret)`, its description, its [`Scope`] (bind rules and
//! source CIDRs), its timestamps and its revision. Secrets are never stored:
//! a token is shown once, at [`Store::create`], and checked afterwards by
//! hashing what the agent presents and comparing in constant time.
//!
//! A token is `tk_<id>.<secret>`: `<id>` is 12 lowercase hex characters
//! (public: logs and events name tokens by it), `<secret>` is 32 random bytes
//! in base64url without padding. The hash covers the 32 decoded bytes.
//!
//! The schema is versioned (`PRAGMA user_version`) and migrated forward in
//! one transaction when the store is opened ([`MIGRATIONS`]); a database
//! from a newer tether-edge is refused, not used. Version 1 is the schema
//! the edge had before versions (a database it made opens as version 0 with
//! those tables); version 2 turned the allow lists into scopes in place;
//! version 3 added the admin API's keys and the events; version 4 the
//! rotation columns.
//!
//! Rotation ([`Store::request_rotation`], DESIGN.md invariant 5): an
//! operator marks a token for rotation; the edge mints a successor
//! ([`Store::mint_successor`]: same scope, `rotated_from` naming the token)
//! when it offers one to a live session of the token; both are valid until
//! the device authenticates with a successor ([`Store::complete_rotation`],
//! called at that `Hello`), which then takes the predecessor's scope and
//! description while the predecessor is revoked with `replaced_by` set,
//! and so are the other successors offered meanwhile. At most
//! [`MAX_PENDING_SUCCESSORS`] are minted per rotation.
//!
//! API keys (`ak_<id>.<secret>`, the same form as tokens) are kept the same
//! way: a salted hash, compared in constant time, with a [`Role`]. Events
//! ([`crate::events`]) are kept with a bounded retention
//! ([`Store::prune_events`]).
//!
//! This module is synchronous; the server calls it from the blocking pool.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use subtle::ConstantTimeEq;

use crate::events::{Event, EventKind, EventQuery, NewEvent, Retention};
use crate::scope::{parse_sources, Rules, Scope};

/// Length of a token id in hex characters.
pub const ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
const SALT_LEN: usize = 16;
/// The file name of the store inside `state_dir`.
pub const DB_FILE: &str = "tokens.db";

/// Successors minted for one rotation before it completes, at most: each
/// offer to a new session of the token mints one (the secret is never
/// stored, so an offer cannot be repeated), and a device that cannot store
/// them must not make the edge mint without end.
pub const MAX_PENDING_SUCCESSORS: usize = 4;

/// A token's public id: 12 lowercase hex characters (the `<id>` in
/// `tk_<id>.<secret>`), stored as such and shown as `tk_<id>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId(String);

impl TokenId {
    /// Checks the form of an id (the 12 hex characters, without `tk_`).
    pub fn parse(s: &str) -> Option<TokenId> {
        (s.len() == ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| TokenId(s.to_owned()))
    }

    /// The 12 hex characters, as stored (without `tk_`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Shown as `tk_<id>`: the part of the credential before the `.`, which is
/// how the daemon and operators name a token.
impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tk_{}", self.0)
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId(tk_{})", self.0)
    }
}

/// A whole credential string (`tk_<id>.<secret>`); its `Debug` and `Display`
/// show the id only.
#[derive(Clone)]
pub struct TokenString(String);

impl TokenString {
    /// Wraps a credential an agent presented, to pass it on without showing it.
    pub fn presented(token: &str) -> TokenString {
        TokenString(token.to_owned())
    }

    /// The credential itself, to hand to the operator once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.0.get(3..3 + ID_LEN).unwrap_or("?");
        write!(f, "TokenString(tk_{id}.<redacted>)")
    }
}

/// A presented credential split into its id and decoded secret.
struct Presented {
    id: TokenId,
    secret: [u8; SECRET_LEN],
}

impl fmt::Debug for Presented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presented")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The public id of a credential string that has the right form (for logs:
/// `None` means "malformed").
pub fn token_id_of(token: &str) -> Option<TokenId> {
    parse_token(token).map(|p| p.id)
}

fn parse_token(token: &str) -> Option<Presented> {
    parse_credential("tk_", token)
}

/// `<prefix><id>.<secret>` split and decoded.
fn parse_credential(prefix: &str, token: &str) -> Option<Presented> {
    let rest = token.strip_prefix(prefix)?;
    let (id, secret_b64) = rest.split_once('.')?;
    let id = TokenId::parse(id)?;
    if secret_b64.len() != 43 {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(secret_b64).ok()?;
    let secret: [u8; SECRET_LEN] = bytes.try_into().ok()?;
    Some(Presented { id, secret })
}

fn hash(salt: &[u8], secret: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(salt);
    ctx.update(secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Proof that a presented credential matched an active token. Only a
/// [`Store`]'s `verify` creates it.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    id: TokenId,
    scope: Scope,
    completes: Option<TokenId>,
    rotation_requested: bool,
}

impl VerifiedToken {
    /// The token's id.
    pub fn id(&self) -> &TokenId {
        &self.id
    }

    /// Its scope when it was verified (the server keeps the live one).
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// When it is a successor whose predecessor is still active: that
    /// predecessor, which this `Hello` retires ([`Store::complete_rotation`]).
    pub fn completes(&self) -> Option<&TokenId> {
        self.completes.as_ref()
    }

    /// Whether an operator asked for it to be rotated.
    pub fn rotation_requested(&self) -> bool {
        self.rotation_requested
    }
}

/// A token as listed (no secret, no hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Public id.
    pub id: TokenId,
    /// Operator's description.
    pub description: String,
    /// Bind rules and source addresses.
    pub scope: Scope,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last change of its description or scope.
    pub updated_at: Option<i64>,
    /// Unix seconds of the last accepted handshake.
    pub last_seen_at: Option<i64>,
    /// Unix seconds of the revocation.
    pub revoked_at: Option<i64>,
    /// Unix seconds of an operator's rotation request, while it is pending.
    pub rotation_requested_at: Option<i64>,
    /// The token it succeeds, when a rotation minted it.
    pub rotated_from: Option<TokenId>,
    /// Whether it is a successor whose predecessor is still active (valid
    /// beside it until the device authenticates with one of them).
    pub pending: bool,
    /// The successor that retired it, when a rotation did.
    pub replaced_by: Option<TokenId>,
}

/// A change to a token's description or scope; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct TokenUpdate {
    /// A new description.
    pub description: Option<String>,
    /// New bind rules (replacing the old ones).
    pub rules: Option<Rules>,
    /// New source addresses (replacing the old ones; empty: any).
    pub sources: Option<Vec<ipnet::IpNet>>,
}

/// The outcome of [`Store::update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Updated {
    /// Changed; the token as it is now.
    Now(Box<TokenInfo>),
    /// A revoked token is not changed any more.
    Revoked,
    /// No such token.
    Unknown,
}

/// A token whose scope or revocation changed after some revision, as
/// [`Store::changes_since`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenChange {
    /// The token.
    pub id: TokenId,
    /// Its scope now.
    pub scope: Scope,
    /// Whether it is revoked now.
    pub revoked: bool,
    /// Unix milliseconds of the change (0: before schema version 3).
    pub changed_ms: i64,
    /// An operator asked for it to be rotated, and it is not yet.
    pub rotation_requested: bool,
    /// A rotation retired it (it is revoked too): its sessions are drained,
    /// not cut, while the device moves to this successor.
    pub replaced_by: Option<TokenId>,
}

/// The outcome of [`Store::request_rotation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotationRequest {
    /// Requested now; the token as it is now.
    Requested(Box<TokenInfo>),
    /// A rotation was requested before and is not done: it stands.
    AlreadyPending(Box<TokenInfo>),
    /// It is revoked.
    Revoked,
    /// It is a pending successor of this token: rotate that one.
    PendingSuccessor(TokenId),
    /// No such token.
    Unknown,
}

/// The outcome of [`Store::mint_successor`].
#[derive(Debug)]
pub enum Successor {
    /// A successor to offer, shown once (to the device, never the log).
    Minted(NewToken),
    /// No rotation of the token is pending (done, or the token revoked).
    NotRequested,
    /// [`MAX_PENDING_SUCCESSORS`] were minted and none was used.
    Stalled,
}

/// A rotation that [`Store::complete_rotation`] finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retired {
    /// The predecessor, revoked now.
    pub old: TokenId,
    /// The successor the device authenticated with.
    pub new: TokenId,
    /// The API key that asked for the rotation (None: the offline CLI).
    pub requested_by: Option<ApiKeyId>,
    /// Unix milliseconds of the request.
    pub requested_ms: i64,
    /// The other successors offered meanwhile, revoked now.
    pub abandoned: Vec<TokenId>,
}

/// A token just created: show [`NewToken::token`] once, then forget it.
#[derive(Debug)]
pub struct NewToken {
    /// The public id.
    pub id: TokenId,
    /// The credential.
    pub token: TokenString,
}

/// An API key's public id: 12 lowercase hex characters, shown as `ak_<id>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiKeyId(String);

impl ApiKeyId {
    /// Checks the form of an id (`ak_<id>` or `<id>`).
    pub fn parse(s: &str) -> Option<ApiKeyId> {
        TokenId::parse(s.strip_prefix("ak_").unwrap_or(s)).map(|t| ApiKeyId(t.0))
    }

    /// The 12 hex characters, as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ak_{}", self.0)
    }
}

impl fmt::Debug for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyId(ak_{})", self.0)
    }
}

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Every `GET`.
    Read,
    /// Everything.
    Admin,
}

impl Role {
    /// `read` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    /// The role named `s`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An API key as listed (no secret, no hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyInfo {
    /// Public id.
    pub id: ApiKeyId,
    /// What it may do.
    pub role: Role,
    /// Operator's description.
    pub description: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The key that created it (`None`: the offline CLI).
    pub created_by: Option<ApiKeyId>,
    /// Unix seconds of its last accepted use.
    pub last_used_at: Option<i64>,
    /// Unix seconds of the revocation.
    pub revoked_at: Option<i64>,
}

/// An API key just created: show [`NewApiKey::key`] once, then forget it.
#[derive(Debug)]
pub struct NewApiKey {
    /// The public id.
    pub id: ApiKeyId,
    /// The credential (`ak_<id>.<secret>`).
    pub key: TokenString,
}

/// Proof that a presented API key matched an active key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedKey {
    /// The key's id.
    pub id: ApiKeyId,
    /// Its role.
    pub role: Role,
}

/// A store failure.
#[derive(Debug)]
pub enum StoreError {
    /// The state directory could not be created.
    StateDir(PathBuf, std::io::Error),
    /// SQLite failed.
    Db(rusqlite::Error),
    /// The system random generator failed.
    Random,
    /// The database was made by a newer tether-edge.
    NewerSchema {
        /// Its version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A stored value does not parse (a row the edge did not write).
    Corrupt {
        /// The token or row.
        row: String,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::StateDir(p, e) => write!(f, "state {}: {e}", p.display()),
            StoreError::Db(e) => write!(f, "token store: {e}"),
            StoreError::Random => f.write_str("system random generator failed"),
            StoreError::NewerSchema { found, known } => write!(
                f,
                "token store: schema version {found} is newer than this tether-edge knows \
                 ({known}): run the tether-edge that wrote it, or a newer one"
            ),
            StoreError::Corrupt { row, reason } => {
                write!(f, "token store: {row}: {reason}")
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Db(e)
    }
}

/// Why a presented credential was refused.
#[derive(Debug)]
pub enum AuthError {
    /// It is not of the form `tk_<id>.<secret>`.
    Malformed,
    /// No token has that id, or the secret does not match.
    Unknown(TokenId),
    /// The token was revoked.
    Revoked(TokenId),
    /// The store could not answer.
    Store(StoreError),
}

/// The outcome of [`Store::revoke`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// Revoked now.
    Now,
    /// It already was.
    Already,
    /// No such token.
    Unknown,
}

/// Who owns an endpoint, as [`Store::claim_endpoint`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The token owns it (just now, or from before).
    Owner,
    /// Another token owns it.
    OwnedBy(TokenId),
}

/// An endpoint's owner as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The endpoint name.
    pub name: String,
    /// The token that first bound it.
    pub owner: TokenId,
    /// The kind (`tcp` or `tls`) its owner last bound it as.
    pub kind: String,
    /// Unix seconds of that first bind.
    pub claimed_at: i64,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Accepts `tk_<id>` or `<id>` as a token's name.
fn bare_id(id: &str) -> &str {
    id.strip_prefix("tk_").unwrap_or(id)
}

/// What the edge keeps: tokens (as salted hashes) with their scopes, and
/// endpoint owners. Every method is synchronous and may block (the server
/// calls them on the blocking pool, one at a time); every mutation is
/// atomic: it happens whole or not at all.
pub trait Store: Send {
    /// Creates a token; the returned credential is shown once and never stored.
    fn create(&self, description: &str, scope: &Scope) -> Result<NewToken, StoreError>;

    /// Creates one token per `(description, scope)`, all or none; the
    /// credentials are in the order of `specs`.
    fn create_many(&self, specs: &[(String, Scope)]) -> Result<Vec<NewToken>, StoreError>;

    /// Every token, oldest first.
    fn list(&self) -> Result<Vec<TokenInfo>, StoreError>;

    /// One token (`tk_<id>` or `<id>`).
    fn get(&self, id: &str) -> Result<Option<TokenInfo>, StoreError>;

    /// Changes a token's description or scope; a running edge applies a
    /// new scope to the token's live sessions ([`Store::changes_since`]).
    fn update(&self, id: &str, change: &TokenUpdate) -> Result<Updated, StoreError>;

    /// Marks a token revoked, with the successors a pending rotation of
    /// it minted.
    fn revoke(&self, id: &str) -> Result<Revoked, StoreError>;

    /// Asks for a token to be rotated (`by`: the API key, None offline);
    /// the edge offers a successor to its live sessions and to the next
    /// one. Asking again while one is pending changes nothing.
    fn request_rotation(
        &self,
        id: &str,
        by: Option<&ApiKeyId>,
    ) -> Result<RotationRequest, StoreError>;

    /// Mints a successor of `id` for an offer: same description and scope,
    /// valid beside `id` from now on. Only while a rotation of `id` is
    /// requested, and at most [`MAX_PENDING_SUCCESSORS`] times per request.
    fn mint_successor(&self, id: &TokenId) -> Result<Successor, StoreError>;

    /// The device authenticated with `successor`: if its predecessor is
    /// still active, retires it (revoked, `replaced_by` = `successor`),
    /// gives `successor` the predecessor's description and scope as they
    /// are now and its endpoints, and revokes the other successors minted
    /// for it. `None` when there was nothing to complete.
    fn complete_rotation(&self, successor: &TokenId) -> Result<Option<Retired>, StoreError>;

    /// Checks a presented credential; on success records `last_seen_at`.
    fn verify(&self, presented: &str) -> Result<VerifiedToken, AuthError>;

    /// The tokens whose scope or revocation changed at a revision after
    /// `rev`, and the newest revision (pass it next time). `rev = 0` at
    /// start would list every token: call [`Store::revision`] first.
    fn changes_since(&self, rev: i64) -> Result<(i64, Vec<TokenChange>), StoreError>;

    /// The newest revision.
    fn revision(&self) -> Result<i64, StoreError>;

    /// Makes `token` the owner of `endpoint` unless another token owns it
    /// already (the first token to bind an endpoint owns it until an
    /// operator releases it), atomically, so two edges sharing a database
    /// agree. `kind` (`tcp` or `tls`) is recorded when the token owns it.
    fn claim_endpoint(
        &self,
        endpoint: &str,
        token: &TokenId,
        kind: &str,
    ) -> Result<Claim, StoreError>;

    /// Every owned endpoint, by name.
    fn list_endpoints(&self) -> Result<Vec<EndpointInfo>, StoreError>;

    /// Every endpoint's owner, by name.
    fn endpoint_owners(&self) -> Result<HashMap<String, TokenId>, StoreError> {
        Ok(self
            .list_endpoints()?
            .into_iter()
            .map(|e| (e.name, e.owner))
            .collect())
    }

    /// Forgets `endpoint`'s owner, so that the next token allowed to bind it
    /// owns it. Returns the owner it had, if any.
    fn release_endpoint(&self, endpoint: &str) -> Result<Option<TokenId>, StoreError>;

    /// A value that changes when another writer commits (endpoint owners
    /// released by the CLI, say): the server reloads what it caches then.
    fn data_version(&self) -> Result<i64, StoreError>;

    /// The ids of every revoked token.
    fn revoked_ids(&self) -> Result<HashSet<TokenId>, StoreError>;

    /// At most `limit` tokens with ids after `after`, by id (a cursor that
    /// stays valid while tokens are created).
    fn tokens_page(
        &self,
        after: Option<&TokenId>,
        limit: usize,
    ) -> Result<Vec<TokenInfo>, StoreError>;

    /// Creates an API key with `role`; the returned credential is shown once.
    fn create_api_key(
        &self,
        role: Role,
        description: &str,
        by: Option<&ApiKeyId>,
    ) -> Result<NewApiKey, StoreError>;

    /// Every API key, oldest first.
    fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError>;

    /// Marks an API key revoked.
    fn revoke_api_key(&self, id: &ApiKeyId) -> Result<Revoked, StoreError>;

    /// Checks a presented API key; on success records `last_used_at`.
    fn verify_api_key(&self, presented: &str) -> Result<VerifiedKey, AuthError>;

    /// Records an event and returns its sequence number.
    fn record(&self, event: &NewEvent) -> Result<i64, StoreError>;

    /// The events `q` selects, newest first.
    fn events(&self, q: &EventQuery) -> Result<Vec<Event>, StoreError>;

    /// Deletes the events that `keep` no longer allows; returns how many.
    fn prune_events(&self, keep: Retention) -> Result<u64, StoreError>;
}

/// One schema step: the version it leaves the database at, what it does,
/// and the statements (run inside the migration's transaction).
pub struct Migration {
    /// The `user_version` after it.
    pub version: i64,
    /// What it does, for the log.
    pub what: &'static str,
    apply: fn(&Transaction<'_>) -> Result<(), StoreError>,
}

/// Every schema step, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        what: "tokens and endpoint owners (the schema before versions)",
        apply: migrate_1,
    },
    Migration {
        version: 2,
        what: "token scopes: allow lists become bind rules; source CIDRs; revisions",
        apply: migrate_2,
    },
    Migration {
        version: 3,
        what: "API keys, events, and the time of a token's last change in ms",
        apply: migrate_3,
    },
    Migration {
        version: 4,
        what: "token rotation: requests, successors and the token each replaced",
        apply: migrate_4,
    },
];

/// The newest schema version this build knows.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

fn migrate_1(tx: &Transaction<'_>) -> Result<(), StoreError> {
    // Exactly what the edge created before schema versions, so that a
    // database it made (user_version 0, these tables) is at version 1.
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS tokens (
            id TEXT PRIMARY KEY,
            salt BLOB NOT NULL,
            hash BLOB NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            allow TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            last_seen_at INTEGER NULL,
            revoked_at INTEGER NULL
        );
        CREATE TABLE IF NOT EXISTS endpoints (
            name TEXT PRIMARY KEY,
            token_id TEXT NOT NULL,
            kind TEXT NOT NULL DEFAULT '',
            claimed_at INTEGER NOT NULL
        );",
    )?;
    Ok(())
}

fn migrate_2(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute_batch(
        "ALTER TABLE tokens ADD COLUMN rules TEXT NOT NULL DEFAULT '';
         ALTER TABLE tokens ADD COLUMN sources TEXT NOT NULL DEFAULT '';
         ALTER TABLE tokens ADD COLUMN updated_at INTEGER NULL;
         ALTER TABLE tokens ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;",
    )?;
    // Each allow list (`*` or names joined by ',') becomes the same rules,
    // normalised; one that does not parse stops the migration, and the
    // transaction leaves the database as it was.
    let rows: Vec<(String, String)> = {
        let mut st = tx.prepare("SELECT id, allow FROM tokens")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (id, allow) in rows {
        let rules = Rules::parse_stored(&allow).map_err(|e| StoreError::Corrupt {
            row: format!("token tk_{id}"),
            reason: format!("its allow list {allow:?} does not migrate: {e}"),
        })?;
        tx.execute(
            "UPDATE tokens SET rules = ?2 WHERE id = ?1",
            params![id, rules.to_string()],
        )?;
    }
    tx.execute_batch(
        "ALTER TABLE tokens DROP COLUMN allow;
         CREATE INDEX tokens_rev ON tokens (rev);",
    )?;
    Ok(())
}

fn migrate_3(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute_batch(
        "ALTER TABLE tokens ADD COLUMN changed_ms INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            salt BLOB NOT NULL,
            hash BLOB NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('read', 'admin')),
            description TEXT NOT NULL DEFAULT '',
            created_at INTEGER NOT NULL,
            created_by TEXT NULL,
            last_used_at INTEGER NULL,
            revoked_at INTEGER NULL
        );
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            token_id TEXT NULL,
            session INTEGER NULL,
            remote TEXT NULL,
            endpoint TEXT NULL,
            api_key TEXT NULL,
            detail TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX events_at ON events (at_ms);
        CREATE INDEX events_token ON events (token_id, seq);",
    )?;
    Ok(())
}

fn migrate_4(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute_batch(
        "ALTER TABLE tokens ADD COLUMN rotate_requested_ms INTEGER NULL;
         ALTER TABLE tokens ADD COLUMN rotate_requested_by TEXT NULL;
         ALTER TABLE tokens ADD COLUMN rotated_from TEXT NULL;
         ALTER TABLE tokens ADD COLUMN replaced_by TEXT NULL;
         CREATE INDEX tokens_rotated_from ON tokens (rotated_from);",
    )?;
    Ok(())
}

/// Runs the pending migrations in one `BEGIN IMMEDIATE` transaction (a
/// second process opening the store meanwhile waits, then finds it done).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = schema_version();
    if found > known {
        return Err(StoreError::NewerSchema { found, known });
    }
    // A database made before schema versions has the tables at version 0.
    let existed: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tokens')",
        [],
        |r| r.get(0),
    )?;
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        (m.apply)(&tx)?;
        if existed {
            log::info!(
                "token store: migrated to schema version {}: {}",
                m.version,
                m.what
            );
        }
    }
    if found < known {
        tx.pragma_update(None, "user_version", known)?;
    }
    tx.commit()?;
    Ok(())
}

/// A credential being created (see `SqliteStore::mint`).
struct Minted {
    id: String,
    secret: [u8; SECRET_LEN],
    salt: [u8; SALT_LEN],
    hash: [u8; 32],
}

impl Minted {
    /// The credential shown once: `<prefix><id>.<secret>`.
    fn shown(&self, prefix: &str) -> TokenString {
        TokenString(format!(
            "{prefix}{}.{}",
            self.id,
            URL_SAFE_NO_PAD.encode(self.secret)
        ))
    }
}

/// Whether `p`'s secret hashes, with `salt`, to `stored` (constant time).
fn secret_matches(p: &Presented, salt: &[u8], stored: &[u8]) -> bool {
    bool::from(hash(salt, &p.secret).as_slice().ct_eq(stored))
}

/// The SQLite store; see the module docs.
pub struct SqliteStore {
    conn: Connection,
    rng: SystemRandom,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.conn.path())
            .finish_non_exhaustive()
    }
}

const TOKEN_COLUMNS: &str =
    "id, description, rules, sources, created_at, updated_at, last_seen_at, revoked_at,
     rotate_requested_ms, rotated_from, replaced_by,
     COALESCE((SELECT p.revoked_at IS NULL FROM tokens p WHERE p.id = tokens.rotated_from), 0)";

fn scope_of(id: &str, rules: &str, sources: &str) -> Result<Scope, StoreError> {
    let corrupt = |what: &str, e: crate::scope::ScopeError| StoreError::Corrupt {
        row: format!("token tk_{id}"),
        reason: format!("stored {what} do not parse: {e}"),
    };
    Ok(Scope {
        rules: Rules::parse_stored(rules).map_err(|e| corrupt("rules", e))?,
        sources: parse_sources(sources.split(',').filter(|s| !s.is_empty()))
            .map_err(|e| corrupt("sources", e))?,
    })
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TokenInfo, StoreError>> {
    let id: String = r.get(0)?;
    let rules: String = r.get(2)?;
    let sources: String = r.get(3)?;
    let description: String = r.get(1)?;
    let created_at = r.get(4)?;
    let updated_at = r.get(5)?;
    let last_seen_at = r.get(6)?;
    let revoked_at = r.get(7)?;
    let requested_ms: Option<i64> = r.get(8)?;
    let rotated_from: Option<String> = r.get(9)?;
    let replaced_by: Option<String> = r.get(10)?;
    let pending: bool = r.get(11)?;
    Ok(scope_of(&id, &rules, &sources).map(|scope| TokenInfo {
        id: TokenId(id),
        description,
        scope,
        created_at,
        updated_at,
        last_seen_at,
        revoked_at,
        rotation_requested_at: requested_ms.map(|ms| ms / 1000),
        rotated_from: rotated_from.map(TokenId),
        pending,
        replaced_by: replaced_by.map(TokenId),
    }))
}

impl SqliteStore {
    /// Opens (creating if needed) `<state_dir>/tokens.db` and migrates its
    /// schema. The directory is created with mode 0700, the file 0600.
    pub fn open(state_dir: &Path) -> Result<SqliteStore, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| StoreError::StateDir(state_dir.to_path_buf(), e))?;
        let path = state_dir.join(DB_FILE);
        {
            // The file exists with mode 0600 before SQLite opens it: SQLite
            // gives its -wal and -shm files the database file's mode.
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let private = |e| StoreError::StateDir(path.clone(), e);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(private)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(private)?;
        }
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: the running server reads while the CLI writes.
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn,
            rng: SystemRandom::new(),
        })
    }

    /// The schema version of the open database.
    pub fn user_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    fn random<const N: usize>(&self) -> Result<[u8; N], StoreError> {
        let mut b = [0u8; N];
        self.rng.fill(&mut b).map_err(|_| StoreError::Random)?;
        Ok(b)
    }

    /// A fresh credential: a random id, secret and salt, and the hash
    /// stored for them.
    fn mint(&self) -> Result<Minted, StoreError> {
        let idb: [u8; ID_LEN / 2] = self.random()?;
        let id: String = idb.iter().map(|b| format!("{b:02x}")).collect();
        let secret: [u8; SECRET_LEN] = self.random()?;
        let salt: [u8; SALT_LEN] = self.random()?;
        let hash = hash(&salt, &secret);
        Ok(Minted {
            id,
            secret,
            salt,
            hash,
        })
    }

    /// A write transaction taken at its start (`BEGIN IMMEDIATE`): a
    /// deferred one that reads first and writes later fails at once with
    /// `SQLITE_BUSY` when another connection (the running edge, writing its
    /// events) committed in between; this one waits its turn instead.
    fn write_tx(&self) -> Result<Transaction<'_>, StoreError> {
        Ok(Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?)
    }

    /// Inserts a new token (a successor of `rotated_from` when given).
    fn insert_token(
        &self,
        description: &str,
        scope: &Scope,
        rotated_from: Option<&TokenId>,
    ) -> Result<NewToken, StoreError> {
        loop {
            let m = self.mint()?;
            let n = self.conn.execute(
                &format!(
                    "INSERT OR IGNORE INTO tokens
                     (id, salt, hash, description, rules, sources, created_at, rev, changed_ms,
                      rotated_from)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, {}, ?8, ?9)",
                    Self::NEXT_REV
                ),
                params![
                    m.id,
                    &m.salt[..],
                    &m.hash[..],
                    description,
                    scope.rules.to_string(),
                    scope.sources_text(),
                    unix_now(),
                    unix_now_ms(),
                    rotated_from.map(TokenId::as_str)
                ],
            )?;
            if n == 1 {
                return Ok(NewToken {
                    token: m.shown("tk_"),
                    id: TokenId(m.id),
                });
            }
            // An id collision (1 in 2^48 per pair): draw again.
        }
    }

    /// The next revision, inside the caller's write.
    const NEXT_REV: &'static str = "(SELECT COALESCE(MAX(rev), 0) + 1 FROM tokens)";
}

impl Store for SqliteStore {
    fn create(&self, description: &str, scope: &Scope) -> Result<NewToken, StoreError> {
        self.insert_token(description, scope, None)
    }

    fn create_many(&self, specs: &[(String, Scope)]) -> Result<Vec<NewToken>, StoreError> {
        let tx = self.write_tx()?;
        let mut out = Vec::with_capacity(specs.len());
        for (description, scope) in specs {
            out.push(self.create(description, scope)?);
        }
        tx.commit()?;
        Ok(out)
    }

    fn list(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"
        ))?;
        let rows = st.query_map([], token_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    fn get(&self, id: &str) -> Result<Option<TokenInfo>, StoreError> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
                params![bare_id(id)],
                token_row,
            )
            .optional()?;
        row.transpose()
    }

    fn update(&self, id: &str, change: &TokenUpdate) -> Result<Updated, StoreError> {
        let tx = self.write_tx()?;
        let Some(old) = self.get(id)? else {
            return Ok(Updated::Unknown);
        };
        if old.revoked_at.is_some() {
            return Ok(Updated::Revoked);
        }
        let description = change.description.as_ref().unwrap_or(&old.description);
        let scope = Scope {
            rules: change.rules.clone().unwrap_or(old.scope.rules),
            sources: change.sources.clone().unwrap_or(old.scope.sources),
        };
        self.conn.execute(
            &format!(
                "UPDATE tokens SET description = ?2, rules = ?3, sources = ?4, updated_at = ?5,
                 changed_ms = ?6, rev = {} WHERE id = ?1",
                Self::NEXT_REV
            ),
            params![
                old.id.as_str(),
                description,
                scope.rules.to_string(),
                scope.sources_text(),
                unix_now(),
                unix_now_ms()
            ],
        )?;
        let now = self.get(id)?;
        tx.commit()?;
        Ok(now.map_or(Updated::Unknown, |t| Updated::Now(Box::new(t))))
    }

    fn revoke(&self, id: &str) -> Result<Revoked, StoreError> {
        let id = bare_id(id);
        let tx = self.write_tx()?;
        let n = self.conn.execute(
            &format!(
                "UPDATE tokens SET revoked_at = ?2, changed_ms = ?3, rev = {},
                 rotate_requested_ms = NULL, rotate_requested_by = NULL
                 WHERE id = ?1 AND revoked_at IS NULL",
                Self::NEXT_REV
            ),
            params![id, unix_now(), unix_now_ms()],
        )?;
        if n == 1 {
            // Its pending successors go with it (a successor that a device
            // proved retired it already: this token would not be active).
            self.conn.execute(
                &format!(
                    "UPDATE tokens SET revoked_at = ?2, changed_ms = ?3, rev = {}
                     WHERE rotated_from = ?1 AND revoked_at IS NULL",
                    Self::NEXT_REV
                ),
                params![id, unix_now(), unix_now_ms()],
            )?;
            tx.commit()?;
            return Ok(Revoked::Now);
        }
        drop(tx);
        let exists: Option<i64> = self
            .conn
            .query_row("SELECT 1 FROM tokens WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(if exists.is_some() {
            Revoked::Already
        } else {
            Revoked::Unknown
        })
    }

    fn request_rotation(
        &self,
        id: &str,
        by: Option<&ApiKeyId>,
    ) -> Result<RotationRequest, StoreError> {
        let tx = self.write_tx()?;
        let Some(t) = self.get(id)? else {
            return Ok(RotationRequest::Unknown);
        };
        if t.revoked_at.is_some() {
            return Ok(RotationRequest::Revoked);
        }
        if t.pending {
            if let Some(from) = t.rotated_from {
                return Ok(RotationRequest::PendingSuccessor(from));
            }
        }
        if t.rotation_requested_at.is_some() {
            return Ok(RotationRequest::AlreadyPending(Box::new(t)));
        }
        self.conn.execute(
            &format!(
                "UPDATE tokens SET rotate_requested_ms = ?2, rotate_requested_by = ?3,
                 changed_ms = ?2, rev = {} WHERE id = ?1",
                Self::NEXT_REV
            ),
            params![t.id.as_str(), unix_now_ms(), by.map(ApiKeyId::as_str)],
        )?;
        let now = self.get(t.id.as_str())?;
        tx.commit()?;
        Ok(now.map_or(RotationRequest::Unknown, |t| {
            RotationRequest::Requested(Box::new(t))
        }))
    }

    fn mint_successor(&self, id: &TokenId) -> Result<Successor, StoreError> {
        let tx = self.write_tx()?;
        let Some(t) = self.get(id.as_str())? else {
            return Ok(Successor::NotRequested);
        };
        if t.revoked_at.is_some() || t.rotation_requested_at.is_none() {
            return Ok(Successor::NotRequested);
        }
        let minted: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM tokens WHERE rotated_from = ?1 AND revoked_at IS NULL",
            params![id.as_str()],
            |r| r.get(0),
        )?;
        if minted as usize >= MAX_PENDING_SUCCESSORS {
            return Ok(Successor::Stalled);
        }
        let new = self.insert_token(&t.description, &t.scope, Some(id))?;
        tx.commit()?;
        Ok(Successor::Minted(new))
    }

    fn complete_rotation(&self, successor: &TokenId) -> Result<Option<Retired>, StoreError> {
        let tx = self.write_tx()?;
        let Some(new) = self.get(successor.as_str())? else {
            return Ok(None);
        };
        let Some(old_id) = new.rotated_from.as_ref().filter(|_| new.pending) else {
            return Ok(None);
        };
        if new.revoked_at.is_some() {
            return Ok(None);
        }
        type Row = (String, String, String, Option<i64>, Option<String>);
        let (description, rules, sources, requested_ms, requested_by): Row = self.conn.query_row(
            "SELECT description, rules, sources, rotate_requested_ms, rotate_requested_by
                 FROM tokens WHERE id = ?1",
            params![old_id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?;
        let (now, now_ms) = (unix_now(), unix_now_ms());
        let mut st = self.conn.prepare(
            "SELECT id FROM tokens WHERE rotated_from = ?1 AND id != ?2 AND revoked_at IS NULL
             ORDER BY id",
        )?;
        let abandoned = st
            .query_map(params![old_id.as_str(), successor.as_str()], |r| {
                r.get::<_, String>(0).map(TokenId)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        drop(st);
        self.conn.execute(
            &format!(
                "UPDATE tokens SET revoked_at = ?3, changed_ms = ?4, rev = {}
                 WHERE rotated_from = ?1 AND id != ?2 AND revoked_at IS NULL",
                Self::NEXT_REV
            ),
            params![old_id.as_str(), successor.as_str(), now, now_ms],
        )?;
        self.conn.execute(
            &format!(
                "UPDATE tokens SET description = ?2, rules = ?3, sources = ?4, changed_ms = ?5,
                 rev = {} WHERE id = ?1",
                Self::NEXT_REV
            ),
            params![successor.as_str(), description, rules, sources, now_ms],
        )?;
        self.conn.execute(
            &format!(
                "UPDATE tokens SET revoked_at = ?3, replaced_by = ?2, changed_ms = ?4,
                 rotate_requested_ms = NULL, rotate_requested_by = NULL, rev = {}
                 WHERE id = ?1",
                Self::NEXT_REV
            ),
            params![old_id.as_str(), successor.as_str(), now, now_ms],
        )?;
        // The endpoints the device owned stay its own.
        self.conn.execute(
            "UPDATE endpoints SET token_id = ?2 WHERE token_id = ?1",
            params![old_id.as_str(), successor.as_str()],
        )?;
        tx.commit()?;
        Ok(Some(Retired {
            old: old_id.clone(),
            new: successor.clone(),
            requested_by: requested_by.and_then(|k| ApiKeyId::parse(&k)),
            requested_ms: requested_ms.unwrap_or(now_ms),
            abandoned,
        }))
    }

    fn verify(&self, presented: &str) -> Result<VerifiedToken, AuthError> {
        let p = parse_token(presented).ok_or(AuthError::Malformed)?;
        type Row = (
            Vec<u8>,
            Vec<u8>,
            String,
            String,
            Option<i64>,
            bool,
            Option<String>,
        );
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT salt, hash, rules, sources, revoked_at, rotate_requested_ms IS NOT NULL,
                 (SELECT p.id FROM tokens p WHERE p.id = tokens.rotated_from
                  AND p.revoked_at IS NULL)
                 FROM tokens WHERE id = ?1",
                params![p.id.as_str()],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| AuthError::Store(e.into()))?;
        let Some((salt, stored, rules, sources, revoked_at, rotation_requested, completes)) = row
        else {
            return Err(AuthError::Unknown(p.id));
        };
        if !secret_matches(&p, &salt, &stored) {
            return Err(AuthError::Unknown(p.id));
        }
        if revoked_at.is_some() {
            return Err(AuthError::Revoked(p.id));
        }
        let scope = scope_of(p.id.as_str(), &rules, &sources).map_err(AuthError::Store)?;
        self.conn
            .execute(
                "UPDATE tokens SET last_seen_at = ?2 WHERE id = ?1",
                params![p.id.as_str(), unix_now()],
            )
            .map_err(|e| AuthError::Store(e.into()))?;
        Ok(VerifiedToken {
            id: p.id,
            scope,
            completes: completes.map(TokenId),
            rotation_requested,
        })
    }

    fn changes_since(&self, rev: i64) -> Result<(i64, Vec<TokenChange>), StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, rules, sources, revoked_at, rev, changed_ms,
             rotate_requested_ms IS NOT NULL, replaced_by FROM tokens
             WHERE rev > ?1 ORDER BY rev",
        )?;
        let rows = st.query_map(params![rev], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, bool>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut newest = rev;
        let mut out = Vec::new();
        for row in rows {
            let (id, rules, sources, revoked_at, r, changed_ms, rotation_requested, replaced_by) =
                row?;
            newest = newest.max(r);
            out.push(TokenChange {
                scope: scope_of(&id, &rules, &sources)?,
                id: TokenId(id),
                revoked: revoked_at.is_some(),
                changed_ms,
                rotation_requested: rotation_requested && revoked_at.is_none(),
                replaced_by: replaced_by.map(TokenId),
            });
        }
        Ok((newest, out))
    }

    fn revision(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(rev), 0) FROM tokens", [], |r| r.get(0))?)
    }

    fn claim_endpoint(
        &self,
        endpoint: &str,
        token: &TokenId,
        kind: &str,
    ) -> Result<Claim, StoreError> {
        self.conn.execute(
            "INSERT INTO endpoints (name, token_id, kind, claimed_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET kind = excluded.kind
             WHERE endpoints.token_id = excluded.token_id",
            params![endpoint, token.as_str(), kind, unix_now()],
        )?;
        let owner: String = self.conn.query_row(
            "SELECT token_id FROM endpoints WHERE name = ?1",
            params![endpoint],
            |r| r.get(0),
        )?;
        Ok(if owner == token.as_str() {
            Claim::Owner
        } else {
            Claim::OwnedBy(TokenId(owner))
        })
    }

    fn list_endpoints(&self) -> Result<Vec<EndpointInfo>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT name, token_id, kind, claimed_at FROM endpoints ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(EndpointInfo {
                name: r.get(0)?,
                owner: TokenId(r.get(1)?),
                kind: r.get(2)?,
                claimed_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn release_endpoint(&self, endpoint: &str) -> Result<Option<TokenId>, StoreError> {
        let owner: Option<String> = self
            .conn
            .query_row(
                "DELETE FROM endpoints WHERE name = ?1 RETURNING token_id",
                params![endpoint],
                |r| r.get(0),
            )
            .optional()?;
        Ok(owner.map(TokenId))
    }

    fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    fn revoked_ids(&self) -> Result<HashSet<TokenId>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM tokens WHERE revoked_at IS NOT NULL")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0).map(TokenId))?;
        Ok(rows.collect::<Result<HashSet<_>, _>>()?)
    }

    fn tokens_page(
        &self,
        after: Option<&TokenId>,
        limit: usize,
    ) -> Result<Vec<TokenInfo>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?;
        let after = after.map_or("", TokenId::as_str);
        let rows = st.query_map(params![after, limit as i64], token_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    fn create_api_key(
        &self,
        role: Role,
        description: &str,
        by: Option<&ApiKeyId>,
    ) -> Result<NewApiKey, StoreError> {
        loop {
            let m = self.mint()?;
            let n = self.conn.execute(
                "INSERT OR IGNORE INTO api_keys
                 (id, salt, hash, role, description, created_at, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    m.id,
                    &m.salt[..],
                    &m.hash[..],
                    role.as_str(),
                    description,
                    unix_now(),
                    by.map(ApiKeyId::as_str)
                ],
            )?;
            if n == 1 {
                return Ok(NewApiKey {
                    key: m.shown("ak_"),
                    id: ApiKeyId(m.id),
                });
            }
        }
    }

    fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, role, description, created_at, created_by, last_used_at, revoked_at
             FROM api_keys ORDER BY created_at, id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                ApiKeyInfo {
                    id: ApiKeyId(r.get(0)?),
                    role: Role::Read,
                    description: r.get(2)?,
                    created_at: r.get(3)?,
                    created_by: r.get::<_, Option<String>>(4)?.map(ApiKeyId),
                    last_used_at: r.get(5)?,
                    revoked_at: r.get(6)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, role, mut info) = row?;
            info.role = Role::parse(&role).ok_or_else(|| StoreError::Corrupt {
                row: format!("API key ak_{id}"),
                reason: format!("role {role:?} is not read or admin"),
            })?;
            out.push(info);
        }
        Ok(out)
    }

    fn revoke_api_key(&self, id: &ApiKeyId) -> Result<Revoked, StoreError> {
        let n = self.conn.execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id.as_str(), unix_now()],
        )?;
        if n == 1 {
            return Ok(Revoked::Now);
        }
        let exists: Option<i64> = self
            .conn
            .query_row(
                "SELECT 1 FROM api_keys WHERE id = ?1",
                params![id.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(if exists.is_some() {
            Revoked::Already
        } else {
            Revoked::Unknown
        })
    }

    fn verify_api_key(&self, presented: &str) -> Result<VerifiedKey, AuthError> {
        let p = parse_credential("ak_", presented).ok_or(AuthError::Malformed)?;
        type Row = (Vec<u8>, Vec<u8>, String, Option<i64>);
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT salt, hash, role, revoked_at FROM api_keys WHERE id = ?1",
                params![p.id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(|e| AuthError::Store(e.into()))?;
        let Some((salt, stored, role, revoked_at)) = row else {
            return Err(AuthError::Unknown(p.id));
        };
        if !secret_matches(&p, &salt, &stored) {
            return Err(AuthError::Unknown(p.id));
        }
        if revoked_at.is_some() {
            return Err(AuthError::Revoked(p.id));
        }
        let role = Role::parse(&role).ok_or_else(|| {
            AuthError::Store(StoreError::Corrupt {
                row: format!("API key ak_{}", p.id.as_str()),
                reason: format!("role {role:?} is not read or admin"),
            })
        })?;
        self.conn
            .execute(
                "UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1",
                params![p.id.as_str(), unix_now()],
            )
            .map_err(|e| AuthError::Store(e.into()))?;
        Ok(VerifiedKey {
            id: ApiKeyId(p.id.0),
            role,
        })
    }

    fn record(&self, e: &NewEvent) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO events (at_ms, kind, token_id, session, remote, endpoint, api_key, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                unix_now_ms(),
                e.kind.as_str(),
                e.token.as_ref().map(TokenId::as_str),
                e.session.map(|s| s as i64),
                e.remote,
                e.endpoint,
                e.api_key.as_ref().map(ApiKeyId::as_str),
                e.detail
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    fn events(&self, q: &EventQuery) -> Result<Vec<Event>, StoreError> {
        let order = if q.after.is_some() { "ASC" } else { "DESC" };
        let mut st = self.conn.prepare(&format!(
            "SELECT seq, at_ms, kind, token_id, session, remote, endpoint, api_key, detail
             FROM events
             WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR token_id = ?2)
               AND (?3 IS NULL OR at_ms >= ?3) AND (?4 IS NULL OR seq < ?4)
               AND (?6 IS NULL OR seq > ?6)
             ORDER BY seq {order} LIMIT ?5"
        ))?;
        let rows = st.query_map(
            params![
                q.kind.map(EventKind::as_str),
                q.token.as_ref().map(TokenId::as_str),
                q.since_ms,
                q.before,
                q.limit as i64,
                q.after
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, String>(8)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at_ms, kind, token, session, remote, endpoint, api_key, detail) = row?;
            let kind = EventKind::parse(&kind).ok_or_else(|| StoreError::Corrupt {
                row: format!("event {seq}"),
                reason: format!("kind {kind:?} is unknown"),
            })?;
            out.push(Event {
                seq,
                at_ms,
                event: NewEvent {
                    kind,
                    token: token.map(TokenId),
                    session: session.map(|s| s as u64),
                    remote,
                    endpoint,
                    api_key: api_key.map(ApiKeyId),
                    detail,
                },
            });
        }
        Ok(out)
    }

    fn prune_events(&self, keep: Retention) -> Result<u64, StoreError> {
        let oldest = unix_now_ms().saturating_sub((keep.max_age_secs as i64).saturating_mul(1000));
        let by_age = self
            .conn
            .execute("DELETE FROM events WHERE at_ms < ?1", params![oldest])?;
        let by_count = self.conn.execute(
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?1",
            params![keep.max_events.min(i64::MAX as u64) as i64],
        )?;
        Ok((by_age + by_count) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (PathBuf, SqliteStore) {
        let dir = std::env::temp_dir().join(format!(
            "tether-edge-store-{}-{}",
            std::process::id(),
            unix_now_nanos()
        ));
        let s = SqliteStore::open(&dir).expect("open store");
        (dir, s)
    }

    fn unix_now_nanos() -> u128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }

    #[test]
    fn token_format_is_the_contracts() {
        let (dir, s) = temp_store();
        let t = s.create("d", &any()).expect("create");
        let tok = t.token.expose();
        assert!(tok.starts_with("tk_"), "{tok}");
        assert_eq!(tok.len(), 3 + 12 + 1 + 43, "{tok}");
        assert_eq!(token_id_of(tok), Some(t.id.clone()));
        assert!(
            !format!("{:?}", t).contains(&tok[16..]),
            "Debug shows no secret"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn verify_accepts_the_token_and_refuses_others() {
        let (dir, s) = temp_store();
        let scope = Scope {
            rules: Rules::exact(["web".to_owned()]),
            sources: vec![],
        };
        let t = s.create("d", &scope).expect("create");
        let v = s.verify(t.token.expose()).expect("valid token");
        assert_eq!(v.id(), &t.id);
        assert_eq!(v.scope(), &scope);
        // Same id, another secret.
        let forged = format!("tk_{}.{}", t.id.as_str(), URL_SAFE_NO_PAD.encode([7u8; 32]));
        assert!(matches!(s.verify(&forged), Err(AuthError::Unknown(_))));
        assert!(matches!(
            s.verify("tk_nothex.abc"),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(s.verify(""), Err(AuthError::Malformed)));
        assert_eq!(s.revoke(t.id.as_str()).expect("revoke"), Revoked::Now);
        assert_eq!(s.revoke(t.id.as_str()).expect("revoke"), Revoked::Already);
        assert_eq!(s.revoke("000000000000").expect("revoke"), Revoked::Unknown);
        assert!(matches!(
            s.verify(t.token.expose()),
            Err(AuthError::Revoked(_))
        ));
        assert!(s.revoked_ids().expect("ids").contains(&t.id));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn any() -> Scope {
        Scope {
            rules: Rules::any(),
            sources: vec![],
        }
    }

    #[test]
    fn updates_change_the_scope_and_the_revision() {
        let (dir, s) = temp_store();
        let t = s.create("d", &any()).expect("create");
        let start = s.revision().expect("rev");
        let other = s.create("e", &any()).expect("create");
        let (rev, changes) = s.changes_since(start).expect("changes");
        assert_eq!(changes.len(), 1, "only the token created after {start}");
        assert_eq!(changes[0].id, other.id);
        let narrow = TokenUpdate {
            rules: Some(Rules::parse(["*.site-42"]).expect("rules")),
            sources: Some(parse_sources(["10.0.0.0/8"]).expect("cidr")),
            ..TokenUpdate::default()
        };
        let Updated::Now(info) = s.update(&t.id.to_string(), &narrow).expect("update") else {
            panic!("not updated");
        };
        assert_eq!(info.scope.rules.to_string(), "*.site-42");
        assert_eq!(info.description, "d", "left as it was");
        assert!(info.updated_at.is_some());
        let (rev2, changes) = s.changes_since(rev).expect("changes");
        assert!(rev2 > rev);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].scope, info.scope);
        assert!(!changes[0].revoked);
        // Authenticating records last_seen_at, which is no change of scope.
        s.verify(t.token.expose()).expect("valid");
        assert!(s.changes_since(rev2).expect("changes").1.is_empty());
        s.revoke(t.id.as_str()).expect("revoke");
        let (_, changes) = s.changes_since(rev2).expect("changes");
        assert!(changes[0].revoked);
        assert_eq!(
            s.update(t.id.as_str(), &narrow).expect("update"),
            Updated::Revoked
        );
        assert_eq!(
            s.update("000000000000", &narrow).expect("update"),
            Updated::Unknown
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_rotation_keeps_both_tokens_valid_until_a_successor_authenticates_then_exactly_one() {
        let (dir, s) = temp_store();
        let old = s.create("cam-7", &any()).expect("create");
        s.claim_endpoint("cam", &old.id, "tcp").expect("claim");
        // No successor without a request.
        assert!(matches!(
            s.mint_successor(&old.id).expect("mint"),
            Successor::NotRequested
        ));
        let RotationRequest::Requested(t) = s.request_rotation(old.id.as_str(), None).expect("rq")
        else {
            panic!("not requested");
        };
        assert!(t.rotation_requested_at.is_some());
        assert!(matches!(
            s.request_rotation(old.id.as_str(), None).expect("again"),
            RotationRequest::AlreadyPending(_)
        ));
        let (_, changes) = s.changes_since(0).expect("changes");
        assert!(changes
            .iter()
            .any(|c| c.id == old.id && c.rotation_requested));
        let mut minted = Vec::new();
        for _ in 0..MAX_PENDING_SUCCESSORS {
            match s.mint_successor(&old.id).expect("mint") {
                Successor::Minted(n) => minted.push(n),
                other => panic!("expected a successor, got {other:?}"),
            }
        }
        assert!(
            matches!(s.mint_successor(&old.id).expect("mint"), Successor::Stalled),
            "at most {MAX_PENDING_SUCCESSORS} successors per rotation"
        );
        // A pending successor is not rotated itself.
        assert_eq!(
            s.request_rotation(minted[0].id.as_str(), None).expect("rq"),
            RotationRequest::PendingSuccessor(old.id.clone())
        );
        // Every one of them, and the old token, authenticates meanwhile.
        let v = s.verify(old.token.expose()).expect("old still valid");
        assert!(v.rotation_requested() && v.completes().is_none());
        for n in &minted {
            let v = s.verify(n.token.expose()).expect("successor valid");
            assert_eq!(v.completes(), Some(&old.id));
        }
        // The operator narrows the old token meanwhile: the successor gets it.
        let narrow = TokenUpdate {
            description: Some("cam-7 (kitchen)".into()),
            rules: Some(Rules::parse(["cam"]).expect("rules")),
            ..TokenUpdate::default()
        };
        s.update(old.id.as_str(), &narrow).expect("update");
        let chosen = &minted[2];
        let r = s
            .complete_rotation(&chosen.id)
            .expect("complete")
            .expect("a rotation completed");
        assert_eq!(r.old, old.id);
        assert_eq!(r.new, chosen.id);
        assert_eq!(r.abandoned.len(), MAX_PENDING_SUCCESSORS - 1);
        assert!(!r.abandoned.contains(&chosen.id));
        // Exactly one is valid now.
        assert!(matches!(
            s.verify(old.token.expose()),
            Err(AuthError::Revoked(_))
        ));
        for n in minted.iter().filter(|n| n.id != chosen.id) {
            assert!(matches!(
                s.verify(n.token.expose()),
                Err(AuthError::Revoked(_))
            ));
        }
        let v = s.verify(chosen.token.expose()).expect("the successor");
        assert!(v.completes().is_none() && !v.rotation_requested());
        let now = s.get(chosen.id.as_str()).expect("get").expect("listed");
        assert_eq!(now.description, "cam-7 (kitchen)");
        assert_eq!(now.scope.rules.to_string(), "cam");
        assert_eq!(now.rotated_from.as_ref(), Some(&old.id));
        assert!(!now.pending);
        let was = s.get(old.id.as_str()).expect("get").expect("listed");
        assert_eq!(was.replaced_by.as_ref(), Some(&chosen.id));
        assert!(was.rotation_requested_at.is_none());
        assert_eq!(
            s.endpoint_owners().expect("owners").get("cam"),
            Some(&chosen.id),
            "the device keeps its endpoints"
        );
        let (_, changes) = s.changes_since(0).expect("changes");
        let retired = changes
            .iter()
            .find(|c| c.id == old.id)
            .expect("old changed");
        assert!(retired.revoked && retired.replaced_by.as_ref() == Some(&chosen.id));
        // Completing again is nothing.
        assert_eq!(s.complete_rotation(&chosen.id).expect("again"), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn revoking_a_token_under_rotation_revokes_its_successors_and_a_revoked_one_is_not_rotated() {
        let (dir, s) = temp_store();
        let old = s.create("d", &any()).expect("create");
        s.request_rotation(old.id.as_str(), None).expect("rq");
        let Successor::Minted(new) = s.mint_successor(&old.id).expect("mint") else {
            panic!("no successor");
        };
        assert_eq!(s.revoke(old.id.as_str()).expect("revoke"), Revoked::Now);
        assert!(matches!(
            s.verify(new.token.expose()),
            Err(AuthError::Revoked(_))
        ));
        assert_eq!(s.complete_rotation(&new.id).expect("complete"), None);
        assert_eq!(
            s.request_rotation(old.id.as_str(), None).expect("rq"),
            RotationRequest::Revoked
        );
        assert_eq!(
            s.request_rotation("tk_000000000000", None).expect("rq"),
            RotationRequest::Unknown
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_database_from_a_newer_edge_is_refused() {
        let (dir, s) = temp_store();
        assert_eq!(s.user_version().expect("version"), schema_version());
        s.conn
            .pragma_update(None, "user_version", schema_version() + 1)
            .expect("set");
        drop(s);
        let e = SqliteStore::open(&dir).expect_err("refused");
        assert!(matches!(e, StoreError::NewerSchema { .. }), "{e}");
        assert!(e.to_string().contains("newer"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_database_and_its_wal_are_private_to_the_owner() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, s) = temp_store();
        s.create("d", &any()).expect("create");
        for name in [DB_FILE.to_owned(), format!("{DB_FILE}-wal")] {
            let mode = std::fs::metadata(dir.join(&name))
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{name} has mode {mode:o}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
