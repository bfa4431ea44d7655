//! The file backend's statistics: daily roll-ups ([`crate::stats`]) kept beside the
//! trail, one file per node and day of the calls (`stats-{node}-{YYYY-MM-DD}.json`), and
//! one per node and finished month (`stats-{node}-{YYYY-MM}.json`), which answers long
//! ranges without reading every day.
//!
//! The writer counts the records of each batch once it is written, keeps the cells of
//! yesterday and today in memory, and replaces their files every few seconds (and when
//! it stops). The trail is the truth: on start, the writer counts again from its trail
//! files every day from the day before the last day the node wrote (at most yesterday)
//! to today, so a crash loses no statistic of a day the trail still holds whole. A call's
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
    /// files written since yesterday (`trail`: this node's files and their days;
    /// `retired_through`: the last day whose files retention deleted, from the node's
    /// anchor).
    ///
    /// A writer holds its last two days in memory and writes them out every few
    /// seconds: one that was killed lost up to that much of them. Every day from the day
    /// before the last day the node wrote (at most yesterday: the node may have been
    /// killed and started again days later) is counted again from the trail. A day counted
    /// whole replaces its file; a day some of whose records may be missing from the
    /// count (a file that could not be read, or retired) keeps its file as it is.
    pub(crate) fn start(
        dir: &Path,
        node: &str,
        trail: &[(String, PathBuf)],
        retired_through: Option<Date>,
    ) -> Self {
        let now = today();
        let recent = yesterday();
        // (A file named for a day to come, made while the clock was ahead, says nothing
        // of when the node last wrote.)
        let last_written = trail
            .iter()
            .filter_map(|(day, _)| stats::parse_day(day).ok())
            .filter(|day| *day <= now)
            .max();
        let from = last_written.map_or(recent, |last| {
            recent.min(last.previous_day().unwrap_or(last))
        });
        let since = day_text(from);
        let mut cells = Rollup::new();
        // Days some of whose records may not have been counted: a file holds records of
        // its day and of the day before (calls that went on past midnight).
        let mut partial = BTreeSet::new();
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
                tracing::warn!(error = %e, file = %path.display(), "cannot count the calls of an audit file; the statistics of its days are kept as they were written");
                if let Ok(d) = stats::parse_day(day) {
                    partial.insert(d);
                    partial.extend(d.previous_day());
                }
            }
        }
        let whole = |day: Date| retired_through.is_none_or(|r| day > r) && !partial.contains(&day);
        let mut me = Self {
            dir: dir.to_owned(),
            node: node.to_owned(),
            dirty: BTreeSet::new(),
            cells: Rollup::new(),
            flushed: Instant::now(),
        };
        let mut counted = cells.split_by_day();
        // Yesterday and today are held in memory even without a call counted yet, so
        // that a day's file is never replaced by less than it holds.
        for day in [recent, now] {
            counted.entry(day).or_default();
        }
        let this_month = stats::month_of(now);
        let mut months = BTreeSet::new();
        // A call's record is written on the day it began or later: the files since
        // `from` hold every call of `from` and after. An older day's cells from them are
        // only part of that day: its file already has them.
        for (day, part) in counted.range(from..) {
            let path = me.day_path(*day);
            let held = if whole(*day) {
                // Counted again whole: it replaces the day's file (written directly, not
                // added to what the file holds, whatever the clock does meanwhile).
                if !part.is_empty() {
                    match stats::write_file(&path, part) {
                        Ok(()) if stats::month_of(*day) < this_month => {
                            months.insert(stats::month_of(*day));
                        }
                        Ok(()) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "cannot write a day's statistics counted again from the trail");
                            // Yesterday and today are written again at the next flush.
                            if *day >= recent {
                                me.dirty.insert(*day);
                            }
                        }
                    }
                }
                part.clone()
            } else {
                // The day as the last writer left it: more than a partial count.
                match stats::read_file(&path) {
                    Ok(written) => written,
                    Err(_) => part.clone(),
                }
            };
            if *day >= recent {
                me.cells.merge(&held);
            }
        }
        for month in months {
            if let Err(e) = me.compact(month) {
                tracing::error!(error = %e, month = %month_text(month), "cannot write a month's statistics; until it is, queries over that month may give its earlier figures");
            }
        }
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
                tracing::error!(error = %e, month = %month_text(month), "cannot write a month's statistics; until it is, queries over that month may give its earlier figures (or its days', where it has none)");
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

    fn calls(r: &Rollup) -> u64 {
        r.cells().map(|(_, c)| c.calls()).sum()
    }

    /// A writer killed with its last days' cells not yet written out, and started again
    /// days later, counts those days again from its trail: the statistics lose nothing,
    /// and a finished month's roll-up adds up its days as now written. A day older than
    /// those is left as it is, even when a later file holds some of its calls.
    #[test]
    fn a_node_started_days_after_a_crash_counts_its_last_two_days_again() {
        let dir = tempfile::tempdir().unwrap();
        // The last day of last month: its month is finished, and it is before yesterday
        // unless today is the 1st (then it is yesterday, counted again all the same).
        let last = stats::month_of(today()).previous_day().unwrap();
        let before = last.previous_day().unwrap();
        let older = before - time::Duration::days(3);
        let of_older: Vec<Record> = (20..23).map(|i| call(i, older)).collect();
        let of_before: Vec<Record> = (0..4).map(|i| call(i, before)).collect();
        let of_last: Vec<Record> = (10..15).map(|i| call(i, last)).collect();
        let late = call(30, before.previous_day().unwrap());
        let trail = vec![
            (
                day_text(older),
                trail_file(dir.path(), "older.jsonl", &of_older),
            ),
            // A call of the day before `before` that ended on `before`.
            (
                day_text(before),
                trail_file(
                    dir.path(),
                    "before.jsonl",
                    &[&[late.clone()][..], &of_before[..3]].concat(),
                ),
            ),
            // A call of `before` that ended on `last`.
            (
                day_text(last),
                trail_file(
                    dir.path(),
                    "last.jsonl",
                    &[&of_before[3..], &of_last[..]].concat(),
                ),
            ),
        ];
        let path = |d: Date| dir.path().join(format!("stats-n-{}.json", day_text(d)));
        let read = |d: Date| stats::read_file(&path(d)).unwrap();
        let partial = |r: &[Record]| Rollup::from_records(r[..1].to_vec());
        let written_before = || {
            // What the killed writer had written out: part of each of its two days; an
            // older day's file says what it said.
            stats::write_file(&path(before), &partial(&of_before)).unwrap();
            stats::write_file(&path(last), &partial(&of_last)).unwrap();
            stats::write_file(&path(older), &partial(&of_older)).unwrap();
            let late_day = before.previous_day().unwrap();
            stats::write_file(&path(late_day), &Rollup::from_records([late.clone()])).unwrap();
        };

        written_before();
        drop(Rollups::start(dir.path(), "n", &trail, None));
        assert_eq!(read(before), Rollup::from_records(of_before.clone()));
        assert_eq!(read(last), Rollup::from_records(of_last.clone()));
        assert_eq!(read(older), partial(&of_older));
        assert_eq!(
            read(before.previous_day().unwrap()),
            Rollup::from_records([late.clone()]),
            "a day before the two is not added to"
        );
        let month = dir.path().join(format!(
            "stats-n-{}.json",
            month_text(stats::month_of(last))
        ));
        let whole_month = stats::Query {
            from: None,
            to: None,
            by: Vec::new(),
        };
        let month_calls: u64 = stats::answer_files(&[&month], &whole_month)
            .unwrap()
            .iter()
            .map(|r| r.calls)
            .sum();
        let days_calls: u64 = (1..=last.day())
            .filter_map(|d| last.replace_day(d).ok())
            .filter_map(|d| stats::read_file(&path(d)).ok())
            .map(|r| calls(&r))
            .sum();
        assert_eq!(month_calls, days_calls);

        // Retention took the files through `before`: `before`'s cells from `last`'s file
        // are only part of it, and its roll-up is not replaced by them.
        written_before();
        drop(Rollups::start(dir.path(), "n", &trail[2..], Some(before)));
        assert_eq!(read(before), partial(&of_before));
        assert_eq!(read(last), Rollup::from_records(of_last.clone()));

        // `last`'s file cannot be read: `last` and `before` (whose late calls it holds)
        // keep their files as written.
        written_before();
        let unreadable = dir.path().join("unreadable.jsonl");
        std::fs::create_dir(&unreadable).unwrap();
        let broken = vec![
            trail[0].clone(),
            trail[1].clone(),
            (day_text(last), unreadable),
        ];
        drop(Rollups::start(dir.path(), "n", &broken, None));
        assert_eq!(read(before), partial(&of_before));
        assert_eq!(read(last), partial(&of_last));

        // A file named for a day to come does not hide when the node last wrote.
        written_before();
        let mut ahead = trail.clone();
        ahead.push((
            day_text(today() + time::Duration::days(30)),
            trail_file(dir.path(), "ahead.jsonl", &[]),
        ));
        drop(Rollups::start(dir.path(), "n", &ahead, None));
        assert_eq!(read(before), Rollup::from_records(of_before.clone()));
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
