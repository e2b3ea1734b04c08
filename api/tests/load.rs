//! Loading whole config files: the valid shape, defaults, and located errors.

use infermesh_api::{
    BalancePolicy, Config, Duration, EndpointTarget, ListenerProtocol, PathMatch, RetryOn, Source,
    UpstreamProtocol,
};

const VALID: &str = r#"
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata:
  name: public
spec:
  address: 127.0.0.1:8080
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata:
  name: llama
spec:
  protocol: http2
  endpoints:
    - address: 127.0.0.1:9001
    - address: llama.models.svc:8000
      weight: 3
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata:
  name: chat
spec:
  listeners: [public]
  hostnames: ["*.example.com"]
  rules:
    - matches:
        - path: { prefix: /v1 }
          method: POST
          headers:
            - { name: x-tenant, exact: blue }
      backends:
        - name: llama
      timeouts:
        total: 10m
"#;

fn load(text: &str) -> Result<Config, Vec<String>> {
    Config::load(&[Source {
        name: "gw.yaml",
        text,
    }])
    .map_err(|d| d.iter().map(|d| d.to_string()).collect())
}

#[test]
fn a_valid_file_loads_with_defaults_filled_in() {
    let config = load(VALID).expect("valid");
    let listener = config.listener("public").expect("listener");
    assert_eq!(listener.spec.protocol, ListenerProtocol::Http);
    assert_eq!(listener.origin.position.line, 2);

    let backend = config.backend("llama").expect("backend");
    assert_eq!(backend.spec.protocol, UpstreamProtocol::Http2);
    assert_eq!(backend.spec.connect_timeout, Duration::from_secs(5));
    assert_eq!(backend.spec.endpoints[0].weight, 1);
    assert_eq!(
        backend.spec.endpoints[1].target(),
        Ok(EndpointTarget::Dns {
            host: "llama.models.svc".into(),
            port: 8000
        })
    );

    let rule = &config.route("chat").expect("route").spec.rules[0];
    assert_eq!(rule.matches[0].path, Some(PathMatch::Prefix("/v1".into())));
    assert_eq!(rule.timeouts.total, Duration::from_secs(600));
    assert_eq!(rule.timeouts.response_headers, Duration::from_secs(300));
}

#[test]
fn version_follows_meaning_not_formatting() {
    let a = load(VALID).unwrap();
    let reformatted = VALID.replace(
        "  address: 127.0.0.1:8080",
        "  address: \"127.0.0.1:8080\"  # same",
    );
    let b = load(&reformatted).unwrap();
    assert_eq!(a.version(), b.version());
    let changed = load(&VALID.replace("total: 10m", "total: 11m")).unwrap();
    assert_ne!(a.version(), changed.version());
}

#[test]
fn the_dump_loads_back_to_the_same_config() {
    let config = load(VALID).unwrap();
    let docs: Vec<serde_json::Value> =
        serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string(d).unwrap()))
        .collect();
    let again = load(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    assert_eq!(config.version(), again.version());
}

#[test]
fn every_problem_is_reported_with_file_line_column_and_field() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata:
  name: llama
spec:
  endpoints:
    - address: 127.0.0.1:9001
      wieght: 2
  connectTimeout: 5
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata:
  name: chat
spec:
  rules:
    - backends:
        - name: llamma
      matches:
        - path: { prefix: v1 }
"#;
    let errors = load(text).unwrap_err();
    assert_eq!(
        errors,
        vec![
            "gw.yaml:8:7: Backend/llama: spec.endpoints[0].wieght: unknown field `wieght`; did you mean `weight`?",
            "gw.yaml:9:3: Backend/llama: spec.connectTimeout: a bare number (5) is ambiguous; add a unit, e.g. 5s or 5ms",
            "gw.yaml:18:11: Route/chat: spec.rules[0].backends[0].name: backend \"llamma\" is not defined (defined backends: llama)",
            "gw.yaml:20:19: Route/chat: spec.rules[0].matches[0].path.prefix: path \"v1\" must start with '/'",
        ]
    );
}

