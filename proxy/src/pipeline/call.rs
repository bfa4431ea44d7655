//! The per-call context: what the gateway knows of the connection, and the call's own
//! state, which owns the audit record every phase adds to.

use std::net::SocketAddr;
use std::sync::Arc;

use catalogue::Protocol;
use http::HeaderValue;
use policy::CertificateIdentity;

use super::stamp::Stamp;
use super::target::Target;
use crate::errors::ErrorForm;
use crate::headers::{FSP_END_USER, FSP_PURPOSE, X_REQUEST_ID, text};
use crate::soap::{self, SoapVersion};
use crate::transport::body::{AnswerProgress, CallShared};

/// What the gateway knows about a connection once TLS is established.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub certificate: Option<CertificateIdentity>,
    /// The certificate's SHA-256, hex, computed once per connection.
    pub certificate_sha256: Option<String>,
    /// The peer's address as text, for every record of the connection.
    pub peer_ip: String,
    /// The same, for `X-Forwarded-For`.
    pub peer_ip_value: HeaderValue,
    /// The certificate chain as presented, to be checked again (None: no certificate).
    presented: Option<Presented>,
    /// How the connection's answers from providers move (see [`AnswerProgress`]): one
    /// for an HTTP/1.1 connection (one answer at a time)...
    answers: Arc<AnswerProgress>,
    /// ...and one per stream of an HTTP/2 connection, so that a stream that stalls is
    /// seen while others move.
    streams: Option<std::sync::Mutex<Vec<std::sync::Weak<AnswerProgress>>>>,
}

/// A client certificate chain the handshake (or the handshake a resumed session came
/// from) accepted once: it is accepted again only while its leaf is within its validity
/// and under the TLS configuration it was last checked with; otherwise it is checked
/// again against the configuration in force (a reload may have revoked it or removed
/// its CA).
#[derive(Debug)]
struct Presented {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The leaf's `notAfter`, seconds since the Unix epoch.
    not_after: i64,
    checked_under: arc_swap::ArcSwap<certs::tls::ListenerTls>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, certificate: Option<CertificateIdentity>) -> Self {
        let certificate_sha256 = certificate.as_ref().map(|c| c.sha256.to_string());
        let peer_ip = peer.ip().to_string();
        Self {
            peer,
            certificate,
            certificate_sha256,
            peer_ip_value: HeaderValue::from_str(&peer_ip)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            peer_ip,
            presented: None,
            answers: Arc::default(),
            streams: None,
        }
    }

    /// The connection's certificate chain (leaf first, as the client sent it) and the
    /// TLS configuration whose handshake accepted it.
    pub fn with_chain(
        mut self,
        chain: &[rustls::pki_types::CertificateDer<'_>],
        under: Arc<certs::tls::ListenerTls>,
    ) -> Self {
        self.presented = chain.first().map(|leaf| Presented {
            // No notAfter readable: checked again at every call (and refused).
            not_after: certs::identity::not_after(leaf).unwrap_or(i64::MIN),
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            checked_under: arc_swap::ArcSwap::new(under),
        });
        self
    }

    /// An HTTP/2 connection: each stream's answer is watched on its own.
    pub fn http2(mut self) -> Self {
        self.streams = Some(std::sync::Mutex::default());
        self
    }

    /// Where a provider's answer on this connection says how it moves.
    pub fn answer_progress(&self) -> Arc<AnswerProgress> {
        let Some(streams) = &self.streams else {
            return self.answers.clone();
        };
        let progress = Arc::new(AnswerProgress::default());
        let mut streams = streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if streams.len() == streams.capacity() {
            streams.retain(|s| s.strong_count() > 0);
        }
        streams.push(Arc::downgrade(&progress));
        progress
    }

    /// The listener's watch looks at the connection's answers (every tick): whether one
    /// of them has waited for the consumer for `looks` looks in a row.
    pub fn answers_stalled(&self, looks: u64) -> bool {
        let Some(streams) = &self.streams else {
            return self.answers.look(looks);
        };
        let mut streams = streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stalled = false;
        streams.retain(|s| match s.upgrade() {
            Some(s) => {
                stalled |= s.look(looks);
                true
            }
            None => false,
        });
        stalled
    }

    /// Whether the connection's client certificate (if any) is still valid under the
    /// TLS configuration in force (`current`) now: a certificate expires, and a reload
    /// may revoke it or stop trusting its CA, while its connection stays open or its
    /// session is resumed (a resumption does not check the certificate again).
    pub fn certificate_still_valid(&self, current: &Arc<certs::tls::ListenerTls>) -> bool {
        let Some(p) = &self.presented else {
            return true;
        };
        let now = rustls::pki_types::UnixTime::now();
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        // Checked again once the certificate expires, once a CRL of the configuration
        // in force reaches its nextUpdate (a stale CRL vouches for nothing), and after
        // a reload (CAs or CRLs may have changed).
        if secs <= p.not_after
            && secs < current.crls_fresh_before
            && Arc::ptr_eq(&p.checked_under.load(), current)
        {
            return true;
        }
        let accepted = certs::tls::client_chain_accepted(&*current.clients, &p.chain, now);
        if accepted {
            p.checked_under.store(current.clone());
        }
        accepted
    }
}

