//! The two small HTTP servers operators and their tools talk to.
//!
//! - **health** (default `0.0.0.0:15020`): `/live`, `/ready` and `/metrics`,
//!   for the kubelet and Prometheus, and `/app-health/...`, the app's own
//!   probes moved there by the injector ([`crate::app::app_health`]).
//! - **admin** (default `127.0.0.1:15000`, local only): `/config`,
//!   `/endpoints`, `POST /drain` and `/log-level`.
//!
//! A browser on the operator's machine can reach a loopback port too: a
//! page of any site could `POST /drain` with a simple form. So the admin
//! server refuses (403) every state-changing request a browser makes
//! (it carries `Origin` or `Sec-Fetch-Site`) and every one addressed to a
//! host name rather than an IP address or `localhost` (the shape of a DNS
//! rebinding attack). Tools (`curl`, scripts, `kubectl port-forward`) send
//! neither.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::app::app_health::AppHealth;
use crate::app::lifecycle::Lifecycle;
use crate::app::logging::LogControl;
use crate::core::body::{ProxyBody, full};
use crate::core::metrics::Registry;
use crate::server::shared::Shared;
use crate::snapshot::router::request_host;

/// What the operator servers read and act on.
pub(crate) struct Admin {
    /// The proxy's shared state: the serving snapshot and the metrics.
    pub shared: Arc<Shared>,
    /// Readiness and drain.
    pub lifecycle: Arc<Lifecycle>,
    /// Every metric family, for `/metrics`.
    pub registry: Registry,
    /// The log filter.
    pub log: Arc<LogControl>,
    /// The config file being served; none when the control plane pushes
    /// the config.
    pub config_file: Option<PathBuf>,
    /// The app's probes, answered under `/app-health/`.
    pub app_health: AppHealth,
}

type Handler =
    fn(Arc<Admin>, Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// Binds an operator server's socket.
pub(crate) async fn bind(what: &str, address: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address} for the {what} server: {e}"))?;
    tracing::info!(server = what, address = %listener.local_addr()?, "listening");
    Ok(listener)
}

/// Serves `/live`, `/ready` and `/metrics` on `listener`.
pub(crate) fn spawn_health(listener: TcpListener, admin: Arc<Admin>) {
    tokio::spawn(serve(listener, admin, |admin, request| {
        Box::pin(health(admin, request))
    }));
}

/// Serves the admin endpoints on `listener`.
pub(crate) fn spawn_admin(listener: TcpListener, admin: Arc<Admin>) {
    tokio::spawn(serve(listener, admin, |admin, request| {
        Box::pin(admin_endpoints(admin, request))
    }));
}

async fn serve(listener: TcpListener, admin: Arc<Admin>, handler: Handler) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = handler(admin.clone(), request);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn health(admin: Arc<Admin>, request: Request<Incoming>) -> Response<ProxyBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match request.uri().path() {
        path if path.starts_with(infermesh_api::app_probes::PATH_PREFIX) => {
            admin.app_health.answer(path, &request).await
        }
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            let lifecycle = &admin.lifecycle;
            if lifecycle.is_ready() && admin.shared.is_out_of_descriptors() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "out of file descriptors: new connections are being refused\n",
                )
            } else if lifecycle.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if lifecycle.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
            }
        }
        "/metrics" => {
            let snapshot = admin.shared.snapshot.load();
            let backend_metrics = &admin.shared.metrics.snapshot.backend;
            backend_metrics.count_endpoint_states(snapshot.backends());
            let mut response = Response::new(full(admin.registry.encode()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready or /metrics\n",
        ),
    }
}

async fn admin_endpoints(admin: Arc<Admin>, request: Request<Incoming>) -> Response<ProxyBody> {
    let method = request.method().clone();
    if matches!(method, Method::POST | Method::PUT)
        && let Err(why) = not_from_a_browser(&request)
    {
        tracing::warn!(path = request.uri().path(), why, "admin request refused");
        return text(StatusCode::FORBIDDEN, why);
    }
    match (request.uri().path(), method) {
        ("/", Method::GET) => text(
            StatusCode::OK,
            "infermesh-proxy admin\n  GET  /config      the running config and its version\n  GET  /endpoints   every backend endpoint and its state\n  POST /drain       stop accepting, finish in-flight requests\n  GET  /log-level   the log filter\n  POST /log-level?filter=DIRECTIVES   change it\n",
        ),
        ("/config", Method::GET) => config(&admin),
        ("/endpoints", Method::GET) => endpoints(&admin),
        ("/drain", Method::POST) => {
            let lifecycle = &admin.lifecycle;
            if lifecycle.begin_drain() {
                tracing::info!("drain requested through the admin endpoint");
                lifecycle.request_drain();
            }
            json_response(StatusCode::ACCEPTED, &json!({ "draining": true }))
        }
        ("/log-level", Method::GET) => {
            json_response(StatusCode::OK, &json!({ "filter": admin.log.filter() }))
        }
        ("/log-level", Method::POST | Method::PUT) => set_log_level(&admin, request).await,
        ("/" | "/config" | "/endpoints" | "/drain" | "/log-level", _) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed here; see GET /\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; see GET / for the admin endpoints\n",
        ),
    }
}

