//! # Throttling
//!
//! Providers cap how many calls reach them: all consumers together (the provider's
//! aggregate limit) and each consumer on its own. A call is admitted only when **both**
//! limits admit it, and a call refused by either consumes **neither**: rejected calls
//! never eat into anybody's quota.
//!
//! Each limit is a GCRA (generic cell rate algorithm): a rate `count` per `per` with a
//! `burst` of calls that may arrive at once. Its whole state is one number per key, the
//! *theoretical arrival time* (TAT). The algorithm is exact: over any window of length
//! `T`, at most `rate × T + burst` calls are admitted.
//!
//! The core does no I/O and reads no clock: callers pass `now` as nanoseconds on a
//! monotonic scale, so tests drive time by hand. [`LocalStore`] keeps the state in this
//! process (one lock per provider; idle keys are forgotten so memory stays bounded);
//! [`redis::RedisStore`] shares it between replicas, exactly, with one atomic script.

pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A rate limit: `count` calls per `per`, `burst` of them at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub per: Duration,
    /// Calls that may arrive at once; at least 1 is always allowed.
    pub burst: u32,
}

impl Limit {
    /// Nanoseconds between two calls at the steady rate.
    fn emission(&self) -> u64 {
        let per = u64::try_from(self.per.as_nanos()).unwrap_or(u64::MAX);
        // Rounded up: a shorter interval would admit more than the limit.
        per.div_ceil(self.count.max(1)).max(1)
    }

    /// How far ahead of `now` the TAT may run before calls are refused.
    fn tolerance(&self) -> u64 {
        self.emission()
            .saturating_mul(u64::from(self.burst.max(1)) - 1)
    }

    /// The policy in the IETF `RateLimit-Policy` form: quota and window in seconds.
    pub fn policy(&self, name: &str) -> String {
        format!(
            "\"{name}\";q={};w={}",
            self.count,
            self.per.as_secs().max(1)
        )
    }
}

/// Why a call waits, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Throttled {
    /// Which limit refused: `provider` or `consumer`.
    pub scope: Scope,
    pub limit: Limit,
    /// When a retry can be admitted.
    pub retry_after: Duration,
}

/// Which of the two limits is meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Provider,
    Consumer,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provider => "provider",
            Self::Consumer => "consumer",
        }
    }
}

/// GCRA for one key: `Ok(new TAT)` when admitted, `Err(wait)` when not. Pure.
pub fn gcra(tat: Option<u64>, now: u64, limit: &Limit) -> Result<u64, u64> {
    let tat = tat.unwrap_or(now).max(now);
    let ahead = tat - now;
    let tolerance = limit.tolerance();
    if ahead > tolerance {
        Err(ahead - tolerance)
    } else {
        Ok(tat.saturating_add(limit.emission()))
    }
}

/// What one admitted call debited, so that a call refused after its admission (its
/// provider's capacity stayed full, its audit record could not be made durable, it was
/// cut off before it was sent) can give it back: a refused call consumes nothing. The
/// same store that admitted the call takes it back ([`LocalStore::give_back`],
/// [`redis::RedisStore::give_back`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spent(pub(crate) Debit);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Debit {
    /// No limit applied: nothing to give back.
    #[default]
    Nothing,
    /// A local decision: each key's TAT just after this call's debit, and its emission
    /// interval (ns), for the provider aggregate and the consumer.
    Local([Option<(u64, u64)>; 2]),
    /// One Redis decision: the limits it was taken under (µs) and each key's TAT just
    /// after the debit (µs, Redis's clock).
    Redis {
        under: [u64; 4],
        debited_to: [u64; 2],
    },
    /// A permit of this replica's lease, taken under these limits, of the lease taken
    /// at `taken`.
    Lease {
        under: [u64; 4],
        taken: std::time::Instant,
    },
}

impl Spent {
    /// Whether anything was debited.
    pub fn is_nothing(&self) -> bool {
        self.0 == Debit::Nothing
    }
}

/// How much of a debit of `emission` that moved a TAT to `upto` to give back at `now`:
/// the part of it not yet elapsed. Crediting that much leaves the TAT where it would be
/// had the call never come, whatever was debited after it, so a give-back never erases
/// another call's spend (once `upto` has passed, the debit no longer weighs: nothing).
pub fn credit(emission: u64, upto: u64, now: u64) -> u64 {
    emission.min(upto.saturating_sub(now))
}

/// Why a backend could not decide.
#[derive(Clone, Debug)]
pub struct BackendError(pub String);

impl std::error::Error for BackendError {}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "throttling backend unavailable: {}", self.0)
    }
}

/// A throttling backend: where the GCRA state lives. Every backend passes the same
/// conformance suite (`tests/conformance.rs`).
pub trait Store: Send + Sync {
    /// Admits (`Ok(Ok(spent))`) or refuses (`Ok(Err(..))`) one call of `consumer` to
    /// `provider`; `Err` when the backend cannot decide. `now` is the caller's clock in
    /// nanoseconds; a backend with a clock of its own (Redis) uses that instead.
    fn decide(
        &self,
        provider: &str,
        consumer: &str,
        now: u64,
        limits: &Limits,
    ) -> impl std::future::Future<Output = Result<Result<Spent, Throttled>, BackendError>> + Send;

    /// Gives back what an admitted call `spent`, at `now` (the caller's clock, as for
    /// [`Store::decide`]), for a call refused after its admission.
    fn give_back(&self, provider: &str, consumer: &str, now: u64, spent: Spent);
}

impl Store for LocalStore {
    async fn decide(
        &self,
        provider: &str,
        consumer: &str,
        now: u64,
        limits: &Limits,
    ) -> Result<Result<Spent, Throttled>, BackendError> {
        Ok(self.check(provider, consumer, now, limits))
    }

