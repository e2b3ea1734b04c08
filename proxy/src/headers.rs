//! Header rules at the proxy boundary: hop-by-hop headers (RFC 9110
//! §7.6.1) never cross the proxy in either direction, and forwarded requests
//! say who the client was (`x-forwarded-for`, `x-forwarded-proto`).

use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{CONNECTION, HeaderName, HeaderValue, TE, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use tower::{Layer, Service};

use crate::body::BoxFuture;
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::listener::ConnectionInfo;

/// `x-forwarded-for`: the chain of client addresses.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`: the scheme the client used.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one connection, not the message. `te` is handled
/// apart, since `te: trailers` must reach gRPC servers.
const HOP_BY_HOP: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Whether `request` asks to switch protocols on its connection (an
/// HTTP/1.1 `Connection: upgrade` with an `Upgrade` header, as WebSocket
/// does).
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() <= Version::HTTP_11
        && request.method() != Method::CONNECT
        && request.headers().contains_key(UPGRADE)
        && connection_tokens(request.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers: the fixed list, and every header the
/// `Connection` header names. With `keep_upgrade`, `Upgrade` and
/// `Connection: upgrade` survive, so a protocol switch can be forwarded.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && name == "upgrade" {
            continue;
        }
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // `te` may only say `trailers` past a proxy (and in HTTP/2 at all).
    if let Some(te) = headers.get(TE) {
        let wants_trailers = te
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false);
        if wants_trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(TE);
        }
    }
}

/// Appends the client's address to `x-forwarded-for` and sets
/// `x-forwarded-proto` to the scheme the client used, overwriting what the
/// client sent (it cannot be trusted at the edge).
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, scheme: &'static str) {
    let client = client.to_string();
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {client}"),
        _ => client,
    };
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
}

/// Applies the header rules of this module to requests going upstream and
/// responses coming back.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardHeadersLayer;

impl<S> Layer<S> for ForwardHeadersLayer {
    type Service = ForwardHeaders<S>;
    fn layer(&self, inner: S) -> ForwardHeaders<S> {
        ForwardHeaders { inner }
    }
}

/// See [`ForwardHeadersLayer`].
#[derive(Clone, Debug)]
pub struct ForwardHeaders<S> {
    inner: S,
}

impl<S> Service<Request<ProxyBody>> for ForwardHeaders<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
        let upgrade = is_upgrade(&request);
        strip_hop_by_hop(request.headers_mut(), upgrade);
        if let Some(conn) = request.extensions().get::<Arc<ConnectionInfo>>().cloned() {
            add_forwarded(request.headers_mut(), conn.client.ip(), conn.scheme);
        }
        let response: BoxFuture<Result<Response<ProxyBody>, ProxyError>> =
            Box::pin(self.inner.call(request));
        Box::pin(async move {
            let mut response = response.await?;
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            strip_hop_by_hop(response.headers_mut(), switching);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn removes_fixed_and_connection_listed_headers() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Session"),
            ("keep-alive", "timeout=5"),
            ("x-session", "abc"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn keeps_te_trailers_for_grpc() {
        let mut h = headers(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[TE], "trailers");
    }

    #[test]
    fn keeps_upgrade_when_forwarding_a_protocol_switch() {
        let mut h = headers(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
    }

    #[test]
    fn detects_upgrade_requests() {
        let req = Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let plain = Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&plain));
    }

    #[test]
    fn forwarded_for_appends_and_proto_overwrites() {
        let mut h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), "http");
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.9, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        let mut fresh = HeaderMap::new();
        add_forwarded(&mut fresh, "::1".parse().unwrap(), "http");
        assert_eq!(fresh[&X_FORWARDED_FOR], "::1");
    }
}
