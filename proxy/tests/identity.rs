//! The consumer's identity from its client certificate, attacked: names read
//! differently by different software, and certificates that stopped being valid after
//! the handshake (expired, revoked, no longer trusted) on a connection still open or on
//! a session resumed later.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;

const CALL: &[u8] = b"GET /person/getPerson/v3/x HTTP/1.1\r\nhost: fsp\r\n\r\n";

fn client_config(pki: &Pki, id: &certs::devpki::Issued) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn connect(
    config: &Arc<rustls::ClientConfig>,
    port: u16,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
}

/// One call on an open connection: its status (0: the connection was closed instead).
async fn call<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> u16 {
    status_of(s, CALL).await
}

/// The status `request` is answered with on an open connection (0: the connection was
/// closed instead).
async fn status_of<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    request: &[u8],
) -> u16 {
    if s.write_all(request).await.is_err() {
        return 0;
    }
    match tokio::time::timeout(Duration::from_secs(5), try_read_response(s)).await {
        Ok(Ok((status, _))) => status,
        _ => 0,
    }
}

/// A subject with two CNs: the gateway read the first, while a CA, a log reader or
/// another gateway may read the last (RFC 6125 calls it the most specific). An
/// administrator's certificate already had to hold exactly one; a consumer's did not.
#[tokio::test]
async fn a_certificate_with_two_cns_identifies_nobody() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let mut gw = Gateway::start(&config).await;
    let two = pki
        .ca
        .client_with_two_cns(CONSUMER_CN, "someone-else.example.be")
        .unwrap();
    assert_eq!(certs::identity::common_name_count(&two.der), 2);
    let mut s = connect(&client_config(&pki, &two), gw.port).await.unwrap();
    assert_eq!(call(&mut s).await, 401);
    // The same consumer's ordinary certificate still works.
    let mut s = connect(&client_config(&pki, &pki.consumer), gw.port)
        .await
        .unwrap();
    assert_eq!(call(&mut s).await, 200);
    gw.stop();
}

/// A certificate that expires while its connection is open stops identifying its
/// consumer at its expiry (the contract: an expired certificate is refused), and a TLS
/// session resumed after its expiry does not bring it back (a resumption reuses the
/// certificate of the first handshake without checking it again).
#[tokio::test]
async fn an_expired_certificate_does_not_live_on_in_a_connection_or_a_resumed_session() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let mut gw = Gateway::start(&config).await;
    let now = time::OffsetDateTime::now_utc();
    let expiry = now + time::Duration::seconds(3);
    let short = pki
        .ca
        .client_valid(CONSUMER_CN, now - time::Duration::days(1), expiry)
        .unwrap();
    let tls = client_config(&pki, &short);
    let mut open = connect(&tls, gw.port).await.unwrap();
    assert_eq!(call(&mut open).await, 200);
    // A second connection, whose session tickets are kept by the client.
    let mut first = connect(&tls, gw.port).await.unwrap();
    assert_eq!(call(&mut first).await, 200);
    drop(first);
    let wait = expiry - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    tokio::time::sleep(Duration::try_from(wait).unwrap()).await;
    // The connection opened before the expiry.
    let status = call(&mut open).await;
    assert_ne!(
        status, 200,
        "an expired certificate was still used on its open connection"
    );
    // A new connection resuming the session of before.
    if let Ok(mut resumed) = connect(&tls, gw.port).await {
        assert_eq!(
            resumed.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        let status = call(&mut resumed).await;
        assert_ne!(
            status, 200,
            "an expired certificate came back by session resumption"
        );
    }
    gw.stop();
}

