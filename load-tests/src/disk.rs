//! How long this machine's disk takes to make one small write durable, the way the file
//! audit trail writes its batches (one direct, synchronous 4 KiB write into a file
//! already long enough: `O_DIRECT | O_DSYNC`, no file size to change). Every call with
//! the trail written ahead waits for at least one such write, so with `c` calls in flight
//! and audit off at `r` calls per second (each call taking `c / r`), audit on can reach
//! at most `1 / (1 + w * r / c)` of audit off, whatever the gateway's own cost.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

/// The size of one write, and its alignment.
const BLOCK: usize = 4096;
/// The file written: writes go round it.
const FILE_BYTES: usize = 4 * 1024 * 1024;

/// The median time of `writes` synchronous direct 4 KiB writes to a file in `dir`
/// (removed after), measured with nothing else running.
pub fn sync_write_latency(dir: &Path, writes: usize) -> Result<Duration> {
    let path = dir.join("disk-probe");
    let result = probe(&path, writes);
    let _ = fs::remove_file(&path);
    result.with_context(|| format!("cannot time synchronous writes to {}", path.display()))
}

fn probe(path: &Path, writes: usize) -> Result<Duration> {
    {
        let mut f = File::create(path)?;
        std::io::Write::write_all(&mut f, &vec![0u8; FILE_BYTES])?;
        f.sync_all()?;
    }
    let flags = rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::DSYNC;
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    let mut buf = vec![b'x'; 2 * BLOCK];
    let off = buf.as_ptr().align_offset(BLOCK);
    let block = &mut buf[off..off + BLOCK];
    let mut times = Vec::with_capacity(writes);
    for i in 0..writes {
        let at = (i * BLOCK) % FILE_BYTES;
        let began = Instant::now();
        f.write_all_at(block, at as u64)?;
        times.push(began.elapsed());
    }
    times.sort_unstable();
    times
        .get(times.len() / 2)
        .copied()
        .context("no write was timed")
}

/// The most audit on / off can reach, at `c` calls in flight, with audit off at `rps`
/// calls per second and `write` per durable write (see the module documentation).
pub fn write_ahead_ceiling(write: Duration, rps: f64, c: u32) -> f64 {
    1.0 / (1.0 + write.as_secs_f64() * rps / f64::from(c))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_write_is_timed_and_the_probe_file_is_removed() {
        let dir = std::env::temp_dir().join(format!("fsp-disk-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        match sync_write_latency(&dir, 20) {
            Ok(w) => assert!(w > Duration::ZERO && w < Duration::from_secs(5), "{w:?}"),
            // tmpfs on older kernels and some overlay file systems refuse direct I/O.
            Err(e) if format!("{e:#}").contains("Invalid argument") => {
                eprintln!("skipped: {} refuses direct I/O ({e:#})", dir.display());
            }
            Err(e) => panic!("{e:#}"),
        }
        assert!(!dir.join("disk-probe").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ceiling_is_the_share_of_a_calls_time_left_to_the_call() {
        // 32 calls in flight at 32 000/s: 1 ms each; a 250 us write makes it 1.25 ms.
        let c = write_ahead_ceiling(Duration::from_micros(250), 32_000.0, 32);
        assert!((c - 0.8).abs() < 1e-9, "{c}");
        assert_eq!(write_ahead_ceiling(Duration::ZERO, 1000.0, 1), 1.0);
    }
}
