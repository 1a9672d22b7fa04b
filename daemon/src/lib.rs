//! `tetherd`, the device daemon: it dials the edge over TLS 1.3, presents its
//! credential, publishes its endpoints and serves every stream the edge opens
//! by connecting it to the endpoint's local upstream. It reconnects forever,
//! with exponential backoff and full jitter.
//!
//! The pieces:
//! - [`config`]: `tetherd.toml` into typed structs, and the credential file;
//! - [`dial`]: DNS (re-resolved on every dial), TCP and the verified TLS 1.3
//!   handshake;
//! - `tunnel`: one session (`Hello`, `Welcome`, `Bind`, streams) over the
//!   one async driver, `tether-driver`;
//! - [`proxy`]: a stream joined to its upstream, with half-close and fixed
//!   copy buffers;
//! - [`proxy_header`]: the PROXY protocol v2 header written to an upstream
//!   first when its endpoint asks for it;
//! - [`backoff`]: the reconnect timing;
//! - [`run`]: the supervisor that ties them together.
//!
//! Everything runs on one single-threaded executor
//! ([`async_executor::LocalExecutor`] driven by [`async_io::block_on`]); the
//! only other threads are the `blocking` pool that DNS lookups (of the edge
//! and of upstreams given by name) go through, which `main` bounds to 2
//! threads. Memory is fixed by the configuration: per session the
//! multiplexer's buffers (`max_streams × (window + 512)` plus queues,
//! allocated once by `tether-driver`), the driver's 64 KiB read buffer and
//! the 64 KiB read-ahead under TLS,
//! plus per live stream one 32 KiB copy buffer: [`session_memory_bound`].
//! While the edge
//! drains a session (`GOAWAY(NO_ERROR)`) the old and the new session both
//! hold their buffers until the old one's streams are done: plan for two.
//! At most one session drains beside the live one: when the edge drains the
//! live session while an older one still drains, the older is cut
//! (`GOAWAY(CANCEL)`) and its driver awaited, at most [`CUT_DEADLINE`], before
//! the next session is dialed. The driver's linger deadline
//! ([`SESSION_LINGER`]) ends a cut session even when its edge stops reading;
//! past [`CUT_DEADLINE`] its task is dropped, which drops its connection.
//! [`Stats`] counts the session drivers alive.
//!
//! systemd ([`service`]): `READY=1` once the first dial starts, `STATUS=`
//! lines, `WATCHDOG=1` from a task of the same executor, `STOPPING=1`;
//! SIGHUP ([`Signal::Reload`]) reloads the endpoints ([`reload`]).
//!
//! [`rotation`]: the credential presented (the rotated one from the state
//! directory while the edge accepts it, else the factory one) and storing
//! the one a rotation offers, atomically.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_executor::{LocalExecutor, Task};
use async_io::Timer;
use futures_lite::{future, FutureExt, Stream, StreamExt};
use futures_rustls::rustls::pki_types::ServerName;
use futures_rustls::TlsConnector;
use log::{info, warn};
use tether_driver::{Closed, Session};
use tether_proto::ErrorCode;

pub mod backoff;
pub mod config;
pub mod dial;
pub mod logger;
pub mod proxy;
pub mod proxy_header;
mod reload;
pub mod rotation;
mod service;
mod tunnel;

pub use config::{Config, ConfigError, Credential, CredentialError};
pub use dial::TrustError;

/// Every byte one session may buffer for its streams, whatever the traffic:
/// the multiplexer's fixed buffers ([`tether_proto::Config::buffer_len`]),
/// the driver's read buffer, the read-ahead under TLS
/// ([`tether_driver::READ_AHEAD`]) and one copy buffer per stream. rustls's own
/// record buffers come on top (bounded by rustls's default buffer limits).
pub fn session_memory_bound(session: &tether_proto::Config) -> usize {
    session.buffer_len()
        + tether_driver::IO_BUFFER
        + tether_driver::READ_AHEAD
        + session.max_streams * proxy::COPY_BUFFER
}

use backoff::Backoff;
use tunnel::{Outcome, Runtime, Stop};

/// `s` for a log line: control characters (a newline that could forge a
/// line, an escape sequence) escaped, everything else as it is. For strings
/// the edge sends: messages, certificate names.
pub(crate) fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// `tetherd/<version>`, sent in `Hello`.
pub const AGENT: &str = concat!("tetherd/", env!("CARGO_PKG_VERSION"));

