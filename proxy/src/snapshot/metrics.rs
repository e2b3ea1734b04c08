//! The families the snapshot layer counts in, and those it hands to what
//! it builds: the transport, backend and route layers' own.

use prometheus::IntCounterVec;

use crate::core::metrics::Registry;

/// The metric families a snapshot's build needs.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// `infermesh_authorization_decisions_total{listener,result,policy}`:
    /// requests allowed or denied by authorization policies (`policy` is
    /// the deciding policy; empty for a denial by no allow policy matching).
    pub authorization_decisions: IntCounterVec,
    /// The transport layer's (TLS handshakes).
    pub transport: crate::transport::Metrics,
    /// The backend layer's.
    pub backend: crate::backend::Metrics,
    /// The route layer's.
    pub route: crate::route::Metrics,
}

impl Metrics {
    /// Registers the families of this layer and of the layers below in
    /// `registry`.
    pub(crate) fn register(registry: &Registry) -> Self {
        Metrics {
            authorization_decisions: registry.counter(
                "infermesh_authorization_decisions_total",
                "Requests allowed or denied by authorization policies, by listener and deciding policy.",
                &["listener", "result", "policy"],
            ),
            transport: crate::transport::Metrics::register(registry),
            backend: crate::backend::Metrics::register(registry),
            route: crate::route::Metrics::register(registry),
        }
    }
}
