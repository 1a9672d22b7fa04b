//! Deciding a `Bind`: the endpoint name rule, the token's bind rules (the
//! session's scope as the registry holds it now, not as it was at `Hello`), the
//! agent's declared policy (parsed and combined with the edge's layers into
//! the endpoint's effective policy; a TLS server built for it once, here),
//! the session's endpoint limit, endpoint ownership (the first token to bind an
//! endpoint owns it, in the store, until an operator releases it), the
//! choice of a tcp port, and the registry update, with the takeover of a
//! binding by a newer session of the same token.
//!
//! A tcp port is chosen and bound outside the registry lock (trying a range
//! of ports makes one system call each); the registry is then checked again
//! before the binding goes in. The caller (`agent`) answers the agent.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use smol::net::TcpListener;
use tether_proto::{EndpointKind, ErrorCode};

use rustls::ServerConfig;

use crate::config::TcpConfig;
use crate::policy::{self, Carriage, Effective, InlineOnly, Layer, Policy, PolicyDoc};
use crate::public;
use crate::registry::{Binding, TcpPort, Tunnel};
use crate::state::State;
use crate::store::{Claim, TokenId};
use crate::tls;

/// A refused bind: the code, the rule that refused it and why.
#[derive(Debug)]
pub(crate) struct BindRefusal {
    pub(crate) code: ErrorCode,
    pub(crate) rule: String,
    pub(crate) message: String,
}

fn refused(code: ErrorCode, rule: impl Into<String>, message: impl Into<String>) -> BindRefusal {
    BindRefusal {
        code,
        rule: rule.into(),
        message: message.into(),
    }
}

/// A bind that succeeded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    /// The endpoint is now served by this session at this URL (new, taken
    /// over from an older session of the same token, or rebuilt for another kind).
    Changed(String),
    /// This session already held it with that kind: nothing changed.
    Unchanged(String),
}

/// What the registry said before any port was bound.
enum Plan {
    Unchanged(String),
    /// Same token, same kind, another session: move the binding over.
    TakeOver,
    /// A new binding (or a rebuild for another kind): needs a URL and maybe a port.
    Build,
}

