//! The admin API: what a reload applies (admin tokens included) and what it cannot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn admin_call(port: u16, method: &str, path: &str, token: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {token}\r\ncontent-length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

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
            admin_call(gw.admin_port, "GET", "/admin/suspensions", token)
                .await
                .0,
            200
        );
    }

    // The leaked token is removed, and the configuration reloaded.
    std::fs::write(&tokens, format!("{kept}\n")).unwrap();
    let (status, body) = admin_call(gw.admin_port, "POST", "/admin/reload", kept).await;
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
        admin_call(gw.admin_port, "GET", "/admin/suspensions", leaked)
            .await
            .0,
        401
    );
    assert_eq!(
        admin_call(gw.admin_port, "GET", "/admin/suspensions", kept)
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
    let (status, body) = admin_call(gw.admin_port, "POST", "/admin/reload", kept).await;
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
