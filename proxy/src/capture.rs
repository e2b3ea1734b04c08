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
    BackendRef, BackendSpec, EndpointSpec, RetryPolicy, RouteRule, UpstreamProtocol,
};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

use tower::ServiceExt;

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
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// How long an outbound connection to a destination outside the mesh may
/// stay silent before it is taken for a protocol whose server speaks first
/// (SMTP, MySQL...) and passed through as TCP.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

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
    tokio::io::copy_bidirectional(&mut client, &mut server).await
}

/// The service that forwards one connection's requests to its original
/// destination, made at its first request: a backend of that one endpoint,
/// speaking the HTTP version the client speaks, with a rule's default
/// timeouts and no retries (the caller, or the sidecar that called, retries).
pub struct OriginalDestination {
    destination: SocketAddr,
    /// The name logs and metrics give it (`inbound` or `passthrough`).
    name: Arc<str>,
    metrics: Arc<Metrics>,
    target: OnceCell<Arc<RuleTarget>>,
}

impl OriginalDestination {
    /// Forwards to `destination`, under `name` in logs and metrics.
    pub fn new(destination: SocketAddr, name: &str, metrics: Arc<Metrics>) -> Self {
        OriginalDestination {
            destination,
            name: Arc::from(name),
            metrics,
            target: OnceCell::new(),
        }
    }

    /// The name logs and metrics give it.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Sends `request` to the destination.
    pub fn forward(
        self: Arc<Self>,
        request: Request<ProxyBody>,
    ) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>> {
        let target: BoxFuture<Arc<RuleTarget>> = {
            let this = self.clone();
            let version = request.version();
            Box::pin(async move { this.target(version).await })
        };
        Box::pin(async move {
            let service = target.await.service.clone();
            // Boxed here so that the outer future's type does not name the
            // service's (which rustc cannot yet prove Send inside an async
            // block).
            let forwarded: BoxFuture<Result<Response<ProxyBody>, ProxyError>> =
                Box::pin(service.oneshot(request));
            forwarded.await
        })
    }

    /// The destination's service, made for requests of HTTP `version`.
    async fn target(&self, version: Version) -> Arc<RuleTarget> {
        self.target
            .get_or_init(|| async {
                let protocol = if version == Version::HTTP_2 {
                    UpstreamProtocol::Http2
                } else {
                    UpstreamProtocol::Http1
                };
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
