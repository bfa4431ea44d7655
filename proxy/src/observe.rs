//! Prometheus metrics: the recorder, every family's `# HELP`, and the per-call metrics
//! labelled by consumer, service, version, decision and status.
//!
//! Cardinality is bounded by the configuration, never by request input: a consumer,
//! service or version that the configuration in force does not declare is counted as
//! `none` or `unknown` (a path naming a made-up service cannot add a series). Each
//! worker thread keeps the handles of the label sets it has seen, so a call costs one
//! hash of its labels and two atomic updates, without locks or allocations.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// A warning that anyone who reaches a listener can cause, written at most once every
/// so often, so that a flood of them does not flood the log: each line written says how
/// many occurred since the last one (the others may go to `debug`).
#[derive(Debug)]
pub struct Sparse {
    every_ms: u64,
    /// When a line was last written (milliseconds since the first use; 0: never).
    written_at: AtomicU64,
    unwritten: AtomicU64,
}

impl Sparse {
    pub const fn new(every: Duration) -> Self {
        Self {
            every_ms: every.as_millis() as u64,
            written_at: AtomicU64::new(0),
            unwritten: AtomicU64::new(0),
        }
    }

    /// One more occurrence: `Some(n)` when a line is to be written for it, `n` counting
    /// it and those left unwritten since the last line; `None` when not.
    pub fn occurred(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        self.unwritten.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.written_at.load(Ordering::Relaxed);
        ((last == 0 || now.saturating_sub(last) >= self.every_ms)
            && self
                .written_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok())
        .then(|| self.unwritten.swap(0, Ordering::Relaxed).max(1))
    }
}

