//! The gateway's shared state, swapped atomically on reload.
//!
//! Requests read one [`Snapshot`] at their start and use it to the end, so a reload never
//! mixes an old catalogue with new consumers inside one call, and never drops a
//! connection: open connections simply pick up the new snapshot on their next request.
//! The listener's TLS configuration is swapped the same way; handshakes in progress
//! finish with the configuration they started with.

// Keys come from the configuration (requests only look them up): a fast hash will do.
use foldhash::HashMap;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use catalogue::Catalogue;
use http::{HeaderName, HeaderValue};
use metrics_exporter_prometheus::PrometheusHandle;
use policy::{Authorisations, Consumers};
use serde_json::{Value, json};

use crate::config::{Config, Provider};
use crate::observe::Sparse;
use crate::response::Recorder;
use crate::transport::pool::{PoolSettings, Upstream};

/// Everything a request needs to be decided and routed.
#[derive(Debug)]
pub struct Snapshot {
    pub catalogue: Catalogue,
    pub consumers: Consumers,
    pub authorisations: Authorisations,
    /// Providers and their connection settings; each worker thread builds its own
    /// upstream pools from them (see [`Local`]).
    pub providers: Vec<crate::config::Provider>,
    pub public_url: String,
    pub max_request_bytes: u64,
    pub fail_closed: bool,
    pub request_body_timeout: std::time::Duration,
    /// The options of the services that set their own.
    pub service_options: HashMap<String, crate::config::ServiceOptions>,
    /// The WSDLs served so far (fetched again after a reload).
    pub wsdl: crate::wsdl::Cache,
}

impl Snapshot {
    pub fn from_config(config: Config) -> (Self, Arc<certs::tls::ListenerTls>) {
        let tls = config.listener.tls.clone();
        (
            Self {
                catalogue: config.catalogue,
                consumers: config.consumers,
                authorisations: Authorisations::new(config.authorisations),
                providers: config.providers,
                public_url: config.listener.public_url,
                max_request_bytes: config.listener.max_request_bytes,
                fail_closed: config.audit.fail_closed,
                request_body_timeout: config.listener.request_body_timeout,
                service_options: config.service_options.into_iter().collect(),
                wsdl: crate::wsdl::Cache::default(),
            },
            tls,
        )
    }
}

impl Snapshot {
    /// The options of a service (`family/service`).
    pub fn service_options(&self, service: &str) -> crate::config::ServiceOptions {
        self.service_options
            .get(service)
            .copied()
            .unwrap_or_default()
    }
}

/// What an authorisation adds to each call it covers.
#[derive(Debug)]
pub struct Grant {
    /// `kind; reference`, for the audit record.
    pub legal_basis_text: String,
    /// `FSP-Consumer`, `FSP-Purpose`, `FSP-Legal-Basis`, `FSP-Authorisation` for the
    /// provider. `fsp check` refuses ids, purposes and references a header cannot carry;
    /// should one get here all the same, it is left out rather than sent mangled.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Grant {
    fn of(a: &policy::Authorisation) -> Self {
        use crate::headers::{FSP_AUTHORISATION, FSP_CONSUMER, FSP_LEGAL_BASIS, FSP_PURPOSE};
        let legal_basis_text = a.legal_basis.to_string();
        let headers = [
            (FSP_CONSUMER, a.consumer.as_str()),
            (FSP_PURPOSE, a.purpose.as_str()),
            (FSP_LEGAL_BASIS, legal_basis_text.as_str()),
            (FSP_AUTHORISATION, a.id.as_str()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, HeaderValue::from_str(value).ok()?)))
        .collect();
        Self {
            legal_basis_text,
            headers,
        }
    }
}

