//! Upstream connections to one endpoint: connect within the backend's
//! connect timeout, then speak HTTP/1.1 (one exchange per connection at a
//! time; idle connections kept for reuse, newest first, by each worker for
//! its own requests) or HTTP/2 (one shared, multiplexed connection). Requests are adapted to the upstream's
//! HTTP version here, whatever version the client spoke.
//!
//! A request that a reused connection refused before sending a byte (the
//! server closed it while idle) is sent again on another connection; this is
//! safe for any method, as nothing reached the server. A request that fails
//! before any connection had it (no connection slot, a failed connect or
//! handshake) is given back with the failure, as it came, so that a retry
//! above can send it elsewhere without having kept a copy of its own.
//!
//! Every open connection holds a permit of the backend's `maxConnections`.
//! An HTTP/1.1 request that needs a new connection when none is left waits
//! as a pending request (bounded by `maxPendingRequests`); meanwhile one
//! idle connection of the backend is closed, and connections that finish
//! an exchange are closed rather than kept idle, so their permits pass to
//! the waiters. An HTTP/2 endpoint without its connection is refused at
//! once when none is left, since HTTP/2 connections are not given up
//! while they work.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use infermesh_api::UpstreamProtocol;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::backend::breaker::Breaker;
use crate::core::body::ProxyBody;
use crate::core::error::ErrorKind;
use crate::core::headers::note_original_protocol;
use crate::core::worker;
use crate::transport::connect::{BoxedIo, Connector};

/// How a backend's connections are made and kept.
pub(crate) struct PoolSettings {
    /// The HTTP version spoken upstream.
    pub protocol: UpstreamProtocol,
    /// Limit on each TCP connect.
    pub connect_timeout: Duration,
    /// Idle HTTP/1.1 connections older than this are closed.
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per endpoint, by each worker.
    pub max_idle: usize,
    /// `infermesh_upstream_connections{backend}`.
    pub open_gauge: IntGauge,
    /// The backend's connect counters and timings.
    pub connects: ConnectMetrics,
    /// The backend's limits, whose connection permits every open
    /// connection holds.
    pub breaker: Arc<Breaker>,
    /// Closes the longest-idle connection of one of the backend's
    /// endpoints, if one is idle: what frees a connection permit when the
    /// connection limit is reached. A narrow handle on the backend's
    /// endpoints, which the pool otherwise knows nothing of.
    pub reclaim_idle: Box<dyn Fn() -> bool + Send + Sync>,
    /// Opens the connections: TCP, and mutual TLS when the backend asks
    /// for it.
    pub connector: Arc<dyn Connector>,
}

/// One backend's series of `infermesh_upstream_connects_total` and
/// `infermesh_upstream_connect_duration_seconds`.
pub(crate) struct ConnectMetrics {
    /// The backend's name, the failures' first label.
    pub name: Arc<str>,
    /// Every backend's connects, by result (failures are labelled by
    /// reason when they happen).
    pub results: IntCounterVec,
    /// This backend's successful connects.
    pub succeeded: IntCounter,
    /// This backend's connect times.
    pub duration: Histogram,
}

impl std::fmt::Debug for PoolSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSettings")
            .field("protocol", &self.protocol)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_idle", &self.max_idle)
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl PoolSettings {
    /// A permit for one more connection: at once when the backend is
    /// below its limit; otherwise after closing one idle connection, as one
    /// of the bounded pending requests.
    async fn connection_permit(&self) -> Result<OwnedSemaphorePermit, ErrorKind> {
        if let Some(permit) = self.breaker.try_connection() {
            return Ok(permit);
        }
        (self.reclaim_idle)();
        self.breaker.wait_for_connection().await
    }
}

