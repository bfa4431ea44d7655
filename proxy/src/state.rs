//! The gateway's shared state, swapped atomically on reload.
//!
//! Requests read one [`Snapshot`] at their start and use it to the end, so a reload never
//! mixes an old catalogue with new consumers inside one call, and never drops a
//! connection: open connections simply pick up the new snapshot on their next request.
//! The listener's TLS configuration is swapped the same way; handshakes in progress
//! finish with the configuration they started with.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use catalogue::Catalogue;
use http::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;
use policy::{Authorisations, Consumers};

use crate::config::Config;

/// Everything a request needs to be decided and routed.
#[derive(Debug)]
pub struct Snapshot {
    pub catalogue: Catalogue,
    pub consumers: Consumers,
    pub authorisations: Authorisations,
    /// Providers and their connection settings; each worker thread builds its own
    /// clients from them (see [`crate::forward::upstream_for`]).
    pub providers: Vec<crate::config::Provider>,
    /// Changes with every reload, so worker threads know to rebuild their clients.
    pub generation: u64,
    pub public_url: String,
    pub max_request_bytes: u64,
    pub fail_closed: bool,
    /// What each authorisation puts in the provider's `FSP-*` headers, made once per
    /// configuration rather than on every call, by authorisation id.
    pub grants: HashMap<String, Grant>,
}

/// The `FSP-*` values sent to the provider for a call an authorisation covers.
#[derive(Debug)]
pub struct Grant {
    pub consumer: HeaderValue,
    pub purpose: HeaderValue,
    /// `kind; reference`, as text for the audit record and as a header value.
    pub legal_basis_text: String,
    pub legal_basis: HeaderValue,
    pub authorisation: HeaderValue,
}

impl Grant {
    /// A copy with its own buffers (cloning a header value shares its buffer).
    fn copy(&self) -> Self {
        let own =
            |v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
        Self {
            consumer: own(&self.consumer),
            purpose: own(&self.purpose),
            legal_basis_text: self.legal_basis_text.clone(),
            legal_basis: own(&self.legal_basis),
            authorisation: own(&self.authorisation),
        }
    }

    /// `None` when a value cannot be sent in a header (a control character): such an
    /// authorisation is then sent without the offending fields, as before.
    fn of(a: &policy::Authorisation) -> Option<Self> {
        let legal_basis_text = a.legal_basis.to_string();
        Some(Self {
            consumer: HeaderValue::from_str(&a.consumer).ok()?,
            purpose: HeaderValue::from_str(&a.purpose).ok()?,
            legal_basis: HeaderValue::from_str(&legal_basis_text).ok()?,
            legal_basis_text,
            authorisation: HeaderValue::from_str(&a.id).ok()?,
        })
    }
}

impl Snapshot {
    pub fn from_config(config: Config) -> (Self, Arc<rustls::ServerConfig>) {
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tls = config.listener.tls.clone();
        let grants = config
            .authorisations
            .iter()
            .filter_map(|a| Some((a.id.clone(), Grant::of(a)?)))
            .collect();
        (
            Self {
                catalogue: config.catalogue,
                consumers: config.consumers,
                authorisations: Authorisations::new(config.authorisations),
                providers: config.providers,
                generation,
                public_url: config.listener.public_url,
                max_request_bytes: config.listener.max_request_bytes,
                fail_closed: config.audit.fail_closed,
                grants,
            },
            tls,
        )
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
    /// This thread's own copies of [`Snapshot::grants`].
    pub grants: HashMap<String, Grant>,
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
                .grants
                .iter()
                .map(|(id, g)| (id.clone(), g.copy()))
                .collect();
            let local = Arc::new(Local {
                gw: gw.clone(),
                snap,
                grants,
            });
            *cell = Some(local.clone());
            local
        })
    }
}

/// Throttling shared by every replica through Redis.
#[derive(Debug)]
pub struct SharedThrottle {
    pub store: throttle::redis::RedisStore,
    pub on_error: crate::config::OnBackendError,
    /// How many replicas share the limits: the local fallback gives each its share.
    pub replicas: u32,
    /// When a backend failure was last logged (milliseconds on the gateway clock).
    pub last_logged: std::sync::atomic::AtomicU64,
    /// Until when (milliseconds on the gateway clock) Redis is not asked after a failure:
    /// during an outage calls are decided at once by `on_backend_error` instead of each
    /// waiting for Redis to time out.
    pub down_until: std::sync::atomic::AtomicU64,
}

/// The running gateway.
#[derive(Debug)]
pub struct Gateway {
    pub snapshot: ArcSwap<Snapshot>,
    pub tls: ArcSwap<rustls::ServerConfig>,
    pub audit: Arc<dyn audit::AuditSink>,
    pub suspensions: crate::suspend::SuspensionStore,
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
}

/// Why a reload was refused (the running configuration stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

impl Gateway {
    /// Re-reads the configuration and certificates and swaps them in atomically. On any
    /// problem, nothing changes.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let config = crate::config::load(&self.config_path)?;
        let (snapshot, tls) = Snapshot::from_config(config);
        let throttle = self
            .throttle
            .load()
            .carry_over(snapshot.providers.iter().map(|p| p.id.as_str()));
        self.throttle.store(Arc::new(throttle));
        self.tls.store(tls);
        self.snapshot.store(Arc::new(snapshot));
        metrics::counter!("fsp_config_reloads_total").increment(1);
        tracing::info!(config = %self.config_path.display(), "configuration reloaded");
        Ok(())
    }
}
