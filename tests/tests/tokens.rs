//! Token and streaming metrics through a real gateway: the token counts a
//! model reports (OpenAI `usage`, in whole answers and in a stream's last
//! chunk) reach the access log and `infermesh_tokens_total` exactly, with
//! a `model` label taken from the config only; a stream's events are
//! timed; and reading them holds no frame back.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use infermesh_tests::backend::{MockBackend, Protocol, scripted_stream};
use infermesh_tests::client;
use infermesh_tests::models::MockModels;
use infermesh_tests::process::{Gateway, backend, config, listener};
use serde_json::{Value, json};

/// Mock models answering with a few words, streamed a few milliseconds
/// apart.
const SCENARIO: &str = r#"
seed: 16
servers:
  - listen: 127.0.0.1:0
    models:
      - name: llama
        latency: { fixed: 5ms }
        timeToFirstToken: { fixed: 5ms }
        interTokenDelay: 5ms
        reply: "Paris is the capital of France."
      - { name: mistral, latency: { fixed: 5ms }, reply: "Lyon." }
      - { name: qwen, latency: { fixed: 5ms }, reply: "Nice and warm." }
"#;

/// The words of llama's reply: its completion tokens.
const LLAMA_WORDS: u64 = 6;

/// The access-log line of the request with `id`.
fn access_line(gateway: &Gateway, id: &str) -> Value {
    gateway.wait_for_log(
        |l| l["target"] == "infermesh::access" && l["request_id"] == id,
        Duration::from_secs(10),
    )
}

