//! Suspensions: administrators cut a consumer or a provider off at once when an incident
//! is suspected.
//!
//! Every request checks the current sets (one atomic load, no lock), so a suspension
//! applies to the next request on every connection, including keep-alive connections
//! that are already open. Changes are copy-on-write and written to a JSON file in the
//! state directory, so a suspension survives a restart: an incident does not end because
//! a pod was rescheduled.
//!
//! With `[cluster]`, Redis holds the suspensions of every replica: one hash per kind of
//! party (field: the id; value: who, when and why, as JSON). A change is written to Redis
//! and announced on a channel in one transaction; every replica re-reads both hashes when
//! the announcement arrives and every [`RESYNC_EVERY`] anyway (a lost message or a
//! reconnection costs at most that). Redis is the truth; the local file then keeps the
//! last set read from it, which is what a replica enforces while Redis is unreachable or
//! when it starts without Redis. A change is refused (nothing changed anywhere) while
//! Redis is unreachable: an administrator must never believe a consumer is cut off
//! everywhere when it is cut off on one replica only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Deserializer, Serialize};

use crate::transport::body::Cut;

/// How often every replica re-reads the suspensions from Redis, messages or not.
pub const RESYNC_EVERY: Duration = Duration::from_millis(500);

/// How long one Redis operation may take before it counts as a failure.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Who suspended a party, when, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// The administrator (`token#N`), or `unknown` for a suspension made before
    /// suspensions recorded their author.
    pub by: String,
    /// RFC 3339, UTC; absent for suspensions made before suspensions were dated.
    #[serde(default)]
    pub at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The suspended consumers and providers, by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspended {
    #[serde(default, deserialize_with = "parties")]
    pub consumers: BTreeMap<String, Suspension>,
    #[serde(default, deserialize_with = "parties")]
    pub providers: BTreeMap<String, Suspension>,
}

impl Suspended {
    fn of(&self, party: Party) -> &BTreeMap<String, Suspension> {
        match party {
            Party::Consumer => &self.consumers,
            Party::Provider => &self.providers,
        }
    }

    fn of_mut(&mut self, party: Party) -> &mut BTreeMap<String, Suspension> {
        match party {
            Party::Consumer => &mut self.consumers,
            Party::Provider => &mut self.providers,
        }
    }
}

/// Reads both the current form (id → suspension) and the first one (a list of ids).
fn parties<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Suspension>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Entries(BTreeMap<String, Suspension>),
        Ids(Vec<String>),
    }
    Ok(match Form::deserialize(d)? {
        Form::Entries(m) => m,
        Form::Ids(ids) => ids
            .into_iter()
            .map(|id| {
                let s = Suspension {
                    by: "unknown".to_owned(),
                    at: None,
                    reason: None,
                };
                (id, s)
            })
            .collect(),
    })
}

/// The state file: the sets, and whether they were last read from the cluster.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    #[serde(flatten)]
    suspended: Suspended,
    /// True when the sets are the cluster's as last read from Redis; false when this
    /// gateway made them on its own (single-node mode).
    #[serde(default)]
    from_cluster: bool,
    /// The cluster's generation of these sets (see [`ClusterLink::generation_key`]).
    #[serde(default)]
    generation: u64,
}

/// Which kind of party an admin call is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    Consumer,
    Provider,
}

impl Party {
    pub fn as_str(self) -> &'static str {
        match self {
            Party::Consumer => "consumer",
            Party::Provider => "provider",
        }
    }
}

/// Why a suspension or a resume was not made, or not surely.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The cluster's Redis could not be reached: nothing changed anywhere.
    #[error("the cluster's Redis is unreachable, nothing changed: {0}")]
    ClusterUnavailable(String),
    /// The change was sent to Redis but not confirmed: it may or may not be in force.
    #[error(
        "the cluster's Redis did not confirm the change ({0}); it may or may not be in force: GET /admin/suspensions shows what is"
    )]
    ClusterUncertain(String),
    /// The state file could not be written (single-node mode): nothing changed.
    #[error("the suspension could not be stored, nothing changed: {0}")]
    Storage(String),
}

