//! Moving the app's HTTP probes to the sidecar, as Istio does: each
//! `httpGet` liveness, readiness or startup probe of an app container
//! becomes an `httpGet` on the sidecar's health port, path
//! `/app-health/<container>/<livez|readyz|startupz>`, and the original is
//! handed to the sidecar ([`infermesh_api::app_probes`]), which makes the
//! request to the app itself when kubelet asks.
//!
//! Why: kubelet probes come from the node, in plaintext and without an
//! identity. Redirected to the sidecar's inbound listener they would meet
//! its mutual TLS mode and authorization policies; on the health port,
//! which `init` never redirects, they always reach the sidecar, and the
//! sidecar's own request to the app (uid 1337, to 127.0.0.1) is never
//! redirected either.
//!
//! `tcpSocket`, `exec` and `grpc` probes stay as they are. `exec` runs
//! inside the container. A `tcpSocket` probe's connection to the app's
//! port is redirected by `init`'s PREROUTING rule to the sidecar's
//! inbound listener, which accepts it whatever the app's state: the probe
//! no longer fails when only the app is down, but it never fails a
//! healthy pod either. A `grpc` probe (plaintext HTTP/2) is forwarded to
//! the app by the inbound listener in its default `permissive` mode, and
//! refused under `strict`; such an app should exclude its probe port with
//! `infermesh.io/exclude-inbound-ports`.

use serde_json::{Map, Value, json};

use infermesh_api::app_probes::{self, AppProbe, AppProbes, ProbeHeader, ProbeKind, ProbeScheme};

/// A probe that cannot be moved to the sidecar.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the {field} of container {container:?}: {why}")]
pub struct ProbeError {
    /// The container.
    pub container: String,
    /// `livenessProbe`, `readinessProbe` or `startupProbe`.
    pub field: &'static str,
    /// What is wrong with it.
    pub why: String,
}

/// Rewrites every `httpGet` probe of the app containers (`spec.containers`)
/// of `pod` to the sidecar's `health_port`, and returns the originals by
/// their new path. Init containers' probes are left alone (only native
/// sidecars have them, and they start before the proxy is ready).
pub fn rewrite(pod: &mut Value, health_port: u16) -> Result<AppProbes, ProbeError> {
    let mut moved = AppProbes::new();
    let Some(containers) = pod
        .pointer_mut("/spec/containers")
        .and_then(Value::as_array_mut)
    else {
        return Ok(moved);
    };
    for container in containers {
        let Some(container) = container.as_object_mut() else {
            continue;
        };
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        for kind in ProbeKind::ALL {
            let error = |why: String| ProbeError {
                container: name.clone(),
                field: kind.field(),
                why,
            };
            let Some(http_get) = container
                .get(kind.field())
                .and_then(|probe| probe.get("httpGet"))
            else {
                continue;
            };
            let original = original(container, kind, http_get).map_err(error)?;
            let path = app_probes::path(&name, kind);
            let probe = container
                .get_mut(kind.field())
                .and_then(Value::as_object_mut)
                .expect("the probe was read above");
            probe.insert(
                "httpGet".into(),
                json!({ "path": path, "port": health_port, "scheme": "HTTP" }),
            );
            moved.insert(path, original);
        }
    }
    Ok(moved)
}

/// The request `http_get`, a probe of `container`, stands for.
fn original(
    container: &Map<String, Value>,
    kind: ProbeKind,
    http_get: &Value,
) -> Result<AppProbe, String> {
    let port = match http_get.get("port") {
        Some(Value::Number(number)) => number
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("httpGet.port {number} is not a port (1 to 65535)"))?,
        Some(Value::String(name)) => named_port(container, name).ok_or_else(|| {
            format!("httpGet.port names the port {name:?}, which the container does not declare in its ports")
        })?,
        _ => return Err("httpGet has no port".into()),
    };
    let path = match http_get.get("path") {
        None | Some(Value::Null) => "/".to_owned(),
        Some(Value::String(path)) if path.is_empty() => "/".to_owned(),
        Some(Value::String(path)) if path.starts_with('/') => path.clone(),
        // Kubelet puts a path without its slash after one.
        Some(Value::String(path)) => format!("/{path}"),
        Some(other) => return Err(format!("httpGet.path {other} is not a string")),
    };
    let scheme = match http_get.get("scheme").and_then(Value::as_str) {
        None | Some("HTTP") => ProbeScheme::Http,
        Some("HTTPS") => ProbeScheme::Https,
        Some(other) => {
            return Err(format!(
                "httpGet.scheme {other:?} is neither HTTP nor HTTPS"
            ));
        }
    };
    let mut http_headers = Vec::new();
    for header in http_get
        .get("httpHeaders")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = header.get("name").and_then(Value::as_str);
        let value = header.get("value").and_then(Value::as_str).unwrap_or("");
        match name {
            Some(name)
                if http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && http::HeaderValue::from_str(value).is_ok() =>
            {
                http_headers.push(ProbeHeader {
                    name: name.to_owned(),
                    value: value.to_owned(),
                });
            }
            _ => {
                return Err(format!(
                    "httpGet.httpHeaders has an invalid header: {header}"
                ));
            }
        }
    }
    let host = http_get
        .get("host")
        .and_then(Value::as_str)
        .filter(|host| !host.is_empty())
        .map(str::to_owned);
    let timeout_seconds = container
        .get(kind.field())
        .and_then(|probe| probe.get("timeoutSeconds"))
        .and_then(Value::as_u64)
        .and_then(|seconds| u32::try_from(seconds).ok())
        .filter(|seconds| *seconds > 0)
        .unwrap_or(1);
    Ok(AppProbe {
        port,
        path,
        scheme,
        http_headers,
        host,
        timeout_seconds,
    })
}

