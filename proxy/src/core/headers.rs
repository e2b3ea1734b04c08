//! Header names and header rules at the proxy boundary: the names of the
//! proxy's own headers; hop-by-hop headers (RFC 9110 §7.6.1) never cross
//! the proxy in either direction; forwarded requests say who the client
//! was (`x-forwarded-for`, `x-forwarded-proto`); sidecars tell each other
//! the HTTP version of the app that made a request; every request has an
//! `x-request-id`; and reading `Retry-After`.

use http::header::{CONNECTION, Entry, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use infermesh_api::UpstreamProtocol;

use crate::core::body::ProxyBody;
use crate::core::context::RequestContext;

/// The header naming the reason of a proxy-made error response
/// (`x-infermesh-error: <reason>`), so a proxy timeout is never mistaken
/// for a model failure.
pub(crate) static ERROR_HEADER: HeaderName = HeaderName::from_static("x-infermesh-error");

/// The response header that reports a fan-out, one entry per branch in the
/// order they are configured, as a structured-field list (RFC 8941):
/// `llama;outcome=used;status=200;ms=41.2, qwen;outcome=deadline;ms=2000.0`.
pub(crate) static FANOUT_HEADER: HeaderName = HeaderName::from_static("x-infermesh-fanout");

/// The header that carries, between sidecars, the HTTP version the app
/// that made a request spoke, so that the sidecar in front of the app
/// that answers speaks that version to it (HTTP/1.1 to a uvicorn server,
/// HTTP/2 to a gRPC one) whatever version the two sidecars speak.
pub(crate) static ORIGINAL_PROTOCOL: HeaderName =
    HeaderName::from_static("x-infermesh-original-protocol");

/// `grpc-status`: a gRPC call's outcome, in the response's headers (a
/// call that fails at once) or its trailers. (The header names here are
/// `HeaderName`s, not text: a lookup by text parses the name first, and
/// several of these are looked up on every response.)
pub(crate) static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// `x-request-id`: the id a request is known by in every log and
/// response along its way (Envoy's and nginx's header; the OpenAI SDKs
/// show it as an error's `request_id`).
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether a `content-type` value (its bytes) names gRPC
/// (`application/grpc`, `application/grpc+proto`, ...).
pub(crate) fn is_grpc(content_type: &[u8]) -> bool {
    content_type.starts_with(b"application/grpc")
}

/// The longest client-sent request id kept; a longer one is replaced.
const MAX_REQUEST_ID_LEN: usize = 200;

/// The request's id: the client's `x-request-id` when it sent a usable one
/// (visible ASCII, at most 200 bytes), else a new random (version 4) UUID
/// set on the request, so that it goes upstream with every attempt.
pub(crate) fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    // One entry: the name is hashed once, whether the id is kept or set.
    match headers.entry(&X_REQUEST_ID) {
        Entry::Occupied(mut sent) => {
            let mut values = sent.iter();
            if let (Some(id), None) = (values.next(), values.next())
                && !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
            {
                return id.clone();
            }
            let id = new_request_id();
            sent.insert(id.clone());
            id
        }
        Entry::Vacant(unsent) => unsent.insert(new_request_id()).clone(),
    }
}

/// A random UUID (RFC 9562 version 4), as text. Made for every request
/// that comes without an id: written digit by digit, with no formatter.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut text = [b'-'; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        text[at] = HEX[usize::from(b >> 4)];
        text[at + 1] = HEX[usize::from(b & 0x0f)];
        at += 2;
    }
    HeaderValue::from_bytes(&text).expect("hex digits and dashes")
}

