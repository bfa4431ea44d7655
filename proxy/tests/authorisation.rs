//! Authorisation end to end: legal basis to the provider, purposes, source addresses,
//! validity, suspensions (also on open connections) and reload under load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "test-admin-token-0123456789";

struct Setup {
    gw: Gateway,
    pki: Pki,
    config: std::path::PathBuf,
}

async fn setup_with(edit: impl Fn(String) -> String, extra: &str) -> Setup {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, extra);
    let text = edit(std::fs::read_to_string(&config).unwrap());
    std::fs::write(&config, text).unwrap();
    let gw = Gateway::start(&config).await;
    Setup { gw, pki, config }
}

async fn setup(extra: &str) -> Setup {
    setup_with(|t| t, extra).await
}

/// The gateway as a process of its own, for what needs one (SIGHUP).
async fn setup_process(extra: &str) -> Setup {
    let pki = Pki::new();
    let up = upstream().await;
    let (port, admin) = (free_port(), free_port());
    let config = write_config(&pki, up, port, admin, extra);
    let gw = Gateway::spawn(&config, port, admin).await;
    Setup { gw, pki, config }
}

fn problem_code(body: &bytes::Bytes) -> String {
    json(body)["code"].as_str().unwrap_or_default().to_owned()
}

const SECOND_PURPOSE: &str = r#"
[[authorisation]]
id          = "bxl-person-tax"
consumer    = "ville-bxl"
service     = "person/getPerson"
purpose     = "local-tax"
legal_basis = { kind = "protocol", reference = "PROT-2024-7" }
provider_approval = "RRN-2024-9"
valid_from  = 2024-01-01

[[authorisation]]
id          = "bxl-person-soap-tax"
consumer    = "ville-bxl"
service     = "person/getPersonSoap"
purpose     = "local-tax"
legal_basis = { kind = "protocol", reference = "PROT-2024-7" }
provider_approval = "RRN-2024-9"
valid_from  = 2024-01-01
"#;

