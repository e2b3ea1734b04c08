//! Mutual TLS handshakes between stores over an in-memory pipe: who is
//! accepted, who is refused, and the reason each side reports.

mod common;

use std::sync::Arc;
use std::time::SystemTime;

use common::*;
use infermesh_certs::{
    CaOptions, CertStore, CertificateAuthority, ExpectedIdentity, HandshakeFailure, ServerOptions,
    SpiffeClientVerifier, SpiffeServerVerifier, StoreCertResolver, client_config, peer_identity,
    server_config,
};
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, ProtocolVersion, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that presents `chain`/`key` as-is (bypassing the store's checks)
/// and verifies the server with the SPIFFE verifier over `store`.
fn raw_client(
    store: &Arc<CertStore>,
    expected: ExpectedIdentity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ClientConfig> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            store.clone(),
            expected,
        )))
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// A server that presents `chain`/`key` as-is and verifies clients with the
/// SPIFFE verifier over `store`.
fn raw_server(
    store: &Arc<CertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ServerConfig> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(store.clone(), None)))
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

fn expect(id: &infermesh_certs::SpiffeId) -> ExpectedIdentity {
    ExpectedIdentity::Exact(id.clone())
}

#[tokio::test]
async fn mutual_tls_succeeds_and_each_side_sees_the_other() {
    let ca = root_ca(TD);
    let (web, api) = (workload_id("web"), workload_id("api"));
    let server_store = store(&ca, &web);
    let client_store = store(&ca, &api);
    let server = server_config(&server_store, &ServerOptions::default()).unwrap();
    let client = client_config(&client_store, expect(&web)).unwrap();

    let (mut s, mut c) = handshake(server, client).await.expect_ok();
    assert_eq!(peer_identity(s.get_ref().1), Some(api.clone()));
    assert_eq!(peer_identity(c.get_ref().1), Some(web.clone()));
    assert_eq!(
        c.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    exchange(&mut s, &mut c, "hello").await;
}

#[tokio::test]
async fn wider_expectations_accept_matching_peers() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let server = server_config(&store(&ca, &web), &ServerOptions::default()).unwrap();
    let client_store = store(&ca, &workload_id("api"));
    for expected in [
        ExpectedIdentity::TrustDomain(td(TD)),
        ExpectedIdentity::Namespace {
            trust_domain: td(TD),
            namespace: "default".to_owned(),
        },
        ExpectedIdentity::OneOf(vec![workload_id("db"), web.clone()]),
    ] {
        let client = client_config(&client_store, expected.clone()).unwrap();
        handshake(server.clone(), client).await.expect_ok();
    }
}

#[tokio::test]
async fn wrong_server_identity_is_refused_naming_both_ids() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let server = server_config(&store(&ca, &web), &ServerOptions::default()).unwrap();
    let client_store = store(&ca, &workload_id("api"));

    let db = workload_id("db");
    let client = client_config(&client_store, expect(&db)).unwrap();
    let (client_err, server_err) = handshake(server.clone(), client)
        .await
        .expect_client_refused();
    assert_eq!(reason(&client_err), HandshakeFailure::BadIdentity);
    let text = client_err.to_string();
    assert!(
        text.contains("expected spiffe://cluster.local/ns/default/sa/db"),
        "{text}"
    );
    assert!(
        text.contains("presented SPIFFE ID spiffe://cluster.local/ns/default/sa/web"),
        "{text}"
    );
    // The server only gets an alert.
    assert_eq!(reason(&server_err), HandshakeFailure::BadCertificate);

    let client = client_config(
        &client_store,
        ExpectedIdentity::Namespace {
            trust_domain: td(TD),
            namespace: "prod".to_owned(),
        },
    )
    .unwrap();
    let (client_err, _) = handshake(server, client).await.expect_client_refused();
    assert_eq!(reason(&client_err), HandshakeFailure::BadIdentity);
}

