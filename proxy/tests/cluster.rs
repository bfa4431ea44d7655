//! Cluster-wide suspensions through Redis (`FSP_TEST_REDIS_URL`): a cut-off made on one
//! replica applies on every replica within a second, survives restarts, and the last
//! known set stays in force while Redis is unreachable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certs::devpki::DevCa;
use common::*;
use http::StatusCode;
use proxy::redis_tls::{Link, Renewals, Target};

const TOKEN: &str = "test-admin-token-0123456789";

fn redis_url() -> Option<String> {
    let url = std::env::var("FSP_TEST_REDIS_URL").ok();
    if url.is_none() {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379)");
    }
    url
}

/// A key prefix of this test run's own, so that concurrent tests sharing one Redis do
/// not see each other's suspensions.
fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("fsp-test-{test}-{}-{nanos}:", std::process::id())
}

/// Removes what a test left in Redis under `prefix`.
fn forget(redis: &str, prefix: &str) {
    let mut conn = redis::Client::open(redis)
        .unwrap()
        .get_connection()
        .unwrap();
    for kind in ["consumers", "providers", "generation"] {
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}{{suspensions}}:{kind}"))
            .query(&mut conn)
            .unwrap();
    }
}

/// The configuration of replica `i`: same platform, its own node name and state dir.
fn replica_config(
    pki: &Pki,
    up: std::net::SocketAddr,
    i: usize,
    cluster: &str,
) -> std::path::PathBuf {
    let base = std::fs::read_to_string(write_config(pki, up, 0, 0, "")).unwrap();
    let text = base
        .replace("node = \"test-node\"", &format!("node = \"node-{i}\""))
        .replace("dir     = \"audit\"", &format!("dir     = \"audit-{i}\""))
        + cluster;
    let path = pki.path().join(format!("fsp-{i}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn status_of(pki: &Pki, gw: &Gateway) -> (StatusCode, String) {
    let c = client(pki, Some(&pki.consumer), false);
    let (status, _, body, _) = send(&c, get(&gw.url("/person/getPerson/v3/cluster")))
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Suspends consumer `ville-bxl` through `gw`'s admin API (`body`: the JSON with the
/// reason): status and body.
async fn suspend(gw: &Gateway, body: &str) -> (u16, String) {
    admin_request_with_body(
        gw.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(TOKEN),
        body,
    )
    .await
}

/// Resumes consumer `ville-bxl` through `gw`'s admin API: status and body.
async fn resume(gw: &Gateway) -> (u16, String) {
    admin_request(
        gw.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/resume",
        Some(TOKEN),
    )
    .await
}

/// Waits until every gateway answers `want`; returns how long that took.
async fn until_all(pki: &Pki, gws: &[&Gateway], want: StatusCode) -> Duration {
    let started = Instant::now();
    for gw in gws {
        loop {
            let (status, body) = status_of(pki, gw).await;
            if status == want {
                if want == StatusCode::FORBIDDEN {
                    assert!(body.contains("FSP-AUTHZ-SUSPENDED"), "{body}");
                }
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "still {status} after 5 s, expected {want}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_on_one_replica_cuts_the_consumer_on_all_three_and_survives_restarts() {
    let Some(redis) = redis_url() else { return };
    let pki = Pki::new();
    let up = upstream().await;
    let prefix = unique_prefix("three");
    let cluster = format!("\n[cluster]\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\n");
    let configs: Vec<_> = (0..3)
        .map(|i| replica_config(&pki, up, i, &cluster))
        .collect();
    let mut gws = Vec::new();
    for c in &configs {
        gws.push(Gateway::start(c).await);
    }
    for gw in &gws {
        assert_eq!(status_of(&pki, gw).await.0, StatusCode::OK);
    }

    // Suspended on replica 0, with a reason: cut on all three within a second.
    let (status, body) = suspend(&gws[0], r#"{"reason": "suspected key leak, ticket 4711"}"#).await;
    assert_eq!(status, 200, "{body}");
    let took = until_all(&pki, &[&gws[0], &gws[1], &gws[2]], StatusCode::FORBIDDEN).await;
    eprintln!("suspension in force on all three replicas after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Every replica lists it with who, when and why.
    for gw in &gws {
        let (status, listed) =
            admin_request(gw.admin_port, "GET", "/admin/suspensions", Some(TOKEN)).await;
        assert_eq!(status, 200);
        let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
        let entry = &listed["consumers"][0];
        assert_eq!(entry["id"], "ville-bxl", "{listed}");
        assert_eq!(
            entry["reason"], "suspected key leak, ticket 4711",
            "{listed}"
        );
        assert_eq!(entry["by"], "token#1", "{listed}");
        assert!(entry["at"].as_str().unwrap().ends_with('Z'), "{listed}");
        assert_eq!(listed["shared"], true);
    }

    // A replica restarted with an empty state directory (a new pod) is still cut: it
    // reads the cluster's suspensions before serving.
    assert_eq!(gws[1].stop().code(), Some(0));
    let state = pki.path().join("audit-1/suspensions.json");
    assert!(
        state.exists(),
        "the replica keeps the last known set locally"
    );
    std::fs::remove_file(&state).unwrap();
    gws[1] = Gateway::start(&configs[1]).await;
    let (status, body) = status_of(&pki, &gws[1]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("FSP-AUTHZ-SUSPENDED"), "{body}");

    // Resumed on replica 2: lifted everywhere within a second.
    let (status, body) = resume(&gws[2]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"changed\":true"), "{body}");
    let took = until_all(&pki, &[&gws[0], &gws[1], &gws[2]], StatusCode::OK).await;
    eprintln!("resume in force on all three replicas after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // A provider suspension travels the same way.
    let (status, _) = admin_request(
        gws[1].admin_port,
        "POST",
        "/admin/providers/rrn/suspend",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    let took = until_all(&pki, &[&gws[0], &gws[1], &gws[2]], StatusCode::FORBIDDEN).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    for gw in &mut gws {
        assert_eq!(gw.stop().code(), Some(0));
    }
    forget(&redis, &prefix);
}

#[tokio::test]
async fn without_redis_the_last_known_set_stays_and_changes_are_refused() {
    let pki = Pki::new();
    let up = upstream().await;
    // Nothing listens there.
    let port = free_port();
    let cluster = format!("\n[cluster]\nredis_url = \"redis://127.0.0.1:{port}\"\n");
    let config = replica_config(&pki, up, 0, &cluster);
    // The set this replica last read from the cluster.
    std::fs::create_dir_all(pki.path().join("audit-0")).unwrap();
    std::fs::write(
        pki.path().join("audit-0/suspensions.json"),
        r#"{"consumers":{"ville-bxl":{"by":"token#2","at":"2026-12-01T10:00:00.000Z","reason":"incident 12"}},"providers":{},"from_cluster":true}"#,
    )
    .unwrap();
    let mut gw = Gateway::start(&config).await;
    let (status, body) = status_of(&pki, &gw).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("FSP-AUTHZ-SUSPENDED"), "{body}");

    // A resume cannot be made on one replica only: refused, nothing changed.
    let (status, body) = resume(&gw).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("Redis is unreachable, nothing changed"),
        "{body}"
    );
    assert_eq!(status_of(&pki, &gw).await.0, StatusCode::FORBIDDEN);
    let (_, listed) = admin_request(gw.admin_port, "GET", "/admin/suspensions", Some(TOKEN)).await;
    assert!(listed.contains("incident 12"), "{listed}");
    // The gateway still serves and is ready: Redis holds suspensions only.
    assert_eq!(
        admin_request(gw.admin_port, "GET", "/readyz", None).await.0,
        200
    );
    assert_eq!(gw.stop().code(), Some(0));
}

#[tokio::test]
async fn suspensions_made_before_the_cluster_join_it_and_bad_reasons_are_refused() {
    let Some(redis) = redis_url() else { return };
    let pki = Pki::new();
    let up = upstream().await;
    // Made in single-node mode (the first file format: a list of ids).
    std::fs::create_dir_all(pki.path().join("audit-0")).unwrap();
    std::fs::write(
        pki.path().join("audit-0/suspensions.json"),
        r#"{"consumers":["ville-bxl"],"providers":[]}"#,
    )
    .unwrap();
    let prefix = unique_prefix("adopt");
    let cluster = format!("\n[cluster]\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\n");
    let mut first = Gateway::start(&replica_config(&pki, up, 0, &cluster)).await;
    let mut second = Gateway::start(&replica_config(&pki, up, 1, &cluster)).await;
    // Not lifted by joining an empty cluster: the second replica enforces it too.
    let took = until_all(&pki, &[&first, &second], StatusCode::FORBIDDEN).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");

    for (body, why) in [
        ("not json", "must be JSON"),
        (r#"{"reason": 12}"#, "must be JSON"),
        (r#"{"reason": "a", "other": 1}"#, "must be JSON"),
        (r#"{"reason": "two\nlines"}"#, "one line"),
    ] {
        let (status, answer) = admin_request_with_body(
            second.admin_port,
            "POST",
            "/admin/providers/rrn/suspend",
            Some(TOKEN),
            body,
        )
        .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains(why), "{body}: {answer}");
    }
    let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(501));
    let (status, answer) = admin_request_with_body(
        second.admin_port,
        "POST",
        "/admin/providers/rrn/suspend",
        Some(TOKEN),
        &long,
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    // Nothing was suspended by the refused calls.
    let (_, listed) =
        admin_request(second.admin_port, "GET", "/admin/suspensions", Some(TOKEN)).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["providers"], serde_json::json!([]), "{listed}");
    assert_eq!(listed["consumers"][0]["by"], "unknown", "{listed}");
    assert_eq!(first.stop().code(), Some(0));
    assert_eq!(second.stop().code(), Some(0));
    forget(&redis, &prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_loses_its_data_lifts_nothing() {
    let Some(redis) = redis_url() else { return };
    let pki = Pki::new();
    let up = upstream().await;
    let prefix = unique_prefix("lost");
    let cluster = format!("\n[cluster]\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\n");
    let mut a = Gateway::start(&replica_config(&pki, up, 0, &cluster)).await;
    let mut b = Gateway::start(&replica_config(&pki, up, 1, &cluster)).await;
    let (status, body) = suspend(&a, r#"{"reason": "incident 7"}"#).await;
    assert_eq!(status, 200, "{body}");
    until_all(&pki, &[&a, &b], StatusCode::FORBIDDEN).await;

    // Redis restarted without persistence (or flushed): the keys are gone.
    forget(&redis, &prefix);
    let mut conn = redis::Client::open(redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}{{suspensions}}:generation"))
        .query(&mut conn)
        .unwrap();
    // Several re-reads later the consumer is still cut off everywhere, and Redis holds
    // the suspension again, with its author and reason.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for gw in [&a, &b] {
        assert_eq!(status_of(&pki, gw).await.0, StatusCode::FORBIDDEN);
    }
    let restored: Option<String> = redis::cmd("HGET")
        .arg(format!("{prefix}{{suspensions}}:consumers"))
        .arg("ville-bxl")
        .query(&mut conn)
        .unwrap();
    assert!(restored.unwrap().contains("incident 7"));
    // A resume after that still works everywhere.
    let (status, _) = resume(&b).await;
    assert_eq!(status, 200);
    let took = until_all(&pki, &[&a, &b], StatusCode::OK).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(a.stop().code(), Some(0));
    assert_eq!(b.stop().code(), Some(0));
    forget(&redis, &prefix);
}

#[tokio::test]
async fn a_new_replica_that_cannot_reach_redis_is_not_ready() {
    let pki = Pki::new();
    let up = upstream().await;
    // Nothing listens there.
    let port = free_port();
    let cluster = format!("\n[cluster]\nredis_url = \"redis://127.0.0.1:{port}\"\n");
    // No state directory: it knows nothing of the cluster's suspensions.
    let mut gw = Gateway::start(&replica_config(&pki, up, 0, &cluster)).await;
    let (status, body) = admin_request(gw.admin_port, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("suspensions are not known yet"), "{body}");
    assert_eq!(gw.stop().code(), Some(0));
}

#[tokio::test]
async fn a_resume_is_not_undone_by_a_replica_that_adopted_the_suspension_before() {
    let Some(redis) = redis_url() else { return };
    let pki = Pki::new();
    let up = upstream().await;
    std::fs::create_dir_all(pki.path().join("audit-0")).unwrap();
    std::fs::write(
        pki.path().join("audit-0/suspensions.json"),
        r#"{"consumers":["ville-bxl"],"providers":[]}"#,
    )
    .unwrap();
    let prefix = unique_prefix("readopt");
    let cluster = format!("\n[cluster]\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\n");
    let d_config = replica_config(&pki, up, 0, &cluster);
    let mut d = Gateway::start(&d_config).await;
    assert_eq!(status_of(&pki, &d).await.0, StatusCode::FORBIDDEN);
    assert_eq!(d.stop().code(), Some(0));
    let mut a = Gateway::start(&replica_config(&pki, up, 1, &cluster)).await;
    let (status, _) = resume(&a).await;
    assert_eq!(status, 200);
    let mut d = Gateway::start(&d_config).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(status_of(&pki, &a).await.0, StatusCode::OK);
    assert_eq!(status_of(&pki, &d).await.0, StatusCode::OK);

    // A reason with characters that would hide or reorder text is refused; suspending
    // again keeps (and answers with) the first record.
    let (status, body) = admin_request_with_body(
        a.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(TOKEN),
        "{\"reason\": \"ok\u{202E}live\"}",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = suspend(&a, r#"{"reason": "first"}"#).await;
    assert_eq!(status, 200);
    let (_, body) = suspend(&d, r#"{"reason": "second"}"#).await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["changed"], false, "{body}");
    assert_eq!(answer["reason"], "first", "{body}");
    assert_eq!(a.stop().code(), Some(0));
    assert_eq!(d.stop().code(), Some(0));
    forget(&redis, &prefix);
}

/// Found by an attacker's review: Redis came back from a copy a moment old (the last
/// suspension gone, the generation one lower) and the admin's next change moved the
/// generation back up to what the replicas had seen, so nobody ever saw the loss and
/// the suspension was lifted everywhere. Now a change is applied only after the
/// cluster's sets are read (a loss found is written back first), and only if the
/// generation has not gone back since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_rolled_back_then_changed_lifts_nothing() {
    let Some(redis) = redis_url() else { return };
    let pki = Pki::new();
    let up = upstream().await;
    let prefix = unique_prefix("rollback");
    let cluster = format!(
        "\n[[consumer]]\nid = \"other\"\norganisation = \"Other\"\ncertificates = [ {{ cn = \"other.example.be\" }} ]\n\n[cluster]\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\n"
    );
    let mut gw = Gateway::start(&replica_config(&pki, up, 0, &cluster)).await;
    let mut conn = redis::Client::open(redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let (consumers, generation) = (
        format!("{prefix}{{suspensions}}:consumers"),
        format!("{prefix}{{suspensions}}:generation"),
    );
    for path in [
        "/admin/consumers/other/suspend",
        "/admin/consumers/ville-bxl/suspend",
    ] {
        let (status, body) = admin_request(gw.admin_port, "POST", path, Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
    }
    until_all(&pki, &[&gw], StatusCode::FORBIDDEN).await;
    for _ in 0..3 {
        // Redis as a copy taken before ville-bxl's suspension: the entry gone, the
        // generation one back; then at once another change.
        let g: u64 = redis::cmd("GET").arg(&generation).query(&mut conn).unwrap();
        let _: () = redis::pipe()
            .atomic()
            .hdel(&consumers, "ville-bxl")
            .set(&generation, g - 1)
            .ignore()
            .query(&mut conn)
            .unwrap();
        let (status, body) = admin_request(
            gw.admin_port,
            "POST",
            "/admin/consumers/other/resume",
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let still: bool = redis::cmd("HEXISTS")
            .arg(&consumers)
            .arg("ville-bxl")
            .query(&mut conn)
            .unwrap();
        assert!(still, "the suspension was lifted by the rollback");
        assert_eq!(status_of(&pki, &gw).await.0, StatusCode::FORBIDDEN);
        let (status, _) = admin_request(
            gw.admin_port,
            "POST",
            "/admin/consumers/other/suspend",
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(gw.stop().code(), Some(0));
    forget(&redis, &prefix);
}

/// Found by an attacker's review: the suspensions' hash deleted (or evicted) with the
/// generation kept lifted every suspension, and every replica wrote the empty set into
/// its state file. Now, at the generation a replica saw last, the sets must be the ones
/// it knows; otherwise its last known set is written back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_suspensions_hash_lifts_nothing() {
    let Some(redis) = redis_url() else { return };
    let pki = Pki::new();
    let up = upstream().await;
    let prefix = unique_prefix("hash");
    let cluster = format!("\n[cluster]\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\n");
    let mut gw = Gateway::start(&replica_config(&pki, up, 0, &cluster)).await;
    let (status, body) = admin_request(
        gw.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    until_all(&pki, &[&gw], StatusCode::FORBIDDEN).await;
    let mut conn = redis::Client::open(redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}{{suspensions}}:consumers"))
        .query(&mut conn)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status_of(&pki, &gw).await.0, StatusCode::FORBIDDEN);
    let back: bool = redis::cmd("HEXISTS")
        .arg(format!("{prefix}{{suspensions}}:consumers"))
        .arg("ville-bxl")
        .query(&mut conn)
        .unwrap();
    assert!(back, "the last known set was not written back");
    let state = std::fs::read_to_string(pki.path().join("audit-0/suspensions.json")).unwrap();
    assert!(state.contains("ville-bxl"), "{state}");
    assert_eq!(gw.stop().code(), Some(0));
    forget(&redis, &prefix);
}

/// Found by an attacker's review: a replica that does not know the cluster's
/// suspensions said 503 on /readyz but served every consumer, cut off or not, to
/// whoever reached it past its readiness. Now it refuses calls until it knows.
#[tokio::test]
async fn a_replica_that_does_not_know_the_suspensions_serves_nobody() {
    let pki = Pki::new();
    let up = upstream().await;
    let port = free_port();
    let cluster = format!("\n[cluster]\nredis_url = \"redis://127.0.0.1:{port}\"\n");
    let mut gw = Gateway::start(&replica_config(&pki, up, 0, &cluster)).await;
    let c = client(&pki, Some(&pki.consumer), false);
    let (status, headers, body, _) = send(&c, get(&gw.url("/person/getPerson/v3/cluster")))
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("FSP-GATEWAY-NOT-READY"), "{body}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(gw.stop().code(), Some(0));
}

/// A TLS-only relay in front of the test Redis, standing in for a Redis with
/// `tls-auth-clients`: it asks for a client certificate of `client_ca`, refuses the CNs
/// it is told to, and lists the sessions it carries by the CN that opened them.
struct TlsRedis {
    port: u16,
    /// Connections accepted (before their handshake).
    accepted: Arc<AtomicUsize>,
    /// Holds the next connection's handshake back 1.5 s (a slow network).
    slow_next: Arc<AtomicBool>,
    /// The CN of each session carried, with what ends it.
    sessions: Arc<Mutex<Vec<(String, tokio::task::AbortHandle)>>>,
    refused: Arc<Mutex<Vec<String>>>,
    /// Handshakes that failed (a client certificate of another CA, say).
    failed: Arc<AtomicUsize>,
}

impl TlsRedis {
    async fn start(server: &certs::devpki::Issued, client_ca: &DevCa, redis: &str) -> Self {
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(server.server_tls(Some(client_ca)).unwrap()));
        let upstream = redis
            .strip_prefix("redis://")
            .expect("a redis:// URL")
            .trim_end_matches('/')
            .rsplit('@')
            .next()
            .unwrap()
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Self {
            port: listener.local_addr().unwrap().port(),
            accepted: Arc::default(),
            slow_next: Arc::default(),
            sessions: Arc::default(),
            refused: Arc::default(),
            failed: Arc::default(),
        };
        let (sessions, refused, failed) = (
            relay.sessions.clone(),
            relay.refused.clone(),
            relay.failed.clone(),
        );
        let (accepted, slow_next) = (relay.accepted.clone(), relay.slow_next.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let slow = slow_next.swap(false, Ordering::SeqCst);
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                let (sessions, refused, failed) =
                    (sessions.clone(), refused.clone(), failed.clone());
                tokio::spawn(async move {
                    if slow {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let cn = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| certs::identity::common_name(c))
                        .unwrap_or_default();
                    if refused.lock().unwrap().contains(&cn) {
                        return;
                    }
                    let session = tokio::spawn(async move {
                        let mut redis = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut redis).await;
                    });
                    sessions.lock().unwrap().push((cn, session.abort_handle()));
                });
            }
        });
        relay
    }

    /// Sessions opened with a certificate of `cn`.
    fn opened_by(&self, cn: &str) -> usize {
        self.sessions
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c == cn)
            .count()
    }

    /// Ends the sessions of `cn` and refuses it from now on (its certificate revoked).
    fn cut(&self, cn: &str) {
        self.refused.lock().unwrap().push(cn.to_owned());
        for (c, session) in self.sessions.lock().unwrap().iter() {
            if c == cn {
                session.abort();
            }
        }
    }
}

/// Puts `files` (name, content) in a new directory under `dir` and points the `tls`
/// symlink at it, as Kubernetes updates a mounted Secret (one rename: the files change
/// together).
fn mount_secret(dir: &std::path::Path, version: u32, files: &[(&str, &str)]) {
    let data = dir.join(format!("tls-{version}"));
    std::fs::create_dir(&data).unwrap();
    for (name, content) in files {
        std::fs::write(data.join(name), content).unwrap();
    }
    let link = dir.join(format!("tls-link-{version}"));
    std::os::unix::fs::symlink(&data, &link).unwrap();
    std::fs::rename(&link, dir.join("tls")).unwrap();
}

/// Calls for `how_long`, every 50 ms: each must be 200 (throttling decided through
/// Redis with `on_backend_error = "deny"`, so a Redis link down would refuse them).
async fn calls_all_pass(pki: &Pki, gw: &Gateway, how_long: Duration) {
    let started = Instant::now();
    while started.elapsed() < how_long {
        let (status, body) = status_of(pki, gw).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to 20 s for `done`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: not after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{what}: after {:?}", started.elapsed());
}

/// Certificate rotation for the links to Redis (throttling and the cluster's
/// suspensions over `rediss://`, a client certificate asked for): the files mounted
/// from a Secret change, and the gateway takes the new certificate without a restart
/// and without a failed call. A certificate Redis refuses keeps the connection in use
/// (and is tried again); an accepted one replaces it, so that the old certificate can
/// then be revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_redis_client_certificate_is_taken_without_a_restart_or_a_failed_call() {
    let Some(redis) = redis_url() else { return };
    let pki = Pki::new();
    let up = upstream().await;
    let redis_ca = DevCa::new("Redis CA").unwrap();
    let clients_ca = DevCa::new("Redis clients CA").unwrap();
    let relay = TlsRedis::start(
        &redis_ca.server(&["localhost"]).unwrap(),
        &clients_ca,
        &redis,
    )
    .await;
    let (first, second) = (
        clients_ca.client("fsp-1").unwrap(),
        clients_ca.client("fsp-2").unwrap(),
    );
    let foreign = DevCa::new("Another CA")
        .unwrap()
        .client("fsp-foreign")
        .unwrap();
    let secret = |issued: &certs::devpki::Issued| {
        [
            ("ca.pem", redis_ca.cert_pem()),
            ("client.pem", issued.cert_pem.clone()),
            ("client.key", issued.key_pem.clone()),
        ]
    };
    let mount = |version: u32, issued: &certs::devpki::Issued| {
        let files = secret(issued);
        let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
        mount_secret(pki.path(), version, &files);
    };
    mount(1, &first);

    let prefix = unique_prefix("rotation");
    let rediss = format!("rediss://localhost:{}", relay.port);
    let tls = "{ ca = \"tls/ca.pem\", cert = \"tls/client.pem\", key = \"tls/client.key\" }";
    let sections = format!(
        "\n[cluster]\nredis_url = \"{rediss}\"\nkey_prefix = \"{prefix}\"\nredis_tls = {tls}\n\
         \n[throttle]\nbackend = \"redis\"\nurl = \"{rediss}\"\ntls = {tls}\non_backend_error = \"deny\"\n"
    );
    let path = replica_config(&pki, up, 0, &sections);
    let limited = std::fs::read_to_string(&path).unwrap().replace(
        "name = \"Registre national\"",
        "name = \"Registre national\"\nlimit = { rate = \"1000/s\", burst = 100 }",
    );
    std::fs::write(&path, limited).unwrap();
    let mut gw = Gateway::start(&path).await;
    calls_all_pass(&pki, &gw, Duration::from_millis(500)).await;
    // The cluster's connection and subscription, and the throttle's connection.
    assert!(
        relay.opened_by("fsp-1") >= 3,
        "{}",
        relay.opened_by("fsp-1")
    );

    // A certificate Redis does not accept: tried, refused, and the links in use stay.
    mount(2, &foreign);
    eventually("the foreign certificate tried", || {
        relay.failed.load(Ordering::SeqCst) >= 2
    })
    .await;
    calls_all_pass(&pki, &gw, Duration::from_secs(1)).await;

    // The certificate Redis accepts: both links renewed, no call refused meanwhile.
    mount(3, &second);
    let calls = calls_all_pass(&pki, &gw, Duration::from_secs(6));
    let renewed = eventually("both links renewed", || relay.opened_by("fsp-2") >= 2);
    tokio::join!(calls, renewed);

    // The old certificate revoked and its sessions ended: throttling and suspensions
    // still work, over the new certificate's connections.
    relay.cut("fsp-1");
    calls_all_pass(&pki, &gw, Duration::from_secs(1)).await;
    let (status, body) = suspend(&gw, r#"{"reason": "rotation test"}"#).await;
    assert_eq!(status, 200, "{body}");
    until_all(&pki, &[&gw], StatusCode::FORBIDDEN).await;
    let (status, body) = resume(&gw).await;
    assert_eq!(status, 200, "{body}");
    until_all(&pki, &[&gw], StatusCode::OK).await;
    assert_eq!(relay.opened_by("fsp-foreign"), 0);
    assert_eq!(gw.stop().code(), Some(0));
    forget(&redis, &prefix);
}

/// A renewal superseded by a later one while its connection was being made (a slow
/// handshake) must not replace the later one's connection when it finally works:
/// the material in force is the last one read, so that the earlier certificate can
/// be revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_renewal_that_connects_late_does_not_replace_the_newer_one() {
    let Ok(redis) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let ca = DevCa::new("Redis CA").unwrap();
    let relay = TlsRedis::start(&ca.server(&["localhost"]).unwrap(), &ca, &redis).await;
    let rediss = format!("rediss://localhost:{}", relay.port);
    let material = |cn: &str| {
        let issued = ca.client(cn).unwrap();
        throttle::redis::RedisTls {
            ca: Some(ca.cert_pem().into_bytes()),
            client: Some((issued.cert_pem.into_bytes(), issued.key_pem.into_bytes())),
        }
    };
    let (started, earlier, later) = (material("fsp-0"), material("fsp-1"), material("fsp-2"));
    let store = throttle::redis::RedisStore::with_tls(
        &rediss,
        Some(&started),
        "fsp-test-renewal:",
        Duration::from_secs(5),
    )
    .unwrap();
    let limits = throttle::Limits {
        provider: None,
        consumer: Some(throttle::Limit {
            count: 1000,
            per: Duration::from_secs(1),
            burst: 1000,
        }),
    };
    let provider = format!("renewal-{}", std::process::id());
    let decided = |n: usize| {
        let (store, provider, limits) = (&store, &provider, &limits);
        async move { throttle::Store::decide(store, provider, &format!("c{n}"), 0, limits).await }
    };
    decided(0).await.unwrap().unwrap();
    let renewals = Renewals::new(Some((&rediss, Some(&started))), None);

    // The earlier material's handshake is held back; the later one is read meanwhile.
    let accepted = relay.accepted.load(Ordering::SeqCst);
    relay.slow_next.store(true, Ordering::SeqCst);
    let target = || Target::Throttle(store.renewal());
    assert!(renewals.renew(Link::Throttle, &rediss, Some(&earlier), target()));
    eventually("the earlier attempt under way", || {
        relay.accepted.load(Ordering::SeqCst) > accepted
    })
    .await;
    assert!(renewals.renew(Link::Throttle, &rediss, Some(&later), target()));
    eventually("the later material connected", || {
        relay.opened_by("fsp-2") >= 1
    })
    .await;
    eventually("the earlier material connected", || {
        relay.opened_by("fsp-1") >= 1
    })
    .await;
    // Time for the earlier attempt to do what it does once connected.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The certificates before the last one revoked: decisions still go through.
    relay.cut("fsp-0");
    relay.cut("fsp-1");
    for n in 1..4 {
        decided(n)
            .await
            .expect("decided over the later material's connection")
            .unwrap();
    }
    assert_eq!(relay.opened_by("fsp-2"), 1);
}
