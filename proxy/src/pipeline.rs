//! # The request pipeline
//!
//! Every call goes through these phases, in this order (TLS was accepted and the client
//! certificate verified by [`crate::server`] before the first request):
//!
//! 1. **stamp**: give the call its FSP message id (UUID v7) and timestamp;
//! 2. **identify**: map the verified client certificate to a consumer;
//! 3. **route**: find the live version of the service and its upstream (an authorisation
//!    is for a service version, so the call must name one that exists);
//! 4. **authorise**: suspensions, source address, and the authorisation that covers this
//!    consumer, service version and purpose today (`policy::decide`); the purpose comes
//!    from `FSP-Purpose` or, for SOAP, from `<fsp:Purpose>` in the SOAP Header;
//! 5. **throttle**: the provider's aggregate limit and the consumer's own limit, checked
//!    together (a call refused by either consumes neither);
//! 6. **audit gate**: a fail-closed gateway forwards nothing it could not record;
//! 7. **forward**: stream the request to the provider over a pooled connection, with
//!    the consumer, purpose and legal basis in `FSP-*` headers;
//! 8. **respond**: stream the answer back, stamped with the FSP headers;
//! 9. **audit outcome**: when the response body ends, the record is completed and
//!    queued (see [`crate::body::Finisher`]).
//!
//! A refusal at any phase becomes a [`Rejection`], rendered by [`crate::errors`] alone.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use catalogue::{Lifecycle, Protocol, RouteError};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use policy::{CertificateIdentity, Consumer};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::body::{
    CallShared, ConsumerFault, Finisher, RequestBody, ResponseBody, Unread, XmlCheck,
};
use crate::errors::{self, Code, ErrorForm, Rejection, Side};
use crate::forward::{self, RoutePath};
use crate::h1;
use crate::headers::*;
use crate::soap::{self, HeaderStamp, SoapVersion};
use crate::state::{Gateway, Local, Snapshot};
use crate::xml;

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
        }
    }
}

/// The moment a call was received, in the forms the gateway writes it.
struct Stamp {
    /// The FSP message id, hyphenated lower-case UUID text.
    id: [u8; uuid::fmt::Hyphenated::LENGTH],
    /// RFC 3339 with milliseconds (always 24 bytes for the current time).
    ts: [u8; 24],
    now: OffsetDateTime,
    started: Instant,
}

impl Stamp {
    fn new() -> Self {
        thread_local! {
            /// Message ids increase within a millisecond per worker thread, without a
            /// lock shared by the threads (what `Uuid::now_v7` takes).
            static UUID_CONTEXT: uuid::timestamp::context::ContextV7 =
                const { uuid::timestamp::context::ContextV7::new() };
        }
        let now = OffsetDateTime::now_utc();
        // The id carries the same instant as the timestamp.
        let ts = uuid::Timestamp::from_unix(
            uuid::timestamp::context::ThreadLocalContext::new(&UUID_CONTEXT),
            u64::try_from(now.unix_timestamp()).unwrap_or_default(),
            now.nanosecond(),
        );
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid::Uuid::new_v7(ts).hyphenated().encode_lower(&mut id);
        Self {
            id,
            ts: rfc3339_millis_bytes(now).unwrap_or(*b"0000-00-00T00:00:00.000Z"),
            now,
            started: Instant::now(),
        }
    }

    fn message_id(&self) -> &str {
        std::str::from_utf8(&self.id).unwrap_or_default()
    }

    fn timestamp(&self) -> &str {
        std::str::from_utf8(&self.ts).unwrap_or_default()
    }
}

/// RFC 3339 in UTC with milliseconds: `2026-11-24T10:15:30.123Z`.
///
/// Written digit by digit: it runs for every call, and a format description is
/// interpreted each time.
pub fn rfc3339_millis(t: OffsetDateTime) -> String {
    match rfc3339_millis_bytes(t) {
        Some(b) => std::str::from_utf8(&b)
            .map(str::to_owned)
            .unwrap_or_default(),
        None => t
            .to_offset(time::UtcOffset::UTC)
            .format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .unwrap_or_default(),
    }
}

/// [`rfc3339_millis`] for the years 0 to 9999, without allocating.
fn rfc3339_millis_bytes(t: OffsetDateTime) -> Option<[u8; 24]> {
    let t = t.to_offset(time::UtcOffset::UTC);
    let (year, month, day) = t.to_calendar_date();
    let year = u16::try_from(year).ok().filter(|y| *y <= 9999)?;
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u16| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u16::from(u8::from(month)));
    put(8, 2, u16::from(day));
    put(11, 2, u16::from(t.hour()));
    put(14, 2, u16::from(t.minute()));
    put(17, 2, u16::from(t.second()));
    put(20, 3, t.millisecond());
    Some(b)
}

