//! Helpers shared by the integration tests: CAs, issued workloads, stores,
//! and TLS handshakes over an in-memory duplex pipe.

#![allow(dead_code)]

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use infermesh_certs::{
    CaOptions, CertStore, CertificateAuthority, HandshakeFailure, IssuedCertificate, SpiffeId,
    TrustDomain, WorkloadKey,
};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

pub(crate) const TD: &str = "cluster.local";
pub(crate) const HOUR: Duration = Duration::from_secs(3600);
pub(crate) const DAY: Duration = Duration::from_secs(24 * 3600);

pub(crate) fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

pub(crate) fn id(text: &str) -> SpiffeId {
    SpiffeId::parse(text).unwrap()
}

pub(crate) fn workload_id(sa: &str) -> SpiffeId {
    SpiffeId::workload(TD, "default", sa).unwrap()
}

pub(crate) fn root_ca(trust_domain: &str) -> CertificateAuthority {
    CertificateAuthority::new_root(&td(trust_domain), &CaOptions::default()).unwrap()
}

/// A fresh key and a certificate for `identity`, signed by `ca`.
pub(crate) fn issue(
    ca: &CertificateAuthority,
    identity: &SpiffeId,
    ttl: Duration,
) -> (IssuedCertificate, WorkloadKey) {
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(identity).unwrap();
    let issued = ca.sign_csr(csr.der(), identity, ttl).unwrap();
    (issued, key)
}

/// Like [`issue`], as if signed at `now`.
pub(crate) fn issue_at(
    ca: &CertificateAuthority,
    identity: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> (IssuedCertificate, WorkloadKey) {
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(identity).unwrap();
    let issued = ca.sign_csr_at(csr.der(), identity, ttl, now).unwrap();
    (issued, key)
}

/// A store holding a certificate for `identity` from `ca` and trusting `ca`'s root.
pub(crate) fn store(ca: &CertificateAuthority, identity: &SpiffeId) -> Arc<CertStore> {
    let store =
        CertStore::new(identity.trust_domain().clone(), vec![ca.root_der().clone()]).unwrap();
    let (issued, key) = issue(ca, identity, DAY);
    store
        .update_certificate(issued.chain_der().to_vec(), key.private_key_der())
        .unwrap();
    Arc::new(store)
}

pub(crate) struct Handshake {
    pub(crate) server: io::Result<server::TlsStream<DuplexStream>>,
    pub(crate) client: io::Result<client::TlsStream<DuplexStream>>,
}

/// Runs both sides of a handshake over an in-memory pipe.
pub(crate) async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Handshake {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    // Any name: the SPIFFE verifier ignores it.
    let name = ServerName::try_from("web.default.svc").unwrap();
    let (server, client) = tokio::join!(
        acceptor.accept(server_io),
        connector.connect(name, client_io)
    );
    Handshake { server, client }
}

impl Handshake {
    /// Both sides completed; returns the streams.
    pub(crate) fn expect_ok(
        self,
    ) -> (
        server::TlsStream<DuplexStream>,
        client::TlsStream<DuplexStream>,
    ) {
        let server = self
            .server
            .unwrap_or_else(|e| panic!("server handshake failed: {e}"));
        let client = self
            .client
            .unwrap_or_else(|e| panic!("client handshake failed: {e}"));
        (server, client)
    }

    /// The server refused; returns its error and the client's (which, in TLS
    /// 1.3, may only surface on the first read after the handshake).
    pub(crate) async fn expect_server_refused(self) -> (io::Error, io::Error) {
        let server = match self.server {
            Ok(_) => panic!("server accepted a client it should refuse"),
            Err(e) => e,
        };
        let client = match self.client {
            Err(e) => e,
            Ok(mut stream) => {
                let mut buf = [0u8; 1];
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                    Ok(Err(e)) => e,
                    other => panic!("client saw no failure after the server refused: {other:?}"),
                }
            }
        };
        (server, client)
    }

    /// The client refused the server; returns the client's error and the server's.
    pub(crate) fn expect_client_refused(self) -> (io::Error, io::Error) {
        let client = match self.client {
            Ok(_) => panic!("client accepted a server it should refuse"),
            Err(e) => e,
        };
        let server = match self.server {
            Ok(_) => panic!("server completed a handshake the client refused"),
            Err(e) => e,
        };
        (client, server)
    }
}

/// Asserts that a handshake failed for `expected`, showing the error if not.
#[track_caller]
pub(crate) fn assert_reason(error: &io::Error, expected: HandshakeFailure) {
    assert_eq!(reason(error), expected, "{error}");
}

pub(crate) fn reason(error: &io::Error) -> HandshakeFailure {
    HandshakeFailure::from_io(error)
}

/// Sends a message each way and checks it arrives.
pub(crate) async fn exchange(
    server: &mut server::TlsStream<DuplexStream>,
    client: &mut client::TlsStream<DuplexStream>,
    text: &str,
) {
    client.write_all(text.as_bytes()).await.unwrap();
    client.flush().await.unwrap();
    let mut buf = vec![0u8; text.len()];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, text.as_bytes());
    server.write_all(&buf).await.unwrap();
    server.flush().await.unwrap();
    let mut back = vec![0u8; text.len()];
    client.read_exact(&mut back).await.unwrap();
    assert_eq!(back, text.as_bytes());
}
