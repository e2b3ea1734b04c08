//! How the proxy copes with failing and overloaded model servers: the load
//! balancer, circuit-breaker limits, outlier detection and active health
//! checks of a `Backend`; the retry policy, mirroring and rate limit of a
//! route rule. Defaults follow Envoy's where Envoy has one, and are noted
//! where model traffic asks for something else.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::check::Checker;
use crate::duration::Duration;
use crate::path::FieldPath;

/// How a backend picks an endpoint for each request.
///
/// ```yaml
/// loadBalancer: { policy: leastRequest }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancer {
    /// The balancing algorithm.
    pub policy: BalancePolicy,
}

/// A load-balancing algorithm. Endpoint weights apply to each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BalancePolicy {
    /// The better of two random endpoints by peak-EWMA latency times
    /// requests in flight (Linkerd's default): a slow or busy model server
    /// gets less traffic within a few requests.
    #[default]
    PeakEwma,
    /// The better of two random endpoints by requests in flight (Envoy's
    /// `LEAST_REQUEST`).
    LeastRequest,
    /// Each endpoint in turn, in proportion to its weight.
    RoundRobin,
}

/// Per-backend limits. A request past a limit is refused at once with 503
/// and `x-infermesh-error: overloaded`; nothing queues without bound.
/// The defaults are Envoy's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CircuitBreaker {
    /// Open connections to all endpoints together.
    pub max_connections: u32,
    /// Requests waiting for a connection because `maxConnections` is
    /// reached; 0 refuses a request at once when no connection is free.
    pub max_pending_requests: u32,
    /// Requests in flight (until the response's last byte).
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// Passive health checking: endpoints that keep failing are taken out of
/// the rotation for a while.
///
/// A failure is a 5xx response, a failed connect, a reset or a per-try
/// timeout; a 429 is not (it means busy, and `Retry-After` handles it).
/// After `consecutiveFailures` in a row the endpoint is ejected for
/// `baseEjectionTime` × 2^(ejections so far), at most `maxEjectionTime`;
/// then one probe request is let through, and its outcome restores or
/// ejects the endpoint again. Each `baseEjectionTime` spent healthy forgets
/// one earlier ejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// The first ejection's length.
    pub base_ejection_time: Duration,
    /// The longest ejection.
    pub max_ejection_time: Duration,
    /// At most this share of the endpoints, rounded up (so at least one),
    /// is ejected at once, so part of the backend keeps serving. Envoy's
    /// default is 10, which with the handful of replicas a model usually
    /// has would eject one endpoint at most; hence 50.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// Active health checking: a `GET` of `path` on every endpoint every
/// `interval`. An endpoint failing `unhealthyThreshold` checks in a row is
/// taken out of the rotation until it passes `healthyThreshold` in a row.
/// A check passes on a 2xx answer within `timeout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// The path to request, e.g. `/health` (vLLM) or `/v2/health/ready`
    /// (KServe).
    pub path: String,
    /// Time between two checks of one endpoint.
    #[serde(default = "HealthCheck::default_interval")]
    pub interval: Duration,
    /// How long a check may take.
    #[serde(default = "HealthCheck::default_timeout")]
    pub timeout: Duration,
    /// Failed checks in a row that mark an endpoint unhealthy.
    #[serde(default = "HealthCheck::default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that mark it healthy again.
    #[serde(default = "HealthCheck::default_healthy_threshold")]
    pub healthy_threshold: u32,
}

impl HealthCheck {
    fn default_interval() -> Duration {
        Duration::from_secs(10)
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(1)
    }
    fn default_unhealthy_threshold() -> u32 {
        3
    }
    fn default_healthy_threshold() -> u32 {
        2
    }
}

/// When and how a failed request is tried again, on another endpoint.
///
/// A request is retried only while no byte of a response has gone to the
/// client, and only if its body fit in the replay buffer. Requests with a
/// non-idempotent method (`POST`, `PATCH`) are retried only after failures
/// where nothing reached a model server (`connect-failure`,
/// `refused-stream`) unless `nonIdempotent` is set. Most inference calls
/// are safe to repeat (a chat completion has no side effect beyond its
/// cost), so routes serving them may well set it; a route whose POSTs
/// change state should not.
///
/// Without a `retry` block, a rule retries with these defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 turns retries off.
    pub max_retries: u32,
    /// The failures that are retried.
    pub on: Vec<RetryOn>,
    /// More response status codes that are retried, e.g. `[500]`.
    pub status_codes: Vec<u16>,
    /// gRPC statuses that are retried, read from the response headers or
    /// from trailers that arrive before any response data.
    pub grpc_statuses: Vec<GrpcStatus>,
    /// Retry `POST` and `PATCH` requests after failures that a model server
    /// may have seen (resets, status codes) too.
    pub non_idempotent: bool,
    /// Limit on each attempt's wait for response headers; past it the
    /// attempt counts as a `gateway-error`. `0s`: only the rule's timeouts
    /// apply, and they cover all attempts together.
    pub per_try_timeout: Duration,
    /// Delay before each retry.
    pub backoff: Backoff,
    /// A `Retry-After` on a 429 or 503 is waited out instead of the backoff
    /// when it is at most this long; a longer one is not retried and the
    /// response goes to the client.
    pub max_retry_after: Duration,
    /// Request bodies up to this many bytes are kept to be sent again; a
    /// larger request is forwarded as it streams and never retried.
    pub max_replay_bytes: u64,
    /// Caps retries relative to the requests in flight.
    pub budget: RetryBudget,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 2,
            on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Reset,
                RetryOn::GatewayError,
            ],
            status_codes: Vec::new(),
            grpc_statuses: Vec::new(),
            non_idempotent: false,
            per_try_timeout: Duration::ZERO,
            backoff: Backoff::default(),
            max_retry_after: Duration::from_secs(10),
            max_replay_bytes: 64 * 1024,
            budget: RetryBudget::default(),
        }
    }
}

