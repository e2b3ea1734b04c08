//! Mutual TLS from the gateway to backends: the gateway presents the
//! SPIFFE certificate it was started with, checks each endpoint's identity
//! (not a host name), refuses an endpoint with another identity, and picks
//! up a renewed certificate without a restart. Certificates come from the
//! real `infermesh-control-plane ca` commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use infermesh_certs::{CertStore, ServerOptions, peer_identity, server_config};
use infermesh_tests::backend::{MockBackend, Protocol, full};
use infermesh_tests::client;
use infermesh_tests::identity::{ca_init, ca_issue, ca_with, identity_args};
use infermesh_tests::process::{
    Gateway, backend_with, config, listener, route_by_prefix, route_with,
};
use tokio::net::TcpListener;

const GATEWAY_ID: &str = "spiffe://cluster.local/ns/edge/sa/gateway";
const LLAMA_ID: &str = "spiffe://cluster.local/ns/models/sa/llama";

/// A CA in `dir/ca` and certificates for the gateway and the model server.
fn issue_all(dir: &Path) -> (PathBuf, PathBuf) {
    let mut certs = ca_with(dir, &[(GATEWAY_ID, "gateway"), (LLAMA_ID, "llama")]);
    let llama = certs.pop().expect("two");
    (certs.pop().expect("two"), llama)
}

