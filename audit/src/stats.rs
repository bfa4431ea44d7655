//! # Usage statistics: daily roll-ups of the audit trail
//!
//! `fsp stats` and `GET /admin/stats` answer "how many calls, how many errors, how fast"
//! for up to 13 months, grouped by any of consumer, service, version, day, code (and, as an
//! extension, decision). Scanning 13 months of records for that would take minutes, so the
//! trail keeps *roll-ups* as it is written: a [`Rollup`] is a set of **cells**, one per
//!
//! > (day, consumer, service, version, code, decision)
//!
//! seen, each holding the number of calls, the number of errors and a latency
//! [`Histogram`]. [`Rollup::add`] is called for every call on the request path (it does not
//! allocate once the call's cell exists); the file backend writes each day's roll-up with
//! [`write_file`] and a query reads the days it needs ([`answer_files`]) and merges them
//! ([`Tally`]) into [`Row`]s.
//!
//! A busy platform's day is some 15 000 cells (3 MB of JSON), so 13 months of days are
//! 6 million cells: seconds to read. As each month ends, its days are compacted into a
//! [`MonthRollup`] (one month's cells, about a day's size), and [`plan`] answers a long
//! range from whole months plus the days at its ends: 13 months in about 14 files. Months
//! cannot answer `--by day` (nor a range that cuts them), so those read the days.
//!
//! ## What is counted
//!
//! - A **call** is a complete record: a line with phase `outcome`, or a line without phase.
//!   A write-ahead `request` line is never counted (its outcome line is; a call whose
//!   outcome was never written, because the gateway died mid-call, is not counted).
//! - **day**: the UTC date of the record's `timestamp` (when the gateway received the call).
//! - **code**: the HTTP status returned to the consumer, as text (`"200"`, `"503"`); `"0"`
//!   when no status was sent (the connection was lost before an answer).
//! - **decision**: `allowed` or the FSP error code that refused the call.
//! - **errors**: the calls that were refused (decision not `allowed`), or that got no answer
//!   (status 0), or that got a server error (status ≥ 500). An allowed call answered with a
//!   4xx by its provider is not an error of the platform: it is the provider's answer.
//! - A consumer, service or version that is unknown (a refusal before identification or
//!   routing) is a missing value: `null` in JSON, empty in CSV, `-` in a table.
//!
//! ## Latency accuracy
//!
//! Durations go into log-spaced buckets: bucket 0 holds everything under 0.01 ms, bucket
//! *i* (1 ≤ *i* ≤ 368) holds [0.01·1.05^(*i*−1), 0.01·1.05^*i*) ms, each 5 % wider than
//! the one before, and bucket 369 holds 10 minutes and more. Histograms are kept sparse (a
//! sorted list of the buckets that hold something), so a cell costs a few dozen bytes, and
//! two histograms merge exactly (counts add). A percentile is the nearest-rank percentile
//! of the recorded durations, reported as its bucket's geometric middle: within 2.5 % of
//! the true value (√1.05 − 1), except below 0.01 ms (reported as 0.005) and from 10 minutes
//! on (reported as 600 000).
//!
//! ## Files
//!
//! One roll-up is one JSON document, one cell per line:
//!
//! ```json
//! {"format":"fsp-stats/1","cells":[
//! {"day":"2026-11-24","consumer":"ville-bxl","service":"person/getPerson","version":"v3","code":200,"decision":"allowed","calls":3,"errors":0,"latency":[[95,2],[97,1]]}
//! ]}
//! ```
//!
//! `latency` is the sparse histogram as `[bucket, count]` pairs in increasing bucket order;
//! the counts add up to `calls`. The format name fixes the bucket layout above. Readers are
//! strict: an unknown key, a bucket out of range or out of order, or counts that do not add
//! up is an error naming the file. [`write_file`] replaces a file atomically. A month's
//! roll-up is the same document with `"month":"YYYY-MM"` before `cells`, every cell on the
//! month's first day; [`read_file`] refuses it (only a [`Tally`] can use it).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The `credential` of the records of administrators' changes (see the proxy's admin API).
pub const ADMIN_CREDENTIAL: &str = "admin";

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime, UtcOffset};

use crate::Record;

// ---------------------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------------------

/// The lower edge of bucket 1, in milliseconds: everything below is bucket 0.
pub const MIN_MS: f64 = 0.01;
/// Where the overflow bucket starts, in milliseconds (10 minutes).
pub const MAX_MS: f64 = 600_000.0;
/// How much wider each bucket is than the one before.
pub const GROWTH: f64 = 1.05;
/// Buckets between [`MIN_MS`] and [`MAX_MS`]: ⌈ln(MAX/MIN) / ln(GROWTH)⌉ (a test holds it
/// to that).
const SPAN: u16 = 368;
/// The overflow bucket: [`MAX_MS`] and more.
pub const OVERFLOW: u16 = SPAN + 1;
/// The number of buckets, underflow and overflow included.
pub const BUCKETS: usize = OVERFLOW as usize + 1;

/// The bucket of a duration in milliseconds. Negative, NaN and sub-0.01 ms durations go
/// to bucket 0.
pub fn bucket_of(ms: f64) -> u16 {
    if ms.is_nan() || ms < MIN_MS {
        return 0;
    }
    if ms >= MAX_MS {
        return OVERFLOW;
    }
    // In range, the quotient is in [0, SPAN); the cast truncates towards zero (floor).
    let i = ((ms / MIN_MS).ln() / GROWTH.ln()) as u16;
    (i + 1).min(SPAN)
}

/// The value a bucket reports: its geometric middle (bucket 0: half of [`MIN_MS`];
/// overflow: [`MAX_MS`]).
pub fn bucket_value(bucket: u16) -> f64 {
    match bucket {
        0 => MIN_MS / 2.0,
        b if b >= OVERFLOW => MAX_MS,
        b => MIN_MS * GROWTH.powf(f64::from(b) - 0.5),
    }
}

/// A sparse latency histogram: the buckets that hold something, in increasing order, with
/// their counts. See the module documentation for the bucket layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<(u16, u64)>", into = "Vec<(u16, u64)>")]
pub struct Histogram {
    buckets: Vec<(u16, u64)>,
}

impl Histogram {
    /// Counts one duration.
    pub fn record(&mut self, ms: f64) {
        self.record_bucket(bucket_of(ms));
    }

    /// Counts one duration already put in its bucket. Allocates only when the bucket is new
    /// to this histogram (and the list is at its capacity).
    fn record_bucket(&mut self, bucket: u16) {
        match self.buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
            Ok(i) => {
                if let Some((_, c)) = self.buckets.get_mut(i) {
                    *c = c.saturating_add(1);
                }
            }
            Err(i) => {
                if self.buckets.capacity() == 0 {
                    self.buckets.reserve_exact(4);
                }
                self.buckets.insert(i, (bucket, 1));
            }
        }
    }

    /// The number of durations counted.
    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0u64, |n, &(_, c)| n.saturating_add(c))
    }

    /// The buckets that hold something, `(bucket, count)` in increasing bucket order.
    pub fn buckets(&self) -> &[(u16, u64)] {
        &self.buckets
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(&mut self, other: &Histogram) {
        self.merge_sorted(&other.buckets);
    }

    /// Adds counts given as a valid sparse list (increasing buckets).
    fn merge_sorted(&mut self, other: &[(u16, u64)]) {
        if other.is_empty() {
            return;
        }
        if self.buckets.is_empty() {
            self.buckets.extend_from_slice(other);
            return;
        }
        // Usually every bucket of `other` is already here: add in place, allocating nothing.
        // Binary searches, since `other` (a day's cell) is often far shorter than `self`.
        let mut missing = 0usize;
        let mut lo = 0usize;
        for &(b, _) in other {
            let rest = self.buckets.get(lo..).unwrap_or_default();
            match rest.binary_search_by_key(&b, |&(s, _)| s) {
                Ok(j) => lo += j + 1,
                Err(j) => {
                    lo += j;
                    missing += 1;
                }
            }
        }
        if missing == 0 {
            let mut lo = 0usize;
            for &(b, c) in other {
                let rest = self.buckets.get_mut(lo..).unwrap_or_default();
                if let Ok(j) = rest.binary_search_by_key(&b, |&(s, _)| s) {
                    if let Some((_, n)) = rest.get_mut(j) {
                        *n = n.saturating_add(c);
                    }
                    lo += j + 1;
                }
            }
            return;
        }
        let mut merged = Vec::with_capacity(self.buckets.len() + missing);
        let (mut a, mut b) = (self.buckets.iter().peekable(), other.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(&&(x, n)), Some(&&(y, m))) => {
                    if x < y {
                        merged.push((x, n));
                        a.next();
                    } else if y < x {
                        merged.push((y, m));
                        b.next();
                    } else {
                        merged.push((x, n.saturating_add(m)));
                        a.next();
                        b.next();
                    }
                }
                (Some(&&e), None) => {
                    merged.push(e);
                    a.next();
                }
                (None, Some(&&e)) => {
                    merged.push(e);
                    b.next();
                }
                (None, None) => break,
            }
        }
        self.buckets = merged;
    }

    /// The nearest-rank `p`-quantile (`p` in 0..=1) as its bucket's value, or `None` for
    /// an empty histogram.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        percentile_of(self.buckets.iter().copied(), p)
    }
}

/// Why a histogram or cell read from storage is refused.
fn check_buckets(buckets: &[(u16, u64)]) -> Result<u64, String> {
    let mut sum = 0u64;
    let mut prev: Option<u16> = None;
    for &(b, c) in buckets {
        if usize::from(b) >= BUCKETS {
            return Err(format!("latency bucket {b} is out of range (0..{BUCKETS})"));
        }
        if prev.is_some_and(|p| p >= b) {
            return Err(format!("latency bucket {b} is out of order"));
        }
        if c == 0 {
            return Err(format!("latency bucket {b} has a count of 0"));
        }
        sum = sum
            .checked_add(c)
            .ok_or_else(|| "latency counts overflow".to_owned())?;
        prev = Some(b);
    }
    Ok(sum)
}

impl TryFrom<Vec<(u16, u64)>> for Histogram {
    type Error = String;

    fn try_from(buckets: Vec<(u16, u64)>) -> Result<Self, String> {
        check_buckets(&buckets)?;
        Ok(Self { buckets })
    }
}

impl From<Histogram> for Vec<(u16, u64)> {
    fn from(h: Histogram) -> Self {
        h.buckets
    }
}

// ---------------------------------------------------------------------------------------
// Cells and their keys
// ---------------------------------------------------------------------------------------

/// The calls of one key: how many, how many were errors, and how long they took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CellParts", into = "CellParts")]
pub struct Cell {
    calls: u64,
    errors: u64,
    latency: Histogram,
}

/// A [`Cell`] as stored, before it is checked.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CellParts {
    calls: u64,
    errors: u64,
    latency: Vec<(u16, u64)>,
}

impl TryFrom<CellParts> for Cell {
    type Error = String;

    fn try_from(p: CellParts) -> Result<Self, String> {
        check_cell(p.calls, p.errors, &p.latency)?;
        Ok(Self {
            calls: p.calls,
            errors: p.errors,
            latency: Histogram { buckets: p.latency },
        })
    }
}

impl From<Cell> for CellParts {
    fn from(c: Cell) -> Self {
        Self {
            calls: c.calls,
            errors: c.errors,
            latency: c.latency.buckets,
        }
    }
}

fn check_cell(calls: u64, errors: u64, latency: &[(u16, u64)]) -> Result<(), String> {
    let sum = check_buckets(latency)?;
    if errors > calls {
        return Err(format!("{errors} errors in {calls} calls"));
    }
    if sum != calls {
        return Err(format!(
            "the latency counts add up to {sum}, not to the {calls} calls"
        ));
    }
    Ok(())
}

impl Cell {
    /// The number of calls.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// The number of calls that were errors (see the module documentation).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// The calls' durations.
    pub fn latency(&self) -> &Histogram {
        &self.latency
    }

    /// Counts one call.
    pub fn record(&mut self, error: bool, duration_ms: f64) {
        self.record_bucket(error, bucket_of(duration_ms));
    }

    fn record_bucket(&mut self, error: bool, bucket: u16) {
        self.calls = self.calls.saturating_add(1);
        self.errors = self.errors.saturating_add(u64::from(error));
        self.latency.record_bucket(bucket);
    }

    /// Adds another cell's calls to this one.
    pub fn merge(&mut self, other: &Cell) {
        self.merge_parts(other.calls, other.errors, &other.latency.buckets);
    }

    fn merge_parts(&mut self, calls: u64, errors: u64, latency: &[(u16, u64)]) {
        self.calls = self.calls.saturating_add(calls);
        self.errors = self.errors.saturating_add(errors);
        self.latency.merge_sorted(latency);
    }
}

/// Whether a call is an error: refused, unanswered (status 0) or a server error (≥ 500).
pub fn is_error(decision: &str, status: u16) -> bool {
    decision != "allowed" || status == 0 || status >= 500
}

/// The key of a cell, borrowed: from a record, a stored cell or a roll-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey<'a> {
    /// The UTC date of the calls.
    pub day: Date,
    pub consumer: Option<&'a str>,
    /// `family/service`.
    pub service: Option<&'a str>,
    pub version: Option<&'a str>,
    /// The HTTP status (0: none was sent).
    pub code: u16,
    /// `allowed` or the FSP error code.
    pub decision: &'a str,
}

impl<'a> CellKey<'a> {
    /// The key of a record's call, or `None` for a record that is not counted (a
    /// write-ahead request line, or a timestamp that is not RFC 3339).
    pub fn of(r: &'a Record) -> Option<Self> {
        if r.is_request_line() {
            return None;
        }
        Some(Self {
            day: utc_day(&r.timestamp)?,
            consumer: r.consumer.as_deref(),
            service: r.service.as_deref(),
            version: r.version.as_deref(),
            code: r.status,
            decision: &r.decision,
        })
    }

