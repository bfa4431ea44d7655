//! Bounds on what callers can make the gateway hold.
//!
//! - [`ConnLimits`]: consumer connections, in total and per source address, with tighter
//!   bounds for connections that presented no client certificate (the cheapest to open:
//!   no key, no CA), and, once half the room is taken, for connections from one
//!   address whose TLS handshake is still under way (one that never finishes costs no
//!   more). A connection beyond a bound is closed at once; calls already under way are
//!   never touched. When every place is taken, the oldest connection still before the
//!   end of its TLS handshake gives its place up to the new one (see
//!   [`ConnLimits::admit`]): connections that stall their handshake can no longer hold
//!   `max_connections` against consumers whose handshakes take milliseconds.
//! - [`ConnCap`]: calls in flight to one provider (each holds an upstream connection),
//!   shared by the worker threads. A call that finds the cap reached waits a bounded time
//!   for one to end, then is refused with 503 without anything being sent.
//! - [`raise_descriptor_limit`]: the process takes every file descriptor the system
//!   allows it, and refuses to start when that is fewer than its limits need.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::observe::Sparse;

/// Bounds on consumer connections, as configured under `[listener]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections in total.
    pub max: usize,
    /// Whether `max` was set by the operator (a default is lowered to fit the process's
    /// descriptor limit; a value set explicitly that does not fit stops the start).
    pub max_explicit: bool,
    /// Open connections from one source address (an IPv6 /64 counts as one).
    pub per_ip: usize,
    /// Connections that presented no client certificate, in total and per address.
    pub anonymous: usize,
    pub anonymous_per_ip: usize,
}

/// Descriptors kept aside for everything that is not a connection (listeners, audit
/// files, the admin API, Redis, DNS).
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// A cap on calls in flight to one provider, over all worker threads, and on each
/// consumer's share of it (so that one consumer's slow uploads cannot hold every slot).
#[derive(Debug)]
pub struct ConnCap {
    in_use: AtomicUsize,
    max: usize,
    waiting: AtomicUsize,
    freed: Notify,
    per_consumer: usize,
    /// Each declared consumer's index into `held`.
    consumers: foldhash::HashMap<String, usize>,
    held: Vec<AtomicUsize>,
}

impl ConnCap {
    pub fn new(max: usize) -> Self {
        Self::with_consumers(max, max, std::iter::empty())
    }

    /// A cap of `max` calls, of which each of `consumers` may hold `per_consumer`.
    pub fn with_consumers<'a>(
        max: usize,
        per_consumer: usize,
        consumers: impl Iterator<Item = &'a str>,
    ) -> Self {
        // A share as large as the cap adds nothing: it is not counted.
        let consumers: foldhash::HashMap<String, usize> = consumers
            .filter(|_| per_consumer < max)
            .enumerate()
            .map(|(i, id)| (id.to_owned(), i))
            .collect();
        Self {
            in_use: AtomicUsize::new(0),
            max,
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            per_consumer,
            held: (0..consumers.len()).map(|_| AtomicUsize::new(0)).collect(),
            consumers,
        }
    }

    pub fn per_consumer(&self) -> usize {
        self.per_consumer
    }

    /// The index of a consumer's share, if it is a declared consumer.
    pub fn consumer(&self, id: &str) -> Option<usize> {
        self.consumers.get(id).copied()
    }

    /// Takes one of the consumer's share of slots, if it has one left (no waiting: a
    /// consumer over its share is throttled).
    pub fn try_take_share(&self, consumer: usize) -> bool {
        self.held
            .get(consumer)
            .is_none_or(|held| take_below(held, self.per_consumer))
    }

    pub fn give_share(&self, consumer: usize) {
        if let Some(held) = self.held.get(consumer) {
            held.fetch_sub(1, Ordering::Release);
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Takes a slot if one is free.
    pub fn try_take(&self) -> bool {
        take_below(&self.in_use, self.max)
    }

    /// Takes a slot, waiting at most `wait` for one to free up.
    pub async fn take(&self, wait: Duration) -> bool {
        if self.try_take() {
            return true;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + wait;
        let taken = loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before trying, so a slot given back in between is not missed.
            freed.as_mut().enable();
            if self.try_take() {
                break true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                break self.try_take();
            }
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        taken
    }

    /// Gives a slot back.
    pub fn give(&self) {
        self.in_use.fetch_sub(1, Ordering::Release);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }
}

/// Adds one to `counter` unless it has reached `max`.
fn take_below(counter: &AtomicUsize, max: usize) -> bool {
    let mut current = counter.load(Ordering::Relaxed);
    loop {
        if current >= max {
            return false;
        }
        match counter.compare_exchange_weak(
            current,
            current + 1,
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => return true,
            Err(now) => current = now,
        }
    }
}

/// Why a connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerAddress,
    Anonymous,
    AnonymousPerAddress,
    /// Too many connections from one address still in their TLS handshake.
    HandshakesPerAddress,
    /// Not a refusal of a new connection: this one, still in its handshake, gave its
    /// place to a newer one when every place was taken (counted when it happens, in
    /// `fsp_connections_evicted_total`).
    Evicted,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerAddress => "per_address",
            Self::Anonymous => "anonymous",
            Self::AnonymousPerAddress => "anonymous_per_address",
            Self::HandshakesPerAddress => "handshakes_per_address",
            Self::Evicted => "evicted",
        }
    }
}

