//! In-memory endpoints for tests: a [`Connector`] whose connections are
//! `tokio::io::duplex` pipes to hyper servers running a test's handler, so
//! that the pool, the balancer and every layer above them run as they do
//! in production, on tokio's paused clock, with no socket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use crate::core::body::{BoxFuture, ProxyBody};
use crate::core::error::ErrorKind;
use crate::transport::connect::{BoxedIo, Connector};

/// What an in-memory endpoint does with each request.
pub(crate) type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<Response<ProxyBody>> + Send + Sync>;

/// In-memory endpoints by address; an address without one refuses the
/// connection, as a closed port does.
#[derive(Clone, Default)]
pub(crate) struct MemoryNetwork {
    endpoints: Arc<Mutex<HashMap<SocketAddr, Handler>>>,
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNetwork").finish_non_exhaustive()
    }
}

impl MemoryNetwork {
    /// Serves `handler` at `addr`.
    pub(crate) fn serve(&self, addr: SocketAddr, handler: Handler) {
        self.endpoints
            .lock()
            .expect("endpoints lock")
            .insert(addr, handler);
    }
}

impl Connector for MemoryNetwork {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ErrorKind>> {
        let handler = self
            .endpoints
            .lock()
            .expect("endpoints lock")
            .get(&addr)
            .cloned();
        Box::pin(async move {
            let Some(handler) = handler else {
                return Err(ErrorKind::ConnectFailed(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )));
            };
            let (client, server) = tokio::io::duplex(64 * 1024);
            let service = hyper::service::service_fn(move |request| {
                let response = handler(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(server), service)
                    .await;
            });
            Ok(Box::new(client) as BoxedIo)
        })
    }

    fn is_mesh_peer(&self) -> bool {
        false
    }
}
