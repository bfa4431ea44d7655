//! The PostgreSQL audit sink against a real server. Each test works in a schema of its
//! own (dropped at the end), so tests run in parallel in one database. Without
//! `FSP_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`) they say so
//! and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use audit::chain::{Break, Chain};
use audit::export::{Filter, Format, Writer, parse_instant};
use audit::file::{Verified, VerifyError};
use audit::postgres::{PostgresSink, PostgresSinkHandle, PostgresTrail, Settings, TrailError};
use audit::seal::{Seals, SigningKey, TrustedKeys};
use audit::stats::{self, Query, Rollup, Row};
use audit::{AuditError, AuditSink, Phase, Record};
use time::Date;

/// A schema of this test's own in the test database.
struct Db {
    url: String,
    schema: String,
}

fn db() -> Option<Db> {
    let Ok(url) = std::env::var("FSP_TEST_POSTGRES_URL") else {
        eprintln!("skipped: FSP_TEST_POSTGRES_URL is not set");
        return None;
    };
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let schema = format!(
        "fsp_test_{}_{nanos}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    Some(Db { url, schema })
}

impl Db {
    fn settings(&self, node: &str) -> Settings {
        Settings {
            schema: Some(self.schema.clone()),
            ..Settings::new(&self.url, node)
        }
    }

    fn start(&self, node: &str) -> (PostgresSink, PostgresSinkHandle) {
        PostgresSink::start_with(self.settings(node)).unwrap()
    }

    /// A plain connection, in the test's schema.
    fn client(&self) -> postgres::Client {
        let mut c = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
        c.batch_execute(&format!("SET search_path TO {}", self.schema))
            .unwrap();
        c
    }

    fn trail(&self) -> PostgresTrail {
        PostgresTrail::connect(&self.url, Some(&self.schema)).unwrap()
    }

    fn count(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

fn record(i: usize) -> Record {
    Record {
        message_id: format!("m-{i:05}"),
        timestamp: "2026-11-24T10:15:30.123Z".into(),
        consumer: Some("city-ghent".into()),
        credential: Some("certificate".into()),
        source_ip: "192.0.2.1".into(),
        service: Some("person/getPerson".into()),
        version: Some("v3".into()),
        operation: "GET /person/getPerson/v3/persons/85073100145".into(),
        purpose: Some("social-housing".into()),
        end_user: Some("officer \"42\"\n".into()),
        decision: "allowed".into(),
        status: 200,
        duration_ms: 12.345,
        request_bytes: 10,
        response_bytes: 2048,
        node: "n".into(),
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Writes `n` records as node `n` and stops the sink.
fn written(db: &Db, n: usize) {
    let (sink, handle) = db.start("n");
    for i in 0..n {
        sink.submit(record(i)).unwrap();
    }
    drop(sink);
    handle.join();
}

/// Inserts a row by hand, as a forger (or a test of retention) would.
fn insert_row(c: &mut postgres::Client, r: &Record, seq: i64, written_at: &str) {
    c.execute(
        "INSERT INTO fsp_audit (message_id, \"timestamp\", consumer, credential, source_ip, \
         service, version, operation, purpose, end_user, decision, status, duration_ms, \
         request_bytes, response_bytes, node, prev_hash, hash, seq, written_at) \
         VALUES ($1, $2::text::timestamptz, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
         $14, $15, $16, $17, $18, $19, $20::text::timestamptz)",
        &[
            &r.message_id,
            &r.timestamp,
            &r.consumer,
            &r.credential,
            &r.source_ip,
            &r.service,
            &r.version,
            &r.operation,
            &r.purpose,
            &r.end_user,
            &r.decision,
            &i32::from(r.status),
            &r.duration_ms,
            &(r.request_bytes as i64),
            &(r.response_bytes as i64),
            &r.node,
            &r.prev_hash,
            &r.hash,
            &seq,
            &written_at,
        ],
    )
    .unwrap();
}

fn broken(db: &Db, days: Option<u32>) -> Break {
    match db.trail().verify(days) {
        Err(VerifyError::Broken(b)) => b,
        other => panic!("expected a break, got {other:?}"),
    }
}

#[test]
fn records_from_many_threads_all_arrive_in_one_valid_chain() {
    let Some(db) = db() else { return };
    let (sink, handle) = db.start("n");
    std::thread::scope(|s| {
        for t in 0..4 {
            let sink = &sink;
            s.spawn(move || {
                for i in 0..500 {
                    sink.submit(record(t * 1000 + i)).unwrap();
                }
            });
        }
    });
    assert!(sink.health().is_ok());
    drop(sink);
    handle.join();
    assert_eq!(
        db.count("SELECT count(DISTINCT message_id) FROM fsp_audit"),
        2000
    );
    assert_eq!(db.count("SELECT count(*) FROM fsp_audit"), 2000);
    assert_eq!(db.count("SELECT max(seq) FROM fsp_audit"), 2000);
    assert_eq!(
        db.trail().verify(None).unwrap(),
        Verified {
            files: 1,
            records: 2000
        }
    );
    // This month's and next month's partitions, nothing by default.
    assert_eq!(
        db.count("SELECT count(*) FROM pg_inherits WHERE inhparent = 'fsp_audit'::regclass"),
        2
    );
}

#[test]
fn a_durable_record_is_committed_when_it_resolves_and_waiting_callers_share_commits() {
    let Some(db) = db() else { return };
    let (sink, handle) = db.start("n");
    let rt = runtime();
    let mut other = db.client();
    for i in 0..20 {
        let durable = sink.submit_durable(&record(i)).unwrap();
        rt.block_on(durable).unwrap();
        let seen: i64 = other
            .query_one(
                "SELECT count(*) FROM fsp_audit WHERE message_id = $1",
                &[&record(i).message_id],
            )
            .unwrap()
            .get(0);
        assert_eq!(seen, 1, "record {i} not visible once durable");
    }
    // Fifty callers waiting at once: far fewer commits than records.
    let waiting: Vec<_> = (100..150)
        .map(|i| sink.submit_durable(&record(i)).unwrap())
        .collect();
    rt.block_on(async {
        for d in waiting {
            d.await.unwrap();
        }
    });
    let commits =
        db.count("SELECT count(DISTINCT written_at) FROM fsp_audit WHERE message_id >= 'm-00100'");
    assert!(commits < 25, "{commits} commits for 50 records");
    drop(sink);
    handle.join();
    assert_eq!(db.trail().verify(None).unwrap().records, 70);
}

/// Write-ahead request lines that callers wait for, with the values a column could get
/// wrong (NUL, a byte count beyond `bigint`, NaN, non-ASCII, quotes, the certificate
/// extension on some only), submitted in groups of 1 to 12 at once (the writer commits
/// what it finds waiting, so batches of many sizes): every column is stored as sealed
/// (verification rebuilds each record from its columns and checks its hash) and read
/// back as it was taken.
#[test]
fn request_lines_are_stored_as_sealed_and_read_back_as_taken() {
    let Some(db) = db() else { return };
    let (sink, handle) = db.start("n");
    let rt = runtime();
    let request = |i: usize| Record {
        phase: Some(Phase::Request),
        status: 0,
        duration_ms: f64::NAN,
        request_bytes: u64::MAX,
        response_bytes: 0,
        consumer_ref: i.is_multiple_of(2).then(|| format!("ref-{i}\0x")),
        certificate_sha256: i
            .is_multiple_of(3)
            .then(|| format!("{:02x}", i % 256).repeat(32)),
        detail: i.is_multiple_of(5).then(|| "ü\u{1F600}\\\"".to_owned()),
        ..record(i)
    };
    let mut taken = Vec::new();
    let mut next = 0;
    // Batches of 1 to 12 records submitted at once (the writer may split them further).
    for size in 1..=12 {
        let waiting: Vec<_> = (next..next + size)
            .map(|i| {
                taken.push(request(i));
                sink.submit_durable(&request(i)).unwrap()
            })
            .collect();
        next += size;
        rt.block_on(async {
            for d in waiting {
                d.await.unwrap();
            }
        });
    }
    drop(sink);
    handle.join();
    assert_eq!(db.trail().verify(None).unwrap().records, next as u64);
    let mut trail = db.trail();
    for r in &taken {
        let mut stored = trail.lookup(&r.message_id).unwrap().unwrap();
        // NaN is not equal to itself: checked apart.
        assert!(stored.duration_ms.is_nan(), "{}", r.message_id);
        stored.duration_ms = 0.0;
        let expected = Record {
            consumer_ref: r.consumer_ref.as_ref().map(|s| s.replace('\0', "\u{fffd}")),
            request_bytes: i64::MAX as u64,
            duration_ms: 0.0,
            prev_hash: stored.prev_hash.clone(),
            hash: stored.hash.clone(),
            ..r.clone()
        };
        assert_eq!(stored, expected);
    }
}

/// While callers wait, a commit carries their records only: the records nobody waits for
/// (outcomes of answered calls, refusals) are held back for a window and share later
/// commits, none is lost, the chain is whole, and the statistics count every call.
#[test]
fn records_nobody_waits_for_share_later_commits_while_callers_wait() {
    let Some(db) = db() else { return };
    let (sink, handle) = db.start("n");
    let rt = runtime();
    for i in 0..100 {
        // An outcome nobody waits for, then a caller that waits for its own record.
        sink.submit(record(i)).unwrap();
        rt.block_on(sink.submit_durable(&record(1000 + i)).unwrap())
            .unwrap();
    }
    // Quiet now: what was held back is written at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while db.count("SELECT count(*) FROM fsp_audit") < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "held records not written"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let commits = |filter: &str| {
        db.count(&format!(
            "SELECT count(DISTINCT written_at) FROM fsp_audit WHERE {filter}"
        ))
    };
    let (held, waited) = (
        commits("message_id < 'm-01000'"),
        commits("message_id >= 'm-01000'"),
    );
    println!(
        "100 records nobody waited for in {held} commits, beside {waited} commits for callers"
    );
    assert!(
        held < waited,
        "{held} commits for held records, {waited} for waited ones"
    );
    drop(sink);
    handle.join();
    assert_eq!(db.count("SELECT count(*) FROM fsp_audit"), 200);
    assert_eq!(db.trail().verify(None).unwrap().records, 200);
    assert_eq!(
        db.count("SELECT sum(calls)::bigint FROM fsp_audit_daily"),
        200
    );
}

#[test]
fn lookup_and_export_give_one_record_per_call_preferring_the_outcome() {
    let Some(db) = db() else { return };
    let (sink, handle) = db.start("n");
    let sink = Arc::new(sink);
    let rt = runtime();
    let line = |id: &str, second: u32, phase: Option<Phase>, status: u16| Record {
        message_id: id.into(),
        timestamp: format!("2026-12-01T10:00:0{second}.000Z"),
        phase,
        status,
        ..record(0)
    };
    let lines = [
        line("m1", 1, Some(Phase::Request), 0),
        line("m1", 1, Some(Phase::Outcome), 200),
        line("m2", 2, Some(Phase::Request), 0),
        Record {
            consumer: Some("other".into()),
            end_user: Some("agent-7".into()),
            ..line("m3", 3, None, 403)
        },
    ];
    for l in &lines {
        rt.block_on(sink.submit_durable(l).unwrap()).unwrap();
    }
    // From the gateway's blocking pool, on a connection of its own.
    let found = |id: &'static str| {
        let sink = sink.clone();
        rt.block_on(async { tokio::task::spawn_blocking(move || sink.lookup(id)).await })
            .unwrap()
            .unwrap()
    };
    let m1 = found("m1").unwrap();
    assert_eq!((m1.phase, m1.status), (Some(Phase::Outcome), 200));
    let m2 = found("m2").unwrap();
    assert_eq!((m2.phase, m2.status), (Some(Phase::Request), 0));
    assert_eq!(found("m3").unwrap().status, 403);
    assert!(found("absent").is_none());
    // As written: sealed, with the timestamp's text as given.
    assert_eq!(m1.timestamp, "2026-12-01T10:00:01.000Z");
    assert!(m1.hash.is_some() && m1.prev_hash.is_some());

    let mut trail = db.trail();
    let calls = |trail: &mut PostgresTrail, filter: &Filter| {
        let mut ids = Vec::new();
        trail
            .for_each_call(filter, |r| {
                ids.push((r.message_id, r.status));
                Ok::<(), audit::postgres::TrailError>(())
            })
            .unwrap();
        ids
    };
    assert_eq!(
        calls(&mut trail, &Filter::default()),
        [("m1".into(), 200), ("m2".into(), 0), ("m3".into(), 403)]
    );
    let only = |f: Filter| {
        calls(&mut db.trail(), &f)
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<String>>()
    };
    assert_eq!(
        only(Filter {
            consumer: Some("city-ghent".into()),
            ..Default::default()
        }),
        ["m1", "m2"]
    );
    assert_eq!(
        only(Filter {
            from: Some(parse_instant("2026-12-01T10:00:02Z").unwrap()),
            to: Some(parse_instant("2026-12-01T10:00:03Z").unwrap()),
            ..Default::default()
        }),
        ["m2"]
    );
    assert_eq!(
        only(Filter {
            end_user: Some("agent-7".into()),
            ..Default::default()
        }),
        ["m3"]
    );
    assert_eq!(
        only(Filter {
            message_id: Some("m1".into()),
            ..Default::default()
        }),
        ["m1"]
    );
    let mut out = Writer::new(Vec::new(), Format::Jsonl);
    assert_eq!(trail.export(&Filter::default(), &mut out).unwrap(), 3);
    let text = String::from_utf8(out.finish().unwrap()).unwrap();
    let exported: Vec<Record> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported[0], m1);
    // Operators see the same calls through the view.
    assert_eq!(db.count("SELECT count(*) FROM fsp_audit_calls"), 3);
    drop(trail);
    drop(Arc::into_inner(sink).unwrap());
    handle.join();
    assert_eq!(db.trail().verify(None).unwrap().records, 4);
}

/// A call identified by a token on a connection that presented a certificate.
fn with_certificate(i: usize) -> Record {
    Record {
        credential: Some("oauth".into()),
        credential_id: Some("ville-bxl-app".into()),
        certificate_sha256: Some(format!("{i:02x}").repeat(32)),
        ..record(i)
    }
}

#[test]
fn the_certificate_beside_a_token_is_stored_read_back_exported_and_sealed() {
    let Some(db) = db() else { return };
    let (sink, handle) = db.start("n");
    let records: Vec<Record> = (0..6)
        .map(|i| {
            if i % 2 == 1 {
                with_certificate(i)
            } else {
                record(i)
            }
        })
        .collect();
    for r in &records {
        sink.submit(r.clone()).unwrap();
    }
    drop(sink);
    handle.join();
    assert_eq!(db.trail().verify(None).unwrap().records, 6);
    assert_eq!(
        db.count("SELECT count(*) FROM fsp_audit_calls WHERE certificate_sha256 IS NOT NULL"),
        3
    );
    let found = db.trail().lookup("m-00003").unwrap().unwrap();
    assert_eq!(found.certificate_sha256, records[3].certificate_sha256);
    assert_eq!(found.credential_id.as_deref(), Some("ville-bxl-app"));
    assert_eq!(
        db.trail()
            .lookup("m-00002")
            .unwrap()
            .unwrap()
            .certificate_sha256,
        None
    );
    // Exported as stored: in the JSON line only where there is one, and a CSV column.
    let mut out = Writer::new(Vec::new(), Format::Jsonl);
    assert_eq!(db.trail().export(&Filter::default(), &mut out).unwrap(), 6);
    let text = String::from_utf8(out.finish().unwrap()).unwrap();
    let exported: Vec<Record> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported[3], found);
    assert_eq!(text.matches("\"certificate_sha256\":").count(), 3, "{text}");
    let mut out = Writer::new(Vec::new(), Format::Csv);
    db.trail().export(&Filter::default(), &mut out).unwrap();
    let csv = String::from_utf8(out.finish().unwrap()).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .contains(",phase,certificate_sha256,")
    );
    assert!(csv.contains(&format!(",{},", "03".repeat(32))), "{csv}");
    // The column is covered by the chain: altered, or taken away, it breaks it.
    for change in [format!("'{}'", "ff".repeat(32)), "NULL".to_owned()] {
        db.client()
            .batch_execute(&format!(
                "UPDATE fsp_audit SET certificate_sha256 = {change} WHERE seq = 4"
            ))
            .unwrap();
        assert_eq!(
            broken(&db, None),
            Break::Altered {
                at: "n/4".into(),
                message_id: "m-00003".into()
            }
        );
    }
    // Given to a record that had none, too.
    db.client()
        .batch_execute(&format!(
            "UPDATE fsp_audit SET certificate_sha256 = '{}' WHERE seq = 4; \
             UPDATE fsp_audit SET certificate_sha256 = '{}' WHERE seq = 3",
            "03".repeat(32),
            "ff".repeat(32)
        ))
        .unwrap();
    assert_eq!(
        broken(&db, None),
        Break::Altered {
            at: "n/3".into(),
            message_id: "m-00002".into()
        }
    );
}

