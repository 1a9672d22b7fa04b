//! One session with the edge, from `Hello` to its end.
//!
//! Over a dialed TLS stream, [`serve`] starts a [`tether_driver::Session`]
//! (its driver runs as a task of the daemon's one executor), sends `Hello`,
//! waits for `Welcome` (printing `CONNECTED <addr> session=<n>`) or `Error`,
//! sends one `Bind` per endpoint, then runs two small tasks beside the
//! driver: one reads control messages (`BindOk` prints `BOUND <name> <url>`,
//! `BindErr` and `Error` are logged), one accepts the streams the edge opens
//! and hands each to [`crate::proxy::serve`]. It returns an [`Outcome`] that
//! tells the supervisor in `lib.rs` how long to wait before the next dial.
//!
//! It does not dial, sleep or decide on backoff.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use async_executor::Task;
use async_io::Timer;
use futures_lite::FutureExt;
use log::{debug, error, info, warn};
use tether_driver::{Closed, Session};
use tether_proto::control::Secret;
use tether_proto::{Control, ErrorCode, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use crate::config::Endpoint;
use crate::dial::EdgeStream;
use crate::rotation::test_pause;

/// What every session of this run shares.
pub(crate) struct Runtime {
    /// The endpoints to publish; a reload (SIGHUP) replaces the list.
    pub endpoints: RefCell<Rc<Vec<Endpoint>>>,
    /// The credentials, and which one is presented.
    pub credentials: RefCell<crate::rotation::Credentials>,
    pub mux: tether_proto::Config,
    pub stats: std::sync::Arc<crate::Stats>,
    /// What systemd is told.
    pub service: Rc<crate::service::Service>,
    /// The edge as configured, for status lines.
    pub edge: String,
    /// The welcomed session, while there is one (a reload binds on it).
    pub live: RefCell<Option<Session>>,
    /// The endpoints the live session has published (`BindOk`).
    pub bound: RefCell<BTreeSet<String>>,
    /// Why the last session ended, for the next status line.
    pub why: RefCell<String>,
    /// A rotated credential was stored during the live session: the drain
    /// that follows is the edge asking for a `Hello` with it, which is
    /// dialed at once whatever the backoff says.
    pub rotated: Cell<bool>,
}

impl Runtime {
    /// The endpoints now.
    pub fn endpoints(&self) -> Rc<Vec<Endpoint>> {
        self.endpoints.borrow().clone()
    }

    /// Tells systemd how many endpoints the live session publishes.
    pub fn say_connected(&self) {
        let line = crate::service::connected(
            &self.edge,
            self.bound.borrow().len(),
            self.endpoints.borrow().len(),
        );
        self.service.status(&line);
    }

    /// Records why a session ended.
    pub fn ended_because(&self, why: impl Into<String>) {
        *self.why.borrow_mut() = why.into();
    }
}

/// A one-shot stop signal that many tasks can wait on.
#[derive(Default)]
pub(crate) struct Stop {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Stop {
    pub fn fire(&self) {
        self.fired.set(true);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            let mut wakers = self.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// How a session ended, for the supervisor.
pub(crate) enum Outcome {
    /// The edge sent `Error` (before or after `Welcome`): wait at least `retry_after`.
    Refused {
        /// How long the session lived after `Welcome`, if it got there.
        lived: Option<Duration>,
        /// The edge's hint (zero = none).
        retry_after: Duration,
    },
    /// The edge sent `GOAWAY(NO_ERROR)` after `Welcome`: dial again now while
    /// this session drains (its driver is still running).
    Draining {
        lived: Duration,
        session: Session,
        driver: Task<Closed>,
    },
    /// The session ended otherwise (transport, heartbeat, protocol error).
    Ended { lived: Option<Duration> },
    /// Stop was requested: the session was told `GOAWAY(NO_ERROR)`.
    Stopped {
        session: Session,
        driver: Task<Closed>,
    },
}

/// Prints one machine-readable line on stdout and flushes it. A closed
/// stdout is not the daemon's problem.
pub(crate) fn stdout_line(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// The log wording for an `Error` from the edge.
fn refusal_subject(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::AUTH_FAILED | ErrorCode::TOKEN_REVOKED => "edge refused the credential",
        ErrorCode::VERSION_UNSUPPORTED => "edge refused the protocol version",
        ErrorCode::SERVER_BUSY => "edge is busy",
        _ => "edge ended the session",
    }
}

/// An edge's `retry_after_ms` as a wait, capped at
/// [`MAX_RETRY_AFTER`](crate::backoff::MAX_RETRY_AFTER) (the backoff caps it
/// too); says so when it was longer.
fn retry_hint(retry_after_ms: u32) -> Duration {
    let hint = Duration::from_millis(retry_after_ms.into());
    let cap = crate::backoff::MAX_RETRY_AFTER;
    if hint > cap {
        warn!(
            "edge asked to wait {retry_after_ms} ms before the next dial; waiting at most {} ms",
            cap.as_millis()
        );
    }
    hint.min(cap)
}

enum First {
    Control(Option<Vec<u8>>),
    Stop,
    Timeout,
}

enum Event {
    Driver(Closed),
    PeerDrains,
    Stop,
}

/// Runs one session over `tls` (connected to `addr`) until it ends, the edge
/// drains it, or `stop` fires.
pub(crate) async fn serve(
    rt: &Rc<Runtime>,
    tls: EdgeStream,
    addr: SocketAddr,
    stop: &Rc<Stop>,
) -> Outcome {
    let opts = tether_driver::Options {
        linger: crate::SESSION_LINGER,
        ..tether_driver::Options::default()
    };
    let (sess, driver) = match Session::new_with(tls, rt.mux, opts) {
        Ok(x) => x,
        Err(e) => {
            // The config was validated at load time; this cannot happen.
            error!("session configuration refused: {e}");
            return Outcome::Ended { lived: None };
        }
    };
    let mut driver = crate::spawn(rt.stats.track(driver));

    // The credential this session presents (a rotation during it changes
    // what the next one presents).
    let credential = rt.credentials.borrow().current().clone();
    let hello = Control::Hello {
        version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        token: Secret(credential.secret()),
        agent: crate::AGENT,
        arch: crate::arch(),
    };
    if let Err(e) = sess.send_control(&hello).await {
        warn!("session with {addr} ended before Hello was sent: {e}");
        return ended_early(&sess, driver).await;
    }
    debug!("Hello sent to {addr} with credential {}", credential.id());

    // Wait for Welcome or Error. A silent edge is caught by the heartbeat
    // (at dead_after); one that answers pings but never Welcome, by this
    // deadline, one ping interval later, so that the two never race.
    let welcome_deadline =
        Duration::from_millis(rt.mux.dead_after_ms.saturating_add(rt.mux.ping_interval_ms));
    let first = async { First::Control(sess.recv_control().await) }
        .or(async {
            stop.wait().await;
            First::Stop
        })
        .or(async {
            Timer::after(welcome_deadline).await;
            First::Timeout
        })
        .await;
    let bytes = match first {
        First::Control(Some(b)) => b,
        First::Control(None) => return ended_early(&sess, driver).await,
        First::Stop => {
            sess.goaway(ErrorCode::NO_ERROR);
            return Outcome::Stopped {
                session: sess,
                driver,
            };
        }
        First::Timeout => {
            warn!(
                "{addr} sent no Welcome within {} ms; closing",
                welcome_deadline.as_millis()
            );
            sess.goaway(ErrorCode::TIMEOUT);
            let _ = tether_driver::timeout(Duration::from_secs(1), &mut driver).await;
            return Outcome::Ended { lived: None };
        }
    };
    let session_no = match Control::decode(&bytes) {
        Ok(Control::Welcome {
            version,
            session,
            edge,
        }) if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) => {
            info!("connected to {addr}: {edge}, session {session}, protocol v{version}");
            stdout_line(format_args!("CONNECTED {addr} session={session}"));
            session
        }
        Ok(Control::Error {
            code,
            retry_after_ms,
            message,
        }) => {
            let code = ErrorCode(code);
            error!(
                "{}: {code} ({message}); credential {}, retry after {} ms",
                refusal_subject(code),
                credential.id(),
                retry_after_ms
            );
            // The other credential, if there is one, is tried without the
            // edge's wait, which is about this one.
            let other = matches!(code, ErrorCode::AUTH_FAILED | ErrorCode::TOKEN_REVOKED)
                && rt
                    .credentials
                    .borrow_mut()
                    .refused(&format!("{code}: {}", crate::printable(message)));
            rt.ended_because(format!(
                "{}: {code} ({})",
                refusal_subject(code),
                crate::printable(message)
            ));
            // The edge follows with GOAWAY and closes; give it a moment.
            let _ = tether_driver::timeout(Duration::from_secs(1), &mut driver).await;
            return Outcome::Refused {
                lived: None,
                retry_after: if other {
                    Duration::ZERO
                } else {
                    retry_hint(retry_after_ms)
                },
            };
        }
        other => {
            error!("{addr} broke the protocol: expected Welcome or Error, got {other:?}");
            sess.goaway(ErrorCode::PROTOCOL);
            let _ = tether_driver::timeout(Duration::from_secs(1), &mut driver).await;
            return Outcome::Ended { lived: None };
        }
    };
    let welcomed = Instant::now();
    rt.credentials.borrow_mut().accepted();
    rt.rotated.set(false);
    rt.bound.borrow_mut().clear();
    *rt.live.borrow_mut() = Some(sess.clone());
    rt.say_connected();

    for ep in rt.endpoints().iter() {
        let upstream = ep.upstream.to_string();
        // Fits one control message: the policy's size was checked at load.
        if let Err(e) = sess.send_control(&ep.bind(&upstream)).await {
            warn!(
                "session {session_no}: cannot send Bind for {}: {e}",
                ep.name()
            );
            break;
        }
    }

    let refused: Rc<Cell<Option<Duration>>> = Rc::new(Cell::new(None));
    let control = crate::spawn(control_loop(
        sess.clone(),
        rt.clone(),
        (session_no, credential.id().to_owned()),
        refused.clone(),
    ));
    crate::spawn(accept_loop(sess.clone(), rt.clone(), session_no)).detach();

    let event = async { Event::Driver((&mut driver).await) }
        .or(async {
            peer_drains(&sess).await;
            Event::PeerDrains
        })
        .or(async {
            stop.wait().await;
            Event::Stop
        })
        .await;
    let lived = welcomed.elapsed();
    rt.live.borrow_mut().take();
    rt.bound.borrow_mut().clear();
    match event {
        Event::Stop | Event::PeerDrains => control.detach(),
        Event::Driver(_) => {
            // An `Error` may still sit unread in the control slot: the mux
            // acts on the GOAWAY that follows it without waiting. The control
            // loop reads what is left, then ends with the session.
            let _ = tether_driver::timeout(Duration::from_secs(1), control).await;
        }
    }
    match event {
        Event::Stop => {
            sess.goaway(ErrorCode::NO_ERROR);
            Outcome::Stopped {
                session: sess,
                driver,
            }
        }
        Event::PeerDrains => {
            info!(
                "edge is draining session {session_no} (GOAWAY NO_ERROR, {} stream(s) left): dialing a new session",
                sess.live_streams()
            );
            Outcome::Draining {
                lived,
                session: sess,
                driver,
            }
        }
        Event::Driver(closed) => {
            if let Some(retry_after) = refused.get() {
                return Outcome::Refused {
                    lived: Some(lived),
                    retry_after,
                };
            }
            if matches!(sess.peer_goaway(), Some((ErrorCode::NO_ERROR, _))) {
                info!("edge drained session {session_no}: dialing a new session");
                let done = crate::spawn(async move { closed });
                return Outcome::Draining {
                    lived,
                    session: sess,
                    driver: done,
                };
            }
            warn!(
                "session {session_no} with {addr} ended after {} s: {closed}",
                lived.as_secs()
            );
            rt.ended_because(format!("session ended: {closed}"));
            Outcome::Ended { lived: Some(lived) }
        }
    }
}

/// The session ended before `Welcome`: log how.
async fn ended_early(sess: &Session, driver: Task<Closed>) -> Outcome {
    let closed = tether_driver::timeout(Duration::from_secs(1), driver).await;
    match closed {
        Some(c) => warn!("session ended before Welcome: {c}"),
        None => warn!(
            "session ended before Welcome ({} streams)",
            sess.live_streams()
        ),
    }
    Outcome::Ended { lived: None }
}

/// Resolves once the edge has sent `GOAWAY(NO_ERROR)`.
async fn peer_drains(sess: &Session) {
    let mut closed = Box::pin(sess.closed());
    let mut closed_done = false;
    std::future::poll_fn(|cx| {
        if matches!(sess.peer_goaway(), Some((ErrorCode::NO_ERROR, _))) {
            return Poll::Ready(());
        }
        // `closed` registers for the driver's wake-ups, GOAWAY among them.
        if !closed_done && closed.as_mut().poll(cx).is_ready() {
            closed_done = true;
        }
        Poll::Pending
    })
    .await
}

/// Reads control messages until the session ends.
async fn control_loop(
    sess: Session,
    rt: Rc<Runtime>,
    (session_no, presented): (u64, String),
    refused: Rc<Cell<Option<Duration>>>,
) {
    while let Some(bytes) = sess.recv_control().await {
        match Control::decode(&bytes) {
            Ok(Control::BindOk { endpoint, url }) => {
                info!("session {session_no}: endpoint {endpoint} is published at {url}");
                stdout_line(format_args!("BOUND {endpoint} {url}"));
                rt.bound.borrow_mut().insert(endpoint.to_owned());
                rt.say_connected();
            }
            Ok(Control::BindErr {
                endpoint,
                code,
                rule,
                message,
            }) => {
                // The rule names what refused it: an ACL entry, or the
                // field of the declared traffic_policy the edge rejects.
                let code = ErrorCode(code);
                let message = crate::printable(message);
                // Also unsolicited, for an endpoint bound before: the
                // token's rules changed and the edge unbound it.
                rt.bound.borrow_mut().remove(endpoint);
                if rule.is_empty() {
                    error!(
                        "session {session_no}: edge refused endpoint {endpoint}: {code}: {message}"
                    );
                } else {
                    error!("session {session_no}: edge refused endpoint {endpoint}: {code} by rule `{}`: {message}", crate::printable(rule));
                }
            }
            Ok(Control::Error {
                code,
                retry_after_ms,
                message,
            }) => {
                let code = ErrorCode(code);
                error!(
                    "session {session_no}: {}: {code} ({message}); retry after {retry_after_ms} ms",
                    refusal_subject(code)
                );
                rt.ended_because(format!(
                    "{}: {code} ({})",
                    refusal_subject(code),
                    crate::printable(message)
                ));
                refused.set(Some(retry_hint(retry_after_ms)));
            }
            Ok(Control::RotateOffer { token_id, token }) => {
                let token_id = crate::printable(token_id);
                let stored = {
                    let mut creds = rt.credentials.borrow_mut();
                    if creds.current().id() != presented {
                        // Stored on another session already: this one's
                        // offer is for a credential no longer presented.
                        info!("session {session_no}: rotation to {token_id} offered for {presented}, which is no longer presented; ignored");
                        continue;
                    }
                    info!(
                        "session {session_no}: the edge offers {token_id} to replace {presented}"
                    );
                    test_pause("offer_received");
                    creds.store(&token_id, token.0)
                };
                match stored {
                    Ok(()) => {
                        rt.rotated.set(true);
                        let msg = Control::RotateStored {
                            token_id: &token_id,
                        };
                        if let Err(e) = sess.send_control(&msg).await {
                            warn!("session {session_no}: RotateStored not sent ({e}); the next session presents {token_id}");
                        }
                        test_pause("stored_sent");
                    }
                    Err(e) => error!(
                        "session {session_no}: cannot store the rotated credential {token_id}: {e}; going on with {presented}, which the edge keeps valid"
                    ),
                }
            }
            Ok(Control::RotateConfirmed { token_id }) => {
                info!(
                    "session {session_no}: rotation to {} complete: the edge retired the previous credential",
                    crate::printable(token_id)
                );
            }
            Ok(other) => {
                error!("session {session_no}: edge broke the protocol: unexpected {other:?}");
                sess.goaway(ErrorCode::PROTOCOL);
            }
            Err(e) => {
                // The driver checked that it decodes; a mismatch is a bug.
                error!("session {session_no}: undecodable control message: {e}");
                sess.goaway(ErrorCode::PROTOCOL);
            }
        }
    }
}

/// Accepts the streams the edge opens and serves each in its own task.
async fn accept_loop(sess: Session, rt: Rc<Runtime>, session_no: u64) {
    while let Some(stream) = sess.accept().await {
        let meta = stream.meta();
        let name = meta.as_ref().map_or("", |m| m.endpoint.as_str());
        // The list as it is now: a stream for an endpoint that a reload
        // removed is refused like one for an endpoint never configured.
        let endpoints = rt.endpoints();
        let Some(index) = endpoints.iter().position(|e| e.name() == name) else {
            warn!(
                "session {session_no}: {} for unknown endpoint `{name}`; resetting with CONNECT_FAILED",
                stream.id()
            );
            stream.reset(ErrorCode::CONNECT_FAILED);
            continue;
        };
        crate::spawn(async move {
            let ep = &endpoints[index];
            let timeouts = crate::proxy::Timeouts {
                connect: Duration::from_millis(ep.connect_timeout_ms),
                idle: Duration::from_millis(ep.idle_timeout_ms),
            };
            crate::proxy::serve(stream, &ep.upstream, timeouts, ep.proxy_protocol).await;
        })
        .detach();
    }
    debug!("session {session_no}: no more streams");
}