/// Decides a `Bind` from session `tunnel` and updates the registry.
pub(crate) async fn bind(
    state: &Arc<State>,
    tunnel: &Arc<Tunnel>,
    endpoint: &str,
    kind: EndpointKind,
    policy: &str,
) -> Result<Bound, BindRefusal> {
    let token = &tunnel.token;
    let rule = check_request(state, tunnel, endpoint, kind)?;
    let (policy, server) = effective_policy(state, endpoint, kind, policy)?;
    let rule = || rule.clone();

    // Ownership: from the registry's cache, else claimed in the store (a
    // bind of another kind than the binding held is recorded too, for
    // `endpoint list`).
    let (known_owner, same_kind) = {
        let reg = state.registry();
        let same = reg
            .get(endpoint)
            .is_some_and(|b| b.tunnel.token == tunnel.token && b.kind == kind);
        (reg.owner(endpoint).cloned(), same)
    };
    match known_owner {
        Some(owner) if owner != *token => return Err(taken(endpoint, &owner)),
        Some(_) if same_kind => {}
        _ => {
            let (name, id, kind) = (endpoint.to_owned(), token.clone(), kind_name(kind));
            match state
                .store_call(move |s| s.claim_endpoint(&name, &id, kind))
                .await
            {
                Ok(Claim::Owner) => state.registry().set_owner(endpoint, token),
                Ok(Claim::OwnedBy(owner)) => {
                    state.registry().set_owner(endpoint, &owner);
                    return Err(taken(endpoint, &owner));
                }
                Err(e) => {
                    log::error!("endpoint {endpoint}: cannot record its owner: {e}");
                    return Err(refused(
                        ErrorCode::SERVER_BUSY,
                        "store",
                        "the edge cannot record the endpoint's owner now; retry",
                    ));
                }
            }
        }
    }

    let plan = {
        let mut reg = state.registry();
        if !reg.is_live(tunnel.no) {
            return Err(refused(
                ErrorCode::TOKEN_REVOKED,
                rule(),
                "this session is closing (revoked, evicted or draining)",
            ));
        }
        match reg.get_mut(endpoint) {
            Some(b) if b.tunnel.no == tunnel.no && b.kind == kind => {
                // The same binding again: its (possibly new) policy applies
                // from the next connection on.
                b.policy = policy.clone();
                b.server = server.clone();
                Plan::Unchanged(b.url.clone())
            }
            Some(b) if b.tunnel.token != tunnel.token => {
                return Err(refused(
                    ErrorCode::ENDPOINT_TAKEN,
                    format!("endpoint {endpoint}"),
                    "another token's session holds this endpoint",
                ));
            }
            Some(b) if b.kind == kind => Plan::TakeOver,
            Some(_) => Plan::Build,
            None => {
                let limit = state.cfg.limits.endpoints_per_session;
                if reg.bound_by(tunnel.no) >= limit {
                    return Err(refused(
                        ErrorCode::BIND_REFUSED,
                        "limits.endpoints_per_session",
                        format!("a session may bind at most {limit} endpoints"),
                    ));
                }
                Plan::Build
            }
        }
    };
    match plan {
        Plan::Unchanged(url) => return Ok(Bound::Unchanged(url)),
        Plan::TakeOver => {
            let mut reg = state.registry();
            if let Some(b) = reg.get_mut(endpoint) {
                if b.tunnel.token == tunnel.token && b.kind == kind {
                    let old = std::mem::replace(&mut b.tunnel, tunnel.clone());
                    b.policy = policy.clone();
                    b.server = server.clone();
                    let url = b.url.clone();
                    drop(reg);
                    log::info!(
                        "endpoint {endpoint}: session {} replaces session {} (same token)",
                        tunnel.no,
                        old.no
                    );
                    if old.no != tunnel.no {
                        old.session.goaway(ErrorCode::NO_ERROR);
                    }
                    return Ok(Bound::Changed(url));
                }
            }
            // It changed meanwhile: build it afresh below.
        }
        Plan::Build => {}
    }

    // A URL, and for tcp a port, bound without holding the registry lock.
    let (url, tcp) = match kind {
        EndpointKind::Tls | EndpointKind::TlsPassthrough => {
            let domain = state.cfg.tls.as_ref().map_or("", |t| t.domain.as_str());
            (
                format!("tls://{endpoint}.{domain}:{}", state.tls_port),
                None,
            )
        }
        EndpointKind::Tcp => {
            let Some(cfg) = &state.cfg.tcp else {
                return Err(no_listener("[tcp]"));
            };
            let in_use = state.registry().ports();
            let (listener, port) = bind_tcp(cfg, endpoint, |p| in_use.contains(&p))?;
            (tcp_url(cfg, port), Some((listener, port)))
        }
    };

    let mut reg = state.registry();
    if !reg.is_live(tunnel.no) {
        return Err(refused(
            ErrorCode::TOKEN_REVOKED,
            rule(),
            "this session is closing (revoked, evicted or draining)",
        ));
    }
    if let Some(b) = reg.get(endpoint) {
        if b.tunnel.token != tunnel.token {
            return Err(refused(
                ErrorCode::ENDPOINT_TAKEN,
                format!("endpoint {endpoint}"),
                "another token's session holds this endpoint",
            ));
        }
    }
    let tcp = tcp.map(|(listener, port)| TcpPort {
        port,
        task: crate::state::spawn(public::accept_tcp(
            Arc::downgrade(state),
            endpoint.to_owned(),
            listener,
        )),
    });
    let replaced = reg.insert(
        endpoint.to_owned(),
        Binding {
            tunnel: tunnel.clone(),
            kind,
            url: url.clone(),
            tcp,
            waiting: Arc::new(AtomicUsize::new(0)),
            policy,
            server,
            traffic: Default::default(),
            since: crate::store::unix_now(),
        },
    );
    drop(reg);
    if let Some(old) = replaced {
        if old.tunnel.no != tunnel.no {
            old.tunnel.session.goaway(ErrorCode::NO_ERROR);
        }
    }
    Ok(Bound::Changed(url))
}