/// One call, from its arrival to its record: the phases fill in the record; the respond
/// phase hands it to the answer's body, which completes it when the answer ends.
#[derive(Debug)]
pub struct Call {
    pub stamp: Stamp,
    /// The call's audit record, owned here until the answer takes it (boxed once, so
    /// that neither the call nor the answer ever copies it).
    pub record: Box<audit::Record>,
    /// How a refusal is written: problem+json, or a SOAP fault of the caller's version.
    pub form: ErrorForm,
    /// What the request and response bodies share, once the call is forwarded.
    pub shared: Option<Arc<CallShared>>,
    /// The call's W3C trace context (and its span, with `[telemetry]`).
    pub trace: crate::trace::CallTrace,
}

impl Call {
    /// Opens a stamped call's record with what the request says of itself.
    pub fn begin(
        stamp: Stamp,
        node: &str,
        conn: &ConnInfo,
        parts: &http::request::Parts,
        target: &Target<'_>,
        telemetry: Option<f64>,
    ) -> Self {
        let trace = crate::trace::CallTrace::begin(&parts.headers, stamp.message_id(), telemetry);
        let soap_version = SoapVersion::of(&parts.headers);
        let form = match (target.protocol(), soap_version) {
            (Some(Protocol::Soap), v) => ErrorForm::Soap(v.unwrap_or(SoapVersion::V11)),
            (None, Some(v)) => ErrorForm::Soap(v),
            (Some(Protocol::Rest), _) | (None, None) => ErrorForm::Problem,
        };
        let headers = &parts.headers;
        let operation = match target.protocol() {
            Some(Protocol::Soap) => {
                soap::action(headers).unwrap_or_else(|| method_and_path(&parts.method, &parts.uri))
            }
            Some(Protocol::Rest) | None => method_and_path(&parts.method, &parts.uri),
        };
        let path = target.path(parts.uri.path());
        let record = Box::new(audit::Record {
            message_id: stamp.message_id().to_owned(),
            timestamp: stamp.timestamp().to_owned(),
            source_ip: conn.peer_ip.clone(),
            service: path.as_ref().map(|p| [p.family, p.service].join("/")),
            version: path.as_ref().map(|p| p.version.to_owned()),
            operation,
            purpose: text(headers, &FSP_PURPOSE).map(str::to_owned),
            end_user: text(headers, &FSP_END_USER).map(str::to_owned),
            consumer_ref: text(headers, &X_REQUEST_ID).map(str::to_owned),
            trace_id: Some(trace.trace_id_hex()),
            decision: "allowed".into(),
            node: node.to_owned(),
            ..Default::default()
        });
        Self {
            stamp,
            record,
            form,
            shared: None,
            trace,
        }
    }
}

/// `METHOD /path`, the operation of a call without a SOAP action.
pub fn method_and_path(method: &http::Method, uri: &http::Uri) -> String {
    let (m, p) = (method.as_str(), uri.path());
    let mut op = String::with_capacity(m.len() + 1 + p.len());
    op.push_str(m);
    op.push(' ');
    op.push_str(p);
    op
}