    /// The value of one dimension as text; `None` for a missing consumer, service or
    /// version.
    pub fn value(&self, dim: Dim) -> Option<Cow<'a, str>> {
        match dim {
            Dim::Consumer => self.consumer.map(Cow::Borrowed),
            Dim::Service => self.service.map(Cow::Borrowed),
            Dim::Version => self.version.map(Cow::Borrowed),
            Dim::Day => Some(Cow::Owned(format_day(self.day))),
            Dim::Code => Some(Cow::Owned(self.code.to_string())),
            Dim::Decision => Some(Cow::Borrowed(self.decision)),
        }
    }

    /// Compares two keys on one dimension.
    fn cmp_on(&self, other: &Self, dim: Dim) -> std::cmp::Ordering {
        match dim {
            Dim::Consumer => self.consumer.cmp(&other.consumer),
            Dim::Service => self.service.cmp(&other.service),
            Dim::Version => self.version.cmp(&other.version),
            Dim::Day => self.day.cmp(&other.day),
            Dim::Code => self.code.cmp(&other.code),
            Dim::Decision => self.decision.cmp(other.decision),
        }
    }
}

/// The UTC date of an RFC 3339 timestamp. The gateway's own form (`…Z`) is read without a
/// full parse, since this runs for every call.
fn utc_day(ts: &str) -> Option<Date> {
    let b = ts.as_bytes();
    if b.len() >= 20 && b.get(10) == Some(&b'T') && ts.ends_with('Z') {
        return day_of(b.get(..10)?);
    }
    OffsetDateTime::parse(ts, &Rfc3339)
        .ok()
        .map(|t| t.to_offset(UtcOffset::UTC).date())
}

/// `YYYY-MM-DD`.
fn format_day(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Parses a day, `YYYY-MM-DD` (as `--from` and `--to` take it).
pub fn parse_day(text: &str) -> Result<Date, StatsError> {
    day_of(text.as_bytes()).ok_or_else(|| StatsError::BadDay {
        text: text.to_owned(),
    })
}

/// `YYYY-MM-DD`, exactly.
fn day_of(b: &[u8]) -> Option<Date> {
    if b.len() != 10 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u16> {
        b.get(r)?.iter().try_fold(0u16, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u16::from(d - b'0'))
        })
    };
    let month = Month::try_from(u8::try_from(num(5..7)?).ok()?).ok()?;
    let day = u8::try_from(num(8..10)?).ok()?;
    Date::from_calendar_date(i32::from(num(0..4)?), month, day).ok()
}

/// An owned cell key; names are shared with the roll-up's other keys.
#[derive(Debug, Clone)]
struct Key {
    day: Date,
    consumer: Option<Arc<str>>,
    service: Option<Arc<str>>,
    version: Option<Arc<str>>,
    code: u16,
    decision: Arc<str>,
}

impl Key {
    fn view(&self) -> CellKey<'_> {
        CellKey {
            day: self.day,
            consumer: self.consumer.as_deref(),
            service: self.service.as_deref(),
            version: self.version.as_deref(),
            code: self.code,
            decision: &self.decision,
        }
    }
}

/// One copy of each name (consumer, service, version, decision) a table holds: a
/// roll-up of 15 000 cells a day has a hundred or so distinct names.
#[derive(Debug, Clone, Default)]
struct Names(HashSet<Arc<str>, foldhash::fast::RandomState>);

impl Names {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(Arc::clone(&a));
        a
    }

    fn key(&mut self, k: CellKey<'_>) -> Key {
        Key {
            day: k.day,
            consumer: k.consumer.map(|s| self.get(s)),
            service: k.service.map(|s| self.get(s)),
            version: k.version.map(|s| self.get(s)),
            code: k.code,
            decision: self.get(k.decision),
        }
    }
}

/// A `Hasher` for keys that are already hashes.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// "No next entry" in a hash chain.
const END: usize = usize::MAX;

/// Cells by key, found from a borrowed key without allocating: an index from the key's
/// 64-bit hash (randomly seeded, so that chosen names cannot aim at one chain) to the
/// first entry with that hash; entries with the same hash are chained. Entries stay in
/// insertion order.
#[derive(Debug, Clone, Default)]
struct Table<V> {
    hasher: foldhash::fast::RandomState,
    index: HashMap<u64, usize, BuildHasherDefault<Prehashed>>,
    entries: Vec<Entry<V>>,
    names: Names,
}

#[derive(Debug, Clone)]
struct Entry<V> {
    next: usize,
    key: Key,
    value: V,
}

/// Where a key is in a table, or where it would be chained.
enum Place {
    Found(usize),
    /// Not there; the last entry of its hash chain, if any.
    Absent(Option<usize>),
}

impl<V: Default> Table<V> {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn clear(&mut self) {
        self.index.clear();
        self.entries.clear();
        // Names go too: kept across days, made-up names would pile up.
        self.names.0.clear();
    }

    fn find(&self, hash: u64, key: &CellKey<'_>) -> Place {
        let mut at = self.index.get(&hash).copied().unwrap_or(END);
        let mut last = None;
        while let Some(e) = self.entries.get(at) {
            if e.key.view() == *key {
                return Place::Found(at);
            }
            last = Some(at);
            at = e.next;
        }
        Place::Absent(last)
    }

    fn insert_at(&mut self, hash: u64, key: CellKey<'_>, last: Option<usize>) -> usize {
        let at = self.entries.len();
        let key = self.names.key(key);
        self.entries.push(Entry {
            next: END,
            key,
            value: V::default(),
        });
        match last.and_then(|l| self.entries.get_mut(l)) {
            Some(prev) => prev.next = at,
            None => {
                self.index.insert(hash, at);
            }
        }
        at
    }

    /// The place of a key's entry, made (empty) if it is new.
    fn index_of(&mut self, key: CellKey<'_>) -> usize {
        let hash = self.hasher.hash_one(key);
        match self.find(hash, &key) {
            Place::Found(at) => at,
            Place::Absent(last) => self.insert_at(hash, key, last),
        }
    }

    /// The entry of a key, made (empty) if it is new; `None` if it is new and the table
    /// already holds `limit` entries.
    fn entry(&mut self, key: CellKey<'_>, limit: usize) -> Option<&mut V> {
        let hash = self.hasher.hash_one(key);
        let at = match self.find(hash, &key) {
            Place::Found(at) => at,
            Place::Absent(_) if self.entries.len() >= limit => return None,
            Place::Absent(last) => self.insert_at(hash, key, last),
        };
        self.entries.get_mut(at).map(|e| &mut e.value)
    }

    fn iter(&self) -> impl Iterator<Item = (CellKey<'_>, &V)> {
        self.entries.iter().map(|e| (e.key.view(), &e.value))
    }
}

// ---------------------------------------------------------------------------------------
// Roll-ups
// ---------------------------------------------------------------------------------------

/// The service and version under which a full roll-up counts calls of new keys (see
/// [`Rollup::with_cell_limit`]).
pub const OTHER: &str = "(other)";

/// The statistics of many calls: one [`Cell`] per (day, consumer, service, version, code,
/// decision). See the module documentation.
#[derive(Debug, Clone)]
pub struct Rollup {
    cells: Table<Cell>,
    limit: usize,
}

impl Default for Rollup {
    fn default() -> Self {
        Self::with_cell_limit(Self::DEFAULT_CELL_LIMIT)
    }
}

impl PartialEq for Rollup {
    /// The same cells, whatever their order.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.cells.iter().all(|(k, c)| other.get(k) == Some(c))
    }
}

impl Rollup {
    /// How many cells [`Rollup::add`] makes before it folds new keys together: far above
    /// a real platform's day (50 consumers × 20 services × 3 versions × 5 codes is 15 000),
    /// low enough that calls naming made-up services cannot exhaust memory.
    pub const DEFAULT_CELL_LIMIT: usize = 1 << 20;

    /// An empty roll-up.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty roll-up whose [`Rollup::add`] makes at most `limit` cells: past it, a call
    /// of a new key is counted with its service and version replaced by [`OTHER`] (that one
    /// cell per day, consumer, code and decision may go past the limit). Merges are not
    /// limited.
    pub fn with_cell_limit(limit: usize) -> Self {
        Self {
            cells: Table::default(),
            limit,
        }
    }

    /// The roll-up of a trail's records (request lines are skipped).
    pub fn from_records(records: impl IntoIterator<Item = Record>) -> Self {
        let mut r = Self::new();
        for record in records {
            r.add(&record);
        }
        r
    }

    /// Counts one record's call. Returns whether it was counted: a write-ahead request
    /// line is not (its outcome line is), nor is a record whose timestamp is not RFC 3339.
    ///
    /// On the request path: when the call's cell exists, this allocates nothing (unless the
    /// call's duration falls in a bucket its cell has never seen).
    pub fn add(&mut self, r: &Record) -> bool {
        // An administrator's change is in the trail, but it is not a call: usage
        // statistics leave it out.
        if r.credential.as_deref() == Some(ADMIN_CREDENTIAL) {
            return false;
        }
        let Some(key) = CellKey::of(r) else {
            return false;
        };
        let error = is_error(&r.decision, r.status);
        let bucket = bucket_of(r.duration_ms);
        let cell = match self.cells.entry(key, self.limit) {
            Some(cell) => cell,
            None => {
                let other = CellKey {
                    service: Some(OTHER),
                    version: Some(OTHER),
                    ..key
                };
                match self.cells.entry(other, usize::MAX) {
                    Some(cell) => cell,
                    None => return false,
                }
            }
        };
        cell.record_bucket(error, bucket);
        true
    }

    /// Adds a cell's calls under a key (from a backend that stores cells one by one).
    pub fn insert(&mut self, key: CellKey<'_>, cell: &Cell) {
        if let Some(c) = self.cells.entry(key, usize::MAX) {
            c.merge(cell);
        }
    }

    /// Adds another roll-up's calls to this one.
    pub fn merge(&mut self, other: &Rollup) {
        for (k, c) in other.cells.iter() {
            self.insert(k, c);
        }
    }

    /// The cell of a key, if it has calls.
    pub fn get(&self, key: CellKey<'_>) -> Option<&Cell> {
        let hash = self.cells.hasher.hash_one(key);
        match self.cells.find(hash, &key) {
            Place::Found(at) => self.cells.entries.get(at).map(|e| &e.value),
            Place::Absent(_) => None,
        }
    }

    /// The number of cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether no call was counted.
    pub fn is_empty(&self) -> bool {
        self.cells.len() == 0
    }

    /// Forgets every cell, keeping the table's memory for the next ones.
    pub fn clear(&mut self) {
        self.cells.clear();
    }

    /// The cells so far, leaving this roll-up empty (with the same cell limit).
    pub fn take(&mut self) -> Rollup {
        std::mem::replace(self, Self::with_cell_limit(self.limit))
    }

    /// The cells, in the order they were first seen.
    pub fn cells(&self) -> impl Iterator<Item = (CellKey<'_>, &Cell)> {
        self.cells.iter()
    }

    /// The cells sorted by key (day, consumer, service, version, code, decision).
    fn sorted(&self) -> Vec<(CellKey<'_>, &Cell)> {
        let mut cells: Vec<_> = self.cells.iter().collect();
        cells.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        cells
    }

    /// The days that have calls, in order.
    pub fn days(&self) -> Vec<Date> {
        let mut days: Vec<Date> = self.cells.iter().map(|(k, _)| k.day).collect();
        days.sort_unstable();
        days.dedup();
        days
    }

    /// This roll-up cut into one roll-up per day (a roll-up kept across midnight holds
    /// two days; the file backend keeps one roll-up file per day).
    pub fn split_by_day(&self) -> BTreeMap<Date, Rollup> {
        let mut days: BTreeMap<Date, Rollup> = BTreeMap::new();
        for (k, c) in self.cells.iter() {
            days.entry(k.day).or_default().insert(k, c);
        }
        days
    }

    /// The answer to a query over this roll-up alone.
    pub fn answer(&self, query: &Query) -> Vec<Row> {
        let mut t = Tally::new(query);
        t.add_rollup(self);
        t.rows()
    }

    /// The roll-up as its JSON document (see the module documentation), one cell per line,
    /// cells sorted by key.
    pub fn to_json(&self) -> Vec<u8> {
        document_json(self, None)
    }

    /// Reads a roll-up's JSON document (strict: see the module documentation).
    pub fn from_json(bytes: &[u8]) -> Result<Rollup, String> {
        let mut r = Rollup::new();
        read_document(
            bytes,
            &mut |key: CellKey<'_>, calls, errors, latency: &[(u16, u64)]| {
                if let Some(c) = r.cells.entry(key, usize::MAX) {
                    c.merge_parts(calls, errors, latency);
                }
            },
        )?;
        Ok(r)
    }
}

/// A roll-up's JSON document; a month's roll-up says which month it is.
fn document_json(r: &Rollup, month: Option<Date>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + r.len() * 192);
    out.extend_from_slice(b"{\"format\":");
    json_str(&mut out, FORMAT);
    if let Some(m) = month {
        out.extend_from_slice(b",\"month\":\"");
        out.extend_from_slice(format_day(m).get(..7).unwrap_or_default().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"cells\":[");
    for (i, (k, c)) in r.sorted().into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"\n{\"day\":\"");
        out.extend_from_slice(format_day(k.day).as_bytes());
        out.extend_from_slice(b"\",\"consumer\":");
        json_opt_str(&mut out, k.consumer);
        out.extend_from_slice(b",\"service\":");
        json_opt_str(&mut out, k.service);
        out.extend_from_slice(b",\"version\":");
        json_opt_str(&mut out, k.version);
        out.extend_from_slice(b",\"code\":");
        json_u64(&mut out, u64::from(k.code));
        out.extend_from_slice(b",\"decision\":");
        json_str(&mut out, k.decision);
        out.extend_from_slice(b",\"calls\":");
        json_u64(&mut out, c.calls);
        out.extend_from_slice(b",\"errors\":");
        json_u64(&mut out, c.errors);
        out.extend_from_slice(b",\"latency\":[");
        for (j, &(b, n)) in c.latency.buckets.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.push(b'[');
            json_u64(&mut out, u64::from(b));
            out.push(b',');
            json_u64(&mut out, n);
            out.push(b']');
        }
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(b"\n]}\n");
    out
}