#[test]
fn envelope_problems() {
    let text = r#"apiVersion: infermesh.io/v2
kind: Gateway
metadata: { name: x }
spec: {}
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: Public_1 }
spec: { address: 127.0.0.1:1 }
---
kind: Listener
metadata: { name: a }
spec: { address: 127.0.0.1:2 }
status: {}
---
- not a mapping
"#;
    let errors = load(text).unwrap_err();
    let joined = errors.join("\n");
    for e in [
        "gw.yaml:1:1: apiVersion: unsupported apiVersion \"infermesh.io/v2\"",
        "gw.yaml:2:1: kind: unknown kind \"Gateway\"; expected one of Listener, Backend, Route",
        "gw.yaml:8:13: Listener/Public_1: metadata.name: \"Public_1\" is not a valid name",
    ] {
        assert!(joined.contains(e), "missing {e:?} in:\n{joined}");
    }
    assert!(
        joined.contains("gw.yaml:11:1: Listener/a: missing field `apiVersion`"),
        "{joined}"
    );
    assert!(
        joined.contains("gw.yaml:14:1: Listener/a: status: unknown field `status`"),
        "{joined}"
    );
    assert!(
        joined.contains("gw.yaml:16:1: a document must be a mapping"),
        "{joined}"
    );
}

#[test]
fn duplicates_and_clashes() {
    let doc = |kind: &str, name: &str, spec: &str| {
        format!(
            "---\napiVersion: infermesh.io/v1alpha1\nkind: {kind}\nmetadata: {{ name: {name} }}\nspec: {spec}\n"
        )
    };
    let text = [
        doc("Listener", "a", "{ address: 127.0.0.1:8080 }"),
        doc("Listener", "b", "{ address: 127.0.0.1:8080 }"),
        doc("Listener", "any", "{ address: 0.0.0.0:8081 }"),
        doc("Listener", "local", "{ address: 127.0.0.1:8081 }"),
        doc("Backend", "m", "{ endpoints: [{ address: 127.0.0.1:1 }] }"),
        doc("Backend", "m", "{}"),
        doc(
            "Route",
            "r",
            "{ listeners: [c], rules: [{ backends: [{ name: m, weight: 0 }] }] }",
        ),
    ]
    .concat();
    let joined = load(&text).unwrap_err().join("\n");
    for e in [
        "Listener/b: spec.address: address 127.0.0.1:8080 clashes with listener \"a\" on 127.0.0.1:8080",
        "Listener/local: spec.address: address 127.0.0.1:8081 clashes with listener \"any\" on 0.0.0.0:8081",
        "Backend/m: metadata.name: Backend \"m\" is already defined at gw.yaml:",
        "Route/r: spec.listeners[0]: listener \"c\" is not defined (defined listeners: a, any, b, local)",
        "Route/r: spec.rules[0].backends: every backend has weight 0",
    ] {
        assert!(joined.contains(e), "missing {e:?} in:\n{joined}");
    }
}

#[test]
fn values_out_of_range() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: m }
spec:
  connectTimeout: 0s
  dnsRefreshInterval: 10ms
  endpoints:
    - { address: "model:0" }
    - { address: "127.0.0.1:1", weight: 0 }
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: r }
spec:
  hostnames: ["Example.com", "a.*.com", "x.com:80"]
  rules:
    - backends: [{ name: m }]
      timeouts: { idle: 400h }
      matches:
        - method: "GET POST"
          headers:
            - { name: "bad header", exact: a, present: true }
            - { name: x, regex: "(" }
        - path: { regex: "(?x)/v1/.* # a comment eats the anchor" }
