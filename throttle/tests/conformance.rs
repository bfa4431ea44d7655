//! One conformance suite for every throttling backend: the local store and Redis
//! (`FSP_TEST_REDIS_URL`; skipped, saying so, without it). Rates are per minute so that
//! nothing refills while a check runs, whichever clock the backend uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use throttle::redis::RedisStore;
use throttle::{Limit, Limits, LocalStore, Scope, Store};

fn per_minute(count: u64, burst: u32) -> Limit {
    Limit {
        count,
        per: Duration::from_secs(60),
        burst,
    }
}

/// A provider name of its own for every run, so runs never share Redis keys.
fn provider(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

async fn suite<S: Store>(store: &S, p: &str) {
    // A burst is admitted at once, then refusals with a retry delay.
    let limits = Limits {
        provider: None,
        consumer: Some(per_minute(60, 4)),
    };
    let mut admitted = 0;
    for _ in 0..10 {
        if store.decide(p, "burst", 0, &limits).await.unwrap().is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4, "burst");
    let t = store
        .decide(p, "burst", 0, &limits)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(t.scope, Scope::Consumer);
    assert!(
        t.retry_after > Duration::from_millis(900) && t.retry_after <= Duration::from_secs(1),
        "{:?}",
        t.retry_after
    );

    // Consumers are independent.
    assert!(store.decide(p, "other", 0, &limits).await.unwrap().is_ok());

    // Nested limits: a refusal by either consumes neither.
    let nested = Limits {
        provider: Some(per_minute(60, 3)),
        consumer: Some(per_minute(60, 2)),
    };
    assert!(store.decide(p, "a", 0, &nested).await.unwrap().is_ok());
    assert!(store.decide(p, "a", 0, &nested).await.unwrap().is_ok());
    for _ in 0..20 {
        assert_eq!(
            store
                .decide(p, "a", 0, &nested)
                .await
                .unwrap()
                .unwrap_err()
                .scope,
            Scope::Consumer
        );
    }
    assert!(
        store.decide(p, "b", 0, &nested).await.unwrap().is_ok(),
        "a's refusals did not use the aggregate"
    );
    for _ in 0..20 {
        assert_eq!(
            store
                .decide(p, "b", 0, &nested)
                .await
                .unwrap()
                .unwrap_err()
                .scope,
            Scope::Provider
        );
    }

    // Only the aggregate (no consumer limit): every consumer draws on it.
    let q = aggregate_only(p);
    let aggregate = Limits {
        provider: Some(per_minute(60, 3)),
        consumer: None,
    };
    for c in ["x", "y", "z"] {
        assert!(store.decide(&q, c, 0, &aggregate).await.unwrap().is_ok());
    }
    for c in ["x", "w"] {
        assert_eq!(
            store
                .decide(&q, c, 0, &aggregate)
                .await
                .unwrap()
                .unwrap_err()
                .scope,
            Scope::Provider
        );
    }
}

/// The second provider of the suite: limited as a whole only.
fn aggregate_only(p: &str) -> String {
    format!("{p}-aggregate")
}

/// The third provider of the suite: calls admitted, then given back.
fn given_back(p: &str) -> String {
    format!("{p}-back")
}

/// A call refused after its admission gives back what it spent, of both limits: the
/// next call is admitted as if it had never come, and only that one.
async fn give_back_suite<S: Store>(store: &S, p: &str) {
    let r = given_back(p);
    let limits = Limits {
        provider: Some(per_minute(60, 3)),
        consumer: Some(per_minute(60, 2)),
    };
    let decide = |c: &'static str| {
        let r = r.clone();
        async move { store.decide(&r, c, 0, &limits).await.unwrap() }
    };
    decide("a").await.unwrap();
    let second = decide("a").await.unwrap();
    assert!(!second.is_nothing());
    assert_eq!(decide("a").await.unwrap_err().scope, Scope::Consumer);
    store.give_back(&r, "a", 0, second);
    decide("a")
        .await
        .expect("the permit given back admits one call");
    assert_eq!(
        decide("a").await.unwrap_err().scope,
        Scope::Consumer,
        "one permit given back admits one call only"
    );
    // The aggregate's last permit, given back, goes to another consumer.
    let last = decide("b").await.unwrap();
    assert_eq!(decide("c").await.unwrap_err().scope, Scope::Provider);
    store.give_back(&r, "b", 0, last);
    decide("c")
        .await
        .expect("the aggregate's permit given back");
    assert_eq!(decide("d").await.unwrap_err().scope, Scope::Provider);
}

#[tokio::test]
async fn the_local_store_conforms() {
    let p = provider("local");
    let store = LocalStore::new([p.as_str(), &aggregate_only(&p), &given_back(&p)]);
    suite(&store, &p).await;
    give_back_suite(&store, &p).await;
}

