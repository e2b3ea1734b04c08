//! A backend's circuit-breaker limits: requests in flight, retries in
//! flight, open connections and requests waiting for one. Past a limit a
//! request is refused at once (503 `overloaded`), so an overloaded model
//! server sheds load at the proxy instead of piling up a queue.
//!
//! Slots are plain atomic counters released by guards; the connection
//! limit is a semaphore whose permits live as long as the connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use infermesh_api::CircuitBreaker;
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::core::error::{ErrorKind, Limit};

/// The limits of one backend and what is in use of each.
#[derive(Debug)]
pub(crate) struct Breaker {
    limits: CircuitBreaker,
    requests: Arc<AtomicU32>,
    retries: Arc<AtomicU32>,
    connections: Arc<Semaphore>,
    pending: Arc<AtomicU32>,
    overloaded: [IntCounter; 4],
}

/// Holds a request's slot (and its retry slot, for a retry) until the
/// response ends.
#[derive(Debug)]
pub(crate) struct Admission {
    _request: Slot,
    _retry: Option<Slot>,
}

#[derive(Debug)]
struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one of `max` slots of `counter`, or none.
fn take(counter: &Arc<AtomicU32>, max: u32) -> Option<Slot> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(counter.clone()))
}

impl Breaker {
    /// The breaker of backend `name`; `overloaded` is
    /// `infermesh_overloaded_total{backend,limit}`.
    pub(crate) fn new(name: &str, limits: CircuitBreaker, overloaded: &IntCounterVec) -> Self {
        Breaker {
            limits,
            requests: Arc::default(),
            retries: Arc::default(),
            connections: Arc::new(Semaphore::new(limits.max_connections as usize)),
            pending: Arc::default(),
            overloaded: Limit::ALL
                .map(|limit| overloaded.with_label_values(&[name, limit.as_str()])),
        }
    }

    /// Admits a request, or refuses it when the backend is at
    /// `maxRequests`, or at `maxRetries` for a retry.
    pub(crate) fn admit(&self, retry: bool) -> Result<Admission, ErrorKind> {
        let retry = if retry {
            Some(
                take(&self.retries, self.limits.max_retries)
                    .ok_or_else(|| self.refuse(Limit::Retries))?,
            )
        } else {
            None
        };
        let request = take(&self.requests, self.limits.max_requests)
            .ok_or_else(|| self.refuse(Limit::Requests))?;
        Ok(Admission {
            _request: request,
            _retry: retry,
        })
    }

    fn refuse(&self, limit: Limit) -> ErrorKind {
        self.overloaded[limit as usize].inc();
        ErrorKind::Overloaded(limit)
    }

    /// A permit to open one more connection, if the backend is below
    /// `maxConnections`. The permit is returned when dropped, with the
    /// connection.
    pub(crate) fn try_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// A permit for one more connection, or a refusal at once. For HTTP/2,
    /// whose one connection per endpoint stays open while it is in use:
    /// waiting would mean waiting for another endpoint's connection to
    /// break.
    pub(crate) fn connection_now(&self) -> Result<OwnedSemaphorePermit, ErrorKind> {
        self.try_connection()
            .ok_or_else(|| self.refuse(Limit::Connections))
    }

    /// Waits for a connection permit as one of at most
    /// `maxPendingRequests` waiters; refuses at once past that.
    pub(crate) async fn wait_for_connection(&self) -> Result<OwnedSemaphorePermit, ErrorKind> {
        let limit = if self.limits.max_pending_requests == 0 {
            Limit::Connections
        } else {
            Limit::PendingRequests
        };
        let _waiting = take(&self.pending, self.limits.max_pending_requests)
            .ok_or_else(|| self.refuse(limit))?;
        Ok(self
            .connections
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed"))
    }

    /// Whether requests are waiting for a connection: a connection that
    /// finishes an exchange is then closed, handing its permit on, rather
    /// than kept idle.
    pub(crate) fn has_waiters(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Requests in flight.
    pub(crate) fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metrics::Registry;

    fn breaker(limits: CircuitBreaker) -> Breaker {
        let overloaded = Registry::new().counter(
            "infermesh_overloaded_total",
            "Refused.",
            &["backend", "limit"],
        );
        Breaker::new("b", limits, &overloaded)
    }

    #[test]
    fn requests_past_the_limit_are_refused_until_one_finishes() {
        let b = breaker(CircuitBreaker {
            max_requests: 2,
            ..CircuitBreaker::default()
        });
        let first = b.admit(false).unwrap();
        let _second = b.admit(false).unwrap();
        assert!(matches!(
            b.admit(false),
            Err(ErrorKind::Overloaded(Limit::Requests))
        ));
        drop(first);
        assert!(b.admit(false).is_ok());
        assert_eq!(b.overloaded[Limit::Requests as usize].get(), 1);
    }

    #[test]
    fn retries_have_their_own_limit() {
        let b = breaker(CircuitBreaker {
            max_retries: 1,
            ..CircuitBreaker::default()
        });
        let _retry = b.admit(true).unwrap();
        assert!(matches!(
            b.admit(true),
            Err(ErrorKind::Overloaded(Limit::Retries))
        ));
        let _first = b.admit(false).expect("first attempts are not retries");
        assert_eq!(b.requests(), 2, "the refused retry took no request slot");
    }

    #[tokio::test(start_paused = true)]
    async fn connection_waiters_are_bounded() {
        let b = Arc::new(breaker(CircuitBreaker {
            max_connections: 1,
            max_pending_requests: 1,
            ..CircuitBreaker::default()
        }));
        let permit = b.try_connection().unwrap();
        assert!(b.try_connection().is_none());
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait_for_connection().await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert!(b.has_waiters());
        assert!(matches!(
            b.wait_for_connection().await,
            Err(ErrorKind::Overloaded(Limit::PendingRequests))
        ));
        drop(permit);
        waiter.await.unwrap().unwrap();
        assert!(!b.has_waiters());

        let no_queue = breaker(CircuitBreaker {
            max_connections: 1,
            max_pending_requests: 0,
            ..CircuitBreaker::default()
        });
        let _held = no_queue.try_connection().unwrap();
        assert!(matches!(
            no_queue.wait_for_connection().await,
            Err(ErrorKind::Overloaded(Limit::Connections))
        ));
    }
}
