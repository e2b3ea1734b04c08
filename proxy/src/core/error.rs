//! The error vocabulary: every failure the proxy itself produces, as
//! opposed to a model's own error responses, as data. Each kind carries
//! its stable reason (the `x-infermesh-error` value, the access log's
//! `error` and the metrics' `outcome`), its status, and its
//! classification: where it arose ([`Origin`]), whether another attempt
//! may fix it ([`RetryClass`]) and whether it counts against the endpoint
//! it happened at. The balancer, the retry layer and hedging read that
//! classification here rather than each keeping a list; the server edge
//! turns an error into a response.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};

use crate::core::authority::HostError;
use crate::core::body::BoxError;
use crate::core::path::PathError;

/// What went wrong, without where.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ErrorKind {
    /// No route rule matched the request.
    #[error("no route matches this request")]
    NoRoute,
    /// The chosen backend has no endpoint to send to.
    #[error("the backend has no endpoints")]
    NoEndpoint,
    /// The TCP connect to the endpoint failed.
    #[error("connecting to the endpoint failed: {0}")]
    ConnectFailed(#[source] std::io::Error),
    /// The TCP connect to the endpoint did not finish in time.
    #[error("connecting to the endpoint took longer than {0:?}")]
    ConnectTimeout(Duration),
    /// The upstream connection closed or failed before response headers.
    #[error("the upstream connection failed before a response arrived: {0}")]
    UpstreamReset(#[source] hyper::Error),
    /// The response headers did not arrive within the route's limit.
    #[error("no response headers within {0:?}")]
    ResponseHeadersTimeout(Duration),
    /// The response body's first bytes did not arrive within the route's
    /// limit.
    #[error("no response body within {0:?} (first event timeout)")]
    FirstEventTimeout(Duration),
    /// The response body failed before its first bytes.
    #[error("the backend's response failed before its first bytes: {0}")]
    ResponseBodyFailed(#[source] BoxError),
    /// The whole exchange ran past the route's total timeout.
    #[error("the request ran past its total timeout of {0:?}")]
    RequestTimeout(Duration),
    /// The client stopped sending its request body.
    #[error("the client sent no request body data for {0:?}")]
    RequestBodyIdle(Duration),
    /// The backend stopped sending its response body mid-stream.
    #[error("the backend sent no response data for {0:?}")]
    ResponseBodyIdle(Duration),
    /// The response sent the client nothing for the listener's stream idle
    /// timeout: the backend was silent, or the client stopped reading.
    #[error("the response sent nothing to the client for {0:?} (stream idle timeout)")]
    StreamIdle(Duration),
    /// Reading the request body from the client failed.
    #[error("reading the request body failed: {0}")]
    RequestBody(#[source] BoxError),
    /// One attempt's response headers did not arrive within the retry
    /// policy's per-try timeout.
    #[error("no response headers within the per-try timeout of {0:?}")]
    AttemptTimeout(Duration),
    /// A circuit-breaker limit of the backend is reached.
    #[error("the backend is at its limit of {} ({})", .0.as_str(), .0.setting())]
    Overloaded(Limit),
    /// An authorization policy denied the request.
    #[error("{0}")]
    Unauthorized(String),
    /// The TLS handshake with the endpoint failed (its certificate did not
    /// verify or carried another identity, or it does not speak TLS).
    #[error("the TLS handshake with the endpoint failed: {0}")]
    UpstreamTls(String),
    /// The rule's rate limit is reached; a token is free after this long.
    #[error("the route's rate limit is reached; retry in {0:?}")]
    RateLimited(Duration),
    /// A sidecar's outbound listener blocks destinations outside the mesh,
    /// and this request's original destination is one.
    #[error(
        "{0} is outside the mesh (no route matched and no backend has this address), and the outbound listener blocks such destinations (outsideMesh: blocked)"
    )]
    OutsideMesh(SocketAddr),
    /// The request body is larger than the rule reads whole (a fan-out's
    /// `maxBodyBytes`).
    #[error("the request body is larger than this route's limit of {0} bytes")]
    RequestBodyTooLarge(u64),
    /// A streaming request reached a fan-out whose strategy combines whole
    /// answers.
    #[error(
        "this route fans out with strategy {0}, which combines whole answers, so it cannot stream; ask without \"stream\": true, or fan out with strategy first"
    )]
    FanoutStreaming(&'static str),
    /// A fan-out could not answer.
    #[error("{}", .0.message)]
    Fanout(Box<FanoutFailed>),
    /// The request's path cannot be normalised.
    #[error("{0}")]
    InvalidPath(PathError),
    /// The request's host is missing, repeated or ambiguous.
    #[error("{0}")]
    InvalidHost(HostError),
    /// A method the proxy does not serve (`CONNECT`: no listener tunnels).
    #[error("the proxy does not serve {0} requests")]
    MethodNotAllowed(Method),
}

