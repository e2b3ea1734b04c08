//! The proxy's Prometheus metrics: one registry, the metric families the
//! design fixes (names prefixed `infermesh_`, base units, counters ending in
//! `_total`), and the text exposition served on `/metrics`.

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets, in seconds: fine enough below a millisecond to see the
/// proxy's own overhead, and long enough to hold a ten-minute generation.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// `infermesh_requests_total{route,backend,code}`: finished requests.
    pub requests: IntCounterVec,
    /// `infermesh_request_duration_seconds{route,backend}`: from request
    /// arrival to the response's last byte.
    pub request_duration: HistogramVec,
    /// `infermesh_response_first_byte_seconds{route,backend}`: from request
    /// arrival to the backend's response headers.
    pub response_first_byte: HistogramVec,
    /// `infermesh_upstream_connections{backend}`: open connections to
    /// backends.
    pub upstream_connections: IntGaugeVec,
    /// `infermesh_downstream_connections{listener}`: open client connections.
    pub downstream_connections: IntGaugeVec,
    /// `infermesh_config_reloads_total{result}`: reload attempts, by
    /// `success` or `failure`.
    pub config_reloads: IntCounterVec,
    /// `infermesh_config_info{version}`: 1 for the version being served.
    pub config_info: IntGaugeVec,
    /// `infermesh_config_last_reload_successful`: 1 when the last reload
    /// attempt succeeded, 0 when it was refused.
    pub config_last_reload_successful: IntGauge,
    /// `infermesh_config_last_reload_success_timestamp_seconds`: when the
    /// serving config was applied (Unix time).
    pub config_last_reload_success_timestamp: Gauge,
}

impl Metrics {
    /// Creates and registers every metric, plus the standard `process_*`
    /// metrics (CPU seconds, resident memory, open file descriptors).
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &["route", "backend"],
            )
            .expect("valid histogram")
        };
        let metrics = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "infermesh_requests_total",
                    "Requests finished, by route, backend and status code.",
                ),
                &["route", "backend", "code"],
            )
            .expect("valid counter"),
            request_duration: latency(
                "infermesh_request_duration_seconds",
                "Time from request arrival to the last byte of the response.",
            ),
            response_first_byte: latency(
                "infermesh_response_first_byte_seconds",
                "Time from request arrival to the backend's response headers.",
            ),
            upstream_connections: IntGaugeVec::new(
                Opts::new(
                    "infermesh_upstream_connections",
                    "Open connections to backend endpoints.",
                ),
                &["backend"],
            )
            .expect("valid gauge"),
            downstream_connections: IntGaugeVec::new(
                Opts::new(
                    "infermesh_downstream_connections",
                    "Open client connections, by listener.",
                ),
                &["listener"],
            )
            .expect("valid gauge"),
            config_reloads: IntCounterVec::new(
                Opts::new(
                    "infermesh_config_reloads_total",
                    "Config reload attempts, by result.",
                ),
                &["result"],
            )
            .expect("valid counter"),
            config_info: IntGaugeVec::new(
                Opts::new(
                    "infermesh_config_info",
                    "The version of the config being served (value 1).",
                ),
                &["version"],
            )
            .expect("valid gauge"),
            config_last_reload_successful: IntGauge::new(
                "infermesh_config_last_reload_successful",
                "Whether the last config reload attempt succeeded (1) or was refused (0).",
            )
            .expect("valid gauge"),
            config_last_reload_success_timestamp: Gauge::new(
                "infermesh_config_last_reload_success_timestamp_seconds",
                "Unix time the serving config was applied.",
            )
            .expect("valid gauge"),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 9] = [
            Box::new(metrics.requests.clone()),
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.response_first_byte.clone()),
            Box::new(metrics.upstream_connections.clone()),
            Box::new(metrics.downstream_connections.clone()),
            Box::new(metrics.config_reloads.clone()),
            Box::new(metrics.config_info.clone()),
            Box::new(metrics.config_last_reload_successful.clone()),
            Box::new(metrics.config_last_reload_success_timestamp.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once");
        metrics
    }

    /// Adds a collector defined elsewhere (such as the log writer's).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry
            .register(collector)
            .expect("metric names are unique");
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