/// The number of the container port called `name`.
fn named_port(container: &Map<String, Value>, name: &str) -> Option<u16> {
    container
        .get("ports")?
        .as_array()?
        .iter()
        .find(|port| port.get("name").and_then(Value::as_str) == Some(name))?
        .get("containerPort")?
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(container: Value) -> Value {
        json!({ "spec": { "containers": [container] } })
    }

    #[test]
    fn http_probes_move_to_the_health_port_with_named_ports_resolved() {
        let mut pod = pod(json!({
            "name": "vllm",
            "ports": [{ "name": "http", "containerPort": 8000 }],
            "readinessProbe": { "httpGet": { "path": "/health", "port": "http" }, "periodSeconds": 5 },
            "livenessProbe": {
                "httpGet": { "path": "/health", "port": 8000, "scheme": "HTTPS",
                             "httpHeaders": [{ "name": "X-Probe", "value": "live" }], "host": "localhost" },
                "timeoutSeconds": 4
            },
            "startupProbe": { "tcpSocket": { "port": 8000 } }
        }));
        let moved = rewrite(&mut pod, 15020).unwrap();
        let container = &pod["spec"]["containers"][0];
        assert_eq!(
            container["readinessProbe"],
            json!({ "httpGet": { "path": "/app-health/vllm/readyz", "port": 15020, "scheme": "HTTP" }, "periodSeconds": 5 })
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"],
            "/app-health/vllm/livez"
        );
        assert_eq!(container["livenessProbe"]["timeoutSeconds"], 4);
        assert_eq!(
            container["startupProbe"],
            json!({ "tcpSocket": { "port": 8000 } })
        );
        assert_eq!(moved.len(), 2);
        assert_eq!(
            moved["/app-health/vllm/readyz"],
            AppProbe {
                port: 8000,
                path: "/health".into(),
                scheme: ProbeScheme::Http,
                http_headers: vec![],
                host: None,
                timeout_seconds: 1,
            }
        );
        let live = &moved["/app-health/vllm/livez"];
        assert_eq!(live.scheme, ProbeScheme::Https);
        assert_eq!(live.host.as_deref(), Some("localhost"));
        assert_eq!(live.timeout_seconds, 4);
        assert_eq!(live.http_headers[0].name, "X-Probe");
    }

    #[test]
    fn a_named_port_the_container_does_not_declare_is_an_error() {
        let mut pod = pod(json!({
            "name": "app",
            "ports": [{ "name": "web", "containerPort": 80 }],
            "livenessProbe": { "httpGet": { "path": "/", "port": "http" } }
        }));
        let error = rewrite(&mut pod, 15020).unwrap_err();
        assert_eq!(error.container, "app");
        assert_eq!(error.field, "livenessProbe");
        assert!(error.to_string().contains("\"http\""), "{error}");
    }

    #[test]
    fn paths_default_as_kubelet_makes_them() {
        let mut pod = pod(json!({
            "name": "app",
            "livenessProbe": { "httpGet": { "port": 80 } },
            "readinessProbe": { "httpGet": { "port": 80, "path": "ready?full=1" } }
        }));
        let moved = rewrite(&mut pod, 15020).unwrap();
        assert_eq!(moved["/app-health/app/livez"].path, "/");
        assert_eq!(moved["/app-health/app/readyz"].path, "/ready?full=1");
    }
}
