//! Protocols through a real gateway: HTTP/1.1 and HTTP/2 on both sides,
//! gRPC with its status in trailers, server-sent events arriving one by
//! one, and protocol upgrades tunnelled.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use infermesh_tests::backend::{Handler, MockBackend, Protocol, TestBody, scripted_stream};
use infermesh_tests::client;
use infermesh_tests::process::{Gateway, backend, config, listener, route_by_prefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn one_route(backend_name: &str) -> String {
    format!(
        "kind: Route\nmetadata: {{ name: r }}\nspec:\n  rules:\n    - backends: [{{ name: {backend_name} }}]"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_and_http2_on_either_side() {
    let h1 = MockBackend::echo("h1", Protocol::Http1).await;
    let h2 = MockBackend::echo("h2", Protocol::Http2).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("h1", "http1", &[h1.addr]),
        &backend("h2", "http2", &[h2.addr]),
        &route_by_prefix(&[("/h1", "h1"), ("/h2", "h2")]),
    ]));
    let base = gateway.url("web", "");
    for (client_version, client) in [
        (Version::HTTP_11, client::http1()),
        (Version::HTTP_2, client::http2()),
    ] {
        for (upstream, upstream_version) in [("h1", "HTTP/1.1"), ("h2", "HTTP/2.0")] {
            // HTTP/1.1 names the host in `Host`; HTTP/2 in `:authority`,
            // which the client takes from the URL.
            let mut request = Request::post(format!("{base}/{upstream}/infer?x=1"));
            let expected_host = if client_version == Version::HTTP_11 {
                request = request.header("host", "models.example.com");
                "models.example.com".to_owned()
            } else {
                gateway.listener("web").to_string()
            };
            let request = request
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{\"inputs\":[1,2,3]}")))
                .unwrap();
            let reply = client::send(&client, request).await.unwrap();
            let case = format!("{client_version:?} client -> {upstream}");
            assert_eq!(reply.status, 200, "{case}");
            assert_eq!(
                reply.version, client_version,
                "{case}: answered in the client's version"
            );
            let seen = reply.json();
            assert_eq!(seen["version"], upstream_version, "{case}");
            assert_eq!(seen["method"], "POST", "{case}");
            assert_eq!(seen["body"], "{\"inputs\":[1,2,3]}", "{case}");
            assert_eq!(seen["path"], format!("/{upstream}/infer?x=1"), "{case}");
            // The host the client asked for reaches the backend, as `Host`
            // over HTTP/1.1 and as `:authority` over HTTP/2.
            let host = if upstream == "h1" {
                &seen["headers"]["host"]
            } else {
                &seen["authority"]
            };
            assert_eq!(
                host.as_str(),
                Some(expected_host.as_str()),
                "{case}: {seen}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_work_end_to_end_with_status_in_trailers() {
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("models.Llama", ServingStatus::Serving)
        .await;
    let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc_listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                grpc_listener,
            )),
    );
    let gateway = Gateway::start(&config(&[
        &listener("grpc", "http2"),
        &backend("health", "http2", &[grpc_addr]),
        &one_route("health"),
    ]));
    let channel = tonic::transport::Channel::from_shared(gateway.url("grpc", ""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);

    let ok = client
        .check(HealthCheckRequest {
            service: "models.Llama".into(),
        })
        .await
        .expect("a unary call through the proxy");
    assert_eq!(ok.into_inner().status, ServingStatus::Serving as i32);

    let err = client
        .check(HealthCheckRequest {
            service: "models.Unknown".into(),
        })
        .await
        .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Both calls are HTTP 200; the access log and the metrics tell them
    // apart by their gRPC status (NOT_FOUND comes trailers-only).
    let logged = |status: u64| {
        gateway.wait_for_log(
            |l| l["message"] == "request" && l["grpc_status"] == status,
            Duration::from_secs(5),
        )
    };
    assert_eq!(logged(0)["status"], 200);
    assert_eq!(logged(5)["status"], 200);
    let metrics = client::metrics(gateway.health).await;
    for grpc_status in ["0", "5"] {
        let series = format!(
            "infermesh_requests_total{{backend=\"health\",code=\"200\",grpc_status=\"{grpc_status}\",route=\"r\"}}"
        );
        assert_eq!(
            client::metric_value(&metrics, &series),
            Some(1.0),
            "{metrics}"
        );
    }

    // A server stream: the first message arrives while the call stays open.
    let mut watch = client
        .watch(HealthCheckRequest {
            service: "models.Llama".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter
        .set_service_status("models.Llama", ServingStatus::NotServing)
        .await;
    let second = watch.message().await.unwrap().unwrap();
    assert_eq!(second.status, ServingStatus::NotServing as i32);
    server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn trailers_pass_through_unchanged() {
    let handler: Handler = Arc::new(|_req: Request<Incoming>| {
        Box::pin(async {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("13"));
            trailers.insert("grpc-message", HeaderValue::from_static("model exploded"));
            let frames = vec![
                Ok(Frame::data(Bytes::from_static(b"partial"))),
                Ok(Frame::trailers(trailers)),
            ];
            let body: TestBody = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap()
        })
    });
    let upstream = MockBackend::start(Protocol::Http2, handler).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http2"),
        &backend("m", "http2", &[upstream.addr]),
        &one_route("m"),
    ]));
    let client = client::http2();
    let request = Request::post(gateway.url("web", "/pkg.Service/Method"))
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "13");
    assert_eq!(trailers["grpc-message"], "model exploded");
    assert_eq!(collected.to_bytes(), "partial");
    // A failed call in an HTTP 200: its status is read from the trailers.
    let line = gateway.wait_for_log(|l| l["message"] == "request", Duration::from_secs(5));
    assert_eq!(line["grpc_status"], 13, "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_arrive_one_by_one_before_the_stream_ends() {
    for (name, client) in [("http1", client::http1()), ("http2", client::http2())] {
        let (handler, events) = scripted_stream();
        let upstream = MockBackend::start(Protocol::Http1, handler).await;
        let gateway = Gateway::start(&config(&[
            &listener("web", "http"),
            &backend("m", "http1", &[upstream.addr]),
            &one_route("m"),
        ]));
        let response = client
            .request(
                Request::post(gateway.url("web", "/v1/chat/completions"))
                    .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        for i in 0..5 {
            let event = format!("data: {{\"token\":{i}}}\n\n");
            events.send(Bytes::from(event.clone())).await.unwrap();
            // The next event is only written after this one arrived: nothing
            // may wait for the end of the stream.
            let frame = tokio::time::timeout(Duration::from_secs(5), next_data(&mut body))
                .await
                .unwrap_or_else(|_| {
                    panic!("{name}: event {i} did not arrive while the stream was open")
                });
            assert_eq!(frame, event, "{name}");
        }
        // The stream is in flight at its backend (what an autoscaler
        // reads) until it ends.
        let in_flight = "infermesh_upstream_requests_in_flight{backend=\"m\"}";
        let text = client::metrics(gateway.health).await;
        assert_eq!(client::metric_value(&text, in_flight), Some(1.0), "{name}");
        events
            .send(Bytes::from_static(b"data: [DONE]\n\n"))
            .await
            .unwrap();
        drop(events);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "data: [DONE]\n\n", "{name}");
        client::wait_for_metric(gateway.health, in_flight, |v| v == 0.0, "the stream ended").await;
    }
}

