//! The admin listener: health, readiness, Prometheus metrics, and administrator actions
//! (bearer token from `tokens_file`, or an admin client certificate over TLS). Every administrator action is logged with who,
//! what and when under the `fsp::admin` target.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::limits::Source;
use crate::observe::Sparse;
use crate::state::Gateway;
use crate::suspend::Party;

/// Serves the admin API until `shutdown` turns true.
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let open = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let per_ip = Arc::new(PerIp::default());
    let slots = Arc::new(Slots::default());
    // Connections waiting for a slot an evicted one frees.
    let waiting = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_WAITING));
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // A bounded number of admin connections, and fewer from one address: the admin
        // API is for a few operators and probes, and one peer must not be able to take
        // every connection (and with them the probes) or exhaust descriptors.
        let Some(from_peer) = per_ip.admit(peer.ip(), ADMIN_MAX_CONNECTIONS_PER_IP) else {
            metrics::counter!("fsp_admin_connections_refused_total").increment(1);
            tracing::debug!(target: "fsp::admin", %peer, "admin connection refused: {ADMIN_MAX_CONNECTIONS_PER_IP} already open from this address");
            continue;
        };
        // Every slot taken: the oldest connection that has not authenticated an
        // administrator gives its slot up, so that connections anyone can open (probes
        // need no credentials) cannot keep the kubelet's probes and the operators out.
        let (permit, wait) = match open.clone().try_acquire_owned() {
            Ok(permit) => (Some(permit), None),
            Err(_) => match waiting.clone().try_acquire_owned() {
                Ok(w) if slots.evict_oldest_unauthenticated() => (None, Some(w)),
                _ => {
                    metrics::counter!("fsp_admin_connections_refused_total").increment(1);
                    static FULL: Sparse = Sparse::new(Duration::from_secs(10));
                    if let Some(refused_since_last) = FULL.occurred() {
                        tracing::warn!(target: "fsp::admin", %peer, refused_since_last, "admin connection refused: {ADMIN_MAX_CONNECTIONS} already open, none of them evictable (authenticated, or already giving up its place)");
                    }
                    drop(tcp);
                    continue;
                }
            },
        };
        let (gw, open, slot) = (gw.clone(), open.clone(), slots.add());
        tokio::spawn(async move {
            let permit = match permit {
                Some(p) => p,
                None => match tokio::time::timeout(EVICTION_WAIT, open.acquire_owned()).await {
                    Ok(Ok(p)) => {
                        drop(wait);
                        p
                    }
                    _ => {
                        metrics::counter!("fsp_admin_connections_refused_total").increment(1);
                        return;
                    }
                },
            };
            // Holding a place now: evicting it frees one.
            slot.serving
                .store(true, std::sync::atomic::Ordering::Release);
            // The access in force when the connection opened decides whether it speaks
            // TLS (a reload may turn `[admin] tls` on or off for later connections).
            let tls = gw.admin_access.load().tls.clone();
            match tls {
                None => {
                    serve_connection(gw, peer, TokioIo::new(tcp), Opened::Plain, slot).await;
                }
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                    let handshake =
                        tokio::time::timeout(ADMIN_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    // A handshake never finished holds a place too: it gives it up as
                    // any connection that authenticated nobody.
                    let accepted = tokio::select! {
                        done = handshake => Some(done),
                        () = slot.evict.notified() => None,
                    };
                    match accepted {
                        None => {
                            tracing::debug!(target: "fsp::admin", %peer, "admin connection closed in its TLS handshake: its place was wanted");
                        }
                        Some(Ok(Ok(tls))) => {
                            let client = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| Some((chain.first()?, chain)))
                                .map(|(leaf, chain)| ClientCertificate {
                                    identity: certs::identity::certificate_identity(leaf),
                                    common_names: certs::identity::common_name_count(leaf),
                                    not_after: certs::identity::not_after(leaf).unwrap_or(i64::MIN),
                                    chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
                                });
                            let opened = Opened::Tls { config, client };
                            serve_connection(gw, peer, TokioIo::new(tls), opened, slot).await;
                        }
                        // Scanners and TCP probes fail here all day: counted, not logged
                        // above debug.
                        Some(Ok(Err(e))) => {
                            metrics::counter!("fsp_admin_tls_handshake_failures_total")
                                .increment(1);
                            tracing::debug!(target: "fsp::admin", %peer, error = %e, "admin TLS handshake failed");
                        }
                        Some(Err(_)) => {
                            metrics::counter!("fsp_admin_tls_handshake_failures_total")
                                .increment(1);
                            tracing::debug!(target: "fsp::admin", %peer, "admin TLS handshake not completed within {ADMIN_HANDSHAKE_TIMEOUT:?}");
                        }
                    }
                }
            }
            drop(permit);
            drop(from_peer);
        });
    }
}

