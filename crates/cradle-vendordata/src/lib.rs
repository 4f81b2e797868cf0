//! Dynamic vendordata: OpenStack Nova's "vendordata v2" for cradle.
//!
//! Each configured target is an external HTTP service. For a guest's
//! `vendor_data2.json`, cradle POSTs the instance's details to every target
//! (the body Nova's `DynamicVendorData` sends: `project-id`, `instance-id`,
//! `image-id`, `user-data`, `hostname`, `metadata`, `boot-roles`) and places
//! each answer, a JSON object, under the target's name. This follows the
//! Ocata "vendordata reboot" work:
//!
//! - **Service token.** The request carries cradle's own token
//!   (`X-Auth-Token`, from `token_file`), authenticating the metadata
//!   service rather than a user — guests ask without one. The file is re-read
//!   when it changes, so a rotation needs no restart. It is never logged.
//! - **Boot roles** are sent as stored on the instance (`boot_roles`), so an
//!   answer doesn't change when the booting user's roles later do.
//! - **Hard failure.** A `failure = "fatal"` target that fails makes
//!   [`Vendordata::fetch`] return [`Fatal`]; a soft one (the default) gives
//!   `{}` for that target and a warning in the log.
//! - **Caching**, which Nova planned but never built: Nova called every
//!   target on every metadata request, and cloud-init reads
//!   `vendor_data2.json` more than once per boot. Answers are cached per
//!   (instance, target) for `Cache-Control: max-age` or else `cache_ttl`
//!   (`no-store`/`no-cache` keep nothing). An entry belongs to the exact
//!   `Arc<Instance>` it was fetched for: a modified instance is a new `Arc`
//!   and is fetched afresh, and entries die with their instance (only a
//!   `Weak` is kept; dead ones are swept as the cache grows). With
//!   `stale_if_error`, an expired entry keeps being served for that long
//!   while refreshing it fails.
//! - **Single flight.** Concurrent fetches for the same instance and target
//!   share one upstream call and its result, success or failure, so a burst
//!   of guest requests is one request upstream.
//!
//! **What counts as a failure**: anything but a JSON object arriving within
//! the size cap and the deadlines — a refused or timed-out connection, a TLS
//! error, a non-2xx status (redirects are not followed), a response not
//! complete within `read_timeout`, a body over `max_response_bytes`, a body
//! that is empty, not JSON, or JSON but not an object, and an unreadable or
//! empty token file. Reasons name the cause (status, JSON type, size) and
//! never contain the token or the response body.
//!
//! Metrics, per `target` label: `vendordata_upstream_calls` (requests sent),
//! `vendordata_cache_hits` (fetches answered without an upstream call of
//! their own: from the cache or by sharing a concurrent call),
//! `vendordata_cache_misses` (fetches that made the call; hits + misses =
//! fetches) and `vendordata_failures` (failed refreshes, stale served or
//! not).

#![forbid(unsafe_code)]

mod config;
mod token;
mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use cradle_model::Instance;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use reqwest::{Client, Url};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

pub use config::{
    ConfigError, DEFAULT_CACHE_TTL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_READ_TIMEOUT, Failure, RESERVED_NAME, TargetConfig,
};
pub use upstream::USER_AGENT_VALUE;

/// What a guest's `vendor_data2.json` needs from the dynamic targets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dynamic {
    /// Target name to its JSON object (`{}` for a soft failure).
    pub entries: BTreeMap<String, Value>,
}

/// A `failure = "fatal"` target failed: the guest's vendordata must fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vendordata target {target:?} failed: {reason}")]
pub struct Fatal {
    pub target: String,
    pub reason: String,
}

/// The dynamic vendordata targets, their clients, caches and counters.
pub struct Vendordata {
    targets: Vec<Arc<Target>>,
}

