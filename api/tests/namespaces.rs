//! The mesh's config: namespaces, the names they qualify and search, and
//! what only the control plane may read.

use infermesh_api::{Config, Source};

fn load(text: &str) -> Result<Config, Vec<String>> {
    Config::load(&[Source {
        name: "mesh.yaml",
        text,
    }])
    .map_err(|d| d.iter().map(|d| d.to_string()).collect())
}

const MESH: &str = "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: llama, namespace: models }
spec: { endpoints: [{ address: 127.0.0.1:9001 }] }
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: llama, namespace: lab }
spec: { endpoints: [{ address: 127.0.0.1:9002 }] }
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: shared }
spec: { endpoints: [{ address: 127.0.0.1:9003 }] }
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: chat, namespace: models }
spec:
  hostnames: [chat.models]
  rules:
    - backends: [{ name: llama, weight: 9 }, { name: llama.lab }, { name: shared }]
---
apiVersion: infermesh.io/v1alpha1
kind: Sidecar
metadata: { name: apps, namespace: apps }
spec:
  selector: { matchLabels: { app: chat } }
  egress: [llama.models, \"*.lab\"]
---
apiVersion: infermesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: callers, namespace: models }
spec:
  selector: { matchLabels: { app: llama } }
  rules: [{ from: [{ namespaces: [apps] }] }]
";

#[test]
fn a_namespace_qualifies_names_and_is_searched_first() {
    let config = load(MESH).unwrap_or_else(|e| panic!("{e:#?}"));
    let names: Vec<&str> = config.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["llama.models", "llama.lab", "shared"]);
    let route = config.route("chat.models").expect("qualified route name");
    assert_eq!(route.namespace.as_deref(), Some("models"));
    let targets: Vec<&str> = route.spec.rules[0]
        .backends
        .iter()
        .map(|b| b.name.as_str())
        .collect();
    // `llama` is searched in the route's namespace; `llama.lab` reaches
    // another; `shared` has no namespace.
    assert_eq!(targets, ["llama.models", "llama.lab", "shared"]);
    assert_eq!(config.sidecars[0].spec.egress, ["llama.models", "*.lab"]);
}

#[test]
fn a_name_that_resolves_nowhere_is_reported_with_what_exists() {
    let broken = MESH.replace("{ name: llama.lab }", "{ name: llama.labs }");
    let errors = load(&broken).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("mesh.yaml:22:48:")
            && errors[0].contains("Route/chat.models: spec.rules[0].backends[1].name: backend \"llama.labs\" is not defined"),
        "{errors:#?}"
    );
    let broken = MESH.replace("egress: [llama.models", "egress: [mistral");
    let errors = load(&broken).unwrap_err();
    assert!(
        errors[0].contains("Sidecar/apps.apps: spec.egress[0]: backend \"mistral\" is not defined"),
        "{errors:#?}"
    );
}

#[test]
fn a_bad_namespace_or_wildcard_is_refused() {
    let errors = load(&MESH.replace("namespace: lab }", "namespace: Lab_1 }")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("metadata.namespace: \"Lab_1\" is not a valid namespace")),
        "{errors:#?}"
    );
    let errors = load(&MESH.replace("\"*.lab\"", "\"lab*\"")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("spec.egress[1]: \"lab*\" is not a backend name")),
        "{errors:#?}"
    );
}

#[test]
fn what_selects_workloads_is_refused_in_a_proxy_s_own_file() {
    let config = load(MESH).unwrap();
    let problems: Vec<String> = config
        .mesh_only_problems()
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(problems.len(), 6, "{problems:#?}");
    assert!(
        problems
            .iter()
            .any(|p| p
                .contains("Sidecar/apps.apps: kind: kind Sidecar is read by the control plane"))
    );
    assert!(problems.iter().any(|p| {
        p.contains("AuthorizationPolicy/callers.models: spec.selector: a workload selector")
    }));
    assert!(problems.iter().any(|p| p.contains(
        "Backend/llama.models: metadata.namespace: namespaces are read by the control plane"
    )));
}

#[test]
fn each_resource_is_a_document_that_loads_back_alone() {
    let config = load(MESH).unwrap();
    let documents = config.documents();
    assert_eq!(documents.len(), 6);
    let backend = &documents[0];
    assert_eq!(backend.name, "llama.models");
    let text = serde_json::to_string(&backend.value).unwrap();
    let alone = load(&text).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(alone.backends[0].name, "llama.models");
    assert_eq!(alone.backends[0].namespace, None);
    assert_eq!(alone.backends[0].spec, config.backends[0].spec);
}

#[test]
fn a_route_attaches_to_a_service_by_parent_refs_searched_in_its_namespace() {
    let text = format!(
        "{MESH}---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: canary, namespace: models }}
spec:
  parentRefs: [{{ kind: Backend, name: llama }}, {{ kind: Backend, name: llama.lab }}]
  rules: [{{ backends: [{{ name: llama }}] }}]
"
    );
    let config = load(&text).unwrap_or_else(|e| panic!("{e:#?}"));
    let parents: Vec<&str> = config
        .route("canary.models")
        .unwrap()
        .spec
        .parent_refs
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(parents, ["llama.models", "llama.lab"]);
    let problems = config.mesh_only_problems();
    assert!(
        problems.iter().any(|d| d.field == "spec.parentRefs"),
        "{problems}"
    );

    let errors = load(&text.replace("name: llama.lab }]", "name: llama.labs }]")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("spec.parentRefs[1].name: backend \"llama.labs\" is not defined")),
        "{errors:#?}"
    );
    let errors =
        load(&text.replace("  parentRefs:", "  listeners: [x]\n  parentRefs:")).unwrap_err();
    assert!(
        errors.iter().any(|e| e
            .contains("spec.parentRefs: a route attaches by parentRefs or by listeners, not both")),
        "{errors:#?}"
    );
}