/// One admin connection's place among the open ones: whether it has authenticated an
/// administrator (else it may be evicted when every place is taken), and how to end it.
#[derive(Default)]
struct Slot {
    authenticated: std::sync::atomic::AtomicBool,
    /// It holds one of the places (a connection waiting for one holds none).
    serving: std::sync::atomic::AtomicBool,
    evict: tokio::sync::Notify,
}

/// The open admin connections, oldest first (not the consumers' hot path: a lock is
/// fine).
#[derive(Default)]
struct Slots(std::sync::Mutex<std::collections::VecDeque<std::sync::Weak<Slot>>>);

impl Slots {
    fn add(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|s| s.strong_count() > 0);
        open.push_back(Arc::downgrade(&slot));
        slot
    }

    /// Ends the oldest open connection that has not authenticated an administrator;
    /// whether there was one.
    fn evict_oldest_unauthenticated(&self) -> bool {
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|s| s.strong_count() > 0);
        let oldest = open.iter().position(|s| {
            s.upgrade().is_some_and(|s| {
                s.serving.load(std::sync::atomic::Ordering::Acquire)
                    && !s.authenticated.load(std::sync::atomic::Ordering::Acquire)
            })
        });
        match oldest
            .and_then(|i| open.remove(i))
            .and_then(|s| s.upgrade())
        {
            Some(slot) => {
                slot.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Admin connections open per address, an IPv6 /64 counting as one, as on the consumer
/// listener (not the consumers' hot path: a lock is fine).
#[derive(Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<Source, usize>>);

/// One admin connection counted against its address, until dropped.
struct FromPeer(Arc<PerIp>, Source);

impl PerIp {
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<FromPeer> {
        let source = Source::of(ip);
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(source).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(FromPeer(self.clone(), source))
    }
}

impl Drop for FromPeer {
    fn drop(&mut self) {
        let mut open = self
            .0
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// How an admin connection was opened: the TLS configuration in force then (who may
/// present which certificate) and the certificate presented.
enum Opened {
    Plain,
    Tls {
        config: Arc<rustls::ServerConfig>,
        client: Option<ClientCertificate>,
    },
}

/// The client certificate an admin connection presented (verified in the handshake
/// against the admin trust anchors).
#[derive(Clone, Debug)]
struct ClientCertificate {
    identity: policy::CertificateIdentity,
    /// CN attributes in its subject.
    common_names: usize,
    /// Its `notAfter`, seconds since the Unix epoch: the handshake checked it, but a TLS
    /// session resumed later does not check it again.
    not_after: i64,
    /// The chain as presented (leaf first), to check it again once a CRL of the admin
    /// TLS settings passes its nextUpdate.
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
}

async fn serve_connection<I>(
    gw: Arc<Gateway>,
    peer: SocketAddr,
    io: TokioIo<I>,
    opened: Opened,
    slot: Arc<Slot>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let opened = Arc::new(opened);
    let serving = slot.clone();
    let svc = service_fn(move |req| {
        let (gw, opened, slot) = (gw.clone(), opened.clone(), serving.clone());
        async move { Ok::<_, Infallible>(route(&gw, peer, &opened, &slot, req).await) }
    });
    let mut http = http1::Builder::new();
    // The header timeout also bounds how long an idle kept-alive connection stays.
    http.timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT);
    let served = http.serve_connection(io, svc);
    // No admin answer takes minutes: a connection is closed after this at most; and
    // one that authenticated nobody is closed when its place is wanted.
    tokio::select! {
        _ = tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, served) => {}
        () = slot.evict.notified() => {
            tracing::debug!(target: "fsp::admin", %peer, "admin connection closed: its place was wanted and it had authenticated nobody");
        }
    }
}

/// Time to complete the TLS handshake.
const ADMIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once from one address.
const ADMIN_MAX_CONNECTIONS_PER_IP: usize = 16;
/// Time to receive a request's head (and the longest idle keep-alive).
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an admin connection stays open.
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Admin connections open at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// New connections waiting, at most, for the place of one evicted.
const ADMIN_MAX_WAITING: usize = 16;
/// How long a new connection waits for the place of the one evicted for it.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// `GET /admin/audit/{messageId}`: the call's record as written (200), 404 when the
/// trail has none, 400 for an id that is not an FSP message id, 503 while another
/// lookup runs (each may read the whole trail). With the answer: what the reading did,
/// for its own record in the trail.
async fn audit_record(gw: &Gateway, id: &str) -> (Response<Full<Bytes>>, &'static str) {
    static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let Ok(uuid) = uuid::Uuid::try_parse(id) else {
        return (
            json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "an FSP message id is a UUID: /admin/audit/{messageId}"}),
            ),
            "not a message id",
        );
    };
    let Ok(_one_at_a_time) = LOOKUPS.try_acquire() else {
        let mut r = json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "another audit lookup is running; retry when it ends"}),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        return (r, "not answered: another lookup was running");
    };
    let sink = gw.audit.clone();
    // As the gateway writes it, whichever of the UUID forms was asked for.
    let id = uuid.hyphenated().to_string();
    // The trail is read from disk: off the control runtime's thread.
    let found = tokio::task::spawn_blocking(move || sink.lookup(&id)).await;
    match found {
        Ok(Ok(Some(record))) => (
            json(
                StatusCode::OK,
                serde_json::to_value(record).unwrap_or_default(),
            ),
            "read the call's record",
        ),
        Ok(Ok(None)) => (
            json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "no call with this message id in the audit trail (a call's record is written when it ends)"}),
            ),
            "no call with this message id",
        ),
        Ok(Err(e)) => (
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": e.to_string()}),
            ),
            "the trail could not be read",
        ),
        Err(e) => (
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": format!("the lookup failed: {e}")}),
            ),
            "the lookup failed",
        ),
    }
}

