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

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{RwLock, mpsc, oneshot};

use crate::{Limit, Limits, Scope, Throttled};

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function gcra(key, emission, tolerance)
  if key == '' then return nil end
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local ahead = tat - now
  if ahead > tolerance then return -(ahead - tolerance) end
  return tat + emission
end
local out = {}
for i = 0, #KEYS / 2 - 1 do
  local a = 4 * i
  local who, wait = 0, 0
  local p = gcra(KEYS[2 * i + 1], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]))
  if p and p < 0 then
    who, wait = 1, -p
  else
    local c = gcra(KEYS[2 * i + 2], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]))
    if c and c < 0 then
      who, wait = 2, -c
    else
      if p then redis.call('SET', KEYS[2 * i + 1], p, 'PX', math.ceil((p - now) / 1000) + 1000) end
      if c then redis.call('SET', KEYS[2 * i + 2], c, 'PX', math.ceil((c - now) / 1000) + 1000) end
    end
  end
  out[2 * i + 1] = who
  out[2 * i + 2] = wait
end
return out
"#;

/// The most decisions sent in one batch.
const MAX_BATCH: usize = 256;

pub use crate::BackendError;

/// Throttling state shared by every replica, in Redis.
pub struct RedisStore {
    inner: Arc<Inner>,
    /// Where calls hand their decisions to the batching task (started by the first call,
    /// on its runtime).
    batches: OnceLock<mpsc::UnboundedSender<Pending>>,
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
    reply: oneshot::Sender<Result<(u8, u64), BackendError>>,
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
        })
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
        let prefix = &self.inner.prefix;
        let key = |l: &Option<Limit>, suffix: std::fmt::Arguments<'_>| {
            if l.is_some() {
                format!("{prefix}{{{provider}}}:{suffix}")
            } else {
                String::new()
            }
        };
        let args =
            |l: &Option<Limit>| l.map_or((1, 0), |l| (micros(l.emission()), l.tolerance() / 1000));
        let (pe, pt) = args(&limits.provider);
        let (ce, ct) = args(&limits.consumer);
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            provider: provider.to_owned(),
            keys: [
                key(&limits.provider, format_args!("all")),
                key(&limits.consumer, format_args!("c:{consumer}")),
            ],
            args: [pe, pt, ce, ct],
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
        let (who, wait_us) = tokio::time::timeout(self.inner.timeout, answer)
            .await
            .map_err(|_| BackendError(format!("no answer within {:?}", self.inner.timeout)))?
            .map_err(|_| BackendError("the throttling batch task has stopped".into()))??;
        Ok(match who {
            0 => Ok(()),
            1 | 2 => {
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
            other => return Err(BackendError(format!("unexpected script answer {other}"))),
        })
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
    async fn decide(&self, batch: &[Pending]) -> Result<Vec<(u8, u64)>, BackendError> {
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
        let mut out = vec![(0u8, 0u64); batch.len()];
        for (provider, answer) in providers.iter().zip(answers) {
            let answer = answer?;
            let mut pairs = answer.chunks_exact(2);
            for (slot, _) in out
                .iter_mut()
                .zip(batch)
                .filter(|(_, p)| p.provider == *provider)
            {
                let pair = pairs.next().ok_or_else(|| {
                    BackendError("the script answered fewer decisions than asked".into())
                })?;
                *slot = (u8::try_from(pair[0]).unwrap_or(u8::MAX), pair[1]);
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