/// Where a failure arose: whose fault it is, as Pingora's `ErrorSource`
/// says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The client: its request body failed or stalled, or it cannot be
    /// served as sent.
    Downstream,
    /// The proxy's own decision, by config, policy or limit (no route, no
    /// endpoint, a rate or circuit-breaker limit, authorization): nothing
    /// was sent upstream.
    Proxy,
    /// An endpoint or the way to it: connecting, its connection, its
    /// answer or its lateness.
    Upstream,
}

/// The retry condition a failed attempt falls under, when another attempt
/// may succeed where it failed: nothing of the answer reached the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryClass {
    /// The connect (or its TLS handshake) failed or timed out: the
    /// request never reached the endpoint.
    ConnectFailure,
    /// The HTTP/2 server refused the stream (`REFUSED_STREAM`): it did not
    /// process the request.
    RefusedStream,
    /// The connection broke before response headers: the endpoint may
    /// have processed the request.
    Reset,
    /// No response headers within the per-try timeout.
    Timeout,
}

/// One kind's classification: the table every caller reads.
struct Class {
    origin: Origin,
    retry: Option<RetryClass>,
    /// Whether the failure counts against the endpoint it happened at (its
    /// latency estimate, failure count and outlier ejection).
    endpoint_fault: bool,
}

