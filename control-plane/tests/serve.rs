//! `infermesh-control-plane serve`, the real binary on loopback: a proxy
//! without a certificate reaches the certificate service over TLS (the
//! control plane proving its own SPIFFE ID), gets the certificate its join
//! token grants, is refused with an unknown token, finds the API by server
//! reflection, and a token created while the control plane runs works
//! without a restart; the admin port counts it all.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use infermesh_certs::{
    CertStore, ClientOptions, ExpectedIdentity, SpiffeId, TrustDomain, WorkloadKey,
    client_config_with,
};
use infermesh_proto::v1::certificate_service_client::CertificateServiceClient;
use infermesh_proto::v1::{SignRequest, sign_request};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_infermesh-control-plane");

fn run(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create_token(dir: &Path, name: &str) -> String {
    let out = dir.join(format!("{name}.token"));
    run(&[
        "token",
        "create",
        "--tokens",
        dir.join("tokens.yaml").to_str().unwrap(),
        "--namespace",
        "models",
        "--service-account",
        name,
        "--out",
        out.to_str().unwrap(),
    ]);
    std::fs::read_to_string(out).unwrap().trim().to_owned()
}

/// The running control plane; killed when dropped.
struct ControlPlane {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> ControlPlane {
    let mut child = Command::new(BIN)
        .args(["serve", "--ca"])
        .arg(dir.join("ca"))
        .arg("--tokens")
        .arg(dir.join("tokens.yaml"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut address = |kind: &str| -> SocketAddr {
        let line = lines.next().unwrap().unwrap();
        line.strip_prefix("infermesh-control-plane listening on ")
            .and_then(|rest| rest.strip_suffix(&format!(" ({kind})")))
            .unwrap_or_else(|| panic!("unexpected line: {line}"))
            .parse()
            .unwrap()
    };
    let grpc = address("grpc");
    let admin = address("admin");
    ControlPlane { child, grpc, admin }
}

/// A gRPC channel to `address` over TLS, as a proxy without a
/// certificate makes it: it trusts `bundle` and requires the control
/// plane's SPIFFE ID.
async fn channel(address: SocketAddr, bundle: &Path) -> Channel {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(bundle)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let store = Arc::new(CertStore::new(TrustDomain::new("mesh.test").unwrap(), roots).unwrap());
    let control_plane =
        SpiffeId::parse("spiffe://mesh.test/ns/infermesh-system/sa/control-plane").unwrap();
    let config = client_config_with(
        &store,
        ExpectedIdentity::Exact(control_plane),
        &ClientOptions {
            alpn_protocols: vec![b"h2".to_vec()],
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    Endpoint::from_static("http://control-plane.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(address).await?;
                let name = rustls::pki_types::ServerName::try_from("control-plane").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

fn sign_request(token: &str, name: &str) -> SignRequest {
    let key = WorkloadKey::generate().unwrap();
    let id = SpiffeId::parse(&format!("spiffe://mesh.test/ns/models/sa/{name}")).unwrap();
    SignRequest {
        credential: Some(sign_request::Credential::JoinToken(token.to_owned())),
        csr_pem: key.csr(&id).unwrap().pem().to_owned(),
    }
}

async fn metrics(admin: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test]
async fn a_proxy_without_a_certificate_gets_the_one_its_token_grants() {
    let dir = tempfile::tempdir().unwrap();
    run(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.test",
        "--out",
        dir.path().join("ca").to_str().unwrap(),
    ]);
    let llama = create_token(dir.path(), "llama");
    let control_plane = start(dir.path());
    let bundle = dir.path().join("ca").join("root-cert.pem");
    let mut client = CertificateServiceClient::new(channel(control_plane.grpc, &bundle).await);

    let signed = client
        .sign(sign_request(&llama, "llama"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.identity, "spiffe://mesh.test/ns/models/sa/llama");
    let refused = client
        .sign(sign_request("imjt_0_guess", "llama"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // Server reflection lists the API.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel(control_plane.grpc, &bundle).await);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(services)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list of services");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"infermesh.mesh.v1.CertificateService".to_owned()),
        "{names:?}"
    );

    // A token created while it runs is accepted without a restart.
    let mistral = create_token(dir.path(), "mistral");
    let mut accepted = false;
    for _ in 0..50 {
        if client.sign(sign_request(&mistral, "mistral")).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the new token was never accepted");

    let text = metrics(control_plane.admin).await;
    assert!(
        text.contains("infermesh_control_plane_certificates_signed_total{namespace=\"models\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(
            "infermesh_control_plane_certificates_refused_total{reason=\"unknown_token\"}"
        ),
        "{text}"
    );
}
