//! How long a client connection and each of its streams may live, and when
//! the proxy ends them: the first-bytes timeout (a connection must say
//! enough for its protocol to be told), the HTTP/1 request headers
//! timeout, the idle timeout, the maximum age and request count, the
//! stream idle timeout (which also cuts clients that stop reading), and
//! HTTP/2 premature-reset accounting (Envoy's answer to streams opened and
//! reset before they are answered).
//!
//! A connection's [`Lifetime`] is shared by its requests, which report to
//! it ([`Lifetime::start_stream`], [`Watched`]), and by its [`Watchdog`],
//! which the connection task polls beside hyper's connection and which
//! says when the connection must end, and how. [`ClientIo`], the
//! connection's byte stream, reports its first bytes, and closes lingering
//! when the proxy answered before reading a request's body.

use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use infermesh_api::ListenerLimits;
use slab::Slab;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::core::body::{BoxError, ProxyBody};
use crate::core::error::TimeoutError;
use crate::transport::detect::http2_told;

/// A stream reset by the client younger than this counts as premature
/// (Envoy's `premature_reset_min_stream_lifetime_seconds`).
const PREMATURE_LIFETIME: Duration = Duration::from_secs(1);

/// Premature resets are judged once a connection has carried this many
/// streams: the connection is closed when half of them or more were reset
/// prematurely, or at once when half this many were (Envoy's rule, with a
/// lower count than Envoy's 500: every request that reaches a model costs
/// it far more than one that reaches a web server).
const PREMATURE_JUDGED_AFTER: u64 = 100;

/// How long a closing HTTP/1 connection keeps reading (and discarding)
/// what its client still sends, after the proxy answered without reading
/// the whole request body: closed with unread input, the socket would
/// send a reset that can destroy the answer before the client reads it
/// (nginx's `lingering_time`, shorter).
const LINGER: Duration = Duration::from_secs(5);

/// Why the proxy ends a connection: the `reason` label of
/// `infermesh_downstream_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It sent too little, too slowly, for its protocol to be told.
    FirstByteTimeout,
    /// An HTTP/1 client took longer than the request headers timeout to
    /// send a request's head (or its next one, on a keep-alive
    /// connection).
    RequestHeaders,
    /// No request in flight for the idle timeout.
    Idle,
    /// It reached the listener's maximum connection age.
    MaxAge,
    /// It carried the listener's maximum requests per connection.
    MaxRequests,
    /// Most of its HTTP/2 streams were reset before they were answered.
    PrematureResets,
    /// A response sent nothing for the stream idle timeout because its
    /// client stopped reading, on HTTP/1 (the connection can carry nothing
    /// else), or on a closing HTTP/2 connection where only such streams
    /// are left.
    StreamIdle,
    /// An HTTP/2 client stopped reading a response for the stream idle
    /// timeout. hyper cannot reset one stream whose window is closed, so
    /// the connection is retired: GOAWAY, the other streams finish, then
    /// it is closed.
    UnreadStream,
}

impl Ending {
    /// The metric label and log word.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Ending::FirstByteTimeout => "first_byte_timeout",
            Ending::RequestHeaders => "request_headers_timeout",
            Ending::Idle => "idle_timeout",
            Ending::MaxAge => "max_connection_age",
            Ending::MaxRequests => "max_requests",
            Ending::PrematureResets => "premature_resets",
            Ending::StreamIdle | Ending::UnreadStream => "stream_idle_timeout",
        }
    }

    /// Whether the connection is closed gracefully (its requests in
    /// flight finish; HTTP/2 clients get GOAWAY) rather than at once.
    pub(crate) fn is_graceful(self) -> bool {
        matches!(
            self,
            Ending::Idle | Ending::MaxAge | Ending::MaxRequests | Ending::UnreadStream
        )
    }
}

/// The limits of one connection, read once from its listener.
#[derive(Clone, Copy, Debug)]
struct Limits {
    first_byte: Limit,
    request_headers: Limit,
    idle: Limit,
    max_age: Limit,
    max_requests: Option<NonZeroU64>,
    stream_idle: Limit,
}

