//! One agent connection, from TCP accept to its end: the TLS 1.3 handshake
//! (ALPN `tether/1`), the mux session over the driver, `Hello` -> token check
//! -> `Welcome` or `Error` + `GOAWAY`, then `Bind` handling against the
//! token's allow list, and at the end unbinding whatever the session held.
//!
//! Streams are opened by the edge only (`public`); any stream the agent
//! opens is refused with `RESET(REFUSED_STREAM)`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_rustls::TlsAcceptor;
use smol::net::TcpStream;
use tether_driver::Session;
use tether_proto::{Control, EndpointKind, ErrorCode};

use crate::public;
use crate::registry::{Admission, Binding, TcpPort};
use crate::server::{emit, timeout, State};
use crate::store::{token_id_of, AuthError, VerifiedToken};

/// How long an agent has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent has to send `Hello` after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// `retry_after_ms` for refused credentials (the agent must "back off long").
const RETRY_CREDENTIAL_MS: u32 = 300_000;
/// `retry_after_ms` for a version mismatch.
const RETRY_VERSION_MS: u32 = 3_600_000;
/// `retry_after_ms` when the store cannot answer.
const RETRY_BUSY_MS: u32 = 5_000;
/// The edge's name and version, in `Welcome`.
const EDGE_NAME: &str = concat!("tether-edge/", env!("CARGO_PKG_VERSION"));

/// How long an `Error` may wait for room in the control queue before the
/// session is closed without it.
const ERROR_QUEUE_TIMEOUT: Duration = Duration::from_millis(200);

/// One agent session: the driver's handle and who is on the other end.
pub(crate) struct AgentConn {
    no: u64,
    peer: SocketAddr,
    session: Session,
}

impl AgentConn {
    /// The session number (as in `Welcome`).
    pub(crate) fn no(&self) -> u64 {
        self.no
    }

    /// The driver's session handle.
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// Queues a control message.
    async fn send(&self, msg: &Control<'_>) -> io::Result<()> {
        self.session.send_control(msg).await
    }

    /// Sends `Error{code}` and closes the session with `GOAWAY(code)`. The
    /// mux writes control messages queued before a local close ahead of the
    /// `GOAWAY` (PROTOCOL.md section 7), so the agent always learns why.
    ///
    /// The `Error` waits for room in the control queue at most
    /// [`ERROR_QUEUE_TIMEOUT`]: an agent that stops reading cannot delay its
    /// own revocation; the `GOAWAY` (and the end of every stream) comes anyway.
    pub(crate) async fn close_with(&self, code: ErrorCode, retry_after_ms: u32, message: &str) {
        let error = Control::Error {
            code: code.0,
            retry_after_ms,
            message,
        };
        let _ = timeout(ERROR_QUEUE_TIMEOUT, self.send(&error)).await;
        self.session.goaway(code);
    }
}

/// Serves one agent connection until it ends. `pending` counts it among the
/// connections not yet past `Hello`; it is released after the answer.
pub(crate) async fn serve(
    state: Arc<State>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: smol::lock::SemaphoreGuardArc,
) {
    let _ = tcp.set_nodelay(true);
    let acceptor = TlsAcceptor::from(state.agent_tls.clone());
    let tls = match timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            log::info!("agent tls handshake failed: peer={peer}: {e}");
            return;
        }
        None => {
            log::info!("agent tls handshake timed out: peer={peer}");
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(tether_proto::ALPN) {
        log::info!("agent refused: peer={peer} did not negotiate ALPN tether/1");
        return;
    }
    let (session, driver) = match Session::new(tls, state.cfg.session.mux()) {
        Ok(s) => s,
        Err(e) => {
            // Config::load validated these settings; only a hand-built Config gets here.
            log::error!("agent session settings refused: {e}");
            return;
        }
    };
    let no = state.next_session.fetch_add(1, Ordering::SeqCst);
    let conn = Arc::new(AgentConn { no, peer, session });
    let driver = smol::spawn(driver);
    smol::spawn(refuse_streams(conn.session.clone())).detach();

    if state.add_conn(&conn) {
        let answer = handshake(&state, &conn).await;
        drop(pending);
        match answer {
            Ok(Some(token)) => run_session(&state, &conn, &token).await,
            Ok(None) => {}
            Err(r) => {
                log::warn!(
                    "handshake refused: {} token={} peer={peer}",
                    r.code,
                    r.token_for_log
                );
                conn.close_with(r.code, r.retry_after_ms, &r.message).await;
            }
        }
    } else {
        conn.session.goaway(ErrorCode::NO_ERROR);
    }

    let closed = driver.await;
    let gone = state.registry().remove_session(no);
    for (name, _) in &gone {
        emit(format_args!("UNBOUND {name}"));
    }
    drop(gone);
    state.remove_conn(no);
    log::info!("session {no} closed: {closed} (peer={peer})");
}

/// The agent opens no streams in this protocol version: refuse each.
async fn refuse_streams(session: Session) {
    while let Some(st) = session.accept().await {
        st.reset(ErrorCode::REFUSED_STREAM);
    }
}