/// One worker thread's view of the gateway, handed to each of its calls.
///
/// A call holds this (reference counted per thread) rather than the shared `Gateway`
/// and `Snapshot` themselves: their reference counts, and those of the header values
/// below, would otherwise be written by every call on every core, and a cache line
/// bouncing between cores costs more than the rest of the bookkeeping. The view is
/// replaced when a reload swaps the snapshot.
#[derive(Debug)]
pub struct Local {
    pub gw: Arc<Gateway>,
    pub snap: Arc<Snapshot>,
    /// This thread's upstream pools, by provider id.
    pub upstreams: HashMap<Arc<str>, Arc<Upstream>>,
    /// The `FSP-*` header values of each authorisation, by id, made by this thread
    /// (a header value's buffer is reference counted; these are counted by one core).
    pub grants: HashMap<String, Grant>,
    /// This thread's metric handles of each provider, by provider id.
    pub provider_metrics: HashMap<Arc<str>, crate::observe::ProviderMetrics>,
}

impl Local {
    /// The calling thread's view of `gw`, made anew after a reload.
    pub fn of(gw: &Arc<Gateway>) -> Arc<Local> {
        thread_local! {
            static LOCAL: std::cell::RefCell<Option<Arc<Local>>> =
                const { std::cell::RefCell::new(None) };
        }
        let current = gw.snapshot.load();
        LOCAL.with(|cell| {
            let mut cell = cell.borrow_mut();
            if let Some(local) = &*cell
                && Arc::ptr_eq(&local.snap, &current)
                && Arc::ptr_eq(&local.gw, gw)
            {
                return local.clone();
            }
            let snap = arc_swap::Guard::into_inner(current);
            let grants = snap
                .authorisations
                .iter()
                .map(|a| (a.id.clone(), Grant::of(a)))
                .collect();
            let provider_metrics = snap
                .providers
                .iter()
                .map(|p| {
                    (
                        Arc::from(p.id.as_str()),
                        crate::observe::ProviderMetrics::new(&p.id),
                    )
                })
                .collect();
            let local = Arc::new(Local {
                provider_metrics,
                upstreams: upstreams(&snap.providers),
                gw: gw.clone(),
                snap,
                grants,
            });
            *cell = Some(local.clone());
            local
        })
    }
}

/// A finished call's record goes to the gateway's audit sink; a record that cannot be
/// queued is counted and logged (the sink's own health decides whether calls go on).
impl Recorder for Local {
    fn observe(&self, record: &audit::Record, elapsed: std::time::Duration) {
        crate::observe::call(&self.snap.catalogue, &self.snap.consumers, record, elapsed);
    }

    fn record(&self, record: Box<audit::Record>) {
        if let Err(e) = self.gw.audit.submit(*record) {
            metrics::counter!("fsp_audit_records_lost_total").increment(1);
            tracing::error!(error = %e, "audit record could not be queued");
        }
    }
}

/// Pools for every provider, by provider id, each swept of expired idle connections by
/// a task on the calling thread's runtime (which ends when the pools are replaced).
///
/// Each worker thread makes its own, with its [`Local`] view: a pooled connection is
/// always driven by the thread that uses it, so a request never wakes another thread. A
/// reload makes new pools; the old connections close as their last calls end.
fn upstreams(providers: &[Provider]) -> HashMap<Arc<str>, Arc<Upstream>> {
    let pools: HashMap<Arc<str>, Arc<Upstream>> = providers
        .iter()
        .map(|p| {
            let settings = PoolSettings {
                tls: p.tls.clone(),
                connect_timeout: p.connect_timeout,
                response_timeout: p.response_timeout,
                idle_timeout: p.pool_idle_timeout,
                max_idle: p.pool_max_idle,
                cap: p.cap.clone(),
                queue_timeout: p.queue_timeout,
            };
            (Arc::from(p.id.as_str()), Arc::new(Upstream::new(settings)))
        })
        .collect();
    if tokio::runtime::Handle::try_current().is_ok() {
        for upstream in pools.values() {
            upstream.sweep_idle();
        }
    }
    pools
}