/// The result of a change: whether it changed anything, and the party's record now.
#[derive(Debug)]
pub struct Changed {
    pub changed: bool,
    /// The record in force (the first one when the party was already suspended).
    pub record: Option<Suspension>,
}

/// The live suspension sets, and where they are kept.
#[derive(Debug)]
pub struct SuspensionStore {
    current: ArcSwap<Suspended>,
    file: Option<PathBuf>,
    /// Serialises writers (admin changes and cluster re-reads); readers never take it.
    write: tokio::sync::Mutex<()>,
    cluster: Option<ClusterLink>,
    /// How many times the sets in force changed: calls in flight check it on each frame
    /// and look the sets up only when it moved (see `CallShared::cut_off`).
    changes: AtomicU64,
    /// Rung after each change, to wake the calls in flight that wait for a silent peer.
    alarm: crate::transport::body::Alarm,
}

/// The connection to the cluster's Redis.
struct ClusterLink {
    /// The client new connections and subscriptions are made with: replaced by
    /// [`SuspensionStore::renew_client`] once a connection made with its successor works.
    client: std::sync::Mutex<redis::Client>,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    consumers_key: String,
    providers_key: String,
    /// Incremented by every change, in the same transaction: a cluster whose generation
    /// is missing or went back has lost data (a Redis restarted without persistence,
    /// flushed, or restored from an older snapshot), and is not believed.
    generation_key: String,
    channel: String,
    /// Whether the last exchange with Redis worked (for logging transitions only).
    healthy: AtomicBool,
    /// Whether the sets in force are the cluster's: read from Redis since the start, or
    /// read from a state file that held the cluster's. Until then the gateway is not
    /// ready (a new replica must not serve a consumer the cluster has cut off).
    known: AtomicBool,
    /// The highest generation seen (in the state file or in Redis).
    generation: std::sync::atomic::AtomicU64,
    /// Whether the state file holds the cluster's sets (else it is rewritten at the next
    /// read, even when nothing changed).
    file_is_cluster: AtomicBool,
    /// Suspensions this gateway made on its own before `[cluster]` was configured, not
    /// yet written to Redis: they are added there (never overwriting) at first contact.
    adopt: std::sync::Mutex<Option<Suspended>>,
}

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLink")
            .field("consumers_key", &self.consumers_key)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl SuspensionStore {
    /// Loads the sets from `file` (absent file: nothing suspended); single-node mode.
    pub fn open(file: Option<PathBuf>) -> anyhow::Result<Self> {
        let state = read_state(file.as_deref())?;
        Ok(Self {
            current: ArcSwap::from_pointee(state.suspended),
            file,
            write: tokio::sync::Mutex::new(()),
            cluster: None,
            changes: AtomicU64::new(0),
            alarm: Default::default(),
        })
    }

    /// Loads the last known sets from `file` and shares them through the Redis at
    /// `redis_url` (keys under `key_prefix`). Does not contact Redis: call
    /// [`Self::resync`] and [`Self::keep_in_sync`].
    pub fn open_cluster(
        file: Option<PathBuf>,
        redis_url: &str,
        tls: Option<&throttle::redis::RedisTls>,
        key_prefix: &str,
    ) -> anyhow::Result<Self> {
        let state = read_state(file.as_deref())?;
        let client = throttle::redis::client(redis_url, tls)
            .map_err(|e| anyhow::anyhow!("cluster.redis_url: {}", e.0))?;
        // The hash tag keeps every key in one slot, so one transaction reads them all on
        // a Redis Cluster too.
        let link = ClusterLink {
            client: std::sync::Mutex::new(client),
            conn: tokio::sync::Mutex::new(None),
            consumers_key: format!("{key_prefix}{{suspensions}}:consumers"),
            providers_key: format!("{key_prefix}{{suspensions}}:providers"),
            generation_key: format!("{key_prefix}{{suspensions}}:generation"),
            channel: format!("{key_prefix}suspensions"),
            healthy: AtomicBool::new(true),
            known: AtomicBool::new(state.from_cluster),
            generation: std::sync::atomic::AtomicU64::new(state.generation),
            file_is_cluster: AtomicBool::new(state.from_cluster),
            adopt: std::sync::Mutex::new(
                (!state.from_cluster && state.suspended != Suspended::default())
                    .then(|| state.suspended.clone()),
            ),
        };
        Ok(Self {
            current: ArcSwap::from_pointee(state.suspended),
            file,
            write: tokio::sync::Mutex::new(()),
            cluster: Some(link),
            changes: AtomicU64::new(0),
            alarm: Default::default(),
        })
    }

    /// Whether suspensions are shared through `[cluster]`.
    pub fn is_shared(&self) -> bool {
        self.cluster.is_some()
    }

    /// Whether the sets in force are known to be the cluster's (always, without
    /// `[cluster]`); see `/readyz`.
    pub fn is_known(&self) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|c| c.known.load(Ordering::Acquire))
    }

    pub fn snapshot(&self) -> Arc<Suspended> {
        self.current.load_full()
    }

    /// The suspensions in force, for a decision taken at once (not held across awaits).
    pub fn current(&self) -> arc_swap::Guard<Arc<Suspended>> {
        self.current.load()
    }

    /// Puts `next` in force and tells the calls in flight: those streaming see the
    /// change count move at their next frame, and those waiting for a silent peer are
    /// woken to see it now.
    fn put(&self, next: Suspended) {
        self.current.store(Arc::new(next));
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.alarm.ring();
    }

    /// Suspends (`Some`, with who, when and why) or resumes (`None`) a party; says
    /// whether anything changed (suspending a suspended party keeps its first record).
    /// The new state is stored (in Redis with `[cluster]`, else in the state file)
    /// before it takes effect, so a crash cannot silently lift a suspension.
    pub async fn set(
        &self,
        party: Party,
        id: &str,
        change: Option<Suspension>,
    ) -> Result<Changed, ChangeError> {
        let _guard = self.write.lock().await;
        let changed = match &self.cluster {
            Some(link) => {
                let known = self.current.load_full();
                let (changed, cluster) = link.write(party, id, change.as_ref(), &known).await?;
                // The change applies to the cluster's sets as read just before it.
                if cluster != *known {
                    log_changes(&known, &cluster);
                    self.put(cluster);
                }
                changed
            }
            None => match &change {
                Some(_) => !self.current.load().of(party).contains_key(id),
                None => self.current.load().of(party).contains_key(id),
            },
        };
        let mut next = (*self.current.load_full()).clone();
        let set = next.of_mut(party);
        let record = match change {
            Some(s) => Some(set.entry(id.to_owned()).or_insert(s).clone()),
            None => {
                set.remove(id);
                None
            }
        };
        if next != **self.current.load() {
            if let Err(e) = self.persist(&next) {
                if self.cluster.is_none() {
                    return Err(ChangeError::Storage(e.to_string()));
                }
                // Redis holds the change and every replica applies it: only this
                // replica's copy for Redis outages is behind (written at the next read).
                tracing::error!(error = %e, file = ?self.file, "the change is in force in the cluster, but this gateway's state file could not be written");
            }
            self.put(next);
        }
        Ok(Changed { changed, record })
    }

    fn persist(&self, sets: &Suspended) -> std::io::Result<()> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let state = StateFile {
            suspended: sets.clone(),
            from_cluster: self.cluster.is_some(),
            generation: self
                .cluster
                .as_ref()
                .map_or(0, |c| c.generation.load(Ordering::Acquire)),
        };
        write_atomically(path, &serde_json::to_vec_pretty(&state)?)
    }

    /// Re-reads the cluster's suspensions from Redis and applies them (no-op without
    /// `[cluster]`). On failure the last known sets stay in force.
    pub async fn resync(&self) -> Result<(), redis::RedisError> {
        let Some(link) = &self.cluster else {
            return Ok(());
        };
        let _guard = self.write.lock().await;
        let now = self.current.load_full();
        let next = match link.read(&now).await {
            Ok(next) => {
                link.mark(true, None);
                next
            }
            Err(e) => {
                link.mark(false, Some(&e));
                return Err(e);
            }
        };
        link.known.store(true, Ordering::Release);
        if *now != next || !link.file_is_cluster.load(Ordering::Acquire) {
            if *now != next {
                log_changes(&now, &next);
            }
            match self.persist(&next) {
                Ok(()) => link.file_is_cluster.store(true, Ordering::Release),
                Err(e) => {
                    tracing::error!(error = %e, file = ?self.file, "cannot keep the cluster's suspensions in the state file; they apply in memory");
                }
            }
            self.put(next);
        }
        Ok(())
    }

    /// Connects to the cluster's Redis with `client` (its TLS material renewed) and, when
    /// that works, makes it the client of every later connection and subscription. The
    /// connection in use stays until then; the subscription made with the old client
    /// goes on until it ends, and the next one is made with the new client. `superseded`
    /// is asked under the lock the swap takes: when other material was asked for since
    /// (a later renewal, whose connection may already be in use), nothing is replaced
    /// (`Ok(false)`). Without `[cluster]` there is nothing to renew.
    pub async fn renew_client(
        &self,
        client: redis::Client,
        superseded: impl Fn() -> bool,
    ) -> Result<bool, redis::RedisError> {
        let Some(link) = &self.cluster else {
            return Ok(false);
        };
        let connected = throttle::redis::managed_connection(&client, REDIS_TIMEOUT).await?;
        let mut slot = link.conn.lock().await;
        if superseded() {
            return Ok(false);
        }
        *link
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        *slot = Some(connected);
        Ok(true)
    }

    /// Keeps the sets in step with the cluster until the runtime ends: re-reads when a
    /// change is announced, and every [`RESYNC_EVERY`] in any case.
    pub fn keep_in_sync(self: &Arc<Self>) {
        if self.cluster.is_none() {
            return;
        }
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESYNC_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut messages: Option<redis::aio::PubSubStream> = None;
            loop {
                let Some(this) = store.upgrade() else { return };
                let Some(link) = &this.cluster else { return };
                if messages.is_none() {
                    messages = link.subscribe().await;
                }
                drop(this);
                let ended = match messages.as_mut() {
                    Some(m) => {
                        use futures_util::StreamExt;
                        tokio::select! {
                            msg = m.next() => msg.is_none(),
                            _ = tick.tick() => false,
                        }
                    }
                    None => {
                        tick.tick().await;
                        false
                    }
                };
                if ended {
                    tracing::warn!(
                        "the cluster's change announcements stopped; re-subscribing (changes are still re-read periodically)"
                    );
                    messages = None;
                }
                let Some(this) = store.upgrade() else { return };
                // A failure is logged and counted by resync; the last known sets stay.
                let _ = this.resync().await;
            }
        });
    }
}

