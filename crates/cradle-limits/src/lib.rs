//! What a listener decides before it does any work for a client: whether a
//! new connection may be served at all ([`Admission`]), and whether a
//! request is within its sender's budget ([`Buckets`]).
//!
//! A guest is one source address, and guests share a host: the caps are
//! per source so that one guest holding connections (idle, or sending a
//! header byte a second) cannot starve the others, and a total cap bounds
//! what the listener holds at all. Past its source's cap a connection is
//! reset at accept, so it costs an `accept` and a `close`. At the total the
//! listener stops accepting until a connection closes ([`Admission::room`]),
//! as nginx and HAProxy do: new connections wait in the kernel's backlog
//! and, once that is full, their SYNs are dropped and their clients back
//! off. Resetting them instead was measured worse: every client reconnects
//! at once, and the handshakes of thousands of connects a second cost the
//! host more than the listener ever saves. Requests
//! are metered per sender by a token bucket, the shape AWS and Azure
//! throttle their metadata services with: a burst, then a steady rate.
//!
//! Written here rather than taken from a crate: `governor` meters a rate
//! but not connections, and both are a mutex over a map (the work under
//! the lock is a lookup and an add).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Connection caps. Zero means no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections held at once, from every source together.
    pub total: usize,
    /// Connections held at once from one known source (a guest).
    pub per_source: usize,
    /// Connections held at once from one source that is nobody known.
    pub per_unknown_source: usize,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its total.
    Total,
    /// The source holds its own cap.
    Source,
    /// The source is nobody known and holds the smaller cap of those.
    UnknownSource,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::Source => "source",
            Refusal::UnknownSource => "unknown_source",
        }
    }
}

/// Counts of the connections a listener holds, by source.
#[derive(Debug)]
pub struct Admission {
    caps: Caps,
    held: Mutex<Held>,
    /// Told when a connection closes.
    room: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// A connection counted against its caps until dropped.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Admission {
    pub fn new(caps: Caps) -> Arc<Admission> {
        Arc::new(Admission {
            caps,
            held: Mutex::new(Held::default()),
            room: tokio::sync::Notify::new(),
        })
    }

    /// Count a new connection from `source` (`known`: a source the
    /// listener serves, such as an instance's address), or say which cap
    /// it would pass.
    pub fn admit(self: &Arc<Self>, source: IpAddr, known: bool) -> Result<Admitted, Refusal> {
        let source = source.to_canonical();
        let mut held = self.lock();
        if self.caps.total != 0 && held.total >= self.caps.total {
            return Err(Refusal::Total);
        }
        let (cap, refusal) = match known {
            true => (self.caps.per_source, Refusal::Source),
            false => (self.caps.per_unknown_source, Refusal::UnknownSource),
        };
        let mine = held.by_source.entry(source).or_insert(0);
        if cap != 0 && *mine >= cap {
            return Err(refusal);
        }
        *mine += 1;
        held.total += 1;
        Ok(Admitted {
            admission: self.clone(),
            source,
        })
    }

    /// [`Admission::admit`], but a connection that finds the total reached
    /// waits for a place instead of being refused: two listeners sharing
    /// one count can both have accepted when one place was left.
    pub async fn admit_or_wait(
        self: &Arc<Self>,
        source: IpAddr,
        known: bool,
    ) -> Result<Admitted, Refusal> {
        loop {
            match self.admit(source, known) {
                Err(Refusal::Total) => self.room().await,
                other => return other,
            }
        }
    }

    /// Whether the total is reached.
    pub fn full(&self) -> bool {
        self.caps.total != 0 && self.lock().total >= self.caps.total
    }

    /// Wait until the total is not reached (at once if it is not).
    pub async fn room(&self) {
        loop {
            let closed = self.room.notified();
            let mut closed = std::pin::pin!(closed);
            // Registered before the check, so a close in between is seen.
            closed.as_mut().enable();
            if !self.full() {
                return;
            }
            closed.await;
        }
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // A count stays right even if a holder panicked mid-update: every
        // update is one statement.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = self.admission.lock();
        held.total -= 1;
        if let Some(n) = held.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.by_source.remove(&self.source);
            }
        }
        drop(held);
        self.admission.room.notify_waiters();
    }
}

/// Token buckets, one per key: `burst` requests at once, refilled at
/// `rate` a second. A rate of zero turns metering off.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: f64,
    burst: f64,
    state: Mutex<Keyed<K>>,
}