#[test]
fn a_database_of_an_earlier_version_is_read_as_it_is_and_migrated_at_start() {
    let Some(db) = db() else { return };
    written(&db, 3);
    // The database as a gateway before migration 3 left it: no column, the view without
    // it, its comment kept.
    db.client()
        .batch_execute(
            "DROP VIEW fsp_audit_calls; \
             ALTER TABLE fsp_audit DROP COLUMN certificate_sha256; \
             CREATE VIEW fsp_audit_calls AS \
                 SELECT a.* FROM fsp_audit a \
                  WHERE a.phase IS DISTINCT FROM 'request' \
                     OR NOT EXISTS (SELECT 1 FROM fsp_audit o \
                                     WHERE o.message_id = a.message_id AND o.node = a.node \
                                       AND o.phase = 'outcome'); \
             COMMENT ON VIEW fsp_audit_calls IS 'One row per call'; \
             DROP TABLE fsp_audit_head; \
             DELETE FROM fsp_schema_migrations WHERE version >= 3",
        )
        .unwrap();
    // Read by this version without being migrated: its records have none.
    assert_eq!(db.trail().verify(None).unwrap().records, 3);
    let old = db.trail().lookup("m-00001").unwrap().unwrap();
    assert_eq!(
        (old.message_id.as_str(), old.certificate_sha256),
        ("m-00001", None)
    );
    let mut out = Writer::new(Vec::new(), Format::Jsonl);
    assert_eq!(db.trail().export(&Filter::default(), &mut out).unwrap(), 3);
    // A gateway of this version migrates it, and its chain goes on through the records
    // written with the column.
    let (sink, handle) = db.start("n");
    for i in 3..6 {
        sink.submit(with_certificate(i)).unwrap();
    }
    drop(sink);
    handle.join();
    assert_eq!(
        db.count("SELECT max(version)::bigint FROM fsp_schema_migrations"),
        5
    );
    assert_eq!(db.trail().verify(None).unwrap().records, 6);
    assert_eq!(
        db.count("SELECT count(*) FROM fsp_audit_calls WHERE certificate_sha256 IS NOT NULL"),
        3
    );
    assert_eq!(
        db.trail()
            .lookup("m-00004")
            .unwrap()
            .unwrap()
            .certificate_sha256,
        with_certificate(4).certificate_sha256
    );
    // The view was replaced, not dropped: its comment is still there.
    let comment: Option<String> = db
        .client()
        .query_one("SELECT obj_description('fsp_audit_calls'::regclass)", &[])
        .unwrap()
        .get(0);
    assert_eq!(comment.as_deref(), Some("One row per call"));
}