impl crate::transport::body::Suspensions for SuspensionStore {
    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn cuts_off(&self, consumer: &str, provider: &str) -> Option<Cut> {
        let now = self.current.load();
        let (party, s) = match now.consumers.get(consumer) {
            Some(s) => (format!("consumer {consumer}"), s),
            None => (format!("provider {provider}"), now.providers.get(provider)?),
        };
        Some(Cut {
            party,
            by: s.by.clone(),
        })
    }

    fn alarm(&self) -> &crate::transport::body::Alarm {
        &self.alarm
    }
}

impl ClusterLink {
    async fn connection(&self) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = throttle::redis::managed_connection(&self.client(), REDIS_TIMEOUT).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn client(&self) -> redis::Client {
        self.client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn key(&self, party: Party) -> &str {
        match party {
            Party::Consumer => &self.consumers_key,
            Party::Provider => &self.providers_key,
        }
    }

    /// Writes one change, moves the generation on and announces it, in one script;
    /// whether it changed anything. The cluster's sets are read first (see
    /// [`Self::read`]: a Redis that lost data gets `known` back), and the script
    /// applies the change only if the generation has not gone back since: a Redis that
    /// lost its last changes in between (restored from a copy a second old) would
    /// otherwise have its generation moved back up by this change, and the loss, a
    /// lifted suspension among it, would never be seen.
    async fn write(
        &self,
        party: Party,
        id: &str,
        change: Option<&Suspension>,
        known: &Suspended,
    ) -> Result<(bool, Suspended), ChangeError> {
        let mut conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => {
                self.mark(false, Some(&e));
                return Err(ChangeError::ClusterUnavailable(e.to_string()));
            }
        };
        let cluster = match self.read(known).await {
            Ok(sets) => sets,
            Err(e) => {
                self.mark(false, Some(&e));
                return Err(ChangeError::ClusterUnavailable(e.to_string()));
            }
        };
        let announce = format!("{}:{id}", party.as_str());
        let (op, value) = match change {
            Some(s) => (
                "suspend",
                serde_json::to_string(s)
                    .map_err(|e| ChangeError::ClusterUnavailable(e.to_string()))?,
            ),
            None => ("resume", String::new()),
        };
        let run = async {
            for _ in 0..2 {
                let seen = self.generation.load(Ordering::Acquire);
                let (changed, generation, before): (i64, u64, u64) = WRITE_SCRIPT
                    .key(self.key(party))
                    .key(&self.generation_key)
                    .arg(seen)
                    .arg(op)
                    .arg(id)
                    .arg(&value)
                    .arg(&self.channel)
                    .arg(&announce)
                    .invoke_async(&mut conn)
                    .await?;
                if changed >= 0 {
                    // Another gateway's change came between the read and this one: the
                    // generation seen stays behind, so that the next read takes the
                    // cluster's sets as they are (this gateway does not know that one).
                    let generation = if before == seen { generation } else { seen };
                    return Ok::<_, redis::RedisError>((changed > 0, generation));
                }
                // The generation went back between the read and the change: data lost.
                metrics::counter!("fsp_cluster_redis_errors_total").increment(1);
                tracing::error!(
                    generation,
                    expected_at_least = seen,
                    "the cluster's Redis lost suspensions just before a change: this gateway's last known set is written back first, nothing is lifted"
                );
                self.restore(&mut conn, &cluster, seen.max(generation), "restored")
                    .await?;
            }
            Err(redis::RedisError::from(std::io::Error::other(
                "the cluster's Redis keeps losing changes",
            )))
        };
        match tokio::time::timeout(REDIS_TIMEOUT, run).await {
            Ok(Ok((changed, generation))) => {
                self.mark(true, None);
                self.generation.fetch_max(generation, Ordering::AcqRel);
                Ok((changed, cluster))
            }
            Ok(Err(e)) => {
                self.mark(false, Some(&e));
                Err(ChangeError::ClusterUncertain(e.to_string()))
            }
            Err(_) => {
                let e = timed_out();
                self.mark(false, Some(&e));
                Err(ChangeError::ClusterUncertain(e.to_string()))
            }
        }
    }

