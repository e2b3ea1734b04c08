//! The proxy's side of the control plane (`--control-plane`): its
//! certificate, and its config stream.
//!
//! - **Certificate.** The proxy makes its key in memory (it never leaves
//!   the process), sends a CSR with its credential (a join token, or a
//!   projected ServiceAccount token, read from `--credential` again for
//!   every request, so that a token kubelet rotates in the file is the
//!   one sent) and puts what comes back in the store every
//!   handshake reads. It renews at about half the certificate's life,
//!   with jitter, retrying with backoff; until the current certificate
//!   expires it keeps serving on it.
//! - **Config.** Once it holds a certificate it opens one stream (mutual
//!   TLS) to a control plane of the list, says who it is and what it holds,
//!   and hands every update to the serving loop, which applies it whole or
//!   not at all; the answer goes back as an `Ack`, or a `Nack` with the
//!   error. When the stream ends or falls silent it reconnects, with
//!   jittered backoff, to the next address of the list, keeping all it has.
//!
//! The control plane is trusted as the holder of
//! `spiffe://<trust domain>/ns/infermesh-system/sa/control-plane` (or
//! `--control-plane-identity`) under the roots of `--trust-bundle` (or of
//! `INFERMESH_TRUST_BUNDLE_PEM`, for an injected sidecar).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use infermesh_certs::{
    CertStore, ClientOptions, ExpectedIdentity, SpiffeId, TrustDomain, WorkloadKey,
    client_config_with, renewal_time,
};
use infermesh_proto::v1::certificate_service_client::CertificateServiceClient;
use infermesh_proto::v1::config_service_client::ConfigServiceClient;
use infermesh_proto::v1::{
    Ack, ControlPlaneMessage, Heartbeat, Hello, Nack, ProxyMessage, SignRequest, Update,
    control_plane_message, proxy_message, sign_request,
};
use prometheus::{Gauge, IntCounterVec, IntGaugeVec};
use rustls_pki_types::ServerName;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::core::metrics::Registry;

/// How the proxy reaches its control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Control plane addresses (`host:port`); any of them will do.
    pub addresses: Vec<String>,
    /// The file holding the proxy's credential (a join token, or a
    /// ServiceAccount token kubelet keeps fresh); read again for every
    /// certificate request.
    pub credential: PathBuf,
    /// The roots the control plane's certificate chains to.
    pub trust_bundle: TrustBundle,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The control plane's SPIFFE ID; by default
    /// `spiffe://<trust domain>/ns/infermesh-system/sa/control-plane`.
    pub control_plane_identity: Option<String>,
    /// The proxy's name in the mesh (a pod name).
    pub node: String,
    /// The workload's labels, which `Sidecar` resources and policy
    /// selectors match.
    pub labels: BTreeMap<String, String>,
}

/// Where the roots the control plane is checked against come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustBundle {
    /// A PEM file (`--trust-bundle`).
    File(PathBuf),
    /// PEM text, for a proxy that has no file to read them from: an
    /// injected sidecar is given them in `INFERMESH_TRUST_BUNDLE_PEM`, as
    /// Linkerd's proxy is given `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`.
    Pem(String),
}

impl From<PathBuf> for TrustBundle {
    fn from(path: PathBuf) -> Self {
        TrustBundle::File(path)
    }
}

impl std::fmt::Display for TrustBundle {
    /// Where the roots came from, for errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrustBundle::File(path) => write!(f, "{}", path.display()),
            TrustBundle::Pem(_) => f.write_str("INFERMESH_TRUST_BUNDLE_PEM"),
        }
    }
}

/// An update for the serving loop to apply: the documents of the whole
/// config it would make, and where to say whether it could.
pub struct Pushed {
    /// Every resource the proxy would hold: `(Kind/name, document)`.
    /// Shared with what the client holds: an update copies no document.
    pub documents: Vec<(String, Arc<str>)>,
    /// The update's version.
    pub version: String,
    /// `Ok` once applied; the error that refused it otherwise.
    pub applied: oneshot::Sender<Result<(), String>>,
    /// The W3C `traceparent` of the control plane's push span (empty when
    /// it does not trace).
    pub traceparent: String,
}

