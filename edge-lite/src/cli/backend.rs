//! Where an operator command goes: [`Api`], a client of the running edge's
//! admin API (the default), or [`Offline`], the store itself
//! (`--offline`). Both speak [`Backend`] in the API's own JSON types
//! ([`tether_edge::wire`]), so that a command prints the same table and the
//! same `--output json` either way, and both refuse what the other refuses,
//! with the API's messages.
//!
//! The offline side records the same events as the API, marked
//! `(offline)` and with no key; the API records the key that made each
//! change.

use hyper::Method;
use tether_edge::client::{Client, ClientError};
use tether_edge::events::{EventKind, EventQuery, NewEvent};
use tether_edge::scope::Scope;
use tether_edge::store::{
    ApiKeyId, Revoked, Role, RotationRequest, SqliteStore, Store, StoreError, TokenId, TokenUpdate,
    Updated,
};
use tether_edge::wire;

/// Why a command failed (exit 1); the message says what and why.
#[derive(Debug)]
pub(crate) struct Failed(pub(crate) String);

impl From<ClientError> for Failed {
    fn from(e: ClientError) -> Failed {
        Failed(e.to_string())
    }
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Failed {
        Failed(e.to_string())
    }
}

/// The filters of `event list`.
pub(crate) struct EventFilter {
    pub(crate) kind: Option<EventKind>,
    pub(crate) token: Option<TokenId>,
    pub(crate) since_ms: Option<i64>,
    pub(crate) limit: usize,
}

/// The operator commands, on the API or on the store.
pub(crate) trait Backend {
    /// `token create`.
    fn create_token(&mut self, description: &str, scope: &Scope) -> Result<wire::NewToken, Failed>;
    /// `token update`.
    fn update_token(&mut self, id: &TokenId, change: &TokenUpdate) -> Result<wire::Token, Failed>;
    /// `token get`.
    fn get_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed>;
    /// `token list`: every token (all pages).
    fn list_tokens(&mut self) -> Result<Vec<wire::Token>, Failed>;
    /// `token revoke`: the token, revoked (now or before).
    fn revoke_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed>;
    /// `token rotate`: the token, its rotation requested (now or before).
    fn rotate_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed>;
    /// `apikey create`.
    fn create_api_key(&mut self, role: Role, description: &str) -> Result<wire::NewApiKey, Failed>;
    /// `apikey list`.
    fn list_api_keys(&mut self) -> Result<Vec<wire::ApiKey>, Failed>;
    /// `apikey revoke`: the key, revoked (now or before).
    fn revoke_api_key(&mut self, id: &ApiKeyId) -> Result<wire::ApiKey, Failed>;
    /// `endpoint list`: every endpoint (all pages).
    fn list_endpoints(&mut self) -> Result<Vec<wire::Endpoint>, Failed>;
    /// `endpoint release`: the endpoint and the owner it had.
    fn release_endpoint(&mut self, name: &str) -> Result<wire::EndpointRelease, Failed>;
    /// `session list`: every live session (all pages).
    fn list_sessions(&mut self, token: Option<&TokenId>) -> Result<Vec<wire::Session>, Failed>;
    /// `event list`: one page, newest first.
    fn list_events(&mut self, f: &EventFilter) -> Result<Vec<wire::Event>, Failed>;
    /// `status`.
    fn health(&mut self) -> Result<wire::Health, Failed>;
}

/// The running edge's API.
pub(crate) struct Api(pub(crate) Client);

/// The most a page holds (the API's `limit` maximum).
const PAGE: usize = 1000;

impl Api {
    /// Every item of a paginated list, following `next_cursor`.
    fn all<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<T>, Failed> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let limit = PAGE.to_string();
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("limit", &limit);
            for (k, v) in query {
                q.append_pair(k, v);
            }
            if let Some(c) = &cursor {
                q.append_pair("cursor", c);
            }
            let page: wire::Page<T> = self.0.get(&format!("{path}?{}", q.finish()))?;
            items.extend(page.items);
            match page.next_cursor {
                Some(c) if cursor.as_ref() != Some(&c) => cursor = Some(c),
                Some(c) => {
                    return Err(Failed(format!(
                        "{path}: the API gave the cursor {c:?} twice; stopping"
                    )))
                }
                None => return Ok(items),
            }
        }
    }
}

impl Backend for Api {
    fn create_token(&mut self, description: &str, scope: &Scope) -> Result<wire::NewToken, Failed> {
        let body = wire::TokenCreate {
            description: description.to_owned(),
            allow: scope.rules.iter().map(ToString::to_string).collect(),
            sources: scope.sources.iter().map(ToString::to_string).collect(),
        };
        Ok(self.0.call(Method::POST, "/tokens", Some(&body))?)
    }