    /// Writes `sets` into Redis without overwriting what is there, and moves the
    /// generation past `at_least` and past what it is now (one script: another
    /// replica's change in between is never undone by moving the generation back).
    async fn restore(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        sets: &Suspended,
        at_least: u64,
        why: &str,
    ) -> Result<(), redis::RedisError> {
        let mut invocation = RESTORE_SCRIPT.key(&self.consumers_key);
        invocation
            .key(&self.providers_key)
            .key(&self.generation_key)
            .arg(at_least)
            .arg(&self.channel)
            .arg(why)
            .arg(sets.consumers.len());
        for (id, s) in sets.consumers.iter().chain(&sets.providers) {
            let value = serde_json::to_string(s).map_err(json_error)?;
            invocation.arg(id).arg(value);
        }
        let generation: u64 = invocation.invoke_async(conn).await?;
        self.generation.fetch_max(generation, Ordering::AcqRel);
        Ok(())
    }

    /// Both sets as Redis holds them. Suspensions this gateway made on its own before it
    /// joined the cluster are added first; a cluster that lost data (its generation is
    /// missing or behind what this gateway saw) gets this gateway's last known sets back
    /// before it is read: a lost Redis must never lift a cut-off.
    async fn read(&self, known: &Suspended) -> Result<Suspended, redis::RedisError> {
        let mut conn = self.connection().await?;
        let run = async {
            let adopt = self.adopt.lock().map(|a| a.clone()).unwrap_or_default();
            if let Some(local) = adopt {
                let seen = self.generation.load(Ordering::Acquire);
                let current: Option<u64> = redis::cmd("GET")
                    .arg(&self.generation_key)
                    .query_async(&mut conn)
                    .await?;
                self.restore(&mut conn, &local, seen.max(current.unwrap_or(0)), "adopted")
                    .await?;
                tracing::warn!(
                    consumers = ?local.consumers.keys().collect::<Vec<_>>(),
                    providers = ?local.providers.keys().collect::<Vec<_>>(),
                    "suspensions made on this gateway before [cluster] was configured are now the cluster's"
                );
                if let Ok(mut a) = self.adopt.lock() {
                    *a = None;
                }
            }
            for attempt in 0..2 {
                let (c, p, generation): (
                    HashMap<String, String>,
                    HashMap<String, String>,
                    Option<u64>,
                ) = redis::pipe()
                    .atomic()
                    .hgetall(&self.consumers_key)
                    .hgetall(&self.providers_key)
                    .get(&self.generation_key)
                    .query_async(&mut conn)
                    .await?;
                let seen = self.generation.load(Ordering::Acquire);
                let sets = Suspended {
                    consumers: decode(Party::Consumer, c),
                    providers: decode(Party::Provider, p),
                };
                // Every change moves the generation on: at the generation this gateway
                // saw last, the sets are the ones it knows, or Redis lost some (a hash
                // deleted or evicted, a partial restore) and its generation says nothing.
                let lost = match generation {
                    None => seen > 0 || *known != Suspended::default(),
                    Some(g) => g < seen || (g == seen && seen > 0 && !same_ids(&sets, known)),
                };
                if lost && attempt == 0 {
                    metrics::counter!("fsp_cluster_redis_errors_total").increment(1);
                    tracing::error!(
                        generation = ?generation,
                        expected_at_least = seen,
                        "the cluster's Redis lost suspensions (restarted without persistence, flushed or restored from an older copy): this gateway's last known set is written back, nothing is lifted"
                    );
                    self.restore(
                        &mut conn,
                        known,
                        seen.max(generation.unwrap_or(0)),
                        "restored",
                    )
                    .await?;
                    continue;
                }
                self.generation
                    .fetch_max(generation.unwrap_or(0), Ordering::AcqRel);
                return Ok(sets);
            }
            Err(redis::RedisError::from(std::io::Error::other(
                "the cluster's suspensions could not be restored",
            )))
        };
        tokio::time::timeout(REDIS_TIMEOUT, run)
            .await
            .map_err(|_| timed_out())
            .and_then(|r| r)
    }

