#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

const SEC: u64 = 1_000_000_000;

fn limit(count: u64, burst: u32) -> Limit {
    Limit {
        count,
        per: Duration::from_secs(1),
        burst,
    }
}

fn store() -> LocalStore {
    LocalStore::new(["rrn"])
}

#[test]
fn a_burst_is_admitted_at_once_then_the_steady_rate() {
    let s = store();
    let limits = Limits {
        provider: None,
        consumer: Some(limit(10, 5)),
    };
    let admitted = (0..20)
        .filter(|_| s.check("rrn", "bxl", 0, &limits).is_ok())
        .count();
    assert_eq!(admitted, 5, "the burst");
    let refused = s.check("rrn", "bxl", 0, &limits).unwrap_err();
    assert_eq!(refused.scope, Scope::Consumer);
    assert_eq!(refused.retry_after, Duration::from_millis(100));
    // One emission interval later, exactly one more.
    assert!(s.check("rrn", "bxl", SEC / 10, &limits).is_ok());
    assert!(s.check("rrn", "bxl", SEC / 10, &limits).is_err());
}

#[test]
fn the_steady_rate_is_exact() {
    let s = store();
    let limits = Limits {
        provider: None,
        consumer: Some(limit(100, 1)),
    };
    // 1000 calls evenly over 10 s, offered at 10 × the rate.
    let mut admitted = 0;
    for i in 0..10_000u64 {
        if s.check("rrn", "bxl", i * SEC / 1000, &limits).is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 1000);
}

#[test]
fn nested_limits_and_rejected_calls_consume_nothing() {
    let s = store();
    let limits = Limits {
        provider: Some(limit(10, 3)),
        consumer: Some(limit(10, 2)),
    };
    assert!(s.check("rrn", "a", 0, &limits).is_ok());
    assert!(s.check("rrn", "a", 0, &limits).is_ok());
    // a's own limit refuses: the provider aggregate is not charged for it.
    for _ in 0..50 {
        assert_eq!(
            s.check("rrn", "a", 0, &limits).unwrap_err().scope,
            Scope::Consumer
        );
    }
    // So b still gets the last aggregate slot...
    assert!(s.check("rrn", "b", 0, &limits).is_ok());
    // ...and then the aggregate refuses, without charging b's own limit.
    for _ in 0..50 {
        assert_eq!(
            s.check("rrn", "b", 0, &limits).unwrap_err().scope,
            Scope::Provider
        );
    }
    // After one interval the aggregate admits one call, and b's limit was not consumed
    // by the refusals (b has one of its two slots left).
    assert!(s.check("rrn", "b", SEC / 10, &limits).is_ok());
}

#[test]
fn consumers_are_independent_and_unknown_providers_are_not_limited() {
    let s = store();
    let limits = Limits {
        provider: None,
        consumer: Some(limit(1, 1)),
    };
    assert!(s.check("rrn", "a", 0, &limits).is_ok());
    assert!(s.check("rrn", "a", 0, &limits).is_err());
    assert!(s.check("rrn", "b", 0, &limits).is_ok());
    assert!(s.check("other", "a", 0, &limits).is_ok());
    assert!(s.check("other", "a", 0, &limits).is_ok());
}

#[test]
fn idle_keys_are_forgotten() {
    let s = store();
    let limits = Limits {
        provider: None,
        consumer: Some(limit(1000, 1)),
    };
    for i in 0..5000u64 {
        s.check("rrn", &format!("c{i}"), i * 1000, &limits).unwrap();
    }
    assert!(s.keys("rrn") > SWEEP_ABOVE);
    // Much later, one more call sweeps every key whose state is in the past.
    s.check("rrn", "late", 100 * SEC, &limits).unwrap();
    assert!(s.keys("rrn") <= 1, "{} keys kept", s.keys("rrn"));
}

