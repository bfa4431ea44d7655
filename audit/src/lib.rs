//! # The audit trail
//!
//! Every call through the gateway leaves one [`Record`]: who called (consumer and
//! credential), what (service, version, operation), why (purpose, authorisation, legal
//! basis), what was decided, and how it ended. Records are handed to an [`AuditSink`];
//! the gateway never waits on disk in the request path: sinks take a record without
//! blocking and persist it in the background, reporting their health so that a
//! fail-closed gateway can refuse calls it could not record.
//!
//! The first sink is [`file::FileSink`]: one JSON object per line, in segment files per
//! node and day.
//! Every record is sealed into its node's hash chain ([`chain`]) when it is written.

use serde::{Deserialize, Serialize};

pub mod chain;
pub mod export;
pub mod file;
pub mod file_index;
pub mod file_stats;
mod json;
pub mod pg_tls;
pub mod postgres;
pub mod seal;
pub mod stats;

/// Held by a backend's writer thread: should the writer stop on a panic (a defect),
/// `mark` is told why, so that the backend marks its trail unavailable at once and
/// readiness, the admin API and calls see it rather than wait for confirmations that
/// cannot come.
pub(crate) struct WriterGuard<F: FnMut(&str)>(pub(crate) F);

impl<F: FnMut(&str)> Drop for WriterGuard<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)(
                "the audit writer stopped on an internal error (see the log): restart the gateway",
            );
        }
    }
}

/// One call, in the export format of the contract (section 6). Field order is the
/// contract's.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The FSP message id (UUID v7) given to the call.
    pub message_id: String,
    /// When the gateway received the call (RFC 3339, UTC).
    pub timestamp: String,
    pub consumer: Option<String>,
    /// `certificate` or `oauth`.
    pub credential: Option<String>,
    /// Certificate SHA-256 or OAuth client id.
    pub credential_id: Option<String>,
    pub source_ip: String,
    /// `family/service`.
    pub service: Option<String>,
    pub version: Option<String>,
    /// The SOAP action, or `METHOD /path`.
    pub operation: String,
    pub purpose: Option<String>,
    pub authorisation: Option<String>,
    pub legal_basis: Option<String>,
    pub end_user: Option<String>,
    /// The consumer's own correlation id (`X-Request-ID`, WS-Addressing `MessageID`).
    pub consumer_ref: Option<String>,
    /// `allowed`, or the FSP error code that refused the call.
    pub decision: String,
    /// The HTTP status returned to the consumer.
    pub status: u16,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub trace_id: Option<String>,
    /// The gateway instance that wrote the record.
    pub node: String,
    /// Extension: who caused a refusal or failure (`consumer`, `provider`, `gateway`);
    /// `None` for a call that was allowed and answered.
    pub fault: Option<String>,
    /// Extension: why the call was refused or failed, in full (including what the
    /// consumer was not shown, such as the provider's address or an OS error).
    pub detail: Option<String>,
    /// Extension: which line of a write-ahead call this is. `request`: written and
    /// made durable before the call was forwarded (`status` 0: its outcome is not known
    /// yet); `outcome`: the same call, complete, written when it ended. Absent for a call
    /// recorded once, complete (refusals, and every call of a fail-open gateway). Readers
    /// give one record per call: the outcome when there is one, else the request line,
    /// which then says plainly that the call's end was never recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Extension: the SHA-256 (lower-case hex, as `credential_id` gives a certificate's)
    /// of the client certificate the connection presented, when the call was identified
    /// by something else (an OAuth token: `credential` `oauth`), so that the record keeps
    /// both credentials, whether they name one consumer or two (a conflict). Absent
    /// otherwise, and then not written at all: records without it keep the canonical form
    /// (and hash) they had before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

/// The line of a write-ahead call a record is (see [`Record::phase`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Written before forwarding; the outcome follows in a later line.
    Request,
    /// The outcome of a call whose request line came before.
    Outcome,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Outcome => "outcome",
        }
    }
}

impl Record {
    /// Whether this line is a request whose outcome is still to come.
    pub fn is_request_line(&self) -> bool {
        self.phase == Some(Phase::Request)
    }
}

/// Folds a trail's lines, read in the order they were written, into one record per
/// call: a `request` line waits for its `outcome`, which replaces it; a complete line
/// passes at once. [`Calls::unfinished`] gives the request lines whose outcome never
/// came (the gateway stopped during the call): they are the record of those calls, with
/// `phase` `request` and `status` 0. Memory: the calls in flight when lines were
/// written, not the trail.
#[derive(Debug, Default)]
pub struct Calls {
    waiting: std::collections::HashMap<(String, String), Record>,
}

