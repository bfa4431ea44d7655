//! # Configuration
//!
//! Loading goes in two steps, as in sozu: [`raw`] mirrors the TOML and refuses unknown
//! keys; [`load`] follows `include = [...]`, then validates everything into a [`Config`]
//! whose parts cannot hold an invalid state (the catalogue obeys the lifecycle rules,
//! every reference resolves, every credential belongs to one consumer, every file parses).
//!
//! Every problem found is reported, not just the first, each as a [`Problem`] naming the
//! file, the key path inside it (`family[0].service[1].version[2].sunset`) and the reason.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use catalogue::{Catalogue, Protocol, ServiceSpec, VersionSpec};
use ipnet::IpNet;
use policy::consumer::{CertificateSpec, ConsumerSpec};
use policy::{Authorisation, Consumers, LegalBasis, LegalBasisKind, Sha256};

pub mod raw;

use raw::*;

use crate::limits::ConnectionLimits;

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// Key path inside the file; empty for the file as a whole.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<Problem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the configuration has {} problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// INT or PROD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Environment {
    Int,
    Prod,
}

/// The consumer-facing listener.
#[derive(Debug)]
pub struct Listener {
    pub address: SocketAddr,
    /// Without a trailing slash.
    pub public_url: String,
    pub tls_files: certs::tls::ServerFiles,
    /// The rustls configuration and its client certificate verifier.
    pub tls: Arc<certs::tls::ListenerTls>,
    pub max_request_bytes: u64,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
    /// Worker threads, each with its own runtime, listener and upstream pools.
    pub threads: usize,
    /// The longest silence allowed while a request body is being received.
    pub request_body_timeout: Duration,
    /// The longest a provider's answer may wait for the consumer to take its next bytes
    /// before the connection is closed.
    pub response_send_timeout: Duration,
    pub connections: ConnectionLimits,
    /// Peers allowed to send a PROXY protocol header (v1 or v2); from anyone else, a
    /// connection that starts with one is refused.
    pub proxy_protocol_from: Vec<IpNet>,
    /// After SIGTERM: how long `/readyz` says 503 before the listener closes.
    pub shutdown_delay: Duration,
}

/// One administrator's bearer token from `tokens_file`: `name:token` on a line, or the
/// token alone (then named `token#N`, N its position among the tokens).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub token: String,
    /// The whole `name:token` line, also accepted as the token (as it was before names).
    pub line: Option<String>,
}

impl std::fmt::Debug for AdminToken {
    // The token never reaches a log or a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AdminToken {
    /// Reads one non-empty line of `tokens_file`; `n` is its position among the tokens.
    pub fn parse(line: &str, n: usize) -> Self {
        if let Some((name, token)) = line.split_once(':') {
            let name = name.trim();
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
            if valid_name {
                return Self {
                    name: name.to_owned(),
                    token: token.trim().to_owned(),
                    line: Some(line.to_owned()),
                };
            }
        }
        Self {
            name: format!("token#{}", n + 1),
            token: line.to_owned(),
            line: None,
        }
    }
}

/// The admin listener.
#[derive(Debug)]
pub struct Admin {
    pub address: SocketAddr,
    /// Who may administer the gateway, and over what (reloaded with the configuration).
    pub access: AdminAccess,
    /// Extension: trust anchors for admin client certificates (default: the listener's
    /// `client_ca`).
    pub admin_ca: Option<PathBuf>,
}

/// Who may call the admin API and how it is served: swapped as a whole at a reload.
#[derive(Debug, Default)]
pub struct AdminAccess {
    pub tokens: Vec<AdminToken>,
    /// Subject CNs of administrators' client certificates (with `tls`).
    pub cns: Vec<String>,
    /// `[admin] tls = true`: the admin listener's TLS configuration (the listener's
    /// certificate; admin client certificates asked for when `cns` is not empty).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// With admin client certificates: the verifier of `tls`, to check an
    /// administrator's certificate again on an open connection, and the earliest
    /// nextUpdate of its CRLs (seconds since the Unix epoch), from which it must be.
    pub clients: Option<(Arc<dyn rustls::server::danger::ClientCertVerifier>, i64)>,
    /// Administrators' certificates chain to their own CA (`admin_ca`), not to the
    /// consumers' (`client_ca`).
    pub own_ca: bool,
}

/// OAuth2 settings (enforced from issue 3 on; validated now).
#[derive(Debug)]
pub struct OAuth {
    pub issuer: String,
    pub jwks: JwksSource,
    pub audience: String,
    /// Asymmetric algorithms only (no `none`, no HMAC).
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub client_id_claim: String,
    pub require_certificate_binding: bool,
    pub leeway: Duration,
    pub max_token_bytes: usize,
}

#[derive(Debug)]
pub enum JwksSource {
    Url(http::Uri),
    File(PathBuf),
}

#[derive(Debug)]
pub enum AuditBackend {
    File {
        dir: PathBuf,
    },
    /// The trail in PostgreSQL; `state_dir` (`[audit] dir`) keeps the gateway's local
    /// state (suspensions) only.
    Postgres {
        url: String,
        state_dir: PathBuf,
    },
    /// No trail at all (capacity tests; only with `fail_closed = false`).
    None {
        state_dir: PathBuf,
    },
}

impl AuditBackend {
    /// Where the gateway keeps its local state (suspensions): the trail's directory, or
    /// `[audit] dir` beside a PostgreSQL trail.
    pub fn state_dir(&self) -> &Path {
        match self {
            AuditBackend::File { dir } => dir,
            AuditBackend::Postgres { state_dir, .. } | AuditBackend::None { state_dir } => {
                state_dir
            }
        }
    }
}

#[derive(Debug)]
pub struct AuditConfig {
    pub backend: AuditBackend,
    pub fail_closed: bool,
    pub retention_days: u32,
    /// `signing_key` and `verify_keys`: heads and anchors signed, and the keys whose
    /// signatures are accepted (see `audit::seal`). Default: none.
    pub seals: audit::seal::Seals,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBackendError {
    Local,
    Deny,
    Allow,
}

#[derive(Clone, Debug)]
pub struct ThrottleConfig {
    pub backend: ThrottleBackend,
    pub on_backend_error: OnBackendError,
    pub replicas: u32,
}

/// Where throttling state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ThrottleBackend {
    /// In this gateway's memory.
    Local,
    /// Shared by every replica through Redis (`redis://`, `rediss://` or `unix://`),
    /// with TLS settings for `rediss://` (the system's CAs when `None`).
    Redis {
        url: String,
        tls: Option<throttle::redis::RedisTls>,
    },
}

/// `[cluster]`: where the replicas share their state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// `redis://`, `rediss://` or `unix://`.
    pub redis_url: String,
    /// TLS settings for a `rediss://` URL (the system's CAs when `None`).
    pub redis_tls: Option<throttle::redis::RedisTls>,
    /// Prefix of the keys and channel in Redis (`fsp:` unless set), so that several
    /// platforms (INT and ACC, say) can share one Redis without seeing each other.
    pub key_prefix: String,
}

/// How spans are sent to the OpenTelemetry collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OtlpEndpoint {
    /// OTLP/HTTP with protobuf bodies, to `{base}/v1/traces`.
    Http(String),
    /// OTLP/gRPC (`grpc://host:port` in the file; the exporter is given `http://host:port`).
    Grpc(String),
}

/// `[telemetry]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Telemetry {
    pub endpoint: OtlpEndpoint,
    pub service_name: String,
    /// For traces the consumer did not start (or sent no decision for): the share kept.
    pub sampling_ratio: f64,
}

/// `count` calls per `per`, with `burst` extra.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
    pub burst: u32,
}

impl Rate {
    /// The limit as the throttle crate counts it.
    pub fn limit(&self) -> throttle::Limit {
        throttle::Limit {
            count: self.count,
            per: self.per,
            burst: self.burst,
        }
    }
}

/// A provider: who runs the upstreams, how to reach them, what they can take.
#[derive(Debug)]
pub struct Provider {
    pub id: String,
    pub name: String,
    pub limit: Option<Rate>,
    pub consumer_limit: Option<Rate>,
    pub consumer_limits: HashMap<String, Rate>,
    pub tls: Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Calls in flight to this provider (each holds one upstream connection, or one
    /// HTTP/2 stream) at most, over all worker threads of this gateway.
    pub max_connections: usize,
    /// How long a call waits for one of those to free up before 503.
    pub queue_timeout: Duration,
    /// The shared count behind `max_connections`.
    pub cap: Arc<crate::limits::ConnCap>,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub source: PathBuf,
    pub environment: Environment,
    pub node: String,
    pub listener: Listener,
    pub admin: Option<Admin>,
    pub oauth: Option<OAuth>,
    pub audit: AuditConfig,
    pub throttle: ThrottleConfig,
    /// State shared by every replica (`[cluster]`), when configured.
    pub cluster: Option<Cluster>,
    /// OpenTelemetry traces (`[telemetry]`), when configured.
    pub telemetry: Option<Telemetry>,
    pub providers: Vec<Provider>,
    pub catalogue: Catalogue,
    pub consumers: Consumers,
    pub authorisations: Vec<Authorisation>,
    /// What services set for themselves (XML threat protection, SOAP fault status), by
    /// `family/service`; the others use [`ServiceOptions::default`].
    pub service_options: HashMap<String, ServiceOptions>,
    /// Every certificate file referenced, with the key that references it.
    pub certificate_files: Vec<(String, PathBuf)>,
    /// Every file the TLS configurations are made of (certificates, keys, CAs, CRLs):
    /// a change to any of them is reloaded (`crate::certwatch`).
    pub tls_files: Vec<PathBuf>,
    /// The configuration's own files: the main one, then its includes.
    pub config_files: Vec<PathBuf>,
    /// What is valid but should be seen to (a pinned consumer certificate about to
    /// expire, ...): `fsp check` prints them and still exits 0, `fsp serve` logs them.
    pub warnings: Vec<Problem>,
}

/// A parsed file and the directory its relative paths start from.
struct Source {
    path: PathBuf,
    dir: PathBuf,
    raw: RawFile,
    /// The file as written, to tell on which line a refused value stands.
    text: String,
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, file: &Path, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            file: file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        });
    }
}

/// Reads, includes and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let mut problems = Problems::default();
    let mut sources = Vec::new();
    let mut seen = HashSet::new();
    read_with_includes(path, None, &mut sources, &mut seen, &mut problems);
    if !problems.0.is_empty() {
        return Err(ConfigError(problems.0));
    }
    let config = build(path, sources, &mut problems);
    match config {
        Some(c) if problems.0.is_empty() => Ok(c),
        _ => Err(ConfigError(problems.0)),
    }
}

