//! The audit trail's conformance suite, run against both backends (`file`, and
//! `postgres` when `FSP_TEST_POSTGRES_URL` is set): a gateway killed under load lost no
//! call a client was answered for; any altered, removed or swapped record is named by
//! `fsp audit verify`; an audit store that becomes unavailable stops calls before the
//! provider, and calls flow again when it returns, without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// Where a test's trail is kept.
enum Store {
    File,
    /// A schema of its own in the test database; dropped at the end.
    Postgres {
        url: String,
        schema: String,
    },
}

impl Store {
    /// The file backend, and the PostgreSQL one when the test database is given.
    fn all(test: &str) -> Vec<Store> {
        let mut stores = vec![Store::File];
        match std::env::var("FSP_TEST_POSTGRES_URL") {
            Ok(url) => {
                let schema = format!(
                    "fsp_{test}_{}",
                    uuid::Uuid::now_v7().simple().to_string().get(20..).unwrap()
                );
                sql(&url, &format!("CREATE SCHEMA {schema}"));
                stores.push(Store::Postgres { url, schema });
            }
            Err(_) => eprintln!("postgres backend skipped: FSP_TEST_POSTGRES_URL is not set"),
        }
        stores
    }

    fn name(&self) -> &'static str {
        match self {
            Store::File => "file",
            Store::Postgres { .. } => "postgres",
        }
    }

    /// The URL the gateway is given: the test database, in the test's schema, reached
    /// through `via` when given (a relay the test can cut).
    fn gateway_url(&self, via: Option<SocketAddr>) -> Option<String> {
        let Store::Postgres { url, schema } = self else {
            return None;
        };
        let mut url = url.clone();
        if let Some(via) = via {
            let at = url.find('@').map_or("postgres://".len(), |i| i + 1);
            let end = url[at..].find('/').map_or(url.len(), |i| at + i);
            url.replace_range(at..end, &via.to_string());
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        Some(format!("{url}{sep}options=-csearch_path%3D{schema}"))
    }

    /// Writes the gateway's configuration with this store as its `[audit]`.
    fn config(
        &self,
        pki: &Pki,
        up: SocketAddr,
        port: u16,
        admin: u16,
        via: Option<SocketAddr>,
    ) -> PathBuf {
        let config = write_config(pki, up, port, admin, "");
        if let Some(url) = self.gateway_url(via) {
            let text = std::fs::read_to_string(&config).unwrap().replace(
                "backend = \"file\"\ndir     = \"audit\"",
                &format!("backend = \"postgres\"\nurl     = \"{url}\"\ndir     = \"state\""),
            );
            std::fs::write(&config, text).unwrap();
        }
        config
    }

    /// Runs SQL in the test's schema.
    fn sql(&self, statements: &str) {
        if let Store::Postgres { url, schema } = self {
            sql(url, &format!("SET search_path = {schema}; {statements}"));
        }
    }

    /// The first column of a query's rows, as text (PostgreSQL only).
    fn column(&self, query: &str) -> Vec<String> {
        let Store::Postgres { url, schema } = self else {
            return Vec::new();
        };
        let (url, query) = (url.clone(), format!("SET search_path = {schema}; {query}"));
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            c.simple_query(&query)
                .unwrap_or_else(|e| panic!("{query}: {e}"))
                .into_iter()
                .filter_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .collect()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Store::Postgres { url, schema } = self {
            sql(url, &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    }
}

/// Runs SQL statements on the test database, from a thread of their own (the blocking
/// client cannot run on the test's runtime).
fn sql(url: &str, statements: &str) {
    let (url, statements) = (url.to_owned(), statements.to_owned());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute(&statements)
            .unwrap_or_else(|e| panic!("{statements}: {e}"));
    })
    .join()
    .unwrap();
}

