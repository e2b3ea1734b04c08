//! Where the control plane's config comes from. A [`Source`] publishes
//! whole, validated snapshots of the mesh's config: a change that does not
//! validate is reported, file, line and field, and the last good snapshot
//! stays in force. [`DirectorySource`] reads a directory of the YAML
//! documents the gateway also reads, and reads it again when it changes;
//! the Kubernetes watcher (`kubernetes::source`) is a second
//! implementation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use infermesh_api::{Config, Diagnostic, Diagnostics, Source as ConfigText};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

/// One validated state of the mesh's config.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// A digest of the config: equal configs have equal versions.
    pub version: String,
    /// The config.
    pub config: Arc<Config>,
    /// The workloads the source vouches for (Kubernetes: the injected
    /// Pods), whose labels are used instead of those a proxy declares;
    /// empty for a directory.
    pub workloads: Arc<WorkloadLabels>,
}

/// Pods by namespace and name: the SPIFFE ID of their service account, and
/// their labels.
pub type WorkloadLabels = std::collections::HashMap<
    (String, String),
    (String, std::collections::BTreeMap<String, String>),
>;

/// A source of the mesh's config.
pub trait Source: Send + Sync {
    /// The latest good snapshot, changed each time a new one is accepted.
    fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>>;
}

/// A change that was refused: why, and which version stays in force.
#[derive(Clone, Debug)]
pub struct Refused {
    /// Every problem found, with its file, line, column and field.
    pub diagnostics: Diagnostics,
    /// The version still in force.
    pub kept: String,
}

/// How long a burst of file events must settle before the directory is
/// read again: changes within it coalesce into one snapshot, and a file
/// being written is not read half-way.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The YAML files of a directory (`*.yaml`, `*.yml`, not hidden), read as
/// one config.
pub struct DirectorySource {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    _watcher: RecommendedWatcher,
}

/// The directory could not be watched or its first config loaded.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// Reading the directory or one of its files failed.
    #[error("{path}: {source}")]
    Io {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Watching the directory failed.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: notify::Error,
    },
    /// The config does not validate.
    #[error("the config in {path} is not valid:\n{diagnostics}")]
    Invalid {
        /// The directory.
        path: PathBuf,
        /// Every problem.
        diagnostics: Diagnostics,
    },
}

impl DirectorySource {
    /// Loads `directory`, refusing to start on an invalid config, and
    /// watches it; each refused change is sent on `refused`.
    pub fn start(
        directory: &Path,
        refused: mpsc::UnboundedSender<Refused>,
    ) -> Result<Self, DirectoryError> {
        let first = read(directory)?;
        let (publish, snapshots) = watch::channel(Arc::new(first));
        let (changed, changes) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event
                    && !matches!(event.kind, EventKind::Access(_))
                {
                    // A full channel already holds a pending change.
                    let _ = changed.try_send(());
                }
            })
            .map_err(|source| DirectoryError::Watch {
                path: directory.to_owned(),
                source,
            })?;
        watcher
            .watch(directory, RecursiveMode::NonRecursive)
            .map_err(|source| DirectoryError::Watch {
                path: directory.to_owned(),
                source,
            })?;
        let directory = directory.to_owned();
        tokio::spawn(async move {
            let mut settled = settle(changes, SETTLE);
            while settled.recv().await.is_some() {
                match read(&directory) {
                    Ok(snapshot) => {
                        publish.send_if_modified(|current| {
                            let new = current.version != snapshot.version;
                            if new {
                                *current = Arc::new(snapshot);
                            }
                            new
                        });
                    }
                    Err(e) => {
                        let diagnostics = match e {
                            DirectoryError::Invalid { diagnostics, .. } => diagnostics,
                            // A file that vanished between listing and
                            // reading, a permission: said of the directory.
                            other => Diagnostics(vec![Diagnostic {
                                file: directory.display().to_string(),
                                line: 1,
                                column: 1,
                                resource: None,
                                field: String::new(),
                                message: other.to_string(),
                            }]),
                        };
                        let kept = publish.borrow().version.clone();
                        let _ = refused.send(Refused { diagnostics, kept });
                    }
                }
            }
        });
        Ok(DirectorySource {
            snapshots,
            _watcher: watcher,
        })
    }
}

impl Source for DirectorySource {
    fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }
}

/// Reads every YAML file of `directory` (`*.yaml`, `*.yml`, not hidden),
/// in name order, as one config: what `serve --config-dir` would push, or
/// every problem with it.
pub fn read(directory: &Path) -> Result<Snapshot, DirectoryError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DirectoryError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(directory).map_err(io(directory))? {
        let path = entry.map_err(io(directory))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            files.push((path.display().to_string(), text));
        }
    }
    files.sort();
    let sources: Vec<ConfigText<'_>> = files
        .iter()
        .map(|(name, text)| ConfigText { name, text })
        .collect();
    let config = Config::load(&sources).map_err(|diagnostics| DirectoryError::Invalid {
        path: directory.to_owned(),
        diagnostics,
    })?;
    Ok(Snapshot {
        version: config.version(),
        config: Arc::new(config),
        workloads: Arc::default(),
    })
}

/// Turns bursts of change notices into one notice each: a notice goes out
/// once `quiet` has passed without another.
pub fn settle(mut changes: mpsc::Receiver<()>, quiet: Duration) -> mpsc::Receiver<()> {
    let (settled, out) = mpsc::channel(1);
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            loop {
                match tokio::time::timeout(quiet, changes.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if settled.send(()).await.is_err() {
                return;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_settles_into_one() {
        let (changes, receiver) = mpsc::channel(8);
        let mut settled = settle(receiver, SETTLE);
        let started = tokio::time::Instant::now();
        for _ in 0..5 {
            changes.send(()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        settled.recv().await.unwrap();
        // The last change came at 240 ms; quiet for 100 ms after it.
        assert_eq!(started.elapsed(), Duration::from_millis(300 + 40));
        assert!(settled.try_recv().is_err(), "one notice for the burst");
        changes.send(()).await.unwrap();
        settled.recv().await.unwrap();
    }
}