"#;
    let joined = load(text).unwrap_err().join("\n");
    for e in [
        "spec.connectTimeout: 0s is too short",
        "spec.dnsRefreshInterval: 10ms is too short; the minimum is 1s",
        "spec.endpoints[0].address: \"model:0\" has an invalid port",
        "spec.endpoints[1].weight: weight must be at least 1",
        "spec.hostnames[0]: \"Example.com\": write host names in lower case",
        "spec.hostnames[1]: \"a.*.com\": a wildcard is only allowed as a leading `*.`",
        "spec.hostnames[2]: \"x.com:80\": write host names without a port",
        "spec.rules[0].timeouts.idle: 400h is too long; the maximum is 24h",
        "spec.rules[0].matches[0].method: \"GET POST\" is not a valid HTTP method",
        "spec.rules[0].matches[0].headers[0].name: \"bad header\" is not a valid header name",
        "spec.rules[0].matches[0].headers[0]: give exactly one of exact, regex or present",
        "spec.rules[0].matches[0].headers[1].regex: invalid regex",
        "spec.rules[0].matches[1].path.regex: invalid regex",
    ] {
        assert!(joined.contains(e), "missing {e:?} in:\n{joined}");
    }
}

#[test]
fn errors_name_the_file_they_are_in() {
    let a = "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: { name: m }\nspec: {}\n";
    let b = "apiVersion: infermesh.io/v1alpha1\nkind: Route\nmetadata: { name: r }\nspec:\n  rules: [{ backends: [{ name: nope }] }]\n";
    let errors = Config::load(&[
        Source {
            name: "a.yaml",
            text: a,
        },
        Source {
            name: "b.yaml",
            text: b,
        },
    ])
    .unwrap_err();
    let d = errors.iter().next().unwrap();
    assert_eq!((d.file.as_str(), d.line), ("b.yaml", 5));
    assert_eq!(errors.len(), 1);
}

/// An emptied file (a truncating write caught half-way, a mistaken `>`)
/// is a mistake, not a config of nothing.
#[test]
fn an_empty_file_is_refused_and_says_so() {
    for text in ["", "\n\n", "# the gateway\n# (emptied)\n", "---\n---\n"] {
        assert_eq!(
            load(text).unwrap_err(),
            [
                "gw.yaml:1:1: the file holds no documents (it is empty, or only comments); a config needs at least one resource"
            ],
            "{text:?}"
        );
    }
}

#[test]
fn syntax_errors_are_located() {
    let errors = load("apiVersion: infermesh.io/v1alpha1\nkind: [Backend\n").unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("gw.yaml:"), "{}", errors[0]);
    assert!(errors[0].contains("invalid YAML"), "{}", errors[0]);
}

#[test]
fn resilience_settings_have_documented_defaults() {
    let config = load(VALID).unwrap();
    let backend = &config.backend("llama").unwrap().spec;
    assert_eq!(backend.load_balancer.policy, BalancePolicy::PeakEwma);
    assert_eq!(backend.circuit_breaker.max_requests, 1024);
    assert_eq!(backend.circuit_breaker.max_retries, 3);
    assert_eq!(backend.outlier_detection.consecutive_failures, 5);
    assert_eq!(
        backend.outlier_detection.base_ejection_time,
        Duration::from_secs(30)
    );
    assert_eq!(
        backend.outlier_detection.max_ejection_time,
        Duration::from_secs(300)
    );
    assert!(backend.health_check.is_none());
    let retry = &config.route("chat").unwrap().spec.rules[0].retry;
    assert_eq!(retry.max_retries, 2);
    assert_eq!(
        retry.on,
        [
            RetryOn::ConnectFailure,
            RetryOn::RefusedStream,
            RetryOn::Reset,
            RetryOn::GatewayError
        ]
    );
    assert_eq!(retry.backoff.base, Duration::from_millis(25));
    assert_eq!(retry.backoff.max, Duration::from_millis(250));
    assert_eq!(retry.max_replay_bytes, 64 * 1024);
    assert_eq!(retry.budget.percent, 20);
    assert_eq!(retry.budget.min_retry_concurrency, 3);
    assert!(!retry.non_idempotent);
}

