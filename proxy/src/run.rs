//! Starting and stopping a gateway: `fsp serve` and the quickstart share this.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{self, AuditBackend, Config};
use crate::server::ListenerTimeouts;
use crate::state::{Gateway, Snapshot};

/// Runs the gateway described by `config` until `shutdown` turns true, then drains open
/// connections, flushes the audit trail and returns.
pub async fn serve(
    config_path: &Path,
    config: Config,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    start(config_path, config, shutdown).await?.finished().await
}

/// A gateway that has bound its listeners and serves: where it listens, and its end.
pub struct Started {
    /// The consumer listener's address (its port as bound, when the configuration
    /// said 0).
    pub address: SocketAddr,
    /// The admin listener's address, when there is one.
    pub admin_address: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    finished: std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("address", &self.address)
            .field("admin_address", &self.admin_address)
            .finish_non_exhaustive()
    }
}

impl Started {
    /// Waits until `shutdown` has turned true and the gateway has drained its
    /// connections and flushed its audit trail.
    /// (The gateway's last reference must go for its audit trail to be flushed: this
    /// one is let go first.)
    pub async fn finished(self) -> anyhow::Result<()> {
        let Self {
            finished, gateway, ..
        } = self;
        drop(gateway);
        finished.await
    }
}

/// Starts the gateway described by `config`: binds its listeners (a port 0 is given one
/// by the system, reported in [`Started`]), starts its worker threads and returns once
/// it is ready. It serves until `shutdown` turns true.
pub async fn start(
    config_path: &Path,
    mut config: Config,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Started> {
    let admin_access = config
        .admin
        .as_mut()
        .map(|a| std::mem::take(&mut a.access))
        .unwrap_or_default();
    let listener_cfg = &config.listener;
    let timeouts = ListenerTimeouts {
        handshake: listener_cfg.handshake_timeout,
        header_read: listener_cfg.header_read_timeout,
        drain: listener_cfg.drain_timeout,
        response_send: listener_cfg.response_send_timeout,
    };
    let connection_limits = descriptor_budget(&config)?;
    let consumer_addr = listener_cfg.address;
    let threads = listener_cfg.threads;
    let admin = config.admin.as_ref().map(|a| a.address);
    let restart_only = crate::state::RestartOnly::of(&config);
    let shutdown_delay = listener_cfg.shutdown_delay;
    let balancers: Arc<[ipnet::IpNet]> = listener_cfg.proxy_protocol_from.clone().into();
    let node = config.node.clone();
    let throttle_cfg = config.throttle.clone();

    let retention_days = config.audit.retention_days;
    let (sink, sink_handle): (Arc<dyn audit::AuditSink>, Box<dyn FnOnce() + Send>) =
        match &config.audit.backend {
            AuditBackend::File { dir } => {
                let (sink, handle) = audit::file::FileSink::start_sealed(
                    dir,
                    &node,
                    Some(retention_days),
                    config.audit.seals.clone(),
                )
                .with_context(|| format!("cannot start the audit trail in {}", dir.display()))?;
                (Arc::new(sink), Box::new(move || handle.join()))
            }
            AuditBackend::Postgres { url, .. } => {
                let (sink, handle) =
                    audit::postgres::PostgresSink::start_with(audit::postgres::Settings {
                        retention_days: Some(retention_days),
                        seals: config.audit.seals.clone(),
                        ..audit::postgres::Settings::new(url, &node)
                    })
                    .with_context(|| {
                        format!(
                            "cannot start the audit trail in {}",
                            audit::postgres::display_url(url)
                        )
                    })?;
                (Arc::new(sink), Box::new(move || handle.join()))
            }
            AuditBackend::None { .. } => {
                tracing::warn!(
                    "[audit] backend = \"none\": calls are NOT recorded (capacity tests only)"
                );
                (Arc::new(audit::Discard), Box::new(|| {}))
            }
        };

    // Suspensions are kept in the gateway's state directory (the file trail's).
    std::fs::create_dir_all(config.audit.backend.state_dir()).with_context(|| {
        format!(
            "cannot create the state directory {}",
            config.audit.backend.state_dir().display()
        )
    })?;
    let suspensions_file = config.audit.backend.state_dir().join("suspensions.json");
    let suspensions = Arc::new(match &config.cluster {
        Some(cluster) => {
            let store = crate::suspend::SuspensionStore::open_cluster(
                Some(suspensions_file),
                &cluster.redis_url,
                cluster.redis_tls.as_ref(),
                &cluster.key_prefix,
            )?;
            // Before traffic: a replica that restarts during an incident serves no call
            // before it knows the cluster's suspensions (or, if Redis does not answer,
            // enforces the last set it knew).
            if let Err(e) = store.resync().await {
                let s = store.snapshot();
                tracing::error!(error = %e, consumers = s.consumers.len(), providers = s.providers.len(), "starting with the last known suspensions: the cluster's Redis does not answer");
            }
            store
        }
        None => crate::suspend::SuspensionStore::open(Some(suspensions_file))?,
    });
    suspensions.keep_in_sync();
    let oauth = match &config.oauth {
        Some(cfg) => {
            let verifier = Arc::new(crate::oauth::Verifier::new(cfg)?);
            // Keys before traffic; an identity provider that is down does not keep
            // certificate consumers out: tokens are refused until keys arrive.
            if let Err(e) = verifier.refresh().await {
                tracing::error!(error = %e, "starting without the identity provider's keys; bearer tokens are refused until they can be fetched");
            }
            verifier.spawn_refresher();
            Some(verifier)
        }
        None => None,
    };
    let tls_files = config.tls_files.clone();
    let telemetry = config.telemetry.as_ref().map(|t| t.sampling_ratio);
    let key_prefix = config
        .cluster
        .as_ref()
        .map_or_else(|| "fsp:".to_owned(), |c| c.key_prefix.clone());
    let certificates = crate::state::certificate_inventory(&config.certificate_files);
    let crls = crate::config::crl_inventory(&config.listener.tls_files.crls);
    let config_info = crate::loaded::ConfigInfo::of(&config);
    let redis_tls = crate::redis_tls::Renewals::new(
        match &throttle_cfg.backend {
            config::ThrottleBackend::Redis { url, tls } => Some((url.as_str(), tls.as_ref())),
            config::ThrottleBackend::Local => None,
        },
        config
            .cluster
            .as_ref()
            .map(|c| (c.redis_url.as_str(), c.redis_tls.as_ref())),
    );
    let (snapshot, tls) = Snapshot::from_config(config);
    let throttle = throttle::LocalStore::new(snapshot.providers.iter().map(|p| p.id.as_str()));
    let shared_throttle = match &throttle_cfg.backend {
        config::ThrottleBackend::Redis { url, tls } => Some(crate::state::SharedThrottle {
            store: throttle::redis::RedisStore::with_tls(
                url,
                tls.as_ref(),
                // The platform's own key space, as for the cluster's suspensions.
                &key_prefix,
                std::time::Duration::from_millis(250),
            )
            .map_err(|e| anyhow::anyhow!("throttle.url: {e}"))?
            .with_leases(throttle_cfg.replicas),
            on_error: throttle_cfg.on_backend_error,
            replicas: throttle_cfg.replicas,
            error_log: crate::observe::Sparse::new(std::time::Duration::from_secs(10)),
            down_until: std::sync::atomic::AtomicU64::new(0),
            last_ping: tokio::sync::Mutex::new(None),
        }),
        config::ThrottleBackend::Local => None,
    };
    let gw = Arc::new(Gateway {
        throttle: ArcSwap::from_pointee(throttle),
        shared_throttle,
        clock: std::time::Instant::now(),
        snapshot: ArcSwap::from_pointee(snapshot),
        tls: ArcSwap::new(tls),
        audit: sink,
        suspensions,
        oauth,
        node,
        config_path: config_path.to_owned(),
        metrics: crate::observe::install(),
        ready: AtomicBool::new(false),
        conn_limits: crate::limits::ConnLimits::new(connection_limits),
        admin_access: ArcSwap::from_pointee(admin_access),
        restart_only: std::sync::Mutex::new(restart_only),
        tls_files: ArcSwap::from_pointee(tls_files),
        certificates: ArcSwap::from_pointee(certificates),
        crls: ArcSwap::from_pointee(crls),
        telemetry,
        reloading: std::sync::Mutex::new(()),
        config_info: ArcSwap::from_pointee(config_info),
        redis_tls,
    });
    crate::certwatch::spawn(&gw);

    // On shutdown, /readyz turns 503 at once; the listeners close `shutdown_delay`
    // later, so that load balancers stop sending before connections are refused.
    let shutdown = {
        let (tx, rx) = watch::channel(false);
        let mut outer = shutdown;
        let weak = Arc::downgrade(&gw);
        tokio::spawn(async move {
            while !*outer.borrow_and_update() {
                if outer.changed().await.is_err() {
                    break;
                }
            }
            if let Some(gw) = weak.upgrade() {
                gw.ready.store(false, Ordering::Release);
            }
            if !shutdown_delay.is_zero() {
                tracing::info!(delay = ?shutdown_delay, "not ready: the listener closes after listener.shutdown_delay");
                tokio::time::sleep(shutdown_delay).await;
            }
            let _ = tx.send(true);
        });
        rx
    };

    // One listening socket per worker thread (SO_REUSEPORT: the kernel spreads
    // connections over them), all bound before any traffic is accepted.
    let listeners = bind_workers(consumer_addr, threads)
        .with_context(|| format!("cannot listen on {consumer_addr} (listener.address)"))?;
    let consumer_addr = listeners
        .first()
        .map_or(Ok(consumer_addr), std::net::TcpListener::local_addr)?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut admin_address = None;
    if let Some(addr) = admin {
        let admin_listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (admin.address)"))?;
        let addr = admin_listener.local_addr()?;
        admin_address = Some(addr);
        tracing::info!(address = %addr, "admin API listening");
        tasks.spawn(crate::admin::serve(
            gw.clone(),
            admin_listener,
            shutdown.clone(),
        ));
    }
    {
        // A file-size limit (RLIMIT_FSIZE, a quota) reached by the audit writer is a
        // failed write, which it reports and retries, not the end of the gateway:
        // SIGXFSZ, which would kill the process, is caught and counted.
        use tokio::signal::unix::{SignalKind, signal};
        const SIGXFSZ: i32 = 25;
        let mut xfsz = signal(SignalKind::from_raw(SIGXFSZ)).context("cannot watch SIGXFSZ")?;
        let mut stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = xfsz.recv() => {
                        metrics::counter!("fsp_file_size_limit_reached_total").increment(1);
                        tracing::warn!("a file reached the process's file-size limit (SIGXFSZ); the write failed and is retried");
                    }
                    _ = stop.changed() => break,
                }
            }
        });
    }
    {
        // SIGHUP reloads configuration and certificates, like POST /admin/reload.
        use tokio::signal::unix::{SignalKind, signal};
        let weak = Arc::downgrade(&gw);
        let mut stop = shutdown.clone();
        let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        // The reload logs what it applied and what needs a restart,
                        // and is recorded in the audit trail.
                        if let Some(gw) = weak.upgrade() {
                            crate::admin::reload_on_signal(&gw).await;
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
        });
    }
    if let Some(handle) = gw.metrics.clone() {
        // The recorder keeps every histogram sample until upkeep folds it into the
        // summary: without this, memory would grow with each call until /metrics is read.
        let mut stop = shutdown.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = every.tick() => handle.run_upkeep(),
                    _ = stop.changed() => break,
                }
            }
        });
    }
    tracing::info!(address = %consumer_addr, node = %gw.node, threads, "gateway listening");
    let mut workers = Vec::with_capacity(threads);
    for (i, listener) in listeners.into_iter().enumerate() {
        let gw = gw.clone();
        let shutdown = shutdown.clone();
        let balancers = balancers.clone();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("fsp-worker-{i}"))
            .spawn(move || {
                // A single-threaded runtime per worker: a connection, its requests and
                // their upstream connections all live on one thread (thread per core).
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        rt.block_on(async move {
                            match TcpListener::from_std(listener) {
                                Ok(l) => {
                                    crate::server::serve(gw, l, timeouts, balancers, shutdown).await
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "worker cannot use its listener")
                                }
                            }
                        });
                        // Dropping the runtime ends its remaining tasks (idle upstream
                        // connections) and with them their references to the gateway.
                        drop(rt);
                    }
                    Err(e) => tracing::error!(error = %e, "worker runtime cannot start"),
                }
                let _ = done.send(());
            })
            .context("cannot start a worker thread")?;
        workers.push(finished);
    }
    gw.ready.store(true, Ordering::Release);
    let gateway = gw.clone();
    let finished = async move {
        for finished in workers {
            let _ = finished.await;
        }
        gw.ready.store(false, Ordering::Release);
        while tasks.join_next().await.is_some() {}

        // Every response body has been dropped by now; the last reference to the sink
        // goes with the gateway, and the writer drains what is queued.
        drop(gw);
        tokio::task::spawn_blocking(sink_handle)
            .await
            .context("audit writer panicked")?;
        tracing::info!("stopped");
        Ok(())
    };
    Ok(Started {
        address: consumer_addr,
        admin_address,
        gateway,
        finished: Box::pin(finished),
    })
}

