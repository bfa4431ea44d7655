//! The embedded audit sink: JSON lines in a directory, in segment files per node and UTC
//! day of writing (`audit-{node}-{YYYY-MM-DD}-{NNNNNN}.jsonl`, numbered from 1 each day;
//! a file named `audit-{node}-{YYYY-MM-DD}.jsonl`, as earlier versions wrote, is read as
//! that day's segment 0). Segments hold the records in the order they were written (the
//! order of the hash chain); a call that began before midnight and ended after is in the
//! next day's segment, with its own timestamp. A segment is closed when the next batch
//! would take it past [`SEGMENT_BYTES`], or when the day changes.
//!
//! Each thread that submits records writes their JSON lines into its own buffer (a
//! shard): a call takes one uncontended lock and never touches the disk, and no memory
//! shared with the other worker threads is written per call. A dedicated writer thread
//! collects every shard's lines as one batch and writes them durably (below), so the
//! cost of syncing is shared by every record in the batch (group commit). When quiet,
//! the first record wakes the writer at once; under load, a batch of records nobody
//! waits for gathers for [`GROUP_COMMIT_WINDOW`], and when many callers wait for each
//! sync, the next one starts [`BUSY_SPACING`] after the last began (see
//! [`BUSY_WAITERS`]). A write failure marks the sink unhealthy (the gateway, when
//! fail-closed, then refuses calls) and the batch is retried until written.
//!
//! **Framing.** A record is one line: its JSON object, then a line break; the object's
//! `hash` checks its content (see [`crate::chain`]). The segment being written is made
//! longer in steps of [`ZERO_STEP`] bytes of zeros ahead of its records, so that making
//! a batch durable writes the batch's blocks and nothing else: no file size, no journal
//! commit of the file system, which halves the time a caller waits for its record to be
//! durable. A batch is written with one direct, synchronous write (`O_DIRECT | O_DSYNC`:
//! whole 4 KiB blocks from the start of the last partly filled one, no page cache, the
//! disk's cache flushed before the call returns), which costs the machine a fifth less
//! than a buffered write and `fdatasync` (measured on this project's CI machine); where
//! the file system refuses direct I/O, batches go through the page cache and
//! `fdatasync`. The writer's check before each batch never asks the kernel for a
//! segment's times (see [`Writer::check_in_place`]). Readers stop a line at a zero byte
//! and skip runs of them (JSON text never holds one). A closed segment is cut to its records. After a crash, the
//! writer's start cuts the newest segment after its last whole line before the first
//! zero byte (a batch torn by the crash, whose callers were never told it was durable),
//! keeps the cut bytes in `{segment}.torn` and logs it; every earlier record stays.
//!
//! The directory is the gateway user's alone (0700) and so are the files (0600): records
//! hold national numbers and legal bases. A file removed or replaced under the running
//! writer is noticed before the next batch is written: it goes to a new segment, and the
//! sink stays unhealthy (a fail-closed gateway refuses calls, `/readyz` says why) until
//! the gateway is restarted by an operator who has looked; the break shows in `verify`.
//!
//! The writer seals each line into the node's hash chain ([`crate::chain`]) in the order
//! it writes them, continuing after the last record of the node's newest segment when
//! it starts; [`verify_dir`] walks the segments again and names the first record that
//! does not fit. A chain cannot tell that its last records were removed, so the writer
//! also keeps each node's head ([`Head`], `head-{node}.json`): the last record written,
//! rewritten at most once a second and at a clean stop; verify fails when the trail
//! does not hold it.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::chain::{Break, Chain, Verifier};
use crate::seal::{Seal, Seals, SigningKey, TrustedKeys};
use crate::{AuditError, AuditSink, Durable, DurableTicket, Record};

/// Records one thread may have waiting to be written before `submit` refuses them.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Group commit: under load, a batch gathers the records that arrive within this
/// window, so that one sync covers many records instead of one.
pub const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(10);
/// A segment is closed, and the next begun, before a batch would take it past this size.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The segment being written is made longer by this many bytes of zeros at a time,
/// ahead of its records (see the module documentation).
pub const ZERO_STEP: u64 = 2 * 1024 * 1024;
/// When at least this many callers waited for the last sync, many calls are in flight:
/// the next sync starts [`BUSY_SPACING`] after the last began, so that one sync serves
/// more of them (each costs the machine a disk flush), at a small cost in latency to
/// calls that queue for the processor anyway. Fewer waiters: the next sync starts as
/// soon as the last ends. (Measured with `load-tests/`: spacing syncs whenever 16 callers
/// waited cost a fifth of the throughput at 32 concurrent calls, where the calls wait
/// for the disk more than for the processor; from 48, it gains a few percent at 256.)
pub const BUSY_WAITERS: usize = 48;
/// See [`BUSY_WAITERS`].
pub const BUSY_SPACING: Duration = Duration::from_micros(1000);

#[derive(Debug)]
struct Shared {
    healthy: AtomicBool,
    /// Set for good when a file of the trail was removed or replaced under the writer.
    tampered: OnceLock<String>,
    last_error: Mutex<Option<String>>,
    /// Every thread's buffer of lines not yet written.
    shards: Mutex<Vec<Arc<Shard>>>,
    /// The sink was dropped: the writer drains what is left and stops.
    closed: AtomicBool,
    /// The writer is waiting for work: the next record must wake it.
    idle: AtomicBool,
    /// The writer lets a batch of records that need not be durable at once gather: the
    /// next record that must be wakes it.
    gathering: AtomicBool,
    writer: OnceLock<std::thread::Thread>,
    /// Batches written with a direct write (the others: through the page cache).
    direct_batches: AtomicU64,
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
    /// The callers waiting for some of these lines to be durable.
    tickets: Vec<DurableTicket>,
    /// The statistics of these lines' calls.
    stats: crate::stats::Rollup,
}

impl Pending {
    fn clear(&mut self) {
        self.lines.clear();
        self.records = 0;
        self.tickets.clear();
        self.stats.clear();
    }

    /// Completes the callers' tickets with `result` (through their runtimes' relays).
    fn finish(&mut self, result: &Result<(), String>) {
        for t in self.tickets.drain(..) {
            t.complete(result.clone());
        }
    }
}

/// Today (UTC) as `YYYY-MM-DD`: the day of the file the writer appends to.
#[cfg(test)]
fn today() -> String {
    Today::default().now().to_owned()
}

/// Today's UTC date as `YYYY-MM-DD` (the day of the file the writer appends to),
/// formatted again only when the day changes (the writer asks before every batch).
#[derive(Debug, Default)]
struct Today {
    date: Option<time::Date>,
    text: String,
}

impl Today {
    fn now(&mut self) -> &str {
        let date = time::OffsetDateTime::now_utc().date();
        if self.date != Some(date) {
            self.date = Some(date);
            self.text = day_text(date);
        }
        &self.text
    }
}

/// JSON-lines audit sink.
#[derive(Debug)]
pub struct FileSink {
    /// Tells this sink's shards from other sinks' in a thread's list.
    id: u64,
    shared: Arc<Shared>,
    capacity: usize,
    dir: PathBuf,
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
    /// Opens (creating) `dir` and starts the writer thread for records of `node`; files
    /// are kept forever.
    pub fn start(dir: &Path, node: &str) -> Result<(Self, FileSinkHandle), AuditError> {
        Self::with_capacity(dir, node, DEFAULT_CAPACITY, None)
    }

    /// As [`FileSink::start`], deleting whole files older than `retention_days` (once a
    /// day, and at start).
    pub fn start_with_retention(
        dir: &Path,
        node: &str,
        retention_days: u32,
    ) -> Result<(Self, FileSinkHandle), AuditError> {
        Self::with_capacity(dir, node, DEFAULT_CAPACITY, Some(retention_days))
    }

    /// As [`FileSink::start`], with retention (`None`: files kept forever) and signed
    /// heads and anchors (see [`crate::seal`]): a trail whose head or anchor is not
    /// signed by a key of `seals` is refused.
    pub fn start_sealed(
        dir: &Path,
        node: &str,
        retention_days: Option<u32>,
        seals: Seals,
    ) -> Result<(Self, FileSinkHandle), AuditError> {
        Self::open(
            dir,
            node,
            DEFAULT_CAPACITY,
            retention_days,
            SEGMENT_BYTES,
            true,
            seals,
        )
    }

    /// As [`FileSink::start`], refusing records once `capacity` of one thread wait.
    pub fn with_capacity(
        dir: &Path,
        node: &str,
        capacity: usize,
        retention_days: Option<u32>,
    ) -> Result<(Self, FileSinkHandle), AuditError> {
        Self::open(
            dir,
            node,
            capacity,
            retention_days,
            SEGMENT_BYTES,
            true,
            Seals::default(),
        )
    }

