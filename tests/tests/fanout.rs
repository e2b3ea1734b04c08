//! Fan-out through the real proxy, against `infermesh-bench serve` mock
//! model servers speaking KServe v2 and OpenAI: each strategy's answer to
//! the value, the deadline cutting a slow optional branch, a failing
//! required branch failing the request, the branches no longer needed
//! cancelled at the model server, and a streaming race delivering the
//! fastest branch's events one by one.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use infermesh_tests::client::{self, Reply};
use infermesh_tests::models::MockModels;
use infermesh_tests::process::{Gateway, config, listener};
use serde_json::{Value, json};

/// One mock server with every model the tests fan out to.
const SCENARIO: &str = r#"
seed: 7
servers:
  - listen: 127.0.0.1:0
    models:
      - { name: resnet-a, latency: { fixed: 5ms } }
      - { name: resnet-b, latency: { fixed: 10ms }, scale: 2 }
      - { name: resnet-c, latency: { fixed: 15ms }, scale: 3 }
      - { name: slow, latency: { fixed: 30s } }
      - { name: broken, errors: [{ percent: 100, fault: { status: 500 } }] }
      - { name: llama, latency: { fixed: 5ms }, reply: "Paris is the capital." }
      - { name: mistral, latency: { fixed: 10ms }, reply: "Paris is the capital." }
      - { name: qwen, latency: { fixed: 1ms }, reply: "Lyon is the capital." }
      - { name: gemma, latency: { fixed: 15ms }, reply: "Paris is the capital." }
      - { name: phi, latency: { fixed: 30s }, reply: "Lyon is the capital." }
      - name: fast-stream
        timeToFirstToken: { fixed: 20ms }
        interTokenDelay: 300ms
        reply: "one two three"
      - { name: slow-stream, timeToFirstToken: { fixed: 30s }, reply: "late" }
"#;

struct Setup {
    models: MockModels,
    gateway: Gateway,
}

/// The mock models, and a gateway whose route `ensemble` has one rule per
/// `(path prefix, more YAML of the rule)`. Backend `models` speaks HTTP/2 to the
/// mock server, `models-h1` HTTP/1.1.
fn start(rules: &[(&str, &str)]) -> Setup {
    let models = MockModels::start(SCENARIO);
    let server = models.servers[0];
    let rules: String = rules
        .iter()
        .map(|(prefix, rule)| {
            format!("\n    - matches: [{{ path: {{ prefix: {prefix} }} }}]\n      {rule}")
        })
        .collect();
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &format!(
            "kind: Backend\nmetadata: {{ name: models }}\nspec: {{ protocol: http2, endpoints: [{{ address: \"{server}\" }}] }}"
        ),
        &format!(
            "kind: Backend\nmetadata: {{ name: models-h1 }}\nspec: {{ protocol: http1, endpoints: [{{ address: \"{server}\" }}] }}"
        ),
        &format!("kind: Route\nmetadata: {{ name: ensemble }}\nspec:\n  rules:{rules}"),
    ]));
    Setup { models, gateway }
}

async fn post(gateway: &Gateway, path: &str, body: Value) -> Reply {
    let request = Request::post(gateway.url("web", path))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    client::send(&client::http1(), request).await.unwrap()
}

/// POSTs `body` and checks the answer is a 200.
async fn answered(gateway: &Gateway, path: &str, body: Value) -> Reply {
    let reply = post(gateway, path, body).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
}

fn kserve_request() -> Value {
    json!({ "id": "42", "inputs": [{ "name": "x", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0] }] })
}

fn chat_request() -> Value {
    json!({ "model": "ensemble", "messages": [{ "role": "user", "content": "Capital of France?" }] })
}

