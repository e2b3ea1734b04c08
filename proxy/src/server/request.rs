//! What happens to each request a listener accepts, in named phases:
//!
//! 1. **check**: one unambiguous host (400 `invalid_host`), a method the
//!    proxy serves (405 `method_not_allowed` for `CONNECT`), and the path
//!    normalised ([`crate::core::path`]; 400 `invalid_path`), so that
//!    every later phase and the backend read the same path;
//! 2. **authorize**: the listener's authorization policies decide by the
//!    caller's SPIFFE identity and the request (403 `unauthorized`);
//! 3. **read the model**: when the listener's rules match on models, the
//!    model a JSON body names is read first, from at most its first
//!    64 KiB ([`crate::core::model`]);
//! 4. **route**: find the listener's most specific rule for the request;
//!    on a sidecar's capture listeners, then the connection's original
//!    destination: a backend that has this address, or the destination
//!    itself (the app inbound, a server outside the mesh outbound, unless
//!    blocked: 502 `outside_mesh`); 404 `no_route` when nothing matches;
//! 5. **forward**: send it through the rule's stack
//!    ([`crate::route::stack`]): rate limit, timeouts, forwarded headers,
//!    upgrades, retries, backend split, balancing and the upstream pool;
//! 6. **respond**: a failure made by the proxy becomes its error response,
//!    in the error shape of the client's API ([`crate::server::respond`]);
//! 7. **observe**: the response body is wrapped so that the access log line
//!    and the request metrics are written when it ends
//!    ([`crate::server::access_log`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use std::borrow::Cow;

use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use infermesh_api::{EscapedSlashes, OutsideMesh};

use crate::core::body::{BoxFuture, ProxyBody, boxed, counting_request_bytes};
use crate::core::context::{ConnectionInfo, RequestContext};
use crate::core::error::{ErrorKind, ProxyError};
use crate::core::headers::{X_REQUEST_ID, ensure_request_id};
use crate::core::{authority, model, path};
use crate::route::stack::RuleStack;
use crate::server::access_log::RequestRecord;
use crate::server::lifetime::Lifetime;
use crate::server::original::OriginalDestination;
use crate::server::respond::{Dialect, error_response};
use crate::server::shared::Shared;
use crate::snapshot::{ListenerEntry, Snapshot};

/// The hyper service of one client connection: every request it carries
/// goes through the phases of the module docs.
#[derive(Clone)]
pub(crate) struct RequestService {
    shared: Arc<Shared>,
    connection: Arc<ConnectionInfo>,
    original: Option<Arc<OriginalDestination>>,
    lifetime: Arc<Lifetime>,
}

/// Where the route phase sends a request.
enum Destination {
    /// A route rule, or the default rule of a backend found by address;
    /// and the model of the route match that matched, if it names one.
    Rule(Arc<RuleStack>, Option<Arc<str>>),
    /// The connection's original destination.
    Original(Arc<OriginalDestination>),
    /// Nowhere: the destination is outside the mesh, and blocked.
    Blocked(SocketAddr),
}

impl RequestService {
    /// Serves requests arriving on `connection`. On a capture listener,
    /// `original` forwards the requests that nothing else routes to the
    /// connection's original destination. Each request reports to the
    /// connection's `lifetime`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        connection: Arc<ConnectionInfo>,
        original: Option<Arc<OriginalDestination>>,
        lifetime: Arc<Lifetime>,
    ) -> Self {
        RequestService {
            shared,
            connection,
            original,
            lifetime,
        }
    }

    /// Phase route: where a request goes, if anywhere.
    fn route<B>(
        &self,
        request: &Request<B>,
        snapshot: &Snapshot,
        listener: &ListenerEntry,
    ) -> Option<Destination> {
        if let Some((rule, model)) = listener.router.route_with_model(request) {
            return Some(Destination::Rule(rule.clone(), model.cloned()));
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
                return Some(Destination::Rule(backend.clone(), None));
            }
            // Decided per request, by the listener as configured now.
            if listener.outside_mesh == OutsideMesh::Blocked {
                count("blocked");
                return Some(Destination::Blocked(destination));
            }
            count("passthrough");
        }
        self.original.clone().map(Destination::Original)
    }
}

