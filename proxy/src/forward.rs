//! Forwarding to providers: a pool of kept-alive upstream connections per provider and
//! worker thread, and the URL mapping from the gateway's path space to the version's
//! upstream.
//!
//! The pool sits directly on hyper's connection API. A worker thread owns its pools, so
//! a pooled connection is always driven by the thread that uses it and a checkout is an
//! uncontended lock and a `Vec::pop`. An HTTP/1.1 connection is leased to one call and
//! comes back to the pool when the provider's response body has been passed on whole
//! ([`Lease::release`]); a call that ends early (consumer gone, timeout) drops its lease
//! and with it the connection, which can no longer be reused safely. A provider that
//! offers HTTP/2 by ALPN gets one multiplexed connection per host and thread.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::config::Provider;

/// Why a call could not be handed to the provider, or got no answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream URL {0} has no http or https scheme and host")]
    BadUrl(Uri),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: Authority,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {authority} took longer than {timeout:?}")]
    ConnectTimeout {
        authority: Authority,
        timeout: Duration,
    },
    #[error("{host} is not a valid TLS server name")]
    ServerName { host: String },
    #[error("TLS handshake with {authority} failed: {source}")]
    Tls {
        authority: Authority,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP connection set-up with {authority} failed: {source}")]
    Handshake {
        authority: Authority,
        #[source]
        source: hyper::Error,
    },
    #[error("the exchange with the provider failed: {0}")]
    Http(#[source] hyper::Error),
}

/// How the gateway reaches one provider, from one worker thread.
#[derive(Debug)]
pub struct Upstream {
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    pub response_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    hosts: Mutex<Vec<HostPool>>,
}

/// Connections to one `scheme://host:port`.
#[derive(Debug)]
struct HostPool {
    https: bool,
    authority: Authority,
    /// `Host` for HTTP/1.1 requests to it.
    host_value: Option<HeaderValue>,
    idle: Vec<Idle>,
    h2: Option<http2::SendRequest<RequestBody>>,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

enum Checkout {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

/// An HTTP/1.1 connection lent to one call until its response has been passed on.
#[derive(Debug)]
pub struct Lease {
    upstream: Arc<Upstream>,
    /// Index of its host's pool in [`Upstream::hosts`] (pools are never removed).
    host: usize,
    sender: http1::SendRequest<RequestBody>,
}

impl Lease {
    /// The response was read to its end: the connection can serve another call.
    pub fn release(self) {
        let Lease {
            upstream,
            host,
            sender,
        } = self;
        if sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            upstream.put_back(host, sender);
            return;
        }
        // The response is complete but the connection is not free yet: typically the
        // provider answered before reading the whole request body, which is still being
        // sent. Lending it now would make the next call wait behind that upload; it
        // joins the pool once free (or is dropped if that takes longer than it may idle).
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // shutting down: the connection closes with the sender
        };
        let mut sender = sender;
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(upstream.idle_timeout, sender.ready()).await {
                upstream.put_back(host, sender);
            }
        });
    }
}

