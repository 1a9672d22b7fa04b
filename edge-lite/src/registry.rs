//! Who holds what: the live agent sessions (after `Welcome`) with their
//! token, the endpoint bindings (endpoint name -> session, public URL and,
//! for tcp endpoints, the port and its accept task), the revoked token ids
//! the server knows of, and the tcp ports in use.
//!
//! Everything here is plain data behind one `std::sync::Mutex` in the
//! server: no call awaits, so the lock is never held across a suspension.
//! It decides; `agent` and `public` act on the decisions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use smol::Task;
use tether_driver::Session;
use tether_proto::EndpointKind;

use crate::agent::AgentConn;
use crate::store::TokenId;

/// A tcp endpoint's public port and the task that accepts on it (cancelled,
/// closing the port, when the binding is dropped).
pub(crate) struct TcpPort {
    pub(crate) port: u16,
    pub(crate) task: Task<()>,
}

/// One bound endpoint.
pub(crate) struct Binding {
    pub(crate) conn: Arc<AgentConn>,
    pub(crate) token: TokenId,
    pub(crate) kind: EndpointKind,
    pub(crate) url: String,
    pub(crate) tcp: Option<TcpPort>,
}

/// The registry; see the module docs.
#[derive(Default)]
pub(crate) struct Registry {
    endpoints: HashMap<String, Binding>,
    live: HashMap<u64, (TokenId, Arc<AgentConn>)>,
    revoked: HashSet<TokenId>,
    ports: HashSet<u16>,
}

/// What [`Registry::admit`] decided.
pub(crate) enum Admission {
    /// The session is live.
    Admitted,
    /// The token was revoked meanwhile.
    Revoked,
}

impl Registry {
    /// A registry that knows these revoked tokens.
    pub(crate) fn new(revoked: HashSet<TokenId>) -> Registry {
        Registry {
            revoked,
            ..Registry::default()
        }
    }

    /// Makes a session live under `token`, unless the token is known revoked.
    /// Checked under the same lock that [`Registry::set_revoked`] takes, so a
    /// revocation is either seen here or closes the session there.
    pub(crate) fn admit(&mut self, token: &TokenId, conn: &Arc<AgentConn>) -> Admission {
        if self.revoked.contains(token) {
            return Admission::Revoked;
        }
        self.live.insert(conn.no(), (token.clone(), conn.clone()));
        Admission::Admitted
    }

    /// Replaces the set of revoked ids. Returns the ids new to the set, and
    /// the live sessions of any revoked token (taken out of the live set).
    pub(crate) fn set_revoked(
        &mut self,
        ids: HashSet<TokenId>,
    ) -> (Vec<TokenId>, Vec<(TokenId, Arc<AgentConn>)>) {
        let mut fresh: Vec<TokenId> = ids.difference(&self.revoked).cloned().collect();
        fresh.sort();
        self.revoked = ids;
        let doomed: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, (t, _))| self.revoked.contains(t))
            .map(|(n, _)| *n)
            .collect();
        let victims = doomed
            .into_iter()
            .filter_map(|n| self.live.remove(&n))
            .collect();
        (fresh, victims)
    }

    /// Whether session `no` is live (admitted, and its token not revoked since).
    pub(crate) fn is_live(&self, no: u64) -> bool {
        self.live.contains_key(&no)
    }

    /// The binding of `endpoint`, mutably.
    pub(crate) fn get_mut(&mut self, endpoint: &str) -> Option<&mut Binding> {
        self.endpoints.get_mut(endpoint)
    }

    /// Adds a binding (the endpoint must be free).
    pub(crate) fn insert(&mut self, endpoint: String, b: Binding) {
        if let Some(t) = &b.tcp {
            self.ports.insert(t.port);
        }
        self.endpoints.insert(endpoint, b);
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

    /// Whether the edge holds `port` for some endpoint.
    pub(crate) fn port_in_use(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// The session to carry a new public connection to `endpoint` of `kind`.
    pub(crate) fn route(&self, endpoint: &str, kind: EndpointKind) -> Option<Session> {
        let b = self.endpoints.get(endpoint)?;
        // A session whose token was revoked leaves the live set at once, before
        // its GOAWAY takes effect: it gets no new public connections.
        (b.kind == kind && self.is_live(b.conn.no())).then(|| b.conn.session().clone())
    }

    /// Forgets session `no`: it leaves the live set and every endpoint it
    /// still holds is unbound. Returns the unbound endpoints (sorted) with
    /// their bindings, whose drop closes their ports.
    pub(crate) fn remove_session(&mut self, no: u64) -> Vec<(String, Binding)> {
        self.live.remove(&no);
        let mut names: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, b)| b.conn.no() == no)
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| self.remove(&n).map(|b| (n, b)))
            .collect()
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
