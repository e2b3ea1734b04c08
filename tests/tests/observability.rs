//! `deploy/observability`: what a platform team imports into Prometheus
//! and Grafana, checked as far as it can be without a cluster: promtool
//! checks the scrape config and the rules and runs the rules' unit tests
//! (every alert made to fire); the scrape configs' relabelling is run on
//! the targets that pod discovery makes of the control plane's Deployment
//! and of an injected pod; the PrometheusRule holds exactly the groups of
//! rules.yaml; the dashboard's queries parse; and every metric these files
//! and docs/observability.md name, with the labels they select on, is one
//! that a real gateway and a real control plane expose, so that renaming a
//! metric fails here. After changing rules.yaml, regenerate the
//! PrometheusRule with
//!
//! ```sh
//! INFERMESH_UPDATE_OBSERVABILITY=1 cargo test -p infermesh-tests --test observability
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use infermesh_tests::backend::{self, MockBackend, Protocol};
use infermesh_tests::client;
use infermesh_tests::mesh::{ControlPlane, MeshFiles, gateway_mesh};
use infermesh_tests::otlp::OtlpReceiver;
use infermesh_tests::process::{Gateway, backend, config, listener, route_with};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMTOOL: &str = "promtool is installed (Debian package `prometheus`: `apt install prometheus`, or run ./test.sh, which installs it)";

/// The command that rewrites the PrometheusRule of podmonitor.yaml.
const UPDATE: &str =
    "INFERMESH_UPDATE_OBSERVABILITY=1 cargo test -p infermesh-tests --test observability";

/// Where the generated PrometheusRule of podmonitor.yaml starts.
const GENERATED_MARKER: &str =
    "# The PrometheusRule below is generated from ../prometheus/rules.yaml; do";

/// Labels Prometheus adds to what it scrapes (the target's), which the
/// files may select on besides the metrics' own.
const TARGET_LABELS: [&str; 6] = ["job", "instance", "namespace", "pod", "container", "mode"];

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn observability() -> PathBuf {
    repository().join("deploy/observability")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_saphyr::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(&read(path))
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    documents.into_iter().filter(|d| !d.is_null()).collect()
}

