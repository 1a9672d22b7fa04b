//! `host:port`, as both programs read it: tetherd's `edge` and `upstream`,
//! and `tether-edge provision`'s `--edge` and endpoint upstreams, which it
//! writes into the tetherd.toml of each bundle and so must accept exactly
//! what tetherd will.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer};

/// A `host:port` pair; an IPv6 host is written in brackets (`[::1]:7443`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP address, without brackets.
    pub host: String,
    /// Port, never 0.
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port`.
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not host:port"))?;
        let host = match host.strip_prefix('[') {
            Some(h) => h
                .strip_suffix(']')
                .ok_or_else(|| format!("`{s}`: unclosed '['"))?,
            None if host.contains(':') => {
                return Err(format!(
                    "`{s}`: write an IPv6 address in brackets, as [addr]:port"
                ))
            }
            None => host,
        };
        if host.is_empty()
            || host
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(format!("`{s}`: empty or invalid host"));
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(HostPort {
                host: host.to_owned(),
                port: p,
            }),
            _ => Err(format!("`{s}`: port must be 1..=65535")),
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<HostPort, D::Error> {
        let s = String::deserialize(d)?;
        HostPort::parse(&s).map_err(de::Error::custom)
    }
}