/// How often an idle HTTP/2 upstream connection is checked with a PING, and
/// how long the answer may take before the connection is given up: a
/// backend whose host vanished without a reset is found within half a
/// minute.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// One endpoint's connections.
#[derive(Debug)]
pub struct Connections {
    /// Idle HTTP/1.1 connections, a list per worker
    /// ([`crate::core::worker`]): a connection's task runs on the worker
    /// that opened it, and a request sent on it from another worker would
    /// cross threads twice (the request over, the response back). Each
    /// worker keeps its own, as Envoy and Pingora keep a pool per worker.
    idle: Box<[Mutex<Vec<IdleConnection>>]>,
    shared: ArcSwapOption<http2::SendRequest<ProxyBody>>,
    connecting: tokio::sync::Mutex<()>,
    /// Failed HTTP/2 connects so far, and the last one's cause: requests
    /// that waited for a connect that failed fail with it at once rather
    /// than each trying again in turn.
    connect_failures: std::sync::atomic::AtomicU64,
    last_connect_failure: Mutex<Option<ConnectFailure>>,
    open: Arc<AtomicI64>,
}

/// A failed connect, kept to answer the requests that waited on it.
#[derive(Clone, Debug)]
enum ConnectFailure {
    Timeout(Duration),
    Refused(std::io::ErrorKind, String),
}

impl ConnectFailure {
    fn of(error: &ErrorKind) -> Option<Self> {
        match error {
            ErrorKind::ConnectTimeout(after) => Some(ConnectFailure::Timeout(*after)),
            ErrorKind::ConnectFailed(e) => Some(ConnectFailure::Refused(e.kind(), e.to_string())),
            _ => None,
        }
    }

    fn to_error(&self) -> ErrorKind {
        match self {
            ConnectFailure::Timeout(after) => ErrorKind::ConnectTimeout(*after),
            ConnectFailure::Refused(kind, message) => {
                ErrorKind::ConnectFailed(std::io::Error::new(*kind, message.clone()))
            }
        }
    }
}

#[derive(Debug)]
struct IdleConnection {
    sender: http1::SendRequest<ProxyBody>,
    held: UpstreamConnection,
    parking: Arc<Parking>,
    since: Instant,
}

/// Where an HTTP/1.1 connection's sender waits while an exchange is under
/// way: a connection can take its next request once the response body has
/// been read to its end, which its own task (the one that drives the
/// connection) sees first. That task moves the sender to the idle list
/// then; no task is spawned per request to wait for it.
#[derive(Debug, Default)]
struct Parking(Mutex<Option<Parked>>);

/// A sender waiting for its exchange to end.
#[derive(Debug)]
struct Parked {
    sender: http1::SendRequest<ProxyBody>,
    held: UpstreamConnection,
}

impl Parking {
    /// Leaves `sender` (its request sent, its response head received) to
    /// be put back in the idle list when the exchange is over: at once if
    /// it already is, else by the connection's task ([`Parking::poll`]).
    fn leave(
        self: &Arc<Self>,
        sender: http1::SendRequest<ProxyBody>,
        held: UpstreamConnection,
        connections: &Connections,
        settings: &PoolSettings,
    ) {
        // Checked and stored under the lock: the connection's task looks
        // after its connection made progress, so an exchange that ends
        // between the check and the store is seen there.
        let mut parked = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if sender.is_ready() {
            drop(parked);
            connections.put_back(sender, held, self.clone(), settings);
        } else {
            *parked = Some(Parked { sender, held });
        }
    }

    /// Called by the connection's task whenever its connection is
    /// pending: puts the parked sender back in the idle list if its
    /// exchange is over, drops it (closing the connection) if it can take
    /// no more requests or its pool is gone, else leaves it, `cx` to be
    /// woken when it can go on.
    fn poll(
        self: &Arc<Self>,
        cx: &mut std::task::Context<'_>,
        connections: &Weak<Connections>,
        settings: &PoolSettings,
    ) {
        let mut parked = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(waiting) = parked.as_mut() else {
            return;
        };
        match waiting.sender.poll_ready(cx) {
            std::task::Poll::Pending => {}
            std::task::Poll::Ready(ready) => {
                let Parked { sender, held } = parked.take().expect("checked above");
                drop(parked);
                if let (Ok(()), Some(connections)) = (ready, connections.upgrade()) {
                    connections.put_back(sender, held, self.clone(), settings);
                }
            }
        }
    }
}

