//! The proxy's lifecycle as health checks and operators see it: ready once
//! a config is serving, and no longer ready from the moment it starts to
//! drain (on SIGTERM or `POST /drain`).

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Readiness and drain state, shared by the servers that report it and the
/// task that acts on it.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    serving: AtomicBool,
    draining: AtomicBool,
    drain_requested: Notify,
}

impl Lifecycle {
    /// Whether `/ready` answers 200: a config is serving and no drain began.
    pub(crate) fn is_ready(&self) -> bool {
        self.serving.load(Ordering::Acquire) && !self.is_draining()
    }

    /// Whether a drain has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Marks the first config as serving.
    pub(crate) fn set_serving(&self) {
        self.serving.store(true, Ordering::Release);
    }

    /// Marks the drain as begun; `false` if it already had.
    pub(crate) fn begin_drain(&self) -> bool {
        !self.draining.swap(true, Ordering::AcqRel)
    }

    /// Asks the task that owns the listeners to drain them.
    pub(crate) fn request_drain(&self) {
        self.drain_requested.notify_one();
    }

    /// Resolves when a drain is requested.
    pub(crate) async fn drain_requested(&self) {
        self.drain_requested.notified().await;
    }
}
