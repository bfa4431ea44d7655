//! Phase 7 for a metadata request: a SOAP service version's WSDL (`GET ...?wsdl`), and
//! the documents it references (`?wsdl=N`, `?xsd=N`), served by the gateway with every
//! address pointing at the gateway (see [`crate::wsdl`]).
//!
//! The WSDL is metadata of a service version: the caller went through the same phases as
//! a call (identified, an authorisation for the version, for any purpose; throttled;
//! recorded), and only a [`Cleared`] request is served. The documents are fetched from
//! the provider with the gateway's own connection and credentials (the version's pool),
//! each checked by the XML guard, and kept per version in the snapshot's
//! [`crate::wsdl::Cache`], so that a reload fetches them again. As a forwarded call is,
//! the request is watched: a suspension of its consumer or of the provider refuses it
//! (403 `FSP-AUTHZ-SUSPENDED`) until the document is served, at once even while the
//! fetch waits for the provider.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

use super::call::{Call, ConnInfo};
use super::record::Cleared;
use crate::errors::{Code, Rejection, Side, map};
use crate::headers::Outbound;
use crate::state::Local;
use crate::transport::body::{CallShared, RequestBody, Watch, XmlCheck};
use crate::transport::pool::Upstream;
use crate::wsdl::{self, DocKind, Documents, Wanted};
use crate::xml;

/// The document asked for, as the consumer receives it.
#[derive(Debug)]
pub struct Served {
    pub body: Bytes,
    /// The version's lifecycle fields, when it is deprecated.
    pub lifecycle: Option<Box<HeaderMap>>,
}

/// Serves a cleared metadata request.
pub async fn serve(
    local: &Local,
    conn: &ConnInfo,
    call: &mut Call,
    cleared: Cleared<'_>,
    wanted: Wanted,
) -> Result<Served, Rejection> {
    let snap = &*local.snap;
    let (granted, _slot, quota) = cleared.into_admitted().into_parts();
    // Served (from the cache or the provider): what it spent stays spent.
    quota.keep();
    let suspensions_seen = granted.suspensions_seen();
    let (caller, route, _grant) = granted.into_parts();
    let (service, version) = (route.service(), route.version());
    // Watched as a call is: a suspension of either party made since the decision (while
    // the request waited for its throttle, its record, another's fetch, or the provider)
    // refuses it, at once.
    let watch = Arc::new(CallShared::watched(Watch::new(
        local.gw.suspensions.clone(),
        suspensions_seen,
        caller.consumer().id.clone(),
        service.provider.clone(),
    )));
    let cut = |cut: crate::transport::body::Cut| {
        map::cut_off(
            &format!(
                "the WSDL of {} {} was not served",
                service.name, version.version
            ),
            &cut,
        )
    };
    if let Some(why) = watch.cut_off() {
        return Err(cut(why));
    }
    let key = format!("{}/{}", service.name, version.version);
    let failed = |why: String| {
        Rejection::new(
            Code::UpstreamUnavailable,
            format!(
                "the WSDL of {} {} could not be had from its provider",
                service.name, version.version
            ),
        )
        .with_internal(format!(
            "the WSDL of {} {} could not be had from provider {}: {why}",
            service.name, version.version, service.provider
        ))
        .blaming(Side::Provider)
    };
    let docs = async {
        Ok(match snap.wsdl.get(&key) {
            Some(docs) => docs,
            None => {
                // One fetch per version at a time; who waited takes its result.
                let flight = snap.wsdl.flight(&key);
                let _fetching = flight.lock().await;
                if let Some(docs) = snap.wsdl.get(&key) {
                    docs
                } else if let Some(why) = snap.wsdl.recent_failure(&key) {
                    return Err(failed(format!(
                        "{why} (less than {:?} ago)",
                        wsdl::FAILURE_KEPT
                    )));
                } else {
                    let endpoint = format!(
                        "{}/{}/{}",
                        snap.public_url.trim_end_matches('/'),
                        service.name,
                        version.version
                    );
                    let fetch = Fetch {
                        upstream: route.upstream(),
                        base: &version.upstream,
                        consumer: &caller.consumer().id,
                        peer: &conn.peer_ip_value,
                        message_id: call.stamp.message_id(),
                        limits: snap.service_options(&service.name).xml.unwrap_or_default(),
                    };
                    let timeout = route.upstream().response_timeout;
                    let fetched = match tokio::time::timeout(timeout, fetch.all(&endpoint)).await {
                        Ok(fetched) => fetched,
                        Err(_) => Err(FetchError::Provider(format!(
                            "its documents were not all had within {timeout:?}"
                        ))),
                    };
                    match fetched {
                        Ok(docs) => {
                            let docs = Arc::new(docs);
                            snap.wsdl.put(&key, docs.clone());
                            docs
                        }
                        Err(FetchError::Provider(why)) => {
                            snap.wsdl.failed(&key, why.clone());
                            return Err(failed(why));
                        }
                        Err(FetchError::Exchange(e)) => {
                            return Err(map::upstream(&service.provider, &service.name, &e));
                        }
                        Err(FetchError::Gateway(why)) => {
                            return Err(failed(why).blaming(Side::Gateway));
                        }
                    }
                }
            }
        })
    };
    // A fetch cut off here is left unfinished (its flight is released; whoever waits
    // for the same documents fetches them again).
    let docs = tokio::select! {
        biased;
        why = watch.cut() => return Err(cut(why)),
        docs = docs => docs?,
    };
    if let Some(why) = watch.cut_off() {
        return Err(cut(why));
    }
    match docs.get(wanted) {
        Some(body) => Ok(Served {
            body: body.clone(),
            lifecycle: route.into_path().1,
        }),
        None => Err(Rejection::new(
            Code::RouteUnknownService,
            format!(
                "the WSDL of {} {} references no such document: ask for ?wsdl",
                service.name, version.version
            ),
        )),
    }
}