#[test]
fn a_reload_keeps_the_state_of_remaining_providers() {
    let s = LocalStore::new(["rrn", "old"]);
    let limits = Limits {
        provider: Some(limit(1, 1)),
        consumer: None,
    };
    s.check("rrn", "a", 0, &limits).unwrap();
    let s = s.carry_over(["rrn", "new"]);
    assert!(
        s.check("rrn", "a", 0, &limits).is_err(),
        "the quota used before the reload still counts"
    );
    assert!(s.check("new", "a", 0, &limits).is_ok());
}

proptest! {
    /// Over any offered load, admitted calls in [0, T] never exceed rate × T + burst.
    #[test]
    fn never_more_than_rate_times_t_plus_burst(
        count in 1u64..200, burst in 1u32..50,
        gaps in proptest::collection::vec(0u64..20_000_000, 1..400),
    ) {
        let s = store();
        let l = limit(count, burst);
        let limits = Limits { provider: Some(l), consumer: None };
        let mut now = 0u64;
        let mut admitted = 0u64;
        for g in gaps {
            now += g;
            if s.check("rrn", "x", now, &limits).is_ok() { admitted += 1; }
        }
        let bound = (count as f64 * now as f64 / SEC as f64).floor() as u64 + u64::from(burst);
        prop_assert!(admitted <= bound, "admitted {} > bound {} (rate {}/s, burst {}, {} ns)", admitted, bound, count, burst, now);
    }

    /// A call admitted, then given back (some time later, before the next call), leaves
    /// both limits deciding every later call exactly as if it had never come.
    #[test]
    fn a_call_given_back_is_as_if_it_never_came(
        count in 1u64..200, burst in 1u32..20,
        calls in proptest::collection::vec((0u64..20_000_000, 0u8..3), 2..200),
        which in 0usize..200, after in 0u64..40_000_000,
    ) {
        let with = store();
        let without = store();
        let limits = Limits { provider: Some(limit(count, burst)), consumer: Some(limit(count / 2 + 1, burst)) };
        let which = which % calls.len();
        let mut now = 0u64;
        for (i, (gap, consumer)) in calls.iter().enumerate() {
            now += gap;
            let consumer = ["a", "b", "c"][usize::from(*consumer)];
            let a = with.check("rrn", consumer, now, &limits);
            if i == which {
                // Given back before the next call comes (its gap is at least `after`).
                if let Ok(spent) = a {
                    with.give_back("rrn", consumer, now + after.min(calls.get(i + 1).map_or(0, |c| c.0)), spent);
                }
                continue;
            }
            let b = without.check("rrn", consumer, now, &limits);
            prop_assert_eq!(a.is_ok(), b.is_ok(), "call {} at {} ns", i, now);
        }
    }
}

/// Found by an attacker's review: refused by both limits, the local store reported the
/// first limit's wait (the provider's 1 s) where a retry then was refused again by the
/// consumer's (an hour). Now the longer wait, as the Redis script reports it.
#[test]
fn refused_by_both_limits_the_longer_wait_is_reported() {
    let s = store();
    let limits = Limits {
        provider: Some(limit(1, 1)),
        consumer: Some(Limit {
            count: 1,
            per: Duration::from_secs(3600),
            burst: 1,
        }),
    };
    assert!(s.check("rrn", "bxl", 0, &limits).is_ok());
    let refused = s.check("rrn", "bxl", SEC / 2, &limits).unwrap_err();
    assert_eq!(refused.scope, Scope::Consumer);
    assert_eq!(
        refused.retry_after,
        Duration::from_secs(3600) - Duration::from_millis(500)
    );
    // Refused by the provider's alone (another consumer): the provider's wait.
    let refused = s.check("rrn", "gent", SEC / 2, &limits).unwrap_err();
    assert_eq!(refused.scope, Scope::Provider);
    assert_eq!(refused.retry_after, Duration::from_millis(500));
}

/// The emission interval is rounded up: at a rate whose interval is not a whole number
/// of nanoseconds, no more than the limit is admitted.
#[test]
fn an_emission_interval_that_is_not_whole_is_rounded_up() {
    let l = Limit {
        count: 300_000_000,
        per: Duration::from_secs(1),
        burst: 1,
    };
    assert_eq!(l.emission(), 4);
}
