//! Opening the byte stream to an endpoint: the seam under the connection
//! pool. The pool asks its backend's [`Connector`] for every new
//! connection and speaks HTTP over whatever stream it gets; in production
//! that is TCP (with `TCP_NODELAY`, since model answers stream token by
//! token) and, when the backend asks for mutual TLS, the handshake on top.
//! A test can put in-memory endpoints under the whole stack instead.

use std::fmt;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::core::body::BoxFuture;
use crate::core::error::ErrorKind;
use crate::transport::tls;

/// A byte stream HTTP can be spoken over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection to an endpoint, whatever carries it.
pub(crate) type BoxedIo = Box<dyn Io>;

/// Opens connections to the endpoints of one backend.
pub(crate) trait Connector: Send + Sync + fmt::Debug + 'static {
    /// Connects to the endpoint at `addr`. The caller bounds the time it
    /// takes (the backend's connect timeout).
    fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ErrorKind>>;

    /// Whether the endpoints are mesh peers (sidecars reached over mutual
    /// TLS) rather than model servers: requests to them carry the version
    /// the calling app spoke.
    fn is_mesh_peer(&self) -> bool;
}

/// TCP, then mutual TLS when the backend asks for it.
#[derive(Clone, Debug)]
pub(crate) struct TcpConnector {
    tls: Option<tls::Client>,
}

impl TcpConnector {
    /// Plaintext TCP.
    pub(crate) fn plain() -> Self {
        TcpConnector { tls: None }
    }

    /// TCP, then mutual TLS with `tls` when given.
    pub(crate) fn new(tls: Option<tls::Client>) -> Self {
        TcpConnector { tls }
    }
}

impl Connector for TcpConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ErrorKind>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(ErrorKind::ConnectFailed)?;
            // Model responses stream token by token: send each write at once.
            let _ = stream.set_nodelay(true);
            Ok(match tls {
                Some(client) => Box::new(client.handshake(stream, addr).await?) as BoxedIo,
                None => Box::new(stream) as BoxedIo,
            })
        })
    }

    fn is_mesh_peer(&self) -> bool {
        self.tls.is_some()
    }
}