#[tokio::test]
async fn server_certificate_from_another_ca_is_refused() {
    let (ca, other) = (root_ca(TD), root_ca(TD));
    let web = workload_id("web");
    let server = server_config(&store(&other, &web), &ServerOptions::default()).unwrap();
    let client = client_config(&store(&ca, &workload_id("api")), expect(&web)).unwrap();
    let (client_err, server_err) = handshake(server, client).await.expect_client_refused();
    assert_reason(&client_err, HandshakeFailure::UnknownCa);
    assert_reason(&server_err, HandshakeFailure::UnknownCa);
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let (ca, other) = (root_ca(TD), root_ca(TD));
    let web = workload_id("web");
    let server = server_config(&store(&ca, &web), &ServerOptions::default()).unwrap();
    // The client trusts the server's CA but holds a certificate from another.
    let client_store = store(&other, &workload_id("api"));
    client_store
        .update_bundle(vec![other.root_der().clone(), ca.root_der().clone()])
        .unwrap();
    let client = client_config(&client_store, expect(&web)).unwrap();
    let (server_err, client_err) = handshake(server, client)
        .await
        .expect_server_refused()
        .await;
    assert_reason(&server_err, HandshakeFailure::UnknownCa);
    assert_reason(&client_err, HandshakeFailure::UnknownCa);
}

/// A CA that started ten days ago, so it can issue certificates that have
/// already expired.
fn old_ca() -> CertificateAuthority {
    let ten_days_ago = SystemTime::now() - 10 * DAY;
    CertificateAuthority::new_root_at(&td(TD), &CaOptions::default(), ten_days_ago).unwrap()
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let ca = old_ca();
    let web = workload_id("web");
    let (expired, key) = issue_at(&ca, &web, HOUR, SystemTime::now() - 2 * DAY);
    assert!(expired.not_after() < SystemTime::now());
    let server_store = store(&ca, &web);
    let server = raw_server(
        &server_store,
        expired.chain_der().to_vec(),
        key.private_key_der(),
    );
    let client = client_config(&store(&ca, &workload_id("api")), expect(&web)).unwrap();
    let (client_err, server_err) = handshake(server, client).await.expect_client_refused();
    assert_reason(&client_err, HandshakeFailure::Expired);
    assert_reason(&server_err, HandshakeFailure::Expired);
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = old_ca();
    let (web, api) = (workload_id("web"), workload_id("api"));
    let server = server_config(&store(&ca, &web), &ServerOptions::default()).unwrap();
    let (expired, key) = issue_at(&ca, &api, HOUR, SystemTime::now() - 2 * DAY);
    let client_store = store(&ca, &api);
    let client = raw_client(
        &client_store,
        expect(&web),
        expired.chain_der().to_vec(),
        key.private_key_der(),
    );
    let (server_err, client_err) = handshake(server, client)
        .await
        .expect_server_refused()
        .await;
    assert_reason(&server_err, HandshakeFailure::Expired);
    assert_reason(&client_err, HandshakeFailure::Expired);
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let server = server_config(&store(&ca, &web), &ServerOptions::default()).unwrap();
    // A store with a bundle but no certificate yet.
    let bare = Arc::new(CertStore::new(td(TD), vec![ca.root_der().clone()]).unwrap());
    assert!(bare.certificate().is_none());
    let client = client_config(&bare, expect(&web)).unwrap();
    let (server_err, client_err) = handshake(server, client)
        .await
        .expect_server_refused()
        .await;
    assert_reason(&server_err, HandshakeFailure::NoClientCert);
    assert_reason(&client_err, HandshakeFailure::NoClientCert);
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused_even_when_its_root_is_trusted() {
    let ca = root_ca(TD);
    let foreign_ca = root_ca("other.org");
    let web = workload_id("web");
    let server_store = store(&ca, &web);
    server_store
        .update_bundle(vec![ca.root_der().clone(), foreign_ca.root_der().clone()])
        .unwrap();
    let server = server_config(&server_store, &ServerOptions::default()).unwrap();

    let foreign = id("spiffe://other.org/ns/default/sa/api");
    let (issued, key) = issue(&foreign_ca, &foreign, HOUR);
    let client = raw_client(
        &server_store,
        expect(&web),
        issued.chain_der().to_vec(),
        key.private_key_der(),
    );
    let (server_err, _) = handshake(server, client)
        .await
        .expect_server_refused()
        .await;
    assert_reason(&server_err, HandshakeFailure::BadIdentity);
    let text = server_err.to_string();
    assert!(
        text.contains("spiffe://other.org/ns/default/sa/api")
            && text.contains("another trust domain"),
        "{text}"
    );
}

#[tokio::test]
async fn client_certificate_without_a_spiffe_id_is_refused() {
    // A CA made outside infermesh, issuing a DNS-only client certificate.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["api.default.svc".to_owned()]).unwrap();
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

    let ca = root_ca(TD);
    let web = workload_id("web");
    let server_store = store(&ca, &web);
    server_store
        .update_bundle(vec![ca.root_der().clone(), ca_cert.der().clone()])
        .unwrap();
    let server = server_config(&server_store, &ServerOptions::default()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let client = raw_client(&server_store, expect(&web), vec![leaf.der().clone()], key);
    let (server_err, _) = handshake(server, client)
        .await
        .expect_server_refused()
        .await;
    assert_reason(&server_err, HandshakeFailure::BadIdentity);
    assert!(
        server_err.to_string().contains("no URI SAN"),
        "{server_err}"
    );
}

#[tokio::test]
async fn a_server_may_take_clients_without_a_certificate_but_still_checks_those_with_one() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let options = ServerOptions {
        client_certificate_optional: true,
        ..ServerOptions::default()
    };
    let server = server_config(&store(&ca, &web), &options).unwrap();
    let bare = Arc::new(CertStore::new(td(TD), vec![ca.root_der().clone()]).unwrap());
    let (s, _) = handshake(server.clone(), client_config(&bare, expect(&web)).unwrap())
        .await
        .expect_ok();
    assert_eq!(
        peer_identity(s.get_ref().1),
        None,
        "no certificate, no identity"
    );
    let api = workload_id("api");
    let (s, _) = handshake(
        server.clone(),
        client_config(&store(&ca, &api), expect(&web)).unwrap(),
    )
    .await
    .expect_ok();
    assert_eq!(peer_identity(s.get_ref().1), Some(api));
    // A certificate from another CA is refused, optional or not.
    let other = root_ca(TD);
    let stranger_store = store(&other, &workload_id("api"));
    stranger_store
        .update_bundle(vec![other.root_der().clone(), ca.root_der().clone()])
        .unwrap();
    let stranger = client_config(&stranger_store, expect(&web)).unwrap();
    let (server_err, _) = handshake(server, stranger)
        .await
        .expect_server_refused()
        .await;
    assert_reason(&server_err, HandshakeFailure::UnknownCa);
}

#[tokio::test]
async fn server_can_restrict_clients() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let options = ServerOptions {
        clients: Some(ExpectedIdentity::Exact(workload_id("api"))),
        ..ServerOptions::default()
    };
    let server = server_config(&store(&ca, &web), &options).unwrap();
    let allowed = client_config(&store(&ca, &workload_id("api")), expect(&web)).unwrap();
    handshake(server.clone(), allowed).await.expect_ok();
    let other = client_config(&store(&ca, &workload_id("batch")), expect(&web)).unwrap();
    let (server_err, _) = handshake(server, other).await.expect_server_refused().await;
    assert_eq!(reason(&server_err), HandshakeFailure::BadIdentity);
    assert!(server_err.to_string().contains("sa/batch"), "{server_err}");
}

