//! Token scopes, part of the edge's policy model and, like [`crate::policy`],
//! pure (no I/O, no clock): what a token may bind ([`BindRule`]s, in the
//! spirit of ngrok's `bind:` rules) and where it may connect from
//! ([`Scope::sources`]).
//!
//! A rule is one of:
//! - an exact endpoint name: `cam.site-42` allows only that endpoint;
//! - `*.<suffix>`: every endpoint whose name ends in `.<suffix>`, at any
//!   depth (`*.site-42` allows `cam.site-42` and `a.cam.site-42`, not
//!   `site-42` itself nor `cam.site-420`);
//! - `*`: every endpoint. Only when asked for explicitly: it is never the
//!   default, and an empty rule list allows nothing.
//!
//! Sources are CIDRs checked at `Hello` (and again when the token changes):
//! an empty list admits every address.
//!
//! The stored and displayed form of a rule list is its rules joined by `,`
//! (names have no `,`); the one the edge's code before scopes stored (`*`
//! or `a,b`) is the same form, which is why a migrated allow list means what
//! it meant.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// One bind rule; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BindRule {
    /// `*`: every endpoint.
    Any,
    /// An exact endpoint name.
    Exact(String),
    /// `*.<suffix>`: holds `.<suffix>`, with its leading dot.
    Suffix(String),
}

/// Why a rule or a source does not parse: the text and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeError {
    /// The text that was refused.
    pub text: String,
    /// Why.
    pub reason: &'static str,
}

impl fmt::Display for ScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.text, self.reason)
    }
}

impl std::error::Error for ScopeError {}

impl FromStr for BindRule {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<BindRule, ScopeError> {
        let err = |reason| ScopeError {
            text: s.to_owned(),
            reason,
        };
        if s == "*" {
            return Ok(BindRule::Any);
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            // The suffix is itself a name, and there must be room for at
            // least one label before it.
            if !tether_proto::valid_endpoint_name(suffix)
                || suffix.len() + 2 > tether_proto::MAX_ENDPOINT_NAME
            {
                return Err(err("after '*.' comes the end of endpoint names: DNS labels of lowercase letters, digits and inner '-', joined by '.'"));
            }
            return Ok(BindRule::Suffix(format!(".{suffix}")));
        }
        if s.contains('*') {
            return Err(err(
                "a rule is an endpoint name, '*.' and the end of names, or '*' alone",
            ));
        }
        if !tether_proto::valid_endpoint_name(s) {
            return Err(err("not an endpoint name: DNS labels of lowercase letters, digits and inner '-', joined by '.', at most 127 bytes"));
        }
        Ok(BindRule::Exact(s.to_owned()))
    }
}

impl fmt::Display for BindRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindRule::Any => f.write_str("*"),
            BindRule::Exact(n) => f.write_str(n),
            BindRule::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl BindRule {
    /// Whether the rule allows `endpoint`.
    pub fn matches(&self, endpoint: &str) -> bool {
        match self {
            BindRule::Any => true,
            BindRule::Exact(n) => n == endpoint,
            BindRule::Suffix(s) => endpoint.len() > s.len() && endpoint.ends_with(s.as_str()),
        }
    }
}

/// A token's bind rules, in the order the operator gave them (duplicates
/// dropped).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules(Vec<BindRule>);

impl Rules {
    /// Parses each rule; the first that fails is the error.
    pub fn parse<I, S>(rules: I) -> Result<Rules, ScopeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out: Vec<BindRule> = Vec::new();
        for r in rules {
            let r: BindRule = r.as_ref().trim().parse()?;
            if !out.contains(&r) {
                out.push(r);
            }
        }
        Ok(Rules(out))
    }

    /// Parses the stored form (rules joined by `,`).
    pub fn parse_stored(s: &str) -> Result<Rules, ScopeError> {
        Rules::parse(s.split(',').map(str::trim).filter(|r| !r.is_empty()))
    }

    /// Rules that allow exactly these names.
    pub fn exact<I: IntoIterator<Item = String>>(names: I) -> Rules {
        let mut out: Vec<BindRule> = Vec::new();
        for n in names {
            let r = BindRule::Exact(n);
            if !out.contains(&r) {
                out.push(r);
            }
        }
        Rules(out)
    }

    /// `*`.
    pub fn any() -> Rules {
        Rules(vec![BindRule::Any])
    }

    /// The first rule that allows `endpoint`, if one does.
    pub fn permitting(&self, endpoint: &str) -> Option<&BindRule> {
        self.0.iter().find(|r| r.matches(endpoint))
    }

    /// The rules, in order.
    pub fn iter(&self) -> impl Iterator<Item = &BindRule> {
        self.0.iter()
    }

    /// Whether there are none (such a token may bind nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The stored form: the rules joined by `,`.
