//! A fake Kubernetes API server, for the control plane's `--kubernetes`
//! tests (no real API server runs in CI). It speaks plain HTTP on
//! loopback and serves list and watch as the real one does: objects per
//! collection, one resourceVersion counter for all; `LIST` answers the
//! `...List` kind with `metadata.resourceVersion`; `?watch=true` streams
//! newline-delimited `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK", ...}`
//! events after the version asked for, or, for a version older than what
//! it still keeps, one `ERROR` event with the 410 `Expired` Status, so
//! that the client lists again. Besides: `POST` of TokenReviews, answered
//! as the test says; `PATCH` (strategic merge, webhooks merged by name)
//! and `fieldSelector=metadata.name=...` for the webhook configuration; a
//! collection can be made absent (404), as a CRD not installed.
//!
//! A test writes objects as JSON of real objects ([`KubeApi::apply`]),
//! and can stall every watch and list, change things, and let the clients
//! back in with their history expired ([`KubeApi::stall`],
//! [`KubeApi::expire_and_resume`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// The collections the control plane lists and watches, cluster-wide.
pub mod collections {
    /// core/v1 Services.
    pub const SERVICES: &str = "/api/v1/services";
    /// core/v1 Pods.
    pub const PODS: &str = "/api/v1/pods";
    /// discovery.k8s.io/v1 EndpointSlices.
    pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
    /// gateway.networking.k8s.io/v1 HTTPRoutes.
    pub const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
    /// admissionregistration.k8s.io/v1 MutatingWebhookConfigurations.
    pub const MUTATING_WEBHOOKS: &str =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
    /// authentication.k8s.io/v1 TokenReviews (create only).
    pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
    /// infermesh.io/v1alpha1 Listeners.
    pub const LISTENERS: &str = "/apis/infermesh.io/v1alpha1/listeners";
    /// infermesh.io/v1alpha1 Backends.
    pub const BACKENDS: &str = "/apis/infermesh.io/v1alpha1/backends";
    /// infermesh.io/v1alpha1 Routes.
    pub const ROUTES: &str = "/apis/infermesh.io/v1alpha1/routes";
    /// infermesh.io/v1alpha1 AuthorizationPolicies.
    pub const AUTHORIZATION_POLICIES: &str = "/apis/infermesh.io/v1alpha1/authorizationpolicies";
    /// infermesh.io/v1alpha1 Sidecars.
    pub const SIDECARS: &str = "/apis/infermesh.io/v1alpha1/sidecars";

    /// Every collection served, with the kind of its items.
    pub const ALL: [(&str, &str); 11] = [
        (SERVICES, "Service"),
        (PODS, "Pod"),
        (ENDPOINT_SLICES, "EndpointSlice"),
        (HTTP_ROUTES, "HTTPRoute"),
        (MUTATING_WEBHOOKS, "MutatingWebhookConfiguration"),
        (LISTENERS, "Listener"),
        (BACKENDS, "Backend"),
        (ROUTES, "Route"),
        (AUTHORIZATION_POLICIES, "AuthorizationPolicy"),
        (SIDECARS, "Sidecar"),
        (TOKEN_REVIEWS, "TokenReview"),
    ];
}

