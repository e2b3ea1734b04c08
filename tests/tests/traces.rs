//! Distributed tracing through real proxies: spans exported over OTLP
//! (gRPC and HTTP/protobuf) to a receiver the test runs, W3C context
//! carried to the model server, and sampling.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use infermesh_tests::backend::{self, Handler, MockBackend, Protocol};
use infermesh_tests::client;
use infermesh_tests::otlp::{OtlpReceiver, ReceivedSpan};
use infermesh_tests::process::{Gateway, backend, config, listener, route_with};
use nix::sys::signal::Signal;

/// Answers 503 to the first request, then echoes.
fn unavailable_once() -> Handler {
    let calls = Arc::new(AtomicUsize::new(0));
    let echo = backend::echo("model");
    Arc::new(move |request| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Box::pin(async {
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(backend::full("busy"))
                    .unwrap()
            })
        } else {
            echo(request)
        }
    })
}

/// A gateway with one listener `web` and one route to `to`, exporting
/// its spans as `service` with `trace_args`.
fn traced_gateway(to: std::net::SocketAddr, service: &str, trace_args: &[&str]) -> Gateway {
    let mut args = vec!["--trace-service-name", service, "--drain-delay", "0s"];
    args.extend_from_slice(trace_args);
    Gateway::start_with_args(
        &config(&[
            &listener("web", "http"),
            &backend("next", "http1", &[to]),
            &route_with("next", ""),
        ]),
        &args,
    )
}

/// Stops `gateway` with SIGTERM: it exports the spans it still holds
/// before it exits.
fn stop(mut gateway: Gateway) {
    gateway.signal(Signal::SIGTERM);
    let status = gateway.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit: {status:?}\n{}", gateway.dump());
}

