//! TLS to Redis (`rediss://`): the real Redis of `FSP_TEST_REDIS_URL` behind a relay of
//! this test that serves TLS only, with a certificate made here, and passes what it
//! decrypts on. Without `FSP_TEST_REDIS_URL` the tests say so and pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use certs::devpki::DevCa;
use throttle::redis::{RedisStore, RedisTls};
use throttle::{Limit, Limits, Store};

/// A TLS-terminating relay to the test Redis (client certificates asked for and checked
/// against `client_ca` when given): its port, and how many TLS sessions it carried.
async fn relay(
    server: &certs::devpki::Issued,
    client_ca: Option<&DevCa>,
    redis: &str,
) -> (u16, Arc<AtomicUsize>) {
    let config = server.server_tls(client_ca).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let upstream = redis
        .strip_prefix("redis://")
        .expect("a redis:// URL")
        .trim_end_matches('/')
        .rsplit('@')
        .next()
        .unwrap()
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sessions = Arc::new(AtomicUsize::new(0));
    let counted = sessions.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, upstream, counted) =
                (acceptor.clone(), upstream.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut redis = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut redis).await;
            });
        }
    });
    (port, sessions)
}

fn limits() -> Limits {
    Limits {
        provider: None,
        consumer: Some(Limit {
            count: 60,
            per: Duration::from_secs(60),
            burst: 2,
        }),
    }
}

fn provider() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tls-{}-{nanos}", std::process::id())
}

/// Decisions over TLS, the server's certificate checked against the CA given and its
/// name against the URL's host; a certificate of another CA, or for another name, is
/// a backend error that says so.
#[tokio::test]
async fn decisions_go_over_tls_to_a_redis_whose_certificate_is_checked() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let ca = DevCa::new("Redis CA").unwrap();
    let (port, sessions) = relay(&ca.server(&["localhost"]).unwrap(), None, &url).await;
    let tls = RedisTls {
        ca: Some(ca.cert_pem().into_bytes()),
        client: None,
    };
    let p = provider();
    let store = RedisStore::with_tls(
        &format!("rediss://localhost:{port}"),
        Some(&tls),
        "fsp-test:",
        Duration::from_millis(500),
    )
    .unwrap();
    for _ in 0..2 {
        store.decide(&p, "c", 0, &limits()).await.unwrap().unwrap();
    }
    assert!(store.decide(&p, "c", 0, &limits()).await.unwrap().is_err());
    assert!(sessions.load(Ordering::SeqCst) >= 1);

    let other = RedisTls {
        ca: Some(DevCa::new("Another CA").unwrap().cert_pem().into_bytes()),
        client: None,
    };
    let store = RedisStore::with_tls(
        &format!("rediss://localhost:{port}"),
        Some(&other),
        "fsp-test:",
        Duration::from_millis(500),
    )
    .unwrap();
    let e = store.decide(&p, "c", 0, &limits()).await.unwrap_err();
    eprintln!("another CA: {e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // The relay's certificate names localhost, not 127.0.0.1.
    let store = RedisStore::with_tls(
        &format!("rediss://127.0.0.1:{port}"),
        Some(&tls),
        "fsp-test:",
        Duration::from_millis(500),
    )
    .unwrap();
    let e = store.decide(&p, "c", 0, &limits()).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

/// A client certificate is presented to a Redis that asks for one; `#insecure` and TLS
/// settings for a plain URL are refused.
#[tokio::test]
async fn a_client_certificate_is_presented_and_unchecked_tls_is_refused() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let ca = DevCa::new("Redis CA").unwrap();
    let (port, _) = relay(&ca.server(&["localhost"]).unwrap(), Some(&ca), &url).await;
    let client = ca.client("fsp-gateway").unwrap();
    let rediss = format!("rediss://localhost:{port}");
    let p = provider();
    let without = RedisTls {
        ca: Some(ca.cert_pem().into_bytes()),
        client: None,
    };
    let store = RedisStore::with_tls(
        &rediss,
        Some(&without),
        "fsp-test:",
        Duration::from_millis(500),
    )
    .unwrap();
    assert!(store.decide(&p, "c", 0, &limits()).await.is_err());
    let with = RedisTls {
        client: Some((client.cert_pem.into_bytes(), client.key_pem.into_bytes())),
        ..without.clone()
    };
    let store = RedisStore::with_tls(
        &rediss,
        Some(&with),
        "fsp-test:",
        Duration::from_millis(500),
    )
    .unwrap();
    store.decide(&p, "c", 0, &limits()).await.unwrap().unwrap();

    assert!(throttle::redis::client(&format!("{rediss}/#insecure"), Some(&without)).is_err());
    // However it is spelt (the URL parser drops tabs; the scheme in any case).
    assert!(throttle::redis::client("REDISS://localhost:6380/#insec\ture", None).is_err());
    assert!(throttle::redis::client(&url, Some(&without)).is_err());
}

/// A renewal of the store's TLS material (its client certificate rotated) replaces the
/// connection in use only once a connection with the new material works: one Redis
/// refuses leaves decisions going through the old connection.
#[tokio::test]
async fn a_renewal_takes_the_new_certificate_only_once_redis_accepts_it() {
    let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
        eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
        return;
    };
    let ca = DevCa::new("Redis CA").unwrap();
    let (port, sessions) = relay(&ca.server(&["localhost"]).unwrap(), Some(&ca), &url).await;
    let rediss = format!("rediss://localhost:{port}");
    let material = |issued: certs::devpki::Issued| RedisTls {
        ca: Some(ca.cert_pem().into_bytes()),
        client: Some((issued.cert_pem.into_bytes(), issued.key_pem.into_bytes())),
    };
    let first = material(ca.client("fsp-1").unwrap());
    let store = RedisStore::with_tls(
        &rediss,
        Some(&first),
        "fsp-test:",
        Duration::from_millis(500),
    )
    .unwrap();
    let p = provider();
    store.decide(&p, "c", 0, &limits()).await.unwrap().unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 1);

    let foreign = RedisTls {
        client: material(DevCa::new("Another CA").unwrap().client("x").unwrap()).client,
        ..first.clone()
    };
    let renewal = store.renewal();
    let refused = renewal
        .renew(
            throttle::redis::client(&rediss, Some(&foreign)).unwrap(),
            || false,
        )
        .await
        .unwrap();
    assert!(refused.is_err(), "{refused:?}");
    // Still decided by Redis, over the connection in use.
    store.decide(&p, "c", 0, &limits()).await.unwrap().unwrap();
    assert!(store.decide(&p, "c", 0, &limits()).await.unwrap().is_err());
    assert_eq!(sessions.load(Ordering::SeqCst), 1);

    let second = material(ca.client("fsp-2").unwrap());
    renewal
        .renew(
            throttle::redis::client(&rediss, Some(&second)).unwrap(),
            || false,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 2);
    assert!(store.decide(&p, "c", 0, &limits()).await.unwrap().is_err());
    assert_eq!(sessions.load(Ordering::SeqCst), 2);
}
