//! One branch of a fan-out: its copy of the request, with the model name
//! or path rewritten as configured, and its exchange with its backend, up
//! to the whole JSON answer or, for a race, the first body bytes.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use serde_json::Value;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::core::body::{BoxFuture, ProxyBody, collect_limited, first_frame, full};
use crate::core::context::Upstream;
use crate::core::error::ProxyError;
use crate::core::model::{self, BodyFields};
use crate::core::trace::RequestTrace;

/// The service a branch's request goes through: its backend's balancer.
pub(super) type BranchService =
    BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ProxyError>;

/// The most of a 4xx answer kept in a race, at least (a refusal rarely
/// exceeds its request).
const MIN_REFUSAL_BYTES: usize = 64 * 1024;

/// A branch as configured.
pub(crate) struct Branch {
    /// Its name.
    pub name: Arc<str>,
    /// Its backend.
    pub service: BranchService,
    /// The model name it asks for instead of the request's.
    pub model: Option<Arc<str>>,
    /// The path it sends to instead of the request's.
    pub path: Option<Arc<str>>,
    /// Its own limit, from sending to its answer.
    pub timeout: Option<Duration>,
    /// Whether the request fails when it does.
    pub required: bool,
    /// Its weight in a mean.
    pub weight: f64,
}

/// The client's request, read once and shared by the branches: its head,
/// and its whole body as one `Bytes` that every branch sends without a
/// copy (a branch whose body names another model gets its own).
pub(crate) struct Original {
    head: http::request::Parts,
    body: Bytes,
    fields: BodyFields,
    json: OnceLock<Option<Value>>,
}

impl Original {
    /// The request with head `head` and whole body `body`.
    pub(crate) fn new(head: http::request::Parts, body: Bytes) -> Self {
        let fields = BodyFields::of(&body);
        Original {
            head,
            body,
            fields,
            json: OnceLock::new(),
        }
    }

    /// Whether the client asks for a streamed answer: `"stream": true` in
    /// a JSON body (OpenAI-compatible APIs), or an `Accept` that takes
    /// server-sent events only.
    pub(crate) fn is_streaming(&self) -> bool {
        let mut accepted = self
            .head
            .headers
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|media| media.split(';').next().unwrap_or_default().trim())
            .peekable();
        let only_events = accepted.peek().is_some()
            && accepted.all(|media| media.eq_ignore_ascii_case("text/event-stream"));
        only_events || self.fields.stream
    }

    /// The body, parsed once, when it is a JSON object naming a model.
    fn json_naming_model(&self) -> Option<&Value> {
        self.fields.model.as_ref()?;
        self.json
            .get_or_init(|| serde_json::from_slice(&self.body).ok())
            .as_ref()
            .filter(|json| json.is_object())
    }
}

/// Why a branch gave no usable answer.
#[derive(Debug)]
pub(crate) struct Failure {
    /// The status it answered with, if it answered.
    pub status: Option<StatusCode>,
    /// Whether its own timeout ran out.
    pub timed_out: bool,
    /// What happened, for the report and errors.
    pub reason: String,
    /// A 4xx answer, whole: the model refused the request itself, which
    /// the client should hear about if every branch does.
    pub refusal: Option<Box<Refusal>>,
}

/// A branch's 4xx answer.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl Failure {
    fn new(reason: impl Into<String>) -> Self {
        Failure {
            status: None,
            timed_out: false,
            reason: reason.into(),
            refusal: None,
        }
    }

    /// The branch answered, with something the strategy cannot use.
    pub(crate) fn unusable(status: StatusCode, reason: impl Into<String>) -> Self {
        Failure {
            status: Some(status),
            ..Failure::new(reason)
        }
    }
}

/// A branch's usable answer.
pub(crate) enum Answer {
    /// A whole JSON answer.
    Json {
        /// Its status, a success.
        status: StatusCode,
        /// The parsed body.
        value: Value,
        /// Which endpoint answered.
        upstream: Option<Upstream>,
    },
    /// A successful response whose first body bytes (or end) have arrived;
    /// the rest streams on.
    Stream(Response<ProxyBody>),
}

impl Answer {
    /// The answer's status.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Answer::Json { status, .. } => *status,
            Answer::Stream(response) => response.status(),
        }
    }
}