/// The architecture named in `Hello` and in the build line (`armv7` rather
/// than Rust's `arm` on ARMv7).
pub fn arch() -> &'static str {
    if cfg!(all(target_arch = "arm", target_feature = "v7")) {
        "armv7"
    } else {
        std::env::consts::ARCH
    }
}

/// How long a stop waits for open streams to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Once a session's multiplexer is closed, its driver has this long to
/// write its last frames (`GOAWAY`, TLS `close_notify`) before it drops the
/// connection unflushed ([`tether_driver::Options::linger`]).
pub const SESSION_LINGER: Duration = tether_driver::DEFAULT_LINGER;

/// How long the supervisor waits for a cut draining session's driver to end
/// before it drops the task (and with it the connection): the linger plus a
/// margin. The next session is dialed only after that.
pub const CUT_DEADLINE: Duration = SESSION_LINGER.saturating_add(Duration::from_secs(1));

/// Counters of a running daemon, shared with the thread that started it
/// ([`run_with_stats`]): for tests and diagnostics.
#[derive(Debug, Default)]
pub struct Stats {
    drivers: AtomicUsize,
    peak_drivers: AtomicUsize,
    started: AtomicU64,
}

impl Stats {
    /// Session drivers alive now: the live session, a draining one, and one
    /// that is closing. Each holds a connection and a session's buffers.
    pub fn sessions_open(&self) -> usize {
        self.drivers.load(Ordering::SeqCst)
    }

    /// The most [`Stats::sessions_open`] ever was in this run.
    pub fn peak_sessions_open(&self) -> usize {
        self.peak_drivers.load(Ordering::SeqCst)
    }

    /// Sessions started (a TLS connection with a driver) in this run.
    pub fn sessions_started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// `driver`, counted in [`Stats::sessions_open`] from now until it
    /// ends or is dropped.
    pub(crate) fn track<F: Future>(
        self: &Arc<Stats>,
        driver: F,
    ) -> impl Future<Output = F::Output> {
        let guard = DriverGuard::new(self.clone());
        async move {
            let _guard = guard;
            driver.await
        }
    }
}

/// One counted session driver; uncounted on drop.
struct DriverGuard(Arc<Stats>);

impl DriverGuard {
    fn new(stats: Arc<Stats>) -> DriverGuard {
        let now = stats.drivers.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak_drivers.fetch_max(now, Ordering::SeqCst);
        stats.started.fetch_add(1, Ordering::SeqCst);
        DriverGuard(stats)
    }
}

impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.drivers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The exit code for a configuration problem (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Why [`run`] could not start. Once it runs, it only returns on stop.
#[derive(Debug)]
pub enum RunError {
    /// The credential file is missing, unreadable, too open or empty.
    Credential(CredentialError),
    /// The pinned CA could not be used.
    Trust(TrustError),
    /// No usable TLS server name (set `server_name`).
    ServerName(String),
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Credential(_) | RunError::Trust(_) | RunError::ServerName(_) => EXIT_CONFIG,
        }
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Credential(e) => write!(f, "{e}"),
            RunError::Trust(e) => write!(f, "{e}"),
            RunError::ServerName(e) => write!(f, "server_name: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

impl From<CredentialError> for RunError {
    fn from(e: CredentialError) -> RunError {
        RunError::Credential(e)
    }
}

impl From<TrustError> for RunError {
    fn from(e: TrustError) -> RunError {
        RunError::Trust(e)
    }
}

thread_local! {
    /// The executor of the [`run`] in progress on this thread.
    static EXECUTOR: RefCell<Option<Rc<LocalExecutor<'static>>>> = const { RefCell::new(None) };
}

/// Spawns a task on the executor of the current [`run`].
pub(crate) fn spawn<T: 'static>(f: impl Future<Output = T> + 'static) -> Task<T> {
    EXECUTOR.with(|ex| {
        let ex = ex.borrow();
        // Invariant: only code running inside `run` spawns, and `run` sets the executor.
        let ex = ex.as_ref().expect("spawn called outside tetherd::run");
        ex.spawn(f)
    })
}

/// What the process asks of a running daemon ([`run_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Stop gracefully (SIGTERM, SIGINT).
    Stop,
    /// Read the config file again and apply its endpoints (SIGHUP).
    Reload,
}

/// Runs the daemon on a new single-threaded executor until `shutdown`
/// resolves, then drains gracefully: `GOAWAY(NO_ERROR)` on every session,
/// up to [`SHUTDOWN_GRACE`] for open streams to finish. Returns `Ok` after a
/// graceful stop and an error only when it cannot start. Every task it
/// spawned is dropped before it returns.
pub fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with_stats(config, shutdown, Arc::default())
}

