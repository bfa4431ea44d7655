//! `/metrics`: families labelled by consumer, service, version and decision, with
//! cardinality bounded by the configuration, histograms that add up across replicas,
//! and `# HELP` on every family.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::StatusCode;

#[tokio::test]
async fn metrics_are_labelled_by_configuration_and_bounded_whatever_the_requests_say() {
    let pki = Pki::new();
    let up = upstream().await;
    // A CRL for a week (the development CA's): its nextUpdate is measured.
    std::fs::write(pki.path().join("consumers.crl"), pki.ca.crl(&[]).unwrap()).unwrap();
    let config = write_config_with(&pki, up, 0, 0, "crls = [\"consumers.crl\"]", "", "");
    let mut gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);
    for _ in 0..3 {
        let (status, ..) = send(&c, get(&gw.url("/person/getPerson/v3/m")))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    // Made-up services and versions: refused, and counted without their names.
    for path in [
        "/person/madeUpService1/v3/x",
        "/madeUpFamily2/getPerson/v3/x",
        "/person/getPerson/v77/x",
    ] {
        let (status, ..) = send(&c, get(&gw.url(path))).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // A caller without a certificate: not identified.
    let anonymous = client(&pki, None, false);
    let (status, ..) = send(&anonymous, get(&gw.url("/person/getPerson/v3/m")))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, text) = admin_request(gw.admin_port, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let has = |needle: &str| {
        assert!(text.contains(needle), "no `{needle}` in:\n{text}");
    };
    has(
        r#"fsp_calls_total{consumer="ville-bxl",service="person/getPerson",version="v3",decision="allowed",status="200"} 3"#,
    );
    has(
        r#"fsp_calls_total{consumer="ville-bxl",service="unknown",version="unknown",decision="FSP-ROUTE-UNKNOWN-SERVICE",status="404"} 2"#,
    );
    has(
        r#"fsp_calls_total{consumer="ville-bxl",service="person/getPerson",version="unknown",decision="FSP-ROUTE-UNKNOWN-VERSION",status="404"} 1"#,
    );
    has(r#"fsp_calls_total{consumer="none",service="#);
    for made_up in ["madeUpService1", "madeUpFamily2", "v77"] {
        assert!(
            !text.contains(made_up),
            "request input `{made_up}` became a label:\n{text}"
        );
    }
    // Histograms (buckets), not summaries: they add up across replicas.
    has(r#"fsp_call_duration_seconds_bucket{service="person/getPerson",version="v3",le="0.005"}"#);
    has(r#"fsp_call_duration_seconds_count{service="person/getPerson",version="v3"} 4"#);
    has(r#"fsp_provider_duration_seconds_bucket{provider="rrn",le="+Inf"} 3"#);
    has("fsp_audit_write_seconds_bucket{le=\"+Inf\"} 3");
    has("fsp_audit_queue_depth ");
    has(r#"fsp_certificate_expiry_seconds{role="listener.server_cert",subject="#);
    has(r#"fsp_certificate_expiry_seconds{role="listener.client_ca",subject="#);
    has(r#"fsp_build_info{version=""#);
    assert!(!text.contains("quantile="), "a summary is left:\n{text}");

    // Every family has its help.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        has(&format!("# HELP {name} "));
    }
    // A certificate valid for a year (the development CA's default) has
    // a positive expiry.
    let expiry: f64 = text
        .lines()
        .find(|l| l.starts_with("fsp_certificate_expiry_seconds{role=\"listener.server_cert\""))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry > 86_400.0, "{expiry}");
    // The CRL's nextUpdate, by file: a week ahead.
    let crl = pki.path().join("consumers.crl");
    let crl_series = format!(
        "fsp_crl_next_update_seconds{{file=\"{}\"}} ",
        std::fs::canonicalize(&crl).unwrap().display()
    );
    let next_update: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&crl_series))
        .unwrap_or_else(|| panic!("no `{crl_series}` in:\n{text}"))
        .parse()
        .unwrap();
    assert!(
        (6.9 * 86_400.0..7.0 * 86_400.0).contains(&next_update),
        "{next_update}"
    );

    // Reloads are counted.
    let (status, _) = admin_request(
        gw.admin_port,
        "POST",
        "/admin/reload",
        Some("test-admin-token-0123456789"),
    )
    .await;
    assert_eq!(status, 200);
    let (_, text) = admin_request(gw.admin_port, "GET", "/metrics", None).await;
    assert!(text.contains("fsp_config_reloads_total 1"), "{text}");
    assert_eq!(gw.stop().code(), Some(0));
}

#[tokio::test]
async fn provider_errors_and_throttle_refusals_are_counted_by_provider() {
    let pki = Pki::new();
    // Nothing listens there: the provider is unreachable.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = write_config_with(
        &pki,
        addr,
        0,
        0,
        "",
        "limit = { rate = \"1/s\", burst = 1 }",
        "",
    );
    let mut gw = Gateway::start(&config).await;
    let c = client(&pki, Some(&pki.consumer), false);
    let mut codes = Vec::new();
    for _ in 0..3 {
        let (status, ..) = send(&c, get(&gw.url("/person/getPerson/v3/e")))
            .await
            .unwrap();
        codes.push(status.as_u16());
    }
    assert_eq!(codes, [502, 429, 429]);
    let (_, text) = admin_request(gw.admin_port, "GET", "/metrics", None).await;
    assert!(
        text.contains(r#"fsp_provider_errors_total{provider="rrn",kind="unreachable"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"fsp_throttled_total{provider="rrn",scope="provider"} 2"#),
        "{text}"
    );
    assert_eq!(gw.stop().code(), Some(0));
}
