//! The firewall worker: one thread owns enforcement. The registry hands it
//! numbered updates and returns at once; the worker takes whatever has
//! queued up since its last transaction, merges it into one, and applies it.
//! A failed change is followed by full applies, with backoff, until one
//! takes. Callers that want to know a change is enforced wait for its
//! number ([`Worker::wait`]), holding no lock of the registry.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use uuid::Uuid;

use crate::{Enforce, Enforced, Members, Update};

/// What the firewall should hold now, read when a full apply runs.
pub type Desired = dyn Fn() -> (Vec<Enforced>, BTreeMap<Uuid, Members>) + Send + Sync;

/// The kind of a transaction, for metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `full` or `delta`.
    pub kind: &'static str,
}

/// The worker's metrics, registered by whoever serves `/metrics`.
#[derive(Clone)]
pub struct FirewallMetrics {
    pub apply_seconds: Family<KindLabel, Histogram>,
    pub failures: Counter,
    pub backlog: Gauge,
    pub elements: Gauge,
}

impl FirewallMetrics {
    /// Register them (as `<prefix>_firewall_...`).
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "firewall_apply_seconds",
            "Time to apply a firewall transaction (until the kernel took it), by kind",
            self.apply_seconds.clone(),
        );
        r.register(
            "firewall_failures",
            "Firewall transactions the kernel refused or nft failed",
            self.failures.clone(),
        );
        r.register(
            "firewall_backlog",
            "Changes handed to the firewall and not yet enforced",
            self.backlog.clone(),
        );
        r.register(
            "firewall_elements",
            "Elements in the firewall's table",
            self.elements.clone(),
        );
    }
}

impl Default for FirewallMetrics {
    fn default() -> Self {
        FirewallMetrics {
            apply_seconds: Family::new_with_constructor(|| {
                // 20 µs to ~20 s.
                Histogram::new(exponential_buckets(0.00002, 2.0, 20))
            }),
            failures: Counter::default(),
            backlog: Gauge::default(),
            elements: Gauge::default(),
        }
    }
}

/// Where enforcement stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The number of the last change handed over.
    pub wanted: u64,
    /// The number of the last change the kernel enforces.
    pub applied: u64,
    /// The last transaction failed (a full apply is due).
    pub failing: bool,
    pub last_error: Option<String>,
    /// Elements in the table after the last transaction that took.
    pub elements: u64,
}

#[derive(Default)]
struct Queue {
    status: Status,
    full: bool,
    update: Option<Update>,
    stop: bool,
    /// After a failure: no attempt before this.
    not_before: Option<Instant>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// New work, or stop.
    work: Condvar,
    /// `applied` moved.
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The worker thread and its queue. Dropping it stops the thread after the
/// transaction it is in.
pub struct Worker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Worker {
    /// Start the thread. Nothing is applied until [`Worker::full`] or
    /// [`Worker::submit`] is called.
    pub fn start(
        enforcer: Arc<dyn Enforce>,
        desired: Arc<Desired>,
        metrics: FirewallMetrics,
        elements: Arc<dyn Fn() -> usize + Send + Sync>,
    ) -> Worker {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            done: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cradle-firewall".into())
            .spawn(move || run(&s, &*enforcer, &*desired, &metrics, &*elements))
            .expect("a thread starts");
        Worker {
            shared,
            thread: Some(thread),
        }
    }

    /// Ask for a full apply; its number.
    pub fn full(&self) -> u64 {
        let mut q = self.shared.lock();
        q.status.wanted += 1;
        q.full = true;
        q.update = None;
        q.not_before = None;
        self.shared.work.notify_one();
        q.status.wanted
    }

    /// Hand over a change; its number. Never waits for nft.
    pub fn submit(&self, update: Update) -> u64 {
        let mut q = self.shared.lock();
        q.status.wanted += 1;
        if !q.full {
            match &mut q.update {
                Some(u) => {
                    u.instances.extend(update.instances);
                    u.groups.extend(update.groups);
                }
                None => q.update = Some(update),
            }
        }
        self.shared.work.notify_one();
        q.status.wanted
    }

    pub fn status(&self) -> Status {
        self.shared.lock().status.clone()
    }