/// Takes every file descriptor the system allows, and checks that they cover the
/// connection limits: a gateway that runs out of descriptors cannot even accept the
/// connection of a legitimate consumer. A default `max_connections` is lowered to fit
/// (with a warning); one set explicitly that does not fit stops the start.
fn descriptor_budget(config: &Config) -> anyhow::Result<crate::limits::ConnectionLimits> {
    use crate::limits::{RESERVED_DESCRIPTORS, descriptors_needed, raise_descriptor_limit};
    let mut limits = config.listener.connections;
    let upstream: usize = config.providers.iter().map(|p| p.max_connections).sum();
    let available = raise_descriptor_limit().context("cannot read the open-files limit")?;
    let needed = descriptors_needed(limits.max, upstream);
    if available >= needed {
        return Ok(limits);
    }
    let room = available.saturating_sub(RESERVED_DESCRIPTORS + upstream as u64);
    if limits.max_explicit || room < 64 {
        anyhow::bail!(
            "the process may open {available} files, but listener.max_connections = {} and the providers' max_connections ({upstream} in all) need {needed}: raise the limit (ulimit -n, LimitNOFILE, or the container's nofile) or lower those settings",
            limits.max
        );
    }
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    limits.max = room;
    // Connections without a certificate, never evicted past their handshake, must still
    // leave room for the consumers'.
    limits.anonymous = limits.anonymous.min(config::anonymous_default(room));
    tracing::warn!(
        available,
        max_connections = room,
        max_anonymous_connections = limits.anonymous,
        "the open-files limit is low: listener.max_connections lowered from its default to fit, and max_anonymous_connections to a tenth of it at most"
    );
    Ok(limits)
}

/// A shutdown signal fed by SIGTERM and SIGINT.
pub fn shutdown_signal() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Loads a configuration, printing every problem on failure.
pub fn load_or_report(path: &Path) -> Option<Config> {
    match config::load(path) {
        Ok(c) => Some(c),
        Err(e) => {
            eprint!("{e}");
            None
        }
    }
}

/// One listening socket per worker thread on `addr`; when its port is 0, the first
/// socket's port as the system gave it, for all of them.
fn bind_workers(
    addr: std::net::SocketAddr,
    threads: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = bind_reuseport(addr)?;
    let addr = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..threads {
        out.push(bind_reuseport(addr)?);
    }
    Ok(out)
}

/// A non-blocking listening socket with SO_REUSEPORT, for one worker thread.
fn bind_reuseport(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    listener.into_std()
}
