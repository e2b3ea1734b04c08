//! The certificate service over gRPC, with the client tonic generates from
//! `proto/`: a proxy with a join token gets a certificate for the identity
//! the token grants, and each refusal arrives as the status a client acts
//! on, with its reason in `x-infermesh-refusal`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use infermesh_certs::{CaOptions, CertificateAuthority, SpiffeId, TrustDomain, WorkloadKey};
use infermesh_control_plane::certify::Certifier;
use infermesh_control_plane::credential::Workload;
use infermesh_control_plane::grpc::{Certificates, REFUSAL_METADATA};
use infermesh_control_plane::join_tokens::{JoinTokenAuthenticator, JoinTokens};
use infermesh_proto::v1::certificate_service_client::CertificateServiceClient;
use infermesh_proto::v1::{SignRequest, sign_request};
use tonic::Code;

struct Service {
    client: CertificateServiceClient<tonic::transport::Channel>,
    token: String,
    registry: prometheus::Registry,
    server: tokio::task::JoinHandle<()>,
}

async fn service() -> Service {
    let domain = TrustDomain::new("mesh.test").unwrap();
    let ca = CertificateAuthority::new_root(&domain, &CaOptions::default()).unwrap();
    let bundle = ca.root_pem();
    let mut tokens = JoinTokens::default();
    let llama = Workload {
        namespace: "models".into(),
        service_account: "llama".into(),
    };
    let token = tokens.create(&llama, Duration::from_secs(3600), SystemTime::now());
    let registry = prometheus::Registry::new();
    let certifier = Certifier::new(
        Arc::new(ca),
        Arc::new(JoinTokenAuthenticator::new(tokens)),
        Duration::from_secs(600),
        &registry,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = Certificates::new(Arc::new(certifier), bundle).into_service();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let client = CertificateServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    Service {
        client,
        token,
        registry,
        server,
    }
}

fn request(token: Option<&str>, identity: &str) -> SignRequest {
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&SpiffeId::parse(identity).unwrap()).unwrap();
    SignRequest {
        credential: token.map(|t| sign_request::Credential::JoinToken(t.to_owned())),
        csr_pem: csr.pem().to_owned(),
    }
}

#[tokio::test]
async fn a_join_token_gets_the_certificate_it_grants_and_nothing_else() {
    let mut s = service().await;
    let llama = "spiffe://mesh.test/ns/models/sa/llama";
    let signed = s
        .client
        .sign(request(Some(&s.token), llama))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.identity, llama);
    assert!(
        signed
            .certificate_chain_pem
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(signed.trust_bundle_pem.contains("BEGIN CERTIFICATE"));
    assert!(signed.not_after_unix - signed.not_before_unix <= 600 + 60);

    let cases = [
        (
            request(Some(&s.token), "spiffe://mesh.test/ns/models/sa/admin"),
            Code::PermissionDenied,
            "identity_not_granted",
        ),
        (
            request(Some("imjt_0_guess"), llama),
            Code::Unauthenticated,
            "unknown_token",
        ),
        (request(None, llama), Code::Unauthenticated, "no_credential"),
        (
            SignRequest {
                csr_pem: "not a CSR".into(),
                ..request(Some(&s.token), llama)
            },
            Code::InvalidArgument,
            "malformed_csr",
        ),
    ];
    for (request, code, reason) in cases {
        let status = s.client.sign(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{reason}: {status:?}");
        assert_eq!(
            status.metadata().get(REFUSAL_METADATA).unwrap(),
            reason,
            "{status:?}"
        );
        assert!(!status.message().is_empty());
    }
    let refused: f64 = s
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == "infermesh_control_plane_certificates_refused_total")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| m.get_counter().get_value())
        .sum();
    assert_eq!(refused, 4.0, "each refusal counted");
    s.server.abort();
}
