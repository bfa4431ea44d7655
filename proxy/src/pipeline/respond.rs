//! Phase 8, respond: the one place a call leaves the gateway. A provider's answer is
//! streamed back stamped with the FSP fields (and, for SOAP, the FSP header elements);
//! a refusal from any phase is rendered by [`crate::errors`] and logged. Either way the
//! call's record goes with the answer's body, which completes it when the answer ends
//! (see [`crate::response`]).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::Response;
use http::header;
use http_body_util::BodyExt;

use super::call::Call;
use super::forward::Answer;
use crate::errors::{self, Code, Rejection, Side};
use crate::headers::strip_hop_by_hop;
use crate::response::{Checked, Finisher, ResponseBody};
use crate::soap::HeaderStamp;
use crate::state::Local;
use crate::transport::body::Cut;
use crate::xml;

/// The provider's answer, on its way back to the consumer.
///
/// An answer that the XML threat protection applies to (every answer of a SOAP service,
/// XML answers of the others, and their answers without a `Content-Type` that start like
/// XML) is held to the service's XML limits, as requests are: its first
/// [`HELD_BEFORE_HEAD`] bytes are read and checked before the head is sent, so a refused
/// start (a DTD, entities, a document that is not XML) becomes a clean 502 fault; past
/// them, a refused byte is never sent and the answer is cut off, so the consumer never
/// receives something it could take for a complete answer. An HTTP/1.0 consumer cannot
/// tell a cut-off answer from a complete one: its checked answers are read whole (up to
/// [`HELD_FOR_HTTP10`]) before anything is sent.
pub async fn deliver(
    local: &Arc<Local>,
    call: Call,
    answer: Answer,
    http10: bool,
) -> Response<ResponseBody> {
    let (mut parts, mut body) = answer.response.into_parts();
    // HTTP defines 100 to 599: a status beyond is not passed on for the consumer to guess.
    if parts.status.as_u16() > 599 {
        let status = parts.status.as_u16();
        return refuse(
            local,
            call,
            Rejection::new(
                Code::UpstreamUnavailable,
                "the provider's answer could not be passed on",
            )
            .with_internal(format!(
                "the provider answered with status {status}, which HTTP does not define"
            ))
            .blaming(Side::Provider),
        );
    }
    // The platform's fields (`FSP-*`) and the version's lifecycle (`Deprecation`,
    // `Sunset`: the catalogue's) are the gateway's to give, not the provider's.
    crate::headers::strip_platform_fields(&mut parts.headers);
    let kind = AnswerType::of(&parts.headers);
    let identity = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    // With its XML checks on, every answer of a SOAP service (whatever type it says: the
    // guard holds it to XML), so that a provider cannot keep the stamp out by
    // mislabelling its answer; with them off, its XML answers, where the stamp can go.
    let checked = answer.xml.is_some();
    let stampable = if checked {
        !matches!(kind, AnswerType::Multipart | AnswerType::Unreadable(_))
    } else {
        matches!(kind, AnswerType::Xml)
    };
    let mut stamp = (answer.soap && identity && stampable)
        .then(|| HeaderStamp::new(call.stamp.message_id(), call.stamp.timestamp()));
    // What the checks do with it: guard it, look at its first byte, or let it be.
    let (mut guard, mut sniff) = (None, None);
    if let Some(limits) = answer.xml {
        let unreadable = |why: String| {
            Rejection::new(
                Code::UpstreamUnavailable,
                "the provider's answer could not be checked and was not passed on",
            )
            .with_internal(why)
            .blaming(Side::Provider)
        };
        match (&kind, answer.soap) {
            (AnswerType::Unreadable(why), _) => {
                return refuse(
                    local,
                    call,
                    unreadable(format!("the provider's answer {why}")),
                );
            }
            (AnswerType::Multipart, true) => {
                let why = "the provider's answer is multipart (MTOM or attachments), which a SOAP service does not pass on";
                return refuse(local, call, unreadable(why.to_owned()));
            }
            (_, true) | (AnswerType::Xml, false) => {
                let mut g = xml::Guard::new(limits);
                let content_type = parts.headers.get(header::CONTENT_TYPE);
                g.charset_said(
                    content_type
                        .and_then(|v| v.to_str().ok())
                        .and_then(xml::said_charset),
                );
                guard = Some(g);
            }
            (AnswerType::Missing, false) => sniff = Some(limits),
            (AnswerType::Multipart | AnswerType::Other, false) => {}
        }
        if (guard.is_some() || sniff.is_some()) && !identity {
            // The guard cannot read a compressed answer, and what it cannot read it does
            // not pass (the gateway asks SOAP providers for identity encoding).
            let encoding = parts.headers[header::CONTENT_ENCODING]
                .to_str()
                .unwrap_or("?")
                .to_owned();
            return refuse(
                local,
                call,
                unreadable(format!(
                    "the provider's XML answer is compressed ({encoding}), which the XML threat protection cannot check"
                )),
            );
        }
    }
    if guard.is_none() && sniff.is_none() && stamp.is_none() {
        return respond(local, call, parts, answer.fsp, answer.lifecycle, |f| {
            ResponseBody::upstream(body, f)
        });
    }
    // Read the start (for an HTTP/1.0 consumer, all of a checked answer) before the head
    // goes out.
    let limit = if http10 && (guard.is_some() || sniff.is_some()) {
        HELD_FOR_HTTP10
    } else {
        HELD_BEFORE_HEAD
    };
    let (mut trailers, mut ended) = (None, false);
    let mut held = BytesMut::new();
    let deadline = tokio::time::Instant::now() + answer.response_timeout;
    let shared = call.shared.clone();
    while held.len() < limit && !ended {
        // A suspension while the provider is silent cuts the call at once.
        let cut = async {
            match &shared {
                Some(s) => s.cut().await,
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout_at(deadline, body.frame()) => read,
            why = cut => return refuse(local, call, cut_before_sent(&why)),
        };
        let frame = match read {
            Ok(frame) => frame,
            Err(_) => {
                let rejection = Rejection::new(
                    Code::UpstreamTimeout,
                    format!(
                        "the provider's answer stalled within its first {} bytes",
                        held.len()
                    ),
                );
                return refuse(local, call, rejection);
            }
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    held.extend_from_slice(&data);
                    if let Some(limits) = sniff {
                        // Without a Content-Type, an answer that starts like XML is XML
                        // (as consumers' parsers would take it).
                        match held.iter().find(|b| !b.is_ascii_whitespace()) {
                            None => continue,
                            Some(b'<' | 0xEF) => {
                                sniff = None;
                                let mut g = xml::Guard::new(limits);
                                if let Err(e) = g.feed(&held) {
                                    return refuse(local, call, answer_refused(&e));
                                }
                                guard = Some(g);
                            }
                            Some(_) => {
                                sniff = None;
                                if stamp.is_none() {
                                    break;
                                }
                            }
                        }
                    } else if let Some(guard) = &mut guard
                        && let Err(e) = guard.feed(&data)
                    {
                        return refuse(local, call, answer_refused(&e));
                    }
                }
                Err(frame) => {
                    trailers = Some(frame);
                    ended = true;
                }
            },
            Some(Err(e)) => {
                let rejection =
                    Rejection::new(Code::UpstreamUnavailable, "the provider's answer broke off")
                        .with_internal(format!("the provider's answer broke off: {e}"))
                        .blaming(Side::Provider);
                return refuse(local, call, rejection);
            }
            None => ended = true,
        }
    }
    // A suspension made while the answer's first bytes were held: nothing is sent.
    if let Some(cut) = call.shared.as_ref().and_then(|s| s.cut_off()) {
        return refuse(local, call, cut_before_sent(&cut));
    }
    if http10 && guard.is_some() && !ended {
        let rejection = Rejection::new(
            Code::UpstreamUnavailable,
            "the provider's answer is too large to be checked for an HTTP/1.0 client: use HTTP/1.1 or HTTP/2",
        )
        .with_internal(format!(
            "the provider's XML answer is larger than {HELD_FOR_HTTP10} bytes, the most the gateway checks before answering an HTTP/1.0 client"
        ))
        .blaming(Side::Gateway);
        return refuse(local, call, rejection);
    }
    // An answer neither checked nor stamped (untyped, and not XML), or without a body
    // (HEAD, 204, 304: its length, if any, is the resource's), goes on as it came.
    let as_it_came = (guard.is_none() && stamp.is_none()) || (ended && held.is_empty());
    if ended && let Some(g) = &mut guard {
        // An empty answer (202, 204, HEAD) has no document to check.
        if !held.is_empty()
            && let Err(e) = g.finish()
        {
            return refuse(local, call, answer_refused(&e));
        }
        guard = None;
    }
    let held_was_empty = held.is_empty();
    let mut out = match &mut stamp {
        Some(stamp) => stamp.push(held.freeze()),
        None => Some(held.freeze()),
    };
    if ended && let Some(stamp) = &mut stamp {
        out = match (out, stamp.finish()) {
            (Some(a), Some(b)) => Some([a, b].concat().into()),
            (a, b) => a.or(b),
        };
    }
    // A SOAP answer with a body carries the FSP fields in its SOAP Header (contract,
    // section 3): one the stamp could not go into (not a SOAP Envelope of the SOAP
    // namespaces, text or CDATA before its Header, no Header or Body in the first
    // bytes) is not passed on as if stamped, nor with a Header the provider wrote alone.
    if checked
        && !held_was_empty
        && let Some(stamp) = &stamp
        && stamp.stamped() == Some(false)
    {
        let rejection = Rejection::new(
            Code::UpstreamUnavailable,
            "the provider's answer is not a SOAP envelope the gateway can pass on",
        )
        .with_internal(format!(
            "the provider's SOAP answer has no SOAP Header or Body the FSP fields can go into within its first {} bytes (not a SOAP 1.1 or 1.2 Envelope, or text before its Header)",
            crate::soap::STAMP_SCAN_LIMIT
        ))
        .blaming(Side::Provider);
        return refuse(local, call, rejection);
    }
    if !as_it_came {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    if ended && trailers.is_none() && out.as_ref().is_none_or(Bytes::is_empty) {
        // No body (HEAD, 204, 304): the provider's ended body goes on, so that its head,
        // and a Content-Length that is the resource's, go out as they came.
        return respond(local, call, parts, answer.fsp, answer.lifecycle, |f| {
            ResponseBody::upstream(body, f)
        });
    }
    if ended && trailers.is_none() {
        // All of it is here, checked and stamped: it goes out with its length, and the
        // provider's connection goes back to its pool now.
        drop(body);
        let bytes = out.unwrap_or_default();
        return respond(local, call, parts, answer.fsp, answer.lifecycle, |f| {
            ResponseBody::full(bytes, Some(f))
        });
    }
    // Without a length, a consumer knows the answer is complete only from its end (the
    // last chunk, or the end of the stream), which a refused byte never lets it see.
    let checked = Box::new(Checked {
        inner: body,
        pending: out.filter(|b| !b.is_empty()),
        stamp,
        guard,
        trailers,
        ended,
    });
    respond(local, call, parts, answer.fsp, answer.lifecycle, |f| {
        ResponseBody::checked(checked, f)
    })
}

