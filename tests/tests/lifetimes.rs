//! Hostile and careless clients against a gateway's connection limits
//! (`Listener.spec.limits`): connections that say nothing or half of the
//! HTTP/2 preface are closed, idle HTTP/2 connections get GOAWAY, the
//! connection limit holds, streams reset before their answer close their
//! connection, a client that never reads does not hold the backend's
//! limits, oversized header blocks get 431, and running out of file
//! descriptors refuses clients at once and makes `/ready` say so.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use infermesh_tests::backend::{Handler, MockBackend, Protocol, full};
use infermesh_tests::client::{get, http1, metric_value, metrics, wait_for_metric};
use infermesh_tests::process::{Gateway, backend, backend_with, config, route_by_prefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any one thing the proxy should do at once may take before the
/// test gives up on it (a bound against hangs, not a measurement).
const PATIENCE: Duration = Duration::from_secs(10);

/// A gateway whose listener `public` has `limits` (YAML inside the
/// `limits` block; the defaults when empty) and one route to `model`.
fn gateway(limits: &str, model: &str) -> Gateway {
    let limits = if limits.is_empty() {
        String::new()
    } else {
        format!(", limits: {{ {limits} }}")
    };
    Gateway::start(&config(&[
        &format!(
            "kind: Listener\nmetadata: {{ name: public }}\nspec: {{ address: 127.0.0.1:0, protocol: http{limits} }}"
        ),
        model,
        &route_by_prefix(&[("/", "model")]),
    ]))
}

/// Reads from `stream` until the proxy closes it; `false` if it did not
/// within [`PATIENCE`].
async fn closed_by_proxy(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 4096];
    let reading = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, reading).await.is_ok()
}

/// A backend answering after `delay` with `size` bytes.
fn slow_or_large(delay: Duration, size: usize) -> Handler {
    std::sync::Arc::new(move |_request: Request<Incoming>| {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Response::new(full(Bytes::from(vec![b'x'; size])))
        })
    })
}

/// An HTTP/2 client connection (h2c with prior knowledge) to `address`,
/// whose connection task's end is `ended`.
async fn h2_client(
    address: SocketAddr,
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let stream = TcpStream::connect(address).await.expect("connect");
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(stream)
        .await
        .expect("HTTP/2 handshake");
    (sender, tokio::spawn(connection))
}

fn get_request(address: SocketAddr, path: &str) -> Request<()> {
    Request::get(format!("http://{address}{path}"))
        .body(())
        .expect("valid request")
}

