//! The body sent back to the consumer, and the completion of the call's audit record.
//!
//! [`ResponseBody`] passes the provider's frames back (stamping SOAP headers on the way),
//! counts them, and completes the call's audit record when the last frame is sent, or
//! when the consumer goes away mid-stream, since the record is completed on drop. The
//! record goes to a [`Recorder`], the narrow face of the gateway this module knows.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::errors::Side;
use crate::soap::HeaderStamp;
use crate::transport::body::{AnswerProgress, BoxError, CallShared, Cut, Waiter};
use crate::transport::pool::UpstreamBody;
use crate::xml;

/// Where completed audit records go: the gateway's audit sink, seen through the one
/// thing a finished call needs from it.
pub trait Recorder: Send + Sync + std::fmt::Debug {
    /// Queues a completed record (durably written by the sink's own task).
    fn record(&self, record: Box<audit::Record>);

    /// Counts the finished call in the metrics labelled by consumer, service and version.
    fn observe(&self, _record: &audit::Record, _elapsed: std::time::Duration) {}
}

/// Completes a call's audit record exactly once: when the response body ends, or when it
/// is dropped unfinished (the consumer went away).
#[derive(Debug)]
pub struct Finisher {
    inner: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    /// Boxed since the call began (see `pipeline::call::Call`): it is never copied on
    /// its way here.
    record: Box<audit::Record>,
    started: Instant,
    shared: Option<Arc<CallShared>>,
    /// This thread's view of the gateway, as the audit sink that takes the record.
    recorder: Arc<dyn Recorder>,
    /// The call's trace: its span ends with the call.
    trace: crate::trace::CallTrace,
}

impl Finisher {
    pub fn new(
        record: Box<audit::Record>,
        started: Instant,
        shared: Option<Arc<CallShared>>,
        trace: crate::trace::CallTrace,
        recorder: Arc<dyn Recorder>,
    ) -> Self {
        Self {
            inner: Some(Pending {
                record,
                started,
                shared,
                recorder,
                trace,
            }),
        }
    }

    /// Says who broke a call whose answer had already begun (its status is sent).
    pub(crate) fn blame(&mut self, side: Side, detail: String) {
        if let Some(p) = &mut self.inner
            && p.record.fault.is_none()
        {
            p.record.fault = Some(side.as_str().to_owned());
            p.record.detail = Some(detail);
        }
    }

    /// Why the call must stop now (its consumer or provider was suspended since it
    /// began), written into its record as the decision that ended it. `waiting`: the
    /// provider's body is pending, and the task is to be woken by a suspension (see
    /// `CallShared::cut_off_or_wake`).
    fn cut_off(&mut self, waiting: Option<&Context<'_>>) -> Option<Cut> {
        let p = self.inner.as_mut()?;
        let shared = p.shared.as_ref()?;
        let why = match waiting {
            Some(cx) => shared.cut_off_or_wake(Waiter::Answer, cx),
            None => shared.cut_off(),
        }?;
        p.record.decision = crate::errors::Code::AuthzSuspended.as_str().to_owned();
        // As for a suspension found before the call (a denial is the caller's side).
        p.record.fault = Some(Side::Consumer.as_str().to_owned());
        p.record.detail = Some(format!(
            "cut off while the answer was streaming: {}",
            why.recorded()
        ));
        Some(why)
    }

    fn complete(&mut self, response_bytes: u64, finished: bool) {
        let Some(p) = self.inner.take() else { return };
        let Pending {
            mut record,
            started,
            shared,
            recorder,
            trace,
        } = p;
        let elapsed = started.elapsed();
        if record.phase.is_some() {
            // Its request line is in the trail already: this is that call's outcome.
            record.phase = Some(audit::Phase::Outcome);
        }
        record.duration_ms = (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        record.response_bytes = response_bytes;
        if let Some(s) = shared {
            record.request_bytes = s.request_bytes.load(Ordering::Relaxed);
        }
        let m = call_metrics();
        recorder.observe(&record, elapsed);
        m.duration.record(elapsed.as_secs_f64());
        m.by_class[status_class(record.status)].increment(1);
        if !finished {
            m.aborted.increment(1);
            tracing::debug!(message_id = %record.message_id, "consumer went away before the response was complete");
            if record.fault.is_none() {
                record.fault = Some(Side::Consumer.as_str().to_owned());
                record.detail = Some(format!(
                    "the consumer went away after {response_bytes} bytes of the answer"
                ));
            }
        }
        trace.finish(&record);
        recorder.record(record);
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
    /// The provider's body, with SOAP header elements stamped in and/or every byte
    /// through the XML guard.
    Checked(Box<Checked>),
}

/// The provider's body on its way through the stamp and the XML guard. The bytes read
/// before the answer's head was sent (see `pipeline::respond`) go first.
#[derive(Debug)]
pub struct Checked {
    pub inner: UpstreamBody,
    /// What to send before reading on (already stamped and checked).
    pub pending: Option<Bytes>,
    pub stamp: Option<HeaderStamp>,
    pub guard: Option<xml::Guard>,
    pub trailers: Option<Frame<Bytes>>,
    /// The provider's body has ended (what is left is `pending` and `trailers`).
    pub ended: bool,
}

impl Checked {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(out) = self.pending.take() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if self.ended {
                return Poll::Ready(self.trailers.take().map(Ok));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(guard) = &mut self.guard
                            && let Err(e) = guard.feed(&data)
                        {
                            return Poll::Ready(Some(Err(refused(e))));
                        }
                        self.pending = match &mut self.stamp {
                            Some(stamp) => stamp.push(data),
                            None => Some(data),
                        };
                    }
                    Err(frame) => {
                        self.trailers = Some(frame);
                        if let Err(e) = self.end() {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                },
                Poll::Ready(None) => {
                    if let Err(e) = self.end() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                other => return other,
            }
        }
    }

    /// The provider's body has ended: the document must be complete; what the stamp
    /// held back goes out.
    pub fn end(&mut self) -> Result<(), BoxError> {
        self.ended = true;
        if let Some(guard) = &mut self.guard {
            guard.finish().map_err(refused)?;
        }
        if let Some(held) = self.stamp.as_mut().and_then(HeaderStamp::finish) {
            self.pending = Some(held);
        }
        Ok(())
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.pending.is_none() && self.trailers.is_none()
    }
}

/// An answer cut off because its consumer or provider was suspended.
#[derive(Debug)]
pub struct CutOff(pub Cut);

impl std::fmt::Display for CutOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the call was cut off: {}", self.0.recorded())
    }
}

