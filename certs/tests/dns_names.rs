//! Server certificates with DNS names (`sign_csr_with_dns_names`): what a
//! client outside the mesh, such as the Kubernetes API server calling the
//! injection webhook, checks by name against the CA's root.

mod common;

use std::sync::Arc;

use common::*;
use infermesh_certs::{CaError, CertStore, WorkloadKey};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{ServerName, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

fn names() -> Vec<String> {
    vec![
        "infermesh-control-plane.infermesh-system.svc".to_owned(),
        "infermesh-control-plane.infermesh-system.svc.cluster.local".to_owned(),
    ]
}

#[test]
fn a_server_certificate_carries_the_identity_and_the_dns_names() {
    let ca = root_ca(TD);
    let identity = id("spiffe://cluster.local/ns/infermesh-system/sa/control-plane");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr_without_identity().unwrap();
    let issued = ca
        .sign_csr_with_dns_names(csr.der(), &identity, &names(), HOUR)
        .unwrap();
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(issued.leaf_der()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![
            GeneralName::URI("spiffe://cluster.local/ns/infermesh-system/sa/control-plane"),
            GeneralName::DNSName("infermesh-control-plane.infermesh-system.svc"),
            GeneralName::DNSName("infermesh-control-plane.infermesh-system.svc.cluster.local"),
        ]
    );
    // A store of the trust domain takes it, as any workload certificate.
    let store = CertStore::new(td(TD), vec![ca.root_der().clone()]).unwrap();
    store
        .update_certificate(issued.chain_der().to_vec(), key.private_key_der())
        .unwrap();

    // A client that trusts the root checks it by name, as TLS clients
    // outside the mesh do.
    let mut roots = RootCertStore::empty();
    roots.add(ca.root_der().clone()).unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let now = UnixTime::now();
    for name in names() {
        let server = ServerName::try_from(name.clone()).unwrap();
        verifier
            .verify_server_cert(issued.leaf_der(), &[], &server, &[], now)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let other = ServerName::try_from("other.infermesh-system.svc").unwrap();
    assert!(
        verifier
            .verify_server_cert(issued.leaf_der(), &[], &other, &[], now)
            .is_err()
    );
}

#[test]
fn names_that_are_not_dns_names_are_refused() {
    let ca = root_ca(TD);
    let identity = workload_id("web");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr_without_identity().unwrap();
    for bad in ["", "a..b", "-a.b", "a b.svc", "é.svc", "a.b-"] {
        let err = ca
            .sign_csr_with_dns_names(csr.der(), &identity, &[bad.to_owned()], HOUR)
            .unwrap_err();
        assert!(matches!(err, CaError::InvalidDnsName(_)), "{bad:?}: {err}");
    }
    ca.sign_csr_with_dns_names(csr.der(), &identity, &["*.svc.ns".to_owned()], HOUR)
        .unwrap();
}
