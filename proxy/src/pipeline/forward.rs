//! Phase 7, forward: the request streamed to the provider over a pooled connection, with
//! the consumer, purpose and legal basis in `FSP-*` fields, and the provider's answer
//! awaited within its response timeout. Only a [`Cleared`] call is forwarded.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response};

use super::call::{Call, ConnInfo};
use super::inspect::Content;
use super::record::Cleared;
use crate::errors::{Code, Rejection, map};
use crate::headers::Outbound;
use crate::state::Local;
use crate::transport::body::{CallShared, Cut, RequestBody, Unread, Watch};
use crate::transport::pool::UpstreamBody;

/// The provider's answer, with what the gateway adds to it.
#[derive(Debug)]
pub struct Answer {
    pub response: Response<UpstreamBody>,
    /// `FSP-Message-Id` and `FSP-Timestamp`, made once and sent both ways.
    pub fsp: Option<[(HeaderName, HeaderValue); 2]>,
    /// The version's lifecycle fields (`Deprecation`, `Sunset`, `Link`), when it is
    /// deprecated.
    pub lifecycle: Option<Box<HeaderMap>>,
    /// Whether the service speaks SOAP (its answers are stamped and checked).
    pub soap: bool,
    /// The service's XML limits, which its XML answers are held to as its requests are;
    /// `None` when the operator turned the checks off for it.
    pub xml: Option<crate::xml::Limits>,
    /// How long the provider may take, here for the start of its answer's body.
    pub response_timeout: std::time::Duration,
}

/// Sends the call and awaits the head of the provider's answer.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    local: &Local,
    conn: &ConnInfo,
    call: &mut Call,
    cleared: Cleared<'_>,
    method: Method,
    mut headers: HeaderMap,
    content: Content,
    body: &mut Unread,
) -> Result<Answer, Rejection> {
    let snap = &*local.snap;
    let (granted, slot, quota) = cleared.into_admitted().into_parts();

    let suspensions_seen = granted.suspensions_seen();
    let (caller, route, grant) = granted.into_parts();
    let (service, upstream) = (route.service(), route.upstream());
    let soap = route.protocol() == catalogue::Protocol::Soap;
    let base = &route.version().upstream;
    let (path, lifecycle) = route.into_path();
    // Reserved when the call was admitted (only a WSDL request is admitted without one).
    let slot = match slot {
        Some(slot) => slot,
        None => upstream
            .reserve(&caller.consumer().id)
            .await
            .map_err(|e| map::upstream(&service.provider, &service.name, &e))?,
    };
    // Kept by the call: a refusal after this point still counts the bytes read.
    // Watched: a suspension of either party cuts the call while it streams.
    let shared: &Arc<CallShared> = call.shared.insert(Arc::new(CallShared::watched(Watch::new(
        local.gw.suspensions.clone(),
        suspensions_seen,
        caller.consumer().id.clone(),
        service.provider.clone(),
    ))));
    // A suspension made since the decision (while the call waited for its throttle or
    // its record): nothing is sent.
    if let Some(cut) = shared.cut_off() {
        return Err(map::cut_off(
            "the call was cut off before it was sent",
            &cut,
        ));
    }
    // Made once, sent twice (to the provider and back to the consumer).
    let fsp = call.stamp.fields();
    if soap {
        // A SOAP answer is stamped and checked, which a compressed one cannot be.
        headers.remove(http::header::ACCEPT_ENCODING);
    }
    // The trace context the provider gets is the gateway's (the consumer's, checked and
    // continued, or a new one), never the consumer's raw fields.
    headers.remove(crate::headers::TRACEPARENT);
    headers.remove(crate::trace::TRACESTATE);
    let mut trace = Vec::with_capacity(2);
    trace.push((crate::headers::TRACEPARENT, call.trace.traceparent()));
    if let Some(state) = &call.trace.tracestate {
        trace.push((crate::trace::TRACESTATE, state.clone()));
    }
    // The grant's values are this thread's own, made when the configuration was loaded.
    let fields = Outbound::new(
        headers,
        fsp.as_ref().map_or(&[][..], |f| &f[..]),
        grant.map_or(&[][..], |g| &g.headers[..]),
        &trace,
        &conn.peer_ip_value,
    );
    let upstream_body = RequestBody::new(
        content.prefix,
        body.take(),
        snap.max_request_bytes,
        snap.request_body_timeout,
        content.xml,
        shared.clone(),
    );
    // Sent from here on: what the call spent of the limits stays spent.
    quota.keep();
    let asked = std::time::Instant::now();
    let sent = answer_within(
        upstream.response_timeout,
        shared,
        upstream.send(base, path, method, fields, upstream_body, slot),
    )
    .await;
    let (provider, service) = (&service.provider, &service.name);
    let metrics = local.provider_metrics.get(&**provider);
    if let Some(m) = metrics {
        m.latency.record(asked.elapsed().as_secs_f64());
    }
    match sent {
        Ok(Ok(response)) => {
            if response.status().is_server_error()
                && let Some(m) = metrics
            {
                m.status_5xx.increment(1);
            }
            Ok(Answer {
                response,
                fsp,
                lifecycle,
                soap,
                xml: snap.service_options(service).xml,
                response_timeout: upstream.response_timeout,
            })
        }
        Ok(Err(e)) => Err(match shared.consumer_fault.get() {
            Some(fault) => map::consumer_fault(fault),
            None => {
                if let Some(m) = metrics {
                    m.unreachable.increment(1);
                }
                map::upstream(provider, service, &e)
            }
        }),
        Err(Unanswered::CutOff(cut)) => Err(map::cut_off(
            "the call was cut off while its answer was awaited",
            &cut,
        )),
        Err(Unanswered::Timeout) => Err({
            if let Some(m) = metrics {
                m.timeout.increment(1);
            }
            Rejection::new(
                Code::UpstreamTimeout,
                format!(
                    "provider {provider} did not answer {service} within {:?}",
                    upstream.response_timeout
                ),
            )
        }),
    }
}