impl std::error::Error for CutOff {}

/// An answer the XML guard refused half-way: the consumer's copy is cut off.
#[derive(Debug)]
pub struct AnswerRefused(pub xml::XmlError);

impl std::fmt::Display for AnswerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "its XML was refused ({})", self.0)
    }
}

impl std::error::Error for AnswerRefused {}

fn refused(e: xml::XmlError) -> BoxError {
    Box::new(AnswerRefused(e))
}

/// The body sent back to the consumer.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    sent: u64,
    finisher: Option<Finisher>,
    /// The consumer's connection, told how this answer moves (a provider's answer only,
    /// until it ends), and whether its last frame was handed over (`true`) or it waits
    /// for its provider.
    progress: Option<(Arc<AnswerProgress>, bool)>,
}

impl ResponseBody {
    /// A body generated by the gateway (errors, admin answers).
    pub fn full(bytes: Bytes, finisher: Option<Finisher>) -> Self {
        Self {
            kind: Kind::Full(Some(bytes)),
            sent: 0,
            finisher,
            progress: None,
        }
    }

    /// The provider's body, passed through.
    pub fn upstream(inner: UpstreamBody, finisher: Finisher) -> Self {
        Self {
            kind: Kind::Upstream(inner),
            sent: 0,
            finisher: Some(finisher),
            progress: None,
        }
    }

    /// The provider's body, stamped and/or checked.
    pub fn checked(checked: Box<Checked>, finisher: Finisher) -> Self {
        Self {
            kind: Kind::Checked(checked),
            sent: 0,
            finisher: Some(finisher),
            progress: None,
        }
    }

    /// Tells the consumer's connection how this answer moves, if it is a provider's (see
    /// [`AnswerProgress`]).
    pub fn sent_over(mut self, answers: impl FnOnce() -> Arc<AnswerProgress>) -> Self {
        if !matches!(self.kind, Kind::Full(_)) {
            self.progress = Some((answers(), false));
        }
        self
    }

    fn done(&mut self) {
        self.release();
        if let Some(mut f) = self.finisher.take() {
            f.complete(self.sent, true);
        }
    }

    /// The answer ended (or is dropped): its connection no longer waits on it.
    fn release(&mut self) {
        if let Some((conn, handed)) = self.progress.take()
            && handed
        {
            conn.handed(false);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some((conn, _)) = &self.progress
            && conn.stalled()
            && let Some(f) = &mut self.finisher
        {
            f.blame(
                Side::Consumer,
                format!(
                    "the consumer stopped taking the answer after {} bytes (nothing taken for listener.response_send_timeout): its connection was closed",
                    self.sent
                ),
            );
        }
        self.release();
        if let Some(mut f) = self.finisher.take() {
            // A gateway-made body that hyper did not need to poll (HEAD, 304) still counts
            // as delivered, and so does a provider's body that was already at its end
            // (HEAD, 204, 304: hyper does not poll a body those cannot have); a provider's
            // body cut short does not.
            let delivered = matches!(self.kind, Kind::Full(_)) || self.is_end_stream();
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
        // A suspension cuts the answer of a call in flight (contract section 5).
        if !matches!(this.kind, Kind::Full(_))
            && let Some(why) = this.finisher.as_mut().and_then(|f| f.cut_off(None))
        {
            return Poll::Ready(Some(Err(Box::new(CutOff(why)))));
        }
        let mut polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(inner) => Pin::new(inner).poll_frame(cx),
            Kind::Checked(checked) => checked.poll_frame(cx),
        };
        // A provider that sends nothing: a suspension wakes the task and cuts the answer
        // at once, not at the provider's next byte.
        if polled.is_pending()
            && let Some(why) = this.finisher.as_mut().and_then(|f| f.cut_off(Some(cx)))
        {
            return Poll::Ready(Some(Err(Box::new(CutOff(why)))));
        }
        // The provider's trailers say no more than its head may (see `strip_platform_fields`).
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            crate::headers::strip_platform_fields(trailers);
        }
        // How the answer moves, for the connection's watch on consumers that stop reading.
        if let Some((conn, handed)) = &mut this.progress {
            conn.pulled();
            let now = polled.is_ready();
            if now != *handed {
                *handed = now;
                conn.handed(now);
            }
        }
        match &polled {
            Poll::Ready(Some(Err(e))) => {
                // The status is already on its way: the record says whose fault the
                // broken answer is.
                let sent = this.sent;
                if let Some(f) = &mut this.finisher {
                    f.blame(
                        Side::Provider,
                        format!("the provider's answer broke off after {sent} bytes: {e}"),
                    );
                }
            }
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
            Kind::Checked(checked) => checked.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(inner) => inner.size_hint(),
            Kind::Checked(_) => SizeHint::default(),
        }
    }
}
