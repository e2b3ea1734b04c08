//! Retrying a rule's failed requests on other endpoints: which failures are
//! retried, for which methods, how long to wait between attempts, and the
//! budget that keeps retries from multiplying the load when every endpoint
//! fails.
//!
//! A retry is decided on the response head alone (or on a gRPC status in
//! trailers that come before any data), before anything reaches the
//! client: once a response is returned from here it is final. The request
//! body is kept by [`ReplayBody`] up to the policy's cap; a larger request
//! is not retried. The request head is copied for each attempt only when a
//! sent attempt may be retried; a request retried only when it was never
//! sent (a `POST` under the default policy, to HTTP/1.1 backends) lends its
//! head to the attempt, and the pool gives it back with a failed connect.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use infermesh_api::{HedgePolicy, RetryOn, RetryPolicy};
use prometheus::{IntCounter, IntCounterVec};
use rand::RngExt;
use tower::{Layer, Service, ServiceExt};

use crate::core::body::{BoxFuture, ProxyBody, boxed, holding, prepend};
use crate::core::context::{Attempt, Upstream};

use crate::core::error::{ErrorKind, Limit, ProxyError, RetryClass};
use crate::core::headers::{GRPC_STATUS, is_grpc, retry_after};
use crate::route::hedge::{HedgeState, Hedging};
use crate::route::metrics::Metrics;
use crate::route::replay::ReplayBody;

/// Why a request was retried: the `reason` label of
/// `infermesh_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The connect failed or timed out.
    ConnectFailure,
    /// The HTTP/2 server refused the stream.
    RefusedStream,
    /// The connection broke before response headers.
    Reset,
    /// 502, 503, 504, or a per-try timeout.
    GatewayError,
    /// 429.
    RateLimited,
    /// A status from the policy's `statusCodes`.
    StatusCode,
    /// A gRPC status from the policy's `grpcStatuses`.
    GrpcStatus,
}

impl Reason {
    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::ConnectFailure => "connect-failure",
            Reason::RefusedStream => "refused-stream",
            Reason::Reset => "reset",
            Reason::GatewayError => "gateway-error",
            Reason::RateLimited => "rate-limited",
            Reason::StatusCode => "status-code",
            Reason::GrpcStatus => "grpc-status",
        }
    }

    /// Whether the failed attempt may have been processed by a model
    /// server; only failures where it surely was not are retried for
    /// non-idempotent methods by default.
    fn may_have_been_processed(self) -> bool {
        !matches!(self, Reason::ConnectFailure | Reason::RefusedStream)
    }
}

/// Envoy-style retry budget of one rule: retries in flight may be at most
/// a share of the requests in flight, or a small minimum.
#[derive(Debug)]
pub(crate) struct Budget {
    percent: u32,
    min_concurrency: u32,
    requests: Arc<AtomicU32>,
    retries: Arc<AtomicU32>,
}

/// Counts a request or a retry as in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Budget {
    /// A budget of `percent` of the requests in flight, at least
    /// `min_concurrency` retries.
    pub(crate) fn new(percent: u32, min_concurrency: u32) -> Self {
        Budget {
            percent,
            min_concurrency,
            requests: Arc::default(),
            retries: Arc::default(),
        }
    }

    /// Counts a request in flight.
    pub(crate) fn request(&self) -> InFlight {
        self.requests.fetch_add(1, Ordering::AcqRel);
        InFlight(self.requests.clone())
    }

    /// Takes a retry from the budget, if it allows one more now.
    pub(crate) fn retry(&self) -> Option<InFlight> {
        let requests = u64::from(self.requests.load(Ordering::Acquire));
        let share = u32::try_from(requests * u64::from(self.percent) / 100).unwrap_or(u32::MAX);
        let allowed = share.max(self.min_concurrency);
        self.retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(self.retries.clone()))
    }
}

/// A rule's retry policy, ready to use.
#[derive(Debug)]
pub(crate) struct Retries {
    policy: RetryPolicy,
    per_try_timeout: Option<Duration>,
    budget: Budget,
    retries: IntCounterVec,
    route: Arc<str>,
    budget_exhausted: IntCounter,
    /// Hedging of each attempt, when the rule asks for it.
    hedging: Option<Hedging>,
    /// Whether a non-idempotent request may be retried after an attempt
    /// that sent it: decided once from the policy and the backends (see
    /// [`Retries::keeps_head`]).
    sent_non_idempotent_retried: bool,
}

