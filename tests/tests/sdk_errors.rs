//! The proxy's own errors read by the clients users run: OpenAI's Python
//! SDK and grpcio (`tests/python/sdk_errors.py`, installed by
//! `./test.sh`). The SDK's exception carries the proxy's message and
//! code, a stream the proxy cuts raises its error event, gRPC statuses
//! and messages arrive, and one SDK call against a dead backend makes no
//! more connection attempts than the proxy's own retry policy does.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use infermesh_tests::backend::{BoxError, MockBackend, Protocol};
use infermesh_tests::process::{Gateway, backend, config, listener};
use tokio::net::TcpListener;

/// A backend that accepts connections and resets each once the request's
/// first bytes arrive, counting them. (Resetting at accept races the
/// proxy's connect: a reset that lands before the connect is seen to
/// complete fails the connect itself, `connect_failed`.)
async fn dead_backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut first = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut first).await;
                // SO_LINGER 0: a reset, not a clean close.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
                drop(stream);
            });
        }
    });
    (address, accepted)
}

/// A completion stream that sends one chunk, then nothing.
async fn stalling_stream() -> MockBackend {
    MockBackend::start(
        Protocol::Http1,
        Arc::new(|_request: Request<Incoming>| {
            Box::pin(async {
                let chunk = Bytes::from_static(
                    b"data: {\"id\":\"c\",\"object\":\"text_completion\",\"created\":0,\"model\":\"llama\",\"choices\":[{\"text\":\"hi\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]}\n\n",
                );
                let events = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(chunk))])
                    .chain(futures_util::stream::pending());
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(BodyExt::boxed(StreamBody::new(events)))
                    .unwrap()
            })
        }),
    )
    .await
}

#[tokio::test]
async fn openai_sdk_and_grpcio_read_the_proxys_errors() {
    let (dead, attempts) = dead_backend().await;
    let stream = stalling_stream().await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("dead", "http1", &[dead]),
        &backend("stream", "http1", &[stream.addr]),
        "kind: Route
metadata: { name: models }
spec:
  rules:
    - matches: [{ path: { prefix: /v1/chat } }, { path: { prefix: /models.Dead/ } }]
      backends: [{ name: dead }]
    - matches: [{ path: { prefix: /v1/completions } }]
      backends: [{ name: stream }]
      timeouts: { idle: 300ms }",
    ]));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/sdk_errors.py");
    let address = gateway.listener("web").to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).arg(address).output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("sdk errors: ok"),
        "the Python clients failed (install them with `pip install -r benches/tests/python/requirements.txt`, or run ./test.sh):\n{stdout}\n{stderr}"
    );
    // The SDK obeyed `x-should-retry: false`: its call reached the proxy
    // once (its default is two retries more), and the backend saw only
    // the proxy's attempts.
    let is_call =
        |l: &serde_json::Value| l["message"] == "request" && l["path"] == "/v1/chat/completions";
    gateway.wait_for_log(is_call, std::time::Duration::from_secs(5));
    let calls = gateway.logs_matching(is_call);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(attempts.load(Ordering::SeqCst) >= 1);
}
