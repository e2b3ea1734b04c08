//! Choosing an endpoint for each request, and the service that sends a
//! request to it: the backend's circuit breaker admits it, the balancer
//! picks an endpoint that is available (not ejected, unhealthy, paused by
//! `Retry-After`, nor just tried by this request), the exchange is timed
//! and its outcome feeds the endpoint's latency estimate and health.
//!
//! Policies: power of two choices over peak-EWMA latency × load (the
//! default, as in Linkerd), power of two choices over requests in flight
//! (Envoy's least request), and weighted round robin.
//!
//! When no endpoint is available, the request goes to one anyway, chosen
//! among all of them, as Envoy does below its panic threshold: a backend
//! whose every endpoint looks bad is more likely mis-judged than down, and
//! failing every request would be worse.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use infermesh_api::BalancePolicy;
use rand::RngExt;
use tokio::time::Instant;
use tower::Service;

use crate::backend::{Backend, Endpoint, EndpointSet};
use crate::body::{BoxFuture, ProxyBody, boxed, holding};
use crate::error::{ErrorKind, ProxyError};
use crate::headers::retry_after;
use crate::outlier::Probe;
use crate::pool;

/// Picks one of `items` with probability proportional to its weight;
/// `total` is the sum of the weights. `None` when there is nothing to pick.
pub fn pick_weighted<T>(items: &[T], total: u64, weight: impl Fn(&T) -> u32) -> Option<&T> {
    if total == 0 {
        return None;
    }
    let mut ticket = rand::rng().random_range(0..total);
    for item in items {
        let w = u64::from(weight(item));
        if ticket < w {
            return Some(item);
        }
        ticket -= w;
    }
    None
}

/// Which backend and endpoint answered; found in the extensions of every
/// response that came from upstream.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The backend's name.
    pub backend: Arc<str>,
    /// The endpoint's address.
    pub endpoint: SocketAddr,
    /// Retries made before this answer.
    pub retries: u32,
}

/// What the retry layer tells the balancer about one attempt, in the
/// request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Attempt {
    /// 0 for the first attempt, then 1, 2, ... for retries.
    pub retry: u32,
    /// Endpoints this request already failed on, to be avoided.
    pub avoid: Vec<SocketAddr>,
    /// Limit on this attempt's wait for response headers.
    pub timeout: Option<Duration>,
    /// A hedge: sent only to an endpoint no other attempt of the request
    /// uses.
    pub hedge: bool,
    /// Endpoints the request's other attempts in flight use (when it is
    /// hedged): each attempt adds its pick and avoids the others'.
    pub siblings: Option<Arc<Mutex<Vec<SocketAddr>>>>,
}

/// A failed exchange counts as a response this slow in the latency
/// estimate, so an endpoint that fails fast does not attract traffic.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// The latency estimate of an endpoint that has not answered yet.
const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// How fast the latency estimate forgets: older samples weigh e^(-age/τ).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// A peak-sensitive moving average of an endpoint's response time (to
/// response headers: for a streamed generation, the time to first
/// token). A slower sample replaces the estimate at once; faster ones pull
/// it down gradually; with no samples it decays towards zero, so an
/// endpoint judged slow is tried again after a while.
#[derive(Debug)]
pub struct PeakEwma(Mutex<Estimate>);

#[derive(Debug)]
struct Estimate {
    nanos: f64,
    at: Instant,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma(Mutex::new(Estimate {
            nanos: DEFAULT_RTT.as_nanos() as f64,
            at: Instant::now(),
        }))
    }
}

impl PeakEwma {
    fn decayed(estimate: &Estimate, now: Instant) -> f64 {
        let age = now.saturating_duration_since(estimate.at).as_secs_f64();
        estimate.nanos * (-age / EWMA_DECAY.as_secs_f64()).exp()
    }

    /// Adds a sample taken at `now`.
    pub fn observe(&self, now: Instant, rtt: Duration) {
        let mut estimate = self.0.lock().expect("ewma lock");
        let rtt = rtt.as_nanos() as f64;
        let current = Self::decayed(&estimate, now);
        estimate.nanos = if rtt > current {
            rtt
        } else {
            let age = now.saturating_duration_since(estimate.at).as_secs_f64();
            let keep = (-age / EWMA_DECAY.as_secs_f64()).exp();
            estimate.nanos * keep + rtt * (1.0 - keep)
        };
        estimate.at = now;
    }

