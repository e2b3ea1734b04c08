//! A backend at run time: its current endpoints (DNS names resolved and
//! re-resolved in the background), each endpoint's connections, counters,
//! latency estimate and health, the backend's balancer and circuit
//! breaker, and the upkeep task that closes expired idle connections and
//! runs active health checks.
//!
//! The endpoint set is an immutable snapshot swapped atomically; requests
//! read it without a lock. An endpoint that survives a DNS refresh keeps
//! its connections and counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use infermesh_api::{BackendSpec, EndpointTarget, HealthCheck};
use prometheus::{IntCounter, IntCounterVec};
use tokio::task::AbortHandle;

use crate::balance::{Balancer, PeakEwma};
use crate::body::{BoxFuture, empty};
use crate::breaker::Breaker;
use crate::metrics::Metrics;
use crate::outlier::{Ejections, Health};
use crate::pool::{self, Connections, PoolSettings};

/// How long the first DNS resolution of a new backend may delay applying a
/// config; past it the backend starts empty and fills in when DNS answers.
const FIRST_RESOLUTION_WAIT: Duration = Duration::from_secs(5);

/// One address requests can be sent to.
#[derive(Debug)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of the backend's traffic.
    pub weight: u32,
    /// The DNS name this address was resolved from, if any.
    pub hostname: Option<Arc<str>>,
    /// Requests sent, failed, and in flight.
    pub stats: EndpointStats,
    /// Open and idle connections.
    pub connections: Arc<Connections>,
    /// Response-time estimate, for the balancer.
    pub latency: PeakEwma,
    /// Ejection, health-check and `Retry-After` state.
    pub health: Health,
}

impl Endpoint {
    /// A new endpoint, with fresh counters, estimate and health.
    pub fn new(addr: SocketAddr, weight: u32, hostname: Option<Arc<str>>) -> Self {
        Endpoint {
            addr,
            weight,
            hostname,
            stats: EndpointStats::default(),
            connections: Arc::default(),
            latency: PeakEwma::default(),
            health: Health::default(),
        }
    }
}

/// Counters of one endpoint, shown on the admin `/endpoints` page.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests sent to the endpoint.
    pub requests: AtomicU64,
    /// Requests that failed before a response (connect or reset).
    pub failures: AtomicU64,
    /// Requests whose response has not finished yet.
    pub in_flight: AtomicU64,
}

/// The endpoints of a backend at one moment.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// The endpoints, in config order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Sum of the endpoints' weights.
    pub total_weight: u64,
    /// `cumulative_weight[i]`: the weights of endpoints `0..=i` added up,
    /// to find an endpoint by weight in logarithmic time.
    pub cumulative_weight: Vec<u64>,
}

impl EndpointSet {
    /// The set of `endpoints`.
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let cumulative_weight: Vec<u64> = endpoints
            .iter()
            .scan(0, |sum, e| {
                *sum += u64::from(e.weight);
                Some(*sum)
            })
            .collect();
        EndpointSet {
            total_weight: cumulative_weight.last().copied().unwrap_or(0),
            cumulative_weight,
            endpoints,
        }
    }
}

/// A named backend: its spec, its live endpoints and connection settings.
#[derive(Debug)]
pub struct Backend {
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
    /// The backend's per-attempt metrics.
    pub metrics: BackendMetrics,
    upkeep: AbortHandle,
}

/// `infermesh_upstream_attempts_total{backend,outcome}` of one backend;
/// the outcome is the status class (`2xx`...) or the error's reason.
#[derive(Debug)]
pub struct BackendMetrics {
    name: Arc<str>,
    attempts: IntCounterVec,
    by_class: [IntCounter; 5],
}

