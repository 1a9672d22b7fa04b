//! The admin API's routes: authentication (a bearer API key and its role),
//! the resources of `openapi.json`, and the one JSON error shape. Every
//! answer is JSON; every failure says what, where and why, and a store
//! failure is the only 500.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::events::{EventKind, EventQuery, NewEvent};
use crate::scope::{parse_sources, Rules, Scope};
use crate::state::State;
use crate::store::{
    ApiKeyId, AuthError, Revoked, Role, RotationRequest, Store, StoreError, TokenId, TokenUpdate,
    Updated, VerifiedKey,
};
use crate::wire;

/// A page holds this many items unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// ... and at most this many.
const MAX_LIMIT: usize = 1000;
/// The longest description accepted (bytes).
const MAX_DESCRIPTION: usize = 256;
/// The most rules, and the most sources, one token may have.
const MAX_LIST: usize = 64;

/// `allow` and `sources` of a body, each at most [`MAX_LIST`] long.
fn lists(allow: Option<&[String]>, sources: Option<&[String]>) -> Result<(), Failure> {
    for (field, v) in [("allow", allow), ("sources", sources)] {
        if v.is_some_and(|v| v.len() > MAX_LIST) {
            return Err(bad(format!("body: {field}: more than {MAX_LIST} entries")));
        }
    }
    Ok(())
}

type Resp = Response<Full<Bytes>>;

/// A failed request: the status, the code of `wire::Error` and the message.
struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
    allow: Option<&'static str>,
}

fn fail(status: StatusCode, code: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        status,
        code,
        message: message.into(),
        allow: None,
    }
}

fn bad(message: impl Into<String>) -> Failure {
    fail(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn not_found(message: impl Into<String>) -> Failure {
    fail(StatusCode::NOT_FOUND, "not_found", message)
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        log::error!("api: {e}");
        fail(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

impl Failure {
    fn into_response(self) -> Resp {
        let mut r = json(
            self.status,
            &wire::Error {
                error: self.code.to_owned(),
                message: self.message,
            },
        );
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(a) = self.allow {
            r.headers_mut().insert(ALLOW, HeaderValue::from_static(a));
        }
        r
    }
}

/// The answer when a request took longer than `request_timeout_ms`.
pub(super) fn timed_out(limit: Duration) -> Resp {
    fail(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        format!("the request took longer than {} ms", limit.as_millis()),
    )
    .into_response()
}

/// One operation of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Health,
    OpenApi,
    ListTokens,
    CreateToken,
    GetToken,
    UpdateToken,
    RevokeToken,
    RotateToken,
    ListSessions,
    ListEndpoints,
    ReleaseEndpoint,
    ListEvents,
    ListApiKeys,
    CreateApiKey,
    RevokeApiKey,
    Metrics,
}

impl Op {
    /// The role it needs (`None`: no key at all).
    fn role(self) -> Option<Role> {
        match self {
            Op::Health | Op::OpenApi => None,
            Op::ListTokens
            | Op::GetToken
            | Op::ListSessions
            | Op::ListEndpoints
            | Op::ListEvents
            | Op::ListApiKeys
            | Op::Metrics => Some(Role::Read),
            Op::CreateToken
            | Op::UpdateToken
            | Op::RevokeToken
            | Op::RotateToken
            | Op::ReleaseEndpoint
            | Op::CreateApiKey
            | Op::RevokeApiKey => Some(Role::Admin),
        }
    }
}

/// The operation `method path` names, with the path's parameter; a known
/// path with another method is 405 with `Allow`.
fn route<'a>(method: &Method, path: &'a str) -> Result<(Op, Option<&'a str>), Failure> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (ops, allow, param): (&[(Method, Op)], &'static str, Option<&str>) = match segs[..] {
        ["healthz"] => (&[(Method::GET, Op::Health)], "GET", None),
        ["openapi.json"] => (&[(Method::GET, Op::OpenApi)], "GET", None),
        ["tokens"] => (
            &[
                (Method::GET, Op::ListTokens),
                (Method::POST, Op::CreateToken),
            ],
            "GET, POST",
            None,
        ),
        ["tokens", id] if !id.is_empty() => (
            &[
                (Method::GET, Op::GetToken),
                (Method::PATCH, Op::UpdateToken),
            ],
            "GET, PATCH",
            Some(id),
        ),
        ["tokens", id, "revoke"] if !id.is_empty() => {
            (&[(Method::POST, Op::RevokeToken)], "POST", Some(id))
        }
        ["tokens", id, "rotate"] if !id.is_empty() => {
            (&[(Method::POST, Op::RotateToken)], "POST", Some(id))
        }
        ["sessions"] => (&[(Method::GET, Op::ListSessions)], "GET", None),
        ["endpoints"] => (&[(Method::GET, Op::ListEndpoints)], "GET", None),
        ["endpoints", name, "release"] if !name.is_empty() => {
            (&[(Method::POST, Op::ReleaseEndpoint)], "POST", Some(name))
        }
        ["events"] => (&[(Method::GET, Op::ListEvents)], "GET", None),
        ["metrics"] => (&[(Method::GET, Op::Metrics)], "GET", None),
        ["apikeys"] => (
            &[
                (Method::GET, Op::ListApiKeys),
                (Method::POST, Op::CreateApiKey),
            ],
            "GET, POST",
            None,
        ),
        ["apikeys", id, "revoke"] if !id.is_empty() => {
            (&[(Method::POST, Op::RevokeApiKey)], "POST", Some(id))
        }
        _ => return Err(not_found(format!("no resource at {path}"))),
    };
    match ops.iter().find(|(m, _)| m == method) {
        Some((_, op)) => Ok((*op, param)),
        None => Err(Failure {
            allow: Some(allow),
            ..fail(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} answers {allow}, not {method}"),
            )
        }),
    }
}

