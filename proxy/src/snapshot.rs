//! The running configuration as one immutable value: the config it came
//! from, each listener's router, and the backends. A new config becomes a
//! new snapshot that is swapped in atomically; requests in flight keep the
//! snapshot they started with, and nothing on the request path takes a lock
//! that applying a config takes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use infermesh_api::{BackendTls, Capture, Config, ListenerProtocol, ListenerTls, OutsideMesh};
use infermesh_certs::{CertStore, SpiffeId};

use crate::authorize::Authorization;
use crate::backend::Backend;
use crate::capture::default_rule;
use crate::forward::{RuleService, rule_service};
use crate::metrics::Metrics;
use crate::router::{InvalidMatch, Router};

/// Identifies a bound listener socket; it stays the same across reloads
/// that keep the listener's address.
pub type ListenerId = u64;

/// Why a config cannot become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A route match did not compile.
    #[error(transparent)]
    Routes(InvalidMatch),
    /// A listener or backend asks for mutual TLS, and the proxy was started
    /// without an identity.
    #[error(
        "{0} asks for mutual TLS (spec.tls), but the proxy has no identity; start it with --identity-cert, --identity-key and --trust-bundle"
    )]
    NoIdentity(String),
    /// A TLS config could not be built.
    #[error("{what}: cannot set up TLS: {error}")]
    Tls {
        /// The listener or backend.
        what: String,
        /// What went wrong.
        error: String,
    },
}

/// The store of a listener or backend (`what`) that asks for TLS.
fn identity_for<'a>(
    what: &str,
    identity: Option<&'a Arc<CertStore>>,
) -> Result<&'a Arc<CertStore>, BuildError> {
    identity.ok_or_else(|| BuildError::NoIdentity(what.to_owned()))
}

fn tls_error(what: &str, error: impl std::fmt::Display) -> BuildError {
    BuildError::Tls {
        what: what.to_owned(),
        error: error.to_string(),
    }
}

/// How the connections of backend `name` are secured.
fn backend_tls(
    name: &str,
    tls: &BackendTls,
    spec: &infermesh_api::BackendSpec,
    identity: Option<&Arc<CertStore>>,
    metrics: &Metrics,
) -> Result<crate::tls::Client, BuildError> {
    let what = format!("backend {name:?}");
    let store = identity_for(&what, identity)?;
    let expected = SpiffeId::parse(&tls.identity).map_err(|e| tls_error(&what, e))?;
    crate::tls::Client::new(store, expected, spec.protocol, metrics)
        .map_err(|e| tls_error(&what, e))
}

/// How the connections of listener `name` are secured.
fn listener_tls(
    name: &str,
    tls: &ListenerTls,
    protocol: ListenerProtocol,
    identity: Option<&Arc<CertStore>>,
    metrics: &Metrics,
) -> Result<crate::tls::Server, BuildError> {
    let what = format!("listener {name:?}");
    let store = identity_for(&what, identity)?;
    crate::tls::Server::new(store, protocol, tls.clone(), metrics).map_err(|e| tls_error(&what, e))
}

/// One immutable version of the running configuration.
pub struct Snapshot {
    /// The config's version ([`Config::version`]).
    pub version: String,
    /// The config, defaults filled in.
    pub config: Arc<Config>,
    /// When this snapshot started serving.
    pub applied_at: SystemTime,
    listeners: HashMap<ListenerId, Arc<ListenerEntry>>,
    backends: BTreeMap<String, Arc<Backend>>,
    /// The default rule of each backend, by the `addresses` that stand for it.
    addresses: HashMap<SocketAddr, Arc<RuleTarget>>,
}

/// What a listener serves.
pub struct ListenerEntry {
    /// The listener's socket.
    pub id: ListenerId,
    /// The listener's `metadata.name`.
    pub name: Arc<str>,
    /// The HTTP versions it accepts.
    pub protocol: ListenerProtocol,
    /// Its rules, in precedence order.
    pub router: Router<Arc<RuleTarget>>,
    /// Mutual TLS with clients, when the listener asks for it.
    pub tls: Option<crate::tls::Server>,
    /// Its authorization policies, when any apply.
    pub authorization: Option<Authorization>,
    /// Which of a pod's traffic it captures, for a sidecar.
    pub capture: Option<Capture>,
    /// What an outbound capture listener does with destinations outside
    /// the mesh.
    pub outside_mesh: OutsideMesh,
}

impl ListenerEntry {
    /// Whether the listener takes a pod's outbound traffic.
    pub fn is_outbound_capture(&self) -> bool {
        self.capture == Some(Capture::Outbound)
    }
}

/// Where a matched request goes: the rule's route name (for logs and
/// metrics) and its service stack.
pub struct RuleTarget {
    /// The route's `metadata.name`.
    pub route: Arc<str>,
    /// The rule's service stack.
    pub service: RuleService,
}

