//! What tetherd tells systemd, through [`tether_notify`]: `READY=1` once the
//! config and the credential are validated and the first dial starts (not
//! once connected: a device without network must still finish booting),
//! `STATUS=` lines a person reads in `systemctl status`, `RELOADING=1` and
//! `READY=1` around a SIGHUP reload, `STOPPING=1` on stop, and `WATCHDOG=1`
//! from [`watchdog`], a task of the daemon's one executor, so that a wedged
//! event loop stops the pings and systemd restarts it.
//!
//! Without `$NOTIFY_SOCKET` every call here is a no-op. A failed send is
//! logged once at debug level and otherwise ignored: systemd's socket being
//! full or gone is no reason to stop serving.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use tether_notify::Notifier;

/// The notifier and what was last said through it.
pub(crate) struct Service {
    notifier: Notifier,
    failed: Cell<bool>,
}

impl Service {
    /// The service `$NOTIFY_SOCKET` names (a no-op one without it).
    pub(crate) fn new(notifier: Notifier) -> Service {
        Service {
            notifier,
            failed: Cell::new(false),
        }
    }

    fn send(&self, msg: &str) {
        if let Err(e) = self.notifier.send(msg) {
            if !self.failed.replace(true) {
                log::debug!("sd_notify {msg:?} failed: {e} (further failures not logged)");
            }
        }
    }

    /// `READY=1` with a status line.
    pub(crate) fn ready(&self, status: &str) {
        if self.notifier.enabled() {
            self.send(&format!("READY=1\nSTATUS={status}"));
        }
    }

    /// `STATUS=<line>`.
    pub(crate) fn status(&self, line: &str) {
        if self.notifier.enabled() {
            self.send(&format!("STATUS={}", line.replace('\n', " ")));
        }
    }

    /// `RELOADING=1`.
    pub(crate) fn reloading(&self) {
        self.send("RELOADING=1");
    }

    /// `STOPPING=1`.
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// `WATCHDOG=1`.
    pub(crate) fn ping(&self) {
        self.send("WATCHDOG=1");
    }
}

/// Sends `WATCHDOG=1` every `every`, forever. It runs on the daemon's one
/// executor beside the sessions: when any task blocks that thread, or the
/// executor stops polling, the pings stop and systemd's `WatchdogSec=`
/// restarts the daemon.
pub(crate) async fn watchdog(service: Rc<Service>, every: Duration) {
    loop {
        service.ping();
        async_io::Timer::after(every).await;
    }
}

/// "reconnecting in 8 s: connection refused": `delay` in seconds, with one
/// decimal under 10 s, rounded (in integers: the line needs no float
/// formatting code in the binary).
pub(crate) fn reconnecting(delay: Duration, why: &str) -> String {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX / 2);
    let tenths = (ms + 50) / 100;
    if tenths < 100 {
        format!("reconnecting in {}.{} s: {why}", tenths / 10, tenths % 10)
    } else {
        format!("reconnecting in {} s: {why}", (ms + 500) / 1000)
    }
}

/// "connected to edge.example.com:7443, 2 endpoints", with those not (yet)
/// published said too.
pub(crate) fn connected(edge: &str, bound: usize, configured: usize) -> String {
    let noun = if bound == 1 { "endpoint" } else { "endpoints" };
    if bound >= configured {
        format!("connected to {edge}, {bound} {noun}")
    } else {
        format!(
            "connected to {edge}, {bound} {noun} ({} not bound)",
            configured - bound
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::time::Instant;

    #[test]
    fn status_lines_read_as_a_person_expects() {
        assert_eq!(
            reconnecting(Duration::from_secs(8), "connection refused"),
            "reconnecting in 8.0 s: connection refused"
        );
        assert_eq!(
            reconnecting(Duration::from_millis(61_400), "x"),
            "reconnecting in 61 s: x"
        );
        assert_eq!(
            reconnecting(Duration::from_millis(9_960), "x"),
            "reconnecting in 10 s: x"
        );
        assert_eq!(
            reconnecting(Duration::from_millis(249), "x"),
            "reconnecting in 0.2 s: x"
        );
        assert_eq!(
            connected("edge.example.com:7443", 2, 2),
            "connected to edge.example.com:7443, 2 endpoints"
        );
        assert_eq!(
            connected("e:1", 1, 3),
            "connected to e:1, 1 endpoint (2 not bound)"
        );
    }

    /// The invariant of the watchdog: its pings come from the executor's own
    /// loop. A task that blocks the loop for 600 ms leaves a gap of at least
    /// that in pings sent every 50 ms; a timer thread would have gone on.
    #[test]
    fn a_stalled_loop_stops_the_pings() {
        let dir = std::env::temp_dir().join(format!("tetherd-wd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let service = Rc::new(Service::new(Notifier::to(path.to_str().unwrap()).unwrap()));
        let reader = std::thread::spawn(move || {
            let mut at = Vec::new();
            let mut buf = [0u8; 64];
            let end = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < end {
                if let Ok(n) = rx.recv(&mut buf) {
                    assert_eq!(&buf[..n], b"WATCHDOG=1");
                    at.push(Instant::now());
                }
            }
            at
        });
        let ex = async_executor::LocalExecutor::new();
        let _wd = ex.spawn(watchdog(service, Duration::from_millis(50)));
        async_io::block_on(ex.run(async {
            async_io::Timer::after(Duration::from_millis(300)).await;
            // The wedge: a task that never yields for 600 ms.
            std::thread::sleep(Duration::from_millis(600));
            async_io::Timer::after(Duration::from_millis(400)).await;
        }));
        drop(ex);
        let at = reader.join().unwrap();
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        let longest = gaps.iter().max().copied().unwrap_or_default();
        assert!(
            longest >= Duration::from_millis(550),
            "no gap while the loop was stalled: {gaps:?}"
        );
        let before_and_after = gaps
            .iter()
            .filter(|g| **g < Duration::from_millis(200))
            .count();
        assert!(
            before_and_after >= 6,
            "pings before and after the stall: {gaps:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