/// An HTTP-date (RFC 9110 IMF-fixdate) for midnight UTC of a day.
fn http_date(d: time::Date) -> String {
    d.format(format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] 00:00:00 GMT"
    ))
    .unwrap_or_default()
}

/// Serves one request. Never fails: every refusal is a response.
pub async fn handle(
    local: Arc<Local>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    // 1. stamp
    let stamp = Stamp::new();
    let gw = &*local.gw;
    let snap = &*local.snap;
    let (parts, body) = req.into_parts();
    // Drained if the call is refused before its body is read (see `body::drain_later`).
    let mut body = Unread::new(body);
    let route_path = forward::split_path(parts.uri.path());
    let resolved = route_path.as_ref().map(|p| {
        snap.catalogue
            .resolve(p.family, p.service, p.version, stamp.now.date())
    });
    let protocol = match &resolved {
        Some(Ok(r)) => Some(r.protocol()),
        Some(Err(e)) => e.protocol(),
        None => None,
    };
    let soap_version = SoapVersion::of(&parts.headers);
    let form = match (protocol, soap_version) {
        (Some(Protocol::Soap), v) => ErrorForm::Soap(v.unwrap_or(SoapVersion::V11)),
        (None, Some(v)) => ErrorForm::Soap(v),
        _ => ErrorForm::Problem,
    };
    let mut record = initial_record(
        gw,
        &conn,
        &stamp,
        &parts.method,
        &parts.uri,
        &parts.headers,
        route_path.as_ref(),
        protocol,
    );

    // RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host (HTTP/1.0 at most one).
    // Two readings of the target host must not reach a provider; the connection is
    // closed after the answer, since its framing can no longer be trusted.
    let fields = FieldCounts::of(&parts.headers);
    if parts.version <= http::Version::HTTP_11 {
        let hosts = fields.host;
        let bad = match parts.version {
            http::Version::HTTP_11 => hosts != 1,
            _ => hosts > 1,
        };
        if bad {
            let r = Rejection::new(
                Code::RequestMalformed,
                format!("an HTTP/1.1 request needs exactly one Host field; this one has {hosts}"),
            )
            .with_header(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(reject(&local, record, &stamp, form, r));
        }
    }

    // 2. identify
    let (consumer, credential) = match identify(gw, snap, &conn, &parts.headers).await {
        Ok(found) => found,
        Err((r, credential)) => {
            if let Some(c) = credential {
                record.credential = Some(c.kind().into());
                record.credential_id = Some(c.id());
            }
            return Ok(reject(&local, record, &stamp, form, r));
        }
    };
    record.consumer = Some(consumer.id.to_string());
    record.credential = Some(credential.kind().into());
    record.credential_id = Some(match &credential {
        policy::Credential::Certificate { .. } => {
            conn.certificate_sha256.clone().unwrap_or_default()
        }
        policy::Credential::OAuth { client_id } => client_id.clone(),
    });

    // 3. route
    let route = match resolved {
        Some(Ok(route)) => route,
        Some(Err(e)) => {
            let r = route_rejection(snap, route_path.as_ref(), e);
            return Ok(reject(&local, record, &stamp, form, r));
        }
        None => {
            let r = Rejection::new(
                Code::RouteUnknownService,
                format!(
                    "the path {} does not name a service: call /{{family}}/{{service}}/{{version}}/...",
                    parts.uri.path()
                ),
            );
            return Ok(reject(&local, record, &stamp, form, r));
        }
    };
    let protocol = route.protocol();
    if protocol == Protocol::Soap {
        if parts.method != Method::POST {
            let r = Rejection::new(
                Code::RequestMalformed,
                format!(
                    "{} is a SOAP service: POST a SOAP envelope",
                    route.service.name
                ),
            )
            .with_header(header::ALLOW, HeaderValue::from_static("POST"));
            return Ok(reject(&local, record, &stamp, form, r));
        }
        if soap_version.is_none() {
            let r = Rejection::new(
                Code::RequestMalformed,
                "a SOAP call needs Content-Type text/xml (SOAP 1.1) or application/soap+xml (SOAP 1.2)",
            );
            return Ok(reject(&local, record, &stamp, form, r));
        }
    }
    let declared_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|n| n > snap.max_request_bytes) {
        let r = Rejection::new(
            Code::RequestTooLarge,
            format!(
                "the request body may not exceed {} bytes",
                snap.max_request_bytes
            ),
        );
        return Ok(reject(&local, record, &stamp, form, r));
    }
    let Some(upstream) = local.upstreams.get(&*route.service.provider) else {
        let r = Rejection::new(
            Code::UpstreamUnavailable,
            format!("provider {} is not configured", route.service.provider),
        );
        return Ok(reject(&local, record, &stamp, form, r));
    };
    let rest = route_path.as_ref().map_or("", |p| p.rest);
    // What the provider will read is what the gateway decided on: the rest of the path,
    // normalised, never leaving the version (see `crate::path`).
    let rest = match crate::path::normalise_rest(rest) {
        Ok(rest) => rest,
        Err(e) => {
            let r = Rejection::new(
                Code::RequestMalformed,
                format!("the path {} cannot be forwarded: {e}", parts.uri.path()),
            );
            return Ok(reject(&local, record, &stamp, form, r));
        }
    };
    if let (std::borrow::Cow::Owned(normalised), Some(p)) = (&rest, route_path.as_ref())
        && (protocol == Protocol::Rest || soap::action(&parts.headers).is_none())
    {
        // The record names what was actually reached.
        record.operation = format!(
            "{} /{}/{}/{}{normalised}",
            parts.method, p.family, p.service, p.version
        );
    }
    let path = match forward::upstream_path(&route.version.upstream, &rest, parts.uri.query()) {
        Ok(u) => u,
        Err(e) => {
            let r = Rejection::new(
                Code::RequestMalformed,
                format!("the path cannot be forwarded: {e}"),
            );
            return Ok(reject(&local, record, &stamp, form, r));
        }
    };
    // Fields a provider could read differently from the gateway when given twice or in
    // an unexpected form.
    let xml_declared = match inspect_fields(&fields) {
        Ok(xml) => xml,
        Err(r) => return Ok(reject(&local, record, &stamp, form, r)),
    };
    // XML threat protection: every SOAP request, bodies that say they are XML, and bodies
    // that start like XML whatever they say.
    let limits = snap.xml_limits(&route.service.name);
    let mut xml_check = if protocol == Protocol::Soap {
        XmlCheck::On(Box::new(xml::Guard::soap(limits, SOAP_HEADER_LIMIT)))
    } else if xml_declared {
        XmlCheck::On(Box::new(xml::Guard::new(limits)))
    } else {
        XmlCheck::Sniff(limits)
    };

    // 4. authorise
    let mut prefix = Bytes::new();
    // The purpose: `FSP-Purpose` (already in the record), or for SOAP `<fsp:Purpose>`.
    if protocol == Protocol::Soap
        && let XmlCheck::On(guard) = &mut xml_check
    {
        match read_soap_header(&mut body, guard, snap.request_body_timeout).await {
            Ok((read, header)) => {
                prefix = read;
                // Given both ways, they must agree: the provider may read either.
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
                    let r = Rejection::new(Code::RequestMalformed, why);
                    return Ok(reject(&local, record, &stamp, form, r));
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
                if soap::action(&parts.headers).is_none()
                    && let Some(action) = header.action
                {
                    record.operation = action;
                }
            }
            Err(r) => return Ok(reject(&local, record, &stamp, form, r)),
        }
    }
    let ask = policy::Ask {
        service: &route.service.name,
        version: &route.version.version,
        provider: &route.service.provider,
        purpose: record.purpose.as_deref(),
        source_ip: conn.peer.ip(),
        today: stamp.now.date(),
    };
    // A guard, not a counted reference: it is read here and let go before any await.
    let decided = policy::decide(
        consumer,
        &ask,
        &snap.authorisations,
        &**gw.suspensions.current(),
    );
    let authorisation = match decided {
        Ok(a) => a,
        Err(denial) => {
            return Ok(reject(
                &local,
                record,
                &stamp,
                form,
                denial_rejection(denial),
            ));
        }
    };
    record.authorisation = Some(authorisation.id.clone());
    // (Reusing the buffer of the purpose the consumer gave, usually the same text.)
    match &mut record.purpose {
        Some(p) => p.clone_from(&authorisation.purpose),
        None => record.purpose = Some(authorisation.purpose.clone()),
    }
    let grant = local.grants.get(&authorisation.id);
    record.legal_basis = Some(match grant {
        Some(g) => g.legal_basis_text.clone(),
        None => authorisation.legal_basis.to_string(),
    });

    // 5. throttle
    if let Some(p) = snap
        .providers
        .iter()
        .find(|p| *p.id == *route.service.provider)
    {
        let limits = throttle::Limits {
            provider: p.limit.map(|r| r.limit()),
            consumer: p
                .consumer_limits
                .get(&*consumer.id)
                .or(p.consumer_limit.as_ref())
                .map(|r| r.limit()),
        };
        match throttle_call(gw, &p.id, &consumer.id, &limits).await {
            Ok(()) => {}
            Err(r) => return Ok(reject(&local, record, &stamp, form, r)),
        }
    }

    let mut lifecycle_headers = HeaderMap::new();
    if let Lifecycle::Deprecated { since, sunset } = route.lifecycle {
        deprecation_headers(
            &mut lifecycle_headers,
            snap,
            route.service,
            since,
            sunset,
            route.successor.map(|s| &*s.version),
        );
    }
    let service_name = &route.service.name;
    let provider = &route.service.provider;

    // 6. audit gate
    if snap.fail_closed
        && let Err(e) = gw.audit.health()
    {
        let r = Rejection::new(
            Code::AuditUnavailable,
            format!("the call cannot be recorded, so it is not forwarded: {e}"),
        );
        return Ok(reject(&local, record, &stamp, form, r));
    }

    // 7. forward
    let shared = Arc::new(CallShared::new());
    // Made once, sent twice (to the provider and back to the consumer).
    let fsp = HeaderValue::from_str(stamp.message_id())
        .ok()
        .zip(HeaderValue::from_str(stamp.timestamp()).ok())
        .map(|(id, ts)| [(FSP_MESSAGE_ID, id), (FSP_TIMESTAMP, ts)]);
    // The grant's values are this thread's own, made when the configuration was loaded.
    let fields = Outbound::new(
        parts.headers,
        fsp.as_ref().map_or(&[][..], |f| &f[..]),
        grant.map_or(&[][..], |g| &g.headers[..]),
        &conn.peer_ip_value,
    );
    let upstream_body = RequestBody::new(
        prefix,
        body.take(),
        snap.max_request_bytes,
        snap.request_body_timeout,
        xml_check,
        shared.clone(),
    );
    let sent = answer_within(
        upstream.response_timeout,
        &shared,
        upstream.send(
            &route.version.upstream,
            path,
            parts.method,
            fields,
            upstream_body,
            &consumer.id,
        ),
    )
    .await;
    let response = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let r = match shared.consumer_fault.get() {
                Some(fault) => consumer_fault(fault),
                None => upstream_failure(provider, service_name, &e),
            };
            return Ok(reject_with(&local, record, &stamp, form, r, Some(shared)));
        }
        Err(_) => {
            let r = Rejection::new(
                Code::UpstreamTimeout,
                format!(
                    "provider {provider} did not answer {service_name} within {:?}",
                    upstream.response_timeout
                ),
            );
            return Ok(reject_with(&local, record, &stamp, form, r, Some(shared)));
        }
    };

    // 8. respond
    let (mut rparts, rbody) = response.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    if let Some([(_, id), (_, ts)]) = fsp {
        rparts.headers.insert(FSP_MESSAGE_ID, id);
        rparts.headers.insert(FSP_TIMESTAMP, ts);
    }
    for (name, value) in lifecycle_headers.iter() {
        rparts.headers.append(name.clone(), value.clone());
    }
    record.status = rparts.status.as_u16();
    let finisher = Finisher::new(record, stamp.started, Some(shared), local.clone());
    let stampable = protocol == Protocol::Soap
        && rparts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_none_or(|v| v == "identity")
        && rparts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("xml"));
    let body = if stampable {
        rparts.headers.remove(header::CONTENT_LENGTH);
        ResponseBody::stamped(
            rbody,
            HeaderStamp::new(stamp.message_id(), stamp.timestamp()),
            finisher,
        )
    } else {
        ResponseBody::upstream(rbody, finisher)
    };
    Ok(Response::from_parts(rparts, body))
}

