//! Running the proxy, as a gateway or as a sidecar, from one YAML file:
//! loads the file, binds its listeners and the operator servers, and then
//! applies changes to the file (seen by a watch, or on SIGHUP) without
//! dropping a request, until SIGTERM or `POST /drain` drains it. A gateway
//! runs the file as written; a sidecar ([`crate::app::sidecar`]) adds its
//! capture listeners as built-in documents the file may replace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use infermesh_api::Source;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::app::admin::{self, Admin};
use crate::app::config_file::{self, ConfigFileError, FileText};
use crate::app::identity::{Identity, IdentityFiles};
use crate::app::lifecycle::Lifecycle;
use crate::app::logging::LogControl;
use crate::app::metrics::Metrics;
use crate::app::sidecar;
use crate::core::metrics::Registry;
use crate::server::listener::{BindError, Listeners};
use crate::server::shared::Shared;
use crate::snapshot::{BuildError, Snapshot};

/// What the proxy runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A gateway in front of model servers: the file as written.
    Gateway,
    /// A pod's sidecar: the file plus the capture listeners
    /// (`inbound` and `outbound`), which it may replace.
    Sidecar,
}

impl Mode {
    /// The documents loaded with the file, which it may replace by
    /// defining a resource of the same kind and name.
    pub fn built_in(self) -> &'static [Source<'static>] {
        match self {
            Mode::Gateway => &[],
            Mode::Sidecar => sidecar::BUILT_IN,
        }
    }
}

/// How the proxy is started.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Gateway or sidecar.
    pub mode: Mode,
    /// The YAML file with the proxy's listeners, backends, routes and
    /// policies.
    pub config: PathBuf,
    /// Admin server address (keep it on loopback).
    pub admin_address: SocketAddr,
    /// Health and metrics server address.
    pub health_address: SocketAddr,
    /// How long in-flight requests may take to finish once a shutdown begins.
    pub shutdown_grace_period: Duration,
    /// How long after SIGTERM the listeners keep accepting while `/ready`
    /// already says 503, so that load balancers stop sending first.
    pub drain_delay: Duration,
    /// The proxy's own certificate files, for listeners and backends with
    /// mutual TLS.
    pub identity: Option<IdentityFiles>,
}

/// Why a config could not be applied.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    /// The file could not be read, or is not a valid config.
    #[error(transparent)]
    File(ConfigFileError),
    /// A new listener could not bind.
    #[error(transparent)]
    Bind(BindError),
    /// The config could not become a snapshot.
    #[error(transparent)]
    Build(BuildError),
}

/// Why a reload was attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    FileChanged,
    Signal,
}

/// Runs the proxy until it has been shut down.
pub async fn run(options: RunOptions, log: Arc<LogControl>) -> anyhow::Result<()> {
    // Installed first: a SIGTERM during start-up must drain, not kill.
    let signals = Signals::install()?;
    let registry = Registry::new();
    registry.register(log.dropped_lines_metric());
    // The standard `process_*` metrics: CPU seconds, resident memory, open
    // file descriptors.
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    let metrics = Metrics::register(&registry);
    let server_metrics = crate::server::Metrics::register(&registry);
    let built_in = options.mode.built_in();
    let (config, text) = config_file::load(&options.config, built_in).map_err(|e| match e {
        ConfigFileError::Invalid(d) => anyhow::anyhow!("refusing to start: {d}"),
        other => anyhow::anyhow!(other),
    })?;

    let health_socket = admin::bind("health", options.health_address).await?;
    let admin_socket = admin::bind("admin", options.admin_address).await?;

    let identity = match &options.identity {
        Some(files) => Some(
            Identity::load(files.clone(), &registry)
                .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?,
        ),
        None => None,
    };
    let mut listeners = Listeners::new();
    let plan = listeners.prepare(&config).await?;
    let snapshot = Snapshot::build(
        config,
        &plan.ids,
        &plan.draining,
        None,
        &server_metrics.snapshot,
        identity.as_ref().map(Identity::store),
    )
    .await
    .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    let shared = Arc::new(Shared::new(snapshot, server_metrics));
    listeners.commit(plan, &shared);
    let lifecycle = Arc::new(Lifecycle::default());

    let admin = Arc::new(Admin {
        shared: shared.clone(),
        lifecycle: lifecycle.clone(),
        registry,
        log,
        config_file: options.config.clone(),
    });
    admin::spawn_health(health_socket, admin.clone());
    admin::spawn_admin(admin_socket, admin);

    let mut serving = Serving {
        options,
        shared,
        lifecycle,
        metrics,
        listeners,
        text,
        refused: None,
        identity,
    };
    serving.metrics.applied(&serving.shared.snapshot.load());
    serving.lifecycle.set_serving();
    tracing::info!(version = %serving.shared.snapshot.load().version, "serving");
    serving.serve_until_shutdown(signals).await
}

/// The signals the gateway acts on.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// The running proxy: its config, listeners, identity and state.
struct Serving {
    options: RunOptions,
    shared: Arc<Shared>,
    lifecycle: Arc<Lifecycle>,
    metrics: Metrics,
    listeners: Listeners,
    /// The text of the config file that is serving.
    text: FileText,
    /// The text of the file as last refused, until it changes.
    refused: Option<FileText>,
    /// The proxy's own certificate, if it has one.
    identity: Option<Identity>,
}