/// The running client: the store its certificates go to and the updates
/// it receives.
pub(crate) struct ControlPlane {
    /// The proxy's identity, filled by the certificate service.
    pub store: Arc<CertStore>,
    /// Updates, in order, for the serving loop.
    pub updates: mpsc::Receiver<Pushed>,
}

/// The client's metric families.
#[derive(Clone)]
struct Metrics {
    connected: IntGaugeVec,
    version: IntGaugeVec,
    updates: IntCounterVec,
    last_update: Gauge,
    renewals: IntCounterVec,
    expiry: Gauge,
}

impl Metrics {
    fn register(registry: &Registry) -> Self {
        Metrics {
            connected: registry.gauge(
                "infermesh_control_plane_connected",
                "1 for the control plane address the config stream is attached to.",
                &["address"],
            ),
            version: registry.gauge(
                "infermesh_control_plane_version_info",
                "1 for the control plane's version of this proxy's config that it applied last (the VERSION `infermesh-control-plane status` shows).",
                &["version"],
            ),
            updates: registry.counter(
                "infermesh_control_plane_updates_total",
                "Config updates received from the control plane, by result: applied or refused.",
                &["result"],
            ),
            last_update: registry.float_gauge(
                "infermesh_control_plane_last_update_timestamp_seconds",
                "When the control plane last confirmed the proxy's config (an update applied, or a heartbeat on a stream in sync), Unix time: how stale the config may be.",
            ),
            renewals: registry.counter(
                "infermesh_identity_certificate_requests_total",
                "Certificates asked of the control plane, by result.",
                &["result"],
            ),
            expiry: registry.float_gauge(
                "infermesh_identity_cert_expiry_timestamp_seconds",
                "When the proxy's workload certificate expires (Unix time).",
            ),
        }
    }
}

/// Why the client could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An option is not valid.
    #[error("{0}")]
    Invalid(String),
}

/// The client without a proxy around it: the certificate and config
/// tasks, whose updates the caller applies and answers. The load harness
/// runs thousands of these in one process, as simulated proxies speaking
/// the real protocol with the real client.
pub struct Detached {
    /// The proxy's identity, filled by the certificate service.
    pub store: Arc<CertStore>,
    /// Updates, in order; each must be answered.
    pub updates: mpsc::Receiver<Pushed>,
}

/// Starts a [`Detached`] client as a proxy of `mode` (`sidecar` or
/// `gateway`); its metrics go to a registry of its own.
pub fn start_detached(
    options: ControlPlaneOptions,
    mode: &'static str,
) -> Result<Detached, StartError> {
    let client = start(options, mode, &Registry::new())?;
    Ok(Detached {
        store: client.store,
        updates: client.updates,
    })
}

/// Starts the certificate and config tasks.
pub(crate) fn start(
    options: ControlPlaneOptions,
    mode: &'static str,
    registry: &Registry,
) -> Result<ControlPlane, StartError> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| StartError::Read {
            path: path.clone(),
            source,
        })
    };
    // Read here to fail at start on a missing or empty file; read again
    // for each certificate request.
    read_credential(&options.credential).map_err(|e| match e {
        CredentialError::Read(source) => StartError::Read {
            path: options.credential.clone(),
            source,
        },
        empty @ CredentialError::Empty => StartError::Invalid(format!(
            "the credential file {}: {empty}",
            options.credential.display()
        )),
    })?;
    let bundle = match &options.trust_bundle {
        TrustBundle::File(path) => read(path)?,
        TrustBundle::Pem(text) => text.clone(),
    };
    let roots = infermesh_certs::parse_certificates(&bundle)
        .map_err(|e| StartError::Invalid(format!("{}: {e}", options.trust_bundle)))?;
    let trust_domain =
        TrustDomain::new(&options.trust_domain).map_err(|e| StartError::Invalid(e.to_string()))?;
    let control_plane = match &options.control_plane_identity {
        Some(id) => SpiffeId::parse(id),
        None => SpiffeId::workload(trust_domain.as_str(), "infermesh-system", "control-plane"),
    }
    .map_err(|e| StartError::Invalid(format!("--control-plane-identity: {e}")))?;
    let store = Arc::new(
        CertStore::new(trust_domain, roots)
            .map_err(|e| StartError::Invalid(format!("{}: {e}", options.trust_bundle)))?,
    );
    if options.addresses.is_empty() {
        return Err(StartError::Invalid(
            "--control-plane needs at least one address".into(),
        ));
    }
    let tls = client_config_with(
        &store,
        ExpectedIdentity::Exact(control_plane),
        &ClientOptions {
            alpn_protocols: vec![b"h2".to_vec()],
            ..ClientOptions::default()
        },
    )
    .map_err(|e| StartError::Invalid(e.to_string()))?;
    let metrics = Metrics::register(registry);
    let client = Arc::new(Client {
        options,
        tls: TlsConnector::from(tls),
        mode,
        metrics,
    });
    let (certified, has_certificate) = watch::channel(false);
    let (updates, receiver) = mpsc::channel(1);
    tokio::spawn(client.clone().keep_certified(store.clone(), certified));
    tokio::spawn(client.stream_config(has_certificate, updates));
    Ok(ControlPlane {
        store,
        updates: receiver,
    })
}

