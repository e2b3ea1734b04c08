//! Sidecars on loopback: an app's request goes to its sidecar's outbound
//! listener, which routes it by host and originates mutual TLS to the
//! model's sidecar, which checks the caller, authorizes it and forwards to
//! the model server in plaintext. Callers whose certificate comes from
//! another CA, has expired, or carries another identity than expected are
//! refused, each with its log line and metric. (Without iptables the app
//! calls the outbound listener directly and the model's sidecar is reached
//! on a listener of its own; `sidecar_netns.rs` runs the same path through
//! real iptables rules.)

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::Request;
use infermesh_tests::backend::{MockBackend, Protocol};
use infermesh_tests::client::{self, Reply};
use infermesh_tests::identity::{ca_init, ca_issue, ca_with, identity_args};
use infermesh_tests::process::{Gateway, backend_with, config};

const UI_ID: &str = "spiffe://cluster.local/ns/edge/sa/chat-ui";
const LLAMA_ID: &str = "spiffe://cluster.local/ns/models/sa/llama";
const BATCH_ID: &str = "spiffe://cluster.local/ns/batch/sa/jobs";
const MODEL_HOST: &str = "llama.models.svc";

fn start_sidecar(certs: &Path, documents: &[String]) -> Gateway {
    // The capture listeners, moved to ephemeral ports: several sidecars
    // share this host.
    let mut all = vec![
        "kind: Listener\nmetadata: { name: inbound }\nspec: { address: 127.0.0.1:0, capture: inbound, tls: { mode: strict } }".to_owned(),
        "kind: Listener\nmetadata: { name: outbound }\nspec: { address: 127.0.0.1:0, capture: outbound }".to_owned(),
    ];
    all.extend_from_slice(documents);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let args = identity_args(certs);
    Gateway::start_sidecar(
        &config(&all),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

/// The model's sidecar: a strict mutual-TLS listener `mesh` in front of
/// `app`; callers from namespace `edge` may call anything but `/admin`.
fn model_sidecar(certs: &Path, app: SocketAddr) -> Gateway {
    start_sidecar(
        certs,
        &[
            "kind: Listener\nmetadata: { name: mesh }\nspec: { address: 127.0.0.1:0, tls: { mode: strict } }".to_owned(),
            backend_with("app", "http1", &[app], ""),
            "kind: Route\nmetadata: { name: to-app }\nspec:\n  listeners: [mesh]\n  rules: [{ backends: [{ name: app }] }]".to_owned(),
            "kind: AuthorizationPolicy\nmetadata: { name: edge-only }\nspec:\n  action: allow\n  rules: [{ from: [{ namespaces: [edge] }] }]".to_owned(),
            "kind: AuthorizationPolicy\nmetadata: { name: no-admin }\nspec:\n  action: deny\n  rules: [{ to: [{ pathPrefixes: [/admin] }] }]".to_owned(),
        ],
    )
}

/// A caller's sidecar: requests for `llama.models.svc` go to the model
/// sidecar's `mesh` listener over mutual TLS (HTTP/2), which must present
/// `expected`.
fn caller_sidecar(certs: &Path, expected: &str, mesh: SocketAddr) -> Gateway {
    start_sidecar(
        certs,
        &[
            backend_with(
                "llama",
                "http2",
                &[mesh],
                &format!("tls: {{ identity: \"{expected}\" }}"),
            ),
            format!(
                "kind: Route\nmetadata: {{ name: llama }}\nspec:\n  hostnames: [{MODEL_HOST}]\n  rules: [{{ backends: [{{ name: llama }}] }}]"
            ),
        ],
    )
}

/// What the app gets for `GET <path>` to `host`, sent through its sidecar.
async fn call(caller: &Gateway, host: &str, path: &str) -> Reply {
    let request = Request::get(caller.url("outbound", path))
        .header("host", host)
        .body(Default::default())
        .unwrap();
    client::send(&client::http1(), request)
        .await
        .expect("the sidecar answers")
}

fn inbound_handshakes(metrics: &str, result: &str, reason: &str) -> f64 {
    client::metric_value(
        metrics,
        &format!(
            "infermesh_tls_handshakes_total{{direction=\"inbound\",reason=\"{reason}\",result=\"{result}\"}}"
        ),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_flows_from_the_app_through_both_sidecars_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ca_with(dir.path(), &[(UI_ID, "ui"), (LLAMA_ID, "llama")]);
    let (ui_certs, llama_certs) = (&certs[0], &certs[1]);

    let app = MockBackend::echo("app", Protocol::Http1).await;
    let model = model_sidecar(llama_certs, app.addr);
    let ui = caller_sidecar(ui_certs, LLAMA_ID, model.listener("mesh"));

    let reply = call(&ui, MODEL_HOST, "/v1/models").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.json();
    assert_eq!(seen["backend"], "app");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    let served = model.wait_for_log(
        |l| l["target"] == "infermesh::access" && l["listener"] == "mesh",
        Duration::from_secs(5),
    );
    assert_eq!(served["peer_identity"], UI_ID);
    let sent = ui.wait_for_log(
        |l| l["target"] == "infermesh::access" && l["listener"] == "outbound",
        Duration::from_secs(5),
    );
    assert_eq!(sent["route"], "llama");
    assert_eq!(sent["status"], 200);

    // A host no route serves, on a connection made straight to the
    // outbound listener (so it has no original destination to go to).
    let reply = call(&ui, "unknown.example", "/v1/models").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("x-infermesh-error"), Some("no_route"));

    // The deny policy is checked first, then the allow policy.
    let reply = call(&ui, MODEL_HOST, "/admin/reload").await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.header("x-infermesh-error"), Some("unauthorized"));
    let metrics = client::metrics(model.health).await;
    assert_eq!(
        client::metric_value(
            &metrics,
            "infermesh_authorization_decisions_total{listener=\"mesh\",policy=\"no-admin\",result=\"deny\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_with_a_foreign_expired_or_unexpected_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ca_init(&ca);
    let issue = |id: &str, name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        ca_issue(&ca, id, &out, extra);
        out
    };
    let llama_certs = issue(LLAMA_ID, "llama", &[]);
    let app = MockBackend::echo("app", Protocol::Http1).await;
    let model = model_sidecar(&llama_certs, app.addr);
    let mesh = model.listener("mesh");

    // Its certificate expires a few seconds after the sidecar starts.
    let expiring = caller_sidecar(&issue(UI_ID, "expiring", &["--ttl", "3s"]), LLAMA_ID, mesh);
    let expires_at = std::time::Instant::now() + Duration::from_secs(3);

    // Right shape and identity, another CA (the caller trusts both, so
    // that it is the model's sidecar that refuses).
    let other_ca = dir.path().join("other-ca");
    ca_init(&other_ca);
    let foreign_certs = dir.path().join("foreign");
    ca_issue(&other_ca, UI_ID, &foreign_certs, &[]);
    let bundles = [&foreign_certs, &llama_certs]
        .map(|d| std::fs::read_to_string(d.join("bundle.pem")).unwrap());
    std::fs::write(foreign_certs.join("bundle.pem"), bundles.concat()).unwrap();
    let foreign = caller_sidecar(&foreign_certs, LLAMA_ID, mesh);
    let reply = call(&foreign, MODEL_HOST, "/v1/models").await;
    assert_eq!(reply.status, 502, "{reply:?}");
    let metrics = client::metrics(model.health).await;
    // (Refused handshakes count as connect failures, which are retried.)
    assert!(
        inbound_handshakes(&metrics, "failure", "unknown_ca") >= 1.0,
        "{metrics}"
    );
    model.wait_for_log(
        |l| {
            l["message"] == "client TLS handshake failed"
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("UnknownIssuer"))
        },
        Duration::from_secs(5),
    );

    // The caller expects another identity than the model presents.
    let suspicious = caller_sidecar(
        &issue(UI_ID, "suspicious", &[]),
        "spiffe://cluster.local/ns/models/sa/mistral",
        mesh,
    );
    let reply = call(&suspicious, MODEL_HOST, "/v1/models").await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.header("x-infermesh-error"),
        Some("upstream_tls_failed")
    );
    let metrics = client::metrics(suspicious.health).await;
    assert!(
        client::metric_value(
            &metrics,
            "infermesh_tls_handshakes_total{direction=\"outbound\",reason=\"bad_identity\",result=\"failure\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    // A valid certificate from a namespace the policy does not allow.
    let batch = caller_sidecar(&issue(BATCH_ID, "batch", &[]), LLAMA_ID, mesh);
    let reply = call(&batch, MODEL_HOST, "/v1/models").await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.header("x-infermesh-error"), Some("unauthorized"));

    // Once expired, the certificate no longer gets a connection. (Validity
    // is checked in whole seconds: a certificate is still good during the
    // second its notAfter names, so wait past that.)
    tokio::time::sleep(expires_at.saturating_duration_since(std::time::Instant::now())).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = call(&expiring, MODEL_HOST, "/v1/models").await;
    assert_eq!(reply.status, 502, "{reply:?}");
    let metrics = client::metrics(model.health).await;
    assert!(
        inbound_handshakes(&metrics, "failure", "expired") >= 1.0,
        "{metrics}"
    );
    // None of these callers reached the model server.
    assert_eq!(app.requests(), 0);
}

#[test]
fn check_validates_a_sidecar_config_with_its_built_in_listeners() {
    let check = |args: &[&str]| {
        std::process::Command::new(infermesh_tests::binary("infermesh-proxy"))
            .arg("check")
            .args(args)
            .output()
            .expect("run infermesh-proxy check")
    };
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/sidecar.yaml"
    );
    let out = check(&["--sidecar", "--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 listeners"));

    // A policy for the built-in inbound listener resolves only in a
    // sidecar's config.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        config(&["kind: AuthorizationPolicy\nmetadata: { name: p }\nspec: { listeners: [inbound], rules: [{}] }"]),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    assert!(check(&["--sidecar", "--config", file]).status.success());
    let out = check(&["--config", file]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listener \"inbound\" is not defined"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
