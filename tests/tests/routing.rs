//! Routing through a real gateway: by host, path, method and header, with
//! weighted splits, and the proxy's own error answers.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use infermesh_tests::backend::{MockBackend, Protocol};
use infermesh_tests::client::{self, HttpClient, Reply};
use infermesh_tests::process::{Gateway, backend, config, listener, route_by_prefix};

async fn request(
    client: &HttpClient,
    method: &str,
    url: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut builder = Request::builder()
        .method(method)
        .uri(url)
        .header("host", host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    client::send(client, builder.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_go_to_the_most_specific_rule() {
    let names = ["host", "exact", "prefix", "post", "tenant", "fallback"];
    let mut backends = Vec::new();
    for name in names {
        backends.push(MockBackend::echo(name, Protocol::Http1).await);
    }
    let mut docs = vec![listener("web", "http")];
    for (name, b) in names.iter().zip(&backends) {
        docs.push(backend(name, "http1", &[b.addr]));
    }
    docs.push(
        r#"kind: Route
metadata: { name: models }
spec:
  rules:
    - backends: [{ name: fallback }]
    - matches: [{ path: { exact: /v1/models } }]
      backends: [{ name: exact }]
    - matches: [{ path: { prefix: /v1/chat } }]
      backends: [{ name: prefix }]
    - matches: [{ path: { prefix: /v1/chat }, method: POST }]
      backends: [{ name: post }]
    - matches:
        - path: { prefix: /v1/chat }
          method: POST
          headers: [{ name: x-tenant, exact: blue }]
      backends: [{ name: tenant }]
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: api-host }
spec:
  hostnames: [api.example.com]
  rules:
    - backends: [{ name: host }]"#
            .to_owned(),
    );
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let gateway = Gateway::start(&config(&docs));
    let client = client::http1();
    let base = gateway.url("web", "");
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 9] = [
        ("GET", "/", "models.local", &[], "fallback"),
        ("GET", "/v1/models", "models.local", &[], "exact"),
        ("GET", "/v1/models/llama", "models.local", &[], "fallback"),
        ("GET", "/v1/chat/completions", "models.local", &[], "prefix"),
        ("GET", "/v1/chatty", "models.local", &[], "fallback"),
        ("POST", "/v1/chat/completions", "models.local", &[], "post"),
        (
            "POST",
            "/v1/chat/completions",
            "models.local",
            &[("x-tenant", "blue")],
            "tenant",
        ),
        (
            "POST",
            "/v1/chat/completions",
            "models.local",
            &[("x-tenant", "red")],
            "post",
        ),
        (
            "POST",
            "/v1/chat/completions",
            "api.example.com:8080",
            &[("x-tenant", "blue")],
            "host",
        ),
    ];
    for (method, path, host, headers, expected) in cases {
        let reply = request(&client, method, &format!("{base}{path}"), host, headers).await;
        assert_eq!(reply.status, 200, "{method} {path}: {reply:?}");
        assert_eq!(
            reply.header("x-backend"),
            Some(expected),
            "{method} {host}{path} {headers:?}"
        );
        assert_eq!(
            reply.json()["path"],
            path,
            "the path reaches the backend unchanged"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_backends_split_traffic_within_statistical_bounds() {
    let stable = MockBackend::echo("stable", Protocol::Http1).await;
    let canary = MockBackend::echo("canary", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("stable", "http1", &[stable.addr]),
        &backend("canary", "http1", &[canary.addr]),
        "kind: Route\nmetadata: { name: split }\nspec:\n  rules:\n    - backends: [{ name: stable, weight: 80 }, { name: canary, weight: 20 }]",
    ]));
    let client = client::http1();
    let url = gateway.url("web", "/v1/completions");
    let mut counts: HashMap<String, u32> = HashMap::new();
    let total = 1000;
    for _ in 0..total {
        let reply = client::get(&client, &url).await;
        *counts
            .entry(reply.header("x-backend").unwrap().to_owned())
            .or_default() += 1;
    }
    // Binomial(1000, 0.2): mean 200, standard deviation 12.6; allow 5 of them.
    let canary_share = counts.get("canary").copied().unwrap_or(0);
    assert!((137..=263).contains(&canary_share), "{counts:?}");
    assert_eq!(counts.values().sum::<u32>(), total);
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_weights_split_traffic_within_a_backend() {
    let heavy = MockBackend::echo("heavy", Protocol::Http1).await;
    let light = MockBackend::echo("light", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &format!(
            "kind: Backend\nmetadata: {{ name: pool }}\nspec:\n  loadBalancer: {{ policy: roundRobin }}\n  endpoints:\n    - {{ address: \"{}\", weight: 3 }}\n    - {{ address: \"{}\", weight: 1 }}",
            heavy.addr, light.addr
        ),
        "kind: Route\nmetadata: { name: r }\nspec:\n  rules:\n    - backends: [{ name: pool }]",
    ]));
    let client = client::http1();
    let url = gateway.url("web", "/");
    for _ in 0..800 {
        client::get(&client, &url).await;
    }
    // Weighted round robin is exact: three to one.
    assert_eq!(light.requests(), 200);
    assert_eq!(heavy.requests(), 600);
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_dropped_and_forwarded_headers_added() {
    let echo = MockBackend::echo("echo", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("echo", "http1", &[echo.addr]),
        "kind: Route\nmetadata: { name: r }\nspec:\n  rules:\n    - backends: [{ name: echo }]",
    ]));
    let client = client::http1();
    let reply = request(
        &client,
        "GET",
        &gateway.url("web", "/x?y=1"),
        "models.local",
        &[
            ("connection", "keep-alive, x-session"),
            ("x-session", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-model", "llama"),
        ],
    )
    .await;
    let seen = reply.json();
    let headers = &seen["headers"];
    for dropped in ["x-session", "keep-alive", "proxy-connection", "te"] {
        assert!(
            headers.get(dropped).is_none(),
            "{dropped} crossed the proxy: {headers}"
        );
    }
    assert_eq!(headers["x-model"], "llama");
    assert_eq!(headers["host"], "models.local");
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(seen["path"], "/x?y=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_answers_its_own_failures_with_a_reason() {
    // An address nothing listens on: bind a port, then free it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("down", "http1", &[closed]),
        "kind: Backend\nmetadata: { name: empty }\nspec: { endpoints: [] }",
        &route_by_prefix(&[("/down", "down"), ("/empty", "empty")]),
    ]));
    let client = client::http1();
    let cases = [
        ("/down", 502, "connect_failed", Some("r")),
        ("/empty", 503, "no_endpoint", Some("r")),
        ("/other", 404, "no_route", None),
    ];
    for (path, status, reason, route) in cases {
        let reply = client::get(&client, &gateway.url("web", path)).await;
        assert_eq!(reply.status, status, "{path}");
        assert_eq!(reply.header("x-infermesh-error"), Some(reason), "{path}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let body = reply.json();
        assert_eq!(body["reason"], reason);
        assert_eq!(body["route"], serde_json::json!(route));
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let logged = gateway.wait_for_log(
        |l| l["target"] == "infermesh::access" && l["path"] == "/down",
        Duration::from_secs(5),
    );
    assert_eq!(logged["error"], "connect_failed");
    assert_eq!(logged["status"], 502);
    assert_eq!(logged["endpoint"], closed.to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn each_request_gets_one_access_log_line_with_its_fields_at_the_top_level() {
    let echo = MockBackend::echo("echo", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("echo", "http1", &[echo.addr]),
        "kind: Route\nmetadata: { name: chat }\nspec:\n  rules:\n    - backends: [{ name: echo }]",
    ]));
    let client = client::http1();
    let reply = client::get(&client, &gateway.url("web", "/v1/models?limit=2")).await;
    assert_eq!(reply.status, 200);
    let line = gateway.wait_for_log(
        |l| l["target"] == "infermesh::access",
        Duration::from_secs(5),
    );
    assert_eq!(line["message"], "request");
    assert_eq!(line["level"], "INFO");
    assert!(line["timestamp"].as_str().is_some());
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/v1/models?limit=2");
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "chat");
    assert_eq!(line["backend"], "echo");
    assert_eq!(line["endpoint"], echo.addr.to_string());
    assert_eq!(line["listener"], "web");
    assert_eq!(line["response_bytes"], reply.body.len());
    let duration = line["duration_ms"].as_f64().unwrap();
    let first_byte = line["first_byte_ms"].as_f64().unwrap();
    assert!(first_byte > 0.0 && first_byte <= duration, "{line}");
    assert!(
        line.get("error").is_none(),
        "a success has no error field: {line}"
    );
    assert_eq!(
        gateway
            .logs_matching(|l| l["target"] == "infermesh::access")
            .len(),
        1
    );
}

