//! What every connection of the proxy shares: the serving snapshot, read
//! once per request, and the metrics.

use arc_swap::ArcSwap;

use crate::server::metrics::Metrics;
use crate::snapshot::Snapshot;

/// State shared by every connection and the tasks that manage the proxy.
pub(crate) struct Shared {
    /// The serving configuration, swapped whole when a config is applied.
    pub snapshot: ArcSwap<Snapshot>,
    /// Every metric family.
    pub metrics: Metrics,
}
