//! The consumer-facing listener: TCP accept, TLS handshake (client certificate checked
//! by rustls against the consumer CAs and CRLs), then HTTP/1.1 or HTTP/2 by ALPN.
//!
//! Each connection is first counted against the connection limits (`crate::limits`):
//! beyond them it is closed at once (until its handshake is over it also counts among
//! its address's handshakes under way, bounded as tightly as anonymous connections once
//! half the room is taken), and so is a connection without a client certificate beyond
//! the tighter bounds for those. With every place taken, the oldest connection still
//! in its handshake (or before it: the PROXY header) is closed to make room for the new
//! one; connections past their handshake never are. Each connection gets its own task.
//! The accept loop does no handshake work itself, so a slow or hostile client cannot
//! stall it; handshakes are bounded by `listener.handshake_timeout`. On shutdown the
//! loop stops accepting and every open connection is told to finish its requests
//! (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY) within `listener.drain_timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::pipeline::{self, call::ConnInfo};
use crate::state::{Gateway, Local};

/// The most an HTTP/2 stream's answer may have buffered, not yet sent.
const H2_SEND_BUFFER: usize = 64 * 1024;

/// The most an HTTP/1.1 connection buffers each way: an answer not yet sent, a request
/// head not yet parsed.
const H1_BUFFER: usize = 64 * 1024;

/// Timeouts of the consumer listener.
#[derive(Clone, Copy, Debug)]
pub struct ListenerTimeouts {
    pub handshake: Duration,
    pub header_read: Duration,
    pub drain: Duration,
    /// The longest an answer may wait for its consumer to take more of it.
    pub response_send: Duration,
}

/// The watch on a consumer that stops taking its answers: an answer streamed from a
/// provider holds one of the provider's slots until it ends, and a consumer that no
/// longer reads (a full TCP window, an HTTP/2 window never opened again) would hold it
/// for ever. The connection's task looks at its answers every tick (a quarter of
/// `response_send_timeout`, or less): when an answer (an HTTP/2 stream's, on its own)
/// has had a frame handed over and not been asked for another for the timeout, the
/// connection is closed (its answers, their slots and their provider connections with
/// it; their records say why).
fn stall_tick(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_millis(250))
}

/// How many looks `tick` apart make `timeout`.
fn stall_looks(timeout: Duration, tick: Duration) -> u64 {
    u64::try_from(timeout.as_millis().div_ceil(tick.as_millis().max(1)))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Serves a connection (`served`), calling `close` every `tick`: when it says so, the
/// connection is dropped (`None`). The timer costs the connection's wake-ups one atomic
/// load: it is polled (registered with the task) only when it is set, not at every
/// wake-up of the connection.
async fn watching<F: std::future::Future>(
    served: F,
    tick: Duration,
    mut close: impl FnMut() -> bool,
) -> Option<F::Output> {
    let mut served = std::pin::pin!(served);
    let mut timer = std::pin::pin!(tokio::time::sleep(tick));
    let mut set = false;
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = served.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(out));
        }
        loop {
            if set && !timer.is_elapsed() {
                return std::task::Poll::Pending;
            }
            if set {
                if close() {
                    return std::task::Poll::Ready(None);
                }
                timer.as_mut().reset(tokio::time::Instant::now() + tick);
            }
            set = true;
            // Registers the timer with this task (the task's waker does not change).
            // Outside tokio's cooperative budget: a connection that spent the task's
            // budget in this poll would make the timer answer Pending without
            // registering, and the watch would never look again.
            let poll =
                tokio::task::unconstrained(std::future::poll_fn(|cx| timer.as_mut().poll(cx)));
            if std::pin::pin!(poll).poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
        }
    })
    .await
}

/// Streams open on an HTTP/2 connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    since: std::sync::Mutex<std::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            open: AtomicUsize::new(0),
            since: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Activity {
    /// A stream began; the returned guard ends it when dropped (with its response body).
    fn begin(self: &Arc<Self>) -> StreamDone {
        self.open.fetch_add(1, Ordering::Relaxed);
        StreamDone(self.clone())
    }

    fn idle_for(&self, timeout: Duration) -> bool {
        self.open.load(Ordering::Relaxed) == 0
            && self
                .since
                .lock()
                .map(|t| t.elapsed() >= timeout)
                .unwrap_or(false)
    }
}