#[test]
fn resilience_settings_are_checked_where_they_are_written() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: m }
spec:
  loadBalancer: { policy: random }
  circuitBreaker: { maxRequests: 0 }
  outlierDetection: { baseEjectionTime: 1m, maxEjectionTime: 30s, maxEjectionPercent: 120 }
  healthCheck: { path: health, unhealthyThreshold: 0 }
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: r }
spec:
  rules:
    - backends: [{ name: m }]
      retry:
        on: [connect-failure, 5xx]
        statusCodes: [700]
        grpcStatuses: [unavailable]
        backoff: { base: 1s, max: 100ms }
        maxRetries: 50
      mirror: { backend: shadow, percent: 101 }
      rateLimit: { requestsPerSecond: 0 }
"#;
    // An unknown name stops neither its document nor the checks of the
    // rest of it.
    assert_eq!(
        load(text).unwrap_err(),
        [
            "gw.yaml:5:19: Backend/m: spec.loadBalancer.policy: unknown variant `random`, expected one of `peakEwma`, `leastRequest`, `roundRobin`",
            "gw.yaml:6:21: Backend/m: spec.circuitBreaker.maxRequests: must be at least 1; with 0 every request would be refused",
            "gw.yaml:7:45: Backend/m: spec.outlierDetection.maxEjectionTime: 30s is too short; the minimum is 1m",
            "gw.yaml:7:67: Backend/m: spec.outlierDetection.maxEjectionPercent: 120 is not a percentage (0-100)",
            "gw.yaml:8:18: Backend/m: spec.healthCheck.path: \"health\" is not a request path; write it like /health",
            "gw.yaml:8:32: Backend/m: spec.healthCheck.unhealthyThreshold: must be at least 1",
            "gw.yaml:17:31: Route/r: spec.rules[0].retry.on[1]: unknown variant `5xx`, expected one of `connect-failure`, `refused-stream`, `reset`, `gateway-error`, `rate-limited`",
            "gw.yaml:18:23: Route/r: spec.rules[0].retry.statusCodes[0]: 700 is not an HTTP status code (100-599)",
            "gw.yaml:19:9: Route/r: spec.rules[0].retry.grpcStatuses: gRPC calls are POSTs, retried only with nonIdempotent: true; set it, or remove grpcStatuses",
            "gw.yaml:20:30: Route/r: spec.rules[0].retry.backoff.max: 100ms is too short; the minimum is 1s",
            "gw.yaml:21:9: Route/r: spec.rules[0].retry.maxRetries: 50 retries is too many; the maximum is 10",
            "gw.yaml:22:17: Route/r: spec.rules[0].mirror.backend: backend \"shadow\" is not defined (defined backends: m)",
            "gw.yaml:22:34: Route/r: spec.rules[0].mirror.percent: 101 is not a percentage (0-100)",
            "gw.yaml:23:20: Route/r: spec.rules[0].rateLimit.requestsPerSecond: must be at least 1; remove the route rule to refuse all its requests",
        ]
    );
}

#[test]
fn a_backend_tls_identity_must_be_a_spiffe_id() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: m }
spec:
  tls: { identity: "https://llama.models" }
"#;
    let errors = load(text).unwrap_err();
    assert_eq!(
        errors,
        [
            "gw.yaml:5:10: Backend/m: spec.tls.identity: `https://llama.models` is not a SPIFFE ID: it must start with `spiffe://` (lower case), as in `spiffe://cluster.local/ns/default/sa/web`"
        ]
    );
    let ok = text.replace(
        "https://llama.models",
        "spiffe://cluster.local/ns/models/sa/llama",
    );
    assert!(load(&ok).is_ok());
}

#[test]
fn capture_settings_are_checked_where_they_are_written() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: public }
spec:
  address: 127.0.0.1:8080
  outsideMesh: blocked
  tls: { ports: [{ port: 9090, mode: disable }] }
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: outbound }
spec:
  address: 127.0.0.1:15001
  capture: outbound
  tls: { mode: strict }
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: inbound }
spec:
  address: 0.0.0.0:15006
  capture: inbound
  tls:
    ports:
      - { port: 8000, mode: strict }
      - { port: 8000, mode: disable }
      - { port: 0, mode: permissive }
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: a }
spec:
  addresses: ["10.96.0.10:80"]
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: b }
spec:
  addresses: ["10.96.0.11:80", "10.96.0.10:80"]