/// Latency buckets (seconds): from a fast cached answer to the longest provider timeout.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Every metric family, its kind and help text.
const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        "fsp_calls_total",
        Kind::Counter,
        "Calls answered, by consumer (none: not identified), service and version (unknown: not in the configuration), decision (allowed or the FSP error code) and HTTP status.",
    ),
    (
        "fsp_call_duration_seconds",
        Kind::Histogram,
        "Time from a call's arrival to the end of its answer, by service and version.",
    ),
    (
        "fsp_requests_total",
        Kind::Counter,
        "Calls answered, by status class.",
    ),
    (
        "fsp_request_duration_seconds",
        Kind::Histogram,
        "Time from a call's arrival to the end of its answer, all calls.",
    ),
    (
        "fsp_responses_aborted_total",
        Kind::Counter,
        "Answers the consumer stopped reading before their end.",
    ),
    (
        "fsp_provider_duration_seconds",
        Kind::Histogram,
        "Time from sending a call to a provider to the head of its answer, by provider.",
    ),
    (
        "fsp_provider_errors_total",
        Kind::Counter,
        "Provider failures by provider and kind: unreachable (connection or protocol error), timeout, 5xx (an answer with a 5xx status).",
    ),
    (
        "fsp_throttled_total",
        Kind::Counter,
        "Calls refused with 429 by the throttle, by provider and scope (provider: the provider's aggregate limit; consumer: the consumer's limit).",
    ),
    (
        "fsp_throttle_given_back_total",
        Kind::Counter,
        "Calls admitted by the rate limits, then refused before they were sent (provider capacity, audit trail, suspension, consumer gone): what they spent of the limits was given back.",
    ),
    (
        "fsp_throttle_backend_errors_total",
        Kind::Counter,
        "Throttle decisions Redis could not take, by the on_backend_error mode that decided instead.",
    ),
    (
        "fsp_throttle_backend_up",
        Kind::Gauge,
        "1 when the throttle Redis answered the last readiness check, 0 when it did not.",
    ),
    (
        "fsp_audit_write_seconds",
        Kind::Histogram,
        "Time for a call's write-ahead audit record to become durable (fsync or commit) before the call is forwarded.",
    ),
    (
        "fsp_audit_queue_depth",
        Kind::Gauge,
        "Audit records taken but not written yet.",
    ),
    (
        "fsp_audit_backend_errors_total",
        Kind::Counter,
        "Failed writes to the audit store, by backend (file or postgres).",
    ),
    (
        "fsp_audit_records_lost_total",
        Kind::Counter,
        "Audit records of fail-open calls that could not be queued.",
    ),
    (
        "fsp_cluster_redis_errors_total",
        Kind::Counter,
        "Failed exchanges with the cluster's Redis (suspensions).",
    ),
    (
        "fsp_cluster_redis_up",
        Kind::Gauge,
        "1 when the last exchange with the cluster's Redis worked, 0 when it failed (the last known suspensions stay in force).",
    ),
    (
        "fsp_certificate_expiry_seconds",
        Kind::Gauge,
        "Seconds until each configured certificate expires (negative once expired), by configuration key and subject.",
    ),
    (
        "fsp_crl_next_update_seconds",
        Kind::Gauge,
        "Seconds until the nextUpdate of each listener CRL file (its earliest, negative once passed): past it, the certificates that CRL covers are refused until a fresh CRL is in place.",
    ),
    (
        "fsp_config_reloads_total",
        Kind::Counter,
        "Configuration and certificate reloads applied (admin API, SIGHUP or a changed certificate file).",
    ),
    (
        "fsp_config_reload_failures_total",
        Kind::Counter,
        "Reloads refused because the new configuration or certificates did not load (the running ones stay).",
    ),
    (
        "fsp_certificate_reloads_total",
        Kind::Counter,
        "Reloads started by a change of a certificate, key, CA or CRL file, by result (ok or failed).",
    ),
    (
        "fsp_file_size_limit_reached_total",
        Kind::Counter,
        "Writes that hit the process's file-size limit (SIGXFSZ); they fail and are retried.",
    ),
    (
        "fsp_build_info",
        Kind::Gauge,
        "Always 1; the labels say which build runs.",
    ),
    (
        "fsp_connections_open",
        Kind::Gauge,
        "Consumer connections open.",
    ),
    (
        "fsp_connections_anonymous_open",
        Kind::Gauge,
        "Consumer connections open without a client certificate.",
    ),
    (
        "fsp_connections_refused_total",
        Kind::Counter,
        "Consumer connections closed at once, by the bound they exceeded.",
    ),
    (
        "fsp_connections_in_handshake",
        Kind::Gauge,
        "Consumer connections open whose TLS handshake (or, behind a balancer, PROXY header) is not over: the ones an eviction may close.",
    ),
    (
        "fsp_connections_evicted_total",
        Kind::Counter,
        "Consumer connections still in their TLS handshake closed to make room for a new one, every place (listener.max_connections) being taken.",
    ),
    (
        "fsp_requests_unparsed_total",
        Kind::Counter,
        "HTTP/1.1 requests the HTTP parser refused (malformed request line or fields, refused framing, head too large): answered 400 (431 or 414 when too large) without a message id, not recorded in the audit trail.",
    ),
    (
        "fsp_tls_handshake_failures_total",
        Kind::Counter,
        "TLS handshakes with consumers that failed or timed out.",
    ),
    (
        "fsp_admin_tls_handshake_failures_total",
        Kind::Counter,
        "TLS handshakes on the admin listener that failed or timed out.",
    ),
    (
        "fsp_admin_calls_refused_total",
        Kind::Counter,
        "Admin calls refused for want of valid credentials (no token, an unknown token, a certificate not an administrator's).",
    ),
    (
        "fsp_admin_connections_refused_total",
        Kind::Counter,
        "Admin connections closed at once: too many open, in all or from one address.",
    ),
    (
        "fsp_proxy_protocol_refusals_total",
        Kind::Counter,
        "Connections refused over the PROXY protocol, by reason (untrusted: a header from an address not in proxy_protocol_from; malformed; timeout).",
    ),
    (
        "fsp_upstream_cap_refusals_total",
        Kind::Counter,
        "Calls refused because the provider's or the consumer's share of connections was in use.",
    ),
    (
        "fsp_jwks_fetches_total",
        Kind::Counter,
        "Fetches of the identity provider's keys, by result.",
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Installs the process's Prometheus recorder (once) and describes every family.
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()?;
            for (name, kind, help) in FAMILIES {
                match kind {
                    Kind::Counter => metrics::describe_counter!(*name, *help),
                    Kind::Gauge => metrics::describe_gauge!(*name, *help),
                    Kind::Histogram => metrics::describe_histogram!(*name, *help),
                }
            }
            metrics::gauge!(
                "fsp_build_info",
                "version" => env!("CARGO_PKG_VERSION"),
                "package" => env!("CARGO_PKG_NAME"),
            )
            .set(1.0);
            Some(handle)
        })
        .clone()
}

