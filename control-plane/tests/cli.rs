//! `infermesh-control-plane ca init` and `ca issue`: the files they write,
//! that those files make a working mTLS pair, and that nothing is
//! overwritten without `--force`.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use infermesh_certs::{
    CertStore, ExpectedIdentity, ServerOptions, SpiffeId, client_config, peer_identity,
    server_config,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infermesh-control-plane"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn issue(ca: &Path, out: &Path, identity: &str) -> String {
    ok(&[
        "ca",
        "issue",
        "--ca",
        path(ca),
        "--identity",
        identity,
        "--out",
        path(out),
        "--ttl",
        "2h",
    ])
}

async fn mtls(server_dir: &Path, client_dir: &Path, expected: &SpiffeId) -> (SpiffeId, SpiffeId) {
    let load = |dir: &Path| {
        Arc::new(
            CertStore::load_files(
                dir.join("cert.pem"),
                dir.join("key.pem"),
                dir.join("bundle.pem"),
            )
            .unwrap(),
        )
    };
    let (server_store, client_store) = (load(server_dir), load(client_dir));
    let server = server_config(&server_store, &ServerOptions::default()).unwrap();
    let client = client_config(&client_store, ExpectedIdentity::Exact(expected.clone())).unwrap();
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("web.default.svc").unwrap();
    let (s, c) = tokio::join!(
        tokio_rustls::TlsAcceptor::from(server).accept(server_io),
        tokio_rustls::TlsConnector::from(client).connect(name, client_io)
    );
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    c.write_all(b"ping").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    (
        peer_identity(s.get_ref().1).unwrap(),
        peer_identity(c.get_ref().1).unwrap(),
    )
}

#[tokio::test]
async fn init_then_issue_gives_files_that_complete_a_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let stdout = ok(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca),
        "--validity",
        "30d",
    ]);
    assert!(
        stdout.contains("root-cert.pem") && stdout.contains("root-key.pem"),
        "{stdout}"
    );
    assert!(stdout.contains("cluster.local"), "{stdout}");
    #[cfg(unix)]
    assert_eq!(mode(&ca.join("root-key.pem")), 0o600);
    assert!(!ca.join("intermediate-cert.pem").exists());

    let (web, api) = (dir.path().join("web"), dir.path().join("api"));
    let stdout = issue(&ca, &web, "spiffe://cluster.local/ns/default/sa/web");
    for name in ["cert.pem", "key.pem", "bundle.pem"] {
        assert!(stdout.contains(name), "{stdout}");
    }
    #[cfg(unix)]
    assert_eq!(mode(&web.join("key.pem")), 0o600);
    issue(&ca, &api, "spiffe://cluster.local/ns/default/sa/api");

    let web_id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let (seen_by_server, seen_by_client) = mtls(&web, &api, &web_id).await;
    assert_eq!(
        seen_by_server.to_string(),
        "spiffe://cluster.local/ns/default/sa/api"
    );
    assert_eq!(seen_by_client, web_id);

    // The ttl was applied.
    let store = CertStore::load_files(
        web.join("cert.pem"),
        web.join("key.pem"),
        web.join("bundle.pem"),
    )
    .unwrap();
    let info = store.certificate().unwrap();
    let lifetime = info.not_after.duration_since(info.not_before).unwrap();
    assert_eq!(
        lifetime.as_secs(),
        2 * 3600 + 60,
        "2h ttl plus one minute of backdating"
    );
}

#[tokio::test]
async fn intermediate_ca_issues_chains() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let stdout = ok(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca),
        "--intermediate",
    ]);
    assert!(stdout.contains("intermediate-cert.pem"), "{stdout}");
    #[cfg(unix)]
    assert_eq!(mode(&ca.join("intermediate-key.pem")), 0o600);

    let (web, api) = (dir.path().join("web"), dir.path().join("api"));
    issue(&ca, &web, "spiffe://cluster.local/ns/default/sa/web");
    issue(&ca, &api, "spiffe://cluster.local/ns/default/sa/api");
    let chain = std::fs::read_to_string(web.join("cert.pem")).unwrap();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf + intermediate"
    );
    assert_eq!(
        std::fs::read_to_string(web.join("bundle.pem")).unwrap(),
        std::fs::read_to_string(ca.join("root-cert.pem")).unwrap()
    );
    let web_id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    mtls(&web, &api, &web_id).await;
}

#[test]
fn existing_files_are_not_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let init = [
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca),
    ];
    ok(&init);
    let root_before = std::fs::read(ca.join("root-cert.pem")).unwrap();

    let out = run(&init);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("refusing to overwrite") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(stderr.contains("root-cert.pem"), "{stderr}");
    assert_eq!(
        std::fs::read(ca.join("root-cert.pem")).unwrap(),
        root_before
    );

    let mut forced = init.to_vec();
    forced.push("--force");
    ok(&forced);
    assert_ne!(
        std::fs::read(ca.join("root-cert.pem")).unwrap(),
        root_before
    );
    #[cfg(unix)]
    assert_eq!(mode(&ca.join("root-key.pem")), 0o600);

    let web = dir.path().join("web");
    issue(&ca, &web, "spiffe://cluster.local/ns/default/sa/web");
    let key_before = std::fs::read(web.join("key.pem")).unwrap();
    let out = run(&[
        "ca",
        "issue",
        "--ca",
        path(&ca),
        "--identity",
        "spiffe://cluster.local/ns/default/sa/web",
        "--out",
        path(&web),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("--force"));
    assert_eq!(std::fs::read(web.join("key.pem")).unwrap(), key_before);
}

