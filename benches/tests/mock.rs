//! The mock model server answers as OpenAI-compatible and KServe v2 servers
//! do, and behaves as its scenario says: faults, cancellations, queues.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infermesh_bench::mock::{ErrorRule, Fault, MockServer, ModelSpec, Scenario, ServerSpec};
use serde_json::{Value, json};

fn ms(v: u64) -> infermesh_api::Duration {
    infermesh_api::Duration::from_millis(v)
}

async fn start(models: Vec<ModelSpec>) -> (String, SocketAddr) {
    let spec = ServerSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        models,
    };
    let server = MockServer::bind(&spec, 5).await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.serve());
    (format!("http://{addr}"), addr)
}

async fn default_mock() -> String {
    start(vec![
        ModelSpec::simple("llama", ms(1), ms(1), 5),
        ModelSpec::simple("mistral", ms(1), ms(1), 5),
    ])
    .await
    .0
}

async fn call(
    method: &str,
    url: String,
    body: Option<Value>,
) -> Result<(u16, String, Bytes), String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body))
        .unwrap();
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok((status, content_type, body))
}

fn json_of(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[tokio::test]
async fn openai_chat_whole_and_streamed() {
    let base = default_mock().await;
    let (status, _, body) = call(
        "POST",
        format!("{base}/v1/chat/completions"),
        Some(json!({ "model": "llama", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 3 })),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let answer = json_of(&body);
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "llama");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "token0 token1 token2 "
    );
    assert_eq!(answer["usage"]["completion_tokens"], 3);

    let (status, content_type, body) = call(
        "POST",
        format!("{base}/v1/chat/completions"),
        Some(json!({ "model": "mistral", "messages": [], "stream": true })),
    )
    .await
    .unwrap();
    assert_eq!((status, content_type.as_str()), (200, "text/event-stream"));
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(
        events.len(),
        5 + 2,
        "one event per token, a finish event, and [DONE]"
    );
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let first: Value = serde_json::from_str(events[0].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(
        first["choices"][0]["delta"],
        json!({ "role": "assistant", "content": "token0 " })
    );
    let finish: Value = serde_json::from_str(events[5].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
}

/// The `data` of each event of an SSE body.
fn sse_data(body: &Bytes) -> Vec<String> {
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn openai_streams_carry_usage_when_asked_as_the_whole_answer_does() {
    let base = default_mock().await;
    for (path, prompt) in [
        (
            "chat/completions",
            json!({ "messages": [
                { "role": "system", "content": "Be brief." },
                { "role": "user", "content": [{ "type": "text", "text": "What is the capital of France?" }] },
            ] }),
        ),
        (
            "completions",
            json!({ "prompt": "The capital of France is" }),
        ),
    ] {
        let request = |extra: Value| {
            let mut body = json!({ "model": "llama", "max_tokens": 4 });
            for (k, v) in prompt
                .as_object()
                .unwrap()
                .iter()
                .chain(extra.as_object().unwrap())
            {
                body[k] = v.clone();
            }
            Some(body)
        };
        let url = format!("{base}/v1/{path}");
        let (_, _, whole) = call("POST", url.clone(), request(json!({}))).await.unwrap();
        let usage = json_of(&whole)["usage"].clone();
        assert_eq!(usage["completion_tokens"], 4, "{path}: {usage}");
        let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
        assert!(prompt_tokens > 0, "{path}: {usage}");
        assert_eq!(usage["total_tokens"], prompt_tokens + 4, "{path}");

        // Asked for: every chunk says `usage: null`, and one last chunk
        // before [DONE] has no choices and the whole answer's usage.
        let (status, _, streamed) = call(
            "POST",
            url.clone(),
            request(json!({ "stream": true, "stream_options": { "include_usage": true } })),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let events = sse_data(&streamed);
        assert_eq!(events.len(), 4 + 3, "{path}: tokens, finish, usage, [DONE]");
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let (last, others) = chunks.split_last().unwrap();
        assert_eq!(last["choices"], json!([]), "{path}");
        assert_eq!(
            last["usage"], usage,
            "{path}: the same counts as the whole answer"
        );
        assert_eq!(last["id"], others[0]["id"], "{path}");
        for chunk in others {
            assert_eq!(chunk["usage"], Value::Null, "{path}: {chunk}");
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1, "{path}");
        }

        // Not asked for (or declined): the stream is as before, without
        // usage.
        for extra in [
            json!({ "stream": true }),
            json!({ "stream": true, "stream_options": { "include_usage": false } }),
        ] {
            let (_, _, streamed) = call("POST", url.clone(), request(extra.clone()))
                .await
                .unwrap();
            let events = sse_data(&streamed);
            assert_eq!(events.len(), 4 + 2, "{path} {extra}");
            assert!(
                events.iter().all(|e| !e.contains("usage")),
                "{path} {extra}: {events:?}"
            );
        }
    }
}

#[tokio::test]
async fn openai_embeddings_errors_and_model_list() {
    let base = default_mock().await;
    let (status, _, body) = call(
        "POST",
        format!("{base}/v1/embeddings"),
        Some(json!({ "model": "llama", "input": ["a", "b"] })),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let e = json_of(&body);
    assert_eq!(e["data"].as_array().unwrap().len(), 2);
    let v: Vec<f64> = serde_json::from_value(e["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v.len(), 8);
    assert!(
        (v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-9,
        "unit length"
    );

    let (status, _, body) = call(
        "POST",
        format!("{base}/v1/completions"),
        Some(json!({ "model": "gpt-9", "prompt": "x" })),
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    assert_eq!(
        json_of(&body)["error"]["message"],
        "The model `gpt-9` does not exist."
    );
    assert_eq!(
        call(
            "POST",
            format!("{base}/v1/completions"),
            Some(json!({ "prompt": "x" }))
        )
        .await
        .unwrap()
        .0,
        400
    );
    let (status, _, body) = call("GET", format!("{base}/v1/models"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let ids: Vec<Value> = json_of(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("llama"), json!("mistral")]);
}

#[tokio::test]
async fn kserve_v2_identity_inference_and_health() {
    let base = default_mock().await;
    let request = json!({
        "id": "req-1",
        "inputs": [{ "name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0] }],
    });
    let (status, _, body) = call(
        "POST",
        format!("{base}/v2/models/llama/infer"),
        Some(request),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        json_of(&body),
        json!({
            "model_name": "llama",
            "model_version": "1",
            "id": "req-1",
            "outputs": [{ "name": "output_x", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0] }],
        })
    );
    assert_eq!(
        call(
            "POST",
            format!("{base}/v2/models/nope/infer"),
            Some(json!({}))
        )
        .await
        .unwrap()
        .0,
        404
    );
    assert_eq!(
        call(
            "POST",
            format!("{base}/v2/models/llama/infer"),
            Some(json!({ "inputs": [] }))
        )
        .await
        .unwrap()
        .0,
        400
    );
    assert_eq!(
        call("GET", format!("{base}/v2/health/ready"), None)
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        call("GET", format!("{base}/v2/models/llama/ready"), None)
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        json_of(
            &call("GET", format!("{base}/v2/models/mistral"), None)
                .await
                .unwrap()
                .2
        )["name"],
        "mistral"
    );
}

/// The value of `series` once it reaches `want`, or its last value after
/// two seconds: the server counts a cancellation when it notices the
/// client left, a moment after the client does.
async fn eventually(base: &str, series: &str, want: f64) -> f64 {
    let mut value = metric(base, series).await;
    for _ in 0..100 {
        if value == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        value = metric(base, series).await;
    }
    value
}

async fn metric(base: &str, series: &str) -> f64 {
    let page = String::from_utf8(
        call("GET", format!("{base}/metrics"), None)
            .await
            .unwrap()
            .2
            .to_vec(),
    )
    .unwrap();
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in:\n{page}"))
}

#[tokio::test]
async fn injected_faults_reset_hang_and_fail() {
    let fault = |name: &str, f: Fault| {
        let mut m = ModelSpec::simple(name, ms(0), ms(0), 1);
        m.errors = vec![ErrorRule {
            percent: 100.0,
            fault: f,
        }];
        m
    };
    let (base, _) = start(vec![
        fault("failing", Fault::Status(503)),
        fault("resetting", Fault::Reset),
        fault("hanging", Fault::Hang),
    ])
    .await;
    let ask = |model: &str| {
        call(
            "POST",
            format!("{base}/v1/completions"),
            Some(json!({ "model": model, "prompt": "x" })),
        )
    };
    assert_eq!(ask("failing").await.unwrap().0, 503);
    assert!(
        ask("resetting").await.is_err(),
        "the connection is aborted without an answer"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ask("hanging"))
            .await
            .is_err(),
        "never answers"
    );
    // The hanging request's client went away: a cancellation.
    assert_eq!(
        eventually(
            &base,
            "infermesh_mock_cancellations_total{model_name=\"hanging\"}",
            1.0
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &base,
            "infermesh_mock_requests_total{model_name=\"failing\",outcome=\"error\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &base,
            "infermesh_mock_requests_total{model_name=\"resetting\",outcome=\"reset\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_stream_the_client_abandons_is_counted_as_cancelled() {
    let (base, _) = start(vec![ModelSpec::simple("slow", ms(0), ms(200), 20)]).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({ "model": "slow", "prompt": "x", "stream": true }).to_string();
    let response = client
        .request(
            Request::post(format!("{base}/v1/completions"))
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut stream = response.into_body();
    stream.frame().await.unwrap().unwrap();
    assert_eq!(
        metric(&base, "vllm:num_requests_running{model_name=\"slow\"}").await,
        1.0
    );
    drop(stream);
    drop(client);
    assert_eq!(
        eventually(
            &base,
            "infermesh_mock_cancellations_total{model_name=\"slow\"}",
            1.0
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&base, "vllm:num_requests_running{model_name=\"slow\"}").await,
        0.0
    );
}

#[tokio::test]
async fn requests_past_max_concurrency_wait_in_the_queue() {
    let mut model = ModelSpec::simple("busy", ms(300), ms(0), 1);
    model.max_concurrency = Some(1);
    let (base, _) = start(vec![model]).await;
    let ask = || {
        call(
            "POST",
            format!("{base}/v1/completions"),
            Some(json!({ "model": "busy", "prompt": "x" })),
        )
    };
    let (a, b, page) = tokio::join!(ask(), ask(), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (
            metric(&base, "vllm:num_requests_running{model_name=\"busy\"}").await,
            metric(&base, "vllm:num_requests_waiting{model_name=\"busy\"}").await,
        )
    });
    assert_eq!(page, (1.0, 1.0), "one running, one waiting");
    assert_eq!((a.unwrap().0, b.unwrap().0), (200, 200));
}

#[tokio::test]
async fn one_scenario_runs_several_servers() {
    let text = "seed: 3\nservers:\n  - listen: 127.0.0.1:0\n    models: [{ name: a }]\n  - listen: 127.0.0.1:0\n    models: [{ name: b }, { name: c }]\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yaml");
    std::fs::write(&path, text).unwrap();
    let scenario = Scenario::load(&path).unwrap();
    let servers = infermesh_bench::mock::bind_all(&scenario).await.unwrap();
    let names: Vec<Vec<String>> = servers.iter().map(|s| s.model_names()).collect();
    assert_eq!(
        names,
        [vec!["a".to_owned()], vec!["b".to_owned(), "c".to_owned()]]
    );
    assert_ne!(servers[0].local_addr(), servers[1].local_addr());
}

#[tokio::test]
async fn the_otlp_collector_acknowledges_trace_exports_and_counts_them() {
    let base = default_mock().await;
    assert_eq!(
        metric(&base, "infermesh_mock_otlp_exports_total").await,
        0.0
    );
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    // What it gets is counted, not decoded: any bytes will do.
    let export = Bytes::from_static(b"\x0a\x05hello");
    for _ in 0..2 {
        let request = Request::builder()
            .method("POST")
            .uri(format!("{base}/v1/traces"))
            .header("content-type", "application/x-protobuf")
            .body(Full::new(export.clone()))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/x-protobuf");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "an empty ExportTraceServiceResponse");
    }
    assert_eq!(
        metric(&base, "infermesh_mock_otlp_exports_total").await,
        2.0
    );
    assert_eq!(
        metric(&base, "infermesh_mock_otlp_bytes_total").await,
        2.0 * export.len() as f64
    );
    let (status, _, _) = call("GET", format!("{base}/v1/traces"), None)
        .await
        .unwrap();
    assert_eq!(status, 404, "only POST is an export");
}