/// Throttling shared by every replica through Redis.
#[derive(Debug)]
pub struct SharedThrottle {
    pub store: throttle::redis::RedisStore,
    pub on_error: crate::config::OnBackendError,
    /// How many replicas share the limits: the local fallback gives each its share.
    pub replicas: u32,
    /// The log lines of backend failures, at most one every 10 s.
    pub error_log: Sparse,
    /// Until when (milliseconds on the gateway clock) Redis is not asked after a failure:
    /// during an outage calls are decided at once by `on_backend_error` instead of each
    /// waiting for Redis to time out.
    pub down_until: std::sync::atomic::AtomicU64,
    /// The last readiness ping of Redis and when it was made: anyone who reaches the
    /// admin port may ask `/readyz`, so Redis is pinged at most once a second for it.
    pub last_ping: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

/// How long a readiness ping of Redis answers `/readyz`.
const PING_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

impl SharedThrottle {
    /// Whether Redis answers, asked at most once every [`PING_KEPT`] (callers meanwhile
    /// wait for the ping under way, then share its answer).
    async fn ping(&self) -> Result<(), String> {
        let mut last = self.last_ping.lock().await;
        if let Some((at, answer)) = &*last
            && at.elapsed() < PING_KEPT
        {
            return answer.clone();
        }
        let answer = self.store.ping().await.map_err(|e| e.to_string());
        *last = Some((std::time::Instant::now(), answer.clone()));
        answer
    }
}

/// The running gateway.
#[derive(Debug)]
pub struct Gateway {
    pub snapshot: ArcSwap<Snapshot>,
    pub tls: ArcSwap<certs::tls::ListenerTls>,
    pub audit: Arc<dyn audit::AuditSink>,
    pub suspensions: Arc<crate::suspend::SuspensionStore>,
    /// Local throttling state (the backend itself, or the fallback when Redis is down);
    /// survives reloads for the providers that remain.
    pub throttle: ArcSwap<throttle::LocalStore>,
    /// The shared backend, when `[throttle] backend = "redis"`.
    pub shared_throttle: Option<SharedThrottle>,
    /// The origin of the monotonic clock the throttle counts on.
    pub clock: std::time::Instant,
    /// Bearer token verification, when `[oauth]` is configured (changes need a restart).
    pub oauth: Option<Arc<crate::oauth::Verifier>>,
    pub node: String,
    pub config_path: PathBuf,
    pub metrics: Option<PrometheusHandle>,
    pub ready: AtomicBool,
    /// Open consumer connections and their bounds (changes need a restart).
    pub conn_limits: Arc<crate::limits::ConnLimits>,
    /// Who may call the admin API (tokens, admin CNs) and its TLS configuration,
    /// reloaded with the configuration and the certificates.
    pub admin_access: ArcSwap<crate::config::AdminAccess>,
    /// The settings in force that only a restart changes, to tell what a reload could
    /// not apply.
    pub restart_only: std::sync::Mutex<RestartOnly>,
    /// The files the TLS configurations in force were made of (watched for changes).
    pub tls_files: ArcSwap<Vec<PathBuf>>,
    /// The certificates in force, for readiness and their expiry metrics.
    pub certificates: ArcSwap<Vec<certs::inventory::CertInfo>>,
    /// The listener's CRLs in force, for their nextUpdate gauge and warnings.
    pub crls: ArcSwap<Vec<certs::inventory::CrlInfo>>,
    /// `[telemetry]`'s sampling ratio: calls it keeps get an OpenTelemetry span (needs
    /// a restart).
    pub telemetry: Option<f64>,
    /// One reload at a time (admin API, SIGHUP, certificate watcher): a reload that read
    /// older files must not be stored after one that read newer ones.
    pub reloading: std::sync::Mutex<()>,
    /// The configuration files in force, their digest and load time.
    pub config_info: ArcSwap<crate::loaded::ConfigInfo>,
    /// The TLS material of the Redis links, renewed by reloads (see `crate::redis_tls`).
    pub redis_tls: crate::redis_tls::Renewals,
}

/// Settings that a reload does not apply: the listeners, threads, connection bounds,
/// the admin listener, `[oauth]`, the audit trail, the throttling backend, the node name.
#[derive(Clone, Debug, PartialEq)]
pub struct RestartOnly {
    fields: Vec<(&'static str, String)>,
}

impl RestartOnly {
    pub fn of(config: &Config) -> Self {
        let l = &config.listener;
        let admin = config.admin.as_ref();
        Self {
            fields: vec![
                ("listener.address", l.address.to_string()),
                ("listener.threads", l.threads.to_string()),
                (
                    "listener.handshake_timeout",
                    format!("{:?}", l.handshake_timeout),
                ),
                (
                    "listener.header_read_timeout",
                    format!("{:?}", l.header_read_timeout),
                ),
                ("listener.drain_timeout", format!("{:?}", l.drain_timeout)),
                (
                    "listener.response_send_timeout",
                    format!("{:?}", l.response_send_timeout),
                ),
                (
                    "listener (connection limits)",
                    format!("{:?}", l.connections),
                ),
                ("admin.address", format!("{:?}", admin.map(|a| a.address))),
                ("oauth", format!("{:?}", config.oauth)),
                (
                    "audit",
                    format!("{:?}", (&config.audit.backend, config.audit.fail_closed)),
                ),
                (
                    "audit.retention_days",
                    config.audit.retention_days.to_string(),
                ),
                (
                    "audit.signing_key / audit.verify_keys",
                    format!(
                        "{:?} {:?}",
                        config.audit.seals.key.as_ref().map(|k| k.id().to_owned()),
                        config.audit.seals.trusted.ids()
                    ),
                ),
                (
                    "listener.proxy_protocol_from",
                    format!("{:?}", l.proxy_protocol_from),
                ),
                // Without their TLS material: a reload renews it (see `crate::redis_tls`).
                ("throttle", {
                    let mut t = config.throttle.clone();
                    if let crate::config::ThrottleBackend::Redis { tls, .. } = &mut t.backend {
                        *tls = None;
                    }
                    format!("{t:?}")
                }),
                (
                    "cluster",
                    format!(
                        "{:?}",
                        config
                            .cluster
                            .as_ref()
                            .map(|c| (&c.redis_url, &c.key_prefix))
                    ),
                ),
                ("telemetry", format!("{:?}", config.telemetry)),
                ("listener.shutdown_delay", format!("{:?}", l.shutdown_delay)),
                ("node", config.node.clone()),
            ],
        }
    }

