//! The infermesh configuration contract: the YAML resource kinds that the
//! proxy and the control plane both read, their defaults, and the validation
//! that turns a set of YAML files into one consistent [`Config`], or into
//! [`Diagnostics`] that name the file, line, column and field of every
//! problem.
//!
//! Config files hold Kubernetes-style documents, several per file:
//!
//! ```yaml
//! apiVersion: infermesh.io/v1alpha1
//! kind: Backend
//! metadata:
//!   name: llama
//! spec:
//!   endpoints:
//!     - address: 127.0.0.1:8000
//! ```
//!
//! This crate does no I/O: callers hand in each file's name and text.

#![forbid(unsafe_code)]

pub mod app_probes;
pub mod backend;
mod check;
pub mod crd;
mod diagnostic;
pub mod duration;
pub mod fanout;
pub mod listener;
mod path;
pub mod policy;
pub mod resilience;
pub mod route;
mod schema;
pub mod sidecar;
mod yaml;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use backend::{
    BackendSpec, BackendTls, EndpointSpec, EndpointTarget, PoolSpec, UpstreamProtocol,
};
pub use diagnostic::{Diagnostic, Diagnostics};
pub use duration::Duration;
pub use fanout::{Fanout, FanoutBranch, FanoutStrategy, Mean, Vote};
pub use listener::{
    Capture, EscapedSlashes, ListenerLimits, ListenerProtocol, ListenerSpec, ListenerTls,
    OutsideMesh, PortTls, TlsMode,
};
pub use path::FieldPath;
pub use policy::{
    AuthorizationPolicySpec, PolicyAction, PolicyOperation, PolicyRule, PolicySource,
    WorkloadSelector,
};
pub use resilience::{
    Backoff, BalancePolicy, CircuitBreaker, GrpcStatus, HealthCheck, HedgePolicy, LoadBalancer,
    Mirror, OutlierDetection, RateLimit, RetryBudget, RetryOn, RetryPolicy,
};
pub use route::{
    BackendRef, HeaderMatch, ParentKind, ParentRef, PathMatch, RouteMatch, RouteRule, RouteSpec,
    RouteTimeouts, full_match_regex,
};
pub use sidecar::SidecarSpec;
pub use yaml::Position;

use check::Checker;
use diagnostic::{closest, unknown_field};
use yaml::Locations;

/// The `apiVersion` every document must carry.
pub const API_VERSION: &str = "infermesh.io/v1alpha1";

/// The text of one config file.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// How errors name the file (usually its path).
    pub name: &'a str,
    /// The file's contents.
    pub text: &'a str,
}

/// The kinds of resource a config may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// An address to accept traffic on: [`ListenerSpec`].
    Listener,
    /// A set of model-server endpoints: [`BackendSpec`].
    Backend,
    /// Which requests go to which backends: [`RouteSpec`].
    Route,
    /// Who may call what: [`AuthorizationPolicySpec`].
    AuthorizationPolicy,
    /// Which backends the sidecars of some workloads are told about:
    /// [`SidecarSpec`]. Read by the control plane only.
    Sidecar,
}

impl Kind {
    /// Every kind, in the order documents of a config dump are written.
    pub const ALL: [Kind; 5] = [
        Kind::Listener,
        Kind::Backend,
        Kind::Route,
        Kind::AuthorizationPolicy,
        Kind::Sidecar,
    ];