/// `x-request-id`: kept when the client sends one, made when it does not;
/// either way the backend gets it, the client gets it back, and the
/// access log and the proxy's own error bodies carry it.
#[tokio::test(flavor = "multi_thread")]
async fn every_request_is_known_by_one_request_id_end_to_end() {
    let echo = MockBackend::echo("echo", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("echo", "http1", &[echo.addr]),
        &route_by_prefix(&[("/v1/", "echo")]),
    ]));
    let client = client::http1();
    let logged = |id: &str| {
        let id = id.to_owned();
        gateway.wait_for_log(
            move |l| l["message"] == "request" && l["request_id"] == id.as_str(),
            Duration::from_secs(5),
        )
    };

    let kept = client::send(
        &client,
        Request::get(gateway.url("web", "/v1/models"))
            .header("x-request-id", "trace-me-42")
            .body(Full::default())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(kept.header("x-request-id"), Some("trace-me-42"));
    assert_eq!(kept.json()["headers"]["x-request-id"], "trace-me-42");
    assert_eq!(logged("trace-me-42")["status"], 200);

    let made = client::get(&client, &gateway.url("web", "/v1/models")).await;
    let id = made
        .header("x-request-id")
        .expect("an id is made")
        .to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(made.json()["headers"]["x-request-id"], id.as_str());
    assert_eq!(logged(&id)["path"], "/v1/models");

    // An error the proxy makes itself: the id in its header and body.
    let missing = client::get(&client, &gateway.url("web", "/nowhere")).await;
    assert_eq!(missing.status, 404);
    let id = missing.header("x-request-id").expect("an id").to_owned();
    assert_eq!(missing.json()["request_id"], id.as_str());
    assert_eq!(logged(&id)["error"], "no_route");
}

