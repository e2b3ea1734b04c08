//! Transparent interception in real "pods": two network namespaces joined
//! by a veth pair, each with its own loopback, the iptables rules of
//! `infermesh-proxy init`, a sidecar, and an unmodified program: `curl`
//! calling a plain `IP:port` in one pod, a mock model server in the other.
//! The request must arrive through both sidecars over mutual TLS.
//!
//! Making namespaces needs root (CI runs as root). Where they cannot be
//! made the test says so on stderr and returns, unless
//! `INFERMESH_REQUIRE_NETNS` is set (as `./test.sh` sets it as root): then it fails.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use infermesh_tests::identity::{ca_with, identity_args};
use infermesh_tests::netns::{Namespace, skipped};
use infermesh_tests::process::{Gateway, config};

const UI_ID: &str = "spiffe://cluster.local/ns/edge/sa/chat-ui";
const LLAMA_ID: &str = "spiffe://cluster.local/ns/models/sa/llama";
/// The pods' addresses, on a veth pair that exists only between the two
/// namespaces this test makes.
const CALLER_IP: &str = "10.231.0.1";
const MODEL_IP: &str = "10.231.0.2";
/// The user the app runs as; the sidecars run as root, which `init
/// --proxy-uid 0` exempts from redirection.
const APP_UID: &str = "1000";

/// `curl` inside `pod`, as the app's user unless `as_root`: the status
/// code and the response head, or curl's error.
fn curl(pod: &Namespace, url: &str, as_root: bool) -> Result<(u16, String), String> {
    let mut args = vec![];
    if !as_root {
        args.extend([
            "--reuid",
            APP_UID,
            "--regid",
            APP_UID,
            "--clear-groups",
            "curl",
        ]);
    }
    args.extend(["-sS", "-m", "10", "-D", "-", url]);
    let program = if as_root { "curl" } else { "setpriv" };
    let output = pod.exec(program, &args);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    Ok((status, text))
}

