//! Throttling shared by several gateways through Redis (`FSP_TEST_REDIS_URL`): exact
//! across replicas, and the `on_backend_error` modes when Redis goes away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

fn redis_url() -> Option<String> {
    let url = std::env::var("FSP_TEST_REDIS_URL").ok();
    if url.is_none() {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379)");
    }
    url
}

/// `n` gateways on one configuration that differs only in ports, node and audit dir, the
/// provider limited to 20/s with a burst of 5.
async fn gateways(pki: &Pki, n: usize, provider: &str, throttle: &str) -> Vec<Gateway> {
    gateways_limited(pki, n, provider, throttle, "{ rate = \"20/s\", burst = 5 }").await
}

/// [`gateways`] with the provider's `limit` given.
async fn gateways_limited(
    pki: &Pki,
    n: usize,
    provider: &str,
    throttle: &str,
    limit: &str,
) -> Vec<Gateway> {
    let up = upstream().await;
    let mut out = Vec::new();
    for i in 0..n {
        let base = std::fs::read_to_string(write_config(pki, up, 0, 0, "")).unwrap();
        let text = base
            .replace("\"rrn\"", &format!("\"{provider}\""))
            .replace("node = \"test-node\"", &format!("node = \"node-{i}\""))
            // The subject is the limiter's clock: calls are recorded when they end (no
            // sync before forwarding), so a slow disk does not bunch them up.
            // A directory of its own per provider too: a test that drops its gateways
            // and starts others must not have two writers on one node's trail while the
            // first drain.
            .replace(
                "dir     = \"audit\"",
                &format!("dir     = \"audit-{provider}-{i}\"\nfail_closed = false"),
            )
            .replace(
                "name = \"Registre national\"",
                &format!("name = \"Registre national\"\nlimit = {limit}"),
            )
            + throttle;
        let path = pki.path().join(format!("fsp-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        out.push(Gateway::start(&path).await);
    }
    out
}

/// Offers `per_gateway` calls per second to each gateway for `secs` seconds; returns the
/// admitted and throttled counts and the time between the first and the last call.
async fn offer(pki: &Pki, gws: &[Gateway], per_gateway: u64, secs: u64) -> (u64, u64, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for gw in gws {
        let c = client(pki, Some(&pki.consumer), false);
        let url = gw.url("/person/getPerson/v3/accuracy");
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_gateway));
            let (mut ok, mut throttled) = (0u64, 0u64);
            for _ in 0..per_gateway * secs {
                tick.tick().await;
                let (status, ..) = send(&c, get(&url)).await.unwrap();
                match status {
                    StatusCode::OK => ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => throttled += 1,
                    other => panic!("unexpected {other}"),
                }
            }
            (ok, throttled)
        }));
    }
    let (mut ok, mut throttled) = (0, 0);
    for t in tasks {
        let (o, th) = t.await.unwrap();
        ok += o;
        throttled += th;
    }
    (ok, throttled, started.elapsed())
}

