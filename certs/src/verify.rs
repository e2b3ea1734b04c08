//! Verifying peers: the chain against the store's current trust bundle
//! (through rustls' WebPKI verification), then the leaf's SPIFFE ID against
//! the local trust domain and the expected identity.
//!
//! [`AnyServerCertificate`] is the one verifier that checks no chain, for
//! the places where the peer is not in the mesh and checking it is not the
//! point (an app's HTTPS probe, `infermesh-bench --insecure`).
//!
//! DNS names play no part: [`SpiffeServerVerifier`] ignores the
//! `ServerName` the client connects with, because the SPIFFE check replaces
//! the name check. Callers may pass any name (the peer's host name is a good
//! choice, since it is sent as SNI).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::peer::{ExpectedIdentity, PeerIdentityError, certificate_identity};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::CertStore;

/// Client-side verifier of a server's certificate: chain against the store's
/// current bundle (serverAuth), then SPIFFE ID against `expected`.
#[derive(Debug, Clone)]
pub struct SpiffeServerVerifier {
    store: Arc<CertStore>,
    expected: ExpectedIdentity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// Verifies servers against `store`'s bundle, accepting only `expected`.
    pub fn new(store: Arc<CertStore>, expected: ExpectedIdentity) -> Self {
        let algorithms = store.provider().signature_verification_algorithms;
        Self {
            store,
            expected,
            algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.store.current_bundle();
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &bundle.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        check_identity(end_entity, self.store.trust_domain(), Some(&self.expected))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server-side verifier of client certificates: a certificate is required,
/// its chain must verify against the store's current bundle (clientAuth),
/// and its SPIFFE ID must be in the store's trust domain and, if set, match
/// `allowed`.
///
/// It sends no CA names in the CertificateRequest (the bundle can change
/// between handshakes); infermesh clients present their one certificate
/// regardless.
#[derive(Debug, Clone)]
pub struct SpiffeClientVerifier {
    store: Arc<CertStore>,
    allowed: Option<ExpectedIdentity>,
    algorithms: WebPkiSupportedAlgorithms,
    optional: bool,
}

impl SpiffeClientVerifier {
    /// Verifies clients against `store`'s bundle; `allowed` narrows which
    /// IDs are accepted (`None`: any ID of the store's trust domain).
    pub fn new(store: Arc<CertStore>, allowed: Option<ExpectedIdentity>) -> Self {
        let algorithms = store.provider().signature_verification_algorithms;
        Self {
            store,
            allowed,
            algorithms,
            optional: false,
        }
    }

    /// Also accepts clients that present no certificate (a certificate
    /// that is presented is still verified): for a server whose callers
    /// may not have one yet, such as the control plane's certificate
    /// service. The server then tells them apart by `peer_identity`.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.store.current_bundle();
        bundle
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, self.store.trust_domain(), self.allowed.as_ref())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The SPIFFE part of verification, after the chain has been verified.
fn check_identity(
    end_entity: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
    expected: Option<&ExpectedIdentity>,
) -> Result<SpiffeId, rustls::Error> {
    let expected_text = || match expected {
        Some(expected) => expected.to_string(),
        None => ExpectedIdentity::TrustDomain(trust_domain.clone()).to_string(),
    };
    let presented = certificate_identity(end_entity).map_err(|reason| {
        rejected(PeerIdentityError::Missing {
            expected: expected_text(),
            reason,
        })
    })?;
    if !presented.is_member_of(trust_domain) {
        return Err(rejected(PeerIdentityError::ForeignTrustDomain {
            expected: expected_text(),
            presented,
            trust_domain: trust_domain.clone(),
        }));
    }
    if let Some(expected) = expected
        && !expected.matches(&presented)
    {
        return Err(rejected(PeerIdentityError::Mismatch {
            expected: expected_text(),
            presented,
        }));
    }
    Ok(presented)
}

fn rejected(error: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// Takes any server certificate, as kubelet's HTTPS probes and `curl
/// --insecure` do, while still checking the handshake's signatures with
/// the key it presents. Never for traffic between proxies: it proves
/// nothing about who answers.
#[derive(Debug)]
pub struct AnyServerCertificate(Arc<rustls::crypto::CryptoProvider>);

impl AnyServerCertificate {
    /// Checks handshake signatures with `provider`'s algorithms.
    pub fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        AnyServerCertificate(provider)
    }
}

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
