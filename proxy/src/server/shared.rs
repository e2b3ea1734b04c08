//! What every connection of the proxy shares: the serving snapshot, read
//! once per request, the metrics, the access log's filter and writer, the
//! tracer, and when the proxy last ran out of file descriptors.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::core::trace::Tracing;
use crate::server::access_entry::{AccessLogWriter, TracingAccessLog};
use crate::server::access_filter::AccessLogFilter;
use crate::server::metrics::Metrics;
use crate::snapshot::Snapshot;

/// State shared by every connection and the tasks that manage the proxy.
pub(crate) struct Shared {
    /// The serving configuration, swapped whole when a config is applied.
    pub snapshot: ArcSwap<Snapshot>,
    /// Every metric family.
    pub metrics: Metrics,
    /// When a listener last could not accept for want of file
    /// descriptors.
    pub out_of_descriptors: Mutex<Option<Instant>>,
    /// Which requests the access log writes a line for.
    pub access_log: AccessLogFilter,
    /// Where the access log's lines go: a `tracing` event each, unless
    /// the application installed a writer of its own.
    pub access_writer: Arc<dyn AccessLogWriter>,
    /// What requests are traced with, when tracing is on.
    pub tracing: Option<Tracing>,
}

/// For how long after running out of file descriptors the proxy says it
/// is not ready, so that load balancers send elsewhere.
const OUT_OF_DESCRIPTORS_UNREADY: Duration = Duration::from_secs(5);

impl Shared {
    /// Shares `snapshot`, `metrics` and the access log's filter with
    /// every connection.
    pub(crate) fn new(snapshot: Snapshot, metrics: Metrics, access_log: AccessLogFilter) -> Self {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            out_of_descriptors: Mutex::new(None),
            access_log,
            access_writer: Arc::new(TracingAccessLog),
            tracing: None,
        }
    }

    /// Writes the access log's lines with `writer`.
    pub(crate) fn with_access_writer(mut self, writer: Arc<dyn AccessLogWriter>) -> Self {
        self.access_writer = writer;
        self
    }

    /// Traces every request with `tracing`.
    pub(crate) fn with_tracing(mut self, tracing: Option<Tracing>) -> Self {
        self.tracing = tracing;
        self
    }

    /// Notes that a listener could not accept for want of file
    /// descriptors.
    pub(crate) fn ran_out_of_descriptors(&self) {
        let mut last = self
            .out_of_descriptors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = Some(Instant::now());
    }

    /// Whether the proxy ran out of file descriptors a moment ago.
    pub(crate) fn is_out_of_descriptors(&self) -> bool {
        let last = self
            .out_of_descriptors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.is_some_and(|at| at.elapsed() < OUT_OF_DESCRIPTORS_UNREADY)
    }
}