    /// A subscription to the change announcements, or None (logged) when Redis does not
    /// answer.
    async fn subscribe(&self) -> Option<redis::aio::PubSubStream> {
        let run = async {
            let mut pubsub = self.client().get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        match tokio::time::timeout(REDIS_TIMEOUT, run).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                self.mark(false, Some(&e));
                None
            }
            Err(_) => {
                self.mark(false, Some(&timed_out()));
                None
            }
        }
    }

    /// Counts a failure, and logs when Redis becomes unreachable or answers again.
    fn mark(&self, ok: bool, error: Option<&redis::RedisError>) {
        metrics::gauge!("fsp_cluster_redis_up").set(if ok { 1.0 } else { 0.0 });
        if !ok {
            metrics::counter!("fsp_cluster_redis_errors_total").increment(1);
        }
        let was = self.healthy.swap(ok, Ordering::Relaxed);
        match (was, ok) {
            (true, false) => tracing::error!(
                error = %error.map(ToString::to_string).unwrap_or_default(),
                "the cluster's Redis is unreachable: the last known suspensions stay in force, and suspensions and resumes are refused until it answers"
            ),
            (false, true) => tracing::warn!("the cluster's Redis answers again"),
            _ => {}
        }
    }
}

/// Whether two sets suspend the same parties (the records of who, when and why may
/// differ: a suspension made twice keeps its first).
fn same_ids(a: &Suspended, b: &Suspended) -> bool {
    a.consumers.keys().eq(b.consumers.keys()) && a.providers.keys().eq(b.providers.keys())
}