#[test]
fn a_start_script_keeps_its_ca_and_hands_out_its_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let init = |trust_domain: &str| {
        run(&[
            "ca",
            "init",
            "--trust-domain",
            trust_domain,
            "--out",
            path(&ca),
            "--keep-existing",
        ])
    };
    assert!(init("cluster.local").status.success());
    let root = std::fs::read_to_string(ca.join("root-cert.pem")).unwrap();
    let again = init("cluster.local");
    assert!(again.status.success());
    assert!(
        String::from_utf8(again.stdout)
            .unwrap()
            .contains("kept the CA"),
        "says it kept it"
    );
    assert_eq!(
        std::fs::read_to_string(ca.join("root-cert.pem")).unwrap(),
        root
    );
    // Another trust domain's CA is not silently taken for this one.
    let other = init("example.org");
    assert!(!other.status.success());
    let stderr = String::from_utf8(other.stderr).unwrap();
    assert!(stderr.contains("not of example.org"), "{stderr}");

    let bundle = dir.path().join("workload/trust-bundle.pem");
    let args = ["ca", "bundle", "--ca", path(&ca), "--out", path(&bundle)];
    ok(&args);
    assert_eq!(std::fs::read_to_string(&bundle).unwrap(), root);
    assert!(!run(&args).status.success(), "no overwrite without --force");
    let mut forced = args.to_vec();
    forced.push("--force");
    ok(&forced);
}

#[test]
fn bad_input_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca),
    ]);
    let (out_dir, missing_ca) = (dir.path().join("o"), dir.path().join("none"));

    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "ca",
                "init",
                "--trust-domain",
                "Cluster.Local",
                "--out",
                "x",
            ],
            "lower-case",
        ),
        (
            &[
                "ca",
                "init",
                "--trust-domain",
                "cluster.local",
                "--out",
                "x",
                "--validity",
                "soon",
            ],
            "365d",
        ),
        (
            &[
                "ca",
                "issue",
                "--ca",
                path(&ca),
                "--identity",
                "spiffe://other.org/ns/a/sa/b",
                "--out",
                path(&out_dir),
            ],
            "trust domain `cluster.local`",
        ),
        (
            &[
                "ca",
                "issue",
                "--ca",
                path(&ca),
                "--identity",
                "web",
                "--out",
                "x",
            ],
            "spiffe://",
        ),
        (
            &[
                "ca",
                "issue",
                "--ca",
                path(&missing_ca),
                "--identity",
                "spiffe://cluster.local/ns/a/sa/b",
                "--out",
                path(&out_dir),
            ],
            "ca init",
        ),
    ];
    for (args, needle) in cases {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(!out_dir.exists(), "nothing written on refusal");
}

#[test]
fn token_create_keeps_the_token_out_of_the_control_planes_files() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    let credential = dir.path().join("llama.token");
    let args = [
        "token",
        "create",
        "--tokens",
        path(&tokens),
        "--namespace",
        "models",
        "--service-account",
        "llama",
        "--ttl",
        "1h",
        "--out",
        path(&credential),
    ];
    let stdout = ok(&args);
    assert!(stdout.contains("wrote"), "{stdout}");
    let token = std::fs::read_to_string(&credential).unwrap();
    let token = token.trim();
    assert!(token.starts_with("imjt_"), "{token}");
    assert_eq!(mode(&credential), 0o600);
    assert_eq!(mode(&tokens), 0o600);
    let kept = std::fs::read_to_string(&tokens).unwrap();
    assert!(!kept.contains(token), "only a digest is kept: {kept}");
    let set = infermesh_control_plane::join_tokens::JoinTokens::load(&tokens).unwrap();
    let workload = set
        .authenticate(token, std::time::SystemTime::now())
        .unwrap();
    assert_eq!(
        (
            workload.namespace.as_str(),
            workload.service_account.as_str()
        ),
        ("models", "llama")
    );
    // A second token for another workload joins the same file; the first
    // credential file is not overwritten without --force.
    let refused = run(&args);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    let mut other = args;
    other[7] = "mistral";
    other[11] = path(&dir.path().join("mistral.token")).to_owned().leak();
    ok(&other);
    let set = infermesh_control_plane::join_tokens::JoinTokens::load(&tokens).unwrap();
    assert_eq!(set.tokens.len(), 2);
    // A namespace that makes no SPIFFE ID writes nothing.
    let mut bad = args;
    bad[5] = "a/b";
    bad[11] = path(&dir.path().join("bad.token")).to_owned().leak();
    assert!(!run(&bad).status.success());
    assert!(!dir.path().join("bad.token").exists());
}
