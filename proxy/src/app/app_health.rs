//! The app's own HTTP probes, answered on the health port: the injector
//! moves each `httpGet` probe of an app container to
//! `/app-health/<container>/<livez|readyz|startupz>` on port 15020 and
//! hands the original to the sidecar in `INFERMESH_APP_PROBES`
//! ([`infermesh_api::app_probes`]). When kubelet asks for one, the sidecar
//! makes the original request to the app, on `127.0.0.1` (or the probe's
//! `host`), with the probe's headers and within its `timeoutSeconds`, and
//! answers with the app's status: kubelet counts 200 to 399 as success.
//! The app being unreachable, or too slow, is answered with 503.
//!
//! The sidecar's own connections (uid 1337, to 127.0.0.1) are never
//! redirected by `init`'s rules, so the request reaches the app directly.
//! HTTPS probes are made without checking the app's certificate, as
//! kubelet makes them. Redirects are not followed: a 3xx is passed on, as
//! success (kubelet follows a redirect to the same host; an app whose
//! health check redirects to a failing page is the one case told apart).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use infermesh_api::app_probes::{AppProbe, AppProbes, ProbeScheme};
use infermesh_certs::AnyServerCertificate;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::core::body::{ProxyBody, full};

/// The app's probes, by their path on the health port, and the TLS client
/// for the HTTPS ones.
pub(crate) struct AppHealth {
    probes: AppProbes,
    tls: tokio_rustls::TlsConnector,
}

impl AppHealth {
    /// Forwards `probes` (none: every `/app-health/` path is unknown).
    pub(crate) fn new(probes: AppProbes) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCertificate::new(provider)))
            .with_no_client_auth();
        AppHealth {
            probes,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    /// Answers kubelet's request for `path` (under `/app-health/`), passing
    /// on its `User-Agent` and `Accept`.
    pub(crate) async fn answer<B>(&self, path: &str, request: &Request<B>) -> Response<ProxyBody> {
        let Some(probe) = self.probes.get(path) else {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "no app probe at {path}; this sidecar has {}\n",
                    if self.probes.is_empty() {
                        "none (INFERMESH_APP_PROBES is not set)".to_owned()
                    } else {
                        self.probes.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            );
        };
        let timeout = Duration::from_secs(probe.timeout_seconds.into());
        match tokio::time::timeout(timeout, self.probe(probe, request)).await {
            Ok(Ok(status)) => text(status, format!("the app answered {status}\n")),
            Ok(Err(e)) => {
                tracing::debug!(probe = path, error = %e, "app probe failed");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app probe failed: {e}\n"),
                )
            }
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("app probe failed: no answer within {timeout:?}\n"),
            ),
        }
    }

    /// Makes the probe's request and says the status of the answer.
    async fn probe<B>(&self, probe: &AppProbe, from: &Request<B>) -> Result<StatusCode, String> {
        let host = probe.host.as_deref().unwrap_or("127.0.0.1");
        let tcp = TcpStream::connect((host, probe.port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{}: {e}", probe.port))?;
        let _ = tcp.set_nodelay(true);
        let authority = if host.contains(':') {
            format!("[{host}]:{}", probe.port)
        } else {
            format!("{host}:{}", probe.port)
        };
        let mut request = Request::get(probe.path.as_str())
            .header(header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("the probe's request: {e}"))?;
        let headers = request.headers_mut();
        for name in [header::USER_AGENT, header::ACCEPT] {
            if let Some(value) = from.headers().get(&name) {
                headers.insert(name, value.clone());
            }
        }
        // Kubelet closes each probe's connection.
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        for header in &probe.http_headers {
            let name = header::HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|e| format!("header {}: {e}", header.name))?;
            let value = header::HeaderValue::from_str(&header.value)
                .map_err(|e| format!("header {}: {e}", header.name))?;
            headers.insert(name, value);
        }
        match probe.scheme {
            ProbeScheme::Http => send(tcp, request).await,
            ProbeScheme::Https => {
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
                let tls = self
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {authority} failed: {e}"))?;
                send(tls, request).await
            }
        }
    }
}