impl ErrorKind {
    /// The short, stable reason written in `x-infermesh-error`, the JSON
    /// body, the access log and metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::NoEndpoint => "no_endpoint",
            ErrorKind::ConnectFailed(_) => "connect_failed",
            ErrorKind::ConnectTimeout(_) => "connect_timeout",
            ErrorKind::UpstreamReset(_) => "upstream_reset",
            ErrorKind::ResponseHeadersTimeout(_) => "response_headers_timeout",
            ErrorKind::RequestTimeout(_) => "request_timeout",
            ErrorKind::FirstEventTimeout(_) => "first_event_timeout",
            ErrorKind::ResponseBodyFailed(_) => "upstream_reset",
            ErrorKind::RequestBodyIdle(_) => "request_body_idle_timeout",
            ErrorKind::ResponseBodyIdle(_) => "idle_timeout",
            ErrorKind::StreamIdle(_) => "stream_idle_timeout",
            ErrorKind::RequestBody(_) => "request_body_error",
            ErrorKind::AttemptTimeout(_) => "per_try_timeout",
            ErrorKind::Overloaded(_) => "overloaded",
            ErrorKind::RateLimited(_) => "rate_limited",
            ErrorKind::UpstreamTls(_) => "upstream_tls_failed",
            ErrorKind::Unauthorized(_) => "unauthorized",
            ErrorKind::OutsideMesh(_) => "outside_mesh",
            ErrorKind::RequestBodyTooLarge(_) => "request_body_too_large",
            ErrorKind::FanoutStreaming(_) => "fanout_streaming_unsupported",
            ErrorKind::Fanout(failed) => match failed.cause {
                FanoutCause::BranchFailed => "fanout_branch_failed",
                FanoutCause::Insufficient => "fanout_insufficient_answers",
                FanoutCause::Deadline => "fanout_deadline",
            },
            ErrorKind::InvalidPath(_) => "invalid_path",
            ErrorKind::InvalidHost(_) => "invalid_host",
            ErrorKind::MethodNotAllowed(_) => "method_not_allowed",
        }
    }

    /// What the client is told: the failure without what only operators
    /// should see (endpoint addresses, OS errors, policy names), which the
    /// access log keeps.
    pub(crate) fn public_message(&self) -> std::borrow::Cow<'static, str> {
        let text = match self {
            ErrorKind::ConnectFailed(_) => "connecting to the model server failed",
            ErrorKind::UpstreamReset(_) => {
                "the connection to the model server failed before it answered"
            }
            ErrorKind::ResponseBodyFailed(_) => {
                "the model server's answer failed before its first bytes"
            }
            ErrorKind::RequestBody(_) => "reading the request body failed",
            ErrorKind::UpstreamTls(_) => "the TLS handshake with the model server failed",
            ErrorKind::Unauthorized(_) => "access denied by an authorization policy",
            ErrorKind::OutsideMesh(_) => {
                "the destination is outside the mesh, and this listener blocks such destinations"
            }
            _ => return self.to_string().into(),
        };
        text.into()
    }

    /// The status the client gets.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::NoEndpoint | ErrorKind::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ConnectFailed(_)
            | ErrorKind::ConnectTimeout(_)
            | ErrorKind::UpstreamReset(_)
            | ErrorKind::UpstreamTls(_)
            | ErrorKind::ResponseBodyFailed(_)
            | ErrorKind::OutsideMesh(_) => StatusCode::BAD_GATEWAY,
            ErrorKind::ResponseHeadersTimeout(_)
            | ErrorKind::RequestTimeout(_)
            | ErrorKind::FirstEventTimeout(_)
            | ErrorKind::ResponseBodyIdle(_)
            | ErrorKind::StreamIdle(_)
            | ErrorKind::AttemptTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unauthorized(_) => StatusCode::FORBIDDEN,
            ErrorKind::RequestBodyIdle(_) => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::RequestBody(_)
            | ErrorKind::FanoutStreaming(_)
            | ErrorKind::InvalidPath(_)
            | ErrorKind::InvalidHost(_) => StatusCode::BAD_REQUEST,
            ErrorKind::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::RequestBodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Fanout(failed) => match failed.cause {
                FanoutCause::BranchFailed | FanoutCause::Insufficient => StatusCode::BAD_GATEWAY,
                FanoutCause::Deadline => StatusCode::GATEWAY_TIMEOUT,
            },
        }
    }

    /// The classification of each kind, in one place.
    fn class(&self) -> Class {
        use Origin::{Downstream, Proxy, Upstream};
        let (origin, retry, endpoint_fault) = match self {
            ErrorKind::NoRoute
            | ErrorKind::NoEndpoint
            | ErrorKind::Overloaded(_)
            | ErrorKind::Unauthorized(_)
            | ErrorKind::RateLimited(_)
            | ErrorKind::OutsideMesh(_) => (Proxy, None, false),
            ErrorKind::ConnectFailed(_)
            | ErrorKind::ConnectTimeout(_)
            | ErrorKind::UpstreamTls(_) => (Upstream, Some(RetryClass::ConnectFailure), true),
            ErrorKind::UpstreamReset(e) if is_refused_stream(e) => {
                (Upstream, Some(RetryClass::RefusedStream), true)
            }
            ErrorKind::UpstreamReset(_) => (Upstream, Some(RetryClass::Reset), true),
            ErrorKind::AttemptTimeout(_) => (Upstream, Some(RetryClass::Timeout), true),
            // The rule's limits bound the whole request, retries included:
            // they end it, and are no endpoint's fault alone.
            ErrorKind::ResponseHeadersTimeout(_)
            | ErrorKind::FirstEventTimeout(_)
            | ErrorKind::ResponseBodyFailed(_)
            | ErrorKind::RequestTimeout(_)
            | ErrorKind::ResponseBodyIdle(_)
            | ErrorKind::Fanout(_) => (Upstream, None, false),
            // Either side may have stalled; nothing to retry either way.
            ErrorKind::StreamIdle(_) => (Downstream, None, false),
            ErrorKind::RequestBodyIdle(_)
            | ErrorKind::RequestBody(_)
            | ErrorKind::RequestBodyTooLarge(_)
            | ErrorKind::FanoutStreaming(_)
            | ErrorKind::InvalidPath(_)
            | ErrorKind::InvalidHost(_)
            | ErrorKind::MethodNotAllowed(_) => (Downstream, None, false),
        };
        Class {
            origin,
            retry,
            endpoint_fault,
        }
    }

    /// Where the failure arose.
    pub(crate) fn origin(&self) -> Origin {
        self.class().origin
    }

    /// The retry condition the failure falls under, if another attempt
    /// may succeed.
    pub(crate) fn retry_class(&self) -> Option<RetryClass> {
        self.class().retry
    }

    /// Whether the failure counts against the endpoint it happened at: in
    /// its failure count, its latency estimate and its outlier ejection.
    pub(crate) fn is_endpoint_fault(&self) -> bool {
        self.class().endpoint_fault
    }

    /// Classifies a failed upstream exchange. hyper reports a failure of the
    /// request body (ours to send) as a user error caused by the body's own
    /// error, so timeouts of the request body are found there.
    pub(crate) fn from_upstream(error: hyper::Error) -> Self {
        if let Some(timeout) = find_source::<TimeoutError>(&error) {
            return timeout.into();
        }
        if error.is_user() && std::error::Error::source(&error).is_some() {
            return ErrorKind::RequestBody(Box::new(error));
        }
        ErrorKind::UpstreamReset(error)
    }

    /// Classifies a response body that failed before anything of it was
    /// sent on: one of the route's body timeouts, or the backend.
    pub(crate) fn from_response_body(error: BoxError) -> Self {
        match find_source::<TimeoutError>(&*error) {
            Some(timeout) => timeout.into(),
            None => ErrorKind::ResponseBodyFailed(error),
        }
    }

    /// The reason of a body that failed mid-stream (after its head went
    /// out): one of the route's body timeouts, or else the backend's reset.
    pub(crate) fn reason_of_body_error(error: &(dyn std::error::Error + 'static)) -> &'static str {
        match find_source::<TimeoutError>(error) {
            Some(timeout) => ErrorKind::from(timeout).reason(),
            None => "upstream_reset",
        }
    }

    /// What the client is told of a body that failed mid-stream.
    pub(crate) fn public_message_of_body_error(
        error: &(dyn std::error::Error + 'static),
    ) -> std::borrow::Cow<'static, str> {
        match find_source::<TimeoutError>(error) {
            Some(timeout) => ErrorKind::from(timeout).public_message(),
            None => "the model server's answer failed mid-stream".into(),
        }
    }
}

/// Whether an HTTP/2 server refused the stream: it did not process it.
fn is_refused_stream(error: &hyper::Error) -> bool {
    find_source::<h2::Error>(error).is_some_and(|e| e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

impl From<&TimeoutError> for ErrorKind {
    fn from(e: &TimeoutError) -> Self {
        match *e {
            TimeoutError::RequestIdle(after) => ErrorKind::RequestBodyIdle(after),
            TimeoutError::ResponseIdle(after) => ErrorKind::ResponseBodyIdle(after),
            TimeoutError::Total(after) => ErrorKind::RequestTimeout(after),
            TimeoutError::StreamIdle(after) => ErrorKind::StreamIdle(after),
        }
    }
}

/// Finds an error of type `E` in `error`'s chain of sources.
pub(crate) fn find_source<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// Which circuit-breaker limit refused a request: the `limit` label of
/// `infermesh_overloaded_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `maxRequests`.
    Requests,
    /// `maxPendingRequests`: too many requests already wait for a
    /// connection.
    PendingRequests,
    /// `maxConnections`, when nothing may wait for a connection: with
    /// `maxPendingRequests: 0`, or for an HTTP/2 backend.
    Connections,
    /// `maxRetries`.
    Retries,
}

impl Limit {
    /// Every limit, in the order of their index (`limit as usize`).
    pub(crate) const ALL: [Limit; 4] = [
        Limit::Requests,
        Limit::PendingRequests,
        Limit::Connections,
        Limit::Retries,
    ];

    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::PendingRequests => "pending_requests",
            Limit::Connections => "connections",
            Limit::Retries => "retries",
        }
    }

    /// The config field that sets it.
    pub(crate) fn setting(self) -> &'static str {
        match self {
            Limit::Requests => "circuitBreaker.maxRequests",
            Limit::PendingRequests => "circuitBreaker.maxPendingRequests",
            Limit::Connections => "circuitBreaker.maxConnections",
            Limit::Retries => "circuitBreaker.maxRetries",
        }
    }
}

