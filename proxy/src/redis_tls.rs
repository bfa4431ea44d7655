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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use certs::devpki::DevCa;
    use throttle::redis::RedisStore;
    use throttle::{Limit, Limits, Store};

    use super::*;

    /// A TLS-only relay to the test Redis that asks for client certificates of `ca`,
    /// lists the sessions it carries by CN, can end them (a certificate revoked), and
    /// can hold the next connection's handshake back for a while (a slow network).
    struct Relay {
        port: u16,
        accepted: Arc<AtomicUsize>,
        slow_next: Arc<AtomicBool>,
        sessions: Arc<Mutex<Vec<(String, tokio::task::AbortHandle)>>>,
        refused: Arc<Mutex<Vec<String>>>,
    }

    impl Relay {
        async fn start(ca: &DevCa, redis: &str) -> Self {
            let server = ca.server(&["localhost"]).unwrap();
            let acceptor =
                tokio_rustls::TlsAcceptor::from(Arc::new(server.server_tls(Some(ca)).unwrap()));
            let upstream = redis
                .strip_prefix("redis://")
                .expect("a redis:// URL")
                .trim_end_matches('/')
                .rsplit('@')
                .next()
                .unwrap()
                .to_owned();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let relay = Self {
                port: listener.local_addr().unwrap().port(),
                accepted: Arc::default(),
                slow_next: Arc::default(),
                sessions: Arc::default(),
                refused: Arc::default(),
            };
            let (accepted, slow_next, sessions, refused) = (
                relay.accepted.clone(),
                relay.slow_next.clone(),
                relay.sessions.clone(),
                relay.refused.clone(),
            );
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let slow = slow_next.swap(false, Ordering::SeqCst);
                    let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                    let (sessions, refused) = (sessions.clone(), refused.clone());
                    tokio::spawn(async move {
                        if slow {
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                        }
                        let Ok(mut tls) = acceptor.accept(socket).await else {
                            return;
                        };
                        let cn = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| certs::identity::common_name(c))
                            .unwrap_or_default();
                        if refused.lock().unwrap().contains(&cn) {
                            return;
                        }
                        let session = tokio::spawn(async move {
                            let mut redis =
                                tokio::net::TcpStream::connect(&upstream).await.unwrap();
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut redis).await;
                        });
                        sessions.lock().unwrap().push((cn, session.abort_handle()));
                    });
                }
            });
            relay
        }

        fn opened_by(&self, cn: &str) -> usize {
            let sessions = self.sessions.lock().unwrap();
            sessions.iter().filter(|(c, _)| c == cn).count()
        }

        /// Ends the sessions of `cn` and refuses it from now on.
        fn cut(&self, cn: &str) {
            self.refused.lock().unwrap().push(cn.to_owned());
            for (c, session) in self.sessions.lock().unwrap().iter() {
                if c == cn {
                    session.abort();
                }
            }
        }
    }

    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what}: not after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A renewal superseded by a later one while its connection was being made (a slow
    /// handshake) must not replace the later one's connection when it finally works:
    /// the material in force is the last one read, so that the earlier certificate can
    /// be revoked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_superseded_renewal_that_connects_late_does_not_replace_the_newer_one() {
        let Ok(redis) = std::env::var("FSP_TEST_REDIS_URL") else {
            eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set");
            return;
        };
        let ca = DevCa::new("Redis CA").unwrap();
        let relay = Relay::start(&ca, &redis).await;
        let rediss = format!("rediss://localhost:{}", relay.port);
        let material = |cn: &str| {
            let issued = ca.client(cn).unwrap();
            RedisTls {
                ca: Some(ca.cert_pem().into_bytes()),
                client: Some((issued.cert_pem.into_bytes(), issued.key_pem.into_bytes())),
            }
        };
        let (started, earlier, later) = (material("fsp-0"), material("fsp-1"), material("fsp-2"));
        let store = RedisStore::with_tls(
            &rediss,
            Some(&started),
            "fsp-test-renewal:",
            Duration::from_secs(5),
        )
        .unwrap();
        let limits = Limits {
            provider: None,
            consumer: Some(Limit {
                count: 1000,
                per: Duration::from_secs(1),
                burst: 1000,
            }),
        };
        let provider = format!("renewal-{}", std::process::id());
        let decided = |n: usize| {
            let (store, provider, limits) = (&store, &provider, &limits);
            async move { store.decide(provider, &format!("c{n}"), 0, limits).await }
        };
        decided(0).await.unwrap().unwrap();
        let renewals = Renewals::new(Some((&rediss, Some(&started))), None);

        // The earlier material's handshake is held back; the later one is read meanwhile.
        let accepted = relay.accepted.load(Ordering::SeqCst);
        relay.slow_next.store(true, Ordering::SeqCst);
        let target = || Target::Throttle(store.renewal());
        assert!(renewals.renew(Link::Throttle, &rediss, Some(&earlier), target()));
        eventually("the earlier attempt under way", || {
            relay.accepted.load(Ordering::SeqCst) > accepted
        })
        .await;
        assert!(renewals.renew(Link::Throttle, &rediss, Some(&later), target()));
        eventually("the later material connected", || {
            relay.opened_by("fsp-2") >= 1
        })
        .await;
        eventually("the earlier material connected", || {
            relay.opened_by("fsp-1") >= 1
        })
        .await;
        // Time for the earlier attempt to do what it does once connected.
        tokio::time::sleep(Duration::from_millis(500)).await;

        // The certificates before the last one revoked: decisions still go through.
        relay.cut("fsp-0");
        relay.cut("fsp-1");
        for n in 1..4 {
            decided(n)
                .await
                .expect("decided over the later material's connection")
                .unwrap();
        }
        assert_eq!(relay.opened_by("fsp-2"), 1);
    }
}
