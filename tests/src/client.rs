//! HTTP/1.1 and HTTP/2 clients for the end-to-end tests.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooling client speaking one HTTP version.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client speaking HTTP/1.1.
pub fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client speaking HTTP/2 over cleartext with prior knowledge.
pub fn http2() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Version the proxy answered in.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The body, read to its end.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `request` and reads the whole response.
pub async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Result<Reply, String> {
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// `GET url`.
pub async fn get(client: &HttpClient, url: &str) -> Reply {
    let request = Request::get(url)
        .body(Full::default())
        .expect("valid request");
    send(client, request)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Whether connecting to `address` is refused within `timeout` (a listener
/// closing as it drains), trying every 10 ms.
pub async fn refused_within(address: std::net::SocketAddr, timeout: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(address).await.is_err() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

/// `GET url`, returning as soon as the response head arrives, with the body
/// still streaming.
pub async fn open(client: &HttpClient, url: &str) -> http::Response<hyper::body::Incoming> {
    let request = Request::get(url)
        .body(Full::default())
        .expect("valid request");
    client
        .request(request)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"))
}

/// The metrics page of the health server at `health`.
pub async fn metrics(health: std::net::SocketAddr) -> String {
    let reply = get(&http1(), &format!("http://{health}/metrics")).await;
    assert_eq!(reply.status, 200);
    String::from_utf8(reply.body.to_vec()).expect("metrics are text")
}

/// The value of one series (name and labels, exactly as exposed) on a
/// metrics page.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (at most 5 s, polling every 10 ms) until `series` on the metrics
/// page of `health` satisfies `done`, and returns its value; panics with
/// `what` otherwise.
pub async fn wait_for_metric(
    health: std::net::SocketAddr,
    series: &str,
    done: impl Fn(f64) -> bool,
    what: &str,
) -> f64 {
    for _ in 0..500 {
        if let Some(value) = metric_value(&metrics(health).await, series)
            && done(value)
        {
            return value;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{what}: {series} never got there");
}

/// Clients sending requests back to back until stopped: the load that
/// reload, failover and rotation tests run through the proxy.
pub struct SteadyLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
}

impl SteadyLoad {
    /// One task per client in `clients`, each sending `request()` again as
    /// soon as the previous answer is read. A 200 is a success; any other
    /// status or a transport error is a failure.
    pub fn start<F>(clients: Vec<HttpClient>, request: F) -> SteadyLoad
    where
        F: Fn() -> Request<Full<Bytes>> + Clone + Send + 'static,
    {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = clients
            .into_iter()
            .map(|client| {
                let (stop, answered, request) = (stop.clone(), answered.clone(), request.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failures) = (0, Vec::new());
                    while !stop.load(Ordering::SeqCst) {
                        match send(&client, request()).await {
                            Ok(reply) if reply.status == StatusCode::OK => ok += 1,
                            Ok(reply) => {
                                failures.push(format!("{} {:?}", reply.status, reply.body))
                            }
                            Err(e) => failures.push(e),
                        }
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    (ok, failures)
                })
            })
            .collect();
        SteadyLoad {
            stop,
            answered,
            tasks,
        }
    }

    /// Waits until `n` more requests have been answered.
    pub async fn progress(&self, n: usize) {
        use std::sync::atomic::Ordering;
        let target = self.answered.load(Ordering::SeqCst) + n;
        while self.answered.load(Ordering::SeqCst) < target {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Stops every client; returns the successes and the failures.
    pub async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (mut ok, mut failures) = (0, Vec::new());
        for task in self.tasks {
            let (o, f) = task.await.expect("a load task does not panic");
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}
