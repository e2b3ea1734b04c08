//! Workload identity and mutual TLS for infermesh.
//!
//! - [`spiffe`]: SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) and
//!   trust domains.
//! - [`ca`]: a certificate authority that creates a root (and optionally an
//!   intermediate) and signs workload CSRs for an identity the caller has
//!   authenticated — never one taken from the CSR.
//! - [`workload`]: the workload side: an in-memory key, its CSR, and when to
//!   renew (about half-way through a certificate's life, with jitter).
//! - [`store`]: [`CertStore`], the hot-swappable certificate, key and trust
//!   bundle that every new handshake reads.
//! - [`config`]: rustls server and client configurations for SPIFFE mTLS
//!   (TLS 1.3 by default), built once from a store; [`verify`] and
//!   [`resolve`] hold the rustls verifier and resolver types they use.
//! - [`peer`]: reading a peer's SPIFFE ID and matching it against an
//!   [`ExpectedIdentity`].
//! - [`failure`]: [`HandshakeFailure`], a stable reason for metrics and logs.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use infermesh_certs::*;
//!
//! let td = TrustDomain::new("cluster.local")?;
//! let ca = CertificateAuthority::new_root(&td, &CaOptions::default())?;
//! let web = SpiffeId::workload("cluster.local", "default", "web")?;
//!
//! let key = WorkloadKey::generate()?;
//! let csr = key.csr(&web)?;
//! let issued = ca.sign_csr(csr.pem().as_bytes(), &web, DEFAULT_LEAF_TTL)?;
//!
//! let store = Arc::new(CertStore::new(td.clone(), vec![ca.root_der().clone()])?);
//! store.update_certificate(issued.chain_der().to_vec(), key.private_key_der())?;
//! let server = server_config(&store, &ServerOptions::default())?;
//! let client = client_config(&store, ExpectedIdentity::TrustDomain(td))?;
//! # let _ = (server, client);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod ca;
pub mod config;
pub mod failure;
mod inspect;
pub mod peer;
mod pem_io;
pub mod resolve;
pub mod spiffe;
pub mod store;
pub mod verify;
pub mod workload;

pub use ca::{
    CaError, CaOptions, CertificateAuthority, DEFAULT_CA_VALIDITY, DEFAULT_CLOCK_SKEW,
    DEFAULT_LEAF_TTL, IssuedCertificate, csr_uri_names,
};
pub use config::{ClientOptions, ServerOptions, client_config, client_config_with, server_config};
pub use failure::HandshakeFailure;
pub use peer::{
    CertificateIdentityError, ExpectedIdentity, PeerIdentityError, certificate_identity,
    peer_identity, peer_identity_from_chain,
};
pub use resolve::StoreCertResolver;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use store::{CertStore, CertificateInfo, StoreError};
pub use verify::{AnyServerCertificate, SpiffeClientVerifier, SpiffeServerVerifier};
/// The certificates of a PEM text (every `CERTIFICATE` block, in order),
/// or what is wrong with it.
pub fn parse_certificates(
    pem: &str,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    pem_io::certificates(pem.as_bytes())
}

pub use workload::{
    CertificateRequest, DEFAULT_RENEWAL_JITTER, WorkloadError, WorkloadKey, renewal_time,
};
