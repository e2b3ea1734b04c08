//! The control plane on Kubernetes (`serve --kubernetes`), end to end:
//! the real binary against a fake API server that speaks list and watch as
//! the real one does (`infermesh_tests::kube_api`; no API server runs in
//! CI), with real sidecars that prove their workload with a
//! ServiceAccount token checked by a TokenReview.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use infermesh_tests::backend::{MockBackend, Protocol};
use infermesh_tests::client::{self, metric_value};
use infermesh_tests::kube_api::{KubeApi, collections};
use infermesh_tests::mesh::{ControlPlane, MeshFiles};
use infermesh_tests::process::Gateway;
use serde_json::{Value, json};

const SYNC: Duration = Duration::from_secs(20);

/// A projected ServiceAccount token's shape: a JWT (header
/// `{"alg":"RS256","kid":"fake"}`); the fake API server vouches for it as
/// the test says.
fn token(who: &str) -> String {
    format!("eyJhbGciOiJSUzI1NiIsImtpZCI6ImZha2UifQ.{who}.c2lnbmF0dXJl")
}

/// The credential file of `who`'s sidecar, and the TokenReview answer
/// that makes it `system:serviceaccount:NAMESPACE:SERVICE_ACCOUNT`.
fn service_account_token(
    api: &KubeApi,
    dir: &Path,
    who: &str,
    namespace: &str,
    service_account: &str,
) -> PathBuf {
    let token = token(who);
    api.token_review(
        &token,
        json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{namespace}:{service_account}"),
                "uid": "9d4ab0c4-55a5-4c5b-9a54-2a9f5b1d1c01",
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
                "extra": { "authentication.kubernetes.io/pod-name": [format!("{who}")] }
            },
            "audiences": ["infermesh"]
        }),
    );
    let path = dir.join(format!("{who}.token"));
    std::fs::write(&path, &token).expect("write the token");
    path
}

/// A Service as the API server returns it: one port, `port` to
/// `target_port`.
fn service(namespace: &str, name: &str, cluster_ip: &str, port: u16, target_port: u16) -> Value {
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": namespace,
            "uid": format!("0b6c5f8e-{name}"), "creationTimestamp": "2025-06-01T10:00:00Z",
            "labels": { "app": name }
        },
        "spec": {
            "ports": [{ "name": "http", "protocol": "TCP", "port": port, "targetPort": target_port }],
            "selector": { "app": name },
            "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "type": "ClusterIP", "sessionAffinity": "None",
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster"
        },
        "status": { "loadBalancer": {} }
    })
}

/// An EndpointSlice as kube-controller-manager writes it for `service`:
/// one ready endpoint per `(ip, pod)`, all on `port`.
fn endpoint_slice(namespace: &str, service: &str, port: u16, endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod)| {
            json!({
                "addresses": [ip],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": "kind-worker",
                "targetRef": { "kind": "Pod", "namespace": namespace, "name": pod, "uid": format!("5d1f7a32-{pod}") }
            })
        })
        .collect();
    json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": format!("{service}-x7k2p"), "generateName": format!("{service}-"), "namespace": namespace,
            "uid": format!("e2c1a9d0-{service}"), "creationTimestamp": "2025-06-01T10:00:01Z",
            "generation": 1,
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
                "app": service
            },
            "annotations": { "endpoints.kubernetes.io/last-change-trigger-time": "2025-06-01T10:00:01Z" },
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Service", "name": service,
                "uid": format!("0b6c5f8e-{service}"), "controller": true, "blockOwnerDeletion": true
            }]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "http", "protocol": "TCP", "port": port }]
    })
}

