//! A route's time limits: how long the backend may take to send response
//! headers and its first body bytes, how long either side may go quiet
//! mid-body, and how long the whole exchange may last.
//!
//! The idle limit only counts time spent waiting on the sender: while the
//! receiving side is slow to read (backpressure), the clock does not run.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::core::body::{BoxError, BoxFuture, ProxyBody, boxed, first_frame};
use crate::core::error::{ErrorKind, ProxyError, TimeoutError};

/// A route rule's limits; `None` disables one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Until response headers arrive.
    pub response_headers: Option<Duration>,
    /// Until the response body's first bytes (headers held back).
    pub first_event: Option<Duration>,
    /// Quiet time between body frames, either direction.
    pub idle: Option<Duration>,
    /// The whole exchange.
    pub total: Option<Duration>,
}

impl Limits {
    /// The limits configured on a route rule (`0s` disables).
    pub(crate) fn from_config(t: &infermesh_api::RouteTimeouts) -> Self {
        Limits {
            response_headers: t.response_headers.non_zero(),
            first_event: t.first_event.non_zero(),
            idle: t.idle.non_zero(),
            total: t.total.non_zero(),
        }
    }
}

/// Applies [`Limits`] around an inner service.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimeoutLayer(Limits);

impl TimeoutLayer {
    /// A layer enforcing `limits`.
    pub(crate) fn new(limits: Limits) -> Self {
        TimeoutLayer(limits)
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeouts<S>;
    fn layer(&self, inner: S) -> Timeouts<S> {
        Timeouts {
            inner,
            limits: self.0,
        }
    }
}

/// See [`TimeoutLayer`].
#[derive(Clone, Debug)]
pub(crate) struct Timeouts<S> {
    inner: S,
    limits: Limits,
}

impl<S> Service<Request<ProxyBody>> for Timeouts<S>
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

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let limits = self.limits;
        let started = Instant::now();
        let deadline = limits.total.map(|total| (started + total, total));
        let request = if limits.idle.is_some() || deadline.is_some() {
            request.map(|body| {
                boxed(TimedBody::new(
                    body,
                    limits.idle.map(TimeoutError::RequestIdle),
                    deadline,
                ))
            })
        } else {
            request
        };
        let response: BoxFuture<Result<Response<ProxyBody>, ProxyError>> =
            Box::pin(self.inner.call(request));
        Box::pin(async move {
            // Whichever of the headers limit, the first-event limit (which
            // headers come before) and the total deadline ends first applies.
            let limit = [
                limits
                    .response_headers
                    .map(|after| (started + after, ErrorKind::ResponseHeadersTimeout(after))),
                limits
                    .first_event
                    .map(|after| (started + after, ErrorKind::FirstEventTimeout(after))),
                deadline.map(|(at, total)| (at, ErrorKind::RequestTimeout(total))),
            ]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at);
            let response = match limit {
                None => response.await?,
                Some((at, kind)) => match tokio::time::timeout_at(at, response).await {
                    Ok(result) => result?,
                    Err(_) => return Err(ProxyError::new(kind)),
                },
            };
            let response = match limits.first_event {
                None => response,
                Some(after) => {
                    // The total deadline may come first.
                    let (at, kind) = match deadline {
                        Some((total_at, total)) if total_at < started + after => {
                            (total_at, ErrorKind::RequestTimeout(total))
                        }
                        _ => (started + after, ErrorKind::FirstEventTimeout(after)),
                    };
                    match tokio::time::timeout_at(at, first_frame(response)).await {
                        Ok(Ok(response)) => response,
                        Ok(Err(error)) => return Err(ErrorKind::from_response_body(error).into()),
                        Err(_) => return Err(ProxyError::new(kind)),
                    }
                }
            };
            if limits.idle.is_none() && deadline.is_none() {
                return Ok(response);
            }
            Ok(response.map(|body| {
                boxed(TimedBody::new(
                    body,
                    limits.idle.map(TimeoutError::ResponseIdle),
                    deadline,
                ))
            }))
        })
    }
}