/// The path of a reading of a call's record as the trail gives it: the message id in
/// the form the gateway writes it (whichever form was asked for), so that a search of
/// the trail for a call's id finds who read its record; nothing of a path that is not
/// a message id.
fn lookup_path(id: &str) -> String {
    match uuid::Uuid::try_parse(id) {
        Ok(uuid) => format!("/admin/audit/{}", uuid.hyphenated()),
        Err(_) => "/admin/audit/(not a message id)".to_owned(),
    }
}

/// `GET /admin/stats?from=&to=&by=`: the usage statistics (a JSON list, as `fsp stats
/// --format json`), 400 for a bad query, 503 when they cannot be read.
async fn usage_stats(gw: &Gateway, query: Option<&str>) -> Response<Full<Bytes>> {
    let mut wanted: [Option<String>; 3] = [None, None, None];
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "from" => 0,
            "to" => 1,
            "by" => 2,
            other => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": format!("unknown parameter {other:?}: from, to and by are known")}),
                );
            }
        };
        // Days and names: `%2C` for a comma is the only escape worth reading.
        let value = value.replace("%2C", ",").replace("%2c", ",");
        if value.contains('%') || wanted[slot].replace(value).is_some() {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("parameter {name:?} given twice or escaped")}),
            );
        }
    }
    let [from, to, by] = wanted;
    let q = match audit::stats::Query::parse(from.as_deref(), to.as_deref(), by.as_deref()) {
        Ok(q) => q,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": e.to_string()}),
            );
        }
    };
    let sink = gw.audit.clone();
    let answered = tokio::task::spawn_blocking(move || {
        let rows = sink.stats(&q)?;
        let mut out = Vec::new();
        audit::stats::write_rows(&rows, &q.by, audit::stats::OutputFormat::Json, &mut out)
            .map_err(|e| audit::AuditError::Unavailable(e.to_string()))?;
        Ok::<_, audit::AuditError>(out)
    })
    .await;
    match answered {
        Ok(Ok(body)) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Ok(Err(e)) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": e.to_string()}),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": format!("the statistics failed: {e}")}),
        ),
    }
}

/// Why an admin call was refused: the answer, and a line for the log.
struct Refused {
    response: Response<Full<Bytes>>,
    why: &'static str,
}

