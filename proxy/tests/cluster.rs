//! Cluster-wide suspensions through Redis (`FSP_TEST_REDIS_URL`): a cut-off made on one
//! replica applies on every replica within a second, survives restarts, and the last
//! known set stays in force while Redis is unreachable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

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
    let (status, body) = admin_request_with_body(
        gws[0].admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(TOKEN),
        r#"{"reason": "suspected key leak, ticket 4711"}"#,
    )
    .await;
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
    let (status, body) = admin_request(
        gws[2].admin_port,
        "POST",
        "/admin/consumers/ville-bxl/resume",
        Some(TOKEN),
    )
    .await;
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
    let (status, body) = admin_request(
        gw.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/resume",
        Some(TOKEN),
    )
    .await;
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
    let (status, body) = admin_request_with_body(
        a.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(TOKEN),
        r#"{"reason": "incident 7"}"#,
    )
    .await;
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
    let (status, _) = admin_request(
        b.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/resume",
        Some(TOKEN),
    )
    .await;
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
    let (status, _) = admin_request(
        a.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/resume",
        Some(TOKEN),
    )
    .await;
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
    let (status, _) = admin_request_with_body(
        a.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(TOKEN),
        r#"{"reason": "first"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (_, body) = admin_request_with_body(
        d.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(TOKEN),
        r#"{"reason": "second"}"#,
    )
    .await;
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
