//! Prometheus metrics, shared by both listeners and served by the admin API.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as PromRegistry;

/// Labels of a served request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `admin`, `ec2`, `openstack`, `cradle`, `token`, `none`.
    pub namespace: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabel {
    pub namespace: &'static str,
}

/// Which listener a connection came to: `metadata`, `admin` or `peer`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

/// A connection refused at accept, and which cap it would have passed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: &'static str,
    /// `total`, `source` or `unknown_source`.
    pub reason: &'static str,
}

/// A wait refused, and which cap it would have passed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `total` or `instance`.
    pub reason: &'static str,
}

/// Every metric cradle exports.
pub struct Metrics {
    registry: PromRegistry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<NamespaceLabel, Histogram>,
    pub instances: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub connections: Family<ListenerLabel, Gauge>,
    pub refused: Family<RefusedLabels, Counter>,
    pub limit_reached: Family<ListenerLabel, Counter>,
    pub throttled: Counter,
    pub waiting: Gauge,
    pub wait_refused: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = PromRegistry::with_prefix("cradle");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests served, by namespace and status",
            requests.clone(),
        );
        let latency = Family::<NamespaceLabel, Histogram>::new_with_constructor(|| {
            // 50 µs to ~3 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.00005, 2.0, 16,
            ))
        });
        registry.register(
            "request_duration_seconds",
            "Time to answer a request",
            latency.clone(),
        );
        let instances = Gauge::default();
        registry.register("instances", "Registered instances", instances.clone());
        let connections = Family::<ListenerLabel, Gauge>::default();
        registry.register(
            "connections",
            "Connections a listener holds now",
            connections.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused at accept, by the cap they would have passed",
            refused.clone(),
        );
        let limit_reached = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "connections_limit_reached",
            "Times a listener reached its connection limit and stopped accepting until one closed",
            limit_reached.clone(),
        );
        let throttled = Counter::default();
        registry.register(
            "metadata_throttled",
            "Guest requests answered 429 because their instance's token bucket was empty",
            throttled.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "metadata_waiting",
            "Guest requests waiting for a change (?wait=true) now",
            waiting.clone(),
        );
        let wait_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "metadata_wait_refused",
            "Waiting requests answered 429, by the cap they would have passed",
            wait_refused.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            instances,
            connections,
            refused,
            limit_reached,
            throttled,
            waiting,
            wait_refused,
        }
    }

    /// Where other crates register their own metrics, before sharing.
    pub fn registry_mut(&mut self) -> &mut PromRegistry {
        &mut self.registry
    }

    /// Record one answered request.
    pub fn observe(&self, namespace: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { namespace, status })
            .inc();
        self.latency
            .get_or_create(&NamespaceLabel { namespace })
            .observe(seconds);
    }

    /// Count one answered request without timing it: a wait lasts as long
    /// as the guest asked, and would swamp the latency histogram.
    pub fn count(&self, namespace: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { namespace, status })
            .inc();
    }

    /// A connection `listener` refused at accept.
    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    /// `listener` reached its connection limit and stops accepting.
    pub fn limit_reached(&self, listener: &'static str) {
        self.limit_reached
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }

    /// The connections `listener` holds now.
    pub fn set_connections(&self, listener: &'static str, held: usize) {
        self.connections
            .get_or_create(&ListenerLabel { listener })
            .set(held as i64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
