//! The infermesh targets: the config each infermesh-proxy process gets
//! (from the target and the file's `infermesh` settings), its logging and
//! tracing flags, which binary runs it, the identities of the mutual-TLS
//! pair, and starting one proxy or a pair of them in a row.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::spec::{InfermeshSpec, TargetKind};
use super::supervise::{self, Placement, Proxies, Started};

/// The SPIFFE ID of the caller's proxy of the mTLS pair.
const CALLER_IDENTITY: &str = "spiffe://bench.local/ns/bench/sa/caller";
/// The SPIFFE ID of the model's proxy of the mTLS pair.
const MODEL_IDENTITY: &str = "spiffe://bench.local/ns/bench/sa/model";

/// How one infermesh-proxy process of a target is set up.
struct Hop<'a> {
    /// Where it forwards.
    upstream: &'a [SocketAddr],
    /// Its listener requires mutual TLS.
    tls_listener: bool,
    /// It speaks HTTP/2 with mutual TLS to the upstream, which must
    /// present this SPIFFE ID.
    upstream_identity: Option<&'a str>,
    /// It speaks HTTP/2 to the upstream (another proxy).
    upstream_http2: bool,
}

impl<'a> Hop<'a> {
    /// A proxy in front of `upstream`, the mock servers.
    fn to(upstream: &'a [SocketAddr]) -> Self {
        Hop {
            upstream,
            tls_listener: false,
            upstream_identity: None,
            upstream_http2: false,
        }
    }
}