impl Calls {
    /// The next line of the trail; returns the call it completes, if it does.
    pub fn line(&mut self, record: Record) -> Option<Record> {
        match record.phase {
            Some(Phase::Request) => {
                let key = (record.node.clone(), record.message_id.clone());
                self.waiting.insert(key, record);
                None
            }
            Some(Phase::Outcome) => {
                // Owned key for the lookup: outcome lines are read, not written, here.
                self.waiting
                    .remove(&(record.node.clone(), record.message_id.clone()));
                Some(record)
            }
            None => Some(record),
        }
    }

    /// The calls whose outcome was never written, in the order of their message ids
    /// (UUID v7: the order they were received).
    pub fn unfinished(self) -> Vec<Record> {
        let mut left: Vec<Record> = self.waiting.into_values().collect();
        left.sort_by(|a, b| a.message_id.cmp(&b.message_id));
        left
    }
}

/// Resolves once a record taken by [`AuditSink::submit_durable`] is durable (on disk and
/// synced, or committed), or with the reason it could not be made so.
#[derive(Debug)]
pub struct Durable(tokio::sync::oneshot::Receiver<Result<(), String>>);

/// The writer's side of a [`Durable`]: completed once the record's batch is durable,
/// through the [`Relay`] of the runtime its caller runs on, if it runs on one.
#[derive(Debug)]
pub struct DurableTicket(Reply, Option<Relay>);

type Reply = tokio::sync::oneshot::Sender<Result<(), String>>;

impl Durable {
    /// A pending durability and the ticket a writer completes.
    pub fn pending() -> (Self, DurableTicket) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(rx), DurableTicket(tx, Relay::of_this_thread()))
    }
}

impl DurableTicket {
    /// The record is durable.
    pub fn done(self) {
        self.complete(Ok(()));
    }

    /// The record could not be made durable (the writer gave up or stopped).
    pub fn failed(self, why: String) {
        self.complete(Err(why));
    }

    /// Done or failed, as `result` says.
    pub fn complete(self, result: Result<(), String>) {
        match self.1 {
            Some(relay) => relay.complete(self.0, result),
            None => {
                let _ = self.0.send(result);
            }
        }
    }
}

/// Completes a writer's tickets on the runtime their callers run on, with one wake-up
/// of that runtime per batch: a ticket completed from the writer's thread wakes its
/// caller's runtime once per ticket (a system call each time the runtime sleeps), a
/// hundred per batch under load; the relay's task, woken by the first ticket of a batch,
/// completes them all from inside the runtime, where waking a task is a push onto its
/// run queue. One relay per thread that runs a runtime, made by the first ticket there.
#[derive(Debug, Clone)]
pub struct Relay(std::sync::Arc<RelayInner>);

#[derive(Debug, Default)]
struct RelayInner {
    /// The replies the task is to send.
    due: std::sync::Mutex<Vec<(Reply, Result<(), String>)>>,
    wake: tokio::sync::Notify,
    /// The task is gone (its runtime shut down): replies are sent where they are handed
    /// over. Set under `due`'s lock, so that no reply is left behind in it.
    gone: std::sync::atomic::AtomicBool,
}

/// Held by the relay's task: when the task is dropped (its runtime shut down), what is
/// due is sent at once and later replies are sent where they are handed over.
struct RelayTask(std::sync::Arc<RelayInner>);

impl Drop for RelayTask {
    fn drop(&mut self) {
        let due = {
            let mut due = self.0.due.lock().unwrap_or_else(|e| e.into_inner());
            self.0
                .gone
                .store(true, std::sync::atomic::Ordering::Release);
            std::mem::take(&mut *due)
        };
        for (reply, result) in due {
            let _ = reply.send(result);
        }
    }
}

impl Relay {
    /// The relay of the calling thread's tokio runtime (made on first use, and again
    /// when the runtime it ran on is gone); `None` outside a runtime (then the writer
    /// completes tickets itself).
    fn of_this_thread() -> Option<Self> {
        thread_local! {
            static RELAY: std::cell::RefCell<Option<Relay>> =
                const { std::cell::RefCell::new(None) };
        }
        RELAY.with(|cell| {
            let mut cell = cell.borrow_mut();
            let live = cell
                .as_ref()
                .is_some_and(|r| !r.0.gone.load(std::sync::atomic::Ordering::Acquire));
            if !live {
                *cell = Self::on_current_runtime();
            }
            cell.clone()
        })
    }

