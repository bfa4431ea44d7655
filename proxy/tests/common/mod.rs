//! Test harness: the gateway in this process or as an `fsp` process, real TLS with
//! certificates made now by rcgen, real upstream servers on loopback.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use certs::devpki::{DevCa, Issued};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

pub const CONSUMER_CN: &str = "monopinion.bruxelles.be";

/// A development PKI written to a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub consumer: Issued,
    pub stranger: Issued,
    pub expired: Issued,
    pub foreign: Issued,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("Test Consumers CA").unwrap();
        let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.path().join("server.key"), &server.key_pem).unwrap();
        let consumer = ca.client(CONSUMER_CN).unwrap();
        let stranger = ca.client("unknown.example.be").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let expired = ca
            .client_valid(
                CONSUMER_CN,
                now - time::Duration::days(30),
                now - time::Duration::days(1),
            )
            .unwrap();
        let other_ca = DevCa::new("Some Other CA").unwrap();
        let foreign = other_ca.client(CONSUMER_CN).unwrap();
        Self {
            dir,
            ca,
            consumer,
            stranger,
            expired,
            foreign,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// What the echo upstream saw of a request.
pub fn echo_json(req: &Request<Incoming>, body_len: u64) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
            )
        })
        .collect();
    serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
        "body_len": body_len,
    })
}

/// A body of `total` bytes produced chunk by chunk, never held whole.
pub struct Generated {
    chunk: Bytes,
    left: u64,
}

