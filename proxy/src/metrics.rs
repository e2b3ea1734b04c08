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
    /// `infermesh_upstream_attempts_total{backend,outcome}`: exchanges
    /// with endpoints, retries included; the outcome is the status class
    /// (`2xx`...) or the proxy's error reason.
    pub upstream_attempts: IntCounterVec,
    /// `infermesh_retries_total{route,reason}`: retries made, by the
    /// failure that caused them.
    pub retries: IntCounterVec,
    /// `infermesh_retry_budget_exhausted_total{route}`: retries not made
    /// because the rule's retry budget was spent.
    pub retry_budget_exhausted: IntCounterVec,
    /// `infermesh_overloaded_total{backend,limit}`: requests refused by a
    /// circuit-breaker limit.
    pub overloaded: IntCounterVec,
    /// `infermesh_endpoint_ejections_total{backend}`: outlier ejections.
    pub endpoint_ejections: IntCounterVec,
    /// `infermesh_endpoints{backend,state}`: endpoints by state, counted
    /// when scraped.
    pub endpoints: IntGaugeVec,
    /// `infermesh_rate_limited_total{route}`: requests refused by a rule's
    /// rate limit.
    pub rate_limited: IntCounterVec,
    /// `infermesh_tls_handshakes_total{direction,result,reason}`: TLS
    /// handshakes with clients (`inbound`) and endpoints (`outbound`); the
    /// reason of a failure is `unknown_ca`, `expired`, `bad_identity`,
    /// `no_client_cert`...
    pub tls_handshakes: IntCounterVec,
    /// `infermesh_authorization_decisions_total{listener,result,policy}`:
    /// requests allowed or denied by authorization policies (`policy` is
    /// the deciding policy; empty for a denial by no allow policy matching).
    pub authorization_decisions: IntCounterVec,
    /// `infermesh_mirrored_requests_total{backend,result}`: copies sent to
    /// a mirror backend (`sent`), or not sent because the copy could not
    /// keep up with the request body (`abandoned`) or failed (`failed`).
    pub mirrored_requests: IntCounterVec,
    /// `infermesh_outside_mesh_total{listener,protocol,action}`: traffic an
    /// outbound capture listener saw for destinations outside the mesh:
    /// HTTP requests (`http`) and other connections (`tcp`), passed through
    /// or blocked.
    pub outside_mesh: IntCounterVec,
    /// `infermesh_hedges_total{route,outcome}`: hedged attempts `sent`, and
    /// of those `won` (their answer was used) or `refused` by the backend
    /// (no other endpoint, or a limit); hedges that were due but not sent
    /// for lack of budget (`budget_exhausted`) or because the request could
    /// not be sent again (`not_replayable`).
    pub hedges: IntCounterVec,
    /// `infermesh_stream_first_event_seconds{route,backend}`: from request
    /// arrival to the first body bytes of a streamed (`text/event-stream`)
    /// response: the time to first token a client of a generation sees.
    pub stream_first_event: HistogramVec,
    /// `infermesh_fanout_branches_total{route,branch,outcome}`: fan-out
    /// branches by what became of them: `used`, `unused`, `failed`,
    /// `timeout`, `cancelled` (decided without them), `deadline`.
    pub fanout_branches: IntCounterVec,
    /// `infermesh_fanout_duration_seconds{route,strategy}`: from request
    /// arrival to the fan-out's decision.
    pub fanout_duration: HistogramVec,
    /// `infermesh_fanout_answers_total{route,decision}`: fan-outs by how
    /// they were decided: `all` (every branch finished), `quorum` (enough
    /// answered first: a quorum, a majority, the first success),
    /// `deadline`, `failed`, or `abandoned` (dropped before a decision: the
    /// client went away, or the rule's total limit cut it).
    pub fanout_answers: IntCounterVec,
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
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
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
            upstream_attempts: counter(
                "infermesh_upstream_attempts_total",
                "Exchanges with backend endpoints (retries included), by outcome: status class or error reason.",
                &["backend", "outcome"],
            ),
            retries: counter(
                "infermesh_retries_total",
                "Retries made, by route and the failure that caused them.",
                &["route", "reason"],
            ),
            retry_budget_exhausted: counter(
                "infermesh_retry_budget_exhausted_total",
                "Retries not made because the route's retry budget was spent.",
                &["route"],
            ),
            overloaded: counter(
                "infermesh_overloaded_total",
                "Requests refused by a backend's circuit-breaker limit.",
                &["backend", "limit"],
            ),
            endpoint_ejections: counter(
                "infermesh_endpoint_ejections_total",
                "Endpoints ejected by outlier detection.",
                &["backend"],
            ),
            endpoints: IntGaugeVec::new(
                Opts::new("infermesh_endpoints", "Backend endpoints, by state."),
                &["backend", "state"],
            )
            .expect("valid gauge"),
            rate_limited: counter(
                "infermesh_rate_limited_total",
                "Requests refused by a route's local rate limit.",
                &["route"],
            ),
            tls_handshakes: counter(
                "infermesh_tls_handshakes_total",
                "TLS handshakes with clients (inbound) and endpoints (outbound), by result and failure reason.",
                &["direction", "result", "reason"],
            ),
            authorization_decisions: counter(
                "infermesh_authorization_decisions_total",
                "Requests allowed or denied by authorization policies, by listener and deciding policy.",
                &["listener", "result", "policy"],
            ),
            mirrored_requests: counter(
                "infermesh_mirrored_requests_total",
                "Request copies for mirror backends, by result (sent, abandoned, failed).",
                &["backend", "result"],
            ),
            hedges: counter(
                "infermesh_hedges_total",
                "Hedged attempts sent, won and refused by the backend, and hedges not sent (budget_exhausted, not_replayable), by route.",
                &["route", "outcome"],
            ),
            outside_mesh: counter(
                "infermesh_outside_mesh_total",
                "Traffic to destinations outside the mesh seen by outbound capture listeners, by protocol (http requests, tcp connections) and action (passthrough, blocked).",
                &["listener", "protocol", "action"],
            ),
            stream_first_event: latency(
                "infermesh_stream_first_event_seconds",
                "Time from request arrival to the first body bytes of a streamed (text/event-stream) response.",
            ),
            fanout_branches: counter(
                "infermesh_fanout_branches_total",
                "Fan-out branches by route, branch and outcome (used, unused, failed, timeout, cancelled, deadline).",
                &["route", "branch", "outcome"],
            ),
            fanout_duration: HistogramVec::new(
                HistogramOpts::new(
                    "infermesh_fanout_duration_seconds",
                    "Time from request arrival to the fan-out's decision, by route and strategy.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route", "strategy"],
            )
            .expect("valid histogram"),
            fanout_answers: counter(
                "infermesh_fanout_answers_total",
                "Fan-outs by route and how they were decided (all, quorum, deadline, failed, abandoned).",
                &["route", "decision"],
            ),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 25] = [
            Box::new(metrics.requests.clone()),
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.response_first_byte.clone()),
            Box::new(metrics.upstream_connections.clone()),
            Box::new(metrics.downstream_connections.clone()),
            Box::new(metrics.config_reloads.clone()),
            Box::new(metrics.config_info.clone()),
            Box::new(metrics.config_last_reload_successful.clone()),
            Box::new(metrics.config_last_reload_success_timestamp.clone()),
            Box::new(metrics.upstream_attempts.clone()),
            Box::new(metrics.retries.clone()),
            Box::new(metrics.retry_budget_exhausted.clone()),
            Box::new(metrics.overloaded.clone()),
            Box::new(metrics.endpoint_ejections.clone()),
            Box::new(metrics.endpoints.clone()),
            Box::new(metrics.rate_limited.clone()),
            Box::new(metrics.mirrored_requests.clone()),
            Box::new(metrics.tls_handshakes.clone()),
            Box::new(metrics.authorization_decisions.clone()),
            Box::new(metrics.outside_mesh.clone()),
            Box::new(metrics.hedges.clone()),
            Box::new(metrics.stream_first_event.clone()),
            Box::new(metrics.fanout_branches.clone()),
            Box::new(metrics.fanout_duration.clone()),
            Box::new(metrics.fanout_answers.clone()),
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
