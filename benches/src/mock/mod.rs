//! A mock model server that speaks the APIs model servers speak:
//! OpenAI-compatible (`/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, with `stream: true` as server-sent
//! events ending in `data: [DONE]`) and KServe v2 / Open Inference Protocol
//! (`/v2`, `/v2/health/*`, `/v2/models/{name}[/ready]`,
//! `/v2/models/{name}/infer`), over HTTP/1.1 and HTTP/2, cleartext or TLS.
//!
//! How each model behaves comes from a [`Scenario`]: latency distribution,
//! stragglers, streaming pace, injected faults and concurrency, drawn from
//! one seed. `/metrics` shows vLLM-style gauges and the requests whose
//! client went away (cancellations).
//!
//! Each server is also a minimal OTLP/HTTP trace collector, for measuring
//! what tracing costs a proxy that exports to it: `POST /v1/traces` answers
//! 200 with an empty `application/x-protobuf` body (an empty
//! `ExportTraceServiceResponse`, which encodes to zero bytes: no partial
//! success to report) without decoding what it got; `/metrics` counts the
//! exports (`infermesh_mock_otlp_exports_total`) and their bytes
//! (`infermesh_mock_otlp_bytes_total`).

mod kserve;
mod model;
mod openai;
pub mod scenario;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
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
use tokio_rustls::TlsAcceptor;

pub use model::{MockMetrics, Model, Plan, Running};
pub use scenario::{
    ErrorRule, Fault, Latency, ModelSpec, Scenario, ServerSpec, Stragglers, TlsSpec,
};

/// A response body of the mock.
pub type MockBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body the mock reads.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// The scenario asked for this request's connection to be aborted.
#[derive(Debug, thiserror::Error)]
#[error("connection aborted by the mock's scenario")]
pub struct Abort;

/// A mock server with its socket bound, ready to serve.
pub struct MockServer {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<ServerState>,
}

struct ServerState {
    models: Vec<Arc<Model>>,
    metrics: MockMetrics,
}

impl ServerState {
    fn model(&self, name: &str) -> Option<&Arc<Model>> {
        self.models.iter().find(|m| m.spec.name == name)
    }
}

impl MockServer {
    /// Binds `spec.listen` and prepares the models; `seed` is the
    /// scenario's.
    pub async fn bind(spec: &ServerSpec, seed: u64) -> anyhow::Result<MockServer> {
        let listener = TcpListener::bind(spec.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", spec.listen))?;
        let tls = match &spec.tls {
            None => None,
            Some(t) => Some(TlsAcceptor::from(crate::tls::server_config(
                &t.cert,
                &t.key,
                t.client_ca.as_deref(),
            )?)),
        };
        let metrics = MockMetrics::new();
        let models = spec
            .models
            .iter()
            .map(|m| Arc::new(Model::new(m.clone(), seed, &metrics)))
            .collect();
        Ok(MockServer {
            listener,
            tls,
            state: Arc::new(ServerState { models, metrics }),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// The models it serves, by name.
    pub fn model_names(&self) -> Vec<String> {
        self.state
            .models
            .iter()
            .map(|m| m.spec.name.clone())
            .collect()
    }

    /// Serves until the task is dropped.
    pub async fn serve(self) {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let state = self.state.clone();
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { handle(&state, request).await }
            });
            let builder = builder.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                }
            });
        }
    }
}

/// Binds every server of `scenario`.
pub async fn bind_all(scenario: &Scenario) -> anyhow::Result<Vec<MockServer>> {
    let mut servers = Vec::with_capacity(scenario.servers.len());
    for spec in &scenario.servers {
        servers.push(MockServer::bind(spec, scenario.seed).await?);
    }
    Ok(servers)
}