impl Generated {
    pub fn new(total: u64) -> Self {
        Self {
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
            left: total,
        }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }
    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

pub type AnyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The HTTPS client of these tests (see [`client`]).
pub type TestClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, AnyBody>;

pub fn full(b: impl Into<Bytes>) -> AnyBody {
    Full::new(b.into()).boxed_unsync()
}

/// The upstream used by the tests, plain HTTP on loopback:
/// - `POST /sink`: counts the body as it streams in, answers the count;
/// - `GET /big?bytes=N`: streams N bytes;
/// - `POST /soap...`: a SOAP 1.1 response with its own Header;
/// - `GET /slow`: answers after 5 s;
/// - anything else: echoes method, path, query and headers as JSON.
pub async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    let resp: Response<AnyBody> = if path.ends_with("/sink") {
                        let mut body = req.into_body();
                        let mut n = 0u64;
                        while let Some(frame) = body.frame().await {
                            // The gateway cuts a body that breaks its size limit.
                            let Ok(frame) = frame else { break };
                            if let Ok(d) = frame.into_data() {
                                n += d.len() as u64;
                            }
                        }
                        Response::new(full(format!("{{\"received\":{n}}}")))
                    } else if path.ends_with("/big") {
                        let n: u64 = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("bytes="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(1024);
                        Response::new(Generated::new(n).boxed_unsync())
                    } else if path.contains("/soap") {
                        let mut r = Response::new(full(
                            "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Header><x:Own xmlns:x=\"urn:x\">1</x:Own></s:Header><s:Body><ok/></s:Body></s:Envelope>",
                        ));
                        r.headers_mut()
                            .insert("content-type", "text/xml; charset=utf-8".parse().unwrap());
                        r
                    } else if path.ends_with("/nocontent") {
                        let mut r = Response::new(full(""));
                        *r.status_mut() = http::StatusCode::NO_CONTENT;
                        r
                    } else if path.ends_with("/slow") {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        Response::new(full("late"))
                    } else {
                        let v = echo_json(&req, 0);
                        let mut r = Response::new(full(v.to_string()));
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        r.headers_mut()
                            .insert("connection", "keep-alive, x-hop".parse().unwrap());
                        r.headers_mut()
                            .insert("x-hop", "must not reach the consumer".parse().unwrap());
                        r
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A free loopback port (bound then released).
/// A port nothing listens on now, and that this test process has not handed out
/// before: the kernel may give a port back as soon as its probe is closed, and two
/// calls in a row (a gateway's consumer and admin ports) must not get the same one.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Writes a configuration with one REST service `person/getPerson` (v3 live, v2
/// deprecated, v1 retired) and one SOAP service `person/getPersonSoap` (v1), all on the
/// given upstream, plus whatever `extra` TOML is appended.
pub fn write_config(
    pki: &Pki,
    upstream: SocketAddr,
    port: u16,
    admin_port: u16,
    extra: &str,
) -> PathBuf {
    write_config_with(pki, upstream, port, admin_port, "", "", extra)
}

/// [`write_config`] with extra keys for the `[listener]` table and the provider.
pub fn write_config_with(
    pki: &Pki,
    upstream: SocketAddr,
    port: u16,
    admin_port: u16,
    listener_extra: &str,
    provider_extra: &str,
    extra: &str,
) -> PathBuf {
    let today = time::OffsetDateTime::now_utc().date();
    let d = |days: i64| {
        let x = today + time::Duration::days(days);
        format!("{:04}-{:02}-{:02}", x.year(), u8::from(x.month()), x.day())
    };
    std::fs::write(
        pki.path().join("admin-tokens"),
        "test-admin-token-0123456789\n",
    )
    .unwrap();
    let config = format!(
        r#"
environment = "INT"
node = "test-node"

[listener]
address     = "127.0.0.1:{port}"
public_url  = "https://fsp.int.example.be"
server_cert = "server.pem"
server_key  = "server.key"
client_ca   = "ca.pem"
max_request_bytes = 104857600
{listener_extra}

[admin]
address     = "127.0.0.1:{admin_port}"
tokens_file = "admin-tokens"

[audit]
backend = "file"
dir     = "audit"

[[provider]]
id   = "rrn"
name = "Registre national"
response_timeout = "2s"
connect_timeout = "1s"
{provider_extra}

[[family]]
id       = "person"
provider = "rrn"

[[family.service]]
id       = "getPerson"
protocol = "rest"

[[family.service.version]]
version  = "v3"
upstream = "http://{upstream}/person/v3"
released = {v3}

[[family.service.version]]
version    = "v2"
upstream   = "http://{upstream}/person/v2"
released   = {v2}
deprecated = {v3}
sunset     = {sunset2}

[[family.service.version]]
version    = "v1"
upstream   = "http://{upstream}/person/v1"
released   = {v1}
deprecated = {dep1}
sunset     = {sunset1}

[[family.service]]
id       = "getPersonSoap"
protocol = "soap"

[[family.service.version]]
version  = "v1"
upstream = "http://{upstream}/soap/v1"
released = {v2}

[[consumer]]
id           = "ville-bxl"
organisation = "Ville de Bruxelles"
certificates = [ {{ cn = "{cn}" }} ]

[[authorisation]]
id          = "bxl-person"
consumer    = "ville-bxl"
service     = "person/getPerson"
purpose     = "participation-vote"
legal_basis = {{ kind = "deliberation", reference = "CSI/20/123", issuer = "Comité de sécurité de l'information" }}
provider_approval = "RRN-2020-456"
valid_from  = 2020-01-01

[[authorisation]]
id          = "bxl-person-soap"
consumer    = "ville-bxl"
service     = "person/getPersonSoap"
purpose     = "participation-vote"
legal_basis = {{ kind = "deliberation", reference = "CSI/20/123" }}
provider_approval = "RRN-2020-456"
valid_from  = 2020-01-01
{extra}
"#,
        v3 = d(-100),
        v2 = d(-800),
        v1 = d(-1500),
        sunset2 = d(300),
        sunset1 = d(-10),
        dep1 = d(-700),
        cn = CONSUMER_CN,
    );
    let path = pki.path().join("fsp.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// CPU time (user + system) the process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces) are space-separated;
    // utime and stime are the 14th and 15th fields, in clock ticks (100 per second).
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A running gateway: in this process ([`Gateway::start`], on `127.0.0.1:0` listeners,
/// as linkerd2-proxy's integration harness runs its proxy), or as an `fsp serve` process
/// ([`Gateway::spawn`], for what only a process shows: signals, exit codes, descriptor
/// limits, its memory and CPU time).
pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    run: Run,
}

enum Run {
    Process(Option<Child>),
    InProcess {
        shutdown: tokio::sync::watch::Sender<bool>,
        /// Says whether the gateway drained and flushed without an error.
        thread: Option<std::thread::JoinHandle<bool>>,
    },
}

impl Gateway {
    /// Starts the gateway of `config` inside this process, on a thread of its own, and
    /// returns once it is ready. The configuration's listener and admin addresses should
    /// say port 0 (see [`write_config`] with ports 0): the bound ports are reported in
    /// `port` and `admin_port`.
    pub async fn start(config: &Path) -> Self {
        init_log();
        let path = config.to_owned();
        let (shutdown, stop) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("fsp-in-process".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let config = match proxy::config::load(&path) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return false;
                        }
                    };
                    match proxy::run::start(&path, config, stop).await {
                        Ok(started) => {
                            let addresses = (started.address, started.admin_address);
                            let _ = ready_tx.send(Ok(addresses));
                            match started.finished().await {
                                Ok(()) => true,
                                Err(e) => {
                                    eprintln!("in-process gateway ended with an error: {e:#}");
                                    false
                                }
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{e:#}")));
                            false
                        }
                    }
                })
            })
            .unwrap();
        let (address, admin) = match ready_rx.await {
            Ok(Ok(addresses)) => addresses,
            Ok(Err(e)) => panic!("the gateway did not start: {e}"),
            Err(_) => panic!("the gateway thread ended before it was ready"),
        };
        Self {
            port: address.port(),
            admin_port: admin.map_or(0, |a| a.port()),
            run: Run::InProcess {
                shutdown,
                thread: Some(thread),
            },
        }
    }

    /// Starts `fsp serve --config <config>` as a process; `port` and `admin_port` must
    /// be the configuration's.
    pub async fn spawn(config: &Path, port: u16, admin_port: u16) -> Self {
        Self::start_command(
            Command::new(env!("CARGO_BIN_EXE_fsp")),
            config,
            port,
            admin_port,
        )
        .await
    }

    /// Starts the gateway process with an open-files limit (soft and hard) of `nofile`.
    pub async fn spawn_with_nofile(config: &Path, port: u16, admin_port: u16, nofile: u64) -> Self {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_fsp"));
        Self::start_command(cmd, config, port, admin_port).await
    }

    async fn start_command(mut cmd: Command, config: &Path, port: u16, admin_port: u16) -> Self {
        let child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .env(
                "FSP_LOG",
                std::env::var("FSP_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("fsp starts");
        let mut gw = Self {
            port,
            admin_port,
            run: Run::Process(Some(child)),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", admin_port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s
                    .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await;
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                if buf.starts_with(b"HTTP/1.1 200") {
                    return gw;
                }
            }
            if let Some(status) = gw.child().try_wait().unwrap() {
                panic!("fsp exited before becoming ready: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "fsp did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn child(&mut self) -> &mut Child {
        match &mut self.run {
            Run::Process(Some(c)) => c,
            _ => panic!("only a gateway process (Gateway::spawn) has a process"),
        }
    }

    pub fn pid(&self) -> u32 {
        match &self.run {
            Run::Process(Some(c)) => c.id(),
            _ => panic!("only a gateway process (Gateway::spawn) has a pid"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// Peak and current resident memory of the gateway process, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// Stops the gateway as SIGTERM does (it drains, flushes its audit trail and ends)
    /// and waits until it has: a process is sent SIGTERM and its exit status returned;
    /// an in-process gateway is told to stop, and its end reported as the process would
    /// (0 when it ended without an error).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        let child = match &mut self.run {
            Run::Process(child) => child,
            Run::InProcess { .. } => {
                return std::process::ExitStatus::from_raw(if self.shut_down() {
                    0
                } else {
                    1 << 8
                });
            }
        };
        let mut child = child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("fsp did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the gateway process with SIGKILL (no drain, no flush) and waits for it.
    pub fn kill(&mut self) {
        let mut child = match &mut self.run {
            Run::Process(child) => child.take().unwrap(),
            Run::InProcess { .. } => panic!("only a gateway process can be killed"),
        };
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Stops an in-process gateway as SIGTERM would (drain, flush the audit trail) and
    /// waits until it has; says whether it ended without an error.
    fn shut_down(&mut self) -> bool {
        let Run::InProcess { shutdown, thread } = &mut self.run else {
            return false;
        };
        let _ = shutdown.send(true);
        thread.take().is_some_and(|t| t.join().unwrap_or(false))
    }
}

/// Logs of in-process gateways go to the test's output when `FSP_TEST_LOG` is set.
fn init_log() {
    if let Ok(filter) = std::env::var("FSP_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

impl Drop for Gateway {
    // Tests of graceful shutdown call `stop`; here a process ends at once, since waiting
    // for a drain would block the test's runtime and its open connections. An in-process
    // gateway is told to stop and left to drain on its own thread.
    fn drop(&mut self) {
        match &mut self.run {
            Run::Process(child) => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            Run::InProcess { shutdown, .. } => {
                let _ = shutdown.send(true);
            }
        }
    }
}

/// A TLS client configuration trusting the test CA, presenting `identity` if given.
pub fn client_tls(pki: &Pki, identity: Option<&Issued>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// An HTTPS client trusting the test CA, presenting `identity` if given.
pub fn client(
    pki: &Pki,
    identity: Option<&Issued>,
    http2_only: bool,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, AnyBody> {
    let config = client_tls(pki, identity);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let https = if http2_only {
        https.enable_http2().build()
    } else {
        https.enable_http1().build()
    };
    let mut b = Client::builder(TokioExecutor::new());
    if http2_only {
        b.http2_only(true);
    }
    b.build(https)
}

pub fn get(url: &str) -> Request<AnyBody> {
    Request::get(url).body(full(Bytes::new())).unwrap()
}

pub fn post(url: &str, content_type: &str, body: &str) -> Request<AnyBody> {
    Request::post(url)
        .header("content-type", content_type)
        .body(full(body.to_owned()))
        .unwrap()
}

/// Sends a request; returns status, headers and the whole body.
pub async fn send(
    client: &Client<hyper_rustls::HttpsConnector<HttpConnector>, AnyBody>,
    req: Request<AnyBody>,
) -> Result<(StatusCode, http::HeaderMap, Bytes, http::Version), hyper_util::client::legacy::Error>
{
    let resp = client.request(req).await?;
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok((parts.status, parts.headers, bytes, parts.version))
}

pub fn json(b: &Bytes) -> serde_json::Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

/// Every call's audit record written so far, one per call: a write-ahead call's
/// `outcome` line replaces its `request` line (see `audit::Calls`); lines in file order.
pub fn audit_records(pki: &Pki) -> Vec<serde_json::Value> {
    let lines = audit_lines(pki);
    let finished: std::collections::HashSet<String> = lines
        .iter()
        .filter(|l| l["phase"] == "outcome")
        .filter_map(|l| l["message_id"].as_str().map(str::to_owned))
        .collect();
    lines
        .into_iter()
        .filter(|l| {
            // A request line whose outcome follows is not a call of its own.
            l["phase"] != "request"
                || !l["message_id"]
                    .as_str()
                    .is_some_and(|id| finished.contains(id))
        })
        .collect()
}

/// The file trail's one file (a test's gateway writes one, on one day), and its lines.
pub fn trail(pki: &Pki) -> (PathBuf, Vec<String>) {
    let dir = pki.path().join("audit");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    (
        files[0].clone(),
        record_lines(&text).map(str::to_owned).collect(),
    )
}

/// The records' lines of a trail segment's text: the segment being written ends in
/// zeros written ahead of its records.
pub fn record_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split(['\n', '\0']).filter(|l| !l.is_empty())
}

/// Every line of the audit trail written so far, files in name order.
pub fn audit_lines(pki: &Pki) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(pki.path().join("audit")) else {
        return out;
    };
    let mut files: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    for file in files {
        for line in record_lines(&std::fs::read_to_string(file).unwrap()) {
            out.push(serde_json::from_str(line).unwrap());
        }
    }
    out
}

pub type Shared<T> = Arc<T>;

/// A raw TLS connection to the gateway, for requests a well-behaved HTTP client would
/// not send.
pub async fn raw_tls(
    pki: &Pki,
    identity: &Issued,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect(pki, Some(identity), port, b"http/1.1")
        .await
        .unwrap()
}

/// A TLS connection (with `alpn`) presenting `identity`, or no certificate.
pub async fn tls_connect(
    pki: &Pki,
    identity: Option<&Issued>,
    port: u16,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut config = client_tls(pki, identity);
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
}

/// Reads one HTTP/1.1 response (headers and a Content-Length body) from a raw stream.
/// A plain-HTTP call to the admin listener: status and body.
pub async fn admin_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    admin_request_with_body(port, method, path, token, "").await
}

/// [`admin_request`] with a (JSON) body.
pub async fn admin_request_with_body(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&admin_request_bytes(method, path, token, body))
        .await
        .unwrap();
    read_response(&mut s).await
}

/// An admin API request (HTTP/1.1, `connection: close`), with a bearer token if given.
pub fn admin_request_bytes(method: &str, path: &str, token: Option<&str>, body: &str) -> Vec<u8> {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nhost: admin\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
    match try_read_response(s).await {
        Ok(answer) => answer,
        Err(partial) => panic!("connection closed before a whole response: {partial}"),
    }
}

/// One HTTP/1.1 response (status and body, framed by `Content-Length`), or what was read
/// of it when the connection closed or failed first.
pub async fn try_read_response<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(u16, String), String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap_or(0);
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len || n == 0 {
                let status = text[9..12].parse().unwrap();
                return Ok((status, text[end + 4..].to_owned()));
            }
        }
        if n == 0 {
            return Err(text);
        }
    }
}

/// The first bytes of a ClientHello: a handshake record header announcing 200 bytes, and
/// the start of the message. A server waits for the rest.
pub const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03, 0x5a, 0x5a,
];

/// A TCP connection from the loopback address `from` (127.0.0.0/8 is all loopback)
/// that sends the start of a ClientHello and nothing more.
pub async fn stalled_handshake(from: [u8; 4], port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut c = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut c, PARTIAL_CLIENT_HELLO)
        .await
        .unwrap();
    c
}

/// The leaf certificate a new handshake gets.
pub async fn served_certificate(pki: &Pki, port: u16) -> Vec<u8> {
    let tls = tls_connect(pki, Some(&pki.consumer), port, b"http/1.1")
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Waits (at most `within`) until new handshakes get the certificate `der`; how long.
pub async fn until_served(
    pki: &Pki,
    port: u16,
    der: &[u8],
    within: Duration,
    what: &str,
) -> Duration {
    let started = std::time::Instant::now();
    while served_certificate(pki, port).await != der {
        assert!(started.elapsed() < within, "{what} after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Whether the gateway closes `c` (its end, or a reset) within 5 s: for a connection
/// that must be closed, whose task may not have run yet on a loaded machine.
pub async fn closes(c: &mut tokio::net::TcpStream) -> bool {
    closed_within(c, Duration::from_secs(5)).await
}

/// Whether the gateway has closed `c` (its end, or a reset, read at once): for a
/// connection that must stay open (`!closed`), or polled in a loop.
pub async fn closed(c: &mut tokio::net::TcpStream) -> bool {
    closed_within(c, Duration::from_millis(50)).await
}

async fn closed_within(c: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, tokio::io::AsyncReadExt::read(c, &mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A value of the gateway's metrics (0 when the series is not there).
pub async fn metric(gw: &Gateway, series: &str) -> f64 {
    let (_, metrics) = admin_request(gw.admin_port, "GET", "/metrics", None).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the gateway's `series` says `n`.
pub async fn wait_metric(gw: &Gateway, series: &str, n: f64) {
    let started = std::time::Instant::now();
    loop {
        let now = metric(gw, series).await;
        if now == n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{series} is {now}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gateway holds `n` connections open.
pub async fn wait_open(gw: &Gateway, n: f64) {
    wait_metric(gw, "fsp_connections_open", n).await;
}