/// One collection's objects, and the events it still remembers.
#[derive(Default)]
struct Collection {
    kind: String,
    objects: BTreeMap<(String, String), Value>,
    /// `(resourceVersion, type, object)`, oldest first.
    events: Vec<(u64, &'static str, Value)>,
    /// Lists answered.
    lists: usize,
}

#[derive(Default)]
struct Store {
    version: u64,
    /// Watches from a version below this are answered 410 Gone: the
    /// events before it are forgotten.
    expired_below: u64,
    collections: HashMap<String, Collection>,
    absent: HashSet<String>,
    token_reviews: HashMap<String, Value>,
    reviews_asked: Vec<Value>,
    /// Every request, `METHOD path?query`.
    requests: Vec<String>,
}

/// The fake API server; it stops when dropped.
pub struct KubeApi {
    /// Where it listens (plain HTTP).
    pub address: SocketAddr,
    store: Arc<Mutex<Store>>,
    /// Bumped at each change: watches wake on it.
    changed: watch::Sender<u64>,
    /// While true, lists and watches wait.
    stalled: watch::Sender<bool>,
    /// Counts the stalls: a watch opened before the last one has ended.
    stalls: watch::Sender<u64>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl KubeApi {
    /// Starts it on an ephemeral loopback port, every collection empty.
    pub async fn start() -> KubeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let address = listener.local_addr().expect("its address");
        let mut store = Store::default();
        for (path, kind) in collections::ALL {
            store.collections.insert(
                path.to_owned(),
                Collection {
                    kind: kind.to_owned(),
                    ..Collection::default()
                },
            );
        }
        let store = Arc::new(Mutex::new(store));
        let (changed, _) = watch::channel(0);
        let (stalled, _) = watch::channel(false);
        let (stalls, _) = watch::channel(0);
        let shared = Shared {
            store: store.clone(),
            changed: changed.clone(),
            stalled: stalled.clone(),
            stalls: stalls.clone(),
        };
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.handle(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        KubeApi {
            address,
            store,
            changed,
            stalled,
            stalls,
            server,
        }
    }

    /// Writes a kubeconfig for it in `dir`; returns its path (for
    /// `KUBECONFIG`).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster: {{ server: \"http://{}\" }}
users:
  - name: fake
    user: {{ token: fake-api-server }}
contexts:
  - name: fake
    context: {{ cluster: fake, user: fake }}
current-context: fake
",
            self.address
        );
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    /// Creates or replaces `object` in `collection` (an `ADDED` or
    /// `MODIFIED` event); its `metadata.resourceVersion` is set.
    pub fn apply(&self, collection: &str, object: Value) {
        let mut store = self.store.lock().expect("store lock");
        store.put(collection, object);
        let version = store.version;
        drop(store);
        self.changed.send_replace(version);
    }

    /// Deletes an object (a `DELETED` event).
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        let mut store = self.store.lock().expect("store lock");
        store.version += 1;
        let version = store.version;
        let items = store.collection(collection);
        if let Some(mut object) = items
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))
        {
            object["metadata"]["resourceVersion"] = Value::from(version.to_string());
            items.events.push((version, "DELETED", object));
        }
        drop(store);
        self.changed.send_replace(version);
    }

    /// The object, as stored.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let mut store = self.store.lock().expect("store lock");
        store
            .collection(collection)
            .objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Makes `collection` answer 404, as a resource whose CRD is not
    /// installed (or serves it again).
    pub fn set_absent(&self, collection: &str, absent: bool) {
        let mut store = self.store.lock().expect("store lock");
        if absent {
            store.absent.insert(collection.to_owned());
        } else {
            store.absent.remove(collection);
        }
    }

    /// How a TokenReview of `token` is answered: its `status`. A token
    /// without one is answered `authenticated: false`.
    pub fn token_review(&self, token: &str, status: Value) {
        let mut store = self.store.lock().expect("store lock");
        store.token_reviews.insert(token.to_owned(), status);
    }

    /// Every TokenReview asked, as sent.
    pub fn reviews_asked(&self) -> Vec<Value> {
        self.store.lock().expect("store lock").reviews_asked.clone()
    }

    /// Every request so far, `METHOD path?query`, for a failing test to
    /// show.
    pub fn requests(&self) -> Vec<String> {
        self.store.lock().expect("store lock").requests.clone()
    }

    /// How many lists of `collection` were answered.
    pub fn lists(&self, collection: &str) -> usize {
        self.store
            .lock()
            .expect("store lock")
            .collection(collection)
            .lists
    }

    /// Ends every open watch and holds every list and watch asked from
    /// now on, until [`KubeApi::expire_and_resume`].
    pub fn stall(&self) {
        self.stalled.send_replace(true);
        self.stalls.send_modify(|n| *n += 1);
    }

    /// Forgets every event so far, as the real server forgets old
    /// versions (its etcd compacted), and lets the held lists and watches
    /// in: a watch from a version older than now gets 410 Gone.
    pub fn expire_and_resume(&self) {
        let mut store = self.store.lock().expect("store lock");
        store.expired_below = store.version;
        for collection in store.collections.values_mut() {
            collection.events.clear();
        }
        drop(store);
        self.stalled.send_replace(false);
    }
}