/// The address a connection is counted under: an IPv4 address, or an IPv6 /64 (what
/// one subscriber usually gets, so a client cannot dodge the bound by rotating its
/// interface identifier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    V6(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Default)]
struct PerSource {
    all: usize,
    anonymous: usize,
    /// Connections whose TLS handshake is under way: they have not shown a certificate
    /// yet, and one that never finishes its handshake costs as little as an anonymous
    /// one, so they are bounded per address as tightly (but apart from the anonymous
    /// ones, so that idle anonymous connections never keep a consumer's handshake out).
    handshaking: usize,
}

/// Open consumer connections, counted against [`ConnectionLimits`].
#[derive(Debug)]
pub struct ConnLimits {
    limits: ConnectionLimits,
    /// Connections holding a descriptor, evicted ones still closing included.
    total: AtomicUsize,
    anonymous: AtomicUsize,
    /// Touched once when a connection opens, once when its handshake ends and once when
    /// it closes, never per call.
    table: Mutex<Table>,
    /// The warnings about evictions, at most one every 10 s.
    eviction_log: Sparse,
}

/// What [`ConnLimits`] keeps under its lock.
#[derive(Debug, Default)]
struct Table {
    sources: HashMap<Source, PerSource>,
    /// Connections not past their TLS handshake (the PROXY header, if any, included),
    /// by order of admission: the first is the one evicted when every place is taken.
    handshaking: BTreeMap<u64, Arc<Eviction>>,
    next: u64,
    /// Connections evicted whose task has not closed them yet: they still hold a
    /// descriptor, so at most [`EVICTIONS_UNDER_WAY`].
    leaving: usize,
}

/// How a connection in its handshake is told to give its place up.
#[derive(Debug, Default)]
pub struct Eviction {
    /// Set under the limits' lock.
    evicted: AtomicBool,
    notify: Notify,
    /// Its address, for the log.
    ip: Option<IpAddr>,
}

impl Eviction {
    /// Resolves once the connection has been evicted (at once if it already was).
    pub async fn evicted(&self) {
        self.notify.notified().await;
    }
}

/// Evicted connections whose tasks have not yet closed them, at most: past it a new
/// connection that finds every place taken is refused (`total`), so that a burst of
/// connections cannot take more descriptors than `max_connections` and this (well within
/// [`RESERVED_DESCRIPTORS`]). A task closes its evicted connection at its next poll.
pub const EVICTIONS_UNDER_WAY: usize = 64;

/// At most one warning about evictions in this long.
const EVICTION_LOG_EVERY: Duration = Duration::from_secs(10);

/// One admitted connection; its place is given back when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    /// None while a balancer's PROXY header has not said whose connection it is.
    source: Option<Source>,
    anonymous: bool,
    /// Counted among its address's handshakes under way.
    handshaking: bool,
    /// Its place among the connections that may be evicted (until its handshake ends).
    queued: Option<u64>,
    eviction: Arc<Eviction>,
}

