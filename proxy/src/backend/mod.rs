//! The backend layer: a named set of endpoints at run time, and how one
//! attempt reaches one of them. A [`Backend`] holds its current endpoints
//! ([`endpoint`]; DNS names resolved by [`dns`] and re-resolved by its
//! [`upkeep`] task, which also runs active health checks), each endpoint's
//! connections ([`pool`], connecting through the transport layer's
//! connector), latency estimate ([`ewma`]) and health ([`outlier`]), the
//! backend's endpoint [`pick`] and its circuit [`breaker`]. The
//! [`balance`] service makes one attempt: admitted by the breaker, sent to
//! the endpoint picked, its outcome fed back into the estimate and the
//! health.
//!
//! The endpoint set is an immutable value swapped atomically; requests
//! read it without a lock. An endpoint that survives a DNS refresh keeps
//! its connections and counters.

pub(crate) mod balance;
pub(crate) mod breaker;
pub(crate) mod dns;
pub(crate) mod endpoint;
pub(crate) mod ewma;
pub(crate) mod outlier;
pub(crate) mod pick;
pub(crate) mod pool;
pub(crate) mod upkeep;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;
use infermesh_api::BackendSpec;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGaugeVec};
use tokio::task::AbortHandle;

use crate::backend::breaker::Breaker;
use crate::backend::dns::{ConfiguredEndpoint, assemble, lookup, system_resolver};
use crate::backend::endpoint::EndpointSet;
use crate::backend::outlier::{Ejections, EndpointState};
use crate::backend::pick::Balancer;
use crate::backend::pool::{ConnectMetrics, PoolSettings};
use crate::core::metrics::Registry;
use crate::transport::connect::Connector;

/// How long the first DNS resolution of a new backend may delay applying a
/// config; past it the backend starts empty and fills in when DNS answers.
const FIRST_RESOLUTION_WAIT: Duration = Duration::from_secs(5);

/// The backend layer's metric families.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// `infermesh_upstream_attempts_total{backend,outcome}`: exchanges
    /// with endpoints, retries included; the outcome is the status class
    /// (`2xx`...) or the proxy's error reason.
    pub upstream_attempts: IntCounterVec,
    /// `infermesh_upstream_connections{backend}`: open connections to
    /// backends.
    pub upstream_connections: IntGaugeVec,
    /// `infermesh_overloaded_total{backend,limit}`: requests refused by a
    /// circuit-breaker limit.
    pub overloaded: IntCounterVec,
    /// `infermesh_endpoint_ejections_total{backend}`: outlier ejections.
    pub endpoint_ejections: IntCounterVec,
    /// `infermesh_endpoints{backend,state}`: endpoints by state, counted
    /// when scraped ([`Metrics::count_endpoint_states`]).
    pub endpoints: IntGaugeVec,
    /// `infermesh_upstream_connects_total{backend,result}`: connection
    /// attempts to endpoints (TCP, and TLS when the backend asks for it),
    /// by `success` or the failure's reason (`connect_failed`,
    /// `connect_timeout`, `upstream_tls_failed`).
    pub upstream_connects: IntCounterVec,
    /// `infermesh_upstream_connect_duration_seconds{backend}`: how long
    /// successful connects took, handshakes included.
    pub upstream_connect_duration: HistogramVec,
    /// `infermesh_upstream_requests_in_flight{backend}`: attempts sent to
    /// the backend's endpoints and not yet finished (their response bodies
    /// included), summed from the endpoints' own counts when scraped, so
    /// counting costs a request nothing more: the load signal autoscalers
    /// (HPA, KEDA) read, as Envoy's `upstream_rq_active`.
    pub requests_in_flight: IntGaugeVec,
}