/// Reads `path` and, depth first, what it includes. `from` is the including file and the
/// position of this file in its `include` list, so problems point at that entry.
fn read_with_includes(
    path: &Path,
    from: Option<(&Path, usize)>,
    out: &mut Vec<Source>,
    seen: &mut HashSet<PathBuf>,
    problems: &mut Problems,
) {
    // A file that cannot be read is blamed on the `include` entry that named it, when one
    // did (an empty or wrong entry can name a directory or nothing).
    let unreadable = |e: std::io::Error, problems: &mut Problems| match from {
        Some((parent, i)) => problems.add(
            parent,
            format!("include[{i}]"),
            format!("cannot read {}: {e}", path.display()),
        ),
        None => problems.add(path, "", format!("cannot read file: {e}")),
    };
    let canonical = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) => return unreadable(e, problems),
    };
    if !seen.insert(canonical.clone()) {
        let (file, key) = match from {
            Some((parent, i)) => (parent, format!("include[{i}]")),
            None => (path, "include".to_owned()),
        };
        problems.add(
            file,
            key,
            format!(
                "{} is included more than once (or includes itself)",
                path.display()
            ),
        );
        return;
    }
    let text = match read_text(&canonical) {
        Ok(t) => t,
        Err(e) => return unreadable(e, problems),
    };
    let raw = match parse_toml(&text) {
        Ok(r) => r,
        Err((key, reason)) => {
            problems.add(path, key, reason);
            return;
        }
    };
    let dir = canonical.parent().map(Path::to_owned).unwrap_or_default();
    let includes = raw.include.clone().unwrap_or_default();
    out.push(Source {
        path: path.to_owned(),
        dir: dir.clone(),
        raw,
        text,
    });
    for (i, inc) in includes.iter().enumerate() {
        read_with_includes(&dir.join(inc), Some((path, i)), out, seen, problems);
    }
}

/// The most a configuration file, or a file it names for a secret or a list, may hold.
pub(crate) const MAX_CONFIG_FILE: u64 = 16 << 20;

/// Reads a configuration file or a file it names (tokens, a URL): a regular UTF-8 file
/// of at most [`MAX_CONFIG_FILE`] bytes.
fn read_text(path: &Path) -> std::io::Result<String> {
    let bytes = certs::load::read_regular_file(path, MAX_CONFIG_FILE)?;
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Parses one file; on error returns the key path and a reason with line and column.
fn parse_toml(text: &str) -> Result<RawFile, (String, String)> {
    let locate = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!(" (line {line}, column {col})")
        })
        .unwrap_or_default()
    };
    let de = toml::de::Deserializer::parse(text).map_err(|e| {
        (
            String::new(),
            format!("not valid TOML: {}{}", e.message(), locate(e.span())),
        )
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let key = if path == "." { String::new() } else { path };
        (key, format!("{}{}", inner.message(), locate(inner.span())))
    })
}

/// Parses durations such as `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" | "min" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Parses rates such as `1000/s`, `60000/min`, `100/h`, `10000/day`.
pub fn parse_rate(s: &str, burst: Option<u32>) -> Option<Rate> {
    let (n, unit) = s.trim().split_once('/')?;
    let count: u64 = n.trim().replace('_', "").parse().ok()?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        _ => return None,
    };
    if count == 0 {
        return None;
    }
    Some(Rate {
        count,
        per,
        burst: burst.unwrap_or(0),
    })
}

fn toml_date(d: &toml::value::Datetime) -> Option<time::Date> {
    if d.time.is_some() || d.offset.is_some() {
        return None;
    }
    let date = d.date?;
    time::Date::from_calendar_date(
        i32::from(date.year),
        time::Month::try_from(date.month).ok()?,
        date.day,
    )
    .ok()
}

/// Picks the one file that defines a top-level setting; two definitions are an error.
fn single<'a, T>(
    sources: &'a [Source],
    key: &str,
    get: impl Fn(&'a RawFile) -> Option<&'a T>,
    problems: &mut Problems,
) -> Option<(&'a Source, &'a T)> {
    let mut found: Option<(&Source, &T)> = None;
    for s in sources {
        if let Some(v) = get(&s.raw) {
            if let Some((first, _)) = found {
                problems.add(
                    &s.path,
                    key,
                    format!(
                        "already defined in {}; define it in one file only",
                        first.path.display()
                    ),
                );
            } else {
                found = Some((s, v));
            }
        }
    }
    found
}

/// The longest retention the trail accepts, in days: 100 years.
pub const MAX_RETENTION_DAYS: u32 = 36_525;

/// How long an identifier may be.
const MAX_ID_LEN: usize = 128;

/// Checks a name that the gateway puts in URL paths, headers sent to providers, file
/// names, Redis keys, metric labels and audit records: a consumer, provider, family,
/// service, version or authorisation id, or the node's name. Anything else there could
/// be read differently by each of them (a `/` in a family id makes two services one
/// path; a space or an accent in a consumer id is not a header value, so the provider
/// would not be told who calls). Returns whether it is well formed.
fn check_id(file: &Path, key: &str, value: &str, problems: &mut Problems) -> bool {
    let reason = id_problem(value);
    let ok = reason.is_none();
    if let Some(reason) = reason {
        problems.add(file, key, reason);
    }
    ok
}

/// Why `value` is not an identifier (see [`check_id`]), or `None` when it is one.
fn id_problem(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_ID_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b));
    (!ok).then(|| {
        format!(
            "`{}` is not an identifier: write 1 to {MAX_ID_LEN} characters among letters (a-z, A-Z), digits, '-', '_' and '.', starting with a letter or a digit (e.g. \"ville-bxl\")",
            value.escape_debug()
        )
    })
}

/// Checks a value sent to providers as a header (`FSP-Purpose`, `FSP-Legal-Basis`): a
/// value a header cannot carry would otherwise be left out, and the provider not told.
fn check_header_text(file: &Path, key: &str, value: &str, header: &str, problems: &mut Problems) {
    let ok = !value.is_empty()
        && value.len() <= 256
        && value.trim() == value
        && value.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !ok {
        problems.add(
            file,
            key,
            format!(
                "`{}` cannot be sent to providers in the {header} header: write 1 to 256 printable ASCII characters (no accents, no control characters), without spaces at either end",
                value.escape_debug()
            ),
        );
    }
}

fn duration_or(
    value: &Option<String>,
    default: Duration,
    file: &Path,
    key: &str,
    problems: &mut Problems,
) -> Duration {
    match value {
        None => default,
        Some(s) => parse_duration(s).unwrap_or_else(|| {
            problems.add(
                file,
                key,
                format!("`{s}` is not a duration (write e.g. 500ms, 5s, 2m, 1h)"),
            );
            default
        }),
    }
}

/// A duration that must be at least `min`, where less (0 above all) would make every call
/// fail or silently switch a protection off: `value`, or `default` when it is not set (or,
/// with the problem reported with its line, when it is shorter or does not parse). `why`
/// says what a shorter value would do.
fn duration_at_least(
    s: &Source,
    value: &Option<String>,
    default: Duration,
    min: Duration,
    key: &str,
    why: &str,
    problems: &mut Problems,
) -> Duration {
    let d = duration_or(value, default, &s.path, key, problems);
    if d >= min {
        return d;
    }
    let min = if min.subsec_millis() == 0 {
        format!("{}s", min.as_secs())
    } else {
        format!("{}ms", min.as_millis())
    };
    let line = key_line(&s.text, key).map_or_else(String::new, |n| format!(" (line {n})"));
    problems.add(
        &s.path,
        key,
        format!(
            "`{}` is too short: must be at least {min}: {why}{line}",
            value.as_deref().unwrap_or_default()
        ),
    );
    default
}

/// The line (from 1) where `key` is written in `text`: a key path such as
/// `listener.drain_timeout` or `provider[1].queue_timeout`, as problems name them.
fn key_line(text: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut table: &DeTable<'_> = root.get_ref();
    let mut at = None;
    for segment in key.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((name, i)) => (name, Some(i.strip_suffix(']')?.parse::<usize>().ok()?)),
            None => (segment, None),
        };
        let (k, mut value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
        at = Some(k.span().start);
        if let Some(i) = index {
            let DeValue::Array(items) = value.get_ref() else {
                return None;
            };
            value = items.get(i)?;
            at = Some(value.span().start);
        }
        if let DeValue::Table(t) = value.get_ref() {
            table = t;
        }
    }
    at.map(|start| text.get(..start).unwrap_or(text).matches('\n').count() + 1)
}

/// A count that must be at least 1: `value`, or `default` when it is not set (or, with
/// the problem reported, when it is 0).
/// `listener.max_anonymous_connections` when not set: a tenth of `max_connections`, at
/// most 1 000.
pub fn anonymous_default(max_connections: usize) -> usize {
    (max_connections / 10).clamp(1, 1_000)
}

fn at_least_one<T: Copy + PartialEq + From<u8>>(
    value: Option<T>,
    default: T,
    file: &Path,
    key: &str,
    problems: &mut Problems,
) -> T {
    match value {
        Some(n) if n == T::from(0) => {
            problems.add(file, key, "must be at least 1");
            default
        }
        Some(n) => n,
        None => default,
    }
}

/// Loads each certificate, key and CRL file on its own, so that a problem is reported
/// under the key that names the file (two keys may name one combined PEM file).
/// Returns whether all of them loaded.
fn cert_files_load(file: &Path, keys: &[(&str, &Path)], problems: &mut Problems) -> bool {
    let mut ok = true;
    for (key, path) in keys {
        let loaded = if key.ends_with("_key") {
            certs::load::private_key(path).map(drop)
        } else if key.ends_with("crls") {
            certs::inventory::describe_crls(path).and_then(|crls| stale_crl(path, &crls))
        } else {
            certs::load::certificates(path).map(drop)
        };
        if let Err(e) = loaded {
            problems.add(file, *key, e.to_string());
            ok = false;
        }
    }
    ok
}

/// How long before a CRL's nextUpdate its coming staleness is announced (`fsp check`
/// warnings, the log while serving).
pub const CRL_NOTICE: time::Duration = time::Duration::days(1);

/// A CRL already past its nextUpdate is refused: the gateway would refuse every
/// certificate it covers (see `certs::tls`), which an operator should learn from
/// `fsp check`, not from the consumers.
fn stale_crl(path: &Path, crls: &[certs::inventory::CrlInfo]) -> Result<(), certs::CertError> {
    let now = time::OffsetDateTime::now_utc();
    match crls.iter().find(|c| c.stale(now)) {
        None => Ok(()),
        Some(c) => Err(certs::CertError::new(
            path,
            format!(
                "the CRL of {} is out of date: its nextUpdate was {}; the certificates of that CA would all be refused. Publish a fresh CRL from that CA and put it in place of this file",
                c.issuer,
                c.next_update
                    .map_or_else(String::new, crate::pipeline::stamp::rfc3339_millis)
            ),
        )),
    }
}

