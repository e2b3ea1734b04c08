//! The access log's filters (`--access-log-errors-only`,
//! `--access-log-slower-than`, `--access-log-sample`), the request and
//! response size histograms and the per-route in-flight gauge, through a
//! real gateway: which lines are written, and that the metrics count every
//! request whatever the log keeps.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use infermesh_tests::backend::{self, MockBackend, Protocol};
use infermesh_tests::client::{self, HttpClient};
use infermesh_tests::process::{Gateway, backend, config, listener};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long `/slow` takes to answer.
const SLOW: Duration = Duration::from_millis(700);

/// The model: `/slow` answers after [`SLOW`], `/hang` after 30 s,
/// `/notfound` is its own 404, `/v1/stream` is an event stream, anything
/// else is echoed.
fn model() -> backend::Handler {
    let echo = backend::echo("model");
    Arc::new(move |request: Request<Incoming>| {
        let path = request.uri().path().to_owned();
        let echo = echo.clone();
        Box::pin(async move {
            match path.as_str() {
                "/slow" => {
                    tokio::time::sleep(SLOW).await;
                    Response::new(backend::full("slow"))
                }
                "/hang" => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Response::new(backend::full("late"))
                }
                "/v1/stream" => Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(backend::full("data: {}\n\ndata: [DONE]\n\n"))
                    .expect("a response"),
                "/notfound" => Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(backend::full("no such model"))
                    .expect("a response"),
                _ => echo(request).await,
            }
        })
    })
}

/// An address where nothing listens.
fn dead_address() -> std::net::SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("an address")
}

/// A gateway in front of [`model`] with `args`: route `r` sends `/hang`
/// to the model with a 200 ms `responseHeaders` limit (504), `/dead` to
/// a backend whose endpoint refuses connections (502), and `/v1`,
/// `/slow`, `/notfound` to the model; nothing else has a route (404
/// `no_route`).
fn gateway(model: &MockBackend, args: &[&str]) -> Gateway {
    Gateway::start_with_args(
        &config(&[
            &listener("web", "http"),
            &backend("model", "http1", &[model.addr]),
            &backend("dead", "http1", &[dead_address()]),
            r#"kind: Route
metadata: { name: r }
spec:
  rules:
    - matches: [{ path: { prefix: /hang } }]
      backends: [{ name: model }]
      timeouts: { responseHeaders: 200ms }
    - matches: [{ path: { prefix: /dead } }]
      backends: [{ name: dead }]
    - matches: [{ path: { prefix: /v1 } }, { path: { prefix: /slow } }, { path: { prefix: /notfound } }]
      backends: [{ name: model }]"#,
        ]),
        args,
    )
}

fn is_access(line: &Value) -> bool {
    line["target"] == "infermesh::access"
}

/// `GET path` through the gateway; its status.
async fn get(http: &HttpClient, gateway: &Gateway, path: &str) -> u16 {
    client::get(http, &gateway.url("web", path))
        .await
        .status
        .as_u16()
}

/// The statuses of the access lines so far, in order.
fn logged_statuses(gateway: &Gateway) -> Vec<u64> {
    gateway
        .logs_matching(is_access)
        .iter()
        .map(|l| l["status"].as_u64().expect("a status"))
        .collect()
}

/// Waits for `n` access lines, then a moment for any line that should not
/// be there (lines are written in order: those of earlier requests would
/// already be out), and returns them all.
async fn access_lines(gateway: &Gateway, n: usize) -> Vec<Value> {
    gateway.wait_for_logs(n, is_access, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(200)).await;
    gateway.logs_matching(is_access)
}

