//! The config push: one [`ConfigService`] stream per proxy, and the
//! register of every proxy this replica serves.
//!
//! A stream's session keeps what its proxy holds (the keys and versions it
//! acknowledged last), and, whenever the source publishes or the proxy
//! answers, compares that with the proxy's [`View`]: it sends the
//! resources that differ and the keys to drop, one update in flight at a
//! time, in parts of about 6 KiB (so no stream's buffers grow with the
//! size of a view). An `Ack` makes the update what the proxy holds; a `Nack` is
//! recorded with its error, and that version is not sent again (the next
//! change of the view is). A proxy whose view did not change hears
//! nothing but heartbeats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use infermesh_proto::v1::config_service_server::{ConfigService, ConfigServiceServer};
use infermesh_proto::v1::{
    ControlPlaneMessage, Heartbeat, ProxyMessage, Resource, Update, control_plane_message,
    proxy_message,
};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;

use crate::client::ClientInfo;
use crate::scope::{Prepared, ProxyMode, Pushed, View, Workload};

/// How often each side of a stream says it is alive; three intervals of
/// silence end the stream.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Where a proxy stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SyncState {
    /// It acknowledged the version its view has now.
    Synced,
    /// An update is on its way, or its view changed since its last
    /// acknowledgement.
    Stale,
    /// It refused the latest version sent, with this error, and keeps an
    /// older one.
    Nacked {
        /// The version refused.
        version: String,
        /// The proxy's error.
        error: String,
    },
}

/// One connected proxy, as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    /// Who it is.
    pub workload: Workload,
    /// `sidecar` or `gateway`.
    pub mode: String,
    /// Its build.
    pub proxy_version: String,
    /// Its address.
    pub address: Option<String>,
    /// When its stream opened (Unix seconds).
    pub connected_since: u64,
    /// The version it acknowledged last, if any.
    pub acked_version: Option<String>,
    /// The version its view has now.
    pub desired_version: String,
    /// In sync, stale, or refused.
    #[serde(flatten)]
    pub state: SyncState,
}

/// Every proxy streaming from this replica.
#[derive(Default)]
pub struct Proxies {
    next: AtomicU64,
    connected: Mutex<HashMap<u64, ProxyStatus>>,
}