async fn next_data(body: &mut Incoming) -> String {
    loop {
        let frame = body
            .frame()
            .await
            .expect("stream still open")
            .expect("no error");
        if let Ok(data) = frame.into_data() {
            return String::from_utf8(data.to_vec()).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upgraded_connections_are_tunnelled() {
    // A backend that switches to a line echo protocol.
    let handler: Handler = Arc::new(|mut req: Request<Incoming>| {
        Box::pin(async move {
            assert_eq!(req.headers()["upgrade"], "echo");
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let upgraded = upgrade.await.expect("upgrade completes");
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let mut buf = [0u8; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    io.write_all(&buf[..n]).await.unwrap();
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(infermesh_tests::backend::full(Bytes::new()))
                .unwrap()
        })
    });
    let upstream = MockBackend::start(Protocol::Http1, handler).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("ws", "http1", &[upstream.addr]),
        &one_route("ws"),
    ]));
    let mut stream = tokio::net::TcpStream::connect(gateway.listener("web"))
        .await
        .unwrap();
    stream
        .write_all(b"GET /socket HTTP/1.1\r\nhost: models.local\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    for message in ["hello", "tokens flow both ways"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; message.len()];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, message.as_bytes());
    }
    // The tunnel's upstream connection still counts, against the
    // backend's connection limit too, until the tunnel closes.
    let open = "infermesh_upstream_connections{backend=\"ws\"}";
    let text = client::metrics(gateway.health).await;
    assert_eq!(client::metric_value(&text, open), Some(1.0), "{text}");
    drop(stream);
    client::wait_for_metric(
        gateway.health,
        open,
        |open| open == 0.0,
        "the tunnel's connection is uncounted once it closed",
    )
    .await;
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}
