//! The proxy at the edge, tried as an attacker would: requests written
//! byte for byte on a raw TCP connection (an HTTP client library would
//! tidy them up first). Every spelling of a denied path is denied, an
//! allow-list cannot be escaped with dot segments or escaped slashes, the
//! backend gets the normalised path the route matched, ambiguous hosts
//! get 400 and `CONNECT` gets 405, none of them reaching the backend.

use std::net::SocketAddr;

use infermesh_tests::backend::{MockBackend, Protocol};
use infermesh_tests::process::{Gateway, backend, config, listener, route_by_prefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as it came off the wire.
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Sends `request` (the request line and headers, without the blank line
/// that ends them) on a connection of its own, and reads the whole
/// response (the connection is closed after it).
async fn raw(listener: SocketAddr, request: &str) -> Raw {
    let mut stream = TcpStream::connect(listener).await.expect("connect");
    let text = format!("{request}\r\nConnection: close\r\n\r\n");
    stream.write_all(text.as_bytes()).await.expect("send");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Raw {
        status,
        head: head.to_owned(),
        // The proxy's error bodies and the echo backend's answers are small
        // and sent whole; a chunked one is unwrapped from its one chunk.
        body: match body.split_once("\r\n") {
            Some((size, rest)) if usize::from_str_radix(size, 16).is_ok() => {
                rest.split("\r\n").next().unwrap_or_default().to_owned()
            }
            _ => body.to_owned(),
        },
    }
}

fn policy(name: &str, action: &str, prefix: &str) -> String {
    format!(
        "kind: AuthorizationPolicy\nmetadata: {{ name: {name} }}\nspec: {{ action: {action}, rules: [{{ to: [{{ pathPrefixes: [{prefix}] }}] }}] }}"
    )
}

/// Every way of writing `/admin` that a backend which normalises paths
/// (nginx) reads as `/admin`.
const ADMIN_SPELLINGS: [&str; 9] = [
    "/admin",
    "/./admin",
    "//admin",
    "/%61dmin",
    "/v1/../admin",
    "/v1/%2e%2e/admin",
    "/v1/..%2fadmin",
    "/admin%2fsecret",
    "/v1//../admin",
];

/// A gateway whose one route sends everything to an echo model, guarded
/// by `policy`; every spelling of `/admin` is denied there.
async fn guarded(policy: &str) -> (MockBackend, Gateway, SocketAddr) {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("public", "http"),
        &backend("model", "http1", &[model.addr]),
        &route_by_prefix(&[("/", "model")]),
        policy,
    ]));
    let public = gateway.listener("public");
    for path in ADMIN_SPELLINGS {
        let reply = raw(public, &format!("GET {path} HTTP/1.1\r\nHost: models.test")).await;
        assert_eq!(reply.status, 403, "{path}: {}", reply.body);
        assert_eq!(
            reply.header("x-infermesh-error"),
            Some("unauthorized"),
            "{path}"
        );
    }
    assert_eq!(model.requests(), 0, "no spelling reached the model");
    (model, gateway, public)
}

#[tokio::test]
async fn every_spelling_of_a_denied_path_is_denied() {
    let (_model, _gateway, public) = guarded(&policy("no-admin", "deny", "/admin")).await;
    let allowed = raw(public, "GET /v1/models HTTP/1.1\r\nHost: models.test").await;
    assert_eq!(allowed.status, 200);
}

#[tokio::test]
async fn an_allow_list_cannot_be_escaped() {
    let (_model, _gateway, public) = guarded(&policy("only-v1", "allow", "/v1")).await;
    let allowed = raw(
        public,
        "GET /v1/./chat//completions HTTP/1.1\r\nHost: models.test",
    )
    .await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.json()["path"], "/v1/chat/completions");
}

#[tokio::test]
async fn the_backend_gets_the_normalised_path_the_route_matched() {
    let v1 = MockBackend::echo("v1", Protocol::Http1).await;
    let admin = MockBackend::echo("admin", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("public", "http"),
        &backend("v1", "http1", &[v1.addr]),
        &backend("admin", "http1", &[admin.addr]),
        &route_by_prefix(&[("/v1", "v1"), ("/admin", "admin")]),
    ]));
    let public = gateway.listener("public");
    let reply = raw(
        public,
        "GET /v1/../admin/%7Eusers?q=%2e%2e HTTP/1.1\r\nHost: models.test",
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = reply.json();
    assert_eq!(seen["backend"], "admin", "routed by the normalised path");
    assert_eq!(
        seen["path"], "/admin/~users?q=%2e%2e",
        "the query is left as it is"
    );
    assert_eq!(v1.requests(), 0);
}

