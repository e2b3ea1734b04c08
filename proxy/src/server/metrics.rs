//! The server layer's metric families: client connections, what became of
//! every request, and how long it took; plus the families of the layers
//! below, which what the server builds (a capture listener's forwarding
//! to the original destination) counts in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec};

use crate::core::metrics::Registry;

/// The server layer's metric families.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// `infermesh_requests_total{route,backend,code,grpc_status}`:
    /// finished requests.
    pub requests: IntCounterVec,
    /// `infermesh_request_errors_total{route,backend,reason}`: requests
    /// the proxy failed or cut short, by the reason it logs and sends in
    /// `x-infermesh-error` (`response_headers_timeout`, `no_endpoint`,
    /// `client_disconnected`...).
    pub request_errors: IntCounterVec,
    /// `infermesh_request_duration_seconds{route,backend}`: from request
    /// arrival to the response's last byte.
    pub request_duration: HistogramVec,
    /// `infermesh_response_first_byte_seconds{route,backend}`: from request
    /// arrival to the backend's response headers.
    pub response_first_byte: HistogramVec,
    /// `infermesh_stream_first_event_seconds{route,backend}`: from request
    /// arrival to the first body bytes of a streamed (`text/event-stream`)
    /// response: the time to first token a client of a generation sees.
    pub stream_first_event: HistogramVec,
    /// `infermesh_tokens_total{route,backend,model,type}`: the tokens
    /// OpenAI-compatible answers reported in their `usage` (`type`:
    /// `input` or `output`); OpenTelemetry's `gen_ai.client.token.usage`.
    /// `model` is the model of the route match that matched, or the model
    /// the request names when the config names it too, else empty.
    pub tokens: IntCounterVec,
    /// `infermesh_time_to_first_token_seconds{route,backend,model}`: from
    /// request arrival to the first whole event of a streamed answer;
    /// OpenTelemetry's `gen_ai.server.time_to_first_token`.
    pub time_to_first_token: HistogramVec,
    /// `infermesh_time_between_events_seconds{route,backend,model}`: the
    /// gap between consecutive events of a streamed answer, the time per
    /// output token a client sees; OpenTelemetry's
    /// `gen_ai.server.time_per_output_token`.
    pub time_between_events: HistogramVec,
    /// `infermesh_request_size_bytes{route,backend}`: request body bytes
    /// read from the client (Istio's `istio_request_bytes`).
    pub request_size: HistogramVec,
    /// `infermesh_response_size_bytes{route,backend}`: response body bytes
    /// sent to the client (Istio's `istio_response_bytes`).
    pub response_size: HistogramVec,
    /// `infermesh_downstream_connections{listener}`: open client connections.
    pub downstream_connections: IntGaugeVec,
    /// `infermesh_outside_mesh_total{listener,protocol,action}`: traffic an
    /// outbound capture listener saw for destinations outside the mesh:
    /// HTTP requests (`http`) and other connections (`tcp`), passed through
    /// or blocked.
    pub outside_mesh: IntCounterVec,
    /// `infermesh_downstream_connections_closed_total{listener,reason}`:
    /// client connections the proxy ended for their lifetime or conduct
    /// (`first_byte_timeout`, `request_headers_timeout`, `idle_timeout`,
    /// `max_connection_age`, `max_requests`, `premature_resets`,
    /// `stream_idle_timeout`).
    pub connections_closed: IntCounterVec,
    /// `infermesh_downstream_connections_refused_total{listener,reason}`:
    /// client connections closed as soon as accepted (`max_connections`,
    /// `out_of_descriptors`).
    pub connections_refused: IntCounterVec,
    /// The families of the snapshot layer and those below it.
    pub snapshot: crate::snapshot::Metrics,
    /// The series of each route and backend met so far.
    pub pairs: Arc<PairSeriesCache>,
}

