//! The server edge of the error vocabulary: a failure the proxy made
//! becomes the response the client gets. Its status is the kind's, its
//! reason goes in `x-infermesh-error` and a small JSON body
//! (`{"error", "reason", "route"}`), so a user can tell a proxy timeout
//! from a model failure; a fan-out's failure carries the report of its
//! branches, a rate-limited request a `Retry-After`, and a refused method
//! the `Allow` list.

use http::{HeaderValue, Response, header};

use crate::core::body::{ProxyBody, full};
use crate::core::error::{ErrorKind, ProxyError};
use crate::core::headers::{ERROR_HEADER, FANOUT_HEADER};

/// The response to `error`, for a request of `route` (if one matched).
pub(crate) fn error_response(error: &ProxyError, route: Option<&str>) -> Response<ProxyBody> {
    let kind = error.kind();
    let reason = kind.reason();
    let body = serde_json::json!({
        "error": error.to_string(),
        "reason": reason,
        "route": route,
    });
    let mut bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
    bytes.push(b'\n');
    let mut response = Response::new(full(bytes));
    *response.status_mut() = kind.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(ERROR_HEADER, HeaderValue::from_static(reason));
    if let ErrorKind::Fanout(failed) = kind
        && let Some(report) = &failed.report
    {
        headers.insert(FANOUT_HEADER, report.clone());
    }
    if let ErrorKind::MethodNotAllowed(_) = kind {
        // Every method but CONNECT, which no listener tunnels.
        headers.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"),
        );
    }
    if let ErrorKind::RateLimited(wait) = *kind {
        // Whole seconds, rounded up: a client that waits this long finds
        // a token.
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http::StatusCode;
    use http_body_util::BodyExt;

    use super::*;
    use crate::core::error::{FanoutCause, FanoutFailed};

    #[tokio::test]
    async fn error_responses_carry_reason_header_and_json() {
        let err = ProxyError::new(ErrorKind::NoEndpoint).at_backend(&Arc::from("llama"));
        let response = error_response(&err, Some("chat"));
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

    #[test]
    fn a_rate_limited_request_is_told_when_to_come_back() {
        let wait = ErrorKind::RateLimited(Duration::from_millis(1200));
        let response = error_response(&ProxyError::new(wait), Some("chat"));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2", "rounded up");
        let soon = ErrorKind::RateLimited(Duration::from_millis(10));
        let response = error_response(&ProxyError::new(soon), None);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn a_failed_fanout_reports_its_branches() {
        let report = HeaderValue::from_static("a;outcome=failed;status=500;ms=3.0");
        let failed = ErrorKind::Fanout(Box::new(FanoutFailed {
            cause: FanoutCause::BranchFailed,
            message: "required branch a failed: answered 500".into(),
            report: Some(report.clone()),
        }));
        let response = error_response(&ProxyError::new(failed), Some("ensemble"));
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[ERROR_HEADER], "fanout_branch_failed");
        assert_eq!(response.headers()[FANOUT_HEADER], report);
    }
}