/// Keeps an HTTP/1.1 upstream connection counted (its `maxConnections`
/// permit and the open-connections gauge) while held. A response that
/// switches protocols carries one in its extensions: its connection lives
/// on in the tunnel, which holds it until it closes. (Others do not: the
/// connection's own task holds it while the exchange runs, and an
/// extension costs every response an allocation.)
#[derive(Clone, Debug)]
pub(crate) struct UpstreamConnection {
    _open: Arc<OpenConnection>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            idle: (0..worker::count()).map(|_| Mutex::default()).collect(),
            shared: ArcSwapOption::default(),
            connecting: tokio::sync::Mutex::default(),
            connect_failures: std::sync::atomic::AtomicU64::default(),
            last_connect_failure: Mutex::default(),
            open: Arc::default(),
        }
    }
}

impl Connections {
    /// The index of the idle list of the worker this runs on.
    fn here(&self) -> usize {
        worker::current().min(self.idle.len() - 1)
    }

    /// The idle list of the worker this runs on.
    fn idle_here(&self) -> &Mutex<Vec<IdleConnection>> {
        &self.idle[self.here()]
    }

    /// Connections currently open to this endpoint.
    pub fn open(&self) -> i64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Idle HTTP/1.1 connections waiting for reuse, on every worker.
    pub fn idle(&self) -> usize {
        self.idle
            .iter()
            .map(|idle| idle.lock().expect("idle list lock").len())
            .sum()
    }

    /// Closes idle connections that outlived `idle_timeout` or that the
    /// server has closed.
    pub fn close_expired(&self, idle_timeout: Duration) {
        let now = Instant::now();
        for idle in &self.idle {
            idle.lock()
                .expect("idle list lock")
                .retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < idle_timeout);
        }
    }

    fn checkout(&self, idle_timeout: Duration) -> Option<IdleConnection> {
        let now = Instant::now();
        let mut idle = self.idle_here().lock().expect("idle list lock");
        while let Some(c) = idle.pop() {
            if c.sender.is_ready() && now.duration_since(c.since) < idle_timeout {
                return Some(c);
            }
        }
        None
    }

    /// Closes the longest-idle connection of one worker, if one is idle
    /// (this worker's first).
    pub fn close_oldest_idle(&self) -> bool {
        let here = self.here();
        let order = (here..self.idle.len()).chain(0..here);
        for index in order {
            let mut idle = self.idle[index].lock().expect("idle list lock");
            if !idle.is_empty() {
                idle.remove(0);
                return true;
            }
        }
        false
    }

    fn put_back(
        &self,
        sender: http1::SendRequest<ProxyBody>,
        held: UpstreamConnection,
        parking: Arc<Parking>,
        settings: &PoolSettings,
    ) {
        if settings.breaker.has_waiters() {
            return; // Closing it hands its permit to a waiting request.
        }
        let mut idle = self.idle_here().lock().expect("idle list lock");
        if idle.len() < settings.max_idle {
            idle.push(IdleConnection {
                sender,
                held,
                parking,
                since: Instant::now(),
            });
        }
    }
}

/// A failed exchange: why, and the request when no connection ever had it.
#[derive(Debug)]
pub(crate) struct SendError {
    /// Why it failed.
    pub kind: ErrorKind,
    /// The request's head as it came, when it failed before it was
    /// adapted to a connection (waiting for a connection slot, connecting,
    /// the handshake), so that a retry can send it elsewhere.
    pub unsent: Option<Box<http::request::Parts>>,
}

impl From<ErrorKind> for SendError {
    fn from(kind: ErrorKind) -> Self {
        SendError { kind, unsent: None }
    }
}

/// A request on its way to a connection of the endpoint at `addr`, adapted
/// to the upstream only once a connection is in hand: until then it is
/// the request as it came, which a failure gives back.
struct Outgoing<'a> {
    request: Request<ProxyBody>,
    adapted: bool,
    addr: SocketAddr,
    settings: &'a PoolSettings,
}

impl<'a> Outgoing<'a> {
    fn new(request: Request<ProxyBody>, addr: SocketAddr, settings: &'a PoolSettings) -> Self {
        Outgoing {
            request,
            adapted: false,
            addr,
            settings,
        }
    }