struct Client {
    options: ControlPlaneOptions,
    tls: TlsConnector,
    mode: &'static str,
    metrics: Metrics,
}

/// Why the credential file cannot be used.
#[derive(Debug, thiserror::Error)]
enum CredentialError {
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error(
        "it is empty; write the join token from `infermesh-control-plane token create` there (or mount the ServiceAccount token)"
    )]
    Empty,
}

/// The credential in `path`, trimmed.
fn read_credential(path: &std::path::Path) -> Result<String, CredentialError> {
    let text = std::fs::read_to_string(path).map_err(CredentialError::Read)?;
    let credential = text.trim();
    if credential.is_empty() {
        return Err(CredentialError::Empty);
    }
    Ok(credential.to_owned())
}

/// The credential as the certificate service takes it: a JWT (three
/// base64url segments, the first a JSON header with `alg`), which is what
/// a projected ServiceAccount token is, goes as a Kubernetes token, to be
/// checked with a TokenReview; anything else as a join token.
fn credential_kind(credential: String) -> sign_request::Credential {
    if is_jwt(&credential) {
        sign_request::Credential::KubernetesToken(credential)
    } else {
        sign_request::Credential::JoinToken(credential)
    }
}

/// Whether `text` is a JWT in compact form: three base64url segments (no
/// padding), the first decoding to a JSON object that names its `alg`.
/// The signature is not checked here: the API server does that.
fn is_jwt(text: &str) -> bool {
    use base64::Engine as _;
    let segments: Vec<&str> = text.split('.').collect();
    let [header, payload, signature] = segments[..] else {
        return false;
    };
    if payload.is_empty() || signature.is_empty() {
        return false;
    }
    let Ok(header) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&header)
        .is_ok_and(|header| header.get("alg").is_some_and(serde_json::Value::is_string))
}

/// How long a connection attempt to one control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff: full jitter between zero and a ceiling that
/// doubles from the first to the last value, so proxies cut off together
/// do not come back together.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_LAST: Duration = Duration::from_secs(5);
/// The least time between two certificates, whatever their lifetime.
const MIN_RENEWAL_WAIT: Duration = Duration::from_secs(1);
/// The heartbeat interval until the control plane says its own.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

struct Backoff {
    ceiling: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            ceiling: BACKOFF_FIRST,
        }
    }

    fn reset(&mut self) {
        self.ceiling = BACKOFF_FIRST;
    }

    async fn wait(&mut self) {
        let wait = self.ceiling.mul_f64(rand::random_range(0.0..=1.0));
        self.ceiling = (self.ceiling * 2).min(BACKOFF_LAST);
        tokio::time::sleep(wait).await;
    }
}