/// The access line is stamped with the request's start, not its end:
/// a request the backend answers after 400 ms is logged at the moment it
/// was sent (Envoy's and ECS's timestamp).
#[tokio::test(flavor = "multi_thread")]
async fn the_access_line_is_stamped_with_the_requests_start() {
    let slow = MockBackend::start(
        Protocol::Http1,
        std::sync::Arc::new(|_request| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                http::Response::new(infermesh_tests::backend::full("late"))
            })
        }),
    )
    .await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("slow", "http1", &[slow.addr]),
        &route_by_prefix(&[("/", "slow")]),
    ]));
    let sent = std::time::SystemTime::now();
    let reply = client::get(&client::http1(), &gateway.url("web", "/")).await;
    assert_eq!(reply.status, 200);
    let line = gateway.wait_for_log(|l| l["message"] == "request", Duration::from_secs(5));
    let stamped = humantime::parse_rfc3339(line["timestamp"].as_str().unwrap()).unwrap();
    // At the request's arrival: not before it was sent (clocks read to the
    // microsecond, so a few ms of slack), and well before its 400 ms
    // answer.
    let early = sent
        .checked_sub(Duration::from_millis(5))
        .expect("a time after 1970");
    assert!(
        stamped >= early && stamped < sent + Duration::from_millis(200),
        "stamped {stamped:?}, sent {sent:?} (the answer took 400 ms): {line}"
    );
}