/// Who is calling the admin API: the name of a token from `tokens_file`, or `CN=...` for an
/// admin client certificate whose CN is in `admin_cns`. The tokens and CNs in force now
/// decide: one removed at a reload stops working at once, on open connections too; a
/// connection opened under other TLS settings (trust anchors, CRLs, TLS turned on) must
/// reconnect before it is believed again.
///
/// A client certificate that is not an administrator's (a consumer's, say) is refused
/// even beside a valid token: it says the caller is not who the token says. A token that
/// is presented must be valid, even beside an admin certificate.
fn authenticate(
    gw: &Gateway,
    opened: &Opened,
    req: &Request<Incoming>,
) -> Result<String, Box<Refused>> {
    let access = gw.admin_access.load();
    let refuse = |status, error: &str, why| {
        Box::new(Refused {
            response: json(status, serde_json::json!({"error": error})),
            why,
        })
    };
    let same_settings = match (opened, &access.tls) {
        (Opened::Plain, None) => true,
        (Opened::Tls { config, .. }, Some(now)) => Arc::ptr_eq(config, now),
        _ => false,
    };
    if !same_settings {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "the admin API's TLS settings changed since this connection was opened: connect again",
            "a connection opened under earlier TLS settings",
        ));
    }
    let by_certificate = match opened {
        Opened::Tls {
            client: Some(c), ..
        } => {
            let now = rustls::pki_types::UnixTime::now();
            let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
            if secs > c.not_after {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "this client certificate has expired: connect again with a valid one",
                    "an expired client certificate (on a resumed TLS session or a connection opened before its expiry)",
                ));
            }
            // A CRL of these settings past its nextUpdate vouches for nothing: the
            // certificate is checked again, as a new handshake would check it (one its
            // CRL no longer covers, or under a CA no CRL covers, passes).
            if let Some((verifier, fresh_before)) = &access.clients
                && secs >= *fresh_before
                && !certs::tls::client_chain_accepted(&**verifier, &c.chain, now)
            {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "this client certificate is no longer accepted (the CRL that covers it is out of date): connect again once a fresh CRL is in place, or use a token",
                    "a client certificate whose CRL passed its nextUpdate (on a resumed TLS session or a connection opened before)",
                ));
            }
            let cn = c.identity.cn.as_deref().filter(|_| c.common_names == 1);
            let admin_cn = cn.filter(|cn| access.cns.iter().any(|a| a == cn));
            // A certificate a consumer pinned is a consumer's, never an administrator's;
            // so is one of the consumers' CA with a consumer's CN (fsp check refuses
            // such an admin CN, and this holds whatever a consumer pinned with it).
            let snap = gw.snapshot.load();
            let consumer = snap.consumers.pinned(&c.identity.sha256).is_some()
                || (!access.own_ca
                    && match snap.consumers.identify_certificate(&c.identity) {
                        Ok(_) | Err(policy::IdentityError::PinMismatch { .. }) => true,
                        Err(_) => false,
                    });
            match admin_cn {
                Some(cn) if !consumer => Some(format!("CN={cn}")),
                _ => {
                    return Err(refuse(
                        StatusCode::FORBIDDEN,
                        "this client certificate is not an administrator's (its CN is not in admin_cns, it has several CNs, or it is a consumer's): connect without it, or with an administrator's certificate",
                        "a client certificate that is not an administrator's",
                    ));
                }
            }
        }
        _ => None,
    };
    let presented = req.headers().contains_key(header::AUTHORIZATION);
    if let Some(name) = administrator(&access.tokens, req) {
        return Ok(name.to_owned());
    }
    match by_certificate {
        Some(who) if !presented => Ok(who),
        _ => {
            let hint = if access.cns.is_empty() {
                "send Authorization: Bearer <token from tokens_file>"
            } else {
                "send Authorization: Bearer <token from tokens_file>, or connect with an administrator's client certificate"
            };
            let mut refused = refuse(
                StatusCode::UNAUTHORIZED,
                hint,
                if presented {
                    "unknown bearer token"
                } else {
                    "no bearer token and no administrator's certificate"
                },
            );
            refused.response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            Err(refused)
        }
    }
}

/// The name of the administrator whose token (from `tokens_file`) the caller presented.
fn administrator<'t>(
    tokens: &'t [crate::config::AdminToken],
    req: &Request<Incoming>,
) -> Option<&'t str> {
    // The auth scheme is case-insensitive (RFC 9110 §11.1).
    let (scheme, presented) = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim()
        .split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let presented = presented.trim();
    // Every token is compared (in constant time each), so the time taken does not say
    // which one was close.
    // A `name:token` line's whole text is accepted too: before names, the whole line was
    // the token, and administrators may still send it.
    let mut found = None;
    for t in tokens {
        let whole = t.line.as_deref().unwrap_or(&t.token);
        let matched = certs::identity::same_secret(t.token.as_bytes(), presented.as_bytes())
            | certs::identity::same_secret(whole.as_bytes(), presented.as_bytes());
        if matched && found.is_none() {
            found = Some(t.name.as_str());
        }
    }
    found
}

