//! `deploy/observability` against a real Prometheus server (Debian's
//! `prometheus`): it scrapes a control plane, a gateway the control plane
//! feeds (with its workload certificate, tracing to a collector that never
//! answers) and a sidecar the control plane refuses a certificate, every
//! second, and evaluates rules.yaml, while clients send the gateway chat
//! completions (whole and streamed with their token usage, some answered
//! 500 by the model, some hedged beyond the hedge budget), gRPC calls (some
//! failing), requests to a backend whose endpoint refuses connections
//! (their retries beyond the retry budget) and to one whose endpoint does
//! not speak mutual TLS, and plaintext to a mutual TLS listener; the
//! control plane pushes an update the gateway cannot apply (a NACK), then
//! one it can.
//!
//! Then every recording rule, every operand of every alert (its
//! comparison taken off: a healthy mesh's alerts are silent, their series
//! are not), every panel query of the Grafana dashboard (its variables
//! given `.*` or a window) and every variable's query must be valid PromQL
//! and return data with a value other than NaN; Prometheus must report
//! every rule it loaded as evaluated without error; and the alerts pending
//! must be exactly those this mesh should raise (a failing route, a dead
//! backend, a refused certificate, a NACK, spent retry and hedge budgets,
//! failed mutual TLS both ways, dropped spans), none other. `promtool` checks
//! in tests/tests/observability.rs parse the same files; this shows that
//! their series exist, with the labels they select on and the matching
//! they do, in what the binaries expose, and that the alerts tell a
//! healthy proxy from a broken one.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use infermesh_tests::backend::{self, MockBackend, Protocol};
use infermesh_tests::client::{self, HttpClient, metric_value};
use infermesh_tests::mesh::{ControlPlane, MeshFiles};
use infermesh_tests::models::MockModels;
use infermesh_tests::process::Gateway;
use serde_json::{Value, json};
use tokio::time::Instant;

const PROMETHEUS: &str = "the Prometheus server is installed (Debian package `prometheus`: `apt install prometheus`, or run ./test.sh, which installs it)";

/// How long the expressions may take to all return data once the load
/// runs: a few scrapes and rule evaluations, one a second.
const DATA_DEADLINE: Duration = Duration::from_secs(60);

/// Expressions that cannot return data in what this test can make, each
/// with why (as it is evaluated: an alert's operand without its
/// comparison, a panel's query with its variables given). The test fails
/// if one is no longer in the files, or returns data (then it belongs with
/// the others). Empty: every series the files use is made here.
const SILENT: &[(&str, &str)] = &[];

/// The alerts the mesh this test makes raises (pending: none lasts as
/// long as its `for:`), and none other.
const RAISED: [&str; 12] = [
    // Route `gone`: every request fails.
    "InfermeshRouteErrorRatioHigh",
    // Backend `gone`: every attempt fails to connect...
    "InfermeshBackendAttemptsFailing",
    // ...so outlier detection ejects its endpoint...
    "InfermeshEndpointsEjected",
    // ...its only one.
    "InfermeshBackendNoHealthyEndpoint",
    // The sidecar refused its certificate has no config stream...
    "InfermeshProxyControlPlaneUnreachable",
    // ...and the control plane counts the refusals.
    "InfermeshControlPlaneCertificatesRefused",
    // The gateway refused one update.
    "InfermeshControlPlanePushesNacked",
    // Route `gone` has no retry budget: its retries are refused.
    "InfermeshRetryBudgetExhausted",
    // Route `hedged` hedges every request after 1 ms, beyond its budget.
    "InfermeshHedgeBudgetExhausted",
    // Plaintext clients on the gateway's mutual TLS listener...
    "InfermeshMtlsInboundHandshakesFailing",
    // ...and backend `sealed`, whose endpoint speaks plaintext.
    "InfermeshMtlsOutboundHandshakesFailing",
    // The gateway's trace collector never answers: its queue fills.
    "InfermeshTraceSpansDropped",
];

fn observability() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// The Prometheus server.

