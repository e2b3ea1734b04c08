//! What a request or a response carries in its extensions as it passes the
//! layers: the connection it came on (set by the server), the attempt the
//! retry layer is making (read by the endpoint pick), the endpoint that
//! answered (set by the balancer, read by retries, fan-out and the access
//! log), the endpoint last tried (noted by the balancer, read by the
//! access log) and the model its body names (set by the model peek). Each is a
//! plain value type, so every layer can read what the others wrote
//! without depending on them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infermesh_api::Capture;

/// Identifies a bound listener socket; it stays the same across reloads
/// that keep the listener's address.
pub(crate) type ListenerId = u64;

/// What a request knows about the connection it came on.
#[derive(Debug)]
pub(crate) struct ConnectionInfo {
    /// The client's address.
    pub client: SocketAddr,
    /// The client's IP as `X-Forwarded-For` writes it, formatted once per
    /// connection rather than once per request.
    pub client_ip: http::HeaderValue,
    /// The client's address as text (`10.0.0.12:52114`), as the access
    /// log writes it: formatted once per connection too.
    pub client_address: Box<str>,
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

#[cfg(test)]
impl ConnectionInfo {
    /// A plaintext connection from `127.0.0.1:40000` to listener 0.
    pub(crate) fn for_test() -> Self {
        let client = SocketAddr::from(([127, 0, 0, 1], 40000));
        ConnectionInfo {
            client,
            client_ip: http::HeaderValue::from_static("127.0.0.1"),
            client_address: client.to_string().into(),
            listener: 0,
            scheme: "http",
            peer_identity: None,
            original_destination: None,
            capture: None,
        }
    }
}

/// Which backend and endpoint answered; found in the extensions of every
/// response that came from upstream.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    /// The backend's name.
    pub backend: Arc<str>,
    /// The endpoint's address.
    pub endpoint: SocketAddr,
    /// Retries made before this answer.
    pub retries: u32,
}

/// What the layers serving a request share of it: the connection it came
/// on, and what they note for the access log. One per request (the server
/// makes it: one allocation), in its extensions; every copy of the request
/// (retries, hedges, fan-out branches) shares it, except a mirror's
/// ([`RequestContext::for_mirror`]).
///
/// The balancer notes the backend and endpoint each attempt is sent to,
/// so that a request that ends with no response from upstream (a route
/// timeout fired, the client went away) is still attributed to the
/// backend and endpoint it was waiting on, as Envoy logs the upstream host
/// of a UT or a DC; the request body's bytes are counted as they are read
/// from the client.
#[derive(Clone, Debug)]
pub(crate) struct RequestContext(Arc<RequestShared>);

#[derive(Debug)]
struct RequestShared {
    connection: Arc<ConnectionInfo>,
    last: Mutex<Option<Upstream>>,
    request_bytes: AtomicU64,
}

impl RequestContext {
    /// The context of a request that came on `connection`.
    pub(crate) fn new(connection: Arc<ConnectionInfo>) -> Self {
        RequestContext(Arc::new(RequestShared {
            connection,
            last: Mutex::default(),
            request_bytes: AtomicU64::default(),
        }))
    }

    /// The context of a mirrored copy of the request: the same connection,
    /// and attempts and bytes of its own, which are not the request's (the
    /// access log names the backend the client waited on).
    pub(crate) fn for_mirror(&self) -> Self {
        RequestContext::new(self.0.connection.clone())
    }

    /// The connection the request came on.
    pub(crate) fn connection(&self) -> &Arc<ConnectionInfo> {
        &self.0.connection
    }

    /// Notes an attempt sent to `upstream`.
    pub(crate) fn note_attempt(&self, upstream: Upstream) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(upstream);
    }

    /// The latest attempt's backend and endpoint, if one was sent.
    pub(crate) fn last_attempt(&self) -> Option<Upstream> {
        self.0
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Notes `bytes` more of the request body read from the client.
    pub(crate) fn add_request_bytes(&self, bytes: u64) {
        self.0.request_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The request body bytes read from the client so far.
    pub(crate) fn request_bytes(&self) -> u64 {
        self.0.request_bytes.load(Ordering::Relaxed)
    }
}

/// What the retry layer tells the endpoint pick about one attempt. A
/// request without one is a plain first attempt ([`Attempt::is_plain`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Attempt {
    /// 0 for the first attempt, then 1, 2, ... for retries.
    pub retry: u32,
    /// Endpoints this request already failed on, to be avoided.
    pub avoid: Vec<SocketAddr>,
    /// Limit on this attempt's wait for response headers.
    pub timeout: Option<Duration>,
    /// A hedge: sent only to an endpoint no other attempt of the request
    /// uses.
    pub hedge: bool,
    /// Endpoints the request's other attempts in flight use (when it is
    /// hedged): each attempt adds its pick and avoids the others'.
    pub siblings: Option<Arc<Mutex<Vec<SocketAddr>>>>,
}

impl Attempt {
    /// Whether the attempt says nothing that a request without one does
    /// not: a first attempt, neither hedged nor under a limit of its own.
    /// Such an attempt is not put in the request's extensions (an
    /// allocation per request, on the path every request takes).
    pub(crate) fn is_plain(&self) -> bool {
        self.retry == 0
            && self.avoid.is_empty()
            && self.timeout.is_none()
            && !self.hedge
            && self.siblings.is_none()
    }

    /// Marks `extensions` (a request's) with the attempt, unless it is
    /// [plain](Attempt::is_plain).
    pub(crate) fn mark(&self, extensions: &mut http::Extensions) {
        if !self.is_plain() {
            extensions.insert(self.clone());
        }
    }
}

/// The model named in a request's body, once read.
#[derive(Clone, Debug)]
pub(crate) struct BodyModel(pub Option<Arc<str>>);
