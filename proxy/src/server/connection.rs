//! One accepted client connection, in phases: where it was going (capture
//! listeners), whether it speaks HTTP (outbound capture), TLS (peer
//! authentication by the port it connected to), whether it speaks HTTP
//! (plaintext on inbound capture), then HTTP, every request of it going
//! through [`RequestService`]. A connection that is not HTTP is passed
//! through as TCP, or closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use infermesh_api::{Capture, ListenerProtocol, OutsideMesh};
use tokio::net::TcpStream;

use crate::core::context::{ConnectionInfo, ListenerId};
use crate::server::original::OriginalDestination;
use crate::server::request::RequestService;
use crate::server::shared::Shared;
use crate::snapshot::ListenerEntry;
use crate::transport::detect::{DETECT_TIMEOUT, MESH_DETECT_TIMEOUT, speaks_http};
use crate::transport::original_dst::original_destination;
use crate::transport::tunnel::tunnel;

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting to a destination outside the mesh may take, for a
/// TCP passthrough (Envoy's default connect timeout).
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts serving an accepted connection on its own task.
pub(crate) fn spawn(
    stream: TcpStream,
    client: SocketAddr,
    id: ListenerId,
    shared: &Arc<Shared>,
    builders: &Arc<ServerBuilders>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let Some(listener) = shared.snapshot.load().listener_entry(id) else {
        return;
    };
    let gauge = shared
        .metrics
        .downstream_connections
        .with_label_values(&[&*listener.name]);
    gauge.inc();
    let connection = Connection {
        client,
        listener,
        shared: shared.clone(),
        builders: builders.clone(),
        watcher: graceful.watcher(),
    };
    tokio::spawn(async move {
        connection.run(stream).await;
        gauge.dec();
    });
}

/// One accepted client connection, before its protocol is known.
struct Connection {
    client: SocketAddr,
    listener: Arc<ListenerEntry>,
    shared: Arc<Shared>,
    builders: Arc<ServerBuilders>,
    watcher: Watcher,
}

impl Connection {
    /// Phases of a connection: where it was going (capture listeners),
    /// whether it is HTTP (outbound capture), TLS, whether it is HTTP
    /// (plaintext on inbound capture), then HTTP.
    async fn run(self, stream: TcpStream) {
        let (client, name) = (self.client, self.listener.name.clone());
        let original = self
            .listener
            .capture
            .and_then(|_| original_destination(&stream));
        let Some(destination) = original else {
            if self.listener.capture == Some(Capture::Inbound) {
                tracing::warn!(client = %client, listener = %name, "connection made straight to an inbound capture listener, not redirected to it by iptables: closing it (it has no original destination to forward to)");
                return;
            }
            return self.accept_tls(stream, None).await;
        };
        if self.listener.capture == Some(Capture::Outbound) {
            // Only HTTP can be routed: other protocols (TLS, databases)
            // are outside the mesh. Clients of a backend's address may
            // open connections well before their first request.
            let mesh = self
                .shared
                .snapshot
                .load()
                .by_address(destination)
                .is_some();
            let wait = if mesh {
                MESH_DETECT_TIMEOUT
            } else {
                DETECT_TIMEOUT
            };
            if !speaks_http(&stream, wait).await.unwrap_or(false) {
                return self.outside_mesh(stream, destination).await;
            }
        }
        self.accept_tls(stream, Some(destination)).await
    }

