//! The snapshot layer: the running configuration as one immutable value.
//! A [`Snapshot`] holds the config it came from, each listener's router
//! ([`router`]) and authorization policies ([`authorize`]), the backends,
//! and the rule stacks the routes lead to, all built from the config when
//! it is applied (`build`, kind by kind). A new config becomes a new
//! snapshot that is swapped in atomically; requests in flight keep the
//! snapshot they started with, and nothing on the request path takes a
//! lock that applying a config takes.

pub(crate) mod authorize;
mod build;
pub(crate) mod metrics;
pub(crate) mod router;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use infermesh_api::{
    Capture, Config, EscapedSlashes, ListenerLimits, ListenerProtocol, OutsideMesh,
};

use crate::backend::Backend;
use crate::core::context::ListenerId;
use crate::route::stack::{RuleStack, RuleState};
use crate::snapshot::authorize::Authorization;
use crate::snapshot::router::{InvalidMatch, Router};
use crate::transport::tls;

pub(crate) use metrics::Metrics;

/// Why a config cannot become a snapshot.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildError {
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

/// The hasher of the listeners by id, looked up on every request: the ids
/// are the proxy's own numbers, so the default hasher's resistance to
/// chosen keys buys nothing there, at four times the cost.
pub(crate) type ListenerIdHasher = foldhash::fast::RandomState;

/// One immutable version of the running configuration.
pub(crate) struct Snapshot {
    /// The config's version ([`Config::version`]).
    pub version: String,
    /// The config, defaults filled in.
    pub config: Arc<Config>,
    /// When this snapshot started serving.
    pub applied_at: SystemTime,
    listeners: HashMap<ListenerId, Arc<ListenerEntry>, ListenerIdHasher>,
    backends: BTreeMap<String, Arc<Backend>>,
    /// The default rule of each backend, by the `addresses` that stand for it.
    addresses: HashMap<SocketAddr, Arc<RuleStack>>,
    /// Every model name the config names (in route matches and fan-out
    /// branches): the values a metric's `model` label may take.
    models: HashSet<Arc<str>>,
    /// What each route's rules have built up (rate-limit buckets, hedging
    /// budgets), in rule order: the next config's rules go on from it.
    rule_states: HashMap<Arc<str>, Vec<RuleState>>,
}

/// What a listener serves.
pub(crate) struct ListenerEntry {
    /// The listener's socket.
    pub id: ListenerId,
    /// The listener's `metadata.name`.
    pub name: Arc<str>,
    /// The HTTP versions it accepts.
    pub protocol: ListenerProtocol,
    /// Its rules, in precedence order.
    pub router: Router<Arc<RuleStack>>,
    /// Mutual TLS with clients, when the listener asks for it.
    pub tls: Option<tls::Server>,
    /// Its authorization policies, when any apply.
    pub authorization: Option<Authorization>,
    /// Which of a pod's traffic it captures, for a sidecar.
    pub capture: Option<Capture>,
    /// What an outbound capture listener does with destinations outside
    /// the mesh.
    pub outside_mesh: OutsideMesh,
    /// What escaped slashes in request paths become.
    pub escaped_slashes: EscapedSlashes,
    /// How long its connections and streams may live, and how much each
    /// may hold.
    pub limits: ListenerLimits,
}

impl ListenerEntry {
    /// Whether the listener takes a pod's outbound traffic.
    pub(crate) fn is_outbound_capture(&self) -> bool {
        self.capture == Some(Capture::Outbound)
    }
}

impl Snapshot {
    /// What the listener with socket `id` serves, for a connection or a
    /// request to keep.
    pub(crate) fn listener_entry(&self, id: ListenerId) -> Option<Arc<ListenerEntry>> {
        self.listeners.get(&id).cloned()
    }

    /// The default rule of the backend that `address` stands for.
    pub(crate) fn by_address(&self, address: SocketAddr) -> Option<&Arc<RuleStack>> {
        self.addresses.get(&address)
    }

    /// The backends, by name.
    pub(crate) fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.values()
    }

    /// The `model` label of `request`, whose route match named `matched`
    /// (if it did): that model, else the model the request names if the
    /// config names it too, else none. Label values thus come from the
    /// config, never from arbitrary client input. The body is not read
    /// for it: a body's model is known only where a listener's rules
    /// match on models (the path's, of KServe v2, always is).
    pub(crate) fn model_label<B>(
        &self,
        matched: Option<Arc<str>>,
        request: &http::Request<B>,
    ) -> Option<Arc<str>> {
        if matched.is_some() || self.models.is_empty() {
            return matched;
        }
        crate::core::model::of(request).and_then(|name| self.models.get(name).cloned())
    }
}