fn named<'a>(spans: &'a [ReceivedSpan], service: &str, kind: i32) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.service == service && s.span.kind == kind)
        .collect()
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread")]
async fn a_request_through_two_proxies_and_a_retry_is_one_trace() {
    let receiver = OtlpReceiver::start().await;
    let model = MockBackend::start(Protocol::Http1, unavailable_once()).await;
    let grpc = format!("http://{}", receiver.grpc);
    let http = format!("http://{}", receiver.http);
    let inner = traced_gateway(
        model.addr,
        "inner",
        &[
            "--trace-otlp-endpoint",
            &http,
            "--trace-otlp-protocol",
            "http/protobuf",
        ],
    );
    let edge = traced_gateway(
        inner.listener("web"),
        "edge",
        &[
            "--trace-otlp-endpoint",
            &grpc,
            "--trace-otlp-protocol",
            "grpc",
        ],
    );

    // GET: a 503 to a POST is not retried (it may have reached the model).
    let request = Request::get(edge.url("web", "/v1/models"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("x-request-id", "trace-me")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = client::send(&client::http1(), request).await.unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    // The model server got the trace, its parent the inner proxy's
    // second attempt.
    let at_model = reply.json()["headers"]["traceparent"]
        .as_str()
        .expect("traceparent reached the model server")
        .to_owned();
    assert!(
        at_model.starts_with(&format!("00-{CLIENT_TRACE}-")) && at_model.ends_with("-01"),
        "{at_model}"
    );

    let logged = edge.wait_for_log(
        |l| l["target"] == "infermesh::access" && l["request_id"] == "trace-me",
        Duration::from_secs(5),
    );
    stop(edge);
    stop(inner);
    let spans = receiver
        .wait_for(|spans| spans.len() >= 5, Duration::from_secs(10))
        .await;
    assert_eq!(spans.len(), 5, "{spans:#?}");
    assert!(
        spans.iter().all(|s| s.trace_id() == CLIENT_TRACE),
        "{spans:#?}"
    );

    let [edge_server] = named(&spans, "edge", SERVER)[..] else {
        panic!("one edge server span: {spans:#?}")
    };
    let [edge_client] = named(&spans, "edge", CLIENT)[..] else {
        panic!("one edge client span: {spans:#?}")
    };
    let [inner_server] = named(&spans, "inner", SERVER)[..] else {
        panic!("one inner server span: {spans:#?}")
    };
    let mut inner_clients = named(&spans, "inner", CLIENT);
    inner_clients.sort_by_key(|s| s.span.start_time_unix_nano);
    let [first, retry] = inner_clients[..] else {
        panic!("two inner attempts: {spans:#?}")
    };

    // Parents: client → edge server → edge attempt → inner server →
    // both inner attempts.
    assert_eq!(edge_server.parent_id(), CLIENT_SPAN);
    assert_eq!(edge_client.parent_id(), edge_server.span_id());
    assert_eq!(inner_server.parent_id(), edge_client.span_id());
    assert_eq!(first.parent_id(), inner_server.span_id());
    assert_eq!(retry.parent_id(), inner_server.span_id());
    assert_eq!(
        at_model,
        format!("00-{CLIENT_TRACE}-{}-01", retry.span_id())
    );

    // Names and attributes (the OpenTelemetry HTTP conventions).
    assert_eq!(edge_server.span.name, "GET r");
    assert_eq!(
        edge_server.text("http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(edge_server.text("url.path").as_deref(), Some("/v1/models"));
    assert_eq!(
        edge_server.text("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(edge_server.text("infermesh.route").as_deref(), Some("r"));
    assert_eq!(
        edge_server.text("infermesh.request_id").as_deref(),
        Some("trace-me")
    );
    assert_eq!(
        inner_server.text("infermesh.request_id").as_deref(),
        Some("trace-me")
    );
    assert_eq!(inner_server.text("infermesh.retries").as_deref(), Some("1"));
    assert_eq!(first.span.name, "GET");
    assert_eq!(
        first.text("http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(first.text("error.type").as_deref(), Some("503"));
    assert_eq!(first.text("http.request.resend_count"), None);
    assert_eq!(
        retry.text("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        retry.text("http.request.resend_count").as_deref(),
        Some("1")
    );
    assert_eq!(retry.text("infermesh.backend").as_deref(), Some("next"));
    assert_eq!(
        retry.text("server.port"),
        Some(model.addr.port().to_string())
    );
    // The access line names the trace and the request's span.
    assert_eq!(logged["trace_id"], CLIENT_TRACE);
    assert_eq!(logged["span_id"], edge_server.span_id());
    // A child lies within its parent.
    assert!(first.span.start_time_unix_nano >= inner_server.span.start_time_unix_nano);
    assert!(edge_server.span.end_time_unix_nano >= edge_client.span.end_time_unix_nano);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_sampling_off_nothing_is_sent_and_the_context_still_goes_upstream() {
    let receiver = OtlpReceiver::start().await;
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let grpc = format!("http://{}", receiver.grpc);
    let gateway = traced_gateway(
        model.addr,
        "edge",
        &[
            "--trace-otlp-endpoint",
            &grpc,
            "--trace-otlp-protocol",
            "grpc",
            "--trace-sampling",
            "0",
        ],
    );
    let client = client::http1();
    for _ in 0..20 {
        let reply = client::get(&client, &gateway.url("web", "/v1/models")).await;
        assert_eq!(reply.status, 200);
        // A new trace, not sampled: the model server may continue it
        // with the same decision.
        let sent = reply.json()["headers"]["traceparent"]
            .as_str()
            .expect("a traceparent goes upstream")
            .to_owned();
        assert!(sent.starts_with("00-") && sent.ends_with("-00"), "{sent}");
    }
    // Parent-based: a caller that sampled its trace is still recorded,
    // which also shows this proxy's export works.
    let sampled = Request::get(gateway.url("web", "/v1/models"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client::send(&client, sampled).await.unwrap().status, 200);
    let metrics = client::metrics(gateway.health).await;
    assert_eq!(
        client::metric_value(&metrics, "infermesh_trace_spans_dropped_total"),
        Some(0.0)
    );
    stop(gateway);
    // Only the sampled caller's request: its server span and its attempt.
    let spans = receiver.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(
        spans.iter().all(|s| s.trace_id() == CLIENT_TRACE),
        "{spans:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hedges_and_fan_out_branches_are_attempts_of_their_request() {
    let receiver = OtlpReceiver::start().await;
    // The stalled endpoint never answers in time: a request whose first
    // attempt goes there is hedged to the other, and the stall cancelled.
    let stalled = MockBackend::start(
        Protocol::Http2,
        Arc::new(|_| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Response::new(backend::full("late"))
            })
        }),
    )
    .await;
    let fast = MockBackend::echo("fast", Protocol::Http2).await;
    let a = MockBackend::echo("a", Protocol::Http1).await;
    let b = MockBackend::echo("b", Protocol::Http1).await;
    let grpc = format!("http://{}", receiver.grpc);
    let gateway = Gateway::start_with_args(
        &config(&[
            &listener("web", "http"),
            // Round robin by weight: two first attempts in three go to the
            // stalled endpoint.
            &format!(
                "kind: Backend\nmetadata: {{ name: model }}\nspec:\n  protocol: http2\n  loadBalancer: {{ policy: roundRobin }}\n  endpoints:\n    - {{ address: \"{}\", weight: 2 }}\n    - {{ address: \"{}\", weight: 1 }}",
                stalled.addr, fast.addr
            ),
            &backend("a", "http1", &[a.addr]),
            &backend("b", "http1", &[b.addr]),
            r#"kind: Route
metadata: { name: r }
spec:
  rules:
    - matches: [{ path: { prefix: /hedged } }]
      backends: [{ name: model }]
      hedge: { delay: 50ms }
      retry: { maxRetries: 0 }
    - matches: [{ path: { prefix: /fan } }]
      fanout: { strategy: all, branches: [{ name: left, backend: a }, { name: right, backend: b }] }"#,
        ]),
        &[
            "--trace-otlp-endpoint",
            &grpc,
            "--trace-otlp-protocol",
            "grpc",
            "--drain-delay",
            "0s",
        ],
    );
    let client = client::http1();
    for _ in 0..3 {
        let reply = client::get(&client, &gateway.url("web", "/hedged")).await;
        assert_eq!(reply.header("x-backend"), Some("fast"), "{reply:?}");
    }
    let request = Request::post(gateway.url("web", "/fan"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"input\":1}")))
        .unwrap();
    let fanned = client::send(&client, request).await.unwrap();
    assert_eq!(fanned.status, 200, "{fanned:?}");
    stop(gateway);

    let spans = receiver.spans();
    let servers = named(&spans, "infermesh-proxy", SERVER);
    assert_eq!(servers.len(), 4, "{spans:#?}");
    let children = |server: &ReceivedSpan| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.parent_id() == server.span_id())
            .cloned()
            .collect()
    };
    let mut hedged = 0;
    for server in servers
        .iter()
        .filter(|s| s.text("url.path").as_deref() == Some("/hedged"))
    {
        let attempts = children(server);
        if attempts.len() == 1 {
            // Round robin sent this one to the fast endpoint first.
            assert_eq!(
                attempts[0].text("infermesh.outcome").as_deref(),
                Some("response")
            );
            continue;
        }
        hedged += 1;
        let [first, hedge] = &attempts[..] else {
            panic!("a first attempt and a hedge: {attempts:#?}")
        };
        let (first, hedge) = if first.text("infermesh.hedge").is_some() {
            (hedge, first)
        } else {
            (first, hedge)
        };
        assert_eq!(hedge.text("infermesh.hedge").as_deref(), Some("true"));
        assert_eq!(hedge.text("infermesh.outcome").as_deref(), Some("response"));
        assert_eq!(
            hedge.text("server.port"),
            Some(fast.addr.port().to_string())
        );
        assert_eq!(
            first.text("infermesh.outcome").as_deref(),
            Some("cancelled")
        );
        assert_eq!(
            first.text("server.port"),
            Some(stalled.addr.port().to_string())
        );
    }
    assert!(
        hedged >= 1,
        "round robin sends a first attempt to the stall: {spans:#?}"
    );

    let [fan] = servers
        .iter()
        .filter(|s| s.text("url.path").as_deref() == Some("/fan"))
        .collect::<Vec<_>>()[..]
    else {
        panic!("one fan-out request: {spans:#?}")
    };
    let mut branches: Vec<(String, String, String)> = children(fan)
        .iter()
        .map(|s| {
            (
                s.text("infermesh.fanout.branch").unwrap_or_default(),
                s.text("infermesh.backend").unwrap_or_default(),
                s.text("infermesh.outcome").unwrap_or_default(),
            )
        })
        .collect();
    branches.sort();
    assert_eq!(
        branches,
        [
            ("left".into(), "a".into(), "response".into()),
            ("right".into(), "b".into(), "response".into())
        ]
    );
}

/// A gateway's config, as the control plane's directory holds it, with
/// the route's timeout `timeout` (changing it makes a new version).
fn mesh_documents(model: std::net::SocketAddr, timeout: &str) -> String {
    infermesh_tests::mesh::gateway_mesh(
        model,
        &format!("timeouts: {{ responseHeaders: {timeout} }}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_push_and_the_proxys_apply_are_one_trace() {
    use infermesh_tests::mesh::{ControlPlane, MeshFiles};

    let receiver = OtlpReceiver::start().await;
    let model = MockBackend::echo("llama", Protocol::Http1).await;
    let files = MeshFiles::new(&mesh_documents(model.addr, "30s"));
    let credential = files.credential("edge", "gateway", "1h");
    let grpc = format!("http://{}", receiver.grpc);
    let http = format!("http://{}", receiver.http);
    let mut control_plane = ControlPlane::start(
        &files,
        None,
        &[
            "--heartbeat",
            "1s",
            "--trace-otlp-endpoint",
            &grpc,
            "--trace-otlp-protocol",
            "grpc",
        ],
    );
    let mut args = files.proxy_args(&[control_plane.grpc], "edge-0", &credential, &[]);
    args.extend(["--trace-otlp-endpoint", &http, "--drain-delay", "0s"].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = Gateway::start_from_control_plane("gateway", &args);
    control_plane.wait_synced(1, Duration::from_secs(20)).await;
    files.write("mesh.yaml", &mesh_documents(model.addr, "20s"));
    // Both updates (the first config, the change) pushed, applied and
    // acknowledged.
    let both = |spans: &[ReceivedSpan]| {
        spans
            .iter()
            .filter(|s| s.text("infermesh.outcome").as_deref() == Some("ack"))
            .count()
            >= 2
    };
    let spans = receiver.wait_for(both, Duration::from_secs(20)).await;
    assert!(both(&spans), "{spans:#?}");
    stop(gateway);
    control_plane.signal(Signal::SIGTERM);
    assert!(
        control_plane
            .wait_exit(Duration::from_secs(15))
            .is_some_and(|s| s.success())
    );

    let spans = receiver.spans();
    let pushes: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == "infermesh-control-plane")
        .collect();
    assert_eq!(pushes.len(), 2, "{spans:#?}");
    let mut versions = Vec::new();
    for push in pushes {
        assert_eq!(push.span.name, "push config");
        assert_eq!(push.span.kind, 4, "a producer span");
        assert_eq!(push.text("infermesh.proxy.node").as_deref(), Some("edge-0"));
        assert_eq!(
            push.text("infermesh.proxy.identity").as_deref(),
            Some("spiffe://cluster.local/ns/edge/sa/gateway")
        );
        let applied: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.parent_id() == push.span_id())
            .collect();
        let [apply] = applied[..] else {
            panic!("one apply span under the push: {spans:#?}")
        };
        assert_eq!(apply.service, "infermesh-proxy");
        assert_eq!(apply.trace_id(), push.trace_id());
        assert_eq!(apply.span.name, "apply config");
        assert_eq!(apply.text("infermesh.outcome").as_deref(), Some("applied"));
        assert_eq!(
            apply.text("infermesh.version"),
            push.text("infermesh.version")
        );
        // The push lasts until the proxy's answer: the apply lies within.
        assert!(apply.span.start_time_unix_nano >= push.span.start_time_unix_nano);
        assert!(apply.span.end_time_unix_nano <= push.span.end_time_unix_nano);
        versions.push(push.text("infermesh.version").unwrap());
    }
    versions.dedup();
    assert_eq!(versions.len(), 2, "two versions: {versions:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_models_answer_puts_its_model_and_tokens_on_the_span() {
    use infermesh_tests::models::MockModels;

    let receiver = OtlpReceiver::start().await;
    let models = MockModels::start(
        "servers:\n  - listen: 127.0.0.1:0\n    models:\n      - { name: llama, latency: { fixed: 5ms }, reply: \"Paris is the capital of France.\" }\n",
    );
    let http = format!("http://{}", receiver.http);
    let gateway = Gateway::start_with_args(
        &config(&[
            &listener("web", "http"),
            &backend("models", "http1", &[models.servers[0]]),
            r#"kind: Route
metadata: { name: chat }
spec:
  rules:
    - matches: [{ path: { prefix: /v1 }, model: llama }]
      backends: [{ name: models }]"#,
        ]),
        &["--trace-otlp-endpoint", &http, "--drain-delay", "0s"],
    );
    let request = Request::post(gateway.url("web", "/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            r#"{"model":"llama","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"What is the capital of France?"}]}"#,
        )))
        .unwrap();
    let reply = client::send(&client::http1(), request).await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    // The model's own count, from the stream's last chunk.
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let usage_chunk = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .last()
        .unwrap();
    let usage: serde_json::Value = serde_json::from_str(usage_chunk).unwrap();
    stop(gateway);

    let spans = receiver.spans();
    let [server] = named(&spans, "infermesh-proxy", SERVER)[..] else {
        panic!("one request: {spans:#?}")
    };
    assert_eq!(
        server.text("gen_ai.request.model").as_deref(),
        Some("llama")
    );
    assert_eq!(
        server.text("gen_ai.usage.input_tokens"),
        Some(usage["usage"]["prompt_tokens"].to_string())
    );
    assert_eq!(
        server.text("gen_ai.usage.output_tokens"),
        Some(usage["usage"]["completion_tokens"].to_string())
    );
    assert!(server.text("infermesh.time_to_first_token_ms").is_some());
}
