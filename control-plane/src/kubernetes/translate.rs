//! What the Kubernetes objects mean to the mesh: the objects the source
//! watches ([`Objects`]) written as the config documents the directory
//! source reads, to be validated by the same `infermesh_api` code.
//!
//! - infermesh's own resources (`backends.infermesh.io`, ...) as written;
//! - each Service a `Backend` named after it (`SVC`, known as `SVC.NS`)
//!   for its first port, and `SVC-PORTNAME` for each further port, whose
//!   endpoints are the ready addresses of its EndpointSlices, each with its
//!   Pod's SPIFFE ID when every endpoint's Pod is injected (the backend
//!   then speaks mesh TLS); its cluster IPs are the backend's `addresses`;
//!   and a `Route` named `SVC`, attached to that backend, so that the
//!   Service's names reach it;
//! - each HTTPRoute attached to a Service (GAMMA) a `Route` named
//!   `httproute-NAME` attached to the Service's backend, in place of its
//!   default route; one that cannot be translated whole is left out, with
//!   a warning that names it and the field.
//!
//! A `Backend` or `Route` resource named like a derived one wins over it
//! (a `Backend` without `endpoints` is given the Service's). Each document
//! is a source of its own, named after its object (`backends.infermesh.io
//! models/llama`), so that a problem is reported with the object and the
//! field.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use infermesh_api::Kind;
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use serde_json::{Map, Value, json};

use crate::inject::sidecar::PROXY_CONTAINER;

/// The label an EndpointSlice names its Service by.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Namespace and name: how every object is keyed.
pub type Key = (String, String);

/// Everything the source watches, as last seen.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// infermesh's resources, by kind.
    pub resources: BTreeMap<Kind, BTreeMap<Key, DynamicObject>>,
    /// core/v1 Services.
    pub services: BTreeMap<Key, Service>,
    /// discovery.k8s.io/v1 EndpointSlices.
    pub endpoint_slices: BTreeMap<Key, EndpointSlice>,
    /// core/v1 Pods.
    pub pods: BTreeMap<Key, Pod>,
    /// gateway.networking.k8s.io/v1 HTTPRoutes.
    pub http_routes: BTreeMap<Key, DynamicObject>,
}

/// One config document and the name problems with it are reported by.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// The object it comes from: `backends.infermesh.io models/llama`,
    /// `Service models/llama (Backend llama)`.
    pub source: String,
    /// Whether it is derived from Kubernetes objects (a Service, an
    /// HTTPRoute) rather than an infermesh resource written by someone.
    pub derived: bool,
    /// The document, JSON.
    pub text: String,
}

/// What a proxy of an injected Pod is: its SPIFFE ID and the Pod's labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodWorkload {
    /// `spiffe://TRUST_DOMAIN/ns/NS/sa/SERVICE_ACCOUNT`.
    pub identity: String,
    /// The Pod's labels.
    pub labels: BTreeMap<String, String>,
}

/// The objects written as config documents.
#[derive(Clone, Debug, Default)]
pub struct Translated {
    /// Every document.
    pub documents: Vec<Document>,
    /// The injected Pods, by namespace and name.
    pub workloads: BTreeMap<Key, PodWorkload>,
    /// What was left out or changed, and why.
    pub warnings: BTreeSet<String>,
}

