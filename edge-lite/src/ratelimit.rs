//! Rate limits on failed agent authentication, per source (an IPv4 address
//! or an IPv6 /64, as `admission` counts them) and per token id: a token
//! bucket per key, which each failure drains and time refills. A failure
//! that finds its bucket empty is *limited*: the handshake delays its
//! refusal (holding its admission slot, so one source can hold at most
//! `pending_per_source` of them at once) instead of answering at once.
//!
//! Only failures count, and a limit never refuses a credential that
//! verifies: a token id is public, so an attacker who sprays one could
//! otherwise lock its device out.
//!
//! Pure: no I/O, the clock comes in as an `Instant`. The maps are bounded
//! (`MAX_KEYS` each): past it, the entries whose buckets have refilled are
//! dropped first (they hold no information), then the least recently
//! drained.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::admission::Source;
use crate::store::TokenId;

/// The most keys one map holds.
pub const MAX_KEYS: usize = 65_536;

/// What a failure met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit.
    Within,
    /// Over it; `first` for the first limited failure since the key's
    /// bucket was last full (one event, and one log line, per run of
    /// failures, however long it lasts).
    Limited {
        /// The first limited failure of a run.
        first: bool,
    },
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Failures still allowed, fractional while refilling.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// Whether a failure was limited since the bucket was last full.
    limited: bool,
}

/// Token buckets by key: `burst` failures, refilled at `burst` per `per`.
#[derive(Debug)]
pub struct Buckets<K> {
    burst: f64,
    per: Duration,
    map: HashMap<K, Bucket>,
}

impl<K: Eq + Hash + Clone> Buckets<K> {
    /// Buckets of `burst` failures each, refilled at `burst` per `per`.
    pub fn new(burst: u32, per: Duration) -> Buckets<K> {
        Buckets {
            burst: f64::from(burst.max(1)),
            per,
            map: HashMap::new(),
        }
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        let secs = now.saturating_duration_since(b.at).as_secs_f64();
        let rate = self.burst / self.per.as_secs_f64().max(1e-9);
        (b.tokens + secs * rate).min(self.burst)
    }

    /// Counts one failure of `key` at `now`.
    pub fn fail(&mut self, key: &K, now: Instant) -> Verdict {
        if !self.map.contains_key(key) && self.map.len() >= MAX_KEYS {
            self.evict(now);
        }
        let burst = self.burst;
        let tokens = match self.map.get(key) {
            Some(b) => self.refilled(b, now),
            None => burst,
        };
        let b = self.map.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
            limited: false,
        });
        b.at = now;
        if tokens >= burst {
            b.limited = false;
        }
        if tokens >= 1.0 {
            b.tokens = tokens - 1.0;
            Verdict::Within
        } else {
            b.tokens = tokens;
            let first = !b.limited;
            b.limited = true;
            Verdict::Limited { first }
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Makes room for one key: drops every refilled bucket, else the least
    /// recently drained one.
    fn evict(&mut self, now: Instant) {
        let burst = self.burst;
        let full: Vec<K> = self
            .map
            .iter()
            .filter(|(_, b)| self.refilled(b, now) >= burst)
            .map(|(k, _)| k.clone())
            .collect();
        if full.is_empty() {
            if let Some(k) = self
                .map
                .iter()
                .min_by_key(|(_, b)| b.at)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&k);
            }
        } else {
            for k in full {
                self.map.remove(&k);
            }
        }
    }
}

/// The two limits of the agent port.
#[derive(Debug)]
pub struct AuthLimits {
    /// Per source.
    pub sources: Buckets<Source>,
    /// Per token id (credentials with a token's form only).
    pub tokens: Buckets<TokenId>,
}

/// What [`AuthLimits::fail`] found: which keys are over their limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limited {
    /// The source is over its limit (`Some(first)`).
    pub source: Option<bool>,
    /// The token id is over its limit (`Some(first)`).
    pub token: Option<bool>,
}

