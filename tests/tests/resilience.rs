//! Resilience through a real gateway: retries on each retryable failure,
//! circuit-breaker limits, outlier ejection and health checks, mirroring,
//! the rate limit, and a load run across failing backends. The timing
//! logic itself (backoff, ejection lengths, token refill) is tested on
//! tokio's paused clock in the proxy's unit tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use infermesh_tests::backend::{self, Handler, MockBackend, Protocol};
use infermesh_tests::client::{self, HttpClient, Reply};
use infermesh_tests::process::{
    Gateway, backend_with, config, listener, route_by_prefix, route_with,
};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

async fn call(client: &HttpClient, method: &str, url: &str, body: &'static str) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    client::send(client, request)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// Answers every request with `status`.
fn answering(status: u16) -> Handler {
    Arc::new(move |_req: Request<Incoming>| {
        Box::pin(async move {
            let mut response = Response::new(backend::full("failing"));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
        })
    })
}

/// Answers 503 while `failing` is set, else echoes as `name`.
fn failing_while(name: &str, failing: Arc<AtomicBool>) -> Handler {
    let echo = backend::echo(name);
    Arc::new(move |req: Request<Incoming>| {
        if failing.load(Ordering::SeqCst) {
            answering(503)(req)
        } else {
            echo(req)
        }
    })
}

/// A TCP server that reads each request and closes the connection
/// without answering, as a crashing model server does. Counts requests.
async fn closing_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, seen)
}

/// An HTTP/2 server that refuses every stream with `REFUSED_STREAM`.
async fn refusing_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, seen)
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_retryable_failure_is_retried_on_another_endpoint() {
    let good = MockBackend::echo("good", Protocol::Http1).await;
    let good2 = MockBackend::echo("good2", Protocol::Http2).await;
    let unavailable = MockBackend::start(Protocol::Http1, answering(503)).await;
    let (closing, closing_seen) = closing_server().await;
    let (refusing, refusing_seen) = refusing_server().await;
    let closed = closed_port().await;
    // Each failing endpoint shares a backend with a good one; outlier
    // ejection is off so that every request can land on the bad one.
    let no_ejection = "outlierDetection: { consecutiveFailures: 0 }";
    let cases = [
        ("connect-failure", "http1", closed, good.addr, "POST"),
        ("refused-stream", "http2", refusing, good2.addr, "POST"),
        ("reset", "http1", closing, good.addr, "GET"),
        ("gateway-error", "http1", unavailable.addr, good.addr, "GET"),
    ];
    let mut docs = vec![listener("web", "http")];
    for (name, protocol, bad, good, _) in cases {
        docs.push(backend_with(name, protocol, &[bad, good], no_ejection));
    }
    docs.push(route_by_prefix(&[
        ("/connect-failure", "connect-failure"),
        ("/refused-stream", "refused-stream"),
        ("/reset", "reset"),
        ("/gateway-error", "gateway-error"),
    ]));
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let gateway = Gateway::start(&config(&docs));
    let client = client::http1();
    for (name, _, _, _, method) in cases {
        for i in 0..20 {
            let reply = call(
                &client,
                method,
                &gateway.url("web", &format!("/{name}")),
                "q",
            )
            .await;
            assert_eq!(reply.status, 200, "{name} request {i}: {reply:?}");
        }
    }
    assert!(unavailable.requests() > 0);
    assert!(closing_seen.load(Ordering::SeqCst) > 0);
    assert!(refusing_seen.load(Ordering::SeqCst) > 0);

    let text = client::metrics(gateway.health).await;
    for reason in [
        "connect-failure",
        "refused-stream",
        "reset",
        "gateway-error",
    ] {
        let series = format!("infermesh_retries_total{{reason=\"{reason}\",route=\"r\"}}");
        assert!(
            client::metric_value(&text, &series).is_some_and(|v| v > 0.0),
            "{series} in\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_that_may_have_reached_the_model_are_not_retried_for_post() {
    let unavailable = MockBackend::start(Protocol::Http1, answering(503)).await;
    let (closing, closing_seen) = closing_server().await;
    let not_found = MockBackend::start(Protocol::Http1, answering(404)).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend_with("b", "http1", &[unavailable.addr], ""),
        &backend_with("c", "http1", &[closing], ""),
        &backend_with("n", "http1", &[not_found.addr], ""),
        &route_by_prefix(&[("/unavailable", "b"), ("/closing", "c"), ("/missing", "n")]),
    ]));
    let client = client::http1();
    let reply = call(&client, "POST", &gateway.url("web", "/unavailable"), "q").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        unavailable.requests(),
        1,
        "a POST answered 503 is not retried"
    );

    let reply = call(&client, "POST", &gateway.url("web", "/closing"), "q").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.header("x-infermesh-error"), Some("upstream_reset"));
    assert_eq!(closing_seen.load(Ordering::SeqCst), 1, "nor one reset");

    let reply = call(&client, "GET", &gateway.url("web", "/missing"), "").await;
    assert_eq!(reply.status, 404);
    assert_eq!(not_found.requests(), 1, "a 404 is never retried");

    let reply = call(&client, "GET", &gateway.url("web", "/unavailable"), "").await;
    assert_eq!(reply.status, 503, "the last attempt's answer");
    assert_eq!(unavailable.requests(), 4, "a GET is tried 1 + 2 times");
}