/// Serves one request; see the module docs.
pub(super) async fn handle(
    state: &Arc<State>,
    peer: Option<SocketAddr>,
    max_body: u64,
    req: Request<Incoming>,
) -> Resp {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let out = match serve(state, max_body, req).await {
        Ok(r) => r,
        Err(f) => f.into_response(),
    };
    log::debug!(
        "api: {} {method} {path}: {}",
        peer.map_or("unix".to_owned(), |p| p.to_string()),
        out.status().as_u16()
    );
    out
}

async fn serve(state: &Arc<State>, max_body: u64, req: Request<Incoming>) -> Result<Resp, Failure> {
    let (op, param) = route(req.method(), req.uri().path())?;
    let param = param.map(str::to_owned);
    let key = match op.role() {
        None => None,
        Some(need) => {
            let k = authenticate(state, &req).await?;
            if k.role < need {
                return Err(fail(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "API key {} has the role {}; this needs {}",
                        k.id,
                        k.role.as_str(),
                        need.as_str()
                    ),
                ));
            }
            Some(k)
        }
    };
    let query = Query::parse(req.uri().query())?;
    let by = key.map(|k| k.id);
    match op {
        Op::Health => {
            query.only(&[])?;
            health(state)
        }
        Op::OpenApi => {
            query.only(&[])?;
            let mut r = Response::new(Full::new(Bytes::from_static(super::OPENAPI.as_bytes())));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(r)
        }
        Op::ListTokens => list_tokens(state, &query).await,
        Op::CreateToken => {
            query.only(&[])?;
            let body: wire::TokenCreate = read_json(req, max_body).await?;
            create_token(state, body, by).await
        }
        Op::GetToken => {
            query.only(&[])?;
            let id = token_id(param.as_deref())?;
            let t = {
                let id = id.clone();
                state.store_call(move |s| s.get(id.as_str())).await?
            };
            let t = t.ok_or_else(|| not_found(format!("no token {id}")))?;
            Ok(json(StatusCode::OK, &wire::Token::from(&t)))
        }
        Op::UpdateToken => {
            query.only(&[])?;
            let id = token_id(param.as_deref())?;
            let body: wire::TokenPatch = read_json(req, max_body).await?;
            update_token(state, id, body, by).await
        }
        Op::RevokeToken => {
            query.only(&[])?;
            let id = token_id(param.as_deref())?;
            revoke_token(state, id, by).await
        }
        Op::RotateToken => {
            query.only(&[])?;
            let id = token_id(param.as_deref())?;
            rotate_token(state, id, by).await
        }
        Op::ListSessions => list_sessions(state, &query),
        Op::Metrics => {
            query.only(&[])?;
            Ok(metrics(state))
        }
        Op::ListEndpoints => list_endpoints(state, &query).await,
        Op::ReleaseEndpoint => {
            query.only(&[])?;
            release_endpoint(state, param.unwrap_or_default(), by).await
        }
        Op::ListEvents => list_events(state, &query).await,
        Op::ListApiKeys => {
            query.only(&[])?;
            let keys = state.store_call(|s| s.list_api_keys()).await?;
            let items: Vec<wire::ApiKey> = keys.iter().map(wire::ApiKey::from).collect();
            Ok(json(
                StatusCode::OK,
                &wire::Page {
                    items,
                    next_cursor: None,
                },
            ))
        }
        Op::CreateApiKey => {
            query.only(&[])?;
            let body: wire::ApiKeyCreate = read_json(req, max_body).await?;
            create_api_key(state, body, by).await
        }
        Op::RevokeApiKey => {
            query.only(&[])?;
            let id = param
                .as_deref()
                .and_then(ApiKeyId::parse)
                .ok_or_else(|| not_found("no such API key (ids are ak_ and 12 hex digits)"))?;
            revoke_api_key(state, id, by).await
        }
    }
}

