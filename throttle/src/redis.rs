//! The shared backend: every gateway replica throttles against one Redis.
//!
//! One Lua script does the decisions atomically: it reads Redis's own clock (so replicas
//! with skewed clocks agree), runs GCRA for the provider aggregate and for the consumer,
//! and updates both keys only when both admit the call. Keys expire when their state is
//! in the past, so idle consumers cost nothing. Every key a script run names shares its
//! provider's hash tag (`{provider}`), a limit that is not set included (its key is
//! named, never read or written: an emission interval of 0 says it is absent), so that
//! each script run stays within one Redis Cluster slot. The store itself connects to one
//! address: a Redis Cluster is reached through a cluster-aware proxy in front of it.
//!
//! Decisions are batched: calls hand theirs to one task, which sends every decision
//! waiting at that moment in one script run per provider (all in one write), then the
//! next batch while the first is answered... one batch in flight at a time, so under load
//! a batch holds what arrived during the last round trip. The script decides a batch's
//! calls one after the other, exactly as if each had come alone, so the bound and the
//! "a refused call consumes nothing" rule are those of one call per script.
//!
//! Each script run carries a deadline on Redis's clock, three quarters of the timeout
//! after its batch began: a run Redis starts later (Redis too slow; its calls have been
//! given up, or are about to be, and handled per `on_backend_error`) changes nothing,
//! no debit and no give-back, and its calls get an error. So calls refused because Redis
//! was slow do not use quota when Redis catches up; only a run started in time whose
//! answer then takes more than the last quarter of the timeout to come back debits
//! calls that are given up. The offset between Redis's clock and the gateway's is
//! estimated from a `TIME` when the connection is made, then from the clock every
//! answer carries (Redis's clock minus the local one when the answer arrives: below the
//! true offset by the answer's way back, so a run may be cut a little early, never
//! late). Behind a cluster-aware proxy the nodes' clocks must agree (NTP) to well
//! within the timeout: the estimate is shared by all of them.
//!
//! Leases (with [`RedisStore::with_leases`]): where a limit is high, a replica takes
//! several permits of a consumer's pair of keys in one decision and spends them locally
//! for at most [`LEASE_TTL`], so that most calls make no round trip. Permits are debited
//! in Redis when leased, so calls admitted from the start never exceed
//! `limit × T + burst` across replicas; a lease left unused is given back with the pair's
//! next decision, credited no further back than the TAT just after the replica's own
//! last debit (so another replica's spend since is never erased); permits leased under
//! limits a reload changed are dropped, not given back. The permits all replicas may
//! hold at once are at most [`LEASE_SHARE`] of each burst (a pair's, and the provider
//! aggregate's over all its pairs), so over any window the count admitted exceeds the
//! bound by at most that share (permits leased just before the window), and a pair
//! whose limits make that share less than two permits is decided call by call, exactly.
//! One renewal per pair is in flight; the pair's other calls meanwhile are decided one
//! by one. A refused call still consumes nothing. Emission intervals are whole
//! microseconds, rounded up (a limit is never loosened by rounding).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{RwLock, mpsc, oneshot};

