//! Operating-system tools for the tests and the bench: what a process holds
//! (`/proc/PID/fd`, `VmRSS`, its open-file limit), this process's own
//! open-file limit, and TCP connects that choose their source address and
//! receive buffer (std's `TcpStream::connect` can do neither).
//!
//! Linux only, without `unsafe` (rustix does the system calls). It knows
//! nothing about tether.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// How many file descriptors process `pid` has open (entries of
/// `/proc/PID/fd`); 0 if it cannot be read.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A `Vm*` line of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes; 0 if absent.
pub fn vm(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The mappings of `pid` holding at least 256 KiB resident, largest first:
/// (size, rss, name) in bytes, to see where a high RSS lives (`[heap]`,
/// an anonymous arena, a library).
pub fn big_mappings(pid: u32) -> Vec<(u64, u64, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out = Vec::new();
    let mut cur: Option<(u64, String)> = None;
    for l in s.lines() {
        let mut f = l.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let name = f.nth(4).unwrap_or("[anon]").to_owned();
                cur = Some((b - a, name));
                continue;
            }
        }
        if first == "Rss:" {
            let kb: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if let Some((size, name)) = cur.take() {
                if kb >= 256 {
                    out.push((size, kb * 1024, name));
                }
            }
        }
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.1));
    out
}

/// [`big_mappings`] as one line: `name size/resident KiB, ...`.
pub fn big_mappings_line(pid: u32) -> String {
    big_mappings(pid)
        .iter()
        .map(|(size, rss, name)| format!("{name} {}/{} KiB", size / 1024, rss / 1024))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resident memory of `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    vm(pid, "VmRSS")
}

/// The `Max open files` (soft, hard) of process `pid` from `/proc/PID/limits`;
/// `None` stands for "unlimited".
pub fn nofile_of(pid: u32) -> Option<(Option<u64>, Option<u64>)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    let num = |v: Option<&str>| -> Option<Option<u64>> {
        match v? {
            "unlimited" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    Some((num(f.next())?, num(f.next())?))
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to at least `want` (as
/// far as the hard limit allows); returns the soft limit now in force.
/// Children started afterwards inherit it.
pub fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current.unwrap_or(u64::MAX);
    if soft >= want {
        return soft;
    }
    let target = cur.maximum.map_or(want, |h| h.min(want));
    let mut new = cur;
    new.current = Some(target);
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => target,
        Err(_) => soft,
    }
}

fn tcp_socket(
    addr: &SocketAddr,
    source: Option<IpAddr>,
    rcvbuf: Option<usize>,
) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    if let Some(n) = rcvbuf {
        // Before connect, so the window the peer sees is small from the start.
        rustix::net::sockopt::set_socket_recv_buffer_size(&fd, n)?;
    }
    if let Some(ip) = source {
        rustix::net::bind(&fd, &SocketAddr::new(ip, 0))?;
    }
    match rustix::net::connect(&fd, addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(fd),
        Err(e) => Err(e.into()),
    }
}

/// Starts a TCP connect to `addr` from `source` (port chosen by the OS) and
/// returns at once with the non-blocking socket, connected or still
/// connecting: for floods that hold sockets without waiting on each.
pub fn start_connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    Ok(TcpStream::from(tcp_socket(&addr, source, None)?))
}

/// A blocking TCP connection to `addr`, from `source` if given, with a
/// receive buffer of `rcvbuf` bytes if given (the kernel doubles it and
/// enforces a minimum), connected within `timeout`.
pub fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    rcvbuf: Option<usize>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let fd = tcp_socket(&addr, source, rcvbuf)?;
    let ts = Timespec::try_from(timeout).map_err(|_| io::Error::other("timeout too large"))?;
    let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
    let ready = poll(&mut fds, Some(&ts))?;
    if ready == 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {timeout:?}"),
        ));
    }
    let stream = TcpStream::from(fd);
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    rustix::io::ioctl_fionbio(stream.as_fd(), false)?;
    Ok(stream)
}

/// Whether a non-blocking socket has been closed by its peer (EOF or an
/// error), without consuming anything: false while it is open or still
/// connecting.
pub fn is_closed(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// Whether something accepts TCP connections at `addr` right now.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// The send and receive queues (bytes) of the IPv4 TCP socket with
/// `local` and `remote` addresses, from `/proc/net/tcp` (any process's):
/// `tx` is what its owner wrote that the peer has not acknowledged, `rx`
/// what arrived that its owner has not read. None if there is no such socket.
pub fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| -> Option<String> {
        match a {
            // The address as the kernel's host-order u32, the port as a number.
            SocketAddr::V4(v4) => Some(format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(v4.ip().octets()),
                v4.port()
            )),
            SocketAddr::V6(_) => None,
        }
    };
    let (l, r) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[1] != l || f[2] != r {
            return None;
        }
        let (tx, rx) = f[4].split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// What a process holds at one moment: open fds and resident bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Open file descriptors.
    pub fds: usize,
    /// Resident bytes (VmRSS).
    pub rss: u64,
}

impl Usage {
    /// The usage of process `pid` now.
    pub fn of(pid: u32) -> Usage {
        Usage {
            fds: fd_count(pid),
            rss: rss(pid),
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fds, {:.1} MiB RSS",
            self.fds,
            self.rss as f64 / 1048576.0
        )
    }
}
