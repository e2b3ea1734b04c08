//! The mesh quick start (`deploy/mesh-demo.sh --once`), run as a user runs
//! it, with the binaries of this build: a control plane, two sidecars and
//! a gateway on one machine, requests over mutual TLS between them, a
//! refused edit and a route change every proxy that holds it acknowledges.
//! It uses fixed ports (8080, 9000, 15000-15443), as the docs show them.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_mesh_quick_start_runs_as_documented() {
    let proxy = infermesh_tests::binary("infermesh-proxy");
    let bin = proxy.parent().expect("the binaries' directory");
    for needed in ["infermesh-control-plane", "infermesh-bench"] {
        infermesh_tests::binary(needed);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mesh-demo.sh");
    let mut child = Command::new("bash")
        .arg(script)
        .arg("--once")
        .env("INFERMESH_BIN", bin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: on a timeout, it and every process it
        // started are stopped together.
        .process_group(0)
        .spawn()
        .expect("run deploy/mesh-demo.sh");
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().expect("poll the script").is_none() {
        if Instant::now() > deadline {
            let group = nix::unistd::Pid::from_raw(-i32::try_from(child.id()).expect("pid"));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            panic!("deploy/mesh-demo.sh --once did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("the script's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // Both requests answered by the model, through the mesh.
    assert_eq!(
        stdout.matches("\"object\":\"chat.completion\"").count(),
        2,
        "{stdout}"
    );
    let typo = "spec.rules[0].timeouts.responseHeadres: unknown field `responseHeadres`; did you mean `responseHeaders`?";
    assert!(stdout.contains(typo), "{stdout}");
    // The last status: every proxy in sync, chat-0 and llama-0 at a new
    // version, edge-0 (which holds no copy of the route) at its old one.
    let tables: Vec<&str> = stdout.split("PROXY    REPLICA").collect();
    assert_eq!(tables.len(), 3, "two status tables: {stdout}");
    let version = |table: &str, node: &str| -> String {
        let row = table
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("no {node} in {table}"));
        assert!(row.ends_with("SYNCED"), "{row}");
        row.split_whitespace().nth(5).expect("a version").to_owned()
    };
    let (first, last) = (tables[1], tables[2]);
    assert_ne!(version(first, "chat-0"), version(last, "chat-0"));
    assert_ne!(version(first, "llama-0"), version(last, "llama-0"));
    assert_eq!(version(first, "edge-0"), version(last, "edge-0"));
}
