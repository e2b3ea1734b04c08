//! A route rule's service stack, built once per rule when a config is
//! applied. The `forward` action:
//!
//! ```text
//! rate limit ─► timeouts ─► forwarded headers ─► upgrade ─► mirror ─► retry
//!            ─► backend split ─► balance (breaker, endpoint pick) ─► pool
//! ```
//!
//! The `fanout` action ([`crate::route::fanout`]) shares the top of the
//! stack:
//!
//! ```text
//! rate limit ─► timeouts ─► forwarded headers ─► fanout ─► N × balance ─► pool
//! ```
//!
//! The order is the design. The rate limit is first, so a refused request
//! costs nothing and is never retried. The rule's timeouts sit above the
//! retries: they bound the request as the client sees it, all attempts
//! included. Retries sit above the split and the balancer, so that each
//! attempt picks its backend and endpoint afresh (avoiding the ones that
//! failed) and counts against the limits of the backend it lands on.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Request, Response};
use infermesh_api::{BackendRef, RetryPolicy, RouteRule, UpstreamProtocol};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use crate::backend::Backend;
use crate::backend::balance::Balance;
use crate::core::body::{BoxFuture, ProxyBody};
use crate::core::error::ProxyError;
use crate::core::headers;
use crate::route::fanout::{Branch, Fanout};
use crate::route::hedge::HedgeState;
use crate::route::metrics::Metrics;
use crate::route::mirror::MirrorLayer;
use crate::route::rate_limit::{RateLimitLayer, TokenBucket};
use crate::route::retry::{Retries, RetryLayer};
use crate::route::split::Split;
use crate::route::timeout::{Limits, TimeoutLayer};
use crate::route::upgrade::UpgradeLayer;

/// The service a rule's requests go through.
pub(crate) type RuleService =
    BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;

/// A rule, built: the name of its route (for logs and metrics) and its
/// service stack.
pub(crate) struct RuleStack {
    /// The route's `metadata.name`.
    pub route: Arc<str>,
    /// The rule's service stack.
    pub service: RuleService,
    /// The route's `infermesh_requests_in_flight`.
    pub in_flight: prometheus::IntGauge,
    /// What its policies have built up, for the next config's stack of the
    /// same rule.
    pub state: RuleState,
}

/// What a rule's stack carries from one config to the next: the state its
/// policies build up as requests pass, the rate limit's bucket and the
/// hedging's budget and observed latencies. Built afresh instead, every
/// config change (any, most of them to other routes) would hand every
/// client a full burst past the rate limit and every hedging rule a full
/// budget of hedges. A policy whose settings changed starts afresh,
/// except the hedging budget, which is kept (see
/// [`crate::route::hedge::Hedging::continue_from`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleState {
    /// The rate limit's bucket, when the rule has a rate limit.
    pub rate_limit: Option<Arc<TokenBucket>>,
    /// The hedging's budget and observations, when the rule hedges.
    pub hedge: Option<Arc<HedgeState>>,
}

impl RuleStack {
    /// Builds the stack of `rule`, a rule of `route`, going on from
    /// `previous`, the state of the same rule under the config before (if
    /// it had one). Every backend it names must be in `backends` (a
    /// validated config guarantees it).
    pub(crate) fn build(
        rule: &RouteRule,
        route: &Arc<str>,
        backends: &BTreeMap<String, Arc<Backend>>,
        metrics: &Metrics,
        previous: Option<&RuleState>,
    ) -> Self {
        let (service, state) = rule_service(rule, route, backends, metrics, previous);
        RuleStack {
            route: route.clone(),
            service,
            in_flight: metrics.requests_in_flight.with_label_values(&[&**route]),
            state,
        }
    }

    /// Sends `request` through the stack. Called without waiting for
    /// readiness: every layer of a rule's stack is always ready, since
    /// each decides on admission per request, in `call`, and answers a
    /// refusal as an error (the rate limit, the circuit breaker); a layer
    /// that had to wait would say so in `poll_ready`, which the tests
    /// check (`every_layer_of_a_stack_is_always_ready`).
    pub(crate) fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>> {
        self.service.clone().call(request)
    }
}

/// The service stack of `rule`, and the state it starts from: `previous`'s
/// where the policy is the same.
fn rule_service(
    rule: &RouteRule,
    route: &Arc<str>,
    backends: &BTreeMap<String, Arc<Backend>>,
    metrics: &Metrics,
    previous: Option<&RuleState>,
) -> (RuleService, RuleState) {
    let mut limits = Limits::from_config(&rule.timeouts);
    // A fan-out answers with what has arrived at its deadline, into which
    // the rule's limits on the time to the answer are folded: they must not
    // cut the fan-out off above it.
    if rule.fanout.is_some() {
        limits.response_headers = None;
        limits.first_event = None;
    }
    let bucket = rule.rate_limit.map(|limit| {
        let (rate, burst) = (limit.requests_per_second, limit.burst());
        match previous.and_then(|p| p.rate_limit.as_ref()) {
            Some(bucket) if bucket.has_limit(rate, burst) => bucket.clone(),
            _ => Arc::new(TokenBucket::new(
                rate,
                burst,
                metrics.rate_limited.with_label_values(&[&**route]),
            )),
        }
    });
    let mut state = RuleState {
        rate_limit: bucket.clone(),
        hedge: None,
    };
    let top = ServiceBuilder::new()
        .option_layer(bucket.map(RateLimitLayer::new))
        .layer(TimeoutLayer::new(limits))
        .map_request(headers::to_upstream)
        .map_response(headers::to_downstream);
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
        let fanout = Fanout::new(fanout, rule.fanout_deadline(), branches, route, metrics);
        return (BoxCloneSyncService::new(top.service(fanout)), state);
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
    let http2_upstream = rule
        .backends
        .iter()
        .any(|r| backends[&r.name].pool.protocol == UpstreamProtocol::Http2);
    let retries = Retries::new(
        &rule.retry,
        rule.hedge.as_ref(),
        route,
        metrics,
        http2_upstream,
    )
    .continue_hedging_from(previous.and_then(|p| p.hedge.as_ref()));
    state.hedge = retries.hedge_state().cloned();
    let service = BoxCloneSyncService::new(
        top.layer(UpgradeLayer)
            .option_layer(mirror)
            .layer(RetryLayer::new(retries))
            .service(split),
    );
    (service, state)
}

/// A rule that sends every request to `backend`, with every default: what
/// a request to one of a backend's addresses goes through.
pub(crate) fn default_rule(backend: &str) -> RouteRule {
    RouteRule {
        matches: Vec::new(),
        backends: vec![BackendRef {
            name: backend.to_owned(),
            weight: 1,
        }],
        timeouts: Default::default(),
        retry: RetryPolicy::default(),
        mirror: None,
        rate_limit: None,
        hedge: None,
        fanout: None,
    }
}