#[tokio::test]
async fn the_redis_store_conforms() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379)");
        return;
    };
    let store = RedisStore::new(&url, "fsp-test:", Duration::from_millis(500)).unwrap();
    let p = provider("redis");
    suite(&store, &p).await;
    give_back_suite(&store, &p).await;
}

/// A permit spent from this replica's lease, given back, is owed back to Redis with the
/// pair's next decision: once the burst is spent, the call given back leaves room for
/// exactly one more.
#[tokio::test]
async fn a_leased_permit_given_back_is_credited_with_the_next_decision() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let p = provider("lease-back");
    // One call a minute (nothing refills during the test), a burst of 40: leases of two
    // permits (5 % of the burst).
    let limits = Limits {
        provider: None,
        consumer: Some(per_minute(1, 40)),
    };
    let store = RedisStore::new(&url, "fsp-test:", Duration::from_millis(500))
        .unwrap()
        .with_leases(1);
    let mut last = None;
    let mut admitted = 0;
    while let Ok(spent) = store.decide(&p, "c", 0, &limits).await.unwrap() {
        admitted += 1;
        last = Some(spent);
        assert!(admitted <= 40, "over the burst");
    }
    assert_eq!(admitted, 40);
    let sent = store.decisions_sent();
    assert!(sent < 40, "leases were used: {sent} decisions for 40 calls");
    store.give_back(&p, "c", last.unwrap());
    store
        .decide(&p, "c", 0, &limits)
        .await
        .unwrap()
        .expect("the permit given back admits one call");
    assert!(
        store.decide(&p, "c", 0, &limits).await.unwrap().is_err(),
        "one permit given back admits one call only"
    );
}

#[tokio::test]
async fn redis_refills_on_its_own_clock() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let s = RedisStore::new(&url, "fsp-test:", Duration::from_millis(500)).unwrap();
    let p = provider("refill");
    let limits = Limits {
        provider: None,
        consumer: Some(Limit {
            count: 20,
            per: Duration::from_secs(1),
            burst: 1,
        }),
    };
    assert!(s.decide(&p, "x", 0, &limits).await.unwrap().is_ok());
    assert!(s.decide(&p, "x", 0, &limits).await.unwrap().is_err());
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(s.decide(&p, "x", 0, &limits).await.unwrap().is_ok());
}