/// The bearer key of `req`, verified against the store.
async fn authenticate(state: &Arc<State>, req: &Request<Incoming>) -> Result<VerifiedKey, Failure> {
    let unauthorized = |m: &str| fail(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer ak_<id>.<secret>"))?;
    let presented = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthorized("Authorization is not \"Bearer ak_<id>.<secret>\""))?
        .to_owned();
    match state
        .store_call(move |s| s.verify_api_key(&presented))
        .await
    {
        Ok(k) => Ok(k),
        Err(AuthError::Store(e)) => Err(e.into()),
        Err(AuthError::Malformed) => Err(unauthorized(
            "the API key is not of the form ak_<id>.<secret>",
        )),
        Err(AuthError::Unknown(id)) => {
            log::info!("api: refused an unknown API key ak_{}", id.as_str());
            Err(unauthorized("unknown API key"))
        }
        Err(AuthError::Revoked(id)) => {
            log::info!("api: refused the revoked API key ak_{}", id.as_str());
            Err(unauthorized("this API key was revoked"))
        }
    }
}

/// Reads a JSON body of at most `max` bytes into `T`.
async fn read_json<T: DeserializeOwned>(req: Request<Incoming>, max: u64) -> Result<T, Failure> {
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(fail(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("the body must be application/json, not {ct:?}"),
            ));
        }
    }
    let too_large = || {
        fail(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {max} bytes (api.max_body_bytes)"),
        )
    };
    let body = req.into_body();
    if body.size_hint().lower() > max {
        return Err(too_large());
    }
    let bytes = Limited::new(body, max as usize)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                bad(format!("cannot read the body: {e}"))
            }
        })?
        .to_bytes();
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let at = e.path().to_string();
        if at == "." {
            bad(format!("body: {}", e.inner()))
        } else {
            bad(format!("body: {at}: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| bad(format!("body: trailing characters: {e}")))?;
    Ok(v)
}

/// The query string's parameters, each at most once.
struct Query(BTreeMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Result<Query, Failure> {
        let mut m = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
            if m.insert(k.to_string(), v.to_string()).is_some() {
                return Err(bad(format!("query parameter {k:?} is given twice")));
            }
        }
        Ok(Query(m))
    }

    /// Refuses any parameter not in `known`.
    fn only(&self, known: &[&str]) -> Result<(), Failure> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) if known.is_empty() => {
                Err(bad(format!("query parameter {k:?}: this takes none")))
            }
            Some(k) => Err(bad(format!(
                "unknown query parameter {k:?} (known: {})",
                known.join(", ")
            ))),
        }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// `limit`: 1..=1000, default 100.
    fn limit(&self) -> Result<usize, Failure> {
        match self.get("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(bad(format!(
                    "limit {v:?}: need a whole number from 1 to {MAX_LIMIT}"
                ))),
            },
        }
    }

    /// `cursor` as a whole number (sessions, events).
    fn number_cursor(&self) -> Result<Option<i64>, Failure> {
        self.get("cursor")
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| bad(format!("cursor {v:?} is not one this API gave")))
            })
            .transpose()
    }
}