/// Sends response headers and a first chunk, then (once the client has
/// them) breaks the connection.
fn breaks_mid_body() -> Handler {
    Arc::new(|_req: Request<Incoming>| {
        Box::pin(async {
            let chunks = futures_util::stream::unfold(0, |step| async move {
                match step {
                    0 => Some((
                        Ok(http_body::Frame::data(Bytes::from_static(b"first token"))),
                        1,
                    )),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Some((
                            Err::<http_body::Frame<Bytes>, backend::BoxError>(
                                "model crashed".into(),
                            ),
                            2,
                        ))
                    }
                    _ => None,
                }
            });
            Response::new(http_body_util::BodyExt::boxed(
                http_body_util::StreamBody::new(chunks),
            ))
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_retried_once_response_bytes_went_to_the_client() {
    let broken = MockBackend::start(Protocol::Http1, breaks_mid_body()).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend_with("b", "http1", &[broken.addr], ""),
        &route_with("b", ""),
    ]));
    let response = client::open(&client::http1(), &gateway.url("web", "/stream")).await;
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body()).await;
    assert!(body.is_err(), "the client sees the stream break");
    assert_eq!(broken.requests(), 1);
}

/// Holds every request until `release` turns true.
fn held(release: watch::Receiver<bool>) -> Handler {
    Arc::new(move |_req: Request<Incoming>| {
        let mut release = release.clone();
        Box::pin(async move {
            let _ = release.wait_for(|r| *r).await;
            Response::new(backend::full("done"))
        })
    })
}

