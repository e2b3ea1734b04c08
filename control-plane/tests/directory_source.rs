//! The directory source on a real directory: the first config must be
//! valid; a burst of writes becomes one new snapshot; a broken file is
//! refused with its file, line and field, and the last good snapshot stays
//! in force until the file is fixed.

use std::path::Path;
use std::time::Duration;

use infermesh_control_plane::source::{DirectorySource, Source};
use tokio::sync::mpsc;

const BACKEND: &str = "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: llama }
spec: { endpoints: [{ address: \"127.0.0.1:9001\" }] }
";

fn route(timeout: &str) -> String {
    format!(
        "apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: chat }}
spec:
  rules:
    - backends: [{{ name: llama }}]
      timeouts: {{ responseHeaders: {timeout} }}
"
    )
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Waits (bounded) for the next thing a channel or watch gives.
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("{what} never came"))
}

#[tokio::test]
async fn changes_become_snapshots_and_broken_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "backend.yaml", BACKEND);
    write(dir.path(), "route.yaml", &route("30s"));
    write(dir.path(), "notes.txt", "not YAML, not read");
    let (refused_tx, mut refused) = mpsc::unbounded_channel();
    let source = DirectorySource::start(dir.path(), refused_tx).unwrap();
    let mut snapshots = source.snapshots();
    let first = snapshots.borrow_and_update().clone();
    assert_eq!(first.config.routes.len(), 1);

    // Two writes in a burst: the next snapshot holds the last of them.
    write(dir.path(), "route.yaml", &route("45s"));
    write(dir.path(), "route.yaml", &route("60s"));
    within("a new snapshot", snapshots.changed()).await.unwrap();
    let second = snapshots.borrow_and_update().clone();
    assert_ne!(second.version, first.version);
    let rule = &second.config.routes[0].spec.rules[0];
    assert_eq!(
        rule.timeouts.response_headers.get(),
        Duration::from_secs(60)
    );

    // A broken file: refused, located, and the second snapshot stays.
    write(
        dir.path(),
        "route.yaml",
        &route("60s").replace("backends", "backendz"),
    );
    let refusal = within("the refusal", refused.recv()).await.unwrap();
    assert_eq!(refusal.kept, second.version);
    let problem = refusal
        .diagnostics
        .iter()
        .find(|d| d.field.contains("backendz"))
        .unwrap_or_else(|| panic!("{}", refusal.diagnostics));
    assert!(problem.file.ends_with("route.yaml"), "{}", problem.file);
    assert_eq!(problem.line, 6);
    assert!(
        !snapshots.has_changed().unwrap(),
        "nothing new was published"
    );

    // Fixed: published again.
    write(dir.path(), "route.yaml", &route("90s"));
    within("the fixed snapshot", snapshots.changed())
        .await
        .unwrap();
    assert_ne!(snapshots.borrow().version, second.version);
}

#[tokio::test]
async fn an_invalid_directory_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "route.yaml", &route("30s"));
    let (refused, _) = mpsc::unbounded_channel();
    let error = DirectorySource::start(dir.path(), refused)
        .err()
        .expect("a route to an undefined backend is refused");
    let text = error.to_string();
    assert!(
        text.contains("route.yaml") && text.contains("llama"),
        "{text}"
    );
}
