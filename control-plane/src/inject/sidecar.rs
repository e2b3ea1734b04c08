//! What the injector adds to a pod: the init container `infermesh-init`
//! (the iptables rules), the proxy `infermesh-proxy` as a native sidecar
//! (an init container with `restartPolicy: Always`, Kubernetes 1.29 and
//! later), and their volumes: the projected ServiceAccount token the proxy
//! proves its workload with, and the emptyDir where iptables takes its
//! lock under a read-only root filesystem (as Linkerd's init does).
//!
//! A native sidecar starts before the app's containers, and its startup
//! probe holds them until the proxy is ready: the app never runs a moment
//! without its proxy, and it stops after the app does.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use infermesh_api::app_probes::{self, AppProbes};

use crate::inject::Template;
use crate::inject::annotations::Settings;

/// The init container that installs the iptables rules.
pub const INIT_CONTAINER: &str = "infermesh-init";
/// The proxy's container.
pub const PROXY_CONTAINER: &str = "infermesh-proxy";
/// The projected ServiceAccount token volume.
pub const TOKEN_VOLUME: &str = "infermesh-token";
/// The volume mounted at `/run` in the init container, for iptables'
/// lock file.
pub const XTABLES_VOLUME: &str = "infermesh-xtables-lock";
/// Where the proxy finds the token volume.
pub const TOKEN_DIR: &str = "/var/run/secrets/infermesh/token";
/// The token file the proxy reads (`--credential`), again at every
/// certificate request: kubelet rewrites it before it expires.
pub const TOKEN_FILE: &str = "/var/run/secrets/infermesh/token/token";
/// The audience of the token: the control plane's, so that it is good
/// for nothing else (and nothing else's token is good for it).
pub const TOKEN_AUDIENCE: &str = "infermesh";
/// How long kubelet's tokens live; it renews them at 80% of that.
pub const TOKEN_EXPIRATION_SECONDS: u32 = 3600;
/// The proxy's health port: `/ready`, `/live`, `/metrics` and the app's
/// probes under `/app-health/`.
pub const HEALTH_PORT: u16 = 15020;
/// The name of the health port: port names are at most 15 characters
/// (`infermesh-health` has 16).
pub const HEALTH_PORT_NAME: &str = "mesh-health";
/// The uid and gid the proxy runs as, whose traffic `init` never
/// redirects.
pub const PROXY_UID: u32 = 1337;

/// Every name the injector adds to a pod's containers.
pub const CONTAINERS: [&str; 2] = [INIT_CONTAINER, PROXY_CONTAINER];
/// Every name the injector adds to a pod's volumes.
pub const VOLUMES: [&str; 2] = [TOKEN_VOLUME, XTABLES_VOLUME];

/// Adds the init container, the proxy and their volumes to `pod` (whose
/// `spec` is an object): `infermesh-init` first among the init
/// containers, `infermesh-proxy` right after it, so that every other init
/// container already runs in the mesh.
pub fn add(
    pod: &mut Value,
    template: &Template,
    settings: &Settings,
    labels: &BTreeMap<&str, &str>,
    probes: &AppProbes,
) {
    let init = init_container(template, settings);
    let proxy = proxy_container(template, settings, labels, probes);
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .expect("the caller checked the spec");
    let init_containers = spec.entry("initContainers").or_insert_with(|| json!([]));
    if !init_containers.is_array() {
        *init_containers = json!([]);
    }
    let list = init_containers.as_array_mut().expect("an array");
    list.insert(0, proxy);
    list.insert(0, init);
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    if !volumes.is_array() {
        *volumes = json!([]);
    }
    let volumes = volumes.as_array_mut().expect("an array");
    volumes.push(json!({
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [{
                "serviceAccountToken": {
                    "audience": TOKEN_AUDIENCE,
                    "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                    "path": "token",
                }
            }]
        }
    }));
    volumes.push(json!({ "name": XTABLES_VOLUME, "emptyDir": {} }));
}

/// `infermesh-proxy init`, as root with `NET_ADMIN` and `NET_RAW` only.
fn init_container(template: &Template, settings: &Settings) -> Value {
    let mut args = vec![format!("--proxy-uid={PROXY_UID}")];
    args.extend(settings.init_args.iter().cloned());
    json!({
        "name": INIT_CONTAINER,
        "image": template.proxy_image,
        "command": ["infermesh-proxy", "init"],
        "args": args,
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "cpu": "100m", "memory": "64Mi" },
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
        },
        "volumeMounts": [{ "name": XTABLES_VOLUME, "mountPath": "/run" }],
    })
}

/// `infermesh-proxy sidecar`, fed by the control plane, as a native
/// sidecar.
fn proxy_container(
    template: &Template,
    settings: &Settings,
    labels: &BTreeMap<&str, &str>,
    probes: &AppProbes,
) -> Value {
    let mut args: Vec<String> = [
        "sidecar",
        "--control-plane",
        &template.control_plane,
        "--control-plane-identity",
        &template.control_plane_identity,
        "--credential",
        TOKEN_FILE,
        "--trust-domain",
        &template.trust_domain,
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    if !labels.is_empty() {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        args.push("--label".into());
        args.push(labels.join(","));
    }
    let mut env = vec![
        json!({ "name": "INFERMESH_NODE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
        json!({ "name": "INFERMESH_TRUST_BUNDLE_PEM", "value": template.trust_bundle_pem }),
    ];
    if !probes.is_empty() {
        let text = serde_json::to_string(probes).expect("probes serialize");
        env.push(json!({ "name": app_probes::ENV, "value": text }));
    }
    let ready = |period: u32, failures: u32| {
        json!({
            "httpGet": { "path": "/ready", "port": HEALTH_PORT },
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        })
    };
    let resources = &settings.resources;
    json!({
        "name": PROXY_CONTAINER,
        "image": template.proxy_image,
        "command": ["infermesh-proxy"],
        "args": args,
        "env": env,
        "ports": [{ "name": HEALTH_PORT_NAME, "containerPort": HEALTH_PORT, "protocol": "TCP" }],
        "restartPolicy": "Always",
        // Holds the app's containers until the proxy has its certificate
        // and config: up to 10 minutes, checked every second.
        "startupProbe": ready(1, 600),
        "readinessProbe": ready(5, 3),
        "resources": {
            "requests": { "cpu": resources.cpu_request, "memory": resources.memory_request },
            "limits": { "memory": resources.memory_limit },
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [{ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true }],
    })
}