impl Proxies {
    /// Every connected proxy, by name.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut list: Vec<ProxyStatus> = self.lock().values().cloned().collect();
        list.sort_by(|a, b| a.workload.node.cmp(&b.workload.node));
        list
    }

    /// The proxy named `node`, if it is connected here.
    pub fn find(&self, node: &str) -> Option<ProxyStatus> {
        self.lock()
            .values()
            .filter(|p| p.workload.node == node)
            .max_by_key(|p| p.connected_since)
            .cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ProxyStatus>> {
        // A panic while holding the lock leaves a consistent map: each
        // change is one insert, update or remove.
        self.connected.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The push's metric families.
#[derive(Clone)]
pub struct PushMetrics {
    connected: IntGauge,
    pushes: IntCounterVec,
    bytes: prometheus::IntCounter,
    convergence: Histogram,
}

impl PushMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let connected = IntGauge::new(
            "infermesh_control_plane_connected_proxies",
            "Proxies with a config stream open to this replica.",
        )?;
        let pushes = IntCounterVec::new(
            Opts::new(
                "infermesh_control_plane_pushes_total",
                "Config updates sent to proxies, by how they answered: ack, nack, or none (the stream ended first).",
            ),
            &["result"],
        )?;
        let bytes = prometheus::IntCounter::new(
            "infermesh_control_plane_pushed_bytes_total",
            "Bytes of config updates sent to proxies (encoded messages).",
        )?;
        let convergence = Histogram::with_opts(
            HistogramOpts::new(
                "infermesh_control_plane_convergence_seconds",
                "Time from a config change seen by the control plane to a proxy's acknowledgement of it.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        // Every answer counted from 0: a series that appears at 1 is no
        // increase to Prometheus, and a replica's first NACK would not
        // alert.
        for result in ["ack", "nack", "none"] {
            pushes.with_label_values(&[result]);
        }
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(pushes.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(convergence.clone()))?;
        Ok(PushMetrics {
            connected,
            pushes,
            bytes,
            convergence,
        })
    }
}

/// The config service.
#[derive(Clone)]
pub struct ConfigPush {
    prepared: watch::Receiver<Arc<Prepared>>,
    proxies: Arc<Proxies>,
    metrics: PushMetrics,
    heartbeat: Duration,
    closing: watch::Receiver<bool>,
    tracer: Option<SdkTracer>,
}

impl ConfigPush {
    /// Serves the views of `prepared`, registering each proxy in
    /// `proxies`, until `closing` turns true: then every stream is ended
    /// with UNAVAILABLE, so that its proxy moves to another replica and
    /// the server's graceful shutdown does not wait on streams that never
    /// end by themselves. With `tracer`, every update sent is a span.
    pub fn new(
        prepared: watch::Receiver<Arc<Prepared>>,
        proxies: Arc<Proxies>,
        metrics: PushMetrics,
        heartbeat: Duration,
        closing: watch::Receiver<bool>,
        tracer: Option<SdkTracer>,
    ) -> Self {
        ConfigPush {
            prepared,
            proxies,
            metrics,
            heartbeat,
            closing,
            tracer,
        }
    }

    /// The tonic service, to add to a server.
    pub fn into_service(self) -> ConfigServiceServer<Self> {
        ConfigServiceServer::new(self)
    }
}

type Outbound = Result<ControlPlaneMessage, Status>;

#[tonic::async_trait]
impl ConfigService for ConfigPush {
    type StreamStream = ReceiverStream<Outbound>;

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let info = request.extensions().get::<ClientInfo>().cloned();
        let Some(identity) = info.as_ref().and_then(|i| i.identity.clone()) else {
            return Err(Status::unauthenticated(
                "the config stream needs the proxy's workload certificate (mutual TLS); get one from the certificate service first",
            ));
        };
        let Some(namespace) = identity.namespace().map(str::to_owned) else {
            return Err(Status::permission_denied(format!(
                "{identity} is not a workload identity (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)"
            )));
        };
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(self.heartbeat * 3, inbound.message()).await {
            Ok(Ok(Some(ProxyMessage {
                message: Some(proxy_message::Message::Hello(hello)),
            }))) => hello,
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello came")),
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message of a config stream must be a Hello",
                ));
            }
        };
        if hello.node.is_empty() {
            return Err(Status::invalid_argument("Hello.node must name the proxy"));
        }
        let Some(mode) = ProxyMode::parse(&hello.mode) else {
            return Err(Status::invalid_argument(format!(
                "Hello.mode is {:?}; expected sidecar or gateway",
                hello.mode
            )));
        };
        let workload = Workload {
            mode,
            node: hello.node.clone(),
            namespace,
            identity: identity.to_string(),
            labels: hello.labels.clone().into_iter().collect(),
        };
        // One message waiting at most: tonic encodes every message waiting
        // into one buffer, which keeps the size it grew to for the life of
        // the stream, so parts queued together would cost every stream
        // their sum.
        let (outbound, receiver) = mpsc::channel(1);
        let id = self.proxies.next.fetch_add(1, Ordering::Relaxed);
        let prepared = self.prepared.clone();
        let view = prepared.borrow().view(&workload);
        self.proxies.lock().insert(
            id,
            ProxyStatus {
                workload: workload.clone(),
                mode: hello.mode.clone(),
                proxy_version: hello.proxy_version.clone(),
                address: info.and_then(|i| i.address).map(|a| a.to_string()),
                connected_since: unix_now(),
                acked_version: None,
                desired_version: view.version.clone(),
                state: SyncState::Stale,
            },
        );
        self.metrics.connected.inc();
        let session = Session {
            id,
            workload,
            held: Held::Reported(hello.held),
            held_version: (!hello.version.is_empty()).then_some(hello.version),
            in_flight: None,
            refused: None,
            first_sent: false,
            nonce: 0,
            tracer: self.tracer.clone(),
            outbound,
            proxies: self.proxies.clone(),
            metrics: self.metrics.clone(),
            heartbeat: self.heartbeat,
        };
        tokio::spawn(session.run(prepared, inbound, self.closing.clone()));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// An update sent and not yet answered.