impl ConnLimits {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            total: AtomicUsize::new(0),
            anonymous: AtomicUsize::new(0),
            table: Mutex::new(Table::default()),
            eviction_log: Sparse::new(EVICTION_LOG_EVERY),
        })
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Open connections, and among them those without a client certificate.
    pub fn open(&self) -> (usize, usize) {
        (
            self.total.load(Ordering::Relaxed),
            self.anonymous.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection from `ip`, or says which bound it breaks.
    ///
    /// When every place is taken, the oldest connection still before the end of its TLS
    /// handshake is evicted to make room (its task closes it at once: see
    /// [`ConnSlot::eviction`]); only when there is none (every connection open has
    /// finished its handshake: those are never evicted, whatever they are doing) is the
    /// new one refused. A consumer's handshake takes milliseconds: the oldest ones are
    /// those that stall theirs.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let source = Source::of(ip);
        let mut table = self.lock();
        // The bounds of its address first: nobody is evicted for a connection refused.
        if let Some(entry) = table.sources.get(&source) {
            if entry.all >= self.limits.per_ip {
                return Err(refused(Refusal::PerAddress));
            }
            if self.too_many_handshakes(entry, self.staying(&table)) {
                return Err(refused(Refusal::HandshakesPerAddress));
            }
        }
        let evicted = self.make_room(&mut table)?;
        let entry = table.sources.entry(source).or_default();
        entry.all += 1;
        entry.handshaking += 1;
        let slot = self.admitted(&mut table, Some(source), Some(ip));
        drop(table);
        if let Some(gone) = evicted {
            self.log_eviction(gone, Some(ip));
        }
        Ok(slot)
    }

    /// Admits a connection from a load balancer before its PROXY header says whose it
    /// is: counted in the total at once, and against its consumer's address by
    /// [`ConnSlot::attribute`]. It may be evicted, and may evict, as any other.
    pub fn admit_unattributed(self: &Arc<Self>) -> Result<ConnSlot, Refusal> {
        let mut table = self.lock();
        let evicted = self.make_room(&mut table)?;
        let slot = self.admitted(&mut table, None, None);
        drop(table);
        if let Some(gone) = evicted {
            self.log_eviction(gone, None);
        }
        Ok(slot)
    }

    /// Connections open that were not evicted.
    fn staying(&self, table: &Table) -> usize {
        self.total
            .load(Ordering::Relaxed)
            .saturating_sub(table.leaving)
    }

    /// With every place taken, evicts the oldest connection in its handshake; the
    /// evicted one's address (`Some(None)` for a balancer's connection not yet
    /// attributed), `None` when there was room, or `Total` when nothing could be
    /// evicted.
    fn make_room(&self, table: &mut Table) -> Result<Option<Option<IpAddr>>, Refusal> {
        if self.staying(table) < self.limits.max {
            return Ok(None);
        }
        if table.leaving >= EVICTIONS_UNDER_WAY {
            return Err(refused(Refusal::Total));
        }
        let Some((_, oldest)) = table.handshaking.pop_first() else {
            return Err(refused(Refusal::Total));
        };
        metrics::gauge!("fsp_connections_in_handshake").decrement(1.0);
        oldest.evicted.store(true, Ordering::Relaxed);
        oldest.notify.notify_one();
        table.leaving += 1;
        metrics::counter!("fsp_connections_evicted_total").increment(1);
        Ok(Some(oldest.ip))
    }

    /// Counts a connection in (its address already counted, if known) and queues it
    /// among those in their handshake.
    fn admitted(
        self: &Arc<Self>,
        table: &mut Table,
        source: Option<Source>,
        ip: Option<IpAddr>,
    ) -> ConnSlot {
        self.total.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("fsp_connections_open").increment(1.0);
        let eviction = Arc::new(Eviction {
            ip,
            ..Eviction::default()
        });
        let seq = table.next;
        table.next += 1;
        table.handshaking.insert(seq, eviction.clone());
        metrics::gauge!("fsp_connections_in_handshake").increment(1.0);
        ConnSlot {
            limits: self.clone(),
            source,
            anonymous: false,
            handshaking: source.is_some(),
            queued: Some(seq),
            eviction,
        }
    }

    /// A warning at most every [`EVICTION_LOG_EVERY`], with the evictions since the last one: a flood of
    /// stalled handshakes must not flood the log as well.
    fn log_eviction(&self, evicted: Option<IpAddr>, by: Option<IpAddr>) {
        if let Some(evictions) = self.eviction_log.occurred() {
            tracing::warn!(
                evictions,
                evicted = ?evicted,
                for_peer = ?by,
                max_connections = self.limits.max,
                "listener.max_connections reached: connections still in their TLS handshake closed to make room for new ones (the count is since the last such warning)"
            );
        }
    }

    /// Whether a new connection from `entry`'s address would be one handshake too many:
    /// once half of `max` is open (in normal times a consumer may open many connections
    /// at once), an address may have at most `anonymous_per_ip` handshakes under way.
    fn too_many_handshakes(&self, entry: &PerSource, open: usize) -> bool {
        entry.handshaking >= self.limits.anonymous_per_ip && open >= self.limits.max.div_ceil(2)
    }
}

