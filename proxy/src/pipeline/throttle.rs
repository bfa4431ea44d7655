//! Phase 5, throttle: first the consumer's share of the provider's connection slots
//! (taken before the request is inspected: see [`share`]), and one of the provider's
//! slots if one is free, then the provider's aggregate limit and
//! the consumer's own limit, checked together (a call refused by either consumes
//! neither), through the shared backend when there is one, following `on_backend_error`
//! when it fails; then, if the provider's slots were all taken, the wait for one. So a
//! consumer over its rate is told at once (429), never after waiting for the provider's
//! capacity, and a call the rate limits refuse gives its slot back at once.
//!
//! A refused call consumes nothing: what an admitted call spent of the limits is a
//! [`Quota`] it carries until it is sent to the provider, given back if the call is
//! refused before (the provider's slots stayed taken, its audit record could not be
//! made durable, it was cut off, its consumer went away). The answer is an
//! [`Admitted`] call, which only this phase makes, from a [`Granted`] one.

use super::authorise::Granted;
use crate::config::OnBackendError;
use crate::errors::{Rejection, map};
use crate::state::{Gateway, Local, SharedThrottle};
use crate::transport::pool::Slot;
use throttle::Spent;

/// A granted call within its provider's capacity and its provider's and consumer's
/// limits.
#[derive(Debug)]
pub struct Admitted<'s> {
    granted: Granted<'s>,
    /// The provider's slot the call is sent under (none for a WSDL request, whose
    /// documents the gateway fetches under slots of their own, when not cached).
    slot: Option<Slot>,
    quota: Quota<'s>,
}

/// What an admitted call spent of its provider's and its consumer's limits: given back
/// when dropped, unless [kept](Quota::keep) (the call was sent).
#[derive(Debug)]
pub struct Quota<'s> {
    gw: &'s Gateway,
    provider: &'s str,
    consumer: &'s str,
    spent: Spent,
}

impl Quota<'_> {
    /// The call was sent: what it spent stays spent.
    pub fn keep(mut self) {
        self.spent = Spent::default();
    }
}

impl Drop for Quota<'_> {
    fn drop(&mut self) {
        if self.spent.is_nothing() {
            return;
        }
        // Each store gives back only what it debited itself (a decision made locally
        // while Redis was failing is given back locally).
        let now = u64::try_from(self.gw.clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.gw
            .throttle
            .load()
            .give_back(self.provider, self.consumer, now, self.spent);
        if let Some(shared) = &self.gw.shared_throttle {
            shared
                .store
                .give_back(self.provider, self.consumer, self.spent);
        }
        metrics::counter!("fsp_throttle_given_back_total").increment(1);
    }
}

impl<'s> Admitted<'s> {
    pub fn granted(&self) -> &Granted<'s> {
        &self.granted
    }

    /// The call's parts: its grant, its provider's slot, and what it spent of the
    /// limits (given back unless [kept](Quota::keep) once the call is sent).
    pub fn into_parts(self) -> (Granted<'s>, Option<Slot>, Quota<'s>) {
        (self.granted, self.slot, self.quota)
    }

    /// Gives the provider's slot back while the call waits for its audit record (the
    /// consumer's share kept): a trail slow to make records durable must not hold the
    /// provider's slots, nor be refused as the provider's capacity.
    pub fn lend_slot(&mut self) {
        if let Some(slot) = &mut self.slot {
            slot.lend();
        }
    }

    /// Takes the provider's slot again after [`Admitted::lend_slot`] (503 when the cap
    /// filled meanwhile and stays full for the queue timeout).
    pub async fn retake_slot(&mut self) -> Result<(), Rejection> {
        if let Some(slot) = &mut self.slot {
            let service = self.granted.route().service();
            slot.retake()
                .await
                .map_err(|e| map::upstream(&service.provider, &service.name, &e))?;
        }
        Ok(())
    }
}

/// One of the consumer's share of the provider's slots, taken as soon as the consumer
/// and the version are known: before the request is inspected, since reading a SOAP
/// request's Header holds up to 64 KiB of it (for as long as the consumer trickles it),
/// and a consumer's calls must not hold more of that than its share allows (an HTTP/2
/// connection carries 256 calls). None for a WSDL request (the gateway fetches its
/// documents under slots of their own).
#[derive(Debug)]
pub struct Share(Option<Slot>);

/// Takes the call's [`Share`]: 429 at once when the consumer has none left.
pub fn share(
    route: &super::route::Route<'_>,
    caller: &super::identify::Caller<'_>,
) -> Result<Share, Rejection> {
    if route.metadata().is_some() {
        return Ok(Share(None));
    }
    let service = route.service();
    route
        .upstream()
        .share(&caller.consumer().id)
        .map(|slot| Share(Some(slot)))
        .map_err(|e| map::upstream(&service.provider, &service.name, &e))
}