async fn route(
    gw: &Gateway,
    peer: SocketAddr,
    opened: &Opened,
    slot: &Slot,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    // HEAD is GET without the body (RFC 9110 §9.3.2): hyper leaves the body out, having
    // read the request's method itself.
    let mut req = req;
    // What was asked, for the log and the record: a HEAD of a call's record is on the
    // record as a HEAD (it says whether the call exists, not what it holds).
    let asked = req.method().clone();
    if req.method() == Method::HEAD {
        *req.method_mut() = Method::GET;
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            return match gw.unready().await {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            };
        }
        (&Method::GET, "/metrics") => {
            crate::observe::refresh(&*gw.audit, &gw.certificates.load(), &gw.crls.load());
            let body = gw.metrics.as_ref().map(|m| m.render()).unwrap_or_default();
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return r;
        }
        _ => {}
    }
    if let Some(allow) = allowed_methods(&path)
        && !path.starts_with("/admin/")
    {
        return method_not_allowed(allow);
    }
    if !path.starts_with("/admin/") {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no such endpoint"}),
        );
    }
    let who = match authenticate(gw, opened, &req) {
        Ok(who) => {
            slot.authenticated
                .store(true, std::sync::atomic::Ordering::Release);
            who
        }
        Err(refused) => {
            let certificate = match opened {
                Opened::Tls {
                    client: Some(c), ..
                } => Some(c.identity.sha256.to_string()),
                _ => None,
            };
            // Anyone who reaches the listener can be refused: one warning a second at
            // most (with the count since the last), the others at debug.
            static REFUSALS: Sparse = Sparse::new(Duration::from_secs(1));
            match REFUSALS.occurred() {
                Some(refused_since_last) => {
                    tracing::warn!(target: "fsp::admin", %peer, method = %req.method(), %path, certificate, refused_since_last, "admin call refused: {}", refused.why)
                }
                None => {
                    tracing::debug!(target: "fsp::admin", %peer, method = %req.method(), %path, certificate, "admin call refused: {}", refused.why)
                }
            }
            // Counted, not recorded in the trail: anyone who reaches the listener could
            // otherwise fill the trail with refused logins.
            metrics::counter!("fsp_admin_calls_refused_total").increment(1);
            return refused.response;
        }
    };
    let at = crate::pipeline::stamp::rfc3339_millis(time::OffsetDateTime::now_utc());
    let method = asked;
    let call = suspension_call(&path).filter(|_| req.method() == Method::POST);
    let lookup = path
        .strip_prefix("/admin/audit/")
        .filter(|_| req.method() == Method::GET);
    // What an administrator said of a change, for its record in the trail.
    let mut said: Option<String> = None;
    // A change that could not be recorded is not made (with `fail_closed`, as calls).
    let is_change =
        method == Method::POST && (suspension_call(&path).is_some() || path == "/admin/reload");
    // Reading a call's record reads personal data (the end user, the purpose): who read
    // which record is on the record too, and, like a change, is not done unrecorded.
    let recorded = is_change || lookup.is_some();
    if recorded && let Err(e) = gw.changes_recordable() {
        let what = if is_change {
            "this change, so it is not made"
        } else {
            "this reading of a call's record, so it is not answered"
        };
        tracing::error!(target: "fsp::admin", %who, %path, error = %e, "admin call refused: the audit trail cannot record it");
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": format!("the audit trail cannot record {what}: {e}")}),
        );
    }
    let response = if let Some((party, id, suspend)) = call {
        let (party, id) = (party, id.to_owned());
        match reason(req).await {
            Ok(reason) => {
                let given = match &reason {
                    Some(r) => format!("reason: {r}"),
                    None => "no reason given".to_owned(),
                };
                let (response, changed) =
                    suspension(gw, party, &id, suspend, reason, &who, &at).await;
                // A repeated call changes nothing: its record says so, and that the
                // suspension in force keeps its first author and reason.
                said = Some(match (changed, suspend) {
                    (Some(false), true) => {
                        format!(
                            "{given}; no change: already suspended, the first suspension's record is kept"
                        )
                    }
                    (Some(false), false) => format!("{given}; no change: it was not suspended"),
                    _ => given,
                });
                response
            }
            Err(problem) => json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": problem}),
            ),
        }
    } else if let Some(id) = lookup {
        let (response, did) = audit_record(gw, id).await;
        said = Some(did.to_owned());
        response
    } else if path == "/admin/stats" && req.method() == Method::GET {
        usage_stats(gw, req.uri().query()).await
    } else if path == "/admin/certificates" && req.method() == Method::GET {
        certificates(gw, req.uri().query())
    } else if let Some(view) = read_only(gw, &path).filter(|_| req.method() == Method::GET) {
        view
    } else {
        match (req.method(), path.as_str()) {
            (&Method::GET, "/admin/suspensions") => {
                let s = gw.suspensions.snapshot();
                let list = |m: &std::collections::BTreeMap<String, crate::suspend::Suspension>| {
                    m.iter()
                        .map(|(id, s)| {
                            serde_json::json!({"id": id, "reason": s.reason, "by": s.by, "at": s.at})
                        })
                        .collect::<Vec<_>>()
                };
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "consumers": list(&s.consumers),
                        "providers": list(&s.providers),
                        "shared": gw.suspensions.is_shared(),
                    }),
                )
            }
            (&Method::POST, "/admin/reload") => match gw.reload() {
                Ok(report) => {
                    said = Some(format!("reloaded; changed: {}", report.changed));
                    json(
                        StatusCode::OK,
                        serde_json::json!({
                            "reloaded": true,
                            "at": at,
                            "applied": report.applied,
                            "needs_restart": report.needs_restart,
                            "changed": report.changed,
                            "warnings": report.warnings,
                        }),
                    )
                }
                Err(e) => {
                    said = Some(format!("not reloaded: {e}"));
                    json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        serde_json::json!({"reloaded": false, "error": e.to_string()}),
                    )
                }
            },
            _ => match allowed_methods(&path) {
                Some(allow) => method_not_allowed(allow),
                None => json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "no such admin endpoint"}),
                ),
            },
        }
    };
    // Every attempted change (made or refused) and every reading of a call's record is on
    // the record; other reads (statistics, certificates, the configuration) are not.
    if recorded {
        let on_record = match lookup {
            Some(id) => lookup_path(id),
            None => path.clone(),
        };
        let written =
            record_admin_action(gw, &who, peer, &method, &on_record, response.status(), said).await;
        // A change is made by now; a record read is not shown unless its reading is on
        // the record (the trail may have failed since its health was asked).
        if let Err(e) = written
            && lookup.is_some()
            && gw.snapshot.load().fail_closed
        {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": format!("the audit trail cannot record this reading of a call's record, so it is not answered: {e}")}),
            );
        }
    }
    tracing::info!(target: "fsp::admin", %who, %peer, %method, %path, status = response.status().as_u16(), %at, "admin action");
    response
}

