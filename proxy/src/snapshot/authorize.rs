//! The authorize phase: a listener's `AuthorizationPolicy` resources,
//! compiled once per snapshot, decide each request by the caller's SPIFFE
//! identity (from mutual TLS) and the request's path and method, with
//! Istio's semantics: DENY policies first; then, if any ALLOW policy
//! applies to the listener, the request must match one of its rules. A
//! denied request gets 403 `unauthorized`, naming the policy.

use std::sync::Arc;

use http::Request;
use infermesh_api::{
    AuthorizationPolicySpec, ListenerSpec, PolicyAction, PolicyOperation, PolicySource, Resource,
};
use prometheus::IntCounterVec;

use crate::core::error::ErrorKind;

/// The policies of one listener.
#[derive(Debug)]
pub(crate) struct Authorization {
    listener: Arc<str>,
    deny: Vec<(Arc<str>, AuthorizationPolicySpec)>,
    allow: Vec<(Arc<str>, AuthorizationPolicySpec)>,
    decisions: IntCounterVec,
}

impl Authorization {
    /// The policies of `policies` that apply to `listener`; `None` when
    /// there are none, and every request is allowed.
    /// `decisions` is `infermesh_authorization_decisions_total`.
    pub(crate) fn for_listener(
        listener: &Resource<ListenerSpec>,
        policies: &[Resource<AuthorizationPolicySpec>],
        decisions: &IntCounterVec,
    ) -> Option<Self> {
        // Policies guard the workload: one that names no listener leaves
        // out the pod's own outbound traffic.
        let applying = policies.iter().filter(|p| {
            if p.spec.listeners.is_empty() {
                !listener.spec.is_outbound_capture()
            } else {
                p.spec.listeners.contains(&listener.name)
            }
        });
        let (mut deny, mut allow) = (Vec::new(), Vec::new());
        for policy in applying {
            let entry = (Arc::from(policy.name.as_str()), policy.spec.clone());
            match policy.spec.action {
                PolicyAction::Deny => deny.push(entry),
                PolicyAction::Allow => allow.push(entry),
            }
        }
        (!deny.is_empty() || !allow.is_empty()).then(|| Authorization {
            listener: Arc::from(listener.name.as_str()),
            deny,
            allow,
            decisions: decisions.clone(),
        })
    }

    /// Allows or denies `request` from a caller with `peer` identity (none
    /// over plaintext), counting the decision.
    pub(crate) fn check<B>(
        &self,
        request: &Request<B>,
        peer: Option<&str>,
    ) -> Result<(), ErrorKind> {
        let path = request.uri().path();
        let method = request.method().as_str();
        let matches = |spec: &AuthorizationPolicySpec| {
            spec.rules.iter().any(|rule| {
                (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, peer)))
                    && (rule.to.is_empty()
                        || rule.to.iter().any(|o| operation_matches(o, path, method)))
            })
        };
        let decision = if let Some((name, _)) = self.deny.iter().find(|(_, spec)| matches(spec)) {
            Err((name.clone(), format!("denied by policy {name:?}")))
        } else if self.allow.is_empty() {
            Ok(None)
        } else if let Some((name, _)) = self.allow.iter().find(|(_, spec)| matches(spec)) {
            Ok(Some(name.clone()))
        } else {
            Err((
                Arc::from(""),
                format!(
                    "no allow policy of listener {:?} matches (caller {})",
                    self.listener,
                    peer.unwrap_or("without an identity")
                ),
            ))
        };
        let (result, policy) = match &decision {
            Ok(policy) => ("allow", policy.as_deref().unwrap_or("")),
            Err((policy, _)) => ("deny", &**policy),
        };
        self.decisions
            .with_label_values(&[&*self.listener, result, policy])
            .inc();
        decision
            .map(drop)
            .map_err(|(_, why)| ErrorKind::Unauthorized(why))
    }
}

fn source_matches(source: &PolicySource, peer: Option<&str>) -> bool {
    let conditions = !source.identities.is_empty()
        || !source.identity_prefixes.is_empty()
        || !source.namespaces.is_empty();
    let Some(peer) = peer else {
        return !conditions;
    };
    (source.identities.is_empty() || source.identities.iter().any(|id| id == peer))
        && (source.identity_prefixes.is_empty()
            || source
                .identity_prefixes
                .iter()
                .any(|p| peer.starts_with(p.as_str())))
        && (source.namespaces.is_empty()
            || namespace_of(peer).is_some_and(|ns| source.namespaces.iter().any(|n| n == ns)))
}

