//! `Listener`: an address the proxy accepts traffic on, the HTTP versions
//! it speaks there, mutual TLS with its clients, and, for a sidecar, which
//! side of the pod's traffic it captures.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Duration;
use crate::check::Checker;
use crate::path::FieldPath;

/// The spec of a `Listener` resource.
///
/// ```yaml
/// kind: Listener
/// metadata: { name: public }
/// spec:
///   address: 0.0.0.0:8080
///   protocol: http
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSpec {
    /// The socket address to bind, such as `0.0.0.0:8080` or `[::]:8080`.
    /// Port 0 binds an ephemeral port (the bound port is logged).
    #[schemars(schema_with = "crate::schema::socket_address")]
    pub address: SocketAddr,
    /// Which HTTP versions clients may speak.
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Mutual TLS with clients; plaintext unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// For a sidecar: the connections this listener takes are the pod's
    /// traffic redirected to it by iptables (`infermesh-proxy init`), and
    /// their original destination decides where they go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
    /// For an `outbound` capture listener: what happens to connections
    /// whose original destination is outside the mesh. Default
    /// `passthrough`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outside_mesh: Option<OutsideMesh>,
    /// What escaped slashes (`%2F`, `%5C`) in a request's path become
    /// when the path is normalised, before routing and authorization.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
    /// How long connections and streams may live and how much each may
    /// hold: what keeps slow, silent and abusive clients from tying the
    /// proxy up. Every field has a safe default.
    #[serde(default)]
    pub limits: ListenerLimits,
    /// In a mesh (the control plane's config): the proxies that run this
    /// listener, by their labels (`infermesh-proxy gateway|sidecar
    /// --label`), as Istio's `Gateway` selector. Absent: every gateway the
    /// control plane feeds (and no sidecar). A proxy's own file cannot
    /// have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<crate::policy::WorkloadSelector>,
}

/// The lifetimes and sizes of a listener's connections and streams, named
/// after Envoy's HTTP connection manager settings where one exists.
///
/// ```yaml
/// limits:
///   maxConnections: 10000
///   idleTimeout: 10m
///   maxConnectionAge: 30m      # clients reconnect, and rebalance
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerLimits {
    /// Connections open at once on this listener; past it a new
    /// connection is closed as soon as it is accepted (counted in
    /// `infermesh_downstream_connections_refused_total`). Unlimited when
    /// absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// How long a new connection may take to send enough bytes for its
    /// protocol to be told (TLS or plaintext, HTTP/1 or HTTP/2). Envoy's
    /// `listener_filters_timeout`. `0s` disables.
    pub first_byte_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request's headers
    /// once it has started them. `0s` disables.
    pub request_headers_timeout: Duration,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/2 clients get GOAWAY first). Envoy's `idle_timeout`. `0s`
    /// disables.
    pub idle_timeout: Duration,
    /// A connection this old is closed gracefully once its requests are
    /// done (HTTP/2 GOAWAY, HTTP/1 `Connection: close`), so that
    /// long-lived clients spread again over new proxies. Envoy's
    /// `max_connection_duration`. `0s` (the default) disables.
    pub max_connection_age: Duration,
    /// Requests a connection may carry; the connection is then closed
    /// gracefully. Unlimited when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Requests in flight at once on one HTTP/2 connection (the
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` the proxy advertises).
    pub max_concurrent_streams: u32,
    /// A response that sends the client nothing for this long is cut,
    /// whether the model is silent or the client is not reading (its
    /// flow-control window closed); its backend request is cancelled at
    /// once, so a slow reader never holds a backend's limits. Envoy's
    /// `stream_idle_timeout`. `0s` disables.
    pub stream_idle_timeout: Duration,
    /// The largest request header block, in bytes (HTTP/1: request line
    /// and headers; HTTP/2: the decoded header list). Larger requests get
    /// 431. At least 8192.
    pub max_header_bytes: u32,
    /// Interval of the HTTP/2 PINGs the proxy sends to each client, to
    /// find dead peers; a PING not answered within 20 s closes the
    /// connection. `0s` (the default) sends none.
    pub keep_alive_interval: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: None,
            first_byte_timeout: Duration::from_secs(15),
            request_headers_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            max_connection_age: Duration::ZERO,
            max_requests_per_connection: None,
            max_concurrent_streams: 100,
            stream_idle_timeout: Duration::from_secs(300),
            max_header_bytes: 64 * 1024,
            keep_alive_interval: Duration::ZERO,
        }
    }
}

/// What escaped slashes (`%2F` and `%5C`) in a request's path become when
/// the proxy normalises it. Backends disagree on them (nginx decodes them
/// before matching locations, most frameworks keep them), so a path that
/// keeps them may mean one thing to an authorization policy and another
/// to the model server; like Envoy's `path_with_escaped_slashes_action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    /// Decoded to `/` (both), then normalised with the rest of the path,
    /// and forwarded so: every hop sees the same segments (Istio's
    /// `DECODE_AND_MERGE_SLASHES`).
    #[default]
    Unescape,
    /// The request is refused with 400 `invalid_path`.
    Reject,
    /// Kept as they are (in upper case), for APIs whose path segments
    /// carry escaped slashes; safe only when no backend decodes them.
    Keep,
}

