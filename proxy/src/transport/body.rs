//! The consumer's request body on its way to a provider.
//!
//! It is never collected in memory: [`RequestBody`] passes the consumer's frames to the
//! provider as they arrive, counting them, stopping at the size limit, at a stall, or at
//! the first byte the XML threat protection refuses; [`CallShared`] tells the call which
//! side broke it. A body left unread by a refused call is drained ([`drain_later`]).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::xml;

/// An error from a body or an exchange, boxed for hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the request and response sides of one call share.
#[derive(Debug)]
pub struct CallShared {
    pub request_bytes: AtomicU64,
    /// Why the consumer's body stopped, when it was the consumer's fault: set once by the
    /// request body, read by the pipeline to blame the right side.
    pub consumer_fault: OnceLock<ConsumerFault>,
    /// When the request body was sent whole, in nanoseconds after `base`
    /// ([`u64::MAX`] while it is still being read): the provider's time to answer counts
    /// from there, not from the first byte of a slow upload.
    upload_done: AtomicU64,
    /// On tokio's clock, so that tests can pause time.
    base: tokio::time::Instant,
    /// The parties of a forwarded call, so that it is cut off mid-stream when either is
    /// suspended (see [`CallShared::cut_off`]).
    watch: Option<Watch>,
}

/// What can stop a call in flight: the gateway's suspensions, seen from below.
pub trait Suspensions: Send + Sync + std::fmt::Debug {
    /// How many times the suspensions in force have changed.
    fn changes(&self) -> u64;
    /// Why a call between these parties must stop, if either is suspended now.
    fn cuts_off(&self, consumer: &str, provider: &str) -> Option<Cut>;
    /// Rung after every change (after `changes` has moved), to wake the calls that
    /// wait for a silent peer.
    fn alarm(&self) -> &Alarm;
}

/// Why a call in flight must stop: one of its parties was suspended, by someone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The party suspended: `consumer ville-bxl`, `provider rrn`.
    pub party: String,
    /// Who suspended it: for the call's record and the log only. The consumer is not
    /// told who administers the platform (a refusal at the decision names nobody either).
    pub by: String,
}

impl Cut {
    /// What the call's record says: the party, and who suspended it.
    pub fn recorded(&self) -> String {
        format!("{} was suspended by {}", self.party, self.by)
    }
}

/// What the consumer is told.
impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} was suspended", self.party)
    }
}

/// Wakes the calls in flight that wait for a silent peer (a provider that sends
/// nothing, a consumer whose upload stalled) when the suspensions change, so that a
/// suspension cuts a stalled stream at once, not at its next byte.
///
/// A call is put on the list the first time it waits, and held weakly: a finished call
/// is pruned when its list is full, or at the next ring. The list is split in shards,
/// one per worker thread (by a number each thread takes once), so that calls of
/// different threads never contend for one lock; only a ring takes them all.
#[derive(Debug)]
pub struct Alarm {
    shards: Box<[Mutex<Vec<Weak<CallShared>>>]>,
}

impl Default for Alarm {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self {
            shards: (0..threads.next_power_of_two().min(64))
                .map(|_| Mutex::default())
                .collect(),
        }
    }
}

impl Alarm {
    /// Wakes every call on the list: each looks at the suspensions again, and those
    /// whose consumer or provider is now suspended stop.
    pub fn ring(&self) {
        for shard in &self.shards {
            let mut calls = shard.lock().unwrap_or_else(PoisonError::into_inner);
            calls.retain(|call| match call.upgrade() {
                Some(call) => {
                    if let Some(w) = &call.watch {
                        w.upload.wake();
                        w.answer.wake();
                    }
                    true
                }
                None => false,
            });
        }
    }

    fn enlist(&self, call: Weak<CallShared>) {
        thread_local! {
            /// This thread's shard number, taken the first time it enlists a call.
            static SHARD: usize = {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                usize::try_from(NEXT.fetch_add(1, Ordering::Relaxed)).unwrap_or(0)
            };
        }
        // A power of two: the mask picks a shard.
        let shard = SHARD.with(|n| *n) & (self.shards.len() - 1);
        let mut calls = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Pruned when full: the list holds at most about twice the calls that wait.
        if calls.len() == calls.capacity() {
            calls.retain(|c| c.strong_count() > 0);
        }
        calls.push(call);
    }

