//! The embedded audit sink: JSON lines in a directory, one file per UTC day and node
//! (`audit-{node}-{YYYY-MM-DD}.jsonl`).
//!
//! A dedicated thread owns the file. Requests turn their record into its JSON line
//! (on their own thread, where the record's memory is freed cheaply) and hand the line
//! over a bounded channel; they never touch the disk. the thread writes whatever has queued up as one batch, then
//! flushes and `fdatasync`s it, so the cost of syncing is shared by every record in the
//! batch. A write failure marks the sink unhealthy (the gateway, when fail-closed,
//! then refuses calls) and is retried with the next batch.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use crate::{AuditError, AuditSink, Record};

/// Records waiting to be written before `submit` starts refusing them.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Group commit: a batch gathers the records that arrive within this window after its
/// first one, so that under load one `fdatasync` covers many records instead of one.
pub const GROUP_COMMIT_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);
const MAX_BATCH: usize = 8192;

#[derive(Debug)]
struct Shared {
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// JSON-lines audit sink.
#[derive(Debug)]
pub struct FileSink {
    tx: mpsc::Sender<Line>,
    shared: Arc<Shared>,
    capacity: usize,
}

/// Waits for the writer thread to drain and stop, once every [`FileSink`] clone is gone.
#[derive(Debug)]
pub struct FileSinkHandle {
    thread: Option<JoinHandle<()>>,
}

impl FileSinkHandle {
    /// Blocks until every queued record is on disk. Call after dropping the sink.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FileSink {
    /// Opens (creating) `dir` and starts the writer thread for records of `node`.
    pub fn start(dir: &Path, node: &str) -> Result<(Self, FileSinkHandle), AuditError> {
        Self::with_capacity(dir, node, DEFAULT_CAPACITY)
    }

    pub fn with_capacity(
        dir: &Path,
        node: &str,
        capacity: usize,
    ) -> Result<(Self, FileSinkHandle), AuditError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            AuditError::Unavailable(format!(
                "cannot create audit directory {}: {e}",
                dir.display()
            ))
        })?;
        // Fail at start-up, not on the first call, when the directory is not writable.
        let probe = dir.join(".fsp-write-test");
        File::create(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| {
                AuditError::Unavailable(format!(
                    "audit directory {} is not writable: {e}",
                    dir.display()
                ))
            })?;
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
        });
        let writer = Writer {
            dir: dir.to_owned(),
            node: sanitise(node),
            current: None,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("fsp-audit-file".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Unavailable(format!("cannot start audit writer: {e}")))?;
        Ok((
            Self {
                tx,
                shared,
                capacity,
            },
            FileSinkHandle {
                thread: Some(thread),
            },
        ))
    }
}

/// One record, as written: its JSON line and the day it is filed under.
#[derive(Debug)]
struct Line {
    /// `YYYY-MM-DD`, from the record's own timestamp (`None`: it does not start with one).
    day: Option<[u8; 10]>,
    json: Vec<u8>,
}

impl Line {
    fn of(record: &Record) -> Self {
        let day = record
            .timestamp
            .as_bytes()
            .get(..10)
            .filter(|d| d.iter().all(|b| b.is_ascii_digit() || *b == b'-'))
            .and_then(|d| <[u8; 10]>::try_from(d).ok());
        let mut json = Vec::with_capacity(768);
        record.write_json(&mut json);
        json.push(b'\n');
        Self { day, json }
    }

    fn day(&self) -> &str {
        self.day
            .as_ref()
            .and_then(|d| std::str::from_utf8(d).ok())
            .unwrap_or("unknown-day")
    }
}

impl AuditSink for FileSink {
    fn submit(&self, record: Record) -> Result<(), AuditError> {
        self.tx.try_send(Line::of(&record)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AuditError::Backlog(self.capacity),
            mpsc::error::TrySendError::Closed(_) => AuditError::Closed,
        })
    }

    fn health(&self) -> Result<(), AuditError> {
        if self.tx.is_closed() {
            return Err(AuditError::Closed);
        }
        if self.shared.healthy.load(Ordering::Acquire) {
            Ok(())
        } else {
            let why = self
                .shared
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "write failed".into());
            Err(AuditError::Unavailable(why))
        }
    }
}

/// Moves what is queued (up to a batch) into `batch`, without waiting.
fn drain(rx: &mut mpsc::Receiver<Line>, batch: &mut Vec<Line>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
}

