//! The sidecar injector end to end: the real control plane serves the
//! webhook (`--injector-listen`), and `tests/python/injector.py` plays the
//! API server with the AdmissionReviews of `tests/fixtures/admission`
//! (a vLLM pod, a KServe predictor, a pod with init containers of its own,
//! one opted out, one with a bad annotation): it checks each answer,
//! applies the JSON Patch with `jsonpatch`, validates the injected pod
//! with `kubernetes_validate` and injects it again. Then the proxy's side
//! of the probe rewrite: the health server answers `/app-health/...` with
//! the app's own status.
//!
//! The Python packages come from `benches/tests/python/requirements.txt`
//! (`./test.sh` installs them).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use infermesh_tests::client::{get, http1, metric_value};
use infermesh_tests::mesh::{ControlPlane, MeshFiles};
use infermesh_tests::process::{Gateway, config, listener};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_injects_model_serving_pods_as_the_api_server_asks() {
    // The webhook needs no mesh config; the harness serves one anyway.
    let files = MeshFiles::new(
        "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: llama, namespace: models }
spec: { endpoints: [{ address: 127.0.0.1:8000 }] }",
    );
    let control_plane = ControlPlane::start(&files, None, &["--injector-listen", "127.0.0.1:0"]);
    let webhook = control_plane.injector.expect("the injector's address");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/injector.py");
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/admission");
    let bundle = files.bundle();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(webhook.to_string())
            .arg(bundle)
            .arg(fixtures)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("injector: ok"),
        "the injector check failed (install its packages with `pip install -r benches/tests/python/requirements.txt`, or run ./test.sh):\n{stdout}\n{stderr}\ncontrol plane log:\n{}",
        control_plane.logs().join("\n")
    );

    // Three pods injected, each sent again and skipped with the opted-out
    // one, and the bad annotation refused: counted, and logged with the
    // pod's namespace (from the request) and generateName.
    let metrics = control_plane.metrics().await;
    let count = |result: &str| {
        metric_value(
            &metrics,
            &format!("infermesh_injections_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(count("injected"), Some(3.0), "{metrics}");
    assert_eq!(count("skipped"), Some(4.0), "{metrics}");
    assert_eq!(count("failed"), Some(1.0), "{metrics}");
    control_plane.wait_for_log(
        "injector: injected pod namespace=\"models\" name=\"\" generateName=\"vllm-llama-3-8b-6d5f9c8b7-\"",
        Duration::from_secs(5),
    );
    control_plane.wait_for_log(
        "injector: skipped pod namespace=\"models\" name=\"\" generateName=\"model-eval-lm-harness-\": opted out",
        Duration::from_secs(5),
    );
    control_plane.wait_for_log(
        "injector: failed pod namespace=\"models\" name=\"tgi\"",
        Duration::from_secs(5),
    );
}

/// An app answering 200 on `/health`, 500 on `/broken`, and 400 when the
/// probe's header is missing.
async fn app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let status = match (
                        request.uri().path(),
                        request.headers().contains_key("x-probe"),
                    ) {
                        (_, false) => 400,
                        ("/health", true) => 200,
                        _ => 500,
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"app")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_answers_the_apps_probes_with_the_apps_status() {
    let app = app().await;
    let down = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let header = r#""httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]"#;
    let probes = format!(
        r#"{{"/app-health/model/readyz": {{"port": {app}, "path": "/health", {header}}},
            "/app-health/model/livez": {{"port": {app}, "path": "/broken", {header}}},
            "/app-health/gone/livez": {{"port": {down}, "path": "/health", {header}}}}}"#
    );
    let proxy = Gateway::start_with_args(
        &config(&[&listener("web", "http")]),
        &["--app-probes", &probes],
    );
    let client = Arc::new(http1());
    let ask = |path: &str| {
        let (client, url) = (client.clone(), format!("http://{}{path}", proxy.health));
        async move { get(&client, &url).await.status }
    };
    assert_eq!(ask("/app-health/model/readyz").await, StatusCode::OK);
    assert_eq!(
        ask("/app-health/model/livez").await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        ask("/app-health/gone/livez").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(ask("/app-health/other/livez").await, StatusCode::NOT_FOUND);
    assert_eq!(ask("/live").await, StatusCode::OK);
}

/// An injected sidecar's credential is a projected ServiceAccount token,
/// which kubelet rewrites before it expires: the proxy must send what the
/// file holds at each certificate request, not what it held at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_rotated_in_its_file_is_the_one_the_next_certificate_request_sends() {
    let files = MeshFiles::new(
        "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: llama, namespace: models }
spec: { endpoints: [{ address: 127.0.0.1:8000 }] }",
    );
    // The first token expires within seconds; certificates live 4 s and
    // are renewed at about half their life.
    let credential = files.credential("apps", "chat", "3s");
    let expires = tokio::time::Instant::now() + Duration::from_secs(3);
    let control_plane = ControlPlane::start(&files, None, &["--heartbeat", "1s", "--ttl", "4s"]);
    let args = files.proxy_args(&[control_plane.grpc], "chat-0", &credential, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Gateway::spawn_from_control_plane("sidecar", &args);
    let successes = || async {
        let text = infermesh_tests::client::metrics(proxy.health).await;
        metric_value(
            &text,
            "infermesh_identity_certificate_requests_total{result=\"success\"}",
        )
        .unwrap_or(0.0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while successes().await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no first certificate: {}",
            proxy.dump()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Rotated, as kubelet does: a new token, the same file (`token
    // create --force` writes the same path).
    let rotated = files.credential("apps", "chat", "1h");
    assert_eq!(rotated, credential);
    tokio::time::sleep_until(expires + Duration::from_millis(500)).await;
    // Past the first token's expiry, renewals go on: with the new token.
    let before = successes().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while successes().await < before + 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal with the rotated token: {}",
            proxy.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_bad_app_probes_variable_stops_the_proxy_at_start_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, config(&[&listener("web", "http")])).unwrap();
    let out = Command::new(infermesh_tests::binary("infermesh-proxy"))
        .args(["gateway", "--config"])
        .arg(&path)
        .args([
            "--admin-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ])
        .env(
            "INFERMESH_APP_PROBES",
            r#"{"/app-health/a/livez": {"port": 0, "path": "/"}}"#,
        )
        .output()
        .expect("run infermesh-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("INFERMESH_APP_PROBES is not valid") && stderr.contains("port"),
        "{stderr}"
    );
}
