//! The shared backend: every gateway replica throttles against one Redis.
//!
//! One Lua script does the decisions atomically: it reads Redis's own clock (so replicas
//! with skewed clocks agree), runs GCRA for the provider aggregate and for the consumer,
//! and updates both keys only when both admit the call. Keys expire when their state is
//! in the past, so idle consumers cost nothing. Both keys of a provider share a hash tag
//! (`{provider}`), so the script also works on Redis Cluster.
//!
//! Decisions are batched: calls hand theirs to one task, which sends every decision
//! waiting at that moment in one script run per provider (all in one write), then the
//! next batch while the first is answered... one batch in flight at a time, so under load
//! a batch holds what arrived during the last round trip. The script decides a batch's
//! calls one after the other, exactly as if each had come alone, so the bound and the
//! "a refused call consumes nothing" rule are those of one call per script.
//!
//! Leases (with [`RedisStore::with_leases`]): where a limit is high, a replica takes
//! several permits of a consumer's pair of keys in one decision and spends them locally
//! for at most [`LEASE_TTL`], so that most calls make no round trip. Permits are debited
//! in Redis when leased, so calls admitted from the start never exceed
//! `limit × T + burst` across replicas; a lease left unused is given back with the pair's
//! next decision. The permits all replicas may hold at once are at most
//! [`LEASE_SHARE`] of the smaller burst, so over any window the count admitted exceeds
//! the bound by at most that share (permits leased just before the window), and a pair
//! whose limits make that share less than two permits is decided call by call, exactly.
//! A refused call still consumes nothing.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{RwLock, mpsc, oneshot};

use crate::{Limit, Limits, Scope, Throttled};

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- How many permits a key can give now (math.huge: no limit), its TAT, and the wait
-- when it can give none.
local function room(key, e, tol)
  if key == '' then return math.huge, nil, 0 end
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local ahead = tat - now
  if ahead > tol then return 0, tat, ahead - tol end
  return math.floor((tol - ahead) / e) + 1, tat, 0
end
local function give_back(key, e, n)
  if key == '' or n <= 0 then return end
  local tat = tonumber(redis.call('GET', key))
  if not tat then return end
  tat = tat - n * e
  if tat <= now then redis.call('DEL', key) return end
  redis.call('SET', key, tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
end
local out = {}
for i = 0, #KEYS / 2 - 1 do
  local a = 6 * i
  local pk, ck = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local pe, pt = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local ce, ct = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local want, back = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  give_back(pk, pe, back)
  give_back(ck, ce, back)
  local kp, tp, wp = room(pk, pe, pt)
  local kc, tc, wc = room(ck, ce, ct)
  local k = math.min(want, kp, kc)
  local who, wait = 0, 0
  if k < 1 then
    k = 0
    if kp < 1 then who, wait = 1, wp else who, wait = 2, wc end
  else
    if tp then
      local n = tp + k * pe
      redis.call('SET', pk, n, 'PX', math.ceil((n - now) / 1000) + 1000)
    end
    if tc then
      local n = tc + k * ce
      redis.call('SET', ck, n, 'PX', math.ceil((n - now) / 1000) + 1000)
    end
  end
  out[3 * i + 1] = k
  out[3 * i + 2] = who
  out[3 * i + 3] = wait
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
    /// Where calls hand their decisions to the batching task (started by the first call,
    /// on its runtime).
    batches: OnceLock<mpsc::UnboundedSender<Pending>>,
    /// With leases: how many replicas share the limits, and the permits this one holds,
    /// by provider and consumer.
    leases: Option<(u32, std::sync::Mutex<LeaseTable>)>,
}

type LeaseTable = std::collections::HashMap<String, std::collections::HashMap<String, Lease>>;

/// Permits of one (provider, consumer) pair, debited in Redis, spendable here.
#[derive(Debug)]
struct Lease {
    /// The limits they were taken under (emission and tolerance of both keys).
    under: [u64; 4],
    permits: u64,
    /// When they were taken: spendable until [`LEASE_TTL`] after.
    taken: std::time::Instant,
    /// Permits asked for next time (grows while leases run out, shrinks while they
    /// expire unspent).
    size: u64,
    /// Permits to give back with the next decision (expired, or over the cap).
    owed: u64,
    /// When a call of the pair last asked for a lease, while it waits for the answer:
    /// meanwhile the pair's other calls are decided one by one, so that a lease that
    /// runs out under many concurrent calls is renewed once, not once per call.
    asking: Option<std::time::Instant>,
}

