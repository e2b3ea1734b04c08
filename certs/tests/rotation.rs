//! Hot rotation: configs built once pick up a new certificate or trust
//! bundle on the next handshake, while open connections keep working; bad
//! updates leave the store as it was.

mod common;

use common::*;
use infermesh_certs::{
    ExpectedIdentity, ServerOptions, StoreError, WorkloadKey, client_config, server_config,
};

#[tokio::test]
async fn new_certificate_is_presented_on_the_next_handshake_only() {
    let ca = root_ca(TD);
    let (web, api) = (workload_id("web"), workload_id("api"));
    let server_store = store(&ca, &web);
    let client_store = store(&ca, &api);
    let server = server_config(&server_store, &ServerOptions::default()).unwrap();
    let client = client_config(&client_store, ExpectedIdentity::Exact(web.clone())).unwrap();

    let before = server_store.certificate().unwrap();
    let (mut s1, mut c1) = handshake(server.clone(), client.clone()).await.expect_ok();
    let presented = c1.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(x509_serial(&presented), before.serial);

    // Rotate the server's certificate (shorter ttl, so the expiry differs too).
    let (next, key) = issue(&ca, &web, 2 * HOUR);
    server_store
        .update_certificate(next.chain_der().to_vec(), key.private_key_der())
        .unwrap();
    let after = server_store.certificate().unwrap();
    assert_eq!(after.serial, next.serial());
    assert_ne!(after.serial, before.serial);
    assert_eq!(
        server_store.not_after_unix().unwrap(),
        next.not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    );
    assert!(after.not_after < before.not_after);

    let (mut s2, mut c2) = handshake(server.clone(), client.clone()).await.expect_ok();
    assert_eq!(
        &c2.get_ref().1.peer_certificates().unwrap()[0],
        next.leaf_der()
    );
    exchange(&mut s2, &mut c2, "new connection").await;
    // The connection opened before the rotation still works.
    exchange(&mut s1, &mut c1, "old connection").await;

    // Client-side rotation too: the server sees the new client certificate.
    let (next_client, key) = issue(&ca, &api, 2 * HOUR);
    client_store
        .update_certificate(next_client.chain_der().to_vec(), key.private_key_der())
        .unwrap();
    let (s3, _c3) = handshake(server, client).await.expect_ok();
    assert_eq!(
        &s3.get_ref().1.peer_certificates().unwrap()[0],
        next_client.leaf_der()
    );
}

fn x509_serial(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate.serial.to_bytes_be()
}

#[tokio::test]
async fn root_rotation_trusts_old_and_new_roots_together() {
    let (old, new) = (root_ca(TD), root_ca(TD));
    let (web, api, batch) = (workload_id("web"), workload_id("api"), workload_id("batch"));
    let both = vec![old.root_der().clone(), new.root_der().clone()];

    let server_store = store(&old, &web);
    let server = server_config(&server_store, &ServerOptions::default()).unwrap();
    // A client already moved to the new root, trusting both.
    let new_client_store = store(&new, &api);
    new_client_store.update_bundle(both.clone()).unwrap();
    let new_client =
        client_config(&new_client_store, ExpectedIdentity::Exact(web.clone())).unwrap();
    // A client still on the old root only.
    let old_client_store = store(&old, &batch);
    let old_client =
        client_config(&old_client_store, ExpectedIdentity::Exact(web.clone())).unwrap();

    // Before the server trusts the new root, the new client is refused.
    let (server_err, _) = handshake(server.clone(), new_client.clone())
        .await
        .expect_server_refused()
        .await;
    assert_eq!(
        reason(&server_err),
        infermesh_certs::HandshakeFailure::UnknownCa
    );

    server_store.update_bundle(both.clone()).unwrap();
    assert_eq!(server_store.roots().len(), 2);
    handshake(server.clone(), new_client.clone())
        .await
        .expect_ok();
    handshake(server.clone(), old_client.clone())
        .await
        .expect_ok();

    // The server moves to a certificate from the new root: clients that trust
    // both roots accept it, the one trusting only the old root does not until
    // its bundle is updated.
    let (issued, key) = issue(&new, &web, DAY);
    server_store
        .update_certificate(issued.chain_der().to_vec(), key.private_key_der())
        .unwrap();
    handshake(server.clone(), new_client).await.expect_ok();
    let (client_err, _) = handshake(server.clone(), old_client.clone())
        .await
        .expect_client_refused();
    assert_eq!(
        reason(&client_err),
        infermesh_certs::HandshakeFailure::UnknownCa
    );
    old_client_store.update_bundle(both).unwrap();
    handshake(server, old_client).await.expect_ok();
}

#[tokio::test]
async fn refused_updates_keep_the_current_material() {
    let ca = root_ca(TD);
    let web = workload_id("web");
    let server_store = store(&ca, &web);
    let before = server_store.certificate().unwrap();

    let (issued, _) = issue(&ca, &web, HOUR);
    let wrong_key = WorkloadKey::generate().unwrap();
    let err = server_store
        .update_certificate(issued.chain_der().to_vec(), wrong_key.private_key_der())
        .unwrap_err();
    assert!(matches!(err, StoreError::KeyMismatch { .. }), "{err}");

    let foreign_ca = root_ca("other.org");
    let (foreign, key) = issue(
        &foreign_ca,
        &id("spiffe://other.org/ns/default/sa/web"),
        HOUR,
    );
    let err = server_store
        .update_certificate(foreign.chain_der().to_vec(), key.private_key_der())
        .unwrap_err();
    assert!(matches!(err, StoreError::WrongTrustDomain { .. }), "{err}");

    let stranger = root_ca(TD);
    let (untrusted, key) = issue(&stranger, &web, HOUR);
    let err = server_store
        .update_certificate(untrusted.chain_der().to_vec(), key.private_key_der())
        .unwrap_err();
    assert!(matches!(err, StoreError::Untrusted { .. }), "{err}");

    let err = server_store
        .update_certificate(Vec::new(), key.private_key_der())
        .unwrap_err();
    assert!(matches!(err, StoreError::NoCertificate { .. }), "{err}");

    let err = server_store.update_bundle(Vec::new()).unwrap_err();
    assert!(matches!(err, StoreError::EmptyBundle { .. }), "{err}");
    let err = server_store
        .update_bundle(vec![issued.leaf_der().clone()])
        .unwrap_err();
    assert!(matches!(err, StoreError::BadRoot { index: 1, .. }), "{err}");

    assert_eq!(server_store.certificate().unwrap(), before);
    assert_eq!(server_store.roots(), vec![ca.root_der().clone()]);
    // And it still serves with the old material.
    let server = server_config(&server_store, &ServerOptions::default()).unwrap();
    let client = client_config(
        &store(&ca, &workload_id("api")),
        ExpectedIdentity::Exact(web),
    )
    .unwrap();
    let (_, c) = handshake(server, client).await.expect_ok();
    assert_eq!(
        x509_serial(&c.get_ref().1.peer_certificates().unwrap()[0]),
        before.serial
    );
}