impl BackendMetrics {
    fn new(name: &Arc<str>, metrics: &Metrics) -> Self {
        BackendMetrics {
            name: name.clone(),
            attempts: metrics.upstream_attempts.clone(),
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| metrics.upstream_attempts.with_label_values(&[name, class])),
        }
    }

    /// Counts an attempt that got a response with `status`.
    pub fn attempt_status(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
    }

    /// Counts an attempt that failed with the error `reason`.
    pub fn attempt(&self, reason: &str) {
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

/// An endpoint as configured: where it is and its weight.
#[derive(Clone, Debug)]
struct Target {
    target: EndpointTarget,
    weight: u32,
}

impl Backend {
    /// Builds the backend, resolving its DNS names once (waiting at most a
    /// few seconds), and starts its upkeep task. `previous` is the backend
    /// of the same name this one replaces: a name DNS cannot resolve now
    /// keeps the addresses it had there. Its connections are not reused,
    /// since they were made with the old settings. `tls` secures the
    /// connections when the spec asks for mutual TLS.
    pub async fn new(
        name: &str,
        spec: BackendSpec,
        previous: Option<&Backend>,
        metrics: &Metrics,
        tls: Option<crate::tls::Client>,
    ) -> Arc<Backend> {
        let name: Arc<str> = Arc::from(name);
        let targets: Vec<Target> = spec
            .endpoints
            .iter()
            .map(|e| Target {
                target: e.target().expect("validated endpoint address"),
                weight: e.weight,
            })
            .collect();
        let endpoints = Arc::new(ArcSwap::from_pointee(EndpointSet::default()));
        let breaker = Arc::new(Breaker::new(&name, spec.circuit_breaker, metrics));
        let pool = Arc::new(PoolSettings {
            protocol: spec.protocol,
            connect_timeout: spec.connect_timeout.get(),
            idle_timeout: spec.pool.idle_timeout.get(),
            max_idle: spec.pool.max_idle_per_endpoint,
            open_gauge: metrics.upstream_connections.with_label_values(&[&*name]),
            breaker: breaker.clone(),
            endpoints: Arc::downgrade(&endpoints),
            tls,
        });
        let known = previous.map(Backend::endpoints).unwrap_or_default();
        let first = tokio::time::timeout(
            FIRST_RESOLUTION_WAIT,
            lookup(&name, &targets, &known, system_resolver),
        )
        .await;
        match first {
            Ok(resolved) => endpoints.store(Arc::new(assemble(resolved, &EndpointSet::default()))),
            Err(_) => {
                tracing::warn!(backend = %name, "DNS did not answer in time; the backend starts without endpoints")
            }
        }
        let upkeep = tokio::spawn(upkeep(
            name.clone(),
            targets,
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
            metrics: BackendMetrics::new(&name, metrics),
            name,
            spec,
            endpoints,
            pool,
            upkeep,
        })
    }

    /// The endpoints right now.
    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// Reads the endpoints without taking a reference count; for the
    /// request path.
    pub(crate) fn with_endpoints<R>(&self, f: impl FnOnce(&EndpointSet) -> R) -> R {
        f(&self.endpoints.load())
    }
}

/// One address a target resolved to.
struct Resolved {
    addr: SocketAddr,
    weight: u32,
    hostname: Option<Arc<str>>,
}

/// Resolves a host name and port to addresses.
type Resolver = fn(String, u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>>;

/// The operating system's resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
fn system_resolver(host: String, port: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
    Box::pin(async move {
        tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(Iterator::collect)
    })
}

/// Looks every target up. A DNS name whose lookup fails keeps the addresses
/// it had in `known`, as Envoy does, so a DNS outage does not empty a
/// backend.
async fn lookup(
    backend: &str,
    targets: &[Target],
    known: &EndpointSet,
    resolve: Resolver,
) -> Vec<Resolved> {
    let mut resolved: Vec<Resolved> = Vec::new();
    for t in targets {
        let (addrs, hostname): (Vec<SocketAddr>, Option<Arc<str>>) = match &t.target {
            EndpointTarget::Socket(addr) => (vec![*addr], None),
            EndpointTarget::Dns { host, port } => {
                let addrs = match resolve(host.clone(), *port).await {
                    Ok(addrs) => addrs,
                    Err(e) => {
                        tracing::warn!(backend, host = %host, error = %e, "DNS resolution failed; keeping the last known addresses");
                        known
                            .endpoints
                            .iter()
                            .filter(|ep| ep.hostname.as_deref() == Some(host.as_str()))
                            .map(|ep| ep.addr)
                            .collect()
                    }
                };
                (addrs, Some(Arc::from(host.as_str())))
            }
        };
        for addr in addrs {
            if !resolved.iter().any(|r| r.addr == addr) {
                resolved.push(Resolved {
                    addr,
                    weight: t.weight,
                    hostname: hostname.clone(),
                });
            }
        }
    }
    resolved
}

/// The endpoint set of `resolved`, reusing the endpoints of `current` with
/// the same address and weight, so they keep their connections and
/// counters.
fn assemble(resolved: Vec<Resolved>, current: &EndpointSet) -> EndpointSet {
    let existing: HashMap<SocketAddr, &Arc<Endpoint>> =
        current.endpoints.iter().map(|e| (e.addr, e)).collect();
    let endpoints = resolved
        .into_iter()
        .map(|r| match existing.get(&r.addr) {
            Some(e) if e.weight == r.weight => Arc::clone(e),
            _ => Arc::new(Endpoint::new(r.addr, r.weight, r.hostname)),
        })
        .collect();
    EndpointSet::new(endpoints)
}

/// Re-resolves DNS names every `refresh`, closes expired idle connections
/// and runs the active health checks. Ends when the backend is dropped.
async fn upkeep(
    name: Arc<str>,
    targets: Vec<Target>,
    endpoints: Weak<ArcSwap<EndpointSet>>,
    refresh: Duration,
    pool: Weak<PoolSettings>,
    health_check: Option<HealthCheck>,
) {
    let Some(idle_timeout) = pool.upgrade().map(|p| p.idle_timeout) else {
        return;
    };
    let has_dns = targets
        .iter()
        .any(|t| matches!(t.target, EndpointTarget::Dns { .. }));
    let mut dns = tokio::time::interval(refresh);
    dns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    dns.tick().await;
    let mut sweep = tokio::time::interval((idle_timeout / 2).max(Duration::from_millis(100)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let check_every = health_check
        .as_ref()
        .map_or(Duration::from_secs(3600), |c| c.interval.get());
    let mut check = tokio::time::interval(check_every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = dns.tick(), if has_dns => {
                let Some(endpoints) = endpoints.upgrade() else { return };
                let current = endpoints.load_full();
                let next = assemble(lookup(&name, &targets, &current, system_resolver).await, &current);
                let changed = next.endpoints.len() != current.endpoints.len()
                    || next.endpoints.iter().zip(&current.endpoints).any(|(a, b)| !Arc::ptr_eq(a, b));
                if changed {
                    let addrs: Vec<String> = next.endpoints.iter().map(|e| e.addr.to_string()).collect();
                    tracing::info!(backend = %name, endpoints = ?addrs, "backend endpoints changed");
                    endpoints.store(Arc::new(next));
                }
            }
            _ = sweep.tick() => {
                let Some(endpoints) = endpoints.upgrade() else { return };
                for endpoint in &endpoints.load().endpoints {
                    endpoint.connections.close_expired(idle_timeout);
                }
            }
            _ = check.tick(), if health_check.is_some() => {
                let (Some(endpoints), Some(pool), Some(settings)) =
                    (endpoints.upgrade(), pool.upgrade(), health_check.as_ref())
                else {
                    return;
                };
                for endpoint in &endpoints.load().endpoints {
                    tokio::spawn(check_endpoint(endpoint.clone(), pool.clone(), settings.clone()));
                }
            }
        }
    }
}

/// Runs one active health check of `endpoint`: a `GET` of the check's
/// path on a connection of its own (so a check never waits behind traffic
/// for a connection slot); a 2xx within the timeout passes.
async fn check_endpoint(endpoint: Arc<Endpoint>, pool: Arc<PoolSettings>, settings: HealthCheck) {
    let request = Request::get(settings.path.as_str())
        .header(http::header::USER_AGENT, "infermesh-health-check")
        .body(empty())
        .expect("a validated path makes a request");
    let exchange = async {
        let response = pool::send_alone(endpoint.addr, &pool, request).await.ok()?;
        let status = response.status();
        response.into_body().collect().await.ok()?;
        Some(status)
    };
    let status = tokio::time::timeout(settings.timeout.get(), exchange)
        .await
        .ok()
        .flatten();
    let passed = status.is_some_and(|s| s.is_success());
    let changed = endpoint.health.checked(
        passed,
        settings.healthy_threshold,
        settings.unhealthy_threshold,
    );
    match (changed, passed) {
        (true, true) => {
            tracing::info!(endpoint = %endpoint.addr, "endpoint passes its health checks again")
        }
        (true, false) => {
            tracing::warn!(endpoint = %endpoint.addr, status = ?status, path = %settings.path, "endpoint fails its health checks; taken out of the rotation")
        }
        (false, _) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn target(text: &str, weight: u32) -> Target {
        Target {
            target: EndpointTarget::parse(text).unwrap(),
            weight,
        }
    }

    /// Resolves `model.test` to two addresses and fails for every other
    /// name, without asking the network.
    fn fake_dns(host: String, port: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            match host.as_str() {
                "model.test" => Ok(vec![
                    ([10, 0, 0, 1], port).into(),
                    ([10, 0, 0, 2], port).into(),
                ]),
                _ => Err(std::io::Error::other("no such host")),
            }
        })
    }

    async fn refresh(targets: &[Target], current: &EndpointSet) -> EndpointSet {
        assemble(lookup("b", targets, current, fake_dns).await, current)
    }

    #[tokio::test]
    async fn a_refresh_keeps_endpoints_that_are_still_listed() {
        let first = refresh(
            &[target("127.0.0.1:1001", 1), target("127.0.0.1:1002", 1)],
            &EndpointSet::default(),
        )
        .await;
        first.endpoints[0]
            .stats
            .requests
            .fetch_add(7, Ordering::Relaxed);

        let targets = [
            target("127.0.0.1:1001", 1),
            target("127.0.0.1:1002", 5),
            target("model.test:1003", 1),
        ];
        let second = refresh(&targets, &first).await;
        assert!(
            Arc::ptr_eq(&first.endpoints[0], &second.endpoints[0]),
            "unchanged endpoint kept"
        );
        assert_eq!(
            second.endpoints[0].stats.requests.load(Ordering::Relaxed),
            7
        );
        assert!(
            !Arc::ptr_eq(&first.endpoints[1], &second.endpoints[1]),
            "a new weight is a new endpoint"
        );
        assert_eq!(second.endpoints[1].weight, 5);
        let from_dns: Vec<String> = second.endpoints[2..]
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(from_dns, ["10.0.0.1:1003", "10.0.0.2:1003"]);
        assert!(
            second.endpoints[2..]
                .iter()
                .all(|e| e.hostname.as_deref() == Some("model.test"))
        );
        assert_eq!(second.total_weight, 1 + 5 + 2);
    }

    #[tokio::test]
    async fn a_name_dns_cannot_resolve_keeps_its_known_addresses() {
        let known = EndpointSet::new(vec![Arc::new(Endpoint::new(
            "10.0.0.9:8000".parse().unwrap(),
            1,
            Some(Arc::from("model.invalid")),
        ))]);
        let resolved = lookup("b", &[target("model.invalid:8000", 1)], &known, fake_dns).await;
        let addrs: Vec<SocketAddr> = resolved.iter().map(|r| r.addr).collect();
        assert_eq!(addrs, ["10.0.0.9:8000".parse::<SocketAddr>().unwrap()]);
    }
}
