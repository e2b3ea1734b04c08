//! Polling a future only when it has been woken: for the futures a task
//! waits on beside a busy one.
//!
//! A task polls every branch of a `select!` each time anything wakes it.
//! A client connection's task is woken several times per request by
//! hyper's connection, while its watchdog and the drain signal beside it
//! wait on timers and notifications that rarely fire; polling them on
//! every wake cost more than a thousand instructions per request. Wrapped
//! in [`PollWhenWoken`], such a future is polled on its first poll and
//! afterwards only when its own waker was called, as `FuturesUnordered`
//! does for each of its futures.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// A future that polls its inner future only when that asked to be polled
/// (see the module docs).
pub(crate) struct PollWhenWoken<F> {
    inner: Pin<Box<F>>,
    flag: Arc<WakeFlag>,
}

/// The waker given to the inner future: it notes the wake and wakes the
/// task that polls the wrapper.
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> PollWhenWoken<F> {
    /// Wraps `inner`, which is polled on the wrapper's first poll.
    pub(crate) fn new(inner: F) -> Self {
        PollWhenWoken {
            inner: Box::pin(inner),
            flag: Arc::new(WakeFlag {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for PollWhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // Registered before the flag is read: a wake in between is seen
        // now or wakes this task again.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.flag.clone());
        this.inner.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A future that counts its polls and is ready once `ready` is set,
    /// waking whoever polled it last when it is.
    #[derive(Clone, Default)]
    struct Gate {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waiter: Arc<AtomicWaker>,
    }

    impl Gate {
        fn open(&self) {
            self.ready.store(true, Ordering::Release);
            self.waiter.wake();
        }
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.waiter.register(cx.waker());
            if self.ready.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_inner_future_is_polled_only_when_it_was_woken() {
        let gate = Gate::default();
        let mut waiting = PollWhenWoken::new(gate.clone());
        let mut busy = 0;
        // The task is woken many times by a busy neighbour (a zero sleep
        // each round): the gate is polled once, on the first poll.
        let outcome = std::future::poll_fn(|cx| {
            if let Poll::Ready(()) = Pin::new(&mut waiting).poll(cx) {
                return Poll::Ready("gate");
            }
            busy += 1;
            if busy == 100 {
                return Poll::Ready("busy");
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
        assert_eq!(outcome, "busy");
        assert_eq!(gate.polls.load(Ordering::Relaxed), 1);
        // Opened, it wakes the task, is polled again, and is ready.
        let opener = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            opener.open();
        });
        waiting.await;
        assert_eq!(gate.polls.load(Ordering::Relaxed), 2);
    }
}
