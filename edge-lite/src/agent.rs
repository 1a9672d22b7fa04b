//! One agent connection from TCP accept to its end ([`serve_agent`]): the
//! handshake (`handshake`, holding an admission slot), then the session: the
//! multiplexer is allocated only now, for an authenticated agent; it is
//! admitted to the registry (evicting the token's oldest sessions past
//! `limits.sessions_per_token`), answered with `Welcome`, and serves `Bind`s
//! (`bind`) and `Unbind`s until it ends; then whatever it held is unbound.
//!
//! Streams are opened by the edge only (`public`); the multiplexer refuses
//! every stream the agent opens without giving it a slot or credit. Once a
//! session closes, its driver drops the transport at the linger deadline
//! even if the agent stops reading, so the end below always comes.

use std::net::SocketAddr;
use std::sync::Arc;

use smol::net::TcpStream;
use tether_driver::Session;
use tether_proto::{Control, ErrorCode};

use crate::admission::Pending;
use crate::bind::{bind, Bound};
use crate::config::ms;
use crate::events::{EventKind, NewEvent};
use crate::handshake::{authenticate, Authenticated, RETRY_BUSY_MS, RETRY_CREDENTIAL_MS};
use crate::lines::emit;
use crate::metrics::{Gauge, Refusal};
use crate::registry::Tunnel;
use crate::state::{close_tunnel, for_log, State};

/// The edge's name and version, in `Welcome`.
const EDGE_NAME: &str = concat!("tether-edge/", env!("CARGO_PKG_VERSION"));

/// Serves one agent connection until it ends. `pending` is its admission
/// slot, released once its `Hello` is answered.
pub(crate) async fn serve_agent(
    state: Arc<State>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: Pending,
) {
    let accepted = std::time::Instant::now();
    let _ = tcp.set_nodelay(true);
    if let Err(e) = tether_driver::tune_tunnel_socket(&tcp, ms(state.cfg.session.dead_after_ms)) {
        log::debug!("agent socket options: peer={peer}: {e}");
    }
    let held = state.counters.hold(Gauge::PendingHandshakes);
    // Scope changes the registry applies from now on may postdate the
    // scope that `authenticate` reads: `welcome` re-reads it if any came.
    let generation = state.registry().generation();
    let Some((mut tls, auth)) = authenticate(&state, tcp, peer).await else {
        return;
    };
    // An authenticated session reads through a full read-ahead buffer; a
    // connection still in its handshake had none.
    tls.get_mut().0.set_capacity(tether_driver::READ_AHEAD);
    let options = tether_driver::Options {
        linger: ms(state.cfg.session.linger_ms),
        refuse_peer_streams: true,
    };
    let (session, driver) = match Session::new_with(tls, state.cfg.session.mux(), options) {
        Ok(s) => s,
        Err(e) => {
            // Config::load validated these settings; only a hand-built Config gets here.
            log::error!("agent session settings refused: {e}");
            return;
        }
    };
    let tunnel = Arc::new(Tunnel {
        no: state.next_session(),
        peer,
        token: auth.token.id().clone(),
        session,
        agent: auth.agent.clone(),
        arch: auth.arch.clone(),
        since: crate::store::unix_now(),
        traffic: Default::default(),
        offer: Default::default(),
    });
    let driver = crate::state::spawn(driver);
    let mut welcomed_live = false;
    if state.add_tunnel(&tunnel) {
        let welcomed = welcome(&state, &tunnel, &auth, generation).await;
        welcomed_live = welcomed;
        if welcomed {
            state
                .latencies
                .handshake
                .observe(accepted.elapsed().as_secs_f64());
        }
        drop(pending);
        drop(held);
        if welcomed {
            let _live = state.counters.hold(Gauge::Sessions);
            serve_controls(&state, &tunnel).await;
        }
    } else {
        drop(pending);
        tunnel.session.goaway(ErrorCode::NO_ERROR);
    }

    let closed = driver.await;
    if welcomed_live {
        state.event(
            NewEvent::new(EventKind::AgentDisconnected)
                .token(&tunnel.token)
                .session(tunnel.no, tunnel.peer)
                .detail(closed.to_string()),
        );
    }
    if closed.lingered() {
        state.counters.refuse(Refusal::Lingered);
    }
    let gone = state.registry().remove_session(tunnel.no);
    for (name, _) in &gone {
        emit(format!("UNBOUND {name}"));
    }
    drop(gone);
    state.remove_tunnel(tunnel.no);
    log::info!("session {} closed: {closed} (peer={peer})", tunnel.no);
}