/// A running `prometheus`, killed when dropped.
struct Prometheus {
    child: Child,
    /// Its config and storage, removed once it is killed.
    _dir: Option<tempfile::TempDir>,
    log: Arc<Mutex<Vec<String>>>,
    address: SocketAddr,
    http: HttpClient,
}

impl Prometheus {
    /// Starts Prometheus with `config` (JSON, which is YAML) on a free
    /// loopback port and a storage of its own, and waits until it is
    /// ready.
    async fn start(config: &Value) -> Prometheus {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config_path = dir.path().join("prometheus.yaml");
        std::fs::write(&config_path, config.to_string()).expect("write the config");
        // Prometheus cannot be told port 0 and say which it took: take a
        // free port, and another if it is taken in between.
        for _ in 0..3 {
            let address = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port");
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={address}"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect(PROMETHEUS);
            let log = Arc::new(Mutex::new(Vec::new()));
            let stderr = child.stderr.take().expect("piped stderr");
            let lines = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().expect("log lock").push(line);
                }
            });
            let mut prometheus = Prometheus {
                child,
                _dir: None,
                log,
                address,
                http: client::http1(),
            };
            if prometheus.wait_ready().await {
                prometheus._dir = Some(dir);
                return prometheus;
            }
            assert!(
                prometheus.dump().contains("address already in use"),
                "prometheus exited:\n{}",
                prometheus.dump()
            );
        }
        panic!("no free port for prometheus");
    }

    /// Waits for `/-/ready`; false if Prometheus exited.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.child.try_wait().expect("poll prometheus").is_some() {
                return false;
            }
            let request = Request::get(format!("http://{}/-/ready", self.address))
                .body(Full::default())
                .expect("a request");
            if let Ok(reply) = client::send(&self.http, request).await
                && reply.status == 200
            {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s:\n{}",
                self.dump()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn dump(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// `GET /api/v1/<path>?<query>`: its `data`, or its error.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        let url = format!("http://{}/api/v1/{path}?{}", self.address, query.join("&"));
        let reply = client::get(&self.http, &url).await;
        let body: Value = serde_json::from_slice(&reply.body).map_err(|e| {
            format!(
                "{} {e}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            )
        })?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// Evaluates `promql` now: an error if it is not valid, else what it
    /// returned.
    async fn query(&self, promql: &str) -> Result<Answer, String> {
        let data = self.api("query", &[("query", promql)]).await?;
        Ok(Answer::of(&data))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but the unreserved characters.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// What an instant query returned.
#[derive(Debug, PartialEq)]
enum Answer {
    /// No sample.
    Empty,
    /// Samples, all NaN (a quantile of a histogram that did not move, a
    /// ratio of zeros).
    OnlyNaN(usize),
    /// Samples, some a number.
    Data(usize),
}

impl Answer {
    fn of(data: &Value) -> Answer {
        let values: Vec<&str> = match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["value"][1].as_str())
                .collect(),
            Some("scalar") => data["result"][1].as_str().into_iter().collect(),
            _ => Vec::new(),
        };
        if values.is_empty() {
            Answer::Empty
        } else if values.iter().all(|v| *v == "NaN") {
            Answer::OnlyNaN(values.len())
        } else {
            Answer::Data(values.len())
        }
    }
}

// ---------------------------------------------------------------------------
// The expressions of the files.

/// An expression to evaluate, and where it comes from.
#[derive(Clone, Debug)]
struct Expression {
    source: String,
    promql: String,
}

/// Every recording rule (its expression, and the series it records) and
/// every operand of every alert, its comparison taken off.
fn rule_expressions(rules: &Value) -> (Vec<Expression>, Vec<Expression>) {
    let mut records = Vec::new();
    let mut alerts = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("an expr").trim();
            if let Some(record) = rule["record"].as_str() {
                records.push(Expression {
                    source: format!("recording rule {record}"),
                    promql: expr.to_owned(),
                });
                records.push(Expression {
                    source: format!("the series Prometheus recorded for {record}"),
                    promql: record.to_owned(),
                });
            } else {
                let alert = rule["alert"].as_str().expect("an alert or a record");
                for operand in set_operands(expr) {
                    alerts.push(Expression {
                        source: format!("alert {alert}"),
                        promql: comparison_lhs(&operand).to_owned(),
                    });
                }
            }
        }
    }
    (records, alerts)
}