/// The series every finished request of one route and backend counts in,
/// resolved once per pair: a labelled lookup hashes every label and takes
/// the family's lock, and a request made six of them.
#[derive(Debug)]
pub(crate) struct PairSeries {
    /// `infermesh_requests_total` with code 200 and no gRPC status, the
    /// answer nearly every request ends with (others are looked up).
    pub ok: IntCounter,
    /// `infermesh_response_first_byte_seconds`.
    pub first_byte: Histogram,
    /// `infermesh_request_duration_seconds`.
    pub duration: Histogram,
    /// `infermesh_request_size_bytes`.
    pub request_size: Histogram,
    /// `infermesh_response_size_bytes`.
    pub response_size: Histogram,
    /// `infermesh_tokens_total` of the pair, by model label, as met. The
    /// model labels come from the config ([`crate::snapshot::Snapshot::model_label`]),
    /// so the list stays short and is searched in order.
    tokens: Mutex<Vec<(Arc<str>, TokenSeries)>>,
    route: Arc<str>,
    backend: Arc<str>,
    family: IntCounterVec,
}

/// `infermesh_tokens_total` of one route, backend and model: the input and
/// the output tokens.
#[derive(Clone, Debug)]
pub(crate) struct TokenSeries {
    /// `type="input"`.
    pub input: IntCounter,
    /// `type="output"`.
    pub output: IntCounter,
}

impl PairSeries {
    /// The token counts of the pair's answers for `model` (a model label,
    /// empty for none).
    pub(crate) fn tokens(&self, model: &str) -> TokenSeries {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, series)) = tokens.iter().find(|(m, _)| **m == *model) {
            return series.clone();
        }
        let labels = |kind| [&*self.route, &*self.backend, model, kind];
        let series = TokenSeries {
            input: self.family.with_label_values(&labels("input")),
            output: self.family.with_label_values(&labels("output")),
        };
        tokens.push((Arc::from(model), series.clone()));
        series
    }
}

/// [`PairSeries`] by route, then backend. The pairs are bounded by the
/// config (and the families keep their series anyway, as nothing removes
/// them), so the cache is not trimmed. Its keys are names from the
/// config, never client input, so they are hashed with foldhash's fast
/// hasher rather than the default DoS-resistant one, at a quarter of the
/// cost on every response.
#[derive(Debug, Default)]
pub(crate) struct PairSeriesCache {
    pairs: Mutex<HashMap<Arc<str>, SeriesByBackend, RandomState>>,
}

/// One route's [`PairSeries`], by backend.
type SeriesByBackend = HashMap<Arc<str>, Arc<PairSeries>, RandomState>;

impl Metrics {
    /// The series of the requests of `route` answered by `backend` (either
    /// empty when unknown).
    pub(crate) fn pair(&self, route: &str, backend: &str) -> Arc<PairSeries> {
        let mut pairs = self.pairs.pairs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(series) = pairs.get(route).and_then(|backends| backends.get(backend)) {
            return series.clone();
        }
        let labels = [route, backend];
        let (route, backend) = (Arc::<str>::from(route), Arc::<str>::from(backend));
        let series = Arc::new(PairSeries {
            ok: self
                .requests
                .with_label_values(&[&*route, &*backend, "200", ""]),
            first_byte: self.response_first_byte.with_label_values(&labels),
            duration: self.request_duration.with_label_values(&labels),
            request_size: self.request_size.with_label_values(&labels),
            response_size: self.response_size.with_label_values(&labels),
            tokens: Mutex::default(),
            route: route.clone(),
            backend: backend.clone(),
            family: self.tokens.clone(),
        });
        pairs
            .entry(route)
            .or_default()
            .insert(backend, series.clone());
        series
    }
}

