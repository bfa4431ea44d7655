//! Certificate files watched for changes: certificates, keys, CAs and CRLs mounted from
//! Kubernetes Secrets change by a symlink swap (`..data` is pointed at a new directory),
//! and cert-manager or an operator's script may rewrite them in place. Every
//! [`POLL_EVERY`] the gateway looks at each file's identity (device, inode, size,
//! modification and change times, symlinks followed); when any differs, it reloads
//! through the same path as `POST /admin/reload`: everything is validated first and
//! swapped atomically, open connections keep their session, new handshakes get the new
//! certificate.
//!
//! A reload that fails (a key that does not match its new certificate yet, a file half
//! written) keeps what is in force, is logged and counted, and is tried again at the
//! next change of the files, so a certificate and its key written one after the other
//! are picked up once both are there.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::state::Gateway;

/// How often the files are looked at.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// What identifies one version of a file (None: the file cannot be read).
type Identity = Option<(u64, u64, u64, i64, i64, i64, i64)>;

fn identity(path: &PathBuf) -> Identity {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

fn identities(files: &[PathBuf]) -> Vec<Identity> {
    files.iter().map(identity).collect()
}

/// Watches the TLS files of `gw` until the gateway is dropped.
pub fn spawn(gw: &Arc<Gateway>) {
    let weak = Arc::downgrade(gw);
    let files = gw.tls_files.load_full();
    let mut seen = (files.clone(), identities(&files));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // The files of a reload that failed: not tried again until they change.
        let mut failed: Option<Vec<Identity>> = None;
        loop {
            tick.tick().await;
            let Some(gw) = weak.upgrade() else { return };
            let files = gw.tls_files.load_full();
            let now = {
                let files = files.clone();
                match tokio::task::spawn_blocking(move || identities(&files)).await {
                    Ok(now) => now,
                    Err(_) => continue,
                }
            };
            if files != seen.0 {
                // A reload named other files: they are the ones in force now.
                seen = (files, now);
                failed = None;
                continue;
            }
            if now == seen.1 || failed.as_ref() == Some(&now) {
                continue;
            }
            let changed: Vec<String> = files
                .iter()
                .zip(seen.1.iter().zip(&now))
                .filter(|(_, (a, b))| a != b)
                .map(|(f, _)| f.display().to_string())
                .collect();
            let reloader = gw.clone();
            match tokio::task::spawn_blocking(move || reloader.reload()).await {
                Ok(Ok(report)) => {
                    metrics::counter!("fsp_certificate_reloads_total", "result" => "ok")
                        .increment(1);
                    tracing::warn!(?changed, needs_restart = ?report.needs_restart, "certificate files changed: configuration and certificates reloaded");
                    // The reload may have named other files; compare with those next.
                    let files = gw.tls_files.load_full();
                    let ids = identities(&files);
                    seen = (files, ids);
                    failed = None;
                }
                Ok(Err(e)) => {
                    metrics::counter!("fsp_certificate_reloads_total", "result" => "failed")
                        .increment(1);
                    tracing::error!(?changed, error = %e, "certificate files changed but do not load: the certificates in force stay; retried when the files change again");
                    failed = Some(now);
                }
                Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
            }
        }
    });
}
