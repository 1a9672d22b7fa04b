//! `tune_tunnel_socket` on a real loopback TCP pair: every option is read
//! back from the kernel with rustix's getters.

#![cfg(any(target_os = "linux", target_os = "android"))]

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use rustix::net::sockopt;
use tether_driver::{tune_tunnel_socket, TunnelSocketTimes};

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let c = TcpStream::connect(l.local_addr().expect("local addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    (c, s)
}

/// Reads the options back and checks them against `want`.
fn assert_tuned(sock: &TcpStream, want: TunnelSocketTimes) {
    assert!(sockopt::socket_keepalive(sock).expect("SO_KEEPALIVE"));
    assert_eq!(
        sockopt::tcp_keepidle(sock).expect("TCP_KEEPIDLE"),
        Duration::from_secs(want.keepidle_secs.into())
    );
    assert_eq!(
        sockopt::tcp_keepintvl(sock).expect("TCP_KEEPINTVL"),
        Duration::from_secs(want.keepintvl_secs.into())
    );
    assert_eq!(
        sockopt::tcp_keepcnt(sock).expect("TCP_KEEPCNT"),
        want.keepcnt
    );
    assert_eq!(
        sockopt::tcp_user_timeout(sock).expect("TCP_USER_TIMEOUT"),
        want.user_timeout_ms
    );
}

#[test]
fn tunnel_socket_detects_a_dead_peer_after_about_dead_after() {
    let (c, s) = tcp_pair();
    let dead_after = Duration::from_secs(45);
    tune_tunnel_socket(&c, dead_after).expect("tune client");
    tune_tunnel_socket(&s, dead_after).expect("tune server");
    let want = TunnelSocketTimes {
        keepidle_secs: 22,
        keepintvl_secs: 7,
        keepcnt: 3,
        user_timeout_ms: 45_000,
    };
    assert_eq!(TunnelSocketTimes::for_dead_after(dead_after), want);
    assert_tuned(&c, want);
    assert_tuned(&s, want);
    // Probing gives up after about dead_after, never later than it.
    let probing = want.keepidle_secs + want.keepintvl_secs * want.keepcnt;
    assert!((40..=45).contains(&probing), "probing takes {probing} s");
}

#[test]
fn tunnel_socket_values_are_clamped_to_what_the_kernel_takes() {
    let (c, _s) = tcp_pair();
    // Below a second: every time is one second.
    tune_tunnel_socket(&c, Duration::from_millis(300)).expect("tune short");
    assert_tuned(
        &c,
        TunnelSocketTimes {
            keepidle_secs: 1,
            keepintvl_secs: 1,
            keepcnt: 3,
            user_timeout_ms: 1000,
        },
    );
    // Sub-second precision is kept for the user timeout.
    tune_tunnel_socket(&c, Duration::from_millis(2500)).expect("tune 2.5 s");
    assert_eq!(sockopt::tcp_user_timeout(&c).expect("get"), 2500);
    // Far beyond the kernel's limits: the largest values it accepts.
    tune_tunnel_socket(&c, Duration::from_secs(u64::MAX)).expect("tune huge");
    assert_tuned(
        &c,
        TunnelSocketTimes {
            keepidle_secs: 32_767,
            keepintvl_secs: 32_767,
            keepcnt: 3,
            user_timeout_ms: i32::MAX as u32,
        },
    );
}

#[test]
fn tuning_a_socket_that_is_not_tcp_fails_cleanly() {
    let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    assert!(tune_tunnel_socket(&u, Duration::from_secs(45)).is_err());
}