/// Warnings for those of `crls` that reach their nextUpdate within [`CRL_NOTICE`].
pub fn crl_warnings(crls: &[certs::inventory::CrlInfo], now: time::OffsetDateTime) -> Vec<String> {
    crls.iter()
        .filter_map(|c| {
            let next = c.next_update?;
            (next > now && next <= now + CRL_NOTICE).then(|| {
                format!(
                    "{}: the CRL of {} reaches its nextUpdate at {}: after that, the certificates of that CA are refused until a fresh CRL is put in place of this file",
                    c.path.display(),
                    c.issuer,
                    crate::pipeline::stamp::rfc3339_millis(next)
                )
            })
        })
        .collect()
}

/// Every CRL in `paths`, as read now; a file that cannot be read is left out (the
/// configuration that named it loaded it a moment ago).
pub fn crl_inventory(paths: &[PathBuf]) -> Vec<certs::inventory::CrlInfo> {
    paths
        .iter()
        .filter_map(|p| certs::inventory::describe_crls(p).ok())
        .flatten()
        .collect()
}

/// A TLS configuration that failed although every file loaded: most often a key that
/// does not belong to its certificate, so it is reported under the key's setting.
fn cert_problem(
    file: &Path,
    keys: &[(&str, &Path)],
    err: certs::CertError,
    problems: &mut Problems,
) {
    let key = keys
        .iter()
        .find(|(k, _)| k.ends_with("_key"))
        .or(keys.first())
        .map_or("", |k| k.0);
    problems.add(file, key, err.to_string());
}

fn build(main: &Path, sources: Vec<Source>, problems: &mut Problems) -> Option<Config> {
    let config_files: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
    let mut certificate_files = Vec::new();
    let mut tls_files = Vec::new();

    // ---- environment, node ----
    let environment = match single(
        &sources,
        "environment",
        |r| r.environment.as_ref(),
        problems,
    ) {
        Some((_, e)) if e == "INT" => Environment::Int,
        Some((_, e)) if e == "PROD" => Environment::Prod,
        Some((s, e)) => {
            problems.add(&s.path, "environment", format!("`{e}` is not INT or PROD"));
            Environment::Int
        }
        None => {
            problems.add(
                main,
                "environment",
                "missing: set environment = \"INT\" or \"PROD\"",
            );
            Environment::Int
        }
    };
    // The node's name is in audit file names and records, and each node has its own
    // hash chain: it is an identifier wherever it comes from, and never silently replaced.
    let node = match single(&sources, "node", |r| r.node.as_ref(), problems) {
        Some((s, n)) => {
            check_id(&s.path, "node", n, problems);
            n.clone()
        }
        None => {
            let (from, n) = match std::env::var("FSP_NODE").ok().filter(|n| !n.is_empty()) {
                Some(n) => ("the FSP_NODE environment variable", n),
                None => (
                    "/etc/hostname",
                    std::fs::read_to_string("/etc/hostname")
                        .map(|h| h.trim().to_owned())
                        .unwrap_or_default(),
                ),
            };
            if n.is_empty() {
                "fsp-1".to_owned()
            } else {
                if let Some(reason) = id_problem(&n) {
                    problems.add(
                        main,
                        "node",
                        format!("not set, so taken from {from}, but {reason}: set node"),
                    );
                }
                n
            }
        }
    };

    // ---- listener ----
    let mut crl_notices = Vec::new();
    let listener = match single(&sources, "listener", |r| r.listener.as_ref(), problems) {
        None => {
            problems.add(
                main,
                "listener",
                "missing: the [listener] section is required",
            );
            None
        }
        Some((s, l)) => {
            let built = build_listener(s, l, &mut certificate_files, &mut tls_files, problems);
            if let Some(l) = &built {
                let now = time::OffsetDateTime::now_utc();
                crl_notices.extend(
                    crl_warnings(&crl_inventory(&l.tls_files.crls), now)
                        .into_iter()
                        .map(|reason| Problem {
                            file: s.path.clone(),
                            key: "listener.crls".to_owned(),
                            reason,
                        }),
                );
            }
            built
        }
    };

    // ---- admin ----
    let admin = single(&sources, "admin", |r| r.admin.as_ref(), problems).and_then(|(s, a)| {
        build_admin(
            s,
            a,
            listener.as_ref(),
            &mut certificate_files,
            &mut tls_files,
            problems,
        )
    });

    // ---- oauth ----
    let oauth = single(&sources, "oauth", |r| r.oauth.as_ref(), problems)
        .and_then(|(s, o)| build_oauth(s, o, problems));

    // ---- audit, throttle ----
    let audit = build_audit(&sources, problems);
    let mut redis_files = RedisTlsFiles {
        certificates: &mut certificate_files,
        watched: &mut tls_files,
    };
    let throttle = build_throttle(&sources, &mut redis_files, problems);
    let cluster = single(&sources, "cluster", |r| r.cluster.as_ref(), problems)
        .and_then(|(s, c)| build_cluster(s, c, &mut redis_files, problems));
    let telemetry = single(&sources, "telemetry", |r| r.telemetry.as_ref(), problems)
        .and_then(|(s, t)| build_telemetry(s, t, problems));

    // References are checked against what is declared, not against what validated, so one
    // broken item does not make everything that refers to it look undeclared too.
    let declared_consumers: HashSet<&str> = sources
        .iter()
        .flat_map(|s| s.raw.consumer.iter().map(|c| c.id.as_str()))
        .collect();
    let declared_providers: HashSet<&str> = sources
        .iter()
        .flat_map(|s| s.raw.provider.iter().map(|p| p.id.as_str()))
        .collect();
    let mut declared_services: HashMap<String, Vec<&str>> = HashMap::new();
    for f in sources.iter().flat_map(|s| s.raw.family.iter()) {
        for svc in &f.service {
            declared_services
                .entry(format!("{}/{}", f.id, svc.id))
                .or_default()
                .extend(svc.version.iter().map(|v| v.version.as_str()));
        }
    }

    // ---- consumers (before providers: per-consumer limits refer to them) ----
    let mut consumer_at: HashMap<String, (PathBuf, String)> = HashMap::new();
    let mut consumer_specs = Vec::new();
    let mut pinned_files = Vec::new();
    for s in &sources {
        for (i, c) in s.raw.consumer.iter().enumerate() {
            let key = format!("consumer[{i}]");
            check_id(&s.path, &format!("{key}.id"), &c.id, problems);
            consumer_at.insert(c.id.clone(), (s.path.clone(), key.clone()));
            consumer_specs.push(build_consumer(
                s,
                &key,
                c,
                &mut certificate_files,
                &mut tls_files,
                &mut pinned_files,
                problems,
            ));
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let warnings = crl_notices
        .into_iter()
        .chain(pinned_files.iter().flat_map(|p| {
            pinned_certificate_warnings(&p.written, &p.leaf, now)
                .into_iter()
                .map(|reason| Problem {
                    file: p.config.clone(),
                    key: p.key.clone(),
                    reason,
                })
        }))
        .collect();
    let consumers = match Consumers::new(consumer_specs) {
        Ok(c) => c,
        Err(errs) => {
            for e in errs {
                let id = match &e {
                    policy::ConsumersError::DuplicateId { id }
                    | policy::ConsumersError::EmptyCertificate { id } => id.clone(),
                    policy::ConsumersError::SharedCn { second, .. }
                    | policy::ConsumersError::SharedFingerprint { second, .. }
                    | policy::ConsumersError::SharedClientId { second, .. } => second.clone(),
                    _ => String::new(),
                };
                let (file, key) = consumer_at
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| (main.to_owned(), "consumer".into()));
                problems.add(&file, key, e.to_string());
            }
            Consumers::default()
        }
    };

    // ---- providers ----
    let mut providers: Vec<Provider> = Vec::new();
    let mut provider_ids: HashSet<&str> = HashSet::new();
    for s in &sources {
        for (i, p) in s.raw.provider.iter().enumerate() {
            let key = format!("provider[{i}]");
            check_id(&s.path, &format!("{key}.id"), &p.id, problems);
            // Against what is declared, so a duplicate of a provider that failed to
            // build is reported too.
            if !provider_ids.insert(&p.id) {
                problems.add(
                    &s.path,
                    format!("{key}.id"),
                    format!("provider {} is declared more than once", p.id),
                );
                continue;
            }
            if let Some(p) = build_provider(
                s,
                &key,
                p,
                &declared_consumers,
                &mut certificate_files,
                &mut tls_files,
                problems,
            ) {
                providers.push(p);
            }
        }
    }

    // An administrator's certificate is never a consumer's: with the consumers' CA as the
    // admin CA, a CN that names both would let one certificate do both.
    if let Some(a) = admin.as_ref().filter(|a| a.admin_ca.is_none()) {
        for src in &sources {
            for (i, c) in src.raw.consumer.iter().enumerate() {
                for cn in c
                    .certificates
                    .iter()
                    .flatten()
                    .filter_map(|c| c.cn.as_deref())
                {
                    if a.access.cns.iter().any(|admin| admin == cn.trim()) {
                        problems.add(
                            &src.path,
                            format!("consumer[{i}].certificates"),
                            format!(
                                "CN `{cn}` of consumer {} is also in admin.admin_cns: a consumer's certificate must not be an administrator's (use another CN, or admin_ca for administrators' own CA)",
                                c.id
                            ),
                        );
                    }
                }
            }
        }
    }

    // ---- catalogue, authorisations ----
    let (catalogue, service_options) =
        build_catalogue(main, &sources, &declared_providers, problems);
    let authorisations =
        build_authorisations(&sources, &declared_consumers, &declared_services, problems);

    Some(Config {
        source: main.to_owned(),
        environment,
        node,
        listener: listener?,
        admin,
        oauth,
        audit,
        throttle,
        cluster,
        telemetry,
        providers,
        catalogue,
        consumers,
        authorisations,
        service_options,
        certificate_files,
        tls_files,
        config_files,
        warnings,
    })
}

fn build_xml_limits(
    s: &Source,
    key: &str,
    raw: &RawXmlLimits,
    problems: &mut Problems,
) -> crate::xml::Limits {
    let d = crate::xml::Limits::default();
    let mut count = |v: Option<u32>, k: &str, default: u32| {
        at_least_one(
            v,
            default,
            &s.path,
            &format!("{key}.xml_limits.{k}"),
            problems,
        )
    };
    let max_depth = count(raw.max_depth, "max_depth", d.max_depth);
    let max_attributes = count(raw.max_attributes, "max_attributes", d.max_attributes);
    let max_name_length = count(raw.max_name_length, "max_name_length", d.max_name_length);
    let max_attribute_length = count(
        raw.max_attribute_length,
        "max_attribute_length",
        d.max_attribute_length,
    );
    crate::xml::Limits {
        max_depth,
        max_attributes,
        max_name_length,
        max_attribute_length,
        max_text_length: at_least_one(
            raw.max_text_length,
            d.max_text_length,
            &s.path,
            &format!("{key}.xml_limits.max_text_length"),
            problems,
        ),
    }
}

/// What a service sets for itself beyond its versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceOptions {
    /// The XML threat protection's bounds, for requests and for XML answers; `None` when
    /// the operator turned the checks off (`xml_checks = false`).
    pub xml: Option<crate::xml::Limits>,
    /// SOAP faults made by the gateway go out under HTTP 500 (`soap_faults_as_500`).
    pub faults_as_500: bool,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            xml: Some(crate::xml::Limits::default()),
            faults_as_500: false,
        }
    }
}

