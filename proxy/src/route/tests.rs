//! Whole rule stacks, in process: a rule written in YAML as a user writes
//! it, validated by the `api` crate, built as a snapshot builds it, over
//! backends whose endpoints are in-memory hyper servers
//! ([`crate::transport::memory`]), on tokio's paused clock. Every layer
//! from the rate limit down to the connection pool runs as in production;
//! only the sockets are pipes. What these tests assert is the stack's
//! order, the design decision of [`crate::route::stack`], by its effects.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use infermesh_api::{Config, Source};
use tokio::time::Instant;

use crate::backend::Backend;
use crate::core::body::{ProxyBody, empty, full};
use crate::core::error::ProxyError;
use crate::core::metrics::Registry;
use crate::route::cancellations::Cancellations;
use crate::route::stack::RuleStack;
use crate::transport::memory::MemoryNetwork;

/// The address of in-memory endpoint `n`.
fn endpoint(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 8000))
}

/// What an endpoint does with each request: answer `status` after
/// `delay`.
#[derive(Clone, Copy)]
struct Answer {
    delay: Duration,
    status: u16,
}

fn answers(status: u16) -> Answer {
    Answer {
        delay: Duration::ZERO,
        status,
    }
}

fn answers_after(millis: u64, status: u16) -> Answer {
    Answer {
        delay: Duration::from_millis(millis),
        status,
    }
}

/// One request an endpoint received.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// The endpoint.
    endpoint: SocketAddr,
    /// The request's `x-request` header.
    request: String,
    /// When it arrived, since the test's mesh was made.
    at: Duration,
}

/// In-memory endpoints, what they saw, and the metrics of the stacks
/// built over them.
struct Mesh {
    network: MemoryNetwork,
    started: Instant,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests whose exchange was dropped before the endpoint answered.
    cancelled: Cancellations,
    backend_metrics: crate::backend::Metrics,
    metrics: crate::route::Metrics,
}

impl Mesh {
    fn new() -> Self {
        let registry = Registry::new();
        Mesh {
            network: MemoryNetwork::default(),
            started: Instant::now(),
            seen: Arc::default(),
            cancelled: Cancellations::default(),
            backend_metrics: crate::backend::Metrics::register(&registry),
            metrics: crate::route::Metrics::register(&registry),
        }
    }

    /// Serves `answer` at `addr`; every answer names its endpoint in
    /// `x-endpoint`.
    fn serve(&self, addr: SocketAddr, answer: Answer) {
        let (seen, cancelled, started) = (self.seen.clone(), self.cancelled.clone(), self.started);
        self.network.serve(
            addr,
            Arc::new(move |request| {
                let request_id = request
                    .headers()
                    .get("x-request")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().unwrap().push(Seen {
                    endpoint: addr,
                    request: request_id,
                    at: started.elapsed(),
                });
                let unanswered = cancelled.start();
                Box::pin(async move {
                    tokio::time::sleep(answer.delay).await;
                    unanswered.answered();
                    let mut response = Response::new(full(format!("from {addr}")));
                    *response.status_mut() = StatusCode::from_u16(answer.status).unwrap();
                    response
                        .headers_mut()
                        .insert("x-endpoint", addr.to_string().parse().unwrap());
                    response
                })
            }),
        );
    }

    /// The stack of the first rule of the first route in `yaml`, over its
    /// backends, whose endpoints are this mesh's.
    async fn stack(&self, yaml: &str) -> RuleStack {
        let config = Config::load(&[Source {
            name: "rule.yaml",
            text: yaml,
        }])
        .unwrap_or_else(|e| panic!("{e}"));
        let mut backends = BTreeMap::new();
        for resource in &config.backends {
            let backend = Backend::new(
                &resource.name,
                resource.spec.clone(),
                None,
                &self.backend_metrics,
                Arc::new(self.network.clone()),
            )
            .await;
            backends.insert(resource.name.clone(), backend);
        }
        let route = &config.routes[0];
        RuleStack::build(
            &route.spec.rules[0],
            &Arc::from(route.name.as_str()),
            &backends,
            &self.metrics,
            None,
        )
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn retries(&self, reason: &str) -> u64 {
        self.metrics
            .retries
            .with_label_values(&["chat", reason])
            .get()
    }

    fn hedges(&self, outcome: &str) -> u64 {
        self.metrics
            .hedges
            .with_label_values(&["chat", outcome])
            .get()
    }
}

/// A backend `models` of `endpoints` balanced round robin (so which
/// endpoint an attempt gets is known) without outlier ejection, and a
/// route `chat` whose one rule sends to it with `rule` (YAML flow
/// mappings, after `backends`).
fn config(endpoints: &[SocketAddr], rule: &str) -> String {
    let weighted: Vec<(SocketAddr, u32)> = endpoints.iter().map(|e| (*e, 1)).collect();
    weighted_config(&weighted, rule)
}

/// [`config`], with a weight for each endpoint.
fn weighted_config(endpoints: &[(SocketAddr, u32)], rule: &str) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(e, weight)| format!("{{ address: \"{e}\", weight: {weight} }}"))
        .collect();
    format!(
        "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: models }}
spec:
  endpoints: [{}]
  loadBalancer: {{ policy: roundRobin }}
  outlierDetection: {{ consecutiveFailures: 0 }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: chat }}
