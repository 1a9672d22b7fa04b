//! The PROXY protocol v2 header that tetherd writes to an upstream before a
//! stream's first byte, when the endpoint says `proxy_protocol = "v2"`, so
//! that the device's service sees the public client rather than tetherd.
//!
//! The format (haproxy's `proxy-protocol.txt`, section 2.2) is a fixed
//! 16-byte header — the 12-byte signature `\r\n\r\n\0\r\nQUIT\n`, the
//! version and command (`0x21` PROXY, `0x20` LOCAL), the family and
//! transport (`0x11` TCP over IPv4, `0x21` TCP over IPv6, `0x00` unspecified)
//! and the big-endian length of what follows — then the address block
//! (source address, destination address, source port, destination port;
//! 12 bytes for IPv4, 36 for IPv6) and type-length-value records:
//!
//! - `PP2_TYPE_AUTHORITY` (`0x02`): the TLS server name the client sent;
//! - `PP2_TYPE_SSL` (`0x20`), only with a verified client certificate:
//!   `client` = `PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN`, `verify` = 0 (the
//!   edge verified it), and the sub-record `PP2_SUBTYPE_SSL_CN` (`0x22`)
//!   with the certificate's common name when it has one.
//!
//! When the family of the two addresses differs, both are written as IPv6
//! (an IPv4 address as `::ffff:a.b.c.d`); an IPv4-mapped IPv6 address is
//! written as the IPv4 address it maps. Without a known client address the
//! command is LOCAL with an unspecified family and nothing after the
//! header: a receiver discards the whole block of a LOCAL header (section
//! 2.2), so records would be ignored anyway.
//!
//! It is encoded by hand, into a buffer the caller owns: forty lines of
//! fixed layout do not earn a dependency on the device. This module does no
//! I/O; [`crate::proxy`] decides when to write the header.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2, command PROXY: the addresses are the real connection's.
const PROXY: u8 = 0x21;
/// Version 2, command LOCAL: no client address to convey.
const LOCAL: u8 = 0x20;
/// `AF_UNSPEC`, `UNSPEC`.
const UNSPEC: u8 = 0x00;
/// `AF_INET`, `STREAM`.
const TCP4: u8 = 0x11;
/// `AF_INET6`, `STREAM`.
const TCP6: u8 = 0x21;

/// `PP2_TYPE_AUTHORITY`: the host name the client asked for (SNI).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// `PP2_TYPE_SSL`: the client connected over TLS.
pub const PP2_TYPE_SSL: u8 = 0x20;
/// `PP2_SUBTYPE_SSL_CN`: the common name of the client certificate.
pub const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
/// `PP2_CLIENT_SSL`: the client connected over TLS.
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// `PP2_CLIENT_CERT_CONN`: it presented a certificate on this connection.
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;

/// What one header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    /// `(source, destination)`: the public client and the upstream. `None`
    /// when the client's address is unknown: a LOCAL header.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// The TLS server name the client sent, if any.
    pub authority: Option<&'a str>,
    /// `Some` when the client presented a certificate that the edge
    /// verified: its common name (empty when it has none).
    pub verified_client_cn: Option<&'a str>,
}

/// The header does not fit the buffer, or a record is longer than the
/// format's 16-bit lengths allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLong;

impl fmt::Display for TooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PROXY v2 header longer than its buffer or its 16-bit lengths")
    }
}

impl std::error::Error for TooLong {}