/// Families, services and versions, each service checked against the lifecycle rules,
/// and the options of the services that set their own.
fn build_catalogue(
    main: &Path,
    sources: &[Source],
    declared_providers: &HashSet<&str>,
    problems: &mut Problems,
) -> (Catalogue, HashMap<String, ServiceOptions>) {
    let mut specs = Vec::new();
    let mut service_options = HashMap::new();
    let mut family_ids: HashMap<&str, &Path> = HashMap::new();
    for s in sources {
        for (fi, f) in s.raw.family.iter().enumerate() {
            let fkey = format!("family[{fi}]");
            check_id(&s.path, &format!("{fkey}.id"), &f.id, problems);
            if let Some(first) = family_ids.insert(&f.id, &s.path) {
                problems.add(
                    &s.path,
                    format!("{fkey}.id"),
                    format!("family {} is already declared in {}", f.id, first.display()),
                );
                continue;
            }
            if !declared_providers.contains(f.provider.as_str()) {
                problems.add(
                    &s.path,
                    format!("{fkey}.provider"),
                    format!("no provider with id `{}` is declared", f.provider),
                );
            }
            for (si, svc) in f.service.iter().enumerate() {
                let skey = format!("{fkey}.service[{si}]");
                check_id(&s.path, &format!("{skey}.id"), &svc.id, problems);
                if f.service[..si].iter().any(|o| o.id == svc.id) {
                    problems.add(
                        &s.path,
                        format!("{skey}.id"),
                        format!("service {}/{} is declared more than once", f.id, svc.id),
                    );
                    continue;
                }
                if let Some(options) = build_service_options(s, &skey, svc, problems) {
                    service_options.insert(format!("{}/{}", f.id, svc.id), options);
                }
                if let Some(spec) = build_service(s, &skey, &f.id, svc, problems) {
                    let violations = catalogue::validate_service(&spec);
                    for v in &violations {
                        // Point at the version concerned when there is one.
                        let key = v
                            .version()
                            .and_then(|name| svc.version.iter().position(|x| x.version == name))
                            .map_or_else(|| skey.clone(), |k| format!("{skey}.version[{k}]"));
                        problems.add(&s.path, key, v.to_string());
                    }
                    if violations.is_empty() {
                        specs.push((f.provider.clone(), spec));
                    }
                }
            }
        }
    }
    // Only services that passed every rule (each failure is reported above with its
    // location) are built, so this cannot fail; should it, nothing is lost silently.
    let catalogue = Catalogue::new(specs).unwrap_or_else(|e| {
        for v in e.0 {
            problems.add(main, "family", v.to_string());
        }
        Catalogue::default()
    });
    (catalogue, service_options)
}

/// A service's own options, or `None` when it sets none.
fn build_service_options(
    s: &Source,
    key: &str,
    svc: &RawService,
    problems: &mut Problems,
) -> Option<ServiceOptions> {
    if svc.xml_limits.is_none() && svc.xml_checks.is_none() && svc.soap_faults_as_500.is_none() {
        return None;
    }
    let mut options = ServiceOptions::default();
    if let Some(raw) = &svc.xml_limits {
        options.xml = Some(build_xml_limits(s, key, raw, problems));
    }
    if svc.xml_checks == Some(false) {
        if svc.xml_limits.is_some() {
            problems.add(
                &s.path,
                format!("{key}.xml_limits"),
                "xml_limits has no effect with xml_checks = false: remove one of them",
            );
        }
        options.xml = None;
    }
    if let Some(as_500) = svc.soap_faults_as_500 {
        if !svc.protocol.eq_ignore_ascii_case("soap") {
            problems.add(
                &s.path,
                format!("{key}.soap_faults_as_500"),
                "soap_faults_as_500 applies to SOAP services only; this service is not one",
            );
        }
        options.faults_as_500 = as_500;
    }
    Some(options)
}

/// Every authorisation, its references resolved against what is declared.
fn build_authorisations(
    sources: &[Source],
    declared_consumers: &HashSet<&str>,
    declared_services: &HashMap<String, Vec<&str>>,
    problems: &mut Problems,
) -> Vec<Authorisation> {
    let mut authorisations: Vec<Authorisation> = Vec::new();
    let mut authorisation_ids: HashSet<&str> = HashSet::new();
    for s in sources {
        for (i, a) in s.raw.authorisation.iter().enumerate() {
            let key = format!("authorisation[{i}]");
            if !authorisation_ids.insert(&a.id) {
                problems.add(
                    &s.path,
                    format!("{key}.id"),
                    format!("authorisation {} is declared more than once", a.id),
                );
            }
            if let Some(a) =
                build_authorisation(s, &key, a, declared_consumers, declared_services, problems)
            {
                authorisations.push(a);
            }
        }
    }
    authorisations
}

/// `[audit]`: the file backend (the default) or PostgreSQL, fail-closed by default.
fn build_audit(sources: &[Source], problems: &mut Problems) -> AuditConfig {
    match single(sources, "audit", |r| r.audit.as_ref(), problems) {
        None => AuditConfig {
            backend: AuditBackend::File {
                dir: sources
                    .first()
                    .map_or_else(PathBuf::new, |s| s.dir.join("audit")),
            },
            fail_closed: true,
            retention_days: 3653,
            seals: audit::seal::Seals::default(),
        },
        Some((s, a)) => {
            let url = url_setting(s, "audit.url", &a.url, &a.url_file, problems);
            // The trail's (or the state's) directory: made at start when missing, but
            // something else in its place would only fail then.
            if let Some(dir) = &a.dir {
                let path = s.dir.join(dir);
                if path.exists() && !path.is_dir() {
                    problems.add(
                        &s.path,
                        "audit.dir",
                        format!("{} exists and is not a directory", path.display()),
                    );
                }
            }
            let backend = match a.backend.as_str() {
                "file" => AuditBackend::File {
                    dir: s.dir.join(a.dir.as_deref().unwrap_or("audit")),
                },
                "postgres" => match url.as_ref().map(Option::as_deref) {
                    Ok(Some(url))
                        if (url.starts_with("postgres://") || url.starts_with("postgresql://"))
                            && audit::pg_tls::target(url).is_err() =>
                    {
                        let why = audit::pg_tls::target(url).err().unwrap_or_default();
                        let key = if a.url_file.is_some() {
                            "audit.url_file"
                        } else {
                            "audit.url"
                        };
                        problems.add(&s.path, key, format!("TLS to PostgreSQL: {why}"));
                        AuditBackend::File {
                            dir: s.dir.join("audit"),
                        }
                    }
                    Ok(Some(url))
                        if url.starts_with("postgres://") || url.starts_with("postgresql://") =>
                    {
                        AuditBackend::Postgres {
                            url: url.to_owned(),
                            state_dir: s.dir.join(a.dir.as_deref().unwrap_or("audit")),
                        }
                    }
                    Ok(Some(_)) => {
                        problems.add(
                            &s.path,
                            "audit.url",
                            "must be a postgres:// URL (e.g. postgres://fsp@127.0.0.1/fsp)",
                        );
                        AuditBackend::File {
                            dir: s.dir.join("audit"),
                        }
                    }
                    Err(Reported) => AuditBackend::File {
                        dir: s.dir.join("audit"),
                    },
                    Ok(None) => {
                        problems.add(
                            &s.path,
                            "audit.url",
                            "required with backend = \"postgres\" (e.g. postgres://fsp@127.0.0.1/fsp)",
                        );
                        AuditBackend::File {
                            dir: s.dir.join("audit"),
                        }
                    }
                },
                "none" => {
                    if a.fail_closed != Some(false) {
                        problems.add(
                            &s.path,
                            "audit.backend",
                            "\"none\" keeps no audit trail, which a fail-closed gateway cannot run without: \
                             set fail_closed = false as well (for capacity tests only, never in production)",
                        );
                    }
                    AuditBackend::None {
                        state_dir: s.dir.join(a.dir.as_deref().unwrap_or("audit")),
                    }
                }
                other => {
                    problems.add(
                        &s.path,
                        "audit.backend",
                        format!("`{other}` is not file, postgres or none"),
                    );
                    AuditBackend::File {
                        dir: s.dir.join("audit"),
                    }
                }
            };
            if matches!(url, Ok(Some(_))) && (a.backend == "file" || a.backend == "none") {
                problems.add(
                    &s.path,
                    "audit.url",
                    "only used by the postgres backend; remove it or set backend = \"postgres\"",
                );
            }
            let retention_days = a.retention_days.unwrap_or(3653);
            if !(1..=MAX_RETENTION_DAYS).contains(&retention_days) {
                problems.add(
                    &s.path,
                    "audit.retention_days",
                    format!(
                        "must be from 1 to {MAX_RETENTION_DAYS} (100 years); {retention_days} is not"
                    ),
                );
            }
            AuditConfig {
                backend,
                fail_closed: a.fail_closed.unwrap_or(true),
                retention_days,
                seals: build_seals(s, a, problems),
            }
        }
    }
}

