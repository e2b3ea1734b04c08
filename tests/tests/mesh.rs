//! A mesh on loopback, every part the real binary: one control plane fed
//! by a config directory, two sidecars (`chat-0`, narrowed by a `Sidecar`
//! resource to the llama backends, and `batch-0`, which sees every
//! backend), a gateway (`edge-0`), and mock model servers. The proxies get
//! their certificates and config from the control plane; these tests
//! change the directory under load and check what each proxy receives,
//! applies or refuses, and what `status` says of it.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use infermesh_tests::backend::{MockBackend, Protocol};
use infermesh_tests::client::{self, SteadyLoad, metric_value};
use infermesh_tests::mesh::{ControlPlane, MeshFiles};
use infermesh_tests::process::Gateway;

const SYNC: Duration = Duration::from_secs(15);

/// The mesh's documents: `llama` (hostname `llama.models`) and the
/// gateway's `edge` route both send to backend `target`; `llama-v2` is
/// written with a DNS name (`localhost`), which the control plane
/// resolves; `mistral` has `mistral_endpoints`; the gateway's listener
/// binds `public`.
fn documents(
    v1: SocketAddr,
    v2: SocketAddr,
    mistral_endpoints: &[SocketAddr],
    target: &str,
    public: &str,
) -> String {
    let mistral: Vec<String> = mistral_endpoints
        .iter()
        .map(|e| format!("{{ address: \"{e}\" }}"))
        .collect();
    format!(
        "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: llama-v1, namespace: models }}
spec: {{ endpoints: [{{ address: \"{v1}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: llama-v2, namespace: models }}
spec: {{ endpoints: [{{ address: \"localhost:{v2_port}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: mistral, namespace: models }}
spec: {{ endpoints: [{mistral}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: llama, namespace: models }}
spec:
  hostnames: [llama.models]
  rules: [{{ backends: [{{ name: {target} }}] }}]
---
apiVersion: infermesh.io/v1alpha1
kind: Sidecar
metadata: {{ name: chat, namespace: apps }}
spec:
  selector: {{ matchLabels: {{ app: chat }} }}
  egress: [llama-v1.models, llama-v2.models]
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: public }}
spec: {{ address: \"{public}\" }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: edge }}
spec:
  listeners: [public]
  rules: [{{ backends: [{{ name: {target}.models }}] }}]
",
        mistral = mistral.join(", "),
        v2_port = v2.port(),
    )
}

/// A running mesh and its model servers.
struct Mesh {
    files: MeshFiles,
    control_plane: ControlPlane,
    chat: Gateway,
    batch: Gateway,
    edge: Gateway,
    v1: MockBackend,
    v2: MockBackend,
}

/// The credentials of the mesh's proxies, made before its control plane
/// starts (it reads new tokens within a second; made first, none waits).
struct Credentials {
    chat: std::path::PathBuf,
    batch: std::path::PathBuf,
    edge: std::path::PathBuf,
}

impl Credentials {
    fn new(files: &MeshFiles) -> Self {
        Credentials {
            chat: files.credential("apps", "chat", "1h"),
            batch: files.credential("apps", "batch", "1h"),
            edge: files.credential("edge", "gateway", "1h"),
        }
    }
}

fn sidecar(
    files: &MeshFiles,
    control_planes: &[SocketAddr],
    node: &str,
    app: &str,
    credential: &std::path::Path,
) -> Gateway {
    let label = format!("app={app}");
    let args = files.proxy_args(control_planes, node, credential, &[&label]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::start_from_control_plane("sidecar", &args)
}

fn gateway(
    files: &MeshFiles,
    control_planes: &[SocketAddr],
    credential: &std::path::Path,
) -> Gateway {
    let args = files.proxy_args(control_planes, "edge-0", credential, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::start_from_control_plane("gateway", &args)
}

impl Mesh {
    async fn start() -> Mesh {
        let v1 = MockBackend::echo("llama-v1", Protocol::Http1).await;
        let v2 = MockBackend::echo("llama-v2", Protocol::Http1).await;
        let files = MeshFiles::new(&documents(v1.addr, v2.addr, &[], "llama-v1", "127.0.0.1:0"));
        let credentials = Credentials::new(&files);
        let control_plane = ControlPlane::start(&files, None, &["--heartbeat", "1s"]);
        let at = [control_plane.grpc];
        let chat = sidecar(&files, &at, "chat-0", "chat", &credentials.chat);
        let batch = sidecar(&files, &at, "batch-0", "batch", &credentials.batch);
        let edge = gateway(&files, &at, &credentials.edge);
        control_plane.wait_synced(3, SYNC).await;
        Mesh {
            files,
            control_plane,
            chat,
            batch,
            edge,
            v1,
            v2,
        }
    }

    /// Rewrites the directory with `llama` sending to `target`.
    fn route_to(&self, target: &str) {
        self.files.write(
            "mesh.yaml",
            &documents(self.v1.addr, self.v2.addr, &[], target, "127.0.0.1:0"),
        );
    }
}

/// `GET /v1/models` from the app beside `sidecar`, to `llama.models`.
fn via_sidecar(sidecar: &Gateway) -> impl Fn() -> Request<Full<bytes::Bytes>> + Clone + use<> {
    let url = sidecar.url("outbound", "/v1/models");
    move || {
        Request::get(&url)
            .header("host", "llama.models")
            .body(Full::default())
            .expect("a request")
    }
}

/// `GET /v1/models` through the gateway's `public` listener.
fn via_gateway(edge: &Gateway) -> impl Fn() -> Request<Full<bytes::Bytes>> + Clone + use<> {
    let url = edge.url("public", "/v1/models");
    move || Request::get(&url).body(Full::default()).expect("a request")
}

/// Which backend answers `request` now.
async fn answered_by(request: Request<Full<bytes::Bytes>>) -> String {
    let reply = client::send(&client::http1(), request)
        .await
        .expect("an answer");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.header("x-backend").unwrap_or_default().to_owned()
}

/// Waits until every proxy of `control_plane` is in sync at another
/// version than in `before` (the control plane may not have seen a
/// change yet when it is written); returns the new versions.
async fn wait_all_moved(
    control_plane: &ControlPlane,
    before: &[(String, String)],
) -> Vec<(String, String)> {
    wait_moved(control_plane, before, |_| true).await
}

/// Waits until every proxy is in sync, those `moving` names at another
/// version than in `before`.
async fn wait_moved(
    control_plane: &ControlPlane,
    before: &[(String, String)],
    moving: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + SYNC;
    loop {
        let now = versions(&control_plane.wait_synced(before.len(), SYNC).await);
        if now
            .iter()
            .zip(before)
            .all(|(new, old)| !moving(&new.0) || new.1 != old.1)
        {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every proxy moved from {before:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn versions(proxies: &[serde_json::Value]) -> Vec<(String, String)> {
    let mut versions: Vec<(String, String)> = proxies
        .iter()
        .map(|p| {
            (
                p["workload"]["node"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p["acked_version"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    versions.sort();
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_changed_under_load_shifts_traffic_without_a_failure_and_every_proxy_acks_it() {
    let mesh = Mesh::start().await;
    let before = versions(&mesh.control_plane.wait_synced(3, SYNC).await);
    assert_eq!(answered_by(via_sidecar(&mesh.chat)()).await, "llama-v1");
    assert_eq!(answered_by(via_gateway(&mesh.edge)()).await, "llama-v1");

    let load_chat = SteadyLoad::start(vec![client::http1()], via_sidecar(&mesh.chat));
    let load_batch = SteadyLoad::start(vec![client::http1()], via_sidecar(&mesh.batch));
    let load_edge = SteadyLoad::start(vec![client::http1()], via_gateway(&mesh.edge));
    load_chat.progress(50).await;
    mesh.route_to("llama-v2");
    // Every proxy's view holds the route: each acknowledges a new version.
    wait_all_moved(&mesh.control_plane, &before).await;
    let served_by_v1 = mesh.v1.requests();
    for load in [&load_chat, &load_batch, &load_edge] {
        load.progress(30).await;
    }
    assert_eq!(
        mesh.v1.requests(),
        served_by_v1,
        "once every proxy acknowledged, nothing goes to llama-v1"
    );
    for load in [load_chat, load_batch, load_edge] {
        let (ok, failures) = load.stop().await;
        assert!(
            failures.is_empty(),
            "{} failed: {failures:?}",
            failures.len()
        );
        assert!(ok > 0);
    }
    assert!(mesh.v2.requests() > 90);
    // llama-v2's name was resolved by the control plane: the proxies hold
    // its address.
    let sent = client::get(
        &client::http1(),
        &format!(
            "http://{}/debug/config?proxy=batch-0",
            mesh.control_plane.admin
        ),
    )
    .await
    .json();
    let v2 = sent["documents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["metadata"]["name"] == "llama-v2.models")
        .cloned()
        .unwrap_or_else(|| panic!("{sent:#}"));
    assert_eq!(
        v2["spec"]["endpoints"],
        serde_json::json!([{ "address": mesh.v2.addr.to_string(), "weight": 1 }])
    );
    let metrics = mesh.control_plane.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "infermesh_control_plane_pushes_total{result=\"ack\"}"
        ),
        Some(6.0),
        "a first config and one change for each of three proxies:\n{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "infermesh_control_plane_convergence_seconds_count"
        ) >= Some(6.0)
    );
    assert_eq!(
        metric_value(&metrics, "infermesh_control_plane_connected_proxies"),
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_is_refused_with_its_place_and_nothing_is_pushed() {
    let mesh = Mesh::start().await;
    let before = versions(&mesh.control_plane.wait_synced(3, SYNC).await);
    mesh.route_to("llama-v3");
    let refusal = mesh.control_plane.wait_for_log(
        "Route/llama.models: spec.rules[0].backends[0].name: backend \"llama-v3\" is not defined",
        SYNC,
    );
    assert!(refusal.contains("mesh.yaml:21:"), "{refusal}");
    let logs = mesh.control_plane.logs().join("\n");
    assert!(
        logs.contains("config change refused") && logs.contains("nothing was pushed"),
        "{logs}"
    );
    let metrics = mesh.control_plane.metrics().await;
    assert_eq!(
        metric_value(&metrics, "infermesh_control_plane_config_refusals_total"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "infermesh_control_plane_pushes_total{result=\"ack\"}"
        ),
        Some(3.0),
        "only the first configs were pushed"
    );
    assert_eq!(versions(&mesh.control_plane.proxies().await), before);
    assert_eq!(answered_by(via_sidecar(&mesh.chat)()).await, "llama-v1");
    assert_eq!(answered_by(via_gateway(&mesh.edge)()).await, "llama-v1");
    // Fixed, it goes out.
    mesh.route_to("llama-v2");
    wait_all_moved(&mesh.control_plane, &before).await;
    assert_eq!(answered_by(via_sidecar(&mesh.chat)()).await, "llama-v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_a_proxy_cannot_apply_is_nacked_shown_by_status_and_the_old_config_serves() {
    let mesh = Mesh::start().await;
    let old_public = mesh.edge.listener("public");
    // The gateway's host has the new port taken: the update validates,
    // but the gateway cannot bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let taken_at = taken.local_addr().expect("bound").to_string();
    mesh.files.write(
        "mesh.yaml",
        &documents(mesh.v1.addr, mesh.v2.addr, &[], "llama-v1", &taken_at),
    );
    let control_plane = &mesh.control_plane;
    let deadline = tokio::time::Instant::now() + SYNC;
    let nacked = loop {
        let proxies = control_plane.proxies().await;
        let edge = proxies
            .iter()
            .find(|p| p["workload"]["node"] == "edge-0")
            .cloned()
            .expect("edge-0 is connected");
        if edge["state"] == "nacked" {
            break edge;
        }
        assert!(tokio::time::Instant::now() < deadline, "{proxies:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = nacked["error"].as_str().unwrap_or_default();
    assert!(error.contains(&taken_at), "{nacked:#}");
    // The sidecars' views did not change: they are still in sync.
    let proxies = control_plane.proxies().await;
    for node in ["chat-0", "batch-0"] {
        let proxy = proxies
            .iter()
            .find(|p| p["workload"]["node"] == node)
            .unwrap();
        assert_eq!(proxy["state"], "synced", "{proxy:#}");
    }
    // `status` shows it, with the error.
    let output = std::process::Command::new(infermesh_tests::binary("infermesh-control-plane"))
        .args(["status", "--admin", &control_plane.admin.to_string()])
        .output()
        .expect("run status");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("edge-0"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("NACKED") && row.contains(&taken_at), "{table}");
    assert!(
        row.contains("spiffe://cluster.local/ns/edge/sa/gateway"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains("SYNCED")).count(),
        2,
        "{table}"
    );
    // The gateway keeps serving its old config, and it is counted.
    assert_eq!(mesh.edge.listener("public"), old_public);
    assert_eq!(answered_by(via_gateway(&mesh.edge)()).await, "llama-v1");
    let metrics = client::metrics(mesh.edge.health).await;
    assert_eq!(
        metric_value(
            &metrics,
            "infermesh_control_plane_updates_total{result=\"refused\"}"
        ),
        Some(1.0)
    );
    let cp_metrics = control_plane.metrics().await;
    assert_eq!(
        metric_value(
            &cp_metrics,
            "infermesh_control_plane_pushes_total{result=\"nack\"}"
        ),
        Some(1.0)
    );
    // The refused version is not sent again; the next change is.
    drop(taken);
    mesh.files.write(
        "mesh.yaml",
        &documents(mesh.v1.addr, mesh.v2.addr, &[], "llama-v2", &taken_at),
    );
    control_plane.wait_synced(3, SYNC).await;
    assert_eq!(mesh.edge.listener("public").to_string(), taken_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_and_removed_reaches_only_the_proxies_that_call_its_backend() {
    let mesh = Mesh::start().await;
    let mistral = MockBackend::echo("mistral", Protocol::Http1).await;
    let applied = |text: &str| {
        metric_value(
            text,
            "infermesh_control_plane_updates_total{result=\"applied\"}",
        )
        .unwrap_or(0.0)
    };
    let counts = async || {
        let mut counts = Vec::new();
        for proxy in [&mesh.chat, &mesh.batch, &mesh.edge] {
            counts.push(applied(&client::metrics(proxy.health).await));
        }
        counts
    };
    assert_eq!(counts().await, [1.0, 1.0, 1.0]);
    for (change, endpoints) in [&[mistral.addr][..], &[]].into_iter().enumerate() {
        mesh.files.write(
            "mesh.yaml",
            &documents(
                mesh.v1.addr,
                mesh.v2.addr,
                endpoints,
                "llama-v1",
                "127.0.0.1:0",
            ),
        );
        // Only batch-0 holds `mistral`: chat-0 is narrowed to llama, and
        // the gateway's routes do not use it.
        let expected = 2.0 + change as f64;
        let deadline = tokio::time::Instant::now() + SYNC;
        while counts().await[1] < expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                counts().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        mesh.control_plane.wait_synced(3, SYNC).await;
    }
    assert_eq!(counts().await, [1.0, 3.0, 1.0]);
    let metrics = mesh.control_plane.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "infermesh_control_plane_pushes_total{result=\"ack\"}"
        ),
        Some(5.0),
        "three first configs, then one update of batch-0 for each change:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_goes_on_while_the_control_plane_is_away_and_the_proxies_converge_when_it_returns()
{
    let mut mesh = Mesh::start().await;
    let before = versions(&mesh.control_plane.wait_synced(3, SYNC).await);
    let load_chat = SteadyLoad::start(vec![client::http1()], via_sidecar(&mesh.chat));
    let load_edge = SteadyLoad::start(vec![client::http1()], via_gateway(&mesh.edge));
    let grpc = mesh.control_plane.grpc;
    mesh.control_plane.kill();
    load_chat.progress(100).await;
    load_edge.progress(100).await;
    // Changed while no control plane runs: the proxies learn it when one
    // comes back.
    mesh.route_to("llama-v2");
    mesh.control_plane = ControlPlane::start(&mesh.files, Some(grpc), &["--heartbeat", "1s"]);
    wait_all_moved(&mesh.control_plane, &before).await;
    load_chat.progress(30).await;
    for load in [load_chat, load_edge] {
        let (ok, failures) = load.stop().await;
        assert!(
            failures.is_empty(),
            "{} failed: {failures:?}",
            failures.len()
        );
        assert!(ok >= 100);
    }
    assert_eq!(answered_by(via_sidecar(&mesh.chat)()).await, "llama-v2");
    let metrics = client::metrics(mesh.chat.health).await;
    assert_eq!(
        metric_value(
            &metrics,
            &format!("infermesh_control_plane_connected{{address=\"{grpc}\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "infermesh_control_plane_last_update_timestamp_seconds"
        )
        .is_some_and(|t| t > 0.0)
    );
    // The proxy says which of the control plane's versions it holds.
    let held = mesh
        .control_plane
        .proxies()
        .await
        .into_iter()
        .find(|p| p["workload"]["node"] == "chat-0")
        .map(|p| p["acked_version"].as_str().unwrap_or_default().to_owned())
        .expect("chat-0 is connected");
    assert_eq!(
        metric_value(
            &metrics,
            &format!("infermesh_control_plane_version_info{{version=\"{held}\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// SIGTERM (a rolling update, a node drain) stops a control plane with
/// proxies attached within seconds: their config streams are ended with
/// UNAVAILABLE rather than waited on, and the proxies keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_told_to_stop_ends_its_streams_and_exits() {
    let mut mesh = Mesh::start().await;
    let load = SteadyLoad::start(vec![client::http1()], via_gateway(&mesh.edge));
    load.progress(20).await;
    mesh.control_plane.signal(nix::sys::signal::Signal::SIGTERM);
    let exited =
        tokio::task::block_in_place(|| mesh.control_plane.wait_exit(Duration::from_secs(10)));
    let status = exited.unwrap_or_else(|| {
        panic!(
            "still running 10 s after SIGTERM with 3 proxies attached; log:\n{}",
            mesh.control_plane.logs().join("\n")
        )
    });
    assert!(status.success(), "{status}");
    mesh.control_plane
        .wait_for_log("disconnected: the control plane is shutting down", SYNC);
    load.progress(50).await;
    let (ok, failures) = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok >= 70);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_replica_goes_silent_moves_to_another_within_seconds() {
    let v1 = MockBackend::echo("llama-v1", Protocol::Http1).await;
    let v2 = MockBackend::echo("llama-v2", Protocol::Http1).await;
    let files = MeshFiles::new(&documents(v1.addr, v2.addr, &[], "llama-v1", "127.0.0.1:0"));
    let credentials = Credentials::new(&files);
    // Two replicas of one source and one CA; they share nothing else.
    let replicas = [
        ControlPlane::start(&files, None, &["--heartbeat", "1s"]),
        ControlPlane::start(&files, None, &["--heartbeat", "1s"]),
    ];
    let both = [replicas[0].grpc, replicas[1].grpc];
    let chat = sidecar(&files, &both, "chat-0", "chat", &credentials.chat);
    let batch = sidecar(&files, &both, "batch-0", "batch", &credentials.batch);
    let edge = gateway(&files, &both, &credentials.edge);
    let deadline = tokio::time::Instant::now() + SYNC;
    let (first, second) = loop {
        let (first, second) = (replicas[0].proxies().await, replicas[1].proxies().await);
        if first.len() + second.len() == 3 {
            break (first, second);
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Each replica knows its own proxies only.
    let busy = usize::from(first.is_empty());
    let (silent, other) = (&replicas[busy], &replicas[1 - busy]);
    let moving = if busy == 0 { first.len() } else { second.len() };
    let load = SteadyLoad::start(vec![client::http1()], via_sidecar(&chat));
    // Frozen, not killed: its connections stay open, and only the
    // heartbeats tell the proxies it is gone.
    silent.signal(nix::sys::signal::Signal::SIGSTOP);
    let frozen = std::time::Instant::now();
    other.wait_synced(3, SYNC).await;
    let moved_in = frozen.elapsed();
    assert!(moving >= 1);
    assert!(
        moved_in < Duration::from_secs(10),
        "{moving} proxies took {moved_in:?} to move"
    );
    load.progress(50).await;
    let (_, failures) = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    // A change now reaches every proxy through the replica left.
    files.write(
        "mesh.yaml",
        &documents(v1.addr, v2.addr, &[], "llama-v2", "127.0.0.1:0"),
    );
    let deadline = tokio::time::Instant::now() + SYNC;
    while answered_by(via_gateway(&edge)()).await != "llama-v2"
        || answered_by(via_sidecar(&batch)()).await != "llama-v2"
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    silent.signal(nix::sys::signal::Signal::SIGCONT);
}

/// A port free now, for a listener whose address must be known before it
/// binds.
fn free_port() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    socket.local_addr().expect("bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_seconds_are_renewed_under_mutual_tls_load_without_a_failed_request() {
    let model = MockBackend::echo("llama", Protocol::Http1).await;
    let mesh_port = free_port();
    // chat-0 calls `llama.models` through the gateway's strict mutual-TLS
    // listener, which must present the gateway's identity.
    let files = MeshFiles::new(&format!(
        "apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: mesh }}
spec: {{ address: \"{mesh_port}\", tls: {{ mode: strict }} }}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: model, namespace: models }}
spec: {{ endpoints: [{{ address: \"{model}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: to-model }}
spec:
  listeners: [mesh]
  rules: [{{ backends: [{{ name: model.models }}] }}]
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: llama, namespace: models }}
spec:
  protocol: http2
  endpoints: [{{ address: \"{mesh_port}\" }}]
  tls: {{ identity: spiffe://cluster.local/ns/edge/sa/gateway }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: llama, namespace: models }}
spec:
  hostnames: [llama.models]
  rules: [{{ backends: [{{ name: llama }}] }}]
",
        model = model.addr
    ));
    let credentials = Credentials::new(&files);
    let control_plane = ControlPlane::start(&files, None, &["--heartbeat", "1s", "--ttl", "4s"]);
    let at = [control_plane.grpc];
    let edge = gateway(&files, &at, &credentials.edge);
    let chat = sidecar(&files, &at, "chat-0", "chat", &credentials.chat);
    control_plane.wait_synced(2, SYNC).await;
    let loads: Vec<SteadyLoad> = (0..2)
        .map(|_| SteadyLoad::start(vec![client::http1()], via_sidecar(&chat)))
        .collect();
    // Each certificate lives 4 s and is renewed at about half its life:
    // wait for three renewals of each.
    let renewed = |text: &str| {
        metric_value(
            text,
            "infermesh_identity_certificate_requests_total{result=\"success\"}",
        )
        .unwrap_or(0.0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let edge_count = renewed(&client::metrics(edge.health).await);
        let chat_count = renewed(&client::metrics(chat.health).await);
        if edge_count >= 4.0 && chat_count >= 4.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "renewals: edge {edge_count}, chat {chat_count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut answered = 0;
    for load in loads {
        let (ok, failures) = load.stop().await;
        assert!(
            failures.is_empty(),
            "{} failed: {failures:?}",
            failures.len()
        );
        answered += ok;
    }
    assert!(answered > 100, "{answered}");
    assert_eq!(model.requests(), answered);
    let metrics = control_plane.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "infermesh_control_plane_certificates_signed_total{namespace=\"apps\"}"
        ) >= Some(4.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_a_valid_credential_is_refused_with_its_reason_and_never_ready() {
    let v1 = MockBackend::echo("llama-v1", Protocol::Http1).await;
    let files = MeshFiles::new(&documents(v1.addr, v1.addr, &[], "llama-v1", "127.0.0.1:0"));
    let unknown = files.unknown_credential();
    let expired = files.credential("apps", "old", "1s");
    let control_plane = ControlPlane::start(&files, None, &["--heartbeat", "1s"]);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for (credential, reason) in [(unknown, "unknown_token"), (expired, "expired_token")] {
        let args = files.proxy_args(&[control_plane.grpc], "stranger-0", &credential, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = Gateway::spawn_from_control_plane("sidecar", &args);
        let refused = proxy.wait_for_log(
            |l| l["message"] == "cannot get a workload certificate; the current one (if any) stays until it expires",
            SYNC,
        );
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.contains(reason)),
            "{refused}"
        );
        let ready = client::get(&client::http1(), &format!("http://{}/ready", proxy.health)).await;
        assert_eq!(ready.status, 503);
        let metrics = control_plane.metrics().await;
        assert!(
            metric_value(
                &metrics,
                &format!(
                    "infermesh_control_plane_certificates_refused_total{{reason=\"{reason}\"}}"
                )
            ) >= Some(1.0),
            "{metrics}"
        );
    }
    assert!(control_plane.proxies().await.is_empty());
}

/// The mesh of the per-endpoint identity test: `llama.models` has two
/// endpoints, the gateway's mutual-TLS port and the model sidecar's, each
/// given the identity in `identities` (edge's first).
fn two_workloads(
    model: SocketAddr,
    edge_port: SocketAddr,
    llama_port: SocketAddr,
    identities: [&str; 2],
) -> String {
    format!(
        "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: model, namespace: models }}
spec: {{ endpoints: [{{ address: \"{model}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: edge-mesh }}
spec: {{ address: \"{edge_port}\", tls: {{ mode: strict }} }}
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: llama-mesh, namespace: models }}
spec: {{ address: \"{llama_port}\", tls: {{ mode: strict }}, selector: {{ matchLabels: {{ app: llama }} }} }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: to-model }}
spec:
  listeners: [edge-mesh, llama-mesh.models]
  rules: [{{ backends: [{{ name: model.models }}] }}]
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: llama, namespace: models }}
spec:
  protocol: http2
  tls: {{}}
  endpoints:
    - {{ address: \"{edge_port}\", identity: \"{}\" }}
    - {{ address: \"{llama_port}\", identity: \"{}\" }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: llama, namespace: models }}
spec:
  hostnames: [llama.models]
  rules: [{{ backends: [{{ name: llama }}], retry: {{ maxRetries: 0 }} }}]
",
        identities[0], identities[1]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_must_present_its_own_identity() {
    const EDGE: &str = "spiffe://cluster.local/ns/edge/sa/gateway";
    const LLAMA: &str = "spiffe://cluster.local/ns/models/sa/llama";
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let (edge_port, llama_port) = (free_port(), free_port());
    let files = MeshFiles::new(&two_workloads(
        model.addr,
        edge_port,
        llama_port,
        [EDGE, LLAMA],
    ));
    let credentials = Credentials::new(&files);
    let llama_credential = files.credential("models", "llama", "1h");
    let control_plane = ControlPlane::start(&files, None, &["--heartbeat", "1s"]);
    let at = [control_plane.grpc];
    let _edge = gateway(&files, &at, &credentials.edge);
    let _llama = sidecar(&files, &at, "llama-0", "llama", &llama_credential);
    let chat = sidecar(&files, &at, "chat-0", "chat", &credentials.chat);
    let before = versions(&control_plane.wait_synced(3, SYNC).await);
    let handshakes = |text: &str, result: &str, reason: &str| {
        metric_value(
            text,
            &format!("infermesh_tls_handshakes_total{{direction=\"outbound\",reason=\"{reason}\",result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    for _ in 0..20 {
        assert_eq!(answered_by(via_sidecar(&chat)()).await, "model");
    }
    // One connection to each endpoint, each checked against its own ID.
    let metrics = client::metrics(chat.health).await;
    assert_eq!(handshakes(&metrics, "success", ""), 2.0, "{metrics}");

    // Each endpoint now expected to be the other workload: no handshake
    // passes, so no request reaches the model through a workload it was
    // not meant to.
    files.write(
        "mesh.yaml",
        &two_workloads(model.addr, edge_port, llama_port, [LLAMA, EDGE]),
    );
    // The gateway holds no copy of `llama`: only the sidecars move.
    wait_moved(&control_plane, &before, |node| node != "edge-0").await;
    let served = model.requests();
    for _ in 0..4 {
        let request = via_sidecar(&chat)();
        let reply = client::send(&client::http1(), request)
            .await
            .expect("an answer");
        assert_eq!(reply.status, 502, "{:?}", reply.body);
        assert_eq!(
            reply.header("x-infermesh-error"),
            Some("upstream_tls_failed")
        );
    }
    assert_eq!(model.requests(), served);
    let metrics = client::metrics(chat.health).await;
    assert!(
        handshakes(&metrics, "failure", "bad_identity") >= 2.0,
        "{metrics}"
    );
}