struct Inner {
    client: redis::Client,
    conn: RwLock<Option<redis::aio::ConnectionManager>>,
    script: redis::Script,
    timeout: Duration,
    prefix: String,
}

/// One call's decision, waiting for its batch.
struct Pending {
    provider: String,
    /// The provider aggregate's key and the consumer's ('' for no limit).
    keys: [String; 2],
    /// Emission interval and tolerance (µs) of each.
    args: [u64; 4],
    /// Permits asked for (1 without a lease) and given back.
    want: u64,
    back: u64,
    /// Permits granted (0: refused), who refused, how long to wait (µs).
    reply: oneshot::Sender<Result<(u64, u8, u64), BackendError>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

fn micros(d: u64) -> u64 {
    (d / 1000).max(1)
}

impl RedisStore {
    /// A store on `url`; connects in the background (a Redis that is down at start-up is
    /// handled like one that goes down later). Each decision waits at most `timeout`.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, BackendError> {
        // The URL may carry a password: the error does not repeat it.
        let client = redis::Client::open(url).map_err(|e| BackendError(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn: RwLock::default(),
                script: redis::Script::new(SCRIPT),
                timeout,
                prefix: prefix.to_owned(),
            }),
            batches: OnceLock::new(),
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

    /// Admits or refuses one call, atomically across every replica sharing this Redis.
    pub async fn check(
        &self,
        provider: &str,
        consumer: &str,
        limits: &Limits,
    ) -> Result<Result<(), Throttled>, BackendError> {
        if limits.provider.is_none() && limits.consumer.is_none() {
            return Ok(Ok(()));
        }
        let args =
            |l: &Option<Limit>| l.map_or((1, 0), |l| (micros(l.emission()), l.tolerance() / 1000));
        let (pe, pt) = args(&limits.provider);
        let (ce, ct) = args(&limits.consumer);
        let under = [pe, pt, ce, ct];
        let Some((replicas, table)) = &self.leases else {
            return self
                .ask(provider, consumer, limits, under, 1, 0)
                .await
                .map(|(_, d)| d);
        };
        // Permits per lease: together, the replicas hold at most LEASE_SHARE of the
        // smaller burst.
        let burst = [limits.provider, limits.consumer]
            .iter()
            .flatten()
            .map(|l| u64::from(l.burst.max(1)))
            .min()
            .unwrap_or(1);
        let cap = ((burst as f64 * LEASE_SHARE) / f64::from(*replicas)) as u64;
        if cap < 2 {
            return self
                .ask(provider, consumer, limits, under, 1, 0)
                .await
                .map(|(_, d)| d);
        }
        let now = std::time::Instant::now();
        let (want, back) = {
            let mut table = table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match table.get_mut(provider).and_then(|m| m.get_mut(consumer)) {
                Some(l)
                    if l.under == under
                        && l.permits > 0
                        && now.duration_since(l.taken) < LEASE_TTL =>
                {
                    l.permits -= 1;
                    return Ok(Ok(()));
                }
                Some(l)
                    if l.asking
                        .is_some_and(|at| now.duration_since(at) < self.inner.timeout * 2) =>
                {
                    (1, 0)
                }
                Some(l) => {
                    l.asking = Some(now);
                    // Spent in time: ask for more; expired unspent: for fewer.
                    if l.permits == 0 {
                        l.size = (l.size * 2).min(cap);
                    } else {
                        l.size = (l.size / 2).max(1);
                    }
                    // Unspent permits go back (under other limits, too: the keys are
                    // the same, and the next decision is made under the new ones).
                    let back = std::mem::take(&mut l.owed) + std::mem::take(&mut l.permits);
                    (l.size.min(cap), back)
                }
                // A pair's first call asks for two: a lease begins when both come.
                None => (2, 0),
            }
        };
        let asked = self
            .ask(provider, consumer, limits, under, want, back)
            .await;
        if want > 1 || back > 0 {
            let mut table = table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(l) = table.get_mut(provider).and_then(|m| m.get_mut(consumer)) {
                l.asking = None;
            }
        }
        // On an error, whether given-back permits came back is not known: they are not
        // owed again.
        let (granted, decision) = asked?;
        if granted > 1 {
            let mut table = table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let l = table
                .entry(provider.to_owned())
                .or_default()
                .entry(consumer.to_owned())
                .or_insert_with(|| Lease {
                    under,
                    permits: 0,
                    taken: now,
                    size: want,
                    owed: 0,
                    asking: None,
                });
            // Another call of the pair may have leased meanwhile: what is over the cap
            // is given back next time.
            let fresh = l.under == under && now.duration_since(l.taken) < LEASE_TTL;
            let kept = if fresh { l.permits } else { 0 };
            l.owed += if fresh { 0 } else { l.permits };
            let total = kept + granted - 1;
            l.permits = total.min(cap);
            l.owed += total - l.permits;
            l.under = under;
            l.taken = now;
        }
        Ok(decision)
    }

