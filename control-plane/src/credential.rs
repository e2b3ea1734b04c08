//! What a proxy proves its workload with, before it has a certificate,
//! and what can be decided of it: the [`Credential`] it presents, the
//! [`Workload`] a credential proves, why one is refused ([`Refusal`]), and
//! the [`Authenticator`] trait that checks credentials. Join tokens (the
//! `join_tokens` module, above this one) are one authenticator; a
//! Kubernetes service-account token checked with a TokenReview
//! (`kubernetes::token_review`) is another; [`ByKind`] hands each
//! credential to the one for its kind.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
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
    /// A Kubernetes ServiceAccount token (a JWT the API server signed),
    /// checked with a TokenReview.
    KubernetesToken(String),
}

impl Credential {
    /// What kind of credential it is, as refusals name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::JoinToken(_) => "join token",
            Credential::KubernetesToken(_) => "Kubernetes ServiceAccount token",
        }
    }
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
    /// The Kubernetes API server did not vouch for the token: it is not
    /// authenticated, is not a ServiceAccount's, or is not meant for
    /// infermesh (its audiences lack `infermesh`).
    #[error("the Kubernetes token was refused: {0}")]
    TokenReviewRefused(String),
    /// The Kubernetes API server could not be asked about the token (it is
    /// unreachable, or refused the TokenReview itself); the proxy retries.
    #[error("the Kubernetes token could not be checked (TokenReview failed): {0}")]
    TokenReviewFailed(String),
    /// Signing failed on the control plane's side.
    #[error("the control plane could not sign: {0}")]
    Internal(String),
}

impl Refusal {
    /// Every value of [`Refusal::reason`].
    pub const REASONS: [&'static str; 10] = [
        "unknown_token",
        "expired_token",
        "no_credential",
        "unsupported_credential",
        "identity_not_granted",
        "malformed_csr",
        "invalid_workload",
        "token_review_refused",
        "token_review_failed",
        "internal",
    ];

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
            Refusal::TokenReviewRefused(_) => "token_review_refused",
            Refusal::TokenReviewFailed(_) => "token_review_failed",
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

/// One authenticator per kind of credential, each optional: join tokens
/// (`serve --tokens`), Kubernetes tokens (`serve --kubernetes`), or both.
/// A credential of a kind no authenticator is given for is refused as
/// [`Refusal::UnsupportedCredential`].
#[derive(Clone, Default)]
pub struct ByKind {
    /// Checks join tokens.
    pub join_tokens: Option<Arc<dyn Authenticator>>,
    /// Checks Kubernetes ServiceAccount tokens.
    pub kubernetes: Option<Arc<dyn Authenticator>>,
}

impl Authenticator for ByKind {
    fn authenticate<'a>(
        &'a self,
        credential: &'a Credential,
        now: SystemTime,
    ) -> Pin<Box<dyn Future<Output = Result<Workload, Refusal>> + Send + 'a>> {
        let authenticator = match credential {
            Credential::JoinToken(_) => &self.join_tokens,
            Credential::KubernetesToken(_) => &self.kubernetes,
        };
        match authenticator {
            Some(authenticator) => authenticator.authenticate(credential, now),
            None => Box::pin(std::future::ready(Err(Refusal::UnsupportedCredential(
                credential.kind(),
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_lists_the_reason_of_every_refusal() {
        let refusals = [
            Refusal::UnknownToken,
            Refusal::ExpiredToken { id: "t".into() },
            Refusal::NoCredential,
            Refusal::UnsupportedCredential("x"),
            Refusal::IdentityNotGranted {
                asked: "a".into(),
                granted: "b".into(),
            },
            Refusal::MalformedCsr("x".into()),
            Refusal::InvalidWorkload("x".into()),
            Refusal::TokenReviewRefused("x".into()),
            Refusal::TokenReviewFailed("x".into()),
            Refusal::Internal("x".into()),
        ];
        let reasons: Vec<&str> = refusals.iter().map(Refusal::reason).collect();
        assert_eq!(reasons, Refusal::REASONS);
    }

    /// Grants its workload to any credential (join tokens and TokenReview
    /// have their own tests).
    struct Grants(Workload);

    impl Authenticator for Grants {
        fn authenticate<'a>(
            &'a self,
            _: &'a Credential,
            _: SystemTime,
        ) -> Pin<Box<dyn Future<Output = Result<Workload, Refusal>> + Send + 'a>> {
            Box::pin(std::future::ready(Ok(self.0.clone())))
        }
    }

    #[tokio::test]
    async fn each_kind_goes_to_its_authenticator_and_a_missing_one_refuses() {
        let now = SystemTime::now();
        let llama = Workload {
            namespace: "models".into(),
            service_account: "llama".into(),
        };
        let join_only = ByKind {
            join_tokens: Some(Arc::new(Grants(llama.clone()))),
            kubernetes: None,
        };
        assert_eq!(
            join_only
                .authenticate(&Credential::JoinToken("jt.secret".into()), now)
                .await,
            Ok(llama)
        );
        let refusal = join_only
            .authenticate(&Credential::KubernetesToken("a.b.c".into()), now)
            .await
            .unwrap_err();
        assert_eq!(refusal.reason(), "unsupported_credential");
        assert!(refusal.to_string().contains("Kubernetes"), "{refusal}");
    }
}
