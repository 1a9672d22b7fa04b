//! Who holds what: the live agent sessions ([`Tunnel`]s, after `Welcome`)
//! with their token and that token's scope as the edge last heard of it
//! (the per-session cache that `route` checks at every stream open and
//! `bind` at every `Bind`; [`Registry::apply_changes`] replaces it when the
//! store says the token changed), the endpoint bindings (endpoint name -> tunnel, public
//! URL and, for tcp endpoints, the port and its accept task), the owners of
//! endpoints (a cache of the store's), the revoked token ids the server knows
//! of, and the tcp ports in use.
//!
//! Everything here is plain data behind one `std::sync::Mutex` in the
//! server's state: no call awaits and none does I/O, so the lock is never
//! held across a suspension or a system call. It decides; the agent, bind
//! and public modules act on the decisions. It imports only the store's
//! types and the driver's session handle.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::ServerConfig;
use smol::Task;
use tether_driver::Session;
use tether_proto::EndpointKind;

use crate::metrics::{Meter, Traffic};
use crate::policy::Effective;
use crate::scope::Scope;
use crate::store::{TokenChange, TokenId};

/// One agent session as the rest of the edge sees it.
#[derive(Debug)]
pub(crate) struct Tunnel {
    /// The session number (as in `Welcome`); increases with each session.
    pub(crate) no: u64,
    /// The agent's address.
    pub(crate) peer: SocketAddr,
    /// The verified token it authenticated with.
    pub(crate) token: TokenId,
    /// The driver's handle.
    pub(crate) session: Session,
    /// The agent's name and version, and its architecture, from `Hello`
    /// (at most 64 characters each).
    pub(crate) agent: String,
    pub(crate) arch: String,
    /// Unix seconds when it authenticated.
    pub(crate) since: i64,
    /// Bytes its streams carried.
    pub(crate) traffic: Arc<Traffic>,
    /// The rotation offer made on this session (at most one).
    pub(crate) offer: Offer,
}

/// The one rotation offer a session may get (`rotation::offer`).
#[derive(Debug, Default)]
pub(crate) struct Offer {
    claimed: std::sync::atomic::AtomicBool,
    successor: std::sync::Mutex<Option<TokenId>>,
}

impl Offer {
    /// True the first time only: the caller makes the offer.
    pub(crate) fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::SeqCst)
    }

    /// The successor offered, once it was sent.
    pub(crate) fn set_successor(&self, id: TokenId) {
        *self.successor.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
    }

    /// The successor offered, if any.
    pub(crate) fn successor(&self) -> Option<TokenId> {
        self.successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A tcp endpoint's public port and the task that accepts on it (cancelled,
/// closing the port, when the binding is dropped).
pub(crate) struct TcpPort {
    pub(crate) port: u16,
    pub(crate) task: Task<()>,
}

/// One bound endpoint.
pub(crate) struct Binding {
    pub(crate) tunnel: Arc<Tunnel>,
    pub(crate) kind: EndpointKind,
    pub(crate) url: String,
    pub(crate) tcp: Option<TcpPort>,
    /// Public connections waiting for a stream of this endpoint.
    pub(crate) waiting: Arc<AtomicUsize>,
    /// Its effective policy (the edge's layers and its agent's).
    pub(crate) policy: Arc<Effective>,
    /// For a `tls` endpoint whose policy needs its own TLS server (versions,
    /// certificate, client certificates): that server, built at bind.
    /// `None`: the shared `[tls]` one.
    pub(crate) server: Option<Arc<ServerConfig>>,
    /// Bytes its connections carried.
    pub(crate) traffic: Arc<Traffic>,
    /// Unix seconds of the `Bind`.
    pub(crate) since: i64,
}

/// Which listener a public connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Port {
    /// The endpoint's own tcp port.
    Tcp,
    /// The shared TLS port (terminated and passthrough endpoints).
    Tls,
}

impl Port {
    fn serves(self, kind: EndpointKind) -> bool {
        match self {
            Port::Tcp => kind == EndpointKind::Tcp,
            Port::Tls => matches!(kind, EndpointKind::Tls | EndpointKind::TlsPassthrough),
        }
    }
}