#[tokio::test]
async fn the_provider_receives_purpose_and_legal_basis_and_the_audit_records_them() {
    let s = setup("").await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let (status, h, body, _) = send(&c, get(&s.gw.url("/person/getPerson/v3/p")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let seen = &json(&body)["headers"];
    assert_eq!(seen["fsp-purpose"], "participation-vote");
    assert_eq!(seen["fsp-legal-basis"], "deliberation; CSI/20/123");
    assert_eq!(seen["fsp-authorisation"], "bxl-person");
    let id = h["fsp-message-id"].to_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = audit_records(&s.pki)
        .into_iter()
        .find(|r| r["message_id"] == id.as_str())
        .unwrap();
    assert_eq!(r["authorisation"], "bxl-person");
    assert_eq!(r["purpose"], "participation-vote");
    assert_eq!(r["legal_basis"], "deliberation; CSI/20/123");
}

#[tokio::test]
async fn several_purposes_require_fsp_purpose_and_an_unknown_purpose_is_refused() {
    let s = setup(SECOND_PURPOSE).await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let (status, _, body, _) = send(&c, get(&s.gw.url("/person/getPerson/v3/p")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem_code(&body), "FSP-PURPOSE-REQUIRED");
    assert!(
        json(&body)["detail"]
            .as_str()
            .unwrap()
            .contains("local-tax, participation-vote")
    );

    let mut req = get(&s.gw.url("/person/getPerson/v3/p"));
    req.headers_mut()
        .insert("fsp-purpose", "local-tax".parse().unwrap());
    let (status, _, body, _) = send(&c, req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let seen = &json(&body)["headers"];
    assert_eq!(seen["fsp-purpose"], "local-tax");
    assert_eq!(seen["fsp-legal-basis"], "protocol; PROT-2024-7");

    let mut req = get(&s.gw.url("/person/getPerson/v3/p"));
    req.headers_mut()
        .insert("fsp-purpose", "marketing".parse().unwrap());
    let (status, _, body, _) = send(&c, req).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(problem_code(&body), "FSP-AUTHZ-NO-AUTHORISATION");
}

#[tokio::test]
async fn soap_calls_state_their_purpose_in_the_soap_header() {
    let s = setup(SECOND_PURPOSE).await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let with = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" xmlns:fsp="urn:be:fgov:fsp:1"><s:Header><fsp:Purpose>local-tax</fsp:Purpose><wsa:MessageID xmlns:wsa="http://www.w3.org/2005/08/addressing">urn:uuid:consumer-42</wsa:MessageID></s:Header><s:Body><q/></s:Body></s:Envelope>"#;
    let (status, h, body, _) = send(
        &c,
        post(&s.gw.url("/person/getPersonSoap/v1"), "text/xml", with),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let id = h["fsp-message-id"].to_str().unwrap().to_owned();

    let without = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><q/></s:Body></s:Envelope>"#;
    let (status, _, body, _) = send(
        &c,
        post(&s.gw.url("/person/getPersonSoap/v1"), "text/xml", without),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(
        text.contains("<fsp:Code>FSP-PURPOSE-REQUIRED</fsp:Code>") && text.contains(":Fault>"),
        "{text}"
    );

    let (status, _, body, _) = send(
        &c,
        post(
            &s.gw.url("/person/getPersonSoap/v1"),
            "text/xml",
            "<not-soap/>",
        ),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("FSP-REQUEST-MALFORMED"));

    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = audit_records(&s.pki)
        .into_iter()
        .find(|r| r["message_id"] == id.as_str())
        .unwrap();
    assert_eq!(r["purpose"], "local-tax");
    assert_eq!(r["authorisation"], "bxl-person-soap-tax");
    assert_eq!(r["consumer_ref"], "urn:uuid:consumer-42");
    assert!(
        r["request_bytes"].as_u64().unwrap() as usize == with.len(),
        "the whole envelope went on: {r}"
    );
}

#[tokio::test]
async fn source_addresses_not_yet_valid_and_expired_are_refused_with_their_codes() {
    let pinned = setup_with(
        |t| t.replace("certificates = [ { cn = \"monopinion.bruxelles.be\" } ]", "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]\nsource_ips = [\"192.0.2.0/24\", \"2001:db8::/32\"]"),
        "",
    )
    .await;
    let c = client(&pinned.pki, Some(&pinned.pki.consumer), false);
    let (status, _, body, _) = send(&c, get(&pinned.gw.url("/person/getPerson/v3/p")))
        .await
        .unwrap();
    assert_eq!(
        (status, problem_code(&body).as_str()),
        (StatusCode::FORBIDDEN, "FSP-AUTHZ-SOURCE-IP")
    );

    let later = setup_with(
        |t| t.replacen("valid_from  = 2020-01-01", "valid_from  = 2099-01-01", 1),
        "",
    )
    .await;
    let c = client(&later.pki, Some(&later.pki.consumer), false);
    let (status, _, body, _) = send(&c, get(&later.gw.url("/person/getPerson/v3/p")))
        .await
        .unwrap();
    assert_eq!(
        (status, problem_code(&body).as_str()),
        (StatusCode::FORBIDDEN, "FSP-AUTHZ-NOT-YET-VALID")
    );

    let over = setup_with(
        |t| {
            t.replacen(
                "valid_from  = 2020-01-01",
                "valid_from  = 2020-01-01\nvalid_until = 2021-01-01",
                1,
            )
        },
        "",
    )
    .await;
    let c = client(&over.pki, Some(&over.pki.consumer), false);
    let (status, _, body, _) = send(&c, get(&over.gw.url("/person/getPerson/v3/p")))
        .await
        .unwrap();
    assert_eq!(
        (status, problem_code(&body).as_str()),
        (StatusCode::FORBIDDEN, "FSP-AUTHZ-EXPIRED")
    );
}

#[tokio::test]
async fn a_suspension_applies_within_a_second_on_an_open_connection() {
    let s = setup("").await;
    let request = b"GET /person/getPerson/v3/keepalive HTTP/1.1\r\nhost: localhost\r\n\r\n";
    let mut conn = raw_tls(&s.pki, &s.pki.consumer, s.gw.port).await;
    conn.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut conn).await.0, 200);

    // Administrators must authenticate.
    assert_eq!(
        admin_request(
            s.gw.admin_port,
            "POST",
            "/admin/consumers/ville-bxl/suspend",
            None
        )
        .await
        .0,
        401
    );
    assert_eq!(
        admin_request(
            s.gw.admin_port,
            "POST",
            "/admin/consumers/ville-bxl/suspend",
            Some("wrong-token-000000000")
        )
        .await
        .0,
        401
    );
    assert_eq!(
        admin_request(
            s.gw.admin_port,
            "POST",
            "/admin/consumers/nobody/suspend",
            Some(TOKEN)
        )
        .await
        .0,
        404
    );

    let (status, body) = admin_request(
        s.gw.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let suspended_at = Instant::now();
    // The same TLS connection, kept alive across the suspension.
    conn.write_all(request).await.unwrap();
    let (status, body) = read_response(&mut conn).await;
    assert!(suspended_at.elapsed() < Duration::from_secs(1));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("FSP-AUTHZ-SUSPENDED"), "{body}");

    let (status, _) = admin_request(
        s.gw.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/resume",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    conn.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut conn).await.0, 200);

    // A provider suspension cuts every consumer off from it.
    assert_eq!(
        admin_request(
            s.gw.admin_port,
            "POST",
            "/admin/providers/rrn/suspend",
            Some(TOKEN)
        )
        .await
        .0,
        200
    );
    conn.write_all(request).await.unwrap();
    let (status, body) = read_response(&mut conn).await;
    assert_eq!(status, 403);
    assert!(body.contains("provider rrn is suspended"), "{body}");
    let (_, listed) =
        admin_request(s.gw.admin_port, "GET", "/admin/suspensions", Some(TOKEN)).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["providers"][0]["id"], "rrn", "{listed}");
    assert_eq!(listed["providers"][0]["by"], "token#1", "{listed}");
    assert!(listed["providers"][0]["at"].is_string(), "{listed}");
    assert_eq!(listed["shared"], false, "{listed}");
}

#[tokio::test]
async fn a_suspension_survives_a_restart() {
    let mut s = setup("").await;
    assert_eq!(
        admin_request(
            s.gw.admin_port,
            "POST",
            "/admin/consumers/ville-bxl/suspend",
            Some(TOKEN)
        )
        .await
        .0,
        200
    );
    assert_eq!(s.gw.stop().code(), Some(0));
    let gw = Gateway::start(&s.config).await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let (status, _, body, _) = send(&c, get(&gw.url("/person/getPerson/v3/p")))
        .await
        .unwrap();
    assert_eq!(
        (status, problem_code(&body).as_str()),
        (StatusCode::FORBIDDEN, "FSP-AUTHZ-SUSPENDED")
    );

    // The consumer leaves the configuration while suspended: its suspension can still
    // be lifted (it would apply again were the id configured again).
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, text.replace("\"ville-bxl\"", "\"ville-bxl-2\"")).unwrap();
    let admin = |method: &'static str, path: &'static str| {
        admin_request(gw.admin_port, method, path, Some(TOKEN))
    };
    let (status, body) = admin("POST", "/admin/reload").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin("POST", "/admin/consumers/ville-bxl/resume").await;
    assert_eq!(status, 200, "{body}");
    let (_, listed) = admin("GET", "/admin/suspensions").await;
    assert!(!listed.contains("ville-bxl"), "{listed}");
    // An id neither configured nor suspended is still unknown.
    assert_eq!(admin("POST", "/admin/consumers/nobody/resume").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request_and_apply_new_authorisations() {
    let s = setup_process("").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let c = client(&s.pki, Some(&s.pki.consumer), false);
        let url = s.gw.url("/person/getPerson/v3/under-load");
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut req = get(&url);
                req.headers_mut()
                    .insert("fsp-purpose", "participation-vote".parse().unwrap());
                match send(&c, req).await {
                    Ok((StatusCode::OK, ..)) => ok += 1,
                    Ok((status, _, body, _)) => {
                        failed.push(format!("{status}: {}", String::from_utf8_lossy(&body)))
                    }
                    Err(e) => failed.push(format!("{e:?}")),
                }
            }
            (ok, failed)
        }));
    }
    // Reload five times through the API and once by SIGHUP, with a valid change each time.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = std::fs::read_to_string(&s.config).unwrap();
        std::fs::write(&s.config, format!("{text}\n# reload {i}\n")).unwrap();
        if i == 5 {
            let _ = std::process::Command::new("kill")
                .args(["-HUP", &s.gw.pid().to_string()])
                .status();
            // Done (and recorded) before the configuration is broken below.
            let start = Instant::now();
            while !audit_records(&s.pki)
                .iter()
                .any(|r| r["operation"] == "SIGHUP reload")
            {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "no SIGHUP record"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            let (status, body) =
                admin_request(s.gw.admin_port, "POST", "/admin/reload", Some(TOKEN)).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    // A broken configuration is refused and the running one stays.
    let good = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        good.replace("environment = \"INT\"", "environment = \"SOMEWHERE\""),
    )
    .unwrap();
    let (status, body) = admin_request(s.gw.admin_port, "POST", "/admin/reload", Some(TOKEN)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("environment"), "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "requests failed during reloads: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 50, "only {total} requests made it");
    // Each reload is on the record: who (the token's name, or SIGHUP) and what it did.
    let changes: Vec<serde_json::Value> = audit_records(&s.pki)
        .into_iter()
        .filter(|r| r["credential"] == "admin")
        .collect();
    let by_signal: Vec<_> = changes
        .iter()
        .filter(|r| r["operation"] == "SIGHUP reload")
        .collect();
    assert_eq!(by_signal.len(), 1, "{changes:?}");
    assert_eq!(by_signal[0]["credential_id"], "SIGHUP");
    assert_eq!(by_signal[0]["decision"], "allowed");
    assert!(
        by_signal[0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("reloaded; changed:")),
        "{:?}",
        by_signal[0]
    );
    let refused = changes
        .iter()
        .find(|r| r["operation"] == "POST /admin/reload" && r["status"] == 422)
        .expect("the refused reload is recorded");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("not reloaded:") && d.contains("environment")),
        "{refused:?}"
    );

    // A reload that removes the authorisation takes effect.
    let without = good.replace(
        "service     = \"person/getPerson\"\npurpose",
        "service     = \"person/getPersonSoap\"\npurpose",
    );
    std::fs::write(
        &s.config,
        without.replace(
            "id          = \"bxl-person-soap\"",
            "id          = \"bxl-person-soap-2\"",
        ),
    )
    .unwrap();
    let (status, body) = admin_request(s.gw.admin_port, "POST", "/admin/reload", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let (status, _, body, _) = send(&c, get(&s.gw.url("/person/getPerson/v3/p")))
        .await
        .unwrap();
    assert_eq!(
        (status, problem_code(&body).as_str()),
        (StatusCode::FORBIDDEN, "FSP-AUTHZ-NO-AUTHORISATION")
    );
}
