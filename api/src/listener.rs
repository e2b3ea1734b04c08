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