#[allow(clippy::too_many_arguments)]
fn initial_record(
    gw: &Gateway,
    conn: &ConnInfo,
    stamp: &Stamp,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    route_path: Option<&RoutePath<'_>>,
    protocol: Option<Protocol>,
) -> audit::Record {
    let operation = match protocol {
        Some(Protocol::Soap) => {
            soap::action(headers).unwrap_or_else(|| method_and_path(method, uri))
        }
        _ => method_and_path(method, uri),
    };
    audit::Record {
        message_id: stamp.message_id().to_owned(),
        timestamp: stamp.timestamp().to_owned(),
        source_ip: conn.peer_ip.clone(),
        service: route_path.map(|p| [p.family, p.service].join("/")),
        version: route_path.map(|p| p.version.to_owned()),
        operation,
        purpose: text(headers, &FSP_PURPOSE).map(str::to_owned),
        end_user: text(headers, &FSP_END_USER).map(str::to_owned),
        consumer_ref: text(headers, &X_REQUEST_ID).map(str::to_owned),
        trace_id: text(headers, &TRACEPARENT)
            .and_then(|t| t.split('-').nth(1))
            .filter(|t| t.len() == 32)
            .map(str::to_owned),
        decision: "allowed".into(),
        node: gw.node.clone(),
        ..Default::default()
    }
}

