//! PEM encoding and decoding of certificates, keys and CSRs (DER inside).
//!
//! Decoding uses `rustls-pki-types`' PEM reader; encoding writes standard
//! 64-column blocks with `\n` line endings.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};

const LF: pem::EncodeConfig = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);

/// All `CERTIFICATE` blocks in `pem`, in order (other blocks are skipped).
pub(crate) fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The first private key block (PKCS#8, SEC1 or PKCS#1) in `pem`, if any.
pub(crate) fn private_key(pem: &[u8]) -> Result<Option<PrivateKeyDer<'static>>, String> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(key) => Ok(Some(key)),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// A CSR given as PEM (`CERTIFICATE REQUEST`) or as raw DER.
pub(crate) fn csr(input: &[u8]) -> Result<CertificateSigningRequestDer<'static>, String> {
    let trimmed = input.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(trimmed).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "the PEM input holds no `CERTIFICATE REQUEST` block".to_owned()
            }
            other => other.to_string(),
        })
    } else {
        Ok(CertificateSigningRequestDer::from(input.to_vec()))
    }
}

/// One DER item as a PEM block with the given tag (`CERTIFICATE`, ...).
pub(crate) fn encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new(tag, der), LF)
}

/// Certificates as consecutive `CERTIFICATE` blocks.
pub(crate) fn encode_certificates(chain: &[CertificateDer<'_>]) -> String {
    chain.iter().map(|der| encode("CERTIFICATE", der)).collect()
}
