//! TLS to the audit database (`sslmode`, `sslrootcert`, `sslcert`/`sslkey` in its URL),
//! against the real server of `FSP_TEST_POSTGRES_URL` behind a relay of this test that
//! speaks PostgreSQL's TLS negotiation with a certificate made here, and passes what it
//! decrypts on to the server. The relay serves TLS only: a connection that does not
//! begin with TLS is closed. Without `FSP_TEST_POSTGRES_URL` the tests say so and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use audit::postgres::{PostgresSink, PostgresTrail, Settings};
use audit::{AuditSink, Record};
use certs::devpki::DevCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

/// A TLS-terminating relay to the test database: its port, and how many TLS sessions
/// it carried. `client_ca`: client certificates asked for and checked against it.
struct Relay {
    port: u16,
    sessions: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

fn relay(server: &certs::devpki::Issued, client_ca: Option<&DevCa>, db: &str) -> Relay {
    let config = server.server_tls(client_ca).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let config: postgres::Config = db.parse().unwrap();
    let upstream = match &config.get_hosts()[0] {
        postgres::config::Host::Tcp(h) => {
            format!(
                "{h}:{}",
                config.get_ports().first().copied().unwrap_or(5432)
            )
        }
        postgres::config::Host::Unix(_) => panic!("the test database must be reached over TCP"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let sessions = Arc::new(AtomicUsize::new(0));
    let counted = sessions.clone();
    runtime.spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, upstream, counted) =
                (acceptor.clone(), upstream.clone(), counted.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                if socket.read_exact(&mut first).await.is_err() || first != SSL_REQUEST {
                    return;
                }
                socket.write_all(b"S").await.unwrap();
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut db = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut db).await;
            });
        }
    });
    Relay {
        port,
        sessions,
        _runtime: runtime,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The test database's URL through the relay, at `host`, with `params`.
fn through(db: &str, relay: &Relay, host: &str, params: &str) -> String {
    let config: postgres::Config = db.parse().unwrap();
    let user = config.get_user().unwrap_or("postgres");
    let name = config.get_dbname().unwrap_or("postgres");
    format!("postgres://{user}@{host}:{}/{name}?{params}", relay.port)
}

fn test_db() -> Option<String> {
    let url = std::env::var("FSP_TEST_POSTGRES_URL").ok();
    if url.is_none() {
        eprintln!("skipped: FSP_TEST_POSTGRES_URL is not set");
    }
    url
}

fn schema() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("fsp_test_tls_{}_{nanos}", std::process::id())
}

struct Dropped(String, String);

impl Drop for Dropped {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.0, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.1));
        }
    }
}

fn record(i: usize) -> Record {
    Record {
        message_id: format!("tls-{i}"),
        timestamp: "2026-12-06T00:00:00.000Z".into(),
        consumer: Some("ville-bxl".into()),
        credential: Some("certificate".into()),
        source_ip: "127.0.0.1".into(),
        operation: "GET /person/getPerson/v3/x".into(),
        decision: "allowed".into(),
        status: 200,
        node: "tls-node".into(),
        ..Record::default()
    }
}

/// With `sslmode=verify-full` and the server's CA as `sslrootcert`, the writer makes
/// records durable over TLS, and the trail reads and verifies them over TLS.
#[test]
fn the_trail_is_written_and_read_over_tls_checked_to_the_servers_name() {
    let Some(db) = test_db() else { return };
    let ca = DevCa::new("Audit database CA").unwrap();
    let relay = relay(&ca.server(&["localhost"]).unwrap(), None, &db);
    let dir = tempfile::tempdir().unwrap();
    let root = write(dir.path(), "ca.pem", &ca.cert_pem());
    let url = through(
        &db,
        &relay,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    let schema = schema();
    let _dropped = Dropped(db.clone(), schema.clone());
    let (sink, handle) = PostgresSink::start_with(Settings {
        schema: Some(schema.clone()),
        ..Settings::new(&url, "tls-node")
    })
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for i in 0..3 {
        let durable = sink.submit_durable(&record(i)).unwrap();
        runtime.block_on(durable).unwrap();
    }
    drop(sink);
    handle.join();
    let mut trail = PostgresTrail::connect(&url, Some(&schema)).unwrap();
    assert!(trail.lookup("tls-2").unwrap().is_some());
    let verified = trail.verify(None).unwrap();
    assert_eq!(verified.records, 3);
    assert!(
        relay.sessions.load(Ordering::SeqCst) >= 2,
        "the connections went through TLS"
    );
}

/// A server whose certificate does not chain to `sslrootcert` is not connected to, and
/// the error says why; `verify-full` refuses a certificate for another name, where
/// `verify-ca` (and `require`) check the chain only.
#[test]
fn a_server_certificate_of_another_ca_or_name_is_refused() {
    let Some(db) = test_db() else { return };
    let ca = DevCa::new("Audit database CA").unwrap();
    let relay = relay(&ca.server(&["db.example.be"]).unwrap(), None, &db);
    let dir = tempfile::tempdir().unwrap();
    let other = DevCa::new("Somebody else's CA").unwrap();
    let wrong = write(dir.path(), "other.pem", &other.cert_pem());
    let root = write(dir.path(), "ca.pem", &ca.cert_pem());
    let refused = |url: String| match PostgresTrail::connect(&url, None) {
        Ok(_) => panic!("connected with {url}"),
        Err(e) => e.to_string(),
    };
    let e = refused(through(
        &db,
        &relay,
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={wrong}"),
    ));
    eprintln!("another CA: {e}");
    assert!(e.contains("certificate"), "{e}");
    let e = refused(through(
        &db,
        &relay,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={root}"),
    ));
    assert!(e.contains("certificate"), "{e}");
    for mode in ["verify-ca", "require"] {
        PostgresTrail::connect(
            &through(
                &db,
                &relay,
                "localhost",
                &format!("sslmode={mode}&sslrootcert={root}"),
            ),
            None,
        )
        .unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
    // Without TLS, the relay (a server that wants TLS) is not reached.
    refused(through(&db, &relay, "localhost", "sslmode=disable"));
}

/// `sslcert` and `sslkey` present a client certificate to a server that asks for one.
#[test]
fn a_client_certificate_is_presented_when_given() {
    let Some(db) = test_db() else { return };
    let ca = DevCa::new("Audit database CA").unwrap();
    let relay = relay(&ca.server(&["localhost"]).unwrap(), Some(&ca), &db);
    let dir = tempfile::tempdir().unwrap();
    let root = write(dir.path(), "ca.pem", &ca.cert_pem());
    let client = ca.client("fsp-gateway").unwrap();
    let cert = write(dir.path(), "client.pem", &client.cert_pem);
    let key = write(dir.path(), "client.key", &client.key_pem);
    let without = through(
        &db,
        &relay,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    assert!(PostgresTrail::connect(&without, None).is_err());
    let with = format!("{without}&sslcert={cert}&sslkey={key}");
    PostgresTrail::connect(&with, None).unwrap();
}
