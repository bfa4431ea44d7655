//! The gateway's own pool of upstream connections, on real sockets: TLS towards a
//! provider that demands FSP's client certificate (HTTP/1.1 and HTTP/2 by ALPN),
//! kept-alive connections being reused, providers closing connections (idle, after an
//! answer, by HTTP/2 GOAWAY), responses abandoned halfway, and answers that come before
//! the request body has been sent. Hand-written providers ([`Scripted`]) control the
//! HTTP/1.1 bytes exactly: chunked, length and close framings, interim answers, answers
//! without a body, broken or cut-off answers, and the request framing the provider gets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use certs::devpki::{DevCa, Issued};
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The subject CN of the certificate FSP presents to providers.
const FSP_CLIENT_CN: &str = "fsp-gateway.int.example.be";

/// The `[[provider]]` keys for a TLS provider, with the files [`ProviderPki`] writes.
const PROVIDER_TLS: &str = r#"upstream_ca = "providers-ca.pem"
client_cert = "fsp-client.pem"
client_key  = "fsp-client.key""#;

/// Awaits `f`, failing the test when it takes longer than `secs`.
async fn within<F: Future>(what: &str, secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {secs} s"))
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    AnyBody,
>;

/// One GET through the gateway: status and whole body.
async fn call(c: &HttpsClient, url: &str) -> (StatusCode, Bytes) {
    let (status, _, body, _) = within(url, 15, send(c, get(url)))
        .await
        .unwrap_or_else(|e| panic!("{url}: no HTTP answer from the gateway: {e:?}"));
    (status, body)
}

/// A GET through the gateway that must answer 200 with exactly `expected`.
async fn call_ok(c: &HttpsClient, url: &str, expected: &str) {
    let (status, body) = call(c, url).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{url}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(body, expected, "{url}");
}

/// Sends `GET path` over a new HTTP/1.1 connection to the gateway, reads the head of
/// the answer (which must be 200) and hangs up in the middle of the body.
async fn abandon_after_head(pki: &Pki, port: u16, path: &str) {
    let mut tls = within("TLS to the gateway", 10, raw_tls(pki, &pki.consumer, port)).await;
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost:{port}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    within("the head of the answer", 10, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the gateway closed before the head");
            head.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

/// What a test upstream counts.
#[derive(Clone, Default)]
struct Counters {
    /// TCP connections accepted.
    connections: Arc<AtomicUsize>,
    /// Requests answered.
    requests: Arc<AtomicUsize>,
}

impl Counters {
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// The providers' side of the PKI, made now: the CA that signs provider certificates
/// (the gateway's `upstream_ca`) and the CA that signed FSP's client certificate (the
/// providers' trust anchor). Writes `providers-ca.pem`, `fsp-client.pem` and
/// `fsp-client.key` into the test's directory.
struct ProviderPki {
    providers_ca: DevCa,
    fsp_clients_ca: DevCa,
}

impl ProviderPki {
    fn new(pki: &Pki) -> Self {
        let providers_ca = DevCa::new("Test Providers CA").unwrap();
        let fsp_clients_ca = DevCa::new("Test FSP Clients CA").unwrap();
        let fsp_client = fsp_clients_ca.client(FSP_CLIENT_CN).unwrap();
        std::fs::write(pki.path().join("providers-ca.pem"), providers_ca.cert_pem()).unwrap();
        std::fs::write(pki.path().join("fsp-client.pem"), &fsp_client.cert_pem).unwrap();
        std::fs::write(pki.path().join("fsp-client.key"), &fsp_client.key_pem).unwrap();
        Self {
            providers_ca,
            fsp_clients_ca,
        }
    }

    /// A provider's server certificate for localhost.
    fn server(&self) -> Issued {
        self.providers_ca
            .server(&["localhost", "127.0.0.1"])
            .unwrap()
    }
}

/// A configuration with `threads` worker threads, one provider `prov` (with the given
/// extra keys, e.g. its TLS files), one family `up` and one REST service per
/// `(service id, upstream URL)`, each with a v1 and an authorisation for the consumer.
fn gateway_config(
    pki: &Pki,
    port: u16,
    admin_port: u16,
    threads: usize,
    provider_keys: &str,
    services: &[(&str, String)],
) -> PathBuf {
    std::fs::write(
        pki.path().join("admin-tokens"),
        "test-admin-token-0123456789\n",
    )
    .unwrap();
    let mut config = format!(
        r#"
environment = "INT"
node = "test-node"

[listener]
address     = "127.0.0.1:{port}"
public_url  = "https://localhost:{port}"
server_cert = "server.pem"
server_key  = "server.key"
client_ca   = "ca.pem"
threads     = {threads}

[admin]
address     = "127.0.0.1:{admin_port}"
tokens_file = "admin-tokens"

[audit]
backend = "file"
dir     = "audit"

[[provider]]
id   = "prov"
name = "Test provider"
response_timeout = "5s"
connect_timeout = "2s"
{provider_keys}

[[family]]
id       = "up"
provider = "prov"
"#
    );
    for (id, upstream) in services {
        config.push_str(&format!(
            r#"
[[family.service]]
id       = "{id}"
protocol = "rest"

[[family.service.version]]
version  = "v1"
upstream = "{upstream}"
released = 2025-01-01
"#
        ));
    }
    config.push_str(&format!(
        r#"
[[consumer]]
id           = "ville-bxl"
organisation = "Ville de Bruxelles"
certificates = [ {{ cn = "{CONSUMER_CN}" }} ]
"#
    ));
    for (id, _) in services {
        config.push_str(&format!(
            r#"
[[authorisation]]
id          = "bxl-{id}"
consumer    = "ville-bxl"
service     = "up/{id}"
purpose     = "pool-test"
legal_basis = {{ kind = "deliberation", reference = "CSI/20/123" }}
provider_approval = "PROV-1"
valid_from  = 2020-01-01
"#
        ));
    }
    let path = pki.path().join("fsp.toml");
    std::fs::write(&path, config).unwrap();
    path
}

// Field order matters: the gateway stops before its directory is removed.
struct Setup {
    gw: Gateway,
    pki: Pki,
}

async fn start(
    pki: Pki,
    threads: usize,
    provider_keys: &str,
    services: &[(&str, String)],
) -> Setup {
    let config = gateway_config(&pki, 0, 0, threads, provider_keys, services);
    let gw = Gateway::start(&config).await;
    Setup { gw, pki }
}

fn text(body: impl Into<Bytes>) -> AnyBody {
    Full::new(body.into()).boxed_unsync()
}

/// An HTTPS provider on loopback presenting `server` and requiring a client certificate
/// that chains to `client_ca_pem`. It offers `alpn`, answers `…/big?bytes=N` with N
/// bytes of `x` and any other request with JSON naming the HTTP version, the ALPN
/// protocol, the client certificate's CN and the path. With `max_requests`, it shuts a
/// connection down gracefully (HTTP/2: GOAWAY) once it has had that many requests.
async fn tls_upstream(
    server: &Issued,
    client_ca_pem: &str,
    alpn: &[&[u8]],
    max_requests: Option<usize>,
) -> (u16, Counters) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(client_ca_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        certs::provider(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let counters = Counters::default();
    let c = counters.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            c.connections.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let requests = c.requests.clone();
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let (_, session) = tls.get_ref();
                let peer_cn = session
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| certs::identity::common_name(leaf));
                let alpn = session
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let on_this_connection = Arc::new(AtomicUsize::new(0));
                let (limit_reached, mut at_limit) = tokio::sync::mpsc::unbounded_channel::<()>();
                let svc = service_fn(move |req: Request<Incoming>| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let n = on_this_connection.fetch_add(1, Ordering::SeqCst) + 1;
                    if Some(n) == max_requests {
                        let _ = limit_reached.send(());
                    }
                    let r = if req.uri().path().ends_with("/big") {
                        let n: u64 = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("bytes="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(1024);
                        Response::new(Generated::new(n).boxed_unsync())
                    } else {
                        let body = serde_json::json!({
                            "version": format!("{:?}", req.version()),
                            "peer_cn": peer_cn,
                            "alpn": alpn,
                            "path": req.uri().path(),
                        });
                        let mut r = Response::new(text(body.to_string()));
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        r
                    };
                    std::future::ready(Ok::<_, Infallible>(r))
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tls), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    Some(()) = at_limit.recv() => {}
                }
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            });
        }
    });
    (port, counters)
}

