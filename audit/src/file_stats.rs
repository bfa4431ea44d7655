//! The file backend's statistics: daily roll-ups ([`crate::stats`]) kept beside the
//! trail, one file per node and day of the calls (`stats-{node}-{YYYY-MM-DD}.json`), and
//! one per node and finished month (`stats-{node}-{YYYY-MM}.json`), which answers long
//! ranges without reading every day.
//!
//! The writer counts the records of each batch once it is written, keeps the cells of
//! yesterday and today in memory, and replaces their files every few seconds (and when
//! it stops). The trail is the truth: on start, the writer counts today's and
//! yesterday's calls again from its trail files (and the last two days the node wrote,
//! when that was before yesterday), so a crash loses no statistic. A call's
//! record that comes in for an older day (a call that lasted over a day) is added to
//! that day's file. Writing a day of a finished month writes the month's roll-up again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use time::Date;

use crate::Record;
use crate::stats::{self, MonthRollup, Query, Rollup, Row, StatsError};

/// How often the roll-ups of the days in memory are written while calls come in.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The writer's roll-ups.
#[derive(Debug)]
pub(crate) struct Rollups {
    dir: PathBuf,
    node: String,
    /// Yesterday's and today's cells (and, until written, any older day's).
    cells: Rollup,
    /// The days whose cells changed since they were last written.
    dirty: BTreeSet<Date>,
    flushed: Instant,
}

fn today() -> Date {
    time::OffsetDateTime::now_utc().date()
}

fn yesterday() -> Date {
    today().previous_day().unwrap_or(Date::MIN)
}