    /// The estimate at `now`.
    pub fn get(&self, now: Instant) -> Duration {
        let estimate = self.0.lock().expect("ewma lock");
        Duration::from_nanos(Self::decayed(&estimate, now) as u64)
    }
}

/// Picks endpoints for one backend by its policy.
#[derive(Debug)]
pub struct Balancer {
    policy: BalancePolicy,
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer using `policy`.
    pub fn new(policy: BalancePolicy) -> Self {
        Balancer {
            policy,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint of `set` at `now`, preferring, in turn: available
    /// endpoints not in `avoid`; available ones; ones not in `avoid`; any.
    pub fn pick<'a>(
        &self,
        set: &'a EndpointSet,
        avoid: &[SocketAddr],
        now: Instant,
    ) -> Option<&'a Arc<Endpoint>> {
        let fresh = |e: &Endpoint| !avoid.contains(&e.addr);
        let available = |e: &Endpoint| e.health.is_available(now);
        // Usually every endpoint qualifies: then the set's own weights serve.
        if set.endpoints.iter().all(|e| available(e) && fresh(e)) {
            return self.pick_any(set, now);
        }
        self.pick_among(set, now, |e| available(e) && fresh(e))
            .or_else(|| self.pick_among(set, now, available))
            .or_else(|| self.pick_among(set, now, fresh))
            .or_else(|| self.pick_any(set, now))
    }

    /// Picks among every endpoint of `set`, finding weights by binary
    /// search.
    fn pick_any<'a>(&self, set: &'a EndpointSet, now: Instant) -> Option<&'a Arc<Endpoint>> {
        let weights = &set.cumulative_weight;
        let nth = |mut ticket: u64, skip: Option<usize>| {
            if let Some(s) = skip {
                let weight = u64::from(set.endpoints[s].weight);
                if ticket >= weights[s] - weight {
                    ticket += weight;
                }
            }
            let i = weights.partition_point(|&sum| sum <= ticket);
            set.endpoints.get(i).map(|e| (i, e))
        };
        self.choose(set.total_weight, nth, now)
    }

    /// Picks among the endpoints of `set` that are `eligible`.
    fn pick_among<'a>(
        &self,
        set: &'a EndpointSet,
        now: Instant,
        eligible: impl Fn(&Endpoint) -> bool,
    ) -> Option<&'a Arc<Endpoint>> {
        let total: u64 = set
            .endpoints
            .iter()
            .filter(|e| eligible(e))
            .map(|e| u64::from(e.weight))
            .sum();
        let nth = |mut ticket: u64, skip: Option<usize>| {
            set.endpoints
                .iter()
                .enumerate()
                .filter(|(i, e)| Some(*i) != skip && eligible(e))
                .find(|(_, e)| {
                    let w = u64::from(e.weight);
                    if ticket < w {
                        return true;
                    }
                    ticket -= w;
                    false
                })
        };
        self.choose(total, nth, now)
    }

    /// Applies the policy to candidates of weights adding up to `total`;
    /// `nth(ticket, skip)` finds the candidate whose weight range holds
    /// `ticket`, leaving out candidate `skip`.
    fn choose<'a>(
        &self,
        total: u64,
        nth: impl Fn(u64, Option<usize>) -> Option<(usize, &'a Arc<Endpoint>)>,
        now: Instant,
    ) -> Option<&'a Arc<Endpoint>> {
        if total == 0 {
            return None;
        }
        match self.policy {
            BalancePolicy::RoundRobin => {
                let ticket = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
                nth(ticket, None).map(|(_, e)| e)
            }
            BalancePolicy::PeakEwma | BalancePolicy::LeastRequest => {
                let mut rng = rand::rng();
                let (i, first) = nth(rng.random_range(0..total), None)?;
                let rest = total - u64::from(first.weight);
                if rest == 0 {
                    return Some(first);
                }
                let (_, second) = nth(rng.random_range(0..rest), Some(i))?;
                Some(if self.cost(second, now) < self.cost(first, now) {
                    second
                } else {
                    first
                })
            }
        }
    }

    /// The load of `endpoint` as the policy weighs it, per unit of weight.
    fn cost(&self, endpoint: &Endpoint, now: Instant) -> f64 {
        let pending = endpoint.stats.in_flight.load(Ordering::Relaxed) as f64 + 1.0;
        let load = match self.policy {
            BalancePolicy::PeakEwma => endpoint.latency.get(now).as_nanos() as f64 * pending,
            _ => pending,
        };
        load / f64::from(endpoint.weight)
    }
}

