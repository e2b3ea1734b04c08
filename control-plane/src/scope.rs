//! What each proxy is told: the part of the mesh's config in a proxy's
//! scope, as the documents it loads.
//!
//! A snapshot of the source is [`Prepared`] once: every resource is written
//! as the document a sidecar receives (its mesh routes attached to the
//! sidecar's `outbound` listener, its policies to `inbound`, selectors
//! dropped) and given a version, the digest of that document. A proxy's
//! [`View`] is then a choice among them, so that 2,000 proxies cost 2,000
//! choices and no serialisation. A sidecar's scope:
//!
//! - the backends its workload calls: all of them, unless `Sidecar`
//!   resources of its namespace select it, and then the union of their
//!   `egress`;
//! - the mesh routes (those that name no listener) whose backends are all
//!   in that set;
//! - the authorization policies that select it: those of its namespace
//!   whose selector matches its labels (or that have none), and the
//!   mesh-wide ones (no namespace), when they name no listener.
//!
//! A sidecar's labels are those its proxy declares, unless the source
//! vouches for its Pod (Kubernetes: the injected Pod of the proxy's node
//! name, namespace and identity), whose labels are used instead.
//!
//! Listeners go to the proxies they select by label: a gateway runs those
//! whose selector matches its labels and those without one; a sidecar,
//! beside its capture listeners, those whose selector matches (a model's
//! own mutual-TLS port, say). With a listener come the routes and
//! policies that name it (attached to the proxy's listeners only) and the
//! backends those routes send to.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use infermesh_api::{Config, Kind, ParentKind, RouteSpec};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::resolve::Resolved;
use crate::source::{Snapshot, WorkloadLabels};

/// What a proxy runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// A pod's sidecar.
    Sidecar,
    /// A gateway.
    Gateway,
}

impl ProxyMode {
    /// The mode a hello names.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "sidecar" => Some(ProxyMode::Sidecar),
            "gateway" => Some(ProxyMode::Gateway),
            _ => None,
        }
    }
}

/// The proxy a view is for, as its certificate and its hello say.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    /// Sidecar or gateway.
    pub mode: ProxyMode,
    /// The proxy's name (a pod name).
    pub node: String,
    /// Its namespace, from its certificate's SPIFFE ID.
    pub namespace: String,
    /// Its SPIFFE ID.
    pub identity: String,
    /// Its labels, which `Sidecar` resources and policy selectors match.
    pub labels: BTreeMap<String, String>,
}

/// One resource as proxies receive it.
#[derive(Debug, Serialize)]
pub struct Pushed {
    /// Its kind.
    #[serde(serialize_with = "kind_name")]
    pub kind: Kind,
    /// Its qualified name.
    pub name: String,
    /// A digest of the document.
    pub version: String,
    /// The document, JSON.
    #[serde(skip)]
    pub document_json: String,
}

fn kind_name<S: serde::Serializer>(kind: &Kind, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(kind.as_str())
}

impl Pushed {
    /// The key a proxy holds it under: `Kind/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    fn new(kind: Kind, name: String, document: &Value) -> Self {
        let document_json = document.to_string();
        let version = digest(document_json.as_bytes());
        Pushed {
            kind,
            name,
            version,
            document_json,
        }
    }
}

/// What one proxy should hold: its resources by key.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The resources, by [`Pushed::key`].
    pub resources: BTreeMap<String, Arc<Pushed>>,
    /// A digest of every key and version: equal views, equal versions.
    pub version: String,
}

impl View {
    fn new(resources: BTreeMap<String, Arc<Pushed>>) -> Self {
        let mut hasher = Sha256::new();
        for (key, resource) in &resources {
            hasher.update(key.as_bytes());
            hasher.update([0]);
            hasher.update(resource.version.as_bytes());
            hasher.update([0]);
        }
        let version = hex(&hasher.finalize()[..8]);
        View { resources, version }
    }
}