impl fmt::Debug for Vendordata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vendordata")
            .field(
                "targets",
                &self.targets.iter().map(|t| &t.cfg.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

impl Vendordata {
    /// Validate every target (names unique and not `"static"`, URLs http or
    /// https, files readable, TLS material parsing and key matching its
    /// certificate), build one HTTP client per target and register the
    /// counters on `metrics`.
    pub fn new(targets: Vec<TargetConfig>, metrics: &mut Registry) -> Result<Self, ConfigError> {
        config::check_names(&targets)?;
        let built = targets
            .iter()
            .map(config::build)
            .collect::<Result<Vec<_>, _>>()?;

        let families: [Family<TargetLabel, Counter>; 4] = Default::default();
        let [calls, hits, misses, failures] = &families;
        metrics.register(
            "vendordata_upstream_calls",
            "Requests sent to dynamic vendordata targets",
            calls.clone(),
        );
        metrics.register(
            "vendordata_cache_hits",
            "Dynamic vendordata fetches answered without an upstream call of their own",
            hits.clone(),
        );
        metrics.register(
            "vendordata_cache_misses",
            "Dynamic vendordata fetches that called the target",
            misses.clone(),
        );
        metrics.register(
            "vendordata_failures",
            "Failed dynamic vendordata refreshes",
            failures.clone(),
        );

        let targets = targets
            .into_iter()
            .zip(built)
            .map(|(cfg, built)| {
                let label = TargetLabel {
                    target: cfg.name.clone(),
                };
                // Created now so that every target exports its zeros.
                let counter = |f: &Family<TargetLabel, Counter>| f.get_or_create(&label).clone();
                Arc::new(Target {
                    counters: Counters {
                        calls: counter(calls),
                        hits: counter(hits),
                        misses: counter(misses),
                        failures: counter(failures),
                    },
                    url: built.url,
                    client: built.client,
                    token: built.token,
                    cache: Mutex::new(Cache::default()),
                    cfg,
                })
            })
            .collect();
        Ok(Vendordata { targets })
    }

    /// Whether no target is configured.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The targets' names, in configuration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(|t| t.cfg.name.as_str())
    }

    /// Entries for every target for this instance: from the cache when
    /// fresh, else one upstream POST per target, targets in parallel.
    ///
    /// A soft failure gives `{}` for that target and logs the reason; a
    /// fatal one returns [`Fatal`] (the first fatal target in configuration
    /// order), after every target was tried.
    pub async fn fetch(&self, instance: &Arc<Instance>) -> Result<Dynamic, Fatal> {
        let mut results: Vec<Option<Result<Value, String>>> = vec![None; self.targets.len()];
        match self.targets.as_slice() {
            [] => {}
            [only] => results[0] = Some(only.get(instance).await),
            many => {
                let mut set = JoinSet::new();
                for (i, target) in many.iter().enumerate() {
                    let target = Arc::clone(target);
                    let instance = Arc::clone(instance);
                    set.spawn(async move { (i, target.get(&instance).await) });
                }
                while let Some(joined) = set.join_next().await {
                    match joined {
                        Ok((i, result)) => results[i] = Some(result),
                        Err(e) => std::panic::resume_unwind(e.into_panic()),
                    }
                }
            }
        }

        let mut dynamic = Dynamic::default();
        let mut fatal = None;
        for (target, result) in self.targets.iter().zip(results) {
            let value = match result.expect("every target was fetched") {
                Ok(value) => value,
                Err(reason) => {
                    if target.cfg.failure == Failure::Fatal && fatal.is_none() {
                        fatal = Some(Fatal {
                            target: target.cfg.name.clone(),
                            reason,
                        });
                    }
                    Value::Object(Default::default())
                }
            };
            dynamic.entries.insert(target.cfg.name.clone(), value);
        }
        match fatal {
            Some(fatal) => Err(fatal),
            None => Ok(dynamic),
        }
    }

    /// Counters of `target`: (upstream calls, cache hits, cache misses,
    /// failures). All zero for an unknown name.
    pub fn counters(&self, target: &str) -> (u64, u64, u64, u64) {
        self.targets
            .iter()
            .find(|t| t.cfg.name == target)
            .map_or((0, 0, 0, 0), |t| {
                let c = &t.counters;
                (
                    c.calls.get(),
                    c.hits.get(),
                    c.misses.get(),
                    c.failures.get(),
                )
            })
    }

    /// Drop every cache entry whose instance is gone. Happens on its own as
    /// the cache grows; this is for a periodic caller.
    pub fn sweep(&self) {
        for target in &self.targets {
            target.lock().sweep();
        }
    }

    /// Cached or in-flight (instance, target) slots, all targets together.
    pub fn cached_len(&self) -> usize {
        self.targets.iter().map(|t| t.lock().slots.len()).sum()
    }
}

struct Counters {
    calls: Counter,
    hits: Counter,
    misses: Counter,
    failures: Counter,
}

/// One configured target.
struct Target {
    cfg: TargetConfig,
    url: Url,
    client: Client,
    token: Option<token::TokenFile>,
    counters: Counters,
    cache: Mutex<Cache>,
}

/// A shared result: the value, or the failure reason.
type Outcome = Result<Value, String>;

/// The target's cache, keyed by instance id. The lock is never held across
/// an await.
struct Cache {
    slots: HashMap<Uuid, Slot>,
    /// Sweep when `slots` grows past this.
    sweep_at: usize,
    next_flight: u64,
}

const MIN_SWEEP_AT: usize = 64;

impl Default for Cache {
    fn default() -> Self {
        Cache {
            slots: HashMap::new(),
            sweep_at: MIN_SWEEP_AT,
            next_flight: 0,
        }
    }
}

impl Cache {
    fn sweep(&mut self) {
        self.slots.retain(|_, slot| !slot.is_dead());
        self.sweep_at = (self.slots.len() * 2).max(MIN_SWEEP_AT);
    }
}

/// One instance id's state for one target.
#[derive(Default)]
struct Slot {
    /// The latest version of the instance asked for; only its results are
    /// stored.
    current: Weak<Instance>,
    entry: Option<Entry>,
    flight: Option<Flight>,
}

impl Slot {
    /// Nothing here can be used again: no version it knows is alive and no
    /// call is under way.
    fn is_dead(&self) -> bool {
        self.flight.is_none()
            && self.current.strong_count() == 0
            && self
                .entry
                .as_ref()
                .is_none_or(|e| e.instance.strong_count() == 0)
    }
}

/// A cached answer, valid only for the exact `Arc<Instance>` it was fetched
/// for.
struct Entry {
    instance: Weak<Instance>,
    value: Value,
    fresh_until: Instant,
    /// `fresh_until + stale_if_error`.
    stale_until: Instant,
}

/// An upstream call under way; others asking for the same instance wait on
/// `rx` for its outcome.
struct Flight {
    id: u64,
    instance: Weak<Instance>,
    rx: watch::Receiver<Option<Outcome>>,
}

/// Whether `weak` points at this very `Arc`. Sound while the `Weak` lives:
/// it keeps the allocation, so the address cannot be reused.
fn same(weak: &Weak<Instance>, instance: &Arc<Instance>) -> bool {
    std::ptr::eq(weak.as_ptr(), Arc::as_ptr(instance))
}

enum Step<'a> {
    Hit(Value),
    Wait(watch::Receiver<Option<Outcome>>),
    Lead(Leader<'a>),
}

/// The fetch making the upstream call. Should it be dropped before it
/// finishes (its caller cancelled), the flight is cleared and the waiters,
/// seeing the sender gone, retry.
struct Leader<'a> {
    target: &'a Target,
    id: Uuid,
    flight: u64,
    tx: Option<watch::Sender<Option<Outcome>>>,
}