/// POSTs `body` to the chat API as request `id`.
async fn chat(gateway: &Gateway, id: &str, body: Value) -> client::Reply {
    let request = Request::post(gateway.url("web", "/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let reply = client::send(&client::http1(), request).await.unwrap();
    assert_eq!(reply.status, 200, "{id}: {reply:?}");
    reply
}

/// The JSON of each `data:` of an event stream, `[DONE]` left out.
fn chunks(body: &Bytes) -> Vec<Value> {
    let text = std::str::from_utf8(body).unwrap();
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

/// `(input, output)` of a `usage` object.
fn counts(usage: &Value) -> (u64, u64) {
    (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    )
}

/// `(input_tokens, output_tokens)` of an access-log line.
fn logged(line: &Value) -> (Option<u64>, Option<u64>) {
    (
        line["input_tokens"].as_u64(),
        line["output_tokens"].as_u64(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn token_counts_in_the_log_and_metrics_are_exactly_the_models_usage() {
    let models = MockModels::start(SCENARIO);
    // Rule 1 matches llama by model; rule 2 takes the rest; rule 3 is
    // never taken, but names qwen.
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("models", "http1", &[models.servers[0]]),
        r#"kind: Route
metadata: { name: chat }
spec:
  rules:
    - matches: [{ path: { prefix: /v1 }, model: llama }]
      backends: [{ name: models }]
    - matches: [{ path: { prefix: /v1 } }]
      backends: [{ name: models }]
    - matches: [{ path: { prefix: /never }, model: qwen }]
      backends: [{ name: models }]"#,
    ]));
    let messages = json!([
        { "role": "system", "content": "Answer in one sentence." },
        { "role": "user", "content": "What is the capital of France?" },
    ]);

    // A whole answer.
    let whole = chat(
        &gateway,
        "whole",
        json!({ "model": "llama", "messages": messages }),
    )
    .await;
    let (input, output) = counts(&whole.json()["usage"]);
    assert_eq!(output, LLAMA_WORDS);
    let line = access_line(&gateway, "whole");
    assert_eq!(logged(&line), (Some(input), Some(output)), "{line}");
    assert_eq!(line["model"], "llama", "the route match's model: {line}");

    // A stream with include_usage: the last chunk's usage, the same as
    // the whole answer's.
    let streamed = chat(
        &gateway,
        "streamed",
        json!({ "model": "llama", "messages": messages, "stream": true, "stream_options": { "include_usage": true } }),
    )
    .await;
    let streamed_chunks = chunks(&streamed.body);
    let last = streamed_chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(counts(&last["usage"]), (input, output));
    let line = access_line(&gateway, "streamed");
    assert_eq!(logged(&line), (Some(input), Some(output)), "{line}");
    assert!(line["first_event_ms"].as_f64().is_some(), "{line}");

    // A stream without it: no counts, none made up.
    let plain = chat(
        &gateway,
        "plain",
        json!({ "model": "llama", "messages": messages, "stream": true }),
    )
    .await;
    let plain_events = chunks(&plain.body).len() as u64 + 1;
    let line = access_line(&gateway, "plain");
    assert_eq!(logged(&line), (None, None), "{line}");

    // A model the config does not name is counted under model "";
    // one it names elsewhere (rule 3) under its name.
    let other = chat(
        &gateway,
        "mistral",
        json!({ "model": "mistral", "messages": messages }),
    )
    .await;
    let (mistral_input, mistral_output) = counts(&other.json()["usage"]);
    let line = access_line(&gateway, "mistral");
    assert_eq!(logged(&line), (Some(mistral_input), Some(mistral_output)));
    assert!(line.get("model").is_none(), "{line}");
    let named = chat(
        &gateway,
        "qwen",
        json!({ "model": "qwen", "messages": messages }),
    )
    .await;
    let (qwen_input, qwen_output) = counts(&named.json()["usage"]);
    assert_eq!(access_line(&gateway, "qwen")["model"], "qwen");

    let text = client::metrics(gateway.health).await;
    let tokens = |model: &str, kind: &str| {
        client::metric_value(
            &text,
            &format!(
                "infermesh_tokens_total{{backend=\"models\",model=\"{model}\",route=\"chat\",type=\"{kind}\"}}"
            ),
        )
    };
    assert_eq!(tokens("llama", "input"), Some((2 * input) as f64), "{text}");
    assert_eq!(tokens("llama", "output"), Some((2 * output) as f64));
    assert_eq!(tokens("", "input"), Some(mistral_input as f64));
    assert_eq!(tokens("", "output"), Some(mistral_output as f64));
    assert_eq!(tokens("qwen", "input"), Some(qwen_input as f64));
    assert_eq!(tokens("qwen", "output"), Some(qwen_output as f64));
    assert!(
        !text.contains("model=\"mistral\""),
        "a name the config does not give is no label value"
    );

    // Two streams timed: the first event of each, and every gap after
    // (the streamed one's events: its chunks and [DONE]).
    let series = |name: &str| {
        client::metric_value(
            &text,
            &format!("{name}{{backend=\"models\",model=\"llama\",route=\"chat\"}}"),
        )
    };
    assert_eq!(
        series("infermesh_time_to_first_token_seconds_count"),
        Some(2.0)
    );
    let streamed_events = streamed_chunks.len() as u64 + 1;
    assert_eq!(
        series("infermesh_time_between_events_seconds_count"),
        Some((streamed_events - 1 + plain_events - 1) as f64),
        "{text}"
    );
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
async fn reading_usage_holds_no_event_back() {
    for (name, client) in [("http1", client::http1()), ("http2", client::http2())] {
        let (handler, frames) = scripted_stream();
        let upstream = MockBackend::start(Protocol::Http1, handler).await;
        let gateway = Gateway::start(&config(&[
            &listener("web", "http"),
            &backend("m", "http1", &[upstream.addr]),
            "kind: Route\nmetadata: { name: r }\nspec:\n  rules:\n    - backends: [{ name: m }]",
        ]));
        let response = client
            .request(
                Request::post(gateway.url("web", "/v1/chat/completions"))
                    .header("x-request-id", name)
                    .body(Full::new(Bytes::from_static(
                        br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
                    )))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        // Each frame is sent only after the one before arrived: a frame
        // held back (until its event is whole, or the usage is read)
        // would stop the test. The usage chunk comes in two halves, the
        // first of which is not yet an event.
        let usage = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":21,"completion_tokens":3,"total_tokens":24}}

"#;
        let (head, tail) = usage.split_at(60);
        let mut sent: Vec<String> = (0..3)
            .map(|i| {
                format!(
                    "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}],\"usage\":null}}\n\n"
                )
            })
            .collect();
        sent.extend([
            head.to_owned(),
            tail.to_owned(),
            "data: [DONE]\n\n".to_owned(),
        ]);
        for (i, frame) in sent.iter().enumerate() {
            frames.send(Bytes::from(frame.clone())).await.unwrap();
            let arrived = tokio::time::timeout(Duration::from_secs(5), next_data(&mut body))
                .await
                .unwrap_or_else(|_| {
                    panic!("{name}: frame {i} did not arrive while the stream was open")
                });
            assert_eq!(&arrived, frame, "{name}");
        }
        drop(frames);
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
        let line = access_line(&gateway, name);
        assert_eq!(logged(&line), (Some(21), Some(3)), "{name}: {line}");
        let text = client::metrics(gateway.health).await;
        let series = |family: &str| {
            client::metric_value(
                &text,
                &format!("{family}{{backend=\"m\",model=\"\",route=\"r\"}}"),
            )
        };
        assert_eq!(
            series("infermesh_time_to_first_token_seconds_count"),
            Some(1.0),
            "{name}"
        );
        // Five events (three chunks, the usage, [DONE]): four gaps.
        assert_eq!(
            series("infermesh_time_between_events_seconds_count"),
            Some(4.0),
            "{name}"
        );
    }
}