/// `METHOD /path`, the operation of a call without a SOAP action.
fn method_and_path(method: &Method, uri: &http::Uri) -> String {
    let (m, p) = (method.as_str(), uri.path());
    let mut op = String::with_capacity(m.len() + 1 + p.len());
    op.push_str(m);
    op.push(' ');
    op.push_str(p);
    op
}

/// How often the fields that must be given at most once occur, counted in one pass over
/// the request's fields (cheaper than a lookup each).
struct FieldCounts<'a> {
    host: usize,
    purpose: usize,
    end_user: usize,
    content_types: usize,
    content_type: Option<&'a HeaderValue>,
}

impl<'a> FieldCounts<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut c = Self {
            host: 0,
            purpose: 0,
            end_user: 0,
            content_types: 0,
            content_type: None,
        };
        for (name, value) in headers {
            if name == header::HOST {
                c.host += 1;
            } else if name == header::CONTENT_TYPE {
                c.content_types += 1;
                c.content_type = Some(value);
            } else if name == FSP_PURPOSE {
                c.purpose += 1;
            } else if name == FSP_END_USER {
                c.end_user += 1;
            }
        }
        c
    }
}

/// Checks the fields a provider could read differently from the gateway: at most one
/// `Content-Type` (plain ASCII, with a `charset`, if any, under which every ASCII byte is
/// itself, so that the XML guard sees what the provider will), at most one `FSP-Purpose`
/// and one `FSP-End-User`. Returns whether the body says it is XML (`xml` anywhere in
/// its media type, `text/xml`, `application/xml`, `*+xml`).
fn inspect_fields(fields: &FieldCounts<'_>) -> Result<bool, Rejection> {
    let malformed = |why: String| Err(Rejection::new(Code::RequestMalformed, why));
    for (name, count) in [
        (&FSP_PURPOSE, fields.purpose),
        (&FSP_END_USER, fields.end_user),
    ] {
        if count > 1 {
            return malformed(format!("{name} is given more than once"));
        }
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
    let mut params = value.split(';');
    let media = params.next().unwrap_or_default();
    for param in params {
        if let Some((name, charset)) = param.split_once('=')
            && name.trim().eq_ignore_ascii_case("charset")
        {
            let charset = charset.trim().trim_matches('"');
            if xml::check_encoding(charset.as_bytes()).is_err() {
                return malformed(format!(
                    "charset {charset} is not accepted: use UTF-8 (or US-ASCII, ISO-8859-1 to 15, windows-1252)"
                ));
            }
        }
    }
    Ok(media
        .as_bytes()
        .windows(3)
        .any(|w| w.eq_ignore_ascii_case(b"xml")))
}

/// Awaits the provider's answer. The provider's time (`timeout`) counts from when the
/// request was sent whole: while the consumer is still uploading, its own read timeout
/// guards the call, and a slow upload is never blamed on the provider.
async fn answer_within<T>(
    timeout: std::time::Duration,
    shared: &CallShared,
    exchange: impl std::future::Future<Output = T>,
) -> Result<T, ()> {
    let mut exchange = std::pin::pin!(exchange);
    let sleep = tokio::time::sleep(timeout);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            done = &mut exchange => return Ok(done),
            _ = &mut sleep => {
                let now = tokio::time::Instant::now();
                let deadline = match shared.upload_done_at() {
                    Some(at) => tokio::time::Instant::from_std(at) + timeout,
                    None => now + timeout,
                };
                if deadline <= now {
                    return Err(());
                }
                sleep.as_mut().reset(deadline);
            }
        }
    }
}

