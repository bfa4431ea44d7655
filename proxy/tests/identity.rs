//! The consumer's identity from its client certificate, attacked: names read
//! differently by different software.
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
    if s.write_all(CALL).await.is_err() {
        return 0;
    }
    tokio::time::timeout(Duration::from_secs(5), read_status(s))
        .await
        .unwrap_or(0)
}

async fn read_status<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return 0,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text[9..12].parse().unwrap();
            }
        }
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