impl Upstream {
    /// A pool using the provider's TLS settings (`upstream_ca`, FSP's client
    /// certificate) and timeouts. HTTP/1.1, or HTTP/2 when a TLS provider offers it.
    pub fn new(p: &Provider) -> Self {
        let mut tls = (*p.tls).clone();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            tls: Arc::new(tls),
            connect_timeout: p.connect_timeout,
            response_timeout: p.response_timeout,
            idle_timeout: p.pool_idle_timeout,
            max_idle: p.pool_max_idle,
            hosts: Mutex::new(Vec::new()),
        }
    }

    /// Sends `req` to `path` on the version's upstream `base` (its scheme and host) and
    /// returns the provider's response, with the lease to hand back once its body has
    /// been read.
    pub async fn send(
        self: &Arc<Self>,
        base: &Uri,
        path: PathAndQuery,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), UpstreamError> {
        let https = match base.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(UpstreamError::BadUrl(base.clone())),
        };
        let Some(authority) = base.authority() else {
            return Err(UpstreamError::BadUrl(base.clone()));
        };
        // This thread's own copies of the host's name and `Host` value: the base URI is
        // shared by every thread, and so would be its reference counts.
        let (host, authority, host_value) = self.host(https, authority);
        loop {
            let (checkout, reused) = match self.checkout(host) {
                Some(c) => (c, true),
                // Boxed: connecting (TLS included) is a large future, and a rare one;
                // kept inline it would be moved with every call's future.
                None => (
                    Box::pin(self.connect(host, https, &authority)).await?,
                    false,
                ),
            };
            match checkout {
                Checkout::H2(mut sender) => {
                    *req.uri_mut() = absolute(https, &authority, &path);
                    *req.version_mut() = Version::HTTP_2;
                    req.headers_mut().remove(header::HOST);
                    return match sender.try_send_request(req).await {
                        Ok(res) => Ok((res, None)),
                        Err(mut e) => match e.take_message() {
                            // Not sent: the connection went away; take another one.
                            Some(back) if reused => {
                                req = back;
                                self.forget_h2(host);
                                continue;
                            }
                            _ => Err(UpstreamError::Http(e.into_error())),
                        },
                    };
                }
                Checkout::H1(mut sender) => {
                    if let Err(e) = sender.ready().await {
                        // A kept-alive connection the provider closed while it was idle.
                        if reused {
                            continue;
                        }
                        return Err(UpstreamError::Http(e));
                    }
                    *req.uri_mut() = Uri::from(path.clone());
                    *req.version_mut() = Version::HTTP_11;
                    if let Some(v) = &host_value {
                        req.headers_mut().insert(header::HOST, v.clone());
                    }
                    match sender.try_send_request(req).await {
                        Ok(res) => {
                            let lease = Lease {
                                upstream: self.clone(),
                                host,
                                sender,
                            };
                            return Ok((res, Some(lease)));
                        }
                        Err(mut e) => match e.take_message() {
                            // The kept-alive connection was closed by the provider before
                            // the request was written: nothing was sent, so send it on a
                            // fresh connection.
                            Some(back) if reused => req = back,
                            _ => return Err(UpstreamError::Http(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    /// The pool of `scheme://authority` (made on first use), with this thread's copies
    /// of the authority and of the `Host` value for it.
    fn host(&self, https: bool, authority: &Authority) -> (usize, Authority, Option<HeaderValue>) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let i = match hosts
            .iter()
            .position(|h| h.https == https && h.authority == *authority)
        {
            Some(i) => i,
            None => {
                let own = Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(
                    authority.as_str().as_bytes(),
                ))
                .unwrap_or_else(|_| authority.clone());
                hosts.push(HostPool {
                    https,
                    host_value: host_header(https, &own).ok(),
                    authority: own,
                    idle: Vec::new(),
                    h2: None,
                });
                hosts.len() - 1
            }
        };
        let pool = &hosts[i];
        (i, pool.authority.clone(), pool.host_value.clone())
    }

    fn checkout(&self, host: usize) -> Option<Checkout> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let pool = hosts.get_mut(host)?;
        if let Some(h2) = &pool.h2 {
            if !h2.is_closed() {
                return Some(Checkout::H2(h2.clone()));
            }
            pool.h2 = None;
        }
        let now = Instant::now();
        while let Some(idle) = pool.idle.pop() {
            if idle.sender.is_ready() && now.duration_since(idle.since) < self.idle_timeout {
                return Some(Checkout::H1(idle.sender));
            }
        }
        None
    }

    fn put_back(&self, host: usize, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = hosts.get_mut(host)
            && pool.idle.len() < self.max_idle
        {
            pool.idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn forget_h2(&self, host: usize) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = hosts.get_mut(host) {
            pool.h2 = None;
        }
    }

    /// Drops idle connections older than the idle timeout (and closed ones).
    fn sweep(&self) {
        let now = Instant::now();
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for pool in hosts.iter_mut() {
            pool.idle.retain(|i| {
                !i.sender.is_closed() && now.duration_since(i.since) < self.idle_timeout
            });
            if pool.h2.as_ref().is_some_and(|h| h.is_closed()) {
                pool.h2 = None;
            }
        }
    }

    /// A new connection (TCP, TLS when https, then the HTTP handshake), its driving
    /// task spawned on this thread's runtime.
    async fn connect(
        &self,
        pool_index: usize,
        https: bool,
        authority: &Authority,
    ) -> Result<Checkout, UpstreamError> {
        let work = async {
            let tcp = connect_tcp(https, authority).await?;
            if !https {
                return handshake_h1(TokioIo::new(tcp), authority).await;
            }
            let host = authority.host();
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let name = match bare.parse::<IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(bare.to_owned()).map_err(|_| {
                    UpstreamError::ServerName {
                        host: host.to_owned(),
                    }
                })?,
            };
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|source| UpstreamError::Tls {
                    authority: authority.clone(),
                    source,
                })?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = TokioIo::new(tls);
            if h2 {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(io)
                    .await
                    .map_err(|source| UpstreamError::Handshake {
                        authority: authority.clone(),
                        source,
                    })?;
                spawn_connection(conn);
                let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(pool) = hosts.get_mut(pool_index) {
                    pool.h2 = Some(sender.clone());
                }
                Ok(Checkout::H2(sender))
            } else {
                handshake_h1(io, authority).await
            }
        };
        tokio::time::timeout(self.connect_timeout, work)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                authority: authority.clone(),
                timeout: self.connect_timeout,
            })?
    }
}

