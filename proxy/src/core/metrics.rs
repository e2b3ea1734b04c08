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

/// Body size buckets, in bytes: powers of 4 from 64 B to 64 MiB, from a
/// one-line prompt to a long context or a batch of embeddings.
pub(crate) const SIZE_BUCKETS: &[f64] = &[
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// Model latency buckets, in seconds: from a millisecond (a cached or
/// tiny answer) to ten minutes (a long generation), for the time to a
/// stream's first token.
pub(crate) const MODEL_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Buckets for the time between a stream's events, in seconds: finer
/// where inter-token times are (a few to a hundred milliseconds), up to
/// ten seconds (a model that stalls mid-answer).
pub(crate) const INTER_EVENT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
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

    /// Registers a size histogram family, in bytes, with [`SIZE_BUCKETS`].
    pub(crate) fn sizes(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(SIZE_BUCKETS.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("a valid histogram"))
    }

    /// Registers a model latency histogram family, in seconds, with
    /// [`MODEL_LATENCY_BUCKETS`].
    pub(crate) fn model_latency(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        self.histogram(name, help, labels, MODEL_LATENCY_BUCKETS)
    }

    /// Registers a histogram family of the time between a stream's events,
    /// in seconds, with [`INTER_EVENT_BUCKETS`].
    pub(crate) fn inter_event(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        self.histogram(name, help, labels, INTER_EVENT_BUCKETS)
    }

    fn histogram(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
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
    fn size_buckets_are_powers_of_four_from_64_bytes_to_64_mib() {
        assert_eq!(SIZE_BUCKETS.first(), Some(&64.0));
        assert_eq!(SIZE_BUCKETS.last(), Some(&(64.0 * 1024.0 * 1024.0)));
        for pair in SIZE_BUCKETS.windows(2) {
            assert_eq!(pair[1], pair[0] * 4.0);
        }
        let registry = Registry::new();
        let sizes = registry.sizes("infermesh_t_bytes", "Sizes.", &["route"]);
        sizes.with_label_values(&["chat"]).observe(100.0);
        let text = String::from_utf8(registry.encode()).unwrap();
        assert!(
            text.contains("infermesh_t_bytes_bucket{route=\"chat\",le=\"64\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("infermesh_t_bytes_bucket{route=\"chat\",le=\"256\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn model_latency_buckets_go_from_a_millisecond_to_ten_minutes() {
        assert_eq!(MODEL_LATENCY_BUCKETS.first(), Some(&0.001));
        assert_eq!(MODEL_LATENCY_BUCKETS.last(), Some(&600.0));
        assert_eq!(INTER_EVENT_BUCKETS.first(), Some(&0.001));
        assert_eq!(INTER_EVENT_BUCKETS.last(), Some(&10.0));
        for buckets in [MODEL_LATENCY_BUCKETS, INTER_EVENT_BUCKETS] {
            assert!(buckets.windows(2).all(|pair| pair[0] < pair[1]));
        }
        let registry = Registry::new();
        let ttft = registry.model_latency("infermesh_t_seconds", "Time.", &["model"]);
        ttft.with_label_values(&["llama"]).observe(0.2);
        let gaps = registry.inter_event("infermesh_g_seconds", "Gaps.", &["model"]);
        gaps.with_label_values(&["llama"]).observe(0.0);
        let text = String::from_utf8(registry.encode()).unwrap();
        assert!(
            text.contains("infermesh_t_seconds_bucket{model=\"llama\",le=\"0.25\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("infermesh_g_seconds_bucket{model=\"llama\",le=\"0.001\"} 1"),
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
