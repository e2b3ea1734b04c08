//! The certificate service's decision: a proxy sends a CSR (its key never
//! leaves it) with a credential; the control plane authenticates the
//! credential, derives the workload's SPIFFE ID from what the credential
//! proves — never from the CSR — and signs for that ID alone. A CSR that
//! asks for another name is refused, not quietly signed for a different
//! one, so a confused or hostile proxy learns at once.
//!
//! Credentials are checked by an [`Authenticator`]
//! ([`crate::credential`]). Every certificate signed and every refusal, by
//! reason, is counted.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use infermesh_certs::{CaError, CertificateAuthority, IssuedCertificate, SpiffeId, csr_uri_names};
use prometheus::{IntCounterVec, Opts, Registry};

use crate::credential::{Authenticator, Credential, Refusal};

/// The certificate service: authenticates, derives the identity, signs.
pub struct Certifier {
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    ttl: Duration,
    signed: IntCounterVec,
    refused: IntCounterVec,
}

impl Certifier {
    /// Signs with `ca` for the workloads `authenticator` admits, for
    /// `ttl`; registers its counters in `registry`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticator: Arc<dyn Authenticator>,
        ttl: Duration,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let signed = IntCounterVec::new(
            Opts::new(
                "infermesh_control_plane_certificates_signed_total",
                "Workload certificates signed, by namespace.",
            ),
            &["namespace"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "infermesh_control_plane_certificates_refused_total",
                "Certificate requests refused, by reason (unknown_token, expired_token, no_credential, unsupported_credential, token_review_refused, token_review_failed, identity_not_granted, malformed_csr, invalid_workload, internal).",
            ),
            &["reason"],
        )?;
        // Every reason counted from 0: a series that appears at 1 is no
        // increase to Prometheus, and the first refusal would not alert.
        for reason in Refusal::REASONS {
            refused.with_label_values(&[reason]);
        }
        registry.register(Box::new(signed.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        Ok(Certifier {
            ca,
            authenticator,
            ttl,
            signed,
            refused,
        })
    }

    /// Signs `csr` (PEM or DER) for the workload `credential` proves.
    pub async fn certify(
        &self,
        credential: &Credential,
        csr: &[u8],
    ) -> Result<IssuedCertificate, Refusal> {
        self.certify_at(credential, csr, SystemTime::now()).await
    }

    /// [`Self::certify`] as if the time were `now`.
    pub async fn certify_at(
        &self,
        credential: &Credential,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedCertificate, Refusal> {
        let decided = self.decide(credential, csr, now).await;
        match &decided {
            Ok(issued) => {
                let namespace = issued.identity().namespace().unwrap_or("");
                self.signed.with_label_values(&[namespace]).inc();
            }
            Err(refusal) => self.refused.with_label_values(&[refusal.reason()]).inc(),
        }
        decided
    }

    /// Counts a refusal decided before a credential could be checked (a
    /// request without one), and returns it.
    pub fn refuse(&self, refusal: Refusal) -> Refusal {
        self.refused.with_label_values(&[refusal.reason()]).inc();
        refusal
    }

    async fn decide(
        &self,
        credential: &Credential,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedCertificate, Refusal> {
        let workload = self.authenticator.authenticate(credential, now).await?;
        let identity = SpiffeId::workload(
            self.ca.trust_domain().as_str(),
            &workload.namespace,
            &workload.service_account,
        )
        .map_err(|e| Refusal::InvalidWorkload(e.to_string()))?;
        let asked = csr_uri_names(csr).map_err(|e| Refusal::MalformedCsr(e.to_string()))?;
        if let Some(other) = asked.iter().find(|name| **name != identity.to_string()) {
            return Err(Refusal::IdentityNotGranted {
                asked: other.clone(),
                granted: identity.to_string(),
            });
        }
        self.ca
            .sign_csr_at(csr, &identity, self.ttl, now)
            .map_err(|e| match e {
                CaError::MalformedCsr(_) | CaError::CsrSignature | CaError::UnsupportedKey(_) => {
                    Refusal::MalformedCsr(e.to_string())
                }
                e => Refusal::Internal(e.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use infermesh_certs::{CaOptions, TrustDomain, WorkloadKey};

    use super::*;
    use crate::credential::Workload;
    use crate::join_tokens::{JoinTokenAuthenticator, JoinTokens};

    struct Setup {
        certifier: Certifier,
        registry: Registry,
        token: String,
        expired: String,
        now: SystemTime,
    }

    fn setup() -> Setup {
        let now = SystemTime::now();
        let domain = TrustDomain::new("mesh.test").unwrap();
        let ca = CertificateAuthority::new_root(&domain, &CaOptions::default()).unwrap();
        let mut tokens = JoinTokens::default();
        let llama = Workload {
            namespace: "models".into(),
            service_account: "llama".into(),
        };
        let token = tokens.create(&llama, Duration::from_secs(3600), now);
        let expired = tokens.create(
            &llama,
            Duration::from_secs(1),
            now - Duration::from_secs(10),
        );
        let registry = Registry::new();
        let certifier = Certifier::new(
            Arc::new(ca),
            Arc::new(JoinTokenAuthenticator::new(tokens)),
            Duration::from_secs(600),
            &registry,
        )
        .unwrap();
        Setup {
            certifier,
            registry,
            token,
            expired,
            now,
        }
    }

    fn csr_for(id: &str) -> Vec<u8> {
        let key = WorkloadKey::generate().unwrap();
        key.csr(&SpiffeId::parse(id).unwrap())
            .unwrap()
            .pem()
            .as_bytes()
            .to_vec()
    }

    fn counted(registry: &Registry, name: &str, label: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| m.get_label().iter().any(|l| l.value() == label))
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    #[tokio::test]
    async fn the_identity_comes_from_the_credential() {
        let s = setup();
        let llama = "spiffe://mesh.test/ns/models/sa/llama";
        let issued = s
            .certifier
            .certify_at(
                &Credential::JoinToken(s.token.clone()),
                &csr_for(llama),
                s.now,
            )
            .await
            .unwrap();
        assert_eq!(issued.identity().to_string(), llama);
        let ttl = issued
            .not_after()
            .duration_since(issued.not_before())
            .unwrap();
        assert!(ttl <= Duration::from_secs(600 + 300), "{ttl:?}");
        assert_eq!(
            counted(
                &s.registry,
                "infermesh_control_plane_certificates_signed_total",
                "models"
            ),
            1
        );
    }

    #[tokio::test]
    async fn every_refusal_has_its_reason_and_is_counted() {
        let s = setup();
        let llama = csr_for("spiffe://mesh.test/ns/models/sa/llama");
        let cases = [
            (
                Credential::JoinToken(s.token.clone()),
                csr_for("spiffe://mesh.test/ns/models/sa/admin"),
                "identity_not_granted",
            ),
            (
                Credential::JoinToken("imjt_0_guess".into()),
                llama.clone(),
                "unknown_token",
            ),
            (
                Credential::JoinToken(s.expired.clone()),
                llama.clone(),
                "expired_token",
            ),
            (
                Credential::JoinToken(s.token.clone()),
                b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .to_vec(),
                "malformed_csr",
            ),
        ];
        for (credential, csr, reason) in cases {
            let refusal = s
                .certifier
                .certify_at(&credential, &csr, s.now)
                .await
                .unwrap_err();
            assert_eq!(refusal.reason(), reason, "{refusal}");
            assert_eq!(
                counted(
                    &s.registry,
                    "infermesh_control_plane_certificates_refused_total",
                    reason
                ),
                1,
                "{reason}"
            );
        }
        let refusal = s
            .certifier
            .certify_at(
                &Credential::JoinToken(s.token.clone()),
                &csr_for("spiffe://other.test/ns/models/sa/llama"),
                s.now,
            )
            .await
            .unwrap_err();
        assert!(
            refusal
                .to_string()
                .contains("spiffe://mesh.test/ns/models/sa/llama"),
            "says what it grants: {refusal}"
        );
    }
}