#[test]
fn an_altered_column_breaks_verification_at_its_row() {
    let Some(db) = db() else { return };
    written(&db, 8);
    assert_eq!(db.trail().verify(None).unwrap().records, 8);
    db.client()
        .batch_execute("UPDATE fsp_audit SET purpose = 'another purpose' WHERE seq = 4")
        .unwrap();
    assert_eq!(
        broken(&db, None),
        Break::Altered {
            at: "n/4".into(),
            message_id: "m-00003".into()
        }
    );
    db.client()
        .batch_execute(
            "UPDATE fsp_audit SET purpose = 'social-housing' WHERE seq = 4; \
             UPDATE fsp_audit SET \"timestamp\" = \"timestamp\" + interval '1 millisecond' WHERE seq = 6",
        )
        .unwrap();
    assert_eq!(
        broken(&db, None),
        Break::Altered {
            at: "n/6".into(),
            message_id: "m-00005".into()
        }
    );
}

#[test]
fn a_deleted_row_breaks_verification_at_the_next() {
    let Some(db) = db() else { return };
    written(&db, 8);
    db.client()
        .batch_execute("DELETE FROM fsp_audit WHERE seq = 4")
        .unwrap();
    assert_eq!(
        broken(&db, None),
        Break::Unlinked {
            at: "n/5".into(),
            message_id: "m-00004".into(),
            node: "n".into()
        }
    );
}

/// Rows removed from the end of a node's chain leave nothing to break the chain: the
/// node's head, which names its last record, does.
#[test]
fn rows_removed_from_the_end_or_all_of_them_break_verification() {
    let Some(db) = db() else { return };
    written(&db, 8);
    let mut c = db.client();
    let head: (i64, String) = c
        .query_one(
            "SELECT last_seq, message_id FROM fsp_audit_head WHERE node = 'n'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(head, (8, "m-00007".to_owned()));
    assert_eq!(db.trail().verify(None).unwrap().records, 8);
    c.batch_execute(
        "CREATE TABLE kept AS SELECT * FROM fsp_audit; DELETE FROM fsp_audit WHERE seq >= 7",
    )
    .unwrap();
    let cut = db.trail().verify(None);
    assert!(
        matches!(&cut, Err(e @ VerifyError::CutShort { .. }) if e.to_string().contains("record m-00007 of node n is missing")),
        "{cut:?}"
    );
    // A gateway does not write on over the cut (its next head would hide it).
    let refused = PostgresSink::start_with(db.settings("n"))
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("does not hold record m-00007 (seq 8) of node n"),
        "{refused}"
    );
    c.batch_execute("DELETE FROM fsp_audit").unwrap();
    assert!(matches!(
        db.trail().verify(None),
        Err(VerifyError::CutShort { .. })
    ));
    c.batch_execute("INSERT INTO fsp_audit SELECT * FROM kept")
        .unwrap();
    assert_eq!(db.trail().verify(None).unwrap().records, 8);
    // Whole again, it writes on; gone quiet, its head still follows within seconds.
    let (sink, handle) = db.start("n");
    sink.submit(record(8)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    sink.submit(record(9)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3000));
    let last: i64 = c
        .query_one("SELECT last_seq FROM fsp_audit_head WHERE node = 'n'", &[])
        .unwrap()
        .get(0);
    assert_eq!(last, 10);
    drop(sink);
    handle.join();
    assert_eq!(db.trail().verify(None).unwrap().records, 10);
}

#[test]
fn two_swapped_rows_break_verification() {
    let Some(db) = db() else { return };
    written(&db, 8);
    db.client()
        .batch_execute(
            "UPDATE fsp_audit SET seq = -3 WHERE seq = 3; \
             UPDATE fsp_audit SET seq = 3 WHERE seq = 6; \
             UPDATE fsp_audit SET seq = 6 WHERE seq = -3",
        )
        .unwrap();
    assert_eq!(
        broken(&db, None),
        Break::Unlinked {
            at: "n/3".into(),
            message_id: "m-00005".into(),
            node: "n".into()
        }
    );
}