impl Retries {
    /// The retry policy and hedging of a rule of `route`; `refused_streams`
    /// says whether one of its backends speaks HTTP/2 upstream.
    pub(crate) fn new(
        policy: &RetryPolicy,
        hedge: Option<&HedgePolicy>,
        route: &Arc<str>,
        metrics: &Metrics,
        refused_streams: bool,
    ) -> Self {
        let on = |condition| policy.on.contains(&condition);
        Retries {
            // An HTTP/2 stream the server refused was sent but not
            // processed: retried under `refusedStream` (or `reset`).
            sent_non_idempotent_retried: policy.non_idempotent
                || hedge.is_some()
                || (refused_streams && (on(RetryOn::RefusedStream) || on(RetryOn::Reset))),
            hedging: hedge.map(|hedge| Hedging::new(hedge, route, metrics)),
            per_try_timeout: policy.per_try_timeout.non_zero(),
            budget: Budget::new(policy.budget.percent, policy.budget.min_retry_concurrency),
            policy: policy.clone(),
            retries: metrics.retries.clone(),
            route: route.clone(),
            budget_exhausted: metrics
                .retry_budget_exhausted
                .with_label_values(&[&**route]),
        }
    }

    /// The rule's hedging goes on from `previous`, the state of the same
    /// rule under the config before ([`Hedging::continue_from`]); nothing
    /// changes for a rule that does not hedge.
    pub(crate) fn continue_hedging_from(mut self, previous: Option<&Arc<HedgeState>>) -> Self {
        if let (Some(hedging), Some(previous)) = (&mut self.hedging, previous) {
            hedging.continue_from(previous);
        }
        self
    }

    /// What the rule's hedging has spent and learned, when it hedges.
    pub(crate) fn hedge_state(&self) -> Option<&Arc<HedgeState>> {
        self.hedging.as_ref().map(Hedging::state)
    }

    fn retries_on(&self, on: RetryOn) -> bool {
        self.policy.on.contains(&on)
    }

    /// Whether a request may be retried after an attempt that sent it: then
    /// each attempt is sent a copy of a head kept here. Otherwise only an
    /// attempt that never left the proxy is retried, and it gives the head
    /// back ([`ProxyError::take_unsent`]): a `POST` under the default
    /// policy to HTTP/1.1 backends costs no copy.
    fn keeps_head(&self, idempotent: bool) -> bool {
        idempotent || self.sent_non_idempotent_retried
    }

    /// Whether `error` is worth another attempt, and why: the error
    /// vocabulary says which retry condition it falls under, and the
    /// policy whether it retries that condition.
    fn classify_error(&self, error: &ProxyError) -> Option<Reason> {
        let class = error.kind().retry_class()?;
        let (reason, on) = match class {
            RetryClass::ConnectFailure => (Reason::ConnectFailure, RetryOn::ConnectFailure),
            RetryClass::RefusedStream => (Reason::RefusedStream, RetryOn::RefusedStream),
            RetryClass::Reset => (Reason::Reset, RetryOn::Reset),
            RetryClass::Timeout => (Reason::GatewayError, RetryOn::GatewayError),
        };
        // A refused stream is also a reset, for a policy that lists only
        // `reset`.
        (self.retries_on(on)
            || (class == RetryClass::RefusedStream && self.retries_on(RetryOn::Reset)))
        .then_some(reason)
    }

    /// Whether a response with this head is worth another attempt, and why.
    fn classify_status(&self, status: StatusCode, headers: &HeaderMap) -> Option<Reason> {
        let code = status.as_u16();
        if matches!(code, 502..=504) && self.retries_on(RetryOn::GatewayError) {
            return Some(Reason::GatewayError);
        }
        if code == 429 && self.retries_on(RetryOn::RateLimited) {
            return Some(Reason::RateLimited);
        }
        if self.policy.status_codes.contains(&code) {
            return Some(Reason::StatusCode);
        }
        self.retries_grpc(headers).then_some(Reason::GrpcStatus)
    }

    fn retries_grpc(&self, headers: &HeaderMap) -> bool {
        // Most policies list no gRPC status: no header lookup then.
        !self.policy.grpc_statuses.is_empty()
            && grpc_status(headers)
                .is_some_and(|code| self.policy.grpc_statuses.iter().any(|s| s.code() == code))
    }