#[tokio::test]
async fn silent_connections_and_half_prefaces_are_closed() {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let gateway = gateway(
        "firstByteTimeout: 300ms",
        &backend("model", "http1", &[model.addr]),
    );
    let public = gateway.listener("public");
    let mut silent = TcpStream::connect(public).await.unwrap();
    let mut half = TcpStream::connect(public).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(closed_by_proxy(&mut silent).await, "a silent connection");
    assert!(closed_by_proxy(&mut half).await, "half an HTTP/2 preface");
    let closed = metric_value(
        &metrics(gateway.health).await,
        "infermesh_downstream_connections_closed_total{listener=\"public\",reason=\"first_byte_timeout\"}",
    );
    assert_eq!(closed, Some(2.0));
    // A client that speaks is served.
    let reply = get(&http1(), &gateway.url("public", "/v1/models")).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn slow_headers_are_cut_and_counted() {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let gateway = gateway(
        "requestHeadersTimeout: 300ms",
        &backend("model", "http1", &[model.addr]),
    );
    let mut slowloris = TcpStream::connect(gateway.listener("public"))
        .await
        .unwrap();
    slowloris
        .write_all(b"GET /v1/models HTTP/1.1\r\nHo")
        .await
        .unwrap();
    assert!(
        closed_by_proxy(&mut slowloris).await,
        "headers never finished"
    );
    wait_for_metric(
        gateway.health,
        "infermesh_downstream_connections_closed_total{listener=\"public\",reason=\"request_headers_timeout\"}",
        |v| v == 1.0,
        "the slow headers are counted",
    )
    .await;
}

#[tokio::test]
async fn idle_http2_connections_get_goaway_and_are_closed() {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    // The request headers timeout, shorter, is HTTP/1's: an idle HTTP/2
    // connection is ended by the idle timeout, and counted so.
    let gateway = gateway(
        "idleTimeout: 500ms, requestHeadersTimeout: 200ms",
        &backend("model", "http1", &[model.addr]),
    );
    let public = gateway.listener("public");
    let (mut sender, connection) = h2_client(public, 65_535).await;
    let (response, _) = sender
        .send_request(get_request(public, "/v1/models"), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    let ended = tokio::time::timeout(PATIENCE, connection).await;
    assert!(ended.is_ok(), "the idle connection was never closed");
    wait_for_metric(
        gateway.health,
        "infermesh_downstream_connections_closed_total{listener=\"public\",reason=\"idle_timeout\"}",
        |v| v == 1.0,
        "the idle close is counted",
    )
    .await;
}

#[tokio::test]
async fn the_connection_limit_holds() {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let gateway = gateway(
        "maxConnections: 2",
        &backend("model", "http1", &[model.addr]),
    );
    let public = gateway.listener("public");
    let mut open = Vec::new();
    for _ in 0..2 {
        let (sender, connection) = h2_client(public, 65_535).await;
        let (response, _) = sender
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(get_request(public, "/v1/models"), true)
            .unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        open.push((sender, connection));
    }
    let mut third = TcpStream::connect(public).await.unwrap();
    third
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: models.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, third.read_to_end(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection is closed unanswered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let refused = metric_value(
        &metrics(gateway.health).await,
        "infermesh_downstream_connections_refused_total{listener=\"public\",reason=\"max_connections\"}",
    );
    assert_eq!(refused, Some(1.0));
    // Once one closes, a new client gets in.
    let (sender, connection) = open.pop().unwrap();
    drop(sender);
    connection.abort();
    let _ = connection.await;
    wait_for_metric(
        gateway.health,
        "infermesh_downstream_connections{listener=\"public\"}",
        |v| v == 1.0,
        "the closed connection is gone",
    )
    .await;
    let reply = get(&http1(), &gateway.url("public", "/v1/models")).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn streams_reset_before_their_answer_close_the_connection() {
    // The model takes a second to answer; the client resets each stream
    // 20 ms after sending it (a "delayed" rapid reset).
    let model =
        MockBackend::start(Protocol::Http1, slow_or_large(Duration::from_secs(1), 10)).await;
    let gateway = gateway("", &backend("model", "http1", &[model.addr]));
    let public = gateway.listener("public");
    let (sender, connection) = h2_client(public, 65_535).await;
    let mut sent = 0;
    for _ in 0..300 {
        let Ok(mut ready) = sender.clone().ready().await else {
            break;
        };
        let request = Request::post(format!("http://{public}/v1/chat/completions"))
            .body(())
            .unwrap();
        let Ok((_response, mut body)) = ready.send_request(request, false) else {
            break;
        };
        if body.send_data(Bytes::from_static(b"{}"), false).is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        body.send_reset(h2::Reason::CANCEL);
    }
    assert!(sent < 300, "the connection was never closed");
    assert!(
        tokio::time::timeout(PATIENCE, connection).await.is_ok(),
        "the connection ended"
    );
    assert!(
        model.requests() <= 60,
        "{} requests reached the model",
        model.requests()
    );
    let closed = metric_value(
        &metrics(gateway.health).await,
        "infermesh_downstream_connections_closed_total{listener=\"public\",reason=\"premature_resets\"}",
    );
    assert_eq!(closed, Some(1.0));
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_hold_the_backend() {
    // One request at a time may reach the model; its answers are 1 MiB.
    let model = MockBackend::start(Protocol::Http1, slow_or_large(Duration::ZERO, 1 << 20)).await;
    let gateway = gateway(
        "streamIdleTimeout: 500ms",
        &backend_with(
            "model",
            "http1",
            &[model.addr],
            "circuitBreaker: { maxRequests: 1 }",
        ),
    );
    let public = gateway.listener("public");
    // A client whose window never opens: the proxy can send it nothing.
    let (mut sender, connection) = h2_client(public, 0).await;
    let (response, _) = sender
        .send_request(get_request(public, "/v1/big"), true)
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("response headers")
        .unwrap();
    assert_eq!(response.status(), 200);
    // Other clients are refused while it holds the model's one request,
    // and served once the proxy cut it.
    let client = http1();
    let mut refused = 0;
    let served = async {
        loop {
            let reply = get(&client, &gateway.url("public", "/v1/big")).await;
            if reply.status == 200 {
                break;
            }
            assert_eq!(reply.status, 503);
            refused += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(
        tokio::time::timeout(PATIENCE, served).await.is_ok(),
        "the reader that never reads held the model's limit"
    );
    assert!(refused > 0, "the limit was held while the client stalled");
    // Its connection is retired: GOAWAY, then closed.
    assert!(
        tokio::time::timeout(PATIENCE, connection).await.is_ok(),
        "the stalled connection was never closed"
    );
    let logged = gateway.wait_for_log(
        |l| l["message"] == "request" && l["error"] == "stream_idle_timeout",
        PATIENCE,
    );
    assert_eq!(logged["path"], "/v1/big");
}

#[tokio::test]
async fn oversized_header_blocks_get_431() {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let gateway = gateway("", &backend("model", "http1", &[model.addr]));
    let public = gateway.listener("public");
    let mut stream = TcpStream::connect(public).await.unwrap();
    let big = "a".repeat(100 * 1024);
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: models.test\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
    );
    // The proxy may answer and close before it has read everything.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    let head = answer.lines().next().unwrap_or_default();
    assert!(
        head.starts_with("HTTP/1.1 431"),
        "a 100 KiB header block: {head:?}"
    );
    assert_eq!(model.requests(), 0);
    // One within the default 64 KiB passes.
    let reply = get(&http1(), &gateway.url("public", "/v1/models")).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn out_of_file_descriptors_refuses_at_once_and_is_not_ready() {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let gateway = Gateway::start_with_open_files(
        &config(&[
            "kind: Listener\nmetadata: { name: public }\nspec: { address: 127.0.0.1:0, protocol: http }",
            &backend("model", "http1", &[model.addr]),
            &route_by_prefix(&[("/", "model")]),
        ]),
        64,
    );
    let public = gateway.listener("public");
    // Connections that say nothing hold a descriptor each, until the
    // proxy has none left.
    let mut hogs = Vec::new();
    let mut refused = None;
    for _ in 0..100 {
        let mut stream = TcpStream::connect(public).await.unwrap();
        let mut byte = [0u8; 1];
        // Refused connections are closed at once; accepted ones wait.
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                refused = Some(stream);
                break;
            }
            _ => hogs.push(stream),
        }
    }
    assert!(refused.is_some(), "no connection was refused");
    // With a few descriptors free again, the health server answers.
    hogs.truncate(hogs.len().saturating_sub(8));
    let client = http1();
    let ready = async {
        loop {
            let request = Request::get(format!("http://{}/ready", gateway.health))
                .body(http_body_util::Full::default())
                .unwrap();
            if let Ok(response) = client.request(request).await {
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (status, body) = tokio::time::timeout(PATIENCE, ready)
        .await
        .expect("/ready answers");
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("out of file descriptors"),
        "{body:?}"
    );
    let refused = metric_value(
        &metrics(gateway.health).await,
        "infermesh_downstream_connections_refused_total{listener=\"public\",reason=\"out_of_descriptors\"}",
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
}