#[test]
fn a_forged_row_breaks_verification_even_when_sealed() {
    let Some(db) = db() else { return };
    written(&db, 8);
    let mut c = db.client();
    // Room after seq 3, and a forgery sealed after it, as a forger would make it.
    c.batch_execute(
        "UPDATE fsp_audit SET seq = -(seq + 1) WHERE seq >= 4; \
         UPDATE fsp_audit SET seq = -seq WHERE seq < 0",
    )
    .unwrap();
    let h3: String = c
        .query_one("SELECT hash FROM fsp_audit WHERE seq = 3", &[])
        .unwrap()
        .get(0);
    let mut forged = record(99);
    Chain::after(Some(h3)).seal(&mut forged);
    insert_row(&mut c, &forged, 4, "now");
    assert_eq!(
        broken(&db, None),
        Break::Unlinked {
            at: "n/5".into(),
            message_id: "m-00003".into(),
            node: "n".into()
        }
    );
    // A forgery that does not even fit its own content.
    c.batch_execute(
        "DELETE FROM fsp_audit WHERE seq = 4; UPDATE fsp_audit SET seq = seq - 1 WHERE seq > 4",
    )
    .unwrap();
    assert_eq!(db.trail().verify(None).unwrap().records, 8);
    let mut garbage = record(98);
    garbage.prev_hash = Some(forged.prev_hash.clone().unwrap());
    garbage.hash = Some("0".repeat(64));
    insert_row(&mut c, &garbage, 9, "now");
    assert_eq!(
        broken(&db, None),
        Break::Altered {
            at: "n/9".into(),
            message_id: "m-00098".into()
        }
    );
}

/// With a signing key, a database administrator (who can write every table but does
/// not hold the key) cannot cut the chain short and move the head to its new end, nor
/// drop the head: the head's signature shows it. A writer with the key refuses a
/// database whose head is not signed until `seal` vouches for it.
#[test]
fn a_signed_head_cannot_be_moved_or_dropped_by_a_database_administrator() {
    let Some(db) = db() else { return };
    written(&db, 4);
    let (key, _) = SigningKey::generate().unwrap();
    let trusted = TrustedKeys::new([key.trusted()]);
    let sealed = |db: &Db| {
        PostgresSink::start_with(Settings {
            seals: Seals::new(
                SigningKey::from_pem(key.pkcs8_pem().as_bytes()).unwrap(),
                [],
            ),
            ..db.settings("n")
        })
    };
    let e = sealed(&db).unwrap_err().to_string();
    assert!(
        e.contains("is not signed") && e.contains("fsp audit seal"),
        "{e}"
    );
    let e = db.trail().verify_sealed(None, &trusted).unwrap_err();
    assert!(matches!(e, VerifyError::Unsealed { .. }), "{e}");
    db.trail().seal(None, &key, &trusted).unwrap();
    let (sink, handle) = sealed(&db).unwrap();
    for i in 4..8 {
        sink.submit(record(i)).unwrap();
    }
    drop(sink);
    handle.join();
    assert_eq!(db.trail().verify_sealed(None, &trusted).unwrap().records, 8);
    let mut c = db.client();
    // The last two rows removed, the head moved to the new end by hand.
    c.batch_execute(
        "DELETE FROM fsp_audit WHERE seq > 6; \
         UPDATE fsp_audit_head h SET last_seq = 6, message_id = a.message_id, \
         last_hash = a.hash FROM fsp_audit a WHERE a.seq = 6 AND h.node = 'n'",
    )
    .unwrap();
    // The chain alone cannot tell...
    assert_eq!(db.trail().verify(None).unwrap().records, 6);
    // ... the signature can, and a writer with the key does not write on.
    let e = db.trail().verify_sealed(None, &trusted).unwrap_err();
    assert!(e.to_string().contains("altered"), "{e}");
    let e = sealed(&db).unwrap_err().to_string();
    assert!(e.contains("altered"), "{e}");
    // Unsigned, or dropped: refused too.
    c.batch_execute("UPDATE fsp_audit_head SET key_id = NULL, signature = NULL")
        .unwrap();
    let e = db.trail().verify_sealed(None, &trusted).unwrap_err();
    assert!(e.to_string().contains("is not signed"), "{e}");
    c.batch_execute("DELETE FROM fsp_audit_head").unwrap();
    let e = db.trail().verify_sealed(None, &trusted).unwrap_err();
    assert!(e.to_string().contains("is missing"), "{e}");
    let e = sealed(&db).unwrap_err().to_string();
    assert!(e.contains("is missing"), "{e}");
}

#[test]
fn the_chain_goes_on_after_a_restart() {
    let Some(db) = db() else { return };
    written(&db, 3);
    let (sink, handle) = db.start("n");
    for i in 3..6 {
        sink.submit(record(i)).unwrap();
    }
    drop(sink);
    handle.join();
    assert_eq!(
        db.trail().verify(None).unwrap(),
        Verified {
            files: 1,
            records: 6
        }
    );
    assert_eq!(db.count("SELECT max(seq) FROM fsp_audit"), 6);
}

#[test]
fn retention_drops_old_partitions_and_verification_goes_on_from_the_anchors() {
    let Some(db) = db() else { return };
    written(&db, 0);
    // Rows written three years ago, by this node and by one that is gone.
    let year = time::OffsetDateTime::now_utc().year() - 3;
    let table = format!("fsp_audit_y{year}m01");
    let mut c = db.client();
    c.batch_execute(&format!(
        "CREATE TABLE {table} PARTITION OF fsp_audit \
         FOR VALUES FROM ('{year}-01-01 00:00:00+00') TO ('{year}-02-01 00:00:00+00')"
    ))
    .unwrap();
    let written_at = format!("{year}-01-15 12:00:00+00");
    let mut last = String::new();
    let mut gone_chain = Chain::default();
    for node in ["n", "gone"] {
        let mut chain = Chain::default();
        for i in 0..3 {
            let mut r = record(500 + i);
            r.node = node.into();
            chain.seal(&mut r);
            insert_row(&mut c, &r, i as i64 + 1, &written_at);
        }
        if node == "n" {
            last = chain.last().unwrap().to_owned();
        } else {
            gone_chain = chain;
        }
    }
    assert_eq!(db.trail().verify(None).unwrap().records, 6);
    // Signed: the rows put there by hand are vouched for, and the writer signs the
    // anchors it moves.
    let (key, _) = SigningKey::generate().unwrap();
    let trusted = TrustedKeys::new([key.trusted()]);
    let signed = db.trail().seal(None, &key, &trusted).unwrap();
    assert_eq!(signed.len(), 2, "{signed:?}");
    // The gone node's writer was killed a moment after its last head: one row follows
    // the head. Retention vouches for it as following the head.
    let mut after_head = record(503);
    after_head.node = "gone".into();
    gone_chain.seal(&mut after_head);
    insert_row(&mut c, &after_head, 4, &written_at);

    let (sink, handle) = PostgresSink::start_with(Settings {
        retention_days: Some(365),
        seals: Seals::new(
            SigningKey::from_pem(key.pkcs8_pem().as_bytes()).unwrap(),
            [],
        ),
        ..db.settings("n")
    })
    .unwrap();
    for i in 0..2 {
        sink.submit(record(i)).unwrap();
    }
    drop(sink);
    handle.join();

    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_class WHERE relname = '{table}' AND relnamespace = '{}'::regnamespace", db.schema
        )),
        0,
        "the old partition is dropped"
    );
    let anchor = c
        .query_one(
            "SELECT last_seq, last_hash FROM fsp_audit_anchor WHERE node = 'n'",
            &[],
        )
        .unwrap();
    assert_eq!(anchor.get::<_, i64>(0), 3);
    assert_eq!(anchor.get::<_, String>(1), last);
    assert_eq!(
        db.count("SELECT last_seq FROM fsp_audit_anchor WHERE node = 'gone'"),
        4
    );
    // The node's chain went on after the retired rows.
    assert_eq!(
        db.trail().verify(Some(365)).unwrap(),
        Verified {
            files: 1,
            records: 2
        }
    );
    assert_eq!(db.count("SELECT min(seq) FROM fsp_audit"), 4);
    assert_eq!(
        db.trail()
            .verify_sealed(Some(365), &trusted)
            .unwrap()
            .records,
        2
    );
    // An anchor moved by hand no longer fits its signature.
    c.batch_execute("UPDATE fsp_audit_anchor SET last_seq = 2 WHERE node = 'gone'")
        .unwrap();
    let e = db.trail().verify_sealed(Some(365), &trusted).unwrap_err();
    assert!(
        matches!(&e, VerifyError::Unsealed { what, why } if what.contains("fsp_audit_anchor of node gone") && why.contains("altered")),
        "{e}"
    );
    c.batch_execute("UPDATE fsp_audit_anchor SET last_seq = 4 WHERE node = 'gone'")
        .unwrap();
    // Retired younger than the retention period says: dropped before their time.
    assert!(matches!(
        db.trail().verify(Some(5000)),
        Err(VerifyError::RetiredEarly { days: 5000, .. })
    ));
    // A row removed after the anchor is a break.
    c.batch_execute("DELETE FROM fsp_audit WHERE seq = 4")
        .unwrap();
    assert!(matches!(
        broken(&db, Some(365)),
        Break::Unlinked { ref at, .. } if at == "n/5"
    ));
}

