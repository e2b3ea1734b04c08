//! A capture listener's fallback: forwarding a connection's requests to
//! its original destination (the app, inbound; a server outside the mesh,
//! outbound) through a rule stack of that one endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use infermesh_api::{BackendSpec, EndpointSpec, RetryPolicy, RouteTimeouts, UpstreamProtocol};
use tokio::sync::OnceCell;

use crate::backend::Backend;
use crate::core::body::{BoxFuture, ProxyBody};
use crate::core::error::ProxyError;
use crate::core::headers::take_original_protocol;
use crate::route::stack::{RuleStack, default_rule};
use crate::server::shared::Shared;
use crate::transport::connect::TcpConnector;

/// The service that forwards one connection's requests to its original
/// destination, made at the first request of each HTTP version: a backend
/// of that one endpoint, speaking the version the app that made the request
/// spoke ([`crate::core::headers::ORIGINAL_PROTOCOL`]), without retries or timeouts (the caller,
/// or the sidecar that called, sets those).
pub(crate) struct OriginalDestination {
    destination: SocketAddr,
    /// The name logs and metrics give it (`inbound` or `passthrough`).
    name: Arc<str>,
    shared: Arc<Shared>,
    http1: OnceCell<Arc<RuleStack>>,
    http2: OnceCell<Arc<RuleStack>>,
}

impl OriginalDestination {
    /// Forwards to `destination`, under `name` in logs and metrics.
    pub(crate) fn new(destination: SocketAddr, name: &str, shared: Arc<Shared>) -> Self {
        OriginalDestination {
            destination,
            name: Arc::from(name),
            shared,
            http1: OnceCell::new(),
            http2: OnceCell::new(),
        }
    }

    /// The name logs and metrics give it.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Sends `request` to the destination.
    pub(crate) fn send(
        self: Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>> {
        let protocol = take_original_protocol(&mut request);
        Box::pin(async move {
            let stack = self.stack(protocol).await;
            stack.send(request).await
        })
    }

    /// The destination's rule stack for requests in `protocol`.
    async fn stack(&self, protocol: UpstreamProtocol) -> Arc<RuleStack> {
        let cell = match protocol {
            UpstreamProtocol::Http1 => &self.http1,
            UpstreamProtocol::Http2 => &self.http2,
        };
        cell.get_or_init(|| async {
            let spec = BackendSpec {
                endpoints: vec![EndpointSpec {
                    address: self.destination.to_string(),
                    weight: 1,
                    identity: None,
                }],
                protocol,
                ..BackendSpec::default()
            };
            let metrics = &self.shared.metrics.snapshot;
            let connector = Arc::new(TcpConnector::plain());
            let backend = Backend::new(&self.name, spec, None, &metrics.backend, connector).await;
            let mut rule = default_rule(&self.name);
            rule.retry = RetryPolicy {
                max_retries: 0,
                ..RetryPolicy::default()
            };
            rule.timeouts = RouteTimeouts {
                response_headers: infermesh_api::Duration::ZERO,
                first_event: infermesh_api::Duration::ZERO,
                idle: infermesh_api::Duration::ZERO,
                total: infermesh_api::Duration::ZERO,
            };
            let backends = [(self.name.to_string(), backend)].into_iter().collect();
            Arc::new(RuleStack::build(
                &rule,
                &self.name,
                &backends,
                &metrics.route,
                None,
            ))
        })
        .await
        .clone()
    }
}