/// Grafana's variables as this test gives them: the dashboard's own
/// (`variables`) every value (`.*`, their `allValue`), and windows.
fn substitute(query: &str, variables: &[&str]) -> String {
    let mut promql = query
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$__interval", "15s");
    for variable in variables {
        promql = promql
            .replace(&format!("${{{variable}}}"), ".*")
            .replace(&format!("${variable}"), ".*");
    }
    assert!(
        !promql.contains('$'),
        "a variable this test does not know in {query}"
    );
    promql
}

fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// Every panel target's query, and the label each variable query lists
/// with the selector it lists it from.
fn dashboard_expressions(dashboard: &Value) -> (Vec<Expression>, Vec<(String, String)>) {
    let list = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let names: Vec<&str> = list
        .iter()
        .filter(|v| v["type"] == "query")
        .filter_map(|v| v["name"].as_str())
        .collect();
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            queries.push(Expression {
                source: format!("panel {title:?}"),
                promql: substitute(expr, &names),
            });
        }
    }
    let mut variables = Vec::new();
    for variable in list {
        if variable["type"] != "query" {
            continue;
        }
        let definition = variable["definition"].as_str().expect("a definition");
        let (selector, label) = definition
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|rest| rest.rsplit_once(", "))
            .unwrap_or_else(|| panic!("not label_values(selector, label): {definition}"));
        variables.push((substitute(selector, &names), label.to_owned()));
    }
    (queries, variables)
}

