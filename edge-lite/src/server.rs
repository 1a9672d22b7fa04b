//! The server: binding the listeners ([`Server::bind`]), the accept loops,
//! the revocation watcher, and the graceful shutdown ([`Server::run`]).
//!
//! The agent port checks a connection's source against `[agent]` allow /
//! deny and admits it (`admission`: per source and in all) at accept,
//! before any TLS work, and hands it to `agent`; everything
//! past that point is bounded in time by the handshake deadlines and the
//! driver's linger deadline. Refusals are counted (`metrics`) and
//! summarised in the log every [`SUMMARY_EVERY`].
//!
//! Tasks run on smol's global executor. SQLite calls go through the
//! blocking pool (`smol::unblock`), one at a time behind the store's mutex.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::net::TcpListener;
use smol::Timer;
use tether_proto::ErrorCode;

use crate::admission::Busy;
use crate::agent::serve_agent;
use crate::api::ApiListener;
use crate::config::Config;
use crate::lines::emit;
use crate::metrics::Refusal;
use crate::public;
use crate::registry::{Applied, Close};
use crate::registry::{Registry, Tunnel};
use crate::state::{close_tunnel, State};
use crate::store::{SqliteStore, Store, StoreError, TokenId};
use crate::tls;

/// How often the server asks SQLite whether another connection committed.
pub const REVOCATION_POLL: Duration = Duration::from_millis(200);
/// `retry_after_ms` sent with `TOKEN_REVOKED` to a live session.
const RETRY_REVOKED_MS: u32 = 300_000;
/// How often the log gets a line with what was refused meanwhile.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug)]
pub enum RunError {
    /// A certificate or key could not be loaded or used.
    Tls {
        /// Which listener (`agent` or `tls`).
        listener: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The token store could not be opened.
    Store(StoreError),
    /// The admin API's listener could not be set up.
    Api(String),
    /// The JSON-lines file of events cannot be opened.
    Events(String),
    /// A listener could not be bound.
    Listen {
        /// Which listener.
        listener: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Tls { listener, reason } => write!(f, "{listener} listener: {reason}"),
            RunError::Store(e) => write!(f, "{e}"),
            RunError::Api(e) => write!(f, "api listener: {e}"),
            RunError::Events(e) => write!(f, "{e}"),
            RunError::Listen {
                listener,
                addr,
                error,
            } => write!(f, "cannot listen on {addr} ({listener}): {error}"),
        }
    }
}

impl std::error::Error for RunError {}

/// A bound, not yet running, edge server.
pub struct Server {
    state: Arc<State>,
    agent: TcpListener,
    agent_addr: SocketAddr,
    tls: Option<(TcpListener, SocketAddr)>,
    api: Option<ApiListener>,
    /// The store's revision when it was opened: the watcher applies what
    /// changes after it.
    rev: i64,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("agent", &self.agent_addr)
            .field("tls", &self.tls_addr())
            .finish()
    }
}

async fn listen(
    listener: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), RunError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|error| RunError::Listen {
            listener,
            addr,
            error,
        })?;
    let a = l.local_addr().map_err(|error| RunError::Listen {
        listener,
        addr,
        error,
    })?;
    Ok((l, a))
}

