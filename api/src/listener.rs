//! `Listener`: an address the gateway accepts traffic on, and the HTTP
//! versions it speaks there.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The spec of a `Listener` resource.
///
/// ```yaml
/// kind: Listener
/// metadata: { name: public }
/// spec:
///   address: 0.0.0.0:8080
///   protocol: http
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSpec {
    /// The socket address to bind, such as `0.0.0.0:8080` or `[::]:8080`.
    /// Port 0 binds an ephemeral port (the bound port is logged).
    pub address: SocketAddr,
    /// Which HTTP versions clients may speak.
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Mutual TLS with clients; plaintext unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// Mutual TLS on a listener with SPIFFE identities: the proxy presents its
/// own certificate (`--identity-cert`), requires a client certificate that
/// chains to the trust bundle and carries a SPIFFE ID of the proxy's trust
/// domain, and notes the client's identity (access log `peer_identity`).
///
/// ```yaml
/// tls: { mode: strict }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerTls {
    /// Whether plaintext clients are still accepted.
    pub mode: TlsMode,
}

/// Whether a TLS listener also takes plaintext, as Istio's peer
/// authentication modes say it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Mutual TLS only; a plaintext connection is closed.
    #[default]
    Strict,
    /// Mutual TLS or plaintext on the same port, told apart by the first
    /// byte (a TLS handshake starts with 0x16), for migrating clients.
    Permissive,
}

/// The HTTP versions a listener accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