/// A sidecar's metrics, read from inside its pod.
fn read_metrics(pod: &Namespace, health: SocketAddr) -> String {
    let url = format!("http://{health}/metrics");
    let output = pod.run("curl", &["-sS", "-m", "5", &url]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Makes the two pods, or says why not.
fn pods(test: &str) -> Option<(Namespace, Namespace)> {
    let tools = ["iptables", "curl", "setpriv"].into_iter().find(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let made = match tools {
        Some(missing) => Err(format!("`{missing}` is not installed")),
        None => {
            Namespace::create("caller").and_then(|caller| Ok((caller, Namespace::create("model")?)))
        }
    };
    match made {
        Ok(pods) => Some(pods),
        Err(why) => {
            skipped(test, &why);
            None
        }
    }
}

/// Joins the pods with a veth pair, made straight inside them.
fn connect(caller: &Namespace, model: &Namespace) {
    let peer = [
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
    ];
    caller.run("ip", &[&peer[..], &[model.name.as_str()]].concat());
    for (pod, ip) in [(caller, CALLER_IP), (model, MODEL_IP)] {
        pod.run("ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        pod.run("ip", &["link", "set", "eth0", "up"]);
    }
}

/// Runs `until` every 50 ms until it holds, for at most 10 s.
fn eventually(what: &str, mut until: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !until() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_sidecar(pod: &Namespace, certs: &Path, documents: &[&str]) -> Gateway {
    let args = identity_args(certs);
    Gateway::start_sidecar_in_namespace(
        &pod.name,
        &config(documents),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

#[test]
fn an_unmodified_client_reaches_a_model_in_another_pod_through_both_sidecars() {
    let Some((caller, mut model)) =
        pods("an_unmodified_client_reaches_a_model_in_another_pod_through_both_sidecars")
    else {
        return;
    };
    connect(&caller, &model);
    let dir = tempfile::tempdir().unwrap();
    let certs = ca_with(dir.path(), &[(UI_ID, "ui"), (LLAMA_ID, "llama")]);
    let (ui_certs, llama_certs) = (&certs[0], &certs[1]);

    // The model pod: a model server on 8000 (mesh traffic: mutual TLS
    // only) that speaks HTTP/1.1 only (Python's http.server), although the
    // sidecars speak HTTP/2 to each other; and a metrics port 9000
    // (plaintext allowed).
    let site = dir.path().join("site");
    std::fs::create_dir_all(site.join("v1")).unwrap();
    std::fs::write(site.join("v1/models"), "{\"data\":[{\"id\":\"mock-llm\"}]}").unwrap();
    model.spawn(
        "python3",
        &[
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "--directory",
            site.to_str().unwrap(),
        ],
    );
    let bench = infermesh_tests::binary("infermesh-bench");
    model.spawn(
        bench.to_str().unwrap(),
        &["serve", "--listen", "0.0.0.0:9000"],
    );
    let proxy = infermesh_tests::binary("infermesh-proxy");
    let proxy = proxy.to_str().unwrap();
    for pod in [&caller, &model] {
        pod.run(proxy, &["init", "--proxy-uid", "0"]);
    }
    let inbound_listener = "kind: Listener\nmetadata: { name: inbound }\nspec:\n  address: 0.0.0.0:15006\n  capture: inbound\n  tls: { mode: strict, ports: [{ port: 9000, mode: disable }] }";
    let model_sidecar = start_sidecar(
        &model,
        llama_certs,
        &[
            inbound_listener,
            "kind: AuthorizationPolicy\nmetadata: { name: edge-or-plaintext-metrics }\nspec:\n  rules:\n    - from: [{ namespaces: [edge] }]\n    - to: [{ pathPrefixes: [/metrics, /v1/models], methods: [GET] }]",
        ],
    );
    let caller_sidecar = start_sidecar(
        &caller,
        ui_certs,
        &[&format!(
            "kind: Backend\nmetadata: {{ name: llama }}\nspec:\n  addresses: [\"{MODEL_IP}:8000\"]\n  endpoints: [{{ address: \"{MODEL_IP}:8000\" }}]\n  protocol: http2\n  tls: {{ identity: \"{LLAMA_ID}\" }}"
        )],
    );
    let model_url = format!("http://{MODEL_IP}:8000/v1/models");
    eventually("the model server", || {
        curl(&model, &model_url.replace(MODEL_IP, "127.0.0.1"), true).is_ok()
    });

    // The app calls the model's IP:port; both sidecars carry the request.
    let (status, reply) = curl(&caller, &model_url, false).unwrap();
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("mock-llm"), "{reply}");
    let sent = caller_sidecar.wait_for_log(
        |l| l["target"] == "infermesh::access" && l["listener"] == "outbound",
        Duration::from_secs(5),
    );
    assert_eq!(sent["route"], "llama", "{sent}");
    assert_eq!(sent["endpoint"], format!("{MODEL_IP}:8000"), "{sent}");
    assert!(
        sent["client"].as_str().unwrap().starts_with(CALLER_IP),
        "{sent}"
    );
    let served = model_sidecar.wait_for_log(
        |l| l["target"] == "infermesh::access" && l["listener"] == "inbound",
        Duration::from_secs(5),
    );
    assert_eq!(served["peer_identity"], UI_ID, "{served}");
    assert_eq!(served["route"], "inbound", "{served}");
    assert_eq!(
        served["protocol"], "HTTP/2.0",
        "between the sidecars: {served}"
    );
    let metrics = read_metrics(&caller, caller_sidecar.health);
    assert!(
        metrics.contains(
            "infermesh_tls_handshakes_total{direction=\"outbound\",reason=\"\",result=\"success\"} 1"
        ),
        "{metrics}"
    );

    // A process the rules exempt (root, here) bypasses the caller's
    // sidecar: in plaintext, the model's strict port refuses it...
    let refused = curl(&caller, &model_url, true);
    assert!(refused.is_err(), "{refused:?}");
    // ...while its port in `disable` mode takes it.
    let metrics_url = format!("http://{MODEL_IP}:9000/v1/models");
    assert_eq!(curl(&caller, &metrics_url, true).unwrap().0, 200);
    // The app's own call to that port is outside the mesh (no backend has
    // the address) and passes through its sidecar in plaintext.
    assert_eq!(curl(&caller, &metrics_url, false).unwrap().0, 200);
    let metrics = read_metrics(&caller, caller_sidecar.health);
    assert!(
        metrics.contains(
            "infermesh_outside_mesh_total{action=\"passthrough\",listener=\"outbound\",protocol=\"http\"} 1"
        ),
        "{metrics}"
    );
    // Not HTTP (a TLS ClientHello): the caller's sidecar passes it through
    // as TCP; on the model's plaintext port, whose authorization policies
    // can judge only HTTP, the model's sidecar refuses it.
    let tls = curl(&caller, &format!("https://{MODEL_IP}:9000/"), false);
    assert!(tls.is_err(), "{tls:?}");
    let metrics = read_metrics(&caller, caller_sidecar.health);
    assert!(
        metrics.contains(
            "infermesh_outside_mesh_total{action=\"passthrough\",listener=\"outbound\",protocol=\"tcp\"} 1"
        ),
        "{metrics}"
    );
    model_sidecar.wait_for_log(
        |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not speak HTTP"))
                && l["destination"] == format!("{MODEL_IP}:9000")
        },
        Duration::from_secs(5),
    );

    // Blocking destinations outside the mesh, by a config reload.
    caller_sidecar.write_config(&config(&[
        &format!(
            "kind: Backend\nmetadata: {{ name: llama }}\nspec:\n  addresses: [\"{MODEL_IP}:8000\"]\n  endpoints: [{{ address: \"{MODEL_IP}:8000\" }}]\n  protocol: http2\n  tls: {{ identity: \"{LLAMA_ID}\" }}"
        ),
        "kind: Listener\nmetadata: { name: outbound }\nspec: { address: 127.0.0.1:15001, capture: outbound, outsideMesh: blocked }",
    ]));
    caller_sidecar.wait_for_log(
        |l| l["message"] == "config applied",
        Duration::from_secs(10),
    );
    let (status, reply) = curl(&caller, &metrics_url, false).unwrap();
    assert_eq!(status, 502, "{reply}");
    assert!(reply.contains("x-infermesh-error: outside_mesh"), "{reply}");
    assert_eq!(curl(&caller, &model_url, false).unwrap().0, 200);

    // Without authorization policies, the model's sidecar passes such a
    // connection through to the app's port, whose HTTP server answers the
    // ClientHello in HTTP.
    model_sidecar.write_config(&config(&[inbound_listener]));
    model_sidecar.wait_for_log(
        |l| l["message"] == "config applied",
        Duration::from_secs(10),
    );
    let tls = curl(&caller, &format!("https://{MODEL_IP}:9000/"), true);
    assert!(
        tls.as_ref()
            .is_err_and(|e| e.contains("wrong version number")),
        "{tls:?}"
    );

    // The rules come off again: without the caller's, the app's plaintext
    // meets the model's strict port; without the model's too, it reaches
    // the model server itself.
    caller.run(proxy, &["init", "--cleanup"]);
    let refused = curl(&caller, &model_url, false);
    assert!(refused.is_err(), "{refused:?}");
    model.run(proxy, &["init", "--cleanup"]);
    assert_eq!(curl(&caller, &model_url, false).unwrap().0, 200);
}
