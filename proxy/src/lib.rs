//! The infermesh data plane: a streaming HTTP/1.1 and HTTP/2 proxy for
//! model serving, run as a pod's sidecar or as a standalone gateway from
//! one YAML file ([`run`]).
//!
//! The crate is built in layers, each a folder, each importing only from
//! the layers below it (a test, `tests/layers.rs`, keeps that rule):
//!
//! | layer | owns |
//! | --- | --- |
//! | `app` | the process: gateway and sidecar runs, config and identity files, admin and health servers, logging |
//! | `server` | listeners, each connection's and each request's phases, errors rendered as responses, the access log |
//! | `snapshot` | the running config as one immutable value: routers, authorization, the build of services from config |
//! | `route` | a rule's service stack: rate limit, timeouts, upgrades, mirror, retries with budget and replay, hedging, fan-out |
//! | `backend` | endpoints, DNS, the connection pool, circuit breaker, outlier detection, peak EWMA, the endpoint pick |
//! | `transport` | TLS, connecting to endpoints, original destination, protocol detection, TCP tunnels |
//! | `core` | bodies, the error vocabulary and its classification, request context, header names, the metrics registry |
//!
//! A request goes down the layers and its response back up: the server
//! accepts it and runs its phases (authorize, route, forward, respond,
//! observe) against the serving snapshot; the matched rule's stack
//! applies its policies and sends each attempt to a backend, whose
//! balancer picks an endpoint and whose pool speaks HTTP to it over a
//! transport connection. Bodies stream frame by frame and are never
//! collected, except where a retry replays or a fan-out combines them.
//!
//! The public items below are what the `infermesh-proxy` binary and the
//! hot-path benchmarks use; everything else is private to the crate.

#![forbid(unsafe_code)]

mod app;
mod backend;
mod core;
mod route;
mod server;
mod snapshot;
mod transport;

pub use app::config_file::{ConfigFileError, load as load_config_file};
pub use app::control_plane::{ControlPlaneOptions, TrustBundle};

/// The proxy's client of the control plane, on its own: for the load
/// harness's simulated proxies (`infermesh-bench mesh-scale`).
pub mod control_plane_client {
    pub use crate::app::control_plane::{Detached, Pushed, StartError, start_detached};
}
pub use app::identity::IdentityFiles;
pub use app::logging::{LogControl, LogFormat, init as init_logging};
pub use app::run::{ConfigFrom, Mode, RunOptions, run};
pub use app::sidecar::{BUILT_IN_NAME, CaptureAddresses, log_user as log_sidecar_user};
pub use infermesh_telemetry::{TraceArgs, TraceOptions};
pub use server::access_filter::AccessLogFilter;

/// The per-request work the proxy adds, public for the hot-path
/// benchmarks (`benches/hot_path.rs`) and the fuzz targets (`fuzz/`):
/// checking the host, normalising the path, route matching, header rules,
/// adapting a request to the upstream's HTTP version, the endpoint pick,
/// reading a JSON body's fields and combining fan-out answers.
pub mod hot_path {
    pub use crate::backend::endpoint::{Endpoint, EndpointSet};
    pub use crate::backend::pick::Balancer;
    pub use crate::backend::pool::adapt_request;
    pub use crate::core::authority::{HostError, check as check_host};
    pub use crate::core::headers::{add_forwarded, strip_hop_by_hop};
    pub use crate::core::model::BodyFields;
    pub use crate::core::path::{PathError, normalize as normalize_path};
    pub use crate::route::fanout::combine::{Averaged, Incompatible, Tally, keyed, leader, mean};
    pub use crate::snapshot::router::{Router, RouterBuilder};
}