    /// The request, adapted to the upstream, for a connection to send.
    fn adapted(mut self) -> Request<ProxyBody> {
        if !self.adapted {
            if self.settings.connector.is_mesh_peer() {
                // A mesh peer: its inbound sidecar speaks to its app in the
                // version the app's caller spoke, whatever this hop speaks.
                note_original_protocol(&mut self.request);
            }
            adapt_request(&mut self.request, self.settings.protocol, self.addr);
        }
        self.request
    }

    /// A request a connection gave back unsent: already adapted, as it
    /// would be for any other connection of the endpoint, so not again;
    /// and no longer as it came, so a later failure keeps it.
    fn given_back(
        request: Request<ProxyBody>,
        addr: SocketAddr,
        settings: &'a PoolSettings,
    ) -> Self {
        Outgoing {
            request,
            adapted: true,
            addr,
            settings,
        }
    }

    /// Fails the exchange with `kind`, giving the request back if no
    /// connection had it yet.
    fn failed(self, kind: ErrorKind) -> SendError {
        SendError {
            kind,
            unsent: (!self.adapted).then(|| Box::new(self.request.into_parts().0)),
        }
    }
}

/// Sends `request` to the endpoint at `addr` and returns its response head
/// (the body streams on).
pub(crate) async fn send(
    connections: &Arc<Connections>,
    addr: SocketAddr,
    settings: &Arc<PoolSettings>,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, SendError> {
    let outgoing = Outgoing::new(request, addr, settings);
    let mut response = match settings.protocol {
        UpstreamProtocol::Http1 => send_http1(connections, settings, outgoing).await,
        UpstreamProtocol::Http2 => send_http2(connections, settings, outgoing).await,
    }?;
    // The version belongs to the upstream hop; the client's connection
    // answers in its own (an HTTP/1.0 server must not make it HTTP/1.0).
    *response.version_mut() = Version::default();
    Ok(response)
}

/// Sends `request` on a connection of its own, outside the pool and its
/// limits, closed when the exchange ends: for health checks, which must
/// neither queue behind traffic nor take its connection slots.
pub(crate) async fn send_alone(
    addr: SocketAddr,
    settings: &PoolSettings,
    mut request: Request<ProxyBody>,
) -> Result<Response<Incoming>, ErrorKind> {
    adapt_request(&mut request, settings.protocol, addr);
    let io = connect(addr, settings).await?;
    let sent = match settings.protocol {
        UpstreamProtocol::Http1 => {
            let (mut sender, connection) = http1::Builder::new()
                .handshake::<_, ProxyBody>(io)
                .await
                .map_err(ErrorKind::UpstreamReset)?;
            tokio::spawn(connection);
            sender.send_request(request).await
        }
        UpstreamProtocol::Http2 => {
            let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake::<_, ProxyBody>(io)
                .await
                .map_err(ErrorKind::UpstreamReset)?;
            tokio::spawn(connection);
            sender.send_request(request).await
        }
    };
    let mut response = sent.map_err(ErrorKind::from_upstream)?;
    *response.version_mut() = Version::default();
    Ok(response)
}

async fn send_http1(
    connections: &Arc<Connections>,
    settings: &Arc<PoolSettings>,
    mut outgoing: Outgoing<'_>,
) -> Result<Response<Incoming>, SendError> {
    while let Some(idle) = connections.checkout(settings.idle_timeout) {
        let IdleConnection {
            mut sender,
            held,
            parking,
            ..
        } = idle;
        let addr = outgoing.addr;
        match sender.try_send_request(outgoing.adapted()).await {
            Ok(mut response) => {
                hold_if_upgraded(&mut response, &held);
                parking.leave(sender, held, connections, settings);
                return Ok(response);
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) => outgoing = Outgoing::given_back(unsent, addr, settings),
                None => return Err(ErrorKind::from_upstream(e.into_error()).into()),
            },
        }
    }
    // Boxed: waiting for a connection slot, connecting and a TLS handshake
    // are kilobytes of state, which a request sent on a pooled connection
    // (the usual case) would otherwise carry inline and copy around.
    Box::pin(send_http1_on_new_connection(
        connections,
        settings,
        outgoing,
    ))
    .await
}