/// Lifts every suspension in force, each as a resume by `who` (the quickstart, at its
/// start) recorded in the audit trail like an administrator's, with `said` as its
/// detail. Returns how many were lifted.
pub(crate) async fn lift_every_suspension(gw: &Gateway, who: &str, said: &str) -> usize {
    let in_force = gw.suspensions.snapshot();
    let parties = in_force
        .consumers
        .keys()
        .map(|id| (Party::Consumer, id))
        .chain(in_force.providers.keys().map(|id| (Party::Provider, id)));
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut lifted = 0;
    for (party, id) in parties {
        let at = crate::pipeline::stamp::rfc3339_millis(time::OffsetDateTime::now_utc());
        let (response, _) = suspension(gw, party, id, false, None, who, &at).await;
        let path = format!("/admin/{}s/{id}/resume", party.as_str());
        let status = response.status();
        // (A failure is logged; the quickstart goes on.)
        let _ = record_admin_action(
            gw,
            who,
            local,
            &Method::POST,
            &path,
            status,
            Some(said.to_owned()),
        )
        .await;
        lifted += usize::from(status.is_success());
    }
    lifted
}

/// Writes an administrator's change into the audit trail, as a record of its own in the
/// same hash chain as the calls: who (`credential_id`, with `credential` = `admin`),
/// what (`operation`), when, from which address, and what was said (`detail`).
async fn record_admin_action(
    gw: &Gateway,
    who: &str,
    peer: SocketAddr,
    method: &Method,
    path: &str,
    status: StatusCode,
    said: Option<String>,
) -> Result<(), String> {
    let operation = format!("{method} {path}");
    record_change(gw, who, peer.ip(), operation, status, said).await
}

/// A reload asked for by SIGHUP, made as `POST /admin/reload` makes it and recorded as
/// an administrator's change by `SIGHUP` (the signal does not say who sent it). With
/// `fail_closed`, a reload the trail cannot record is not made.
pub(crate) async fn reload_on_signal(gw: &Gateway) {
    let local = std::net::IpAddr::from([127, 0, 0, 1]);
    let operation = "SIGHUP reload".to_owned();
    if let Err(e) = gw.changes_recordable() {
        tracing::error!(target: "fsp::admin", error = %e, "SIGHUP reload refused: the audit trail cannot record it");
        return;
    }
    let (status, said) = match gw.reload() {
        Ok(report) => (
            StatusCode::OK,
            format!("reloaded; changed: {}", report.changed),
        ),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP reload refused; the running configuration stays");
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("not reloaded: {e}"),
            )
        }
    };
    // (A failure is logged: the reload is made by now.)
    let _ = record_change(gw, "SIGHUP", local, operation, status, Some(said)).await;
}

/// Writes a change into the audit trail (see [`record_admin_action`]); an error says why
/// it is not durable (it is logged here).
pub(crate) async fn record_change(
    gw: &Gateway,
    who: &str,
    from: std::net::IpAddr,
    operation: String,
    status: StatusCode,
    said: Option<String>,
) -> Result<(), String> {
    let stamp = crate::pipeline::stamp::Stamp::now();
    let record = audit::Record {
        message_id: stamp.message_id().to_owned(),
        timestamp: stamp.timestamp().to_owned(),
        credential: Some(audit::stats::ADMIN_CREDENTIAL.to_owned()),
        credential_id: Some(who.to_owned()),
        source_ip: from.to_canonical().to_string(),
        operation: operation.clone(),
        decision: if status.is_success() {
            "allowed".to_owned()
        } else {
            "refused".to_owned()
        },
        status: status.as_u16(),
        node: gw.node.clone(),
        detail: said,
        ..Default::default()
    };
    let written = match gw.audit.submit_durable(&record) {
        Ok(durable) => match tokio::time::timeout(Duration::from_secs(5), durable).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("not confirmed within 5 s".to_owned()),
        },
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &written {
        tracing::error!(target: "fsp::admin", %who, %operation, error = %e, "the admin action could not be recorded in the audit trail");
    }
    written
}

