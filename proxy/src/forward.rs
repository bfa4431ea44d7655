//! Forwarding to providers: one pooled HTTP client per provider, and the URL mapping
//! from the gateway's path space to the version's upstream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http::uri::PathAndQuery;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::RequestBody;
use crate::config::Provider;

pub type HttpsClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// How the gateway reaches one provider.
#[derive(Debug)]
pub struct Upstream {
    pub client: HttpsClient,
    pub response_timeout: Duration,
}

impl Upstream {
    /// A client with kept-alive, pooled connections (HTTP/1.1, or HTTP/2 when a TLS
    /// provider offers it by ALPN) using the provider's TLS settings.
    pub fn new(p: &Provider) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(p.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*p.tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(p.pool_idle_timeout)
            .pool_max_idle_per_host(p.pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Self {
            client,
            response_timeout: p.response_timeout,
        }
    }
}

/// Clients for every provider, by provider id.
pub fn upstreams(providers: &[Provider]) -> HashMap<Arc<str>, Arc<Upstream>> {
    providers
        .iter()
        .map(|p| (Arc::from(p.id.as_str()), Arc::new(Upstream::new(p))))
        .collect()
}

/// Clients by provider id, and the configuration generation they were built for.
type ThreadClients = (u64, HashMap<Arc<str>, Arc<Upstream>>);

thread_local! {
    /// This worker thread's clients.
    static CLIENTS: std::cell::RefCell<ThreadClients> =
        std::cell::RefCell::new((u64::MAX, HashMap::new()));
}

/// The client towards `provider` owned by the calling worker thread.
///
/// Each worker runtime keeps its own pools: a pooled connection is always driven by the
/// thread that uses it, so a request never wakes another thread. Clients are rebuilt
/// when a reload brings a new configuration generation.
pub fn upstream_for(
    generation: u64,
    providers: &[Provider],
    provider: &str,
) -> Option<Arc<Upstream>> {
    CLIENTS.with(|cell| {
        let mut clients = cell.borrow_mut();
        if clients.0 != generation {
            *clients = (generation, upstreams(providers));
        }
        clients.1.get(provider).cloned()
    })
}

/// The gateway path split into its routing parts: `/{family}/{service}/{version}{rest}`.
#[derive(Debug, PartialEq, Eq)]
pub struct RoutePath<'a> {
    pub family: &'a str,
    pub service: &'a str,
    pub version: &'a str,
    /// Empty or starting with `/`.
    pub rest: &'a str,
}

/// Splits a request path; `None` when it has fewer than three segments.
pub fn split_path(path: &str) -> Option<RoutePath<'_>> {
    let p = path.strip_prefix('/')?;
    let mut it = p.splitn(3, '/');
    let family = it.next().filter(|s| !s.is_empty())?;
    let service = it.next().filter(|s| !s.is_empty())?;
    let tail = it.next()?;
    let (version, rest) = match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    };
    if version.is_empty() {
        return None;
    }
    Some(RoutePath {
        family,
        service,
        version,
        rest,
    })
}

/// The upstream URL for a call: the version's base URL, the rest of the path, and the
/// query string unchanged.
pub fn upstream_uri(base: &Uri, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
    let base_path = base.path().trim_end_matches('/');
    let mut pq =
        String::with_capacity(base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1);
    pq.push_str(base_path);
    pq.push_str(rest);
    if pq.is_empty() {
        pq.push('/');
    }
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq)?);
    Ok(Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn splits_gateway_paths() {
        assert_eq!(
            split_path("/person/getPerson/v3/persons/123"),
            Some(RoutePath {
                family: "person",
                service: "getPerson",
                version: "v3",
                rest: "/persons/123"
            })
        );
        assert_eq!(
            split_path("/person/getPerson/v3"),
            Some(RoutePath {
                family: "person",
                service: "getPerson",
                version: "v3",
                rest: ""
            })
        );
        assert_eq!(split_path("/person/getPerson/v3/").unwrap().rest, "/");
        assert_eq!(split_path("/person/getPerson"), None);
        assert_eq!(split_path("/person/getPerson/"), None);
        assert_eq!(split_path("//x/v1"), None);
        assert_eq!(split_path("/"), None);
    }

    #[test]
    fn maps_to_upstream_urls() {
        let base: Uri = "https://rrn.example/person/v3".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, "/persons/1", Some("a=1&b=2")).unwrap(),
            "https://rrn.example/person/v3/persons/1?a=1&b=2"
        );
        assert_eq!(
            upstream_uri(&base, "", None).unwrap(),
            "https://rrn.example/person/v3"
        );
        let root: Uri = "http://127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            upstream_uri(&root, "", None).unwrap().to_string(),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(
            upstream_uri(&root, "/data", None).unwrap().to_string(),
            "http://127.0.0.1:8080/data"
        );
        let slash: Uri = "http://h/base/".parse().unwrap();
        assert_eq!(
            upstream_uri(&slash, "/x", None).unwrap().to_string(),
            "http://h/base/x"
        );
    }
}