#[derive(Debug)]
struct StreamDone(Arc<Activity>);

impl Drop for StreamDone {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.since.lock() {
            *t = std::time::Instant::now();
        }
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that marks its stream ended when it is dropped.
    #[derive(Debug)]
    struct Tracked<B> {
        #[pin]
        body: B,
        _done: StreamDone,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves consumers until `shutdown` turns true, then drains.
///
/// Peers in `balancers` (`listener.proxy_protocol_from`) must open each connection with
/// a PROXY protocol header, whose address then stands for the consumer's everywhere
/// (connection limits, `source_ips`, audit, `X-Forwarded-For`); from anyone else a
/// connection that starts with one is refused.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    timeouts: ListenerTimeouts,
    balancers: Arc<[ipnet::IpNet]>,
    mut shutdown: watch::Receiver<bool>,
) {
    // The protocol is known from ALPN once TLS is up, so each connection goes straight
    // to its own protocol's server (no sniffing of the first bytes).
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .keep_alive(true)
        // Over TLS, one flattened buffer becomes one record: vectored writes would seal
        // the headers and the body as separate records.
        .writev(false)
        // What an answer may have waiting for a consumer that does not read (and the
        // longest request head, 431 beyond): hyper's default (about 400 KiB) let a
        // consumer that reads none of its answers park close to 1 MiB on each connection
        // until `response_send_timeout`.
        .max_buf_size(H1_BUFFER);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        // What an answer may have waiting for the consumer's window or socket, on each
        // stream: hyper's default (400 KiB) let a consumer that opens its windows wide
        // and reads nothing park 100 MiB on one connection's 256 streams until
        // `response_send_timeout`. A few upstream reads (16 KiB each) still keep a stream
        // moving at full speed.
        .max_send_buf_size(H2_SEND_BUFFER);
    let builders = Arc::new((h1, h2));
    let graceful = GracefulShutdown::new();
    // Connection tasks, so that any still open after the drain timeout can be ended:
    // each holds the gateway state (and the audit sink) until it ends.
    let mut connections = tokio::task::JoinSet::new();

    loop {
        while connections.try_join_next().is_some() {}
        let (mut tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // An IPv4 client on a dual-stack listener is seen as ::ffff:a.b.c.d: one form.
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let from_balancer =
            !balancers.is_empty() && balancers.iter().any(|n| n.contains(&peer.ip()));
        // Bounds on open connections, before any work is spent on this one (a
        // balancer's count in the total at once, and against their consumer's address
        // once the header has said whose they are).
        let admitted = if from_balancer {
            gw.conn_limits.admit_unattributed()
        } else {
            gw.conn_limits.admit(peer.ip())
        };
        let slot = match admitted {
            Ok(slot) => slot,
            Err(refusal) => {
                tracing::debug!(%peer, bound = refusal.as_str(), "connection refused: limit reached");
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let gw = gw.clone();
        let builders = builders.clone();
        let watcher = graceful.watcher();
        let check_for_header = !balancers.is_empty();
        connections.spawn(async move {
            // One deadline for the PROXY header (or the look for one) and the handshake.
            let deadline = tokio::time::Instant::now() + timeouts.handshake;
            let mut slot = slot;
            // Until its handshake is over, the connection gives its place up when every
            // place is taken and it is the oldest still in its handshake.
            let eviction = slot.eviction();
            let opening = async {
                let peer = if from_balancer {
                    client_of_balancer(&mut tcp, &mut slot, peer, deadline).await?
                } else {
                    if check_for_header && !no_header(&mut tcp, peer, deadline).await {
                        return None;
                    }
                    peer
                };
                let listener_tls = gw.tls.load_full();
                let acceptor = TlsAcceptor::from(listener_tls.config.clone());
                match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => Some((peer, listener_tls, tls)),
                    Ok(Err(e)) => {
                        metrics::counter!("fsp_tls_handshake_failures_total").increment(1);
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        None
                    }
                    Err(_) => {
                        metrics::counter!("fsp_tls_handshake_failures_total").increment(1);
                        tracing::info!(%peer, "TLS handshake timed out");
                        None
                    }
                }
            };
            let opened = tokio::select! {
                biased;
                () = eviction.evicted() => {
                    tracing::debug!(%peer, "connection closed in its TLS handshake: its place was given to a new connection");
                    return;
                }
                opened = opening => opened,
            };
            let Some((peer, listener_tls, tls)) = opened else {
                return;
            };
            drop(eviction);
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
            let certificate = chain.first().map(certs::certificate_identity);
            // No certificate: the cheapest connection to open, bounded more tightly. It
            // may still carry bearer tokens, and a call without any credential gets the
            // contract's 401, so it is not refused at the handshake. A connection evicted
            // as its handshake ended is closed all the same.
            let done = if certificate.is_none() {
                slot.anonymous()
            } else {
                slot.handshake_done()
            };
            if let Err(refusal) = done {
                tracing::debug!(%peer, bound = refusal.as_str(), "connection closed after its TLS handshake: limit reached or its place given to a new connection");
                return;
            }
            let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let conn = ConnInfo::new(peer, certificate).with_chain(chain, listener_tls);
            let conn = Arc::new(if is_h2 { conn.http2() } else { conn });
            let unparsed = UnparsedRequest(conn.clone());
            let watched = conn.clone();
            let stall_tick = stall_tick(timeouts.response_send);
            let io = TokioIo::new(tls);
            let ended = if is_h2 {
                // HTTP/2 has no header timeout between streams: a connection with no
                // stream open for `header_read_timeout` is closed, as an idle HTTP/1.1
                // one is.
                let activity = Arc::new(Activity::default());
                let seen = activity.clone();
                let service = service_fn(move |req| {
                    let done = seen.begin();
                    let call = pipeline::handle(Local::of(&gw), conn.clone(), req);
                    Box::pin(async move {
                        let response = call.await;
                        response.map(|r| r.map(|body| Tracked { body, _done: done }))
                    })
                });
                let served = watcher.watch(builders.1.serve_connection(io, service));
                let tick = timeouts.header_read.min(stall_tick);
                let looks = stall_looks(timeouts.response_send, tick);
                watching(served, tick, || {
                    if activity.idle_for(timeouts.header_read) {
                        tracing::debug!(%peer, "idle HTTP/2 connection closed");
                        return true;
                    }
                    if watched.answers_stalled(looks) {
                        tracing::info!(%peer, "HTTP/2 connection closed: its consumer stopped taking an answer");
                        return true;
                    }
                    false
                })
                .await
                .unwrap_or(Ok(()))
            } else {
                let service = service_fn(move |req| {
                    // Boxed: the call's future is large, and hyper moves it (twice) before
                    // polling it; a box is moved as one pointer.
                    Box::pin(pipeline::handle(Local::of(&gw), conn.clone(), req))
                });
                let served = watcher.watch(builders.0.serve_connection(io, service));
                let looks = stall_looks(timeouts.response_send, stall_tick);
                watching(served, stall_tick, || {
                    let stalled = watched.answers_stalled(looks);
                    if stalled {
                        tracing::info!(%peer, "connection closed: its consumer stopped taking an answer");
                    }
                    stalled
                })
                .await
                .unwrap_or(Ok(()))
            };
            if let Err(e) = ended {
                unparsed.or_debug(&e);
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(open = graceful.count(), "draining open connections");
    if tokio::time::timeout(timeouts.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
}

/// What is said of a connection that ended with an error. A request the HTTP layer
/// itself could not read (a malformed request line or field, framing it refuses, a head
/// too large) is answered by hyper with a bare 400 (431 or 414 when too large) and the connection closed: it
/// never reaches the pipeline, so it has no message id and no record in the trail. It is
/// counted, and logged with the consumer's certificate, so that a consumer whose requests
/// a toolkit malforms, or someone probing the parser, is seen. (HTTP/1.1 only: hyper's
/// HTTP/2 server resets a malformed stream, which is not counted here.)
struct UnparsedRequest(Arc<ConnInfo>);

impl UnparsedRequest {
    fn or_debug(&self, e: &hyper::Error) {
        let conn = &self.0;
        // (HTTP/2 spoken without ALPN gets no answer at all: a client's mistake, not a
        // malformed request.)
        if !e.is_parse() || e.is_parse_version_h2() {
            tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
            return;
        }
        metrics::counter!("fsp_requests_unparsed_total").increment(1);
        // A consumer known by its certificate is told of at `warn` (its toolkit sends
        // what HTTP does not allow); anyone else only at `debug`, so that whoever can open
        // a TLS connection cannot flood the log. The counter counts both.
        match conn.certificate.as_ref() {
            Some(c) => {
                tracing::warn!(peer = %conn.peer, certificate = c.cn.as_deref(), certificate_sha256 = conn.certificate_sha256.as_deref(), error = %e, "a request the HTTP parser refused was answered 400 (431 or 414: too large) without a message id, and its connection closed");
            }
            None => {
                tracing::debug!(peer = %conn.peer, error = %e, "a request the HTTP parser refused was answered 400 (431 or 414: too large) without a message id, and its connection closed");
            }
        }
    }
}

/// Reads the PROXY header a balancer sent and counts the connection against the
/// consumer's address; that address, or None (logged) when the connection is refused.
async fn client_of_balancer(
    tcp: &mut tokio::net::TcpStream,
    slot: &mut crate::limits::ConnSlot,
    balancer: std::net::SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<std::net::SocketAddr> {
    let carried = match tokio::time::timeout_at(deadline, crate::proxy_header::read(tcp)).await {
        Ok(Ok(crate::proxy_header::Origin::Client(client))) => client,
        Ok(Ok(crate::proxy_header::Origin::Balancer)) => balancer,
        Ok(Err(e)) => {
            metrics::counter!("fsp_proxy_protocol_refusals_total", "reason" => "malformed")
                .increment(1);
            tracing::warn!(%balancer, error = %e, "connection from a balancer refused");
            return None;
        }
        Err(_) => {
            metrics::counter!("fsp_proxy_protocol_refusals_total", "reason" => "timeout")
                .increment(1);
            tracing::info!(%balancer, "connection from a balancer refused: no PROXY header within the handshake timeout");
            return None;
        }
    };
    match slot.attribute(carried.ip()) {
        Ok(()) => Some(carried),
        Err(refusal) => {
            tracing::debug!(peer = %carried, %balancer, bound = refusal.as_str(), "connection refused: limit reached");
            None
        }
    }
}

/// Whether a peer that may not send a PROXY header did not start with one: nobody but a
/// configured balancer may say which address a connection comes from.
async fn no_header(
    tcp: &mut tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    deadline: tokio::time::Instant,
) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if crate::proxy_header::looks_like_header(first[0]) => {
            metrics::counter!("fsp_proxy_protocol_refusals_total", "reason" => "untrusted")
                .increment(1);
            tracing::warn!(%peer, "connection refused: a PROXY protocol header from an address not in listener.proxy_protocol_from");
            false
        }
        Ok(Ok(_)) => true,
        // Closed, failed or silent: the handshake would fail the same way.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::future::Future as _;
    use std::rc::Rc;
    use std::task::Poll;

    /// A connection that is busy (its poll spends the task's whole cooperative budget)
    /// when the watch's timer fires, then silent (a consumer that stopped reading: no
    /// more wake-ups from the connection): the watch still looks every tick. (Found by a
    /// review: the timer, polled with the budget spent, answered Pending without
    /// registering, and the watch never looked again.)
    #[tokio::test(start_paused = true)]
    async fn the_watch_keeps_looking_after_a_busy_poll() {
        let tick = Duration::from_secs(15);
        let burn = Rc::new(Cell::new(false));
        let looks = Rc::new(Cell::new(0u32));
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let (b, l) = (burn.clone(), looks.clone());
                tokio::task::spawn_local(async move {
                    let served = std::future::poll_fn(move |cx| {
                        if b.replace(false) {
                            // Spend the budget, as a connection moving many frames does.
                            loop {
                                let spend = std::pin::pin!(tokio::task::consume_budget());
                                if spend.poll(cx).is_pending() {
                                    break;
                                }
                            }
                        }
                        Poll::<()>::Pending
                    });
                    watching(served, tick, || {
                        l.set(l.get() + 1);
                        false
                    })
                    .await
                });
                tokio::task::yield_now().await;
                burn.set(true);
                tokio::time::sleep(tick + Duration::from_millis(1)).await;
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                assert_eq!(looks.get(), 1, "the first look");
                tokio::time::sleep(tick * 10).await;
                assert!(
                    looks.get() >= 10,
                    "the watch looked {} times in 11 ticks",
                    looks.get()
                );
            })
            .await;
    }
}