/// A snapshot of the source, its documents written once for every proxy.
pub struct Prepared {
    /// When the control plane saw this snapshot: pushes of it are timed
    /// from here to the proxy's acknowledgement.
    pub seen: Instant,
    config: Arc<Config>,
    /// The Pods whose labels stand for their proxies' own.
    workloads: Arc<WorkloadLabels>,
    /// Every document as written, for the views that attach it
    /// differently (gateways).
    documents: HashMap<(Kind, String), Value>,
    backends: HashMap<String, Arc<Pushed>>,
    routes: HashMap<String, Arc<Pushed>>,
    policies: HashMap<String, Arc<Pushed>>,
    /// Views made so far: proxies of one mode, namespace and labels (the
    /// replicas of a workload) share one.
    views: Mutex<HashMap<ViewKey, Arc<View>>>,
}

/// What a view depends on.
type ViewKey = (ProxyMode, String, BTreeMap<String, String>);

impl Prepared {
    /// Writes every resource of `snapshot` as a sidecar receives it, with
    /// the DNS names of endpoints replaced by the addresses `resolved`
    /// gives them.
    pub fn new(snapshot: &Snapshot, resolved: &Resolved) -> Self {
        let config = snapshot.config.clone();
        let mut documents: HashMap<(Kind, String), Value> = config
            .documents()
            .into_iter()
            .map(|d| ((d.kind, d.name), d.value))
            .collect();
        // A resource as sidecars receive it: its document, with `edit`
        // made to its spec.
        let pushed =
            |kind: Kind, name: &str, edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
                let mut document = documents[&(kind, name.to_owned())].clone();
                if let Some(spec) = document["spec"].as_object_mut() {
                    edit(spec);
                }
                (
                    name.to_owned(),
                    Arc::new(Pushed::new(kind, name.to_owned(), &document)),
                )
            };
        let backends: HashMap<String, Arc<Pushed>> = config
            .backends
            .iter()
            .map(|b| {
                pushed(Kind::Backend, &b.name, &|spec| {
                    if let Some(endpoints) = resolved_endpoints(&b.spec, resolved) {
                        spec.insert("endpoints".into(), endpoints);
                    }
                })
            })
            .collect();
        let namespaces: HashMap<&str, Option<&str>> = config
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.namespace.as_deref()))
            .collect();
        let routes = config
            .routes
            .iter()
            .filter(|r| is_mesh_route(&r.spec))
            .map(|r| {
                // A service's route serves the names its callers use.
                let mut hostnames = r.spec.hostnames.clone();
                for parent in service_parents(&r.spec) {
                    let namespace = namespaces.get(parent).copied().flatten();
                    hostnames.extend(RouteSpec::service_hostnames(parent, namespace));
                }
                pushed(Kind::Route, &r.name, &|spec| {
                    spec.remove("parentRefs");
                    spec.insert("listeners".into(), Value::from(vec![OUTBOUND]));
                    spec.insert("hostnames".into(), Value::from(hostnames.clone()));
                })
            })
            .collect();
        let policies = config
            .policies
            .iter()
            .filter(|p| p.spec.listeners.is_empty())
            .map(|p| {
                pushed(Kind::AuthorizationPolicy, &p.name, &|spec| {
                    spec.remove("selector");
                    spec.insert("listeners".into(), Value::from(vec![INBOUND]));
                })
            })
            .collect();
        // Kept as values only what listener views attach afresh: the
        // listeners, and what names them.
        let mut attached = HashMap::new();
        let mut keep = |kind: Kind, name: &str| {
            let key = (kind, name.to_owned());
            if let Some(document) = documents.remove(&key) {
                attached.insert(key, document);
            }
        };
        for listener in &config.listeners {
            keep(Kind::Listener, &listener.name);
        }
        for route in config
            .routes
            .iter()
            .filter(|r| !listener_parents(&r.spec).is_empty())
        {
            keep(Kind::Route, &route.name);
        }
        for policy in config
            .policies
            .iter()
            .filter(|p| !p.spec.listeners.is_empty())
        {
            keep(Kind::AuthorizationPolicy, &policy.name);
        }
        Prepared {
            seen: Instant::now(),
            config,
            workloads: snapshot.workloads.clone(),
            documents: attached,
            backends,
            routes,
            policies,
            views: Mutex::default(),
        }
    }

    /// What `workload` should hold; made once for every workload of the
    /// same mode, namespace and labels.
    pub fn view(&self, workload: &Workload) -> Arc<View> {
        // A Pod the source vouches for (Kubernetes) gives its own labels,
        // whatever its proxy declares; only to the proxy of its identity.
        let vouched = self
            .workloads
            .get(&(workload.namespace.clone(), workload.node.clone()))
            .filter(|(identity, _)| *identity == workload.identity);
        let with_pod_labels;
        let workload = match vouched {
            Some((_, labels)) => {
                with_pod_labels = Workload {
                    labels: labels.clone(),
                    ..workload.clone()
                };
                &with_pod_labels
            }
            None => workload,
        };
        let key = (
            workload.mode,
            workload.namespace.clone(),
            workload.labels.clone(),
        );
        // Poisoning leaves a map of whole views: each insert is one step.
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views
            .entry(key)
            .or_insert_with(|| Arc::new(self.make_view(workload)))
            .clone()
    }

    fn make_view(&self, workload: &Workload) -> View {
        let mut resources = BTreeMap::new();
        self.add_listeners(workload, &mut resources);
        if workload.mode == ProxyMode::Sidecar {
            self.add_sidecar_scope(workload, &mut resources);
        }
        View::new(resources)
    }

    /// The listeners `workload` runs, what names them (attached to them
    /// alone), and the backends those routes use. A gateway runs every
    /// listener whose selector matches its labels, and those without a
    /// selector; a sidecar (which has its capture listeners) only those
    /// whose selector matches.
    fn add_listeners(&self, workload: &Workload, resources: &mut BTreeMap<String, Arc<Pushed>>) {
        let config = &self.config;
        let runs: BTreeSet<&str> = config
            .listeners
            .iter()
            .filter(|l| match &l.spec.selector {
                Some(selector) => selector.matches(&workload.labels),
                None => workload.mode == ProxyMode::Gateway,
            })
            .map(|l| l.name.as_str())
            .collect();
        let mut add = |kind: Kind, name: &str, attached: Option<Vec<&str>>| {
            let mut document = self.documents[&(kind, name.to_owned())].clone();
            if let Some(spec) = document["spec"].as_object_mut() {
                spec.remove("selector");
                spec.remove("parentRefs");
                if let Some(listeners) = attached {
                    spec.insert("listeners".into(), Value::from(listeners));
                }
            }
            let pushed = Pushed::new(kind, name.to_owned(), &document);
            resources.insert(pushed.key(), Arc::new(pushed));
        };
        for listener in &runs {
            add(Kind::Listener, listener, None);
        }
        fn attached<'a>(listeners: &[&'a str], runs: &BTreeSet<&str>) -> Vec<&'a str> {
            listeners
                .iter()
                .copied()
                .filter(|l| runs.contains(l))
                .collect()
        }
        let mut backends = BTreeSet::new();
        for route in &config.routes {
            let on = attached(&listener_parents(&route.spec), &runs);
            if !on.is_empty() {
                backends.extend(route.spec.rules.iter().flat_map(|r| r.backend_names()));
                add(Kind::Route, &route.name, Some(on));
            }
        }
        for policy in &config.policies {
            let listeners: Vec<&str> = policy.spec.listeners.iter().map(String::as_str).collect();
            let on = attached(&listeners, &runs);
            if !on.is_empty() {
                add(Kind::AuthorizationPolicy, &policy.name, Some(on));
            }
        }
        for backend in backends {
            let pushed = &self.backends[backend];
            resources.insert(pushed.key(), pushed.clone());
        }
    }

    /// What the sidecar of `workload` should hold beside its listeners:
    /// the backends and mesh routes of the services it calls, and the
    /// policies that select it.
    fn add_sidecar_scope(
        &self,
        workload: &Workload,
        resources: &mut BTreeMap<String, Arc<Pushed>>,
    ) {
        let config = &self.config;
        let in_namespace =
            |namespace: &Option<String>| namespace.as_deref() == Some(&workload.namespace);
        let narrowing: Vec<_> = config
            .sidecars
            .iter()
            .filter(|s| in_namespace(&s.namespace))
            .filter(|s| {
                s.spec
                    .selector
                    .as_ref()
                    .is_none_or(|selector| selector.matches(&workload.labels))
            })
            .collect();
        let called: HashSet<&str> = config
            .backends
            .iter()
            .filter(|b| {
                narrowing.is_empty()
                    || narrowing
                        .iter()
                        .any(|s| s.spec.allows(&b.name, b.namespace.as_deref()))
            })
            .map(|b| b.name.as_str())
            .collect();
        let calls = |backend: &str| called.contains(backend);
        let mut add = |pushed: &Arc<Pushed>| {
            resources.insert(pushed.key(), pushed.clone());
        };
        for backend in &config.backends {
            if calls(&backend.name) {
                add(&self.backends[&backend.name]);
            }
        }
        for route in &config.routes {
            let Some(pushed) = self.routes.get(&route.name) else {
                continue;
            };
            let reachable = route
                .spec
                .rules
                .iter()
                .flat_map(|rule| rule.backend_names())
                .all(calls);
            // A service's route matters to the service's callers only.
            let parents: Vec<&str> = service_parents(&route.spec).collect();
            if reachable && (parents.is_empty() || parents.into_iter().any(calls)) {
                add(pushed);
            }
        }
        for policy in &config.policies {
            let Some(pushed) = self.policies.get(&policy.name) else {
                continue;
            };
            let applies = (policy.namespace.is_none() || in_namespace(&policy.namespace))
                && policy
                    .spec
                    .selector
                    .as_ref()
                    .is_none_or(|selector| selector.matches(&workload.labels));
            if applies {
                add(pushed);
            }
        }
    }
}