    /// Whether a successful gRPC response must be looked into: its status
    /// may come in trailers right after the headers.
    fn must_peek(&self, response: &Response<ProxyBody>) -> bool {
        !self.policy.grpc_statuses.is_empty()
            && response.status() == StatusCode::OK
            && grpc_status(response.headers()).is_none()
            && response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| is_grpc(v.as_bytes()))
    }

    /// Classifies an attempt's outcome. When a gRPC status could be
    /// retried, a gRPC response whose first frame is its trailers is read
    /// that far (within the per-try timeout), and put back together.
    async fn classify(
        &self,
        result: Result<Response<ProxyBody>, ProxyError>,
        idempotent: bool,
    ) -> (Result<Response<ProxyBody>, ProxyError>, Option<Reason>) {
        match result {
            Err(error) => {
                let reason = self.classify_error(&error);
                (Err(error), reason)
            }
            Ok(response)
                if (idempotent || self.policy.non_idempotent) && self.must_peek(&response) =>
            {
                let (parts, mut body) = response.into_parts();
                let first = match self.per_try_timeout {
                    Some(limit) => tokio::time::timeout(limit, body.frame())
                        .await
                        .ok()
                        .flatten(),
                    None => body.frame().await,
                };
                let reason = match &first {
                    Some(Ok(frame)) => frame
                        .trailers_ref()
                        .filter(|t| self.retries_grpc(t))
                        .map(|_| Reason::GrpcStatus),
                    _ => None,
                };
                let body = prepend(first.into_iter().collect(), body);
                (Ok(Response::from_parts(parts, body)), reason)
            }
            Ok(response) => {
                let reason = self.classify_status(response.status(), response.headers());
                (Ok(response), reason)
            }
        }
    }

    /// The wait before retry number `retry` (from 0): full jitter over an
    /// exponentially growing ceiling.
    fn backoff(&self, retry: u32) -> Duration {
        let backoff = self.policy.backoff;
        let ceiling = backoff
            .base
            .get()
            .saturating_mul(1u32 << retry.min(20))
            .min(backoff.max.get());
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// The gRPC status code in `grpc-status`, if any.
fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// Whether a method may be repeated without changing the outcome
/// (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Applies [`Retries`] around an inner service.
#[derive(Clone, Debug)]
pub(crate) struct RetryLayer(Arc<Retries>);

impl RetryLayer {
    /// A layer retrying by `retries`.
    pub(crate) fn new(retries: Retries) -> Self {
        RetryLayer(Arc::new(retries))
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            retries: self.0.clone(),
        }
    }
}

/// See [`RetryLayer`].
#[derive(Clone, Debug)]
pub(crate) struct Retry<S> {
    inner: S,
    retries: Arc<Retries>,
}

/// Where each attempt's request head comes from: a copy of the head kept
/// here when a sent attempt may be retried ([`Retries::keeps_head`]);
/// else the head is lent to the attempt, which gives it back only if it
/// never left the proxy, the only kind of attempt then retried.
struct Head {
    kept: Option<Parts>,
}

impl Head {
    /// A copy of the head for a hedge, when one is kept.
    fn copy(&self, body: ProxyBody, attempt: &Attempt) -> Option<Request<ProxyBody>> {
        let kept = self.kept.clone()?;
        Some(attempt_request(kept, body, attempt))
    }

    /// The head for the next attempt after `result`: a copy of the kept
    /// one, or the lent one given back; `None` when it was not given back.
    fn next(&self, result: &mut Result<Response<ProxyBody>, ProxyError>) -> Option<Parts> {
        match &self.kept {
            Some(kept) => Some(kept.clone()),
            None => result.as_mut().err()?.take_unsent(),
        }
    }
}

/// An attempt's request: `head` and `body`, marked with `attempt` (for the
/// endpoint pick below).
fn attempt_request(mut head: Parts, body: ProxyBody, attempt: &Attempt) -> Request<ProxyBody> {
    attempt.mark(&mut head.extensions);
    Request::from_parts(head, body)
}

impl<S> Service<Request<ProxyBody>> for Retry<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<ProxyBody>) -> Self::Future {
        let inner = self.inner.clone();
        let retries = self.retries.clone();
        let attempt = Attempt {
            retry: 0,
            avoid: Vec::new(),
            timeout: retries.per_try_timeout,
            hedge: false,
            siblings: None,
        };
        if retries.policy.max_retries == 0 && retries.hedging.is_none() {
            attempt.mark(request.extensions_mut());
            return Box::pin(inner.oneshot(request));
        }
        Box::pin(async move {
            let in_flight = retries.budget.request();
            let result = retry(inner, retries, request, attempt).await;
            // The request counts in the budget until its response ends.
            result.map(|response| response.map(|body| holding(body, in_flight)))
        })
    }
}