fn refused(r: Refusal) -> Refusal {
    metrics::counter!("fsp_connections_refused_total", "reason" => r.as_str()).increment(1);
    r
}

impl ConnSlot {
    /// What tells this connection, while its handshake is under way, that it was
    /// evicted: its task closes it then.
    pub fn eviction(&self) -> Arc<Eviction> {
        self.eviction.clone()
    }

    /// Counts a connection admitted by [`ConnLimits::admit_unattributed`] against the
    /// address it turned out to come from.
    pub fn attribute(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.source.is_some() {
            return Ok(());
        }
        let source = Source::of(ip);
        let limits = &self.limits;
        let mut table = limits.lock();
        if self.eviction.evicted.load(Ordering::Relaxed) {
            return Err(Refusal::Evicted);
        }
        let staying = limits.staying(&table);
        let entry = table.sources.entry(source).or_default();
        if entry.all >= limits.limits.per_ip {
            return Err(refused(Refusal::PerAddress));
        }
        if limits.too_many_handshakes(entry, staying) {
            return Err(refused(Refusal::HandshakesPerAddress));
        }
        entry.all += 1;
        entry.handshaking += 1;
        self.source = Some(source);
        self.handshaking = true;
        Ok(())
    }

    /// Takes the connection out of those in their handshake, under the lock: `Evicted`
    /// when it was evicted meanwhile (its handshake ended as its place was given away:
    /// it must be closed all the same).
    fn leave_queue(
        eviction: &Eviction,
        queued: &mut Option<u64>,
        table: &mut Table,
    ) -> Result<(), Refusal> {
        if eviction.evicted.load(Ordering::Relaxed) {
            return Err(Refusal::Evicted);
        }
        if let Some(seq) = queued.take()
            && table.handshaking.remove(&seq).is_some()
        {
            metrics::gauge!("fsp_connections_in_handshake").decrement(1.0);
        }
        Ok(())
    }

    /// The connection's handshake is over (with a certificate; [`Self::anonymous`] says
    /// it for one without): it no longer counts among its address's handshakes under
    /// way, and can no longer be evicted. `Evicted` if it was, before: close it.
    pub fn handshake_done(&mut self) -> Result<(), Refusal> {
        if self.queued.is_none() && !self.handshaking {
            return Ok(());
        }
        let mut table = self.limits.lock();
        Self::leave_queue(&self.eviction, &mut self.queued, &mut table)?;
        if !self.handshaking {
            return Ok(());
        }
        self.handshaking = false;
        if let Some(source) = self.source
            && let Some(entry) = table.sources.get_mut(&source)
        {
            entry.handshaking = entry.handshaking.saturating_sub(1);
        }
        Ok(())
    }