/// Runs promtool in `dir`: whether it succeeded, and what it printed.
fn promtool(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect(PROMTOOL);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The Prometheus config.

#[test]
fn the_prometheus_config_passes_promtool() {
    let dir = observability().join("prometheus");
    let (ok, out) = promtool(&dir, &["check", "config", "prometheus.yaml"]);
    if ok {
        assert!(out.contains("1 rule files found"), "{out}");
        return;
    }
    // Debian builds Prometheus without Kubernetes discovery: its promtool
    // does not know kubernetes_sd_configs. Check those sections here, and
    // the rest of the file with promtool.
    assert!(
        out.contains("field kubernetes_sd_configs not found"),
        "promtool check config failed:\n{out}"
    );
    eprintln!(
        "this promtool has no Kubernetes discovery (Debian's); kubernetes_sd_configs \
         checked by this test, the rest by promtool"
    );
    let mut config = yaml(&dir.join("prometheus.yaml"));
    let jobs = config["scrape_configs"]
        .as_array_mut()
        .expect("scrape_configs is a list");
    let mut kubernetes_jobs = 0;
    for job in jobs.iter_mut() {
        let job = job.as_object_mut().expect("a scrape config is a map");
        if let Some(sd) = job.remove("kubernetes_sd_configs") {
            kubernetes_jobs += 1;
            check_kubernetes_sd(&sd);
        }
    }
    assert_eq!(
        kubernetes_jobs, 2,
        "the sidecars' job and the control plane's"
    );
    let tmp = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(
        tmp.path().join("prometheus.yaml"),
        serde_saphyr::to_string(&config).expect("YAML"),
    )
    .expect("write the config");
    std::fs::copy(dir.join("rules.yaml"), tmp.path().join("rules.yaml")).expect("copy the rules");
    let (ok, out) = promtool(tmp.path(), &["check", "config", "prometheus.yaml"]);
    assert!(
        ok && out.contains("1 rule files found"),
        "promtool check config failed:\n{out}"
    );
}

/// What Prometheus's kubernetes_sd_config accepts (its SDConfig and
/// SelectorConfig), for the fields these files use.
fn check_kubernetes_sd(sd: &Value) {
    const FIELDS: [&str; 6] = [
        "role",
        "namespaces",
        "selectors",
        "api_server",
        "kubeconfig_file",
        "attach_metadata",
    ];
    const ROLES: [&str; 6] = [
        "pod",
        "service",
        "endpoints",
        "endpointslice",
        "node",
        "ingress",
    ];
    for entry in sd.as_array().expect("kubernetes_sd_configs is a list") {
        let entry = entry.as_object().expect("a kubernetes_sd_config is a map");
        for key in entry.keys() {
            assert!(
                FIELDS.contains(&key.as_str()),
                "unknown kubernetes_sd_config field {key}"
            );
        }
        let role = entry["role"].as_str().expect("a role");
        assert!(ROLES.contains(&role), "unknown role {role}");
        let mut seen = BTreeSet::new();
        for selector in entry
            .get("selectors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let selector = selector.as_object().expect("a selector is a map");
            for key in selector.keys() {
                assert!(
                    ["role", "label", "field"].contains(&key.as_str()),
                    "unknown selector field {key}"
                );
            }
            let selector_role = selector["role"].as_str().expect("a selector's role");
            // A pod role takes pod selectors only.
            assert!(
                role != "pod" || selector_role == "pod",
                "a {role} role takes no {selector_role} selector"
            );
            assert!(seen.insert(selector_role), "two {selector_role} selectors");
        }
    }
}

/// A target as Kubernetes pod discovery makes it: one per container port.
type Target = BTreeMap<String, String>;

/// The label pod discovery gives a pod label `name`.
fn pod_label_meta(name: &str) -> String {
    let sanitized: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("__meta_kubernetes_pod_label_{sanitized}")
}

/// The targets of one container of a pod.
fn pod_targets(
    namespace: &str,
    pod: &str,
    labels: &BTreeMap<String, String>,
    phase: &str,
    container: &str,
    init: bool,
    ports: &[(&str, u16)],
) -> Vec<Target> {
    ports
        .iter()
        .map(|(name, number)| {
            let mut target = Target::new();
            target.insert("__address__".into(), format!("10.0.0.7:{number}"));
            target.insert("__meta_kubernetes_namespace".into(), namespace.into());
            target.insert("__meta_kubernetes_pod_name".into(), pod.into());
            target.insert("__meta_kubernetes_pod_phase".into(), phase.into());
            target.insert(
                "__meta_kubernetes_pod_container_name".into(),
                container.into(),
            );
            target.insert(
                "__meta_kubernetes_pod_container_init".into(),
                init.to_string(),
            );
            target.insert(
                "__meta_kubernetes_pod_container_port_name".into(),
                (*name).into(),
            );
            target.insert(
                "__meta_kubernetes_pod_container_port_number".into(),
                number.to_string(),
            );
            for (key, value) in labels {
                target.insert(pod_label_meta(key), value.clone());
            }
            target
        })
        .collect()
}

/// Whether relabelling regex `regex` matches `value` whole, and its first
/// group. Only the forms these files use are known: the default `(.*)`
/// and literal alternatives (`Succeeded|Failed`).
fn regex_match(regex: &str, value: &str) -> Option<String> {
    if regex == "(.*)" {
        return Some(value.to_owned());
    }
    assert!(
        regex
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_|".contains(c)),
        "this test's relabelling knows only `(.*)` and literal alternatives, not {regex:?}"
    );
    regex
        .split('|')
        .any(|w| w == value)
        .then(|| value.to_owned())
}

/// Runs `job`'s selectors and relabel_configs on `target`: its labels
/// after relabelling (the meta labels dropped), or `None` if dropped.
fn relabel(job: &Value, target: &Target) -> Option<Target> {
    for sd in job["kubernetes_sd_configs"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for selector in sd["selectors"].as_array().into_iter().flatten() {
            let label = selector["label"].as_str().unwrap_or_default();
            if label.is_empty() {
                continue;
            }
            let (key, value) = label
                .split_once('=')
                .expect("this test knows only `key=value` label selectors");
            if target.get(&pod_label_meta(key)).map(String::as_str) != Some(value) {
                return None;
            }
        }
    }
    let mut target = target.clone();
    for rule in job["relabel_configs"].as_array().into_iter().flatten() {
        let value: Vec<String> = strings(&rule["source_labels"])
            .iter()
            .map(|l| target.get(*l).cloned().unwrap_or_default())
            .collect();
        let value = value.join(rule["separator"].as_str().unwrap_or(";"));
        let regex = rule["regex"].as_str().unwrap_or("(.*)");
        let matched = regex_match(regex, &value);
        match rule["action"].as_str().unwrap_or("replace") {
            "keep" if matched.is_none() => return None,
            "drop" if matched.is_some() => return None,
            "keep" | "drop" => {}
            "replace" => {
                if let Some(group) = matched {
                    let replacement = rule["replacement"].as_str().unwrap_or("$1");
                    let label = rule["target_label"].as_str().expect("a target_label");
                    target.insert(label.to_owned(), replacement.replace("$1", &group));
                }
            }
            other => panic!("this test's relabelling does not know action {other}"),
        }
    }
    target.retain(|k, _| !k.starts_with("__meta_"));
    Some(target)
}

/// The injector's name for the sidecar's health port and for its
/// container, from its source.
fn injected_names() -> (String, String) {
    let source = read(&repository().join("control-plane/src/inject/sidecar.rs"));
    let constant = |name: &str| -> String {
        let prefix = format!("pub const {name}: &str = \"");
        let start = source
            .find(&prefix)
            .unwrap_or_else(|| panic!("sidecar.rs has no {name}"))
            + prefix.len();
        let end = source[start..].find('"').expect("a closing quote") + start;
        source[start..end].to_owned()
    };
    (constant("HEALTH_PORT_NAME"), constant("PROXY_CONTAINER"))
}

/// The control plane's Deployment, as deploy/kubernetes has it.
struct Deployment {
    namespace: String,
    /// Its pods' labels.
    labels: BTreeMap<String, String>,
    /// Its container's name and ports.
    container: String,
    ports: Vec<(String, u16)>,
}

fn control_plane_deployment() -> Deployment {
    let documents = yaml_documents(&repository().join("deploy/kubernetes/base/deployment.yaml"));
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    Deployment {
        namespace: deployment["metadata"]["namespace"]
            .as_str()
            .expect("a namespace")
            .to_owned(),
        labels: deployment["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .expect("pod labels")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect(),
        container: container["name"].as_str().expect("a name").to_owned(),
        ports: container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().expect("a port name").to_owned(),
                    u16::try_from(p["containerPort"].as_u64().expect("a port")).expect("a port"),
                )
            })
            .collect(),
    }
}