    #[cfg(test)]
    fn listed(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |c| c.len()))
            .sum()
    }
}

/// Which task of a call waits for a silent peer: the one sending the consumer's body
/// to the provider, or the one waiting for the provider's answer (its head, then its
/// body). They may run at once, on different tasks, so each has its own waker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    Upload,
    Answer,
}

/// Who a call in flight is for, and the suspension changes it has been checked against.
#[derive(Debug)]
pub struct Watch {
    store: std::sync::Arc<dyn Suspensions>,
    /// The store's change count when last checked.
    seen: AtomicU64,
    consumer: std::sync::Arc<str>,
    provider: std::sync::Arc<str>,
    /// Set once the call is on the store's [`Alarm`] (the first time it waits).
    enlisted: OnceLock<()>,
    /// The tasks to wake when the suspensions change (see [`Waiter`]).
    upload: AtomicWaker,
    answer: AtomicWaker,
}

impl Watch {
    /// `seen`: the store's change count read before the sets that allowed the call.
    pub fn new(
        store: std::sync::Arc<dyn Suspensions>,
        seen: u64,
        consumer: std::sync::Arc<str>,
        provider: std::sync::Arc<str>,
    ) -> Self {
        Self {
            seen: AtomicU64::new(seen),
            store,
            consumer,
            provider,
            enlisted: OnceLock::new(),
            upload: AtomicWaker::new(),
            answer: AtomicWaker::new(),
        }
    }
}

impl CallShared {
    pub fn new() -> Self {
        Self {
            request_bytes: AtomicU64::new(0),
            consumer_fault: OnceLock::new(),
            upload_done: AtomicU64::new(u64::MAX),
            base: tokio::time::Instant::now(),
            watch: None,
        }
    }

    /// A call between these parties: cut off when either is suspended while its
    /// request or its answer streams.
    pub fn watched(watch: Watch) -> Self {
        Self {
            watch: Some(watch),
            ..Self::new()
        }
    }

    /// Why the call must stop now, if its consumer or provider was suspended since it
    /// began (contract section 5: a suspension cuts at once). Costs one atomic load
    /// while the suspensions do not change.
    pub fn cut_off(&self) -> Option<Cut> {
        let w = self.watch.as_ref()?;
        let now = w.store.changes();
        if w.seen.load(Ordering::Relaxed) == now {
            return None;
        }
        let why = w.store.cuts_off(&w.consumer, &w.provider);
        if why.is_none() {
            w.seen.store(now, Ordering::Relaxed);
        }
        why
    }

    /// [`Self::cut_off`] for a task about to wait for a silent peer: it is woken when
    /// the suspensions change, so that a suspension cuts a stalled stream at once. Call
    /// it when the peer is found pending (never for a frame that is there): while the
    /// task stays the same, it costs two atomic operations more than `cut_off`; a call
    /// is put on the store's [`Alarm`] once, the first time it waits.
    ///
    /// The waker is registered before the change count is read, and the store bumps
    /// the count before it rings: a change is either seen here or wakes the task.
    pub fn cut_off_or_wake(self: &Arc<Self>, waiter: Waiter, cx: &Context<'_>) -> Option<Cut> {
        let w = self.watch.as_ref()?;
        // Other tasks of the call wait until the call is on the list.
        w.enlisted
            .get_or_init(|| w.store.alarm().enlist(Arc::downgrade(self)));
        match waiter {
            Waiter::Upload => w.upload.register(cx.waker()),
            Waiter::Answer => w.answer.register(cx.waker()),
        }
        self.cut_off()
    }