/// One change to the cluster's suspensions (see `ClusterLink::write`): KEYS[1] the
/// party's hash, KEYS[2] the generation; ARGV: the generation this gateway saw, the
/// operation (`suspend` or `resume`), the id, the record, the channel, the announcement.
/// Returns {-1, generation, generation} when the generation is behind what was seen
/// (nothing changed), else {1 or 0: whether the set changed, the new generation, the
/// generation before}.
static WRITE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local g = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if g < tonumber(ARGV[1]) then
  return {-1, g, g}
end
local changed
if ARGV[2] == 'suspend' then
  changed = redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[4])
else
  changed = redis.call('HDEL', KEYS[1], ARGV[3])
end
local n = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {changed, n, g}
",
    )
});

/// Writes a known set back (see `ClusterLink::restore`): KEYS the consumers' hash, the
/// providers' hash, the generation; ARGV the generation to pass, the channel, the
/// announcement, how many consumer entries follow, then id and record pairs (consumers
/// first). Returns the new generation: past both the one given and the one there.
static RESTORE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local n = tonumber(ARGV[4])
local i = 5
local c = 0
while i < #ARGV do
  local key = KEYS[2]
  if c < n then key = KEYS[1] end
  redis.call('HSETNX', key, ARGV[i], ARGV[i + 1])
  c = c + 1
  i = i + 2