/// A body's time limit ran out: the error a timed body yields, found again
/// in the error chain of whatever read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TimeoutError {
    /// The client sent no request body data for this long.
    #[error("request body idle for {0:?}")]
    RequestIdle(Duration),
    /// The backend sent no response body data for this long.
    #[error("response body idle for {0:?}")]
    ResponseIdle(Duration),
    /// The exchange ran past its total limit.
    #[error("total timeout of {0:?} reached")]
    Total(Duration),
    /// The response sent the client nothing for this long.
    #[error("stream idle for {0:?}")]
    StreamIdle(Duration),
}

impl TimeoutError {
    /// The limit that ran out.
    pub(crate) fn limit(self) -> Duration {
        match self {
            TimeoutError::RequestIdle(d)
            | TimeoutError::ResponseIdle(d)
            | TimeoutError::Total(d)
            | TimeoutError::StreamIdle(d) => d,
        }
    }
}

/// Why a fan-out could not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FanoutCause {
    /// A required branch failed.
    BranchFailed,
    /// Every branch finished, and too few succeeded.
    Insufficient,
    /// The deadline came before enough branches answered.
    Deadline,
}

/// A failed fan-out: why, in words, and the report of its branches.
#[derive(Debug)]
pub(crate) struct FanoutFailed {
    /// Why.
    pub cause: FanoutCause,
    /// What happened, naming the branches.
    pub message: String,
    /// The value of the fan-out report header, once branches were sent.
    pub report: Option<HeaderValue>,
}