spec:
  rules:
    - backends: [{{ name: models }}]
{rule}
",
        endpoints.join(", ")
    )
}

fn get(request: &str) -> Request<ProxyBody> {
    Request::get("http://models.test/v1/models")
        .header("x-request", request)
        .body(empty())
        .unwrap()
}

/// Lets the in-memory endpoints see what their clients did (a connection
/// closed by a cancelled attempt).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn answered_by(result: &Result<Response<ProxyBody>, ProxyError>) -> Option<&str> {
    let response = result.as_ref().ok()?;
    response.headers().get("x-endpoint")?.to_str().ok()
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_is_taken_once_per_request_and_refuses_before_anything_is_sent() {
    let mesh = Mesh::new();
    mesh.serve(endpoint(1), answers(503));
    mesh.serve(endpoint(2), answers(200));
    let stack = mesh
        .stack(&config(
            &[endpoint(1), endpoint(2)],
            "      rateLimit: { requestsPerSecond: 1, burst: 1 }\n      timeouts: { total: 10s }",
        ))
        .await;

    // The first attempt fails and is retried below the rate limit: the
    // retry takes no token of its own.
    let first = stack.send(get("first")).await;
    assert_eq!(answered_by(&first), Some("10.0.0.2:8000"));
    assert_eq!(mesh.retries("gateway-error"), 1);

    // The bucket is empty: the next request is refused at the top of the
    // stack, reaches no endpoint and is not retried.
    let second = stack.send(get("second")).await.unwrap_err();
    assert_eq!(second.kind().reason(), "rate_limited");
    assert_eq!(second.kind().status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(mesh.seen().iter().all(|s| s.request == "first"));
    assert_eq!(mesh.retries("gateway-error"), 1);

    // A second later there is a token again.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(stack.send(get("third")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_replaced_backend_closes_its_idle_connections() {
    let mesh = Mesh::new();
    mesh.serve(endpoint(1), answers(200));
    let stack = mesh.stack(&config(&[endpoint(1)], "")).await;
    let open = mesh
        .backend_metrics
        .upstream_connections
        .with_label_values(&["models"]);
    for n in 0..3 {
        let response = stack.send(get(&format!("r{n}"))).await.unwrap();
        response.into_body().collect().await.unwrap();
        settle().await;
    }
    assert_eq!(open.get(), 1, "one connection, kept idle and reused");
    // A reload drops the old backend with the stack that held it: its idle
    // connection closes and gives its permit back.
    drop(stack);
    settle().await;
    assert_eq!(open.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn every_retry_picks_an_endpoint_the_request_has_not_failed_on() {
    let mesh = Mesh::new();
    mesh.serve(endpoint(1), answers(503));
    mesh.serve(endpoint(2), answers(200));
    // Round robin by weight would send three attempts in four to endpoint
    // 1: a retry gets endpoint 2 only because it avoids where it failed.
    let stack = mesh
        .stack(&weighted_config(
            &[(endpoint(1), 3), (endpoint(2), 1)],
            "      retry: { maxRetries: 2 }",
        ))
        .await;
    for n in 0..8 {
        let id = format!("r{n}");
        let result = stack.send(get(&id)).await;
        assert_eq!(answered_by(&result), Some("10.0.0.2:8000"), "{id}");
        let tried: Vec<SocketAddr> = mesh
            .seen()
            .into_iter()
            .filter(|s| s.request == id)
            .map(|s| s.endpoint)
            .collect();
        assert!(
            tried == [endpoint(2)] || tried == [endpoint(1), endpoint(2)],
            "{id} tried {tried:?}"
        );
    }
    assert!(mesh.retries("gateway-error") >= 4);
}

#[tokio::test(start_paused = true)]
async fn a_post_whose_connect_failed_is_sent_again_with_its_head() {
    let mesh = Mesh::new();
    // Endpoint 1 refuses connections: nothing serves it.
    mesh.serve(endpoint(2), answers(200));
    let stack = mesh.stack(&config(&[endpoint(1), endpoint(2)], "")).await;
    for n in 0..2 {
        let id = format!("post{n}");
        let post = Request::post("http://models.test/v1/chat/completions")
            .header("x-request", &id)
            .body(full("{\"model\":\"m\"}"))
            .unwrap();
        let result = stack.send(post).await;
        assert_eq!(answered_by(&result), Some("10.0.0.2:8000"), "{id}");
        // Round robin gives each POST endpoint 1 first (its retry took
        // endpoint 2): the connect failed, and the POST reached endpoint 2
        // with the head it came with.
        assert_eq!(mesh.retries("connect-failure"), n + 1, "{id}");
    }
    let seen: Vec<String> = mesh.seen().into_iter().map(|s| s.request).collect();
    assert_eq!(seen, ["post0", "post1"]);
}

#[tokio::test(start_paused = true)]
async fn the_rules_total_timeout_bounds_every_attempt_and_backoff() {
    let mesh = Mesh::new();
    mesh.serve(endpoint(1), answers_after(400, 503));
    mesh.serve(endpoint(2), answers_after(400, 503));
    let stack = mesh
        .stack(&config(
            &[endpoint(1), endpoint(2)],
            "      timeouts: { total: 1s }\n      retry: { maxRetries: 5 }",
        ))
        .await;
    let started = Instant::now();
    let error = stack.send(get("slow")).await.unwrap_err();
    // Two attempts of 400 ms and their backoffs fit; the third is cut at
    // the rule's limit, as the client sees it, not the attempt's.
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(error.kind().reason(), "request_timeout");
    assert_eq!(error.kind().status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(mesh.seen().len(), 3);
    settle().await;
    assert_eq!(
        mesh.cancelled.count(),
        1,
        "the attempt in flight was cancelled"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hedge_and_a_retry_together_use_three_different_endpoints() {
    let mesh = Mesh::new();
    // Round robin sends the first attempt to 1, the hedge to 3 (1 is its
    // sibling's) and the retry to 2 (the only one the request has not
    // used).
    mesh.serve(endpoint(1), answers_after(10_000, 200));
    mesh.serve(endpoint(2), answers(200));
    mesh.serve(endpoint(3), answers(503));
    let stack = mesh
        .stack(&config(
            &[endpoint(1), endpoint(2), endpoint(3)],
            "      hedge: { delay: 50ms }\n      retry: { perTryTimeout: 200ms }",
        ))
        .await;
    let started = Instant::now();
    let result = stack.send(get("hedged")).await;
    assert_eq!(answered_by(&result), Some("10.0.0.2:8000"));

    let seen = mesh.seen();
    let order: Vec<SocketAddr> = seen.iter().map(|s| s.endpoint).collect();
    assert_eq!(order, [endpoint(1), endpoint(3), endpoint(2)]);
    assert_eq!(
        seen[1].at,
        Duration::from_millis(50),
        "the hedge, after its delay"
    );
    // The retry waits for the race: the stalled first attempt's per-try
    // timeout, then the backoff (full jitter under 25 ms).
    let retried = seen[2].at;
    assert!(
        retried >= Duration::from_millis(200) && retried <= Duration::from_millis(225),
        "{retried:?}"
    );
    assert_eq!(started.elapsed(), retried);
    settle().await;
    assert_eq!(mesh.cancelled.count(), 1, "the stalled attempt");
    assert_eq!((mesh.hedges("sent"), mesh.hedges("won")), (1, 0));
    assert_eq!(mesh.retries("gateway-error"), 1);
}

#[tokio::test(start_paused = true)]
async fn every_layer_of_a_stack_is_always_ready() {
    use tower::Service;
    let mesh = Mesh::new();
    mesh.serve(endpoint(1), answers(200));
    // Every policy a forwarding rule can stack, with the rate limit spent.
    let forward = mesh
        .stack(&config(
            &[endpoint(1)],
            "      rateLimit: { requestsPerSecond: 1, burst: 1 }\n      timeouts: { total: 10s, idle: 5s }\n      retry: { maxRetries: 2 }\n      hedge: { delay: 50ms }\n      mirror: { backend: models, percent: 100 }",
        ))
        .await;
    assert!(forward.send(get("first")).await.is_ok());
    assert!(forward.send(get("refused")).await.is_err());
    // A fan-out rule instead of backends.
    let fanout_rule = config(&[endpoint(1)], "").replace(
        "    - backends: [{ name: models }]",
        "    - fanout: { strategy: all, branches: [{ name: a, backend: models }, { name: b, backend: models }] }\n      rateLimit: { requestsPerSecond: 1 }",
    );
    let fanout = mesh.stack(&fanout_rule).await;
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    for stack in [&forward, &fanout] {
        let mut service = stack.service.clone();
        assert!(
            matches!(service.poll_ready(&mut cx), std::task::Poll::Ready(Ok(()))),
            "RuleStack::send calls without waiting for readiness"
        );
    }
}
