//! A mock model server that speaks the APIs model servers speak:
//! OpenAI-compatible (`/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`, with `stream: true` as server-sent events) and KServe
//! v2 / Open Inference Protocol (`/v2/health/*`, `/v2/models/{name}`,
//! `/v2/models/{name}/infer`). Its answers are deterministic: a generation
//! is `tokens` words, each `token_interval` apart after `latency`; a KServe
//! model returns its inputs as outputs.

mod kserve;
mod openai;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::{Instant, Interval};

/// How the mock behaves.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// The model names it serves.
    pub models: Vec<String>,
    /// Words per generated answer, unless the request's `max_tokens` asks
    /// for fewer.
    pub tokens: usize,
    /// Time before the first token (streaming) or the added wait before a
    /// whole answer.
    pub latency: Duration,
    /// Time between tokens.
    pub token_interval: Duration,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            models: vec!["mock-llm".into()],
            tokens: 16,
            latency: Duration::from_millis(20),
            token_interval: Duration::from_millis(20),
        }
    }
}

/// A response body of the mock.
pub type MockBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body the mock reads.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// Serves HTTP/1.1 and HTTP/2 (h2c) on `listener` until the task is
/// dropped.
pub async fn serve(listener: TcpListener, options: MockOptions) {
    let options = Arc::new(options);
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let options = options.clone();
        let service = hyper::service::service_fn(move |request| {
            let options = options.clone();
            async move { Ok::<_, Infallible>(handle(&options, request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

async fn handle(options: &MockOptions, request: Request<Incoming>) -> Response<MockBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body = if method == Method::POST {
        match Limited::new(request.into_body(), MAX_REQUEST)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return json(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &serde_json::json!({ "error": "request body too large" }),
                );
            }
        }
    } else {
        Bytes::new()
    };
    match (method, segments.as_slice()) {
        (Method::GET, ["v1", "models"]) => openai::models(options),
        (Method::POST, ["v1", "chat", "completions"]) => {
            openai::generate(options, &body, openai::Api::Chat).await
        }
        (Method::POST, ["v1", "completions"]) => {
            openai::generate(options, &body, openai::Api::Completions).await
        }
        (Method::GET, ["v2", "health", "live" | "ready"]) => {
            json(StatusCode::OK, &serde_json::json!({}))
        }
        (Method::GET, ["v2"]) => kserve::server_metadata(),
        (Method::GET, ["v2", "models", name]) => kserve::model_metadata(options, name),
        (Method::GET, ["v2", "models", name, "ready"]) => kserve::model_ready(options, name),
        (Method::POST, ["v2", "models", name, "infer"]) => {
            kserve::infer(options, name, &body).await
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": format!("no such endpoint: {path}") }),
        ),
    }
}

/// A JSON response.
fn json(status: StatusCode, value: &serde_json::Value) -> Response<MockBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(serde_json::to_vec(value).expect("JSON"))).boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A body that yields one prepared chunk per tick of an interval.
struct Paced {
    chunks: std::collections::VecDeque<Bytes>,
    ticks: Interval,
}

impl Paced {
    fn new(chunks: Vec<Bytes>, first: Duration, every: Duration) -> Self {
        let every = every.max(Duration::from_nanos(1));
        Paced {
            chunks: chunks.into(),
            ticks: tokio::time::interval_at(Instant::now() + first, every),
        }
    }
}

impl Body for Paced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.chunks.is_empty() {
            return Poll::Ready(None);
        }
        match self.ticks.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
}
