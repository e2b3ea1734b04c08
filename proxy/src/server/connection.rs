//! One accepted client connection, in phases: where it was going (capture
//! listeners), whether it speaks HTTP (outbound capture), TLS (peer
//! authentication by the port it connected to), whether it speaks HTTP
//! (plaintext on inbound capture), then HTTP, every request of it going
//! through [`RequestService`]. A connection that is not HTTP is passed
//! through as TCP, or closed. While HTTP is served, the connection's
//! [`Watchdog`] says when it must end ([`crate::server::lifetime`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use infermesh_api::{Capture, OutsideMesh};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::core::context::{ConnectionInfo, ListenerId};
use crate::core::woken::PollWhenWoken;
use crate::server::access_entry::AddressText;
use crate::server::lifetime::{ClientIo, Lifetime, Watchdog};
use crate::server::original::OriginalDestination;
use crate::server::protocol::{ClientStream, HttpSettings};
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

/// What an accept loop keeps for the connections it accepts: how many are
/// open, the hyper settings of its listener as configured now, and the
/// drain signal.
pub(crate) struct Accepted {
    open: Arc<AtomicUsize>,
    settings: Option<(Weak<ListenerEntry>, Arc<HttpSettings>)>,
    drain: watch::Receiver<()>,
}

impl Accepted {
    /// Nothing accepted yet; connections start to close gracefully when
    /// `drain` changes.
    pub(crate) fn new(drain: watch::Receiver<()>) -> Self {
        Accepted {
            open: Arc::new(AtomicUsize::new(0)),
            settings: None,
            drain,
        }
    }

    /// The hyper settings of `listener`, built again only when a reload
    /// changed the listener.
    fn settings(&mut self, listener: &Arc<ListenerEntry>) -> Arc<HttpSettings> {
        if let Some((entry, settings)) = &self.settings
            && Weak::as_ptr(entry) == Arc::as_ptr(listener)
        {
            return settings.clone();
        }
        let settings = Arc::new(HttpSettings::new(listener));
        self.settings = Some((Arc::downgrade(listener), settings.clone()));
        settings
    }
}

/// Starts serving an accepted connection on its own task, on the worker
/// runtime `on` (this one when `None`), or closes it when its listener is
/// at `maxConnections`.
pub(crate) fn spawn(
    stream: TcpStream,
    client: SocketAddr,
    id: ListenerId,
    shared: &Arc<Shared>,
    accepted: &mut Accepted,
    on: Option<&Handle>,
) {
    let _ = stream.set_nodelay(true);
    let Some(listener) = shared.snapshot.load().listener_entry(id) else {
        return;
    };
    let open = accepted.open.clone();
    if let Some(max) = listener.limits.max_connections
        && open.load(Ordering::Relaxed) >= max as usize
    {
        shared
            .metrics
            .connections_refused
            .with_label_values(&[&*listener.name, "max_connections"])
            .inc();
        tracing::debug!(client = %client, listener = %listener.name, max, "connection refused: the listener is at its maxConnections");
        return;
    }
    open.fetch_add(1, Ordering::Relaxed);
    let gauge = shared
        .metrics
        .downstream_connections
        .with_label_values(&[&*listener.name]);
    gauge.inc();
    let connection = Connection {
        client,
        settings: accepted.settings(&listener),
        listener,
        shared: shared.clone(),
        drain: accepted.drain.clone(),
        counted: Counted { gauge, open },
    };
    let Some(worker) = on else {
        tokio::spawn(connection.run(Socket::Registered(stream)));
        return;
    };
    // The socket moves to the worker's reactor: taken out of this one,
    // registered with the worker's as the task starts there.
    match stream.into_std() {
        Ok(stream) => {
            worker.spawn(connection.run(Socket::Unregistered(stream)));
        }
        Err(e) => {
            tracing::warn!(client = %client, error = %e, "a connection could not be handed to a worker")
        }
    }
}

/// An accepted socket, and whether the reactor of the runtime serving it
/// has it yet.
enum Socket {
    /// Accepted by the runtime that serves it.
    Registered(TcpStream),
    /// Handed from the accepting runtime to a worker's: registered with
    /// the worker's reactor as its task starts there.
    Unregistered(std::net::TcpStream),
}

