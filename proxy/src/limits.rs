//! Bounds on what callers can make the gateway hold.
//!
//! - [`ConnLimits`]: consumer connections, in total and per source address, with tighter
//!   bounds for connections that presented no client certificate (the cheapest to open:
//!   no key, no CA), and, once half the room is taken, for connections from one
//!   address whose TLS handshake is still under way (one that never finishes costs no
//!   more). A connection beyond a bound is closed at once; calls already under way are
//!   never touched.
//! - [`ConnCap`]: calls in flight to one provider (each holds an upstream connection),
//!   shared by the worker threads. A call that finds the cap reached waits a bounded time
//!   for one to end, then is refused with 503 without anything being sent.
//! - [`raise_descriptor_limit`]: the process takes every file descriptor the system
//!   allows it, and refuses to start when that is fewer than its limits need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

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
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerAddress => "per_address",
            Self::Anonymous => "anonymous",
            Self::AnonymousPerAddress => "anonymous_per_address",
            Self::HandshakesPerAddress => "handshakes_per_address",
        }
    }
}

/// The address a connection is counted under: an IPv4 address, or an IPv6 /64 (what
/// one subscriber usually gets, so a client cannot dodge the bound by rotating its
/// interface identifier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Self {
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
    total: AtomicUsize,
    anonymous: AtomicUsize,
    /// Touched once when a connection opens and once when it closes, never per call.
    sources: Mutex<HashMap<Source, PerSource>>,
}

/// One admitted connection; its place is given back when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    /// None while a balancer's PROXY header has not said whose connection it is.
    source: Option<Source>,
    anonymous: bool,
    /// Counted among its address's handshakes under way.
    handshaking: bool,
}

impl ConnLimits {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            total: AtomicUsize::new(0),
            anonymous: AtomicUsize::new(0),
            sources: Mutex::new(HashMap::new()),
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

    /// Admits a new connection from `ip`, or says which bound it breaks.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let source = Source::of(ip);
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.limits.max {
            return Err(refused(Refusal::Total));
        }
        let entry = sources.entry(source).or_default();
        if entry.all >= self.limits.per_ip {
            return Err(refused(Refusal::PerAddress));
        }
        if self.too_many_handshakes(entry) {
            return Err(refused(Refusal::HandshakesPerAddress));
        }
        entry.all += 1;
        entry.handshaking += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("fsp_connections_open").increment(1.0);
        Ok(ConnSlot {
            limits: self.clone(),
            source: Some(source),
            anonymous: false,
            handshaking: true,
        })
    }

    /// Whether a new connection from `entry`'s address would be one handshake too many:
    /// once half of `max` is open (in normal times a consumer may open many connections
    /// at once), an address may have at most `anonymous_per_ip` handshakes under way.
    fn too_many_handshakes(&self, entry: &PerSource) -> bool {
        entry.handshaking >= self.limits.anonymous_per_ip
            && self.total.load(Ordering::Relaxed) >= self.limits.max.div_ceil(2)
    }

    /// Admits a connection from a load balancer before its PROXY header says whose it
    /// is: counted in the total at once, and against its consumer's address by
    /// [`ConnSlot::attribute`].
    pub fn admit_unattributed(self: &Arc<Self>) -> Result<ConnSlot, Refusal> {
        let _sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.limits.max {
            return Err(refused(Refusal::Total));
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("fsp_connections_open").increment(1.0);
        Ok(ConnSlot {
            limits: self.clone(),
            source: None,
            anonymous: false,
            handshaking: false,
        })
    }
}

fn refused(r: Refusal) -> Refusal {
    metrics::counter!("fsp_connections_refused_total", "reason" => r.as_str()).increment(1);
    r
}

impl ConnSlot {
    /// Counts a connection admitted by [`ConnLimits::admit_unattributed`] against the
    /// address it turned out to come from.
    pub fn attribute(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.source.is_some() {
            return Ok(());
        }
        let source = Source::of(ip);
        let mut sources = self
            .limits
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = sources.entry(source).or_default();
        if entry.all >= self.limits.limits.per_ip {
            return Err(refused(Refusal::PerAddress));
        }
        if self.limits.too_many_handshakes(entry) {
            return Err(refused(Refusal::HandshakesPerAddress));
        }
        entry.all += 1;
        entry.handshaking += 1;
        self.source = Some(source);
        self.handshaking = true;
        Ok(())
    }

    /// The connection's handshake is over (with a certificate; [`Self::anonymous`] says
    /// it for one without): it no longer counts among its address's handshakes under
    /// way.
    pub fn handshake_done(&mut self) {
        if !self.handshaking {
            return;
        }
        self.handshaking = false;
        let mut sources = self
            .limits
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(source) = self.source
            && let Some(entry) = sources.get_mut(&source)
        {
            entry.handshaking = entry.handshaking.saturating_sub(1);
        }
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
        let mut sources = limits.sources.lock().unwrap_or_else(|e| e.into_inner());
        if limits.anonymous.load(Ordering::Relaxed) >= limits.limits.anonymous {
            return Err(refused(Refusal::Anonymous));
        }
        let entry = sources.entry(source).or_default();
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
        let mut sources = limits.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(source) = self.source
            && let Some(entry) = sources.get_mut(&source)
        {
            entry.all = entry.all.saturating_sub(1);
            if self.anonymous {
                entry.anonymous = entry.anonymous.saturating_sub(1);
            }
            if self.handshaking {
                entry.handshaking = entry.handshaking.saturating_sub(1);
            }
            if entry.all == 0 {
                sources.remove(&source);
            }
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
            slot.handshake_done();
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
        third.handshake_done();
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
            slot.handshake_done();
        }
        let _next = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refusal::HandshakesPerAddress));
        assert_eq!(l.open(), (7, 1));
        // Below half again, the bound is lifted.
        drop(burst);
        let _again = l.admit(a).unwrap();
        assert_eq!(l.open(), (4, 1));
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
        let _c = limits.admit_unattributed().unwrap();
        // The total is reached before any header was read.
        assert_eq!(limits.admit_unattributed().unwrap_err(), Refusal::Total);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        a.attribute(ip).unwrap();
        assert_eq!(b.attribute(ip).unwrap_err(), Refusal::PerAddress);
        drop(a);
        b.attribute(ip).unwrap();
        drop(b);
        assert_eq!(limits.open().0, 1);
    }
}