/// Writes `objects` as config documents; `trust_domain` makes the Pods'
/// SPIFFE IDs.
pub fn translate(objects: &Objects, trust_domain: &str) -> Translated {
    let mut out = Translated::default();
    let identities = pod_identities(objects, trust_domain, &mut out.workloads);
    let services = services(objects, &identities, &mut out.warnings);
    let http_routes = http_routes(objects, &services, &mut out.warnings);

    let named = |kind: Kind, namespace: &str, name: &str| {
        objects
            .resources
            .get(&kind)
            .is_some_and(|r| r.contains_key(&(namespace.to_owned(), name.to_owned())))
    };
    for (kind, resources) in &objects.resources {
        for ((namespace, name), object) in resources {
            let mut spec = object.data.get("spec").cloned().unwrap_or(Value::Null);
            if *kind == Kind::Backend
                && let Some(service) = services
                    .values()
                    .flat_map(|s| &s.backends)
                    .find(|b| b.namespace == *namespace && b.name == *name)
                && let Some(spec) = spec.as_object_mut()
            {
                // The user's tuning, the Service's endpoints.
                for field in ["endpoints", "addresses", "tls"] {
                    if !spec.contains_key(field)
                        && let Some(value) = service.spec.get(field)
                    {
                        spec.insert(field.to_owned(), value.clone());
                    }
                }
            }
            let document = json!({
                "apiVersion": object.types.as_ref().map_or(infermesh_api::API_VERSION, |t| t.api_version.as_str()),
                "kind": kind.as_str(),
                "metadata": { "name": name, "namespace": namespace },
                "spec": spec,
            });
            out.documents.push(Document {
                source: format!(
                    "{}.{} {namespace}/{name}",
                    plural(*kind),
                    infermesh_api::crd::GROUP
                ),
                derived: false,
                text: pretty(&document),
            });
        }
    }
    for ((namespace, name), route) in &http_routes {
        if named(Kind::Route, namespace, &route.name) {
            out.warnings.insert(format!(
                "HTTPRoute {namespace}/{name} is left out: the Route {namespace}/{} replaces it",
                route.name
            ));
            continue;
        }
        out.documents.push(Document {
            source: format!("HTTPRoute {namespace}/{name}"),
            derived: true,
            text: pretty(&route.document(namespace)),
        });
    }
    let routed: BTreeSet<Key> = http_routes
        .values()
        .flat_map(|r| r.services.iter().cloned())
        .collect();
    for ((namespace, name), service) in &services {
        for backend in &service.backends {
            if named(Kind::Backend, namespace, &backend.name) {
                continue;
            }
            let document = json!({
                "apiVersion": infermesh_api::API_VERSION,
                "kind": "Backend",
                "metadata": { "name": backend.name, "namespace": namespace },
                "spec": backend.spec,
            });
            out.documents.push(Document {
                source: format!("Service {namespace}/{name} (Backend {})", backend.name),
                derived: true,
                text: pretty(&document),
            });
        }
        let key = (namespace.clone(), name.clone());
        if !routed.contains(&key) && !named(Kind::Route, namespace, name) {
            let document = json!({
                "apiVersion": infermesh_api::API_VERSION,
                "kind": "Route",
                "metadata": { "name": name, "namespace": namespace },
                "spec": {
                    "parentRefs": [{ "kind": "Backend", "name": name }],
                    "rules": [{ "backends": [{ "name": name }] }],
                },
            });
            out.documents.push(Document {
                source: format!("Service {namespace}/{name} (Route {name})"),
                derived: true,
                text: pretty(&document),
            });
        }
    }
    out
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("JSON")
}

/// The plural of `kind` in the Kubernetes API.
pub fn plural(kind: Kind) -> &'static str {
    match kind {
        Kind::Listener => "listeners",
        Kind::Backend => "backends",
        Kind::Route => "routes",
        Kind::AuthorizationPolicy => "authorizationpolicies",
        Kind::Sidecar => "sidecars",
    }
}

/// Whether `pod` has the injected proxy.
pub fn is_injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        let init = spec.init_containers.iter().flatten();
        init.chain(&spec.containers)
            .any(|c| c.name == PROXY_CONTAINER)
    })
}

/// The SPIFFE ID of every injected Pod, by namespace and name; its
/// workload (identity and labels) into `workloads`.
fn pod_identities(
    objects: &Objects,
    trust_domain: &str,
    workloads: &mut BTreeMap<Key, PodWorkload>,
) -> HashMap<Key, String> {
    let mut identities = HashMap::new();
    for ((namespace, name), pod) in &objects.pods {
        if !is_injected(pod) {
            continue;
        }
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default");
        let identity = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let key = (namespace.clone(), name.clone());
        identities.insert(key.clone(), identity.clone());
        workloads.insert(key, PodWorkload { identity, labels });
    }
    identities
}

