//! A route rule's local rate limit: a token bucket, kept as the generic
//! cell rate algorithm (one atomic "theoretical arrival time", no lock, no
//! refill task). Past the limit a request gets 429 `rate_limited` with a
//! `Retry-After` saying when a token is free.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use prometheus::IntCounter;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::core::body::{BoxFuture, ProxyBody};
use crate::core::error::{ErrorKind, ProxyError};

/// A token bucket: `rate` per second on average, bursts up to `burst`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    /// Time one token takes to refill, in nanoseconds.
    interval: u64,
    /// How far ahead of now the arrival time may run: `burst - 1` tokens.
    tolerance: u64,
    epoch: Instant,
    /// When the bucket would be full again if no request came, in
    /// nanoseconds since `epoch`.
    arrival: AtomicU64,
    refused: IntCounter,
}

impl TokenBucket {
    /// A bucket of `burst` tokens refilled at `rate` per second; `refused`
    /// counts the requests it turns away.
    pub(crate) fn new(rate: u32, burst: u32, refused: IntCounter) -> Self {
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        TokenBucket {
            interval,
            tolerance: interval * u64::from(burst.max(1) - 1),
            epoch: Instant::now(),
            arrival: AtomicU64::new(0),
            refused,
        }
    }

    /// Whether this bucket refills at `rate` per second up to `burst`
    /// tokens, as [`TokenBucket::new`] would make it.
    pub(crate) fn has_limit(&self, rate: u32, burst: u32) -> bool {
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        self.interval == interval && self.tolerance == interval * u64::from(burst.max(1) - 1)
    }

    /// Takes a token at `now`, or says how long until one is free.
    pub(crate) fn take(&self, now: Instant) -> Result<(), Duration> {
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            // Start full: a fresh bucket's arrival time lies a whole burst in
            // the past.
            .saturating_add(self.tolerance + self.interval);
        let mut current = self.arrival.load(Ordering::Acquire);
        loop {
            let arrival = current.max(now);
            if arrival - now > self.tolerance {
                self.refused.inc();
                return Err(Duration::from_nanos(arrival - now - self.tolerance));
            }
            match self.arrival.compare_exchange_weak(
                current,
                arrival + self.interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

/// Refuses requests past a [`TokenBucket`] in front of an inner service.
#[derive(Clone, Debug)]
pub(crate) struct RateLimitLayer(Arc<TokenBucket>);

impl RateLimitLayer {
    /// A layer taking a token of `bucket` for each request.
    pub(crate) fn new(bucket: Arc<TokenBucket>) -> Self {
        RateLimitLayer(bucket)
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            bucket: self.0.clone(),
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub(crate) struct RateLimit<S> {
    inner: S,
    bucket: Arc<TokenBucket>,
}

impl<S> Service<Request<ProxyBody>> for RateLimit<S>
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
        match self.bucket.take(Instant::now()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(wait) => Box::pin(async move { Err(ErrorKind::RateLimited(wait).into()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket::new(rate, burst, IntCounter::new("t", "t").unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_sustained_rate() {
        let b = bucket(10, 5);
        for i in 0..5 {
            assert!(b.take(Instant::now()).is_ok(), "request {i} of the burst");
        }
        let wait = b.take(Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "one token per 100ms");
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(b.take(Instant::now()).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.take(Instant::now()).is_ok());
        assert!(b.take(Instant::now()).is_err());
        assert_eq!(b.refused.get(), 3);

        // A second's quiet refills the whole burst, and no more.
        tokio::time::advance(Duration::from_secs(1)).await;
        let allowed = (0..10).filter(|_| b.take(Instant::now()).is_ok()).count();
        assert_eq!(allowed, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn over_a_long_run_the_rate_holds() {
        let b = bucket(100, 1);
        let mut allowed = 0;
        for _ in 0..10_000 {
            if b.take(Instant::now()).is_ok() {
                allowed += 1;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // 10 seconds at 100/s, offered 1000/s.
        assert_eq!(allowed, 1000);
    }
}