end
local g = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
local at_least = tonumber(ARGV[1])
if at_least > g then g = at_least end
g = g + 1
redis.call('SET', KEYS[3], g)
redis.call('PUBLISH', ARGV[2], ARGV[3])
return g
",
    )
});

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {} s", REDIS_TIMEOUT.as_secs()),
    ))
}

fn json_error(e: serde_json::Error) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other(e))
}

/// The hash's entries; a value that is not a suspension record (written by hand, or by
/// a newer gateway) still suspends: a cut-off must not be lifted by a formatting error.
fn decode(party: Party, raw: HashMap<String, String>) -> BTreeMap<String, Suspension> {
    raw.into_iter()
        .map(|(id, value)| {
            let s = serde_json::from_str(&value).unwrap_or_else(|e| {
                tracing::warn!(kind = party.as_str(), %id, error = %e, "a suspension in Redis is not a record of who, when and why; it applies anyway");
                Suspension {
                    by: "unknown".to_owned(),
                    at: None,
                    reason: None,
                }
            });
            (id, s)
        })
        .collect()
}

fn log_changes(before: &Suspended, after: &Suspended) {
    for party in [Party::Consumer, Party::Provider] {
        let (b, a) = (before.of(party), after.of(party));
        for (id, s) in a.iter().filter(|(id, _)| !b.contains_key(*id)) {
            tracing::warn!(target: "fsp::admin", kind = party.as_str(), %id, by = %s.by, at = ?s.at, reason = ?s.reason, "suspended by the cluster");
        }
        for id in b.keys().filter(|id| !a.contains_key(*id)) {
            tracing::warn!(target: "fsp::admin", kind = party.as_str(), %id, "resumed by the cluster");
        }
    }
}

