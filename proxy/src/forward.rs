//! The service stack every request a route rule matches goes through,
//! built once per rule when a config is applied. The `forward` action:
//!
//! ```text
//! rate limit ─► timeouts ─► forwarded headers ─► upgrade ─► mirror ─► retry
//!            ─► backend split ─► balance (breaker, endpoint pick) ─► pool
//! ```
//!
//! The `fanout` action ([`crate::fanout`]) shares the top of the stack:
//!
//! ```text
//! rate limit ─► timeouts ─► forwarded headers ─► fanout ─► N × balance ─► pool
//! ```
//!
//! Retries sit above the split and the balancer, so that each attempt
//! picks its endpoint afresh (avoiding the ones that failed) and counts
//! against the limits of the backend it lands on. The rule's timeouts sit
//! above the retries: they bound the request as the client sees it, all
//! attempts included.

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
use crate::fanout::{Branch, Fanout};
use crate::headers;
use crate::metrics::Metrics;
use crate::mirror::MirrorLayer;
use crate::rate_limit::{RateLimitLayer, TokenBucket};
use crate::retry::{Retries, RetryLayer};
use crate::timeout::{Limits, TimeoutLayer};
use crate::upgrade::UpgradeLayer;

/// The service a rule's requests go through.
pub type RuleService = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;

/// Builds the stack of a rule of `route`. Every backend it names must be
/// in `backends` (a validated config guarantees it).
pub fn rule_service(
    rule: &RouteRule,
    route: &Arc<str>,
    backends: &BTreeMap<String, Arc<Backend>>,
    metrics: &Metrics,
) -> RuleService {
    let mut limits = Limits::from_config(&rule.timeouts);
    // A fan-out answers with what has arrived at its deadline, into which
    // the rule's limits on the time to the answer are folded: they must not
    // cut the fan-out off above it.
    if rule.fanout.is_some() {
        limits.response_headers = None;
        limits.first_event = None;
    }
    let rate_limit = rule.rate_limit.map(|limit| {
        RateLimitLayer::new(TokenBucket::new(
            limit.requests_per_second,
            limit.burst(),
            metrics.rate_limited.with_label_values(&[&**route]),
        ))
    });
    let top = ServiceBuilder::new()
        .option_layer(rate_limit)
        .layer(TimeoutLayer::new(limits))
        .map_request(headers::forward_request)
        .map_response(headers::forward_response);
    if let Some(fanout) = &rule.fanout {
        let branches = fanout
            .branches
            .iter()
            .map(|b| Branch {
                name: Arc::from(b.name.as_str()),
                service: BoxCloneSyncService::new(Balance::new(backends[&b.backend].clone())),
                model: b.model.as_deref().map(Arc::from),
                path: b.path.as_deref().map(Arc::from),
                timeout: b.timeout.non_zero(),
                required: b.required,
                weight: b.weight,
            })
            .collect();
        return BoxCloneSyncService::new(top.service(Fanout::new(
            fanout,
            rule.fanout_deadline(),
            branches,
            route,
            metrics,
        )));
    }
    let split = Split::new(
        rule.backends
            .iter()
            .map(|r| (Balance::new(backends[&r.name].clone()), r.weight))
            .collect(),
    );
    let mirror = rule.mirror.as_ref().map(|mirror| {
        let shadow = ServiceBuilder::new()
            .layer(TimeoutLayer::new(limits))
            .service(Balance::new(backends[&mirror.backend].clone()));
        MirrorLayer::new(
            BoxCloneSyncService::new(shadow),
            &mirror.backend,
            mirror.percent,
            metrics,
        )
    });
    BoxCloneSyncService::new(
        top.layer(UpgradeLayer)
            .option_layer(mirror)
            .layer(RetryLayer::new(Retries::new(
                &rule.retry,
                rule.hedge.as_ref(),
                route,
                metrics,
            )))
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
