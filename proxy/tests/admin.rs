//! The admin API: what a reload applies (admin tokens included) and what it cannot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[tokio::test]
async fn a_token_removed_from_tokens_file_stops_working_at_the_next_reload() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let (kept, leaked) = (
        "kept-admin-token-0123456789",
        "leaked-admin-token-0123456789",
    );
    let tokens = pki.path().join("admin-tokens");
    std::fs::write(&tokens, format!("{kept}\n{leaked}\n")).unwrap();
    let gw = Gateway::start(&config).await;
    for token in [kept, leaked] {
        assert_eq!(
            admin_request(gw.admin_port, "GET", "/admin/suspensions", Some(token))
                .await
                .0,
            200
        );
    }

    // The leaked token is removed, and the configuration reloaded.
    std::fs::write(&tokens, format!("{kept}\n")).unwrap();
    let (status, body) = admin_request(gw.admin_port, "POST", "/admin/reload", Some(kept)).await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["reloaded"], true);
    assert!(
        report["applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "admin tokens"),
        "{report}"
    );
    assert_eq!(report["needs_restart"], serde_json::json!([]), "{report}");
    assert_eq!(
        admin_request(gw.admin_port, "GET", "/admin/suspensions", Some(leaked))
            .await
            .0,
        401
    );
    assert_eq!(
        admin_request(gw.admin_port, "GET", "/admin/suspensions", Some(kept))
            .await
            .0,
        200
    );

    // A setting that only a restart changes is reported, not silently ignored.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen(
            "max_request_bytes = 104857600",
            "max_request_bytes = 104857600\nthreads = 1\nmax_connections = 77",
            1,
        ),
    )
    .unwrap();
    let (status, body) = admin_request(gw.admin_port, "POST", "/admin/reload", Some(kept)).await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let needs: Vec<&str> = report["needs_restart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        needs,
        ["listener.threads", "listener (connection limits)"],
        "{report}"
    );
}