    /// A relay whose task runs on the calling thread's tokio runtime; `None` outside one.
    fn on_current_runtime() -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let inner = std::sync::Arc::new(RelayInner::default());
        let task = RelayTask(inner.clone());
        runtime.spawn(async move {
            loop {
                task.0.wake.notified().await;
                let due =
                    std::mem::take(&mut *task.0.due.lock().unwrap_or_else(|e| e.into_inner()));
                for (reply, result) in due {
                    let _ = reply.send(result);
                }
            }
        });
        Some(Self(inner))
    }

    /// Sends a ticket's reply, on the relay's runtime.
    fn complete(&self, reply: Reply, result: Result<(), String>) {
        let mut due = self.0.due.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.gone.load(std::sync::atomic::Ordering::Acquire) {
            drop(due);
            let _ = reply.send(result);
            return;
        }
        let first = due.is_empty();
        due.push((reply, result));
        drop(due);
        if first {
            self.0.wake.notify_one();
        }
    }
}

impl std::future::Future for Durable {
    type Output = Result<(), AuditError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(AuditError::Unavailable(why)),
            Err(_) => Err(AuditError::Closed),
        })
    }
}

/// Why a sink cannot take a record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("the audit writer is not keeping up ({0} records waiting); the record was not taken")]
    Backlog(usize),
    #[error("the audit trail cannot be written: {0}")]
    Unavailable(String),
    #[error("the audit trail is shut down")]
    Closed,
}

/// Where records go. One implementation per backend; the gateway holds a `dyn AuditSink`.
pub trait AuditSink: Send + Sync + std::fmt::Debug + 'static {
    /// Takes a record without blocking; it is persisted in the background.
    fn submit(&self, record: Record) -> Result<(), AuditError>;

    /// Takes a record without blocking and returns what resolves once it is durable.
    /// Concurrent records share one sync or commit (group commit): the writer takes
    /// whatever waits as one batch as soon as the previous batch is durable (the
    /// PostgreSQL writer may hold records nobody waits for back for a later batch).
    fn submit_durable(&self, record: &Record) -> Result<Durable, AuditError>;

    /// Whether records are being persisted right now. A fail-closed gateway refuses calls
    /// while this is an error.
    fn health(&self) -> Result<(), AuditError>;

    /// Records taken but not written yet (for the queue-depth metric; takes the queues'
    /// locks briefly: not for the hot path).
    fn queue_depth(&self) -> usize {
        0
    }

    /// The record of the call with this message id, as written (records still waiting
    /// to be written are not seen). Reads the store: call it where blocking is allowed.
    fn lookup(&self, message_id: &str) -> Result<Option<Record>, AuditError>;

    /// Usage statistics from the sink's daily roll-ups ([`stats`]). Reads the store:
    /// call it where blocking is allowed.
    fn stats(&self, _query: &stats::Query) -> Result<Vec<stats::Row>, AuditError> {
        Err(AuditError::Unavailable(
            "this audit backend keeps no statistics yet (the file backend does)".into(),
        ))
    }
}

/// The sink of a gateway that keeps no trail (`[audit] backend = "none"`, allowed only
/// with `fail_closed = false`): for capacity tests, where the cost of the trail is to
/// be measured by its absence. Records are dropped; durability is immediate.
#[derive(Debug, Default)]
pub struct Discard;

impl AuditSink for Discard {
    fn submit(&self, _record: Record) -> Result<(), AuditError> {
        Ok(())
    }

    fn submit_durable(&self, _record: &Record) -> Result<Durable, AuditError> {
        let (durable, ticket) = Durable::pending();
        ticket.done();
        Ok(durable)
    }

    fn health(&self) -> Result<(), AuditError> {
        Ok(())
    }

    fn lookup(&self, _message_id: &str) -> Result<Option<Record>, AuditError> {
        Err(AuditError::Unavailable(
            "this gateway keeps no audit trail ([audit] backend = \"none\")".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A writer thread that panics tells its backend why, once; one that ends normally
    /// tells nothing.
    #[test]
    fn a_writer_that_panics_is_marked_and_one_that_ends_is_not() {
        for panics in [true, false] {
            let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
            let seen = told.clone();
            let ended = std::thread::spawn(move || {
                let _guard = WriterGuard(move |why: &str| seen.lock().unwrap().push(why.into()));
                assert!(!panics, "a defect in the writer");
            })
            .join();
            assert_eq!(ended.is_err(), panics);
            let told = told.lock().unwrap();
            assert_eq!(told.len(), usize::from(panics), "{told:?}");
            assert!(told.iter().all(|w| w.contains("restart the gateway")));
        }
    }
}