/// `[audit] signing_key` and `verify_keys`: the writer's Ed25519 key and earlier keys'
/// public halves, each read and checked now.
fn build_seals(s: &Source, a: &raw::RawAudit, problems: &mut Problems) -> audit::seal::Seals {
    use audit::seal::{PublicKey, Seals, SigningKey};
    let read = |key: &str, file: &str, problems: &mut Problems| -> Option<Vec<u8>> {
        let path = s.dir.join(file);
        match certs::load::read_regular_file(&path, 64 * 1024) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                problems.add(&s.path, key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    };
    let mut earlier = Vec::new();
    for (i, file) in a.verify_keys.iter().flatten().enumerate() {
        let key = format!("audit.verify_keys[{i}]");
        if let Some(pem) = read(&key, file, problems) {
            match PublicKey::from_pem(&pem) {
                Ok(k) => earlier.push(k),
                Err(why) => problems.add(&s.path, key, format!("{file} {why}")),
            }
        }
    }
    let Some(file) = &a.signing_key else {
        if a.verify_keys.as_ref().is_some_and(|k| !k.is_empty()) {
            problems.add(
                &s.path,
                "audit.verify_keys",
                "lists earlier signing keys, but signing_key (the current one) is not set",
            );
        }
        return Seals::default();
    };
    let Some(pem) = read("audit.signing_key", file, problems) else {
        return Seals::default();
    };
    match SigningKey::from_pem(&pem) {
        Ok(key) => Seals::new(key, earlier),
        Err(why) => {
            problems.add(&s.path, "audit.signing_key", format!("{file} {why}"));
            Seals::default()
        }
    }
}

/// `[throttle]`: local, or Redis with a checked URL, and what to do when Redis fails.
fn build_throttle(
    sources: &[Source],
    files: &mut RedisTlsFiles<'_>,
    problems: &mut Problems,
) -> ThrottleConfig {
    match single(sources, "throttle", |r| r.throttle.as_ref(), problems) {
        None => ThrottleConfig {
            backend: ThrottleBackend::Local,
            on_backend_error: OnBackendError::Local,
            replicas: 1,
        },
        Some((s, t)) => {
            let url = url_setting(s, "throttle.url", &t.url, &t.url_file, problems);
            let backend = match (t.backend.as_str(), url) {
                ("local", Ok(None) | Err(Reported)) => ThrottleBackend::Local,
                ("local", Ok(Some(_))) => {
                    problems.add(
                        &s.path,
                        "throttle.url",
                        "only used by the redis backend: remove it or set backend = \"redis\"",
                    );
                    ThrottleBackend::Local
                }
                ("redis", Ok(Some(url))) => {
                    check_redis_url(s, "throttle.url", &url, problems);
                    let tls = redis_tls(s, "throttle.tls", &url, t.tls.as_ref(), files, problems);
                    redis_client(s, "throttle.url", &url, tls.as_ref(), problems);
                    ThrottleBackend::Redis { url, tls }
                }
                ("redis", Ok(None)) => {
                    problems.add(
                        &s.path,
                        "throttle.url",
                        "required with backend = \"redis\" (e.g. redis://127.0.0.1:6379)",
                    );
                    ThrottleBackend::Local
                }
                ("redis", Err(Reported)) => ThrottleBackend::Local,
                (other, _) => {
                    problems.add(
                        &s.path,
                        "throttle.backend",
                        format!("`{other}` is not local or redis"),
                    );
                    ThrottleBackend::Local
                }
            };
            let on_backend_error = match t.on_backend_error.as_deref().unwrap_or("local") {
                "local" => OnBackendError::Local,
                "deny" => OnBackendError::Deny,
                "allow" => OnBackendError::Allow,
                other => {
                    problems.add(
                        &s.path,
                        "throttle.on_backend_error",
                        format!("`{other}` is not local, deny or allow"),
                    );
                    OnBackendError::Local
                }
            };
            let replicas = t.replicas.unwrap_or(1);
            if replicas == 0 {
                problems.add(&s.path, "throttle.replicas", "must be at least 1");
            }
            // Replicas share limits only through Redis. (`on_backend_error` is accepted
            // with the local backend, as in the contract's example: there it names what
            // is already done.)
            if t.backend == "local" && t.replicas.is_some() {
                problems.add(
                    &s.path,
                    "throttle.replicas",
                    "only used by the redis backend (each replica's share of a limit): remove it or set backend = \"redis\"",
                );
            }
            ThrottleConfig {
                backend,
                on_backend_error,
                replicas: replicas.max(1),
            }
        }
    }
}

/// A setting whose problem has been reported already: the caller adds none of its own.
#[derive(Debug)]
struct Reported;

/// A URL given in the file (`key`) or in a file of its own (`key_file`, a mounted
/// secret: such URLs carry passwords). Exactly one of them, or neither (`Ok(None)`);
/// a `key_file` that cannot be read is `Err(Reported)`.
fn url_setting(
    s: &Source,
    key: &str,
    url: &Option<String>,
    url_file: &Option<String>,
    problems: &mut Problems,
) -> Result<Option<String>, Reported> {
    Ok(match (url, url_file) {
        (Some(_), Some(_)) => {
            problems.add(
                &s.path,
                format!("{key}_file"),
                format!("give {key} or {key}_file, not both"),
            );
            url.clone()
        }
        (Some(url), None) => Some(url.clone()),
        (None, Some(file)) => {
            let path = s.dir.join(file);
            match read_text(&path) {
                Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
                Ok(_) => {
                    problems.add(
                        &s.path,
                        format!("{key}_file"),
                        format!("{} is empty", path.display()),
                    );
                    return Err(Reported);
                }
                Err(e) => {
                    problems.add(
                        &s.path,
                        format!("{key}_file"),
                        format!("cannot read {}: {e}", path.display()),
                    );
                    return Err(Reported);
                }
            }
        }
        (None, None) => None,
    })
}

/// A CIDR block, or one address (a block of one).
fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// A Redis URL: `redis://host[:port]`, `rediss://...` or `unix:///path`.
fn check_redis_url(s: &Source, key: &str, url: &str, problems: &mut Problems) {
    let scheme = url.split_once("://").map(|(s, _)| s);
    let host = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned));
    if !matches!(scheme, Some("redis" | "rediss" | "unix"))
        || (scheme != Some("unix") && host.is_none())
    {
        // The URL may carry a password: only its scheme is repeated.
        problems.add(
            &s.path,
            key,
            format!(
                "the value (scheme `{}`) is not a Redis URL such as redis://127.0.0.1:6379",
                scheme.unwrap_or("none")
            ),
        );
    }
}

/// Whether the gateway can make its Redis client of `url` and `tls` (as it will at
/// start): a `#fragment` on a rediss:// URL (`#insecure` would check no certificate) is
/// refused there, however it is spelt. Only for a URL that passed [`check_redis_url`].
fn redis_client(
    s: &Source,
    key: &str,
    url: &str,
    tls: Option<&throttle::redis::RedisTls>,
    problems: &mut Problems,
) {
    let scheme = url.split_once("://").map(|(s, _)| s);
    if matches!(scheme, Some("redis" | "rediss" | "unix"))
        && let Err(e) = throttle::redis::client(url, tls)
    {
        // The error never repeats the URL (it may carry a password).
        problems.add(&s.path, key, e.0);
    }
}

/// Where the files of TLS to Redis are listed: with the configuration's certificates
/// (their expiry is watched and reported) and with the files whose change reloads the
/// configuration (the running Redis clients are then renewed: see `crate::redis_tls`).
struct RedisTlsFiles<'a> {
    certificates: &'a mut Vec<(String, PathBuf)>,
    watched: &'a mut Vec<PathBuf>,
}

/// TLS to Redis (`key`: `throttle.tls` or `cluster.redis_tls`): taken only with a
/// `rediss://` URL; the files read and checked now (PEM certificates, a key), so that
/// a wrong one is a problem of the configuration, not of the first call.
fn redis_tls(
    s: &Source,
    key: &str,
    url: &str,
    raw: Option<&RawRedisTls>,
    files: &mut RedisTlsFiles<'_>,
    problems: &mut Problems,
) -> Option<throttle::redis::RedisTls> {
    let raw = raw?;
    if !url.starts_with("rediss://") {
        problems.add(
            &s.path,
            key,
            "takes effect only with a rediss:// URL (TLS to Redis): remove it, or use rediss://",
        );
        return None;
    }
    let mut ok = true;
    let mut read = |field: &str, path: &str, certificates: bool| -> Option<Vec<u8>> {
        let path = s.dir.join(path);
        files.watched.push(path.clone());
        if certificates {
            files
                .certificates
                .push((format!("{key}.{field}"), path.clone()));
        }
        let bytes = match certs::load::read_regular_file(&path, MAX_CONFIG_FILE) {
            Ok(b) => b,
            Err(e) => {
                problems.add(
                    &s.path,
                    format!("{key}.{field}"),
                    format!("{}: {e}", path.display()),
                );
                ok = false;
                return None;
            }
        };
        use rustls::pki_types::pem::PemObject;
        let usable = if certificates {
            rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .is_ok_and(|c| !c.is_empty())
        } else {
            rustls::pki_types::PrivateKeyDer::from_pem_slice(&bytes).is_ok()
        };
        if !usable {
            let wanted = if certificates {
                "PEM certificates (-----BEGIN CERTIFICATE-----)"
            } else {
                "a PEM private key"
            };
            problems.add(
                &s.path,
                format!("{key}.{field}"),
                format!("{} does not hold {wanted}", path.display()),
            );
            ok = false;
            return None;
        }
        Some(bytes)
    };
    let ca = raw.ca.as_deref().and_then(|p| read("ca", p, true));
    let client = match (&raw.cert, &raw.key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let cert = read("cert", c, true);
            let key = read("key", k, false);
            cert.zip(key)
        }
        _ => {
            problems.add(
                &s.path,
                key,
                "cert and key go together: give both, or neither",
            );
            return None;
        }
    };
    ok.then_some(throttle::redis::RedisTls { ca, client })
}

/// `[cluster]`: the Redis that replicas share suspensions through.
fn build_cluster(
    s: &Source,
    c: &RawCluster,
    files: &mut RedisTlsFiles<'_>,
    problems: &mut Problems,
) -> Option<Cluster> {
    let url = url_setting(
        s,
        "cluster.redis_url",
        &c.redis_url,
        &c.redis_url_file,
        problems,
    )
    .ok()?;
    let Some(url) = url else {
        problems.add(
            &s.path,
            "cluster.redis_url",
            "required in [cluster] (e.g. redis://127.0.0.1:6379), or redis_url_file naming a file that holds it",
        );
        return None;
    };
    check_redis_url(s, "cluster.redis_url", &url, problems);
    let key_prefix = c.key_prefix.clone().unwrap_or_else(|| "fsp:".to_owned());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || !key_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b))
    {
        problems.add(
            &s.path,
            "cluster.key_prefix",
            "1 to 64 characters among letters, digits, '-', '_', ':' and '.' (e.g. \"fsp-int:\")",
        );
    }
    let redis_tls = redis_tls(
        s,
        "cluster.redis_tls",
        &url,
        c.redis_tls.as_ref(),
        files,
        problems,
    );
    redis_client(s, "cluster.redis_url", &url, redis_tls.as_ref(), problems);
    Some(Cluster {
        redis_url: url,
        redis_tls,
        key_prefix,
    })
}

/// `[telemetry]`: where spans go, under which name, and how many are kept.
fn build_telemetry(s: &Source, t: &RawTelemetry, problems: &mut Problems) -> Option<Telemetry> {
    let raw = t.otlp_endpoint.trim_end_matches('/');
    let endpoint = if let Some(rest) = raw.strip_prefix("grpc://") {
        Some(OtlpEndpoint::Grpc(format!("http://{rest}")))
    } else if raw.starts_with("http://") || raw.starts_with("https://") {
        Some(OtlpEndpoint::Http(raw.to_owned()))
    } else {
        None
    };
    let endpoint = endpoint.filter(|e| {
        let (OtlpEndpoint::Http(u) | OtlpEndpoint::Grpc(u)) = e;
        u.parse::<http::Uri>()
            .ok()
            .is_some_and(|u| u.host().is_some())
    });
    if endpoint.is_none() {
        problems.add(
            &s.path,
            "telemetry.otlp_endpoint",
            format!(
                "`{}` is not an OTLP endpoint: http://host:4318 (OTLP/HTTP, protobuf) or grpc://host:4317 (OTLP/gRPC)",
                t.otlp_endpoint
            ),
        );
    }
    let sampling_ratio = t.sampling_ratio.unwrap_or(0.01);
    if !(0.0..=1.0).contains(&sampling_ratio) {
        problems.add(
            &s.path,
            "telemetry.sampling_ratio",
            format!("{sampling_ratio} is not between 0 and 1"),
        );
    }
    let service_name = t.service_name.clone().unwrap_or_else(|| "fsp".into());
    if service_name.is_empty() {
        problems.add(&s.path, "telemetry.service_name", "must not be empty");
    }
    Some(Telemetry {
        endpoint: endpoint?,
        service_name,
        sampling_ratio: sampling_ratio.clamp(0.0, 1.0),
    })
}