/// The refusal for a request body that failed on the consumer's side.
fn consumer_fault(fault: &ConsumerFault) -> Rejection {
    match fault {
        ConsumerFault::TooLarge(limit) => Rejection::new(
            Code::RequestTooLarge,
            format!("the request body may not exceed {limit} bytes"),
        ),
        ConsumerFault::Stalled(t) => Rejection::new(
            Code::RequestTimeout,
            format!("the request body stopped arriving: nothing was received for {t:?}"),
        ),
        ConsumerFault::Incomplete(why) => Rejection::new(
            Code::RequestIncomplete,
            "the request body did not arrive whole (the connection was closed, or fewer bytes were sent than announced)",
        )
        .with_internal(format!("request body incomplete: {why}")),
        ConsumerFault::Malformed(why) => Rejection::new(
            Code::RequestMalformed,
            "the request body is not validly framed (invalid chunked encoding)",
        )
        .with_internal(format!("request body framing: {why}")),
        ConsumerFault::Xml(why) => Rejection::new(Code::RequestMalformed, why.clone()),
    }
}

/// The refusal for a provider that could not be reached or answered wrongly: the
/// consumer learns which provider and service, the log and the audit record learn why.
fn upstream_failure(provider: &str, service: &str, e: &forward::UpstreamError) -> Rejection {
    use forward::UpstreamError as E;
    let internal = error_chain(e);
    let retry = || HeaderValue::from_static("1");
    // What the consumer may know: which provider failed and how, in the gateway's own
    // words; never the provider's address or an operating system's error.
    let (code, detail, side) = match e {
        E::Busy { waited } => {
            return Rejection::new(
                Code::UpstreamBusy,
                format!(
                    "provider {provider} is at the gateway's connection limit for it; nothing was sent (waited {waited:?})"
                ),
            )
            .with_header(header::RETRY_AFTER, retry())
            .with_internal(internal);
        }
        E::ConsumerShare { limit } => {
            return Rejection::new(
                Code::Throttled,
                format!(
                    "this consumer already has {limit} calls in flight to provider {provider}, its share of the provider's capacity; retry when one ends"
                ),
            )
            .with_header(header::RETRY_AFTER, retry());
        }
        E::BadUrl(_) | E::ServerName { .. } => (
            Code::UpstreamUnavailable,
            format!("provider {provider} is not correctly configured on this platform"),
            Side::Gateway,
        ),
        E::Resolve { .. }
        | E::Connect { .. }
        | E::ConnectTimeout { .. }
        | E::Tls { .. }
        | E::Handshake { .. } => (
            Code::UpstreamUnavailable,
            format!("provider {provider} could not be reached for {service}"),
            Side::Provider,
        ),
        E::Exchange(h1::ExchangeError::Protocol(_)) => (
            Code::UpstreamUnavailable,
            format!("provider {provider} answered {service} wrongly: {internal}"),
            Side::Provider,
        ),
        E::Exchange(h1::ExchangeError::Closed) => (
            Code::UpstreamUnavailable,
            format!("provider {provider} closed the connection without answering {service}"),
            Side::Provider,
        ),
        // The body did not match its own declared length (otherwise caught as the
        // consumer's fault where it was read).
        E::Exchange(h1::ExchangeError::RequestBody(_)) => (
            Code::RequestIncomplete,
            "the request body does not match its declared length".to_owned(),
            Side::Consumer,
        ),
        E::Exchange(_) | E::Http(_) => (
            Code::UpstreamUnavailable,
            format!("the exchange with provider {provider} for {service} failed"),
            Side::Provider,
        ),
    };
    tracing::warn!(provider = %provider, service = %service, error = %internal, "upstream call failed");
    Rejection::new(code, detail)
        .blaming(side)
        .with_internal(internal)
}