/// A body that fails with a [`TimeoutError`] when its sender goes quiet for
/// too long or its deadline passes.
///
/// The timers are made and the clock read only when the reader finds
/// nothing to read: most bodies of model calls (a request, a short
/// answer) are read without ever waiting, and pay for no timer.
pub(crate) struct TimedBody {
    inner: ProxyBody,
    /// The idle limit's error, and its timer once made.
    idle: Option<(TimeoutError, LazyTimer)>,
    /// Whether the idle clock is running: it starts when the reader finds
    /// no frame ready, and stops when one is handed over.
    waiting: bool,
    /// The total limit's error and deadline, and its timer once made.
    deadline: Option<(TimeoutError, Instant, LazyTimer)>,
}

/// A timer made on first use.
type LazyTimer = Option<Pin<Box<Sleep>>>;

impl TimedBody {
    /// Wraps `inner`. `idle` is the error raised after its limit passes
    /// without a frame; `deadline` is when the total limit (given for the
    /// error) runs out.
    pub(crate) fn new(
        inner: ProxyBody,
        idle: Option<TimeoutError>,
        deadline: Option<(Instant, Duration)>,
    ) -> Self {
        TimedBody {
            inner,
            idle: idle.map(|error| (error, None)),
            waiting: false,
            deadline: deadline.map(|(at, total)| (TimeoutError::Total(total), at, None)),
        }
    }
}

