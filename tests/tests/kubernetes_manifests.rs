//! The Kubernetes base (`deploy/kubernetes`), validated offline by
//! `tests/python/validate_manifests.py`: rendered by `kubectl kustomize`,
//! every object checked by kubernetes-validate against the schemas of a
//! current Kubernetes (strict: unknown fields fail), the config examples
//! checked against the CRDs, and the objects' references to each other.
//! No API server is needed, and none is used: this is not an install.

use std::process::Command;

#[test]
fn the_kubernetes_manifests_render_and_validate() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/validate_manifests.py");
    let out = Command::new("python3")
        .arg(script)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("manifests: ok"),
        "the Kubernetes manifests do not validate (it needs kubectl, Debian package \
         kubernetes-client, and kubernetes-validate from \
         `pip install -r benches/tests/python/requirements.txt`; ./test.sh installs both):\n\
         {stdout}\n{stderr}"
    );
}
