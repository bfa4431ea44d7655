//! The lookup index of the file trail: beside each closed segment, a sidecar file
//! (`<segment>.idx`) listing, for every line, a key of its message id and where the line
//! starts, sorted by key. A lookup binary-searches each candidate segment's index (a few
//! dozen reads of 16 bytes) and reads only the lines it names, instead of reading the
//! segments: one message id among 10 million records answers in milliseconds even when
//! they were all written on one day.
//!
//! The index is a convenience, never the record: lines it names are parsed and their
//! message id compared; a segment without an index that fits it (missing, unreadable,
//! made for another file of that name, or covering more bytes than the segment holds) is
//! read whole, as before; bytes written after the index was made (a segment a restarted
//! gateway went on writing) are read after the indexed ones. The writer collects the
//! entries of the lines it writes and, when it closes a segment, a helper thread writes
//! them (a segment the writer went on after a restart is read again instead); at start,
//! closed segments without an index that fits them get one, at most half a core's worth
//! of reading at a time. Indexes are deleted with their segment. `fsp audit verify`
//! never reads them.
//!
//! Format: `FSPIDX01`, then (u64 little-endian each) the number of segment bytes
//! indexed, the number of entries and the key of the segment's first line (which tells
//! an index from one of an earlier file of the same name), then the entries: key and
//! offset (u64 LE each). The key is the 64-bit FNV-1a hash of the message id's text
//! (stable across versions and platforms; message ids are the gateway's own UUIDs, and
//! two sharing a key only cost a line read).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FSPIDX01";
const HEADER: u64 = 32;
const ENTRY: u64 = 16;
const MESSAGE_ID_MEMBER: &[u8] = b"\"message_id\":\"";

/// The index file of a segment.
pub fn index_path(segment: &Path) -> PathBuf {
    let mut name = segment.as_os_str().to_owned();
    name.push(".idx");
    PathBuf::from(name)
}

/// A little-endian u64 from 8 bytes of an index.
fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