/// The namespace of `spiffe://<td>/ns/<ns>/...`.
fn namespace_of(id: &str) -> Option<&str> {
    let (_, path) = id.strip_prefix("spiffe://")?.split_once('/')?;
    path.strip_prefix("ns/")?.split('/').next()
}

fn operation_matches(operation: &PolicyOperation, path: &str, method: &str) -> bool {
    (operation.path_prefixes.is_empty()
        || operation
            .path_prefixes
            .iter()
            .any(|p| segment_prefix(p, path)))
        && (operation.methods.is_empty() || operation.methods.iter().any(|m| m == method))
}

/// Whether `path` starts with the whole segments of `prefix`.
fn segment_prefix(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metrics::Registry;

    fn authorization(yaml_policies: &str) -> Option<Authorization> {
        let text = format!(
            "apiVersion: infermesh.io/v1alpha1\nkind: Listener\nmetadata: {{ name: mesh }}\nspec: {{ address: 127.0.0.1:0 }}\n{yaml_policies}"
        );
        let config = infermesh_api::Config::load(&[infermesh_api::Source {
            name: "t.yaml",
            text: &text,
        }])
        .unwrap_or_else(|e| panic!("{e}"));
        let decisions = Registry::new().counter(
            "infermesh_authorization_decisions_total",
            "Decisions.",
            &["listener", "result", "policy"],
        );
        Authorization::for_listener(&config.listeners[0], &config.policies, &decisions)
    }

    fn policy(name: &str, action: &str, rules: &str) -> String {
        format!(
            "---\napiVersion: infermesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name} }}\nspec: {{ action: {action}, rules: {rules} }}\n"
        )
    }

    fn decide(auth: &Authorization, method: &str, path: &str, peer: Option<&str>) -> bool {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        auth.check(&request, peer).is_ok()
    }

    const EDGE: &str = "spiffe://cluster.local/ns/edge/sa/gateway";
    const BATCH: &str = "spiffe://cluster.local/ns/batch/sa/jobs";

    #[test]
    fn no_policy_allows_everything() {
        assert!(authorization("").is_none());
    }

    #[test]
    fn an_allow_policy_denies_what_it_does_not_allow() {
        let auth = authorization(&policy(
            "chat",
            "allow",
            "[{ from: [{ namespaces: [edge] }], to: [{ pathPrefixes: [/v1/chat], methods: [POST] }] }]",
        ))
        .unwrap();
        assert!(decide(&auth, "POST", "/v1/chat/completions", Some(EDGE)));
        assert!(
            !decide(&auth, "GET", "/v1/chat/completions", Some(EDGE)),
            "method"
        );
        assert!(
            !decide(&auth, "POST", "/v1/chatter", Some(EDGE)),
            "whole segments"
        );
        assert!(!decide(&auth, "POST", "/v1/chat", Some(BATCH)), "namespace");
        assert!(
            !decide(&auth, "POST", "/v1/chat", None),
            "plaintext has no identity"
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let auth = authorization(&format!(
            "{}{}",
            policy("everyone", "allow", "[{}]"),
            policy(
                "no-batch-admin",
                "deny",
                &format!("[{{ from: [{{ identities: [\"{BATCH}\"] }}], to: [{{ pathPrefixes: [/admin] }}] }}]")
            )
        ))
        .unwrap();
        assert!(decide(&auth, "GET", "/admin/x", Some(EDGE)));
        assert!(decide(&auth, "GET", "/v1/models", Some(BATCH)));
        let request = Request::get("/admin/x").body(()).unwrap();
        let denied = auth.check(&request, Some(BATCH)).unwrap_err();
        assert_eq!(denied.reason(), "unauthorized");
        assert!(denied.to_string().contains("no-batch-admin"), "{denied}");
    }

    #[test]
    fn identity_prefixes_and_empty_rules() {
        let auth = authorization(&policy(
            "edge-only",
            "allow",
            "[{ from: [{ identityPrefixes: [\"spiffe://cluster.local/ns/edge/\"] }] }]",
        ))
        .unwrap();
        assert!(decide(&auth, "GET", "/", Some(EDGE)));
        assert!(!decide(&auth, "GET", "/", Some(BATCH)));
        let nothing = authorization(&policy("nothing", "allow", "[]")).unwrap();
        assert!(
            !decide(&nothing, "GET", "/", Some(EDGE)),
            "no rules match nothing"
        );
    }
}