/// Phase check: the request's host is one and unambiguous, its method one
/// the proxy serves, and its path normalised in place (the query kept).
fn check(
    request: &mut Request<ProxyBody>,
    escaped_slashes: EscapedSlashes,
) -> Result<(), ErrorKind> {
    if request.method() == Method::CONNECT {
        return Err(ErrorKind::MethodNotAllowed(Method::CONNECT));
    }
    authority::check(request).map_err(ErrorKind::InvalidHost)?;
    let uri = request.uri();
    // `OPTIONS *` asks about the server, not a path.
    if uri.path() == "*" && request.method() == Method::OPTIONS {
        return Ok(());
    }
    let Cow::Owned(normal) =
        path::normalize(uri.path(), escaped_slashes).map_err(ErrorKind::InvalidPath)?
    else {
        return Ok(());
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).expect("a normalised path is a valid path"));
    *request.uri_mut() = Uri::from_parts(parts).expect("the URI's own parts make a URI");
    Ok(())
}

impl hyper::service::Service<Request<Incoming>> for RequestService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let stream = self
            .lifetime
            .start_stream(request.version() == http::Version::HTTP_2);
        let snapshot = self.shared.snapshot.load_full();
        let has_body = !http_body::Body::is_end_stream(request.body());
        let context = RequestContext::new(self.connection.clone());
        // The body's bytes are counted as they are read from the client,
        // for the access log and the size histogram; a request without a
        // body is not wrapped.
        let mut request = if has_body {
            let tally = context.clone();
            request.map(|body| counting_request_bytes(body, tally))
        } else {
            request.map(boxed)
        };
        // Held by the request's future, so the routing phase finds it
        // without a second lookup.
        let listener_entry = snapshot.listener_entry(self.connection.listener);
        let listener = listener_entry.as_deref();
        // Phase: check.
        let escaped_slashes = listener.map_or(EscapedSlashes::default(), |l| l.escaped_slashes);
        let refused = check(&mut request, escaped_slashes).err();
        // Before anything can fail: every answer, log line and upstream
        // attempt carries the id.
        let request_id = ensure_request_id(request.headers_mut());
        let dialect = Dialect::of(&request);
        request.extensions_mut().insert(context.clone());
        let mut record = RequestRecord::start(
            &request,
            started,
            listener.map(|l| l.name.clone()),
            request_id.clone(),
            context,
            self.shared.clone(),
        );
        if let Some(tracing) = &self.shared.tracing {
            let span = tracing.request_span(&request, started, &self.connection, &request_id);
            request.extensions_mut().insert(span.request_trace());
            record.traced(span);
        }

        // Phase: authorize.
        let denied = refused.or_else(|| {
            listener
                .and_then(|l| l.authorization.as_ref())
                .and_then(|a| {
                    a.check(&request, self.connection.peer_identity.as_deref())
                        .err()
                })
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
            let destination = match listener_entry.as_deref() {
                Some(listener) if denied.is_none() => this.route(&request, &snapshot, listener),
                _ => None,
            };
            // Phase: forward.
            let forwarded = match destination {
                Some(Destination::Rule(stack, model)) => {
                    record.set_route(stack.route.clone(), stack.in_flight.clone());
                    record.set_model(snapshot.model_label(model, &request));
                    Ok((stack.route.clone(), stack.send(request)))
                }
                Some(Destination::Original(original)) => {
                    let route = original.name().clone();
                    // The original destination's pseudo-route (a sidecar's
                    // passthrough): looked up per request, as it has no
                    // stack of its own.
                    let in_flight = this
                        .shared
                        .metrics
                        .snapshot
                        .route
                        .requests_in_flight
                        .with_label_values(&[&*route]);
                    record.set_route(route.clone(), in_flight);
                    record.set_model(snapshot.model_label(None, &request));
                    Ok((route, original.send(request)))
                }
                Some(Destination::Blocked(destination)) => Err(ErrorKind::OutsideMesh(destination)),
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
                        if has_body {
                            this.lifetime.linger_on_close();
                        }
                        error_response(&error, Some(&route), Some(&request_id), dialect)
                    }
                },
                Err(kind) => {
                    if has_body {
                        this.lifetime.linger_on_close();
                    }
                    let error = ProxyError::new(kind);
                    record.failed(&error);
                    error_response(&error, None, Some(&request_id), dialect)
                }
            };
            // The snapshot stays alive until the response head is out.
            drop(snapshot);
            // Phase: observe.
            let mut response = response;
            if !response.headers().contains_key(&X_REQUEST_ID) {
                response
                    .headers_mut()
                    .insert(X_REQUEST_ID.clone(), request_id);
            }
            Ok(record.observe(response, stream, dialect))
        })
    }
}
