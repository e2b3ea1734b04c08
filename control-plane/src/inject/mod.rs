//! The sidecar injector: the mutating admission webhook that puts a pod
//! in the mesh as Kubernetes creates it, following Istio's and Linkerd's
//! injectors. This module owns the decision for one pod: inject it, leave
//! it alone (and why), or say why it cannot be injected; and the injected
//! pod itself.
//!
//! - [`annotations`]: the pod's `infermesh.io/` annotations, checked;
//! - [`probes`]: the app's HTTP probes moved to the sidecar's health port;
//! - [`sidecar`]: the init container, the native sidecar and their volumes;
//! - [`review`]: the `admission.k8s.io/v1` AdmissionReview in and out, the
//!   JSON Patch, the failure policy, metrics and the log of decisions;
//! - [`webhook`]: the HTTPS port (`--injector-listen`) and its certificate.
//!
//! The pod is handled as JSON ([`serde_json::Value`]), never as typed
//! Kubernetes structs: a pod from a newer Kubernetes keeps the fields this
//! version does not know, and the patch touches only what the injector
//! changes.

pub mod annotations;
pub mod probes;
pub mod review;
pub mod sidecar;
pub mod webhook;

use serde_json::Value;

pub use review::{FailurePolicy, Injector, ReviewError};

use annotations::{Settings, StringMap};

/// What every injected pod is given, from the control plane's flags and
/// its CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// The image of both containers (`--proxy-image`).
    pub proxy_image: String,
    /// The address the sidecars dial (`--injected-control-plane`).
    pub control_plane: String,
    /// The control plane's SPIFFE ID, which the sidecars check it by.
    pub control_plane_identity: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The CA's root certificate, PEM: the sidecars' trust bundle.
    pub trust_bundle_pem: String,
}

/// What the injector makes of one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// The pod, injected, and what to warn its creator of.
    Inject {
        /// The pod with the init container, the sidecar, their volumes
        /// and its probes rewritten.
        pod: Value,
        /// Things worth telling whoever creates the pod.
        warnings: Vec<String>,
        /// What was done, for the log.
        summary: String,
    },
    /// The pod is left as it is, for this reason.
    Skip(String),
    /// The pod cannot be injected, for this reason (the failure policy
    /// decides what the webhook answers).
    Refuse(String),
}

/// Decides what to do with `pod` (the AdmissionReview's `object`), and
/// makes the injected pod.
pub fn decide(pod: &Value, template: &Template) -> Decision {
    if !pod.is_object() {
        return Decision::Refuse("the object is not a pod (not a JSON object)".into());
    }
    let annotations = string_map(pod.pointer("/metadata/annotations"));
    let labels = string_map(pod.pointer("/metadata/labels"));
    match annotations::opted_out(&annotations, &labels) {
        Ok(Some(reason)) => return Decision::Skip(reason),
        Ok(None) => {}
        Err(e) => return Decision::Refuse(e.to_string()),
    }
    if pod.pointer("/spec/hostNetwork") == Some(&Value::Bool(true)) {
        return Decision::Skip(
            "hostNetwork: true; the pod shares its node's network namespace, where the iptables rules would capture the node's own traffic".into(),
        );
    }
    if !pod.pointer("/spec/containers").is_some_and(Value::is_array) {
        return Decision::Refuse("the pod has no spec.containers list".into());
    }
    for list in ["initContainers", "containers"] {
        for name in names(pod.pointer(&format!("/spec/{list}"))) {
            if sidecar::CONTAINERS.contains(&name) {
                return Decision::Skip(format!(
                    "already injected: spec.{list} has a container named {name}"
                ));
            }
        }
    }
    if let Some(name) = names(pod.pointer("/spec/volumes")).find(|n| sidecar::VOLUMES.contains(n)) {
        return Decision::Refuse(format!(
            "the pod already has a volume named {name}, which the injector adds; rename it"
        ));
    }
    let settings = match Settings::read(&annotations) {
        Ok(settings) => settings,
        Err(e) => return Decision::Refuse(e.to_string()),
    };

    let mut injected = pod.clone();
    let probes = if settings.rewrite_app_probes {
        match probes::rewrite(&mut injected, sidecar::HEALTH_PORT) {
            Ok(probes) => probes,
            Err(e) => {
                return Decision::Refuse(format!(
                    "{e}; fix the probe, or keep the probes as they are with {}: \"false\"",
                    annotations::REWRITE_APP_PROBES
                ));
            }
        }
    } else {
        Default::default()
    };
    sidecar::add(&mut injected, template, &settings, &labels, &probes);

    let mut warnings = settings.warnings.clone();
    warnings.extend(runs_as_proxy(pod));
    let summary = format!(
        "added {} and {}; {} HTTP probe(s) moved to the sidecar",
        sidecar::INIT_CONTAINER,
        sidecar::PROXY_CONTAINER,
        probes.len()
    );
    Decision::Inject {
        pod: injected,
        warnings,
        summary,
    }
}