struct InFlight {
    nonce: String,
    view: Arc<View>,
    seen: Instant,
    /// Its span, when pushes are traced: it ends with the answer.
    span: Option<opentelemetry_sdk::trace::Span>,
}

/// What a proxy holds.
enum Held {
    /// What it said it held when it connected: key → version.
    Reported(HashMap<String, String>),
    /// The view it acknowledged last, shared with every proxy of that
    /// view: no copy per proxy of what thousands hold alike.
    Acked(Arc<View>),
}

impl Held {
    /// The version of `key` the proxy holds, if it holds it.
    fn version_of(&self, key: &str) -> Option<&str> {
        match self {
            Held::Reported(versions) => versions.get(key).map(String::as_str),
            Held::Acked(view) => view.resources.get(key).map(|r| r.version.as_str()),
        }
    }

    /// The keys the proxy holds.
    fn keys(&self) -> Vec<&String> {
        match self {
            Held::Reported(versions) => versions.keys().collect(),
            Held::Acked(view) => view.resources.keys().collect(),
        }
    }
}

/// One proxy's stream.
struct Session {
    id: u64,
    workload: Workload,
    /// What the proxy holds.
    held: Held,
    held_version: Option<String>,
    in_flight: Option<InFlight>,
    /// The version the proxy refused last.
    refused: Option<String>,
    first_sent: bool,
    nonce: u64,
    outbound: mpsc::Sender<Outbound>,
    proxies: Arc<Proxies>,
    metrics: PushMetrics,
    heartbeat: Duration,
    tracer: Option<SdkTracer>,
}

