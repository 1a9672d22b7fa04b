//! Reconnect timing: exponential backoff with full jitter.

use std::time::Duration;

use tetherd::backoff::{Backoff, MAX_RETRY_AFTER};

const BASE: Duration = Duration::from_millis(500);
const CAP: Duration = Duration::from_millis(60_000);
const HEALTHY: Duration = Duration::from_millis(30_000);

#[test]
fn full_jitter_stays_within_zero_and_the_ceiling() {
    let mut rng = fastrand::Rng::with_seed(7);
    for attempt in 0..12u32 {
        let ceiling = BASE.saturating_mul(1 << attempt).min(CAP);
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        for _ in 0..2000 {
            let mut b = Backoff::new(BASE, CAP, HEALTHY);
            for _ in 0..attempt {
                b.next_delay(&mut rng);
            }
            assert_eq!(b.ceiling(), ceiling, "attempt {attempt}");
            let d = b.next_delay(&mut rng);
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            lo = lo.min(d);
            hi = hi.max(d);
        }
        // Full jitter: the whole range is used, not just the top of it.
        assert!(lo <= ceiling / 10, "attempt {attempt}: smallest {lo:?}");
        assert!(hi >= ceiling * 9 / 10, "attempt {attempt}: largest {hi:?}");
    }
}

#[test]
fn the_cap_is_respected_after_any_number_of_failures() {
    let mut rng = fastrand::Rng::with_seed(1);
    let mut b = Backoff::new(BASE, CAP, HEALTHY);
    for _ in 0..10_000 {
        assert!(b.next_delay(&mut rng) <= CAP);
    }
    assert_eq!(b.ceiling(), CAP, "no overflow past 2^64");
    // A base above the cap is clamped to it.
    let mut b = Backoff::new(Duration::from_secs(100), Duration::from_secs(1), HEALTHY);
    assert!(b.next_delay(&mut rng) <= Duration::from_secs(1));
}

#[test]
fn the_ceiling_doubles_from_the_base() {
    let mut rng = fastrand::Rng::with_seed(3);
    let mut b = Backoff::new(BASE, CAP, HEALTHY);
    let ceilings: Vec<u64> = (0..9)
        .map(|_| {
            let c = b.ceiling().as_millis() as u64;
            b.next_delay(&mut rng);
            c
        })
        .collect();
    assert_eq!(
        ceilings,
        [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
    );
}

#[test]
fn a_healthy_session_resets_the_counter_and_a_short_one_does_not() {
    let mut rng = fastrand::Rng::with_seed(5);
    let mut b = Backoff::new(BASE, CAP, HEALTHY);
    for _ in 0..6 {
        b.next_delay(&mut rng);
    }
    assert_eq!(b.attempt(), 6);
    assert!(!b.session_lived(HEALTHY - Duration::from_millis(1)));
    assert_eq!(
        b.attempt(),
        6,
        "a session shorter than healthy_after keeps the count"
    );
    assert!(b.session_lived(HEALTHY));
    assert_eq!(b.attempt(), 0);
    assert_eq!(
        b.ceiling(),
        BASE,
        "back to the base after a healthy session"
    );
}

#[test]
fn a_refusal_waits_at_least_retry_after_plus_a_bounded_spread() {
    let mut rng = fastrand::Rng::with_seed(9);
    let retry = Duration::from_millis(300_000);
    for _ in 0..1000 {
        let mut b = Backoff::new(BASE, CAP, HEALTHY);
        let d = b.after_refusal(retry, &mut rng);
        assert!(d >= retry, "{d:?}");
        assert!(d <= retry + retry / 10, "{d:?}");
    }
    // No hint: the normal backoff.
    let mut b = Backoff::new(BASE, CAP, HEALTHY);
    assert!(b.after_refusal(Duration::ZERO, &mut rng) <= BASE);
}

#[test]
fn a_retry_after_beyond_an_hour_is_capped_at_an_hour() {
    assert_eq!(MAX_RETRY_AFTER, Duration::from_secs(3600));
    let mut rng = fastrand::Rng::with_seed(11);
    // The largest hint the wire carries (a u32 of ms, ~49.7 days), and one
    // just above the cap.
    for hint_ms in [u64::from(u32::MAX), 3_600_001] {
        for _ in 0..1000 {
            let mut b = Backoff::new(BASE, CAP, HEALTHY);
            let d = b.after_refusal(Duration::from_millis(hint_ms), &mut rng);
            assert!(d >= MAX_RETRY_AFTER, "{d:?}");
            assert!(d <= MAX_RETRY_AFTER + MAX_RETRY_AFTER / 10, "{d:?}");
        }
    }
    // At the cap, the hint is obeyed as is.
    let mut b = Backoff::new(BASE, CAP, HEALTHY);
    assert!(b.after_refusal(MAX_RETRY_AFTER, &mut rng) >= MAX_RETRY_AFTER);
}
