//! `AuthorizationPolicy`: who may call what, by the caller's SPIFFE
//! identity (from mutual TLS) and the request's path and method, with
//! Istio's semantics: with no policy every request is allowed; DENY
//! policies are checked first; once an ALLOW policy applies to a listener,
//! whatever no ALLOW rule matches is denied.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::check::Checker;
use crate::path::FieldPath;

/// The spec of an `AuthorizationPolicy` resource.
///
/// ```yaml
/// kind: AuthorizationPolicy
/// metadata: { name: chat-callers }
/// spec:
///   listeners: [mesh]
///   action: allow
///   rules:
///     - from: [{ namespaces: [edge] }]
///       to: [{ pathPrefixes: [/v1/chat], methods: [POST] }]
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The listeners the policy applies to. Empty: every listener.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// In a mesh (the control plane's config): the workloads of the
    /// policy's namespace whose sidecars apply it, by their labels, as
    /// Istio's `selector`. Absent: every workload of the namespace (every
    /// workload of the mesh for a policy without a namespace). A proxy's
    /// own file cannot have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// What a matching request gets.
    #[serde(default)]
    pub action: PolicyAction,
    /// A request matches the policy when it matches any rule. No rules:
    /// the policy matches nothing (an `allow` policy without rules then
    /// denies every request on its listeners; `[{}]` matches every request).
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

/// Workloads picked by their labels, as a Kubernetes label selector's
/// `matchLabels`.
///
/// ```yaml
/// selector: { matchLabels: { app: chat } }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Every label given must be on the workload, with this value. Empty:
    /// every workload.
    #[serde(default)]
    pub match_labels: std::collections::BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a workload with `labels` is selected.
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// What a policy does with the requests it matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    /// Matching requests are allowed; on its listeners, requests that no
    /// allow rule matches are denied.
    #[default]
    Allow,
    /// Matching requests are denied, whatever allow policies say.
    Deny,
}

/// One rule: a request matches when it comes from any of `from` (or `from`
/// is empty) and goes to any of `to` (or `to` is empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// Who calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<PolicySource>,
    /// What is called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<PolicyOperation>,
}

/// A caller. Every field given must match (one of its values); a plaintext
/// caller has no identity and matches no identity condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySource {
    /// Exact SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Prefixes of SPIFFE IDs, e.g. `spiffe://cluster.local/ns/edge/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_prefixes: Vec<String>,
    /// Kubernetes namespaces: IDs of the form `spiffe://<td>/ns/<ns>/...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// What is called. Every field given must match (one of its values).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyOperation {
    /// Path prefixes, whole segments as in route matches: `/v1` matches
    /// `/v1` and `/v1/models`, not `/v10`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
    /// Methods, e.g. `POST`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

impl crate::Spec for AuthorizationPolicySpec {
    fn check(&self, checker: &mut Checker<'_>) {
        let rules = FieldPath::root().key("spec").key("rules");
        for (r, rule) in self.rules.iter().enumerate() {
            let at = rules.index(r);
            for (s, source) in rule.from.iter().enumerate() {
                let at = at.key("from").index(s);
                for (i, id) in source.identities.iter().enumerate() {
                    if let Err(e) = infermesh_certs::SpiffeId::parse(id) {
                        checker.error(at.key("identities").index(i), e.to_string());
                    }
                }
                for (i, prefix) in source.identity_prefixes.iter().enumerate() {
                    if !prefix.starts_with("spiffe://") {
                        checker.error(
                            at.key("identityPrefixes").index(i),
                            format!("{prefix:?} must start with spiffe://"),
                        );
                    }
                }
                for (i, ns) in source.namespaces.iter().enumerate() {
                    if ns.is_empty() || ns.contains('/') {
                        checker.error(
                            at.key("namespaces").index(i),
                            format!("{ns:?} is not a namespace name"),
                        );
                    }
                }
            }
            for (o, operation) in rule.to.iter().enumerate() {
                let at = at.key("to").index(o);
                for (i, path) in operation.path_prefixes.iter().enumerate() {
                    if !path.starts_with('/') {
                        checker.error(
                            at.key("pathPrefixes").index(i),
                            format!("path {path:?} must start with '/'"),
                        );
                    }
                }
                for (i, method) in operation.methods.iter().enumerate() {
                    if method.is_empty() || http::Method::from_bytes(method.as_bytes()).is_err() {
                        checker.error(
                            at.key("methods").index(i),
                            format!("{method:?} is not a valid HTTP method"),
                        );
                    }
                }
            }
        }
    }
}
