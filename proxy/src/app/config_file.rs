//! The gateway's config file: reading and validating it, and noticing when
//! it changes. The file's directory is watched rather than the file, so
//! editors that write a new file and rename it, and Kubernetes ConfigMap
//! volumes (which swap a symlink), are both seen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use infermesh_api::{Config, Diagnostics, Source};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// The file's text as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileText(String);

/// Reads the file's text.
pub(crate) fn read(path: &Path) -> Result<FileText, ConfigFileError> {
    std::fs::read_to_string(path)
        .map(FileText)
        .map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })
}

/// Validates text read from `path`, together with the `built_in`
/// documents that the file may replace (see [`Config::load_with_defaults`]).
pub(crate) fn parse(
    path: &Path,
    text: &FileText,
    built_in: &[Source<'_>],
) -> Result<Config, ConfigFileError> {
    let name = path.display().to_string();
    let file = Source {
        name: &name,
        text: &text.0,
    };
    Config::load_with_defaults(&[file], built_in).map_err(ConfigFileError::Invalid)
}

/// Reads and validates the file, with the `built_in` documents it may
/// replace.
pub fn load(path: &Path, built_in: &[Source<'_>]) -> Result<(Config, FileText), ConfigFileError> {
    let text = read(path)?;
    Ok((parse(path, &text, built_in)?, text))
}

/// Sends on `changed` whenever something in the file's directory changes.
/// The returned watcher must be kept alive.
pub(crate) fn watch(path: &Path, changed: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let absolute = std::path::absolute(path)?;
    let directory = absolute.parent().unwrap_or(Path::new("/")).to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !matches!(event.kind, EventKind::Access(_))
        {
            // A full channel already holds a pending change: nothing is lost.
            let _ = changed.try_send(());
        }
    })?;
    watcher.watch(&directory, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// How long to let a burst of file events settle before reading the file,
/// so a file being written is not read half-way.
pub(crate) const SETTLE: Duration = Duration::from_millis(150);