/// Whether a state-changing admin request comes from a tool rather than a
/// web page: no `Origin` or `Sec-Fetch-Site` (browsers send them), and a
/// `Host` that is an IP address or `localhost`, not a name an attacker's
/// DNS could point at this machine.
fn not_from_a_browser<B>(request: &Request<B>) -> Result<(), &'static str> {
    let headers = request.headers();
    if headers.contains_key(header::ORIGIN) || headers.contains_key("sec-fetch-site") {
        return Err(
            "refused: admin requests that change state are not taken from web pages (the request carries Origin); use curl or a script\n",
        );
    }
    let name = request_host(request).unwrap_or_default();
    let name = name
        .strip_prefix('[')
        .and_then(|literal| literal.strip_suffix(']'))
        .unwrap_or(name);
    if !(name.is_empty()
        || name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok())
    {
        return Err(
            "refused: admin requests that change state must be addressed to an IP address or localhost, not a host name\n",
        );
    }
    Ok(())
}

fn config(admin: &Admin) -> Response<ProxyBody> {
    let snapshot = admin.shared.snapshot.load();
    json_response(
        StatusCode::OK,
        &json!({
            "version": snapshot.version,
            "appliedAt": humantime::format_rfc3339_seconds(snapshot.applied_at).to_string(),
            "file": admin.config_file.as_ref().map(|f| f.display().to_string()),
            "documents": &*snapshot.config,
        }),
    )
}

fn endpoints(admin: &Admin) -> Response<ProxyBody> {
    let snapshot = admin.shared.snapshot.load();
    let now = tokio::time::Instant::now();
    let backends: Vec<_> = snapshot
        .backends()
        .map(|backend| {
            let set = backend.endpoints();
            let endpoints: Vec<_> = set
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "address": e.addr.to_string(),
                        "hostname": e.hostname.as_deref(),
                        "weight": e.weight,
                        "state": e.health.state(now).as_str(),
                        "ejectedForSeconds": e.health.ejected_for(now).map(|d| d.as_secs_f64()),
                        "consecutiveFailures": e.health.consecutive_failures(),
                        "latencyEwmaMs": e.latency.get(now).as_secs_f64() * 1000.0,
                        "inFlight": e.stats.in_flight.load(Ordering::Relaxed),
                        "requests": e.stats.requests.load(Ordering::Relaxed),
                        "failures": e.stats.failures.load(Ordering::Relaxed),
                        "connections": { "open": e.connections.open(), "idle": e.connections.idle() },
                    })
                })
                .collect();
            json!({
                "name": &*backend.name,
                "protocol": backend.spec.protocol,
                "loadBalancer": backend.spec.load_balancer.policy,
                "requestsInFlight": backend.breaker.requests(),
                "ejected": set.endpoints.iter().filter(|e| e.health.is_ejected()).count(),
                "endpoints": endpoints,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({ "version": snapshot.version, "backends": backends }),
    )
}

async fn set_log_level(admin: &Admin, request: Request<Incoming>) -> Response<ProxyBody> {
    let from_query = request.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(key, _)| key == "filter")
            .map(|(_, value)| value.into_owned())
    });
    let directives = match from_query {
        Some(d) => d,
        None => match Limited::new(request.into_body(), 4096).collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
            Err(_) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "a log filter is at most 4 KiB\n",
                );
            }
        },
    };
    if directives.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "give the filter as ?filter=DIRECTIVES or as the body, e.g. debug\n",
        );
    }
    match admin.log.set_filter(&directives) {
        Ok(()) => {
            tracing::info!(filter = %directives, "log filter changed");
            json_response(StatusCode::OK, &json!({ "filter": directives }))
        }
        Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({ "error": e })),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    bytes.push(b'\n');
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