#[test]
fn the_scrape_configs_find_the_sidecars_and_the_control_plane() {
    let (health_port, proxy_container) = injected_names();
    let Deployment {
        namespace: cp_namespace,
        labels: cp_labels,
        container: cp_container,
        ports: cp_ports,
    } = control_plane_deployment();
    let cp_ports: Vec<(&str, u16)> = cp_ports.iter().map(|(n, p)| (n.as_str(), *p)).collect();

    // What pod discovery makes of an injected pod still waiting for its
    // sidecar (Pending), of a finished Job's pod, and of the control plane.
    let app = BTreeMap::from([("app".to_owned(), "llama".to_owned())]);
    let mut targets = Vec::new();
    targets.extend(pod_targets(
        "models",
        "llama-0",
        &app,
        "Pending",
        &proxy_container,
        true,
        &[(&health_port, 15020)],
    ));
    targets.extend(pod_targets(
        "models",
        "llama-0",
        &app,
        "Pending",
        "vllm",
        false,
        &[("http", 8000)],
    ));
    targets.extend(pod_targets(
        "batch",
        "job-x",
        &app,
        "Succeeded",
        &proxy_container,
        true,
        &[(&health_port, 15020)],
    ));
    targets.extend(pod_targets(
        &cp_namespace,
        "infermesh-control-plane-0",
        &cp_labels,
        "Running",
        &cp_container,
        false,
        &cp_ports,
    ));

    let config = yaml(&observability().join("prometheus/prometheus.yaml"));
    let jobs: BTreeMap<&str, &Value> = config["scrape_configs"]
        .as_array()
        .expect("scrape configs")
        .iter()
        .map(|j| (j["job_name"].as_str().expect("a job name"), j))
        .collect();
    let scraped = |job: &str| -> Vec<Target> {
        targets
            .iter()
            .filter_map(|t| relabel(jobs[job], t))
            .collect()
    };
    let expected = |address: &str, namespace: &str, pod: &str, container: &str| {
        Target::from([
            ("__address__".to_owned(), address.to_owned()),
            ("namespace".to_owned(), namespace.to_owned()),
            ("pod".to_owned(), pod.to_owned()),
            ("container".to_owned(), container.to_owned()),
        ])
    };
    assert_eq!(
        scraped("infermesh-proxy-kubernetes"),
        [expected(
            "10.0.0.7:15020",
            "models",
            "llama-0",
            &proxy_container
        )],
        "the sidecar's health port, even while its pod is Pending; no app port, no finished pod"
    );
    assert_eq!(
        scraped("infermesh-control-plane-kubernetes"),
        [expected(
            "10.0.0.7:15014",
            &cp_namespace,
            "infermesh-control-plane-0",
            &cp_container
        )],
        "the control plane's admin port only"
    );
    for job in [
        "infermesh-proxy-kubernetes",
        "infermesh-control-plane-kubernetes",
    ] {
        assert_eq!(jobs[job]["metrics_path"], "/metrics");
    }

    // The static jobs: the demos' ports.
    let static_targets = |job: &str| -> Vec<String> {
        jobs[job]["static_configs"]
            .as_array()
            .expect("static configs")
            .iter()
            .flat_map(|c| strings(&c["targets"]).into_iter().map(str::to_owned))
            .collect()
    };
    assert!(static_targets("infermesh-proxy").contains(&"127.0.0.1:15020".to_owned()));
    assert_eq!(
        static_targets("infermesh-control-plane"),
        ["127.0.0.1:15014"]
    );
    assert!(
        read(&repository().join("deploy/demo.sh")).contains("--health-address 127.0.0.1:15020")
    );
    let mesh_demo = read(&repository().join("deploy/mesh-demo.sh"));
    assert!(mesh_demo.contains("--admin 127.0.0.1:15014"));
    // mesh-demo.sh's sidecars' health ports.
    for port in ["15120", "15220"] {
        assert!(static_targets("infermesh-proxy").contains(&format!("127.0.0.1:{port}")));
        assert!(mesh_demo.contains(port), "mesh-demo.sh has no {port}");
    }

    // The Prometheus Operator's PodMonitors select the same.
    let documents = yaml_documents(&observability().join("kubernetes/podmonitor.yaml"));
    let monitor = |name: &str| -> &Value {
        documents
            .iter()
            .find(|d| d["kind"] == "PodMonitor" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no PodMonitor {name}"))
    };
    for document in &documents {
        assert_eq!(document["apiVersion"], "monitoring.coreos.com/v1");
    }
    let proxies = monitor("infermesh-proxies");
    assert_eq!(proxies["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(proxies["spec"]["selector"], serde_json::json!({}));
    assert_eq!(
        proxies["spec"]["podMetricsEndpoints"][0]["port"],
        health_port.as_str()
    );
    assert_eq!(
        proxies["spec"]["podMetricsEndpoints"][0]["path"],
        "/metrics"
    );
    let control_plane = monitor("infermesh-control-plane");
    assert_eq!(
        strings(&control_plane["spec"]["namespaceSelector"]["matchNames"]),
        [cp_namespace.as_str()]
    );
    for (key, value) in control_plane["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(
            cp_labels.get(key).map(String::as_str),
            value.as_str(),
            "{key}"
        );
    }
    let port = control_plane["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .expect("a port");
    assert_eq!(port, "admin");
    assert!(cp_ports.iter().any(|(name, _)| *name == port));
    assert_eq!(
        control_plane["spec"]["podMetricsEndpoints"][0]["path"],
        "/metrics"
    );
}

// ---------------------------------------------------------------------------
// The rules.

fn alerts(rules: &Value) -> Vec<&Value> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests_make_every_alert_fire() {
    let dir = observability().join("prometheus");
    let (ok, out) = promtool(&dir, &["check", "rules", "rules.yaml"]);
    assert!(ok, "promtool check rules failed:\n{out}");
    let (ok, out) = promtool(&dir, &["test", "rules", "rules_test.yaml"]);
    assert!(
        ok && out.contains("SUCCESS"),
        "promtool test rules failed:\n{out}"
    );

    let rules = yaml(&dir.join("rules.yaml"));
    let tests = yaml(&dir.join("rules_test.yaml"));
    assert_eq!(strings(&tests["rule_files"]), ["rules.yaml"]);
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_array().expect("tests") {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("an alertname");
            match case["exp_alerts"].as_array() {
                Some(expected) if !expected.is_empty() => {
                    for alert in expected {
                        let summary = alert["exp_annotations"]["summary"].as_str();
                        assert!(
                            summary.is_some_and(|s| !s.is_empty()),
                            "{name}: its firing cases check its annotations"
                        );
                    }
                    fired.insert(name)
                }
                _ => quiet.insert(name),
            };
        }
    }
    let alerts = alerts(&rules);
    assert!(alerts.len() >= 10, "{} alerts", alerts.len());
    for alert in alerts {
        let name = alert["alert"].as_str().expect("a name");
        assert!(
            fired.contains(name),
            "no test of rules_test.yaml makes {name} fire"
        );
        assert!(
            quiet.contains(name),
            "no test of rules_test.yaml checks that {name} stays quiet"
        );
        assert!(alert["for"].as_str().is_some(), "{name} has no `for:`");
        let severity = alert["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("warning" | "critical")),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "description"] {
            assert!(
                alert["annotations"][annotation]
                    .as_str()
                    .is_some_and(|s| s.len() > 10),
                "{name} has no {annotation}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The PrometheusRule.

/// The generated end of podmonitor.yaml: the PrometheusRule holding
/// rules.yaml's groups, its text indented under `spec`.
fn render_prometheus_rule(rules_yaml: &str) -> String {
    let start = rules_yaml
        .find("\ngroups:")
        .map(|i| i + 1)
        .expect("rules.yaml has `groups:` at the top level");
    let mut out = format!(
        "{GENERATED_MARKER}\n\
         # not edit it, edit rules.yaml and regenerate it with\n\
         #\n\
         #   {UPDATE}\n\
         #\n\
         # tests/tests/observability.rs fails while its groups differ from rules.yaml's.\n\
         ---\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  \
           name: infermesh\n  \
           namespace: infermesh-system\n  \
           labels:\n    \
             app.kubernetes.io/part-of: infermesh\n\
         spec:\n"
    );
    for line in rules_yaml[start..].lines() {
        if !line.is_empty() {
            out.push_str("  ");
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[test]
fn the_prometheus_rule_holds_the_groups_of_rules_yaml() {
    let rules_path = observability().join("prometheus/rules.yaml");
    let path = observability().join("kubernetes/podmonitor.yaml");
    if std::env::var_os("INFERMESH_UPDATE_OBSERVABILITY").is_some_and(|v| v == "1") {
        let text = read(&path);
        let head = text
            .find(GENERATED_MARKER)
            .map_or(text.as_str(), |i| &text[..i]);
        let written = format!("{head}{}", render_prometheus_rule(&read(&rules_path)));
        std::fs::write(&path, written)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
    }
    let documents = yaml_documents(&path);
    let rule = documents
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .unwrap_or_else(|| panic!("podmonitor.yaml holds no PrometheusRule; run {UPDATE}"));
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert!(
        rule["spec"]["groups"] == yaml(&rules_path)["groups"],
        "the PrometheusRule of deploy/observability/kubernetes/podmonitor.yaml does not hold \
         the groups of deploy/observability/prometheus/rules.yaml; regenerate it with\n  {UPDATE}"
    );
}

// ---------------------------------------------------------------------------
// The dashboard.

/// Every panel, those inside rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// The dashboard's PromQL: the panels' queries and the selectors of its
/// variables' `label_values(...)`.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries: Vec<String> = panels(dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_owned()
        })
        .collect();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if variable["type"] == "query" {
            let definition = variable["definition"].as_str().expect("a definition");
            assert_eq!(variable["query"]["query"], definition, "{definition}");
            let selector = definition
                .strip_prefix("label_values(")
                .and_then(|rest| rest.rsplit_once(", "))
                .map(|(selector, _)| selector)
                .unwrap_or_else(|| panic!("not label_values(selector, label): {definition}"));
            queries.push(selector.to_owned());
        }
    }
    queries
}

#[test]
fn the_dashboard_queries_parse_and_use_its_variables() {
    let path = observability().join("grafana/infermesh.json");
    let dashboard: Value = serde_json::from_str(&read(&path)).expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert_eq!(dashboard["uid"], "infermesh-overview");

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let names: Vec<&str> = variables
        .iter()
        .map(|v| v["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(
        names,
        ["datasource", "namespace", "route", "backend", "model"]
    );
    assert_eq!(variables[0]["type"], "datasource");
    assert_eq!(variables[0]["query"], "prometheus");
    let datasource = serde_json::json!({ "type": "prometheus", "uid": "${datasource}" });

    let rows: Vec<&str> = panels(&dashboard)
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().expect("a title"))
        .collect();
    assert_eq!(
        rows,
        [
            "Traffic",
            "Errors",
            "Latency",
            "Models",
            "Backends",
            "Mesh",
            "Telemetry"
        ]
    );
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().expect("a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id taken"
        );
        let grid = &panel["gridPos"];
        assert!(
            grid["x"].as_u64().unwrap_or(99) + grid["w"].as_u64().unwrap_or(99) <= 24,
            "{title}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], datasource, "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}");
        for target in targets {
            assert_eq!(target["datasource"], datasource, "{title}");
        }
    }

    // Each query, its variables given values, must be valid PromQL: as
    // recording rules, promtool parses them.
    let known = [
        "$namespace",
        "$route",
        "$backend",
        "$model",
        "$__rate_interval",
        "$__range",
    ];
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in dashboard_queries(&dashboard).iter().enumerate() {
        for (at, _) in query.match_indices('$') {
            assert!(
                known.iter().any(|k| query[at..].starts_with(k)),
                "an unknown variable in {query}"
            );
        }
        let promql = query
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$namespace", ".*")
            .replace("$route", ".*")
            .replace("$backend", ".*")
            .replace("$model", ".*");
        file.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&promql).expect("JSON")
        ));
    }
    let tmp = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(tmp.path().join("queries.yaml"), &file).expect("write the queries");
    let (ok, out) = promtool(tmp.path(), &["check", "rules", "queries.yaml"]);
    assert!(ok, "the dashboard's queries do not parse:\n{out}\n{file}");
}

// ---------------------------------------------------------------------------
// The metrics named: each one infermesh exposes.

/// A metric name the text uses, with the labels of its selector (`None`
/// without one): `infermesh_...` not part of a longer name, nor of a
/// recording rule's (`level:infermesh_...:operation`).
fn metric_uses(text: &str) -> Vec<(String, Option<Vec<String>>)> {
    let bytes = text.as_bytes();
    let mut uses = Vec::new();
    for (start, _) in text.match_indices("infermesh_") {
        if start > 0
            && (bytes[start - 1].is_ascii_alphanumeric() || b"_:".contains(&bytes[start - 1]))
        {
            continue;
        }
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        if bytes.get(end) == Some(&b':') {
            continue;
        }
        let name = text[start..end].to_owned();
        let labels = (bytes.get(end) == Some(&b'{')).then(|| {
            parse_matchers(&text[end + 1..]).unwrap_or_else(|| {
                panic!(
                    "cannot read the selector of {name}: {}",
                    &text[start..text.len().min(end + 120)]
                )
            })
        });
        uses.push((name, labels));
    }
    uses
}

/// The label names of the matchers after a `{`, up to its `}`:
/// `a="x", b=~'y'...`.
fn parse_matchers(text: &str) -> Option<Vec<String>> {
    let mut chars = text.chars().peekable();
    let mut names = Vec::new();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() == Some(&'}') {
            return Some(names);
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if name.is_empty() {
            return None;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next()? {
            '=' => {
                if chars.peek() == Some(&'~') {
                    chars.next();
                }
            }
            '!' => {
                if !matches!(chars.next()?, '=' | '~') {
                    return None;
                }
            }
            _ => return None,
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let quote = chars.next()?;
        if !matches!(quote, '"' | '\'' | '`') {
            return None;
        }
        loop {
            match chars.next()? {
                '\\' => {
                    chars.next()?;
                }
                c if c == quote => break,
                _ => {}
            }
        }
        names.push(name);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next()? {
            ',' => {}
            '}' => return Some(names),
            _ => return None,
        }
    }
}

/// What metrics pages expose: each sample name and family name with the
/// label names of its samples.
#[derive(Default)]
struct Exposed(BTreeMap<String, BTreeSet<String>>);

impl Exposed {
    fn add_page(&mut self, page: &str) {
        let mut histograms = BTreeSet::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                    continue;
                };
                self.0.entry(name.to_owned()).or_default();
                if kind == "histogram" {
                    histograms.insert(name.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            let labels = if line[end..].starts_with('{') {
                parse_matchers(&line[end + 1..])
                    .unwrap_or_else(|| panic!("cannot read the sample {line}"))
            } else {
                Vec::new()
            };
            self.0
                .entry(name.to_owned())
                .or_default()
                .extend(labels.iter().cloned());
            // A histogram's family name carries its samples' labels.
            if let Some(family) = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|family| histograms.contains(*family))
            {
                self.0
                    .entry(family.to_owned())
                    .or_default()
                    .extend(labels.into_iter().filter(|l| l != "le"));
            }
        }
    }

    /// Why `name` with `labels` is not exposed, if it is not.
    fn problem(&self, name: &str, labels: Option<&[String]>) -> Option<String> {
        let Some(exposed) = self.0.get(name) else {
            return Some(format!("{name} is not a metric infermesh exposes"));
        };
        let unknown: Vec<&String> = labels
            .into_iter()
            .flatten()
            .filter(|l| !exposed.contains(*l) && !TARGET_LABELS.contains(&l.as_str()))
            .collect();
        (!unknown.is_empty())
            .then(|| format!("{name} has no label {unknown:?} (it has {exposed:?})"))
    }
}

/// Every string in `value`, at any depth.
fn all_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| all_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| all_strings(v, out)),
        _ => {}
    }
}