impl Leader<'_> {
    fn finish(mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(outcome));
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let mut cache = self.target.lock();
            if let Some(slot) = cache.slots.get_mut(&self.id)
                && slot.flight.as_ref().is_some_and(|f| f.id == self.flight)
            {
                slot.flight = None;
            }
        }
    }
}

impl Target {
    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This target's entry for `instance`.
    async fn get(&self, instance: &Arc<Instance>) -> Outcome {
        loop {
            match self.step(instance) {
                Step::Hit(value) => {
                    self.counters.hits.inc();
                    return Ok(value);
                }
                Step::Wait(mut rx) => {
                    if let Ok(outcome) = rx.wait_for(Option::is_some).await {
                        self.counters.hits.inc();
                        return outcome.clone().expect("waited for Some");
                    }
                    // The leader was cancelled: try again.
                }
                Step::Lead(leader) => {
                    self.counters.misses.inc();
                    return self.refresh(instance, leader).await;
                }
            }
        }
    }

    /// Decide, under the lock, how this fetch is answered.
    fn step(&self, instance: &Arc<Instance>) -> Step<'_> {
        let now = Instant::now();
        let mut guard = self.lock();
        let cache = &mut *guard;
        if !cache.slots.contains_key(&instance.id) && cache.slots.len() >= cache.sweep_at {
            cache.sweep();
        }
        let slot = cache.slots.entry(instance.id).or_default();
        if !same(&slot.current, instance) {
            slot.current = Arc::downgrade(instance);
        }
        if let Some(entry) = &slot.entry
            && same(&entry.instance, instance)
            && now < entry.fresh_until
        {
            return Step::Hit(entry.value.clone());
        }
        if let Some(flight) = &slot.flight
            && same(&flight.instance, instance)
        {
            return Step::Wait(flight.rx.clone());
        }
        // A flight for another version of the instance is superseded: its
        // waiters keep their receivers, but new arrivals join this one.
        let (tx, rx) = watch::channel(None);
        let id = cache.next_flight;
        cache.next_flight += 1;
        slot.flight = Some(Flight {
            id,
            instance: Arc::downgrade(instance),
            rx,
        });
        Step::Lead(Leader {
            target: self,
            id: instance.id,
            flight: id,
            tx: Some(tx),
        })
    }

    /// Call upstream, store the answer, share it with the waiters.
    async fn refresh(&self, instance: &Arc<Instance>, leader: Leader<'_>) -> Outcome {
        let result = self.call(instance).await;
        let now = Instant::now();
        let outcome = {
            let mut cache = self.lock();
            let slot = cache.slots.entry(instance.id).or_default();
            if slot.flight.as_ref().is_some_and(|f| f.id == leader.flight) {
                slot.flight = None;
            }
            let ours = slot
                .entry
                .as_ref()
                .is_some_and(|e| same(&e.instance, instance));
            match result {
                Ok((value, ttl)) => {
                    if ttl.is_zero() {
                        if ours {
                            slot.entry = None;
                        }
                    } else if same(&slot.current, instance) {
                        let fresh_until = now + ttl;
                        slot.entry = Some(Entry {
                            instance: Arc::downgrade(instance),
                            value: value.clone(),
                            fresh_until,
                            stale_until: fresh_until + Duration::from_secs(self.cfg.stale_if_error),
                        });
                    }
                    Ok(value)
                }
                Err(reason) => {
                    self.counters.failures.inc();
                    match &slot.entry {
                        Some(entry) if ours && now < entry.stale_until => {
                            tracing::warn!(
                                instance = %instance.id,
                                target = %self.cfg.name,
                                %reason,
                                "dynamic vendordata refresh failed; serving the stale entry"
                            );
                            Ok(entry.value.clone())
                        }
                        _ => {
                            tracing::warn!(
                                instance = %instance.id,
                                target = %self.cfg.name,
                                %reason,
                                fatal = self.cfg.failure == Failure::Fatal,
                                "dynamic vendordata target failed"
                            );
                            Err(reason)
                        }
                    }
                }
            }
        };
        leader.finish(outcome.clone());
        outcome
    }

    /// One upstream exchange, within `read_timeout`; the value and how long
    /// it may be cached.
    async fn call(&self, instance: &Instance) -> Result<(Value, Duration), String> {
        let token = match &self.token {
            Some(file) => Some(file.get()?),
            None => None,
        };
        let body = serde_json::to_vec(&upstream::request_body(instance))
            .expect("a JSON value always serializes");
        self.counters.calls.inc();
        let exchange = upstream::exchange(
            &self.client,
            &self.url,
            token,
            body,
            self.cfg.max_response_bytes,
            self.cfg.connect_timeout,
        );
        match tokio::time::timeout(Duration::from_secs(self.cfg.read_timeout), exchange).await {
            Ok(Ok((value, freshness))) => Ok((value, upstream::ttl(freshness, self.cfg.cache_ttl))),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(format!(
                "no complete response within {}s (read_timeout)",
                self.cfg.read_timeout
            )),
        }
    }
}