    fn update_token(&mut self, id: &TokenId, change: &TokenUpdate) -> Result<wire::Token, Failed> {
        let body = wire::TokenPatch {
            description: change.description.clone(),
            allow: change
                .rules
                .as_ref()
                .map(|r| r.iter().map(ToString::to_string).collect()),
            sources: change
                .sources
                .as_ref()
                .map(|s| s.iter().map(ToString::to_string).collect()),
        };
        Ok(self
            .0
            .call(Method::PATCH, &format!("/tokens/{id}"), Some(&body))?)
    }

    fn get_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed> {
        Ok(self.0.get(&format!("/tokens/{id}"))?)
    }

    fn list_tokens(&mut self) -> Result<Vec<wire::Token>, Failed> {
        self.all("/tokens", &[])
    }

    fn revoke_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed> {
        Ok(self
            .0
            .call(Method::POST, &format!("/tokens/{id}/revoke"), None::<&()>)?)
    }

    fn rotate_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed> {
        Ok(self
            .0
            .call(Method::POST, &format!("/tokens/{id}/rotate"), None::<&()>)?)
    }

    fn create_api_key(&mut self, role: Role, description: &str) -> Result<wire::NewApiKey, Failed> {
        let body = wire::ApiKeyCreate {
            role: role.as_str().to_owned(),
            description: description.to_owned(),
        };
        Ok(self.0.call(Method::POST, "/apikeys", Some(&body))?)
    }

    fn list_api_keys(&mut self) -> Result<Vec<wire::ApiKey>, Failed> {
        let page: wire::Page<wire::ApiKey> = self.0.get("/apikeys")?;
        Ok(page.items)
    }

    fn revoke_api_key(&mut self, id: &ApiKeyId) -> Result<wire::ApiKey, Failed> {
        Ok(self
            .0
            .call(Method::POST, &format!("/apikeys/{id}/revoke"), None::<&()>)?)
    }

    fn list_endpoints(&mut self) -> Result<Vec<wire::Endpoint>, Failed> {
        self.all("/endpoints", &[])
    }

    fn release_endpoint(&mut self, name: &str) -> Result<wire::EndpointRelease, Failed> {
        Ok(self.0.call(
            Method::POST,
            &format!("/endpoints/{name}/release"),
            None::<&()>,
        )?)
    }

    fn list_sessions(&mut self, token: Option<&TokenId>) -> Result<Vec<wire::Session>, Failed> {
        let t = token.map(ToString::to_string);
        match &t {
            Some(t) => self.all("/sessions", &[("token", t)]),
            None => self.all("/sessions", &[]),
        }
    }

    fn list_events(&mut self, f: &EventFilter) -> Result<Vec<wire::Event>, Failed> {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("limit", &f.limit.to_string());
        if let Some(k) = f.kind {
            q.append_pair("kind", k.as_str());
        }
        if let Some(t) = &f.token {
            q.append_pair("token", &t.to_string());
        }
        if let Some(s) = f.since_ms {
            q.append_pair("since", &s.to_string());
        }
        let page: wire::Page<wire::Event> = self.0.get(&format!("/events?{}", q.finish()))?;
        Ok(page.items)
    }

    fn health(&mut self) -> Result<wire::Health, Failed> {
        Ok(self.0.get("/healthz")?)
    }
}

/// The store, without a running edge.
pub(crate) struct Offline(pub(crate) SqliteStore);

impl Offline {
    fn token(&self, id: &TokenId) -> Result<wire::Token, Failed> {
        let t = self.0.get(id.as_str())?;
        t.map(|t| wire::Token::from(&t))
            .ok_or_else(|| Failed(format!("no token {id}")))
    }

    fn api_key(&self, id: &ApiKeyId) -> Result<wire::ApiKey, Failed> {
        let k = self.0.list_api_keys()?.into_iter().find(|k| k.id == *id);
        k.map(|k| wire::ApiKey::from(&k))
            .ok_or_else(|| Failed(format!("no API key {id}")))
    }
}

impl Backend for Offline {
    fn create_token(&mut self, description: &str, scope: &Scope) -> Result<wire::NewToken, Failed> {
        let s = &self.0;
        let new = s.create(description, scope)?;
        s.record(
            &NewEvent::new(EventKind::TokenCreated)
                .token(&new.id)
                .detail(format!("{} (offline)", scope.summary())),
        )?;
        Ok(wire::NewToken {
            token: self.token(&new.id)?,
            secret: new.token.expose().to_owned(),
        })
    }

