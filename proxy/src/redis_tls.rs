//! TLS to Redis renewed while the gateway runs. The files of `throttle.tls` and
//! `cluster.redis_tls` are watched with every other certificate file (`crate::certwatch`);
//! a reload that reads other material from them, for a Redis whose URL has not changed,
//! renews that link's client: a connection is made with the new material and, once it
//! works, replaces the one in use. Until then the connection in use stays, and the
//! attempt is repeated 2 s, 4 s, ... up to a minute apart: a client certificate that
//! Redis does not trust yet, or a CA bundle rotated before Redis's own certificate,
//! never takes a working throttle or cluster link down, and the new material is taken
//! as soon as Redis accepts it. A later change supersedes an attempt still repeating,
//! and one still connecting: the generation is checked again under the lock the swap
//! takes, so that the material in force is always the last read, never an earlier one
//! whose connection happened to take longer.
//!
//! A changed URL, or a link that was not configured at start, still needs a restart
//! (the reload report lists `throttle` or `cluster` under `needs_restart`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use throttle::redis::RedisTls;

/// The first wait after a failed attempt; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(2);
/// The longest wait between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Which connection to Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// `[throttle] backend = "redis"`.
    Throttle,
    /// `[cluster]`'s suspensions.
    Cluster,
}

impl Link {
    fn as_str(self) -> &'static str {
        match self {
            Self::Throttle => "throttle",
            Self::Cluster => "cluster",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Throttle => 0,
            Self::Cluster => 1,
        }
    }
}

/// What a link was started with, and the TLS material last asked of it.
struct Wanted {
    url: String,
    tls: Option<RedisTls>,
}

/// The TLS material of the gateway's Redis links, and the renewals under way.
pub struct Renewals {
    wanted: Mutex<[Option<Wanted>; 2]>,
    /// Incremented by each renewal of a link: an attempt whose generation is no longer
    /// the link's gives up.
    generations: Arc<[AtomicU64; 2]>,
}

impl std::fmt::Debug for Renewals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URLs: they may carry a password.
        f.debug_struct("Renewals")
            .field("generations", &self.generations)
            .finish_non_exhaustive()
    }
}

/// Where a renewed client goes.
#[derive(Debug)]
pub enum Target {
    Throttle(throttle::redis::Renewal),
    Cluster(Weak<crate::suspend::SuspensionStore>),
}

impl Target {
    /// One attempt; `None` when what it renews is gone, `Ok(false)` when it connected
    /// but `superseded` said, just before the swap, that later material was asked for.
    async fn attempt(
        &self,
        client: redis::Client,
        superseded: impl Fn() -> bool,
    ) -> Option<Result<bool, String>> {
        match self {
            Self::Throttle(r) => r
                .renew(client, superseded)
                .await
                .map(|r| r.map_err(|e| e.0)),
            Self::Cluster(store) => {
                let store = store.upgrade()?;
                Some(
                    store
                        .renew_client(client, superseded)
                        .await
                        .map_err(|e| e.to_string()),
                )
            }
        }
    }
}

impl Renewals {
    /// The links as started: each with its URL and TLS material (`None`: not configured).
    pub fn new(
        throttle: Option<(&str, Option<&RedisTls>)>,
        cluster: Option<(&str, Option<&RedisTls>)>,
    ) -> Self {
        let wanted = |l: Option<(&str, Option<&RedisTls>)>| {
            l.map(|(url, tls)| Wanted {
                url: url.to_owned(),
                tls: tls.cloned(),
            })
        };
        Self {
            wanted: Mutex::new([wanted(throttle), wanted(cluster)]),
            generations: Arc::default(),
        }
    }

    /// Renews `link`'s client when `url` is the one it was started with and `tls` is not
    /// the material last asked of it: in the background, until a connection with it
    /// works (see the module documentation). Whether a renewal was started.
    pub fn renew(&self, link: Link, url: &str, tls: Option<&RedisTls>, target: Target) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                link = link.as_str(),
                "the new TLS material for Redis cannot be taken without a runtime: it is taken at restart"
            );
            return false;
        };
        let mut wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = wanted[link.index()].as_mut() else {
            return false;
        };
        if w.url != url || w.tls.as_ref() == tls {
            return false;
        }
        // Made before the material is recorded as asked for: material that cannot make
        // a client is not recorded, so the next reload that reads it tries again.
        let client = match throttle::redis::client(url, tls) {
            Ok(c) => c,
            Err(e) => {
                // The configuration made the same client a moment ago.
                tracing::error!(link = link.as_str(), error = %e.0, "the new TLS material for Redis cannot be used: the connection in use stays");
                return false;
            }
        };
        w.tls = tls.cloned();
        let generation = self.generations[link.index()].fetch_add(1, Ordering::AcqRel) + 1;
        drop(wanted);
        runtime.spawn(attempts(
            link,
            generation,
            self.generations.clone(),
            client,
            target,
        ));
        true
    }
}

/// Tries `client` for `link` until it works, `generation` is superseded, or the target
/// is gone.
async fn attempts(
    link: Link,
    generation: u64,
    generations: Arc<[AtomicU64; 2]>,
    client: redis::Client,
    target: Target,
) {
    let current = || generations[link.index()].load(Ordering::Acquire) == generation;
    let mut wait = FIRST_RETRY;
    while current() {
        // Asked again once connected, under the lock the swap takes: a later change may
        // have come (and its connection be in use already) while this one connected.
        match target.attempt(client.clone(), || !current()).await {
            None | Some(Ok(false)) => return,
            Some(Ok(true)) => {
                metrics::counter!("fsp_redis_tls_renewals_total", "link" => link.as_str(), "result" => "ok").increment(1);
                tracing::warn!(
                    link = link.as_str(),
                    "TLS to Redis renewed: a connection with the new certificate files works and replaces the one in use"
                );
                return;
            }
            Some(Err(e)) => {
                metrics::counter!("fsp_redis_tls_renewals_total", "link" => link.as_str(), "result" => "failed").increment(1);
                tracing::error!(link = link.as_str(), error = %e, retry_in = ?wait, "Redis did not accept a connection with the new certificate files: the connection in use stays; retried until it works");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_RETRY);
    }
}
