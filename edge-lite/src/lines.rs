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