/// A failure made by the proxy, with the backend and endpoint it happened
/// at when known, and the request's head when the request was never sent.
#[derive(Debug)]
pub(crate) struct ProxyError {
    kind: ErrorKind,
    backend: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    retries: u32,
    /// The head of a request that never left the proxy (its connect
    /// failed), given back so that a retry can send it again without
    /// having kept a copy of its own.
    unsent: Option<Box<http::request::Parts>>,
}

impl ProxyError {
    /// The failure, without a location yet.
    pub(crate) fn new(kind: ErrorKind) -> Self {
        ProxyError {
            kind,
            backend: None,
            endpoint: None,
            retries: 0,
            unsent: None,
        }
    }

    /// Notes that the failure came after `retries` retries.
    pub(crate) fn after_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Retries made before the failure.
    pub(crate) fn retries(&self) -> u32 {
        self.retries
    }

    /// Notes the backend the failure happened at.
    pub(crate) fn at_backend(mut self, backend: &Arc<str>) -> Self {
        self.backend.get_or_insert_with(|| backend.clone());
        self
    }

    /// Notes the endpoint the failure happened at.
    pub(crate) fn at_endpoint(mut self, endpoint: SocketAddr) -> Self {
        self.endpoint.get_or_insert(endpoint);
        self
    }

    /// Gives back the head of the request that failed, when it was never
    /// sent: see [`ProxyError::take_unsent`].
    pub(crate) fn with_unsent(mut self, head: Box<http::request::Parts>) -> Self {
        self.unsent = Some(head);
        self
    }

    /// The head of the request that failed, when the request never left
    /// the proxy and the layer that failed it gave the head back: what a
    /// retry sends again when it kept no copy.
    pub(crate) fn take_unsent(&mut self) -> Option<http::request::Parts> {
        self.unsent.take().map(|head| *head)
    }