#[tokio::test]
async fn tls12_is_refused_unless_allowed() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let server_store = store(&ca, &web);
    let client_store = store(&ca, &workload_id("api"));
    let tls12_client = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                client_store.clone(),
                expect(&web),
            )))
            .with_client_cert_resolver(Arc::new(StoreCertResolver::new(client_store.clone()))),
    );

    let server = server_config(&server_store, &ServerOptions::default()).unwrap();
    let (client_err, server_err) = handshake(server, tls12_client.clone())
        .await
        .expect_client_refused();
    assert_reason(&server_err, HandshakeFailure::ProtocolVersion);
    assert_reason(&client_err, HandshakeFailure::ProtocolVersion);

    let options = ServerOptions {
        allow_tls12: true,
        ..ServerOptions::default()
    };
    let server = server_config(&server_store, &options).unwrap();
    let (mut s, mut c) = handshake(server, tls12_client).await.expect_ok();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );
    assert_eq!(peer_identity(s.get_ref().1), Some(workload_id("api")));
    assert_eq!(peer_identity(c.get_ref().1), Some(web));
    exchange(&mut s, &mut c, "over tls 1.2").await;
}

#[test]
fn unrelated_errors_classify_as_other() {
    let io = std::io::Error::other("connection reset");
    assert_eq!(HandshakeFailure::from_io(&io), HandshakeFailure::Other);
    assert_eq!(HandshakeFailure::Other.as_str(), "other");
    assert_eq!(HandshakeFailure::UnknownCa.to_string(), "unknown_ca");
    let wrapped = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        rustls::Error::NoCertificatesPresented,
    );
    assert_eq!(
        HandshakeFailure::from_io(&wrapped),
        HandshakeFailure::NoClientCert
    );
}
