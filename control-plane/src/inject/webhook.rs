//! The injection webhook's HTTPS port (`--injector-listen`, 15017 in the
//! manifests): `POST /inject` takes an AdmissionReview and answers one
//! ([`crate::inject::review`]), over HTTP/1.1 or HTTP/2.
//!
//! The API server checks the webhook's certificate by DNS name against
//! the `caBundle` of the webhook configuration, the mesh CA's root. So
//! the certificate is signed at start by that CA for the control plane's
//! SPIFFE ID and the Service's names, `NAME.NAMESPACE.svc` and
//! `NAME.NAMESPACE.svc.cluster.local`, and renewed at about half its life.
//! The API server presents no client certificate; none is asked for.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use infermesh_certs::{
    CertStore, CertificateAuthority, IssuedCertificate, SpiffeId, StoreCertResolver, WorkloadKey,
    renewal_time,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::inject::Injector;

/// The path the webhook configuration names.
pub const PATH: &str = "/inject";
/// The lifetime of the webhook's certificate.
pub const CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);
/// The largest AdmissionReview taken: a pod is at most about 1.5 MiB in
/// etcd, and the review carries it once (twice for an UPDATE).
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The DNS names of the webhook's Service `service` in `namespace`, as the
/// API server calls it.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// The webhook's certificate: who it is signed for, by which CA, and the
/// store the TLS port presents it from.
pub struct WebhookCertificate {
    ca: Arc<CertificateAuthority>,
    identity: SpiffeId,
    dns_names: Vec<String>,
    store: Arc<CertStore>,
}

impl WebhookCertificate {
    /// Signs the first certificate for `identity` and `dns_names` with
    /// `ca`; [`Self::keep_renewed`] renews it.
    pub fn sign(
        ca: Arc<CertificateAuthority>,
        identity: SpiffeId,
        dns_names: Vec<String>,
    ) -> anyhow::Result<(Self, IssuedCertificate)> {
        let store = Arc::new(CertStore::new(
            ca.trust_domain().clone(),
            vec![ca.root_der().clone()],
        )?);
        let certificate = WebhookCertificate {
            ca,
            identity,
            dns_names,
            store,
        };
        let issued = certificate.renew()?;
        Ok((certificate, issued))
    }

    /// A new key and certificate, put in the store.
    fn renew(&self) -> anyhow::Result<IssuedCertificate> {
        let key = WorkloadKey::generate()?;
        let csr = key.csr_without_identity()?;
        let issued = self.ca.sign_csr_with_dns_names(
            csr.pem().as_bytes(),
            &self.identity,
            &self.dns_names,
            CERTIFICATE_TTL,
        )?;
        self.store
            .update_certificate(issued.chain_der().to_vec(), key.private_key_der())?;
        Ok(issued)
    }

    /// The TLS side of the port: TLS 1.3 or 1.2 (the API server's Go TLS
    /// may be held to 1.2 in FIPS builds), ALPN `h2` and `http/1.1`, no
    /// client certificate, the store's current certificate at each
    /// handshake.
    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(StoreCertResolver::new(self.store.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Renews the certificate at about half its life, for as long as the
    /// control plane runs; a failed renewal is retried every 30 s while
    /// the current certificate serves.
    pub async fn keep_renewed(self, mut current: IssuedCertificate) {
        loop {
            let at = renewal_time(current.not_before(), current.not_after(), 0.1);
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            match self.renew() {
                Ok(renewed) => current = renewed,
                Err(e) => {
                    eprintln!(
                        "infermesh-control-plane: cannot renew the injection webhook's certificate: {e:#}"
                    );
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        }
    }
}

/// Serves the webhook on `listener` until the process ends.
pub async fn serve(listener: TcpListener, tls: TlsAcceptor, injector: Arc<Injector>) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("infermesh-control-plane: injector: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tls, injector) = (tls.clone(), injector.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    eprintln!(
                        "infermesh-control-plane: injector: TLS handshake with {client} failed: {e}"
                    );
                    return;
                }
                Err(_) => {
                    eprintln!(
                        "infermesh-control-plane: injector: TLS handshake with {client} timed out"
                    );
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let injector = injector.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, &injector).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request to the webhook.
async fn answer(request: Request<Incoming>, injector: &Injector) -> Response<Full<Bytes>> {
    if request.uri().path() != PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found; the injection webhook is POST {PATH}\n"),
        );
    }
    if request.method() != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("use POST {PATH} with an AdmissionReview\n"),
        );
    }
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the AdmissionReview (at most {MAX_BODY_BYTES} bytes): {e}\n"),
            );
        }
    };
    match injector.review(&body) {
        Ok(review) => {
            let mut response = Response::new(Full::new(Bytes::from(
                serde_json::to_vec(&review).expect("JSON values serialize"),
            )));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            eprintln!("infermesh-control-plane: injector: request refused: {e}");
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