use crate::{Debit, Limit, Limits, Scope, Spent, Throttled};

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- The run's deadline on this clock (µs; 0: none), after the calls' 8 arguments each: a
-- run that starts after it changes nothing (no debit, no give-back) and says so.
local deadline = tonumber(ARGV[#KEYS * 4 + 1]) or 0
if deadline > 0 and now > deadline then return {now, 1} end
local function keep(key, tat)
  -- PX in whole milliseconds, bounded (a number past 1e15 would be sent as 1e+15).
  local px = math.min(math.ceil((tat - now) / 1000) + 1000, 1e12)
  redis.call('SET', key, tat, 'PX', px)
end
-- How many permits a key can give now (math.huge: no limit, emission interval 0), its
-- TAT, and the wait when it can give none.
local function room(key, e, tol)
  if e == 0 then return math.huge, nil, 0 end
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local ahead = tat - now
  if ahead > tol then return 0, tat, ahead - tol end
  return math.floor((tol - ahead) / e) + 1, tat, 0
end
-- Gives back n permits' worth of time, never past `upto` (the TAT just after the
-- giver's last debit), so that what others spent since is not erased.
local function give_back(key, e, n, upto)
  if e == 0 or n <= 0 then return end
  local tat = tonumber(redis.call('GET', key))
  if not tat then return end
  local credit = math.min(n * e, math.max(0, upto - now))
  if credit <= 0 then return end
  tat = tat - credit
  if tat <= now then redis.call('DEL', key) return end
  keep(key, tat)
end
-- Redis's clock, 0 (decided), then five values per call.
local out = {now, 0}
for i = 0, #KEYS / 2 - 1 do
  local a = 8 * i
  local pk, ck = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local pe, pt = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local ce, ct = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local want, back = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  give_back(pk, pe, back, tonumber(ARGV[a + 7]))
  give_back(ck, ce, back, tonumber(ARGV[a + 8]))
  local kp, tp, wp = room(pk, pe, pt)
  local kc, tc, wc = room(ck, ce, ct)
  local k = math.min(want, kp, kc)
  local who, wait, dp, dc = 0, 0, 0, 0
  if k < 1 then
    k = 0
    -- The longer wait, so that a retry after it is not refused by the other limit.
    if kp < 1 then who, wait = 1, wp else who, wait = 2, wc end
    if kp < 1 and kc < 1 and wc > wp then wait = wc end
  else
    if tp then dp = tp + k * pe keep(pk, dp) end
    if tc then dc = tc + k * ce keep(ck, dc) end
  end
  out[5 * i + 3] = k
  out[5 * i + 4] = who
  out[5 * i + 5] = wait
  out[5 * i + 6] = dp
  out[5 * i + 7] = dc
end
return out
"#;

/// The most decisions sent in one batch.
const MAX_BATCH: usize = 256;
/// How long leased permits may be spent.
pub const LEASE_TTL: Duration = Duration::from_millis(20);
/// The share of a limit's burst that all replicas' leases may hold together.
pub const LEASE_SHARE: f64 = 0.05;

pub use crate::BackendError;

/// Throttling state shared by every replica, in Redis.
pub struct RedisStore {
    inner: Arc<Inner>,
    /// Where calls hand their decisions to the batching task.
    batches: mpsc::UnboundedSender<Pending>,
    /// With leases: how many replicas share the limits, and the permits this one holds.
    leases: Option<(u32, std::sync::Mutex<LeaseTable>)>,
}

/// The permits this replica holds, by provider.
#[derive(Debug, Default)]
struct LeaseTable {
    providers: std::collections::HashMap<String, ProviderLeases>,
    /// Renewals since the table was last swept of idle pairs.
    renewals: u32,
}

#[derive(Debug, Default)]
struct ProviderLeases {
    /// Permits held by all of the provider's pairs: each also holds the provider's
    /// aggregate key, whose share is capped too.
    held: u64,
    pairs: std::collections::HashMap<String, Lease>,
}

/// Permits of one (provider, consumer) pair, debited in Redis, spendable here.
#[derive(Debug)]
struct Lease {
    /// The limits they were taken under (emission and tolerance of both keys, µs).
    under: [u64; 4],
    permits: u64,
    /// When they were taken: spendable until [`LEASE_TTL`] after.
    taken: std::time::Instant,
    /// Each key's TAT (µs, Redis's clock) just after this replica's last debit: a give
    /// back never credits past it, so that it cannot erase another replica's spend.
    debited_to: [u64; 2],
    /// Permits asked for next time (grows while leases run out, shrinks while they
    /// expire unspent).
    size: u64,
    /// Permits to give back with the next decision (expired, or over a cap), taken
    /// under `under`.
    owed: u64,
    /// When a call of the pair asked for a lease and is waiting for the answer:
    /// meanwhile the pair's other calls are decided one by one, so that a lease that
    /// runs out under many concurrent calls is renewed once, not once per call.
    asking: Option<std::time::Instant>,
}

struct Inner {
    /// The client new connections are made with: replaced by [`Renewal::renew`] once a
    /// connection made with its successor works.
    client: std::sync::Mutex<redis::Client>,
    conn: RwLock<Option<redis::aio::ConnectionManager>>,
    script: redis::Script,
    timeout: Duration,
    prefix: String,
    /// Decisions sent to Redis so far (one per call without a lease).
    sent: std::sync::atomic::AtomicU64,
    /// The origin of the local clock runs' deadlines are reckoned on (see
    /// [`Inner::local_micros`]).
    epoch: std::time::Instant,
    /// Redis's clock minus the local one (µs), as estimated: see [`Inner::estimate`].
    offset: std::sync::Mutex<Offset>,
}

/// The estimate of Redis's clock minus the local one (µs). Every sample is a lower
/// bound (Redis read its clock before its answer left), below the true offset by that
/// answer's way back: the largest is the closest. The largest of the last two windows
/// of [`OFFSET_WINDOW`] is kept, so that one slow answer does not carry its error into
/// the next batch's deadline, and a clock stepped back is followed within two windows.
#[derive(Debug, Default)]
struct Offset {
    /// The largest sample of the window that began at `since`, and of the one before.
    current: Option<i64>,
    previous: Option<i64>,
    since: i64,
}

/// How long a window of [`Offset`] samples lasts (µs).
const OFFSET_WINDOW: i64 = 10_000_000;

impl Offset {
    fn sample(&mut self, offset: i64, at: i64) {
        if self.current.is_none() || at.saturating_sub(self.since) > OFFSET_WINDOW {
            self.previous = self.current.take();
            self.since = at;
        }
        self.current = Some(self.current.map_or(offset, |c| c.max(offset)));
    }

    fn best(&self) -> Option<i64> {
        match (self.current, self.previous) {
            (Some(c), Some(p)) => Some(c.max(p)),
            (c, p) => c.or(p),
        }
    }
}

/// One call's decision, waiting for its batch.
struct Pending {
    provider: String,
    /// The provider aggregate's key and the consumer's (named even when its limit is
    /// not set: see [`keys`]).
    keys: [String; 2],
    /// Emission interval and tolerance (µs) of each.
    args: [u64; 4],
    /// Permits asked for (1 without a lease), given back, and how far back (see
    /// [`Lease::debited_to`]).
    want: u64,
    back: u64,
    debited_to: [u64; 2],
    reply: oneshot::Sender<Result<Answer, BackendError>>,
    /// Only gives permits back (nobody waits for its answer): sent even though its
    /// reply has no receiver.
    give_back_only: bool,
}

/// Redis's answer to one decision.
#[derive(Clone, Copy, Debug, Default)]
struct Answer {
    /// Permits granted (0: refused).
    granted: u64,
    /// Who refused (1 provider, 2 consumer) and how long to wait (µs).
    who: u8,
    wait: u64,
    /// Each key's TAT after the debit.
    debited_to: [u64; 2],
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

/// The keys of a provider's aggregate and of one consumer at that provider, both named
/// whether or not their limits are set: under one hash tag, the provider's id, so that
/// one script run touches one Redis Cluster slot. In the tag, `{`, `}` and `%` of the id
/// are percent-encoded and an empty id is `%`, so that the tag is never empty and ends
/// where the id does: two providers never share a key, whatever their ids (ids without
/// those characters, all ids in practice, keep the keys of earlier versions, so replicas
/// of two versions agree during a rolling upgrade).
fn keys(prefix: &str, provider: &str, consumer: &str) -> [String; 2] {
    let tag: std::borrow::Cow<'_, str> = if provider.is_empty() {
        "%".into()
    } else if provider.contains(['{', '}', '%']) {
        provider
            .replace('%', "%25")
            .replace('{', "%7B")
            .replace('}', "%7D")
            .into()
    } else {
        provider.into()
    };
    [
        format!("{prefix}{{{tag}}}:all"),
        format!("{prefix}{{{tag}}}:c:{consumer}"),
    ]
}

/// The hash tag Redis Cluster places a key by: what lies between its first `{` and the
/// next `}`, when that is not empty; else the whole key.
#[cfg(test)]
fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key)
}