/// A provider id of its own (Redis keeps state between runs), and the `[throttle]`
/// section of three replicas sharing the Redis at `url`.
fn shared_setup(name: &str, url: &str) -> (String, String) {
    let provider = format!(
        "{name}-{}-{}",
        std::process::id(),
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    let shared = format!(
        "\n[throttle]\nbackend = \"redis\"\nurl = \"{url}\"\non_backend_error = \"deny\"\nreplicas = 3\n"
    );
    (provider, shared)
}

/// Offers three gateways 3 x `rate` per second for `secs` seconds; asserts that they
/// admitted no more than `rate × T + burst` and at least 95 % of it.
async fn assert_admits_exactly(
    pki: &Pki,
    gws: &[Gateway],
    what: &str,
    rate: u64,
    burst: u64,
    secs: u64,
) {
    let (ok, throttled, elapsed) = offer(pki, gws, rate, secs).await;
    let bound = rate as f64 * elapsed.as_secs_f64() + burst as f64;
    eprintln!("{what}: admitted {ok}, throttled {throttled} in {elapsed:?}; bound {bound:.0}");
    assert!(
        ok as f64 <= bound,
        "admitted {ok} > limit x T + burst = {bound:.0}"
    );
    assert!(
        ok as f64 >= 0.95 * bound,
        "admitted {ok} < 95 % of {bound:.0}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_sharing_redis_admit_exactly_the_limit() {
    let Some(url) = redis_url() else { return };
    let pki = Pki::new();
    let (provider, shared) = shared_setup("rrn", &url);
    let gws = gateways(&pki, 3, &provider, &shared).await;
    // 3 x the limit (20/s), spread over the three gateways, for 10 s.
    assert_admits_exactly(&pki, &gws, "redis", 20, 5, 10).await;
    drop(gws);

    // The same load with local throttling: each replica admits the whole limit.
    let provider = format!("{provider}-local");
    let gws = gateways(&pki, 3, &provider, "").await;
    let (ok, _, elapsed) = offer(&pki, &gws, 20, 10).await;
    let bound = 20.0 * elapsed.as_secs_f64() + 5.0;
    eprintln!("local: admitted {ok} in {elapsed:?}; bound {bound:.0}");
    assert!(
        ok as f64 > 2.5 * bound,
        "local limits multiply by the replica count: {ok} vs {bound:.0}"
    );
}

/// With a burst large enough that each replica leases permits (5 % of 120 over 3
/// replicas: 2 at a time), three gateways together still admit no more than
/// `limit × T + burst`, and nearly all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_leasing_permits_admit_exactly_the_limit() {
    let Some(url) = redis_url() else { return };
    let pki = Pki::new();
    let (provider, shared) = shared_setup("rrn-lease", &url);
    let limit = "{ rate = \"100/s\", burst = 120 }";
    let gws = gateways_limited(&pki, 3, &provider, &shared, limit).await;
    // 3 x the limit, spread over the three gateways, for 5 s.
    assert_admits_exactly(&pki, &gws, "redis with leases", 100, 120, 5).await;
}

struct PrivateRedis(std::process::Child);

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_test_each_mode_is_followed_and_no_call_hangs() {
    if redis_url().is_none() {
        return;
    }
    let port = free_port();
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (the test stops its own Redis, not the shared one)");
    let mut redis = Some(PrivateRedis(child));
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pki = Pki::new();
    let mut by_mode = Vec::new();
    for mode in ["local", "deny", "allow"] {
        let cfg = format!(
            "\n[throttle]\nbackend = \"redis\"\nurl = \"{url}\"\non_backend_error = \"{mode}\"\nreplicas = 2\n"
        );
        let gw = gateways(&pki, 1, &format!("rrn-{mode}"), &cfg)
            .await
            .pop()
            .unwrap();
        by_mode.push((mode, gw));
    }
    let c = client(&pki, Some(&pki.consumer), false);
    for (mode, gw) in &by_mode {
        let (status, ..) = send(&c, get(&gw.url("/person/getPerson/v3/up")))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{mode} with Redis up");
    }

    drop(redis.take());
    tokio::time::sleep(Duration::from_millis(200)).await;

    for (mode, gw) in &by_mode {
        let mut statuses = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            let (status, _, body, _) = send(&c, get(&gw.url("/person/getPerson/v3/down")))
                .await
                .unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{mode}: a call took {:?}",
                started.elapsed()
            );
            if status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(json(&body)["code"], "FSP-THROTTLED");
            }
            statuses.push(status.as_u16());
        }
        let ok = statuses.iter().filter(|s| **s == 200).count();
        match *mode {
            "allow" => assert_eq!(ok, 10, "{statuses:?}"),
            "deny" => assert_eq!(ok, 0, "{statuses:?}"),
            // This replica's share of 20/s burst 5 across 2 replicas: burst 2.
            _ => assert!(
                (2..=3).contains(&ok),
                "local fallback admitted {ok}: {statuses:?}"
            ),
        }
        let (_, metrics) = {
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.admin_port))
                .await
                .unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            read_response(&mut s).await
        };
        assert!(
            metrics.contains(&format!(
                "fsp_throttle_backend_errors_total{{mode=\"{mode}\"}}"
            )),
            "{mode}: {metrics}"
        );
    }
}

/// `/readyz` needs no credentials, and each check asks Redis whether it answers: however
/// often it is asked, Redis is pinged at most once a second for it (an outsider flooding
/// the admin port must not flood Redis as well).
#[tokio::test]
async fn readiness_checks_ping_redis_at_most_once_a_second() {
    let Some(url) = redis_url() else { return };
    let pki = Pki::new();
    let (provider, shared) = shared_setup("readyz", &url);
    let gws = gateways(&pki, 1, &provider, &shared).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    // Every PING Redis has answered (other tests' included: the bound leaves room).
    let mut pings = async || {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut redis)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = pings().await;
    let started = Instant::now();
    for _ in 0..100 {
        let (status, body) = admin_request(gws[0].admin_port, "GET", "/readyz", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let asked_for = started.elapsed().as_secs() + 1;
    let pinged = pings().await - before;
    assert!(
        pinged <= asked_for + 20,
        "100 readiness checks in {:?} pinged Redis {pinged} times",
        started.elapsed()
    );
}
