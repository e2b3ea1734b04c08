//! Building a [`Snapshot`] from a config, resource kind by resource kind:
//! the backends (kept from the previous snapshot when their spec did not
//! change, with their endpoints and connections), the rule stacks of the
//! routes, the default rules of backends reached by address, and the
//! listeners with their routers, policies and TLS.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use infermesh_api::{BackendSpec, BackendTls, Config, EndpointTarget, ListenerSpec, Resource};
use infermesh_certs::{CertStore, SpiffeId};

use crate::backend::Backend;
use crate::core::context::ListenerId;
use crate::route::stack::{RuleStack, RuleState, default_rule};
use crate::snapshot::authorize::Authorization;
use crate::snapshot::router::Router;
use crate::snapshot::{BuildError, ListenerEntry, ListenerIdHasher, Metrics, Snapshot};
use crate::transport::connect::{Connector, TcpConnector};
use crate::transport::tls;

impl Snapshot {
    /// Builds the snapshot of `config`. `listener_ids` gives the socket of
    /// each listener name; the listeners in `draining` (no longer
    /// configured, connections still open) keep what `previous` served on
    /// them. Backends whose spec did not change are taken from `previous`
    /// with their endpoints and open connections.
    ///
    /// `identity` is the proxy's own certificate store, needed by listeners
    /// and backends that ask for mutual TLS.
    ///
    /// Fails when a listener or backend asks for mutual TLS and the proxy
    /// has no identity, or on a route match that does not compile (which
    /// validation already refuses; a config built by other means is refused
    /// here rather than crashing the proxy).
    pub(crate) async fn build(
        config: Config,
        listener_ids: &HashMap<String, ListenerId>,
        draining: &[ListenerId],
        previous: Option<&Snapshot>,
        metrics: &Metrics,
        identity: Option<&Arc<CertStore>>,
    ) -> Result<Snapshot, BuildError> {
        let backends = build_backends(&config, previous, metrics, identity).await?;
        let rules = build_rules(&config, &backends, metrics, previous);
        let addresses = build_addresses(&config, &backends, metrics);
        let mut listeners = build_listeners(&config, &rules, listener_ids, metrics, identity)?;
        if let Some(previous) = previous {
            for id in draining {
                if let Some(entry) = previous.listeners.get(id) {
                    listeners.insert(*id, entry.clone());
                }
            }
        }
        let models = model_names(&config);
        let rule_states = rule_states(&config, &rules);
        Ok(Snapshot {
            version: config.version(),
            config: Arc::new(config),
            applied_at: SystemTime::now(),
            listeners,
            backends,
            addresses,
            models,
            rule_states,
        })
    }
}

/// Every model name the config names: in route matches and fan-out
/// branches.
fn model_names(config: &Config) -> HashSet<Arc<str>> {
    let mut names = HashSet::new();
    for rule in config.routes.iter().flat_map(|r| &r.spec.rules) {
        let matched = rule.matches.iter().filter_map(|m| m.model.as_deref());
        let branches = rule
            .fanout
            .iter()
            .flat_map(|f| &f.branches)
            .filter_map(|b| b.model.as_deref());
        for name in matched.chain(branches) {
            if !names.contains(name) {
                names.insert(Arc::from(name));
            }
        }
    }
    names
}

/// The backends: each taken from `previous` when its spec is unchanged,
/// else made anew (resolving its DNS names once).
async fn build_backends(
    config: &Config,
    previous: Option<&Snapshot>,
    metrics: &Metrics,
    identity: Option<&Arc<CertStore>>,
) -> Result<BTreeMap<String, Arc<Backend>>, BuildError> {
    let mut backends = BTreeMap::new();
    for resource in &config.backends {
        let before = previous.and_then(|p| p.backends.get(&resource.name));
        let backend = match before {
            Some(backend) if backend.spec == resource.spec => backend.clone(),
            _ => {
                let connector = connector(&resource.name, &resource.spec, identity, metrics)?;
                Backend::new(
                    &resource.name,
                    resource.spec.clone(),
                    before.map(|b| &**b),
                    &metrics.backend,
                    connector,
                )
                .await
            }
        };
        backends.insert(resource.name.clone(), backend);
    }
    Ok(backends)
}

/// How the connections of backend `name` are made: TCP, with mutual TLS
/// when its spec asks for it.
fn connector(
    name: &str,
    spec: &BackendSpec,
    identity: Option<&Arc<CertStore>>,
    metrics: &Metrics,
) -> Result<Arc<dyn Connector>, BuildError> {
    let tls = match &spec.tls {
        None => None,
        Some(tls) => Some(backend_tls(name, tls, spec, identity, metrics)?),
    };
    Ok(Arc::new(TcpConnector::new(tls)))
}