/// [`run`], counting into `stats`, which another thread may read meanwhile.
pub fn run_with_stats(
    config: Config,
    shutdown: impl Future<Output = ()>,
    stats: Arc<Stats>,
) -> Result<(), RunError> {
    let signals = futures_lite::stream::once_future(shutdown).map(|()| Signal::Stop);
    run_with(config, signals, stats)
}

/// [`run`], driven by `signals`: [`Signal::Stop`] stops it as `shutdown`
/// does, [`Signal::Reload`] reloads the endpoints from `config.path`. The
/// stream ending counts as a stop.
pub fn run_with(
    config: Config,
    signals: impl Stream<Item = Signal>,
    stats: Arc<Stats>,
) -> Result<(), RunError> {
    let ex = Rc::new(LocalExecutor::new());
    let previous = EXECUTOR.with(|e| e.borrow_mut().replace(ex.clone()));
    let result = async_io::block_on(ex.run(run_inner(config, signals, stats)));
    EXECUTOR.with(|e| *e.borrow_mut() = previous);
    drop(ex); // cancels what is left: streams past the grace period
    result
}

async fn run_inner(
    mut config: Config,
    signals: impl Stream<Item = Signal>,
    stats: Arc<Stats>,
) -> Result<(), RunError> {
    let notifier = match tether_notify::Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            warn!("NOTIFY_SOCKET: {e}; systemd will not hear from tetherd");
            tether_notify::Notifier::disabled()
        }
    };
    let service = Rc::new(service::Service::new(notifier));
    let factory = Credential::load(&config.credential_path()?)?;
    let credentials = rotation::Credentials::load(factory, config.state_path());
    let tls = TlsConnector::from(dial::client_config(config.ca_file.as_deref())?);
    let name = config.tls_name().map_err(RunError::ServerName)?;
    let trust = dial::trust_source(config.ca_file.as_deref());
    info!(
        "edge {} (server name {}, trust {trust}), credential {}, {} endpoint(s)",
        config.edge,
        name.to_str(),
        credentials.current().id(),
        config.endpoints.len()
    );

    let rc = config.reconnect;
    let backoff = Backoff::new(
        Duration::from_millis(rc.initial_backoff_ms),
        Duration::from_millis(rc.max_backoff_ms),
        Duration::from_millis(rc.healthy_after_ms),
    );
    let rt = Rc::new(Runtime {
        endpoints: std::cell::RefCell::new(Rc::new(config.endpoints.clone())),
        credentials: RefCell::new(credentials),
        mux: config.session.mux_config(),
        stats,
        service: service.clone(),
        edge: config.edge.to_string(),
        live: Default::default(),
        bound: Default::default(),
        why: Default::default(),
        rotated: Default::default(),
    });
    if let Some(every) = tether_notify::watchdog_interval() {
        info!(
            "systemd watchdog: WATCHDOG=1 every {} ms",
            every.as_millis()
        );
        spawn(service::watchdog(service.clone(), every)).detach();
    }
    let stop = Rc::new(Stop::default());
    let edge = config.edge.clone();
    let watch = async {
        // The executor polls its main future on every wake-up; the signal
        // stream is polled only when a signal comes.
        let mut signals = std::pin::pin!(signals);
        while let Some(Signal::Reload) = tether_driver::on_wake(signals.next()).await {
            reload::reload(&mut config, &rt).await;
        }
        info!("stop requested");
        service.stopping();
        stop.fire();
    };
    // The supervisor returns only once `stop` fired, so the zip ends with it.
    future::zip(
        watch,
        supervise(edge, name, tls, rt.clone(), backoff, stop.clone()),
    )
    .await;
    info!("stopped");
    Ok(())
}

/// Waits for a cut session's driver to end, at most [`CUT_DEADLINE`], then
/// drops the task (its connection with it). `false` when `stop` fired
/// meanwhile.
async fn cut(task: Task<Closed>, stop: &Stop) -> bool {
    let ended = async { Some(tether_driver::timeout(CUT_DEADLINE, task).await) }
        .or(async {
            stop.wait().await;
            None
        })
        .await;
    match ended {
        Some(Some(closed)) => {
            info!("cut session closed: {closed}");
            true
        }
        Some(None) => {
            warn!(
                "cut session still running after {} ms: dropped",
                CUT_DEADLINE.as_millis()
            );
            true
        }
        None => false,
    }
}