/// Sends `request` as many times as the policy allows.
async fn retry<S>(
    inner: S,
    retries: Arc<Retries>,
    request: Request<ProxyBody>,
    mut attempt: Attempt,
) -> Result<Response<ProxyBody>, ProxyError>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    let (parts, body) = request.into_parts();
    let first = ReplayBody::new(body, retries.policy.max_replay_bytes as usize);
    let replay = first.handle();
    let idempotent = is_idempotent(&parts.method);
    let head = Head {
        kept: retries.keeps_head(idempotent).then(|| parts.clone()),
    };
    if let Some(hedging) = &retries.hedging {
        hedging.request();
        // Each race's attempts note the endpoints they use here.
        attempt.siblings = Some(Arc::default());
    }
    let mut request = attempt_request(parts, boxed(first), &attempt);
    // What the client gets if a retry is refused by the backend's retry
    // limit: the failure that caused it, and why it was retried.
    let mut previous: Option<(Result<Response<ProxyBody>, ProxyError>, Reason)> = None;
    let mut retry_slot: Option<InFlight> = None;
    loop {
        let result = match &retries.hedging {
            None => send(inner.clone(), request).await,
            Some(hedging) => {
                let hedge = Attempt {
                    hedge: true,
                    ..attempt.clone()
                };
                let next = || {
                    // Hedges read the recording only: a body still
                    // arriving belongs to the first attempt.
                    if !replay.is_complete() {
                        return None;
                    }
                    let body = replay.replay()?;
                    head.copy(boxed(body), &hedge)
                };
                let result = hedging
                    .race(request, next, |request| send(inner.clone(), request))
                    .await;
                // A retry avoids every endpoint the race used, and races
                // with siblings of its own.
                if let Some(used) = attempt.siblings.replace(Arc::default()) {
                    attempt
                        .avoid
                        .extend(used.lock().map(|s| s.clone()).unwrap_or_default());
                }
                result
            }
        };
        drop(retry_slot.take());
        if let Some((kept, reason)) = previous.take() {
            if matches!(&result, Err(e) if matches!(e.kind(), ErrorKind::Overloaded(Limit::Retries)))
            {
                return kept;
            }
            retries
                .retries
                .with_label_values(&[&*retries.route, reason.as_str()])
                .inc();
        }
        let (mut result, reason) = retries.classify(result, idempotent).await;
        let Some(reason) = reason else {
            return result;
        };
        if attempt.retry >= retries.policy.max_retries
            || (reason.may_have_been_processed() && !idempotent && !retries.policy.non_idempotent)
        {
            return result;
        }
        let Some(next) = replay.replay() else {
            return result;
        };
        let Some(next_head) = head.next(&mut result) else {
            return result;
        };
        let asked = match &result {
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => retry_after(r.headers()),
            _ => None,
        };
        let wait = match asked {
            Some(asked) if asked > retries.policy.max_retry_after.get() => return result,
            Some(asked) => asked,
            None => retries.backoff(attempt.retry),
        };
        let Some(slot) = retries.budget.retry() else {
            retries.budget_exhausted.inc();
            return result;
        };
        let failed_at: Option<SocketAddr> = match &result {
            Ok(response) => response.extensions().get::<Upstream>().map(|u| u.endpoint),
            Err(error) => error.endpoint(),
        };
        attempt.avoid.extend(failed_at);
        attempt.retry += 1;
        retry_slot = Some(slot);
        // Read the failed answer while the backoff runs, so that its
        // connection and circuit-breaker slots are free for the retry.
        let (kept, ()) = tokio::join!(keep(result, wait.max(KEEP_WAIT)), tokio::time::sleep(wait));
        previous = kept.map(|kept| (kept, reason));
        request = attempt_request(next_head, boxed(next), &attempt);
    }
}

/// The most of a failed answer's body kept in case a retry is refused.
const KEEP_BYTES: usize = 64 * 1024;

/// How long reading a failed answer's body may delay a retry at most.
const KEEP_WAIT: Duration = Duration::from_millis(50);

/// A failed attempt's outcome, detached from its connection: the body is
/// read whole (up to [`KEEP_BYTES`], within `within`). `None` when it
/// cannot be kept; a refused retry then answers 503 `overloaded`.
fn keep(
    result: Result<Response<ProxyBody>, ProxyError>,
    within: Duration,
) -> BoxFuture<Option<Result<Response<ProxyBody>, ProxyError>>> {
    Box::pin(async move {
        match result {
            Err(error) => Some(Err(error)),
            Ok(response) => {
                let (parts, mut body) = response.into_parts();
                let read = async {
                    let mut frames = VecDeque::new();
                    let mut bytes = 0;
                    while let Some(frame) = body.frame().await {
                        let frame = frame.ok()?;
                        bytes += frame.data_ref().map_or(0, Bytes::len);
                        if bytes > KEEP_BYTES {
                            return None;
                        }
                        frames.push_back(frame);
                    }
                    Some(frames)
                };
                let frames = tokio::time::timeout(within, read).await.ok()??;
                Some(Ok(Response::from_parts(parts, boxed(Frames(frames)))))
            }
        }
    })
}

