//! Pools of kept-alive connections to one provider, per worker thread, and the sending
//! of one request over them.
//!
//! A worker thread owns its pools, so a pooled connection is always used by the thread
//! that made it and a checkout is an uncontended lock and a `Vec::pop`. An HTTP/1.1
//! connection is spoken by the call's own task ([`super::h1`]): it is leased to one call
//! and comes back to the pool when the provider's response body has been read whole
//! ([`Lease::release`]); a call that ends early (consumer gone, timeout) drops its lease
//! and with it the connection, which can no longer be reused safely. A provider that
//! offers HTTP/2 by ALPN gets one multiplexed hyper connection per host and thread.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::body::{BoxError, RequestBody};
use super::h1::chunked::Framing;
use super::h1::codec::ExchangeError;
use super::h1::conn::{self as h1, Conn, Io};
use crate::headers::Outbound;
use crate::limits::ConnCap;

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
    #[error("the exchange with the provider failed: {0}")]
    Exchange(#[source] ExchangeError),
    #[error("the provider's connection cap is reached; no call ended within {waited:?}")]
    Busy { waited: Duration },
    #[error("the consumer already has {limit} calls in flight to this provider")]
    ConsumerShare { limit: usize },
}

/// How a pool reaches its provider.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub tls: Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// Calls in flight to the provider, shared by every pool of it.
    pub cap: Arc<ConnCap>,
    /// How long a call waits for a slot of a full cap.
    pub queue_timeout: Duration,
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
    /// Calls in flight to the provider, shared with the other worker threads.
    cap: Arc<ConnCap>,
    queue_timeout: Duration,
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
    conn: Conn,
    since: Instant,
}

enum Checkout {
    H1(Conn),
    H2(http2::SendRequest<RequestBody>),
}

/// An HTTP/1.1 connection lent to one call until its response has been read. It holds
/// one of the provider's [`ConnCap`] slots until then.
#[derive(Debug)]
pub struct Lease {
    slot: Slot,
    /// Index of its host's pool in [`Upstream::hosts`] (pools are never removed).
    host: usize,
    conn: Option<Conn>,
}

impl Lease {
    /// The response was read to its end: the connection can serve another call.
    fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.slot.upstream.put_back(self.host, conn);
        }
    }

    fn conn(&mut self) -> Option<&mut Conn> {
        self.conn.as_mut()
    }
}

/// A slot of the provider's [`ConnCap`] (and of the consumer's share of it, when
/// counted), given back when dropped.
#[derive(Debug)]
pub struct Slot {
    upstream: Arc<Upstream>,
    share: Option<usize>,
    /// Whether the provider's slot is held (not [lent](Slot::lend) back).
    held: bool,
}

impl Slot {
    /// Gives the provider's slot back while the call waits for something that is not
    /// the provider (its audit record), keeping the consumer's share.
    pub fn lend(&mut self) {
        if std::mem::take(&mut self.held) {
            self.upstream.cap.give();
        }
    }

    /// Takes the provider's slot if one is free now (see [`Upstream::share`]); whether
    /// it is held.
    pub fn try_hold(&mut self) -> bool {
        if !self.held {
            self.held = self.upstream.cap.try_take();
        }
        self.held
    }

    /// Takes the provider's slot again after [`Slot::lend`], or for the first time
    /// after [`Upstream::share`] (a full cap waits at most the queue timeout).
    pub async fn retake(&mut self) -> Result<(), UpstreamError> {
        if !self.held {
            self.upstream.take_cap().await?;
            self.held = true;
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.upstream.cap.give();
        }
        if let Some(i) = self.share {
            self.upstream.cap.give_share(i);
        }
    }
}

/// A provider's response body.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read from a leased HTTP/1.1 connection by the call's task.
    H1(H1Body),
    /// A stream of a shared HTTP/2 connection, holding its cap slot to the end.
    H2(Incoming, Slot),
}

/// A response body read from a leased HTTP/1.1 connection, which goes back to its pool
/// when the body is complete (and is closed when the body is dropped before).
#[derive(Debug)]
pub struct H1Body {
    lease: Option<Lease>,
    framing: Framing,
    reusable: bool,
}