    /// One decision through the batch: `want` permits (granted: how many), after giving
    /// `back` permits back.
    async fn ask(
        &self,
        provider: &str,
        consumer: &str,
        limits: &Limits,
        under: [u64; 4],
        want: u64,
        back: u64,
    ) -> Result<(u64, Result<(), Throttled>), BackendError> {
        let prefix = &self.inner.prefix;
        let key = |l: &Option<Limit>, suffix: std::fmt::Arguments<'_>| {
            if l.is_some() {
                format!("{prefix}{{{provider}}}:{suffix}")
            } else {
                String::new()
            }
        };
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            provider: provider.to_owned(),
            keys: [
                key(&limits.provider, format_args!("all")),
                key(&limits.consumer, format_args!("c:{consumer}")),
            ],
            args: under,
            want,
            back,
            reply,
        };
        let batches = self.batches.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batches(self.inner.clone(), rx));
            tx
        });
        batches
            .send(pending)
            .map_err(|_| BackendError("the throttling batch task has stopped".into()))?;
        let (granted, who, wait_us) = tokio::time::timeout(self.inner.timeout, answer)
            .await
            .map_err(|_| BackendError(format!("no answer within {:?}", self.inner.timeout)))?
            .map_err(|_| BackendError("the throttling batch task has stopped".into()))??;
        let decision = match (granted, who) {
            (1.., _) => Ok(()),
            (0, 1 | 2) => {
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
                    retry_after: Duration::from_micros(wait_us),
                })
            }
            (_, other) => return Err(BackendError(format!("unexpected script answer {other}"))),
        };
        Ok((granted, decision))
    }
}

/// The batching task: sends what waits, one batch in flight at a time, until every
/// sender is gone.
async fn batches(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // A call that stopped waiting (timed out, or its client left) is not decided:
        // deciding it would consume a permit nobody uses.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let answers = tokio::time::timeout(inner.timeout, inner.decide(&batch))
            .await
            .unwrap_or_else(|_| {
                Err(BackendError(format!(
                    "no answer within {:?}",
                    inner.timeout
                )))
            });
        match answers {
            Ok(answers) => {
                for (p, a) in batch.drain(..).zip(answers) {
                    let _ = p.reply.send(Ok(a));
                }
            }
            Err(e) => {
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
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
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let c = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| BackendError(e.to_string()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Decides a batch: one script run per provider (its keys share a hash slot), all
    /// sent before the first answer is read; answers in the batch's order.
    async fn decide(&self, batch: &[Pending]) -> Result<Vec<(u64, u8, u64)>, BackendError> {
        let conn = self.connection().await?;
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
                invocation.arg(p.want).arg(p.back);
            }
            let mut conn = conn.clone();
            async move {
                invocation
                    .invoke_async::<Vec<u64>>(&mut conn)
                    .await
                    .map_err(|e| BackendError(e.to_string()))
            }
        });
        let answers = join_all(runs).await;
        let mut out = vec![(0u64, 0u8, 0u64); batch.len()];
        for (provider, answer) in providers.iter().zip(answers) {
            let answer = answer?;
            let mut triples = answer.chunks_exact(3);
            for (slot, _) in out
                .iter_mut()
                .zip(batch)
                .filter(|(_, p)| p.provider == *provider)
            {
                let t = triples.next().ok_or_else(|| {
                    BackendError("the script answered fewer decisions than asked".into())
                })?;
                *slot = (t[0], u8::try_from(t[1]).unwrap_or(u8::MAX), t[2]);
            }
        }
        Ok(out)
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
    ) -> Result<Result<(), Throttled>, BackendError> {
        self.check(provider, consumer, limits).await
    }
}