/// A plain-HTTP provider that answers `ok {path}` and counts its connections. With
/// `idle_close`, a kept-alive connection on which no request starts within that time is
/// closed by the provider.
async fn counting_upstream(idle_close: Option<Duration>) -> (SocketAddr, Counters) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counters = Counters::default();
    let c = counters.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            c.connections.fetch_add(1, Ordering::SeqCst);
            let requests = c.requests.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let body = format!("ok {}", req.uri().path());
                    std::future::ready(Ok::<_, Infallible>(Response::new(text(body))))
                });
                let mut b = hyper::server::conn::http1::Builder::new();
                if let Some(idle) = idle_close {
                    // Hyper starts this timer whenever it waits for a request head,
                    // including on an idle kept-alive connection.
                    b.timer(TokioTimer::new()).header_read_timeout(idle);
                }
                let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    (addr, counters)
}

/// Reads from `tcp` into `buf` until `done(buf)` holds; `false` when the connection
/// ends (or stays silent for 10 s) first.
async fn read_until(tcp: &mut TcpStream, buf: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    while !done(buf) {
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
    true
}

/// Reads one request head from `tcp` (with what follows it left in `buf`): the
/// lower-cased head, or `None` when the connection ends first.
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let end_of_head = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n");
    if !read_until(tcp, buf, |b| end_of_head(b).is_some()).await {
        return None;
    }
    let end = end_of_head(buf)? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end);
    Some(head)
}

/// Reads one CRLF-terminated line from `tcp` (returned without its CRLF); `None` when the
/// connection ends first.
async fn read_line(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let eol = |b: &[u8]| b.windows(2).position(|w| w == b"\r\n");
    if !read_until(tcp, buf, |b| eol(b).is_some()).await {
        return None;
    }
    let end = eol(buf)?;
    let line = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 2);
    Some(line)
}

/// Reads the body of the request whose head is `head` (Content-Length or chunked) and
/// returns it without its chunked framing; `None` when the connection ends first or the
/// chunked framing is broken.
async fn read_body(tcp: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Option<Vec<u8>> {
    if head.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let size_line = read_line(tcp, buf).await?;
            let size = size_line.split(';').next()?.trim();
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                // Trailer fields, up to an empty line.
                while !read_line(tcp, buf).await?.is_empty() {}
                return Some(body);
            }
            if !read_until(tcp, buf, |b| b.len() >= size + 2).await
                || buf[size..size + 2] != *b"\r\n"
            {
                return None;
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if !read_until(tcp, buf, |b| b.len() >= length).await {
        return None;
    }
    Some(buf.drain(..length).collect())
}

/// A 200 answer with a Content-Length (and no `Connection: close`: it looks reusable).
fn answer(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A hand-written plain-HTTP provider. `one_shot`: it answers each connection's first
/// request (`ok {path}`, after reading its body) and then closes the connection without
/// having announced it. Otherwise it answers each request (`early {path}`) as soon as
/// its head has arrived and only then reads the request body, keeping the connection
/// alive for the next request.
async fn raw_upstream(one_shot: bool) -> (SocketAddr, Counters) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counters = Counters::default();
    let c = counters.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            c.connections.fetch_add(1, Ordering::SeqCst);
            let requests = c.requests.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = read_head(&mut tcp, &mut buf).await {
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    if one_shot {
                        // The whole request is read, so that closing sends a FIN, not
                        // a reset.
                        if read_body(&mut tcp, &mut buf, &head).await.is_none() {
                            return;
                        }
                        requests.fetch_add(1, Ordering::SeqCst);
                        let _ = tcp
                            .write_all(answer(&format!("ok {path}")).as_bytes())
                            .await;
                        let _ = tcp.shutdown().await;
                        return;
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    if tcp
                        .write_all(answer(&format!("early {path}")).as_bytes())
                        .await
                        .is_err()
                        || read_body(&mut tcp, &mut buf, &head).await.is_none()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, counters)
}

/// One request as a [`Scripted`] provider read it.
#[derive(Debug, Clone)]
struct Received {
    /// Which of the provider's TCP connections carried it, counted from 0 in accept order.
    conn: usize,
    /// The request line and header fields, lower-cased.
    head: String,
    /// The body, without its chunked framing if it had one.
    body: Vec<u8>,
}

impl Received {
    fn method(&self) -> &str {
        self.head.split_whitespace().next().unwrap_or("")
    }

    fn path(&self) -> &str {
        self.head.split_whitespace().nth(1).unwrap_or("")
    }

    /// Every value of the header field `name` (lower-case), in order.
    fn values(&self, name: &str) -> Vec<&str> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim() == name)
            .map(|(_, v)| v.trim())
            .collect()
    }
}