fn build_listener(
    s: &Source,
    l: &RawListener,
    certificate_files: &mut Vec<(String, PathBuf)>,
    tls_files: &mut Vec<PathBuf>,
    problems: &mut Problems,
) -> Option<Listener> {
    let address = l.address.parse::<SocketAddr>().map_err(|_| {
        problems.add(
            &s.path,
            "listener.address",
            format!(
                "`{}` is not an IP address and port such as 0.0.0.0:8443",
                l.address
            ),
        );
    });
    let public_url = l.public_url.trim_end_matches('/').to_owned();
    if !(public_url.starts_with("https://") || public_url.starts_with("http://"))
        || public_url.parse::<http::Uri>().is_err()
    {
        problems.add(
            &s.path,
            "listener.public_url",
            format!("`{}` is not an absolute https:// URL", l.public_url),
        );
    }
    let files = certs::tls::ServerFiles {
        server_cert: s.dir.join(&l.server_cert),
        server_key: s.dir.join(&l.server_key),
        client_ca: s.dir.join(&l.client_ca),
        crls: l.crls.iter().flatten().map(|c| s.dir.join(c)).collect(),
    };
    certificate_files.push(("listener.server_cert".into(), files.server_cert.clone()));
    certificate_files.push(("listener.client_ca".into(), files.client_ca.clone()));
    let mut keys: Vec<(&str, &Path)> = vec![
        ("listener.server_cert", &files.server_cert),
        ("listener.server_key", &files.server_key),
        ("listener.client_ca", &files.client_ca),
    ];
    keys.extend(files.crls.iter().map(|c| ("listener.crls", c.as_path())));
    tls_files.extend(keys.iter().map(|(_, p)| p.to_path_buf()));
    let tls = if cert_files_load(&s.path, &keys, problems) {
        certs::tls::listener_tls(&files)
            .map_err(|e| cert_problem(&s.path, &keys, e, problems))
            .ok()
    } else {
        None
    };
    let max_request_bytes = l.max_request_bytes.unwrap_or(100 * 1024 * 1024);
    let handshake_timeout = duration_at_least(
        s,
        &l.handshake_timeout,
        Duration::from_secs(10),
        Duration::from_secs(1),
        "listener.handshake_timeout",
        "a TLS handshake needs time to finish (with 0, every connection would be cut in its handshake)",
        problems,
    );
    let header_read_timeout = duration_at_least(
        s,
        &l.header_read_timeout,
        Duration::from_secs(30),
        Duration::from_secs(1),
        "listener.header_read_timeout",
        "a request's headers need time to arrive (with 0, every request would be refused)",
        problems,
    );
    let drain_timeout = duration_at_least(
        s,
        &l.drain_timeout,
        Duration::from_secs(30),
        Duration::from_secs(1),
        "listener.drain_timeout",
        "calls in progress at SIGTERM need time to finish (with 0, they would all be cut)",
        problems,
    );
    let request_body_timeout = duration_at_least(
        s,
        &l.request_body_timeout,
        Duration::from_secs(30),
        Duration::from_secs(1),
        "listener.request_body_timeout",
        "a request body needs time to arrive (with 0, every call with a body would be answered 408)",
        problems,
    );
    let response_send_timeout = duration_at_least(
        s,
        &l.response_send_timeout,
        Duration::from_secs(60),
        Duration::from_secs(1),
        "listener.response_send_timeout",
        "a consumer needs time to take an answer",
        problems,
    );
    let mut count = |v: Option<usize>, k: &str, default: usize| {
        at_least_one(v, default, &s.path, &format!("listener.{k}"), problems)
    };
    let max = count(l.max_connections, "max_connections", 10_000);
    let connections = ConnectionLimits {
        max,
        max_explicit: l.max_connections.is_some(),
        per_ip: count(l.max_connections_per_ip, "max_connections_per_ip", 1_000),
        // A tenth of max_connections by default (1 000 of the default 10 000): connections
        // without a certificate are never evicted once past their handshake, so they
        // must leave room for the consumers'.
        anonymous: count(
            l.max_anonymous_connections,
            "max_anonymous_connections",
            anonymous_default(max),
        ),
        anonymous_per_ip: count(
            l.max_anonymous_connections_per_ip,
            "max_anonymous_connections_per_ip",
            64,
        ),
    };
    if l.max_anonymous_connections.is_some() && connections.anonymous >= connections.max {
        problems.add(
            &s.path,
            "listener.max_anonymous_connections",
            format!(
                "max_anonymous_connections ({}) must be below max_connections ({}): connections without a client certificate are never evicted once past their TLS handshake, so at or above it they could hold every place and keep consumers out (e.g. max_anonymous_connections = {})",
                connections.anonymous,
                connections.max,
                anonymous_default(connections.max)
            ),
        );
    }
    let mut proxy_protocol_from = Vec::new();
    for (i, cidr) in l.proxy_protocol_from.iter().flatten().enumerate() {
        match parse_net(cidr) {
            Some(net) => proxy_protocol_from.push(net),
            None => problems.add(
                &s.path,
                format!("listener.proxy_protocol_from[{i}]"),
                format!("`{cidr}` is not an address or CIDR such as 10.0.0.0/24"),
            ),
        }
    }
    let shutdown_delay = duration_or(
        &l.shutdown_delay,
        Duration::ZERO,
        &s.path,
        "listener.shutdown_delay",
        problems,
    );
    let threads = match l.threads {
        Some(0) => {
            problems.add(&s.path, "listener.threads", "must be at least 1");
            1
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    Some(Listener {
        threads,
        address: address.ok()?,
        public_url,
        tls: Arc::new(tls?),
        tls_files: files,
        max_request_bytes,
        handshake_timeout,
        header_read_timeout,
        drain_timeout,
        request_body_timeout,
        response_send_timeout,
        connections,
        proxy_protocol_from,
        shutdown_delay,
    })
}

fn build_admin(
    s: &Source,
    a: &RawAdmin,
    listener: Option<&Listener>,
    certificate_files: &mut Vec<(String, PathBuf)>,
    tls_files: &mut Vec<PathBuf>,
    problems: &mut Problems,
) -> Option<Admin> {
    let address = a.address.parse::<SocketAddr>().map_err(|_| {
        problems.add(
            &s.path,
            "admin.address",
            format!(
                "`{}` is not an IP address and port such as 127.0.0.1:9443",
                a.address
            ),
        );
    });
    if let (Ok(admin), Some(listener)) = (&address, listener)
        && admin.port() != 0
        && admin.port() == listener.address.port()
        && (admin.ip() == listener.address.ip()
            || admin.ip().is_unspecified()
            || listener.address.ip().is_unspecified())
    {
        problems.add(
            &s.path,
            "admin.address",
            format!(
                "{admin} is the consumers' listener's address too ({}): give the admin API a port of its own",
                listener.address
            ),
        );
    }
    let mut tokens = Vec::new();
    if let Some(f) = &a.tokens_file {
        let path = s.dir.join(f);
        match read_text(&path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    let t = line.trim();
                    if t.is_empty() || t.starts_with('#') {
                        continue;
                    }
                    let token = AdminToken::parse(t, tokens.len());
                    // A mistyped name would otherwise make the whole line a token of
                    // its own, and lock its administrator out. (Neither part is
                    // printed: either could be the secret.)
                    if token.line.is_none() && t.contains(':') {
                        problems.add(
                            &s.path,
                            "admin.tokens_file",
                            format!(
                                "{} line {}: the text before ':' is not a name (1 to 64 letters, digits, '.', '_', '@' or '-'): write name:token, and no ':' in a token without a name",
                                path.display(),
                                n + 1
                            ),
                        );
                    }
                    if token.token.len() < 16 {
                        problems.add(
                            &s.path,
                            "admin.tokens_file",
                            format!(
                                "{} line {}: token shorter than 16 characters",
                                path.display(),
                                n + 1
                            ),
                        );
                    }
                    if tokens.iter().any(|t: &AdminToken| t.token == token.token) {
                        problems.add(
                            &s.path,
                            "admin.tokens_file",
                            format!(
                                "{} line {}: this token is given twice: each administrator needs a token of their own",
                                path.display(),
                                n + 1
                            ),
                        );
                    }
                    if tokens.iter().any(|t: &AdminToken| t.name == token.name) {
                        problems.add(
                            &s.path,
                            "admin.tokens_file",
                            format!(
                                "{} line {}: the name `{}` is given twice: each administrator's records must say who acted",
                                path.display(),
                                n + 1,
                                token.name
                            ),
                        );
                    }
                    tokens.push(token);
                }
            }
            Err(e) => problems.add(
                &s.path,
                "admin.tokens_file",
                format!("cannot read {}: {e}", path.display()),
            ),
        }
    }
    let tls = a.tls.unwrap_or(false);
    let mut cns = Vec::new();
    for (i, cn) in a.admin_cns.iter().flatten().enumerate() {
        let cn = cn.trim();
        if cn.is_empty() || cn.chars().any(char::is_control) {
            problems.add(
                &s.path,
                format!("admin.admin_cns[{i}]"),
                "an empty CN or one with control characters cannot name an administrator",
            );
        } else if cns.iter().any(|c: &String| c == cn) {
            problems.add(
                &s.path,
                format!("admin.admin_cns[{i}]"),
                format!("`{cn}` is given twice"),
            );
        } else {
            cns.push(cn.to_owned());
        }
    }
    if !cns.is_empty() && !tls {
        problems.add(
            &s.path,
            "admin.admin_cns",
            "admin client certificates need the admin API over TLS: set tls = true",
        );
    }
    let admin_ca = a.admin_ca.as_ref().map(|c| s.dir.join(c));
    if admin_ca.is_some() && cns.is_empty() {
        problems.add(
            &s.path,
            "admin.admin_ca",
            "admin_ca is only used for admin client certificates: set admin_cns too, or remove it",
        );
    }
    if tokens.is_empty() && cns.is_empty() {
        problems.add(
            &s.path,
            "admin",
            if tls {
                "no way to authenticate administrators: set tokens_file (one token per line) or admin_cns"
            } else {
                "no way to authenticate administrators: set tokens_file (one token per line)"
            },
        );
    }
    let mut tls_config = None;
    let mut clients = None;
    if tls && let Some(l) = listener {
        let roots = if cns.is_empty() {
            None
        } else if let Some(ca) = &admin_ca {
            certificate_files.push(("admin.admin_ca".into(), ca.clone()));
            tls_files.push(ca.clone());
            cert_files_load(&s.path, &[("admin.admin_ca", ca)], problems).then_some(ca.as_path())
        } else {
            Some(l.tls_files.client_ca.as_path())
        };
        if !cns.is_empty() && roots.is_none() {
            // The problem with admin_ca is already reported.
        } else {
            match certs::tls::admin_tls(&l.tls_files, roots) {
                Ok(t) => {
                    tls_config = Some(Arc::new(t.config));
                    clients = t.clients.map(|v| (v, t.crls_fresh_before));
                }
                Err(e) => problems.add(
                    &s.path,
                    "admin.tls",
                    format!("cannot serve the admin API over TLS: {e}"),
                ),
            }
        }
    }
    Some(Admin {
        address: address.ok()?,
        access: AdminAccess {
            tokens,
            cns,
            tls: tls_config,
            clients,
            own_ca: admin_ca.is_some(),
        },
        admin_ca,
    })
}

