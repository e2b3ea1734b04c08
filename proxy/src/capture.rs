//! Sidecar capture listeners: what becomes of a connection that the pod's
//! iptables rules (`infermesh-proxy init`) redirected to the proxy.
//!
//! This module owns recovering the connection's original destination
//! (`SO_ORIGINAL_DST`), telling HTTP from other protocols on outbound
//! connections, the TCP passthrough for destinations outside the mesh, and
//! the per-connection service that forwards requests to the original
//! destination (the app, inbound; an outside server, outbound).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Version};
use infermesh_api::{
    BackendRef, BackendSpec, EndpointSpec, RetryPolicy, RouteRule, RouteTimeouts, UpstreamProtocol,
};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

use crate::backend::Backend;
use crate::body::{BoxFuture, ProxyBody};
use crate::error::ProxyError;
use crate::forward::rule_service;
use crate::metrics::Metrics;
use crate::snapshot::RuleTarget;

/// The address a redirected connection was sent to before iptables
/// redirected it, or `None` when it was not redirected (it was made to the
/// listener's own address, or the kernel keeps no NAT record of it).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = socket2::SockRef::from(stream);
    // An IPv4 client of a dual-stack socket has a v4-mapped address, and
    // its NAT record is IPv4's.
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if ipv4 {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let original = match original {
        Ok(address) => address.as_socket()?,
        Err(e) => {
            // ENOENT: no NAT record, the connection was not redirected.
            if e.raw_os_error() != Some(2) {
                tracing::warn!(error = %e, "cannot read a connection's original destination (SO_ORIGINAL_DST)");
            }
            return None;
        }
    };
    let unmapped = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    (unmapped(original) != unmapped(local)).then_some(original)
}

/// The header that carries, between sidecars, the HTTP version the app
/// that made a request spoke, so that the sidecar in front of the app
/// that answers speaks that version to it (HTTP/1.1 to a uvicorn server,
/// HTTP/2 to a gRPC one) whatever version the two sidecars speak.
pub const ORIGINAL_PROTOCOL: &str = "x-infermesh-original-protocol";

/// Notes the version of `request` in [`ORIGINAL_PROTOCOL`], unless an
/// earlier hop already did.
pub fn note_original_protocol<B>(request: &mut Request<B>) {
    if !request.headers().contains_key(ORIGINAL_PROTOCOL) {
        let version = if request.version() == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        };
        request
            .headers_mut()
            .insert(ORIGINAL_PROTOCOL, http::HeaderValue::from_static(version));
    }
}

/// The version to speak to the app for `request`: the one its caller's app
/// spoke (taking the header off), or the one it came in.
fn take_original_protocol<B>(request: &mut Request<B>) -> UpstreamProtocol {
    match request.headers_mut().remove(ORIGINAL_PROTOCOL) {
        Some(v) if v == "HTTP/2" => UpstreamProtocol::Http2,
        Some(_) => UpstreamProtocol::Http1,
        None if request.version() == Version::HTTP_2 => UpstreamProtocol::Http2,
        None => UpstreamProtocol::Http1,
    }
}

/// How long a captured connection may stay silent before it is taken for a
/// protocol whose server speaks first (SMTP, MySQL...) and passed through
/// as TCP. (To a destination known to speak HTTP, clients get
/// [`MESH_DETECT_TIMEOUT`]: pools open connections ahead of requests.)
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection to a backend's address may stay silent before it
/// is taken for another protocol than HTTP.
pub const MESH_DETECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Request methods whose request line marks a connection as HTTP/1 (or the
/// HTTP/2 preface, which starts with `PRI `).
const METHODS: [&[u8]; 10] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI",
];

/// Whether `start`, the first bytes of a connection, begin an HTTP request:
/// `Some(true)` or `Some(false)` once it can tell, `None` while every byte
/// so far could still start one.
fn looks_like_http(start: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for method in METHODS {
        let line = [method, b" "].concat();
        if start.starts_with(&line) {
            return Some(true);
        }
        undecided |= line.starts_with(start);
    }
    if undecided { None } else { Some(false) }
}