/// A time limit in whole milliseconds (rounded up), or none: half the
/// size of an `Option<Duration>`, in the lifetime every open connection
/// carries.
#[derive(Clone, Copy, Debug)]
struct Limit(Option<NonZeroU64>);

impl Limit {
    /// `limit`, where `0s` is none.
    fn new(limit: infermesh_api::Duration) -> Self {
        Limit(limit.non_zero().and_then(|limit| {
            let millis = limit.as_millis().max(1);
            NonZeroU64::new(u64::try_from(millis).unwrap_or(u64::MAX))
        }))
    }

    fn get(self) -> Option<Duration> {
        self.0.map(|millis| Duration::from_millis(millis.get()))
    }
}

/// What a connection's requests and its watchdog share.
pub(crate) struct Lifetime {
    opened: Instant,
    limits: Limits,
    /// Enough bytes arrived to tell the protocol.
    detected: AtomicBool,
    /// The connection speaks HTTP/2 (known from its first request).
    http2: AtomicBool,
    /// The connection is served as HTTP/1: its request heads are timed.
    http1: AtomicBool,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// When the last request in flight ended, in milliseconds since
    /// `opened`.
    idle_since: AtomicU64,
    /// The proxy answered a request before reading its whole body: close
    /// lingering.
    linger: AtomicBool,
    /// Streams ended, and those of them the client reset prematurely.
    ended: AtomicU64,
    premature: AtomicU64,
    /// Responses under the stream idle timeout.
    streams: Mutex<Slab<Arc<StreamSlot>>>,
    /// Responses cut while their client was not reading, still open.
    stuck: AtomicUsize,
    /// A verdict reached by a request (too many requests, too many
    /// premature resets), for the watchdog to act on.
    verdict: Mutex<Option<Ending>>,
    wake: Notify,
}

impl Lifetime {
    /// The lifetime of a connection accepted now on a listener with
    /// `limits`.
    pub(crate) fn new(limits: &ListenerLimits) -> Arc<Self> {
        Arc::new(Lifetime {
            opened: Instant::now(),
            limits: Limits {
                first_byte: Limit::new(limits.first_byte_timeout),
                request_headers: Limit::new(limits.request_headers_timeout),
                idle: Limit::new(limits.idle_timeout),
                max_age: Limit::new(limits.max_connection_age),
                max_requests: limits
                    .max_requests_per_connection
                    .and_then(|max| NonZeroU64::new(max.into())),
                stream_idle: Limit::new(limits.stream_idle_timeout),
            },
            detected: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            http1: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            linger: AtomicBool::new(false),
            ended: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            streams: Mutex::new(Slab::new()),
            stuck: AtomicUsize::new(0),
            verdict: Mutex::new(None),
            wake: Notify::new(),
        })
    }

    /// Milliseconds since the connection opened.
    fn now(&self) -> u64 {
        self.at(Instant::now())
    }

    fn at(&self, instant: Instant) -> u64 {
        u64::try_from(instant.saturating_duration_since(self.opened).as_millis())
            .unwrap_or(u64::MAX)
    }

    fn instant(&self, millis: u64) -> Instant {
        self.opened + Duration::from_millis(millis)
    }

    /// Notes the first bytes of the connection's protocol as they arrive
    /// (plaintext, after TLS if any), until the protocol can be told.
    fn saw_first_bytes(&self, seen: &[u8], before: usize) {
        // HTTP/1 is known at its first byte that leaves the HTTP/2
        // preface; HTTP/2 once the whole preface is in.
        if http2_told(seen, before).is_some() {
            self.detected.store(true, Ordering::Relaxed);
        }
    }

    /// Notes that the connection is served as HTTP/1, whose request heads
    /// the request headers timeout bounds.
    fn serving_http1(&self) {
        self.http1.store(true, Ordering::Relaxed);
        // The watchdog's sleep was set before the version was told.
        self.wake.notify_one();
    }