    fn open(
        dir: &Path,
        node: &str,
        capacity: usize,
        retention_days: Option<u32>,
        segment_bytes: u64,
        direct_io: bool,
        seals: Seals,
    ) -> Result<(Self, FileSinkHandle), AuditError> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| {
                AuditError::Unavailable(format!(
                    "cannot create audit directory {} (readable by the gateway's user only): {e}",
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
            tampered: OnceLock::new(),
            last_error: Mutex::new(None),
            shards: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            gathering: AtomicBool::new(false),
            writer: OnceLock::new(),
            direct_batches: AtomicU64::new(0),
        });
        let node = sanitise(node);
        // Before anything of the trail is read or repaired: one writer per node's trail.
        let lock = lock_node(dir, &node, LOCK_WAIT)?;
        repair_tail(dir, &node)?;
        let (last, last_file) = last_hash(dir, &node)?;
        check_head(dir, &node, last.as_deref(), &seals)?;
        let chain = Chain::after(last);
        // The file the chain goes on from, as it is now (see `Writer::resumed_from`).
        let resumed_from = match last_file {
            Some(path) => {
                let identity = file_identity(&path).map_err(|e| {
                    AuditError::Unavailable(format!(
                        "cannot read the audit trail in {}: {e}",
                        dir.display()
                    ))
                })?;
                Some((path, identity))
            }
            None => None,
        };
        let trail = node_files(dir, &node).map_err(|e| {
            AuditError::Unavailable(format!(
                "cannot list the audit trail in {}: {e}",
                dir.display()
            ))
        })?;
        // An anchor that cannot be read leaves no day known whole: the statistics' files
        // are kept as they were written.
        let unknown = Some(time::OffsetDateTime::now_utc().date());
        let retired_through = match Anchor::read(dir, &node) {
            Ok(None) => None,
            Ok(Some(a)) => crate::stats::parse_day(&a.retired_through).ok().or(unknown),
            Err(_) => unknown,
        };
        let rollups = crate::file_stats::Rollups::start(dir, &node, &trail, retired_through);
        // Closed segments without a lookup index that fits them (written by an earlier
        // version, an index a stop cut short, deleted, or left by another file of that
        // name) get one; the newest may be written on, and is indexed when it is closed.
        index_in_background(
            trail
                .iter()
                .rev()
                .skip(1)
                .map(|(_, p)| p.clone())
                .filter(|p| !crate::file_index::fits(p))
                .map(IndexJob::Read)
                .collect(),
            true,
        );
        let writer = Writer {
            dir: dir.to_owned(),
            node,
            current: None,
            shared: shared.clone(),
            chain,
            sealed: (String::new(), Vec::new()),
            sealed_keys: Vec::new(),
            today: Today::default(),
            retention_days,
            retired_on: None,
            head_at: None,
            head_pending: false,
            rollups,
            last_segment: None,
            segment_bytes,
            direct_io,
            resumed_from,
            _lock: lock,
            signing: seals.key.clone(),
        };
        let marked = shared.clone();
        let guard = crate::WriterGuard(move |why: &str| {
            let _ = marked.tampered.set(why.to_owned());
            marked.healthy.store(false, Ordering::Release);
        });
        let thread = std::thread::Builder::new()
            .name("fsp-audit-file".into())
            .spawn(move || {
                let _guard = guard;
                writer.run();
            })
            .map_err(|e| AuditError::Unavailable(format!("cannot start audit writer: {e}")))?;
        let _ = shared.writer.set(thread.thread().clone());
        Ok((
            Self {
                id: IDS.fetch_add(1, Ordering::Relaxed),
                shared,
                capacity: capacity.max(1),
                dir: dir.to_owned(),
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

impl FileSink {
    /// Queues a record's line on this thread's shard, with the ticket of a caller that
    /// waits for it to be durable.
    fn take(&self, record: &Record, ticket: Option<DurableTicket>) -> Result<(), AuditError> {
        let durable = ticket.is_some();
        let first = self.with_shard(|shard| {
            let mut p = shard.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.records >= self.capacity {
                return Err(AuditError::Backlog(self.capacity));
            }
            record.write_json(&mut p.lines);
            p.lines.push(b'\n');
            p.records += 1;
            if let Some(t) = ticket {
                p.tickets.push(t);
            }
            p.stats.add(record);
            Ok(p.records == 1)
        })?;
        // A quiet writer is woken by the first record; a busy one comes by itself, and
        // one gathering a batch is woken by a caller that waits.
        if (first
            && self.shared.idle.load(Ordering::Acquire)
            && self.shared.idle.swap(false, Ordering::AcqRel))
            || (durable
                && self.shared.gathering.load(Ordering::Acquire)
                && self.shared.gathering.swap(false, Ordering::AcqRel))
        {
            self.shared.wake_writer();
        }
        Ok(())
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake_writer();
    }
}

impl AuditSink for FileSink {
    fn stats(&self, query: &crate::stats::Query) -> Result<Vec<crate::stats::Row>, AuditError> {
        crate::file_stats::answer(&self.dir, query)
            .map_err(|e| AuditError::Unavailable(format!("cannot read the statistics: {e}")))
    }

    fn lookup(&self, message_id: &str) -> Result<Option<Record>, AuditError> {
        find(&self.dir, message_id).map_err(|e| {
            AuditError::Unavailable(format!(
                "cannot read the audit trail in {}: {e}",
                self.dir.display()
            ))
        })
    }

    fn submit(&self, record: Record) -> Result<(), AuditError> {
        self.take(&record, None)
    }

    fn submit_durable(&self, record: &Record) -> Result<Durable, AuditError> {
        let (durable, ticket) = Durable::pending();
        self.take(record, Some(ticket))?;
        Ok(durable)
    }

    fn queue_depth(&self) -> usize {
        let shards = self
            .shared
            .shards
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        shards
            .iter()
            .map(|shard| shard.pending.lock().map(|p| p.records).unwrap_or(0))
            .sum()
    }

    fn health(&self) -> Result<(), AuditError> {
        if let Some(why) = self.shared.tampered.get() {
            return Err(AuditError::Unavailable(why.clone()));
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

/// Opens a segment of `len` bytes again for direct writes, with the bytes of its last
/// partly filled block. `None` where the file system refuses direct I/O (buffered writes
/// and `fdatasync` are used there).
fn open_direct(
    path: &Path,
    file: &File,
    identity: (u64, u64),
    len: u64,
) -> std::io::Result<(Option<File>, Vec<u8>)> {
    let direct = match open_for_direct_writes(path) {
        Ok(f) => f,
        Err(e) if refuses_direct_io(&e) => {
            tracing::info!(file = %path.display(), "the file system refuses direct writes: audit batches are written through the page cache and synced");
            return Ok((None, Vec::new()));
        }
        Err(e) => return Err(e),
    };
    // Both descriptors must be of the same file (the path could have been swapped
    // between the two opens).
    let meta = direct.metadata()?;
    if (meta.dev(), meta.ino()) != identity {
        return Err(std::io::Error::other(format!(
            "audit file {} was replaced while it was being opened",
            path.display()
        )));
    }
    let start = len / BLOCK * BLOCK;
    let mut tail = vec![0; (len - start) as usize];
    file.read_exact_at(&mut tail, start)?;
    Ok((Some(direct), tail))
}

/// Opens `path` for direct, synchronous writes (`O_DIRECT | O_DSYNC`).
fn open_for_direct_writes(path: &Path) -> std::io::Result<File> {
    let flags = rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::DSYNC;
    OpenOptions::new()
        .write(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
}

/// Whether `e` is the file system refusing direct I/O (at open, or a write whose
/// alignment it does not take).
fn refuses_direct_io(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// The device and inode numbers of the file at `path` (symbolic links followed), asking
/// the kernel for nothing else: see [`Writer::check_in_place`].
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use rustix::fs::{AtFlags, CWD, StatxFlags, makedev, statx};
    match statx(CWD, path, AtFlags::empty(), StatxFlags::INO) {
        Ok(st) => Ok((makedev(st.stx_dev_major, st.stx_dev_minor), st.stx_ino)),
        Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::NOTDIR => Err(e.into()),
        // A kernel without `statx` (before 4.11) or a sandbox that denies it: `stat`.
        Err(_) => std::fs::metadata(path).map(|m| (m.dev(), m.ino())),
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

/// The segment being written.
struct Segment {
    day: String,
    path: PathBuf,
    file: File,
    /// Where its records end (the next batch goes there).
    written: u64,
    /// How long the file is: zeros from `written` on.
    zeroed: u64,
    /// The same file opened for direct, synchronous writes (see [`Segment::write_direct`]),
    /// when the file system allows it.
    direct: Option<File>,
    /// The bytes of the last partly filled block, from its start to `written`.
    tail: Vec<u8>,
    /// The file's device and inode numbers (see [`Writer::check_in_place`]).
    identity: (u64, u64),
    /// Where a direct write's block-aligned copy is made.
    aligned: Vec<u8>,
    /// The lookup index entries (message id key, offset) of the lines written, when the
    /// segment was begun by this writer (`None`: it went on after a restart, and its
    /// index is made by reading it again).
    index: Option<Vec<(u64, u64)>>,
}

/// The block size direct writes are aligned to (a multiple of any disk's logical block).
const BLOCK: u64 = 4096;

impl Segment {
    /// Makes the file at least `end` bytes long, in steps of [`ZERO_STEP`] bytes of
    /// zeros written after what it holds: synced here when batches are written directly
    /// (they never change the file's length), else by the batch's `fdatasync`.
    fn zero_to(&mut self, end: u64) -> std::io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        if end <= self.zeroed {
            return Ok(());
        }
        let target = end.div_ceil(ZERO_STEP) * ZERO_STEP;
        let mut at = self.zeroed;
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        if self.direct.is_some() {
            // Direct writes sync only their own blocks: the zeros and the file's new
            // length must be durable before them.
            self.file.sync_all()?;
        }
        self.zeroed = target;
        Ok(())
    }

    /// Writes `lines` at `written` through the direct descriptor (`O_DIRECT | O_DSYNC`):
    /// whole blocks from the start of the last partly filled one (its earlier bytes
    /// written again, unchanged) to the end of the lines, padded with the zeros the file
    /// already holds there. One system call, durable when it returns, through no page
    /// cache. The bytes written again are the ones already there, so a write torn by a
    /// crash (a disk writes one sector whole, not a whole block) changes only bytes of
    /// the batch, which was never reported durable and is cut on start.
    fn write_direct(&mut self, lines: &[u8]) -> std::io::Result<bool> {
        let Some(direct) = &self.direct else {
            return Ok(false);
        };
        let start = self.written - self.tail.len() as u64;
        let len = self.tail.len() + lines.len();
        let padded = (len as u64).div_ceil(BLOCK) as usize * BLOCK as usize;
        // The buffer only grows (zeroing all of it for every batch was about 7 % of
        // the writer's time): the end of the last block, past the lines, is zeroed here.
        if self.aligned.len() < padded + BLOCK as usize {
            self.aligned.resize(padded + BLOCK as usize, 0);
        }
        let off = self.aligned.as_ptr().align_offset(BLOCK as usize);
        let buf = &mut self.aligned[off..off + padded];
        buf[..self.tail.len()].copy_from_slice(&self.tail);
        buf[self.tail.len()..len].copy_from_slice(lines);
        buf[len..].fill(0);
        if let Err(e) = direct.write_all_at(buf, start) {
            if !refuses_direct_io(&e) {
                return Err(e);
            }
            // A file system that opens files for direct I/O but wants another
            // alignment: this segment goes on through the page cache.
            tracing::warn!(error = %e, file = %self.path.display(), "direct write refused: audit batches are written through the page cache and synced");
            self.direct = None;
            return Ok(false);
        }
        // The new last partly filled block: the old one grown, or the end of `lines`.
        let whole = ((self.written + lines.len() as u64) / BLOCK * BLOCK - start) as usize;
        if whole == 0 {
            self.tail.extend_from_slice(lines);
        } else {
            let from = whole - self.tail.len();
            self.tail.clear();
            self.tail.extend_from_slice(&lines[from..]);
        }
        Ok(true)
    }

    /// Cuts the file to its records and syncs it: a closed segment holds no zeros.
    fn close(self) -> std::io::Result<()> {
        if self.zeroed != self.written {
            self.file.set_len(self.written)?;
        }
        self.file.sync_all()
    }
}

struct Writer {
    dir: PathBuf,
    node: String,
    current: Option<Segment>,
    /// The last segment begun (its day and number), so that a segment removed under
    /// the writer does not get its number again.
    last_segment: Option<(String, u32)>,
    /// See [`SEGMENT_BYTES`] (smaller in tests).
    segment_bytes: u64,
    /// Batches are written with direct, synchronous writes where the file system allows
    /// them (see [`Segment::write_direct`]); `false` only in tests of the other way.
    direct_io: bool,
    shared: Arc<Shared>,
    /// The node's hash chain, after the last line written.
    chain: Chain,
    /// The day of the file the batch goes to, and its lines, sealed into the chain once
    /// and kept until written (a failed write is retried with the same lines).
    sealed: (String, Vec<u8>),
    /// The lookup index entries of the sealed lines: message id key, and where the line
    /// starts in them.
    sealed_keys: Vec<(u64, u64)>,
    today: Today,
    /// Files older than this many days are deleted (`None`: kept forever).
    retention_days: Option<u32>,
    /// The day retention last ran.
    retired_on: Option<String>,
    /// The statistics of the calls written.
    rollups: crate::file_stats::Rollups,
    /// When the node's head (see [`Head`]) was last written, and whether records were
    /// written since.
    head_at: Option<std::time::Instant>,
    head_pending: bool,
    /// Until the first batch is written: the file holding the node's last record when
    /// the writer started, and its identity then. The chain goes on from that record, so
    /// that file removed or replaced before anything was written on (right after a
    /// restart) is tampering too, as is the file being written.
    resumed_from: Option<(PathBuf, (u64, u64))>,
    /// The node's trail lock (see [`lock_node`]), let go of when the writer ends.
    _lock: Option<File>,
    /// Signs the heads and anchors the writer writes (`[audit] signing_key`).
    signing: Option<Arc<SigningKey>>,
}

/// How long a starting writer waits for its node's trail lock: a gateway that is
/// stopping lets go of it once its writer has written its last batch.
const LOCK_WAIT: Duration = Duration::from_secs(15);

/// Takes the lock of `node`'s trail in `dir` (`lock-{node}`, an exclusive `flock`), so
/// that two gateways given the same node name and directory (a copied configuration, a
/// shared volume) never write one chain at once, which would break it for good. Waits
/// up to `wait` for a gateway that is stopping. Where the file system has no locks, the
/// trail goes on without (logged).
fn lock_node(dir: &Path, node: &str, wait: Duration) -> Result<Option<File>, AuditError> {
    use rustix::fs::{FlockOperation, flock};
    let path = dir.join(format!("lock-{node}"));
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| {
            AuditError::Unavailable(format!(
                "cannot open the audit lock {}: {e}",
                path.display()
            ))
        })?;
    let began = std::time::Instant::now();
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(Some(file)),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                if began.elapsed() >= wait {
                    return Err(AuditError::Unavailable(format!(
                        "another gateway is writing the audit trail of node {node} in {} (it holds {}): give each gateway its own node name, or stop the other one",
                        dir.display(),
                        path.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(error = %e, file = %path.display(), "the audit directory's file system takes no locks: make sure no two gateways share a node name on it");
                return Ok(None);
            }
        }
    }
}

impl Writer {
    fn run(mut self) {
        // The batch being written, and emptied buffers handed back to the shards.
        let mut batch: Vec<Pending> = Vec::new();
        let mut spare: Vec<Pending> = Vec::new();
        // When the last sync began, if many callers waited for it (see BUSY_WAITERS).
        let mut busy_since: Option<std::time::Instant> = None;
        loop {
            self.retire();
            if let Some(began) = busy_since.take() {
                let next = began + BUSY_SPACING;
                let now = std::time::Instant::now();
                if next > now && !self.shared.closed.load(Ordering::Acquire) {
                    std::thread::sleep(next - now);
                }
            }
            let closing = self.shared.closed.load(Ordering::Acquire);
            if self.collect(&mut batch, &mut spare) == 0 {
                if closing {
                    // The last segment's index is written before the gateway stops, and
                    // the head names its last record.
                    self.write_head();
                    self.close(Indexing::Now);
                    self.rollups.flush();
                    break;
                }
                // Announce idleness, then look once more: a record that came in
                // between was not told to wake us.
                self.shared.idle.store(true, Ordering::SeqCst);
                if self.collect(&mut batch, &mut spare) == 0 {
                    std::thread::park_timeout(Duration::from_secs(1));
                    self.shared.idle.store(false, Ordering::SeqCst);
                    // Quiet or not, a removed file is noticed within a second, and the
                    // head names the last record within a second.
                    self.check_in_place();
                    self.rollups.tick();
                    if self.head_pending && self.head_at.is_none_or(|at| at.elapsed() >= HEAD_EVERY)
                    {
                        self.write_head();
                    }
                    continue;
                }
                self.shared.idle.store(false, Ordering::SeqCst);
            }
            // A failed batch is retried (reopening the file) until it is written, so no
            // record taken by `submit` is lost while the disk is briefly unavailable.
            // Callers waiting for durability are told of the first failure at once (their
            // calls are refused, not forwarded); their lines are still written when the
            // disk comes back, followed by the refusal.
            let waiting: usize = batch.iter().map(|p| p.tickets.len()).sum();
            let waited = waiting > 0;
            if waiting >= BUSY_WAITERS {
                busy_since = Some(std::time::Instant::now());
            }
            self.seal(&batch);
            let mut delay = Duration::from_millis(50);
            loop {
                // Before writing: a file removed since the last batch must not swallow
                // this one.
                self.check_in_place();
                match self.write_sealed() {
                    Ok(()) => {
                        self.shared.healthy.store(true, Ordering::Release);
                        for p in &mut batch {
                            p.finish(&Ok(()));
                        }
                        break;
                    }
                    Err(e) => {
                        let failed = Err(format!("the audit trail cannot be written: {e}"));
                        for p in &mut batch {
                            p.finish(&failed);
                        }
                        metrics::counter!("fsp_audit_backend_errors_total", "backend" => "file")
                            .increment(1);
                        tracing::error!(error = %e, dir = %self.dir.display(), "audit write failed; retrying");
                        if let Ok(mut last) = self.shared.last_error.lock() {
                            *last = Some(e.to_string());
                        }
                        self.shared.healthy.store(false, Ordering::Release);
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
            for mut p in batch.drain(..) {
                self.rollups.add(&p.stats);
                p.clear();
                spare.push(p);
            }
            self.rollups.tick();
            self.head_pending = true;
            if self.head_at.is_none_or(|at| at.elapsed() >= HEAD_EVERY) {
                self.write_head();
            }
            // Under load, the next batch gathers for a window (one wait, not a polling
            // loop: every wake-up of this thread takes a core from the workers), unless
            // callers wait for their records: then the sync just done was the window, and
            // a caller that comes during the window ends it.
            if !waited && !self.shared.closed.load(Ordering::Acquire) {
                self.shared.gathering.store(true, Ordering::SeqCst);
                if !self.any_ticket_waits() {
                    std::thread::park_timeout(GROUP_COMMIT_WINDOW);
                }
                self.shared.gathering.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Writes the node's head: the last record written (durable: every batch is synced
    /// before this runs). A failure is logged; the next batch tries again.
    fn write_head(&mut self) {
        let Some(last_hash) = self.chain.last() else {
            return;
        };
        let lines = &self.sealed.1;
        let last_line = lines[..lines.len().saturating_sub(1)]
            .rsplit(|b| *b == b'\n')
            .next()
            .unwrap_or_default();
        let Some(message_id) = crate::file_index::message_id_of(last_line) else {
            return;
        };
        let head = Head {
            node: self.node.clone(),
            message_id: String::from_utf8_lossy(message_id).into_owned(),
            last_hash: last_hash.to_owned(),
            written_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            day: Some(self.sealed.0.clone()),
            key: None,
            signature: None,
        };
        let mut head = head;
        head.sign(self.signing.as_deref());
        match head.write(&self.dir) {
            Ok(()) => {
                self.head_at = Some(std::time::Instant::now());
                self.head_pending = false;
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "the audit trail's head could not be written");
            }
        }
    }

    /// Whether a caller waits for a record not yet taken (checked after announcing a
    /// gathering window: one that came before was not told to wake us).
    fn any_ticket_waits(&self) -> bool {
        let shards = self
            .shared
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        shards.iter().any(|s| {
            !s.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .tickets
                .is_empty()
        })
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
    /// into today's segment.
    fn seal(&mut self, batch: &[Pending]) {
        let (day, out) = &mut self.sealed;
        let today = self.today.now();
        if day != today {
            day.clear();
            day.push_str(today);
        }
        out.clear();
        self.sealed_keys.clear();
        for p in batch {
            let mut start = 0;
            for end in memchr::memchr_iter(b'\n', &p.lines) {
                let line = &p.lines[start..=end];
                if let Some(k) = crate::file_index::line_key(line) {
                    self.sealed_keys.push((k, out.len() as u64));
                }
                self.chain.seal_line(line, out);
                start = end + 1;
            }
        }
    }

    fn write_sealed(&mut self) -> std::io::Result<()> {
        let (day, lines) = std::mem::take(&mut self.sealed);
        let keys = std::mem::take(&mut self.sealed_keys);
        let written = self.write_lines(&day, &lines, &keys);
        self.sealed = (day, lines);
        self.sealed_keys = keys;
        written
    }

    /// Writes a batch where the segment's records end and syncs it. A failed write
    /// leaves `written` where it was: the retried batch (the same sealed lines) goes to
    /// the same place, over whatever part of it reached the file, so no line is written
    /// twice or half.
    fn write_lines(&mut self, day: &str, lines: &[u8], keys: &[(u64, u64)]) -> std::io::Result<()> {
        let seg = self.segment_for(day, lines.len() as u64)?;
        let end = seg.written + lines.len() as u64;
        seg.zero_to(end)?;
        let direct = seg.write_direct(lines)?;
        if !direct {
            seg.file.write_all_at(lines, seg.written)?;
            seg.file.sync_data()?;
        }
        if let Some(entries) = &mut seg.index {
            entries.extend(keys.iter().map(|(k, at)| (*k, seg.written + at)));
        }
        seg.written = end;
        if direct {
            self.shared.direct_batches.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The segment a batch of `len` bytes of `day` goes to: the one being written, or a
    /// new one when the day changed or the batch would take it past its size.
    fn segment_for(&mut self, day: &str, len: u64) -> std::io::Result<&mut Segment> {
        let fits =
            |s: &Segment| s.day == day && (s.written == 0 || s.written + len <= self.segment_bytes);
        if !self.current.as_ref().is_some_and(fits) {
            self.close(Indexing::Background);
            let seq = match &self.last_segment {
                Some((d, n)) if d == day => (n + 1).max(self.next_seq_on_disk(day)?),
                // The writer's first segment: a restarted gateway goes on in the node's
                // newest segment (cut to its records on start) while it has room.
                None => match self.newest_with_room(day)? {
                    Some(seq) => seq,
                    None => self.next_seq_on_disk(day)?,
                },
                Some(_) => self.next_seq_on_disk(day)?,
            };
            let path = self.dir.join(segment_name(&self.node, day, seq));
            // (Not truncated: a restarted writer goes on after the records it holds.)
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
            // A file made before (or by hand) is the gateway user's alone too.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            let meta = file.metadata()?;
            let (len, identity) = (meta.len(), (meta.dev(), meta.ino()));
            // Going on in the file the chain goes on from: it must be that file still
            // (not one made again at its path since it was checked).
            if let Some((resumed, was)) = self.resumed_from.take()
                && resumed == path
                && was != identity
            {
                self.tampered(&path, "which holds the last record the gateway goes on from, was removed or replaced after the gateway started");
            }
            File::open(&self.dir)?.sync_all()?;
            self.last_segment = Some((day.to_owned(), seq));
            let (direct, tail) = if self.direct_io {
                open_direct(&path, &file, identity, len)?
            } else {
                (None, Vec::new())
            };
            self.current = Some(Segment {
                day: day.to_owned(),
                path,
                file,
                written: len,
                zeroed: len,
                direct,
                tail,
                identity,
                aligned: Vec::new(),
                index: (len == 0).then(Vec::new),
            });
        }
        self.current
            .as_mut()
            .ok_or_else(|| std::io::Error::other("audit segment not open"))
    }

    /// The number of the node's newest segment if it is of `day` and has room for more
    /// records.
    fn newest_with_room(&self, day: &str) -> std::io::Result<Option<u32>> {
        let Some((newest, path)) = node_segments(&self.dir, &self.node)?.pop() else {
            return Ok(None);
        };
        let room = newest.day == day
            && newest.seq > 0
            && std::fs::metadata(&path)?.len() < self.segment_bytes;
        Ok(room.then_some(newest.seq))
    }

    /// The number after the highest of the node's segments of `day` in the directory.
    fn next_seq_on_disk(&self, day: &str) -> std::io::Result<u32> {
        Ok(node_segments(&self.dir, &self.node)?
            .iter()
            .map(|(f, _)| f)
            .filter(|f| f.day == day)
            .map(|f| f.seq + 1)
            .max()
            .unwrap_or(1))
    }

    /// Closes the segment being written (when the next begins, and at the end), and has
    /// its lookup index written as `index` says.
    fn close(&mut self, index: Indexing) {
        if let Some(mut seg) = self.current.take() {
            let (path, covered, entries) = (seg.path.clone(), seg.written, seg.index.take());
            // Its records are durable (each batch was synced): a failure loses only the
            // cut of its zeros, which readers skip.
            if let Err(e) = seg.close() {
                tracing::warn!(error = %e, file = %path.display(), "audit segment could not be cut to its records when closed");
                return;
            }
            let job = match entries {
                Some(entries) => IndexJob::Entries(path, entries, covered),
                None => IndexJob::Read(path),
            };
            match index {
                Indexing::Now => job.run(),
                Indexing::Background => index_in_background(vec![job], false),
                Indexing::None => {}
            }
        }
    }

    /// Deletes the node's files older than the retention period, once a day. The chain
    /// goes on across them: the hash of the last record retired is kept first, in the
    /// node's retirement anchor (see [`Anchor`]), and `verify` starts from it.
    fn retire(&mut self) {
        let Some(days) = self.retention_days else {
            return;
        };
        let today = self.today.now();
        if self.retired_on.as_deref() == Some(today) {
            return;
        }
        self.retired_on = Some(today.to_owned());
        let cutoff = day_text(days_before_today(days));
        let old: Vec<(String, PathBuf)> = match node_files(&self.dir, &self.node) {
            Ok(files) => files.into_iter().filter(|(d, _)| *d < cutoff).collect(),
            Err(e) => {
                tracing::error!(error = %e, "audit retention cannot list the trail");
                return;
            }
        };
        let Some((newest_day, newest)) = old.last() else {
            return;
        };
        let anchor = match last_record(newest) {
            Ok(Some(r)) => Anchor {
                node: r.node,
                retired_through: newest_day.clone(),
                last_hash: r.hash,
                key: None,
                signature: None,
            },
            Ok(None) => Anchor {
                node: self.node.clone(),
                retired_through: newest_day.clone(),
                last_hash: None,
                key: None,
                signature: None,
            },
            Err(e) => {
                tracing::error!(error = %e, file = %newest.display(), "audit retention cannot read the file it would retire; nothing retired");
                return;
            }
        };
        let mut anchor = anchor;
        anchor.sign(self.signing.as_deref());
        if let Err(e) = anchor.write(&self.dir, &self.node) {
            tracing::error!(error = %e, "audit retention cannot keep the chain's anchor; nothing retired");
            return;
        }
        // The file being written (a node quiet for days may still hold one open) is
        // closed first, so that its removal is not taken for tampering.
        if self.current.as_ref().is_some_and(|s| s.day < cutoff) {
            self.close(Indexing::None);
        }
        for (_, path) in &old {
            // Retired, not tampered with (the anchor goes on from its last record).
            if self.resumed_from.as_ref().is_some_and(|(p, _)| p == path) {
                self.resumed_from = None;
            }
            match std::fs::remove_file(path) {
                Ok(()) => {
                    crate::file_index::remove(path);
                    tracing::info!(file = %path.display(), retention_days = days, "audit file retired")
                }
                Err(e) => {
                    tracing::error!(error = %e, file = %path.display(), "audit file could not be retired")
                }
            }
        }
    }

    /// Whether the file being written is still the one at its path; if it was removed or
    /// replaced, the sink turns unhealthy for good and the batch about to be written
    /// starts a new file.
    fn check_in_place(&mut self) {
        let Some(seg) = &self.current else {
            if let Some((path, identity)) = &self.resumed_from
                && file_identity(path).ok() != Some(*identity)
            {
                let path = path.clone();
                self.resumed_from = None;
                self.tampered(&path, "which holds the last record the gateway goes on from, was removed or replaced after the gateway started");
            }
            return;
        };
        // Only the path's identity is asked for: a query of the file's times would make
        // the kernel (multigrain timestamps, Linux 6.13+) give the next write a new
        // fine-grained modification time, and every sync would write the inode too
        // (measured: a third more CPU and latency per sync).
        let moved = match file_identity(&seg.path) {
            Ok(at_path) => at_path != seg.identity,
            Err(_) => true,
        };
        if moved && let Some(Segment { path, .. }) = self.current.take() {
            self.tampered(
                &path,
                "was removed or replaced while the gateway was writing it",
            );
        }
    }

    /// The sink turns unhealthy for good: `path` was removed or replaced (`what`).
    fn tampered(&self, path: &Path, what: &str) {
        let why = format!(
            "audit file {} {what}; records go on in a new file, and calls are refused until an operator restarts the gateway",
            path.display()
        );
        tracing::error!(file = %path.display(), "audit file removed or replaced under the writer");
        let _ = self.shared.tampered.set(why);
    }
}

/// The hash of the last record of the node in `dir`, to continue its chain after a
/// restart: the last record of its newest file (returned too), or the retirement
/// anchor's when every file was retired (`None` when the node has no record yet).
fn last_hash(dir: &Path, node: &str) -> Result<(Option<String>, Option<PathBuf>), AuditError> {
    let unavailable = |e: std::io::Error| {
        AuditError::Unavailable(format!(
            "cannot read the audit trail in {}: {e}",
            dir.display()
        ))
    };
    // The newest file with a record (a file cut to nothing by `repair_tail`, or made
    // just before a crash, holds none), else the anchor of the retired ones.
    for (_, file) in node_files(dir, node).map_err(unavailable)?.iter().rev() {
        if let Some(r) = last_record(file).map_err(unavailable)? {
            return Ok((r.hash, Some(file.clone())));
        }
    }
    let anchor = Anchor::read(dir, node).map_err(unavailable)?;
    Ok((anchor.and_then(|a| a.last_hash), None))
}

/// A writer starting on a trail that no longer holds the last record its node wrote (its
/// head) does not write on: records were removed while the gateway was stopped, and
/// writing on would replace the head, the only trace of them. The head is the trail's
/// last record, or one retired (the anchor's, or of a day retired since), or one in the
/// node's files (it lags the last record by at most a second).
fn check_head(dir: &Path, node: &str, last: Option<&str>, seals: &Seals) -> Result<(), AuditError> {
    let unavailable = |e: std::io::Error| {
        AuditError::Unavailable(format!(
            "cannot read the audit trail in {}: {e}",
            dir.display()
        ))
    };
    let path = Head::path(dir, node);
    // Signed heads and anchors (see `crate::seal`): one that is not signed by a trusted
    // key was written without the key, or by someone who does not hold it. Writing on
    // would sign whatever the trail holds now.
    let unsealed = |what: &Path, why: Option<crate::seal::SealError>| {
        AuditError::Unavailable(format!(
            "{} {}: {}",
            what.display(),
            why.as_ref()
                .map_or_else(|| "is missing".to_owned(), ToString::to_string),
            crate::seal::advice(why.as_ref(), &format!("the audit trail of node {node}"))
        ))
    };
    if seals.required()
        && let Some(anchor) = Anchor::read(dir, node).map_err(unavailable)?
    {
        anchor
            .check_seal(&seals.trusted)
            .map_err(|why| unsealed(&Anchor::path(dir, node), Some(why)))?;
    }
    let head: Head = match small_json_files::<Head>(dir, &format!("head-{node}.json")) {
        Ok(mut found) => match found.pop() {
            Some((_, head)) => head,
            None if seals.required() && last.is_some() => {
                return Err(unsealed(&path, None));
            }
            None => return Ok(()),
        },
        Err(e) => return Err(unavailable(e)),
    };
    head.check_seal(&seals.trusted)
        .map_err(|why| unsealed(&path, Some(why)))?;
    if last == Some(head.last_hash.as_str()) {
        return Ok(());
    }
    if let Some(anchor) = Anchor::read(dir, node).map_err(unavailable)?
        && (anchor.last_hash.as_deref() == Some(head.last_hash.as_str())
            || head
                .day
                .as_deref()
                .is_some_and(|d| d <= anchor.retired_through.as_str()))
    {
        return Ok(());
    }
    let needle = format!("\"hash\":\"{}\"", head.last_hash);
    for (_, file) in node_files(dir, node).map_err(unavailable)?.iter().rev() {
        let mut found = false;
        for_each_line(file, |_, line| {
            // The text alone could sit anywhere in a line (a member the record does not
            // have): the line must be a record, written as the writer writes it, whose
            // own hash this is.
            if !found && memchr::memmem::find(line, needle.as_bytes()).is_some() {
                found = canonical_record(line)
                    .is_ok_and(|r| r.hash.as_deref() == Some(head.last_hash.as_str()));
            }
            Ok::<_, std::io::Error>(())
        })
        .map_err(unavailable)?;
        if found {
            return Ok(());
        }
    }
    Err(AuditError::Unavailable(format!(
        "the audit trail in {} does not hold record {} of node {node}, which {} says was written by {}: records were removed while the gateway was stopped. Run `fsp audit verify`; once the loss is accounted for, move {} aside, and the gateway writes on",
        dir.display(),
        head.message_id,
        path.display(),
        head.written_at,
        path.display()
    )))
}

/// How far back from its end the newest segment is read for a batch torn by a crash:
/// more than a segment and any batch.
const TORN_SCAN: u64 = 2 * SEGMENT_BYTES;

/// Cuts what a crash left unfinished from the end of the node's newest segment: from
/// after its last whole line before the first zero byte (the rest of a torn batch, and
/// the zeros it was written into), so that the records after it start on a line of
/// their own and readers see no gap. The cut bytes that are not zeros are kept in
/// `{segment}.torn` (nothing is thrown away) and the cut is logged. A last line that
/// ends with its line break is never cut, even if it does not parse: that is not what a
/// crash leaves, and `verify` reports it.
fn repair_tail(dir: &Path, node: &str) -> Result<(), AuditError> {
    use std::io::{Read, Seek, SeekFrom};
    let fail = |e: std::io::Error| {
        AuditError::Unavailable(format!(
            "cannot repair the audit trail in {}: {e}",
            dir.display()
        ))
    };
    let Some((_, newest)) = node_files(dir, node).map_err(fail)?.pop() else {
        return Ok(());
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&newest)
        .map_err(fail)?;
    let len = f.metadata().map_err(fail)?.len();
    let from = len.saturating_sub(TORN_SCAN);
    let mut tail = Vec::new();
    f.seek(SeekFrom::Start(from)).map_err(fail)?;
    Read::by_ref(&mut f)
        .take(len - from)
        .read_to_end(&mut tail)
        .map_err(fail)?;
    let data = memchr::memchr(0, &tail).unwrap_or(tail.len());
    let keep = match tail[..data].iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if keep == tail.len() {
        return Ok(());
    }
    let mut torn = Vec::new();
    for piece in tail[keep..].split(|&b| b == 0).filter(|p| !p.is_empty()) {
        torn.extend_from_slice(piece);
        if !piece.ends_with(b"\n") {
            torn.push(b'\n');
        }
    }
    if !torn.is_empty() {
        let torn_path = newest.with_extension("jsonl.torn");
        let mut aside = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&torn_path)
            .map_err(fail)?;
        aside.write_all(&torn).map_err(fail)?;
        aside.sync_all().map_err(fail)?;
        tracing::warn!(
            file = %newest.display(),
            bytes = torn.len(),
            kept_in = %torn_path.display(),
            "the audit segment ended in a batch torn by a crash (never reported durable); it was cut and kept aside"
        );
    }
    f.set_len(from + keep as u64).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    Ok(())
}

/// A segment of the trail, from its file name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SegmentFile {
    node: String,
    day: String,
    /// 0 for a day's file as earlier versions named it (one file per day).
    seq: u32,
}

/// The file name of a node's segment.
fn segment_name(node: &str, day: &str, seq: u32) -> String {
    format!("audit-{node}-{day}-{seq:06}.jsonl")
}

/// Reads a trail file's name: `audit-{node}-{YYYY-MM-DD}-{NNNNNN}.jsonl`, or
/// `audit-{node}-{YYYY-MM-DD}.jsonl` (segment 0).
fn parse_segment_name(name: &str) -> Option<SegmentFile> {
    let rest = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    let is_day = |d: &str| {
        d.len() == 10
            && d.bytes().enumerate().all(|(i, b)| {
                if i == 4 || i == 7 {
                    b == b'-'
                } else {
                    b.is_ascii_digit()
                }
            })
    };
    let split = |rest: &str| -> Option<(String, String)> {
        let at = rest.len().checked_sub(11)?;
        let (node, day) = (rest.get(..at)?, rest.get(at + 1..)?);
        (rest.as_bytes()[at] == b'-' && !node.is_empty() && is_day(day))
            .then(|| (node.to_owned(), day.to_owned()))
    };
    if let Some(at) = rest.len().checked_sub(7)
        && rest.as_bytes()[at] == b'-'
        && let Some(seq) = rest.get(at + 1..)
        && seq.len() == 6
        && seq.bytes().all(|b| b.is_ascii_digit())
        && let Some((node, day)) = split(&rest[..at])
    {
        return Some(SegmentFile {
            node,
            day,
            seq: seq.parse().ok()?,
        });
    }
    let (node, day) = split(rest)?;
    Some(SegmentFile { node, day, seq: 0 })
}

/// The node's segments in `dir` with their days, in the order they were written.
fn node_files(dir: &Path, node: &str) -> std::io::Result<Vec<(String, PathBuf)>> {
    Ok(node_segments(dir, node)?
        .into_iter()
        .map(|(s, p)| (s.day, p))
        .collect())
}

fn node_segments(dir: &Path, node: &str) -> std::io::Result<Vec<(SegmentFile, PathBuf)>> {
    Ok(trail_segments(dir)?
        .into_iter()
        .filter(|(s, _)| s.node == node)
        .collect())
}

/// The last whole record of a file, read from its end (a day's file, as earlier versions
/// wrote them, may hold gigabytes).
fn last_record(path: &Path) -> std::io::Result<Option<Record>> {
    from_the_end(path, |tail, start| {
        let mut lines: Vec<&[u8]> = tail.split(|&b| b == b'\n').collect();
        if start > 0 {
            // The first piece may be the end of a line that began before the window.
            lines.remove(0);
        }
        lines
            .iter()
            .rev()
            .find_map(|l| serde_json::from_slice::<Record>(l).ok())
    })
}

/// Reads the end of a file, a growing window at a time, until `found` has what it wants
/// in the window (given with where it starts) or the whole file was read.
fn from_the_end<T>(
    path: &Path,
    mut found: impl FnMut(&[u8], u64) -> Option<T>,
) -> std::io::Result<Option<T>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        Read::by_ref(&mut f)
            .take(len - start)
            .read_to_end(&mut tail)?;
        // The zeros after the records of the segment being written are not its end.
        let data = tail.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if (data > 0 || start == 0)
            && let Some(t) = found(&tail[..data], start)
        {
            return Ok(Some(t));
        }
        if start == 0 {
            return Ok(None);
        }
        window = window.saturating_mul(4);
    }
}

/// The day `days` before today (the first day there is, for a span longer than the
/// calendar goes back: then nothing is older).
fn days_before_today(days: u32) -> time::Date {
    time::OffsetDateTime::now_utc()
        .date()
        .checked_sub(time::Duration::days(i64::from(days)))
        .unwrap_or(time::Date::MIN)
}

fn day_text(d: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Where a node's chain goes on after its oldest files were retired: the hash of the
/// last record retired, and the last day retired. Kept beside the trail as
/// `retired-{node}.json`, written (atomically) before any file is deleted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Anchor {
    /// The node as its records name it.
    pub node: String,
    pub retired_through: String,
    pub last_hash: Option<String>,
    /// With `[audit] signing_key`: the signing key's id and its signature over the
    /// fields above (see [`crate::seal`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Sealed for Anchor {
    const LABEL: &'static str = "file-anchor";

    fn fields(&self) -> Vec<&str> {
        vec![
            &self.node,
            &self.retired_through,
            self.last_hash.as_deref().unwrap_or(""),
        ]
    }

    fn seal_parts(&self) -> (&Option<String>, &Option<String>) {
        (&self.key, &self.signature)
    }

    fn set_seal(&mut self, seal: Seal) {
        self.key = Some(seal.key);
        self.signature = Some(seal.signature);
    }
}

impl Anchor {
    fn path(dir: &Path, node: &str) -> PathBuf {
        dir.join(format!("retired-{node}.json"))
    }

    fn read(dir: &Path, node: &str) -> std::io::Result<Option<Self>> {
        match std::fs::read(Self::path(dir, node)) {
            Ok(bytes) => {
                let anchor: Self = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
                // Another node's anchor under this node's name is no anchor of this node.
                if sanitise(&anchor.node) != node {
                    return Err(std::io::Error::other(format!(
                        "{} names node {}",
                        Self::path(dir, node).display(),
                        anchor.node
                    )));
                }
                Ok(Some(anchor))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(&self, dir: &Path, node: &str) -> std::io::Result<()> {
        replace_json(&Self::path(dir, node), self)?;
        File::open(dir)?.sync_all()
    }

    /// Every anchor in `dir`, each in the file its node's name gives it.
    fn all(dir: &Path) -> std::io::Result<Vec<(PathBuf, Self)>> {
        let all: Vec<(PathBuf, Self)> = small_json_files(dir, "retired-")?;
        for (path, anchor) in &all {
            named_as(
                path,
                &Self::path(dir, &sanitise(&anchor.node)),
                &anchor.node,
            )?;
        }
        Ok(all)
    }
}

/// How often, at most, the writer rewrites a node's head.
const HEAD_EVERY: Duration = Duration::from_secs(1);

/// The last record a node's writer wrote, as of at most [`HEAD_EVERY`] ago (and at a
/// clean stop): kept beside the trail as `head-{node}.json`, so that records removed
/// from the end of the trail (or the whole trail) do not pass `verify` for a shorter
/// trail. Written after the records it names are durable, and synced before it replaces
/// the last one, so a crash never leaves it naming a record the trail does not hold.
/// Like the chain itself it has no secret: it tells a trail cut short from a whole one,
/// not from one rewritten whole by someone who can write the directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    /// The node as its files name it.
    pub node: String,
    pub message_id: String,
    pub last_hash: String,
    pub written_at: String,
    /// The day of the file that holds it: once retention has retired that day, the
    /// record is accounted for by the node's anchor.
    #[serde(default)]
    pub day: Option<String>,
    /// With `[audit] signing_key`: the signing key's id and its signature over the
    /// fields above (see [`crate::seal`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Sealed for Head {
    const LABEL: &'static str = "file-head";

    fn fields(&self) -> Vec<&str> {
        vec![
            &self.node,
            &self.message_id,
            &self.last_hash,
            &self.written_at,
            self.day.as_deref().unwrap_or(""),
        ]
    }

    fn seal_parts(&self) -> (&Option<String>, &Option<String>) {
        (&self.key, &self.signature)
    }

    fn set_seal(&mut self, seal: Seal) {
        self.key = Some(seal.key);
        self.signature = Some(seal.signature);
    }
}

/// A head or an anchor: signed by the writer when it has a signing key, checked by
/// `verify` and by a starting writer against the keys they trust.
trait Sealed {
    /// What the signature says it signs (see [`crate::seal::message`]).
    const LABEL: &'static str;

    /// The fields the signature covers, in order.
    fn fields(&self) -> Vec<&str>;

    fn seal_parts(&self) -> (&Option<String>, &Option<String>);

    fn set_seal(&mut self, seal: Seal);

    /// Signs with `key` (nothing without one).
    fn sign(&mut self, key: Option<&SigningKey>) {
        if let Some(key) = key {
            let seal = key.seal(Self::LABEL, &self.fields());
            self.set_seal(seal);
        }
    }

    /// Checks the signature against `trusted` (anything passes when nothing is trusted).
    fn check_seal(&self, trusted: &TrustedKeys) -> Result<(), crate::seal::SealError> {
        let seal = match self.seal_parts() {
            (Some(key), Some(signature)) => Some(Seal {
                key: key.clone(),
                signature: signature.clone(),
            }),
            _ => None,
        };
        trusted.check(seal.as_ref(), Self::LABEL, &self.fields())
    }
}

impl Head {
    fn path(dir: &Path, node: &str) -> PathBuf {
        dir.join(format!("head-{}.json", sanitise(node)))
    }

    fn write(&self, dir: &Path) -> std::io::Result<()> {
        replace_json(&Self::path(dir, &self.node), self)
    }

    /// Every head in `dir`, by node, each in the file its node's name gives it (so one
    /// node has one head).
    fn all(dir: &Path) -> std::io::Result<BTreeMap<String, (PathBuf, Self)>> {
        let mut out = BTreeMap::new();
        for (path, head) in small_json_files::<Self>(dir, "head-")? {
            named_as(&path, &Self::path(dir, &head.node), &head.node)?;
            // A writer names its head's node as its files do.
            if head.node != sanitise(&head.node) {
                return Err(std::io::Error::other(format!(
                    "{} names node {:?}, which no file of the trail can",
                    path.display(),
                    head.node
                )));
            }
            out.insert(head.node.clone(), (path, head));
        }
        Ok(out)
    }
}

/// A head or an anchor is read only from the file its node's name gives it: a copy under
/// another name (another node's, or a second head of one node) is refused, not chosen.
fn named_as(path: &Path, expected: &Path, node: &str) -> std::io::Result<()> {
    if path.file_name() == expected.file_name() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{} names node {node:?}, whose file is {}: move it aside",
            path.display(),
            expected.display()
        )))
    }
}

/// Replaces `path` with `value` as JSON, readable by the gateway's user only: written
/// aside, synced, then renamed over it (a crash leaves the old file or the new one).
fn replace_json(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The small JSON files of the trail's directory whose names start with `prefix` (the
/// anchors, the heads), each read whole: a regular file of at most 1 MiB.
fn small_json_files<T: serde::de::DeserializeOwned>(
    dir: &Path,
    prefix: &str,
) -> std::io::Result<Vec<(PathBuf, T)>> {
    use std::io::Read;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !(name.starts_with(prefix) && name.ends_with(".json")) {
            continue;
        }
        let unreadable = |why: String| std::io::Error::other(format!("{}: {why}", path.display()));
        if !std::fs::metadata(&path)?.is_file() {
            return Err(unreadable("not a regular file".into()));
        }
        let mut bytes = Vec::new();
        File::open(&path)?.take(1 << 20).read_to_end(&mut bytes)?;
        let value = serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
        out.push((path, value));
    }
    Ok(out)
}

/// The trail's files in `dir`: by node, then in the order they were written (by day,
/// then segment).
pub fn trail_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(trail_segments(dir)?.into_iter().map(|(_, p)| p).collect())
}

fn trail_segments(dir: &Path) -> std::io::Result<Vec<(SegmentFile, PathBuf)>> {
    let mut files: Vec<(SegmentFile, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter_map(|p| Some((parse_segment_name(p.file_name()?.to_str()?)?, p)))
        .collect();
    files.sort_by(|(a, _), (b, _)| (&a.node, &a.day, a.seq).cmp(&(&b.node, &b.day, b.seq)));
    Ok(files)
}

/// Longer lines are not records (a record is a few hundred bytes, at most the size of
/// what a request can carry into it).
const MAX_LINE: usize = 16 * 1024 * 1024;

/// Hands each line of a file (without its line break, numbered from 1) to `f`, reading
/// it as a stream; a line longer than [`MAX_LINE`] is handed over cut at that length. A
/// zero byte ends a line and runs of them are skipped: they are the unwritten end of the
/// segment being written (or of one cut short by a crash), never record text.
pub(crate) fn for_each_line<E: From<std::io::Error>>(
    path: &Path,
    mut f: impl FnMut(usize, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    for_each_line_at(path, 0, |n, _, text| f(n, text))
}

/// As [`for_each_line`], from byte `from` on (the start of a line), handing `f` where
/// each line starts too (lines are numbered from 1 at `from`).
pub(crate) fn for_each_line_at<E: From<std::io::Error>>(
    path: &Path,
    from: u64,
    mut f: impl FnMut(usize, u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    use std::io::{BufRead, Read, Seek, SeekFrom};
    // A pipe or a device put in the trail's place would block or never end.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        )
        .into());
    }
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = std::io::BufReader::with_capacity(256 * 1024, file);
    let mut line = Vec::new();
    let mut n = 0;
    let mut at = from;
    loop {
        line.clear();
        let read = Read::by_ref(&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            return Ok(());
        }
        let start = at;
        at += read as u64;
        let whole = line.ends_with(b"\n");
        if !whole && line.len() > MAX_LINE {
            // Skip the rest of the overlong line.
            let mut rest = Vec::new();
            while !rest.ends_with(b"\n") {
                rest.clear();
                let skipped = Read::by_ref(&mut reader)
                    .take(1 << 20)
                    .read_until(b'\n', &mut rest)?;
                if skipped == 0 {
                    break;
                }
                at += skipped as u64;
            }
        }
        n += 1;
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if memchr::memchr(0, text).is_none() {
            if !text.is_empty() {
                f(n, start, text)?;
            }
        } else {
            let mut piece_at = start;
            for piece in text.split(|&b| b == 0) {
                if !piece.is_empty() {
                    f(n, piece_at, piece)?;
                }
                piece_at += piece.len() as u64 + 1;
            }
        }
    }
}

/// Where a record is in the trail; shown as `file:line`.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub file: &'a Path,
    pub line: usize,
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

impl Place<'_> {
    /// The node whose file this is, as it appears in the file's name.
    fn file_node(&self) -> Option<String> {
        parse_segment_name(self.file.file_name()?.to_str()?).map(|s| s.node)
    }
}

/// Reads the trail in `dir` as calls: one record per call (see [`crate::Calls`]), those
/// `keep` accepts, handed to `f` as they complete; the calls whose outcome was never
/// written come last. Lines that are not records are handed to `bad`.
pub fn for_each_call<E: From<std::io::Error>>(
    dir: &Path,
    keep: impl Fn(&Record) -> bool,
    mut f: impl FnMut(Record) -> Result<(), E>,
    mut bad: impl FnMut(Place<'_>, String),
) -> Result<usize, E> {
    let mut calls = crate::Calls::default();
    let files = for_each_record(dir, |at, record| match record {
        Ok(r) if keep(&r) => match calls.line(r) {
            Some(call) => f(call),
            None => Ok(()),
        },
        Ok(_) => Ok(()),
        Err(why) => {
            bad(at, why);
            Ok(())
        }
    })?;
    for call in calls.unfinished() {
        f(call)?;
    }
    Ok(files)
}

/// Reads every record of the trail in `dir`, each node's files in the order of their
/// days, and hands each to `f` with where it is, or why a line is not a record; stops
/// at the first error `f` returns. Returns how many files were read.
pub fn for_each_record<E: From<std::io::Error>>(
    dir: &Path,
    f: impl FnMut(Place<'_>, Result<Record, String>) -> Result<(), E>,
) -> Result<usize, E> {
    for_each_record_as(dir, false, f)
}

/// As [`for_each_record`]; with `canonical`, a line is a record only when it holds
/// exactly what the writer writes for it ([`canonical_record`]).
fn for_each_record_as<E: From<std::io::Error>>(
    dir: &Path,
    canonical: bool,
    mut f: impl FnMut(Place<'_>, Result<Record, String>) -> Result<(), E>,
) -> Result<usize, E> {
    let files = trail_files(dir)?;
    for file in &files {
        for_each_line(file, |line, text| {
            let record = if text.len() > MAX_LINE {
                Err(format!("a line of {} bytes", text.len()))
            } else if canonical {
                canonical_record(text)
            } else {
                serde_json::from_slice::<Record>(text).map_err(|e| e.to_string())
            };
            f(Place { file, line }, record)
        })?;
    }
    Ok(files.len())
}

/// A line read as a record, which must be byte for byte what the writer writes for that
/// record: a member the record does not have (which the hash does not cover), other
/// white space or escapes, or another order would let text ride along unverified.
fn canonical_record(line: &[u8]) -> Result<Record, String> {
    let record = serde_json::from_slice::<Record>(line).map_err(|e| e.to_string())?;
    let mut written = Vec::with_capacity(line.len());
    record.write_json(&mut written);
    if written != line {
        return Err("it is not written as the gateway writes records (a member it does not know, or other spacing or escapes)".into());
    }
    Ok(record)
}

/// The record with this message id in the trail in `dir`. A segment with a lookup index
/// (see [`crate::file_index`]) is read only at the lines its index names, and after the
/// bytes the index covers; one without is read as a stream, lines that do not hold the
/// id's text skipped unparsed.
pub fn find(dir: &Path, message_id: &str) -> std::io::Result<Option<Record>> {
    let needle = format!("\"message_id\":\"{message_id}\"");
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    let mut files = trail_files(dir)?;
    // An FSP message id is a UUID v7 carrying the instant the call was received: its
    // lines were written that day or, for a call that ended after midnight, the next
    // (two days later at most: no call lasts longer). Other days are not read.
    if let Some(day) = uuid_v7_day(message_id) {
        let last = day + time::Duration::days(2);
        files.retain(|f| file_day(f).is_some_and(|d| d >= day && d <= last));
    }
    // Newest first: a call's outcome line is in the file of its request line or a
    // newer one, so the first file that names the call has its best line.
    for file in files.iter().rev() {
        let mut found: Option<Record> = None;
        // Lines come in the order they were written: an outcome line replaces the
        // request line before it.
        let mut consider = |line: &[u8]| {
            if found.as_ref().is_none_or(Record::is_request_line)
                && finder.find(line).is_some()
                && let Ok(r) = serde_json::from_slice::<Record>(line)
                && r.message_id == message_id
            {
                found = Some(r);
            }
        };
        match crate::file_index::lookup(file, message_id)? {
            Some(hits) => {
                let f = File::open(file)?;
                for at in &hits.offsets {
                    consider(&crate::file_index::line_at(&f, *at, MAX_LINE)?);
                }
                if f.metadata()?.len() > hits.covered {
                    for_each_line_at(file, hits.covered, |_, _, line| {
                        consider(line);
                        Ok::<(), std::io::Error>(())
                    })?;
                }
            }
            None => for_each_line(file, |_, line| {
                consider(line);
                Ok::<(), std::io::Error>(())
            })?,
        }
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// When a closed segment's lookup index is written.
#[derive(Debug, Clone, Copy)]
enum Indexing {
    /// Before the writer goes on (the gateway is stopping).
    Now,
    /// By a helper thread.
    Background,
    /// Not at all (the segment is about to be retired).
    None,
}

/// How a segment's lookup index is made.
enum IndexJob {
    /// From the entries the writer collected, covering the segment's first bytes.
    Entries(PathBuf, Vec<(u64, u64)>, u64),
    /// By reading the segment again.
    Read(PathBuf),
}

impl IndexJob {
    fn run(self) {
        let (path, done) = match self {
            IndexJob::Entries(path, entries, covered) => {
                let done = crate::file_index::write(&path, entries, covered);
                (path, done)
            }
            IndexJob::Read(path) => {
                let done = crate::file_index::build(&path).map(drop);
                (path, done)
            }
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, file = %path.display(), "audit segment could not be indexed; lookups read it whole");
        }
    }
}

/// Runs index jobs on a thread of its own (the writer goes on); `gently`: pausing after
/// each as long as it took, so that a trail indexed at start takes at most half a core
/// and leaves the disk to the writer's syncs half the time.
fn index_in_background(jobs: Vec<IndexJob>, gently: bool) {
    if jobs.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("fsp-audit-index".into())
        .spawn(move || {
            for job in jobs {
                let began = std::time::Instant::now();
                job.run();
                if gently {
                    std::thread::sleep(began.elapsed());
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "audit index thread could not start; lookups read unindexed segments whole");
    }
}

/// The UTC day a UUID v7 (hyphenated) was made, from its 48-bit Unix time in ms.
fn uuid_v7_day(id: &str) -> Option<time::Date> {
    let hex: String = id.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || hex.as_bytes().get(12) != Some(&b'7') {
        return None;
    }
    let ms = u64::from_str_radix(hex.get(..12)?, 16).ok()?;
    let at = time::OffsetDateTime::from_unix_timestamp(i64::try_from(ms / 1000).ok()?).ok()?;
    Some(at.date())
}

/// The day of a trail file, from its name.
fn file_day(path: &Path) -> Option<time::Date> {
    let segment = parse_segment_name(path.file_name()?.to_str()?)?;
    time::Date::parse(
        &segment.day,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .ok()
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
    #[error("{at} is not a whole audit record (cut short, or edited): {why}")]
    NotARecord { at: String, why: String },
    #[error("record {message_id} at {at} names node {node}, whose records are not in this file")]
    Foreign {
        at: String,
        message_id: String,
        node: String,
    },
    #[error(
        "record {message_id} of node {node} is missing: {head} says the gateway had written it by {written_at}, and it is not in the trail (records at the end of the trail were removed)"
    )]
    CutShort {
        head: String,
        node: String,
        message_id: String,
        written_at: String,
    },
    #[error(
        "{anchor} says files up to {through} were retired, but records are kept {days} days: files were deleted before their time"
    )]
    RetiredEarly {
        anchor: String,
        through: String,
        days: u32,
    },
    #[error(
        "{what} {why}: the trail cannot be shown to be the one its writer signed (altered, or written without the signing key)"
    )]
    Unsealed { what: String, why: String },
}

/// Walks every file of the trail in `dir`, each node's files in the order of their days,
/// and checks every record against its node's chain; a node whose oldest files were
/// retired starts from its anchor. With `retention_days`, an anchor that retired files
/// younger than that is a break too (files deleted before their time).
pub fn verify_dir(dir: &Path, retention_days: Option<u32>) -> Result<Verified, VerifyError> {
    verify_dir_sealed(dir, retention_days, &TrustedKeys::default())
}

/// As [`verify_dir`], and with keys trusted, every node's head and every anchor must be
/// signed by one of them (see [`crate::seal`]): the chain then cannot have been written
/// again, whole, by someone without the key.
pub fn verify_dir_sealed(
    dir: &Path,
    retention_days: Option<u32>,
    trusted: &TrustedKeys,
) -> Result<Verified, VerifyError> {
    let unsealed = |path: &Path, why: String| VerifyError::Unsealed {
        what: path.display().to_string(),
        why,
    };
    let unsigned = |path: &Path, why: crate::seal::SealError| unsealed(path, why.to_string());
    let mut verifier = Verifier::default();
    // Read first: a gateway writing meanwhile only adds records after what they name.
    let mut heads: BTreeMap<String, (PathBuf, Head, bool)> = Head::all(dir)?
        .into_iter()
        .map(|(node, (path, head))| (node, (path, head, false)))
        .collect();
    for (path, head, _) in heads.values() {
        head.check_seal(trusted)
            .map_err(|why| unsigned(path, why))?;
    }
    // The nodes whose records or anchors are in the trail: with keys trusted, each has a
    // signed head.
    let mut nodes: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for (path, anchor) in Anchor::all(dir)? {
        anchor
            .check_seal(trusted)
            .map_err(|why| unsigned(&path, why))?;
        if anchor.last_hash.is_some() {
            nodes.insert(sanitise(&anchor.node));
        }
        if let Some(days) = retention_days {
            let cutoff = day_text(days_before_today(days));
            if anchor.retired_through >= cutoff {
                return Err(VerifyError::RetiredEarly {
                    anchor: path.display().to_string(),
                    through: anchor.retired_through,
                    days,
                });
            }
        }
        if let Some(h) = anchor.last_hash {
            if let Some((_, head, seen)) = heads.get_mut(&sanitise(&anchor.node)) {
                *seen |= head.last_hash == h
                    || head
                        .day
                        .as_deref()
                        .is_some_and(|d| d <= anchor.retired_through.as_str());
            }
            verifier.continue_after(&anchor.node, h);
        }
    }
    // The node of the file being read, from its name (read once a file, not a record).
    let mut file_node: Option<(PathBuf, Option<String>)> = None;
    // The name each file node's records give (one name per node: two names the files
    // cannot tell apart would be two chains in one node's files).
    let mut raw_names: HashMap<String, String> = HashMap::new();
    let files = for_each_record_as(dir, true, |at, record| {
        let record = record.map_err(|why| VerifyError::NotARecord {
            at: at.to_string(),
            why,
        })?;
        if file_node.as_ref().is_none_or(|(f, _)| f != at.file) {
            file_node = Some((at.file.to_owned(), at.file_node()));
            if let Some(n) = at.file_node() {
                nodes.insert(n);
            }
        }
        // A record is in its own node's files: one slipped into another's is foreign.
        let in_file = file_node.as_ref().and_then(|(_, n)| n.as_deref());
        if in_file != Some(sanitise(&record.node).as_str())
            || in_file.is_some_and(|n| {
                raw_names
                    .entry(n.to_owned())
                    .or_insert_with(|| record.node.clone())
                    != &record.node
            })
        {
            return Err(VerifyError::Foreign {
                at: at.to_string(),
                message_id: record.message_id,
                node: record.node,
            });
        }
        verifier.check(&at.to_string(), &record)?;
        let node = file_node.as_ref().and_then(|(_, n)| n.as_deref());
        if let Some((_, head, seen)) = node.and_then(|n| heads.get_mut(n)) {
            *seen |= record.hash.as_deref() == Some(head.last_hash.as_str());
        }
        Ok(())
    })?;
    if !trusted.is_empty()
        && let Some(node) = nodes.iter().find(|n| !heads.contains_key(*n))
    {
        return Err(unsealed(&Head::path(dir, node), "is missing".into()));
    }
    if let Some((path, head, _)) = heads.into_values().find(|(_, _, seen)| !seen) {
        return Err(VerifyError::CutShort {
            head: path.display().to_string(),
            node: head.node,
            message_id: head.message_id,
            written_at: head.written_at,
        });
    }
    Ok(Verified {
        files,
        records: verifier.checked(),
    })
}

/// `fsp audit seal`: checks the trail in `dir` as [`verify_dir`] does, then signs every
/// node's head and anchor with `key`, making a head for a node that has records and none
/// (a trail written before heads were kept). For a trail written without a signing key,
/// or after the key changed without the old one trusted: the operator vouches for the
/// trail as it is now, and from then on `verify` and the writer require the signatures.
/// Refused while a gateway writes any of the nodes' trails (each node's lock is taken).
/// Returns what was signed, one line each.
pub fn seal_dir(
    dir: &Path,
    retention_days: Option<u32>,
    key: &SigningKey,
    trusted: &TrustedKeys,
) -> Result<Vec<String>, VerifyError> {
    let mut nodes: std::collections::BTreeSet<String> = trail_segments(dir)?
        .into_iter()
        .map(|(s, _)| s.node)
        .collect();
    nodes.extend(Head::all(dir)?.into_keys().map(|n| sanitise(&n)));
    for (_, anchor) in Anchor::all(dir)? {
        nodes.insert(sanitise(&anchor.node));
    }
    let mut locks = Vec::new();
    for node in &nodes {
        locks.push(
            lock_node(dir, node, Duration::ZERO)
                .map_err(|e| VerifyError::Io(std::io::Error::other(e.to_string())))?,
        );
    }
    verify_dir(dir, retention_days)?;
    // What each head and anchor was before: a trusted key's signature that does not fit
    // is tampering, and is not signed over.
    let before = |path: &Path, state: Result<(), crate::seal::SealError>| match state {
        Ok(()) => Ok("was signed by a trusted key".to_owned()),
        Err(e) if e.is_tampering() => Err(VerifyError::Unsealed {
            what: path.display().to_string(),
            why: format!("{e}; not signed over: this is the mark of tampering"),
        }),
        Err(crate::seal::SealError::Unsigned) => Ok("was not signed".to_owned()),
        Err(e) => Ok(format!("was not signed by a trusted key: it {e}")),
    };
    let mut anchors = Vec::new();
    let mut heads = Vec::new();
    for node in &nodes {
        if let Some(anchor) = Anchor::read(dir, node)? {
            let was = before(&Anchor::path(dir, node), anchor.check_seal(trusted))?;
            anchors.push((node, anchor, was));
        }
        let path = Head::path(dir, node);
        match small_json_files::<Head>(dir, &format!("head-{node}.json"))?.pop() {
            Some((_, head)) => {
                let was = before(&path, head.check_seal(trusted))?;
                heads.push((node, head, was));
            }
            None => {
                // The node's last record, in the newest of its files that holds one.
                for (day, file) in node_files(dir, node)?.iter().rev() {
                    if let Some(r) = last_record(file)? {
                        if let Some(last_hash) = r.hash {
                            let head = Head {
                                node: node.clone(),
                                message_id: r.message_id,
                                last_hash,
                                written_at: time::OffsetDateTime::now_utc()
                                    .format(&time::format_description::well_known::Rfc3339)
                                    .unwrap_or_default(),
                                day: Some(day.clone()),
                                key: None,
                                signature: None,
                            };
                            heads.push((node, head, "was missing: made".to_owned()));
                        }
                        break;
                    }
                }
            }
        }
    }
    let mut signed = Vec::new();
    for (node, mut anchor, was) in anchors {
        anchor.sign(Some(key));
        anchor.write(dir, node)?;
        signed.push(format!("{} ({was})", Anchor::path(dir, node).display()));
    }
    for (node, mut head, was) in heads {
        head.sign(Some(key));
        head.write(dir)?;
        File::open(dir)?.sync_all()?;
        signed.push(format!(
            "{} (record {}; {was})",
            Head::path(dir, node).display(),
            head.message_id
        ));
    }
    // What was signed is what was checked: read back with the key alone.
    verify_dir_sealed(dir, retention_days, &TrustedKeys::new([key.trusted()]))?;
    drop(locks);
    Ok(signed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::Phase;

    /// A segment replaced by a device or a pipe is an error at once, not a read that
    /// never ends or never starts.
    #[test]
    fn a_segment_that_is_not_a_regular_file_fails_verify_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let segment = dir.path().join(segment_name("n1", "2026-12-01", 1));
        std::os::unix::fs::symlink("/dev/zero", &segment).unwrap();
        let verified = verify_dir(dir.path(), None);
        assert!(
            matches!(&verified, Err(VerifyError::Io(e)) if e.to_string().contains("not a regular file")),
            "{verified:?}"
        );
    }

    #[test]
    fn a_retention_longer_than_the_calendar_retires_nothing_and_does_not_panic() {
        assert_eq!(days_before_today(u32::MAX), time::Date::MIN);
        // An anchor says files were retired: under such a retention, too early.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("retired-n1.json"),
            r#"{"node":"n1","last_hash":"00","retired_through":"2020-01-01"}"#,
        )
        .unwrap();
        let verified = verify_dir(dir.path(), Some(u32::MAX));
        assert!(
            matches!(verified, Err(VerifyError::RetiredEarly { .. })),
            "{verified:?}"
        );
    }

    /// Every file of the trail, one after the other.
    fn whole_trail(dir: &Path) -> String {
        trail_files(dir)
            .unwrap()
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect()
    }

    /// A trail of three records, written and closed, and its one segment.
    fn three_records() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), (0..3).map(|i| record(i, "2026-11-24")));
        let file = trail_files(dir.path()).unwrap().pop().unwrap();
        (dir, file)
    }

    /// How many records the trail in `dir` holds so far (the segment being written ends
    /// in zeros).
    fn records_on_disk(dir: &Path) -> usize {
        trail_files(dir).unwrap().iter().fold(0, |n, f| {
            n + std::fs::read(f).map_or(0, |t| {
                t.split(|&b| b == b'\n' || b == 0)
                    .filter(|l| !l.is_empty())
                    .count()
            })
        })
    }

    fn record(i: usize, day: &str) -> Record {
        Record {
            message_id: format!("m-{i}"),
            timestamp: format!("{day}T10:00:00.000Z"),
            decision: "allowed".into(),
            status: 200,
            node: "n".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_record_taken_is_on_disk_after_join_in_the_file_of_the_day_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        // A node name that is not a file name as it is.
        let (sink, handle) = FileSink::start(dir.path(), "node/1").unwrap();
        // Calls that began on two days (a call may end the day after it began).
        for i in 0..1000 {
            let day = if i % 2 == 0 {
                "2026-11-24"
            } else {
                "2026-11-25"
            };
            let mut r = record(i, day);
            r.node = "node/1".into();
            sink.submit(r).unwrap();
        }
        assert!(sink.health().is_ok());
        drop(sink);
        handle.join();
        let files = trail_files(dir.path()).unwrap();
        let written = segment_name("node_1", &today(), 1);
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
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 1000);
    }

    /// Records removed from the end of the trail, or the whole trail, fail verify: the
    /// node's head names the last record written. (That a gateway killed outright leaves
    /// a head naming a record the trail holds is shown by the crash test in
    /// proxy/tests/audit_backends.rs, whose verify reads the heads.)
    #[test]
    fn records_removed_from_the_end_or_the_whole_trail_fail_verify() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), (0..20).map(|i| record(i, "2026-11-24")));
        let head: Head =
            serde_json::from_slice(&std::fs::read(dir.path().join("head-n.json")).unwrap())
                .unwrap();
        assert_eq!(head.message_id, "m-19");
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 20);

        let segment = &trail_files(dir.path()).unwrap()[0];
        let whole = std::fs::read_to_string(segment).unwrap();
        let lines: Vec<&str> = whole.lines().collect();
        // The last record removed: named, though nothing follows it to break the chain.
        std::fs::write(segment, lines[..19].join("\n") + "\n").unwrap();
        let verified = verify_dir(dir.path(), None);
        assert!(
            matches!(&verified, Err(e @ VerifyError::CutShort { .. }) if e.to_string().contains("record m-19 of node n is missing")),
            "{verified:?}"
        );
        // A gateway does not write on over the cut (its next head would hide it).
        let refused = FileSink::start(dir.path(), "n")
            .map(drop)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("does not hold record m-19 of node n"),
            "{refused}"
        );
        // Every file of the trail removed.
        std::fs::remove_file(segment).unwrap();
        assert!(matches!(
            verify_dir(dir.path(), None),
            Err(VerifyError::CutShort { .. })
        ));
        assert!(FileSink::start(dir.path(), "n").is_err());
        std::fs::write(segment, &whole).unwrap();
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 20);
        // Whole again: it writes on.
        write_all(dir.path(), [record(20, "2026-11-24")]);
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 21);
    }

    /// A writer gone quiet still names its last record within about a second; a head
    /// whose day retention has retired is accounted for by the anchor.
    #[test]
    fn the_head_follows_a_quiet_writer_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        let head = || -> Head {
            serde_json::from_slice(&std::fs::read(dir.path().join("head-n.json")).unwrap()).unwrap()
        };
        sink.submit(record(0, "2026-11-24")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        sink.submit(record(1, "2026-11-24")).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(head().message_id, "m-1");
        drop(sink);
        handle.join();
        // A head lagging behind the last record retired: covered by the anchor's day.
        let lagging = Head {
            last_hash: "0".repeat(64),
            day: Some("2026-01-01".into()),
            ..head()
        };
        lagging.write(dir.path()).unwrap();
        for f in trail_files(dir.path()).unwrap() {
            std::fs::remove_file(f).unwrap();
        }
        Anchor {
            node: "n".into(),
            retired_through: "2026-01-02".into(),
            last_hash: Some("1".repeat(64)),
            key: None,
            signature: None,
        }
        .write(dir.path(), "n")
        .unwrap();
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 0);
        assert!(FileSink::start(dir.path(), "n").is_ok());
    }