/// How a [`Scripted`] provider answers one request.
struct Reply {
    /// The bytes written, exactly as they are.
    wire: Vec<u8>,
    /// Written 1, 2, 3, 1, 2, 3… bytes at a time, each piece flushed and followed by a
    /// pause, instead of at once.
    trickle: bool,
    /// The provider closes the connection once the answer is written (without saying so
    /// unless `wire` does).
    close: bool,
}

impl Reply {
    fn new(wire: impl Into<Vec<u8>>) -> Self {
        Self {
            wire: wire.into(),
            trickle: false,
            close: false,
        }
    }

    fn trickled(self) -> Self {
        Self {
            trickle: true,
            ..self
        }
    }

    fn then_close(self) -> Self {
        Self {
            close: true,
            ..self
        }
    }

    async fn write(&self, tcp: &mut TcpStream) -> std::io::Result<()> {
        if !self.trickle {
            tcp.write_all(&self.wire).await?;
            return tcp.flush().await;
        }
        let mut rest = &self.wire[..];
        for step in 0.. {
            if rest.is_empty() {
                break;
            }
            let n = (step % 3 + 1).min(rest.len());
            tcp.write_all(&rest[..n]).await?;
            tcp.flush().await?;
            rest = &rest[n..];
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

/// A provider on loopback that speaks hand-written HTTP/1.1 over plain TCP, so that
/// what goes on the wire is exactly what a test says: it reads each request (head and
/// body), records it, and writes the bytes `reply` gives for it; it serves requests on a
/// connection until the gateway closes it or a reply ends with closing it.
struct Scripted {
    addr: SocketAddr,
    counters: Counters,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Scripted {
    async fn start(reply: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Counters::default();
        let received = Arc::new(Mutex::new(Vec::new()));
        let reply = Arc::new(reply);
        let (c, log) = (counters.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                tcp.set_nodelay(true).unwrap();
                let conn = c.connections.fetch_add(1, Ordering::SeqCst);
                let (requests, log, reply) = (c.requests.clone(), log.clone(), reply.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(head) = read_head(&mut tcp, &mut buf).await {
                        let Some(body) = read_body(&mut tcp, &mut buf, &head).await else {
                            return;
                        };
                        let request = Received { conn, head, body };
                        let answer = reply(&request);
                        // Recorded before answering: once the consumer has its answer,
                        // the test can look at the request.
                        log.lock().unwrap().push(request);
                        requests.fetch_add(1, Ordering::SeqCst);
                        if answer.write(&mut tcp).await.is_err() {
                            return;
                        }
                        if answer.close {
                            let _ = tcp.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            counters,
            received,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The connection each request came on, in the order the requests came.
    fn conns(&self) -> Vec<usize> {
        self.received().iter().map(|r| r.conn).collect()
    }

    /// A gateway with one worker thread (so that every call uses the same pool), whose
    /// service `up/raw` forwards `/up/raw/v1{rest}` to this provider's `/raw{rest}`; and
    /// an HTTP/1.1 consumer client.
    async fn behind_gateway(&self) -> (Setup, HttpsClient) {
        let s = start(
            Pki::new(),
            1,
            "",
            &[("raw", format!("http://{}/raw", self.addr))],
        )
        .await;
        let c = client(&s.pki, Some(&s.pki.consumer), false);
        (s, c)
    }
}

/// What the consumer got for one request.
struct Got {
    status: StatusCode,
    headers: http::HeaderMap,
    /// The whole body, or why it could not be read whole.
    body: Result<Bytes, String>,
}

/// Sends `req` through the gateway and reads the whole answer, within a few seconds;
/// `Err` when no answer head came.
async fn fetch(c: &HttpsClient, req: Request<AnyBody>) -> Result<Got, String> {
    let what = format!("{} {}", req.method(), req.uri());
    within(&what, 8, async {
        let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("{e:?}"));
        Ok(Got {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    })
    .await
}

/// [`fetch`] for a call that must succeed: a 200 and a whole body.
async fn fetch_ok(c: &HttpsClient, req: Request<AnyBody>) -> (http::HeaderMap, Bytes) {
    let what = format!("{} {}", req.method(), req.uri());
    let got = fetch(c, req)
        .await
        .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
    let body = got
        .body
        .unwrap_or_else(|e| panic!("{what}: {} with a broken body: {e}", got.status));
    assert_eq!(
        got.status,
        StatusCode::OK,
        "{what}: {}",
        String::from_utf8_lossy(&body)
    );
    (got.headers, body)
}

/// A request body delivered in `pieces`, each after a `Pending`, whose size is not known
/// beforehand: an HTTP/1.1 client sends it chunked.
struct Unsized {
    pieces: VecDeque<Bytes>,
    ready: bool,
}

impl Unsized {
    fn body(pieces: &[&[u8]]) -> AnyBody {
        Self {
            pieces: pieces.iter().map(|p| Bytes::copy_from_slice(p)).collect(),
            ready: false,
        }
        .boxed_unsync()
    }
}

impl http_body::Body for Unsized {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.pieces.is_empty() {
            return Poll::Ready(None);
        }
        if !std::mem::replace(&mut self.ready, false) {
            self.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(
            self.pieces
                .pop_front()
                .map(|p| Ok(http_body::Frame::data(p))),
        )
    }
}

#[tokio::test]
async fn tls_provider_with_upstream_ca_and_fsp_client_certificate() {
    let pki = Pki::new();
    let ppki = ProviderPki::new(&pki);
    let trust = ppki.fsp_clients_ca.cert_pem();
    let (h1_port, h1) = tls_upstream(&ppki.server(), &trust, &[b"http/1.1"], None).await;
    let (h2_port, h2) = tls_upstream(&ppki.server(), &trust, &[b"h2", b"http/1.1"], None).await;
    // A provider whose certificate some other CA signed.
    let rogue_ca = DevCa::new("Not The Providers CA").unwrap();
    let rogue_cert = rogue_ca.server(&["localhost", "127.0.0.1"]).unwrap();
    let (rogue_port, rogue) = tls_upstream(&rogue_cert, &trust, &[b"h2", b"http/1.1"], None).await;

    let s = start(
        pki,
        2,
        PROVIDER_TLS,
        &[
            ("h1", format!("https://localhost:{h1_port}/api")),
            ("h2", format!("https://localhost:{h2_port}/api")),
            ("rogue", format!("https://localhost:{rogue_port}/api")),
        ],
    )
    .await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);

    for (service, counters, version, alpn) in [
        ("h1", &h1, "HTTP/1.1", "http/1.1"),
        ("h2", &h2, "HTTP/2.0", "h2"),
    ] {
        for i in 0..5 {
            let url = s.gw.url(&format!("/up/{service}/v1/items/{i}"));
            let (status, body) = call(&c, &url).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "{service}: {}",
                String::from_utf8_lossy(&body)
            );
            let seen = json(&body);
            assert_eq!(seen["path"], format!("/api/items/{i}"), "{service}: {seen}");
            assert_eq!(seen["peer_cn"], FSP_CLIENT_CN, "{service}: {seen}");
            assert_eq!(seen["alpn"], alpn, "{service}: {seen}");
            assert_eq!(seen["version"], version, "{service}: {seen}");
        }
        assert_eq!(counters.requests(), 5, "{service}");
        // Five calls one after the other over one consumer connection (so on one worker
        // thread) share one pooled provider connection; allow for one more.
        assert!(
            counters.connections() <= 2,
            "{service}: {} TLS connections for 5 sequential calls",
            counters.connections()
        );
    }

    let (status, body) = call(&c, &s.gw.url("/up/rogue/v1/items/1")).await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(json(&body)["code"], "FSP-UPSTREAM-UNAVAILABLE");
    assert!(rogue.connections() >= 1, "the gateway did try the provider");
    assert_eq!(
        rogue.requests(),
        0,
        "nothing is sent over an untrusted TLS session"
    );

    // The trusted providers still answer after the failure.
    let (status, _) = call(&c, &s.gw.url("/up/h2/v1/again")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn kept_alive_connections_are_reused() {
    const THREADS: usize = 2;
    const CLIENTS: usize = 8;
    const CALLS: usize = 25;
    let (up, counters) = counting_upstream(None).await;
    let s = start(
        Pki::new(),
        THREADS,
        "",
        &[("count", format!("http://{up}/count"))],
    )
    .await;

    let c = client(&s.pki, Some(&s.pki.consumer), false);
    for i in 0..200 {
        let url = s.gw.url(&format!("/up/count/v1/seq/{i}"));
        call_ok(&c, &url, &format!("ok /count/seq/{i}")).await;
    }
    let sequential = counters.connections();
    assert_eq!(counters.requests(), 200);
    assert!(
        sequential <= 4,
        "200 sequential calls opened {sequential} provider connections"
    );

    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..CLIENTS {
        let c = client(&s.pki, Some(&s.pki.consumer), false);
        let base = s.gw.url(&format!("/up/count/v1/par/{k}"));
        tasks.spawn(async move {
            for i in 0..CALLS {
                call_ok(
                    &c,
                    &format!("{base}/{i}"),
                    &format!("ok /count/par/{k}/{i}"),
                )
                .await;
            }
        });
    }
    within("concurrent clients", 60, async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert_eq!(counters.requests(), 200 + CLIENTS * CALLS);
    let concurrent = counters.connections() - sequential;
    // At most one connection per call in flight on each worker thread.
    assert!(
        concurrent <= THREADS * CLIENTS + 4,
        "{CLIENTS} clients × {CALLS} calls opened {concurrent} more provider connections"
    );
}

#[tokio::test]
async fn provider_closing_idle_connections_is_not_an_error() {
    let (idle, idle_counters) = counting_upstream(Some(Duration::from_millis(100))).await;
    let (once, once_counters) = raw_upstream(true).await;
    let s = start(
        Pki::new(),
        2,
        "",
        &[
            ("idle", format!("http://{idle}/idle")),
            ("once", format!("http://{once}/once")),
        ],
    )
    .await;
    let c = client(&s.pki, Some(&s.pki.consumer), false);

    // Each call finds its pooled connection closed by the provider meanwhile.
    for i in 0..10 {
        let url = s.gw.url(&format!("/up/idle/v1/spaced/{i}"));
        call_ok(&c, &url, &format!("ok /idle/spaced/{i}")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(idle_counters.requests(), 10);
    assert!(
        idle_counters.connections() >= 5,
        "the provider closed its idle connections, yet only {} were opened",
        idle_counters.connections()
    );
    // Calls in quick succession still work (sharing a connection within the timeout).
    for i in 0..5 {
        let url = s.gw.url(&format!("/up/idle/v1/quick/{i}"));
        call_ok(&c, &url, &format!("ok /idle/quick/{i}")).await;
    }

    // A provider that closes every connection right after its first answer, without
    // announcing it: back-to-back calls, sequential then concurrent, are not failed.
    for i in 0..20 {
        let url = s.gw.url(&format!("/up/once/v1/seq/{i}"));
        call_ok(&c, &url, &format!("ok /once/seq/{i}")).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..8 {
        let c = client(&s.pki, Some(&s.pki.consumer), false);
        let base = s.gw.url(&format!("/up/once/v1/par/{k}"));
        tasks.spawn(async move {
            for i in 0..20 {
                call_ok(&c, &format!("{base}/{i}"), &format!("ok /once/par/{k}/{i}")).await;
            }
        });
    }
    within("concurrent clients", 60, async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert_eq!(once_counters.requests(), 20 + 8 * 20);
}

#[tokio::test]
async fn provider_ending_http2_connections_with_goaway_is_not_an_error() {
    let pki = Pki::new();
    let ppki = ProviderPki::new(&pki);
    let trust = ppki.fsp_clients_ca.cert_pem();
    // Like a server with a maximum number of requests per connection.
    let (port, counters) = tls_upstream(&ppki.server(), &trust, &[b"h2"], Some(5)).await;
    let s = start(
        pki,
        2,
        PROVIDER_TLS,
        &[("h2", format!("https://localhost:{port}/api"))],
    )
    .await;

    let c = client(&s.pki, Some(&s.pki.consumer), false);
    for i in 0..30 {
        let url = s.gw.url(&format!("/up/h2/v1/seq/{i}"));
        let (status, body) = call(&c, &url).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{url}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(json(&body)["path"], format!("/api/seq/{i}"));
    }
    // Each connection is shut down after its fifth request, but gracefully: a call sent
    // before the final GOAWAY arrived is still served on it (hyper's first GOAWAY names
    // no last stream, the second comes a ping later), so a connection may serve a few
    // more on a loaded machine. At most ten each: new connections were made.
    assert!(
        counters.connections() >= 3,
        "30 calls, about 5 per connection, yet {} connections",
        counters.connections()
    );
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..8 {
        let c = client(&s.pki, Some(&s.pki.consumer), false);
        let base = s.gw.url(&format!("/up/h2/v1/par/{k}"));
        tasks.spawn(async move {
            for i in 0..20 {
                let url = format!("{base}/{i}");
                let (status, body) = call(&c, &url).await;
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{url}: {}",
                    String::from_utf8_lossy(&body)
                );
                assert_eq!(json(&body)["path"], format!("/api/par/{k}/{i}"));
            }
        });
    }
    within("concurrent clients", 60, async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert_eq!(counters.requests(), 30 + 8 * 20);
}

#[tokio::test]
async fn a_response_read_halfway_does_not_poison_the_pool() {
    const BIG: u64 = 10 * 1024 * 1024;
    let pki = Pki::new();
    let up = upstream().await;
    let config = write_config(&pki, up, 0, 0, "");
    let gw = Gateway::start(&config).await;
    let big = format!("/person/getPerson/v3/big?bytes={BIG}");

    // HTTP/1.1 consumers that read the head of a 10 MB answer and hang up. Several
    // connections, so that every worker thread is likely to see one.
    for _ in 0..4 {
        abandon_after_head(&pki, gw.port, &big).await;
    }
    // An HTTP/2 consumer that resets the stream after the head and keeps its connection.
    let h2 = client(&pki, Some(&pki.consumer), true);
    let resp = within("the big answer over h2", 10, h2.request(get(&gw.url(&big))))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = within("a first frame", 10, body.frame()).await;
    assert!(first.is_some_and(|f| f.is_ok()));
    drop(body);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Afterwards every call gets a whole, correct answer, on new consumer connections
    // (spread over the worker threads) and on the HTTP/2 one.
    for i in 0..20 {
        let c = if i % 4 == 3 {
            h2.clone()
        } else {
            client(&pki, Some(&pki.consumer), false)
        };
        if i % 2 == 0 {
            let (status, body) = call(&c, &gw.url("/person/getPerson/v3/big?bytes=100000")).await;
            assert_eq!(status, StatusCode::OK, "call {i}");
            assert_eq!(body.len(), 100_000, "call {i}");
            assert!(body.iter().all(|&b| b == b'x'), "call {i}: foreign bytes");
        } else {
            let (status, body) =
                call(&c, &gw.url(&format!("/person/getPerson/v3/after/{i}"))).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "call {i}: {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(
                json(&body)["path"],
                format!("/person/v3/after/{i}"),
                "call {i}"
            );
        }
    }
}

#[tokio::test]
async fn an_abandoned_http2_response_does_not_stall_the_shared_connection() {
    const BIG: u64 = 10 * 1024 * 1024;
    let pki = Pki::new();
    let ppki = ProviderPki::new(&pki);
    let trust = ppki.fsp_clients_ca.cert_pem();
    let (port, counters) = tls_upstream(&ppki.server(), &trust, &[b"h2"], None).await;
    // One worker thread: every call shares one HTTP/2 connection to the provider.
    let s = start(
        pki,
        1,
        PROVIDER_TLS,
        &[("h2", format!("https://localhost:{port}/api"))],
    )
    .await;
    // More abandoned megabytes than the connection's flow-control window.
    for _ in 0..6 {
        abandon_after_head(&s.pki, s.gw.port, &format!("/up/h2/v1/big?bytes={BIG}")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    for i in 0..10 {
        let (status, body) = call(&c, &s.gw.url("/up/h2/v1/big?bytes=3000000")).await;
        assert_eq!(status, StatusCode::OK, "call {i}");
        assert_eq!(body.len(), 3_000_000, "call {i}");
        let (status, body) = call(&c, &s.gw.url(&format!("/up/h2/v1/after/{i}"))).await;
        assert_eq!(status, StatusCode::OK, "call {i}");
        assert_eq!(json(&body)["version"], "HTTP/2.0");
    }
    assert!(
        counters.connections() <= 2,
        "{} connections",
        counters.connections()
    );
}

#[tokio::test]
async fn an_early_answer_does_not_lend_a_connection_still_sending_a_body() {
    let (up, counters) = raw_upstream(false).await;
    // One worker thread, so that both consumers use the same pool.
    let s = start(
        Pki::new(),
        1,
        "",
        &[("early", format!("http://{up}/early"))],
    )
    .await;

    // Consumer A announces 100 000 bytes, sends 1 000 and stalls; the provider has
    // answered already.
    let mut a = within(
        "TLS to the gateway",
        10,
        raw_tls(&s.pki, &s.pki.consumer, s.gw.port),
    )
    .await;
    let head = "POST /up/early/v1/a HTTP/1.1\r\nhost: localhost\r\n\
                content-type: application/octet-stream\r\ncontent-length: 100000\r\n\r\n";
    a.write_all(head.as_bytes()).await.unwrap();
    a.write_all(&[b'a'; 1000]).await.unwrap();
    let (status, body) = within("A's early answer", 10, read_response(&mut a)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "early /early/a");

    // Consumer B is not made to wait for A's body: the connection still carrying it
    // is not free for another call.
    let c = client(&s.pki, Some(&s.pki.consumer), false);
    let started = std::time::Instant::now();
    let (status, body) = call(&c, &s.gw.url("/up/early/v1/b")).await;
    let took = started.elapsed();
    assert_eq!(
        status,
        StatusCode::OK,
        "B, after {took:?} (requests the provider saw: {}): {}",
        counters.requests(),
        String::from_utf8_lossy(&body)
    );
    assert_eq!(body, "early /early/b");
    assert!(
        took < Duration::from_secs(2),
        "B waited {took:?} for A's body"
    );
    drop(a);
}

/// A provider's trailers never carry a platform field to the consumer (an HTTP/1.1
/// provider's trailer section is not passed on at all; the answer's body strips
/// `FSP-*` fields from any trailers it carries), read over HTTP/2, where trailers would
/// reach the consumer.
#[tokio::test]
async fn a_providers_trailers_carry_no_platform_field() {
    let wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nfsp-consumer: evil\r\nx-checksum: 42\r\n\r\n".to_vec();
    let p = Scripted::start(move |_| Reply::new(wire.clone())).await;
    let (s, _) = p.behind_gateway().await;
    let c = client(&s.pki, Some(&s.pki.consumer), true);
    let resp = c
        .request(get(&s.gw.url("/up/raw/v1/trailers")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(collected.to_bytes(), "hello");
    assert!(trailers.get("fsp-consumer").is_none(), "{trailers:?}");
}

#[tokio::test]
async fn a_trickled_chunked_answer_with_extensions_and_trailer_arrives_whole() {
    // Chunk data that looks like chunked framing, extensions (one with a quoted `;`,
    // one after whitespace), an upper-case hexadecimal size, and a trailer section.
    let long: Vec<u8> = (0..0xAB_u32).map(|i| b'a' + (i % 26) as u8).collect();
    let chunks: [(&str, &[u8]); 3] = [
        (";name=value", b"hello"),
        (" ; q=\"a;b\"", b", 0\r\n\r\nnot the end; "),
        (";x", &long),
    ];
    let mut wire =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let mut expected = Vec::new();
    for (ext, data) in chunks {
        wire.extend_from_slice(format!("{:X}{ext}\r\n", data.len()).as_bytes());
        wire.extend_from_slice(data);
        wire.extend_from_slice(b"\r\n");
        expected.extend_from_slice(data);
    }
    wire.extend_from_slice(b"0;last\r\nx-trailer: yes\r\nx-checksum: 42\r\n\r\n");
    assert!(String::from_utf8_lossy(&wire).contains("\r\nAB;x\r\n"));

    let p = Scripted::start(move |r| {
        let reply = Reply::new(wire.clone());
        if r.path().ends_with("/at-once") {
            reply
        } else {
            reply.trickled()
        }
    })
    .await;
    let (s, c) = p.behind_gateway().await;
    for path in ["trickled", "trickled", "at-once"] {
        let (headers, body) =
            fetch_ok(&c, get(&s.gw.url(&format!("/up/raw/v1/chunked/{path}")))).await;
        assert_eq!(
            body,
            expected,
            "{path}: {:?}",
            String::from_utf8_lossy(&body)
        );
        assert!(!headers.contains_key("x-trailer"), "{path}: {headers:?}");
    }
    assert_eq!(
        p.counters.connections(),
        1,
        "the later calls reuse the first's connection"
    );
    assert_eq!(p.conns(), [0, 0, 0]);
}

#[tokio::test]
async fn an_answer_ending_at_close_arrives_whole_and_the_next_call_connects_again() {
    let p = Scripted::start(|r| {
        if r.path().ends_with("/eof") {
            // Neither Content-Length nor chunked: the body ends when the connection does.
            Reply::new(&b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the very end\r\n\r\n(really)"[..])
                .trickled()
                .then_close()
        } else {
            Reply::new(answer("next"))
        }
    })
    .await;
    let (s, c) = p.behind_gateway().await;
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/eof"))).await;
    assert_eq!(body, "until the very end\r\n\r\n(really)");
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/next"))).await;
    assert_eq!(body, "next");
    assert_eq!(p.conns(), [0, 1], "the closed connection is not used again");
}

#[tokio::test]
async fn interim_answers_are_skipped() {
    let p = Scripted::start(|r| {
        let mut wire = b"HTTP/1.1 100 Continue\r\n\r\n\
                         HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n"
            .to_vec();
        wire.extend_from_slice(answer(&format!("final after {} bytes", r.body.len())).as_bytes());
        Reply::new(wire).trickled()
    })
    .await;
    let (s, c) = p.behind_gateway().await;
    let (headers, body) = fetch_ok(
        &c,
        post(&s.gw.url("/up/raw/v1/interim"), "text/plain", "ping"),
    )
    .await;
    assert_eq!(body, "final after 4 bytes");
    assert!(
        !headers.contains_key("link"),
        "the 103's field: {headers:?}"
    );
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/interim"))).await;
    assert_eq!(body, "final after 0 bytes");
    assert_eq!(p.conns(), [0, 0]);
}

#[tokio::test]
async fn answers_without_a_body_do_not_hang_and_keep_the_connection() {
    let p = Scripted::start(|r| {
        if r.method() == "head" {
            // The length a GET would have, and no body.
            Reply::new("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n")
        } else if r.path().ends_with("/nothing") {
            Reply::new("HTTP/1.1 204 No Content\r\nx-seen: yes\r\n\r\n")
        } else if r.path().ends_with("/unchanged") {
            // The length of the representation the client already has, and no body.
            Reply::new("HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 9\r\n\r\n")
        } else {
            Reply::new(answer("after"))
        }
    })
    .await;
    let (s, c) = p.behind_gateway().await;
    let url = s.gw.url("/up/raw/v1/thing");
    let head = Request::head(&url).body(text(Bytes::new())).unwrap();
    let (headers, body) = fetch_ok(&c, head).await;
    assert!(body.is_empty());
    assert_eq!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"5"[..]),
        "the HEAD answer's length is the provider's: {headers:?}"
    );
    let (_, body) = fetch_ok(&c, get(&url)).await;
    assert_eq!(body, "after");

    let got = fetch(&c, get(&s.gw.url("/up/raw/v1/nothing")))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::NO_CONTENT);
    assert_eq!(got.body.unwrap(), "");
    assert_eq!(got.headers.get("x-seen").unwrap(), "yes");
    let (_, body) = fetch_ok(&c, get(&url)).await;
    assert_eq!(body, "after");

    let got = fetch(&c, get(&s.gw.url("/up/raw/v1/unchanged")))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::NOT_MODIFIED);
    assert_eq!(got.body.unwrap(), "");
    assert_eq!(got.headers.get("etag").unwrap(), "\"v1\"");
    let (_, body) = fetch_ok(&c, get(&url)).await;
    assert_eq!(body, "after");

    assert_eq!(
        p.received()
            .iter()
            .map(|r| r.method().to_owned())
            .collect::<Vec<_>>(),
        ["head", "get", "get", "get", "get", "get"]
    );
    assert_eq!(p.conns(), [0; 6], "one connection for all the calls");
}

#[tokio::test]
async fn the_provider_receives_the_gateway_framing_and_its_own_host() {
    let p = Scripted::start(|_| Reply::new(answer("ok"))).await;
    let (s, c) = p.behind_gateway().await;
    let sized: Vec<u8> = (0..20_000_u32).map(|i| (i % 251) as u8).collect();
    // Pieces larger and smaller than what the gateway copies next to the framing, and
    // data that looks like the end of a chunked body.
    let big: Vec<u8> = (0..40_000_u32).map(|i| (i % 241) as u8).collect();
    let pieces: [&[u8]; 5] = [b"first ", b"0\r\n\r\n", &big, b"", b" last"];

    // With fields about the consumer's own connection, which are not the provider's.
    let mut plain_get = get(&s.gw.url("/up/raw/v1/get"));
    for (name, value) in [
        ("connection", "keep-alive, x-hop"),
        ("keep-alive", "timeout=5"),
        ("x-hop", "for the gateway only"),
        ("x-end-to-end", "kept"),
    ] {
        plain_get.headers_mut().insert(name, value.parse().unwrap());
    }
    fetch_ok(&c, plain_get).await;
    fetch_ok(&c, post(&s.gw.url("/up/raw/v1/empty"), "text/plain", "")).await;
    let no_length = Request::post(s.gw.url("/up/raw/v1/unsized"))
        .header("content-type", "application/octet-stream")
        .body(Unsized::body(&pieces))
        .unwrap();
    fetch_ok(&c, no_length).await;
    let with_length = Request::post(s.gw.url("/up/raw/v1/sized"))
        .header("content-type", "application/octet-stream")
        .body(text(sized.clone()))
        .unwrap();
    fetch_ok(&c, with_length).await;

    let seen = p.received();
    assert_eq!(
        seen.iter().map(|r| r.path()).collect::<Vec<_>>(),
        ["/raw/get", "/raw/empty", "/raw/unsized", "/raw/sized"]
    );
    let host = format!("127.0.0.1:{}", p.addr.port());
    for r in &seen {
        assert_eq!(r.values("host"), [host.as_str()], "{}", r.head);
    }
    let [get, empty, chunked, sized_seen] = &seen[..] else {
        unreachable!()
    };
    assert!(get.values("content-length").is_empty(), "{}", get.head);
    assert!(get.values("transfer-encoding").is_empty(), "{}", get.head);
    assert!(get.body.is_empty());
    for hop in ["connection", "keep-alive", "x-hop"] {
        assert!(get.values(hop).is_empty(), "{hop}: {}", get.head);
    }
    assert_eq!(get.values("x-end-to-end"), ["kept"], "{}", get.head);

    assert_eq!(empty.values("content-length"), ["0"], "{}", empty.head);
    assert!(
        empty.values("transfer-encoding").is_empty(),
        "{}",
        empty.head
    );
    assert!(empty.body.is_empty());

    assert_eq!(
        chunked.values("transfer-encoding"),
        ["chunked"],
        "{}",
        chunked.head
    );
    assert!(
        chunked.values("content-length").is_empty(),
        "{}",
        chunked.head
    );
    assert_eq!(chunked.body, pieces.concat(), "the decoded body");

    assert_eq!(
        sized_seen.values("content-length"),
        ["20000"],
        "{}",
        sized_seen.head
    );
    assert!(
        sized_seen.values("transfer-encoding").is_empty(),
        "{}",
        sized_seen.head
    );
    assert_eq!(sized_seen.body, sized);
    assert_eq!(
        p.conns(),
        [0, 0, 0, 0],
        "each request was sent whole and reused"
    );
}

#[tokio::test]
async fn answers_that_are_not_http_1_1_give_502() {
    let p = Scripted::start(|r| {
        if r.path().ends_with("/garbage") {
            Reply::new("garbage\r\n\r\n")
        } else if r.path().ends_with("/lengths") {
            Reply::new("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd")
        } else {
            Reply::new(answer("fine"))
        }
    })
    .await;
    let (s, c) = p.behind_gateway().await;
    let mut details = Vec::new();
    for (path, says) in [
        ("/up/raw/v1/garbage", "not valid HTTP/1.1"),
        ("/up/raw/v1/lengths", "conflicting Content-Length"),
    ] {
        let got = fetch(&c, get(&s.gw.url(path))).await.unwrap();
        let body = got.body.unwrap();
        assert_eq!(
            got.status,
            StatusCode::BAD_GATEWAY,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            got.headers.get("content-type").unwrap(),
            "application/problem+json"
        );
        let problem = json(&body);
        assert_eq!(problem["code"], "FSP-UPSTREAM-UNAVAILABLE", "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("not valid HTTP/1.1"), "{path}: {detail}");
        assert!(detail.contains(says), "{path}: {detail}");
        details.push(detail.to_owned());
    }
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/fine"))).await;
    assert_eq!(body, "fine");
    // Neither broken answer was sent twice, nor its connection used again.
    assert_eq!(p.conns(), [0, 1, 2]);
    // Each reason is given once: a cause is not repeated by every error wrapping it.
    for detail in details {
        assert_eq!(detail.matches("not valid HTTP/1.1").count(), 1, "{detail}");
    }
}

#[tokio::test]
async fn an_answer_with_connection_close_is_the_last_on_its_connection() {
    let p = Scripted::start(|r| {
        if r.path().ends_with("/last") {
            // The provider says close, but leaves the connection open.
            Reply::new("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nfirst")
        } else {
            Reply::new(answer("second"))
        }
    })
    .await;
    let (s, c) = p.behind_gateway().await;
    let (headers, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/last"))).await;
    assert_eq!(body, "first");
    assert!(
        !headers.contains_key("connection"),
        "a hop-by-hop field reached the consumer: {headers:?}"
    );
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/next"))).await;
    assert_eq!(body, "second");
    assert_eq!(p.conns(), [0, 1]);
}

#[tokio::test]
async fn a_connection_closed_silently_after_its_answer_is_not_used_again() {
    // Every answer looks reusable, and the provider then closes its connection.
    let p = Scripted::start(|r| Reply::new(answer(&format!("ok {}", r.path()))).then_close()).await;
    let (s, c) = p.behind_gateway().await;
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/one"))).await;
    assert_eq!(body, "ok /raw/one");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/two"))).await;
    assert_eq!(body, "ok /raw/two");
    // A POST is not sent again if its connection turns out to be closed: the pool must
    // have noticed the close while the connection was idle.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, body) = fetch_ok(&c, post(&s.gw.url("/up/raw/v1/three"), "text/plain", "3")).await;
    assert_eq!(body, "ok /raw/three");
    // Right after the answer, the close may not be seen yet: a GET then goes out
    // again on a new connection if its pooled one turns out to be closed.
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/four"))).await;
    assert_eq!(body, "ok /raw/four");
    assert_eq!(p.conns(), [0, 1, 2, 3]);
    assert_eq!(p.counters.requests(), 4);
}

#[tokio::test]
async fn a_chunked_answer_cut_off_midway_fails_the_consumer_response_only() {
    // A first chunk, then 7 bytes of a 16-byte one, then the end of the connection.
    const CUT: &str =
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nonly 7 ";
    let p = Scripted::start(|r| match r.path() {
        "/raw/cut" => Reply::new(CUT).then_close(),
        "/raw/cut-slowly" => Reply::new(CUT).trickled().then_close(),
        _ => Reply::new(answer("whole")),
    })
    .await;
    let (s, c) = p.behind_gateway().await;

    // Written at once, the answer breaks before the gateway has sent anything of it:
    // the consumer may get no head at all; it must not get a complete answer.
    if let Ok(got) = fetch(&c, get(&s.gw.url("/up/raw/v1/cut"))).await {
        assert!(
            got.body.is_err(),
            "the consumer got a complete answer: {} {:?}",
            got.status,
            got.body
        );
    }
    let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/after"))).await;
    assert_eq!(body, "whole");

    // Trickled in, the head and the first chunk reach the consumer before the cut: the
    // body then fails instead of ending.
    let got = fetch(&c, get(&s.gw.url("/up/raw/v1/cut-slowly")))
        .await
        .unwrap_or_else(|e| panic!("no head: {e}"));
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        got.body.is_err(),
        "the consumer got a complete answer: {:?}",
        got.body
    );

    for _ in 0..2 {
        let (_, body) = fetch_ok(&c, get(&s.gw.url("/up/raw/v1/after"))).await;
        assert_eq!(body, "whole");
    }
    // A cut connection is not used again: the slow cut came on the connection pooled
    // after the first whole answer, and the next calls needed a new one.
    assert_eq!(p.conns(), [0, 1, 1, 2, 2]);
}