/// Why a version's documents could not be had.
#[derive(Debug)]
enum FetchError {
    /// The exchange with the provider failed (mapped as a call's would be: the
    /// consumer's share, the gateway's cap, the provider's fault).
    Exchange(crate::transport::pool::UpstreamError),
    /// The provider answered something the gateway does not serve.
    Provider(String),
    /// The gateway could not ask.
    Gateway(String),
}

/// A fetch of a version's WSDL and what it references, on the provider's origin.
struct Fetch<'a> {
    upstream: &'a Arc<Upstream>,
    base: &'a http::Uri,
    consumer: &'a str,
    peer: &'a HeaderValue,
    message_id: &'a str,
    limits: xml::Limits,
}

impl Fetch<'_> {
    /// The WSDL (`{upstream}?wsdl`) and, transitively, every document it references on
    /// the provider's origin, each rewritten. References elsewhere are left as written.
    async fn all(&self, endpoint: &str) -> Result<Documents, FetchError> {
        let mut first = url::Url::parse(&self.base.to_string()).map_err(|e| {
            FetchError::Gateway(format!("the version's address cannot be read: {e}"))
        })?;
        first.set_query(Some("wsdl"));
        first.set_fragment(None);
        // The documents found so far, in the order they were numbered.
        let mut found: Vec<(DocKind, url::Url)> = vec![(DocKind::Wsdl, first)];
        let mut docs = Vec::new();
        let (mut i, mut total) = (0, 0);
        while i < found.len() {
            let (kind, url) = found[i].clone();
            let raw = self.get(&url).await?;
            total += raw.len();
            if total > wsdl::MAX_SET_BYTES {
                return Err(FetchError::Provider(format!(
                    "its documents together are larger than {} bytes",
                    wsdl::MAX_SET_BYTES
                )));
            }
            let mut too_many = false;
            let rewritten = wsdl::rewrite(&raw, endpoint, |kind, location| {
                let target = url.join(location).ok()?;
                if !same_origin(&target, &found[0].1) {
                    return None;
                }
                let mut target = target;
                target.set_fragment(None);
                let n = match found.iter().position(|(_, u)| *u == target) {
                    Some(n) => n,
                    None if found.len() < wsdl::MAX_DOCUMENTS => {
                        found.push((kind, target));
                        found.len() - 1
                    }
                    None => {
                        too_many = true;
                        return None;
                    }
                };
                if n == 0 {
                    return Some(format!("{endpoint}?wsdl"));
                }
                Some(format!("{endpoint}?{}={n}", found[n].0.parameter()))
            })
            .map_err(|e| FetchError::Provider(format!("{url}: {e}")))?;
            if too_many {
                return Err(FetchError::Provider(format!(
                    "it references more than {} documents",
                    wsdl::MAX_DOCUMENTS
                )));
            }
            docs.push((kind, Bytes::from(rewritten)));
            i += 1;
        }
        Ok(Documents { docs })
    }

    /// One document, whole, checked by the XML guard.
    async fn get(&self, url: &url::Url) -> Result<Bytes, FetchError> {
        let provider = FetchError::Provider;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let path: PathAndQuery = path
            .parse()
            .map_err(|e| provider(format!("{url} cannot be asked for: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/xml, application/xml, application/wsdl+xml"),
        );
        let fsp = HeaderValue::from_str(self.message_id)
            .map(|v| [(crate::headers::FSP_MESSAGE_ID, v)])
            .map_err(|_| FetchError::Gateway("the message id is not a field value".into()))?;
        let fields = Outbound::new(headers, &fsp, &[], &[], self.peer);
        let body = RequestBody::new(
            Bytes::new(),
            None,
            0,
            self.upstream.response_timeout,
            XmlCheck::Off,
            Arc::new(CallShared::new()),
        );
        let slot = self
            .upstream
            .reserve(self.consumer)
            .await
            .map_err(FetchError::Exchange)?;
        let response = self
            .upstream
            .send(self.base, path, Method::GET, fields, body, slot)
            .await
            .map_err(FetchError::Exchange)?;
        if response.status() != StatusCode::OK {
            return Err(provider(format!(
                "{url} was answered {}",
                response.status()
            )));
        }
        let encoded = response
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded {
            return Err(provider(format!("{url} was answered compressed")));
        }
        let mut body = response.into_body();
        let mut doc = BytesMut::new();
        let mut guard = xml::Guard::new(self.limits);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| provider(format!("{url}: the answer broke off: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if doc.len() + data.len() > wsdl::MAX_DOCUMENT_BYTES {
                    return Err(provider(format!(
                        "{url} is larger than {} bytes",
                        wsdl::MAX_DOCUMENT_BYTES
                    )));
                }
                guard
                    .feed(&data)
                    .map_err(|e| provider(format!("{url} was refused: {e}")))?;
                doc.extend_from_slice(&data);
            }
        }
        guard
            .finish()
            .map_err(|e| provider(format!("{url} was refused: {e}")))?;
        Ok(doc.freeze())
    }
}

fn same_origin(a: &url::Url, b: &url::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}