    /// The name written in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Listener => "Listener",
            Kind::Backend => "Backend",
            Kind::Route => "Route",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Sidecar => "Sidecar",
        }
    }

    /// The JSON Schema (draft 2020-12) of this kind's `spec`: every field
    /// with its type, default and documentation, every subschema inline (as
    /// Kubernetes CRD schemas need them). Objects refuse unknown fields, as
    /// the loader does; the checks made after parsing (ranges, references
    /// between resources) are not in it.
    pub fn spec_schema(self) -> schemars::Schema {
        match self {
            Kind::Listener => schema::spec_schema::<ListenerSpec>(),
            Kind::Backend => schema::spec_schema::<BackendSpec>(),
            Kind::Route => schema::spec_schema::<RouteSpec>(),
            Kind::AuthorizationPolicy => schema::spec_schema::<AuthorizationPolicySpec>(),
            Kind::Sidecar => schema::spec_schema::<SidecarSpec>(),
        }
    }

    /// The kind written `text`.
    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// [`Kind::spec_schema`] as a value, made once: specs are validated
    /// against it.
    fn validation_schema(self) -> &'static Value {
        static SCHEMAS: OnceLock<Vec<Value>> = OnceLock::new();
        let schemas = SCHEMAS.get_or_init(|| {
            Kind::ALL
                .iter()
                .map(|kind| kind.spec_schema().to_value())
                .collect()
        });
        &schemas[self as usize]
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a resource was written, so that errors found later (at load or at
/// run time) can point at it.
#[derive(Clone, Debug)]
pub struct Origin {
    /// The file, as its [`Source`] named it.
    pub file: Arc<str>,
    /// Where the document starts.
    pub position: Position,
    locations: Arc<Locations>,
}

impl Origin {
    /// Where the field at `path` of this document was written.
    pub fn position_of(&self, path: &FieldPath) -> Position {
        self.locations.find(path)
    }

    /// A diagnostic about the field at `path` of this document.
    pub fn diagnostic(
        &self,
        resource: Option<String>,
        path: &FieldPath,
        message: String,
    ) -> Diagnostic {
        let pos = self.position_of(path);
        Diagnostic {
            file: self.file.to_string(),
            line: pos.line,
            column: pos.column,
            resource,
            field: path.as_str().to_owned(),
            message,
        }
    }
}

/// One named resource of a config.
#[derive(Clone, Debug)]
pub struct Resource<S> {
    /// The name the resource is known by, unique among resources of its
    /// kind: `metadata.name`, followed by `.` and `metadata.namespace`
    /// when the resource has a namespace (`llama.models`, as a Kubernetes
    /// Service is named in DNS).
    pub name: String,
    /// `metadata.namespace`, if given.
    pub namespace: Option<String>,
    /// The resource's spec, with defaults filled in.
    pub spec: S,
    /// Where it was written.
    pub origin: Origin,
}

/// A whole, validated configuration: every reference resolves and every
/// value is in range. Built only by [`Config::load`].
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `Listener` resources, in file order.
    pub listeners: Vec<Resource<ListenerSpec>>,
    /// `Backend` resources, in file order.
    pub backends: Vec<Resource<BackendSpec>>,
    /// `Route` resources, in file order.
    pub routes: Vec<Resource<RouteSpec>>,
    /// `AuthorizationPolicy` resources, in file order.
    pub policies: Vec<Resource<AuthorizationPolicySpec>>,
    /// `Sidecar` resources, in file order.
    pub sidecars: Vec<Resource<SidecarSpec>>,
}

/// The fields of a document, around its spec.
const DOCUMENT_FIELDS: [&str; 4] = ["apiVersion", "kind", "metadata", "spec"];