    /// The connection presented no client certificate: it must also fit the anonymous
    /// bounds, or be closed.
    pub fn anonymous(&mut self) -> Result<(), Refusal> {
        if self.anonymous {
            return Ok(());
        }
        let limits = &self.limits;
        let Some(source) = self.source else {
            return Err(refused(Refusal::Anonymous));
        };
        let mut table = limits.lock();
        // Out of the queue, even when refused below: it is closed then.
        Self::leave_queue(&self.eviction, &mut self.queued, &mut table)?;
        if limits.anonymous.load(Ordering::Relaxed) >= limits.limits.anonymous {
            return Err(refused(Refusal::Anonymous));
        }
        let entry = table.sources.entry(source).or_default();
        if entry.anonymous >= limits.limits.anonymous_per_ip {
            return Err(refused(Refusal::AnonymousPerAddress));
        }
        entry.anonymous += 1;
        if self.handshaking {
            entry.handshaking = entry.handshaking.saturating_sub(1);
            self.handshaking = false;
        }
        limits.anonymous.fetch_add(1, Ordering::Relaxed);
        self.anonymous = true;
        metrics::gauge!("fsp_connections_anonymous_open").increment(1.0);
        Ok(())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let limits = &self.limits;
        let mut table = limits.lock();
        let table = &mut *table;
        if let Some(source) = self.source
            && let Some(entry) = table.sources.get_mut(&source)
        {
            entry.all = entry.all.saturating_sub(1);
            if self.anonymous {
                entry.anonymous = entry.anonymous.saturating_sub(1);
            }
            if self.handshaking {
                entry.handshaking = entry.handshaking.saturating_sub(1);
            }
            if entry.all == 0 {
                table.sources.remove(&source);
            }
        }
        if self.eviction.evicted.load(Ordering::Relaxed) {
            table.leaving = table.leaving.saturating_sub(1);
        } else if let Some(seq) = self.queued
            && table.handshaking.remove(&seq).is_some()
        {
            metrics::gauge!("fsp_connections_in_handshake").decrement(1.0);
        }
        limits.total.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("fsp_connections_open").decrement(1.0);
        if self.anonymous {
            limits.anonymous.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("fsp_connections_anonymous_open").decrement(1.0);
        }
    }
}

/// Raises the soft limit on open files to the hard one; returns the limit now in force.
pub fn raise_descriptor_limit() -> std::io::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
    }
    Ok(rlimit::Resource::NOFILE.get()?.0)
}

