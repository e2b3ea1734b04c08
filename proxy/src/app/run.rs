//! Running the proxy, as a gateway or as a sidecar, from one YAML file or
//! from the control plane: loads the config, binds its listeners and the
//! operator servers, and then applies changes (to the file, seen by a
//! watch or on SIGHUP; or pushed by the control plane) without dropping a
//! request, until SIGTERM or `POST /drain` drains it. A gateway runs the
//! file as written; a sidecar ([`crate::app::sidecar`]) adds its capture
//! listeners as built-in documents the config may replace. A proxy fed by
//! the control plane ([`crate::app::control_plane`]) serves nothing, and
//! is not ready, until its first certificate and config have come.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use infermesh_api::app_probes::AppProbes;
use infermesh_api::{Config, Source};
use infermesh_certs::CertStore;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::app::admin::{self, Admin};
use crate::app::app_health::AppHealth;
use crate::app::config_file::{self, ConfigFileError, FileText};
use crate::app::control_plane::{self, ControlPlaneOptions, Pushed};
use crate::app::identity::{Identity, IdentityFiles};
use crate::app::lifecycle::Lifecycle;
use crate::app::logging::LogControl;
use crate::app::metrics::Metrics;
use crate::app::sidecar::{self, CaptureAddresses};
use crate::app::workers::Workers;
use crate::core::metrics::Registry;
use crate::core::trace::Tracing;
use crate::server::access_filter::AccessLogFilter;
use crate::server::listener::{BindError, Listeners};
use crate::server::shared::Shared;
use crate::snapshot::{BuildError, Snapshot};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

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
    fn as_str(self) -> &'static str {
        match self {
            Mode::Gateway => "gateway",
            Mode::Sidecar => "sidecar",
        }
    }
}

/// Where the proxy's config comes from.
#[derive(Clone, Debug)]
pub enum ConfigFrom {
    /// A YAML file, watched, with the proxy's listeners, backends, routes
    /// and policies.
    File(PathBuf),
    /// The control plane's push; the control plane also signs the proxy's
    /// certificate.
    ControlPlane(ControlPlaneOptions),
}

/// How the proxy is started.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Gateway or sidecar.
    pub mode: Mode,
    /// Where the config comes from.
    pub config: ConfigFrom,
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
    /// Where a sidecar's capture listeners bind.
    pub capture: CaptureAddresses,
    /// Tracing: spans exported over OTLP; `None`, off.
    pub tracing: Option<infermesh_telemetry::TraceOptions>,
    /// The app's HTTP probes, answered on the health server under
    /// `/app-health/` (`INFERMESH_APP_PROBES`, set by the injector).
    pub app_probes: AppProbes,
    /// Which requests the access log writes a line for.
    pub access_log: AccessLogFilter,
    /// Workers serving traffic ([`crate::app::workers`]): threads with a
    /// single-threaded runtime each, the calling thread the first; every
    /// worker accepts on every listener. `run` must be called on a
    /// single-threaded runtime for the calling thread to be one worker.
    pub workers: usize,
}

impl RunOptions {
    /// The text of the documents loaded with the config, which it may
    /// replace by defining a resource of the same kind and name: a
    /// sidecar's capture listeners.
    fn built_in(&self) -> String {
        match self.mode {
            Mode::Gateway => String::new(),
            Mode::Sidecar => self.capture.built_in_documents(),
        }
    }
}

