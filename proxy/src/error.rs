//! Failures the proxy itself produces, as opposed to a model's own error
//! responses: the status and reason each maps to, and the response a client
//! gets for them, which carries `x-infermesh-error: <reason>` and a small
//! JSON body so a proxy timeout is never mistaken for a model failure.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{BoxError, ProxyBody, full};
use crate::breaker::Limit;
use crate::fanout::{FANOUT_HEADER, FanoutCause, FanoutFailed};
use crate::timeout::TimeoutError;

/// The header naming the reason of a proxy-made error response.
pub const ERROR_HEADER: &str = "x-infermesh-error";

/// What went wrong, without where.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
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
}

impl ErrorKind {
    /// The short, stable reason written in `x-infermesh-error`, the JSON
    /// body, the access log and metrics.
    pub fn reason(&self) -> &'static str {
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
        }
    }

    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
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
            | ErrorKind::AttemptTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unauthorized(_) => StatusCode::FORBIDDEN,
            ErrorKind::RequestBodyIdle(_) => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::RequestBody(_) | ErrorKind::FanoutStreaming(_) => StatusCode::BAD_REQUEST,
            ErrorKind::RequestBodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Fanout(failed) => match failed.cause {
                FanoutCause::BranchFailed | FanoutCause::Insufficient => StatusCode::BAD_GATEWAY,
                FanoutCause::Deadline => StatusCode::GATEWAY_TIMEOUT,
            },
        }
    }

    /// Classifies a failed upstream exchange. hyper reports a failure of the
    /// request body (ours to send) as a user error caused by the body's own
    /// error, so timeouts of the request body are found there.
    pub fn from_upstream(error: hyper::Error) -> Self {
        if let Some(timeout) = find_source::<TimeoutError>(&error) {
            return timeout.into();
        }
        if error.is_user() && std::error::Error::source(&error).is_some() {
            return ErrorKind::RequestBody(Box::new(error));
        }
        ErrorKind::UpstreamReset(error)
    }
}

impl ErrorKind {
    /// Classifies a response body that failed before anything of it was
    /// sent on: one of the route's body timeouts, or the backend.
    pub fn from_response_body(error: BoxError) -> Self {
        match find_source::<TimeoutError>(&*error) {
            Some(timeout) => timeout.into(),
            None => ErrorKind::ResponseBodyFailed(error),
        }
    }
}

impl From<&TimeoutError> for ErrorKind {
    fn from(e: &TimeoutError) -> Self {
        match *e {
            TimeoutError::RequestIdle(after) => ErrorKind::RequestBodyIdle(after),
            TimeoutError::ResponseIdle(after) => ErrorKind::ResponseBodyIdle(after),
            TimeoutError::Total(after) => ErrorKind::RequestTimeout(after),
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

/// A failure made by the proxy, with the backend and endpoint it happened
/// at when known.
#[derive(Debug)]
pub struct ProxyError {
    kind: ErrorKind,
    backend: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    retries: u32,
}

impl ProxyError {
    /// The failure, without a location yet.
    pub fn new(kind: ErrorKind) -> Self {
        ProxyError {
            kind,
            backend: None,
            endpoint: None,
            retries: 0,
        }
    }

    /// Notes that the failure came after `retries` retries.
    pub fn after_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Retries made before the failure.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Notes the backend the failure happened at.
    pub fn at_backend(mut self, backend: &Arc<str>) -> Self {
        self.backend.get_or_insert_with(|| backend.clone());
        self
    }

    /// Notes the endpoint the failure happened at.
    pub fn at_endpoint(mut self, endpoint: SocketAddr) -> Self {
        self.endpoint.get_or_insert(endpoint);
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The backend, when the failure happened after one was chosen.
    pub fn backend(&self) -> Option<&Arc<str>> {
        self.backend.as_ref()
    }

    /// The endpoint, when the failure happened after one was chosen.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    /// The response the client gets: the kind's status, the reason in
    /// `x-infermesh-error`, and `{"error", "reason", "route"}` as JSON.
    pub fn to_response(&self, route: Option<&str>) -> Response<ProxyBody> {
        let reason = self.kind.reason();
        let body = serde_json::json!({
            "error": self.to_string(),
            "reason": reason,
            "route": route,
        });
        let mut bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
        bytes.push(b'\n');
        let mut response = Response::new(full(bytes));
        *response.status_mut() = self.kind.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(reason));
        if let ErrorKind::Fanout(failed) = &self.kind
            && let Some(report) = &failed.report
        {
            headers.insert(FANOUT_HEADER, report.clone());
        }
        if let ErrorKind::RateLimited(wait) = self.kind {
            // Whole seconds, rounded up: a client that waits this long finds
            // a token.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
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
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_responses_carry_reason_header_and_json() {
        let err = ProxyError::new(ErrorKind::NoEndpoint).at_backend(&Arc::from("llama"));
        let response = err.to_response(Some("chat"));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[ERROR_HEADER], "no_endpoint");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["reason"], "no_endpoint");
        assert_eq!(json["route"], "chat");
        assert_eq!(
            json["error"],
            "the backend has no endpoints (backend llama)"
        );
    }
}
