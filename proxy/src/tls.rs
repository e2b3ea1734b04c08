//! Mutual TLS at both ends of the proxy: originating it to backends (the
//! proxy's SPIFFE identity, the endpoints' expected identity, ALPN for the
//! backend's HTTP version; the upstream stream, plaintext or TLS, the pool
//! speaks HTTP over) and terminating it on listeners (accepting clients
//! with the proxy's identity, reading theirs). Every handshake is counted
//! in `infermesh_tls_handshakes_total`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use infermesh_api::{ListenerProtocol, ListenerTls, TlsMode, UpstreamProtocol};
use infermesh_certs::{
    CertStore, ClientOptions, ExpectedIdentity, HandshakeFailure, ServerOptions, SpiffeId,
    client_config_with, peer_identity, server_config,
};
use prometheus::IntCounterVec;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, server};

use crate::error::ErrorKind;
use crate::metrics::Metrics;

/// How a backend's connections are secured.
#[derive(Clone, Debug)]
pub struct Client {
    config: Arc<ClientConfig>,
    handshakes: IntCounterVec,
}

impl Client {
    /// For a backend whose endpoints must present `identity`, offering the
    /// ALPN protocol of `protocol`.
    pub fn new(
        store: &Arc<CertStore>,
        identity: SpiffeId,
        protocol: UpstreamProtocol,
        metrics: &Metrics,
    ) -> Result<Self, rustls::Error> {
        let alpn = match protocol {
            UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
            UpstreamProtocol::Http2 => b"h2".to_vec(),
        };
        let config = client_config_with(
            store,
            ExpectedIdentity::Exact(identity),
            &ClientOptions {
                alpn_protocols: vec![alpn],
                ..ClientOptions::default()
            },
        )?;
        Ok(Client {
            config,
            handshakes: metrics.tls_handshakes.clone(),
        })
    }

    /// Runs the TLS handshake over `stream` to the endpoint at `addr`. The
    /// server name is the endpoint's IP address, so no SNI is sent: the
    /// endpoint is checked by its SPIFFE ID, not by a name.
    pub async fn handshake(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
    ) -> Result<UpstreamStream, ErrorKind> {
        let name = ServerName::IpAddress(addr.ip().into());
        let result = TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await;
        count(&self.handshakes, "outbound", result.as_ref().err());
        result
            .map(|tls| UpstreamStream::Tls(Box::new(tls)))
            .map_err(|e| ErrorKind::UpstreamTls(e.to_string()))
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
pub struct Server {
    acceptor: TlsAcceptor,
    modes: ListenerTls,
    handshakes: IntCounterVec,
}

impl Server {
    /// For a listener speaking `protocol`, in the modes of `modes`.
    pub fn new(
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
    pub async fn wants_tls(&self, stream: &TcpStream, port: u16) -> io::Result<bool> {
        match self.modes.mode_for(port) {
            TlsMode::Strict => return Ok(true),
            TlsMode::Disable => return Ok(false),
            TlsMode::Permissive => {}
        }
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(crate::capture::DETECT_TIMEOUT, stream.peek(&mut first));
        let Ok(read) = peeked.await else {
            return Ok(false);
        };
        let read = read?;
        // 0x16: a TLS record of type handshake.
        Ok(read == 1 && first[0] == 0x16)
    }

    /// Accepts a client over TLS, returning the stream and the client's
    /// SPIFFE ID.
    pub async fn accept(
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

/// A connection to an endpoint.
#[derive(Debug)]
pub enum UpstreamStream {
    /// Plaintext TCP.
    Plain(TcpStream),
    /// Mutual TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