/// Why the provider's answer was not had.
#[derive(Debug, PartialEq, Eq)]
enum Unanswered {
    /// The provider took longer than its response timeout.
    Timeout,
    /// The consumer or the provider was suspended meanwhile.
    CutOff(Cut),
}

/// Awaits the provider's answer. The provider's time (`timeout`) counts from when the
/// request was sent whole: while the consumer is still uploading, its own read timeout
/// guards the call, and a slow upload is never blamed on the provider. A suspension of
/// either party ends the wait at once (contract section 5).
async fn answer_within<T>(
    timeout: std::time::Duration,
    shared: &Arc<CallShared>,
    exchange: impl std::future::Future<Output = T>,
) -> Result<T, Unanswered> {
    let mut exchange = std::pin::pin!(exchange);
    let sleep = tokio::time::sleep(timeout);
    tokio::pin!(sleep);
    let cut = shared.cut();
    tokio::pin!(cut);
    loop {
        tokio::select! {
            biased;
            done = &mut exchange => return Ok(done),
            why = &mut cut => return Err(Unanswered::CutOff(why)),
            _ = &mut sleep => {
                let now = tokio::time::Instant::now();
                let deadline = match shared.upload_done_at() {
                    Some(at) => at + timeout,
                    None => now + timeout,
                };
                if deadline <= now {
                    return Err(Unanswered::Timeout);
                }
                sleep.as_mut().reset(deadline);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The provider's time counts from the end of the upload: a slow upload is never
    /// the provider's fault, and a provider silent after it is cut off on time. Under
    /// paused time, so the test sleeps for nothing.
    #[tokio::test(start_paused = true)]
    async fn the_providers_time_counts_from_the_end_of_the_upload() {
        let timeout = Duration::from_secs(10);
        let start = tokio::time::Instant::now();

        // An answer 25 s after the call began, the upload having ended at 20 s: within.
        let shared = Arc::new(CallShared::new());
        let uploader = shared.clone();
        let exchange = async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            uploader.mark_upload_done();
            tokio::time::sleep(Duration::from_secs(5)).await;
            "answer"
        };
        assert_eq!(
            answer_within(timeout, &shared, exchange).await,
            Ok("answer")
        );
        assert_eq!(start.elapsed(), Duration::from_secs(25));

        // Silent after an upload that ended at 3 s: cut off at 13 s.
        let start = tokio::time::Instant::now();
        let shared = Arc::new(CallShared::new());
        let uploader = shared.clone();
        let exchange = async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            uploader.mark_upload_done();
            std::future::pending::<&str>().await
        };
        assert_eq!(
            answer_within(timeout, &shared, exchange).await,
            Err(Unanswered::Timeout)
        );
        assert_eq!(start.elapsed(), Duration::from_secs(13));

        // An upload that never ends leaves the call to the consumer's read timeout (the
        // request body's own): the provider's timer keeps waiting for the upload's end.
        let shared = Arc::new(CallShared::new());
        let exchange = std::future::pending::<&str>();
        let waited = tokio::time::timeout(
            Duration::from_secs(3600),
            answer_within(timeout, &shared, exchange),
        )
        .await;
        assert!(waited.is_err(), "not cut off while the upload goes on");
    }
}
