//! The dialer, in this process against the fake edge of `common`.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::{Answer, FakeEdge, Pki, TempDir};
use futures_rustls::rustls::pki_types::ServerName;
use futures_rustls::TlsConnector;
use rustix::net::sockopt;
use tether_driver::TunnelSocketTimes;
use tetherd::config::HostPort;

#[test]
fn the_tunnel_socket_gets_keepalive_and_user_timeout_from_dead_after() {
    let pki = Pki::new("tether test CA");
    let edge = FakeEdge::start(&pki, Answer::Silent);
    let dir = TempDir::new("dial");
    let ca = dir.write("ca.pem", &pki.ca_pem, 0o644);
    let tls = TlsConnector::from(tetherd::dial::client_config(Some(&ca)).expect("trust"));
    let hp = HostPort::parse(&edge.addr.to_string()).expect("host:port");
    let name = ServerName::try_from("edge.test").expect("name");
    // Not the kernel's defaults (keepalive off, no user timeout, 7200 s idle).
    for dead_after in [Duration::from_millis(90_000), Duration::from_millis(4_500)] {
        let (stream, _) =
            async_io::block_on(tetherd::dial::dial(&hp, &name, &tls, dead_after)).expect("dial");
        let fd = stream.get_ref().0.get_ref().as_fd();
        let want = TunnelSocketTimes::for_dead_after(dead_after);
        assert!(sockopt::socket_keepalive(fd).expect("SO_KEEPALIVE"));
        assert_eq!(
            sockopt::tcp_keepidle(fd).expect("TCP_KEEPIDLE"),
            Duration::from_secs(want.keepidle_secs.into())
        );
        assert_eq!(
            sockopt::tcp_keepintvl(fd).expect("TCP_KEEPINTVL"),
            Duration::from_secs(want.keepintvl_secs.into())
        );
        assert_eq!(sockopt::tcp_keepcnt(fd).expect("TCP_KEEPCNT"), want.keepcnt);
        assert_eq!(
            sockopt::tcp_user_timeout(fd).expect("TCP_USER_TIMEOUT"),
            dead_after.as_millis() as u32,
            "TCP_USER_TIMEOUT is dead_after"
        );
    }
}
