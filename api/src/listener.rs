//! `Listener`: an address the proxy accepts traffic on, the HTTP versions
//! it speaks there, mutual TLS with its clients, and, for a sidecar, which
//! side of the pod's traffic it captures.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