/// The pid of the node's writer backend.
fn writer_pid(db: &Db, node: &str) -> i32 {
    let start = Instant::now();
    loop {
        let rows = db
            .client()
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&format!("fsp-audit-writer-{node}")],
            )
            .unwrap();
        if rows.len() == 1 {
            return rows[0].get(0);
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{} writers",
            rows.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn terminate(db: &Db, pid: i32) {
    db.client()
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
}

fn healthy_within(sink: &PostgresSink, limit: Duration) {
    let start = Instant::now();
    while let Err(e) = sink.health() {
        assert!(start.elapsed() < limit, "still unhealthy: {e}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_cut_connection_is_survived_without_losing_or_doubling_a_record() {
    let Some(db) = db() else { return };
    let node = format!("cut-{}", db.schema);
    let (sink, handle) = db.start(&node);
    let rt = runtime();
    let durably = |i: usize| rt.block_on(sink.submit_durable(&record(i)).unwrap());
    for i in 0..5 {
        durably(i).unwrap();
    }
    let first = writer_pid(&db, &node);
    terminate(&db, first);
    // The next record either makes it after a reconnect or is refused, never lost.
    match durably(5) {
        Ok(()) => eprintln!("the record after the cut was committed after a reconnect"),
        Err(AuditError::Unavailable(why)) => {
            eprintln!("the record after the cut was refused: {why}");
            assert!(why.contains("audit database at postgres://"), "{why}");
        }
        Err(e) => panic!("{e}"),
    }
    healthy_within(&sink, Duration::from_secs(5));
    for i in 6..11 {
        durably(i).unwrap();
    }
    // Cut while idle: the writer notices by itself and connects again.
    let second = writer_pid(&db, &node);
    assert_ne!(first, second);
    terminate(&db, second);
    std::thread::sleep(Duration::from_millis(2500));
    healthy_within(&sink, Duration::from_secs(5));
    assert_ne!(writer_pid(&db, &node), second);
    durably(11).unwrap();
    // Every call counted once, whatever the reconnects.
    assert_eq!(sink.stats(&Query::default()).unwrap()[0].calls, 12);
    drop(sink);
    handle.join();
    assert_eq!(db.count("SELECT count(*) FROM fsp_audit"), 12);
    assert_eq!(
        db.count("SELECT count(DISTINCT message_id) FROM fsp_audit"),
        12
    );
    assert_eq!(db.trail().verify(None).unwrap().records, 12);
}

#[test]
fn gateways_starting_together_migrate_once_and_a_node_has_one_writer() {
    let Some(db) = db() else { return };
    let sinks: Vec<_> = std::thread::scope(|s| {
        let started: Vec<_> = ["a", "b", "c"]
            .map(|node| s.spawn(|| PostgresSink::start_with(db.settings(node))))
            .into_iter()
            .collect();
        started
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect()
    });
    // Each migration once (1: the trail, 2: its statistics roll-ups, 3: the
    // `certificate_sha256` extension, 4: the nodes' heads).
    assert_eq!(db.count("SELECT count(*) FROM fsp_schema_migrations"), 5);
    let twin = PostgresSink::start_with(db.settings("a"))
        .unwrap_err()
        .to_string();
    assert!(twin.contains("another gateway"), "{twin}");
    for (i, (sink, handle)) in sinks.into_iter().enumerate() {
        sink.submit(record(i)).unwrap();
        drop(sink);
        handle.join();
    }
    assert_eq!(
        db.trail().verify(None).unwrap(),
        Verified {
            files: 3,
            records: 3
        }
    );
}

#[test]
fn a_record_without_an_rfc3339_timestamp_is_refused_and_a_full_queue_refuses() {
    let Some(db) = db() else { return };
    let (sink, handle) = PostgresSink::start_with(Settings {
        capacity: 1,
        ..db.settings("n")
    })
    .unwrap();
    let mut bad = record(0);
    bad.timestamp = "24/11/2026 10:15".into();
    let err = sink.submit(bad).unwrap_err().to_string();
    assert!(err.contains("RFC 3339"), "{err}");
    assert!(sink.health().is_ok());
    let refused = (0..10_000)
        .map(|i| sink.submit(record(i)))
        .filter(|r| matches!(r, Err(AuditError::Backlog(1))))
        .count();
    assert!(refused > 0, "a queue of one must overflow under a burst");
    drop(sink);
    handle.join();
    assert!(db.trail().verify(None).unwrap().records > 0);
}

#[test]
fn an_unreachable_database_fails_at_start_without_showing_its_password() {
    let err = PostgresSink::start("postgres://fsp:s3cret@127.0.0.1:1/test", "n", 30)
        .unwrap_err()
        .to_string();
    assert!(err.contains("postgres://fsp@127.0.0.1:1/test"), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

fn today() -> Date {
    time::OffsetDateTime::now_utc().date()
}

/// A complete call of `consumer` to version `version` on `day`.
fn call(
    i: usize,
    day: Date,
    consumer: Option<&str>,
    version: &str,
    decision: &str,
    status: u16,
    ms: f64,
) -> Record {
    Record {
        message_id: format!("c-{i:05}"),
        timestamp: format!("{day}T10:00:00.000Z"),
        consumer: consumer.map(str::to_owned),
        version: Some(version.into()),
        decision: decision.into(),
        status,
        duration_ms: ms,
        ..record(i)
    }
}

fn query(from: Option<&str>, to: Option<&str>, by: &str) -> Query {
    Query::parse(from, to, Some(by)).unwrap()
}

/// The rows without their percentiles: the values grouped by, calls, errors.
fn figures(rows: &[Row]) -> Vec<(Vec<Option<String>>, u64, u64)> {
    rows.iter()
        .map(|r| {
            (
                r.by.iter().map(|(_, v)| v.clone()).collect(),
                r.calls,
                r.errors,
            )
        })
        .collect()
}

fn some(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|v| Some((*v).to_owned())).collect()
}

/// Writes `records` as `node` and stops the sink.
fn write_all(db: &Db, node: &str, records: &[Record]) {
    let (sink, handle) = db.start(node);
    for r in records {
        sink.submit(r.clone()).unwrap();
    }
    drop(sink);
    handle.join();
}

#[test]
fn statistics_count_calls_by_version_and_consumer_but_not_request_lines() {
    let Some(db) = db() else { return };
    let day = today();
    let ghent = Some("city-ghent");
    let leuven = Some("city-leuven");
    let mut request = call(7, day, leuven, "v2", "allowed", 0, 0.0);
    request.phase = Some(Phase::Request);
    let outcome = Record {
        phase: Some(Phase::Outcome),
        ..call(7, day, leuven, "v2", "allowed", 200, 31.0)
    };
    // A call cut by a crash: its request line alone is not a call.
    let cut = Record {
        phase: Some(Phase::Request),
        ..call(8, day, ghent, "v2", "allowed", 0, 0.0)
    };
    let unidentified = Record {
        consumer: None,
        service: None,
        version: None,
        ..call(9, day, None, "", "FSP-401-NO-CREDENTIAL", 401, 0.2)
    };
    let a = vec![
        call(1, day, ghent, "v1", "allowed", 200, 10.0),
        call(2, day, ghent, "v1", "allowed", 200, 11.0),
        call(3, day, ghent, "v1", "allowed", 404, 12.0),
        call(4, day, ghent, "v2", "allowed", 200, 20.0),
        call(5, day, ghent, "v2", "allowed", 503, 900.0),
        call(6, day, leuven, "v1", "FSP-403-PURPOSE", 403, 1.5),
        request,
        cut,
        outcome,
        unidentified,
    ];
    let b = vec![
        call(10, day, ghent, "v1", "allowed", 200, 10.5),
        call(11, day, ghent, "v1", "allowed", 0, 30_000.0),
    ];
    write_all(&db, "a", &a);
    let (sink, handle) = db.start("b");
    for r in &b {
        sink.submit(r.clone()).unwrap();
    }
    // Through the sink, as `GET /admin/stats` asks, once the calls are written.
    let q = query(None, None, "version,consumer");
    let start = Instant::now();
    let rows = loop {
        let rows = sink.stats(&q).unwrap();
        if rows.iter().map(|r| r.calls).sum::<u64>() == 10 {
            break rows;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{rows:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        figures(&rows),
        [
            (vec![None, None], 1, 1),
            (some(&["v1", "city-ghent"]), 5, 1),
            (some(&["v1", "city-leuven"]), 1, 1),
            (some(&["v2", "city-ghent"]), 2, 1),
            (some(&["v2", "city-leuven"]), 1, 0),
        ]
    );
    drop(sink);
    handle.join();
    // The same answer, percentiles too, as the calls counted in memory give.
    let all: Vec<Record> = a.into_iter().chain(b).collect();
    for by in [
        "version,consumer",
        "",
        "consumer,service,version,day,code,decision",
    ] {
        let q = query(None, None, by);
        assert_eq!(
            db.trail().stats(&q).unwrap(),
            Rollup::from_records(all.clone()).answer(&q),
            "--by {by}"
        );
    }
    // Operators see a missing consumer as ''; one row per node and cell.
    assert_eq!(
        db.count("SELECT sum(calls)::bigint FROM fsp_audit_daily WHERE consumer = ''"),
        1
    );
    assert_eq!(
        db.count("SELECT calls FROM fsp_audit_daily WHERE node = 'b' AND code = 0"),
        1
    );
    assert_eq!(
        db.count("SELECT sum(calls)::bigint FROM fsp_audit_monthly"),
        10
    );
    let latency: String = db
        .client()
        .query_one(
            "SELECT latency::text FROM fsp_audit_daily WHERE node = 'a' AND code = 404",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(latency, format!("[[{},1]]", stats::bucket_of(12.0)));
}

#[test]
fn a_restarted_sink_does_not_count_twice() {
    let Some(db) = db() else { return };
    let day = today();
    let calls = |range: std::ops::Range<usize>| -> Vec<Record> {
        range
            .map(|i| call(i, day, Some("city-ghent"), "v1", "allowed", 200, i as f64))
            .collect()
    };
    write_all(&db, "n", &calls(0..10));
    let total = |db: &Db| db.trail().stats(&Query::default()).unwrap();
    let before = total(&db);
    assert_eq!(before[0].calls, 10);
    // Started again: nothing new, nothing counted again.
    let (sink, handle) = db.start("n");
    assert_eq!(sink.stats(&Query::default()).unwrap(), before);
    drop(sink);
    handle.join();
    assert_eq!(total(&db), before);
    // New calls add to what the first run counted.
    write_all(&db, "n", &calls(10..15));
    assert_eq!(total(&db)[0].calls, 15);
    assert_eq!(db.count("SELECT calls FROM fsp_audit_daily"), 15, "one row");
    assert_eq!(db.count("SELECT calls FROM fsp_audit_monthly"), 15);
    assert_eq!(
        total(&db),
        Rollup::from_records(calls(0..15)).answer(&Query::default())
    );
}

#[test]
fn a_past_month_answers_from_its_month_rollup_and_by_day_from_its_days() {
    let Some(db) = db() else { return };
    let now = today();
    // The 10th and 11th of the month three months back: a finished month.
    let mut month = stats::month_of(now);
    for _ in 0..3 {
        month = stats::month_of(month.previous_day().unwrap());
    }
    let p1 = month.replace_day(10).unwrap();
    let p2 = month.replace_day(11).unwrap();
    let versions = ["v1", "v2"];
    let at = |i: usize, day: Date| {
        call(
            i,
            day,
            Some(["city-ghent", "city-leuven"][i % 2]),
            versions[i % 2],
            "allowed",
            [200, 503][i % 3 / 2],
            5.0 + i as f64,
        )
    };
    let first: Vec<Record> = (0..4)
        .map(|i| at(i, p1))
        .chain((4..6).map(|i| at(i, p2)))
        .chain([at(6, now)])
        .collect();
    write_all(&db, "n", &first);
    // Started again, late records for the past day (calls that lasted long): the writer
    // reads the day and month it does not hold, and adds to them.
    let second: Vec<Record> = (7..10).map(|i| at(i, p1)).chain([at(10, now)]).collect();
    write_all(&db, "n", &second);
    let all: Vec<Record> = first.iter().chain(&second).cloned().collect();

    let (p1_text, p2_text) = (p1.to_string(), p2.to_string());
    let by_day = query(Some(&p1_text), Some(&p2_text), "day");
    assert_eq!(
        figures(&db.trail().stats(&by_day).unwrap()),
        [
            (vec![Some(p1_text.clone())], 7, 2),
            (vec![Some(p2_text.clone())], 2, 1)
        ]
    );
    let month_text = month.to_string();
    assert_eq!(
        db.count(&format!(
            "SELECT sum(calls)::bigint FROM fsp_audit_monthly WHERE month = '{month_text}'"
        )),
        9
    );
    // Over the whole range, the month comes whole from its roll-up: the same answer as
    // the calls counted in memory.
    let by_consumer = query(None, None, "consumer,version");
    let want = Rollup::from_records(all.clone()).answer(&by_consumer);
    assert_eq!(db.trail().stats(&by_consumer).unwrap(), want);
    assert_eq!(want.iter().map(|r| r.calls).sum::<u64>(), 11);

    // Without its days, the month still answers whole; by day, or cut, it cannot.
    db.client()
        .execute(
            "DELETE FROM fsp_audit_daily WHERE day < $1",
            &[&now.replace_day(1).unwrap()],
        )
        .unwrap();
    assert_eq!(db.trail().stats(&by_consumer).unwrap(), want);
    assert!(db.trail().stats(&by_day).unwrap().is_empty());
    let cut = query(Some(&p2_text), None, "");
    assert_eq!(db.trail().stats(&cut).unwrap()[0].calls, 2, "today's only");
}

#[test]
fn the_trail_written_before_statistics_is_counted_by_the_migration() {
    let Some(db) = db() else { return };
    let now = today();
    let old = now - time::Duration::days(100);
    // Durations over the whole bucket range, with its edges and oddities.
    let mut durations = vec![
        f64::NAN,
        -1.0,
        0.0,
        0.001,
        0.01,
        0.0105,
        1.0,
        599_999.0,
        600_000.0,
        1e9,
    ];
    let mut x = 0.011;
    while x < 700_000.0 {
        durations.push(x);
        x *= 1.0371;
    }
    let mut records = Vec::new();
    for (i, ms) in durations.iter().enumerate() {
        let day = if i % 3 == 0 { old } else { now };
        let mut r = call(
            i,
            day,
            [Some("a"), Some(""), None][i % 3],
            ["v1", "v2"][i % 2],
            ["allowed", "FSP-429-RATE"][i % 5 / 4],
            [200, 500, 0, 404][i % 4],
            *ms,
        );
        r.phase = [None, Some(Phase::Outcome), Some(Phase::Request)][i % 7 % 3];
        records.push(r);
    }
    write_all(&db, "n", &records[..records.len() / 2]);
    write_all(&db, "m", &records[records.len() / 2..]);
    let snapshot = |db: &Db, table: &str| -> Vec<String> {
        db.client()
            .query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let (daily, monthly) = (
        snapshot(&db, "fsp_audit_daily"),
        snapshot(&db, "fsp_audit_monthly"),
    );
    assert!(daily.len() > 20 && monthly.len() > 10, "{daily:?}");
    let q = query(None, None, "consumer,version,code,decision");
    let answer = db.trail().stats(&q).unwrap();
    let mut counted: Vec<Record> = records.clone();
    for r in &mut counted {
        if r.consumer.as_deref() == Some("") {
            r.consumer = None;
        }
    }
    assert_eq!(answer, Rollup::from_records(counted).answer(&q));

    // A database from before statistics (which knows no later migration either; the
    // later ones find their work done): the reader says what to do.
    db.client()
        .batch_execute(
            "DROP TABLE fsp_audit_daily, fsp_audit_monthly; \
             DELETE FROM fsp_schema_migrations WHERE version >= 2",
        )
        .unwrap();
    let err = db.trail().stats(&q).unwrap_err();
    assert!(matches!(err, TrailError::Schema(_)), "{err:?}");
    assert!(err.to_string().contains("older gateway"), "{err}");
    // The next gateway to start counts the trail there: the very same rows.
    write_all(&db, "n", &[]);
    assert_eq!(snapshot(&db, "fsp_audit_daily"), daily);
    assert_eq!(snapshot(&db, "fsp_audit_monthly"), monthly);
    assert_eq!(db.trail().stats(&q).unwrap(), answer);
}

#[test]
fn a_statistics_row_that_is_not_a_cell_is_named_by_the_reader_and_replaced_by_the_writer() {
    let Some(db) = db() else { return };
    let day = today();
    let calls = |range: std::ops::Range<usize>| -> Vec<Record> {
        range
            .map(|i| call(i, day, Some("city-ghent"), "v1", "allowed", 200, 10.0))
            .collect()
    };
    write_all(&db, "n", &calls(0..3));
    db.client()
        .batch_execute("UPDATE fsp_audit_daily SET latency = '[[95,1]]'")
        .unwrap();
    let err = db
        .trail()
        .stats(&query(None, None, "consumer"))
        .unwrap_err();
    assert!(matches!(err, TrailError::Cell { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("fsp_audit_daily ({day}, consumer \"city-ghent\")"))
            && text.contains("add up to 1, not to the 3 calls"),
        "{text}"
    );
    // The writer does not stop on it: its next count of the day replaces the row.
    write_all(&db, "n", &calls(3..5));
    let rows = db.trail().stats(&query(None, None, "consumer")).unwrap();
    assert_eq!(figures(&rows), [(some(&["city-ghent"]), 2, 0)]);
    assert_eq!(db.count("SELECT count(*) FROM fsp_audit"), 5);
}

/// The acceptance figure: `fsp stats --by version,consumer` over 13 months of roll-ups of
/// a busy platform (50 consumers × 20 services × 3 versions × 5 codes: 15 000 cells a
/// day) answers in under a second: 12 finished months from their month rows and about 30
/// days from their day rows, some 630 000 rows. Not run by default:
/// `cargo test --release -p audit --test postgres -- --ignored --nocapture stats_over`.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture (and --release)"]
fn stats_over_13_months_answer_in_under_a_second_bench() {
    let Some(db) = db() else { return };
    written(&db, 0);
    let now = today();
    // A range of 13 months: 12 finished months whole, and 30 days (at its start and in
    // this month).
    let this_month = stats::month_of(now);
    let mut first_whole = this_month;
    for _ in 0..12 {
        first_whole = stats::month_of(first_whole.previous_day().unwrap());
    }
    let days_here = i64::from(now.day());
    let from = if days_here >= 30 {
        first_whole
    } else {
        first_whole - time::Duration::days(30 - days_here)
    };
    let q = Query {
        from: Some(from),
        to: None,
        by: vec![stats::Dim::Version, stats::Dim::Consumer],
    };
    let plan = stats::plan(&q, from, now);
    assert_eq!(plan.months.len(), 12);
    let mut c = db.client();
    let fill = |c: &mut postgres::Client, table: &str, at: &str, dates: &[Date], n: i64| {
        let started = Instant::now();
        c.execute(
            &format!(
                "INSERT INTO {table} ({at}, node, consumer, service, version, code, decision, \
                 calls, errors, latency) \
                 SELECT d, 'n', 'consumer-' || co, 'family/service-' || se, 'v' || ve, \
                        (ARRAY[200, 201, 404, 500, 503])[k], 'allowed', \
                        10 * $2::bigint, CASE WHEN k >= 4 THEN 10 * $2::bigint ELSE 0 END, \
                        format('[[%s,%s],[%s,%s],[%s,%s]]', 150 + (co + se) % 20, 7 * $2::bigint, \
                               180 + ve, 2 * $2::bigint, 200 + k, $2::bigint)::json \
                   FROM unnest($1::date[]) d, generate_series(1, 50) co, \
                        generate_series(1, 20) se, generate_series(1, 3) ve, \
                        generate_series(1, 5) k"
            ),
            &[&dates, &n],
        )
        .unwrap();
        eprintln!(
            "{table}: {} × 15 000 rows filled in {:.1?}",
            dates.len(),
            started.elapsed()
        );
    };
    fill(&mut c, "fsp_audit_monthly", "month", &plan.months, 30);
    fill(&mut c, "fsp_audit_daily", "day", &plan.days, 1);
    c.batch_execute("ANALYZE fsp_audit_daily; ANALYZE fsp_audit_monthly")
        .unwrap();
    let rows = (plan.months.len() + plan.days.len()) * 15_000;
    let mut trail = db.trail();
    let mut best = Duration::MAX;
    for run in 0..3 {
        let started = Instant::now();
        let answer = trail.stats(&q).unwrap();
        let took = started.elapsed();
        best = best.min(took);
        eprintln!(
            "run {run}: fsp stats --by version,consumer from {from}: {} rows of answer from {} \
             month and {} day roll-ups ({rows} rows) in {took:.3?}",
            answer.len(),
            plan.months.len(),
            plan.days.len(),
        );
        assert_eq!(answer.len(), 3 * 50);
        let calls: u64 = answer.iter().map(|r| r.calls).sum();
        assert_eq!(
            calls,
            (plan.months.len() as u64 * 300 + plan.days.len() as u64 * 10) * 15_000
        );
    }
    assert!(best < Duration::from_secs(1), "{best:?}");
}

/// Contract: an auditor's question about one message id among 10 million records is
/// answered in under a second (the message id index). Fills one month's partition with
/// 10 million records (about 5 GB with its indexes, a few minutes), then looks up the
/// first, the middle, the last and an absent id. Not run by default:
/// `cargo test --release -p audit --test postgres -- --ignored --nocapture lookup_among`.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture (and --release)"]
fn lookup_among_10_million_records_in_under_a_second_bench() {
    let Some(db) = db() else { return };
    written(&db, 0);
    let mut c = db.client();
    let started = Instant::now();
    for chunk in 0..10_i64 {
        c.execute(
            "INSERT INTO fsp_audit (message_id, \"timestamp\", consumer, credential, \
             credential_id, source_ip, service, version, operation, purpose, decision, \
             status, duration_ms, request_bytes, response_bytes, node, phase, prev_hash, \
             hash, seq, written_at) \
             SELECT 'm-' || i, now(), 'consumer-' || (i % 50), 'certificate', \
                    md5(i::text) || md5(i::text), '10.0.0.1', 'family/service-' || (i % 20), \
                    'v1', 'GET /bench', 'benchmark', 'allowed', 200, 1.5, 100, 1000, 'n', \
                    'outcome', md5((i - 1)::text) || md5((i - 1)::text), \
                    md5(i::text) || md5(i::text), i, now() \
               FROM generate_series($1::bigint, $2::bigint) i",
            &[&(chunk * 1_000_000 + 1), &((chunk + 1) * 1_000_000)],
        )
        .unwrap();
    }
    c.batch_execute("ANALYZE fsp_audit").unwrap();
    eprintln!("10 000 000 records written in {:.1?}", started.elapsed());
    assert_eq!(db.count("SELECT count(*) FROM fsp_audit"), 10_000_000);
    let mut trail = db.trail();
    let mut worst = Duration::ZERO;
    for id in ["m-1", "m-5000000", "m-10000000", "absent"] {
        let started = Instant::now();
        let found = trail.lookup(id).unwrap();
        let took = started.elapsed();
        worst = worst.max(took);
        eprintln!(
            "lookup {id}: {} in {took:.3?}",
            if found.is_some() { "found" } else { "absent" }
        );
        assert_eq!(
            found.map(|r| r.message_id),
            (id != "absent").then(|| id.to_owned())
        );
    }
    assert!(worst < Duration::from_secs(1), "{worst:?}");
}

fn sealed_sink(
    db: &Db,
    key: &SigningKey,
    retention_days: Option<u32>,
) -> Result<(PostgresSink, PostgresSinkHandle), AuditError> {
    PostgresSink::start_with(Settings {
        retention_days,
        seals: Seals::new(
            SigningKey::from_pem(key.pkcs8_pem().as_bytes()).unwrap(),
            [],
        ),
        ..db.settings("n")
    })
}

/// Found by an attacker's review: a DBA planted a row of the node in an old month's
/// partition (a `seq` and hash of his choosing) and altered copies of the node's records
/// chained after it, numbered after it. A gateway with the key took the highest `seq`
/// for the node's end, retired the planted partition and signed an anchor from it: the
/// originals could then be deleted and verify passed. Now a writer with the key does not
/// start when the rows after its signed head do not follow it, and retention does not
/// sign (or retire) a partition whose last rows its signed heads do not confirm.
#[test]
fn rows_planted_in_an_old_partition_are_neither_followed_nor_signed() {
    let Some(db) = db() else { return };
    written(&db, 0);
    let (key, _) = SigningKey::generate().unwrap();
    let trusted = TrustedKeys::new([key.trusted()]);
    let (sink, handle) = sealed_sink(&db, &key, Some(365)).unwrap();
    for i in 0..4 {
        sink.submit(record(i)).unwrap();
    }
    drop(sink);
    handle.join();
    let mut c = db.client();
    let year = time::OffsetDateTime::now_utc().year() - 3;
    let table = format!("fsp_audit_y{year}m01");
    c.batch_execute(&format!(
        "CREATE TABLE {table} PARTITION OF fsp_audit \
         FOR VALUES FROM ('{year}-01-01 00:00:00+00') TO ('{year}-02-01 00:00:00+00')"
    ))
    .unwrap();
    let mut planted = record(999);
    let mut chain = Chain::default();
    chain.seal(&mut planted);
    insert_row(
        &mut c,
        &planted,
        999_996,
        &format!("{year}-01-15 12:00:00+00"),
    );
    for i in 0..4 {
        let mut r = record(i);
        r.status = 500;
        chain.seal(&mut r);
        insert_row(&mut c, &r, 999_997 + i as i64, "now");
    }
    let e = sealed_sink(&db, &key, Some(365)).unwrap_err().to_string();
    assert!(e.contains("do not follow it"), "{e}");
    assert!(matches!(
        db.trail().verify_sealed(Some(365), &trusted),
        Err(VerifyError::Broken(_))
    ));

    // Retention alone (the altered copies gone, the planted row kept): the partition is
    // neither retired nor made into a signed anchor.
    c.batch_execute("DELETE FROM fsp_audit WHERE seq > 999996 AND seq < 1000001")
        .unwrap();
    let e = sealed_sink(&db, &key, Some(365)).unwrap_err().to_string();
    assert!(e.contains("do not follow it"), "{e}");
    // Even a writer that starts (the planted row's seq made to fit after the head) does
    // not sign it: it is not on the head's chain.
    c.batch_execute("UPDATE fsp_audit SET seq = 3 WHERE seq = 999996")
        .unwrap();
    let (sink, handle) = sealed_sink(&db, &key, Some(365)).unwrap();
    drop(sink);
    handle.join();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_class WHERE relname = '{table}' AND relnamespace = '{}'::regnamespace", db.schema
        )),
        1,
        "the planted partition is kept"
    );
    assert_eq!(db.count("SELECT count(*) FROM fsp_audit_anchor"), 0);
}

/// Found by an attacker's review: while the gateway ran, a DBA rewrote the node's chain
/// (one record altered, every later hash computed again) and cut the writer's
/// connection; the writer reconnected, took the database's end for its own and signed
/// heads over it. Now a writer with the key that finds its node's end elsewhere than it
/// left it writes and signs nothing more, and says why.
#[test]
fn a_writer_with_the_key_does_not_adopt_a_chain_rewritten_behind_it() {
    let Some(db) = db() else { return };
    written(&db, 0);
    let (key, _) = SigningKey::generate().unwrap();
    let trusted = TrustedKeys::new([key.trusted()]);
    let (sink, handle) = sealed_sink(&db, &key, None).unwrap();
    let rt = runtime();
    for i in 0..5 {
        rt.block_on(sink.submit_durable(&record(i)).unwrap())
            .unwrap();
    }
    // The head follows the last record within a second.
    let start = Instant::now();
    while db.count("SELECT coalesce(max(last_seq), 0) FROM fsp_audit_head") < 5 {
        assert!(start.elapsed() < Duration::from_secs(5), "no head");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = db.client();
    let mut chain = Chain::default();
    for i in 0..5 {
        let mut r = record(i);
        if i == 1 {
            r.status = 403;
        }
        chain.seal(&mut r);
        c.execute(
            "UPDATE fsp_audit SET status = $2, prev_hash = $3, hash = $4 \
             WHERE node = 'n' AND seq = $1",
            &[&(i as i64 + 1), &i32::from(r.status), &r.prev_hash, &r.hash],
        )
        .unwrap();
    }
    terminate(&db, writer_pid(&db, "n"));
    let start = Instant::now();
    let why = loop {
        if let Err(e) = sink.health() {
            let why = e.to_string();
            if why.contains("behind the gateway's back") {
                break why;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(15), "not noticed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(why.contains("fsp audit verify"), "{why}");
    // The sink stays unhealthy (a fail-closed gateway refuses calls); records still
    // given are kept, and no head is signed over the rewritten rows.
    let head = || db.count("SELECT last_seq FROM fsp_audit_head WHERE node = 'n'");
    let signed_at = head();
    sink.submit(record(5)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(sink.health().is_err());
    drop(sink);
    handle.join();
    assert_eq!(db.count("SELECT count(*) FROM fsp_audit"), 6);
    assert_eq!(
        head(),
        signed_at,
        "no head signed after the rows were rewritten"
    );
    assert!(db.trail().verify_sealed(None, &trusted).is_err());
}

/// `seal` does not sign over a head whose trusted signature no longer fits (tampering),
/// and says what each head and anchor was before.
#[test]
fn seal_refuses_a_head_whose_signature_was_broken() {
    let Some(db) = db() else { return };
    written(&db, 3);
    let (key, _) = SigningKey::generate().unwrap();
    let trusted = TrustedKeys::new([key.trusted()]);
    let signed = db.trail().seal(None, &key, &trusted).unwrap();
    assert!(signed[0].contains("was not signed"), "{signed:?}");
    let signed = db.trail().seal(None, &key, &trusted).unwrap();
    assert!(
        signed[0].contains("was signed by a trusted key"),
        "{signed:?}"
    );
    db.client()
        .batch_execute("UPDATE fsp_audit_head SET message_id = 'm-other'")
        .unwrap();
    let e = db.trail().seal(None, &key, &trusted).unwrap_err();
    assert!(e.to_string().contains("mark of tampering"), "{e}");
}