/// The token's scope for a session about to go live: the one read at
/// `Hello`, unless the registry applied changes since `generation` (`None`:
/// the store changed the token since, read it again); then
/// the store's (again, until no change came between the read and the
/// admission). Admits the session under that scope. Returns the sessions
/// it evicted and whether a rotation of the token is requested.
async fn admit(
    state: &Arc<State>,
    tunnel: &Arc<Tunnel>,
    auth: &Authenticated,
    mut generation: Option<u64>,
) -> Result<(Vec<Arc<Tunnel>>, bool), ErrorCode> {
    let per_token = state.cfg.limits.sessions_per_token;
    let mut scope = Arc::new(auth.token.scope().clone());
    let mut rotation_requested = auth.token.rotation_requested();
    loop {
        {
            let mut reg = state.registry();
            if generation == Some(reg.generation()) {
                return reg
                    .admit(tunnel, scope, per_token)
                    .map(|evicted| (evicted, rotation_requested))
                    .map_err(|_| ErrorCode::TOKEN_REVOKED);
            }
            generation = Some(reg.generation());
        }
        let id = tunnel.token.to_string();
        match state.store_call(move |s| s.get(&id)).await {
            Ok(Some(t)) if t.revoked_at.is_none() => {
                if !t.scope.admits(tunnel.peer.ip()) {
                    return Err(ErrorCode::AUTH_FAILED);
                }
                rotation_requested = t.rotation_requested_at.is_some();
                scope = Arc::new(t.scope);
            }
            Ok(_) => return Err(ErrorCode::TOKEN_REVOKED),
            Err(e) => {
                log::error!("session {}: cannot re-read its token: {e}", tunnel.no);
                return Err(ErrorCode::SERVER_BUSY);
            }
        }
    }
}

/// Admits the session and sends `Welcome`; false if it is already over.
async fn welcome(
    state: &Arc<State>,
    tunnel: &Arc<Tunnel>,
    auth: &Authenticated,
    generation: u64,
) -> bool {
    let per_token = state.cfg.limits.sessions_per_token;
    // A successor's first Hello retires its predecessor before Welcome;
    // its scope is then the predecessor's, which `admit` reads again.
    let retired = match auth.token.completes() {
        Some(_) => crate::rotation::complete(state, tunnel).await,
        None => None,
    };
    let generation = retired.is_none().then_some(generation);
    let admitted = admit(state, tunnel, auth, generation).await;
    let (evicted, rotation_requested) = match admitted {
        Ok(x) => x,
        Err(code) => {
            // Revoked, or narrowed, between the store's answer and now.
            let (why, message) = match code {
                ErrorCode::TOKEN_REVOKED => (Refusal::RevokedToken, "token revoked"),
                ErrorCode::AUTH_FAILED => (
                    Refusal::TokenSource,
                    "the token may not connect from this address",
                ),
                _ => (Refusal::StoreBusy, "token store unavailable"),
            };
            state.counters.refuse(why);
            let retry = if code == ErrorCode::SERVER_BUSY {
                RETRY_BUSY_MS
            } else {
                RETRY_CREDENTIAL_MS
            };
            close_tunnel(tunnel, code, retry, message).await;
            return false;
        }
    };
    for old in evicted {
        state.counters.refuse(Refusal::SessionEvicted);
        log::info!(
            "session {} of token {} evicted by session {}: more than {per_token} session(s)",
            old.no,
            old.token,
            tunnel.no
        );
        old.session.goaway(ErrorCode::NO_ERROR);
    }
    let sent = tunnel
        .session
        .send_control(&Control::Welcome {
            version: auth.version,
            session: tunnel.no,
            edge: EDGE_NAME,
        })
        .await;
    if sent.is_err() {
        return false;
    }
    state.event(
        NewEvent::new(EventKind::AgentConnected)
            .token(&tunnel.token)
            .session(tunnel.no, tunnel.peer)
            .detail(format!("{} {}", tunnel.agent, tunnel.arch)),
    );
    log::info!(
        "session {} up: token={} agent={:?} arch={:?} version={} peer={}",
        tunnel.no,
        tunnel.token,
        auth.agent,
        auth.arch,
        auth.version,
        tunnel.peer
    );
    if let Some(r) = retired {
        let token_id = r.new.to_string();
        let confirmed = Control::RotateConfirmed {
            token_id: &token_id,
        };
        if tunnel.session.send_control(&confirmed).await.is_err() {
            return false;
        }
    }
    if rotation_requested {
        let (state, tunnel) = (state.clone(), tunnel.clone());
        crate::state::spawn(async move { crate::rotation::offer(&state, &tunnel).await }).detach();
    }
    true
}