/// `text` as the built-in documents of a config, if there are any.
fn built_in_sources(text: &str) -> Vec<Source<'_>> {
    if text.is_empty() {
        return Vec::new();
    }
    vec![Source {
        name: sidecar::BUILT_IN_NAME,
        text,
    }]
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
    let built_in = options.built_in();
    let (config, source) = match &options.config {
        ConfigFrom::File(path) => {
            let (config, text) =
                config_file::load(path, &built_in_sources(&built_in)).map_err(|e| match e {
                    ConfigFileError::Invalid(d) => anyhow::anyhow!("refusing to start: {d}"),
                    other => anyhow::anyhow!(other),
                })?;
            let source = ConfigSource::File {
                path: path.clone(),
                text,
                refused: None,
            };
            (config, source)
        }
        // Nothing to serve until the control plane says what.
        ConfigFrom::ControlPlane(_) => (Config::default(), ConfigSource::ControlPlane),
    };

    let health_socket = admin::bind("health", options.health_address).await?;
    let admin_socket = admin::bind("admin", options.admin_address).await?;

    let identity = match &options.identity {
        Some(files) => Some(
            Identity::load(files.clone(), &registry)
                .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?,
        ),
        None => None,
    };
    let (store, updates) = match &options.config {
        ConfigFrom::ControlPlane(cp) => {
            let client = control_plane::start(cp.clone(), options.mode.as_str(), &registry)
                .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
            (Some(client.store), Some(client.updates))
        }
        ConfigFrom::File(_) => (identity.as_ref().map(|i| i.store().clone()), None),
    };
    let workers = Workers::start(options.workers)?;
    let mut listeners = Listeners::new(workers.runtimes());
    let plan = listeners.prepare(&config).await?;
    let snapshot = Snapshot::build(
        config,
        &plan.ids,
        &plan.draining,
        None,
        &server_metrics.snapshot,
        store.as_ref(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    let traces = match &options.tracing {
        Some(trace_options) => Some(infermesh_telemetry::start(trace_options, |c| {
            registry.register(c)
        })?),
        None => None,
    };
    let shared = Arc::new(
        Shared::new(snapshot, server_metrics, options.access_log)
            .with_access_writer(log.access_writer())
            .with_tracing(traces.as_ref().map(|t| Tracing::new(t.tracer.clone()))),
    );
    listeners.commit(plan, &shared);
    let lifecycle = Arc::new(Lifecycle::default());

    let admin = Arc::new(Admin {
        shared: shared.clone(),
        lifecycle: lifecycle.clone(),
        registry,
        log,
        config_file: match &source {
            ConfigSource::File { path, .. } => Some(path.clone()),
            ConfigSource::ControlPlane => None,
        },
        app_health: AppHealth::new(options.app_probes.clone()),
    });
    admin::spawn_health(health_socket, admin.clone());
    admin::spawn_admin(admin_socket, admin);

    let mut serving = Serving {
        options,
        shared,
        lifecycle,
        metrics,
        listeners,
        source,
        identity,
        store,
    };
    if matches!(serving.source, ConfigSource::File { .. }) {
        serving.metrics.applied(&serving.shared.snapshot.load());
        serving.lifecycle.set_serving();
        tracing::info!(version = %serving.shared.snapshot.load().version, "serving");
    } else {
        tracing::info!("waiting for a certificate and a config from the control plane");
    }
    let served = serving.serve_until_shutdown(signals, updates).await;
    // Every connection has drained, or the grace period is over: what
    // still runs on the other workers is dropped with them.
    workers.stop();
    if let Some(traces) = traces {
        // The spans of the last requests, before the process ends.
        traces.shutdown(TRACE_FLUSH_LIMIT).await;
    }
    served
}

/// How long the spans still queued at shutdown may take to export.
const TRACE_FLUSH_LIMIT: Duration = Duration::from_secs(5);

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
    /// Where the config comes from.
    source: ConfigSource,
    /// The proxy's own certificate files, if it reads them.
    identity: Option<Identity>,
    /// The proxy's own certificate, from its files or the control plane.
    store: Option<Arc<CertStore>>,
}

/// Where the serving config came from.
enum ConfigSource {
    File {
        path: PathBuf,
        /// The text of the config file that is serving.
        text: FileText,
        /// The text of the file as last refused, until it changes.
        refused: Option<FileText>,
    },
    ControlPlane,
}

/// The next update the control plane pushed; never, without one.
async fn next_update(updates: &mut Option<mpsc::Receiver<Pushed>>) -> Option<Pushed> {
    match updates {
        Some(updates) => updates.recv().await,
        None => std::future::pending().await,
    }
}