/// Sends each request to one endpoint of a backend.
#[derive(Clone, Debug)]
pub struct Balance {
    backend: Arc<Backend>,
}

impl Balance {
    /// Balances over `backend`'s endpoints.
    pub fn new(backend: Arc<Backend>) -> Self {
        Balance { backend }
    }
}

impl Service<Request<ProxyBody>> for Balance {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let backend = self.backend.clone();
        Box::pin(async move {
            let attempt = request.extensions().get::<Attempt>();
            let (retry, timeout) = attempt.map_or((0, None), |a| (a.retry, a.timeout));
            let admission = backend.breaker.admit(retry > 0).map_err(|kind| {
                ProxyError::new(kind)
                    .at_backend(&backend.name)
                    .after_retries(retry)
            })?;
            let now = Instant::now();
            let Some(endpoint) = pick(&backend, attempt, now) else {
                backend.metrics.attempt(ErrorKind::NoEndpoint.reason());
                return Err(ProxyError::new(ErrorKind::NoEndpoint)
                    .at_backend(&backend.name)
                    .after_retries(retry));
            };
            let probe = endpoint.health.on_send(now);
            endpoint.stats.requests.fetch_add(1, Ordering::Relaxed);
            let in_flight = InFlight::start(endpoint.clone());
            let mut unanswered = Unanswered(Some((endpoint.clone(), now)));
            let exchange = pool::send(&endpoint.connections, endpoint.addr, &backend.pool, request);
            let result = match timeout {
                Some(limit) => tokio::time::timeout(limit, exchange)
                    .await
                    .unwrap_or(Err(ErrorKind::AttemptTimeout(limit))),
                None => exchange.await,
            };
            unanswered.0 = None;
            let done = Instant::now();
            let rtt = done.saturating_duration_since(now);
            match result {
                Ok(response) => {
                    let status = response.status();
                    backend.metrics.attempt_status(status);
                    if status.is_server_error() {
                        endpoint.latency.observe(done, rtt.max(FAILURE_PENALTY));
                        eject(&backend, &endpoint, done, probe);
                    } else {
                        endpoint.latency.observe(done, rtt);
                        endpoint.health.succeeded(done, probe);
                    }
                    if (status == http::StatusCode::TOO_MANY_REQUESTS
                        || status == http::StatusCode::SERVICE_UNAVAILABLE)
                        && let Some(pause) = retry_after(response.headers())
                    {
                        endpoint.health.pause(done, pause.min(MAX_PAUSE));
                    }
                    let (mut parts, body) = response.into_parts();
                    parts.extensions.insert(Upstream {
                        backend: backend.name.clone(),
                        endpoint: endpoint.addr,
                        retries: retry,
                    });
                    Ok(Response::from_parts(
                        parts,
                        holding(boxed(body), (in_flight, admission)),
                    ))
                }
                Err(kind) => {
                    backend.metrics.attempt(kind.reason());
                    if matches!(
                        kind,
                        ErrorKind::ConnectFailed(_)
                            | ErrorKind::ConnectTimeout(_)
                            | ErrorKind::UpstreamReset(_)
                            | ErrorKind::UpstreamTls(_)
                            | ErrorKind::AttemptTimeout(_)
                    ) {
                        endpoint.stats.failures.fetch_add(1, Ordering::Relaxed);
                        endpoint.latency.observe(done, rtt.max(FAILURE_PENALTY));
                        eject(&backend, &endpoint, done, probe);
                    }
                    Err(ProxyError::new(kind)
                        .at_backend(&backend.name)
                        .at_endpoint(endpoint.addr)
                        .after_retries(retry))
                }
            }
        })
    }
}

