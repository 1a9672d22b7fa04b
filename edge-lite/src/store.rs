//! The token store: `<state_dir>/tokens.db` (SQLite), holding for each
//! token its public id, a random salt, `SHA-256(salt || secret)`, its
//! description and allow list, and its timestamps. Secrets are never stored:
//! a token is shown once, at [`Store::create`], and checked afterwards by
//! hashing what the agent presents and comparing in constant time.
//!
//! A token is `tk_<id>.<secret>`: `<id>` is 12 lowercase hex characters
//! (public: logs and events name tokens by it), `<secret>` is 32 random bytes
//! in base64url without padding. The hash covers the 32 decoded bytes.
//!
//! This module is synchronous; the server calls it from the blocking pool.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{params, Connection, OptionalExtension};
use subtle::ConstantTimeEq;

/// Length of a token id in hex characters.
pub const ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
const SALT_LEN: usize = 16;
/// The file name of the store inside `state_dir`.
pub const DB_FILE: &str = "tokens.db";

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
    let rest = token.strip_prefix("tk_")?;
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

/// Which endpoints a token may bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow {
    /// Every endpoint (`*`).
    Any,
    /// Only these names.
    Names(Vec<String>),
}

impl Allow {
    /// Parses the stored form: `*` or comma-separated names.
    pub fn parse(s: &str) -> Allow {
        if s.trim() == "*" {
            return Allow::Any;
        }
        Allow::Names(
            s.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Builds an allow list from `--allow` arguments (`*` among them means any).
    pub fn from_names<I: IntoIterator<Item = String>>(names: I) -> Allow {
        let names: Vec<String> = names.into_iter().collect();
        if names.iter().any(|n| n == "*") {
            Allow::Any
        } else {
            Allow::Names(names)
        }
    }

    /// Whether `endpoint` is allowed.
    pub fn permits(&self, endpoint: &str) -> bool {
        match self {
            Allow::Any => true,
            Allow::Names(n) => n.iter().any(|x| x == endpoint),
        }
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allow::Any => f.write_str("*"),
            Allow::Names(n) => f.write_str(&n.join(",")),
        }
    }
}

/// Proof that a presented credential matched an active token. Only
/// [`Store::verify`] creates it.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    id: TokenId,
    allow: Allow,
}

impl VerifiedToken {
    /// The token's id.
    pub fn id(&self) -> &TokenId {
        &self.id
    }

    /// What it may bind.
    pub fn allow(&self) -> &Allow {
        &self.allow
    }
}

/// A token as listed (no secret, no hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Public id.
    pub id: TokenId,
    /// Operator's description.
    pub description: String,
    /// Allow list.
    pub allow: Allow,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last accepted handshake.
    pub last_seen_at: Option<i64>,
    /// Unix seconds of the revocation.
    pub revoked_at: Option<i64>,
}