fn token_id(param: Option<&str>) -> Result<TokenId, Failure> {
    let p = param.unwrap_or("");
    TokenId::parse(p.strip_prefix("tk_").unwrap_or(p))
        .ok_or_else(|| not_found(format!("no token {p:?} (ids are tk_ and 12 hex digits)")))
}

fn description(d: &str) -> Result<(), Failure> {
    if d.len() > MAX_DESCRIPTION {
        return Err(bad(format!(
            "body: description: longer than {MAX_DESCRIPTION} bytes"
        )));
    }
    if d.chars().any(char::is_control) {
        return Err(bad("body: description: contains a control character"));
    }
    Ok(())
}

fn health(state: &Arc<State>) -> Result<Resp, Failure> {
    let reg = state.registry();
    let h = wire::Health {
        status: "ok".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: crate::metrics::uptime_secs(),
        sessions: reg.live_sessions().len() as u64,
        endpoints: reg.bindings().len() as u64,
    };
    drop(reg);
    Ok(json(StatusCode::OK, &h))
}

/// `GET /metrics`: the counters and the registry now, as OpenMetrics text.
fn metrics(state: &Arc<State>) -> Resp {
    let (sessions, open_streams, endpoints) = {
        let reg = state.registry();
        let live = reg.live_sessions();
        let open: usize = live.iter().map(|(t, _)| t.session.live_streams()).sum();
        let endpoints = reg
            .bindings()
            .into_iter()
            .map(|(name, b)| {
                let (up, down) = b.traffic.get();
                crate::metrics::EndpointTraffic {
                    name: name.to_owned(),
                    up,
                    down,
                }
            })
            .collect();
        (live.len() as u64, open as u64, endpoints)
    };
    let text = crate::metrics::render(&crate::metrics::Exposition {
        counters: &state.counters,
        denials: &state.denials,
        latencies: &state.latencies,
        sessions,
        endpoints,
        open_streams,
        events_dropped: state
            .events_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
    });
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

async fn list_tokens(state: &Arc<State>, q: &Query) -> Result<Resp, Failure> {
    q.only(&["limit", "cursor"])?;
    let limit = q.limit()?;
    let after = match q.get("cursor") {
        None => None,
        Some(c) => Some(
            TokenId::parse(c.strip_prefix("tk_").unwrap_or(c))
                .ok_or_else(|| bad(format!("cursor {c:?} is not one this API gave")))?,
        ),
    };
    let got = state
        .store_call(move |s| s.tokens_page(after.as_ref(), limit + 1))
        .await?;
    Ok(page(
        got,
        limit,
        |t| t.id.to_string(),
        |t| wire::Token::from(t),
    ))
}

/// A page of at most `limit` of `got` (read with one more than `limit`, so
/// that a next page shows), with the cursor of its last item if there is
/// more.
fn page<S, T: Serialize>(
    mut got: Vec<S>,
    limit: usize,
    cursor: impl Fn(&S) -> String,
    item: impl Fn(&S) -> T,
) -> Resp {
    let more = got.len() > limit;
    got.truncate(limit);
    let next_cursor = more.then(|| got.last().map(&cursor)).flatten();
    let items = got.iter().map(item).collect();
    json(StatusCode::OK, &wire::Page { items, next_cursor })
}

async fn create_token(
    state: &Arc<State>,
    body: wire::TokenCreate,
    by: Option<ApiKeyId>,
) -> Result<Resp, Failure> {
    description(&body.description)?;
    lists(Some(&body.allow), Some(&body.sources))?;
    if body.allow.is_empty() {
        return Err(bad(
            "body: allow: at least one rule is needed (an endpoint name, *.suffix, or *)",
        ));
    }
    let rules = Rules::parse(&body.allow).map_err(|e| bad(format!("body: allow: {e}")))?;
    let sources = parse_sources(&body.sources).map_err(|e| bad(format!("body: sources: {e}")))?;
    let scope = Scope { rules, sources };
    let d = body.description;
    let (new, info) = state
        .store_call(move |s| {
            let new = s.create(&d, &scope)?;
            let info = s.get(new.id.as_str())?;
            s.record(
                &NewEvent::new(EventKind::TokenCreated)
                    .token(&new.id)
                    .by(by.as_ref())
                    .detail(scope.summary()),
            )?;
            Ok::<_, StoreError>((new, info))
        })
        .await?;
    let info = info.ok_or_else(|| not_found(format!("token {} vanished", new.id)))?;
    log::info!("api: created token {} ({})", new.id, info.scope.summary());
    Ok(json(
        StatusCode::CREATED,
        &wire::NewToken {
            token: wire::Token::from(&info),
            secret: new.token.expose().to_owned(),
        },
    ))
}

async fn update_token(
    state: &Arc<State>,
    id: TokenId,
    body: wire::TokenPatch,
    by: Option<ApiKeyId>,
) -> Result<Resp, Failure> {
    if let Some(d) = &body.description {
        description(d)?;
    }
    lists(body.allow.as_deref(), body.sources.as_deref())?;
    let rules =
        match &body.allow {
            None => None,
            Some(a) if a.is_empty() => return Err(bad(
                "body: allow: at least one rule is needed; revoke a token that may bind nothing",
            )),
            Some(a) => Some(Rules::parse(a).map_err(|e| bad(format!("body: allow: {e}")))?),
        };
    let sources = match &body.sources {
        None => None,
        Some(s) => Some(parse_sources(s).map_err(|e| bad(format!("body: sources: {e}")))?),
    };
    let change = TokenUpdate {
        description: body.description,
        rules,
        sources,
    };
    let sid = id.clone();
    let updated = state
        .store_call(move |s| {
            let u = s.update(sid.as_str(), &change)?;
            if let Updated::Now(t) = &u {
                s.record(
                    &NewEvent::new(EventKind::TokenUpdated)
                        .token(&t.id)
                        .by(by.as_ref())
                        .detail(t.scope.summary()),
                )?;
            }
            Ok::<_, StoreError>(u)
        })
        .await?;
    match updated {
        Updated::Now(t) => {
            log::info!("api: updated token {id} ({})", t.scope.summary());
            Ok(json(StatusCode::OK, &wire::Token::from(&*t)))
        }
        Updated::Revoked => Err(fail(
            StatusCode::CONFLICT,
            "conflict",
            format!("token {id} is revoked: a revoked token does not change"),
        )),
        Updated::Unknown => Err(not_found(format!("no token {id}"))),
    }
}

async fn revoke_token(
    state: &Arc<State>,
    id: TokenId,
    by: Option<ApiKeyId>,
) -> Result<Resp, Failure> {
    let sid = id.clone();
    let (r, t) = state
        .store_call(move |s| {
            let r = s.revoke(sid.as_str())?;
            if r == Revoked::Now {
                s.record(
                    &NewEvent::new(EventKind::TokenRevoked)
                        .token(&sid)
                        .by(by.as_ref()),
                )?;
            }
            Ok::<_, StoreError>((r, s.get(sid.as_str())?))
        })
        .await?;
    match (r, t) {
        (Revoked::Unknown, _) | (_, None) => Err(not_found(format!("no token {id}"))),
        (r, Some(t)) => {
            if r == Revoked::Now {
                log::info!("api: revoked token {id}");
            }
            Ok(json(StatusCode::OK, &wire::Token::from(&t)))
        }
    }
}

async fn rotate_token(
    state: &Arc<State>,
    id: TokenId,
    by: Option<ApiKeyId>,
) -> Result<Resp, Failure> {
    let sid = id.clone();
    let r = state
        .store_call(move |s| {
            let r = s.request_rotation(sid.as_str(), by.as_ref())?;
            if let RotationRequest::Requested(t) = &r {
                s.record(
                    &NewEvent::new(EventKind::TokenRotated)
                        .token(&t.id)
                        .by(by.as_ref())
                        .detail("requested"),
                )?;
            }
            Ok::<_, StoreError>(r)
        })
        .await?;
    match r {
        RotationRequest::Requested(t) | RotationRequest::AlreadyPending(t) => {
            log::info!("api: rotation of token {id} requested");
            Ok(json(StatusCode::ACCEPTED, &wire::Token::from(&*t)))
        }
        RotationRequest::Revoked => Err(fail(
            StatusCode::CONFLICT,
            "conflict",
            format!("token {id} is revoked: a revoked token is not rotated"),
        )),
        RotationRequest::PendingSuccessor(from) => Err(fail(
            StatusCode::CONFLICT,
            "conflict",
            format!("token {id} is the pending successor of {from}: its rotation is under way"),
        )),
        RotationRequest::Unknown => Err(not_found(format!("no token {id}"))),
    }
}

fn list_sessions(state: &Arc<State>, q: &Query) -> Result<Resp, Failure> {
    q.only(&["limit", "cursor", "token"])?;
    let limit = q.limit()?;
    let after = q.number_cursor()?.unwrap_or(0) as u64;
    let token = q
        .get("token")
        .map(|t| token_id(Some(t)).map_err(|_| bad(format!("token {t:?} is not a token id"))))
        .transpose()?;
    let reg = state.registry();
    let bindings = reg.bindings();
    let mut items: Vec<wire::Session> = Vec::new();
    let mut more = false;
    for (t, _) in reg.live_sessions() {
        if t.no <= after || token.as_ref().is_some_and(|id| *id != t.token) {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        let (up, down) = t.traffic.get();
        items.push(wire::Session {
            id: t.no,
            token_id: t.token.to_string(),
            remote: t.peer.to_string(),
            agent: t.agent.clone(),
            arch: t.arch.clone(),
            connected_at: t.since,
            endpoints: bindings
                .iter()
                .filter(|(_, b)| b.tunnel.no == t.no)
                .map(|(n, _)| (*n).to_owned())
                .collect(),
            open_streams: t.session.live_streams() as u64,
            bytes_up: up,
            bytes_down: down,
        });
    }
    drop(bindings);
    drop(reg);
    let next_cursor = more
        .then(|| items.last().map(|s| s.id.to_string()))
        .flatten();
    Ok(json(StatusCode::OK, &wire::Page { items, next_cursor }))
}

async fn list_endpoints(state: &Arc<State>, q: &Query) -> Result<Resp, Failure> {
    q.only(&["limit", "cursor"])?;
    let limit = q.limit()?;
    let after = q.get("cursor").unwrap_or("").to_owned();
    let owned = state.store_call(|s| s.list_endpoints()).await?;
    let mut all: BTreeMap<String, wire::Endpoint> = BTreeMap::new();
    for e in owned {
        all.insert(e.name.clone(), wire::Endpoint::from(e));
    }
    {
        let reg = state.registry();
        for (name, b) in reg.bindings() {
            let e = all
                .entry(name.to_owned())
                .or_insert_with(|| wire::Endpoint::unbound(name.to_owned()));
            let (up, down) = b.traffic.get();
            e.kind = Some(crate::bind::kind_name(b.kind).to_owned());
            e.bound = true;
            e.url = Some(b.url.clone());
            e.session_id = Some(b.tunnel.no);
            e.bound_at = Some(b.since);
            e.policy = Some(b.policy.summary());
            e.bytes_up = up;
            e.bytes_down = down;
        }
    }
    let mut items: Vec<wire::Endpoint> = Vec::new();
    let mut more = false;
    for (name, e) in all {
        if name.as_str() <= after.as_str() {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(e);
    }
    let next_cursor = more.then(|| items.last().map(|e| e.name.clone())).flatten();
    Ok(json(StatusCode::OK, &wire::Page { items, next_cursor }))
}

/// Forgets an endpoint's owner. This process wrote the change, so the
/// watcher's `data_version` would not show it: the registry's owners are
/// reloaded here, in the same store call.
async fn release_endpoint(
    state: &Arc<State>,
    name: String,
    by: Option<ApiKeyId>,
) -> Result<Resp, Failure> {
    if !tether_proto::valid_endpoint_name(&name) {
        return Err(not_found(format!(
            "no endpoint {name:?} (an endpoint name is DNS labels of lowercase letters, digits and inner '-')"
        )));
    }
    let n = name.clone();
    let (owner, owners) = state
        .store_call(move |s| {
            let owner = s.release_endpoint(&n)?;
            if let Some(o) = &owner {
                s.record(
                    &NewEvent::new(EventKind::EndpointReleased)
                        .endpoint(&n)
                        .token(o)
                        .by(by.as_ref()),
                )?;
            }
            let owners = match owner {
                Some(_) => Some(s.endpoint_owners()?),
                None => None,
            };
            Ok::<_, StoreError>((owner, owners))
        })
        .await?;
    match (owner, owners) {
        (Some(o), Some(owners)) => {
            state.registry().set_owners(owners);
            log::info!("api: released endpoint {name} (was owned by token {o})");
            Ok(json(
                StatusCode::OK,
                &wire::EndpointRelease {
                    name,
                    released_from: o.to_string(),
                },
            ))
        }
        _ => Err(not_found(format!("endpoint {name:?} has no owner"))),
    }
}

async fn list_events(state: &Arc<State>, q: &Query) -> Result<Resp, Failure> {
    q.only(&["limit", "cursor", "kind", "token", "since"])?;
    let limit = q.limit()?;
    let kind = q
        .get("kind")
        .map(|k| {
            EventKind::parse(k).ok_or_else(|| {
                let all: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                bad(format!("kind {k:?} is not one of {}", all.join(", ")))
            })
        })
        .transpose()?;
    let token = q
        .get("token")
        .map(|t| token_id(Some(t)).map_err(|_| bad(format!("token {t:?} is not a token id"))))
        .transpose()?;
    let since_ms = q
        .get("since")
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| bad(format!("since {v:?}: need Unix milliseconds")))
        })
        .transpose()?;
    let query = EventQuery {
        kind,
        token,
        since_ms,
        before: q.number_cursor()?,
        after: None,
        limit: limit + 1,
    };
    let got = state.store_call(move |s| s.events(&query)).await?;
    Ok(page(
        got,
        limit,
        |e| e.seq.to_string(),
        |e| wire::Event::from(e),
    ))
}