/// A cursor over the caller's buffer.
struct Out<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Out<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), TooLong> {
        let end = self.len.checked_add(bytes.len()).ok_or(TooLong)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(TooLong)?
            .copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    /// A record's type and 16-bit length; its value follows.
    fn tlv_head(&mut self, kind: u8, len: usize) -> Result<(), TooLong> {
        let len = u16::try_from(len).map_err(|_| TooLong)?;
        self.put(&[kind])?;
        self.put(&len.to_be_bytes())
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address; anything else as is.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

impl Header<'_> {
    /// Writes the header into `out` and returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, TooLong> {
        let mut o = Out { buf: out, len: 0 };
        o.put(&SIGNATURE)?;
        let Some((src, dst)) = self.addresses else {
            o.put(&[LOCAL, UNSPEC, 0, 0])?;
            return Ok(o.len);
        };
        let (src, dst) = (canonical(src), canonical(dst));
        let both_v4 = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Some((s, d)),
            _ => None,
        };
        o.put(&[PROXY, if both_v4.is_some() { TCP4 } else { TCP6 }])?;
        let length_at = o.len;
        o.put(&[0, 0])?; // the length, written last
        match both_v4 {
            Some((s, d)) => {
                o.put(&s.octets())?;
                o.put(&d.octets())?;
            }
            None => {
                o.put(&v6(src.ip()).octets())?;
                o.put(&v6(dst.ip()).octets())?;
            }
        }
        o.put(&src.port().to_be_bytes())?;
        o.put(&dst.port().to_be_bytes())?;
        if let Some(name) = self.authority.filter(|n| !n.is_empty()) {
            o.tlv_head(PP2_TYPE_AUTHORITY, name.len())?;
            o.put(name.as_bytes())?;
        }
        if let Some(cn) = self.verified_client_cn {
            // client (1) + verify (4), then the CN sub-record if any.
            let sub = if cn.is_empty() { 0 } else { 3 + cn.len() };
            o.tlv_head(PP2_TYPE_SSL, 5 + sub)?;
            o.put(&[PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN])?;
            o.put(&0u32.to_be_bytes())?; // verify: 0 = the certificate verified
            if !cn.is_empty() {
                o.tlv_head(PP2_SUBTYPE_SSL_CN, cn.len())?;
                o.put(cn.as_bytes())?;
            }
        }
        let rest = u16::try_from(o.len - 16).map_err(|_| TooLong)?;
        o.buf[length_at..length_at + 2].copy_from_slice(&rest.to_be_bytes());
        Ok(o.len)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn encode(h: &Header<'_>) -> Vec<u8> {
        let mut buf = [0u8; 1024];
        let n = h.encode(&mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn addrs(src: &str, dst: &str) -> Option<(SocketAddr, SocketAddr)> {
        Some((src.parse().unwrap(), dst.parse().unwrap()))
    }

    /// The signature, then version/command, family and length.
    fn head(cmd: u8, fam: u8, len: u16) -> Vec<u8> {
        let mut v = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a".to_vec();
        v.extend_from_slice(&[cmd, fam]);
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn ipv4_proxy_header_without_records() {
        let h = Header {
            addresses: addrs("127.0.0.2:40000", "127.0.0.1:8080"),
            authority: None,
            verified_client_cn: None,
        };
        let mut want = head(0x21, 0x11, 12);
        want.extend_from_slice(&[127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90]);
        assert_eq!(encode(&h), want);
    }

    #[test]
    fn ipv6_proxy_header_without_records() {
        let h = Header {
            addresses: addrs("[2001:db8::1]:443", "[::1]:8080"),
            authority: None,
            verified_client_cn: None,
        };
        let mut want = head(0x21, 0x21, 36);
        want.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0x01, 0xbb, 0x1f, 0x90]);
        assert_eq!(encode(&h), want);
    }

    #[test]
    fn mixed_families_are_both_written_as_ipv6_with_ipv4_mapped() {
        let h = Header {
            addresses: addrs("[2001:db8::7]:5000", "10.0.0.1:80"),
            authority: None,
            verified_client_cn: None,
        };
        let mut want = head(0x21, 0x21, 36);
        want.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
        want.extend_from_slice(&[0x13, 0x88, 0x00, 0x50]);
        assert_eq!(encode(&h), want);
    }

    #[test]
    fn an_ipv4_mapped_source_towards_an_ipv4_upstream_is_plain_ipv4() {
        let h = Header {
            addresses: addrs("[::ffff:192.0.2.9]:1234", "127.0.0.1:8080"),
            authority: None,
            verified_client_cn: None,
        };
        let mut want = head(0x21, 0x11, 12);
        want.extend_from_slice(&[192, 0, 2, 9, 127, 0, 0, 1, 0x04, 0xd2, 0x1f, 0x90]);
        assert_eq!(encode(&h), want);
    }

    #[test]
    fn unknown_client_is_local_with_unspecified_family_and_nothing_after() {
        let h = Header {
            addresses: None,
            authority: Some("web.example.com"),
            verified_client_cn: Some("cam-7"),
        };
        assert_eq!(encode(&h), head(0x20, 0x00, 0));
        assert_eq!(encode(&h).len(), 16);
    }

    #[test]
    fn sni_is_an_authority_record_after_the_addresses() {
        let h = Header {
            addresses: addrs("127.0.0.2:40000", "127.0.0.1:8080"),
            authority: Some("web.tether.test"),
            verified_client_cn: None,
        };
        let mut want = head(0x21, 0x11, 12 + 3 + 15);
        want.extend_from_slice(&[127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90]);
        want.extend_from_slice(&[0x02, 0x00, 0x0f]);
        want.extend_from_slice(b"web.tether.test");
        assert_eq!(encode(&h), want);
        // An empty server name is no record at all.
        let none = Header {
            authority: Some(""),
            ..h
        };
        assert_eq!(encode(&none).len(), 16 + 12);
    }

    #[test]
    fn verified_client_certificate_is_an_ssl_record_with_its_cn() {
        let h = Header {
            addresses: addrs("127.0.0.2:40000", "127.0.0.1:8080"),
            authority: Some("web.tether.test"),
            verified_client_cn: Some("cam-7"),
        };
        let ssl = 3 + 1 + 4 + 3 + 5;
        let mut want = head(0x21, 0x11, 12 + 3 + 15 + ssl);
        want.extend_from_slice(&[127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90]);
        want.extend_from_slice(&[0x02, 0x00, 0x0f]);
        want.extend_from_slice(b"web.tether.test");
        // PP2_TYPE_SSL, length 13: client 0x03, verify 0, then PP2_SUBTYPE_SSL_CN.
        want.extend_from_slice(&[0x20, 0x00, 13, 0x03, 0, 0, 0, 0]);
        want.extend_from_slice(&[0x22, 0x00, 0x05]);
        want.extend_from_slice(b"cam-7");
        assert_eq!(encode(&h), want);
    }

    #[test]
    fn a_certificate_without_cn_is_an_ssl_record_without_the_sub_record() {
        let h = Header {
            addresses: addrs("[::1]:9", "[::1]:10"),
            authority: None,
            verified_client_cn: Some(""),
        };
        let got = encode(&h);
        assert_eq!(got[..16], head(0x21, 0x21, 36 + 8)[..]);
        assert_eq!(got[16 + 36..], [0x20, 0x00, 0x05, 0x03, 0, 0, 0, 0]);
    }

    #[test]
    fn a_buffer_too_small_or_a_record_too_long_is_refused_not_truncated() {
        let h = Header {
            addresses: addrs("127.0.0.2:40000", "127.0.0.1:8080"),
            authority: Some("web.tether.test"),
            verified_client_cn: None,
        };
        let mut small = [0u8; 16 + 12 + 3 + 14];
        assert_eq!(h.encode(&mut small), Err(TooLong));
        let long = "a".repeat(70_000);
        let h = Header {
            authority: Some(&long),
            ..h
        };
        let mut big = vec![0u8; 80_000];
        assert_eq!(h.encode(&mut big), Err(TooLong));
    }
}
