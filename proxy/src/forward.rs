//! The `forward` action of a route rule: the service stack every request
//! the rule matches goes through, built once per rule when a config is
//! applied.
//!
//! ```text
//! timeouts ─► forwarded headers ─► upgrade ─► backend split ─► balance ─► pool
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use infermesh_api::RouteRule;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use crate::backend::Backend;
use crate::balance::{Balance, pick_weighted};
use crate::body::{BoxFuture, ProxyBody};
use crate::error::ProxyError;
use crate::headers;
use crate::timeout::{Limits, TimeoutLayer};
use crate::upgrade::UpgradeLayer;

/// The service a rule's requests go through.
pub type RuleService = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;

/// Builds the stack of `rule`. Every backend it names must be in
/// `backends` (a validated config guarantees it).
pub fn rule_service(rule: &RouteRule, backends: &BTreeMap<String, Arc<Backend>>) -> RuleService {
    let split = Split::new(
        rule.backends
            .iter()
            .map(|r| (Balance::new(backends[&r.name].clone()), r.weight))
            .collect(),
    );
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(TimeoutLayer::new(Limits::from_config(&rule.timeouts)))
            .map_request(headers::forward_request)
            .map_response(headers::forward_response)
            .layer(UpgradeLayer)
            .service(split),
    )
}

/// Sends each request to one of several backends, picked by weight.
#[derive(Clone, Debug)]
pub struct Split {
    backends: Arc<[(Balance, u32)]>,
    total_weight: u64,
}

impl Split {
    /// Splits over `backends`, each with its weight.
    pub fn new(backends: Vec<(Balance, u32)>) -> Self {
        let total_weight = backends.iter().map(|(_, w)| u64::from(*w)).sum();
        Split {
            backends: backends.into(),
            total_weight,
        }
    }
}

impl Service<Request<ProxyBody>> for Split {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let (balance, _) = pick_weighted(&self.backends, self.total_weight, |(_, w)| *w)
            .expect("validation refuses rules whose backend weights are all 0");
        balance.clone().call(request)
    }
}