/// Values read when `/metrics` is scraped rather than on each event.
pub fn refresh(
    audit: &dyn audit::AuditSink,
    certificates: &[certs::inventory::CertInfo],
    crls: &[certs::inventory::CrlInfo],
) {
    metrics::gauge!("fsp_audit_queue_depth").set(audit.queue_depth() as f64);
    let now = time::OffsetDateTime::now_utc();
    for c in certificates {
        metrics::gauge!(
            "fsp_certificate_expiry_seconds",
            "role" => c.role.clone(),
            "subject" => c.subject.clone(),
        )
        .set((c.not_after - now).as_seconds_f64());
    }
    // One series per file: the earliest nextUpdate of its CRLs (the first to go stale).
    let mut by_file: Vec<(String, time::OffsetDateTime)> = Vec::new();
    for c in crls {
        let Some(next) = c.next_update else { continue };
        let file = c.path.display().to_string();
        match by_file.iter_mut().find(|(f, _)| *f == file) {
            Some((_, t)) => *t = (*t).min(next),
            None => by_file.push((file, next)),
        }
    }
    for (file, next) in by_file {
        metrics::gauge!("fsp_crl_next_update_seconds", "file" => file)
            .set((next - now).as_seconds_f64());
    }
}

/// The handles of one label set.
struct Series {
    consumer: Box<str>,
    service: Box<str>,
    version: Box<str>,
    decision: Box<str>,
    status: u16,
    calls: Counter,
    duration: Histogram,
}

impl Series {
    fn is(&self, k: &Key<'_>) -> bool {
        self.status == k.status
            && *self.consumer == *k.consumer
            && *self.service == *k.service
            && *self.version == *k.version
            && *self.decision == *k.decision
    }
}

#[derive(Hash)]
struct Key<'a> {
    consumer: &'a str,
    service: &'a str,
    version: &'a str,
    decision: &'a str,
    status: u16,
}

/// This thread's series, by the hash of their labels.
#[derive(Default)]
struct Cache {
    series: HashMap<u64, Vec<Series>, foldhash::fast::FixedState>,
    count: usize,
}

/// Far above what a configuration makes (consumers × services × versions × codes):
/// beyond it the cache starts again rather than grow.
const MAX_SERIES_PER_THREAD: usize = 100_000;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

fn hash(k: &Key<'_>) -> u64 {
    foldhash::fast::FixedState::with_seed(0x5eed).hash_one(k)
}