/// Admits a granted call holding its `share`, or refuses it: 429 when the consumer is over
/// its limits, 503 when the provider's slots stay taken (what the call spent of the
/// limits given back).
pub async fn admit<'s>(
    local: &'s Local,
    granted: Granted<'s>,
    share: Share,
) -> Result<Admitted<'s>, Rejection> {
    let route = granted.route();
    let consumer = granted.caller().consumer();
    let service = route.service();
    let capacity = |e| map::upstream(&service.provider, &service.name, &e);
    let Share(mut slot) = share;
    let held = slot.as_mut().is_none_or(Slot::try_hold);
    let mut quota = Quota {
        gw: &local.gw,
        provider: &service.provider,
        consumer: &consumer.id,
        spent: Spent::default(),
    };
    if let Some(p) = local
        .snap
        .providers
        .iter()
        .find(|p| *p.id == *service.provider)
    {
        let limits = throttle::Limits {
            provider: p.limit.map(|r| r.limit()),
            consumer: p
                .consumer_limits
                .get(&*consumer.id)
                .or(p.consumer_limit.as_ref())
                .map(|r| r.limit()),
        };
        quota.spent = check(&local.gw, &p.id, &consumer.id, &limits).await?;
    }
    // Within the limits, but the provider's slots were all taken: wait for one (the
    // quota given back if none frees in time).
    if !held && let Some(slot) = &mut slot {
        slot.retake().await.map_err(capacity)?;
    }
    Ok(Admitted {
        granted,
        slot,
        quota,
    })
}

/// Admits or refuses a call under the provider's and the consumer's limits, through the
/// shared backend when there is one, following `on_backend_error` when it fails.
async fn check(
    gw: &Gateway,
    provider: &str,
    consumer: &str,
    limits: &throttle::Limits,
) -> Result<Spent, Rejection> {
    let now = u64::try_from(gw.clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let local =
        |limits: &throttle::Limits| gw.throttle.load().check(provider, consumer, now, limits);
    let decision = match &gw.shared_throttle {
        None => local(limits),
        Some(shared) => match Box::pin(shared_check(shared, now, provider, consumer, limits)).await
        {
            Ok(d) => d,
            Err(e) => {
                let mode = match shared.on_error {
                    OnBackendError::Local => "local",
                    OnBackendError::Deny => "deny",
                    OnBackendError::Allow => "allow",
                };
                metrics::counter!("fsp_throttle_backend_errors_total", "mode" => mode).increment(1);
                // One log line per 10 s at most: a Redis outage must not flood the logs.
                if let Some(failures) = shared.error_log.occurred() {
                    tracing::error!(error = %e, on_backend_error = mode, failures, "throttling backend failed (failures counts the decisions since the last such line)");
                }
                match shared.on_error {
                    OnBackendError::Allow => Ok(Spent::default()),
                    OnBackendError::Deny => return Err(map::throttle_backend_down()),
                    OnBackendError::Local => {
                        // Each replica takes its share of the rate (the same count over a
                        // period `replicas` times longer: exact even for small limits),
                        // and of the burst (at least one call each).
                        let share = |l: throttle::Limit| throttle::Limit {
                            count: l.count,
                            per: l.per.saturating_mul(shared.replicas.max(1)),
                            burst: (l.burst / shared.replicas).max(1),
                        };
                        local(&throttle::Limits {
                            provider: limits.provider.map(share),
                            consumer: limits.consumer.map(share),
                        })
                    }
                }
            }
        },
    };
    decision.map_err(|t| {
        metrics::counter!("fsp_throttled_total", "provider" => provider.to_owned(), "scope" => t.scope.as_str()).increment(1);
        map::throttled(&t, limits)
    })
}

/// Asks Redis, unless it failed less than a second ago.
async fn shared_check(
    shared: &SharedThrottle,
    now: u64,
    provider: &str,
    consumer: &str,
    limits: &throttle::Limits,
) -> Result<Result<Spent, throttle::Throttled>, throttle::redis::BackendError> {
    use std::sync::atomic::Ordering;
    let now_ms = now / 1_000_000;
    if now_ms < shared.down_until.load(Ordering::Relaxed) {
        return Err(throttle::redis::BackendError(
            "failed less than 1 s ago; not asked".into(),
        ));
    }
    let result = shared.store.check(provider, consumer, limits).await;
    if result.is_err() {
        shared.down_until.store(now_ms + 1000, Ordering::Relaxed);
    }
    result
}