    /// Resolves with why the call must stop, as soon as its consumer or provider is
    /// suspended (never, for a call nobody watches). Raced against a wait for the
    /// provider (its answer's head, a WSDL), it cuts that wait at once. Polled by the
    /// task that waits for the provider's answer ([`Waiter::Answer`]).
    pub async fn cut(self: &Arc<Self>) -> Cut {
        std::future::poll_fn(|cx| match self.cut_off_or_wake(Waiter::Answer, cx) {
            Some(why) => Poll::Ready(why),
            None => Poll::Pending,
        })
        .await
    }

    /// Notes that the request body has been sent whole (the request body does).
    pub fn mark_upload_done(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.upload_done.store(ns, Ordering::Relaxed);
    }

    /// When the request body was sent whole, if it was.
    pub fn upload_done_at(&self) -> Option<tokio::time::Instant> {
        match self.upload_done.load(Ordering::Relaxed) {
            u64::MAX => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    fn blame_consumer(&self, fault: ConsumerFault) {
        let _ = self.consumer_fault.set(fault);
    }
}

impl Default for CallShared {
    fn default() -> Self {
        Self::new()
    }
}

/// How a consumer's request body failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumerFault {
    /// Larger than the limit (bytes).
    TooLarge(u64),
    /// No bytes for this long.
    Stalled(Duration),
    /// The consumer hung up, or sent fewer bytes than it announced.
    Incomplete(String),
    /// Invalid framing (chunked encoding).
    Malformed(String),
    /// The XML threat protection refused the body.
    Xml(String),
    /// The consumer or the provider was suspended while the body was being sent.
    Suspended(Cut),
}

impl ConsumerFault {
    /// What went wrong with a consumer's body, from hyper's reading of it: invalid
    /// framing (a bad chunk) or a body that ended early (hang-up, short length).
    pub fn of(e: &hyper::Error) -> Self {
        let malformed = e.is_parse()
            || std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some_and(|io| {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                    )
                });
        if malformed {
            Self::Malformed(e.to_string())
        } else {
            Self::Incomplete(e.to_string())
        }
    }
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
    #[error("the consumer sent no part of the request body for {0:?}")]
    Stalled(Duration),
    #[error("the XML request was refused: {0}")]
    Xml(#[source] xml::XmlError),
    #[error("the call was cut off: {}", .0.recorded())]
    CutOff(Cut),
}

/// At most this much of a refused request's remaining body is read and thrown away...
const DRAIN_MAX_BYTES: usize = 1024 * 1024;
/// ...for at most this long.
const DRAIN_MAX_TIME: Duration = Duration::from_secs(5);

/// Reads what is left of the body of a request that was answered before it was read
/// whole, and throws it away, for a bounded time and size: a connection closed while
/// the consumer is still sending is reset, and a reset discards the answer the consumer
/// has not read yet (nginx's lingering close does the same).
pub fn drain_later(body: Incoming) {
    if body.is_end_stream() || tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        let mut body = body;
        let mut left = DRAIN_MAX_BYTES;
        let _ = tokio::time::timeout(DRAIN_MAX_TIME, async {
            while let Some(Ok(frame)) = body.frame().await {
                let n = frame.data_ref().map_or(0, |d| d.len());
                left = left.saturating_sub(n);
                if left == 0 {
                    break;
                }
            }
        })
        .await;
    });
}

/// A consumer's request body not yet handed to the forwarder: if the call is refused
/// before, what is left of it is drained ([`drain_later`]).
#[derive(Debug)]
pub struct Unread(Option<Incoming>);

impl Unread {
    pub fn new(body: Incoming) -> Self {
        Self(Some(body))
    }

    pub fn incoming(&mut self) -> Option<&mut Incoming> {
        self.0.as_mut()
    }

    /// Hands the body over (to [`RequestBody`], which drains it in turn if need be).
    pub fn take(&mut self) -> Option<Incoming> {
        self.0.take()
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        if let Some(body) = self.0.take() {
            drain_later(body);
        }
    }
}