/// The backends made of one Service.
struct ServiceBackends {
    /// One per port, the first named after the Service.
    backends: Vec<DerivedBackend>,
    /// The Service's ports, in the order of `backends`.
    ports: Vec<ServicePort>,
}

struct DerivedBackend {
    namespace: String,
    name: String,
    spec: Map<String, Value>,
}

impl ServiceBackends {
    /// The backend of the Service's `port` (number or name); the first
    /// without one.
    fn backend(&self, port: Option<&Value>) -> Option<&DerivedBackend> {
        let index = match port {
            None => 0,
            Some(Value::Number(n)) => self
                .ports
                .iter()
                .position(|p| Some(i64::from(p.port)) == n.as_i64())?,
            Some(Value::String(s)) => self
                .ports
                .iter()
                .position(|p| p.name.as_deref() == Some(s))?,
            Some(_) => return None,
        };
        self.backends.get(index)
    }
}

fn services(
    objects: &Objects,
    identities: &HashMap<Key, String>,
    warnings: &mut BTreeSet<String>,
) -> BTreeMap<Key, ServiceBackends> {
    let mut slices: HashMap<Key, Vec<&EndpointSlice>> = HashMap::new();
    for ((namespace, _), slice) in &objects.endpoint_slices {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let Some(service) = service {
            slices
                .entry((namespace.clone(), service.clone()))
                .or_default()
                .push(slice);
        }
    }
    let mut taken: BTreeSet<Key> = objects.services.keys().cloned().collect();
    let mut out = BTreeMap::new();
    for (key, service) in &objects.services {
        let (namespace, name) = key;
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ports = spec.ports.clone().unwrap_or_default();
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let no_slices = Vec::new();
        let service_slices = slices.get(key).unwrap_or(&no_slices);
        let mut backends = Vec::new();
        let mut kept_ports = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let backend_name = if i == 0 {
                name.clone()
            } else {
                let suffix = port.name.clone().unwrap_or_else(|| port.port.to_string());
                let candidate = format!("{name}-{suffix}");
                if !taken.insert((namespace.clone(), candidate.clone())) {
                    warnings.insert(format!(
                        "Service {namespace}/{name}: port {suffix} has no Backend of its own: {candidate} is another Service's name"
                    ));
                    continue;
                }
                candidate
            };
            let endpoints = endpoints(port, service_slices, identities);
            let meshed = endpoints.iter().filter(|e| e.1.is_some()).count();
            let tls = meshed > 0 && meshed == endpoints.len();
            if meshed > 0 && !tls {
                warnings.insert(format!(
                    "Service {namespace}/{name}: {meshed} of its {} endpoints are in the mesh; Backend {backend_name} is called in plaintext until all are",
                    endpoints.len()
                ));
            }
            let endpoints: Vec<Value> = endpoints
                .into_iter()
                .map(|(address, identity)| match identity {
                    Some(identity) if tls => json!({ "address": address, "identity": identity }),
                    _ => json!({ "address": address }),
                })
                .collect();
            let mut backend = Map::new();
            backend.insert("endpoints".into(), Value::from(endpoints));
            let addresses: Vec<String> = u16::try_from(port.port)
                .ok()
                .map(|p| {
                    cluster_ips
                        .iter()
                        .map(|ip| SocketAddr::new(*ip, p).to_string())
                        .collect()
                })
                .unwrap_or_default();
            if !addresses.is_empty() {
                backend.insert("addresses".into(), Value::from(addresses));
            }
            if is_http2(port.app_protocol.as_deref()) {
                backend.insert("protocol".into(), Value::from("http2"));
            }
            if tls {
                backend.insert("tls".into(), json!({}));
            }
            backends.push(DerivedBackend {
                namespace: namespace.clone(),
                name: backend_name,
                spec: backend,
            });
            kept_ports.push(port.clone());
        }
        if !backends.is_empty() {
            out.insert(
                key.clone(),
                ServiceBackends {
                    backends,
                    ports: kept_ports,
                },
            );
        }
    }
    out
}

