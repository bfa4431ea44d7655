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
