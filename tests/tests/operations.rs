//! Operating a real gateway: hot reload (good, bad, under load), graceful
//! shutdown, the admin endpoints and the metrics page.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use infermesh_tests::backend::{self, Handler, MockBackend, Protocol};
use infermesh_tests::client;
use infermesh_tests::process::{Gateway, backend, config, listener};
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

fn route_to(target: &str) -> String {
    format!(
        "kind: Route\nmetadata: {{ name: r }}\nspec:\n  rules:\n    - backends: [{{ name: {target} }}]"
    )
}

fn two_backends(a: &MockBackend, b: &MockBackend, target: &str) -> String {
    config(&[
        &listener("web", "http"),
        &backend("a", "http1", &[a.addr]),
        &backend("b", "http1", &[b.addr]),
        &route_to(target),
    ])
}

fn applied(l: &Value) -> bool {
    l["message"] == "config applied"
}

fn refused(l: &Value) -> bool {
    l["message"] == "config refused; still serving the previous version"
}

#[tokio::test]
async fn an_emptied_config_file_is_refused_and_every_listener_stays() {
    let a = MockBackend::echo("a", Protocol::Http1).await;
    let b = MockBackend::echo("b", Protocol::Http1).await;
    let gateway = Gateway::start(&two_backends(&a, &b, "a"));
    let client = client::http1();
    let url = gateway.url("web", "/v1/models");
    assert_eq!(client::get(&client, &url).await.status, 200);
    // A truncating write caught half-way, or a mistaken `>`.
    gateway.write_config("");
    gateway.wait_for_log(refused, Duration::from_secs(10));
    assert!(
        gateway
            .logs()
            .iter()
            .any(|l| l.to_string().contains("the file holds no documents")),
        "the refusal says why"
    );
    assert_eq!(
        client::get(&client, &url).await.status,
        200,
        "still serving"
    );
    let ready = client::get(&client, &format!("http://{}/ready", gateway.health)).await;
    assert_eq!(ready.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_config_is_refused_with_its_location_while_the_old_one_serves() {
    let a = MockBackend::echo("a", Protocol::Http1).await;
    let b = MockBackend::echo("b", Protocol::Http1).await;
    let gateway = Gateway::start(&two_backends(&a, &b, "a"));
    let client = client::http1();
    let url = gateway.url("web", "/v1/models");
    assert_eq!(
        client::get(&client, &url).await.header("x-backend"),
        Some("a")
    );

    // Route to b, with a typo in a field name on line 21.
    let broken = two_backends(&a, &b, "b").replace("rules:", "rulez:");
    let line = broken.lines().position(|l| l.contains("rulez")).unwrap() + 1;
    gateway.write_config(&broken);
    gateway.wait_for_log(refused, Duration::from_secs(10));
    let path = gateway.config_path().display().to_string();
    let located: Vec<Value> = gateway
        .logs_matching(|l| l["target"] == "infermesh::config")
        .into_iter()
        .map(|l| l["message"].clone())
        .collect();
    assert_eq!(
        located,
        [
            format!(
                "{path}:{}:1: Route/r: spec: missing field `rules`",
                line - 1
            ),
            format!(
                "{path}:{line}:3: Route/r: spec.rulez: unknown field `rulez`; did you mean `rules`?"
            ),
        ],
        "each problem is logged with its file, line, column and field"
    );
    for _ in 0..20 {
        assert_eq!(
            client::get(&client, &url).await.header("x-backend"),
            Some("a"),
            "the old config keeps serving"
        );
    }
    let text = client::metrics(gateway.health).await;
    assert_eq!(
        client::metric_value(&text, "infermesh_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
    assert_eq!(
        client::metric_value(&text, "infermesh_config_last_reload_successful"),
        Some(0.0)
    );

    // SIGHUP reads the file again, and refuses it again.
    gateway.signal(Signal::SIGHUP);
    gateway.wait_for_logs(2, refused, Duration::from_secs(10));

    // A fixed file is applied.
    gateway.write_config(&two_backends(&a, &b, "b"));
    gateway.wait_for_log(applied, Duration::from_secs(10));
    assert_eq!(
        client::get(&client, &url).await.header("x-backend"),
        Some("b")
    );
    let text = client::metrics(gateway.health).await;
    assert_eq!(
        client::metric_value(&text, "infermesh_config_reloads_total{result=\"success\"}"),
        Some(1.0)
    );
    assert_eq!(
        client::metric_value(&text, "infermesh_config_last_reload_successful"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_under_continuous_load_fail_no_request() {
    let a = MockBackend::echo("a", Protocol::Http1).await;
    let b = MockBackend::echo("b", Protocol::Http1).await;
    let c = MockBackend::echo("c", Protocol::Http2).await;
    let with_c = |target: &str| {
        config(&[
            &listener("web", "http"),
            &backend("a", "http1", &[a.addr]),
            &backend("b", "http1", &[b.addr]),
            &backend("c", "http2", &[c.addr]),
            &route_to(target),
        ])
    };
    let gateway = Gateway::start(&two_backends(&a, &b, "a"));
    let url = gateway.url("web", "/v1/chat/completions");
    let clients = (0..4)
        .map(|i| {
            if i % 2 == 0 {
                client::http1()
            } else {
                client::http2()
            }
        })
        .collect();
    let load = client::SteadyLoad::start(clients, move || {
        Request::post(&url)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    });
    load.progress(100).await;
    let targets = ["b", "c", "a", "c", "b", "a"];
    for (i, target) in targets.iter().enumerate() {
        let text = if *target == "c" || i > 0 {
            with_c(target)
        } else {
            two_backends(&a, &b, target)
        };
        gateway.write_config(&text);
        gateway.wait_for_logs(i + 1, applied, Duration::from_secs(10));
        load.progress(100).await;
    }
    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 700, "only {ok} requests");
    assert!(a.requests() > 0 && b.requests() > 0 && c.requests() > 0);
}

/// A backend that holds every request but `/health` until `release`
/// turns true.
fn held(release: watch::Receiver<bool>) -> Handler {
    Arc::new(move |req: Request<Incoming>| {
        let mut release = release.clone();
        Box::pin(async move {
            if req.uri().path() != "/health" {
                let _ = release.wait_for(|r| *r).await;
            }
            Response::new(backend::full("done"))
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let (release, released) = watch::channel(false);
    let upstream = MockBackend::start(Protocol::Http1, held(released)).await;
    let mut gateway = Gateway::start_with_args(
        &config(&[
            &listener("web", "http"),
            &backend("m", "http1", &[upstream.addr]),
            &route_to("m"),
        ]),
        &["--shutdown-grace-period", "20s", "--drain-delay", "2s"],
    );
    let address = gateway.listener("web");
    let url = gateway.url("web", "/v1/completions");

    // An idle keep-alive connection: one finished exchange, then quiet.
    let mut idle = tokio::net::TcpStream::connect(address).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: m\r\n\r\n")
        .await
        .unwrap();

    // In-flight requests over HTTP/1.1 and over one HTTP/2 connection.
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        let client = client::http1();
        let url = url.clone();
        in_flight.push(tokio::spawn(
            async move { client::get(&client, &url).await },
        ));
    }
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(address).await.unwrap());
    let (mut h2, h2_connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let h2_connection = tokio::spawn(h2_connection);
    let mut h2_requests = Vec::new();
    for _ in 0..3 {
        h2_requests.push(
            h2.send_request(
                Request::get(url.as_str())
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            ),
        );
    }
    let h2_requests = tokio::spawn(futures_util::future::join_all(h2_requests));
    while upstream.requests() < 7 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    gateway.signal(Signal::SIGTERM);
    gateway.wait_for_log(|l| l["message"] == "shutting down", Duration::from_secs(10));

    let ready = client::get(
        &client::http1(),
        &format!("http://{}/ready", gateway.health),
    )
    .await;
    assert_eq!(ready.status, 503, "not ready while draining");
    // During the drain delay, new connections are still served.
    let late = client::send(
        &client::http1(),
        Request::get(gateway.url("web", "/health"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(
        late.map(|r| r.status.as_u16()),
        Ok(200),
        "accepting during --drain-delay; log:\n{}",
        gateway.dump()
    );
    assert!(
        client::refused_within(address, Duration::from_secs(10)).await,
        "the listener stops accepting"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle keep-alive connection is closed");

    release.send(true).unwrap();
    for request in in_flight {
        let reply = request.await.unwrap();
        assert_eq!(
            (reply.status.as_u16(), &reply.body[..]),
            (200, &b"done"[..])
        );
    }
    for response in h2_requests.await.unwrap() {
        let response = response.expect("the HTTP/2 stream finishes");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "done"
        );
    }
    // GOAWAY was sent: the client's connection ends cleanly.
    tokio::time::timeout(Duration::from_secs(10), h2_connection)
        .await
        .expect("the HTTP/2 connection closes after its streams")
        .unwrap()
        .expect("closed without a connection error");
    let status = gateway.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_show_config_endpoints_and_control_logs_and_drain() {
    let a = MockBackend::echo("a", Protocol::Http1).await;
    let b = MockBackend::echo("b", Protocol::Http1).await;
    let gateway = Gateway::start(&two_backends(&a, &b, "a"));
    let client = client::http1();
    let admin = |path: &str| format!("http://{}{path}", gateway.admin);
    for _ in 0..3 {
        client::get(&client, &gateway.url("web", "/")).await;
    }

    let config = client::get(&client, &admin("/config")).await.json();
    assert_eq!(config["version"].as_str().unwrap().len(), 16);
    let kinds: Vec<&str> = config["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Listener", "Backend", "Backend", "Route"]);
    assert_eq!(
        config["documents"][1]["spec"]["connectTimeout"], "5s",
        "defaults are shown"
    );

    let endpoints = client::get(&client, &admin("/endpoints")).await.json();
    let first = &endpoints["backends"][0];
    assert_eq!(first["name"], "a");
    assert_eq!(first["endpoints"][0]["address"], a.addr.to_string());
    assert_eq!(first["endpoints"][0]["requests"], 3);
    assert_eq!(first["endpoints"][0]["inFlight"], 0);
    assert_eq!(endpoints["backends"][1]["endpoints"][0]["requests"], 0);

    assert_eq!(
        client::get(&client, &admin("/log-level")).await.json()["filter"],
        "info"
    );
    let set = Request::post(admin("/log-level?filter=info,infermesh::access=off"))
        .body(Full::default())
        .unwrap();
    assert_eq!(client::send(&client, set).await.unwrap().status, 200);
    let bad = Request::post(admin("/log-level?filter=[["))
        .body(Full::default())
        .unwrap();
    assert_eq!(client::send(&client, bad).await.unwrap().status, 400);
    // Access lines are written in batches: a silenced request's line is
    // known to be absent once a later request's line has been written.
    let with_id = |id: &str| {
        Request::get(gateway.url("web", "/"))
            .header("x-request-id", id)
            .body(Full::default())
            .unwrap()
    };
    client::send(&client, with_id("silenced")).await.unwrap();
    let unset = Request::post(admin("/log-level?filter=info"))
        .body(Full::default())
        .unwrap();
    assert_eq!(client::send(&client, unset).await.unwrap().status, 200);
    client::send(&client, with_id("audible")).await.unwrap();
    gateway.wait_for_log(|l| l["request_id"] == "audible", Duration::from_secs(5));
    assert!(
        gateway
            .logs_matching(|l| l["request_id"] == "silenced")
            .is_empty(),
        "access log silenced"
    );

    // A web page on the operator's machine cannot drain the proxy: a
    // browser's POST carries Origin, and a DNS-rebound one a host name.
    for (name, value) in [
        ("origin", "http://attacker.example"),
        ("sec-fetch-site", "cross-site"),
        ("host", "attacker.example:15000"),
    ] {
        let forged = Request::post(admin("/drain"))
            .header(name, value)
            .body(Full::default())
            .unwrap();
        assert_eq!(
            client::send(&client, forged).await.unwrap().status,
            403,
            "{name}: {value}"
        );
    }
    let ready = client::get(&client, &format!("http://{}/ready", gateway.health)).await;
    assert_eq!(ready.status, 200, "not drained by a forged request");

    let drain = Request::post(admin("/drain"))
        .body(Full::default())
        .unwrap();
    assert_eq!(client::send(&client, drain).await.unwrap().status, 202);
    let ready = client::get(&client, &format!("http://{}/ready", gateway.health)).await;
    assert_eq!(ready.status, 503);
    gateway.wait_for_log(
        |l| l["message"] == "all connections drained",
        Duration::from_secs(10),
    );
    assert!(
        tokio::net::TcpStream::connect(gateway.listener("web"))
            .await
            .is_err(),
        "no longer accepting"
    );
    assert_eq!(
        client::get(&client, &admin("/config")).await.status,
        200,
        "admin stays up"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_page_passes_promtool_and_counts_requests() {
    let a = MockBackend::echo("a", Protocol::Http1).await;
    let b = MockBackend::echo("b", Protocol::Http1).await;
    let gateway = Gateway::start(&two_backends(&a, &b, "a"));
    let client = client::http1();
    for _ in 0..5 {
        client::get(&client, &gateway.url("web", "/")).await;
    }
    client::get(&client, &gateway.url("web", "/")).await;
    let text = client::metrics(gateway.health).await;
    assert_eq!(
        client::metric_value(
            &text,
            "infermesh_requests_total{backend=\"a\",code=\"200\",grpc_status=\"\",route=\"r\"}"
        ),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        client::metric_value(
            &text,
            "infermesh_request_duration_seconds_count{backend=\"a\",route=\"r\"}"
        ),
        Some(6.0)
    );
    assert_eq!(
        client::metric_value(
            &text,
            "infermesh_response_first_byte_seconds_count{backend=\"a\",route=\"r\"}"
        ),
        Some(6.0)
    );
    assert!(text.contains(
        "infermesh_request_duration_seconds_bucket{backend=\"a\",route=\"r\",le=\"0.0001\"}"
    ));
    assert!(text.contains(
        "infermesh_request_duration_seconds_bucket{backend=\"a\",route=\"r\",le=\"600\"}"
    ));
    assert_eq!(
        client::metric_value(&text, "infermesh_upstream_connections{backend=\"a\"}"),
        Some(1.0),
        "one pooled connection"
    );
    assert_eq!(
        client::metric_value(
            &text,
            "infermesh_upstream_connects_total{backend=\"a\",result=\"success\"}"
        ),
        Some(1.0),
        "made once, reused"
    );
    assert_eq!(
        client::metric_value(
            &text,
            "infermesh_upstream_connect_duration_seconds_count{backend=\"a\"}"
        ),
        Some(1.0)
    );
    let version =
        gateway.wait_for_log(|l| l["message"] == "serving", Duration::from_secs(1))["version"]
            .as_str()
            .unwrap()
            .to_owned();
    assert_eq!(
        client::metric_value(
            &text,
            &format!("infermesh_config_info{{version=\"{version}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        client::metric_value(
            &text,
            concat!(
                "infermesh_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"}"
            )
        ),
        Some(1.0),
        "which build runs"
    );

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`: `apt install prometheus`, or run ./test.sh, which installs it)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_add_and_remove_listeners_and_keep_unchanged_ones() {
    let a = MockBackend::echo("a", Protocol::Http1).await;
    let b = MockBackend::echo("b", Protocol::Http1).await;
    let gateway = Gateway::start(&two_backends(&a, &b, "a"));
    let web = gateway.listener("web");
    let client = client::http1();

    // Add a listener served by its own route.
    let with_grpc = config(&[
        &listener("web", "http"),
        &listener("grpc", "http2"),
        &backend("a", "http1", &[a.addr]),
        &backend("b", "http1", &[b.addr]),
        "kind: Route\nmetadata: { name: r }\nspec:\n  listeners: [web]\n  rules:\n    - backends: [{ name: a }]",
        "kind: Route\nmetadata: { name: g }\nspec:\n  listeners: [grpc]\n  rules:\n    - backends: [{ name: b }]",
    ]);
    gateway.write_config(&with_grpc);
    gateway.wait_for_log(applied, Duration::from_secs(10));
    assert_eq!(
        gateway.listener("web"),
        web,
        "an unchanged listener keeps its socket"
    );
    let reply = client::get(&client::http2(), &gateway.url("grpc", "/")).await;
    assert_eq!(reply.header("x-backend"), Some("b"));
    assert_eq!(
        client::get(&client, &gateway.url("web", "/"))
            .await
            .header("x-backend"),
        Some("a")
    );

    // Remove it again.
    let grpc = gateway.listener("grpc");
    gateway.write_config(&two_backends(&a, &b, "a"));
    gateway.wait_for_logs(2, applied, Duration::from_secs(10));
    gateway.wait_for_log(
        |l| l["message"] == "listener removed; draining its connections",
        Duration::from_secs(5),
    );
    assert!(
        client::refused_within(grpc, Duration::from_secs(10)).await,
        "a removed listener stops accepting"
    );
    assert_eq!(
        client::get(&client, &gateway.url("web", "/"))
            .await
            .header("x-backend"),
        Some("a")
    );

    // A listener that cannot bind makes the whole reload fail; nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let clash = two_backends(&a, &b, "b").replace(
        "spec: { address: 127.0.0.1:0, protocol: http }",
        &format!(
            "spec: {{ address: \"{}\", protocol: http }}",
            taken.local_addr().unwrap()
        ),
    );
    gateway.write_config(&clash);
    let error = gateway.wait_for_log(refused_bind, Duration::from_secs(10));
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("cannot listen on"),
        "{error}"
    );
    assert_eq!(
        client::get(&client, &gateway.url("web", "/"))
            .await
            .header("x-backend"),
        Some("a")
    );
}

fn refused_bind(l: &Value) -> bool {
    refused(l) && l.get("error").is_some()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_connections_and_each_serves_its_own() {
    let model = MockBackend::echo("a", Protocol::Http1).await;
    let gateway = Gateway::start_with_args(
        &config(&[
            &listener("web", "http"),
            &backend("a", "http1", &[model.addr]),
            &route_to("a"),
        ]),
        &["--concurrency", "2"],
    );
    let url = gateway.url("web", "/v1/models");
    // Worker 0 is the proxy's first thread, worker 1 the thread it starts.
    let pid = gateway.pid();
    let workers = |threads: &[(u32, String, u64)]| -> [u64; 2] {
        let ticks = |pick: &dyn Fn(u32, &str) -> bool| {
            threads
                .iter()
                .filter(|(tid, name, _)| pick(*tid, name))
                .map(|t| t.2)
                .sum::<u64>()
        };
        [
            ticks(&|tid, _| tid == pid),
            // Thread names are cut at 15 bytes: `infermesh-worke`.
            ticks(&|_, name| name.starts_with("infermesh-worke")),
        ]
    };
    let before = workers(&gateway.thread_cpu_ticks());
    // Two clients of one connection each, side by side: the connections
    // are handed to the workers in turn.
    let clients = (0..2).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let client = client::http1();
            for _ in 0..1500 {
                assert_eq!(client::get(&client, &url).await.status, 200);
            }
        })
    });
    for client in clients.collect::<Vec<_>>() {
        client.await.unwrap();
    }
    let after = workers(&gateway.thread_cpu_ticks());
    let used = [after[0] - before[0], after[1] - before[1]];
    let total = used[0] + used[1];
    assert!(total > 0, "the proxy used no CPU time: {used:?}");
    // Each connection stays on its worker: each worker did about half the
    // work (a quarter at least, leaving room for the clock tick).
    assert!(
        used.iter().all(|&u| u * 4 >= total),
        "CPU ticks of worker 0 and worker 1 under two connections: {used:?}"
    );
}