/// The string values of a label or annotation map.
fn string_map(map: Option<&Value>) -> StringMap<'_> {
    map.and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(key, value)| Some((key.as_str(), value.as_str()?)))
        .collect()
}

/// The `name` of every object of a list.
fn names(list: Option<&Value>) -> impl Iterator<Item = &str> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("name").and_then(Value::as_str))
}

/// Warnings for app containers that run as the proxy's uid or gid: the
/// iptables rules leave their traffic alone, so it bypasses the mesh.
fn runs_as_proxy(pod: &Value) -> Vec<String> {
    let id = |context: Option<&Value>, field: &str| {
        context.and_then(|c| c.get(field)).and_then(Value::as_u64)
    };
    let pod_context = pod.pointer("/spec/securityContext");
    let proxy = u64::from(sidecar::PROXY_UID);
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|container| {
            let context = container.get("securityContext");
            ["runAsUser", "runAsGroup"].iter().any(|field| {
                id(context, field).or_else(|| id(pod_context, field)) == Some(proxy)
            })
        })
        .map(|container| {
            format!(
                "container {} runs as uid or gid {proxy}, the infermesh proxy's: its traffic is not sent through the proxy",
                container.get("name").and_then(Value::as_str).unwrap_or("?")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn template() -> Template {
        Template {
            proxy_image: "infermesh-proxy:0.1.0".into(),
            control_plane: "infermesh-control-plane.infermesh-system.svc:15012".into(),
            control_plane_identity: "spiffe://cluster.local/ns/infermesh-system/sa/control-plane"
                .into(),
            trust_domain: "cluster.local".into(),
            trust_bundle_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                .into(),
        }
    }

    fn vllm() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "vllm-7d9f8-",
                "labels": { "app": "vllm", "pod-template-hash": "7d9f8" },
                "annotations": { "infermesh.io/exclude-outbound-cidrs": "169.254.169.254/32" }
            },
            "spec": {
                "containers": [{
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.9.1",
                    "ports": [{ "name": "http", "containerPort": 8000 }],
                    "readinessProbe": { "httpGet": { "path": "/health", "port": "http" } },
                    "resources": { "limits": { "nvidia.com/gpu": "1" } },
                    "futureField": { "kept": true }
                }],
                "volumes": [{ "name": "shm", "emptyDir": { "medium": "Memory" } }]
            }
        })
    }

    fn injected(pod: &Value) -> (Value, Vec<String>) {
        match decide(pod, &template()) {
            Decision::Inject { pod, warnings, .. } => (pod, warnings),
            other => panic!("not injected: {other:?}"),
        }
    }

    #[test]
    fn a_pod_gets_the_init_container_then_the_native_sidecar() {
        let (pod, warnings) = injected(&vllm());
        assert!(warnings.is_empty(), "{warnings:?}");
        let init = pod["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init[0]["name"], "infermesh-init");
        assert_eq!(
            init[0]["args"],
            json!([
                "--proxy-uid=1337",
                "--exclude-outbound-cidrs=169.254.169.254/32"
            ])
        );
        assert_eq!(init[0]["securityContext"]["runAsUser"], 0);
        let proxy = &init[1];
        assert_eq!(proxy["name"], "infermesh-proxy");
        assert_eq!(proxy["restartPolicy"], "Always");
        let args: Vec<&str> = proxy["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], "sidecar");
        assert_eq!(args.last(), Some(&"app=vllm,pod-template-hash=7d9f8"));
        let env = proxy["env"].as_array().unwrap();
        let probes = env
            .iter()
            .find(|e| e["name"] == "INFERMESH_APP_PROBES")
            .unwrap();
        let probes = infermesh_api::app_probes::parse(probes["value"].as_str().unwrap()).unwrap();
        assert_eq!(probes["/app-health/vllm/readyz"].port, 8000);
        assert_eq!(
            pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
            15020
        );
        // Fields the injector does not know are kept.
        assert_eq!(pod["spec"]["containers"][0]["futureField"]["kept"], true);
        let volumes: Vec<&str> = names(pod.pointer("/spec/volumes")).collect();
        assert_eq!(
            volumes,
            ["shm", "infermesh-token", "infermesh-xtables-lock"]
        );
    }

    #[test]
    fn an_injected_pod_is_left_alone() {
        let (pod, _) = injected(&vllm());
        let again = decide(&pod, &template());
        assert!(
            matches!(&again, Decision::Skip(why) if why.contains("already injected")),
            "{again:?}"
        );
    }

    #[test]
    fn skip_reasons() {
        let mut opted_out = vllm();
        opted_out["metadata"]["annotations"]["infermesh.io/inject"] = json!("disabled");
        let mut by_label = vllm();
        by_label["metadata"]["labels"]["infermesh.io/inject"] = json!("false");
        let mut host_network = vllm();
        host_network["spec"]["hostNetwork"] = json!(true);
        for (pod, says) in [
            (opted_out, "opted out by the annotation"),
            (by_label, "opted out by the label"),
            (host_network, "hostNetwork"),
        ] {
            match decide(&pod, &template()) {
                Decision::Skip(why) => assert!(why.contains(says), "{why}"),
                other => panic!("{says}: {other:?}"),
            }
        }
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let mut bad_annotation = vllm();
        bad_annotation["metadata"]["annotations"]["infermesh.io/exclude-inbound-ports"] =
            json!("22,http");
        let mut bad_probe = vllm();
        bad_probe["spec"]["containers"][0]["ports"] = json!([]);
        let mut taken_volume = vllm();
        taken_volume["spec"]["volumes"] = json!([{ "name": "infermesh-token", "emptyDir": {} }]);
        for (pod, says) in [
            (bad_annotation, "infermesh.io/exclude-inbound-ports"),
            (bad_probe, "readinessProbe of container \"vllm\""),
            (taken_volume, "volume named infermesh-token"),
            (json!([]), "not a pod"),
            (json!({ "metadata": {} }), "spec.containers"),
        ] {
            match decide(&pod, &template()) {
                Decision::Refuse(why) => assert!(why.contains(says), "{why}"),
                other => panic!("{says}: {other:?}"),
            }
        }
    }

    #[test]
    fn probes_stay_with_the_rewrite_turned_off() {
        let mut pod = vllm();
        pod["metadata"]["annotations"]["infermesh.io/rewrite-app-probes"] = json!("false");
        let (injected, _) = injected(&pod);
        assert_eq!(
            injected["spec"]["containers"][0]["readinessProbe"],
            pod["spec"]["containers"][0]["readinessProbe"]
        );
        let env = injected["spec"]["initContainers"][1]["env"]
            .as_array()
            .unwrap();
        assert!(env.iter().all(|e| e["name"] != "INFERMESH_APP_PROBES"));
    }

    #[test]
    fn an_app_running_as_the_proxys_uid_is_warned_of() {
        let mut pod = vllm();
        pod["spec"]["securityContext"] = json!({ "runAsUser": 1337 });
        let (_, warnings) = injected(&pod);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("container vllm runs as uid or gid 1337"));
    }
}