"#;
    let errors = load(text).unwrap_err();
    assert_eq!(
        errors,
        [
            "gw.yaml:6:3: Listener/public: spec.outsideMesh: outsideMesh applies only to a listener with `capture: outbound`",
            "gw.yaml:7:10: Listener/public: spec.tls.ports: per-port modes apply only to a listener with `capture: inbound` (whose connections keep their original port)",
            "gw.yaml:15:3: Listener/outbound: spec.tls: an outbound capture listener takes the app's own plaintext traffic; mutual TLS is originated per backend (Backend spec.tls)",
            "gw.yaml:26:11: Listener/inbound: spec.tls.ports[1].port: port 8000 is already listed at tls.ports[0]",
            "gw.yaml:27:11: Listener/inbound: spec.tls.ports[2].port: port must be between 1 and 65535",
            "gw.yaml:39:32: Backend/b: spec.addresses[1]: address 10.96.0.10:80 already stands for backend \"a\"; an address can lead to one backend only",
        ]
    );
}

#[test]
fn built_in_documents_give_way_to_the_files() {
    let built_in = Source {
        name: "<built-in>",
        text: "apiVersion: infermesh.io/v1alpha1\nkind: Listener\nmetadata: { name: inbound }\nspec: { address: 0.0.0.0:15006, capture: inbound }\n",
    };
    let file = "apiVersion: infermesh.io/v1alpha1\nkind: Listener\nmetadata: { name: inbound }\nspec: { address: 127.0.0.1:25006, capture: inbound }\n";
    let config = Config::load_with_defaults(
        &[Source {
            name: "f.yaml",
            text: file,
        }],
        &[built_in],
    )
    .unwrap();
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.listeners[0].spec.address.port(), 25006);
    let other =
        "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: { name: m }\nspec: {}\n";
    let config = Config::load_with_defaults(
        &[Source {
            name: "f.yaml",
            text: other,
        }],
        &[built_in],
    )
    .unwrap();
    assert_eq!(config.listeners[0].spec.address.port(), 15006);
    assert_eq!(&*config.listeners[0].origin.file, "<built-in>");
}

#[test]
fn hedging_is_off_by_default_and_checked_where_written() {
    let rule = |hedge: &str| {
        format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{ name: b }}\nspec: {{}}\n---\napiVersion: infermesh.io/v1alpha1\nkind: Route\nmetadata: {{ name: r }}\nspec:\n  rules:\n    - backends: [{{ name: b }}]\n{hedge}"
        )
    };
    let config = load(&rule("")).unwrap();
    assert!(config.routes[0].spec.rules[0].hedge.is_none());
    let config = load(&rule("      hedge: {}\n")).unwrap();
    let hedge = config.routes[0].spec.rules[0].hedge.as_ref().unwrap();
    assert_eq!(hedge.delay, Duration::from_millis(100));
    assert_eq!((hedge.max_hedges, hedge.budget_percent), (1, 5.0));
    assert_eq!(hedge.percentile, None);

    let errors = load(&rule(
        "      hedge: { delay: 0s, percentile: 100, maxHedges: 5, budgetPercent: 120 }\n",
    ))
    .unwrap_err();
    assert_eq!(errors.len(), 4, "{errors:#?}");
    for (field, message) in [
        ("spec.rules[0].hedge.delay", "the minimum is 1ms"),
        ("spec.rules[0].hedge.percentile", "100 is not a percentile"),
        ("spec.rules[0].hedge.maxHedges", "give 1 to 4"),
        (
            "spec.rules[0].hedge.budgetPercent",
            "120 is not a percentage",
        ),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(field) && e.contains(message)),
            "{field}: {errors:#?}"
        );
    }
}