/// Puts `held` in the extensions of a `response` that switches protocols,
/// for the tunnel ([`UpstreamConnection`]).
fn hold_if_upgraded(response: &mut Response<Incoming>, held: &UpstreamConnection) {
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        response.extensions_mut().insert(held.clone());
    }
}

/// Sends a request on a new HTTP/1.1 connection to its endpoint, which
/// joins the pool once the exchange is over.
async fn send_http1_on_new_connection(
    connections: &Arc<Connections>,
    settings: &Arc<PoolSettings>,
    outgoing: Outgoing<'_>,
) -> Result<Response<Incoming>, SendError> {
    let addr = outgoing.addr;
    let permit = match settings.connection_permit().await {
        Ok(permit) => permit,
        Err(kind) => return Err(outgoing.failed(kind)),
    };
    let io = match connect(addr, settings).await {
        Ok(io) => io,
        Err(kind) => return Err(outgoing.failed(kind)),
    };
    let (mut sender, connection) = match http1::Builder::new().handshake::<_, ProxyBody>(io).await {
        Ok(handshaken) => handshaken,
        Err(e) => return Err(outgoing.failed(ErrorKind::UpstreamReset(e))),
    };
    let held = UpstreamConnection {
        _open: Arc::new(OpenConnection::new(connections, settings, permit)),
    };
    let parking = Arc::new(Parking::default());
    tokio::spawn(drive_http1(
        connection,
        held.clone(),
        parking.clone(),
        Arc::downgrade(connections),
        settings.clone(),
        addr,
    ));
    let mut response = sender
        .send_request(outgoing.adapted())
        .await
        .map_err(ErrorKind::from_upstream)?;
    hold_if_upgraded(&mut response, &held);
    parking.leave(sender, held, connections, settings);
    Ok(response)
}

/// The task of one HTTP/1.1 upstream connection: drives it until it
/// closes or is handed over to an upgrade's tunnel (whose response holds
/// its own `held`), keeping it counted (`held`) meanwhile, and each time
/// it is pending lets `parking` return its sender to the idle list if the
/// exchange is over.
///
/// The pool is only `Weak` here: the pool keeps idle connections' senders,
/// a sender keeps its connection's task running, and a task that kept the
/// pool would keep a replaced backend's pool, and its idle connections
/// and their permits, for ever.
///
/// A future made by hand rather than an async function, which would hold
/// hyper's connection twice for the connection's whole life: once as its
/// argument, once wrapped for upgrades (hundreds of bytes, for every open
/// connection).
fn drive_http1(
    connection: http1::Connection<TokioIo<BoxedIo>, ProxyBody>,
    held: UpstreamConnection,
    parking: Arc<Parking>,
    connections: Weak<Connections>,
    settings: Arc<PoolSettings>,
    addr: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let mut connection = connection.with_upgrades();
    let mut held = Some(held);
    std::future::poll_fn(move |cx| {
        let Poll::Ready(ended) = Pin::new(&mut connection).poll(cx) else {
            parking.poll(cx, &connections, &settings);
            return Poll::Pending;
        };
        if let Err(e) = ended {
            tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended with an error");
        }
        drop(held.take());
        Poll::Ready(())
    })
}

async fn send_http2(
    connections: &Arc<Connections>,
    settings: &Arc<PoolSettings>,
    mut outgoing: Outgoing<'_>,
) -> Result<Response<Incoming>, SendError> {
    let addr = outgoing.addr;
    let mut reconnected = false;
    loop {
        let shared = match connections.shared.load_full() {
            Some(s) if !s.is_closed() => s,
            _ => {
                reconnected = true;
                // Boxed, as for HTTP/1.1: rare, and kilobytes of state.
                match Box::pin(connect_http2(connections, addr, settings)).await {
                    Ok(shared) => shared,
                    Err(kind) => return Err(outgoing.failed(kind)),
                }
            }
        };
        let mut sender = (*shared).clone();
        match sender.try_send_request(outgoing.adapted()).await {
            Ok(response) => return Ok(response),
            Err(mut e) => match e.take_message() {
                // The shared connection was closing (GOAWAY): forget it,
                // unless another request already replaced it, and make
                // one fresh try.
                Some(unsent) if !reconnected => {
                    connections.shared.compare_and_swap(&shared, None);
                    outgoing = Outgoing::given_back(unsent, addr, settings);
                }
                _ => return Err(ErrorKind::from_upstream(e.into_error()).into()),
            },
        }
    }
}