/// Serves control messages after `Welcome` until the session ends.
async fn serve_controls(state: &Arc<State>, tunnel: &Arc<Tunnel>) {
    while let Some(bytes) = tunnel.session.recv_control().await {
        let Ok(msg) = Control::decode(&bytes) else {
            continue;
        };
        match msg {
            Control::Bind {
                endpoint,
                kind,
                url: _,
                upstream,
                policy,
            } => {
                let reply = bind(state, tunnel, endpoint, kind, policy).await;
                let sent = match &reply {
                    Ok(Bound::Changed(url)) => {
                        log::info!(
                            "session {}: bound {endpoint} ({kind:?}, upstream {:?}) at {url}",
                            tunnel.no,
                            for_log(upstream)
                        );
                        emit(format!("BOUND {endpoint} {url}"));
                        state.event(
                            NewEvent::new(EventKind::BindAccepted)
                                .token(&tunnel.token)
                                .session(tunnel.no, tunnel.peer)
                                .endpoint(endpoint)
                                .detail(url.clone()),
                        );
                        tunnel
                            .session
                            .send_control(&Control::BindOk { endpoint, url })
                            .await
                    }
                    Ok(Bound::Unchanged(url)) => {
                        log::debug!("session {}: {endpoint} bound again, unchanged", tunnel.no);
                        tunnel
                            .session
                            .send_control(&Control::BindOk { endpoint, url })
                            .await
                    }
                    Err(r) => {
                        state.counters.refuse(Refusal::Bind);
                        state.event(
                            NewEvent::new(EventKind::BindRefused)
                                .token(&tunnel.token)
                                .session(tunnel.no, tunnel.peer)
                                .endpoint(for_log(endpoint))
                                .detail(format!("{}: {}: {}", r.code, r.rule, r.message)),
                        );
                        log::debug!(
                            "session {}: bind {:?} refused: {} ({}): {}",
                            tunnel.no,
                            for_log(endpoint),
                            r.code,
                            r.rule,
                            r.message
                        );
                        tunnel
                            .session
                            .send_control(&Control::BindErr {
                                endpoint,
                                code: r.code.0,
                                rule: &r.rule,
                                message: &r.message,
                            })
                            .await
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            Control::Unbind { endpoint } => {
                let gone = {
                    let mut reg = state.registry();
                    match reg.get(endpoint) {
                        Some(b) if b.tunnel.no == tunnel.no => reg.remove(endpoint),
                        _ => None,
                    }
                };
                if gone.is_some() {
                    log::info!("session {}: unbound {endpoint} (Unbind)", tunnel.no);
                    emit(format!("UNBOUND {endpoint}"));
                } else {
                    log::debug!(
                        "session {}: Unbind {:?}: not held by this session; ignored",
                        tunnel.no,
                        for_log(endpoint)
                    );
                }
                // The binding's drop (outside the lock) closes its port.
                drop(gone);
            }
            Control::RotateStored { token_id } => crate::rotation::stored(tunnel, token_id),
            other => {
                log::warn!(
                    "session {}: unexpected control message {:?}; closing (PROTOCOL)",
                    tunnel.no,
                    control_name(&other)
                );
                tunnel.session.goaway(ErrorCode::PROTOCOL);
            }
        }
    }
}

/// A control message's name, for a log line (never its contents).
fn control_name(c: &Control<'_>) -> &'static str {
    match c {
        Control::Hello { .. } => "Hello",
        Control::Welcome { .. } => "Welcome",
        Control::Error { .. } => "Error",
        Control::Bind { .. } => "Bind",
        Control::BindOk { .. } => "BindOk",
        Control::BindErr { .. } => "BindErr",
        Control::Unbind { .. } => "Unbind",
        _ => "other",
    }
}