/// The stacks of every rule of every route, by route in config order,
/// each going on from the state of the same rule (by route name and
/// place) in `previous`.
fn build_rules(
    config: &Config,
    backends: &BTreeMap<String, Arc<Backend>>,
    metrics: &Metrics,
    previous: Option<&Snapshot>,
) -> Vec<Vec<Arc<RuleStack>>> {
    config
        .routes
        .iter()
        .map(|route| {
            let name: Arc<str> = Arc::from(route.name.as_str());
            let before = previous.and_then(|p| p.rule_states.get(&name));
            route
                .spec
                .rules
                .iter()
                .enumerate()
                .map(|(index, rule)| {
                    let state = before.and_then(|states| states.get(index));
                    Arc::new(RuleStack::build(
                        rule,
                        &name,
                        backends,
                        &metrics.route,
                        state,
                    ))
                })
                .collect()
        })
        .collect()
}

/// The state of every rule, by route name, for the next config's build.
fn rule_states(
    config: &Config,
    rules: &[Vec<Arc<RuleStack>>],
) -> HashMap<Arc<str>, Vec<RuleState>> {
    config
        .routes
        .iter()
        .zip(rules)
        .map(|(route, stacks)| {
            let states = stacks.iter().map(|s| s.state.clone()).collect();
            (Arc::from(route.name.as_str()), states)
        })
        .collect()
}

/// A request sent to one of a backend's `addresses` goes through a rule of
/// every default, logged under the backend's name.
fn build_addresses(
    config: &Config,
    backends: &BTreeMap<String, Arc<Backend>>,
    metrics: &Metrics,
) -> HashMap<SocketAddr, Arc<RuleStack>> {
    let mut addresses = HashMap::new();
    for resource in &config.backends {
        if resource.spec.addresses.is_empty() {
            continue;
        }
        let name: Arc<str> = Arc::from(resource.name.as_str());
        let stack = Arc::new(RuleStack::build(
            &default_rule(&name),
            &name,
            backends,
            &metrics.route,
            None,
        ));
        for address in &resource.spec.addresses {
            addresses.insert(*address, stack.clone());
        }
    }
    addresses
}

/// Every listener: its router over the rules of the routes attached to
/// it, its authorization policies and its TLS.
fn build_listeners(
    config: &Config,
    rules: &[Vec<Arc<RuleStack>>],
    listener_ids: &HashMap<String, ListenerId>,
    metrics: &Metrics,
    identity: Option<&Arc<CertStore>>,
) -> Result<HashMap<ListenerId, Arc<ListenerEntry>, ListenerIdHasher>, BuildError> {
    let mut listeners = HashMap::default();
    for listener in &config.listeners {
        let id = listener_ids[&listener.name];
        let entry = ListenerEntry {
            id,
            name: Arc::from(listener.name.as_str()),
            protocol: listener.spec.protocol,
            router: listener_router(config, rules, listener)?,
            authorization: Authorization::for_listener(
                listener,
                &config.policies,
                &metrics.authorization_decisions,
            ),
            capture: listener.spec.capture,
            outside_mesh: listener.spec.outside_mesh.unwrap_or_default(),
            escaped_slashes: listener.spec.escaped_slashes,
            limits: listener.spec.limits.clone(),
            tls: match &listener.spec.tls {
                None => None,
                Some(tls) => Some(listener_tls(listener, tls, identity, metrics)?),
            },
        };
        listeners.insert(id, Arc::new(entry));
    }
    Ok(listeners)
}

