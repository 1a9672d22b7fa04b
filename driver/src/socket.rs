//! Kernel-side dead-peer detection for the tunnel's TCP socket.
//!
//! The mux's heartbeat (PROTOCOL.md section 4) notices a silent peer only
//! while the driver reads; it cannot free a socket whose send queue is full of
//! bytes a peer never acknowledges. [`tune_tunnel_socket`] hands both cases
//! to the kernel as well: TCP keepalive probes an idle connection, and
//! `TCP_USER_TIMEOUT` kills one whose sent data stays unacknowledged for
//! longer than the heartbeat's `dead_after`, so a peer that stops reading
//! cannot hold the socket (and the session behind it) forever.
//!
//! This module owns only the socket options; it does not touch the mux, the
//! timer or TLS. Call it on the TCP socket before wrapping it in TLS.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use rustix::net::sockopt;

/// Keepalive probes sent before the kernel gives up on a silent peer.
pub const KEEPALIVE_PROBES: u32 = 3;

/// The kernel's ceiling for `TCP_KEEPIDLE` and `TCP_KEEPINTVL`, in seconds
/// (`MAX_TCP_KEEPIDLE`, `MAX_TCP_KEEPINTVL` in Linux).
const MAX_KEEPALIVE_SECS: u64 = 32_767;

/// The option values [`tune_tunnel_socket`] derives from `dead_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelSocketTimes {
    /// `TCP_KEEPIDLE`: idle time before the first probe, in seconds.
    pub keepidle_secs: u32,
    /// `TCP_KEEPINTVL`: time between probes, in seconds.
    pub keepintvl_secs: u32,
    /// `TCP_KEEPCNT`: unanswered probes before the connection is dropped.
    pub keepcnt: u32,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged, in ms.
    pub user_timeout_ms: u32,
}

impl TunnelSocketTimes {
    /// The values for `dead_after`: half of it idle, then
    /// [`KEEPALIVE_PROBES`] probes spread over the other half, so the kernel
    /// declares a silent peer dead after about `dead_after`; unacknowledged
    /// data for `dead_after` kills the connection.
    ///
    /// Clamped so the kernel accepts them: every time is at least 1 s
    /// (`dead_after` below 1 s counts as 1 s), the keepalive times are at
    /// most 32767 s each, and the user timeout at most `i32::MAX` ms
    /// (about 24.8 days).
    pub fn for_dead_after(dead_after: Duration) -> TunnelSocketTimes {
        let secs = dead_after.as_secs().max(1);
        let idle = (secs / 2).clamp(1, MAX_KEEPALIVE_SECS);
        let intvl = ((secs - secs / 2) / u64::from(KEEPALIVE_PROBES)).clamp(1, MAX_KEEPALIVE_SECS);
        let ms = dead_after.as_millis().clamp(1000, i32::MAX as u128);
        TunnelSocketTimes {
            // Each fits: clamped to 32767 and i32::MAX above.
            keepidle_secs: idle as u32,
            keepintvl_secs: intvl as u32,
            keepcnt: KEEPALIVE_PROBES,
            user_timeout_ms: ms as u32,
        }
    }
}

/// Tunes the tunnel's TCP socket so the kernel detects a dead peer on the
/// order of `dead_after` (pass the mux's `Config::dead_after`):
///
/// - `SO_KEEPALIVE` on, with `TCP_KEEPIDLE` = `dead_after / 2`,
///   `TCP_KEEPINTVL` = `dead_after / 2 / 3` and `TCP_KEEPCNT` = 3;
/// - `TCP_USER_TIMEOUT` = `dead_after`: data unacknowledged for longer
///   than that kills the connection, so a peer that stops reading cannot
///   hold the socket forever (the driver then sees the error and ends).
///
/// Values are clamped to at least 1 s and to what the kernel's types hold
/// (see [`TunnelSocketTimes::for_dead_after`]). Call it on the TCP socket
/// (e.g. an `Async<TcpStream>`) before the TLS handshake; it fails with the
/// kernel's error on a socket that is not TCP. Linux (and Android) only:
/// `TCP_USER_TIMEOUT` exists nowhere else.
pub fn tune_tunnel_socket(sock: impl AsFd, dead_after: Duration) -> io::Result<()> {
    let fd = sock.as_fd();
    let t = TunnelSocketTimes::for_dead_after(dead_after);
    sockopt::set_socket_keepalive(fd, true)?;
    sockopt::set_tcp_keepidle(fd, Duration::from_secs(t.keepidle_secs.into()))?;
    sockopt::set_tcp_keepintvl(fd, Duration::from_secs(t.keepintvl_secs.into()))?;
    sockopt::set_tcp_keepcnt(fd, t.keepcnt)?;
    sockopt::set_tcp_user_timeout(fd, t.user_timeout_ms)?;
    Ok(())
}