/// Starts a target of one infermesh-proxy process (`infermesh`,
/// `infermesh-baseline`, `infermesh-bare`, `infermesh-hedged`,
/// `infermesh-fanout`, `infermesh-traced`, `infermesh-traced-sampled`,
/// `infermesh-json-log`, `infermesh-ecs`) in front of the backends at
/// `backends`, placed as `placement` says.
pub(super) fn start_one(
    kind: TargetKind,
    backends: &[SocketAddr],
    infermesh: &InfermeshSpec,
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<Proxies> {
    check_settings(kind, infermesh)?;
    let args = trace_flags(kind, backends, infermesh);
    let (started, port) = start_proxy(
        kind,
        kind.name(),
        &Hop::to(backends),
        &args,
        infermesh,
        placement,
        work,
    )?;
    Ok(Proxies {
        processes: vec![started],
        port,
    })
}

/// That the `infermesh` block holds what target `kind` needs beyond the
/// common settings.
fn check_settings(kind: TargetKind, infermesh: &InfermeshSpec) -> anyhow::Result<()> {
    match kind {
        TargetKind::InfermeshHedged if infermesh.hedge.is_none() => {
            anyhow::bail!("give the hedge settings in infermesh.hedge, e.g. {{ percentile: 95 }}")
        }
        TargetKind::InfermeshFanout if infermesh.fanout.is_none() => {
            anyhow::bail!(
                "give the fan-out in infermesh.fanout, e.g. {{ strategy: all, branches: [...] }}"
            )
        }
        _ => Ok(()),
    }
}

/// Starts a pair target (`infermesh-pair`, `infermesh-mtls-pair`): the
/// model's proxy in front of the backends at `backends`, then the
/// caller's proxy in front of it, which takes the load; both placed as
/// `placement` says.
pub(super) fn start_pair(
    kind: TargetKind,
    backends: &[SocketAddr],
    infermesh: &InfermeshSpec,
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<Proxies> {
    let mtls = kind == TargetKind::InfermeshMtlsPair;
    let [caller_flags, model_flags] = if mtls {
        pair_identities(work)?
    } else {
        [Vec::new(), Vec::new()]
    };
    let model_hop = Hop {
        tls_listener: mtls,
        ..Hop::to(backends)
    };
    let (model, model_port) = start_proxy(
        kind,
        "pair-model",
        &model_hop,
        &model_flags,
        infermesh,
        placement,
        work,
    )?;
    let model_address = [SocketAddr::from(([127, 0, 0, 1], model_port))];
    let caller_hop = Hop {
        upstream: &model_address,
        tls_listener: false,
        upstream_identity: mtls.then_some(MODEL_IDENTITY),
        upstream_http2: true,
    };
    let (caller, port) = start_proxy(
        kind,
        "pair-caller",
        &caller_hop,
        &caller_flags,
        infermesh,
        placement,
        work,
    )?;
    Ok(Proxies {
        processes: vec![caller, model],
        port,
    })
}

/// Starts one infermesh-proxy process of target `kind` as `hop`, named
/// `name` (its config and log files), with more `args`, placed as
/// `placement` says; returns it and the port it listens on.
fn start_proxy(
    kind: TargetKind,
    name: &'static str,
    hop: &Hop<'_>,
    args: &[String],
    infermesh: &InfermeshSpec,
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<(Started, u16)> {
    let binary = proxy_binary(kind, infermesh)?;
    let port = supervise::free_port()?;
    let config = work.join(format!("{name}.yaml"));
    std::fs::write(&config, infermesh_config(kind, port, hop, infermesh))?;
    let command = proxy_command(kind, &binary, &config, args, infermesh, placement);
    let program = if kind == TargetKind::InfermeshBaseline {
        "the baseline infermesh-proxy (infermesh.baselineBinary)"
    } else {
        "infermesh-proxy"
    };
    let started = supervise::spawn(name, program, port, command, work)?;
    Ok((started, port))
}

/// The command line of one infermesh-proxy process of target `kind`: the
/// `binary` as a gateway on `config`, with its logging flags, as many
/// worker threads as `workers` asks (`--concurrency`, a global flag),
/// more `args`, and under `taskset` when the proxies are pinned.
fn proxy_command(
    kind: TargetKind,
    binary: &Path,
    config: &Path,
    args: &[String],
    infermesh: &InfermeshSpec,
    placement: &Placement,
) -> Command {
    let (log_format, log_level) = log_flags(kind, infermesh);
    let mut command = placement.command(binary);
    // Tracing is on only where `args` say: not by an OTLP endpoint in the
    // harness's environment.
    for name in OTLP_ENDPOINT_VARIABLES {
        command.env_remove(name);
    }
    command.args(["--log-format", log_format, "--log-level", log_level]);
    if let Some(workers) = placement.workers {
        command.arg("--concurrency").arg(workers.to_string());
    }
    command
        .args(["gateway", "--config"])
        .arg(config)
        .args([
            "--admin-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ])
        .args(args);
    command
}

/// The OpenTelemetry variables that would turn tracing on without
/// `--trace-otlp-endpoint`.
const OTLP_ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The `--log-format` and `--log-level` of target `kind`: JSON with the
/// access log only when `infermesh.accessLog` asks for it, but always on
/// for `infermesh-json-log` and, in Elastic Common Schema, for
/// `infermesh-ecs`.
fn log_flags(kind: TargetKind, infermesh: &InfermeshSpec) -> (&'static str, &'static str) {
    const ACCESS_LOG_ON: &str = "info";
    const ACCESS_LOG_OFF: &str = "info,infermesh::access=off";
    match kind {
        TargetKind::InfermeshJsonLog => ("json", ACCESS_LOG_ON),
        TargetKind::InfermeshEcs => ("ecs", ACCESS_LOG_ON),
        _ if infermesh.access_log => ("json", ACCESS_LOG_ON),
        _ => ("json", ACCESS_LOG_OFF),
    }
}

/// The tracing flags of target `kind`: for `infermesh-traced` and
/// `infermesh-traced-sampled`, export over OTLP/HTTP to the first mock
/// server's `/v1/traces`, recording every new trace or the share
/// `infermesh.traceSampling` says; none (tracing off) for the others.
/// The load carries no `traceparent`, so every request starts a new
/// trace and the ratio alone decides.
fn trace_flags(
    kind: TargetKind,
    backends: &[SocketAddr],
    infermesh: &InfermeshSpec,
) -> Vec<String> {
    let sampling = match kind {
        TargetKind::InfermeshTraced => 1.0,
        TargetKind::InfermeshTracedSampled => infermesh.trace_sampling(),
        _ => return Vec::new(),
    };
    vec![
        "--trace-otlp-endpoint".to_owned(),
        format!("http://{}/v1/traces", backends[0]),
        "--trace-otlp-protocol".to_owned(),
        "http/protobuf".to_owned(),
        "--trace-sampling".to_owned(),
        sampling.to_string(),
    ]
}

/// The infermesh-proxy binary that runs target `kind`: the baseline build
/// for `infermesh-baseline`, the configured or sibling one for the others.
fn proxy_binary(kind: TargetKind, infermesh: &InfermeshSpec) -> anyhow::Result<PathBuf> {
    match kind {
        TargetKind::InfermeshBaseline => infermesh.baseline_binary(),
        _ => sibling_binary("infermesh-proxy", infermesh.binary.as_ref()),
    }
}

/// A workspace binary next to `infermesh-bench` (or `configured`).
fn sibling_binary(name: &str, configured: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let binary = match configured {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name(name),
    };
    anyhow::ensure!(
        binary.is_file(),
        "{} not found (build it with cargo build --release, or set infermesh.binary)",
        binary.display()
    );
    Ok(binary)
}

/// The config of one infermesh-proxy process of a target, as JSON
/// documents (which are YAML too).
fn infermesh_config(
    kind: TargetKind,
    port: u16,
    hop: &Hop<'_>,
    infermesh: &InfermeshSpec,
) -> String {
    use serde_json::{Value, json};
    let endpoints: Vec<Value> = hop
        .upstream
        .iter()
        .map(|b| json!({ "address": b.to_string() }))
        .collect();
    let mut backend = json!({ "endpoints": endpoints });
    if hop.upstream_http2 {
        backend["protocol"] = json!("http2");
    }
    if let Some(identity) = hop.upstream_identity {
        backend["tls"] = json!({ "identity": identity });
    }
    let mut rule = json!({ "backends": [{ "name": "mock" }] });
    let (more_backend, more_rule) = match kind {
        TargetKind::InfermeshBare => (
            json!({
                "loadBalancer": { "policy": "roundRobin" },
                "outlierDetection": { "consecutiveFailures": 0 },
            }),
            json!({ "retry": { "maxRetries": 0 } }),
        ),
        TargetKind::InfermeshHedged => {
            let mut rule = infermesh.rule.clone();
            rule.insert(
                "hedge".to_owned(),
                Value::Object(infermesh.hedge.clone().unwrap_or_default()),
            );
            (
                Value::Object(infermesh.backend.clone()),
                Value::Object(rule),
            )
        }
        TargetKind::InfermeshFanout => {
            rule = json!({ "fanout": infermesh.fanout.clone().unwrap_or_default() });
            (Value::Object(infermesh.backend.clone()), json!({}))
        }
        // infermesh and infermesh-baseline (which differ only in the
        // binary), the traced and logging targets (which differ only in
        // their flags) and both proxies of the pairs: the settings as
        // given.
        _ => (
            Value::Object(infermesh.backend.clone()),
            Value::Object(infermesh.rule.clone()),
        ),
    };
    for (target, more) in [(&mut backend, more_backend), (&mut rule, more_rule)] {
        if let (Value::Object(target), Value::Object(more)) = (target, more) {
            target.extend(more);
        }
    }
    let mut listener = json!({ "address": format!("127.0.0.1:{port}") });
    if hop.tls_listener {
        listener["tls"] = json!({ "mode": "strict" });
    }
    let documents = [
        json!({ "kind": "Listener", "metadata": { "name": "bench" }, "spec": listener }),
        json!({ "kind": "Backend", "metadata": { "name": "mock" }, "spec": backend }),
        json!({ "kind": "Route", "metadata": { "name": "all" }, "spec": { "rules": [rule] } }),
    ];
    documents
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d["apiVersion"] = json!(infermesh_api::API_VERSION);
            format!("---\n{d}\n")
        })
        .collect()
}

/// A CA and the certificates of both proxies of the mTLS pair, made with
/// `infermesh-control-plane ca`; returns the identity flags of each.
fn pair_identities(work: &Path) -> anyhow::Result<[Vec<String>; 2]> {
    let control_plane = sibling_binary("infermesh-control-plane", None)?;
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let output = Command::new(&control_plane).args(args).output()?;
        anyhow::ensure!(
            output.status.success(),
            "infermesh-control-plane {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    let dir = work.join("identities");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    run(&[
        "ca",
        "init",
        "--trust-domain",
        "bench.local",
        "--out",
        &path("ca"),
        "--force",
    ])?;
    let mut flags = Vec::new();
    for (identity, name) in [(CALLER_IDENTITY, "caller"), (MODEL_IDENTITY, "model")] {
        run(&[
            "ca",
            "issue",
            "--ca",
            &path("ca"),
            "--identity",
            identity,
            "--out",
            &path(name),
            "--force",
        ])?;
        let file = |f: &str| dir.join(name).join(f).to_string_lossy().into_owned();
        flags.push(vec![
            "--identity-cert".to_owned(),
            file("cert.pem"),
            "--identity-key".to_owned(),
            file("key.pem"),
            "--trust-bundle".to_owned(),
            file("bundle.pem"),
        ]);
    }
    let [caller, model]: [Vec<String>; 2] = flags.try_into().expect("two identities");
    Ok([caller, model])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config of target `kind` in front of `backends`, validated.
    fn validated(
        kind: TargetKind,
        hop: &Hop<'_>,
        infermesh: &InfermeshSpec,
    ) -> infermesh_api::Config {
        let text = infermesh_config(kind, 8080, hop, infermesh);
        infermesh_api::Config::load(&[infermesh_api::Source {
            name: "bench.yaml",
            text: &text,
        }])
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn infermesh_targets_get_a_valid_config_with_their_settings() {
        let spec: InfermeshSpec = serde_saphyr::from_str(
            "backend: { circuitBreaker: { maxRequests: 7 } }\nrule: { retry: { nonIdempotent: true } }\nfanout: { strategy: all, branches: [{ name: a, backend: mock, model: m-5 }, { name: b, backend: mock, model: m-20 }] }",
        )
        .unwrap();
        let backends = ["127.0.0.1:9000".parse().unwrap()];
        let load = |kind| validated(kind, &Hop::to(&backends), &spec);
        let full = load(TargetKind::Infermesh);
        let backend = &full.backend("mock").unwrap().spec;
        assert_eq!(backend.circuit_breaker.max_requests, 7);
        assert!(
            full.route("all").unwrap().spec.rules[0]
                .retry
                .non_idempotent
        );

        let bare = load(TargetKind::InfermeshBare);
        let backend = &bare.backend("mock").unwrap().spec;
        assert_eq!(
            backend.circuit_breaker.max_requests, 1024,
            "settings are not for bare"
        );
        assert_eq!(backend.outlier_detection.consecutive_failures, 0);
        assert_eq!(
            bare.route("all").unwrap().spec.rules[0].retry.max_retries,
            0
        );

        let fanout = load(TargetKind::InfermeshFanout);
        let rule = &fanout.route("all").unwrap().spec.rules[0];
        assert!(rule.backends.is_empty());
        let branches = &rule.fanout.as_ref().unwrap().branches;
        assert_eq!(branches[1].model.as_deref(), Some("m-20"));
    }

    #[test]
    fn the_baseline_runs_the_infermesh_config_with_its_own_binary() {
        let dir = tempfile::tempdir().unwrap();
        let baseline = dir.path().join("infermesh-proxy-before");
        std::fs::write(&baseline, "").unwrap();
        let spec: InfermeshSpec = serde_saphyr::from_str(&format!(
            "baselineBinary: {}\nbackend: {{ circuitBreaker: {{ maxRequests: 7 }} }}\nrule: {{ retry: {{ nonIdempotent: true }} }}\nhedge: {{ percentile: 95 }}",
            baseline.display()
        ))
        .unwrap();
        let backends = ["127.0.0.1:9000".parse().unwrap()];
        let hop = Hop::to(&backends);
        assert_eq!(
            infermesh_config(TargetKind::InfermeshBaseline, 8080, &hop, &spec),
            infermesh_config(TargetKind::Infermesh, 8080, &hop, &spec),
            "the same config, settings included (and no hedge)"
        );
        let config = validated(TargetKind::InfermeshBaseline, &hop, &spec);
        assert_eq!(
            config
                .backend("mock")
                .unwrap()
                .spec
                .circuit_breaker
                .max_requests,
            7
        );

        assert_eq!(
            proxy_binary(TargetKind::InfermeshBaseline, &spec).unwrap(),
            baseline
        );
        let configured = InfermeshSpec {
            binary: Some(dir.path().to_owned()),
            ..spec.clone()
        };
        let error = format!(
            "{:#}",
            proxy_binary(TargetKind::Infermesh, &configured).unwrap_err()
        );
        assert!(
            error.contains("set infermesh.binary"),
            "infermesh keeps infermesh.binary: {error}"
        );

        let without = InfermeshSpec {
            baseline_binary: None,
            ..spec
        };
        let error = format!(
            "{:#}",
            proxy_binary(TargetKind::InfermeshBaseline, &without).unwrap_err()
        );
        assert!(error.contains("infermesh.baselineBinary"), "{error}");
    }

    #[test]
    fn the_tracing_and_logging_targets_run_the_infermesh_config() {
        let spec: InfermeshSpec = serde_saphyr::from_str(
            "backend: { circuitBreaker: { maxRequests: 7 } }\nrule: { retry: { nonIdempotent: true } }",
        )
        .unwrap();
        let backends = ["127.0.0.1:9000".parse().unwrap()];
        let hop = Hop::to(&backends);
        for kind in [
            TargetKind::InfermeshTraced,
            TargetKind::InfermeshTracedSampled,
            TargetKind::InfermeshJsonLog,
            TargetKind::InfermeshEcs,
        ] {
            assert_eq!(
                infermesh_config(kind, 8080, &hop, &spec),
                infermesh_config(TargetKind::Infermesh, 8080, &hop, &spec),
                "{}",
                kind.name()
            );
            validated(kind, &hop, &spec);
        }
    }

    /// The tracing options infermesh-proxy makes of `args`, parsed with
    /// its own flags.
    fn proxy_tracing(args: &[String]) -> Option<infermesh_proxy::TraceOptions> {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            tracing: infermesh_proxy::TraceArgs,
        }
        let flags = <Flags as clap::Parser>::try_parse_from(
            std::iter::once("infermesh-proxy").chain(args.iter().map(String::as_str)),
        )
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        flags.tracing.options("infermesh-proxy")
    }

    #[test]
    fn only_the_traced_targets_trace_to_the_first_mock_server() {
        let backends: [SocketAddr; 2] = [
            "127.0.0.1:9000".parse().unwrap(),
            "127.0.0.1:9001".parse().unwrap(),
        ];
        let default = InfermeshSpec::default();
        let traced = proxy_tracing(&trace_flags(
            TargetKind::InfermeshTraced,
            &backends,
            &default,
        ))
        .expect("tracing on");
        assert_eq!(
            traced.endpoint.as_deref(),
            Some("http://127.0.0.1:9000/v1/traces")
        );
        assert_eq!(
            format!("{:?}", traced.protocol),
            "HttpProtobuf",
            "OTLP over HTTP/protobuf"
        );
        assert_eq!(traced.sampling, 1.0);

        let sampled = |spec: &InfermeshSpec| {
            proxy_tracing(&trace_flags(
                TargetKind::InfermeshTracedSampled,
                &backends,
                spec,
            ))
            .expect("tracing on")
        };
        let one_percent = sampled(&default);
        assert_eq!(one_percent.endpoint, traced.endpoint);
        assert_eq!(one_percent.sampling, 0.01);
        let spec: InfermeshSpec = serde_saphyr::from_str("traceSampling: 0.25").unwrap();
        assert_eq!(sampled(&spec).sampling, 0.25);
        assert_eq!(
            trace_flags(TargetKind::InfermeshTraced, &backends, &spec),
            trace_flags(TargetKind::InfermeshTraced, &backends, &default),
            "infermesh-traced records every trace whatever traceSampling says"
        );

        for kind in [
            TargetKind::Infermesh,
            TargetKind::InfermeshBaseline,
            TargetKind::InfermeshBare,
            TargetKind::InfermeshHedged,
            TargetKind::InfermeshFanout,
            TargetKind::InfermeshJsonLog,
            TargetKind::InfermeshEcs,
            TargetKind::InfermeshPair,
            TargetKind::InfermeshMtlsPair,
        ] {
            assert!(
                trace_flags(kind, &backends, &spec).is_empty(),
                "{} traces",
                kind.name()
            );
        }
    }

    #[test]
    fn the_access_log_is_on_as_asked_and_always_for_the_logging_targets() {
        use clap::ValueEnum as _;
        let off = InfermeshSpec::default();
        let on = InfermeshSpec {
            access_log: true,
            ..InfermeshSpec::default()
        };
        for kind in [TargetKind::Infermesh, TargetKind::InfermeshTraced] {
            assert_eq!(
                log_flags(kind, &off),
                ("json", "info,infermesh::access=off")
            );
            assert_eq!(log_flags(kind, &on), ("json", "info"));
        }
        for spec in [&off, &on] {
            assert_eq!(
                log_flags(TargetKind::InfermeshJsonLog, spec),
                ("json", "info")
            );
            assert_eq!(log_flags(TargetKind::InfermeshEcs, spec), ("ecs", "info"));
        }
        for format in ["json", "ecs"] {
            assert!(
                infermesh_proxy::LogFormat::from_str(format, false).is_ok(),
                "infermesh-proxy takes --log-format {format}"
            );
        }
    }

    /// The program and arguments of `command`, as text.
    fn command_line(command: &Command) -> (String, Vec<String>) {
        (
            command.get_program().to_string_lossy().into_owned(),
            command
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        )
    }

    #[test]
    fn workers_and_pinning_reach_the_proxys_command_line() {
        let binary = Path::new("/bin/infermesh-proxy");
        let config = Path::new("work/infermesh.yaml");
        let spec = InfermeshSpec::default();
        let pinned = Placement {
            cpus: Some(vec![0, 2]),
            workers: Some(1),
            default_workers: 2,
            connections: 32,
        };
        let (program, args) = command_line(&proxy_command(
            TargetKind::Infermesh,
            binary,
            config,
            &[],
            &spec,
            &pinned,
        ));
        assert_eq!(program, "taskset");
        assert_eq!(args[..3], ["-c", "0,2", "/bin/infermesh-proxy"]);
        let global = &args[3..args.iter().position(|a| a == "gateway").unwrap()];
        assert!(
            global.windows(2).any(|w| w == ["--concurrency", "1"]),
            "--concurrency is a global flag, before the subcommand: {args:?}"
        );

        let unpinned = Placement {
            cpus: None,
            workers: None,
            default_workers: 2,
            connections: 32,
        };
        let (program, args) = command_line(&proxy_command(
            TargetKind::InfermeshJsonLog,
            binary,
            config,
            &["--trace-sampling".to_owned(), "1".to_owned()],
            &spec,
            &unpinned,
        ));
        assert_eq!(program, "/bin/infermesh-proxy");
        assert!(
            !args.iter().any(|a| a == "--concurrency"),
            "the proxy's own default without workers: {args:?}"
        );
        assert_eq!(args[..4], ["--log-format", "json", "--log-level", "info"]);
        assert!(args.ends_with(&["--trace-sampling".to_owned(), "1".to_owned()]));
    }

    #[test]
    fn the_caller_of_an_mtls_pair_expects_the_models_identity_over_http2() {
        let pair_config = |hop: &Hop<'_>| {
            validated(
                TargetKind::InfermeshMtlsPair,
                hop,
                &InfermeshSpec::default(),
            )
        };
        let model = ["127.0.0.1:9001".parse().unwrap()];
        let hop = Hop {
            upstream: &model,
            tls_listener: false,
            upstream_identity: Some(MODEL_IDENTITY),
            upstream_http2: true,
        };
        let config = pair_config(&hop);
        let backend = &config.backend("mock").unwrap().spec;
        assert_eq!(
            backend.tls.as_ref().unwrap().identity.as_deref(),
            Some(MODEL_IDENTITY)
        );
        assert_eq!(backend.protocol, infermesh_api::UpstreamProtocol::Http2);

        let model_side = Hop {
            tls_listener: true,
            ..Hop::to(&model)
        };
        let config = pair_config(&model_side);
        assert_eq!(
            config
                .listener("bench")
                .unwrap()
                .spec
                .tls
                .as_ref()
                .unwrap()
                .mode,
            infermesh_api::TlsMode::Strict
        );
    }
}