/// The temporary file an index is written to before it is renamed into place.
fn tmp_path(index: &Path) -> PathBuf {
    let mut name = index.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// The key of a message id (64-bit FNV-1a).
pub fn key(message_id: &[u8]) -> u64 {
    message_id.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The key of a record line's message id, if it has one.
pub fn line_key(line: &[u8]) -> Option<u64> {
    message_id_of(line).map(key)
}

/// The message id of a record line, without parsing it (the member's text between its
/// quotes; message ids hold no escapes).
pub(crate) fn message_id_of(line: &[u8]) -> Option<&[u8]> {
    // The gateway writes it first; a line written otherwise is searched.
    let at = if line.get(1..1 + MESSAGE_ID_MEMBER.len()) == Some(MESSAGE_ID_MEMBER) {
        1
    } else {
        memchr::memmem::find(line, MESSAGE_ID_MEMBER)?
    } + MESSAGE_ID_MEMBER.len();
    let rest = &line[at..];
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

/// Writes the index of a closed segment (replacing any older one) from its lines, read
/// again. Returns how many lines it indexed.
pub fn build(segment: &Path) -> std::io::Result<u64> {
    let len = std::fs::metadata(segment)?.len();
    let mut entries: Vec<(u64, u64)> = Vec::new();
    crate::file::for_each_line_at(segment, 0, |_, at, line| {
        if at < len
            && let Some(k) = line_key(line)
        {
            entries.push((k, at));
        }
        Ok::<(), std::io::Error>(())
    })?;
    let count = entries.len() as u64;
    write(segment, entries, len)?;
    Ok(count)
}

/// The key of a segment's first line (of its first 4 KiB if no line ends there).
fn first_line_key(segment: &File) -> std::io::Result<u64> {
    let mut head = vec![0u8; 4096];
    let n = segment.read_at(&mut head, 0)?;
    let head = &head[..n];
    let end = memchr::memchr2(b'\n', 0, head).unwrap_or(head.len());
    Ok(key(&head[..end]))
}

/// Writes the index of `segment` from its entries (key, offset of the line), the first
/// `covered` bytes of the segment holding every line they stand for.
pub fn write(segment: &Path, mut entries: Vec<(u64, u64)>, covered: u64) -> std::io::Result<()> {
    entries.sort_unstable();
    let first = first_line_key(&File::open(segment)?)?;
    let path = index_path(segment);
    let tmp = tmp_path(&path);
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?,
    );
    out.write_all(MAGIC)?;
    out.write_all(&covered.to_le_bytes())?;
    out.write_all(&(entries.len() as u64).to_le_bytes())?;
    out.write_all(&first.to_le_bytes())?;
    for (k, off) in &entries {
        out.write_all(&k.to_le_bytes())?;
        out.write_all(&off.to_le_bytes())?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_data()?;
    std::fs::rename(&tmp, &path)?;
    // A segment retired meanwhile leaves no index behind.
    if !segment.exists() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// The index file and its temporary file, deleted (with their segment).
pub fn remove(segment: &Path) {
    let index = index_path(segment);
    let _ = std::fs::remove_file(tmp_path(&index));
    let _ = std::fs::remove_file(index);
}

/// What a segment's index says of a message id.
#[derive(Debug, PartialEq, Eq)]
pub struct Hits {
    /// Where the lines whose id has the key start, in the order they were written.
    pub offsets: Vec<u64>,
    /// The segment bytes the index covers: lines after are not in it.
    pub covered: u64,
}

/// A segment's index that fits it, opened.
struct Fitting {
    index: File,
    covered: u64,
    count: u64,
}

/// The segment's index if it has one that fits it: one of this format, made for this
/// file (its first line), covering no more than the segment holds; an unreadable one
/// does not fit.
fn fitting(segment: &Path) -> std::io::Result<Option<Fitting>> {
    let index = match File::open(index_path(segment)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, file = %index_path(segment).display(), "audit lookup index unreadable; the segment is read whole");
            return Ok(None);
        }
    };
    let seg = File::open(segment)?;
    let segment_len = seg.metadata()?.len();
    let Ok(index_len) = index.metadata().map(|m| m.len()) else {
        return Ok(None);
    };
    let mut header = [0u8; HEADER as usize];
    if index_len < HEADER || index.read_exact_at(&mut header, 0).is_err() {
        return Ok(None);
    }
    let (covered, count, first) = (
        word(&header[8..16]),
        word(&header[16..24]),
        word(&header[24..32]),
    );
    let fits = &header[..8] == MAGIC
        && covered <= segment_len
        && count.checked_mul(ENTRY).and_then(|b| b.checked_add(HEADER)) == Some(index_len)
        && first_line_key(&seg)? == first;
    Ok(fits.then_some(Fitting {
        index,
        covered,
        count,
    }))
}

/// Whether the segment has an index that fits it (see [`lookup`]).
pub fn fits(segment: &Path) -> bool {
    matches!(fitting(segment), Ok(Some(_)))
}

/// Looks a message id up in a segment's index; `None` when the segment has no index that
/// fits it (it must then be read whole).
pub fn lookup(segment: &Path, message_id: &str) -> std::io::Result<Option<Hits>> {
    let Some(Fitting {
        index,
        covered,
        count,
    }) = fitting(segment)?
    else {
        return Ok(None);
    };
    let wanted = key(message_id.as_bytes());
    let entry = |i: u64| -> std::io::Result<(u64, u64)> {
        let mut e = [0u8; ENTRY as usize];
        index.read_exact_at(&mut e, HEADER + i * ENTRY)?;
        Ok((word(&e[..8]), word(&e[8..])))
    };
    // (A read that fails half-way through the search leaves the segment to be read whole.)
    let search = || -> std::io::Result<Vec<u64>> {
        // The first entry whose key is not below the wanted one.
        let (mut lo, mut hi) = (0u64, count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if entry(mid)?.0 < wanted {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut offsets = Vec::new();
        let mut i = lo;
        while i < count {
            let (k, off) = entry(i)?;
            if k != wanted {
                break;
            }
            if off < covered {
                offsets.push(off);
            }
            i += 1;
        }
        Ok(offsets)
    };
    Ok(search().ok().map(|offsets| Hits { offsets, covered }))
}

/// The line that starts at `offset` (without its line break; cut at a zero byte), at
/// most `max` bytes.
pub fn line_at(file: &File, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let mut at = offset;
    loop {
        let n = file.read_at(&mut chunk, at)?;
        if n == 0 {
            return Ok(line);
        }
        if let Some(end) = memchr::memchr2(b'\n', 0, &chunk[..n]) {
            line.extend_from_slice(&chunk[..end]);
            return Ok(line);
        }
        line.extend_from_slice(&chunk[..n]);
        if line.len() > max {
            return Ok(line);
        }
        at += n as u64;
        if chunk.len() < 1 << 20 {
            chunk.resize(chunk.len() * 4, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn line(id: &str, status: u16) -> String {
        format!("{{\"message_id\":\"{id}\",\"status\":{status}}}\n")
    }

    #[test]
    fn an_index_names_every_line_of_an_id_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("audit-n-2026-12-04-000001.jsonl");
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&line(&format!("id-{i}"), 0));
        }
        text.push_str(&line("id-7", 200));
        std::fs::write(&seg, &text).unwrap();
        assert_eq!(lookup(&seg, "id-7").unwrap(), None, "no index yet");
        assert_eq!(build(&seg).unwrap(), 1001);
        let hits = lookup(&seg, "id-7").unwrap().unwrap();
        assert_eq!(hits.covered, text.len() as u64);
        let file = File::open(&seg).unwrap();
        let lines: Vec<String> = hits
            .offsets
            .iter()
            .map(|o| String::from_utf8(line_at(&file, *o, 1 << 20).unwrap()).unwrap())
            .collect();
        assert_eq!(
            lines,
            [line("id-7", 0).trim_end(), line("id-7", 200).trim_end()]
        );
        assert!(lookup(&seg, "id-1000").unwrap().unwrap().offsets.is_empty());

        // Lines written after the index are beyond what it covers.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(line("id-1000", 200).as_bytes())
            .unwrap();
        let hits = lookup(&seg, "id-1000").unwrap().unwrap();
        let mut after = Vec::new();
        crate::file::for_each_line_at(&seg, hits.covered, |_, _, l| {
            after.push(l.to_vec());
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
        assert_eq!(after, [line("id-1000", 200).trim_end().as_bytes()]);

        // A segment shorter than its index covers (cut, replaced): the index is not used.
        std::fs::write(&seg, line("id-7", 0)).unwrap();
        assert_eq!(lookup(&seg, "id-7").unwrap(), None);
        // Nor is the index of an earlier file of the same name, however long the new one.
        std::fs::write(&seg, text.replace("id-0\"", "id-x\"")).unwrap();
        assert_eq!(lookup(&seg, "id-7").unwrap(), None);
        // Nor is an index that is not one.
        std::fs::write(index_path(&seg), b"FSPIDX01 but not really").unwrap();
        assert_eq!(lookup(&seg, "id-7").unwrap(), None);
    }
}
