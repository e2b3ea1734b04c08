//! `infermesh-control-plane serve`: the control plane's gRPC port (15012)
//! and its admin port (15014).
//!
//! The gRPC port serves TLS with the control plane's own certificate,
//! signed at start by the mesh CA for
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` and
//! renewed at about half its life. A client certificate is optional: a
//! proxy without one yet may call the certificate service, proving its
//! workload with a join token; one that presents a certificate must
//! present a valid one. Server reflection is on, so `grpcurl` can list
//! and describe the API. The join tokens file is read again when it
//! changes; with `--kubernetes`, ServiceAccount tokens are checked with
//! TokenReviews (either credential, or both, may be accepted).
//!
//! With a config directory, or `--kubernetes` ([`crate::kubernetes`]),
//! the same port serves the config push ([`crate::push`]) of the source's
//! snapshots ([`crate::source`]); a change that does not validate is
//! logged with its file (or object), line and field, counted, and the
//! last good snapshot stays.
//!
//! With `--injector-listen`, a third port serves the sidecar injection
//! webhook ([`crate::inject`]), its certificate signed by the same CA.
//!
//! The admin port serves `/metrics` (Prometheus text), `/ready`,
//! `/debug/proxies` (every proxy streaming from this replica and where it
//! stands, JSON) and `/debug/config?proxy=NAME` (the documents that proxy
//! is given, JSON).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use infermesh_certs::{
    CertStore, CertificateAuthority, IssuedCertificate, ServerOptions, SpiffeId, WorkloadKey,
    renewal_time, server_config,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ca_files;
use crate::certify::Certifier;
use crate::client::ClientConnection;
use crate::credential::ByKind;
use crate::grpc::Certificates;
use crate::inject::webhook;
use crate::inject::{FailurePolicy, Injector, Template};
use crate::join_tokens::{JoinTokenAuthenticator, JoinTokens};
use crate::kubernetes::{
    self, source::KubernetesSource, token_review::TokenReviewAuthenticator, webhook_ca,
};
use crate::push::{ConfigPush, Proxies, PushMetrics};
use crate::resolve::{self, Resolved};
use crate::scope::Prepared;
use crate::source::{DirectorySource, Refused, Source};

/// How `serve` runs: the command's flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeOptions {
    /// A CA directory made by `ca init`; it signs every certificate.
    #[arg(long = "ca")]
    pub ca_dir: PathBuf,
    /// The join tokens file (`token create`); read again when it changes.
    /// Required unless --kubernetes is given (both may be).
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Use the Kubernetes API server (in a pod, its ServiceAccount;
    /// elsewhere KUBECONFIG): its infermesh resources, Services,
    /// EndpointSlices, Pods and HTTPRoutes are the config pushed to
    /// proxies (instead of --config-dir), ServiceAccount tokens are checked
    /// with TokenReviews, and with --injector-listen the webhook
    /// configuration's caBundle is kept equal to the CA's root.
    #[arg(long, conflicts_with = "config_dir")]
    pub kubernetes: bool,
    /// The gRPC address.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// The admin address.
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub admin: SocketAddr,
    /// The lifetime of the workload certificates it signs.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The namespace of the control plane's own identity.
    #[arg(long, default_value = "infermesh-system")]
    pub namespace: String,
    /// The service account of the control plane's own identity.
    #[arg(long, default_value = "control-plane")]
    pub service_account: String,
    /// A directory of YAML documents (the mesh's backends, routes,
    /// policies), watched and pushed to proxies; without it (or
    /// --kubernetes) only certificates are served.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// How often each side of a config stream says it is alive; three
    /// silent intervals end the stream.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Serve the sidecar injection webhook (HTTPS, `POST /inject`) on this
    /// address, e.g. 0.0.0.0:15017; without it there is no webhook.
    #[arg(long, help_heading = "Sidecar injection")]
    pub injector_listen: Option<SocketAddr>,
    /// The Service the API server calls the webhook by: its certificate
    /// names NAME.NAMESPACE.svc and NAME.NAMESPACE.svc.cluster.local
    /// (NAMESPACE is --namespace).
    #[arg(
        long,
        default_value = "infermesh-control-plane",
        help_heading = "Sidecar injection"
    )]
    pub injector_service: String,
    /// The image of the injected init container and sidecar.
    #[arg(
        long,
        default_value = concat!("infermesh-proxy:", env!("CARGO_PKG_VERSION")),
        help_heading = "Sidecar injection"
    )]
    pub proxy_image: String,
    /// What the webhook answers for a pod it cannot inject (a bad
    /// annotation, a probe on an undeclared port): `fail` refuses the pod
    /// with the reason, `ignore` creates it without the mesh, with the
    /// reason as a warning.
    #[arg(
        long,
        value_enum,
        default_value_t = FailurePolicy::Fail,
        help_heading = "Sidecar injection"
    )]
    pub injection_failure_policy: FailurePolicy,
    /// The control plane address the injected sidecars dial [default:
    /// INJECTOR_SERVICE.NAMESPACE.svc:15012].
    #[arg(long, value_name = "ADDR", help_heading = "Sidecar injection")]
    pub injected_control_plane: Option<String>,
    /// Tracing of the config pushes: a span per update sent to a proxy,
    /// from sending to its answer, parent of the proxy's span applying it.
    #[command(flatten)]
    pub tracing: infermesh_telemetry::TraceArgs,
}

/// A duration flag: `30m`, `24h`, `365d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as 30m, 24h or 365d"))
}

