//! Which worker the running code is on. The proxy serves traffic on
//! workers, each a thread with a single-threaded tokio runtime of its own
//! (thread per core, as Envoy and Pingora run): a connection and every
//! request it carries stay on the worker that accepted it. What is kept
//! per worker, so that one worker never hands its work to another (the
//! idle upstream connections), is indexed by [`current`].

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Workers the proxy runs; set once at start.
static COUNT: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's worker; 0 on any thread that is not one.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// How many workers the proxy runs (1 until [`set_count`]).
pub(crate) fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Says the proxy runs `workers` workers (at least 1). Called at start,
/// before anything that keeps state per worker is made.
pub(crate) fn set_count(workers: usize) {
    COUNT.store(workers.max(1), Ordering::Relaxed);
}

/// The worker this thread is: from 0 to [`count`] − 1.
pub(crate) fn current() -> usize {
    CURRENT.with(Cell::get).min(count() - 1)
}

/// Marks this thread as worker `index`.
pub(crate) fn enter(index: usize) {
    CURRENT.with(|current| current.set(index));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_the_worker_it_entered_as() {
        let (before, entered) = std::thread::spawn(|| {
            let before = current();
            enter(1);
            (before, CURRENT.with(Cell::get))
        })
        .join()
        .unwrap();
        assert_eq!(before, 0, "a thread that is no worker counts as the first");
        assert_eq!(entered, 1);
    }
}