impl Server {
    /// Loads the TLS identities, opens the token store and binds the agent
    /// and shared TLS listeners, printing `LISTEN agent <addr>` and
    /// `LISTEN tls <addr>` on stdout.
    pub async fn bind(cfg: Config) -> Result<Server, RunError> {
        let id =
            tls::load_identity(&cfg.agent.cert, &cfg.agent.key).map_err(|e| RunError::Tls {
                listener: "agent",
                reason: e.to_string(),
            })?;
        let agent_tls = tls::agent_server(&id).map_err(|e| RunError::Tls {
            listener: "agent",
            reason: e.to_string(),
        })?;
        let public_tls = match &cfg.tls {
            Some(t) => {
                let id = tls::load_identity(&t.cert, &t.key).map_err(|e| RunError::Tls {
                    listener: "tls",
                    reason: e.to_string(),
                })?;
                let server = tls::public_server(&id).map_err(|e| RunError::Tls {
                    listener: "tls",
                    reason: e.to_string(),
                })?;
                Some((server, Arc::new(id)))
            }
            None => None,
        };
        if let Some(t) = &cfg.tcp {
            if t.public_host.is_none() && t.listen_ip.is_unspecified() {
                log::warn!(
                    "tcp.listen_ip is {} and tcp.public_host is not set: tcp URLs will name {}",
                    t.listen_ip,
                    t.listen_ip
                );
            }
        }
        raise_fd_limit();
        let p = &cfg.policies;
        let keys: Vec<&str> = p.endpoints.keys().map(String::as_str).collect();
        log::info!(
            "traffic policies: mandatory {} restrict-ips{}; per endpoint: {}; agent sources: {}",
            p.mandatory.restrict_ips().len(),
            if p.mandatory.terminates_tls() {
                " + terminate-tls"
            } else {
                ""
            },
            if keys.is_empty() {
                "none".to_owned()
            } else {
                keys.join(", ")
            },
            if cfg.agent.sources().is_empty() {
                "any"
            } else {
                "restricted"
            }
        );
        let dir = cfg.state_dir.clone();
        let (store, revoked, owners, rev) = smol::unblock(move || {
            let s = SqliteStore::open(&dir)?;
            let r = s.revoked_ids()?;
            let o = s.endpoint_owners()?;
            let rev = s.revision()?;
            Ok::<_, StoreError>((Box::new(s) as Box<dyn Store>, r, o, rev))
        })
        .await
        .map_err(RunError::Store)?;

        let (agent, agent_addr) = listen("agent", cfg.agent.listen).await?;
        let tls = match &cfg.tls {
            Some(t) => Some(listen("tls", t.listen).await?),
            None => None,
        };
        let api = match &cfg.api {
            Some(a) => Some(ApiListener::bind(a).await.map_err(RunError::Api)?),
            None => None,
        };
        let state = Arc::new(State::new(
            cfg,
            agent_tls,
            public_tls,
            tls.as_ref().map_or(0, |(_, a)| a.port()),
            store,
            Registry::new(revoked, owners),
        ));
        emit(format!("LISTEN agent {agent_addr}"));
        if let Some((_, a)) = &tls {
            emit(format!("LISTEN tls {a}"));
        }
        if let Some(a) = &api {
            emit(format!("LISTEN api {}", a.url()));
            log::info!("admin API: {}", a.url());
        }
        log::info!(
            "listening: agent {agent_addr}{}",
            tls.as_ref()
                .map_or(String::new(), |(_, a)| format!(", tls {a}"))
        );
        Ok(Server {
            state,
            agent,
            agent_addr,
            tls,
            api,
            rev,
        })
    }

    /// The admin API's URL (`http://…`, `https://…` or `unix:…`), if configured.
    pub fn api_url(&self) -> Option<String> {
        self.api.as_ref().map(ApiListener::url)
    }

    /// The agent listener's address.
    pub fn agent_addr(&self) -> SocketAddr {
        self.agent_addr
    }

