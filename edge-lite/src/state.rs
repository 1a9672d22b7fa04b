//! What every task of the server shares ([`State`]), and the small helpers
//! they all use: the one [`timeout`], the one executor ([`spawn`]), calls
//! into the store on the blocking pool ([`State::store_call`]), and closing
//! a tunnel with a reason ([`close_tunnel`]).
//!
//! The modules form one chain: `server` -> `api` / `agent` -> `rotation` / `handshake` /
//! `bind` -> `public` -> `state` -> `registry` / `admission` / `metrics` /
//! `store`, with `config`, `tls`, `policy`, `scope` and `events` (the last
//! three pure) below them all.
//! Nothing below imports anything above it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::ServerConfig;
use tether_proto::{Control, ErrorCode};

use crate::admission::Admission;
use crate::config::Config;
use crate::events::NewEvent;
use crate::metrics::{Counters, Denials, Latencies};
use crate::policy::RestrictIps;
use crate::ratelimit::AuthLimits;
use crate::registry::{Registry, Tunnel};
use crate::store::Store;
use crate::tls::Identity;

/// Events waiting for the store; past it a new one is dropped and counted
/// (a flood of refused handshakes must not queue without bound or make
/// the handshake wait for SQLite).
pub(crate) const EVENT_QUEUE: usize = 4096;

/// How long an `Error` may wait for room in the control queue before the
/// session is closed without it.
pub(crate) const ERROR_QUEUE_TIMEOUT: Duration = Duration::from_millis(200);

pub(crate) use tether_driver::timeout;

/// The edge's one executor. Every task of the server is spawned on it
/// ([`spawn`]) and it runs inside [`crate::Server::run`], so on the thread
/// that polls that future (the main thread in `tether-edge serve`): a
/// session's driver, its public connections and the reactor that wakes them
/// share one thread, and a round trip through the edge crosses no thread.
/// (smol's global executor ran them on a thread of its own, so every wake-up
/// from the reactor on the main thread was a hand-off between threads:
/// `scripts/bench tunnel`, README "Performance".)
pub(crate) static EXECUTOR: smol::Executor<'static> = smol::Executor::new();

/// Spawns `f` on the edge's [`EXECUTOR`].
pub(crate) fn spawn<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> smol::Task<T> {
    EXECUTOR.spawn(f)
}