/// Sends `request` over `stream` (HTTP/1.1) and returns the answer's
/// status; the body is not read.
async fn send<S>(stream: S, request: Request<Empty<Bytes>>) -> Result<StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("the app did not answer: {e}"));
    connection.abort();
    Ok(response?.status())
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use infermesh_api::app_probes::ProbeHeader;
    use tokio::net::TcpListener;

    /// An app answering `status` to every request, and sending back the
    /// request's `x-probe` header in the answer's.
    async fn app(status: u16) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<_>| {
                        let seen = request
                            .headers()
                            .get("x-probe")
                            .map(|v| v.to_str().unwrap().to_owned());
                        async move {
                            let code = match (seen.as_deref(), request.uri().path()) {
                                (Some("yes"), "/health") => status,
                                _ => 400,
                            };
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(code)
                                    .body(http_body_util::Full::new(Bytes::from("ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        port
    }

    fn probe(port: u16) -> AppProbe {
        AppProbe {
            port,
            path: "/health".into(),
            scheme: ProbeScheme::Http,
            http_headers: vec![ProbeHeader {
                name: "X-Probe".into(),
                value: "yes".into(),
            }],
            host: None,
            timeout_seconds: 1,
        }
    }

    async fn ask(health: &AppHealth, path: &str) -> (StatusCode, String) {
        let request = Request::get(path).body(()).unwrap();
        let response = health.answer(path, &request).await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_apps_status_is_the_answer() {
        let healthy = app(200).await;
        let failing = app(500).await;
        let probes = AppProbes::from([
            ("/app-health/a/readyz".to_owned(), probe(healthy)),
            ("/app-health/b/livez".to_owned(), probe(failing)),
        ]);
        let health = AppHealth::new(probes);
        assert_eq!(ask(&health, "/app-health/a/readyz").await.0, StatusCode::OK);
        assert_eq!(
            ask(&health, "/app-health/b/livez").await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let (status, body) = ask(&health, "/app-health/c/livez").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("/app-health/a/readyz"), "{body}");
    }

    #[tokio::test]
    async fn an_https_probe_takes_the_apps_own_certificate() {
        use infermesh_certs::{
            CaOptions, CertificateAuthority, SpiffeId, TrustDomain, WorkloadKey,
        };
        let ca = CertificateAuthority::new_root(
            &TrustDomain::new("app.local").unwrap(),
            &CaOptions::default(),
        )
        .unwrap();
        let identity = SpiffeId::workload("app.local", "default", "app").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign_csr(
                key.csr(&identity).unwrap().der(),
                &identity,
                Duration::from_secs(3600),
            )
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(issued.chain_der().to_vec(), key.private_key_der())
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let Ok(stream) = acceptor.accept(stream).await else {
                    continue;
                };
                let service = hyper::service::service_fn(|_request: Request<_>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        Bytes::from("secure"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        let mut https = probe(port);
        https.scheme = ProbeScheme::Https;
        let health = AppHealth::new(AppProbes::from([("/app-health/a/livez".to_owned(), https)]));
        let (status, body) = ask(&health, "/app-health/a/livez").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    #[tokio::test]
    async fn a_down_app_fails_the_probe() {
        // A port nothing listens on: bound, then released.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let health = AppHealth::new(AppProbes::from([(
            "/app-health/a/livez".to_owned(),
            probe(port),
        )]));
        let (status, body) = ask(&health, "/app-health/a/livez").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("cannot connect"), "{body}");
    }

    #[tokio::test]
    async fn a_silent_app_fails_the_probe_at_its_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and never answers.
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let health = AppHealth::new(AppProbes::from([(
            "/app-health/a/livez".to_owned(),
            probe(port),
        )]));
        let started = std::time::Instant::now();
        let (status, body) = ask(&health, "/app-health/a/livez").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("no answer within 1s"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(3));
        held.abort();
    }
}