#[derive(Debug)]
struct Keyed<K> {
    buckets: HashMap<K, Bucket>,
    /// When the map reaches this size, full buckets are dropped (a full
    /// bucket is the same as none).
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

const SWEEP_FLOOR: usize = 1024;

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// `rate` requests a second after a burst of `burst` (at least one).
    pub fn new(rate: u32, burst: u32) -> Buckets<K> {
        Buckets {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            state: Mutex::new(Keyed {
                buckets: HashMap::new(),
                sweep_at: SWEEP_FLOOR,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Take one token from `key`'s bucket at `now`, or say how long until
    /// one is there.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.buckets.len() >= state.sweep_at {
            let (rate, burst) = (self.rate, self.burst);
            state.buckets.retain(|_, b| {
                b.tokens + rate * now.saturating_duration_since(b.at).as_secs_f64() < burst
            });
            state.sweep_at = (state.buckets.len() * 2).max(SWEEP_FLOOR);
        }
        let bucket = state.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refilled =
            bucket.tokens + self.rate * now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = refilled.min(self.burst);
        bucket.at = now.max(bucket.at);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_source_has_its_own_cap_and_all_share_the_total() {
        let a = Admission::new(Caps {
            total: 5,
            per_source: 2,
            per_unknown_source: 1,
        });
        let g1 = a.admit(ip("10.0.0.1"), true).unwrap();
        let _g2 = a.admit(ip("10.0.0.1"), true).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1"), true).unwrap_err(), Refusal::Source);
        let _u = a.admit(ip("10.0.0.9"), false).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.9"), false).unwrap_err(),
            Refusal::UnknownSource
        );
        let _h = a.admit(ip("10.0.0.2"), true).unwrap();
        let _i = a.admit(ip("10.0.0.3"), true).unwrap();
        assert_eq!(a.held(), 5);
        assert_eq!(a.admit(ip("10.0.0.4"), true).unwrap_err(), Refusal::Total);
        drop(g1);
        assert_eq!(a.held(), 4);
        // The freed place is anyone's, and the source's own cap is back.
        let _again = a.admit(ip("10.0.0.1"), true).unwrap();
    }

    #[tokio::test]
    async fn a_full_listener_waits_for_a_close() {
        let a = Admission::new(Caps {
            total: 1,
            per_source: 0,
            per_unknown_source: 0,
        });
        a.room().await;
        let held = a.admit(ip("10.0.0.1"), true).unwrap();
        assert!(a.full());
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move { a.room().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "room while full");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a close wakes the waiter")
            .unwrap();
    }

    #[test]
    fn a_mapped_v4_address_is_the_same_source() {
        let a = Admission::new(Caps {
            total: 0,
            per_source: 1,
            per_unknown_source: 1,
        });
        let _g = a.admit(ip("192.0.2.7"), true).unwrap();
        assert_eq!(
            a.admit(ip("::ffff:192.0.2.7"), true).unwrap_err(),
            Refusal::Source
        );
    }

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let b = Buckets::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(&1, t0).unwrap();
        }
        let wait = b.take(&1, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another key never notices.
        b.take(&2, t0).unwrap();
        // A tenth of a second later, one more.
        let t1 = t0 + Duration::from_millis(100);
        b.take(&1, t1).unwrap();
        assert!(b.take(&1, t1).is_err());
        // Never more than the burst, however long it waited.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            b.take(&1, t2).unwrap();
        }
        assert!(b.take(&1, t2).is_err());
    }

    #[test]
    fn a_zero_rate_meters_nothing() {
        let b = Buckets::new(0, 1);
        let t0 = Instant::now();
        for _ in 0..10_000 {
            b.take(&1, t0).unwrap();
        }
    }

    #[test]
    fn full_buckets_are_swept() {
        let b = Buckets::new(1000, 1);
        let t0 = Instant::now();
        for k in 0..5000u32 {
            let _ = b.take(&k, t0);
        }
        // A second later those buckets are full again; the next sweep
        // (when the map doubles) drops them.
        let later = t0 + Duration::from_secs(1);
        for k in 5000..8200u32 {
            b.take(&k, later).unwrap();
        }
        let held = b.state.lock().unwrap().buckets.len();
        assert!(held < 5000, "{held} buckets kept");
    }
}