/// What a branch waits for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wanted {
    /// The whole answer, parsed as JSON, of at most this many bytes.
    Json(usize),
    /// The first body bytes.
    FirstBytes,
}

impl Branch {
    /// This branch's copy of `original`.
    fn request(&self, original: &Original, wanted: Wanted) -> Result<Request<ProxyBody>, Failure> {
        let head = &original.head;
        let mut path = self.path.as_deref().unwrap_or(head.uri.path()).to_owned();
        let mut body = original.body.clone();
        if let Some(wanted) = &self.model {
            if let Some(named) = model::from_path(&path) {
                let rest = &path["/v2/models/".len() + named.len()..];
                path = format!("/v2/models/{wanted}{rest}");
            } else if let Some(json) = original.json_naming_model() {
                let mut json = json.clone();
                if let Some(object) = json.as_object_mut() {
                    object.insert("model".to_owned(), Value::String(wanted.to_string()));
                }
                body = Bytes::from(serde_json::to_vec(&json).expect("a JSON value serializes"));
            }
        }
        let uri = with_path(&head.uri, &path)
            .ok_or_else(|| Failure::new(format!("{path:?} cannot be a request path")))?;
        let mut headers: HeaderMap = head.headers.clone();
        // The length is the branch's own body's.
        headers.remove(CONTENT_LENGTH);
        headers.remove(TRANSFER_ENCODING);
        if let Wanted::Json(_) = wanted {
            // The answer is read as JSON: it must not come compressed.
            headers.remove(ACCEPT_ENCODING);
        }
        let mut request = Request::new(full(body));
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = head.version;
        *request.headers_mut() = headers;
        *request.extensions_mut() = head.extensions.clone();
        if let Some(trace) = request.extensions().get::<RequestTrace>() {
            // The branch's attempts say which branch they are.
            let branch = trace.in_branch(self.name.clone());
            request.extensions_mut().insert(branch);
        }
        Ok(request)
    }

    /// Sends this branch's copy of `original` and waits for what the
    /// strategy wants of the answer, within the branch's timeout. Dropping
    /// the future cancels the exchange (an HTTP/2 stream reset, or the
    /// HTTP/1.1 connection closed).
    pub(crate) fn exchange(
        &self,
        original: &Original,
        wanted: Wanted,
    ) -> BoxFuture<Result<Answer, Failure>> {
        let request = match self.request(original, wanted) {
            Ok(request) => request,
            Err(failure) => return Box::pin(std::future::ready(Err(failure))),
        };
        let limit = match wanted {
            Wanted::Json(limit) => limit,
            Wanted::FirstBytes => original.body.len().max(MIN_REFUSAL_BYTES),
        };
        let sent: BoxFuture<Result<Response<ProxyBody>, ProxyError>> =
            Box::pin(self.service.clone().oneshot(request));
        let exchange = async move {
            let response = sent
                .await
                .map_err(|e: ProxyError| Failure::new(format!("{} ({})", e, e.kind().reason())))?;
            let status = response.status();
            if status.is_client_error() {
                let (mut head, body) = response.into_parts();
                let refused = Failure::unusable(status, format!("answered {status}"));
                let Ok(body) = collect_limited(body, limit).await else {
                    return Err(refused);
                };
                // The length is the one the proxy sends.
                head.headers.remove(CONTENT_LENGTH);
                head.headers.remove(TRANSFER_ENCODING);
                return Err(Failure {
                    refusal: Some(Box::new(Refusal {
                        headers: head.headers,
                        body,
                    })),
                    ..refused
                });
            }
            if !status.is_success() {
                return Err(Failure::unusable(status, format!("answered {status}")));
            }
            match wanted {
                Wanted::FirstBytes => first_frame(response)
                    .await
                    .map(Answer::Stream)
                    .map_err(|e| Failure::unusable(status, format!("the answer broke off: {e}"))),
                Wanted::Json(limit) => {
                    let upstream = response.extensions().get::<Upstream>().cloned();
                    let bytes =
                        collect_limited(response.into_body(), limit)
                            .await
                            .map_err(|e| {
                                Failure::unusable(status, format!("reading the answer failed: {e}"))
                            })?;
                    let value = serde_json::from_slice(&bytes).map_err(|e| {
                        Failure::unusable(status, format!("the answer is not JSON: {e}"))
                    })?;
                    Ok(Answer::Json {
                        status,
                        value,
                        upstream,
                    })
                }
            }
        };
        match self.timeout {
            None => Box::pin(exchange),
            Some(limit) => Box::pin(async move {
                tokio::time::timeout(limit, exchange)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure {
                            timed_out: true,
                            ..Failure::new(format!("no answer within its timeout of {limit:?}"))
                        })
                    })
            }),
        }
    }
}