impl Metrics {
    /// Registers the families of this layer and of the layers below in
    /// `registry`.
    pub(crate) fn register(registry: &Registry) -> Self {
        let latency = |name: &str, help: &str| registry.latency(name, help, &["route", "backend"]);
        Metrics {
            requests: registry.counter(
                "infermesh_requests_total",
                "Requests finished, by route, backend, status code (499: the client went away first) and gRPC status (empty unless gRPC).",
                &["route", "backend", "code", "grpc_status"],
            ),
            request_errors: registry.counter(
                "infermesh_request_errors_total",
                "Requests the proxy failed or cut short, by route, backend and reason (as in x-infermesh-error and the access log's error).",
                &["route", "backend", "reason"],
            ),
            request_duration: latency(
                "infermesh_request_duration_seconds",
                "Time from request arrival to the last byte of the response.",
            ),
            response_first_byte: latency(
                "infermesh_response_first_byte_seconds",
                "Time from request arrival to the backend's response headers.",
            ),
            stream_first_event: latency(
                "infermesh_stream_first_event_seconds",
                "Time from request arrival to the first body bytes of a streamed (text/event-stream) response.",
            ),
            tokens: registry.counter(
                "infermesh_tokens_total",
                "Tokens reported in the usage of OpenAI-compatible answers, by route, backend, model (of the matched route match, or the request's when the config names it; else empty) and type (input, output). OpenTelemetry: gen_ai.client.token.usage.",
                &["route", "backend", "model", "type"],
            ),
            time_to_first_token: registry.model_latency(
                "infermesh_time_to_first_token_seconds",
                "Time from request arrival to the first server-sent event of a streamed answer, by route, backend and model. OpenTelemetry: gen_ai.server.time_to_first_token.",
                &["route", "backend", "model"],
            ),
            time_between_events: registry.inter_event(
                "infermesh_time_between_events_seconds",
                "Time between consecutive server-sent events of a streamed answer (the time per output token), by route, backend and model. OpenTelemetry: gen_ai.server.time_per_output_token.",
                &["route", "backend", "model"],
            ),
            request_size: registry.sizes(
                "infermesh_request_size_bytes",
                "Request body bytes read from the client, by route and backend.",
                &["route", "backend"],
            ),
            response_size: registry.sizes(
                "infermesh_response_size_bytes",
                "Response body bytes sent to the client, by route and backend.",
                &["route", "backend"],
            ),
            downstream_connections: registry.gauge(
                "infermesh_downstream_connections",
                "Open client connections, by listener.",
                &["listener"],
            ),
            outside_mesh: registry.counter(
                "infermesh_outside_mesh_total",
                "Traffic to destinations outside the mesh seen by outbound capture listeners, by protocol (http requests, tcp connections) and action (passthrough, blocked).",
                &["listener", "protocol", "action"],
            ),
            connections_closed: registry.counter(
                "infermesh_downstream_connections_closed_total",
                "Client connections the proxy ended, by listener and reason (first_byte_timeout, request_headers_timeout, idle_timeout, max_connection_age, max_requests, premature_resets, stream_idle_timeout).",
                &["listener", "reason"],
            ),
            connections_refused: registry.counter(
                "infermesh_downstream_connections_refused_total",
                "Client connections closed as soon as accepted, by listener and reason (max_connections, out_of_descriptors).",
                &["listener", "reason"],
            ),
            snapshot: crate::snapshot::Metrics::register(registry),
            pairs: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pairs_series_are_the_families_series() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry);
        let first = metrics.pair("chat", "llama");
        first.ok.inc();
        first.duration.observe(0.5);
        metrics.pair("chat", "llama").ok.inc();
        metrics.pair("chat", "mistral").response_size.observe(10.0);
        let tokens = first.tokens("llama-3");
        tokens.input.inc_by(7);
        first.tokens("llama-3").output.inc_by(3);
        first.tokens("").input.inc_by(1);
        metrics
            .pair("chat", "mistral")
            .tokens("llama-3")
            .input
            .inc_by(11);
        assert!(Arc::ptr_eq(&first, &metrics.pair("chat", "llama")));
        assert_eq!(
            metrics
                .requests
                .with_label_values(&["chat", "llama", "200", ""])
                .get(),
            2
        );
        assert_eq!(
            metrics
                .request_duration
                .with_label_values(&["chat", "llama"])
                .get_sample_count(),
            1
        );
        assert_eq!(
            metrics
                .response_size
                .with_label_values(&["chat", "mistral"])
                .get_sample_sum(),
            10.0
        );
        let tokens = |backend, model, kind| {
            metrics
                .tokens
                .with_label_values(&["chat", backend, model, kind])
                .get()
        };
        assert_eq!(tokens("llama", "llama-3", "input"), 7);
        assert_eq!(tokens("llama", "llama-3", "output"), 3);
        assert_eq!(tokens("llama", "", "input"), 1);
        assert_eq!(tokens("mistral", "llama-3", "input"), 11);
    }
}
