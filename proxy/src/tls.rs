//! Originating mutual TLS to backends: the client config of a backend
//! (the proxy's SPIFFE identity, the endpoints' expected identity, ALPN
//! for the backend's HTTP version) and the upstream stream, plaintext or
//! TLS, that the pool speaks HTTP over.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use infermesh_api::UpstreamProtocol;
use infermesh_certs::{CertStore, ClientOptions, ExpectedIdentity, SpiffeId, client_config_with};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::error::ErrorKind;

/// The client config for a backend whose endpoints must present
/// `identity`, offering the ALPN protocol of `protocol`.
pub fn backend_config(
    store: &Arc<CertStore>,
    identity: SpiffeId,
    protocol: UpstreamProtocol,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let alpn = match protocol {
        UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
        UpstreamProtocol::Http2 => b"h2".to_vec(),
    };
    client_config_with(
        store,
        ExpectedIdentity::Exact(identity),
        &ClientOptions {
            alpn_protocols: vec![alpn],
            ..ClientOptions::default()
        },
    )
}

/// Runs the TLS handshake over `stream` to the endpoint at `addr`. The
/// server name is the endpoint's IP address, so no SNI is sent: the
/// endpoint is checked by its SPIFFE ID, not by a name.
pub async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> Result<UpstreamStream, ErrorKind> {
    let name = ServerName::IpAddress(addr.ip().into());
    TlsConnector::from(config.clone())
        .connect(name, stream)
        .await
        .map(|tls| UpstreamStream::Tls(Box::new(tls)))
        .map_err(|e| ErrorKind::UpstreamTls(e.to_string()))
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
