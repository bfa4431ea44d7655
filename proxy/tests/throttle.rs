//! Local throttling end to end: 429 FSP-THROTTLED with Retry-After and RateLimit fields.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

#[tokio::test]
async fn a_consumer_over_its_limit_gets_429_with_rate_limit_fields() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "name = \"Registre national\"",
        "name = \"Registre national\"\nlimit = { rate = \"1000/s\", burst = 100 }\nconsumer_limit = { rate = \"2/s\", burst = 3 }",
    );
    std::fs::write(&config, text).unwrap();
    let gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);
    let url = gw.url("/person/getPerson/v3/throttled");

    for i in 0..3 {
        let (status, ..) = send(&c, get(&url)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "call {i} is within the burst");
    }
    let (status, h, body, _) = send(&c, get(&url)).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json(&body)["code"], "FSP-THROTTLED");
    assert_eq!(h["retry-after"], "1");
    let policy = h["ratelimit-policy"].to_str().unwrap();
    assert!(
        policy.contains("\"provider\";q=1000;w=1") && policy.contains("\"consumer\";q=2;w=1"),
        "{policy}"
    );
    assert_eq!(h["ratelimit"], "\"consumer\";r=0;t=1");

    // The same provider's SOAP service shares the limit, and answers with a SOAP fault.
    let env = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><q/></s:Body></s:Envelope>"#;
    let (status, h, body, _) = send(
        &c,
        post(&gw.url("/person/getPersonSoap/v1"), "text/xml", env),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    assert!(
        text.contains("<fsp:Code>FSP-THROTTLED</fsp:Code>") && text.contains(":Fault>"),
        "{text}"
    );
    assert!(h.contains_key("retry-after"));

    // Refused calls consumed nothing: after one emission interval, one call passes.
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(send(&c, get(&url)).await.unwrap().0, StatusCode::OK);
    assert_eq!(
        send(&c, get(&url)).await.unwrap().0,
        StatusCode::TOO_MANY_REQUESTS
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = audit_records(&pki)
        .iter()
        .filter(|r| r["decision"] == "FSP-THROTTLED" && r["status"] == 429)
        .count();
    assert_eq!(refused, 3);
}

/// The provider's configuration of these tests: its limits and capacity in TOML lines.
fn provider_with(pki: &Pki, up: std::net::SocketAddr, lines: &str) -> std::path::PathBuf {
    let config = write_config(pki, up, 0, 0, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "name = \"Registre national\"",
        &format!("name = \"Registre national\"\n{lines}"),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Starts a call that holds one of the provider's slots for 2 s (the gateway's response
/// timeout; the provider answers in 5 s) and spends one call of the consumer's rate.
async fn hold_a_slot(c: &TestClient, gw: &Gateway) -> tokio::task::JoinHandle<StatusCode> {
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), gw.url("/person/getPerson/v3/slow"));
        async move { send(&c, get(&url)).await.unwrap().0 }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow
}

/// A consumer over its rate is told so at once while the provider's slots are all
/// taken: it does not wait in the provider's queue first (and then get a 503 for the
/// provider's capacity, or take a slot it must give back).
#[tokio::test]
async fn a_consumer_over_its_rate_is_told_at_once_while_the_providers_slots_are_taken() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = provider_with(
        &pki,
        up,
        "max_connections = 1\nqueue_timeout = \"1500ms\"\nconsumer_limit = { rate = \"1/m\", burst = 1 }",
    );
    let gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);
    let slow = hold_a_slot(&c, &gw).await;
    let asked = std::time::Instant::now();
    let (status, _, body, _) = send(&c, get(&gw.url("/person/getPerson/v3/x")))
        .await
        .unwrap();
    let took = asked.elapsed();
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        took < Duration::from_millis(700),
        "refused for its rate after {took:?}: it waited for the provider's slot first"
    );
    assert_eq!(slow.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
}

/// A call within its rate that waits in vain for the provider's slots is refused (503)
/// and gives back what it spent of the rate: a refused call consumes nothing.
#[tokio::test]
async fn a_call_that_waited_in_vain_for_the_providers_slots_gives_its_rate_back() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = provider_with(
        &pki,
        up,
        "max_connections = 1\nqueue_timeout = \"500ms\"\nconsumer_limit = { rate = \"2/m\", burst = 2 }",
    );
    let gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);
    // Spends the first call of the minute, and holds the provider's one slot for 2 s.
    let slow = hold_a_slot(&c, &gw).await;
    let url = gw.url("/person/getPerson/v3/x");
    // Two calls admitted by the rate (the second call of the minute each), refused for
    // the provider's capacity: each gives it back, or the second would be 429.
    for i in 0..2 {
        let (status, _, body, _) = send(&c, get(&url)).await.unwrap();
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "call {i}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(slow.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    // The second call of the minute is still there; the third is not.
    let (status, _, body, _) = send(&c, get(&url)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, ..) = send(&c, get(&url)).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_call_refused_for_the_providers_capacity_consumes_no_rate_quota() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = provider_with(
        &pki,
        up,
        "max_connections = 4\nmax_connections_per_consumer = 1\nqueue_timeout = \"100ms\"\nlimit = { rate = \"2/m\", burst = 2 }\nconsumer_limit = { rate = \"2/m\", burst = 2 }",
    );
    let gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);

    // The first call holds the consumer's one slot and spends one of the two calls a
    // minute.
    let slow = hold_a_slot(&c, &gw).await;
    // Meanwhile three calls are over the consumer's share of the provider: refused,
    // and none of them spends the second call of the minute.
    let url = gw.url("/person/getPerson/v3/x");
    for i in 0..3 {
        let (status, _, body, _) = send(&c, get(&url)).await.unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "call {i}");
        let detail = json(&body)["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains("calls in flight"), "call {i}: {detail}");
    }
    assert_eq!(slow.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    // The second call of the minute passes; the third is refused by the rate limit.
    let (status, _, body, _) = send(&c, get(&url)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, _, body, _) = send(&c, get(&url)).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let detail = json(&body)["detail"].as_str().unwrap().to_owned();
    assert!(!detail.contains("calls in flight"), "{detail}");
}
