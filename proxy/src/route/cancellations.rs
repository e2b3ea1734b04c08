//! For the route layer's tests: counting the exchanges a fake backend saw
//! dropped before it answered, which is what a model server sees as a
//! cancelled request (a hedge's loser, a fan-out branch no longer needed,
//! an attempt cut by a timeout).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many exchanges were dropped before they answered.
#[derive(Clone, Default)]
pub(crate) struct Cancellations(Arc<AtomicUsize>);

impl Cancellations {
    /// An exchange that counts as cancelled unless it is answered.
    pub(crate) fn start(&self) -> Exchange {
        Exchange(Some(self.clone()))
    }

    /// Exchanges dropped so far.
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One exchange in progress; see [`Cancellations::start`].
pub(crate) struct Exchange(Option<Cancellations>);

impl Exchange {
    /// The exchange answered: it was not cancelled.
    pub(crate) fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(cancellations) = self.0.take() {
            cancellations.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