    /// Wait until change `n` is enforced, at most `timeout`; whether it is.
    pub fn wait(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.lock();
        while q.status.applied < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .shared
                .done
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    s: &Shared,
    enforcer: &dyn Enforce,
    desired: &Desired,
    metrics: &FirewallMetrics,
    elements: &dyn Fn() -> usize,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let (full, update, upto) = {
            let mut q = s.lock();
            loop {
                if q.stop {
                    return;
                }
                let due = q.not_before.is_none_or(|t| Instant::now() >= t);
                if (q.full || q.update.is_some()) && due {
                    break;
                }
                q = match q.not_before.filter(|_| q.full) {
                    Some(t) => {
                        let left = t.saturating_duration_since(Instant::now());
                        s.work
                            .wait_timeout(q, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => s.work.wait(q).unwrap_or_else(|e| e.into_inner()),
                };
            }
            let taken = (q.full, q.update.take(), q.status.wanted);
            q.full = false;
            metrics
                .backlog
                .set((q.status.wanted - q.status.applied) as i64);
            taken
        };
        let started = Instant::now();
        let (kind, result) = if full {
            let (instances, groups) = desired();
            ("full", enforcer.full(instances, groups))
        } else {
            let u = update.expect("an update was taken");
            ("delta", enforcer.update(&u))
        };
        metrics
            .apply_seconds
            .get_or_create(&KindLabel { kind })
            .observe(started.elapsed().as_secs_f64());
        let mut q = s.lock();
        match result {
            Ok(()) => {
                q.status.applied = q.status.applied.max(upto);
                q.status.failing = false;
                q.status.last_error = None;
                backoff = BACKOFF_FIRST;
                q.status.elements = elements() as u64;
                metrics.elements.set(q.status.elements as i64);
                s.done.notify_all();
            }
            Err(e) => {
                tracing::warn!(error = %e, kind, "firewall apply failed; a full apply follows");
                metrics.failures.inc();
                q.status.failing = true;
                q.status.last_error = Some(e);
                // What failed is covered by a full apply of what is wanted
                // now, whatever queued meanwhile.
                q.full = true;
                q.update = None;
                q.not_before = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        metrics
            .backlog
            .set((q.status.wanted - q.status.applied) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts what it is given; fails while `fail` is above zero.
    #[derive(Default)]
    struct Probe {
        fulls: AtomicUsize,
        updates: AtomicUsize,
        fail: AtomicUsize,
        gate: Mutex<()>,
    }

    impl Enforce for Probe {
        fn full(&self, _: Vec<Enforced>, _: BTreeMap<Uuid, Members>) -> Result<(), String> {
            let _g = self.gate.lock().unwrap();
            self.fulls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err("nft said no".into());
            }
            Ok(())
        }

        fn update(&self, _: &Update) -> Result<(), String> {
            let _g = self.gate.lock().unwrap();
            self.updates.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err("nft said no".into());
            }
            Ok(())
        }
    }

    fn start(p: &Arc<Probe>) -> Worker {
        Worker::start(
            p.clone(),
            Arc::new(|| (Vec::new(), BTreeMap::new())),
            FirewallMetrics::default(),
            Arc::new(|| 0),
        )
    }

    fn change(n: u8) -> Update {
        Update {
            instances: BTreeMap::from([(Uuid::from_bytes([n; 16]), None)]),
            groups: BTreeMap::new(),
        }
    }

    #[test]
    fn a_backlog_is_one_transaction() {
        let p = Arc::new(Probe::default());
        let w = start(&p);
        let first = w.full();
        assert!(w.wait(first, Duration::from_secs(5)));
        // Hold the enforcer busy while 100 changes queue up.
        let gate = p.gate.lock().unwrap();
        let busy = w.submit(change(0));
        std::thread::sleep(Duration::from_millis(50));
        let mut last = 0;
        for n in 1..=100 {
            last = w.submit(change(n));
        }
        assert!(!w.wait(last, Duration::from_millis(50)), "not yet");
        drop(gate);
        assert!(w.wait(last, Duration::from_secs(5)));
        assert!(busy < last);
        // The first change, then the other 100 together.
        assert_eq!(p.updates.load(Ordering::SeqCst), 2);
        assert_eq!(w.status().applied, last);
    }

    #[test]
    fn a_failure_is_followed_by_full_applies_until_one_takes() {
        let p = Arc::new(Probe::default());
        let w = start(&p);
        assert!(w.wait(w.full(), Duration::from_secs(5)));
        p.fail.store(2, Ordering::SeqCst);
        let n = w.submit(change(1));
        // The delta fails, then a full apply fails, then one takes.
        assert!(w.wait(n, Duration::from_secs(10)));
        assert_eq!(p.updates.load(Ordering::SeqCst), 1);
        assert_eq!(p.fulls.load(Ordering::SeqCst), 1 + 2);
        let st = w.status();
        assert!(!st.failing && st.last_error.is_none(), "{st:?}");
    }
}