/// The consumer's request body on its way to the provider.
///
/// It stops (with an error, so the provider never receives a complete request) when the
/// body grows past the size limit, when the consumer sends nothing for the read timeout,
/// and, for XML, at the first byte the XML threat protection refuses: the frame holding
/// that byte is never forwarded.
#[derive(Debug)]
pub struct RequestBody {
    /// Bytes already read by the gateway (the start of a SOAP envelope, to find its
    /// Header), sent before the rest.
    prefix: Option<Bytes>,
    /// `None` once the body has ended (or when there was none).
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
    shared: Arc<CallShared>,
    /// The longest silence allowed between two pieces of the body.
    read_timeout: Duration,
    last_progress: Instant,
    /// Armed the first time the body is waited for (most bodies arrive with their head).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// XML threat protection, already fed with `prefix`.
    xml: XmlCheck,
}

/// How a request body is checked for XML threats.
#[derive(Debug)]
pub enum XmlCheck {
    /// Every byte through this guard (SOAP, or an XML `Content-Type`).
    On(Box<xml::Guard>),
    /// A body that does not say it is XML is still checked if it starts like XML (`<`
    /// or a byte order mark after any white space): many providers sniff their input.
    /// `charset`: what its `Content-Type` says of its charset ([`xml::said_charset`]).
    Sniff {
        limits: xml::Limits,
        charset: Option<bool>,
    },
    Off,
}