#[tokio::test]
async fn escaped_slashes_are_refused_where_the_listener_says_so() {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        "kind: Listener\nmetadata: { name: strict }\nspec: { address: 127.0.0.1:0, escapedSlashes: reject }",
        "kind: Listener\nmetadata: { name: keeping }\nspec: { address: 127.0.0.1:0, escapedSlashes: keep }",
        &backend("model", "http1", &[model.addr]),
        &route_by_prefix(&[("/", "model")]),
    ]));
    let refused = raw(
        gateway.listener("strict"),
        "GET /models/org%2Fname/infer HTTP/1.1\r\nHost: models.test",
    )
    .await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.header("x-infermesh-error"), Some("invalid_path"));
    assert_eq!(refused.json()["reason"], "invalid_path");
    let kept = raw(
        gateway.listener("keeping"),
        "GET /models/org%2fname/./infer HTTP/1.1\r\nHost: models.test",
    )
    .await;
    assert_eq!(kept.status, 200);
    assert_eq!(kept.json()["path"], "/models/org%2Fname/infer");
    let broken = raw(
        gateway.listener("keeping"),
        "GET /models/%zz HTTP/1.1\r\nHost: models.test",
    )
    .await;
    assert_eq!(broken.status, 400, "a % without two hex digits");
    assert_eq!(model.requests(), 1);
}

#[tokio::test]
async fn ambiguous_hosts_get_400_and_connect_405() {
    let model = MockBackend::echo("model", Protocol::Http1).await;
    let gateway = Gateway::start(&config(&[
        &listener("public", "http"),
        &backend("model", "http1", &[model.addr]),
        &route_by_prefix(&[("/", "model")]),
    ]));
    let public = gateway.listener("public");
    for request in [
        "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test",
        "GET / HTTP/1.1\r\nUser-Agent: no-host",
        "GET http://user@a.test/ HTTP/1.1\r\nHost: a.test",
        "GET / HTTP/1.1\r\nHost: a.test/admin",
        "GET / HTTP/1.1\r\nHost: user@a.test",
    ] {
        let reply = raw(public, request).await;
        assert_eq!(reply.status, 400, "{request:?}: {}", reply.body);
        assert_eq!(
            reply.header("x-infermesh-error"),
            Some("invalid_host"),
            "{request:?}"
        );
    }
    let connect = raw(public, "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443").await;
    assert_eq!(connect.status, 405);
    assert_eq!(
        connect.header("x-infermesh-error"),
        Some("method_not_allowed")
    );
    assert!(
        connect
            .header("allow")
            .is_some_and(|allow| !allow.contains("CONNECT"))
    );
    assert_eq!(model.requests(), 0, "none of them reached the model");

    // HTTP/1.0 needs no Host; an absolute-form target names its own.
    let old = raw(public, "GET /v1/models HTTP/1.0").await;
    assert_eq!(old.status, 200);
    let absolute = raw(
        public,
        "GET http://a.test/v1/models HTTP/1.1\r\nHost: a.test",
    )
    .await;
    assert_eq!(absolute.status, 200);
    assert_eq!(absolute.json()["headers"]["host"], "a.test");
}

#[tokio::test]
async fn a_refusal_reaches_a_client_still_uploading() {
    // The proxy answers before reading the body; closed with the body
    // unread, the socket would reset and the answer could be lost.
    let (model, _gateway, public) = guarded(&policy("no-admin", "deny", "/admin")).await;
    for _ in 0..3 {
        let mut stream = TcpStream::connect(public).await.expect("connect");
        let body = vec![b'x'; 4 << 20];
        let head = format!(
            "POST /admin/upload HTTP/1.1\r\nHost: models.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("send");
        // The whole upload, as a client that reads only afterwards sends
        // it: the proxy drains it rather than reset the connection under it.
        let sent = stream.write_all(&body).await;
        assert!(sent.is_ok(), "the upload was cut: {sent:?}");
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        let head = answer.lines().next().unwrap_or_default();
        assert!(
            head.starts_with("HTTP/1.1 403"),
            "upload {sent:?}, read {read:?}: {head:?}"
        );
    }
    assert_eq!(model.requests(), 0);
}
