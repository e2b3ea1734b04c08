//! Kubernetes ServiceAccount tokens as credentials: the [`Authenticator`]
//! that asks the API server, with an `authentication.k8s.io/v1`
//! TokenReview, whose token a proxy sent, and the decision made of its
//! answer ([`decide`]). The token must be authenticated, be meant for
//! infermesh (its audiences include [`AUDIENCE`], which the injected
//! sidecar's projected token asks for), and belong to a ServiceAccount
//! (`system:serviceaccount:NAMESPACE:NAME`); the workload is that
//! namespace and service account, never anything the proxy says.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use crate::credential::{Authenticator, Credential, Refusal, Workload};

/// The audience an infermesh credential token is made for: the one the
/// injector asks kubelet to project the token with.
pub const AUDIENCE: &str = crate::inject::sidecar::TOKEN_AUDIENCE;

/// How long the API server may take to answer a TokenReview.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// The prefix of a ServiceAccount's user name.
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";

/// Checks Kubernetes tokens with TokenReviews.
pub struct TokenReviewAuthenticator {
    reviews: Api<TokenReview>,
}

impl TokenReviewAuthenticator {
    /// Asks the API server `client` talks to.
    pub fn new(client: kube::Client) -> Self {
        TokenReviewAuthenticator {
            reviews: Api::all(client),
        }
    }

    async fn review(&self, token: &str) -> Result<Workload, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let params = PostParams::default();
        let asked = self.reviews.create(&params, &review);
        match tokio::time::timeout(REVIEW_TIMEOUT, asked).await {
            Ok(Ok(answer)) => decide(answer.status.as_ref()),
            Ok(Err(e)) => Err(Refusal::TokenReviewFailed(e.to_string())),
            Err(_) => Err(Refusal::TokenReviewFailed(format!(
                "the API server did not answer within {REVIEW_TIMEOUT:?}"
            ))),
        }
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(
        &'a self,
        credential: &'a Credential,
        _now: SystemTime,
    ) -> Pin<Box<dyn Future<Output = Result<Workload, Refusal>> + Send + 'a>> {
        match credential {
            Credential::KubernetesToken(token) => Box::pin(self.review(token.trim())),
            other => Box::pin(std::future::ready(Err(Refusal::UnsupportedCredential(
                other.kind(),
            )))),
        }
    }
}

/// The workload a TokenReview's answer proves, or why none.
pub fn decide(status: Option<&TokenReviewStatus>) -> Result<Workload, Refusal> {
    let Some(status) = status else {
        return Err(Refusal::TokenReviewFailed(
            "the API server's answer has no status".into(),
        ));
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("no reason given");
        return Err(Refusal::TokenReviewRefused(format!(
            "the API server did not authenticate it: {why}"
        )));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(Refusal::TokenReviewRefused(format!(
            "it is not meant for {AUDIENCE} (its audiences are {audiences:?}); mount a projected ServiceAccount token with audience {AUDIENCE}"
        )));
    }
    let user = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or("");
    let service_account = user
        .strip_prefix(SERVICE_ACCOUNT_USER)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty());
    match service_account {
        Some((namespace, name)) => Ok(Workload {
            namespace: namespace.to_owned(),
            service_account: name.to_owned(),
        }),
        None => Err(Refusal::TokenReviewRefused(format!(
            "it is {user:?}'s, not a ServiceAccount's (system:serviceaccount:NAMESPACE:NAME)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn answer(authenticated: bool, user: &str, audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_service_account_token_for_infermesh_proves_its_service_account() {
        let status = answer(true, "system:serviceaccount:models:llama", &["infermesh"]);
        assert_eq!(
            decide(Some(&status)),
            Ok(Workload {
                namespace: "models".into(),
                service_account: "llama".into(),
            })
        );
    }

    #[test]
    fn anything_else_is_refused_with_why() {
        let mut unauthenticated = answer(false, "", &[]);
        unauthenticated.error = Some("token has expired".into());
        let cases = [
            (unauthenticated, "token has expired"),
            (
                answer(true, "system:serviceaccount:models:llama", &["api"]),
                "audiences",
            ),
            (answer(true, "jane@example.com", &["infermesh"]), "jane"),
            (
                answer(true, "system:serviceaccount:models", &["infermesh"]),
                "not a ServiceAccount",
            ),
        ];
        for (status, says) in cases {
            let refusal = decide(Some(&status)).unwrap_err();
            assert_eq!(refusal.reason(), "token_review_refused");
            assert!(refusal.to_string().contains(says), "{refusal}");
        }
        assert_eq!(decide(None).unwrap_err().reason(), "token_review_failed");
    }
}
