//! Clients that misbehave, run beside the well-behaved load: slowloris
//! (a request's headers a byte at a time), silent connections, HTTP/2
//! delayed resets (a request, then RST_STREAM 20 ms later, over and over)
//! and HTTP/2 clients that never read (a stream window of 0 under long
//! streamed completions). Each reconnects when the proxy closes its
//! connection, until the hostile phase ends, and counts what the proxy did
//! to it.
//!
//! Their requests carry `?soak=<kind>` in the path, so that the proxy's
//! access log tells them from the well-behaved ones.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How many of each hostile client run at once.
#[derive(Clone, Copy, Debug)]
pub struct Crowd {
    /// Slowloris connections.
    pub slowloris: usize,
    /// Connections that send nothing.
    pub silent: usize,
    /// HTTP/2 connections resetting their streams.
    pub resetters: usize,
    /// HTTP/2 connections that never read.
    pub non_readers: usize,
    /// Streams each non-reader opens.
    pub streams_per_non_reader: usize,
}

impl Default for Crowd {
    fn default() -> Self {
        Crowd {
            slowloris: 50,
            silent: 20,
            resetters: 2,
            non_readers: 4,
            streams_per_non_reader: 4,
        }
    }
}

/// What one kind of hostile client saw.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    closed_by_proxy: AtomicU64,
    streams: AtomicU64,
    longest_ms: AtomicU64,
    total_ms: AtomicU64,
}

impl Counters {
    fn opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// The proxy closed a connection that lived since `opened`.
    fn closed(&self, opened: Instant) {
        let ms = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.closed_by_proxy.fetch_add(1, Ordering::Relaxed);
        self.longest_ms.fetch_max(ms, Ordering::Relaxed);
        self.total_ms.fetch_add(ms, Ordering::Relaxed);
    }

    fn report(&self) -> HostileReport {
        let closed = self.closed_by_proxy.load(Ordering::Relaxed);
        HostileReport {
            connections: self.connections.load(Ordering::Relaxed),
            closed_by_proxy: closed,
            streams: self.streams.load(Ordering::Relaxed),
            longest_seconds: self.longest_ms.load(Ordering::Relaxed) as f64 / 1e3,
            mean_seconds: if closed == 0 {
                0.0
            } else {
                self.total_ms.load(Ordering::Relaxed) as f64 / closed as f64 / 1e3
            },
        }
    }
}

/// What the proxy did to one kind of hostile client.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostileReport {
    /// Connections opened.
    pub connections: u64,
    /// Of those, closed by the proxy (the rest were open when the hostile
    /// phase ended).
    pub closed_by_proxy: u64,
    /// Streams opened (reset, or left unread).
    pub streams: u64,
    /// The longest a connection lived before the proxy closed it.
    pub longest_seconds: f64,
    /// The mean of those lifetimes.
    pub mean_seconds: f64,
}

/// What the proxy did to each kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostileReports {
    /// Request headers a byte every 500 ms.
    pub slowloris: HostileReport,
    /// Connections that send nothing.
    pub silent: HostileReport,
    /// HTTP/2 streams reset 20 ms after their request.
    pub delayed_resets: HostileReport,
    /// HTTP/2 streams with a window of 0.
    pub non_readers: HostileReport,
}

/// Every hostile client's counters.
#[derive(Debug, Default)]
pub struct Hostiles {
    slowloris: Counters,
    silent: Counters,
    resets: Counters,
    non_readers: Counters,
}

