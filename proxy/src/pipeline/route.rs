//! Phase 3, route: the live version the call names, its provider's pool, and the exact
//! path the provider will read (normalised here, never leaving the version, see
//! [`crate::path`]). An authorisation is for a service version, so a call must name one
//! that exists. The answer is a [`Route`], which only this phase makes.

use std::borrow::Cow;
use std::sync::Arc;

use catalogue::{Lifecycle, Protocol};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, request};

use super::call::Call;
use super::target::{self, RoutePath, Target};
use crate::errors::{Code, Rejection, map};
use crate::headers::{DEPRECATION, SUNSET};
use crate::soap::{self, SoapVersion};
use crate::state::{Local, Snapshot};
use crate::transport::pool::Upstream;
use crate::wsdl::Wanted;

/// A live service version, the pool of its provider, and where the call goes.
#[derive(Debug)]
pub struct Route<'s> {
    resolved: catalogue::Route<'s>,
    upstream: &'s Arc<Upstream>,
    path: PathAndQuery,
    /// `Deprecation`, `Sunset` and the successor `Link`, for a deprecated version (boxed:
    /// rare, and the route is moved from phase to phase).
    lifecycle: Option<Box<HeaderMap>>,
    /// A request for the version's WSDL or a document it references, served by the
    /// gateway (see `pipeline::metadata`), rather than a call.
    metadata: Option<Wanted>,
}

impl<'s> Route<'s> {
    pub fn service(&self) -> &'s catalogue::Service {
        self.resolved.service
    }

    pub fn version(&self) -> &'s catalogue::Version {
        self.resolved.version
    }

    pub fn protocol(&self) -> Protocol {
        self.resolved.protocol()
    }

    pub fn upstream(&self) -> &'s Arc<Upstream> {
        self.upstream
    }

    pub fn metadata(&self) -> Option<Wanted> {
        self.metadata
    }

    /// The path and query on the provider's side.
    pub fn into_path(self) -> (PathAndQuery, Option<Box<HeaderMap>>) {
        (self.path, self.lifecycle)
    }
}

/// Resolves the call's target to a live version and checks that the request can reach
/// it as it is (method and content type for SOAP, declared size, a forwardable path).
pub fn route<'s>(
    local: &'s Local,
    call: &mut Call,
    parts: &request::Parts,
    target: Target<'s>,
) -> Result<Route<'s>, Rejection> {
    let snap = &*local.snap;
    let path = target.path(parts.uri.path());
    let resolved = match target.into_resolved() {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            return Err(map::route(e, |successor| {
                let p = path.as_ref()?;
                HeaderValue::from_str(&successor_link(snap, p.family, p.service, successor)).ok()
            }));
        }
        None => {
            return Err(Rejection::new(
                Code::RouteUnknownService,
                format!(
                    "the path {} does not name a service: call /{{family}}/{{service}}/{{version}}/...",
                    parts.uri.path()
                ),
            ));
        }
    };
    let protocol = resolved.protocol();
    // TRACE would have the provider echo the request the gateway sent it (the consumer,
    // purpose and legal basis fields included); CONNECT would ask it to open a tunnel
    // past every check. Neither is a call to a service.
    if matches!(parts.method, Method::TRACE | Method::CONNECT) {
        return Err(Rejection::new(
            Code::RequestMalformed,
            format!(
                "{} is not a method the platform forwards: call a service with GET, POST, PUT, PATCH, DELETE or OPTIONS",
                parts.method
            ),
        ));
    }
    // `GET .../{version}?wsdl` (or `?xsd=N`, `?wsdl=N`) of a SOAP service: its metadata.
    let metadata = (protocol == Protocol::Soap
        && matches!(parts.method, Method::GET | Method::HEAD)
        && path.as_ref().is_some_and(|p| matches!(p.rest, "" | "/")))
    .then(|| Wanted::of(parts.uri.query()))
    .flatten();
    if protocol == Protocol::Soap && metadata.is_none() {
        if parts.method != Method::POST {
            return Err(Rejection::new(
                Code::RequestMalformed,
                format!(
                    "{} is a SOAP service: POST a SOAP envelope (or GET its WSDL with ?wsdl)",
                    resolved.service.name
                ),
            )
            .with_header(header::ALLOW, HeaderValue::from_static("POST")));
        }
        if SoapVersion::of(&parts.headers).is_none() {
            return Err(Rejection::new(
                Code::RequestMalformed,
                "a SOAP call needs Content-Type text/xml (SOAP 1.1) or application/soap+xml (SOAP 1.2)",
            ));
        }
    }
    let declared_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|n| n > snap.max_request_bytes) {
        return Err(Rejection::new(
            Code::RequestTooLarge,
            format!(
                "the request body may not exceed {} bytes",
                snap.max_request_bytes
            ),
        ));
    }
    let Some(upstream) = local.upstreams.get(&*resolved.service.provider) else {
        return Err(Rejection::new(
            Code::UpstreamUnavailable,
            format!("provider {} is not configured", resolved.service.provider),
        )
        .blaming(crate::errors::Side::Gateway));
    };
    let path = forwarded_path(call, parts, protocol, path.as_ref(), &resolved)?;
    if metadata.is_some() {
        call.record.operation = format!(
            "{} {}?{}",
            parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or_default()
        );
    }
    let mut lifecycle: Option<Box<HeaderMap>> = None;
    if let Lifecycle::Deprecated { since, sunset } = resolved.lifecycle {
        deprecation_headers(
            lifecycle.insert(Box::default()),
            snap,
            resolved.service,
            since,
            sunset,
            resolved.successor.map(|s| &*s.version),
        );
    }
    Ok(Route {
        resolved,
        upstream,
        path,
        lifecycle,
        metadata,
    })
}

/// The path and query the provider will read: the version's base path, the rest of the
/// gateway path normalised, the query unchanged. The record names what is reached.
fn forwarded_path(
    call: &mut Call,
    parts: &request::Parts,
    protocol: Protocol,
    path: Option<&RoutePath<'_>>,
    resolved: &catalogue::Route<'_>,
) -> Result<PathAndQuery, Rejection> {
    let rest = path.map_or("", |p| p.rest);
    let rest = crate::path::normalise_rest(rest).map_err(|e| {
        Rejection::new(
            Code::RequestMalformed,
            format!("the path {} cannot be forwarded: {e}", parts.uri.path()),
        )
    })?;
    if let (Cow::Owned(normalised), Some(p)) = (&rest, path)
        && (protocol == Protocol::Rest || soap::action(&parts.headers).is_none())
    {
        call.record.operation = format!(
            "{} /{}/{}/{}{normalised}",
            parts.method, p.family, p.service, p.version
        );
    }
    target::upstream_path(&resolved.version.upstream, &rest, parts.uri.query()).map_err(|e| {
        Rejection::new(
            Code::RequestMalformed,
            format!("the path cannot be forwarded: {e}"),
        )
    })
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
        && let Ok(v) = HeaderValue::from_str(&map::http_date(s))
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