    /// What went wrong.
    pub(crate) fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The backend, when the failure happened after one was chosen.
    pub(crate) fn backend(&self) -> Option<&Arc<str>> {
        self.backend.as_ref()
    }

    /// The endpoint, when the failure happened after one was chosen.
    pub(crate) fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }
}

impl From<ErrorKind> for ProxyError {
    fn from(kind: ErrorKind) -> Self {
        ProxyError::new(kind)
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.kind, f)?;
        match (&self.backend, &self.endpoint) {
            (Some(b), Some(e)) => write!(f, " (backend {b}, endpoint {e})"),
            (Some(b), None) => write!(f, " (backend {b})"),
            (None, Some(e)) => write!(f, " (endpoint {e})"),
            (None, None) => Ok(()),
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.kind.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> ErrorKind {
        ErrorKind::ConnectFailed(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[test]
    fn a_failure_names_its_backend_and_endpoint() {
        let error = ProxyError::new(ErrorKind::NoEndpoint).at_backend(&Arc::from("llama"));
        assert_eq!(
            error.to_string(),
            "the backend has no endpoints (backend llama)"
        );
        let error = ProxyError::new(refused())
            .at_backend(&Arc::from("llama"))
            .at_endpoint("10.0.0.1:8000".parse().unwrap());
        assert!(
            error
                .to_string()
                .ends_with("(backend llama, endpoint 10.0.0.1:8000)"),
            "{error}"
        );
    }

    #[test]
    fn failures_before_a_response_are_retryable_and_the_endpoints_fault() {
        let second = Duration::from_secs(1);
        for (kind, class) in [
            (refused(), RetryClass::ConnectFailure),
            (
                ErrorKind::ConnectTimeout(second),
                RetryClass::ConnectFailure,
            ),
            (
                ErrorKind::UpstreamTls("bad identity".into()),
                RetryClass::ConnectFailure,
            ),
            (ErrorKind::AttemptTimeout(second), RetryClass::Timeout),
        ] {
            assert_eq!(kind.retry_class(), Some(class), "{kind}");
            assert!(kind.is_endpoint_fault(), "{kind}");
            assert_eq!(kind.origin(), Origin::Upstream, "{kind}");
        }
    }

    #[test]
    fn the_proxys_own_refusals_are_not_retried_and_blame_no_endpoint() {
        let second = Duration::from_secs(1);
        for kind in [
            ErrorKind::NoRoute,
            ErrorKind::NoEndpoint,
            ErrorKind::Overloaded(Limit::Requests),
            ErrorKind::RateLimited(second),
            ErrorKind::Unauthorized("denied".into()),
        ] {
            assert_eq!(kind.origin(), Origin::Proxy, "{kind}");
            assert_eq!(kind.retry_class(), None, "{kind}");
            assert!(!kind.is_endpoint_fault(), "{kind}");
        }
        // The rule's own limits end the request: no retry, no ejection.
        for kind in [
            ErrorKind::ResponseHeadersTimeout(second),
            ErrorKind::RequestTimeout(second),
            ErrorKind::ResponseBodyIdle(second),
        ] {
            assert_eq!(kind.retry_class(), None, "{kind}");
            assert!(!kind.is_endpoint_fault(), "{kind}");
        }
        assert_eq!(
            ErrorKind::RequestBodyIdle(second).origin(),
            Origin::Downstream
        );
    }

    #[test]
    fn a_body_timeout_is_found_in_the_error_chain() {
        let timeout: BoxError = Box::new(TimeoutError::ResponseIdle(Duration::from_secs(2)));
        assert_eq!(ErrorKind::reason_of_body_error(&*timeout), "idle_timeout");
        assert_eq!(
            ErrorKind::from_response_body(timeout).reason(),
            "idle_timeout"
        );
        let other: BoxError = "connection reset".into();
        assert_eq!(ErrorKind::reason_of_body_error(&*other), "upstream_reset");
    }
}
