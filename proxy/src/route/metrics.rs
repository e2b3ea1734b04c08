//! The route layer's metric families: what a rule's stack counts of its
//! requests in flight, rate limit, retries, hedges, mirrored copies and
//! fan-outs.

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};

use crate::core::metrics::Registry;

/// The route layer's metric families.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// `infermesh_requests_in_flight{route}`: requests that matched the
    /// route and have not finished, streamed response bodies included
    /// (Envoy's `downstream_rq_active`, per route): what an autoscaler
    /// (HPA, KEDA) reads. Each rule stack holds its route's gauge, resolved
    /// when the stack is built, so a request pays no label lookup for it.
    pub requests_in_flight: IntGaugeVec,
    /// `infermesh_rate_limited_total{route}`: requests refused by a rule's
    /// rate limit.
    pub rate_limited: IntCounterVec,
    /// `infermesh_retries_total{route,reason}`: retries made, by the
    /// failure that caused them.
    pub retries: IntCounterVec,
    /// `infermesh_retry_budget_exhausted_total{route}`: retries not made
    /// because the rule's retry budget was spent.
    pub retry_budget_exhausted: IntCounterVec,
    /// `infermesh_hedges_total{route,outcome}`: hedged attempts `sent`, and
    /// of those `won` (their answer was used) or `refused` by the backend
    /// (no other endpoint, or a limit); hedges that were due but not sent
    /// for lack of budget (`budget_exhausted`) or because the request could
    /// not be sent again (`not_replayable`).
    pub hedges: IntCounterVec,
    /// `infermesh_mirrored_requests_total{backend,result}`: copies sent to
    /// a mirror backend, by result: `completed`, `failed`, or `abandoned`
    /// (the copy could not keep up with the request body).
    pub mirrored_requests: IntCounterVec,
    /// `infermesh_fanout_branches_total{route,branch,outcome}`: fan-out
    /// branches by what became of them: `used`, `unused`, `failed`,
    /// `timeout`, `cancelled` (decided without them), `deadline`.
    pub fanout_branches: IntCounterVec,
    /// `infermesh_fanout_duration_seconds{route,strategy}`: from request
    /// arrival to the fan-out's decision.
    pub fanout_duration: HistogramVec,
    /// `infermesh_fanout_answers_total{route,decision}`: fan-outs by how
    /// they were decided: `all` (every branch finished), `quorum` (enough
    /// answered first: a quorum, a majority, the first success),
    /// `deadline`, `failed`, or `abandoned` (dropped before a decision: the
    /// client went away, or the rule's total limit cut it).
    pub fanout_answers: IntCounterVec,
}

impl Metrics {
    /// Registers the route layer's families in `registry`.
    pub(crate) fn register(registry: &Registry) -> Self {
        Metrics {
            requests_in_flight: registry.gauge(
                "infermesh_requests_in_flight",
                "Requests that matched the route and have not finished (their response bodies included), by route.",
                &["route"],
            ),
            rate_limited: registry.counter(
                "infermesh_rate_limited_total",
                "Requests refused by a route's local rate limit.",
                &["route"],
            ),
            retries: registry.counter(
                "infermesh_retries_total",
                "Retries made, by route and the failure that caused them.",
                &["route", "reason"],
            ),
            retry_budget_exhausted: registry.counter(
                "infermesh_retry_budget_exhausted_total",
                "Retries not made because the route's retry budget was spent.",
                &["route"],
            ),
            hedges: registry.counter(
                "infermesh_hedges_total",
                "Hedged attempts sent, won and refused by the backend, and hedges not sent (budget_exhausted, not_replayable), by route.",
                &["route", "outcome"],
            ),
            mirrored_requests: registry.counter(
                "infermesh_mirrored_requests_total",
                "Request copies for mirror backends, by result (completed, failed, abandoned).",
                &["backend", "result"],
            ),
            fanout_branches: registry.counter(
                "infermesh_fanout_branches_total",
                "Fan-out branches by route, branch and outcome (used, unused, failed, timeout, cancelled, deadline).",
                &["route", "branch", "outcome"],
            ),
            fanout_duration: registry.latency(
                "infermesh_fanout_duration_seconds",
                "Time from request arrival to the fan-out's decision, by route and strategy.",
                &["route", "strategy"],
            ),
            fanout_answers: registry.counter(
                "infermesh_fanout_answers_total",
                "Fan-outs by route and how they were decided (all, quorum, deadline, failed, abandoned).",
                &["route", "decision"],
            ),
        }
    }
}
