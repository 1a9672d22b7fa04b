//! Reconnect timing: exponential backoff with full jitter.
//!
//! The n-th consecutive failure (counting from 0) sleeps a uniformly random
//! time in `[0, min(cap, base × 2^n)]` ("full jitter"), so a fleet that lost
//! its edge at the same moment does not come back in lockstep. The attempt
//! counter goes back to 0 once a session has been healthy for
//! `healthy_after`. An edge's `retry_after_ms` hint is a floor on top of this
//! (see [`Backoff::after_refusal`]), capped at [`MAX_RETRY_AFTER`].
//!
//! Pure arithmetic over a caller-supplied random source: no clock, no I/O.

use std::time::Duration;

/// The longest an edge's `retry_after_ms` hint can hold off the next dial:
/// 1 h. The wire field is a `u32` (up to 49 days); a device told to wait
/// longer, by a bug or a bad edge, would stay offline for weeks with no way
/// to reach it. An edge that still refuses after an hour is asked again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The backoff state of one dialer.
#[derive(Clone, Debug)]
pub struct Backoff {
    base_ms: u64,
    cap_ms: u64,
    healthy_after: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff with `base` for the first failure, never above `cap`, reset
    /// by a session that lived `healthy_after`.
    pub fn new(base: Duration, cap: Duration, healthy_after: Duration) -> Backoff {
        let cap_ms = cap.as_millis().min(u64::MAX as u128) as u64;
        let base_ms = (base.as_millis().min(u64::MAX as u128) as u64).min(cap_ms);
        Backoff {
            base_ms,
            cap_ms,
            healthy_after,
            attempt: 0,
        }
    }

    /// Consecutive failures so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the next sleep: `min(cap, base × 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u64.checked_shl(self.attempt).unwrap_or(u64::MAX);
        Duration::from_millis(self.base_ms.saturating_mul(factor).min(self.cap_ms))
    }

    /// The sleep before the next dial, uniformly in `[0, ceiling]`; counts one
    /// more failure.
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling().as_millis() as u64;
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(rng.u64(0..=ceiling))
    }

    /// The sleep after the edge refused the session with `retry_after`
    /// (0 = no hint): at least the hint (at most [`MAX_RETRY_AFTER`]), never
    /// less than the normal backoff, plus up to 10% of the hint so refused
    /// devices spread out.
    pub fn after_refusal(&mut self, retry_after: Duration, rng: &mut fastrand::Rng) -> Duration {
        let retry_after = retry_after.min(MAX_RETRY_AFTER);
        let own = self.next_delay(rng);
        let hint = retry_after.as_millis().min(u64::MAX as u128) as u64;
        let spread = Duration::from_millis(rng.u64(0..=hint / 10));
        own.max(retry_after) + spread
    }

    /// Forgets past failures.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Records that a session lived `lived` after `Welcome`: resets the
    /// counter when that is at least `healthy_after`. Returns whether it did.
    pub fn session_lived(&mut self, lived: Duration) -> bool {
        let healthy = lived >= self.healthy_after;
        if healthy {
            self.reset();
        }
        healthy
    }
}