impl Serving {
    async fn serve_until_shutdown(
        &mut self,
        mut signals: Signals,
        mut updates: Option<mpsc::Receiver<Pushed>>,
    ) -> anyhow::Result<()> {
        let (file_changed, mut changes) = mpsc::channel(1);
        let _watcher = match &self.source {
            ConfigSource::File { path, .. } => match config_file::watch(path, file_changed) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the config file; reload it with SIGHUP");
                    None
                }
            },
            ConfigSource::ControlPlane => None,
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
                Some(pushed) = next_update(&mut updates) => {
                    let span = self.shared.tracing.as_ref().and_then(|tracing| {
                        tracing.continue_remote(
                            &pushed.traceparent,
                            "apply config",
                            SpanKind::Consumer,
                            vec![
                                KeyValue::new("infermesh.version", pushed.version.clone()),
                                KeyValue::new("infermesh.resources", pushed.documents.len() as i64),
                            ],
                        )
                    });
                    let applied = self.apply_pushed(&pushed).await;
                    if let Some(span) = span {
                        match &applied {
                            Ok(()) => span.end(vec![KeyValue::new("infermesh.outcome", "applied")], None),
                            Err(e) => span.end_failed(
                                vec![KeyValue::new("infermesh.outcome", "refused")],
                                "refused",
                                e.clone(),
                            ),
                        }
                    }
                    let _ = pushed.applied.send(applied);
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

    /// Applies an update of the control plane whole, or not at all: the
    /// error says why not, for the control plane to record.
    async fn apply_pushed(&mut self, pushed: &Pushed) -> Result<(), String> {
        if self.lifecycle.is_draining() {
            return Err("the proxy is draining; it applies no more config".into());
        }
        let sources: Vec<Source<'_>> = pushed
            .documents
            .iter()
            .map(|(name, text)| Source { name, text })
            .collect();
        let built_in = self.options.built_in();
        let config = Config::load_with_defaults(&sources, &built_in_sources(&built_in))
            .map_err(|d| d.to_string().trim_end().to_owned())?;
        let mesh_only = config.mesh_only_problems();
        if !mesh_only.is_empty() {
            return Err(mesh_only.to_string().trim_end().to_owned());
        }
        match self.apply(config).await {
            Ok(()) => {
                self.metrics.last_reload_successful.set(1);
                if !self.lifecycle.is_ready() {
                    self.metrics.applied(&self.shared.snapshot.load());
                    self.lifecycle.set_serving();
                    tracing::info!(version = %self.shared.snapshot.load().version, control_plane_version = %pushed.version, "serving the control plane's config");
                }
                Ok(())
            }
            Err(e) => {
                self.refuse(&e);
                Err(e.to_string())
            }
        }
    }

    async fn reload(&mut self, trigger: Trigger) {
        if self.lifecycle.is_draining() {
            tracing::info!("draining; config changes are no longer applied");
            return;
        }
        let ConfigSource::File {
            path,
            text: serving,
            refused,
        } = &self.source
        else {
            if trigger == Trigger::Signal {
                tracing::info!(
                    "the config comes from the control plane; SIGHUP reloads only identity files"
                );
            }
            return;
        };
        let path = path.clone();
        let text = match config_file::read(&path) {
            Ok(text) => text,
            Err(e) => return self.refuse(&ReloadError::File(e)),
        };
        if &text == serving {
            if refused.is_some() {
                tracing::info!(version = %self.shared.snapshot.load().version, "config file is back to the serving version");
                self.accept(text);
            } else if trigger == Trigger::Signal {
                tracing::info!(version = %self.shared.snapshot.load().version, "config file unchanged");
            }
            return;
        }
        // A change elsewhere in the directory is no reason to refuse the
        // same broken file again; SIGHUP asks for it explicitly.
        if trigger == Trigger::FileChanged && refused.as_ref() == Some(&text) {
            return;
        }
        let built_in = self.options.built_in();
        let applied = match config_file::parse(&path, &text, &built_in_sources(&built_in)) {
            Ok(config) => self.apply(config).await,
            Err(e) => Err(ReloadError::File(e)),
        };
        match applied {
            Ok(()) => self.accept(text),
            Err(e) => {
                if let ConfigSource::File { refused, .. } = &mut self.source {
                    *refused = Some(text);
                }
                self.refuse(&e);
            }
        }
    }

    /// Swaps in the snapshot of a valid `config` and brings the listeners
    /// in line. Nothing changes on an error.
    async fn apply(&mut self, config: Config) -> Result<(), ReloadError> {
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
            self.store.as_ref(),
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
        if let ConfigSource::File {
            text: serving,
            refused,
            ..
        } = &mut self.source
        {
            *serving = text;
            *refused = None;
        }
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
