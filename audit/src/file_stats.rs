//! The file backend's statistics: daily roll-ups ([`crate::stats`]) kept beside the
//! trail, one file per node and day of the calls (`stats-{node}-{YYYY-MM-DD}.json`), and
//! one per node and finished month (`stats-{node}-{YYYY-MM}.json`), which answers long
//! ranges without reading every day.
//!
//! The writer counts the records of each batch once it is written, keeps the cells of
//! yesterday and today in memory, and replaces their files every few seconds (and when
//! it stops). The trail is the truth: on start, the writer counts today's and
//! yesterday's calls again from its trail files, so a crash loses no statistic. A call's
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
    pub(crate) fn start(dir: &Path, node: &str, trail: &[(String, PathBuf)]) -> Self {
        let mut cells = Rollup::new();
        let since = day_text(yesterday());
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
        // An older day's cells from these files are only part of that day: its file
        // already has them.
        let mut kept = Rollup::new();
        let from = yesterday();
        for (day, part) in cells.split_by_day() {
            if day >= from {
                kept.merge(&part);
            }
        }
        let mut me = Self {
            dir: dir.to_owned(),
            node: node.to_owned(),
            dirty: kept.days().into_iter().collect(),
            cells: kept,
            flushed: Instant::now(),
        };
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
    use super::*;

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