/// A certificate revoked by a CRL that is reloaded (key compromise: the whole point of
/// revoking it) stops identifying its consumer on the connections it already holds, not
/// only on new handshakes.
#[tokio::test]
async fn a_revoked_certificate_stops_on_its_open_connection_at_the_reload() {
    let pki = Pki::new();
    let up = upstream().await;
    std::fs::write(pki.path().join("consumers.crl"), pki.ca.crl(&[]).unwrap()).unwrap();
    let config = write_config_with(&pki, up, 0, 0, "crls = [\"consumers.crl\"]", "", "");
    let mut gw = Gateway::start(&config).await;
    let tls = client_config(&pki, &pki.consumer);
    let mut open = connect(&tls, gw.port).await.unwrap();
    assert_eq!(call(&mut open).await, 200);
    // Another consumer certificate, not revoked, on its own open connection.
    let other = pki.ca.client(CONSUMER_CN).unwrap();
    let mut kept = connect(&client_config(&pki, &other), gw.port)
        .await
        .unwrap();
    assert_eq!(call(&mut kept).await, 200);
    std::fs::write(
        pki.path().join("consumers.crl"),
        pki.ca.crl(&[pki.consumer.serial]).unwrap(),
    )
    .unwrap();
    let (status, body) = admin_request(
        gw.admin_port,
        "POST",
        "/admin/reload",
        Some("test-admin-token-0123456789"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // New handshakes are refused...
    let refused = match connect(&tls, gw.port).await {
        Err(_) => true,
        Ok(mut s) => call(&mut s).await != 200,
    };
    assert!(refused);
    // ... and so is the next call on the connection opened before.
    let status = call(&mut open).await;
    assert_ne!(
        status, 200,
        "a revoked certificate was still used on its open connection"
    );
    // A certificate the CRL does not name goes on.
    assert_eq!(call(&mut kept).await, 200);
    // Its record names the refusal.
    let records = audit_records(&pki);
    assert!(
        records
            .iter()
            .any(|r| r["decision"] == "FSP-AUTHN-UNKNOWN-IDENTITY"),
        "{records:?}"
    );
    gw.stop();
}

/// A CRL that passes its nextUpdate while the gateway runs no longer vouches for the
/// certificates of its CA (a certificate revoked since would not be in it): they are
/// refused, on new handshakes and on the connections already open, as OpenSSL refuses
/// with "CRL has expired". A fresh CRL dropped in place (picked up by the certificate
/// watcher, no admin call) restores service.
#[tokio::test]
async fn a_crl_past_its_next_update_refuses_its_certificates_until_a_fresh_one_is_in_place() {
    let pki = Pki::new();
    let up = upstream().await;
    let now = time::OffsetDateTime::now_utc();
    // Fresh long enough for the gateway to start (a stale CRL is refused at start).
    let next_update = now + time::Duration::seconds(6);
    std::fs::write(
        pki.path().join("consumers.crl"),
        pki.ca
            .crl_valid(&[], now - time::Duration::hours(1), next_update)
            .unwrap(),
    )
    .unwrap();
    let config = write_config_with(&pki, up, 0, 0, "crls = [\"consumers.crl\"]", "", "");
    let mut gw = Gateway::start(&config).await;
    let tls = client_config(&pki, &pki.consumer);
    let mut open = connect(&tls, gw.port).await.unwrap();
    assert_eq!(call(&mut open).await, 200);
    let wait = next_update - time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    tokio::time::sleep(wait.try_into().unwrap_or_default()).await;
    // New handshakes are refused (a fresh client config: no session to resume)...
    let refused = match connect(&client_config(&pki, &pki.consumer), gw.port).await {
        Err(_) => true,
        Ok(mut s) => call(&mut s).await != 200,
    };
    assert!(refused, "a certificate was accepted under a stale CRL");
    // ... and so is the next call on the connection opened before.
    assert_ne!(
        call(&mut open).await,
        200,
        "a stale CRL still vouched for a certificate on its open connection"
    );
    // A fresh CRL in place of the stale one: the watcher reloads it.
    std::fs::write(pki.path().join("consumers.crl"), pki.ca.crl(&[]).unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = connect(&client_config(&pki, &pki.consumer), gw.port).await
            && call(&mut s).await == 200
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a fresh CRL did not restore service"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    gw.stop();
}

/// A CA removed from `client_ca` (no longer trusted for consumers) stops its
/// certificates on their open connections at the reload too.
#[tokio::test]
async fn a_ca_removed_from_client_ca_stops_its_certificates_on_open_connections() {
    let pki = Pki::new();
    let up = upstream().await;
    let second = certs::devpki::DevCa::new("Second Consumers CA").unwrap();
    let by_second = second.client(CONSUMER_CN).unwrap();
    std::fs::write(
        pki.path().join("ca.pem"),
        format!("{}{}", pki.ca.cert_pem(), second.cert_pem()),
    )
    .unwrap();
    let config = write_config(&pki, up, 0, 0, "");
    let mut gw = Gateway::start(&config).await;
    let mut open = connect(&client_config(&pki, &by_second), gw.port)
        .await
        .unwrap();
    assert_eq!(call(&mut open).await, 200);
    std::fs::write(pki.path().join("ca.pem"), pki.ca.cert_pem()).unwrap();
    let (status, body) = admin_request(
        gw.admin_port,
        "POST",
        "/admin/reload",
        Some("test-admin-token-0123456789"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let status = call(&mut open).await;
    assert_ne!(
        status, 200,
        "a CA no longer trusted still identified a consumer"
    );
    gw.stop();
}

/// The admin listener's certificates too: an administrator's certificate that has
/// expired does not come back by resuming a TLS session opened before its expiry.
#[tokio::test]
async fn an_expired_admin_certificate_does_not_come_back_by_session_resumption() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "tokens_file = \"admin-tokens\"",
        "tokens_file = \"admin-tokens\"\ntls = true\nadmin_cns = [\"ops.example.be\"]",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let mut gw = Gateway::start(&config).await;
    let now = time::OffsetDateTime::now_utc();
    let expiry = now + time::Duration::seconds(3);
    let admin = pki
        .ca
        .client_valid("ops.example.be", now - time::Duration::days(1), expiry)
        .unwrap();
    let tls = client_config(&pki, &admin);
    let mut first = connect(&tls, gw.admin_port).await.unwrap();
    assert_eq!(admin_get(&mut first).await, 200);
    drop(first);
    let wait = expiry - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    tokio::time::sleep(Duration::try_from(wait).unwrap()).await;
    if let Ok(mut resumed) = connect(&tls, gw.admin_port).await {
        assert_eq!(
            resumed.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        let status = admin_get(&mut resumed).await;
        assert_ne!(
            status, 200,
            "an expired administrator's certificate came back by session resumption"
        );
    }
    gw.stop();
}

async fn admin_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> u16 {
    status_of(s, b"GET /admin/services HTTP/1.1\r\nhost: admin\r\n\r\n").await
}

/// A consumer declared with an empty CN (or one padded with spaces) is refused by the
/// configuration: every certificate without a readable CN (none, several, a BMPString)
/// was looked up as the empty CN, and so taken as that consumer's.
#[tokio::test]
async fn a_consumer_cn_that_no_certificate_cn_can_be_is_refused() {
    let pki = Pki::new();
    let up = upstream().await;
    for bad in ["", " padded.example.be", "padded.example.be "] {
        let extra = format!(
            "\n[[consumer]]\nid = \"odd\"\norganisation = \"Odd\"\ncertificates = [ {{ cn = \"{bad}\" }} ]\n"
        );
        let config = write_config(&pki, up, 0, 0, &extra);
        let err = proxy::config::load(&config).expect_err(bad).to_string();
        assert!(err.contains("certificates[0].cn"), "{bad:?}: {err}");
    }
}
