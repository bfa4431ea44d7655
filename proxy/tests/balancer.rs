//! Behind a TCP load balancer: the PROXY protocol (v1 and v2) from the configured
//! balancer addresses only, and the address it carries used for `source_ips`, the audit
//! record and `X-Forwarded-For`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use tokio::io::AsyncWriteExt;

/// The balancer's address: 127.0.0.2 reaches the loopback interface like 127.0.0.1.
const BALANCER: &str = "127.0.0.2";

fn v2(source: SocketAddr, command: u8) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    let SocketAddr::V4(source) = source else {
        unreachable!()
    };
    h.push(0x11);
    // Addresses, ports, and a TLV (AWS-style) that must be skipped.
    let tlv = [0xEA, 0x00, 0x03, b'v', b'p', b'c'];
    h.extend_from_slice(&u16::try_from(12 + tlv.len()).unwrap().to_be_bytes());
    h.extend_from_slice(&source.ip().octets());
    h.extend_from_slice(&[10, 0, 0, 1]);
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h.extend_from_slice(&tlv);
    h
}

/// A TLS connection from `from` that first sends `preamble`; the call's status and body,
/// or None when the gateway closed the connection.
async fn call_via(pki: &Pki, port: u16, from: &str, preamble: &[u8]) -> Option<(u16, String)> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut tcp = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    tcp.write_all(preamble).await.unwrap();
    let mut config = client_tls(pki, Some(&pki.consumer));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .ok()?;
    tls.write_all(
        b"GET /person/getPerson/v3/lb HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await
    .ok()?;
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    if text.len() < 12 {
        return None;
    }
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

#[tokio::test]
async fn the_address_a_balancer_carries_is_the_consumers_and_nobody_else_may_carry_one() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config_with(
        &pki,
        up,
        0,
        0,
        &format!("proxy_protocol_from = [\"{BALANCER}/32\"]"),
        "",
        "",
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]",
        "certificates = [ { cn = \"monopinion.bruxelles.be\" } ]\nsource_ips = [\"203.0.113.0/24\"]",
    );
    std::fs::write(&config, text).unwrap();
    let mut gw = Gateway::start(&config).await;

    // v2 from the balancer, carrying an allowed address: served, and that address is
    // the one the provider and the audit trail see.
    let allowed: SocketAddr = "203.0.113.7:51000".parse().unwrap();
    let (status, body) = call_via(&pki, gw.port, BALANCER, &v2(allowed, 1))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"x-forwarded-for\":\"203.0.113.7\""),
        "{body}"
    );
    // v1 the same way.
    let (status, body) = call_via(
        &pki,
        gw.port,
        BALANCER,
        b"PROXY TCP4 203.0.113.8 10.0.0.1 51001 443\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"x-forwarded-for\":\"203.0.113.8\""),
        "{body}"
    );

    // An IPv4 client behind a dual-stack balancer (IPv4-mapped IPv6): the same address.
    let (status, body) = call_via(
        &pki,
        gw.port,
        BALANCER,
        b"PROXY TCP6 ::ffff:203.0.113.9 ::ffff:10.0.0.1 51002 443\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"x-forwarded-for\":\"203.0.113.9\""),
        "{body}"
    );
    // A v2 header announcing more than 4 KiB of addresses and TLVs is refused before
    // it is read.
    let mut huge = v2(allowed, 1);
    huge[14..16].copy_from_slice(&0xFFFFu16.to_be_bytes());
    assert!(call_via(&pki, gw.port, BALANCER, &huge).await.is_none());

    // Carrying an address outside the consumer's source_ips: refused by the allow-list.
    let outside: SocketAddr = "198.51.100.9:40000".parse().unwrap();
    let (status, body) = call_via(&pki, gw.port, BALANCER, &v2(outside, 1))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("FSP-AUTHZ-SOURCE-IP"), "{body}");

    // The balancer's own connection (LOCAL) keeps the balancer's address: not allowed.
    let (status, body) = call_via(&pki, gw.port, BALANCER, &v2(allowed, 0))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("FSP-AUTHZ-SOURCE-IP"), "{body}");

    // From another address, a PROXY header is refused, whatever it claims.
    assert!(
        call_via(&pki, gw.port, "127.0.0.1", &v2(allowed, 1))
            .await
            .is_none()
    );
    assert!(
        call_via(
            &pki,
            gw.port,
            "127.0.0.1",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n"
        )
        .await
        .is_none()
    );
    // The balancer must send one; a malformed one is refused.
    assert!(call_via(&pki, gw.port, BALANCER, b"").await.is_none());
    assert!(
        call_via(
            &pki,
            gw.port,
            BALANCER,
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n"
        )
        .await
        .is_none()
    );
    // Without a header, an address that is not a balancer is served as itself.
    let (status, body) = call_via(&pki, gw.port, "127.0.0.1", b"").await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("FSP-AUTHZ-SOURCE-IP"), "{body}");

    assert_eq!(gw.stop().code(), Some(0));
    // Refusals are recorded once answered: compare as sets, in call order for the rest.
    let records = audit_records(&pki);
    let of = |ip: &str| {
        records
            .iter()
            .find(|r| r["source_ip"] == ip)
            .unwrap_or_else(|| panic!("no record from {ip}: {records:#?}"))["decision"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(records.len(), 6, "{records:#?}");
    assert_eq!(of("203.0.113.9"), "allowed");
    assert_eq!(of("203.0.113.7"), "allowed");
    assert_eq!(of("203.0.113.8"), "allowed");
    assert_eq!(of("198.51.100.9"), "FSP-AUTHZ-SOURCE-IP");
    assert_eq!(of(BALANCER), "FSP-AUTHZ-SOURCE-IP");
    assert_eq!(of("127.0.0.1"), "FSP-AUTHZ-SOURCE-IP");
}

/// Behind a balancer, connections stalled before their PROXY header, or after it in
/// their handshake, give their places up to a consumer's as any other: the oldest first.
#[tokio::test]
async fn connections_stalled_behind_a_balancer_give_their_places_to_a_consumer() {
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config_with(
        &pki,
        up,
        0,
        0,
        &format!("proxy_protocol_from = [\"{BALANCER}/32\"]\nmax_connections = 4"),
        "",
        "",
    );
    let gw = Gateway::start(&config).await;
    let mut stalled = Vec::new();
    for i in 0..4u16 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(format!("{BALANCER}:0").parse().unwrap())
            .unwrap();
        let mut tcp = socket
            .connect(format!("127.0.0.1:{}", gw.port).parse().unwrap())
            .await
            .unwrap();
        // Two say nothing (no header yet), two send a header and the start of a
        // ClientHello.
        if i >= 2 {
            let client = SocketAddr::from(([203, 0, 113, 10 + i as u8], 40000 + i));
            tcp.write_all(&v2(client, 1)).await.unwrap();
            tcp.write_all(PARTIAL_CLIENT_HELLO).await.unwrap();
        }
        stalled.push(tcp);
        wait_open(&gw, f64::from(i + 1)).await;
    }
    let consumer: SocketAddr = "203.0.113.7:51000".parse().unwrap();
    let (status, body) = call_via(&pki, gw.port, BALANCER, &v2(consumer, 1))
        .await
        .expect("the consumer's connection was refused");
    assert_eq!(status, 200, "{body}");
    assert!(closes(&mut stalled[0]).await, "the oldest is still open");
    for c in &mut stalled[1..] {
        assert!(!closed(c).await);
    }
    assert_eq!(metric(&gw, "fsp_connections_evicted_total").await, 1.0);
}