/// Records a failure at `endpoint`, logging the ejection it may cause.
fn eject(backend: &Backend, endpoint: &Endpoint, now: Instant, probe: Option<Probe>) {
    let ejected = backend.with_endpoints(|set| {
        endpoint
            .health
            .failed(now, probe, &backend.ejections, set.endpoints.len(), || {
                set.endpoints
                    .iter()
                    .filter(|e| e.health.is_ejected())
                    .count()
            })
    });
    if let Some(length) = ejected {
        tracing::warn!(
            backend = %backend.name,
            endpoint = %endpoint.addr,
            seconds = length.as_secs_f64(),
            "endpoint ejected after consecutive failures"
        );
    }
}

/// The longest pause a `Retry-After` can impose on an endpoint.
const MAX_PAUSE: Duration = Duration::from_secs(300);

/// Picks the endpoint of an attempt: avoiding the endpoints it already
/// failed on and, for a hedged request, those its sibling attempts use
/// (adding its own pick to theirs). A hedge with no other endpoint left
/// gets none: it would only double the load of one already working on
/// the request.
fn pick(backend: &Backend, attempt: Option<&Attempt>, now: Instant) -> Option<Arc<Endpoint>> {
    let failed = attempt.map_or(&[][..], |a| &a.avoid[..]);
    let Some(siblings) = attempt.and_then(|a| a.siblings.as_ref()) else {
        return backend.with_endpoints(|set| backend.balancer.pick(set, failed, now).cloned());
    };
    let mut siblings = siblings.lock().unwrap_or_else(PoisonError::into_inner);
    let avoid: Vec<SocketAddr> = failed.iter().chain(siblings.iter()).copied().collect();
    let hedge = attempt.is_some_and(|a| a.hedge);
    let picked = backend
        .with_endpoints(|set| backend.balancer.pick(set, &avoid, now).cloned())
        .filter(|e| !(hedge && siblings.contains(&e.addr)));
    siblings.extend(picked.as_ref().map(|e| e.addr));
    picked
}

/// An exchange dropped before its answer (a hedge's loser, a client that
/// went away) still tells the latency estimate how long the endpoint took
/// at least, so a stalled endpoint does not keep looking fast.
struct Unanswered(Option<(Arc<Endpoint>, Instant)>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some((endpoint, sent)) = self.0.take() {
            let now = Instant::now();
            endpoint
                .latency
                .observe(now, now.saturating_duration_since(sent));
        }
    }
}

/// Counts a request as in flight at its endpoint until dropped.
struct InFlight(Arc<Endpoint>);

impl InFlight {
    fn start(endpoint: Arc<Endpoint>) -> Self {
        endpoint.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_in_proportion_to_weight() {
        let items = [("a", 1u32), ("b", 3), ("c", 0)];
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            let (name, _) = pick_weighted(&items, 4, |i| i.1).unwrap();
            counts[items.iter().position(|i| i.0 == *name).unwrap()] += 1;
        }
        // Expected 10 000 and 30 000; 5 standard deviations is about ±430.
        assert!((9_500..=10_500).contains(&counts[0]), "{counts:?}");
        assert!((29_500..=30_500).contains(&counts[1]), "{counts:?}");
        assert_eq!(counts[2], 0, "weight 0 is never picked");
        assert!(pick_weighted(&items, 0, |i| i.1).is_none());
    }