    /// The settings that differ in `newer`.
    pub fn changed(&self, newer: &RestartOnly) -> Vec<&'static str> {
        self.fields
            .iter()
            .zip(&newer.fields)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0)
            .collect()
    }
}

/// What a reload did.
#[derive(Debug, serde::Serialize)]
pub struct ReloadReport {
    /// What is now in force.
    pub applied: Vec<&'static str>,
    /// Settings that changed in the files but stay as they were until a restart.
    pub needs_restart: Vec<&'static str>,
    /// Ids added, removed and changed (consumers, authorisations, services, providers).
    pub changed: serde_json::Value,
    /// What `fsp check` would warn about in the configuration now in force.
    pub warnings: Vec<String>,
}

/// Why a reload was refused (the running configuration stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The new listener certificate is outside its validity while the one in force is
    /// within it: consumers would refuse every handshake.
    #[error("{0}; the certificate in force stays")]
    Certificate(String),
}

/// The certificates of `files` (role and path), as read now; a file that cannot be
/// read is left out (the configuration that named it loaded it a moment ago).
pub fn certificate_inventory(files: &[(String, PathBuf)]) -> Vec<certs::inventory::CertInfo> {
    files
        .iter()
        .filter_map(|(role, path)| certs::inventory::describe(role, path).ok())
        .flatten()
        .collect()
}