/// Returns the shared HTTP/2 connection, making it if none is open. One
/// caller connects while the others wait for its result; if that connect
/// fails, the waiters fail with it at once.
async fn connect_http2(
    connections: &Arc<Connections>,
    addr: SocketAddr,
    settings: &Arc<PoolSettings>,
) -> Result<Arc<http2::SendRequest<ProxyBody>>, ErrorKind> {
    let failures_before = connections.connect_failures.load(Ordering::Acquire);
    let _one_at_a_time = connections.connecting.lock().await;
    if let Some(s) = connections.shared.load_full()
        && !s.is_closed()
    {
        return Ok(s);
    }
    if connections.connect_failures.load(Ordering::Acquire) != failures_before
        && let Some(failure) = connections
            .last_connect_failure
            .lock()
            .expect("connect failure lock")
            .clone()
    {
        return Err(failure.to_error());
    }
    let permit = settings.breaker.connection_now()?;
    let io = match connect(addr, settings).await {
        Ok(io) => io,
        Err(e) => {
            *connections
                .last_connect_failure
                .lock()
                .expect("connect failure lock") = ConnectFailure::of(&e);
            connections.connect_failures.fetch_add(1, Ordering::Release);
            return Err(e);
        }
    };
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .keep_alive_interval(HTTP2_PING_INTERVAL)
        .keep_alive_timeout(HTTP2_PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake::<_, ProxyBody>(io)
        .await
        .map_err(ErrorKind::UpstreamReset)?;
    let guard = OpenConnection::new(connections, settings, permit);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended with an error");
        }
        drop(guard);
    });
    let sender = Arc::new(sender);
    connections.shared.store(Some(sender.clone()));
    Ok(sender)
}

/// Connects to the endpoint at `addr` through the backend's connector
/// (with TLS when the backend asks for it), all within the backend's
/// connect timeout.
async fn connect(addr: SocketAddr, settings: &PoolSettings) -> Result<TokioIo<BoxedIo>, ErrorKind> {
    let timeout = settings.connect_timeout;
    let started = tokio::time::Instant::now();
    let connected = match tokio::time::timeout(timeout, settings.connector.connect(addr)).await {
        Err(_) => Err(ErrorKind::ConnectTimeout(timeout)),
        Ok(result) => result.map(TokioIo::new),
    };
    let metrics = &settings.connects;
    match &connected {
        Ok(_) => {
            metrics.succeeded.inc();
            metrics.duration.observe(started.elapsed().as_secs_f64());
        }
        Err(kind) => metrics
            .results
            .with_label_values(&[&*metrics.name, kind.reason()])
            .inc(),
    }
    connected
}

