//! One attempt against a backend, as a tower service: the circuit breaker
//! admits it, the endpoint is picked (avoiding the ones the request
//! already failed on, and for a hedge the ones its siblings use), the
//! exchange is sent through the endpoint's pool and timed, and its
//! outcome feeds the endpoint's latency estimate and health: a failure
//! that the error vocabulary says is the endpoint's fault counts towards
//! its ejection.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;

use crate::backend::Backend;
use crate::backend::endpoint::Endpoint;
use crate::backend::outlier::Probe;
use crate::backend::pool;
use crate::core::body::{BoxFuture, ProxyBody, boxed, holding};
use crate::core::context::{Attempt, RequestContext, Upstream};
use crate::core::error::{ErrorKind, ProxyError};
use crate::core::headers::retry_after;
use crate::core::trace::{AttemptInfo, RequestTrace};

/// A failed exchange counts as a response this slow in the latency
/// estimate, so an endpoint that fails fast does not attract traffic.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Sends each request to one endpoint of a backend.
#[derive(Clone, Debug)]
pub(crate) struct Balance {
    backend: Arc<Backend>,
}

impl Balance {
    /// Balances over `backend`'s endpoints.
    pub(crate) fn new(backend: Arc<Backend>) -> Self {
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

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
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
            let Some(endpoint) = pick_endpoint(&backend, attempt, now) else {
                backend.attempts.failed(ErrorKind::NoEndpoint.reason());
                return Err(ProxyError::new(ErrorKind::NoEndpoint)
                    .at_backend(&backend.name)
                    .after_retries(retry));
            };
            let hedge = attempt.is_some_and(|a| a.hedge);
            if let Some(context) = request.extensions().get::<RequestContext>() {
                context.note_attempt(Upstream {
                    backend: backend.name.clone(),
                    endpoint: endpoint.addr,
                    retries: retry,
                });
            }
            let mut span = match request.extensions().get::<RequestTrace>().cloned() {
                Some(trace) => trace.attempt(
                    &mut request,
                    AttemptInfo {
                        backend: &backend.name,
                        endpoint: endpoint.addr,
                        retry,
                        hedge,
                    },
                ),
                None => None,
            };
            let probe = endpoint.health.on_send(now);
            endpoint.stats.requests.fetch_add(1, Ordering::Relaxed);
            let in_flight = InFlight::start(endpoint.clone());
            let mut unanswered = Unanswered(Some((endpoint.clone(), now)));
            let exchange = pool::send(&endpoint.connections, endpoint.addr, &backend.pool, request);
            let result = match timeout {
                Some(limit) => tokio::time::timeout(limit, exchange)
                    .await
                    .unwrap_or_else(|_| Err(ErrorKind::AttemptTimeout(limit).into())),
                None => exchange.await,
            };
            unanswered.0 = None;
            let done = Instant::now();
            let rtt = done.saturating_duration_since(now);
            match result {
                Ok(response) => {
                    let status = response.status();
                    backend.attempts.answered(status);
                    if let Some(span) = &mut span {
                        span.answered(status);
                    }
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
                        // The attempt's span ends with its body.
                        holding(boxed(body), (in_flight, admission, span)),
                    ))
                }
                Err(pool::SendError { kind, unsent }) => {
                    backend.attempts.failed(kind.reason());
                    if let Some(span) = span {
                        span.failed(kind.reason());
                    }
                    if kind.is_endpoint_fault() {
                        endpoint.stats.failures.fetch_add(1, Ordering::Relaxed);
                        endpoint.latency.observe(done, rtt.max(FAILURE_PENALTY));
                        eject(&backend, &endpoint, done, probe);
                    }
                    let error = ProxyError::new(kind)
                        .at_backend(&backend.name)
                        .at_endpoint(endpoint.addr)
                        .after_retries(retry);
                    Err(match unsent {
                        Some(head) => error.with_unsent(head),
                        None => error,
                    })
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
fn pick_endpoint(
    backend: &Backend,
    attempt: Option<&Attempt>,
    now: Instant,
) -> Option<Arc<Endpoint>> {
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
