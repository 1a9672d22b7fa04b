//! The agent port before a session exists: the TLS 1.3 handshake (ALPN
//! `tether/1`), the agent's first frame read straight off the TLS stream
//! (it must be a `CONTROL` frame carrying `Hello`, PROTOCOL.md section 1),
//! the version check, the token's form, and only then the token store.
//!
//! No multiplexer exists yet: what a connection holds here is its socket,
//! rustls' state and one `MAX_CONTROL` buffer, for at most the TLS and Hello
//! deadlines, and only while it holds an admission slot (`admission`). A
//! refusal is written as raw `CONTROL(Error)` + `GOAWAY` frames with a short
//! deadline and the connection is dropped. What succeeds is an
//! [`Authenticated`] agent: the proof that `agent` needs to allocate a session.

use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::server::TlsStream;
use futures_rustls::TlsAcceptor;
use smol::net::TcpStream;
use tether_driver::ReadAhead;

/// An agent's connection once TLS is up: the TCP socket read through a
/// [`ReadAhead`] under rustls, which gets its 64 KiB buffer (one `recv` per
/// 64 KiB, not per 4 KiB) once the agent has authenticated.
pub(crate) type AgentTls = TlsStream<ReadAhead<TcpStream>>;
use tether_proto::{Control, ErrorCode, FrameHeader, FrameKind, HEADER_LEN, MAX_CONTROL};

use crate::config::ms;
use crate::events::{EventKind, NewEvent};
use crate::metrics::Refusal;
use crate::state::{for_log, timeout, State};
use crate::store::{token_id_of, AuthError, TokenId, VerifiedToken};

/// `retry_after_ms` for refused credentials (the agent must "back off long").
pub(crate) const RETRY_CREDENTIAL_MS: u32 = 300_000;
/// `retry_after_ms` for a version mismatch.
const RETRY_VERSION_MS: u32 = 3_600_000;
/// `retry_after_ms` when the store cannot answer.
pub(crate) const RETRY_BUSY_MS: u32 = 5_000;

/// An agent whose `Hello` was verified; only [`authenticate`] makes one.
#[derive(Debug)]
pub(crate) struct Authenticated {
    /// The agreed protocol version.
    pub(crate) version: u16,
    /// The verified token.
    pub(crate) token: VerifiedToken,
    /// The agent's name and version (at most 64 characters, for logs).
    pub(crate) agent: String,
    /// Its architecture (at most 64 characters, for logs).
    pub(crate) arch: String,
}

/// A refused `Hello`: what to tell the agent and what to count.
struct Refused {
    why: Refusal,
    code: ErrorCode,
    retry_after_ms: u32,
    message: std::borrow::Cow<'static, str>,
    /// A refused credential: the token it named (if it had a token's
    /// form) and why, for the event and the rate limits.
    credential: Option<(Option<TokenId>, String)>,
}

impl Refused {
    /// Marks a refused credential.
    fn credential(mut self, token: Option<&TokenId>, why: impl Into<String>) -> Refused {
        self.credential = Some((token.cloned(), why.into()));
        self
    }
}