/// The endpoint's effective policy: the edge's layers for `endpoint` and
/// the agent's declared `policy` (TOML; empty = none), combined for `kind`,
/// with the TLS server its plan needs (`None`: the shared one).
fn effective_policy(
    state: &State,
    endpoint: &str,
    kind: EndpointKind,
    policy: &str,
) -> Result<(Arc<Effective>, Option<Arc<ServerConfig>>), BindRefusal> {
    let agent = if policy.trim().is_empty() {
        None
    } else {
        let doc: PolicyDoc = toml::from_str(policy).map_err(|e| {
            let (_, field) = tether_conf::locate_error(policy, &e);
            let reason = e.message().lines().next().unwrap_or("invalid").to_owned();
            refused(
                ErrorCode::BIND_REFUSED,
                format!("traffic_policy.{field}"),
                format!("the declared traffic_policy does not parse: {reason}"),
            )
        })?;
        let p = Policy::from_doc(&doc, &InlineOnly).map_err(|e| {
            refused(
                ErrorCode::BIND_REFUSED,
                format!("traffic_policy.{}", e.field),
                e.reason,
            )
        })?;
        Some(p)
    };
    let layers = state.cfg.policies.layers_for(endpoint);
    let mut refs: Vec<(Layer, &Policy)> = layers.iter().map(|(l, p)| (l.clone(), &**p)).collect();
    if let Some(a) = &agent {
        refs.push((Layer::Agent, a));
    }
    let carriage = match kind {
        EndpointKind::Tls => Carriage::Terminated,
        EndpointKind::Tcp => Carriage::Raw("tcp"),
        EndpointKind::TlsPassthrough => Carriage::Raw("tls-passthrough"),
    };
    let eff = policy::combine(&refs, carriage)
        .map_err(|c| refused(ErrorCode::BIND_REFUSED, c.rule, c.message))?;
    let server = match (&eff.tls, &state.public_identity) {
        (Some(plan), Some(id)) if !plan.is_default() => {
            Some(tls::endpoint_server(id, plan).map_err(|e| {
                refused(
                    ErrorCode::BIND_REFUSED,
                    "traffic_policy",
                    format!("the endpoint's TLS cannot be served: {e}"),
                )
            })?)
        }
        _ => None,
    };
    Ok((Arc::new(eff), server))
}

/// The checks before ownership: the session, the name, the token's bind
/// rules (from the registry: the scope the session works under now), and
/// that the edge serves `kind`. Returns the rule that allows the endpoint,
/// as `token tk_<id> bind=<rule>`.
fn check_request(
    state: &State,
    tunnel: &Tunnel,
    endpoint: &str,
    kind: EndpointKind,
) -> Result<String, BindRefusal> {
    if tunnel.session.is_closing() {
        return Err(refused(
            ErrorCode::BIND_REFUSED,
            "session",
            "this session is draining; reconnect",
        ));
    }
    if !tether_proto::valid_endpoint_name(endpoint) {
        return Err(refused(
            ErrorCode::BIND_REFUSED,
            "endpoint name",
            "an endpoint name is DNS labels (1-63 lowercase letters, digits or inner '-') \
             joined by '.', at most 127 bytes",
        ));
    }
    let Some(scope) = state.registry().scope_of(tunnel.no) else {
        return Err(refused(
            ErrorCode::TOKEN_REVOKED,
            format!("token {}", tunnel.token),
            "this session is closing (revoked, evicted or draining)",
        ));
    };
    let Some(allowing) = scope.rules.permitting(endpoint) else {
        return Err(refused(
            ErrorCode::BIND_REFUSED,
            format!("token {} bind={}", tunnel.token, scope.rules),
            format!("no bind rule of the token allows endpoint {endpoint}"),
        ));
    };
    let rule = format!("token {} bind={allowing}", tunnel.token);
    match kind {
        EndpointKind::Tls | EndpointKind::TlsPassthrough => {
            let Some(tls) = &state.cfg.tls else {
                return Err(no_listener("[tls]"));
            };
            // Published as `<endpoint>.<domain>`: a DNS name of 253 at most.
            if endpoint.len() + 1 + tls.domain.len() > 253 {
                return Err(refused(
                    ErrorCode::BIND_REFUSED,
                    "endpoint name",
                    format!(
                        "{endpoint}.{} would be longer than a DNS name (253)",
                        tls.domain
                    ),
                ));
            }
            Ok(rule)
        }
        EndpointKind::Tcp if state.cfg.tcp.is_none() => Err(no_listener("[tcp]")),
        EndpointKind::Tcp => Ok(rule),
    }
}

