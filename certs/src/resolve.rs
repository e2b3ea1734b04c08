//! Presenting the store's current certificate in handshakes: one resolver
//! that serves rustls both as server (`ResolvesServerCert`) and as client
//! (`ResolvesClientCert`), reading the store afresh for every handshake.

use std::sync::Arc;

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::store::CertStore;

/// Hands rustls whatever certificate and key the [`CertStore`] holds at the
/// moment a handshake asks for one.
#[derive(Debug, Clone)]
pub struct StoreCertResolver {
    store: Arc<CertStore>,
}

impl StoreCertResolver {
    /// A resolver over `store`.
    pub fn new(store: Arc<CertStore>) -> Self {
        Self { store }
    }
}

impl ResolvesServerCert for StoreCertResolver {
    /// The SNI name is ignored: a workload has one identity.
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.current_certified()
    }
}

impl ResolvesClientCert for StoreCertResolver {
    /// The server's CA hints are ignored: the mesh has one trust domain.
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.current_certified()
    }

    /// Always true: the store may receive a certificate after the config is
    /// built, so rustls must be ready to send one.
    fn has_certs(&self) -> bool {
        true
    }
}