/// Nanoseconds to whole microseconds, rounded up: a limit is never loosened by rounding.
fn micros(d: u64) -> u64 {
    d.div_ceil(1000).max(1)
}

/// TLS to Redis (`rediss://` URLs): the PEM trust anchors of the server's certificate
/// (the system's when `None`), and a PEM client certificate and key to present, if any.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTls {
    pub ca: Option<Vec<u8>>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// A client of the Redis at `url`: over TLS for a `rediss://` URL, the server's
/// certificate checked against `tls`'s trust anchors (the system's without them) and
/// its name against the URL's host, presenting `tls`'s client certificate if it has one.
/// The error never repeats the URL (it may carry a password).
pub fn client(url: &str, tls: Option<&RedisTls>) -> Result<redis::Client, BackendError> {
    // Read as the redis crate reads it (the scheme in any case, tabs and newlines
    // dropped), so that what is checked here is what it connects with.
    let parsed = redis::parse_redis_url(url);
    let over_tls = parsed
        .as_ref()
        .is_some_and(|u| matches!(u.scheme(), "rediss" | "valkeys"));
    if over_tls && parsed.as_ref().is_some_and(|u| u.fragment().is_some()) {
        return Err(BackendError(
            "a rediss:// URL with a #fragment (#insecure would not check Redis's certificate): \
             remove it, and give the CA that issued Redis's certificate instead"
                .into(),
        ));
    }
    if !over_tls {
        if tls.is_some() {
            return Err(BackendError(
                "TLS settings are given for a Redis URL that is not rediss://".into(),
            ));
        }
        return redis::Client::open(url).map_err(|e| BackendError(e.to_string()));
    }
    let certs = redis::TlsCertificates {
        client_tls: tls
            .and_then(|t| t.client.as_ref())
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
        root_cert: tls.and_then(|t| t.ca.clone()),
    };
    redis::Client::build_with_tls(url, certs).map_err(|e| BackendError(e.to_string()))
}

impl RedisStore {
    /// A store on `url`; connects in the background (a Redis that is down at start-up is
    /// handled like one that goes down later). Each decision waits at most `timeout`.
    ///
    /// Call it within the Tokio runtime that should run the batching task (it lives as
    /// long as that runtime: the gateway's control runtime).
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, BackendError> {
        Self::with_tls(url, None, prefix, timeout)
    }