impl Client {
    /// A channel to `address` over TLS with the store's current
    /// certificate (none before the first).
    async fn channel(&self, address: &str) -> Result<Channel, String> {
        let tls = self.tls.clone();
        let host = address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name = ServerName::try_from(host.clone())
            .map_err(|e| format!("{address}: {e}"))?
            .to_owned();
        let target = address.to_owned();
        let connector = tower::service_fn(move |_: http::Uri| {
            let (tls, name, target) = (tls.clone(), name.clone(), target.clone());
            async move {
                let tcp = infermesh_dns::connect(&target).await?;
                let _ = tcp.set_nodelay(true);
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("{address}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(Duration::from_secs(30))
            .connect_with_connector(connector)
            .await
            .map_err(|e| format!("{address}: {}", error_chain(&e)))
    }

    /// Gets a certificate, then renews it at about half its life, for as
    /// long as the proxy runs.
    async fn keep_certified(
        self: Arc<Self>,
        store: Arc<CertStore>,
        certified: watch::Sender<bool>,
    ) {
        let addresses = &self.options.addresses;
        let mut next = rand::random_range(0..addresses.len());
        let mut backoff = Backoff::new();
        loop {
            let address = &addresses[next % addresses.len()];
            next += 1;
            let asked = SystemTime::now();
            match self.certify(address, &store).await {
                Ok((not_before, not_after)) => {
                    self.metrics.renewals.with_label_values(&["success"]).inc();
                    let unix = not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    self.metrics.expiry.set(unix.as_secs_f64());
                    certified.send_replace(true);
                    backoff.reset();
                    // The life the proxy sees starts when it asked: the CA
                    // backdates `not_before` for clock skew (a minute), which
                    // would put the half-life of a short certificate in
                    // the past.
                    let renew = renewal_time(asked.max(not_before), not_after, 0.05);
                    let wait = renew
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                        .max(MIN_RENEWAL_WAIT);
                    tracing::info!(not_after = unix.as_secs(), renew_in = ?wait, "workload certificate received");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    self.metrics.renewals.with_label_values(&["failure"]).inc();
                    tracing::warn!(control_plane = %address, error = %e, "cannot get a workload certificate; the current one (if any) stays until it expires");
                    backoff.wait().await;
                }
            }
        }
    }

    /// One certificate: a new key, a CSR, the credential.
    async fn certify(
        &self,
        address: &str,
        store: &CertStore,
    ) -> Result<(SystemTime, SystemTime), String> {
        // Read for each request: a projected ServiceAccount token is
        // rewritten by kubelet before it expires.
        let credential = read_credential(&self.options.credential).map_err(|e| {
            format!(
                "the credential file {}: {e}",
                self.options.credential.display()
            )
        })?;
        let key = WorkloadKey::generate().map_err(|e| e.to_string())?;
        // The CSR names no identity of its own choosing: the control plane
        // derives it from the credential. It carries the public key.
        let csr = key.csr_without_identity().map_err(|e| e.to_string())?;
        let channel = self.channel(address).await?;
        let answer = CertificateServiceClient::new(channel)
            .sign(SignRequest {
                credential: Some(credential_kind(credential)),
                csr_pem: csr.pem().to_owned(),
            })
            .await
            .map_err(|status| {
                let reason = status
                    .metadata()
                    .get("x-infermesh-refusal")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("unknown");
                format!("refused ({reason}): {}", status.message())
            })?
            .into_inner();
        let chain = infermesh_certs::parse_certificates(&answer.certificate_chain_pem)
            .map_err(|e| format!("the signed chain: {e}"))?;
        store
            .update_certificate(chain, key.private_key_der())
            .map_err(|e| format!("the signed certificate: {e}"))?;
        let at = |unix: i64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0))
        };
        Ok((at(answer.not_before_unix), at(answer.not_after_unix)))
    }

    /// Keeps a config stream open to one control plane or another.
    async fn stream_config(
        self: Arc<Self>,
        mut has_certificate: watch::Receiver<bool>,
        updates: mpsc::Sender<Pushed>,
    ) {
        // mutual TLS: nothing to do before the first certificate.
        if has_certificate.wait_for(|has| *has).await.is_err() {
            return;
        }
        let addresses = &self.options.addresses;
        let mut next = rand::random_range(0..addresses.len());
        let mut held = Held::default();
        let mut backoff = Backoff::new();
        loop {
            let address = addresses[next % addresses.len()].clone();
            next += 1;
            let result = self
                .run_stream(&address, &mut held, &updates, &mut backoff)
                .await;
            self.metrics.connected.reset();
            match result {
                Ok(()) => return, // the serving loop is gone: shutting down
                Err(e) => {
                    tracing::warn!(control_plane = %address, error = %e, "config stream ended; keeping the current config and reconnecting")
                }
            }
            backoff.wait().await;
        }
    }

    /// One stream, until it ends: `Ok` only when the proxy shuts down.
    async fn run_stream(
        &self,
        address: &str,
        held: &mut Held,
        updates: &mpsc::Sender<Pushed>,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        let channel = self.channel(address).await?;
        let (outbound, requests) = mpsc::channel(4);
        let hello = ProxyMessage {
            message: Some(proxy_message::Message::Hello(Hello {
                node: self.options.node.clone(),
                mode: self.mode.to_owned(),
                labels: self.options.labels.clone().into_iter().collect(),
                held: held.versions(),
                version: held.version.clone(),
                proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            })),
        };
        outbound.send(hello).await.map_err(|_| "closed")?;
        let mut inbound = ConfigServiceClient::new(channel)
            .stream(tokio_stream::wrappers::ReceiverStream::new(requests))
            .await
            .map_err(|status| format!("{}: {}", status.code(), status.message()))?
            .into_inner();
        self.metrics.connected.with_label_values(&[address]).set(1);
        tracing::info!(control_plane = %address, "config stream open");
        let mut heartbeat = DEFAULT_HEARTBEAT;
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        // The parts of an update received so far.
        let mut parts: Option<Update> = None;
        loop {
            tokio::select! {
                message = inbound.message() => {
                    heard = tokio::time::Instant::now();
                    let message = match message {
                        Ok(Some(ControlPlaneMessage { message: Some(message) })) => message,
                        Ok(Some(_)) => continue,
                        Ok(None) => return Err("the control plane closed the stream".into()),
                        Err(status) => return Err(format!("{}: {}", status.code(), status.message())),
                    };
                    match message {
                        control_plane_message::Message::Heartbeat(_) => {
                            if held.in_sync {
                                self.metrics.last_update.set(unix_now());
                            }
                        }
                        control_plane_message::Message::Update(part) => {
                            backoff.reset();
                            let Some(update) = gather(&mut parts, part) else {
                                continue;
                            };
                            if update.heartbeat_seconds > 0 {
                                let wanted = Duration::from_secs(update.heartbeat_seconds.into());
                                if wanted != heartbeat {
                                    heartbeat = wanted;
                                    ticker = tokio::time::interval(heartbeat);
                                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                                }
                            }
                            let Some(answer) = self.apply(update, held, updates).await else {
                                return Ok(());
                            };
                            outbound.send(answer).await.map_err(|_| "the stream closed")?;
                        }
                    }
                }
                _ = ticker.tick() => {
                    if heard.elapsed() > heartbeat * 3 {
                        return Err(format!("no word from the control plane for {:?}", heartbeat * 3));
                    }
                    let beat = ProxyMessage { message: Some(proxy_message::Message::Heartbeat(Heartbeat {})) };
                    outbound.send(beat).await.map_err(|_| "the stream closed")?;
                }
            }
        }
    }

    /// Has the serving loop apply `update` on top of what is held, and
    /// says what to answer; `None` when the serving loop is gone.
    async fn apply(
        &self,
        update: Update,
        held: &mut Held,
        updates: &mpsc::Sender<Pushed>,
    ) -> Option<ProxyMessage> {
        let mut candidate = held.resources.clone();
        for key in &update.removed {
            candidate.remove(key);
        }
        for resource in update.resources {
            let key = format!("{}/{}", resource.kind, resource.name);
            candidate.insert(key, (resource.version, Arc::from(resource.document_json)));
        }
        let (applied, answer) = oneshot::channel();
        let documents = candidate
            .iter()
            .map(|(key, (_, document))| (key.clone(), document.clone()))
            .collect();
        let pushed = Pushed {
            documents,
            version: update.version.clone(),
            applied,
            traceparent: update.traceparent.clone(),
        };
        updates.send(pushed).await.ok()?;
        let message = match answer.await.ok()? {
            Ok(()) => {
                self.metrics.updates.with_label_values(&["applied"]).inc();
                self.metrics.last_update.set(unix_now());
                self.metrics.version.reset();
                self.metrics
                    .version
                    .with_label_values(&[update.version.as_str()])
                    .set(1);
                held.resources = candidate;
                held.version = update.version.clone();
                held.in_sync = true;
                proxy_message::Message::Ack(Ack {
                    nonce: update.nonce,
                    version: update.version,
                })
            }
            Err(error) => {
                self.metrics.updates.with_label_values(&["refused"]).inc();
                held.in_sync = false;
                tracing::error!(version = %update.version, %error, "config update refused; keeping the current config");
                proxy_message::Message::Nack(Nack {
                    nonce: update.nonce,
                    version: update.version,
                    error,
                })
            }
        };
        Some(ProxyMessage {
            message: Some(message),
        })
    }
}

/// Adds `part` to the update being gathered; the whole update once its
/// last part came. A part of another update than the one gathered starts
/// afresh (the control plane sends one update at a time, so that one was
/// abandoned).
fn gather(gathered: &mut Option<Update>, part: Update) -> Option<Update> {
    let update = match gathered.take() {
        Some(mut update) if update.nonce == part.nonce => {
            update.resources.extend(part.resources);
            update.removed.extend(part.removed);
            update.more = part.more;
            update
        }
        _ => part,
    };
    if update.more {
        *gathered = Some(update);
        None
    } else {
        Some(update)
    }
}

/// What the proxy holds: each resource's version and document.
#[derive(Default)]
struct Held {
    resources: BTreeMap<String, (String, Arc<str>)>,
    version: String,
    /// Whether the last update was applied (a refused one leaves the
    /// proxy behind the control plane).
    in_sync: bool,
}

impl Held {
    fn versions(&self) -> HashMap<String, String> {
        self.resources
            .iter()
            .map(|(key, (version, _))| (key.clone(), version.clone()))
            .collect()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// An error with its causes, which tonic's transport errors hide.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::Resource;

    fn part(nonce: &str, name: &str, more: bool) -> Update {
        Update {
            nonce: nonce.into(),
            version: format!("v{nonce}"),
            resources: vec![Resource {
                kind: "Backend".into(),
                name: name.into(),
                version: "1".into(),
                document_json: "{}".into(),
            }],
            removed: Vec::new(),
            heartbeat_seconds: 5,
            more,
            traceparent: String::new(),
        }
    }

    #[test]
    fn a_jwt_goes_as_a_kubernetes_token_anything_else_as_a_join_token() {
        // A projected ServiceAccount token's shape (header
        // {"alg":"RS256","kid":"k"}, a payload, a signature).
        let jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bW9kZWxzOmxsYW1hIn0.c2lnbmF0dXJl";
        assert_eq!(
            credential_kind(jwt.to_owned()),
            sign_request::Credential::KubernetesToken(jwt.to_owned())
        );
        for other in [
            "imjt_5f0c1a2b_9f86d081884c7d659a2feaa0c55ad015",
            // Three segments, but the header is not JSON with an `alg`.
            "aGVsbG8.d29ybGQ.c2ln",
            "eyJ0eXAiOiJKV1QifQ.e30.c2ln",
            // Two segments.
            "eyJhbGciOiJSUzI1NiJ9.e30",
        ] {
            assert_eq!(
                credential_kind(other.to_owned()),
                sign_request::Credential::JoinToken(other.to_owned()),
                "{other}"
            );
        }
    }

    #[test]
    fn an_update_in_parts_is_applied_whole_once_its_last_part_comes() {
        let mut gathered = None;
        assert!(gather(&mut gathered, part("1", "a", true)).is_none());
        assert!(gather(&mut gathered, part("1", "b", true)).is_none());
        let whole = gather(&mut gathered, part("1", "c", false)).expect("the last part");
        let names: Vec<&str> = whole.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(gathered.is_none());
        // A part of another update drops what was gathered.
        assert!(gather(&mut gathered, part("2", "a", true)).is_none());
        let next = gather(&mut gathered, part("3", "z", false)).expect("a whole update");
        assert_eq!(next.resources.len(), 1);
        assert_eq!(next.nonce, "3");
    }
}