fn read_state(file: Option<&Path>) -> anyhow::Result<StateFile> {
    match file {
        Some(path) if path.exists() => {
            // The gateway's own state, but read like every file it is given: a regular
            // file of bounded size.
            let text = certs::load::read_regular_file(path, 16 << 20)?;
            serde_json::from_slice(&text).map_err(|e| {
                anyhow::anyhow!("suspensions file {} is not valid: {e}", path.display())
            })
        }
        _ => Ok(StateFile::default()),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

impl policy::Suspensions for Suspended {
    fn consumer_suspended(&self, consumer: &str) -> bool {
        !self.consumers.is_empty() && self.consumers.contains_key(consumer)
    }

    fn provider_suspended(&self, provider: &str) -> bool {
        !self.providers.is_empty() && self.providers.contains_key(provider)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use policy::Suspensions;

    fn by(who: &str, reason: &str) -> Option<Suspension> {
        Some(Suspension {
            by: who.to_owned(),
            at: Some("2026-12-03T08:00:00.000Z".to_owned()),
            reason: Some(reason.to_owned()),
        })
    }

    #[tokio::test]
    async fn suspensions_survive_a_restart_with_who_when_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s/suspensions.json");
        let store = SuspensionStore::open(Some(file.clone())).unwrap();
        assert!(
            store
                .set(Party::Consumer, "bxl", by("token#1", "leak"))
                .await
                .unwrap()
                .changed
        );
        // Suspending again changes nothing and keeps the first record.
        assert!(
            !store
                .set(Party::Consumer, "bxl", by("token#2", "other"))
                .await
                .unwrap()
                .changed
        );
        assert!(
            store
                .set(Party::Provider, "rrn", by("token#1", "maintenance"))
                .await
                .unwrap()
                .changed
        );
        assert!(store.snapshot().consumer_suspended("bxl"));
        let again = SuspensionStore::open(Some(file)).unwrap();
        let s = again.snapshot();
        assert!(s.consumer_suspended("bxl"));
        assert!(s.provider_suspended("rrn"));
        assert_eq!(s.consumers["bxl"].by, "token#1");
        assert_eq!(s.consumers["bxl"].reason.as_deref(), Some("leak"));
        assert!(
            again
                .set(Party::Consumer, "bxl", None)
                .await
                .unwrap()
                .changed
        );
        assert!(
            !again
                .set(Party::Consumer, "bxl", None)
                .await
                .unwrap()
                .changed
        );
        assert!(!again.snapshot().consumer_suspended("bxl"));
    }

    #[test]
    fn the_first_file_format_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("suspensions.json");
        std::fs::write(&file, r#"{"consumers":["bxl"],"providers":[]}"#).unwrap();
        let store = SuspensionStore::open(Some(file)).unwrap();
        let s = store.snapshot();
        assert!(s.consumer_suspended("bxl"));
        assert_eq!(s.consumers["bxl"].by, "unknown");
        assert!(!s.provider_suspended("rrn"));
    }

    #[test]
    fn a_malformed_record_in_redis_still_suspends() {
        let raw = HashMap::from([
            ("bxl".to_owned(), "not json".to_owned()),
            (
                "gent".to_owned(),
                r#"{"by":"token#3","at":"2026-12-03T08:00:00Z","reason":"r"}"#.to_owned(),
            ),
        ]);
        let sets = decode(Party::Consumer, raw);
        assert_eq!(sets["bxl"].by, "unknown");
        assert_eq!(sets["gent"].by, "token#3");
    }
}
