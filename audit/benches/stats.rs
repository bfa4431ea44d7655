//! Statistics roll-ups: the cost of counting one call on the request path, and of
//! answering `fsp stats --by version,consumer` over 13 months of a busy platform.
//!
//! `CARGO_TARGET_DIR=… cargo bench -p audit --bench stats` (set `FSP_STATS_BENCH_DAYS` to
//! build fewer days for a quick look).
//!
//! The 13 months: 396 days × 50 consumers × 20 services × 3 versions × 5 codes, every
//! combination called every day (5.94 million cells), each cell with a latency histogram
//! of a day's calls (the `200` cell: 24 recorded durations, the error cells: 3). Held in
//! memory as 396 daily roll-ups, and written as 396 daily files in a temporary directory,
//! with the 13 month roll-ups compacted from them; the query is measured reading the 396
//! day files, and reading what [`stats::plan`] names (13 month files and 1 day file).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use audit::Record;
use audit::stats::{self, Cell, CellKey, MonthRollup, Query, Rollup};
use criterion::{Criterion, criterion_group, criterion_main};

const DAYS: u32 = 396;
const CONSUMERS: usize = 50;
const SERVICES: usize = 20;
const VERSIONS: usize = 3;
/// The codes of each (consumer, service, version), with their decision.
const CODES: [(u16, &str); 5] = [
    (200, "allowed"),
    (404, "allowed"),
    (429, "FSP-THROTTLED"),
    (502, "allowed"),
    (503, "allowed"),
];

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A duration around `median` ms (log-normal-ish, spread ×/÷ 2.7).
    fn latency(&mut self, median: f64) -> f64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let v = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        median * (u + v - 1.0).mul_add(2.0, 0.0).exp()
    }
}

struct Names {
    consumers: Vec<String>,
    services: Vec<String>,
    versions: Vec<String>,
}

fn names() -> Names {
    Names {
        consumers: (0..CONSUMERS).map(|i| format!("consumer-{i:02}")).collect(),
        services: (0..SERVICES)
            .map(|i| format!("family-{}/service-{i:02}", i % 5))
            .collect(),
        versions: (1..=VERSIONS).map(|i| format!("v{i}")).collect(),
    }
}

/// One day of the platform: every (consumer, service, version, code).
fn day_rollup(day: time::Date, n: &Names, rng: &mut Rng) -> Rollup {
    let mut r = Rollup::new();
    for consumer in &n.consumers {
        for (s, service) in n.services.iter().enumerate() {
            let median = 5.0 + 10.0 * s as f64;
            for version in &n.versions {
                for &(code, decision) in &CODES {
                    let mut cell = Cell::default();
                    let error = stats::is_error(decision, code);
                    for _ in 0..if code == 200 { 24 } else { 3 } {
                        cell.record(error, rng.latency(median));
                    }
                    let key = CellKey {
                        day,
                        consumer: Some(consumer),
                        service: Some(service),
                        version: Some(version),
                        code,
                        decision,
                    };
                    r.insert(key, &cell);
                }
            }
        }
    }
    r
}

/// The process's CPU time so far (user + system), from `/proc/self/stat` (Linux).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at `) `.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // Clock ticks are 1/100 s on Linux.
    Some(Duration::from_millis(ticks * 10))
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) {
    let (cpu, wall) = (cpu_time(), Instant::now());
    black_box(f());
    let wall = wall.elapsed();
    match (cpu, cpu_time()) {
        (Some(a), Some(b)) => eprintln!("{what}: {wall:.1?} wall, {:.1?} CPU", b - a),
        _ => eprintln!("{what}: {wall:.1?} wall"),
    }
}

fn add(c: &mut Criterion) {
    let n = names();
    let mut rng = Rng(42);
    // 3 000 calls of distinct keys, cycled: every call finds its cell (steady state).
    let records: Vec<Record> = (0..CONSUMERS * SERVICES * VERSIONS)
        .map(|i| Record {
            message_id: format!("m{i}"),
            timestamp: "2026-11-24T10:15:30.123Z".into(),
            consumer: Some(n.consumers[i % CONSUMERS].clone()),
            service: Some(n.services[(i / CONSUMERS) % SERVICES].clone()),
            version: Some(n.versions[i % VERSIONS].clone()),
            decision: "allowed".into(),
            status: 200,
            duration_ms: rng.latency(20.0),
            ..Default::default()
        })
        .collect();
    let mut r = Rollup::new();
    for rec in &records {
        r.add(rec);
    }
    let mut i = 0usize;
    c.bench_function("stats/add (cell exists, 3 000 cells)", |b| {
        b.iter(|| {
            i = (i + 1) % records.len();
            black_box(r.add(black_box(&records[i])))
        })
    });
    let mut small = Rollup::new();
    small.add(&records[0]);
    c.bench_function("stats/add (cell exists, 1 cell)", |b| {
        b.iter(|| black_box(small.add(black_box(&records[0]))))
    });
}