    fn update_token(&mut self, id: &TokenId, change: &TokenUpdate) -> Result<wire::Token, Failed> {
        let s = &self.0;
        match s.update(id.as_str(), change)? {
            Updated::Now(t) => {
                s.record(
                    &NewEvent::new(EventKind::TokenUpdated)
                        .token(&t.id)
                        .detail(format!("{} (offline)", t.scope.summary())),
                )?;
                Ok(wire::Token::from(&*t))
            }
            Updated::Revoked => Err(Failed(format!(
                "token {id} is revoked: a revoked token does not change"
            ))),
            Updated::Unknown => Err(Failed(format!("no token {id}"))),
        }
    }

    fn get_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed> {
        self.token(id)
    }

    fn list_tokens(&mut self) -> Result<Vec<wire::Token>, Failed> {
        Ok(self.0.list()?.iter().map(wire::Token::from).collect())
    }

    fn revoke_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed> {
        match self.0.revoke(id.as_str())? {
            Revoked::Now => {
                self.0.record(
                    &NewEvent::new(EventKind::TokenRevoked)
                        .token(id)
                        .detail("offline"),
                )?;
                self.token(id)
            }
            Revoked::Already => self.token(id),
            Revoked::Unknown => Err(Failed(format!("no token {id}"))),
        }
    }

    fn rotate_token(&mut self, id: &TokenId) -> Result<wire::Token, Failed> {
        match self.0.request_rotation(id.as_str(), None)? {
            RotationRequest::Requested(t) => {
                self.0.record(
                    &NewEvent::new(EventKind::TokenRotated)
                        .token(&t.id)
                        .detail("requested (offline)"),
                )?;
                Ok(wire::Token::from(&*t))
            }
            RotationRequest::AlreadyPending(t) => Ok(wire::Token::from(&*t)),
            RotationRequest::Revoked => Err(Failed(format!(
                "token {id} is revoked: a revoked token is not rotated"
            ))),
            RotationRequest::PendingSuccessor(from) => Err(Failed(format!(
                "token {id} is the pending successor of {from}: its rotation is under way"
            ))),
            RotationRequest::Unknown => Err(Failed(format!("no token {id}"))),
        }
    }

    fn create_api_key(&mut self, role: Role, description: &str) -> Result<wire::NewApiKey, Failed> {
        let k = self.0.create_api_key(role, description, None)?;
        self.0
            .record(&NewEvent::new(EventKind::ApiKeyCreated).detail(format!(
                "{} role {} (offline)",
                k.id,
                role.as_str()
            )))?;
        Ok(wire::NewApiKey {
            key: self.api_key(&k.id)?,
            secret: k.key.expose().to_owned(),
        })
    }

    fn list_api_keys(&mut self) -> Result<Vec<wire::ApiKey>, Failed> {
        Ok(self
            .0
            .list_api_keys()?
            .iter()
            .map(wire::ApiKey::from)
            .collect())
    }

    fn revoke_api_key(&mut self, id: &ApiKeyId) -> Result<wire::ApiKey, Failed> {
        match self.0.revoke_api_key(id)? {
            Revoked::Now => {
                self.0.record(
                    &NewEvent::new(EventKind::ApiKeyRevoked).detail(format!("{id} (offline)")),
                )?;
                self.api_key(id)
            }
            Revoked::Already => self.api_key(id),
            Revoked::Unknown => Err(Failed(format!("no API key {id}"))),
        }
    }

    fn list_endpoints(&mut self) -> Result<Vec<wire::Endpoint>, Failed> {
        let mut v: Vec<wire::Endpoint> = self
            .0
            .list_endpoints()?
            .into_iter()
            .map(wire::Endpoint::from)
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    fn release_endpoint(&mut self, name: &str) -> Result<wire::EndpointRelease, Failed> {
        match self.0.release_endpoint(name)? {
            Some(owner) => {
                self.0.record(
                    &NewEvent::new(EventKind::EndpointReleased)
                        .endpoint(name)
                        .token(&owner)
                        .detail("offline"),
                )?;
                Ok(wire::EndpointRelease {
                    name: name.to_owned(),
                    released_from: owner.to_string(),
                })
            }
            None => Err(Failed(format!("endpoint {name:?} has no owner"))),
        }
    }

    fn list_sessions(&mut self, _: Option<&TokenId>) -> Result<Vec<wire::Session>, Failed> {
        Err(Failed(
            "session list: sessions live in the running edge, not in the store; run it without --offline".into(),
        ))
    }

    fn list_events(&mut self, f: &EventFilter) -> Result<Vec<wire::Event>, Failed> {
        let q = EventQuery {
            kind: f.kind,
            token: f.token.clone(),
            since_ms: f.since_ms,
            before: None,
            after: None,
            limit: f.limit,
        };
        Ok(self.0.events(&q)?.iter().map(wire::Event::from).collect())
    }

    fn health(&mut self) -> Result<wire::Health, Failed> {
        Err(Failed(
            "status: the health of the running edge comes from its API; run it without --offline"
                .into(),
        ))
    }
}