    fn endpoints(weights: &[u32]) -> EndpointSet {
        EndpointSet::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
                    Arc::new(Endpoint::new(addr, *w, None))
                })
                .collect(),
        )
    }

    fn share(balancer: &Balancer, set: &EndpointSet, avoid: &[SocketAddr], n: usize) -> Vec<usize> {
        let mut counts = vec![0; set.endpoints.len()];
        for _ in 0..n {
            let picked = balancer.pick(set, avoid, Instant::now()).unwrap();
            counts[set
                .endpoints
                .iter()
                .position(|e| e.addr == picked.addr)
                .unwrap()] += 1;
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_prefers_the_fast_endpoint() {
        let set = endpoints(&[1, 1]);
        let now = Instant::now();
        set.endpoints[0]
            .latency
            .observe(now, Duration::from_millis(20));
        set.endpoints[1]
            .latency
            .observe(now, Duration::from_millis(400));
        let counts = share(&Balancer::new(BalancePolicy::PeakEwma), &set, &[], 1000);
        // The slow one wins only when both choices fall on it: 1 in 4.
        assert!(counts[0] > 700, "{counts:?}");

        // Twenty seconds without samples: both estimates decay towards
        // zero, and the slow one is worth trying again.
        tokio::time::advance(Duration::from_secs(20)).await;
        let later = Instant::now();
        assert!(set.endpoints[1].latency.get(later) < Duration::from_millis(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_sample_takes_over_at_once_and_faster_ones_slowly() {
        let ewma = PeakEwma::default();
        let now = Instant::now();
        ewma.observe(now, Duration::from_millis(500));
        assert_eq!(ewma.get(now), Duration::from_millis(500));
        tokio::time::advance(Duration::from_secs(1)).await;
        ewma.observe(Instant::now(), Duration::from_millis(10));
        let after = ewma.get(Instant::now());
        assert!(
            after > Duration::from_millis(400) && after < Duration::from_millis(500),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_counts_requests_in_flight() {
        let set = endpoints(&[1, 1]);
        let now = Instant::now();
        for e in &set.endpoints {
            e.latency.observe(now, Duration::from_millis(100));
        }
        set.endpoints[0].stats.in_flight.store(9, Ordering::Relaxed);
        let counts = share(&Balancer::new(BalancePolicy::PeakEwma), &set, &[], 1000);
        assert!(counts[1] > 700, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_two_choices_are_always_two_different_endpoints() {
        // With two endpoints, both are always compared: the idle one wins
        // every time, whatever their weights.
        for weights in [[1, 1], [5, 1], [1, 5]] {
            let set = endpoints(&weights);
            set.endpoints[0]
                .stats
                .in_flight
                .store(50, Ordering::Relaxed);
            let counts = share(&Balancer::new(BalancePolicy::LeastRequest), &set, &[], 1000);
            assert_eq!(counts, [0, 1000], "weights {weights:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn equal_endpoints_share_the_load() {
        for policy in [
            BalancePolicy::PeakEwma,
            BalancePolicy::LeastRequest,
            BalancePolicy::RoundRobin,
        ] {
            let set = endpoints(&[1, 1, 1]);
            let counts = share(&Balancer::new(policy), &set, &[], 3000);
            // Expected 1000 each; 5 standard deviations is about ±130.
            for c in &counts {
                assert!((870..=1130).contains(c), "{policy:?}: {counts:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn weights_shape_the_share() {
        for policy in [BalancePolicy::RoundRobin, BalancePolicy::LeastRequest] {
            let set = endpoints(&[1, 3]);
            let counts = share(&Balancer::new(policy), &set, &[], 4000);
            assert!(counts[1] > 2 * counts[0], "{policy:?}: {counts:?}");
        }
        let set = endpoints(&[1, 3]);
        let counts = share(&Balancer::new(BalancePolicy::RoundRobin), &set, &[], 4000);
        assert_eq!(counts, [1000, 3000], "round robin is exact");
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_and_avoided_endpoints_are_skipped_until_nothing_else_is_left() {
        let set = endpoints(&[1, 1, 1]);
        let balancer = Balancer::new(BalancePolicy::LeastRequest);
        set.endpoints[0]
            .health
            .pause(Instant::now(), Duration::from_secs(5));
        let avoid = [set.endpoints[1].addr];
        assert_eq!(share(&balancer, &set, &avoid, 100), [0, 0, 100]);

        // Only avoided or paused endpoints left: an available one that
        // failed before beats a paused one.
        let avoid = [set.endpoints[1].addr, set.endpoints[2].addr];
        let counts = share(&balancer, &set, &avoid, 100);
        assert_eq!(counts[0], 0, "{counts:?}");

        // Nothing available at all: panic routing over every endpoint.
        for e in &set.endpoints {
            e.health.pause(Instant::now(), Duration::from_secs(5));
        }
        let counts = share(&balancer, &set, &[], 300);
        assert!(counts.iter().all(|c| *c > 50), "{counts:?}");
    }
}
