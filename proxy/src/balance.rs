//! Choosing among weighted candidates, and the service that sends a
//! request to one endpoint of a backend, counting it while it is in flight.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use rand::RngExt;
use tower::Service;

use crate::backend::{Backend, Endpoint};
use crate::body::{BoxFuture, ProxyBody, boxed};
use crate::error::{ErrorKind, ProxyError};
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
}

/// Sends each request to one endpoint of a backend, chosen by weight.
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
            let endpoint = backend.with_endpoints(|set| {
                pick_weighted(&set.endpoints, set.total_weight, |e| e.weight).cloned()
            });
            let Some(endpoint) = endpoint else {
                return Err(ProxyError::new(ErrorKind::NoEndpoint).at_backend(&backend.name));
            };
            endpoint.stats.requests.fetch_add(1, Ordering::Relaxed);
            let in_flight = InFlight::start(endpoint.clone());
            match pool::send(&endpoint.connections, endpoint.addr, &backend.pool, request).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    parts.extensions.insert(Upstream {
                        backend: backend.name.clone(),
                        endpoint: endpoint.addr,
                    });
                    let body = InFlightBody {
                        inner: body,
                        _in_flight: in_flight,
                    };
                    Ok(Response::from_parts(parts, boxed(body)))
                }
                Err(kind) => {
                    if matches!(
                        kind,
                        ErrorKind::ConnectFailed(_)
                            | ErrorKind::ConnectTimeout(_)
                            | ErrorKind::UpstreamReset(_)
                    ) {
                        endpoint.stats.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(ProxyError::new(kind)
                        .at_backend(&backend.name)
                        .at_endpoint(endpoint.addr))
                }
            }
        })
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

/// A response body that keeps its request counted as in flight until the
/// body is finished or dropped.
struct InFlightBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Body for InFlightBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
}
