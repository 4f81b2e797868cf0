//! Guests waiting for a change (`?wait=true`, as GCE's `wait_for_change`).
//!
//! A waiting request holds a place in [`Waiters`], one per instance it
//! waits on, and sleeps on that instance's [`Notify`]. The registry tells
//! [`Waiters::changed`] the id of every instance whose record changed
//! (here, or on another host of the cluster through catch-up), which wakes
//! exactly the requests waiting on it; they render their document again
//! and answer if its tag moved. Nothing polls: an instance nobody waits on
//! costs one map lookup per change.
//!
//! Places are bounded per instance and in total (past either, the request
//! is refused with 429 and counted), and [`Waiters::close`] ends every wait
//! at shutdown: each answers its current document, so graceful shutdown
//! does not hang on them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cradle_registry::metrics::{Metrics, ReasonLabel};
use tokio::sync::Notify;
use uuid::Uuid;

/// How many may wait, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct WaitLimits {
    /// Requests waiting at once, from every guest together.
    pub total: usize,
    /// Requests waiting at once for one instance.
    pub per_instance: usize,
    /// The longest `timeout_sec` a request may ask for.
    pub max_timeout: Duration,
}

impl Default for WaitLimits {
    fn default() -> Self {
        WaitLimits {
            total: 2048,
            per_instance: 4,
            max_timeout: Duration::from_secs(3600),
        }
    }
}

/// The timeout of a wait that names none, as GCE's.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// The waits on one instance: what wakes them, and how many there are.
struct Slot {
    notify: Arc<Notify>,
    waiting: usize,
}

/// Why a wait was refused: the cap it would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Total(usize),
    Instance(usize),
}

pub(crate) struct Waiters {
    limits: WaitLimits,
    slots: Mutex<Slots>,
    closed: AtomicBool,
    /// Where `cradle_metadata_waiting` and the refusals are counted.
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Slots {
    by_instance: HashMap<Uuid, Slot>,
    total: usize,
}

/// A place among the waiters on one instance; given back when dropped.
pub(crate) struct Place<'a> {
    waiters: &'a Waiters,
    id: Uuid,
    pub(crate) notify: Arc<Notify>,
}

/// Given back however the wait ends: answered, failed, or dropped because
/// its guest went away.
impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut slots = self.waiters.lock();
        slots.total -= 1;
        if let Some(slot) = slots.by_instance.get_mut(&self.id) {
            slot.waiting -= 1;
            if slot.waiting == 0 {
                slots.by_instance.remove(&self.id);
            }
        }
        self.waiters.metrics.waiting.set(slots.total as i64);
    }
}

impl Waiters {
    pub(crate) fn new(limits: WaitLimits, metrics: Arc<Metrics>) -> Waiters {
        Waiters {
            limits,
            slots: Mutex::new(Slots::default()),
            closed: AtomicBool::new(false),
            metrics,
        }
    }

    pub(crate) fn limits(&self) -> WaitLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a place to wait on instance `id`, if the caps allow; a refusal
    /// is counted.
    pub(crate) fn join(&self, id: Uuid) -> Result<Place<'_>, Full> {
        let joined = self.try_join(id);
        if let Err(full) = &joined {
            let reason = match full {
                Full::Total(_) => "total",
                Full::Instance(_) => "instance",
            };
            self.metrics
                .wait_refused
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        joined
    }

    fn try_join(&self, id: Uuid) -> Result<Place<'_>, Full> {
        let mut slots = self.lock();
        if slots.total >= self.limits.total {
            return Err(Full::Total(self.limits.total));
        }
        let slot = slots.by_instance.entry(id).or_insert_with(|| Slot {
            notify: Arc::new(Notify::new()),
            waiting: 0,
        });
        if slot.waiting >= self.limits.per_instance {
            // A slot made just now for a cap of 0 holds nobody.
            if slot.waiting == 0 {
                slots.by_instance.remove(&id);
            }
            return Err(Full::Instance(self.limits.per_instance));
        }
        slot.waiting += 1;
        let notify = slot.notify.clone();
        slots.total += 1;
        self.metrics.waiting.set(slots.total as i64);
        Ok(Place {
            waiters: self,
            id,
            notify,
        })
    }

    /// Wake whoever waits on instance `id`.
    pub(crate) fn changed(&self, id: Uuid) {
        if let Some(slot) = self.lock().by_instance.get(&id) {
            slot.notify.notify_waiters();
        }
    }

    /// End every wait, now and from now on.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for slot in self.lock().by_instance.values() {
            slot.notify.notify_waiters();
        }
    }

    pub(crate) fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_instance: usize) -> WaitLimits {
        WaitLimits {
            total,
            per_instance,
            max_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn places_are_capped_per_instance_and_in_total_and_given_back() {
        let w = Waiters::new(limits(3, 2), Default::default());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let a1 = w.join(a).unwrap();
        let a2 = w.join(a).unwrap();
        assert_eq!(w.join(a).err(), Some(Full::Instance(2)));
        let b1 = w.join(b).unwrap();
        assert_eq!(w.join(b).err(), Some(Full::Total(3)));
        assert_eq!(w.metrics.waiting.get(), 3);
        drop((a1, a2, b1));
        assert_eq!(w.metrics.waiting.get(), 0);
        assert!(w.lock().by_instance.is_empty());
    }

    #[tokio::test]
    async fn a_change_wakes_only_the_waits_on_its_instance() {
        let w = Waiters::new(limits(10, 10), Default::default());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let pa = w.join(a).unwrap();
        let pb = w.join(b).unwrap();
        let wa = pa.notify.notified();
        let wb = pb.notify.notified();
        tokio::pin!(wa, wb);
        wa.as_mut().enable();
        wb.as_mut().enable();
        w.changed(a);
        tokio::time::timeout(Duration::from_secs(1), wa)
            .await
            .expect("a is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), wb)
                .await
                .is_err(),
            "b keeps waiting"
        );
    }
}