#[tokio::test(flavor = "multi_thread")]
async fn all_merges_each_kserve_models_answer_by_branch_and_mean_averages_them() {
    let setup = start(&[
        (
            "/v2/models/ensemble",
            "fanout: { strategy: all, branches: [{ name: a, backend: models, model: resnet-a }, { name: b, backend: models, model: resnet-b }, { name: c, backend: models-h1, model: resnet-c }] }",
        ),
        (
            "/v2/models/blend",
            "fanout: { strategy: mean, branches: [{ name: a, backend: models, model: resnet-a }, { name: b, backend: models, model: resnet-b }, { name: c, backend: models, model: resnet-c, weight: 2 }] }",
        ),
    ]);
    let reply = answered(
        &setup.gateway,
        "/v2/models/ensemble/infer",
        kserve_request(),
    )
    .await;
    let body = reply.json();
    for (branch, model, data) in [
        ("a", "resnet-a", json!([1.0, 2.0, 3.0])),
        ("b", "resnet-b", json!([2.0, 4.0, 6.0])),
        ("c", "resnet-c", json!([3.0, 6.0, 9.0])),
    ] {
        // Each branch asked its own model (the KServe path rewritten), with
        // the client's body.
        assert_eq!(body[branch]["model_name"], model, "{body}");
        assert_eq!(body[branch]["id"], "42");
        assert_eq!(body[branch]["outputs"][0]["data"], data, "{body}");
        assert_eq!(
            body["infermesh_fanout"]["branches"][branch]["outcome"],
            "used"
        );
        assert_eq!(body["infermesh_fanout"]["branches"][branch]["status"], 200);
    }
    assert_eq!(body["infermesh_fanout"]["strategy"], "all");
    assert_eq!(body["infermesh_fanout"]["decision"], "all");
    let header = reply.header("x-infermesh-fanout").unwrap();
    assert!(
        header.starts_with("a;outcome=used;status=200;ms=") && header.contains(", c;outcome=used"),
        "{header}"
    );

    // (1×1 + 2×1 + 3×2) / 4 = 2.25 times the inputs.
    let reply = answered(&setup.gateway, "/v2/models/blend/infer", kserve_request()).await;
    let body = reply.json();
    assert_eq!(
        body["outputs"][0]["data"],
        json!([2.25, 4.5, 6.75]),
        "{body}"
    );
    assert_eq!(body["outputs"][0]["name"], "output_x");
    assert_eq!(body["model_name"], "resnet-a");
    assert_eq!(body["infermesh_fanout"]["strategy"], "mean");
    drop(setup.models);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vote_over_openai_chat_answers_with_the_majority() {
    let setup = start(&[
        (
            "/v1/chat",
            "fanout: { strategy: vote, vote: { pointer: /choices/0/message/content }, branches: [{ name: llama, backend: models, model: llama }, { name: mistral, backend: models, model: mistral }, { name: qwen, backend: models, model: qwen }] }",
        ),
        (
            "/v1/completions",
            "fanout: { strategy: vote, vote: { pointer: /choices/0/text }, branches: [{ name: llama, backend: models, model: llama }, { name: mistral, backend: models, model: mistral }, { name: gemma, backend: models, model: gemma }, { name: qwen, backend: models, model: qwen }, { name: phi, backend: models, model: phi }] }",
        ),
    ]);
    let reply = answered(&setup.gateway, "/v1/chat/completions", chat_request()).await;
    let body = reply.json();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Paris is the capital."
    );
    // The answer of the first listed voter of the majority: the body's
    // model was rewritten per branch.
    assert_eq!(body["model"], "llama");
    let branches = &body["infermesh_fanout"]["branches"];
    assert_eq!(branches["qwen"]["outcome"], "unused");
    assert_eq!(branches["qwen"]["vote"], "Lyon is the capital.");
    assert_eq!(branches["mistral"]["outcome"], "used");
    // Every branch answered before the majority stood (qwen first).
    assert_eq!(body["infermesh_fanout"]["decision"], "all");

    // Five voters: three agree within 15 ms, so the vote is decided
    // without the slow one, which the model server sees cancelled.
    let request = json!({ "model": "ensemble", "prompt": "Capital of France?" });
    let reply = answered(&setup.gateway, "/v1/completions", request).await;
    let body = reply.json();
    assert_eq!(body["choices"][0]["text"], "Paris is the capital.");
    assert_eq!(body["infermesh_fanout"]["decision"], "quorum");
    assert_eq!(
        body["infermesh_fanout"]["branches"]["phi"]["outcome"],
        "cancelled"
    );
    setup.models.wait_for_cancellations(0, "phi", 1.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_deadline_cuts_a_slow_optional_branch_which_the_model_sees_cancelled() {
    let setup = start(&[
        (
            "/v2/models/ensemble",
            "fanout: { strategy: all, deadline: 300ms, branches: [{ name: a, backend: models, model: resnet-a }, { name: slow, backend: models-h1, model: slow }, { name: slow2, backend: models, model: slow }] }",
        ),
        (
            "/v2/models/majority",
            "fanout: { strategy: quorum, quorum: 2, branches: [{ name: a, backend: models, model: resnet-a }, { name: b, backend: models, model: resnet-b }, { name: slow, backend: models, model: slow }] }",
        ),
        // No deadline of its own: the rule's responseHeaders limit is the
        // deadline, and it answers with what arrived rather than a bare 504.
        (
            "/v2/models/limited",
            "timeouts: { responseHeaders: 300ms }\n      fanout: { strategy: all, branches: [{ name: b, backend: models, model: resnet-b }, { name: slow, backend: models, model: slow }] }",
        ),
        // A race whose first event must come within 300 ms.
        (
            "/v1",
            "timeouts: { firstEvent: 300ms }\n      fanout: { strategy: first, branches: [{ name: one, backend: models, model: slow-stream }, { name: two, backend: models, model: slow-stream }] }",
        ),
    ]);
    let reply = answered(
        &setup.gateway,
        "/v2/models/ensemble/infer",
        kserve_request(),
    )
    .await;
    let body = reply.json();
    assert_eq!(body["a"]["outputs"][0]["data"], json!([1.0, 2.0, 3.0]));
    assert!(body.get("slow").is_none(), "{body}");
    assert_eq!(body["infermesh_fanout"]["decision"], "deadline");
    assert_eq!(
        body["infermesh_fanout"]["branches"]["slow"]["outcome"],
        "deadline"
    );
    let header = reply.header("x-infermesh-fanout").unwrap();
    assert!(header.contains("slow;outcome=deadline;ms="), "{header}");
    // Both cut requests end at the model: an HTTP/1.1 connection closed
    // and an HTTP/2 stream reset.
    setup.models.wait_for_cancellations(0, "slow", 2.0).await;

    // A quorum of two answers without the slow branch, which is cancelled.
    let reply = answered(
        &setup.gateway,
        "/v2/models/majority/infer",
        kserve_request(),
    )
    .await;
    let body = reply.json();
    assert_eq!(body["b"]["outputs"][0]["data"], json!([2.0, 4.0, 6.0]));
    assert_eq!(
        body["infermesh_fanout"]["branches"]["slow"]["outcome"],
        "cancelled"
    );
    setup.models.wait_for_cancellations(0, "slow", 3.0).await;

    let reply = answered(&setup.gateway, "/v2/models/limited/infer", kserve_request()).await;
    let body = reply.json();
    assert_eq!(body["b"]["outputs"][0]["data"], json!([2.0, 4.0, 6.0]));
    assert_eq!(body["infermesh_fanout"]["decision"], "deadline");
    assert_eq!(
        body["infermesh_fanout"]["branches"]["slow"]["outcome"],
        "deadline"
    );

    let mut request = chat_request();
    request["stream"] = json!(true);
    let reply = post(&setup.gateway, "/v1/chat/completions", request).await;
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.header("x-infermesh-error"), Some("fanout_deadline"));
    assert_eq!(
        reply
            .header("x-infermesh-fanout")
            .map(|h| h.contains("two;outcome=deadline")),
        Some(true),
        "{reply:?}"
    );
    setup
        .models
        .wait_for_cancellations(0, "slow-stream", 2.0)
        .await;

    let metrics = client::metrics(setup.gateway.health).await;
    let value = |series: &str| client::metric_value(&metrics, series);
    assert_eq!(
        value("infermesh_fanout_answers_total{decision=\"deadline\",route=\"ensemble\"}"),
        Some(2.0)
    );
    assert_eq!(
        value("infermesh_fanout_answers_total{decision=\"failed\",route=\"ensemble\"}"),
        Some(1.0)
    );
    assert_eq!(
        value("infermesh_fanout_answers_total{decision=\"quorum\",route=\"ensemble\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(
            "infermesh_fanout_branches_total{branch=\"slow\",outcome=\"cancelled\",route=\"ensemble\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value("infermesh_fanout_duration_seconds_count{route=\"ensemble\",strategy=\"all\"}"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_required_branch_fails_the_request_with_its_reason() {
    let setup = start(&[(
        "/v2/models/ensemble",
        "fanout: { strategy: all, branches: [{ name: a, backend: models, model: resnet-a }, { name: judge, backend: models, model: broken, required: true }, { name: slow, backend: models, model: slow }] }",
    )]);
    let reply = post(
        &setup.gateway,
        "/v2/models/ensemble/infer",
        kserve_request(),
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(
        reply.header("x-infermesh-error"),
        Some("fanout_branch_failed")
    );
    let body = reply.json();
    assert_eq!(
        body["error"],
        "required branch judge failed: answered 500 Internal Server Error"
    );
    assert_eq!(body["route"], "ensemble");
    let header = reply.header("x-infermesh-fanout").unwrap();
    assert!(
        header.contains("judge;outcome=failed;status=500")
            && header.contains("slow;outcome=cancelled"),
        "{header}"
    );
    setup.models.wait_for_cancellations(0, "slow", 1.0).await;
    // The access log line carries the same report.
    let line = setup.gateway.wait_for_log(
        |l| l["target"] == "infermesh::access",
        std::time::Duration::from_secs(10),
    );
    assert_eq!(line["error"], "fanout_branch_failed");
    assert_eq!(line["fanout"], header, "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streaming_race_commits_to_the_fastest_branch_and_streams_its_events() {
    let setup = start(&[(
        "/v1",
        "fanout: { strategy: first, branches: [{ name: slow, backend: models, model: slow-stream }, { name: fast, backend: models, model: fast-stream }] }",
    )]);
    let mut request = chat_request();
    request["stream"] = json!(true);
    let response = client::http1()
        .request(
            Request::post(setup.gateway.url("web", "/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(request.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let header = response.headers()["x-infermesh-fanout"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        header.starts_with("slow;outcome=cancelled;ms=")
            && header.contains("fast;outcome=used;status=200"),
        "{header}"
    );
    // The loser is cancelled at the model once the race is decided.
    setup
        .models
        .wait_for_cancellations(0, "slow-stream", 1.0)
        .await;

    // The first event arrives while the model is still generating (its
    // tokens are 300 ms apart): events are passed on one by one, not
    // gathered.
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(
        first.starts_with("data: ") && first.contains("\"one \""),
        "{first}"
    );
    assert_eq!(
        setup
            .models
            .metric(0, "vllm:num_requests_running", "fast-stream")
            .await,
        1.0,
        "the winner is still generating"
    );
    let rest = body.collect().await.unwrap().to_bytes();
    let rest = String::from_utf8(rest.to_vec()).unwrap();
    let events: Vec<&str> = rest.split_terminator("\n\n").collect();
    assert!(
        events[0].contains("\"two \"") && events[1].contains("\"three\""),
        "{rest}"
    );
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    assert!(!rest.contains("late"));

    let metrics = client::metrics(setup.gateway.health).await;
    assert_eq!(
        client::metric_value(
            &metrics,
            "infermesh_stream_first_event_seconds_count{backend=\"models\",route=\"ensemble\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn strategies_that_combine_whole_answers_refuse_streams_and_large_bodies() {
    let setup = start(&[(
        "/v1",
        "fanout: { strategy: all, maxBodyBytes: 1024, branches: [{ name: llama, backend: models, model: llama }, { name: qwen, backend: models, model: qwen }] }",
    )]);
    let mut request = chat_request();
    request["stream"] = json!(true);
    let reply = post(&setup.gateway, "/v1/chat/completions", request).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(
        reply.header("x-infermesh-error"),
        Some("fanout_streaming_unsupported")
    );
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("strategy all")
    );
    assert_eq!(
        reply.json()["error"]["code"],
        "fanout_streaming_unsupported"
    );

    let mut request = chat_request();
    request["messages"][0]["content"] = json!("x".repeat(2000));
    let reply = post(&setup.gateway, "/v1/chat/completions", request).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(
        reply.header("x-infermesh-error"),
        Some("request_body_too_large")
    );

    // A request the models refuse (not JSON) gets their own 400.
    let request = Request::post(setup.gateway.url("web", "/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{not json")))
        .unwrap();
    let reply = client::send(&client::http1(), request).await.unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body"),
        "{reply:?}"
    );
    assert_eq!(
        reply
            .header("x-infermesh-fanout")
            .map(|h| h.contains("qwen;outcome=failed;status=400")),
        Some(true)
    );

    // Within the limit, both models answer, keyed by branch.
    let reply = answered(&setup.gateway, "/v1/chat/completions", chat_request()).await;
    let body = reply.json();
    assert_eq!(body["llama"]["model"], "llama");
    assert_eq!(
        body["qwen"]["choices"][0]["message"]["content"],
        "Lyon is the capital."
    );
}