/// `localhost`, or an address of the loopback network (`127.0.0.0/8`, `[::1]`).
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

const ALLOWED_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

fn build_oauth(s: &Source, o: &RawOAuth, problems: &mut Problems) -> Option<OAuth> {
    let jwks = match (&o.jwks_url, &o.jwks_file) {
        (Some(u), None) => match u.parse::<http::Uri>() {
            // In the clear, a key set can be replaced on its way: http:// only to this
            // machine (a development identity provider, tests).
            Ok(uri)
                if uri.host().is_some()
                    && (uri.scheme_str() == Some("https")
                        || (uri.scheme_str() == Some("http")
                            && uri.host().is_some_and(is_loopback_host))) =>
            {
                JwksSource::Url(uri)
            }
            _ => {
                problems.add(
                    &s.path,
                    "oauth.jwks_url",
                    format!("`{u}` is not an absolute https:// URL (http:// is accepted only to a loopback address: a key set fetched in the clear can be replaced on its way)"),
                );
                return None;
            }
        },
        (None, Some(f)) => {
            let path = s.dir.join(f);
            if let Err(e) = std::fs::metadata(&path) {
                problems.add(
                    &s.path,
                    "oauth.jwks_file",
                    format!("cannot read {}: {e}", path.display()),
                );
            }
            JwksSource::File(path)
        }
        _ => {
            problems.add(
                &s.path,
                "oauth",
                "set exactly one of jwks_url and jwks_file",
            );
            return None;
        }
    };
    let names = o.algorithms.clone().unwrap_or_else(|| {
        vec![
            "RS256".into(),
            "ES256".into(),
            "PS256".into(),
            "EdDSA".into(),
        ]
    });
    let mut algorithms = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match name.parse::<jsonwebtoken::Algorithm>() {
            Ok(alg) if ALLOWED_ALGORITHMS.contains(&name.as_str()) => algorithms.push(alg),
            _ => problems.add(
                &s.path,
                format!("oauth.algorithms[{i}]"),
                format!(
                    "`{name}` is not allowed; use asymmetric algorithms only ({})",
                    ALLOWED_ALGORITHMS.join(", ")
                ),
            ),
        }
    }
    let mut leeway = duration_or(
        &o.leeway,
        Duration::from_secs(60),
        &s.path,
        "oauth.leeway",
        problems,
    );
    if leeway > MAX_LEEWAY {
        problems.add(
            &s.path,
            "oauth.leeway",
            format!(
                "{}s is more than 5m: tokens would be accepted that long after they expired; clocks further apart than a few minutes are an NTP fault to fix, not to allow for",
                leeway.as_secs()
            ),
        );
        leeway = MAX_LEEWAY;
    }
    Some(OAuth {
        issuer: o.issuer.clone(),
        jwks,
        audience: o.audience.clone(),
        algorithms,
        client_id_claim: o
            .client_id_claim
            .clone()
            .unwrap_or_else(|| "client_id".into()),
        require_certificate_binding: o.require_certificate_binding.unwrap_or(false),
        leeway,
        max_token_bytes: o.max_token_bytes.unwrap_or(8192),
    })
}

/// The most clock skew `oauth.leeway` may allow on a token's `exp` and `nbf`.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Consumer certificates are replaced yearly: `fsp check` warns about one issued for
/// longer than this many days (a year, leap day included). Whole days are counted, so a
/// CA that backdates `not_before` by a few hours is not warned about.
pub const CONSUMER_CERTIFICATE_MAX_DAYS: i64 = 366;

/// `fsp check` warns about a pinned consumer certificate that expires within this many
/// days, so that its successor is pinned beside it in time.
pub const PINNED_CERTIFICATE_NOTICE_DAYS: i64 = 14;

/// A consumer's certificate file (`consumer.certificates[].file`) that loaded: where it
/// is named and its leaf certificate, for the warnings.
struct PinnedFile {
    config: PathBuf,
    key: String,
    /// The path as the configuration writes it.
    written: String,
    leaf: certs::inventory::CertInfo,
}

/// What `fsp check` says of a pinned consumer certificate (`written` is its file as the
/// configuration names it) at `now`: expired (the consumer may already call with its
/// successor, so only a warning), expiring within [`PINNED_CERTIFICATE_NOTICE_DAYS`], or
/// issued for more than [`CONSUMER_CERTIFICATE_MAX_DAYS`] (not said of an expired one:
/// removing it settles both).
pub fn pinned_certificate_warnings(
    written: &str,
    leaf: &certs::inventory::CertInfo,
    now: time::OffsetDateTime,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(ago) = leaf.expired_ago(now) {
        out.push(format!("{written} {ago}: remove it"));
        return out;
    }
    if leaf.not_after < now + time::Duration::days(PINNED_CERTIFICATE_NOTICE_DAYS) {
        let when = match leaf.days_left(now) {
            0 => "in less than a day".to_owned(),
            1 => "in 1 day".to_owned(),
            n => format!("in {n} days"),
        };
        out.push(format!(
            "{written} expires {when} ({}): issue its successor and pin both during the changeover",
            crate::pipeline::stamp::rfc3339_millis(leaf.not_after)
        ));
    }
    let days = leaf.validity_days();
    if days > CONSUMER_CERTIFICATE_MAX_DAYS {
        out.push(format!(
            "{written} is valid for {days} days, more than 12 months: consumer certificates are replaced yearly"
        ));
    }
    out
}

/// One consumer as declared. A certificate entry with a problem is left out, so that it
/// is reported once, under its own key.
fn build_consumer(
    s: &Source,
    key: &str,
    c: &RawConsumer,
    certificate_files: &mut Vec<(String, PathBuf)>,
    tls_files: &mut Vec<PathBuf>,
    pinned_files: &mut Vec<PinnedFile>,
    problems: &mut Problems,
) -> ConsumerSpec {
    let mut certificates = Vec::new();
    for (i, cert) in c.certificates.iter().flatten().enumerate() {
        let at = format!("{key}.certificates[{i}]");
        let before = problems.0.len();
        if cert.cn.is_none() && cert.sha256.is_none() && cert.file.is_none() {
            problems.add(
                &s.path,
                &at,
                "a certificate entry needs a `cn`, a `sha256` or a `file` (or a `cn` with one of the others)",
            );
            continue;
        }
        // A certificate without a readable CN (none, several, not a string) is matched
        // by no CN: an empty one, or one a certificate's CN cannot equal, would take
        // such certificates or never match.
        if let Some(cn) = &cert.cn
            && (cn.is_empty() || cn.trim() != cn || cn.chars().any(char::is_control))
        {
            problems.add(
                &s.path,
                format!("{at}.cn"),
                "a CN must not be empty, start or end with white space, or hold control characters",
            );
            continue;
        }
        let mut sha256 = cert.sha256.as_ref().and_then(|h| {
            let parsed = Sha256::parse(h);
            if parsed.is_none() {
                problems.add(
                    &s.path,
                    format!("{at}.sha256"),
                    "not a SHA-256 fingerprint (64 hex digits, colons allowed)",
                );
            }
            parsed
        });
        // A file pins its leaf certificate, as `sha256` would.
        if let Some(written) = &cert.file {
            let file_key = format!("{at}.file");
            let path = s.dir.join(written);
            let role = format!("{file_key} ({})", c.id);
            certificate_files.push((role.clone(), path.clone()));
            tls_files.push(path.clone());
            let leaf = certs::inventory::describe(&role, &path)
                .map_err(|e| problems.add(&s.path, &file_key, e.to_string()))
                .ok()
                .and_then(|list| list.into_iter().next());
            if let Some(leaf) = leaf {
                let pin = Sha256::parse(&leaf.sha256);
                match (sha256, pin) {
                    (Some(given), Some(pin)) if given != pin => problems.add(
                        &s.path,
                        format!("{at}.sha256"),
                        format!(
                            "{given} is not the fingerprint of the certificate in `{written}` ({pin}): give that certificate's, or leave `sha256` out"
                        ),
                    ),
                    (_, Some(pin)) => sha256 = Some(pin),
                    (_, None) => problems.add(
                        &s.path,
                        &file_key,
                        format!("the fingerprint of `{written}` could not be read"),
                    ),
                }
                if let Some(cn) = &cert.cn
                    && leaf.cn.as_deref() != Some(cn.as_str())
                {
                    problems.add(
                        &s.path,
                        format!("{at}.cn"),
                        format!(
                            "the certificate in `{written}` has {}, not `{cn}`: this entry would never accept it",
                            leaf.cn.as_deref().map_or_else(|| "no CN".to_owned(), |l| format!("CN `{l}`"))
                        ),
                    );
                }
                pinned_files.push(PinnedFile {
                    config: s.path.clone(),
                    key: file_key,
                    written: written.clone(),
                    leaf,
                });
            }
        }
        if problems.0.len() == before {
            certificates.push(CertificateSpec {
                cn: cert.cn.clone(),
                sha256,
            });
        }
    }
    let source_ips = c
        .source_ips
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, ip)| {
            let parsed = parse_net(ip);
            if parsed.is_none() {
                problems.add(
                    &s.path,
                    format!("{key}.source_ips[{i}]"),
                    format!("`{ip}` is not an IP address or CIDR block"),
                );
            }
            parsed
        })
        .collect();
    ConsumerSpec {
        id: c.id.clone(),
        organisation: c.organisation.clone(),
        enterprise_number: c.enterprise_number.clone(),
        certificates,
        oauth_client_ids: c.oauth_client_ids.clone().unwrap_or_default(),
        source_ips,
    }
}