    /// The shared TLS listener's address, if configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(_, a)| *a)
    }

    /// Serves until `shutdown` resolves, then stops accepting, sends
    /// `GOAWAY(NO_ERROR)` to every session and waits up to
    /// `shutdown_grace_ms` for their streams to finish.
    ///
    /// Every task of the server runs inside this future, on the thread that
    /// polls it (the edge's one executor, `state::EXECUTOR`).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        // The executor polls this future on every wake-up; the signal
        // stream in `shutdown` is polled only when a signal comes.
        let shutdown = tether_driver::on_wake(shutdown);
        crate::state::EXECUTOR.run(self.serve(shutdown)).await
    }

    async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let Server {
            state,
            agent,
            tls,
            api,
            rev,
            ..
        } = self;
        let api = api.map(|l| crate::state::spawn(crate::api::serve(state.clone(), l)));
        let pruner = crate::state::spawn(prune_events(state.clone()));
        let writer = state
            .take_events()
            .map(|rx| crate::state::spawn(write_events(state.clone(), rx)));
        // Events as JSON lines: from the newest recorded at start on.
        let follow = match state.cfg.events.sink() {
            Ok(Some(sink)) => {
                if let crate::config::JsonLines::File(p) = &sink {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .mode(0o640)
                        .open(p)
                        .map_err(|e| {
                            RunError::Events(format!("events.json_lines: {}: {e}", p.display()))
                        })?;
                }
                let after = state
                    .store_call(|s| {
                        s.events(&crate::events::EventQuery {
                            limit: 1,
                            ..Default::default()
                        })
                    })
                    .await
                    .map_err(RunError::Store)?
                    .first()
                    .map_or(0, |e| e.seq);
                Some((
                    sink,
                    std::sync::Arc::new(std::sync::atomic::AtomicI64::new(after)),
                ))
            }
            _ => None,
        };
        let follower = follow
            .clone()
            .map(|(sink, after)| crate::state::spawn(follow_events(state.clone(), sink, after)));
        let agents = crate::state::spawn(accept_agents(state.clone(), agent));
        let public = tls.map(|(l, _)| crate::state::spawn(public::accept_tls(state.clone(), l)));
        let watcher = crate::state::spawn(watch_store(state.clone(), rev));
        let aging = state
            .cfg
            .rotation
            .max_token_age_secs
            .map(|age| crate::state::spawn(crate::rotation::rotate_aged(state.clone(), age)));
        let summary = {
            let st = state.clone();
            crate::state::spawn(crate::metrics::summarise(
                state.counters.clone(),
                state.denials.clone(),
                SUMMARY_EVERY,
                move |line| {
                    st.event(
                        crate::events::NewEvent::new(crate::events::EventKind::PolicyDenied)
                            .detail(line),
                    )
                },
            ))
        };
        // systemd (Type=notify): the listeners are bound and accepting.
        let notifier = tether_notify::Notifier::from_env().unwrap_or_else(|e| {
            log::warn!("NOTIFY_SOCKET: {e}; systemd will not hear from tether-edge");
            tether_notify::Notifier::disabled()
        });
        let _ = notifier.send("READY=1\nSTATUS=serving");

        shutdown.await;
        let _ = notifier.send("STOPPING=1\nSTATUS=draining sessions");

        // 1. Stop accepting: every listener closes.
        state.start_shutdown();
        agents.cancel().await;
        if let Some(t) = public {
            t.cancel().await;
        }
        watcher.cancel().await;
        if let Some(t) = aging {
            t.cancel().await;
        }
        summary.cancel().await;
        pruner.cancel().await;
        if let Some(t) = api {
            t.cancel().await;
        }
        if let Some(line) = state.counters.summary_since_last() {
            log::warn!("{line}");
        }
        if let Some(line) = state.denials.summary_since_last() {
            log::warn!("{line}");
        }
        let listeners = state.registry().take_listeners();
        for t in listeners {
            t.cancel().await;
        }
        // 2. Drain every session.
        let conns: Vec<Arc<Tunnel>> = state.all_tunnels();
        let streams: usize = conns.iter().map(|c| c.session.live_streams()).sum();
        log::info!(
            "shutting down: draining {} session(s) with {streams} open stream(s)",
            conns.len()
        );
        for c in &conns {
            c.session.goaway(ErrorCode::NO_ERROR);
        }
        drop(conns);
        // 3. Wait for them, up to the grace period.
        let grace = Duration::from_millis(state.cfg.session.shutdown_grace_ms);
        let deadline = Instant::now() + grace;
        while !state.no_tunnels() && Instant::now() < deadline {
            Timer::after(Duration::from_millis(10)).await;
        }
        let left: Vec<Arc<Tunnel>> = state.all_tunnels();
        if !left.is_empty() {
            log::warn!(
                "shutdown grace of {grace:?} expired: closing {} session(s)",
                left.len()
            );
            for c in &left {
                c.session.goaway(ErrorCode::INTERNAL);
            }
            let deadline = Instant::now() + Duration::from_millis(state.cfg.session.linger_ms);
            while !state.no_tunnels() && Instant::now() < deadline {
                Timer::after(Duration::from_millis(10)).await;
            }
        }
        if let Some(w) = writer {
            // What is queued (the sessions' last events included) is written
            // within a second; then the writer stops.
            let _ = crate::state::timeout(Duration::from_secs(1), async {
                while !state.events_queue_empty() {
                    Timer::after(Duration::from_millis(10)).await;
                }
            })
            .await;
            w.cancel().await;
        }
        if let (Some(f), Some((sink, after))) = (follower, follow) {
            // The last events, the writer's included, are written out too.
            f.cancel().await;
            while follow_once(&state, &sink, &after).await {}
        }
        log::info!("stopped");
        crate::lines::flush(Duration::from_secs(1));
        Ok(())
    }
}

/// The most events written in one store call.
const EVENT_BATCH: usize = 256;

/// Writes queued events to the store, in batches of at most
/// [`EVENT_BATCH`], until cancelled.
async fn write_events(state: Arc<State>, rx: smol::channel::Receiver<crate::events::NewEvent>) {
    while let Ok(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < EVENT_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let written = state
            .store_call(move |s| batch.iter().try_for_each(|e| s.record(e).map(|_| ())))
            .await;
        if let Err(e) = written {
            log::warn!("events: cannot record {n} event(s): {e}");
        }
        state.events_written(n);
    }
}

