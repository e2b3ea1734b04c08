//! The proxy's config file: reading and validating it, and noticing when
//! it changes. The file's directory is watched rather than the file, so
//! editors that write a new file and rename it, and Kubernetes ConfigMap
//! volumes (which swap a symlink), are both seen.
//!
//! Only a regular file of at most [`MAX_CONFIG_BYTES`] is read (a FIFO
//! would be waited on forever, a device read until memory runs out), and a
//! config without a listener is refused: a file emptied on disk (a
//! truncating write caught half-way, a mistaken `>`) must not take every
//! listener away from a running proxy.

use std::io::Read;
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
    /// The path is not a regular file (a FIFO, a device, a directory).
    #[error("config file {path} is not a regular file ({what}); give the path of a YAML file")]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// The file is larger than any config should be.
    #[error(
        "config file {path} is larger than {} MiB; a config that large is a mistake (Kubernetes ConfigMaps hold at most 1 MiB)",
        MAX_CONFIG_BYTES >> 20
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file defines no listener (it may have been emptied).
    #[error(
        "config file {path} defines no Listener, so the proxy would serve nothing; if the file was emptied by mistake, restore it"
    )]
    NoListeners {
        /// The file.
        path: PathBuf,
    },
    /// The file was read but is not a valid config.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// The largest config file read.
pub(crate) const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The file's text as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileText(String);

/// Reads the file's text: a regular file (symbolic links followed) of at
/// most [`MAX_CONFIG_BYTES`].
pub(crate) fn read(path: &Path) -> Result<FileText, ConfigFileError> {
    let failed = |source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(failed)?;
    if !metadata.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = metadata.file_type();
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(ConfigFileError::NotAFile {
            path: path.to_owned(),
            what,
        });
    }
    let too_large = || ConfigFileError::TooLarge {
        path: path.to_owned(),
    };
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    // The file may grow between the look and the read.
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
        .map_err(failed)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    Ok(FileText(text))
}

/// Validates text read from `path`, together with the `built_in`
/// documents that the file may replace (see [`Config::load_with_defaults`]);
/// the config must define a listener.
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
    let config = Config::load_with_defaults(&[file], built_in).map_err(ConfigFileError::Invalid)?;
    let mesh_only = config.mesh_only_problems();
    if !mesh_only.is_empty() {
        return Err(ConfigFileError::Invalid(mesh_only));
    }
    if config.listeners.is_empty() {
        return Err(ConfigFileError::NoListeners {
            path: path.to_owned(),
        });
    }
    Ok(config)
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