/// Where a running control plane listens.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// The gRPC port.
    pub grpc: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
    /// The injection webhook's port, with `--injector-listen`.
    pub injector: Option<SocketAddr>,
}

/// Runs the control plane until `shutdown` resolves; `bound` is told
/// where it listens once it does.
pub async fn serve(
    options: ServeOptions,
    bound: impl FnOnce(Bound),
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if options.tokens.is_none() && !options.kubernetes {
        anyhow::bail!(
            "serve needs a way to check proxies' credentials: --tokens FILE (join tokens), --kubernetes (ServiceAccount tokens, checked with TokenReviews), or both"
        );
    }
    let ca = Arc::new(ca_files::load_ca(&options.ca_dir).context("cannot load the CA")?);
    let identity = SpiffeId::workload(
        ca.trust_domain().as_str(),
        &options.namespace,
        &options.service_account,
    )
    .context("the control plane's own identity")?;
    let store = Arc::new(CertStore::new(
        ca.trust_domain().clone(),
        vec![ca.root_der().clone()],
    )?);
    // With the injection webhook, the Service's names too: the API server
    // checks the webhook's certificate by name, and one certificate serves
    // both ports.
    let dns_names = match options.injector_listen {
        Some(_) => webhook::dns_names(&options.injector_service, &options.namespace),
        None => Vec::new(),
    };
    let own = certify_self(&ca, &identity, &dns_names, &store)?;

    let registry = prometheus::Registry::new();
    let traces = match options.tracing.options("infermesh-control-plane") {
        Some(trace_options) => Some(infermesh_telemetry::start(&trace_options, |collector| {
            registry
                .register(collector)
                .expect("the exporter's metric names are unique");
        })?),
        None => None,
    };
    let kubernetes = match options.kubernetes {
        true => Some(kubernetes::client().await?),
        false => None,
    };
    let mut authenticator = ByKind::default();
    let join_tokens = match &options.tokens {
        Some(path) => {
            let tokens = Arc::new(JoinTokenAuthenticator::new(JoinTokens::load(path)?));
            authenticator.join_tokens = Some(tokens.clone());
            Some((path.clone(), tokens))
        }
        None => None,
    };
    if let Some(client) = &kubernetes {
        authenticator.kubernetes = Some(Arc::new(TokenReviewAuthenticator::new(client.clone())));
    }
    let certifier = Certifier::new(ca.clone(), Arc::new(authenticator), options.ttl, &registry)?;
    let certificates = Certificates::new(Arc::new(certifier), ca.root_pem()).into_service();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(infermesh_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("server reflection")?;

    let proxies = Arc::new(Proxies::default());
    // Turned true at shutdown: the config streams end then, or the gRPC
    // server's graceful shutdown would wait on them forever.
    let (close_streams, closing) = tokio::sync::watch::channel(false);
    let (refusals, refused) = tokio::sync::mpsc::unbounded_channel();
    if options.config_dir.is_some() || kubernetes.is_some() {
        // Spawned first: the Kubernetes source reports refusals while it
        // waits for its first valid set.
        tokio::spawn(report_refusals(refused, refusals_metric(&registry)?));
    }
    let source: Option<Box<dyn Source>> = match (&options.config_dir, &kubernetes) {
        (Some(directory), _) => Some(Box::new(DirectorySource::start(directory, refusals)?)),
        (None, Some(client)) => {
            let trust_domain = ca.trust_domain().as_str().to_owned();
            Some(Box::new(
                KubernetesSource::start(client.clone(), trust_domain, refusals).await,
            ))
        }
        (None, None) => None,
    };
    let (push, prepared, _source) = match source {
        Some(source) => {
            let prepared = prepare(source.snapshots(), resolve::system()).await;
            let metrics = PushMetrics::register(&registry)?;
            let push = ConfigPush::new(
                prepared.clone(),
                proxies.clone(),
                metrics,
                options.heartbeat,
                closing.clone(),
                traces.as_ref().map(|t| t.tracer.clone()),
            );
            (Some(push.into_service()), Some(prepared), Some(source))
        }
        None => (None, None, None),
    };

    let tls = TlsAcceptor::from(server_config(
        &store,
        &ServerOptions {
            client_certificate_optional: true,
            alpn_protocols: vec![b"h2".to_vec()],
            ..ServerOptions::default()
        },
    )?);
    let grpc = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let admin = TcpListener::bind(options.admin)
        .await
        .with_context(|| format!("cannot listen on {}", options.admin))?;
    let injector = match options.injector_listen {
        Some(address) => {
            Some(start_injector(&options, address, &ca, &identity, &store, &registry).await?)
        }
        None => None,
    };
    bound(Bound {
        grpc: grpc.local_addr()?,
        admin: admin.local_addr()?,
        injector,
    });

    if let (Some(client), Some(_)) = (&kubernetes, options.injector_listen) {
        tokio::spawn(webhook_ca::keep_ca_bundle(client.clone(), ca.root_pem()));
    }
    tokio::spawn(renew_self(
        ca.clone(),
        identity,
        dns_names,
        store.clone(),
        own,
    ));
    if let Some((path, tokens)) = join_tokens {
        tokio::spawn(watch_tokens(path, tokens));
    }
    let state = Arc::new(AdminState {
        memory: Memory::register(&registry)?,
        registry,
        proxies,
        prepared,
    });
    tokio::spawn(serve_admin(admin, state));
    let (connections, incoming) =
        tokio::sync::mpsc::channel::<std::io::Result<ClientConnection>>(64);
    tokio::spawn(crate::accept::serve(grpc, tls, "grpc", move |stream, _| {
        let connections = connections.clone();
        async move {
            let _ = connections.send(Ok(ClientConnection(stream))).await;
        }
    }));
    let served = tonic::transport::Server::builder()
        // A dead peer under a config stream is noticed by the heartbeats;
        // these catch a connection that stopped carrying anything at all.
        .http2_keepalive_interval(Some(options.heartbeat))
        .http2_keepalive_timeout(Some(options.heartbeat * 2))
        .add_service(certificates)
        .add_optional_service(push)
        .add_service(reflection)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            async move {
                shutdown.await;
                let _ = close_streams.send(true);
            },
        )
        .await
        .context("the gRPC server failed");
    if let Some(traces) = traces {
        // The spans of the last pushes, before the process ends.
        traces.shutdown(Duration::from_secs(5)).await;
    }
    served
}

