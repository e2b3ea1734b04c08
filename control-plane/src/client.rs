//! A client of the gRPC port after its TLS handshake, and what a gRPC
//! handler can learn of it: its address and the SPIFFE ID of the
//! certificate it presented, if any. The server makes these; the services
//! read them from each request's extensions.

use std::net::SocketAddr;

use infermesh_certs::{SpiffeId, peer_identity};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// A client connection after its TLS handshake, with its SPIFFE ID if it
/// presented a certificate.
pub struct ClientConnection(pub(crate) TlsStream<TcpStream>);

/// What a gRPC handler can learn of its connection.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The client's address.
    pub address: Option<SocketAddr>,
    /// The SPIFFE ID of its certificate, if it presented one.
    pub identity: Option<SpiffeId>,
}

impl Connected for ClientConnection {
    type ConnectInfo = ClientInfo;

    fn connect_info(&self) -> ClientInfo {
        let (tcp, tls) = self.0.get_ref();
        ClientInfo {
            address: tcp.peer_addr().ok(),
            identity: peer_identity(tls),
        }
    }
}

impl tokio::io::AsyncRead for ClientConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ClientConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