    /// [`RedisStore::new`], with TLS settings for a `rediss://` URL (see [`client`]).
    pub fn with_tls(
        url: &str,
        tls: Option<&RedisTls>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        // The URL may carry a password: the error does not repeat it.
        let client = client(url, tls)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| BackendError("the Redis throttle needs a Tokio runtime".into()))?;
        let inner = Arc::new(Inner {
            client: std::sync::Mutex::new(client),
            conn: RwLock::default(),
            script: redis::Script::new(SCRIPT),
            timeout,
            prefix: prefix.to_owned(),
            sent: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            offset: std::sync::Mutex::new(Offset::default()),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        runtime.spawn(batches(inner.clone(), rx, tx.downgrade()));
        Ok(Self {
            inner,
            batches: tx,
            leases: None,
        })
    }

    /// Lets this replica lease permits (see the module documentation); `replicas`: how
    /// many gateways share the limits.
    #[must_use]
    pub fn with_leases(mut self, replicas: u32) -> Self {
        self.leases = Some((replicas.max(1), std::sync::Mutex::default()));
        self
    }

    /// What renews this store's TLS material while it runs (see [`Renewal`]).
    pub fn renewal(&self) -> Renewal {
        Renewal(Arc::downgrade(&self.inner))
    }

    /// Decisions sent to Redis so far (calls spent from a lease send none).
    pub fn decisions_sent(&self) -> u64 {
        self.inner.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Admits or refuses one call, atomically across every replica sharing this Redis.
    pub async fn check(
        &self,
        provider: &str,
        consumer: &str,
        limits: &Limits,
    ) -> Result<Result<Spent, Throttled>, BackendError> {
        if limits.provider.is_none() && limits.consumer.is_none() {
            return Ok(Ok(Spent::default()));
        }
        // An absent limit: emission interval 0 (a limit's is at least 1 µs, rounded up).
        let args =
            |l: &Option<Limit>| l.map_or((0, 0), |l| (micros(l.emission()), l.tolerance() / 1000));
        let (pe, pt) = args(&limits.provider);
        let (ce, ct) = args(&limits.consumer);
        let under = [pe, pt, ce, ct];
        let one_by_one = || async {
            self.ask(provider, consumer, limits, under, 1, 0, [0, 0])
                .await
                .map(|(answer, d)| {
                    d.map(|()| {
                        Spent(Debit::Redis {
                            under,
                            debited_to: answer.debited_to,
                        })
                    })
                })
        };
        let leased = |taken| Spent(Debit::Lease { under, taken });
        let Some((replicas, table)) = &self.leases else {
            return one_by_one().await;
        };
        // Permits per lease, and held for the provider's aggregate key: together, the
        // replicas hold at most LEASE_SHARE of each burst.
        let share = |l: &Option<Limit>| {
            l.map(|l| ((f64::from(l.burst.max(1)) * LEASE_SHARE) / f64::from(*replicas)) as u64)
        };
        let provider_cap = share(&limits.provider).unwrap_or(u64::MAX);
        let cap = share(&limits.consumer)
            .unwrap_or(u64::MAX)
            .min(provider_cap);
        if cap < 2 {
            return one_by_one().await;
        }
        let now = std::time::Instant::now();
        let lock = || {
            table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let renewal = {
            let mut table = lock();
            let t = &mut *table;
            let leases = t.providers.entry(provider.to_owned()).or_default();
            match leases.pairs.get_mut(consumer) {
                Some(l)
                    if l.under == under
                        && l.permits > 0
                        && now.duration_since(l.taken) < LEASE_TTL =>
                {
                    l.permits -= 1;
                    leases.held -= 1;
                    return Ok(Ok(leased(l.taken)));
                }
                Some(l)
                    if l.asking
                        .is_some_and(|at| now.duration_since(at) < self.inner.timeout * 2) =>
                {
                    None
                }
                Some(l) => {
                    l.asking = Some(now);
                    // Spent in time: ask for more; expired unspent: for fewer.
                    l.size = if l.permits == 0 {
                        (l.size * 2).min(cap)
                    } else {
                        (l.size / 2).max(2)
                    };
                    leases.held -= l.permits;
                    let unspent = std::mem::take(&mut l.owed) + std::mem::take(&mut l.permits);
                    // Permits taken under other limits are dropped, not given back:
                    // their worth in time was the old limits' (dropping wastes them,
                    // which is safe).
                    let back = if l.under == under { unspent } else { 0 };
                    let room = provider_cap.saturating_sub(leases.held);
                    Some((l.size.min(room).max(1), back, l.debited_to, true))
                }
                // A pair's first call asks for two: a lease begins when both come.
                None => Some((
                    2.min(provider_cap.saturating_sub(leases.held)).max(1),
                    0,
                    [0, 0],
                    false,
                )),
            }
        };
        // Another call of the pair is renewing its lease: this one is decided alone.
        let Some((want, back, debited_to, renewing)) = renewal else {
            return one_by_one().await;
        };
        // Cleared however the asking call ends, even if it is dropped while it waits.
        let mut asking = AskingGuard {
            table,
            provider,
            consumer,
            armed: renewing,
        };
        let asked = self
            .ask(provider, consumer, limits, under, want, back, debited_to)
            .await;
        let mut table = lock();
        asking.armed = false;
        let t = &mut *table;
        t.renewals = t.renewals.wrapping_add(1);
        if t.renewals.is_multiple_of(1024) {
            sweep(t, now);
        }
        let leases = t.providers.entry(provider.to_owned()).or_default();
        // On an error, whether given-back permits came back is not known (a run cut at its
        // deadline gave back nothing): they are not owed again. Dropping them is safe:
        // they were debited, so it wastes them, it never admits more.
        let (answer, decision) = match asked {
            Ok(a) => a,
            Err(e) => {
                if renewing && let Some(l) = leases.pairs.get_mut(consumer) {
                    l.asking = None;
                }
                return Err(e);
            }
        };
        let l = leases
            .pairs
            .entry(consumer.to_owned())
            .or_insert_with(|| Lease {
                under,
                permits: 0,
                taken: now,
                debited_to: [0, 0],
                size: want.max(2),
                owed: 0,
                asking: None,
            });
        // Only the renewal clears its mark (a pair's first calls set none).
        if renewing {
            l.asking = None;
        }
        if answer.granted > 0 {
            // Permits another call of the pair leased meanwhile, still fresh, are kept
            // with these; stale ones are owed back (under the same limits) or dropped.
            let fresh = l.under == under && now.duration_since(l.taken) < LEASE_TTL;
            leases.held -= l.permits;
            let stale = if fresh {
                0
            } else {
                std::mem::take(&mut l.permits)
            };
            if l.under == under {
                l.owed += stale;
            } else {
                l.owed = 0;
            }
            let total = l.permits + answer.granted - 1;
            let room = provider_cap.saturating_sub(leases.held);
            l.permits = total.min(cap).min(room);
            l.owed += total - l.permits;
            leases.held += l.permits;
            l.under = under;
            l.taken = now;
            l.debited_to = answer.debited_to;
        }
        // The call's own permit is one of the lease's (the one taken now).
        Ok(decision.map(|()| leased(now)))
    }

    /// Gives back what a call this store admitted `spent` (see [`Spent`]): a permit of
    /// this replica's lease is owed back to Redis with the pair's next decision (if
    /// that lease is still the pair's); a decision made alone is credited in Redis
    /// by a script run of its own, sent with the next batch and not waited for (one that
    /// fails or comes too late gives nothing back, which is safe: the permit is wasted,
    /// never granted twice).
    pub fn give_back(&self, provider: &str, consumer: &str, spent: Spent) {
        match spent.0 {
            Debit::Nothing | Debit::Local(_) => {}
            Debit::Lease { under, taken } => {
                let Some((_, table)) = &self.leases else {
                    return;
                };
                let mut table = table
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(leases) = table.providers.get_mut(provider) else {
                    return;
                };
                let Some(l) = leases.pairs.get_mut(consumer) else {
                    return;
                };
                // Only to the lease that gave it, under the same limits: its debit in
                // Redis is that lease's (a permit of an earlier lease, whose debit may
                // have elapsed, is dropped: wasting it is safe). Owed back to Redis with
                // the pair's next decision, credited no further back than the lease's
                // own debit, rather than spent here again: the lease would then hold
                // more than its share of the burst.
                if l.under == under && l.taken == taken {
                    l.owed += 1;
                }
            }
            Debit::Redis { under, debited_to } => {
                let (reply, _) = oneshot::channel();
                let _ = self.batches.send(Pending {
                    provider: provider.to_owned(),
                    keys: keys(&self.inner.prefix, provider, consumer),
                    args: under,
                    want: 0,
                    back: 1,
                    debited_to,
                    reply,
                    give_back_only: true,
                });
            }
        }
    }

    /// One decision through the batch: `want` permits, after giving `back` permits
    /// back (credited no further back than `debited_to`).
    #[allow(clippy::too_many_arguments)]
    async fn ask(
        &self,
        provider: &str,
        consumer: &str,
        limits: &Limits,
        under: [u64; 4],
        want: u64,
        back: u64,
        debited_to: [u64; 2],
    ) -> Result<(Answer, Result<(), Throttled>), BackendError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            provider: provider.to_owned(),
            keys: keys(&self.inner.prefix, provider, consumer),
            args: under,
            want,
            back,
            debited_to,
            reply,
            give_back_only: false,
        };
        self.batches
            .send(pending)
            .map_err(|_| BackendError("the throttling batch task has stopped".into()))?;
        // A decision may wait for the batch before it (one in flight), then its own.
        let wait = self.inner.timeout * 2;
        let answer = tokio::time::timeout(wait, answer)
            .await
            .map_err(|_| BackendError(format!("no answer within {wait:?}")))?
            .map_err(|_| BackendError("the throttling batch task has stopped".into()))??;
        let decision = match (answer.granted, answer.who) {
            (1.., _) => Ok(()),
            (0, who @ (1 | 2)) => {
                let (scope, limit) = if who == 1 {
                    (Scope::Provider, limits.provider)
                } else {
                    (Scope::Consumer, limits.consumer)
                };
                Err(Throttled {
                    scope,
                    limit: limit.unwrap_or(Limit {
                        count: 1,
                        per: Duration::from_secs(1),
                        burst: 1,
                    }),
                    retry_after: Duration::from_micros(answer.wait),
                })
            }
            (_, other) => return Err(BackendError(format!("unexpected script answer {other}"))),
        };
        Ok((answer, decision))
    }
}

/// Clears a pair's `asking` mark if the call that set it goes away before its answer.
struct AskingGuard<'a> {
    table: &'a std::sync::Mutex<LeaseTable>,
    provider: &'a str,
    consumer: &'a str,
    armed: bool,
}