/// Counts one open upstream connection, and holds its permit, for as long
/// as it lives.
#[derive(Debug)]
struct OpenConnection {
    open: Arc<AtomicI64>,
    gauge: IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(
        connections: &Connections,
        settings: &PoolSettings,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        connections.open.fetch_add(1, Ordering::Relaxed);
        settings.open_gauge.inc();
        OpenConnection {
            open: connections.open.clone(),
            gauge: settings.open_gauge.clone(),
            _permit: permit,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// Rewrites the request line for the upstream's HTTP version, keeping the
/// host the client asked for: HTTP/1.1 gets an origin-form target and a
/// `Host` header; HTTP/2 gets an absolute URI whose authority becomes
/// `:authority`.
///
/// The client's host is the request's authority (HTTP/2 `:authority`, or an
/// absolute-form HTTP/1.1 target) when it has one, as RFC 9112 §3.2.2 and
/// RFC 9113 §8.3.1 say, else its `Host` header: the same host the route
/// was matched on.
pub fn adapt_request<B>(
    request: &mut Request<B>,
    protocol: UpstreamProtocol,
    endpoint: SocketAddr,
) {
    match protocol {
        UpstreamProtocol::Http1 => {
            *request.version_mut() = Version::HTTP_11;
            // Nearly every request is in origin form with a `Host`: it
            // goes as it is, with no authority parsed or URI rebuilt.
            if request.uri().scheme().is_none() && request.uri().authority().is_none() {
                if !request.headers().contains_key(HOST) {
                    let host = HeaderValue::try_from(endpoint.to_string())
                        .expect("a socket address is a header value");
                    request.headers_mut().insert(HOST, host);
                }
                return;
            }
            if let Some(authority) = request.uri().authority()
                && let Ok(host) = HeaderValue::from_str(authority.as_str())
            {
                request.headers_mut().insert(HOST, host);
            }
            *request.uri_mut() = Uri::from(path_of(request.uri()));
        }
        UpstreamProtocol::Http2 => {
            let authority = request
                .uri()
                .authority()
                .cloned()
                .or_else(|| {
                    request
                        .headers()
                        .get(HOST)
                        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                })
                .unwrap_or_else(|| {
                    Authority::try_from(endpoint.to_string())
                        .expect("a socket address is an authority")
                });
            *request.version_mut() = Version::HTTP_2;
            request.headers_mut().remove(HOST);
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority);
            parts.path_and_query = Some(path_of(request.uri()));
            *request.uri_mut() =
                Uri::from_parts(parts).expect("scheme, authority and path make a URI");
        }
    }
}

/// The path and query of `uri`, `/` when it has none.
fn path_of(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> SocketAddr {
        "10.0.0.1:8000".parse().unwrap()
    }

    #[test]
    fn http2_client_to_http1_upstream_keeps_the_host() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://models.example.com/v1/chat?x=1")
            .body(())
            .unwrap();
        adapt_request(&mut req, UpstreamProtocol::Http1, endpoint());
        assert_eq!(req.uri(), "/v1/chat?x=1");
        assert_eq!(req.headers()[HOST], "models.example.com");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn http1_client_to_http2_upstream_moves_host_to_authority() {
        let mut req = Request::builder()
            .uri("/v2/models/m/infer")
            .header(HOST, "models.example.com:8080")
            .body(())
            .unwrap();
        adapt_request(&mut req, UpstreamProtocol::Http2, endpoint());
        assert_eq!(
            req.uri(),
            "http://models.example.com:8080/v2/models/m/infer"
        );
        assert!(!req.headers().contains_key(HOST));
        assert_eq!(req.version(), Version::HTTP_2);
    }

    #[test]
    fn the_authority_wins_over_a_different_host_header() {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let mut req = Request::builder()
                .version(version)
                .uri("http://public.example.com/v1/models")
                .header(HOST, "internal.example.com")
                .body(())
                .unwrap();
            adapt_request(&mut req, UpstreamProtocol::Http1, endpoint());
            assert_eq!(req.headers()[HOST], "public.example.com", "{version:?}");
        }
    }

    #[test]
    fn a_request_without_host_names_the_endpoint() {
        let mut req = Request::builder()
            .version(Version::HTTP_10)
            .uri("/")
            .body(())
            .unwrap();
        adapt_request(&mut req, UpstreamProtocol::Http1, endpoint());
        assert_eq!(req.headers()[HOST], "10.0.0.1:8000");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn an_origin_form_request_with_a_host_goes_as_it_came() {
        let mut req = Request::builder()
            .uri("/v1/chat/completions?stream=true")
            .header(HOST, "models.example.com")
            .body(())
            .unwrap();
        adapt_request(&mut req, UpstreamProtocol::Http1, endpoint());
        assert_eq!(req.uri(), "/v1/chat/completions?stream=true");
        assert_eq!(req.headers()[HOST], "models.example.com");
        assert_eq!(req.headers().get_all(HOST).iter().count(), 1);
        // Without a path, an HTTP/2 upstream gets `/`.
        let mut req = Request::builder()
            .uri("http://models.example.com")
            .body(())
            .unwrap();
        adapt_request(&mut req, UpstreamProtocol::Http2, endpoint());
        assert_eq!(req.uri(), "http://models.example.com/");
    }
}