/// An injected Pod (the webhook's init container and native sidecar) of
/// service account `service_account`, as the API server returns it.
fn injected_pod(namespace: &str, name: &str, service_account: &str, labels: Value) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("5d1f7a32-{name}"),
            "creationTimestamp": "2025-06-01T10:00:00Z", "labels": labels,
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "llama", "uid": "7f0e", "controller": true, "blockOwnerDeletion": true }]
        },
        "spec": {
            "serviceAccountName": service_account, "serviceAccount": service_account,
            "nodeName": "kind-worker", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "initContainers": [
                { "name": "infermesh-init", "image": "infermesh-proxy:0.1.0", "command": ["infermesh-proxy", "init"], "args": ["--proxy-uid=1337"] },
                { "name": "infermesh-proxy", "image": "infermesh-proxy:0.1.0", "restartPolicy": "Always",
                  "args": ["sidecar", "--credential", "/var/run/secrets/infermesh/token/token"] }
            ],
            "containers": [{ "name": "vllm", "image": "vllm/vllm-openai:v0.9.2",
                             "ports": [{ "name": "http", "containerPort": 8000, "protocol": "TCP" }] }]
        },
        "status": { "phase": "Running", "podIP": "10.244.1.5", "podIPs": [{ "ip": "10.244.1.5" }], "qosClass": "Burstable" }
    })
}