impl Drop for AskingGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(l) = table
            .providers
            .get_mut(self.provider)
            .and_then(|p| p.pairs.get_mut(self.consumer))
        {
            l.asking = None;
        }
    }
}

/// Forgets pairs idle for a while (their unspent permits were debited; dropping them
/// is safe), and providers left without pairs.
fn sweep(table: &mut LeaseTable, now: std::time::Instant) {
    for leases in table.providers.values_mut() {
        leases.pairs.retain(|_, l| {
            let keep = l.asking.is_some() || now.duration_since(l.taken) < Duration::from_secs(10);
            if !keep {
                leases.held -= l.permits;
            }
            keep
        });
    }
    table.providers.retain(|_, p| !p.pairs.is_empty());
}

/// The batching task: sends what waits, one batch in flight at a time, until every
/// sender is gone. `again` queues the give-backs of decisions whose calls went away
/// while their batch was in flight.
async fn batches(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    again: mpsc::WeakUnboundedSender<Pending>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // A call that stopped waiting (timed out, or its client left) is not decided:
        // deciding it would consume a permit nobody uses. A give-back waits for nobody.
        batch.retain(|p| p.give_back_only || !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        inner
            .sent
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let answers = match tokio::time::timeout(inner.timeout, inner.decide(&batch, started)).await
        {
            Ok(answers) => answers,
            Err(_) => {
                let e = BackendError(format!("no answer within {:?}", inner.timeout));
                batch.iter().map(|_| Err(e.clone())).collect()
            }
        };
        for (p, a) in batch.drain(..).zip(answers) {
            if p.give_back_only {
                continue;
            }
            let Err(Ok(answer)) = p.reply.send(a) else {
                continue;
            };
            // Decided for a call that went away while its batch was in flight (its
            // consumer left): nobody spends what Redis granted, so it is given back, as
            // a call refused after its admission gives its permit back.
            if answer.granted > 0
                && let Some(again) = again.upgrade()
            {
                let (reply, _) = oneshot::channel();
                let _ = again.send(Pending {
                    want: 0,
                    back: answer.granted,
                    debited_to: answer.debited_to,
                    reply,
                    give_back_only: true,
                    ..p
                });
            }
        }
    }
}