fn thirteen_months(c: &mut Criterion) {
    let n = names();
    let mut rng = Rng(7);
    let first = time::macros::date!(2025 - 11 - 01);
    let started = Instant::now();
    // FSP_STATS_BENCH_DAYS: fewer days, for a quick look.
    let n_days = std::env::var("FSP_STATS_BENCH_DAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DAYS);
    let days: Vec<Rollup> = (0..n_days)
        .map(|d| day_rollup(first + time::Duration::days(i64::from(d)), &n, &mut rng))
        .collect();
    let cells: usize = days.iter().map(Rollup::len).sum();
    eprintln!(
        "built {} daily roll-ups, {cells} cells, in {:.1?}",
        days.len(),
        started.elapsed()
    );

    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let paths: Vec<PathBuf> = days
        .iter()
        .map(|r| {
            let p = dir.path().join(stats::day_file_name(r.days()[0]));
            stats::write_file(&p, r).unwrap();
            p
        })
        .collect();
    let bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    eprintln!(
        "wrote {} files, {:.1} MB ({:.0} bytes a cell), in {:.1?}",
        paths.len(),
        bytes as f64 / 1e6,
        bytes as f64 / cells as f64,
        started.elapsed()
    );

    // The month roll-ups the file backend compacts as each month ends.
    let started = Instant::now();
    let mut months: std::collections::BTreeMap<time::Date, MonthRollup> = Default::default();
    for r in &days {
        let day = r.days()[0];
        months
            .entry(stats::month_of(day))
            .or_insert_with(|| MonthRollup::new(day))
            .add_days(r);
    }
    for m in months.values() {
        m.write_file(&dir.path().join(stats::month_file_name(m.month())))
            .unwrap();
    }
    eprintln!(
        "compacted and wrote {} month roll-ups in {:.1?}",
        months.len(),
        started.elapsed()
    );

    let query = Query::parse(None, None, Some("version,consumer")).unwrap();
    let rows = stats::answer(&days, &query);
    assert_eq!(rows.len(), VERSIONS * CONSUMERS);
    assert_eq!(stats::answer_files(&paths, &query).unwrap(), rows);
    // What a backend reads for 13 months back from the last day: whole months from their
    // roll-ups, the current month's days from theirs.
    let today = days.last().unwrap().days()[0];
    let plan = stats::plan(&query, first, today);
    let planned: Vec<PathBuf> = plan
        .months
        .iter()
        .map(|m| dir.path().join(stats::month_file_name(*m)))
        .chain(
            plan.days
                .iter()
                .map(|d| dir.path().join(stats::day_file_name(*d))),
        )
        .collect();
    let planned_bytes: u64 = planned
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    eprintln!(
        "planned: {} month files + {} day files, {:.1} MB",
        plan.months.len(),
        plan.days.len(),
        planned_bytes as f64 / 1e6
    );
    assert_eq!(stats::answer_files(&planned, &query).unwrap(), rows);
    // One pass each, with the CPU time the process used: on a shared machine the wall
    // time also counts other processes.
    timed("one pass in memory", || stats::answer(&days, &query));
    timed("one pass read files + answer", || {
        stats::answer_files(&paths, &query).unwrap()
    });
    timed("one pass planned files + answer", || {
        stats::answer_files(&planned, &query).unwrap()
    });

    let mut g = c.benchmark_group("stats/13 months --by version,consumer");
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    g.bench_function("in memory (396 roll-ups)", |b| {
        b.iter(|| black_box(stats::answer(&days, &query)))
    });
    g.bench_function("read 396 files + answer", |b| {
        b.iter(|| black_box(stats::answer_files(&paths, &query).unwrap()))
    });
    g.bench_function("planned: month + day files + answer", |b| {
        b.iter(|| black_box(stats::answer_files(&planned, &query).unwrap()))
    });
    g.bench_function("read 1 file (one day)", |b| {
        b.iter(|| black_box(stats::read_file(&paths[0]).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, add, thirteen_months);
criterion_main!(benches);
