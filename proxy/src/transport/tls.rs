//! Mutual TLS at both ends of the proxy: originating it to backends (the
//! proxy's SPIFFE identity, the endpoints' expected identity, ALPN for the
//! backend's HTTP version) and terminating it on listeners (accepting
//! clients with the proxy's identity, reading theirs). Every handshake is
//! counted in `infermesh_tls_handshakes_total`, this layer's one metric.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use infermesh_api::{ListenerProtocol, ListenerTls, TlsMode, UpstreamProtocol};
use infermesh_certs::{
    CertStore, ClientOptions, ExpectedIdentity, HandshakeFailure, ServerOptions, SpiffeId,
    client_config_with, peer_identity, server_config,
};
use prometheus::IntCounterVec;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, server};

use crate::core::error::ErrorKind;
use crate::core::metrics::Registry;
use crate::transport::detect::DETECT_TIMEOUT;

/// The transport layer's metrics.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// `infermesh_tls_handshakes_total{direction,result,reason}`: TLS
    /// handshakes with clients (`inbound`) and endpoints (`outbound`); the
    /// reason of a failure is `unknown_ca`, `expired`, `bad_identity`,
    /// `no_client_cert`...
    pub tls_handshakes: IntCounterVec,
}

impl Metrics {
    /// Registers the transport layer's families in `registry`.
    pub(crate) fn register(registry: &Registry) -> Self {
        Metrics {
            tls_handshakes: registry.counter(
                "infermesh_tls_handshakes_total",
                "TLS handshakes with clients (inbound) and endpoints (outbound), by result and failure reason.",
                &["direction", "result", "reason"],
            ),
        }
    }
}

/// How a backend's connections are secured: the identity each endpoint
/// must present, one client config per distinct identity.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    /// For endpoints without an identity of their own.
    default: Option<Arc<ClientConfig>>,
    /// For endpoints with their own, by address.
    by_endpoint: Arc<HashMap<SocketAddr, Arc<ClientConfig>>>,
    handshakes: IntCounterVec,
}

impl Client {
    /// For a backend whose endpoints must present `default` unless
    /// `by_endpoint` names their own, offering the ALPN protocol of
    /// `protocol`.
    pub(crate) fn new(
        store: &Arc<CertStore>,
        default: Option<SpiffeId>,
        by_endpoint: &[(SocketAddr, SpiffeId)],
        protocol: UpstreamProtocol,
        metrics: &Metrics,
    ) -> Result<Self, rustls::Error> {
        let alpn = match protocol {
            UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
            UpstreamProtocol::Http2 => b"h2".to_vec(),
        };
        let mut configs: HashMap<SpiffeId, Arc<ClientConfig>> = HashMap::new();
        let mut config_for = |identity: &SpiffeId| -> Result<Arc<ClientConfig>, rustls::Error> {
            if let Some(config) = configs.get(identity) {
                return Ok(config.clone());
            }
            let config = client_config_with(
                store,
                ExpectedIdentity::Exact(identity.clone()),
                &ClientOptions {
                    alpn_protocols: vec![alpn.clone()],
                    ..ClientOptions::default()
                },
            )?;
            configs.insert(identity.clone(), config.clone());
            Ok(config)
        };
        let default = default.as_ref().map(&mut config_for).transpose()?;
        let by_endpoint = by_endpoint
            .iter()
            .map(|(addr, identity)| Ok((*addr, config_for(identity)?)))
            .collect::<Result<HashMap<_, _>, rustls::Error>>()?;
        Ok(Client {
            default,
            by_endpoint: Arc::new(by_endpoint),
            handshakes: metrics.tls_handshakes.clone(),
        })
    }

    /// Runs the TLS handshake over `stream` to the endpoint at `addr`,
    /// which must present its identity. The server name is the endpoint's
    /// IP address, so no SNI is sent: the endpoint is checked by its
    /// SPIFFE ID, not by a name.
    pub(crate) async fn handshake(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, ErrorKind> {
        let Some(config) = self.by_endpoint.get(&addr).or(self.default.as_ref()) else {
            // Validation gives every endpoint an identity; a DNS name's
            // addresses have the backend's.
            return Err(ErrorKind::UpstreamTls(format!(
                "endpoint {addr} has no identity to check"
            )));
        };
        let name = ServerName::IpAddress(addr.ip().into());
        let result = TlsConnector::from(config.clone())
            .connect(name, stream)
            .await;
        count(&self.handshakes, "outbound", result.as_ref().err());
        result.map_err(|e| ErrorKind::UpstreamTls(e.to_string()))
    }
}

/// Counts a handshake that failed with `error`, or succeeded.
fn count(handshakes: &IntCounterVec, direction: &str, error: Option<&io::Error>) {
    let (result, reason) = match error {
        None => ("success", ""),
        Some(e) => ("failure", HandshakeFailure::from_io(e).as_str()),
    };
    handshakes
        .with_label_values(&[direction, result, reason])
        .inc();
}

/// How a listener's connections are secured.
#[derive(Clone)]
pub(crate) struct Server {
    acceptor: TlsAcceptor,
    modes: ListenerTls,
    handshakes: IntCounterVec,
}

impl Server {
    /// For a listener speaking `protocol`, in the modes of `modes`.
    pub(crate) fn new(
        store: &Arc<CertStore>,
        protocol: ListenerProtocol,
        modes: ListenerTls,
        metrics: &Metrics,
    ) -> Result<Self, rustls::Error> {
        let alpn: &[&[u8]] = match protocol {
            ListenerProtocol::Http => &[b"h2", b"http/1.1"],
            ListenerProtocol::Http1 => &[b"http/1.1"],
            ListenerProtocol::Http2 => &[b"h2"],
        };
        let config = server_config(
            store,
            &ServerOptions {
                alpn_protocols: alpn.iter().map(|p| p.to_vec()).collect(),
                ..ServerOptions::default()
            },
        )?;
        Ok(Server {
            acceptor: TlsAcceptor::from(config),
            modes,
            handshakes: metrics.tls_handshakes.clone(),
        })
    }

    /// Whether the client on `stream`, which connected to `port`, is to
    /// speak TLS: in strict mode every client must, in disable mode none
    /// may, in permissive mode its first byte (looked at, not taken) says.
    /// A TLS client speaks first, so one silent for a second is not one
    /// (it may be waiting for a server that speaks first).
    pub(crate) async fn wants_tls(&self, stream: &TcpStream, port: u16) -> io::Result<bool> {
        match self.modes.mode_for(port) {
            TlsMode::Strict => return Ok(true),
            TlsMode::Disable => return Ok(false),
            TlsMode::Permissive => {}
        }
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(DETECT_TIMEOUT, stream.peek(&mut first));
        let Ok(read) = peeked.await else {
            return Ok(false);
        };
        let read = read?;
        // 0x16: a TLS record of type handshake.
        Ok(read == 1 && first[0] == 0x16)
    }

    /// Accepts a client over TLS, returning the stream and the client's
    /// SPIFFE ID.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
    ) -> io::Result<(server::TlsStream<TcpStream>, Option<SpiffeId>)> {
        let result = self.acceptor.accept(stream).await;
        count(&self.handshakes, "inbound", result.as_ref().err());
        let tls = result?;
        let peer = peer_identity(tls.get_ref().1);
        Ok((tls, peer))
    }
}