/// Whether `route` is for sidecars' calls: it names no listener (a mesh
/// route of host names) or has a `Backend` parent (GAMMA's service).
fn is_mesh_route(route: &RouteSpec) -> bool {
    let listener_parent = route
        .parent_refs
        .iter()
        .any(|p| p.kind == ParentKind::Listener);
    (route.listeners.is_empty() && !listener_parent) || service_parents(route).next().is_some()
}

/// The backends `route` attaches to (GAMMA's services).
fn service_parents(route: &RouteSpec) -> impl Iterator<Item = &str> {
    route
        .parent_refs
        .iter()
        .filter(|p| p.kind == ParentKind::Backend)
        .map(|p| p.name.as_str())
}

/// The listeners `route` attaches to: `listeners` and its `Listener`
/// parents.
fn listener_parents(route: &RouteSpec) -> Vec<&str> {
    let parents = route
        .parent_refs
        .iter()
        .filter(|p| p.kind == ParentKind::Listener)
        .map(|p| p.name.as_str());
    route
        .listeners
        .iter()
        .map(String::as_str)
        .chain(parents)
        .collect()
}

/// A backend's endpoints with every DNS name replaced by the addresses it
/// resolved to (each with the name's weight); `None` when it names none.
/// An address met twice is kept once: a proxy refuses duplicates.
fn resolved_endpoints(spec: &infermesh_api::BackendSpec, resolved: &Resolved) -> Option<Value> {
    use infermesh_api::EndpointTarget;
    let targets: Vec<_> = spec.endpoints.iter().map(|e| (e, e.target())).collect();
    if !targets
        .iter()
        .any(|(_, t)| matches!(t, Ok(EndpointTarget::Dns { .. })))
    {
        return None;
    }
    let mut seen = HashSet::new();
    let mut endpoints = Vec::new();
    for (endpoint, target) in targets {
        match target {
            Ok(EndpointTarget::Dns { host, port }) => {
                let addresses = resolved.get(&(host, port)).into_iter().flatten();
                for address in addresses {
                    if seen.insert(*address) {
                        endpoints.push(serde_json::json!({
                            "address": address.to_string(),
                            "weight": endpoint.weight,
                        }));
                    }
                }
            }
            Ok(EndpointTarget::Socket(address)) => {
                if seen.insert(address) {
                    endpoints.push(serde_json::to_value(endpoint).expect("JSON"));
                }
            }
            Err(_) => {}
        }
    }
    Some(Value::from(endpoints))
}