/// A refused `Hello`: what to send and what to log.
struct Refusal {
    code: ErrorCode,
    retry_after_ms: u32,
    message: String,
    token_for_log: String,
}

/// Waits for `Hello` and answers it. `Ok(None)`: the session ended or broke
/// the protocol (already handled).
async fn handshake(
    state: &Arc<State>,
    conn: &Arc<AgentConn>,
) -> Result<Option<VerifiedToken>, Refusal> {
    let peer = conn.peer;
    let bytes = match timeout(HELLO_TIMEOUT, conn.session.recv_control()).await {
        Some(Some(b)) => b,
        Some(None) => return Ok(None),
        None => {
            log::info!(
                "agent session {}: no Hello within {HELLO_TIMEOUT:?} (peer={peer})",
                conn.no
            );
            conn.session.goaway(ErrorCode::TIMEOUT);
            return Ok(None);
        }
    };
    let Ok(Control::Hello {
        version,
        min_version,
        token,
        agent,
        arch,
    }) = Control::decode(&bytes)
    else {
        log::info!(
            "agent session {}: first control message is not Hello (peer={peer})",
            conn.no
        );
        conn.session.goaway(ErrorCode::PROTOCOL);
        return Ok(None);
    };
    let token_for_log =
        token_id_of(token.0).map_or_else(|| "malformed".to_owned(), |id| id.to_string());
    let refuse = |code, retry_after_ms, message: String| Refusal {
        code,
        retry_after_ms,
        message,
        token_for_log: token_for_log.clone(),
    };

    let ours = tether_proto::MIN_PROTOCOL_VERSION..=tether_proto::PROTOCOL_VERSION;
    let agreed = version.min(*ours.end());
    if agreed < min_version.max(*ours.start()) {
        return Err(refuse(
            ErrorCode::VERSION_UNSUPPORTED,
            RETRY_VERSION_MS,
            format!(
                "this edge speaks protocol versions {}..={}; the agent speaks {min_version}..={version}",
                ours.start(),
                ours.end()
            ),
        ));
    }

    let store = state.store.clone();
    let presented = crate::store::TokenString::presented(token.0);
    let verified = smol::unblock(move || {
        store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .verify(presented.expose())
    })
    .await;
    let verified = match verified {
        Ok(v) => v,
        Err(AuthError::Malformed) => {
            return Err(refuse(
                ErrorCode::AUTH_FAILED,
                RETRY_CREDENTIAL_MS,
                "malformed token".into(),
            ))
        }
        Err(AuthError::Unknown(_)) => {
            return Err(refuse(
                ErrorCode::AUTH_FAILED,
                RETRY_CREDENTIAL_MS,
                "unknown token".into(),
            ))
        }
        Err(AuthError::Revoked(_)) => {
            return Err(refuse(
                ErrorCode::TOKEN_REVOKED,
                RETRY_CREDENTIAL_MS,
                "token revoked".into(),
            ))
        }
        Err(AuthError::Store(e)) => {
            log::error!("token check failed: {e}");
            return Err(refuse(
                ErrorCode::SERVER_BUSY,
                RETRY_BUSY_MS,
                "token store unavailable".into(),
            ));
        }
    };
    if conn.session.is_closing() {
        return Ok(None); // the edge is shutting down: the GOAWAY says it all
    }
    if let Admission::Revoked = state.registry().admit(verified.id(), conn) {
        return Err(refuse(
            ErrorCode::TOKEN_REVOKED,
            RETRY_CREDENTIAL_MS,
            "token revoked".into(),
        ));
    }
    if conn
        .send(&Control::Welcome {
            version: agreed,
            session: conn.no,
            edge: EDGE_NAME,
        })
        .await
        .is_err()
    {
        return Ok(None);
    }
    log::info!(
        "session {} up: token={} agent={agent:?} arch={arch:?} version={agreed} peer={peer}",
        conn.no,
        verified.id()
    );
    Ok(Some(verified))
}

