//! Support for infermesh's end-to-end tests: starting the real binaries on
//! ephemeral loopback ports (and stopping every process started), mock
//! model backends, HTTP/1.1 and HTTP/2 clients, and a fake Kubernetes API
//! server.

#![forbid(unsafe_code)]

pub mod backend;
pub mod client;
pub mod identity;
pub mod kube_api;
pub mod mesh;
pub mod models;
pub mod netns;
pub mod otlp;
pub mod process;

use std::path::PathBuf;

/// The path of a binary of this workspace, built by the same `cargo test`
/// run (`cargo test --workspace` builds every binary before running any
/// test).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}