impl Limited {
    /// Whether either limit was hit.
    pub fn any(&self) -> bool {
        self.source.is_some() || self.token.is_some()
    }
}

impl AuthLimits {
    /// `per_source` and `per_token` failures per minute, each a burst too.
    pub fn new(per_source: u32, per_token: u32) -> AuthLimits {
        let minute = Duration::from_secs(60);
        AuthLimits {
            sources: Buckets::new(per_source, minute),
            tokens: Buckets::new(per_token, minute),
        }
    }

    /// Counts one failed authentication from `source` (for `token`, when
    /// the credential named one).
    pub fn fail(&mut self, source: Source, token: Option<&TokenId>, now: Instant) -> Limited {
        let first = |v: Verdict| match v {
            Verdict::Within => None,
            Verdict::Limited { first } => Some(first),
        };
        Limited {
            source: first(self.sources.fail(&source, now)),
            token: token.and_then(|t| first(self.tokens.fail(t, now))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_failures_are_limited_until_time_refills() {
        let t0 = Instant::now();
        let mut b: Buckets<u32> = Buckets::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(b.fail(&1, t0), Verdict::Within);
        }
        assert_eq!(b.fail(&1, t0), Verdict::Limited { first: true });
        assert_eq!(b.fail(&1, t0), Verdict::Limited { first: false });
        // Another key has its own bucket.
        assert_eq!(b.fail(&2, t0), Verdict::Within);
        // 3 per minute: one failure allowed again after 20 s, not before
        // (a limited failure takes nothing; the bucket keeps refilling).
        assert!(matches!(
            b.fail(&1, t0 + Duration::from_secs(19)),
            Verdict::Limited { .. }
        ));
        let t40 = t0 + Duration::from_secs(40);
        assert_eq!(b.fail(&1, t40), Verdict::Within);
        assert_eq!(b.fail(&1, t40), Verdict::Within);
        // Still the same run: the bucket was never full meanwhile.
        assert_eq!(b.fail(&1, t40), Verdict::Limited { first: false });
        // A minute later it is full again, and a new run starts.
        let t100 = t40 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.fail(&1, t100), Verdict::Within);
        }
        assert_eq!(b.fail(&1, t100), Verdict::Limited { first: true });
    }

    #[test]
    fn the_map_stays_bounded_and_drops_refilled_buckets_first() {
        let t0 = Instant::now();
        let mut b: Buckets<u32> = Buckets::new(2, Duration::from_secs(60));
        for k in 0..MAX_KEYS as u32 {
            b.fail(&k, t0);
        }
        assert_eq!(b.len(), MAX_KEYS);
        // Key 0 is drained (limited) at t0 + 1 s; the rest refill by t0 + 31 s.
        b.fail(&0, t0 + Duration::from_secs(1));
        b.fail(&0, t0 + Duration::from_secs(1));
        let later = t0 + Duration::from_secs(31);
        assert_eq!(b.fail(&u32::MAX, later), Verdict::Within);
        assert!(b.len() <= 2, "refilled buckets dropped: {}", b.len());
        // Key 0 was kept with what it had left (one failure), not
        // replaced by a fresh bucket (two).
        assert_eq!(b.fail(&0, later), Verdict::Within);
        assert!(
            matches!(b.fail(&0, later), Verdict::Limited { .. }),
            "a drained key is kept"
        );
    }

    #[test]
    fn source_and_token_limits_are_separate() {
        let t0 = Instant::now();
        let mut l = AuthLimits::new(2, 1);
        let src = Source::of("192.0.2.1".parse().unwrap());
        let id = TokenId::parse("0123456789ab").unwrap();
        assert_eq!(l.fail(src, Some(&id), t0), Limited::default());
        let second = l.fail(src, Some(&id), t0);
        assert_eq!(second.source, None);
        assert_eq!(second.token, Some(true));
        let third = l.fail(src, None, t0);
        assert_eq!(third.source, Some(true));
        assert!(third.any());
    }
}
