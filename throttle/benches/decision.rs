//! Cost of one throttle decision: local (in process) and Redis (one script round trip).
//!
//! `cargo bench -p throttle` (Redis part: set `FSP_TEST_REDIS_URL`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use throttle::{Limit, Limits, LocalStore};

fn limits() -> Limits {
    // Limits high enough never to refuse: the cost of an admitted call is measured.
    let l = Limit {
        count: 1_000_000_000,
        per: Duration::from_secs(1),
        burst: 1_000_000,
    };
    Limits {
        provider: Some(l),
        consumer: Some(l),
    }
}

fn local(c: &mut Criterion) {
    let store = LocalStore::new(["rrn"]);
    let limits = limits();
    let consumers: Vec<String> = (0..100).map(|i| format!("consumer-{i}")).collect();
    let mut now = 0u64;
    let mut i = 0usize;
    c.bench_function("local decision (provider + consumer)", |b| {
        b.iter(|| {
            now += 1000;
            i = (i + 1) % consumers.len();
            black_box(store.check("rrn", &consumers[i], now, &limits)).ok();
        })
    });
}

fn redis(c: &mut Criterion) {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("redis decision: SKIPPED (set FSP_TEST_REDIS_URL)");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The store's batching task runs on this runtime.
    let _runtime = rt.enter();
    let store =
        throttle::redis::RedisStore::new(&url, "fsp-bench:", Duration::from_millis(500)).unwrap();
    let limits = limits();
    c.bench_function(
        "redis decision (provider + consumer, one round trip)",
        |b| {
            b.to_async(&rt).iter(|| async {
                black_box(store.check("rrn", "consumer-1", &limits).await.unwrap()).ok();
            })
        },
    );
}

criterion_group!(benches, local, redis);
criterion_main!(benches);
