//! A route's time limits through a real gateway: long generations survive,
//! stalls and overruns are cut, and each cut says why.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use infermesh_tests::backend::{self, Handler, MockBackend, Protocol, TestBody};
use infermesh_tests::client;
use infermesh_tests::process::{Gateway, backend, config, listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A gateway with one route to `upstream`, with the given `timeouts:` YAML.
fn gateway(upstream: &MockBackend, timeouts: &str) -> Gateway {
    Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("m", "http1", &[upstream.addr]),
        &format!(
            "kind: Route\nmetadata: {{ name: gen }}\nspec:\n  rules:\n    - backends: [{{ name: m }}]\n      timeouts: {timeouts}"
        ),
    ]))
}

/// Streams `count` events `gap` apart, then either ends or (with `stall`)
/// goes quiet without ending.
fn events(count: usize, gap: Duration, stall: bool) -> Handler {
    Arc::new(move |_req: Request<Incoming>| {
        Box::pin(async move {
            let stream = futures_util::stream::unfold(0usize, move |i| async move {
                if i == count {
                    if stall {
                        std::future::pending::<()>().await;
                    }
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                let event = Bytes::from(format!("data: {i}\n\n"));
                Some((Ok::<_, backend::BoxError>(Frame::data(event)), i + 1))
            });
            let body: TestBody = StreamBody::new(stream).boxed();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        })
    })
}

fn delayed(delay: Duration) -> Handler {
    Arc::new(move |_req: Request<Incoming>| {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Response::new(backend::full("late"))
        })
    })
}