#[test]
fn a_model_match_names_a_model() {
    let text = |model: &str| {
        format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{ name: b }}\nspec: {{}}\n---\napiVersion: infermesh.io/v1alpha1\nkind: Route\nmetadata: {{ name: r }}\nspec:\n  rules:\n    - matches: [{{ model: {model} }}]\n      backends: [{{ name: b }}]\n"
        )
    };
    let config = load(&text("llama-3-8b")).unwrap();
    assert_eq!(
        config.routes[0].spec.rules[0].matches[0].model.as_deref(),
        Some("llama-3-8b")
    );
    assert_eq!(
        load(&text("\"  \"")).unwrap_err(),
        [
            "gw.yaml:11:19: Route/r: spec.rules[0].matches[0].model: give the model's name, e.g. llama-3-8b"
        ]
    );
}

#[test]
fn a_fanout_loads_with_its_defaults_and_is_checked_where_written() {
    let rule = |rule: &str| {
        format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{ name: a }}\nspec: {{}}\n---\napiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{ name: b }}\nspec: {{}}\n---\napiVersion: infermesh.io/v1alpha1\nkind: Route\nmetadata: {{ name: r }}\nspec:\n  rules:\n    - {rule}\n"
        )
    };
    let config = load(&rule(
        "fanout: { strategy: vote, vote: { pointer: /choices/0/message/content }, branches: [{ name: x, backend: a, model: llama }, { name: y, backend: b, required: true, timeout: 2s }] }",
    ))
    .unwrap();
    let fanout = config.routes[0].spec.rules[0].fanout.as_ref().unwrap();
    assert_eq!(fanout.strategy, infermesh_api::FanoutStrategy::Vote);
    assert_eq!(fanout.max_body_bytes, 8 * 1024 * 1024);
    assert_eq!(fanout.metadata_field, "infermesh_fanout");
    assert_eq!(fanout.deadline, Duration::ZERO);
    assert_eq!(fanout.branches[0].model.as_deref(), Some("llama"));
    assert!(!fanout.branches[0].required && fanout.branches[1].required);
    assert_eq!(fanout.branches[1].timeout, Duration::from_secs(2));
    // A deadline within the total limit is fine.
    load(&rule(
        "timeouts: { total: 10s }\n      fanout: { strategy: all, deadline: 9s, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
    ))
    .unwrap();

    let cases = [
        (
            "fanout: { strategy: all, branches: [{ name: x, backend: a }] }",
            "spec.rules[0].fanout.branches: a fan-out needs at least two branches",
        ),
        (
            "fanout: { strategy: all, branches: [{ name: x, backend: a }, { name: y, backend: nope }] }",
            "spec.rules[0].fanout.branches[1].backend: backend \"nope\" is not defined",
        ),
        (
            "fanout: { strategy: all, branches: [{ name: x, backend: a }, { name: x, backend: b }] }",
            "spec.rules[0].fanout.branches[1].name: branch \"x\" is named twice",
        ),
        (
            "fanout: { strategy: all, branches: [{ name: X y, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.branches[0].name: \"X y\": a branch name starts with a lower-case letter",
        ),
        (
            "fanout: { strategy: quorum, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.quorum: strategy quorum needs `quorum`",
        ),
        (
            "fanout: { strategy: quorum, quorum: 3, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.quorum: must be between 1 and the number of branches (2)",
        ),
        (
            "fanout: { strategy: all, quorum: 1, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.quorum: `quorum` belongs to strategy quorum, and this fan-out's strategy is all",
        ),
        (
            "fanout: { strategy: vote, vote: { pointer: choices, tieOrder: [z] }, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.vote.pointer: \"choices\" is not a JSON pointer",
        ),
        (
            "fanout: { strategy: vote, vote: { pointer: /a, tieOrder: [z] }, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.vote.tieOrder[0]: \"z\" is not a branch of this fan-out",
        ),
        (
            "fanout: { strategy: first, branches: [{ name: x, backend: a, required: true }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.branches[0].required: strategy first answers with whichever branch succeeds first",
        ),
        (
            "fanout: { strategy: all, branches: [{ name: x, backend: a, weight: 2 }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.branches[0].weight: weights apply to strategy mean only",
        ),
        (
            "fanout: { strategy: mean, branches: [{ name: x, backend: a, weight: 0 }, { name: y, backend: b, path: v1 }] }",
            "spec.rules[0].fanout.branches[0].weight: must be a number above 0",
        ),
        (
            "fanout: { strategy: mean, branches: [{ name: x, backend: a }, { name: y, backend: b, path: v1 }] }",
            "spec.rules[0].fanout.branches[1].path: \"v1\" is not a path starting with '/'",
        ),
        (
            "fanout: { strategy: all, maxBodyBytes: 0, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.maxBodyBytes: must be between 1 and",
        ),
        (
            "backends: [{ name: a }]\n      fanout: { strategy: all, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].backends: a rule has either backends or a fanout, not both",
        ),
        (
            "retry: { maxRetries: 3 }\n      fanout: { strategy: all, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].retry: retry does not apply to a fanout rule",
        ),
        (
            "timeouts: {}",
            "spec.rules[0].backends: a rule needs at least one backend (or a fanout)",
        ),
        (
            "fanout: { strategy: all, branches: [{ name: x, backend: a, model: \"org/llama 3\" }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.branches[0].model: \"org/llama 3\" cannot stand in a KServe path",
        ),
        (
            "timeouts: { total: 10s }\n      fanout: { strategy: all, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.deadline: the fan-out's deadline (5m: fanout.deadline or timeouts.firstEvent, whichever is shorter, else timeouts.responseHeaders) must end before timeouts.total (10s)",
        ),
        (
            "timeouts: { total: 10s }\n      fanout: { strategy: all, deadline: 10s, branches: [{ name: x, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.deadline: the fan-out's deadline (10s: fanout.deadline",
        ),
        (
            "fanout: { strategy: all, branches: [{ name: infermesh_fanout, backend: a }, { name: y, backend: b }] }",
            "spec.rules[0].fanout.branches[0].name: \"infermesh_fanout\" is the metadataField",
        ),
    ];
    for (text, expected) in cases {
        let errors = load(&rule(text)).unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{text}\nexpected: {expected}\ngot: {errors:#?}"
        );
    }
}