// ---------------------------------------------------------------------------------------
// Serde: the stored form of cells and roll-ups
// ---------------------------------------------------------------------------------------

/// The name of the file format (and of its bucket layout).
pub const FORMAT: &str = "fsp-stats/1";

/// One cell as stored: its key and its counts, for a backend that keeps cells one by one
/// (serialises as one object of the file format's `cells` list). Deserialising borrows
/// names from the input where it can; [`StoredCell::check`] tells whether it is valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCell<'a> {
    #[serde(serialize_with = "ser_day", deserialize_with = "de_day")]
    pub day: Date,
    #[serde(borrow, deserialize_with = "de_opt_text")]
    pub consumer: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "de_opt_text")]
    pub service: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "de_opt_text")]
    pub version: Option<Cow<'a, str>>,
    pub code: u16,
    #[serde(borrow, deserialize_with = "de_text")]
    pub decision: Cow<'a, str>,
    pub calls: u64,
    pub errors: u64,
    /// The sparse histogram, `[bucket, count]` in increasing bucket order.
    pub latency: Cow<'a, [(u16, u64)]>,
}

impl<'a> StoredCell<'a> {
    /// A roll-up's cell in its stored form (borrowing from the roll-up).
    pub fn new(key: CellKey<'a>, cell: &'a Cell) -> Self {
        Self {
            day: key.day,
            consumer: key.consumer.map(Cow::Borrowed),
            service: key.service.map(Cow::Borrowed),
            version: key.version.map(Cow::Borrowed),
            code: key.code,
            decision: Cow::Borrowed(key.decision),
            calls: cell.calls,
            errors: cell.errors,
            latency: Cow::Borrowed(&cell.latency.buckets),
        }
    }

    /// The cell's key.
    pub fn key(&self) -> CellKey<'_> {
        CellKey {
            day: self.day,
            consumer: self.consumer.as_deref(),
            service: self.service.as_deref(),
            version: self.version.as_deref(),
            code: self.code,
            decision: &self.decision,
        }
    }

    /// Whether the counts are consistent: buckets in range and increasing, no empty
    /// bucket, `errors` ≤ `calls`, the bucket counts adding up to `calls`.
    pub fn check(&self) -> Result<(), String> {
        check_cell(self.calls, self.errors, &self.latency)
    }

    /// The checked cell.
    pub fn cell(&self) -> Result<Cell, String> {
        self.check()?;
        Ok(Cell {
            calls: self.calls,
            errors: self.errors,
            latency: Histogram {
                buckets: self.latency.to_vec(),
            },
        })
    }
}

fn ser_day<S: Serializer>(day: &Date, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_day(*day))
}

fn de_day<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
    let text = de_text(d)?;
    parse_day(&text).map_err(de::Error::custom)
}

/// A string, borrowed from the input when it holds no escape.
struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

fn de_text<'de, 'a, D: Deserializer<'de>>(d: D) -> Result<Cow<'a, str>, D::Error>
where
    'de: 'a,
{
    d.deserialize_str(TextVisitor)
}

struct OptTextVisitor;

impl<'de> Visitor<'de> for OptTextVisitor {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(TextVisitor).map(Some)
    }
}

fn de_opt_text<'de, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error>
where
    'de: 'a,
{
    d.deserialize_option(OptTextVisitor)
}

/// What a parsed, checked cell is handed to: key, calls, errors, latency buckets.
trait CellSink {
    fn cell(&mut self, key: CellKey<'_>, calls: u64, errors: u64, latency: &[(u16, u64)]);

    /// The document is the roll-up of a whole month (told before its cells). Only an
    /// answer can take one: as a day's roll-up, its calls would all fall on the 1st.
    fn month(&mut self, month: Date) -> Result<(), String> {
        Err(format!(
            "the roll-up of the month {}, not of a day: it can only answer a query",
            format_month(month)
        ))
    }
}

impl<F: FnMut(CellKey<'_>, u64, u64, &[(u16, u64)])> CellSink for F {
    fn cell(&mut self, key: CellKey<'_>, calls: u64, errors: u64, latency: &[(u16, u64)]) {
        self(key, calls, errors, latency);
    }
}

/// The document `{"format": …, "cells": […]}`, fed to a sink.
struct DocumentSeed<'s, S> {
    sink: &'s mut S,
}

impl<'de, S: CellSink> DeserializeSeed<'de> for DocumentSeed<'_, S> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S: CellSink> Visitor<'de> for DocumentSeed<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a statistics roll-up {\"format\": …, \"cells\": […]}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        const FIELDS: &[&str] = &["format", "cells"];
        let (mut format, mut cells) = (false, false);
        while let Some(field) = map.next_key_seed(TextSeed)? {
            match &*field {
                "format" if !format => {
                    let f = map.next_value_seed(TextSeed)?;
                    if f != FORMAT {
                        return Err(de::Error::custom(format!("format {f:?} is not {FORMAT:?}")));
                    }
                    format = true;
                }
                "cells" if !cells => {
                    map.next_value_seed(CellsSeed {
                        sink: &mut *self.sink,
                    })?;
                    cells = true;
                }
                "format" | "cells" => return Err(de::Error::duplicate_field("format or cells")),
                other => return Err(de::Error::unknown_field(other, FIELDS)),
            }
        }
        if !format {
            return Err(de::Error::missing_field("format"));
        }
        if !cells {
            return Err(de::Error::missing_field("cells"));
        }
        Ok(())
    }
}

struct TextSeed;

impl<'de> DeserializeSeed<'de> for TextSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(TextVisitor)
    }
}

struct CellsSeed<'s, S> {
    sink: &'s mut S,
}

impl<'de, S: CellSink> DeserializeSeed<'de> for CellsSeed<'_, S> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, S: CellSink> Visitor<'de> for CellsSeed<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of cells")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut n = 0usize;
        while let Some(cell) = seq.next_element::<StoredCell<'de>>()? {
            n += 1;
            cell.check()
                .map_err(|e| de::Error::custom(format!("cell {n}: {e}")))?;
            self.sink
                .cell(cell.key(), cell.calls, cell.errors, &cell.latency);
        }
        Ok(())
    }
}

impl Serialize for Rollup {
    /// The file format's document (cells sorted by key).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Cells<'r>(&'r Rollup);
        impl Serialize for Cells<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let cells = self.0.sorted();
                let mut seq = s.serialize_seq(Some(cells.len()))?;
                for (k, c) in cells {
                    seq.serialize_element(&StoredCell::new(k, c))?;
                }
                seq.end()
            }
        }
        let mut st = s.serialize_struct("Rollup", 2)?;
        st.serialize_field("format", FORMAT)?;
        st.serialize_field("cells", &Cells(self))?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for Rollup {
    /// The file format's document, checked as strictly as [`read_file`] does.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut r = Rollup::new();
        let mut sink = |key: CellKey<'_>, calls, errors, latency: &[(u16, u64)]| {
            if let Some(c) = r.cells.entry(key, usize::MAX) {
                c.merge_parts(calls, errors, latency);
            }
        };
        DocumentSeed { sink: &mut sink }.deserialize(d)?;
        Ok(r)
    }
}

fn json_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(d) = buf.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    out.extend_from_slice(buf.get(i..).unwrap_or_default());
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if u32::from(c) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let v = u32::from(c) as usize;
                out.extend_from_slice(b"\\u00");
                out.push(HEX[v >> 4]);
                out.push(HEX[v & 0xf]);
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

// ---------------------------------------------------------------------------------------
// The file reader
// ---------------------------------------------------------------------------------------

/// Reads a roll-up document (the file format), handing each checked cell to `sink` as it
/// is read: no list of the document's cells is built, names are borrowed from `bytes`
/// and one latency list is reused, so that 13 months of files read fast.
///
/// Hand-written rather than through serde, for speed; it accepts what a JSON parser
/// accepts for this schema (any whitespace, any key order, escapes) and refuses the rest
/// as the serde path does ([`Rollup`]'s `Deserialize`; a test holds them together). On an
/// error, `sink` may have had some cells.
fn read_document(bytes: &[u8], sink: &mut impl CellSink) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut r = Reader {
        text,
        at: 0,
        latency: Vec::with_capacity(64),
    };
    r.document(sink).map_err(|e| {
        let before = text.as_bytes().get(..r.at).unwrap_or_default();
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        format!("{e} at line {line} column {column}")
    })
}

/// A latency pair written plainly at the start of `b`: `[bucket,count]`, no whitespace,
/// no leading zero, the bucket a `u16`. `None` for anything else (which the general path
/// then reads, or refuses); otherwise the pair and its length in bytes.
fn plain_pair(b: &[u8]) -> Option<((u16, u64), usize)> {
    /// Digits from `at` up to `stop`: the number and where `stop` is.
    fn digits(b: &[u8], mut at: usize, stop: u8) -> Option<(u64, usize)> {
        let start = at;
        let mut v = 0u64;
        while let Some(&c) = b.get(at) {
            if c == stop {
                let n = at - start;
                let plain = n > 0 && (n == 1 || b.get(start) != Some(&b'0'));
                return plain.then_some((v, at));
            }
            if !c.is_ascii_digit() {
                return None;
            }
            v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            at += 1;
        }
        None
    }
    if b.first() != Some(&b'[') {
        return None;
    }
    let (bucket, comma) = digits(b, 1, b',')?;
    let (count, close) = digits(b, comma + 1, b']')?;
    Some(((u16::try_from(bucket).ok()?, count), close + 1))
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
    latency: Vec<(u16, u64)>,
}

/// Sets a field read from an object, once.
fn once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("duplicate field `{name}`"));
    }
    *slot = Some(value);
    Ok(())
}

