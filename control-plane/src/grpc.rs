//! The control plane's gRPC services, over the types `infermesh-proto`
//! generates: the certificate service, which hands each request to
//! [`Certifier`] and turns a refusal into the gRPC status a client can act
//! on, with the refusal's reason in the `x-infermesh-refusal` metadata.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use infermesh_proto::v1::certificate_service_server::{
    CertificateService, CertificateServiceServer,
};
use infermesh_proto::v1::{SignRequest, SignResponse, sign_request};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::certify::Certifier;
use crate::credential::{Credential, Refusal};

/// The metadata key that carries a refusal's reason.
pub const REFUSAL_METADATA: &str = "x-infermesh-refusal";

/// The certificate service.
pub struct Certificates {
    certifier: Arc<Certifier>,
    trust_bundle_pem: String,
}

impl Certificates {
    /// Signs with `certifier`; answers carry `trust_bundle_pem`, the roots
    /// a proxy is to trust.
    pub fn new(certifier: Arc<Certifier>, trust_bundle_pem: String) -> Self {
        Certificates {
            certifier,
            trust_bundle_pem,
        }
    }

    /// The tonic service, to add to a server.
    pub fn into_service(self) -> CertificateServiceServer<Self> {
        CertificateServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl CertificateService for Certificates {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let request = request.into_inner();
        let credential = match request.credential {
            Some(sign_request::Credential::JoinToken(token)) => Credential::JoinToken(token),
            Some(sign_request::Credential::KubernetesToken(token)) => {
                Credential::KubernetesToken(token)
            }
            None => {
                return Err(refused(&self.certifier.refuse(Refusal::NoCredential)));
            }
        };
        let issued = self
            .certifier
            .certify(&credential, request.csr_pem.as_bytes())
            .await
            .map_err(|refusal| refused(&refusal))?;
        let unix = |t: std::time::SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        };
        Ok(Response::new(SignResponse {
            identity: issued.identity().to_string(),
            certificate_chain_pem: issued.chain_pem().to_owned(),
            trust_bundle_pem: self.trust_bundle_pem.clone(),
            not_before_unix: unix(issued.not_before()),
            not_after_unix: unix(issued.not_after()),
        }))
    }
}

/// The status of a refusal: what the client should do about it, with the
/// reason in the metadata.
fn refused(refusal: &Refusal) -> Status {
    let code = match refusal {
        Refusal::UnknownToken
        | Refusal::ExpiredToken { .. }
        | Refusal::NoCredential
        | Refusal::UnsupportedCredential(_)
        | Refusal::TokenReviewRefused(_) => Code::Unauthenticated,
        Refusal::TokenReviewFailed(_) => Code::Unavailable,
        Refusal::IdentityNotGranted { .. } => Code::PermissionDenied,
        Refusal::MalformedCsr(_) | Refusal::InvalidWorkload(_) => Code::InvalidArgument,
        Refusal::Internal(_) => Code::Internal,
    };
    let mut status = Status::new(code, refusal.to_string());
    status.metadata_mut().insert(
        REFUSAL_METADATA,
        MetadataValue::from_static(refusal.reason()),
    );
    status
}