/// A kind of failure a retry policy retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The TCP connect or the TLS handshake failed or timed out: nothing
    /// reached the server.
    ConnectFailure,
    /// An HTTP/2 server refused the stream (`REFUSED_STREAM`, or the
    /// connection closed with a GOAWAY before it): nothing was processed.
    RefusedStream,
    /// The connection broke before response headers arrived.
    Reset,
    /// 502, 503 or 504 from the server, or a per-try timeout.
    GatewayError,
    /// 429 Too Many Requests.
    RateLimited,
}

/// A gRPC status code, by its canonical name in kebab-case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum GrpcStatus {
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcStatus {
    /// The numeric code, as sent in `grpc-status`.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Exponential backoff with full jitter: retry *n* (from 0) waits a random
/// time between 0 and min(`max`, `base` × 2^*n*). Envoy's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Backoff {
    /// The first retry's ceiling.
    pub base: Duration,
    /// The largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

/// Envoy's retry budget: retries in flight may be at most `percent` of the
/// rule's requests in flight, or `minRetryConcurrency`, whichever is more.
/// When every endpoint fails, this keeps retries from multiplying the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RetryBudget {
    /// Share of requests in flight that may be retries, 0 to 100.
    pub percent: u32,
    /// Retries in flight always allowed, however few requests there are.
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20,
            min_retry_concurrency: 3,
        }
    }
}

/// Copies a share of a rule's requests to another backend. The copy's
/// answer is read and dropped; the client's answer never waits for it.
/// The copy's `Host` gets a `-shadow` suffix (as Envoy does), so the shadow
/// can tell copies from real traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// The `Backend` that receives the copies.
    pub backend: String,
    /// Share of requests copied, 0 to 100.
    #[serde(default = "Mirror::default_percent")]
    pub percent: u32,
}

impl Mirror {
    fn default_percent() -> u32 {
        100
    }
}

/// Hedged requests: when an attempt has no response headers after
/// `delay` (or after the rule's observed `percentile` of time to response
/// headers), another attempt goes to another endpoint; the first response
/// is used and the others are cancelled (an HTTP/2 stream reset, or the
/// HTTP/1.1 connection closed), so the slow server stops working on it.
/// Hedges are capped by a budget (Dean and Barroso's "The Tail at Scale"),
/// sent only while no response byte went to the client and only once the
/// request body is whole and within the retry policy's `maxReplayBytes`,
/// and count against the backend's limits like any request.
///
/// ```yaml
/// hedge: { percentile: 95, delay: 200ms, budgetPercent: 5 }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct HedgePolicy {
    /// How long an attempt waits for response headers before a hedge is
    /// sent; with `percentile`, the wait until enough responses were seen.
    pub delay: Duration,
    /// Hedge after this percentile (e.g. 95) of the rule's recent times to
    /// response headers instead of a fixed delay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// Hedges per attempt at most, one more after each delay.
    pub max_hedges: u32,
    /// Hedges may add at most this share of the rule's requests (with a
    /// burst of 10).
    pub budget_percent: f64,
}

// Validation refuses NaN, the one value whose equality is not reflexive.
impl Eq for HedgePolicy {}

impl HedgePolicy {
    /// Default for [`HedgePolicy::delay`].
    pub const DEFAULT_DELAY: Duration = Duration::from_millis(100);
}

impl Default for HedgePolicy {
    fn default() -> Self {
        HedgePolicy {
            delay: Self::DEFAULT_DELAY,
            percentile: None,
            max_hedges: 1,
            budget_percent: 5.0,
        }
    }
}

