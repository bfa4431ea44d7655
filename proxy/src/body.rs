//! Streaming bodies in both directions.
//!
//! Neither body is ever collected in memory: [`RequestBody`] passes the consumer's frames
//! to the provider as they arrive, counting them and stopping at the size limit;
//! [`ResponseBody`] passes the provider's frames back (stamping SOAP headers on the way),
//! counts them, and completes the call's audit record when the last frame is sent — or
//! when the consumer goes away mid-stream, since the record is completed on drop.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::forward::{BoxError, UpstreamBody};
use crate::soap::HeaderStamp;
use crate::state::Local;

/// What the request and response sides of one call share.
#[derive(Debug, Default)]
pub struct CallShared {
    pub request_bytes: AtomicU64,
    pub too_large: AtomicBool,
}

/// Why a streamed body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than the {0} bytes allowed")]
    TooLarge(u64),
    #[error("reading the request body: {0}")]
    Client(#[source] hyper::Error),
    #[error("the request body does not match its declared length")]
    Truncated,
}

/// The consumer's request body on its way to the provider.
#[derive(Debug)]
pub struct RequestBody {
    /// Bytes already read by the gateway (the start of a SOAP envelope, to find its
    /// Header), sent before the rest.
    prefix: Option<Bytes>,
    inner: Incoming,
    limit: u64,
    seen: u64,
    shared: Arc<CallShared>,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, shared: Arc<CallShared>) -> Self {
        Self::with_prefix(Bytes::new(), inner, limit, shared)
    }

    /// A body whose first bytes were already read into `prefix`.
    pub fn with_prefix(
        prefix: Bytes,
        inner: Incoming,
        limit: u64,
        shared: Arc<CallShared>,
    ) -> Self {
        let seen = prefix.len() as u64;
        shared.request_bytes.store(seen, Ordering::Relaxed);
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            inner,
            limit,
            seen,
            shared,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.shared
                        .request_bytes
                        .store(this.seen, Ordering::Relaxed);
                    if this.seen > this.limit {
                        this.shared.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Client(e)))),
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// Completes a call's audit record exactly once: when the response body ends, or when it
/// is dropped unfinished (the consumer went away).
#[derive(Debug)]
pub struct Finisher {
    inner: Option<Box<Pending>>,
}

#[derive(Debug)]
struct Pending {
    record: audit::Record,
    started: Instant,
    shared: Option<Arc<CallShared>>,
    /// The thread's view of the gateway, whose audit sink takes the record.
    local: Arc<Local>,
}

impl Finisher {
    pub fn new(
        record: audit::Record,
        started: Instant,
        shared: Option<Arc<CallShared>>,
        local: Arc<Local>,
    ) -> Self {
        Self {
            inner: Some(Box::new(Pending {
                record,
                started,
                shared,
                local,
            })),
        }
    }

    fn complete(&mut self, response_bytes: u64, finished: bool) {
        let Some(p) = self.inner.take() else { return };
        let Pending {
            mut record,
            started,
            shared,
            local,
        } = *p;
        let elapsed = started.elapsed();
        record.duration_ms = (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        record.response_bytes = response_bytes;
        if let Some(s) = shared {
            record.request_bytes = s.request_bytes.load(Ordering::Relaxed);
        }
        let m = call_metrics();
        m.duration.record(elapsed.as_secs_f64());
        m.by_class[status_class(record.status)].increment(1);
        if !finished {
            m.aborted.increment(1);
            tracing::debug!(message_id = %record.message_id, "consumer went away before the response was complete");
        }
        if let Err(e) = local.gw.audit.submit(record) {
            metrics::counter!("fsp_audit_records_lost_total").increment(1);
            tracing::error!(error = %e, "audit record could not be queued");
        }
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        self.complete(0, false);
    }
}

/// Metric handles registered once, so the hot path does no registry lookups.
struct CallMetrics {
    duration: metrics::Histogram,
    by_class: [metrics::Counter; 4],
    aborted: metrics::Counter,
}

fn call_metrics() -> &'static CallMetrics {
    static METRICS: std::sync::OnceLock<CallMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| CallMetrics {
        duration: metrics::histogram!("fsp_request_duration_seconds"),
        by_class: ["2xx", "3xx", "4xx", "5xx"]
            .map(|class| metrics::counter!("fsp_requests_total", "status" => class)),
        aborted: metrics::counter!("fsp_responses_aborted_total"),
    })
}

fn status_class(status: u16) -> usize {
    match status {
        200..=299 => 0,
        300..=399 => 1,
        400..=499 => 2,
        _ => 3,
    }
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
    Stamped {
        inner: UpstreamBody,
        stamp: HeaderStamp,
        trailers: Option<Frame<Bytes>>,
        ended: bool,
    },
}

/// The body sent back to the consumer.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    sent: u64,
    finisher: Option<Finisher>,
}

impl ResponseBody {
    /// A body generated by the gateway (errors, admin answers).
    pub fn full(bytes: Bytes, finisher: Option<Finisher>) -> Self {
        Self {
            kind: Kind::Full(Some(bytes)),
            sent: 0,
            finisher,
        }
    }

    /// The provider's body, passed through.
    pub fn upstream(inner: UpstreamBody, finisher: Finisher) -> Self {
        Self {
            kind: Kind::Upstream(inner),
            sent: 0,
            finisher: Some(finisher),
        }
    }

    /// The provider's SOAP body, with the FSP header elements stamped in.
    pub fn stamped(inner: UpstreamBody, stamp: HeaderStamp, finisher: Finisher) -> Self {
        Self {
            kind: Kind::Stamped {
                inner,
                stamp,
                trailers: None,
                ended: false,
            },
            sent: 0,
            finisher: Some(finisher),
        }
    }

    fn done(&mut self) {
        if let Some(mut f) = self.finisher.take() {
            f.complete(self.sent, true);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(mut f) = self.finisher.take() {
            // A gateway-made body that hyper did not need to poll (HEAD, 304) still counts
            // as delivered; a provider's body cut short does not.
            let delivered = matches!(self.kind, Kind::Full(_));
            f.complete(self.sent, delivered);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(inner) => Pin::new(inner).poll_frame(cx),
            Kind::Stamped {
                inner,
                stamp,
                trailers,
                ended,
            } => loop {
                if *ended {
                    break Poll::Ready(trailers.take().map(Ok));
                }
                match Pin::new(&mut *inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            if let Some(out) = stamp.push(data) {
                                break Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        Err(frame) => {
                            *ended = true;
                            *trailers = Some(frame);
                            if let Some(held) = stamp.finish() {
                                break Poll::Ready(Some(Ok(Frame::data(held))));
                            }
                        }
                    },
                    Poll::Ready(None) => {
                        *ended = true;
                        if let Some(held) = stamp.finish() {
                            break Poll::Ready(Some(Ok(Frame::data(held))));
                        }
                    }
                    other => break other,
                }
            },
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.sent += d.len() as u64;
                }
                if this.is_end_stream() {
                    this.done();
                }
            }
            Poll::Ready(None) => this.done(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(inner) => inner.is_end_stream(),
            Kind::Stamped {
                ended, trailers, ..
            } => *ended && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(inner) => inner.size_hint(),
            Kind::Stamped { .. } => SizeHint::default(),
        }
    }
}
