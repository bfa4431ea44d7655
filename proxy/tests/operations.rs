//! Running it on Kubernetes: certificates rotated by a Secret's symlink swap under load,
//! `/readyz` (certificates, throttle backend, the drain window after SIGTERM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Lays `cert` and `key` out as the kubelet mounts a Secret: the files are symlinks
/// through `..data`, which points at a timestamped directory; a new version is a new
/// directory, `..data` swapped to it by a rename, and the old directory removed.
fn mount_secret(dir: &Path, version: &str, cert: &str, key: &str) {
    let data = dir.join(version);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tls.crt"), cert).unwrap();
    std::fs::write(data.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    if let Some(old) = old.filter(|o| o.as_os_str() != version) {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// A server certificate for loopback that expired yesterday.
fn expired_server(pki: &Pki) -> certs::devpki::Issued {
    let now = time::OffsetDateTime::now_utc();
    pki.ca
        .server_valid(
            &["localhost", "127.0.0.1"],
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap()
}

/// One call on a connection of its own (a new handshake each time).
async fn call_on_new_connection(pki: &Pki, port: u16) -> Result<u16, String> {
    let mut tls = tls_connect(pki, Some(&pki.consumer), port, b"http/1.1")
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET /person/getPerson/v3/rotation HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no response: {text}"))
}

fn secret_config(pki: &Pki, extra: &str) -> std::path::PathBuf {
    let config = write_config(
        pki,
        std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
        0,
        0,
        extra,
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "server_cert = \"server.pem\"",
            "server_cert = \"secret/tls.crt\"",
        )
        .replace(
            "server_key  = \"server.key\"",
            "server_key  = \"secret/tls.key\"",
        );
    std::fs::write(&config, text).unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_by_symlink_is_served_to_new_handshakes_without_a_failed_call() {
    let pki = Pki::new();
    let up = upstream().await;
    let secret = pki.path().join("secret");
    let first = pki.ca.server(&["localhost", "127.0.0.1"]).unwrap();
    mount_secret(
        &secret,
        "..2026_12_03_08_00_00.1",
        &first.cert_pem,
        &first.key_pem,
    );
    let config = write_config(&pki, up, 0, 0, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "server_cert = \"server.pem\"",
            "server_cert = \"secret/tls.crt\"",
        )
        .replace(
            "server_key  = \"server.key\"",
            "server_key  = \"secret/tls.key\"",
        );
    std::fs::write(&config, text).unwrap();
    let mut gw = Gateway::start(&config).await;
    assert_eq!(served_certificate(&pki, gw.port).await, first.der);

    // Load: kept-alive connections and a new connection per call.
    let stop = Arc::new(AtomicBool::new(false));
    let pki = Arc::new(pki);
    let mut workers = Vec::new();
    for i in 0..6 {
        let (stop, pki, port) = (stop.clone(), pki.clone(), gw.port);
        let c = client(&pki, Some(&pki.consumer), false);
        let url = gw.url("/person/getPerson/v3/rotation");
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let outcome = if i % 2 == 0 {
                    match send(&c, get(&url)).await {
                        Ok((status, ..)) => Ok(status.as_u16()),
                        Err(e) => Err(format!("{e:?}")),
                    }
                } else {
                    call_on_new_connection(&pki, port).await
                };
                match outcome {
                    Ok(200) => ok += 1,
                    Ok(other) => failed.push(format!("status {other}")),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let second = pki.ca.server(&["localhost", "127.0.0.1"]).unwrap();
    mount_secret(
        &secret,
        "..2026_12_03_09_00_00.2",
        &second.cert_pem,
        &second.key_pem,
    );
    let swapped = until_served(
        &pki,
        gw.port,
        &second.der,
        Duration::from_secs(10),
        "new handshakes still get the old certificate",
    )
    .await;
    eprintln!("new certificate served {swapped:?} after the swap");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "calls failed across the rotation: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 50, "only {total} calls made it");

    // A swap to a key that does not match its certificate is refused: the certificate
    // in force stays, and the gateway stays ready.
    let third = pki.ca.server(&["localhost", "127.0.0.1"]).unwrap();
    mount_secret(
        &secret,
        "..2026_12_03_10_00_00.3",
        &third.cert_pem,
        &first.key_pem,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(served_certificate(&pki, gw.port).await, second.der);
    assert_eq!(
        admin_request(gw.admin_port, "GET", "/readyz", None).await.0,
        200
    );
    // ... and picked up once the right key arrives.
    mount_secret(
        &secret,
        "..2026_12_03_10_00_01.4",
        &third.cert_pem,
        &third.key_pem,
    );
    until_served(
        &pki,
        gw.port,
        &third.der,
        Duration::from_secs(10),
        "the fixed key was not picked up",
    )
    .await;

    // A certificate that has expired is refused while the one in force is valid:
    // consumers would refuse every handshake. The valid one stays, and the gateway
    // stays ready.
    let expired = expired_server(&pki);
    mount_secret(
        &secret,
        "..2026_12_03_11_00_00.5",
        &expired.cert_pem,
        &expired.key_pem,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(served_certificate(&pki, gw.port).await, third.der);
    assert_eq!(
        admin_request(gw.admin_port, "GET", "/readyz", None).await.0,
        200
    );

    // A reload that fails for another reason (the configuration is being edited) is
    // tried again until it works: the Secret changes only once.
    let config_text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        config_text.replace("environment = \"INT\"", "environment = \"NOWHERE\""),
    )
    .unwrap();
    let fourth = pki.ca.server(&["localhost", "127.0.0.1"]).unwrap();
    mount_secret(
        &secret,
        "..2026_12_03_12_00_00.6",
        &fourth.cert_pem,
        &fourth.key_pem,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(served_certificate(&pki, gw.port).await, third.der);
    std::fs::write(&config, &config_text).unwrap();
    until_served(
        &pki,
        gw.port,
        &fourth.der,
        Duration::from_secs(15),
        "the rotation was not retried once the configuration was fixed",
    )
    .await;
    // Each reload re-read the whole configuration: each is on the record, as the
    // watcher's, with the files that changed; a failure once per change, not at every
    // retry. Five changes (two taken, three refused: a key not matching, an expired
    // certificate, a configuration being edited), then the retry that worked.
    let mut records = Vec::new();
    let started = Instant::now();
    while records.len() < 6 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        records = audit_records(&pki)
            .into_iter()
            .filter(|r| r["operation"] == "certificate reload")
            .collect();
    }
    let outcomes: Vec<(u64, &str)> = records
        .iter()
        .map(|r| {
            assert_eq!(r["credential"], "admin", "{r}");
            assert_eq!(r["credential_id"], "certificate watcher", "{r}");
            assert!(
                r["detail"].as_str().unwrap().contains("secret/tls.crt"),
                "{r}"
            );
            (
                r["status"].as_u64().unwrap(),
                r["detail"].as_str().unwrap().split(':').next().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            (200, "reloaded; changed"),
            (422, "not reloaded"),
            (200, "reloaded; changed"),
            (422, "not reloaded"),
            (422, "not reloaded"),
            (200, "reloaded; changed"),
        ],
        "{records:#?}"
    );
    assert_eq!(gw.stop().code(), Some(0));
}

#[tokio::test]
async fn a_gateway_started_with_an_expired_certificate_says_it_is_not_ready_and_why() {
    let pki = Pki::new();
    let expired = expired_server(&pki);
    mount_secret(
        &pki.path().join("secret"),
        "..v1",
        &expired.cert_pem,
        &expired.key_pem,
    );
    let mut gw = Gateway::start(&secret_config(&pki, "")).await;
    let (status, body) = admin_request(gw.admin_port, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("expired"), "{body}");
    assert_eq!(
        admin_request(gw.admin_port, "GET", "/healthz", None)
            .await
            .0,
        200
    );
    assert_eq!(gw.stop().code(), Some(0));
}

#[tokio::test]
async fn readiness_follows_the_throttle_backend_only_where_calls_depend_on_it() {
    let pki = Pki::new();
    let secret = pki.path().join("secret");
    let server = pki.ca.server(&["localhost", "127.0.0.1"]).unwrap();
    mount_secret(&secret, "..v1", &server.cert_pem, &server.key_pem);
    // Nothing listens there.
    let port = free_port();
    for (mode, ready) in [("deny", false), ("local", true)] {
        let config = secret_config(
            &pki,
            &format!(
                "\n[throttle]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\non_backend_error = \"{mode}\"\n"
            ),
        );
        let mut gw = Gateway::start(&config).await;
        let (status, body) = admin_request(gw.admin_port, "GET", "/readyz", None).await;
        assert_eq!(status == 200, ready, "{mode}: {status} {body}");
        if !ready {
            assert!(
                body.contains("throttle backend (Redis) does not answer"),
                "{body}"
            );
        }
        assert_eq!(gw.stop().code(), Some(0));
    }
}

#[tokio::test]
async fn after_sigterm_readyz_says_503_while_the_listener_still_serves_for_shutdown_delay() {
    let pki = Pki::new();
    let up = upstream().await;
    let (port, admin) = (free_port(), free_port());
    let config = write_config_with(&pki, up, port, admin, "shutdown_delay = \"2s\"", "", "");
    let mut gw = Gateway::spawn(&config, port, admin).await;
    assert_eq!(admin_request(admin, "GET", "/readyz", None).await.0, 200);
    let c = client(&pki, Some(&pki.consumer), false);
    let url = gw.url("/person/getPerson/v3/drain");
    std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    let signalled = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = admin_request(admin, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    // Still served: a load balancer that has not noticed yet loses nothing.
    let (status, ..) = send(&c, get(&url)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut fresh = 0;
    while signalled.elapsed() < Duration::from_millis(1500) {
        let c = client(&pki, Some(&pki.consumer), false);
        assert_eq!(send(&c, get(&url)).await.unwrap().0, StatusCode::OK);
        fresh += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(fresh >= 5);
    // After the delay the listener closes and the process ends cleanly.
    assert_eq!(gw.stop().code(), Some(0));
    assert!(signalled.elapsed() >= Duration::from_secs(2));
}
