//! The server layer's metric families: client connections, what became of
//! every request, and how long it took; plus the families of the layers
//! below, which what the server builds (a capture listener's forwarding
//! to the original destination) counts in.

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};

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
        }
    }
}
