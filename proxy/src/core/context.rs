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

/// The backend and endpoint a request's latest attempt was sent to, noted
/// by the balancer as it sends and read by the access log: a request that
/// ends with no response from upstream (a route timeout fired, the client
/// went away) is still attributed to the backend and endpoint it was
/// waiting on, as Envoy logs the upstream host of a UT or a DC. One per
/// request (the server makes it); every copy of the request (retries,
/// hedges, fan-out branches) shares it, except a mirror's.
///
/// The same shared value counts the request body bytes read from the
/// client, which the access log reads at the end as it reads the latest
/// attempt: one allocation per request serves both.
#[derive(Clone, Debug, Default)]
pub(crate) struct LastAttempt(Arc<RequestTally>);

/// What the server's request record and the layers below it both write.
#[derive(Debug, Default)]
struct RequestTally {
    last: Mutex<Option<Upstream>>,
    request_bytes: AtomicU64,
}

impl LastAttempt {
    /// Notes an attempt sent to `upstream`.
    pub(crate) fn note(&self, upstream: Upstream) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(upstream);
    }

    /// The latest attempt's backend and endpoint, if one was sent.
    pub(crate) fn get(&self) -> Option<Upstream> {
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

/// What the retry layer tells the endpoint pick about one attempt.
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

/// The model named in a request's body, once read.
#[derive(Clone, Debug)]
pub(crate) struct BodyModel(pub Option<Arc<str>>);