/// Renews the client a [`RedisStore`] connects with (its certificates rotated, say),
/// without holding on to the store: the connection in use stays until a connection made
/// with the new client works, and only then is it replaced, so that a Secret rotated to
/// material Redis does not accept yet never takes working throttling down.
#[derive(Clone, Debug)]
pub struct Renewal(std::sync::Weak<Inner>);

impl Renewal {
    /// Connects with `client` (within the store's timeout) and, when that works, makes it
    /// the store's client and the connection its decisions go through, unless
    /// `superseded` then says that other material was asked for since: it is asked under
    /// the lock the swap takes, so that a renewal whose connection took longer than a
    /// later one's never replaces it (`Ok(false)`: nothing replaced). `None`: the store
    /// is gone.
    pub async fn renew(
        &self,
        client: redis::Client,
        superseded: impl Fn() -> bool,
    ) -> Option<Result<bool, BackendError>> {
        let inner = self.0.upgrade()?;
        let connected = match inner.connect(&client).await {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let mut slot = inner.conn.write().await;
        if superseded() {
            return Some(Ok(false));
        }
        *inner
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        // Decisions in flight on the old connection finish on it; it closes with its
        // last clone.
        *slot = Some(connected);
        Some(Ok(true))
    }
}

/// A reconnecting connection to `client`'s Redis, made within `timeout`, whose every
/// command gets an answer or an error within `timeout`: the settings every user of
/// Redis in the gateway (throttling, the cluster's suspensions) shares, so that Redis
/// away costs each of them the same bounded wait.
pub async fn managed_connection(
    client: &redis::Client,
    timeout: Duration,
) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    tokio::time::timeout(timeout, client.get_connection_manager_with_config(config))
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("Redis did not answer within {timeout:?}"),
            ))
        })?
}

impl Inner {
    async fn connection(&self) -> Result<redis::aio::ConnectionManager, BackendError> {
        if let Some(c) = self.conn.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut slot = self.conn.write().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let client = self
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let c = self.connect(&client).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A connection made with `client`, and a first estimate of Redis's clock through it.
    async fn connect(
        &self,
        client: &redis::Client,
    ) -> Result<redis::aio::ConnectionManager, BackendError> {
        let mut c = managed_connection(client, self.timeout)
            .await
            .map_err(|e| BackendError(e.to_string()))?;
        // A first estimate of Redis's clock, so that the first batch has a deadline too;
        // a connection is kept only with one.
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut c)
            .await
            .map_err(|e| BackendError(format!("Redis's clock (TIME): {e}")))?;
        self.estimate(
            secs.saturating_mul(1_000_000).saturating_add(micros),
            std::time::Instant::now(),
        );
        Ok(c)
    }

    /// Microseconds from [`Inner::epoch`] to `at`: a monotonic clock, so that a step of
    /// the local wall clock (NTP, an operator) cannot move a deadline.
    fn local_micros(&self, at: std::time::Instant) -> i64 {
        i64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(i64::MAX)
    }

    /// Takes `redis_now` (Redis's clock, µs), received at `received`, as a sample of the
    /// offset between Redis's clock and the local one. Redis read its clock before the
    /// answer left, so each sample is below the true offset by the answer's way back:
    /// deadlines derived from them fall early on Redis's clock, never late. The best
    /// recent one is kept (see [`Offset`]).
    fn estimate(&self, redis_now: u64, received: std::time::Instant) {
        let redis_now = i64::try_from(redis_now).unwrap_or(i64::MAX);
        let local = self.local_micros(received);
        self.offset
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sample(redis_now.saturating_sub(local), local);
    }