/// Where a public connection goes: the session, its place among the
/// waiting, and what the binding's policy says.
pub(crate) struct Route {
    pub(crate) session: Session,
    pub(crate) meter: Meter,
    pub(crate) waiting: Waiting,
    pub(crate) kind: EndpointKind,
    pub(crate) policy: Arc<Effective>,
    pub(crate) server: Option<Arc<ServerConfig>>,
}

/// A live session and its token's scope.
struct Live {
    tunnel: Arc<Tunnel>,
    scope: Arc<Scope>,
}

/// What [`Registry::apply_changes`] took away, for the caller to act on.
#[derive(Default)]
pub(crate) struct Applied {
    /// Tokens revoked by the changes (new to the revoked set).
    pub(crate) revoked: Vec<TokenId>,
    /// Sessions to close, and why. Out of the live set already.
    pub(crate) closed: Vec<(Arc<Tunnel>, Close)>,
    /// Live sessions of tokens an operator asked to rotate: each is
    /// offered a successor (once per session).
    pub(crate) rotate: Vec<Arc<Tunnel>>,
    /// Bindings the new rules no longer allow, with their session and the
    /// new scope: unbound already; their drop closes their ports.
    pub(crate) unbound: Vec<(String, Binding, Arc<Scope>)>,
}

/// Why [`Registry::apply_changes`] took a session out of the live set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Close {
    /// Its token was revoked: `Error(TOKEN_REVOKED)`, then `GOAWAY`.
    Revoked,
    /// Its token may no longer connect from its address.
    Source,
    /// A rotation retired its token: the device has a session with the
    /// successor already, so this one is drained (`GOAWAY(NO_ERROR)`).
    Retired,
}

/// The registry; see the module docs.
#[derive(Default)]
pub(crate) struct Registry {
    endpoints: HashMap<String, Binding>,
    live: HashMap<u64, Live>,
    /// Bumped by every [`Registry::apply_changes`]: a session verified
    /// before a bump re-reads its scope before it goes live.
    generation: u64,
    revoked: HashSet<TokenId>,
    owners: HashMap<String, TokenId>,
    ports: HashSet<u16>,
}

/// Why [`Registry::admit`] refused a session.
#[derive(Debug)]
pub(crate) struct Revoked;

/// Why [`Registry::route`] found no session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoRoute {
    /// No live session serves the endpoint with that kind.
    Unbound,
    /// `public_waiting_per_endpoint` connections already wait for a stream.
    Full,
}