/// The read-only views of what is loaded: `/admin/consumers`, `/admin/consumers/{id}`,
/// `/admin/services`, `/admin/config` (None: not one of them).
fn read_only(gw: &Gateway, path: &str) -> Option<Response<Full<Bytes>>> {
    let today = time::OffsetDateTime::now_utc().date();
    let snap = gw.snapshot.load();
    Some(match path {
        "/admin/consumers" => json(
            StatusCode::OK,
            crate::admin_views::consumers(&snap, &gw.suspensions.snapshot()),
        ),
        "/admin/services" => json(StatusCode::OK, crate::admin_views::services(&snap, today)),
        "/admin/config" => json(StatusCode::OK, gw.config_info.load().view(&gw.node)),
        _ => {
            let id = path.strip_prefix("/admin/consumers/")?;
            if id.is_empty() || id.contains('/') {
                return None;
            }
            match crate::admin_views::consumer(&snap, &gw.suspensions.snapshot(), id, today) {
                Some(view) => json(StatusCode::OK, view),
                None => json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": format!("no consumer with id {id} is configured")}),
                ),
            }
        }
    })
}

/// The methods an endpoint answers, for a 405 to a wrong one (None: no such endpoint).
fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/healthz"
        | "/readyz"
        | "/metrics"
        | "/admin/suspensions"
        | "/admin/stats"
        | "/admin/certificates"
        | "/admin/consumers"
        | "/admin/services"
        | "/admin/config" => Some("GET, HEAD"),
        "/admin/reload" => Some("POST"),
        _ if suspension_call(path).is_some() => Some("POST"),
        _ if path
            .strip_prefix("/admin/audit/")
            .is_some_and(|id| !id.is_empty()) =>
        {
            Some("GET, HEAD")
        }
        _ if path
            .strip_prefix("/admin/consumers/")
            .is_some_and(|id| !id.is_empty() && !id.contains('/')) =>
        {
            Some("GET, HEAD")
        }
        _ => None,
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = json(
        StatusCode::METHOD_NOT_ALLOWED,
        serde_json::json!({"error": format!("this endpoint answers {allow} only")}),
    );
    r.headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static(allow));
    r
}

/// `GET /admin/certificates[?within=DAYS]`: every certificate the configuration in force
/// uses, with where and until when; with `within`, those expiring within that many days
/// (or expired).
fn certificates(gw: &Gateway, query: Option<&str>) -> Response<Full<Bytes>> {
    let mut within: Option<i64> = None;
    for (key, value) in query
        .map(|q| url::form_urlencoded::parse(q.as_bytes()))
        .into_iter()
        .flatten()
    {
        match (key.as_ref(), value.parse::<i64>()) {
            ("within", Ok(days)) if (0..=36_500).contains(&days) => within = Some(days),
            ("within", _) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "within is a number of days from 0 to 36500"}),
                );
            }
            (other, _) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": format!("unknown parameter `{other}`: the only one is within=DAYS")}),
                );
            }
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let list: Vec<serde_json::Value> = gw
        .certificates
        .load()
        .iter()
        .filter(|c| within.is_none_or(|days| c.not_after < now + time::Duration::days(days)))
        .map(|c| {
            let days_left = c.days_left(now);
            serde_json::json!({
                "role": c.role,
                "path": c.path.display().to_string(),
                "subject": c.subject,
                "issuer": c.issuer,
                "sha256": c.sha256,
                "not_before": crate::pipeline::stamp::rfc3339_millis(c.not_before),
                "not_after": crate::pipeline::stamp::rfc3339_millis(c.not_after),
                "days_left": days_left,
                "expired": c.not_after < now,
            })
        })
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({"within_days": within, "certificates": list}),
    )
}

/// `/admin/{consumers|providers}/{id}/{suspend|resume}`.
fn suspension_call(path: &str) -> Option<(Party, &str, bool)> {
    let rest = path.strip_prefix("/admin/")?;
    let (kind, rest) = rest.split_once('/')?;
    let (id, action) = rest.rsplit_once('/')?;
    let party = match kind {
        "consumers" => Party::Consumer,
        "providers" => Party::Provider,
        _ => return None,
    };
    let suspend = match action {
        "suspend" => true,
        "resume" => false,
        _ => return None,
    };
    (!id.is_empty() && !id.contains('/')).then_some((party, id, suspend))
}

/// The longest reason a suspension may carry.
const MAX_REASON_CHARS: usize = 500;