impl H1Body {
    fn new(lease: Lease, framing: Framing, reusable: bool) -> Self {
        let mut body = Self {
            lease: Some(lease),
            framing,
            reusable,
        };
        if body.framing.is_done() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some(lease) = self.lease.take()
            && self.reusable
        {
            lease.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H2(inner, _) => Pin::new(inner)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            UpstreamBody::H1(body) => {
                let Some(conn) = body.lease.as_mut().and_then(Lease::conn) else {
                    return Poll::Ready(None);
                };
                match std::task::ready!(h1::poll_data(conn, &mut body.framing, cx)) {
                    Some(Ok(data)) => {
                        if body.framing.is_done() {
                            body.finish();
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Some(Err(e)) => {
                        body.lease = None;
                        Poll::Ready(Some(Err(e.into())))
                    }
                    None => {
                        body.finish();
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.framing.is_done(),
            UpstreamBody::H2(inner, _) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(body) => match body.framing {
                Framing::Done => SizeHint::with_exact(0),
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
            UpstreamBody::H2(inner, _) => inner.size_hint(),
        }
    }
}

/// Methods whose requests may be sent again when a kept-alive connection turns out to
/// have been closed (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Upstream {
    /// A pool with the provider's TLS settings (its CA, the gateway's client certificate)
    /// and timeouts. HTTP/1.1, or HTTP/2 when a TLS provider offers it.
    pub fn new(s: PoolSettings) -> Self {
        let mut tls = (*s.tls).clone();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            tls: Arc::new(tls),
            connect_timeout: s.connect_timeout,
            response_timeout: s.response_timeout,
            idle_timeout: s.idle_timeout,
            max_idle: s.max_idle,
            hosts: Mutex::new(Vec::new()),
            cap: s.cap,
            queue_timeout: s.queue_timeout,
        }
    }

    /// Closes expired idle connections every half idle timeout, from a task on the
    /// calling thread's runtime that ends when the pool is dropped.
    pub fn sweep_idle(self: &Arc<Self>) {
        let weak: Weak<Upstream> = Arc::downgrade(self);
        let every =
            (self.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
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

    /// Takes what a call to this provider holds while it is in flight: one of the
    /// consumer's share of the provider's slots (none left: refused at once), then one of
    /// the provider's slots (a full cap waits at most the queue timeout; boxed: rare, and
    /// a large future). Taken before the call is throttled, so that a call refused for
    /// capacity consumes no rate quota; given back when the returned [`Slot`] is dropped.
    pub async fn reserve(self: &Arc<Self>, consumer: &str) -> Result<Slot, UpstreamError> {
        let mut slot = self.share(consumer)?;
        slot.retake().await?;
        Ok(slot)
    }

    /// One of the consumer's share of the provider's slots (none left: refused at once),
    /// without one of the provider's: a [`Slot`] that does not hold it yet (take it
    /// with [`Slot::try_hold`] or [`Slot::retake`]).
    pub fn share(self: &Arc<Self>, consumer: &str) -> Result<Slot, UpstreamError> {
        let share = self.cap.consumer(consumer);
        if let Some(i) = share
            && !self.cap.try_take_share(i)
        {
            metrics::counter!("fsp_upstream_cap_refusals_total", "cap" => "consumer").increment(1);
            return Err(UpstreamError::ConsumerShare {
                limit: self.cap.per_consumer(),
            });
        }
        Ok(Slot {
            upstream: self.clone(),
            share,
            held: false,
        })
    }

    /// One of the provider's slots (a full cap waits at most the queue timeout; boxed:
    /// rare, and a large future).
    async fn take_cap(&self) -> Result<(), UpstreamError> {
        if !self.cap.try_take() && !Box::pin(self.cap.take(self.queue_timeout)).await {
            metrics::counter!("fsp_upstream_cap_refusals_total", "cap" => "provider").increment(1);
            return Err(UpstreamError::Busy {
                waited: self.queue_timeout,
            });
        }
        Ok(())
    }

    /// Sends a request to `path` on the version's upstream `base` (its scheme and host)
    /// under a `slot` this upstream [reserved](Self::reserve), and returns the provider's
    /// response, whose body hands its connection back to the pool (and the slot to the
    /// cap) once read.
    pub async fn send(
        self: &Arc<Self>,
        base: &Uri,
        path: PathAndQuery,
        method: Method,
        fields: Outbound<'_>,
        mut body: RequestBody,
        slot: Slot,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        debug_assert!(
            Arc::ptr_eq(&slot.upstream, self),
            "a slot of another upstream"
        );
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
        // For an HTTP/2 provider the fields go as a map (kept when a request comes back
        // unsent).
        let mut h2_headers: Option<HeaderMap> = None;
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
                    let mut req = Request::new(body);
                    *req.method_mut() = method.clone();
                    *req.uri_mut() = absolute(https, &authority, &path);
                    *req.version_mut() = Version::HTTP_2;
                    *req.headers_mut() = h2_headers.take().unwrap_or_else(|| fields.to_map());
                    return match sender.try_send_request(req).await {
                        Ok(res) => Ok(res.map(|body| UpstreamBody::H2(body, slot))),
                        Err(mut e) => match e.take_message() {
                            // Not sent: the connection went away; take another one.
                            Some(back) if reused => {
                                let (parts, back) = back.into_parts();
                                h2_headers = Some(parts.headers);
                                body = back;
                                self.forget_h2(host);
                                continue;
                            }
                            _ => Err(UpstreamError::Http(e.into_error())),
                        },
                    };
                }
                Checkout::H1(mut conn) => {
                    match h1::exchange(
                        &mut conn,
                        &method,
                        &path,
                        host_value.as_ref(),
                        &fields,
                        body,
                    )
                    .await
                    {
                        Ok(answer) => {
                            let lease = Lease {
                                slot,
                                host,
                                conn: Some(conn),
                            };
                            let body = H1Body::new(lease, answer.framing, answer.reusable);
                            return Ok(Response::from_parts(answer.head, UpstreamBody::H1(body)));
                        }
                        Err(failed) => match failed.body {
                            // A kept-alive connection the provider closed just as it was
                            // taken: nothing came back and no body was sent, so an
                            // idempotent request goes out again on a fresh connection.
                            Some(back) if reused && idempotent(&method) => body = back,
                            _ => return Err(UpstreamError::Exchange(failed.error)),
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
        while let Some(mut idle) = pool.idle.pop() {
            if now.duration_since(idle.since) < self.idle_timeout && idle.conn.is_idle_usable() {
                return Some(Checkout::H1(idle.conn));
            }
        }
        None
    }

    fn put_back(&self, host: usize, conn: Conn) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = hosts.get_mut(host)
            && pool.idle.len() < self.max_idle
        {
            pool.idle.push(Idle {
                conn,
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

    /// Closes idle connections older than the idle timeout, or closed by the provider.
    fn sweep(&self) {
        let now = Instant::now();
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for pool in hosts.iter_mut() {
            pool.idle.retain_mut(|i| {
                now.duration_since(i.since) < self.idle_timeout && i.conn.is_idle_usable()
            });
            if pool.h2.as_ref().is_some_and(|h| h.is_closed()) {
                pool.h2 = None;
            }
        }
    }

    /// A new connection: TCP, TLS when https, and for HTTP/2 the handshake, its driving
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
                return Ok(Checkout::H1(Conn::new(Io::Plain(tcp))));
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
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Ok(Checkout::H1(Conn::new(Io::Tls(Box::new(tls)))));
            }
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|source| UpstreamError::Handshake {
                    authority: authority.clone(),
                    source,
                })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pool) = hosts.get_mut(pool_index) {
                pool.h2 = Some(sender.clone());
            }
            Ok(Checkout::H2(sender))
        };
        tokio::time::timeout(self.connect_timeout, work)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                authority: authority.clone(),
                timeout: self.connect_timeout,
            })?
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn upstream(max: usize, per_consumer: usize) -> Arc<Upstream> {
        let tls = rustls::ClientConfig::builder_with_provider(certs::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Arc::new(Upstream::new(PoolSettings {
            tls: Arc::new(tls),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_idle: 1,
            cap: Arc::new(ConnCap::with_consumers(
                max,
                per_consumer,
                ["a", "b", "c"].into_iter(),
            )),
            queue_timeout: Duration::from_millis(20),
        }))
    }

    /// A slot lent back while its call waits for its record frees the provider's slot
    /// for others, keeps the consumer's share, and is taken again after; the cap and
    /// the shares are all given back in the end.
    #[tokio::test]
    async fn a_lent_slot_frees_the_providers_slot_and_keeps_the_share() {
        let up = upstream(2, 1);
        let mut a = up.reserve("a").await.unwrap();
        let b = up.reserve("b").await.unwrap();
        assert!(matches!(
            up.reserve("c").await,
            Err(UpstreamError::Busy { .. })
        ));
        a.lend();
        assert_eq!(up.cap.in_use(), 1);
        // The consumer's share stays taken...
        assert!(matches!(
            up.reserve("a").await,
            Err(UpstreamError::ConsumerShare { limit: 1 })
        ));
        // ...the provider's slot serves another consumer meanwhile.
        let c = up.reserve("c").await.unwrap();
        assert!(matches!(a.retake().await, Err(UpstreamError::Busy { .. })));
        drop(c);
        a.retake().await.unwrap();
        assert_eq!(up.cap.in_use(), 2);
        // Lending twice, taking twice: counted once.
        a.lend();
        a.lend();
        a.retake().await.unwrap();
        a.retake().await.unwrap();
        assert_eq!(up.cap.in_use(), 2);
        drop(a);
        drop(b);
        assert_eq!(up.cap.in_use(), 0);
        for consumer in ["a", "b", "c"] {
            let _ = up.reserve(consumer).await.unwrap();
        }
    }
}