/// `x-forwarded-for`: the chain of client addresses.
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`: the scheme the client used.
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one connection, not the message. `te` is handled
/// apart, since `te: trailers` must reach gRPC servers.
static HOP_BY_HOP: [HeaderName; 3] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TRANSFER_ENCODING,
];

/// Whether `request` asks to switch protocols on its connection (an
/// HTTP/1.1 `Connection: upgrade` with an `Upgrade` header, as WebSocket
/// does).
pub(crate) fn is_upgrade<B>(request: &Request<B>) -> bool {
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
    // Most messages carry none: one pass over the names costs less than
    // the six lookups below (each hashes its name), on every request and
    // every response.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        // `Connection: TE` is how a client says it sent `TE` (RFC 9110
        // §10.1.4); `te: trailers` is handled below, not dropped here.
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
            .filter(|t| !t.eq_ignore_ascii_case("te"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(UPGRADE);
    } else {
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

/// Whether `strip_hop_by_hop` acts on a header named `name`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION || name == UPGRADE || name == TE || HOP_BY_HOP.contains(name)
}

/// Appends the client's IP (`client`, as a header value) to
/// `x-forwarded-for` and sets `x-forwarded-proto` to the scheme the client
/// used, overwriting what the client sent (it cannot be trusted at the
/// edge).
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, scheme: &'static str) {
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    let mut earlier = match headers.entry(&X_FORWARDED_FOR) {
        // The common case, a first hop: the connection's own value, no
        // formatting.
        Entry::Vacant(first) => {
            first.insert(client.clone());
            return;
        }
        Entry::Occupied(earlier) => earlier,
    };
    // Earlier hops may have sent several header lines; keep them all.
    let mut value = Vec::with_capacity(64);
    for existing in earlier.iter() {
        let existing = existing.as_bytes().trim_ascii();
        if !existing.is_empty() {
            value.extend_from_slice(existing);
            value.extend_from_slice(b", ");
        }
    }
    value.extend_from_slice(client.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        earlier.insert(value);
    }
}

/// Applies this module's rules to a request going upstream: hop-by-hop
/// headers out, forwarded headers in. A sidecar's capture listeners leave
/// the forwarded headers as the app sent them: a sidecar is not a hop the
/// app knows of (as Envoy sidecars and Linkerd do).
pub(crate) fn to_upstream(mut request: Request<ProxyBody>) -> Request<ProxyBody> {
    let upgrade = is_upgrade(&request);
    strip_hop_by_hop(request.headers_mut(), upgrade);
    if let Some(conn) = request
        .extensions()
        .get::<RequestContext>()
        .map(|context| context.connection().clone())
        && conn.capture.is_none()
    {
        add_forwarded(request.headers_mut(), &conn.client_ip, conn.scheme);
    }
    request
}

/// Applies this module's rules to a response going back to the client:
/// hop-by-hop headers out, unless the response switches protocols.
pub(crate) fn to_downstream(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), switching);
    response
}

/// Notes the version of `request` in [`ORIGINAL_PROTOCOL`], unless an
/// earlier hop already did.
pub(crate) fn note_original_protocol<B>(request: &mut Request<B>) {
    if !request.headers().contains_key(&ORIGINAL_PROTOCOL) {
        let version = if request.version() == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        };
        request
            .headers_mut()
            .insert(&ORIGINAL_PROTOCOL, HeaderValue::from_static(version));
    }
}

/// The version to speak to the app for `request`: the one its caller's app
/// spoke (taking the header off), or the one it came in.
pub(crate) fn take_original_protocol<B>(request: &mut Request<B>) -> UpstreamProtocol {
    match request.headers_mut().remove(&ORIGINAL_PROTOCOL) {
        Some(v) if v == "HTTP/2" => UpstreamProtocol::Http2,
        Some(_) => UpstreamProtocol::Http1,
        None if request.version() == Version::HTTP_2 => UpstreamProtocol::Http2,
        None => UpstreamProtocol::Http1,
    }
}

/// How long a response's `Retry-After` asks to wait: delay-seconds or an
/// HTTP date (RFC 9110 §10.2.3). A date in the past is no wait at all.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<std::time::Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(std::time::Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
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
    fn a_request_keeps_its_id_or_gets_a_new_one() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("req-123"));
        assert_eq!(ensure_request_id(&mut headers), "req-123");
        assert_eq!(headers["x-request-id"], "req-123");

        let mut headers = HeaderMap::new();
        let id = ensure_request_id(&mut headers);
        assert_eq!(headers["x-request-id"], id);
        let text = id.to_str().unwrap();
        let groups: Vec<usize> = text.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{text}");
        assert_eq!(&text[14..15], "4", "version 4: {text}");
        assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
        assert_ne!(ensure_request_id(&mut HeaderMap::new()), id, "random");

        // Unusable ids are replaced: empty, too long, spaces, two of them.
        for bad in [
            vec![HeaderValue::from_static("")],
            vec![HeaderValue::try_from("x".repeat(201)).unwrap()],
            vec![HeaderValue::from_static("two words")],
            vec![HeaderValue::from_static("a"), HeaderValue::from_static("b")],
        ] {
            let mut headers = HeaderMap::new();
            for value in &bad {
                headers.append("x-request-id", value.clone());
            }
            let id = ensure_request_id(&mut headers);
            assert_eq!(id.len(), 36, "{bad:?} replaced");
            assert_eq!(headers.get_all("x-request-id").iter().count(), 1);
        }
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
    fn each_hop_by_hop_header_alone_is_removed_and_others_are_kept() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
            "te",
        ] {
            let mut h = headers(&[(name, "x"), ("content-type", "text/plain")]);
            strip_hop_by_hop(&mut h, false);
            let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["content-type"], "{name}");
        }
        let mut end_to_end = headers(&[("content-type", "text/plain"), ("x-request-id", "1")]);
        let before = end_to_end.clone();
        strip_hop_by_hop(&mut end_to_end, false);
        assert_eq!(end_to_end, before);
    }

    #[test]
    fn keeps_te_trailers_for_grpc() {
        let mut h = headers(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[TE], "trailers");
    }

    #[test]
    fn keeps_te_trailers_when_connection_names_te() {
        let mut h = headers(&[("connection", "TE"), ("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[TE], "trailers");
        assert!(!h.contains_key(CONNECTION));
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
        add_forwarded(&mut h, &HeaderValue::from_static("127.0.0.1"), "http");
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.9, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        let mut several = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.0.0.1, 10.0.0.2"),
        ]);
        add_forwarded(&mut several, &HeaderValue::from_static("127.0.0.1"), "http");
        assert_eq!(several.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            several[&X_FORWARDED_FOR],
            "203.0.113.9, 10.0.0.1, 10.0.0.2, 127.0.0.1"
        );
        let mut fresh = HeaderMap::new();
        add_forwarded(&mut fresh, &HeaderValue::from_static("::1"), "http");
        assert_eq!(fresh[&X_FORWARDED_FOR], "::1");
    }

    #[test]
    fn a_usable_request_id_is_kept_and_any_other_replaced_by_one() {
        let mut sent = headers(&[("x-request-id", "trace-me-42")]);
        assert_eq!(ensure_request_id(&mut sent), "trace-me-42");
        assert_eq!(sent[&X_REQUEST_ID], "trace-me-42");
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        let unusable: [&[(&str, &str)]; 4] = [
            &[],
            &[("x-request-id", "")],
            &[("x-request-id", "has space")],
            &[("x-request-id", "one"), ("x-request-id", "two")],
        ];
        for sent in unusable
            .iter()
            .copied()
            .chain([&[("x-request-id", &*long)][..]])
        {
            let mut h = headers(sent);
            let id = ensure_request_id(&mut h);
            assert_eq!(id.len(), 36, "{sent:?}: a UUID");
            assert_eq!(id.as_bytes()[14], b'4', "{sent:?}: version 4");
            let set: Vec<_> = h.get_all(&X_REQUEST_ID).iter().collect();
            assert_eq!(set, [&id], "{sent:?}: the one id goes upstream");
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let seconds = headers(&[("retry-after", "7")]);
        assert_eq!(
            retry_after(&seconds),
            Some(std::time::Duration::from_secs(7))
        );
        let in_a_minute = std::time::SystemTime::now() + std::time::Duration::from_secs(61);
        let date = headers(&[("retry-after", &httpdate::fmt_http_date(in_a_minute))]);
        let wait = retry_after(&date).unwrap();
        assert!((59..=61).contains(&wait.as_secs()), "{wait:?}");
        let past = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(retry_after(&past), Some(std::time::Duration::ZERO));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
