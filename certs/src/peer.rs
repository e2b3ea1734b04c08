//! Peer identities: reading the SPIFFE ID out of a certificate or a finished
//! TLS connection, and matching it against the identity a caller expects.
//!
//! A SPIFFE certificate (X509-SVID) carries its ID as exactly one URI SAN;
//! a certificate with none, several, or an invalid one has no identity.

use std::fmt;

use rustls::CommonState;
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a certificate carries no usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateIdentityError {
    /// The certificate is not valid DER X.509.
    #[error("the certificate cannot be parsed ({0}); it must be a DER X.509 certificate")]
    Unparsable(String),
    /// No URI SAN at all.
    #[error(
        "the certificate has no URI SAN; a SPIFFE certificate carries its ID as one `spiffe://` URI SAN, issue it from the mesh CA"
    )]
    NoUriSan,
    /// More than one URI SAN.
    #[error(
        "the certificate has {0} URI SANs; a SPIFFE certificate carries exactly one, issue it from the mesh CA"
    )]
    SeveralUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("the certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    Invalid(#[from] SpiffeIdError),
}

/// Reads the SPIFFE ID from a DER certificate's single URI SAN.
pub fn certificate_identity(
    cert: &CertificateDer<'_>,
) -> Result<SpiffeId, CertificateIdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| CertificateIdentityError::Unparsable(e.to_string()))?;
    identity_of_parsed(&parsed)
}

pub(crate) fn identity_of_parsed(
    cert: &X509Certificate<'_>,
) -> Result<SpiffeId, CertificateIdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertificateIdentityError::Unparsable(e.to_string()))?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let first = uris.next().ok_or(CertificateIdentityError::NoUriSan)?;
    let others = uris.count();
    if others > 0 {
        return Err(CertificateIdentityError::SeveralUriSans(others + 1));
    }
    Ok(SpiffeId::parse(first)?)
}

/// The SPIFFE ID of the peer of a connection whose handshake is complete
/// (read from the leaf of the peer's certificate chain), or `None` when the
/// peer presented no certificate or one without a valid SPIFFE ID.
///
/// Takes [`CommonState`], so both `&rustls::ServerConnection` and
/// `&rustls::ClientConnection` can be passed as they are.
pub fn peer_identity(connection: &CommonState) -> Option<SpiffeId> {
    peer_identity_from_chain(connection.peer_certificates()?)
}

/// Like [`peer_identity`], from the peer's certificate chain (leaf first).
pub fn peer_identity_from_chain(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    certificate_identity(chain.first()?).ok()
}

/// Which peer SPIFFE IDs a connection accepts.
///
/// The peer's chain must first verify against the local trust bundle, and its
/// ID must belong to the local trust domain; this then narrows it further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedIdentity {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any of these IDs (for example the service accounts of two versions of
    /// a model server during a rollout).
    OneOf(Vec<SpiffeId>),
    /// Any `/ns/<namespace>/sa/<sa>` ID in this namespace of this trust domain.
    Namespace {
        /// The trust domain the peer must belong to.
        trust_domain: TrustDomain,
        /// The namespace the peer must run in.
        namespace: String,
    },
    /// Any ID in this trust domain.
    TrustDomain(TrustDomain),
}

impl ExpectedIdentity {
    /// Whether `id` is acceptable.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(expected) => expected == id,
            Self::OneOf(expected) => expected.contains(id),
            Self::Namespace {
                trust_domain,
                namespace,
            } => id.is_member_of(trust_domain) && id.namespace() == Some(namespace.as_str()),
            Self::TrustDomain(trust_domain) => id.is_member_of(trust_domain),
        }
    }
}

impl From<SpiffeId> for ExpectedIdentity {
    fn from(id: SpiffeId) -> Self {
        Self::Exact(id)
    }
}

impl fmt::Display for ExpectedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::OneOf(ids) => {
                f.write_str("one of [")?;
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{id}")?;
                }
                f.write_str("]")
            }
            Self::Namespace {
                trust_domain,
                namespace,
            } => write!(f, "spiffe://{trust_domain}/ns/{namespace}/sa/*"),
            Self::TrustDomain(trust_domain) => write!(f, "spiffe://{trust_domain}/*"),
        }
    }
}

/// The SPIFFE check a verifier failed: carried inside the rustls handshake
/// error (as `CertificateError::Other`) so logs name both sides, and
/// recognised by [`crate::HandshakeFailure`] as `bad_identity`.
///
/// Its `Debug` output is its message, because rustls renders the inner error
/// of `CertificateError::Other` with `Debug`.
#[derive(Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PeerIdentityError {
    /// The peer's leaf has no usable SPIFFE ID.
    #[error("peer certificate has no SPIFFE ID, expected {expected}: {reason}")]
    Missing {
        /// What was expected.
        expected: String,
        /// Why the certificate has no identity.
        reason: CertificateIdentityError,
    },
    /// The peer's ID is outside the local trust domain.
    #[error(
        "peer presented SPIFFE ID {presented} from another trust domain, expected {expected}; only peers of trust domain `{trust_domain}` are accepted"
    )]
    ForeignTrustDomain {
        /// What was expected.
        expected: String,
        /// What the peer presented.
        presented: SpiffeId,
        /// The local trust domain.
        trust_domain: TrustDomain,
    },
    /// The peer's ID is valid but not the expected one.
    #[error(
        "peer presented SPIFFE ID {presented}, expected {expected}; check which service the connection reached and the expected identity"
    )]
    Mismatch {
        /// What was expected.
        expected: String,
        /// What the peer presented.
        presented: SpiffeId,
    },
}

impl fmt::Debug for PeerIdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
