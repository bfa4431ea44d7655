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

#[tokio::test]
async fn named_tokens_say_who_acted_wrong_methods_are_405_and_certificates_are_listed() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let (alice, plain) = (
        "alice-secret-token-0123456789",
        "plain-admin-token-0123456789",
    );
    std::fs::write(
        pki.path().join("admin-tokens"),
        format!("# name:token, or the token alone\nalice:{alice}\n{plain}\n"),
    )
    .unwrap();
    let gw = Gateway::start(&config).await;

    // The name is not the token: `alice:...` whole is refused, the token alone works.
    assert_eq!(
        admin_request(
            gw.admin_port,
            "GET",
            "/admin/suspensions",
            Some(&format!("alice:{alice}"))
        )
        .await
        .0,
        401
    );
    let (status, body) = admin_request_with_body(
        gw.admin_port,
        "POST",
        "/admin/consumers/ville-bxl/suspend",
        Some(alice),
        r#"{"reason": "rotation of a leaked key"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, listed) = admin_request(gw.admin_port, "GET", "/admin/suspensions", Some(plain)).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["consumers"][0]["by"], "alice", "{listed}");
    // The plain token is named by its position among the tokens.
    let (status, _) = admin_request(
        gw.admin_port,
        "POST",
        "/admin/providers/rrn/suspend",
        Some(plain),
    )
    .await;
    assert_eq!(status, 200);
    let (_, listed) = admin_request(gw.admin_port, "GET", "/admin/suspensions", Some(plain)).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["providers"][0]["by"], "token#2", "{listed}");

    // A wrong method is 405 with the methods allowed, not 404.
    for (method, path, allow) in [
        ("GET", "/admin/consumers/ville-bxl/suspend", "POST"),
        ("GET", "/admin/reload", "POST"),
        ("DELETE", "/admin/suspensions", "GET"),
        ("POST", "/admin/certificates", "GET"),
        ("POST", "/healthz", "GET"),
    ] {
        let (status, body) = admin_request(gw.admin_port, method, path, Some(alice)).await;
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert!(body.contains(allow), "{method} {path}: {body}");
    }
    assert_eq!(
        admin_request(gw.admin_port, "GET", "/admin/nothing-here", Some(alice))
            .await
            .0,
        404
    );

    // Certificates in force: the server certificate expires within 400 days (the
    // development CA issues for a year), none within 0 days.
    let (status, body) = admin_request(
        gw.admin_port,
        "GET",
        "/admin/certificates?within=400",
        Some(alice),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = answer["certificates"].as_array().unwrap();
    let server = list
        .iter()
        .find(|c| c["role"] == "listener.server_cert")
        .unwrap_or_else(|| panic!("no server certificate in {answer}"));
    assert_eq!(server["sha256"].as_str().unwrap().len(), 64);
    assert!(server["days_left"].as_i64().unwrap() > 0, "{server}");
    assert_eq!(server["expired"], false);
    let (_, body) = admin_request(
        gw.admin_port,
        "GET",
        "/admin/certificates?within=0",
        Some(alice),
    )
    .await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["certificates"], serde_json::json!([]), "{answer}");
    for bad in ["within=-1", "within=x", "days=3"] {
        let (status, _) = admin_request(
            gw.admin_port,
            "GET",
            &format!("/admin/certificates?{bad}"),
            Some(alice),
        )
        .await;
        assert_eq!(status, 400, "{bad}");
    }
}