/// Who is calling: a bearer token (when OAuth is configured) names the consumer by its
/// client id; otherwise the verified client certificate does. On refusal, the credential
/// that was presented (if any) is returned for the audit record.
async fn identify<'s>(
    gw: &Gateway,
    snap: &'s Snapshot,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> Result<(&'s Consumer, policy::Credential), (Rejection, Option<policy::Credential>)> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    if let (Some(token), Some(verifier)) = (bearer, &gw.oauth) {
        let sha = conn.certificate.as_ref().map(|c| &c.sha256.0);
        // Boxed: verification may fetch keys, a large future most calls do not need.
        return match Box::pin(verifier.verify(token, sha)).await {
            Ok(t) => {
                let credential = policy::Credential::OAuth {
                    client_id: t.client_id.clone(),
                };
                match snap.consumers.identify_client_id(&t.client_id) {
                    Ok(c) => Ok((c, credential)),
                    Err(e) => Err((
                        Rejection::new(Code::AuthnUnknownIdentity, e.to_string()),
                        Some(credential),
                    )),
                }
            }
            Err(e) => {
                let code = if e.is_binding() {
                    Code::AuthzTokenBinding
                } else {
                    Code::AuthnInvalidToken
                };
                let r = Rejection::new(code, e.to_string());
                let r = if code == Code::AuthnInvalidToken {
                    r.with_header(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    )
                } else {
                    r
                };
                Err((r, None))
            }
        };
    }
    match &conn.certificate {
        Some(cert) => {
            let credential = policy::Credential::Certificate {
                sha256: cert.sha256,
            };
            match snap.consumers.identify_certificate(cert) {
                Ok(c) => Ok((c, credential)),
                Err(e) => Err((
                    Rejection::new(Code::AuthnUnknownIdentity, e.to_string()),
                    Some(credential),
                )),
            }
        }
        None => Err((
            Rejection::new(
                Code::AuthnMissing,
                if gw.oauth.is_some() {
                    "no credential: present a client certificate issued by a CA this platform trusts, or an OAuth2 access token (Authorization: Bearer)"
                } else {
                    "no credential: present a client certificate issued by a CA this platform trusts"
                },
            ),
            None,
        )),
    }
}

/// How much of a SOAP request the gateway reads, at most, to find its Header.
const SOAP_HEADER_LIMIT: usize = 64 * 1024;

