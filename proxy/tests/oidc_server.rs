//! Tokens from a real, independently written OAuth2 server (`oauth2-mock-server`, npm),
//! obtained with the client-credentials grant, accepted by the gateway.
//!
//! `.ci/run` installs the server (`npm ci --prefix proxy/tests/oidc`) and sets
//! `FSP_TEST_OIDC=1`, which makes this test mandatory; elsewhere it is skipped, saying
//! why, when Node.js or the package is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine;
use common::*;
use http::StatusCode;
use tokio::io::AsyncWriteExt;

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the OAuth2 server; returns it and its issuer URL.
fn start_oidc() -> Option<(Server, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
    let required = std::env::var("FSP_TEST_OIDC").is_ok_and(|v| v == "1");
    let installed = dir.join("node_modules/oauth2-mock-server").exists();
    let node = Command::new("node").arg("--version").output().is_ok();
    if !(installed && node) {
        assert!(
            !required,
            "FSP_TEST_OIDC=1 but the OAuth2 server is not installed: npm ci --prefix proxy/tests/oidc"
        );
        eprintln!(
            "SKIPPED: the OAuth2 server is not installed (npm ci --prefix proxy/tests/oidc) or node is missing"
        );
        return None;
    }
    let mut child = Command::new("node")
        .arg("server.mjs")
        .arg("0")
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let issuer = serde_json::from_str::<serde_json::Value>(&line)
        .unwrap_or_else(|e| panic!("{e}: {line}"))["issuer"]
        .as_str()
        .unwrap()
        .to_owned();
    Some((Server(child), issuer))
}

/// The client-credentials grant, as a consumer application performs it.
async fn client_credentials(issuer: &str, client: &str, secret: &str) -> String {
    let authority = issuer
        .strip_prefix("http://")
        .unwrap()
        .trim_end_matches('/');
    let port: u16 = authority.rsplit(':').next().unwrap().parse().unwrap();
    let body = "grant_type=client_credentials&aud=fsp&scope=person.read";
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{client}:{secret}"));
    let req = format!(
        "POST /token HTTP/1.1\r\nhost: {authority}\r\nauthorization: Basic {basic}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, text) = read_response(&mut s).await;
    assert_eq!(status, 200, "token endpoint: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["token_type"], "Bearer");
    v["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn tokens_from_an_independent_oauth2_server_are_accepted() {
    let Some((_server, issuer)) = start_oidc() else {
        return;
    };
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]",
        "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]\noauth_client_ids = [\"ville-bxl-app\"]",
    );
    let oauth = format!(
        "\n[oauth]\nissuer = \"{issuer}\"\njwks_url = \"{}/jwks\"\naudience = \"fsp\"\nalgorithms = [\"RS256\"]\n",
        issuer.trim_end_matches('/')
    );
    std::fs::write(&config, format!("{text}{oauth}")).unwrap();
    let gw = Gateway::start(&config).await;

    let token = client_credentials(&issuer, "ville-bxl-app", "s3cret").await;
    let c = client(&pki, None, false);
    let mut req = get(&gw.url("/person/getPerson/v3/persons/85073003328"));
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (status, _, body, _) = send(&c, req).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["headers"]["fsp-consumer"], "ville-bxl");

    // A client the platform does not know gets a valid token from the server, and is
    // still refused by the gateway.
    let stranger = client_credentials(&issuer, "unregistered-app", "x").await;
    let mut req = get(&gw.url("/person/getPerson/v3/persons/85073003328"));
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {stranger}").parse().unwrap(),
    );
    let (status, _, body, _) = send(&c, req).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&body)["code"], "FSP-AUTHN-UNKNOWN-IDENTITY");
}
