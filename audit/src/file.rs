//! The embedded audit sink: JSON lines in a directory, one file per node and UTC day of
//! writing (`audit-{node}-{YYYY-MM-DD}.jsonl`). A file holds the records in the order
//! they were written (the order of the hash chain); a call that began before midnight
//! and ended after is in the next day's file, with its own timestamp.
//!
//! Each thread that submits records writes their JSON lines into its own buffer (a
//! shard): a call takes one uncontended lock and never touches the disk, and no memory
//! shared with the other worker threads is written per call. A dedicated writer thread
//! collects every shard's lines as one batch, writes them, then flushes and
//! `fdatasync`s, so the cost of syncing is shared by every record in the batch (group
//! commit). When quiet, the first record wakes the writer at once; under load, a batch
//! gathers for [`GROUP_COMMIT_WINDOW`]. A write failure marks the sink unhealthy (the
//! gateway, when fail-closed, then refuses calls) and the batch is retried until written.
//!
//! The writer seals each line into the node's hash chain ([`crate::chain`]) in the order
//! it writes them, continuing after the last record of the node's newest file when it
//! starts; [`verify_dir`] walks the files again and names the first record that does not
//! fit.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::chain::{Break, Chain, Verifier};
use crate::{AuditError, AuditSink, Record};

/// Records one thread may have waiting to be written before `submit` refuses them.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Group commit: under load, a batch gathers the records that arrive within this
/// window, so that one `fdatasync` covers many records instead of one.
pub const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(10);

#[derive(Debug)]
struct Shared {
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Every thread's buffer of lines not yet written.
    shards: Mutex<Vec<Arc<Shard>>>,
    /// The sink was dropped: the writer drains what is left and stops.
    closed: AtomicBool,
    /// The writer is waiting for work: the next record must wake it.
    idle: AtomicBool,
    writer: OnceLock<std::thread::Thread>,
}

impl Shared {
    fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }
}

/// One thread's lines waiting to be written.
#[derive(Debug, Default)]
struct Shard {
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    lines: Vec<u8>,
    records: usize,
}

impl Pending {
    fn clear(&mut self) {
        self.lines.clear();
        self.records = 0;
    }
}

/// Today (UTC) as `YYYY-MM-DD`: the day of the file the writer appends to.
fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// JSON-lines audit sink.
#[derive(Debug)]
pub struct FileSink {
    /// Tells this sink's shards from other sinks' in a thread's list.
    id: u64,
    shared: Arc<Shared>,
    capacity: usize,
}

/// Waits for the writer thread to drain and stop, once the [`FileSink`] is gone.
#[derive(Debug)]
pub struct FileSinkHandle {
    thread: Option<JoinHandle<()>>,
}

impl FileSinkHandle {
    /// Blocks until every record taken is on disk. Call after dropping the sink.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A thread's shard of one sink: the sink's id, the sink (to forget shards of sinks
/// that are gone), and the shard.
type ThreadShard = (u64, Weak<Shared>, Arc<Shard>);

thread_local! {
    /// This thread's shard of each live sink it has written to.
    static SHARDS: RefCell<Vec<ThreadShard>> = const { RefCell::new(Vec::new()) };
}

impl FileSink {
    /// Opens (creating) `dir` and starts the writer thread for records of `node`.
    pub fn start(dir: &Path, node: &str) -> Result<(Self, FileSinkHandle), AuditError> {
        Self::with_capacity(dir, node, DEFAULT_CAPACITY)
    }

    /// As [`FileSink::start`], refusing records once `capacity` of one thread wait.
    pub fn with_capacity(
        dir: &Path,
        node: &str,
        capacity: usize,
    ) -> Result<(Self, FileSinkHandle), AuditError> {
        static IDS: AtomicU64 = AtomicU64::new(0);
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
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            shards: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            writer: OnceLock::new(),
        });
        let node = sanitise(node);
        let chain = Chain::after(last_hash(dir, &node)?);
        let writer = Writer {
            dir: dir.to_owned(),
            node,
            current: None,
            shared: shared.clone(),
            chain,
            sealed: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("fsp-audit-file".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::Unavailable(format!("cannot start audit writer: {e}")))?;
        let _ = shared.writer.set(thread.thread().clone());
        Ok((
            Self {
                id: IDS.fetch_add(1, Ordering::Relaxed),
                shared,
                capacity: capacity.max(1),
            },
            FileSinkHandle {
                thread: Some(thread),
            },
        ))
    }