/// Agent strings (`agent`, `arch`, `upstream`, endpoint names that failed
/// their check) as they go into a log line: at most 64 characters, with
/// control characters escaped by `{:?}` at the call site.
pub(crate) fn for_log(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Sends `Error{code}` and closes the session with `GOAWAY(code)`. The mux
/// writes control messages queued before a local close ahead of the `GOAWAY`
/// (PROTOCOL.md section 7), so the agent learns why. The `Error` waits for
/// room at most [`ERROR_QUEUE_TIMEOUT`]: an agent that stops reading cannot
/// delay its own close; the `GOAWAY`, and the driver's linger deadline, come
/// anyway.
pub(crate) async fn close_tunnel(t: &Tunnel, code: ErrorCode, retry_after_ms: u32, message: &str) {
    let error = Control::Error {
        code: code.0,
        retry_after_ms,
        message,
    };
    let _ = timeout(ERROR_QUEUE_TIMEOUT, t.session.send_control(&error)).await;
    t.session.goaway(code);
}

/// What every task of the server shares.
pub(crate) struct State {
    pub(crate) cfg: Config,
    pub(crate) agent_tls: Arc<ServerConfig>,
    pub(crate) public_tls: Option<Arc<ServerConfig>>,
    /// The `[tls]` certificate, for endpoints whose policy needs a server of
    /// their own but names no certificate.
    pub(crate) public_identity: Option<Arc<Identity>>,
    /// `[agent]` allow / deny.
    pub(crate) agent_sources: RestrictIps,
    /// Policy denials by endpoint and reason.
    pub(crate) denials: Arc<Denials>,
    /// Unfinished public TLS handshakes, per source and in all.
    pub(crate) public_admission: Arc<Admission>,
    /// The actual port of the shared TLS listener (0 without one).
    pub(crate) tls_port: u16,
    store: Arc<Mutex<Box<dyn Store>>>,
    registry: Mutex<Registry>,
    /// Every session that has a multiplexer (after `Hello` was verified),
    /// until its driver ends: what a shutdown drains.
    tunnels: Mutex<HashMap<u64, Arc<Tunnel>>>,
    pub(crate) counters: Arc<Counters>,
    /// Handshake and revocation latencies, for `GET /metrics`.
    pub(crate) latencies: Latencies,
    pub(crate) admission: Arc<Admission>,
    /// Public connections being served, against `limits.public_connections`.
    pub(crate) public_open: Arc<AtomicUsize>,
    next_session: AtomicU64,
    shutting_down: AtomicBool,
    events: smol::channel::Sender<NewEvent>,
    events_rx: Mutex<Option<smol::channel::Receiver<NewEvent>>>,
    /// Events dropped because the queue was full.
    pub(crate) events_dropped: AtomicU64,
    /// Events queued and not yet written.
    events_pending: AtomicUsize,
    /// Failed authentications per source and token id.
    auth_limits: Mutex<AuthLimits>,
}

impl State {
    pub(crate) fn new(
        cfg: Config,
        agent_tls: Arc<ServerConfig>,
        public_tls: Option<(Arc<ServerConfig>, Arc<Identity>)>,
        tls_port: u16,
        store: Box<dyn Store>,
        registry: Registry,
    ) -> State {
        let admission = Admission::new(cfg.limits.pending_per_source, cfg.limits.pending_total);
        let public_admission = Admission::new(
            cfg.limits.public_pending_per_source,
            cfg.limits.public_pending_total,
        );
        let (events, events_rx) = smol::channel::bounded(EVENT_QUEUE);
        let cfg_limits = cfg.limits;
        let (public_tls, public_identity) = match public_tls {
            Some((c, i)) => (Some(c), Some(i)),
            None => (None, None),
        };
        State {
            agent_sources: cfg.agent.sources(),
            cfg,
            agent_tls,
            public_tls,
            public_identity,
            denials: Arc::new(Denials::default()),
            public_admission,
            tls_port,
            store: Arc::new(Mutex::new(store)),
            registry: Mutex::new(registry),
            tunnels: Mutex::new(HashMap::new()),
            counters: Arc::new(Counters::default()),
            latencies: Latencies::default(),
            admission,
            public_open: Arc::new(AtomicUsize::new(0)),
            next_session: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            events,
            events_rx: Mutex::new(Some(events_rx)),
            events_dropped: AtomicU64::new(0),
            events_pending: AtomicUsize::new(0),
            auth_limits: Mutex::new(AuthLimits::new(
                cfg_limits.auth_failures_per_source,
                cfg_limits.auth_failures_per_token,
            )),
        }
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        // The registry is plain data updated in single steps: a panic
        // elsewhere leaves it consistent.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tunnels(&self) -> MutexGuard<'_, HashMap<u64, Arc<Tunnel>>> {
        self.tunnels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the store in the blocking pool (SQLite calls block), one
    /// call at a time behind the store's mutex.
    pub(crate) async fn store_call<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> T + Send + 'static,
    {
        let store = self.store.clone();
        smol::unblock(move || f(&**store.lock().unwrap_or_else(|e| e.into_inner()))).await
    }

    /// Queues an event for the store; never waits (a full queue drops it
    /// and counts it in `events_dropped`).
    pub(crate) fn event(&self, e: NewEvent) {
        self.events_pending.fetch_add(1, Ordering::SeqCst);
        if self.events.try_send(e).is_err() {
            self.events_pending.fetch_sub(1, Ordering::SeqCst);
            self.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The rate limits of failed authentication (plain data: never held
    /// across an await).
    pub(crate) fn auth_limits(&self) -> MutexGuard<'_, AuthLimits> {
        self.auth_limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer stored (or failed to store) `n` queued events.
    pub(crate) fn events_written(&self, n: usize) {
        self.events_pending.fetch_sub(n, Ordering::SeqCst);
    }

    /// Whether every queued event has been written.
    pub(crate) fn events_queue_empty(&self) -> bool {
        self.events_pending.load(Ordering::SeqCst) == 0
    }

    /// The receiving end of the event queue, for the one writer task.
    pub(crate) fn take_events(&self) -> Option<smol::channel::Receiver<NewEvent>> {
        self.events_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// A new session number.
    pub(crate) fn next_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::SeqCst)
    }

    /// Tracks a session with a multiplexer; false when the server is
    /// shutting down (the caller closes it).
    pub(crate) fn add_tunnel(&self, t: &Arc<Tunnel>) -> bool {
        let mut tunnels = self.tunnels();
        if self.shutting_down.load(Ordering::SeqCst) {
            return false;
        }
        tunnels.insert(t.no, t.clone());
        true
    }

    pub(crate) fn remove_tunnel(&self, no: u64) {
        self.tunnels().remove(&no);
    }

    /// Every tracked session now.
    pub(crate) fn all_tunnels(&self) -> Vec<Arc<Tunnel>> {
        self.tunnels().values().cloned().collect()
    }

    /// Whether no session is tracked any more.
    pub(crate) fn no_tunnels(&self) -> bool {
        self.tunnels().is_empty()
    }

    /// From now on no session is tracked: [`State::add_tunnel`] says false.
    pub(crate) fn start_shutdown(&self) {
        let _tunnels = self.tunnels();
        self.shutting_down.store(true, Ordering::SeqCst);
    }
}