/// `uri` with its path replaced, the query kept.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::body::empty;
    use http_body_util::BodyExt;

    fn original(uri: &str, body: &str) -> Original {
        let (head, _) = Request::post(uri)
            .header(CONTENT_LENGTH, body.len())
            .header("x-request-id", "7")
            .body(empty())
            .unwrap()
            .into_parts();
        Original::new(head, Bytes::from(body.to_owned()))
    }

    fn branch(model: Option<&str>, path: Option<&str>) -> Branch {
        Branch {
            name: Arc::from("b"),
            service: BoxCloneSyncService::new(tower::service_fn(|_| async {
                Err::<Response<ProxyBody>, _>(ProxyError::new(
                    crate::core::error::ErrorKind::NoEndpoint,
                ))
            })),
            model: model.map(Arc::from),
            path: path.map(Arc::from),
            timeout: None,
            required: false,
            weight: 1.0,
        }
    }

    async fn sent(branch: &Branch, original: &Original) -> (Uri, HeaderMap, String) {
        let request = branch.request(original, Wanted::Json(1024)).unwrap();
        let (head, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            head.uri,
            head.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_kserve_path_gets_the_branch_model_and_the_body_is_shared() {
        let body = r#"{"inputs":[]}"#;
        let original = original("/v2/models/ensemble/infer?x=1", body);
        let (uri, headers, sent_body) = sent(&branch(Some("resnet"), None), &original).await;
        assert_eq!(uri, "/v2/models/resnet/infer?x=1");
        assert_eq!(sent_body, body);
        assert_eq!(headers["x-request-id"], "7");
        assert!(headers.get(CONTENT_LENGTH).is_none());
    }

    #[tokio::test]
    async fn an_openai_body_gets_the_branch_model_and_keeps_every_other_field() {
        let original = original(
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"ensemble","temperature":0}"#,
        );
        let (uri, _, body) = sent(&branch(Some("llama"), None), &original).await;
        assert_eq!(uri, "/v1/chat/completions");
        let json: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"messages":[{"role":"user","content":"hi"}],"model":"llama","temperature":0})
        );
        assert!(!original.is_streaming());
    }

    #[tokio::test]
    async fn opaque_json_goes_as_is_and_a_path_rewrite_keeps_the_query() {
        let body = r#"{"features":[1,2,3]}"#;
        let original = original("/score?v=2", body);
        let (uri, _, sent_body) = sent(&branch(Some("m"), Some("/predict")), &original).await;
        assert_eq!(uri, "/predict?v=2");
        assert_eq!(sent_body, body);
    }

    #[tokio::test]
    async fn a_body_that_is_not_a_json_object_goes_as_is() {
        for body in [r#"[null,"x"]"#, r#""model""#, "{not json"] {
            let original = original("/v1/chat/completions", body);
            let (_, _, sent_body) = sent(&branch(Some("llama"), None), &original).await;
            assert_eq!(sent_body, body);
            assert!(!original.is_streaming());
        }
    }

    #[test]
    fn streaming_requests_are_recognised() {
        assert!(original("/v1/completions", r#"{"model":"m","stream":true}"#).is_streaming());
        assert!(!original("/v1/completions", r#"{"model":"m","stream":false}"#).is_streaming());
        assert!(!original("/v1/completions", "not json").is_streaming());
        let (head, _) = Request::post("/x").body(()).unwrap().into_parts();
        let accepting = |accept: &str| {
            let (mut head, _) = Request::post("/x").body(()).unwrap().into_parts();
            head.headers
                .insert(http::header::ACCEPT, accept.parse().unwrap());
            Original::new(head, Bytes::new()).is_streaming()
        };
        assert!(accepting("text/event-stream"));
        assert!(accepting("text/event-stream; charset=utf-8"));
        assert!(!accepting("application/json, text/event-stream"));
        assert!(!accepting("*/*"));
        assert!(!Original::new(head, Bytes::new()).is_streaming());
    }
}
