//! The machine-readable stdout lines (`LISTEN`, `BOUND`, `UNBOUND`; the
//! README lists them), written by one thread of their own so that a slow or
//! stalled reader of stdout never blocks the executor. Lines keep their
//! order; [`flush`] waits until every line emitted so far is written.
//!
//! The queue is bounded: lines come from binding changes, which the limits
//! bound, and should stdout stall for long, a line past the bound is dropped
//! with a log warning rather than held in memory.

use std::io::Write as _;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

/// Lines that may wait for stdout.
const QUEUE: usize = 4096;

enum Item {
    Line(String),
    Flush(mpsc::Sender<()>),
}

fn writer() -> &'static SyncSender<Item> {
    static TX: OnceLock<SyncSender<Item>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<Item>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || {
                for item in rx {
                    match item {
                        Item::Line(l) => {
                            let mut out = std::io::stdout().lock();
                            let _ = writeln!(out, "{l}");
                            let _ = out.flush();
                        }
                        Item::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the stdout thread: {e}");
        }
        tx
    })
}

/// Queues one line for stdout; never blocks.
pub fn emit(line: String) {
    match writer().try_send(Item::Line(line)) {
        Ok(()) => {}
        Err(TrySendError::Full(Item::Line(l))) => {
            log::warn!("stdout is not being read: dropped line {l:?}")
        }
        Err(_) => log::warn!("stdout thread is gone"),
    }
}

/// Waits (at most `limit`) until every line queued so far is written.
pub fn flush(limit: Duration) {
    let (tx, rx) = mpsc::channel();
    if writer().send(Item::Flush(tx)).is_ok() {
        let _ = rx.recv_timeout(limit);
    }
}

/// A pause point for the rotation crash tests, in debug builds only (the
/// release build has none): with `TETHER_TEST_PAUSE=<step>:<gate file>`,
/// reaching `step` prints `PAUSED <step>` and blocks the whole edge while
/// the gate file exists, so that a test can kill it with SIGKILL exactly
/// there, or let it go on by removing the file.
pub(crate) fn test_pause(step: &str) {
    #[cfg(debug_assertions)]
    if let Some(spec) = std::env::var_os("TETHER_TEST_PAUSE") {
        let spec = spec.to_string_lossy();
        if let Some((at, gate)) = spec.split_once(':') {
            if at == step {
                emit(format!("PAUSED {step}"));
                while std::path::Path::new(gate).exists() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}
