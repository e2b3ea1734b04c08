//! What a proxy proves its workload with, before it has a certificate,
//! and what can be decided of it: the [`Credential`] it presents, the
//! [`Workload`] a credential proves, why one is refused ([`Refusal`]), and
//! the [`Authenticator`] trait that checks credentials. Join tokens (the
//! `join_tokens` module, above this one) are one authenticator; a
//! Kubernetes service-account token checked with a TokenReview is to be
//! another.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

/// The workload a credential proves: its namespace and service account,
/// from which its SPIFFE ID `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Its namespace.
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
}

/// What a proxy presents to prove its workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A join token (the contents of its credential file).
    JoinToken(String),
}

/// Why a certificate was refused: the `reason` label of
/// `infermesh_control_plane_certificates_refused_total`, and what the
/// proxy is told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No token the control plane knows.
    #[error("the credential is not a join token this control plane knows")]
    UnknownToken,
    /// A known token past its expiry.
    #[error("join token {id} has expired; ask for a new one")]
    ExpiredToken {
        /// The token's public id.
        id: String,
    },
    /// The request carries no credential.
    #[error("the request carries no credential")]
    NoCredential,
    /// This kind of credential is not accepted here.
    #[error("this control plane does not accept {0} credentials")]
    UnsupportedCredential(&'static str),
    /// The CSR names another identity than the credential proves.
    #[error("the CSR asks for {asked}, but the credential grants {granted}")]
    IdentityNotGranted {
        /// What the CSR asked for.
        asked: String,
        /// What the credential proves.
        granted: String,
    },
    /// The CSR cannot be read or its signature does not verify.
    #[error("the CSR is not valid: {0}")]
    MalformedCsr(String),
    /// The credential's workload makes no valid SPIFFE ID.
    #[error("the credential's workload makes no valid SPIFFE ID: {0}")]
    InvalidWorkload(String),
    /// Signing failed on the control plane's side.
    #[error("the control plane could not sign: {0}")]
    Internal(String),
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UnknownToken => "unknown_token",
            Refusal::ExpiredToken { .. } => "expired_token",
            Refusal::NoCredential => "no_credential",
            Refusal::UnsupportedCredential(_) => "unsupported_credential",
            Refusal::IdentityNotGranted { .. } => "identity_not_granted",
            Refusal::MalformedCsr(_) => "malformed_csr",
            Refusal::InvalidWorkload(_) => "invalid_workload",
            Refusal::Internal(_) => "internal",
        }
    }
}

/// Checks a credential and says which workload it proves. Asynchronous, so
/// that a check which asks another service (Kubernetes' TokenReview) fits.
pub trait Authenticator: Send + Sync {
    /// The workload `credential` proves at `now`, or why none.
    fn authenticate<'a>(
        &'a self,
        credential: &'a Credential,
        now: SystemTime,
    ) -> Pin<Box<dyn Future<Output = Result<Workload, Refusal>> + Send + 'a>>;
}