impl Metrics {
    /// Registers the backend layer's families in `registry`.
    pub(crate) fn register(registry: &Registry) -> Self {
        Metrics {
            upstream_attempts: registry.counter(
                "infermesh_upstream_attempts_total",
                "Exchanges with backend endpoints (retries included), by outcome: status class or error reason.",
                &["backend", "outcome"],
            ),
            upstream_connections: registry.gauge(
                "infermesh_upstream_connections",
                "Open connections to backend endpoints.",
                &["backend"],
            ),
            overloaded: registry.counter(
                "infermesh_overloaded_total",
                "Requests refused by a backend's circuit-breaker limit.",
                &["backend", "limit"],
            ),
            endpoint_ejections: registry.counter(
                "infermesh_endpoint_ejections_total",
                "Endpoints ejected by outlier detection.",
                &["backend"],
            ),
            endpoints: registry.gauge(
                "infermesh_endpoints",
                "Backend endpoints, by state.",
                &["backend", "state"],
            ),
            upstream_connects: registry.counter(
                "infermesh_upstream_connects_total",
                "Connection attempts to backend endpoints (TCP, and TLS when the backend asks for it), by result: success or the failure's reason.",
                &["backend", "result"],
            ),
            upstream_connect_duration: registry.latency(
                "infermesh_upstream_connect_duration_seconds",
                "Time successful connects to backend endpoints took, TLS handshakes included.",
                &["backend"],
            ),
            requests_in_flight: registry.gauge(
                "infermesh_upstream_requests_in_flight",
                "Attempts sent to a backend's endpoints and not yet finished, response bodies included.",
                &["backend"],
            ),
        }
    }

    /// Sets `infermesh_endpoints{backend,state}` and
    /// `infermesh_upstream_requests_in_flight{backend}` from `backends`,
    /// as they are now: called when the metrics are scraped.
    pub(crate) fn count_endpoint_states<'a>(
        &self,
        backends: impl Iterator<Item = &'a Arc<Backend>>,
    ) {
        self.endpoints.reset();
        self.requests_in_flight.reset();
        let now = tokio::time::Instant::now();
        for backend in backends {
            let mut counts = [0i64; EndpointState::ALL.len()];
            let mut in_flight = 0i64;
            for endpoint in &backend.endpoints().endpoints {
                counts[endpoint.health.state(now) as usize] += 1;
                in_flight += endpoint.stats.in_flight.load(Ordering::Relaxed) as i64;
            }
            self.requests_in_flight
                .with_label_values(&[&*backend.name])
                .set(in_flight);
            for (state, count) in EndpointState::ALL.iter().zip(counts) {
                self.endpoints
                    .with_label_values(&[&*backend.name, state.as_str()])
                    .set(count);
            }
        }
    }
}

/// A named backend: its spec, its live endpoints and connection settings.
#[derive(Debug)]
pub(crate) struct Backend {
    /// `metadata.name`.
    pub name: Arc<str>,
    /// The spec it was built from; a reload with an equal spec keeps this
    /// backend, with its endpoints and connections.
    pub spec: BackendSpec,
    endpoints: Arc<ArcSwap<EndpointSet>>,
    /// Connection settings shared by every endpoint.
    pub pool: Arc<PoolSettings>,
    /// Picks an endpoint for each request.
    pub balancer: Balancer,
    /// The circuit-breaker limits.
    pub breaker: Arc<Breaker>,
    /// Outlier-detection settings and the ejected count.
    pub ejections: Ejections,
    /// The backend's per-attempt counters.
    pub attempts: AttemptCounters,
    upkeep: AbortHandle,
}

/// `infermesh_upstream_attempts_total{backend,outcome}` of one backend;
/// the outcome is the status class (`2xx`...) or the error's reason.
#[derive(Debug)]
pub(crate) struct AttemptCounters {
    name: Arc<str>,
    attempts: IntCounterVec,
    by_class: [IntCounter; 5],
}

impl AttemptCounters {
    fn new(name: &Arc<str>, metrics: &Metrics) -> Self {
        AttemptCounters {
            name: name.clone(),
            attempts: metrics.upstream_attempts.clone(),
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| metrics.upstream_attempts.with_label_values(&[name, class])),
        }
    }

    /// Counts an attempt that got a response with `status`.
    pub(crate) fn answered(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
    }

    /// Counts an attempt that failed with the error `reason`.
    pub(crate) fn failed(&self, reason: &str) {
        self.attempts
            .with_label_values(&[&*self.name, reason])
            .inc();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.upkeep.abort();
    }
}