impl<'a> Reader<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// The next byte after whitespace.
    fn peek(&mut self) -> Option<u8> {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes().get(self.at) {
            self.at += 1;
        }
        self.bytes().get(self.at).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected `{}`", char::from(c)))
        }
    }

    /// Opens a list or object; `false` if it is empty (and then closed).
    fn open(&mut self, open: u8, close: u8) -> Result<bool, String> {
        self.expect(open)?;
        if self.peek() == Some(close) {
            self.at += 1;
            return Ok(false);
        }
        Ok(true)
    }

    /// After an element: `true` if another follows, `false` at the end of the container.
    fn more(&mut self, close: u8) -> Result<bool, String> {
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                Ok(true)
            }
            Some(c) if c == close => {
                self.at += 1;
                Ok(false)
            }
            _ => Err(format!("expected `,` or `{}`", char::from(close))),
        }
    }

    /// A run of plain characters from here to the next quote or backslash.
    fn run(&mut self) -> Result<&'a str, String> {
        let rest = self.bytes().get(self.at..).unwrap_or_default();
        // Names are short: a plain loop beats a vectorised search's setup; long texts get
        // the vectorised one.
        let head = rest.get(..32).unwrap_or(rest);
        let n = match head
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        {
            Some(n) => n,
            None => {
                let n = memchr::memchr2(b'"', b'\\', rest).ok_or("unterminated string")?;
                if rest.get(..n).is_some_and(|r| r.iter().any(|&c| c < 0x20)) {
                    return Err("control character in a string".into());
                }
                n
            }
        };
        if rest.get(n).is_some_and(|&c| c < 0x20) {
            return Err("control character in a string".into());
        }
        // Quotes and backslashes are ASCII: the run ends on a character boundary.
        let run = self
            .text
            .get(self.at..self.at + n)
            .ok_or("unterminated string")?;
        self.at += n;
        Ok(run)
    }

    fn string(&mut self) -> Result<Cow<'a, str>, String> {
        self.expect(b'"')?;
        let first = self.run()?;
        if self.bytes().get(self.at) == Some(&b'"') {
            self.at += 1;
            return Ok(Cow::Borrowed(first));
        }
        let mut out = String::from(first);
        loop {
            match self.bytes().get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    let e = self.bytes().get(self.at + 1).copied();
                    self.at += 2;
                    out.push(match e {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => self.unicode()?,
                        _ => return Err("invalid escape".into()),
                    });
                }
                Some(_) => out.push_str(self.run()?),
                None => return Err("unterminated string".into()),
            }
        }
    }

    /// The character of a `\uXXXX` escape (a surrogate pair takes two).
    fn unicode(&mut self) -> Result<char, String> {
        let hi = self.hex4()?;
        let code = match hi {
            0xD800..0xDC00 => {
                if self.bytes().get(self.at..self.at + 2) != Some(b"\\u") {
                    return Err("lone leading surrogate in hex escape".into());
                }
                self.at += 2;
                let lo = self.hex4()?;
                if !(0xDC00..0xE000).contains(&lo) {
                    return Err("invalid trailing surrogate in hex escape".into());
                }
                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
            }
            0xDC00..0xE000 => return Err("lone trailing surrogate in hex escape".into()),
            c => c,
        };
        char::from_u32(code).ok_or_else(|| "invalid unicode escape".into())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .bytes()
            .get(self.at..self.at + 4)
            .ok_or("invalid unicode escape")?;
        let mut v = 0u32;
        for &c in digits {
            v = v * 16 + char::from(c).to_digit(16).ok_or("invalid unicode escape")?;
        }
        self.at += 4;
        Ok(v)
    }

    fn null_or_string(&mut self) -> Result<Option<Cow<'a, str>>, String> {
        if self.peek() == Some(b'n') {
            if self.bytes().get(self.at..self.at + 4) == Some(b"null") {
                self.at += 4;
                return Ok(None);
            }
            return Err("expected a string or null".into());
        }
        self.string().map(Some)
    }

    /// A whole number (no sign, fraction or exponent), as JSON writes it.
    fn uint(&mut self) -> Result<u64, String> {
        self.peek();
        let start = self.at;
        let b = self.bytes();
        let mut v = 0u64;
        while let Some(&c) = b.get(self.at)
            && c.is_ascii_digit()
        {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .ok_or("number out of range")?;
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || matches!(b.get(self.at), Some(b'.' | b'e' | b'E')) {
            return Err("expected a whole number".into());
        }
        if digits > 1 && b.get(start) == Some(&b'0') {
            return Err("invalid number (leading zero)".into());
        }
        Ok(v)
    }

    fn small<T: TryFrom<u64>>(&mut self, what: &str) -> Result<T, String> {
        let v = self.uint()?;
        T::try_from(v).map_err(|_| format!("{what} {v} is out of range"))
    }

    fn document(&mut self, sink: &mut impl CellSink) -> Result<(), String> {
        let (mut format, mut cells) = (false, false);
        let mut month = None;
        if self.open(b'{', b'}')? {
            loop {
                let key = self.string()?;
                self.expect(b':')?;
                match &*key {
                    "format" if !format => {
                        let f = self.string()?;
                        if f != FORMAT {
                            return Err(format!("format {f:?} is not {FORMAT:?}"));
                        }
                        format = true;
                    }
                    "month" if month.is_none() && !cells => {
                        let t = self.string()?;
                        let m = month_of_text(&t)
                            .ok_or_else(|| format!("{t:?} is not a month (YYYY-MM)"))?;
                        sink.month(m)?;
                        month = Some(m);
                    }
                    "month" if cells => return Err("`month` must come before `cells`".into()),
                    "cells" if !cells => {
                        self.cells(sink, month)?;
                        cells = true;
                    }
                    "format" | "cells" | "month" => {
                        return Err(format!("duplicate field `{key}`"));
                    }
                    _ => {
                        return Err(format!(
                            "unknown field `{key}`, expected `format`, `month` or `cells`"
                        ));
                    }
                }
                if !self.more(b'}')? {
                    break;
                }
            }
        }
        if !format {
            return Err("missing field `format`".into());
        }
        if !cells {
            return Err("missing field `cells`".into());
        }
        if self.peek().is_some() {
            return Err("trailing characters".into());
        }
        Ok(())
    }

    fn cells(&mut self, sink: &mut impl CellSink, month: Option<Date>) -> Result<(), String> {
        if !self.open(b'[', b']')? {
            return Ok(());
        }
        let mut n = 0usize;
        loop {
            n += 1;
            self.cell(sink, month)
                .map_err(|e| format!("cell {n}: {e}"))?;
            if !self.more(b']')? {
                return Ok(());
            }
        }
    }

    fn cell(&mut self, sink: &mut impl CellSink, month: Option<Date>) -> Result<(), String> {
        let mut day = None;
        let (mut consumer, mut service, mut version) = (None, None, None);
        let (mut code, mut decision) = (None, None);
        let (mut calls, mut errors, mut latency) = (None, None, None);
        if self.open(b'{', b'}')? {
            loop {
                let key = self.string()?;
                self.expect(b':')?;
                match &*key {
                    "day" => {
                        let t = self.string()?;
                        let d = day_of(t.as_bytes())
                            .ok_or_else(|| format!("{t:?} is not a day (YYYY-MM-DD)"))?;
                        once(&mut day, d, "day")?;
                    }
                    "consumer" => once(&mut consumer, self.null_or_string()?, "consumer")?,
                    "service" => once(&mut service, self.null_or_string()?, "service")?,
                    "version" => once(&mut version, self.null_or_string()?, "version")?,
                    "code" => once(&mut code, self.small::<u16>("code")?, "code")?,
                    "decision" => once(&mut decision, self.string()?, "decision")?,
                    "calls" => once(&mut calls, self.uint()?, "calls")?,
                    "errors" => once(&mut errors, self.uint()?, "errors")?,
                    "latency" => {
                        if latency.is_some() {
                            return Err("duplicate field `latency`".into());
                        }
                        self.latency()?;
                        latency = Some(());
                    }
                    other => return Err(format!("unknown field `{other}`")),
                }
                if !self.more(b'}')? {
                    break;
                }
            }
        }
        let missing = |name: &str| format!("missing field `{name}`");
        let key = CellKey {
            day: day.ok_or_else(|| missing("day"))?,
            consumer: consumer
                .as_ref()
                .ok_or_else(|| missing("consumer"))?
                .as_deref(),
            service: service
                .as_ref()
                .ok_or_else(|| missing("service"))?
                .as_deref(),
            version: version
                .as_ref()
                .ok_or_else(|| missing("version"))?
                .as_deref(),
            code: code.ok_or_else(|| missing("code"))?,
            decision: decision.as_deref().ok_or_else(|| missing("decision"))?,
        };
        let calls = calls.ok_or_else(|| missing("calls"))?;
        let errors = errors.ok_or_else(|| missing("errors"))?;
        latency.ok_or_else(|| missing("latency"))?;
        if month.is_some_and(|m| m != key.day) {
            return Err(format!(
                "the day of a cell of a month's roll-up must be the month's first, not {}",
                format_day(key.day)
            ));
        }
        check_cell(calls, errors, &self.latency)?;
        sink.cell(key, calls, errors, &self.latency);
        Ok(())
    }

    fn latency(&mut self) -> Result<(), String> {
        self.latency.clear();
        if !self.open(b'[', b']')? {
            return Ok(());
        }
        loop {
            // Most pairs are as written, `[digits,digits]`: read those in one go.
            if let Some((pair, len)) = plain_pair(self.bytes().get(self.at..).unwrap_or_default()) {
                self.latency.push(pair);
                self.at += len;
                if !self.more(b']')? {
                    return Ok(());
                }
                continue;
            }
            self.expect(b'[')?;
            let bucket = self.small::<u16>("latency bucket")?;
            self.expect(b',')?;
            let count = self.uint()?;
            self.expect(b']')?;
            self.latency.push((bucket, count));
            if !self.more(b']')? {
                return Ok(());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

/// Writes a roll-up to `path`, atomically: a temporary file beside it (mode 0600) is
/// written and synced, renamed over `path`, and the directory synced. A reader sees the
/// old file or the new one, never part of one; a crash leaves at most a `.*.tmp` file.
pub fn write_file(path: &Path, rollup: &Rollup) -> Result<(), StatsError> {
    write_atomically(path, &rollup.to_json())
}

/// Replaces `path` with `bytes` (see [`write_file`]).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StatsError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let io = |source| StatsError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file name")))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Reads a roll-up file written by [`write_file`]. A file that is not a valid roll-up is
/// an error naming it.
pub fn read_file(path: &Path) -> Result<Rollup, StatsError> {
    let bytes = std::fs::read(path).map_err(|source| StatsError::Io {
        path: path.to_owned(),
        source,
    })?;
    Rollup::from_json(&bytes).map_err(|reason| StatsError::Malformed {
        path: path.to_owned(),
        reason,
    })
}

/// The usual name of a day's roll-up file: `stats-YYYY-MM-DD.json` (a backend may name
/// its files otherwise; [`write_file`] and [`read_file`] take any path).
pub fn day_file_name(day: Date) -> String {
    format!("stats-{}.json", format_day(day))
}

// ---------------------------------------------------------------------------------------
// Months
// ---------------------------------------------------------------------------------------

/// The first day of a day's month.
pub fn month_of(day: Date) -> Date {
    day.replace_day(1).unwrap_or(day)
}

/// The last day of a month (given by any of its days).
pub fn month_end(day: Date) -> Date {
    let first = month_of(day);
    let next = match first.month() {
        Month::December => Date::from_calendar_date(first.year() + 1, Month::January, 1),
        m => first.replace_month(m.next()),
    };
    next.ok().and_then(Date::previous_day).unwrap_or(first)
}

/// `YYYY-MM`.
fn format_month(month: Date) -> String {
    format!("{:04}-{:02}", month.year(), u8::from(month.month()))
}

/// The first day of a `YYYY-MM` month.
fn month_of_text(text: &str) -> Option<Date> {
    day_of(format!("{text}-01").as_bytes()).filter(|_| text.len() == 7)
}

/// The usual name of a month's roll-up file: `stats-YYYY-MM.json`.
pub fn month_file_name(month: Date) -> String {
    format!("stats-{}.json", format_month(month))
}

/// The roll-up of a whole month: its days' cells merged (each cell's day is the month's
/// first). A long range is answered from these: 13 months are 13 files of about one day's
/// size each, instead of 396. A month's roll-up can answer neither `--by day` nor a range
/// that cuts the month ([`plan`] says which months a query can take whole); a [`Tally`]
/// refuses it for those, and [`read_file`] refuses it as a day's roll-up. Its document is
/// a day's with `"month": "YYYY-MM"` before the cells.
#[derive(Debug, Clone)]
pub struct MonthRollup {
    month: Date,
    cells: Rollup,
}

impl MonthRollup {
    /// An empty roll-up of the month of `day`.
    pub fn new(day: Date) -> Self {
        Self {
            month: month_of(day),
            cells: Rollup::new(),
        }
    }

    /// The month's first day.
    pub fn month(&self) -> Date {
        self.month
    }

    /// Adds the cells of a roll-up that fall in this month (others are left out).
    pub fn add_days(&mut self, days: &Rollup) {
        for (k, c) in days.cells() {
            if month_of(k.day) == self.month {
                self.cells.insert(
                    CellKey {
                        day: self.month,
                        ..k
                    },
                    c,
                );
            }
        }
    }

    /// The month's cells (each on the month's first day).
    pub fn cells(&self) -> &Rollup {
        &self.cells
    }

    /// The month's JSON document.
    pub fn to_json(&self) -> Vec<u8> {
        document_json(&self.cells, Some(self.month))
    }

    /// Writes the month's roll-up to `path`, atomically (as [`write_file`] does).
    pub fn write_file(&self, path: &Path) -> Result<(), StatsError> {
        write_atomically(path, &self.to_json())
    }
}

/// Which roll-ups answer a query: [`Plan::months`] from month roll-ups, [`Plan::days`]
/// from day roll-ups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The first days of the months taken whole.
    pub months: Vec<Date>,
    /// The other days.
    pub days: Vec<Date>,
}

/// Plans a query over the days from `oldest` (the first day kept) to `today`: the months
/// that lie wholly inside the query's range and are over (before today's month) are taken
/// from month roll-ups, unless the query groups by day; every other day from its day
/// roll-up. A backend that lacks a month's roll-up (not compacted yet) reads its days
/// instead: they are `month..=month_end(month)`.
pub fn plan(query: &Query, oldest: Date, today: Date) -> Plan {
    let start = query.from.map_or(oldest, |f| f.max(oldest));
    let end = query.to.map_or(today, |t| t.min(today));
    let mut plan = Plan::default();
    let whole_months = !query.by.contains(&Dim::Day);
    let mut day = start;
    while day <= end {
        let last = month_end(day);
        if whole_months && day.day() == 1 && last <= end && last < month_of(today) {
            plan.months.push(day);
            day = last;
        } else {
            plan.days.push(day);
        }
        match day.next_day() {
            Some(next) => day = next,
            None => break,
        }
    }
    plan
}

// ---------------------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------------------

/// A dimension statistics can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    Consumer,
    Service,
    Version,
    /// The UTC date, `YYYY-MM-DD`.
    Day,
    /// The HTTP status as text.
    Code,
    /// Extension: `allowed` or the FSP error code.
    Decision,
}

impl Dim {
    /// Every dimension, in the order the contract lists them.
    pub const ALL: [Dim; 6] = [
        Dim::Consumer,
        Dim::Service,
        Dim::Version,
        Dim::Day,
        Dim::Code,
        Dim::Decision,
    ];

    /// The dimension's name (in `--by`, and as a JSON key and a column header).
    pub fn name(self) -> &'static str {
        match self {
            Dim::Consumer => "consumer",
            Dim::Service => "service",
            Dim::Version => "version",
            Dim::Day => "day",
            Dim::Code => "code",
            Dim::Decision => "decision",
        }
    }

    /// Parses `--by`: names separated by commas (`version,consumer`), each at most once.
    /// An empty text is no dimension (one total row).
    pub fn parse_list(text: &str) -> Result<Vec<Dim>, StatsError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut dims = Vec::new();
        for name in text.split(',') {
            let dim: Dim = name.trim().parse()?;
            if dims.contains(&dim) {
                return Err(StatsError::DuplicateDim(dim.name()));
            }
            dims.push(dim);
        }
        Ok(dims)
    }
}

impl FromStr for Dim {
    type Err = StatsError;

    fn from_str(s: &str) -> Result<Self, StatsError> {
        Dim::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| StatsError::UnknownDim { name: s.to_owned() })
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to answer: the days (both ends included; open when `None`) and the dimensions to
/// group by (in the order the rows are sorted by; none: one total row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub from: Option<Date>,
    pub to: Option<Date>,
    pub by: Vec<Dim>,
}

impl Query {
    /// A query from the text of `--from`, `--to` and `--by` (or the `from`, `to` and `by`
    /// parameters of `GET /admin/stats`).
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        by: Option<&str>,
    ) -> Result<Self, StatsError> {
        let from = from.map(parse_day).transpose()?;
        let to = to.map(parse_day).transpose()?;
        if let (Some(f), Some(t)) = (from, to)
            && f > t
        {
            return Err(StatsError::EmptyRange {
                from: format_day(f),
                to: format_day(t),
            });
        }
        Ok(Self {
            from,
            to,
            by: by.map(Dim::parse_list).transpose()?.unwrap_or_default(),
        })
    }

    /// Whether a day is in the query's range.
    pub fn covers(&self, day: Date) -> bool {
        self.from.is_none_or(|f| day >= f) && self.to.is_none_or(|t| day <= t)
    }
}