impl Hostiles {
    /// Runs `crowd` against `addr` until `end`, and waits for them all.
    pub async fn run(self: &Arc<Self>, addr: SocketAddr, crowd: Crowd, end: Instant) {
        let mut tasks = JoinSet::new();
        for _ in 0..crowd.slowloris {
            let me = self.clone();
            tasks.spawn(async move { me.slowloris(addr, end).await });
        }
        for _ in 0..crowd.silent {
            let me = self.clone();
            tasks.spawn(async move { me.silent(addr, end).await });
        }
        for _ in 0..crowd.resetters {
            let me = self.clone();
            tasks.spawn(async move { me.delayed_resets(addr, end).await });
        }
        for _ in 0..crowd.non_readers {
            let me = self.clone();
            let streams = crowd.streams_per_non_reader;
            tasks.spawn(async move { me.non_reader(addr, end, streams).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// What they saw.
    pub fn report(&self) -> HostileReports {
        HostileReports {
            slowloris: self.slowloris.report(),
            silent: self.silent.report(),
            delayed_resets: self.resets.report(),
            non_readers: self.non_readers.report(),
        }
    }

    /// Sends a request line at once, then one byte of a header every
    /// 500 ms, never finishing the headers.
    async fn slowloris(&self, addr: SocketAddr, end: Instant) {
        while Instant::now() < end {
            let Some(mut stream) = connect(addr, end).await else {
                continue;
            };
            self.slowloris.opened();
            let opened = Instant::now();
            let trickle = async {
                let head = b"POST /v1/chat/completions?soak=slowloris HTTP/1.1\r\nhost: soak\r\nx-soak-slow: ";
                if stream.write_all(head).await.is_err() {
                    return;
                }
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                tick.tick().await;
                let mut buf = [0u8; 1024];
                loop {
                    tokio::select! {
                        read = stream.read(&mut buf) => match read {
                            Ok(0) | Err(_) => return,
                            // An answer (408, say): read on to the close.
                            Ok(_) => {}
                        },
                        _ = tick.tick() => {
                            if stream.write_all(b"a").await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            if tokio::time::timeout_at(end, trickle).await.is_ok() {
                self.slowloris.closed(opened);
            }
        }
    }

    /// Connects and says nothing.
    async fn silent(&self, addr: SocketAddr, end: Instant) {
        while Instant::now() < end {
            let Some(mut stream) = connect(addr, end).await else {
                continue;
            };
            self.silent.opened();
            let opened = Instant::now();
            let wait = async {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            if tokio::time::timeout_at(end, wait).await.is_ok() {
                self.silent.closed(opened);
            }
        }
    }

    /// HTTP/2: a streamed chat completion, then RST_STREAM 20 ms later,
    /// one after the other on one connection until the proxy closes it.
    async fn delayed_resets(&self, addr: SocketAddr, end: Instant) {
        while Instant::now() < end {
            let Some(stream) = connect(addr, end).await else {
                continue;
            };
            self.resets.opened();
            let opened = Instant::now();
            let Ok(Ok((client, connection))) =
                tokio::time::timeout_at(end, h2::client::handshake(stream)).await
            else {
                continue;
            };
            let _connection = AbortOnDrop(tokio::spawn(connection));
            let resets = self.reset_until_closed(client, addr);
            if tokio::time::timeout_at(end, resets).await.is_ok() {
                self.resets.closed(opened);
            }
        }
    }

    /// Opens and resets streams on `client` until the connection fails.
    async fn reset_until_closed(
        &self,
        mut client: h2::client::SendRequest<Bytes>,
        addr: SocketAddr,
    ) -> anyhow::Result<Infallible> {
        loop {
            client = client.ready().await?;
            let (response, mut body) = client.send_request(request(addr, "resets")?, false)?;
            body.send_data(stream_body(), true)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            body.send_reset(h2::Reason::CANCEL);
            drop(response);
            self.resets.streams.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// HTTP/2 with a stream window of 0: `streams` long streamed
    /// completions whose answers can never be sent, held until the proxy
    /// closes the connection.
    async fn non_reader(&self, addr: SocketAddr, end: Instant, streams: usize) {
        while Instant::now() < end {
            let Some(stream) = connect(addr, end).await else {
                continue;
            };
            self.non_readers.opened();
            let opened = Instant::now();
            let Ok(Ok((client, connection))) = tokio::time::timeout_at(
                end,
                h2::client::Builder::new()
                    .initial_window_size(0)
                    .handshake::<_, Bytes>(stream),
            )
            .await
            else {
                continue;
            };
            let mut connection = AbortOnDrop(tokio::spawn(connection));
            let mut held = Vec::new();
            let mut client = client;
            for _ in 0..streams {
                client = match client.ready().await {
                    Ok(c) => c,
                    Err(_) => break,
                };
                let Ok(r) = request(addr, "non-reader") else {
                    break;
                };
                let Ok((response, mut body)) = client.send_request(r, false) else {
                    break;
                };
                if body.send_data(stream_body(), true).is_err() {
                    break;
                }
                held.push((response, body));
                self.non_readers.streams.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = &mut connection.0 => self.non_readers.closed(opened),
                _ = tokio::time::sleep_until(end) => {}
            }
            drop(held);
        }
    }
}

/// A spawned task, aborted when this handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A TCP connection to `addr`, or `None` after a short pause when it
/// fails (or `end` passes).
async fn connect(addr: SocketAddr, end: Instant) -> Option<TcpStream> {
    match tokio::time::timeout_at(end, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Some(s),
        _ => {
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// A streamed chat completion request, marked with `?soak=<kind>`.
fn request(addr: SocketAddr, kind: &str) -> anyhow::Result<http::Request<()>> {
    Ok(
        http::Request::post(format!("http://{addr}/v1/chat/completions?soak={kind}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "text/event-stream")
            .body(())?,
    )
}

/// The body of a long streamed completion.
fn stream_body() -> Bytes {
    Bytes::from_static(
        br#"{"model":"mock-llm","messages":[{"role":"user","content":"Talk for a long time."}],"max_tokens":1000,"stream":true}"#,
    )
}