/// Waits until the admin page shows `backend` with `requests` in flight.
async fn wait_in_flight(gateway: &Gateway, backend: &str, requests: u64) {
    let client = client::http1();
    for _ in 0..500 {
        let page = client::get(&client, &format!("http://{}/endpoints", gateway.admin))
            .await
            .json();
        let in_flight = page["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == backend)
            .map(|b| b["requestsInFlight"].as_u64().unwrap());
        if in_flight == Some(requests) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{backend} never had {requests} requests in flight");
}

/// Answers every request after `delay`.
fn slow(name: &str, delay: Duration) -> Handler {
    let echo = backend::echo(name);
    Arc::new(move |req: Request<Incoming>| {
        let answer = echo(req);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            answer.await
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_balancer_prefers_the_fast_endpoint() {
    let fast = MockBackend::echo("fast", Protocol::Http1).await;
    let sluggish =
        MockBackend::start(Protocol::Http1, slow("slow", Duration::from_millis(50))).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend_with("b", "http1", &[fast.addr, sluggish.addr], ""),
        &route_with("b", ""),
    ]));
    let url = gateway.url("web", "/v1/models");
    let mut clients = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let client = client::http1();
            for _ in 0..50 {
                assert_eq!(call(&client, "GET", &url, "").await.status, 200);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    // Round robin would give each 100; the slow one is tried now and then
    // as its estimate decays, no more.
    assert!(
        sluggish.requests() < 40,
        "fast {} slow {}",
        fast.requests(),
        sluggish.requests()
    );
    assert_eq!(fast.requests() + sluggish.requests(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_limit_sheds_with_503_at_its_count() {
    let (release, released) = watch::channel(false);
    let slow = MockBackend::start(Protocol::Http1, held(released)).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend_with(
            "requests",
            "http1",
            &[slow.addr],
            "circuitBreaker: { maxRequests: 2 }",
        ),
        &backend_with(
            "connections",
            "http1",
            &[slow.addr],
            "circuitBreaker: { maxConnections: 1, maxPendingRequests: 1 }",
        ),
        &route_by_prefix(&[("/requests", "requests"), ("/connections", "connections")]),
    ]));
    let url = |path: &str| gateway.url("web", path);
    let client = client::http1();
    let mut held_requests = Vec::new();
    for _ in 0..2 {
        let (client, url) = (client.clone(), url("/requests"));
        held_requests.push(tokio::spawn(
            async move { call(&client, "GET", &url, "").await },
        ));
    }
    wait_in_flight(&gateway, "requests", 2).await;
    let shed = call(&client, "GET", &url("/requests"), "").await;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.header("x-infermesh-error"), Some("overloaded"));
    assert!(
        shed.json()["error"]
            .as_str()
            .unwrap()
            .contains("circuitBreaker.maxRequests"),
        "{:?}",
        shed.json()
    );

    // One request on the one connection, one waiting for it; the third is
    // refused.
    for _ in 0..2 {
        let (client, url) = (client.clone(), url("/connections"));
        held_requests.push(tokio::spawn(
            async move { call(&client, "GET", &url, "").await },
        ));
    }
    wait_in_flight(&gateway, "connections", 2).await;
    let shed = call(&client, "GET", &url("/connections"), "").await;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.header("x-infermesh-error"), Some("overloaded"));

    release.send(true).unwrap();
    for request in held_requests {
        assert_eq!(request.await.unwrap().status, 200, "held requests finish");
    }
    let text = client::metrics(gateway.health).await;
    for (backend, limit) in [
        ("requests", "requests"),
        ("connections", "pending_requests"),
    ] {
        let series =
            format!("infermesh_overloaded_total{{backend=\"{backend}\",limit=\"{limit}\"}}");
        assert_eq!(client::metric_value(&text, &series), Some(1.0), "{series}");
    }
}

async fn endpoint_states(gateway: &Gateway, backend: &str) -> Vec<Value> {
    let page = client::get(
        &client::http1(),
        &format!("http://{}/endpoints", gateway.admin),
    )
    .await
    .json();
    page["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap()["endpoints"]
        .as_array()
        .unwrap()
        .clone()
}

async fn state_of(gateway: &Gateway, backend: &str, endpoint: SocketAddr) -> String {
    endpoint_states(gateway, backend)
        .await
        .iter()
        .find(|e| e["address"] == endpoint.to_string())
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn wait_for_state(gateway: &Gateway, backend: &str, endpoint: SocketAddr, state: &str) {
    for _ in 0..500 {
        if state_of(gateway, backend, endpoint).await == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{endpoint} never became {state}: {:?}",
        endpoint_states(gateway, backend).await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_failing_five_times_is_ejected_probed_and_restored() {
    let failing = Arc::new(AtomicBool::new(true));
    let flaky = MockBackend::start(Protocol::Http1, failing_while("flaky", failing.clone())).await;
    let steady = MockBackend::echo("steady", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend_with(
            "b",
            "http1",
            &[flaky.addr, steady.addr],
            "loadBalancer: { policy: roundRobin }\noutlierDetection: { baseEjectionTime: 300ms }",
        ),
        &route_with("b", "retry: { maxRetries: 0 }"),
    ]));
    let client = client::http1();
    let url = gateway.url("web", "/v1/models");
    // Round robin alternates: ten requests give the flaky one five.
    for _ in 0..10 {
        call(&client, "GET", &url, "").await;
    }
    assert_eq!(flaky.requests(), 5);
    assert_eq!(state_of(&gateway, "b", flaky.addr).await, "ejected");
    for _ in 0..10 {
        let reply = call(&client, "GET", &url, "").await;
        assert_eq!(reply.status, 200, "only the steady endpoint serves");
    }
    assert_eq!(flaky.requests(), 5);

    failing.store(false, Ordering::SeqCst);
    wait_for_state(&gateway, "b", flaky.addr, "probing").await;
    for _ in 0..2 {
        if flaky.requests() == 5 {
            call(&client, "GET", &url, "").await;
        }
    }
    assert_eq!(flaky.requests(), 6, "the probe");
    assert_eq!(state_of(&gateway, "b", flaky.addr).await, "healthy");
    for _ in 0..4 {
        call(&client, "GET", &url, "").await;
    }
    assert_eq!(flaky.requests(), 8, "back in the rotation");

    let text = client::metrics(gateway.health).await;
    assert_eq!(
        client::metric_value(&text, "infermesh_endpoint_ejections_total{backend=\"b\"}"),
        Some(1.0)
    );
    assert_eq!(
        client::metric_value(
            &text,
            "infermesh_endpoints{backend=\"b\",state=\"healthy\"}"
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_health_check_takes_an_endpoint_out_of_the_rotation() {
    let sick = Arc::new(AtomicBool::new(true));
    let checked = {
        let sick = sick.clone();
        let echo = backend::echo("checked");
        Arc::new(move |req: Request<Incoming>| {
            if req.uri().path() == "/health" && sick.load(Ordering::SeqCst) {
                answering(503)(req)
            } else {
                echo(req)
            }
        }) as Handler
    };
    let checked = MockBackend::start(Protocol::Http1, checked).await;
    let other = MockBackend::echo("other", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend_with(
            "b",
            "http1",
            &[checked.addr, other.addr],
            "healthCheck: { path: /health, interval: 50ms, unhealthyThreshold: 2, healthyThreshold: 1 }",
        ),
        &route_with("b", ""),
    ]));
    wait_for_state(&gateway, "b", checked.addr, "unhealthy").await;
    let client = client::http1();
    for _ in 0..10 {
        let reply = call(&client, "GET", &gateway.url("web", "/"), "").await;
        assert_eq!(reply.json()["backend"], "other");
    }
    sick.store(false, Ordering::SeqCst);
    wait_for_state(&gateway, "b", checked.addr, "healthy").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mirrored_copies_reach_the_shadow_and_never_change_the_answer() {
    let primary = MockBackend::echo("primary", Protocol::Http1).await;
    let (shadow_tx, mut shadow_rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let shadow_echo = backend::echo("shadow");
    let (release, released) = watch::channel(false);
    let shadow_handler: Handler = Arc::new(move |req: Request<Incoming>| {
        let echo = shadow_echo.clone();
        let tx = shadow_tx.clone();
        let mut released = released.clone();
        Box::pin(async move {
            let response = echo(req).await;
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            let _ = tx.send(serde_json::from_slice(&body).unwrap());
            // The shadow answers only after the client has its answer, and
            // fails: neither may show.
            let _ = released.wait_for(|r| *r).await;
            let mut failed = Response::new(backend::full("shadow failure"));
            *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            failed
        })
    });
    let shadow = MockBackend::start(Protocol::Http1, shadow_handler).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend_with("primary", "http1", &[primary.addr], ""),
        &backend_with("shadow", "http1", &[shadow.addr], ""),
        &route_with("primary", "mirror: { backend: shadow, percent: 100 }"),
    ]));
    let client = client::http1();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        call(
            &client,
            "POST",
            &gateway.url("web", "/v1/chat/completions"),
            "{\"prompt\":\"hi\"}",
        ),
    )
    .await
    .expect("the answer does not wait for the shadow");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["backend"], "primary");
    assert_eq!(reply.json()["body"], "{\"prompt\":\"hi\"}");

    let copy = tokio::time::timeout(Duration::from_secs(5), shadow_rx.recv())
        .await
        .expect("the copy arrives")
        .unwrap();
    assert_eq!(copy["method"], "POST");
    assert_eq!(copy["path"], "/v1/chat/completions");
    assert_eq!(copy["body"], "{\"prompt\":\"hi\"}");
    let host = copy["headers"]["host"].as_str().unwrap();
    assert!(host.contains("-shadow:"), "{host}");
    release.send(true).unwrap();
    let completed = "infermesh_mirrored_requests_total{backend=\"shadow\",result=\"completed\"}";
    client::wait_for_metric(
        gateway.health,
        completed,
        |n| n == 1.0,
        "the shadow's answer is read",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_answers_429_with_retry_after() {
    let upstream = MockBackend::echo("b", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend_with("b", "http1", &[upstream.addr], ""),
        &route_with("b", "rateLimit: { requestsPerSecond: 1, burst: 3 }"),
    ]));
    let client = client::http1();
    let url = gateway.url("web", "/");
    for _ in 0..3 {
        assert_eq!(call(&client, "GET", &url, "").await.status, 200);
    }
    let limited = call(&client, "GET", &url, "").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("x-infermesh-error"), Some("rate_limited"));
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(upstream.requests(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_idempotent_request_fails_while_backends_die_and_recover() {
    let steady = MockBackend::echo("steady", Protocol::Http1).await;
    let loading = Arc::new(AtomicBool::new(true));
    let warming =
        MockBackend::start(Protocol::Http1, failing_while("warming", loading.clone())).await;
    let mut doomed = MockBackend::echo("doomed", Protocol::Http1).await;
    let clients = 8;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        // Every client may be retrying at the moment an endpoint dies: the
        // backend's concurrent retries (3 by default, as Envoy's) and the
        // route's budget as large as the client count make them no limit
        // here (each is tested on its own). With the default, four
        // requests on the endpoint that dies fail one of them.
        &backend_with(
            "models",
            "http1",
            &[steady.addr, warming.addr, doomed.addr],
            &format!(
                "outlierDetection: {{ baseEjectionTime: 1s }}\ncircuitBreaker: {{ maxRetries: {clients} }}"
            ),
        ),
        &route_with(
            "models",
            &format!("retry: {{ budget: {{ minRetryConcurrency: {clients} }} }}"),
        ),
    ]));
    let url = gateway.url("web", "/v1/models");
    let load =
        client::SteadyLoad::start((0..clients).map(|_| client::http1()).collect(), move || {
            Request::get(&url).body(Full::default()).unwrap()
        });
    tokio::time::sleep(Duration::from_millis(800)).await;
    loading.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    doomed.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(ok > 100, "only {ok} requests");
    // The access log counts the retries behind an answer.
    gateway.wait_for_log(
        |l| {
            l["target"] == "infermesh::access"
                && l["status"] == 200
                && l["retries"].as_u64() >= Some(1)
        },
        Duration::from_secs(5),
    );
    assert!(warming.requests() > 0 && doomed.requests() > 0);
    let text = client::metrics(gateway.health).await;
    assert!(
        client::metric_value(
            &text,
            "infermesh_retries_total{reason=\"gateway-error\",route=\"r\"}"
        )
        .is_some_and(|v| v > 0.0),
        "{text}"
    );
}