    /// When the connection has had no request in flight for `limit`,
    /// counted from the end of the last one, or from its opening; `None`
    /// while a request is in flight. The idle timeout's deadline, and the
    /// request headers timeout's: that one also runs while a keep-alive
    /// connection waits for its next head's first byte, as hyper's header
    /// timer counted it (an idle HTTP/1 connection ends after the shorter
    /// of the two), with one timer per connection, the watchdog's,
    /// instead of hyper's, armed and disarmed for every request.
    fn quiet_for(&self, limit: Duration) -> Option<Instant> {
        (self.in_flight.load(Ordering::Relaxed) == 0)
            .then(|| self.instant(self.idle_since.load(Ordering::Relaxed)) + limit)
    }

    /// The request headers timeout, on a connection served as HTTP/1.
    fn head_limit(&self) -> Option<Duration> {
        self.limits
            .request_headers
            .get()
            .filter(|_| self.http1.load(Ordering::Relaxed))
    }

    /// Notes that a request was answered before its body was read: the
    /// connection closes lingering.
    pub(crate) fn linger_on_close(&self) {
        self.linger.store(true, Ordering::Relaxed);
    }

    /// A request arrived: counts it and tracks it until its response
    /// ends or is dropped.
    pub(crate) fn start_stream(self: &Arc<Self>, http2: bool) -> StreamGuard {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let requests = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.limits.max_requests.map(NonZeroU64::get) == Some(requests) {
            self.decide(Ending::MaxRequests);
        }
        StreamGuard {
            lifetime: self.clone(),
            started: Instant::now(),
            finished: false,
        }
    }

    fn decide(&self, ending: Ending) {
        let mut verdict = self.verdict.lock().unwrap_or_else(PoisonError::into_inner);
        // Closing at once outranks closing gracefully.
        if verdict.is_none_or(|v| v.is_graceful() && !ending.is_graceful()) {
            *verdict = Some(ending);
            self.wake.notify_one();
        }
    }

    fn stream_ended(&self, started: Instant, finished: bool) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(self.now(), Ordering::Relaxed);
        }
        if self.stuck.load(Ordering::Relaxed) > 0 {
            // A closing connection may now hold only stuck streams.
            self.wake.notify_one();
        }
        if !self.http2.load(Ordering::Relaxed) {
            return;
        }
        let ended = self.ended.fetch_add(1, Ordering::Relaxed) + 1;
        if finished || started.elapsed() >= PREMATURE_LIFETIME {
            return;
        }
        let premature = self.premature.fetch_add(1, Ordering::Relaxed) + 1;
        let too_many = if ended < PREMATURE_JUDGED_AFTER {
            premature * 2 >= PREMATURE_JUDGED_AFTER
        } else {
            premature * 2 >= ended
        };
        if too_many {
            self.decide(Ending::PrematureResets);
        }
    }

    /// Cuts the responses that sent nothing for `limit`; says how many,
    /// and when the next one is due.
    fn expire_streams(&self, now: Instant, limit: Duration) -> (usize, Option<Instant>) {
        let now_ms = self.at(now);
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        let mut next: Option<u64> = None;
        let mut expired = Vec::new();
        {
            let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            for (_, slot) in streams.iter() {
                if slot.cut.load(Ordering::Relaxed) {
                    continue;
                }
                let due = slot
                    .progress
                    .load(Ordering::Relaxed)
                    .saturating_add(limit_ms);
                if due <= now_ms {
                    expired.push(slot.clone());
                } else {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
        }
        for slot in &expired {
            slot.cut();
            if slot.handed_off.load(Ordering::Relaxed) {
                // hyper holds its last chunk for a client that does not
                // read, and will not poll the body again.
                slot.stuck.store(true, Ordering::Relaxed);
                self.stuck.fetch_add(1, Ordering::Relaxed);
            } else if let Some(waker) = slot
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                // Waiting for the backend: polled again, the body fails
                // and hyper resets the stream.
                waker.wake();
            }
        }
        (expired.len(), next.map(|n| self.instant(n)))
    }
}