/// The optional `{"reason": "..."}` body of a suspension or a resume.
async fn reason(req: Request<Incoming>) -> Result<Option<String>, String> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(req.into_body(), 4096);
    let body = match tokio::time::timeout(Duration::from_secs(10), limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return Err("the body must be at most 4096 bytes of JSON such as {\"reason\": \"suspected key leak, ticket 4711\"}".to_owned()),
        Err(_) => return Err("the body did not arrive within 10 s".to_owned()),
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        reason: Option<String>,
    }
    let parsed: Body = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "the body must be JSON such as {{\"reason\": \"suspected key leak, ticket 4711\"}}: {e}"
        )
    })?;
    let Some(reason) = parsed.reason.map(|r| r.trim().to_owned()) else {
        return Ok(None);
    };
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(format!(
            "the reason must be at most {MAX_REASON_CHARS} characters"
        ));
    }
    // Control characters, and the invisible ones that reorder or break a line in a
    // viewer (bidirectional overrides, line and paragraph separators, zero-width
    // characters): a reason must read the same everywhere it is shown.
    let hidden = |c: char| {
        c.is_control()
            || matches!(c as u32,
                0x00AD | 0x061C | 0x180E | 0x200B..=0x200F | 0x2028..=0x202E
                    | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB)
    };
    if reason.chars().any(hidden) {
        return Err("the reason must be one line of visible text (no control, bidirectional or zero-width characters)".to_owned());
    }
    Ok((!reason.is_empty()).then_some(reason))
}

async fn suspension(
    gw: &Gateway,
    party: Party,
    id: &str,
    suspend: bool,
    reason: Option<String>,
    who: &str,
    at: &str,
) -> (Response<Full<Bytes>>, Option<bool>) {
    let snap = gw.snapshot.load();
    let configured = match party {
        Party::Consumer => snap.consumers.get(id).is_some(),
        Party::Provider => snap.providers.iter().any(|p| p.id == id),
    };
    drop(snap);
    // A suspension outlives the removal of its party from the configuration (it would
    // apply again were the id configured again): it can still be lifted.
    let lifting_a_leftover = !suspend && {
        let in_force = gw.suspensions.snapshot();
        match party {
            Party::Consumer => in_force.consumers.contains_key(id),
            Party::Provider => in_force.providers.contains_key(id),
        }
    };
    let kind = party.as_str();
    if !configured && !lifting_a_leftover {
        return (
            json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": format!("no {kind} with id {id} is configured")}),
            ),
            None,
        );
    }
    let change = suspend.then(|| crate::suspend::Suspension {
        by: who.to_owned(),
        at: Some(at.to_owned()),
        reason: reason.clone(),
    });
    let mut outcome = None;
    let response = match gw.suspensions.set(party, id, change).await {
        Ok(crate::suspend::Changed { changed, record }) => {
            outcome = Some(changed);
            tracing::warn!(target: "fsp::admin", %who, kind, id, suspended = suspend, changed, reason = ?reason, %at, shared = gw.suspensions.is_shared(), "suspension changed");
            // What is in force: a suspension made before keeps its author, time and
            // reason.
            let (by, since, reason) = match &record {
                Some(r) => (Some(r.by.as_str()), r.at.as_deref(), r.reason.as_deref()),
                None => (None, None, None),
            };
            json(
                StatusCode::OK,
                serde_json::json!({
                    kind: id,
                    "suspended": suspend,
                    "changed": changed,
                    "at": at,
                    "suspension": record.as_ref().map(|_| serde_json::json!({"by": by, "at": since, "reason": reason})),
                    "reason": reason,
                }),
            )
        }
        Err(
            e @ (crate::suspend::ChangeError::ClusterUnavailable(_)
            | crate::suspend::ChangeError::ClusterUncertain(_)),
        ) => {
            tracing::error!(target: "fsp::admin", %who, kind, id, suspended = suspend, error = %e, "suspension change refused");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": e.to_string()}),
            )
        }
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": e.to_string()}),
        ),
    };
    (response, outcome)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An IPv6 client gets no more admin connections by rotating its interface
    /// identifier: its /64 counts as one address.
    #[test]
    fn admin_connections_are_counted_per_ipv6_64() {
        let per_ip = Arc::new(PerIp::default());
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let held: Vec<_> = (1..=2)
            .map(|i| per_ip.admit(ip(&format!("2001:db8:1:2::{i}")), 2).unwrap())
            .collect();
        assert!(per_ip.admit(ip("2001:db8:1:2:ffff::9"), 2).is_none());
        assert!(per_ip.admit(ip("2001:db8:1:3::1"), 2).is_some());
        drop(held);
        assert!(per_ip.admit(ip("2001:db8:1:2::7"), 2).is_some());
    }
}