impl Config {
    /// Parses and validates every document of every source as one snapshot.
    ///
    /// Either the whole config is valid, or every problem found is returned,
    /// each with its file, line, column and field path.
    pub fn load(sources: &[Source<'_>]) -> Result<Config, Diagnostics> {
        Config::load_with_defaults(sources, &[])
    }

    /// Like [`Config::load`], with built-in documents in `defaults` that
    /// the sources may replace: a default document is left out when a
    /// source defines a resource of the same kind and name. (The sidecar's
    /// capture listeners are defined this way.)
    pub fn load_with_defaults(
        sources: &[Source<'_>],
        defaults: &[Source<'_>],
    ) -> Result<Config, Diagnostics> {
        let mut diagnostics = Vec::new();
        let mut config = Config::default();
        // Names of every document whose envelope parsed, even when its spec
        // did not, so one typo does not also report each reference to it.
        let mut defined: HashMap<(Kind, String), Origin> = HashMap::new();

        let given = sources.iter().map(|s| (s, false));
        for (source, is_default) in given.chain(defaults.iter().map(|s| (s, true))) {
            let file: Arc<str> = Arc::from(source.name);
            let syntax_error = |e: yaml::SyntaxError| Diagnostic {
                file: source.name.to_owned(),
                line: e.position.line,
                column: e.position.column,
                resource: None,
                field: e.path.as_str().to_owned(),
                message: e.message,
            };
            let documents = match yaml::documents(source.text) {
                Ok(documents) => documents,
                Err(e) => {
                    diagnostics.push(syntax_error(e));
                    continue;
                }
            };
            // An emptied file (a truncating write caught half-way, a
            // mistaken `>`) is a mistake, not a config of nothing.
            if documents.is_empty() && !is_default {
                diagnostics.push(Diagnostic {
                    file: source.name.to_owned(),
                    line: 1,
                    column: 1,
                    resource: None,
                    field: String::new(),
                    message: "the file holds no documents (it is empty, or only comments); a config needs at least one resource".into(),
                });
            }
            for document in documents {
                if is_default && defined_already(&document.value, &defined) {
                    continue;
                }
                let origin = Origin {
                    file: file.clone(),
                    position: document.locations.document(),
                    locations: Arc::new(document.locations),
                };
                if !document.problems.is_empty() {
                    diagnostics.extend(document.problems.into_iter().map(syntax_error));
                    // Named all the same, so that what refers to it is not
                    // also reported.
                    if let Some(key) = kind_and_name(&document.value) {
                        defined.entry(key).or_insert(origin);
                    }
                    continue;
                }
                load_document(
                    document.value,
                    origin,
                    &mut config,
                    &mut defined,
                    &mut diagnostics,
                );
            }
        }

        config.resolve_in_namespaces(&defined);
        config.check_references(&defined, &mut diagnostics);
        if diagnostics.is_empty() {
            Ok(config)
        } else {
            let order: HashMap<&str, usize> = sources
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name, i))
                .collect();
            diagnostics.sort_by_key(|d| (order.get(d.file.as_str()).copied(), d.line, d.column));
            Err(Diagnostics(diagnostics))
        }
    }

    /// A short fingerprint of the config's meaning (not its formatting or
    /// comments): equal configs have equal versions.
    pub fn version(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("config serializes to JSON");
        let digest = Sha256::digest(&canonical);
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&Resource<ListenerSpec>> {
        self.listeners.iter().find(|r| r.name == name)
    }

    /// The backend named `name`.
    pub fn backend(&self, name: &str) -> Option<&Resource<BackendSpec>> {
        self.backends.iter().find(|r| r.name == name)
    }

    /// The route named `name`.
    pub fn route(&self, name: &str) -> Option<&Resource<RouteSpec>> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// Resolves the names a namespaced resource refers to as a Kubernetes
    /// pod's DNS search does: `llama`, written in namespace `models`, is
    /// `llama.models` when that is defined, and `llama` otherwise (so
    /// `mistral.other` reaches into another namespace, and resources
    /// without a namespace stay reachable).
    fn resolve_in_namespaces(&mut self, defined: &HashMap<(Kind, String), Origin>) {
        let resolve = |kind: Kind, namespace: &str, name: &mut String| {
            let qualified = format!("{name}.{namespace}");
            if defined.contains_key(&(kind, qualified.clone())) {
                *name = qualified;
            }
        };
        for route in &mut self.routes {
            let Some(namespace) = route.namespace.as_deref() else {
                continue;
            };
            for listener in &mut route.spec.listeners {
                resolve(Kind::Listener, namespace, listener);
            }
            for parent in &mut route.spec.parent_refs {
                let kind = match parent.kind {
                    ParentKind::Backend => Kind::Backend,
                    ParentKind::Listener => Kind::Listener,
                };
                resolve(kind, namespace, &mut parent.name);
            }
            for rule in &mut route.spec.rules {
                for backend in rule.backend_names_mut() {
                    resolve(Kind::Backend, namespace, backend);
                }
            }
        }
        for policy in &mut self.policies {
            let Some(namespace) = policy.namespace.as_deref() else {
                continue;
            };
            for listener in &mut policy.spec.listeners {
                resolve(Kind::Listener, namespace, listener);
            }
        }
        for sidecar in &mut self.sidecars {
            let Some(namespace) = sidecar.namespace.as_deref() else {
                continue;
            };
            for backend in &mut sidecar.spec.egress {
                if !backend.starts_with('*') {
                    resolve(Kind::Backend, namespace, backend);
                }
            }
        }
    }

    fn check_references(
        &self,
        defined: &HashMap<(Kind, String), Origin>,
        out: &mut Vec<Diagnostic>,
    ) {
        let names = |kind: Kind| {
            let mut names: Vec<&str> = defined
                .keys()
                .filter(|(k, _)| *k == kind)
                .map(|(_, n)| n.as_str())
                .collect();
            names.sort_unstable();
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };

        // Two sockets clash on one port when their addresses are equal, or
        // when either is a wildcard (`0.0.0.0`, `[::]`), which takes the port
        // on every address.
        for (i, listener) in self.listeners.iter().enumerate() {
            let addr = listener.spec.address;
            let clash = self.listeners[..i].iter().find(|earlier| {
                let other = earlier.spec.address;
                addr.port() != 0
                    && other.port() == addr.port()
                    && (other.ip() == addr.ip()
                        || other.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some(first) = clash {
                let label = resource_label(Kind::Listener, &listener.name);
                Checker::new(&listener.origin, Some(label), out).error(
                    FieldPath::root().key("spec").key("address"),
                    format!(
                        "address {addr} clashes with listener {:?} on {}: a port can be bound once per address, and a wildcard address takes it on all of them",
                        first.name, first.spec.address
                    ),
                );
            }
        }

        let mut owners: HashMap<SocketAddr, (&str, usize)> = HashMap::new();
        for backend in &self.backends {
            for (i, address) in backend.spec.addresses.iter().enumerate() {
                let Some((owner, at)) = owners.insert(*address, (&backend.name, i)) else {
                    continue;
                };
                let message = if owner == backend.name {
                    format!("address {address} is already listed at addresses[{at}]")
                } else {
                    format!(
                        "address {address} already stands for backend {owner:?}; an address can lead to one backend only"
                    )
                };
                Checker::new(
                    &backend.origin,
                    Some(resource_label(Kind::Backend, &backend.name)),
                    out,
                )
                .error(
                    FieldPath::root().key("spec").key("addresses").index(i),
                    message,
                );
            }
        }

        for route in &self.routes {
            let mut checker = Checker::new(
                &route.origin,
                Some(resource_label(Kind::Route, &route.name)),
                out,
            );
            let spec = FieldPath::root().key("spec");
            for (i, listener) in route.spec.listeners.iter().enumerate() {
                if !defined.contains_key(&(Kind::Listener, listener.clone())) {
                    checker.error(
                        spec.key("listeners").index(i),
                        format!(
                            "listener {listener:?} is not defined (defined listeners: {})",
                            names(Kind::Listener)
                        ),
                    );
                }
            }
            for (i, parent) in route.spec.parent_refs.iter().enumerate() {
                let (kind, what) = match parent.kind {
                    ParentKind::Backend => (Kind::Backend, "backend"),
                    ParentKind::Listener => (Kind::Listener, "listener"),
                };
                if !defined.contains_key(&(kind, parent.name.clone())) {
                    checker.error(
                        spec.key("parentRefs").index(i).key("name"),
                        format!(
                            "{what} {:?} is not defined (defined {what}s: {})",
                            parent.name,
                            names(kind)
                        ),
                    );
                }
            }
            for (r, rule) in route.spec.rules.iter().enumerate() {
                for (at, name) in rule.backend_references(&spec.key("rules").index(r)) {
                    if !defined.contains_key(&(Kind::Backend, name.to_owned())) {
                        checker.error(
                            at,
                            format!(
                                "backend {name:?} is not defined (defined backends: {})",
                                names(Kind::Backend)
                            ),
                        );
                    }
                }
            }
        }
        for policy in &self.policies {
            let mut checker = Checker::new(
                &policy.origin,
                Some(resource_label(Kind::AuthorizationPolicy, &policy.name)),
                out,
            );
            for (i, listener) in policy.spec.listeners.iter().enumerate() {
                if !defined.contains_key(&(Kind::Listener, listener.clone())) {
                    checker.error(
                        FieldPath::root().key("spec").key("listeners").index(i),
                        format!(
                            "listener {listener:?} is not defined (defined listeners: {})",
                            names(Kind::Listener)
                        ),
                    );
                }
            }
        }
        for sidecar in &self.sidecars {
            let mut checker = Checker::new(
                &sidecar.origin,
                Some(resource_label(Kind::Sidecar, &sidecar.name)),
                out,
            );
            for (i, backend) in sidecar.spec.egress.iter().enumerate() {
                if !backend.starts_with('*')
                    && !defined.contains_key(&(Kind::Backend, backend.clone()))
                {
                    checker.error(
                        FieldPath::root().key("spec").key("egress").index(i),
                        format!(
                            "backend {backend:?} is not defined (defined backends: {})",
                            names(Kind::Backend)
                        ),
                    );
                }
            }
        }
    }

    /// Problems with what only the control plane reads (`Sidecar`
    /// resources, policy selectors, namespaces): a proxy's own file has no
    /// workloads to select or namespaces to search, so there they would
    /// silently mean nothing.
    pub fn mesh_only_problems(&self) -> Diagnostics {
        let mut out = Vec::new();
        let control_plane_only = "is read by the control plane (`infermesh-control-plane serve --config-dir`); a proxy's own file cannot use it";
        for sidecar in &self.sidecars {
            out.push(sidecar.origin.diagnostic(
                Some(resource_label(Kind::Sidecar, &sidecar.name)),
                &FieldPath::root().key("kind"),
                format!("kind Sidecar {control_plane_only}"),
            ));
        }
        for listener in &self.listeners {
            if listener.spec.selector.is_some() {
                out.push(listener.origin.diagnostic(
                    Some(resource_label(Kind::Listener, &listener.name)),
                    &FieldPath::root().key("spec").key("selector"),
                    format!("a listener selector {control_plane_only}"),
                ));
            }
        }
        for route in &self.routes {
            if !route.spec.parent_refs.is_empty() {
                out.push(route.origin.diagnostic(
                    Some(resource_label(Kind::Route, &route.name)),
                    &FieldPath::root().key("spec").key("parentRefs"),
                    format!("parentRefs {control_plane_only}; use `listeners` and `hostnames`"),
                ));
            }
        }
        for policy in &self.policies {
            if policy.spec.selector.is_some() {
                out.push(policy.origin.diagnostic(
                    Some(resource_label(Kind::AuthorizationPolicy, &policy.name)),
                    &FieldPath::root().key("spec").key("selector"),
                    format!("a workload selector {control_plane_only}; use `listeners`"),
                ));
            }
        }
        fn namespaced<S>(kind: Kind, resources: &[Resource<S>], out: &mut Vec<Diagnostic>) {
            for r in resources.iter().filter(|r| r.namespace.is_some()) {
                out.push(r.origin.diagnostic(
                    Some(resource_label(kind, &r.name)),
                    &FieldPath::root().key("metadata").key("namespace"),
                    "namespaces are read by the control plane; a proxy's own file is one namespace, so leave `metadata.namespace` out".into(),
                ));
            }
        }
        namespaced(Kind::Listener, &self.listeners, &mut out);
        namespaced(Kind::Backend, &self.backends, &mut out);
        namespaced(Kind::Route, &self.routes, &mut out);
        namespaced(Kind::AuthorizationPolicy, &self.policies, &mut out);
        out.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        Diagnostics(out)
    }

    /// Every resource as its own document (defaults filled in, names
    /// qualified, no namespace): what a proxy is sent, one resource at a
    /// time, and can load back with [`Config::load`].
    pub fn documents(&self) -> Vec<Document> {
        fn each<S: Serialize>(kind: Kind, resources: &[Resource<S>], out: &mut Vec<Document>) {
            for r in resources {
                out.push(Document {
                    kind,
                    name: r.name.clone(),
                    value: serde_json::to_value(doc(kind, r)).expect("a spec serializes to JSON"),
                });
            }
        }
        let mut out = Vec::new();
        each(Kind::Listener, &self.listeners, &mut out);
        each(Kind::Backend, &self.backends, &mut out);
        each(Kind::Route, &self.routes, &mut out);
        each(Kind::AuthorizationPolicy, &self.policies, &mut out);
        each(Kind::Sidecar, &self.sidecars, &mut out);
        out
    }
}

/// One resource written as a document of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Its kind.
    pub kind: Kind,
    /// Its (qualified) name.
    pub name: String,
    /// The whole document: `apiVersion`, `kind`, `metadata`, `spec`.
    pub value: Value,
}

/// The kind and name of `document`, when both are written plainly.
fn kind_and_name(document: &Value) -> Option<(Kind, String)> {
    let kind = document
        .get("kind")
        .and_then(Value::as_str)
        .and_then(Kind::parse)?;
    let name = document.pointer("/metadata/name").and_then(Value::as_str)?;
    Some((kind, name.to_owned()))
}

/// Whether a resource of the kind and name of `document` is in `defined`.
fn defined_already(document: &Value, defined: &HashMap<(Kind, String), Origin>) -> bool {
    kind_and_name(document).is_some_and(|key| defined.contains_key(&key))
}

fn resource_label(kind: Kind, name: &str) -> String {
    format!("{kind}/{name}")
}

/// Parses one document into `config`, recording every problem found: in
/// its envelope (apiVersion, kind, metadata), in its spec's shape (see
/// [`schema::validate`]), then in its values, each where it was written.
fn load_document(
    value: Value,
    origin: Origin,
    config: &mut Config,
    defined: &mut HashMap<(Kind, String), Origin>,
    out: &mut Vec<Diagnostic>,
) {
    let Value::Object(mut fields) = value else {
        out.push(origin.diagnostic(
            None,
            &FieldPath::root(),
            "a document must be a mapping with apiVersion, kind, metadata and spec".into(),
        ));
        return;
    };
    let (kind, name, namespace, problems) = read_envelope(&fields);
    let name = name.map(|name| match &namespace {
        Some(namespace) => format!("{name}.{namespace}"),
        None => name,
    });
    let spec = fields.shift_remove("spec");
    let label = kind.zip(name.as_deref()).map(|(k, n)| resource_label(k, n));
    for (path, message) in problems {
        out.push(origin.diagnostic(label.clone(), &path, message));
    }
    let Some(kind) = kind else { return };

    // The first resource of a kind and name is the one loaded; a later one
    // is reported, and its spec still checked.
    let mut loaded_name = None;
    if let Some(name) = name {
        match defined.get(&(kind, name.clone())) {
            Some(first) => out.push(origin.diagnostic(
                label.clone(),
                &FieldPath::root().key("metadata").key("name"),
                format!(
                    "{kind} {name:?} is already defined at {}:{}",
                    first.file, first.position.line
                ),
            )),
            None => {
                defined.insert((kind, name.clone()), origin.clone());
                loaded_name = Some((name, namespace));
            }
        }
    }

    let Some(spec) = spec else { return };
    match kind {
        Kind::Listener => load_spec::<ListenerSpec>(spec, loaded_name, origin, label, config, out),
        Kind::Backend => load_spec::<BackendSpec>(spec, loaded_name, origin, label, config, out),
        Kind::Route => load_spec::<RouteSpec>(spec, loaded_name, origin, label, config, out),
        Kind::AuthorizationPolicy => {
            load_spec::<AuthorizationPolicySpec>(spec, loaded_name, origin, label, config, out)
        }
        Kind::Sidecar => load_spec::<SidecarSpec>(spec, loaded_name, origin, label, config, out),
    }
}

/// The kind and name a document's envelope (everything but its spec)
/// gives, when it gives them, and every problem with it.
#[allow(clippy::type_complexity)]
fn read_envelope(
    fields: &serde_json::Map<String, Value>,
) -> (
    Option<Kind>,
    Option<String>,
    Option<String>,
    Vec<(FieldPath, String)>,
) {
    let root = FieldPath::root();
    let mut problems = Vec::new();
    for field in fields.keys() {
        if !DOCUMENT_FIELDS.contains(&field.as_str()) {
            problems.push((root.key(field), unknown_field(field, &DOCUMENT_FIELDS)));
        }
    }
    let missing = |field: &str| format!("missing field `{field}`");
    let invalid = |value: &Value, expected: &str| {
        format!(
            "invalid type: {}, expected {expected}",
            schema::unexpected(value)
        )
    };

    match fields.get("apiVersion") {
        None => problems.push((root.clone(), missing("apiVersion"))),
        Some(Value::String(version)) if version == API_VERSION => {}
        Some(Value::String(version)) => problems.push((
            root.key("apiVersion"),
            format!("unsupported apiVersion {version:?}; expected {API_VERSION:?}"),
        )),
        Some(other) => problems.push((root.key("apiVersion"), invalid(other, "a string"))),
    }

    let kinds = || Kind::ALL.iter().map(|k| k.as_str());
    let kind = match fields.get("kind") {
        None => {
            problems.push((root.clone(), missing("kind")));
            None
        }
        Some(Value::String(text)) => {
            let kind = Kind::parse(text);
            if kind.is_none() {
                let hint = match closest(text, kinds()) {
                    Some(meant) => format!("did you mean `{meant}`?"),
                    None => format!("expected one of {}", kinds().collect::<Vec<_>>().join(", ")),
                };
                problems.push((root.key("kind"), format!("unknown kind {text:?}; {hint}")));
            }
            kind
        }
        Some(other) => {
            let expected = format!("one of {}", kinds().collect::<Vec<_>>().join(", "));
            problems.push((root.key("kind"), invalid(other, &expected)));
            None
        }
    };

    let metadata = root.key("metadata");
    let mut namespace = None;
    let name = match fields.get("metadata") {
        None => {
            problems.push((root.clone(), missing("metadata")));
            None
        }
        Some(Value::Object(metadata_fields)) => {
            const METADATA_FIELDS: [&str; 2] = ["name", "namespace"];
            for field in metadata_fields
                .keys()
                .filter(|f| !METADATA_FIELDS.contains(&f.as_str()))
            {
                problems.push((metadata.key(field), unknown_field(field, &METADATA_FIELDS)));
            }
            namespace = match metadata_fields.get("namespace") {
                None => None,
                Some(Value::String(namespace)) => {
                    if let Err(e) = check_namespace(namespace) {
                        problems.push((metadata.key("namespace"), e));
                    }
                    Some(namespace.clone())
                }
                Some(other) => {
                    problems.push((metadata.key("namespace"), invalid(other, "a string")));
                    None
                }
            };
            match metadata_fields.get("name") {
                None => {
                    problems.push((metadata.clone(), missing("name")));
                    None
                }
                Some(Value::String(name)) => {
                    if let Err(e) = check_name(name) {
                        problems.push((metadata.key("name"), e));
                    }
                    Some(name.clone())
                }
                Some(other) => {
                    problems.push((metadata.key("name"), invalid(other, "a string")));
                    None
                }
            }
        }
        Some(other) => {
            problems.push((metadata.clone(), invalid(other, "a mapping")));
            None
        }
    };

    if !fields.contains_key("spec") {
        problems.push((root.clone(), missing("spec")));
    }
    (kind, name, namespace, problems)
}

/// A kind's spec: how to check one resource on its own (references
/// between resources are checked across the whole config).
trait Spec: DeserializeOwned {
    fn check(&self, _checker: &mut Checker<'_>) {}
}

/// A spec's kind, and where its resources are kept in a [`Config`].
trait OfKind: Spec {
    const KIND: Kind;
    fn resources(config: &mut Config) -> &mut Vec<Resource<Self>>;
}

impl OfKind for ListenerSpec {
    const KIND: Kind = Kind::Listener;
    fn resources(config: &mut Config) -> &mut Vec<Resource<Self>> {
        &mut config.listeners
    }
}

impl OfKind for BackendSpec {
    const KIND: Kind = Kind::Backend;
    fn resources(config: &mut Config) -> &mut Vec<Resource<Self>> {
        &mut config.backends
    }
}

impl OfKind for RouteSpec {
    const KIND: Kind = Kind::Route;
    fn resources(config: &mut Config) -> &mut Vec<Resource<Self>> {
        &mut config.routes
    }
}

impl OfKind for AuthorizationPolicySpec {
    const KIND: Kind = Kind::AuthorizationPolicy;
    fn resources(config: &mut Config) -> &mut Vec<Resource<Self>> {
        &mut config.policies
    }
}

impl OfKind for SidecarSpec {
    const KIND: Kind = Kind::Sidecar;
    fn resources(config: &mut Config) -> &mut Vec<Resource<Self>> {
        &mut config.sidecars
    }
}

/// Validates, parses and checks the spec of one resource, adding it to
/// `config` under `name` (when it has one that no other resource of its
/// kind took).
///
/// Every wrong value is reported by the schema's validation, which takes
/// it out when its field has a default; what is left is deserialized and
/// checked, so that the checks of the rest of the spec are reported in the
/// same pass. A check is not reported where a value was taken out.
fn load_spec<S: OfKind>(
    mut spec: Value,
    name: Option<(String, Option<String>)>,
    origin: Origin,
    label: Option<String>,
    config: &mut Config,
    out: &mut Vec<Diagnostic>,
) {
    let path = FieldPath::root().key("spec");
    let validation = schema::validate(S::KIND.validation_schema(), &mut spec, &path);
    for (at, message) in &validation.problems {
        out.push(origin.diagnostic(label.clone(), at, message.clone()));
    }
    if !validation.usable {
        return;
    }
    let Some(spec) = deserialize_located::<S>(spec, &path, &origin, label.as_deref(), out) else {
        return;
    };
    let mut checked = Vec::new();
    Spec::check(&spec, &mut Checker::new(&origin, label, &mut checked));
    out.extend(checked.into_iter().filter(|d| !validation.hides(&d.field)));
    if let Some((name, namespace)) = name {
        S::resources(config).push(Resource {
            name,
            namespace,
            spec,
            origin,
        });
    }
}

/// Deserializes `value` (found at `base` in its document), reporting every
/// unknown field and the first type error, each at its own location.
/// Returns the value whenever it could be built, so that it is checked
/// further; an unknown field has already been reported.
///
/// Specs reach it validated against their schema, so that it finds
/// nothing more unless the schema tells less than the types.
fn deserialize_located<T: DeserializeOwned>(
    value: Value,
    base: &FieldPath,
    origin: &Origin,
    resource: Option<&str>,
    out: &mut Vec<Diagnostic>,
) -> Option<T> {
    let mut unknown = Vec::new();
    let result = {
        let mut record = |path: serde_ignored::Path<'_>| {
            unknown.push(FieldPath::from_ignored(base, &path));
        };
        let ignored = serde_ignored::Deserializer::new(value, &mut record);
        serde_path_to_error::deserialize::<_, T>(ignored)
    };
    let resource = resource.map(str::to_owned);
    for path in &unknown {
        let field = path.as_str().rsplit(['.', '[']).next().unwrap_or_default();
        out.push(origin.diagnostic(resource.clone(), path, unknown_field(field, &[])));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let path = FieldPath::from_serde(base, e.path());
            out.push(origin.diagnostic(resource, &path, e.inner().to_string()));
            None
        }
    }
}

/// Namespaces follow Kubernetes namespace names (RFC 1123 labels).
fn check_namespace(namespace: &str) -> Result<(), String> {
    let valid_chars = namespace
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if namespace.is_empty()
        || namespace.len() > 63
        || !valid_chars
        || !alnum(namespace.as_bytes().first())
        || !alnum(namespace.as_bytes().last())
    {
        return Err(format!(
            "{namespace:?} is not a valid namespace: use lower-case letters, digits and '-', starting and ending with a letter or digit (at most 63)"
        ));
    }
    Ok(())
}

/// Names follow Kubernetes object names (RFC 1123 sub-domains): lower-case
/// letters, digits, `-` and `.`, starting and ending with a letter or digit.
fn check_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty()
        || name.len() > 253
        || !valid_chars
        || !alnum(name.as_bytes().first())
        || !alnum(name.as_bytes().last())
    {
        return Err(format!(
            "{name:?} is not a valid name: use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit (at most 253)"
        ));
    }
    Ok(())
}

/// One document of a config dump.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DocumentRef<'a, S> {
    api_version: &'static str,
    kind: &'static str,
    metadata: MetadataRef<'a>,
    spec: &'a S,
}

#[derive(Serialize)]
struct MetadataRef<'a> {
    name: &'a str,
}

fn doc<T>(kind: Kind, r: &Resource<T>) -> DocumentRef<'_, T> {
    DocumentRef {
        api_version: API_VERSION,
        kind: kind.as_str(),
        metadata: MetadataRef { name: &r.name },
        spec: &r.spec,
    }
}

impl Serialize for Config {
    /// A config serializes as the list of its documents, defaults filled in.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(
            self.listeners.len()
                + self.backends.len()
                + self.routes.len()
                + self.policies.len()
                + self.sidecars.len(),
        ))?;
        for r in &self.listeners {
            seq.serialize_element(&doc(Kind::Listener, r))?;
        }
        for r in &self.backends {
            seq.serialize_element(&doc(Kind::Backend, r))?;
        }
        for r in &self.routes {
            seq.serialize_element(&doc(Kind::Route, r))?;
        }
        for r in &self.policies {
            seq.serialize_element(&doc(Kind::AuthorizationPolicy, r))?;
        }
        for r in &self.sidecars {
            seq.serialize_element(&doc(Kind::Sidecar, r))?;
        }
        seq.end()
    }
}
