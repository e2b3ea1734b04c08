//! `Sidecar`: which backends the sidecars of some workloads are told about.
//! A mesh sends every sidecar every backend unless a `Sidecar` resource of
//! its namespace selects it; then it gets only the backends the resource's
//! `egress` names, and a change to any other backend does not reach it (as
//! Istio's `Sidecar` resource narrows what istiod pushes). Read by the
//! control plane only.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::check::Checker;
use crate::path::FieldPath;
use crate::policy::WorkloadSelector;

/// The spec of a `Sidecar` resource.
///
/// ```yaml
/// kind: Sidecar
/// metadata: { name: chat, namespace: apps }
/// spec:
///   selector: { matchLabels: { app: chat } }
///   egress: [llama.models, "*.shared"]
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// The workloads of the resource's namespace it applies to, by their
    /// labels. Absent: every workload of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The backends these workloads call: names (searched in the
    /// resource's namespace first, like `Route` backends), `*.NAMESPACE`
    /// for every backend of a namespace, or `*` for every backend.
    pub egress: Vec<String>,
}

impl SidecarSpec {
    /// Whether `backend` (a qualified name) is one of the egress entries.
    pub fn allows(&self, backend: &str, backend_namespace: Option<&str>) -> bool {
        self.egress
            .iter()
            .any(|entry| match entry.strip_prefix("*.") {
                _ if entry == "*" => true,
                Some(namespace) => backend_namespace == Some(namespace),
                None => entry == backend,
            })
    }
}

impl crate::Spec for SidecarSpec {
    fn check(&self, checker: &mut Checker<'_>) {
        let egress = FieldPath::root().key("spec").key("egress");
        for (i, entry) in self.egress.iter().enumerate() {
            let wildcard_ok = entry == "*"
                || entry
                    .strip_prefix("*.")
                    .is_some_and(|ns| !ns.is_empty() && !ns.contains(['*', '.']));
            if entry.contains('*') && !wildcard_ok {
                checker.error(
                    egress.index(i),
                    format!(
                        "{entry:?} is not a backend name, `*.NAMESPACE` or `*`: a wildcard stands for a whole namespace"
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_names_backends_whole_namespaces_or_everything() {
        let spec = SidecarSpec {
            selector: None,
            egress: vec!["llama.models".into(), "*.shared".into()],
        };
        assert!(spec.allows("llama.models", Some("models")));
        assert!(!spec.allows("mistral.models", Some("models")));
        assert!(spec.allows("cache.shared", Some("shared")));
        assert!(!spec.allows("cache", None));
        let all = SidecarSpec {
            selector: None,
            egress: vec!["*".into()],
        };
        assert!(all.allows("cache", None));
    }
}
