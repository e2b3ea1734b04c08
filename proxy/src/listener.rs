//! Listeners: binding sockets, accepting connections and serving HTTP on
//! them, and keeping the set of bound sockets in line with the config
//! across reloads. A listener whose address did not change keeps its
//! socket, so a reload never refuses a connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use infermesh_api::{Capture, Config, ListenerProtocol, OutsideMesh};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::capture::{self, OriginalDestination};
use crate::proxy::{ProxyService, Shared};
use crate::snapshot::{ListenerEntry, ListenerId};

/// What a request knows about the connection it came on.
#[derive(Debug)]
pub struct ConnectionInfo {
    /// The client's address.
    pub client: SocketAddr,
    /// The listener socket that accepted it.
    pub listener: ListenerId,
    /// The scheme the client used (`http`, or `https` over TLS).
    pub scheme: &'static str,
    /// The SPIFFE ID the client presented over mutual TLS.
    pub peer_identity: Option<Arc<str>>,
    /// Where the client was connecting to before iptables redirected it
    /// to a capture listener.
    pub original_destination: Option<SocketAddr>,
    /// The pod traffic the listener captures, for a sidecar's.
    pub capture: Option<Capture>,
}

/// A listener socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {address} for listener {name:?}: {source}{}",
    hint(holder)
)]
pub struct BindError {
    name: String,
    address: SocketAddr,
    /// A running listener of ours on the same port, if any.
    holder: Option<String>,
    #[source]
    source: std::io::Error,
}

fn hint(holder: &Option<String>) -> String {
    match holder {
        Some(h) => format!(
            " (listener {h:?} still holds this port: give the listener another port, or restart to move it between a wildcard and a specific address)"
        ),
        None => String::new(),
    }
}

