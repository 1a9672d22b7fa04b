//! The server: binding the listeners ([`Server::bind`]), the accept loops,
//! the revocation watcher, and the graceful shutdown ([`Server::run`]).
//!
//! Tasks run on smol's global executor. SQLite calls go through the
//! blocking pool (`smol::unblock`), one at a time behind the store's mutex.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use smol::net::TcpListener;
use smol::Timer;
use tether_proto::ErrorCode;

use crate::agent::{self, AgentConn};
use crate::config::Config;
use crate::public;
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use crate::tls;

/// How often the server asks SQLite whether another connection committed.
pub const REVOCATION_POLL: Duration = Duration::from_millis(200);
/// `retry_after_ms` sent with `TOKEN_REVOKED` to a live session.
const RETRY_REVOKED_MS: u32 = 300_000;

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
            RunError::Listen {
                listener,
                addr,
                error,
            } => write!(f, "cannot listen on {addr} ({listener}): {error}"),
        }
    }
}

impl std::error::Error for RunError {}

/// Prints one machine-readable line on stdout and flushes it.
pub(crate) fn emit(line: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `f`'s output, or `None` if `d` passes first.
pub(crate) async fn timeout<T>(d: Duration, f: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        Timer::after(d).await;
        None
    })
    .await
}

/// What every task of the server shares.
pub(crate) struct State {
    pub(crate) cfg: Config,
    pub(crate) agent_tls: Arc<ServerConfig>,
    pub(crate) public_tls: Option<Arc<ServerConfig>>,
    /// The actual port of the shared TLS listener (0 without one).
    pub(crate) tls_port: u16,
    pub(crate) store: Arc<Mutex<Store>>,
    registry: Mutex<Registry>,
    conns: Mutex<HashMap<u64, Arc<AgentConn>>>,
    pub(crate) next_session: AtomicU64,
    shutting_down: AtomicBool,
}

impl State {
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        // The registry is plain data updated in single steps: a panic
        // elsewhere leaves it consistent.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Arc<AgentConn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tracks a new agent connection; false when the server is shutting down.
    pub(crate) fn add_conn(&self, conn: &Arc<AgentConn>) -> bool {
        let mut conns = self.conns();
        if self.shutting_down.load(Ordering::SeqCst) {
            return false;
        }
        conns.insert(conn.no(), conn.clone());
        true
    }

    pub(crate) fn remove_conn(&self, no: u64) {
        self.conns().remove(&no);
    }
}

/// A bound, not yet running, edge server.
pub struct Server {
    state: Arc<State>,
    agent: TcpListener,
    agent_addr: SocketAddr,
    tls: Option<(TcpListener, SocketAddr)>,
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
                Some(tls::public_server(&id).map_err(|e| RunError::Tls {
                    listener: "tls",
                    reason: e.to_string(),
                })?)
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
        let dir = cfg.state_dir.clone();
        let (store, revoked) = smol::unblock(move || {
            let s = Store::open(&dir)?;
            let r = s.revoked_ids()?;
            Ok::<_, StoreError>((s, r))
        })
        .await
        .map_err(RunError::Store)?;