/// `YYYY-MM-DD`.
fn day_text(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// `YYYY-MM`.
fn month_text(d: Date) -> String {
    format!("{:04}-{:02}", d.year(), u8::from(d.month()))
}

impl Rollups {
    /// The roll-ups of `node`'s calls of yesterday and today, counted from the trail
    /// files written since yesterday (`trail`: this node's files and their days).
    ///
    /// A writer holds its last two days in memory and writes them out every few
    /// seconds: one that was killed lost up to that much of them. When the node last wrote
    /// before yesterday (it was killed, and started again days later), its last day and
    /// the day before are counted again from the trail too, and their files replaced.
    pub(crate) fn start(dir: &Path, node: &str, trail: &[(String, PathBuf)]) -> Self {
        let recent = yesterday();
        let last_written = trail
            .iter()
            .filter_map(|(day, _)| stats::parse_day(day).ok())
            .max();
        let from = last_written.map_or(recent, |last| {
            recent.min(last.previous_day().unwrap_or(last))
        });
        let since = day_text(from);
        let mut cells = Rollup::new();
        for (day, path) in trail {
            if *day < since {
                continue;
            }
            let read = crate::file::for_each_line(path, |_, line| {
                if let Ok(r) = serde_json::from_slice::<Record>(line) {
                    cells.add(&r);
                }
                Ok::<(), std::io::Error>(())
            });
            if let Err(e) = read {
                tracing::warn!(error = %e, file = %path.display(), "cannot count the calls of an audit file; its statistics are incomplete");
            }
        }
        let mut me = Self {
            dir: dir.to_owned(),
            node: node.to_owned(),
            dirty: BTreeSet::new(),
            cells: Rollup::new(),
            flushed: Instant::now(),
        };
        // A call's record is written on the day it began or later: the files since
        // `from` hold every call of `from` and after. An older day's cells from them are
        // only part of that day: its file already has them.
        let this_month = stats::month_of(today());
        let mut months = BTreeSet::new();
        for (day, part) in cells.split_by_day() {
            // (Unless retention took that day's own files: then these cells are only
            // part of it.)
            let whole = || trail.iter().any(|(d, _)| *d == day_text(day));
            if day >= recent {
                me.cells.merge(&part);
            } else if day >= from && whole() {
                match stats::write_file(&me.day_path(day), &part) {
                    Ok(()) if stats::month_of(day) < this_month => {
                        months.insert(stats::month_of(day));
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "cannot write a day's statistics counted again from the trail");
                    }
                }
            }
        }
        for month in months {
            if let Err(e) = me.compact(month) {
                tracing::error!(error = %e, month = %month_text(month), "cannot write a month's statistics; its days answer instead");
            }
        }
        me.dirty = me.cells.days().into_iter().collect();
        me.flush();
        me
    }

    /// Counts a written batch's cells (gathered as its records were taken).
    pub(crate) fn add(&mut self, batch: &Rollup) {
        if batch.is_empty() {
            return;
        }
        self.dirty.extend(batch.days());
        self.cells.merge(batch);
    }

    /// Writes the changed days when it is time.
    pub(crate) fn tick(&mut self) {
        if !self.dirty.is_empty() && self.flushed.elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// Writes every changed day's roll-up (and the month's, for a finished month), then
    /// forgets the days before yesterday.
    pub(crate) fn flush(&mut self) {
        self.flushed = Instant::now();
        if self.dirty.is_empty() {
            return;
        }
        let from = yesterday();
        let this_month = stats::month_of(today());
        let mut months = BTreeSet::new();
        let mut kept = Rollup::new();
        let mut failed = BTreeSet::new();
        for (day, part) in self.cells.split_by_day() {
            if day >= from {
                kept.merge(&part);
            }
            if !self.dirty.contains(&day) {
                continue;
            }
            let path = self.day_path(day);
            let whole = if day >= from {
                part
            } else {
                // Not in memory from the start: add to what the file holds.
                let mut on_disk = match stats::read_file(&path) {
                    Ok(r) => r,
                    Err(StatsError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        Rollup::new()
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot add to a day's statistics; retried at the next flush");
                        kept.merge(&part);
                        failed.insert(day);
                        continue;
                    }
                };
                on_disk.merge(&part);
                on_disk
            };
            if let Err(e) = stats::write_file(&path, &whole) {
                tracing::error!(error = %e, "cannot write a day's statistics; retried at the next flush");
                if day < from {
                    kept.merge(&whole);
                }
                failed.insert(day);
                continue;
            }
            if stats::month_of(day) < this_month {
                months.insert(stats::month_of(day));
            }
        }
        self.cells = kept;
        self.dirty = failed;
        for month in months {
            if let Err(e) = self.compact(month) {
                tracing::error!(error = %e, month = %month_text(month), "cannot write a month's statistics; its days answer instead");
            }
        }
    }

    /// Writes the roll-up of a finished month from its days' files.
    fn compact(&self, month: Date) -> Result<(), StatsError> {
        let mut whole = MonthRollup::new(month);
        let mut day = month;
        while stats::month_of(day) == month {
            let path = self.day_path(day);
            if path.exists() {
                whole.add_days(&stats::read_file(&path)?);
            }
            match day.next_day() {
                Some(d) => day = d,
                None => break,
            }
        }
        whole.write_file(
            &self
                .dir
                .join(format!("stats-{}-{}.json", self.node, month_text(month))),
        )
    }

    fn day_path(&self, day: Date) -> PathBuf {
        self.dir
            .join(format!("stats-{}-{}.json", self.node, day_text(day)))
    }
}

/// What a roll-up file is, from its name.
enum Kind {
    Day(Date),
    Month(Date),
}

/// `stats-{node}-{YYYY-MM-DD}.json` or `stats-{node}-{YYYY-MM}.json`.
fn parse_name(name: &str) -> Option<(String, Kind)> {
    let rest = name.strip_prefix("stats-")?.strip_suffix(".json")?;
    let date = |text: &str| stats::parse_day(text).ok();
    // Names are read from the directory: sliced with `get`, never at a byte that is
    // not a character's boundary.
    let split = |at: usize| {
        Some((
            rest.get(..rest.len().checked_sub(at + 1)?)?,
            rest.get(rest.len() - at..)?,
        ))
    };
    if let Some((node, day)) = split(10)
        && rest.as_bytes().get(node.len()) == Some(&b'-')
        && let Some(d) = date(day)
    {
        return Some((node.to_owned(), Kind::Day(d)));
    }
    if let Some((node, month)) = split(7)
        && rest.as_bytes().get(node.len()) == Some(&b'-')
        && let Some(d) = date(&format!("{month}-01"))
    {
        return Some((node.to_owned(), Kind::Month(d)));
    }
    None
}

/// Answers a statistics query from the roll-up files in `dir` (every node's): a
/// finished month wholly in the range from its month roll-up where the node has one,
/// every other day from its day roll-up.
pub fn answer(dir: &Path, query: &Query) -> Result<Vec<Row>, StatsError> {
    let io = |source| StatsError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut days: std::collections::HashMap<Date, Vec<PathBuf>> = Default::default();
    let mut months: std::collections::HashMap<(String, Date), PathBuf> = Default::default();
    let mut nodes_of_month: std::collections::HashMap<Date, BTreeSet<String>> = Default::default();
    let mut oldest = today();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        match parse_name(&name) {
            Some((node, Kind::Day(d))) => {
                oldest = oldest.min(d);
                days.entry(d).or_default().push(entry.path());
                nodes_of_month
                    .entry(stats::month_of(d))
                    .or_default()
                    .insert(node);
            }
            Some((node, Kind::Month(m))) => {
                months.insert((node, m), entry.path());
            }
            None => {}
        }
    }
    let plan = stats::plan(query, oldest, today());
    let mut files: Vec<PathBuf> = Vec::new();
    for day in &plan.days {
        files.extend(days.get(day).into_iter().flatten().cloned());
    }
    for month in &plan.months {
        for node in nodes_of_month.get(month).into_iter().flatten() {
            match months.get(&(node.clone(), *month)) {
                Some(path) => files.push(path.clone()),
                // Not compacted: the node's days of that month.
                None => {
                    let mut day = *month;
                    while stats::month_of(day) == *month {
                        let own = format!("stats-{node}-{}.json", day_text(day));
                        files.extend(
                            days.get(&day)
                                .into_iter()
                                .flatten()
                                .filter(|p| p.file_name().is_some_and(|n| n == own.as_str()))
                                .cloned(),
                        );
                        match day.next_day() {
                            Some(d) => day = d,
                            None => break,
                        }
                    }
                }
            }
        }
    }
    stats::answer_files(&files, query)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn call(i: usize, day: Date) -> Record {
        Record {
            message_id: format!("m-{i}"),
            timestamp: format!("{}T23:59:59.000Z", day_text(day)),
            consumer: Some(format!("c-{}", i % 2)),
            decision: "allowed".into(),
            status: 200,
            duration_ms: i as f64,
            node: "n".into(),
            ..Default::default()
        }
    }

    fn trail_file(dir: &Path, name: &str, records: &[Record]) -> PathBuf {
        let mut text = Vec::new();
        for r in records {
            r.write_json(&mut text);
            text.push(b'\n');
        }
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A writer killed with its last days' cells not yet written out, and started again
    /// days later, counts those days again from its trail: the statistics lose nothing.
    /// An older day is left as it is, and so is a day whose own trail file retention took.
    #[test]
    fn a_node_started_days_after_a_crash_counts_its_last_two_days_again() {
        let dir = tempfile::tempdir().unwrap();
        let last = today() - time::Duration::days(3);
        let before = last.previous_day().unwrap();
        let older = before - time::Duration::days(3);
        let of_before: Vec<Record> = (0..4).map(|i| call(i, before)).collect();
        let of_last: Vec<Record> = (10..15).map(|i| call(i, last)).collect();
        let of_older: Vec<Record> = (20..23).map(|i| call(i, older)).collect();
        // A call of `before` ended on `last`: its record is in `last`'s file.
        let trail = vec![
            (
                day_text(older),
                trail_file(dir.path(), "older.jsonl", &of_older),
            ),
            (
                day_text(before),
                trail_file(dir.path(), "before.jsonl", &of_before[..3]),
            ),
            (
                day_text(last),
                trail_file(
                    dir.path(),
                    "last.jsonl",
                    &[&of_before[3..], &of_last[..]].concat(),
                ),
            ),
        ];
        // What the killed writer had written out: part of each of its two days; the
        // older day's file says what it said (whatever the trail holds).
        let path = |d: Date| dir.path().join(format!("stats-n-{}.json", day_text(d)));
        let partial = |r: &[Record]| Rollup::from_records(r[..1].to_vec());
        stats::write_file(&path(before), &partial(&of_before)).unwrap();
        stats::write_file(&path(last), &partial(&of_last)).unwrap();
        stats::write_file(&path(older), &partial(&of_older)).unwrap();

        drop(Rollups::start(dir.path(), "n", &trail));
        let read = |d: Date| stats::read_file(&path(d)).unwrap();
        assert_eq!(read(before), Rollup::from_records(of_before.clone()));
        assert_eq!(read(last), Rollup::from_records(of_last.clone()));
        assert_eq!(read(older), partial(&of_older));
        // The finished month's roll-up, where one was, adds up the days as now written.
        for d in [before, last] {
            let month = stats::month_of(d);
            let file = dir
                .path()
                .join(format!("stats-n-{}.json", month_text(month)));
            if month < stats::month_of(today()) {
                assert!(file.exists(), "{}", file.display());
            }
        }

        // Retention took `before`'s own file: its cells from `last`'s file are only part
        // of it, and its roll-up is not replaced by them.
        stats::write_file(&path(before), &partial(&of_before)).unwrap();
        drop(Rollups::start(dir.path(), "n", &trail[2..]));
        assert_eq!(read(before), partial(&of_before));
        assert_eq!(read(last), Rollup::from_records(of_last));
    }

    #[test]
    fn roll_up_file_names_are_read_back_and_odd_ones_ignored() {
        let day = |n: &str| match parse_name(n) {
            Some((node, Kind::Day(d))) => Some((node, day_text(d))),
            _ => None,
        };
        let month = |n: &str| match parse_name(n) {
            Some((node, Kind::Month(d))) => Some((node, month_text(d))),
            _ => None,
        };
        assert_eq!(
            day("stats-fsp-1-2026-12-02.json"),
            Some(("fsp-1".into(), "2026-12-02".into()))
        );
        assert_eq!(
            month("stats-fsp-1-2026-11.json"),
            Some(("fsp-1".into(), "2026-11".into()))
        );
        for odd in [
            "stats-é2026-12-02.json",
            "stats-2026-12-02.json",
            "stats-x-2026-13-02.json",
            "stats-.json",
            "stats-ééééééééééééé.json",
            "audit-x-2026-12-02.jsonl",
        ] {
            assert!(parse_name(odd).is_none_or(|(n, _)| !n.is_empty()), "{odd}");
        }
    }
}
