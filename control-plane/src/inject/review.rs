//! The AdmissionReview exchange (`admission.k8s.io/v1`): the API server
//! sends the pod being created, the injector answers with the same `uid`,
//! `allowed`, and the change as a base64 RFC 6902 JSON Patch computed
//! with `json_patch::diff` between the pod as sent and as injected. A pod
//! it cannot patch is answered by the failure policy; every decision is
//! counted (`infermesh_injections_total{result}`) and logged with the
//! pod's namespace, name or generateName, and the reason.

use base64::Engine as _;
use prometheus::IntCounterVec;
use serde_json::{Value, json};

use crate::inject::{Decision, Template, decide};

/// What the webhook answers for a pod it cannot patch
/// (`--injection-failure-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Refuse the pod (`allowed: false`), with the reason as the status
    /// message `kubectl` shows.
    #[default]
    Fail,
    /// Let the pod be created without the mesh (`allowed: true`, no
    /// patch), with the reason as an admission warning.
    Ignore,
}

/// A request body that is not an AdmissionReview the injector can
/// answer; the API server is told with a 400 and applies the webhook
/// configuration's own `failurePolicy`.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Not JSON.
    #[error("the body is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Not an `admission.k8s.io/v1` AdmissionReview.
    #[error(
        "the body is not an admission.k8s.io/v1 AdmissionReview (apiVersion {api_version:?}, kind {kind:?}); list only v1 in the webhook's admissionReviewVersions"
    )]
    NotAReview {
        /// The `apiVersion` it has.
        api_version: String,
        /// The `kind` it has.
        kind: String,
    },
    /// A review without a request or its `uid`.
    #[error("the AdmissionReview has no request.uid")]
    NoUid,
}

/// The injector: the template of the injected containers, the failure
/// policy, and the count of decisions.
pub struct Injector {
    template: Template,
    policy: FailurePolicy,
    decisions: IntCounterVec,
}

/// The results counted in `infermesh_injections_total`.
const RESULTS: [&str; 3] = ["injected", "skipped", "failed"];