impl Session {
    async fn run(
        mut self,
        mut prepared: watch::Receiver<Arc<Prepared>>,
        mut inbound: Streaming<ProxyMessage>,
        mut closing: watch::Receiver<bool>,
    ) {
        let mut current = prepared.borrow_and_update().clone();
        // The view is made again only when the snapshot changes, not on
        // every message: most messages are heartbeats.
        let mut desired = current.view(&self.workload);
        let mut ticker = tokio::time::interval(self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        let ended = loop {
            if self.push(&desired, current.seen).await.is_err() {
                break "the proxy stopped reading";
            }
            tokio::select! {
                // (The guard `wait_for` returns is dropped in the block: it
                // must not live in the select's state.)
                _ = async { drop(closing.wait_for(|closing| *closing).await) } => {
                    let _ = self.outbound.try_send(Err(Status::unavailable(
                        "the control plane is shutting down; connect to another replica",
                    )));
                    break "the control plane is shutting down";
                }
                changed = prepared.changed() => {
                    if changed.is_err() {
                        break "the control plane is shutting down";
                    }
                    current = prepared.borrow_and_update().clone();
                    desired = current.view(&self.workload);
                    self.record(|status| status.desired_version = desired.version.clone());
                }
                message = inbound.message() => {
                    heard = tokio::time::Instant::now();
                    match message {
                        Ok(Some(message)) => self.answer(message, &desired),
                        Ok(None) => break "the proxy closed its stream",
                        Err(_) => break "the stream failed",
                    }
                }
                _ = ticker.tick() => {
                    if heard.elapsed() > self.heartbeat * 3 {
                        let _ = self.outbound.try_send(Err(Status::deadline_exceeded(
                            "no heartbeat from the proxy for three intervals",
                        )));
                        break "the proxy's heartbeats stopped";
                    }
                    let beat = ControlPlaneMessage {
                        message: Some(control_plane_message::Message::Heartbeat(Heartbeat {})),
                    };
                    if self.outbound.send(Ok(beat)).await.is_err() {
                        break "the proxy stopped reading";
                    }
                }
            }
        };
        if let Some(in_flight) = self.in_flight.take() {
            self.metrics.pushes.with_label_values(&["none"]).inc();
            if let Some(mut span) = in_flight.span {
                span.set_attribute(KeyValue::new("infermesh.outcome", "unanswered"));
                span.set_status(opentelemetry::trace::Status::error(ended));
            }
        }
        self.proxies.lock().remove(&self.id);
        self.metrics.connected.dec();
        eprintln!(
            "infermesh-control-plane: proxy {} ({}) disconnected: {ended}",
            self.workload.node, self.workload.identity
        );
    }

    /// Sends what the proxy's view holds and the proxy does not, unless an
    /// update is in flight or the proxy refused this very version.
    async fn push(&mut self, view: &Arc<View>, seen: Instant) -> Result<(), ()> {
        if self.in_flight.is_some() {
            return Ok(());
        }
        let up_to_date = self.held_version.as_deref() == Some(view.version.as_str());
        let refused = self.refused.as_deref() == Some(view.version.as_str());
        if self.first_sent && (up_to_date || refused) {
            return Ok(());
        }
        // Shared resources, not copies: a part's documents are copied into
        // its message only as it is sent.
        let changed: Vec<&Arc<Pushed>> = view
            .resources
            .iter()
            .filter(|(key, r)| self.held.version_of(key) != Some(r.version.as_str()))
            .map(|(_, r)| r)
            .collect();
        let removed: Vec<String> = self
            .held
            .keys()
            .into_iter()
            .filter(|key| !view.resources.contains_key(*key))
            .cloned()
            .collect();
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let heartbeat_seconds = u32::try_from(self.heartbeat.as_secs()).unwrap_or(u32::MAX);
        let parts = split(&changed);
        let last = parts.len() - 1;
        let (span, traceparent) = self.push_span(view, changed.len(), removed.len(), parts.len());
        for (i, part) in parts.into_iter().enumerate() {
            let resources = part
                .iter()
                .map(|r| Resource {
                    kind: r.kind.as_str().to_owned(),
                    name: r.name.clone(),
                    version: r.version.clone(),
                    document_json: r.document_json.clone(),
                })
                .collect();
            let update = ControlPlaneMessage {
                message: Some(control_plane_message::Message::Update(Update {
                    nonce: nonce.clone(),
                    version: view.version.clone(),
                    resources,
                    removed: if i == 0 { removed.clone() } else { Vec::new() },
                    heartbeat_seconds,
                    more: i < last,
                    traceparent: traceparent.clone(),
                })),
            };
            self.metrics
                .bytes
                .inc_by(prost::Message::encoded_len(&update) as u64);
            self.outbound.send(Ok(update)).await.map_err(|_| ())?;
        }
        self.first_sent = true;
        self.in_flight = Some(InFlight {
            nonce,
            view: view.clone(),
            seen,
            span,
        });
        self.record(|status| status.state = SyncState::Stale);
        Ok(())
    }

    fn answer(&mut self, message: ProxyMessage, desired: &View) {
        let answered = |in_flight: &Option<InFlight>, nonce: &str| {
            in_flight.as_ref().is_some_and(|f| f.nonce == nonce)
        };
        match message.message {
            Some(proxy_message::Message::Ack(ack)) if answered(&self.in_flight, &ack.nonce) => {
                let InFlight {
                    view, seen, span, ..
                } = self.in_flight.take().expect("answered");
                if let Some(mut span) = span {
                    span.set_attribute(KeyValue::new("infermesh.outcome", "ack"));
                }
                self.metrics.pushes.with_label_values(&["ack"]).inc();
                self.metrics
                    .convergence
                    .observe(seen.elapsed().as_secs_f64());
                self.held = Held::Acked(view.clone());
                self.held_version = Some(view.version.clone());
                self.refused = None;
                let synced = desired.version == view.version;
                self.record(|status| {
                    status.acked_version = Some(view.version.clone());
                    status.state = if synced {
                        SyncState::Synced
                    } else {
                        SyncState::Stale
                    };
                });
            }
            Some(proxy_message::Message::Nack(nack)) if answered(&self.in_flight, &nack.nonce) => {
                let InFlight { view, span, .. } = self.in_flight.take().expect("answered");
                if let Some(mut span) = span {
                    span.set_attribute(KeyValue::new("infermesh.outcome", "nack"));
                    span.set_attribute(KeyValue::new("error.type", "nack"));
                    span.set_status(opentelemetry::trace::Status::error(nack.error.clone()));
                }
                self.metrics.pushes.with_label_values(&["nack"]).inc();
                eprintln!(
                    "infermesh-control-plane: proxy {} refused version {}: {}",
                    self.workload.node, view.version, nack.error
                );
                self.refused = Some(view.version.clone());
                self.record(|status| {
                    status.state = SyncState::Nacked {
                        version: view.version.clone(),
                        error: nack.error.clone(),
                    }
                });
            }
            // Heartbeats, and answers to an update the stream no longer
            // waits for, only show the proxy is alive.
            _ => {}
        }
    }

    /// The span of an update about to be sent, and the `traceparent` that
    /// tells the proxy (empty when pushes are not traced or this one is
    /// not sampled).
    fn push_span(
        &self,
        view: &View,
        changed: usize,
        removed: usize,
        parts: usize,
    ) -> (Option<opentelemetry_sdk::trace::Span>, String) {
        let Some(tracer) = &self.tracer else {
            return (None, String::new());
        };
        let span = tracer
            .span_builder("push config")
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("infermesh.proxy.node", self.workload.node.clone()),
                KeyValue::new("infermesh.proxy.identity", self.workload.identity.clone()),
                KeyValue::new("infermesh.version", view.version.clone()),
                KeyValue::new("infermesh.resources.changed", changed as i64),
                KeyValue::new("infermesh.resources.removed", removed as i64),
                KeyValue::new("infermesh.parts", parts as i64),
            ])
            .start_with_context(tracer, &opentelemetry::Context::new());
        if !span.span_context().is_sampled() {
            return (None, String::new());
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(
            &opentelemetry::Context::new().with_remote_span_context(span.span_context().clone()),
            &mut carrier,
        );
        let traceparent = carrier.remove("traceparent").unwrap_or_default();
        (Some(span), traceparent)
    }

    fn record(&self, change: impl FnOnce(&mut ProxyStatus)) {
        if let Some(status) = self.proxies.lock().get_mut(&self.id) {
            change(status);
        }
    }
}

/// The largest part of an update, roughly: resources are added to a part
/// until it holds this many bytes of documents (one larger resource
/// makes a part of its own).
const PART_BYTES: usize = 6 * 1024;

/// `resources` in parts of about [`PART_BYTES`]; always at least one part
/// (an update with nothing to add still says the version).
fn split<'a>(resources: &[&'a Arc<Pushed>]) -> Vec<Vec<&'a Arc<Pushed>>> {
    let mut parts = vec![Vec::new()];
    let mut size = 0;
    for &resource in resources {
        let bytes = resource.document_json.len() + resource.name.len() + 64;
        let part = parts.last_mut().expect("one part at least");
        if !part.is_empty() && size + bytes > PART_BYTES {
            parts.push(Vec::new());
            size = 0;
        }
        size += bytes;
        parts.last_mut().expect("one part at least").push(resource);
    }
    parts
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