fn build_provider(
    s: &Source,
    key: &str,
    p: &RawProvider,
    declared_consumers: &HashSet<&str>,
    certificate_files: &mut Vec<(String, PathBuf)>,
    tls_files: &mut Vec<PathBuf>,
    problems: &mut Problems,
) -> Option<Provider> {
    let rate = |raw: &Option<RawLimit>, k: &str, problems: &mut Problems| {
        raw.as_ref().and_then(|l| {
            let r = parse_rate(&l.rate, l.burst);
            if r.is_none() {
                problems.add(
                    &s.path,
                    format!("{key}.{k}.rate"),
                    format!("`{}` is not a rate such as 1000/s or 60000/min", l.rate),
                );
            }
            r
        })
    };
    let limit = rate(&p.limit, "limit", problems);
    let consumer_limit = rate(&p.consumer_limit, "consumer_limit", problems);
    let mut consumer_limits = HashMap::new();
    for (i, cl) in p.consumer_limits.iter().flatten().enumerate() {
        let k = format!("{key}.consumer_limits[{i}]");
        if !declared_consumers.contains(cl.consumer.as_str()) {
            problems.add(
                &s.path,
                format!("{k}.consumer"),
                format!("no consumer with id `{}` is declared", cl.consumer),
            );
        }
        match parse_rate(&cl.rate, cl.burst) {
            Some(r) => {
                consumer_limits.insert(cl.consumer.clone(), r);
            }
            None => problems.add(
                &s.path,
                format!("{k}.rate"),
                format!("`{}` is not a rate such as 1000/s or 60000/min", cl.rate),
            ),
        }
    }
    let upstream_ca = p.upstream_ca.as_ref().map(|f| s.dir.join(f));
    let client = match (&p.client_cert, &p.client_key) {
        (Some(c), Some(k)) => Some((s.dir.join(c), s.dir.join(k))),
        (None, None) => None,
        _ => {
            problems.add(
                &s.path,
                key,
                "client_cert and client_key go together: set both or neither",
            );
            None
        }
    };
    if let Some(ca) = &upstream_ca {
        certificate_files.push((format!("{key}.upstream_ca ({})", p.id), ca.clone()));
    }
    if let Some((c, _)) = &client {
        certificate_files.push((format!("{key}.client_cert ({})", p.id), c.clone()));
    }
    let ca_key = format!("{key}.upstream_ca");
    let cert_key = format!("{key}.client_cert");
    let key_key = format!("{key}.client_key");
    let mut keys: Vec<(&str, &Path)> = Vec::new();
    if let Some(ca) = &upstream_ca {
        keys.push((&ca_key, ca));
    }
    if let Some((c, k)) = &client {
        keys.push((&cert_key, c));
        keys.push((&key_key, k));
    }
    tls_files.extend(keys.iter().map(|(_, p)| p.to_path_buf()));
    if !cert_files_load(&s.path, &keys, problems) {
        return None;
    }
    let tls = certs::tls::upstream_config(
        upstream_ca.as_deref(),
        client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .map_err(|e| cert_problem(&s.path, &keys, e, problems))
    .ok()?;
    let max_connections = at_least_one(
        p.max_connections,
        512,
        &s.path,
        &format!("{key}.max_connections"),
        problems,
    );
    // By default a consumer may hold half the provider's slots, so that one consumer's
    // slow calls always leave room for the others.
    let per_consumer = at_least_one(
        p.max_connections_per_consumer,
        (max_connections / 2).max(1),
        &s.path,
        &format!("{key}.max_connections_per_consumer"),
        problems,
    )
    .min(max_connections);
    Some(Provider {
        id: p.id.clone(),
        name: p.name.clone(),
        limit,
        consumer_limit,
        consumer_limits,
        tls: Arc::new(tls),
        connect_timeout: duration_at_least(
            s,
            &p.connect_timeout,
            Duration::from_secs(5),
            Duration::from_millis(1),
            &format!("{key}.connect_timeout"),
            "with 0, every call to this provider would fail with FSP-UPSTREAM-UNAVAILABLE",
            problems,
        ),
        response_timeout: duration_at_least(
            s,
            &p.response_timeout,
            Duration::from_secs(60),
            Duration::from_millis(1),
            &format!("{key}.response_timeout"),
            "with 0, every call to this provider would fail with FSP-UPSTREAM-TIMEOUT",
            problems,
        ),
        pool_idle_timeout: duration_or(
            &p.pool_idle_timeout,
            Duration::from_secs(90),
            &s.path,
            &format!("{key}.pool_idle_timeout"),
            problems,
        ),
        pool_max_idle: p.pool_max_idle.unwrap_or(256),
        max_connections,
        queue_timeout: duration_or(
            &p.queue_timeout,
            Duration::from_secs(1),
            &s.path,
            &format!("{key}.queue_timeout"),
            problems,
        ),
        cap: Arc::new(crate::limits::ConnCap::with_consumers(
            max_connections,
            per_consumer,
            declared_consumers.iter().copied(),
        )),
    })
}

fn build_service(
    s: &Source,
    key: &str,
    family: &str,
    svc: &RawService,
    problems: &mut Problems,
) -> Option<ServiceSpec> {
    let protocol = Protocol::parse(&svc.protocol).or_else(|| {
        problems.add(
            &s.path,
            format!("{key}.protocol"),
            format!("`{}` is not soap or rest", svc.protocol),
        );
        None
    });
    let mut versions = Vec::new();
    for (vi, v) in svc.version.iter().enumerate() {
        let vkey = format!("{key}.version[{vi}]");
        let version_ok = check_id(&s.path, &format!("{vkey}.version"), &v.version, problems);
        let date = |d: &toml::value::Datetime, k: &str, problems: &mut Problems| {
            let parsed = toml_date(d);
            if parsed.is_none() {
                problems.add(
                    &s.path,
                    format!("{vkey}.{k}"),
                    format!("`{d}` is not a plain date such as 2026-03-01"),
                );
            }
            parsed
        };
        let released = date(&v.released, "released", problems);
        let deprecated = v
            .deprecated
            .as_ref()
            .map(|d| date(d, "deprecated", problems));
        let sunset = v.sunset.as_ref().map(|d| date(d, "sunset", problems));
        let upstream = v.upstream.parse::<http::Uri>().map_err(|e| {
            problems.add(
                &s.path,
                format!("{vkey}.upstream"),
                format!("`{}` is not a URL: {e}", v.upstream),
            );
        });
        let vprotocol = match &v.protocol {
            None => Some(None),
            Some(p) => match Protocol::parse(p) {
                Some(p) => Some(Some(p)),
                None => {
                    problems.add(
                        &s.path,
                        format!("{vkey}.protocol"),
                        format!("`{p}` is not soap or rest"),
                    );
                    None
                }
            },
        };
        if let (
            true,
            Some(released),
            Some(deprecated),
            Some(sunset),
            Ok(upstream),
            Some(protocol),
        ) = (
            version_ok,
            released,
            deprecated.unwrap_or(Some(time::Date::MIN)),
            sunset.unwrap_or(Some(time::Date::MIN)),
            upstream,
            vprotocol,
        ) {
            versions.push(VersionSpec {
                version: v.version.clone(),
                upstream,
                protocol,
                released,
                deprecated: v.deprecated.as_ref().map(|_| deprecated),
                sunset: v.sunset.as_ref().map(|_| sunset),
            });
        }
    }
    if versions.len() != svc.version.len() {
        return None;
    }
    Some(ServiceSpec {
        family: family.to_owned(),
        id: svc.id.clone(),
        protocol: protocol?,
        versions,
    })
}

/// An optional date setting: `Some(None)` when absent, `None` (with a problem) when
/// present but not a plain date.
fn optional_date(
    s: &Source,
    key: &str,
    value: &Option<toml::value::Datetime>,
    problems: &mut Problems,
) -> Option<Option<time::Date>> {
    match value {
        None => Some(None),
        Some(d) => match toml_date(d) {
            Some(d) => Some(Some(d)),
            None => {
                problems.add(&s.path, key, "not a plain date such as 2026-03-01");
                None
            }
        },
    }
}

fn build_authorisation(
    s: &Source,
    key: &str,
    a: &RawAuthorisation,
    declared_consumers: &HashSet<&str>,
    declared_services: &HashMap<String, Vec<&str>>,
    problems: &mut Problems,
) -> Option<Authorisation> {
    if !declared_consumers.contains(a.consumer.as_str()) {
        problems.add(
            &s.path,
            format!("{key}.consumer"),
            format!("no consumer with id `{}` is declared", a.consumer),
        );
    }
    let versions = a.versions.clone().unwrap_or_default();
    match declared_services.get(&a.service) {
        None => problems.add(
            &s.path,
            format!("{key}.service"),
            format!(
                "no service `{}` is declared (write family/service)",
                a.service
            ),
        ),
        Some(svc) => {
            for (i, v) in versions.iter().enumerate() {
                if !svc.contains(&v.as_str()) {
                    problems.add(
                        &s.path,
                        format!("{key}.versions[{i}]"),
                        format!("service {} has no version `{v}`", a.service),
                    );
                }
            }
        }
    }
    check_id(&s.path, &format!("{key}.id"), &a.id, problems);
    check_header_text(
        &s.path,
        &format!("{key}.purpose"),
        &a.purpose,
        "FSP-Purpose",
        problems,
    );
    check_header_text(
        &s.path,
        &format!("{key}.legal_basis.reference"),
        &a.legal_basis.reference,
        "FSP-Legal-Basis",
        problems,
    );
    let kind = LegalBasisKind::parse(&a.legal_basis.kind).or_else(|| {
        problems.add(
            &s.path,
            format!("{key}.legal_basis.kind"),
            format!(
                "`{}` is not authorisation, protocol or deliberation",
                a.legal_basis.kind
            ),
        );
        None
    });
    let valid_from = toml_date(&a.valid_from).or_else(|| {
        problems.add(
            &s.path,
            format!("{key}.valid_from"),
            "not a plain date such as 2026-03-01",
        );
        None
    });
    let valid_until = optional_date(s, &format!("{key}.valid_until"), &a.valid_until, problems);
    let revoked = optional_date(s, &format!("{key}.revoked"), &a.revoked, problems);
    let (valid_from, valid_until, kind, revoked) = (valid_from?, valid_until?, kind?, revoked?);
    if let Some(until) = valid_until
        && until < valid_from
    {
        problems.add(
            &s.path,
            format!("{key}.valid_until"),
            format!("{until} (the last valid day) comes before valid_from {valid_from}"),
        );
    }
    Some(Authorisation {
        id: a.id.clone(),
        consumer: a.consumer.clone(),
        service: a.service.clone(),
        versions,
        purpose: a.purpose.clone(),
        legal_basis: LegalBasis {
            kind,
            reference: a.legal_basis.reference.clone(),
            issuer: a.legal_basis.issuer.clone(),
        },
        provider_approval: a.provider_approval.clone(),
        valid_from,
        valid_until,
        revoked,
    })
}

#[cfg(test)]
mod tests;