fn access_line(gateway: &Gateway) -> serde_json::Value {
    gateway.wait_for_log(
        |l| l["target"] == "infermesh::access",
        Duration::from_secs(10),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_active_stream_outlives_its_limits() {
    // 16 events 100 ms apart: 1.5 s in all, five times the idle and
    // first-byte limits, and there is no total limit by default.
    let upstream = MockBackend::start(
        Protocol::Http1,
        events(16, Duration::from_millis(100), false),
    )
    .await;
    let gateway = gateway(
        &upstream,
        "{ responseHeaders: 300ms, firstEvent: 300ms, idle: 300ms }",
    );
    let reply = client::get(&client::http1(), &gateway.url("web", "/v1/completions")).await;
    assert_eq!(reply.status, 200);
    let expected: String = (0..16).map(|i| format!("data: {i}\n\n")).collect();
    assert_eq!(reply.body, expected);
    assert!(access_line(&gateway).get("error").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_stream_is_cut_after_the_idle_limit() {
    let upstream =
        MockBackend::start(Protocol::Http1, events(2, Duration::from_millis(10), true)).await;
    let gateway = gateway(&upstream, "{ idle: 300ms }");
    let response = client::open(&client::http1(), &gateway.url("web", "/v1/completions")).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
            Err(_) => panic!("the stalled stream was never cut"),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(e),
            Ok(Some(Ok(frame))) => received.extend_from_slice(&frame.into_data().unwrap()),
        }
    };
    // The cut is told in the stream's own terms: an error event, and no
    // `[DONE]`.
    assert!(outcome.is_ok(), "{outcome:?}");
    let received = String::from_utf8(received).unwrap();
    assert!(!received.contains("[DONE]"), "{received}");
    let error_event = received
        .strip_prefix("data: 0\n\ndata: 1\n\n")
        .expect("events before the stall were delivered");
    // An OpenAI path: the cut is told as OpenAI's SDKs read it.
    let data = error_event
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("an error event ends the stream: {error_event:?}"));
    let data: serde_json::Value = serde_json::from_str(data.trim_end()).unwrap();
    assert_eq!(data["error"]["code"], "idle_timeout");
    let line = access_line(&gateway);
    assert_eq!(line["error"], "idle_timeout");
    assert_eq!(line["status"], 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_response_headers_get_504() {
    let upstream = MockBackend::start(Protocol::Http1, delayed(Duration::from_secs(30))).await;
    let gateway = gateway(&upstream, "{ responseHeaders: 200ms }");
    let reply = client::get(&client::http1(), &gateway.url("web", "/v2/models/m/infer")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.header("x-infermesh-error"),
        Some("response_headers_timeout")
    );
    assert_eq!(reply.json()["route"], "gen");
    let line = access_line(&gateway);
    assert_eq!(line["error"], "response_headers_timeout");
    // Attributed to the backend and endpoint it waited on, although no
    // response came from them (Envoy logs the upstream host of a UT).
    assert_eq!(line["backend"], "m", "{line}");
    assert_eq!(line["endpoint"], upstream.addr.to_string(), "{line}");
    let metrics = client::metrics(gateway.health).await;
    assert_eq!(
        client::metric_value(
            &metrics,
            "infermesh_requests_total{backend=\"m\",code=\"504\",grpc_status=\"\",route=\"gen\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        client::metric_value(
            &metrics,
            "infermesh_request_errors_total{backend=\"m\",reason=\"response_headers_timeout\",route=\"gen\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// A client that gives up before the response headers (an SDK's timeout
/// on a slow model), over HTTP/1.1 (the connection closes) and HTTP/2
/// (the stream is reset): each is logged and counted as 499 with the
/// backend it was waiting on, and the backend's request is cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_gives_up_before_the_headers_is_logged_and_counted() {
    let upstream = MockBackend::start(Protocol::Http1, delayed(Duration::from_secs(30))).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("m", "http1", &[upstream.addr]),
        "kind: Route\nmetadata: { name: gen }\nspec:\n  rules:\n    - backends: [{ name: m }]",
    ]));
    for http in [client::http1(), client::http2()] {
        let url = gateway.url("web", "/v1/chat/completions");
        let gave_up =
            tokio::time::timeout(Duration::from_millis(300), client::get(&http, &url)).await;
        assert!(gave_up.is_err(), "the backend answers in 30 s");
    }
    let lines = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = gateway.logs_matching(|l| l["target"] == "infermesh::access");
            if lines.len() >= 2 || std::time::Instant::now() > deadline {
                break lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert_eq!(line["status"], 499, "{line}");
        assert_eq!(line["error"], "client_disconnected", "{line}");
        assert_eq!(line["route"], "gen", "{line}");
        assert_eq!(line["backend"], "m", "{line}");
        assert_eq!(line["endpoint"], upstream.addr.to_string(), "{line}");
    }
    let versions: Vec<&str> = lines
        .iter()
        .map(|l| l["protocol"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(versions, ["HTTP/1.1", "HTTP/2.0"]);
    let metrics = client::metrics(gateway.health).await;
    assert_eq!(
        client::metric_value(
            &metrics,
            "infermesh_requests_total{backend=\"m\",code=\"499\",grpc_status=\"\",route=\"gen\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        client::metric_value(
            &metrics,
            "infermesh_request_errors_total{backend=\"m\",reason=\"client_disconnected\",route=\"gen\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_first_event_never_comes_gets_504() {
    // Headers at once (as SSE servers send them), then silence.
    let upstream =
        MockBackend::start(Protocol::Http1, events(0, Duration::from_millis(10), true)).await;
    let gateway = gateway(&upstream, "{ responseHeaders: 10s, firstEvent: 300ms }");
    let reply = client::get(&client::http1(), &gateway.url("web", "/v1/completions")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.header("x-infermesh-error"),
        Some("first_event_timeout")
    );
    assert_eq!(access_line(&gateway)["error"], "first_event_timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_total_limit_cuts_an_endless_stream() {
    let upstream = MockBackend::start(
        Protocol::Http1,
        events(usize::MAX, Duration::from_millis(50), false),
    )
    .await;
    let gateway = gateway(&upstream, "{ total: 500ms }");
    let response = client::open(&client::http2(), &gateway.url("web", "/v1/completions")).await;
    assert_eq!(response.status(), 200);
    let collected = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the stream is cut");
    let body = String::from_utf8(
        collected
            .expect("ended by its error event")
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let error_event = body.rsplit("\n\n").find(|event| !event.is_empty()).unwrap();
    assert!(
        error_event.starts_with("event: error\ndata: ") && error_event.contains("request_timeout"),
        "an endless stream ends with the cut's error event: {error_event:?}"
    );
    assert_eq!(access_line(&gateway)["error"], "request_timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_total_limit_applies_before_headers_too() {
    let upstream = MockBackend::start(Protocol::Http1, delayed(Duration::from_secs(30))).await;
    let gateway = gateway(&upstream, "{ total: 300ms }");
    let reply = client::get(&client::http1(), &gateway.url("web", "/")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.header("x-infermesh-error"), Some("request_timeout"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_gets_408() {
    let upstream = MockBackend::echo("echo", Protocol::Http1).await;
    let gateway = gateway(&upstream, "{ idle: 300ms }");
    let mut stream = tokio::net::TcpStream::connect(gateway.listener("web"))
        .await
        .unwrap();
    // Promise 100 bytes, send 3, then go quiet.
    stream
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: m\r\ncontent-length: 100\r\n\r\nabc")
        .await
        .unwrap();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        while !response.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed without a response");
            response.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no response to the stalled upload");
    let head = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(
        head.contains("x-infermesh-error: request_body_idle_timeout"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_that_hangs_fails_after_the_backends_connect_timeout() {
    // A listener that never accepts, with its accept queue full: the
    // kernel drops further SYNs, so a connect hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(1).unwrap();
    let addr = full.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break,
        }
    }
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &format!(
            "kind: Backend\nmetadata: {{ name: stuck }}\nspec: {{ connectTimeout: 300ms, endpoints: [{{ address: \"{addr}\" }}] }}"
        ),
        "kind: Route\nmetadata: { name: r }\nspec:\n  rules:\n    - backends: [{ name: stuck }]",
    ]));
    let reply = client::get(&client::http1(), &gateway.url("web", "/")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.header("x-infermesh-error"), Some("connect_timeout"));
    assert!(
        reply.json()["error"].as_str().unwrap().contains("300ms"),
        "{:?}",
        reply.json()
    );
    // Counted by reason, each attempt (retries included) a connect.
    let metrics = client::metrics(gateway.health).await;
    let timed_out = client::metric_value(
        &metrics,
        "infermesh_upstream_connects_total{backend=\"stuck\",result=\"connect_timeout\"}",
    );
    assert!(timed_out.is_some_and(|n| n >= 1.0), "{metrics}");
    drop(queued);
}
