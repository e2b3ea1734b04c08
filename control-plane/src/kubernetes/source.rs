//! The Kubernetes [`Source`]: it watches, cluster-wide, infermesh's
//! resources, Services, EndpointSlices, Pods and Gateway API HTTPRoutes
//! with kube's watcher (which lists, watches from the list's
//! resourceVersion, follows bookmarks, and lists again when the API server
//! says the version is gone, 410), keeps the objects as last seen, and
//! after each burst of changes (settled for [`SETTLE`]) builds one config
//! of them ([`translate`](super::translate)), validates the whole, and
//! publishes it. A set that does not validate is reported object by object
//! (kind, namespace/name, field) and the last good snapshot stays.
//!
//! HTTPRoutes are optional: without their CRD (the list answers 404)
//! there are none, said once in the log; they are picked up when the CRD
//! is installed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use infermesh_api::{Config, Diagnostic, Diagnostics, Kind, Source as ConfigText};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt as _;

use super::translate::{self, Key, Objects, PodWorkload, Translated};
use crate::source::{Refused, SETTLE, Snapshot, Source, WorkloadLabels, settle};

/// The Gateway API's HTTPRoute, as GAMMA attaches it to Services.
pub fn http_route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    )
}

/// infermesh's resource of `kind`, as its CRD serves it.
pub fn infermesh_resource(kind: Kind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            infermesh_api::crd::GROUP,
            infermesh_api::crd::VERSION,
            kind.as_str(),
        ),
        translate::plural(kind),
    )
}

/// The objects as last seen, and which watches have listed them once.
#[derive(Default)]
struct State {
    objects: Objects,
    synced: BTreeSet<String>,
}

/// The config read from the Kubernetes API.
pub struct KubernetesSource {
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl KubernetesSource {
    /// Watches the API server `client` talks to and returns once every
    /// watch has listed its objects and they make a valid config (until
    /// then, each set refused is sent on `refused` and logged).
    /// `trust_domain` makes the SPIFFE IDs of the Pods' endpoints.
    pub async fn start(
        client: kube::Client,
        trust_domain: String,
        refused: mpsc::UnboundedSender<Refused>,
    ) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let (changed, changes) = mpsc::channel(1);
        let mut watches = Vec::new();
        for kind in Kind::ALL {
            let what = format!("{}.{}", translate::plural(kind), infermesh_api::crd::GROUP);
            watches.push(what.clone());
            let api = Api::all_with(client.clone(), &infermesh_resource(kind));
            let mirror = Mirror::new(what, state.clone(), changed.clone(), false);
            tokio::spawn(mirror.run(api, move |o| o.resources.entry(kind).or_default()));
        }
        let mirror = Mirror::new("services".into(), state.clone(), changed.clone(), false);
        watches.push(mirror.what.clone());
        tokio::spawn(mirror.run(Api::<Service>::all(client.clone()), |o| &mut o.services));
        let mirror = Mirror::new(
            "endpointslices.discovery.k8s.io".into(),
            state.clone(),
            changed.clone(),
            false,
        );
        watches.push(mirror.what.clone());
        tokio::spawn(mirror.run(Api::<EndpointSlice>::all(client.clone()), |o| {
            &mut o.endpoint_slices
        }));
        let mirror = Mirror::new("pods".into(), state.clone(), changed.clone(), false);
        watches.push(mirror.what.clone());
        tokio::spawn(mirror.run(Api::<Pod>::all(client.clone()), |o| &mut o.pods));
        let mirror = Mirror::new(
            "httproutes.gateway.networking.k8s.io".into(),
            state.clone(),
            changed,
            true,
        );
        watches.push(mirror.what.clone());
        tokio::spawn(mirror.run(
            Api::<DynamicObject>::all_with(client, &http_route_resource()),
            |o| &mut o.http_routes,
        ));

        let (first, accepted) = oneshot::channel();
        let (publish, snapshots) = watch::channel(Arc::new(empty()));
        tokio::spawn(build(
            state,
            watches,
            settle(changes, SETTLE),
            trust_domain,
            publish,
            refused,
            first,
        ));
        let _ = accepted.await;
        KubernetesSource { snapshots }
    }
}

impl Source for KubernetesSource {
    fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }
}

fn empty() -> Snapshot {
    let config = Config::default();
    Snapshot {
        version: config.version(),
        config: Arc::new(config),
        workloads: Arc::default(),
    }
}

/// Builds a config each time the objects settle, once every watch has
/// listed; publishes it if it validates and differs, reports it if not.
async fn build(
    state: Arc<Mutex<State>>,
    watches: Vec<String>,
    mut settled: mpsc::Receiver<()>,
    trust_domain: String,
    publish: watch::Sender<Arc<Snapshot>>,
    refused: mpsc::UnboundedSender<Refused>,
    first: oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let mut warned = BTreeSet::new();
    while settled.recv().await.is_some() {
        let translated = {
            let state = state.lock().unwrap_or_else(|e| e.into_inner());
            if watches.iter().any(|w| !state.synced.contains(w)) {
                continue;
            }
            translate::translate(&state.objects, &trust_domain)
        };
        for warning in translated.warnings.difference(&warned) {
            eprintln!("infermesh-control-plane: kubernetes: {warning}");
        }
        warned = translated.warnings.clone();
        match load(&translated) {
            Ok((config, dropped)) => {
                for (source, diagnostics) in dropped {
                    eprintln!(
                        "infermesh-control-plane: kubernetes: {source} is left out, it does not make a valid document:\n{diagnostics}"
                    );
                }
                let snapshot = snapshot(config, &translated.workloads);
                publish.send_if_modified(|current| {
                    let new = current.version != snapshot.version;
                    if new {
                        *current = Arc::new(snapshot);
                    }
                    new
                });
                if let Some(first) = first.take() {
                    let _ = first.send(());
                }
            }
            Err(diagnostics) => {
                let kept = if first.is_some() {
                    "none (no valid config yet)".to_owned()
                } else {
                    publish.borrow().version.clone()
                };
                let _ = refused.send(Refused { diagnostics, kept });
            }
        }
    }
}