/// Whether a port's `appProtocol` says HTTP/2 in cleartext.
fn is_http2(app_protocol: Option<&str>) -> bool {
    matches!(app_protocol, Some("kubernetes.io/h2c" | "h2c" | "grpc"))
}

/// The ready addresses of `slices` for the Service port `port`, each with
/// the SPIFFE ID of its Pod when the Pod is injected; sorted, once each.
fn endpoints(
    port: &ServicePort,
    slices: &[&EndpointSlice],
    identities: &HashMap<Key, String>,
) -> Vec<(String, Option<String>)> {
    let mut found = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let slice_port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                && p.protocol.as_deref().unwrap_or("TCP")
                    == port.protocol.as_deref().unwrap_or("TCP")
        });
        let Some(number) = slice_port
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready);
            if ready == Some(false) {
                continue;
            }
            // kube-proxy uses the first address of an endpoint.
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let identity = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let namespace = r
                        .namespace
                        .clone()
                        .or_else(|| slice.metadata.namespace.clone())?;
                    identities.get(&(namespace, r.name.clone()?)).cloned()
                });
            found.insert(SocketAddr::new(ip, number).to_string(), identity);
        }
    }
    found.into_iter().collect()
}

/// An HTTPRoute, translated.
struct TranslatedRoute {
    /// The Route's name: `httproute-NAME`.
    name: String,
    /// The Services it attaches to.
    services: Vec<Key>,
    spec: Value,
}

impl TranslatedRoute {
    fn document(&self, namespace: &str) -> Value {
        json!({
            "apiVersion": infermesh_api::API_VERSION,
            "kind": "Route",
            "metadata": { "name": self.name, "namespace": namespace },
            "spec": self.spec,
        })
    }
}

/// The HTTPRoutes attached to Services, translated; those attached to
/// Gateways only are not the mesh's and are passed over; those that cannot
/// be translated whole are left out with a warning.
fn http_routes(
    objects: &Objects,
    services: &BTreeMap<Key, ServiceBackends>,
    warnings: &mut BTreeSet<String>,
) -> BTreeMap<Key, TranslatedRoute> {
    let mut out = BTreeMap::new();
    for ((namespace, name), route) in &objects.http_routes {
        match http_route(namespace, name, &route.data, services) {
            Ok(Some(translated)) => {
                out.insert((namespace.clone(), name.clone()), translated);
            }
            Ok(None) => {}
            Err(Untranslatable { field, why }) => {
                warnings.insert(format!(
                    "HTTPRoute {namespace}/{name} is left out: {field}: {why}"
                ));
            }
        }
    }
    out
}

/// Why an HTTPRoute cannot be translated: the field, and what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct Untranslatable {
    /// The field, e.g. `spec.rules[0].filters`.
    pub field: String,
    /// What about it.
    pub why: String,
}

fn untranslatable(field: impl Into<String>, why: impl Into<String>) -> Untranslatable {
    Untranslatable {
        field: field.into(),
        why: why.into(),
    }
}

/// Refuses every field of `object` but `known`.
fn only(object: &Value, known: &[&str], at: &str) -> Result<(), Untranslatable> {
    if let Some(fields) = object.as_object() {
        for (field, value) in fields {
            let empty = value.is_null() || value.as_array().is_some_and(Vec::is_empty);
            if !known.contains(&field.as_str()) && !empty {
                return Err(untranslatable(
                    format!("{at}.{field}"),
                    "infermesh does not translate this field",
                ));
            }
        }
    }
    Ok(())
}

