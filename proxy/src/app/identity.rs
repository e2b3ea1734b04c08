//! The proxy's own workload identity: its SPIFFE certificate, key and trust
//! bundle, read from PEM files (as a Kubernetes secret or a cert-manager
//! volume provides them) into the hot-swappable store that every TLS
//! handshake reads. The files are watched and read again when they change
//! (and on SIGHUP); a new certificate applies to the next handshake, open
//! connections carry on, and a bad file is refused while the old material
//! stays.

use std::path::PathBuf;
use std::sync::Arc;

use infermesh_certs::{CertStore, StoreError};
use notify::RecommendedWatcher;
use prometheus::{Gauge, IntCounterVec};
use tokio::sync::mpsc;

use crate::app::config_file;
use crate::core::metrics::Registry;

/// Where the identity's files are.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The trusted roots (PEM); several during a root rotation.
    pub bundle: PathBuf,
}

/// The loaded identity and its metrics.
pub(crate) struct Identity {
    files: IdentityFiles,
    store: Arc<CertStore>,
    expiry: Gauge,
    reloads: IntCounterVec,
}

impl Identity {
    /// Loads the files, refusing to start on any problem (the error names
    /// the file), and registers
    /// `infermesh_identity_cert_expiry_timestamp_seconds` and
    /// `infermesh_identity_reloads_total{result}`.
    pub(crate) fn load(files: IdentityFiles, registry: &Registry) -> Result<Self, StoreError> {
        let store = Arc::new(CertStore::load_files(
            &files.cert,
            &files.key,
            &files.bundle,
        )?);
        let expiry = registry.float_gauge(
            "infermesh_identity_cert_expiry_timestamp_seconds",
            "When the proxy's workload certificate expires (Unix time).",
        );
        let reloads = registry.counter(
            "infermesh_identity_reloads_total",
            "Reloads of the proxy's certificate files, by result.",
            &["result"],
        );
        let identity = Identity {
            files,
            store,
            expiry,
            reloads,
        };
        identity.record();
        Ok(identity)
    }

    /// The store every handshake reads.
    pub(crate) fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// Reads the files again and swaps in what they hold, or keeps the
    /// current material and logs why not.
    pub(crate) fn reload(&self) {
        let files = &self.files;
        match self
            .store
            .reload_files(&files.cert, &files.key, &files.bundle)
        {
            Ok(()) => {
                self.reloads.with_label_values(&["success"]).inc();
                self.record();
                let certificate = self.store.certificate();
                tracing::info!(
                    identity = certificate.as_ref().map(|c| c.identity.to_string()),
                    not_after = self.store.not_after_unix(),
                    "identity certificate loaded"
                );
            }
            Err(e) => {
                self.reloads.with_label_values(&["failure"]).inc();
                tracing::error!(error = %e, "identity files refused; the current certificate stays");
            }
        }
    }

    fn record(&self) {
        if let Some(not_after) = self.store.not_after_unix() {
            self.expiry.set(not_after as f64);
        }
    }

    /// Watches the directories of the three files, sending on `changed`
    /// when something in them changes. The watchers must be kept alive.
    pub(crate) fn watch(
        &self,
        changed: mpsc::Sender<()>,
    ) -> notify::Result<Vec<RecommendedWatcher>> {
        let mut directories: Vec<PathBuf> = Vec::new();
        let mut watchers = Vec::new();
        for file in [&self.files.cert, &self.files.key, &self.files.bundle] {
            let directory = std::path::absolute(file)?
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            if !directories.contains(&directory) {
                watchers.push(config_file::watch(file, changed.clone())?);
                directories.push(directory);
            }
        }
        Ok(watchers)
    }
}
