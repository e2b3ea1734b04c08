//! The app layer's metric families: which build is running, which config
//! is serving and how its reloads went (the identity's own are registered
//! by `identity`).

use std::time::UNIX_EPOCH;

use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec};

use crate::core::metrics::Registry;
use crate::snapshot::Snapshot;

/// The app layer's metric families.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// `infermesh_config_reloads_total{result}`: reload attempts, by
    /// `success` or `failure`.
    pub config_reloads: IntCounterVec,
    /// `infermesh_config_info{version}`: 1 for the version being served.
    pub config_info: IntGaugeVec,
    /// `infermesh_config_last_reload_successful`: 1 when the last reload
    /// attempt succeeded, 0 when it was refused.
    pub last_reload_successful: IntGauge,
    /// `infermesh_config_last_reload_success_timestamp_seconds`: when the
    /// serving config was applied (Unix time).
    pub last_reload_success_timestamp: Gauge,
}

impl Metrics {
    /// Registers the app layer's families in `registry`.
    pub(crate) fn register(registry: &Registry) -> Self {
        // `infermesh_build_info{version}`: 1, for the running build (the
        // `*_build_info` convention of Prometheus exporters: join on it to
        // see which version each proxy runs). Set once; nothing updates it.
        registry
            .gauge(
                "infermesh_build_info",
                "The running build (value 1).",
                &["version"],
            )
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            config_reloads: registry.counter(
                "infermesh_config_reloads_total",
                "Config reload attempts, by result.",
                &["result"],
            ),
            config_info: registry.gauge(
                "infermesh_config_info",
                "The version of the config being served (value 1).",
                &["version"],
            ),
            last_reload_successful: registry.single_gauge(
                "infermesh_config_last_reload_successful",
                "Whether the last config reload attempt succeeded (1) or was refused (0).",
            ),
            last_reload_success_timestamp: registry.float_gauge(
                "infermesh_config_last_reload_success_timestamp_seconds",
                "Unix time the serving config was applied.",
            ),
        }
    }

    /// Publishes `snapshot` as the serving version.
    pub(crate) fn applied(&self, snapshot: &Snapshot) {
        self.config_info.reset();
        self.config_info
            .with_label_values(&[&snapshot.version])
            .set(1);
        self.last_reload_successful.set(1);
        let applied = snapshot
            .applied_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_reload_success_timestamp
            .set(applied.as_secs_f64());
    }

    /// Counts a reload that applied a new version.
    pub(crate) fn reloaded(&self) {
        self.config_reloads.with_label_values(&["success"]).inc();
    }

    /// Counts a reload that was refused.
    pub(crate) fn refused(&self) {
        self.config_reloads.with_label_values(&["failure"]).inc();
        self.last_reload_successful.set(0);
    }
}