impl ListenerSpec {
    /// Whether this listener takes the pod's outbound traffic. Routes and
    /// authorization policies that name no listener treat it apart: routes
    /// serve it, policies (which guard the workload) do not apply to it.
    pub fn is_outbound_capture(&self) -> bool {
        self.capture == Some(Capture::Outbound)
    }

    /// Whether this listener takes the traffic sent to the pod.
    pub fn is_inbound_capture(&self) -> bool {
        self.capture == Some(Capture::Inbound)
    }
}

/// Which of a pod's traffic a sidecar listener captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// Connections to the pod (iptables PREROUTING, port 15006 by
    /// default). Each request is authorized and forwarded in plaintext to
    /// its original destination, the app; routes apply only when they name
    /// this listener. Peer authentication (`tls.mode`, per original port
    /// with `tls.ports`) is checked per connection.
    Inbound,
    /// Connections the pod's processes make (iptables OUTPUT, port 15001 by
    /// default). HTTP requests are routed by the routes, then to the
    /// backend whose `addresses` hold the original destination (with the
    /// backend's mutual TLS); other destinations are outside the mesh.
    Outbound,
}

/// What an outbound capture listener does with traffic for a destination
/// outside the mesh (no route matched and no backend holds the address),
/// like Istio's `outboundTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutsideMesh {
    /// Forward it unchanged to its original destination: HTTP requests as
    /// plaintext HTTP, anything else (TLS, databases) as a TCP stream.
    #[default]
    Passthrough,
    /// Refuse it: HTTP requests get 502 `outside_mesh`, other connections
    /// are closed. Each is logged and counted.
    Blocked,
}

impl crate::Spec for ListenerSpec {
    fn check(&self, checker: &mut Checker<'_>) {
        let spec = FieldPath::root().key("spec");
        let limits = spec.key("limits");
        if self.limits.max_header_bytes < 8192 {
            checker.error(
                limits.key("maxHeaderBytes"),
                "must be at least 8192 (the smallest header block HTTP/1 parsers accept)",
            );
        }
        if self.limits.max_concurrent_streams == 0 {
            checker.error(
                limits.key("maxConcurrentStreams"),
                "must be at least 1: with 0, HTTP/2 clients can send no request",
            );
        }
        if self.limits.max_connections == Some(0) {
            checker.error(
                limits.key("maxConnections"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if self.limits.max_requests_per_connection == Some(0) {
            checker.error(
                limits.key("maxRequestsPerConnection"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if self.outside_mesh.is_some() && !self.is_outbound_capture() {
            checker.error(
                spec.key("outsideMesh"),
                "outsideMesh applies only to a listener with `capture: outbound`",
            );
        }
        if let Some(tls) = &self.tls {
            if self.is_outbound_capture() {
                checker.error(
                    spec.key("tls"),
                    "an outbound capture listener takes the app's own plaintext traffic; mutual TLS is originated per backend (Backend spec.tls)",
                );
            }
            if !tls.ports.is_empty() && !self.is_inbound_capture() {
                checker.error(
                    spec.key("tls").key("ports"),
                    "per-port modes apply only to a listener with `capture: inbound` (whose connections keep their original port)",
                );
            }
            let mut seen = std::collections::HashMap::new();
            for (i, port) in tls.ports.iter().enumerate() {
                let at = spec.key("tls").key("ports").index(i).key("port");
                if port.port == 0 {
                    checker.error(at, "port must be between 1 and 65535");
                } else if let Some(first) = seen.insert(port.port, i) {
                    checker.error(
                        at,
                        format!("port {} is already listed at tls.ports[{first}]", port.port),
                    );
                }
            }
        }
    }
}

/// Mutual TLS on a listener with SPIFFE identities: the proxy presents its
/// own certificate (`--identity-cert`), requires a client certificate that
/// chains to the trust bundle and carries a SPIFFE ID of the proxy's trust
/// domain, and notes the client's identity (access log `peer_identity`).
///
/// On an inbound capture listener, `ports` sets the mode per original
/// destination port, like Istio's `portLevelMtls`.
///
/// ```yaml
/// tls:
///   mode: strict
///   ports:
///     - { port: 9090, mode: disable }   # metrics scraped in plaintext
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerTls {
    /// Whether plaintext clients are still accepted.
    pub mode: TlsMode,
    /// Modes for some original destination ports (inbound capture
    /// listeners only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortTls>,
}

impl ListenerTls {
    /// The mode for connections whose original destination port is `port`.
    pub fn mode_for(&self, port: u16) -> TlsMode {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map_or(self.mode, |p| p.mode)
    }
}

/// The peer-authentication mode of one original destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortTls {
    /// The port the client connected to.
    pub port: u16,
    /// Its mode.
    pub mode: TlsMode,
}

/// Whether a TLS listener also takes plaintext, as Istio's peer
/// authentication modes say it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Mutual TLS only; a plaintext connection is closed.
    #[default]
    Strict,
    /// Mutual TLS or plaintext on the same port, told apart by the first
    /// byte (a TLS handshake starts with 0x16), for migrating clients.
    Permissive,
    /// Plaintext only, as if `tls` were not given (for one port of an
    /// inbound capture listener whose default is another mode).
    Disable,
}

/// The HTTP versions a listener accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1, and HTTP/2 over cleartext with prior knowledge (h2c), told
    /// apart per connection by its first bytes.
    #[default]
    Http,
    /// HTTP/1.x only.
    Http1,
    /// HTTP/2 only (h2c prior knowledge), as gRPC clients use.
    Http2,
}