/// A token just created: show [`NewToken::token`] once, then forget it.
#[derive(Debug)]
pub struct NewToken {
    /// The public id.
    pub id: TokenId,
    /// The credential.
    pub token: TokenString,
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
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::StateDir(p, e) => write!(f, "state {}: {e}", p.display()),
            StoreError::Db(e) => write!(f, "token store: {e}"),
            StoreError::Random => f.write_str("system random generator failed"),
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

/// One connection to the token store.
pub struct Store {
    conn: Connection,
    rng: SystemRandom,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.conn.path())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) `<state_dir>/tokens.db`. The directory is
    /// created with mode 0700.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
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
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: the running server reads while the CLI writes.
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch(
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
        Ok(Store {
            conn,
            rng: SystemRandom::new(),
        })
    }

    fn random<const N: usize>(&self) -> Result<[u8; N], StoreError> {
        let mut b = [0u8; N];
        self.rng.fill(&mut b).map_err(|_| StoreError::Random)?;
        Ok(b)
    }

    /// Creates a token; the returned credential is shown once and never stored.
    pub fn create(&self, description: &str, allow: &Allow) -> Result<NewToken, StoreError> {
        loop {
            let idb: [u8; ID_LEN / 2] = self.random()?;
            let id: String = idb.iter().map(|b| format!("{b:02x}")).collect();
            let secret: [u8; SECRET_LEN] = self.random()?;
            let salt: [u8; SALT_LEN] = self.random()?;
            let h = hash(&salt, &secret);
            let n = self.conn.execute(
                "INSERT OR IGNORE INTO tokens (id, salt, hash, description, allow, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    &salt[..],
                    &h[..],
                    description,
                    allow.to_string(),
                    unix_now()
                ],
            )?;
            if n == 1 {
                let token = TokenString(format!("tk_{id}.{}", URL_SAFE_NO_PAD.encode(secret)));
                return Ok(NewToken {
                    id: TokenId(id),
                    token,
                });
            }
            // An id collision (1 in 2^48 per pair): draw again.
        }
    }

    /// Creates one token per `(description, allow)`, all in one transaction:
    /// either every token is stored or none is (one commit instead of one
    /// per token: `provision` mints a factory batch this way). The returned
    /// credentials are in the order of `specs`.
    pub fn create_many(&self, specs: &[(String, Allow)]) -> Result<Vec<NewToken>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut out = Vec::with_capacity(specs.len());
        for (description, allow) in specs {
            out.push(self.create(description, allow)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, description, allow, created_at, last_seen_at, revoked_at FROM tokens ORDER BY created_at, id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(TokenInfo {
                id: TokenId(r.get(0)?),
                description: r.get(1)?,
                allow: Allow::parse(&r.get::<_, String>(2)?),
                created_at: r.get(3)?,
                last_seen_at: r.get(4)?,
                revoked_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Marks a token revoked.
    pub fn revoke(&self, id: &str) -> Result<Revoked, StoreError> {
        // Both the stored form and the displayed `tk_<id>` name a token.
        let id = id.strip_prefix("tk_").unwrap_or(id);
        let n = self.conn.execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, unix_now()],
        )?;
        if n == 1 {
            return Ok(Revoked::Now);
        }
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

    /// Checks a presented credential; on success records `last_seen_at`.
    pub fn verify(&self, presented: &str) -> Result<VerifiedToken, AuthError> {
        let p = parse_token(presented).ok_or(AuthError::Malformed)?;
        type Row = (Vec<u8>, Vec<u8>, String, Option<i64>);
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT salt, hash, allow, revoked_at FROM tokens WHERE id = ?1",
                params![p.id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(|e| AuthError::Store(e.into()))?;
        let Some((salt, stored, allow, revoked_at)) = row else {
            return Err(AuthError::Unknown(p.id));
        };
        let h = hash(&salt, &p.secret);
        if !bool::from(h.as_slice().ct_eq(stored.as_slice())) {
            return Err(AuthError::Unknown(p.id));
        }
        if revoked_at.is_some() {
            return Err(AuthError::Revoked(p.id));
        }
        self.conn
            .execute(
                "UPDATE tokens SET last_seen_at = ?2 WHERE id = ?1",
                params![p.id.as_str(), unix_now()],
            )
            .map_err(|e| AuthError::Store(e.into()))?;
        Ok(VerifiedToken {
            id: p.id,
            allow: Allow::parse(&allow),
        })
    }

    /// Makes `token` the owner of `endpoint` unless another token owns it
    /// already (the first token to bind an endpoint owns it until an
    /// operator releases it): one atomic statement, so two edges sharing a
    /// database agree.
    /// `kind` (`tcp` or `tls`) is recorded for `endpoint list` when the
    /// token owns it.
    pub fn claim_endpoint(
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

    /// Every endpoint's owner, by name.
    pub fn endpoint_owners(&self) -> Result<HashMap<String, TokenId>, StoreError> {
        Ok(self
            .list_endpoints()?
            .into_iter()
            .map(|e| (e.name, e.owner))
            .collect())
    }

    /// Every owned endpoint, by name.
    pub fn list_endpoints(&self) -> Result<Vec<EndpointInfo>, StoreError> {
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

    /// Forgets `endpoint`'s owner, so that the next token allowed to bind it
    /// owns it. Returns the owner it had, if any. A session that holds the
    /// endpoint keeps it until it unbinds.
    pub fn release_endpoint(&self, endpoint: &str) -> Result<Option<TokenId>, StoreError> {
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

    /// SQLite's `PRAGMA data_version` of this connection: it changes when
    /// another connection commits.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// The ids of every revoked token.
    pub fn revoked_ids(&self) -> Result<HashSet<TokenId>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM tokens WHERE revoked_at IS NOT NULL")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0).map(TokenId))?;
        Ok(rows.collect::<Result<HashSet<_>, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "tether-edge-store-{}-{}",
            std::process::id(),
            unix_now_nanos()
        ));
        let s = Store::open(&dir).expect("open store");
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
        let t = s.create("d", &Allow::Any).expect("create");
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
        let t = s
            .create("d", &Allow::Names(vec!["web".into()]))
            .expect("create");
        let v = s.verify(t.token.expose()).expect("valid token");
        assert_eq!(v.id(), &t.id);
        assert!(v.allow().permits("web") && !v.allow().permits("ssh"));
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

    #[test]
    fn allow_lists_round_trip() {
        assert_eq!(Allow::parse("*"), Allow::Any);
        assert_eq!(Allow::parse("a,b").to_string(), "a,b");
        assert_eq!(
            Allow::from_names(vec!["a".to_string(), "*".to_string()]),
            Allow::Any
        );
        assert!(!Allow::Names(vec![]).permits("a"));
    }

    #[test]
    fn the_database_and_its_wal_are_private_to_the_owner() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, s) = temp_store();
        s.create("d", &Allow::Any).expect("create");
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