/// Validates every document as one config. A derived document (of a
/// Service or an HTTPRoute) with a problem is left out, with its problems,
/// and the rest validated again: what Kubernetes objects make never blocks
/// the mesh's own resources. A problem in an infermesh resource refuses
/// the whole set.
fn load(translated: &Translated) -> Result<(Config, Vec<(String, Diagnostics)>), Diagnostics> {
    let mut left_out: BTreeSet<&str> = BTreeSet::new();
    let mut dropped = Vec::new();
    loop {
        let sources: Vec<ConfigText<'_>> = translated
            .documents
            .iter()
            .filter(|d| !left_out.contains(d.source.as_str()))
            .map(|d| ConfigText {
                name: &d.source,
                text: &d.text,
            })
            .collect();
        let diagnostics = match Config::load(&sources) {
            Ok(config) => return Ok((config, dropped)),
            Err(diagnostics) => diagnostics,
        };
        let derived: BTreeSet<&str> = translated
            .documents
            .iter()
            .filter(|d| d.derived)
            .map(|d| d.source.as_str())
            .collect();
        let blamed: BTreeSet<&str> = diagnostics
            .0
            .iter()
            .filter_map(|d| derived.get(d.file.as_str()).copied())
            .collect();
        if blamed.is_empty()
            || diagnostics
                .0
                .iter()
                .any(|d| !derived.contains(d.file.as_str()))
        {
            // A resource someone wrote is wrong: the whole set is refused.
            return Err(diagnostics);
        }
        for source in &blamed {
            let problems: Vec<Diagnostic> = diagnostics
                .0
                .iter()
                .filter(|d| d.file == *source)
                .cloned()
                .collect();
            dropped.push(((*source).to_owned(), Diagnostics(problems)));
        }
        left_out.extend(blamed);
    }
}

/// The snapshot of `config` with the injected Pods' workloads: its
/// version covers both.
fn snapshot(config: Config, workloads: &BTreeMap<Key, PodWorkload>) -> Snapshot {
    let mut hasher = Sha256::new();
    hasher.update(config.version().as_bytes());
    let mut table = WorkloadLabels::new();
    for ((namespace, name), workload) in workloads {
        for part in [namespace, name, &workload.identity] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        for (key, value) in &workload.labels {
            hasher.update(key.as_bytes());
            hasher.update([1]);
            hasher.update(value.as_bytes());
            hasher.update([0]);
        }
        table.insert(
            (namespace.clone(), name.clone()),
            (workload.identity.clone(), workload.labels.clone()),
        );
    }
    let version = hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Snapshot {
        version,
        config: Arc::new(config),
        workloads: Arc::new(table),
    }
}

/// One watch, kept in [`State`].
struct Mirror {
    what: String,
    state: Arc<Mutex<State>>,
    changed: mpsc::Sender<()>,
    /// Whether a missing resource (404: its CRD is not installed) means
    /// none rather than an error.
    optional: bool,
}

impl Mirror {
    fn new(
        what: String,
        state: Arc<Mutex<State>>,
        changed: mpsc::Sender<()>,
        optional: bool,
    ) -> Self {
        Mirror {
            what,
            state,
            changed,
            optional,
        }
    }

    /// Keeps `objects(state)` equal to what `api` lists and watches, for
    /// as long as the control plane runs.
    async fn run<K>(
        self,
        api: Api<K>,
        objects: impl Fn(&mut Objects) -> &mut BTreeMap<Key, K> + Send + 'static,
    ) where
        K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let mut stream =
            std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
        // A list (the first, or after 410 Gone) is applied whole at its
        // end, so that a set half listed is never built.
        let mut listing: Option<BTreeMap<Key, K>> = None;
        let mut absent = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => listing = Some(BTreeMap::new()),
                Ok(Event::InitApply(object)) => {
                    listing.get_or_insert_default().insert(key(&object), object);
                }
                Ok(Event::InitDone) => {
                    let listed = listing.take().unwrap_or_default();
                    self.change(|state| {
                        *objects(&mut state.objects) = listed;
                        state.synced.insert(self.what.clone());
                    });
                    absent = false;
                }
                Ok(Event::Apply(object)) => self.change(|state| {
                    objects(&mut state.objects).insert(key(&object), object);
                }),
                Ok(Event::Delete(object)) => self.change(|state| {
                    objects(&mut state.objects).remove(&key(&object));
                }),
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if self.optional && status.is_not_found() =>
                {
                    if !absent {
                        eprintln!(
                            "infermesh-control-plane: kubernetes: no {} in this cluster (its CRD is not installed): there are none until it is",
                            self.what
                        );
                        absent = true;
                        self.change(|state| {
                            objects(&mut state.objects).clear();
                            state.synced.insert(self.what.clone());
                        });
                    }
                }
                Err(e) => eprintln!(
                    "infermesh-control-plane: kubernetes: watch of {}: {e}; trying again",
                    self.what
                ),
            }
        }
    }

    fn change(&self, edit: impl FnOnce(&mut State)) {
        edit(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        // A full channel already holds a pending change.
        let _ = self.changed.try_send(());
    }
}

fn key<K: kube::Resource>(object: &K) -> Key {
    let meta = object.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}