/// One HTTPRoute (its JSON; `name` is its `metadata.name`), as a
/// Route of namespace `namespace`; `None` when no parent is a Service.
fn http_route(
    namespace: &str,
    name: &str,
    route: &Value,
    services: &BTreeMap<Key, ServiceBackends>,
) -> Result<Option<TranslatedRoute>, Untranslatable> {
    let spec = &route["spec"];
    let mut parents = Vec::new();
    let mut attached = Vec::new();
    for (i, parent) in array(&spec["parentRefs"]).iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        let group = parent["group"]
            .as_str()
            .unwrap_or("gateway.networking.k8s.io");
        let kind = parent["kind"].as_str().unwrap_or("Gateway");
        if kind != "Service" || !matches!(group, "" | "core") {
            continue;
        }
        only(parent, &["group", "kind", "name", "namespace", "port"], &at)?;
        let service = parent["name"].as_str().unwrap_or("");
        let service_namespace = parent["namespace"].as_str().unwrap_or(namespace);
        if service_namespace != namespace {
            return Err(untranslatable(
                format!("{at}.namespace"),
                "a route for the callers of another namespace's Service (a GAMMA consumer route) is not supported",
            ));
        }
        let key = (namespace.to_owned(), service.to_owned());
        let backend = services
            .get(&key)
            .and_then(|s| s.backend(parent.get("port")))
            .ok_or_else(|| {
                untranslatable(
                    at.clone(),
                    format!("no Service {namespace}/{service} (with that port) to attach to"),
                )
            })?;
        parents.push(json!({ "kind": "Backend", "name": backend.name }));
        attached.push(key);
    }
    if parents.is_empty() {
        return Ok(None);
    }
    only(spec, &["parentRefs", "hostnames", "rules"], "spec")?;
    let mut rules = Vec::new();
    for (i, rule) in array(&spec["rules"]).iter().enumerate() {
        rules.push(http_rule(
            namespace,
            rule,
            &format!("spec.rules[{i}]"),
            services,
        )?);
    }
    if rules.is_empty() {
        rules.push(http_rule(namespace, &json!({}), "spec.rules", services)?);
    }
    Ok(Some(TranslatedRoute {
        name: format!("httproute-{name}"),
        services: attached,
        spec: json!({ "parentRefs": parents, "rules": rules }),
    }))
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

fn http_rule(
    namespace: &str,
    rule: &Value,
    at: &str,
    services: &BTreeMap<Key, ServiceBackends>,
) -> Result<Value, Untranslatable> {
    only(rule, &["name", "matches", "backendRefs", "timeouts"], at)?;
    let mut matches = Vec::new();
    for (i, m) in array(&rule["matches"]).iter().enumerate() {
        matches.push(http_match(m, &format!("{at}.matches[{i}]"))?);
    }
    let mut weights: Vec<(String, u64)> = Vec::new();
    for (i, backend) in array(&rule["backendRefs"]).iter().enumerate() {
        let at = format!("{at}.backendRefs[{i}]");
        only(
            backend,
            &["group", "kind", "name", "namespace", "port", "weight"],
            &at,
        )?;
        let group = backend["group"].as_str().unwrap_or("");
        let kind = backend["kind"].as_str().unwrap_or("Service");
        if kind != "Service" || !matches!(group, "" | "core") {
            return Err(untranslatable(
                format!("{at}.kind"),
                format!("only Services are translated, not {group}/{kind}"),
            ));
        }
        let service = backend["name"].as_str().unwrap_or("");
        let service_namespace = backend["namespace"].as_str().unwrap_or(namespace);
        let name = services
            .get(&(service_namespace.to_owned(), service.to_owned()))
            .and_then(|s| s.backend(backend.get("port")))
            .map(|b| {
                if service_namespace == namespace {
                    b.name.clone()
                } else {
                    format!("{}.{service_namespace}", b.name)
                }
            })
            .ok_or_else(|| {
                untranslatable(
                    at.clone(),
                    format!("no Service {service_namespace}/{service} with that port"),
                )
            })?;
        let weight = backend["weight"].as_u64().unwrap_or(1);
        match weights.iter_mut().find(|(n, _)| *n == name) {
            Some((_, w)) => *w += weight,
            None => weights.push((name, weight)),
        }
    }
    if weights.is_empty() {
        return Err(untranslatable(
            format!("{at}.backendRefs"),
            "a rule without backends (the Gateway API answers 500) is not translated",
        ));
    }
    if weights.iter().all(|(_, w)| *w == 0) {
        return Err(untranslatable(
            format!("{at}.backendRefs"),
            "every backend has weight 0",
        ));
    }
    let backends: Vec<Value> = weights
        .into_iter()
        .map(|(name, weight)| json!({ "name": name, "weight": weight.min(u64::from(u32::MAX)) }))
        .collect();
    let mut out = json!({ "backends": backends });
    if !matches.is_empty() {
        out["matches"] = Value::from(matches);
    }
    let timeouts = &rule["timeouts"];
    if !timeouts.is_null() {
        only(
            timeouts,
            &["request", "backendRequest"],
            &format!("{at}.timeouts"),
        )?;
        let mut translated = Map::new();
        for (field, ours) in [("request", "total"), ("backendRequest", "responseHeaders")] {
            if let Some(duration) = timeouts[field].as_str() {
                translated.insert(ours.into(), Value::from(duration));
            }
        }
        out["timeouts"] = Value::Object(translated);
    }
    Ok(out)
}