/// One line of an answer: the values of the query's dimensions (`None`: missing, such as
/// the consumer of a call refused before identification), and the figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub by: Vec<(Dim, Option<String>)>,
    pub calls: u64,
    pub errors: u64,
    /// Percentiles of the calls' durations in milliseconds (`None` when there is no call:
    /// the total of an empty range).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A group's figures while an answer is built. Its histogram starts sparse and turns
/// dense (one counter per bucket) once it holds many buckets: a group merges thousands of
/// cells, and adding into an array is cheaper than merging lists.
#[derive(Debug, Clone, Default)]
struct Acc {
    calls: u64,
    errors: u64,
    sparse: Histogram,
    dense: Option<Box<[u64; BUCKETS]>>,
}

/// How many buckets a group's histogram holds before it turns dense.
const DENSE_AFTER: usize = 32;

impl Acc {
    fn add(&mut self, calls: u64, errors: u64, latency: &[(u16, u64)]) {
        self.calls = self.calls.saturating_add(calls);
        self.errors = self.errors.saturating_add(errors);
        if let Some(dense) = &mut self.dense {
            for &(b, c) in latency {
                if let Some(n) = dense.get_mut(usize::from(b)) {
                    *n = n.saturating_add(c);
                }
            }
            return;
        }
        self.sparse.merge_sorted(latency);
        if self.sparse.buckets.len() > DENSE_AFTER {
            let mut dense = Box::new([0u64; BUCKETS]);
            for &(b, c) in &self.sparse.buckets {
                if let Some(n) = dense.get_mut(usize::from(b)) {
                    *n = c;
                }
            }
            self.sparse = Histogram::default();
            self.dense = Some(dense);
        }
    }

    /// The histogram as a sparse list.
    fn buckets(&self) -> Cow<'_, [(u16, u64)]> {
        match &self.dense {
            Some(dense) => Cow::Owned(
                (0u16..)
                    .zip(dense.iter())
                    .filter(|&(_, &c)| c > 0)
                    .map(|(b, &c)| (b, c))
                    .collect(),
            ),
            None => Cow::Borrowed(&self.sparse.buckets),
        }
    }

    fn percentile(&self, p: f64) -> Option<f64> {
        match &self.dense {
            Some(dense) => percentile_of((0u16..).zip(dense.iter().copied()), p),
            None => self.sparse.percentile(p),
        }
    }
}

/// The nearest-rank `p`-quantile of `(bucket, count)` pairs in increasing bucket order.
fn percentile_of(buckets: impl Iterator<Item = (u16, u64)> + Clone, p: f64) -> Option<f64> {
    let n = buckets.clone().fold(0u64, |n, (_, c)| n.saturating_add(c));
    if n == 0 {
        return None;
    }
    // The rank is in 1..=n; the float product is exact enough for any real count.
    let rank = ((p.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
    let mut seen = 0u64;
    let mut last = None;
    for (b, c) in buckets {
        if c == 0 {
            continue;
        }
        seen = seen.saturating_add(c);
        last = Some(b);
        if seen >= rank {
            break;
        }
    }
    last.map(bucket_value)
}

/// An answer being built: cells from roll-ups, files or stored cells are added, grouped
/// by the query's dimensions, and [`Tally::rows`] gives the rows. Memory is one cell per
/// group, whatever the number of cells added.
#[derive(Debug, Clone)]
pub struct Tally {
    query: Query,
    keep: [bool; 6],
    groups: Table<Acc>,
    /// The group added to last: cells come sorted, and neighbours often share a group.
    last: usize,
}

impl Tally {
    /// An empty answer to `query`.
    pub fn new(query: &Query) -> Self {
        let mut keep = [false; 6];
        for (slot, dim) in keep.iter_mut().zip(Dim::ALL) {
            *slot = query.by.contains(&dim);
        }
        Self {
            query: query.clone(),
            keep,
            groups: Table::default(),
            last: END,
        }
    }

    /// A cell's key reduced to the query's dimensions (the others blank).
    fn project<'a>(&self, k: CellKey<'a>) -> CellKey<'a> {
        let [consumer, service, version, day, code, decision] = self.keep;
        CellKey {
            day: if day { k.day } else { Date::MIN },
            consumer: if consumer { k.consumer } else { None },
            service: if service { k.service } else { None },
            version: if version { k.version } else { None },
            code: if code { k.code } else { 0 },
            decision: if decision { k.decision } else { "" },
        }
    }

    fn add_parts(&mut self, key: CellKey<'_>, calls: u64, errors: u64, latency: &[(u16, u64)]) {
        if self.query.covers(key.day) {
            self.add_to_group(self.project(key), calls, errors, latency);
        }
    }

    fn add_to_group(
        &mut self,
        group: CellKey<'_>,
        calls: u64,
        errors: u64,
        latency: &[(u16, u64)],
    ) {
        let at = match self.groups.entries.get(self.last) {
            Some(e) if e.key.view() == group => self.last,
            _ => self.groups.index_of(group),
        };
        if let Some(e) = self.groups.entries.get_mut(at) {
            e.value.add(calls, errors, latency);
        }
        self.last = at;
    }

    /// Adds one cell (from a backend that stores cells one by one).
    pub fn add_cell(&mut self, key: CellKey<'_>, cell: &Cell) {
        self.add_parts(key, cell.calls, cell.errors, &cell.latency.buckets);
    }

    /// Adds every cell of a roll-up.
    pub fn add_rollup(&mut self, rollup: &Rollup) {
        for (k, c) in rollup.cells() {
            self.add_cell(k, c);
        }
    }

    /// Whether the roll-up of a whole month can answer this query: not by day, and the
    /// month wholly inside the range.
    fn month_fits(&self, month: Date) -> Result<(), String> {
        if self.query.by.contains(&Dim::Day) {
            return Err(format!(
                "the roll-up of the month {} cannot answer by day",
                format_month(month)
            ));
        }
        if !(self.query.covers(month) && self.query.covers(month_end(month))) {
            return Err(format!(
                "the roll-up of the month {} does not lie wholly inside the range",
                format_month(month)
            ));
        }
        Ok(())
    }

    /// Adds a month's roll-up (see [`plan`]); refused when it cannot answer this query.
    pub fn add_month(&mut self, month: &MonthRollup) -> Result<(), StatsError> {
        self.month_fits(month.month)
            .map_err(|reason| StatsError::Misfit {
                what: format!("the roll-up of {}", format_month(month.month)),
                reason,
            })?;
        for (k, c) in month.cells.cells() {
            self.add_to_group(self.project(k), c.calls, c.errors, &c.latency.buckets);
        }
        Ok(())
    }

    /// Reads a document into the tally; the error says whether the document was valid
    /// but could not answer the query (a month's roll-up that does not fit).
    fn read_json(&mut self, bytes: &[u8]) -> Result<(), (bool, String)> {
        let mut sink = TallySink {
            tally: self,
            whole_month: false,
            misfit: false,
        };
        read_document(bytes, &mut sink).map_err(|e| (sink.misfit, e))
    }

    /// Adds the cells of a roll-up document (a day's or a month's, in the file format) as
    /// they are read. After an error some of its cells may have been added: discard the
    /// tally.
    pub fn add_json(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.read_json(bytes).map_err(|(_, e)| e)
    }

    /// Adds the cells of a roll-up file (a day's or a month's). After an error, discard
    /// the tally.
    pub fn add_file(&mut self, path: &Path) -> Result<(), StatsError> {
        let bytes = std::fs::read(path).map_err(|source| StatsError::Io {
            path: path.to_owned(),
            source,
        })?;
        self.read_json(&bytes).map_err(|(misfit, reason)| {
            if misfit {
                StatsError::Misfit {
                    what: path.display().to_string(),
                    reason,
                }
            } else {
                StatsError::Malformed {
                    path: path.to_owned(),
                    reason,
                }
            }
        })
    }

    /// Adds another tally of the same query (its groups are already filtered and
    /// reduced to the query's dimensions).
    pub fn merge(&mut self, other: &Tally) {
        for (k, g) in other.groups.iter() {
            self.add_to_group(k, g.calls, g.errors, &g.buckets());
        }
    }

    /// The rows, sorted by the query's dimensions in the order given (a missing value
    /// first). Without dimensions, one total row, even over no call.
    pub fn rows(&self) -> Vec<Row> {
        let mut groups: Vec<(CellKey<'_>, &Acc)> = self.groups.iter().collect();
        groups.sort_by(|a, b| {
            self.query
                .by
                .iter()
                .map(|&d| a.0.cmp_on(&b.0, d))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let empty = Acc::default();
        if groups.is_empty() && self.query.by.is_empty() {
            groups.push((self.project(CellKey::blank()), &empty));
        }
        groups
            .into_iter()
            .map(|(k, c)| Row {
                by: self
                    .query
                    .by
                    .iter()
                    .map(|&d| (d, k.value(d).map(Cow::into_owned)))
                    .collect(),
                calls: c.calls,
                errors: c.errors,
                p50_ms: c.percentile(0.50),
                p95_ms: c.percentile(0.95),
                p99_ms: c.percentile(0.99),
            })
            .collect()
    }
}

impl CellKey<'static> {
    fn blank() -> Self {
        CellKey {
            day: Date::MIN,
            consumer: None,
            service: None,
            version: None,
            code: 0,
            decision: "",
        }
    }
}

/// Feeds a document's cells to a tally.
struct TallySink<'t> {
    tally: &'t mut Tally,
    /// The document is a month's roll-up that fits the query: its cells are taken whole.
    whole_month: bool,
    /// The document is a month's roll-up that does not fit the query.
    misfit: bool,
}

impl CellSink for TallySink<'_> {
    fn cell(&mut self, key: CellKey<'_>, calls: u64, errors: u64, latency: &[(u16, u64)]) {
        if self.whole_month {
            let group = self.tally.project(key);
            self.tally.add_to_group(group, calls, errors, latency);
        } else {
            self.tally.add_parts(key, calls, errors, latency);
        }
    }

    fn month(&mut self, month: Date) -> Result<(), String> {
        self.tally
            .month_fits(month)
            .inspect_err(|_| self.misfit = true)?;
        self.whole_month = true;
        Ok(())
    }
}

/// Answers a query over roll-ups held in memory.
pub fn answer<'r>(rollups: impl IntoIterator<Item = &'r Rollup>, query: &Query) -> Vec<Row> {
    let mut t = Tally::new(query);
    for r in rollups {
        t.add_rollup(r);
    }
    t.rows()
}

