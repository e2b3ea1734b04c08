//! Micro-benchmarks of the per-request work the proxy adds: checking the
//! host and normalising the path, matching a route, rewriting headers,
//! adapting a request to the upstream's HTTP version, and picking an
//! endpoint. Run with `cargo bench -p
//! infermesh-proxy`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Request};
use infermesh_api::{
    BalancePolicy, EscapedSlashes, HeaderMatch, PathMatch, RouteMatch, UpstreamProtocol,
};
use infermesh_proxy::hot_path::{
    Balancer, Endpoint, EndpointSet, Router, adapt_request, add_forwarded, check_host,
    normalize_path, strip_hop_by_hop,
};

/// A route table like a gateway in front of `models` model servers: per
/// model an OpenAI prefix, a KServe v2 exact path, and a tenant header rule.
fn table(models: usize) -> Router<usize> {
    let mut router = Router::builder();
    for m in 0..models {
        let prefix = RouteMatch {
            path: Some(PathMatch::Prefix(format!("/v1/models/model-{m}"))),
            ..RouteMatch::default()
        };
        let infer = RouteMatch {
            path: Some(PathMatch::Exact(format!("/v2/models/model-{m}/infer"))),
            method: Some("POST".into()),
            ..RouteMatch::default()
        };
        let tenant = RouteMatch {
            path: Some(PathMatch::Prefix(format!("/v1/models/model-{m}"))),
            headers: vec![HeaderMatch {
                name: "x-tenant".into(),
                exact: Some(format!("tenant-{m}")),
                regex: None,
                present: None,
            }],
            ..RouteMatch::default()
        };
        router.add(&[], &[prefix, infer, tenant], m).unwrap();
    }
    router.add(&[], &[], usize::MAX).unwrap();
    router.build()
}

fn inference_request(path: &str) -> Request<()> {
    Request::post(path)
        .header("host", "models.example.com")
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .header("authorization", "Bearer abcdefghijklmnopqrstuvwxyz")
        .header("user-agent", "openai-python/1.40.0")
        .header("connection", "keep-alive")
        .header("content-length", "512")
        .body(())
        .unwrap()
}

fn route_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_match");
    for models in [1usize, 10, 100] {
        let router = table(models);
        let last = models - 1;
        let hit = inference_request(&format!("/v2/models/model-{last}/infer"));
        group.bench_function(format!("{models}_models_last_rule"), |b| {
            b.iter(|| router.route(black_box(&hit)))
        });
        let miss = inference_request("/unknown/path");
        group.bench_function(format!("{models}_models_fallback"), |b| {
            b.iter(|| router.route(black_box(&miss)))
        });
    }
    group.finish();
}

fn request_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_check");
    let request = inference_request("/v1/chat/completions");
    group.bench_function("host", |b| b.iter(|| check_host(black_box(&request))));
    for (name, path) in [
        ("normal_path", "/v2/models/model-7/versions/2/infer"),
        (
            "path_to_normalise",
            "/v2/models/./model-7//versions/%32/../2/infer",
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| normalize_path(black_box(path), EscapedSlashes::Unescape).map(|p| p.len()))
        });
    }
    group.finish();
}

fn header_rewrite(c: &mut Criterion) {
    let template = inference_request("/v1/chat/completions");
    let client = "10.1.2.3".parse().unwrap();
    c.bench_function("header_rewrite/forwarded_and_hop_by_hop", |b| {
        b.iter_batched_ref(
            || template.headers().clone(),
            |headers: &mut HeaderMap| {
                strip_hop_by_hop(headers, false);
                add_forwarded(headers, &client, "http");
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let endpoint = "10.0.0.7:8000".parse().unwrap();
    for (name, protocol) in [
        ("http1", UpstreamProtocol::Http1),
        ("http2", UpstreamProtocol::Http2),
    ] {
        c.bench_function(&format!("header_rewrite/adapt_to_{name}"), |b| {
            b.iter_batched_ref(
                || inference_request("/v1/chat/completions?stream=true"),
                |request| adapt_request(request, protocol, endpoint),
                criterion::BatchSize::SmallInput,
            )
        });
    }
}

fn endpoint_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("endpoint_pick");
    let now = tokio::time::Instant::now();
    for endpoints in [3u16, 16, 64] {
        let set = EndpointSet::new(
            (0..endpoints)
                .map(|i| {
                    let addr = SocketAddr::from(([10, 0, 0, 1], 8000 + i));
                    let endpoint = Endpoint::new(addr, 1, None);
                    endpoint
                        .latency
                        .observe(now, std::time::Duration::from_millis(20 + u64::from(i)));
                    Arc::new(endpoint)
                })
                .collect(),
        );
        for (name, policy) in [
            ("peak_ewma", BalancePolicy::PeakEwma),
            ("least_request", BalancePolicy::LeastRequest),
            ("round_robin", BalancePolicy::RoundRobin),
        ] {
            let balancer = Balancer::new(policy);
            group.bench_function(format!("{name}/{endpoints}_endpoints"), |b| {
                b.iter(|| balancer.pick(black_box(&set), &[], now).map(|e| e.addr))
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    request_check,
    route_match,
    header_rewrite,
    endpoint_pick
);
criterion_main!(benches);