/// Starts a gateway serving `config` with the identity whose files
/// `infermesh-control-plane ca issue` wrote into `certs`.
fn start_with_identity(certs: &Path, config: &str) -> Gateway {
    let args = identity_args(certs);
    Gateway::start_with_args(config, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A model's proxy: a strict mutual-TLS listener `mesh` in front of `app`,
/// and `more` documents.
fn model_proxy(certs: &Path, app: SocketAddr, more: &[&str]) -> Gateway {
    let mut documents = vec![
        "kind: Listener\nmetadata: { name: mesh }\nspec: { address: 127.0.0.1:0, tls: { mode: strict } }".to_owned(),
        backend_with("app", "http1", &[app], ""),
        route_with("app", ""),
    ];
    documents.extend(more.iter().map(|d| d.to_string()));
    let documents: Vec<&str> = documents.iter().map(String::as_str).collect();
    start_with_identity(certs, &config(&documents))
}

/// A caller's proxy: listener `web`, everything to the model proxy's
/// `mesh` listener over mutual TLS (speaking `protocol`), expecting the
/// model's identity.
fn caller_proxy(certs: &Path, protocol: &str, mesh: SocketAddr) -> Gateway {
    start_with_identity(
        certs,
        &config(&[
            &listener("web", "http"),
            &backend_with(
                "llama",
                protocol,
                &[mesh],
                &format!("tls: {{ identity: \"{LLAMA_ID}\" }}"),
            ),
            &route_with("llama", ""),
        ]),
    )
}

/// A model server that speaks only mutual TLS (HTTP/1.1 and HTTP/2 by
/// ALPN) and answers with the SPIFFE ID its client presented.
async fn tls_backend(certificates: &Path) -> SocketAddr {
    let store = Arc::new(
        CertStore::load_files(
            certificates.join("cert.pem"),
            certificates.join("key.pem"),
            certificates.join("bundle.pem"),
        )
        .unwrap(),
    );
    let options = ServerOptions {
        alpn_protocols: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        ..ServerOptions::default()
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&store, &options).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let peer = peer_identity(tls.get_ref().1)
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let peer = peer.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("x-peer-identity", peer)
                                .header("x-version", format!("{:?}", request.version()))
                                .body(full("served over mTLS"))
                                .unwrap(),
                        )
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_speaks_mtls_to_backends_and_checks_their_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (gateway_certs, llama_certs) = issue_all(dir.path());
    let llama = tls_backend(&llama_certs).await;
    let tls = |id: &str| format!("tls: {{ identity: \"{id}\" }}");
    let gateway = start_with_identity(
        &gateway_certs,
        &config(&[
            &listener("web", "http"),
            &backend_with("llama1", "http1", &[llama], &tls(LLAMA_ID)),
            &backend_with("llama2", "http2", &[llama], &tls(LLAMA_ID)),
            &backend_with(
                "impostor",
                "http1",
                &[llama],
                &tls("spiffe://cluster.local/ns/models/sa/mistral"),
            ),
            &route_by_prefix(&[
                ("/h1", "llama1"),
                ("/h2", "llama2"),
                ("/impostor", "impostor"),
            ]),
        ]),
    );
    let http = client::http1();
    for (path, version) in [("/h1", "HTTP/1.1"), ("/h2", "HTTP/2.0")] {
        let reply = client::get(&http, &gateway.url("web", path)).await;
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        assert_eq!(reply.header("x-peer-identity"), Some(GATEWAY_ID), "{path}");
        assert_eq!(
            reply.header("x-version"),
            Some(version),
            "ALPN picked {version}"
        );
    }

    // An endpoint presenting another identity is refused; nothing reached it.
    let reply = client::get(&http, &gateway.url("web", "/impostor")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.header("x-infermesh-error"),
        Some("upstream_tls_failed")
    );
    // The client is told what failed; the identities are for operators.
    let error = reply.json()["error"].as_str().unwrap().to_owned();
    assert_eq!(error, "the TLS handshake with the model server failed");
    let logged = gateway.wait_for_log(
        |l| l["message"] == "request" && l["error"] == "upstream_tls_failed",
        std::time::Duration::from_secs(5),
    );
    let detail = logged["detail"].as_str().unwrap();
    assert!(
        detail.contains(LLAMA_ID) && detail.contains("mistral"),
        "the log names both identities: {detail}"
    );

    // A renewed certificate is picked up from the files, no restart.
    let expiry = "infermesh_identity_cert_expiry_timestamp_seconds";
    let before = client::metric_value(&client::metrics(gateway.health).await, expiry).unwrap();
    ca_issue(
        &dir.path().join("ca"),
        GATEWAY_ID,
        &gateway_certs,
        &["--ttl", "48h", "--force"],
    );
    let after = client::wait_for_metric(
        gateway.health,
        expiry,
        |after| after > before,
        "the renewed certificate",
    )
    .await;
    assert!(after >= before + 86_000.0, "expiry {before} -> {after}");
    let reply = client::get(&http, &gateway.url("web", "/h1")).await;
    assert_eq!(
        reply.status, 200,
        "requests carry on with the new certificate"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_asking_for_mtls_needs_an_identity() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(
        &file,
        config(&[
            &listener("web", "http"),
            &backend_with(
                "llama",
                "http1",
                &["127.0.0.1:9".parse().unwrap()],
                &format!("tls: {{ identity: \"{LLAMA_ID}\" }}"),
            ),
            &route_with("llama", ""),
        ]),
    )
    .unwrap();
    let output = Command::new(infermesh_tests::binary("infermesh-proxy"))
        .args([
            "gateway",
            "--admin-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("backend \"llama\" asks for mutual TLS")
            && stderr.contains("--identity-cert"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_talk_mtls_and_a_strict_listener_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let (edge_certs, llama_certs) = issue_all(dir.path());
    // A peer with a certificate of the right shape from another CA.
    let other = dir.path().join("other");
    ca_init(&other.join("ca"));
    ca_issue(&other.join("ca"), GATEWAY_ID, &other.join("edge"), &[]);

    let app = MockBackend::echo("app", Protocol::Http1).await;
    // The model's proxy: mutual TLS in, plaintext to the app on loopback.
    let model_proxy = model_proxy(
        &llama_certs,
        app.addr,
        &[
            "kind: Listener\nmetadata: { name: migrating }\nspec: { address: 127.0.0.1:0, tls: { mode: permissive } }",
        ],
    );
    let mesh = model_proxy.listener("mesh");
    let edge = caller_proxy(&edge_certs, "http2", mesh);

    let http = client::http1();
    let reply = client::get(&http, &edge.url("web", "/v1/models")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.json();
    assert_eq!(seen["backend"], "app");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    model_proxy.wait_for_log(
        |l| l["target"] == "infermesh::access" && l["peer_identity"] == GATEWAY_ID,
        Duration::from_secs(5),
    );

    // Plaintext to the strict listener: the connection is closed.
    let plain = client::send(
        &http,
        Request::get(format!("http://{mesh}/v1/models"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert!(plain.is_err(), "{plain:?}");
    // The permissive listener takes plaintext and mutual TLS alike.
    let reply = client::get(&http, &model_proxy.url("migrating", "/v1/models")).await;
    assert_eq!(reply.status, 200);

    // A proxy whose certificate comes from another CA is refused.
    let stranger = caller_proxy(&other.join("edge"), "http2", mesh);
    let reply = client::get(&http, &stranger.url("web", "/v1/models")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.header("x-infermesh-error"),
        Some("upstream_tls_failed")
    );

    let text = client::metrics(model_proxy.health).await;
    let inbound = |result: &str, reason: &str| {
        client::metric_value(
            &text,
            &format!(
                "infermesh_tls_handshakes_total{{direction=\"inbound\",reason=\"{reason}\",result=\"{result}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    assert!(inbound("success", "") >= 1.0, "{text}");
    assert!(inbound("failure", "unknown_ca") >= 1.0, "{text}");
    model_proxy.wait_for_log(
        |l| l["message"] == "client TLS handshake failed",
        Duration::from_secs(5),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn short_lived_certificates_rotate_under_load_without_a_failure_or_a_dropped_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ca_init(&ca);
    // Each certificate lives 5 s and is replaced every second or so, for
    // more than twice its lifetime: the first ones expire long before the
    // end, while the connection made with them carries on.
    let issue = |id: &str, out: &Path| ca_issue(&ca, id, out, &["--ttl", "5s", "--force"]);
    let (edge_certs, llama_certs) = (dir.path().join("edge"), dir.path().join("llama"));
    issue(GATEWAY_ID, &edge_certs);
    issue(LLAMA_ID, &llama_certs);

    let app = MockBackend::echo("app", Protocol::Http1).await;
    let model_proxy = model_proxy(&llama_certs, app.addr, &[]);
    let edge = caller_proxy(&edge_certs, "http2", model_proxy.listener("mesh"));

    let url = edge.url("web", "/v1/models");
    let load = client::SteadyLoad::start((0..4).map(|_| client::http1()).collect(), move || {
        Request::get(&url).body(Default::default()).unwrap()
    });

    for round in 1..=12 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        issue(GATEWAY_ID, &edge_certs);
        issue(LLAMA_ID, &llama_certs);
        for gateway in [&edge, &model_proxy] {
            client::wait_for_metric(
                gateway.health,
                "infermesh_identity_reloads_total{result=\"success\"}",
                |reloads| reloads >= f64::from(round),
                "a new certificate loaded",
            )
            .await;
        }
    }
    let (ok, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(ok > 50, "only {ok} requests");
    // The one HTTP/2 connection between the proxies lived through it all.
    let text = client::metrics(model_proxy.health).await;
    assert_eq!(
        client::metric_value(
            &text,
            "infermesh_tls_handshakes_total{direction=\"inbound\",reason=\"\",result=\"success\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_policies_allow_and_deny_by_caller_identity_and_request() {
    let dir = tempfile::tempdir().unwrap();
    let (edge_certs, llama_certs) = issue_all(dir.path());
    let batch_certs = dir.path().join("batch");
    ca_issue(
        &dir.path().join("ca"),
        "spiffe://cluster.local/ns/batch/sa/jobs",
        &batch_certs,
        &[],
    );
    let app = MockBackend::echo("app", Protocol::Http1).await;
    let model_proxy = model_proxy(
        &llama_certs,
        app.addr,
        &[
            r#"kind: AuthorizationPolicy
metadata: { name: callers }
spec:
  listeners: [mesh]
  action: allow
  rules:
    - from: [{ namespaces: [edge] }]
    - from: [{ namespaces: [batch] }]
      to: [{ pathPrefixes: [/v1/embeddings], methods: [POST] }]"#,
            r#"kind: AuthorizationPolicy
metadata: { name: no-admin }
spec:
  action: deny
  rules:
    - to: [{ pathPrefixes: [/admin] }]"#,
        ],
    );
    let mesh = model_proxy.listener("mesh");
    let (edge, batch) = (
        caller_proxy(&edge_certs, "http1", mesh),
        caller_proxy(&batch_certs, "http1", mesh),
    );
    let http = client::http1();
    let send = |gateway: &Gateway, method: &str, path: &str| {
        let request = Request::builder()
            .method(method)
            .uri(gateway.url("web", path))
            .body(Default::default())
            .unwrap();
        client::send(&http, request)
    };
    assert_eq!(send(&edge, "GET", "/v1/models").await.unwrap().status, 200);
    assert_eq!(
        send(&batch, "POST", "/v1/embeddings").await.unwrap().status,
        200
    );
    let denied = send(&batch, "GET", "/v1/models").await.unwrap();
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-infermesh-error"), Some("unauthorized"));
    // An OpenAI path: the OpenAI error shape, without the policy's name.
    assert_eq!(denied.json()["error"]["type"], "permission_error");
    assert_eq!(denied.json()["error"]["code"], "unauthorized");
    let logged = model_proxy.wait_for_log(
        |l| l["message"] == "request" && l["error"] == "unauthorized",
        std::time::Duration::from_secs(5),
    );
    assert!(
        logged["detail"]
            .as_str()
            .unwrap()
            .contains("spiffe://cluster.local/ns/batch/sa/jobs"),
        "{logged}"
    );
    let admin = send(&edge, "GET", "/admin/reset").await.unwrap();
    assert_eq!(admin.status, 403, "deny is checked before allow");
    // The access log is written by its own thread, after the response.
    let logged = model_proxy.wait_for_log(
        |l| l["message"] == "request" && l["path"] == "/admin/reset",
        std::time::Duration::from_secs(5),
    );
    assert!(
        logged["detail"].as_str().unwrap().contains("no-admin"),
        "{logged}"
    );

    let text = client::metrics(model_proxy.health).await;
    let decisions = |result: &str, policy: &str| {
        client::metric_value(
            &text,
            &format!(
                "infermesh_authorization_decisions_total{{listener=\"mesh\",policy=\"{policy}\",result=\"{result}\"}}"
            ),
        )
    };
    assert_eq!(decisions("allow", "callers"), Some(2.0), "{text}");
    assert_eq!(decisions("deny", ""), Some(1.0), "{text}");
    assert_eq!(decisions("deny", "no-admin"), Some(1.0), "{text}");
}