impl Store {
    fn collection(&mut self, path: &str) -> &mut Collection {
        self.collections.entry(path.to_owned()).or_default()
    }

    fn put(&mut self, collection: &str, mut object: Value) {
        self.version += 1;
        let version = self.version;
        object["metadata"]["resourceVersion"] = Value::from(version.to_string());
        let key = (
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            object["metadata"]["name"]
                .as_str()
                .expect("an object has metadata.name")
                .to_owned(),
        );
        let items = self.collection(collection);
        let kind = if items.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        items.objects.insert(key, object.clone());
        items.events.push((version, kind, object));
    }
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    changed: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
    stalls: watch::Sender<u64>,
}

type Answer = Response<WatchBody>;

fn status(code: StatusCode, reason: &str, message: &str) -> Answer {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Answer {
    let mut response = Response::new(WatchBody::once(body.to_string()));
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

impl Shared {
    async fn handle(&self, request: Request<Incoming>) -> Answer {
        let path = request.uri().path().to_owned();
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .map(|q| {
                form_pairs(q)
                    .into_iter()
                    .collect::<HashMap<String, String>>()
            })
            .unwrap_or_default();
        let (collection, name) = {
            let mut store = self.store.lock().expect("store lock");
            store
                .requests
                .push(format!("{} {}", request.method(), request.uri()));
            let found = store
                .collections
                .keys()
                .filter(|c| path == **c || path.starts_with(&format!("{c}/")))
                .max_by_key(|c| c.len())
                .cloned();
            match found {
                Some(c) => {
                    let name = path[c.len()..].trim_start_matches('/').to_owned();
                    if store.absent.contains(&c) {
                        return status(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            "the server could not find the requested resource",
                        );
                    }
                    (c, name)
                }
                None => {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        "the server could not find the requested resource",
                    );
                }
            }
        };
        let method = request.method().clone();
        let body = crate::backend::body_bytes(request.into_body()).await;
        match (method, name.is_empty()) {
            (Method::GET, true) => {
                let mut stalled = self.stalled.subscribe();
                let _ = stalled.wait_for(|s| !s).await;
                let selected = query
                    .get("fieldSelector")
                    .and_then(|s| s.strip_prefix("metadata.name="))
                    .map(str::to_owned);
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                    let from: u64 = query
                        .get("resourceVersion")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    self.watch(collection, from, selected)
                } else {
                    self.list(&collection, selected.as_deref())
                }
            }
            (Method::POST, true) if collection == collections::TOKEN_REVIEWS => self.review(&body),
            (Method::PATCH, false) => self.patch(&collection, &name, &body),
            (method, _) => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!("the fake API server does not serve {method} {path}"),
            ),
        }
    }

    fn list(&self, collection: &str, selected: Option<&str>) -> Answer {
        let mut store = self.store.lock().expect("store lock");
        let version = store.version;
        let items = store.collection(collection);
        items.lists += 1;
        let objects: Vec<Value> = items
            .objects
            .iter()
            .filter(|((_, name), _)| selected.is_none_or(|s| s == name))
            .map(|(_, o)| o.clone())
            .collect();
        let kind = format!("{}List", items.kind);
        respond(
            StatusCode::OK,
            &json!({
                "kind": kind,
                "apiVersion": "v1",
                "metadata": { "resourceVersion": version.to_string() },
                "items": objects,
            }),
        )
    }

    fn watch(&self, collection: String, from: u64, selected: Option<String>) -> Answer {
        let (sender, receiver) = mpsc::channel(64);
        let store = self.store.clone();
        let mut changed = self.changed.subscribe();
        let mut stalls = self.stalls.subscribe();
        let opened = *stalls.borrow_and_update();
        tokio::spawn(async move {
            let line = |event: Value| Bytes::from(format!("{event}\n"));
            let (expired, kind) = {
                let mut store = store.lock().expect("store lock");
                let expired = from < store.expired_below;
                (expired, store.collection(&collection).kind.clone())
            };
            if expired {
                let gone = json!({ "type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure",
                    "message": format!("too old resource version: {from}"),
                    "reason": "Expired", "code": 410,
                }});
                let _ = sender.send(line(gone)).await;
                return;
            }
            let mut sent = from;
            // A bookmark first, as a server with allowWatchBookmarks may.
            let bookmark = json!({ "type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": "v1",
                "metadata": { "resourceVersion": from.to_string() },
            }});
            if sender.send(line(bookmark)).await.is_err() {
                return;
            }
            loop {
                // A stall ends the watch before it sends anything more.
                if *stalls.borrow() != opened {
                    return;
                }
                let events: Vec<Value> = {
                    let mut store = store.lock().expect("store lock");
                    let after = sent;
                    let items = store.collection(&collection);
                    if let Some((last, _, _)) = items.events.last() {
                        sent = sent.max(*last);
                    }
                    items
                        .events
                        .iter()
                        .filter(|(version, _, object)| {
                            *version > after
                                && selected
                                    .as_deref()
                                    .is_none_or(|s| object["metadata"]["name"].as_str() == Some(s))
                        })
                        .map(|(_, kind, object)| json!({ "type": kind, "object": object }))
                        .collect()
                };
                for event in events {
                    if sender.send(line(event)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    alive = changed.changed() => if alive.is_err() { return },
                    _ = stalls.changed() => return,
                }
            }
        });
        let mut response = Response::new(WatchBody { receiver });
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }

    fn review(&self, body: &[u8]) -> Answer {
        let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
        };
        let mut store = self.store.lock().expect("store lock");
        store.reviews_asked.push(review.clone());
        let token = review["spec"]["token"].as_str().unwrap_or("");
        review["status"] = store.token_reviews.get(token).cloned().unwrap_or_else(|| {
            json!({ "authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]" })
        });
        review["metadata"] = json!({ "creationTimestamp": null });
        respond(StatusCode::CREATED, &review)
    }

    /// A strategic merge patch of the shape the control plane sends a
    /// webhook configuration: `webhooks` merged by `name`, objects merged
    /// key by key.
    fn patch(&self, collection: &str, name: &str, body: &[u8]) -> Answer {
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
        };
        let mut store = self.store.lock().expect("store lock");
        let Some(mut object) = store
            .collection(collection)
            .objects
            .get(&(String::new(), name.to_owned()))
            .cloned()
        else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{name} not found"),
            );
        };
        merge(&mut object, &patch);
        store.put(collection, object.clone());
        let version = store.version;
        drop(store);
        self.changed.send_replace(version);
        respond(StatusCode::OK, &object)
    }
}

/// Merges `patch` into `target`: objects key by key, lists of objects
/// with a `name` by name, anything else replaced.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (Value::Array(target), Value::Array(patch))
            if patch.iter().all(|p| p.get("name").is_some()) =>
        {
            for item in patch {
                match target
                    .iter_mut()
                    .find(|t| t.get("name") == item.get("name"))
                {
                    Some(existing) => merge(existing, item),
                    None => target.push(item.clone()),
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Percent-decoding of a query component.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body of chunks sent as they come: a watch's events, or one
/// whole answer.
pub struct WatchBody {
    receiver: mpsc::Receiver<Bytes>,
}

impl WatchBody {
    fn once(text: String) -> WatchBody {
        let (sender, receiver) = mpsc::channel(1);
        sender
            .try_send(Bytes::from(text))
            .expect("room for one chunk");
        WatchBody { receiver }
    }
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.receiver
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}