impl Snapshot {
    /// Builds the snapshot of `config`. `listener_ids` gives the socket of
    /// each listener name; the listeners in `draining` (no longer
    /// configured, connections still open) keep what `previous` served on
    /// them. Backends whose spec did not change are taken from `previous`
    /// with their endpoints and open connections.
    ///
    /// `identity` is the proxy's own certificate store, needed by backends
    /// that ask for mutual TLS.
    ///
    /// Fails when a backend asks for mutual TLS and the proxy has no
    /// identity, or on a route match that does not compile (which
    /// validation already refuses; a config built by other means is refused
    /// here rather than crashing the proxy).
    pub async fn build(
        config: Config,
        listener_ids: &HashMap<String, ListenerId>,
        draining: &[ListenerId],
        previous: Option<&Snapshot>,
        metrics: &Metrics,
        identity: Option<&Arc<CertStore>>,
    ) -> Result<Snapshot, BuildError> {
        let mut backends = BTreeMap::new();
        for resource in &config.backends {
            let before = previous.and_then(|p| p.backends.get(&resource.name));
            let backend = match before {
                Some(backend) if backend.spec == resource.spec => backend.clone(),
                _ => {
                    let tls = match &resource.spec.tls {
                        None => None,
                        Some(tls) => Some(backend_tls(
                            &resource.name,
                            tls,
                            &resource.spec,
                            identity,
                            metrics,
                        )?),
                    };
                    Backend::new(
                        &resource.name,
                        resource.spec.clone(),
                        before.map(|b| &**b),
                        metrics,
                        tls,
                    )
                    .await
                }
            };
            backends.insert(resource.name.clone(), backend);
        }

        let targets: Vec<Vec<Arc<RuleTarget>>> = config
            .routes
            .iter()
            .map(|route| {
                let name: Arc<str> = Arc::from(route.name.as_str());
                route
                    .spec
                    .rules
                    .iter()
                    .map(|rule| {
                        Arc::new(RuleTarget {
                            route: name.clone(),
                            service: rule_service(rule, &name, &backends, metrics),
                        })
                    })
                    .collect()
            })
            .collect();

        // A request sent to one of a backend's addresses goes through a
        // rule of every default, logged under the backend's name.
        let mut addresses = HashMap::new();
        for resource in &config.backends {
            if resource.spec.addresses.is_empty() {
                continue;
            }
            let name: Arc<str> = Arc::from(resource.name.as_str());
            let target = Arc::new(RuleTarget {
                route: name.clone(),
                service: rule_service(&default_rule(&name), &name, &backends, metrics),
            });
            for address in &resource.spec.addresses {
                addresses.insert(*address, target.clone());
            }
        }

        let mut listeners = HashMap::new();
        for listener in &config.listeners {
            let mut router = Router::builder();
            for (route, targets) in config.routes.iter().zip(&targets) {
                // An inbound capture listener forwards to the app; a route
                // takes its requests elsewhere only when it says so.
                let attached = if route.spec.listeners.is_empty() {
                    !listener.spec.is_inbound_capture()
                } else {
                    route.spec.listeners.contains(&listener.name)
                };
                if !attached {
                    continue;
                }
                for (rule, target) in route.spec.rules.iter().zip(targets) {
                    router
                        .add(&route.spec.hostnames, &rule.matches, target.clone())
                        .map_err(BuildError::Routes)?;
                }
            }
            let id = listener_ids[&listener.name];
            listeners.insert(
                id,
                Arc::new(ListenerEntry {
                    id,
                    name: Arc::from(listener.name.as_str()),
                    protocol: listener.spec.protocol,
                    router: router.build(),
                    authorization: Authorization::for_listener(listener, &config.policies, metrics),
                    capture: listener.spec.capture,
                    outside_mesh: listener.spec.outside_mesh.unwrap_or_default(),
                    tls: match &listener.spec.tls {
                        None => None,
                        Some(tls) => Some(listener_tls(
                            &listener.name,
                            tls,
                            listener.spec.protocol,
                            identity,
                            metrics,
                        )?),
                    },
                }),
            );
        }
        if let Some(previous) = previous {
            for id in draining {
                if let Some(entry) = previous.listeners.get(id) {
                    listeners.insert(*id, entry.clone());
                }
            }
        }

        Ok(Snapshot {
            version: config.version(),
            config: Arc::new(config),
            applied_at: SystemTime::now(),
            listeners,
            backends,
            addresses,
        })
    }

    /// What the listener with socket `id` serves.
    pub fn listener(&self, id: ListenerId) -> Option<&ListenerEntry> {
        self.listeners.get(&id).map(|entry| &**entry)
    }

    /// What the listener with socket `id` serves, to keep for the life of a
    /// connection.
    pub fn listener_entry(&self, id: ListenerId) -> Option<Arc<ListenerEntry>> {
        self.listeners.get(&id).cloned()
    }

    /// The default rule of the backend that `address` stands for.
    pub fn by_address(&self, address: SocketAddr) -> Option<&Arc<RuleTarget>> {
        self.addresses.get(&address)
    }

    /// The backends, by name.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.values()
    }
}
