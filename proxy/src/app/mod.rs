//! The app layer: the proxy as a process. Running it as a gateway or a
//! sidecar and applying config changes ([`run`]), its config file
//! ([`config_file`]) and identity files ([`identity`]), both watched, or
//! the control plane's push and certificates ([`control_plane`]), the
//! admin and health servers ([`admin`]), the app's probes they answer
//! ([`app_health`]), readiness and drain
//! ([`lifecycle`]), logging ([`logging`]), the sidecar's built-in capture
//! listeners ([`sidecar`]), the config metrics ([`metrics`]) and the
//! worker threads that serve traffic ([`workers`]).

pub(crate) mod admin;
pub(crate) mod app_health;
pub(crate) mod config_file;
pub(crate) mod control_plane;
pub(crate) mod identity;
pub(crate) mod lifecycle;
pub(crate) mod log_lines;
pub(crate) mod log_writer;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod run;
pub(crate) mod sidecar;
pub(crate) mod workers;