fn refused(
    why: Refusal,
    code: ErrorCode,
    retry_after_ms: u32,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> Refused {
    Refused {
        why,
        code,
        retry_after_ms,
        message: message.into(),
        credential: None,
    }
}

/// Runs the handshake of one agent connection. `None`: it was refused (and
/// counted; the agent was told why where it got that far).
pub(crate) async fn authenticate(
    state: &State,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(AgentTls, Authenticated)> {
    let limits = &state.cfg.limits;
    let tls_deadline = ms(limits.tls_handshake_timeout_ms);
    let started = std::time::Instant::now();
    // Until its first byte arrives, a connection holds only its socket and
    // this small future: no TLS state is allocated for an idle socket.
    let mut first = [0u8; 1];
    match timeout(tls_deadline, tcp.peek(&mut first)).await {
        Some(Ok(n)) if n > 0 => {}
        Some(_) => {
            state.counters.refuse(Refusal::AgentTlsFailed);
            return None;
        }
        None => {
            state.counters.refuse(Refusal::AgentTimeout);
            return None;
        }
    }
    let left = tls_deadline.saturating_sub(started.elapsed());
    Box::pin(authenticate_tls(state, tcp, peer, left)).await
}

/// The rest of [`authenticate`], once the peer has sent a byte: TLS with
/// `tls_deadline` left, then the first frame and `Hello`.
async fn authenticate_tls(
    state: &State,
    tcp: TcpStream,
    peer: SocketAddr,
    tls_deadline: Duration,
) -> Option<(AgentTls, Authenticated)> {
    let limits = &state.cfg.limits;
    let acceptor = TlsAcceptor::from(state.agent_tls.clone());
    // No read-ahead buffer until the agent has authenticated (agent.rs).
    let pipe = ReadAhead::passthrough(tcp);
    let mut tls = match timeout(tls_deadline, acceptor.accept(pipe)).await {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            log::debug!("agent tls handshake failed: peer={peer}: {e}");
            state.counters.refuse(Refusal::AgentTlsFailed);
            return None;
        }
        None => {
            state.counters.refuse(Refusal::AgentTimeout);
            return None;
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(tether_proto::ALPN) {
        log::debug!("agent refused: peer={peer} did not negotiate ALPN tether/1");
        state.counters.refuse(Refusal::NoAlpn);
        return None;
    }
    let mut buf = vec![0u8; MAX_CONTROL];
    let first = match timeout(
        ms(limits.hello_timeout_ms),
        read_first_frame(&mut tls, &mut buf),
    )
    .await
    {
        Some(Ok(len)) => len,
        Some(Err(FirstFrame::Closed)) => {
            state.counters.refuse(Refusal::NotHello);
            return None;
        }
        Some(Err(FirstFrame::NotControl)) => {
            state.counters.refuse(Refusal::NotHello);
            goaway(state, &mut tls, ErrorCode::PROTOCOL, None).await;
            return None;
        }
        None => {
            state.counters.refuse(Refusal::AgentTimeout);
            goaway(state, &mut tls, ErrorCode::TIMEOUT, None).await;
            return None;
        }
    };
    match check_hello(state, peer, &buf[..first]).await {
        Ok(a) => Some((tls, a)),
        Err(r) => {
            state.counters.refuse(r.why);
            if let Some((token, why)) = &r.credential {
                credential_refused(state, peer, token.as_ref(), why).await;
            }
            let error = Control::Error {
                code: r.code.0,
                retry_after_ms: r.retry_after_ms,
                message: &r.message,
            };
            goaway(state, &mut tls, r.code, Some(&error)).await;
            None
        }
    }
}

/// Why the first frame is not there.
enum FirstFrame {
    /// The connection ended or failed.
    Closed,
    /// A frame other than `CONTROL`, or a header that does not decode.
    NotControl,
}

/// Reads one frame into `buf`; `Ok(len)` of its `CONTROL` payload.
async fn read_first_frame(tls: &mut AgentTls, buf: &mut [u8]) -> Result<usize, FirstFrame> {
    let mut header = [0u8; HEADER_LEN];
    tls.read_exact(&mut header)
        .await
        .map_err(|_| FirstFrame::Closed)?;
    let h = FrameHeader::decode(&header).map_err(|_| FirstFrame::NotControl)?;
    let len = usize::from(h.len);
    if h.kind != FrameKind::Control || len > buf.len() {
        return Err(FirstFrame::NotControl);
    }
    tls.read_exact(&mut buf[..len])
        .await
        .map_err(|_| FirstFrame::Closed)?;
    Ok(len)
}

/// Checks a `Hello`: its form, the version, the token's form, then the
/// store, then the token's sources against `peer`.
async fn check_hello(
    state: &State,
    peer: SocketAddr,
    payload: &[u8],
) -> Result<Authenticated, Refused> {
    let Ok(Control::Hello {
        version,
        min_version,
        token,
        agent,
        arch,
    }) = Control::decode(payload)
    else {
        return Err(refused(
            Refusal::NotHello,
            ErrorCode::PROTOCOL,
            0,
            "the first control message must be Hello",
        ));
    };
    let ours = tether_proto::MIN_PROTOCOL_VERSION..=tether_proto::PROTOCOL_VERSION;
    let agreed = version.min(*ours.end());
    if agreed < min_version.max(*ours.start()) {
        return Err(refused(
            Refusal::Version,
            ErrorCode::VERSION_UNSUPPORTED,
            RETRY_VERSION_MS,
            format!(
                "no common protocol version: this edge speaks {}..={}, the agent {min_version}..={version}",
                ours.start(),
                ours.end()
            ),
        ));
    }
    // The token's form costs nothing to check; the store is asked only
    // about tokens that could exist.
    if token_id_of(token.0).is_none() {
        return Err(refused(
            Refusal::MalformedToken,
            ErrorCode::AUTH_FAILED,
            RETRY_CREDENTIAL_MS,
            "malformed token",
        )
        .credential(None, "malformed"));
    }
    let presented = crate::store::TokenString::presented(token.0);
    let verified = state
        .store_call(move |s| s.verify(presented.expose()))
        .await;
    let token = match verified {
        Ok(v) => v,
        Err(AuthError::Malformed) => {
            return Err(refused(
                Refusal::MalformedToken,
                ErrorCode::AUTH_FAILED,
                RETRY_CREDENTIAL_MS,
                "malformed token",
            )
            .credential(None, "malformed"));
        }
        Err(AuthError::Unknown(id)) => {
            return Err(refused(
                Refusal::UnknownToken,
                ErrorCode::AUTH_FAILED,
                RETRY_CREDENTIAL_MS,
                "unknown token",
            )
            .credential(Some(&id), "unknown token or wrong secret"));
        }
        Err(AuthError::Revoked(id)) => {
            return Err(refused(
                Refusal::RevokedToken,
                ErrorCode::TOKEN_REVOKED,
                RETRY_CREDENTIAL_MS,
                "token revoked",
            )
            .credential(Some(&id), "revoked"));
        }
        Err(AuthError::Store(e)) => {
            log::error!("token check failed: {e}");
            return Err(refused(
                Refusal::StoreBusy,
                ErrorCode::SERVER_BUSY,
                RETRY_BUSY_MS,
                "token store unavailable",
            ));
        }
    };
    if !token.scope().admits(peer.ip()) {
        log::info!(
            "token {} refused from {}: its sources are {}",
            token.id(),
            peer.ip(),
            token.scope().sources_text()
        );
        return Err(refused(
            Refusal::TokenSource,
            ErrorCode::AUTH_FAILED,
            RETRY_CREDENTIAL_MS,
            format!("token {} may not connect from {}", token.id(), peer.ip()),
        )
        .credential(
            Some(token.id()),
            format!("source not allowed ({})", token.scope().sources_text()),
        ));
    }
    Ok(Authenticated {
        version: agreed,
        token,
        agent: for_log(agent).to_owned(),
        arch: for_log(arch).to_owned(),
    })
}

/// Records a refused credential (the token when the credential had the
/// form of one, and the source; never the secret) and counts it against
/// the rate limits; over either, waits `auth_failure_delay_ms` before the
/// refusal goes out (the connection keeps its admission slot meanwhile),
/// counted as `rate_limited`, with one `rate_limited` event per key and run.
async fn credential_refused(state: &State, peer: SocketAddr, token: Option<&TokenId>, why: &str) {
    let mut e = NewEvent::new(EventKind::AuthFailed).detail(why);
    e.token = token.cloned();
    e.remote = Some(peer.to_string());
    state.event(e);
    let limited = state.auth_limits().fail(
        crate::admission::Source::of(peer.ip()),
        token,
        std::time::Instant::now(),
    );
    if !limited.any() {
        return;
    }
    state.counters.refuse(Refusal::RateLimited);
    let limits = &state.cfg.limits;
    let note = |what: String| {
        let mut e = NewEvent::new(EventKind::RateLimited).detail(what);
        e.token = token.cloned();
        e.remote = Some(peer.to_string());
        state.event(e);
    };
    if limited.source == Some(true) {
        log::warn!(
            "source {}: more than {} failed authentications per minute: refusals are delayed",
            peer.ip(),
            limits.auth_failures_per_source
        );
        note(format!(
            "source over {} failed authentications per minute",
            limits.auth_failures_per_source
        ));
    }
    if let (Some(true), Some(t)) = (limited.token, token) {
        log::warn!(
            "token {t}: more than {} failed authentications per minute: refusals are delayed",
            limits.auth_failures_per_token
        );
        note(format!(
            "token over {} failed authentications per minute",
            limits.auth_failures_per_token
        ));
    }
    smol::Timer::after(ms(limits.auth_failure_delay_ms)).await;
}

/// Writes `CONTROL(error)` (if any) and `GOAWAY(code)` as raw frames, within
/// `session.linger_ms`, then closes: a peer that does not read loses them.
async fn goaway(state: &State, tls: &mut AgentTls, code: ErrorCode, error: Option<&Control<'_>>) {
    let mut out = Vec::with_capacity(64);
    if let Some(msg) = error {
        let mut body = [0u8; 512];
        if let Ok(enc) = msg.encode(&mut body) {
            let len = enc.len() as u16;
            out.extend_from_slice(&FrameHeader::session(FrameKind::Control, 0, len).encode());
            out.extend_from_slice(enc);
        }
    }
    out.extend_from_slice(&FrameHeader::session(FrameKind::GoAway, 0, 8).encode());
    out.extend_from_slice(&0u32.to_be_bytes()); // no stream accepted
    out.extend_from_slice(&code.0.to_be_bytes());
    let linger: Duration = ms(state.cfg.session.linger_ms);
    let _ = timeout(linger, async {
        tls.write_all(&out).await?;
        tls.flush().await?;
        tls.close().await
    })
    .await;
}