async fn handle(
    state: &ServerState,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, Abort> {
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
                return Ok(json(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &serde_json::json!({ "error": "request body too large" }),
                ));
            }
        }
    } else {
        Bytes::new()
    };
    let not_found = || {
        Ok(json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": format!("no such endpoint: {path}") }),
        ))
    };
    match (method, segments.as_slice()) {
        (Method::GET, ["metrics"]) => {
            let mut response =
                Response::new(Full::new(Bytes::from(state.metrics.encode())).boxed_unsync());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
        (Method::GET, ["v1", "models"]) => Ok(openai::models(&state.models)),
        (Method::POST, ["v1", "chat", "completions"]) => {
            openai::generate(state, &body, openai::Api::Chat).await
        }
        (Method::POST, ["v1", "completions"]) => {
            openai::generate(state, &body, openai::Api::Completions).await
        }
        (Method::POST, ["v1", "embeddings"]) => openai::embeddings(state, &body).await,
        (Method::POST, ["v1", "traces"]) => Ok(otlp_traces(&state.metrics, &body)),
        (Method::GET, ["v2", "health", "live" | "ready"]) => {
            Ok(json(StatusCode::OK, &serde_json::json!({})))
        }
        (Method::GET, ["v2"]) => Ok(kserve::server_metadata()),
        (Method::GET, ["v2", "models", name]) => Ok(kserve::model_metadata(state.model(name))),
        (Method::GET, ["v2", "models", name, "ready"]) => {
            Ok(kserve::model_ready(state.model(name), name))
        }
        (Method::POST, ["v2", "models", name, "infer"]) => {
            kserve::infer(state.model(name), name, &body).await
        }
        _ => not_found(),
    }
}

/// The OTLP/HTTP collector's answer to a trace export: counted, not
/// decoded, and acknowledged with an empty `ExportTraceServiceResponse`
/// (zero bytes in protobuf).
fn otlp_traces(metrics: &MockMetrics, body: &Bytes) -> Response<MockBody> {
    metrics.otlp_exports.inc();
    metrics.otlp_bytes.inc_by(body.len() as u64);
    let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-protobuf"),
    );
    response
}

/// Admits a request to `model` and applies its plan's fault: `Ok(Ok(_))`
/// means answer normally while the [`Running`] guard lives, `Ok(Err(_))`
/// is the injected error answer, `Err(Abort)` aborts the connection.
async fn admit(
    model: &Arc<Model>,
    plan: &Plan,
    error: impl FnOnce(u16) -> Response<MockBody>,
) -> Result<Result<Running, Response<MockBody>>, Abort> {
    let running = model.admit().await;
    match plan.fault {
        None => Ok(Ok(running)),
        Some(Fault::Status(code)) => {
            running.complete();
            Ok(Err(error(code)))
        }
        Some(Fault::Reset) => {
            running.complete();
            Err(Abort)
        }
        Some(Fault::Hang) => {
            // Until the client goes away; dropping `running` then counts a
            // cancellation.
            let _running = running;
            std::future::pending().await
        }
    }
}

/// Waits `d`; not at all for zero.
async fn wait(d: Duration) {
    if let Some(timer) = pause(d) {
        timer.await;
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

/// A streamed body: prepared chunks, the first after a delay and each next
/// one a fixed time after the one before. Ending it completes the request;
/// dropping it early counts a cancellation.
struct Paced {
    chunks: std::collections::VecDeque<Bytes>,
    every: Duration,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    running: Option<Running>,
}

impl Paced {
    fn new(chunks: Vec<Bytes>, first: Duration, every: Duration, running: Running) -> Self {
        Paced {
            chunks: chunks.into(),
            every,
            pause: pause(first),
            running: Some(running),
        }
    }
}

/// A timer for `d`, or none for zero (a zero timer would still wait for
/// the timer's next tick).
fn pause(d: Duration) -> Option<Pin<Box<tokio::time::Sleep>>> {
    (!d.is_zero()).then(|| Box::pin(tokio::time::sleep(d)))
}

impl Body for Paced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(timer) = &mut self.pause
            && timer.as_mut().poll(cx).is_pending()
        {
            return Poll::Pending;
        }
        let Some(chunk) = self.chunks.pop_front() else {
            return Poll::Ready(None);
        };
        if self.chunks.is_empty()
            && let Some(running) = self.running.take()
        {
            running.complete();
        }
        self.pause = pause(self.every);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
}
