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
//! written, a configuration file being edited) keeps what is in force, is logged and
//! counted, and is tried again at once when the files change again and otherwise after
//! 2 s, 4 s, ... up to a minute, until it works: a Secret changes once, and its new
//! certificate must not wait for someone to notice.
//!
//! A reload re-reads the whole configuration, so, as one asked for by an administrator,
//! it is recorded in the audit trail (by `certificate watcher`, operation `certificate
//! reload`, with the files that changed; a failure once per change, not at each retry)
//! and, with `fail_closed`, not made while the trail cannot record it.
//!
//! At each look it also reads the nextUpdate of the CRLs in force: a CRL within a day of
//! it is logged once as a warning, one past it once as an error (the certificates it
//! covers are then refused, see `certs::tls`, until a fresh CRL is put in place).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::state::Gateway;

/// Who made a reload the watcher started, in its record in the audit trail.
pub const WATCHER: &str = "certificate watcher";
/// The operation of that record.
pub const OPERATION: &str = "certificate reload";

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

/// What was said about one CRL: its file, its nextUpdate, whether it had passed.
type Announced = (PathBuf, i64, bool);

/// Logs, once each, a CRL of `crls` that comes within [`crate::config::CRL_NOTICE`] of its
/// nextUpdate (a warning) and one that passes it (an error). `announced` remembers what
/// was said about the CRLs in force.
fn announce_crls(
    crls: &[certs::inventory::CrlInfo],
    now: time::OffsetDateTime,
    announced: &mut HashSet<Announced>,
) {
    announced.retain(|(path, next, _)| {
        crls.iter()
            .any(|c| c.path == *path && c.next_update.map(|t| t.unix_timestamp()) == Some(*next))
    });
    for c in crls {
        let Some(next) = c.next_update else { continue };
        let passed = next <= now;
        if !passed && next > now + crate::config::CRL_NOTICE {
            continue;
        }
        if !announced.insert((c.path.clone(), next.unix_timestamp(), passed)) {
            continue;
        }
        let at = crate::pipeline::stamp::rfc3339_millis(next);
        let file = c.path.display();
        if passed {
            tracing::error!(%file, issuer = %c.issuer, next_update = %at, "a CRL passed its nextUpdate: the certificates of its CA are refused until a fresh CRL is put in place of this file");
        } else {
            tracing::warn!(%file, issuer = %c.issuer, next_update = %at, "a CRL reaches its nextUpdate within a day: publish a fresh one, or the certificates of its CA will be refused");
        }
    }
}

/// The longest wait between two attempts while a reload keeps failing.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Watches the TLS files of `gw` until the gateway is dropped.
pub fn spawn(gw: &Arc<Gateway>) {
    let weak = Arc::downgrade(gw);
    let files = gw.tls_files.load_full();
    let mut seen = (files.clone(), identities(&files));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // While the files in place do not load: when to try again, and the wait after.
        // A reload can fail for another reason than the certificates (a configuration
        // file being edited), and a Kubernetes Secret changes once: so it is tried
        // again, less and less often, until it works.
        let mut retry: Option<(tokio::time::Instant, Duration)> = None;
        let mut announced = HashSet::new();
        // The files changed since the last reload that worked, for the record.
        let mut pending = std::collections::BTreeSet::new();
        loop {
            tick.tick().await;
            let Some(gw) = weak.upgrade() else { return };
            announce_crls(
                &gw.crls.load(),
                time::OffsetDateTime::now_utc(),
                &mut announced,
            );
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
                retry = None;
                pending.clear();
                continue;
            }
            let changed = now != seen.1;
            let due = retry.is_some_and(|(at, _)| tokio::time::Instant::now() >= at);
            if !changed && !due {
                continue;
            }
            let which: Vec<String> = files
                .iter()
                .zip(seen.1.iter().zip(&now))
                .filter(|(_, (a, b))| a != b)
                .map(|(f, _)| f.display().to_string())
                .collect();
            pending.extend(which.iter().cloned());
            // A reload re-reads the whole configuration (consumers, authorisations, admin
            // tokens), so it is an administrators' change like any other: recorded in the
            // trail, and with `fail_closed` not made while the trail cannot record it
            // (tried again as a failed reload is).
            let reloaded = match gw.changes_recordable() {
                Err(e) => Err(format!("the audit trail cannot record the reload: {e}")),
                Ok(()) => {
                    let reloader = gw.clone();
                    match tokio::task::spawn_blocking(move || reloader.reload()).await {
                        Ok(reloaded) => reloaded.map_err(|e| e.to_string()),
                        Err(e) => {
                            tracing::error!(error = %e, "certificate reload task failed");
                            continue;
                        }
                    }
                }
            };
            let outcome = match reloaded {
                Ok(report) => {
                    metrics::counter!("fsp_certificate_reloads_total", "result" => "ok")
                        .increment(1);
                    tracing::warn!(changed = ?which, needs_restart = ?report.needs_restart, "certificate files changed: configuration and certificates reloaded");
                    // What was looked at before the reload: a change made while it ran
                    // is seen at the next look.
                    seen = (files, now);
                    retry = None;
                    Some((
                        http::StatusCode::OK,
                        format!("reloaded; changed: {}", report.changed),
                    ))
                }
                Err(e) => {
                    metrics::counter!("fsp_certificate_reloads_total", "result" => "failed")
                        .increment(1);
                    let wait = match retry {
                        Some((_, wait)) if !changed => (wait * 2).min(MAX_RETRY),
                        _ => POLL_EVERY,
                    };
                    tracing::error!(changed = ?which, error = %e, retry_in = ?wait, "certificate files changed but the reload failed: the certificates in force stay; retried until it works");
                    // Later looks compare with this one (a further change retries at
                    // once); until then `retry` paces the attempts.
                    seen = (files, now);
                    retry = Some((tokio::time::Instant::now() + wait, wait));
                    // A failure is recorded when files change, not at each retry.
                    changed.then(|| {
                        (
                            http::StatusCode::UNPROCESSABLE_ENTITY,
                            format!("not reloaded: {e}"),
                        )
                    })
                }
            };
            if let Some((status, said)) = outcome {
                let files = pending.iter().map(String::as_str).collect::<Vec<_>>();
                let said = format!("{said}; files changed: {}", files.join(", "));
                if status.is_success() {
                    pending.clear();
                }
                // (A failure to record is logged: the reload is made by now.)
                let _ = crate::admin::record_change(
                    &gw,
                    WATCHER,
                    std::net::IpAddr::from([127, 0, 0, 1]),
                    OPERATION.to_owned(),
                    status,
                    Some(said),
                )
                .await;
            }
        }
    });
}