/// How often the JSON-lines writer looks for new events.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);
/// The most events it reads at once.
const FOLLOW_BATCH: usize = 1_000;

/// Writes every event recorded after `after` (whoever recorded it: the
/// edge, the API or the offline CLI) to `sink` as one JSON line each, in
/// the order of their sequence numbers, every [`FOLLOW_EVERY`].
async fn follow_events(
    state: Arc<State>,
    sink: crate::config::JsonLines,
    after: Arc<std::sync::atomic::AtomicI64>,
) {
    loop {
        while follow_once(&state, &sink, &after).await {}
        Timer::after(FOLLOW_EVERY).await;
    }
}

/// One batch of [`follow_events`]; true when a full batch was written
/// (more may wait).
async fn follow_once(
    state: &Arc<State>,
    sink: &crate::config::JsonLines,
    after: &std::sync::atomic::AtomicI64,
) -> bool {
    use std::sync::atomic::Ordering;
    let q = crate::events::EventQuery {
        after: Some(after.load(Ordering::SeqCst)),
        limit: FOLLOW_BATCH,
        ..Default::default()
    };
    let batch = match state.store_call(move |s| s.events(&q)).await {
        Ok(b) => b,
        Err(e) => {
            log::warn!("events: cannot read them for json_lines: {e}");
            return false;
        }
    };
    let Some(last) = batch.last() else {
        return false;
    };
    after.store(last.seq, Ordering::SeqCst);
    let full = batch.len() == FOLLOW_BATCH;
    let lines: Vec<String> = batch.iter().map(crate::api::event_json).collect();
    match sink {
        crate::config::JsonLines::Stdout => lines.into_iter().for_each(emit),
        crate::config::JsonLines::File(p) => {
            let p = p.clone();
            // Opened for each batch: logrotate's move-and-create needs no signal.
            let wrote = smol::unblock(move || {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o640)
                    .open(&p)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                let mut text = lines.join("\n");
                text.push('\n');
                f.write_all(text.as_bytes())
                    .map_err(|e| format!("{}: {e}", p.display()))
            })
            .await;
            if let Err(e) = wrote {
                log::warn!("events: json_lines: {e}");
            }
        }
    }
    full
}

/// How often old events are deleted (`[events]` retention).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Deletes the events `[events]` no longer keeps: at start, then every
/// [`PRUNE_EVERY`].
async fn prune_events(state: Arc<State>) {
    let keep = state.cfg.events.retention();
    loop {
        match state.store_call(move |s| s.prune_events(keep)).await {
            Ok(0) => {}
            Ok(n) => log::debug!("events: deleted {n} past the retention"),
            Err(e) => log::warn!("events: cannot apply the retention: {e}"),
        }
        Timer::after(PRUNE_EVERY).await;
    }
}

/// Raises the soft limit of open files to the hard one: every public
/// connection and every session is a descriptor, and the limits in
/// `[limits]` are what bound them, not a default of 1024.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            log::warn!("cannot raise the open-files limit: {e}");
        }
    }
}

/// Accepts agent connections; each is checked against `[agent]` allow /
/// deny and admitted (per source and in all) before any TLS work, or
/// closed at once.
async fn accept_agents(state: Arc<State>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((_, peer)) if !state.agent_sources.permits(peer.ip()) => {
                state.counters.refuse(Refusal::AgentIpDenied);
            }
            Ok((conn, peer)) => match state.admission.try_admit(peer.ip()) {
                Ok(pending) => {
                    crate::state::spawn(serve_agent(state.clone(), conn, peer, pending)).detach();
                }
                Err(Busy::Source) => state.counters.refuse(Refusal::SourceBusy),
                Err(Busy::Total) => state.counters.refuse(Refusal::PendingFull),
            },
            Err(e) => public::accept_failed("agent port", &e).await,
        }
    }
}

