//! What a new mutual-TLS connection costs: a whole TLS 1.3 handshake
//! between two workloads of one trust domain (P-256 keys, both chains
//! verified, the SPIFFE IDs checked), client and server on one thread over
//! an in-memory pipe, so the time is the CPU of both ends. Its inverse is
//! the handshakes per second one core can do for both sides together.
//!
//! `cargo bench -p infermesh-certs --bench handshake`

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use infermesh_certs::{
    CaOptions, CertStore, CertificateAuthority, ClientOptions, ExpectedIdentity, ServerOptions,
    SpiffeId, TrustDomain, WorkloadKey, client_config_with, server_config,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn store(ca: &CertificateAuthority, identity: &SpiffeId) -> Arc<CertStore> {
    let store = CertStore::new(identity.trust_domain().clone(), vec![ca.root_der().clone()])
        .expect("a store");
    let key = WorkloadKey::generate().expect("a key");
    let csr = key.csr(identity).expect("a CSR");
    let issued = ca
        .sign_csr(csr.der(), identity, Duration::from_secs(3600))
        .expect("a certificate");
    store
        .update_certificate(issued.chain_der().to_vec(), key.private_key_der())
        .expect("the certificate fits");
    Arc::new(store)
}

fn handshake(c: &mut Criterion) {
    let trust_domain = TrustDomain::new("cluster.local").expect("a trust domain");
    let ca = CertificateAuthority::new_root(&trust_domain, &CaOptions::default()).expect("a CA");
    let caller = SpiffeId::workload("cluster.local", "edge", "chat-ui").expect("an ID");
    let model = SpiffeId::workload("cluster.local", "models", "llama").expect("an ID");
    let server = TlsAcceptor::from(
        server_config(&store(&ca, &model), &ServerOptions::default()).expect("server config"),
    );
    let client = TlsConnector::from(
        client_config_with(
            &store(&ca, &caller),
            ExpectedIdentity::Exact(model),
            &ClientOptions::default(),
        )
        .expect("client config"),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());

    c.bench_function("mtls_handshake", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let (near, far) = tokio::io::duplex(16 * 1024);
                let accepted = async {
                    let mut tls = server.accept(far).await.expect("the server side");
                    // TLS 1.3 finishes the client's authentication with
                    // the server's first read.
                    let mut byte = [0u8; 1];
                    tls.read_exact(&mut byte).await.expect("a byte");
                };
                let connected = async {
                    let mut tls = client
                        .connect(name.clone(), near)
                        .await
                        .expect("the client side");
                    tls.write_all(b"x").await.expect("a byte");
                    tls.flush().await.expect("flushed");
                    tls
                };
                let (_, tls) = tokio::join!(accepted, connected);
                tls
            })
        })
    });
}

criterion_group!(benches, handshake);
criterion_main!(benches);