/// `fsp audit <command> --config <config> <args>`: exit code, stdout, stderr.
fn fsp_audit(command: &str, config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fsp"))
        .args(["audit", command, "--config"])
        .arg(config)
        .args(args)
        .env("FSP_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `fsp audit verify`: exit code and everything it printed.
fn verify(config: &Path) -> (i32, String) {
    let (code, out, err) = fsp_audit("verify", config, &[]);
    (code, out + &err)
}

/// `fsp audit export`: one record per call.
fn exported(config: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = fsp_audit("export", config, &[]);
    assert_eq!(code, 0, "{out}{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A provider that counts the calls that reach it.
async fn counting_upstream() -> (SocketAddr, std::sync::Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(
                            Full::<bytes::Bytes>::from("{}"),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

const CALL: &str = "/person/getPerson/v3/p";

#[tokio::test]
async fn a_gateway_killed_under_load_lost_no_call_a_client_was_answered_for() {
    for store in Store::all("crash") {
        let pki = Pki::new();
        let up = upstream().await;
        let (port, admin) = (free_port(), free_port());
        let config = store.config(&pki, up, port, admin, None);
        let mut gw = Gateway::spawn(&config, port, admin).await;
        // Eight clients call as fast as they can, keeping every message id they got.
        let answered = Shared::new(std::sync::Mutex::new(Vec::<String>::new()));
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let (answered, url, c) = (
                    answered.clone(),
                    gw.url(CALL),
                    client(&pki, Some(&pki.consumer), false),
                );
                tokio::spawn(async move {
                    while let Ok((status, h, ..)) = send(&c, get(&url)).await {
                        assert_eq!(status, StatusCode::OK);
                        let id = h["fsp-message-id"].to_str().unwrap().to_owned();
                        answered.lock().unwrap().push(id);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        gw.kill();
        for c in clients {
            c.await.unwrap();
        }
        let answered = answered.lock().unwrap().clone();
        assert!(
            answered.len() > 50,
            "{}: only {} calls",
            store.name(),
            answered.len()
        );

        // Restarted: a torn tail (if any) is cut, and the chain goes on.
        let mut gw = Gateway::spawn(&config, port, admin).await;
        let c = client(&pki, Some(&pki.consumer), false);
        assert_eq!(
            send(&c, get(&gw.url(CALL))).await.unwrap().0,
            StatusCode::OK
        );
        gw.stop();

        let (code, out) = verify(&config);
        assert_eq!(code, 0, "{}: {out}", store.name());
        let calls = exported(&config);
        let ids: std::collections::HashSet<&str> = calls
            .iter()
            .map(|r| r["message_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids.len(),
            calls.len(),
            "{}: one record per call",
            store.name()
        );
        let lost: Vec<&String> = answered
            .iter()
            .filter(|id| !ids.contains(id.as_str()))
            .collect();
        assert!(
            lost.is_empty(),
            "{}: {} answered calls not in the trail: {lost:?}",
            store.name(),
            lost.len()
        );
        // A call cut by the kill shows as such: its request line, status 0.
        for r in &calls {
            if r["phase"] == "request" {
                assert_eq!(
                    (r["status"].as_u64(), r["decision"].as_str()),
                    (Some(0), Some("allowed"))
                );
            } else {
                assert_eq!(
                    (r["phase"].as_str(), r["status"].as_u64()),
                    (Some("outcome"), Some(200))
                );
            }
        }
        eprintln!(
            "{}: {} calls answered before the kill, {} recorded, {} without an outcome",
            store.name(),
            answered.len(),
            calls.len(),
            calls.iter().filter(|r| r["phase"] == "request").count()
        );
    }
}

#[tokio::test]
async fn an_altered_removed_or_swapped_record_is_named_by_verify() {
    for store in Store::all("tamper") {
        let pki = Pki::new();
        let up = upstream().await;
        let config = store.config(&pki, up, 0, 0, None);
        let mut gw = Gateway::start(&config).await;
        let c = client(&pki, Some(&pki.consumer), false);
        for _ in 0..4 {
            assert_eq!(
                send(&c, get(&gw.url(CALL))).await.unwrap().0,
                StatusCode::OK
            );
        }
        gw.stop();
        let (code, out) = verify(&config);
        assert_eq!(code, 0, "{}: {out}", store.name());
        assert!(out.contains("8 records"), "{}: {out}", store.name());

        // The chain's lines in order: (seq, message id).
        let lines: Vec<String> = match &store {
            Store::File => trail(&pki)
                .1
                .iter()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["message_id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect(),
            // (Outcomes may be committed after the next call's request line.)
            Store::Postgres { .. } => store.column("SELECT message_id FROM fsp_audit ORDER BY seq"),
        };
        let named = |what: &str, id: &str| {
            let (code, out) = verify(&config);
            assert_eq!(code, 4, "{} {what}: {out}", store.name());
            assert!(
                out.contains(id),
                "{} {what}: {id} not named in {out}",
                store.name()
            );
        };
        match &store {
            Store::File => {
                let (file, original) = trail(&pki);
                let write =
                    |lines: &[String]| std::fs::write(&file, lines.join("\n") + "\n").unwrap();
                let mut altered = original.clone();
                altered[4] = altered[4].replace("\"operation\":\"GET", "\"operation\":\"PUT");
                write(&altered);
                named("altered", &lines[4]);
                let mut removed = original.clone();
                removed.remove(2);
                write(&removed);
                named("removed", &lines[3]);
                let mut swapped = original.clone();
                swapped.swap(5, 6);
                write(&swapped);
                named("swapped", &lines[6]);
                write(&original);
            }
            Store::Postgres { .. } => {
                // seq 5 is the fifth line, etc. Its operation is kept to put back (the
                // export, read while it is altered, could give the altered one).
                let operation = store.column("SELECT operation FROM fsp_audit WHERE seq = 5");
                store.sql("UPDATE fsp_audit SET operation = 'PUT /x' WHERE seq = 5");
                named("altered", &lines[4]);
                store.sql(&format!(
                    "UPDATE fsp_audit SET operation = '{}' WHERE seq = 5",
                    operation[0]
                ));
                store.sql(
                    "CREATE TABLE kept AS SELECT * FROM fsp_audit WHERE seq = 3; \
                     DELETE FROM fsp_audit WHERE seq = 3",
                );
                named("removed", &lines[3]);
                store.sql("INSERT INTO fsp_audit SELECT * FROM kept; DROP TABLE kept");
                store.sql(
                    "UPDATE fsp_audit SET seq = -6 WHERE seq = 6; \
                     UPDATE fsp_audit SET seq = 6 WHERE seq = 7; \
                     UPDATE fsp_audit SET seq = 7 WHERE seq = -6",
                );
                named("swapped", &lines[6]);
                store.sql(
                    "UPDATE fsp_audit SET seq = -7 WHERE seq = 7; \
                     UPDATE fsp_audit SET seq = 7 WHERE seq = 6; \
                     UPDATE fsp_audit SET seq = 6 WHERE seq = -7",
                );
            }
        }
        let (code, out) = verify(&config);
        assert_eq!(code, 0, "{} restored: {out}", store.name());
    }
}

/// Calls identified by a token on connections that presented a certificate, as node
/// `beside` of `store` writes them (a sink of the store's own, from a thread of its own:
/// the blocking PostgreSQL client cannot run on the test's runtime).
fn write_beside(store: &Store, pki: &Pki, records: Vec<audit::Record>) {
    let (dir, database) = match store {
        Store::File => (Some(pki.path().join("audit")), None),
        Store::Postgres { url, schema } => (None, Some((url.clone(), schema.clone()))),
    };
    std::thread::spawn(move || {
        use audit::AuditSink;
        let (sink, join): (Box<dyn AuditSink>, Box<dyn FnOnce()>) = match (dir, database) {
            (Some(dir), _) => {
                let (sink, handle) = audit::file::FileSink::start(&dir, "beside").unwrap();
                (Box::new(sink), Box::new(move || handle.join()))
            }
            (None, Some((url, schema))) => {
                let (sink, handle) =
                    audit::postgres::PostgresSink::start_with(audit::postgres::Settings {
                        schema: Some(schema),
                        ..audit::postgres::Settings::new(&url, "beside")
                    })
                    .unwrap();
                (Box::new(sink), Box::new(move || handle.join()))
            }
            (None, None) => unreachable!(),
        };
        for r in records {
            sink.submit(r).unwrap();
        }
        drop(sink);
        join();
    })
    .join()
    .unwrap();
}

#[tokio::test]
async fn a_certificate_recorded_beside_a_token_is_verified_exported_and_sealed() {
    for store in Store::all("beside") {
        let pki = Pki::new();
        let up = upstream().await;
        let config = store.config(&pki, up, 0, 0, None);
        let mut gw = Gateway::start(&config).await;
        let c = client(&pki, Some(&pki.consumer), false);
        assert_eq!(
            send(&c, get(&gw.url(CALL))).await.unwrap().0,
            StatusCode::OK
        );
        gw.stop();
        // Another certificate than the one the gateway's call gave as its credential.
        let sha256 = certs::sha256(&pki.stranger.der).to_string();
        let records = (0..3)
            .map(|i| audit::Record {
                message_id: format!("beside-{i}"),
                timestamp: "2026-12-01T10:00:00.000Z".into(),
                consumer: Some("ville-bxl".into()),
                credential: Some("oauth".into()),
                credential_id: Some("ville-bxl-app".into()),
                certificate_sha256: (i != 1).then(|| sha256.clone()),
                source_ip: "192.0.2.1".into(),
                operation: format!("GET {CALL}"),
                decision: "allowed".into(),
                status: 200,
                node: "beside".into(),
                ..Default::default()
            })
            .collect();
        write_beside(&store, &pki, records);
        let (code, out) = verify(&config);
        assert_eq!(code, 0, "{}: {out}", store.name());
        assert!(out.contains("5 records"), "{}: {out}", store.name());

        let calls = exported(&config);
        let of = |id: &str| calls.iter().find(|r| r["message_id"] == id).unwrap();
        assert_eq!(of("beside-0")["certificate_sha256"], sha256.as_str());
        assert_eq!(of("beside-0")["credential_id"], "ville-bxl-app");
        assert!(of("beside-1").get("certificate_sha256").is_none());
        // The gateway's own call, identified by its certificate, has none.
        assert!(
            calls
                .iter()
                .filter(|r| r["node"] != "beside")
                .all(|r| r.get("certificate_sha256").is_none() && r["credential"] == "certificate"),
            "{}: {calls:?}",
            store.name()
        );
        let (code, csv, err) = fsp_audit("export", &config, &["--format", "csv"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            csv.lines()
                .next()
                .unwrap()
                .contains(",phase,certificate_sha256,prev_hash,"),
            "{}: {csv}",
            store.name()
        );
        assert_eq!(csv.matches(&sha256).count(), 2, "{}: {csv}", store.name());

        // Another certificate put in its place is named by verify.
        let other = "0".repeat(64);
        match &store {
            Store::File => {
                let dir = pki.path().join("audit");
                let file = std::fs::read_dir(&dir)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            n.starts_with("audit-beside-") && n.ends_with(".jsonl")
                        })
                    })
                    .unwrap();
                let text = std::fs::read_to_string(&file).unwrap();
                std::fs::write(&file, text.replacen(&sha256, &other, 2)).unwrap();
            }
            Store::Postgres { .. } => store.sql(&format!(
                "UPDATE fsp_audit SET certificate_sha256 = '{other}' \
                 WHERE node = 'beside' AND certificate_sha256 IS NOT NULL"
            )),
        }
        let (code, out) = verify(&config);
        assert_eq!(code, 4, "{}: {out}", store.name());
        assert!(out.contains("beside-0"), "{}: {out}", store.name());
    }
}

/// A relay between the gateway and PostgreSQL that the test can cut (every connection
/// dropped, new ones refused) and mend.
struct Relay {
    address: SocketAddr,
    up: std::sync::Arc<AtomicBool>,
}

impl Relay {
    async fn to(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(AtomicBool::new(true));
        let (target, flag) = (target.to_owned(), up.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                if !flag.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let (target, flag) = (target.clone(), flag.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let cut = async {
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut => {}
                    }
                });
            }
        });
        Self { address, up }
    }
}

/// Host and port of a postgres:// URL.
fn host_port(url: &str) -> String {
    let at = url.find('@').map_or("postgres://".len(), |i| i + 1);
    let rest = &url[at..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let hp = &rest[..end];
    if hp.contains(':') {
        hp.to_owned()
    } else {
        format!("{hp}:5432")
    }
}

// Several threads: the relay must go on relaying while the test waits for the
// gateway to stop (which blocks the test's thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_audit_store_stops_calls_before_the_provider_until_it_returns() {
    for store in Store::all("fault") {
        let pki = Pki::new();
        let (up, reached) = counting_upstream().await;
        let (port, admin) = (free_port(), free_port());
        let relay = match &store {
            Store::Postgres { url, .. } => Some(Relay::to(&host_port(url)).await),
            Store::File => None,
        };
        let config = store.config(&pki, up, port, admin, relay.as_ref().map(|r| r.address));
        // Four calls a minute: the calls refused while the trail is away must not spend
        // them (only a call that finds the sink still healthy and fails to write may).
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "name = \"Registre national\"",
            "name = \"Registre national\"\nconsumer_limit = { rate = \"4/m\", burst = 4 }",
        );
        std::fs::write(&config, text).unwrap();
        let mut gw = Gateway::spawn(&config, port, admin).await;
        let c = client(&pki, Some(&pki.consumer), false);
        let call = || async { send(&c, get(&gw.url(CALL))).await.unwrap() };
        assert_eq!(call().await.0, StatusCode::OK);
        assert_eq!(reached.load(Ordering::SeqCst), 1);

        // The store goes away: a full file system (the file-size limit reached), or
        // every connection to PostgreSQL cut.
        let pid = gw.pid().to_string();
        match &relay {
            None => {
                // Where the records end in the segment being written (the zeros the
                // writer wrote ahead of them are not records): the next batch would go
                // past the limit.
                let used: u64 = std::fs::read_dir(pki.path().join("audit"))
                    .unwrap()
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                    .map(|e| {
                        let bytes = std::fs::read(e.path()).unwrap();
                        bytes
                            .iter()
                            .rposition(|&b| b != 0)
                            .map_or(0, |i| i as u64 + 1)
                    })
                    .max()
                    .unwrap_or(0);
                let limit = format!("--fsize={}:unlimited", used + 100);
                let ok = Command::new("prlimit")
                    .args(["--pid", &pid, &limit])
                    .status()
                    .unwrap();
                assert!(ok.success());
            }
            Some(r) => {
                r.up.store(false, Ordering::SeqCst);
                // The relay drops its connections within 20 ms.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut refused = 0;
        for _ in 0..10 {
            let (status, _, body, _) = call().await;
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{}: {body:?}",
                store.name()
            );
            assert!(String::from_utf8_lossy(&body).contains("FSP-AUDIT-UNAVAILABLE"));
            refused += 1;
        }
        assert_eq!(refused, 10);
        assert_eq!(
            reached.load(Ordering::SeqCst),
            1,
            "{}: a call reached the provider while the trail could not be written",
            store.name()
        );
        let (status, ready) = admin_request(admin, "GET", "/readyz", None).await;
        assert_eq!(status, 503, "{}: {ready}", store.name());
        // A certificate renewed meanwhile is not taken: the reload it starts re-reads the
        // whole configuration, a change the trail cannot record now.
        let before = served_certificate(&pki, port).await;
        let renewed = pki.ca.server(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(pki.path().join("server.key"), &renewed.key_pem).unwrap();
        std::fs::write(pki.path().join("server.pem"), &renewed.cert_pem).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            served_certificate(&pki, port).await == before,
            "{}: a certificate was reloaded while the trail could not record the reload",
            store.name()
        );

        // It returns: calls flow again within seconds, without a restart.
        match &relay {
            None => {
                let ok = Command::new("prlimit")
                    .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
                    .status()
                    .unwrap();
                assert!(ok.success());
            }
            Some(r) => r.up.store(true, Ordering::SeqCst),
        }
        let back = Instant::now();
        loop {
            let (status, ..) = call().await;
            if status == StatusCode::OK {
                break;
            }
            assert!(
                back.elapsed() < Duration::from_secs(10),
                "{}: still {status}",
                store.name()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "{}: calls flowed again {:?} after the store returned",
            store.name(),
            back.elapsed()
        );
        // ... and the renewed certificate is taken now that the reload can be recorded
        // (the watcher's retries are 2 s, 4 s, 8 s apart by now).
        until_served(
            &pki,
            port,
            &renewed.der,
            Duration::from_secs(20),
            "the renewed certificate was not taken once the trail returned",
        )
        .await;
        gw.stop();
        // Nothing was lost: the refusals are in the trail, and it verifies.
        let (code, out) = verify(&config);
        assert_eq!(code, 0, "{}: {out}", store.name());
        let calls = exported(&config);
        let refusals = calls
            .iter()
            .filter(|r| r["decision"] == "FSP-AUDIT-UNAVAILABLE")
            .count();
        assert!(
            refusals >= 10,
            "{}: {refusals} refusals recorded",
            store.name()
        );
        assert!(
            calls.iter().any(|r| r["operation"] == "certificate reload"
                && r["credential_id"] == "certificate watcher"
                && r["status"] == 200),
            "{}: the certificate reload is not on the record",
            store.name()
        );
    }
}

/// `[audit] signing_key`: a trail written before the key was set is refused by the
/// gateway and by `verify` until `fsp audit seal` vouches for it; from then on the heads
/// are signed, and `verify` checks them with the configured key or `--public-key`, and
/// refuses a key it is not given. Both backends.
#[tokio::test]
async fn a_signed_trail_is_sealed_once_then_verified_against_its_public_key() {
    for store in Store::all("sealed") {
        let pki = Pki::new();
        let up = upstream().await;
        let (port, admin) = (free_port(), free_port());
        let config = store.config(&pki, up, port, admin, None);
        let unsigned = std::fs::read_to_string(&config).unwrap();
        let mut gw = Gateway::spawn(&config, port, admin).await;
        ok_calls(&gw, &pki, 3).await;
        gw.stop();

        // A key for the trail, and another one.
        let dir = config.parent().unwrap();
        let (key, pem) = audit::seal::SigningKey::generate().unwrap();
        std::fs::write(dir.join("audit-signing.pem"), &pem).unwrap();
        std::fs::write(dir.join("audit-signing.pub.pem"), key.public_pem()).unwrap();
        let (other, _) = audit::seal::SigningKey::generate().unwrap();
        std::fs::write(dir.join("other.pub.pem"), other.public_pem()).unwrap();
        std::fs::write(
            &config,
            unsigned.replace(
                "[audit]\n",
                "[audit]\nsigning_key = \"audit-signing.pem\"\n",
            ),
        )
        .unwrap();

        // Written without the key: refused by the gateway and by verify.
        let refused = Command::new(env!("CARGO_BIN_EXE_fsp"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("FSP_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{}: {err}", store.name());
        assert!(
            err.contains("is not signed") && err.contains("fsp audit seal"),
            "{}: {err}",
            store.name()
        );
        let (code, out) = verify(&config);
        assert_eq!(code, 4, "{}: {out}", store.name());
        assert!(out.contains("is not signed"), "{}: {out}", store.name());

        // Sealed once; the gateway writes on, signing.
        let (code, out, err) = fsp_audit("seal", &config, &[]);
        assert_eq!(code, 0, "{}: {out}{err}", store.name());
        assert!(out.contains(key.id()), "{}: {out}", store.name());
        let mut gw = Gateway::spawn(&config, port, admin).await;
        ok_calls(&gw, &pki, 2).await;
        gw.stop();
        let (code, out) = verify(&config);
        assert_eq!(code, 0, "{}: {out}", store.name());
        assert!(
            out.contains("signed by a trusted key") && out.contains(key.id()),
            "{}: {out}",
            store.name()
        );

        // An auditor's configuration holds no private key: the public one is given.
        std::fs::write(&config, &unsigned).unwrap();
        let (code, out) = verify(&config);
        assert_eq!(code, 0, "{}: {out}", store.name());
        assert!(out.contains("not signed"), "{}: {out}", store.name());
        let public = dir.join("audit-signing.pub.pem");
        let (code, out, err) = fsp_audit(
            "verify",
            &config,
            &["--public-key", public.to_str().unwrap()],
        );
        assert_eq!(code, 0, "{}: {out}{err}", store.name());
        let public = dir.join("other.pub.pem");
        let (code, out, err) = fsp_audit(
            "verify",
            &config,
            &["--public-key", public.to_str().unwrap()],
        );
        assert_eq!(code, 4, "{}: {out}{err}", store.name());
        assert!(err.contains("not trusted"), "{}: {err}", store.name());
        // Sealing needs the private key.
        let (code, _, err) = fsp_audit("seal", &config, &[]);
        assert_eq!(code, 1, "{}: {err}", store.name());
        assert!(err.contains("signing_key"), "{}: {err}", store.name());
    }
}

/// `n` calls, each answered 200.
async fn ok_calls(gw: &Gateway, pki: &Pki, n: usize) {
    let c = client(pki, Some(&pki.consumer), false);
    for _ in 0..n {
        assert_eq!(
            send(&c, get(&gw.url(CALL))).await.unwrap().0,
            StatusCode::OK
        );
    }
}