    /// Peer authentication, by the port the client connected to, then HTTP
    /// over TLS or plaintext.
    async fn accept_tls(self, stream: TcpStream, original: Option<SocketAddr>) {
        let (client, name) = (self.client, self.listener.name.clone());
        let port = match original {
            Some(destination) => destination.port(),
            None => stream.local_addr().map_or(0, |a| a.port()),
        };
        let Some(tls) = self.listener.tls.clone() else {
            return self.plaintext(stream, original).await;
        };
        // Telling plaintext from TLS waits for the client's first byte:
        // both that and the handshake are bounded.
        let accepted = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, async {
            if tls.wants_tls(&stream, port).await? {
                tls.accept(stream).await.map(|(tls, peer)| Ok((tls, peer)))
            } else {
                Ok(Err(stream))
            }
        })
        .await;
        match accepted {
            Ok(Ok(Ok((stream, peer)))) => {
                let peer = peer.map(|p| Arc::from(p.to_string()));
                self.serve(stream, Some(peer), original).await
            }
            Ok(Ok(Err(plaintext))) => self.plaintext(plaintext, original).await,
            Ok(Err(e)) => {
                tracing::info!(client = %client, listener = %name, error = %e, "client TLS handshake failed")
            }
            Err(_) => {
                tracing::info!(client = %client, listener = %name, "client TLS handshake timed out")
            }
        }
    }

    /// A plaintext connection. On an inbound capture listener it may be
    /// another protocol than HTTP, for another port of the app (a
    /// database, a collective-communication library): passed through as
    /// TCP to the original destination, unless authorization policies
    /// guard the listener (they can judge only HTTP requests).
    async fn plaintext(self, stream: TcpStream, original: Option<SocketAddr>) {
        let inbound = self.listener.capture == Some(Capture::Inbound);
        if let (true, Some(destination)) = (inbound, original)
            && !speaks_http(&stream, DETECT_TIMEOUT).await.unwrap_or(false)
        {
            let listener = &*self.listener.name;
            if self.listener.authorization.is_some() {
                tracing::info!(client = %self.client, listener, destination = %destination, "connection refused: it does not speak HTTP, and the authorization policies of this listener can judge only HTTP requests");
                return;
            }
            let Connection {
                client, watcher, ..
            } = self;
            drop(watcher);
            return log_tunnel(client, listener, destination, stream).await;
        }
        self.serve(stream, None, original).await
    }

    /// A connection that is not HTTP, to a destination outside the mesh:
    /// passed through as a TCP stream, or closed.
    async fn outside_mesh(self, stream: TcpStream, destination: SocketAddr) {
        let Connection {
            client,
            listener,
            shared,
            watcher,
            ..
        } = self;
        // A tunnel is not an HTTP connection: a drain does not wait for it.
        drop(watcher);
        let action = match listener.outside_mesh {
            OutsideMesh::Passthrough => "passthrough",
            OutsideMesh::Blocked => "blocked",
        };
        let name = &*listener.name;
        shared
            .metrics
            .outside_mesh
            .with_label_values(&[name, "tcp", action])
            .inc();
        if listener.outside_mesh == OutsideMesh::Blocked {
            tracing::info!(client = %client, listener = name, destination = %destination, "connection to a destination outside the mesh blocked (outsideMesh: blocked)");
            return;
        }
        log_tunnel(client, name, destination, stream).await
    }

    /// Serves HTTP on `io`; `tls` holds the client's SPIFFE ID (if it
    /// presented one) when the connection is TLS.
    async fn serve<I>(
        self,
        io: I,
        tls: Option<Option<Arc<str>>>,
        original_destination: Option<SocketAddr>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // Requests nothing else routes go to the original destination: the
        // app (inbound), or a server outside the mesh (outbound, unless
        // the listener blocks those when the request comes).
        let original_service = original_destination.map(|destination| {
            let name = match self.listener.capture {
                Some(Capture::Inbound) => "inbound",
                _ => "passthrough",
            };
            Arc::new(OriginalDestination::new(
                destination,
                name,
                self.shared.clone(),
            ))
        });
        let info = Arc::new(ConnectionInfo {
            client: self.client,
            listener: self.listener.id,
            scheme: if tls.is_some() { "https" } else { "http" },
            peer_identity: tls.flatten(),
            original_destination,
            capture: self.listener.capture,
        });
        let service = RequestService::new(self.shared, info, original_service);
        let connection = self
            .builders
            .for_protocol(self.listener.protocol)
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        if let Err(e) = self.watcher.watch(connection).await {
            tracing::debug!(client = %self.client, error = %e, "client connection ended with an error");
        }
    }
}

/// Passes `stream` through to `destination` as TCP, logging how it ended.
async fn log_tunnel(
    client: SocketAddr,
    listener: &str,
    destination: SocketAddr,
    stream: TcpStream,
) {
    match tunnel(stream, destination, PASSTHROUGH_CONNECT_TIMEOUT).await {
        Ok((sent, received)) => {
            tracing::debug!(client = %client, listener, destination = %destination, sent, received, "passthrough connection closed")
        }
        Err(e) => {
            tracing::info!(client = %client, listener, destination = %destination, error = %e, "passthrough connection failed")
        }
    }
}

/// hyper server settings for each listener protocol.
pub(crate) struct ServerBuilders {
    http: auto::Builder<TokioExecutor>,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl ServerBuilders {
    /// The settings of every protocol.
    pub(crate) fn new() -> Self {
        let base = || {
            let mut b = auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            b.http2().timer(TokioTimer::new()).adaptive_window(true);
            b
        };
        let mut http1 = base();
        http1 = http1.http1_only();
        let mut http2 = base();
        http2 = http2.http2_only();
        ServerBuilders {
            http: base(),
            http1,
            http2,
        }
    }

    fn for_protocol(&self, protocol: ListenerProtocol) -> &auto::Builder<TokioExecutor> {
        match protocol {
            ListenerProtocol::Http => &self.http,
            ListenerProtocol::Http1 => &self.http1,
            ListenerProtocol::Http2 => &self.http2,
        }
    }
}
