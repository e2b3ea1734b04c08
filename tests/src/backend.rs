//! Mock backends for the end-to-end tests: real HTTP/1.1 and HTTP/2
//! servers on loopback whose behaviour each test scripts.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Errors of test bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body a mock backend answers with.
pub type TestBody = BoxBody<Bytes, BoxError>;
/// What a mock backend does with each request.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

/// Which HTTP versions a mock backend accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 (h2c prior knowledge) only.
    Http2,
}

/// A running mock backend. Dropping it (or [`MockBackend::stop`]) closes
/// its listener and every connection.
pub struct MockBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    tasks: JoinSet<()>,
}

impl MockBackend {
    /// Starts a backend on an ephemeral loopback port.
    pub async fn start(protocol: Protocol, handler: Handler) -> MockBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a mock backend");
        Self::serve(listener, protocol, handler)
    }

    /// Serves on an already bound listener (to restart on the same port).
    pub fn serve(listener: TcpListener, protocol: Protocol, handler: Handler) -> MockBackend {
        let addr = listener.local_addr().expect("bound address");
        let requests = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let counted = requests.clone();
        tasks.spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder = match protocol {
                Protocol::Http1 => builder.http1_only(),
                Protocol::Http2 => builder.http2_only(),
            };
            // Dropped with this task, which aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let handler = handler.clone();
                        let counted = counted.clone();
                        let service = hyper::service::service_fn(move |request| {
                            counted.fetch_add(1, Ordering::SeqCst);
                            let response = handler(request);
                            async move { Ok::<_, Infallible>(response.await) }
                        });
                        let connection = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned();
                        connections.spawn(async move {
                            let _ = connection.await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        MockBackend {
            addr,
            requests,
            tasks,
        }
    }

    /// An echo backend: see [`echo`].
    pub async fn echo(name: &str, protocol: Protocol) -> MockBackend {
        Self::start(protocol, echo(name)).await
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops listening and closes every connection at once, as a crashed
    /// server would.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Answers every request with JSON describing it: `{"backend", "method",
/// "path", "version", "headers", "body"}`, and the header `x-backend`.
pub fn echo(name: &str) -> Handler {
    let name = name.to_owned();
    Arc::new(move |request: Request<Incoming>| {
        let name = name.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body_bytes(body).await;
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").into()))
                .collect();
            let description = serde_json::json!({
                "backend": name,
                "method": parts.method.as_str(),
                "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                "authority": parts.uri.authority().map(|a| a.as_str()),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("x-backend", name.as_str())
                .body(full(serde_json::to_vec(&description).expect("JSON")))
                .expect("valid response")
        })
    })
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The whole of a request's body; empty if it failed midway (the test
/// then sees a request without the body it expected).
pub async fn body_bytes(body: Incoming) -> Bytes {
    body.collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// A backend whose single response is a `text/event-stream` carrying
/// exactly the frames the test sends on the returned channel, each as it
/// is sent (the stream ends when the sender is dropped): for tests of
/// what the proxy forwards, and when.
pub fn scripted_stream() -> (Handler, tokio::sync::mpsc::Sender<Bytes>) {
    let (frames, receiver) = tokio::sync::mpsc::channel::<Bytes>(16);
    let receiver = Arc::new(std::sync::Mutex::new(Some(receiver)));
    let handler: Handler = Arc::new(move |_request: Request<Incoming>| {
        let receiver = receiver
            .lock()
            .expect("not poisoned")
            .take()
            .expect("one streaming request");
        Box::pin(async move {
            let stream = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::ReceiverStream::new(receiver),
                |b| Ok(hyper::body::Frame::data(b)),
            );
            let body: TestBody = http_body_util::StreamBody::new(stream).boxed();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .expect("a valid response")
        })
    });
    (handler, frames)
}