/// The HTTP/1.1 handshake on a connected stream, its connection task spawned.
async fn handshake_h1<T>(io: T, authority: &Authority) -> Result<Checkout, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|source| UpstreamError::Handshake {
            authority: authority.clone(),
            source,
        })?;
    spawn_connection(conn);
    Ok(Checkout::H1(sender))
}

/// Drives one upstream connection until it closes.
fn spawn_connection<F>(conn: F)
where
    F: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
}

/// TCP to the first address of the host that answers, with Nagle off and keep-alive on.
async fn connect_tcp(https: bool, authority: &Authority) -> Result<TcpStream, UpstreamError> {
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = authority.host();
    let addrs = tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(|source| UpstreamError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
                let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
                return Ok(tcp);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(UpstreamError::Connect {
        authority: authority.clone(),
        source: last.unwrap_or_else(|| std::io::Error::other("the name has no address")),
    })
}

/// `Host` as HTTP/1.1 wants it: the port only when it is not the scheme's default.
fn host_header(https: bool, authority: &Authority) -> Result<HeaderValue, http::Error> {
    let default = if https { 443 } else { 80 };
    let value = match authority.port_u16() {
        Some(p) if p != default => HeaderValue::from_str(authority.as_str())?,
        _ => HeaderValue::from_str(authority.host())?,
    };
    Ok(value)
}

fn absolute(https: bool, authority: &Authority, path: &PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if https { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path.clone());
    Uri::from_parts(parts).unwrap_or_default()
}

/// Pools for every provider, by provider id, each swept of expired idle connections by
/// a task on the calling thread's runtime (which ends when the pools are replaced).
///
/// Each worker thread makes its own, with its [`crate::state::Local`] view: a pooled
/// connection is always driven by the thread that uses it, so a request never wakes
/// another thread. A reload makes new pools; the old connections close as their last
/// calls end.
pub fn upstreams(providers: &[Provider]) -> HashMap<Arc<str>, Arc<Upstream>> {
    let pools: HashMap<Arc<str>, Arc<Upstream>> = providers
        .iter()
        .map(|p| (Arc::from(p.id.as_str()), Arc::new(Upstream::new(p))))
        .collect();
    if tokio::runtime::Handle::try_current().is_ok() {
        for upstream in pools.values() {
            let weak: Weak<Upstream> = Arc::downgrade(upstream);
            let every = (upstream.idle_timeout / 2)
                .clamp(Duration::from_millis(100), Duration::from_secs(30));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match weak.upgrade() {
                        Some(u) => u.sweep(),
                        None => break,
                    }
                }
            });
        }
    }
    pools
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

/// The path and query a call is forwarded to: the version's base path, the rest of the
/// gateway path, and the query string unchanged.
pub fn upstream_path(
    base: &Uri,
    rest: &str,
    query: Option<&str>,
) -> Result<PathAndQuery, http::Error> {
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
    Ok(PathAndQuery::try_from(pq)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The whole upstream URL of a call, as the provider sees it.
    fn upstream_uri(base: &Uri, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut parts = base.clone().into_parts();
        parts.path_and_query = Some(upstream_path(base, rest, query)?);
        Ok(Uri::from_parts(parts)?)
    }

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