/// A request in flight on a connection: counted until its response ends
/// or is dropped. Dropped before its end, young, on HTTP/2, it counts as a
/// premature reset.
pub(crate) struct StreamGuard {
    lifetime: Arc<Lifetime>,
    started: Instant,
    finished: bool,
}

impl StreamGuard {
    /// Watches the response body: its stream idle timeout, and whether it
    /// ends or is dropped.
    pub(crate) fn watch(self, body: ProxyBody) -> Watched {
        let lifetime = &self.lifetime;
        let inner = match lifetime.limits.stream_idle.get() {
            None => Inner::Plain(body),
            Some(_) => {
                let end_stream = body.is_end_stream();
                let slot = Arc::new(StreamSlot {
                    body: Mutex::new(Some(body)),
                    progress: AtomicU64::new(lifetime.now()),
                    cut: AtomicBool::new(false),
                    end_stream: AtomicBool::new(end_stream),
                    handed_off: AtomicBool::new(false),
                    stuck: AtomicBool::new(false),
                    waker: Mutex::new(None),
                });
                let key = lifetime
                    .streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(slot.clone());
                // No need to wake the watchdog: it looks again one stream
                // idle timeout after its last look at the latest, before
                // this stream can be due.
                Inner::Slot(slot, key)
            }
        };
        Watched { inner, guard: self }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.lifetime.stream_ended(self.started, self.finished);
    }
}

/// A response body as its connection's watchdog sees it. Under a stream
/// idle timeout, the body lives in a slot the watchdog can empty: a body
/// that is never polled (its client's window is closed, or its socket
/// full) is still dropped in time, which frees its backend request.
pub(crate) struct Watched {
    inner: Inner,
    guard: StreamGuard,
}

enum Inner {
    Plain(ProxyBody),
    Slot(Arc<StreamSlot>, usize),
}

struct StreamSlot {
    body: Mutex<Option<ProxyBody>>,
    /// When the response last sent the client something, in milliseconds
    /// since the connection opened.
    progress: AtomicU64,
    cut: AtomicBool,
    end_stream: AtomicBool,
    /// The last poll handed hyper a frame: until hyper polls again, the
    /// response waits for its client, not its backend.
    handed_off: AtomicBool,
    /// Cut while its client was not reading.
    stuck: AtomicBool,
    /// Who to wake when the body is cut while it waits for its backend.
    waker: Mutex<Option<Waker>>,
}

impl StreamSlot {
    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        let body = self
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(body);
    }
}

impl Watched {
    /// Whether the stream idle timeout cut this response.
    pub(crate) fn was_cut(&self) -> bool {
        matches!(&self.inner, Inner::Slot(slot, _) if slot.cut.load(Ordering::Relaxed))
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Plain(body) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if body.is_end_stream() {
                    this.guard.finished = true;
                }
                polled
            }
            Inner::Slot(slot, _) => {
                let mut guard = slot.body.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(body) = guard.as_mut() else {
                    this.guard.finished = true;
                    // Only the listener's stream idle timeout empties a slot.
                    let after = this
                        .guard
                        .lifetime
                        .limits
                        .stream_idle
                        .get()
                        .unwrap_or_default();
                    return Poll::Ready(Some(Err(TimeoutError::StreamIdle(after).into())));
                };
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(_))) => {
                        slot.progress
                            .store(this.guard.lifetime.now(), Ordering::Relaxed);
                        slot.handed_off.store(true, Ordering::Relaxed);
                    }
                    Poll::Pending => {
                        slot.handed_off.store(false, Ordering::Relaxed);
                        let mut waker = slot.waker.lock().unwrap_or_else(PoisonError::into_inner);
                        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *waker = Some(cx.waker().clone());
                        }
                    }
                    Poll::Ready(_) => {}
                }
                if body.is_end_stream() {
                    slot.end_stream.store(true, Ordering::Relaxed);
                    this.guard.finished = true;
                }
                polled
            }
        };
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.finished = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Plain(body) => body.is_end_stream(),
            Inner::Slot(slot, _) => slot.end_stream.load(Ordering::Relaxed),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Plain(body) => body.size_hint(),
            Inner::Slot(slot, _) => slot
                .body
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // hyper does not poll a body that is empty from the start.
        if self.is_end_stream() {
            self.guard.finished = true;
        }
        if let Inner::Slot(slot, key) = &self.inner {
            let key = *key;
            if slot.stuck.load(Ordering::Relaxed) {
                self.guard.lifetime.stuck.fetch_sub(1, Ordering::Relaxed);
            }
            let mut streams = self
                .guard
                .lifetime
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            streams.try_remove(key);
        }
    }
}

