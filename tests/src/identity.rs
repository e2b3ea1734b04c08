//! Certificates for the tests, made by the real `infermesh-control-plane
//! ca` commands, and the proxy flags that load them.

use std::path::Path;
use std::process::Command;

fn control_plane(args: &[&str]) {
    let output = Command::new(crate::binary("infermesh-control-plane"))
        .args(args)
        .output()
        .expect("run infermesh-control-plane");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Creates a root CA for trust domain `cluster.local` in `out`.
pub fn ca_init(out: &Path) {
    let out = out.to_str().expect("a UTF-8 path");
    control_plane(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        out,
    ]);
}

/// Issues a certificate for SPIFFE ID `identity` from the CA in `ca` into
/// `out` (`cert.pem`, `key.pem`, `bundle.pem`); `extra` are more flags
/// (`--ttl`, `--force`).
pub fn ca_issue(ca: &Path, identity: &str, out: &Path, extra: &[&str]) {
    let (ca, out) = (
        ca.to_str().expect("a UTF-8 path"),
        out.to_str().expect("a UTF-8 path"),
    );
    let mut args = vec![
        "ca",
        "issue",
        "--ca",
        ca,
        "--identity",
        identity,
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    control_plane(&args);
}

/// A CA in `dir/ca` and, for each `(identity, name)`, a certificate in
/// `dir/<name>`; returns those directories in order.
pub fn ca_with(dir: &Path, identities: &[(&str, &str)]) -> Vec<std::path::PathBuf> {
    let ca = dir.join("ca");
    ca_init(&ca);
    identities
        .iter()
        .map(|(identity, name)| {
            let out = dir.join(name);
            ca_issue(&ca, identity, &out, &[]);
            out
        })
        .collect()
}

/// The proxy flags that load the files `ca_issue` wrote into `certs`.
pub fn identity_args(certs: &Path) -> Vec<String> {
    let file = |name: &str| certs.join(name).to_str().expect("a UTF-8 path").to_owned();
    vec![
        "--identity-cert".to_owned(),
        file("cert.pem"),
        "--identity-key".to_owned(),
        file("key.pem"),
        "--trust-bundle".to_owned(),
        file("bundle.pem"),
    ]
}
