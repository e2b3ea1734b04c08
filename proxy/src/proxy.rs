//! What happens to each request a listener accepts, in named phases:
//!
//! 1. **authorize**: the listener's authorization policies decide by the
//!    caller's SPIFFE identity and the request (403 `unauthorized`);
//! 2. **route**: find the listener's most specific rule for the request
//!    (when the listener's rules match on models, the model a JSON body
//!    names is read first, from at most its first 64 KiB: [`crate::model`]);
//!    on a sidecar's capture listeners, then the connection's original
//!    destination: a backend that has this address, or the destination
//!    itself (the app inbound, a server outside the mesh outbound, unless
//!    blocked: 502 `outside_mesh`); 404 `no_route` when nothing matches;
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
use crate::capture::OriginalDestination;
use crate::error::{ErrorKind, ProxyError};
use crate::lifecycle::Lifecycle;
use crate::listener::ConnectionInfo;
use crate::metrics::Metrics;
use crate::model;
use crate::snapshot::{ListenerEntry, RuleTarget, Snapshot};
use infermesh_api::OutsideMesh;

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
    original: Option<Arc<OriginalDestination>>,
}

impl ProxyService {
    /// Serves requests arriving on `connection`. On a capture listener,
    /// `original` forwards the requests that nothing else routes to the
    /// connection's original destination.
    pub fn new(
        shared: Arc<Shared>,
        connection: Arc<ConnectionInfo>,
        original: Option<Arc<OriginalDestination>>,
    ) -> Self {
        ProxyService {
            shared,
            connection,
            original,
        }
    }

    /// Phase route: where a request goes, if anywhere.
    fn route<B>(
        &self,
        request: &Request<B>,
        snapshot: &Snapshot,
        listener: &ListenerEntry,
    ) -> Option<Target> {
        if let Some(rule) = listener.router.route(request) {
            return Some(Target::Rule(rule.clone()));
        }
        let destination = self.connection.original_destination?;
        let count = |action: &str| {
            self.shared
                .metrics
                .outside_mesh
                .with_label_values(&[&*listener.name, "http", action])
                .inc();
        };
        if listener.is_outbound_capture() {
            if let Some(backend) = snapshot.by_address(destination) {
                return Some(Target::Rule(backend.clone()));
            }
            // Decided per request, by the listener as configured now.
            if listener.outside_mesh == OutsideMesh::Blocked {
                count("blocked");
                return Some(Target::Blocked(destination));
            }
            count("passthrough");
        }
        self.original.clone().map(Target::Original)
    }
}

/// Sends `request` through a rule's service stack. (A plain function: the
/// boxed future's type does not name the service's, which rustc cannot yet
/// prove `Send` inside an async block.)
pub(crate) fn forward(
    target: &RuleTarget,
    request: Request<ProxyBody>,
) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>> {
    Box::pin(target.service.clone().oneshot(request))
}

/// Where a request goes.
enum Target {
    /// A route rule, or the default rule of a backend found by address.
    Rule(Arc<RuleTarget>),
    /// The connection's original destination.
    Original(Arc<OriginalDestination>),
    /// Nowhere: the destination is outside the mesh, and blocked.
    Blocked(std::net::SocketAddr),
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
        let read_model = denied.is_none()
            && listener.is_some_and(|l| l.router.matches_models())
            && model::may_be_in_body(&request);
        let this = self.clone();
        Box::pin(async move {
            // Phase: read the model a body names, for rules matching on it.
            let request = if read_model {
                model::read_body_model(request).await
            } else {
                request
            };
            // Phase: route.
            let target = match snapshot.listener(this.connection.listener) {
                Some(listener) if denied.is_none() => this.route(&request, &snapshot, listener),
                _ => None,
            };
            // Phase: forward.
            let forwarded = match target {
                Some(Target::Rule(target)) => {
                    record.set_route(target.route.clone());
                    Ok((target.route.clone(), forward(&target, request)))
                }
                Some(Target::Original(original)) => {
                    let route = original.name().clone();
                    record.set_route(route.clone());
                    Ok((route, original.forward(request)))
                }
                Some(Target::Blocked(destination)) => Err(ErrorKind::OutsideMesh(destination)),
                None => Err(denied.unwrap_or(ErrorKind::NoRoute)),
            };
            // Phase: respond.
            let response = match forwarded {
                Ok((route, forwarded)) => match forwarded.await {
                    Ok(response) => {
                        record.responded(&response);
                        response
                    }
                    Err(error) => {
                        record.failed(&error);
                        error.to_response(Some(&route))
                    }
                },
                Err(kind) => {
                    let error = ProxyError::new(kind);
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