struct Running {
    id: ListenerId,
    name: String,
    configured: SocketAddr,
    local: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The changes a config makes to the bound listeners, prepared (sockets
/// already bound) but not yet applied.
pub struct ListenerPlan {
    /// The socket each listener name will use.
    pub ids: HashMap<String, ListenerId>,
    /// Listeners that the config drops, or dropped earlier, whose
    /// connections are still finishing: the new snapshot keeps serving
    /// them as before until they close.
    pub draining: Vec<ListenerId>,
    bind: Vec<(ListenerId, String, SocketAddr, TcpListener)>,
    renamed: Vec<(ListenerId, String)>,
    remove: Vec<ListenerId>,
}

/// The bound listeners and their accept loops.
pub struct Listeners {
    running: Vec<Running>,
    /// Listeners no longer configured whose connections are finishing.
    draining: Vec<Running>,
    next_id: ListenerId,
}

impl Default for Listeners {
    fn default() -> Self {
        Self::new()
    }
}

impl Listeners {
    /// No listeners yet.
    pub fn new() -> Self {
        Listeners {
            running: Vec::new(),
            draining: Vec::new(),
            next_id: 1,
        }
    }

    /// Works out which sockets `config` needs, binding the new ones. On a
    /// bind failure nothing changes (the new sockets are closed again).
    pub async fn prepare(&mut self, config: &Config) -> Result<ListenerPlan, BindError> {
        let mut claimed: Vec<ListenerId> = Vec::new();
        self.draining.retain(|r| !r.task.is_finished());
        let mut plan = ListenerPlan {
            ids: HashMap::new(),
            draining: Vec::new(),
            bind: Vec::new(),
            renamed: Vec::new(),
            remove: Vec::new(),
        };
        for listener in &config.listeners {
            let address = listener.spec.address;
            let same_name = self.running.iter().find(|r| {
                r.name == listener.name && r.configured == address && !claimed.contains(&r.id)
            });
            let same_address = || {
                self.running.iter().find(|r| {
                    address.port() != 0 && r.configured == address && !claimed.contains(&r.id)
                })
            };
            if let Some(running) = same_name.or_else(same_address) {
                claimed.push(running.id);
                plan.ids.insert(listener.name.clone(), running.id);
                if running.name != listener.name {
                    plan.renamed.push((running.id, listener.name.clone()));
                }
                continue;
            }
            let socket = TcpListener::bind(address).await.map_err(|source| {
                // Say which listener of ours holds the port, if one does.
                let holder = self
                    .running
                    .iter()
                    .find(|r| r.local.port() == address.port() && !claimed.contains(&r.id))
                    .map(|r| r.name.clone());
                BindError {
                    name: listener.name.clone(),
                    address,
                    holder,
                    source,
                }
            })?;
            let id = self.next_id;
            self.next_id += 1;
            plan.ids.insert(listener.name.clone(), id);
            plan.bind.push((id, listener.name.clone(), address, socket));
        }
        plan.remove = self
            .running
            .iter()
            .map(|r| r.id)
            .filter(|id| !claimed.contains(id))
            .collect();
        plan.draining = plan
            .remove
            .iter()
            .copied()
            .chain(self.draining.iter().map(|r| r.id))
            .collect();
        Ok(plan)
    }

    /// Applies `plan` once the snapshot that uses it is serving: starts
    /// accepting on new sockets and drains the ones no longer configured.
    pub fn commit(&mut self, plan: ListenerPlan, shared: &Arc<Shared>) {
        for (id, name) in plan.renamed {
            if let Some(r) = self.running.iter_mut().find(|r| r.id == id) {
                r.name = name;
            }
        }
        for (id, name, configured, socket) in plan.bind {
            let local = socket.local_addr().unwrap_or(configured);
            tracing::info!(listener = %name, address = %local, "listening");
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(accept_loop(id, socket, shared.clone(), stopped));
            self.running.push(Running {
                id,
                name,
                configured,
                local,
                stop,
                task,
            });
        }
        for id in plan.remove {
            if let Some(pos) = self.running.iter().position(|r| r.id == id) {
                let removed = self.running.remove(pos);
                tracing::info!(listener = %removed.name, address = %removed.local, "listener removed; draining its connections");
                let _ = removed.stop.send(true);
                self.draining.push(removed);
            }
        }
    }

    /// Stops accepting on every listener and lets open connections finish
    /// (HTTP/2 clients get GOAWAY, idle keep-alive connections close).
    /// Resolves when every connection has closed.
    pub async fn drain(&mut self) {
        for r in &self.running {
            let _ = r.stop.send(true);
        }
        self.draining.append(&mut self.running);
        for r in &mut self.draining {
            let _ = (&mut r.task).await;
        }
        self.draining.clear();
    }
}

async fn accept_loop(
    id: ListenerId,
    socket: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let builders = Arc::new(ServerBuilders::new());
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = socket.accept() => match accepted {
                Ok((stream, client)) => spawn_connection(stream, client, id, &shared, &builders, &graceful),
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(socket);
    graceful.shutdown().await;
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting to a destination outside the mesh may take, for a
/// TCP passthrough (Envoy's default connect timeout).
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts serving an accepted connection on its own task.
fn spawn_connection(
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
            .and_then(|_| capture::original_destination(&stream));
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
                capture::MESH_DETECT_TIMEOUT
            } else {
                capture::DETECT_TIMEOUT
            };
            if !capture::speaks_http(&stream, wait).await.unwrap_or(false) {
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
            && !capture::speaks_http(&stream, capture::DETECT_TIMEOUT)
                .await
                .unwrap_or(false)
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
                self.shared.metrics.clone(),
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
        let service = ProxyService::new(self.shared, info, original_service);
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
    match capture::tunnel(stream, destination, PASSTHROUGH_CONNECT_TIMEOUT).await {
        Ok((sent, received)) => {
            tracing::debug!(client = %client, listener, destination = %destination, sent, received, "passthrough connection closed")
        }
        Err(e) => {
            tracing::info!(client = %client, listener, destination = %destination, error = %e, "passthrough connection failed")
        }
    }
}

/// hyper server settings for each listener protocol.
struct ServerBuilders {
    http: auto::Builder<TokioExecutor>,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl ServerBuilders {
    fn new() -> Self {
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
