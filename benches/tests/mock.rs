//! The mock model server answers as OpenAI-compatible and KServe v2 servers
//! do, deterministically.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infermesh_bench::mock::{self, MockOptions};
use serde_json::{Value, json};

async fn start() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let options = MockOptions {
        models: vec!["llama".into(), "mistral".into()],
        tokens: 5,
        latency: Duration::from_millis(1),
        token_interval: Duration::from_millis(1),
    };
    tokio::spawn(mock::serve(listener, options));
    format!("http://{addr}")
}

async fn call(method: &str, url: String, body: Option<Value>) -> (u16, String, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (
        status,
        content_type,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

fn json_of(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[tokio::test]
async fn openai_chat_whole_and_streamed() {
    let base = start().await;
    let (status, _, body) = call(
        "POST",
        format!("{base}/v1/chat/completions"),
        Some(json!({ "model": "llama", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 3 })),
    )
    .await;
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
    .await;
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

#[tokio::test]
async fn openai_errors_and_model_list() {
    let base = start().await;
    let (status, _, body) = call(
        "POST",
        format!("{base}/v1/completions"),
        Some(json!({ "model": "gpt-9", "prompt": "x" })),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        json_of(&body)["error"]["message"],
        "The model `gpt-9` does not exist."
    );
    let (status, _, _) = call(
        "POST",
        format!("{base}/v1/completions"),
        Some(json!({ "prompt": "x" })),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, body) = call("GET", format!("{base}/v1/models"), None).await;
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
    let base = start().await;
    let request = json!({
        "id": "req-1",
        "inputs": [{ "name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0] }],
    });
    let (status, _, body) = call(
        "POST",
        format!("{base}/v2/models/llama/infer"),
        Some(request),
    )
    .await;
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
        .0,
        400
    );
    assert_eq!(
        call("GET", format!("{base}/v2/health/ready"), None).await.0,
        200
    );
    assert_eq!(
        call("GET", format!("{base}/v2/models/llama/ready"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        json_of(
            &call("GET", format!("{base}/v2/models/mistral"), None)
                .await
                .2
        )["name"],
        "mistral"
    );
}
