//! Phase 2½, inspect: what the request says of itself and could be read differently by
//! the provider. Fields that must be given once are given once (`Host` first of all, then
//! `Content-Type`, `FSP-Purpose`, `FSP-End-User`); XML bodies go through the threat
//! protection; a SOAP request's Header is read (and the purpose, end user and message id
//! it carries taken into the record) before the authorisation is decided.

use std::time::Duration;

use bytes::Bytes;
use catalogue::Protocol;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, request};

use super::call::Call;
use super::route::Route;
use crate::errors::{Code, Rejection, map};
use crate::headers::{FSP_END_USER, FSP_PURPOSE, X_REQUEST_ID};

/// `SOAPAction`, the SOAP 1.1 action.
const SOAP_ACTION: http::HeaderName = http::HeaderName::from_static("soapaction");
use crate::soap;
use crate::state::Snapshot;
use crate::transport::body::{ConsumerFault, Unread, XmlCheck};
use crate::xml;

/// The request body's start already read (a SOAP envelope up to its Header) and the XML
/// check that goes on over the rest.
#[derive(Debug)]
pub struct Content {
    pub prefix: Bytes,
    pub xml: XmlCheck,
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host (HTTP/1.0 at most one). Two
/// readings of the target host must not reach a provider; the connection is closed after
/// the answer, since its framing can no longer be trusted.
pub fn one_host(parts: &request::Parts, fields: &FieldCounts<'_>) -> Result<(), Rejection> {
    let hosts = fields.host;
    let bad = match parts.version {
        http::Version::HTTP_11 => hosts != 1,
        v if v < http::Version::HTTP_11 => hosts > 1,
        _ => false,
    };
    if bad {
        return Err(Rejection::new(
            Code::RequestMalformed,
            format!("an HTTP/1.1 request needs exactly one Host field; this one has {hosts}"),
        )
        .with_header(header::CONNECTION, HeaderValue::from_static("close")));
    }
    Ok(())
}

/// Whether a request whose stream is still open, on a method without content, ends it
/// with no content: some HTTP/2 clients send a GET's HEADERS without END_STREAM and end
/// the stream with an empty DATA frame. Its frames are read (within `timeout`) until the
/// stream ends; one byte of data, trailers, an error or the timeout is content. An
/// HTTP/1.1 body still open has a length or chunks: content.
async fn ends_empty(parts: &request::Parts, body: &mut Unread, timeout: Duration) -> bool {
    use http_body_util::BodyExt;
    // A content-length other than 0 is refused by the stream itself when it ends empty.
    if parts.version != http::Version::HTTP_2 {
        return false;
    }
    let Some(incoming) = body.incoming() else {
        return false;
    };
    tokio::time::timeout(timeout, async {
        loop {
            match incoming.frame().await {
                None => return true,
                Some(Ok(frame)) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
                Some(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Checks the fields and the start of the body; for SOAP, reads the Header.
pub async fn inspect(
    snap: &Snapshot,
    call: &mut Call,
    parts: &request::Parts,
    fields: &FieldCounts<'_>,
    route: &Route<'_>,
    body: &mut Unread,
) -> Result<Content, Rejection> {
    let xml_declared = inspect_fields(fields)?;
    // Content on a GET, HEAD, TRACE or CONNECT has no meaning a server must honour, and
    // some do not read it (RFC 9110 §9.3.1 warns of request smuggling): forwarded, it
    // could be read as the next request on the provider's connection.
    if matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::TRACE | Method::CONNECT
    ) && body
        .incoming()
        .is_some_and(|b| !hyper::body::Body::is_end_stream(&*b))
        && !ends_empty(parts, body, snap.request_body_timeout).await
    {
        return Err(Rejection::new(
            Code::RequestMalformed,
            format!(
                "a {} request carries no content: send it without a body",
                parts.method
            ),
        ));
    }
    if route.metadata().is_some() {
        // A GET of the WSDL: no body is read or forwarded.
        return Ok(Content {
            prefix: Bytes::new(),
            xml: XmlCheck::Off,
        });
    }
    // XML threat protection: every SOAP request, bodies that say they are XML, and bodies
    // that start like XML whatever they say.
    // With the checks turned off for the service, a SOAP request's Header is still read
    // (under the default bounds) and the rest of the body is not checked.
    let checks = snap.service_options(&route.service().name).xml;
    let limits = checks.unwrap_or_default();
    let soap = route.protocol() == Protocol::Soap;
    // The guard reads the bytes as sent: a body in a content coding (gzip) would pass
    // it unread (or be refused only when it says it is XML), and a provider that
    // decodes it, then reads or sniffs XML, would read what the guard never saw.
    if fields.content_coded && (soap || checks.is_some()) {
        return Err(Rejection::new(
            Code::RequestMalformed,
            "the request body is sent in a Content-Encoding (compressed), which the gateway cannot check: send it uncompressed",
        ));
    }
    let charset = fields
        .content_type
        .and_then(|v| v.to_str().ok())
        .and_then(xml::said_charset);
    let guard = |mut guard: xml::Guard| {
        guard.charset_said(charset);
        XmlCheck::On(Box::new(guard))
    };
    let mut content = Content {
        prefix: Bytes::new(),
        xml: if soap {
            guard(xml::Guard::soap(limits, SOAP_HEADER_LIMIT))
        } else if checks.is_none() {
            XmlCheck::Off
        } else if xml_declared {
            guard(xml::Guard::new(limits))
        } else {
            XmlCheck::Sniff { limits, charset }
        },
    };
    if soap && let XmlCheck::On(guard) = &mut content.xml {
        let (read, header) = read_soap_header(body, guard, snap.request_body_timeout).await?;
        // The Content-Type and the envelope's namespace must name one SOAP version: a
        // provider may go by either.
        let declared = soap::SoapVersion::of(&parts.headers);
        let enveloped = match guard.soap_version() {
            Some(xml::SoapEnvelope::V11) => Some(soap::SoapVersion::V11),
            Some(xml::SoapEnvelope::V12) => Some(soap::SoapVersion::V12),
            None => None,
        };
        if let (Some(d), Some(e)) = (declared, enveloped)
            && d != e
        {
            let name = |v: soap::SoapVersion| match v {
                soap::SoapVersion::V11 => "SOAP 1.1 (text/xml)",
                soap::SoapVersion::V12 => "SOAP 1.2 (application/soap+xml)",
            };
            return Err(Rejection::new(
                Code::RequestMalformed,
                format!(
                    "the Content-Type says {} but the envelope is {}: send each version with its own content type",
                    name(d),
                    name(e)
                ),
            ));
        }
        content.prefix = read;
        take_soap_header(call, &parts.headers, header)?;
        if checks.is_none() {
            content.xml = XmlCheck::Off;
        }
    }
    Ok(content)
}

/// What the SOAP Header says, into the record. Given both ways, `FSP-Purpose` and
/// `FSP-End-User` must agree with it: the provider may read either.
fn take_soap_header(
    call: &mut Call,
    headers: &HeaderMap,
    header: xml::SoapHeader,
) -> Result<(), Rejection> {
    let record = &mut call.record;
    let disagreement = [
        ("Purpose", &record.purpose, &header.purpose),
        ("End-User", &record.end_user, &header.end_user),
    ]
    .into_iter()
    .find_map(|(field, http, soap)| match (http, soap) {
        (Some(h), Some(s)) if h != s => Some(format!(
            "FSP-{field} says {h:?} but the SOAP Header says {s:?}: give one, or the same in both"
        )),
        _ => None,
    });
    if let Some(why) = disagreement {
        return Err(Rejection::new(Code::RequestMalformed, why));
    }
    // WS-Addressing's SOAP binding: a SOAPAction, when given, is the Action. The record
    // names one operation; the provider may dispatch on either.
    if let (Some(http), Some(wsa)) = (soap::action(headers), &header.action)
        && http != *wsa
    {
        return Err(Rejection::new(
            Code::RequestMalformed,
            format!(
                "SOAPAction says {http:?} but the WS-Addressing Action says {wsa:?}: give the same action in both"
            ),
        ));
    }
    if record.purpose.is_none() {
        record.purpose = header.purpose;
    }
    if record.end_user.is_none() {
        record.end_user = header.end_user;
    }
    if record.consumer_ref.is_none() {
        record.consumer_ref = header.message_id;
    }
    // The operation: the SOAP action (HTTP), else WS-Addressing's Action, else the
    // Body's first child; `METHOD /path` only when the envelope names none.
    if soap::action(headers).is_none()
        && let Some(operation) = header.action.or(header.body_operation)
    {
        record.operation = operation;
    }
    Ok(())
}

/// How often the fields that must be given at most once occur, counted in one pass over
/// the request's fields (cheaper than a lookup each), and what in them could be read
/// differently by the gateway and the provider.
#[derive(Debug)]
pub struct FieldCounts<'a> {
    host: usize,
    purpose: usize,
    end_user: usize,
    request_id: usize,
    soap_action: usize,
    content_types: usize,
    content_type: Option<&'a HeaderValue>,
    soap_action_value: Option<&'a HeaderValue>,
    /// The first field the gateway reads whose value is not visible ASCII: the gateway
    /// cannot read it, and would forward it for the provider to read its own way.
    unreadable: Option<&'static str>,
    /// A field the gateway reads that `Connection` names: it would be recorded, then
    /// removed before forwarding as hop-by-hop.
    nominated: Option<&'a str>,
    /// A `Transfer-Encoding` other than `chunked` alone: the body would be forwarded
    /// still in that coding, without a word of it, for the provider to read as it is.
    coded: bool,
    /// A `Content-Encoding` other than `identity`: the XML guard would read the coded
    /// bytes, and a provider that decodes them would read something else.
    content_coded: bool,
}

/// The fields the gateway reads (checks, records, routes by): `Connection` must not name
/// them, since a proxy removes what it names.
const READ_FIELDS: [&str; 7] = [
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "x-request-id",
    "soapaction",
    "authorization",
];

impl<'a> FieldCounts<'a> {
    pub fn of(headers: &'a HeaderMap) -> Self {
        let mut c = Self {
            host: 0,
            purpose: 0,
            end_user: 0,
            request_id: 0,
            soap_action: 0,
            content_types: 0,
            content_type: None,
            soap_action_value: None,
            unreadable: None,
            nominated: None,
            coded: false,
            content_coded: false,
        };
        for (name, value) in headers {
            let read = if name == header::HOST {
                c.host += 1;
                None
            } else if name == header::CONTENT_TYPE {
                c.content_types += 1;
                c.content_type = Some(value);
                None
            } else if name == FSP_PURPOSE {
                c.purpose += 1;
                Some("FSP-Purpose")
            } else if name == FSP_END_USER {
                c.end_user += 1;
                Some("FSP-End-User")
            } else if name == X_REQUEST_ID {
                c.request_id += 1;
                Some("X-Request-ID")
            } else if name == SOAP_ACTION {
                c.soap_action += 1;
                c.soap_action_value = Some(value);
                Some("SOAPAction")
            } else if name == header::TRANSFER_ENCODING {
                c.coded |= !value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked");
                None
            } else if name == header::CONTENT_ENCODING {
                c.content_coded |= value.as_bytes().split(|&b| b == b',').any(|coding| {
                    let coding = coding.trim_ascii();
                    !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity")
                });
                None
            } else if name == header::CONNECTION {
                if c.nominated.is_none() {
                    c.nominated = value.to_str().ok().and_then(|v| {
                        v.split(',').map(str::trim).find(|t| {
                            READ_FIELDS.iter().any(|f| t.eq_ignore_ascii_case(f))
                                || t.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("fsp-"))
                        })
                    });
                }
                None
            } else {
                None
            };
            if let Some(read) = read
                && c.unreadable.is_none()
                && value.to_str().is_err()
            {
                c.unreadable = Some(read);
            }
        }
        c
    }
}

/// Checks the fields a provider could read differently from the gateway: at most one
/// `Content-Type` (plain ASCII, with a `charset`, if any, under which every ASCII byte is
/// itself, so that the XML guard sees what the provider will), at most one `FSP-Purpose`,
/// `FSP-End-User`, `X-Request-ID` and `SOAPAction`, each visible ASCII; one SOAP action
/// (`SOAPAction` and a SOAP 1.2 `action` parameter agree); no field the gateway reads named
/// by `Connection`. Returns whether the body says it is XML (`xml` anywhere in its media
/// type, `text/xml`, `application/xml`, `*+xml`).
fn inspect_fields(fields: &FieldCounts<'_>) -> Result<bool, Rejection> {
    let malformed = |why: String| Err(Rejection::new(Code::RequestMalformed, why));
    for (name, count) in [
        ("FSP-Purpose", fields.purpose),
        ("FSP-End-User", fields.end_user),
        ("X-Request-ID", fields.request_id),
        ("SOAPAction", fields.soap_action),
    ] {
        if count > 1 {
            return malformed(format!("{name} is given more than once"));
        }
    }
    if let Some(name) = fields.unreadable {
        return malformed(format!(
            "{name} holds characters other than visible ASCII (such as an accent as raw bytes): send it in ASCII"
        ));
    }
    if fields.coded {
        return malformed(
            "the Transfer-Encoding names a coding other than chunked, which the gateway does not undo: send the body chunked (or with a Content-Length), with any compression said in Content-Encoding".into(),
        );
    }
    if let Some(name) = fields.nominated {
        return malformed(format!(
            "the Connection field names {name}, which the gateway reads and forwards: only hop-by-hop fields may be named there"
        ));
    }
    let Some(value) = fields.content_type else {
        return Ok(false);
    };
    if fields.content_types > 1 {
        return malformed("Content-Type is given more than once".into());
    }
    let Ok(value) = value.to_str() else {
        return malformed("the Content-Type holds characters other than visible ASCII".into());
    };
    if xml::charset_given_twice(value) {
        return malformed("the Content-Type gives its charset more than once".into());
    }
    let mut params = value.split(';');
    let media = params.next().unwrap_or_default();
    let mut actions = params.filter_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("action")
            .then(|| v.trim().trim_matches('"'))
    });
    if let Some(action) = actions.next() {
        if actions.next().is_some() {
            return malformed("the Content-Type gives its action parameter more than once".into());
        }
        let header = fields
            .soap_action_value
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().trim_matches('"'))
            .filter(|v| !v.is_empty());
        if let Some(header) = header
            && header != action
        {
            return malformed(format!(
                "SOAPAction `{header}` and the Content-Type's action `{action}` differ: give one action"
            ));
        }
    }
    if let Some(charset) = xml::unreadable_charset(value) {
        return malformed(format!(
            "charset {charset} is not accepted: use UTF-8 (or US-ASCII, ISO-8859-1 to 15, windows-1252)"
        ));
    }
    Ok(media
        .as_bytes()
        .windows(3)
        .any(|w| w.eq_ignore_ascii_case(b"xml")))
}

/// How much of a SOAP request the gateway reads, at most, to find its Header.
const SOAP_HEADER_LIMIT: usize = 64 * 1024;

/// Reads the start of a SOAP request through the XML guard until its Header has been
/// seen and the Body's first child begun (or the body ended, or [`SOAP_HEADER_LIMIT`]
/// bytes were read); returns the bytes read (to be sent on first) and what the Header
/// holds. Each byte is scanned once, however the envelope is chunked, and the Header must
/// end within [`SOAP_HEADER_LIMIT`] bytes.
async fn read_soap_header(
    body: &mut Unread,
    guard: &mut xml::Guard,
    read_timeout: std::time::Duration,
) -> Result<(Bytes, xml::SoapHeader), Rejection> {
    use http_body_util::BodyExt;
    let Some(body) = body.incoming() else {
        return Err(Rejection::new(
            Code::RequestMalformed,
            "the SOAP envelope is missing",
        ));
    };
    let mut buf = bytes::BytesMut::new();
    loop {
        // Past the Header, the Body's first child names the operation of a call that
        // gives no action: it is waited for within the same bound (it usually came in
        // the same piece).
        if let Some(header) = guard.soap_header()
            && (header.body_operation.is_some()
                || guard.root_closed()
                || buf.len() >= SOAP_HEADER_LIMIT)
        {
            return Ok((buf.freeze(), header.clone()));
        }
        let frame = match tokio::time::timeout(read_timeout, body.frame()).await {
            Ok(frame) => frame,
            Err(_) => {
                return Err(map::consumer_fault(&ConsumerFault::Stalled(read_timeout)));
            }
        };
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if let Err(e) = guard.feed(&data) {
                        return Err(Rejection::new(Code::RequestMalformed, e.to_string()));
                    }
                    if buf.is_empty() {
                        buf = bytes::BytesMut::from(data);
                    } else {
                        buf.extend_from_slice(&data);
                    }
                }
            }
            Some(Err(e)) => return Err(map::consumer_fault(&ConsumerFault::of(&e))),
            None => {
                if let Some(header) = guard.soap_header() {
                    // The rest of the check (an envelope left open) is the body's.
                    return Ok((buf.freeze(), header.clone()));
                }
                let why = match guard.finish() {
                    Err(e) => e.to_string(),
                    Ok(()) => "the SOAP envelope is incomplete".to_owned(),
                };
                return Err(Rejection::new(Code::RequestMalformed, why));
            }
        }
    }
}