/// Why the listener certificate of `certificates` cannot serve at `now`, if it cannot.
pub fn listener_certificate_unusable(
    certificates: &[certs::inventory::CertInfo],
    now: time::OffsetDateTime,
) -> Option<String> {
    // The server certificate is the chain's leaf: the first of listener.server_cert.
    match certificates
        .iter()
        .find(|c| c.role == "listener.server_cert")
    {
        None => Some("no listener certificate is loaded".to_owned()),
        Some(c) if c.not_after < now => Some(format!(
            "the listener certificate {} expired at {}",
            c.path.display(),
            crate::pipeline::stamp::rfc3339_millis(c.not_after)
        )),
        Some(c) if c.not_before > now => Some(format!(
            "the listener certificate {} is not valid before {}",
            c.path.display(),
            crate::pipeline::stamp::rfc3339_millis(c.not_before)
        )),
        Some(_) => None,
    }
}

impl Gateway {
    /// Whether an administrators' change (a suspension, a reload, a reading of a call's
    /// record) may be made now: with `fail_closed`, not while the audit trail cannot
    /// record it.
    pub fn changes_recordable(&self) -> Result<(), audit::AuditError> {
        if self.snapshot.load().fail_closed {
            self.audit.health()
        } else {
            Ok(())
        }
    }

    /// Why the gateway should not receive traffic now, if it should not: draining or
    /// starting, a listener certificate outside its validity, the audit trail or the
    /// throttle backend not answering (see `/readyz`).
    pub async fn unready(&self) -> Option<String> {
        if !self.ready.load(std::sync::atomic::Ordering::Acquire) {
            return Some("starting or draining".to_owned());
        }
        if let Some(why) = listener_certificate_unusable(
            &self.certificates.load(),
            time::OffsetDateTime::now_utc(),
        ) {
            return Some(why);
        }
        if !self.suspensions.is_known() {
            return Some("the cluster's suspensions are not known yet: its Redis has not answered since the start and no last known set is kept".to_owned());
        }
        if let Err(e) = self.audit.health() {
            return Some(format!("audit trail unavailable: {e}"));
        }
        if let Some(shared) = &self.shared_throttle
            && let Err(e) = shared.ping().await
        {
            use crate::config::OnBackendError;
            metrics::gauge!("fsp_throttle_backend_up").set(0.0);
            // With `deny`, every limited call is refused without Redis: not ready. With
            // `local` or `allow` the configured fallback decides, and taking every
            // replica out of the load balancer at once for a Redis outage would turn a
            // degraded service into none; the log and metric say it.
            if shared.on_error == OnBackendError::Deny {
                return Some(format!(
                    "the throttle backend (Redis) does not answer and on_backend_error = \"deny\": {e}"
                ));
            }
            static UNANSWERED: Sparse = Sparse::new(std::time::Duration::from_secs(10));
            if let Some(asked) = UNANSWERED.occurred() {
                tracing::warn!(error = %e, asked, "readiness: the throttle backend (Redis) does not answer; calls are decided by on_backend_error (asked is the readiness checks since the last such warning)");
            }
        } else if self.shared_throttle.is_some() {
            metrics::gauge!("fsp_throttle_backend_up").set(1.0);
        }
        None
    }