#[test]
fn an_endpoint_s_own_identity_needs_mutual_tls_and_an_address() {
    let backend = |spec: &str| {
        format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Backend\nmetadata: {{ name: b }}\nspec:\n{spec}"
        )
    };
    let load = |text: &str| {
        Config::load(&[Source {
            name: "b.yaml",
            text,
        }])
        .map_err(|d| d.iter().map(|d| d.to_string()).collect::<Vec<_>>())
    };
    let good = backend(
        "  tls: {}\n  endpoints:\n    - { address: 127.0.0.1:1, identity: spiffe://td/ns/a/sa/one }\n    - { address: 127.0.0.1:2, identity: spiffe://td/ns/b/sa/two }\n",
    );
    let config = load(&good).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(
        config.backends[0].spec.endpoints[1].identity.as_deref(),
        Some("spiffe://td/ns/b/sa/two")
    );
    let cases = [
        (
            "  endpoints: [{ address: 127.0.0.1:1, identity: spiffe://td/ns/a/sa/one }]\n",
            "spec.endpoints[0].identity: an endpoint's identity is checked by mutual TLS",
        ),
        (
            "  tls: {}\n  endpoints: [{ address: 127.0.0.1:1 }]\n",
            "spec.endpoints[0].identity: this endpoint has no identity to check",
        ),
        (
            "  tls: {}\n  endpoints: [{ address: models.svc:80, identity: spiffe://td/ns/a/sa/one }]\n",
            "spec.endpoints[0].identity: an endpoint's own identity needs an ip:port address",
        ),
        (
            "  tls: { identity: spiffe://td/ns/a/sa/one }\n  endpoints: [{ address: 127.0.0.1:1, identity: \"https://x\" }]\n",
            "spec.endpoints[0].identity:",
        ),
    ];
    for (spec, expected) in cases {
        let errors = load(&backend(spec)).unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{spec}\nexpected: {expected}\ngot: {errors:#?}"
        );
    }
}
