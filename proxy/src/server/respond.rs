//! The server edge of the error vocabulary: a failure the proxy made
//! becomes the response the client gets, in the error shape the client's
//! SDK reads ([`Dialect`]): OpenAI's `{"error": {"message", "type",
//! "code"}}` on OpenAI paths, a trailers-only gRPC status for gRPC calls,
//! and `{"error", "reason", "route"}` elsewhere (KServe v2's
//! `{"error": string}`, with two more fields). Its status is the kind's;
//! its reason goes in `x-infermesh-error` whatever the dialect, so a user
//! can tell a proxy timeout from a model failure; `x-should-retry: false`
//! tells SDKs not to retry what the proxy has already retried or what
//! cannot succeed again. A fan-out's failure carries the report of its
//! branches, a rate-limited request a `Retry-After`, a refused method the
//! `Allow` list. A response body that fails mid-stream ends with an error
//! event (SSE) or a gRPC status in trailers ([`body_failure`]).
//!
//! Bodies never carry endpoint addresses or OS errors: the access log
//! does.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;

use crate::core::body::{ProxyBody, full};
use crate::core::error::{ErrorKind, Origin, ProxyError};
use crate::core::headers::{ERROR_HEADER, FANOUT_HEADER, GRPC_STATUS, X_REQUEST_ID, is_grpc};

/// The error shape a client's SDK understands, told from its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `{"error": message, "reason", "route"}`: KServe v2's error shape
    /// (`/v2/...`), and the proxy's own everywhere else.
    Plain,
    /// OpenAI's API (`/v1/...`): `{"error": {"message", "type", "param",
    /// "code"}}`, the shape the OpenAI SDKs (and vLLM, TGI, Ollama) use.
    OpenAi,
    /// gRPC (`content-type: application/grpc...`): HTTP 200 with
    /// `grpc-status` and `grpc-message` and no body (trailers-only).
    Grpc,
}

impl Dialect {
    /// The dialect of `request`.
    pub(crate) fn of<B>(request: &Request<B>) -> Self {
        let grpc = request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| is_grpc(v.as_bytes()));
        if grpc {
            Dialect::Grpc
        } else if request.uri().path().starts_with("/v1/") {
            Dialect::OpenAi
        } else {
            Dialect::Plain
        }
    }
}