/// Whether the client on `stream` speaks HTTP, judged by its first bytes
/// (left unread). A client that sends nothing for `wait` is not taken for
/// HTTP.
pub async fn speaks_http(stream: &TcpStream, wait: Duration) -> io::Result<bool> {
    let decided = tokio::time::timeout(wait, async {
        let mut start = [0u8; 8];
        loop {
            let read = stream.peek(&mut start).await?;
            if read == 0 {
                return Ok(false);
            }
            if let Some(decided) = looks_like_http(&start[..read]) {
                return Ok(decided);
            }
            // A request line split over segments: wait for the rest. (The
            // socket stays readable while bytes are unread, so poll slowly.)
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    decided.unwrap_or(Ok(false))
}

/// Connects to `destination` and copies bytes both ways until either side
/// closes. Returns the bytes sent each way.
pub async fn tunnel(
    mut client: TcpStream,
    destination: SocketAddr,
    connect_timeout: Duration,
) -> io::Result<(u64, u64)> {
    let mut server = tokio::time::timeout(connect_timeout, TcpStream::connect(destination))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = server.set_nodelay(true);
    // A peer that vanished (no FIN, no RST) is found by keep-alive probes,
    // so a tunnel does not stay open forever.
    for socket in [&client, &server] {
        let _ = socket2::SockRef::from(socket).set_keepalive(true);
    }
    tokio::io::copy_bidirectional(&mut client, &mut server).await
}

/// The service that forwards one connection's requests to its original
/// destination, made at the first request of each HTTP version: a backend
/// of that one endpoint, speaking the version the app that made the request
/// spoke ([`ORIGINAL_PROTOCOL`]), without retries or timeouts (the caller,
/// or the sidecar that called, sets those).
pub struct OriginalDestination {
    destination: SocketAddr,
    /// The name logs and metrics give it (`inbound` or `passthrough`).
    name: Arc<str>,
    metrics: Arc<Metrics>,
    http1: OnceCell<Arc<RuleTarget>>,
    http2: OnceCell<Arc<RuleTarget>>,
}

impl OriginalDestination {
    /// Forwards to `destination`, under `name` in logs and metrics.
    pub fn new(destination: SocketAddr, name: &str, metrics: Arc<Metrics>) -> Self {
        OriginalDestination {
            destination,
            name: Arc::from(name),
            metrics,
            http1: OnceCell::new(),
            http2: OnceCell::new(),
        }
    }

    /// The name logs and metrics give it.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Sends `request` to the destination.
    pub fn forward(
        self: Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>> {
        let protocol = take_original_protocol(&mut request);
        Box::pin(async move {
            let target = self.target(protocol).await;
            crate::proxy::forward(&target, request).await
        })
    }

    /// The destination's service for requests in `protocol`.
    async fn target(&self, protocol: UpstreamProtocol) -> Arc<RuleTarget> {
        let cell = match protocol {
            UpstreamProtocol::Http1 => &self.http1,
            UpstreamProtocol::Http2 => &self.http2,
        };
        cell.get_or_init(|| async {
            let spec = BackendSpec {
                endpoints: vec![EndpointSpec {
                    address: self.destination.to_string(),
                    weight: 1,
                }],
                protocol,
                ..BackendSpec::default()
            };
            let backend = Backend::new(&self.name, spec, None, &self.metrics, None).await;
            let mut rule = default_rule(&self.name);
            rule.retry = RetryPolicy {
                max_retries: 0,
                ..RetryPolicy::default()
            };
            rule.timeouts = RouteTimeouts {
                response_headers: infermesh_api::Duration::ZERO,
                first_event: infermesh_api::Duration::ZERO,
                idle: infermesh_api::Duration::ZERO,
                total: infermesh_api::Duration::ZERO,
            };
            let backends = [(self.name.to_string(), backend)].into_iter().collect();
            Arc::new(RuleTarget {
                route: self.name.clone(),
                service: rule_service(&rule, &self.name, &backends, &self.metrics),
            })
        })
        .await
        .clone()
    }
}

/// A rule that sends every request to `backend`, with every default.
pub fn default_rule(backend: &str) -> RouteRule {
    RouteRule {
        matches: Vec::new(),
        backends: vec![BackendRef {
            name: backend.to_owned(),
            weight: 1,
        }],
        timeouts: Default::default(),
        retry: RetryPolicy::default(),
        mirror: None,
        rate_limit: None,
        hedge: None,
        fanout: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_http_and_other_protocols_are_not() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http(b"POST /v1/chat"), Some(true));
        assert_eq!(looks_like_http(b"PRI * HTTP/2.0"), Some(true));
        // A TLS ClientHello, Redis, PostgreSQL's startup message.
        assert_eq!(looks_like_http(&[0x16, 0x03, 0x01]), Some(false));
        assert_eq!(looks_like_http(b"*1\r\n$4\r\nPING"), Some(false));
        assert_eq!(looks_like_http(&[0, 0, 0, 8, 4, 210]), Some(false));
        // Redis inline commands are upper case but are not methods.
        assert_eq!(looks_like_http(b"PING\r\n"), Some(false));
        assert_eq!(looks_like_http(b"GETX"), Some(false));
    }

    #[test]
    fn a_split_request_line_is_awaited() {
        assert_eq!(looks_like_http(b"G"), None);
        assert_eq!(looks_like_http(b"PO"), None);
        assert_eq!(looks_like_http(b"DELETE"), None);
        assert_eq!(looks_like_http(b"OPTIONS "), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn detection_reads_nothing_and_gives_up_on_silence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GE").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"T / HTTP/1.1\r\n\r\n").await.unwrap();
            s
        });
        let (server, _) = listener.accept().await.unwrap();
        assert!(speaks_http(&server, Duration::from_secs(5)).await.unwrap());
        let mut buf = [0u8; 3];
        server.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET", "detection left the bytes unread");
        let _client = client.await.unwrap();

        let silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(
            !speaks_http(&server, Duration::from_millis(50))
                .await
                .unwrap()
        );
        drop(silent);
    }

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(original_destination(&server), None);
    }
}