/// Counts one answered call; `catalogue` and `consumers` are the configuration in force.
pub fn call(
    catalogue: &catalogue::Catalogue,
    consumers: &policy::Consumers,
    record: &audit::Record,
    elapsed: Duration,
) {
    let raw = Key {
        consumer: record.consumer.as_deref().unwrap_or("none"),
        service: record.service.as_deref().unwrap_or("unknown"),
        version: record.version.as_deref().unwrap_or("unknown"),
        decision: &record.decision,
        status: record.status,
    };
    CACHE.with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            return;
        };
        let h = hash(&raw);
        if let Some(s) = cache
            .series
            .get(&h)
            .and_then(|list| list.iter().find(|s| s.is(&raw)))
        {
            s.calls.increment(1);
            s.duration.record(elapsed.as_secs_f64());
            return;
        }
        // Not seen on this thread, or not from the configuration: the labels the
        // configuration allows.
        let (service, version) = known_service(catalogue, raw.service, raw.version);
        let consumer = if raw.consumer != "none" && consumers.get(raw.consumer).is_some() {
            raw.consumer
        } else {
            "none"
        };
        let decision = if raw.decision == "allowed"
            || (raw.decision.starts_with("FSP-")
                && raw.decision.len() <= 48
                && raw
                    .decision
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'-'))
        {
            raw.decision
        } else {
            "other"
        };
        let key = Key {
            consumer,
            service,
            version,
            decision,
            status: raw.status,
        };
        let h = hash(&key);
        let known = cache
            .series
            .get(&h)
            .is_some_and(|list| list.iter().any(|s| s.is(&key)));
        if !known {
            if cache.count >= MAX_SERIES_PER_THREAD {
                cache.series.clear();
                cache.count = 0;
            }
            let series = Series {
                consumer: key.consumer.into(),
                service: key.service.into(),
                version: key.version.into(),
                decision: key.decision.into(),
                status: key.status,
                calls: metrics::counter!(
                    "fsp_calls_total",
                    "consumer" => key.consumer.to_owned(),
                    "service" => key.service.to_owned(),
                    "version" => key.version.to_owned(),
                    "decision" => key.decision.to_owned(),
                    "status" => key.status.to_string(),
                ),
                duration: metrics::histogram!(
                    "fsp_call_duration_seconds",
                    "service" => key.service.to_owned(),
                    "version" => key.version.to_owned(),
                ),
            };
            cache.series.entry(h).or_default().push(series);
            cache.count += 1;
        }
        let Some(s) = cache
            .series
            .get(&h)
            .and_then(|list| list.iter().find(|s| s.is(&key)))
        else {
            return;
        };
        s.calls.increment(1);
        s.duration.record(elapsed.as_secs_f64());
    });
}

/// The service and version as labels: as given when the catalogue in force has them,
/// else `unknown`.
fn known_service<'a>(
    catalogue: &catalogue::Catalogue,
    service: &'a str,
    version: &'a str,
) -> (&'a str, &'a str) {
    let Some((family, id)) = service.split_once('/') else {
        return ("unknown", "unknown");
    };
    match catalogue.service(family, id) {
        None => ("unknown", "unknown"),
        Some(s) if s.versions.iter().any(|v| *v.version == *version) => (service, version),
        Some(_) => (service, "unknown"),
    }
}

/// The handles of one provider, made once per thread and configuration.
#[derive(Debug)]
pub struct ProviderMetrics {
    pub latency: Histogram,
    pub unreachable: Counter,
    pub timeout: Counter,
    pub status_5xx: Counter,
}

impl ProviderMetrics {
    pub fn new(provider: &str) -> Self {
        let errors = |kind: &'static str| metrics::counter!("fsp_provider_errors_total", "provider" => provider.to_owned(), "kind" => kind);
        Self {
            latency: metrics::histogram!("fsp_provider_duration_seconds", "provider" => provider.to_owned()),
            unreachable: errors("unreachable"),
            timeout: errors("timeout"),
            status_5xx: errors("5xx"),
        }
    }
}

/// The audit write-ahead latency histogram.
pub fn audit_write() -> &'static Histogram {
    static H: std::sync::OnceLock<Histogram> = std::sync::OnceLock::new();
    H.get_or_init(|| metrics::histogram!("fsp_audit_write_seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first occurrence is written; those that follow within the interval are not,
    /// and the next line written counts them.
    #[test]
    fn a_sparse_warning_is_written_once_per_interval_with_the_count_since_the_last() {
        let sparse = Sparse::new(Duration::from_millis(200));
        assert_eq!(sparse.occurred(), Some(1));
        for _ in 0..5 {
            assert_eq!(sparse.occurred(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(sparse.occurred(), Some(6));
        assert_eq!(sparse.occurred(), None);
    }
}