/// A body of frames read earlier.
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// Sends one attempt. Boxing the future here keeps the retry loop's future
/// `Send` for the compiler, which cannot see through `S::Future` there.
fn send<S>(
    inner: S,
    request: Request<ProxyBody>,
) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>
        + Send
        + 'static,
    S::Future: Send,
{
    Box::pin(inner.oneshot(request))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use infermesh_api::GrpcStatus;
    use tower::service_fn;

    use super::*;
    use crate::core::body::{empty, full};
    use crate::core::metrics::Registry;

    /// What the fake upstream saw of each attempt.
    #[derive(Debug, Default)]
    struct Seen {
        attempts: Vec<(u32, Vec<SocketAddr>, Bytes)>,
    }

    /// A fake balance-and-pool: answers attempt `n` with `answer(n)` after
    /// reading the request body, as an endpoint `127.0.0.1:(9000 + n)`.
    fn upstream(
        seen: Arc<Mutex<Seen>>,
        answer: impl Fn(u32) -> Result<Response<ProxyBody>, ErrorKind> + Clone + Send + Sync + 'static,
    ) -> impl Service<
        Request<ProxyBody>,
        Response = Response<ProxyBody>,
        Error = ProxyError,
        Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
    > + Clone
    + Send
    + 'static {
        service_fn(move |request: Request<ProxyBody>| {
            let seen = seen.clone();
            let answer = answer.clone();
            let fut: BoxFuture<Result<Response<ProxyBody>, ProxyError>> = Box::pin(async move {
                let attempt = request
                    .extensions()
                    .get::<Attempt>()
                    .cloned()
                    .unwrap_or_default();
                let (head, body) = request.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let n = attempt.retry;
                seen.lock()
                    .unwrap()
                    .attempts
                    .push((n, attempt.avoid.clone(), body));
                let endpoint = SocketAddr::from(([127, 0, 0, 1], 9000 + n as u16));
                match answer(n) {
                    Ok(mut response) => {
                        response.extensions_mut().insert(Upstream {
                            backend: Arc::from("b"),
                            endpoint,
                            retries: n,
                        });
                        Ok(response)
                    }
                    // A failed connect gives the head back, as the pool does.
                    Err(kind) if kind.retry_class() == Some(RetryClass::ConnectFailure) => {
                        Err(ProxyError::new(kind)
                            .at_endpoint(endpoint)
                            .with_unsent(Box::new(head)))
                    }
                    Err(kind) => Err(ProxyError::new(kind).at_endpoint(endpoint)),
                }
            });
            fut
        })
    }

    type Answer = Result<Response<ProxyBody>, ErrorKind>;
    type Failure = (&'static str, fn() -> Answer);

    fn status(code: u16) -> Response<ProxyBody> {
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::from_u16(code).unwrap();
        response
    }

    /// Answers the first attempt with `first()`, every later one with 200.
    fn once(first: fn() -> Answer) -> impl Fn(u32) -> Answer + Clone + Send + Sync + 'static {
        move |n| if n == 0 { first() } else { Ok(status(200)) }
    }

    fn refused() -> ErrorKind {
        ErrorKind::ConnectFailed(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    fn retry_layer(policy: RetryPolicy) -> RetryLayer {
        RetryLayer::new(Retries::new(
            &policy,
            None,
            &Arc::from("r"),
            &Metrics::register(&Registry::new()),
            false,
        ))
    }

    fn request(method: Method, body: &'static str) -> Request<ProxyBody> {
        let mut request = Request::new(full(body));
        *request.method_mut() = method;
        request
    }

    async fn run(
        policy: RetryPolicy,
        request: Request<ProxyBody>,
        answer: impl Fn(u32) -> Result<Response<ProxyBody>, ErrorKind> + Clone + Send + Sync + 'static,
    ) -> (Result<Response<ProxyBody>, ProxyError>, Seen) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let service = retry_layer(policy).layer(upstream(seen.clone(), answer));
        let result = service.oneshot(request).await;
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        (result, seen)
    }

    #[tokio::test(start_paused = true)]
    async fn each_retryable_failure_is_retried_on_another_endpoint() {
        let policy = RetryPolicy {
            on: vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::GatewayError,
                RetryOn::RateLimited,
            ],
            status_codes: vec![500],
            non_idempotent: true,
            ..RetryPolicy::default()
        };
        let failures: Vec<Failure> = vec![
            ("connect-failure", || Err(refused())),
            ("connect timeout", || {
                Err(ErrorKind::ConnectTimeout(std::time::Duration::from_secs(1)))
            }),
            ("per-try timeout", || {
                Err(ErrorKind::AttemptTimeout(std::time::Duration::from_secs(1)))
            }),
            ("502", || Ok(status(502))),
            ("503", || Ok(status(503))),
            ("504", || Ok(status(504))),
            ("429", || Ok(status(429))),
            ("500 from statusCodes", || Ok(status(500))),
        ];
        for (name, failure) in failures {
            let (result, seen) = run(
                policy.clone(),
                request(Method::POST, "prompt"),
                once(failure),
            )
            .await;
            assert_eq!(result.unwrap().status(), 200, "{name}");
            assert_eq!(seen.attempts.len(), 2, "{name}");
            let (_, avoid, body) = &seen.attempts[1];
            assert_eq!(avoid, &[SocketAddr::from(([127, 0, 0, 1], 9000))], "{name}");
            assert_eq!(body, "prompt", "{name}: the body is sent again");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_are_not_retried() {
        for answer in [400, 404, 500, 501] {
            let (result, seen) = run(
                RetryPolicy::default(),
                request(Method::GET, ""),
                move |_| Ok(status(answer)),
            )
            .await;
            assert_eq!(result.unwrap().status(), answer);
            assert_eq!(seen.attempts.len(), 1, "{answer}");
        }
        let (result, seen) = run(RetryPolicy::default(), request(Method::GET, ""), |_| {
            Err(ErrorKind::NoEndpoint)
        })
        .await;
        assert_eq!(result.unwrap_err().kind().reason(), "no_endpoint");
        assert_eq!(seen.attempts.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn non_idempotent_requests_are_retried_only_when_nothing_reached_the_model() {
        let (result, seen) = run(
            RetryPolicy::default(),
            request(Method::POST, "x"),
            once(|| Ok(status(503))),
        )
        .await;
        assert_eq!(
            result.unwrap().status(),
            503,
            "a 503 may have been processed"
        );
        assert_eq!(seen.attempts.len(), 1);

        let (result, seen) = run(
            RetryPolicy::default(),
            request(Method::POST, "x"),
            once(|| Err(refused())),
        )
        .await;
        assert_eq!(
            result.unwrap().status(),
            200,
            "a refused connect reached no one"
        );
        assert_eq!(seen.attempts.len(), 2);

        let (result, _) = run(
            RetryPolicy::default(),
            request(Method::PUT, "x"),
            once(|| Ok(status(503))),
        )
        .await;
        assert_eq!(result.unwrap().status(), 200, "PUT is idempotent");
    }

    #[test]
    fn a_head_is_kept_only_when_a_sent_attempt_may_be_retried() {
        let metrics = Metrics::register(&Registry::new());
        let keeps = |policy: RetryPolicy, hedge: Option<&HedgePolicy>, http2: bool| {
            let retries = Retries::new(&policy, hedge, &Arc::from("r"), &metrics, http2);
            (retries.keeps_head(true), retries.keeps_head(false))
        };
        let default = RetryPolicy::default;
        assert_eq!(
            keeps(default(), None, false),
            (true, false),
            "HTTP/1.1 backends: a POST is retried only unsent"
        );
        assert_eq!(
            keeps(default(), None, true),
            (true, true),
            "an HTTP/2 backend's refused stream was sent"
        );
        let only_connects = RetryPolicy {
            on: vec![RetryOn::ConnectFailure, RetryOn::GatewayError],
            ..default()
        };
        assert_eq!(keeps(only_connects, None, true), (true, false));
        let non_idempotent = RetryPolicy {
            non_idempotent: true,
            ..default()
        };
        assert_eq!(keeps(non_idempotent, None, false), (true, true));
        let hedge = HedgePolicy::default();
        assert_eq!(keeps(default(), Some(&hedge), false), (true, true));
    }

    /// Sends a `POST` carrying `x-prompt-id` through the default policy to
    /// an upstream whose first connect fails, giving the head back or not,
    /// and returns the status and the heads the upstream was sent.
    async fn post_after_a_failed_connect(give_back: bool) -> (StatusCode, Vec<HeaderMap>) {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let upstream = {
            let heads = heads.clone();
            service_fn(move |request: Request<ProxyBody>| {
                let (head, _) = request.into_parts();
                let mut heads = heads.lock().unwrap();
                heads.push(head.headers.clone());
                let result = if heads.len() > 1 {
                    Ok(status(200))
                } else if give_back {
                    Err(ProxyError::new(refused()).with_unsent(Box::new(head)))
                } else {
                    Err(ProxyError::new(refused()))
                };
                std::future::ready(result)
            })
        };
        let mut request = request(Method::POST, "prompt");
        request
            .headers_mut()
            .insert("x-prompt-id", http::HeaderValue::from_static("42"));
        let result = retry_layer(RetryPolicy::default())
            .layer(upstream)
            .oneshot(request)
            .await;
        let status = match result {
            Ok(response) => response.status(),
            Err(error) => error.kind().status(),
        };
        let heads = std::mem::take(&mut *heads.lock().unwrap());
        (status, heads)
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsent_post_is_retried_with_the_head_it_gave_back() {
        let (status, heads) = post_after_a_failed_connect(true).await;
        assert_eq!(status, 200);
        assert_eq!(heads.len(), 2);
        assert_eq!(heads[1]["x-prompt-id"], "42", "the same head, sent again");

        let (status, heads) = post_after_a_failed_connect(false).await;
        assert_eq!(
            status, 502,
            "no head came back: the failure is the answer, not a headless retry"
        );
        assert_eq!(heads.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_max_retries_and_the_last_answer_is_returned() {
        let policy = RetryPolicy {
            max_retries: 3,
            ..RetryPolicy::default()
        };
        let (result, seen) = run(policy, request(Method::GET, ""), |n| {
            Ok(status(if n == 3 { 504 } else { 503 }))
        })
        .await;
        assert_eq!(result.unwrap().status(), 504);
        assert_eq!(seen.attempts.len(), 4);
        let avoided = &seen.attempts[3].1;
        assert_eq!(avoided.len(), 3, "every failed endpoint is avoided");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_replay_cap_is_not_retried() {
        let policy = RetryPolicy {
            max_replay_bytes: 4,
            ..RetryPolicy::default()
        };
        let (result, seen) = run(
            policy.clone(),
            request(Method::GET, "12345"),
            once(|| Ok(status(503))),
        )
        .await;
        assert_eq!(result.unwrap().status(), 503);
        assert_eq!(seen.attempts.len(), 1);
        assert_eq!(
            seen.attempts[0].2, "12345",
            "the request itself went through whole"
        );

        let (result, _) = run(
            policy,
            request(Method::GET, "1234"),
            once(|| Ok(status(503))),
        )
        .await;
        assert_eq!(result.unwrap().status(), 200, "a body at the cap is kept");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_with_full_jitter_up_to_the_max() {
        let retries = Retries::new(
            &RetryPolicy::default(),
            None,
            &Arc::from("r"),
            &Metrics::register(&Registry::new()),
            false,
        );
        for (retry, ceiling_ms) in [(0, 25), (1, 50), (2, 100), (3, 200), (4, 250), (9, 250)] {
            let waits: Vec<std::time::Duration> =
                (0..2000).map(|_| retries.backoff(retry)).collect();
            let max = waits.iter().max().unwrap().as_secs_f64() * 1000.0;
            let mean = waits.iter().map(|w| w.as_secs_f64()).sum::<f64>() / 2000.0 * 1000.0;
            assert!(
                max <= ceiling_ms as f64 && max > ceiling_ms as f64 * 0.95,
                "retry {retry}: max {max}"
            );
            let half = ceiling_ms as f64 / 2.0;
            assert!(
                (mean - half).abs() < half * 0.1,
                "retry {retry}: mean {mean}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_between_attempts_is_the_backoff_or_retry_after() {
        let started = tokio::time::Instant::now();
        let (result, _) = run(RetryPolicy::default(), request(Method::GET, ""), |n| {
            Ok(if n == 0 {
                let mut r = status(429);
                r.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("3"));
                r
            } else {
                status(200)
            })
        })
        .await;
        // 429 is not in the default conditions.
        assert_eq!(result.unwrap().status(), 429);

        let policy = RetryPolicy {
            on: vec![RetryOn::RateLimited],
            ..RetryPolicy::default()
        };
        let answer = |after: &'static str| {
            move |n: u32| {
                Ok(if n == 0 {
                    let mut r = status(429);
                    r.headers_mut()
                        .insert("retry-after", http::HeaderValue::from_static(after));
                    r
                } else {
                    status(200)
                })
            }
        };
        let (result, _) = run(policy.clone(), request(Method::GET, ""), answer("3")).await;
        assert_eq!(result.unwrap().status(), 200);
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(3));

        let (result, seen) = run(policy, request(Method::GET, ""), answer("11")).await;
        assert_eq!(
            result.unwrap().status(),
            429,
            "a Retry-After past maxRetryAfter (10s) goes to the client"
        );
        assert_eq!(seen.attempts.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_stops_a_retry_storm() {
        let policy = RetryPolicy {
            max_retries: 5,
            budget: infermesh_api::RetryBudget {
                percent: 20,
                min_retry_concurrency: 3,
            },
            ..RetryPolicy::default()
        };
        let seen = Arc::new(Mutex::new(Seen::default()));
        let metrics = Metrics::register(&Registry::new());
        let service = RetryLayer::new(Retries::new(
            &policy,
            None,
            &Arc::from("r"),
            &metrics,
            false,
        ))
        .layer(upstream(seen.clone(), |_| Ok(status(503))));
        let requests = 50;
        let calls: Vec<_> = (0..requests)
            .map(|_| tokio::spawn(service.clone().oneshot(request(Method::GET, ""))))
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().status(), 503);
        }
        let attempts = seen.lock().unwrap().attempts.len();
        // Without a budget: 50 × 6 = 300 attempts. With it, 10 retries may
        // be in flight while all 50 requests are, fewer as they finish.
        assert!(attempts <= requests + 10 * 6, "{attempts} attempts");
        assert!(attempts > requests, "some retries were allowed");
        assert!(
            metrics
                .retry_budget_exhausted
                .with_label_values(&["r"])
                .get()
                > 0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_refused_by_the_backend_limit_returns_the_first_answer() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let metrics = Metrics::register(&Registry::new());
        let service = RetryLayer::new(Retries::new(
            &RetryPolicy::default(),
            None,
            &Arc::from("r"),
            &metrics,
            false,
        ))
        .layer(upstream(seen.clone(), |n| {
            if n == 0 {
                let mut failed = Response::new(full("model loading"));
                *failed.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                Ok(failed)
            } else {
                Err(ErrorKind::Overloaded(Limit::Retries))
            }
        }));
        let response = service.oneshot(request(Method::GET, "")).await.unwrap();
        assert_eq!(response.status(), 503);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "model loading", "the failed answer, body and all");
        assert_eq!(seen.lock().unwrap().attempts.len(), 2);
        let made = metrics
            .retries
            .with_label_values(&["r", "gateway-error"])
            .get();
        assert_eq!(made, 0, "a refused retry is not counted as made");
    }

    /// Notes when it is dropped.
    struct Released(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Released {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_answer_is_let_go_before_the_retry() {
        // A response body holds its connection and circuit-breaker slots;
        // the retry must not wait for them while the body is kept.
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = released.clone();
        let (result, _) = run(RetryPolicy::default(), request(Method::GET, ""), move |n| {
            if n == 0 {
                let body = holding(full("busy"), Released(flag.clone()));
                let mut failed = Response::new(body);
                *failed.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                Ok(failed)
            } else {
                assert!(flag.load(Ordering::SeqCst), "first answer still held");
                Ok(status(200))
            }
        })
        .await;
        assert_eq!(result.unwrap().status(), 200);
        assert!(released.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_statuses_are_read_from_headers_and_from_early_trailers() {
        let policy = RetryPolicy {
            grpc_statuses: vec![GrpcStatus::Unavailable],
            non_idempotent: true,
            ..RetryPolicy::default()
        };
        let grpc = |in_trailers: bool, code: &'static str| {
            let mut response = if in_trailers {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static(code));
                Response::new(boxed(http_body_util::StreamBody::new(one_frame(
                    Frame::trailers(trailers),
                ))))
            } else {
                let mut r = Response::new(empty());
                r.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static(code));
                r
            };
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        };
        for in_trailers in [false, true] {
            let (result, seen) = run(policy.clone(), request(Method::POST, ""), move |n| {
                Ok(grpc(in_trailers, if n == 0 { "14" } else { "0" }))
            })
            .await;
            let response = result.unwrap();
            assert_eq!(seen.attempts.len(), 2, "trailers: {in_trailers}");
            if in_trailers {
                let trailers = response
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .trailers()
                    .cloned();
                assert_eq!(
                    trailers.unwrap()["grpc-status"],
                    "0",
                    "the peeked trailers are kept"
                );
            }
            let (_, seen) = run(policy.clone(), request(Method::POST, ""), move |_| {
                Ok(grpc(in_trailers, "5"))
            })
            .await;
            assert_eq!(seen.attempts.len(), 1, "NOT_FOUND is not retried");
        }
    }

    /// A stream of one body frame.
    fn one_frame(
        frame: Frame<Bytes>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, crate::core::body::BoxError>> + Send
    {
        futures_util::stream::iter([Ok(frame)])
    }
    #[tokio::test(start_paused = true)]
    async fn a_hedged_post_sends_its_whole_body_again() {
        let hedge = HedgePolicy {
            delay: infermesh_api::Duration::from_millis(50),
            ..HedgePolicy::default()
        };
        let policy = RetryPolicy {
            non_idempotent: true,
            ..RetryPolicy::default()
        };
        let layer = RetryLayer::new(Retries::new(
            &policy,
            Some(&hedge),
            &Arc::from("r"),
            &Metrics::register(&Registry::new()),
            false,
        ));
        let seen = Arc::new(Mutex::new(Vec::new()));
        // The first attempt stalls; a hedge answers at once.
        let upstream = {
            let seen = seen.clone();
            service_fn(move |request: Request<ProxyBody>| {
                let seen = seen.clone();
                let fut: BoxFuture<Result<Response<ProxyBody>, ProxyError>> =
                    Box::pin(async move {
                        let attempt = request
                            .extensions()
                            .get::<Attempt>()
                            .cloned()
                            .unwrap_or_default();
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        seen.lock().unwrap().push((attempt.hedge, body));
                        if !attempt.hedge {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                        }
                        Ok(status(200))
                    });
                fut
            })
        };
        let started = tokio::time::Instant::now();
        let response = layer
            .layer(upstream)
            .oneshot(request(Method::POST, "prompt"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        let seen = seen.lock().unwrap();
        assert_eq!(
            *seen,
            [
                (false, Bytes::from("prompt")),
                (true, Bytes::from("prompt"))
            ],
            "the hedge got the same body"
        );
    }
}