/// Starts the injection webhook on `address`, presenting the control
/// plane's certificate from `store`; returns where it listens.
async fn start_injector(
    options: &ServeOptions,
    address: SocketAddr,
    ca: &Arc<CertificateAuthority>,
    identity: &SpiffeId,
    store: &Arc<CertStore>,
    registry: &prometheus::Registry,
) -> anyhow::Result<SocketAddr> {
    let service = &options.injector_service;
    let template = Template {
        proxy_image: options.proxy_image.clone(),
        control_plane: options
            .injected_control_plane
            .clone()
            .unwrap_or_else(|| format!("{service}.{}.svc:15012", options.namespace)),
        control_plane_identity: identity.to_string(),
        trust_domain: ca.trust_domain().as_str().to_owned(),
        trust_bundle_pem: ca.root_pem(),
    };
    let injector = Arc::new(Injector::new(
        template,
        options.injection_failure_policy,
        registry,
    )?);
    let tls = webhook::acceptor(store.clone())?;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for the injection webhook"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(webhook::serve(listener, tls, injector));
    Ok(bound)
}

/// Prepares each snapshot of `snapshots` for push, once, as it comes,
/// with the DNS names of its endpoints resolved; and again whenever a name
/// resolves to other addresses (each name on its backend's
/// `dnsRefreshInterval`).
async fn prepare(
    mut snapshots: tokio::sync::watch::Receiver<Arc<crate::source::Snapshot>>,
    lookup: resolve::Lookup,
) -> tokio::sync::watch::Receiver<Arc<Prepared>> {
    let mut snapshot = snapshots.borrow_and_update().clone();
    let mut names = resolve::names(&snapshot.config);
    // No proxy is sent a name: the first snapshot waits for its lookups.
    let mut resolved = Resolved::new();
    resolve::refresh(&lookup, names.keys().cloned(), &mut resolved).await;
    let mut due: std::collections::HashMap<resolve::Name, tokio::time::Instant> = names
        .iter()
        .map(|(name, every)| (name.clone(), tokio::time::Instant::now() + *every))
        .collect();
    let (publish, prepared) =
        tokio::sync::watch::channel(Arc::new(Prepared::new(&snapshot, &resolved)));
    tokio::spawn(async move {
        let mut changed = false;
        loop {
            // Names seen for the first time, and those due again.
            let now = tokio::time::Instant::now();
            let lookups: Vec<resolve::Name> = names
                .keys()
                .filter(|name| due.get(*name).is_none_or(|at| *at <= now))
                .cloned()
                .collect();
            changed |= resolve::refresh(&lookup, lookups.iter().cloned(), &mut resolved).await;
            for name in lookups {
                due.insert(name.clone(), tokio::time::Instant::now() + names[&name]);
            }
            if changed {
                let fresh = Prepared::new(&snapshot, &resolved);
                if publish.send(Arc::new(fresh)).is_err() {
                    return;
                }
                changed = false;
            }
            let next = due.values().min().copied();
            tokio::select! {
                alive = snapshots.changed() => {
                    if alive.is_err() {
                        return;
                    }
                    snapshot = snapshots.borrow_and_update().clone();
                    eprintln!(
                        "infermesh-control-plane: config version {} accepted",
                        snapshot.version
                    );
                    names = resolve::names(&snapshot.config);
                    resolved.retain(|name, _| names.contains_key(name));
                    due.retain(|name, _| names.contains_key(name));
                    changed = true;
                }
                _ = sleep_until(next) => {}
            }
        }
    });
    prepared
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn refusals_metric(registry: &prometheus::Registry) -> prometheus::Result<prometheus::IntCounter> {
    let refusals = prometheus::IntCounter::new(
        "infermesh_control_plane_config_refusals_total",
        "Changes to the config source refused because they do not validate; the last good snapshot stays in force.",
    )?;
    registry.register(Box::new(refusals.clone()))?;
    Ok(refusals)
}

/// Logs every refused change of the source, each problem with its file,
/// line and field.
async fn report_refusals(
    mut refused: tokio::sync::mpsc::UnboundedReceiver<Refused>,
    counter: prometheus::IntCounter,
) {
    while let Some(Refused { diagnostics, kept }) = refused.recv().await {
        counter.inc();
        eprintln!(
            "infermesh-control-plane: config change refused, version {kept} stays in force; nothing was pushed:\n{diagnostics}"
        );
    }
}

/// Signs the control plane's own certificate and puts it in `store`.
fn certify_self(
    ca: &CertificateAuthority,
    identity: &SpiffeId,
    dns_names: &[String],
    store: &CertStore,
) -> anyhow::Result<IssuedCertificate> {
    let key = WorkloadKey::generate()?;
    let csr = key.csr(identity)?;
    let issued = ca.sign_csr_with_dns_names(
        csr.pem().as_bytes(),
        identity,
        dns_names,
        OWN_CERTIFICATE_TTL,
    )?;
    store.update_certificate(issued.chain_der().to_vec(), key.private_key_der())?;
    Ok(issued)
}

/// The lifetime of the control plane's own certificate.
const OWN_CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Renews the control plane's own certificate at about half its life.
async fn renew_self(
    ca: Arc<CertificateAuthority>,
    identity: SpiffeId,
    dns_names: Vec<String>,
    store: Arc<CertStore>,
    mut current: IssuedCertificate,
) {
    loop {
        let at = renewal_time(current.not_before(), current.not_after(), 0.1);
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::from_secs(1));
        tokio::time::sleep(wait).await;
        match certify_self(&ca, &identity, &dns_names, &store) {
            Ok(renewed) => current = renewed,
            Err(e) => {
                eprintln!("infermesh-control-plane: cannot renew its own certificate: {e:#}");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

/// Reads the tokens file again whenever it changes (checked every
/// second), so that `token create` takes effect without a restart. A file
/// that cannot be read leaves the tokens as they were.
async fn watch_tokens(path: PathBuf, authenticator: Arc<JoinTokenAuthenticator>) {
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen = modified(&path);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match JoinTokens::load(&path) {
            Ok(tokens) => authenticator.replace(tokens),
            Err(e) => eprintln!("infermesh-control-plane: tokens file not reloaded: {e}"),
        }
    }
}

/// The allocator's own account of memory, as Envoy's `server.memory_*`:
/// what is allocated, and what the allocator holds resident for it.
struct Memory {
    allocated: prometheus::IntGauge,
    resident: prometheus::IntGauge,
}

impl Memory {
    fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let allocated = prometheus::IntGauge::new(
            "infermesh_control_plane_memory_allocated_bytes",
            "Bytes allocated and in use (jemalloc's stats.allocated).",
        )?;
        let resident = prometheus::IntGauge::new(
            "infermesh_control_plane_memory_resident_bytes",
            "Bytes of memory the allocator holds resident (jemalloc's stats.resident); the rest of the process's RSS is code and stacks.",
        )?;
        registry.register(Box::new(allocated.clone()))?;
        registry.register(Box::new(resident.clone()))?;
        Ok(Memory {
            allocated,
            resident,
        })
    }

    /// Reads the allocator's statistics (left as they were if it cannot).
    fn read(&self) {
        use tikv_jemalloc_ctl::{epoch, stats};
        if epoch::advance().is_ok() {
            if let Ok(bytes) = stats::allocated::read() {
                self.allocated.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
            if let Ok(bytes) = stats::resident::read() {
                self.resident.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
    }
}

/// What the admin port reads.
struct AdminState {
    memory: Memory,
    registry: prometheus::Registry,
    proxies: Arc<Proxies>,
    prepared: Option<tokio::sync::watch::Receiver<Arc<Prepared>>>,
}

/// The admin port.
async fn serve_admin(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(admin(&request, &state)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn admin(request: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let json = |value: serde_json::Value| {
        let mut text = serde_json::to_string_pretty(&value).expect("JSON");
        text.push('\n');
        text
    };
    let (status, content_type, body) = match request.uri().path() {
        "/debug/proxies" => (
            StatusCode::OK,
            "application/json",
            json(serde_json::json!({ "proxies": state.proxies.list() })),
        ),
        "/debug/config" => {
            let proxy = request.uri().query().and_then(|query| {
                form_urlencoded::parse(query.as_bytes())
                    .find(|(key, _)| key == "proxy")
                    .map(|(_, value)| value.into_owned())
            });
            match (proxy, &state.prepared) {
                (None, _) => (
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "name the proxy: /debug/config?proxy=NAME\n".to_owned(),
                ),
                (Some(_), None) => (
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "this control plane pushes no config (it was started without --config-dir or --kubernetes)\n"
                        .to_owned(),
                ),
                (Some(name), Some(prepared)) => match state.proxies.find(&name) {
                    None => (
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        format!(
                            "no proxy named {name:?} is connected to this replica; see /debug/proxies\n"
                        ),
                    ),
                    Some(proxy) => {
                        let view = prepared.borrow().view(&proxy.workload);
                        let documents: Vec<serde_json::Value> = view
                            .resources
                            .values()
                            .map(|r| serde_json::from_str(&r.document_json).expect("JSON"))
                            .collect();
                        (
                            StatusCode::OK,
                            "application/json",
                            json(serde_json::json!({
                                "proxy": proxy,
                                "version": view.version,
                                "documents": documents,
                            })),
                        )
                    }
                },
            }
        }
        "/metrics" => {
            state.memory.read();
            let mut text = String::new();
            let encoded =
                prometheus::TextEncoder::new().encode_utf8(&state.registry.gather(), &mut text);
            match encoded {
                Ok(()) => (StatusCode::OK, "text/plain; version=0.0.4", text),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/ready" => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /ready, /debug/proxies or /debug/config?proxy=NAME\n"
                .to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