/// How much of a checked answer is read before its head is sent: a SOAP answer of usual
/// size is read whole, and the stamp's spot is found within it.
pub const HELD_BEFORE_HEAD: usize = crate::soap::STAMP_SCAN_LIMIT;

/// How much of a checked answer to an HTTP/1.0 consumer is read, at most, before its
/// head is sent: all of it must fit.
pub const HELD_FOR_HTTP10: usize = 1024 * 1024;

/// What an answer's `Content-Type` says, for the XML checks.
#[derive(Debug, PartialEq, Eq)]
enum AnswerType {
    /// `text/xml`, `application/xml` or `*/*+xml`, in a charset the guard reads as the
    /// consumer will.
    Xml,
    /// `multipart/*`.
    Multipart,
    /// Any other type.
    Other,
    /// None given.
    Missing,
    /// Given twice, not ASCII, or XML in a charset the guard cannot read: a consumer
    /// could take it for XML the guard did not see.
    Unreadable(String),
}

impl AnswerType {
    fn of(headers: &http::HeaderMap) -> Self {
        let mut values = headers.get_all(header::CONTENT_TYPE).iter();
        let Some(value) = values.next() else {
            return Self::Missing;
        };
        if values.next().is_some() {
            return Self::Unreadable("has more than one Content-Type".into());
        }
        let Ok(value) = value.to_str() else {
            return Self::Unreadable(
                "has a Content-Type with characters other than visible ASCII".into(),
            );
        };
        let media = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if media.starts_with("multipart/") {
            return Self::Multipart;
        }
        let xml = media == "text/xml" || media == "application/xml" || media.ends_with("+xml");
        if !xml {
            return Self::Other;
        }
        match xml::unreadable_charset(value) {
            Some(charset) => Self::Unreadable(format!(
                "is XML in charset {charset}, which the XML threat protection cannot read"
            )),
            None => Self::Xml,
        }
    }
}