fn requests_counted(metrics: &str, backend: &str, code: u16) -> f64 {
    client::metric_value(
        metrics,
        &format!(
            "infermesh_requests_total{{backend=\"{backend}\",code=\"{code}\",grpc_status=\"\",route=\"r\"}}"
        ),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_only_logs_the_proxys_errors_and_5xx_but_not_successes() {
    let model = MockBackend::start(Protocol::Http1, model()).await;
    let gateway = gateway(&model, &["--access-log-errors-only"]);
    let http = client::http1();
    for _ in 0..3 {
        assert_eq!(get(&http, &gateway, "/v1/models").await, 200);
    }
    // The model's own 404 is the client's error, not the server's.
    assert_eq!(get(&http, &gateway, "/notfound").await, 404);
    assert_eq!(get(&http, &gateway, "/dead").await, 502);
    assert_eq!(get(&http, &gateway, "/hang").await, 504);
    // The proxy's own 404: an error of the proxy's making.
    assert_eq!(get(&http, &gateway, "/nothing").await, 404);

    let lines = access_lines(&gateway, 3).await;
    assert_eq!(logged_statuses(&gateway), [502, 504, 404], "{lines:?}");
    assert_eq!(lines[0]["error"], "connect_failed", "{}", lines[0]);
    assert_eq!(
        lines[1]["error"], "response_headers_timeout",
        "{}",
        lines[1]
    );
    assert_eq!(lines[2]["error"], "no_route", "{}", lines[2]);
    // Other log lines are not the access log's filter's business.
    assert!(
        !gateway
            .logs_matching(|l| l["message"] == "serving")
            .is_empty()
    );

    // Every request is counted, logged or not.
    let metrics = client::metrics(gateway.health).await;
    assert_eq!(requests_counted(&metrics, "model", 200), 3.0, "{metrics}");
    assert_eq!(requests_counted(&metrics, "model", 404), 1.0, "{metrics}");
    assert_eq!(requests_counted(&metrics, "dead", 502), 1.0, "{metrics}");
    assert_eq!(requests_counted(&metrics, "model", 504), 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_answers_line_names_the_request_as_it_came() {
    // A stream's record lets go of the bytes its request was parsed from
    // (the connection's read buffer) and keeps copies: they must be the
    // same text.
    let model = MockBackend::start(Protocol::Http1, model()).await;
    let gateway = gateway(&model, &[]);
    let reply = client::send(
        &client::http1(),
        Request::get(gateway.url("web", "/v1/stream?n=1"))
            .header("host", "llm.example.com")
            .header("x-request-id", "stream-1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    let line = &access_lines(&gateway, 1).await[0];
    assert_eq!(line["path"], "/v1/stream?n=1");
    assert_eq!(line["authority"], "llm.example.com");
    assert_eq!(line["request_id"], "stream-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn slower_than_logs_only_the_slow_request() {
    let model = MockBackend::start(Protocol::Http1, model()).await;
    let gateway = gateway(&model, &["--access-log-slower-than", "400ms"]);
    let http = client::http1();
    for _ in 0..3 {
        assert_eq!(get(&http, &gateway, "/v1/models").await, 200);
    }
    // An error after 200 ms: not slow enough, and errors are not selected.
    assert_eq!(get(&http, &gateway, "/hang").await, 504);
    assert_eq!(get(&http, &gateway, "/slow").await, 200);

    let lines = access_lines(&gateway, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["path"], "/slow", "{}", lines[0]);
    let took = lines[0]["duration_ms"].as_f64().expect("a duration");
    assert!(took >= 400.0, "{}", lines[0]);

    let metrics = client::metrics(gateway.health).await;
    assert_eq!(requests_counted(&metrics, "model", 200), 4.0, "{metrics}");
    assert_eq!(requests_counted(&metrics, "model", 504), 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_errors_only_and_slower_than_a_request_either_selects_is_logged() {
    let model = MockBackend::start(Protocol::Http1, model()).await;
    let gateway = gateway(
        &model,
        &[
            "--access-log-errors-only",
            "--access-log-slower-than",
            "400ms",
        ],
    );
    let http = client::http1();
    assert_eq!(get(&http, &gateway, "/v1/models").await, 200);
    assert_eq!(get(&http, &gateway, "/dead").await, 502);
    assert_eq!(get(&http, &gateway, "/v1/models").await, 200);
    assert_eq!(get(&http, &gateway, "/slow").await, 200);

    let lines = access_lines(&gateway, 2).await;
    let paths: Vec<&str> = lines.iter().filter_map(|l| l["path"].as_str()).collect();
    assert_eq!(paths, ["/dead", "/slow"], "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sampling_zero_logs_no_success_but_metrics_count_them_and_errors_are_kept() {
    let model = MockBackend::start(Protocol::Http1, model()).await;
    let gateway = gateway(&model, &["--access-log-sample", "0"]);
    let http = client::http1();
    for _ in 0..5 {
        assert_eq!(get(&http, &gateway, "/v1/models").await, 200);
    }
    let metrics = client::metrics(gateway.health).await;
    assert_eq!(requests_counted(&metrics, "model", 200), 5.0, "{metrics}");
    assert_eq!(
        client::metric_value(
            &metrics,
            "infermesh_request_duration_seconds_count{backend=\"model\",route=\"r\"}"
        ),
        Some(5.0),
        "{metrics}"
    );
    assert!(gateway.logs_matching(is_access).is_empty());

    // An error is never sampled away; its line comes after the five
    // successes' would have.
    assert_eq!(get(&http, &gateway, "/dead").await, 502);
    let lines = access_lines(&gateway, 1).await;
    assert_eq!(logged_statuses(&gateway), [502], "{lines:?}");
}

#[test]
fn a_sampling_ratio_outside_0_to_1_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, config(&[&listener("web", "http")])).unwrap();
    let proxy = infermesh_tests::binary("infermesh-proxy");
    let flag = std::process::Command::new(&proxy)
        .args(["--access-log-sample", "1.5", "gateway", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(flag.status.code(), Some(2));
    let said = String::from_utf8_lossy(&flag.stderr);
    assert!(said.contains("--access-log-sample"), "{said}");
    assert!(said.contains("1.5 is not between 0 and 1"), "{said}");

    let env = std::process::Command::new(&proxy)
        .args(["gateway", "--config"])
        .arg(&path)
        .env("INFERMESH_ACCESS_LOG_SAMPLE", "10%")
        .output()
        .unwrap();
    assert_eq!(env.status.code(), Some(2));
    let said = String::from_utf8_lossy(&env.stderr);
    assert!(said.contains("\"10%\" is not a number"), "{said}");

    let duration = std::process::Command::new(&proxy)
        .args(["--access-log-slower-than", "fast", "gateway", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(duration.status.code(), Some(2));
}

/// Sends `body` as a chunked HTTP/1.1 request body in `chunks` (no
/// `Content-Length`), and returns the response's body.
async fn post_chunked(address: std::net::SocketAddr, path: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: model\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in chunks {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
        stream.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("the response within 10 s")
        .unwrap();
    let text = String::from_utf8(response).expect("a text response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head = head.to_ascii_lowercase();
    if !head.contains("transfer-encoding: chunked") {
        return body.as_bytes().to_vec();
    }
    // Undo the chunked framing.
    let mut rest = body;
    let mut whole = Vec::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return whole;
        }
        whole.extend_from_slice(&after.as_bytes()[..size]);
        rest = &after[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_size_histograms_count_the_exact_body_bytes() {
    let model = MockBackend::start(Protocol::Http1, model()).await;
    let gateway = gateway(&model, &[]);
    let mut requests = Vec::new();
    let mut responses = Vec::new();

    // With a Content-Length, over HTTP/1.1 and HTTP/2.
    for (http, size) in [(client::http1(), 1000), (client::http2(), 5000)] {
        let request = Request::post(gateway.url("web", "/v1/echo"))
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(vec![b'x'; size])))
            .unwrap();
        let reply = client::send(&http, request).await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["body"].as_str().map(str::len), Some(size));
        requests.push(size);
        responses.push(reply.body.len());
    }
    // Chunked, without a length: the bytes are counted as they pass.
    let chunked = post_chunked(
        gateway.listener("web"),
        "/v1/echo",
        &[&[b'y'; 300], &[b'y'; 200], &[b'y'; 33]],
    )
    .await;
    requests.push(533);
    responses.push(chunked.len());
    // Without a body.
    let reply = client::get(&client::http1(), &gateway.url("web", "/v1/models")).await;
    requests.push(0);
    responses.push(reply.body.len());

    let lines = gateway.wait_for_logs(4, is_access, Duration::from_secs(10));
    let logged: Vec<(u64, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["request_bytes"].as_u64().expect("request_bytes"),
                l["response_bytes"].as_u64().expect("response_bytes"),
            )
        })
        .collect();
    let expected: Vec<(u64, u64)> = requests
        .iter()
        .zip(&responses)
        .map(|(q, r)| (*q as u64, *r as u64))
        .collect();
    assert_eq!(logged, expected, "{lines:?}");

    let metrics = client::metrics(gateway.health).await;
    let series = |name: &str, extra: &str| {
        client::metric_value(
            &metrics,
            &format!("{name}{{backend=\"model\",route=\"r\"{extra}}}"),
        )
    };
    let total = |sizes: &[usize]| sizes.iter().sum::<usize>() as f64;
    assert_eq!(
        series("infermesh_request_size_bytes_sum", ""),
        Some(total(&requests)),
        "{metrics}"
    );
    assert_eq!(
        series("infermesh_request_size_bytes_count", ""),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        series("infermesh_response_size_bytes_sum", ""),
        Some(total(&responses)),
        "{metrics}"
    );
    assert_eq!(
        series("infermesh_response_size_bytes_count", ""),
        Some(4.0),
        "{metrics}"
    );
    // Buckets by powers of 4: the empty body under 64 B, 533 B under
    // 1 KiB with 1000 B, 5000 B under 16 KiB.
    let bucket = |le: &str| {
        series(
            "infermesh_request_size_bytes_bucket",
            &format!(",le=\"{le}\""),
        )
    };
    assert_eq!(bucket("64"), Some(1.0), "{metrics}");
    assert_eq!(bucket("256"), Some(1.0), "{metrics}");
    assert_eq!(bucket("1024"), Some(3.0), "{metrics}");
    assert_eq!(bucket("4096"), Some(3.0), "{metrics}");
    assert_eq!(bucket("16384"), Some(4.0), "{metrics}");
    assert_eq!(bucket("67108864"), Some(4.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_in_flight_count_per_route_and_come_back_to_zero() {
    let model = MockBackend::start(Protocol::Http1, model()).await;
    let gateway = gateway(&model, &[]);
    let series = "infermesh_requests_in_flight{route=\"r\"}";

    // A slow request is in flight while it waits, and not after.
    let url = gateway.url("web", "/slow");
    let slow = tokio::spawn(async move { client::get(&client::http1(), &url).await.status });
    client::wait_for_metric(gateway.health, series, |v| v == 1.0, "the slow request").await;
    assert_eq!(slow.await.unwrap(), 200);
    client::wait_for_metric(gateway.health, series, |v| v == 0.0, "after it").await;

    // Two at once, over HTTP/2.
    let http2 = client::http2();
    let pending: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (http2.clone(), gateway.url("web", "/slow"));
            tokio::spawn(async move { client::get(&http, &url).await.status })
        })
        .collect();
    client::wait_for_metric(gateway.health, series, |v| v == 2.0, "two slow requests").await;
    for request in pending {
        assert_eq!(request.await.unwrap(), 200);
    }
    client::wait_for_metric(gateway.health, series, |v| v == 0.0, "after them").await;

    // A client that gives up before the headers (logged as 499), a
    // route timeout (504), a refused connect (502), and a request no
    // route matches: none stays in flight.
    let http = client::http1();
    let gave_up =
        tokio::time::timeout(Duration::from_millis(200), get(&http, &gateway, "/slow")).await;
    assert!(gave_up.is_err());
    assert_eq!(get(&http, &gateway, "/hang").await, 504);
    assert_eq!(get(&http, &gateway, "/dead").await, 502);
    assert_eq!(get(&http, &gateway, "/nothing").await, 404);
    gateway.wait_for_log(
        |l| is_access(l) && l["status"] == 499,
        Duration::from_secs(10),
    );
    client::wait_for_metric(gateway.health, series, |v| v == 0.0, "after the failures").await;
    let metrics = client::metrics(gateway.health).await;
    assert!(
        !metrics.contains("infermesh_requests_in_flight{route=\"\"}"),
        "a request without a route is not counted: {metrics}"
    );
}