    /// Re-reads the configuration and certificates and swaps them in atomically. On any
    /// problem, nothing changes.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.reload_now();
        if result.is_err() {
            metrics::counter!("fsp_config_reload_failures_total").increment(1);
        }
        result
    }

    fn reload_now(&self) -> Result<ReloadReport, ReloadError> {
        let config = crate::config::load(&self.config_path)?;
        let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
        for w in &config.warnings {
            tracing::warn!(file = %w.file.display(), key = %w.key, "{}", w.reason);
        }
        let restart_only = RestartOnly::of(&config);
        let needs_restart = self
            .restart_only
            .lock()
            .map(|current| current.changed(&restart_only))
            .unwrap_or_default();
        let mut config = config;
        let admin_access = config
            .admin
            .as_mut()
            .map(|a| std::mem::take(&mut a.access))
            .unwrap_or_default();
        let tls_files = config.tls_files.clone();
        let certificates = certificate_inventory(&config.certificate_files);
        let crls = crate::config::crl_inventory(&config.listener.tls_files.crls);
        let config_info = crate::loaded::ConfigInfo::of(&config);
        let now = time::OffsetDateTime::now_utc();
        if let Some(why) = listener_certificate_unusable(&certificates, now)
            && listener_certificate_unusable(&self.certificates.load(), now).is_none()
        {
            return Err(ReloadError::Certificate(why));
        }
        let redis_renewed = self.renew_redis_tls(&config);
        let (snapshot, tls) = Snapshot::from_config(config);
        let throttle = self
            .throttle
            .load()
            .carry_over(snapshot.providers.iter().map(|p| p.id.as_str()));
        self.throttle.store(Arc::new(throttle));
        self.tls.store(tls);
        let mut changed = changes(&self.snapshot.load(), &snapshot);
        changed["administrators"] = admin_changes(&self.admin_access.load(), &admin_access);
        // Admin access first: an admin request in between must not see new consumers
        // (whose certificates are never an administrator's) with the old admin CNs.
        self.admin_access.store(Arc::new(admin_access));
        self.snapshot.store(Arc::new(snapshot));
        self.config_info.store(Arc::new(config_info));
        self.tls_files.store(Arc::new(tls_files));
        self.certificates.store(Arc::new(certificates));
        self.crls.store(Arc::new(crls));
        metrics::counter!("fsp_config_reloads_total").increment(1);
        let mut applied = vec![
            "catalogue",
            "consumers",
            "authorisations",
            "providers",
            "listener certificates and CRLs",
            "admin tokens",
            "admin CNs and admin TLS",
        ];
        applied.extend(redis_renewed);
        let report = ReloadReport {
            applied,
            needs_restart,
            changed,
            warnings,
        };
        if report.needs_restart.is_empty() {
            tracing::info!(config = %self.config_path.display(), "configuration reloaded");
        } else {
            tracing::warn!(config = %self.config_path.display(), needs_restart = ?report.needs_restart, "configuration reloaded; these changed settings keep their running values until a restart");
        }
        Ok(report)
    }
}

impl Gateway {
    /// Starts renewing the clients of the Redis links whose TLS material `config` changes
    /// (see `crate::redis_tls`); what it started, for the reload report.
    fn renew_redis_tls(&self, config: &Config) -> Vec<&'static str> {
        use crate::redis_tls::{Link, Target};
        let mut started = Vec::new();
        if let (crate::config::ThrottleBackend::Redis { url, tls }, Some(shared)) =
            (&config.throttle.backend, &self.shared_throttle)
            && self.redis_tls.renew(
                Link::Throttle,
                url,
                tls.as_ref(),
                Target::Throttle(shared.store.renewal()),
            )
        {
            started.push("TLS to Redis (throttle), once a connection with it works");
        }
        if let Some(cluster) = &config.cluster
            && self.suspensions.is_shared()
            && self.redis_tls.renew(
                Link::Cluster,
                &cluster.redis_url,
                cluster.redis_tls.as_ref(),
                Target::Cluster(Arc::downgrade(&self.suspensions)),
            )
        {
            started.push("TLS to Redis (cluster), once a connection with it works");
        }
        started
    }
}