/// The router of `listener`: the rules of every route attached to it.
fn listener_router(
    config: &Config,
    rules: &[Vec<Arc<RuleStack>>],
    listener: &Resource<ListenerSpec>,
) -> Result<Router<Arc<RuleStack>>, BuildError> {
    let mut router = Router::builder();
    for (route, stacks) in config.routes.iter().zip(rules) {
        // An inbound capture listener forwards to the app; a route takes
        // its requests elsewhere only when it says so.
        let attached = if route.spec.listeners.is_empty() {
            !listener.spec.is_inbound_capture()
        } else {
            route.spec.listeners.contains(&listener.name)
        };
        if !attached {
            continue;
        }
        for (rule, stack) in route.spec.rules.iter().zip(stacks) {
            router
                .add(&route.spec.hostnames, &rule.matches, stack.clone())
                .map_err(BuildError::Routes)?;
        }
    }
    Ok(router.build())
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
    spec: &BackendSpec,
    identity: Option<&Arc<CertStore>>,
    metrics: &Metrics,
) -> Result<tls::Client, BuildError> {
    let what = format!("backend {name:?}");
    let store = identity_for(&what, identity)?;
    let parse = |id: &str| SpiffeId::parse(id).map_err(|e| tls_error(&what, e));
    let default = tls.identity.as_deref().map(parse).transpose()?;
    let mut by_endpoint = Vec::new();
    for endpoint in &spec.endpoints {
        // Validation allows an endpoint's own identity on ip:port only.
        if let (Some(id), Ok(EndpointTarget::Socket(addr))) =
            (&endpoint.identity, endpoint.target())
        {
            by_endpoint.push((addr, parse(id)?));
        }
    }
    tls::Client::new(
        store,
        default,
        &by_endpoint,
        spec.protocol,
        &metrics.transport,
    )
    .map_err(|e| tls_error(&what, e))
}

/// How the connections of `listener` are secured.
fn listener_tls(
    listener: &Resource<ListenerSpec>,
    tls: &infermesh_api::ListenerTls,
    identity: Option<&Arc<CertStore>>,
    metrics: &Metrics,
) -> Result<tls::Server, BuildError> {
    let what = format!("listener {:?}", listener.name);
    let store = identity_for(&what, identity)?;
    tls::Server::new(
        store,
        listener.spec.protocol,
        tls.clone(),
        &metrics.transport,
    )
    .map_err(|e| tls_error(&what, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metrics::Registry;
    use infermesh_api::Source;

    /// A config of one backend and route `hedged`, whose one rule hedges
    /// at `percentile` and allows `rate` requests per second.
    fn config(percentile: u32, rate: u32) -> Config {
        let text = format!(
            "kind: Backend\napiVersion: infermesh.io/v1alpha1\nmetadata: {{ name: model }}\nspec: {{ endpoints: [{{ address: 127.0.0.1:9 }}] }}\n---\nkind: Route\napiVersion: infermesh.io/v1alpha1\nmetadata: {{ name: hedged }}\nspec:\n  rules:\n    - backends: [{{ name: model }}]\n      hedge: {{ percentile: {percentile}, budgetPercent: 10 }}\n      rateLimit: {{ requestsPerSecond: {rate} }}\n"
        );
        Config::load(&[Source {
            name: "config.yaml",
            text: &text,
        }])
        .expect("a valid config")
    }

    async fn build(config: Config, previous: Option<&Snapshot>, metrics: &Metrics) -> Snapshot {
        Snapshot::build(config, &HashMap::new(), &[], previous, metrics, None)
            .await
            .expect("the snapshot builds")
    }

    fn state(snapshot: &Snapshot) -> RuleState {
        snapshot.rule_states["hedged"][0].clone()
    }

    #[tokio::test]
    async fn a_config_change_keeps_what_the_rules_built_up() {
        let metrics = Metrics::register(&Registry::new());
        let first = build(config(95, 100), None, &metrics).await;
        let before = state(&first);
        let (hedge, bucket) = (before.hedge.unwrap(), before.rate_limit.unwrap());

        // A change elsewhere (here the backend's endpoints) keeps the
        // rule's budget and bucket as they are: no fresh burst of hedges,
        // no fresh burst past the limit.
        let mut changed = config(95, 100);
        changed.backends[0].spec.endpoints.clear();
        let second = build(changed, Some(&first), &metrics).await;
        let after = state(&second);
        assert!(Arc::ptr_eq(&hedge, after.hedge.as_ref().unwrap()));
        assert!(Arc::ptr_eq(&bucket, after.rate_limit.as_ref().unwrap()));

        // A new rate starts a new bucket, a new percentile new
        // observations (the budget going on: see the hedging's tests).
        let third = build(config(99, 50), Some(&second), &metrics).await;
        let replaced = state(&third);
        assert!(!Arc::ptr_eq(&bucket, replaced.rate_limit.as_ref().unwrap()));
        assert!(!Arc::ptr_eq(&hedge, replaced.hedge.as_ref().unwrap()));

        // Without a previous snapshot everything starts afresh.
        let fresh = state(&build(config(95, 100), None, &metrics).await);
        assert!(!Arc::ptr_eq(&hedge, fresh.hedge.as_ref().unwrap()));
    }
}
