//! The app's HTTP probes as the injected sidecar holds them: the contract
//! between the sidecar injector, which moves each HTTP probe of an app
//! container to the sidecar's health port (`/app-health/<container>/<kind>`
//! on 15020, as Istio does), and the sidecar, which makes the original
//! request to the app when kubelet asks.
//!
//! The injector passes them to the sidecar as JSON in the environment
//! variable [`ENV`]: a map from the rewritten path to the original probe.
//!
//! ```json
//! {"/app-health/vllm/readyz": {"port": 8000, "path": "/health", "scheme": "HTTP",
//!   "httpHeaders": [], "timeoutSeconds": 1}}
//! ```
//!
//! Fields this version does not know are ignored, so an older sidecar
//! reads what a newer injector writes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The environment variable holding the probes, as JSON.
pub const ENV: &str = "INFERMESH_APP_PROBES";

/// The path prefix of every rewritten probe on the health port.
pub const PATH_PREFIX: &str = "/app-health/";

/// Every probe moved to the sidecar, by its path on the health port.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// Which of a container's probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// `livenessProbe`.
    Liveness,
    /// `readinessProbe`.
    Readiness,
    /// `startupProbe`.
    Startup,
}

impl ProbeKind {
    /// All three, in the order a container spec lists them by convention.
    pub const ALL: [ProbeKind; 3] = [
        ProbeKind::Liveness,
        ProbeKind::Readiness,
        ProbeKind::Startup,
    ];

    /// The field of a container spec that holds it (`livenessProbe`...).
    pub fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }

    /// The last segment of its rewritten path (`livez`, `readyz`,
    /// `startupz`, Istio's names).
    pub fn segment(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }
}

/// The path on the health port that stands for `container`'s probe of
/// `kind`: `/app-health/<container>/<livez|readyz|startupz>`.
pub fn path(container: &str, kind: ProbeKind) -> String {
    format!("{PATH_PREFIX}{container}/{}", kind.segment())
}

/// One original HTTP probe: the request the sidecar makes to the app, on
/// the pod's loopback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// The app's port (a named port resolved to its number).
    pub port: u16,
    /// The request's path and query, as the probe gave it.
    pub path: String,
    /// `HTTP`, or `HTTPS` (the certificate is not verified, as kubelet
    /// does not).
    #[serde(default)]
    pub scheme: ProbeScheme,
    /// Headers to send, as the probe's `httpHeaders`.
    #[serde(default)]
    pub http_headers: Vec<ProbeHeader>,
    /// The host to connect to instead of `127.0.0.1`, as the probe's
    /// `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// How long the app may take to answer, as the probe's
    /// `timeoutSeconds` (Kubernetes' default is 1).
    #[serde(default = "one_second")]
    pub timeout_seconds: u32,
}

fn one_second() -> u32 {
    1
}

/// The scheme of a probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeScheme {
    /// Plain HTTP (the default).
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// HTTPS, without verifying the app's certificate.
    #[serde(rename = "HTTPS")]
    Https,
}

/// A header of a probe's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHeader {
    /// The header's name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// Why the value of [`ENV`] cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{ENV} is not valid: {0}")]
pub struct AppProbesError(String);

/// Reads the value of [`ENV`] and checks every probe: each key starts with
/// [`PATH_PREFIX`], each port is 1 to 65535, each path starts with `/`,
/// each header is a valid HTTP header and each timeout is at least a
/// second.
pub fn parse(text: &str) -> Result<AppProbes, AppProbesError> {
    let probes: AppProbes =
        serde_json::from_str(text).map_err(|e| AppProbesError(format!("{e}")))?;
    for (key, probe) in &probes {
        let fail = |what: String| Err(AppProbesError(format!("{key}: {what}")));
        if !key.starts_with(PATH_PREFIX) || key.len() == PATH_PREFIX.len() {
            return Err(AppProbesError(format!(
                "the key {key:?} is not a path under {PATH_PREFIX}"
            )));
        }
        if probe.port == 0 {
            return fail("the port must be 1 to 65535".into());
        }
        if !probe.path.starts_with('/') || probe.path.parse::<http::Uri>().is_err() {
            return fail(format!(
                "the path {:?} is not a request path (it starts with /)",
                probe.path
            ));
        }
        for header in &probe.http_headers {
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err()
                || http::HeaderValue::from_str(&header.value).is_err()
            {
                return fail(format!("the header {:?} is not valid HTTP", header.name));
            }
        }
        if probe.timeout_seconds == 0 {
            return fail("timeoutSeconds must be at least 1".into());
        }
    }
    Ok(probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip_and_fill_defaults() {
        let probes = parse(
            r#"{"/app-health/vllm/readyz": {"port": 8000, "path": "/health", "future": 1},
                "/app-health/vllm/livez": {"port": 8443, "path": "/live?x=1", "scheme": "HTTPS",
                  "httpHeaders": [{"name": "X-Probe", "value": "1"}], "host": "localhost", "timeoutSeconds": 3}}"#,
        )
        .unwrap();
        let ready = &probes[&path("vllm", ProbeKind::Readiness)];
        assert_eq!(ready.scheme, ProbeScheme::Http);
        assert_eq!(ready.timeout_seconds, 1);
        let live = &probes["/app-health/vllm/livez"];
        assert_eq!(live.scheme, ProbeScheme::Https);
        assert_eq!(live.host.as_deref(), Some("localhost"));
        let text = serde_json::to_string(&probes).unwrap();
        assert_eq!(parse(&text).unwrap(), probes);
    }

    #[test]
    fn bad_values_are_refused_with_the_variable_named() {
        for bad in [
            "not json",
            r#"{"/elsewhere": {"port": 1, "path": "/"}}"#,
            r#"{"/app-health/a/livez": {"port": 0, "path": "/"}}"#,
            r#"{"/app-health/a/livez": {"port": 70000, "path": "/"}}"#,
            r#"{"/app-health/a/livez": {"port": 80, "path": "health"}}"#,
            r#"{"/app-health/a/livez": {"port": 80, "path": "/", "scheme": "TCP"}}"#,
            r#"{"/app-health/a/livez": {"port": 80, "path": "/", "httpHeaders": [{"name": "a b", "value": ""}]}}"#,
            r#"{"/app-health/a/livez": {"port": 80, "path": "/", "timeoutSeconds": 0}}"#,
        ] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(
                error.starts_with("INFERMESH_APP_PROBES is not valid"),
                "{bad}: {error}"
            );
        }
    }
}