/// Who may administer, before and after a reload: token names (a token changed under
/// its name is `changed`; no token is ever shown) and certificate CNs (`cn:...`).
fn admin_changes(before: &crate::config::AdminAccess, after: &crate::config::AdminAccess) -> Value {
    let who = |a: &crate::config::AdminAccess| -> BTreeMap<String, String> {
        a.tokens
            .iter()
            .map(|t| {
                let digest = certs::identity::sha256(t.token.as_bytes());
                (t.name.clone(), digest.to_string())
            })
            .chain(a.cns.iter().map(|cn| (format!("cn:{cn}"), String::new())))
            .collect()
    };
    diff(who(before), who(after))
}

/// The ids of `after` not in `before`, those gone, and those whose value changed.
fn diff(before: BTreeMap<String, String>, after: BTreeMap<String, String>) -> Value {
    let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed: Vec<&String> = after
        .iter()
        .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
        .map(|(k, _)| k)
        .collect();
    json!({ "added": added, "removed": removed, "changed": changed })
}

/// What a reload changed, by kind: ids added, removed and changed.
pub(crate) fn changes(before: &Snapshot, after: &Snapshot) -> Value {
    let consumers = |s: &Snapshot| -> BTreeMap<String, String> {
        s.consumers
            .iter()
            .map(|c| {
                (
                    c.id.to_string(),
                    format!("{c:?}{:?}", s.consumers.credentials_of(&c.id)),
                )
            })
            .collect()
    };
    let authorisations = |s: &Snapshot| -> BTreeMap<String, String> {
        s.authorisations
            .iter()
            .map(|a| (a.id.clone(), format!("{a:?}")))
            .collect()
    };
    let versions = |s: &Snapshot| -> BTreeMap<String, String> {
        s.catalogue
            .services()
            .flat_map(|svc| {
                svc.versions.iter().map(move |v| {
                    (
                        format!("{}/{}", svc.name, v.version),
                        format!("{}{v:?}", svc.provider),
                    )
                })
            })
            .collect()
    };
    // Every setting of a provider but its TLS (a `rustls::ClientConfig`, not comparable;
    // a changed certificate file shows in `/admin/certificates`).
    let providers = |s: &Snapshot| -> BTreeMap<String, String> {
        s.providers
            .iter()
            .map(|p| {
                let overrides: BTreeMap<&String, _> = p.consumer_limits.iter().collect();
                let settings = (
                    (&p.name, p.limit, p.consumer_limit, overrides),
                    (p.connect_timeout, p.response_timeout, p.queue_timeout),
                    (p.pool_idle_timeout, p.pool_max_idle),
                    (p.max_connections, p.cap.per_consumer()),
                );
                (p.id.clone(), format!("{settings:?}"))
            })
            .collect()
    };
    json!({
        "consumers": diff(consumers(before), consumers(after)),
        "authorisations": diff(authorisations(before), authorisations(after)),
        "services": diff(versions(before), versions(after)),
        "providers": diff(providers(before), providers(after)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_cannot_be_a_header_leaves_out_only_its_own_header() {
        let a = policy::Authorisation {
            id: "AUTH-1".into(),
            consumer: "ville-bxl".into(),
            service: "person/getPerson".into(),
            versions: Vec::new(),
            purpose: "vote\nx".into(),
            legal_basis: policy::LegalBasis {
                kind: policy::LegalBasisKind::Deliberation,
                reference: "CSI/20/123".into(),
                issuer: None,
            },
            provider_approval: "RRN-1".into(),
            valid_from: time::macros::date!(2020 - 01 - 01),
            valid_until: None,
            revoked: None,
        };
        let g = Grant::of(&a);
        assert_eq!(g.legal_basis_text, "deliberation; CSI/20/123");
        let sent: Vec<(&str, &[u8])> = g
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            sent,
            [
                ("fsp-consumer", &b"ville-bxl"[..]),
                ("fsp-legal-basis", &b"deliberation; CSI/20/123"[..]),
                ("fsp-authorisation", &b"AUTH-1"[..]),
            ]
        );
    }
}