impl HedgePolicy {
    pub(crate) fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        checker.duration_within(
            at.key("delay"),
            self.delay,
            Duration::from_millis(1),
            Duration::from_secs(300),
        );
        if let Some(p) = self.percentile
            && !(p > 0.0 && p < 100.0)
        {
            checker.error(
                at.key("percentile"),
                format!("{p} is not a percentile; give one between 0 and 100, e.g. 95"),
            );
        }
        if !(1..=4).contains(&self.max_hedges) {
            checker.error(
                at.key("maxHedges"),
                format!("{} hedges per attempt: give 1 to 4", self.max_hedges),
            );
        }
        if !(self.budget_percent >= 0.0 && self.budget_percent <= 100.0) {
            checker.error(
                at.key("budgetPercent"),
                format!("{} is not a percentage (0-100)", self.budget_percent),
            );
        }
    }
}

/// A token bucket local to this proxy: `requestsPerSecond` on average,
/// bursts of up to `burst`. Requests past it get 429 with `Retry-After`
/// and `x-infermesh-error: rate_limited`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// The sustained rate.
    pub requests_per_second: u32,
    /// The bucket's size; defaults to one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl CircuitBreaker {
    pub(crate) fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        for (field, value) in [
            ("maxConnections", self.max_connections),
            ("maxRequests", self.max_requests),
        ] {
            if value == 0 {
                checker.error(
                    at.key(field),
                    "must be at least 1; with 0 every request would be refused",
                );
            }
        }
    }
}

impl OutlierDetection {
    pub(crate) fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        checker.duration_within(
            at.key("baseEjectionTime"),
            self.base_ejection_time,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        );
        checker.duration_within(
            at.key("maxEjectionTime"),
            self.max_ejection_time,
            self.base_ejection_time,
            Duration::from_secs(86_400),
        );
        percent(
            at.key("maxEjectionPercent"),
            self.max_ejection_percent,
            checker,
        );
    }
}

impl HealthCheck {
    pub(crate) fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        if !self.path.starts_with('/') || http::uri::PathAndQuery::try_from(&*self.path).is_err() {
            checker.error(
                at.key("path"),
                format!(
                    "{:?} is not a request path; write it like /health",
                    self.path
                ),
            );
        }
        checker.duration_within(
            at.key("interval"),
            self.interval,
            Duration::from_millis(10),
            Duration::from_secs(86_400),
        );
        checker.duration_within(
            at.key("timeout"),
            self.timeout,
            Duration::from_millis(1),
            Duration::from_secs(300),
        );
        for (field, value) in [
            ("unhealthyThreshold", self.unhealthy_threshold),
            ("healthyThreshold", self.healthy_threshold),
        ] {
            if value == 0 {
                checker.error(at.key(field), "must be at least 1");
            }
        }
    }
}

impl RetryPolicy {
    pub(crate) fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        if self.max_retries > 10 {
            checker.error(
                at.key("maxRetries"),
                format!(
                    "{} retries is too many; the maximum is 10",
                    self.max_retries
                ),
            );
        }
        for (i, code) in self.status_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                checker.error(
                    at.key("statusCodes").index(i),
                    format!("{code} is not an HTTP status code (100-599)"),
                );
            }
        }
        checker.duration_within(
            at.key("perTryTimeout"),
            self.per_try_timeout,
            Duration::ZERO,
            Duration::from_secs(86_400),
        );
        let backoff = at.key("backoff");
        checker.duration_within(
            backoff.key("base"),
            self.backoff.base,
            Duration::from_millis(1),
            Duration::from_secs(3_600),
        );
        checker.duration_within(
            backoff.key("max"),
            self.backoff.max,
            self.backoff.base,
            Duration::from_secs(3_600),
        );
        checker.duration_within(
            at.key("maxRetryAfter"),
            self.max_retry_after,
            Duration::ZERO,
            Duration::from_secs(3_600),
        );
        if self.max_replay_bytes > 64 * 1024 * 1024 {
            checker.error(
                at.key("maxReplayBytes"),
                "at most 67108864 (64 MiB) bytes may be kept per request",
            );
        }
        percent(
            at.key("budget").key("percent"),
            self.budget.percent,
            checker,
        );
        if !self.grpc_statuses.is_empty() && !self.non_idempotent {
            checker.error(
                at.key("grpcStatuses"),
                "gRPC calls are POSTs, retried only with nonIdempotent: true; set it, or remove grpcStatuses",
            );
        }
    }
}

impl Mirror {
    pub(crate) fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        percent(at.key("percent"), self.percent, checker);
    }
}

impl RateLimit {
    pub(crate) fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        if self.requests_per_second == 0 {
            checker.error(
                at.key("requestsPerSecond"),
                "must be at least 1; remove the route rule to refuse all its requests",
            );
        }
        if self.burst == Some(0) {
            checker.error(at.key("burst"), "must be at least 1");
        }
    }

    /// The bucket's size.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second).max(1)
    }
}

fn percent(at: FieldPath, value: u32, checker: &mut Checker<'_>) {
    if value > 100 {
        checker.error(at, format!("{value} is not a percentage (0-100)"));
    }
}
