//! What a program run by systemd needs from systemd's side, for both tether
//! programs, with nothing but std:
//!
//! - [`Notifier`]: the `sd_notify` protocol, one datagram per message to the
//!   unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the
//!   abstract namespace): `READY=1`, `STATUS=...`, `RELOADING=1`,
//!   `STOPPING=1`, `WATCHDOG=1`. Without `$NOTIFY_SOCKET` (not run by
//!   systemd, or `Type=simple`) every send is a no-op.
//! - [`watchdog_interval`]: how often to send `WATCHDOG=1`, from
//!   `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, when set, must be this process).
//!   Sending is the caller's job, from its own event loop: a timer thread
//!   would keep a wedged program alive.
//! - [`stderr_is_journal`]: whether stderr is the journal's stream
//!   (`$JOURNAL_STREAM` names its device and inode), so that log lines may
//!   carry `<N>` priority prefixes, and [`journal_priority`] for them.
//!
//! It does not log, spawn or read the environment more than once per call.

#![forbid(unsafe_code)]

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where `$NOTIFY_SOCKET` points.
#[derive(Debug, Clone)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

/// A connection to systemd's notification socket, or nothing.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, Target)>,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names; a no-op one when it is unset or
    /// empty. An error when it is set but unusable (not a path or `@name`,
    /// or no socket can be made): the caller should say so, since systemd
    /// waits for `READY=1` and will time the start out.
    pub fn from_env() -> io::Result<Notifier> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(Notifier::disabled()),
            Some(v) if v.is_empty() => Ok(Notifier::disabled()),
            Some(v) => Notifier::to(&v.to_string_lossy()),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { socket: None }
    }

    /// A notifier for the socket `addr` (a path, or `@name`).
    pub fn to(addr: &str) -> io::Result<Notifier> {
        let target = if let Some(name) = addr.strip_prefix('@') {
            Target::Abstract(name.as_bytes().to_vec())
        } else if addr.starts_with('/') {
            Target::Path(addr.into())
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={addr:?}: neither an absolute path nor @name"),
            ));
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier {
            socket: Some((sock, target)),
        })
    }

    /// Whether messages go anywhere.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends one message (newline-separated `KEY=VALUE` lines). A full
    /// socket buffer drops the message rather than block the caller's loop.
    pub fn send(&self, msg: &str) -> io::Result<()> {
        let Some((sock, target)) = &self.socket else {
            return Ok(());
        };
        match target {
            Target::Path(p) => sock.send_to(msg.as_bytes(), p).map(drop),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(msg.as_bytes(), &addr).map(drop)
            }
        }
    }

    /// `STATUS=<line>`, with any newline in `line` replaced (one message
    /// carries one status line).
    pub fn status(&self, line: &str) -> io::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        self.send(&format!("STATUS={}", line.replace('\n', " ")))
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, as systemd
/// recommends. `None` when the watchdog is off, or `$WATCHDOG_PID` names
/// another process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Whether stderr is the journal's stream: `$JOURNAL_STREAM` is
/// `<device>:<inode>` of the socket systemd connected stderr to, and stderr
/// is still that socket (not redirected since).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // /proc/self/fd/2 is followed to stderr's own inode.
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// The syslog priority (`<N>` prefix) of a log level: `error` 3, `warn` 4,
/// `info` 6, `debug` and `trace` 7. `level` is 1 (error) to 5 (trace), as
/// `log::Level as usize` gives it.
pub fn journal_priority(level: usize) -> u8 {
    match level {
        1 => 3,
        2 => 4,
        3 => 6,
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket_and_to_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("tether-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::to(path.to_str().expect("utf-8")).expect("notifier");
        n.send("READY=1").expect("send");
        n.status("connected\nto x").expect("status");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1");
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"STATUS=connected to x");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("tether-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        let n = Notifier::to(&format!("@{name}")).expect("notifier");
        n.send("WATCHDOG=1").expect("send");
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_relative_socket_path_is_an_error_and_disabled_sends_nothing() {
        assert!(Notifier::to("notify.sock").is_err());
        let n = Notifier::disabled();
        assert!(!n.enabled());
        n.send("READY=1").expect("no-op");
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!([1, 2, 3, 4, 5].map(journal_priority), [3, 4, 6, 7, 7]);
    }
}
