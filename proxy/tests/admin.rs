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
    let mut gw = Gateway::start(&config).await;

    // The token alone works, and so does the whole line (what administrators sent
    // before names); the name alone does not.
    assert_eq!(
        admin_request(
            gw.admin_port,
            "GET",
            "/admin/suspensions",
            Some(&format!("alice:{alice}"))
        )
        .await
        .0,
        200
    );
    assert_eq!(
        admin_request(gw.admin_port, "GET", "/admin/suspensions", Some("alice"))
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

    // A refused change is on the record too; statistics count no admin record.
    let (status, _) = admin_request(
        gw.admin_port,
        "POST",
        "/admin/consumers/nobody/suspend",
        Some(alice),
    )
    .await;
    assert_eq!(status, 404);
    let (status, stats) = admin_request(gw.admin_port, "GET", "/admin/stats", Some(alice)).await;
    assert_eq!(status, 200, "{stats}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stats).unwrap();
    assert!(
        rows.iter().all(|r| r["calls"] == 0),
        "admin records counted as calls: {rows:?}"
    );

    // Each change is a record of its own in the trail, with who, what, from where and
    // why; reads are not recorded. The chain still verifies.
    assert_eq!(gw.stop().code(), Some(0));
    let records = audit_records(&pki);
    let admin: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["credential"] == "admin")
        .collect();
    assert_eq!(admin.len(), 3, "{admin:#?}");
    assert_eq!(admin[2]["status"], 404);
    assert_eq!(admin[2]["decision"], "refused");
    assert_eq!(admin[0]["credential_id"], "alice");
    assert_eq!(
        admin[0]["operation"],
        "POST /admin/consumers/ville-bxl/suspend"
    );
    assert_eq!(admin[0]["detail"], "reason: rotation of a leaked key");
    assert_eq!(admin[0]["source_ip"], "127.0.0.1");
    assert_eq!(admin[0]["status"], 200);
    assert_eq!(admin[0]["decision"], "allowed");
    assert_eq!(admin[1]["credential_id"], "token#2");
    assert_eq!(admin[1]["detail"], "no reason given");
    assert!(admin[0]["hash"].as_str().is_some_and(|h| h.len() == 64));
    let verified = std::process::Command::new(env!("CARGO_BIN_EXE_fsp"))
        .args(["audit", "verify", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
}

#[tokio::test]
async fn what_is_loaded_can_be_read_back_and_a_reload_says_what_it_changed() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let gw = Gateway::start(&config).await;
    let token = Some("test-admin-token-0123456789");
    let get = |path: &'static str| async move {
        let (status, body) = admin_request(gw.admin_port, "GET", path, token).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };

    let consumers = get("/admin/consumers").await;
    let bxl = &consumers["consumers"][0];
    assert_eq!(bxl["id"], "ville-bxl", "{consumers}");
    assert_eq!(bxl["credentials"][0]["kind"], "certificate", "{consumers}");
    assert_eq!(bxl["credentials"][0]["cn"], CONSUMER_CN, "{consumers}");
    assert_eq!(bxl["suspended"], false);
    assert!(bxl["authorisations"].as_u64().unwrap() >= 2, "{consumers}");

    let one = get("/admin/consumers/ville-bxl").await;
    let auths = one["authorisations"].as_array().unwrap();
    let person = auths.iter().find(|a| a["id"] == "bxl-person").unwrap();
    assert_eq!(person["service"], "person/getPerson");
    assert_eq!(person["state"], "valid");
    assert_eq!(person["legal_basis"]["kind"], "deliberation");
    assert_eq!(person["legal_basis"]["reference"], "CSI/20/123");
    assert_eq!(person["valid_from"], "2020-01-01");
    assert_eq!(
        person["days_left"],
        serde_json::Value::Null,
        "open-ended: {person}"
    );
    let (status, _) = admin_request(gw.admin_port, "GET", "/admin/consumers/nobody", token).await;
    assert_eq!(status, 404);
    let (status, _) = admin_request(gw.admin_port, "POST", "/admin/consumers", token).await;
    assert_eq!(status, 405);

    let services = get("/admin/services").await;
    let person = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "person/getPerson")
        .unwrap();
    assert_eq!(person["provider"], "rrn");
    assert_eq!(person["current"], "v3");
    let state = |v: &str| {
        person["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["version"] == v)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("v3"), "live");
    assert_eq!(state("v2"), "deprecated");
    assert_eq!(state("v1"), "retired");

    let loaded = get("/admin/config").await;
    assert_eq!(loaded["environment"], "INT");
    assert_eq!(loaded["node"], "test-node");
    assert_eq!(loaded["sha256"].as_str().unwrap().len(), 64);
    assert!(loaded["files"][0].as_str().unwrap().ends_with("fsp.toml"));

    // A reload that adds an authorisation and changes two (the same approval) says so,
    // and the digest follows the files.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "provider_approval = \"RRN-2020-456\"",
            "provider_approval = \"RRN-2020-457\"",
        ) + "\n[[authorisation]]\nid          = \"bxl-person-tax\"\nconsumer    = \"ville-bxl\"\nservice     = \"person/getPerson\"\npurpose     = \"local-tax\"\nlegal_basis = { kind = \"protocol\", reference = \"PROT-2024-7\" }\nprovider_approval = \"RRN-2024-9\"\nvalid_from  = 2024-01-01\nvalid_until = 2099-12-31\n",
    )
    .unwrap();
    let (status, body) = admin_request(gw.admin_port, "POST", "/admin/reload", token).await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        report["changed"]["authorisations"]["added"],
        serde_json::json!(["bxl-person-tax"]),
        "{report}"
    );
    assert_eq!(
        report["changed"]["authorisations"]["changed"],
        serde_json::json!(["bxl-person", "bxl-person-soap"]),
        "{report}"
    );
    assert_eq!(
        report["changed"]["consumers"]["changed"],
        serde_json::json!([])
    );
    let reloaded = get("/admin/config").await;
    assert_ne!(reloaded["sha256"], loaded["sha256"]);
    let one = get("/admin/consumers/ville-bxl").await;
    let tax = one["authorisations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "bxl-person-tax")
        .unwrap()
        .clone();
    assert!(tax["days_left"].as_i64().unwrap() > 365, "{tax}");
}