    /// The deadline on Redis's clock (µs) of the script runs of a batch that began at
    /// `started`: three quarters of the timeout later. The batch is given up a whole
    /// timeout after it began; the last quarter is left for the script itself and the
    /// answer's way back, so that a run Redis starts in time is answered in time (a run
    /// that debits while its calls are refused would need an answer slower on its way
    /// back than a quarter of the timeout), and a slower Redis is cut rather than
    /// refused calls charged. Without an estimate of Redis's clock (not reached: a
    /// connection is made with one) the deadline is long past: the run changes nothing,
    /// and its answer brings an estimate.
    fn deadline(&self, started: std::time::Instant) -> u64 {
        let Some(offset) = self
            .offset
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .best()
        else {
            return 1;
        };
        let local = self.local_micros(started + self.timeout * 3 / 4);
        u64::try_from(local.saturating_add(offset).max(1)).unwrap_or(1)
    }

    /// Decides a batch that began at `started`: one script run per provider (its keys
    /// share a hash slot), all sent before the first answer is read, each with the
    /// batch's [deadline](Inner::deadline); answers in the batch's order (a provider
    /// whose run failed or came too late gets its error, the others their answers).
    async fn decide(
        &self,
        batch: &[Pending],
        started: std::time::Instant,
    ) -> Vec<Result<Answer, BackendError>> {
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => return batch.iter().map(|_| Err(e.clone())).collect(),
        };
        let deadline = self.deadline(started);
        // Providers in order of first appearance; calls keep their order within each.
        let mut providers: Vec<&str> = Vec::new();
        for p in batch {
            if !providers.contains(&p.provider.as_str()) {
                providers.push(&p.provider);
            }
        }
        let runs = providers.iter().map(|provider| {
            let mut invocation = self.script.prepare_invoke();
            for p in batch.iter().filter(|p| p.provider == *provider) {
                invocation.key(&p.keys[0]).key(&p.keys[1]);
                for a in p.args {
                    invocation.arg(a);
                }
                invocation
                    .arg(p.want)
                    .arg(p.back)
                    .arg(p.debited_to[0])
                    .arg(p.debited_to[1]);
            }
            invocation.arg(deadline);
            let mut conn = conn.clone();
            async move {
                let values = invocation
                    .invoke_async::<Vec<u64>>(&mut conn)
                    .await
                    .map_err(|e| BackendError(e.to_string()))?;
                if let Some(&redis_now) = values.first() {
                    self.estimate(redis_now, std::time::Instant::now());
                }
                Ok::<_, BackendError>(values)
            }
        });
        let answers = join_all(runs).await;
        let mut out: Vec<Result<Answer, BackendError>> =
            batch.iter().map(|_| Ok(Answer::default())).collect();
        for (provider, answer) in providers.iter().zip(answers) {
            let slots = out
                .iter_mut()
                .zip(batch)
                .filter(|(_, p)| p.provider == *provider);
            match answer.and_then(|values| match values.get(1) {
                Some(0) => Ok(values),
                Some(1) => Err(BackendError(
                    "Redis reached the throttling decision after its deadline (Redis too slow \
                     to answer in time): nothing was debited"
                        .into(),
                )),
                _ => Err(BackendError(format!(
                    "unexpected answer from the throttling script: {values:?}"
                ))),
            }) {
                Ok(values) => {
                    let mut each = values[2..].chunks_exact(5);
                    for (slot, _) in slots {
                        *slot = each
                            .next()
                            .map(|v| Answer {
                                granted: v[0],
                                who: u8::try_from(v[1]).unwrap_or(u8::MAX),
                                wait: v[2],
                                debited_to: [v[3], v[4]],
                            })
                            .ok_or_else(|| {
                                BackendError(
                                    "the script answered fewer decisions than asked".into(),
                                )
                            });
                    }
                }
                Err(e) => {
                    for (slot, _) in slots {
                        *slot = Err(e.clone());
                    }
                }
            }
        }
        out
    }
}

/// Runs the futures concurrently (one connection, so their commands are written
/// together) and gives their outputs in order.
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    // The first is awaited while the others are already written: a multiplexed
    // connection sends each command when its future is first polled, so poll them all.
    let mut pending: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (f, slot) in set.iter_mut().zip(pending.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(pending.into_iter().flatten());
    out
}

impl RedisStore {
    /// Whether Redis answers a `PING` within the decision timeout (for readiness).
    pub async fn ping(&self) -> Result<(), BackendError> {
        let run = async {
            let mut conn = self.inner.connection().await?;
            let pong: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| BackendError(e.to_string()))?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(BackendError(format!("unexpected answer to PING: {pong}")))
            }
        };
        tokio::time::timeout(self.inner.timeout, run)
            .await
            .map_err(|_| BackendError(format!("no answer within {:?}", self.inner.timeout)))?
    }
}

impl crate::Store for RedisStore {
    async fn decide(
        &self,
        provider: &str,
        consumer: &str,
        _now: u64,
        limits: &Limits,
    ) -> Result<Result<Spent, Throttled>, BackendError> {
        self.check(provider, consumer, limits).await
    }