/// Answers a query from roll-up files: the day and month roll-ups a [`plan`] names (cells
/// of a day's roll-up outside the range are skipped anyway; a month's roll-up that does
/// not fit the query is an error). Files are read on as many threads as
/// there are cores, each file streamed into its thread's tally.
pub fn answer_files<P: AsRef<Path> + Sync>(
    paths: &[P],
    query: &Query,
) -> Result<Vec<Row>, StatsError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(paths.len())
        .max(1);
    let read = |part: &[P]| -> Result<Tally, StatsError> {
        let mut t = Tally::new(query);
        for p in part {
            t.add_file(p.as_ref())?;
        }
        Ok(t)
    };
    if threads == 1 {
        return Ok(read(paths)?.rows());
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = paths
            .chunks(chunk)
            .map(|part| s.spawn(move || read(part)))
            .collect();
        let mut total = Tally::new(query);
        for w in workers {
            match w.join() {
                Ok(t) => total.merge(&t?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(total.rows())
    })
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

/// How `fsp stats` prints its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns with a header, for a terminal.
    Table,
    /// A JSON array of objects: the dimensions, then `calls`, `errors`, `p50_ms`,
    /// `p95_ms`, `p99_ms`.
    Json,
    /// A header row, then one row per line (RFC 4180).
    Csv,
}

impl FromStr for OutputFormat {
    type Err = StatsError;

    fn from_str(s: &str) -> Result<Self, StatsError> {
        match s {
            "table" => Ok(Self::Table),
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            _ => Err(StatsError::BadFormat(s.to_owned())),
        }
    }
}

/// The figures' column names, after the dimensions'.
pub const FIGURES: [&str; 5] = ["calls", "errors", "p50_ms", "p95_ms", "p99_ms"];

/// Milliseconds rounded to the microsecond.
fn round3(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// Writes rows in a format. `by` names the columns (the rows' dimensions, also when
/// there is no row).
pub fn write_rows(
    rows: &[Row],
    by: &[Dim],
    format: OutputFormat,
    mut out: impl Write,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(256 + rows.len() * 128);
    match format {
        OutputFormat::Json => json_rows(&mut buf, rows),
        OutputFormat::Csv => csv_rows(&mut buf, rows, by),
        OutputFormat::Table => table_rows(&mut buf, rows, by),
    }
    out.write_all(&buf)?;
    out.flush()
}

fn json_f64(out: &mut Vec<u8>, v: Option<f64>) {
    match v {
        // A finite f64's `Display` is a valid JSON number (no exponent, no NaN).
        Some(v) if v.is_finite() => out.extend_from_slice(round3(v).to_string().as_bytes()),
        _ => out.extend_from_slice(b"null"),
    }
}

fn json_rows(out: &mut Vec<u8>, rows: &[Row]) {
    out.push(b'[');
    for (i, r) in rows.iter().enumerate() {
        out.extend_from_slice(if i == 0 { b"\n{" } else { b",\n{" });
        for (d, v) in &r.by {
            json_str(out, d.name());
            out.push(b':');
            json_opt_str(out, v.as_deref());
            out.push(b',');
        }
        out.extend_from_slice(b"\"calls\":");
        json_u64(out, r.calls);
        out.extend_from_slice(b",\"errors\":");
        json_u64(out, r.errors);
        out.extend_from_slice(b",\"p50_ms\":");
        json_f64(out, r.p50_ms);
        out.extend_from_slice(b",\"p95_ms\":");
        json_f64(out, r.p95_ms);
        out.extend_from_slice(b",\"p99_ms\":");
        json_f64(out, r.p99_ms);
        out.push(b'}');
    }
    out.extend_from_slice(if rows.is_empty() { b"]\n" } else { b"\n]\n" });
}

fn csv_rows(out: &mut Vec<u8>, rows: &[Row], by: &[Dim]) {
    let header: Vec<&str> = by.iter().map(|d| d.name()).chain(FIGURES).collect();
    out.extend_from_slice(header.join(",").as_bytes());
    out.push(b'\n');
    for r in rows {
        for (_, v) in &r.by {
            if let Some(v) = v {
                crate::export::csv_field(out, v);
            }
            out.push(b',');
        }
        json_u64(out, r.calls);
        out.push(b',');
        json_u64(out, r.errors);
        for p in [r.p50_ms, r.p95_ms, r.p99_ms] {
            out.push(b',');
            if let Some(p) = p.filter(|p| p.is_finite()) {
                out.extend_from_slice(round3(p).to_string().as_bytes());
            }
        }
        out.push(b'\n');
    }
}

/// A value as a terminal shows it: control characters (which could move the cursor,
/// retitle the window or clear the screen) replaced by `?`.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn table_rows(out: &mut Vec<u8>, rows: &[Row], by: &[Dim]) {
    let ms = |p: Option<f64>| p.map_or_else(|| "-".to_owned(), |p| format!("{:.3}", round3(p)));
    let mut cells: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    cells.push(
        by.iter()
            .map(|d| d.name().to_owned())
            .chain(FIGURES.map(str::to_owned))
            .collect(),
    );
    for r in rows {
        let mut line: Vec<String> =
            r.by.iter()
                .map(|(_, v)| v.as_deref().map_or_else(|| "-".to_owned(), printable))
                .collect();
        line.extend([
            r.calls.to_string(),
            r.errors.to_string(),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
        ]);
        cells.push(line);
    }
    let columns = cells.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for line in &cells {
        for (w, c) in widths.iter_mut().zip(line) {
            *w = (*w).max(c.chars().count());
        }
    }
    // Dimensions are text, left-aligned; figures are numbers, right-aligned.
    let texts = columns.saturating_sub(FIGURES.len());
    for line in &cells {
        let mut text = String::new();
        for (i, (c, &w)) in line.iter().zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = w.saturating_sub(c.chars().count());
            if i < texts {
                text.push_str(c);
                if i + 1 < line.len() {
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            } else {
                text.extend(std::iter::repeat_n(' ', pad));
                text.push_str(c);
            }
        }
        out.extend_from_slice(text.as_bytes());
        out.push(b'\n');
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why statistics could not be given.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatsError {
    #[error(
        "{name:?} is not a statistics dimension: use consumer, service, version, day, code or decision"
    )]
    UnknownDim { name: String },
    #[error("the dimension {0} is given twice")]
    DuplicateDim(&'static str),
    #[error("{text:?} is not a day: use YYYY-MM-DD (2026-12-01)")]
    BadDay { text: String },
    #[error("the range is empty: from {from} is after to {to}")]
    EmptyRange { from: String, to: String },
    #[error("{0:?} is not an output format: use table, json or csv")]
    BadFormat(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid statistics roll-up: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("{what}: cannot answer this query: {reason}")]
    Misfit { what: String, reason: String },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::Phase;

    fn rec(
        ts: &str,
        consumer: Option<&str>,
        service: &str,
        version: &str,
        decision: &str,
        status: u16,
        ms: f64,
    ) -> Record {
        Record {
            message_id: "m".into(),
            timestamp: ts.into(),
            consumer: consumer.map(str::to_owned),
            service: Some(service.into()),
            version: Some(version.into()),
            decision: decision.into(),
            status,
            duration_ms: ms,
            ..Default::default()
        }
    }

    const D1: &str = "2026-11-24T10:15:30.123Z";
    const D2: &str = "2026-11-25T23:59:59.999Z";

    /// A small trail: two days, two consumers, two versions, refusals and failures.
    fn trail() -> Vec<Record> {
        let mut request = rec(D1, Some("a"), "person/get", "v2", "allowed", 0, 0.0);
        request.phase = Some(Phase::Request);
        let mut outcome = rec(D1, Some("a"), "person/get", "v2", "allowed", 200, 10.0);
        outcome.phase = Some(Phase::Outcome);
        vec![
            request,
            outcome,
            rec(D1, Some("a"), "person/get", "v2", "allowed", 200, 20.0),
            rec(D1, Some("a"), "person/get", "v3", "allowed", 404, 5.0),
            rec(D1, Some("b"), "person/get", "v3", "allowed", 502, 30.0),
            rec(D1, Some("b"), "person/get", "v3", "FSP-THROTTLED", 429, 0.1),
            rec(
                D1,
                None,
                "person/get",
                "v3",
                "FSP-UNAUTHENTICATED",
                401,
                0.2,
            ),
            rec(D2, Some("b"), "person/get", "v3", "allowed", 0, 60_000.0),
            rec(D2, Some("a"), "company/find", "v1", "allowed", 200, 1.0),
        ]
    }

    fn by(text: &str) -> Query {
        Query::parse(None, None, Some(text)).unwrap()
    }

    /// (values, calls, errors) of each row.
    fn summary(rows: &[Row]) -> Vec<(Vec<Option<&str>>, u64, u64)> {
        rows.iter()
            .map(|r| {
                (
                    r.by.iter().map(|(_, v)| v.as_deref()).collect(),
                    r.calls,
                    r.errors,
                )
            })
            .collect()
    }

    #[test]
    fn buckets_cover_the_range_each_five_percent_wider() {
        let span = ((MAX_MS / MIN_MS).ln() / GROWTH.ln()).ceil();
        assert_eq!(f64::from(SPAN), span);
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(-1.0), 0);
        assert_eq!(bucket_of(f64::NAN), 0);
        assert_eq!(bucket_of(0.009), 0);
        assert_eq!(bucket_of(MIN_MS), 1);
        assert_eq!(bucket_of(MAX_MS), OVERFLOW);
        assert_eq!(bucket_of(f64::INFINITY), OVERFLOW);
        assert_eq!(bucket_of(MAX_MS * 0.999_999), SPAN);
        let mut prev = 0;
        let mut ms = 0.001;
        while ms < 2.0 * MAX_MS {
            let b = bucket_of(ms);
            assert!(b >= prev, "{ms}");
            if (1..OVERFLOW).contains(&b) {
                let err = (bucket_value(b) - ms).abs() / ms;
                assert!(err <= GROWTH.sqrt() - 1.0 + 1e-9, "{ms} in {b}: {err}");
            }
            prev = b;
            ms *= 1.01;
        }
    }

    #[test]
    fn add_counts_calls_not_request_lines_and_errors_as_defined() {
        let mut r = Rollup::new();
        let counted: Vec<bool> = trail().iter().map(|x| r.add(x)).collect();
        assert_eq!(
            counted,
            [false, true, true, true, true, true, true, true, true]
        );
        assert!(!r.add(&rec(
            "yesterday",
            Some("a"),
            "s/s",
            "v1",
            "allowed",
            200,
            1.0
        )));
        let total = r.answer(&Query::default());
        // 8 calls; errors: 502, throttled, unauthenticated, status 0 (not the 404).
        assert_eq!(summary(&total), [(vec![], 8, 4)]);
        let k = CellKey {
            day: parse_day("2026-11-24").unwrap(),
            consumer: Some("a"),
            service: Some("person/get"),
            version: Some("v2"),
            code: 200,
            decision: "allowed",
        };
        let cell = r.get(k).unwrap();
        assert_eq!(
            (cell.calls(), cell.errors(), cell.latency().count()),
            (2, 0, 2)
        );
        assert!(is_error("allowed", 0) && is_error("allowed", 500) && is_error("FSP-X", 200));
        assert!(!is_error("allowed", 499));
    }

    #[test]
    fn the_day_is_the_utc_date_of_the_timestamp() {
        let day = |ts: &str| utc_day(ts).map(format_day);
        assert_eq!(day(D1).as_deref(), Some("2026-11-24"));
        assert_eq!(day("2026-11-24T10:15:30Z").as_deref(), Some("2026-11-24"));
        assert_eq!(
            day("2026-11-25T00:30:00+01:00").as_deref(),
            Some("2026-11-24")
        );
        assert_eq!(
            day("2026-11-24t23:30:00.5-01:00").as_deref(),
            Some("2026-11-25")
        );
        assert_eq!(day("2026-02-30T10:00:00Z"), None);
        assert_eq!(day("2026-1x-24T10:15:30.123Z"), None);
        assert_eq!(day(""), None);
    }

    #[test]
    fn answers_group_by_each_dimension_and_combinations_sorted_by_them() {
        let r = Rollup::from_records(trail());
        let s = |q: &str| {
            summary(&r.answer(&by(q)))
                .into_iter()
                .map(|(v, c, e)| {
                    (
                        v.into_iter()
                            .map(|v| v.map(str::to_owned))
                            .collect::<Vec<_>>(),
                        c,
                        e,
                    )
                })
                .collect::<Vec<_>>()
        };
        let o = |v: &[Option<&str>]| v.iter().map(|v| v.map(str::to_owned)).collect::<Vec<_>>();
        assert_eq!(
            s("consumer"),
            [
                (o(&[None]), 1, 1),
                (o(&[Some("a")]), 4, 0),
                (o(&[Some("b")]), 3, 3)
            ]
        );
        assert_eq!(
            s("service"),
            [
                (o(&[Some("company/find")]), 1, 0),
                (o(&[Some("person/get")]), 7, 4)
            ]
        );
        assert_eq!(
            s("version"),
            [
                (o(&[Some("v1")]), 1, 0),
                (o(&[Some("v2")]), 2, 0),
                (o(&[Some("v3")]), 5, 4)
            ]
        );
        assert_eq!(
            s("day"),
            [
                (o(&[Some("2026-11-24")]), 6, 3),
                (o(&[Some("2026-11-25")]), 2, 1)
            ]
        );
        // Codes sort as numbers.
        assert_eq!(
            s("code"),
            [
                (o(&[Some("0")]), 1, 1),
                (o(&[Some("200")]), 3, 0),
                (o(&[Some("401")]), 1, 1),
                (o(&[Some("404")]), 1, 0),
                (o(&[Some("429")]), 1, 1),
                (o(&[Some("502")]), 1, 1),
            ]
        );
        assert_eq!(
            s("decision"),
            [
                (o(&[Some("FSP-THROTTLED")]), 1, 1),
                (o(&[Some("FSP-UNAUTHENTICATED")]), 1, 1),
                (o(&[Some("allowed")]), 6, 2)
            ]
        );
        // Who still calls v2 and v3: version first, then consumer.
        assert_eq!(
            s("version,consumer"),
            [
                (o(&[Some("v1"), Some("a")]), 1, 0),
                (o(&[Some("v2"), Some("a")]), 2, 0),
                (o(&[Some("v3"), None]), 1, 1),
                (o(&[Some("v3"), Some("a")]), 1, 0),
                (o(&[Some("v3"), Some("b")]), 3, 3),
            ]
        );
        // The order given is the sort order.
        assert_eq!(
            s("consumer,version"),
            [
                (o(&[None, Some("v3")]), 1, 1),
                (o(&[Some("a"), Some("v1")]), 1, 0),
                (o(&[Some("a"), Some("v2")]), 2, 0),
                (o(&[Some("a"), Some("v3")]), 1, 0),
                (o(&[Some("b"), Some("v3")]), 3, 3),
            ]
        );
        let all = r.answer(&by("consumer,service,version,day,code,decision"));
        assert_eq!(all.len(), r.len());
        assert_eq!(all.iter().map(|x| x.calls).sum::<u64>(), 8);
        assert_eq!(
            all[0].by.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
            Dim::ALL
        );
    }

    #[test]
    fn from_and_to_are_inclusive_days() {
        let r = Rollup::from_records(trail());
        let q = |from, to| Query::parse(from, to, None).unwrap();
        let calls = |q: Query| r.answer(&q)[0].calls;
        assert_eq!(calls(q(Some("2026-11-24"), Some("2026-11-24"))), 6);
        assert_eq!(calls(q(Some("2026-11-25"), None)), 2);
        assert_eq!(calls(q(None, Some("2026-11-25"))), 8);
        // An empty range still answers one total row, with no percentile.
        let none = r.answer(&q(Some("2027-01-01"), None));
        assert_eq!(none.len(), 1);
        assert_eq!(
            (none[0].calls, none[0].errors, none[0].p50_ms),
            (0, 0, None)
        );
        // Grouped, an empty range has no row.
        assert!(
            r.answer(&Query::parse(Some("2027-01-01"), None, Some("day")).unwrap())
                .is_empty()
        );
        assert!(matches!(
            Query::parse(Some("2026-11-25"), Some("2026-11-24"), None),
            Err(StatsError::EmptyRange { .. })
        ));
        assert!(matches!(
            Query::parse(Some("24/11/2026"), None, None),
            Err(StatsError::BadDay { .. })
        ));
    }

    #[test]
    fn merged_rollups_are_the_rollup_of_all_records() {
        let records = trail();
        let whole = Rollup::from_records(records.clone());
        let mut a = Rollup::from_records(records[..4].iter().cloned());
        let b = Rollup::from_records(records[4..].iter().cloned());
        a.merge(&b);
        assert_eq!(a, whole);
        // Merging what is there already doubles it.
        a.merge(&whole);
        assert_eq!(a.answer(&Query::default())[0].calls, 16);
        assert_eq!(answer([&whole, &whole], &by("day"))[1].calls, 4);
        // take and clear leave an empty roll-up.
        let mut c = whole.clone();
        let taken = c.take();
        assert!(c.is_empty() && taken == whole);
        a.clear();
        assert!(a.is_empty() && a.answer(&by("consumer")).is_empty());
        a.add(&records[1]);
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn histograms_merge_exactly() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for ms in [1.0, 1.0, 5.0, 100.0] {
            a.record(ms);
        }
        for ms in [0.5, 5.0, 1000.0, 1000.0] {
            b.record(ms);
        }
        let mut m = a.clone();
        m.merge(&b);
        let mut want = Histogram::default();
        for ms in [1.0, 1.0, 5.0, 100.0, 0.5, 5.0, 1000.0, 1000.0] {
            want.record(ms);
        }
        assert_eq!(m, want);
        // In place, when every bucket is there.
        m.merge(&a);
        assert_eq!(m.count(), 12);
        assert!(m.buckets().windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(Histogram::default().percentile(0.5), None);
    }

    /// A small deterministic generator (xorshift64*), for samples.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn unit(&mut self) -> f64 {
            ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        /// Log-normal: a median of `median` ms, spread `sigma`.
        fn latency(&mut self, median: f64, sigma: f64) -> f64 {
            let z = (-2.0 * self.unit().ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos();
            median * (sigma * z).exp()
        }
    }

    fn exact(sorted: &[f64], p: f64) -> f64 {
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    #[test]
    fn percentiles_of_merged_histograms_are_within_five_percent() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut worst = 0.0f64;
        for (median, sigma, n) in [
            (20.0, 0.5, 10_000),
            (0.3, 1.5, 3_000),
            (800.0, 2.0, 50_000),
            (5.0, 0.05, 101),
            (50.0, 1.0, 7),
        ] {
            // Spread over days and consumers, so that the answer merges many cells.
            let mut r = Rollup::new();
            let mut samples = Vec::with_capacity(n);
            for i in 0..n {
                let ms = rng.latency(median, sigma).min(500_000.0);
                samples.push(ms);
                let ts = format!("2026-11-{:02}T10:00:00.000Z", 1 + i % 28);
                let consumer = format!("c{}", i % 13);
                r.add(&rec(&ts, Some(&consumer), "s/s", "v1", "allowed", 200, ms));
            }
            samples.sort_by(f64::total_cmp);
            let row = &r.answer(&Query::default())[0];
            for (p, got) in [(0.50, row.p50_ms), (0.95, row.p95_ms), (0.99, row.p99_ms)] {
                let want = exact(&samples, p);
                let err = (got.unwrap() - want).abs() / want;
                assert!(
                    err <= 0.05,
                    "p{p} of {n} samples around {median} ms: {got:?} vs {want}"
                );
                worst = worst.max(err);
            }
        }
        // The bound is √1.05 − 1 ≈ 2.47 %.
        assert!(worst <= GROWTH.sqrt() - 1.0 + 1e-9, "{worst}");
    }

    #[test]
    fn a_full_rollup_folds_new_keys_into_other() {
        let mut r = Rollup::with_cell_limit(2);
        for s in ["f/a", "f/b", "f/c", "f/d"] {
            assert!(r.add(&rec(D1, Some("a"), s, "v1", "allowed", 200, 1.0)));
        }
        assert_eq!(r.len(), 3);
        let rows = r.answer(&by("service,version"));
        assert_eq!(
            summary(&rows),
            [
                (vec![Some(OTHER), Some(OTHER)], 2, 0),
                (vec![Some("f/a"), Some("v1")], 1, 0),
                (vec![Some("f/b"), Some("v1")], 1, 0)
            ]
        );
        // The limit survives take.
        let mut r2 = r.take();
        r2.clear();
        assert_eq!(r.limit, 2);
    }

    #[test]
    fn split_by_day_gives_one_rollup_per_day() {
        let r = Rollup::from_records(trail());
        let days = r.split_by_day();
        assert_eq!(
            days.keys().map(|d| format_day(*d)).collect::<Vec<_>>(),
            ["2026-11-24", "2026-11-25"]
        );
        assert_eq!(r.days(), days.keys().copied().collect::<Vec<_>>());
        let mut back = Rollup::new();
        for d in days.values() {
            back.merge(d);
        }
        assert_eq!(back, r);
        assert_eq!(day_file_name(r.days()[0]), "stats-2026-11-24.json");
    }

    #[test]
    fn files_round_trip_are_private_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats-2026-11-24.json");
        let mut r = Rollup::from_records(trail());
        // Names that need escaping survive.
        r.add(&rec(
            D1,
            Some("we\"ird\\name\n\u{1}é"),
            "=cmd|' /C calc'!A0",
            "v1",
            "allowed",
            200,
            3.0,
        ));
        write_file(&path, &r).unwrap();
        assert_eq!(read_file(&path).unwrap(), r);
        // Replaced: the second write wins, and no temporary file is left.
        let small = Rollup::from_records(trail().into_iter().take(3));
        write_file(&path, &small).unwrap();
        assert_eq!(read_file(&path).unwrap(), small);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("stats-2026-11-24.json")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A relative path in the working directory has a directory too.
        assert!(matches!(
            write_file(Path::new("/"), &r),
            Err(StatsError::Io { .. })
        ));
    }

    #[test]
    fn the_file_format_is_compact_json_one_cell_per_line() {
        let mut r = Rollup::new();
        r.add(&rec(
            D1,
            Some("ville-bxl"),
            "person/getPerson",
            "v3",
            "allowed",
            200,
            1.0,
        ));
        r.add(&rec(
            D1,
            Some("ville-bxl"),
            "person/getPerson",
            "v3",
            "allowed",
            200,
            1.0,
        ));
        r.add(&rec(
            D1,
            None,
            "person/getPerson",
            "v3",
            "FSP-UNAUTHENTICATED",
            401,
            1.2,
        ));
        let text = String::from_utf8(r.to_json()).unwrap();
        let b1 = bucket_of(1.0);
        let b2 = bucket_of(1.2);
        assert_eq!(
            text,
            format!(
                "{{\"format\":\"fsp-stats/1\",\"cells\":[\n\
                 {{\"day\":\"2026-11-24\",\"consumer\":null,\"service\":\"person/getPerson\",\"version\":\"v3\",\"code\":401,\"decision\":\"FSP-UNAUTHENTICATED\",\"calls\":1,\"errors\":1,\"latency\":[[{b2},1]]}},\n\
                 {{\"day\":\"2026-11-24\",\"consumer\":\"ville-bxl\",\"service\":\"person/getPerson\",\"version\":\"v3\",\"code\":200,\"decision\":\"allowed\",\"calls\":2,\"errors\":0,\"latency\":[[{b1},2]]}}\n\
                 ]}}\n"
            )
        );
        // serde gives the same document, and takes it back (also from an owned value,
        // as a database column would give it).
        let via_serde = serde_json::to_value(&r).unwrap();
        assert_eq!(
            via_serde,
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        );
        assert_eq!(serde_json::from_value::<Rollup>(via_serde).unwrap(), r);
        // Cells on their own.
        let (k, c) = r.cells().next().unwrap();
        let stored = serde_json::to_string(&StoredCell::new(k, c)).unwrap();
        let back: StoredCell<'_> = serde_json::from_str(&stored).unwrap();
        assert_eq!(back.key(), k);
        assert_eq!(&back.cell().unwrap(), c);
        let cell_json = serde_json::to_string(c).unwrap();
        assert_eq!(
            cell_json,
            format!("{{\"calls\":2,\"errors\":0,\"latency\":[[{b1},2]]}}")
        );
        assert_eq!(&serde_json::from_str::<Cell>(&cell_json).unwrap(), c);
        assert!(
            serde_json::from_str::<Cell>("{\"calls\":3,\"errors\":0,\"latency\":[[1,2]]}").is_err()
        );
        let mut again = Rollup::new();
        again.insert(back.key(), &back.cell().unwrap());
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats-bad.json");
        let cell = |extra: &str, latency: &str| {
            format!(
                "{{\"format\":\"fsp-stats/1\",\"cells\":[{{\"day\":\"2026-11-24\",\"consumer\":null,\"service\":null,\"version\":null,\"code\":200,\"decision\":\"allowed\",\"calls\":2,\"errors\":0,\"latency\":{latency}{extra}}}]}}"
            )
        };
        assert!(Rollup::from_json(cell("", "[[1,2]]").as_bytes()).is_ok());
        let bad = [
            String::new(),
            "not json".into(),
            "[]".into(),
            "{\"format\":\"fsp-stats/1\"}".into(),
            "{\"cells\":[]}".into(),
            "{\"format\":\"fsp-stats/2\",\"cells\":[]}".into(),
            "{\"format\":\"fsp-stats/1\",\"cells\":[],\"x\":1}".into(),
            "{\"format\":\"fsp-stats/1\",\"cells\":[]} trailing".into(),
            "{\"format\":\"fsp-stats/1\",\"format\":\"fsp-stats/1\",\"cells\":[]}".into(),
            cell(",\"node\":\"n1\"", "[[1,2]]"),
            cell("", "[[1,1]]"),
            cell("", "[[1,1],[1,1]]"),
            cell("", "[[2,1],[1,1]]"),
            cell("", "[[1,2],[3,0]]"),
            cell("", "[[9999,2]]"),
            cell("", "[[1,2,3]]"),
            cell("", "[[-1,2]]"),
            cell("", "{}"),
            cell("", "[[1,2]]").replace("2026-11-24", "2026-13-01"),
            cell("", "[[1,2]]").replace("\"errors\":0", "\"errors\":3"),
            cell("", "[[1,2]]").replace("\"code\":200", "\"code\":70000"),
            cell("", "[[1,2]]")[..60].to_owned(),
        ];
        for text in bad {
            std::fs::write(&path, &text).unwrap();
            let err = read_file(&path).unwrap_err();
            assert!(matches!(err, StatsError::Malformed { .. }), "{text}: {err}");
            assert!(err.to_string().contains("stats-bad.json"), "{err}");
            let mut t = Tally::new(&Query::default());
            assert!(t.add_file(&path).is_err(), "{text}");
            // The serde path (a database column) refuses the same.
            assert!(serde_json::from_str::<Rollup>(&text).is_err(), "{text}");
        }
        let missing = read_file(&dir.path().join("none.json")).unwrap_err();
        assert!(
            matches!(missing, StatsError::Io { .. }) && missing.to_string().contains("none.json")
        );
    }

    #[test]
    fn the_file_reader_takes_what_json_allows_as_serde_does() {
        let texts = [
            // Whitespace anywhere, keys in any order, escapes.
            " {\"cells\" : [ { \"latency\" : [ [ 1 , 2 ] ] , \"errors\":0,\"calls\":2,\"decision\":\"allowed\",\"code\":0,\r\n\t\"version\":null,\"service\":\"f\\/s\",\"consumer\":\"\\u00e9t\\u00E9 \\ud83d\\ude00 \\\"q\\\" \\\\ \\b\\f\\n\\r\\t\",\"day\":\"2026-11-24\"} ] , \"format\" : \"fsp-stats/1\" } \n",
            "{\"format\":\"fsp-stats/1\",\"cells\":[]}",
            "{\"format\":\"fsp-stats/1\",\"cells\":[{\"day\":\"2026-11-24\",\"consumer\":null,\"service\":null,\"version\":null,\"code\":65535,\"decision\":\"\",\"calls\":18446744073709551615,\"errors\":18446744073709551615,\"latency\":[[369,18446744073709551615]]}]}",
        ];
        for text in texts {
            let fast = Rollup::from_json(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
            let serde: Rollup = serde_json::from_str(text).unwrap();
            assert_eq!(fast, serde, "{text}");
        }
        let r = Rollup::from_json(texts[0].as_bytes()).unwrap();
        let (k, _) = r.cells().next().unwrap();
        assert_eq!(
            k.consumer,
            Some("\u{e9}t\u{e9} \u{1f600} \"q\" \\ \u{8}\u{c}\n\r\t")
        );
        assert_eq!(k.service, Some("f/s"));
        // What JSON refuses, both refuse.
        let cell = |v: &str| {
            format!(
                "{{\"format\":\"fsp-stats/1\",\"cells\":[{{\"day\":\"2026-11-24\",\"consumer\":{v},\"service\":null,\"version\":null,\"code\":200,\"decision\":\"allowed\",\"calls\":1,\"errors\":0,\"latency\":[[1,1]]}}]}}"
            )
        };
        for v in [
            "\"a\\x\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"\\u12\"",
            "\"tab\there\"",
            "nul",
            "1",
            "\"unterminated",
        ] {
            let text = cell(v);
            assert!(Rollup::from_json(text.as_bytes()).is_err(), "{text}");
            assert!(serde_json::from_str::<Rollup>(&text).is_err(), "{text}");
        }
        for n in ["01", "1.0", "1e2", "-1", "18446744073709551616"] {
            let text = cell("null").replace("\"calls\":1", &format!("\"calls\":{n}"));
            assert!(Rollup::from_json(text.as_bytes()).is_err(), "{text}");
            assert!(serde_json::from_str::<Rollup>(&text).is_err(), "{text}");
        }
        // Latency pairs, as written or not.
        for (latency, ok) in [
            ("[[1,1]]", true),
            ("[ [ 1 , 1 ] ]", true),
            ("[[0,1]]", true),
            ("[[01,1]]", false),
            ("[[1,01]]", false),
            ("[[1,1.0]]", false),
            ("[[1,1e0]]", false),
            ("[[70000,1]]", false),
            ("[[1,18446744073709551616]]", false),
            ("[[1,1],]", false),
            ("[[1,1]", false),
            ("[[1,1,]]", false),
        ] {
            let text = cell("null").replace("[[1,1]]", latency);
            assert_eq!(Rollup::from_json(text.as_bytes()).is_ok(), ok, "{text}");
            assert_eq!(serde_json::from_str::<Rollup>(&text).is_ok(), ok, "{text}");
        }
        let err = Rollup::from_json(b"{\"format\":\"fsp-stats/1\",\n\"cells\":[{}]}").unwrap_err();
        assert!(err.contains("cell 1") && err.contains("line 2"), "{err}");
        assert!(Rollup::from_json(&[0xff, 0xfe]).is_err());
    }

    fn day(text: &str) -> Date {
        parse_day(text).unwrap()
    }

    #[test]
    fn months_end_on_their_last_day() {
        assert_eq!(month_of(day("2026-02-10")), day("2026-02-01"));
        assert_eq!(month_end(day("2026-02-10")), day("2026-02-28"));
        assert_eq!(month_end(day("2024-02-01")), day("2024-02-29"));
        assert_eq!(month_end(day("2026-12-31")), day("2026-12-31"));
        assert_eq!(month_file_name(day("2026-03-09")), "stats-2026-03.json");
        assert_eq!(month_of_text("2026-03"), Some(day("2026-03-01")));
        assert_eq!(month_of_text("2026-3"), None);
        assert_eq!(month_of_text("2026-03-01"), None);
    }

    #[test]
    fn plans_take_whole_past_months_from_month_rollups() {
        let q = |from, to, by| Query::parse(from, to, by).unwrap();
        // 13 months back from 2026-12-02, kept since 2025-11-01.
        let p = plan(
            &q(None, None, Some("version,consumer")),
            day("2025-11-01"),
            day("2026-12-02"),
        );
        assert_eq!(p.months.len(), 13);
        assert_eq!(
            (p.months[0], p.months[12]),
            (day("2025-11-01"), day("2026-11-01"))
        );
        assert_eq!(p.days, [day("2026-12-01"), day("2026-12-02")]);
        // A range that cuts months: the cut parts by day.
        let p = plan(
            &q(Some("2026-01-15"), Some("2026-03-31"), None),
            day("2020-01-01"),
            day("2026-12-02"),
        );
        assert_eq!(p.months, [day("2026-02-01"), day("2026-03-01")]);
        assert_eq!(p.days.len(), 17);
        // The current month is never whole; by day, no month is.
        let p = plan(
            &q(Some("2026-11-01"), None, None),
            day("2020-01-01"),
            day("2026-11-30"),
        );
        assert_eq!((p.months.len(), p.days.len()), (0, 30));
        let p = plan(
            &q(None, None, Some("day")),
            day("2026-01-01"),
            day("2026-12-02"),
        );
        assert_eq!((p.months.len(), p.days.len()), (0, 336));
        // Nothing kept in the range: nothing to read.
        assert_eq!(
            plan(
                &q(Some("2019-01-01"), Some("2019-12-31"), None),
                day("2020-01-01"),
                day("2026-12-02")
            ),
            Plan::default()
        );
    }

    #[test]
    fn month_rollups_answer_as_their_days_do_and_refuse_what_they_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(11);
        let (oldest, today) = (day("2026-01-15"), day("2026-03-21"));
        let mut days = BTreeMap::new();
        let mut d = oldest;
        while d <= today {
            let mut r = Rollup::new();
            for i in 0..5 {
                let ts = format!("{}T12:00:00.000Z", format_day(d));
                let consumer = ["a", "b"][i % 2];
                let version = ["v1", "v2", "v3"][i % 3];
                r.add(&rec(
                    &ts,
                    Some(consumer),
                    "f/s",
                    version,
                    "allowed",
                    200,
                    rng.latency(10.0, 1.0),
                ));
            }
            write_file(&dir.path().join(day_file_name(d)), &r).unwrap();
            days.insert(d, r);
            d = d.next_day().unwrap();
        }
        let mut feb = MonthRollup::new(day("2026-02-17"));
        assert_eq!(feb.month(), day("2026-02-01"));
        for r in days.values() {
            feb.add_days(r);
        }
        assert_eq!(feb.cells().answer(&Query::default())[0].calls, 28 * 5);
        assert_eq!(feb.cells().days(), [day("2026-02-01")]);
        let feb_path = dir.path().join(month_file_name(feb.month()));
        feb.write_file(&feb_path).unwrap();
        let text = std::fs::read_to_string(&feb_path).unwrap();
        assert!(text.starts_with("{\"format\":\"fsp-stats/1\",\"month\":\"2026-02\",\"cells\":[\n{\"day\":\"2026-02-01\""), "{text}");

        let all: Vec<&Rollup> = days.values().collect();
        for q in [
            by("version,consumer"),
            by(""),
            Query::parse(Some("2026-02-01"), Some("2026-03-10"), Some("code")).unwrap(),
        ] {
            let p = plan(&q, oldest, today);
            assert_eq!(p.months, [day("2026-02-01")], "{q:?}");
            let mut paths: Vec<PathBuf> = p
                .months
                .iter()
                .map(|m| dir.path().join(month_file_name(*m)))
                .collect();
            paths.extend(p.days.iter().map(|d| dir.path().join(day_file_name(*d))));
            let want = answer(all.iter().copied(), &q);
            assert_eq!(answer_files(&paths, &q).unwrap(), want, "{q:?}");
            let mut t = Tally::new(&q);
            t.add_month(&feb).unwrap();
            for d in &p.days {
                t.add_rollup(&days[d]);
            }
            assert_eq!(t.rows(), want, "{q:?}");
        }
        // By day, or over a range that cuts February, the month's roll-up is refused.
        for q in [
            by("day"),
            Query::parse(Some("2026-02-02"), None, None).unwrap(),
            Query::parse(None, Some("2026-02-27"), None).unwrap(),
        ] {
            let err = answer_files(&[&feb_path], &q).unwrap_err();
            assert!(matches!(err, StatsError::Misfit { .. }), "{q:?}: {err}");
            assert!(Tally::new(&q).add_month(&feb).is_err());
        }
        // It is not a day's roll-up.
        let err = read_file(&feb_path).unwrap_err();
        assert!(
            matches!(err, StatsError::Malformed { .. }) && err.to_string().contains("month"),
            "{err}"
        );
        assert!(serde_json::from_str::<Rollup>(&text).is_err());
        // Its cells are on the 1st; `month` comes first, once.
        let cases = [
            text.replacen("\"day\":\"2026-02-01\"", "\"day\":\"2026-02-02\"", 1),
            text.replacen("\"month\":\"2026-02\",", "", 1).replacen(
                "]}",
                "],\"month\":\"2026-02\"}",
                1,
            ),
            text.replacen(
                "\"month\":\"2026-02\",",
                "\"month\":\"2026-02\",\"month\":\"2026-02\",",
                1,
            ),
            text.replacen("\"month\":\"2026-02\"", "\"month\":\"2026-2\"", 1),
        ];
        for bad in cases {
            std::fs::write(&feb_path, &bad).unwrap();
            let err = Tally::new(&by("consumer")).add_file(&feb_path).unwrap_err();
            assert!(matches!(err, StatsError::Malformed { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn answers_from_files_are_the_answers_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(7);
        let mut all = Rollup::new();
        let mut paths = Vec::new();
        for day in 1..=9 {
            let mut r = Rollup::new();
            for i in 0..200 {
                let ts = format!("2026-10-{day:02}T08:00:00.000Z");
                let consumer = format!("c{}", rng.next() % 5);
                let version = format!("v{}", 1 + i % 3);
                let status = [200, 200, 200, 404, 503][(rng.next() % 5) as usize];
                r.add(&rec(
                    &ts,
                    Some(&consumer),
                    "f/s",
                    &version,
                    "allowed",
                    status,
                    rng.latency(15.0, 0.7),
                ));
            }
            let path = dir.path().join(day_file_name(r.days()[0]));
            write_file(&path, &r).unwrap();
            paths.push(path);
            all.merge(&r);
        }
        for q in [
            by("version,consumer"),
            by(""),
            by("day,code"),
            Query::parse(Some("2026-10-03"), Some("2026-10-05"), Some("consumer")).unwrap(),
        ] {
            assert_eq!(answer_files(&paths, &q).unwrap(), all.answer(&q), "{q:?}");
        }
        let none: [PathBuf; 0] = [];
        assert_eq!(answer_files(&none, &Query::default()).unwrap()[0].calls, 0);
        paths.push(dir.path().join("missing.json"));
        assert!(answer_files(&paths, &by("day")).is_err());
    }

    #[test]
    fn by_lists_parse_strictly() {
        assert_eq!(
            Dim::parse_list("version,consumer").unwrap(),
            [Dim::Version, Dim::Consumer]
        );
        assert_eq!(
            Dim::parse_list(" day , code,decision ").unwrap(),
            [Dim::Day, Dim::Code, Dim::Decision]
        );
        assert_eq!(Dim::parse_list("").unwrap(), []);
        assert_eq!(
            Dim::parse_list("consumer,service,version,day,code,decision").unwrap(),
            Dim::ALL
        );
        let unknown = Dim::parse_list("version,customer").unwrap_err();
        assert!(matches!(&unknown, StatsError::UnknownDim { name } if name == "customer"));
        let text = unknown.to_string();
        for d in Dim::ALL {
            assert!(text.contains(d.name()), "{text}");
        }
        assert!(matches!(
            Dim::parse_list("version,consumer,version"),
            Err(StatsError::DuplicateDim("version"))
        ));
        assert!(Dim::parse_list("version,").is_err());
        assert!(Dim::parse_list("Version").is_err());
        assert_eq!("csv".parse::<OutputFormat>().unwrap(), OutputFormat::Csv);
        assert!("xml".parse::<OutputFormat>().is_err());
    }

    fn sample_rows() -> (Vec<Row>, Vec<Dim>) {
        let mut r = Rollup::from_records(trail());
        r.add(&rec(
            D1,
            Some("-1+1"),
            "person/get",
            "v1,5",
            "allowed",
            200,
            1.23456,
        ));
        let q = by("version,consumer");
        (r.answer(&q), q.by)
    }

    #[test]
    fn json_output_has_exactly_the_documented_keys() {
        let (rows, dims) = sample_rows();
        let mut out = Vec::new();
        write_rows(&rows, &dims, OutputFormat::Json, &mut out).unwrap();
        let v: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_slice(&out).unwrap();
        assert_eq!(v.len(), rows.len());
        for o in &v {
            let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                [
                    "calls", "consumer", "errors", "p50_ms", "p95_ms", "p99_ms", "version"
                ]
            );
            assert!(o["calls"].is_u64() && o["errors"].is_u64() && o["p50_ms"].is_f64());
        }
        // Keys come in order: the dimensions as given, then the figures.
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "[\n{\"version\":\"v1\",\"consumer\":\"a\",\"calls\":1,\"errors\":0,\"p50_ms\":"
            ),
            "{text}"
        );
        // A missing consumer is null; milliseconds have three decimals at most.
        let unidentified = v.iter().find(|o| o["consumer"].is_null()).unwrap();
        assert_eq!(unidentified["errors"], 1);
        for o in &v {
            let p = o["p99_ms"].as_f64().unwrap();
            assert_eq!(p, round3(p));
        }
        let mut empty = Vec::new();
        write_rows(&[], &dims, OutputFormat::Json, &mut empty).unwrap();
        assert!(
            serde_json::from_slice::<Vec<serde_json::Value>>(&empty)
                .unwrap()
                .is_empty()
        );
        // The total of an empty range: null percentiles.
        let mut total = Vec::new();
        write_rows(
            &Rollup::new().answer(&Query::default()),
            &[],
            OutputFormat::Json,
            &mut total,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&total).unwrap(),
            serde_json::json!([{"calls": 0, "errors": 0, "p50_ms": null, "p95_ms": null, "p99_ms": null}])
        );
    }

    #[test]
    fn csv_output_has_a_header_quotes_and_defuses() {
        let (rows, dims) = sample_rows();
        let mut out = Vec::new();
        write_rows(&rows, &dims, OutputFormat::Csv, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "version,consumer,calls,errors,p50_ms,p95_ms,p99_ms"
        );
        assert_eq!(lines.len(), rows.len() + 1);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("\"v1,5\",\"'-1+1\",1,0,1.2")),
            "{text}"
        );
        assert!(lines.iter().any(|l| l.starts_with("v3,,1,1,")), "{text}");
        let mut empty = Vec::new();
        write_rows(&[], &[Dim::Day], OutputFormat::Csv, &mut empty).unwrap();
        assert_eq!(empty, b"day,calls,errors,p50_ms,p95_ms,p99_ms\n");
    }

    #[test]
    fn table_output_is_aligned_with_a_header() {
        let (rows, dims) = sample_rows();
        let mut out = Vec::new();
        write_rows(&rows, &dims, OutputFormat::Table, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), rows.len() + 1);
        let header = lines[0];
        assert!(
            header.starts_with("version  consumer  calls  errors"),
            "{text}"
        );
        // Every line is as long as the header: numbers right-aligned under their names.
        for l in &lines {
            assert_eq!(l.chars().count(), header.chars().count(), "{text}");
        }
        let calls_end = header.find("calls").unwrap() + "calls".len();
        for l in &lines[1..] {
            assert!(
                l[..calls_end].ends_with(|c: char| c.is_ascii_digit()),
                "{text}"
            );
            assert_eq!(&l[calls_end..calls_end + 2], "  ", "{text}");
        }
        // The consumer of a refusal before identification shows as `-`.
        assert!(
            lines.iter().any(|l| l.starts_with("v3       -  ")),
            "{text}"
        );
        // Control characters are not sent to the terminal.
        let mut r = Rollup::new();
        r.add(&rec(
            D1,
            Some("x\u{1b}[2J"),
            "s/s",
            "v1",
            "allowed",
            200,
            1.0,
        ));
        let mut out = Vec::new();
        write_rows(
            &r.answer(&by("consumer")),
            &[Dim::Consumer],
            OutputFormat::Table,
            &mut out,
        )
        .unwrap();
        assert!(!out.contains(&0x1b));
    }
}
