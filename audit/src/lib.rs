//! # The audit trail
//!
//! Every call through the gateway leaves one [`Record`]: who called (consumer and
//! credential), what (service, version, operation), why (purpose, authorisation, legal
//! basis), what was decided, and how it ended. Records are handed to an [`AuditSink`];
//! the gateway never waits on disk in the request path: sinks take a record without
//! blocking and persist it in the background, reporting their health so that a
//! fail-closed gateway can refuse calls it could not record.
//!
//! The first sink is [`file::FileSink`]: one JSON object per line, one file per day.
//! Every record is sealed into its node's hash chain ([`chain`]) when it is written.

use serde::{Deserialize, Serialize};

pub mod chain;
pub mod export;
pub mod file;
mod json;

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
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
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

    /// Whether records are being persisted right now. A fail-closed gateway refuses calls
    /// while this is an error.
    fn health(&self) -> Result<(), AuditError>;

    /// The record of the call with this message id, as written (records still waiting
    /// to be written are not seen). Reads the store: call it where blocking is allowed.
    fn lookup(&self, message_id: &str) -> Result<Option<Record>, AuditError>;
}