/// Dials, serves, backs off; on stop, drains every session.
async fn supervise(
    edge: config::HostPort,
    name: ServerName<'static>,
    tls: TlsConnector,
    rt: Rc<Runtime>,
    mut backoff: Backoff,
    stop: Rc<Stop>,
) {
    let mut rng = fastrand::Rng::new();

    // The session that is draining (the edge's GOAWAY), at most one; on
    // stop, the live one joins it.
    let mut draining: Vec<(Session, Task<Closed>)> = Vec::new();
    // Validated and about to dial: systemd may go on booting.
    rt.service.ready(&format!("connecting to {edge}"));
    while !stop.is_fired() {
        draining.retain(|(_, t)| !t.is_finished());
        debug_assert!(draining.len() <= 1, "at most one session drains");
        let dead_after = Duration::from_millis(rt.mux.dead_after_ms);
        let dialed = async { Some(dial::dial(&edge, &name, &tls, dead_after).await) }
            .or(async {
                stop.wait().await;
                None
            })
            .await;
        let delay = match dialed {
            None => break,
            Some(Err(e)) => {
                warn!("dialing {edge} failed: {e}");
                rt.ended_because(e.to_string());
                backoff.next_delay(&mut rng)
            }
            Some(Ok((stream, addr))) => match tunnel::serve(&rt, stream, addr, &stop).await {
                Outcome::Refused { lived, retry_after } => {
                    if let Some(lived) = lived {
                        backoff.session_lived(lived);
                    }
                    backoff.after_refusal(retry_after, &mut rng)
                }
                Outcome::Draining {
                    lived,
                    session,
                    driver,
                } => {
                    backoff.session_lived(lived);
                    // At most one session drains beside the live one, so memory
                    // stays at two sessions' buffers however often the edge
                    // drains us: an older drain is cut (its streams reset) and
                    // is gone before the next session is dialed.
                    for (old, task) in draining.drain(..) {
                        if task.is_finished() {
                            continue;
                        }
                        warn!("a second drain began: cutting the older draining session");
                        old.goaway(ErrorCode::CANCEL);
                        if !cut(task, &stop).await {
                            break;
                        }
                    }
                    draining.push((session, driver));
                    // At once, unless the previous session was drained early
                    // too: an edge that drains every session cannot make us
                    // spin. After a rotation stored in that session, at once
                    // anyway: the edge waits for a Hello with the new token
                    // (one per stored offer, so this cannot spin either).
                    if rt.rotated.take() {
                        Duration::ZERO
                    } else {
                        let first = backoff.attempt() == 0;
                        let delay = backoff.next_delay(&mut rng);
                        if first {
                            Duration::ZERO
                        } else {
                            delay
                        }
                    }
                }
                Outcome::Ended { lived } => {
                    if let Some(lived) = lived {
                        backoff.session_lived(lived);
                    }
                    backoff.next_delay(&mut rng)
                }
                Outcome::Stopped { session, driver } => {
                    draining.push((session, driver));
                    break;
                }
            },
        };
        if !delay.is_zero() {
            info!(
                "next dial in {} ms (attempt {})",
                delay.as_millis(),
                backoff.attempt()
            );
            let why = rt.why.borrow().clone();
            rt.service.status(&service::reconnecting(delay, &why));
            let stopped = async {
                Timer::after(delay).await;
                false
            }
            .or(async {
                stop.wait().await;
                true
            })
            .await;
            if stopped {
                break;
            }
        }
    }

    // Graceful stop: no new streams anywhere, let open ones finish briefly.
    draining.retain(|(_, t)| !t.is_finished());
    let streams: usize = draining.iter().map(|(s, _)| s.live_streams()).sum();
    for (s, _) in &draining {
        s.goaway(ErrorCode::NO_ERROR);
    }
    if !draining.is_empty() {
        info!(
            "stopping: {} session(s), {streams} stream(s) open; waiting up to {} s",
            draining.len(),
            SHUTDOWN_GRACE.as_secs()
        );
    }
    let all = async {
        for (_, driver) in draining {
            let end = driver.await;
            info!("session closed: {end}");
        }
    };
    if tether_driver::timeout(SHUTDOWN_GRACE, all).await.is_none() {
        warn!(
            "streams still open after {} s; closing anyway",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(
            super::printable("CN=cam-7,O=Acme \"x\""),
            "CN=cam-7,O=Acme \"x\""
        );
        assert_eq!(
            super::printable("evil\nINFO forged\u{1b}[2J"),
            "evil\\nINFO forged\\u{1b}[2J"
        );
    }
}