/// Decides when a connection ends. The connection task polls
/// [`Watchdog::next`] beside hyper's connection; it is cancel safe.
pub(crate) struct Watchdog {
    lifetime: Arc<Lifetime>,
    /// Set once the connection is closing gracefully: only closing at once
    /// and stream timeouts are still watched.
    closing: bool,
    /// When the next response under watch runs out of its stream idle
    /// time, as the last check found.
    stream_due: Option<Instant>,
}

impl Watchdog {
    /// The watchdog of `lifetime`'s connection.
    pub(crate) fn new(lifetime: Arc<Lifetime>) -> Self {
        Watchdog {
            lifetime,
            closing: false,
            stream_due: None,
        }
    }

    /// Notes that the connection is closing gracefully for another cause
    /// (a drain): graceful endings are no longer reported.
    pub(crate) fn closing(&mut self) {
        self.closing = true;
    }

    /// Resolves when the connection must end, with why. A graceful ending
    /// is reported once; the watchdog goes on watching for endings at once.
    pub(crate) async fn next(&mut self) -> Ending {
        let lifetime = self.lifetime.clone();
        loop {
            let notified = lifetime.wake.notified();
            if let Some(ending) = self.check(Instant::now()) {
                if ending.is_graceful() {
                    self.closing = true;
                }
                return ending;
            }
            let deadline = self.deadline(Instant::now());
            match deadline {
                Some(at) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// The ending due at `now`, if any; cuts the responses whose stream
    /// idle timeout ran out.
    fn check(&mut self, now: Instant) -> Option<Ending> {
        let lifetime = &self.lifetime;
        let verdict = lifetime
            .verdict
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(ending) = verdict
            && (!ending.is_graceful() || !self.closing)
        {
            return Some(ending);
        }
        if let Some(limit) = lifetime.limits.stream_idle.get() {
            let (_, due) = lifetime.expire_streams(now, limit);
            self.stream_due = due;
        }
        let stuck = lifetime.stuck.load(Ordering::Relaxed);
        if stuck > 0 {
            if !lifetime.http2.load(Ordering::Relaxed)
                || (self.closing && lifetime.in_flight.load(Ordering::Relaxed) <= stuck)
            {
                return Some(Ending::StreamIdle);
            }
            if !self.closing {
                self.closing = true;
                return Some(Ending::UnreadStream);
            }
        }
        let elapsed = now.saturating_duration_since(lifetime.opened);
        if let Some(limit) = lifetime.limits.first_byte.get()
            && !lifetime.detected.load(Ordering::Relaxed)
            && elapsed >= limit
        {
            return Some(Ending::FirstByteTimeout);
        }
        if let Some(due) = lifetime.head_limit().and_then(|l| lifetime.quiet_for(l))
            && now >= due
        {
            return Some(Ending::RequestHeaders);
        }
        if self.closing {
            return None;
        }
        if let Some(limit) = lifetime.limits.max_age.get()
            && elapsed >= limit
        {
            return Some(Ending::MaxAge);
        }
        if let Some(due) = lifetime
            .limits
            .idle
            .get()
            .and_then(|l| lifetime.quiet_for(l))
            && now >= due
        {
            return Some(Ending::Idle);
        }
        None
    }

    /// The next moment a check may find an ending.
    fn deadline(&self, now: Instant) -> Option<Instant> {
        let lifetime = &self.lifetime;
        let limits = &lifetime.limits;
        let mut next: Option<Instant> = None;
        let mut consider = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
        if let Some(limit) = limits.first_byte.get()
            && !lifetime.detected.load(Ordering::Relaxed)
        {
            consider(lifetime.opened + limit);
        }
        // Busy now: look again one timeout later at the latest; the last
        // request's end moves the deadline on.
        let quiet = |limit| lifetime.quiet_for(limit).unwrap_or(now + limit);
        if let Some(limit) = lifetime.head_limit() {
            consider(quiet(limit));
        }
        if let Some(limit) = limits.stream_idle.get() {
            consider(self.stream_due.unwrap_or(now + limit));
        }
        if !self.closing {
            if let Some(limit) = limits.max_age.get() {
                consider(lifetime.opened + limit);
            }
            if let Some(limit) = limits.idle.get() {
                consider(quiet(limit));
            }
        }
        next
    }
}

/// A client connection's byte stream: reports its first bytes to the
/// connection's [`Lifetime`] until its protocol can be told, and closes
/// lingering ([`LINGER`]) when the proxy answered an HTTP/1 request before
/// reading its body.
pub(crate) struct ClientIo<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    io: Option<I>,
    lifetime: Arc<Lifetime>,
    /// Bytes seen while the protocol is not told yet; `None` once it is.
    detecting: Option<usize>,
}

impl<I> ClientIo<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Watches `io` for `lifetime`.
    pub(crate) fn new(io: I, lifetime: &Arc<Lifetime>) -> Self {
        ClientIo {
            io: Some(io),
            lifetime: lifetime.clone(),
            detecting: lifetime.limits.first_byte.get().map(|_| 0),
        }
    }

    /// Notes that the stream is served as HTTP/1: the watchdog times its
    /// request heads.
    pub(crate) fn serving_http1(&self) {
        self.lifetime.serving_http1();
    }

    /// The stream under watch.
    pub(crate) fn get_ref(&self) -> &I {
        self.io.as_ref().expect("taken only on drop")
    }

    fn io(&mut self) -> Pin<&mut I> {
        Pin::new(self.io.as_mut().expect("taken only on drop"))
    }
}

impl<I> Drop for ClientIo<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        let lifetime = &self.lifetime;
        if !lifetime.linger.load(Ordering::Relaxed) || lifetime.http2.load(Ordering::Relaxed) {
            return;
        }
        let (Some(mut io), Ok(runtime)) = (self.io.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async {
                let _ = io.shutdown().await;
                let mut discard = [0u8; 16 * 1024];
                while matches!(io.read(&mut discard).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

impl<I> AsyncRead for ClientIo<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.io().poll_read(cx, buf);
        let this = &mut *self;
        if let Some(seen) = this.detecting {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.lifetime.saw_first_bytes(read, seen);
                this.detecting = Some(seen + read.len());
                if this.lifetime.detected.load(Ordering::Relaxed) {
                    this.detecting = None;
                }
            }
        }
        polled
    }
}

impl<I> AsyncWrite for ClientIo<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(I::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // A lingering close shuts the write side itself, once dropped.
        if self.lifetime.linger.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        self.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    fn limits() -> ListenerLimits {
        ListenerLimits {
            first_byte_timeout: infermesh_api::Duration::from_secs(5),
            idle_timeout: infermesh_api::Duration::from_secs(60),
            stream_idle_timeout: infermesh_api::Duration::from_secs(10),
            ..ListenerLimits::default()
        }
    }

    #[test]
    fn the_protocol_is_told_by_the_first_bytes() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HT", 0);
        assert!(
            !lifetime.detected.load(Ordering::Relaxed),
            "still the preface"
        );
        lifetime.saw_first_bytes(b"TP/2.0\r\n\r\nSM\r\n\r\n", 8);
        assert!(
            lifetime.detected.load(Ordering::Relaxed),
            "the whole preface"
        );
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"P", 0);
        lifetime.saw_first_bytes(b"OST / HTTP/1.1", 1);
        assert!(lifetime.detected.load(Ordering::Relaxed), "HTTP/1 POST");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_ends_at_the_first_byte_timeout() {
        let lifetime = Lifetime::new(&limits());
        let mut watchdog = Watchdog::new(lifetime.clone());
        let started = Instant::now();
        assert_eq!(watchdog.next().await, Ending::FirstByteTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    /// How `lifetime`'s connection ends after one request in flight for
    /// 100 s, and how long after that request's end.
    async fn ending_after_a_long_request(lifetime: Arc<Lifetime>) -> (Ending, Duration) {
        let mut watchdog = Watchdog::new(lifetime.clone());
        let stream = lifetime.start_stream(false);
        let watching = tokio::spawn(async move { watchdog.next().await });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!watching.is_finished(), "a request is in flight");
        drop(stream);
        let ended_at = Instant::now();
        (watching.await.unwrap(), ended_at.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_one_idle_timeout_after_its_last_request() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"GET", 0);
        assert_eq!(
            ending_after_a_long_request(lifetime).await,
            (Ending::Idle, Duration::from_secs(60))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_head_is_timed_from_the_last_request_and_cut_at_once() {
        // requestHeadersTimeout 30 s, idle timeout 60 s.
        // No other limit wakes the watchdog before the idle timeout.
        let lifetime = Lifetime::new(&ListenerLimits {
            first_byte_timeout: infermesh_api::Duration::from_secs(0),
            stream_idle_timeout: infermesh_api::Duration::from_secs(0),
            ..limits()
        });
        let mut watchdog = Watchdog::new(lifetime.clone());
        let started = Instant::now();
        let watching = tokio::spawn(async move { watchdog.next().await });
        // Told HTTP/1 while the watchdog waits: a first head that never
        // ends (a slow client).
        tokio::time::sleep(Duration::from_secs(1)).await;
        lifetime.saw_first_bytes(b"GET / HT", 0);
        lifetime.serving_http1();
        assert_eq!(watching.await.unwrap(), Ending::RequestHeaders);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(!Ending::RequestHeaders.is_graceful());
        assert_eq!(Ending::RequestHeaders.as_str(), "request_headers_timeout");
        // A request in flight stops the clock; its end starts it again.
        let lifetime = Lifetime::new(&limits());
        lifetime.serving_http1();
        lifetime.saw_first_bytes(b"GET", 0);
        assert_eq!(
            ending_after_a_long_request(lifetime).await,
            (Ending::RequestHeaders, Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn http2_connections_have_no_head_timer() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0);
        let started = Instant::now();
        assert_eq!(
            Watchdog::new(lifetime.clone()).next().await,
            Ending::Idle,
            "idle past the request headers timeout, ended by the idle timeout"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_nobody_reads_is_cut_and_its_body_dropped() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0);
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let body = crate::core::body::boxed(http_body_util::StreamBody::new(
            futures_util::stream::once(async move {
                let _dropped = dropped_tx;
                std::future::pending::<Result<Frame<Bytes>, BoxError>>().await
            }),
        ));
        let mut watched = lifetime.start_stream(true).watch(body);
        let mut watchdog = Watchdog::new(lifetime.clone());
        let watching = tokio::spawn(async move { watchdog.next().await });
        // Never polled, as under a closed flow-control window: the
        // backend's body is dropped all the same.
        dropped_rx.await.unwrap_err();
        assert!(watched.was_cut());
        assert!(!watching.is_finished(), "HTTP/2: only the stream is cut");
        let error = watched.frame().await.unwrap().unwrap_err();
        assert_eq!(
            error.downcast_ref::<TimeoutError>(),
            Some(&TimeoutError::StreamIdle(Duration::from_secs(10)))
        );
        watching.abort();
    }

    /// A body that sends one chunk, then waits for ever.
    fn one_chunk_then_silence() -> ProxyBody {
        crate::core::body::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from_static(
                b"chunk",
            )))])
            .chain(futures_util::stream::pending()),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_client_that_stops_reading_retires_its_connection() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0);
        let mut unread = lifetime.start_stream(true).watch(one_chunk_then_silence());
        let other = lifetime.start_stream(true);
        // hyper took the first chunk and waits for the client's window.
        assert!(unread.frame().await.unwrap().is_ok());
        let mut watchdog = Watchdog::new(lifetime.clone());
        assert_eq!(watchdog.next().await, Ending::UnreadStream, "GOAWAY first");
        let watching = tokio::spawn(async move { watchdog.next().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!watching.is_finished(), "another stream is still answered");
        drop(other);
        assert_eq!(watching.await.unwrap(), Ending::StreamIdle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_starts_while_the_watchdog_sleeps_is_cut_in_time() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0);
        let mut watchdog = Watchdog::new(lifetime.clone());
        let watching = tokio::spawn(async move { watchdog.next().await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut unread = lifetime.start_stream(true).watch(one_chunk_then_silence());
        assert!(unread.frame().await.unwrap().is_ok());
        let started = Instant::now();
        assert_eq!(watching.await.unwrap(), Ending::UnreadStream);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_client_that_stops_reading_is_closed() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"GET", 0);
        let mut unread = lifetime.start_stream(false).watch(one_chunk_then_silence());
        assert!(unread.frame().await.unwrap().is_ok());
        let started = Instant::now();
        assert_eq!(
            Watchdog::new(lifetime.clone()).next().await,
            Ending::StreamIdle
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_backend_fails_the_stream_not_the_connection() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0);
        let mut watched = lifetime.start_stream(true).watch(one_chunk_then_silence());
        let mut watchdog = Watchdog::new(lifetime.clone());
        let watching = tokio::spawn(async move { watchdog.next().await });
        assert!(watched.frame().await.unwrap().is_ok());
        // Polled while the backend is silent: woken and failed at the limit.
        let error = watched.frame().await.unwrap().unwrap_err();
        assert!(error.downcast_ref::<TimeoutError>().is_some());
        assert!(!watching.is_finished());
        watching.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn streams_reset_before_their_answer_close_the_connection() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0);
        let mut watchdog = Watchdog::new(lifetime.clone());
        for _ in 0..PREMATURE_JUDGED_AFTER / 2 - 1 {
            drop(lifetime.start_stream(true));
        }
        assert_eq!(*lifetime.verdict.lock().unwrap(), None);
        drop(lifetime.start_stream(true));
        assert_eq!(watchdog.next().await, Ending::PrematureResets);
    }

    #[tokio::test(start_paused = true)]
    async fn answered_streams_are_not_premature() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0);
        for _ in 0..PREMATURE_JUDGED_AFTER * 2 {
            let body = crate::core::body::full(Bytes::from_static(b"ok"));
            let mut watched = lifetime.start_stream(true).watch(body);
            while watched.frame().await.is_some() {}
        }
        assert_eq!(lifetime.premature.load(Ordering::Relaxed), 0);
        assert_eq!(*lifetime.verdict.lock().unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_answers_hyper_never_polls_are_not_premature() {
        let lifetime = Lifetime::new(&limits());
        lifetime.saw_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0);
        for _ in 0..PREMATURE_JUDGED_AFTER * 2 {
            let watched = lifetime
                .start_stream(true)
                .watch(crate::core::body::full(Bytes::new()));
            assert!(
                watched.is_end_stream(),
                "sent with END_STREAM on its headers"
            );
        }
        assert_eq!(lifetime.premature.load(Ordering::Relaxed), 0);
    }
}