fn http_match(m: &Value, at: &str) -> Result<Value, Untranslatable> {
    only(m, &["path", "headers", "method"], at)?;
    let mut out = Map::new();
    if let Some(path) = m.get("path").filter(|p| !p.is_null()) {
        let value = path["value"].as_str().unwrap_or("/");
        let translated = match path["type"].as_str().unwrap_or("PathPrefix") {
            "Exact" => json!({ "exact": value }),
            "PathPrefix" => json!({ "prefix": value }),
            "RegularExpression" => json!({ "regex": value }),
            other => {
                return Err(untranslatable(
                    format!("{at}.path.type"),
                    format!("{other:?} is not a path match type"),
                ));
            }
        };
        out.insert("path".into(), translated);
    }
    let mut headers = Vec::new();
    for (i, header) in array(&m["headers"]).iter().enumerate() {
        let name = header["name"].as_str().unwrap_or("");
        let value = header["value"].as_str().unwrap_or("");
        match header["type"].as_str().unwrap_or("Exact") {
            "Exact" => headers.push(json!({ "name": name, "exact": value })),
            "RegularExpression" => headers.push(json!({ "name": name, "regex": value })),
            other => {
                return Err(untranslatable(
                    format!("{at}.headers[{i}].type"),
                    format!("{other:?} is not a header match type"),
                ));
            }
        }
    }
    if !headers.is_empty() {
        out.insert("headers".into(), Value::from(headers));
    }
    if let Some(method) = m["method"].as_str() {
        out.insert("method".into(), Value::from(method));
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object<K: serde::de::DeserializeOwned>(value: Value) -> K {
        serde_json::from_value(value).expect("a Kubernetes object")
    }

    fn key(namespace: &str, name: &str) -> Key {
        (namespace.to_owned(), name.to_owned())
    }

    /// A Service `llama` in `models` with two ports, two ready endpoints
    /// (one not ready) whose Pods are injected.
    fn llama() -> Objects {
        let mut objects = Objects::default();
        objects.services.insert(
            key("models", "llama"),
            object(json!({
                "metadata": { "name": "llama", "namespace": "models" },
                "spec": {
                    "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                    "ports": [
                        { "name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP" },
                        { "name": "metrics", "port": 9090, "protocol": "TCP" }
                    ],
                    "selector": { "app": "llama" }, "type": "ClusterIP"
                }
            })),
        );
        objects.endpoint_slices.insert(
            key("models", "llama-abcde"),
            object(json!({
                "metadata": {
                    "name": "llama-abcde", "namespace": "models",
                    "labels": { "kubernetes.io/service-name": "llama", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io" }
                },
                "addressType": "IPv4",
                "endpoints": [
                    { "addresses": ["10.244.1.5"], "conditions": { "ready": true, "serving": true, "terminating": false },
                      "targetRef": { "kind": "Pod", "namespace": "models", "name": "llama-0", "uid": "u0" } },
                    { "addresses": ["10.244.2.7"], "conditions": { "ready": true },
                      "targetRef": { "kind": "Pod", "namespace": "models", "name": "llama-1", "uid": "u1" } },
                    { "addresses": ["10.244.3.9"], "conditions": { "ready": false },
                      "targetRef": { "kind": "Pod", "namespace": "models", "name": "llama-2", "uid": "u2" } }
                ],
                "ports": [
                    { "name": "http", "port": 8000, "protocol": "TCP" },
                    { "name": "metrics", "port": 9090, "protocol": "TCP" }
                ]
            })),
        );
        for pod in ["llama-0", "llama-1", "llama-2"] {
            objects.pods.insert(
                key("models", pod),
                object(json!({
                    "metadata": { "name": pod, "namespace": "models", "labels": { "app": "llama" } },
                    "spec": {
                        "serviceAccountName": "llama",
                        "initContainers": [{ "name": "infermesh-init" }, { "name": "infermesh-proxy", "restartPolicy": "Always" }],
                        "containers": [{ "name": "vllm" }]
                    }
                })),
            );
        }
        objects
    }

    fn document(translated: &Translated, source: &str) -> Value {
        let document = translated
            .documents
            .iter()
            .find(|d| d.source == source)
            .unwrap_or_else(|| panic!("no {source} in {:#?}", translated.documents));
        serde_json::from_str(&document.text).unwrap()
    }

    fn load(translated: &Translated) -> infermesh_api::Config {
        let sources: Vec<infermesh_api::Source<'_>> = translated
            .documents
            .iter()
            .map(|d| infermesh_api::Source {
                name: &d.source,
                text: &d.text,
            })
            .collect();
        infermesh_api::Config::load(&sources).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_service_of_injected_pods_is_a_mesh_backend_with_their_identities() {
        let translated = translate(&llama(), "cluster.local");
        let backend = document(&translated, "Service models/llama (Backend llama)");
        assert_eq!(
            backend["spec"],
            json!({
                "endpoints": [
                    { "address": "10.244.1.5:8000", "identity": "spiffe://cluster.local/ns/models/sa/llama" },
                    { "address": "10.244.2.7:8000", "identity": "spiffe://cluster.local/ns/models/sa/llama" }
                ],
                "addresses": ["10.96.0.10:80"],
                "tls": {}
            })
        );
        let metrics = document(&translated, "Service models/llama (Backend llama-metrics)");
        assert_eq!(metrics["spec"]["addresses"], json!(["10.96.0.10:9090"]));
        let route = document(&translated, "Service models/llama (Route llama)");
        assert_eq!(
            route["spec"]["parentRefs"],
            json!([{ "kind": "Backend", "name": "llama" }])
        );
        let config = load(&translated);
        assert!(config.backend("llama.models").is_some());
        assert_eq!(
            translated.workloads[&key("models", "llama-0")].identity,
            "spiffe://cluster.local/ns/models/sa/llama"
        );
    }

    #[test]
    fn a_partly_meshed_service_is_called_in_plaintext() {
        let mut objects = llama();
        objects.pods.insert(
            key("models", "llama-1"),
            object(json!({
                "metadata": { "name": "llama-1", "namespace": "models" },
                "spec": { "containers": [{ "name": "vllm" }] }
            })),
        );
        let translated = translate(&objects, "cluster.local");
        let backend = document(&translated, "Service models/llama (Backend llama)");
        assert_eq!(
            backend["spec"]["endpoints"],
            json!([{ "address": "10.244.1.5:8000" }, { "address": "10.244.2.7:8000" }])
        );
        assert!(backend["spec"].get("tls").is_none());
        assert!(
            translated.warnings.iter().any(|w| w.contains("1 of its 2")),
            "{:?}",
            translated.warnings
        );
    }

    #[test]
    fn a_backend_resource_named_like_a_service_keeps_its_tuning_and_gets_the_endpoints() {
        let mut objects = llama();
        objects.resources.entry(Kind::Backend).or_default().insert(
            key("models", "llama"),
            object(json!({
                "apiVersion": "infermesh.io/v1alpha1", "kind": "Backend",
                "metadata": { "name": "llama", "namespace": "models", "uid": "x", "resourceVersion": "7" },
                "spec": { "loadBalancer": { "policy": "roundRobin" } }
            })),
        );
        let translated = translate(&objects, "cluster.local");
        let backend = document(&translated, "backends.infermesh.io models/llama");
        assert_eq!(backend["spec"]["loadBalancer"]["policy"], "roundRobin");
        assert_eq!(backend["spec"]["endpoints"].as_array().unwrap().len(), 2);
        assert_eq!(
            backend["metadata"],
            json!({ "name": "llama", "namespace": "models" })
        );
        assert!(
            !translated
                .documents
                .iter()
                .any(|d| d.source == "Service models/llama (Backend llama)")
        );
    }

    fn with_route(route: Value) -> Translated {
        let mut objects = llama();
        objects.services.insert(
            key("models", "mistral"),
            object(json!({
                "metadata": { "name": "mistral", "namespace": "models" },
                "spec": { "clusterIP": "10.96.0.11", "ports": [{ "port": 80 }] }
            })),
        );
        objects
            .http_routes
            .insert(key("models", "canary"), object(route));
        translate(&objects, "cluster.local")
    }

    #[test]
    fn an_httproute_on_a_service_becomes_its_route() {
        let translated = with_route(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "canary", "namespace": "models" },
            "spec": {
                "parentRefs": [{ "group": "", "kind": "Service", "name": "llama", "port": 80 }],
                "rules": [
                    {
                        "matches": [{
                            "path": { "type": "PathPrefix", "value": "/v1" },
                            "headers": [{ "name": "x-canary", "value": "1" }],
                            "method": "POST"
                        }],
                        "backendRefs": [{ "name": "mistral", "port": 80, "weight": 3 }],
                        "timeouts": { "request": "30s", "backendRequest": "10s" }
                    },
                    { "backendRefs": [{ "name": "llama", "port": 80 }] }
                ]
            }
        }));
        let route = document(&translated, "HTTPRoute models/canary");
        assert_eq!(route["metadata"]["name"], "httproute-canary");
        assert_eq!(
            route["spec"],
            json!({
                "parentRefs": [{ "kind": "Backend", "name": "llama" }],
                "rules": [
                    {
                        "backends": [{ "name": "mistral", "weight": 3 }],
                        "matches": [{
                            "path": { "prefix": "/v1" },
                            "headers": [{ "name": "x-canary", "exact": "1" }],
                            "method": "POST"
                        }],
                        "timeouts": { "total": "30s", "responseHeaders": "10s" }
                    },
                    { "backends": [{ "name": "llama", "weight": 1 }] }
                ]
            })
        );
        // It replaces the Service's default route.
        assert!(
            !translated
                .documents
                .iter()
                .any(|d| d.source == "Service models/llama (Route llama)")
        );
        load(&translated);
    }

    #[test]
    fn an_httproute_that_cannot_be_translated_whole_is_left_out_and_named() {
        let translated = with_route(json!({
            "metadata": { "name": "canary", "namespace": "models" },
            "spec": {
                "parentRefs": [{ "kind": "Service", "group": "", "name": "llama" }],
                "rules": [{
                    "filters": [{ "type": "RequestHeaderModifier" }],
                    "backendRefs": [{ "name": "mistral", "port": 80 }]
                }]
            }
        }));
        assert!(
            !translated
                .documents
                .iter()
                .any(|d| d.source == "HTTPRoute models/canary")
        );
        assert!(
            translated.warnings.contains(
                "HTTPRoute models/canary is left out: spec.rules[0].filters: infermesh does not translate this field"
            ),
            "{:?}",
            translated.warnings
        );
        // The Service keeps its default route.
        document(&translated, "Service models/llama (Route llama)");
    }

    #[test]
    fn an_httproute_of_a_gateway_is_not_the_mesh_s() {
        let translated = with_route(json!({
            "metadata": { "name": "canary", "namespace": "models" },
            "spec": {
                "parentRefs": [{ "name": "public-gateway" }],
                "rules": [{ "backendRefs": [{ "name": "mistral", "port": 80 }] }]
            }
        }));
        assert!(translated.warnings.is_empty(), "{:?}", translated.warnings);
        assert!(
            !translated
                .documents
                .iter()
                .any(|d| d.source == "HTTPRoute models/canary")
        );
    }
}