impl Injector {
    /// An injector whose counter is registered in `registry`.
    pub fn new(
        template: Template,
        policy: FailurePolicy,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<Self> {
        let decisions = IntCounterVec::new(
            prometheus::Opts::new(
                "infermesh_injections_total",
                "Pods the sidecar injector was asked about, by result: injected, skipped (opted out, hostNetwork, already injected) or failed (the pod could not be patched; see the log).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        for result in RESULTS {
            decisions.with_label_values(&[result]);
        }
        Ok(Injector {
            template,
            policy,
            decisions,
        })
    }

    /// Answers an AdmissionReview request (the body of `POST /inject`)
    /// with an AdmissionReview response.
    pub fn review(&self, body: &[u8]) -> Result<Value, ReviewError> {
        let review: Value = serde_json::from_slice(body)?;
        let field = |name: &str| {
            review
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        if api_version != "admission.k8s.io/v1" || kind != "AdmissionReview" {
            return Err(ReviewError::NotAReview { api_version, kind });
        }
        let request = review.get("request").ok_or(ReviewError::NoUid)?;
        let uid = request
            .get("uid")
            .and_then(Value::as_str)
            .filter(|uid| !uid.is_empty())
            .ok_or(ReviewError::NoUid)?;
        let text = |pointer: &str| {
            request
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let pod = request.get("object").unwrap_or(&Value::Null);
        let meta = |field: &str| {
            pod.pointer(&format!("/metadata/{field}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        // On CREATE the pod often has no namespace of its own yet (and no
        // name, only generateName): the request's is the one it gets.
        let namespace = Some(text("/namespace"))
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| meta("namespace"));
        let subject = Subject {
            namespace,
            name: Some(meta("name"))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| text("/name")),
            generate_name: meta("generateName"),
        };

        let decision = if text("/kind/kind") != "Pod" || !text("/subResource").is_empty() {
            Decision::Skip(format!(
                "not a pod: {}{}",
                text("/kind/kind"),
                Some(text("/subResource"))
                    .filter(|s| !s.is_empty())
                    .map(|s| format!(" (subresource {s})"))
                    .unwrap_or_default()
            ))
        } else if text("/operation") != "CREATE" {
            Decision::Skip(format!(
                "operation {}: only pods being created are injected",
                text("/operation")
            ))
        } else {
            decide(pod, &self.template)
        };

        let response = match decision {
            Decision::Inject {
                pod: injected,
                warnings,
                summary,
            } => {
                let patch = json_patch::diff(pod, &injected);
                let patch = serde_json::to_vec(&patch).expect("a JSON Patch serializes");
                self.record("injected", &subject, &summary);
                let mut response = allowed(uid, &warnings);
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
                response
            }
            Decision::Skip(reason) => {
                self.record("skipped", &subject, &reason);
                allowed(uid, &[])
            }
            Decision::Refuse(reason) => {
                self.record("failed", &subject, &reason);
                let message = format!("the infermesh sidecar cannot be injected: {reason}");
                match self.policy {
                    FailurePolicy::Fail => json!({
                        "uid": uid,
                        "allowed": false,
                        "status": { "code": 400, "reason": "BadRequest", "message": message },
                    }),
                    FailurePolicy::Ignore => {
                        allowed(uid, &[format!("{message}; the pod is created without it")])
                    }
                }
            }
        };
        Ok(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }))
    }

    /// Counts and logs one decision.
    fn record(&self, result: &str, subject: &Subject<'_>, reason: &str) {
        self.decisions.with_label_values(&[result]).inc();
        eprintln!(
            "infermesh-control-plane: injector: {result} pod namespace={:?} name={:?} generateName={:?}: {reason}",
            subject.namespace, subject.name, subject.generate_name
        );
    }
}

/// The pod a decision is about, for the log.
struct Subject<'a> {
    namespace: &'a str,
    name: &'a str,
    generate_name: &'a str,
}

/// `allowed: true`, with `warnings` if any.
fn allowed(uid: &str, warnings: &[String]) -> Value {
    let mut response = json!({ "uid": uid, "allowed": true });
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::tests::template;

    fn review_of(pod: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "models",
                "operation": "CREATE",
                "object": pod,
            }
        }))
        .unwrap()
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "generateName": "llama-", "annotations": annotations },
            "spec": { "containers": [{ "name": "llama", "image": "llama:1" }] }
        })
    }

    fn injector(policy: FailurePolicy) -> (Injector, prometheus::Registry) {
        let registry = prometheus::Registry::new();
        (
            Injector::new(template(), policy, &registry).unwrap(),
            registry,
        )
    }

    fn patch_of(response: &Value) -> Vec<Value> {
        let text = response["response"]["patch"].as_str().expect("a patch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn count(registry: &prometheus::Registry, result: &str) -> u64 {
        registry
            .gather()
            .iter()
            .find(|family| family.name() == "infermesh_injections_total")
            .and_then(|family| {
                family.get_metric().iter().find(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == "result" && l.value() == result)
                })
            })
            .map_or(0, |m| m.get_counter().get_value() as u64)
    }

    #[test]
    fn a_pod_is_answered_with_a_json_patch_that_makes_the_injected_pod() {
        let (injector, registry) = injector(FailurePolicy::Fail);
        let original = pod(json!({}));
        let answer = injector.review(&review_of(original.clone())).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(patch_of(&answer))).unwrap();
        let mut patched = original.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        let Decision::Inject { pod: expected, .. } = decide(&original, &template()) else {
            panic!("not injected");
        };
        assert_eq!(patched, expected);
        assert_eq!(count(&registry, "injected"), 1);

        // The patched pod again: allowed, no patch.
        let again = injector.review(&review_of(patched)).unwrap();
        assert_eq!(again["response"]["allowed"], true);
        assert!(again["response"].get("patch").is_none());
        assert_eq!(count(&registry, "skipped"), 1);
    }

    #[test]
    fn the_failure_policy_decides_the_answer_for_a_pod_that_cannot_be_patched() {
        let bad = pod(json!({ "infermesh.io/exclude-inbound-ports": "ssh" }));
        let (fail, registry) = injector(FailurePolicy::Fail);
        let answer = fail.review(&review_of(bad.clone())).unwrap();
        let response = &answer["response"];
        assert_eq!(response["allowed"], false);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("infermesh.io/exclude-inbound-ports"),
            "{message}"
        );
        assert_eq!(count(&registry, "failed"), 1);

        let (ignore, _) = injector(FailurePolicy::Ignore);
        let answer = ignore.review(&review_of(bad)).unwrap();
        let response = &answer["response"];
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none());
        let warning = response["warnings"][0].as_str().unwrap();
        assert!(
            warning.contains("infermesh.io/exclude-inbound-ports"),
            "{warning}"
        );
    }

    #[test]
    fn only_pods_being_created_are_patched() {
        let (injector, _) = injector(FailurePolicy::Fail);
        let mut review: Value = serde_json::from_slice(&review_of(pod(json!({})))).unwrap();
        review["request"]["operation"] = json!("UPDATE");
        let answer = injector
            .review(&serde_json::to_vec(&review).unwrap())
            .unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    #[test]
    fn what_is_not_a_v1_review_is_an_error() {
        let (injector, _) = injector(FailurePolicy::Fail);
        assert!(matches!(injector.review(b"{"), Err(ReviewError::Json(_))));
        let v1beta1 = json!({ "apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": { "uid": "x" } });
        assert!(matches!(
            injector.review(&serde_json::to_vec(&v1beta1).unwrap()),
            Err(ReviewError::NotAReview { .. })
        ));
        let no_uid = json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {} });
        assert!(matches!(
            injector.review(&serde_json::to_vec(&no_uid).unwrap()),
            Err(ReviewError::NoUid)
        ));
    }
}