/// The response to `error`, for a request of `route` (if one matched)
/// known by `request_id`, in `dialect`; the id is in the body (as
/// `request_id`) and in the `x-request-id` header.
pub(crate) fn error_response(
    error: &ProxyError,
    route: Option<&str>,
    request_id: Option<&HeaderValue>,
    dialect: Dialect,
) -> Response<ProxyBody> {
    let id_text = request_id.and_then(|id| id.to_str().ok());
    let kind = error.kind();
    let reason = kind.reason();
    let message = kind.public_message();
    let mut response = match dialect {
        Dialect::Grpc => {
            let mut response = Response::new(full(Bytes::new()));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            grpc_status(headers, kind, &message);
            response
        }
        Dialect::OpenAi | Dialect::Plain => {
            let body = match dialect {
                Dialect::OpenAi => serde_json::json!({
                    "error": openai_error(kind, &message),
                    "route": route,
                    "request_id": id_text,
                }),
                _ => serde_json::json!({
                    "error": message,
                    "reason": reason,
                    "route": route,
                    "request_id": id_text,
                }),
            };
            let mut bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
            bytes.push(b'\n');
            let mut response = Response::new(full(bytes));
            *response.status_mut() = kind.status();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(&ERROR_HEADER, HeaderValue::from_static(reason));
    if let Some(id) = request_id {
        headers.insert(X_REQUEST_ID.clone(), id.clone());
    }
    if !client_may_retry(kind) {
        headers.insert(&SHOULD_RETRY, HeaderValue::from_static("false"));
    }
    if let ErrorKind::Fanout(failed) = kind
        && let Some(report) = &failed.report
    {
        headers.insert(&FANOUT_HEADER, report.clone());
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

/// The header OpenAI's SDKs (and Stainless-generated SDKs) obey before
/// their own retry rules.
static SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Whether a client's own retry may help: only for the proxy's transient
/// refusals (a rate limit, a backend at its limit or with no endpoint
/// yet), which clear with time. Upstream failures were already retried by
/// the route's policy, and a request the proxy refused as sent (or
/// routes nowhere) fails the same way again; an SDK retrying those on top
/// multiplies every attempt.
fn client_may_retry(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::RateLimited(_) | ErrorKind::Overloaded(_) | ErrorKind::NoEndpoint
    ) && kind.origin() == Origin::Proxy
}

/// The `error` object of OpenAI's error shape: `type` from the status as
/// OpenAI's API gives it, `code` the proxy's reason.
fn openai_error(kind: &ErrorKind, message: &str) -> serde_json::Value {
    let kind_type = match kind.status() {
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        status if status.is_client_error() => "invalid_request_error",
        _ => "server_error",
    };
    serde_json::json!({
        "message": message,
        "type": kind_type,
        "param": null,
        "code": kind.reason(),
    })
}

/// The gRPC status code a failure maps to (gRPC's `statuscodes.md`).
fn grpc_code(kind: &ErrorKind) -> u8 {
    const INVALID_ARGUMENT: u8 = 3;
    const DEADLINE_EXCEEDED: u8 = 4;
    const PERMISSION_DENIED: u8 = 7;
    const RESOURCE_EXHAUSTED: u8 = 8;
    const UNIMPLEMENTED: u8 = 12;
    const UNAVAILABLE: u8 = 14;
    match kind {
        ErrorKind::NoRoute | ErrorKind::MethodNotAllowed(_) => UNIMPLEMENTED,
        ErrorKind::Unauthorized(_) => PERMISSION_DENIED,
        ErrorKind::RateLimited(_) | ErrorKind::RequestBodyTooLarge(_) => RESOURCE_EXHAUSTED,
        ErrorKind::InvalidPath(_)
        | ErrorKind::InvalidHost(_)
        | ErrorKind::RequestBody(_)
        | ErrorKind::FanoutStreaming(_) => INVALID_ARGUMENT,
        kind if kind.status() == StatusCode::GATEWAY_TIMEOUT
            || kind.status() == StatusCode::REQUEST_TIMEOUT =>
        {
            DEADLINE_EXCEEDED
        }
        _ => UNAVAILABLE,
    }
}

/// Sets `grpc-status` and `grpc-message` for `kind`.
fn grpc_status(headers: &mut HeaderMap, kind: &ErrorKind, message: &str) {
    headers.insert(&GRPC_STATUS, HeaderValue::from(u16::from(grpc_code(kind))));
    if let Ok(value) = HeaderValue::from_str(&grpc_message(message)) {
        headers.insert("grpc-message", value);
    }
}

/// `message` percent-encoded as gRPC's `grpc-message` requires: bytes
/// outside printable ASCII, and `%`, as `%XX`.
fn grpc_message(message: &str) -> Cow<'_, str> {
    let plain = |b: u8| (b' '..=b'~').contains(&b) && b != b'%';
    if message.bytes().all(plain) {
        return Cow::Borrowed(message);
    }
    let mut encoded = String::with_capacity(message.len() + 8);
    for b in message.bytes() {
        if plain(b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(encoded)
}

/// How a response body that failed mid-stream ends, when its dialect can
/// say so: an SSE `error` event (in OpenAI's shape, which its SDKs raise
/// as an `APIError`) for a `text/event-stream`, the status in trailers
/// for gRPC. `None`: the stream is reset, which is all other clients can
/// be told.
pub(crate) fn body_failure(
    dialect: Dialect,
    event_stream: bool,
    error: &(dyn std::error::Error + 'static),
) -> Option<Frame<Bytes>> {
    let reason = ErrorKind::reason_of_body_error(error);
    let message = ErrorKind::public_message_of_body_error(error);
    if dialect == Dialect::Grpc {
        let mut trailers = HeaderMap::new();
        let code: u16 = if reason.ends_with("timeout") { 4 } else { 14 };
        trailers.insert(&GRPC_STATUS, HeaderValue::from(code));
        if let Ok(value) = HeaderValue::from_str(&grpc_message(&message)) {
            trailers.insert("grpc-message", value);
        }
        trailers.insert(&ERROR_HEADER, HeaderValue::from_static(reason));
        return Some(Frame::trailers(trailers));
    }
    if !event_stream {
        return None;
    }
    let event = serde_json::json!({
        "error": {
            "message": message,
            "type": "server_error",
            "param": null,
            "code": reason,
        }
    });
    Some(Frame::data(Bytes::from(format!(
        "event: error\ndata: {event}\n\n"
    ))))
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
        let response = error_response(&err, Some("chat"), None, Dialect::Plain);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[&ERROR_HEADER], "no_endpoint");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["reason"], "no_endpoint");
        assert_eq!(json["route"], "chat");
        assert_eq!(json["error"], "the backend has no endpoints");
    }

    #[test]
    fn a_rate_limited_request_is_told_when_to_come_back() {
        let wait = ErrorKind::RateLimited(Duration::from_millis(1200));
        let response = error_response(&ProxyError::new(wait), Some("chat"), None, Dialect::Plain);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2", "rounded up");
        let soon = ErrorKind::RateLimited(Duration::from_millis(10));
        let response = error_response(&ProxyError::new(soon), None, None, Dialect::Plain);
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
        let response = error_response(
            &ProxyError::new(failed),
            Some("ensemble"),
            None,
            Dialect::Plain,
        );
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[&ERROR_HEADER], "fanout_branch_failed");
        assert_eq!(response.headers()[&FANOUT_HEADER], report);
    }

    fn refused_at(endpoint: &str) -> ProxyError {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        ProxyError::new(ErrorKind::ConnectFailed(refused))
            .at_backend(&Arc::from("llama"))
            .at_endpoint(endpoint.parse().unwrap())
    }

    async fn json_of(response: Response<ProxyBody>) -> serde_json::Value {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn openai_clients_get_openai_errors_without_internal_addresses() {
        let response = error_response(
            &refused_at("10.1.2.3:8000"),
            Some("chat"),
            None,
            Dialect::OpenAi,
        );
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[&ERROR_HEADER], "connect_failed");
        assert_eq!(
            response.headers()[&SHOULD_RETRY],
            "false",
            "already retried"
        );
        let json = json_of(response).await;
        assert_eq!(json["error"]["type"], "server_error");
        assert_eq!(json["error"]["code"], "connect_failed");
        let message = json["error"]["message"].as_str().unwrap();
        assert_eq!(message, "connecting to the model server failed");
        for internal in ["10.1.2.3", "llama", "refused", "os error"] {
            assert!(!json.to_string().contains(internal), "{internal} in {json}");
        }
    }

    #[tokio::test]
    async fn openai_error_types_follow_the_status() {
        let cases = [
            (ErrorKind::NoRoute, "not_found_error"),
            (
                ErrorKind::Unauthorized("denied by policy \"x\"".into()),
                "permission_error",
            ),
            (
                ErrorKind::RateLimited(Duration::from_secs(1)),
                "rate_limit_error",
            ),
            (ErrorKind::RequestBodyTooLarge(10), "invalid_request_error"),
            (ErrorKind::NoEndpoint, "server_error"),
        ];
        for (kind, expected) in cases {
            let json = json_of(error_response(
                &ProxyError::new(kind),
                None,
                None,
                Dialect::OpenAi,
            ))
            .await;
            assert_eq!(json["error"]["type"], expected, "{json}");
        }
    }

    #[test]
    fn grpc_calls_get_a_trailers_only_status() {
        let cases = [
            (ErrorKind::NoRoute, "12"),
            (
                ErrorKind::ResponseHeadersTimeout(Duration::from_secs(1)),
                "4",
            ),
            (
                ErrorKind::Overloaded(crate::core::error::Limit::Requests),
                "14",
            ),
            (ErrorKind::RateLimited(Duration::from_secs(1)), "8"),
            (ErrorKind::Unauthorized("no".into()), "7"),
        ];
        for (kind, code) in cases {
            let reason = kind.reason();
            let response = error_response(&ProxyError::new(kind), None, None, Dialect::Grpc);
            assert_eq!(response.status(), StatusCode::OK, "{reason}");
            assert_eq!(response.headers()["content-type"], "application/grpc");
            assert_eq!(response.headers()["grpc-status"], code, "{reason}");
            assert!(response.headers().contains_key("grpc-message"));
            assert_eq!(response.headers()[&ERROR_HEADER], reason);
        }
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("plain text"), "plain text");
        assert_eq!(grpc_message("100% → ok"), "100%25 %E2%86%92 ok");
    }

    #[test]
    fn clients_may_retry_only_what_clears_with_time() {
        let retried = |kind| {
            error_response(&ProxyError::new(kind), None, None, Dialect::Plain)
                .headers()
                .get(&SHOULD_RETRY)
                .is_none()
        };
        assert!(retried(ErrorKind::RateLimited(Duration::from_secs(1))));
        assert!(retried(ErrorKind::NoEndpoint));
        assert!(!retried(ErrorKind::NoRoute));
        assert!(!retried(ErrorKind::ResponseHeadersTimeout(
            Duration::from_secs(1)
        )));
    }

    #[test]
    fn a_stream_cut_mid_way_ends_with_an_error_event() {
        let error = crate::core::error::TimeoutError::ResponseIdle(Duration::from_secs(5));
        let frame = body_failure(Dialect::OpenAi, true, &error).unwrap();
        let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
        let data = text.strip_prefix("event: error\ndata: ").unwrap();
        let json: serde_json::Value = serde_json::from_str(data.trim_end()).unwrap();
        assert_eq!(json["error"]["code"], "idle_timeout");
        assert!(
            body_failure(Dialect::Plain, false, &error).is_none(),
            "reset"
        );
        let trailers = body_failure(Dialect::Grpc, false, &error).unwrap();
        assert_eq!(trailers.trailers_ref().unwrap()["grpc-status"], "4");
    }
}