/// Keeps a connection counted (the listener's open connections, for its
/// `maxConnections`, and the gauge) until dropped: when the connection
/// ends, or if it never started.
struct Counted {
    gauge: prometheus::IntGauge,
    open: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One accepted client connection, before its protocol is known.
struct Connection {
    client: SocketAddr,
    listener: Arc<ListenerEntry>,
    shared: Arc<Shared>,
    settings: Arc<HttpSettings>,
    /// Changes when the listener drains; dropped when the connection ends
    /// (the drain waits for every receiver to go).
    drain: watch::Receiver<()>,
    /// Keeps the connection counted until it ends.
    counted: Counted,
}

/// What a connection turned out to be once its first phases (capture,
/// detection) are done, and so what is left to do with its stream.
#[derive(Clone, Copy)]
enum Next {
    /// Plaintext HTTP; the original destination of a captured connection.
    Http(Option<SocketAddr>),
    /// A listener that takes TLS: the handshake, if the client starts one,
    /// then HTTP. The port the client connected to picks the TLS mode.
    Tls(u16, Option<SocketAddr>),
    /// Not HTTP: passed through as TCP to the destination.
    Tunnel(SocketAddr),
    /// Closed (refused or blocked).
    Closed,
}

impl Connection {
    /// The connection's task: its first phases, then HTTP (or a tunnel)
    /// until it ends.
    ///
    /// Written for the size of the task, which an open connection keeps
    /// for its whole life: an async function keeps a second copy of its
    /// arguments beside its state (hence async blocks, here and in
    /// `serve`); the phases resolve to what is left to do ([`Next`])
    /// rather than each calling the next, which kept a copy of the
    /// connection and the socket per level; and what they await is boxed
    /// for the moment it takes, instead of sized into every task.
    // Not an async fn: see above.
    #[allow(clippy::manual_async_fn)]
    fn run(self, socket: Socket) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let stream = match socket {
                Socket::Registered(stream) => stream,
                Socket::Unregistered(stream) => match TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(client = %self.client, error = %e, "a worker could not take a connection");
                        return;
                    }
                },
            };
            let (stream, next) = Box::pin(self.phases(stream)).await;
            let original = match next {
                Next::Http(original) => original,
                // Boxed: a TLS connection's state (the handshake, then
                // rustls's session and buffers) is kilobytes larger than a
                // plaintext one's, and held inline it would make every
                // connection's task that large, plaintext ones included.
                Next::Tls(port, original) => {
                    return Box::pin(self.serve_tls(stream, port, original)).await;
                }
                // Boxed too: rare, and a tunnel's state held inline would
                // make every HTTP connection's task larger.
                Next::Tunnel(destination) => {
                    return Box::pin(self.tunnel(stream, destination)).await;
                }
                Next::Closed => return,
            };
            self.serve(stream, None, original).await
        }
    }

    /// Phases of a connection: where it was going (capture listeners),
    /// whether it is HTTP (outbound capture), whether it takes TLS,
    /// whether it is HTTP (plaintext on inbound capture).
    async fn phases(&self, stream: TcpStream) -> (TcpStream, Next) {
        let original = self
            .listener
            .capture
            .and_then(|_| original_destination(&stream));
        let Some(destination) = original else {
            if self.listener.capture == Some(Capture::Inbound) {
                tracing::warn!(client = %self.client, listener = %self.listener.name, "connection made straight to an inbound capture listener, not redirected to it by iptables: closing it (it has no original destination to forward to)");
                return (stream, Next::Closed);
            }
            return self.tls_or_plaintext(stream, None).await;
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
                return self.outside_mesh(stream, destination);
            }
        }
        self.tls_or_plaintext(stream, Some(destination)).await
    }

    /// Peer authentication, by the port the client connected to: TLS when
    /// the listener takes it, plaintext otherwise.
    async fn tls_or_plaintext(
        &self,
        stream: TcpStream,
        original: Option<SocketAddr>,
    ) -> (TcpStream, Next) {
        if self.listener.tls.is_none() {
            return self.plaintext(stream, original).await;
        }
        let port = match original {
            Some(destination) => destination.port(),
            None => stream.local_addr().map_or(0, |a| a.port()),
        };
        (stream, Next::Tls(port, original))
    }

    /// A connection to a listener that takes TLS: the handshake when the
    /// client starts one, then HTTP over TLS; plaintext HTTP otherwise
    /// (which the listener's TLS mode may allow).
    async fn serve_tls(self, stream: TcpStream, port: u16, original: Option<SocketAddr>) {
        match self.handshake(stream, port).await {
            Some(Ok((stream, peer))) => self.serve(stream, Some(peer), original).await,
            Some(Err(plaintext)) => match self.plaintext(plaintext, original).await {
                (stream, Next::Http(original)) => self.serve(stream, None, original).await,
                (stream, Next::Tunnel(destination)) => self.tunnel(stream, destination).await,
                (_, Next::Tls(..) | Next::Closed) => {}
            },
            None => {}
        }
    }

    /// The TLS handshake when the client starts one, with the client's
    /// SPIFFE ID if it presented one; the stream back, for plaintext,
    /// when it does not (or the listener takes no TLS); `None` when the
    /// handshake failed.
    async fn handshake(
        &self,
        stream: TcpStream,
        port: u16,
    ) -> Option<Result<(TlsStream<TcpStream>, Option<Arc<str>>), TcpStream>> {
        let Some(tls) = &self.listener.tls else {
            return Some(Err(stream));
        };
        let (client, name) = (self.client, &*self.listener.name);
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
                Some(Ok((stream, peer.map(|p| Arc::from(p.to_string())))))
            }
            Ok(Ok(Err(plaintext))) => Some(Err(plaintext)),
            Ok(Err(e)) => {
                tracing::info!(client = %client, listener = name, error = %e, "client TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::info!(client = %client, listener = name, "client TLS handshake timed out");
                None
            }
        }
    }

    /// Passes a connection that is not HTTP through to `destination` as
    /// TCP, keeping it counted until it ends.
    async fn tunnel(self, stream: TcpStream, destination: SocketAddr) {
        let Connection {
            client,
            listener,
            drain,
            counted,
            ..
        } = self;
        // A tunnel is not an HTTP connection: a drain does not wait for it.
        drop(drain);
        log_tunnel(client, &listener.name, destination, stream).await;
        drop(counted);
    }

    /// A plaintext connection. On an inbound capture listener it may be
    /// another protocol than HTTP, for another port of the app (a
    /// database, a collective-communication library): passed through as
    /// TCP to the original destination, unless authorization policies
    /// guard the listener (they can judge only HTTP requests).
    async fn plaintext(
        &self,
        stream: TcpStream,
        original: Option<SocketAddr>,
    ) -> (TcpStream, Next) {
        let inbound = self.listener.capture == Some(Capture::Inbound);
        if let (true, Some(destination)) = (inbound, original)
            && !speaks_http(&stream, DETECT_TIMEOUT).await.unwrap_or(false)
        {
            if self.listener.authorization.is_some() {
                tracing::info!(client = %self.client, listener = %self.listener.name, destination = %destination, "connection refused: it does not speak HTTP, and the authorization policies of this listener can judge only HTTP requests");
                return (stream, Next::Closed);
            }
            return (stream, Next::Tunnel(destination));
        }
        (stream, Next::Http(original))
    }

    /// A connection that is not HTTP, to a destination outside the mesh:
    /// passed through as a TCP stream, or closed.
    fn outside_mesh(&self, stream: TcpStream, destination: SocketAddr) -> (TcpStream, Next) {
        let listener = &self.listener;
        let action = match listener.outside_mesh {
            OutsideMesh::Passthrough => "passthrough",
            OutsideMesh::Blocked => "blocked",
        };
        let name = &*listener.name;
        self.shared
            .metrics
            .outside_mesh
            .with_label_values(&[name, "tcp", action])
            .inc();
        if listener.outside_mesh == OutsideMesh::Blocked {
            tracing::info!(client = %self.client, listener = name, destination = %destination, "connection to a destination outside the mesh blocked (outsideMesh: blocked)");
            return (stream, Next::Closed);
        }
        (stream, Next::Tunnel(destination))
    }

    /// Serves HTTP on `io`; `tls` holds the client's SPIFFE ID (if it
    /// presented one) when the connection is TLS.
    // Not an async fn: see `run`.
    #[allow(clippy::manual_async_fn)]
    fn serve<I>(
        self,
        io: I,
        tls: Option<Option<Arc<str>>>,
        original_destination: Option<SocketAddr>,
    ) -> impl Future<Output = ()> + Send + use<I>
    where
        I: ClientStream,
    {
        async move {
            // An async block takes only the fields it uses: named here,
            // the count goes with the block and ends with the connection.
            let _counted = &self.counted;
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
                client_ip: http::HeaderValue::try_from(self.client.ip().to_string())
                    .expect("an IP address is a valid header value"),
                client_address: AddressText::new(self.client).as_str().into(),
                listener: self.listener.id,
                scheme: if tls.is_some() { "https" } else { "http" },
                peer_identity: tls.flatten(),
                original_destination,
                capture: self.listener.capture,
            });
            let lifetime = Lifetime::new(&self.listener.limits);
            let io = ClientIo::new(io, &lifetime);
            let service = RequestService::new(
                self.shared.clone(),
                info,
                original_service,
                lifetime.clone(),
            );
            let mut connection = pin!(self.settings.serve(io, service));
            let mut watchdog = Watchdog::new(lifetime);
            let mut drain = self.drain;
            let mut draining = false;
            // Counted once, by the first reason the proxy found to end it.
            let mut counted = false;
            let mut closed = |ending: &str| {
                if !std::mem::replace(&mut counted, true) {
                    self.shared
                        .metrics
                        .connections_closed
                        .with_label_values(&[&*self.listener.name, ending])
                        .inc();
                }
            };
            loop {
                tokio::select! {
                    ended = connection.as_mut() => {
                        if let Err(e) = ended {
                            tracing::debug!(client = %self.client, error = %e, "client connection ended with an error");
                        }
                        return;
                    }
                    _ = PollWhenWoken::new(drain.changed()), if !draining => {
                        draining = true;
                        watchdog.closing();
                        connection.as_mut().graceful_shutdown();
                    }
                    ending = PollWhenWoken::new(watchdog.next()) => {
                        closed(ending.as_str());
                        if !ending.is_graceful() {
                            tracing::info!(client = %self.client, listener = %self.listener.name, reason = ending.as_str(), "client connection closed");
                            return;
                        }
                        tracing::debug!(client = %self.client, listener = %self.listener.name, reason = ending.as_str(), "closing client connection gracefully");
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
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
