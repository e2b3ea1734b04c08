//! The mesh in containers, as deploy/compose/README.md tells a user to run
//! it: the image built with the local Docker engine and no registry
//! (deploy/docker/build.sh), the Compose topology brought up (a control
//! plane, two model pods each with its sidecar and iptables rules in the
//! pod's network namespace, a gateway), requests sent through the gateway
//! and over mutual TLS to the models, `infermesh-control-plane status`
//! read, the control plane stopped (traffic goes on) and started again
//! (every proxy reconnects and is in sync), then everything removed.
//!
//! Needs Docker and docker-compose; `./test.sh` sets
//! INFERMESH_REQUIRE_DOCKER when the engine answers, and then a missing
//! engine fails the test instead of skipping it.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use infermesh_tests::client;
use serde_json::Value;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// A Compose project of this test, removed (containers, network, volumes)
/// and its images deleted when dropped, whatever happened.
struct Project {
    name: String,
    /// The tag of the images this test built.
    tag: String,
}

/// The images deploy/docker/build.sh makes.
const IMAGES: [&str; 3] = [
    "infermesh-proxy",
    "infermesh-control-plane",
    "infermesh-bench",
];

impl Project {
    fn compose(&self, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .arg("--project-name")
            .arg(&self.name)
            .arg("--file")
            .arg(format!("{REPO}/deploy/compose/docker-compose.yaml"))
            .args(args)
            .env("INFERMESH_TAG", &self.tag)
            // Ports of the host chosen by Docker: nothing else is disturbed.
            .env("INFERMESH_GATEWAY_PORT", "0")
            .env("INFERMESH_GATEWAY_HEALTH_PORT", "0")
            .output()
            .expect("run docker-compose")
    }

    /// Runs docker-compose and panics with its output (and the project's
    /// logs) when it fails.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed:\n{}\n{}\nlogs:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs(None),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self, service: Option<&str>) -> String {
        let mut args = vec!["logs", "--no-color", "--timestamps"];
        args.extend(service);
        let out = self.compose(&args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The host address a service's container port is published on.
    fn published(&self, service: &str, port: u16) -> String {
        let port = port.to_string();
        self.ok(&["port", service, &port]).trim().to_owned()
    }

    /// `infermesh-control-plane status --json`, run in the control plane's
    /// container (the image has no shell; exec runs the binary itself).
    fn status(&self) -> Option<Value> {
        let out = self.compose(&[
            "exec",
            "-T",
            "control-plane",
            "infermesh-control-plane",
            "status",
            "--admin",
            "127.0.0.1:15014",
            "--json",
        ]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "--volumes", "--remove-orphans", "--timeout", "5"]);
        for image in IMAGES {
            let _ = Command::new("docker")
                .args(["image", "rm", "--force", &format!("{image}:{}", self.tag)])
                .output();
        }
    }
}

fn docker_available() -> bool {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    let compose = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    engine && compose
}

/// A chat completion through the gateway at `gateway` (host:port).
async fn chat(http: &client::HttpClient, gateway: &str) -> Result<client::Reply, String> {
    let request = Request::post(format!("http://{gateway}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"mock-llm","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .expect("a request");
    client::send(http, request).await
}

/// The proxies `status --json` lists (`{replica: [proxy, ...]}`), each
/// as (node name, identity, whether it holds the latest config), by name.
fn proxies(status: &Value) -> Vec<(String, String, bool)> {
    let mut proxies: Vec<(String, String, bool)> = status
        .as_object()
        .into_iter()
        .flat_map(|replicas| replicas.values())
        .filter_map(Value::as_array)
        .flatten()
        .map(|p| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                text(&p["workload"]["node"]),
                text(&p["workload"]["identity"]),
                p["state"] == "synced",
            )
        })
        .collect();
    proxies.sort();
    proxies
}

const EVERY_PROXY: [&str; 3] = ["gateway", "model-a", "model-b"];

