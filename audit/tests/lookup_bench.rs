//! Benchmark (ignored by default; run by hand): one message id among 10 million records
//! in the file backend answers in under a second.
//!
//! ```sh
//! cargo test --release -p audit --test lookup_bench -- --ignored --nocapture
//! ```
//!
//! Writes a trail of `FSP_BENCH_RECORDS` records (default 10 000 000, about 7 GB) over
//! `FSP_BENCH_DAYS` days (default 30; 1 puts them all in one day, as a busy platform
//! would) into a temporary directory, in segments of the writer's size and names, makes
//! each segment's lookup index (the one the writer makes when it closes a segment;
//! `FSP_BENCH_INDEX=0`: none, to time the reads without), then times `file::find` for
//! ids from the first, middle and last day (and, over one day, its first and last
//! records), and one that is not there. The page cache is warm: the segments were just
//! written.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Instant;

use audit::Record;

fn uuid_v7(ms: u64, n: u64) -> String {
    let hex = format!("{ms:012x}7{:03x}8{:015x}", n & 0xfff, n);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[test]
#[ignore = "a benchmark: writes about 4 GB; run by hand"]
fn lookup_among_ten_million_records_bench() {
    let total: u64 = std::env::var("FSP_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let days: u64 = std::env::var("FSP_BENCH_DAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
        .max(1);
    let index = std::env::var("FSP_BENCH_INDEX").map_or(true, |v| v != "0");
    let dir = tempfile::tempdir().unwrap();
    let start_day = time::macros::date!(2026 - 10 - 01);
    let start_ms = (start_day.midnight().assume_utc().unix_timestamp() as u64) * 1000;
    let per_day = total / days;
    let mut wanted = Vec::new();
    let mut files = Vec::new();
    let begun = Instant::now();
    let mut line = Vec::with_capacity(1024);
    for d in 0..days {
        let day = start_day + time::Duration::days(d as i64);
        // Segments of the writer's size, named as it names them.
        let segment = |seq: u32| {
            dir.path().join(format!(
                "audit-bench-{:04}-{:02}-{:02}-{seq:06}.jsonl",
                day.year(),
                u8::from(day.month()),
                day.day()
            ))
        };
        let (mut seq, mut size) = (1u32, 0u64);
        files.push(segment(seq));
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(segment(seq)).unwrap(),
        );
        for i in 0..per_day {
            let n = d * per_day + i;
            let ms = start_ms + d * 86_400_000 + i * 86_400_000 / per_day;
            let r = Record {
                message_id: uuid_v7(ms, n),
                timestamp: "2026-10-01T00:00:00.000Z".into(),
                consumer: Some(format!("consumer-{}", n % 50)),
                credential: Some("certificate".into()),
                credential_id: Some("ab".repeat(32)),
                source_ip: "10.0.0.1".into(),
                service: Some("person/getPerson".into()),
                version: Some("v3".into()),
                operation: "GET /person/getPerson/v3/persons/85073100145".into(),
                purpose: Some("social-housing".into()),
                decision: "allowed".into(),
                status: 200,
                duration_ms: 12.5,
                node: "bench".into(),
                hash: Some("cd".repeat(32)),
                ..Default::default()
            };
            line.clear();
            r.write_json(&mut line);
            line.push(b'\n');
            if size + line.len() as u64 > audit::file::SEGMENT_BYTES {
                out.flush().unwrap();
                seq += 1;
                size = 0;
                files.push(segment(seq));
                out = std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(segment(seq)).unwrap(),
                );
            }
            size += line.len() as u64;
            out.write_all(&line).unwrap();
            if (i == per_day / 2 && (d == 0 || d == days / 2 || d == days - 1))
                || (days == 1 && (i == 0 || i == per_day - 1))
            {
                wanted.push(r.message_id.clone());
            }
        }
        out.flush().unwrap();
    }
    let bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "wrote {} records ({:.1} GB) over {days} days, {} segments of at most {} MiB, in {:.1?}",
        per_day * days,
        bytes as f64 / 1e9,
        files.len(),
        audit::file::SEGMENT_BYTES >> 20,
        begun.elapsed()
    );
    if index {
        let t = Instant::now();
        let mut lines = 0;
        for f in &files {
            lines += audit::file_index::build(f).unwrap();
        }
        println!("indexed {lines} lines in {:.1?}", t.elapsed());
    }
    let found_count = wanted.len();
    // Not there: an id of the middle day that was never written.
    wanted.push(uuid_v7(start_ms + days / 2 * 86_400_000 + 1, u64::MAX >> 4));
    for (i, id) in wanted.iter().enumerate() {
        let t = Instant::now();
        let found = audit::file::find(dir.path(), id).unwrap();
        let took = t.elapsed();
        assert_eq!(found.is_some(), i < found_count, "{id}");
        println!(
            "lookup {id}: {} in {took:.1?}",
            if found.is_some() { "found" } else { "absent" }
        );
        assert!(took.as_secs_f64() < 1.0, "lookup took {took:?}");
    }
}