/// Polls the timer in `slot` set for `at`, made on first use.
fn expired(slot: &mut LazyTimer, at: Instant, cx: &mut Context<'_>) -> bool {
    slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
        .as_mut()
        .poll(cx)
        .is_ready()
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame);
        }
        if let Some((error, at, timer)) = &mut this.deadline
            && expired(timer, *at, cx)
        {
            return Poll::Ready(Some(Err(Box::new(*error))));
        }
        if let Some((error, timer)) = &mut this.idle {
            if !std::mem::replace(&mut this.waiting, true) {
                // The sender has gone quiet from now on.
                let at = Instant::now() + error.limit();
                match timer {
                    Some(timer) => timer.as_mut().reset(at),
                    None => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
            if timer
                .as_mut()
                .is_some_and(|t| t.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Some(Err(Box::new(*error))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;
    use tower::ServiceExt;

    use super::*;
    use crate::core::body::empty;

    /// A body whose frames the test sends.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn channel_body() -> (mpsc::Sender<Bytes>, ProxyBody) {
        let (tx, rx) = mpsc::channel(4);
        (tx, boxed(ChannelBody(rx)))
    }

    fn timeout_of(result: Option<Result<Frame<Bytes>, BoxError>>) -> TimeoutError {
        let error = result.expect("a frame or an error").expect_err("a timeout");
        *error
            .downcast_ref::<TimeoutError>()
            .expect("a TimeoutError")
    }

    #[tokio::test(start_paused = true)]
    async fn idle_limit_counts_only_time_spent_waiting_on_the_sender() {
        let (tx, body) = channel_body();
        let limit = Duration::from_secs(2);
        let mut body = TimedBody::new(body, Some(TimeoutError::ResponseIdle(limit)), None);

        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());

        // A slow reader: ten seconds pass without anyone asking for a frame.
        tokio::time::advance(Duration::from_secs(10)).await;
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        assert!(
            body.frame().await.unwrap().is_ok(),
            "the reader's slowness is not the sender's idleness"
        );

        // Frames 1.5 s apart keep the stream alive for as long as they come.
        for _ in 0..10 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                tx.send(Bytes::from_static(b"c")).await.unwrap();
            });
            assert!(body.frame().await.unwrap().is_ok());
        }

        // Then the sender stalls: cut exactly at the limit.
        let waited = Instant::now();
        let error = timeout_of(body.frame().await);
        assert_eq!(error, TimeoutError::ResponseIdle(limit));
        assert_eq!(waited.elapsed(), limit);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_cuts_a_busy_stream() {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if tx.send(Bytes::from_static(b"token")).await.is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        let total = Duration::from_secs(5);
        let mut body = TimedBody::new(
            body,
            Some(TimeoutError::ResponseIdle(Duration::from_secs(1))),
            Some((started + total, total)),
        );
        let mut frames = 0;
        let error = loop {
            match body.frame().await {
                Some(Ok(_)) => frames += 1,
                other => break timeout_of(other),
            }
        };
        assert_eq!(error, TimeoutError::Total(total));
        assert_eq!(started.elapsed(), total);
        assert!(
            (48..=50).contains(&frames),
            "{frames} frames before the deadline"
        );
    }

    async fn time_to_headers(
        limits: Limits,
    ) -> (Result<Response<ProxyBody>, ProxyError>, Duration) {
        let slow = tower::service_fn(|_req: Request<ProxyBody>| async {
            tokio::time::sleep(Duration::from_secs(100)).await;
            Ok::<_, ProxyError>(Response::new(empty()))
        });
        let started = Instant::now();
        let result = TimeoutLayer::new(limits)
            .layer(slow)
            .oneshot(Request::new(empty()))
            .await;
        (result, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_earlier_of_the_headers_limit_and_the_deadline_applies() {
        let secs = |s| Some(Duration::from_secs(s));
        let (result, after) = time_to_headers(Limits {
            response_headers: secs(10),
            total: secs(5),
            idle: None,
            first_event: None,
        })
        .await;
        assert_eq!(result.unwrap_err().kind().reason(), "request_timeout");
        assert_eq!(after, Duration::from_secs(5));

        let (result, after) = time_to_headers(Limits {
            response_headers: secs(10),
            total: secs(60),
            idle: None,
            first_event: None,
        })
        .await;
        assert_eq!(
            result.unwrap_err().kind().reason(),
            "response_headers_timeout"
        );
        assert_eq!(after, Duration::from_secs(10));

        let (result, after) = time_to_headers(Limits::default()).await;
        assert!(result.is_ok(), "no limit, no timeout");
        assert_eq!(after, Duration::from_secs(100));
    }

    /// A server that sends its headers at once and its first event after
    /// `first_ms`.
    async fn first_event_after(
        first_ms: u64,
        limits: Limits,
    ) -> (Result<Response<ProxyBody>, ProxyError>, Duration) {
        let sse = tower::service_fn(move |_req: Request<ProxyBody>| async move {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(first_ms)).await;
                let _ = tx.send(Bytes::from_static(b"data: 1\n\n")).await;
            });
            Ok::<_, ProxyError>(Response::new(boxed(ChannelBody(rx))))
        });
        let started = Instant::now();
        let result = TimeoutLayer::new(limits)
            .layer(sse)
            .oneshot(Request::new(empty()))
            .await;
        (result, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_event_limit_holds_the_headers_until_the_first_bytes() {
        let limits = Limits {
            response_headers: Some(Duration::from_secs(1)),
            first_event: Some(Duration::from_secs(5)),
            ..Limits::default()
        };
        // Headers at once, the first event in 3 s: within the limit, and
        // the response is handed on only with its first bytes.
        let (result, after) = first_event_after(3_000, limits).await;
        assert_eq!(after, Duration::from_secs(3));
        let mut body = result.unwrap().into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "data: 1\n\n");

        // No headers for 8 s: the first-event limit covers them too.
        let late_headers = tower::service_fn(|_req: Request<ProxyBody>| async {
            tokio::time::sleep(Duration::from_secs(8)).await;
            Ok::<_, ProxyError>(Response::new(crate::core::body::full("late")))
        });
        let started = Instant::now();
        let error = TimeoutLayer::new(Limits {
            response_headers: Some(Duration::from_secs(60)),
            ..limits
        })
        .layer(late_headers)
        .oneshot(Request::new(empty()))
        .await
        .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(error.kind().reason(), "first_event_timeout");

        // Headers at once, nothing for 8 s: a clean 504 at 5 s, although
        // the headers came well within their own limit.
        let (result, after) = first_event_after(8_000, limits).await;
        assert_eq!(after, Duration::from_secs(5));
        let error = result.unwrap_err();
        assert_eq!(error.kind().reason(), "first_event_timeout");
        assert_eq!(error.kind().status(), http::StatusCode::GATEWAY_TIMEOUT);

        // A total limit that ends first wins.
        let (result, after) = first_event_after(
            8_000,
            Limits {
                total: Some(Duration::from_secs(2)),
                ..limits
            },
        )
        .await;
        assert_eq!(after, Duration::from_secs(2));
        assert_eq!(result.unwrap_err().kind().reason(), "request_timeout");
    }
}