/// A call whose consumer or provider was suspended while the start of its answer was
/// read: nothing of the answer is sent.
fn cut_before_sent(cut: &Cut) -> Rejection {
    errors::map::cut_off("the call was cut off before its answer was sent", cut)
}

fn answer_refused(e: &xml::XmlError) -> Rejection {
    Rejection::new(
        Code::UpstreamUnavailable,
        "the provider's answer was refused by the XML threat protection",
    )
    .with_internal(format!("the provider's answer was refused: {e}"))
    .blaming(Side::Provider)
}

/// The provider's answer head with the gateway's fields, and its body.
fn respond(
    local: &Arc<Local>,
    call: Call,
    mut parts: http::response::Parts,
    fsp: Option<[(http::HeaderName, http::HeaderValue); 2]>,
    lifecycle: Option<Box<http::HeaderMap>>,
    body: impl FnOnce(Finisher) -> ResponseBody,
) -> Response<ResponseBody> {
    let Call {
        stamp,
        mut record,
        shared,
        trace,
        ..
    } = call;
    strip_hop_by_hop(&mut parts.headers);
    if let Some([(id_name, id), (ts_name, ts)]) = fsp {
        parts.headers.insert(id_name, id);
        parts.headers.insert(ts_name, ts);
    }
    if let Some(lifecycle) = lifecycle {
        for (name, value) in lifecycle.iter() {
            parts.headers.append(name.clone(), value.clone());
        }
    }
    record.status = parts.status.as_u16();
    let finisher = Finisher::new(record, stamp.started, shared, trace, local.clone());
    Response::from_parts(parts, body(finisher))
}