    /// Runs `f` on the calling thread's shard, making it on first use.
    fn with_shard<T>(&self, f: impl FnOnce(&Shard) -> T) -> T {
        SHARDS.with(|cell| {
            let mut shards = cell.borrow_mut();
            if let Some((_, _, shard)) = shards.iter().find(|(id, _, _)| *id == self.id) {
                return f(shard);
            }
            // Forget the shards of sinks that are gone.
            shards.retain(|(_, sink, _)| sink.strong_count() > 0);
            let shard = Arc::new(Shard::default());
            self.shared
                .shards
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(shard.clone());
            let out = f(&shard);
            shards.push((self.id, Arc::downgrade(&self.shared), shard));
            out
        })
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake_writer();
    }
}

impl AuditSink for FileSink {
    fn submit(&self, record: Record) -> Result<(), AuditError> {
        let first = self.with_shard(|shard| {
            let mut p = shard.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.records >= self.capacity {
                return Err(AuditError::Backlog(self.capacity));
            }
            record.write_json(&mut p.lines);
            p.lines.push(b'\n');
            p.records += 1;
            Ok(p.records == 1)
        })?;
        // A quiet writer is woken by the first record; a busy one comes by itself.
        if first
            && self.shared.idle.load(Ordering::Acquire)
            && self.shared.idle.swap(false, Ordering::AcqRel)
        {
            self.shared.wake_writer();
        }
        Ok(())
    }