#[tokio::test]
async fn a_redis_that_does_not_answer_is_an_error_within_the_timeout() {
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
    assert!(s.decide("rrn", "a", 0, &limits).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// Three replicas with leases, driven far above a high limit from many tasks: what they
/// admit together stays within `limit × T + burst` and reaches at least 95 % of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_leasing_permits_stay_within_the_bound() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let p = provider("leases");
    let limit = Limit {
        count: 2000,
        per: Duration::from_secs(1),
        burst: 400,
    };
    let limits = Limits {
        provider: Some(limit),
        consumer: Some(Limit {
            count: 100_000,
            per: Duration::from_secs(1),
            burst: 10_000,
        }),
    };
    let replicas: Vec<std::sync::Arc<RedisStore>> = (0..3)
        .map(|_| {
            std::sync::Arc::new(
                RedisStore::new(&url, "fsp-test:", Duration::from_millis(500))
                    .unwrap()
                    .with_leases(3),
            )
        })
        .collect();
    let admitted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(2);
    let mut tasks = Vec::new();
    for i in 0..48 {
        let store = replicas[i % 3].clone();
        let (p, admitted, refused) = (p.clone(), admitted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < run_for {
                match store.decide(&p, "c", 0, &limits).await.unwrap() {
                    Ok(_) => admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    Err(_) => refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = admitted.load(std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = replicas.iter().map(|r| r.decisions_sent()).sum();
    eprintln!("leases: {sent} decisions sent");
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    let bound = 2000.0 * elapsed + 400.0;
    eprintln!("leases: admitted {admitted}, refused {refused} in {elapsed:.2}s; bound {bound:.0}");
    assert!(refused > 0, "the load must exceed the limit");
    assert!(
        admitted as f64 <= bound,
        "admitted {admitted} > bound {bound:.0}"
    );
    assert!(
        admitted as f64 >= 0.95 * (2000.0 * elapsed),
        "admitted {admitted}, under 95 % of {:.0}",
        2000.0 * elapsed
    );
}

/// Below a high limit, leases spare most round trips: far fewer decisions reach Redis
/// than calls are admitted, and every call is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_spare_round_trips_below_the_limit() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let p = provider("spare");
    let limits = Limits {
        provider: Some(Limit {
            count: 10_000_000,
            per: Duration::from_secs(1),
            burst: 1_000_000,
        }),
        consumer: None,
    };
    let store = std::sync::Arc::new(
        RedisStore::new(&url, "fsp-test:", Duration::from_millis(500))
            .unwrap()
            .with_leases(3),
    );
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (store, p) = (store.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..2000 {
                if let Err(t) = store.decide(&p, "c", 0, &limits).await.unwrap() {
                    panic!("{t:?}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sent = store.decisions_sent();
    eprintln!("leases: 32000 calls admitted, {sent} decisions sent to Redis");
    assert!(sent * 5 < 32_000, "{sent} decisions for 32000 calls");
}

/// A TCP relay to the Redis of `url` that holds what the gateway sends for `delay` ms
/// (0: none) before passing it on, answers coming back at once: a Redis slow to reach
/// the gateway's commands, for this test alone (a `DEBUG SLEEP` would also slow the
/// other tests sharing the Redis). Gives the relay's URL.
async fn slow_relay(url: &str, delay: std::sync::Arc<std::sync::atomic::AtomicU64>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("redis://").expect("a redis:// URL");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user, address) = match authority.rsplit_once('@') {
        Some((user, address)) => (format!("{user}@"), address.to_owned()),
        None => (String::new(), authority.to_owned()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&address).await else {
                continue;
            };
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_redis, mut to_redis) = upstream.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut from_redis, &mut to_client).await });
            let delay = delay.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                    let ms = delay.load(std::sync::atomic::Ordering::SeqCst);
                    if ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    if to_redis.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("redis://{user}127.0.0.1:{port}/{path}")
}

/// A store on a relay to the test Redis that holds each command back for the
/// milliseconds in the returned delay (0 at first), connected and with Redis's clock
/// estimated (through another provider's keys); a provider of its own named after
/// `name`, and limits of 1 permit a minute per consumer, 2 for the aggregate.
async fn slow_store(
    url: &str,
    name: &str,
    timeout: Duration,
) -> (RedisStore, Arc<AtomicU64>, String, Limits) {
    let delay = Arc::new(AtomicU64::new(0));
    let relay = slow_relay(url, delay.clone()).await;
    let s = RedisStore::new(&relay, "fsp-test:", timeout).unwrap();
    let limits = Limits {
        provider: Some(per_minute(1, 2)),
        consumer: Some(per_minute(1, 1)),
    };
    let warm_up = provider(&format!("{name}-warm-up"));
    assert!(s.decide(&warm_up, "w", 0, &limits).await.unwrap().is_ok());
    (s, delay, provider(name), limits)
}

/// Asserts that consumer `a`'s only permit and the aggregate's two are untouched at
/// provider `p` (`what`: the decision that must not have spent them).
async fn assert_untouched(s: &RedisStore, p: &str, limits: &Limits, what: &str) {
    assert!(
        s.decide(p, "a", 0, limits).await.unwrap().is_ok(),
        "{what} used the consumer's permit"
    );
    assert_eq!(
        s.decide(p, "a", 0, limits)
            .await
            .unwrap()
            .unwrap_err()
            .scope,
        Scope::Consumer
    );
    assert!(
        s.decide(p, "b", 0, limits).await.unwrap().is_ok(),
        "{what} used a permit of the aggregate"
    );
    assert_eq!(
        s.decide(p, "c", 0, limits)
            .await
            .unwrap()
            .unwrap_err()
            .scope,
        Scope::Provider
    );
}

/// A decision Redis reaches only after its deadline debits nothing: the call gets an
/// error (the gateway then applies `on_backend_error`), and once Redis has run the late
/// script, the consumer's only permit and the provider aggregate are untouched.
#[tokio::test]
async fn a_decision_redis_reaches_too_late_debits_nothing() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let (s, delay, p, limits) = slow_store(&url, "late", Duration::from_millis(200)).await;

    // Redis gets the script 400 ms after it is sent: after the batch's 200 ms timeout.
    delay.store(400, Ordering::SeqCst);
    let started = Instant::now();
    let e = s.decide(&p, "a", 0, &limits).await.unwrap_err();
    eprintln!("late: {e} after {:?}", started.elapsed());
    delay.store(0, Ordering::SeqCst);
    // Redis has run the held script by then.
    tokio::time::sleep(Duration::from_millis(600)).await;

    assert_untouched(&s, &p, &limits, "the late decision").await;
}

/// A decision whose call went away while its batch was in flight (its consumer left)
/// is given back when Redis's answer comes: nobody spends the permit, so the consumer's
/// only permit and the provider aggregate are as if the call had never come.
#[tokio::test]
async fn a_decision_whose_call_went_away_is_given_back() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let (s, delay, p, limits) = slow_store(&url, "gone", Duration::from_millis(500)).await;

    // Redis gets the script 100 ms after it is sent (well within its deadline); the
    // call stops waiting after 20 ms.
    delay.store(100, Ordering::SeqCst);
    assert!(
        tokio::time::timeout(Duration::from_millis(20), s.decide(&p, "a", 0, &limits))
            .await
            .is_err()
    );
    // The answer comes, and the give-back after it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    delay.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert_untouched(&s, &p, &limits, "the decision of the call that went away").await;
}
