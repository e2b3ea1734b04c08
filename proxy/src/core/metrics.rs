//! The metrics vocabulary: one Prometheus registry that each layer
//! registers its own families in (next to the code that counts them), the
//! conventions every family follows (names prefixed `infermesh_`, base
//! units, counters ending in `_total`, latency buckets fine enough to see
//! sub-millisecond proxy overhead), and the text exposition served on
//! `/metrics`.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    TextEncoder,
};

/// Latency buckets, in seconds: fine enough below a millisecond to see the
/// proxy's own overhead, and long enough to hold a ten-minute generation.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Where every metric family of one proxy is registered. A family is
/// registered once, when the proxy starts (or a test builds a layer);
/// registering a name twice is a programming error and panics.
#[derive(Clone, Default)]
pub(crate) struct Registry(prometheus::Registry);

impl Registry {
    /// An empty registry.
    pub(crate) fn new() -> Self {
        Registry::default()
    }

    /// Registers a counter family with `labels`.
    pub(crate) fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter"))
    }

    /// Registers a gauge family with `labels`.
    pub(crate) fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge"))
    }

    /// Registers a gauge without labels.
    pub(crate) fn single_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("a valid gauge"))
    }

    /// Registers a gauge of fractional values without labels.
    pub(crate) fn float_gauge(&self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::new(name, help).expect("a valid gauge"))
    }

    /// Registers a latency histogram family, in seconds, with
    /// [`LATENCY_BUCKETS`].
    pub(crate) fn latency(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("a valid histogram"))
    }

    /// Registers a collector made elsewhere (such as the log writer's, or
    /// the process's).
    pub(crate) fn register(&self, collector: Box<dyn Collector>) {
        self.0.register(collector).expect("metric names are unique");
    }

    fn add<C: Collector + Clone + 'static>(&self, collector: C) -> C {
        self.register(Box::new(collector.clone()));
        collector
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.0.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exposed_with_their_help_and_buckets() {
        let registry = Registry::new();
        let requests = registry.counter("infermesh_t_total", "Things.", &["route"]);
        requests.with_label_values(&["chat"]).inc();
        let latency = registry.latency("infermesh_t_seconds", "Time.", &["route"]);
        latency.with_label_values(&["chat"]).observe(0.0002);
        let text = String::from_utf8(registry.encode()).unwrap();
        assert!(text.contains("# HELP infermesh_t_total Things."), "{text}");
        assert!(
            text.contains("infermesh_t_total{route=\"chat\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("infermesh_t_seconds_bucket{route=\"chat\",le=\"0.00025\"} 1"),
            "{text}"
        );
    }

    #[test]
    #[should_panic(expected = "metric names are unique")]
    fn a_name_registered_twice_is_refused() {
        let registry = Registry::new();
        registry.counter("infermesh_t_total", "Things.", &[]);
        registry.counter("infermesh_t_total", "Things.", &[]);
    }
}