/// Descriptors the limits need: one per consumer connection, one per upstream
/// connection, and a reserve.
pub fn descriptors_needed(consumer_connections: usize, upstream_connections: usize) -> u64 {
    consumer_connections as u64 + upstream_connections as u64 + RESERVED_DESCRIPTORS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits(
        max: usize,
        per_ip: usize,
        anonymous: usize,
        anonymous_per_ip: usize,
    ) -> Arc<ConnLimits> {
        ConnLimits::new(ConnectionLimits {
            max,
            max_explicit: true,
            per_ip,
            anonymous,
            anonymous_per_ip,
        })
    }

    #[test]
    fn connections_are_bounded_in_total_per_address_and_when_anonymous() {
        let l = limits(5, 3, 3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut slot = l.admit(a).unwrap();
            slot.handshake_done().unwrap();
            held.push(slot);
        }
        assert_eq!(l.admit(a).err(), Some(Refusal::PerAddress));
        held[0].anonymous().unwrap();
        held[1].anonymous().unwrap();
        assert_eq!(
            held[2].anonymous().err(),
            Some(Refusal::AnonymousPerAddress)
        );
        let mut other = l.admit(b).unwrap();
        other.anonymous().unwrap();
        let mut third = l.admit(b).unwrap();
        third.handshake_done().unwrap();
        assert_eq!(third.anonymous().err(), Some(Refusal::Anonymous));
        assert_eq!(l.admit(b).err(), Some(Refusal::Total));
        assert_eq!(l.open(), (5, 3));
        drop(held);
        assert_eq!(l.open(), (2, 1));
        assert!(l.admit(a).is_ok());
        third.anonymous().unwrap();
    }

    /// Once half the connections are open, connections that have not finished their
    /// handshake are bounded per address as tightly as anonymous ones, apart from them:
    /// neither keeps the other out.
    #[test]
    fn handshakes_under_way_are_bounded_per_address_once_half_the_room_is_taken() {
        let l = limits(8, 8, 8, 1);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        // Below half of the total, a burst of handshakes from one address is let in.
        let mut burst: Vec<_> = (0..4).map(|_| l.admit(a).unwrap()).collect();
        assert_eq!(l.admit(a).err(), Some(Refusal::HandshakesPerAddress));
        let mut other = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Refusal::HandshakesPerAddress));
        // A handshake done (with a certificate, or without: then anonymous) makes room.
        other.anonymous().unwrap();
        let _third = l.admit(b).unwrap();
        for slot in &mut burst {
            slot.handshake_done().unwrap();
        }
        let _next = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refusal::HandshakesPerAddress));
        assert_eq!(l.open(), (7, 1));
        // Below half again, the bound is lifted.
        drop(burst);
        let _again = l.admit(a).unwrap();
        assert_eq!(l.open(), (4, 1));
    }

    /// With every place taken, the oldest connection still in its handshake gives its
    /// place up to the new one; connections past their handshake never do.
    #[tokio::test]
    async fn the_oldest_handshake_gives_its_place_up_when_every_place_is_taken() {
        let l = limits(4, 4, 4, 4);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut served = l.admit(a).unwrap();
        served.handshake_done().unwrap();
        let mut anonymous = l.admit(a).unwrap();
        anonymous.anonymous().unwrap();
        let mut stalled = l.admit(b).unwrap();
        let younger = l.admit(b).unwrap();
        // Full: the new connection takes the place of the oldest handshake under way.
        let mut new = l.admit(a).unwrap();
        // The oldest handshake is told (at once: it was told before it waited).
        tokio::time::timeout(Duration::from_secs(1), stalled.eviction().evicted())
            .await
            .unwrap();
        assert_eq!(stalled.handshake_done(), Err(Refusal::Evicted));
        assert_eq!(stalled.anonymous(), Err(Refusal::Evicted));
        // Still holding its descriptor until its task closes it.
        assert_eq!(l.open(), (5, 1));
        drop(stalled);
        assert_eq!(l.open(), (4, 1));
        // The next one takes the younger handshake's place, then nothing is left to
        // evict: the ones past their handshake are never touched.
        new.handshake_done().unwrap();
        let mut newer = l.admit(b).unwrap();
        assert!(younger.eviction().evicted.load(Ordering::Relaxed));
        drop(younger);
        newer.handshake_done().unwrap();
        assert_eq!(l.admit(b).err(), Some(Refusal::Total));
        assert!(!served.eviction().evicted.load(Ordering::Relaxed));
        assert!(!anonymous.eviction().evicted.load(Ordering::Relaxed));
        assert_eq!(l.open(), (4, 1));
    }

    /// A new connection refused by its address's bounds evicts nobody.
    #[test]
    fn a_connection_refused_per_address_evicts_nobody() {
        let l = limits(2, 1, 2, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = l.admit(a).unwrap();
        let _second = l.admit(b).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refusal::PerAddress));
        assert!(!first.eviction().evicted.load(Ordering::Relaxed));
        assert_eq!(l.open(), (2, 0));
    }

    /// Evicted connections still closing are bounded: past them, a new connection that
    /// finds every place taken is refused, so descriptors stay within `max` and that
    /// bound.
    #[test]
    fn evictions_under_way_are_bounded() {
        let l = limits(EVICTIONS_UNDER_WAY * 2, usize::MAX, 1, usize::MAX);
        let ip = |i: usize| IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
        let mut held: Vec<_> = (0..EVICTIONS_UNDER_WAY * 2)
            .map(|i| l.admit(ip(i)).unwrap())
            .collect();
        let mut newer: Vec<_> = (0..EVICTIONS_UNDER_WAY)
            .map(|i| l.admit(ip(1000 + i)).unwrap())
            .collect();
        assert_eq!(l.admit(ip(2000)).err(), Some(Refusal::Total));
        assert_eq!(l.open().0, EVICTIONS_UNDER_WAY * 3);
        // The evicted ones close: room to evict again.
        held.drain(..EVICTIONS_UNDER_WAY);
        newer.push(l.admit(ip(2000)).unwrap());
        assert_eq!(l.open().0, EVICTIONS_UNDER_WAY * 2 + 1);
    }

    /// A balancer's connection not yet attributed is in its handshake too: evicted
    /// before its header, it is refused when the header comes.
    #[test]
    fn a_balancers_connection_before_its_header_may_be_evicted() {
        let l = limits(1, 1, 1, 1);
        let mut waiting = l.admit_unattributed().unwrap();
        let _new = l.admit_unattributed().unwrap();
        assert_eq!(
            waiting.attribute("192.0.2.1".parse().unwrap()),
            Err(Refusal::Evicted)
        );
        drop(waiting);
        assert_eq!(l.open(), (1, 0));
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_address() {
        let l = limits(10, 2, 10, 10);
        let _x = l.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _y = l.admit("2001:db8:1:2:ffff::9".parse().unwrap()).unwrap();
        assert_eq!(
            l.admit("2001:db8:1:2::77".parse().unwrap()).err(),
            Some(Refusal::PerAddress)
        );
        assert!(l.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
        // An IPv4-mapped address is its IPv4 address.
        let _v4 = l.admit("192.0.2.9".parse().unwrap()).unwrap();
        let _v4b = l.admit("::ffff:192.0.2.9".parse().unwrap()).unwrap();
        assert!(l.admit("192.0.2.9".parse().unwrap()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cap_waits_a_bounded_time_and_hands_over_freed_slots() {
        let cap = Arc::new(ConnCap::new(2));
        assert!(cap.try_take());
        assert!(cap.try_take());
        assert!(!cap.try_take());
        let started = tokio::time::Instant::now();
        assert!(!cap.take(Duration::from_millis(500)).await);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        let waiter = tokio::spawn({
            let cap = cap.clone();
            async move { cap.take(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        cap.give();
        assert!(waiter.await.unwrap());
        assert_eq!(cap.in_use(), 2);
    }

    #[test]
    fn each_consumer_holds_at_most_its_share() {
        let cap = ConnCap::with_consumers(10, 2, ["a", "b"].into_iter());
        let (a, b) = (cap.consumer("a").unwrap(), cap.consumer("b").unwrap());
        assert!(cap.consumer("c").is_none());
        assert!(cap.try_take_share(a) && cap.try_take_share(a));
        assert!(!cap.try_take_share(a));
        assert!(cap.try_take_share(b));
        cap.give_share(a);
        assert!(cap.try_take_share(a));
    }
}

#[cfg(test)]
mod balancer_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_balancers_connections_count_in_the_total_before_their_header_and_per_address_after() {
        let limits = ConnLimits::new(ConnectionLimits {
            max: 3,
            max_explicit: true,
            per_ip: 1,
            anonymous: 3,
            anonymous_per_ip: 1,
        });
        let mut a = limits.admit_unattributed().unwrap();
        let mut b = limits.admit_unattributed().unwrap();
        let mut c = limits.admit_unattributed().unwrap();
        // The total is reached before any header was read: a fourth takes the place of
        // the oldest (still before its handshake), which is refused when its header comes.
        let mut d = limits.admit_unattributed().unwrap();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(a.attribute(ip).unwrap_err(), Refusal::Evicted);
        drop(a);
        b.attribute(ip).unwrap();
        b.handshake_done().unwrap();
        assert_eq!(c.attribute(ip).unwrap_err(), Refusal::PerAddress);
        drop(b);
        c.attribute(ip).unwrap();
        c.handshake_done().unwrap();
        d.handshake_done().unwrap();
        let mut e = limits.admit_unattributed().unwrap();
        e.handshake_done().unwrap();
        // Every place past its handshake: nothing to evict.
        assert_eq!(limits.admit_unattributed().unwrap_err(), Refusal::Total);
        drop(c);
        drop(e);
        assert_eq!(limits.open().0, 1);
    }
}