/// Reads the start of a SOAP request through the XML guard until its Header has been
/// seen (or its Body begun); returns the bytes read (to be sent on first) and what the
/// Header holds. Each byte is scanned once, however the envelope is chunked, and the
/// Header must end within [`SOAP_HEADER_LIMIT`] bytes.
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
        if let Some(header) = guard.soap_header() {
            return Ok((buf.freeze(), header.clone()));
        }
        let frame = match tokio::time::timeout(read_timeout, body.frame()).await {
            Ok(frame) => frame,
            Err(_) => {
                return Err(consumer_fault(&ConsumerFault::Stalled(read_timeout)));
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
            Some(Err(e)) => return Err(consumer_fault(&ConsumerFault::of(&e))),
            None => {
                if guard.soap_header().is_some() {
                    continue;
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

/// Admits or refuses a call under the provider's and the consumer's limits, through the
/// shared backend when there is one, following `on_backend_error` when it fails.
async fn throttle_call(
    gw: &Gateway,
    provider: &str,
    consumer: &str,
    limits: &throttle::Limits,
) -> Result<(), Rejection> {
    let now = u64::try_from(gw.clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let local =
        |limits: &throttle::Limits| gw.throttle.load().check(provider, consumer, now, limits);
    let decision = match &gw.shared_throttle {
        None => local(limits),
        Some(shared) => match Box::pin(shared_check(shared, now, provider, consumer, limits)).await
        {
            Ok(d) => d,
            Err(e) => {
                use crate::config::OnBackendError;
                let mode = match shared.on_error {
                    OnBackendError::Local => "local",
                    OnBackendError::Deny => "deny",
                    OnBackendError::Allow => "allow",
                };
                metrics::counter!("fsp_throttle_backend_errors_total", "mode" => mode).increment(1);
                // One log line per 10 s at most: a Redis outage must not flood the logs.
                let now_ms = now / 1_000_000;
                let last = shared
                    .last_logged
                    .load(std::sync::atomic::Ordering::Relaxed);
                if now_ms.saturating_sub(last) >= 10_000
                    && shared
                        .last_logged
                        .compare_exchange(
                            last,
                            now_ms.max(1),
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    tracing::error!(error = %e, on_backend_error = mode, "throttling backend failed");
                }
                match shared.on_error {
                    OnBackendError::Allow => Ok(()),
                    OnBackendError::Deny => {
                        return Err(Rejection::new(
                            Code::Throttled,
                            "the throttling backend is unavailable and this platform refuses calls it cannot count (on_backend_error = deny)",
                        )
                        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")));
                    }
                    OnBackendError::Local => {
                        // Each replica takes its share, so together they stay within the limit.
                        let share = |l: throttle::Limit| throttle::Limit {
                            count: (l.count / u64::from(shared.replicas)).max(1),
                            per: l.per,
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
        metrics::counter!("fsp_throttled_total", "scope" => t.scope.as_str()).increment(1);
        throttled(&t, limits)
    })
}

/// Asks Redis, unless it failed less than a second ago.
async fn shared_check(
    shared: &crate::state::SharedThrottle,
    now: u64,
    provider: &str,
    consumer: &str,
    limits: &throttle::Limits,
) -> Result<Result<(), throttle::Throttled>, throttle::redis::BackendError> {
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

/// 429 with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` fields.
fn throttled(t: &throttle::Throttled, limits: &throttle::Limits) -> Rejection {
    let wait = t.retry_after.as_secs() + u64::from(t.retry_after.subsec_nanos() > 0);
    let wait = wait.max(1);
    let policies: Vec<String> = [
        limits.provider.map(|l| l.policy("provider")),
        limits.consumer.map(|l| l.policy("consumer")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let scope = t.scope.as_str();
    let mut r = Rejection::new(
        Code::Throttled,
        format!(
            "the {scope} limit of {} calls per {:?} (burst {}) is reached; retry in {wait} s",
            t.limit.count, t.limit.per, t.limit.burst
        ),
    );
    for (name, value) in [
        (header::RETRY_AFTER, wait.to_string()),
        (
            http::HeaderName::from_static("ratelimit-policy"),
            policies.join(", "),
        ),
        (
            http::HeaderName::from_static("ratelimit"),
            format!("\"{scope}\";r=0;t={wait}"),
        ),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            r = r.with_header(name, v);
        }
    }
    r
}

fn denial_rejection(d: policy::Denial) -> Rejection {
    use policy::Denial;
    let code = match &d {
        Denial::ConsumerSuspended { .. } | Denial::ProviderSuspended { .. } => Code::AuthzSuspended,
        Denial::SourceIp { .. } => Code::AuthzSourceIp,
        Denial::NotYetValid { .. } => Code::AuthzNotYetValid,
        Denial::Expired { .. } => Code::AuthzExpired,
        Denial::PurposeRequired { .. } => Code::PurposeRequired,
        _ => Code::AuthzNoAuthorisation,
    };
    Rejection::new(code, d.to_string())
}

fn route_rejection(snap: &Snapshot, path: Option<&RoutePath<'_>>, e: RouteError) -> Rejection {
    let detail = e.to_string();
    match e {
        RouteError::UnknownService { .. } => Rejection::new(Code::RouteUnknownService, detail),
        RouteError::UnknownVersion { .. } | RouteError::NotYetReleased { .. } => {
            Rejection::new(Code::RouteUnknownVersion, detail)
        }
        RouteError::Retired {
            sunset, successor, ..
        } => {
            let mut r = Rejection::new(Code::RouteVersionRetired, detail);
            if let Ok(v) = HeaderValue::from_str(&http_date(sunset)) {
                r = r.with_header(SUNSET, v);
            }
            if let (Some(s), Some(p)) = (successor, path)
                && let Ok(v) = HeaderValue::from_str(&successor_link(snap, p.family, p.service, &s))
            {
                r = r.with_header(header::LINK, v);
            }
            r
        }
        _ => Rejection::new(Code::RouteUnknownService, detail),
    }
}

fn successor_link(snap: &Snapshot, family: &str, service: &str, version: &str) -> String {
    format!(
        "<{}/{family}/{service}/{version}>; rel=\"successor-version\"",
        snap.public_url
    )
}

/// `Deprecation` (RFC 9745), `Sunset` (RFC 8594) and the successor `Link`.
fn deprecation_headers(
    headers: &mut HeaderMap,
    snap: &Snapshot,
    service: &catalogue::Service,
    since: time::Date,
    sunset: Option<time::Date>,
    successor: Option<&str>,
) {
    let ts = since.midnight().assume_utc().unix_timestamp();
    if let Ok(v) = HeaderValue::from_str(&format!("@{ts}")) {
        headers.insert(DEPRECATION, v);
    }
    if let Some(s) = sunset
        && let Ok(v) = HeaderValue::from_str(&http_date(s))
    {
        headers.insert(SUNSET, v);
    }
    if let Some(succ) = successor
        && let Ok(v) =
            HeaderValue::from_str(&successor_link(snap, &service.family, &service.id, succ))
    {
        headers.append(header::LINK, v);
    }
}

/// An error and its causes, each said once: many errors already end with their cause's
/// text, which is not repeated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

fn reject(
    local: &Arc<Local>,
    record: audit::Record,
    stamp: &Stamp,
    form: ErrorForm,
    r: Rejection,
) -> Response<ResponseBody> {
    reject_with(local, record, stamp, form, r, None)
}

fn reject_with(
    local: &Arc<Local>,
    mut record: audit::Record,
    stamp: &Stamp,
    form: ErrorForm,
    r: Rejection,
    shared: Option<Arc<CallShared>>,
) -> Response<ResponseBody> {
    let response = errors::render(&r, form, stamp.message_id(), stamp.timestamp());
    record.decision = r.code.as_str().to_owned();
    record.status = r.code.status().as_u16();
    record.fault = Some(r.side.as_str().to_owned());
    record.detail = Some(r.recorded_detail().to_owned());
    match r.side {
        Side::Consumer => {
            tracing::debug!(message_id = %stamp.message_id(), code = r.code.as_str(), fault = "consumer", detail = %r.recorded_detail(), "call refused")
        }
        side => {
            tracing::warn!(message_id = %stamp.message_id(), code = r.code.as_str(), fault = side.as_str(), detail = %r.recorded_detail(), "call failed")
        }
    }
    let (parts, bytes): (_, Bytes) = response.into_parts();
    let finisher = Finisher::new(record, stamp.started, shared, local.clone());
    Response::from_parts(parts, ResponseBody::full(bytes, Some(finisher)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_say_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer failed: {0}")]
        struct Outer(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("outer failed")]
        struct Bare(#[source] std::io::Error);
        let io = || std::io::Error::other("broken pipe");
        assert_eq!(error_chain(&Outer(io())), "outer failed: broken pipe");
        assert_eq!(error_chain(&Bare(io())), "outer failed: broken pipe");
    }

    #[test]
    fn dates_in_the_wire_formats() {
        let d = time::macros::date!(2027 - 09 - 01);
        assert_eq!(http_date(d), "Wed, 01 Sep 2027 00:00:00 GMT");
        let t = time::macros::datetime!(2026-11-24 10:15:30.123456 UTC);
        assert_eq!(rfc3339_millis(t), "2026-11-24T10:15:30.123Z");
        let t = time::macros::datetime!(0999-01-02 03:04:05.006 UTC);
        assert_eq!(rfc3339_millis(t), "0999-01-02T03:04:05.006Z");
        let t = time::macros::datetime!(2026-11-24 23:59:59.999 -01:00);
        assert_eq!(rfc3339_millis(t), "2026-11-25T00:59:59.999Z");
        let t = time::macros::datetime!(2026-02-28 00:00:00.0 UTC);
        assert_eq!(rfc3339_millis(t), "2026-02-28T00:00:00.000Z");
    }
}