/// Answers `/v1/stream` with a `text/event-stream` (its last chunk with
/// OpenAI's token usage), `/v1/unavailable` with a 503 (which the proxy
/// retries), anything else with JSON.
fn model() -> backend::Handler {
    let echo = backend::echo("model");
    Arc::new(move |request: Request<Incoming>| {
        if request.uri().path() == "/v1/unavailable" {
            Box::pin(async {
                Response::builder()
                    .status(503)
                    .body(backend::full("busy"))
                    .expect("a response")
            })
        } else if request.uri().path() == "/v1/stream" {
            Box::pin(async {
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(backend::full(concat!(
                        "data: {\"token\":\"hi\"}\n\n",
                        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
                        "data: [DONE]\n\n",
                    )))
                    .expect("a response")
            })
        } else {
            echo(request)
        }
    })
}

/// The mesh of the control-plane-fed gateway: a model backend, a
/// listener whose route sends to it, and a listener that takes only
/// mutual TLS.
fn mesh_documents(model: std::net::SocketAddr) -> String {
    gateway_mesh(model, "")
        + "---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: mtls }
spec: { address: \"127.0.0.1:0\", tls: { mode: strict } }
"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_files_name_is_one_infermesh_exposes() {
    let model = MockBackend::start(Protocol::Http1, model()).await;
    let http = client::http1();

    // A gateway from a file, with a rate-limited and hedged route (hedges
    // due after 10 s: none is sent), serving a whole answer, a stream and
    // a 503 it retries and a path it refuses, tracing to a collector.
    let collector = OtlpReceiver::start().await;
    let collector_url = format!("http://{}", collector.http);
    let gateway = Gateway::start_with_args(
        &config(&[
            &listener("web", "http"),
            &backend("model", "http1", &[model.addr]),
            &route_with(
                "model",
                "rateLimit: { requestsPerSecond: 1000 }\nhedge: { delay: 10s }",
            ),
        ]),
        &["--trace-otlp-endpoint", &collector_url],
    );
    for path in ["/v1/models", "/v1/stream", "/v1/models"] {
        let reply = client::get(&http, &gateway.url("web", path)).await;
        assert_eq!(reply.status, 200, "{path}");
    }
    let reply = client::get(&http, &gateway.url("web", "/v1/unavailable")).await;
    assert_eq!(reply.status, 503);
    // A request the proxy refuses itself: an error with a reason.
    let reply = client::get(&http, &gateway.url("web", "/v1/%zz")).await;
    assert_eq!(reply.status, 400);

    // A control plane, a gateway it feeds, and a proxy it refuses a
    // certificate (an unknown join token).
    let files = MeshFiles::new(&mesh_documents(model.addr));
    let credential = files.credential("edge", "gateway", "1h");
    let unknown = files.unknown_credential();
    let control_plane = ControlPlane::start(&files, None, &["--heartbeat", "1s"]);
    let args = files.proxy_args(&[control_plane.grpc], "edge-0", &credential, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let edge = Gateway::start_from_control_plane("gateway", &args);
    control_plane.wait_synced(1, Duration::from_secs(15)).await;
    let reply = client::get(&http, &edge.url("public", "/v1/stream")).await;
    assert_eq!(reply.status, 200);
    // Plaintext on the mutual TLS listener: a failed handshake, counted
    // before the connection is closed.
    let mut plaintext = tokio::net::TcpStream::connect(edge.listener("mtls"))
        .await
        .expect("connect to the mutual TLS listener");
    plaintext
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: edge\r\n\r\n")
        .await
        .expect("send a plaintext request");
    let mut answer = Vec::new();
    let _ = plaintext.read_to_end(&mut answer).await;
    let args = files.proxy_args(&[control_plane.grpc], "stranger-0", &unknown, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stranger = Gateway::spawn_from_control_plane("sidecar", &args);
    stranger.wait_for_log(
        |l| {
            l["message"]
                == "cannot get a workload certificate; the current one (if any) stays until it expires"
        },
        Duration::from_secs(15),
    );

    let mut exposed = Exposed::default();
    let pages = [
        client::metrics(gateway.health).await,
        client::metrics(edge.health).await,
        client::metrics(stranger.health).await,
        control_plane.metrics().await,
    ];
    for page in &pages {
        exposed.add_page(page);
    }

    // What every file names.
    let mut texts: Vec<(String, String)> = [
        "prometheus/prometheus.yaml",
        "prometheus/rules.yaml",
        "prometheus/rules_test.yaml",
        "kubernetes/podmonitor.yaml",
    ]
    .iter()
    .map(|f| (f.to_string(), read(&observability().join(f))))
    .collect();
    texts.push((
        "docs/observability.md".into(),
        read(&repository().join("docs/observability.md")),
    ));
    let dashboard: Value =
        serde_json::from_str(&read(&observability().join("grafana/infermesh.json")))
            .expect("the dashboard is JSON");
    let mut dashboard_strings = Vec::new();
    all_strings(&dashboard, &mut dashboard_strings);
    texts.push((
        "grafana/infermesh.json".into(),
        dashboard_strings.join("\n"),
    ));

    let mut problems = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (file, text) in &texts {
        for (name, labels) in metric_uses(text) {
            if let Some(problem) = exposed.problem(&name, labels.as_deref()) {
                problems.insert(format!("{file}: {problem}"));
            }
            used.insert(name);
        }
    }
    assert!(
        problems.is_empty(),
        "names that are not what infermesh exposes:\n  {}\n\nexposed:\n{:#?}",
        problems.into_iter().collect::<Vec<_>>().join("\n  "),
        exposed.0
    );
    // The check saw the files' metrics (a broken scanner sees none).
    for name in [
        "infermesh_requests_total",
        "infermesh_stream_first_event_seconds_bucket",
        "infermesh_endpoints",
        "infermesh_control_plane_connected",
        "infermesh_control_plane_pushes_total",
        "infermesh_control_plane_certificates_refused_total",
        "infermesh_identity_cert_expiry_timestamp_seconds",
        "infermesh_config_last_reload_successful",
        "infermesh_log_lines_dropped_total",
        "infermesh_tokens_total",
        "infermesh_time_to_first_token_seconds_bucket",
        "infermesh_retry_budget_exhausted_total",
        "infermesh_hedges_total",
        "infermesh_tls_handshakes_total",
        "infermesh_trace_spans_dropped_total",
    ] {
        assert!(used.contains(name), "no file names {name}");
    }
}

#[test]
fn the_metric_scanner_reads_names_and_selectors() {
    let text = r#"sum(rate(infermesh_requests_total{code=~"5..", route="a,}b"}[5m])) / route:infermesh_requests:rate5m
        x-infermesh-error, infermesh_endpoints{state="ejected"} infermesh_t_bucket{le="+Inf"} 3"#;
    assert_eq!(
        metric_uses(text),
        [
            (
                "infermesh_requests_total".to_owned(),
                Some(vec!["code".to_owned(), "route".to_owned()])
            ),
            (
                "infermesh_endpoints".to_owned(),
                Some(vec!["state".to_owned()])
            ),
            ("infermesh_t_bucket".to_owned(), Some(vec!["le".to_owned()])),
        ]
    );
    let mut exposed = Exposed::default();
    exposed.add_page(
        "# TYPE infermesh_t histogram\ninfermesh_t_bucket{route=\"r\",le=\"1\"} 1\ninfermesh_t_sum{route=\"r\"} 1\n",
    );
    assert_eq!(
        exposed.problem("infermesh_t", Some(&["route".to_owned()])),
        None
    );
    assert_eq!(
        exposed.problem(
            "infermesh_t_bucket",
            Some(&["le".to_owned(), "pod".to_owned()])
        ),
        None
    );
    assert!(
        exposed
            .problem("infermesh_t", Some(&["le".to_owned()]))
            .is_some()
    );
    assert!(exposed.problem("infermesh_u", None).is_some());
}