/// `tcp` or `tls`.
pub(crate) fn kind_name(kind: EndpointKind) -> &'static str {
    match kind {
        EndpointKind::Tcp => "tcp",
        EndpointKind::Tls => "tls",
        EndpointKind::TlsPassthrough => "tls-passthrough",
    }
}

fn no_listener(table: &str) -> BindRefusal {
    refused(
        ErrorCode::BIND_REFUSED,
        "edge config",
        format!("this edge has no {table} listener"),
    )
}

fn taken(endpoint: &str, owner: &TokenId) -> BindRefusal {
    refused(
        ErrorCode::ENDPOINT_TAKEN,
        format!("endpoint {endpoint} owned by token {owner}"),
        "another token owns this endpoint; an operator can release it \
         (tether-edge endpoint release NAME)",
    )
}

/// Binds the public port of tcp endpoint `endpoint`: its fixed port, else
/// the first free one of `port_range` (skipping ports `in_use` and every
/// fixed port), else (range `[0, 0]`) one the OS picks.
fn bind_tcp(
    tcp: &TcpConfig,
    endpoint: &str,
    in_use: impl Fn(u16) -> bool,
) -> Result<(TcpListener, u16), BindRefusal> {
    let port_refusal =
        |rule: String, message: String| refused(ErrorCode::BIND_REFUSED, rule, message);
    let listen = |port: u16| -> io::Result<(TcpListener, u16)> {
        let l = std::net::TcpListener::bind(SocketAddr::new(tcp.listen_ip, port))?;
        let port = l.local_addr()?.port();
        Ok((TcpListener::try_from(l)?, port))
    };
    if let Some(&port) = tcp.fixed.get(endpoint) {
        return listen(port).map_err(|e| {
            port_refusal(format!("tcp.fixed.{endpoint}"), format!("port {port}: {e}"))
        });
    }
    if tcp.port_range.is_os_chosen() {
        return listen(0).map_err(|e| {
            port_refusal("tcp.port_range".into(), format!("no port from the OS: {e}"))
        });
    }
    let r = tcp.port_range;
    let mut last_error = None;
    for p in r.first..=r.last {
        if in_use(p) || tcp.fixed.values().any(|f| *f == p) {
            continue;
        }
        match listen(p) {
            Ok(l) => return Ok(l),
            // Out of file descriptors: no other port will do better.
            Err(e) if e.raw_os_error() == Some(24) || e.raw_os_error() == Some(23) => {
                return Err(port_refusal(
                    "tcp.port_range".into(),
                    format!("cannot open a port: {e}"),
                ))
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(port_refusal(
        "tcp.port_range".into(),
        match last_error {
            Some(e) => format!("no free port in {}-{} (last: {e})", r.first, r.last),
            None => format!("no free port in {}-{}", r.first, r.last),
        },
    ))
}

/// A tcp endpoint's URL: `tcp://<public_host or listen_ip>:<port>`.
fn tcp_url(tcp: &TcpConfig, port: u16) -> String {
    let host = tcp
        .public_host
        .clone()
        .unwrap_or_else(|| tcp.listen_ip.to_string());
    match host.parse::<IpAddr>() {
        Ok(ip) => format!("tcp://{}", SocketAddr::new(ip, port)),
        Err(_) => format!("tcp://{host}:{port}"),
    }
}