/// The sidecar's capture listeners, which mesh routes and policies attach to.
const OUTBOUND: &str = "outbound";
const INBOUND: &str = "inbound";

/// A short hex digest.
fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes)[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_api::Source;

    const MESH: &str = "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: llama, namespace: models }
spec: { endpoints: [{ address: 127.0.0.1:9001 }] }
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: mistral, namespace: models }
spec: { endpoints: [{ address: 127.0.0.1:9002 }] }
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: chat, namespace: models }
spec:
  hostnames: [chat.models]
  rules: [{ backends: [{ name: llama }, { name: mistral }] }]
---
apiVersion: infermesh.io/v1alpha1
kind: Sidecar
metadata: { name: narrow, namespace: apps }
spec:
  selector: { matchLabels: { app: chat } }
  egress: [llama.models]
---
apiVersion: infermesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: callers, namespace: models }
spec:
  selector: { matchLabels: { app: llama } }
  rules: [{ from: [{ namespaces: [apps] }] }]
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: public }
spec: { address: 127.0.0.1:8080 }
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: edge }
spec:
  listeners: [public]
  rules: [{ backends: [{ name: llama.models }] }]
";

    fn prepared(text: &str) -> Prepared {
        let config = Config::load(&[Source {
            name: "mesh.yaml",
            text,
        }])
        .unwrap_or_else(|e| panic!("{e}"));
        Prepared::new(
            &Snapshot {
                version: config.version(),
                config: Arc::new(config),
                workloads: Arc::default(),
            },
            &Resolved::new(),
        )
    }

    fn workload(namespace: &str, app: &str) -> Workload {
        Workload {
            mode: ProxyMode::Sidecar,
            node: format!("{app}-0"),
            namespace: namespace.into(),
            identity: format!("spiffe://cluster.local/ns/{namespace}/sa/{app}"),
            labels: BTreeMap::from([("app".into(), app.into())]),
        }
    }

    fn keys(view: &View) -> Vec<&str> {
        view.resources.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_sidecar_sees_what_its_workload_calls_and_the_policies_that_select_it() {
        let mesh = prepared(MESH);
        // Narrowed to llama: the route, which also needs mistral, is out.
        assert_eq!(
            keys(&mesh.view(&workload("apps", "chat"))),
            ["Backend/llama.models"]
        );
        // Not narrowed: every backend and mesh route; the gateway's route
        // (it names a listener) is never a sidecar's.
        assert_eq!(
            keys(&mesh.view(&workload("apps", "batch"))),
            [
                "Backend/llama.models",
                "Backend/mistral.models",
                "Route/chat.models"
            ]
        );
        assert_eq!(
            keys(&mesh.view(&workload("models", "llama"))),
            [
                "AuthorizationPolicy/callers.models",
                "Backend/llama.models",
                "Backend/mistral.models",
                "Route/chat.models"
            ]
        );
    }

    #[test]
    fn a_view_loads_as_a_sidecar_config_with_its_routes_and_policies_on_the_capture_listeners() {
        let mesh = prepared(MESH);
        let view = mesh.view(&workload("models", "llama"));
        let texts: Vec<(String, String)> = view
            .resources
            .iter()
            .map(|(key, r)| (key.clone(), r.document_json.clone()))
            .collect();
        let sources: Vec<Source<'_>> = texts
            .iter()
            .map(|(name, text)| Source { name, text })
            .collect();
        let builtin = Source {
            name: "builtin",
            text: "apiVersion: infermesh.io/v1alpha1\nkind: Listener\nmetadata: { name: inbound }\nspec: { address: 127.0.0.1:15006 }\n---\napiVersion: infermesh.io/v1alpha1\nkind: Listener\nmetadata: { name: outbound }\nspec: { address: 127.0.0.1:15001 }\n",
        };
        let config =
            Config::load_with_defaults(&sources, &[builtin]).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.mesh_only_problems().is_empty());
        assert_eq!(
            config.route("chat.models").unwrap().spec.listeners,
            [OUTBOUND]
        );
        let policy = &config.policies[0];
        assert_eq!(policy.spec.listeners, [INBOUND]);
        assert_eq!(policy.spec.selector, None);
    }

    #[test]
    fn a_gateway_runs_the_listeners_that_select_it_and_what_names_them() {
        let text = format!(
            "{MESH}---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: internal }}
spec: {{ address: 127.0.0.1:8081, selector: {{ matchLabels: {{ gateway: internal }} }} }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: both }}
spec:
  listeners: [public, internal]
  rules: [{{ backends: [{{ name: mistral.models }}] }}]
"
        );
        let mesh = prepared(&text);
        let mut edge = workload("edge", "edge");
        edge.mode = ProxyMode::Gateway;
        let view = mesh.view(&edge);
        assert_eq!(
            keys(&view),
            [
                "Backend/llama.models",
                "Backend/mistral.models",
                "Listener/public",
                "Route/both",
                "Route/edge"
            ]
        );
        let both: Value =
            serde_json::from_str(&view.resources["Route/both"].document_json).unwrap();
        assert_eq!(both["spec"]["listeners"], serde_json::json!(["public"]));
        edge.labels.insert("gateway".into(), "internal".into());
        assert!(mesh.view(&edge).resources.contains_key("Listener/internal"));
    }

    #[test]
    fn a_sidecar_runs_only_the_listeners_that_select_it() {
        let text = format!(
            "{MESH}---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: llama-mtls, namespace: models }}
spec: {{ address: 127.0.0.1:15443, tls: {{ mode: strict }}, selector: {{ matchLabels: {{ app: llama }} }} }}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: llama-app, namespace: models }}
spec: {{ endpoints: [{{ address: 127.0.0.1:9000 }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: llama-in, namespace: models }}
spec:
  listeners: [llama-mtls]
  rules: [{{ backends: [{{ name: llama-app }}] }}]
"
        );
        let mesh = prepared(&text);
        let llama = keys(&mesh.view(&workload("models", "llama")))
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        for key in [
            "Listener/llama-mtls.models",
            "Route/llama-in.models",
            "Backend/llama-app.models",
        ] {
            assert!(llama.iter().any(|k| k == key), "{key} not in {llama:?}");
        }
        // The gateway's listener (no selector) is not a sidecar's, and a
        // sidecar of another app does not run llama's.
        assert!(!llama.iter().any(|k| k == "Listener/public"));
        let batch = mesh.view(&workload("apps", "batch"));
        assert!(!batch.resources.contains_key("Listener/llama-mtls.models"));
    }

    #[test]
    fn a_route_attached_to_a_backend_serves_its_callers_by_its_service_names() {
        let text = format!(
            "{MESH}---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: canary, namespace: models }}
spec:
  parentRefs: [{{ kind: Backend, name: mistral }}]
  rules:
    - matches: [{{ headers: [{{ name: x-canary, exact: \"1\" }}] }}]
      backends: [{{ name: llama }}]
    - backends: [{{ name: mistral }}]
"
        );
        let mesh = prepared(&text);
        let batch = mesh.view(&workload("apps", "batch"));
        let route: Value =
            serde_json::from_str(&batch.resources["Route/canary.models"].document_json).unwrap();
        assert_eq!(route["spec"]["listeners"], serde_json::json!([OUTBOUND]));
        assert_eq!(
            route["spec"]["hostnames"],
            serde_json::json!([
                "mistral.models",
                "mistral.models.svc",
                "mistral.models.svc.cluster.local"
            ])
        );
        assert!(route["spec"].get("parentRefs").is_none());
        // chat-0 does not call mistral: the route is not its concern.
        let chat = mesh.view(&workload("apps", "chat"));
        assert!(!chat.resources.contains_key("Route/canary.models"));
    }

    #[test]
    fn proxies_are_sent_the_addresses_a_name_resolved_to_never_the_name() {
        let text = "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: llama, namespace: models }
spec:
  endpoints:
    - { address: llama.models.svc:8000, weight: 3 }
    - { address: 10.0.0.1:8000 }
    - { address: 10.0.0.9:8000 }
";
        let config = Config::load(&[Source {
            name: "mesh.yaml",
            text,
        }])
        .unwrap();
        let snapshot = Snapshot {
            version: config.version(),
            config: Arc::new(config),
            workloads: Arc::default(),
        };
        let resolved = Resolved::from([(
            ("llama.models.svc".to_owned(), 8000),
            [
                "10.0.0.1:8000".parse().unwrap(),
                "10.0.0.2:8000".parse().unwrap(),
            ]
            .into(),
        )]);
        let mesh = Prepared::new(&snapshot, &resolved);
        let view = mesh.view(&workload("apps", "chat"));
        let backend: Value =
            serde_json::from_str(&view.resources["Backend/llama.models"].document_json).unwrap();
        // The name's addresses take its weight; an address met twice is
        // kept once (a proxy refuses duplicates).
        assert_eq!(
            backend["spec"]["endpoints"],
            serde_json::json!([
                { "address": "10.0.0.1:8000", "weight": 3 },
                { "address": "10.0.0.2:8000", "weight": 3 },
                { "address": "10.0.0.9:8000", "weight": 1 },
            ])
        );
        // Resolving to other addresses is a change of the backend.
        let moved = Resolved::from([(
            ("llama.models.svc".to_owned(), 8000),
            ["10.0.0.3:8000".parse().unwrap()].into(),
        )]);
        let again = Prepared::new(&snapshot, &moved);
        assert_ne!(view.version, again.view(&workload("apps", "chat")).version);
    }

    #[test]
    fn a_pod_the_source_vouches_for_gives_its_labels_to_its_own_proxy_only() {
        let config = Config::load(&[Source {
            name: "mesh.yaml",
            text: MESH,
        }])
        .unwrap();
        let chat = workload("apps", "chat");
        // The Pod `chat-0` is labelled `app: batch` now, whatever its
        // proxy declares.
        let workloads = WorkloadLabels::from([(
            ("apps".to_owned(), "chat-0".to_owned()),
            (
                chat.identity.clone(),
                BTreeMap::from([("app".to_owned(), "batch".to_owned())]),
            ),
        )]);
        let mesh = Prepared::new(
            &Snapshot {
                version: config.version(),
                config: Arc::new(config),
                workloads: Arc::new(workloads),
            },
            &Resolved::new(),
        );
        let batch = mesh.view(&workload("apps", "batch"));
        assert_eq!(mesh.view(&chat).version, batch.version);
        // Another identity naming the Pod keeps its own labels.
        let mut impostor = chat.clone();
        impostor.identity = "spiffe://cluster.local/ns/apps/sa/other".into();
        assert_eq!(keys(&mesh.view(&impostor)), ["Backend/llama.models"]);
    }

    #[test]
    fn an_endpoint_change_changes_only_the_views_that_hold_its_backend() {
        let before = prepared(MESH);
        let after = prepared(&MESH.replace("127.0.0.1:9002", "127.0.0.1:9012"));
        let chat = workload("apps", "chat");
        let batch = workload("apps", "batch");
        assert_eq!(before.view(&chat).version, after.view(&chat).version);
        let (old, new) = (before.view(&batch), after.view(&batch));
        assert_ne!(old.version, new.version);
        let changed: Vec<&String> = new
            .resources
            .iter()
            .filter(|(key, r)| old.resources[*key].version != r.version)
            .map(|(key, _)| key)
            .collect();
        assert_eq!(changed, ["Backend/mistral.models"]);
    }
}
