//! The Redis backend against a real Redis (`FSP_TEST_REDIS_URL`), with the same rules the
//! local backend is tested for: burst, nested limits, rejected calls consume nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use throttle::redis::RedisStore;
use throttle::{Limit, Limits, Scope};

fn store() -> Option<RedisStore> {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379)");
        return None;
    };
    // A fresh key space per test run.
    let prefix = format!(
        "fsp-test-{}-{}:",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ rand_suffix()
    );
    Some(RedisStore::new(&url, &prefix, Duration::from_millis(500)).unwrap())
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Slow rates: nothing refills while a test runs.
fn per_minute(count: u64, burst: u32) -> Limit {
    Limit {
        count,
        per: Duration::from_secs(60),
        burst,
    }
}

#[tokio::test]
async fn burst_then_refusal_with_a_retry_delay() {
    let Some(s) = store() else { return };
    let limits = Limits {
        provider: None,
        consumer: Some(per_minute(60, 4)),
    };
    let mut admitted = 0;
    for _ in 0..10 {
        if s.check("rrn", "bxl", &limits).await.unwrap().is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4);
    let t = s.check("rrn", "bxl", &limits).await.unwrap().unwrap_err();
    assert_eq!(t.scope, Scope::Consumer);
    assert!(
        t.retry_after > Duration::from_millis(900) && t.retry_after <= Duration::from_secs(1),
        "{:?}",
        t.retry_after
    );
}

#[tokio::test]
async fn nested_limits_charge_nothing_on_refusal() {
    let Some(s) = store() else { return };
    let limits = Limits {
        provider: Some(per_minute(60, 3)),
        consumer: Some(per_minute(60, 2)),
    };
    assert!(s.check("rrn", "a", &limits).await.unwrap().is_ok());
    assert!(s.check("rrn", "a", &limits).await.unwrap().is_ok());
    for _ in 0..20 {
        assert_eq!(
            s.check("rrn", "a", &limits)
                .await
                .unwrap()
                .unwrap_err()
                .scope,
            Scope::Consumer
        );
    }
    assert!(
        s.check("rrn", "b", &limits).await.unwrap().is_ok(),
        "a's refusals did not use the aggregate"
    );
    for _ in 0..20 {
        assert_eq!(
            s.check("rrn", "b", &limits)
                .await
                .unwrap()
                .unwrap_err()
                .scope,
            Scope::Provider
        );
    }
}

#[tokio::test]
async fn the_rate_refills() {
    let Some(s) = store() else { return };
    let limits = Limits {
        provider: None,
        consumer: Some(Limit {
            count: 20,
            per: Duration::from_secs(1),
            burst: 1,
        }),
    };
    assert!(s.check("rrn", "x", &limits).await.unwrap().is_ok());
    assert!(s.check("rrn", "x", &limits).await.unwrap().is_err());
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(s.check("rrn", "x", &limits).await.unwrap().is_ok());
}

#[tokio::test]
async fn a_redis_that_does_not_answer_is_an_error_within_the_timeout() {
    if std::env::var("FSP_TEST_REDIS_URL").is_err() {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = RedisStore::new(
        &format!("redis://127.0.0.1:{port}"),
        "x:",
        Duration::from_millis(200),
    )
    .unwrap();
    let limits = Limits {
        provider: Some(per_minute(60, 1)),
        consumer: None,
    };
    let started = Instant::now();
    assert!(s.check("rrn", "a", &limits).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}
