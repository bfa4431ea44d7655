//! The shared backend: every gateway replica throttles against one Redis.
//!
//! One Lua script does the whole decision in one round trip, atomically: it reads Redis's
//! own clock (so replicas with skewed clocks agree), runs GCRA for the provider aggregate
//! and for the consumer, and updates both keys only when both admit the call. Keys expire
//! when their state is in the past, so idle consumers cost nothing. Both keys share a
//! hash tag (`{provider}`), so the script also works on Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::RwLock;

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
local p = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if p and p < 0 then return {1, -p} end
local c = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
if c and c < 0 then return {2, -c} end
if p then redis.call('SET', KEYS[1], p, 'PX', math.ceil((p - now) / 1000) + 1000) end
if c then redis.call('SET', KEYS[2], c, 'PX', math.ceil((c - now) / 1000) + 1000) end
return {0, 0}
"#;

pub use crate::BackendError;

/// Throttling state shared by every replica, in Redis.
pub struct RedisStore {
    client: redis::Client,
    conn: Arc<RwLock<Option<redis::aio::ConnectionManager>>>,
    script: redis::Script,
    timeout: Duration,
    prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
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
            client,
            conn: Arc::default(),
            script: redis::Script::new(SCRIPT),
            timeout,
            prefix: prefix.to_owned(),
        })
    }

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
        let run = async {
            let mut conn = self.connection().await?;
            let key = |suffix: String, l: &Option<Limit>| {
                if l.is_some() { suffix } else { String::new() }
            };
            let pk = key(
                format!("{}{{{provider}}}:all", self.prefix),
                &limits.provider,
            );
            let ck = key(
                format!("{}{{{provider}}}:c:{consumer}", self.prefix),
                &limits.consumer,
            );
            let args = |l: &Option<Limit>| {
                l.map_or((1, 0), |l| (micros(l.emission()), l.tolerance() / 1000))
            };
            let (pe, pt) = args(&limits.provider);
            let (ce, ct) = args(&limits.consumer);
            let (who, wait_us): (u8, u64) = self
                .script
                .key(pk)
                .key(ck)
                .arg(pe)
                .arg(pt)
                .arg(ce)
                .arg(ct)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| BackendError(e.to_string()))?;
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
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| BackendError(format!("no answer within {:?}", self.timeout)))?
    }
}

impl RedisStore {
    /// Whether Redis answers a `PING` within the decision timeout (for readiness).
    pub async fn ping(&self) -> Result<(), BackendError> {
        let run = async {
            let mut conn = self.connection().await?;
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
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| BackendError(format!("no answer within {:?}", self.timeout)))?
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