impl Backend {
    /// Builds the backend, resolving its DNS names once (waiting at most a
    /// few seconds), and starts its upkeep task. `previous` is the backend
    /// of the same name this one replaces: a name DNS cannot resolve now
    /// keeps the addresses it had there. Its connections are not reused,
    /// since they were made with the old settings. `connector` opens the
    /// connections (TCP, with mutual TLS when the spec asks for it).
    pub(crate) async fn new(
        name: &str,
        spec: BackendSpec,
        previous: Option<&Backend>,
        metrics: &Metrics,
        connector: Arc<dyn Connector>,
    ) -> Arc<Backend> {
        let name: Arc<str> = Arc::from(name);
        let configured: Vec<ConfiguredEndpoint> = spec
            .endpoints
            .iter()
            .map(|e| ConfiguredEndpoint {
                target: e.target().expect("validated endpoint address"),
                weight: e.weight,
            })
            .collect();
        let endpoints = Arc::new(ArcSwap::from_pointee(EndpointSet::default()));
        let breaker = Arc::new(Breaker::new(
            &name,
            spec.circuit_breaker,
            &metrics.overloaded,
        ));
        let pool = Arc::new(PoolSettings {
            protocol: spec.protocol,
            connect_timeout: spec.connect_timeout.get(),
            idle_timeout: spec.pool.idle_timeout.get(),
            max_idle: spec.pool.max_idle_per_endpoint,
            open_gauge: metrics.upstream_connections.with_label_values(&[&*name]),
            connects: ConnectMetrics {
                name: name.clone(),
                results: metrics.upstream_connects.clone(),
                succeeded: metrics
                    .upstream_connects
                    .with_label_values(&[&*name, "success"]),
                duration: metrics
                    .upstream_connect_duration
                    .with_label_values(&[&*name]),
            },
            breaker: breaker.clone(),
            reclaim_idle: Box::new(reclaim_idle(Arc::downgrade(&endpoints))),
            connector,
        });
        let known = previous.map(Backend::endpoints).unwrap_or_default();
        let first = tokio::time::timeout(
            FIRST_RESOLUTION_WAIT,
            lookup(&name, &configured, &known, system_resolver),
        )
        .await;
        match first {
            Ok(resolved) => endpoints.store(Arc::new(assemble(resolved, &EndpointSet::default()))),
            Err(_) => {
                tracing::warn!(backend = %name, "DNS did not answer in time; the backend starts without endpoints")
            }
        }
        let upkeep = tokio::spawn(upkeep::upkeep(
            name.clone(),
            configured,
            Arc::downgrade(&endpoints),
            spec.dns_refresh_interval.get(),
            Arc::downgrade(&pool),
            spec.health_check.clone(),
        ))
        .abort_handle();
        Arc::new(Backend {
            balancer: Balancer::new(spec.load_balancer.policy),
            breaker,
            ejections: Ejections::new(
                spec.outlier_detection,
                metrics.endpoint_ejections.with_label_values(&[&*name]),
            ),
            attempts: AttemptCounters::new(&name, metrics),
            name,
            spec,
            endpoints,
            pool,
            upkeep,
        })
    }

    /// The endpoints right now.
    pub(crate) fn endpoints(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// Reads the endpoints without taking a reference count; for the
    /// request path.
    pub(crate) fn with_endpoints<R>(&self, f: impl FnOnce(&EndpointSet) -> R) -> R {
        f(&self.endpoints.load())
    }
}

/// The pool's narrow handle on the backend's endpoints: closes the
/// longest-idle connection of one of them, so that its connection permit
/// passes to a request waiting for one.
fn reclaim_idle(endpoints: Weak<ArcSwap<EndpointSet>>) -> impl Fn() -> bool + Send + Sync {
    move || {
        endpoints.upgrade().is_some_and(|endpoints| {
            endpoints
                .load()
                .endpoints
                .iter()
                .any(|e| e.connections.close_oldest_idle())
        })
    }
}
