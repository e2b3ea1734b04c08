//! The workload side of issuance: a private key made and kept in memory, the
//! CSR sent to the CA, and when to ask for the next certificate.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::spiffe::SpiffeId;

/// Default renewal jitter: renew at a random point in 45–55 % of the lifetime.
pub const DEFAULT_RENEWAL_JITTER: f64 = 0.05;

/// Why a key or CSR could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// Key generation failed.
    #[error("cannot generate an ECDSA P-256 key: {0}; check that the system random source works")]
    KeyGeneration(rcgen::Error),
    /// CSR encoding or signing failed.
    #[error("cannot build the CSR: {0}; this is a bug, please report it")]
    Csr(rcgen::Error),
}

/// A workload's ECDSA P-256 private key, generated in memory. Only the CSR
/// (holding the public key) leaves the process.
pub struct WorkloadKey {
    key: KeyPair,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("algorithm", &"ECDSA P-256")
            .field("key", &"[elided]")
            .finish()
    }
}

/// A PKCS#10 certificate signing request, in DER and PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRequest {
    der: CertificateSigningRequestDer<'static>,
    pem: String,
}

impl CertificateRequest {
    /// The request as DER.
    pub fn der(&self) -> &CertificateSigningRequestDer<'static> {
        &self.der
    }

    /// The request as a PEM `CERTIFICATE REQUEST` block.
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

impl WorkloadKey {
    /// Generates a new ECDSA P-256 key.
    pub fn generate() -> Result<Self, WorkloadError> {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map(|key| Self { key })
            .map_err(WorkloadError::KeyGeneration)
    }

    /// A CSR signed by this key. It carries `identity` as a URI SAN, only as
    /// a hint for humans and logs: the CA takes the identity from the caller's
    /// authenticated credential and uses nothing but the public key.
    pub fn csr(&self, identity: &SpiffeId) -> Result<CertificateRequest, WorkloadError> {
        let uri =
            rcgen::string::Ia5String::try_from(identity.to_string()).map_err(WorkloadError::Csr)?;
        self.request(vec![SanType::URI(uri)])
    }

    /// A CSR that names no identity, for a workload that does not know
    /// its own yet: the CA gives it the one its credential proves.
    pub fn csr_without_identity(&self) -> Result<CertificateRequest, WorkloadError> {
        self.request(Vec::new())
    }

    fn request(
        &self,
        subject_alt_names: Vec<SanType>,
    ) -> Result<CertificateRequest, WorkloadError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = subject_alt_names;
        let csr = params
            .serialize_request(&self.key)
            .map_err(WorkloadError::Csr)?;
        let pem = csr.pem().map_err(WorkloadError::Csr)?;
        Ok(CertificateRequest {
            der: csr.der().clone(),
            pem,
        })
    }

    /// The private key as PKCS#8 DER, to hand to [`crate::CertStore`].
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The private key as a PKCS#8 PEM block, for tools that must write it to
    /// a file (such as `infermesh-control-plane ca issue`). Workloads should
    /// keep the key in memory instead.
    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }
}

/// When to renew a certificate valid over `[not_before, not_after]`: at a
/// uniformly random point in `(50 % ± jitter)` of its lifetime, so a fleet
/// issued at the same moment does not renew in the same second.
///
/// `jitter` is a fraction of the lifetime, clamped to `0.0..=0.5`
/// ([`DEFAULT_RENEWAL_JITTER`] gives 45–55 %). The result is never before
/// `not_before` (and is `not_before` for an empty or inverted period).
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 0.5)
    };
    let fraction = 0.5 + rand::random_range(-jitter..=jitter);
    renewal_time_at_fraction(not_before, not_after, fraction)
}

fn renewal_time_at_fraction(
    not_before: SystemTime,
    not_after: SystemTime,
    fraction: f64,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + lifetime.mul_f64(fraction.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_is_applied_to_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let end = start + Duration::from_secs(100);
        assert_eq!(
            renewal_time_at_fraction(start, end, 0.5),
            start + Duration::from_secs(50)
        );
        assert_eq!(renewal_time_at_fraction(end, start, 0.5), end);
        assert_eq!(renewal_time_at_fraction(start, end, 7.0), end);
    }
}