/// Keeps a node name safe for use in a file name.
fn sanitise(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

struct Writer {
    dir: PathBuf,
    node: String,
    current: Option<(String, BufWriter<File>)>,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Line>) {
        let mut batch = Vec::with_capacity(1024);
        // `blocking_recv` returns None once every sender is gone and the queue is empty.
        let mut last_write: Option<std::time::Instant> = None;
        while let Some(first) = rx.blocking_recv() {
            let opened = std::time::Instant::now();
            // Busy: the previous batch was moments ago, so more records are coming.
            let busy = last_write.is_some_and(|t| t.elapsed() < GROUP_COMMIT_WINDOW * 5);
            batch.push(first);
            drain(&mut rx, &mut batch);
            // When quiet, a record is written at once; under load the batch stays open
            // for the rest of the window (one sleep, not a polling loop: every wake-up of
            // this thread takes a core from the workers) for the records behind it.
            if busy && batch.len() < MAX_BATCH {
                let left = GROUP_COMMIT_WINDOW.saturating_sub(opened.elapsed());
                if !left.is_zero() {
                    std::thread::sleep(left);
                }
                drain(&mut rx, &mut batch);
            }
            // A failed batch is retried (reopening the file) until it is written, so no
            // record taken by `submit` is lost while the disk is briefly unavailable.
            let mut delay = std::time::Duration::from_millis(50);
            loop {
                match self.write_batch(&batch) {
                    Ok(()) => {
                        self.shared.healthy.store(true, Ordering::Release);
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, dir = %self.dir.display(), "audit write failed; retrying");
                        if let Ok(mut last) = self.shared.last_error.lock() {
                            *last = Some(e.to_string());
                        }
                        self.shared.healthy.store(false, Ordering::Release);
                        self.current = None;
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(std::time::Duration::from_secs(2));
                    }
                }
            }
            batch.clear();
            last_write = Some(std::time::Instant::now());
        }
    }

    fn write_batch(&mut self, batch: &[Line]) -> std::io::Result<()> {
        for line in batch {
            // Records are filed under the day of their own timestamp.
            let file = self.file_for(line.day())?;
            file.write_all(&line.json)?;
        }
        if let Some((_, f)) = self.current.as_mut() {
            f.flush()?;
            f.get_ref().sync_data()?;
        }
        Ok(())
    }

    fn file_for(&mut self, day: &str) -> std::io::Result<&mut BufWriter<File>> {
        let stale = self.current.as_ref().is_none_or(|(d, _)| d != day);
        if stale {
            if let Some((_, mut old)) = self.current.take() {
                old.flush()?;
                old.get_ref().sync_data()?;
            }
            let path = self.dir.join(format!("audit-{}-{day}.jsonl", self.node));
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            self.current = Some((day.to_owned(), BufWriter::with_capacity(256 * 1024, f)));
        }
        match self.current.as_mut() {
            Some((_, f)) => Ok(f),
            None => Err(std::io::Error::other("audit file not open")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(i: usize, day: &str) -> Record {
        Record {
            message_id: format!("m-{i}"),
            timestamp: format!("{day}T10:00:00.000Z"),
            decision: "allowed".into(),
            status: 200,
            node: "n1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_record_taken_is_on_disk_after_join_one_file_per_day() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "node/1").unwrap();
        for i in 0..1000 {
            let day = if i % 2 == 0 {
                "2026-11-24"
            } else {
                "2026-11-25"
            };
            sink.submit(record(i, day)).unwrap();
        }
        assert!(sink.health().is_ok());
        drop(sink);
        handle.join();
        let mut total = 0;
        for day in ["2026-11-24", "2026-11-25"] {
            let text =
                std::fs::read_to_string(dir.path().join(format!("audit-node_1-{day}.jsonl")))
                    .unwrap();
            for line in text.lines() {
                let r: Record = serde_json::from_str(line).unwrap();
                assert!(r.timestamp.starts_with(day));
                total += 1;
            }
        }
        assert_eq!(total, 1000);
    }

    #[test]
    fn a_full_queue_refuses_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::with_capacity(dir.path(), "n", 1).unwrap();
        let refused = (0..10_000)
            .map(|i| sink.submit(record(i, "2026-11-24")))
            .filter(|r| matches!(r, Err(AuditError::Backlog(1))))
            .count();
        assert!(refused > 0, "a queue of one must overflow under a burst");
        drop(sink);
        handle.join();
    }

    #[test]
    fn an_unwritable_directory_fails_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        let err = FileSink::start(&file.join("sub"), "n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("audit directory"), "{err}");
    }
}