async fn create_api_key(
    state: &Arc<State>,
    body: wire::ApiKeyCreate,
    by: Option<ApiKeyId>,
) -> Result<Resp, Failure> {
    description(&body.description)?;
    let role = Role::parse(&body.role)
        .ok_or_else(|| bad(format!("body: role: {:?} is not read or admin", body.role)))?;
    let d = body.description;
    let (new, info) = state
        .store_call(move |s| {
            let new = s.create_api_key(role, &d, by.as_ref())?;
            s.record(
                &NewEvent::new(EventKind::ApiKeyCreated)
                    .by(by.as_ref())
                    .detail(format!("{} role {}", new.id, role.as_str())),
            )?;
            let info = s.list_api_keys()?.into_iter().find(|k| k.id == new.id);
            Ok::<_, StoreError>((new, info))
        })
        .await?;
    let info = info.ok_or_else(|| not_found(format!("API key {} vanished", new.id)))?;
    log::info!("api: created API key {} ({})", new.id, role.as_str());
    Ok(json(
        StatusCode::CREATED,
        &wire::NewApiKey {
            key: wire::ApiKey::from(&info),
            secret: new.key.expose().to_owned(),
        },
    ))
}

async fn revoke_api_key(
    state: &Arc<State>,
    id: ApiKeyId,
    by: Option<ApiKeyId>,
) -> Result<Resp, Failure> {
    let sid = id.clone();
    let (r, info) = state
        .store_call(move |s: &dyn Store| {
            let r = s.revoke_api_key(&sid)?;
            if r == Revoked::Now {
                s.record(
                    &NewEvent::new(EventKind::ApiKeyRevoked)
                        .by(by.as_ref())
                        .detail(sid.to_string()),
                )?;
            }
            let info = s.list_api_keys()?.into_iter().find(|k| k.id == sid);
            Ok::<_, StoreError>((r, info))
        })
        .await?;
    match (r, info) {
        (Revoked::Unknown, _) | (_, None) => Err(not_found(format!("no API key {id}"))),
        (_, Some(k)) => {
            log::info!("api: revoked API key {id}");
            Ok(json(StatusCode::OK, &wire::ApiKey::from(&k)))
        }
    }
}