/// `--log-format ecs`: the access log in the Elastic Common Schema, as
/// Filebeat and Elastic Agent ingest it.
#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_speaks_ecs_when_asked() {
    use std::io::BufRead;

    let echo = MockBackend::echo("echo", Protocol::Http1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(
        &path,
        config(&[
            &listener("web", "http"),
            &backend("echo", "http1", &[echo.addr]),
            &route_by_prefix(&[("/", "echo")]),
        ]),
    )
    .unwrap();
    let mut child = std::process::Command::new(infermesh_tests::binary("infermesh-proxy"))
        .args(["--log-format", "ecs", "gateway", "--config"])
        .arg(&path)
        .args([
            "--admin-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let parsed = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
            if lines_tx.send(parsed).is_err() {
                break;
            }
        }
    });
    let next = |want: &dyn Fn(&serde_json::Value) -> bool| loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a log line");
        if want(&line) {
            break line;
        }
    };
    let listening = next(&|l| l["message"] == "listening" && l["infermesh"]["listener"] == "web");
    assert_eq!(listening["log.level"], "info");
    assert!(listening["@timestamp"].is_string());
    let address = listening["infermesh"]["address"]
        .as_str()
        .unwrap()
        .to_owned();

    let reply = client::get(&client::http1(), &format!("http://{address}/v1/models?x=1")).await;
    assert_eq!(reply.status, 200);
    let line = next(&|l| l["log.logger"] == "infermesh::access");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(line["ecs.version"], "8.11.0", "{line}");
    assert_eq!(line["http"]["request"]["method"], "GET", "{line}");
    assert_eq!(line["http"]["response"]["status_code"], 200, "{line}");
    assert_eq!(line["url"]["path"], "/v1/models", "{line}");
    assert_eq!(line["url"]["query"], "x=1", "{line}");
    assert!(line["event"]["duration"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(line["event"]["outcome"], "success", "{line}");
    assert_eq!(line["source"]["ip"], "127.0.0.1", "{line}");
    assert_eq!(
        line["http"]["request"]["id"],
        reply.header("x-request-id").unwrap(),
        "{line}"
    );
    assert_eq!(line["infermesh"]["route"], "r", "{line}");
    assert_eq!(line["infermesh"]["backend"], "echo", "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_named_endpoints_are_resolved() {
    // `localhost` must come from /etc/hosts: the test never asks a DNS server.
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    assert!(
        hosts.lines().any(|l| !l.trim_start().starts_with('#')
            && l.split_whitespace().skip(1).any(|n| n == "localhost")),
        "/etc/hosts does not name localhost"
    );
    let v4 = MockBackend::echo("dns", Protocol::Http1).await;
    let port = v4.addr.port();
    // If `localhost` also resolves to ::1 here, serve there too.
    let _v6 = match tokio::net::TcpListener::bind(("::1", port)).await {
        Ok(listener) => Some(MockBackend::serve(
            listener,
            Protocol::Http1,
            infermesh_tests::backend::echo("dns"),
        )),
        Err(_) => None,
    };
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &format!(
            "kind: Backend\nmetadata: {{ name: named }}\nspec:\n  endpoints: [{{ address: \"localhost:{port}\" }}]"
        ),
        "kind: Route\nmetadata: { name: r }\nspec:\n  rules:\n    - backends: [{ name: named }]",
    ]));
    let client = client::http1();
    for _ in 0..10 {
        assert_eq!(
            client::get(&client, &gateway.url("web", "/")).await.status,
            200
        );
    }
    let endpoints = client::get(&client, &format!("http://{}/endpoints", gateway.admin))
        .await
        .json();
    let listed = endpoints["backends"][0]["endpoints"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        listed.iter().any(|e| e["address"] == v4.addr.to_string()),
        "{endpoints}"
    );
    assert!(
        listed.iter().all(|e| e["hostname"] == "localhost"),
        "{endpoints}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_go_to_the_rule_of_the_model_they_name() {
    let llama = MockBackend::echo("llama", Protocol::Http1).await;
    let mistral = MockBackend::echo("mistral", Protocol::Http1).await;
    let other = MockBackend::echo("other", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("web", "http"),
        &backend("llama", "http1", &[llama.addr]),
        &backend("mistral", "http1", &[mistral.addr]),
        &backend("other", "http1", &[other.addr]),
        r#"kind: Route
metadata: { name: models }
spec:
  rules:
    - matches: [{ model: llama-3-8b }]
      backends: [{ name: llama }]
    - matches: [{ model: mistral-7b }]
      backends: [{ name: mistral }]
    - backends: [{ name: other }]"#,
    ]));
    let http = client::http1();
    let post = |path: &str, body: &'static str| {
        Request::post(gateway.url("web", path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let cases = [
        // OpenAI-compatible: the model field, wherever it is in the body.
        (
            post(
                "/v1/chat/completions",
                r#"{"model":"llama-3-8b","messages":[]}"#,
            ),
            "llama",
        ),
        (
            post("/v1/completions", r#"{"prompt":"hi","model":"mistral-7b"}"#),
            "mistral",
        ),
        // KServe v2: the model in the path.
        (
            post("/v2/models/mistral-7b/infer", r#"{"inputs":[]}"#),
            "mistral",
        ),
        // No model, another model, or not JSON: the rule without a model.
        (post("/v1/embeddings", r#"{"input":"hi"}"#), "other"),
        (
            post("/v1/chat/completions", r#"{"model":"gpt-4"}"#),
            "other",
        ),
        (post("/v1/chat/completions", "not json"), "other"),
    ];
    for (request, expected) in cases {
        let sent = String::from_utf8(
            request
                .body()
                .clone()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        let reply = client::send(&http, request).await.unwrap();
        assert_eq!(reply.status, 200);
        let seen = reply.json();
        assert_eq!(seen["backend"], expected, "{sent}");
        assert_eq!(seen["body"], sent, "the body reaches the model unchanged");
    }
}