/// Serves control messages after `Welcome` until the session ends.
async fn run_session(state: &Arc<State>, conn: &Arc<AgentConn>, token: &VerifiedToken) {
    while let Some(bytes) = conn.session.recv_control().await {
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
                let reply = bind(state, conn, token, endpoint, kind, policy);
                let sent = match &reply {
                    Ok(url) => {
                        log::info!(
                            "session {}: bound {endpoint} ({kind:?}, upstream {upstream:?}) at {url}",
                            conn.no
                        );
                        conn.send(&Control::BindOk { endpoint, url }).await
                    }
                    Err(r) => {
                        log::info!(
                            "session {}: bind {endpoint:?} refused: {} ({}): {}",
                            conn.no,
                            r.code,
                            r.rule,
                            r.message
                        );
                        conn.send(&Control::BindErr {
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
            Control::RotateStored { token_id } => {
                log::warn!(
                    "session {}: RotateStored for {token_id:?} without an offer; ignored",
                    conn.no
                );
            }
            other => {
                log::warn!(
                    "session {}: unexpected control message {other:?}; closing (PROTOCOL)",
                    conn.no
                );
                conn.session.goaway(ErrorCode::PROTOCOL);
            }
        }
    }
}

/// A refused bind.
pub(crate) struct BindRefusal {
    code: ErrorCode,
    rule: String,
    message: String,
}

fn refused(code: ErrorCode, rule: impl Into<String>, message: impl Into<String>) -> BindRefusal {
    BindRefusal {
        code,
        rule: rule.into(),
        message: message.into(),
    }
}

/// Decides a `Bind` and updates the registry; the caller answers the agent.
fn bind(
    state: &Arc<State>,
    conn: &Arc<AgentConn>,
    token: &VerifiedToken,
    endpoint: &str,
    kind: EndpointKind,
    policy: &str,
) -> Result<String, BindRefusal> {
    if conn.session.is_closing() {
        return Err(refused(
            ErrorCode::BIND_REFUSED,
            "session",
            "this session is draining; reconnect",
        ));
    }
    if !crate::config::valid_endpoint_name(endpoint) {
        return Err(refused(
            ErrorCode::BIND_REFUSED,
            "endpoint name",
            "an endpoint name is 1-63 lowercase letters, digits or inner '-'",
        ));
    }
    let rule = format!("token {} allow={}", token.id(), token.allow());
    if !token.allow().permits(endpoint) {
        return Err(refused(
            ErrorCode::BIND_REFUSED,
            rule,
            format!("endpoint {endpoint} is not in the token's allow list"),
        ));
    }
    if !policy.trim().is_empty() {
        // Policies only narrow, and a policy the edge cannot enforce must not
        // degrade to "allow all": refuse until the policy engine exists.
        return Err(refused(
            ErrorCode::BIND_REFUSED,
            "policy",
            "declared policies are not supported by this edge yet",
        ));
    }
    let tls_domain = match (kind, &state.cfg.tls) {
        (EndpointKind::Tls, Some(t)) => Some(t.domain.as_str()),
        (EndpointKind::Tls, None) => {
            return Err(refused(
                ErrorCode::BIND_REFUSED,
                "edge config",
                "this edge has no [tls] listener",
            ))
        }
        (EndpointKind::Tcp, _) if state.cfg.tcp.is_none() => {
            return Err(refused(
                ErrorCode::BIND_REFUSED,
                "edge config",
                "this edge has no [tcp] listener",
            ))
        }
        (EndpointKind::Tcp, _) => None,
    };

    let mut reg = state.registry();
    if !reg.is_live(conn.no) {
        return Err(refused(
            ErrorCode::TOKEN_REVOKED,
            rule,
            "the token was revoked; this session is closing",
        ));
    }
    let mut rebuild = false;
    if let Some(b) = reg.get_mut(endpoint) {
        if b.conn.no() == conn.no && b.kind == kind {
            // The same session binding again: nothing changes, but the
            // contract prints a line for every successful bind.
            let url = b.url.clone();
            drop(reg);
            emit(format_args!("BOUND {endpoint} {url}"));
            return Ok(url);
        }
        if b.token != *token.id() {
            log::info!(
                "endpoint {endpoint} is held by token {} (session {})",
                b.token,
                b.conn.no()
            );
            return Err(refused(
                ErrorCode::ENDPOINT_TAKEN,
                format!("endpoint {endpoint}"),
                "another session holds this endpoint",
            ));
        }
        if b.kind == kind {
            // Same token, same kind: the new session takes the binding over,
            // port and URL included.
            let old = std::mem::replace(&mut b.conn, conn.clone());
            let url = b.url.clone();
            drop(reg);
            log::info!(
                "endpoint {endpoint}: session {} replaces session {} (same token)",
                conn.no,
                old.no()
            );
            if old.no() != conn.no {
                old.session.goaway(ErrorCode::NO_ERROR);
            }
            emit(format_args!("BOUND {endpoint} {url}"));
            return Ok(url);
        }
        // Same token, another kind: rebuild the binding, once the new one
        // exists (a failed port bind must leave the old binding in place).
        rebuild = true;
    }

    let (url, tcp) = match tls_domain {
        Some(domain) => (
            format!("tls://{endpoint}.{domain}:{}", state.tls_port),
            None,
        ),
        None => {
            let (listener, port, url) = public::bind_tcp(state, &reg, endpoint)?;
            let task = smol::spawn(public::accept_tcp(
                Arc::downgrade(state),
                endpoint.to_owned(),
                listener,
            ));
            (url, Some(TcpPort { port, task }))
        }
    };
    let replaced = if rebuild { reg.remove(endpoint) } else { None };
    reg.insert(
        endpoint.to_owned(),
        Binding {
            conn: conn.clone(),
            token: token.id().clone(),
            kind,
            url: url.clone(),
            tcp,
        },
    );
    drop(reg);
    if let Some(old) = replaced {
        if old.conn.no() != conn.no {
            old.conn.session.goaway(ErrorCode::NO_ERROR);
        }
    }
    emit(format_args!("BOUND {endpoint} {url}"));
    Ok(url)
}

/// A refusal for a tcp port problem.
pub(crate) fn port_refusal(rule: String, message: String) -> BindRefusal {
    refused(ErrorCode::BIND_REFUSED, rule, message)
}