/// A public connection counted among its endpoint's waiting ones until
/// dropped (once its stream is open, or it gave up).
#[derive(Debug)]
pub(crate) struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    /// A registry that knows these revoked tokens and endpoint owners.
    pub(crate) fn new(revoked: HashSet<TokenId>, owners: HashMap<String, TokenId>) -> Registry {
        Registry {
            revoked,
            owners,
            ..Registry::default()
        }
    }

    /// Makes a session live, unless its token is known revoked. Checked under
    /// the same lock that [`Registry::set_revoked`] takes, so a revocation is
    /// either seen here or closes the session there. Past `per_token` live
    /// sessions of the token, the oldest are taken out of the live set and
    /// returned, for the caller to close.
    pub(crate) fn admit(
        &mut self,
        tunnel: &Arc<Tunnel>,
        scope: Arc<Scope>,
        per_token: usize,
    ) -> Result<Vec<Arc<Tunnel>>, Revoked> {
        if self.revoked.contains(&tunnel.token) {
            return Err(Revoked);
        }
        self.live.insert(
            tunnel.no,
            Live {
                tunnel: tunnel.clone(),
                scope,
            },
        );
        let mut same: Vec<u64> = self
            .live
            .values()
            .filter(|l| l.tunnel.token == tunnel.token)
            .map(|l| l.tunnel.no)
            .collect();
        if same.len() <= per_token {
            return Ok(Vec::new());
        }
        same.sort_unstable();
        let excess = same.len() - per_token;
        Ok(same[..excess]
            .iter()
            .filter_map(|no| self.live.remove(no).map(|l| l.tunnel))
            .collect())
    }

    /// The count of [`Registry::apply_changes`] calls so far.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The scope session `no` works under now, if it is live.
    pub(crate) fn scope_of(&self, no: u64) -> Option<Arc<Scope>> {
        self.live.get(&no).map(|l| l.scope.clone())
    }

    /// Applies tokens' changes from the store to the live sessions: a
    /// revoked token's sessions leave the live set; a session whose address
    /// the new sources refuse leaves it too; otherwise the session's scope is
    /// replaced and every endpoint it holds that the new rules do not allow
    /// is unbound. Bumps the generation.
    pub(crate) fn apply_changes(&mut self, changes: Vec<TokenChange>) -> Applied {
        self.generation += 1;
        let mut out = Applied::default();
        let mut scopes: HashMap<TokenId, Arc<Scope>> = HashMap::new();
        let mut retired: HashSet<TokenId> = HashSet::new();
        let mut rotating: HashSet<TokenId> = HashSet::new();
        for c in changes {
            if c.replaced_by.is_some() {
                retired.insert(c.id.clone());
            }
            if c.rotation_requested {
                rotating.insert(c.id.clone());
            }
            if c.revoked {
                if self.revoked.insert(c.id.clone()) {
                    out.revoked.push(c.id.clone());
                }
                scopes.remove(&c.id);
            } else {
                scopes.insert(c.id, Arc::new(c.scope));
            }
        }
        let mut nos: Vec<u64> = self.live.keys().copied().collect();
        nos.sort_unstable();
        for no in nos {
            let Some(l) = self.live.get_mut(&no) else {
                continue;
            };
            let token = l.tunnel.token.clone();
            if self.revoked.contains(&token) {
                if let Some(l) = self.live.remove(&no) {
                    let why = if retired.contains(&token) {
                        Close::Retired
                    } else {
                        Close::Revoked
                    };
                    out.closed.push((l.tunnel, why));
                }
                continue;
            }
            if rotating.contains(&token) {
                out.rotate.push(l.tunnel.clone());
            }
            let Some(scope) = scopes.get(&token) else {
                continue;
            };
            if !scope.admits(l.tunnel.peer.ip()) {
                if let Some(l) = self.live.remove(&no) {
                    out.closed.push((l.tunnel, Close::Source));
                }
                continue;
            }
            l.scope = scope.clone();
            let mut names: Vec<String> = self
                .endpoints
                .iter()
                .filter(|(n, b)| b.tunnel.no == no && scope.rules.permitting(n).is_none())
                .map(|(n, _)| n.clone())
                .collect();
            names.sort();
            for n in names {
                if let Some(b) = self.remove(&n) {
                    out.unbound.push((n, b, scope.clone()));
                }
            }
        }
        out
    }

    /// Replaces the cache of endpoint owners (after the store changed).
    pub(crate) fn set_owners(&mut self, owners: HashMap<String, TokenId>) {
        self.owners = owners;
    }

    /// The token that owns `endpoint`, if one does.
    pub(crate) fn owner(&self, endpoint: &str) -> Option<&TokenId> {
        self.owners.get(endpoint)
    }

    /// Records `token` as `endpoint`'s owner (the store has it already).
    pub(crate) fn set_owner(&mut self, endpoint: &str, token: &TokenId) {
        self.owners.insert(endpoint.to_owned(), token.clone());
    }

    /// Whether session `no` is live (admitted, and not revoked or evicted since).
    pub(crate) fn is_live(&self, no: u64) -> bool {
        self.live.contains_key(&no)
    }

    /// How many endpoints session `no` holds.
    pub(crate) fn bound_by(&self, no: u64) -> usize {
        self.endpoints
            .values()
            .filter(|b| b.tunnel.no == no)
            .count()
    }

    /// The binding of `endpoint`.
    pub(crate) fn get(&self, endpoint: &str) -> Option<&Binding> {
        self.endpoints.get(endpoint)
    }

    /// The binding of `endpoint`, mutably.
    pub(crate) fn get_mut(&mut self, endpoint: &str) -> Option<&mut Binding> {
        self.endpoints.get_mut(endpoint)
    }

    /// Adds a binding, returning the one it replaces (whose drop closes its port).
    pub(crate) fn insert(&mut self, endpoint: String, b: Binding) -> Option<Binding> {
        let old = self.remove(&endpoint);
        if let Some(t) = &b.tcp {
            self.ports.insert(t.port);
        }
        self.endpoints.insert(endpoint, b);
        old
    }

    /// Removes a binding; its tcp port (if any) is free again once its task is
    /// cancelled, which the returned binding's drop does.
    pub(crate) fn remove(&mut self, endpoint: &str) -> Option<Binding> {
        let b = self.endpoints.remove(endpoint)?;
        if let Some(t) = &b.tcp {
            self.ports.remove(&t.port);
        }
        Some(b)
    }

    /// The tcp ports the edge holds now (to choose a free one outside the lock).
    pub(crate) fn ports(&self) -> HashSet<u16> {
        self.ports.clone()
    }

    /// The session to carry a new public connection of `port` to
    /// `endpoint`, with the connection counted among those waiting for a
    /// stream (at most `waiting_limit`).
    pub(crate) fn route(
        &self,
        endpoint: &str,
        port: Port,
        waiting_limit: usize,
    ) -> Result<Route, NoRoute> {
        let b = self.endpoints.get(endpoint).ok_or(NoRoute::Unbound)?;
        // A session whose token was revoked leaves the live set at once, before
        // its GOAWAY takes effect: it gets no new public connections.
        let Some(live) = self.live.get(&b.tunnel.no) else {
            return Err(NoRoute::Unbound);
        };
        if !port.serves(b.kind) || b.tunnel.session.is_closing() {
            return Err(NoRoute::Unbound);
        }
        // The token's rules, as the edge knows them now, are checked at
        // every stream open, not only at the Bind.
        if live.scope.rules.permitting(endpoint).is_none() {
            return Err(NoRoute::Unbound);
        }
        let taken = b
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < waiting_limit).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Route {
                session: b.tunnel.session.clone(),
                meter: Meter {
                    session: b.tunnel.traffic.clone(),
                    endpoint: b.traffic.clone(),
                },
                waiting: Waiting(b.waiting.clone()),
                kind: b.kind,
                policy: b.policy.clone(),
                server: b.server.clone(),
            }),
            Err(_) => Err(NoRoute::Full),
        }
    }

    /// Forgets session `no`: it leaves the live set and every endpoint it
    /// still holds is unbound. Returns the unbound endpoints (sorted) with
    /// their bindings, whose drop closes their ports.
    pub(crate) fn remove_session(&mut self, no: u64) -> Vec<(String, Binding)> {
        self.live.remove(&no);
        let mut names: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, b)| b.tunnel.no == no)
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| self.remove(&n).map(|b| (n, b)))
            .collect()
    }

    /// Every live session with its scope, by session number.
    pub(crate) fn live_sessions(&self) -> Vec<(Arc<Tunnel>, Arc<Scope>)> {
        let mut v: Vec<_> = self
            .live
            .values()
            .map(|l| (l.tunnel.clone(), l.scope.clone()))
            .collect();
        v.sort_by_key(|(t, _)| t.no);
        v
    }

    /// Every binding, by name.
    pub(crate) fn bindings(&self) -> Vec<(&str, &Binding)> {
        let mut v: Vec<_> = self
            .endpoints
            .iter()
            .map(|(n, b)| (n.as_str(), b))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// Takes every tcp accept task out (to stop accepting at shutdown); the
    /// bindings stay, so sessions can still drain.
    pub(crate) fn take_listeners(&mut self) -> Vec<Task<()>> {
        self.ports.clear();
        self.endpoints
            .values_mut()
            .filter_map(|b| b.tcp.take())
            .map(|t| t.task)
            .collect()
    }
}