    /// Writes records of many sizes in many batches, restarting the sink half-way (the
    /// second writer goes on in the segment, from inside a block), with direct writes or
    /// through the page cache; returns the node's one segment.
    fn write_in_batches(dir: &Path, direct_io: bool) -> (Vec<u8>, u64) {
        let mut direct_batches = 0;
        for half in 0..2 {
            let (sink, handle) = FileSink::open(
                dir,
                "n",
                DEFAULT_CAPACITY,
                None,
                SEGMENT_BYTES,
                direct_io,
                Seals::default(),
            )
            .unwrap();
            for i in half * 150..(half + 1) * 150 {
                let mut r = record(i, "2026-11-24");
                r.end_user = Some("x".repeat(i * 397 % 9000));
                sink.submit(r).unwrap();
                if i % 7 == 0 {
                    // Let the writer take what came so far as one batch.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            let shared = sink.shared.clone();
            drop(sink);
            handle.join();
            direct_batches += shared.direct_batches.load(Ordering::Relaxed);
        }
        let files = trail_files(dir).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        (std::fs::read(&files[0]).unwrap(), direct_batches)
    }

    #[test]
    fn direct_writes_leave_the_same_bytes_as_writes_through_the_page_cache() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (direct, direct_batches) = write_in_batches(a.path(), true);
        let (buffered, none) = write_in_batches(b.path(), false);
        assert_eq!(none, 0);
        // Where the file system takes direct I/O, the direct path was the one used.
        let probe = a.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        if open_for_direct_writes(&probe).is_ok() {
            assert!(direct_batches >= 2, "{direct_batches} direct batches");
        }
        std::fs::remove_file(&probe).unwrap();
        assert!(direct == buffered, "the two trails differ");
        assert!(!direct.contains(&0), "a closed segment holds no zeros");
        assert_eq!(verify_dir(a.path(), None).unwrap().records, 300);
        assert_eq!(records_on_disk(a.path()), 300);
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
        let text = whole_trail(dir.path());
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
            verify_dir(dir.path(), None).unwrap(),
            Verified {
                files: 1,
                records: 10_000
            }
        );
        // Found by its message id, and only by it.
        assert_eq!(
            find(dir.path(), "m-20005").unwrap().map(|r| r.message_id),
            Some("m-20005".to_owned())
        );
        assert_eq!(
            find(dir.path(), "m-2000").unwrap().map(|r| r.message_id),
            Some("m-2000".into())
        );
        assert!(
            find(dir.path(), "m-99")
                .unwrap()
                .is_none_or(|r| r.message_id == "m-99")
        );
        assert!(find(dir.path(), "nowhere").unwrap().is_none());
        // A new sink on the same directory continues the chain.
        write_all(dir.path(), [record(99_999, "2026-11-25")]);
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 10_001);
    }

    #[test]
    fn the_certificate_beside_a_token_is_written_found_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        let sha256 = "ab".repeat(32);
        for i in 0..3 {
            let mut r = record(i, "2026-11-24");
            if i == 1 {
                r.credential = Some("oauth".into());
                r.credential_id = Some("ville-bxl-app".into());
                r.certificate_sha256 = Some(sha256.clone());
            }
            sink.submit(r).unwrap();
        }
        drop(sink);
        handle.join();
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 3);
        let found = |id: &str| find(dir.path(), id).unwrap().unwrap().certificate_sha256;
        assert_eq!(found("m-1"), Some(sha256.clone()));
        assert_eq!(found("m-2"), None);
        // Written only where there is one; edited in the file, it breaks the chain there.
        let file = trail_files(dir.path()).unwrap().pop().unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.matches("\"certificate_sha256\":").count(), 1, "{text}");
        std::fs::write(&file, text.replace(&sha256, &"cd".repeat(32))).unwrap();
        assert!(matches!(
            verify_dir(dir.path(), None),
            Err(VerifyError::Broken(Break::Altered { ref message_id, .. })) if message_id == "m-1"
        ));
    }

    #[test]
    fn retention_deletes_whole_old_files_and_the_chain_goes_on_from_its_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let ago = |days: i64| {
            day_text(time::OffsetDateTime::now_utc().date() - time::Duration::days(days))
        };
        // Files as the writer left them 400 and 10 days ago.
        let mut next = 0;
        for days in [400, 10] {
            let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
            for _ in 0..3 {
                sink.submit(record(next, "2026-01-01")).unwrap();
                next += 1;
            }
            drop(sink);
            handle.join();
            let written = dir.path().join(segment_name("n", &today(), 1));
            let aged = dir.path().join(segment_name("n", &ago(days), 1));
            std::fs::rename(written, aged).unwrap();
        }
        let (sink, handle) = FileSink::start_with_retention(dir.path(), "n", 365).unwrap();
        sink.submit(record(next, "2026-01-01")).unwrap();
        drop(sink);
        handle.join();
        let files = trail_files(dir.path()).unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(!dir.path().join(segment_name("n", &ago(400), 1)).exists());
        let anchor = Anchor::read(dir.path(), "n").unwrap().unwrap();
        assert_eq!(anchor.retired_through, ago(400));
        assert_eq!(anchor.node, "n");
        assert_eq!(verify_dir(dir.path(), Some(365)).unwrap().records, 4);
        // An anchor younger than the retention period: deleted before its time.
        assert!(matches!(
            verify_dir(dir.path(), Some(500)),
            Err(VerifyError::RetiredEarly { .. })
        ));
        // A file removed beyond the anchor breaks the chain.
        std::fs::remove_file(dir.path().join(segment_name("n", &ago(10), 1))).unwrap();
        assert!(matches!(
            verify_dir(dir.path(), Some(365)),
            Err(VerifyError::Broken(Break::Unlinked { .. }))
        ));
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_cut_on_start_and_kept_aside() {
        let (dir, file) = three_records();
        // A crash in the middle of the fourth line.
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(b"{\"message_id\":\"m-3\",\"timest").unwrap();
        drop(f);
        assert!(verify_dir(dir.path(), None).is_err());
        write_all(dir.path(), [record(4, "2026-11-24")]);
        // Every earlier record kept, the chain whole, the fragment aside.
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 4);
        let torn = std::fs::read_to_string(file.with_extension("jsonl.torn")).unwrap();
        assert_eq!(torn, "{\"message_id\":\"m-3\",\"timest\n");

        // A crash in the first line of a new file: the file is cut to nothing, and the
        // chain goes on from the file before it.
        let next_day = dir.path().join("audit-n-2999-01-01.jsonl");
        std::fs::write(&next_day, b"{\"message_id\":\"m-5\"").unwrap();
        write_all(dir.path(), [record(6, "2026-11-24")]);
        assert_eq!(std::fs::read(&next_day).unwrap().len(), 0);
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 5);
    }

    #[test]
    fn a_batch_torn_in_the_zeros_ahead_of_it_is_cut_on_start_and_every_record_before_it_kept() {
        let (dir, file) = three_records();
        let whole = std::fs::read(&file).unwrap();
        // What a crash leaves in the segment being written: its records, then a batch
        // of which only some blocks reached the disk (a line cut short, a gap of
        // zeros, the end of another line), then the rest of the zeros written ahead.
        let mut crashed = whole.clone();
        crashed.extend_from_slice(b"{\"message_id\":\"m-3\",\"tim");
        crashed.extend_from_slice(&[0; 4096]);
        crashed.extend_from_slice(b"\"decision\":\"allowed\"}\n");
        crashed.extend_from_slice(&[0; 3 * 4096]);
        std::fs::write(&file, &crashed).unwrap();
        // Readers skip the zeros; the torn pieces are not records.
        assert!(matches!(
            verify_dir(dir.path(), None),
            Err(VerifyError::NotARecord { .. })
        ));
        write_all(dir.path(), [record(4, "2026-11-24")]);
        // Cut back to its records, and the restarted writer went on in it.
        let after = std::fs::read(&file).unwrap();
        assert!(after.starts_with(&whole) && !after.contains(&0));
        assert_eq!(trail_files(dir.path()).unwrap().len(), 1);
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 4);
        let torn = std::fs::read_to_string(file.with_extension("jsonl.torn")).unwrap();
        assert_eq!(
            torn,
            "{\"message_id\":\"m-3\",\"tim\n\"decision\":\"allowed\"}\n"
        );
    }

    /// Writes `batches` through a sink with 16 KiB segments, each batch durable before the
    /// next is submitted, then stops the sink.
    fn write_in_small_segments(dir: &Path, batches: impl IntoIterator<Item = Vec<Record>>) {
        let (sink, handle) = FileSink::open(
            dir,
            "n",
            DEFAULT_CAPACITY,
            None,
            16 * 1024,
            true,
            Seals::default(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for batch in batches {
                let waits: Vec<Durable> = batch
                    .iter()
                    .map(|r| sink.submit_durable(r).unwrap())
                    .collect();
                for w in waits {
                    w.await.unwrap();
                }
            }
        });
        drop(sink);
        handle.join();
    }

    #[test]
    fn segments_rotate_by_size_and_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Batches of at most 20 records (each far below the segment size, however the
        // writer is scheduled), so that a batch that would not fit starts a segment.
        write_in_small_segments(
            dir.path(),
            (0..400).step_by(20).map(|start| {
                (start..start + 20)
                    .map(|i| record(i, "2026-11-24"))
                    .collect()
            }),
        );
        let files = trail_files(dir.path()).unwrap();
        assert!(files.len() > 3, "{files:?}");
        for (i, f) in files.iter().enumerate() {
            let name = f.file_name().unwrap().to_str().unwrap();
            assert_eq!(name, segment_name("n", &today(), i as u32 + 1));
            let bytes = std::fs::read(f).unwrap();
            // Closed segments hold their records and no zeros, and none is past the size
            // (only a batch larger than the size alone could take one past it).
            assert!(!bytes.contains(&0) && bytes.ends_with(b"\n"), "{name}");
            assert!(bytes.len() <= 16 * 1024, "{name}: {}", bytes.len());
        }
        let text = whole_trail(dir.path());
        let ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().message_id)
            .collect();
        assert_eq!(ids, (0..400).map(|i| format!("m-{i}")).collect::<Vec<_>>());
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 400);
        assert_eq!(
            find(dir.path(), "m-399").unwrap().map(|r| r.message_id),
            Some("m-399".into())
        );
        // Removing a segment in the middle breaks the chain.
        std::fs::remove_file(&files[1]).unwrap();
        assert!(matches!(
            verify_dir(dir.path(), None),
            Err(VerifyError::Broken(Break::Unlinked { .. }))
        ));
    }

    #[test]
    fn closed_segments_get_a_lookup_index_and_lookups_through_it_prefer_the_outcome() {
        let dir = tempfile::tempdir().unwrap();
        // Each call's request line, then (two batches later, so often in a later segment)
        // its outcome.
        let line = |i: usize, phase: Phase, status: u16| Record {
            phase: Some(phase),
            status,
            ..record(i, "2026-12-04")
        };
        write_in_small_segments(
            dir.path(),
            (0..300).step_by(20).map(|start| {
                let requests = (start..start + 20).map(|i| line(i, Phase::Request, 0));
                let outcomes = (start.saturating_sub(40)..start.saturating_sub(20))
                    .map(|i| line(i, Phase::Outcome, 200));
                requests.chain(outcomes).collect()
            }),
        );
        let files = trail_files(dir.path()).unwrap();
        assert!(files.len() > 3, "{files:?}");
        // Every segment was closed (the last at the end): each gets its index.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !files
            .iter()
            .all(|f| crate::file_index::lookup(f, "m-0").unwrap().is_some())
        {
            assert!(std::time::Instant::now() < deadline, "segments not indexed");
            std::thread::sleep(Duration::from_millis(20));
        }
        for i in 0..300 {
            let r = find(dir.path(), &format!("m-{i}")).unwrap().unwrap();
            assert_eq!(r.message_id, format!("m-{i}"));
            // Outcomes were written for the first 260 calls only.
            let want = if i < 260 {
                Phase::Outcome
            } else {
                Phase::Request
            };
            assert_eq!(r.phase, Some(want), "m-{i}");
        }
        assert!(find(dir.path(), "m-300").unwrap().is_none());
        // The entries the writer collected are those a reading of the segment gives.
        for f in &files {
            let idx = crate::file_index::index_path(f);
            let written = std::fs::read(&idx).unwrap();
            crate::file_index::build(f).unwrap();
            assert_eq!(written, std::fs::read(&idx).unwrap(), "{}", f.display());
        }
        // Lookups go through the indexes: with their entries altered, the ids are not
        // found (and nothing false is: a line an index names is read and its id
        // compared); without them, segments are read whole again.
        for f in &files {
            let idx = crate::file_index::index_path(f);
            let mut bytes = std::fs::read(&idx).unwrap();
            let n = bytes.len();
            for b in &mut bytes[32..n] {
                *b = b.wrapping_add(1);
            }
            std::fs::write(&idx, bytes).unwrap();
        }
        assert!(find(dir.path(), "m-5").unwrap().is_none());
        // The indexes are the gateway user's alone, as the trail is.
        for f in &files {
            let mode = std::fs::metadata(crate::file_index::index_path(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::remove_file(crate::file_index::index_path(f)).unwrap();
        }
        assert_eq!(
            find(dir.path(), "m-5").unwrap().unwrap().phase,
            Some(Phase::Outcome)
        );
        // A gateway started on the trail indexes again every closed segment whose index
        // is missing or does not fit it (here: one made for another file of that name).
        crate::file_index::build(&files[1]).unwrap();
        std::fs::rename(
            crate::file_index::index_path(&files[1]),
            crate::file_index::index_path(&files[0]),
        )
        .unwrap();
        assert!(!crate::file_index::fits(&files[0]));
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        let closed = &files[..files.len() - 1];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !closed.iter().all(|f| crate::file_index::fits(f)) {
            assert!(
                std::time::Instant::now() < deadline,
                "closed segments not indexed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(sink);
        handle.join();
        assert_eq!(
            find(dir.path(), "m-5").unwrap().unwrap().phase,
            Some(Phase::Outcome)
        );
    }

    #[test]
    fn segment_names_are_read_back_and_a_day_file_of_earlier_versions_is_segment_zero() {
        let seg = |node: &str, day: &str, seq| SegmentFile {
            node: node.into(),
            day: day.into(),
            seq,
        };
        assert_eq!(
            parse_segment_name(&segment_name("a-b", "2026-12-02", 7)),
            Some(seg("a-b", "2026-12-02", 7))
        );
        assert_eq!(
            parse_segment_name("audit-gw-1-2026-12-02.jsonl"),
            Some(seg("gw-1", "2026-12-02", 0))
        );
        // A node named like a date with a number is still read by its full name.
        assert_eq!(
            parse_segment_name("audit-x-2026-12-02-000003.jsonl"),
            Some(seg("x", "2026-12-02", 3))
        );
        for odd in [
            "audit-2026-12-02.jsonl",
            "audit-n-2026-12-2.jsonl",
            "audit-n-2026-12-02-12.jsonl",
            "audit-n-2026-12-02.jsonl.torn",
            "stats-n-2026-12-02.json",
            "audit-n-2026-12-02-0000x1.jsonl",
            "audit-é-2026-12-02-000001.jsonl",
            "audit--2026-12-02-000001.jsonl",
        ] {
            let parsed = parse_segment_name(odd);
            assert!(
                parsed.as_ref().is_none_or(|s| !s.node.is_empty()),
                "{odd}: {parsed:?}"
            );
        }
        assert_eq!(parse_segment_name("audit-2026-12-02.jsonl"), None);
        assert_eq!(parse_segment_name("audit-n-2026-12-02-12.jsonl"), None);
        assert_eq!(parse_segment_name("audit-n-2026-12-02.jsonl.torn"), None);
    }

    #[test]
    fn a_record_slipped_into_another_nodes_file_is_foreign() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), [record(1, "2026-11-24")]);
        // A whole chain of its own, for a node that never wrote here.
        let mut forged = record(2, "2026-11-24");
        forged.node = "elsewhere".into();
        Chain::default().seal(&mut forged);
        let mut line = Vec::new();
        forged.write_json(&mut line);
        line.push(b'\n');
        let file = trail_files(dir.path()).unwrap().pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(&line).unwrap();
        assert!(matches!(
            verify_dir(dir.path(), None),
            Err(VerifyError::Foreign { ref node, .. }) if node == "elsewhere"
        ));
    }

    #[test]
    fn the_trail_is_the_gateway_users_alone() {
        let dir = tempfile::tempdir().unwrap();
        let trail = dir.path().join("audit");
        std::fs::create_dir(&trail).unwrap();
        std::fs::set_permissions(&trail, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (sink, handle) = FileSink::start(&trail, "n").unwrap();
        sink.submit(record(1, "2026-11-24")).unwrap();
        drop(sink);
        handle.join();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&trail), 0o700);
        let files = trail_files(&trail).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(mode(&files[0]), 0o600);
    }

    #[test]
    fn a_file_removed_under_the_writer_is_noticed_and_the_break_shows() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        let wait_for = |n: usize| {
            let start = std::time::Instant::now();
            while records_on_disk(dir.path()) < n {
                assert!(start.elapsed() < std::time::Duration::from_secs(5));
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        for i in 0..3 {
            sink.submit(record(i, "2026-11-24")).unwrap();
        }
        wait_for(3);
        assert!(sink.health().is_ok());
        for f in trail_files(dir.path()).unwrap() {
            std::fs::remove_file(f).unwrap();
        }
        // The next batch notices, and goes to a new file.
        sink.submit(record(3, "2026-11-24")).unwrap();
        let why = unhealthy_within_5_s(&sink);
        assert!(why.contains("removed or replaced"), "{why}");
        sink.submit(record(4, "2026-11-24")).unwrap();
        drop(sink);
        handle.join();
        // Nothing taken after the removal is lost, and the gap shows.
        let text = whole_trail(dir.path());
        assert!(
            text.contains("\"m-3\"") && text.contains("\"m-4\""),
            "{text}"
        );
        assert!(matches!(
            verify_dir(dir.path(), None),
            Err(VerifyError::Broken(Break::Unlinked { .. }))
        ));
    }

    /// Right after a restart no file is open yet: the file the chain goes on from,
    /// removed (or replaced) before anything is written on, is noticed too, whether a
    /// record comes in or the sink stays quiet, and the gap shows in verify.
    #[test]
    fn the_file_a_restarted_writer_goes_on_from_removed_before_its_first_batch_is_noticed() {
        for quiet in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_all(dir.path(), (0..3).map(|i| record(i, "2026-11-24")));
            let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
            assert!(sink.health().is_ok());
            for f in trail_files(dir.path()).unwrap() {
                std::fs::remove_file(f).unwrap();
            }
            if !quiet {
                sink.submit(record(3, "2026-11-24")).unwrap();
            }
            let why = unhealthy_within_5_s(&sink);
            assert!(why.contains("goes on from"), "{why} (quiet: {quiet})");
            sink.submit(record(4, "2026-11-24")).unwrap();
            drop(sink);
            handle.join();
            let text = whole_trail(dir.path());
            assert!(text.contains("\"m-4\""), "{text}");
            let verified = verify_dir(dir.path(), None);
            assert!(
                matches!(verified, Err(VerifyError::Broken(_))),
                "{verified:?}"
            );
        }
    }

    /// A node's trail has one writer: a second gateway with the same node name and
    /// directory waits for the first to let go, and is refused if it does not.
    #[test]
    fn one_writer_per_node_trail() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_node(dir.path(), "n", Duration::ZERO).unwrap();
        assert!(held.is_some());
        let refused = lock_node(dir.path(), "n", Duration::from_millis(200)).unwrap_err();
        assert!(refused.to_string().contains("another gateway"), "{refused}");
        // Another node's trail in the same directory is another lock.
        assert!(
            lock_node(dir.path(), "m", Duration::ZERO)
                .unwrap()
                .is_some()
        );
        // Let go of (the writer ended): taken at once.
        drop(held);
        assert!(
            lock_node(dir.path(), "n", Duration::ZERO)
                .unwrap()
                .is_some()
        );
        // A sink holds its node's lock while it runs, and lets go when it ends.
        let (sink, handle) = FileSink::start(dir.path(), "k").unwrap();
        assert!(lock_node(dir.path(), "k", Duration::from_millis(100)).is_err());
        drop(sink);
        handle.join();
        assert!(
            lock_node(dir.path(), "k", Duration::ZERO)
                .unwrap()
                .is_some()
        );
    }

    /// Starts a sink of node `n` on `dir`, gives it `records`, and stops it: they are all
    /// on disk after.
    /// With a signing key, an attacker who can write the trail but does not hold the
    /// key cannot alter a record and write the chain again: the signed head no longer
    /// fits, and a head made again is unsigned or signed by a key not trusted. A writer
    /// refuses such a trail, and one written without a key until `seal_dir` vouches
    /// for it.
    #[test]
    fn a_signed_head_shows_a_trail_written_again_whole() {
        use crate::seal::{SigningKey, TrustedKeys};
        let dir = tempfile::tempdir().unwrap();
        let today = today();
        // Written without a key: a writer with one refuses it until it is sealed.
        write_all(dir.path(), (0..3).map(|i| record(i, &today)));
        let (key, _) = SigningKey::generate().unwrap();
        let seals = || Seals::new(SigningKey::from_pem(&pem_of(&key)).unwrap(), []);
        let e = FileSink::start_sealed(dir.path(), "n", None, seals()).unwrap_err();
        assert!(e.to_string().contains("is not signed"), "{e}");
        assert!(e.to_string().contains("fsp audit seal"), "{e}");
        let trusted = TrustedKeys::new([key.trusted()]);
        let e = verify_dir_sealed(dir.path(), None, &trusted).unwrap_err();
        assert!(matches!(e, VerifyError::Unsealed { .. }), "{e}");
        let signed = seal_dir(dir.path(), None, &key, &TrustedKeys::new([key.trusted()])).unwrap();
        assert_eq!(signed.len(), 1, "{signed:?}");
        // Sealed: the writer goes on and signs its heads.
        let (sink, handle) = FileSink::start_sealed(dir.path(), "n", None, seals()).unwrap();
        for i in 3..6 {
            sink.submit(record(i, &today)).unwrap();
        }
        drop(sink);
        handle.join();
        let v = verify_dir_sealed(dir.path(), None, &trusted).unwrap();
        assert_eq!(v.records, 6);
        let head_path = Head::path(dir.path(), "n");
        let signed_head = std::fs::read(&head_path).unwrap();
        assert!(String::from_utf8_lossy(&signed_head).contains(key.id()));

        // The attacker alters record m-1 and writes every hash after it again.
        let files = node_files(dir.path(), "n").unwrap();
        let mut chain = Chain::after(None);
        let mut rewritten = Vec::new();
        for (_, file) in &files {
            let mut lines = Vec::new();
            for_each_line(file, |_, line| {
                let mut r: Record = serde_json::from_slice(line).unwrap();
                if r.message_id == "m-1" {
                    r.status = 404;
                }
                chain.seal(&mut r);
                r.write_json(&mut lines);
                lines.push(b'\n');
                Ok::<_, std::io::Error>(())
            })
            .unwrap();
            rewritten.push((file.clone(), lines));
        }
        for (file, lines) in &rewritten {
            std::fs::write(file, lines).unwrap();
        }
        // Without keys the chain alone cannot tell once the head is made again too.
        let mut forged: Head = serde_json::from_slice(&signed_head).unwrap();
        forged.last_hash = chain.last().unwrap().to_owned();
        forged.key = None;
        forged.signature = None;
        forged.write(dir.path()).unwrap();
        verify_dir(dir.path(), None).unwrap();
        // With the key trusted: unsigned...
        let e = verify_dir_sealed(dir.path(), None, &trusted).unwrap_err();
        assert!(e.to_string().contains("is not signed"), "{e}");
        // ... signed by the attacker's own key...
        let (other, _) = SigningKey::generate().unwrap();
        forged.sign(Some(&other));
        forged.write(dir.path()).unwrap();
        let e = verify_dir_sealed(dir.path(), None, &trusted).unwrap_err();
        assert!(e.to_string().contains("not trusted"), "{e}");
        // ... the signature kept over other fields...
        let mut moved: Head = serde_json::from_slice(&signed_head).unwrap();
        moved.last_hash = chain.last().unwrap().to_owned();
        moved.write(dir.path()).unwrap();
        let e = verify_dir_sealed(dir.path(), None, &trusted).unwrap_err();
        assert!(e.to_string().contains("altered"), "{e}");
        // ... or the signed head kept as it was: the chain does not reach it.
        std::fs::write(&head_path, &signed_head).unwrap();
        let e = verify_dir_sealed(dir.path(), None, &trusted).unwrap_err();
        assert!(matches!(e, VerifyError::CutShort { .. }), "{e}");
        // Nor may the head go missing.
        std::fs::remove_file(&head_path).unwrap();
        let e = verify_dir_sealed(dir.path(), None, &trusted).unwrap_err();
        assert!(e.to_string().contains("is missing"), "{e}");
        // A writer with the key refuses the trail as it is now.
        let e = FileSink::start_sealed(dir.path(), "n", None, seals()).unwrap_err();
        assert!(e.to_string().contains("is missing"), "{e}");
    }

    /// The lines of a node's only segment (without the zeros after them).
    fn segment_lines(dir: &Path, node: &str) -> (PathBuf, Vec<Vec<u8>>) {
        let files = node_files(dir, node).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        let seg = files[0].1.clone();
        let text = std::fs::read(&seg).unwrap();
        let end = text.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let lines = text[..end]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        (seg, lines)
    }

    /// Found by an attacker's review: the end of the trail cut, and the signed head's hash
    /// put as text into a kept line, in a member a record does not have. The writer looked
    /// for the text only, started, and signed a head over the cut trail. Now the line must
    /// be the record whose hash it is, written as the writer writes it, and verify refuses
    /// lines with members the hash does not cover.
    #[test]
    fn a_cut_trail_with_the_heads_hash_hidden_in_a_line_is_refused() {
        use crate::seal::{SigningKey, TrustedKeys};
        let dir = tempfile::tempdir().unwrap();
        let today = today();
        let (key, _) = SigningKey::generate().unwrap();
        let seals = || Seals::new(SigningKey::from_pem(&pem_of(&key)).unwrap(), []);
        let trusted = TrustedKeys::new([key.trusted()]);
        let (sink, handle) = FileSink::start_sealed(dir.path(), "n", None, seals()).unwrap();
        for i in 0..10 {
            sink.submit(record(i, &today)).unwrap();
        }
        drop(sink);
        handle.join();
        let head: Head =
            serde_json::from_slice(&std::fs::read(Head::path(dir.path(), "n")).unwrap()).unwrap();
        assert_eq!(head.message_id, "m-9");
        let (seg, lines) = segment_lines(dir.path(), "n");
        let mut out = Vec::new();
        for (i, l) in lines[..5].iter().enumerate() {
            if i == 4 {
                out.extend_from_slice(
                    format!("{{\"x\":{{\"hash\":\"{}\"}},", head.last_hash).as_bytes(),
                );
                out.extend_from_slice(&l[1..]);
            } else {
                out.extend_from_slice(l);
            }
            out.push(b'\n');
        }
        std::fs::write(&seg, &out).unwrap();
        let e = FileSink::start_sealed(dir.path(), "n", None, seals()).unwrap_err();
        assert!(e.to_string().contains("does not hold record m-9"), "{e}");
        let e = verify_dir_sealed(dir.path(), None, &trusted).unwrap_err();
        assert!(
            matches!(&e, VerifyError::NotARecord { why, .. } if why.contains("not written as the gateway writes")),
            "{e}"
        );
    }

    /// Found by an attacker's review: records of a node whose name the files cannot tell
    /// from the real one's (`gw\u{ff3f}1`, a fullwidth low line, for `gw_1`), a chain of
    /// their own, slipped into `gw_1`'s files, passed verify. Now one node's files hold
    /// records of one name.
    #[test]
    fn records_of_a_look_alike_node_in_a_nodes_files_are_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let today = today();
        let (sink, handle) = FileSink::start(dir.path(), "gw_1").unwrap();
        for i in 0..4 {
            let mut r = record(i, &today);
            r.node = "gw_1".into();
            sink.submit(r).unwrap();
        }
        drop(sink);
        handle.join();
        let (seg, lines) = segment_lines(dir.path(), "gw_1");
        let mut chain = Chain::after(None);
        let mut forged = record(900, &today);
        forged.node = "gw\u{ff3f}1".into();
        chain.seal(&mut forged);
        let mut out = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            if i == 2 {
                forged.write_json(&mut out);
                out.push(b'\n');
            }
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        std::fs::write(&seg, &out).unwrap();
        let e = verify_dir(dir.path(), None).unwrap_err();
        assert!(
            matches!(&e, VerifyError::Foreign { message_id, .. } if message_id == "m-900"),
            "{e}"
        );
    }

    /// A head or an anchor is read only from its own node's file: a head naming another
    /// node, or a second head of a node, is refused (it could shadow the real one).
    #[test]
    fn a_head_or_anchor_under_another_nodes_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), (0..2).map(|i| record(i, &today())));
        let head = std::fs::read(Head::path(dir.path(), "n")).unwrap();
        std::fs::write(dir.path().join("head-n2.json"), &head).unwrap();
        let e = verify_dir(dir.path(), None).unwrap_err();
        assert!(e.to_string().contains("names node \"n\""), "{e}");
        std::fs::remove_file(dir.path().join("head-n2.json")).unwrap();
        let anchor = Anchor {
            node: "other".into(),
            retired_through: "2020-01-01".into(),
            last_hash: None,
            key: None,
            signature: None,
        };
        std::fs::write(
            dir.path().join("retired-n.json"),
            serde_json::to_vec(&anchor).unwrap(),
        )
        .unwrap();
        let e = verify_dir(dir.path(), None).unwrap_err();
        assert!(e.to_string().contains("names node \"other\""), "{e}");
    }

    fn pem_of(key: &crate::seal::SigningKey) -> Vec<u8> {
        // Tests keep the key itself; the writer is given its own copy from the PEM.
        key.pkcs8_pem().into_bytes()
    }

    fn write_all(dir: &Path, records: impl IntoIterator<Item = Record>) {
        let (sink, handle) = FileSink::start(dir, "n").unwrap();
        for r in records {
            sink.submit(r).unwrap();
        }
        drop(sink);
        handle.join();
    }

    /// Why `sink` turned unhealthy, which it must within 5 s.
    fn unhealthy_within_5_s(sink: &FileSink) -> String {
        let start = std::time::Instant::now();
        while sink.health().is_ok() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "not noticed"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        sink.health().unwrap_err().to_string()
    }

    #[test]
    fn a_quiet_sink_writes_a_record_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        // (Whichever file the writer chose: a test may run across midnight.)
        let written = || records_on_disk(dir.path());
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
    fn durable_records_are_reported_through_the_runtimes_relay_and_after_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::start(dir.path(), "n").unwrap();
        let durable = |rt: &tokio::runtime::Runtime, i: usize| {
            rt.block_on(async {
                let waits: Vec<Durable> = (0..50)
                    .map(|k| sink.submit_durable(&record(i + k, "2026-11-24")).unwrap())
                    .collect();
                for w in waits {
                    tokio::time::timeout(std::time::Duration::from_secs(5), w)
                        .await
                        .expect("reported within 5 s")
                        .unwrap();
                }
            })
        };
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        // This thread's tickets are completed by a relay task on its runtime.
        let first = runtime();
        durable(&first, 0);
        // That runtime shuts down: a new relay is made on the next one.
        drop(first);
        durable(&runtime(), 50);
        drop(sink);
        handle.join();
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, 100);
    }

    #[test]
    fn a_full_queue_refuses_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, handle) = FileSink::with_capacity(dir.path(), "n", 1, None).unwrap();
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