/// Every [`REVOCATION_POLL`], asks the store which tokens changed since the
/// revision it last saw (revoked, or a new scope: whoever wrote it, this
/// process or the CLI) and applies that to the live sessions; when another
/// connection has committed (`data_version`), reloads the endpoint owners.
async fn watch_store(state: Arc<State>, mut rev: i64) {
    let mut seen: Option<i64> = None;
    loop {
        let (last, since) = (seen, rev);
        let polled = state
            .store_call(move |s| {
                let v = s.data_version()?;
                let owners = if last != Some(v) {
                    Some(s.endpoint_owners()?)
                } else {
                    None
                };
                let changes = s.changes_since(since)?;
                Ok::<_, StoreError>((v, owners, changes))
            })
            .await;
        match polled {
            Ok((v, owners, (newest, changes))) => {
                seen = Some(v);
                rev = newest;
                if let Some(owners) = owners {
                    state.registry().set_owners(owners);
                }
                if !changes.is_empty() {
                    let changed: HashMap<TokenId, i64> = changes
                        .iter()
                        .filter(|c| c.revoked)
                        .map(|c| (c.id.clone(), c.changed_ms))
                        .collect();
                    let applied = state.registry().apply_changes(changes);
                    // A revocation's latency: its commit to the GOAWAY of
                    // the token's last live session (queued just below).
                    let closed: std::collections::HashSet<TokenId> = applied
                        .closed
                        .iter()
                        .filter(|(_, why)| *why == Close::Revoked)
                        .map(|(t, _)| t.token.clone())
                        .collect();
                    act_on(&state, applied);
                    let now = crate::store::unix_now_ms();
                    for id in closed {
                        if let Some(&at) = changed.get(&id).filter(|at| **at > 0) {
                            let secs = (now - at).max(0) as f64 / 1000.0;
                            state.latencies.revocation.observe(secs);
                        }
                    }
                }
            }
            Err(e) => log::error!("store poll failed: {e}"),
        }
        Timer::after(REVOCATION_POLL).await;
    }
}

/// Closes the sessions and unbinds the endpoints that
/// [`Registry::apply_changes`] took away, telling each agent why.
fn act_on(state: &Arc<State>, applied: Applied) {
    let Applied {
        revoked,
        closed,
        unbound,
        rotate,
    } = applied;
    let mut counts: HashMap<TokenId, usize> = revoked.into_iter().map(|t| (t, 0)).collect();
    for t in rotate {
        let state = state.clone();
        crate::state::spawn(async move { crate::rotation::offer(&state, &t).await }).detach();
    }
    for (t, why) in closed {
        match why {
            Close::Revoked => *counts.entry(t.token.clone()).or_insert(0) += 1,
            Close::Source => log::warn!(
                "session {} of token {} closed: the token may no longer connect from {}",
                t.no,
                t.token,
                t.peer.ip()
            ),
            Close::Retired => {
                counts.remove(&t.token);
                log::info!(
                    "session {} of token {} drained: a rotation retired the token",
                    t.no,
                    t.token
                );
            }
        }
        // Its endpoints go now, not when its connection ends: their ports
        // close and another session of an allowed token can bind them.
        let gone = state.registry().remove_session(t.no);
        for (name, _) in &gone {
            emit(format!("UNBOUND {name}"));
        }
        drop(gone);
        if why == Close::Retired {
            // The device's new session carries on; this one's streams finish.
            t.session.goaway(ErrorCode::NO_ERROR);
            continue;
        }
        crate::state::spawn(async move {
            let (code, message) = if why == Close::Revoked {
                (ErrorCode::TOKEN_REVOKED, "token revoked")
            } else {
                (
                    ErrorCode::AUTH_FAILED,
                    "the token may no longer connect from this address",
                )
            };
            close_tunnel(&t, code, RETRY_REVOKED_MS, message).await;
        })
        .detach();
    }
    for (name, binding, scope) in unbound {
        let session = binding.tunnel.clone();
        log::warn!(
            "session {}: endpoint {name} unbound: token {} now has bind={}",
            session.no,
            session.token,
            scope.rules
        );
        emit(format!("UNBOUND {name}"));
        // The port closes with the binding, here; the agent learns why.
        drop(binding);
        crate::state::spawn(async move {
            let rule = format!("token {} bind={}", session.token, scope.rules);
            let message =
                format!("endpoint {name} was unbound: the token's rules no longer allow it");
            let msg = tether_proto::Control::BindErr {
                endpoint: &name,
                code: ErrorCode::BIND_REFUSED.0,
                rule: &rule,
                message: &message,
            };
            let _ = crate::state::timeout(
                crate::state::ERROR_QUEUE_TIMEOUT,
                session.session.send_control(&msg),
            )
            .await;
        })
        .detach();
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    for (t, n) in counts {
        log::warn!("token {t} revoked: closed {n} session(s)");
    }
}