impl Serving {
    async fn serve_until_shutdown(&mut self, mut signals: Signals) -> anyhow::Result<()> {
        let (file_changed, mut changes) = mpsc::channel(1);
        let _watcher = match config_file::watch(&self.options.config, file_changed) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; reload it with SIGHUP");
                None
            }
        };
        let (identity_changed, mut identity_changes) = mpsc::channel(1);
        let _identity_watchers = match self.identity.as_ref().map(|i| i.watch(identity_changed)) {
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot watch the identity files; reload them with SIGHUP");
                None
            }
            watching => watching.and_then(Result::ok),
        };
        loop {
            tokio::select! {
                Some(()) = changes.recv() => {
                    // Let a burst of writes settle, then read once.
                    tokio::time::sleep(config_file::SETTLE).await;
                    while changes.try_recv().is_ok() {}
                    self.reload(Trigger::FileChanged).await;
                }
                Some(()) = identity_changes.recv() => {
                    tokio::time::sleep(config_file::SETTLE).await;
                    while identity_changes.try_recv().is_ok() {}
                    if let Some(identity) = &self.identity {
                        identity.reload();
                    }
                }
                _ = signals.hangup.recv() => {
                    if let Some(identity) = &self.identity {
                        identity.reload();
                    }
                    self.reload(Trigger::Signal).await
                }
                _ = self.lifecycle.drain_requested() => {
                    self.drain().await;
                }
                _ = signals.terminate.recv() => break,
                _ = signals.interrupt.recv() => break,
            }
        }
        self.lifecycle.begin_drain();
        tracing::info!(grace_period = ?self.options.shutdown_grace_period, drain_delay = ?self.options.drain_delay, "shutting down");
        if !self.options.drain_delay.is_zero() {
            // Not ready, still accepting: clients learn of the shutdown from
            // their load balancer before connections are refused.
            tokio::time::sleep(self.options.drain_delay).await;
        }
        self.drain().await;
        tracing::info!("shut down");
        Ok(())
    }

    /// Stops accepting and waits, at most the grace period, for open
    /// connections to finish their requests.
    async fn drain(&mut self) {
        let grace = self.options.shutdown_grace_period;
        if tokio::time::timeout(grace, self.listeners.drain())
            .await
            .is_err()
        {
            tracing::warn!(grace_period = ?grace, "connections still open after the grace period; closing them");
        } else {
            tracing::info!("all connections drained");
        }
    }

    async fn reload(&mut self, trigger: Trigger) {
        if self.lifecycle.is_draining() {
            tracing::info!("draining; config changes are no longer applied");
            return;
        }
        let text = match config_file::read(&self.options.config) {
            Ok(text) => text,
            Err(e) => return self.refuse(&ReloadError::File(e)),
        };
        if text == self.text {
            if self.refused.is_some() {
                tracing::info!(version = %self.shared.snapshot.load().version, "config file is back to the serving version");
                self.accept(text);
            } else if trigger == Trigger::Signal {
                tracing::info!(version = %self.shared.snapshot.load().version, "config file unchanged");
            }
            return;
        }
        // A change elsewhere in the directory is no reason to refuse the
        // same broken file again; SIGHUP asks for it explicitly.
        if trigger == Trigger::FileChanged && self.refused.as_ref() == Some(&text) {
            return;
        }
        match self.apply(&text).await {
            Ok(()) => self.accept(text),
            Err(e) => {
                self.refused = Some(text);
                self.refuse(&e);
            }
        }
    }

    /// Validates `text` and, if it is valid, swaps in its snapshot and
    /// brings the listeners in line. Nothing changes on an error.
    async fn apply(&mut self, text: &FileText) -> Result<(), ReloadError> {
        let config = config_file::parse(&self.options.config, text, self.options.mode.built_in())
            .map_err(ReloadError::File)?;
        let current = self.shared.snapshot.load_full();
        if config.version() == current.version {
            tracing::info!(version = %current.version, "config file changed, but not its meaning");
            return Ok(());
        }
        let plan = self
            .listeners
            .prepare(&config)
            .await
            .map_err(ReloadError::Bind)?;
        let snapshot = Snapshot::build(
            config,
            &plan.ids,
            &plan.draining,
            Some(&current),
            &self.shared.metrics.snapshot,
            self.identity.as_ref().map(Identity::store),
        )
        .await
        .map_err(ReloadError::Build)?;
        let version = snapshot.version.clone();
        self.shared.snapshot.store(Arc::new(snapshot));
        self.listeners.commit(plan, &self.shared);
        self.metrics.reloaded();
        self.metrics.applied(&self.shared.snapshot.load());
        tracing::info!(version = %version, previous = %current.version, "config applied");
        Ok(())
    }

    /// Remembers `text` as the file content being served.
    fn accept(&mut self, text: FileText) {
        self.text = text;
        self.refused = None;
        self.metrics.last_reload_successful.set(1);
    }

    fn refuse(&self, error: &ReloadError) {
        let version = self.shared.snapshot.load().version.clone();
        match error {
            ReloadError::File(ConfigFileError::Invalid(diagnostics)) => {
                for d in diagnostics.iter() {
                    tracing::error!(target: "infermesh::config", "{d}");
                }
                tracing::error!(errors = diagnostics.len(), version = %version, "config refused; still serving the previous version");
            }
            other => {
                tracing::error!(error = %other, version = %version, "config refused; still serving the previous version")
            }
        }
        self.metrics.refused();
    }
}
