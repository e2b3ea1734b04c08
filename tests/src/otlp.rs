//! An OTLP trace receiver for the tests: what an OpenTelemetry collector
//! does with spans, minus the collecting — it keeps every span it is sent,
//! over gRPC (a tonic server with the `opentelemetry-proto` service) and
//! over HTTP/protobuf (`POST /v1/traces`), each on its own ephemeral
//! loopback port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::backend::{MockBackend, Protocol};

/// A span as received, with the `service.name` of its resource.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// The span.
    pub span: Span,
}

impl ReceivedSpan {
    /// The trace id, in hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id, in hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent's span id, in hex (empty for a root span).
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The value of attribute `key`, if set.
    pub fn attribute(&self, key: &str) -> Option<any_value::Value> {
        self.span
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .and_then(|v: AnyValue| v.value)
    }

    /// Attribute `key` as a string (ints and bools written out).
    pub fn text(&self, key: &str) -> Option<String> {
        self.attribute(key).map(|v| match v {
            any_value::Value::StringValue(s) => s,
            any_value::Value::IntValue(i) => i.to_string(),
            any_value::Value::BoolValue(b) => b.to_string(),
            any_value::Value::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The received spans, shared by both servers.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ReceivedSpan>>>);

impl Received {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().expect("not poisoned");
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.clone())
                .and_then(|v| match v.value {
                    Some(any_value::Value::StringValue(s)) => Some(s),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; dropping it stops both servers.
pub struct OtlpReceiver {
    /// The gRPC endpoint's address.
    pub grpc: SocketAddr,
    /// The HTTP/protobuf endpoint's address.
    pub http: SocketAddr,
    received: Received,
    _grpc: JoinSet<()>,
    _http: MockBackend,
}

impl OtlpReceiver {
    /// Starts both servers on ephemeral loopback ports.
    pub async fn start() -> OtlpReceiver {
        let received = Received::default();
        let mut tasks = JoinSet::new();
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let grpc = grpc_listener.local_addr().expect("bound");
        let service = TraceServiceServer::new(received.clone());
        tasks.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        // OTLP/HTTP: `POST /v1/traces` with a protobuf body, served by the
        // harness's own mock backend.
        let on_http = received.clone();
        let http = MockBackend::start(
            Protocol::Http1,
            Arc::new(move |request: http::Request<hyper::body::Incoming>| {
                let received = on_http.clone();
                Box::pin(async move {
                    let right_path = request.uri().path() == "/v1/traces";
                    let body = crate::backend::body_bytes(request.into_body()).await;
                    let status = match ExportTraceServiceRequest::decode(body) {
                        Ok(export) if right_path => {
                            received.add(export);
                            StatusCode::OK
                        }
                        Ok(_) => StatusCode::NOT_FOUND,
                        Err(_) => StatusCode::BAD_REQUEST,
                    };
                    let answer = ExportTraceServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec();
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/x-protobuf")
                        .body(crate::backend::full(answer))
                        .expect("a valid response")
                })
            }),
        )
        .await;
        OtlpReceiver {
            grpc,
            http: http.addr,
            received,
            _grpc: tasks,
            _http: http,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.0.lock().expect("not poisoned").clone()
    }

    /// Waits until `done` holds for the spans received, or `timeout`
    /// passes; returns the spans either way.
    pub async fn wait_for(
        &self,
        done: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