impl RequestBody {
    /// A body whose first bytes were already read into `prefix` (and fed to `xml`).
    pub fn new(
        prefix: Bytes,
        inner: Option<Incoming>,
        limit: u64,
        read_timeout: Duration,
        xml: XmlCheck,
        shared: Arc<CallShared>,
    ) -> Self {
        let seen = prefix.len() as u64;
        shared.request_bytes.store(seen, Ordering::Relaxed);
        if prefix.is_empty() && inner.as_ref().is_none_or(Body::is_end_stream) {
            shared.mark_upload_done();
        }
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            inner,
            limit,
            seen,
            shared,
            read_timeout,
            last_progress: Instant::now(),
            stall: None,
            xml,
        }
    }

    fn fail(
        &mut self,
        fault: ConsumerFault,
        error: BodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.shared.blame_consumer(fault);
        Poll::Ready(Some(Err(error)))
    }

    /// Whether the consumer has been silent for longer than the read timeout; arms the
    /// timer to wake the task when it would be.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = tokio::time::Instant::from_std(self.last_progress + self.read_timeout);
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx).is_ready()
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
        loop {
            let Some(inner) = &mut this.inner else {
                return Poll::Ready(None);
            };
            return match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.last_progress = Instant::now();
                    // Trailer fields from consumers are not passed on: nothing the
                    // gateway did not look at reaches a provider.
                    let Some(data) = frame.data_ref() else {
                        continue;
                    };
                    this.seen += data.len() as u64;
                    this.shared
                        .request_bytes
                        .store(this.seen, Ordering::Relaxed);
                    if this.seen > this.limit {
                        let limit = this.limit;
                        return this
                            .fail(ConsumerFault::TooLarge(limit), BodyError::TooLarge(limit));
                    }
                    if let Err(e) = this.xml.feed(data) {
                        return this.fail(ConsumerFault::Xml(e.to_string()), BodyError::Xml(e));
                    }
                    if let Some(why) = this.shared.cut_off() {
                        return this.fail(
                            ConsumerFault::Suspended(why.clone()),
                            BodyError::CutOff(why),
                        );
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => this.fail(ConsumerFault::of(&e), BodyError::Client(e)),
                Poll::Ready(None) => {
                    // The end of an XML body: a document that is not whole is not
                    // completed towards the provider either.
                    if let XmlCheck::On(guard) = &mut this.xml
                        && let Err(e) = guard.finish()
                    {
                        return this.fail(ConsumerFault::Xml(e.to_string()), BodyError::Xml(e));
                    }
                    this.shared.mark_upload_done();
                    this.inner = None;
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    if this.stalled(cx) {
                        let t = this.read_timeout;
                        return this.fail(ConsumerFault::Stalled(t), BodyError::Stalled(t));
                    }
                    // A suspension wakes the task: a stalled upload is cut at once.
                    if let Some(why) = this.shared.cut_off_or_wake(Waiter::Upload, cx) {
                        return this.fail(
                            ConsumerFault::Suspended(why.clone()),
                            BodyError::CutOff(why),
                        );
                    }
                    Poll::Pending
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

impl XmlCheck {
    fn feed(&mut self, data: &[u8]) -> Result<(), xml::XmlError> {
        if let XmlCheck::Sniff { limits, charset } = self {
            match data.iter().find(|b| !b.is_ascii_whitespace()) {
                // Only white space so far: look again at the next piece.
                None => return Ok(()),
                Some(b'<' | 0xEF) => {
                    let mut guard = xml::Guard::new(*limits);
                    guard.charset_said(*charset);
                    *self = XmlCheck::On(Box::new(guard));
                }
                Some(_) => *self = XmlCheck::Off,
            }
        }
        match self {
            XmlCheck::On(guard) => guard.feed(data),
            _ => Ok(()),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Not read to its end: the provider answered early, or the body was refused.
        if let Some(inner) = self.inner.take() {
            drain_later(inner);
        }
    }
}

/// Whether a consumer takes the answers it asked for (one per HTTP/1.1 connection, one
/// per HTTP/2 stream: see `ConnInfo::answer_progress`). An answer streamed from a provider
/// holds one of the provider's slots (and its connection) until it ends, and a consumer
/// that stops reading (a full TCP window, an HTTP/2 window it never opens) would hold
/// them for ever: the listener closes a connection whose answers have something to hand
/// over and are not asked for more for `listener.response_send_timeout`
/// (`crate::server`'s `watching`).
#[derive(Debug, Default)]
pub struct AnswerProgress {
    /// Answers that handed their last frame over and wait to be asked for the next
    /// (not those waiting for their provider).
    waiting_for_consumer: std::sync::atomic::AtomicUsize,
    /// Frames asked for, by every answer it counts.
    pulls: std::sync::atomic::AtomicU64,
    /// Set when the listener closes the connection for it: the records say why.
    stalled: std::sync::atomic::AtomicBool,
    /// The watch's own: the pulls it saw at its last look, and how many looks in a row
    /// saw an answer waiting and nothing asked for.
    seen: AtomicU64,
    still: AtomicU64,
}

impl AnswerProgress {
    /// An answer handed a frame over (`true`) or waits for its provider (`false`), after
    /// it did the other.
    pub fn handed(&self, handed: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if handed {
            self.waiting_for_consumer.fetch_add(1, Relaxed);
        } else {
            self.waiting_for_consumer.fetch_sub(1, Relaxed);
        }
    }

    /// An answer was asked for its next frame.
    pub fn pulled(&self) {
        self.pulls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The connection's watch looks (every tick): whether an answer has waited for the
    /// consumer, with no frame asked for, for `looks` looks in a row (then it is marked,
    /// so that its record says why its connection was closed).
    pub fn look(&self, looks: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (waiting, pulls) = (
            self.waiting_for_consumer.load(Relaxed),
            self.pulls.load(Relaxed),
        );
        if waiting == 0 || self.seen.swap(pulls, Relaxed) != pulls {
            self.still.store(0, Relaxed);
            return false;
        }
        if self.still.fetch_add(1, Relaxed) + 1 >= looks {
            self.stalled.store(true, Relaxed);
            return true;
        }
        false
    }

    pub fn stalled(&self) -> bool {
        self.stalled.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::Arc;

    /// Suspensions as a test sets them: a change count and who is suspended.
    #[derive(Debug, Default)]
    struct Fake {
        changes: AtomicU64,
        suspended: std::sync::Mutex<Vec<String>>,
        alarm: Alarm,
    }

    impl Fake {
        fn suspend(&self, id: &str) {
            self.suspended.lock().unwrap().push(id.to_owned());
            self.changes.fetch_add(1, Ordering::AcqRel);
            self.alarm.ring();
        }
    }

    impl Suspensions for Fake {
        fn changes(&self) -> u64 {
            self.changes.load(Ordering::Acquire)
        }
        fn cuts_off(&self, consumer: &str, provider: &str) -> Option<Cut> {
            let s = self.suspended.lock().unwrap();
            s.iter()
                .find(|id| *id == consumer || *id == provider)
                .map(|id| Cut {
                    party: id.clone(),
                    by: "admin".into(),
                })
        }
        fn alarm(&self) -> &Alarm {
            &self.alarm
        }
    }

    /// A call is checked again only when the suspensions changed since the count its
    /// decision saw (read before the sets): a suspension landing after the decision,
    /// even before the watch is made, cuts it; others' suspensions do not.
    #[test]
    fn a_watch_cuts_its_call_for_its_own_parties_only_and_from_the_decisions_count() {
        let fake = Arc::new(Fake::default());
        let seen = fake.changes();
        // Between the decision and the forwarding: someone else, then the consumer.
        fake.suspend("other");
        let shared = CallShared::watched(Watch::new(fake.clone(), seen, "c".into(), "p".into()));
        assert_eq!(shared.cut_off(), None);
        fake.suspend("c");
        assert_eq!(
            shared.cut_off().map(|c| c.recorded()).as_deref(),
            Some("c was suspended by admin")
        );
        // The provider too.
        let shared = CallShared::watched(Watch::new(
            fake.clone(),
            fake.changes(),
            "d".into(),
            "p".into(),
        ));
        assert_eq!(shared.cut_off(), None);
        fake.suspend("p");
        assert_eq!(
            shared.cut_off().map(|c| c.recorded()).as_deref(),
            Some("p was suspended by admin")
        );
        // A call nobody watches is never cut.
        assert_eq!(CallShared::new().cut_off(), None);
    }

    /// A task waiting for a silent peer is woken by a suspension and stops at once; a
    /// suspension of someone else wakes it too, and it waits on. Under paused time: the
    /// wait ends with the suspension, not with any timer.
    #[tokio::test(start_paused = true)]
    async fn a_suspension_wakes_a_call_waiting_for_a_silent_peer() {
        let fake = Arc::new(Fake::default());
        let shared = Arc::new(CallShared::watched(Watch::new(
            fake.clone(),
            fake.changes(),
            "c".into(),
            "p".into(),
        )));
        let waiting = tokio::spawn({
            let shared = shared.clone();
            async move { shared.cut().await }
        });
        tokio::task::yield_now().await;
        fake.suspend("other");
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "cut for someone else's suspension");
        fake.suspend("p");
        let why = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("still waiting after the suspension")
            .unwrap();
        assert_eq!(why.to_string(), "p was suspended");

        // A call nobody watches waits on.
        let unwatched = Arc::new(CallShared::new());
        let waited = tokio::time::timeout(Duration::from_secs(3600), unwatched.cut()).await;
        assert!(waited.is_err());
    }

    /// The alarm holds the calls that waited weakly, and finished calls leave its list:
    /// it does not grow with the calls a gateway has served.
    #[test]
    fn the_alarm_forgets_finished_calls() {
        let fake = Arc::new(Fake::default());
        let waker = std::task::Waker::noop();
        let cx = Context::from_waker(waker);
        let live: Vec<Arc<CallShared>> = (0..10)
            .map(|_| {
                let shared = Arc::new(CallShared::watched(Watch::new(
                    fake.clone(),
                    fake.changes(),
                    "c".into(),
                    "p".into(),
                )));
                // Waiting twice, on both sides: listed once.
                for waiter in [Waiter::Upload, Waiter::Answer, Waiter::Upload] {
                    assert_eq!(shared.cut_off_or_wake(waiter, &cx), None);
                }
                shared
            })
            .collect();
        assert_eq!(fake.alarm.listed(), 10);
        for _ in 0..10_000 {
            let shared = Arc::new(CallShared::watched(Watch::new(
                fake.clone(),
                fake.changes(),
                "c".into(),
                "p".into(),
            )));
            assert_eq!(shared.cut_off_or_wake(Waiter::Answer, &cx), None);
        }
        let listed = fake.alarm.listed();
        assert!(listed <= 64, "{listed} calls listed, 10 alive");
        fake.suspend("other");
        assert_eq!(fake.alarm.listed(), 10);
        drop(live);
    }
}