    fn give_back(&self, provider: &str, consumer: &str, now: u64, spent: Spent) {
        LocalStore::give_back(self, provider, consumer, now, spent);
    }
}

/// The limits that apply to one call.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub provider: Option<Limit>,
    pub consumer: Option<Limit>,
}

#[derive(Debug, Default)]
struct ProviderState {
    aggregate: Option<u64>,
    consumers: HashMap<String, u64>,
    last_sweep: u64,
}

/// Idle keys are forgotten once the map holds this many consumers.
const SWEEP_ABOVE: usize = 1024;
const SWEEP_EVERY_NS: u64 = 1_000_000_000;

impl ProviderState {
    fn check(
        &mut self,
        consumer: &str,
        now: u64,
        limits: &Limits,
    ) -> Result<Spent, (Scope, Limit, u64)> {
        let provider = limits.provider.map(|l| (l, gcra(self.aggregate, now, &l)));
        let consumer_gcra = limits
            .consumer
            .map(|l| (l, gcra(self.consumers.get(consumer).copied(), now, &l)));
        // Refused by either: the longer wait is the one to report (a retry after the
        // shorter would be refused again by the other), as the Redis script does.
        let refused = [
            provider.and_then(|(l, r)| r.err().map(|w| (Scope::Provider, l, w))),
            consumer_gcra.and_then(|(l, r)| r.err().map(|w| (Scope::Consumer, l, w))),
        ]
        .into_iter()
        .flatten()
        .max_by_key(|(_, _, w)| *w);
        if let Some(refused) = refused {
            return Err(refused);
        }
        let provider_tat = provider.and_then(|(_, r)| r.ok());
        let consumer_tat = consumer_gcra.and_then(|(_, r)| r.ok());
        let spent = Spent(Debit::Local([
            provider.and_then(|(l, r)| r.ok().map(|t| (t, l.emission()))),
            consumer_gcra.and_then(|(l, r)| r.ok().map(|t| (t, l.emission()))),
        ]));
        // Both admitted: only now does either state move.
        if provider_tat.is_some() {
            self.aggregate = provider_tat;
        }
        if let Some(tat) = consumer_tat {
            match self.consumers.get_mut(consumer) {
                Some(v) => *v = tat,
                None => {
                    self.consumers.insert(consumer.to_owned(), tat);
                }
            }
        }
        self.sweep(now);
        Ok(spent)
    }

    /// See [`LocalStore::give_back`].
    fn give_back(&mut self, consumer: &str, now: u64, debits: [Option<(u64, u64)>; 2]) {
        let back = |tat: &mut u64, (upto, emission): (u64, u64)| {
            *tat = tat.saturating_sub(credit(emission, upto, now));
        };
        if let (Some(tat), Some(d)) = (&mut self.aggregate, debits[0]) {
            back(tat, d);
        }
        if let (Some(tat), Some(d)) = (self.consumers.get_mut(consumer), debits[1]) {
            back(tat, d);
        }
    }

    /// A key whose TAT is in the past is the same as no key: drop those.
    fn sweep(&mut self, now: u64) {
        if self.consumers.len() > SWEEP_ABOVE
            && now.saturating_sub(self.last_sweep) > SWEEP_EVERY_NS
        {
            self.consumers.retain(|_, tat| *tat > now);
            self.last_sweep = now;
        }
    }
}

/// Throttling state of this gateway process.
#[derive(Debug, Default)]
pub struct LocalStore {
    /// One lock per provider: calls to different providers never contend.
    providers: HashMap<String, Arc<Mutex<ProviderState>>>,
}

impl LocalStore {
    /// A store for these providers.
    pub fn new<'a>(providers: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            providers: providers
                .into_iter()
                .map(|p| (p.to_owned(), Arc::default()))
                .collect(),
        }
    }

    /// A store for a new configuration that keeps the state of every provider that is
    /// still there, so a reload resets no limit.
    pub fn carry_over<'a>(&self, providers: impl IntoIterator<Item = &'a str>) -> Self {
        let mut next = HashMap::new();
        for p in providers {
            let state = self.providers.get(p).cloned().unwrap_or_default();
            next.insert(p.to_owned(), state);
        }
        Self { providers: next }
    }

    /// Admits or refuses one call of `consumer` to `provider` at `now` (nanoseconds).
    pub fn check(
        &self,
        provider: &str,
        consumer: &str,
        now: u64,
        limits: &Limits,
    ) -> Result<Spent, Throttled> {
        if limits.provider.is_none() && limits.consumer.is_none() {
            return Ok(Spent::default());
        }
        let Some(state) = self.providers.get(provider) else {
            return Ok(Spent::default());
        };
        let mut state = match state.lock() {
            Ok(s) => s,
            // A panic while holding the lock cannot leave a TAT half-written.
            Err(poisoned) => poisoned.into_inner(),
        };
        state
            .check(consumer, now, limits)
            .map_err(|(scope, limit, wait)| Throttled {
                scope,
                limit,
                retry_after: Duration::from_nanos(wait),
            })
    }

    /// Gives back what a call this store admitted `spent` (see [`Spent`]), at `now`.
    /// A provider no longer configured, or a spend of another store, gives nothing back.
    pub fn give_back(&self, provider: &str, consumer: &str, now: u64, spent: Spent) {
        let Debit::Local(debits) = spent.0 else {
            return;
        };
        let Some(state) = self.providers.get(provider) else {
            return;
        };
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        state.give_back(consumer, now, debits);
    }

    /// How many consumer keys are held for `provider` (for tests and metrics).
    pub fn keys(&self, provider: &str) -> usize {
        self.providers
            .get(provider)
            .and_then(|s| s.lock().ok().map(|s| s.consumers.len()))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests;