        let (agent, agent_addr) = listen("agent", cfg.agent.listen).await?;
        let tls = match &cfg.tls {
            Some(t) => Some(listen("tls", t.listen).await?),
            None => None,
        };
        let state = Arc::new(State {
            tls_port: tls.as_ref().map_or(0, |(_, a)| a.port()),
            cfg,
            agent_tls,
            public_tls,
            store: Arc::new(Mutex::new(store)),
            registry: Mutex::new(Registry::new(revoked)),
            conns: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
        });
        emit(format_args!("LISTEN agent {agent_addr}"));
        if let Some((_, a)) = &tls {
            emit(format_args!("LISTEN tls {a}"));
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
        })
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
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let Server {
            state, agent, tls, ..
        } = self;
        let agents = smol::spawn(accept_agents(state.clone(), agent));
        let public = tls.map(|(l, _)| smol::spawn(public::accept_tls(state.clone(), l)));
        let watcher = smol::spawn(watch_revocations(state.clone()));

        shutdown.await;

        // 1. Stop accepting: every listener closes.
        state.shutting_down.store(true, Ordering::SeqCst);
        agents.cancel().await;
        if let Some(t) = public {
            t.cancel().await;
        }
        watcher.cancel().await;
        let listeners = state.registry().take_listeners();
        for t in listeners {
            t.cancel().await;
        }
        // 2. Drain every session.
        let conns: Vec<Arc<AgentConn>> = state.conns().values().cloned().collect();
        let streams: usize = conns.iter().map(|c| c.session().live_streams()).sum();
        log::info!(
            "shutting down: draining {} session(s) with {streams} open stream(s)",
            conns.len()
        );
        for c in &conns {
            c.session().goaway(ErrorCode::NO_ERROR);
        }
        drop(conns);
        // 3. Wait for them, up to the grace period.
        let grace = Duration::from_millis(state.cfg.session.shutdown_grace_ms);
        let deadline = Instant::now() + grace;
        while !state.conns().is_empty() && Instant::now() < deadline {
            Timer::after(Duration::from_millis(10)).await;
        }
        let left: Vec<Arc<AgentConn>> = state.conns().values().cloned().collect();
        if !left.is_empty() {
            log::warn!(
                "shutdown grace of {grace:?} expired: closing {} session(s)",
                left.len()
            );
            for c in &left {
                c.session().goaway(ErrorCode::INTERNAL);
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            while !state.conns().is_empty() && Instant::now() < deadline {
                Timer::after(Duration::from_millis(10)).await;
            }
        }
        log::info!("stopped");
        Ok(())
    }
}

/// Most agent connections between TCP accept and `Welcome` (or refusal).
/// Each holds a whole session's buffers before it has proven anything, so
/// their number is bounded; past it, connections wait in the listen backlog.
const MAX_PENDING_HANDSHAKES: usize = 128;

async fn accept_agents(state: Arc<State>, listener: TcpListener) {
    let pending = Arc::new(smol::lock::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = pending.acquire_arc().await;
        match listener.accept().await {
            Ok((conn, peer)) => {
                smol::spawn(agent::serve(state.clone(), conn, peer, permit)).detach();
            }
            Err(e) => {
                log::warn!("agent port: accept failed: {e}");
                Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Polls `PRAGMA data_version`; when another connection (the CLI) has
/// committed, and once at start, reloads the revoked ids and closes every
/// live session of a revoked token.
async fn watch_revocations(state: Arc<State>) {
    let mut seen: Option<i64> = None;
    loop {
        let store = state.store.clone();
        let last = seen;
        let polled = smol::unblock(move || {
            let s = store.lock().unwrap_or_else(|e| e.into_inner());
            let v = s.data_version()?;
            let ids = if last != Some(v) {
                Some(s.revoked_ids()?)
            } else {
                None
            };
            Ok::<_, StoreError>((v, ids))
        })
        .await;
        match polled {
            Ok((v, ids)) => {
                seen = Some(v);
                if let Some(ids) = ids {
                    apply_revocations(&state, ids);
                }
            }
            Err(e) => log::error!("revocation poll failed: {e}"),
        }
        Timer::after(REVOCATION_POLL).await;
    }
}

fn apply_revocations(state: &Arc<State>, ids: std::collections::HashSet<crate::store::TokenId>) {
    let (fresh, victims) = state.registry().set_revoked(ids);
    let mut counts: Vec<(crate::store::TokenId, usize)> =
        fresh.into_iter().map(|t| (t, 0)).collect();
    for (t, conn) in victims {
        match counts.iter_mut().find(|(id, _)| *id == t) {
            Some((_, n)) => *n += 1,
            None => counts.push((t, 1)),
        }
        smol::spawn(async move {
            conn.close_with(ErrorCode::TOKEN_REVOKED, RETRY_REVOKED_MS, "token revoked")
                .await;
        })
        .detach();
    }
    for (t, n) in counts {
        log::warn!("token {t} revoked: closed {n} session(s)");
    }
}
