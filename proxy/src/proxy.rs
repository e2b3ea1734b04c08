//! What happens to each request a listener accepts, in named phases:
//!
//! 1. **authorize**: the listener's authorization policies decide by the
//!    caller's SPIFFE identity and the request (403 `unauthorized`);
//! 2. **route**: find the listener's most specific rule for the request
//!    (404 `no_route` when none matches);
//! 3. **forward**: run the rule's service stack ([`crate::forward`]):
//!    timeouts, forwarded headers, upgrades, backend split, balancing and
//!    the upstream pool;
//! 4. **respond**: a failure made by the proxy becomes its error response
//!    (`x-infermesh-error` and a JSON body);
//! 5. **observe**: the response body is wrapped so that the access log line
//!    and the request metrics are written when it ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::access_log::RequestRecord;
use crate::body::{BoxFuture, ProxyBody, boxed};
use crate::error::{ErrorKind, ProxyError};
use crate::lifecycle::Lifecycle;
use crate::listener::ConnectionInfo;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// State shared by every connection and the tasks that manage the proxy.
pub struct Shared {
    /// The serving configuration.
    pub snapshot: ArcSwap<Snapshot>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Readiness and drain state.
    pub lifecycle: Lifecycle,
}

/// The hyper service of one client connection.
#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
    connection: Arc<ConnectionInfo>,
}

impl ProxyService {
    /// Serves requests arriving on `connection`.
    pub fn new(shared: Arc<Shared>, connection: Arc<ConnectionInfo>) -> Self {
        ProxyService { shared, connection }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let snapshot = self.shared.snapshot.load_full();
        let mut request = request.map(boxed);
        request.extensions_mut().insert(self.connection.clone());
        let listener = snapshot.listener(self.connection.listener);
        let mut record = RequestRecord::start(
            &request,
            started,
            self.connection.client,
            self.connection.peer_identity.clone(),
            listener.map(|l| l.name.clone()),
            self.shared.metrics.clone(),
        );

        // Phase: authorize.
        let denied = listener
            .and_then(|l| l.authorization.as_ref())
            .and_then(|a| {
                a.check(&request, self.connection.peer_identity.as_deref())
                    .err()
            });
        // Phase: route.
        let target = match denied {
            None => listener.and_then(|l| l.router.route(&request)).cloned(),
            Some(_) => None,
        };
        // Phase: forward.
        let forwarded = target.as_ref().map(
            |target| -> BoxFuture<Result<Response<ProxyBody>, ProxyError>> {
                record.set_route(target.route.clone());
                Box::pin(target.service.clone().oneshot(request))
            },
        );
        Box::pin(async move {
            // Phase: respond.
            let response = match (denied, target, forwarded) {
                (Some(denied), _, _) => {
                    let error = ProxyError::new(denied);
                    record.failed(&error);
                    error.to_response(None)
                }
                (None, Some(target), Some(forwarded)) => match forwarded.await {
                    Ok(response) => {
                        record.responded(&response);
                        response
                    }
                    Err(error) => {
                        record.failed(&error);
                        error.to_response(Some(&target.route))
                    }
                },
                _ => {
                    let error = ProxyError::new(ErrorKind::NoRoute);
                    record.failed(&error);
                    error.to_response(None)
                }
            };
            // The snapshot stays alive until the response head is out.
            drop(snapshot);
            // Phase: observe.
            Ok(record.observe(response))
        })
    }
}