    fn give_back(&self, provider: &str, consumer: &str, _now: u64, spent: Spent) {
        RedisStore::give_back(self, provider, consumer, spent);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_script_run_names_keys_of_one_cluster_slot_whatever_limits_are_set() {
        let pairs = [
            ("rrn", "ville-bxl"),
            ("a}b", "c{d}"),
            ("ksz-bcss", "{other}"),
            ("", "x"),
            ("}x", "y"),
            ("%", "z"),
            ("%25", "z"),
            // Ids made to collide if the tag ended inside the provider's id.
            ("q", "z}:all"),
            ("q}:c:z", "w"),
            ("q", "x}:c:y"),
            ("q}:c:x", "y"),
        ];
        let mut seen = std::collections::HashMap::new();
        for (provider, consumer) in pairs {
            let [all, one] = keys("fsp-int:", provider, consumer);
            assert_eq!(hash_tag(&all), hash_tag(&one), "{all} / {one}");
            assert_ne!(hash_tag(&all), all, "{all} has a tag");
            for key in [all, one] {
                if let Some(other) = seen.insert(key.clone(), provider) {
                    assert_eq!(other, provider, "{key} of two providers");
                }
            }
        }
        // Ids without braces or percent signs keep the keys of earlier versions.
        assert_eq!(
            keys("fsp:", "rrn", "ville-bxl"),
            ["fsp:{rrn}:all", "fsp:{rrn}:c:ville-bxl"]
        );
        assert_eq!(hash_tag("fsp:{rrn}:c:x"), "rrn");
        assert_eq!(hash_tag("fsp:{}:c:x"), "fsp:{}:c:x");
    }

    /// One slow answer (a sample far below the true offset) does not lower the estimate;
    /// a clock stepped back is followed within two windows; a step forward at once.
    #[test]
    fn the_offset_keeps_the_closest_recent_sample() {
        let mut o = Offset::default();
        assert_eq!(o.best(), None);
        o.sample(1_000_000, 0);
        // Answered 200 ms late: 200 ms below.
        o.sample(800_000, 1_000);
        assert_eq!(o.best(), Some(1_000_000));
        // A step forward is taken at once.
        o.sample(1_500_000, 2_000);
        assert_eq!(o.best(), Some(1_500_000));
        // Redis's clock stepped back by a second: followed once two windows went by.
        o.sample(500_000, OFFSET_WINDOW + 3_000);
        assert_eq!(o.best(), Some(1_500_000));
        o.sample(500_000, 2 * OFFSET_WINDOW + 4_000);
        assert_eq!(o.best(), Some(500_000));
    }

    /// The script's deadline: a run that starts after it changes nothing (no debit, no
    /// give-back) and answers Redis's clock and 1; one before it, or without one (0),
    /// decides and answers Redis's clock, 0 and the decision.
    #[tokio::test]
    async fn a_script_run_past_its_deadline_changes_nothing() {
        let Ok(url) = std::env::var("FSP_TEST_REDIS_URL") else {
            eprintln!("SKIPPED: FSP_TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379)");
            return;
        };
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let provider = format!("deadline-{}-{nanos}", std::process::id());
        let [pk, ck] = keys("fsp-test:", &provider, "c");
        let script = redis::Script::new(SCRIPT);
        // Both limits 1 a minute, burst 1 (emission 60 s, tolerance 0): one permit each.
        let run = |back: u64, debited_to: u64, deadline: u64| {
            let mut i = script.prepare_invoke();
            i.key(&pk).key(&ck);
            for a in [
                60_000_000, 0, 60_000_000, 0, 1, back, debited_to, debited_to,
            ] {
                i.arg(a);
            }
            i.arg(deadline);
            i
        };
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
        let now = secs * 1_000_000 + micros;
        let get = |key: &str| redis::cmd("GET").arg(key).to_owned();

        // Late: nothing written.
        let late: Vec<u64> = run(0, 0, 1).invoke_async(&mut conn).await.unwrap();
        assert_eq!(late.len(), 2, "{late:?}");
        assert!(late[0] >= now, "Redis's clock: {late:?}");
        assert_eq!(late[1], 1, "{late:?}");
        let exists: u64 = redis::cmd("EXISTS")
            .arg(&pk)
            .arg(&ck)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 0, "a late run wrote a key");

        // In time: the permit is debited from both keys.
        let ok: Vec<u64> = run(0, 0, now + 60_000_000)
            .invoke_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(ok[1..3], [0, 1], "{ok:?}");
        let (dp, dc) = (ok[5], ok[6]);
        assert!(dp > now && dc > now, "{ok:?}");

        // A late give-back gives nothing back.
        let late: Vec<u64> = run(1, dp, 1).invoke_async(&mut conn).await.unwrap();
        assert_eq!(late[1..], [1], "{late:?}");
        let tats: (u64, u64) = (
            get(&pk).query_async(&mut conn).await.unwrap(),
            get(&ck).query_async(&mut conn).await.unwrap(),
        );
        assert_eq!(tats, (dp, dc), "a late run changed the keys");

        // Without a deadline (0), the give-back comes back and the permit is taken again.
        let ok: Vec<u64> = run(1, dp, 0).invoke_async(&mut conn).await.unwrap();
        assert_eq!(ok[1..3], [0, 1], "{ok:?}");

        let _: u64 = redis::cmd("DEL")
            .arg(&pk)
            .arg(&ck)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