/// A sidecar `node` of this mesh with the token at `credential`.
fn sidecar(files: &MeshFiles, control_plane: SocketAddr, node: &str, credential: &Path) -> Gateway {
    let args = files.proxy_args(&[control_plane], node, credential, &["app=chat"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::start_from_control_plane("sidecar", &args)
}

/// What the control plane gives `proxy` (`/debug/config`).
async fn config_of(control_plane: &ControlPlane, proxy: &str) -> Value {
    client::get(
        &client::http1(),
        &format!("http://{}/debug/config?proxy={proxy}", control_plane.admin),
    )
    .await
    .json()
}

/// The document `kind`/`name` of `config`, if there.
fn document<'a>(config: &'a Value, kind: &str, name: &str) -> Option<&'a Value> {
    config["documents"]
        .as_array()?
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// Waits until `check` holds of what the control plane gives `proxy`.
async fn wait_for_config(
    control_plane: &ControlPlane,
    proxy: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + SYNC;
    loop {
        let config = config_of(control_plane, proxy).await;
        if check(&config) {
            return config;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{proxy} was not given {what} within {SYNC:?}: {config:#}\nlog:\n{}",
            control_plane.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `config`'s backend `llama.models` has the endpoint `address`
/// (with `identity` when given).
fn has_endpoint(config: &Value, address: &str, identity: Option<&str>) -> bool {
    document(config, "Backend", "llama.models").is_some_and(|backend| {
        backend["spec"]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["address"] == address && identity.is_none_or(|id| e["identity"] == id))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_slice_reaches_the_sidecars_with_its_pods_identity() {
    let api = KubeApi::start().await;
    // No Gateway API in this cluster: no HTTPRoutes, not an error.
    api.set_absent(collections::HTTP_ROUTES, true);
    api.apply(
        collections::SERVICES,
        service("models", "llama", "10.96.0.10", 80, 8000),
    );
    api.apply(
        collections::PODS,
        injected_pod("models", "llama-0", "llama", json!({ "app": "llama" })),
    );
    let files = MeshFiles::new("");
    let kubeconfig = api.kubeconfig(files.path());
    let control_plane = ControlPlane::start_kubernetes(&files, &kubeconfig, &["--heartbeat", "1s"]);
    control_plane.wait_for_log("no httproutes.gateway.networking.k8s.io", SYNC);
    let credential = service_account_token(&api, files.path(), "chat-0", "apps", "chat");
    let chat = sidecar(&files, control_plane.grpc, "chat-0", &credential);
    let proxies = control_plane.wait_synced(1, SYNC).await;
    // The TokenReview granted the token's service account.
    assert_eq!(
        proxies[0]["workload"]["identity"],
        "spiffe://cluster.local/ns/apps/sa/chat"
    );
    let asked = api.reviews_asked();
    assert_eq!(asked[0]["spec"]["audiences"], json!(["infermesh"]));
    // The Service is a backend without endpoints yet.
    let config = config_of(&control_plane, "chat-0").await;
    let backend = document(&config, "Backend", "llama.models").expect("the Service's backend");
    assert_eq!(backend["spec"]["endpoints"], json!([]));
    assert_eq!(backend["spec"]["addresses"], json!(["10.96.0.10:80"]));

    api.apply(
        collections::ENDPOINT_SLICES,
        endpoint_slice("models", "llama", 8000, &[("10.244.1.5", "llama-0")]),
    );
    let config = wait_for_config(&control_plane, "chat-0", "llama-0's endpoint", |c| {
        has_endpoint(
            c,
            "10.244.1.5:8000",
            Some("spiffe://cluster.local/ns/models/sa/llama"),
        )
    })
    .await;
    let backend = document(&config, "Backend", "llama.models").expect("the backend");
    assert_eq!(backend["spec"]["tls"], json!({}), "mesh TLS: {backend:#}");
    // The proxy applied it.
    control_plane.wait_synced(1, SYNC).await;
    let applied: Value = client::get(&client::http1(), &format!("http://{}/config", chat.admin))
        .await
        .json();
    assert!(
        applied
            .to_string()
            .contains("spiffe://cluster.local/ns/models/sa/llama"),
        "{applied:#}"
    );
}

/// `GET /v1/models` from the app beside `sidecar`, to `llama.models`;
/// which mock model answered.
async fn answered_by(sidecar: &Gateway) -> String {
    let request = Request::get(sidecar.url("outbound", "/v1/models"))
        .header("host", "llama.models")
        .body(Full::default())
        .expect("a request");
    let reply = client::send(&client::http1(), request)
        .await
        .expect("an answer");
    reply.header("x-backend").unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_httproute_on_a_service_sends_its_calls_elsewhere() {
    let llama = MockBackend::echo("llama", Protocol::Http1).await;
    let mistral = MockBackend::echo("mistral", Protocol::Http1).await;
    let api = KubeApi::start().await;
    for (name, ip, backend) in [
        ("llama", "10.96.0.10", &llama),
        ("mistral", "10.96.0.11", &mistral),
    ] {
        api.apply(
            collections::SERVICES,
            service("models", name, ip, 80, backend.addr.port()),
        );
        api.apply(
            collections::ENDPOINT_SLICES,
            endpoint_slice(
                "models",
                name,
                backend.addr.port(),
                &[("127.0.0.1", &format!("{name}-0"))],
            ),
        );
    }
    let files = MeshFiles::new("");
    let kubeconfig = api.kubeconfig(files.path());
    let control_plane = ControlPlane::start_kubernetes(&files, &kubeconfig, &["--heartbeat", "1s"]);
    let credential = service_account_token(&api, files.path(), "chat-0", "apps", "chat");
    let chat = sidecar(&files, control_plane.grpc, "chat-0", &credential);
    control_plane.wait_synced(1, SYNC).await;
    assert_eq!(answered_by(&chat).await, "llama");

    // GAMMA: llama's callers are sent to mistral.
    api.apply(
        collections::HTTP_ROUTES,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "llama-to-mistral", "namespace": "models", "generation": 1 },
            "spec": {
                "parentRefs": [{ "group": "", "kind": "Service", "name": "llama", "port": 80 }],
                "rules": [{
                    "matches": [{ "path": { "type": "PathPrefix", "value": "/v1" } }],
                    "backendRefs": [{ "group": "", "kind": "Service", "name": "mistral", "port": 80, "weight": 1 }],
                    "timeouts": { "request": "30s" }
                }]
            }
        }),
    );
    let deadline = tokio::time::Instant::now() + SYNC;
    loop {
        if answered_by(&chat).await == "mistral" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the HTTPRoute did not reach chat-0: {:#}\nlog:\n{}",
            config_of(&control_plane, "chat-0").await,
            control_plane.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One it cannot translate whole is left out, named, and changes
    // nothing.
    api.apply(
        collections::HTTP_ROUTES,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "llama-to-mistral", "namespace": "models", "generation": 2 },
            "spec": {
                "parentRefs": [{ "group": "", "kind": "Service", "name": "llama" }],
                "rules": [{
                    "filters": [{ "type": "URLRewrite", "urlRewrite": { "hostname": "x" } }],
                    "backendRefs": [{ "name": "mistral", "port": 80 }]
                }]
            }
        }),
    );
    control_plane.wait_for_log(
        "HTTPRoute models/llama-to-mistral is left out: spec.rules[0].filters",
        SYNC,
    );
    control_plane.wait_synced(1, SYNC).await;
    assert_eq!(answered_by(&chat).await, "llama");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_the_api_server_refuses_gets_no_certificate() {
    let api = KubeApi::start().await;
    let files = MeshFiles::new("");
    let kubeconfig = api.kubeconfig(files.path());
    let control_plane = ControlPlane::start_kubernetes(&files, &kubeconfig, &[]);
    // A token nobody vouches for: the fake server answers as the real
    // one does, `authenticated: false` with the reason.
    let credential = files.path().join("stranger.token");
    std::fs::write(&credential, token("stranger")).expect("write the token");
    let args = files.proxy_args(&[control_plane.grpc], "stranger-0", &credential, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stranger = Gateway::spawn_from_control_plane("sidecar", &args);
    let series =
        "infermesh_control_plane_certificates_refused_total{reason=\"token_review_refused\"}";
    let deadline = tokio::time::Instant::now() + SYNC;
    while metric_value(&control_plane.metrics().await, series).unwrap_or(0.0) < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal counted: {}",
            control_plane.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = client::get(
        &client::http1(),
        &format!("http://{}/ready", stranger.health),
    )
    .await;
    assert_eq!(ready.status, 503, "no certificate, not ready");
    assert!(control_plane.proxies().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_410_gone_lists_again_and_nothing_is_lost() {
    let api = KubeApi::start().await;
    api.apply(
        collections::SERVICES,
        service("models", "llama", "10.96.0.10", 80, 8000),
    );
    api.apply(
        collections::ENDPOINT_SLICES,
        endpoint_slice("models", "llama", 8000, &[("10.244.1.5", "llama-0")]),
    );
    // The webhook configuration as `kubectl apply -k` leaves it: no
    // caBundle.
    api.apply(
        collections::MUTATING_WEBHOOKS,
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": "infermesh-sidecar-injector" },
            "webhooks": [
                { "name": "namespace.sidecar-injector.infermesh.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                  "clientConfig": { "service": { "name": "infermesh-control-plane", "namespace": "infermesh-system", "path": "/inject", "port": 443 } } },
                { "name": "object.sidecar-injector.infermesh.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                  "clientConfig": { "service": { "name": "infermesh-control-plane", "namespace": "infermesh-system", "path": "/inject", "port": 443 } } }
            ]
        }),
    );
    let files = MeshFiles::new("");
    let kubeconfig = api.kubeconfig(files.path());
    let control_plane = ControlPlane::start_kubernetes(
        &files,
        &kubeconfig,
        &["--heartbeat", "1s", "--injector-listen", "127.0.0.1:0"],
    );
    let credential = service_account_token(&api, files.path(), "chat-0", "apps", "chat");
    let _chat = sidecar(&files, control_plane.grpc, "chat-0", &credential);
    control_plane.wait_synced(1, SYNC).await;
    assert!(has_endpoint(
        &config_of(&control_plane, "chat-0").await,
        "10.244.1.5:8000",
        None
    ));

    // The webhooks carry the CA's root.
    let root = std::fs::read(files.bundle()).expect("the root");
    let bundle = base64_encode(&root);
    let deadline = tokio::time::Instant::now() + SYNC;
    loop {
        let webhooks = api
            .get(
                collections::MUTATING_WEBHOOKS,
                "",
                "infermesh-sidecar-injector",
            )
            .expect("the configuration")["webhooks"]
            .clone();
        if webhooks.as_array().is_some_and(|w| {
            w.iter()
                .all(|w| w["clientConfig"]["caBundle"] == bundle.as_str())
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "caBundle not written: {webhooks:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The watches break; the endpoint moves meanwhile; the history is
    // gone when the control plane comes back: it must list again.
    let lists = api.lists(collections::ENDPOINT_SLICES);
    api.stall();
    api.apply(
        collections::ENDPOINT_SLICES,
        endpoint_slice("models", "llama", 8000, &[("10.244.2.7", "llama-1")]),
    );
    api.expire_and_resume();
    wait_for_config(
        &control_plane,
        "chat-0",
        "the endpoint moved while the watch was broken",
        |c| has_endpoint(c, "10.244.2.7:8000", None) && !has_endpoint(c, "10.244.1.5:8000", None),
    )
    .await;
    assert!(
        api.lists(collections::ENDPOINT_SLICES) > lists,
        "the change came by a new list: {:#?}",
        api.requests()
    );
    control_plane.wait_synced(1, SYNC).await;
}

/// Standard base64, as a `caBundle` is written.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