/// Waits until `status` lists every proxy, each in sync, and returns them.
fn wait_for_every_proxy_in_sync(
    project: &Project,
    within: Duration,
) -> Vec<(String, String, bool)> {
    let deadline = Instant::now() + within;
    loop {
        let listed = project.status().map(|s| proxies(&s));
        if let Some(listed) = &listed {
            let names: Vec<&str> = listed.iter().map(|(node, ..)| node.as_str()).collect();
            if names == EVERY_PROXY && listed.iter().all(|(.., synced)| *synced) {
                return listed.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "not every proxy in sync within {within:?}: {listed:?}\nlogs:\n{}",
            project.logs(None)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compose_mesh_serves_over_mtls_and_outlives_its_control_plane() {
    if !docker_available() {
        assert!(
            std::env::var_os("INFERMESH_REQUIRE_DOCKER").is_none(),
            "INFERMESH_REQUIRE_DOCKER is set but docker or docker-compose does not answer"
        );
        eprintln!("skipped: no Docker engine or docker-compose here");
        return;
    }
    let name = format!("infermesh-test-{}", std::process::id());
    let tag = name.clone();
    let built = tokio::task::spawn_blocking({
        let tag = tag.clone();
        move || {
            Command::new(format!("{REPO}/deploy/docker/build.sh"))
                .arg(&tag)
                .output()
                .expect("run deploy/docker/build.sh")
        }
    })
    .await
    .unwrap();
    let project = Project { name, tag };
    assert!(
        built.status.success(),
        "deploy/docker/build.sh failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );

    // Each image is small and runs as the proxy's uid, never root.
    for image in IMAGES {
        let inspect = Command::new("docker")
            .args(["image", "inspect", "--format", "{{.Size}} {{.Config.User}}"])
            .arg(format!("{image}:{}", project.tag))
            .output()
            .expect("docker image inspect");
        let inspected = String::from_utf8_lossy(&inspect.stdout);
        let (size, user) = inspected.trim().split_once(' ').expect("size and user");
        let size: u64 = size.parse().expect("a size in bytes");
        // The proxy's image is the largest: its binary (jemalloc
        // included) and iptables, 25.2 MB on 2026-12-06.
        assert!(size <= 26 * 1000 * 1000, "{image} is {size} bytes");
        assert_eq!(user, "1337:1337", "{image}");
    }

    project.ok(&["up", "--detach", "--no-build"]);
    let gateway = project.published("gateway", 8080);
    wait_for_every_proxy_in_sync(&project, Duration::from_secs(90));

    let http = client::http1();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match chat(&http, &gateway).await {
            Ok(reply) if reply.status == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "no answer through the gateway: {other:?}\nlogs:\n{}",
                project.logs(None)
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for _ in 0..20 {
        let reply = chat(&http, &gateway).await.expect("an answer");
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.json()["object"], "chat.completion");
    }
    // Both model pods served, each reached through its sidecar, which
    // saw the gateway's SPIFFE ID: the hop was mutual TLS.
    for model in ["model-a-proxy", "model-b-proxy"] {
        let logs = project.logs(Some(model));
        assert!(
            logs.lines().any(|l| l.contains("infermesh::access")
                && l.contains("peer_identity=\"spiffe://cluster.local/ns/edge/sa/gateway\"")),
            "{model} logged no request from the gateway's identity:\n{logs}"
        );
    }

    // A caller outside the mesh, straight to a model pod's address (on
    // the project's own network): the pod's rules hand the connection to
    // its sidecar, which refuses a caller without the edge's identity.
    let container = project.ok(&["ps", "--quiet", "model-a"]);
    let inspect = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            container.trim(),
        ])
        .output()
        .expect("docker inspect");
    let pod = String::from_utf8_lossy(&inspect.stdout).trim().to_owned();
    let bypass = client::get(&http, &format!("http://{pod}:8000/v1/models")).await;
    assert_eq!(
        bypass.status,
        403,
        "{}",
        String::from_utf8_lossy(&bypass.body)
    );
    assert_eq!(bypass.header("x-infermesh-error"), Some("unauthorized"));

    // The control plane goes away: the proxies keep what they hold.
    project.ok(&["stop", "--timeout", "5", "control-plane"]);
    for _ in 0..10 {
        let reply = chat(&http, &gateway)
            .await
            .expect("an answer without the control plane");
        assert_eq!(reply.status, 200);
    }
    // It comes back (same CA, same config): every proxy reconnects and
    // holds the config it serves.
    project.ok(&["start", "control-plane"]);
    let listed = wait_for_every_proxy_in_sync(&project, Duration::from_secs(60));
    for (node, identity, _) in &listed {
        let expected = if node == "gateway" {
            "spiffe://cluster.local/ns/edge/sa/gateway"
        } else {
            "spiffe://cluster.local/ns/models/sa/llama"
        };
        assert_eq!(identity, expected, "{node}");
    }
    let reply = chat(&http, &gateway).await.expect("an answer");
    assert_eq!(reply.status, 200);
}