/// A WSDL or schema document the gateway serves (see [`super::metadata`]).
pub fn metadata(
    local: &Arc<Local>,
    call: Call,
    served: super::metadata::Served,
) -> Response<ResponseBody> {
    let mut parts = Response::new(()).into_parts().0;
    if let Ok(v) = http::HeaderValue::from_str(&crate::wsdl::content_type(&served.body)) {
        parts.headers.insert(header::CONTENT_TYPE, v);
    }
    // A consumer's toolkit may keep it; a reload may change it.
    parts.headers.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("private, max-age=300"),
    );
    let fsp = call.stamp.fields();
    respond(local, call, parts, fsp, served.lifecycle, |f| {
        ResponseBody::full(served.body, Some(f))
    })
}

/// A refusal, rendered, logged and recorded.
pub fn refuse(local: &Arc<Local>, call: Call, r: Rejection) -> Response<ResponseBody> {
    let Call {
        stamp,
        mut record,
        form,
        shared,
        trace,
    } = call;
    let mut response = errors::render(&r, form, stamp.message_id(), stamp.timestamp());
    // A SOAP service may have its faults sent under 500 (WS-I Basic Profile), for the
    // toolkits that read no fault under another status (the record says what was sent;
    // its decision names the code).
    if matches!(form, errors::ErrorForm::Soap(_))
        && let Some(service) = &record.service
        && local.snap.service_options(service).faults_as_500
    {
        *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    }
    record.decision = r.code.as_str().to_owned();
    record.status = response.status().as_u16();
    record.fault = Some(r.side.as_str().to_owned());
    record.detail = Some(r.recorded_detail().to_owned());
    match r.side {
        Side::Consumer => {
            tracing::debug!(message_id = %stamp.message_id(), code = r.code.as_str(), fault = "consumer", detail = %r.recorded_detail(), "call refused")
        }
        side @ (Side::Provider | Side::Gateway) => {
            tracing::warn!(message_id = %stamp.message_id(), code = r.code.as_str(), fault = side.as_str(), detail = %r.recorded_detail(), "call failed")
        }
    }
    let (parts, bytes): (_, Bytes) = response.into_parts();
    let finisher = Finisher::new(record, stamp.started, shared, trace, local.clone());
    Response::from_parts(parts, ResponseBody::full(bytes, Some(finisher)))
}