impl fmt::Display for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Parses source CIDRs (`10.0.0.0/8`, `2001:db8::/32`; a bare address is
/// its own /32 or /128). Host bits must be zero: `10.0.0.1/8` is refused,
/// not silently widened or narrowed.
pub fn parse_sources<I, S>(sources: I) -> Result<Vec<IpNet>, ScopeError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out: Vec<IpNet> = Vec::new();
    for s in sources {
        let s = s.as_ref().trim();
        let err = |reason| ScopeError {
            text: s.to_owned(),
            reason,
        };
        let net =
            match s.parse::<IpNet>() {
                Ok(n) if n.trunc() != n => return Err(err(
                    "host bits are set after the prefix length (did you mean the network address?)",
                )),
                Ok(n) => n,
                Err(_) => match s.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => {
                        return Err(err(
                            "not a CIDR (like 10.0.0.0/8 or 2001:db8::/32) or an IP address",
                        ))
                    }
                },
            };
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// What a token may do: its bind rules and its source addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// What it may bind.
    pub rules: Rules,
    /// Where it may connect from; empty: anywhere.
    pub sources: Vec<IpNet>,
}

impl Scope {
    /// Whether an agent at `ip` may use the token. An IPv4-mapped IPv6
    /// address (a dual-stack listener's view of an IPv4 peer) is checked as
    /// the IPv4 address it is.
    pub fn admits(&self, ip: IpAddr) -> bool {
        if self.sources.is_empty() {
            return true;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.sources.iter().any(|n| n.contains(&ip))
    }

    /// The sources in their stored and displayed form, joined by `,`
    /// (empty: any).
    pub fn sources_text(&self) -> String {
        let v: Vec<String> = self.sources.iter().map(IpNet::to_string).collect();
        v.join(",")
    }

    /// A short summary for refusals and logs: `bind=a,*.b sources=10.0.0.0/8`.
    pub fn summary(&self) -> String {
        if self.sources.is_empty() {
            format!("bind={}", self.rules)
        } else {
            format!("bind={} sources={}", self.rules, self.sources_text())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_whole_labels_at_any_depth() {
        let r: BindRule = "*.site-42".parse().unwrap();
        assert!(r.matches("cam.site-42"));
        assert!(r.matches("ssh.site-42"));
        assert!(r.matches("a.cam.site-42"));
        assert!(!r.matches("site-42"), "the suffix itself is not below it");
        assert!(!r.matches("cam.site-43"));
        assert!(!r.matches("cam.site-420"));
        assert!(
            !r.matches("camsite-42"),
            "a label boundary, not a string suffix"
        );
        let exact: BindRule = "cam.site-42".parse().unwrap();
        assert!(exact.matches("cam.site-42") && !exact.matches("cam.site-4"));
        assert!("*".parse::<BindRule>().unwrap().matches("anything"));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for bad in [
            "", "*cam", "cam*", "*.", "*.*", "**", "Cam", "a..b", "*.-x", "a_b",
        ] {
            let e = bad.parse::<BindRule>().unwrap_err();
            assert_eq!(e.text, bad);
            assert!(!e.reason.is_empty());
        }
        let long = format!("*.{}", "a".repeat(126));
        assert!(long.parse::<BindRule>().is_err(), "no room for a label");
    }

    #[test]
    fn the_stored_form_round_trips_and_reads_the_old_allow_lists() {
        // What the edge stored before scopes: `*` or names joined by ','.
        assert_eq!(Rules::parse_stored("*").unwrap(), Rules::any());
        let old = Rules::parse_stored("web,ssh").unwrap();
        assert!(old.permitting("web").is_some() && old.permitting("db").is_none());
        let r = Rules::parse(["cam.site-42", "*.site-42", "cam.site-42", "*"]).unwrap();
        assert_eq!(r.to_string(), "cam.site-42,*.site-42,*");
        assert_eq!(Rules::parse_stored(&r.to_string()).unwrap(), r);
        assert!(Rules::parse_stored("").unwrap().is_empty());
        assert_eq!(
            r.permitting("x.site-42").map(ToString::to_string),
            Some("*.site-42".to_owned()),
            "the first rule that allows it is named"
        );
    }

    #[test]
    fn sources_admit_their_networks_only() {
        let s = Scope {
            rules: Rules::any(),
            sources: parse_sources(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]).unwrap(),
        };
        assert!(s.admits("10.1.2.3".parse().unwrap()));
        assert!(s.admits("::ffff:10.1.2.3".parse().unwrap()), "v4-mapped");
        assert!(s.admits("192.0.2.7".parse().unwrap()));
        assert!(!s.admits("192.0.2.8".parse().unwrap()));
        assert!(s.admits("2001:db8::1".parse().unwrap()));
        assert!(!s.admits("127.0.0.1".parse().unwrap()));
        assert_eq!(s.sources_text(), "10.0.0.0/8,2001:db8::/32,192.0.2.7/32");
        assert!(Scope::default().admits("127.0.0.1".parse().unwrap()));
        let e = parse_sources(["10.0.0.1/8"]).unwrap_err();
        assert!(e.reason.contains("host bits"), "{e}");
        assert!(parse_sources(["ten"]).is_err());
    }
}