/// For each byte of `expr`, whether it is outside every bracket and
/// string.
fn top_level(expr: &str) -> Vec<bool> {
    let mut depth = 0i32;
    let mut quote = None;
    let mut escaped = false;
    expr.bytes()
        .map(|b| {
            if let Some(q) = quote {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == q {
                    quote = None;
                }
                return false;
            }
            match b {
                b'"' | b'\'' | b'`' => quote = Some(b),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// Whether `word` starts at `at` in `expr` as a whole word.
fn word_at(expr: &str, at: usize, word: &str) -> bool {
    let bytes = expr.as_bytes();
    expr[at..].starts_with(word)
        && (at == 0 || !is_name_byte(bytes[at - 1]))
        && !bytes.get(at + word.len()).is_some_and(|b| is_name_byte(*b))
}

/// The index just past the bracket that closes the one at `open`.
fn past_closing(expr: &str, open: usize) -> usize {
    let (mut depth, mut quote, mut escaped) = (0, None, false);
    for (i, b) in expr.bytes().enumerate().skip(open) {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
            continue;
        }
        match b {
            b'"' | b'\'' | b'`' => quote = Some(b),
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced brackets in {expr}")
}

/// The operands of the set operators (`and`, `or`, `unless`, with their
/// `on (...)` or `ignoring (...)`) at the top level of `expr`.
fn set_operands(expr: &str) -> Vec<String> {
    let top = top_level(expr);
    let bytes = expr.as_bytes();
    let mut operands = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        let operator = ["and", "or", "unless"]
            .into_iter()
            .find(|w| top[i] && word_at(expr, i, w));
        let Some(operator) = operator else {
            i += 1;
            continue;
        };
        operands.push(expr[start..i].trim().to_owned());
        i += operator.len();
        let skip_space = |mut i: usize| {
            while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            i
        };
        i = skip_space(i);
        if let Some(modifier) = ["on", "ignoring"].into_iter().find(|w| word_at(expr, i, w)) {
            i = skip_space(i + modifier.len());
            assert_eq!(
                bytes.get(i),
                Some(&b'('),
                "{modifier} without labels: {expr}"
            );
            i = past_closing(expr, i);
        }
        start = i;
    }
    operands.push(expr[start..].trim().to_owned());
    operands
}

/// `expr` without the brackets around all of it.
fn strip_brackets(mut expr: &str) -> &str {
    while expr.starts_with('(') && past_closing(expr, 0) == expr.len() {
        expr = expr[1..expr.len() - 1].trim();
    }
    expr
}

/// The left-hand side of the comparison at the top level of `expr`
/// (`x > 0.05`: `x`), or `expr` if it compares nothing.
fn comparison_lhs(expr: &str) -> &str {
    let expr = strip_brackets(expr.trim());
    let top = top_level(expr);
    let bytes = expr.as_bytes();
    let at = (0..bytes.len()).find(|&i| {
        top[i]
            && match bytes[i] {
                b'<' | b'>' => true,
                b'=' | b'!' => bytes.get(i + 1) == Some(&b'='),
                _ => false,
            }
    });
    match at {
        Some(at) => strip_brackets(expr[..at].trim()),
        None => expr,
    }
}

#[test]
fn alerts_are_cut_into_operands_and_their_comparisons_taken_off() {
    let cut = |expr: &str| -> Vec<String> {
        set_operands(expr)
            .iter()
            .map(|o| comparison_lhs(o).to_owned())
            .collect()
    };
    assert_eq!(
        cut("a:b:c > 0.05\nand\nroute:x:rate5m > 0.05"),
        ["a:b:c", "route:x:rate5m"]
    );
    assert_eq!(
        cut("m_expiry - time() < 6 * 3600\nand\nm_expiry > 0"),
        ["m_expiry - time()", "m_expiry"]
    );
    assert_eq!(
        cut("last_update\nunless on (job, instance)\n(connected == 1)"),
        ["last_update", "connected"]
    );
    assert_eq!(
        cut("time() - last_update > 600 and on(job) (connected == 1)"),
        ["time() - last_update", "connected"]
    );
    assert_eq!(
        cut(r#"sum by (backend) (e{state="healthy", x!="a>b"}) == 0 and sum by (backend) (e) > 0"#),
        [
            r#"sum by (backend) (e{state="healthy", x!="a>b"})"#,
            "sum by (backend) (e)"
        ]
    );
    assert_eq!(
        cut(r#"sum by (reason) (increase(refused_total{r=~"(a|b)"}[10m])) >= 1"#),
        [r#"sum by (reason) (increase(refused_total{r=~"(a|b)"}[10m]))"#]
    );
    assert_eq!(cut("x != 0 or orders_total"), ["x", "orders_total"]);
    assert_eq!(cut("up == 0"), ["up"]);
    assert_eq!(cut("(a + b) / (c)"), ["(a + b) / (c)"]);
    assert_eq!(
        substitute(
            r#"rate(m{namespace=~"$namespace", route=~"${route}"}[$__rate_interval])"#,
            &["namespace", "route"]
        ),
        r#"rate(m{namespace=~".*", route=~".*"}[1m])"#
    );
    assert_eq!(percent_encode("a{b=\"c\"} +1"), "a%7Bb%3D%22c%22%7D%20%2B1");
}

// ---------------------------------------------------------------------------
// The mesh under load.

/// Two model servers of `llama`, which streams when asked (with its
/// token usage when asked) and answers one request in ten with a 500.
const SCENARIO: &str = "seed: 7
servers:
  - listen: 127.0.0.1:0
    models:
      - name: llama
        latency: { fixed: 5ms }
        interTokenDelay: 2ms
        tokens: 8
        errors:
          - { percent: 10, fault: { status: 500 } }
  - listen: 127.0.0.1:0
    models:
      - name: llama
        latency: { fixed: 5ms }
        interTokenDelay: 2ms
        tokens: 8
        errors:
          - { percent: 10, fault: { status: 500 } }
";

/// A gRPC server answering every call trailers-only, every other one
/// with status 14 (UNAVAILABLE).
fn grpc_server() -> backend::Handler {
    let calls = Arc::new(AtomicUsize::new(0));
    Arc::new(move |_request: Request<Incoming>| {
        let status = if calls.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            "0"
        } else {
            "14"
        };
        Box::pin(async move {
            Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", status)
                .body(backend::full(Bytes::new()))
                .expect("a response")
        })
    })
}

/// The mesh: the model servers (`llama` the first, `pair` both), a gRPC
/// server, a backend whose endpoint refuses connections, one that asks
/// the first model server for mutual TLS (which it does not speak), a
/// gateway listener with a route to each, and a mutual TLS listener.
fn mesh_documents(models: &[SocketAddr], grpc: SocketAddr, dead: SocketAddr) -> String {
    let (model, other) = (models[0], models[1]);
    format!(
        "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: llama, namespace: models }}
spec: {{ endpoints: [{{ address: \"{model}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: pair, namespace: models }}
spec: {{ endpoints: [{{ address: \"{model}\" }}, {{ address: \"{other}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: sealed, namespace: models }}
spec:
  endpoints: [{{ address: \"{model}\" }}]
  tls: {{ identity: \"spiffe://cluster.local/ns/models/sa/llama\" }}
  outlierDetection: {{ consecutiveFailures: 0 }}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: grpc, namespace: models }}
spec: {{ protocol: http2, endpoints: [{{ address: \"{grpc}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: gone, namespace: models }}
spec: {{ endpoints: [{{ address: \"{dead}\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: public }}
spec: {{ address: \"127.0.0.1:0\" }}
---
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: mtls }}
spec: {{ address: \"127.0.0.1:0\", tls: {{ mode: strict }} }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: chat }}
spec:
  listeners: [public]
  rules:
    - matches: [{{ path: {{ prefix: /v1/ }}, model: llama }}]
      backends: [{{ name: llama.models }}]
      rateLimit: {{ requestsPerSecond: 100000 }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: hedged }}
spec:
  listeners: [public]
  rules:
    - matches: [{{ path: {{ prefix: /v1/ }}, model: llama, headers: [{{ name: x-hedge, present: true }}] }}]
      backends: [{{ name: pair.models }}]
      hedge: {{ delay: 1ms, budgetPercent: 0 }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: grpc }}
spec:
  listeners: [public]
  rules:
    - matches: [{{ path: {{ prefix: /infermesh.test.Echo }} }}]
      backends: [{{ name: grpc.models }}]
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: gone }}
spec:
  listeners: [public]
  rules:
    - matches: [{{ path: {{ prefix: /gone/ }} }}]
      backends: [{{ name: gone.models }}]
      retry: {{ budget: {{ percent: 0, minRetryConcurrency: 0 }} }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: sealed }}
spec:
  listeners: [public]
  rules:
    - matches: [{{ path: {{ prefix: /sealed/ }} }}]
      backends: [{{ name: sealed.models }}]
"
    )
}

/// Listener `name` on `address`, in a file of its own.
fn extra_listener(name: &str, address: &str) -> String {
    format!(
        "apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: {{ name: {name} }}
spec: {{ address: \"{address}\" }}
"
    )
}

/// The kinds of request the load sends, in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Chat,
    Stream,
    /// A chat completion on route `hedged`.
    Hedged,
    Grpc,
    Gone,
    /// To backend `sealed`, whose endpoint does not speak mutual TLS.
    Sealed,
    /// Plaintext to the mutual TLS listener.
    Plaintext,
}

const KINDS: [Kind; 7] = [
    Kind::Chat,
    Kind::Stream,
    Kind::Hedged,
    Kind::Grpc,
    Kind::Gone,
    Kind::Sealed,
    Kind::Plaintext,
];

/// Statuses answered, by kind of request (0: no answer).
type Tally = BTreeMap<(Kind, u16), usize>;

/// Clients sending each kind of request in turn through `base` (the
/// gateway's listener) and to `mtls` (its mutual TLS listener) until
/// `stop`.
fn start_load(
    base: String,
    mtls: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    (0..clients)
        .map(|n| {
            let (base, stop) = (base.clone(), stop.clone());
            tokio::spawn(async move {
                let (http1, http2) = (client::http1(), client::http2());
                let mut tally = Tally::new();
                let mut turn = n;
                while !stop.load(Ordering::SeqCst) {
                    let kind = KINDS[turn % KINDS.len()];
                    turn += 1;
                    let chat = |stream: bool| {
                        let body = json!({
                            "model": "llama",
                            "messages": [{ "role": "user", "content": "hello" }],
                            "stream": stream,
                            "stream_options": { "include_usage": true },
                        });
                        Request::post(format!("{base}/v1/chat/completions"))
                            .header("content-type", "application/json")
                            .body(Full::from(body.to_string()))
                            .expect("a request")
                    };
                    let (http, request) = match kind {
                        Kind::Chat => (&http1, chat(false)),
                        Kind::Stream => (&http1, chat(true)),
                        Kind::Hedged => {
                            let mut request = chat(false);
                            request
                                .headers_mut()
                                .insert("x-hedge", http::HeaderValue::from_static("1"));
                            (&http1, request)
                        }
                        Kind::Grpc => (
                            &http2,
                            Request::post(format!("{base}/infermesh.test.Echo/Call"))
                                .header("content-type", "application/grpc")
                                .header("te", "trailers")
                                .body(Full::from(vec![0u8; 5]))
                                .expect("a request"),
                        ),
                        Kind::Gone => (
                            &http1,
                            Request::get(format!("{base}/gone/v1/models"))
                                .body(Full::default())
                                .expect("a request"),
                        ),
                        Kind::Sealed => (
                            &http1,
                            Request::get(format!("{base}/sealed/v1/models"))
                                .body(Full::default())
                                .expect("a request"),
                        ),
                        Kind::Plaintext => (
                            &http1,
                            Request::get(format!("http://{mtls}/v1/models"))
                                .body(Full::default())
                                .expect("a request"),
                        ),
                    };
                    let status = match client::send(http, request).await {
                        Ok(reply) => reply.status.as_u16(),
                        Err(_) => 0,
                    };
                    *tally.entry((kind, status)).or_default() += 1;
                }
                tally
            })
        })
        .collect()
}

/// A target Prometheus scrapes.
#[derive(Debug)]
struct Target {
    address: SocketAddr,
    /// The label the static job gives proxies.
    mode: Option<&'static str>,
    namespace: &'static str,
    pod: &'static str,
}

/// The config Prometheus runs: the static jobs of the shipped
/// prometheus.yaml (the Kubernetes ones need a cluster), scraping
/// `targets` by job, with the labels pod discovery would add, and the
/// shipped rules; everything every second.
fn prometheus_config(targets: &BTreeMap<&str, Vec<Target>>) -> Value {
    let dir = observability().join("prometheus");
    let mut config: Value =
        serde_saphyr::from_str(&read(&dir.join("prometheus.yaml"))).expect("prometheus.yaml");
    config["global"] = json!({
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    });
    let rule_files = config["rule_files"].as_array().expect("rule files").clone();
    config["rule_files"] = rule_files
        .iter()
        .map(|f| Value::from(dir.join(f.as_str().expect("a path")).display().to_string()))
        .collect();
    let jobs = config["scrape_configs"]
        .as_array_mut()
        .expect("scrape configs");
    jobs.retain(|job| job.get("static_configs").is_some());
    for job in jobs.iter_mut() {
        let name = job["job_name"].as_str().expect("a job name").to_owned();
        let ours = targets
            .get(name.as_str())
            .unwrap_or_else(|| panic!("no target for job {name}"));
        job["static_configs"] = ours
            .iter()
            .map(|target| {
                let mut labels = json!({ "namespace": target.namespace, "pod": target.pod });
                if let Some(mode) = target.mode {
                    labels["mode"] = json!(mode);
                }
                json!({ "targets": [target.address.to_string()], "labels": labels })
            })
            .collect();
    }
    assert_eq!(jobs.len(), targets.len(), "a job for each of {targets:?}");
    config
}

/// Waits until the control plane has counted `series` (a counter) at
/// least once.
async fn wait_counted(control_plane: &ControlPlane, series: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric_value(&control_plane.metrics().await, series).unwrap_or(0.0) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the control plane never counted {series}:\n{}",
            control_plane.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rule_alert_and_dashboard_query_returns_data_from_a_real_prometheus() {
    let started = Instant::now();
    let rules: Value =
        serde_saphyr::from_str(&read(&observability().join("prometheus/rules.yaml")))
            .expect("rules.yaml is YAML");
    let dashboard: Value =
        serde_json::from_str(&read(&observability().join("grafana/infermesh.json")))
            .expect("the dashboard is JSON");
    let (records, alerts) = rule_expressions(&rules);
    let (panel_queries, variables) = dashboard_expressions(&dashboard);
    assert!(records.len() >= 20 && alerts.len() >= 15 && panel_queries.len() >= 30);

    // The mesh.
    let models = MockModels::start(SCENARIO);
    let grpc = MockBackend::start(Protocol::Http2, grpc_server()).await;
    // A port bound and not listening: connections to it are refused, and
    // nothing else (a listener of the gateway's) can take it meanwhile.
    let reserved =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    reserved
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind a port");
    let dead = reserved
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("an address");
    let files = MeshFiles::new(&mesh_documents(&models.servers, grpc.addr, dead));
    let credential = files.credential("edge", "gateway", "1h");
    let unknown = files.unknown_credential();
    let control_plane = ControlPlane::start(&files, None, &["--heartbeat", "1s"]);
    // A trace collector that takes connections and never answers: the
    // gateway's export waits, its queue fills and spans are dropped.
    // (It listens until the test ends; its backlog takes the connections.)
    let silent_collector = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let collector = format!("http://{}", silent_collector.local_addr().expect("bound"));
    let mut args = files.proxy_args(&[control_plane.grpc], "edge-0", &credential, &[]);
    args.extend(["--trace-otlp-endpoint".to_owned(), collector]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let edge = Gateway::start_from_control_plane("gateway", &args);
    control_plane.wait_synced(1, Duration::from_secs(15)).await;
    // A sidecar whose join token the control plane does not know: refused
    // its certificate, it never becomes ready.
    let args = files.proxy_args(&[control_plane.grpc], "stranger-0", &unknown, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stranger = Gateway::spawn_from_control_plane("sidecar", &args);
    wait_counted(
        &control_plane,
        "infermesh_control_plane_certificates_refused_total{reason=\"unknown_token\"}",
    )
    .await;

    // Prometheus, once it has scraped every target.
    let targets = BTreeMap::from([
        (
            "infermesh-proxy",
            vec![
                Target {
                    address: edge.health,
                    mode: Some("gateway"),
                    namespace: "edge",
                    pod: "edge-0",
                },
                Target {
                    address: stranger.health,
                    mode: Some("sidecar"),
                    namespace: "apps",
                    pod: "stranger-0",
                },
            ],
        ),
        (
            "infermesh-control-plane",
            vec![Target {
                address: control_plane.admin,
                mode: None,
                namespace: "infermesh-system",
                pod: "infermesh-control-plane-0",
            }],
        ),
    ]);
    let prometheus = Prometheus::start(&prometheus_config(&targets)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = prometheus.query("up == 1").await.expect("a valid query");
        if up == Answer::Data(3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every target is up: {up:?}; {:#}\n{}",
            prometheus.api("targets", &[]).await.unwrap_or_default(),
            prometheus.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The load, and meanwhile an update the gateway cannot apply (the
    // port of its new listener is taken), then one it can.
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(
        edge.url("public", ""),
        edge.listener("mtls"),
        4,
        stop.clone(),
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let taken_at = taken.local_addr().expect("bound").to_string();
    files.write("extra.yaml", &extra_listener("extra", &taken_at));
    wait_counted(
        &control_plane,
        "infermesh_control_plane_pushes_total{result=\"nack\"}",
    )
    .await;
    drop(taken);
    files.write("extra.yaml", &extra_listener("extra", "127.0.0.1:0"));
    control_plane.wait_synced(1, Duration::from_secs(15)).await;

    // Every expression, until each returns data.
    let mut expressions: Vec<Expression> = records;
    expressions.extend(alerts);
    expressions.extend(panel_queries);
    for (expression, why) in SILENT {
        assert!(
            expressions.iter().any(|e| e.promql == *expression),
            "{expression} is allowed to return nothing ({why}), but no file has it any more"
        );
    }
    let deadline = Instant::now() + DATA_DEADLINE;
    let mut rounds = 0;
    loop {
        rounds += 1;
        // A config change each round, which the gateway applies: the
        // convergence panels' window always holds some.
        files.write(
            "extra.yaml",
            &extra_listener(&format!("extra-{rounds}"), "127.0.0.1:0"),
        );
        let mut waiting = Vec::new();
        for Expression { source, promql } in &expressions {
            let answer = prometheus
                .query(promql)
                .await
                .unwrap_or_else(|e| panic!("{source}: invalid query {promql}: {e}"));
            let silent = SILENT.iter().find(|(e, _)| e == promql);
            match (answer, silent) {
                (Answer::Data(_), None) | (Answer::Empty, Some(_)) => {}
                (answer, None) => waiting.push(format!("{source}: {answer:?} from {promql}")),
                (answer, Some((_, why))) => panic!(
                    "{source}: {promql} is allowed to return nothing ({why}) but it returned \
                     {answer:?}: take it off the list"
                ),
            }
        }
        for (selector, label) in &variables {
            let values = prometheus
                .api(&format!("label/{label}/values"), &[("match[]", selector)])
                .await
                .unwrap_or_else(|e| panic!("variable {label}: invalid selector {selector}: {e}"));
            if values.as_array().is_none_or(Vec::is_empty) {
                waiting.push(format!("variable {label}: no value in {selector}"));
            }
        }
        let groups = prometheus.api("rules", &[]).await.expect("the rules");
        let mut loaded = 0;
        for rule in groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        {
            loaded += 1;
            if rule["health"] != "ok" {
                waiting.push(format!(
                    "rule {}: health {}, {}",
                    rule["name"], rule["health"], rule["lastError"]
                ));
            }
        }
        let in_file = rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| g["rules"].as_array().map_or(0, Vec::len))
            .sum::<usize>();
        assert_eq!(
            loaded, in_file,
            "Prometheus loaded every rule of rules.yaml"
        );
        let raised = prometheus
            .api("query", &[("query", "count by (alertname) (ALERTS)")])
            .await
            .expect("the alerts");
        let raised: Vec<&str> = raised["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["metric"]["alertname"].as_str())
            .collect();
        for alert in RAISED {
            if !raised.contains(&alert) {
                waiting.push(format!("alert {alert} is not raised"));
            }
        }
        for alert in &raised {
            if !RAISED.contains(alert) {
                waiting.push(format!("alert {alert} is raised"));
            }
        }
        if waiting.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {DATA_DEADLINE:?}, {} of {} expressions still return no data:\n  {}\n\n{}",
            waiting.len(),
            expressions.len(),
            waiting.join("\n  "),
            prometheus.dump()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The load was what it was meant to be.
    stop.store(true, Ordering::SeqCst);
    let mut tally = Tally::new();
    for task in load {
        for (key, n) in task.await.expect("a load task does not panic") {
            *tally.entry(key).or_default() += n;
        }
    }
    for expected in [
        (Kind::Chat, 200),
        (Kind::Chat, 500),
        (Kind::Stream, 200),
        (Kind::Hedged, 200),
        (Kind::Grpc, 200),
        (Kind::Gone, 502),
        (Kind::Sealed, 502),
        (Kind::Plaintext, 0),
    ] {
        assert!(tally.contains_key(&expected), "no {expected:?}: {tally:?}");
    }
    // Nothing else: the model's answers, the gRPC server's (its statuses
    // are in trailers-only headers), the proxy's for the refused
    // connections (502, or 503 once the endpoint is ejected) and the
    // failed handshakes (502: `sealed` is never ejected), and no answer
    // to plaintext on the mutual TLS listener.
    for (kind, status) in tally.keys() {
        let expected: &[u16] = match kind {
            Kind::Chat | Kind::Stream | Kind::Hedged => &[200, 500],
            Kind::Grpc => &[200],
            Kind::Gone => &[502, 503],
            Kind::Sealed => &[502],
            Kind::Plaintext => &[0],
        };
        assert!(expected.contains(status), "{kind:?} {status}: {tally:?}");
    }
    assert!(grpc.requests() > 0, "no gRPC call reached the gRPC server");
    drop(reserved);
    drop(silent_collector);
    eprintln!(
        "{} expressions returned data after {rounds} rounds, {:?} after the start; load: {tally:?}",
        expressions.len(),
        started.elapsed()
    );
}
