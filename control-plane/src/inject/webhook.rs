//! The injection webhook's HTTPS port (`--injector-listen`, 15017 in the
//! manifests): `POST /inject` takes an AdmissionReview and answers one
//! ([`crate::inject::review`]), over HTTP/1.1 or HTTP/2.
//!
//! The API server checks the webhook's certificate by DNS name against
//! the `caBundle` of the webhook configuration, the mesh CA's root: the
//! port presents the control plane's own certificate, which then also
//! carries the Service's names, `NAME.NAMESPACE.svc` and
//! `NAME.NAMESPACE.svc.cluster.local` ([`dns_names`]; the server signs and
//! renews it). The API server presents no client certificate; none is
//! asked for.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use infermesh_certs::{CertStore, StoreCertResolver};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::inject::Injector;

/// The path the webhook configuration names.
pub const PATH: &str = "/inject";
/// The largest AdmissionReview taken: a pod is at most about 1.5 MiB in
/// etcd, and the review carries it once (twice for an UPDATE).
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The DNS names of the webhook's Service `service` in `namespace`, as the
/// API server calls it.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// The TLS side of the port: TLS 1.3 or 1.2 (the API server's Go TLS may
/// be held to 1.2 in FIPS builds), ALPN `h2` and `http/1.1`, no client
/// certificate, `store`'s current certificate at each handshake.
pub fn acceptor(store: Arc<CertStore>) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(StoreCertResolver::new(store)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves the webhook on `listener` until the process ends.
pub async fn serve(listener: TcpListener, tls: TlsAcceptor, injector: Arc<Injector>) {
    crate::accept::serve(listener, tls, "injector", move |stream, _| {
        let injector = injector.clone();
        async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let injector = injector.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, &injector).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await
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