    fn health(&self) -> Result<(), AuditError> {
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
    /// The node's hash chain, after the last line written.
    chain: Chain,
    /// The batch's lines, sealed into the chain once and kept until written (a failed
    /// write is retried with the same lines), with the end of each day's part.
    sealed: Vec<(String, Vec<u8>)>,
}

impl Writer {
    fn run(mut self) {
        // The batch being written, and emptied buffers handed back to the shards.
        let mut batch: Vec<Pending> = Vec::new();
        let mut spare: Vec<Pending> = Vec::new();
        loop {
            let closing = self.shared.closed.load(Ordering::Acquire);
            if self.collect(&mut batch, &mut spare) == 0 {
                if closing {
                    break;
                }
                // Announce idleness, then look once more: a record that came in
                // between was not told to wake us.
                self.shared.idle.store(true, Ordering::SeqCst);
                if self.collect(&mut batch, &mut spare) == 0 {
                    std::thread::park_timeout(Duration::from_secs(1));
                    self.shared.idle.store(false, Ordering::SeqCst);
                    continue;
                }
                self.shared.idle.store(false, Ordering::SeqCst);
            }
            // A failed batch is retried (reopening the file) until it is written, so no
            // record taken by `submit` is lost while the disk is briefly unavailable.
            self.seal(&batch);
            let mut delay = Duration::from_millis(50);
            loop {
                match self.write_sealed() {
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
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
            for mut p in batch.drain(..) {
                p.clear();
                spare.push(p);
            }
            // Under load, the next batch gathers for a window (one sleep, not a polling
            // loop: every wake-up of this thread takes a core from the workers).
            if !self.shared.closed.load(Ordering::Acquire) {
                std::thread::sleep(GROUP_COMMIT_WINDOW);
            }
        }
    }

    /// Takes every shard's waiting lines into `batch`; returns how many records.
    fn collect(&self, batch: &mut Vec<Pending>, spare: &mut Vec<Pending>) -> usize {
        let shards = self
            .shared
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut records = 0;
        for shard in shards {
            let mut p = shard.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.records == 0 {
                continue;
            }
            records += p.records;
            let empty = spare.pop().unwrap_or_default();
            batch.push(std::mem::replace(&mut *p, empty));
        }
        records
    }

    /// Seals the batch's lines into the chain, in the order they will be written, all
    /// into today's file.
    fn seal(&mut self, batch: &[Pending]) {
        let mut parts = std::mem::take(&mut self.sealed);
        parts.clear();
        let mut out = Vec::with_capacity(batch.iter().map(|p| p.lines.len() + 256).sum());
        for p in batch {
            for line in p.lines.split_inclusive(|&b| b == b'\n') {
                self.chain.seal_line(line, &mut out);
            }
        }
        parts.push((today(), out));
        self.sealed = parts;
    }

    fn write_sealed(&mut self) -> std::io::Result<()> {
        let parts = std::mem::take(&mut self.sealed);
        let written = self.write_parts(&parts);
        self.sealed = parts;
        written
    }

    fn write_parts(&mut self, parts: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        for (day, lines) in parts {
            self.file_for(day)?.write_all(lines)?;
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

/// The hash of the last record in the node's newest file in `dir`, to continue its chain
/// after a restart (`None` when the node has no record yet).
fn last_hash(dir: &Path, node: &str) -> Result<Option<String>, AuditError> {
    let files = trail_files(dir).map_err(|e| {
        AuditError::Unavailable(format!(
            "cannot list audit directory {}: {e}",
            dir.display()
        ))
    })?;
    let prefix = format!("audit-{node}-");
    let Some(newest) = files.iter().rev().find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(&prefix))
            // The rest is a date: a node whose name starts like another's is not it.
            .is_some_and(|rest| rest.len() == "YYYY-MM-DD.jsonl".len())
    }) else {
        return Ok(None);
    };
    let text = std::fs::read(newest).map_err(|e| {
        AuditError::Unavailable(format!("cannot read audit file {}: {e}", newest.display()))
    })?;
    // The last whole record; a line cut short by a crash is left for `verify` to report.
    Ok(text
        .split(|&b| b == b'\n')
        .rev()
        .filter_map(|l| serde_json::from_slice::<Record>(l).ok())
        .find_map(|r| r.hash))
}

/// The trail's files in `dir`, sorted by name: by node, then by day.
pub fn trail_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// What [`verify_dir`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub files: usize,
    pub records: u64,
}

/// Why a trail does not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read the audit trail: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Broken(#[from] Break),
    #[error("line {line} of {file} is not a whole audit record (cut short, or edited): {why}")]
    NotARecord {
        file: String,
        line: usize,
        why: String,
    },
}

/// Walks every file of the trail in `dir`, each node's files in the order of their days,
/// and checks every record against its node's chain.
pub fn verify_dir(dir: &Path) -> Result<Verified, VerifyError> {
    let files = trail_files(dir)?;
    let mut verifier = Verifier::default();
    for file in &files {
        let text = std::fs::read(file)?;
        let name = file.display().to_string();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let record: Record =
                serde_json::from_slice(line).map_err(|e| VerifyError::NotARecord {
                    file: name.clone(),
                    line: i + 1,
                    why: e.to_string(),
                })?;
            verifier.check(&format!("{name}:{}", i + 1), &record)?;
        }
    }
    Ok(Verified {
        files: files.len(),
        records: verifier.checked(),
    })
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
    fn every_record_taken_is_on_disk_after_join_in_the_file_of_the_day_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "node/1").unwrap();
        // Calls that began on two days (a call may end the day after it began).
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
        let files = trail_files(dir.path()).unwrap();
        let written = format!("audit-node_1-{}.jsonl", today());
        assert!(
            files
                .iter()
                .all(|f| f.file_name().and_then(|n| n.to_str()) == Some(&written)),
            "{files:?}"
        );
        let text = std::fs::read_to_string(&files[0]).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().message_id)
            .collect();
        // In the order they were taken, each with its own timestamp.
        assert_eq!(ids, (0..1000).map(|i| format!("m-{i}")).collect::<Vec<_>>());
        assert_eq!(verify_dir(dir.path()).unwrap().records, 1000);
    }

    #[test]
    fn records_from_many_threads_all_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let sink = &sink;
                s.spawn(move || {
                    for i in 0..2500 {
                        sink.submit(record(t * 10_000 + i, "2026-11-24")).unwrap();
                    }
                });
            }
        });
        drop(sink);
        handle.join();
        let text: String = trail_files(dir.path())
            .unwrap()
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        let mut ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().message_id)
            .collect();
        assert_eq!(ids.len(), 10_000);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 10_000, "every record once");
        // Sealed into one chain in the order written, whatever thread submitted them.
        assert_eq!(
            verify_dir(dir.path()).unwrap(),
            Verified {
                files: 1,
                records: 10_000
            }
        );
        // A new sink on the same directory continues the chain.
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        sink.submit(record(99_999, "2026-11-25")).unwrap();
        drop(sink);
        handle.join();
        assert_eq!(verify_dir(dir.path()).unwrap().records, 10_001);
    }

    #[test]
    fn a_quiet_sink_writes_a_record_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        // (Whichever file the writer chose: a test may run across midnight.)
        let written = || {
            trail_files(dir.path()).unwrap().iter().fold(0, |n, f| {
                n + std::fs::read_to_string(f).map_or(0, |t| t.lines().count())
            })
        };
        for i in 0..3 {
            // Let the writer go idle, then one record must be on disk well before the
            // writer's idle timeout (1 s) would have come by.
            std::thread::sleep(std::time::Duration::from_millis(100));
            sink.submit(record(i, "2026-11-24")).unwrap();
            let start = std::time::Instant::now();
            loop {
                if written() == i + 1 {
                    break;
                }
                assert!(
                    start.elapsed() < std::time::Duration::from_millis(500),
                    "record {i} not written within 500 ms"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        drop(sink);
        handle.join();
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
